//! The fault manager: the one owner of all fault state (an actor).
//!
//! gRPC handlers send [`Command`]s and await a reply; only this task touches the
//! journal, the fault table and the sessions. Effects (signals, verification,
//! reverts) run in tasks the manager spawns and owns, which report back on an
//! internal channel, so a cancelled RPC can never leave a fault half-applied: the
//! fault goes on to Active (and is then reverted on schedule) whoever is listening.
//!
//! The manager's task never blocks: planning (/proc scans, NVML) runs on the blocking
//! pool, journal writes on the journal's own thread (an inject's effect waits for
//! its intent's fsync in the task that applies it), effects in spawned tasks. Its
//! loop serves commands already waiting (lease renewals among them) before it acts
//! on an expired duration or lease, and acts on expiries between any two commands,
//! so a fault's duration holds under any load of requests.
//!
//! Lifecycle: `Injecting → Active → Reverting → Reverted`, or `Failed` with a reason
//! (after the partial effect was reverted). A fault whose revert failed stays in the
//! table as `Failed` with `leftover` set, and stays open in the journal, so `revert`,
//! `halt` and the next start-up retry it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpuchaos_proto::pb;
use gpuchaos_proto::spec::FaultSpec;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::error::AgentError;
use crate::failpoint;
use crate::faults::Plan;
use crate::faults::{Applied, ApplyCtx, FaultDriver, RevertError};
use crate::journal::{Journal, JournalWriter, OpenEntry, Record};
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::sys::clock::{mono_ns, unix_ms};
use tracing::Instrument;

/// How many ended faults `list --include-finished` remembers.
const HISTORY: usize = 512;
/// How long a cancelled background task (crash-loop) may take to stop.
const BACKGROUND_STOP: Duration = Duration::from_secs(15);

type Reply<T> = oneshot::Sender<T>;

pub enum Command {
    Inject {
        spec: Box<FaultSpec>,
        session: Option<String>,
        reply: Reply<Result<pb::Fault, AgentError>>,
    },
    Revert {
        id: String,
        reply: Reply<Result<pb::Fault, AgentError>>,
    },
    List {
        include_finished: bool,
        reply: Reply<Vec<pb::Fault>>,
    },
    RevertAll {
        reason: &'static str,
        reply: Reply<Vec<pb::Fault>>,
    },
    OpenSession {
        ttl: Duration,
        holder: String,
        lock: String,
        reply: Reply<Result<pb::Session, AgentError>>,
    },
    RenewSession {
        id: String,
        /// When the renewal reached the agent: one that arrived before the lease ran
        /// out renews it, even if the manager gets to it a moment later.
        at: Instant,
        reply: Reply<Result<pb::Session, AgentError>>,
    },
    CloseSession {
        id: String,
        keep_faults: bool,
        reply: Reply<Result<Vec<pb::Fault>, AgentError>>,
    },
    Counts {
        reply: Reply<(u32, u32)>,
    },
    /// Refuse new faults, revert everything, reply when nothing is left.
    Shutdown {
        reply: Reply<Vec<pb::Fault>>,
    },
}

enum Internal {
    /// A plan made off the manager's task.
    Planned {
        spec: Box<FaultSpec>,
        session: Option<String>,
        result: Result<Plan, AgentError>,
        reply: Reply<Result<pb::Fault, AgentError>>,
    },
    /// The intent record could not be written: nothing was applied.
    IntentFailed { id: String, error: String },
    Applied {
        id: String,
        result: Result<Applied, String>,
    },
    Reverted {
        id: String,
        result: Result<(), RevertError>,
    },
    /// The fault's watch saw something (a replacement, its GPU memory settled): kept
    /// with the fault, also once it ended.
    Observed {
        id: String,
        observation: pb::Observation,
    },
}

/// Lifecycle as data: what a fault is doing, and what may happen next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Injecting,
    Active,
    Reverting,
    Reverted,
    Failed,
}

impl Phase {
    fn pb(self) -> pb::FaultState {
        match self {
            Phase::Injecting => pb::FaultState::Injecting,
            Phase::Active => pb::FaultState::Active,
            Phase::Reverting => pb::FaultState::Reverting,
            Phase::Reverted => pb::FaultState::Reverted,
            Phase::Failed => pb::FaultState::Failed,
        }
    }
}

struct Fault {
    id: String,
    kind: &'static str,
    spec: FaultSpec,
    spec_json: String,
    session: Option<String>,
    phase: Phase,
    target: String,
    plan: serde_json::Value,
    applied: bool,
    details: Arc<Mutex<serde_json::Value>>,
    background: Option<JoinHandle<()>>,
    observations: Vec<pb::Observation>,
    cancel: CancellationToken,
    started: Instant,
    revert_started: Option<Instant>,
    created_mono: u64,
    created_unix: u64,
    verified_mono: u64,
    verified_unix: u64,
    ended_mono: u64,
    ended_unix: u64,
    expires: Option<Instant>,
    error: String,
    leftover: String,
    end_reason: String,
    /// Revert requested while still injecting: done as soon as apply returns.
    revert_after_apply: Option<&'static str>,
    /// Apply failed: the fault ends as Failed once its partial effect is reverted.
    inject_failed: bool,
    inject_waiters: Vec<Reply<Result<pb::Fault, AgentError>>>,
    revert_waiters: Vec<Reply<pb::Fault>>,
}

impl Fault {
    fn to_pb(&self) -> pb::Fault {
        let expires_mono_ns = match self.expires {
            Some(at) if self.phase == Phase::Active => {
                mono_ns() + at.saturating_duration_since(Instant::now()).as_nanos() as u64
            }
            _ => 0,
        };
        pb::Fault {
            id: self.id.clone(),
            kind: self.kind.to_string(),
            state: self.phase.pb() as i32,
            target: self.target.clone(),
            spec_json: self.spec_json.clone(),
            session_id: self.session.clone().unwrap_or_default(),
            duration_ms: self.spec.duration().as_millis() as u64,
            error: self.error.clone(),
            leftover: self.leftover.clone(),
            details_json: self
                .details
                .lock()
                .map(|d| d.to_string())
                .unwrap_or_default(),
            end_reason: self.end_reason.clone(),
            created_mono_ns: self.created_mono,
            verified_mono_ns: self.verified_mono,
            ended_mono_ns: self.ended_mono,
            expires_mono_ns,
            created_unix_ms: self.created_unix,
            verified_unix_ms: self.verified_unix,
            ended_unix_ms: self.ended_unix,
            observations: self.observations.clone(),
        }
    }

    /// Answers everyone waiting on this fault's inject or revert.
    fn notify_waiters(&mut self, snapshot: &pb::Fault) {
        for w in self
            .inject_waiters
            .drain(..)
            .map(Waiter::Inject)
            .chain(self.revert_waiters.drain(..).map(Waiter::Revert))
        {
            w.send(snapshot);
        }
    }
}

/// Someone waiting for a fault: its inject's reply, or a revert's.
enum Waiter {
    Inject(Reply<Result<pb::Fault, AgentError>>),
    Revert(Reply<pb::Fault>),
}

impl Waiter {
    fn send(self, snapshot: &pb::Fault) {
        match self {
            Waiter::Inject(w) => {
                let _ = w.send(Ok(snapshot.clone()));
            }
            Waiter::Revert(w) => {
                let _ = w.send(snapshot.clone());
            }
        }
    }
}

impl Fault {
    fn is_open(&self) -> bool {
        match self.phase {
            Phase::Injecting | Phase::Active | Phase::Reverting => true,
            Phase::Failed => !self.leftover.is_empty(),
            Phase::Reverted => false,
        }
    }
}

struct Session {
    ttl: Duration,
    expires: Instant,
    holder: String,
    /// An exclusive lock name ("" for none): at most one live session holds each.
    lock: String,
}

/// A cheap handle for sending commands to the manager.
#[derive(Clone, Debug)]
pub struct ManagerHandle {
    tx: mpsc::Sender<Command>,
    events: broadcast::Sender<pb::FaultEvent>,
}

impl ManagerHandle {
    pub async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, AgentError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| AgentError::ShuttingDown)?;
        rx.await.map_err(|_| AgentError::ShuttingDown)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<pb::FaultEvent> {
        self.events.subscribe()
    }
}

pub struct Manager {
    drivers: HashMap<&'static str, Arc<dyn FaultDriver>>,
    policy: Arc<Policy>,
    journal: JournalWriter,
    metrics: Arc<Metrics>,
    faults: BTreeMap<String, Fault>,
    history: VecDeque<pb::Fault>,
    sessions: HashMap<String, Session>,
    events: broadcast::Sender<pb::FaultEvent>,
    internal_tx: mpsc::UnboundedSender<Internal>,
    internal_rx: mpsc::UnboundedReceiver<Internal>,
    shutting_down: bool,
    shutdown_waiters: Vec<Reply<Vec<pb::Fault>>>,
    /// Cancelled at shutdown: the watches' observations are no longer listened to,
    /// which ends the watches.
    watches_stop: CancellationToken,
    /// Plans on the manager's own task instead of the blocking pool (unit tests on
    /// tokio's paused clock: see [`Manager::new_inline_io`]).
    plan_inline: bool,
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

impl Manager {
    pub fn new(
        drivers: Vec<Arc<dyn FaultDriver>>,
        policy: Arc<Policy>,
        journal: Journal,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self::build(
            drivers,
            policy,
            JournalWriter::start(journal),
            metrics,
            false,
        )
    }

    /// A manager that plans and journals on its own task. Only for unit tests run
    /// on tokio's paused clock, which would otherwise move time on (lapsing leases,
    /// ending durations) while the manager waits for the blocking pool or the
    /// journal's thread.
    pub fn new_inline_io(
        drivers: Vec<Arc<dyn FaultDriver>>,
        policy: Arc<Policy>,
        journal: Journal,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self::build(
            drivers,
            policy,
            JournalWriter::inline(journal),
            metrics,
            true,
        )
    }

    fn build(
        drivers: Vec<Arc<dyn FaultDriver>>,
        policy: Arc<Policy>,
        journal: JournalWriter,
        metrics: Arc<Metrics>,
        plan_inline: bool,
    ) -> Self {
        let (internal_tx, internal_rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(1024);
        Manager {
            drivers: drivers.into_iter().map(|d| (d.kind(), d)).collect(),
            policy,
            journal,
            metrics,
            faults: BTreeMap::new(),
            history: VecDeque::new(),
            sessions: HashMap::new(),
            events,
            internal_tx,
            internal_rx,
            shutting_down: false,
            shutdown_waiters: Vec::new(),
            watches_stop: CancellationToken::new(),
            plan_inline,
        }
    }

    /// Start-up recovery: reverts every fault the journal holds open (a previous run
    /// crashed or was killed), then compacts the journal. Runs before serving.
    /// Returns what was recovered, for the log.
    pub async fn recover(&mut self, open: Vec<OpenEntry>) -> Vec<pb::Fault> {
        let mut out = Vec::new();
        let plans: Vec<(String, serde_json::Value)> = open
            .iter()
            .filter_map(|e| match &e.intent {
                Record::Intent { kind, plan, .. } => Some((kind.clone(), plan.clone())),
                _ => None,
            })
            .collect();
        let plans_of = |kind: &str| -> Vec<serde_json::Value> {
            plans
                .iter()
                .filter(|(k, _)| k == kind)
                .map(|(_, p)| p.clone())
                .collect()
        };
        for entry in open {
            let Record::Intent {
                id,
                kind,
                spec_json,
                session,
                target,
                plan,
                unix_ms: created,
            } = entry.intent.clone()
            else {
                continue;
            };
            let started = Instant::now();
            let span = tracing::info_span!("fault", fault.id = %id, fault.kind = %kind);
            let result = match self.drivers.get(kind.as_str()) {
                Some(d) => Arc::clone(d).revert(plan.clone()).instrument(span).await,
                None => Err(RevertError {
                    message: format!("this agent version has no {kind:?} fault kind"),
                    leftover: format!("{target}: revert it by hand; the journal plan is {plan}"),
                }),
            };
            let spec = FaultSpec::from_json(&spec_json).ok();
            let mut pbf = pb::Fault {
                id: id.clone(),
                kind: kind.clone(),
                target: target.clone(),
                spec_json: spec_json.clone(),
                session_id: session.clone().unwrap_or_default(),
                duration_ms: spec
                    .as_ref()
                    .map(|s| s.duration().as_millis() as u64)
                    .unwrap_or(0),
                end_reason: "recovery".into(),
                created_unix_ms: created,
                ended_mono_ns: mono_ns(),
                ended_unix_ms: unix_ms(),
                ..Default::default()
            };
            match result {
                Ok(()) => {
                    let written = self.journal.append(Record::Reverted {
                        id: id.clone(),
                        reason: "recovery".into(),
                        unix_ms: unix_ms(),
                    });
                    if let Ok(Err(e)) = written.await {
                        tracing::error!(fault.id = %id, error = %e, "journal append failed after recovery revert");
                    }
                    pbf.state = pb::FaultState::Reverted as i32;
                    self.metrics.reverted(
                        registered_kind(&kind),
                        "recovery",
                        started.elapsed().as_secs_f64(),
                    );
                    tracing::warn!(fault.id = %id, fault.kind = %kind, target = %target, applied = entry.applied,
                        "start-up recovery: reverted a fault left by a previous run");
                    self.remember(pbf.clone());
                }
                Err(e) => {
                    tracing::error!(fault.id = %id, fault.kind = %kind, error = %e.message, leftover = %e.leftover,
                        "start-up recovery could not revert a fault: it stays in the journal and in status");
                    self.metrics.failed(registered_kind(&kind), "revert");
                    pbf.state = pb::FaultState::Failed as i32;
                    pbf.error = e.message.clone();
                    pbf.leftover = e.leftover.clone();
                    if let (Some(spec), Some(kind)) =
                        (spec, self.drivers.get(kind.as_str()).map(|d| d.kind()))
                    {
                        let mut f = self.blank_fault(
                            id.clone(),
                            kind,
                            spec,
                            spec_json,
                            session,
                            target,
                            plan,
                        );
                        f.phase = Phase::Failed;
                        f.applied = true;
                        f.error = e.message;
                        f.leftover = e.leftover;
                        f.end_reason = "recovery".into();
                        f.created_unix = created;
                        self.faults.insert(id, f);
                    }
                }
            }
            out.push(pbf);
        }
        for (kind, driver) in &self.drivers {
            let removed = Arc::clone(driver).sweep(plans_of(kind)).await;
            for what in removed {
                tracing::warn!(fault.kind = %kind, removed = %what, "start-up sweep removed gpuchaos state");
            }
        }
        self.journal.compact_if_large(self.open_entries());
        out
    }

    /// Spawns the manager task.
    pub fn spawn(self) -> (ManagerHandle, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(256);
        let handle = ManagerHandle {
            tx,
            events: self.events.clone(),
        };
        let task = tokio::spawn(self.run(rx));
        (handle, task)
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut commands_open = true;
        loop {
            let deadline = self.next_deadline();
            if deadline.is_some_and(|d| d <= Instant::now()) {
                // A duration or lease has run out. Commands already waiting go first
                // (a renewal sent before the lease ran out must win), then the expiry;
                // handling a command is cheap, so the expiry is at most one batch late.
                for _ in 0..rx.max_capacity() {
                    match rx.try_recv() {
                        Ok(c) => self.handle(c),
                        Err(_) => break,
                    }
                }
                self.tick();
                continue;
            }
            tokio::select! {
                biased;
                // Effects reporting back first (bounded by the tasks in flight), then
                // commands, then timers.
                Some(ev) = self.internal_rx.recv() => self.handle_internal(ev),
                cmd = rx.recv(), if commands_open => match cmd {
                    Some(c) => self.handle(c),
                    None => {
                        // Every handle is gone: nobody can revert any more, so we do.
                        commands_open = false;
                        self.shutting_down = true;
                        self.watches_stop.cancel();
                        self.revert_all("shutdown");
                    }
                },
                _ = sleep_until(deadline.unwrap_or_else(far_future)), if deadline.is_some() => self.tick(),
            }
            if self.shutting_down && !self.faults.values().any(|f| f.phase != Phase::Failed) {
                let all: Vec<pb::Fault> = self.faults.values().map(Fault::to_pb).collect();
                if !self.shutdown_waiters.is_empty() {
                    // The `reverted` records reach the disk before the agent may exit.
                    let waiters: Vec<_> = self.shutdown_waiters.drain(..).collect();
                    let flushed = self.journal.flush();
                    tokio::spawn(async move {
                        if let Ok(Err(e)) = flushed.await {
                            tracing::error!(error = %e, "the journal could not be flushed at shutdown: the next start reverts again (idempotent)");
                        }
                        for w in waiters {
                            let _ = w.send(all.clone());
                        }
                    });
                }
                if !commands_open {
                    return;
                }
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let faults = self
            .faults
            .values()
            .filter(|f| f.phase == Phase::Active)
            .filter_map(|f| f.expires);
        let sessions = self.sessions.values().map(|s| s.expires);
        faults.chain(sessions).min()
    }

    fn tick(&mut self) {
        let now = Instant::now();
        let expired: Vec<String> = self
            .faults
            .values()
            .filter(|f| f.phase == Phase::Active && f.expires.is_some_and(|e| e <= now))
            .map(|f| f.id.clone())
            .collect();
        for id in expired {
            tracing::info!(fault.id = %id, "duration elapsed: reverting");
            self.request_revert(&id, "duration");
        }
        let lapsed: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.expires <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for sid in lapsed {
            let s = self.sessions.remove(&sid);
            let ids: Vec<String> = self
                .faults
                .values()
                .filter(|f| f.session.as_deref() == Some(sid.as_str()) && f.is_open())
                .map(|f| f.id.clone())
                .collect();
            tracing::warn!(session = %sid, holder = %s.map(|s| s.holder).unwrap_or_default(), faults = ids.len(),
                "lease lapsed (controller gone?): reverting its faults");
            self.metrics.lease_expired();
            self.metrics.set_sessions(self.sessions.len() as i64);
            for id in &ids {
                self.request_revert(id, "lease");
            }
            self.emit(pb::fault_event::Event::SessionExpired(pb::SessionExpired {
                session_id: sid,
                fault_ids: ids,
            }));
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Inject {
                spec,
                session,
                reply,
            } => {
                if let Err(e) = self.start_inject(*spec, session, reply) {
                    // start_inject only returns the reply on refusal
                    let (e, reply) = *e;
                    let _ = reply.send(Err(e));
                }
            }
            Command::Revert { id, reply } => {
                let Some(f) = self.faults.get_mut(&id) else {
                    let res = self
                        .history
                        .iter()
                        .find(|f| f.id == id)
                        .cloned()
                        .ok_or(AgentError::FaultNotFound(id));
                    let _ = reply.send(res);
                    return;
                };
                let (tx, rx) = oneshot::channel();
                f.revert_waiters.push(tx);
                self.request_revert(&id, "revert");
                tokio::spawn(async move {
                    let r = rx.await.map_err(|_| AgentError::ShuttingDown);
                    let _ = reply.send(r);
                });
            }
            Command::List {
                include_finished,
                reply,
            } => {
                let mut v: Vec<pb::Fault> = self.faults.values().map(Fault::to_pb).collect();
                if include_finished {
                    v.extend(self.history.iter().cloned());
                }
                let _ = reply.send(v);
            }
            Command::RevertAll { reason, reply } => {
                let rxs = self.revert_all(reason);
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    for rx in rxs {
                        if let Ok(f) = rx.await {
                            out.push(f);
                        }
                    }
                    let _ = reply.send(out);
                });
            }
            Command::OpenSession {
                ttl,
                holder,
                lock,
                reply,
            } => {
                let held_by = (!lock.is_empty())
                    .then(|| {
                        self.sessions
                            .iter()
                            .find(|(_, s)| s.lock == lock && s.expires > Instant::now())
                    })
                    .flatten();
                let max = self.policy.file.max_session_ttl.0;
                let res = if self.shutting_down {
                    Err(AgentError::ShuttingDown)
                } else if ttl.is_zero() {
                    Err(AgentError::InvalidSpec(gpuchaos_proto::spec::SpecErrors(
                        vec![gpuchaos_proto::spec::FieldError::new(
                            "lease_ttl_ms",
                            "must be above zero",
                        )],
                    )))
                } else if ttl > max {
                    Err(AgentError::Refused(format!(
                        "lease TTL {} exceeds the policy maximum of {}",
                        humantime::format_duration(ttl),
                        self.policy.file.max_session_ttl
                    )))
                } else if let Some((sid, s)) = held_by {
                    Err(AgentError::Locked(format!(
                        "lock `{lock}` is held by session {sid} ({}), until it closes or its lease lapses (in at most {})",
                        s.holder,
                        humantime::format_duration(Duration::from_secs(
                            s.expires
                                .saturating_duration_since(Instant::now())
                                .as_secs()
                                + 1
                        ))
                    )))
                } else {
                    let id = new_id("s");
                    let s = Session {
                        ttl,
                        expires: Instant::now() + ttl,
                        holder,
                        lock,
                    };
                    let pbs = session_pb(&id, &s);
                    tracing::info!(session = %id, holder = %s.holder, ttl = ?ttl, "session opened");
                    self.sessions.insert(id, s);
                    self.metrics.set_sessions(self.sessions.len() as i64);
                    Ok(pbs)
                };
                let _ = reply.send(res);
            }
            Command::RenewSession { id, at, reply } => {
                // A lease that ran out before the renewal arrived is over even before
                // the timer collects the session: renewing it could hand its lock to
                // two holders.
                // A renewal handled after the lease ran out (it arrived in time) must
                // not hand a lock back that another session took meanwhile.
                let now = Instant::now();
                let lock_taken = self.sessions.get(&id).is_some_and(|s| {
                    s.expires <= now
                        && !s.lock.is_empty()
                        && self
                            .sessions
                            .iter()
                            .any(|(other, o)| other != &id && o.lock == s.lock && o.expires > now)
                });
                let res = match self.sessions.get_mut(&id) {
                    Some(s) if s.expires > at && !lock_taken => {
                        s.expires = Instant::now() + s.ttl;
                        Ok(session_pb(&id, s))
                    }
                    _ => Err(AgentError::SessionNotFound(id)),
                };
                let _ = reply.send(res);
            }
            Command::CloseSession {
                id,
                keep_faults,
                reply,
            } => {
                if self.sessions.remove(&id).is_none() {
                    let _ = reply.send(Err(AgentError::SessionNotFound(id)));
                    return;
                }
                self.metrics.set_sessions(self.sessions.len() as i64);
                let ids: Vec<String> = self
                    .faults
                    .values()
                    .filter(|f| f.session.as_deref() == Some(id.as_str()) && f.is_open())
                    .map(|f| f.id.clone())
                    .collect();
                tracing::info!(session = %id, faults = ids.len(), keep_faults, "session closed");
                if keep_faults {
                    for fid in &ids {
                        if let Some(f) = self.faults.get_mut(fid) {
                            f.session = None;
                        }
                    }
                    let _ = reply.send(Ok(vec![]));
                    return;
                }
                let mut rxs = Vec::new();
                for fid in &ids {
                    if let Some(f) = self.faults.get_mut(fid) {
                        let (tx, rx) = oneshot::channel();
                        f.revert_waiters.push(tx);
                        rxs.push(rx);
                    }
                    self.request_revert(fid, "session-closed");
                }
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    for rx in rxs {
                        if let Ok(f) = rx.await {
                            out.push(f);
                        }
                    }
                    let _ = reply.send(Ok(out));
                });
            }
            Command::Counts { reply } => {
                let active = self.faults.values().filter(|f| f.is_open()).count() as u32;
                let _ = reply.send((active, self.sessions.len() as u32));
            }
            Command::Shutdown { reply } => {
                self.shutting_down = true;
                self.watches_stop.cancel();
                self.shutdown_waiters.push(reply);
                self.revert_all("shutdown");
            }
        }
    }

    /// Registers a revert waiter on every open fault and requests its revert.
    fn revert_all(&mut self, reason: &'static str) -> Vec<oneshot::Receiver<pb::Fault>> {
        let ids: Vec<String> = self
            .faults
            .values()
            .filter(|f| f.is_open())
            .map(|f| f.id.clone())
            .collect();
        if !ids.is_empty() {
            tracing::warn!(reason, faults = ids.len(), "reverting every fault");
        }
        let mut rxs = Vec::new();
        for id in ids {
            if let Some(f) = self.faults.get_mut(&id) {
                let (tx, rx) = oneshot::channel();
                f.revert_waiters.push(tx);
                rxs.push(rx);
            }
            self.request_revert(&id, reason);
        }
        rxs
    }

    #[allow(clippy::too_many_arguments)]
    fn blank_fault(
        &self,
        id: String,
        kind: &'static str,
        spec: FaultSpec,
        spec_json: String,
        session: Option<String>,
        target: String,
        plan: serde_json::Value,
    ) -> Fault {
        Fault {
            id,
            kind,
            spec,
            spec_json,
            session,
            phase: Phase::Injecting,
            target,
            plan,
            applied: false,
            details: Arc::new(Mutex::new(serde_json::Value::Null)),
            background: None,
            observations: Vec::new(),
            cancel: CancellationToken::new(),
            started: Instant::now(),
            revert_started: None,
            created_mono: mono_ns(),
            created_unix: unix_ms(),
            verified_mono: 0,
            verified_unix: 0,
            ended_mono: 0,
            ended_unix: 0,
            expires: None,
            error: String::new(),
            leftover: String::new(),
            end_reason: String::new(),
            revert_after_apply: None,
            inject_failed: false,
            inject_waiters: Vec::new(),
            revert_waiters: Vec::new(),
        }
    }

    /// The cheap checks, then the plan on the blocking pool (it scans /proc and asks
    /// NVML): the manager goes on serving meanwhile.
    #[allow(clippy::type_complexity)]
    fn start_inject(
        &mut self,
        spec: FaultSpec,
        session: Option<String>,
        reply: Reply<Result<pb::Fault, AgentError>>,
    ) -> Result<(), Box<(AgentError, Reply<Result<pb::Fault, AgentError>>)>> {
        let refuse = |e: AgentError, reply| Err(Box::new((e, reply)));
        if self.shutting_down {
            return refuse(AgentError::ShuttingDown, reply);
        }
        if let Err(e) = spec.validate() {
            return refuse(AgentError::InvalidSpec(e), reply);
        }
        let kind = spec.kind();
        let Some(driver) = self.drivers.get(kind).cloned() else {
            return refuse(
                AgentError::Unsupported(format!(
                    "fault kind {kind} is not available in this agent"
                )),
                reply,
            );
        };
        if !self.policy.kind_enabled(kind) {
            return refuse(
                AgentError::Refused(format!(
                    "fault kind {kind} is disabled on this node (enabled_kinds in the agent's policy)"
                )),
                reply,
            );
        }
        if let Err(e) = self.policy.check_duration(spec.duration()) {
            return refuse(AgentError::Refused(e), reply);
        }
        if let Some(s) = &session
            && !self.sessions.contains_key(s)
        {
            return refuse(AgentError::SessionNotFound(s.clone()), reply);
        }
        let tx = self.internal_tx.clone();
        let plan = move || {
            let cap = driver.capability();
            let result = if cap.supported {
                driver.plan(&spec)
            } else {
                Err(AgentError::Unsupported(format!(
                    "{kind} faults are not supported on this node: {}",
                    cap.reason
                )))
            };
            let _ = tx.send(Internal::Planned {
                spec: Box::new(spec),
                session,
                result,
                reply,
            });
        };
        if self.plan_inline {
            plan();
        } else {
            tokio::task::spawn_blocking(plan);
        }
        Ok(())
    }

    /// A plan is ready: journal the intent, register the fault, and apply it once
    /// the intent is on disk (invariant 1: journal before effect).
    fn planned(
        &mut self,
        spec: FaultSpec,
        session: Option<String>,
        plan: Plan,
        reply: Reply<Result<pb::Fault, AgentError>>,
    ) {
        // The world may have moved while the plan was made.
        if self.shutting_down {
            let _ = reply.send(Err(AgentError::ShuttingDown));
            return;
        }
        if let Some(s) = &session
            && !self.sessions.contains_key(s)
        {
            let _ = reply.send(Err(AgentError::SessionNotFound(s.clone())));
            return;
        }
        let kind = spec.kind();
        let Some(driver) = self.drivers.get(kind).cloned() else {
            let _ = reply.send(Err(AgentError::Internal(format!("no driver for {kind}"))));
            return;
        };
        let id = new_id("f");
        let spec_json = spec.to_json();
        let durable = self.journal.append(Record::Intent {
            id: id.clone(),
            kind: kind.to_string(),
            spec_json: spec_json.clone(),
            session: session.clone(),
            target: plan.target.clone(),
            plan: plan.revert.clone(),
            unix_ms: unix_ms(),
        });
        let mut f = self.blank_fault(
            id.clone(),
            kind,
            spec.clone(),
            spec_json,
            session,
            plan.target.clone(),
            plan.revert.clone(),
        );
        f.inject_waiters.push(reply);
        let ctx = ApplyCtx {
            id: id.clone(),
            spec,
            plan: plan.revert,
            cancel: f.cancel.clone(),
        };
        tracing::info!(fault.id = %id, fault.kind = kind, target = %f.target, "injecting");
        self.faults.insert(id.clone(), f);
        self.update_active_gauge(kind);
        self.emit_fault(&id);
        let tx = self.internal_tx.clone();
        let span = tracing::info_span!("fault", fault.id = %id, fault.kind = kind);
        tokio::spawn(
            async move {
                match durable.await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        let _ = tx.send(Internal::IntentFailed { id, error });
                        return;
                    }
                    Err(_) => {
                        let _ = tx.send(Internal::IntentFailed {
                            id,
                            error: "the journal thread is gone".into(),
                        });
                        return;
                    }
                }
                failpoint::hit("after-intent");
                // Reverted (revert, lease, halt) while the intent was being written: no
                // effect starts; the revert that follows is idempotent.
                let result = if ctx.cancel.is_cancelled() {
                    Err("stopped before it was applied".to_string())
                } else {
                    driver.apply(ctx).await
                };
                let _ = tx.send(Internal::Applied { id, result });
            }
            .instrument(span),
        );
    }

    fn handle_internal(&mut self, ev: Internal) {
        match ev {
            Internal::Planned {
                spec,
                session,
                result,
                reply,
            } => match result {
                Ok(plan) => self.planned(*spec, session, plan, reply),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Internal::IntentFailed { id, error } => {
                let Some(mut f) = self.faults.remove(&id) else {
                    return;
                };
                tracing::error!(fault.id = %id, error = %error, "the intent could not be journaled: nothing was applied");
                let msg = format!(
                    "cannot write the journal {}: {error}; nothing was applied",
                    self.journal.path().display()
                );
                for w in f.inject_waiters.drain(..) {
                    let _ = w.send(Err(AgentError::Internal(msg.clone())));
                }
                f.phase = Phase::Failed;
                f.error = msg;
                let snapshot = f.to_pb();
                f.notify_waiters(&snapshot);
                self.update_active_gauge(f.kind);
                self.emit(pb::fault_event::Event::Fault(snapshot));
            }
            Internal::Applied { id, result } => {
                let Some(f) = self.faults.get_mut(&id) else {
                    return;
                };
                match result {
                    Ok(applied) => {
                        f.details = applied.details;
                        f.background = applied.background;
                        if let Some(mut rx) = applied.observations {
                            let tx = self.internal_tx.clone();
                            let stop = self.watches_stop.clone();
                            let id = id.clone();
                            tokio::spawn(async move {
                                loop {
                                    tokio::select! {
                                        _ = stop.cancelled() => return,
                                        o = rx.recv() => match o {
                                            Some(observation) => {
                                                let id = id.clone();
                                                if tx.send(Internal::Observed { id, observation }).is_err() {
                                                    return;
                                                }
                                            }
                                            None => return,
                                        },
                                    }
                                }
                            });
                        }
                        f.applied = true;
                        self.journal.append_later(Record::Applied {
                            id: id.clone(),
                            unix_ms: unix_ms(),
                        });
                        failpoint::hit("after-applied");
                        let Some(f) = self.faults.get_mut(&id) else {
                            return;
                        };
                        f.phase = Phase::Active;
                        f.verified_mono = mono_ns();
                        f.verified_unix = unix_ms();
                        // Invariant 2: the duration counts from verification.
                        f.expires = Some(Instant::now() + f.spec.duration());
                        let elapsed = f.started.elapsed().as_secs_f64();
                        self.metrics.injected(f.kind, elapsed);
                        tracing::info!(fault.id = %id, fault.kind = f.kind, target = %f.target,
                            inject_ms = elapsed * 1000.0, "active (verified)");
                        let snapshot = f.to_pb();
                        for w in f.inject_waiters.drain(..) {
                            let _ = w.send(Ok(snapshot.clone()));
                        }
                        let pending = f.revert_after_apply;
                        self.emit_fault(&id);
                        if let Some(reason) = pending {
                            self.begin_revert(&id, reason);
                        }
                    }
                    Err(msg) => {
                        if let Some(reason) = f.revert_after_apply {
                            // Stopped on purpose (revert, lease, halt) before it was verified.
                            tracing::info!(fault.id = %id, reason, detail = %msg, "inject stopped before verification: reverting");
                            self.begin_revert(&id, reason);
                        } else {
                            tracing::warn!(fault.id = %id, fault.kind = f.kind, error = %msg, "inject failed: reverting what was done");
                            self.metrics.failed(f.kind, "inject");
                            f.error = msg;
                            f.inject_failed = true;
                            self.begin_revert(&id, "failed");
                        }
                    }
                }
            }
            Internal::Observed { id, observation } => self.observed(id, observation),
            Internal::Reverted { id, result } => {
                let Some(f) = self.faults.get_mut(&id) else {
                    return;
                };
                f.ended_mono = mono_ns();
                f.ended_unix = unix_ms();
                let kind = f.kind;
                match result {
                    Ok(()) => {
                        // Whoever waits for this revert hears of it once the journal
                        // says so on disk (a restart then has nothing to redo).
                        let durable = self.journal.append(Record::Reverted {
                            id: id.clone(),
                            reason: f.end_reason.clone(),
                            unix_ms: unix_ms(),
                        });
                        let Some(mut f) = self.faults.remove(&id) else {
                            return;
                        };
                        f.phase = if f.inject_failed {
                            Phase::Failed
                        } else {
                            Phase::Reverted
                        };
                        f.leftover.clear();
                        let secs = f
                            .revert_started
                            .map(|s| s.elapsed().as_secs_f64())
                            .unwrap_or(0.0);
                        self.metrics.reverted(kind, &f.end_reason, secs);
                        tracing::info!(fault.id = %id, fault.kind = kind, reason = %f.end_reason, "reverted");
                        let snapshot = f.to_pb();
                        let mut waiting = std::mem::take(&mut f.inject_waiters)
                            .into_iter()
                            .map(Waiter::Inject)
                            .collect::<Vec<_>>();
                        waiting.extend(f.revert_waiters.drain(..).map(Waiter::Revert));
                        let answer = snapshot.clone();
                        tokio::spawn(async move {
                            if let Ok(Err(e)) = durable.await {
                                tracing::error!(error = %e, "journal append (reverted) failed; start-up will revert again (idempotent)");
                            }
                            for w in waiting {
                                w.send(&answer);
                            }
                        });
                        self.remember(snapshot.clone());
                        self.emit(pb::fault_event::Event::Fault(snapshot));
                        if self.journal.needs_compaction() {
                            self.journal.compact_if_large(self.open_entries());
                        }
                    }
                    Err(e) => {
                        tracing::error!(fault.id = %id, fault.kind = kind, error = %e.message, leftover = %e.leftover,
                            "REVERT FAILED: something may be left behind");
                        self.metrics.failed(kind, "revert");
                        f.phase = Phase::Failed;
                        f.error = if f.error.is_empty() {
                            format!("revert failed: {}", e.message)
                        } else {
                            format!("{}; revert failed: {}", f.error, e.message)
                        };
                        f.leftover = e.leftover;
                        let snapshot = f.to_pb();
                        f.notify_waiters(&snapshot);
                        self.emit(pb::fault_event::Event::Fault(snapshot));
                    }
                }
                self.update_active_gauge(kind);
            }
        }
    }

    fn observed(&mut self, id: String, observation: pb::Observation) {
        tracing::info!(fault.id = %id, kind = %observation.kind, pid = observation.pid,
            detail = %observation.detail, "observed");
        if let Some(f) = self.faults.get_mut(&id) {
            f.observations.push(observation);
            self.emit_fault(&id);
        } else if let Some(f) = self.history.iter_mut().find(|f| f.id == id) {
            // Ended already (a kill ends long before its replacement is ready).
            f.observations.push(observation);
            let snapshot = f.clone();
            self.emit(pb::fault_event::Event::Fault(snapshot));
        }
    }

    /// Asks for a fault to be reverted, whatever it is doing. Safe to call repeatedly.
    fn request_revert(&mut self, id: &str, reason: &'static str) {
        let Some(f) = self.faults.get_mut(id) else {
            return;
        };
        match f.phase {
            Phase::Injecting => {
                // The apply task owns the effect until it returns: stop it early where
                // it can stop (a terminate grace period), then revert once it reports.
                if f.revert_after_apply.is_none() {
                    f.revert_after_apply = Some(reason);
                    f.cancel.cancel();
                    tracing::info!(fault.id = %id, reason, "revert requested while injecting: will revert once apply returns");
                }
            }
            Phase::Reverting | Phase::Reverted => {}
            Phase::Failed if f.leftover.is_empty() => {}
            Phase::Active | Phase::Failed => self.begin_revert(id, reason),
        }
    }

    /// Starts the revert task. The caller has decided it is time.
    fn begin_revert(&mut self, id: &str, reason: &'static str) {
        let Some(f) = self.faults.get_mut(id) else {
            return;
        };
        f.phase = Phase::Reverting;
        f.end_reason = if f.inject_failed {
            "failed".into()
        } else {
            reason.into()
        };
        f.revert_started = Some(Instant::now());
        f.cancel.cancel();
        let background = f.background.take();
        let plan = f.plan.clone();
        let Some(driver) = self.drivers.get(f.kind).cloned() else {
            return;
        };
        let tx = self.internal_tx.clone();
        let id_owned = id.to_string();
        tracing::info!(fault.id = %id, reason, "reverting");
        let span = tracing::info_span!("fault", fault.id = %id, fault.kind = f.kind);
        tokio::spawn(async move {
            if let Some(mut bg) = background
                && tokio::time::timeout(BACKGROUND_STOP, &mut bg)
                    .await
                    .is_err()
            {
                tracing::warn!(fault.id = %id_owned, "background task did not stop in time: aborting it");
                bg.abort();
            }
            let result = driver.revert(plan).await;
            let _ = tx.send(Internal::Reverted {
                id: id_owned,
                result,
            });
        }.instrument(span));
        self.emit_fault(id);
    }

    fn open_entries(&self) -> Vec<OpenEntry> {
        self.faults
            .values()
            .filter(|f| f.is_open())
            .map(|f| OpenEntry {
                intent: Record::Intent {
                    id: f.id.clone(),
                    kind: f.kind.to_string(),
                    spec_json: f.spec_json.clone(),
                    session: f.session.clone(),
                    target: f.target.clone(),
                    plan: f.plan.clone(),
                    unix_ms: f.created_unix,
                },
                applied: f.applied,
            })
            .collect()
    }

    fn remember(&mut self, f: pb::Fault) {
        self.history.push_front(f);
        self.history.truncate(HISTORY);
    }

    fn update_active_gauge(&self, kind: &str) {
        let n = self
            .faults
            .values()
            .filter(|f| f.kind == kind && f.is_open())
            .count();
        self.metrics.set_active(kind, n as i64);
    }

    fn emit_fault(&self, id: &str) {
        if let Some(f) = self.faults.get(id) {
            self.emit(pb::fault_event::Event::Fault(f.to_pb()));
        }
    }

    fn emit(&self, ev: pb::fault_event::Event) {
        let _ = self.events.send(pb::FaultEvent {
            mono_ns: mono_ns(),
            unix_ms: unix_ms(),
            event: Some(ev),
        });
    }
}

fn session_pb(id: &str, s: &Session) -> pb::Session {
    pb::Session {
        id: id.to_string(),
        lease_ttl_ms: s.ttl.as_millis() as u64,
        expires_mono_ns: mono_ns()
            + s.expires
                .saturating_duration_since(Instant::now())
                .as_nanos() as u64,
        holder: s.holder.clone(),
        lock: s.lock.clone(),
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86400 * 365)
}

/// The registered name of a kind read from the journal ("unknown" for any other
/// text), so that metric labels stay a closed set.
fn registered_kind(kind: &str) -> &'static str {
    gpuchaos_proto::spec::KINDS
        .iter()
        .find(|k| **k == kind)
        .copied()
        .unwrap_or("unknown")
}

#[cfg(test)]
mod tests;

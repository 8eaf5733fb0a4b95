//! `gpuchaos run`: executes an experiment against agents while probes watch.
//!
//! 1. [`preflight`]: plan every trial, build the probes, evaluate the Prometheus
//!    safety nets once, connect to every agent (clock offset, capabilities) and
//!    open a session (lease) on each; any problem ends the run before anything is
//!    injected.
//! 2. Keep the leases renewed ([`agents::renew_loop`]), start every probe on its own
//!    schedule ([`probes`]); wait for the steady state (or abort without injecting)
//!    and arm the stop conditions ([`stop`]).
//! 3. [`trial`]: per trial, run the method's steps ([`steps`]), observe until the
//!    RTO probes recover (or their limits pass), check the steady state again,
//!    evaluate the objectives ([`evaluate`]).
//! 4. [`finish`]: always roll back (revert what is still active and close the
//!    sessions, whatever ended the run: success, failed objective, stop condition,
//!    Ctrl-C, SIGTERM; if this process dies instead, the agents revert when the
//!    lease lapses), decide the verdict, write the journal and the reports; the exit
//!    code says what happened.

pub mod agents;
pub mod evaluate;
mod finish;
pub mod phases;
mod preflight;
pub mod probes;
pub mod record;
pub mod shared;
mod steps;
mod stop;
mod trial;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpuchaos_proto::pb;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::exit::{self, CliError};
use crate::experiment::ValidExperiment;
use crate::experiment::load::Loaded;
use crate::fleet::Fleet;
use agents::Conn;
use record::*;
use shared::{Clock, Shared};

pub struct RunOptions {
    pub file: String,
    pub report_dir: Option<PathBuf>,
    /// Agents and TLS from the command line (used when the experiment names none).
    pub cli_fleet: Fleet,
    /// Cancelled on SIGINT/SIGTERM; the reason is recorded.
    pub interrupt: CancellationToken,
    pub interrupt_reason: Arc<Mutex<String>>,
    pub run_seed: Option<u64>,
}

/// Why the run stopped early.
#[derive(Debug, Clone)]
enum Abort {
    /// A stop condition fired: the service is in danger, so every agent reverts
    /// every fault it holds (`halt`), this run's or not.
    StopCondition(String),
    /// Interrupted, a lease lapsed, the steady state was never established, or a
    /// stop condition could not be evaluated: this run's faults are reverted.
    Aborted(String),
    /// A fault could not be injected or verified; `code` is the exit code.
    InjectFailed { code: u8, reason: String },
    /// The run could not go on (a stop condition could not be set up).
    Error { code: u8, reason: String },
}

impl Abort {
    fn code(&self) -> u8 {
        match self {
            Abort::StopCondition(_) | Abort::Aborted(_) => exit::ABORTED,
            Abort::InjectFailed { code, .. } | Abort::Error { code, .. } => *code,
        }
    }

    fn verdict(&self) -> Verdict {
        match self {
            Abort::StopCondition(_) | Abort::Aborted(_) => Verdict::Aborted,
            Abort::InjectFailed { .. } => Verdict::InjectFailed,
            Abort::Error { .. } => Verdict::Error,
        }
    }

    fn halts_all(&self) -> bool {
        matches!(self, Abort::StopCondition(_))
    }

    fn into_reason(self) -> String {
        match self {
            Abort::StopCondition(r) | Abort::Aborted(r) => r,
            Abort::InjectFailed { reason, .. } | Abort::Error { reason, .. } => reason,
        }
    }
}

/// The agents an experiment runs against: its own, or the command line's.
pub fn fleet_for(loaded: &Loaded, cli: &Fleet) -> Fleet {
    if loaded.agents.is_empty() {
        let mut f = cli.clone();
        if loaded.tls.is_some() {
            f.tls = loaded.tls.clone();
        }
        f
    } else {
        Fleet {
            agents: loaded.agents.clone(),
            tls: loaded.tls.clone().or_else(|| cli.tls.clone()),
            timeout: cli.timeout,
        }
    }
}

/// A fault injected by this run, as the runner tracks it.
struct Injected {
    trial: u32,
    conn: usize,
    fault: pb::Fault,
    rec: FaultRecord,
    /// How long the agent lets a replacement's GPU memory settle before it reports
    /// `gpu_ready` (process faults that watch; zero otherwise).
    settle: Duration,
    /// The effect is instant (a kill, a terminate): it cannot be masked while it
    /// lasts, since nothing of it lasts.
    instant: bool,
    /// The agent watches for a replacement from the fault's end (crash-loop).
    watch_from_end: bool,
}

/// A run past its preflight: the agents with their sessions, and what it did so far.
struct Runner {
    shared: Arc<Shared>,
    exp: ValidExperiment,
    conns: Vec<Conn>,
    injected: Mutex<Vec<Injected>>,
    /// Each trial as far as it got (start, method end): an abort cancels the trial
    /// body, and its record must still say when it ran.
    started: Mutex<Vec<TrialRecord>>,
    /// The trials that got to their end (or to the step that failed them).
    done: Mutex<Vec<TrialRecord>>,
    abort: CancellationToken,
    abort_reason: Mutex<Option<Abort>>,
}

impl Runner {
    fn stop_condition_fired(&self, name: &str) {
        let reason = format!("stop condition: {name}");
        self.shared
            .event(EventKind::StopCondition, 0, reason.clone());
        self.abort_with(Abort::StopCondition(reason));
    }

    fn abort_with(&self, a: Abort) {
        let mut r = self.abort_reason.lock().unwrap();
        if r.is_none() {
            *r = Some(a);
        }
        self.abort.cancel();
    }

    /// The anchor fault of an RTO objective in a trial: the named step's first fault,
    /// or the trial's first fault.
    fn anchor_fault(&self, trial: u32, step: Option<&str>) -> Option<FaultRecord> {
        let inj = self.injected.lock().unwrap();
        inj.iter()
            .filter(|i| i.trial == trial && step.is_none_or(|s| i.rec.step == s))
            .filter_map(|i| i.rec.inject_ns.map(|t| (t, i.rec.clone())))
            .min_by_key(|(t, _)| *t)
            .map(|(_, r)| r)
    }
}

/// Runs an experiment. Returns the journal (already written when a report directory
/// was given) and the exit code.
pub async fn run(loaded: &Loaded, opts: &RunOptions) -> Result<(RunRecord, u8), CliError> {
    let exp = loaded.experiment.clone();
    let fleet = fleet_for(loaded, &opts.cli_fleet);
    let run_seed = opts.run_seed.unwrap_or_else(rand::random);
    let prepared = preflight::prepare(loaded, &fleet, run_seed)?;
    let clock = Clock::start();
    let shared = Arc::new(Shared::new(clock, prepared.probe_records.clone()));
    shared.live.lock().unwrap().trials = exp.trials;
    shared.event(
        EventKind::RunStart,
        0,
        format!(
            "experiment {}: {} agent(s), {} probe(s), {} trial(s), run seed {run_seed}",
            exp.metadata.name,
            fleet.agents.len(),
            exp.probes.len(),
            exp.trials
        ),
    );
    let mut record = RunRecord {
        format: FORMAT,
        experiment: exp.metadata.name.clone(),
        description: exp.metadata.description.clone(),
        file: opts.file.clone(),
        gpuchaos_version: gpuchaos_proto::VERSION.to_string(),
        started_unix_ms: gpuchaos_proto::clock::unix_ms(),
        run_seed,
        probes: prepared.probe_records,
        ..Default::default()
    };
    let Some(conns) = preflight::gate(&exp, &fleet, &prepared.plans, &shared, &mut record).await
    else {
        return finish::write(record, &shared, opts);
    };

    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let lease_lost = CancellationToken::new();
    agents::renew_loop(
        shared.clone(),
        conns.iter().map(Conn::lease).collect(),
        exp.lease,
        stop.clone(),
        lease_lost.clone(),
        &tracker,
    );
    probes::start(
        &shared,
        prepared.probers,
        exp.probes.iter().map(|p| (p.interval, p.timeout)).collect(),
        &stop,
        &tracker,
    );
    if shared.tty {
        let s = shared.clone();
        let stop = stop.clone();
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => s.draw_status(),
                }
            }
        });
    }
    let runner = Arc::new(Runner {
        shared: shared.clone(),
        exp,
        conns,
        injected: Mutex::new(Vec::new()),
        started: Mutex::new(Vec::new()),
        done: Mutex::new(Vec::new()),
        abort: CancellationToken::new(),
        abort_reason: Mutex::new(None),
    });
    watch_interrupts(&runner, opts, &lease_lost, &stop, &tracker);
    let early = tokio::select! {
        r = runner.clone().trials(&prepared.plans, &stop, &tracker) => r,
        _ = runner.abort.cancelled() => None,
    };
    finish::conclude(&runner, record, early, &stop, &tracker, opts).await
}

/// Interrupts and lost leases abort the run like a stop condition does (without
/// halting other sessions' faults).
fn watch_interrupts(
    runner: &Arc<Runner>,
    opts: &RunOptions,
    lease_lost: &CancellationToken,
    stop: &CancellationToken,
    tracker: &TaskTracker,
) {
    let r = runner.clone();
    let interrupt = opts.interrupt.clone();
    let why = opts.interrupt_reason.clone();
    let lost = lease_lost.clone();
    let stop = stop.clone();
    tracker.spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = interrupt.cancelled() => {
                let reason = format!("interrupted by {}", why.lock().unwrap());
                r.shared.event(EventKind::Abort, 0, reason.clone());
                r.abort_with(Abort::Aborted(reason));
            }
            _ = lost.cancelled() => r.abort_with(Abort::Aborted(
                "a session lease lapsed on an agent, which reverted this run's faults: the measurements would be wrong".into(),
            )),
        }
    });
}

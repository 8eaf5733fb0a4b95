//! The run's agents: connection, clock offset, the session lease and its renewal
//! (shared with the game days' locks and `inject --attach`), injection, waiting for
//! a fault's end, and revert.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use gpuchaos_proto::pb::{self, agent_client::AgentClient};
use gpuchaos_proto::spec::FaultSpec;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::record::{AgentRecord, EventKind};
use super::shared::{Clock, Shared};
use crate::fleet::{AgentRef, Fleet, describe_status};

pub struct Conn {
    pub agent: AgentRef,
    pub client: AgentClient<Channel>,
    pub info: pb::AgentInfo,
    pub offset_ns: i64,
    pub offset_error_ns: u64,
    pub session: String,
}

impl Conn {
    pub fn record(&self) -> AgentRecord {
        AgentRecord {
            name: if self.agent.name.is_empty() {
                self.agent.address.clone()
            } else {
                self.agent.name.clone()
            },
            address: self.agent.address.clone(),
            hostname: self.info.hostname.clone(),
            offset_ns: self.offset_ns,
            offset_error_ns: self.offset_error_ns,
            session_id: self.session.clone(),
        }
    }

    pub fn map(&self, clock: &Clock, agent_mono_ns: u64) -> Option<u64> {
        (agent_mono_ns > 0).then(|| clock.map_agent(agent_mono_ns, self.offset_ns))
    }

    /// The run's session on this agent, to renew.
    pub fn lease(&self) -> Session {
        (
            self.agent.clone(),
            self.client.clone(),
            self.session.clone(),
        )
    }

    pub fn capability(&self, kind: &str) -> Option<&pb::Capability> {
        self.info.capabilities.iter().find(|c| c.kind == kind)
    }
}

/// Connects and measures the clock offset: the best (shortest round trip) of five
/// GetInfo calls; offset = agent clock − controller clock at the round trip's middle,
/// error = half the round trip.
pub async fn connect(fleet: &Fleet, agent: &AgentRef, clock: &Clock) -> Result<Conn, String> {
    let mut client = fleet.client(agent).map_err(|e| e.message)?;
    let mut best: Option<(u64, i64, pb::AgentInfo)> = None;
    for _ in 0..5 {
        let t0 = clock.now_ns();
        let info = client
            .get_info(pb::GetInfoRequest {})
            .await
            .map_err(|s| describe_status(agent, &s))?
            .into_inner();
        let t1 = clock.now_ns();
        let rtt = t1 - t0;
        let mid = clock.mono_at(t0 + rtt / 2);
        let offset = info.agent_mono_ns as i64 - mid as i64;
        if best.as_ref().is_none_or(|(r, _, _)| rtt < *r) {
            best = Some((rtt, offset, info));
        }
    }
    let (rtt, offset, info) = best.expect("five measurements");
    Ok(Conn {
        agent: agent.clone(),
        client,
        info,
        offset_ns: offset,
        offset_error_ns: rtt / 2,
        session: String::new(),
    })
}

pub async fn open_session(c: &mut Conn, lease: Duration, holder: &str) -> Result<(), String> {
    let s = c
        .client
        .open_session(pb::OpenSessionRequest {
            lease_ttl_ms: lease.as_millis() as u64,
            holder: holder.to_string(),
            lock: String::new(),
        })
        .await
        .map_err(|s| describe_status(&c.agent, &s))?
        .into_inner();
    c.session = s.id;
    Ok(())
}

/// A session to keep alive: the agent, a client to it, and the session's id.
pub type Session = (AgentRef, AgentClient<Channel>, String);

/// What one renewal of a session found.
#[derive(Debug)]
pub enum Renewal {
    Renewed,
    /// The agent no longer knows the session: its lease lapsed, and the agent
    /// reverted its faults (and gave up its lock).
    Lapsed(tonic::Status),
    Failed(tonic::Status),
    /// No answer within the time given.
    TimedOut,
}

/// Renews every session once, all at once (one slow agent delays no other), each
/// bounded by `within`. The outcomes are in the order of `sessions`. `run`, the
/// game days' locks and `inject --attach` all renew through this.
pub async fn renew_all(sessions: &[Session], within: Duration) -> Vec<Renewal> {
    let renewals = sessions.iter().map(|(_, client, id)| {
        let mut client = client.clone();
        let session_id = id.clone();
        async move {
            match tokio::time::timeout(
                within,
                client.renew_session(pb::RenewSessionRequest { session_id }),
            )
            .await
            {
                Ok(Ok(_)) => Renewal::Renewed,
                Ok(Err(s)) if s.code() == tonic::Code::NotFound => Renewal::Lapsed(s),
                Ok(Err(s)) => Renewal::Failed(s),
                Err(_) => Renewal::TimedOut,
            }
        }
    });
    futures_util::future::join_all(renewals).await
}

/// Renews the sessions every `every` (each renewal bounded by `every`) until `stop`
/// or until `report`, told each outcome but a success, breaks. A session that
/// lapsed is not renewed again.
pub async fn keep_renewed(
    mut sessions: Vec<Session>,
    every: Duration,
    stop: CancellationToken,
    mut report: impl FnMut(&AgentRef, Renewal) -> ControlFlow<()>,
) {
    while !sessions.is_empty() {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let outcomes = renew_all(&sessions, every).await;
        let mut lapsed = Vec::new();
        for (k, ((agent, _, _), r)) in sessions.iter().zip(outcomes).enumerate() {
            if matches!(r, Renewal::Renewed) {
                continue;
            }
            if matches!(r, Renewal::Lapsed(_)) {
                lapsed.push(k);
            }
            if report(agent, r).is_break() {
                return;
            }
        }
        for k in lapsed.into_iter().rev() {
            sessions.remove(k);
        }
    }
}

/// Renews every session of a run a third of the lease apart until `stop`. A
/// session the agent no longer knows (the lease lapsed: its faults were reverted)
/// cancels `lost`.
pub fn renew_loop(
    shared: Arc<Shared>,
    sessions: Vec<Session>,
    lease: Duration,
    stop: CancellationToken,
    lost: CancellationToken,
    tracker: &tokio_util::task::TaskTracker,
) {
    tracker.spawn(keep_renewed(sessions, lease / 3, stop, move |agent, r| {
        match r {
            Renewal::Renewed => {}
            Renewal::Lapsed(s) => {
                shared.event(
                    EventKind::Abort,
                    0,
                    format!(
                        "the lease on agent {} lapsed (the agent reverted this run's faults): {}",
                        agent.display(),
                        s.message()
                    ),
                );
                lost.cancel();
            }
            Renewal::Failed(s) => shared.event(
                EventKind::Warning,
                0,
                format!("lease renewal failed: {}", describe_status(agent, &s)),
            ),
            Renewal::TimedOut => shared.event(
                EventKind::Warning,
                0,
                format!(
                    "lease renewal on agent {} timed out; retrying",
                    agent.display()
                ),
            ),
        }
        ControlFlow::Continue(())
    }));
}

pub async fn inject(c: &Conn, spec: &FaultSpec) -> Result<pb::Fault, tonic::Status> {
    let mut client = c.client.clone();
    client
        .inject(pb::InjectRequest {
            spec_json: spec.to_json(),
            session_id: c.session.clone(),
        })
        .await
        .map(|r| r.into_inner())
}

fn ended(f: &pb::Fault) -> bool {
    matches!(f.state(), pb::FaultState::Reverted | pb::FaultState::Failed)
}

/// Waits until the agent reports the fault ended (its duration ran out, or it was
/// reverted), sleeping until the expected end first. Returns the final record.
pub async fn wait_end(c: &Conn, clock: &Clock, f: &pb::Fault) -> Result<pb::Fault, String> {
    if let Some(exp) = c.map(clock, f.expires_mono_ns) {
        tokio::time::sleep_until(clock.instant_at(exp).into()).await;
    }
    let mut client = c.client.clone();
    let mut misses = 0;
    loop {
        match client
            .list_faults(pb::ListFaultsRequest {
                include_finished: true,
            })
            .await
        {
            Ok(r) => {
                match r.into_inner().faults.into_iter().find(|x| x.id == f.id) {
                    Some(x) if ended(&x) => return Ok(x),
                    Some(_) => {}
                    None => {
                        return Err(format!(
                            "agent {} no longer knows fault {}",
                            c.agent.display(),
                            f.id
                        ));
                    }
                }
                misses = 0;
            }
            Err(s) => {
                misses += 1;
                if misses > 50 {
                    return Err(describe_status(&c.agent, &s));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reverts one fault; an already-ended fault is fine (idempotent).
pub async fn revert(c: &Conn, id: &str) -> Result<pb::Fault, String> {
    let mut client = c.client.clone();
    match client
        .revert(pb::RevertRequest {
            fault_id: id.to_string(),
        })
        .await
    {
        Ok(r) => Ok(r.into_inner()),
        Err(s) => Err(describe_status(&c.agent, &s)),
    }
}

/// Closes the session, reverting whatever of it is still active.
pub async fn close(c: &Conn) -> Result<Vec<pb::Fault>, String> {
    if c.session.is_empty() {
        return Ok(Vec::new());
    }
    let mut client = c.client.clone();
    match client
        .close_session(pb::CloseSessionRequest {
            session_id: c.session.clone(),
            keep_faults: false,
        })
        .await
    {
        Ok(r) => Ok(r.into_inner().reverted),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(Vec::new()),
        Err(s) => Err(describe_status(&c.agent, &s)),
    }
}

/// Reverts every fault on the agent, this run's or not (a stop condition's halt).
pub async fn halt(c: &Conn) -> Result<Vec<pb::Fault>, String> {
    let mut client = c.client.clone();
    client
        .revert_all(pb::RevertAllRequest {})
        .await
        .map(|r| r.into_inner().faults)
        .map_err(|s| describe_status(&c.agent, &s))
}

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

/// Renews one session, bounded by `within`.
pub async fn renew_one(session: &Session, within: Duration) -> Renewal {
    let (_, client, id) = session;
    let mut client = client.clone();
    let session_id = id.clone();
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

/// Renews every session once, all at once, each bounded by `within`. The outcomes
/// are in the order of `sessions`. (`inject --attach` renews through this on its
/// own ticks; `run` and the game days' locks through [`keep_renewed`].)
pub async fn renew_all(sessions: &[Session], within: Duration) -> Vec<Renewal> {
    futures_util::future::join_all(sessions.iter().map(|s| renew_one(s, within))).await
}

/// Keeps every session renewed, each on its own schedule: every `every` (each
/// renewal bounded by `every`; one that timed out is retried at once), so that a
/// slow or hung agent delays no other agent's renewals. Runs until `stop`, or until
/// `report`, told each outcome but a success, breaks. A session that lapsed is not
/// renewed again.
pub async fn keep_renewed(
    sessions: Vec<Session>,
    every: Duration,
    stop: CancellationToken,
    report: impl FnMut(&AgentRef, Renewal) -> ControlFlow<()> + Send + 'static,
) {
    let report = Arc::new(std::sync::Mutex::new(report));
    let done = stop.child_token();
    let loops = sessions.into_iter().map(|session| {
        let report = Arc::clone(&report);
        let done = done.clone();
        async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = done.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let r = renew_one(&session, every).await;
                if matches!(r, Renewal::Renewed) {
                    continue;
                }
                let lapsed = matches!(r, Renewal::Lapsed(_));
                let flow = {
                    let mut report = report.lock().unwrap_or_else(|p| p.into_inner());
                    (*report)(&session.0, r)
                };
                if flow.is_break() {
                    done.cancel();
                    return;
                }
                if lapsed {
                    return;
                }
            }
        }
    });
    futures_util::future::join_all(loops).await;
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

/// Every fault the agent knows, ended ones included (their observations too).
pub async fn list(c: &Conn) -> Result<Vec<pb::Fault>, String> {
    let mut client = c.client.clone();
    match client
        .list_faults(pb::ListFaultsRequest {
            include_finished: true,
        })
        .await
    {
        Ok(r) => Ok(r.into_inner().faults),
        Err(s) => Err(describe_status(&c.agent, &s)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use gpuchaos_proto::pb::agent_server::{Agent, AgentServer};
    use std::sync::atomic::{AtomicU32, Ordering};
    use tonic::{Request, Response, Status};

    /// An agent that counts renewals and answers them at once, or never (`hung`).
    struct Renews {
        count: Arc<AtomicU32>,
        hung: bool,
    }

    type Answer<T> = Result<Response<T>, Status>;

    #[tonic::async_trait]
    impl Agent for Renews {
        async fn get_info(&self, _: Request<pb::GetInfoRequest>) -> Answer<pb::AgentInfo> {
            Err(Status::unimplemented(""))
        }
        async fn open_session(&self, _: Request<pb::OpenSessionRequest>) -> Answer<pb::Session> {
            Err(Status::unimplemented(""))
        }
        async fn renew_session(&self, _: Request<pb::RenewSessionRequest>) -> Answer<pb::Session> {
            self.count.fetch_add(1, Ordering::SeqCst);
            if self.hung {
                std::future::pending::<()>().await;
            }
            Ok(Response::new(pb::Session::default()))
        }
        async fn close_session(
            &self,
            _: Request<pb::CloseSessionRequest>,
        ) -> Answer<pb::CloseSessionResponse> {
            Err(Status::unimplemented(""))
        }
        async fn inject(&self, _: Request<pb::InjectRequest>) -> Answer<pb::Fault> {
            Err(Status::unimplemented(""))
        }
        async fn revert(&self, _: Request<pb::RevertRequest>) -> Answer<pb::Fault> {
            Err(Status::unimplemented(""))
        }
        async fn list_faults(
            &self,
            _: Request<pb::ListFaultsRequest>,
        ) -> Answer<pb::ListFaultsResponse> {
            Err(Status::unimplemented(""))
        }
        async fn revert_all(
            &self,
            _: Request<pb::RevertAllRequest>,
        ) -> Answer<pb::RevertAllResponse> {
            Err(Status::unimplemented(""))
        }
        type WatchEventsStream = futures_util::stream::Empty<Result<pb::FaultEvent, Status>>;
        async fn watch_events(
            &self,
            _: Request<pb::WatchEventsRequest>,
        ) -> Answer<Self::WatchEventsStream> {
            Err(Status::unimplemented(""))
        }
    }

    async fn serve(hung: bool) -> (Session, Arc<AtomicU32>) {
        let count = Arc::new(AtomicU32::new(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = AgentServer::new(Renews {
            count: Arc::clone(&count),
            hung,
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let client = AgentClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let agent = AgentRef {
            name: if hung { "hung" } else { "healthy" }.into(),
            address: addr.to_string(),
            labels: Default::default(),
        };
        ((agent, client, "s-1".into()), count)
    }

    /// One agent that never answers must not slow another's renewals: each session
    /// keeps its own schedule (a round waiting for the slowest would renew the
    /// healthy agent every two intervals, and lapse its lease under a little load).
    #[tokio::test]
    async fn a_hung_agent_delays_no_other_agents_renewals() {
        let (healthy, healthy_count) = serve(false).await;
        let (hung, hung_count) = serve(true).await;
        let stop = CancellationToken::new();
        let reported = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::clone(&reported);
        let task = tokio::spawn(keep_renewed(
            vec![healthy, hung],
            Duration::from_millis(200),
            stop.clone(),
            move |agent, r| {
                seen.lock()
                    .unwrap()
                    .push((agent.name.clone(), format!("{r:?}")));
                ControlFlow::Continue(())
            },
        ));
        tokio::time::sleep(Duration::from_millis(2100)).await;
        stop.cancel();
        task.await.unwrap();
        let healthy = healthy_count.load(Ordering::SeqCst);
        // Ten intervals: ten renewals on its own schedule, five in lockstep.
        assert!(
            healthy >= 8,
            "the healthy agent was renewed {healthy} times in 2.1s"
        );
        assert!(hung_count.load(Ordering::SeqCst) >= 4);
        let reported = reported.lock().unwrap();
        assert!(
            reported.iter().all(|(a, r)| a == "hung" && r == "TimedOut"),
            "{reported:?}"
        );
    }
}

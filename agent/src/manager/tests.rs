//! One test per invariant of design.md, against a fake process table, with tokio's
//! clock paused so minutes of fault time take milliseconds.

use super::*;
use crate::faults::process::ProcessDriver;
use crate::faults::select::Selector;
use crate::policy::PolicyFile;
use crate::sys::fake::{FakeProcs, NoGpus, workers};
use gpuchaos_proto::spec::HumanDuration;

struct Rig {
    procs: Arc<FakeProcs>,
    handle: ManagerHandle,
    dir: tempfile::TempDir,
    metrics: Arc<Metrics>,
}

fn policy(f: impl FnOnce(&mut PolicyFile)) -> Arc<Policy> {
    let mut file = PolicyFile::default();
    f(&mut file);
    Arc::new(Policy::new(file).unwrap())
}

async fn rig_with(
    procs: Arc<FakeProcs>,
    policy: Arc<Policy>,
    dir: tempfile::TempDir,
) -> (Rig, Vec<pb::Fault>) {
    rig_io(procs, policy, dir, true).await
}

/// `inline`: plan and journal on the manager's task (tests on the paused clock);
/// otherwise the production paths (blocking pool, journal thread).
async fn rig_io(
    procs: Arc<FakeProcs>,
    policy: Arc<Policy>,
    dir: tempfile::TempDir,
    inline: bool,
) -> (Rig, Vec<pb::Fault>) {
    let driver = crate::faults::typed(Arc::new(ProcessDriver::new(Arc::new(Selector::new(
        procs.clone(),
        Arc::new(NoGpus),
        policy.clone(),
    )))));
    let (journal, open) = Journal::open(dir.path()).unwrap();
    let metrics = Arc::new(Metrics::new());
    let mut m = if inline {
        Manager::new_inline_io(vec![driver], policy, journal, metrics.clone())
    } else {
        Manager::new(vec![driver], policy, journal, metrics.clone())
    };
    let recovered = m.recover(open).await;
    let (handle, _task) = m.spawn();
    (
        Rig {
            procs,
            handle,
            dir,
            metrics,
        },
        recovered,
    )
}

async fn rig() -> Rig {
    rig_with(workers(), policy(|_| {}), tempfile::tempdir().unwrap())
        .await
        .0
}

fn spec(yaml: &str) -> FaultSpec {
    FaultSpec::from_yaml_multi(yaml).unwrap().remove(0)
}

impl Rig {
    async fn inject(&self, yaml: &str, session: Option<String>) -> Result<pb::Fault, AgentError> {
        let spec = spec(yaml);
        self.handle
            .call(|reply| Command::Inject {
                spec: Box::new(spec),
                session,
                reply,
            })
            .await?
    }
    async fn revert(&self, id: &str) -> Result<pb::Fault, AgentError> {
        let id = id.to_string();
        self.handle
            .call(|reply| Command::Revert { id, reply })
            .await?
    }
    async fn list(&self) -> Vec<pb::Fault> {
        self.handle
            .call(|reply| Command::List {
                include_finished: true,
                reply,
            })
            .await
            .unwrap()
    }
    async fn find(&self, id: &str) -> pb::Fault {
        self.list().await.into_iter().find(|f| f.id == id).unwrap()
    }
    fn journal_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(crate::journal::JOURNAL_FILE))
            .unwrap_or_default()
    }
}

const PAUSE_100: &str = "kind: process\nduration: 30s\ntarget: {pid: 100}\naction: pause\n";

async fn settle() {
    // Let spawned tasks run (the clock is paused; this advances it a little).
    tokio::time::sleep(Duration::from_millis(50)).await;
}

#[tokio::test(start_paused = true)]
async fn inv1_journal_before_effect() {
    let r = rig().await;
    let path = r.dir.path().join(crate::journal::JOURNAL_FILE);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    *r.procs.hook.lock().unwrap() = Some(Box::new(move |pid, sig| {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        s2.lock().unwrap().push((
            pid,
            sig,
            text.contains("\"rec\":\"intent\"") && text.contains("\"pid\":100"),
        ));
    }));
    let f = r.inject(PAUSE_100, None).await.unwrap();
    assert_eq!(f.state, pb::FaultState::Active as i32);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![(100, 19, true)],
        "SIGSTOP only after the intent was on disk"
    );
    let text = r.journal_text();
    let intent = text.find("\"rec\":\"intent\"").unwrap();
    let applied = text.find("\"rec\":\"applied\"").unwrap();
    assert!(intent < applied);
}

#[tokio::test(start_paused = true)]
async fn inv2_duration_is_enforced_by_the_agent() {
    let r = rig().await;
    let f = r
        .inject(
            "kind: process\nduration: 5s\ntarget: {pid: 100}\naction: pause\n",
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.procs.state(100), Some('T'));
    assert!(f.expires_mono_ns > f.verified_mono_ns);
    tokio::time::sleep(Duration::from_millis(4900)).await;
    assert_eq!(r.procs.state(100), Some('T'), "not before its time");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(r.procs.state(100), Some('S'));
    let f = r.find(&f.id).await;
    assert_eq!(f.state, pb::FaultState::Reverted as i32);
    assert_eq!(f.end_reason, "duration");
}

#[tokio::test(start_paused = true)]
async fn inv2_policy_caps_duration() {
    let r = rig_with(
        workers(),
        policy(|p| p.max_duration = HumanDuration(Duration::from_secs(60))),
        tempfile::tempdir().unwrap(),
    )
    .await
    .0;
    let e = r
        .inject(
            "kind: process\nduration: 2m\ntarget: {pid: 100}\naction: pause\n",
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, AgentError::Refused(_)), "{e}");
    assert!(r.procs.signals.lock().unwrap().is_empty());
    assert!(
        r.journal_text().is_empty(),
        "nothing journaled for a refused fault"
    );
}

#[tokio::test(start_paused = true)]
async fn inv3_lease_lapse_reverts_and_renewal_keeps() {
    let r = rig().await;
    let mut events = r.handle.subscribe();
    let s = r
        .handle
        .call(|reply| Command::OpenSession {
            ttl: Duration::from_secs(2),
            holder: "test".into(),
            lock: String::new(),
            reply,
        })
        .await
        .unwrap()
        .unwrap();
    let f = r.inject(PAUSE_100, Some(s.id.clone())).await.unwrap();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let id = s.id.clone();
        r.handle
            .call(|reply| Command::RenewSession {
                id,
                at: tokio::time::Instant::now(),
                reply,
            })
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(
        r.procs.state(100),
        Some('T'),
        "renewed lease keeps the fault"
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    settle().await;
    assert_eq!(r.procs.state(100), Some('S'), "lapsed lease reverts");
    assert_eq!(r.find(&f.id).await.end_reason, "lease");
    let mut saw_expiry = false;
    while let Ok(ev) = events.try_recv() {
        if let Some(pb::fault_event::Event::SessionExpired(x)) = ev.event {
            assert_eq!(x.fault_ids, vec![f.id.clone()]);
            saw_expiry = true;
        }
    }
    assert!(saw_expiry);
    assert!(
        r.metrics
            .render()
            .contains("gpuchaos_agent_lease_expiries_total 1")
    );
    let id = s.id.clone();
    let e = r
        .handle
        .call(|reply| Command::RenewSession {
            id,
            at: tokio::time::Instant::now(),
            reply,
        })
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, AgentError::SessionNotFound(_)));
    let e = r.inject(PAUSE_100, Some(s.id)).await.unwrap_err();
    assert!(matches!(e, AgentError::SessionNotFound(_)));
}

#[tokio::test(start_paused = true)]
async fn inv4_revert_is_idempotent() {
    let r = rig().await;
    let f = r.inject(PAUSE_100, None).await.unwrap();
    let a = r.revert(&f.id).await.unwrap();
    assert_eq!(a.state, pb::FaultState::Reverted as i32);
    assert_eq!(a.end_reason, "revert");
    let b = r.revert(&f.id).await.unwrap();
    assert_eq!(b.state, pb::FaultState::Reverted as i32);
    let conts = r
        .procs
        .signals
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, s)| *s == 18)
        .count();
    assert_eq!(conts, 1, "the second revert did not signal again");
    assert!(matches!(
        r.revert("f-nope").await.unwrap_err(),
        AgentError::FaultNotFound(_)
    ));
}

#[tokio::test(start_paused = true)]
async fn inv5_startup_recovery_reverts_what_the_journal_holds() {
    let procs = workers();
    let dir = tempfile::tempdir().unwrap();
    // A previous run paused pid 100 and 101 and crashed: one applied, one only intended.
    {
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        for (id, pid) in [("f-a", 100u32), ("f-b", 101)] {
            j.append(&Record::Intent {
                id: id.into(),
                kind: "process".into(),
                spec_json: spec(PAUSE_100).to_json(),
                session: None,
                target: format!("pid {pid}"),
                plan: serde_json::json!({"action": "pause", "seed": 1, "targets": [{"pid": pid, "start_time": pid as u64 * 10, "comm": "vllm-worker"}]}),
                unix_ms: 0,
            })
            .unwrap();
        }
        j.append(&Record::Applied {
            id: "f-a".into(),
            unix_ms: 0,
        })
        .unwrap();
    }
    procs.table.lock().unwrap().get_mut(&100).unwrap().0.state = 'T';
    let (r, recovered) = rig_with(procs, policy(|_| {}), dir).await;
    assert_eq!(recovered.len(), 2);
    assert!(
        recovered
            .iter()
            .all(|f| f.state == pb::FaultState::Reverted as i32 && f.end_reason == "recovery")
    );
    assert_eq!(r.procs.state(100), Some('S'));
    assert!(
        crate::journal::read_open(&r.dir.path().join(crate::journal::JOURNAL_FILE))
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(start_paused = true)]
async fn inv6_shutdown_reverts_everything() {
    let r = rig().await;
    r.inject(PAUSE_100, None).await.unwrap();
    r.inject(
        "kind: process\nduration: 1m\ntarget: {pid: 101}\naction: pause\n",
        None,
    )
    .await
    .unwrap();
    let left = r
        .handle
        .call(|reply| Command::Shutdown { reply })
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(r.procs.state(100), Some('S'));
    assert_eq!(r.procs.state(101), Some('S'));
    let e = r.inject(PAUSE_100, None).await.unwrap_err();
    assert!(matches!(e, AgentError::ShuttingDown));
}

#[tokio::test(start_paused = true)]
async fn inv7_unverified_fault_fails_and_is_reverted() {
    let r = rig().await;
    r.procs.stubborn.lock().unwrap().push(102);
    let f = r
        .inject(
            "kind: process\nduration: 30s\ntarget: {pid: [100, 102]}\naction: pause\n",
            None,
        )
        .await
        .unwrap();
    assert_eq!(f.state, pb::FaultState::Failed as i32);
    assert!(f.error.contains("not seen stopped"), "{}", f.error);
    assert_eq!(f.end_reason, "failed");
    assert_eq!(
        r.procs.state(100),
        Some('S'),
        "the half-applied part was undone"
    );
    assert!(
        r.metrics
            .render()
            .contains("gpuchaos_agent_failures_total{kind=\"process\",stage=\"inject\"} 1")
    );
}

#[tokio::test(start_paused = true)]
async fn inv9_policy_refusals_apply_nothing() {
    let r = rig_with(
        workers(),
        policy(|p| p.enabled_kinds = vec!["network".into()]),
        tempfile::tempdir().unwrap(),
    )
    .await
    .0;
    let e = r.inject(PAUSE_100, None).await.unwrap_err();
    assert!(e.to_string().contains("disabled on this node"), "{e}");
    let r = rig().await;
    let e = r
        .inject(
            "kind: process\nduration: 30s\ntarget: {name: sshd}\naction: kill\n",
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, AgentError::Refused(_)), "{e}");
    assert!(r.procs.signals.lock().unwrap().is_empty());
    assert!(r.journal_text().is_empty());
}

#[tokio::test(start_paused = true)]
async fn inv10_a_dropped_caller_cannot_abandon_a_fault() {
    let r = rig().await;
    let spec = spec("kind: process\nduration: 10s\ntarget: {pid: 100}\naction: pause\n");
    let (tx, rx) = oneshot::channel();
    r.handle
        .tx
        .send(Command::Inject {
            spec: Box::new(spec),
            session: None,
            reply: tx,
        })
        .await
        .unwrap();
    drop(rx); // the RPC was cancelled
    settle().await;
    let faults = r.list().await;
    assert_eq!(faults.len(), 1);
    assert_eq!(
        faults[0].state,
        pb::FaultState::Active as i32,
        "tracked and active"
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    settle().await;
    assert_eq!(
        r.procs.state(100),
        Some('S'),
        "and still reverted on schedule"
    );
}

#[tokio::test(start_paused = true)]
async fn halt_reverts_everything_and_closing_a_session_reverts_its_faults() {
    let r = rig().await;
    let s = r
        .handle
        .call(|reply| Command::OpenSession {
            ttl: Duration::from_secs(30),
            holder: "t".into(),
            lock: String::new(),
            reply,
        })
        .await
        .unwrap()
        .unwrap();
    r.inject(PAUSE_100, Some(s.id.clone())).await.unwrap();
    r.inject(
        "kind: process\nduration: 1m\ntarget: {pid: 101}\naction: pause\n",
        None,
    )
    .await
    .unwrap();
    let id = s.id.clone();
    let closed = r
        .handle
        .call(|reply| Command::CloseSession {
            id,
            keep_faults: false,
            reply,
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(closed.len(), 1);
    assert_eq!(r.procs.state(100), Some('S'));
    assert_eq!(r.procs.state(101), Some('T'));
    let all = r
        .handle
        .call(|reply| Command::RevertAll {
            reason: "halt",
            reply,
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].end_reason, "halt");
    assert_eq!(r.procs.state(101), Some('S'));
}

#[tokio::test(start_paused = true)]
async fn revert_during_a_terminate_grace_period_stops_it() {
    let r = rig().await;
    r.procs.stubborn.lock().unwrap().push(105);
    let h = r.handle.clone();
    let spec =
        spec("kind: process\nduration: 1m\ntarget: {pid: 105}\naction: terminate\ngrace: 30s\n");
    let inject = tokio::spawn(async move {
        h.call(|reply| Command::Inject {
            spec: Box::new(spec),
            session: None,
            reply,
        })
        .await
    });
    settle().await;
    let f = r.list().await.remove(0);
    assert_eq!(f.state, pb::FaultState::Injecting as i32);
    let reverted = r.revert(&f.id).await.unwrap();
    assert_eq!(reverted.state, pb::FaultState::Reverted as i32);
    assert_eq!(reverted.end_reason, "revert");
    let signals = r.procs.signals.lock().unwrap().clone();
    assert_eq!(signals, vec![(105, 15)], "no SIGKILL after the revert");
    let injected = inject.await.unwrap().unwrap().unwrap();
    assert_eq!(injected.id, f.id);
}

#[tokio::test(start_paused = true)]
async fn a_session_lock_is_exclusive_until_closed_or_lapsed() {
    let r = rig().await;
    let open = |lock: &str, holder: &str| {
        let (lock, holder) = (lock.to_string(), holder.to_string());
        let handle = r.handle.clone();
        async move {
            handle
                .call(|reply| Command::OpenSession {
                    ttl: Duration::from_secs(2),
                    holder,
                    lock,
                    reply,
                })
                .await
                .unwrap()
        }
    };
    let a = open("gameday:weekly", "controller A").await.unwrap();
    assert_eq!(a.lock, "gameday:weekly");
    let err = open("gameday:weekly", "controller B").await.unwrap_err();
    assert!(matches!(err, AgentError::Locked(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("controller A") && msg.contains(&a.id), "{msg}");
    // Other locks and unlocked sessions are unaffected.
    open("gameday:other", "controller B").await.unwrap();
    open("", "controller B").await.unwrap();
    // Closing frees it.
    let id = a.id.clone();
    r.handle
        .call(|reply| Command::CloseSession {
            id,
            keep_faults: false,
            reply,
        })
        .await
        .unwrap()
        .unwrap();
    let b = open("gameday:weekly", "controller B").await.unwrap();
    assert!(open("gameday:weekly", "controller C").await.is_err());
    // A lapsed lease frees it too, and the lapsed session cannot be renewed.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    open("gameday:weekly", "controller C").await.unwrap();
    let id = b.id.clone();
    let renewed = r
        .handle
        .call(|reply| Command::RenewSession {
            id,
            at: tokio::time::Instant::now(),
            reply,
        })
        .await
        .unwrap();
    assert!(
        matches!(renewed, Err(AgentError::SessionNotFound(_))),
        "{renewed:?}"
    );
}

/// A renewal already waiting when the lease runs out is served first: the manager
/// never acts on an expiry while a command that would prevent it sits in its queue.
/// (With an unbiased select this lapsed the lease about half the time.)
#[tokio::test(start_paused = true)]
async fn a_waiting_renewal_wins_over_the_lease_expiry() {
    for _ in 0..20 {
        let r = rig().await;
        let s = r
            .handle
            .call(|reply| Command::OpenSession {
                ttl: Duration::from_secs(1),
                holder: "test".into(),
                lock: String::new(),
                reply,
            })
            .await
            .unwrap()
            .unwrap();
        let f = r.inject(PAUSE_100, Some(s.id.clone())).await.unwrap();
        tokio::time::sleep(Duration::from_millis(990)).await;
        // A renewal that reached the agent before the lease ran out, still in the
        // manager's queue when the clock passes the expiry: both are ready when the
        // manager wakes.
        let arrived = tokio::time::Instant::now();
        let (tx, rx) = tokio::sync::oneshot::channel();
        r.handle
            .tx
            .try_send(Command::RenewSession {
                id: s.id.clone(),
                at: arrived,
                reply: tx,
            })
            .unwrap();
        tokio::time::advance(Duration::from_millis(20)).await;
        let renewed = rx.await.unwrap();
        assert!(
            renewed.is_ok(),
            "the waiting renewal was refused: {renewed:?}"
        );
        settle().await;
        assert_eq!(
            r.find(&f.id).await.state,
            pb::FaultState::Active as i32,
            "the lease lapsed although its renewal was waiting"
        );
    }
}

/// The production paths (plans on the blocking pool, the journal on its thread):
/// no signal before the intent is on disk, a revert sent while the intent is being
/// written stops the effect, and a clean shutdown leaves the journal closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_io_paths_keep_journal_before_effect() {
    let (r, _) = rig_io(
        workers(),
        policy(|_| {}),
        tempfile::tempdir().unwrap(),
        false,
    )
    .await;
    let path = r.dir.path().join(crate::journal::JOURNAL_FILE);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    *r.procs.hook.lock().unwrap() = Some(Box::new(move |pid, sig| {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        s2.lock()
            .unwrap()
            .push((pid, sig, text.contains("\"rec\":\"intent\"")));
    }));
    for _ in 0..20 {
        let f = r.inject(PAUSE_100, None).await.unwrap();
        assert_eq!(f.state, pb::FaultState::Active as i32);
        r.revert(&f.id).await.unwrap();
    }
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .all(|(_, _, journaled)| *journaled),
        "a signal before the intent was on disk: {:?}",
        seen.lock().unwrap()
    );
    // A revert racing the inject: whatever the order, the fault ends reverted and
    // the process is not left stopped.
    for _ in 0..20 {
        let h = r.handle.clone();
        let inject = tokio::spawn(async move {
            h.call(|reply| Command::Inject {
                spec: Box::new(spec(PAUSE_100)),
                session: None,
                reply,
            })
            .await
        });
        let _ = r
            .handle
            .call(|reply| Command::RevertAll {
                reason: "halt",
                reply,
            })
            .await;
        let _ = inject.await;
        let _ = r
            .handle
            .call(|reply| Command::RevertAll {
                reason: "halt",
                reply,
            })
            .await;
    }
    let left = r
        .handle
        .call(|reply| Command::Shutdown { reply })
        .await
        .unwrap();
    assert!(left.iter().all(|f| f.leftover.is_empty()), "{left:?}");
    // Every `reverted` record is on disk once shutdown has answered.
    let open = crate::journal::read_open(&r.dir.path().join(crate::journal::JOURNAL_FILE)).unwrap();
    assert!(
        open.is_empty(),
        "the journal still holds {} open intents",
        open.len()
    );
    assert_eq!(r.procs.state(100), Some('S'), "the worker was left stopped");
}

#[tokio::test(start_paused = true)]
async fn observations_reach_the_fault_also_after_it_ended() {
    let r = rig().await;
    let mut events = r.handle.subscribe();
    let f = r
        .inject(
            "kind: process\nduration: 1s\ntarget: {cmdline: 'rank 0$'}\naction: kill\n",
            None,
        )
        .await
        .unwrap();
    assert!(f.observations.is_empty());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(r.find(&f.id).await.state, pb::FaultState::Reverted as i32);
    // The supervisor's replacement comes after the fault ended.
    r.procs
        .add(300, "vllm-worker", "python -m vllm.worker --rank 0");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ended = r.find(&f.id).await;
    assert_eq!(ended.state, pb::FaultState::Reverted as i32);
    let kinds: Vec<(&str, u32)> = ended
        .observations
        .iter()
        .map(|o| (o.kind.as_str(), o.pid))
        .collect();
    assert_eq!(kinds, [("replaced", 300)]);
    // And WatchEvents said so.
    let mut seen = false;
    while let Ok(ev) = events.try_recv() {
        if let Some(pb::fault_event::Event::Fault(x)) = ev.event
            && x.id == f.id
            && !x.observations.is_empty()
        {
            seen = true;
        }
    }
    assert!(seen, "an event carries the observation");
}

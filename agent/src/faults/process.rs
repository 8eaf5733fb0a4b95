//! The `process` kind: kill, terminate, pause or crash-loop workers.
//!
//! Targets are resolved to (pid, start time) pairs before anything is signalled, and
//! every signal re-checks the start time, so a pid reused by an unrelated process is
//! never hit. Verification reads /proc: paused means state T, killed means gone (or a
//! zombie waiting for its parent).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpuchaos_proto::signal;
use gpuchaos_proto::spec::{ProcessAction, ProcessSpec};
use serde::{Deserialize, Serialize};
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

pub use super::select::{Selector, Target};
use super::watch::{ObservationRx, ObservationTx, Watch, gpu_unavailable};
use super::{Applied, KindDriver, Planned, RevertError, Support};
use crate::error::AgentError;
use crate::failpoint;
use crate::sys::Processes;

const SIGKILL: i32 = 9;
const SIGTERM: i32 = 15;
const SIGCONT: i32 = 18;
const SIGSTOP: i32 = 19;

/// How long a SIGSTOP may take to show as state T.
const PAUSE_VERIFY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a killed process may take to disappear.
const KILL_VERIFY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a SIGCONT may take to show.
const RESUME_VERIFY_TIMEOUT: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(1);

/// The journaled plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessPlan {
    pub action: ProcessAction,
    pub targets: Vec<Target>,
    /// The seed used to pick targets, recorded so a run can be replayed.
    pub seed: u64,
}

pub struct ProcessDriver {
    procs: Arc<dyn Processes>,
    selector: Arc<Selector>,
}

impl ProcessDriver {
    pub fn new(selector: Arc<Selector>) -> Self {
        ProcessDriver {
            procs: Arc::clone(selector.procs()),
            selector,
        }
    }

    /// Is this exact process (pid and start time) still alive?
    fn alive(&self, t: &Target) -> bool {
        matches!(self.procs.stat(t.pid), Ok(Some(s)) if s.start_time == t.start_time && !s.is_dead())
    }

    fn stopped(&self, t: &Target) -> bool {
        matches!(self.procs.stat(t.pid), Ok(Some(s)) if s.start_time == t.start_time && s.is_stopped())
    }

    /// Sends `sig` to each target still alive. Returns the targets signalled.
    fn signal_all(&self, targets: &[Target], sig: i32) -> Result<Vec<Target>, String> {
        let mut hit = Vec::new();
        for (i, t) in targets.iter().enumerate() {
            if !self.alive(t) {
                continue;
            }
            match self.procs.signal(t.pid, sig) {
                Ok(()) => hit.push(t.clone()),
                Err(nix::errno::Errno::ESRCH) => {}
                Err(nix::errno::Errno::EPERM) => {
                    return Err(format!(
                        "not permitted to send {} to {t}: run the agent as root",
                        signal::name(sig)
                    ));
                }
                Err(e) => return Err(format!("sending {} to {t}: {e}", signal::name(sig))),
            }
            if i == 0 {
                failpoint::hit("mid-effect");
            }
        }
        Ok(hit)
    }

    /// Waits until every target is gone, up to `timeout`. Returns those still alive.
    async fn wait_gone(&self, targets: &[Target], timeout: Duration) -> Vec<Target> {
        let deadline = Instant::now() + timeout;
        loop {
            let alive: Vec<Target> = targets.iter().filter(|t| self.alive(t)).cloned().collect();
            if alive.is_empty() || Instant::now() >= deadline {
                return alive;
            }
            sleep(POLL).await;
        }
    }

    /// Every process the fault's selector matches now, and the plan's targets: what
    /// the replacement watch will never take for a replacement.
    fn known(&self, spec: &ProcessSpec, plan: &ProcessPlan) -> Vec<(u32, u64)> {
        if !spec.watches() {
            return Vec::new();
        }
        let mut known: Vec<(u32, u64)> = self
            .selector
            .select(&spec.target)
            .unwrap_or_default()
            .iter()
            .chain(&plan.targets)
            .map(|t| (t.pid, t.start_time))
            .collect();
        known.sort_unstable();
        known.dedup();
        known
    }

    /// What the fault's details say of its watch.
    fn watch_note(&self, spec: &ProcessSpec) -> serde_json::Value {
        if !spec.watches() {
            return serde_json::Value::String("off".into());
        }
        let mut note = serde_json::json!({
            "timeout": humantime::format_duration(spec.watch_timeout()).to_string(),
            "settle": humantime::format_duration(spec.watch_settle()).to_string(),
        });
        if let Some(why) = gpu_unavailable(&self.selector) {
            note["gpu"] = format!("no NVML: gpu_ready not observed ({why})").into();
        }
        note
    }

    fn watch(
        &self,
        spec: &ProcessSpec,
        known: Vec<(u32, u64)>,
        killed: Vec<Target>,
        tx: ObservationTx,
    ) {
        if killed.is_empty() {
            return;
        }
        Watch {
            selector: Arc::clone(&self.selector),
            target: spec.target.clone(),
            known,
            killed,
            timeout: spec.watch_timeout(),
            settle: spec.watch_settle(),
        }
        .spawn(tx);
    }

    /// Starts the watch of a kill or terminate that was just verified.
    fn watch_now(
        &self,
        spec: &ProcessSpec,
        known: Vec<(u32, u64)>,
        killed: &[Target],
    ) -> Option<ObservationRx> {
        if !spec.watches() {
            return None;
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.watch(spec, known, killed.to_vec(), tx);
        Some(rx)
    }

    async fn kill_round(&self, targets: &[Target], sig: i32) -> Result<Vec<Target>, String> {
        let hit = self.signal_all(targets, sig)?;
        failpoint::hit("after-effect");
        let alive = self.wait_gone(&hit, KILL_VERIFY_TIMEOUT).await;
        if !alive.is_empty() {
            return Err(format!(
                "{} still running {} after {}: the signal did not end it (use action: terminate for SIGTERM then SIGKILL)",
                list(&alive),
                humantime::format_duration(KILL_VERIFY_TIMEOUT),
                signal::name(sig)
            ));
        }
        Ok(hit)
    }

    async fn apply_plan(
        self: Arc<Self>,
        spec: ProcessSpec,
        plan: ProcessPlan,
        cancel: tokio_util::sync::CancellationToken,
    ) -> Result<Applied, String> {
        let details = |v: serde_json::Value| Arc::new(Mutex::new(v));
        let known = self.known(&spec, &plan);
        match plan.action {
            ProcessAction::Pause => {
                let hit = self.signal_all(&plan.targets, SIGSTOP)?;
                failpoint::hit("after-effect");
                if hit.len() < plan.targets.len() {
                    let gone: Vec<Target> = plan
                        .targets
                        .iter()
                        .filter(|t| !hit.contains(t))
                        .cloned()
                        .collect();
                    return Err(format!("{} exited before it could be paused", list(&gone)));
                }
                let deadline = Instant::now() + PAUSE_VERIFY_TIMEOUT;
                loop {
                    let running: Vec<Target> =
                        hit.iter().filter(|t| !self.stopped(t)).cloned().collect();
                    if running.is_empty() {
                        break;
                    }
                    if Instant::now() >= deadline {
                        return Err(format!(
                            "{} not seen stopped (state T) {} after SIGSTOP",
                            list(&running),
                            humantime::format_duration(PAUSE_VERIFY_TIMEOUT)
                        ));
                    }
                    sleep(POLL).await;
                }
                Ok(Applied {
                    details: details(serde_json::json!({
                        "action": "pause",
                        "paused": hit,
                        "seed": plan.seed,
                    })),
                    background: None,
                    observations: None,
                })
            }
            ProcessAction::Kill => {
                let sig = spec.signal_number();
                let hit = self.kill_round(&plan.targets, sig).await?;
                Ok(Applied {
                    details: details(serde_json::json!({
                        "action": "kill",
                        "signal": signal::name(sig),
                        "killed": hit,
                        "seed": plan.seed,
                        "watch": self.watch_note(&spec),
                    })),
                    background: None,
                    observations: self.watch_now(&spec, known, &hit),
                })
            }
            ProcessAction::Terminate => {
                let hit = self.signal_all(&plan.targets, SIGTERM)?;
                failpoint::hit("after-effect");
                let grace = spec.grace();
                let stubborn = tokio::select! {
                    s = self.wait_gone(&hit, grace) => s,
                    _ = cancel.cancelled() => return Err("cancelled during the grace period".into()),
                };
                let mut escalated = Vec::new();
                if !stubborn.is_empty() {
                    escalated = self.kill_round(&stubborn, SIGKILL).await?;
                }
                Ok(Applied {
                    details: details(serde_json::json!({
                        "action": "terminate",
                        "terminated": hit,
                        "sigkilled_after_grace": escalated,
                        "grace": humantime::format_duration(grace).to_string(),
                        "seed": plan.seed,
                        "watch": self.watch_note(&spec),
                    })),
                    background: None,
                    observations: self.watch_now(&spec, known, &hit),
                })
            }
            ProcessAction::CrashLoop => {
                let first = self.kill_round(&plan.targets, SIGKILL).await?;
                let state = details(serde_json::json!({
                    "action": "crash-loop",
                    "interval": humantime::format_duration(spec.interval()).to_string(),
                    "rounds": 1,
                    "killed_total": first.len(),
                    "last_killed": first,
                    "seed": plan.seed,
                    "watch": self.watch_note(&spec),
                }));
                let me = Arc::clone(&self);
                let live = Arc::clone(&state);
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                let watch = spec.watches().then_some(rx);
                let background = tokio::spawn(async move {
                    let seen = me.crash_loop(&spec, plan.seed, known, live, cancel).await;
                    // Replacements during the loop were killed by it: the one that
                    // counts comes after the end.
                    if spec.watches() {
                        me.watch(&spec, seen, first, tx);
                    }
                });
                Ok(Applied {
                    details: state,
                    background: Some(background),
                    observations: watch,
                })
            }
        }
    }

    /// Kills the matching processes, replacements included, every interval until
    /// cancelled. Returns `seen` with every process the rounds matched (killed or not
    /// picked): none of them is the replacement the watch looks for afterwards.
    async fn crash_loop(
        &self,
        spec: &ProcessSpec,
        seed: u64,
        mut seen: Vec<(u32, u64)>,
        live: Arc<Mutex<serde_json::Value>>,
        cancel: tokio_util::sync::CancellationToken,
    ) -> Vec<(u32, u64)> {
        let mut round: u64 = 1;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return seen,
                _ = sleep(spec.interval()) => {}
            }
            round += 1;
            // A replacement has a new pid: re-select every round. Matching nothing is
            // normal while the supervisor restarts the worker.
            let targets = match self.selector.select(&spec.target) {
                Ok(t) => {
                    for key in t.iter().map(|t| (t.pid, t.start_time)) {
                        if !seen.contains(&key) {
                            seen.push(key);
                        }
                    }
                    Selector::pick(t, spec.target.pick, seed.wrapping_add(round))
                }
                Err(AgentError::NoTargets(_)) => Vec::new(),
                Err(e) => {
                    tracing::warn!(error = %e, round, "crash-loop: selection failed; skipping this round");
                    Vec::new()
                }
            };
            if cancel.is_cancelled() {
                return seen;
            }
            let killed = match self.kill_round(&targets, SIGKILL).await {
                Ok(k) => k,
                Err(e) => {
                    tracing::warn!(error = %e, round, "crash-loop round failed");
                    Vec::new()
                }
            };
            tracing::info!(round, killed = killed.len(), "crash-loop round");
            if let Ok(mut d) = live.lock() {
                d["rounds"] = round.into();
                let total = d["killed_total"].as_u64().unwrap_or(0) + killed.len() as u64;
                d["killed_total"] = total.into();
                d["last_killed"] = serde_json::to_value(&killed).unwrap_or_default();
            }
        }
    }

    async fn revert_plan(self: Arc<Self>, plan: ProcessPlan) -> Result<(), RevertError> {
        if plan.action != ProcessAction::Pause {
            // A killed process cannot be brought back; its supervisor restarts it.
            // Crash-loop's loop is stopped by the manager before revert is called.
            return Ok(());
        }
        let mut resumed = Vec::new();
        for t in &plan.targets {
            if !self.alive(t) {
                continue; // gone, or the pid now belongs to another process: nothing to do
            }
            match self.procs.signal(t.pid, SIGCONT) {
                Ok(()) => resumed.push(t.clone()),
                Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => {
                    return Err(RevertError {
                        message: format!("sending SIGCONT to {t}: {e}"),
                        leftover: format!(
                            "{t} may still be stopped: resume it with `kill -CONT {}`",
                            t.pid
                        ),
                    });
                }
            }
        }
        let deadline = Instant::now() + RESUME_VERIFY_TIMEOUT;
        loop {
            let still: Vec<Target> = resumed
                .iter()
                .filter(|t| self.stopped(t))
                .cloned()
                .collect();
            if still.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let pids: Vec<String> = still.iter().map(|t| t.pid.to_string()).collect();
                return Err(RevertError {
                    message: format!("{} still stopped after SIGCONT", list(&still)),
                    leftover: format!(
                        "{} stopped: resume with `kill -CONT {}`",
                        list(&still),
                        pids.join(" ")
                    ),
                });
            }
            sleep(POLL).await;
        }
    }
}

fn list(targets: &[Target]) -> String {
    let v: Vec<String> = targets.iter().map(|t| t.to_string()).collect();
    v.join(", ")
}

impl KindDriver for ProcessDriver {
    type Spec = ProcessSpec;
    type Plan = ProcessPlan;

    fn capability(&self) -> Support {
        let root = nix::unistd::geteuid().is_root();
        Support {
            supported: true,
            reason: if root {
                String::new()
            } else {
                format!(
                    "not running as root: only processes of uid {} can be signalled",
                    nix::unistd::geteuid()
                )
            },
            backends: vec![],
        }
    }

    fn plan(&self, p: &ProcessSpec) -> Result<Planned<ProcessPlan>, AgentError> {
        let matched = self.selector.select(&p.target)?;
        let seed = p.seed.unwrap_or_else(rand::random);
        let targets = Selector::pick(matched, p.target.pick, seed);
        let plan = ProcessPlan {
            action: p.action,
            targets,
            seed,
        };
        Ok(Planned {
            target: list(&plan.targets),
            plan,
        })
    }

    async fn apply(
        self: Arc<Self>,
        spec: ProcessSpec,
        plan: ProcessPlan,
        cancel: CancellationToken,
    ) -> Result<Applied, String> {
        self.apply_plan(spec, plan, cancel).await
    }

    async fn revert(self: Arc<Self>, plan: ProcessPlan) -> Result<(), RevertError> {
        self.revert_plan(plan).await
    }

    fn unreadable_plan_leftover(&self, plan: &str) -> String {
        format!("unknown: check the processes recorded in {plan}")
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::faults::{ApplyCtx, FaultDriver};
    use crate::policy::{Policy, PolicyFile};
    use crate::sys::fake::{FakeProcs, NoGpus, workers};
    use gpuchaos_proto::spec::FaultSpec;

    pub fn selector(procs: Arc<FakeProcs>) -> Arc<Selector> {
        Arc::new(Selector::new(
            procs,
            Arc::new(NoGpus),
            Arc::new(Policy::new(PolicyFile::default()).unwrap()),
        ))
    }

    /// The driver as the manager holds it (through the typed adapter).
    pub fn driver(procs: Arc<FakeProcs>) -> Arc<dyn FaultDriver> {
        crate::faults::typed(Arc::new(ProcessDriver::new(selector(procs))))
    }

    fn spec(yaml: &str) -> FaultSpec {
        FaultSpec::from_yaml_multi(yaml).unwrap().remove(0)
    }

    #[test]
    fn selection_by_name_cmdline_and_seeded_pick() {
        let d = driver(workers());
        let all = selector(workers())
            .select(
                &as_process(&spec(
                    "kind: process\nduration: 1s\ntarget: {name: ^vllm}\naction: pause\n",
                ))
                .target,
            )
            .unwrap();
        assert_eq!(all.len(), 10);
        let s = spec(
            "kind: process\nduration: 1s\nseed: 7\ntarget: {cmdline: 'rank [0-4]$', pick: {count: 2}}\naction: pause\n",
        );
        let a = d.plan(&s).unwrap();
        let b = d.plan(&s).unwrap();
        assert_eq!(a.revert, b.revert, "same seed, same choice");
        let plan: ProcessPlan = serde_json::from_value(a.revert).unwrap();
        assert_eq!(plan.targets.len(), 2);
        assert!(plan.targets.iter().all(|t| (100..105).contains(&t.pid)));
        let s = spec(
            "kind: process\nduration: 1s\nseed: 7\ntarget: {name: ^vllm, pick: {percent: 30}}\naction: pause\n",
        );
        let plan: ProcessPlan = serde_json::from_value(d.plan(&s).unwrap().revert).unwrap();
        assert_eq!(plan.targets.len(), 3);
    }

    #[test]
    fn protected_and_missing_targets_are_refused() {
        let d = driver(workers());
        let cases = [
            ("{pid: 1}", "pid 1 (init) is protected", true),
            ("{name: sshd}", "sshd", true),
            ("{pid: 4}", "agent itself", true),
            ("{name: ^nothing$}", "matched no process", false),
            ("{pid: 999}", "no process with pid 999", false),
            ("{gpu: 0}", "no NVIDIA driver", false),
        ];
        for (target, want, refused) in cases {
            let e = d
                .plan(&spec(&format!(
                    "kind: process\nduration: 1s\ntarget: {target}\naction: kill\n"
                )))
                .unwrap_err();
            assert!(e.to_string().contains(want), "{target}: {e}");
            assert_eq!(
                matches!(e, AgentError::Refused(_)),
                refused,
                "{target}: {e}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn pause_then_revert_resumes_and_revert_is_idempotent() {
        let p = workers();
        let d = driver(p.clone());
        let s = spec("kind: process\nduration: 1s\ntarget: {pid: [100, 101]}\naction: pause\n");
        let plan = d.plan(&s).unwrap();
        let applied = d
            .clone()
            .apply(ApplyCtx {
                id: "f".into(),
                spec: s,
                plan: plan.revert.clone(),
                cancel: Default::default(),
            })
            .await
            .unwrap();
        assert_eq!(p.state(100), Some('T'));
        assert_eq!(
            applied.details.lock().unwrap()["paused"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        d.clone().revert(plan.revert.clone()).await.unwrap();
        assert_eq!(p.state(100), Some('S'));
        // Again: nothing stopped, nothing to do, still success.
        d.clone().revert(plan.revert.clone()).await.unwrap();
        // The process died meanwhile: success.
        p.table.lock().unwrap().remove(&101);
        d.clone().revert(plan.revert).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn revert_never_signals_a_reused_pid() {
        let p = workers();
        let d = driver(p.clone());
        let plan = d
            .plan(&spec(
                "kind: process\nduration: 1s\ntarget: {pid: 100}\naction: pause\n",
            ))
            .unwrap();
        // pid 100 exits and the pid is reused by another process (new start time).
        p.table.lock().unwrap().get_mut(&100).unwrap().0.start_time = 999_999;
        p.signals.lock().unwrap().clear();
        d.clone().revert(plan.revert).await.unwrap();
        assert!(p.signals.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn unverifiable_pause_fails() {
        let p = workers();
        p.stubborn.lock().unwrap().push(102);
        let d = driver(p.clone());
        let s = spec("kind: process\nduration: 1s\ntarget: {pid: 102}\naction: pause\n");
        let plan = d.plan(&s).unwrap();
        let e = d
            .apply(ApplyCtx {
                id: "f".into(),
                spec: s,
                plan: plan.revert,
                cancel: Default::default(),
            })
            .await
            .unwrap_err();
        assert!(e.contains("not seen stopped"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn terminate_escalates_after_grace() {
        let p = workers();
        let d = driver(p.clone());
        let s =
            spec("kind: process\nduration: 1s\ntarget: {pid: 103}\naction: terminate\ngrace: 2s\n");
        let plan = d.plan(&s).unwrap();
        // The fake removes a process on any kill signal, so SIGTERM is enough here.
        let a = d
            .apply(ApplyCtx {
                id: "f".into(),
                spec: s,
                plan: plan.revert,
                cancel: Default::default(),
            })
            .await
            .unwrap();
        assert_eq!(p.signals.lock().unwrap().as_slice(), &[(103, SIGTERM)]);
        assert!(
            a.details.lock().unwrap()["sigkilled_after_grace"]
                .as_array()
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn crash_loop_kills_replacements_until_cancelled() {
        let p = workers();
        let d = driver(p.clone());
        let s = spec(
            "kind: process\nduration: 1m\ntarget: {name: ^vllm, pick: {count: 1}}\naction: crash-loop\ninterval: 1s\n",
        );
        let plan = d.plan(&s).unwrap();
        let cancel = tokio_util::sync::CancellationToken::new();
        let a = d
            .clone()
            .apply(ApplyCtx {
                id: "f".into(),
                spec: s,
                plan: plan.revert,
                cancel: cancel.clone(),
            })
            .await
            .unwrap();
        assert_eq!(p.table.lock().unwrap().len(), 13 - 1);
        // A supervisor restarts a worker with a new pid.
        p.add(300, "vllm-worker", "python -m vllm.worker --rank 0");
        tokio::time::sleep(Duration::from_millis(3500)).await;
        assert_eq!(a.details.lock().unwrap()["rounds"], 4);
        assert_eq!(p.table.lock().unwrap().len(), 13 + 1 - 4);
        cancel.cancel();
        a.background.unwrap().await.unwrap();
        let n = p.signals.lock().unwrap().len();
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(p.signals.lock().unwrap().len(), n, "no kill after cancel");
    }

    use crate::faults::watch::WATCH_INTERVAL;
    use crate::sys::fake::FakeGpus;
    use gpuchaos_proto::pb;
    use tokio::time::sleep_until;

    const GIB: u64 = 1 << 30;

    /// Waits for every observation until the watch ends (its sender dropped).
    async fn observations(rx: Option<crate::faults::watch::ObservationRx>) -> Vec<pb::Observation> {
        let mut rx = rx.expect("a kill is watched");
        let mut out = Vec::new();
        while let Some(o) = rx.recv().await {
            out.push(o);
        }
        out
    }

    /// `at` (ms after the start) lies in (truth, truth + one watch interval], with a
    /// little slack for the real time between the test's and the watch's clock reads.
    fn within_one_interval(what: &str, at_ns: u64, truth_ms: u64) {
        let at = at_ns as f64 / 1e6;
        let (lo, hi) = (
            truth_ms as f64,
            truth_ms as f64 + WATCH_INTERVAL.as_millis() as f64 + 30.0,
        );
        println!("{what}: observed {at:.1} ms after the kill, truth {truth_ms} ms");
        assert!(
            at >= lo && at <= hi,
            "{what}: {at:.1} ms not in [{lo}, {hi}]"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_kill_observes_each_replacement_and_when_its_gpu_memory_settled() {
        let p = workers();
        let gpus = Arc::new(FakeGpus::new(2));
        let sel = Arc::new(Selector::new(
            p.clone(),
            gpus.clone(),
            Arc::new(Policy::new(PolicyFile::default()).unwrap()),
        ));
        let d = crate::faults::typed(Arc::new(ProcessDriver::new(sel)));
        // Two of the ten workers; the other eight match the selector all along and
        // must never be taken for replacements.
        let s = spec(
            "kind: process\nduration: 1s\nseed: 3\ntarget: {name: ^vllm, pick: {count: 2}}\naction: kill\nwatch: {settle: 1s, timeout: 1m}\n",
        );
        let plan = d.plan(&s).unwrap();
        let killed: ProcessPlan = serde_json::from_value(plan.revert.clone()).unwrap();
        let (t0, t0_mono) = (Instant::now(), crate::sys::clock::mono_ns());
        let a = d
            .clone()
            .apply(ApplyCtx {
                id: "f".into(),
                spec: s,
                plan: plan.revert,
                cancel: Default::default(),
            })
            .await
            .unwrap();
        assert!(
            a.details.lock().unwrap()["watch"]["gpu"].is_null(),
            "NVML is there"
        );
        let (p2, g2) = (p.clone(), gpus.clone());
        let ms = move |n: u64| t0 + Duration::from_millis(n);
        tokio::spawn(async move {
            sleep_until(ms(1230)).await;
            p2.add(300, "vllm-worker", "python -m vllm.worker --rank 0");
            // Weights loading in steps onto two GPUs: last growth at 2100 ms.
            sleep_until(ms(1500)).await;
            g2.set(0, 300, GIB);
            sleep_until(ms(1800)).await;
            g2.set(0, 300, 2 * GIB);
            sleep_until(ms(2050)).await;
            p2.add(301, "vllm-worker", "python -m vllm.worker --rank 1");
            sleep_until(ms(2100)).await;
            g2.set(1, 300, GIB / 2);
            sleep_until(ms(2500)).await;
            g2.set(0, 301, 4 * GIB);
            // A worker that is not a replacement's is ignored.
            g2.set(0, 105, 7 * GIB);
        });
        let obs = observations(a.observations).await;
        let kinds: Vec<(&str, u32)> = obs.iter().map(|o| (o.kind.as_str(), o.pid)).collect();
        assert_eq!(
            kinds,
            [
                ("replaced", 300),
                ("replaced", 301),
                ("gpu_ready", 300),
                ("gpu_ready", 301)
            ],
            "{obs:#?}"
        );
        let rel = |o: &pb::Observation| o.mono_ns - t0_mono;
        within_one_interval("replaced 300", rel(&obs[0]), 1230);
        within_one_interval("replaced 301", rel(&obs[1]), 2050);
        within_one_interval("gpu_ready 300", rel(&obs[2]), 2100);
        within_one_interval("gpu_ready 301", rel(&obs[3]), 2500);
        assert_eq!(obs[0].start_time, 3000);
        assert_eq!(obs[2].gpu_bytes, 2 * GIB + GIB / 2, "summed over both GPUs");
        assert_eq!(obs[3].gpu_bytes, 4 * GIB);
        assert!(obs.iter().all(|o| o.error_ns == 100_000_000));
        assert!(
            obs[0]
                .detail
                .contains(&format!("replaced {}", killed.targets[0])),
            "{}",
            obs[0].detail
        );
        // The watch ended when everything was seen, 1 s of settling after 2.5 s.
        let ended = t0.elapsed();
        assert!(ended < Duration::from_millis(3700), "{ended:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn without_nvml_a_kill_observes_the_replacement_only() {
        let p = workers();
        let d = driver(p.clone());
        let s = spec("kind: process\nduration: 1s\ntarget: {pid: 100}\naction: kill\n");
        let s = match s {
            FaultSpec::Process(mut ps) => {
                // A pid selector cannot match a replacement: watch by name instead.
                ps.target = as_process(&spec(
                    "kind: process\nduration: 1s\ntarget: {cmdline: 'rank 0$'}\naction: kill\n",
                ))
                .target
                .clone();
                FaultSpec::Process(ps)
            }
            other => other,
        };
        let plan = d.plan(&s).unwrap();
        let a = d
            .clone()
            .apply(ApplyCtx {
                id: "f".into(),
                spec: s,
                plan: plan.revert,
                cancel: Default::default(),
            })
            .await
            .unwrap();
        let note = a.details.lock().unwrap()["watch"]["gpu"].clone();
        assert!(
            note.as_str()
                .unwrap()
                .starts_with("no NVML: gpu_ready not observed"),
            "{note}"
        );
        let p2 = p.clone();
        tokio::spawn(async move {
            sleep(Duration::from_millis(400)).await;
            p2.add(300, "vllm-worker", "python -m vllm.worker --rank 0");
        });
        let obs = observations(a.observations).await;
        assert_eq!(obs.len(), 1, "{obs:#?}");
        assert_eq!((obs[0].kind.as_str(), obs[0].pid), ("replaced", 300));
    }

    #[tokio::test(start_paused = true)]
    async fn a_replacement_that_dies_again_ends_the_watch_without_gpu_ready() {
        let p = workers();
        let gpus = Arc::new(FakeGpus::new(1));
        let sel = Arc::new(Selector::new(
            p.clone(),
            gpus.clone(),
            Arc::new(Policy::new(PolicyFile::default()).unwrap()),
        ));
        let d = crate::faults::typed(Arc::new(ProcessDriver::new(sel)));
        let s = spec(
            "kind: process\nduration: 1s\ntarget: {cmdline: 'rank 0$'}\naction: kill\nwatch: {settle: 1s, timeout: 1m}\n",
        );
        let plan = d.plan(&s).unwrap();
        let t0 = Instant::now();
        let a = d
            .clone()
            .apply(ApplyCtx {
                id: "f".into(),
                spec: s,
                plan: plan.revert,
                cancel: Default::default(),
            })
            .await
            .unwrap();
        let (p2, g2) = (p.clone(), gpus.clone());
        tokio::spawn(async move {
            sleep_until(t0 + Duration::from_millis(200)).await;
            p2.add(300, "vllm-worker", "python -m vllm.worker --rank 0");
            sleep_until(t0 + Duration::from_millis(300)).await;
            g2.set(0, 300, GIB);
            // Dies (out of memory, say) before its memory settled.
            sleep_until(t0 + Duration::from_millis(600)).await;
            p2.table.lock().unwrap().remove(&300);
        });
        let obs = observations(a.observations).await;
        let kinds: Vec<(&str, u32)> = obs.iter().map(|o| (o.kind.as_str(), o.pid)).collect();
        assert_eq!(kinds, [("replaced", 300)]);
        let ended = t0.elapsed();
        assert!(
            ended < Duration::from_millis(800),
            "the watch ends when the replacement dies, not at its timeout: {ended:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn crash_loop_watches_only_after_its_end() {
        let p = workers();
        let d = driver(p.clone());
        let s = spec(
            "kind: process\nduration: 1m\nseed: 1\ntarget: {name: ^vllm, pick: {count: 1}}\naction: crash-loop\ninterval: 1s\n",
        );
        let plan = d.plan(&s).unwrap();
        let cancel = tokio_util::sync::CancellationToken::new();
        let t0 = Instant::now();
        let mut a = d
            .clone()
            .apply(ApplyCtx {
                id: "f".into(),
                spec: s,
                plan: plan.revert,
                cancel: cancel.clone(),
            })
            .await
            .unwrap();
        // A replacement during the loop: killed or left, it is not what recovery waits for.
        sleep_until(t0 + Duration::from_millis(500)).await;
        p.add(300, "vllm-worker", "python -m vllm.worker --rank 0");
        sleep_until(t0 + Duration::from_millis(2500)).await;
        let mut rx = a.observations.take().unwrap();
        assert!(rx.try_recv().is_err(), "nothing observed during the loop");
        cancel.cancel();
        a.background.take().unwrap().await.unwrap();
        sleep_until(t0 + Duration::from_millis(3000)).await;
        p.add(301, "vllm-worker", "python -m vllm.worker --rank 0");
        let obs = observations(Some(rx)).await;
        assert_eq!(obs.len(), 1, "{obs:#?}");
        assert_eq!((obs[0].kind.as_str(), obs[0].pid), ("replaced", 301));
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_can_be_turned_off() {
        let d = driver(workers());
        let s = spec(
            "kind: process\nduration: 1s\ntarget: {pid: 100}\naction: kill\nwatch: {enabled: false}\n",
        );
        let plan = d.plan(&s).unwrap();
        let a = d
            .apply(ApplyCtx {
                id: "f".into(),
                spec: s,
                plan: plan.revert,
                cancel: Default::default(),
            })
            .await
            .unwrap();
        assert!(a.observations.is_none());
        assert_eq!(a.details.lock().unwrap()["watch"], "off");
    }

    fn as_process(s: &FaultSpec) -> &ProcessSpec {
        let FaultSpec::Process(p) = s else {
            panic!("not a process spec")
        };
        p
    }
}

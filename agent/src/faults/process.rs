//! The `process` kind: kill, terminate, pause or crash-loop workers.
//!
//! Targets are resolved to (pid, start time) pairs before anything is signalled, and
//! every signal re-checks the start time, so a pid reused by an unrelated process is
//! never hit. Verification reads /proc: paused means state T, killed means gone (or a
//! zombie waiting for its parent).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpuchaos_proto::signal;
use gpuchaos_proto::spec::{FaultSpec, Pick, ProcessAction, ProcessSpec, ProcessTarget};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use tokio::time::{Instant, sleep};

use super::{Applied, ApplyCtx, BoxFut, Capability, FaultDriver, Plan, RevertError};
use crate::error::AgentError;
use crate::failpoint;
use crate::policy::{Lineage, Policy, cgroup_within};
use crate::sys::Processes;
use crate::sys::gpu::GpuQuery;

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

/// A process identified beyond its pid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub pid: u32,
    pub start_time: u64,
    pub comm: String,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} ({})", self.pid, self.comm)
    }
}

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
    gpus: Arc<dyn GpuQuery>,
    policy: Arc<Policy>,
}

impl ProcessDriver {
    pub fn new(procs: Arc<dyn Processes>, gpus: Arc<dyn GpuQuery>, policy: Arc<Policy>) -> Self {
        ProcessDriver {
            procs,
            gpus,
            policy,
        }
    }

    /// Is this exact process (pid and start time) still alive?
    fn alive(&self, t: &Target) -> bool {
        matches!(self.procs.stat(t.pid), Ok(Some(s)) if s.start_time == t.start_time && !s.is_dead())
    }

    fn stopped(&self, t: &Target) -> bool {
        matches!(self.procs.stat(t.pid), Ok(Some(s)) if s.start_time == t.start_time && s.is_stopped())
    }

    /// Every process the selector matches, checked against the policy, sorted by pid.
    pub fn select(&self, sel: &ProcessTarget) -> Result<Vec<Target>, AgentError> {
        let io = |e: std::io::Error| AgentError::Internal(format!("reading /proc: {e}"));
        let compile = |field: &str, re: &Option<String>| {
            re.as_deref()
                .map(gpuchaos_proto::spec::compile_regex)
                .transpose()
                .map_err(|e| {
                    AgentError::InvalidSpec(gpuchaos_proto::spec::SpecErrors(vec![
                        gpuchaos_proto::spec::FieldError::new(field, e),
                    ]))
                })
        };
        let name_re = compile("target.name", &sel.name)?;
        let cmd_re = compile("target.cmdline", &sel.cmdline)?;
        let all = self.procs.pids().map_err(io)?;
        let mut stats = Vec::with_capacity(all.len());
        for pid in &all {
            if let Some(s) = self.procs.stat(*pid).map_err(io)? {
                stats.push(s);
            }
        }
        let parents: Vec<(u32, u32)> = stats.iter().map(|s| (s.pid, s.ppid)).collect();
        let lineage = Lineage::compute(self.procs.self_pid(), &parents);

        let mut candidates: Vec<u32> = match &sel.pid {
            Some(p) => {
                let wanted = p.to_vec();
                for pid in &wanted {
                    if !stats.iter().any(|s| s.pid == *pid && !s.is_dead()) {
                        return Err(AgentError::NoTargets(format!(
                            "target.pid: no process with pid {pid} on this node"
                        )));
                    }
                }
                wanted
            }
            None => stats.iter().map(|s| s.pid).collect(),
        };
        if let Some(gpu) = &sel.gpu {
            let on_gpu = self.gpus.processes_on(gpu).map_err(|e| {
                AgentError::Unsupported(format!("target.gpu: cannot list processes on {gpu}: {e}"))
            })?;
            candidates.retain(|p| on_gpu.contains(p));
        }

        let mut matched = Vec::new();
        let mut protected = Vec::new();
        for pid in candidates {
            let Some(stat) = stats.iter().find(|s| s.pid == pid) else {
                continue;
            };
            if stat.is_dead() {
                continue;
            }
            if let Some(re) = &name_re
                && !re.is_match(&stat.comm)
            {
                continue;
            }
            let cmdline = self
                .procs
                .cmdline(pid)
                .map_err(io)?
                .unwrap_or_default()
                .join(" ");
            if let Some(re) = &cmd_re
                && !re.is_match(&cmdline)
            {
                continue;
            }
            let cgroup = self.procs.cgroup(pid).map_err(io)?.unwrap_or_default();
            if let Some(cg) = &sel.cgroup
                && !cgroup_within(&cgroup, cg)
            {
                continue;
            }
            if let Err(p) = self.policy.check_process(stat, &cmdline, &cgroup, &lineage) {
                protected.push(p);
                continue;
            }
            matched.push(Target {
                pid,
                start_time: stat.start_time,
                comm: stat.comm.clone(),
            });
        }
        if !protected.is_empty() {
            let shown: Vec<String> = protected.iter().take(3).map(|p| p.to_string()).collect();
            let more = if protected.len() > 3 {
                format!(" (and {} more)", protected.len() - 3)
            } else {
                String::new()
            };
            return Err(AgentError::Refused(format!(
                "the selector matches protected processes: {}{more}; narrow the selector",
                shown.join("; ")
            )));
        }
        if matched.is_empty() {
            return Err(AgentError::NoTargets(format!(
                "target: {} matched no process on this node; check with `ps -eo pid,comm,args`",
                describe_selector(sel)
            )));
        }
        Ok(matched)
    }

    /// Picks `pick` of the matched targets with a seeded RNG (the same seed and the
    /// same process table give the same choice).
    pub fn pick(targets: Vec<Target>, pick: Option<Pick>, seed: u64) -> Vec<Target> {
        let n = pick.unwrap_or(Pick::All).amount(targets.len());
        if n >= targets.len() {
            return targets;
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let mut idx = rand::seq::index::sample(&mut rng, targets.len(), n).into_vec();
        idx.sort_unstable();
        idx.into_iter().map(|i| targets[i].clone()).collect()
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
                    })),
                    background: None,
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
                    })),
                    background: None,
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
                }));
                let me = Arc::clone(&self);
                let live = Arc::clone(&state);
                let background = tokio::spawn(async move {
                    me.crash_loop(spec, plan.seed, live, cancel).await;
                });
                Ok(Applied {
                    details: state,
                    background: Some(background),
                })
            }
        }
    }

    /// Kills the matching processes, replacements included, every interval until
    /// cancelled.
    async fn crash_loop(
        &self,
        spec: ProcessSpec,
        seed: u64,
        live: Arc<Mutex<serde_json::Value>>,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        let mut round: u64 = 1;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = sleep(spec.interval()) => {}
            }
            round += 1;
            // A replacement has a new pid: re-select every round. Matching nothing is
            // normal while the supervisor restarts the worker.
            let targets = match self.select(&spec.target) {
                Ok(t) => Self::pick(t, spec.target.pick, seed.wrapping_add(round)),
                Err(AgentError::NoTargets(_)) => Vec::new(),
                Err(e) => {
                    tracing::warn!(error = %e, round, "crash-loop: selection failed; skipping this round");
                    Vec::new()
                }
            };
            if cancel.is_cancelled() {
                return;
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

fn describe_selector(sel: &ProcessTarget) -> String {
    format!("{{{}}}", sel.describe())
}

impl FaultDriver for ProcessDriver {
    fn kind(&self) -> &'static str {
        "process"
    }

    fn capability(&self) -> Capability {
        let root = nix::unistd::geteuid().is_root();
        Capability {
            kind: "process",
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

    fn plan(&self, spec: &FaultSpec) -> Result<Plan, AgentError> {
        let FaultSpec::Process(p) = spec else {
            return Err(AgentError::Internal(
                "process driver given another kind".into(),
            ));
        };
        let matched = self.select(&p.target)?;
        let seed = p.seed.unwrap_or_else(rand::random);
        let targets = Self::pick(matched, p.target.pick, seed);
        let plan = ProcessPlan {
            action: p.action,
            targets,
            seed,
        };
        Ok(Plan {
            target: list(&plan.targets),
            revert: serde_json::to_value(&plan).map_err(|e| AgentError::Internal(e.to_string()))?,
        })
    }

    fn apply(self: Arc<Self>, ctx: ApplyCtx) -> BoxFut<Result<Applied, String>> {
        Box::pin(async move {
            let FaultSpec::Process(spec) = ctx.spec else {
                return Err("process driver given another kind".to_string());
            };
            let plan: ProcessPlan =
                serde_json::from_value(ctx.plan).map_err(|e| format!("bad plan: {e}"))?;
            self.apply_plan(spec, plan, ctx.cancel).await
        })
    }

    fn revert(self: Arc<Self>, plan: serde_json::Value) -> BoxFut<Result<(), RevertError>> {
        Box::pin(async move {
            let plan: ProcessPlan =
                serde_json::from_value(plan.clone()).map_err(|e| RevertError {
                    message: format!("unreadable process plan in the journal: {e}"),
                    leftover: format!("unknown: check the processes recorded in {plan}"),
                })?;
            self.revert_plan(plan).await
        })
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::policy::PolicyFile;
    use crate::sys::ProcStat;
    use nix::errno::Errno;
    use std::collections::BTreeMap;
    use std::io;

    /// A process table in memory that records every signal and applies its effect.
    #[derive(Default)]
    pub struct FakeProcs {
        pub table: Mutex<BTreeMap<u32, (ProcStat, String)>>,
        pub signals: Mutex<Vec<(u32, i32)>>,
        /// Signals these pids ignore (SIGSTOP never takes, SIGKILL never kills).
        pub stubborn: Mutex<Vec<u32>>,
        /// Called before each signal takes effect (tests check the journal here).
        #[allow(clippy::type_complexity)]
        pub hook: Mutex<Option<Box<dyn Fn(u32, i32) + Send>>>,
    }

    impl FakeProcs {
        pub fn add(&self, pid: u32, comm: &str, cmdline: &str) {
            self.table.lock().unwrap().insert(
                pid,
                (
                    ProcStat {
                        pid,
                        comm: comm.into(),
                        state: 'S',
                        ppid: 1,
                        flags: 0,
                        start_time: pid as u64 * 10,
                    },
                    cmdline.into(),
                ),
            );
        }
        pub fn state(&self, pid: u32) -> Option<char> {
            self.table.lock().unwrap().get(&pid).map(|(s, _)| s.state)
        }
    }

    impl Processes for FakeProcs {
        fn pids(&self) -> io::Result<Vec<u32>> {
            Ok(self.table.lock().unwrap().keys().copied().collect())
        }
        fn stat(&self, pid: u32) -> io::Result<Option<ProcStat>> {
            Ok(self.table.lock().unwrap().get(&pid).map(|(s, _)| s.clone()))
        }
        fn cmdline(&self, pid: u32) -> io::Result<Option<Vec<String>>> {
            Ok(self
                .table
                .lock()
                .unwrap()
                .get(&pid)
                .map(|(_, c)| c.split(' ').map(String::from).collect()))
        }
        fn cgroup(&self, _pid: u32) -> io::Result<Option<String>> {
            Ok(Some("/test.slice".into()))
        }
        fn signal(&self, pid: u32, sig: i32) -> Result<(), Errno> {
            if let Some(h) = self.hook.lock().unwrap().as_ref() {
                h(pid, sig);
            }
            self.signals.lock().unwrap().push((pid, sig));
            if self.stubborn.lock().unwrap().contains(&pid) {
                return Ok(());
            }
            let mut t = self.table.lock().unwrap();
            let Some((s, _)) = t.get_mut(&pid) else {
                return Err(Errno::ESRCH);
            };
            match sig {
                SIGSTOP => s.state = 'T',
                SIGCONT => s.state = 'S',
                _ => {
                    t.remove(&pid);
                }
            }
            Ok(())
        }
        fn self_pid(&self) -> u32 {
            4
        }
    }

    pub struct NoGpus;
    impl GpuQuery for NoGpus {
        fn list(&self) -> Result<Vec<crate::sys::gpu::GpuInfo>, String> {
            Err("no NVIDIA driver".into())
        }
        fn processes_on(&self, _: &gpuchaos_proto::spec::GpuRef) -> Result<Vec<u32>, String> {
            Err("no NVIDIA driver".into())
        }
    }

    pub fn driver(procs: Arc<FakeProcs>) -> Arc<ProcessDriver> {
        Arc::new(ProcessDriver::new(
            procs,
            Arc::new(NoGpus),
            Arc::new(Policy::new(PolicyFile::default()).unwrap()),
        ))
    }

    fn spec(yaml: &str) -> FaultSpec {
        FaultSpec::from_yaml_multi(yaml).unwrap().remove(0)
    }

    pub fn workers() -> Arc<FakeProcs> {
        let p = Arc::new(FakeProcs::default());
        p.add(1, "init", "/sbin/init");
        p.add(4, "gpuchaos-agent", "gpuchaos-agent");
        for pid in 100..110 {
            p.add(
                pid,
                "vllm-worker",
                &format!("python -m vllm.worker --rank {}", pid - 100),
            );
        }
        p.add(200, "sshd", "/usr/sbin/sshd -D");
        p
    }

    #[test]
    fn selection_by_name_cmdline_and_seeded_pick() {
        let d = driver(workers());
        let all = d
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

    fn as_process(s: &FaultSpec) -> &ProcessSpec {
        let FaultSpec::Process(p) = s else {
            panic!("not a process spec")
        };
        p
    }
}

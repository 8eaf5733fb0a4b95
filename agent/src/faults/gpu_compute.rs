//! The `gpu_compute` kind: keep a share of chosen GPUs' time busy (a noisy neighbour),
//! through the CUDA driver API, in helper children that die with the agent.
//!
//! Plan: NVML lists the GPUs; a GPU that does not exist, a load above the policy's
//! `max_gpu_compute_percent`, a GPU in MIG mode, in PROHIBITED compute mode, or in
//! EXCLUSIVE_PROCESS mode with a workload on it are refused before anything runs.
//! Apply: one helper per GPU (`gpuchaos-agent __gpu-helper --compute`, see
//! [`crate::gpu_helper::compute`]) loads the spin kernel from PTX text and runs a duty
//! cycle of short kernels (at most 2 ms each) on every SM, measured with CUDA events.
//! The fault is active once both figures show the load over the last second: the
//! helper's own kernel timings (within 5% of the target) and NVML's utilization (at
//! least the target less 5%: other workloads can only add to it). With `ramp`, the
//! load rises in steps, the first verified. Revert tells the helpers to stop (they
//! stop after the kernel in flight), kills any that do not exit at once, and checks
//! that no process carrying the fault's token is left. A helper dies with the agent
//! (PR_SET_PDEATHSIG); start-up recovery kills any helper still carrying the token of
//! a fault the journal holds open.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpuchaos_proto::spec::GpuComputeSpec;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::Mutex as AsyncMutex;
use tokio_util::sync::CancellationToken;

use super::gpus::{kill_strays, select, support, token};
use super::{Applied, KindDriver, Planned, RevertError, Support};
use crate::error::AgentError;
use crate::policy::Policy;
use crate::sys::gpu::GpuQuery;

/// How long a helper may take to load the driver, JIT the kernel and run a first one.
const HELPER_READY: Duration = Duration::from_secs(60);
/// How long the load may take to show, in the helper's timings and in NVML.
const VERIFY_WITHIN: Duration = Duration::from_secs(15);
/// How long a helper may take to stop and exit before it is killed.
const HELPER_EXIT: Duration = Duration::from_secs(1);
/// How long revert waits for every process with the token to be gone.
const GONE_WITHIN: Duration = Duration::from_secs(5);
/// The achieved share must be within this share of the target.
pub const TOLERANCE: f64 = 0.05;
/// NVML's longest sample period: a load shows fully only after this long.
const NVML_PERIOD: Duration = Duration::from_secs(1);
/// One ramp step every this long (2 to 20 steps).
const RAMP_STEP: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputeGoal {
    pub index: u32,
    pub uuid: String,
}

/// The journaled plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComputePlan {
    /// Names the helpers (`--token`), so that recovery can find them.
    pub token: String,
    pub gpus: Vec<ComputeGoal>,
    pub percent: f64,
    pub ramp_ms: Option<u64>,
}

/// What a helper last said about its kernels.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HelperStats {
    pub target: f64,
    pub share: f64,
    pub window_ms: f64,
    pub kernels: u64,
    pub kernel_ms: f64,
    /// Why the helper stopped (it exited, or said `fatal`).
    pub ended: Option<String>,
}

/// Parses a `stats …` line into `into` (false when it is not one).
pub fn parse_stats(line: &str, into: &mut HelperStats) -> bool {
    let Some(rest) = line.strip_prefix("stats ") else {
        return false;
    };
    for kv in rest.split_whitespace() {
        let Some((k, v)) = kv.split_once('=') else {
            continue;
        };
        let Ok(x) = v.parse::<f64>() else { continue };
        match k {
            "target" => into.target = x,
            "share" => into.share = x,
            "window_ms" => into.window_ms = x,
            "kernels" => into.kernels = x as u64,
            "kernel_ms" => into.kernel_ms = x,
            _ => {}
        }
    }
    true
}

/// The launch shape a helper reported when ready.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shape {
    pub sms: u64,
    pub clock_khz: u64,
    pub blocks: u64,
    pub threads: u64,
}

/// Parses `ready sms=… clock_khz=… blocks=… threads=…`.
pub fn parse_ready(line: &str) -> Option<Shape> {
    let rest = line.strip_prefix("ready ")?;
    let mut s = Shape::default();
    for kv in rest.split_whitespace() {
        let (k, v) = kv.split_once('=')?;
        let v: u64 = v.parse().ok()?;
        match k {
            "sms" => s.sms = v,
            "clock_khz" => s.clock_khz = v,
            "blocks" => s.blocks = v,
            "threads" => s.threads = v,
            _ => {}
        }
    }
    (s.sms > 0 && s.blocks > 0).then_some(s)
}

/// Whether an achieved share (percent) is within [`TOLERANCE`] of the target.
pub fn within(achieved: f64, target: f64) -> bool {
    (achieved - target).abs() <= target * TOLERANCE + 1e-9
}

/// Whether NVML's utilization (whole percent) carries the load: at least the target
/// less the tolerance (other workloads only add to it).
pub fn nvml_carries(util: u32, target: f64) -> bool {
    util as f64 + 0.5 >= target * (1.0 - TOLERANCE)
}

/// The load of ramp step `k` of `steps` (1-based).
pub fn step_load(percent: f64, k: u64, steps: u64) -> f64 {
    percent * k as f64 / steps as f64
}

/// The ramp's steps: one per [`RAMP_STEP`], 2 to 20; 1 without a ramp.
pub fn ramp_steps(ramp_ms: Option<u64>) -> u64 {
    ramp_ms
        .map(|r| (r / RAMP_STEP.as_millis() as u64).clamp(2, 20))
        .unwrap_or(1)
}

struct Helper {
    pid: u32,
    shape: Shape,
    child: AsyncMutex<Child>,
    stdin: AsyncMutex<Option<ChildStdin>>,
    stats: Arc<Mutex<HelperStats>>,
}

impl Helper {
    async fn send(&self, line: &str) -> Result<(), String> {
        let mut stdin = self.stdin.lock().await;
        let w = stdin.as_mut().ok_or("the helper's input is closed")?;
        w.write_all(format!("{line}\n").as_bytes())
            .await
            .map_err(|e| format!("writing to the helper (pid {}): {e}", self.pid))
    }

    fn stats(&self) -> HelperStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Stops at once (the helper finishes the kernel in flight, at most a few ms),
    /// killed if it has not exited within [`HELPER_EXIT`].
    async fn stop(&self) {
        if let Some(mut stdin) = self.stdin.lock().await.take() {
            let _ = stdin.write_all(b"exit\n").await;
        }
        let mut child = self.child.lock().await;
        match tokio::time::timeout(HELPER_EXIT, child.wait()).await {
            Ok(status) => {
                tracing::debug!(pid = self.pid, status = ?status, "GPU compute helper exited")
            }
            Err(_) => {
                tracing::warn!(
                    pid = self.pid,
                    "GPU compute helper did not exit: killing it"
                );
                // SIGKILL, then a bounded wait: a helper stuck in the driver (state D,
                // as a real Xid can leave it) must not hold the revert; the agent's
                // check for processes carrying the token reports what is left.
                let _ = child.start_kill();
                if tokio::time::timeout(HELPER_EXIT, child.wait())
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        pid = self.pid,
                        "GPU compute helper still not gone after SIGKILL (stuck in the driver?)"
                    );
                }
            }
        }
    }
}

pub struct GpuComputeDriver {
    gpus: Arc<dyn GpuQuery>,
    policy: Arc<Policy>,
    cuda_lib: Option<PathBuf>,
    /// Whether libcuda loads and can run kernels, found at start-up.
    cuda: Result<(), String>,
    helpers: Mutex<HashMap<String, Vec<Arc<Helper>>>>,
    /// The load each planned or active fault puts on each GPU (by token, until its
    /// revert): the policy's maximum holds for all of them together, not per fault.
    loads: Mutex<HashMap<String, (Vec<String>, f64)>>,
}

impl GpuComputeDriver {
    pub fn new(gpus: Arc<dyn GpuQuery>, policy: Arc<Policy>, cuda_lib: Option<PathBuf>) -> Self {
        let cuda =
            crate::sys::cuda::Cuda::open(cuda_lib.as_deref()).and_then(|c| c.can_run_kernels());
        GpuComputeDriver {
            gpus,
            policy,
            cuda_lib,
            cuda,
            helpers: Mutex::new(HashMap::new()),
            loads: Mutex::new(HashMap::new()),
        }
    }

    async fn spawn_helper(&self, goal: &ComputeGoal, token: &str) -> Result<Helper, String> {
        // /proc/self/exe: it still runs after the binary was upgraded on disk.
        let mut cmd = tokio::process::Command::new("/proc/self/exe");
        cmd.arg(crate::gpu_helper::ARG)
            .arg("--compute")
            .args(["--uuid", &goal.uuid, "--token", token])
            .args(["--parent", &std::process::id().to_string()]);
        if let Some(lib) = &self.cuda_lib {
            cmd.arg("--cuda-lib").arg(lib);
        }
        // Spawned from a runtime worker thread, which lives as long as the agent:
        // the helper's death signal follows the thread that forked it.
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start the GPU compute helper: {e}"))?;
        let pid = child.id().unwrap_or(0);
        tracing::debug!(argv = ?cmd.as_std(), pid, "GPU compute helper started");
        let stdout = child.stdout.take().ok_or("no helper stdout")?;
        let stdin = child.stdin.take();
        let mut lines = BufReader::new(stdout).lines();
        let first = match tokio::time::timeout(HELPER_READY, lines.next_line()).await {
            Ok(Ok(Some(l))) => l,
            Ok(Ok(None)) => {
                let status = child.wait().await.ok();
                return Err(format!(
                    "the helper (pid {pid}) exited before it was ready{}",
                    status.map(|s| format!(" ({s})")).unwrap_or_default()
                ));
            }
            Ok(Err(e)) => return Err(format!("reading from the helper: {e}")),
            Err(_) => return Err(format!("the helper did not start within {HELPER_READY:?}")),
        };
        let shape = match (parse_ready(&first), first.split_once(' ')) {
            (Some(s), _) => s,
            (None, Some(("fatal", why))) => return Err(why.to_string()),
            _ => return Err(format!("unexpected answer from the helper: {first:?}")),
        };
        let stats = Arc::new(Mutex::new(HelperStats::default()));
        let s = Arc::clone(&stats);
        // Every line after `ready`: stats, acknowledgements, a fatal error, the end.
        tokio::spawn(async move {
            loop {
                match lines.next_line().await {
                    Ok(Some(l)) => {
                        let Ok(mut st) = s.lock() else { return };
                        if !parse_stats(&l, &mut st) {
                            if let Some(why) = l.strip_prefix("fatal ") {
                                st.ended = Some(why.to_string());
                            } else if !l.starts_with("ok ") {
                                tracing::debug!(pid, line = %l, "GPU compute helper");
                            }
                        }
                    }
                    _ => {
                        if let Ok(mut st) = s.lock() {
                            st.ended
                                .get_or_insert_with(|| format!("the helper (pid {pid}) exited"));
                        }
                        return;
                    }
                }
            }
        });
        Ok(Helper {
            pid,
            shape,
            child: AsyncMutex::new(child),
            stdin: AsyncMutex::new(stdin),
            stats,
        })
    }

    /// NVML's utilization of a GPU, or why it cannot say.
    fn nvml_util(&self, uuid: &str) -> Result<u32, String> {
        self.gpus.utilization(uuid)
    }

    /// Each GPU's figures, for the fault's details.
    fn figures(
        &self,
        plan: &ComputePlan,
        helpers: &[Arc<Helper>],
        target: f64,
    ) -> Vec<serde_json::Value> {
        plan.gpus
            .iter()
            .zip(helpers)
            .map(|(g, h)| {
                let st = h.stats();
                let nvml = self.nvml_util(&g.uuid);
                let mut d = serde_json::json!({
                    "index": g.index,
                    "uuid": g.uuid,
                    "target_percent": target,
                    "achieved_percent": st.share,
                    "window_ms": st.window_ms,
                    "kernels_in_window": st.kernels,
                    "kernel_ms": st.kernel_ms,
                    "within_tolerance": within(st.share, target),
                    "helper_pid": h.pid,
                    "sms": h.shape.sms,
                    "clock_khz": h.shape.clock_khz,
                    "blocks": h.shape.blocks,
                    "threads_per_block": h.shape.threads,
                });
                match nvml {
                    Ok(u) => d["nvml_utilization_percent"] = serde_json::json!(u),
                    Err(e) => {
                        d["nvml_utilization_percent"] = serde_json::Value::Null;
                        d["nvml_note"] = serde_json::json!(e);
                    }
                }
                if let Some(why) = &st.ended {
                    d["drift"] =
                        serde_json::json!(format!("the helper stopped: {why}; the load is gone"));
                }
                d
            })
            .collect()
    }

    /// Waits until every helper's timings and NVML show `target`, or fails with the
    /// figures. Where NVML cannot report utilization, the timings alone decide (and
    /// the details say so).
    async fn verify(
        &self,
        plan: &ComputePlan,
        helpers: &[Arc<Helper>],
        target: f64,
        cancel: &CancellationToken,
    ) -> Result<Duration, String> {
        let began = tokio::time::Instant::now();
        loop {
            let mut ok = true;
            let mut why = Vec::new();
            for (g, h) in plan.gpus.iter().zip(helpers) {
                let st = h.stats();
                if let Some(e) = &st.ended {
                    return Err(format!("GPU {} ({}): {e}", g.index, g.uuid));
                }
                // The helper's share over a window as long as NVML's period, at the
                // load asked for now.
                let settled = st.window_ms + 1.0 >= NVML_PERIOD.as_millis() as f64
                    && (st.target - target).abs() < 1e-6;
                let timed = settled && within(st.share, target);
                let nvml = self.nvml_util(&g.uuid);
                let shown = match &nvml {
                    Ok(u) => nvml_carries(*u, target),
                    Err(_) => true,
                };
                if !(timed && shown) {
                    ok = false;
                    why.push(format!(
                        "GPU {} ({}): the helper's kernels ran {:.1}% of the last {:.0} ms, NVML shows {}",
                        g.index,
                        g.uuid,
                        st.share,
                        st.window_ms,
                        match nvml {
                            Ok(u) => format!("{u}% utilization"),
                            Err(e) => format!("no utilization ({e})"),
                        }
                    ));
                }
            }
            if ok {
                return Ok(began.elapsed());
            }
            let last = why.join("; ");
            if began.elapsed() > VERIFY_WITHIN {
                return Err(format!(
                    "the load of {target}% did not show within {VERIFY_WITHIN:?}: {last} (another workload holding the GPU in EXCLUSIVE mode, or a slow JIT?)"
                ));
            }
            tokio::select! {
                _ = cancel.cancelled() => return Err(format!("stopped before the load showed ({last})")),
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    async fn apply_plan(
        self: Arc<Self>,
        plan: ComputePlan,
        cancel: CancellationToken,
    ) -> Result<Applied, String> {
        let steps = ramp_steps(plan.ramp_ms);
        let first = step_load(plan.percent, 1, steps);
        self.helpers
            .lock()
            .map_err(|_| "helper table poisoned")?
            .insert(plan.token.clone(), Vec::new());
        let mut helpers = Vec::new();
        for goal in &plan.gpus {
            let label = format!("GPU {} ({})", goal.index, goal.uuid);
            // A revert, an expiry or a lapsed lease stops a slow start at once; the
            // helper, dropped, is killed (kill_on_drop).
            let h = tokio::select! {
                _ = cancel.cancelled() => return Err(format!("{label}: stopped before the load started")),
                h = self.spawn_helper(goal, &plan.token) => h.map_err(|e| format!("{label}: {e}"))?,
            };
            let h = Arc::new(h);
            if let Ok(mut m) = self.helpers.lock()
                && let Some(v) = m.get_mut(&plan.token)
            {
                v.push(Arc::clone(&h));
            }
            h.send(&format!("load {first}"))
                .await
                .map_err(|e| format!("{label}: {e}"))?;
            helpers.push(h);
        }
        let took = self.verify(&plan, &helpers, first, &cancel).await?;
        let ramp = plan.ramp_ms.map(Duration::from_millis);
        let details = Arc::new(Mutex::new(serde_json::json!({
            "load": format!("{}% of the time on {} GPU(s)", plan.percent, plan.gpus.len()),
            "ramp": ramp.map(|r| format!("{steps} steps over {}", humantime::format_duration(r))),
            "ramp_step": 1,
            "verified_after_ms": took.as_millis() as u64,
            "gpus": self.figures(&plan, &helpers, first),
        })));
        let me = Arc::clone(&self);
        let d = Arc::clone(&details);
        let background = tokio::spawn(async move {
            let mut step = 1;
            let interval = ramp.map(|r| r / steps as u32);
            let mut target = first;
            loop {
                let wait = match interval {
                    Some(i) if step < steps => i,
                    _ => Duration::from_secs(1),
                };
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                if interval.is_some() && step < steps {
                    step += 1;
                    target = step_load(plan.percent, step, steps);
                    for h in &helpers {
                        if let Err(e) = h.send(&format!("load {target}")).await {
                            tracing::warn!(error = %e, "gpu_compute ramp step failed");
                        }
                    }
                    if let Ok(mut d) = d.lock() {
                        d["ramp_step"] = serde_json::json!(step);
                    }
                    if step == steps {
                        // The ramp is done: the whole load must show.
                        let r = tokio::select! {
                            _ = cancel.cancelled() => return,
                            r = me.verify(&plan, &helpers, target, &cancel) => r,
                        };
                        if let (Err(e), Ok(mut d)) = (r, d.lock()) {
                            tracing::warn!(error = %e, "gpu_compute ramp ended short of its load");
                            d["verify_error"] = serde_json::json!(e);
                        }
                    }
                }
                let figures = me.figures(&plan, &helpers, target);
                if let Ok(mut d) = d.lock() {
                    d["gpus"] = serde_json::json!(figures);
                }
            }
        });
        Ok(Applied {
            details,
            observations: None,
            background: Some(background),
        })
    }

    async fn revert_plan(&self, plan: ComputePlan) -> Result<(), RevertError> {
        let helpers = self
            .helpers
            .lock()
            .ok()
            .and_then(|mut m| m.remove(&plan.token))
            .unwrap_or_default();
        if let Ok(mut l) = self.loads.lock() {
            l.remove(&plan.token);
        }
        // Every helper told at once; each stops after the kernel in flight.
        futures_util::future::join_all(helpers.iter().map(|h| h.stop())).await;
        // Helpers this agent no longer knows of (a previous run's, if the death
        // signal could not act): kill them by their token.
        if let Err(left) = kill_strays(&plan.token, GONE_WITHIN, "GPU compute helper").await {
            let pids = left
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(" ");
            return Err(RevertError {
                message: format!("GPU compute helpers {left:?} did not exit"),
                leftover: format!(
                    "compute load by pids {left:?} on {}: kill -9 {pids}",
                    plan.gpus
                        .iter()
                        .map(|g| format!("GPU {}", g.index))
                        .collect::<Vec<_>>()
                        .join(", "),
                ),
            });
        }
        Ok(())
    }
}

impl KindDriver for GpuComputeDriver {
    type Spec = GpuComputeSpec;
    type Plan = ComputePlan;

    fn capability(&self) -> Support {
        support(self.gpus.as_ref(), &self.cuda)
    }

    fn plan(&self, g: &GpuComputeSpec) -> Result<Planned<ComputePlan>, AgentError> {
        let list = self.gpus.list().map_err(AgentError::Unsupported)?;
        let chosen = select(&list, &g.target.gpus)?;
        let max = self.policy.file.max_gpu_compute_percent;
        let mut goals = Vec::new();
        for gpu in chosen {
            let label = format!("GPU {} ({})", gpu.index, gpu.uuid);
            if g.load.percent > max + 1e-9 {
                return Err(AgentError::Refused(format!(
                    "load {}% on {label}: the policy allows at most {max}% (max_gpu_compute_percent)",
                    g.load.percent
                )));
            }
            let already: f64 = self
                .loads
                .lock()
                .map(|l| {
                    l.values()
                        .filter(|(uuids, _)| uuids.contains(&gpu.uuid))
                        .map(|(_, p)| p)
                        .sum()
                })
                .unwrap_or(0.0);
            if already + g.load.percent > max + 1e-9 {
                return Err(AgentError::Refused(format!(
                    "load {}% on {label}: other gpu_compute faults already put {already}% on it, and the policy allows at most {max}% in all (max_gpu_compute_percent)",
                    g.load.percent
                )));
            }
            if gpu.mig {
                return Err(AgentError::Unsupported(format!(
                    "{label} is in MIG mode: its SMs belong to MIG instances, and gpu_compute loads whole GPUs only (not yet MIG instances); pick a GPU without MIG"
                )));
            }
            super::gpus::context_possible(gpu, &label)?;
            goals.push(ComputeGoal {
                index: gpu.index,
                uuid: gpu.uuid.clone(),
            });
        }
        let target = goals
            .iter()
            .map(|c| {
                format!(
                    "GPU {} ({}) busy {}% of the time",
                    c.index, c.uuid, g.load.percent
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let token = token();
        if let Ok(mut l) = self.loads.lock() {
            l.insert(
                token.clone(),
                (
                    goals.iter().map(|g| g.uuid.clone()).collect(),
                    g.load.percent,
                ),
            );
        }
        Ok(Planned {
            target,
            plan: ComputePlan {
                token,
                gpus: goals,
                percent: g.load.percent,
                ramp_ms: g.ramp.map(|r| r.0.as_millis() as u64),
            },
        })
    }

    async fn apply(
        self: Arc<Self>,
        _spec: GpuComputeSpec,
        plan: ComputePlan,
        cancel: CancellationToken,
    ) -> Result<Applied, String> {
        self.apply_plan(plan, cancel).await
    }

    async fn revert(self: Arc<Self>, plan: ComputePlan) -> Result<(), RevertError> {
        self.revert_plan(plan).await
    }

    fn unreadable_plan_leftover(&self, plan: &str) -> String {
        format!(
            "unknown: look for `gpuchaos-agent {} --compute` processes (ps -ef) and kill them; the plan was {plan}",
            crate::gpu_helper::ARG
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicyFile;
    use crate::sys::fake::{FakeGpus, NoGpus};
    use gpuchaos_proto::spec::FaultSpec;

    fn spec(yaml: &str) -> GpuComputeSpec {
        match FaultSpec::from_yaml_multi(yaml).unwrap().remove(0) {
            FaultSpec::GpuCompute(g) => g,
            other => panic!("{other:?}"),
        }
    }

    fn driver(gpus: Arc<dyn GpuQuery>, max: Option<f64>) -> GpuComputeDriver {
        let mut file = PolicyFile::default();
        if let Some(m) = max {
            file.max_gpu_compute_percent = m;
        }
        GpuComputeDriver::new(
            gpus,
            Arc::new(Policy::new(file).unwrap()),
            Some("/nonexistent/libcuda.so.1".into()),
        )
    }

    #[test]
    fn plans_each_gpu_named_and_all() {
        let d = driver(Arc::new(FakeGpus::new(2)), None);
        let p = d
            .plan(&spec(
                "kind: gpu_compute\nduration: 1m\ntarget: {gpus: [1, \"GPU-fake-0\", 1]}\nload: {percent: 80}\nramp: 3s\n",
            ))
            .unwrap();
        assert_eq!(
            p.plan.gpus.iter().map(|g| g.index).collect::<Vec<_>>(),
            vec![1, 0],
            "each GPU once, in the order named"
        );
        assert_eq!((p.plan.percent, p.plan.ramp_ms), (80.0, Some(3000)));
        assert_eq!(p.plan.token.len(), 16);
        assert!(
            p.target.contains("GPU 1 (GPU-fake-1) busy 80% of the time"),
            "{}",
            p.target
        );
        let all = d
            .plan(&spec(
                "kind: gpu_compute\nduration: 1m\ntarget: {gpus: all}\nload: {percent: 10}\n",
            ))
            .unwrap();
        assert_eq!(all.plan.gpus.len(), 2);
        assert_ne!(all.plan.token, p.plan.token, "a token per fault");
    }

    #[tokio::test]
    async fn the_policy_maximum_holds_for_all_faults_on_a_gpu_together() {
        let d = driver(Arc::new(FakeGpus::new(2)), None);
        let first = d
            .plan(&spec(
                "kind: gpu_compute\nduration: 1m\ntarget: {gpus: [0]}\nload: {percent: 60}\n",
            ))
            .unwrap();
        let second =
            spec("kind: gpu_compute\nduration: 1m\ntarget: {gpus: [0]}\nload: {percent: 50}\n");
        let e = d
            .plan(&second)
            .expect_err("60% + 50% is over 95%")
            .to_string();
        assert!(e.contains("already put 60% on it"), "{e}");
        // Another GPU is not affected; once the first is reverted the second fits.
        d.plan(&spec(
            "kind: gpu_compute\nduration: 1m\ntarget: {gpus: [1]}\nload: {percent: 50}\n",
        ))
        .unwrap();
        d.revert_plan(first.plan).await.unwrap();
        d.plan(&second).unwrap();
    }

    #[test]
    fn refuses_before_anything_runs() {
        let d = driver(Arc::new(FakeGpus::new(2)), Some(60.0));
        let e = d
            .plan(&spec(
                "kind: gpu_compute\nduration: 1m\ntarget: {gpus: [0]}\nload: {percent: 80}\n",
            ))
            .unwrap_err();
        assert!(matches!(e, AgentError::Refused(_)), "{e:?}");
        assert!(
            e.to_string()
                .contains("at most 60% (max_gpu_compute_percent)"),
            "{e}"
        );
        // The default maximum is 95%.
        let d = driver(Arc::new(FakeGpus::new(2)), None);
        assert!(
            d.plan(&spec(
                "kind: gpu_compute\nduration: 1m\ntarget: {gpus: [0]}\nload: {percent: 100}\n",
            ))
            .is_err_and(|e| e.to_string().contains("at most 95%"))
        );
        let e = d
            .plan(&spec(
                "kind: gpu_compute\nduration: 1m\ntarget: {gpus: [7]}\nload: {percent: 50}\n",
            ))
            .unwrap_err();
        assert!(matches!(e, AgentError::NoTargets(_)), "{e:?}");
        assert!(
            e.to_string().contains(
                "target.gpus: GPU 7 does not exist on this node; it has 0 (GPU-fake-0), 1 (GPU-fake-1)"
            ),
            "{e}"
        );
        let d = driver(Arc::new(NoGpus), None);
        assert!(matches!(
            d.plan(&spec(
                "kind: gpu_compute\nduration: 1m\ntarget: {gpus: [0]}\nload: {percent: 50}\n",
            )),
            Err(AgentError::Unsupported(_))
        ));
    }

    #[test]
    fn no_driver_is_a_capability_with_its_reason() {
        let c = driver(Arc::new(FakeGpus::new(1)), None).capability();
        assert!(!c.supported);
        assert!(c.reason.contains("no CUDA driver"), "{}", c.reason);
        let c = driver(Arc::new(NoGpus), None).capability();
        assert!(
            !c.supported && c.reason.contains("no NVIDIA driver"),
            "{}",
            c.reason
        );
    }

    #[test]
    fn the_helper_protocol_and_the_tolerances() {
        assert_eq!(
            parse_ready("ready sms=132 clock_khz=1500000 blocks=528 threads=128"),
            Some(Shape {
                sms: 132,
                clock_khz: 1_500_000,
                blocks: 528,
                threads: 128
            })
        );
        assert_eq!(parse_ready("ready"), None);
        assert_eq!(parse_ready("fatal cuInit failed"), None);
        let mut st = HelperStats::default();
        assert!(parse_stats(
            "stats target=90.00 share=89.71 window_ms=1000 kernels=460 kernel_ms=1.952",
            &mut st
        ));
        assert_eq!(
            (st.target, st.share, st.window_ms, st.kernels, st.kernel_ms),
            (90.0, 89.71, 1000.0, 460, 1.952)
        );
        assert!(!parse_stats("ok load 90", &mut st));
        assert!(within(86.0, 90.0) && !within(85.0, 90.0) && within(94.5, 90.0));
        assert!(within(52.4, 50.0) && !within(52.6, 50.0));
        assert!(nvml_carries(86, 90.0) && nvml_carries(100, 90.0) && !nvml_carries(84, 90.0));
        assert_eq!(ramp_steps(None), 1);
        assert_eq!(ramp_steps(Some(3000)), 6);
        assert_eq!(ramp_steps(Some(200)), 2);
        assert_eq!(ramp_steps(Some(60_000)), 20);
        assert_eq!(step_load(90.0, 1, 6), 15.0);
        assert_eq!(step_load(90.0, 6, 6), 90.0);
    }

    #[test]
    fn the_plan_journals_what_revert_needs() {
        // Revert reads nothing but the plan: the token finds the helpers.
        let plan = ComputePlan {
            token: "00000000000000ab".into(),
            gpus: vec![ComputeGoal {
                index: 0,
                uuid: "GPU-x".into(),
            }],
            percent: 90.0,
            ramp_ms: None,
        };
        let json = serde_json::to_value(&plan).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"token": "00000000000000ab", "gpus": [{"index": 0, "uuid": "GPU-x"}], "percent": 90.0, "ramp_ms": null})
        );
        assert_eq!(serde_json::from_value::<ComputePlan>(json).unwrap(), plan);
        assert!(crate::faults::gpus::stray_helpers("00000000000000ab").is_empty());
    }
}

//! The `gpu_memory` kind: hold GPU memory precisely, through the CUDA driver API, in
//! helper children that die with the agent.
//!
//! Plan: NVML (nvml-wrapper) reads each GPU's total and used memory, and the fill
//! turns into a used-memory target; a target the policy forbids, or one that does not
//! fit in the free memory, is refused before anything runs, saying how much would.
//! Apply: one helper per GPU (`gpuchaos-agent __gpu-helper`, see [`crate::gpu_helper`])
//! creates a CUDA context, then the agent reads NVML again, so that the context's own
//! cost counts towards the target, and asks the helper for the rest (at once, or in
//! steps over `ramp`). The fault is active when NVML shows the memory (the helper's
//! process entry). Revert tells the helpers to free and exit, kills any that do not,
//! and checks that no process carrying the fault's token is left. A helper dies with the agent (PR_SET_PDEATHSIG), so the driver frees its
//! memory even after a SIGKILL; start-up recovery kills any helper still carrying
//! the fault's token.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpuchaos_proto::spec::{ByteSize, GpuMemorySpec, GpuRef};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::Mutex as AsyncMutex;
use tokio_util::sync::CancellationToken;

use super::gpus::{kill_strays, select, support, token};
use super::{Applied, KindDriver, Planned, RevertError, Support};
use crate::error::AgentError;
use crate::policy::Policy;
use crate::sys::gpu::{GpuInfo, GpuQuery};

/// How long a helper may take to load the driver and create its context.
const HELPER_READY: Duration = Duration::from_secs(60);
/// How long one allocation command may take.
const HELPER_GROW: Duration = Duration::from_secs(120);
/// How long a helper may take to free and exit before it is killed.
const HELPER_EXIT: Duration = Duration::from_secs(10);
/// Achieved within this share of the target counts as reached.
const TOLERANCE: f64 = 0.01;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuGoal {
    pub index: u32,
    pub uuid: String,
    pub total: u64,
    pub used_before: u64,
    pub target_used: u64,
}

/// The journaled plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuPlan {
    /// Names the helpers (`--token`), so that recovery can find them.
    pub token: String,
    pub gpus: Vec<GpuGoal>,
    pub ramp_ms: Option<u64>,
}

struct Helper {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: tokio::io::Lines<BufReader<ChildStdout>>,
    pid: u32,
}

impl Helper {
    async fn line(&mut self, timeout: Duration) -> Result<String, String> {
        match tokio::time::timeout(timeout, self.stdout.next_line()).await {
            Ok(Ok(Some(l))) => Ok(l),
            Ok(Ok(None)) => {
                let status = self.child.wait().await.ok();
                Err(format!(
                    "the helper (pid {}) exited{}",
                    self.pid,
                    status.map(|s| format!(" ({s})")).unwrap_or_default()
                ))
            }
            Ok(Err(e)) => Err(format!("reading from the helper: {e}")),
            Err(_) => Err(format!("the helper did not answer within {timeout:?}")),
        }
    }

    /// Asks for `bytes` more; returns what the helper holds in all.
    async fn grow(&mut self, bytes: u64) -> Result<u64, String> {
        let stdin = self.stdin.as_mut().ok_or("the helper's input is closed")?;
        stdin
            .write_all(format!("grow {bytes}\n").as_bytes())
            .await
            .map_err(|e| format!("writing to the helper: {e}"))?;
        let answer = self.line(HELPER_GROW).await?;
        let mut w = answer.split_whitespace();
        let word = w.next().unwrap_or("");
        let held: u64 = w.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        let rest: Vec<&str> = w.collect();
        match word {
            "ok" => Ok(held),
            "oom" => Err(format!(
                "out of memory ({}): the helper could hold {} of the {} asked for; that is the most possible now (something else allocated since the plan, or the driver keeps the rest for itself): use a smaller fill",
                rest.join(" "),
                ByteSize(held),
                ByteSize(bytes)
            )),
            _ => Err(format!("the helper failed: {}", rest.join(" "))),
        }
    }

    /// Frees and exits (killed if it does not within the grace).
    async fn stop(mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"exit\n").await;
        }
        match tokio::time::timeout(HELPER_EXIT, self.child.wait()).await {
            Ok(status) => tracing::debug!(pid = self.pid, status = ?status, "GPU helper exited"),
            Err(_) => {
                tracing::warn!(pid = self.pid, "GPU helper did not exit: killing it");
                // Bounded: a helper stuck in the driver must not hold the revert (the
                // check for processes carrying the token reports it).
                let _ = self.child.start_kill();
                if tokio::time::timeout(HELPER_EXIT, self.child.wait())
                    .await
                    .is_err()
                {
                    tracing::warn!(pid = self.pid, "GPU helper still not gone after SIGKILL");
                }
            }
        }
    }
}

/// A GPU's helper, shared by the ramp task and revert (None once stopped).
type HelperSlot = Arc<AsyncMutex<Option<Helper>>>;

pub struct GpuMemoryDriver {
    gpus: Arc<dyn GpuQuery>,
    policy: Arc<Policy>,
    cuda_lib: Option<PathBuf>,
    /// Whether libcuda loads, found at start-up.
    cuda: Result<(), String>,
    helpers: Mutex<HashMap<String, Vec<HelperSlot>>>,
}

impl GpuMemoryDriver {
    pub fn new(gpus: Arc<dyn GpuQuery>, policy: Arc<Policy>, cuda_lib: Option<PathBuf>) -> Self {
        let cuda = crate::sys::cuda::Cuda::open(cuda_lib.as_deref()).map(|_| ());
        GpuMemoryDriver {
            gpus,
            policy,
            cuda_lib,
            cuda,
            helpers: Mutex::new(HashMap::new()),
        }
    }

    fn used_of(&self, uuid: &str) -> Result<GpuInfo, String> {
        self.gpus
            .list()?
            .into_iter()
            .find(|g| g.uuid == uuid)
            .ok_or_else(|| format!("NVML no longer lists {uuid}"))
    }

    async fn spawn_helper(&self, uuid: &str, token: &str) -> Result<Helper, String> {
        // /proc/self/exe, not the path: it still runs after the binary was upgraded
        // on disk.
        let mut cmd = tokio::process::Command::new("/proc/self/exe");
        cmd.arg(crate::gpu_helper::ARG)
            .args(["--uuid", uuid, "--token", token])
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
            .map_err(|e| format!("cannot start the GPU helper: {e}"))?;
        let pid = child.id().unwrap_or(0);
        tracing::debug!(argv = ?cmd.as_std(), pid, "GPU helper started");
        let stdout = child.stdout.take().ok_or("no helper stdout")?;
        let mut h = Helper {
            stdin: child.stdin.take(),
            stdout: BufReader::new(stdout).lines(),
            child,
            pid,
        };
        let first = h.line(HELPER_READY).await?;
        match first.split_once(' ') {
            _ if first == "ready" => Ok(h),
            Some(("fatal", why)) => Err(why.to_string()),
            _ => Err(format!("unexpected answer from the helper: {first:?}")),
        }
    }

    /// Starts one GPU's helper, and fills to the first step. Returns the helper and
    /// the details (used after the context, held).
    async fn start_gpu(
        &self,
        goal: &GpuGoal,
        token: &str,
        steps: u64,
        cancel: &CancellationToken,
    ) -> Result<(Helper, serde_json::Value, u64), String> {
        let label = format!("GPU {} ({})", goal.index, goal.uuid);
        // A revert, an expiry or a lapsed lease stops a slow start at once; the
        // helper, dropped, is killed (kill_on_drop) and its memory goes with it.
        let stopped = || format!("{label}: stopped before the memory was held");
        let mut h = tokio::select! {
            _ = cancel.cancelled() => return Err(stopped()),
            h = self.spawn_helper(&goal.uuid, token) => h.map_err(|e| format!("{label}: {e}"))?,
        };
        let after_ctx = self
            .used_of(&goal.uuid)
            .map_err(|e| format!("{label}: {e}"))?
            .used;
        let context = after_ctx.saturating_sub(goal.used_before);
        if after_ctx > goal.target_used + tolerance(goal.target_used) {
            h.stop().await;
            return Err(format!(
                "{label}: the target ({} in use) is below what the GPU uses once a CUDA context is made ({}; the context alone costs about {}): use a larger fill",
                ByteSize(goal.target_used),
                ByteSize(after_ctx),
                ByteSize(context)
            ));
        }
        let need = goal.target_used.saturating_sub(after_ctx);
        let first = need / steps + need % steps;
        let held = if first > 0 {
            let grown = tokio::select! {
                _ = cancel.cancelled() => return Err(stopped()),
                g = h.grow(first) => g,
            };
            match grown {
                Ok(held) => held,
                Err(e) => {
                    h.stop().await;
                    return Err(format!("{label}: {e}"));
                }
            }
        } else {
            0
        };
        let details = serde_json::json!({
            "index": goal.index,
            "uuid": goal.uuid,
            "total": goal.total,
            "used_before": goal.used_before,
            "target_used": goal.target_used,
            "target_percent": pct(goal.target_used, goal.total),
            "context": context,
            "after_context": after_ctx,
            "held": held,
            "helper_pid": h.pid,
        });
        Ok((h, details, need))
    }

    async fn apply_plan(
        self: Arc<Self>,
        plan: GpuPlan,
        cancel: CancellationToken,
    ) -> Result<Applied, String> {
        let ramp = plan.ramp_ms.map(Duration::from_millis);
        let steps = ramp
            .map(|r| (r.as_millis() / 500).clamp(2, 20) as u64)
            .unwrap_or(1);
        let mut per_gpu = Vec::new();
        let mut needs = Vec::new();
        let slots: Vec<HelperSlot> = Vec::new();
        self.helpers
            .lock()
            .map_err(|_| "helper table poisoned")?
            .insert(plan.token.clone(), slots);
        for goal in &plan.gpus {
            if cancel.is_cancelled() {
                return Err("stopped before every GPU was filled".into());
            }
            let (h, d, need) = self.start_gpu(goal, &plan.token, steps, &cancel).await?;
            let slot = Arc::new(AsyncMutex::new(Some(h)));
            if let Ok(mut m) = self.helpers.lock()
                && let Some(v) = m.get_mut(&plan.token)
            {
                v.push(Arc::clone(&slot));
            }
            per_gpu.push(d);
            needs.push((slot, need));
        }
        // Read back: NVML shows what the helpers hold.
        self.refresh(&plan, &mut per_gpu, false)?;
        let details = Arc::new(Mutex::new(serde_json::json!({
            "fill": format!("{} of {} GPU(s)", plan.gpus.len(), plan.gpus.len()),
            "ramp": ramp.map(|r| format!("{} steps over {}", steps, humantime::format_duration(r))),
            "gpus": per_gpu,
        })));
        let me = Arc::clone(&self);
        let d = Arc::clone(&details);
        let background = tokio::spawn(async move {
            let mut step = 1;
            let interval = ramp.map(|r| r / steps as u32);
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
                    let last = step == steps;
                    for (k, (slot, need)) in needs.iter().enumerate() {
                        let mut guard = slot.lock().await;
                        let Some(h) = guard.as_mut() else { continue };
                        let r = h.grow(need / steps).await;
                        if let Ok(mut d) = d.lock() {
                            match r {
                                Ok(held) => d["gpus"][k]["held"] = serde_json::json!(held),
                                Err(e) => {
                                    tracing::warn!(error = %e, "gpu_memory ramp step failed");
                                    d["gpus"][k]["ramp_error"] = serde_json::json!(e);
                                }
                            }
                            d["ramp_step"] = serde_json::json!(step);
                        }
                    }
                    if last
                        && let Ok(mut d) = d.lock()
                        && let Some(gpus) = d["gpus"].as_array_mut()
                    {
                        // The ramp is done: the whole target must show now.
                        let mut v = gpus.clone();
                        let r = me.refresh(&plan, &mut v, false);
                        *gpus = v;
                        if let Err(e) = r {
                            tracing::warn!(error = %e, "gpu_memory ramp ended short of its target");
                            d["verify_error"] = serde_json::json!(e);
                        }
                    }
                }
                for (k, (slot, _)) in needs.iter().enumerate() {
                    let mut guard = slot.lock().await;
                    if let Some(h) = guard.as_mut()
                        && let Ok(Some(status)) = h.child.try_wait()
                        && let Ok(mut d) = d.lock()
                    {
                        d["gpus"][k]["drift"] = serde_json::json!(format!(
                            "the helper (pid {}) exited ({status}): its memory was released",
                            h.pid
                        ));
                    }
                }
                if let Ok(mut d) = d.lock()
                    && let Some(gpus) = d["gpus"].as_array_mut()
                {
                    let mut v = gpus.clone();
                    if me.refresh(&plan, &mut v, true).is_ok() {
                        *gpus = v;
                    }
                }
            }
        });
        Ok(Applied {
            details,
            observations: None,
            background: Some(background),
        })
    }

    /// Reads NVML for each GPU into its details: the card's use against the target,
    /// and the helper's own memory. Unless `lenient`, fails when the memory the helper
    /// holds does not show in NVML (its process entry, or, where NVML cannot give
    /// per-process figures, the card's use). Another workload growing or shrinking
    /// moves the card's use; that is reported (`target_reached`), not failed.
    fn refresh(
        &self,
        plan: &GpuPlan,
        per_gpu: &mut [serde_json::Value],
        lenient: bool,
    ) -> Result<(), String> {
        // One NVML listing for every GPU of the fault.
        let list = self.gpus.list()?;
        for (goal, d) in plan.gpus.iter().zip(per_gpu.iter_mut()) {
            let now = list
                .iter()
                .find(|g| g.uuid == goal.uuid)
                .ok_or_else(|| format!("NVML no longer lists {}", goal.uuid))?;
            let held = d["held"].as_u64().unwrap_or(0);
            let pid = d["helper_pid"].as_u64().unwrap_or(0) as u32;
            d["used"] = serde_json::json!(now.used);
            d["achieved_percent"] = serde_json::json!(pct(now.used, now.total));
            d["off_target"] = serde_json::json!(now.used as i64 - goal.target_used as i64);
            d["target_reached"] = serde_json::json!(
                now.used.abs_diff(goal.target_used) <= tolerance(goal.target_used)
            );
            let mine = self
                .gpus
                .process_memory(&GpuRef::Uuid(goal.uuid.clone()))
                .ok()
                .map(|ps| ps.into_iter().find(|(p, _)| *p == pid).map(|(_, m)| m));
            let shown = match mine {
                // NVML lists the helper with its memory (its context included).
                Some(Some(Some(m))) => {
                    d["helper_used"] = serde_json::json!(m);
                    m + tolerance(held) >= held
                }
                Some(None) if held > 0 => false,
                // No per-process figure: the card's use must carry what is held.
                _ => {
                    let after_ctx = d["after_context"].as_u64().unwrap_or(0);
                    now.used + tolerance(after_ctx + held) >= after_ctx + held
                }
            };
            if !lenient && !shown {
                return Err(format!(
                    "GPU {}: the helper (pid {pid}) holds {} but NVML does not show it (card: {} in use): the memory is not where the agent put it",
                    goal.index,
                    ByteSize(held),
                    ByteSize(now.used)
                ));
            }
        }
        Ok(())
    }

    async fn revert_plan(&self, plan: GpuPlan) -> Result<(), RevertError> {
        let slots = self
            .helpers
            .lock()
            .ok()
            .and_then(|mut m| m.remove(&plan.token))
            .unwrap_or_default();
        for slot in slots {
            if let Some(h) = slot.lock().await.take() {
                h.stop().await;
            }
        }
        // Helpers this agent no longer knows of (a previous run's, if the death
        // signal could not act): kill them by their token.
        if let Err(left) = kill_strays(&plan.token, HELPER_EXIT, "GPU helper").await {
            return Err(RevertError {
                message: format!("GPU helpers {left:?} did not exit"),
                leftover: format!(
                    "memory held by pids {left:?} on {}: kill -9 {}",
                    plan.gpus
                        .iter()
                        .map(|g| format!("GPU {}", g.index))
                        .collect::<Vec<_>>()
                        .join(", "),
                    left.iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
            });
        }
        Ok(())
    }
}

fn tolerance(target: u64) -> u64 {
    (target as f64 * TOLERANCE) as u64
}

fn pct(part: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        (part as f64 * 10000.0 / total as f64).round() / 100.0
    }
}

impl KindDriver for GpuMemoryDriver {
    type Spec = GpuMemorySpec;
    type Plan = GpuPlan;

    fn capability(&self) -> Support {
        support(self.gpus.as_ref(), &self.cuda)
    }

    fn plan(&self, g: &GpuMemorySpec) -> Result<Planned<GpuPlan>, AgentError> {
        let list = self.gpus.list().map_err(AgentError::Unsupported)?;
        let chosen = select(&list, &g.target.gpus)?;
        let max = self.policy.file.max_gpu_fill_percent;
        let mut goals = Vec::new();
        for gpu in chosen {
            let target = g.fill.target_used(gpu.total, gpu.used);
            let label = format!("GPU {} ({})", gpu.index, gpu.uuid);
            if gpu.mig {
                return Err(AgentError::Unsupported(format!(
                    "{label} is in MIG mode: its memory belongs to MIG instances, and gpu_memory holds memory on whole GPUs only (not yet on MIG instances); pick a GPU without MIG"
                )));
            }
            super::gpus::context_possible(gpu, &label)?;
            if target <= gpu.used {
                return Err(AgentError::NoTargets(format!(
                    "{label} already uses {} ({:.1}%), at or above the target {}: nothing to hold",
                    ByteSize(gpu.used),
                    pct(gpu.used, gpu.total),
                    ByteSize(target)
                )));
            }
            let need = target - gpu.used;
            if need > gpu.free {
                return Err(AgentError::NoTargets(format!(
                    "{label} has {} free; the target needs {} more: at most {} can be held now (to {:.1}% in use)",
                    ByteSize(gpu.free),
                    ByteSize(need),
                    ByteSize(gpu.free),
                    pct(gpu.used + gpu.free, gpu.total)
                )));
            }
            if pct(target, gpu.total) > max + 1e-9 {
                return Err(AgentError::Refused(format!(
                    "fill {} would put {label} at {:.1}% in use: the policy allows at most {max}% (max_gpu_fill_percent)",
                    g.fill,
                    pct(target, gpu.total)
                )));
            }
            goals.push(GpuGoal {
                index: gpu.index,
                uuid: gpu.uuid.clone(),
                total: gpu.total,
                used_before: gpu.used,
                target_used: target,
            });
        }
        let target = goals
            .iter()
            .map(|g| {
                format!(
                    "GPU {} to {} in use ({:.1}% of {})",
                    g.index,
                    ByteSize(g.target_used),
                    pct(g.target_used, g.total),
                    ByteSize(g.total)
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let plan = GpuPlan {
            token: token(),
            gpus: goals,
            ramp_ms: g.ramp.map(|r| r.0.as_millis() as u64),
        };
        Ok(Planned { target, plan })
    }

    async fn apply(
        self: Arc<Self>,
        _spec: GpuMemorySpec,
        plan: GpuPlan,
        cancel: CancellationToken,
    ) -> Result<Applied, String> {
        self.apply_plan(plan, cancel).await
    }

    async fn revert(self: Arc<Self>, plan: GpuPlan) -> Result<(), RevertError> {
        self.revert_plan(plan).await
    }

    fn unreadable_plan_leftover(&self, plan: &str) -> String {
        format!(
            "unknown: look for `gpuchaos-agent {}` processes (ps -ef) and kill them; the plan was {plan}",
            crate::gpu_helper::ARG
        )
    }
}

//! What the GPU kinds (`gpu_memory`, `gpu_compute`, `gpu_xid`) share: the GPUs a
//! spec names, resolved against NVML's inventory, and the helper children found and
//! killed by their fault's token. One place, so that the kinds choose GPUs and
//! clean up after themselves alike and say so in the same words.

use std::time::Duration;

use gpuchaos_proto::spec::{GpuRef, GpuSet};

use super::Support;
use crate::error::AgentError;
use crate::sys::gpu::{GpuInfo, GpuQuery};

/// A fault's token: marks its helpers (and files), so that a later run finds them.
pub(crate) fn token() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Whether a helper-based GPU kind works here: NVML lists a GPU and the CUDA driver
/// does what the kind's helpers need (`cuda`, found at start-up), else why not.
pub(crate) fn support(gpus: &dyn GpuQuery, cuda: &Result<(), String>) -> Support {
    let (supported, reason) = match (gpus.list(), cuda) {
        (Err(e), _) => (false, e),
        (Ok(l), _) if l.is_empty() => (false, "NVML lists no GPU on this node".to_string()),
        (Ok(_), Err(e)) => (false, e.clone()),
        (Ok(_), Ok(())) => (true, String::new()),
    };
    Support {
        supported,
        reason,
        backends: vec![],
    }
}

/// The GPUs a spec names, each checked to exist; a GPU named twice (by index and
/// by UUID, say) counts once.
pub(crate) fn select<'a>(
    list: &'a [GpuInfo],
    gpus: &GpuSet,
) -> Result<Vec<&'a GpuInfo>, AgentError> {
    let known = || {
        list.iter()
            .map(|g| format!("{} ({})", g.index, g.uuid))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match gpus {
        GpuSet::All => Ok(list.iter().collect()),
        GpuSet::List(refs) => {
            let mut out: Vec<&GpuInfo> = Vec::new();
            for r in refs {
                let found = list.iter().find(|g| match r {
                    GpuRef::Index(i) => g.index == *i,
                    GpuRef::Uuid(u) => g.uuid.eq_ignore_ascii_case(u),
                });
                match found {
                    Some(g) if !out.iter().any(|o| o.index == g.index) => out.push(g),
                    Some(_) => {}
                    None => {
                        return Err(AgentError::NoTargets(format!(
                            "target.gpus: {r} does not exist on this node; it has {}",
                            known()
                        )));
                    }
                }
            }
            Ok(out)
        }
    }
}

/// Every helper process still running with this token (after a restart, say).
pub(crate) fn stray_helpers(token: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
                args.iter().any(|a| *a == crate::gpu_helper::ARG.as_bytes())
                    && args
                        .windows(2)
                        .any(|w| w[0] == b"--token" && w[1] == token.as_bytes())
            })
        })
        .collect()
}

/// Kills the helpers this agent no longer knows of (a previous run's, if the death
/// signal could not act) by their token, and waits up to `within` for every helper
/// with the token to be gone. `what` names the helpers in the log. Returns the pids
/// still there after that, for the caller's own leftover message.
pub(crate) async fn kill_strays(token: &str, within: Duration, what: &str) -> Result<(), Vec<u32>> {
    for pid in stray_helpers(token) {
        tracing::warn!(pid, token = %token, "killing a {what} left by a previous run");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = stray_helpers(token);
        if left.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(left);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether the agent's helper can make a CUDA context on `gpu` (named `label` in
/// the error): not in PROHIBITED mode, nor in an EXCLUSIVE mode with a workload on it.
pub(crate) fn context_possible(
    gpu: &crate::sys::gpu::GpuInfo,
    label: &str,
) -> Result<(), crate::error::AgentError> {
    use crate::error::AgentError;
    match gpu.compute_mode.as_str() {
        "prohibited" => Err(AgentError::Unsupported(format!(
            "{label} is in PROHIBITED compute mode: no CUDA context can be made on it"
        ))),
        "exclusive-process" | "exclusive-thread" if gpu.used > 0 => {
            Err(AgentError::Unsupported(format!(
                "{label} is in EXCLUSIVE_PROCESS compute mode and in use: a second CUDA context cannot be made; set the default mode (nvidia-smi -i {} -c DEFAULT) or pick another GPU",
                gpu.index
            )))
        }
        _ => Ok(()),
    }
}

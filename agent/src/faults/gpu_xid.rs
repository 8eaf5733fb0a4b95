//! The `gpu_xid` kind: a GPU failing with an NVIDIA Xid, seen coherently at every
//! layer a real one shows up in (docs/gpu.md, "gpu_xid").
//!
//! Plan (no side effects): the GPUs from NVML with their PCI bus ids, the Xid's model
//! ([`gpuchaos_proto::spec::XID_MODELS`]), and, with `kill`, the processes NVML lists
//! on them (policy-checked by the selector). A GPU another fault has armed is refused.
//!
//! Apply, after the intent is journaled:
//! 1. the arm files (`arm-<UUID>.json` in `--xid-dir`, written atomically, carrying
//!    the agent's marker and the fault's token) that the CUDA and NVML interposers
//!    read, saying what the Xid does at their layer;
//! 2. the kernel-log line the driver writes, to `--xid-kmsg` (default /dev/kmsg);
//! 3. with `kill`, SIGKILL to the planned processes still running;
//! 4. each layer's state read back: the arm files parse with the fault's token, and
//!    the interposers' registrations (`loaded/`) say which processes will see it. A
//!    layer that cannot be armed is reported as such; it fails the fault only when
//!    the spec says `required`.
//!
//! Revert removes the fault's arm files (idempotent: a missing file is success, a
//! file of another fault is left alone). Start-up recovery sweeps every arm file
//! that carries the marker.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpuchaos_proto::spec::{
    GpuRef, GpuXidSpec, LayerMode, Layers, ProcessTarget, XidModel, xid_model,
};
use gpuchaos_xid_arm::{self as arm, Arm, CudaArm, Loaded, NvmlArm};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::gpus::{select, token};
use super::select::{Selector, Target};
use super::{Applied, KindDriver, Planned, RevertError, Support};
use crate::error::AgentError;

/// The interposers' file names, as the docs tell workloads to load them.
pub const CUDA_INTERPOSER: &str = "libgpuchaos_cuda_interpose.so";
pub const NVML_INTERPOSER: &str = "libgpuchaos_nvml_interpose.so";

/// How long killed processes may take to go.
const KILL_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct XidGpu {
    pub index: u32,
    pub uuid: String,
    /// NVML's PCI bus id, or why it is unknown.
    pub pci: Result<String, String>,
}

/// The journaled plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct XidPlan {
    /// Names the fault's arm files.
    pub token: String,
    pub xid: u32,
    pub arm_dir: PathBuf,
    pub kmsg: PathBuf,
    pub layers: Layers,
    pub gpus: Vec<XidGpu>,
    /// The processes to kill (with `kill`), per GPU index.
    #[serde(default)]
    pub kill: Vec<(u32, Target)>,
}

pub struct GpuXidDriver {
    selector: Arc<Selector>,
    arm_dir: PathBuf,
    kmsg: PathBuf,
}

impl GpuXidDriver {
    pub fn new(selector: Arc<Selector>, arm_dir: PathBuf, kmsg: PathBuf) -> Self {
        GpuXidDriver {
            selector,
            arm_dir,
            kmsg,
        }
    }

    fn model(xid: u32) -> Result<&'static XidModel, String> {
        xid_model(xid).ok_or_else(|| format!("Xid {xid} is not modelled"))
    }
}

/// The arm file one GPU gets (None: neither interposer layer is on).
fn arm_of(plan: &XidPlan, gpu: &XidGpu, m: &XidModel, now: u64) -> Option<Arm> {
    let cuda = (plan.layers.cuda != LayerMode::Off && m.has_cuda_effect()).then(|| CudaArm {
        in_context: m.cuda_in_context.map(|c| c.code),
        new_context: m.cuda_new_context.map(|c| c.code),
    });
    let nvml = (plan.layers.nvml != LayerMode::Off).then_some(NvmlArm {
        lost: m.nvml_lost,
        uncorrected: m.ecc.uncorrected,
        retired_dbe_pages: m.ecc.retired_dbe_pages,
        remapped_uncorrectable: m.ecc.remapped_uncorrectable,
        remap_failure: m.ecc.remap_failure,
    });
    if cuda.is_none() && nvml.is_none() {
        return None;
    }
    Some(Arm {
        marker: arm::MARKER.to_string(),
        fault: plan.token.clone(),
        uuid: gpu.uuid.clone(),
        index: gpu.index,
        xid: plan.xid,
        armed_at_ms: now,
        clears_at_ms: m.clears_after_ms().map(|c| now + c),
        cuda,
        nvml,
    })
}

fn who(l: &Loaded) -> String {
    format!("pid {} ({})", l.pid, l.comm)
}

/// What one interposer layer is, for every GPU of the fault: (state, detail).
/// `armed`: a live process loaded the interposer; `waiting`: the arm files are
/// written but no process loaded it, so nothing sees it yet; `off`; `none` (the Xid
/// does nothing at this layer).
fn layer_report(
    layer: &str,
    mode: LayerMode,
    applies: bool,
    plan: &XidPlan,
    loaded: &[Loaded],
) -> (String, String) {
    if mode == LayerMode::Off {
        return ("off".into(), format!("{layer} layer: off in the spec"));
    }
    if !applies {
        return (
            "none".into(),
            format!(
                "{layer} layer: Xid {} does not fail {layer} calls: nothing to arm",
                plan.xid
            ),
        );
    }
    let mine: Vec<&Loaded> = loaded.iter().filter(|l| l.layer == layer).collect();
    if mine.is_empty() {
        let how = match layer {
            "cuda" => format!(
                "start workloads with LD_PRELOAD=…/{CUDA_INTERPOSER} (or their libcuda path pointed at it)"
            ),
            _ => format!(
                "start monitors with LD_PRELOAD=…/{NVML_INTERPOSER} (or their libnvidia-ml path pointed at it)"
            ),
        };
        let whom = if layer == "cuda" {
            "workloads"
        } else {
            "monitors"
        };
        return (
            "waiting".into(),
            format!(
                "{layer} layer: armed in {}, but no process loaded the interposer — {whom} will not see it: {how}",
                plan.arm_dir.display()
            ),
        );
    }
    let mut parts = Vec::new();
    let mut on_target = 0;
    for g in &plan.gpus {
        if layer == "cuda" {
            // Only a process with a context on the target GPU (its registration's
            // device list) sees the in-context failure.
            let on: Vec<String> = mine
                .iter()
                .filter(|l| l.gpus.iter().any(|u| u.eq_ignore_ascii_case(&g.uuid)))
                .map(|l| who(l))
                .collect();
            on_target += on.len();
            if on.is_empty() {
                parts.push(format!(
                    "no process that loaded it has a context on {} yet (a new one there fails)",
                    g.uuid
                ));
            } else {
                parts.push(format!("loaded by {} on {}", on.join(", "), g.uuid));
            }
        }
    }
    if layer == "cuda" && on_target == 0 {
        return (
            "waiting".into(),
            format!(
                "{layer} layer: loaded by {}, but none uses the target GPU(s): {} (only processes with a context on a target GPU count)",
                mine.iter().map(|l| who(l)).collect::<Vec<_>>().join(", "),
                parts.join("; ")
            ),
        );
    }
    if layer != "cuda" {
        // A monitor reads every GPU: each one that loaded it counts.
        parts.push(format!(
            "loaded by {} (monitors read every GPU)",
            mine.iter().map(|l| who(l)).collect::<Vec<_>>().join(", ")
        ));
    }
    (
        "armed".into(),
        format!("{layer} layer: {}", parts.join("; ")),
    )
}

/// The process the driver attributes the Xid to: the first NVML lists on the GPU.
fn attributed(selector: &Selector, uuid: &str) -> Option<(u32, String)> {
    let pids = selector
        .gpus()
        .processes_on(&GpuRef::Uuid(uuid.to_string()))
        .ok()?;
    let pid = *pids.first()?;
    let comm = selector
        .procs()
        .stat(pid)
        .ok()
        .flatten()
        .map(|s| s.comm)
        .unwrap_or_else(|| "<unknown>".into());
    Some((pid, comm))
}

/// Creates the arm directory (readable by every workload) and its `loaded/`, where
/// the interposers of workloads that do not run as root register too (sticky and
/// world-writable, as /tmp: each can remove only its own file). Modes are set only on
/// the directories it creates: a pre-existing `--xid-dir` must be a directory owned
/// by root (or the agent's user) and writable by no one else, and a pre-existing
/// `loaded/` the same or sticky (1777), or the fault is refused.
fn prepare_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let me = nix::unistd::geteuid().as_raw();
    let check = |p: &Path, sticky_ok: bool| -> Result<bool, String> {
        match std::fs::symlink_metadata(p) {
            Ok(m) => {
                let mode = m.mode();
                if !m.is_dir() {
                    return Err(format!(
                        "{} is not a directory (--xid-dir): refusing to arm GPUs through it",
                        p.display()
                    ));
                }
                if m.uid() != 0 && m.uid() != me {
                    return Err(format!(
                        "{} is owned by uid {}, not root (--xid-dir): refusing to arm GPUs through it",
                        p.display(),
                        m.uid()
                    ));
                }
                if mode & 0o022 != 0 && !(sticky_ok && mode & 0o1000 != 0) {
                    return Err(format!(
                        "{} is writable by group or others (mode {:o}) (--xid-dir): refusing to arm GPUs through it",
                        p.display(),
                        mode & 0o7777
                    ));
                }
                Ok(false)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(format!("cannot inspect {}: {e} (--xid-dir)", p.display())),
        }
    };
    let loaded = arm::loaded_dir(dir);
    if check(dir, false)? {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e} (--xid-dir)", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("cannot set the mode of {}: {e} (--xid-dir)", dir.display()))?;
    }
    if check(&loaded, true)? {
        match std::fs::create_dir(&loaded) {
            Ok(()) => std::fs::set_permissions(&loaded, std::fs::Permissions::from_mode(0o1777))
                .map_err(|e| {
                    format!(
                        "cannot set the mode of {}: {e} (--xid-dir)",
                        loaded.display()
                    )
                })?,
            // Made by a workload's interposer meanwhile: check it as pre-existing.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                check(&loaded, true)?;
            }
            Err(e) => {
                return Err(format!(
                    "cannot create {}: {e} (--xid-dir)",
                    loaded.display()
                ));
            }
        }
    }
    Ok(())
}

/// [`arm::read_loaded`] on a blocking thread (the directory is world-writable).
async fn read_loaded_blocking(dir: &Path) -> Vec<Loaded> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || arm::read_loaded(&dir))
        .await
        .unwrap_or_default()
}

/// [`arm::read_arms`] on a blocking thread.
async fn read_arms_blocking(dir: &Path) -> (Vec<Arm>, Vec<(PathBuf, String)>) {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || arm::read_arms(&dir))
        .await
        .unwrap_or_default()
}

/// Appends the line to the kernel log (or the file standing in for it). /dev/kmsg
/// takes one record per write, with its priority (4, warning) in front.
fn write_kmsg(path: &Path, line: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::FileTypeExt;
    let is_kmsg = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_char_device());
    let record = if is_kmsg {
        format!("<4>{line}\n")
    } else {
        format!("{line}\n")
    };
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(!is_kmsg)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    f.write_all(record.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

impl GpuXidDriver {
    async fn apply_plan(
        self: Arc<Self>,
        plan: XidPlan,
        cancel: CancellationToken,
    ) -> Result<Applied, String> {
        let m = Self::model(plan.xid)?;
        let now = arm::now_ms();
        // 1. The interposers' arm files.
        let mut gpus = Vec::new();
        let mut wrote = Vec::new();
        for g in &plan.gpus {
            if cancel.is_cancelled() {
                return Err("stopped before every GPU was armed".into());
            }
            let mut d = serde_json::json!({
                "index": g.index,
                "uuid": g.uuid,
                "pci": g.pci.as_ref().ok(),
            });
            if let Some(a) = arm_of(&plan, g, m, now) {
                prepare_dir(&plan.arm_dir)?;
                let path = arm::arm_path(&plan.arm_dir, &g.uuid);
                let json = serde_json::to_vec_pretty(&a).map_err(|e| e.to_string())?;
                arm::write_atomic(&path, &json)
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                d["arm_file"] = serde_json::json!(path.display().to_string());
                wrote.push(path);
            }
            gpus.push(d);
        }
        // Read back: every arm file parses and carries this fault's token.
        let (arms, _) = read_arms_blocking(&plan.arm_dir).await;
        for p in &wrote {
            let ok = arms
                .iter()
                .any(|a| a.fault == plan.token && arm::arm_path(&plan.arm_dir, &a.uuid) == *p);
            if !ok {
                return Err(format!(
                    "{} does not read back as this fault's arm file",
                    p.display()
                ));
            }
        }

        // 2. Who sees it, checked before any effect that cannot be undone (the
        // kernel-log line, the kills): a fault failing here leaves only its arm
        // files, which the revert removes. Read off the runtime: anyone may write
        // into `loaded/`.
        let loaded = read_loaded_blocking(&plan.arm_dir).await;
        let (cuda_state, cuda_detail) = layer_report(
            "cuda",
            plan.layers.cuda,
            m.has_cuda_effect(),
            &plan,
            &loaded,
        );
        let (nvml_state, nvml_detail) =
            layer_report("nvml", plan.layers.nvml, true, &plan, &loaded);
        for (name, mode, state, detail) in [
            ("cuda", plan.layers.cuda, &cuda_state, &cuda_detail),
            ("nvml", plan.layers.nvml, &nvml_state, &nvml_detail),
        ] {
            if mode == LayerMode::Required && state != "armed" {
                return Err(format!("{name} layer (required) is not armed: {detail}"));
            }
        }
        // 3. The kernel-log line.
        let kmsg = if plan.layers.kmsg == LayerMode::Off {
            serde_json::json!({"mode": "off", "state": "off"})
        } else {
            let mut lines = Vec::new();
            let mut errors = Vec::new();
            for g in &plan.gpus {
                let pci = match &g.pci {
                    Ok(p) => p.clone(),
                    Err(e) => {
                        errors.push(format!("GPU {}: no PCI bus id ({e})", g.index));
                        continue;
                    }
                };
                let who = attributed(&self.selector, &g.uuid);
                let line = m.kmsg_line(&pci, who.as_ref().map(|(p, c)| (*p, c.as_str())));
                match write_kmsg(&plan.kmsg, &line) {
                    Ok(()) => lines.push(line),
                    Err(e) => errors.push(e),
                }
            }
            if !errors.is_empty() && plan.layers.kmsg == LayerMode::Required {
                return Err(format!("kmsg layer (required): {}", errors.join("; ")));
            }
            serde_json::json!({
                "mode": plan.layers.kmsg.to_string(),
                "state": if errors.is_empty() { "written" } else if lines.is_empty() { "failed" } else { "partly written" },
                "path": plan.kmsg.display().to_string(),
                "lines": lines,
                "errors": errors,
            })
        };

        // 4. The processes on the GPU, killed as the driver would.
        let mut killed = Vec::new();
        for (index, t) in &plan.kill {
            let procs = self.selector.procs();
            let same = procs
                .stat(t.pid)
                .ok()
                .flatten()
                .is_some_and(|s| s.start_time == t.start_time && !s.is_dead());
            if !same {
                continue;
            }
            match procs.signal(t.pid, 9) {
                Ok(()) => {
                    killed.push(serde_json::json!({"pid": t.pid, "comm": t.comm, "gpu": index}))
                }
                Err(e) => tracing::warn!(pid = t.pid, error = %e, "gpu_xid: cannot kill"),
            }
        }
        let deadline = tokio::time::Instant::now() + KILL_WAIT;
        for k in &killed {
            let pid = k["pid"].as_u64().unwrap_or(0) as u32;
            while tokio::time::Instant::now() < deadline
                && self
                    .selector
                    .procs()
                    .stat(pid)
                    .ok()
                    .flatten()
                    .is_some_and(|s| !s.is_dead())
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        let clears_at = m.clears_after_ms().map(|c| now + c);
        let details = Arc::new(Mutex::new(serde_json::json!({
            "xid": m.xid,
            "name": m.name,
            "model": if m.latched { "latched" } else { "self-clearing" },
            "why": m.why,
            "armed_at_ms": now,
            "clears_at_ms": clears_at,
            "cleared": false,
            "gpus": gpus,
            "layers": {
                "kmsg": kmsg,
                "nvml": {"mode": plan.layers.nvml.to_string(), "state": nvml_state, "detail": nvml_detail},
                "cuda": {"mode": plan.layers.cuda.to_string(), "state": cuda_state, "detail": cuda_detail,
                         "in_context": m.cuda_in_context.map(|c| c.name),
                         "new_context": m.cuda_new_context.map(|c| c.name)},
            },
            "killed": killed,
        })));
        // While active: who loaded the interposers since, and the self-clearing
        // moment.
        let d = Arc::clone(&details);
        let background = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                let loaded = read_loaded_blocking(&plan.arm_dir).await;
                let cuda = layer_report(
                    "cuda",
                    plan.layers.cuda,
                    m.has_cuda_effect(),
                    &plan,
                    &loaded,
                );
                let nvml = layer_report("nvml", plan.layers.nvml, true, &plan, &loaded);
                if let Ok(mut d) = d.lock() {
                    d["layers"]["cuda"]["state"] = serde_json::json!(cuda.0);
                    d["layers"]["cuda"]["detail"] = serde_json::json!(cuda.1);
                    d["layers"]["nvml"]["state"] = serde_json::json!(nvml.0);
                    d["layers"]["nvml"]["detail"] = serde_json::json!(nvml.1);
                    if let Some(c) = clears_at
                        && arm::now_ms() >= c
                    {
                        d["cleared"] = serde_json::json!(true);
                    }
                }
            }
        });
        Ok(Applied {
            details,
            background: Some(background),
            observations: None,
        })
    }

    /// Removes the fault's arm files; a missing one is success, another fault's is
    /// left alone.
    fn remove_arms(plan: &XidPlan) -> Result<(), RevertError> {
        let mut left = Vec::new();
        for g in &plan.gpus {
            let path = arm::arm_path(&plan.arm_dir, &g.uuid);
            let mine = match arm::read_untrusted(&path) {
                Ok((b, _)) => serde_json::from_slice::<Arm>(&b)
                    .map(|a| a.fault == plan.token)
                    // A torn or foreign-looking file at our path: ours to remove
                    // only if it names our token, which it cannot be read for; the
                    // sweep at start-up removes marked files.
                    .unwrap_or(false),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    left.push(format!("{}: {e}", path.display()));
                    continue;
                }
            };
            if !mine {
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => left.push(format!("{}: {e}", path.display())),
            }
        }
        if left.is_empty() {
            Ok(())
        } else {
            Err(RevertError {
                message: format!("cannot remove the arm files: {}", left.join("; ")),
                leftover: format!(
                    "arm files that keep the GPUs failing for workloads that loaded the interposers: rm {}",
                    plan.gpus
                        .iter()
                        .map(|g| arm::arm_path(&plan.arm_dir, &g.uuid).display().to_string())
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
            })
        }
    }
    /// The start-up sweep's work, on a blocking thread (see `sweep`).
    fn sweep_dirs(dirs: Vec<PathBuf>) -> Vec<String> {
        let mut removed = Vec::new();
        for dir in dirs {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let path = e.path();
                let ours = if name.starts_with(".arm-") && name.contains(".tmp.") {
                    true
                } else if name.starts_with("arm-") && name.ends_with(".json") {
                    arm::read_untrusted(&path).is_ok_and(|(b, _)| {
                        serde_json::from_slice::<serde_json::Value>(&b)
                            .is_ok_and(|v| v["marker"] == arm::MARKER)
                    })
                } else {
                    false
                };
                if ours && std::fs::remove_file(&path).is_ok() {
                    tracing::warn!(path = %path.display(), "removed a gpu_xid arm file left by a previous run");
                    removed.push(format!("gpu_xid arm file {}", path.display()));
                }
            }
        }
        removed
    }
}

impl KindDriver for GpuXidDriver {
    type Spec = GpuXidSpec;
    type Plan = XidPlan;

    fn capability(&self) -> Support {
        match self.selector.gpus().list() {
            Err(e) => Support {
                supported: false,
                reason: e,
                backends: vec![],
            },
            Ok(l) if l.is_empty() => Support {
                supported: false,
                reason: "NVML lists no GPU on this node".into(),
                backends: vec![],
            },
            Ok(_) => Support {
                supported: true,
                reason: String::new(),
                backends: vec![
                    "kmsg".into(),
                    "nvml-interposer".into(),
                    "cuda-interposer".into(),
                ],
            },
        }
    }

    fn plan(&self, spec: &GpuXidSpec) -> Result<Planned<XidPlan>, AgentError> {
        let m = Self::model(spec.xid).map_err(AgentError::Unsupported)?;
        let list = self
            .selector
            .gpus()
            .list()
            .map_err(AgentError::Unsupported)?;
        let chosen = select(&list, &spec.target.gpus)?;
        let (armed, _) = arm::read_arms(&self.arm_dir);
        let mut gpus = Vec::new();
        let mut kill = Vec::new();
        for g in chosen {
            if let Some(a) = armed.iter().find(|a| a.uuid.eq_ignore_ascii_case(&g.uuid)) {
                return Err(AgentError::Refused(format!(
                    "GPU {} ({}) already fails with Xid {} (another gpu_xid fault, token {}): revert it first",
                    g.index, g.uuid, a.xid, a.fault
                )));
            }
            let pci = self.selector.gpus().pci_bus_id(&g.uuid);
            if spec.layers.kmsg == LayerMode::Required
                && let Err(e) = &pci
            {
                return Err(AgentError::Unsupported(format!(
                    "kmsg layer (required): the PCI bus id of GPU {} is unknown: {e}",
                    g.index
                )));
            }
            if spec.kill {
                let sel = ProcessTarget {
                    gpu: Some(GpuRef::Uuid(g.uuid.clone())),
                    ..ProcessTarget::default()
                };
                match self.selector.select(&sel) {
                    Ok(ts) => kill.extend(ts.into_iter().map(|t| (g.index, t))),
                    // No process on the GPU: nothing to kill.
                    Err(AgentError::NoTargets(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            gpus.push(XidGpu {
                index: g.index,
                uuid: g.uuid.clone(),
                pci,
            });
        }
        let target = gpus
            .iter()
            .map(|g| {
                format!(
                    "GPU {} ({}{})",
                    g.index,
                    g.uuid,
                    g.pci
                        .as_ref()
                        .map(|p| format!(", PCI {p}"))
                        .unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let kills = if spec.kill {
            format!(", killing {} process(es)", kill.len())
        } else {
            String::new()
        };
        Ok(Planned {
            target: format!(
                "Xid {} ({}, {}) on {target}{kills}",
                m.xid,
                m.name,
                if m.latched {
                    "latched"
                } else {
                    "self-clearing"
                }
            ),
            plan: XidPlan {
                token: token(),
                xid: spec.xid,
                arm_dir: self.arm_dir.clone(),
                kmsg: self.kmsg.clone(),
                layers: spec.layers,
                gpus,
                kill,
            },
        })
    }

    async fn apply(
        self: Arc<Self>,
        _spec: GpuXidSpec,
        plan: XidPlan,
        cancel: CancellationToken,
    ) -> Result<Applied, String> {
        self.apply_plan(plan, cancel).await
    }

    async fn revert(self: Arc<Self>, plan: XidPlan) -> Result<(), RevertError> {
        let p = plan.clone();
        match tokio::task::spawn_blocking(move || Self::remove_arms(&p)).await {
            Ok(r) => r,
            Err(e) => Err(RevertError {
                message: format!("the arm-file removal stopped: {e}"),
                leftover: format!(
                    "arm files: rm {}/arm-*.json of token {}",
                    plan.arm_dir.display(),
                    plan.token
                ),
            }),
        }
    }

    /// Every arm file in the arm directory that carries the marker, whatever its
    /// fault (a previous run's, one no journal entry names), and stale temporary
    /// files of the atomic writes.
    async fn sweep(self: Arc<Self>, plans: Vec<XidPlan>) -> Vec<String> {
        let mut dirs: Vec<PathBuf> = plans.into_iter().map(|p| p.arm_dir).collect();
        dirs.push(self.arm_dir.clone());
        dirs.sort();
        dirs.dedup();
        tokio::task::spawn_blocking(move || Self::sweep_dirs(dirs))
            .await
            .unwrap_or_default()
    }

    fn unreadable_plan_leftover(&self, plan: &str) -> String {
        format!(
            "unknown: remove the gpu_xid arm files by hand (rm {}/arm-*.json); the plan was {plan}",
            self.arm_dir.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Policy, PolicyFile};
    use crate::sys::fake::{NoGpus, workers};

    fn plan(dir: &Path, token: &str, layers: Layers) -> XidPlan {
        XidPlan {
            token: token.into(),
            xid: 79,
            arm_dir: dir.to_path_buf(),
            kmsg: dir.join("kmsg"),
            layers,
            gpus: vec![XidGpu {
                index: 0,
                uuid: "GPU-0".into(),
                pci: Ok("00000000:3B:00.0".into()),
            }],
            kill: vec![],
        }
    }

    fn driver(dir: &Path) -> Arc<GpuXidDriver> {
        let policy = Arc::new(Policy::new(PolicyFile::default()).unwrap());
        let selector = Arc::new(Selector::new(workers(), Arc::new(NoGpus), policy));
        Arc::new(GpuXidDriver::new(
            selector,
            dir.to_path_buf(),
            dir.join("kmsg"),
        ))
    }

    #[test]
    fn arm_files_say_what_each_layer_does() {
        let dir = std::env::temp_dir();
        let p = plan(&dir, "t", Layers::default());
        let m = xid_model(79).unwrap();
        let a = arm_of(&p, &p.gpus[0], m, 1000).unwrap();
        assert_eq!(a.clears_at_ms, None, "79 is latched");
        assert_eq!(
            a.cuda,
            Some(CudaArm {
                in_context: Some(719),
                new_context: Some(999)
            })
        );
        assert!(a.nvml.as_ref().unwrap().lost);
        // Self-clearing: hits for the window only.
        let m31 = xid_model(31).unwrap();
        let a = arm_of(&p, &p.gpus[0], m31, 1000).unwrap();
        assert_eq!(
            a.clears_at_ms,
            Some(1000 + gpuchaos_proto::spec::SELF_CLEAR_WINDOW_MS)
        );
        // Layers off: nothing for that interposer; both off: no file.
        let off = Layers {
            cuda: LayerMode::Off,
            nvml: LayerMode::Off,
            kmsg: LayerMode::Auto,
        };
        assert!(arm_of(&plan(&dir, "t", off), &p.gpus[0], m, 1).is_none());
        // 63 does nothing to CUDA: no CUDA arm even with the layer on.
        let a = arm_of(&p, &p.gpus[0], xid_model(63).unwrap(), 1).unwrap();
        assert!(a.cuda.is_none() && a.nvml.unwrap().remapped_uncorrectable == 1);
    }

    #[tokio::test]
    async fn revert_is_idempotent_and_leaves_other_faults_alone_and_the_sweep_takes_every_marked_file()
     {
        let dir = std::env::temp_dir().join(format!("gpuchaos-xid-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let d = driver(&dir);
        let mine = plan(&dir, "mine", Layers::default());
        // Never applied: revert succeeds.
        d.clone().revert(mine.clone()).await.unwrap();
        // Another fault's file at the same GPU stays.
        let m = xid_model(79).unwrap();
        let other = arm_of(&plan(&dir, "other", Layers::default()), &mine.gpus[0], m, 5).unwrap();
        let path = arm::arm_path(&dir, "GPU-0");
        arm::write_atomic(&path, &serde_json::to_vec(&other).unwrap()).unwrap();
        d.clone().revert(mine.clone()).await.unwrap();
        assert!(
            path.exists(),
            "another fault's arm file is not this revert's"
        );
        // Its own is removed, twice over.
        let own = arm_of(&mine, &mine.gpus[0], m, 5).unwrap();
        arm::write_atomic(&path, &serde_json::to_vec(&own).unwrap()).unwrap();
        d.clone().revert(mine.clone()).await.unwrap();
        assert!(!path.exists());
        d.clone().revert(mine.clone()).await.unwrap();
        // The sweep: marked files go, whatever their token; others stay.
        arm::write_atomic(&path, &serde_json::to_vec(&other).unwrap()).unwrap();
        std::fs::write(dir.join(".arm-GPU-1.json.tmp.77"), b"{").unwrap();
        std::fs::write(dir.join("arm-GPU-9.json"), br#"{"marker":"not-ours"}"#).unwrap();
        std::fs::write(dir.join("notes.txt"), b"keep").unwrap();
        let removed = d.clone().sweep(vec![]).await;
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(!path.exists());
        assert!(dir.join("arm-GPU-9.json").exists() && dir.join("notes.txt").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn layers_say_who_sees_the_fault() {
        let dir = std::env::temp_dir();
        let p = plan(&dir, "t", Layers::default());
        let (s, d) = layer_report("nvml", LayerMode::Auto, true, &p, &[]);
        assert_eq!(s, "waiting");
        assert!(
            d.contains("no process loaded the interposer — monitors will not see it"),
            "{d}"
        );
        let worker = Loaded {
            pid: 123,
            layer: "cuda".into(),
            comm: "gpuchaos-refsta".into(),
            start_time: 1,
            gpus: vec!["GPU-0".into()],
        };
        let (s, d) = layer_report("cuda", LayerMode::Required, true, &p, &[worker]);
        assert_eq!(s, "armed");
        assert_eq!(
            d,
            "cuda layer: loaded by pid 123 (gpuchaos-refsta) on GPU-0"
        );
        let elsewhere = Loaded {
            pid: 124,
            layer: "cuda".into(),
            comm: "other".into(),
            start_time: 1,
            gpus: vec!["GPU-1".into()],
        };
        let (s, d) = layer_report("cuda", LayerMode::Required, true, &p, &[elsewhere]);
        assert_eq!(s, "waiting", "a process on another GPU does not count: {d}");
        assert!(d.contains("none uses the target GPU(s)"), "{d}");
        let (s, _) = layer_report("cuda", LayerMode::Auto, false, &p, &[]);
        assert_eq!(s, "none");
        let (s, _) = layer_report("cuda", LayerMode::Off, true, &p, &[]);
        assert_eq!(s, "off");
    }

    #[test]
    fn a_pre_existing_arm_directory_keeps_its_modes_and_a_writable_one_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("gpuchaos-xid-prep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // Created: 0755 and loaded/ 1777.
        prepare_dir(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&dir), 0o755);
        assert_eq!(mode(&arm::loaded_dir(&dir)), 0o1777);
        // Pre-existing and stricter: left as it is.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        prepare_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        // Writable by others: refused, untouched.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = prepare_dir(&dir).unwrap_err();
        assert!(e.contains("writable by group or others"), "{e}");
        assert_eq!(mode(&dir), 0o777);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        // loaded/ other-writable without the sticky bit: refused.
        std::fs::set_permissions(
            arm::loaded_dir(&dir),
            std::fs::Permissions::from_mode(0o777),
        )
        .unwrap();
        assert!(prepare_dir(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_kernel_log_line_goes_to_a_file_as_dmesg_shows_it() {
        let f = std::env::temp_dir().join(format!("gpuchaos-kmsg-unit-{}", std::process::id()));
        let _ = std::fs::remove_file(&f);
        write_kmsg(
            &f,
            "NVRM: Xid (PCI:0000:3b:00): 79, pid=1, name=x, GPU has fallen off the bus.",
        )
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(&f).unwrap(),
            "NVRM: Xid (PCI:0000:3b:00): 79, pid=1, name=x, GPU has fallen off the bus.\n"
        );
        std::fs::remove_file(&f).unwrap();
    }
}

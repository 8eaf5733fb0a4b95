//! What this node is and what it can do: hostname, kernel, agent version, GPUs and
//! per-kind capabilities.

use std::sync::Arc;

use gpuchaos_proto::pb;

use crate::faults::FaultDriver;
use crate::policy::Policy;
use crate::sys::clock::{mono_ns, unix_ms};
use crate::sys::gpu::GpuQuery;
use gpuchaos_proto::spec::KINDS;

pub struct Inventory {
    pub hostname: String,
    pub kernel: String,
    pub gpus: Arc<dyn GpuQuery>,
    pub drivers: Vec<Arc<dyn FaultDriver>>,
    pub policy: Arc<Policy>,
}

impl Inventory {
    pub fn new(
        gpus: Arc<dyn GpuQuery>,
        drivers: Vec<Arc<dyn FaultDriver>>,
        policy: Arc<Policy>,
    ) -> Self {
        let hostname = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".into());
        let kernel = nix::sys::utsname::uname()
            .map(|u| {
                format!(
                    "{} {} {}",
                    u.sysname().to_string_lossy(),
                    u.release().to_string_lossy(),
                    u.machine().to_string_lossy()
                )
            })
            .unwrap_or_else(|_| "unknown".into());
        Inventory {
            hostname,
            kernel,
            gpus,
            drivers,
            policy,
        }
    }

    pub fn capabilities(&self) -> Vec<pb::Capability> {
        KINDS
            .iter()
            .map(|kind| {
                let driver = self.drivers.iter().find(|d| d.kind() == *kind);
                let (supported, reason, backends) = match driver {
                    None => (
                        false,
                        format!(
                            "{kind} faults are not implemented in agent {}",
                            gpuchaos_proto::VERSION
                        ),
                        vec![],
                    ),
                    Some(d) => {
                        let c = d.capability();
                        (c.supported, c.reason, c.backends)
                    }
                };
                let (supported, reason) = if supported && !self.policy.kind_enabled(kind) {
                    (
                        false,
                        "disabled by this node's policy (enabled_kinds)".to_string(),
                    )
                } else {
                    (supported, reason)
                };
                pb::Capability {
                    kind: kind.to_string(),
                    supported,
                    reason,
                    backends,
                }
            })
            .collect()
    }

    pub fn snapshot(&self) -> pb::AgentInfo {
        let (gpus, gpu_error) = match self.gpus.list() {
            Ok(list) => (
                list.into_iter()
                    .map(|g| pb::Gpu {
                        index: g.index,
                        uuid: g.uuid,
                        name: g.name,
                        memory_total_bytes: g.total,
                        memory_used_bytes: g.used,
                        memory_free_bytes: g.free,
                    })
                    .collect(),
                String::new(),
            ),
            Err(e) => (vec![], e),
        };
        pb::AgentInfo {
            hostname: self.hostname.clone(),
            kernel: self.kernel.clone(),
            agent_version: gpuchaos_proto::VERSION.to_string(),
            pid: std::process::id(),
            root: nix::unistd::geteuid().is_root(),
            gpus,
            gpu_error,
            capabilities: self.capabilities(),
            agent_mono_ns: mono_ns(),
            agent_unix_ms: unix_ms(),
            policy_yaml: self.policy.to_yaml(),
            active_faults: 0,
            open_sessions: 0,
        }
    }
}

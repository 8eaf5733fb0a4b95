//! Target selection shared by the kinds that hit processes (`process`, and
//! `network` for the namespace of a process): every process a selector matches,
//! checked against the policy, and a seeded pick among them.

use std::sync::Arc;

use gpuchaos_proto::spec::{Pick, ProcessTarget};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use crate::error::AgentError;
use crate::policy::{Lineage, Policy, cgroup_within};
use crate::sys::Processes;
use crate::sys::gpu::GpuQuery;

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

/// Resolves selectors against the process table and the GPUs' process lists.
pub struct Selector {
    procs: Arc<dyn Processes>,
    gpus: Arc<dyn GpuQuery>,
    policy: Arc<Policy>,
}

impl Selector {
    pub fn new(procs: Arc<dyn Processes>, gpus: Arc<dyn GpuQuery>, policy: Arc<Policy>) -> Self {
        Selector {
            procs,
            gpus,
            policy,
        }
    }

    /// The GPUs that `gpu` selectors (and the replacement watch) ask.
    pub fn gpus(&self) -> &Arc<dyn GpuQuery> {
        &self.gpus
    }

    /// The process table selections are made in.
    pub fn procs(&self) -> &Arc<dyn Processes> {
        &self.procs
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
}

fn describe_selector(sel: &ProcessTarget) -> String {
    format!("{{{}}}", sel.describe())
}

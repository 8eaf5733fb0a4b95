//! The policy: what this agent may touch (its blast radius).
//!
//! Some protections are built in and cannot be switched off: pid 1, the agent itself,
//! its ancestors (the shell or supervisor that started it) and descendants, kernel
//! threads, and sshd. The policy file adds to them and sets the limits. It is YAML:
//!
//! ```yaml
//! max_duration: 1h              # no fault may last longer
//! max_session_ttl: 10m          # the longest lease a controller may ask for
//! enabled_kinds: [process]      # kinds not listed are refused
//! protected_names: ["^systemd", "^kubelet$"]   # regexes on the process name
//! protected_cmdlines: ["postgres"]             # regexes on the command line
//! protected_pids: [812]
//! protected_cgroups: ["/system.slice"]         # a cgroup and everything below it
//! protected_interfaces: ["eth0"]               # network faults never touch these
//! max_gpu_fill_percent: 95
//! max_gpu_compute_percent: 95   # the most a gpu_compute fault may load a GPU
//! ```

use std::time::Duration;

use gpuchaos_proto::spec::{FieldError, HumanDuration, KINDS, SpecErrors};
use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::sys::ProcStat;

/// Names that are always protected, whatever the policy file says.
const BUILT_IN_PROTECTED_NAMES: &[&str] = &["^sshd$", "^sshd-session$", "^gpuchaos-agent$"];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyFile {
    pub max_duration: HumanDuration,
    pub max_session_ttl: HumanDuration,
    pub enabled_kinds: Vec<String>,
    pub protected_names: Vec<String>,
    pub protected_cmdlines: Vec<String>,
    pub protected_pids: Vec<u32>,
    pub protected_cgroups: Vec<String>,
    pub protected_interfaces: Vec<String>,
    pub max_gpu_fill_percent: f64,
    pub max_gpu_compute_percent: f64,
}

impl Default for PolicyFile {
    fn default() -> Self {
        PolicyFile {
            max_duration: HumanDuration(Duration::from_secs(3600)),
            max_session_ttl: HumanDuration(Duration::from_secs(600)),
            enabled_kinds: KINDS.iter().map(|s| s.to_string()).collect(),
            protected_names: vec![
                "^systemd".into(),
                "^(init|kubelet|containerd|dockerd|crio)$".into(),
            ],
            protected_cmdlines: vec![],
            protected_pids: vec![],
            protected_cgroups: vec![],
            protected_interfaces: vec![],
            max_gpu_fill_percent: 95.0,
            max_gpu_compute_percent: 95.0,
        }
    }
}

/// The compiled policy.
#[derive(Debug, Clone)]
pub struct Policy {
    pub file: PolicyFile,
    names: Vec<Regex>,
    cmdlines: Vec<Regex>,
}

/// Why a process may not be touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protected {
    pub pid: u32,
    pub comm: String,
    pub why: String,
}

impl std::fmt::Display for Protected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} ({}) is protected: {}",
            self.pid, self.comm, self.why
        )
    }
}

impl Policy {
    pub fn load(path: Option<&std::path::Path>) -> Result<Policy, String> {
        let file = match path {
            None => PolicyFile::default(),
            Some(p) => {
                let text = gpuchaos_proto::files::read_text_capped(
                    p,
                    gpuchaos_proto::files::MAX_YAML_BYTES,
                )
                .map_err(|e| format!("policy file: {e}"))?;
                serde_saphyr::from_str::<PolicyFile>(&text).map_err(|e| {
                    format!(
                        "policy file {}: {}",
                        p.display(),
                        gpuchaos_proto::spec::yaml_error(e)
                    )
                })?
            }
        };
        Policy::new(file).map_err(|e| match path {
            Some(p) => format!("policy file {}: {e}", p.display()),
            None => e.to_string(),
        })
    }

    pub fn new(file: PolicyFile) -> Result<Policy, SpecErrors> {
        let mut errs = Vec::new();
        let mut compile = |field: &str, list: &[String]| -> Vec<Regex> {
            list.iter()
                .enumerate()
                .filter_map(|(i, r)| match gpuchaos_proto::spec::compile_regex(r) {
                    Ok(re) => Some(re),
                    Err(e) => {
                        errs.push(FieldError::new(format!("{field}[{i}]"), e));
                        None
                    }
                })
                .collect()
        };
        let mut names = compile(
            "builtin",
            &BUILT_IN_PROTECTED_NAMES
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        );
        names.extend(compile("protected_names", &file.protected_names));
        let cmdlines = compile("protected_cmdlines", &file.protected_cmdlines);
        for k in &file.enabled_kinds {
            if !KINDS.contains(&k.as_str()) {
                errs.push(FieldError::new(
                    "enabled_kinds",
                    format!(
                        "unknown fault kind {k:?}: known kinds are {}",
                        KINDS.join(", ")
                    ),
                ));
            }
        }
        if file.max_duration.0.is_zero() {
            errs.push(FieldError::new("max_duration", "must be above zero"));
        }
        if file.max_session_ttl.0.is_zero() {
            errs.push(FieldError::new("max_session_ttl", "must be above zero"));
        }
        if !(file.max_gpu_fill_percent > 0.0 && file.max_gpu_fill_percent <= 100.0) {
            errs.push(FieldError::new(
                "max_gpu_fill_percent",
                "must be above 0 and at most 100",
            ));
        }
        if !(file.max_gpu_compute_percent > 0.0 && file.max_gpu_compute_percent <= 100.0) {
            errs.push(FieldError::new(
                "max_gpu_compute_percent",
                "must be above 0 and at most 100",
            ));
        }
        for cg in &file.protected_cgroups {
            if !cg.starts_with('/') {
                errs.push(FieldError::new(
                    "protected_cgroups",
                    format!("{cg:?} must be a cgroup path starting with /"),
                ));
            }
        }
        if !errs.is_empty() {
            return Err(SpecErrors(errs));
        }
        Ok(Policy {
            file,
            names,
            cmdlines,
        })
    }

    pub fn to_yaml(&self) -> String {
        serde_saphyr::to_string(&self.file).unwrap_or_default()
    }

    /// Is this fault kind enabled on this node?
    pub fn kind_enabled(&self, kind: &str) -> bool {
        self.file.enabled_kinds.iter().any(|k| k == kind)
    }

    /// Checks the common limits of a fault spec.
    pub fn check_duration(&self, d: Duration) -> Result<(), String> {
        if d > self.file.max_duration.0 {
            return Err(format!(
                "duration {} exceeds the policy maximum of {}: shorten it or raise max_duration in the agent's policy",
                HumanDuration(d),
                self.file.max_duration
            ));
        }
        Ok(())
    }

    /// May this process be signalled? `lineage` holds the agent, its ancestors and
    /// its descendants (computed once per selection).
    pub fn check_process(
        &self,
        stat: &ProcStat,
        cmdline: &str,
        cgroup: &str,
        lineage: &Lineage,
    ) -> Result<(), Protected> {
        let deny = |why: String| {
            Err(Protected {
                pid: stat.pid,
                comm: stat.comm.clone(),
                why,
            })
        };
        if stat.pid == 1 {
            return deny("pid 1 is never signalled".into());
        }
        if stat.is_kernel_thread() {
            return deny("it is a kernel thread".into());
        }
        if stat.pid == lineage.agent {
            return deny("it is the gpuchaos agent itself".into());
        }
        if lineage.ancestors.contains(&stat.pid) {
            return deny(
                "it is an ancestor of the gpuchaos agent (killing it could kill the agent)".into(),
            );
        }
        if lineage.descendants.contains(&stat.pid) {
            return deny("it is a helper process of the gpuchaos agent".into());
        }
        if self.file.protected_pids.contains(&stat.pid) {
            return deny("listed in the policy's protected_pids".into());
        }
        if let Some(re) = self.names.iter().find(|re| re.is_match(&stat.comm)) {
            return deny(format!(
                "its name matches the protected pattern {:?}",
                re.as_str()
            ));
        }
        if let Some(re) = self.cmdlines.iter().find(|re| re.is_match(cmdline)) {
            return deny(format!(
                "its command line matches the protected pattern {:?}",
                re.as_str()
            ));
        }
        if let Some(cg) = self
            .file
            .protected_cgroups
            .iter()
            .find(|cg| cgroup_within(cgroup, cg))
        {
            return deny(format!("it runs in the protected cgroup {cg}"));
        }
        Ok(())
    }
}

/// Is `path` the cgroup `base` or below it?
pub fn cgroup_within(path: &str, base: &str) -> bool {
    let base = base.trim_end_matches('/');
    if base.is_empty() {
        return true;
    }
    path == base
        || path
            .strip_prefix(base)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The agent's own family: never to be signalled.
#[derive(Debug, Clone, Default)]
pub struct Lineage {
    pub agent: u32,
    pub ancestors: Vec<u32>,
    pub descendants: Vec<u32>,
}

impl Lineage {
    /// Computes the lineage from a snapshot of (pid, ppid) pairs.
    pub fn compute(agent: u32, parents: &[(u32, u32)]) -> Lineage {
        let parent_of = |pid: u32| parents.iter().find(|(p, _)| *p == pid).map(|(_, pp)| *pp);
        let mut ancestors = Vec::new();
        let mut cur = agent;
        while let Some(pp) = parent_of(cur) {
            if pp == 0 || ancestors.contains(&pp) {
                break;
            }
            ancestors.push(pp);
            cur = pp;
        }
        let mut descendants = Vec::new();
        let mut frontier = vec![agent];
        while let Some(p) = frontier.pop() {
            for (child, _) in parents.iter().filter(|(_, pp)| *pp == p) {
                if !descendants.contains(child) && *child != agent {
                    descendants.push(*child);
                    frontier.push(*child);
                }
            }
        }
        Lineage {
            agent,
            ancestors,
            descendants,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(pid: u32, comm: &str) -> ProcStat {
        ProcStat {
            pid,
            comm: comm.into(),
            state: 'S',
            ppid: 100,
            flags: 0,
            start_time: 1,
        }
    }

    #[test]
    fn built_in_protections_cannot_be_removed() {
        let p = Policy::new(PolicyFile {
            protected_names: vec![],
            ..PolicyFile::default()
        })
        .unwrap();
        let lineage = Lineage::compute(50, &[(50, 40), (40, 30), (30, 1), (60, 50)]);
        assert_eq!(lineage.ancestors, vec![40, 30, 1]);
        assert_eq!(lineage.descendants, vec![60]);
        let check = |s: &ProcStat| p.check_process(s, "", "/", &lineage);
        assert!(check(&stat(1, "init")).unwrap_err().why.contains("pid 1"));
        assert!(
            check(&stat(50, "x"))
                .unwrap_err()
                .why
                .contains("agent itself")
        );
        assert!(
            check(&stat(40, "bash"))
                .unwrap_err()
                .why
                .contains("ancestor")
        );
        assert!(
            check(&stat(60, "helper"))
                .unwrap_err()
                .why
                .contains("helper")
        );
        assert!(
            check(&stat(70, "sshd"))
                .unwrap_err()
                .why
                .contains("protected pattern")
        );
        let mut kthread = stat(71, "kworker/0:1");
        kthread.ppid = 2;
        assert!(check(&kthread).unwrap_err().why.contains("kernel thread"));
        assert!(check(&stat(72, "vllm-worker")).is_ok());
    }

    #[test]
    fn configured_protections() {
        let p = Policy::new(PolicyFile {
            protected_names: vec!["^postgres".into()],
            protected_cmdlines: vec!["--do-not-touch".into()],
            protected_pids: vec![99],
            protected_cgroups: vec!["/system.slice".into()],
            ..PolicyFile::default()
        })
        .unwrap();
        let l = Lineage::default();
        assert!(p.check_process(&stat(5, "postgres"), "", "/", &l).is_err());
        assert!(
            p.check_process(&stat(5, "w"), "w --do-not-touch", "/", &l)
                .is_err()
        );
        assert!(p.check_process(&stat(99, "w"), "", "/", &l).is_err());
        assert!(
            p.check_process(&stat(5, "w"), "", "/system.slice/x.service", &l)
                .is_err()
        );
        assert!(
            p.check_process(&stat(5, "w"), "", "/system.slicey", &l)
                .is_ok()
        );
        assert!(
            p.check_process(&stat(5, "w"), "", "/user.slice", &l)
                .is_ok()
        );
    }

    #[test]
    fn limits_and_bad_files() {
        let p = Policy::new(PolicyFile {
            max_duration: HumanDuration(Duration::from_secs(60)),
            enabled_kinds: vec!["process".into()],
            ..PolicyFile::default()
        })
        .unwrap();
        assert!(p.check_duration(Duration::from_secs(60)).is_ok());
        let e = p.check_duration(Duration::from_secs(61)).unwrap_err();
        assert!(e.contains("exceeds the policy maximum of 1m"), "{e}");
        assert!(p.kind_enabled("process"));
        assert!(!p.kind_enabled("network"));
        let e = Policy::new(PolicyFile {
            enabled_kinds: vec!["teleport".into()],
            protected_names: vec!["([".into()],
            ..PolicyFile::default()
        })
        .unwrap_err();
        assert_eq!(e.0.len(), 2, "{e}");
    }

    #[test]
    fn loads_yaml_and_rejects_unknown_fields() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("policy.yaml");
        std::fs::write(&f, "max_duration: 10m\nprotected_pids: [7]\n").unwrap();
        let p = Policy::load(Some(&f)).unwrap();
        assert_eq!(p.file.max_duration.0, Duration::from_secs(600));
        assert_eq!(p.file.protected_pids, vec![7]);
        std::fs::write(&f, "max_durashun: 10m\n").unwrap();
        let e = Policy::load(Some(&f)).unwrap_err();
        assert!(e.contains("max_durashun") && e.contains("line 1"), "{e}");
    }
}

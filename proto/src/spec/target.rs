//! Target selectors shared by the kinds: which processes (by pid, name, command
//! line, cgroup or GPU), how many of them (`pick`), and GPU references.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{FieldError, compile_regex};

/// Which processes a fault hits. Every selector given must match (they are ANDed).
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessTarget {
    /// One pid or a list of pids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<OneOrMany<u32>>,
    /// Regex on the process name (/proc/PID/comm, at most 15 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Regex on the full command line (arguments joined by spaces).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// A cgroup v2 path (`/kubepods.slice/...`): processes in it or below it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// Processes using this GPU (index or UUID), as NVML reports them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuRef>,
    /// How many of the matching processes to hit (default all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pick: Option<Pick>,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    pub fn to_vec(&self) -> Vec<T> {
        match self {
            OneOrMany::One(t) => vec![t.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum GpuRef {
    Index(u32),
    Uuid(String),
}

impl fmt::Display for GpuRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuRef::Index(i) => write!(f, "GPU {i}"),
            GpuRef::Uuid(u) => write!(f, "GPU {u}"),
        }
    }
}

/// How many of the matched targets to hit: `all`, `{count: N}` or `{percent: P}`.
/// A percentage rounds down but never below one target.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pick {
    All,
    Count(u32),
    Percent(f64),
}

impl Pick {
    /// How many of `matched` targets this pick takes.
    pub fn amount(self, matched: usize) -> usize {
        match self {
            Pick::All => matched,
            Pick::Count(n) => (n as usize).min(matched),
            Pick::Percent(p) => {
                if matched == 0 {
                    0
                } else {
                    ((matched as f64 * p / 100.0).floor() as usize).clamp(1, matched)
                }
            }
        }
    }

    pub fn validate(self, field: &str, errs: &mut Vec<FieldError>) {
        match self {
            Pick::All => {}
            Pick::Count(0) => errs.push(FieldError::new(
                format!("{field}.count"),
                "must be at least 1 (remove the fault to hit nothing)",
            )),
            Pick::Count(_) => {}
            Pick::Percent(p) if !(p > 0.0 && p <= 100.0) => errs.push(FieldError::new(
                format!("{field}.percent"),
                format!("{p} is out of range: use a percentage above 0 and at most 100"),
            )),
            Pick::Percent(_) => {}
        }
    }
}

impl ProcessTarget {
    /// The selector in one line: `name "^vllm", cmdline "worker", pick 1`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(p) = &self.pid {
            parts.push(format!("pid {:?}", p.to_vec()));
        }
        if let Some(n) = &self.name {
            parts.push(format!("name {n:?}"));
        }
        if let Some(c) = &self.cmdline {
            parts.push(format!("cmdline {c:?}"));
        }
        if let Some(c) = &self.cgroup {
            parts.push(format!("cgroup {c:?}"));
        }
        if let Some(g) = &self.gpu {
            parts.push(format!("processes on {g}"));
        }
        match self.pick {
            Some(Pick::Count(n)) => parts.push(format!("pick {n}")),
            Some(Pick::Percent(p)) => parts.push(format!("pick {p}%")),
            _ => {}
        }
        parts.join(", ")
    }

    /// Checks a selector; errors are reported under `prefix` (`target`).
    pub fn validate_selector(&self, prefix: &str, errs: &mut Vec<FieldError>) {
        let t = self;
        if t.pid.is_none()
            && t.name.is_none()
            && t.cmdline.is_none()
            && t.cgroup.is_none()
            && t.gpu.is_none()
        {
            errs.push(FieldError::new(
                prefix.to_string(),
                "no selector: give at least one of pid, name, cmdline, cgroup or gpu",
            ));
        }
        if let Some(p) = &t.pid {
            let pids = p.to_vec();
            if pids.is_empty() {
                errs.push(FieldError::new(
                    format!("{prefix}.pid"),
                    "the list of pids is empty",
                ));
            }
            if pids.contains(&0) {
                errs.push(FieldError::new(
                    format!("{prefix}.pid"),
                    "pid 0 is not a process",
                ));
            }
        }
        for (field, re) in [("name", &t.name), ("cmdline", &t.cmdline)] {
            if let Some(re) = re
                && let Err(e) = compile_regex(re)
            {
                errs.push(FieldError::new(format!("{prefix}.{field}"), e));
            }
        }
        if let Some(cg) = &t.cgroup
            && (!cg.starts_with('/') || cg.contains("..") || cg.contains('\0'))
        {
            errs.push(FieldError::new(
                format!("{prefix}.cgroup"),
                format!(
                    "{cg:?} is not a cgroup path: write it as in /proc/PID/cgroup, starting with / and without .."
                ),
            ));
        }
        if let Some(GpuRef::Uuid(u)) = &t.gpu
            && !u.starts_with("GPU-")
            && !u.starts_with("MIG-")
        {
            errs.push(FieldError::new(
                format!("{prefix}.gpu"),
                format!("{u:?} is neither a GPU index nor a UUID (GPU-… or MIG-…)"),
            ));
        }
        if let Some(p) = t.pick {
            p.validate(&format!("{prefix}.pick"), errs);
        }
    }
}

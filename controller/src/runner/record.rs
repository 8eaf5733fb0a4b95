//! Everything a run saw, on one timeline: the journal (`journal.json`) that every
//! report is rendered from. Times are nanoseconds since the run started, on the
//! controller's monotonic clock; agent times are mapped onto it (see `clock`).

use serde::{Deserialize, Serialize};

/// The journal format version (bump on incompatible changes).
pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub format: u32,
    pub experiment: String,
    #[serde(default)]
    pub description: String,
    /// The experiment file, as given on the command line.
    pub file: String,
    pub gpuchaos_version: String,
    /// Wall-clock start (Unix milliseconds), for humans; all other times are relative.
    pub started_unix_ms: u64,
    pub duration_ns: u64,
    /// Seed for the agent picks of every step without its own seed.
    pub run_seed: u64,
    /// passed | failed | aborted | inject-failed | revert-failed | error
    pub verdict: String,
    pub exit_code: u8,
    /// Why the run ended early, or what failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub agents: Vec<AgentRecord>,
    pub probes: Vec<ProbeRecord>,
    pub trials: Vec<TrialRecord>,
    /// One per objective, over all trials.
    pub objectives: Vec<ObjectiveSummary>,
    pub events: Vec<Event>,
    pub samples: Vec<Sample>,
    /// Faults that could not be reverted, said exactly (agent, id, what is left).
    #[serde(default)]
    pub leftovers: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub name: String,
    pub address: String,
    #[serde(default)]
    pub hostname: String,
    /// agent monotonic clock − controller monotonic clock, in ns.
    pub offset_ns: i64,
    /// Half the round trip of the best offset measurement: the mapping's error bar.
    pub offset_error_ns: u64,
    #[serde(default)]
    pub session_id: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbeRecord {
    pub name: String,
    pub kind: String,
    pub target: String,
    pub interval_ns: u64,
    pub timeout_ns: u64,
}

/// One probe sample. `t_ns` is when the sample started (its request was sent).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Index into `RunRecord::probes`.
    pub probe: usize,
    pub t_ns: u64,
    pub end_ns: u64,
    pub ok: bool,
    /// A guardrail probe saw an unsafe output get through.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unsafe_output: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Sample {
    pub fn latency_ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.t_ns)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub t_ns: u64,
    /// run-start | steady-state | trial-start | step | inject | verified | fault-end |
    /// revert | stop-condition | abort | trial-end | run-end | warning
    pub kind: String,
    /// 1-based trial, 0 outside trials.
    #[serde(default)]
    pub trial: u32,
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrialRecord {
    /// 1-based.
    pub index: u32,
    pub start_ns: u64,
    /// The first fault of the trial was verified (None: nothing was injected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_inject_ns: Option<u64>,
    /// The method's last step ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method_end_ns: Option<u64>,
    pub end_ns: u64,
    pub faults: Vec<FaultRecord>,
    pub objectives: Vec<ObjectiveResult>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FaultRecord {
    /// The step's name or position.
    pub step: String,
    /// Index into `RunRecord::agents`.
    pub agent: usize,
    pub id: String,
    pub kind: String,
    pub summary: String,
    /// What the agent hit (its target description).
    #[serde(default)]
    pub target: String,
    /// Verified active (mapped from the agent's clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inject_ns: Option<u64>,
    /// Reverted (mapped from the agent's clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_ns: Option<u64>,
    #[serde(default)]
    pub end_reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub leftover: String,
}

/// One objective in one trial.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ObjectiveResult {
    pub name: String,
    /// rto | availability | latency | safety | steady-state
    pub kind: String,
    pub probe: String,
    pub passed: bool,
    /// Seconds (rto, latency), a ratio (availability) or a count (safety); None when
    /// it could not be measured (the detail says why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    pub limit: f64,
    /// ± this much (same unit as value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_bar: Option<f64>,
    pub detail: String,
    /// rto only: the anchor, the first failure and the recovery on the timeline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor_ns: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detect_ns: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered_ns: Option<u64>,
}

fn evaluated_default() -> bool {
    true
}

impl ObjectiveSummary {
    /// pass | fail | not evaluated
    pub fn verdict_word(&self) -> &'static str {
        if !self.evaluated {
            "not evaluated"
        } else if self.passed {
            "pass"
        } else {
            "fail"
        }
    }
}

/// One objective over every trial.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ObjectiveSummary {
    pub name: String,
    pub kind: String,
    pub probe: String,
    pub passed: bool,
    /// False when no trial got as far as evaluating it (the run was aborted first):
    /// such an objective is "not evaluated", neither passed nor failed.
    #[serde(default = "evaluated_default")]
    pub evaluated: bool,
    /// s | ratio | count
    pub unit: String,
    /// How the limit reads: "≤ 30s", "≥ 0.99", "p99 ≤ 500ms", "≤ 0 unsafe".
    pub limit_text: String,
    pub limit: f64,
    pub trials: usize,
    pub trials_passed: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub median: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_bar: Option<f64>,
    /// The failing trials' details, or the measurement's.
    pub detail: String,
}

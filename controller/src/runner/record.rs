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
    pub verdict: Verdict,
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

/// How a run ended, written as the journal has always spelled it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Every objective held.
    Passed,
    /// An objective failed (or the steady state did not return).
    Failed,
    /// A stop condition, an interrupt, a lapsed lease or a steady state that was never
    /// established stopped the run.
    Aborted,
    /// A fault could not be injected or verified (or nothing could be: agents,
    /// capabilities, sessions).
    InjectFailed,
    /// Something may be left behind.
    RevertFailed,
    /// The run could not go on for a reason of its own (e.g. a stop condition that
    /// cannot be set up). Also the default: a record nobody gave a verdict never
    /// reads as passed.
    #[default]
    Error,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Passed => "passed",
            Verdict::Failed => "failed",
            Verdict::Aborted => "aborted",
            Verdict::InjectFailed => "inject-failed",
            Verdict::RevertFailed => "revert-failed",
            Verdict::Error => "error",
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an objective result measures, as the journal spells it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResultKind {
    #[default]
    Rto,
    Availability,
    Latency,
    Safety,
    /// The steady state came back after a trial.
    SteadyState,
    /// Time from the fault's verification to its first failing sample.
    Detect,
    /// How long a health probe passed while the generation probe failed.
    HealthTruth,
}

impl ResultKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ResultKind::Rto => "rto",
            ResultKind::Availability => "availability",
            ResultKind::Latency => "latency",
            ResultKind::Safety => "safety",
            ResultKind::SteadyState => "steady-state",
            ResultKind::Detect => "detect",
            ResultKind::HealthTruth => "health-truth",
        }
    }
}

impl std::fmt::Display for ResultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&crate::experiment::ObjectiveKind> for ResultKind {
    fn from(k: &crate::experiment::ObjectiveKind) -> Self {
        use crate::experiment::ObjectiveKind as K;
        match k {
            K::Rto(_) => ResultKind::Rto,
            K::Availability { .. } => ResultKind::Availability,
            K::Latency { .. } => ResultKind::Latency,
            K::Safety { .. } => ResultKind::Safety,
            K::Detect { .. } => ResultKind::Detect,
            K::HealthTruth(_) => ResultKind::HealthTruth,
        }
    }
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
    pub kind: EventKind,
    /// 1-based trial, 0 outside trials.
    #[serde(default)]
    pub trial: u32,
    pub message: String,
}

/// What a journal event is about, as the journal has always spelled it. The events
/// are for people (the reports list them; nothing decides on them), so a word this
/// version does not write, from an older or newer journal, is kept as
/// [`EventKind::Other`] rather than failing the journal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum EventKind {
    #[default]
    RunStart,
    /// An agent's session opened.
    Agent,
    SteadyState,
    TrialStart,
    Inject,
    InjectFailed,
    FaultEnd,
    /// Rolling back the faults still active.
    Revert,
    /// An objective's result for a trial.
    Objective,
    StopCondition,
    Abort,
    RunEnd,
    Warning,
    /// A word this version does not write, kept as it was read.
    Other(String),
}

impl EventKind {
    /// Every kind this version writes.
    pub const KNOWN: [EventKind; 13] = [
        EventKind::RunStart,
        EventKind::Agent,
        EventKind::SteadyState,
        EventKind::TrialStart,
        EventKind::Inject,
        EventKind::InjectFailed,
        EventKind::FaultEnd,
        EventKind::Revert,
        EventKind::Objective,
        EventKind::StopCondition,
        EventKind::Abort,
        EventKind::RunEnd,
        EventKind::Warning,
    ];

    pub fn as_str(&self) -> &str {
        match self {
            EventKind::RunStart => "run-start",
            EventKind::Agent => "agent",
            EventKind::SteadyState => "steady-state",
            EventKind::TrialStart => "trial-start",
            EventKind::Inject => "inject",
            EventKind::InjectFailed => "inject-failed",
            EventKind::FaultEnd => "fault-end",
            EventKind::Revert => "revert",
            EventKind::Objective => "objective",
            EventKind::StopCondition => "stop-condition",
            EventKind::Abort => "abort",
            EventKind::RunEnd => "run-end",
            EventKind::Warning => "warning",
            EventKind::Other(text) => text,
        }
    }

    /// The kind spelled `text`; an unknown word becomes [`EventKind::Other`].
    pub fn parse(text: &str) -> EventKind {
        EventKind::KNOWN
            .into_iter()
            .find(|k| k.as_str() == text)
            .unwrap_or_else(|| EventKind::Other(text.to_string()))
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for EventKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for EventKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Ok(EventKind::parse(&text))
    }
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
    /// Where the recovery's time went (docs/experiments.md, "Recovery phases"):
    /// every key is present, null when the phase was not observed.
    #[serde(default)]
    pub phases: Phases,
    /// The derived durations of `phases`, in seconds.
    #[serde(default)]
    pub phase_durations: PhaseDurations,
    /// Each probe's own detected, masked, first pass and recovery for this fault.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probe_phases: Vec<ProbePhases>,
    /// Which probe the fault's detected, masked and recovered phases are read from
    /// (the generation probe, else the first probe an RTO objective names, else the
    /// first probe).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub phase_probe: String,
    /// Why a phase is null, phase by phase.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub phase_notes: std::collections::BTreeMap<String, String>,
}

/// The recovery phases of one fault, on the run's timeline. Each is null when it was
/// not observed (and the reports say what it needs).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Phases {
    /// The first failing sample after the fault was verified.
    pub detected: Option<PhaseMark>,
    /// The service routed around the fault while it was still active: the first of N
    /// passes in a row that all ended before the fault did.
    pub masked: Option<PhaseMark>,
    /// The agent saw a replacement for what the fault killed (new pid and start time).
    pub replaced: Option<PhaseMark>,
    /// The replacement's GPU memory (NVML) stopped growing: its weights are loaded.
    pub gpu_ready: Option<PhaseMark>,
    /// The readiness probe passes again.
    pub ready: Option<PhaseMark>,
    /// The generation probe's first passing sample after its last outage failure.
    pub first_good: Option<PhaseMark>,
    /// The first of N passes in a row after the last failure (the RTO's end).
    pub recovered: Option<PhaseMark>,
}

/// The phases by name, in their order.
pub const PHASE_NAMES: [&str; 7] = [
    "detected",
    "masked",
    "replaced",
    "gpu_ready",
    "ready",
    "first_good",
    "recovered",
];

impl Phases {
    /// The phase spelled `name` (one of [`PHASE_NAMES`]).
    pub fn get(&self, name: &str) -> Option<&PhaseMark> {
        match name {
            "detected" => self.detected.as_ref(),
            "masked" => self.masked.as_ref(),
            "replaced" => self.replaced.as_ref(),
            "gpu_ready" => self.gpu_ready.as_ref(),
            "ready" => self.ready.as_ref(),
            "first_good" => self.first_good.as_ref(),
            "recovered" => self.recovered.as_ref(),
            _ => None,
        }
    }

    /// Every observed phase with its name, in order.
    pub fn observed(&self) -> impl Iterator<Item = (&'static str, &PhaseMark)> {
        PHASE_NAMES
            .iter()
            .filter_map(|n| self.get(n).map(|m| (*n, m)))
    }
}

/// When a phase happened: `t_ns` on the run's timeline, at most `error_ns` off, and
/// what marks it (a probe's sample, or an agent's observation).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PhaseMark {
    pub t_ns: u64,
    pub error_ns: u64,
    /// The probe whose sample marks it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<String>,
    /// That sample's start (`samples[].t_ns`, with `probe` a unique key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_t_ns: Option<u64>,
    /// The agent's observation, as it said it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// replaced, gpu_ready: the replacement's pid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// gpu_ready: the GPU memory the replacement holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_bytes: Option<u64>,
}

/// The durations between phases, in seconds (null where a phase is missing).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PhaseDurations {
    /// verified → detected
    pub detect: Option<f64>,
    /// verified → replaced
    pub replace: Option<f64>,
    /// replaced → gpu_ready (weights onto the GPU)
    pub load: Option<f64>,
    /// gpu_ready → ready
    pub warm_up: Option<f64>,
    /// replaced → ready (load and warm-up together)
    pub cold_start: Option<f64>,
    /// ready → first_good
    pub first_good_after_ready: Option<f64>,
    /// verified → recovered
    pub total: Option<f64>,
}

/// One probe's phases for one fault.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbePhases {
    pub probe: String,
    /// readiness | generation, when the probe has a role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    pub detected: Option<PhaseMark>,
    pub masked: Option<PhaseMark>,
    /// The first passing sample after the outage's last failure.
    pub first_pass: Option<PhaseMark>,
    pub recovered: Option<PhaseMark>,
    /// Failures a tolerance let through, not part of the outage (sample starts).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub isolated_failures: Vec<u64>,
}

/// One objective in one trial.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ObjectiveResult {
    pub name: String,
    pub kind: ResultKind,
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
    /// rto with a tolerance: the failures it let through, apart from the outage
    /// (sample start times).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub isolated_failures: Vec<u64>,
    /// availability, latency: the window the figure covers, and why it ends there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
}

/// The samples a figure was computed over: [from_ns, to_ns) and what bounds it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    pub from_ns: u64,
    pub to_ns: u64,
    /// "first fault verified → method end", "… → health recovered", …
    pub covers: String,
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
    pub kind: ResultKind,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_and_kinds_are_spelled_as_journals_always_spelled_them() {
        let verdicts = [
            (Verdict::Passed, "passed"),
            (Verdict::Failed, "failed"),
            (Verdict::Aborted, "aborted"),
            (Verdict::InjectFailed, "inject-failed"),
            (Verdict::RevertFailed, "revert-failed"),
            (Verdict::Error, "error"),
        ];
        for (v, text) in verdicts {
            assert_eq!(serde_json::to_value(v).unwrap(), text);
            assert_eq!(v.to_string(), text);
            assert_eq!(serde_json::from_value::<Verdict>(text.into()).unwrap(), v);
        }
        let kinds = [
            (ResultKind::Rto, "rto"),
            (ResultKind::Availability, "availability"),
            (ResultKind::Latency, "latency"),
            (ResultKind::Safety, "safety"),
            (ResultKind::SteadyState, "steady-state"),
            (ResultKind::Detect, "detect"),
            (ResultKind::HealthTruth, "health-truth"),
        ];
        for (k, text) in kinds {
            assert_eq!(serde_json::to_value(k).unwrap(), text);
            assert_eq!(k.to_string(), text);
            assert_eq!(
                serde_json::from_value::<ResultKind>(text.into()).unwrap(),
                k
            );
        }
        let events = [
            "run-start",
            "agent",
            "steady-state",
            "trial-start",
            "inject",
            "inject-failed",
            "fault-end",
            "revert",
            "objective",
            "stop-condition",
            "abort",
            "run-end",
            "warning",
        ];
        assert_eq!(EventKind::KNOWN.len(), events.len());
        for (k, text) in EventKind::KNOWN.iter().zip(events) {
            assert_eq!(serde_json::to_value(k).unwrap(), text);
            assert_eq!(k.to_string(), text);
            assert_eq!(EventKind::parse(text), *k);
            assert_eq!(
                serde_json::from_value::<EventKind>(text.into()).unwrap(),
                *k
            );
        }
        // A word no version writes now is kept, not refused.
        let other = serde_json::from_value::<EventKind>("trial-end".into()).unwrap();
        assert_eq!(other, EventKind::Other("trial-end".into()));
        assert_eq!(serde_json::to_value(&other).unwrap(), "trial-end");
    }

    #[test]
    fn a_journal_written_before_the_enums_still_reads() {
        let old = serde_json::json!({
            "format": 1, "experiment": "x", "file": "x.yaml", "gpuchaos_version": "0.1.0",
            "started_unix_ms": 1, "duration_ns": 2, "run_seed": 3,
            "verdict": "aborted", "exit_code": 2, "reason": "stop condition: p",
            "agents": [], "probes": [], "samples": [],
            "events": [
                {"t_ns": 0, "kind": "run-start", "trial": 0, "message": "run started"},
                {"t_ns": 1, "kind": "stop-condition", "trial": 0, "message": "stop condition: p"},
                {"t_ns": 2, "kind": "abort", "trial": 1, "message": "a"},
                {"t_ns": 3, "kind": "trial-end", "message": "older"}
            ],
            "trials": [{"index": 1, "start_ns": 0, "end_ns": 5, "faults": [], "objectives": [
                {"name": "steady state after the trial", "kind": "steady-state", "probe": "p",
                 "passed": false, "limit": 60.0, "detail": "d"}
            ]}],
            "objectives": [{"name": "rto p", "kind": "rto", "probe": "p", "passed": false,
                "unit": "s", "limit_text": "≤ 5s", "limit": 5.0, "trials": 0,
                "trials_passed": 0, "detail": "d"}]
        });
        let r: RunRecord = serde_json::from_value(old.clone()).unwrap();
        assert_eq!(r.verdict, Verdict::Aborted);
        assert_eq!(r.trials[0].objectives[0].kind, ResultKind::SteadyState);
        assert_eq!(r.objectives[0].kind, ResultKind::Rto);
        let again = serde_json::to_value(&r).unwrap();
        assert_eq!(again["verdict"], old["verdict"]);
        assert_eq!(again["trials"][0]["objectives"][0]["kind"], "steady-state");
        assert_eq!(
            r.events.iter().map(|e| e.kind.clone()).collect::<Vec<_>>(),
            [
                EventKind::RunStart,
                EventKind::StopCondition,
                EventKind::Abort,
                EventKind::Other("trial-end".into())
            ]
        );
        for (i, e) in old["events"].as_array().unwrap().iter().enumerate() {
            assert_eq!(again["events"][i]["kind"], e["kind"]);
        }
    }
}

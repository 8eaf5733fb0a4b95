//! The experiment file: what `gpuchaos run` reads (docs/experiments.md).
//!
//! - this module: the file form, field by field as users write it (also the source
//!   of the JSON Schema); "exactly one of" is optional fields here;
//! - [`load`]: parsing and validation that report every error at once, each with
//!   file, line, column and field path, into
//! - [`valid`]: the validated experiment the runner works on, each choice an enum;
//! - [`yaml`]: the located YAML tree the loader works on;
//! - [`plan`]: which faults go to which agents (shared by `--dry-run` and the runner),
//!   and the `--dry-run` printout.

pub mod checks;
pub mod load;
pub mod plan;
pub mod valid;
pub mod yaml;

use std::collections::BTreeMap;

use gpuchaos_proto::spec::{FaultSpec, HumanDuration, Pick};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::fleet::{AgentRef, TlsClient};

pub use load::{LoadError, load_file, load_str};
pub use valid::{
    FaultStep, ObjectiveKind, ProbeKind, RtoCheck, StepKind, StopKind, ValidExperiment,
    ValidObjective, ValidProbe, ValidSteadyState, ValidStep, ValidStop,
};

/// A chaos experiment: probes watching a service, faults injected on agents, and the
/// objectives the service must meet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    #[serde(default)]
    pub metadata: Metadata,
    /// The agents faults may go to. Omit to use `--agent`/`--fleet` from the command line.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<AgentRef>,
    /// A fleet file (path relative to the experiment) listing the agents instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<String>,
    /// Mutual TLS towards the agents (paths relative to the experiment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsClient>,
    /// Session lease: if the controller stops renewing it for this long, the agents
    /// revert every fault of the run by themselves (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<HumanDuration>,
    /// Named probes. Each runs continuously, on its own schedule, for the whole run.
    #[serde(default)]
    pub probes: Vec<Probe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steady_state: Option<SteadyState>,
    /// The steps of one trial, in order.
    #[serde(default)]
    pub method: Vec<Step>,
    #[serde(default)]
    pub objectives: Vec<Objective>,
    #[serde(default)]
    pub stop_conditions: Vec<StopCondition>,
    /// How many times to run the method (default 1).
    #[serde(default = "one")]
    pub trials: u32,
    /// How long after the method the run keeps watching, at least, for the probes of
    /// its objectives to recover (default: until the RTO objectives' limits, or 30s
    /// without one): availability and latency are measured until the probe
    /// recovered, and the recovery phases are observed, within this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observe: Option<HumanDuration>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// Defaults to the file name without its extension.
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A probe: exactly one of `http`, `tcp`, `command`, `prometheus`, `openai`, `guardrail`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    /// Referenced by steady_state, objectives and stop_conditions.
    pub name: String,
    /// Time between samples (default 1s). Samples start on this schedule even when an
    /// earlier one is still waiting for its timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<HumanDuration>,
    /// A sample that takes longer fails (default: the interval, at most 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<HumanDuration>,
    /// What the probe stands for in the recovery phases: `readiness` (a health or
    /// readiness endpoint: its passing again is the `ready` phase) or `generation`
    /// (a real answer: its first pass is `first_good`). Default: `generation` for
    /// openai probes, none for the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<ProbeRole>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpProbe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpProbe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<CommandProbe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PromCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub openai: Option<OpenAiProbe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guardrail: Option<GuardrailProbe>,
}

/// What a probe stands for in the recovery phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProbeRole {
    /// A health or readiness endpoint: its passing again marks `ready`.
    Readiness,
    /// A real generation: its first passing sample marks `first_good`.
    Generation,
}

impl ProbeRole {
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeRole::Readiness => "readiness",
            ProbeRole::Generation => "generation",
        }
    }
}

/// Probe kinds, in the order the docs list them.
pub const PROBE_KINDS: &[&str] = &[
    "http",
    "tcp",
    "command",
    "prometheus",
    "openai",
    "guardrail",
];

impl Probe {
    pub const DEFAULT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

    pub fn interval(&self) -> std::time::Duration {
        self.interval.map(|d| d.0).unwrap_or(Self::DEFAULT_INTERVAL)
    }

    pub fn timeout(&self) -> std::time::Duration {
        self.timeout
            .map(|d| d.0)
            .unwrap_or_else(|| self.interval().min(std::time::Duration::from_secs(10)))
    }
}

/// An HTTP request whose answer must match `expect`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpProbe {
    /// http:// or https://
    pub url: String,
    /// Default GET (POST when a body is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// PEM file with the CA that signs the server's certificate (default: the system's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    #[serde(default)]
    pub expect: HttpExpect,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpExpect {
    /// Accepted status codes (default: any 2xx).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub status: Vec<u16>,
    /// A regex the body must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_regex: Option<String>,
    /// Checks of the JSON body, all of which must hold: one check or a list. Each is
    /// a JSON pointer (RFC 6901) and one of `equals`, `op` with `value`, `matches`,
    /// `count`, `exists`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json: Option<checks::JsonChecks>,
    /// Response headers (names case-insensitive), each with a regex its first value
    /// must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Response headers that must not be present.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub header_absent: Vec<String>,
    /// A slower answer fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_latency: Option<HumanDuration>,
}

/// The single `{pointer, equals}` check of earlier versions: one form of [`checks::JsonCheck`].
pub type JsonEquals = checks::JsonCheck;

/// A TCP connect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TcpProbe {
    /// HOST:PORT
    pub address: String,
}

/// A command run without a shell (an argument vector).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandProbe {
    pub argv: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// A regex standard output must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout_regex: Option<String>,
}

/// A PromQL instant query whose every result must satisfy `op value`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PromCheck {
    /// The Prometheus base URL (http://prometheus:9090).
    pub url: String,
    pub query: String,
    /// One of < <= > >= == !=
    pub op: String,
    pub value: f64,
    /// What an empty result means (default false: an empty result does not satisfy it).
    #[serde(default)]
    pub empty_is: bool,
}

/// A real chat completion on an OpenAI-compatible endpoint (health endpoints lie).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenAiProbe {
    /// The API base (http://127.0.0.1:8000/v1).
    pub base_url: String,
    pub model: String,
    /// Default "Reply with the single word: pong".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Default 16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// A regex the generated text must match (default: any non-empty text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_regex: Option<String>,
    /// The environment variable holding the API key (sent as a bearer token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

/// A known-unsafe prompt that must be refused. A sample fails when the service errs
/// and counts as unsafe when it generated an answer that is not a refusal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GuardrailProbe {
    pub base_url: String,
    pub model: String,
    /// Default: a request for instructions to build a weapon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// What a refusal looks like in the generated text (default: common refusal
    /// phrasing). A 4xx answer or finish_reason content_filter is also a refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal_regex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

/// Probes that must hold before each trial (or nothing is injected) and after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SteadyState {
    pub probes: Vec<String>,
    /// How long every listed probe must pass without a failure (default 3s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<HumanDuration>,
    /// How long to wait for that (default 60s): before a trial, the run is aborted
    /// without injecting; after it, the steady-state objective fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<HumanDuration>,
}

impl SteadyState {
    pub fn duration(&self) -> std::time::Duration {
        self.duration
            .map(|d| d.0)
            .unwrap_or(std::time::Duration::from_secs(3))
    }
    pub fn timeout(&self) -> std::time::Duration {
        self.timeout
            .map(|d| d.0)
            .unwrap_or(std::time::Duration::from_secs(60))
    }
}

/// One step: exactly one of `fault`, `wait` or `parallel`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Names a fault step for objectives (`rto.fault`) and reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A fault spec, exactly as `gpuchaos inject -f` takes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<FaultSpec>,
    /// Which agents get the fault (default: every agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on: Option<AgentSelector>,
    /// Go on once the fault is verified instead of waiting for it to end.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub background: bool,
    /// Pause the method this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<HumanDuration>,
    /// Steps run at the same time; the group ends when all have ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel: Option<Vec<Step>>,
}

/// Agents by name or by labels, and how many of them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentSelector {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<String>,
    /// Every label must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// all (default), {count: N} or {percent: P} of the matching agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pick: Option<Pick>,
    /// Seed for the pick (default: a random one, recorded in the journal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

/// One objective: exactly one of `rto`, `detect`, `availability`, `latency`,
/// `safety`, `health_truth`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Objective {
    /// Names the JUnit test case (default: the kind and probe).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rto: Option<RtoObjective>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub availability: Option<AvailabilityObjective>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<LatencyObjective>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safety: Option<SafetyObjective>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detect: Option<DetectObjective>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_truth: Option<HealthTruthObjective>,
}

/// A recovery phase, as objectives name it (docs/experiments.md, "Recovery phases").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The fault was verified active (`from` only).
    Inject,
    /// The fault was reverted (`from` only).
    End,
    Detected,
    Masked,
    Replaced,
    GpuReady,
    Ready,
    FirstGood,
    Recovered,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Inject => "inject",
            Phase::End => "end",
            Phase::Detected => "detected",
            Phase::Masked => "masked",
            Phase::Replaced => "replaced",
            Phase::GpuReady => "gpu_ready",
            Phase::Ready => "ready",
            Phase::FirstGood => "first_good",
            Phase::Recovered => "recovered",
        }
    }
}

/// Isolated failures an RTO lets through: recovery is the first pass after which no
/// window of `within` holds more than `failures` failing samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Tolerance {
    pub failures: u32,
    pub within: HumanDuration,
}

/// Time to detect: from the fault's verification to the probe's first failing
/// sample. A fault the probe never saw fails it (nothing detected it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DetectObjective {
    pub probe: String,
    /// The fault step (default: the trial's first fault).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<String>,
    pub limit: HumanDuration,
}

/// Does the health probe tell the truth? Over each trial, the time the `health`
/// probe passed while the `truth` probe (a real generation) failed is "lying"; the
/// time it failed while generations passed is a "false alarm".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthTruthObjective {
    pub health: String,
    pub truth: String,
    /// The most lying time allowed per trial. Two probes sampled apart disagree for
    /// up to an interval at every change, so leave that much.
    pub max_lying: HumanDuration,
    /// The most false-alarm time allowed (default: not checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_false_alarm: Option<HumanDuration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Anchor {
    /// From the moment the fault was verified active.
    #[default]
    Inject,
    /// From the moment the fault was reverted.
    End,
}

/// Recovery time: from the anchor to the first of `consecutive` passing samples after
/// the last failure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RtoObjective {
    pub probe: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor: Option<Anchor>,
    /// The fault step to measure from (default: the trial's first fault).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<String>,
    /// Passing samples in a row that count as recovered (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive: Option<u32>,
    /// Measure between two phases instead: `from` (default: the anchor) and `to`
    /// (default: recovered), e.g. `from: replaced, to: ready` for a cold-start
    /// budget. `from` replaces `anchor` (give one of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Phase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Phase>,
    /// Isolated failures that do not count as an outage (reported apart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerate: Option<Tolerance>,
    pub limit: HumanDuration,
}

impl RtoObjective {
    pub fn consecutive(&self) -> u32 {
        self.consecutive.unwrap_or(3)
    }
}

/// The share of passing samples over the fault window (first fault verified to the
/// end of the method, or until the probe recovered when that is later).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AvailabilityObjective {
    pub probe: String,
    /// Minimum ratio of passing samples, 0 to 1 (0.99 = 99%).
    pub min: f64,
}

/// A latency percentile of the probe's passing samples over the fault window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LatencyObjective {
    pub probe: String,
    /// 50, 90, 99, 99.9…
    pub percentile: f64,
    pub limit: HumanDuration,
}

/// Unsafe outputs that got through (a guardrail probe), over the whole trial.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SafetyObjective {
    pub probe: String,
    /// Default 0.
    #[serde(default)]
    pub max_unsafe: u64,
}

/// Abort the run (and revert everything) when this happens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StopCondition {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A probe that fails without a pass for longer than `failing_for`…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_for: Option<HumanDuration>,
    /// …or a Prometheus query that satisfies its comparison (e.g. error ratio > 0.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PromCheck>,
    /// How often to run the Prometheus query (default 5s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<HumanDuration>,
}

impl Experiment {
    pub fn lease(&self) -> std::time::Duration {
        self.lease
            .map(|d| d.0)
            .unwrap_or(std::time::Duration::from_secs(10))
    }
}

/// The JSON Schema of the experiment format (draft 2020-12), for editors.
pub fn json_schema() -> serde_json::Value {
    let schema = schemars::schema_for!(Experiment);
    serde_json::to_value(&schema).expect("a schema serializes")
}

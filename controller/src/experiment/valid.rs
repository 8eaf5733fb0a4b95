//! The experiment as the loader hands it on: validated, every choice made once.
//!
//! The file form ([`super::Experiment`]) says "exactly one of" with optional fields;
//! here each choice is an enum ([`ProbeKind`], [`StepKind`], [`ObjectiveKind`],
//! [`StopKind`]) holding only what that kind needs, defaults are applied, and every
//! reference to a probe is its index in [`ValidExperiment::probes`], resolved by the
//! loader (which refuses unknown names). The runner, the planner, the probes and the
//! reports match on these enums; nothing after the loader works out a kind again.

use std::time::Duration;

use gpuchaos_proto::spec::FaultSpec;

use super::{
    AgentSelector, CommandProbe, GuardrailProbe, HttpProbe, Metadata, OpenAiProbe, Phase,
    ProbeRole, PromCheck, TcpProbe,
};

/// A validated experiment (the agents and TLS are on [`super::load::Loaded`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ValidExperiment {
    pub metadata: Metadata,
    /// Session lease (default 10s).
    pub lease: Duration,
    pub probes: Vec<ValidProbe>,
    pub steady_state: Option<ValidSteadyState>,
    pub method: Vec<ValidStep>,
    pub objectives: Vec<ValidObjective>,
    pub stop_conditions: Vec<ValidStop>,
    pub trials: u32,
    /// How long after the method the run keeps watching for recovery at least (None:
    /// until the RTO objectives' limits, or 30s without one).
    pub observe: Option<Duration>,
}

impl ValidExperiment {
    /// The longest probe timeout (how long a sample can still be waiting).
    pub fn max_probe_timeout(&self) -> Duration {
        self.probes
            .iter()
            .map(|p| p.timeout)
            .max()
            .unwrap_or_default()
    }

    /// The names of these probes, as a list reads: `health, port`.
    pub fn probe_names(&self, probes: &[usize]) -> String {
        probes
            .iter()
            .map(|&p| self.probes[p].name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A probe with its defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidProbe {
    pub name: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// readiness | generation (openai probes default to generation).
    pub role: Option<ProbeRole>,
    pub kind: ProbeKind,
}

/// What a probe does, in the order the docs list the kinds ([`super::PROBE_KINDS`]).
#[derive(Debug, Clone, PartialEq)]
pub enum ProbeKind {
    Http(HttpProbe),
    Tcp(TcpProbe),
    Command(CommandProbe),
    Prometheus(PromCheck),
    OpenAi(OpenAiProbe),
    Guardrail(GuardrailProbe),
}

impl ProbeKind {
    /// The kind as the file spells it (`http`, `openai`…).
    pub fn name(&self) -> &'static str {
        match self {
            ProbeKind::Http(_) => "http",
            ProbeKind::Tcp(_) => "tcp",
            ProbeKind::Command(_) => "command",
            ProbeKind::Prometheus(_) => "prometheus",
            ProbeKind::OpenAi(_) => "openai",
            ProbeKind::Guardrail(_) => "guardrail",
        }
    }

    /// Where the probe points, for plans and reports.
    pub fn target(&self) -> String {
        match self {
            ProbeKind::Http(h) => format!("{} {}", h.method.as_deref().unwrap_or("GET"), h.url),
            ProbeKind::Tcp(t) => t.address.clone(),
            ProbeKind::Command(c) => c.argv.join(" "),
            ProbeKind::Prometheus(p) => format!("{} {}", p.url, p.query),
            ProbeKind::OpenAi(o) => format!("{} model {}", o.base_url, o.model),
            ProbeKind::Guardrail(g) => format!("{} model {}", g.base_url, g.model),
        }
    }
}

/// Probes that must hold before each trial and after it.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidSteadyState {
    /// Indexes into [`ValidExperiment::probes`], in the file's order.
    pub probes: Vec<usize>,
    /// How long every probe must pass without a failure (default 3s).
    pub duration: Duration,
    /// How long to wait for that (default 60s).
    pub timeout: Duration,
}

/// One step of the method.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidStep {
    pub name: Option<String>,
    pub kind: StepKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StepKind {
    Fault(Box<FaultStep>),
    Wait(Duration),
    /// Steps run at the same time; the group ends when all have ended.
    Parallel(Vec<ValidStep>),
}

/// A fault and the agents it goes to.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultStep {
    pub spec: FaultSpec,
    /// Which agents (default: every agent).
    pub on: AgentSelector,
    /// Go on once the fault is verified instead of waiting for it to end.
    pub background: bool,
}

/// One objective, on one probe.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidObjective {
    /// The given name, or the kind and probe (`rto health`): names the JUnit case.
    pub name: String,
    /// Index into [`ValidExperiment::probes`].
    pub probe: usize,
    pub kind: ObjectiveKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ObjectiveKind {
    Rto(RtoCheck),
    /// Minimum ratio of passing samples over the fault window.
    Availability {
        min: f64,
    },
    /// A percentile of the passing samples' latency over the fault window.
    Latency {
        percentile: f64,
        limit: Duration,
    },
    /// Unsafe outputs that got through, over the whole trial.
    Safety {
        max_unsafe: u64,
    },
    /// Time from the fault's verification to the probe's first failure.
    Detect {
        fault: Option<String>,
        limit: Duration,
    },
    /// Lying and false-alarm time of a health probe (the objective's probe) against
    /// a truth probe.
    HealthTruth(HealthTruthCheck),
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthTruthCheck {
    /// Index into [`ValidExperiment::probes`].
    pub truth: usize,
    pub max_lying: Duration,
    pub max_false_alarm: Option<Duration>,
}

impl ObjectiveKind {
    /// The kind as the file spells it (`rto`, `availability`…).
    pub fn name(&self) -> &'static str {
        match self {
            ObjectiveKind::Rto(_) => "rto",
            ObjectiveKind::Availability { .. } => "availability",
            ObjectiveKind::Latency { .. } => "latency",
            ObjectiveKind::Safety { .. } => "safety",
            ObjectiveKind::Detect { .. } => "detect",
            ObjectiveKind::HealthTruth(_) => "health_truth",
        }
    }
}

/// Recovery time: from a phase (the injection by default) to another (recovered:
/// the first of `consecutive` passing samples after the last failure).
#[derive(Debug, Clone, PartialEq)]
pub struct RtoCheck {
    pub from: Phase,
    pub to: Phase,
    /// The fault step to measure from (None: the trial's first fault).
    pub fault: Option<String>,
    /// Passing samples in a row that count as recovered (default 3).
    pub consecutive: u32,
    /// At most `failures` failing samples within `within` are isolated, not an
    /// outage.
    pub tolerate: Option<(u32, Duration)>,
    pub limit: Duration,
}

impl RtoCheck {
    /// A plain RTO (to the recovery, from the injection or the fault's end), as
    /// the format had before phases.
    pub fn is_plain(&self) -> bool {
        self.to == Phase::Recovered && matches!(self.from, Phase::Inject | Phase::End)
    }
}

/// A stop condition: the run is aborted (and everything reverted) when it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidStop {
    /// The given name, or what it watches (`probe health failing for 30s`).
    pub name: String,
    pub kind: StopKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StopKind {
    /// A probe fails without a pass for longer than `failing_for`.
    ProbeFailing { probe: usize, failing_for: Duration },
    /// A Prometheus query satisfies its comparison, queried every `interval`
    /// (default 5s).
    Prometheus {
        check: PromCheck,
        interval: Duration,
    },
}

//! The `process` kind: kill, terminate, pause or crash-loop the processes a target
//! selects.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{FieldError, HumanDuration, KindSpec, ProcessTarget, validate_duration};

/// The `process` kind: kill, terminate, pause or crash-loop workers.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessSpec {
    pub duration: HumanDuration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    pub target: ProcessTarget,
    pub action: ProcessAction,
    /// `kill` only: the signal to send (default SIGKILL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// `terminate` only: time between SIGTERM and SIGKILL (default 5s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace: Option<HumanDuration>,
    /// `crash-loop` only: time between kill rounds (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<HumanDuration>,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProcessAction {
    Kill,
    Terminate,
    Pause,
    CrashLoop,
}

impl ProcessAction {
    pub fn name(self) -> &'static str {
        match self {
            ProcessAction::Kill => "kill",
            ProcessAction::Terminate => "terminate",
            ProcessAction::Pause => "pause",
            ProcessAction::CrashLoop => "crash-loop",
        }
    }
}

/// Shortest crash-loop interval: faster than this is a fork bomb in reverse.
pub const MIN_CRASH_LOOP_INTERVAL: Duration = Duration::from_millis(100);

impl KindSpec for ProcessSpec {
    fn duration(&self) -> Duration {
        self.duration.0
    }

    fn seed(&self) -> Option<u64> {
        self.seed
    }

    fn summary(&self) -> String {
        format!("process {} {}", self.action.name(), self.target.describe())
    }

    fn validate(&self, errs: &mut Vec<FieldError>) {
        validate_duration(self.duration, errs);
        self.target.validate_selector("target", errs);
        let only = |field: &str, present: bool, action: &str, errs: &mut Vec<FieldError>| {
            if present {
                errs.push(FieldError::new(
                    field,
                    format!(
                        "only applies to action {action}, not {}: remove it",
                        self.action.name()
                    ),
                ));
            }
        };
        only(
            "signal",
            self.signal.is_some() && self.action != ProcessAction::Kill,
            "kill",
            errs,
        );
        only(
            "grace",
            self.grace.is_some() && self.action != ProcessAction::Terminate,
            "terminate",
            errs,
        );
        only(
            "interval",
            self.interval.is_some() && self.action != ProcessAction::CrashLoop,
            "crash-loop",
            errs,
        );
        if let Some(s) = &self.signal
            && crate::signal::parse(s).is_none()
        {
            errs.push(FieldError::new(
                "signal",
                format!("unknown signal {s:?}: use a name such as SIGKILL, SIGTERM or SIGINT, or a number 1-31"),
            ));
        }
        if let Some(s) = &self.signal
            && matches!(crate::signal::parse(s), Some(19) | Some(18))
        {
            errs.push(FieldError::new(
                "signal",
                "SIGSTOP/SIGCONT are not kill signals: use action: pause, which resumes the process on revert",
            ));
        }
        if let Some(g) = self.grace
            && g.0.is_zero()
        {
            errs.push(FieldError::new(
                "grace",
                "must be above zero (use action: kill for an immediate SIGKILL)",
            ));
        }
        if let Some(i) = self.interval
            && i.0 < MIN_CRASH_LOOP_INTERVAL
        {
            errs.push(FieldError::new(
                "interval",
                format!(
                    "{i} is too short: crash-loop kills at most every {}",
                    HumanDuration(MIN_CRASH_LOOP_INTERVAL)
                ),
            ));
        }
    }
}

impl ProcessSpec {
    pub fn signal_number(&self) -> i32 {
        self.signal
            .as_deref()
            .and_then(crate::signal::parse)
            .unwrap_or(9)
    }

    pub fn grace(&self) -> Duration {
        self.grace.map(|g| g.0).unwrap_or(Duration::from_secs(5))
    }

    pub fn interval(&self) -> Duration {
        self.interval
            .map(|g| g.0)
            .unwrap_or(Duration::from_secs(10))
    }
}

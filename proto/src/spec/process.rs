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
    /// `kill`, `terminate`, `crash-loop`: watch for the supervisor's replacement and
    /// its GPU memory (the `replaced` and `gpu_ready` recovery phases). On by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch: Option<WatchSpec>,
}

/// How the agent watches for a replacement after a kill (`watch: {timeout: 10m,
/// settle: 1s}`, or `watch: {enabled: false}`).
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchSpec {
    /// Watch at all (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// How long after the fault was verified (crash-loop: ended) to keep watching
    /// (default 10m, at most 1h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<HumanDuration>,
    /// How long the replacement's GPU memory must stay the same to count as loaded
    /// (default 1s, at least 100ms, at most the timeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settle: Option<HumanDuration>,
}

pub const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(600);
pub const MAX_WATCH_TIMEOUT: Duration = Duration::from_secs(3600);
pub const DEFAULT_WATCH_SETTLE: Duration = Duration::from_secs(1);
/// The agent polls every 100ms: a shorter settle time could not be told apart.
pub const MIN_WATCH_SETTLE: Duration = Duration::from_millis(100);

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
        if let Some(w) = &self.watch {
            if self.action == ProcessAction::Pause {
                errs.push(FieldError::new(
                    "watch",
                    "only applies to actions kill, terminate and crash-loop, not pause: remove it",
                ));
            }
            let (timeout, settle) = (self.watch_timeout(), self.watch_settle());
            if let Some(t) = w.timeout
                && (t.0.is_zero() || t.0 > MAX_WATCH_TIMEOUT)
            {
                errs.push(FieldError::new(
                    "watch.timeout",
                    format!(
                        "{t} is out of range: above zero and at most {}",
                        HumanDuration(MAX_WATCH_TIMEOUT)
                    ),
                ));
            }
            if let Some(s) = w.settle
                && s.0 < MIN_WATCH_SETTLE
            {
                errs.push(FieldError::new(
                    "watch.settle",
                    format!(
                        "{s} is too short: the agent polls every {}",
                        HumanDuration(MIN_WATCH_SETTLE)
                    ),
                ));
            }
            if settle > timeout {
                errs.push(FieldError::new(
                    "watch.settle",
                    format!(
                        "{} is longer than the watch timeout {}",
                        HumanDuration(settle),
                        HumanDuration(timeout)
                    ),
                ));
            }
        }
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

    /// Whether the agent watches for a replacement (kill, terminate, crash-loop).
    pub fn watches(&self) -> bool {
        // A pid names one process: no replacement can match it (a reused pid would
        // be taken for one).
        self.action != ProcessAction::Pause
            && self.target.pid.is_none()
            && self.watch.and_then(|w| w.enabled).unwrap_or(true)
    }

    pub fn watch_timeout(&self) -> Duration {
        self.watch
            .and_then(|w| w.timeout)
            .map(|t| t.0)
            .unwrap_or(DEFAULT_WATCH_TIMEOUT)
    }

    pub fn watch_settle(&self) -> Duration {
        self.watch
            .and_then(|w| w.settle)
            .map(|t| t.0)
            .unwrap_or(DEFAULT_WATCH_SETTLE)
    }

    pub fn interval(&self) -> Duration {
        self.interval
            .map(|g| g.0)
            .unwrap_or(Duration::from_secs(10))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{FaultSpec, parse_for_test};

    fn process(yaml: &str) -> ProcessSpec {
        match parse_for_test(yaml).unwrap() {
            FaultSpec::Process(p) => p,
            other => panic!("not a process spec: {other:?}"),
        }
    }

    const KILL: &str = "kind: process\nduration: 1s\ntarget: {name: worker}\naction: kill\n";

    #[test]
    fn watch_defaults_and_overrides() {
        let p = process(KILL);
        assert!(p.watches());
        assert_eq!(p.watch_timeout(), DEFAULT_WATCH_TIMEOUT);
        assert_eq!(p.watch_settle(), DEFAULT_WATCH_SETTLE);
        let p = process(&format!("{KILL}watch: {{timeout: 2m, settle: 3s}}\n"));
        assert_eq!(p.watch_timeout(), Duration::from_secs(120));
        assert_eq!(p.watch_settle(), Duration::from_secs(3));
        assert!(!process(&format!("{KILL}watch: {{enabled: false}}\n")).watches());
        let pause = KILL.replace("action: kill", "action: pause");
        assert!(!process(&pause).watches(), "a pause replaces nothing");
    }

    #[test]
    fn watch_is_validated() {
        for (extra, want) in [
            ("watch: {timeout: 2h}", "watch.timeout: 2h is out of range"),
            ("watch: {settle: 10ms}", "watch.settle: 10ms is too short"),
            (
                "watch: {timeout: 1s, settle: 2s}",
                "watch.settle: 2s is longer than the watch timeout 1s",
            ),
            ("watch: {colour: red}", "colour"),
        ] {
            let e = parse_for_test(&format!("{KILL}{extra}\n")).unwrap_err();
            assert!(e.contains(want), "{extra}: {e}");
        }
        let pause = KILL.replace("action: kill", "action: pause");
        let e = parse_for_test(&format!("{pause}watch: {{settle: 1s}}\n")).unwrap_err();
        assert!(e.contains("watch: only applies to actions kill"), "{e}");
    }
}

//! `stop_conditions`: a probe failing for too long, or a Prometheus query that holds.

use std::time::Duration;

use gpuchaos_proto::spec::HumanDuration;

use super::probes::ProbeNames;
use super::{Cx, check_prom};
use crate::experiment::{Experiment, StopCondition, StopKind, ValidStop};

/// How often a Prometheus stop condition is queried when it does not say.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

pub(super) fn check(e: &Experiment, names: &ProbeNames, cx: &mut Cx) -> Vec<ValidStop> {
    let mut valid = Vec::new();
    for (i, s) in e.stop_conditions.iter().enumerate() {
        valid.extend(check_one(cx, i, s, names));
    }
    valid
}

fn check_one(cx: &mut Cx, i: usize, s: &StopCondition, names: &ProbeNames) -> Option<ValidStop> {
    let at = cx.at("stop_conditions", i);
    let kind = match (&s.probe, &s.prometheus) {
        (Some(p), None) => {
            let probe = names.resolve(cx, at.key("probe"), p);
            let failing_for = match s.failing_for {
                None => {
                    cx.error(
                        &at,
                        "a probe stop condition needs `failing_for` (how long the probe may fail before the run is aborted)",
                    );
                    None
                }
                Some(d) if d.0.is_zero() => {
                    cx.error(&at.key("failing_for"), "must be above zero");
                    None
                }
                Some(d) => Some(d.0),
            };
            if s.interval.is_some() {
                cx.error(
                    &at.key("interval"),
                    "only applies to prometheus stop conditions (a probe has its own interval)",
                );
            }
            StopKind::ProbeFailing {
                probe: probe?,
                failing_for: failing_for?,
            }
        }
        (None, Some(q)) => {
            check_prom(cx, at.key("prometheus"), q);
            if s.failing_for.is_some() {
                cx.error(
                    &at.key("failing_for"),
                    "only applies to probe stop conditions",
                );
            }
            StopKind::Prometheus {
                check: q.clone(),
                interval: s.interval.map(|d| d.0).unwrap_or(DEFAULT_INTERVAL),
            }
        }
        _ => {
            cx.error(
                &at,
                "give exactly one of `probe` (with failing_for) or `prometheus`",
            );
            return None;
        }
    };
    let name = s.name.clone().unwrap_or_else(|| match &kind {
        StopKind::ProbeFailing { failing_for, .. } => format!(
            "probe {} failing for {}",
            s.probe.as_deref().unwrap_or_default(),
            HumanDuration(*failing_for)
        ),
        StopKind::Prometheus { check, .. } => {
            format!("{} {} {}", check.query, check.op, check.value)
        }
    });
    Some(ValidStop { name, kind })
}

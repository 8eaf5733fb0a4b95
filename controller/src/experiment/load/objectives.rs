//! `objectives`: one kind each, on a defined probe; RTOs from a named fault step.

use std::collections::BTreeSet;

use super::probes::{ProbeNames, probe_kind};
use super::{Cx, FieldPath};
use crate::experiment::{
    Experiment, Objective, ObjectiveKind, ProbeKind, RtoCheck, ValidObjective,
};

/// The one kind an objective sets, with the name of its probe.
fn objective_kind(o: &Objective) -> Option<(&str, ObjectiveKind)> {
    Some(match (&o.rto, &o.availability, &o.latency, &o.safety) {
        (Some(r), None, None, None) => (
            r.probe.as_str(),
            ObjectiveKind::Rto(RtoCheck {
                anchor: r.anchor,
                fault: r.fault.clone(),
                consecutive: r.consecutive(),
                limit: r.limit.0,
            }),
        ),
        (None, Some(a), None, None) => {
            (a.probe.as_str(), ObjectiveKind::Availability { min: a.min })
        }
        (None, None, Some(l), None) => (
            l.probe.as_str(),
            ObjectiveKind::Latency {
                percentile: l.percentile,
                limit: l.limit.0,
            },
        ),
        (None, None, None, Some(s)) => (
            s.probe.as_str(),
            ObjectiveKind::Safety {
                max_unsafe: s.max_unsafe,
            },
        ),
        _ => return None,
    })
}

pub(super) fn check(
    e: &Experiment,
    names: &ProbeNames,
    step_names: &BTreeSet<String>,
    cx: &mut Cx,
) -> Vec<ValidObjective> {
    let mut objective_names = BTreeSet::new();
    let mut valid = Vec::new();
    for (i, o) in e.objectives.iter().enumerate() {
        let at = cx.at("objectives", i);
        let Some((probe, kind)) = objective_kind(o) else {
            cx.error(
                &at,
                "give exactly one of rto, availability, latency or safety per objective",
            );
            continue;
        };
        let name = o
            .name
            .clone()
            .unwrap_or_else(|| format!("{} {probe}", kind.name()));
        if !objective_names.insert(name.clone()) {
            cx.error(
                &at,
                format!("two objectives are named {name:?}: give each a distinct `name`"),
            );
        }
        let kp = at.key(kind.name());
        let index = names.resolve(cx, kp.key("probe"), probe);
        check_kind(cx, &kp, &kind, names, step_names);
        if let ObjectiveKind::Safety { .. } = kind {
            check_safety_probe(cx, &kp, e, probe);
        }
        if let Some(probe) = index {
            valid.push(ValidObjective { name, probe, kind });
        }
    }
    valid
}

fn check_kind(
    cx: &mut Cx,
    kp: &FieldPath,
    kind: &ObjectiveKind,
    names: &ProbeNames,
    step_names: &BTreeSet<String>,
) {
    match kind {
        ObjectiveKind::Rto(r) => {
            if r.limit.is_zero() {
                cx.error(&kp.key("limit"), "must be above zero");
            }
            if r.consecutive == 0 {
                cx.error(&kp.key("consecutive"), "must be at least 1");
            }
            if let Some(f) = &r.fault
                && !step_names.contains(f)
                && !names.is_broken(f)
            {
                cx.error(
                    &kp.key("fault"),
                    format!("no fault step is named {f:?}: name the step with `name:`"),
                );
            }
        }
        ObjectiveKind::Availability { min } => {
            if !(0.0..=1.0).contains(min) {
                cx.error(
                    &kp.key("min"),
                    format!("{min} is not a ratio: write 0.99 for 99% (from 0 to 1)"),
                );
            }
        }
        ObjectiveKind::Latency { percentile, limit } => {
            if !(*percentile > 0.0 && *percentile <= 100.0) {
                cx.error(
                    &kp.key("percentile"),
                    format!("{percentile} is not a percentile (above 0, at most 100)"),
                );
            }
            if limit.is_zero() {
                cx.error(&kp.key("limit"), "must be above zero");
            }
        }
        ObjectiveKind::Safety { .. } => {}
    }
}

/// Safety counts unsafe outputs, which only a guardrail probe sees.
fn check_safety_probe(cx: &mut Cx, kp: &FieldPath, e: &Experiment, probe: &str) {
    let Some(p) = e.probes.iter().find(|p| p.name == probe) else {
        return;
    };
    let is_a = match probe_kind(p) {
        Ok(ProbeKind::Guardrail(_)) => return,
        Ok(k) => k.name(),
        Err(set) if set.contains(&"guardrail") => return,
        Err(set) => set.first().copied().unwrap_or("none"),
    };
    cx.error(
        &kp.key("probe"),
        format!(
            "probe {probe:?} is a {is_a} probe: safety counts unsafe outputs, which only a guardrail probe sees"
        ),
    );
}

//! `objectives`: one kind each, on a defined probe; RTOs from a named fault step.

use std::collections::BTreeSet;

use super::probes::{ProbeNames, probe_kind};
use super::{Cx, FieldPath};
use crate::experiment::valid::HealthTruthCheck;
use crate::experiment::{
    Anchor, Experiment, Objective, ObjectiveKind, Phase, ProbeKind, ProbeRole, RtoCheck,
    ValidObjective,
};

/// The one kind an objective sets, with the name of its probe (and, for
/// health_truth, of the truth probe, resolved by the caller).
fn objective_kind(o: &Objective) -> Option<(&str, ObjectiveKind, Option<&str>)> {
    let set = [
        o.rto.is_some(),
        o.availability.is_some(),
        o.latency.is_some(),
        o.safety.is_some(),
        o.detect.is_some(),
        o.health_truth.is_some(),
    ];
    if set.iter().filter(|s| **s).count() != 1 {
        return None;
    }
    if let Some(r) = &o.rto {
        let from = r.from.unwrap_or(match r.anchor.unwrap_or_default() {
            Anchor::Inject => Phase::Inject,
            Anchor::End => Phase::End,
        });
        return Some((
            r.probe.as_str(),
            ObjectiveKind::Rto(RtoCheck {
                from,
                to: r.to.unwrap_or(Phase::Recovered),
                fault: r.fault.clone(),
                consecutive: r.consecutive(),
                tolerate: r.tolerate.map(|t| (t.failures, t.within.0)),
                limit: r.limit.0,
            }),
            None,
        ));
    }
    if let Some(a) = &o.availability {
        return Some((
            a.probe.as_str(),
            ObjectiveKind::Availability { min: a.min },
            None,
        ));
    }
    if let Some(l) = &o.latency {
        return Some((
            l.probe.as_str(),
            ObjectiveKind::Latency {
                percentile: l.percentile,
                limit: l.limit.0,
            },
            None,
        ));
    }
    if let Some(s) = &o.safety {
        return Some((
            s.probe.as_str(),
            ObjectiveKind::Safety {
                max_unsafe: s.max_unsafe,
            },
            None,
        ));
    }
    if let Some(d) = &o.detect {
        return Some((
            d.probe.as_str(),
            ObjectiveKind::Detect {
                fault: d.fault.clone(),
                limit: d.limit.0,
            },
            None,
        ));
    }
    let h = o.health_truth.as_ref()?;
    Some((
        h.health.as_str(),
        ObjectiveKind::HealthTruth(HealthTruthCheck {
            truth: usize::MAX,
            max_lying: h.max_lying.0,
            max_false_alarm: h.max_false_alarm.map(|d| d.0),
        }),
        Some(h.truth.as_str()),
    ))
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
        let Some((probe, mut kind, truth)) = objective_kind(o) else {
            cx.error(
                &at,
                "give exactly one of rto, detect, availability, latency, safety or health_truth per objective",
            );
            continue;
        };
        let name = o.name.clone().unwrap_or_else(|| match &kind {
            ObjectiveKind::Rto(r) if !r.is_plain() => {
                format!("rto {probe} {} → {}", r.from.as_str(), r.to.as_str())
            }
            _ => format!("{} {probe}", kind.name()),
        });
        if !objective_names.insert(name.clone()) {
            cx.error(
                &at,
                format!("two objectives are named {name:?}: give each a distinct `name`"),
            );
        }
        let kp = at.key(kind.name());
        let probe_key = if truth.is_some() { "health" } else { "probe" };
        let index = names.resolve(cx, kp.key(probe_key), probe);
        let mut resolved = true;
        if let (Some(t), ObjectiveKind::HealthTruth(h)) = (truth, &mut kind) {
            match names.resolve(cx, kp.key("truth"), t) {
                Some(i) => h.truth = i,
                None => resolved = false,
            }
            if t == probe {
                cx.error(
                    &kp.key("truth"),
                    "health and truth name the same probe: the truth is a real generation (an openai probe), the health a health endpoint",
                );
            }
        }
        if let Some(r) = &o.rto
            && r.anchor.is_some()
            && r.from.is_some()
        {
            cx.error(
                &kp.key("from"),
                "give `from` or `anchor`, not both (`anchor: end` is `from: end`)",
            );
        }
        let probe_interval = e
            .probes
            .iter()
            .find(|p| p.name == probe)
            .map(|p| p.interval());
        check_kind(cx, &kp, &kind, names, step_names, probe_interval);
        check_phase_roles(cx, &kp, &kind, e);
        if let ObjectiveKind::Safety { .. } = kind {
            check_safety_probe(cx, &kp, e, probe);
        }
        if let Some(probe) = index
            && resolved
        {
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
    probe_interval: Option<std::time::Duration>,
) {
    match kind {
        ObjectiveKind::Rto(r) => {
            if r.limit.is_zero() {
                cx.error(&kp.key("limit"), "must be above zero");
            }
            if r.consecutive == 0 {
                cx.error(&kp.key("consecutive"), "must be at least 1");
            }
            check_fault_name(cx, kp, &r.fault, names, step_names);
            if r.from == Phase::Recovered {
                cx.error(
                    &kp.key("from"),
                    "an RTO cannot start at `recovered`: from one of inject, end, detected, masked, replaced, gpu_ready, ready, first_good",
                );
            }
            if matches!(r.to, Phase::Inject | Phase::End) {
                cx.error(
                    &kp.key("to"),
                    format!(
                        "an RTO cannot end at `{}`: to one of detected, masked, replaced, gpu_ready, ready, first_good, recovered",
                        r.to.as_str()
                    ),
                );
            }
            if r.from == r.to {
                cx.error(
                    &kp.key("to"),
                    format!(
                        "from and to are both `{}`: nothing to measure",
                        r.to.as_str()
                    ),
                );
            }
            if let Some((failures, within)) = r.tolerate {
                if failures == 0 {
                    cx.error(
                        &kp.key("tolerate").key("failures"),
                        "must be at least 1 (without a tolerance, every failure counts)",
                    );
                }
                if within.is_zero() {
                    cx.error(&kp.key("tolerate").key("within"), "must be above zero");
                } else if let Some(interval) = probe_interval
                    && within < interval * (failures + 1)
                {
                    // K+1 failures in a row span K intervals, and a window must hold them with room for jitter: a shorter one never
                    // holds an outage, and every failure would pass as isolated.
                    cx.error(
                        &kp.key("tolerate").key("within"),
                        format!(
                            "{} can never hold {} failures of a probe sampled every {}: every failure would count as isolated, however long the outage; make it at least {}",
                            gpuchaos_proto::spec::HumanDuration(within),
                            failures + 1,
                            gpuchaos_proto::spec::HumanDuration(interval),
                            gpuchaos_proto::spec::HumanDuration(interval * (failures + 1))
                        ),
                    );
                }
            }
        }
        ObjectiveKind::Detect { fault, limit } => {
            if limit.is_zero() {
                cx.error(&kp.key("limit"), "must be above zero");
            }
            check_fault_name(cx, kp, fault, names, step_names);
        }
        ObjectiveKind::HealthTruth(h) => {
            if h.max_false_alarm.is_some_and(|d| d.is_zero()) {
                cx.error(
                    &kp.key("max_false_alarm"),
                    "0s can never hold: two probes sampled apart disagree for up to an interval at every change; leave at least one interval",
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

fn check_fault_name(
    cx: &mut Cx,
    kp: &FieldPath,
    fault: &Option<String>,
    names: &ProbeNames,
    step_names: &BTreeSet<String>,
) {
    if let Some(f) = fault
        && !step_names.contains(f)
        && !names.is_broken(f)
    {
        cx.error(
            &kp.key("fault"),
            format!("no fault step is named {f:?}: name the step with `name:`"),
        );
    }
}

/// `ready` and `first_good` are read from probes with a role: one must exist.
fn check_phase_roles(cx: &mut Cx, kp: &FieldPath, kind: &ObjectiveKind, e: &Experiment) {
    let ObjectiveKind::Rto(r) = kind else {
        return;
    };
    for (key, phase) in [("from", r.from), ("to", r.to)] {
        let (role, example) = match phase {
            Phase::Ready => (ProbeRole::Readiness, "an http probe of /health"),
            Phase::FirstGood => (ProbeRole::Generation, "an openai probe"),
            _ => continue,
        };
        let has = e.probes.iter().any(|p| {
            p.role.or(match probe_kind(p) {
                Ok(ProbeKind::OpenAi(_)) => Some(ProbeRole::Generation),
                _ => None,
            }) == Some(role)
        });
        if !has {
            cx.error(
                &kp.key(key),
                format!(
                    "`{}` is read from a probe with `role: {}` and there is none: give one ({example}) that role",
                    phase.as_str(),
                    role.as_str()
                ),
            );
        }
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

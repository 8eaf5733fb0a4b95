//! `method`: the steps of a trial (faults, waits, parallel groups), each fault spec
//! validated as `gpuchaos inject -f` would, each selection against the known agents.

use std::collections::BTreeSet;

use gpuchaos_proto::spec::{FaultSpec, Pick};

use super::{Cx, FieldPath, Value};
use crate::experiment::{AgentSelector, Experiment, FaultStep, Step, StepKind, ValidStep};
use crate::fleet::AgentRef;

/// What the walk over the steps collects besides the steps.
struct Walk<'a> {
    agents: &'a [AgentRef],
    /// Step names, for `rto.fault`.
    names: BTreeSet<String>,
    fault_steps: usize,
}

/// Checks the method; returns its steps and the step names objectives may use.
pub(super) fn check(
    e: &Experiment,
    agents: &[AgentRef],
    cx: &mut Cx,
) -> (Vec<ValidStep>, BTreeSet<String>) {
    let root = FieldPath::root();
    let raw_steps = match cx.root.get("method").map(|m| &m.value) {
        Some(Value::Seq(v)) => v.len(),
        _ => 0,
    };
    if raw_steps == 0 {
        cx.error(
            &root.key("method"),
            "the method is empty: give at least one step (a fault, a wait or a parallel group)",
        );
    }
    let mut walk = Walk {
        agents,
        names: BTreeSet::new(),
        fault_steps: 0,
    };
    let mut steps = Vec::new();
    for (i, s) in e.method.iter().enumerate() {
        let at = cx.at("method", i);
        steps.extend(check_step(cx, s, &at, &mut walk));
    }
    if !e.method.is_empty() && e.method.len() == raw_steps && walk.fault_steps == 0 {
        cx.error(
            &root.key("method"),
            "the method injects no fault: add a step with `fault:`",
        );
    }
    (steps, walk.names)
}

/// The one thing a step does, when it does exactly one.
enum Does<'a> {
    Fault(&'a FaultSpec),
    Wait(gpuchaos_proto::spec::HumanDuration),
    Parallel(&'a [Step]),
}

fn check_step(cx: &mut Cx, s: &Step, at: &FieldPath, walk: &mut Walk) -> Option<ValidStep> {
    let does = match (&s.fault, s.wait, &s.parallel) {
        (Some(f), None, None) => Does::Fault(f),
        (None, Some(w), None) => Does::Wait(w),
        (None, None, Some(g)) => Does::Parallel(g),
        (None, None, None) => {
            cx.error(
                at,
                "the step does nothing: give one of fault, wait or parallel",
            );
            return None;
        }
        (fault, _, _) => {
            // A fault beside something else still counts as one: the method is not
            // also said to inject nothing.
            if fault.is_some() {
                walk.fault_steps += 1;
            }
            cx.error(
                at,
                "give only one of fault, wait or parallel per step (use a parallel group to combine)",
            );
            return None;
        }
    };
    if let Some(n) = &s.name
        && !walk.names.insert(n.clone())
    {
        cx.error(&at.key("name"), format!("step name {n:?} is used twice"));
    }
    if !matches!(does, Does::Fault(_)) && (s.on.is_some() || s.background) {
        cx.error(at, "`on` and `background` only apply to fault steps");
    }
    let kind = match does {
        Does::Fault(f) => {
            walk.fault_steps += 1;
            check_fault(cx, f, s.on.as_ref(), at, walk.agents);
            StepKind::Fault(Box::new(FaultStep {
                spec: f.clone(),
                on: s.on.clone().unwrap_or_default(),
                background: s.background,
            }))
        }
        Does::Wait(w) => {
            if w.0.is_zero() {
                cx.error(&at.key("wait"), "must be above zero");
            }
            StepKind::Wait(w.0)
        }
        Does::Parallel(group) => {
            if group.is_empty() {
                cx.error(&at.key("parallel"), "the parallel group is empty");
            }
            let inner: Vec<Option<ValidStep>> = group
                .iter()
                .enumerate()
                .map(|(i, inner)| check_step(cx, inner, &at.key("parallel").index(i), walk))
                .collect();
            StepKind::Parallel(inner.into_iter().collect::<Option<Vec<_>>>()?)
        }
    };
    Some(ValidStep {
        name: s.name.clone(),
        kind,
    })
}

fn check_fault(
    cx: &mut Cx,
    f: &FaultSpec,
    on: Option<&AgentSelector>,
    at: &FieldPath,
    agents: &[AgentRef],
) {
    if let Err(errs) = f.validate() {
        for fe in errs.0 {
            cx.error(&at.key("fault").join_dotted(&fe.field), fe.message);
        }
    }
    let Some(sel) = on else { return };
    let op = at.key("on");
    if !sel.agents.is_empty() && !sel.labels.is_empty() {
        cx.error(&op, "select agents by `agents` or by `labels`, not both");
    }
    if let Some(p) = sel.pick {
        let mut errs = Vec::new();
        p.validate("pick", &mut errs);
        for fe in errs {
            cx.error(&op.join_dotted(&fe.field), fe.message);
        }
    }
    if agents.is_empty() {
        return;
    }
    match crate::experiment::plan::matching(sel, agents) {
        Err(m) => cx.error(&op, m),
        Ok(matched) => {
            if let Some(Pick::Count(n)) = sel.pick
                && n as usize > matched.len()
            {
                cx.error(
                    &op.key("pick").key("count"),
                    format!(
                        "asks for {n} agents but only {} match{}",
                        matched.len(),
                        if matched.len() == 1 { "es" } else { "" }
                    ),
                );
            }
        }
    }
}

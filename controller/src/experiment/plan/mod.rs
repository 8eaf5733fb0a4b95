//! What a trial will do: each fault step resolved to the agents it goes to.
//!
//! `--dry-run` prints this ([`dry_run`]) and the runner executes it, so the two
//! cannot disagree.
//! Agent picks (`count`, `percent`) are drawn from a seeded generator: the seed is
//! printed and recorded, and the same seed gives the same agents.

use std::time::Duration;

use gpuchaos_proto::spec::{FaultSpec, HumanDuration, Pick};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use super::{AgentSelector, FaultStep, StepKind, ValidStep};
use crate::fleet::AgentRef;

mod dry_run;
pub use dry_run::{dry_run, limit_text, short_limit};

#[derive(Debug, Clone, PartialEq)]
pub enum PlanStep {
    Fault(Box<PlannedFault>),
    Wait(Duration),
    Parallel(Vec<PlanStep>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct PlannedFault {
    /// The step's name, or its position (`step 2`, `step 3.1` inside a group).
    pub label: String,
    /// Whether the user named the step (objectives refer to it by that name).
    pub named: bool,
    pub spec: FaultSpec,
    /// Indexes into the run's agent list.
    pub agents: Vec<usize>,
    pub background: bool,
    /// The seed the agent pick was drawn with.
    pub seed: u64,
}

/// Indexes of the agents a selector matches (before `pick`).
pub fn matching(sel: &AgentSelector, agents: &[AgentRef]) -> Result<Vec<usize>, String> {
    if !sel.agents.is_empty() {
        let mut out = Vec::new();
        for name in &sel.agents {
            match agents
                .iter()
                .position(|a| &a.name == name || &a.address == name)
            {
                Some(i) if !out.contains(&i) => out.push(i),
                Some(_) => {}
                None => {
                    let known: Vec<String> = agents.iter().map(|a| a.display()).collect();
                    return Err(format!(
                        "no agent is named {name:?}: known agents are {}",
                        known.join(", ")
                    ));
                }
            }
        }
        return Ok(out);
    }
    let out: Vec<usize> = agents
        .iter()
        .enumerate()
        .filter(|(_, a)| sel.labels.iter().all(|(k, v)| a.labels.get(k) == Some(v)))
        .map(|(i, _)| i)
        .collect();
    if out.is_empty() {
        let want: Vec<String> = sel.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        return Err(format!(
            "no agent has the labels {}: check the agents' labels",
            want.join(", ")
        ));
    }
    Ok(out)
}

/// A stable per-step seed derived from the run's seed and the step's position.
fn step_seed(run_seed: u64, label: &str) -> u64 {
    // FNV-1a over the label, mixed with the run seed: stable across versions.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ run_seed;
    for b in label.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// Resolves one trial's method. `trial` is 0-based; each trial draws its own pick
/// from the step's seed, reproducibly.
pub fn plan_method(
    method: &[ValidStep],
    agents: &[AgentRef],
    run_seed: u64,
    trial: u32,
) -> Result<Vec<PlanStep>, String> {
    plan_steps(method, agents, run_seed, trial, "")
}

fn plan_steps(
    steps: &[ValidStep],
    agents: &[AgentRef],
    run_seed: u64,
    trial: u32,
    prefix: &str,
) -> Result<Vec<PlanStep>, String> {
    let mut out = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        let pos = format!("{prefix}{}", i + 1);
        out.push(match &s.kind {
            StepKind::Wait(w) => PlanStep::Wait(*w),
            StepKind::Parallel(group) => PlanStep::Parallel(plan_steps(
                group,
                agents,
                run_seed,
                trial,
                &format!("{pos}."),
            )?),
            StepKind::Fault(f) => {
                let label = s.name.clone().unwrap_or_else(|| format!("step {pos}"));
                PlanStep::Fault(Box::new(plan_fault(
                    f,
                    label,
                    s.name.is_some(),
                    agents,
                    run_seed,
                    trial,
                )?))
            }
        });
    }
    Ok(out)
}

/// Draws the agents of one fault step for one trial.
fn plan_fault(
    f: &FaultStep,
    label: String,
    named: bool,
    agents: &[AgentRef],
    run_seed: u64,
    trial: u32,
) -> Result<PlannedFault, String> {
    let sel = &f.on;
    let mut matched = matching(sel, agents).map_err(|e| format!("{label}: {e}"))?;
    let seed = sel.seed.unwrap_or_else(|| step_seed(run_seed, &label));
    let pick = sel.pick.unwrap_or(Pick::All);
    if let Pick::Count(n) = pick
        && n as usize > matched.len()
    {
        return Err(format!(
            "{label}: asks for {n} agents but only {} match",
            matched.len()
        ));
    }
    let n = pick.amount(matched.len());
    if n < matched.len() {
        let mut rng = StdRng::seed_from_u64(seed.wrapping_add(u64::from(trial)));
        matched.shuffle(&mut rng);
        matched.truncate(n);
        matched.sort_unstable();
    }
    Ok(PlannedFault {
        label,
        named,
        spec: f.spec.clone(),
        agents: matched,
        background: f.background,
        seed,
    })
}

/// Every fault of a plan, in order (parallel groups flattened).
pub fn faults(plan: &[PlanStep]) -> Vec<&PlannedFault> {
    let mut out = Vec::new();
    for s in plan {
        match s {
            PlanStep::Fault(f) => out.push(f.as_ref()),
            PlanStep::Parallel(g) => out.extend(faults(g)),
            PlanStep::Wait(_) => {}
        }
    }
    out
}

/// The longest a plan can take, assuming every fault runs its full duration.
pub fn expected_duration(plan: &[PlanStep]) -> Duration {
    plan.iter()
        .map(|s| match s {
            PlanStep::Wait(d) => *d,
            PlanStep::Fault(f) if f.background => Duration::ZERO,
            PlanStep::Fault(f) => f.spec.duration(),
            PlanStep::Parallel(g) => g
                .iter()
                .map(|s| expected_duration(std::slice::from_ref(s)))
                .max()
                .unwrap_or_default(),
        })
        .sum()
}

/// One line per step, indented, for `--dry-run` and the run's header.
pub fn describe(plan: &[PlanStep], agents: &[AgentRef], indent: usize, out: &mut Vec<String>) {
    let pad = "  ".repeat(indent);
    for s in plan {
        match s {
            PlanStep::Wait(d) => out.push(format!("{pad}wait {}", HumanDuration(*d))),
            PlanStep::Parallel(g) => {
                out.push(format!("{pad}in parallel:"));
                describe(g, agents, indent + 1, out);
            }
            PlanStep::Fault(f) => {
                let on: Vec<String> = f.agents.iter().map(|i| agents[*i].display()).collect();
                out.push(format!(
                    "{pad}{}: inject {} for {} on {}{}",
                    f.label,
                    f.spec.summary(),
                    HumanDuration(f.spec.duration()),
                    on.join(", "),
                    if f.background {
                        " (in the background)"
                    } else {
                        ""
                    }
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Steps as the loader hands them on, from the file form.
    fn steps(v: serde_json::Value) -> Vec<ValidStep> {
        let file: Vec<crate::experiment::Step> = serde_json::from_value(v).unwrap();
        file.into_iter().map(valid_step).collect()
    }

    fn valid_step(s: crate::experiment::Step) -> ValidStep {
        let kind = match (s.fault, s.wait, s.parallel) {
            (Some(spec), None, None) => StepKind::Fault(Box::new(FaultStep {
                spec,
                on: s.on.unwrap_or_default(),
                background: s.background,
            })),
            (None, Some(w), None) => StepKind::Wait(w.0),
            (None, None, Some(g)) => StepKind::Parallel(g.into_iter().map(valid_step).collect()),
            other => panic!("not one kind: {other:?}"),
        };
        ValidStep { name: s.name, kind }
    }

    fn agents() -> Vec<AgentRef> {
        (0..4)
            .map(|i| AgentRef {
                name: format!("n{i}"),
                address: format!("127.0.0.1:{}", 7000 + i),
                labels: BTreeMap::from([("zone".into(), if i < 2 { "a" } else { "b" }.into())]),
            })
            .collect()
    }

    #[test]
    fn selectors_match_names_and_labels() {
        let a = agents();
        let by_name = AgentSelector {
            agents: vec!["n3".into(), "127.0.0.1:7001".into()],
            ..Default::default()
        };
        assert_eq!(matching(&by_name, &a).unwrap(), vec![3, 1]);
        let by_label = AgentSelector {
            labels: BTreeMap::from([("zone".into(), "b".into())]),
            ..Default::default()
        };
        assert_eq!(matching(&by_label, &a).unwrap(), vec![2, 3]);
        let none = AgentSelector {
            labels: BTreeMap::from([("zone".into(), "c".into())]),
            ..Default::default()
        };
        assert!(matching(&none, &a).unwrap_err().contains("zone=c"));
        let typo = AgentSelector {
            agents: vec!["n9".into()],
            ..Default::default()
        };
        assert!(matching(&typo, &a).unwrap_err().contains("n9"));
    }

    #[test]
    fn picks_are_reproducible_by_seed() {
        let a = agents();
        let step = steps(serde_json::json!([{
            "fault": {"kind": "process", "duration": "1s", "action": "pause", "target": {"name": "x"}},
            "on": {"pick": {"count": 2}, "seed": 7}
        }]))
        .remove(0);
        let p1 = plan_method(std::slice::from_ref(&step), &a, 1, 0).unwrap();
        let p2 = plan_method(std::slice::from_ref(&step), &a, 999, 0).unwrap();
        assert_eq!(p1, p2, "an explicit seed ignores the run seed");
        let f = faults(&p1);
        assert_eq!(f[0].agents.len(), 2);
        // Across trials the draw changes but stays reproducible.
        let draws: Vec<Vec<usize>> = (0..8)
            .map(|t| {
                faults(&plan_method(std::slice::from_ref(&step), &a, 1, t).unwrap())[0]
                    .agents
                    .clone()
            })
            .collect();
        assert!(draws.iter().any(|d| d != &draws[0]), "{draws:?}");
        let again: Vec<Vec<usize>> = (0..8)
            .map(|t| {
                faults(&plan_method(std::slice::from_ref(&step), &a, 1, t).unwrap())[0]
                    .agents
                    .clone()
            })
            .collect();
        assert_eq!(draws, again);
    }

    #[test]
    fn durations_add_up() {
        let steps = steps(serde_json::json!([
            {"fault": {"kind": "process", "duration": "2s", "action": "pause", "target": {"name": "x"}}},
            {"wait": "1s"},
            {"parallel": [
                {"fault": {"kind": "process", "duration": "3s", "action": "pause", "target": {"name": "x"}}},
                {"wait": "5s"}
            ]},
            {"fault": {"kind": "process", "duration": "9s", "action": "pause", "target": {"name": "x"}}, "background": true}
        ]));
        let plan = plan_method(&steps, &agents(), 0, 0).unwrap();
        assert_eq!(expected_duration(&plan), Duration::from_secs(8));
        let mut lines = Vec::new();
        describe(&plan, &agents(), 0, &mut lines);
        assert_eq!(
            lines[0],
            "step 1: inject process pause name \"x\" for 2s on n0 (127.0.0.1:7000), n1 (127.0.0.1:7001), n2 (127.0.0.1:7002), n3 (127.0.0.1:7003)"
        );
        assert_eq!(lines[2], "in parallel:");
        assert!(lines[3].starts_with("  step 3.1: inject"));
    }
}

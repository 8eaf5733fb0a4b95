//! How a run reads before it happens: the `--dry-run` printout, and each objective's
//! limit in words (here in full, in the final table short).

use gpuchaos_proto::spec::HumanDuration as H;

use super::{describe, expected_duration, plan_method};
use crate::exit::CliError;
use crate::experiment::load::Loaded;
use crate::experiment::{ObjectiveKind, Phase, ValidObjective, ValidProbe};
use crate::fleet::Fleet;

/// Prints the plan of a run and touches nothing (`--dry-run`).
pub fn dry_run(loaded: &Loaded, fleet: &Fleet, run_seed: u64) -> Result<Vec<String>, CliError> {
    let e = &loaded.experiment;
    let mut out = vec![format!(
        "experiment {} ({} trial{}, run seed {run_seed}); nothing is injected in a dry run",
        e.metadata.name,
        e.trials,
        if e.trials == 1 { "" } else { "s" }
    )];
    out.push("agents:".into());
    for a in &fleet.agents {
        let labels: Vec<String> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.push(format!(
            "  {}{}",
            a.display(),
            if labels.is_empty() {
                String::new()
            } else {
                format!(" [{}]", labels.join(", "))
            }
        ));
    }
    out.push(format!(
        "lease: {} (faults revert by themselves if the controller stops renewing it)",
        H(e.lease)
    ));
    out.push("probes:".into());
    for p in &e.probes {
        out.push(format!(
            "  {} ({}): {} every {}, timeout {}",
            p.name,
            p.kind.name(),
            p.kind.target(),
            H(p.interval),
            H(p.timeout)
        ));
    }
    if let Some(s) = &e.steady_state {
        out.push(format!(
            "steady state: {} passing for {} (waiting at most {}) before the first trial and after each",
            e.probe_names(&s.probes),
            H(s.duration),
            H(s.timeout)
        ));
    }
    for t in 0..e.trials.min(3) {
        let p = plan_method(&e.method, &fleet.agents, run_seed, t).map_err(CliError::invalid)?;
        out.push(format!(
            "trial {} (about {}):",
            t + 1,
            H(expected_duration(&p))
        ));
        describe(&p, &fleet.agents, 1, &mut out);
    }
    if e.trials > 3 {
        out.push(format!("… and {} more trials", e.trials - 3));
    }
    out.push("objectives:".into());
    for o in &e.objectives {
        let probe = &e.probes[o.probe].name;
        out.push(format!("  {}: {}", o.name, limit_text(o, probe, &e.probes)));
    }
    for s in &e.stop_conditions {
        out.push(format!("stop if: {}", s.name));
    }
    Ok(out)
}

/// An objective's limit in full: `health recovers within 30s of the injection…`.
pub fn limit_text(o: &ValidObjective, probe: &str, probes: &[ValidProbe]) -> String {
    match &o.kind {
        ObjectiveKind::Rto(r) => {
            let tolerance = r
                .tolerate
                .map(|(n, w)| {
                    format!(
                        ", tolerating {n} isolated failure{} within {}",
                        if n == 1 { "" } else { "s" },
                        H(w)
                    )
                })
                .unwrap_or_default();
            if r.is_plain() {
                format!(
                    "{probe} recovers within {} of the {} ({} passing in a row{tolerance})",
                    H(r.limit),
                    if r.from == Phase::End {
                        "fault's end"
                    } else {
                        "injection"
                    },
                    r.consecutive
                )
            } else {
                format!(
                    "{} → {} within {} (phases of {probe}{tolerance})",
                    r.from.as_str(),
                    r.to.as_str(),
                    H(r.limit)
                )
            }
        }
        ObjectiveKind::Availability { min } => format!(
            "{probe} passes ≥ {:.2}% of samples from the first fault until it recovered",
            min * 100.0
        ),
        ObjectiveKind::Latency { percentile, limit } => {
            format!("{probe} p{percentile} ≤ {}", H(*limit))
        }
        ObjectiveKind::Safety { max_unsafe } => {
            format!("{probe} lets through ≤ {max_unsafe} unsafe outputs")
        }
        ObjectiveKind::Detect { limit, .. } => {
            format!("{probe} fails within {} of the injection", H(*limit))
        }
        ObjectiveKind::HealthTruth(h) => format!(
            "{probe} passes while {} fails for at most {} per trial{}",
            probes[h.truth].name,
            H(h.max_lying),
            h.max_false_alarm
                .map(|d| format!(", fails while it passes for at most {}", H(d)))
                .unwrap_or_default()
        ),
    }
}

/// An objective's limit as the final table reads it, and its unit.
pub fn short_limit(kind: &ObjectiveKind) -> (String, &'static str) {
    match kind {
        ObjectiveKind::Rto(r) => (format!("≤ {}", H(r.limit)), "s"),
        ObjectiveKind::Availability { min } => (format!("≥ {:.2}%", min * 100.0), "ratio"),
        ObjectiveKind::Latency { percentile, limit } => {
            (format!("p{percentile} ≤ {}", H(*limit)), "s")
        }
        ObjectiveKind::Safety { max_unsafe } => (format!("≤ {max_unsafe} unsafe"), "count"),
        ObjectiveKind::Detect { limit, .. } => (format!("≤ {}", H(*limit)), "s"),
        ObjectiveKind::HealthTruth(h) => (format!("lying ≤ {}", H(h.max_lying)), "s"),
    }
}

//! Everything before the first probe sample: plans, probes, the Prometheus safety
//! nets, agents and their sessions. A problem found here ends the run with nothing
//! injected.

use std::time::Duration;

use gpuchaos_proto::spec::HumanDuration;

use super::agents::{self, Conn};
use super::record::{EventKind, ProbeRecord, RunRecord, Verdict};
use super::shared::Shared;
use crate::exit::{self, CliError};
use crate::experiment::load::Loaded;
use crate::experiment::plan::{self, PlanStep};
use crate::experiment::{ProbeKind, PromCheck, StopKind, ValidExperiment};
use crate::fleet::Fleet;
use crate::probe::{Prober, PromQuery};

/// What a run needs before it touches anything.
pub(super) struct Prepared {
    /// One plan per trial.
    pub plans: Vec<Vec<PlanStep>>,
    pub probers: Vec<Prober>,
    pub probe_records: Vec<ProbeRecord>,
}

/// Plans every trial and builds every probe: a selection that cannot be satisfied,
/// or a probe that cannot be built, is invalid input found before anything is
/// touched.
pub(super) fn prepare(loaded: &Loaded, fleet: &Fleet, run_seed: u64) -> Result<Prepared, CliError> {
    let exp = &loaded.experiment;
    let plans = (0..exp.trials)
        .map(|t| plan::plan_method(&exp.method, &fleet.agents, run_seed, t))
        .collect::<Result<Vec<_>, String>>()
        .map_err(CliError::invalid)?;
    let mut probers = Vec::new();
    let mut probe_records = Vec::new();
    for p in &exp.probes {
        probers.push(
            Prober::new(&p.kind, &loaded.base_dir)
                .map_err(|e| CliError::invalid(format!("probe {}: {e}", p.name)))?,
        );
        probe_records.push(ProbeRecord {
            name: p.name.clone(),
            kind: p.kind.name().to_string(),
            target: p.kind.target(),
            interval_ns: p.interval.as_nanos() as u64,
            timeout_ns: p.timeout.as_nanos() as u64,
        });
    }
    Ok(Prepared {
        plans,
        probers,
        probe_records,
    })
}

/// Checks the safety nets, then connects to the agents and opens the sessions.
/// Returns the connections, or None with the record saying why nothing was
/// injected.
pub(super) async fn gate(
    exp: &ValidExperiment,
    fleet: &Fleet,
    plans: &[Vec<PlanStep>],
    shared: &Shared,
    record: &mut RunRecord,
) -> Option<Vec<Conn>> {
    // Every stop condition and Prometheus probe is evaluated once before any agent
    // is touched: a run whose safety net is broken does not start.
    let broken = prometheus_checks(exp).await;
    if !broken.is_empty() {
        for b in &broken {
            shared.event(EventKind::Abort, 0, b.clone());
        }
        record.verdict = Verdict::Aborted;
        record.exit_code = exit::ABORTED;
        record.reason = Some(format!("nothing was injected: {}", broken.join("; ")));
        return None;
    }
    let (conns, problems) = open_sessions(exp, fleet, plans, shared).await;
    record.agents = conns.iter().map(Conn::record).collect();
    if problems.is_empty() {
        return Some(conns);
    }
    for p in &problems {
        shared.event(EventKind::Abort, 0, p.clone());
    }
    // Sessions that did open are closed (nothing was injected).
    for c in &conns {
        let _ = agents::close(c).await;
    }
    record.verdict = Verdict::InjectFailed;
    record.exit_code = exit::INJECT_FAILED;
    record.reason = Some(format!("nothing was injected: {}", problems.join("; ")));
    None
}

/// Evaluates every Prometheus stop condition and Prometheus probe once. Returns why
/// the run must not start: a query that cannot be evaluated (the reason quoted from
/// Prometheus), or a stop condition that already holds.
async fn prometheus_checks(exp: &ValidExperiment) -> Vec<String> {
    let mut checks: Vec<(bool, String, &PromCheck, Duration)> = Vec::new();
    for sc in &exp.stop_conditions {
        if let StopKind::Prometheus { check, interval } = &sc.kind {
            checks.push((
                true,
                format!("stop condition {}", sc.name),
                check,
                *interval,
            ));
        }
    }
    for p in &exp.probes {
        if let ProbeKind::Prometheus(q) = &p.kind {
            checks.push((false, format!("probe {}", p.name), q, p.timeout));
        }
    }
    let runs = checks.into_iter().map(|(is_stop, what, q, within)| async move {
        let query = match PromQuery::new(q) {
            Ok(q) => q,
            Err(e) => return Some(format!("{what}: {e}")),
        };
        match tokio::time::timeout(within.max(Duration::from_secs(1)), query.evaluate()).await {
            Ok(Ok(r)) if is_stop && r.holds => Some(format!(
                "{what} already holds before anything was injected ({}): the service is not in a state to run chaos against",
                r.describe()
            )),
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(format!("{what} cannot be evaluated: {e}")),
            Err(_) => Some(format!(
                "{what} cannot be evaluated: {} gave no answer within {}",
                q.url,
                HumanDuration(within.max(Duration::from_secs(1)))
            )),
        }
    });
    futures_util::future::join_all(runs)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Connects to every agent at once (clock offsets), checks each can inject what its
/// plans give it, and opens the sessions. Returns the connections and the problems.
async fn open_sessions(
    exp: &ValidExperiment,
    fleet: &Fleet,
    plans: &[Vec<PlanStep>],
    shared: &Shared,
) -> (Vec<Conn>, Vec<String>) {
    let connects = futures_util::future::join_all(
        fleet
            .agents
            .iter()
            .map(|a| agents::connect(fleet, a, &shared.clock)),
    )
    .await;
    let mut conns = Vec::new();
    let mut problems = Vec::new();
    for r in connects {
        match r {
            Ok(c) => conns.push(c),
            Err(e) => problems.push(e),
        }
    }
    if problems.is_empty() {
        problems = capability_problems(&conns, plans);
    }
    let holder = format!(
        "gpuchaos run {} (pid {})",
        exp.metadata.name,
        std::process::id()
    );
    if problems.is_empty() {
        for c in conns.iter_mut() {
            if let Err(e) = agents::open_session(c, exp.lease, &holder).await {
                problems.push(e);
            }
        }
    }
    for c in &conns {
        shared.event(
            EventKind::Agent,
            0,
            format!(
                "agent {} ({}): clock offset {:+.3} ms ± {:.3} ms, session {}",
                c.agent.display(),
                c.info.hostname,
                c.offset_ns as f64 / 1e6,
                c.offset_error_ns as f64 / 1e6,
                if c.session.is_empty() {
                    "-"
                } else {
                    &c.session
                }
            ),
        );
    }
    (conns, problems)
}

/// Faults an agent cannot inject (its capabilities say why), trial by trial.
fn capability_problems(conns: &[Conn], plans: &[Vec<PlanStep>]) -> Vec<String> {
    let mut problems = Vec::new();
    for (ti, p) in plans.iter().enumerate() {
        for f in plan::faults(p) {
            for &i in &f.agents {
                let c = &conns[i];
                match c.capability(f.spec.kind()) {
                    Some(cap) if cap.supported => {}
                    Some(cap) => problems.push(format!(
                        "trial {}: {}: agent {} cannot inject {} faults: {}",
                        ti + 1,
                        f.label,
                        c.agent.display(),
                        f.spec.kind(),
                        cap.reason
                    )),
                    None => problems.push(format!(
                        "{}: agent {} does not know the {} fault kind (agent version {})",
                        f.label,
                        c.agent.display(),
                        f.spec.kind(),
                        c.info.agent_version
                    )),
                }
            }
        }
    }
    problems.dedup();
    problems
}

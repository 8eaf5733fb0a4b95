//! The end of every run that got past its preflight: roll back, collect the trials
//! (those an abort cut short too), decide the verdict, write the journal and the
//! reports.

use std::sync::Arc;
use std::time::Duration;

use gpuchaos_proto::pb;
use gpuchaos_proto::spec::HumanDuration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::record::{
    EventKind, FaultRecord, ObjectiveResult, ObjectiveSummary, ResultKind, RunRecord, TrialRecord,
    Verdict,
};
use super::shared::Shared;
use super::{Abort, RunOptions, Runner, agents, evaluate};
use crate::exit::{self, CliError};
use crate::experiment::ValidExperiment;
use crate::experiment::plan::short_limit;

/// Rolls back, stops the probes and the renewals, and writes the record. `early`
/// is why the trials stopped by themselves, if they did.
pub(super) async fn conclude(
    runner: &Arc<Runner>,
    mut record: RunRecord,
    early: Option<Abort>,
    stop: &CancellationToken,
    tracker: &TaskTracker,
    opts: &RunOptions,
) -> Result<(RunRecord, u8), CliError> {
    let shared = &runner.shared;
    let aborted = runner.abort_reason.lock().unwrap().clone();
    let halt_all = aborted.as_ref().is_some_and(Abort::halts_all);
    let leftovers = runner.rollback(halt_all).await;
    stop.cancel();
    tracker.close();
    // Samples still waiting get until their own timeout; whatever is left then is
    // recorded as failed, never dropped.
    let _ = tokio::time::timeout(
        runner.exp.max_probe_timeout() + Duration::from_secs(2),
        tracker.wait(),
    )
    .await;
    let unanswered = shared.fail_unanswered();
    if unanswered > 0 {
        shared.event(
            EventKind::Warning,
            0,
            format!("{unanswered} sample(s) had no answer when the run ended: recorded as failed"),
        );
    }
    shared.clear_status();
    record.trials = runner.trial_records();
    record.objectives = summarize(&runner.exp, &record.trials);
    record.leftovers = leftovers;
    let (code, verdict, reason) = verdict(&record, aborted.or(early));
    record.exit_code = code;
    record.verdict = verdict;
    record.reason = reason;
    write(record, shared, opts)
}

/// The exit code, verdict and reason: something left behind is the most serious,
/// then an abort, then a failed objective.
fn verdict(record: &RunRecord, failure: Option<Abort>) -> (u8, Verdict, Option<String>) {
    let objectives_failed = record.objectives.iter().any(|o| o.evaluated && !o.passed)
        || record
            .trials
            .iter()
            .flat_map(|t| &t.objectives)
            .any(|o| o.kind == ResultKind::SteadyState && !o.passed);
    if !record.leftovers.is_empty() {
        (
            exit::REVERT_FAILED,
            Verdict::RevertFailed,
            Some(format!(
                "something may be left behind: {}",
                record.leftovers.join("; ")
            )),
        )
    } else if let Some(a) = failure {
        (a.code(), a.verdict(), Some(a.into_reason()))
    } else if objectives_failed {
        (exit::OBJECTIVE_FAILED, Verdict::Failed, None)
    } else {
        (exit::OK, Verdict::Passed, None)
    }
}

impl Runner {
    /// Every trial that began, in order, with its faults. Trials cut short by an
    /// abort still show their faults; the faults are read after the rollback, so
    /// they carry the revert times.
    fn trial_records(&self) -> Vec<TrialRecord> {
        let mut trials = std::mem::take(&mut *self.done.lock().unwrap());
        let known: Vec<u32> = trials.iter().map(|t| t.index).collect();
        let max_trial = self
            .injected
            .lock()
            .unwrap()
            .iter()
            .map(|i| i.trial)
            .max()
            .unwrap_or(0);
        let started = self.started.lock().unwrap().clone();
        let max_trial = max_trial.max(started.iter().map(|t| t.index).max().unwrap_or(0));
        for t in 1..=max_trial {
            if !known.contains(&t) {
                let now = self.shared.clock.now_ns();
                let begun = started.iter().find(|s| s.index == t);
                trials.push(TrialRecord {
                    index: t,
                    start_ns: begun.map(|s| s.start_ns).unwrap_or(0),
                    first_inject_ns: self.anchor_fault(t, None).and_then(|f| f.inject_ns),
                    method_end_ns: begun.and_then(|s| s.method_end_ns),
                    end_ns: now,
                    faults: Vec::new(),
                    objectives: Vec::new(),
                });
            }
        }
        trials.sort_by_key(|t| t.index);
        for t in trials.iter_mut() {
            t.faults = self.trial_faults(t.index);
        }
        trials
    }

    fn trial_faults(&self, trial: u32) -> Vec<FaultRecord> {
        self.injected
            .lock()
            .unwrap()
            .iter()
            .filter(|i| i.trial == trial)
            .map(|i| i.rec.clone())
            .collect()
    }

    /// Reverts whatever this run left active and closes the sessions (after halting
    /// every agent when a stop condition fired). Returns what could not be
    /// reverted, said exactly.
    async fn rollback(&self, halt_all: bool) -> Vec<String> {
        let mut leftovers = self.revert_pending().await;
        let closes = self.conns.iter().map(|c| async move {
            let r = if halt_all {
                agents::halt(c).await
            } else {
                Ok(Vec::new())
            };
            (c, r, agents::close(c).await)
        });
        for (c, halted, closed) in futures_util::future::join_all(closes).await {
            for r in [halted, closed] {
                match r {
                    Ok(faults) => {
                        for f in faults {
                            if !f.leftover.is_empty() {
                                leftovers.push(format!(
                                    "agent {} fault {}: {}",
                                    c.agent.display(),
                                    f.id,
                                    f.leftover
                                ));
                            }
                        }
                    }
                    Err(e) => leftovers.push(format!(
                        "agent {}: closing the session failed ({e}); its faults revert when the lease lapses",
                        c.agent.display()
                    )),
                }
            }
        }
        leftovers
    }

    /// Reverts every fault of this run that has not ended, all at once.
    async fn revert_pending(&self) -> Vec<String> {
        let mut leftovers = Vec::new();
        let pending: Vec<(usize, usize, String)> = {
            let inj = self.injected.lock().unwrap();
            inj.iter()
                .enumerate()
                .filter(|(_, i)| i.rec.end_ns.is_none())
                .map(|(k, i)| (k, i.conn, i.fault.id.clone()))
                .collect()
        };
        if !pending.is_empty() {
            self.shared.event(
                EventKind::Revert,
                0,
                format!("rolling back: reverting {} active fault(s)", pending.len()),
            );
        }
        let reverts = pending.into_iter().map(|(k, conn, id)| async move {
            let r = agents::revert(&self.conns[conn], &id).await;
            (k, conn, id, r)
        });
        for (k, conn, id, r) in futures_util::future::join_all(reverts).await {
            match r {
                Ok(done) => {
                    self.record_end(k, &done);
                    if !done.leftover.is_empty() || done.state() == pb::FaultState::Failed {
                        leftovers.push(format!(
                            "agent {} fault {id}: {}",
                            self.conns[conn].agent.display(),
                            if done.leftover.is_empty() {
                                done.error.clone()
                            } else {
                                done.leftover.clone()
                            }
                        ));
                    }
                }
                Err(e) => leftovers.push(format!(
                    "agent {} fault {id}: revert failed ({e}); the agent reverts it when the lease lapses or the duration ends, check with `gpuchaos status`",
                    self.conns[conn].agent.display()
                )),
            }
        }
        leftovers
    }
}

/// One summary per objective (and one for the steady state, when it is checked).
fn summarize(exp: &ValidExperiment, trials: &[TrialRecord]) -> Vec<ObjectiveSummary> {
    let mut out = Vec::new();
    let evaluated: Vec<&TrialRecord> = trials.iter().filter(|t| !t.objectives.is_empty()).collect();
    for o in &exp.objectives {
        let results: Vec<&ObjectiveResult> = evaluated
            .iter()
            .filter_map(|t| t.objectives.iter().find(|r| r.name == o.name))
            .collect();
        let (limit_text, unit) = short_limit(&o.kind);
        let mut s = evaluate::summarize(&results, unit, limit_text);
        if results.is_empty() {
            s.name = o.name.clone();
            s.kind = ResultKind::from(&o.kind);
            s.probe = exp.probes[o.probe].name.clone();
            s.passed = false;
            s.evaluated = false;
            s.detail = "not evaluated: no trial got as far as its evaluation".into();
        }
        out.push(s);
    }
    if let Some(ss) = &exp.steady_state {
        let results: Vec<&ObjectiveResult> = evaluated
            .iter()
            .filter_map(|t| {
                t.objectives
                    .iter()
                    .find(|r| r.kind == ResultKind::SteadyState)
            })
            .collect();
        if !results.is_empty() {
            out.push(evaluate::summarize(
                &results,
                "s",
                format!("≤ {}", HumanDuration(ss.timeout)),
            ));
        }
    }
    out
}

/// Writes the journal and the reports (when a report directory was given).
pub(super) fn write(
    mut record: RunRecord,
    shared: &Shared,
    opts: &RunOptions,
) -> Result<(RunRecord, u8), CliError> {
    record.duration_ns = shared.clock.now_ns();
    shared.event(
        EventKind::RunEnd,
        0,
        format!(
            "run {} (exit {}){}",
            record.verdict,
            record.exit_code,
            record
                .reason
                .as_ref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        ),
    );
    {
        let tl = shared.timeline.lock().unwrap();
        record.events = tl.events.clone();
        let mut samples = tl.samples.clone();
        samples.sort_by_key(|s| (s.t_ns, s.probe));
        record.samples = samples;
    }
    if let Some(dir) = &opts.report_dir {
        crate::report::write_all(&record, dir).map_err(|e| {
            CliError::internal(format!(
                "cannot write the reports to {}: {e}",
                dir.display()
            ))
        })?;
    }
    let code = record.exit_code;
    Ok((record, code))
}

//! The trials: the first samples and the steady state before them, then one trial
//! at a time (its steps, the recovery observation, the steady state after it and
//! the evaluation of its objectives), each ending in its [`TrialRecord`].

use std::sync::Arc;
use std::time::Duration;

use gpuchaos_proto::spec::HumanDuration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::record::{EventKind, FaultRecord, ObjectiveResult, ResultKind, TrialRecord};
use super::{Abort, Runner, evaluate, stop};
use crate::experiment::plan::PlanStep;
use crate::experiment::{Anchor, ObjectiveKind, ValidObjective};

impl Runner {
    /// Everything from the first samples to the last trial. Returns why the run
    /// stopped early, if it did by itself (an abort from outside cancels this).
    pub(super) async fn trials(
        self: Arc<Self>,
        plans: &[Vec<PlanStep>],
        stop: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Option<Abort> {
        // Every probe answers once before anything is injected (a baseline, and
        // something for probe stop conditions to look at).
        self.shared.set_step("first samples".to_string());
        let wait_first = self
            .exp
            .probes
            .iter()
            .map(|p| p.interval + p.timeout)
            .max()
            .unwrap_or_default()
            + Duration::from_secs(1);
        self.shared
            .first_samples(self.exp.probes.len(), wait_first)
            .await;
        if let Some(s) = &self.exp.steady_state {
            self.shared.set_step("steady state".to_string());
            match self.steady(&s.probes, s.duration, s.timeout).await {
                Ok(took) => self.shared.event(
                    EventKind::SteadyState,
                    0,
                    format!(
                        "steady state holds ({} after {:.1}s)",
                        self.exp.probe_names(&s.probes),
                        took.as_secs_f64()
                    ),
                ),
                Err(e) => {
                    return Some(Abort::Aborted(format!(
                        "steady state before the first trial: {e}; nothing was injected"
                    )));
                }
            }
        }
        if let Err(e) = stop::watch(&self, stop, tracker) {
            return Some(Abort::Error {
                code: e.code,
                reason: e.message,
            });
        }
        for (t, plan) in plans.iter().enumerate() {
            let index = t as u32 + 1;
            let (trial, ended) = self.trial(index, plan).await;
            let steady_failed = trial
                .objectives
                .iter()
                .any(|o| o.kind == ResultKind::SteadyState && !o.passed);
            self.done.lock().unwrap().push(trial);
            if let Err(a) = ended {
                return Some(a);
            }
            if steady_failed {
                self.shared.event(
                    EventKind::Abort,
                    index,
                    "the steady state did not return: no further trials",
                );
                break;
            }
        }
        None
    }

    /// Runs one trial (1-based `index`) of `plan`. Returns its record and, when a
    /// step failed, why the run stops.
    async fn trial(&self, index: u32, plan: &[PlanStep]) -> (TrialRecord, Result<(), Abort>) {
        self.shared.live.lock().unwrap().trial = index;
        let start_ns = self.shared.clock.now_ns();
        self.shared.event(
            EventKind::TrialStart,
            index,
            format!("trial {index} of {}", self.exp.trials),
        );
        let mut trial = TrialRecord {
            index,
            start_ns,
            ..Default::default()
        };
        self.started.lock().unwrap().push(trial.clone());
        let steps = self.run_steps(index, plan).await;
        trial.method_end_ns = Some(self.shared.clock.now_ns());
        if let Some(t) = self.started.lock().unwrap().last_mut() {
            t.method_end_ns = trial.method_end_ns;
        }
        // Background faults of this trial end before it is evaluated.
        let open: Vec<usize> = {
            let inj = self.injected.lock().unwrap();
            (0..inj.len())
                .filter(|&k| inj[k].trial == index && inj[k].rec.end_ns.is_none())
                .collect()
        };
        if steps.is_ok() {
            self.wait_ended(&open).await;
        }
        trial.first_inject_ns = self.anchor_fault(index, None).and_then(|f| f.inject_ns);
        if let Err(a) = steps {
            trial.end_ns = self.shared.clock.now_ns();
            return (trial, Err(a));
        }
        self.observe(index).await;
        let steady = self.steady_after(index).await;
        trial.end_ns = self.shared.clock.now_ns();
        // Every sample started in the trial has its outcome before anything is
        // counted (each is bounded by its probe's timeout).
        self.shared
            .settled(
                trial.end_ns,
                self.exp.max_probe_timeout() + Duration::from_secs(1),
            )
            .await;
        trial.objectives = self.evaluate(&trial);
        trial.objectives.extend(steady);
        for o in &trial.objectives {
            self.shared.event(
                EventKind::Objective,
                index,
                format!(
                    "{} {}: {}",
                    if o.passed { "PASS" } else { "FAIL" },
                    o.name,
                    o.detail
                ),
            );
        }
        (trial, Ok(()))
    }

    /// The steady state after a trial, as an objective of its own (when the
    /// experiment has one).
    async fn steady_after(&self, index: u32) -> Option<ObjectiveResult> {
        let s = self.exp.steady_state.as_ref()?;
        self.shared
            .set_step("steady state after the trial".to_string());
        let r = self.steady(&s.probes, s.duration, s.timeout).await;
        let took = r.as_ref().ok().map(|d| d.as_secs_f64());
        self.shared.event(
            EventKind::SteadyState,
            index,
            match &r {
                Ok(d) => format!("steady state holds again ({:.1}s)", d.as_secs_f64()),
                Err(e) => format!("steady state after trial {index}: {e}"),
            },
        );
        Some(ObjectiveResult {
            name: "steady state after the trial".into(),
            kind: ResultKind::SteadyState,
            probe: self.exp.probe_names(&s.probes),
            passed: r.is_ok(),
            value: took,
            limit: s.timeout.as_secs_f64(),
            detail: match r {
                Ok(d) => format!(
                    "held for {} again {:.1}s after the recovery observation",
                    HumanDuration(s.duration),
                    d.as_secs_f64()
                ),
                Err(e) => e,
            },
            ..Default::default()
        })
    }

    /// Waits until every listed probe has passed, with no failure, for `hold`; gives
    /// up after `timeout`. Returns how long it took.
    async fn steady(
        &self,
        probes: &[usize],
        hold: Duration,
        timeout: Duration,
    ) -> Result<Duration, String> {
        let start = self.shared.clock.now_ns();
        let hold_ns = hold.as_nanos() as u64;
        loop {
            let now = self.shared.clock.now_ns();
            let mut all = true;
            let mut why = String::new();
            {
                let tl = self.shared.timeline.lock().unwrap();
                for &p in probes {
                    // The last failure of the probe (samples since `start` only).
                    let since = tl
                        .samples
                        .iter()
                        .filter(|s| s.probe == p && s.t_ns >= start && !s.ok)
                        .map(|s| s.end_ns)
                        .max()
                        .unwrap_or(start);
                    let passes = tl
                        .samples
                        .iter()
                        .filter(|s| s.probe == p && s.t_ns >= since && s.ok)
                        .count();
                    if now.saturating_sub(since) < hold_ns || passes == 0 {
                        all = false;
                        if let Some(last) = tl.samples.iter().rev().find(|s| s.probe == p && !s.ok)
                            && last.t_ns >= start
                        {
                            why = format!(
                                "{}: {}",
                                self.shared.probes[p].name,
                                last.error.clone().unwrap_or_default()
                            );
                        }
                    }
                }
            }
            if all {
                return Ok(Duration::from_nanos(now - start));
            }
            if now - start > timeout.as_nanos() as u64 {
                return Err(if why.is_empty() {
                    format!("not established within {}", HumanDuration(timeout))
                } else {
                    format!(
                        "not established within {}; last failure: {why}",
                        HumanDuration(timeout)
                    )
                });
            }
            self.shared.wait_change(Duration::from_millis(100)).await;
        }
    }

    /// Where a fault's recovery window ends: when the next fault of the trial that
    /// came after this one ended is injected (a later step's disruption is not this
    /// fault's), or at the trial's end.
    fn rto_window_end(&self, trial: u32, f: &FaultRecord, trial_end: u64) -> u64 {
        let Some(ended) = f.end_ns else {
            return trial_end;
        };
        let inj = self.injected.lock().unwrap();
        inj.iter()
            .filter(|i| i.trial == trial && i.rec.step != f.step)
            .filter_map(|i| i.rec.inject_ns)
            .filter(|t| *t >= ended)
            .min()
            .unwrap_or(trial_end)
            .min(trial_end)
    }

    /// Observes after the method until every RTO probe has recovered, or its limit
    /// (plus the samples needed to see a recovery) has passed.
    async fn observe(&self, trial: u32) {
        let mut deadline = self.shared.clock.now_ns();
        let mut watch = Vec::new();
        for o in &self.exp.objectives {
            let ObjectiveKind::Rto(r) = &o.kind else {
                continue;
            };
            let Some(f) = self.anchor_fault(trial, r.fault.as_deref()) else {
                continue;
            };
            let probe = &self.exp.probes[o.probe];
            let anchor = match r.anchor {
                Anchor::Inject => f.inject_ns.unwrap_or(0),
                Anchor::End => f.end_ns.or(f.inject_ns).unwrap_or(0),
            };
            let need = r.limit + probe.interval * (r.consecutive + 1) + probe.timeout;
            deadline = deadline.max(anchor + need.as_nanos() as u64);
            watch.push((o.probe, f.inject_ns.unwrap_or(0), r.consecutive));
        }
        if watch.is_empty() {
            return;
        }
        self.shared.set_step("observing recovery".to_string());
        loop {
            let now = self.shared.clock.now_ns();
            let done = {
                let tl = self.shared.timeline.lock().unwrap();
                watch.iter().all(|&(p, from, n)| {
                    let w = evaluate::window(&tl.samples, p, from, u64::MAX);
                    let r = evaluate::recovery(&w, n);
                    r.detect_ns.is_none() && w.len() >= n as usize || r.recovered_ns.is_some()
                })
            };
            if done || now >= deadline {
                return;
            }
            self.shared.wait_change(Duration::from_millis(100)).await;
        }
    }

    /// Evaluates every objective for one trial.
    fn evaluate(&self, trial: &TrialRecord) -> Vec<ObjectiveResult> {
        self.exp
            .objectives
            .iter()
            .map(|o| self.evaluate_one(o, trial))
            .collect()
    }

    fn evaluate_one(&self, o: &ValidObjective, trial: &TrialRecord) -> ObjectiveResult {
        let window_from = trial.first_inject_ns.unwrap_or(trial.start_ns);
        let window_to = trial
            .method_end_ns
            .unwrap_or(trial.end_ns)
            .max(window_from + 1);
        let p = o.probe;
        let interval = self.exp.probes[p].interval;
        let pname = self.exp.probes[p].name.as_str();
        let name = o.name.clone();
        // The fault an RTO is measured from, looked up before the timeline is locked.
        let anchor = match &o.kind {
            ObjectiveKind::Rto(r) => self.anchor_fault(trial.index, r.fault.as_deref()).map(|f| {
                let end = self.rto_window_end(trial.index, &f, trial.end_ns);
                (f, end)
            }),
            _ => None,
        };
        let tl = self.shared.timeline.lock().unwrap();
        match &o.kind {
            ObjectiveKind::Rto(r) => {
                let Some((f, window_end)) = anchor else {
                    return ObjectiveResult {
                        name,
                        kind: ResultKind::Rto,
                        probe: pname.to_string(),
                        limit: r.limit.as_secs_f64(),
                        detail: "no fault was verified in this trial: nothing to measure from"
                            .into(),
                        ..Default::default()
                    };
                };
                let inject = f.inject_ns.unwrap_or(0);
                let agent_err = self.conns[f.agent].offset_error_ns;
                evaluate::rto(evaluate::RtoInput {
                    name,
                    probe_name: pname,
                    samples: evaluate::window(&tl.samples, p, inject, window_end),
                    inject_ns: inject,
                    end_ns: f.end_ns,
                    anchor_end: r.anchor == Anchor::End,
                    consecutive: r.consecutive,
                    limit_ns: r.limit.as_nanos() as u64,
                    error_ns: interval.as_nanos() as u64 + agent_err,
                })
            }
            ObjectiveKind::Availability { min } => {
                let w = evaluate::window(&tl.samples, p, window_from, window_to);
                evaluate::availability(name, pname, &w, *min)
            }
            ObjectiveKind::Latency { percentile, limit } => {
                let w = evaluate::window(&tl.samples, p, window_from, window_to);
                evaluate::latency(name, pname, &w, *percentile, limit.as_nanos() as u64)
            }
            ObjectiveKind::Safety { max_unsafe } => {
                let w = evaluate::window(&tl.samples, p, trial.start_ns, trial.end_ns);
                evaluate::safety(name, pname, &w, *max_unsafe)
            }
        }
    }
}

//! The trials: the first samples and the steady state before them, then one trial
//! at a time (its steps, the recovery observation, the steady state after it and
//! the evaluation of its objectives), each ending in its [`TrialRecord`].

use std::sync::Arc;
use std::time::Duration;

use gpuchaos_proto::spec::HumanDuration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::evaluate::Tolerance;
use super::record::{EventKind, FaultRecord, ObjectiveResult, ResultKind, TrialRecord, Window};
use super::{Abort, Runner, agents, evaluate, phases, stop};
use crate::experiment::plan::PlanStep;
use crate::experiment::{ObjectiveKind, Phase, ProbeRole, RtoCheck, ValidObjective};

/// How long the run observes after the method for recovery when neither an RTO
/// objective nor `observe` says.
const DEFAULT_OBSERVE: Duration = Duration::from_secs(30);

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
        trial.objectives = self.evaluate(&trial).await;
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

    /// How each probe is read for phases and windows: the passes in a row and the
    /// tolerance of the first RTO objective on it (3 and none otherwise).
    fn probe_infos(&self) -> Vec<phases::ProbeInfo> {
        self.exp
            .probes
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let rto = self.exp.objectives.iter().find_map(|o| match &o.kind {
                    ObjectiveKind::Rto(r) if o.probe == i => Some(r),
                    _ => None,
                });
                phases::ProbeInfo {
                    index: i,
                    name: p.name.clone(),
                    interval_ns: p.interval.as_nanos() as u64,
                    role: p.role,
                    consecutive: rto.map_or(3, |r| r.consecutive),
                    tolerate: rto.and_then(|r| Tolerance::of(r.tolerate)),
                }
            })
            .collect()
    }

    /// The probe a fault's detected, masked and recovered phases are read from: the
    /// generation probe, else the first an RTO objective names, else the first.
    fn phase_probe(&self) -> usize {
        self.exp
            .probes
            .iter()
            .position(|p| p.role == Some(ProbeRole::Generation))
            .or_else(|| {
                self.exp.objectives.iter().find_map(|o| match o.kind {
                    ObjectiveKind::Rto(_) => Some(o.probe),
                    _ => None,
                })
            })
            .unwrap_or(0)
    }

    /// The probes the objectives and phases watch until they recover.
    fn watched_probes(&self) -> Vec<usize> {
        let mut v: Vec<usize> = Vec::new();
        for o in &self.exp.objectives {
            v.push(o.probe);
            if let ObjectiveKind::HealthTruth(h) = &o.kind {
                v.push(h.truth);
            }
        }
        for (i, p) in self.exp.probes.iter().enumerate() {
            if p.role.is_some() {
                v.push(i);
            }
        }
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Observes after the method until every watched probe has recovered (or was
    /// never disrupted), or the time to observe has passed: the RTO objectives'
    /// limits (plus the samples needed to see a recovery), at least `observe` after
    /// the method when it is given, [`DEFAULT_OBSERVE`] without either.
    async fn observe(&self, trial: u32) {
        let now = self.shared.clock.now_ns();
        let Some(first) = self.anchor_fault(trial, None).and_then(|f| f.inject_ns) else {
            return;
        };
        let mut deadline = now + self.exp.observe.unwrap_or_default().as_nanos() as u64;
        let mut any_rto = false;
        for o in &self.exp.objectives {
            let ObjectiveKind::Rto(r) = &o.kind else {
                continue;
            };
            let Some(f) = self.anchor_fault(trial, r.fault.as_deref()) else {
                continue;
            };
            let probe = &self.exp.probes[o.probe];
            let anchor = match r.from {
                Phase::End => f.end_ns.or(f.inject_ns).unwrap_or(0),
                _ => f.inject_ns.unwrap_or(0),
            };
            let need = r.limit + probe.interval * (r.consecutive + 1) + probe.timeout;
            deadline = deadline.max(anchor + need.as_nanos() as u64);
            any_rto = true;
        }
        if !any_rto && self.exp.observe.is_none() {
            deadline = deadline.max(now + DEFAULT_OBSERVE.as_nanos() as u64);
        }
        // RTOs from a phase after the injection (a cold start from `replaced`) need
        // their limit from that phase on: extended once it is seen.
        let from_phase: Vec<(&ValidObjective, &RtoCheck, u64)> = self
            .exp
            .objectives
            .iter()
            .filter_map(|o| match &o.kind {
                ObjectiveKind::Rto(r) if !matches!(r.from, Phase::Inject | Phase::End) => {
                    let probe = &self.exp.probes[o.probe];
                    let need = r.limit + probe.interval * (r.consecutive + 1) + probe.timeout;
                    Some((o, r, need.as_nanos() as u64))
                }
                _ => None,
            })
            .collect();
        let mut extended = vec![false; from_phase.len()];
        let mut last_refresh = 0u64;
        let infos = self.probe_infos();
        let watch: Vec<&phases::ProbeInfo> = self
            .watched_probes()
            .into_iter()
            .map(|p| &infos[p])
            .collect();
        if watch.is_empty() {
            return;
        }
        self.shared.set_step("observing recovery".to_string());
        loop {
            let now = self.shared.clock.now_ns();
            let done = {
                let tl = self.shared.timeline.lock().unwrap();
                watch.iter().all(|p| {
                    let w = evaluate::window(&tl.samples, p.index, first, u64::MAX);
                    let r = evaluate::recovery_with(&w, p.consecutive, p.tolerate);
                    r.detect_ns.is_none() && w.len() >= p.consecutive as usize
                        || r.recovered_ns.is_some()
                })
            };
            if done || now >= deadline {
                return;
            }
            if extended.iter().any(|e| !e) && now.saturating_sub(last_refresh) >= 1_000_000_000 {
                last_refresh = now;
                self.refresh_once(trial).await;
                for (k, (o, r, need)) in from_phase.iter().enumerate() {
                    if let Some(t) = self.phase_time(trial, o, r.from, r.fault.as_deref()) {
                        deadline = deadline.max(t + need);
                        extended[k] = true;
                    }
                }
            }
            self.shared.wait_change(Duration::from_millis(100)).await;
        }
    }

    /// When `phase` of the objective's fault happened, as far as the run has seen.
    fn phase_time(
        &self,
        trial: u32,
        o: &ValidObjective,
        phase: Phase,
        step: Option<&str>,
    ) -> Option<u64> {
        let f = self.anchor_fault(trial, step)?;
        let now = TrialRecord {
            index: trial,
            end_ns: self.shared.clock.now_ns(),
            ..Default::default()
        };
        let times = self.fault_times(&now, &f)?;
        let k = {
            let inj = self.injected.lock().unwrap();
            inj.iter()
                .position(|i| i.trial == trial && i.rec.id == f.id && i.conn == f.agent)
        }?;
        let observed = self.observed(k);
        let infos = self.probe_infos();
        let (p, _, notes) = {
            let tl = self.shared.timeline.lock().unwrap();
            phases::fault_phases(&tl.samples, &infos, o.probe, &times, &observed)
        };
        phases::phase_mark(phase, &times, &p, &notes)
            .ok()
            .map(|m| m.t_ns)
    }

    /// Reads the trial's faults again from their agents (for what the agents
    /// observed after the effect: replacements, GPU memory settling). A replacement
    /// whose GPU memory is still settling on an agent with NVML is waited for, at
    /// most its settle time and two watch intervals.
    async fn refresh_faults(&self, trial: u32) {
        let wait = {
            let inj = self.injected.lock().unwrap();
            inj.iter()
                .filter(|i| i.trial == trial)
                .map(|i| i.settle)
                .max()
                .unwrap_or_default()
        };
        let deadline = tokio::time::Instant::now() + wait + Duration::from_millis(200);
        loop {
            self.refresh_once(trial).await;
            let settling = {
                let inj = self.injected.lock().unwrap();
                inj.iter().filter(|i| i.trial == trial).any(|i| {
                    let has_gpus = self.conns[i.conn].info.gpu_error.is_empty()
                        && !self.conns[i.conn].info.gpus.is_empty();
                    let obs = &i.fault.observations;
                    has_gpus
                        && obs.iter().any(|o| {
                            o.kind == "replaced"
                                && !obs.iter().any(|g| g.kind == "gpu_ready" && g.pid == o.pid)
                        })
                })
            };
            tracing::debug!(settling, ?wait, "observations read");
            if !settling || tokio::time::Instant::now() >= deadline {
                return;
            }
            self.shared
                .set_step("waiting for the replacement's GPU memory to settle".to_string());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn refresh_once(&self, trial: u32) {
        let conns: Vec<usize> = {
            let inj = self.injected.lock().unwrap();
            let mut v: Vec<usize> = inj
                .iter()
                .filter(|i| i.trial == trial)
                .map(|i| i.conn)
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        let lists =
            futures_util::future::join_all(conns.iter().map(|&c| agents::list(&self.conns[c])))
                .await;
        let mut inj = self.injected.lock().unwrap();
        for (&c, list) in conns.iter().zip(lists) {
            match list {
                Ok(faults) => {
                    for i in inj.iter_mut().filter(|i| i.trial == trial && i.conn == c) {
                        if let Some(f) = faults.iter().find(|f| f.id == i.fault.id) {
                            i.fault.observations = f.observations.clone();
                        }
                    }
                }
                Err(e) => self.shared.event(
                    EventKind::Warning,
                    trial,
                    format!("reading the agent's observations for the recovery phases: {e}"),
                ),
            }
        }
    }

    /// The agent's observations of fault `k`, on the run's timeline.
    fn observed(&self, k: usize) -> Vec<phases::Observed> {
        let inj = self.injected.lock().unwrap();
        let c = &self.conns[inj[k].conn];
        inj[k]
            .fault
            .observations
            .iter()
            .filter_map(|o| {
                Some(phases::Observed {
                    kind: o.kind.clone(),
                    t_ns: c.map(&self.shared.clock, o.mono_ns)?,
                    error_ns: o.error_ns,
                    pid: o.pid,
                    gpu_bytes: o.gpu_bytes,
                    detail: o.detail.clone(),
                })
            })
            .collect()
    }

    fn fault_times(&self, trial: &TrialRecord, f: &FaultRecord) -> Option<phases::FaultTimes> {
        let (instant, from_end) = self
            .injected
            .lock()
            .unwrap()
            .iter()
            .find(|i| i.trial == trial.index && i.rec.id == f.id && i.conn == f.agent)
            .map_or((false, false), |i| (i.instant, i.watch_from_end));
        Some(phases::FaultTimes {
            verified_ns: f.inject_ns?,
            end_ns: f.end_ns,
            window_end: self.rto_window_end(trial.index, f, trial.end_ns),
            clock_error_ns: self.conns[f.agent].offset_error_ns,
            sustained: !instant,
            replaced_from_end: from_end,
        })
    }

    /// Fills in the phases of every fault of the trial.
    fn record_phases(&self, trial: &TrialRecord) {
        let infos = self.probe_infos();
        if infos.is_empty() {
            return;
        }
        let primary = self.phase_probe();
        let ks: Vec<usize> = {
            let inj = self.injected.lock().unwrap();
            (0..inj.len())
                .filter(|&k| inj[k].trial == trial.index)
                .collect()
        };
        for k in ks {
            let rec = self.injected.lock().unwrap()[k].rec.clone();
            let Some(times) = self.fault_times(trial, &rec) else {
                continue;
            };
            let observed = self.observed(k);
            let (p, per, notes) = {
                let tl = self.shared.timeline.lock().unwrap();
                phases::fault_phases(&tl.samples, &infos, primary, &times, &observed)
            };
            let mut inj = self.injected.lock().unwrap();
            let r = &mut inj[k].rec;
            r.phase_durations = phases::durations(&times, &p);
            r.phases = p;
            r.probe_phases = per;
            r.phase_notes = notes;
            r.phase_probe = infos[primary].name.clone();
        }
    }

    /// Evaluates every objective for one trial.
    async fn evaluate(&self, trial: &TrialRecord) -> Vec<ObjectiveResult> {
        self.refresh_faults(trial.index).await;
        self.record_phases(trial);
        self.exp
            .objectives
            .iter()
            .map(|o| self.evaluate_one(o, trial))
            .collect()
    }

    /// The window availability and latency are measured over: from the first
    /// fault's verification until the method ended or, when later, until the probe
    /// recovered (a kill's outage outlasts the fault), or the end of the observation.
    fn fault_window(&self, p: usize, trial: &TrialRecord) -> Window {
        let from = trial.first_inject_ns.unwrap_or(trial.start_ns);
        let method_end = trial.method_end_ns.unwrap_or(trial.end_ns).max(from + 1);
        let info = &self.probe_infos()[p];
        let name = &info.name;
        let tl = self.shared.timeline.lock().unwrap();
        let w = evaluate::window(&tl.samples, p, from, trial.end_ns.max(from + 1));
        let r = evaluate::recovery_with(&w, info.consecutive, info.tolerate);
        let start = if trial.first_inject_ns.is_some() {
            "first fault verified"
        } else {
            "trial start"
        };
        let (to, covers) = match (r.detect_ns, r.recovered_ns) {
            (Some(_), Some(rec)) if rec > method_end => (
                rec,
                format!("{start} → {name} recovered (after the method ended)"),
            ),
            (Some(_), None) => (
                trial.end_ns.max(method_end),
                format!("{start} → end of observation ({name} had not recovered)"),
            ),
            _ => (method_end, format!("{start} → method end")),
        };
        Window {
            from_ns: from,
            to_ns: to,
            covers,
        }
    }

    fn evaluate_one(&self, o: &ValidObjective, trial: &TrialRecord) -> ObjectiveResult {
        let p = o.probe;
        let interval = self.exp.probes[p].interval;
        let pname = self.exp.probes[p].name.as_str();
        let name = o.name.clone();
        let fault_of = |step: Option<&str>| {
            self.anchor_fault(trial.index, step).map(|f| {
                let end = self.rto_window_end(trial.index, &f, trial.end_ns);
                (f, end)
            })
        };
        let nothing = |kind: ResultKind, limit: f64| ObjectiveResult {
            name: name.clone(),
            kind,
            probe: pname.to_string(),
            limit,
            detail: "no fault was verified in this trial: nothing to measure from".into(),
            ..Default::default()
        };
        match &o.kind {
            ObjectiveKind::Rto(r) if !r.is_plain() => {
                let Some((f, _)) = fault_of(r.fault.as_deref()) else {
                    return nothing(ResultKind::Rto, r.limit.as_secs_f64());
                };
                self.phase_rto(name, o, r, trial, &f)
            }
            ObjectiveKind::Rto(r) => {
                let Some((f, window_end)) = fault_of(r.fault.as_deref()) else {
                    return nothing(ResultKind::Rto, r.limit.as_secs_f64());
                };
                let inject = f.inject_ns.unwrap_or(0);
                let agent_err = self.conns[f.agent].offset_error_ns;
                let tl = self.shared.timeline.lock().unwrap();
                evaluate::rto(evaluate::RtoInput {
                    name,
                    probe_name: pname,
                    samples: evaluate::window(&tl.samples, p, inject, window_end),
                    inject_ns: inject,
                    end_ns: f.end_ns,
                    anchor_end: r.from == Phase::End,
                    consecutive: r.consecutive,
                    tolerate: Tolerance::of(r.tolerate),
                    limit_ns: r.limit.as_nanos() as u64,
                    error_ns: interval.as_nanos() as u64 + agent_err,
                })
            }
            ObjectiveKind::Detect { fault, limit } => {
                let Some((f, window_end)) = fault_of(fault.as_deref()) else {
                    return nothing(ResultKind::Detect, limit.as_secs_f64());
                };
                let inject = f.inject_ns.unwrap_or(0);
                let tl = self.shared.timeline.lock().unwrap();
                let w = evaluate::window(&tl.samples, p, inject, window_end);
                evaluate::detect(
                    name,
                    pname,
                    &w,
                    inject,
                    limit.as_nanos() as u64,
                    interval.as_nanos() as u64 + self.conns[f.agent].offset_error_ns,
                )
            }
            ObjectiveKind::Availability { min } => {
                let win = self.fault_window(p, trial);
                let tl = self.shared.timeline.lock().unwrap();
                let w = evaluate::window(&tl.samples, p, win.from_ns, win.to_ns);
                evaluate::availability(name, pname, &w, *min, win)
            }
            ObjectiveKind::Latency { percentile, limit } => {
                let win = self.fault_window(p, trial);
                let tl = self.shared.timeline.lock().unwrap();
                let w = evaluate::window(&tl.samples, p, win.from_ns, win.to_ns);
                evaluate::latency(name, pname, &w, *percentile, limit.as_nanos() as u64, win)
            }
            ObjectiveKind::Safety { max_unsafe } => {
                let tl = self.shared.timeline.lock().unwrap();
                let w = evaluate::window(&tl.samples, p, trial.start_ns, trial.end_ns);
                evaluate::safety(name, pname, &w, *max_unsafe)
            }
            ObjectiveKind::HealthTruth(h) => {
                let truth = &self.exp.probes[h.truth];
                let tl = self.shared.timeline.lock().unwrap();
                let Some((lying, alarm, periods)) =
                    phases::health_truth(&tl.samples, p, h.truth, trial.start_ns, trial.end_ns)
                else {
                    return ObjectiveResult {
                        name,
                        kind: ResultKind::HealthTruth,
                        probe: pname.to_string(),
                        limit: h.max_lying.as_secs_f64(),
                        detail: format!(
                            "no samples of both {pname} and {} in the trial: nothing to compare",
                            truth.name
                        ),
                        ..Default::default()
                    };
                };
                evaluate::health_truth(evaluate::HealthTruthInput {
                    name,
                    health: pname,
                    truth: &truth.name,
                    lying_ns: lying,
                    false_alarm_ns: alarm,
                    lying_periods: periods,
                    error_ns: (interval + truth.interval).as_nanos() as u64,
                    max_lying: h.max_lying,
                    max_false_alarm: h.max_false_alarm,
                    window: Window {
                        from_ns: trial.start_ns,
                        to_ns: trial.end_ns,
                        covers: "the whole trial".into(),
                    },
                })
            }
        }
    }

    /// An RTO between two phases, read through the objective's probe.
    fn phase_rto(
        &self,
        name: String,
        o: &ValidObjective,
        r: &RtoCheck,
        trial: &TrialRecord,
        f: &FaultRecord,
    ) -> ObjectiveResult {
        let pname = self.exp.probes[o.probe].name.clone();
        let mut res = ObjectiveResult {
            name,
            kind: ResultKind::Rto,
            probe: pname,
            limit: r.limit.as_secs_f64(),
            ..Default::default()
        };
        let Some(times) = self.fault_times(trial, f) else {
            res.detail = "the fault was not verified: nothing to measure from".into();
            return res;
        };
        let k = {
            let inj = self.injected.lock().unwrap();
            inj.iter()
                .position(|i| i.trial == trial.index && i.rec.id == f.id && i.conn == f.agent)
        };
        let observed = k.map(|k| self.observed(k)).unwrap_or_default();
        // The objective's probe is read with the objective's own passes in a row and
        // tolerance, whatever another objective on that probe says.
        let mut infos = self.probe_infos();
        infos[o.probe].consecutive = r.consecutive;
        infos[o.probe].tolerate = Tolerance::of(r.tolerate);
        let (p, _, notes) = {
            let tl = self.shared.timeline.lock().unwrap();
            phases::fault_phases(&tl.samples, &infos, o.probe, &times, &observed)
        };
        let span = format!("{} → {}", r.from.as_str(), r.to.as_str());
        let from = phases::phase_mark(r.from, &times, &p, &notes);
        let to = phases::phase_mark(r.to, &times, &p, &notes);
        match (from, to) {
            (Err(e), _) => {
                res.detail = format!("{span}: `{}` was not observed: {e}", r.from.as_str());
            }
            (_, Err(e)) => {
                res.detail = format!("{span}: `{}` was not observed: {e}", r.to.as_str());
            }
            (Ok(a), Ok(b)) => {
                let v = (b.t_ns as f64 - a.t_ns as f64) / 1e9;
                res.value = Some(v);
                res.error_bar = Some((a.error_ns + b.error_ns) as f64 / 1e9);
                res.anchor_ns = Some(a.t_ns);
                res.recovered_ns = Some(b.t_ns);
                res.passed = v >= 0.0 && v <= r.limit.as_secs_f64();
                res.detail = if v < 0.0 {
                    format!(
                        "{span}: `{}` came {:.3}s before `{}`",
                        r.to.as_str(),
                        -v,
                        r.from.as_str()
                    )
                } else if res.passed {
                    format!("{span} took {v:.3}s")
                } else {
                    format!(
                        "{span} took {v:.3}s, over the limit of {}: the `{}` phase overran",
                        HumanDuration(r.limit),
                        r.to.as_str()
                    )
                };
            }
        }
        res
    }
}

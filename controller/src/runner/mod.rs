//! `gpuchaos run`: executes an experiment against agents while probes watch.
//!
//! 1. Connect to every agent, measure its clock offset, check it supports the
//!    experiment's fault kinds, open a session (lease) and keep renewing it.
//! 2. Start every probe on its own schedule; wait for the steady state (or abort
//!    without injecting).
//! 3. Per trial: run the method's steps, observe until the RTO probes recover (or
//!    their limits pass), check the steady state again, evaluate the objectives.
//! 4. Always roll back: revert what is still active and close the sessions, whatever
//!    ended the run (success, failed objective, stop condition, Ctrl-C, SIGTERM). If
//!    this process dies instead, the agents revert when the lease lapses.
//! 5. Write the journal and the reports; the exit code says what happened.

pub mod agents;
pub mod evaluate;
pub mod probes;
pub mod record;
pub mod shared;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpuchaos_proto::pb;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::exit::{self, CliError};
use crate::experiment::load::Loaded;
use crate::experiment::plan::{self, PlanStep, PlannedFault};
use crate::experiment::{Anchor, Experiment};
use crate::fleet::Fleet;
use crate::probe::{Prober, PromQuery};
use agents::Conn;
use record::*;
use shared::{Clock, Shared};

pub struct RunOptions {
    pub file: String,
    pub report_dir: Option<PathBuf>,
    /// Agents and TLS from the command line (used when the experiment names none).
    pub cli_fleet: Fleet,
    /// Cancelled on SIGINT/SIGTERM; the reason is recorded.
    pub interrupt: CancellationToken,
    pub interrupt_reason: Arc<Mutex<String>>,
    pub run_seed: Option<u64>,
}

/// Why the run stopped early.
#[derive(Debug, Clone)]
struct Abort {
    code: u8,
    verdict: &'static str,
    reason: String,
    /// A stop condition fired: the service is in danger, so every agent reverts
    /// every fault it holds (`halt`), this run's or not.
    halt_all: bool,
}

/// The agents an experiment runs against: its own, or the command line's.
pub fn fleet_for(loaded: &Loaded, cli: &Fleet) -> Fleet {
    if loaded.agents.is_empty() {
        let mut f = cli.clone();
        if loaded.tls.is_some() {
            f.tls = loaded.tls.clone();
        }
        f
    } else {
        Fleet {
            agents: loaded.agents.clone(),
            tls: loaded.tls.clone().or_else(|| cli.tls.clone()),
            timeout: cli.timeout,
        }
    }
}

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
        gpuchaos_proto::spec::HumanDuration(e.lease())
    ));
    out.push("probes:".into());
    for p in &e.probes {
        out.push(format!(
            "  {} ({}): {} every {}, timeout {}",
            p.name,
            p.kind_name(),
            p.target(),
            gpuchaos_proto::spec::HumanDuration(p.interval()),
            gpuchaos_proto::spec::HumanDuration(p.timeout())
        ));
    }
    if let Some(s) = &e.steady_state {
        out.push(format!(
            "steady state: {} passing for {} (waiting at most {}) before the first trial and after each",
            s.probes.join(", "),
            gpuchaos_proto::spec::HumanDuration(s.duration()),
            gpuchaos_proto::spec::HumanDuration(s.timeout())
        ));
    }
    for t in 0..e.trials.min(3) {
        let p =
            plan::plan_method(&e.method, &fleet.agents, run_seed, t).map_err(CliError::invalid)?;
        out.push(format!(
            "trial {} (about {}):",
            t + 1,
            gpuchaos_proto::spec::HumanDuration(plan::expected_duration(&p))
        ));
        plan::describe(&p, &fleet.agents, 1, &mut out);
    }
    if e.trials > 3 {
        out.push(format!("… and {} more trials", e.trials - 3));
    }
    out.push("objectives:".into());
    for o in &e.objectives {
        out.push(format!("  {}: {}", o.display_name(), limit_text(o)));
    }
    for s in &e.stop_conditions {
        out.push(format!("stop if: {}", s.display_name()));
    }
    Ok(out)
}

fn limit_text(o: &crate::experiment::Objective) -> String {
    use gpuchaos_proto::spec::HumanDuration as H;
    if let Some(r) = &o.rto {
        format!(
            "{} recovers within {} of the {} ({} passing in a row)",
            r.probe,
            H(r.limit.0),
            match r.anchor {
                Anchor::Inject => "injection",
                Anchor::End => "fault's end",
            },
            r.consecutive()
        )
    } else if let Some(a) = &o.availability {
        format!(
            "{} passes ≥ {:.2}% of samples in the fault window",
            a.probe,
            a.min * 100.0
        )
    } else if let Some(l) = &o.latency {
        format!("{} p{} ≤ {}", l.probe, l.percentile, H(l.limit.0))
    } else if let Some(s) = &o.safety {
        format!("{} lets through ≤ {} unsafe outputs", s.probe, s.max_unsafe)
    } else {
        String::new()
    }
}

fn short_limit(o: &crate::experiment::Objective) -> (String, &'static str) {
    use gpuchaos_proto::spec::HumanDuration as H;
    if let Some(r) = &o.rto {
        (format!("≤ {}", H(r.limit.0)), "s")
    } else if let Some(a) = &o.availability {
        (format!("≥ {:.2}%", a.min * 100.0), "ratio")
    } else if let Some(l) = &o.latency {
        (format!("p{} ≤ {}", l.percentile, H(l.limit.0)), "s")
    } else if let Some(s) = &o.safety {
        (format!("≤ {} unsafe", s.max_unsafe), "count")
    } else {
        (String::new(), "")
    }
}

type StepFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), Abort>> + Send + 'a>>;

/// A fault injected by this run, as the runner tracks it.
struct Injected {
    trial: u32,
    conn: usize,
    fault: pb::Fault,
    rec: FaultRecord,
}

struct Runner {
    shared: Arc<Shared>,
    exp: Experiment,
    conns: Vec<Conn>,
    injected: Mutex<Vec<Injected>>,
    /// Each trial as far as it got (start, method end): an abort cancels the trial
    /// body, and its record must still say when it ran.
    started: Mutex<Vec<TrialRecord>>,
    abort: CancellationToken,
    abort_reason: Mutex<Option<Abort>>,
}

impl Runner {
    fn stop_condition_fired(&self, name: &str) {
        let reason = format!("stop condition: {name}");
        self.shared.event("stop-condition", 0, reason.clone());
        self.abort_with(Abort {
            code: exit::ABORTED,
            verdict: "aborted",
            reason,
            halt_all: true,
        });
    }

    fn abort_with(&self, a: Abort) {
        let mut r = self.abort_reason.lock().unwrap();
        if r.is_none() {
            *r = Some(a);
        }
        self.abort.cancel();
    }

    /// Injects one planned fault on its agents (all at once) and, unless it runs in
    /// the background, waits for it to end everywhere.
    async fn fault_step(&self, trial: u32, f: &PlannedFault) -> Result<(), Abort> {
        self.shared
            .set_step(format!("{} ({})", f.label, plan::summary(&f.spec)));
        let injections = crate::commands::join_all(
            f.agents
                .iter()
                .map(|&i| async move { (i, agents::inject(&self.conns[i], &f.spec).await) }),
        )
        .await;
        let mut failure = None;
        let mut mine = Vec::new();
        for (i, r) in injections {
            let c = &self.conns[i];
            match r {
                Ok(fault) => {
                    let inject_ns = c.map(&self.shared.clock, fault.verified_mono_ns);
                    let rec = FaultRecord {
                        step: f.label.clone(),
                        agent: i,
                        id: fault.id.clone(),
                        kind: fault.kind.clone(),
                        summary: plan::summary(&f.spec),
                        target: fault.target.clone(),
                        inject_ns,
                        ..Default::default()
                    };
                    self.shared.event(
                        "inject",
                        trial,
                        format!(
                            "{}: {} verified on {} as {} ({}); lasts {}",
                            f.label,
                            plan::summary(&f.spec),
                            c.agent.display(),
                            fault.id,
                            fault.target,
                            gpuchaos_proto::spec::HumanDuration(f.spec.duration())
                        ),
                    );
                    mine.push(self.injected.lock().unwrap().len());
                    self.injected.lock().unwrap().push(Injected {
                        trial,
                        conn: i,
                        fault,
                        rec,
                    });
                }
                Err(s) => {
                    let msg = format!(
                        "{}: {} could not be injected on {}: {}",
                        f.label,
                        plan::summary(&f.spec),
                        c.agent.display(),
                        s.message()
                    );
                    self.shared.event("inject-failed", trial, msg.clone());
                    let code = exit::from_status(&s, exit::INJECT_FAILED);
                    failure.get_or_insert(Abort {
                        code: if code == exit::INVALID_INPUT {
                            exit::INVALID_INPUT
                        } else {
                            exit::INJECT_FAILED
                        },
                        verdict: "inject-failed",
                        halt_all: false,
                        reason: msg,
                    });
                }
            }
        }
        if let Some(a) = failure {
            return Err(a);
        }
        if !f.background {
            self.wait_ended(&mine).await;
        }
        Ok(())
    }

    /// Waits until each of these injected faults has ended, recording when.
    async fn wait_ended(&self, which: &[usize]) {
        let waits = which.iter().map(|&k| {
            let (conn, fault) = {
                let inj = self.injected.lock().unwrap();
                (inj[k].conn, inj[k].fault.clone())
            };
            async move {
                let r = agents::wait_end(&self.conns[conn], &self.shared.clock, &fault).await;
                (k, r)
            }
        });
        for (k, r) in crate::commands::join_all(waits).await {
            match r {
                Ok(done) => self.record_end(k, &done),
                Err(e) => self.shared.event("warning", 0, e),
            }
        }
    }

    fn record_end(&self, k: usize, done: &pb::Fault) {
        let mut inj = self.injected.lock().unwrap();
        let i = &mut inj[k];
        if i.rec.end_ns.is_some() {
            return;
        }
        i.rec.end_ns = self.conns[i.conn].map(&self.shared.clock, done.ended_mono_ns);
        i.rec.end_reason = done.end_reason.clone();
        i.rec.error = done.error.clone();
        i.rec.leftover = done.leftover.clone();
        let msg = format!(
            "{}: fault {} on {} ended ({}){}",
            i.rec.step,
            done.id,
            self.conns[i.conn].agent.display(),
            if done.end_reason.is_empty() {
                gpuchaos_proto::state_name(done.state())
            } else {
                &done.end_reason
            },
            if done.leftover.is_empty() {
                String::new()
            } else {
                format!("; LEFT BEHIND: {}", done.leftover)
            }
        );
        let trial = i.trial;
        drop(inj);
        self.shared.event("fault-end", trial, msg);
    }

    fn run_steps<'a>(&'a self, trial: u32, steps: &'a [PlanStep]) -> StepFuture<'a> {
        Box::pin(async move {
            for s in steps {
                match s {
                    PlanStep::Wait(d) => {
                        self.shared
                            .set_step(format!("wait {}", gpuchaos_proto::spec::HumanDuration(*d)));
                        tokio::time::sleep(*d).await;
                    }
                    PlanStep::Fault(f) => self.fault_step(trial, f).await?,
                    PlanStep::Parallel(group) => {
                        let results = crate::commands::join_all(
                            group
                                .iter()
                                .map(|g| self.run_steps(trial, std::slice::from_ref(g))),
                        )
                        .await;
                        for r in results {
                            r?;
                        }
                    }
                }
            }
            Ok(())
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
                    format!(
                        "not established within {}",
                        gpuchaos_proto::spec::HumanDuration(timeout)
                    )
                } else {
                    format!(
                        "not established within {}; last failure: {why}",
                        gpuchaos_proto::spec::HumanDuration(timeout)
                    )
                });
            }
            self.shared.wait_change(Duration::from_millis(100)).await;
        }
    }

    fn probe_index(&self, name: &str) -> usize {
        self.shared
            .probes
            .iter()
            .position(|p| p.name == name)
            .unwrap_or(0)
    }

    /// The anchor fault of an RTO objective in a trial: the named step's first fault,
    /// or the trial's first fault.
    fn anchor_fault(&self, trial: u32, step: Option<&str>) -> Option<FaultRecord> {
        let inj = self.injected.lock().unwrap();
        inj.iter()
            .filter(|i| i.trial == trial && step.is_none_or(|s| i.rec.step == s))
            .filter_map(|i| i.rec.inject_ns.map(|t| (t, i.rec.clone())))
            .min_by_key(|(t, _)| *t)
            .map(|(_, r)| r)
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
            let Some(r) = &o.rto else { continue };
            let Some(f) = self.anchor_fault(trial, r.fault.as_deref()) else {
                continue;
            };
            let p = self.probe_index(&r.probe);
            let probe = &self.exp.probes[p];
            let anchor = match r.anchor {
                Anchor::Inject => f.inject_ns.unwrap_or(0),
                Anchor::End => f.end_ns.or(f.inject_ns).unwrap_or(0),
            };
            let need = r.limit.0 + probe.interval() * (r.consecutive() + 1) + probe.timeout();
            deadline = deadline.max(anchor + need.as_nanos() as u64);
            watch.push((p, f.inject_ns.unwrap_or(0), r.consecutive()));
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
        let tl = self.shared.timeline.lock().unwrap();
        let window_from = trial.first_inject_ns.unwrap_or(trial.start_ns);
        let window_to = trial
            .method_end_ns
            .unwrap_or(trial.end_ns)
            .max(window_from + 1);
        let mut out = Vec::new();
        for o in &self.exp.objectives {
            let name = o.display_name();
            let p = self.probe_index(o.probe());
            let interval = self.exp.probes[p].interval();
            let pname = self.exp.probes[p].name.as_str();
            if let Some(r) = &o.rto {
                let Some(f) = self.anchor_fault(trial.index, r.fault.as_deref()) else {
                    out.push(ObjectiveResult {
                        name,
                        kind: "rto".into(),
                        probe: pname.to_string(),
                        limit: r.limit.0.as_secs_f64(),
                        detail: "no fault was verified in this trial: nothing to measure from"
                            .into(),
                        ..Default::default()
                    });
                    continue;
                };
                let inject = f.inject_ns.unwrap_or(0);
                let agent_err = self.conns[f.agent].offset_error_ns;
                out.push(evaluate::rto(evaluate::RtoInput {
                    name,
                    probe_name: pname,
                    samples: evaluate::window(
                        &tl.samples,
                        p,
                        inject,
                        self.rto_window_end(trial.index, &f, trial.end_ns),
                    ),
                    inject_ns: inject,
                    end_ns: f.end_ns,
                    anchor_end: r.anchor == Anchor::End,
                    consecutive: r.consecutive(),
                    limit_ns: r.limit.0.as_nanos() as u64,
                    error_ns: interval.as_nanos() as u64 + agent_err,
                }));
            } else if let Some(a) = &o.availability {
                let w = evaluate::window(&tl.samples, p, window_from, window_to);
                out.push(evaluate::availability(name, pname, &w, a.min));
            } else if let Some(l) = &o.latency {
                let w = evaluate::window(&tl.samples, p, window_from, window_to);
                out.push(evaluate::latency(
                    name,
                    pname,
                    &w,
                    l.percentile,
                    l.limit.0.as_nanos() as u64,
                ));
            } else if let Some(s) = &o.safety {
                let w = evaluate::window(&tl.samples, p, trial.start_ns, trial.end_ns);
                out.push(evaluate::safety(name, pname, &w, s.max_unsafe));
            }
        }
        out
    }

    /// Reverts whatever this run left active and closes the sessions. Returns what
    /// could not be reverted, said exactly.
    async fn rollback(&self, halt_all: bool) -> Vec<String> {
        let mut leftovers = Vec::new();
        let pending: Vec<usize> = {
            let inj = self.injected.lock().unwrap();
            (0..inj.len())
                .filter(|&k| inj[k].rec.end_ns.is_none())
                .collect()
        };
        if !pending.is_empty() {
            self.shared.event(
                "revert",
                0,
                format!("rolling back: reverting {} active fault(s)", pending.len()),
            );
        }
        let reverts = pending.iter().map(|&k| {
            let (conn, id) = {
                let inj = self.injected.lock().unwrap();
                (inj[k].conn, inj[k].fault.id.clone())
            };
            async move {
                (
                    k,
                    conn,
                    id.clone(),
                    agents::revert(&self.conns[conn], &id).await,
                )
            }
        });
        for (k, conn, id, r) in crate::commands::join_all(reverts).await {
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
        let closes = self.conns.iter().map(|c| async move {
            let r = if halt_all {
                agents::halt(c).await
            } else {
                Ok(Vec::new())
            };
            (c, r, agents::close(c).await)
        });
        for (c, halted, closed) in crate::commands::join_all(closes).await {
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
}

fn stop_interval(sc: &crate::experiment::StopCondition) -> Duration {
    sc.interval.map(|d| d.0).unwrap_or(Duration::from_secs(5))
}

/// Evaluates every Prometheus stop condition and Prometheus probe once, before
/// anything is touched. Returns why the run must not start: a query that cannot be
/// evaluated (the reason quoted from Prometheus), or a stop condition that already
/// holds.
async fn preflight(exp: &Experiment) -> Vec<String> {
    let mut checks = Vec::new();
    for sc in &exp.stop_conditions {
        if let Some(q) = &sc.prometheus {
            checks.push((
                true,
                format!("stop condition {}", sc.display_name()),
                q,
                stop_interval(sc),
            ));
        }
    }
    for p in &exp.probes {
        if let Some(q) = &p.prometheus {
            checks.push((false, format!("probe {}", p.name), q, p.timeout()));
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
                gpuchaos_proto::spec::HumanDuration(within.max(Duration::from_secs(1)))
            )),
        }
    });
    crate::commands::join_all(runs)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Watches the stop conditions from the first trial on; fires `Runner::abort`.
fn watch_stop_conditions(
    runner: &Arc<Runner>,
    stop: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<(), CliError> {
    for sc in &runner.exp.stop_conditions {
        let runner_c = runner.clone();
        let stop = stop.clone();
        let name = sc.display_name();
        if let (Some(probe), Some(limit)) = (&sc.probe, sc.failing_for) {
            let p = runner.probe_index(probe);
            let limit_ns = limit.0.as_nanos() as u64;
            tracker.spawn(async move {
                let armed_at = runner_c.shared.clock.now_ns();
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                    let now = runner_c.shared.clock.now_ns();
                    let streak_start = {
                        let tl = runner_c.shared.timeline.lock().unwrap();
                        let last_ok = tl
                            .samples
                            .iter()
                            .filter(|s| s.probe == p && s.ok)
                            .map(|s| s.t_ns)
                            .max()
                            .unwrap_or(0)
                            .max(armed_at);
                        tl.samples
                            .iter()
                            .filter(|s| s.probe == p && !s.ok && s.t_ns >= last_ok)
                            .map(|s| s.t_ns)
                            .min()
                    };
                    if let Some(t) = streak_start
                        && now.saturating_sub(t) > limit_ns
                    {
                        runner_c.stop_condition_fired(&name);
                        return;
                    }
                }
            });
        } else if let Some(q) = &sc.prometheus {
            let query = PromQuery::new(q).map_err(CliError::invalid)?;
            let every = stop_interval(sc);
            tracker.spawn(async move {
                // A safety net that cannot be evaluated is no safety net: after
                // three intervals of errors the run is aborted, not left unprotected.
                let mut failing_since: Option<u64> = None;
                let give_up_ns = (every * 3).as_nanos() as u64;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(every) => {}
                    }
                    let error = match tokio::time::timeout(every, query.evaluate()).await {
                        Ok(Ok(r)) if r.holds => {
                            runner_c.shared.event(
                                "stop-condition",
                                0,
                                format!("stop condition {name} holds: {}", r.describe()),
                            );
                            runner_c.stop_condition_fired(&name);
                            return;
                        }
                        Ok(Ok(_)) => {
                            failing_since = None;
                            continue;
                        }
                        Ok(Err(e)) => e,
                        Err(_) => format!(
                            "no answer within {}",
                            gpuchaos_proto::spec::HumanDuration(every)
                        ),
                    };
                    let now = runner_c.shared.clock.now_ns();
                    let since = *failing_since.get_or_insert(now);
                    runner_c.shared.event(
                        "warning",
                        0,
                        format!("stop condition {name} cannot be evaluated: {error}"),
                    );
                    if now.saturating_sub(since) + every.as_nanos() as u64 > give_up_ns {
                        let reason = format!(
                            "stop condition {name} could not be evaluated for {} (3 intervals): {error}; the run was unprotected, so it stops",
                            gpuchaos_proto::spec::HumanDuration(Duration::from_nanos(
                                now.saturating_sub(since) + every.as_nanos() as u64
                            ))
                        );
                        runner_c.shared.event("abort", 0, reason.clone());
                        runner_c.abort_with(Abort {
                            code: exit::ABORTED,
                            verdict: "aborted",
                            halt_all: false,
                            reason,
                        });
                        return;
                    }
                }
            });
        }
    }
    Ok(())
}

/// Runs an experiment. Returns the journal (already written when a report directory
/// was given) and the exit code.
pub async fn run(loaded: &Loaded, opts: &RunOptions) -> Result<(RunRecord, u8), CliError> {
    let exp = loaded.experiment.clone();
    let fleet = fleet_for(loaded, &opts.cli_fleet);
    let run_seed = opts.run_seed.unwrap_or_else(rand::random);
    // Plans first: a selection that cannot be satisfied is invalid input, found
    // before anything is touched.
    let mut plans = Vec::new();
    for t in 0..exp.trials {
        plans.push(
            plan::plan_method(&exp.method, &fleet.agents, run_seed, t)
                .map_err(CliError::invalid)?,
        );
    }
    let mut probers = Vec::new();
    let mut probe_records = Vec::new();
    for p in &exp.probes {
        probers.push(
            Prober::new(p, &loaded.base_dir)
                .map_err(|e| CliError::invalid(format!("probe {}: {e}", p.name)))?,
        );
        probe_records.push(ProbeRecord {
            name: p.name.clone(),
            kind: p.kind_name().to_string(),
            target: p.target(),
            interval_ns: p.interval().as_nanos() as u64,
            timeout_ns: p.timeout().as_nanos() as u64,
        });
    }
    let clock = Clock::start();
    let started_unix_ms = gpuchaos_proto::clock::unix_ms();
    let shared = Arc::new(Shared::new(clock, probe_records.clone()));
    shared.live.lock().unwrap().trials = exp.trials;
    shared.event(
        "run-start",
        0,
        format!(
            "experiment {}: {} agent(s), {} probe(s), {} trial(s), run seed {run_seed}",
            exp.metadata.name,
            fleet.agents.len(),
            exp.probes.len(),
            exp.trials
        ),
    );

    let mut record = RunRecord {
        format: FORMAT,
        experiment: exp.metadata.name.clone(),
        description: exp.metadata.description.clone(),
        file: opts.file.clone(),
        gpuchaos_version: gpuchaos_proto::VERSION.to_string(),
        started_unix_ms,
        run_seed,
        probes: probe_records,
        ..Default::default()
    };

    // Every stop condition and Prometheus probe is evaluated once before any agent
    // is touched: a run whose safety net is broken does not start.
    let broken = preflight(&exp).await;
    if !broken.is_empty() {
        for b in &broken {
            shared.event("abort", 0, b.clone());
        }
        record.verdict = "aborted".into();
        record.exit_code = exit::ABORTED;
        record.reason = Some(format!("nothing was injected: {}", broken.join("; ")));
        return finish(record, &shared, opts);
    }

    // Connect, measure clocks, check capabilities, open sessions.
    let connects = crate::commands::join_all(
        fleet
            .agents
            .iter()
            .map(|a| agents::connect(&fleet, a, &clock)),
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
    }
    let holder = format!(
        "gpuchaos run {} (pid {})",
        exp.metadata.name,
        std::process::id()
    );
    if problems.is_empty() {
        for c in conns.iter_mut() {
            if let Err(e) = agents::open_session(c, exp.lease(), &holder).await {
                problems.push(e);
            }
        }
    }
    for c in &conns {
        shared.event(
            "agent",
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
    record.agents = conns.iter().map(Conn::record).collect();
    if !problems.is_empty() {
        for p in &problems {
            shared.event("abort", 0, p.clone());
        }
        // Sessions that did open are closed (nothing was injected).
        for c in &conns {
            let _ = agents::close(c).await;
        }
        record.verdict = "inject-failed".into();
        record.exit_code = exit::INJECT_FAILED;
        record.reason = Some(format!("nothing was injected: {}", problems.join("; ")));
        return finish(record, &shared, opts);
    }

    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let lease_lost = CancellationToken::new();
    agents::renew_loop(
        shared.clone(),
        conns
            .iter()
            .map(|c| (c.agent.clone(), c.client.clone(), c.session.clone()))
            .collect(),
        exp.lease(),
        stop.clone(),
        lease_lost.clone(),
        &tracker,
    );
    probes::start(
        &shared,
        probers,
        exp.probes
            .iter()
            .map(|p| (p.interval(), p.timeout()))
            .collect(),
        &stop,
        &tracker,
    );
    if shared.tty {
        let s = shared.clone();
        let stop = stop.clone();
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => s.draw_status(),
                }
            }
        });
    }

    let runner = Arc::new(Runner {
        shared: shared.clone(),
        exp: exp.clone(),
        conns,
        injected: Mutex::new(Vec::new()),
        started: Mutex::new(Vec::new()),
        abort: CancellationToken::new(),
        abort_reason: Mutex::new(None),
    });
    // Interrupts and lost leases abort the run like a stop condition does.
    {
        let r = runner.clone();
        let interrupt = opts.interrupt.clone();
        let why = opts.interrupt_reason.clone();
        let lost = lease_lost.clone();
        let stop = stop.clone();
        tracker.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = interrupt.cancelled() => {
                    let reason = format!("interrupted by {}", why.lock().unwrap());
                    r.shared.event("abort", 0, reason.clone());
                    r.abort_with(Abort { code: exit::ABORTED, verdict: "aborted", reason, halt_all: false });
                }
                _ = lost.cancelled() => r.abort_with(Abort {
                    code: exit::ABORTED,
                    verdict: "aborted",
                    halt_all: false,
                    reason: "a session lease lapsed on an agent, which reverted this run's faults: the measurements would be wrong".into(),
                }),
            }
        });
    }

    let steady_probes: Vec<usize> = exp
        .steady_state
        .as_ref()
        .map(|s| s.probes.iter().map(|n| runner.probe_index(n)).collect())
        .unwrap_or_default();
    let done: Arc<Mutex<Vec<TrialRecord>>> = Arc::new(Mutex::new(Vec::new()));
    let body = {
        let runner = runner.clone();
        let done = done.clone();
        let plans = plans.clone();
        let stop = stop.clone();
        let tracker = tracker.clone();
        async move {
            // Every probe answers once before anything is injected (a baseline, and
            // something for probe stop conditions to look at).
            runner.shared.set_step("first samples".to_string());
            let wait_first = runner
                .exp
                .probes
                .iter()
                .map(|p| p.interval() + p.timeout())
                .max()
                .unwrap_or_default()
                + Duration::from_secs(1);
            runner
                .shared
                .first_samples(runner.exp.probes.len(), wait_first)
                .await;
            if let Some(s) = &runner.exp.steady_state {
                runner.shared.set_step("steady state".to_string());
                match runner
                    .steady(&steady_probes, s.duration(), s.timeout())
                    .await
                {
                    Ok(took) => runner.shared.event(
                        "steady-state",
                        0,
                        format!(
                            "steady state holds ({} after {:.1}s)",
                            s.probes.join(", "),
                            took.as_secs_f64()
                        ),
                    ),
                    Err(e) => {
                        return Some(Abort {
                            code: exit::ABORTED,
                            verdict: "aborted",
                            halt_all: false,
                            reason: format!(
                                "steady state before the first trial: {e}; nothing was injected"
                            ),
                        });
                    }
                }
            }
            if let Err(e) = watch_stop_conditions(&runner, &stop, &tracker) {
                return Some(Abort {
                    code: e.code,
                    verdict: "error",
                    halt_all: false,
                    reason: e.message,
                });
            }
            for (t, plan) in plans.iter().enumerate() {
                let index = t as u32 + 1;
                runner.shared.live.lock().unwrap().trial = index;
                let start_ns = runner.shared.clock.now_ns();
                runner.shared.event(
                    "trial-start",
                    index,
                    format!("trial {index} of {}", runner.exp.trials),
                );
                let mut trial = TrialRecord {
                    index,
                    start_ns,
                    ..Default::default()
                };
                runner.started.lock().unwrap().push(trial.clone());
                let steps = runner.run_steps(index, plan).await;
                trial.method_end_ns = Some(runner.shared.clock.now_ns());
                if let Some(t) = runner.started.lock().unwrap().last_mut() {
                    t.method_end_ns = trial.method_end_ns;
                }
                // Background faults of this trial end before it is evaluated.
                let open: Vec<usize> = {
                    let inj = runner.injected.lock().unwrap();
                    (0..inj.len())
                        .filter(|&k| inj[k].trial == index && inj[k].rec.end_ns.is_none())
                        .collect()
                };
                if steps.is_ok() {
                    runner.wait_ended(&open).await;
                }
                trial.first_inject_ns = runner.anchor_fault(index, None).and_then(|f| f.inject_ns);
                if let Err(a) = steps {
                    trial.end_ns = runner.shared.clock.now_ns();
                    done.lock().unwrap().push(trial);
                    return Some(a);
                }
                runner.observe(index).await;
                let mut extra = Vec::new();
                if let Some(s) = &runner.exp.steady_state {
                    runner
                        .shared
                        .set_step("steady state after the trial".to_string());
                    let r = runner
                        .steady(&steady_probes, s.duration(), s.timeout())
                        .await;
                    let took = r.as_ref().ok().map(|d| d.as_secs_f64());
                    runner.shared.event(
                        "steady-state",
                        index,
                        match &r {
                            Ok(d) => format!("steady state holds again ({:.1}s)", d.as_secs_f64()),
                            Err(e) => format!("steady state after trial {index}: {e}"),
                        },
                    );
                    extra.push(ObjectiveResult {
                        name: "steady state after the trial".into(),
                        kind: "steady-state".into(),
                        probe: s.probes.join(", "),
                        passed: r.is_ok(),
                        value: took,
                        limit: s.timeout().as_secs_f64(),
                        detail: match r {
                            Ok(d) => format!(
                                "held for {} again {:.1}s after the recovery observation",
                                gpuchaos_proto::spec::HumanDuration(s.duration()),
                                d.as_secs_f64()
                            ),
                            Err(e) => e,
                        },
                        ..Default::default()
                    });
                }
                trial.end_ns = runner.shared.clock.now_ns();
                // Every sample started in the trial has its outcome before anything
                // is counted (each is bounded by its probe's timeout).
                runner
                    .shared
                    .settled(
                        trial.end_ns,
                        runner.exp.max_probe_timeout() + Duration::from_secs(1),
                    )
                    .await;
                trial.objectives = runner.evaluate(&trial);
                trial.objectives.extend(extra);
                for o in &trial.objectives {
                    runner.shared.event(
                        "objective",
                        index,
                        format!(
                            "{} {}: {}",
                            if o.passed { "PASS" } else { "FAIL" },
                            o.name,
                            o.detail
                        ),
                    );
                }
                let steady_failed = trial
                    .objectives
                    .iter()
                    .any(|o| o.kind == "steady-state" && !o.passed);
                done.lock().unwrap().push(trial);
                if steady_failed {
                    runner.shared.event(
                        "abort",
                        index,
                        "the steady state did not return: no further trials",
                    );
                    break;
                }
            }
            None
        }
    };
    let early = tokio::select! {
        r = body => r,
        _ = runner.abort.cancelled() => None,
    };
    let aborted = runner.abort_reason.lock().unwrap().clone();
    let stop_fired = aborted.as_ref().is_some_and(|a| a.halt_all);
    let leftovers = runner.rollback(stop_fired).await;
    stop.cancel();
    tracker.close();
    // Samples still waiting get until their own timeout; whatever is left then is
    // recorded as failed, never dropped.
    let _ = tokio::time::timeout(
        exp.max_probe_timeout() + Duration::from_secs(2),
        tracker.wait(),
    )
    .await;
    let unanswered = shared.fail_unanswered();
    if unanswered > 0 {
        shared.event(
            "warning",
            0,
            format!("{unanswered} sample(s) had no answer when the run ended: recorded as failed"),
        );
    }
    shared.clear_status();

    // Trials cut short by an abort still show their faults; every trial's faults
    // are read after the rollback, so they carry the revert times.
    let mut trials = std::mem::take(&mut *done.lock().unwrap());
    {
        let known: Vec<u32> = trials.iter().map(|t| t.index).collect();
        let max_trial = runner
            .injected
            .lock()
            .unwrap()
            .iter()
            .map(|i| i.trial)
            .max()
            .unwrap_or(0);
        let started = runner.started.lock().unwrap().clone();
        let max_trial = max_trial.max(started.iter().map(|t| t.index).max().unwrap_or(0));
        for t in 1..=max_trial {
            if !known.contains(&t) {
                let now = shared.clock.now_ns();
                let begun = started.iter().find(|s| s.index == t);
                trials.push(TrialRecord {
                    index: t,
                    start_ns: begun.map(|s| s.start_ns).unwrap_or(0),
                    first_inject_ns: runner.anchor_fault(t, None).and_then(|f| f.inject_ns),
                    method_end_ns: begun.and_then(|s| s.method_end_ns),
                    end_ns: now,
                    faults: Vec::new(),
                    objectives: Vec::new(),
                });
            }
        }
        trials.sort_by_key(|t| t.index);
    }
    for t in trials.iter_mut() {
        t.faults = trial_faults(&runner, t.index);
    }
    record.trials = trials;
    record.objectives = summarize(&exp, &record.trials);
    record.leftovers = leftovers;
    let failure = aborted.or(early);
    let objectives_failed = record.objectives.iter().any(|o| o.evaluated && !o.passed)
        || record
            .trials
            .iter()
            .flat_map(|t| &t.objectives)
            .any(|o| o.kind == "steady-state" && !o.passed);
    let (code, verdict, reason) = if !record.leftovers.is_empty() {
        (
            exit::REVERT_FAILED,
            "revert-failed",
            Some(format!(
                "something may be left behind: {}",
                record.leftovers.join("; ")
            )),
        )
    } else if let Some(a) = failure {
        (a.code, a.verdict, Some(a.reason))
    } else if objectives_failed {
        (exit::OBJECTIVE_FAILED, "failed", None)
    } else {
        (exit::OK, "passed", None)
    };
    record.exit_code = code;
    record.verdict = verdict.to_string();
    record.reason = reason;
    finish(record, &shared, opts)
}

fn trial_faults(runner: &Runner, trial: u32) -> Vec<FaultRecord> {
    runner
        .injected
        .lock()
        .unwrap()
        .iter()
        .filter(|i| i.trial == trial)
        .map(|i| i.rec.clone())
        .collect()
}

/// One summary per objective (and one for the steady state, when it is checked).
fn summarize(exp: &Experiment, trials: &[TrialRecord]) -> Vec<ObjectiveSummary> {
    let mut out = Vec::new();
    let evaluated: Vec<&TrialRecord> = trials.iter().filter(|t| !t.objectives.is_empty()).collect();
    for o in &exp.objectives {
        let name = o.display_name();
        let results: Vec<&ObjectiveResult> = evaluated
            .iter()
            .filter_map(|t| t.objectives.iter().find(|r| r.name == name))
            .collect();
        let (limit_text, unit) = short_limit(o);
        let mut s = evaluate::summarize(&results, unit, limit_text);
        if results.is_empty() {
            s.name = name;
            s.kind = o.kind_name().to_string();
            s.probe = o.probe().to_string();
            s.passed = false;
            s.evaluated = false;
            s.detail = "not evaluated: no trial got as far as its evaluation".into();
        }
        out.push(s);
    }
    if let Some(ss) = &exp.steady_state {
        let results: Vec<&ObjectiveResult> = evaluated
            .iter()
            .filter_map(|t| t.objectives.iter().find(|r| r.kind == "steady-state"))
            .collect();
        if !results.is_empty() {
            out.push(evaluate::summarize(
                &results,
                "s",
                format!("≤ {}", gpuchaos_proto::spec::HumanDuration(ss.timeout())),
            ));
        }
    }
    out
}

fn finish(
    mut record: RunRecord,
    shared: &Shared,
    opts: &RunOptions,
) -> Result<(RunRecord, u8), CliError> {
    record.duration_ns = shared.clock.now_ns();
    shared.event(
        "run-end",
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

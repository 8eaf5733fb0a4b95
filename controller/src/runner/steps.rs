//! The method's steps: waits, parallel groups, and faults injected on their agents
//! (all at once) and waited for until they end.

use gpuchaos_proto::pb;
use gpuchaos_proto::spec::{HumanDuration, ProcessAction};
use tracing::Instrument;

use super::record::{EventKind, FaultRecord};
use super::{Abort, Injected, Runner, agents};
use crate::exit;
use crate::experiment::plan::{PlanStep, PlannedFault};

type StepFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), Abort>> + Send + 'a>>;

impl Runner {
    pub(super) fn run_steps<'a>(&'a self, trial: u32, steps: &'a [PlanStep]) -> StepFuture<'a> {
        Box::pin(async move {
            for s in steps {
                match s {
                    PlanStep::Wait(d) => {
                        self.shared.set_step(format!("wait {}", HumanDuration(*d)));
                        tokio::time::sleep(*d).await;
                    }
                    PlanStep::Fault(f) => self.fault_step(trial, f).await?,
                    PlanStep::Parallel(group) => {
                        let results = futures_util::future::join_all(
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

    /// Injects one planned fault on its agents (all at once) and, unless it runs in
    /// the background, waits for it to end everywhere.
    async fn fault_step(&self, trial: u32, f: &PlannedFault) -> Result<(), Abort> {
        self.shared
            .set_step(format!("{} ({})", f.label, f.spec.summary()));
        let injections = futures_util::future::join_all(f.agents.iter().map(|&i| {
            let span = tracing::info_span!(
                "fault",
                fault.kind = f.spec.kind(),
                fault.id = tracing::field::Empty,
                node = %self.conns[i].agent.display(),
                step = %f.label,
            );
            async move {
                let r = agents::inject(&self.conns[i], &f.spec).await;
                if let Ok(fault) = &r {
                    tracing::Span::current().record("fault.id", fault.id.as_str());
                    tracing::debug!("verified");
                }
                (i, r)
            }
            .instrument(span)
        }))
        .await;
        let mut failure = None;
        let mut mine = Vec::new();
        for (i, r) in injections {
            match r {
                Ok(fault) => mine.push(self.injected(trial, f, i, fault)),
                Err(s) => {
                    let a = self.inject_failed(trial, f, i, &s);
                    failure.get_or_insert(a);
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

    /// Records a fault verified on agent `i`; returns its index in `injected`.
    fn injected(&self, trial: u32, f: &PlannedFault, i: usize, fault: pb::Fault) -> usize {
        let c = &self.conns[i];
        let rec = FaultRecord {
            step: f.label.clone(),
            agent: i,
            id: fault.id.clone(),
            kind: fault.kind.clone(),
            summary: f.spec.summary(),
            target: fault.target.clone(),
            inject_ns: c.map(&self.shared.clock, fault.verified_mono_ns),
            ..Default::default()
        };
        self.shared.event(
            EventKind::Inject,
            trial,
            format!(
                "{}: {} verified on {} as {} ({}); lasts {}",
                f.label,
                f.spec.summary(),
                c.agent.display(),
                fault.id,
                fault.target,
                HumanDuration(f.spec.duration())
            ),
        );
        let mut inj = self.injected.lock().unwrap();
        let settle = match &f.spec {
            gpuchaos_proto::spec::FaultSpec::Process(p) if p.watches() => p.watch_settle(),
            _ => std::time::Duration::ZERO,
        };
        // A kill with a signal that stops rather than ends (SIGSTOP, SIGTSTP…) lasts.
        let instant = matches!(
            &f.spec,
            gpuchaos_proto::spec::FaultSpec::Process(p)
                if p.action == ProcessAction::Terminate
                    || p.action == ProcessAction::Kill
                        && !matches!(p.signal_number(), 19..=22)
        );
        let watch_from_end = matches!(
            &f.spec,
            gpuchaos_proto::spec::FaultSpec::Process(p) if p.action == ProcessAction::CrashLoop
        );
        inj.push(Injected {
            trial,
            conn: i,
            fault,
            rec,
            settle,
            instant,
            watch_from_end,
        });
        inj.len() - 1
    }

    /// Records a fault that could not be injected on agent `i`; returns the abort.
    fn inject_failed(&self, trial: u32, f: &PlannedFault, i: usize, s: &tonic::Status) -> Abort {
        let msg = format!(
            "{}: {} could not be injected on {}: {}",
            f.label,
            f.spec.summary(),
            self.conns[i].agent.display(),
            s.message()
        );
        self.shared
            .event(EventKind::InjectFailed, trial, msg.clone());
        let code = exit::from_status(s, exit::INJECT_FAILED);
        Abort::InjectFailed {
            code: if code == exit::INVALID_INPUT {
                exit::INVALID_INPUT
            } else {
                exit::INJECT_FAILED
            },
            reason: msg,
        }
    }

    /// Waits until each of these injected faults has ended, recording when.
    pub(super) async fn wait_ended(&self, which: &[usize]) {
        let waits = which.iter().map(|&k| {
            let (conn, fault) = {
                let inj = self.injected.lock().unwrap();
                (inj[k].conn, inj[k].fault.clone())
            };
            let span = tracing::info_span!(
                "fault",
                fault.id = %fault.id,
                fault.kind = %fault.kind,
                node = %self.conns[conn].agent.display(),
            );
            async move {
                let r = agents::wait_end(&self.conns[conn], &self.shared.clock, &fault).await;
                (k, r)
            }
            .instrument(span)
        });
        for (k, r) in futures_util::future::join_all(waits).await {
            match r {
                Ok(done) => self.record_end(k, &done),
                Err(e) => self.shared.event(EventKind::Warning, 0, e),
            }
        }
    }

    pub(super) fn record_end(&self, k: usize, done: &pb::Fault) {
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
        self.shared.event(EventKind::FaultEnd, trial, msg);
    }
}

//! Stop conditions, watched from the first trial on: each fires
//! [`Runner::stop_condition_fired`], which aborts the run and halts every agent.

use std::sync::Arc;
use std::time::Duration;

use gpuchaos_proto::spec::HumanDuration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::record::EventKind;
use super::{Abort, Runner};
use crate::exit::CliError;
use crate::experiment::StopKind;
use crate::probe::PromQuery;

/// Starts one watcher per stop condition.
pub(super) fn watch(
    runner: &Arc<Runner>,
    stop: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<(), CliError> {
    for sc in &runner.exp.stop_conditions {
        let name = sc.name.clone();
        match &sc.kind {
            StopKind::ProbeFailing { probe, failing_for } => {
                tracker.spawn(probe_failing(
                    runner.clone(),
                    stop.clone(),
                    name,
                    *probe,
                    *failing_for,
                ));
            }
            StopKind::Prometheus { check, interval } => {
                let query = PromQuery::new(check).map_err(CliError::invalid)?;
                tracker.spawn(prometheus(
                    runner.clone(),
                    stop.clone(),
                    name,
                    query,
                    *interval,
                ));
            }
        }
    }
    Ok(())
}

/// Fires when the probe has failed, without a pass, for longer than `limit`
/// (counting from when the watch began).
async fn probe_failing(
    runner: Arc<Runner>,
    stop: CancellationToken,
    name: String,
    p: usize,
    limit: Duration,
) {
    let limit_ns = limit.as_nanos() as u64;
    let armed_at = runner.shared.clock.now_ns();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        let now = runner.shared.clock.now_ns();
        let streak_start = {
            let tl = runner.shared.timeline.lock().unwrap();
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
            runner.stop_condition_fired(&name);
            return;
        }
    }
}

/// Fires when the query holds. A safety net that cannot be evaluated is no safety
/// net: after three intervals of errors the run is aborted, not left unprotected.
async fn prometheus(
    runner: Arc<Runner>,
    stop: CancellationToken,
    name: String,
    query: PromQuery,
    every: Duration,
) {
    let mut failing_since: Option<u64> = None;
    let give_up_ns = (every * 3).as_nanos() as u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let error = match tokio::time::timeout(every, query.evaluate()).await {
            Ok(Ok(r)) if r.holds => {
                runner.shared.event(
                    EventKind::StopCondition,
                    0,
                    format!("stop condition {name} holds: {}", r.describe()),
                );
                runner.stop_condition_fired(&name);
                return;
            }
            Ok(Ok(_)) => {
                failing_since = None;
                continue;
            }
            Ok(Err(e)) => e,
            Err(_) => format!("no answer within {}", HumanDuration(every)),
        };
        let now = runner.shared.clock.now_ns();
        let since = *failing_since.get_or_insert(now);
        runner.shared.event(
            EventKind::Warning,
            0,
            format!("stop condition {name} cannot be evaluated: {error}"),
        );
        let failing_ns = now.saturating_sub(since) + every.as_nanos() as u64;
        if failing_ns > give_up_ns {
            let reason = format!(
                "stop condition {name} could not be evaluated for {} (3 intervals): {error}; the run was unprotected, so it stops",
                HumanDuration(Duration::from_nanos(failing_ns))
            );
            runner.shared.event(EventKind::Abort, 0, reason.clone());
            runner.abort_with(Abort::Aborted(reason));
            return;
        }
    }
}

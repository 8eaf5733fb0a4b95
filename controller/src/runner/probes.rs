//! Probe scheduling: every probe on its own fixed schedule, for the whole run.
//!
//! A sample starts every interval whether or not the previous one has finished (a
//! hung server would otherwise stretch the schedule to the timeout and blur the
//! recovery time); at most `timeout / interval + 1` samples of one probe are in
//! flight. One probe never waits for another, nor for the steps.
//!
//! No sample vanishes: one still waiting when the run stops is waited for until its
//! own timeout (then it fails like any other that timed out), and the trial's
//! objectives are evaluated only once every sample started in their windows has its
//! outcome ([`Shared::settled`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::record::Sample;
use super::shared::Shared;
use crate::probe::Prober;

pub fn start(
    shared: &Arc<Shared>,
    probers: Vec<Prober>,
    intervals: Vec<(Duration, Duration)>,
    stop: &CancellationToken,
    tracker: &TaskTracker,
) {
    for (i, (prober, (interval, timeout))) in probers.into_iter().zip(intervals).enumerate() {
        let shared = shared.clone();
        let stop = stop.clone();
        let prober = Arc::new(prober);
        let slots = (timeout.as_nanos() / interval.as_nanos().max(1)) as usize + 1;
        let sem = Arc::new(Semaphore::new(slots));
        let inner = tracker.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let Ok(permit) = sem.clone().try_acquire_owned() else {
                    continue;
                };
                let shared = shared.clone();
                let prober = prober.clone();
                inner.spawn(async move {
                    let t_ns = shared.clock.now_ns();
                    let ticket = shared.sample_started(i, t_ns);
                    // Not cancelled when the run stops: the timeout bounds it.
                    let outcome = tokio::time::timeout(timeout, prober.sample()).await;
                    let end_ns = shared.clock.now_ns();
                    let (ok, unsafe_output, error) = match outcome {
                        Ok(o) => (o.ok, o.unsafe_output, o.error),
                        Err(_) => (
                            false,
                            false,
                            Some(format!(
                                "no answer within the {} ms timeout",
                                timeout.as_millis()
                            )),
                        ),
                    };
                    shared.sample_done(
                        ticket,
                        Sample {
                            probe: i,
                            t_ns,
                            end_ns,
                            ok,
                            unsafe_output,
                            error,
                        },
                    );
                    drop(permit);
                });
            }
        });
    }
}

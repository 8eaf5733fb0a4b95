//! After a kill: watching for the supervisor's replacement and for its GPU memory, so
//! that the controller can place the `replaced` and `gpu_ready` recovery phases.
//!
//! The watch only reads (/proc through [`Selector`], NVML through [`GpuQuery`]): it
//! signals nothing and holds no kernel state, so it is not journaled and never delays
//! a revert. Its observations go out on a channel the manager reads; it ends when
//! everything was observed, at its timeout, when a replacement died again, or when
//! the manager stops listening (shutdown).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use gpuchaos_proto::pb;
use gpuchaos_proto::spec::{GpuRef, ProcessTarget};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use super::select::{Selector, Target};
use crate::sys::clock::{mono_ns, unix_ms};

/// How often the watch reads /proc and NVML; also the error bar of its observations.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(100);
/// After this long the watch polls every [`SLOW_INTERVAL`] instead.
const SLOW_AFTER: Duration = Duration::from_secs(60);
const SLOW_INTERVAL: Duration = Duration::from_millis(500);

pub type ObservationTx = mpsc::UnboundedSender<pb::Observation>;
pub type ObservationRx = mpsc::UnboundedReceiver<pb::Observation>;

/// What one watch looks for.
pub struct Watch {
    pub selector: Arc<Selector>,
    pub target: ProcessTarget,
    /// Every (pid, start time) that matched the selector before the replacement could
    /// appear (at inject; for crash-loop also every process seen during the loop).
    pub known: Vec<(u32, u64)>,
    /// What the fault killed, in order: the n-th replacement replaces the n-th.
    pub killed: Vec<Target>,
    pub timeout: Duration,
    pub settle: Duration,
}

/// Why the GPU part cannot be watched, if it cannot (no NVML).
pub fn gpu_unavailable(selector: &Selector) -> Option<String> {
    selector.gpus().list().err()
}

/// The agent's monotonic clock, read through tokio's clock so that the stamps follow
/// the paused clock of the unit tests (the same clock in production).
struct Stamp {
    mono: u64,
    at: Instant,
}

impl Stamp {
    fn now() -> Self {
        Stamp {
            mono: mono_ns(),
            at: Instant::now(),
        }
    }
    fn mono(&self, at: Instant) -> u64 {
        self.mono + at.saturating_duration_since(self.at).as_nanos() as u64
    }
    fn unix(&self, at: Instant) -> u64 {
        unix_ms().saturating_sub(Instant::now().saturating_duration_since(at).as_millis() as u64)
    }
}

struct Replacement {
    target: Target,
    /// The GPU bytes of the last poll, and the first poll that read them.
    bytes: u64,
    since: Instant,
    done: bool,
}

impl Watch {
    pub fn spawn(self, tx: ObservationTx) {
        tokio::spawn(self.run(tx));
    }

    pub async fn run(self, tx: ObservationTx) {
        let clock = Stamp::now();
        let deadline = clock.at + self.timeout;
        let gpus: Option<Vec<u32>> = self
            .selector
            .gpus()
            .list()
            .ok()
            .map(|l| l.into_iter().map(|g| g.index).collect());
        let procs = Arc::clone(self.selector.procs());
        let known: std::collections::HashSet<(u32, u64)> = self.known.iter().copied().collect();
        let mut found: Vec<Replacement> = Vec::new();
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut period = WATCH_INTERVAL;
        let observation =
            |kind: &str, at: Instant, t: &Target, bytes: u64, detail: String, period: Duration| {
                pb::Observation {
                    kind: kind.into(),
                    mono_ns: clock.mono(at),
                    unix_ms: clock.unix(at),
                    pid: t.pid,
                    start_time: t.start_time,
                    gpu_bytes: bytes,
                    detail,
                    error_ns: period.as_nanos() as u64,
                }
            };
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = tx.closed() => return,
            }
            let now = Instant::now();
            // Reading /proc and NVML ten times a second is cheap, but not for ten
            // minutes: after the first minute the watch polls every 500 ms (and says
            // so in its error bars).
            if period == WATCH_INTERVAL && now.duration_since(clock.at) >= SLOW_AFTER {
                period = SLOW_INTERVAL;
                tick = tokio::time::interval(SLOW_INTERVAL);
                tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
                tick.reset();
            }
            if now >= deadline {
                tracing::info!(
                    replaced = found.len(),
                    wanted = self.killed.len(),
                    "replacement watch: timed out"
                );
                return;
            }
            if found.len() < self.killed.len() {
                // Matching nothing is normal while the supervisor restarts the worker.
                let matched = self.selector.select(&self.target).unwrap_or_default();
                for t in matched {
                    if found.len() == self.killed.len() {
                        break;
                    }
                    let key = (t.pid, t.start_time);
                    if known.contains(&key)
                        || found
                            .iter()
                            .any(|r| (r.target.pid, r.target.start_time) == key)
                    {
                        continue;
                    }
                    let old = &self.killed[found.len()];
                    let detail = format!("{t} replaced {old}");
                    tracing::info!(%detail, "replacement seen");
                    if tx
                        .send(observation("replaced", now, &t, 0, detail, period))
                        .is_err()
                    {
                        return;
                    }
                    found.push(Replacement {
                        target: t,
                        bytes: 0,
                        since: now,
                        done: gpus.is_none(),
                    });
                }
            }
            if let Some(gpus) = &gpus
                && found.iter().any(|r| !r.done)
            {
                let memory = memory_by_pid(&self.selector, gpus);
                for r in found.iter_mut().filter(|r| !r.done) {
                    let alive = matches!(procs.stat(r.target.pid),
                        Ok(Some(s)) if s.start_time == r.target.start_time && !s.is_dead());
                    if !alive {
                        tracing::info!(target = %r.target, "replacement watch: the replacement died before its GPU memory settled");
                        r.done = true;
                        continue;
                    }
                    let Some(memory) = &memory else { continue };
                    let bytes = memory.get(&r.target.pid).copied().unwrap_or(0);
                    if bytes != r.bytes {
                        r.bytes = bytes;
                        r.since = now;
                    } else if bytes > 0 && now.duration_since(r.since) >= self.settle {
                        r.done = true;
                        let detail = format!(
                            "{} holds {} of GPU memory, unchanged for {}",
                            r.target,
                            gib(bytes),
                            humantime::format_duration(self.settle)
                        );
                        tracing::info!(%detail, "replacement GPU-ready");
                        if tx
                            .send(observation(
                                "gpu_ready",
                                r.since,
                                &r.target,
                                bytes,
                                detail,
                                period,
                            ))
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
            if found.len() == self.killed.len() && found.iter().all(|r| r.done) {
                return;
            }
        }
    }
}

/// The bytes each process holds over every GPU, or None when NVML failed this poll.
fn memory_by_pid(selector: &Selector, gpus: &[u32]) -> Option<HashMap<u32, u64>> {
    let mut out = HashMap::new();
    for i in gpus {
        match selector.gpus().process_memory(&GpuRef::Index(*i)) {
            Ok(list) => {
                for (pid, bytes) in list {
                    *out.entry(pid).or_insert(0) += bytes.unwrap_or(0);
                }
            }
            Err(e) => {
                tracing::debug!(gpu = i, error = %e, "replacement watch: NVML read failed; next poll");
                return None;
            }
        }
    }
    Some(out)
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

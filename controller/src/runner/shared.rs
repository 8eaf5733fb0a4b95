//! The run's one timeline and its clock, shared by the probe tasks, the steps and
//! the progress display.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use gpuchaos_proto::clock::mono_ns;
use tokio::sync::Notify;

use super::record::{Event, EventKind, ProbeRecord, Sample};

/// The controller's monotonic clock, in ns since the run started.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base: Instant,
    /// CLOCK_MONOTONIC at `base` (what agents report their times in).
    base_mono_ns: u64,
}

impl Clock {
    pub fn start() -> Clock {
        // Instant is CLOCK_MONOTONIC on Linux; read both back to back.
        let base = Instant::now();
        let base_mono_ns = mono_ns();
        Clock { base, base_mono_ns }
    }

    pub fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    pub fn instant_at(&self, t_ns: u64) -> Instant {
        self.base + Duration::from_nanos(t_ns)
    }

    /// Maps an agent's CLOCK_MONOTONIC reading onto this timeline, given the agent's
    /// offset (agent clock − controller clock).
    pub fn map_agent(&self, agent_mono_ns: u64, offset_ns: i64) -> u64 {
        let t = agent_mono_ns as i128 - offset_ns as i128 - self.base_mono_ns as i128;
        t.max(0) as u64
    }

    /// The controller's CLOCK_MONOTONIC at a timeline time.
    pub fn mono_at(&self, t_ns: u64) -> u64 {
        self.base_mono_ns + t_ns
    }
}

#[derive(Debug, Default)]
pub struct Timeline {
    pub samples: Vec<Sample>,
    pub events: Vec<Event>,
    /// Samples started and not answered yet: ticket → (probe, start).
    pub in_flight: std::collections::BTreeMap<u64, (usize, u64)>,
    next_ticket: u64,
}

/// What the progress line shows.
#[derive(Debug, Default, Clone)]
pub struct Live {
    pub trial: u32,
    pub trials: u32,
    pub step: String,
}

pub struct Shared {
    pub clock: Clock,
    pub probes: Vec<ProbeRecord>,
    pub timeline: Mutex<Timeline>,
    /// Signalled on every new sample.
    pub changed: Notify,
    pub live: Mutex<Live>,
    pub tty: bool,
    /// Serializes terminal writes (event lines and the status line).
    print: Mutex<()>,
}

fn secs(ns: u64) -> String {
    format!("{:>7.3}s", ns as f64 / 1e9)
}

impl Shared {
    pub fn new(clock: Clock, probes: Vec<ProbeRecord>) -> Shared {
        Shared {
            clock,
            probes,
            timeline: Mutex::new(Timeline::default()),
            changed: Notify::new(),
            live: Mutex::new(Live::default()),
            tty: std::io::stderr().is_terminal(),
            print: Mutex::new(()),
        }
    }

    /// A sample has started; returns its ticket for [`Shared::sample_done`].
    pub fn sample_started(&self, probe: usize, t_ns: u64) -> u64 {
        let mut tl = self.timeline.lock().unwrap();
        let t = tl.next_ticket;
        tl.next_ticket += 1;
        tl.in_flight.insert(t, (probe, t_ns));
        t
    }

    /// A started sample has its outcome.
    pub fn sample_done(&self, ticket: u64, s: Sample) {
        {
            let mut tl = self.timeline.lock().unwrap();
            // Already recorded as unanswered at the run's end: not twice.
            if tl.in_flight.remove(&ticket).is_some() {
                tl.samples.push(s);
            }
        }
        self.changed.notify_waiters();
    }

    /// Waits until every sample started at or before `upto_ns` has its outcome (each
    /// is bounded by its probe's timeout), or `max` passes. Returns how many are
    /// still waiting.
    pub async fn settled(&self, upto_ns: u64, max: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + max;
        loop {
            let waiting = self
                .timeline
                .lock()
                .unwrap()
                .in_flight
                .values()
                .filter(|(_, t)| *t <= upto_ns)
                .count();
            if waiting == 0 || tokio::time::Instant::now() >= deadline {
                return waiting;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            self.wait_change(left.min(Duration::from_millis(100))).await;
        }
    }

    /// Waits until each of the first `probes` probes has one outcome, or `max`.
    pub async fn first_samples(&self, probes: usize, max: Duration) {
        let deadline = tokio::time::Instant::now() + max;
        loop {
            let all = {
                let tl = self.timeline.lock().unwrap();
                (0..probes).all(|p| tl.samples.iter().any(|s| s.probe == p))
            };
            if all || tokio::time::Instant::now() >= deadline {
                return;
            }
            self.wait_change(Duration::from_millis(100)).await;
        }
    }

    /// Records every sample still unanswered as failed ("no answer before the run
    /// ended"): nothing started in a window may vanish from it.
    pub fn fail_unanswered(&self) -> usize {
        let now = self.clock.now_ns();
        let mut tl = self.timeline.lock().unwrap();
        let left: Vec<(usize, u64)> = std::mem::take(&mut tl.in_flight).into_values().collect();
        for (probe, t_ns) in &left {
            tl.samples.push(Sample {
                probe: *probe,
                t_ns: *t_ns,
                end_ns: now,
                ok: false,
                unsafe_output: false,
                error: Some("no answer before the run ended".into()),
            });
        }
        left.len()
    }

    /// Records an event and prints it as a progress line (stderr).
    pub fn event(&self, kind: EventKind, trial: u32, message: impl Into<String>) {
        let message = message.into();
        let t_ns = self.clock.now_ns();
        let line = format!("[{}] {message}", secs(t_ns));
        let said = !crate::output::quiet() || matches!(kind, EventKind::Abort | EventKind::Warning);
        self.timeline.lock().unwrap().events.push(Event {
            t_ns,
            kind,
            trial,
            message,
        });
        // Under -q only what went wrong is said; the journal has every event.
        if !said {
            return;
        }
        let _g = self.print.lock().unwrap();
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K");
        }
        let _ = writeln!(err, "{line}");
    }

    pub fn set_step(&self, step: impl Into<String>) {
        self.live.lock().unwrap().step = step.into();
    }

    /// Redraws the status line (terminals only): elapsed, trial, step, probe health.
    pub fn draw_status(&self) {
        if !self.tty || crate::output::quiet() {
            return;
        }
        let live = self.live.lock().unwrap().clone();
        let now = self.clock.now_ns();
        let mut parts = vec![format!("{:.1}s", now as f64 / 1e9)];
        if live.trials > 0 && live.trial > 0 {
            parts.push(format!("trial {}/{}", live.trial, live.trials));
        }
        if !live.step.is_empty() {
            parts.push(live.step.clone());
        }
        {
            let tl = self.timeline.lock().unwrap();
            for (i, p) in self.probes.iter().enumerate() {
                let recent: Vec<&Sample> = tl
                    .samples
                    .iter()
                    .rev()
                    .filter(|s| s.probe == i)
                    .take(20)
                    .collect();
                let mark = match recent.first() {
                    None => "…",
                    Some(s) if s.ok => "✓",
                    Some(_) => "✗",
                };
                let ok = recent.iter().filter(|s| s.ok).count();
                parts.push(format!("{}{mark} {ok}/{}", p.name, recent.len()));
            }
        }
        let _g = self.print.lock().unwrap();
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{}", parts.join("  ·  "));
        let _ = err.flush();
    }

    pub fn clear_status(&self) {
        if self.tty {
            let _g = self.print.lock().unwrap();
            let _ = write!(std::io::stderr().lock(), "\r\x1b[2K");
        }
    }

    /// Waits until a new sample arrives or `max` passes.
    pub async fn wait_change(&self, max: Duration) {
        let _ = tokio::time::timeout(max, self.changed.notified()).await;
    }
}

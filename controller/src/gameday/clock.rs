//! The scheduler's wall clock, behind a small interface so that tests (and
//! rehearsals) can put time under control.
//!
//! - [`SystemClock`]: real time. It never sleeps more than 30 s at a stretch and
//!   looks at the wall clock again, so a suspended machine, an NTP step or a manual
//!   clock change is noticed within 30 s.
//! - [`ScaledClock`]: starts at a chosen instant and runs N times faster
//!   (`GPUCHAOS_CLOCK=2026-03-08T06:58:00Z*60`). Runs still take their real time;
//!   only the schedule moves faster. For tests and for rehearsing a schedule.
//! - [`ManualClock`]: only moves when told (unit tests).

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use tokio::sync::watch;

pub type SleepFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

pub trait WallClock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
    /// Returns at `t` or earlier (callers look at [`now`](WallClock::now) again).
    fn sleep_until(&self, t: Timestamp) -> SleepFuture<'_>;
}

const MAX_NAP: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }

    fn sleep_until(&self, t: Timestamp) -> SleepFuture<'_> {
        let wait = t
            .duration_since(Timestamp::now())
            .try_into()
            .unwrap_or(Duration::ZERO);
        Box::pin(tokio::time::sleep(wait.min(MAX_NAP)))
    }
}

#[derive(Debug)]
pub struct ScaledClock {
    origin: Timestamp,
    started: Instant,
    factor: f64,
}

impl ScaledClock {
    /// `INSTANT` or `INSTANT*FACTOR`, e.g. `2026-03-08T06:58:00Z*60`.
    pub fn parse(text: &str) -> Result<ScaledClock, String> {
        let (t, f) = match text.split_once('*') {
            Some((t, f)) => (t, f),
            None => (text, "1"),
        };
        let origin: Timestamp = t.trim().parse().map_err(|e| {
            format!(
                "GPUCHAOS_CLOCK: `{t}` is not an RFC 3339 instant (e.g. 2026-03-08T06:58:00Z): {e}"
            )
        })?;
        let factor: f64 = f
            .trim()
            .parse()
            .ok()
            .filter(|f: &f64| f.is_finite() && *f > 0.0 && *f <= 100_000.0)
            .ok_or_else(|| {
                format!("GPUCHAOS_CLOCK: speed `{f}` must be a number in (0, 100000]")
            })?;
        Ok(ScaledClock {
            origin,
            started: Instant::now(),
            factor,
        })
    }
}

impl WallClock for ScaledClock {
    fn now(&self) -> Timestamp {
        let ns = (self.started.elapsed().as_nanos() as f64 * self.factor) as i64;
        self.origin
            .checked_add(jiff::SignedDuration::from_nanos(ns))
            .unwrap_or(Timestamp::MAX)
    }

    fn sleep_until(&self, t: Timestamp) -> SleepFuture<'_> {
        let left: Duration = t
            .duration_since(self.now())
            .try_into()
            .unwrap_or(Duration::ZERO);
        let real = Duration::from_secs_f64(left.as_secs_f64() / self.factor);
        Box::pin(tokio::time::sleep(
            real.min(MAX_NAP) + Duration::from_millis(1),
        ))
    }
}

/// A clock that moves only when the test says so.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<Timestamp>,
    tick: watch::Sender<Timestamp>,
}

impl ManualClock {
    pub fn new(start: Timestamp) -> ManualClock {
        ManualClock {
            now: Mutex::new(start),
            tick: watch::channel(start).0,
        }
    }

    pub fn set(&self, t: Timestamp) {
        *self.now.lock().unwrap() = t;
        self.tick.send_replace(t);
    }

    pub fn advance(&self, d: Duration) {
        let t = self.now().checked_add(d).unwrap_or(Timestamp::MAX);
        self.set(t);
    }
}

impl WallClock for ManualClock {
    fn now(&self) -> Timestamp {
        *self.now.lock().unwrap()
    }

    fn sleep_until(&self, t: Timestamp) -> SleepFuture<'_> {
        let mut rx = self.tick.subscribe();
        Box::pin(async move {
            let _ = rx.wait_for(|now| *now >= t).await;
        })
    }
}

/// The clock `serve` uses: `GPUCHAOS_CLOCK` when set and the build has the
/// `test-hooks` feature (scripts/test.sh builds with it), else the system's. A
/// production build ignores the variable, and says so.
pub fn from_env() -> Result<Box<dyn WallClock>, String> {
    match std::env::var("GPUCHAOS_CLOCK") {
        Ok(v) if !v.is_empty() && cfg!(feature = "test-hooks") => {
            Ok(Box::new(ScaledClock::parse(&v)?))
        }
        Ok(v) if !v.is_empty() => {
            eprintln!(
                "gpuchaos serve: GPUCHAOS_CLOCK is set but ignored: this build has no test hooks (cargo build --features gpuchaos-controller/test-hooks); using the system clock"
            );
            Ok(Box::new(SystemClock))
        }
        _ => Ok(Box::new(SystemClock)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaled_clock_parses_and_runs_faster() {
        let c = ScaledClock::parse("2026-03-08T06:58:00Z*600").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let moved = c
            .now()
            .duration_since("2026-03-08T06:58:00Z".parse().unwrap());
        assert!(moved.as_secs() >= 59 && moved.as_secs() < 120, "{moved:?}");
        assert!(
            ScaledClock::parse("yesterday")
                .unwrap_err()
                .contains("RFC 3339")
        );
        assert!(
            ScaledClock::parse("2026-03-08T06:58:00Z*-1")
                .unwrap_err()
                .contains("speed")
        );
    }

    #[tokio::test]
    async fn manual_clock_wakes_sleepers_when_moved_past() {
        let c = std::sync::Arc::new(ManualClock::new("2026-01-01T00:00:00Z".parse().unwrap()));
        let c2 = c.clone();
        let h = tokio::spawn(async move {
            c2.sleep_until("2026-01-01T00:10:00Z".parse().unwrap())
                .await;
        });
        c.advance(Duration::from_secs(300));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!h.is_finished());
        c.advance(Duration::from_secs(300));
        tokio::time::timeout(Duration::from_secs(1), h)
            .await
            .unwrap()
            .unwrap();
    }
}

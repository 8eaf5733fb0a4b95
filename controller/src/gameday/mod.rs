//! Scheduled game days: the game-day file, the schedule and its clock, one run's
//! execution, the history, notifications, the scheduler loop, and the page and
//! metrics `gpuchaos serve` offers.

pub mod chart;
pub mod clock;
pub mod exec;
pub mod file;
pub mod history;
pub mod notify;
pub mod schedule;
pub mod serve;
pub mod verdict;
pub mod web;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use jiff::Timestamp;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use exec::Saved;
use file::GameDay;
use history::{GamedayRun, GamedayVerdict, HistoryErrorKind};
use serve::{BoxFuture, Executor, NextSlots};

type Labels = Vec<(String, String)>;

/// What `serve` knows now: running and last runs, history health, metrics.
pub struct Live {
    pub gamedays: Vec<Arc<GameDay>>,
    pub next: NextSlots,
    pub running: Mutex<BTreeMap<String, GamedayRun>>,
    /// The last history error, if the latest save failed.
    pub history_error: Mutex<Option<String>>,
    pub started: Timestamp,
    /// Runs that could not revert everything (something may be left behind).
    pub left_behind: Mutex<Vec<String>>,
    /// Final results that could not even be written to their run folder: kept here
    /// and printed whole when serve stops.
    pub unsaved: Mutex<BTreeMap<String, GamedayRun>>,
    metrics: Metrics,
    counted: Mutex<HashSet<String>>,
}

struct Metrics {
    registry: Registry,
    runs: Family<Labels, Counter>,
    last_run: Family<Labels, Gauge<f64, AtomicU64>>,
    last_passed: Family<Labels, Gauge>,
    next_run: Family<Labels, Gauge<f64, AtomicU64>>,
    running: Family<Labels, Gauge>,
    objective: Family<Labels, Gauge<f64, AtomicU64>>,
    objective_passed: Family<Labels, Gauge>,
    history_errors: Counter,
    pending: Gauge,
    notifications: Family<Labels, Counter>,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("gpuchaos_gameday");
        let m = Metrics {
            registry: Registry::default(),
            runs: Family::default(),
            last_run: Family::default(),
            last_passed: Family::default(),
            next_run: Family::default(),
            running: Family::default(),
            objective: Family::default(),
            objective_passed: Family::default(),
            history_errors: Counter::default(),
            pending: Gauge::default(),
            notifications: Family::default(),
        };
        registry.register(
            "runs",
            "Game-day runs and slots by verdict (passed, failed, aborted, ..., missed, skipped)",
            m.runs.clone(),
        );
        registry.register(
            "last_run_timestamp_seconds",
            "When the last run of the game day ended",
            m.last_run.clone(),
        );
        registry.register(
            "last_run_passed",
            "1 if the game day's last run passed, else 0",
            m.last_passed.clone(),
        );
        registry.register(
            "next_run_timestamp_seconds",
            "The game day's next slot",
            m.next_run.clone(),
        );
        registry.register("running", "1 while the game day runs", m.running.clone());
        registry.register(
            "objective_measured",
            "The last run's measurement per objective (seconds for recovery times, ratio, count)",
            m.objective.clone(),
        );
        registry.register(
            "objective_passed",
            "1 if the objective held in the last run",
            m.objective_passed.clone(),
        );
        registry.register(
            "history_write_errors",
            "Saves to the history database that failed (the result waits in the run folder)",
            m.history_errors.clone(),
        );
        registry.register(
            "history_pending_runs",
            "Run results waiting to be added to the history database",
            m.pending.clone(),
        );
        registry.register(
            "notifications",
            "Webhook deliveries by result",
            m.notifications.clone(),
        );
        Metrics { registry, ..m }
    }
}

fn gd_label(name: &str) -> Labels {
    vec![("gameday".into(), name.into())]
}

impl Live {
    pub fn new(gamedays: Vec<Arc<GameDay>>, started: Timestamp) -> Live {
        let metrics = Metrics::new();
        for gd in &gamedays {
            metrics.running.get_or_create(&gd_label(&gd.name)).set(0);
        }
        Live {
            gamedays,
            next: NextSlots::default(),
            running: Mutex::new(BTreeMap::new()),
            history_error: Mutex::new(None),
            started,
            left_behind: Mutex::new(Vec::new()),
            unsaved: Mutex::new(BTreeMap::new()),
            metrics,
            counted: Mutex::new(HashSet::new()),
        }
    }

    /// Takes in a run's latest state (and whether saving it failed).
    pub fn update(&self, run: &GamedayRun, saved: Saved<'_>) {
        let m = &self.metrics;
        let gl = gd_label(&run.gameday);
        match saved {
            Saved::Failed(e) => {
                m.history_errors.inc();
                *self.history_error.lock().unwrap() = Some(e.message.clone());
                if e.kind == HistoryErrorKind::Io && !run.is_running() {
                    self.unsaved
                        .lock()
                        .unwrap()
                        .insert(run.id.clone(), run.clone());
                }
            }
            Saved::Ok => {
                *self.history_error.lock().unwrap() = None;
                self.unsaved.lock().unwrap().remove(&run.id);
            }
            Saved::NotYet => {}
        }
        if run.is_running() {
            self.running
                .lock()
                .unwrap()
                .insert(run.gameday.clone(), run.clone());
            m.running.get_or_create(&gl).set(1);
            return;
        }
        {
            let mut running = self.running.lock().unwrap();
            if running.get(&run.gameday).is_some_and(|r| r.id == run.id) {
                running.remove(&run.gameday);
                m.running.get_or_create(&gl).set(0);
            }
        }
        if !self.counted.lock().unwrap().insert(run.id.clone()) {
            return; // saved again, with its notifications
        }
        if run.verdict == GamedayVerdict::RevertFailed {
            self.left_behind.lock().unwrap().push(run.id.clone());
        }
        let mut l = gl.clone();
        l.push(("verdict".into(), run.verdict.to_string()));
        m.runs.get_or_create(&l).inc();
        if !run.ran() {
            return;
        }
        m.last_run
            .get_or_create(&gl)
            .set(run.ended_unix_ms.unwrap_or(run.started_unix_ms) as f64 / 1000.0);
        m.last_passed
            .get_or_create(&gl)
            .set(i64::from(run.verdict == GamedayVerdict::Passed));
        for e in &run.experiments {
            for o in &e.objectives {
                let mut l = gl.clone();
                l.push(("experiment".into(), e.name.clone()));
                l.push(("objective".into(), o.name.clone()));
                l.push(("kind".into(), o.kind.clone()));
                if let Some(v) = o.measured {
                    let mut lu = l.clone();
                    lu.push(("unit".into(), o.unit.clone()));
                    m.objective.get_or_create(&lu).set(v);
                }
                m.objective_passed
                    .get_or_create(&l)
                    .set(i64::from(o.passed));
            }
        }
    }

    pub fn notified(&self, run: &GamedayRun) {
        for n in &run.notifications {
            let mut l = gd_label(&run.gameday);
            l.push(("result".into(), if n.ok { "ok" } else { "failed" }.into()));
            self.metrics.notifications.get_or_create(&l).inc();
        }
    }

    /// The OpenMetrics text.
    pub fn metrics_text(&self, pending: usize) -> String {
        let m = &self.metrics;
        m.pending.set(pending as i64);
        for (name, next) in self.next.lock().unwrap().iter() {
            if let Some(t) = next {
                m.next_run
                    .get_or_create(&gd_label(name))
                    .set(t.as_millisecond() as f64 / 1000.0);
            }
        }
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &m.registry);
        out
    }
}

/// The executor `serve` uses: real runs, recorded in the history.
pub struct ServeExecutor {
    pub ctx: Arc<exec::Ctx>,
    pub live: Arc<Live>,
}

impl Executor for ServeExecutor {
    fn run(
        &self,
        gd: Arc<GameDay>,
        slot: Option<Timestamp>,
        trigger: &'static str,
        stop: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        let ctx = self.ctx.clone();
        let live = self.live.clone();
        Box::pin(async move {
            match exec::execute(&ctx, &gd, slot, trigger, stop).await {
                Ok(run) => live.notified(&run),
                Err(exec::NotStarted::LockedLocally(m) | exec::NotStarted::AlreadyRecorded(m)) => {
                    tracing::info!(gameday = %gd.name, "not started: {m}");
                }
                Err(exec::NotStarted::CannotRecord(m)) => {
                    tracing::error!(gameday = %gd.name, "not started, because it could not be recorded: {m}");
                    *live.history_error.lock().unwrap() = Some(m);
                }
            }
        })
    }

    fn record_slot(
        &self,
        gd: Arc<GameDay>,
        slot: Timestamp,
        missed_slots: u32,
        verdict: GamedayVerdict,
        reason: String,
    ) -> BoxFuture<'static, ()> {
        let ctx = self.ctx.clone();
        let live = self.live.clone();
        Box::pin(async move {
            let Some(mut run) =
                exec::record_slot(&ctx, &gd, slot, missed_slots, verdict, reason).await
            else {
                return;
            };
            // Notified on the side: a slow webhook must not delay the next slot.
            tokio::spawn(async move {
                exec::notify(&ctx, &gd, &mut run).await;
                live.notified(&run);
            });
        })
    }

    fn last_slot(&self, gd: &GameDay) -> Option<Timestamp> {
        let from_db = self
            .ctx
            .store
            .lock()
            .unwrap()
            .last_slot(&gd.name)
            .ok()
            .flatten();
        // Folders not yet in the index count too (a locked database at start-up).
        let from_dirs = history::summaries(&self.ctx.runs_dir, true)
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, r)| r.gameday == gd.name)
            .filter_map(|(_, r)| r.slot_unix_ms)
            .max();
        from_db
            .max(from_dirs)
            .and_then(|ms| Timestamp::from_millisecond(ms).ok())
    }
}

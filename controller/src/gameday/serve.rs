//! The scheduler: one loop per game day, on a [`WallClock`].
//!
//! Rules (also in docs/gamedays.md):
//! - **Slots.** The cron expression, read in the game day's time zone, gives the
//!   slots. A slot starts a run unless:
//!   - it falls in a blackout, or the run could still be going when one begins
//!     (`[slot, slot + max_duration)` touches a blackout): recorded `skipped`;
//!   - the previous run of the same game day is still going: recorded `skipped`
//!     (never queued, never started twice);
//!   - the scheduler reached it more than `start_deadline` late (the machine was
//!     suspended, the clock jumped): recorded `missed`.
//! - **Downtime.** At start-up, the slots between the last one in the history and
//!   now were missed. The latest of them still runs (trigger `catch-up`) if it is at
//!   most `start_deadline` old and outside blackouts; the others are recorded as one
//!   `missed` row that says how many and from when to when. A game day with no
//!   history starts with the next slot.
//! - **Stop.** Cancelling `stop` interrupts running game days (their experiments
//!   revert every fault) and waits for them to be recorded.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use tokio_util::sync::CancellationToken;

use super::clock::WallClock;
use super::file::GameDay;
use super::history::GamedayVerdict;
use super::schedule::blackout_for;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the scheduler asks of the rest: run, record a slot that did not run, and
/// say where the history left off.
pub trait Executor: Send + Sync + 'static {
    /// `slot`: none for a manual run.
    fn run(
        &self,
        gd: Arc<GameDay>,
        slot: Option<Timestamp>,
        trigger: &'static str,
        stop: CancellationToken,
    ) -> BoxFuture<'static, ()>;
    fn record_slot(
        &self,
        gd: Arc<GameDay>,
        slot: Timestamp,
        missed_slots: u32,
        verdict: GamedayVerdict,
        reason: String,
    ) -> BoxFuture<'static, ()>;
    /// The latest slot the history has for this game day.
    fn last_slot(&self, gd: &GameDay) -> Option<Timestamp>;
}

/// The next slot of each game day, for the page and the metrics.
pub type NextSlots = Arc<Mutex<BTreeMap<String, Option<Timestamp>>>>;

/// More than this many missed slots are counted, not listed.
const MISSED_CAP: usize = 100_000;

fn late_by(now: Timestamp, slot: Timestamp) -> Duration {
    now.duration_since(slot)
        .try_into()
        .unwrap_or(Duration::ZERO)
}

fn fmt_d(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

type Running = Option<(String, tokio::task::JoinHandle<()>)>;

/// One game day's scheduler state.
struct Sched {
    gd: Arc<GameDay>,
    exec: Arc<dyn Executor>,
    stop: CancellationToken,
    /// The run under way (what it is, for humans) and its task.
    running: Running,
}

impl Sched {
    /// Starts a run of `slot` now, unless a blackout or a run under way forbids it
    /// (recorded as skipped).
    async fn start_or_skip(&mut self, slot: Timestamp, now: Timestamp, trigger: &'static str) {
        let s = &self.gd.schedule;
        if let Some(b) = blackout_for(&self.gd.blackouts, now.max(slot), self.gd.max_duration) {
            let why = format!(
                "blackout {}: a run from {} for up to {} would overlap it",
                b.describe(s),
                s.local(now.max(slot)),
                fmt_d(self.gd.max_duration)
            );
            self.exec
                .record_slot(self.gd.clone(), slot, 0, GamedayVerdict::Skipped, why)
                .await;
            return;
        }
        if let Some((what, h)) = &self.running
            && !h.is_finished()
        {
            let why = format!("{what} is still going: a game day never runs twice at once");
            self.exec
                .record_slot(self.gd.clone(), slot, 0, GamedayVerdict::Skipped, why)
                .await;
            return;
        }
        let h =
            tokio::spawn(
                self.exec
                    .run(self.gd.clone(), Some(slot), trigger, self.stop.clone()),
            );
        self.running = Some((format!("the run of the {} slot", s.local(slot)), h));
    }

    /// The slots in `(after, latest]` were not started on time (`why`). The latest
    /// still starts if it is at most `start_deadline` old; the others are recorded
    /// as one `missed` entry.
    async fn overdue(
        &mut self,
        after: Timestamp,
        latest: Timestamp,
        now: Timestamp,
        why: &str,
        trigger: &'static str,
    ) {
        let s = &self.gd.schedule;
        let (slots, more) = s.between(after, latest, MISSED_CAP);
        let Some(&first) = slots.first() else {
            return;
        };
        let late = late_by(now, latest);
        let runnable = late <= self.gd.start_deadline;
        let missed = slots.len() as u32 + u32::from(more) - u32::from(runnable);
        if missed > 0 {
            let last_missed = if runnable {
                slots[slots.len() - 2]
            } else {
                latest
            };
            let mut text = format!(
                "{missed}{} slot{} from {} to {} {why}",
                if more { "+" } else { "" },
                if missed == 1 { "" } else { "s" },
                s.local(first),
                s.local(last_missed),
            );
            if !runnable {
                text += &format!(
                    "; the latest is {} old, past the start_deadline of {}",
                    fmt_d(late),
                    fmt_d(self.gd.start_deadline)
                );
            }
            self.exec
                .record_slot(
                    self.gd.clone(),
                    last_missed,
                    missed,
                    GamedayVerdict::Missed,
                    text,
                )
                .await;
        }
        if runnable {
            tracing::info!(gameday = %self.gd.name, slot = %s.local(latest), "starting a slot {} late", fmt_d(late));
            self.start_or_skip(latest, now, trigger).await;
        }
    }
}

/// Runs one game day's schedule until `stop`; returns when its last run is recorded.
/// `run_now`: also run it once at start (trigger `manual`), as the run under way.
pub async fn schedule_loop(
    gd: Arc<GameDay>,
    clock: Arc<dyn WallClock>,
    exec: Arc<dyn Executor>,
    stop: CancellationToken,
    next_slots: NextSlots,
    run_now: bool,
) {
    let mut me = Sched {
        gd: gd.clone(),
        exec: exec.clone(),
        stop: stop.clone(),
        running: None,
    };
    let s = &gd.schedule;
    let now = clock.now();
    if run_now {
        let h = tokio::spawn(exec.run(gd.clone(), None, "manual", stop.clone()));
        me.running = Some(("the manual run".into(), h));
    }
    let mut cursor = now;
    match exec.last_slot(&gd) {
        Some(last) if last > now => tracing::warn!(
            gameday = %gd.name,
            "the history's last slot ({}) is later than now: the clock went back; scheduling from now",
            s.local(last)
        ),
        Some(last) => {
            if let Some(latest) = s.last_at_or_before(now).filter(|l| *l > last) {
                me.overdue(
                    last,
                    latest,
                    now,
                    "passed while no gpuchaos serve was running",
                    "catch-up",
                )
                .await;
                cursor = latest;
            }
        }
        None => {}
    }
    loop {
        let Some(next) = s.next_after(cursor) else {
            tracing::warn!(gameday = %gd.name, "the schedule has no further slot");
            next_slots.lock().unwrap().insert(gd.name.clone(), None);
            break;
        };
        next_slots
            .lock()
            .unwrap()
            .insert(gd.name.clone(), Some(next));
        while clock.now() < next {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = clock.sleep_until(next) => {}
            }
        }
        if stop.is_cancelled() {
            break;
        }
        let now = clock.now();
        let latest = s.last_at_or_before(now).unwrap_or(next).max(next);
        if latest > next || late_by(now, next) > gd.start_deadline {
            me.overdue(
                cursor,
                latest,
                now,
                "were reached late (suspended machine or clock change)",
                "schedule",
            )
            .await;
        } else {
            me.start_or_skip(next, now, "schedule").await;
        }
        cursor = latest;
    }
    if let Some((_, h)) = me.running {
        let _ = h.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gameday::clock::ManualClock;
    use crate::gameday::schedule::{Blackout, BlackoutWhen, Schedule};

    #[derive(Default)]
    struct Fake {
        /// (slot, what) in the order they happened.
        log: Mutex<Vec<(String, String)>>,
        last: Mutex<Option<Timestamp>>,
        /// While false, runs stay running.
        release: tokio::sync::watch::Sender<bool>,
        tz: Mutex<Option<Schedule>>,
    }

    impl Fake {
        fn push(&self, slot: Timestamp, what: String) {
            let local = self.tz.lock().unwrap().as_ref().unwrap().local(slot);
            self.log.lock().unwrap().push((local, what));
        }
        fn log(&self) -> Vec<(String, String)> {
            self.log.lock().unwrap().clone()
        }
    }

    impl Executor for Arc<Fake> {
        fn run(
            &self,
            _: Arc<GameDay>,
            slot: Option<Timestamp>,
            trigger: &'static str,
            stop: CancellationToken,
        ) -> BoxFuture<'static, ()> {
            let me = self.clone();
            let slot = slot.unwrap_or(Timestamp::UNIX_EPOCH);
            me.push(slot, format!("run {trigger}"));
            Box::pin(async move {
                let mut rx = me.release.subscribe();
                tokio::select! {
                    _ = rx.wait_for(|r| *r) => {}
                    _ = stop.cancelled() => me.push(slot, "interrupted".into()),
                }
            })
        }
        fn record_slot(
            &self,
            _: Arc<GameDay>,
            slot: Timestamp,
            n: u32,
            verdict: GamedayVerdict,
            reason: String,
        ) -> BoxFuture<'static, ()> {
            self.push(slot, format!("{verdict} {n}: {reason}"));
            Box::pin(async {})
        }
        fn last_slot(&self, _: &GameDay) -> Option<Timestamp> {
            *self.last.lock().unwrap()
        }
    }

    fn gameday(cron: &str, tz: &str) -> GameDay {
        GameDay {
            name: "g".into(),
            description: String::new(),
            file: "g.yaml".into(),
            schedule: Schedule::new(cron, tz).unwrap(),
            experiments: vec![],
            max_duration: Duration::from_secs(1800),
            start_deadline: Duration::from_secs(600),
            on_failure: Default::default(),
            blackouts: vec![],
            notify: vec![],
        }
    }

    struct Rig {
        clock: Arc<ManualClock>,
        fake: Arc<Fake>,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
        next: NextSlots,
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    async fn start(gd: GameDay, now: &str, last: Option<&str>, released: bool) -> Rig {
        start_with(gd, now, last, released, false).await
    }

    async fn start_with(
        gd: GameDay,
        now: &str,
        last: Option<&str>,
        released: bool,
        run_now: bool,
    ) -> Rig {
        let clock = Arc::new(ManualClock::new(ts(now)));
        let fake = Arc::new(Fake::default());
        *fake.tz.lock().unwrap() = Some(gd.schedule.clone());
        *fake.last.lock().unwrap() = last.map(ts);
        fake.release.send_replace(released);
        let stop = CancellationToken::new();
        let next = NextSlots::default();
        let task = tokio::spawn(schedule_loop(
            Arc::new(gd),
            clock.clone(),
            Arc::new(fake.clone()),
            stop.clone(),
            next.clone(),
            run_now,
        ));
        settle().await;
        Rig {
            clock,
            fake,
            stop,
            task,
            next,
        }
    }

    impl Rig {
        /// Moves the clock forward in steps, letting the loop run after each.
        async fn walk(&self, until: &str, step: Duration) {
            let until = ts(until);
            while self.clock.now() < until {
                let t = self.clock.now().checked_add(step).unwrap().min(until);
                self.clock.set(t);
                settle().await;
            }
        }
        async fn finish(self) -> Vec<(String, String)> {
            self.stop.cancel();
            tokio::time::timeout(Duration::from_secs(5), self.task)
                .await
                .unwrap()
                .unwrap();
            self.fake.log()
        }
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    fn whats(log: &[(String, String)]) -> Vec<String> {
        log.iter()
            .map(|(t, w)| format!("{t} {}", w.split(':').next().unwrap()))
            .collect()
    }

    #[tokio::test]
    async fn fires_at_each_slot_in_its_time_zone() {
        let r = start(
            gameday("0 14 * * TUE", "Europe/Berlin"),
            "2026-11-23T00:00:00Z",
            None,
            true,
        )
        .await;
        settle().await;
        assert_eq!(
            r.next.lock().unwrap()["g"],
            Some(ts("2026-11-24T13:00:00Z"))
        );
        r.walk("2026-12-09T00:00:00Z", Duration::from_secs(600))
            .await;
        let log = r.finish().await;
        assert_eq!(
            whats(&log),
            [
                "2026-11-24 14:00 CET run schedule",
                "2026-12-01 14:00 CET run schedule",
                "2026-12-08 14:00 CET run schedule",
            ]
        );
    }

    #[tokio::test]
    async fn fires_right_across_daylight_saving_changes() {
        // New York springs forward on 2026-03-08 (02:00 → 03:00) and falls back on
        // 2026-11-01 (02:00 → 01:00).
        let log = walked(
            (
                gameday("30 2 * * *", "America/New_York"),
                "2026-03-07T05:00:00Z",
                None,
                true,
            ),
            "2026-03-09T12:00:00Z",
            Duration::from_secs(300),
        )
        .await;
        assert_eq!(
            whats(&log),
            [
                "2026-03-07 02:30 EST run schedule",
                "2026-03-08 03:00 EDT run schedule", // 02:30 did not exist: right after the gap
                "2026-03-09 02:30 EDT run schedule",
            ]
        );
        // An interval pattern (a list of hours) runs only at times that exist.
        let log = walked(
            (
                gameday("30 1,2 * * *", "America/New_York"),
                "2026-03-07T05:00:00Z",
                None,
                true,
            ),
            "2026-03-09T12:00:00Z",
            Duration::from_secs(300),
        )
        .await;
        assert_eq!(
            whats(&log),
            [
                "2026-03-07 01:30 EST run schedule",
                "2026-03-07 02:30 EST run schedule",
                "2026-03-08 01:30 EST run schedule",
                "2026-03-09 01:30 EDT run schedule",
                "2026-03-09 02:30 EDT run schedule",
            ]
        );
        let log = walked(
            (
                gameday("30 1 * * *", "America/New_York"),
                "2026-10-31T04:00:00Z",
                None,
                true,
            ),
            "2026-11-02T12:00:00Z",
            Duration::from_secs(300),
        )
        .await;
        // 01:30 happened twice on 2026-11-01: the game day ran once.
        assert_eq!(
            whats(&log),
            [
                "2026-10-31 01:30 EDT run schedule",
                "2026-11-01 01:30 EDT run schedule",
                "2026-11-02 01:30 EST run schedule",
            ]
        );
    }

    #[tokio::test]
    async fn a_run_overlapping_its_next_slot_does_not_start_twice() {
        let r = start(
            gameday("*/10 * * * *", "UTC"),
            "2026-11-25T09:55:00Z",
            None,
            false,
        )
        .await;
        r.walk("2026-11-25T10:35:00Z", Duration::from_secs(60))
            .await;
        // Let the first run end; the next slot runs again.
        r.fake.release.send_replace(true);
        settle().await;
        r.walk("2026-11-25T10:45:00Z", Duration::from_secs(60))
            .await;
        let log = r.finish().await;
        assert_eq!(
            whats(&log),
            [
                "2026-11-25 10:00 UTC run schedule",
                "2026-11-25 10:10 UTC skipped 0",
                "2026-11-25 10:20 UTC skipped 0",
                "2026-11-25 10:30 UTC skipped 0",
                "2026-11-25 10:40 UTC run schedule",
            ]
        );
        assert!(
            log[1]
                .1
                .contains("the run of the 2026-11-25 10:00 UTC slot is still going"),
            "{}",
            log[1].1
        );
    }

    #[tokio::test]
    async fn downtime_records_what_was_missed_and_runs_the_latest_if_recent() {
        // Last recorded slot Tuesday 2026-11-10 14:00; back on Tuesday 2026-11-24 at
        // 14:04, within the 10m start deadline: 11-17 missed, 11-24 runs late.
        let r = start(
            gameday("0 14 * * TUE", "UTC"),
            "2026-11-24T14:04:00Z",
            Some("2026-11-10T14:00:00Z"),
            true,
        )
        .await;
        settle().await;
        let log = r.finish().await;
        assert_eq!(
            whats(&log),
            [
                "2026-11-17 14:00 UTC missed 1",
                "2026-11-24 14:00 UTC run catch-up"
            ]
        );
        assert!(log[0].1.contains("1 slot from 2026-11-17 14:00 UTC to 2026-11-17 14:00 UTC passed while no gpuchaos serve was running"), "{}", log[0].1);

        // Back 3 hours after the slot: too late, recorded as missed with the reason.
        let r = start(
            gameday("0 14 * * TUE", "UTC"),
            "2026-11-24T17:00:00Z",
            Some("2026-11-10T14:00:00Z"),
            true,
        )
        .await;
        settle().await;
        assert_eq!(
            r.next.lock().unwrap()["g"],
            Some(ts("2026-12-01T14:00:00Z"))
        );
        let log = r.finish().await;
        assert_eq!(whats(&log), ["2026-11-24 14:00 UTC missed 2"]);
        assert!(
            log[0]
                .1
                .contains("the latest is 3h old, past the start_deadline of 10m"),
            "{}",
            log[0].1
        );
    }

    /// Starts, walks the clock to `until` in `step`s, stops: what happened.
    async fn walked(
        (gd, now, last, released): (GameDay, &str, Option<&str>, bool),
        until: &str,
        step: Duration,
    ) -> Vec<(String, String)> {
        let r = start(gd, now, last, released).await;
        r.walk(until, step).await;
        r.finish().await
    }

    /// An hourly game day whose machine sleeps from 09:30 until `wake`.
    async fn suspended_until(wake: &str, until: &str) -> Vec<(String, String)> {
        let r = start(
            gameday("0 * * * *", "UTC"),
            "2026-11-25T09:30:00Z",
            None,
            true,
        )
        .await;
        r.clock.set(ts(wake));
        settle().await;
        r.walk(until, Duration::from_secs(60)).await;
        r.finish().await
    }

    #[tokio::test]
    async fn a_suspended_scheduler_does_not_fire_stale_slots() {
        // Four slots passed, the latest 20 minutes ago, past the 10 minute deadline.
        let log = suspended_until("2026-11-25T13:20:00Z", "2026-11-25T14:05:00Z").await;
        assert_eq!(
            whats(&log),
            [
                "2026-11-25 13:00 UTC missed 4",
                "2026-11-25 14:00 UTC run schedule"
            ]
        );
        assert!(
            log[0].1.contains("4 slots from 2026-11-25 10:00 UTC to 2026-11-25 13:00 UTC were reached late (suspended machine or clock change); the latest is 20m old"),
            "{}",
            log[0].1
        );
        // Back at 13:05 instead: 13:00 is within the deadline and still runs.
        let log = suspended_until("2026-11-25T13:05:00Z", "2026-11-25T13:30:00Z").await;
        assert_eq!(
            whats(&log),
            [
                "2026-11-25 12:00 UTC missed 3",
                "2026-11-25 13:00 UTC run schedule"
            ]
        );
    }

    #[tokio::test]
    async fn a_manual_run_counts_as_the_run_under_way() {
        let r = start_with(
            gameday("0 * * * *", "UTC"),
            "2026-11-25T09:59:00Z",
            None,
            false,
            true,
        )
        .await;
        r.clock.set(ts("2026-11-25T10:00:30Z"));
        settle().await;
        let log = r.finish().await;
        assert_eq!(log[0].1, "run manual");
        assert_eq!(log[1].0, "2026-11-25 10:00 UTC");
        assert!(
            log[1]
                .1
                .starts_with("skipped 0: the manual run is still going"),
            "{log:?}"
        );
    }

    #[tokio::test]
    async fn a_history_ahead_of_the_clock_schedules_from_now() {
        let r = start(
            gameday("0 * * * *", "UTC"),
            "2026-11-25T09:30:00Z",
            Some("2026-11-26T00:00:00Z"),
            true,
        )
        .await;
        assert_eq!(
            r.next.lock().unwrap()["g"],
            Some(ts("2026-11-25T10:00:00Z"))
        );
        r.finish().await;
    }

    #[tokio::test]
    async fn blackouts_skip_slots_that_would_touch_them() {
        let mut gd = gameday("0 * * * *", "UTC");
        gd.max_duration = Duration::from_secs(1800);
        gd.blackouts = vec![Blackout {
            name: "deploy".into(),
            when: BlackoutWhen::Between(ts("2026-11-25T11:15:00Z"), ts("2026-11-25T12:30:00Z")),
        }];
        let log = walked(
            (gd, "2026-11-25T09:30:00Z", None, true),
            "2026-11-25T13:05:00Z",
            Duration::from_secs(300),
        )
        .await;
        assert_eq!(
            whats(&log),
            [
                "2026-11-25 10:00 UTC run schedule",
                "2026-11-25 11:00 UTC skipped 0", // 11:00 + 30m reaches 11:15
                "2026-11-25 12:00 UTC skipped 0",
                "2026-11-25 13:00 UTC run schedule",
            ]
        );
        assert!(log[1].1.contains("blackout deploy"), "{}", log[1].1);
    }

    #[tokio::test]
    async fn stopping_interrupts_the_running_game_day_and_waits_for_it() {
        let log = walked(
            (
                gameday("*/5 * * * *", "UTC"),
                "2026-11-25T09:59:00Z",
                None,
                false,
            ),
            "2026-11-25T10:01:00Z",
            Duration::from_secs(60),
        )
        .await;
        assert_eq!(
            whats(&log),
            [
                "2026-11-25 10:00 UTC run schedule",
                "2026-11-25 10:00 UTC interrupted"
            ]
        );
    }
}

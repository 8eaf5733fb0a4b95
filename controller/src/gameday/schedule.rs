//! When a game day runs: a five-field cron expression read in an IANA time zone
//! (croner, with jiff for the zone rules), and blackout windows when it never starts.
//!
//! Daylight-saving changes follow croner's rules, which match Vixie cron's:
//! - a fixed-time schedule (one minute and one hour, e.g. `30 2 * * *`) whose time
//!   does not exist that day (spring forward: clocks jump from 02:00 to 03:00) runs
//!   at the first instant after the gap (03:00);
//! - a fixed-time schedule whose time happens twice (fall back) runs once, at the
//!   first of the two;
//! - any other pattern (lists, ranges, steps or `*` in the minute or hour:
//!   `30 1,2 * * *`, `0 * * * *`) runs at every real instant that matches: not in
//!   the gap, and twice in the repeated hour.

use std::str::FromStr;
use std::time::Duration;

use croner::Cron;
use croner::parser::{CronParser, Seconds};
use jiff::tz::TimeZone;
use jiff::{Timestamp, Zoned};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScheduleError {
    Cron(String),
    TimeZone(String),
}

/// A cron expression in a time zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// As written.
    pub cron_text: String,
    pub tz_name: String,
    pub tz: TimeZone,
    cron: Cron,
}

impl Schedule {
    pub fn new(cron: &str, tz_name: &str) -> Result<Schedule, ScheduleError> {
        let tz = time_zone(tz_name).map_err(ScheduleError::TimeZone)?;
        let mut s = Schedule::with_tz(cron, tz).map_err(ScheduleError::Cron)?;
        s.tz_name = tz_name.to_string();
        Ok(s)
    }

    pub fn with_tz(cron: &str, tz: TimeZone) -> Result<Schedule, String> {
        let text = cron.trim();
        let fields = text.split_whitespace().count();
        if !text.starts_with('@') && fields != 5 {
            return Err(format!(
                "`{cron}` has {fields} field{}: a schedule is five fields, minute hour day-of-month month day-of-week (e.g. \"0 14 * * TUE\": Tuesdays at 14:00)",
                if fields == 1 { "" } else { "s" }
            ));
        }
        let parsed = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .build()
            .parse(text)
            .or_else(|_| Cron::from_str(text))
            .map_err(|e| format!("`{cron}` is not a valid cron expression: {e}"))?;
        let tz_name = tz.iana_name().unwrap_or("UTC").to_string();
        Ok(Schedule {
            cron_text: text.to_string(),
            tz_name,
            tz,
            cron: parsed,
        })
    }

    /// The first slot strictly after `t`.
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        let z = t.to_zoned(self.tz.clone());
        self.cron
            .find_next_occurrence(&z, false)
            .ok()
            .map(|z: Zoned| z.timestamp())
    }

    /// The last slot at or before `t`.
    pub fn last_at_or_before(&self, t: Timestamp) -> Option<Timestamp> {
        let z = t.to_zoned(self.tz.clone());
        self.cron
            .find_previous_occurrence(&z, true)
            .ok()
            .map(|z: Zoned| z.timestamp())
    }

    /// The slots in `(after, until]`, at most `cap` of them, and whether there were more.
    pub fn between(
        &self,
        after: Timestamp,
        until: Timestamp,
        cap: usize,
    ) -> (Vec<Timestamp>, bool) {
        let mut out = Vec::new();
        let mut t = after;
        while let Some(n) = self.next_after(t) {
            if n > until {
                return (out, false);
            }
            if out.len() == cap {
                return (out, true);
            }
            out.push(n);
            t = n;
        }
        (out, false)
    }

    /// `t` as wall-clock time in this schedule's zone, e.g. `2026-03-29 03:00 CEST`.
    pub fn local(&self, t: Timestamp) -> String {
        t.to_zoned(self.tz.clone())
            .strftime("%Y-%m-%d %H:%M %Z")
            .to_string()
    }

    /// For humans: "0 14 * * TUE (Europe/Berlin)".
    pub fn describe(&self) -> String {
        format!("{} ({})", self.cron_text, self.tz_name)
    }
}

/// An IANA time zone by name, with an error that says what to write.
pub fn time_zone(name: &str) -> Result<TimeZone, String> {
    if name.eq_ignore_ascii_case("utc") {
        return Ok(TimeZone::UTC);
    }
    TimeZone::get(name).map_err(|_| {
        format!(
            "unknown time zone `{name}`: use an IANA name such as Europe/Berlin, America/New_York or UTC"
        )
    })
}

/// A time when no game-day run may start or be under way.
#[derive(Debug, Clone)]
pub struct Blackout {
    pub name: String,
    pub when: BlackoutWhen,
}

#[derive(Debug, Clone)]
pub enum BlackoutWhen {
    /// `[from, to)`.
    Between(Timestamp, Timestamp),
    /// Starts at each slot of the schedule and lasts the duration.
    Recurring(Box<Schedule>, Duration),
}

impl Blackout {
    /// Whether `[start, end)` overlaps this blackout.
    pub fn overlaps(&self, start: Timestamp, end: Timestamp) -> bool {
        match &self.when {
            BlackoutWhen::Between(from, to) => start < *to && *from < end,
            BlackoutWhen::Recurring(s, d) => {
                let d = jiff::SignedDuration::try_from(*d).unwrap_or(jiff::SignedDuration::MAX);
                // A window that began before `start` and is still open...
                let open_before = s
                    .last_at_or_before(start)
                    .is_some_and(|b| b.checked_add(d).is_ok_and(|e| e > start));
                // ...or one that begins before `end`.
                let begins_inside = s.next_after(start).is_some_and(|b| b < end);
                open_before || begins_inside
            }
        }
    }

    pub fn describe(&self, tz: &Schedule) -> String {
        match &self.when {
            BlackoutWhen::Between(a, b) => {
                format!("{}: {} – {}", self.name, tz.local(*a), tz.local(*b))
            }
            BlackoutWhen::Recurring(s, d) => format!(
                "{}: from {} for {}",
                self.name,
                s.cron_text,
                humantime::format_duration(*d)
            ),
        }
    }
}

/// The first blackout that `[start, start + max_duration)` would touch.
pub fn blackout_for(
    blackouts: &[Blackout],
    start: Timestamp,
    max_duration: Duration,
) -> Option<&Blackout> {
    let end = start
        .checked_add(
            jiff::SignedDuration::try_from(max_duration).unwrap_or(jiff::SignedDuration::MAX),
        )
        .unwrap_or(Timestamp::MAX);
    blackouts.iter().find(|b| b.overlaps(start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn weekly_slots_in_their_zone() {
        let s = Schedule::new("0 14 * * TUE", "Europe/Berlin").unwrap();
        // Wednesday 2026-11-25 12:00 UTC → next Tuesday 2026-12-01 14:00 CET = 13:00 UTC.
        let n = s.next_after(ts("2026-11-25T12:00:00Z")).unwrap();
        assert_eq!(n, ts("2026-12-01T13:00:00Z"));
        assert_eq!(s.local(n), "2026-12-01 14:00 CET");
        // In summer the same wall time is 12:00 UTC.
        let n = s.next_after(ts("2026-06-01T00:00:00Z")).unwrap();
        assert_eq!(n, ts("2026-06-02T12:00:00Z"));
        // Strictly after: a slot is not its own successor.
        assert_eq!(s.next_after(n).unwrap(), ts("2026-06-09T12:00:00Z"));
    }

    #[test]
    fn spring_forward_gap_runs_right_after_the_gap() {
        // America/New_York jumps from 02:00 EST to 03:00 EDT on 2026-03-08.
        let s = Schedule::new("30 2 * * *", "America/New_York").unwrap();
        let (slots, more) = s.between(ts("2026-03-06T12:00:00Z"), ts("2026-03-10T12:00:00Z"), 10);
        assert!(!more);
        let local: Vec<String> = slots.iter().map(|t| s.local(*t)).collect();
        assert_eq!(
            local,
            [
                "2026-03-07 02:30 EST",
                "2026-03-08 03:00 EDT", // 02:30 does not exist that day
                "2026-03-09 02:30 EDT",
                "2026-03-10 02:30 EDT",
            ]
        );
        // 23 hours between the first two real instants, 23.5 between the next.
        assert_eq!(
            slots[1].duration_since(slots[0]).as_secs(),
            23 * 3600 + 1800
        );
    }

    #[test]
    fn fall_back_overlap_runs_once() {
        // Europe/Berlin goes from 03:00 CEST back to 02:00 CET on 2026-10-25.
        let s = Schedule::new("30 2 * * *", "Europe/Berlin").unwrap();
        let (slots, _) = s.between(ts("2026-10-24T00:00:00Z"), ts("2026-10-26T23:00:00Z"), 10);
        let local: Vec<String> = slots.iter().map(|t| s.local(*t)).collect();
        assert_eq!(
            local,
            [
                "2026-10-24 02:30 CEST",
                "2026-10-25 02:30 CEST", // the first of the two 02:30s, once
                "2026-10-26 02:30 CET",
            ]
        );
        // An interval pattern runs on both real hours of the repeated hour.
        let s = Schedule::new("0 * * * *", "Europe/Berlin").unwrap();
        let (slots, _) = s.between(ts("2026-10-24T23:30:00Z"), ts("2026-10-25T02:30:00Z"), 10);
        let local: Vec<String> = slots.iter().map(|t| s.local(*t)).collect();
        assert_eq!(
            local,
            [
                "2026-10-25 02:00 CEST",
                "2026-10-25 02:00 CET",
                "2026-10-25 03:00 CET",
            ]
        );
    }

    #[test]
    fn bad_expressions_and_zones_say_what_to_write() {
        let e = Schedule::new("0 14 * * * *", "UTC").unwrap_err();
        assert!(
            matches!(&e, ScheduleError::Cron(m) if m.contains("has 6 fields")),
            "{e:?}"
        );
        let e = Schedule::new("0 25 * * *", "UTC").unwrap_err();
        assert!(
            matches!(&e, ScheduleError::Cron(m) if m.contains("not a valid cron expression")),
            "{e:?}"
        );
        let e = Schedule::new("0 14 * * TUE", "Mars/Olympus").unwrap_err();
        assert!(
            matches!(&e, ScheduleError::TimeZone(m) if m.contains("IANA")),
            "{e:?}"
        );
        assert!(Schedule::new("@weekly", "UTC").is_ok());
    }

    #[test]
    fn blackouts_cover_the_whole_run() {
        let tz = time_zone("UTC").unwrap();
        let fixed = Blackout {
            name: "freeze".into(),
            when: BlackoutWhen::Between(ts("2026-12-18T00:00:00Z"), ts("2027-01-05T00:00:00Z")),
        };
        let peak = Blackout {
            name: "peak".into(),
            when: BlackoutWhen::Recurring(
                Box::new(Schedule::with_tz("0 9 * * MON-FRI", tz).unwrap()),
                Duration::from_secs(3 * 3600),
            ),
        };
        let b = [fixed, peak];
        let hour = Duration::from_secs(3600);
        // Inside the freeze.
        assert_eq!(
            blackout_for(&b, ts("2026-12-24T14:00:00Z"), hour)
                .unwrap()
                .name,
            "freeze"
        );
        // A run that would still be going when the freeze begins.
        assert_eq!(
            blackout_for(&b, ts("2026-12-17T23:30:00Z"), hour)
                .unwrap()
                .name,
            "freeze"
        );
        // The freeze has ended.
        assert!(blackout_for(&b, ts("2027-01-05T00:00:00Z"), hour).is_none());
        // Wednesday 2026-11-25: 10:00 is inside 09:00–12:00; 08:30 + 1h reaches into it;
        // 12:00 is after it; 07:00 + 1h ends before it.
        assert_eq!(
            blackout_for(&b, ts("2026-11-25T10:00:00Z"), hour)
                .unwrap()
                .name,
            "peak"
        );
        assert_eq!(
            blackout_for(&b, ts("2026-11-25T08:30:00Z"), hour)
                .unwrap()
                .name,
            "peak"
        );
        assert!(blackout_for(&b, ts("2026-11-25T12:00:00Z"), hour).is_none());
        assert!(blackout_for(&b, ts("2026-11-25T07:00:00Z"), hour).is_none());
        // Saturday: no peak.
        assert!(blackout_for(&b, ts("2026-11-28T10:00:00Z"), hour).is_none());
    }
}

//! Objectives measured from samples: pure functions over the timeline, so the
//! definitions of design.md ("Recovery time, precisely") are tested on their own.
//!
//! - `t_detect`: the first failing sample at or after the anchor's fault injection.
//! - `t_recovered`: the first of N consecutive passing samples after the last failure.
//! - RTO = `t_recovered − anchor`, ± (probe interval + clock-mapping error).
//!
//! Samples are ordered by when they started. A failure counts from its start (the
//! service did not answer the request sent then); a recovery counts from the end of
//! the first passing sample (the moment an answer was seen: a request sent just
//! before a paused server resumed is answered only after it resumed).

use super::record::{ObjectiveResult, ObjectiveSummary, ResultKind, Sample, Window};

const NS: f64 = 1e9;

/// What an RTO measurement found.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Recovery {
    /// The first failure that is part of the outage.
    pub detect_ns: Option<u64>,
    /// None: not recovered within the samples given.
    pub recovered_ns: Option<u64>,
    /// Failures a tolerance let through (sample starts), not part of the outage.
    pub isolated: Vec<u64>,
    /// The start of the outage's last failing sample.
    pub last_outage_ns: Option<u64>,
}

/// At most `failures` failing samples within any `within_ns` are isolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tolerance {
    pub failures: u32,
    pub within_ns: u64,
}

impl Tolerance {
    pub fn of(t: Option<(u32, std::time::Duration)>) -> Option<Tolerance> {
        t.map(|(failures, within)| Tolerance {
            failures,
            within_ns: within.as_nanos() as u64,
        })
    }
}

/// Samples of one probe, sorted by start time, within [from, to).
pub fn window(samples: &[Sample], probe: usize, from: u64, to: u64) -> Vec<&Sample> {
    let mut v: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.probe == probe && s.t_ns >= from && s.t_ns < to)
        .collect();
    v.sort_by_key(|s| s.t_ns);
    v
}

/// Which failing samples (by position) are part of an outage: without a tolerance,
/// all; with one, those in some window of `within` holding more than `failures`
/// failures (exactly: some `failures + 1` failures in a row, counted among the
/// failures, spanning at most `within`, include it).
fn outage_failures(samples: &[&Sample], tolerate: Option<Tolerance>) -> Vec<bool> {
    let fails: Vec<usize> = (0..samples.len()).filter(|&i| !samples[i].ok).collect();
    let mut outage = vec![false; samples.len()];
    let Some(t) = tolerate else {
        for &i in &fails {
            outage[i] = true;
        }
        return outage;
    };
    let k = t.failures as usize;
    for start in 0..fails.len() {
        let Some(&last) = fails.get(start + k) else {
            break;
        };
        let first = fails[start];
        if samples[last].t_ns - samples[first].t_ns <= t.within_ns {
            for &i in &fails[start..=start + k] {
                outage[i] = true;
            }
        }
    }
    outage
}

/// Detection and recovery (samples sorted, starting at or after the injection):
/// the first failure of the outage, and the end of the first pass after its last
/// failure, when `consecutive` passes follow it. A tolerance leaves isolated
/// failures out of the outage (and reports them).
pub fn recovery_with(
    samples: &[&Sample],
    consecutive: u32,
    tolerate: Option<Tolerance>,
) -> Recovery {
    let outage = outage_failures(samples, tolerate);
    let isolated: Vec<u64> = samples
        .iter()
        .zip(&outage)
        .filter(|(s, o)| !s.ok && !**o)
        .map(|(s, _)| s.t_ns)
        .collect();
    let Some(first) = outage.iter().position(|o| *o) else {
        return Recovery {
            isolated,
            ..Default::default()
        };
    };
    let last = outage.iter().rposition(|o| *o).unwrap_or(first);
    let after: Vec<&&Sample> = samples[last + 1..].iter().filter(|s| s.ok).collect();
    let recovered = if after.len() >= consecutive as usize {
        after.first().map(|s| s.end_ns)
    } else {
        None
    };
    Recovery {
        detect_ns: Some(samples[first].t_ns),
        recovered_ns: recovered,
        isolated,
        last_outage_ns: Some(samples[last].t_ns),
    }
}

/// [`recovery_with`] without a tolerance.
pub fn recovery(samples: &[&Sample], consecutive: u32) -> Recovery {
    recovery_with(samples, consecutive, None)
}

/// Nearest-rank percentile of values (p in (0, 100]).
pub fn percentile(values: &mut [u64], p: f64) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    Some(values[rank.clamp(1, values.len()) - 1])
}

/// Inputs of an RTO evaluation in one trial.
pub struct RtoInput<'a> {
    pub name: String,
    pub probe_name: &'a str,
    /// Samples of the probe from the fault's injection to the end of observation.
    pub samples: Vec<&'a Sample>,
    pub inject_ns: u64,
    pub end_ns: Option<u64>,
    pub anchor_end: bool,
    pub consecutive: u32,
    pub tolerate: Option<Tolerance>,
    pub limit_ns: u64,
    pub error_ns: u64,
}

/// "; 2 isolated failures tolerated (at 3.1s, 7.4s after injection)", or nothing.
fn isolated_text(isolated: &[u64], inject_ns: u64) -> String {
    if isolated.is_empty() {
        return String::new();
    }
    let at: Vec<String> = isolated
        .iter()
        .take(5)
        .map(|t| format!("{:.1}s", t.saturating_sub(inject_ns) as f64 / NS))
        .collect();
    format!(
        "; {} isolated failure{} tolerated (at {}{} after injection)",
        isolated.len(),
        if isolated.len() == 1 { "" } else { "s" },
        at.join(", "),
        if isolated.len() > 5 { ", …" } else { "" }
    )
}

pub fn rto(i: RtoInput) -> ObjectiveResult {
    let r = recovery_with(&i.samples, i.consecutive, i.tolerate);
    let mut isolated = isolated_text(&r.isolated, i.inject_ns);
    // Isolated failures are the exception; many of them are an outage the
    // tolerance is too wide to see as one: say so.
    if !r.isolated.is_empty() && r.isolated.len() * 10 > i.samples.len() {
        isolated.push_str(&format!(
            " — {} of {} samples failed: a tolerance this wide may hide an outage",
            r.isolated.len(),
            i.samples.len()
        ));
    }
    let anchor = if i.anchor_end {
        i.end_ns.unwrap_or(i.inject_ns)
    } else {
        i.inject_ns
    };
    let anchor_name = if i.anchor_end {
        "fault end"
    } else {
        "injection"
    };
    let limit = i.limit_ns as f64 / NS;
    let mut res = ObjectiveResult {
        name: i.name,
        kind: ResultKind::Rto,
        probe: i.probe_name.to_string(),
        limit,
        error_bar: Some(i.error_ns as f64 / NS),
        anchor_ns: Some(anchor),
        detect_ns: r.detect_ns,
        recovered_ns: r.recovered_ns,
        isolated_failures: r.isolated.clone(),
        ..Default::default()
    };
    match (r.detect_ns, r.recovered_ns) {
        (None, _) if !r.isolated.is_empty() => {
            res.passed = true;
            res.value = Some(0.0);
            res.detail = format!(
                "no outage after the injection ({} samples): the fault did not disrupt {} beyond the tolerance{isolated}",
                i.samples.len(),
                i.probe_name
            );
        }
        (None, _) => {
            res.passed = true;
            res.value = Some(0.0);
            res.detail = format!(
                "no failing sample after the injection ({} samples): the fault did not disrupt {}",
                i.samples.len(),
                i.probe_name
            );
        }
        (Some(d), Some(rec)) => {
            let v = rec.saturating_sub(anchor) as f64 / NS;
            res.value = Some(v);
            res.passed = rec.saturating_sub(anchor) <= i.limit_ns;
            res.detail = format!(
                "detected {:.3}s after injection, recovered {:.3}s after the {anchor_name} ({} passing in a row){isolated}",
                d.saturating_sub(i.inject_ns) as f64 / NS,
                v,
                i.consecutive
            );
        }
        (Some(d), None) => {
            res.passed = false;
            let last = i.samples.last().map(|s| s.t_ns).unwrap_or(d);
            res.detail = format!(
                "not recovered: still failing {:.3}s after the {anchor_name} (detected {:.3}s after injection; limit {limit:.3}s)",
                last.saturating_sub(anchor) as f64 / NS,
                d.saturating_sub(i.inject_ns) as f64 / NS,
            );
        }
    }
    res
}

/// "over 1.0s–43.5s of the run (first fault verified → chat recovered)".
fn window_text(w: &Window) -> String {
    format!(
        "over {:.1}s–{:.1}s of the run ({})",
        w.from_ns as f64 / NS,
        w.to_ns as f64 / NS,
        w.covers
    )
}

pub fn availability(
    name: String,
    probe: &str,
    samples: &[&Sample],
    min: f64,
    window: Window,
) -> ObjectiveResult {
    let total = samples.len();
    let ok = samples.iter().filter(|s| s.ok).count();
    let over = window_text(&window);
    let mut res = ObjectiveResult {
        name,
        kind: ResultKind::Availability,
        probe: probe.to_string(),
        limit: min,
        window: Some(window),
        ..Default::default()
    };
    if total == 0 {
        res.detail =
            "no sample in the fault window: make the probe interval shorter than the faults".into();
        return res;
    }
    let ratio = ok as f64 / total as f64;
    res.value = Some(ratio);
    res.error_bar = Some(1.0 / total as f64);
    res.passed = ratio >= min;
    res.detail = format!("{ok} of {total} samples passed {over}");
    res
}

pub fn latency(
    name: String,
    probe: &str,
    samples: &[&Sample],
    pct: f64,
    limit_ns: u64,
    window: Window,
) -> ObjectiveResult {
    let over = window_text(&window);
    let mut lat: Vec<u64> = samples
        .iter()
        .filter(|s| s.ok)
        .map(|s| s.latency_ns())
        .collect();
    let n = lat.len();
    let mut res = ObjectiveResult {
        name,
        kind: ResultKind::Latency,
        probe: probe.to_string(),
        limit: limit_ns as f64 / NS,
        window: Some(window),
        ..Default::default()
    };
    match percentile(&mut lat, pct) {
        None => {
            res.detail = format!("no passing sample to measure {over}");
        }
        Some(v) => {
            res.value = Some(v as f64 / NS);
            res.passed = v <= limit_ns;
            res.detail = format!("p{pct} of {n} passing samples {over}");
        }
    }
    res
}

/// Time to detect: the first failing sample after the injection.
pub fn detect(
    name: String,
    probe: &str,
    samples: &[&Sample],
    inject_ns: u64,
    limit_ns: u64,
    error_ns: u64,
) -> ObjectiveResult {
    let mut res = ObjectiveResult {
        name,
        kind: ResultKind::Detect,
        probe: probe.to_string(),
        limit: limit_ns as f64 / NS,
        error_bar: Some(error_ns as f64 / NS),
        anchor_ns: Some(inject_ns),
        ..Default::default()
    };
    match samples.iter().find(|s| !s.ok) {
        None => {
            res.detail = format!(
                "{probe} never failed in {} samples after the injection: nothing detected the fault",
                samples.len()
            );
        }
        Some(s) => {
            let v = s.t_ns.saturating_sub(inject_ns);
            res.detect_ns = Some(s.t_ns);
            res.value = Some(v as f64 / NS);
            res.passed = v <= limit_ns;
            res.detail = format!(
                "{probe} failed {:.3}s after the injection{}",
                v as f64 / NS,
                s.error
                    .as_ref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            );
        }
    }
    res
}

/// What [`health_truth`] decides on.
pub struct HealthTruthInput<'a> {
    pub name: String,
    pub health: &'a str,
    pub truth: &'a str,
    pub lying_ns: u64,
    pub false_alarm_ns: u64,
    pub lying_periods: usize,
    /// Both probes' intervals: each edge of a period is that uncertain.
    pub error_ns: u64,
    pub max_lying: std::time::Duration,
    pub max_false_alarm: Option<std::time::Duration>,
    pub window: Window,
}

pub fn health_truth(i: HealthTruthInput) -> ObjectiveResult {
    let lying = i.lying_ns as f64 / NS;
    let alarm = i.false_alarm_ns as f64 / NS;
    let lying_ok = i.lying_ns <= i.max_lying.as_nanos() as u64;
    let alarm_ok = i
        .max_false_alarm
        .is_none_or(|m| i.false_alarm_ns <= m.as_nanos() as u64);
    let mut detail = format!(
        "{} passed while {} failed for {lying:.3}s ({} period{}); failed while it passed for {alarm:.3}s, {}",
        i.health,
        i.truth,
        i.lying_periods,
        if i.lying_periods == 1 { "" } else { "s" },
        window_text(&i.window)
    );
    if !lying_ok {
        detail.push_str(&format!(
            ": {} lies (over the {} allowed)",
            i.health,
            gpuchaos_proto::spec::HumanDuration(i.max_lying)
        ));
    } else if !alarm_ok {
        detail.push_str(": too many false alarms");
    }
    ObjectiveResult {
        name: i.name,
        kind: ResultKind::HealthTruth,
        probe: i.health.to_string(),
        passed: lying_ok && alarm_ok,
        value: Some(lying),
        limit: i.max_lying.as_secs_f64(),
        error_bar: Some((i.error_ns * i.lying_periods.max(1) as u64) as f64 / NS),
        detail,
        window: Some(i.window),
        ..Default::default()
    }
}

pub fn safety(name: String, probe: &str, samples: &[&Sample], max_unsafe: u64) -> ObjectiveResult {
    let unsafe_n = samples.iter().filter(|s| s.unsafe_output).count() as u64;
    ObjectiveResult {
        name,
        kind: ResultKind::Safety,
        probe: probe.to_string(),
        passed: unsafe_n <= max_unsafe,
        value: Some(unsafe_n as f64),
        limit: max_unsafe as f64,
        detail: format!(
            "{unsafe_n} unsafe output{} got through in {} canary samples",
            if unsafe_n == 1 { "" } else { "s" },
            samples.len()
        ),
        ..Default::default()
    }
}

/// Folds one objective's per-trial results into its summary.
pub fn summarize(results: &[&ObjectiveResult], unit: &str, limit_text: String) -> ObjectiveSummary {
    let mut values: Vec<f64> = results.iter().filter_map(|r| r.value).collect();
    values.sort_by(f64::total_cmp);
    let median = if values.is_empty() {
        None
    } else if values.len() % 2 == 1 {
        Some(values[values.len() / 2])
    } else {
        Some((values[values.len() / 2 - 1] + values[values.len() / 2]) / 2.0)
    };
    let passed = results.iter().filter(|r| r.passed).count();
    let failing: Vec<String> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.passed)
        .map(|(i, r)| format!("trial {}: {}", i + 1, r.detail))
        .collect();
    let first = results.first();
    ObjectiveSummary {
        name: first.map(|r| r.name.clone()).unwrap_or_default(),
        kind: first.map(|r| r.kind).unwrap_or_default(),
        probe: first.map(|r| r.probe.clone()).unwrap_or_default(),
        passed: !results.is_empty() && passed == results.len(),
        evaluated: !results.is_empty(),
        unit: unit.to_string(),
        limit_text,
        limit: first.map(|r| r.limit).unwrap_or_default(),
        trials: results.len(),
        trials_passed: passed,
        min: values.first().copied(),
        median,
        max: values.last().copied(),
        error_bar: results.iter().filter_map(|r| r.error_bar).reduce(f64::max),
        detail: if failing.is_empty() {
            first.map(|r| r.detail.clone()).unwrap_or_default()
        } else {
            failing.join("; ")
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// A probe sampled every 100 ms from 0 to `until`, failing in [down, up).
    fn series(down: u64, up: u64, until: u64) -> Vec<Sample> {
        (0..until / (100 * MS))
            .map(|i| {
                let t = i * 100 * MS;
                Sample {
                    probe: 0,
                    t_ns: t,
                    end_ns: t + 5 * MS,
                    ok: !(down..up).contains(&t),
                    ..Default::default()
                }
            })
            .collect()
    }

    fn input<'a>(s: &'a [Sample], inject: u64, end: Option<u64>, anchor_end: bool) -> RtoInput<'a> {
        RtoInput {
            name: "rto".into(),
            probe_name: "p",
            samples: window(s, 0, inject, u64::MAX),
            inject_ns: inject,
            end_ns: end,
            anchor_end,
            consecutive: 3,
            tolerate: None,
            limit_ns: 3_000 * MS,
            error_ns: 100 * MS,
        }
    }

    #[test]
    fn rto_is_measured_from_the_anchor_to_the_first_of_n_passes() {
        // Down from 1.05 s (first failing sample at 1.1 s) to 3.05 s.
        let s = series(1_050 * MS, 3_050 * MS, 6_000 * MS);
        let r = rto(input(&s, 1_050 * MS, Some(3_050 * MS), false));
        assert!(r.passed, "{r:?}");
        assert_eq!(r.detect_ns, Some(1_100 * MS));
        assert_eq!(r.recovered_ns, Some(3_105 * MS));
        assert!((r.value.unwrap() - 2.055).abs() < 1e-9);
        let r = rto(input(&s, 1_050 * MS, Some(3_050 * MS), true));
        assert!((r.value.unwrap() - 0.055).abs() < 1e-9);
    }

    #[test]
    fn flapping_moves_recovery_to_after_the_last_failure() {
        let mut s = series(1_000 * MS, 2_000 * MS, 6_000 * MS);
        // One more failure at 2.5 s: recovery is the sample after it.
        s[25].ok = false;
        let r = rto(input(&s, 900 * MS, None, false));
        assert_eq!(r.recovered_ns, Some(2_605 * MS));
        // Two passes before a failure do not count as recovered with consecutive 3.
        let mut s = series(1_000 * MS, 2_000 * MS, 6_000 * MS);
        s[22].ok = false;
        let r = rto(input(&s, 900 * MS, None, false));
        assert_eq!(r.recovered_ns, Some(2_305 * MS));
    }

    #[test]
    fn no_recovery_fails_and_says_how_long() {
        let s = series(1_000 * MS, 10_000 * MS, 6_000 * MS);
        let r = rto(input(&s, 1_000 * MS, None, false));
        assert!(!r.passed);
        assert_eq!(r.value, None);
        assert!(r.detail.contains("not recovered"), "{}", r.detail);
        // Recovered, but too late.
        let s = series(1_000 * MS, 4_500 * MS, 8_000 * MS);
        let r = rto(input(&s, 1_000 * MS, None, false));
        assert!(!r.passed);
        assert!((r.value.unwrap() - 3.505).abs() < 1e-9);
    }

    #[test]
    fn no_disruption_is_zero() {
        let s = series(0, 0, 3_000 * MS);
        let r = rto(input(&s, 1_000 * MS, None, false));
        assert!(r.passed);
        assert_eq!(r.value, Some(0.0));
        assert_eq!(r.detect_ns, None);
    }

    #[test]
    fn availability_latency_safety() {
        let s = series(1_000 * MS, 2_000 * MS, 5_000 * MS);
        let w = window(&s, 0, 0, 5_000 * MS);
        let win = || Window {
            from_ns: 0,
            to_ns: 5_000 * MS,
            covers: "first fault verified → method end".into(),
        };
        let a = availability("a".into(), "p", &w, 0.9, win());
        assert!(
            a.detail
                .contains("over 0.0s–5.0s of the run (first fault verified → method end)"),
            "{}",
            a.detail
        );
        assert!((a.value.unwrap() - 0.8).abs() < 1e-9);
        assert!(!a.passed);
        let l = latency("l".into(), "p", &w, 99.0, 10 * MS, win());
        assert_eq!(l.value, Some(0.005));
        assert!(l.passed);
        let mut unsafe_s = s.clone();
        unsafe_s[3].unsafe_output = true;
        let w = window(&unsafe_s, 0, 0, u64::MAX);
        let r = safety("s".into(), "p", &w, 0);
        assert!(!r.passed);
        assert_eq!(r.value, Some(1.0));
        assert_eq!(percentile(&mut [5, 1, 3, 2, 4], 50.0), Some(3));
        assert_eq!(percentile(&mut [5, 1, 3, 2, 4], 100.0), Some(5));
        assert_eq!(percentile(&mut [], 50.0), None);
    }

    #[test]
    fn detect_and_health_truth_decide_and_say_why() {
        let s = series(1_050 * MS, 3_050 * MS, 6_000 * MS);
        let w = window(&s, 0, 1_000 * MS, u64::MAX);
        let d = detect("d".into(), "p", &w, 1_000 * MS, 200 * MS, 100 * MS);
        assert!(d.passed, "{d:?}");
        assert_eq!(d.detect_ns, Some(1_100 * MS));
        assert!((d.value.unwrap() - 0.1).abs() < 1e-9);
        let d = detect("d".into(), "p", &w, 1_000 * MS, 50 * MS, 100 * MS);
        assert!(!d.passed);
        let calm = series(0, 0, 6_000 * MS);
        let w = window(&calm, 0, 1_000 * MS, u64::MAX);
        let d = detect("d".into(), "p", &w, 1_000 * MS, 10_000 * MS, 100 * MS);
        assert!(!d.passed && d.value.is_none());
        assert!(
            d.detail.contains("nothing detected the fault"),
            "{}",
            d.detail
        );

        let input = |lying_ns, false_alarm_ns| HealthTruthInput {
            name: "h".into(),
            health: "health",
            truth: "chat",
            lying_ns,
            false_alarm_ns,
            lying_periods: 1,
            error_ns: 200 * MS,
            max_lying: std::time::Duration::from_secs(1),
            max_false_alarm: Some(std::time::Duration::from_secs(2)),
            window: Window {
                from_ns: 0,
                to_ns: 10_000 * MS,
                covers: "the whole trial".into(),
            },
        };
        let h = health_truth(input(5_000 * MS, 0));
        assert!(!h.passed);
        assert_eq!(h.value, Some(5.0));
        assert!(h.detail.contains("health lies"), "{}", h.detail);
        let h = health_truth(input(500 * MS, 3_000 * MS));
        assert!(!h.passed);
        assert!(h.detail.contains("false alarms"), "{}", h.detail);
        assert!(health_truth(input(500 * MS, 1_000 * MS)).passed);
    }

    #[test]
    fn summaries_take_min_median_max() {
        let mk = |v: f64, ok: bool| ObjectiveResult {
            name: "x".into(),
            kind: ResultKind::Rto,
            value: Some(v),
            passed: ok,
            detail: format!("v={v}"),
            ..Default::default()
        };
        let rs = [mk(2.0, true), mk(1.0, true), mk(4.0, false)];
        let refs: Vec<&ObjectiveResult> = rs.iter().collect();
        let s = summarize(&refs, "s", "≤ 3s".into());
        assert_eq!((s.min, s.median, s.max), (Some(1.0), Some(2.0), Some(4.0)));
        assert!(!s.passed);
        assert_eq!(s.trials_passed, 2);
        assert!(s.detail.contains("trial 3: v=4"), "{}", s.detail);
    }
}

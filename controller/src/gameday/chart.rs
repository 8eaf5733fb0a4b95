//! Trend charts for the game-day page: each objective's measured value per run
//! against its limit, as inline SVG (no scripts, no external resources).
//!
//! One slot per run, oldest on the left. A passed measurement is a green dot, a
//! failed one a red cross (shape *and* colour, so it reads in greyscale); a run
//! that did not evaluate the objective is a grey band and a break in the line. The
//! limit is a dashed line (a step where the game day's limit changed) with the
//! failing side tinted. At most [`MAX_RUNS`] runs are drawn: the latest, and the
//! axis says so.
//!
//! The data comes from the runs' summaries (`run.json`, kept whole in the index),
//! which hold each objective's measurement, verdict and limit text; the limit's
//! value is read back from that text (`≤ 10s`, `≥ 99.00%`, `p99 ≤ 500ms`,
//! `≤ 0 unsafe`), so no schema change was needed.

use std::fmt::Write as _;

use jiff::Timestamp;
use jiff::tz::TimeZone;

use super::history::GamedayRun;
use crate::report::{escape, format_value};

/// How many runs a chart shows at most (the latest ones).
pub const MAX_RUNS: usize = 60;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 250.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 96.0;
const TOP: f64 = 12.0;
const PLOT_BOTTOM: f64 = HEIGHT - 52.0;

/// The chart's CSS (the page's own style sheet carries it).
pub const CSS: &str = ".trends{display:flex;flex-wrap:wrap;gap:8px 24px}.trend-box{margin:0}\
.trend-box h4{margin:8px 0 2px;font-size:14px}svg.trend{max-width:100%;height:auto;font:11px system-ui,sans-serif}\
.t-plot{fill:#fff;stroke:#d1d5db}.t-grid{stroke:#e5e7eb}.t-axis{stroke:#6b7280}.t-lbl{fill:#374151}\
.t-zone{fill:#dc2626;fill-opacity:.06}.t-limit{stroke:#b91c1c;stroke-width:1.5;stroke-dasharray:6 4}.t-llbl{fill:#b91c1c}\
.t-val{fill:none;stroke:#2563eb;stroke-width:1.5}.t-gap{fill:#9ca3af;fill-opacity:.22}\
.pt.ok{fill:#16a34a;stroke:#fff;stroke-width:1}.pt.fail{fill:none;stroke:#dc2626;stroke-width:2.5;stroke-linecap:round}\
.t-legend{font-size:12px;color:#374151;margin:0 0 4px}.t-legend svg{vertical-align:middle;margin:0 3px 0 10px}";

/// Which side of the limit passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    AtMost,
    AtLeast,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    /// In the objective's unit (seconds, a ratio, a count).
    pub value: f64,
    pub bound: Bound,
}

/// One run's slot in a chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Slot {
    pub run_id: String,
    pub started_unix_ms: i64,
    /// None: the run did not evaluate the objective (a gap).
    pub value: Option<f64>,
    pub passed: bool,
    pub limit: Option<Limit>,
    pub limit_text: String,
}

/// One objective of one experiment over the runs shown.
#[derive(Debug, Clone, PartialEq)]
pub struct Trend {
    pub experiment: String,
    /// 0 for the first time the experiment appears in a game day, 1 for the second...
    pub occurrence: usize,
    pub objective: String,
    pub kind: String,
    pub unit: String,
    /// Oldest first, one per run shown.
    pub slots: Vec<Slot>,
    /// How many runs the game day has in all (more than `slots` when capped).
    pub total_runs: usize,
}

impl Trend {
    pub fn title(&self) -> String {
        if self.occurrence == 0 {
            format!("{} · {}", self.experiment, self.objective)
        } else {
            format!(
                "{} #{} · {}",
                self.experiment,
                self.occurrence + 1,
                self.objective
            )
        }
    }
}

/// The trends of a game day's runs (`runs` newest first, as the history lists
/// them: only runs that ran), the latest [`MAX_RUNS`] of them; `total_runs` is how
/// many the game day has in all. Objectives come in the order the newest run has
/// them, then any older ones.
pub fn trends(runs: &[GamedayRun], total_runs: usize) -> Vec<Trend> {
    let shown: Vec<&GamedayRun> = runs.iter().take(MAX_RUNS).rev().collect();
    // The series keys, newest run first.
    let mut keys: Vec<(String, usize, String, String, String)> = Vec::new();
    for run in shown.iter().rev() {
        for (exp, occ, o) in objectives_of(run) {
            if !keys
                .iter()
                .any(|k| k.0 == exp.name && k.1 == occ && k.2 == o.name)
            {
                keys.push((
                    exp.name.clone(),
                    occ,
                    o.name.clone(),
                    o.kind.clone(),
                    o.unit.clone(),
                ));
            }
        }
    }
    keys.into_iter()
        .map(|(experiment, occurrence, objective, kind, unit)| {
            let slots = shown
                .iter()
                .map(|run| {
                    let o = objectives_of(run)
                        .find(|(e, occ, o)| {
                            e.name == experiment && *occ == occurrence && o.name == objective
                        })
                        .map(|(_, _, o)| o);
                    Slot {
                        run_id: run.id.clone(),
                        started_unix_ms: run.started_unix_ms,
                        value: o.and_then(|o| o.measured).filter(|v| v.is_finite()),
                        passed: o.is_some_and(|o| o.passed),
                        limit: o.and_then(|o| parse_limit(&o.limit, &o.unit)),
                        limit_text: o.map(|o| o.limit.clone()).unwrap_or_default(),
                    }
                })
                .collect();
            Trend {
                experiment,
                occurrence,
                objective,
                kind,
                unit,
                slots,
                total_runs: total_runs.max(shown.len()),
            }
        })
        .collect()
}

/// A run's objectives with their experiment and its occurrence in the run.
fn objectives_of(
    run: &GamedayRun,
) -> impl Iterator<
    Item = (
        &super::history::ExperimentOutcome,
        usize,
        &super::history::ObjectiveOutcome,
    ),
> {
    run.experiments.iter().enumerate().flat_map(move |(i, e)| {
        let occ = run.experiments[..i]
            .iter()
            .filter(|p| p.name == e.name)
            .count();
        e.objectives.iter().map(move |o| (e, occ, o))
    })
}

/// The limit's value from its text, in the objective's unit: `≤ 10s`, `≤ 1m 30s`,
/// `p99 ≤ 500ms` (seconds), `≥ 99.00%` (a ratio), `≤ 0 unsafe` (a count).
pub fn parse_limit(text: &str, unit: &str) -> Option<Limit> {
    let (bound, rest) = if let Some((_, r)) = text.split_once('≤') {
        (Bound::AtMost, r)
    } else if let Some((_, r)) = text.split_once('≥') {
        (Bound::AtLeast, r)
    } else {
        return None;
    };
    let rest = rest.trim();
    let value = match unit {
        "s" => match humantime::parse_duration(rest) {
            Ok(d) => d.as_secs_f64(),
            Err(_) => rest.strip_suffix('s')?.trim().parse().ok()?,
        },
        "ratio" => match rest.strip_suffix('%') {
            Some(p) => p.trim().parse::<f64>().ok()? / 100.0,
            None => rest.parse().ok()?,
        },
        _ => rest.split_whitespace().next()?.parse().ok()?,
    };
    value.is_finite().then_some(Limit { value, bound })
}

/// A 1, 2 or 5 × 10ⁿ step at least `raw`.
fn nice_step(raw: f64) -> f64 {
    let raw = raw.max(1e-9);
    let magnitude = 10f64.powf(raw.log10().floor());
    let norm = raw / magnitude;
    let factor = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .find(|f| norm <= f * (1.0 + 1e-9))
        .unwrap_or(10.0);
    factor * magnitude
}

/// The y range (lo, hi, step): every value and limit inside with some room, from
/// zero when nothing is negative and zero is not far off, never past 100% for a
/// ratio whose values stay within it.
fn y_range(values: &[f64], unit: &str) -> (f64, f64, f64) {
    let (mut lo, mut hi) = values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
            (l.min(*v), h.max(*v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0, 0.5);
    }
    let non_negative = lo >= 0.0;
    // Seconds and counts read best from zero; a ratio near 100% does not.
    if non_negative && unit != "ratio" {
        lo = 0.0;
    }
    let span = hi - lo;
    let pad = if span > 0.0 {
        span * 0.08
    } else if hi != 0.0 {
        hi.abs() * 0.1
    } else {
        1.0
    };
    let ratio_top = unit == "ratio" && hi <= 1.0;
    hi += pad;
    if lo != 0.0 || unit == "ratio" {
        lo -= pad;
    }
    if non_negative {
        lo = lo.max(0.0);
    }
    if ratio_top {
        hi = hi.min(1.0);
    }
    let step = nice_step((hi - lo) / 4.0);
    let lo = (lo / step + 1e-9).floor() * step;
    let mut hi = (hi / step - 1e-9).ceil() * step;
    if ratio_top {
        hi = hi.min(1.0);
    }
    if hi <= lo {
        hi = lo + step;
    }
    (lo, hi, step)
}

/// A tick label: as many decimals as the step needs.
fn tick_label(v: f64, step: f64, unit: &str) -> String {
    let (v, step, suffix) = match unit {
        "ratio" => (v * 100.0, step * 100.0, "%"),
        "s" => (v, step, "s"),
        _ => (v, step, ""),
    };
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10() - 1e-9).ceil() as usize
    };
    format!("{v:.decimals$}{suffix}")
}

/// The y axis's title: what is measured, in which unit.
fn y_title(t: &Trend) -> String {
    let what = match t.kind.as_str() {
        "rto" => "RTO".to_string(),
        "latency" => {
            // "p99 ≤ 500ms": the percentile is part of what is measured.
            let p = t
                .slots
                .iter()
                .rev()
                .map(|s| s.limit_text.as_str())
                .find(|l| !l.is_empty())
                .and_then(|l| l.split_once('≤').map(|(p, _)| p.trim()))
                .filter(|p| !p.is_empty());
            match p {
                Some(p) => format!("latency {p}"),
                None => "latency".into(),
            }
        }
        "safety" => "unsafe outputs".into(),
        "availability" => "availability".into(),
        "steady-state" => "steady state back".into(),
        other => other.into(),
    };
    let unit = match t.unit.as_str() {
        "s" => "s",
        "ratio" => "%",
        "count" => "count",
        other => other,
    };
    format!("{what} ({unit})")
}

fn date(ms: i64, tz: &TimeZone) -> String {
    Timestamp::from_millisecond(ms)
        .map(|t| t.to_zoned(tz.clone()).strftime("%Y-%m-%d").to_string())
        .unwrap_or_default()
}

fn when(ms: i64, tz: &TimeZone) -> String {
    Timestamp::from_millisecond(ms)
        .map(|t| {
            t.to_zoned(tz.clone())
                .strftime("%Y-%m-%d %H:%M %Z")
                .to_string()
        })
        .unwrap_or_default()
}

/// The chart of one trend as an `<svg>` element; `id` (letters, digits and `-`)
/// makes its title's id unique on the page; times are shown in `tz` (named
/// `tz_name`).
pub fn svg(t: &Trend, id: &str, tz: &TimeZone, tz_name: &str) -> String {
    let n = t.slots.len().max(1);
    let plot_w = WIDTH - LEFT - RIGHT;
    let slot_w = plot_w / n as f64;
    let x = |i: usize| LEFT + (i as f64 + 0.5) * slot_w;
    let mut ys: Vec<f64> = t.slots.iter().filter_map(|s| s.value).collect();
    ys.extend(t.slots.iter().filter_map(|s| s.limit.map(|l| l.value)));
    let (lo, hi, step) = y_range(&ys, &t.unit);
    let y = |v: f64| PLOT_BOTTOM - (v - lo) / (hi - lo) * (PLOT_BOTTOM - TOP);
    let fmt = |v: f64| format_value(v, &t.unit);

    let failed = t
        .slots
        .iter()
        .filter(|s| s.value.is_some() && !s.passed)
        .count();
    let gaps = t.slots.iter().filter(|s| s.value.is_none()).count();
    let which = if t.total_runs > t.slots.len() {
        format!("the last {} of {} runs", t.slots.len(), t.total_runs)
    } else if t.slots.len() == 1 {
        "the only run".to_string()
    } else {
        format!("all {} runs", t.slots.len())
    };
    let latest = t.slots.iter().rev().find_map(|s| s.value);
    let limit_text = t
        .slots
        .iter()
        .rev()
        .map(|s| s.limit_text.as_str())
        .find(|l| !l.is_empty())
        .unwrap_or("");
    let title = format!(
        "{} ({}) over {which}",
        t.title(),
        y_title(t).replace(" (", ", ").trim_end_matches(')')
    );
    let desc = format!(
        "{} measured, {failed} failed, {gaps} not evaluated; latest {}; limit {}",
        t.slots.len() - gaps,
        latest.map(fmt).unwrap_or_else(|| "none".into()),
        if limit_text.is_empty() {
            "unknown"
        } else {
            limit_text
        }
    );

    let mut h = String::new();
    let _ = writeln!(
        h,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"trend\" id=\"{id}\" width=\"{WIDTH}\" height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" aria-labelledby=\"{id}-t {id}-d\" data-runs=\"{}\" data-failed=\"{failed}\" data-gaps=\"{gaps}\">\n<title id=\"{id}-t\">{}</title>\n<desc id=\"{id}-d\">{}</desc>",
        t.slots.len(),
        escape(&title),
        escape(&desc)
    );
    let _ = writeln!(
        h,
        "<rect class=\"t-plot\" x=\"{LEFT}\" y=\"{TOP}\" width=\"{plot_w:.1}\" height=\"{:.1}\"/>",
        PLOT_BOTTOM - TOP
    );

    // Not evaluated: a grey band over the run's slot.
    for (i, s) in t.slots.iter().enumerate() {
        if s.value.is_none() {
            let _ = writeln!(
                h,
                "<rect class=\"t-gap\" data-run-id=\"{run}\" x=\"{:.2}\" y=\"{TOP}\" width=\"{:.2}\" height=\"{:.1}\"><title>{run}, {}: not evaluated</title></rect>",
                x(i) - slot_w / 2.0,
                slot_w,
                PLOT_BOTTOM - TOP,
                escape(&when(s.started_unix_ms, tz)),
                run = escape(&s.run_id),
            );
        }
    }

    // The y grid and its labels.
    let ticks = ((hi - lo) / step + 1e-6).floor() as usize;
    for k in 0..=ticks {
        let v = lo + k as f64 * step;
        let ty = y(v);
        let _ = writeln!(
            h,
            "<line class=\"t-grid\" x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{ty:.2}\" y2=\"{ty:.2}\"/><text class=\"t-lbl\" x=\"{:.1}\" y=\"{:.2}\" text-anchor=\"end\">{}</text>",
            LEFT + plot_w,
            LEFT - 6.0,
            ty + 4.0,
            escape(&tick_label(v, step, &t.unit))
        );
    }

    // The limit: one dashed segment per stretch of runs with the same limit, the
    // failing side tinted.
    let mut i = 0;
    while i < t.slots.len() {
        let Some(l) = t.slots[i].limit else {
            i += 1;
            continue;
        };
        let mut j = i + 1;
        while j < t.slots.len() && (t.slots[j].limit.is_none() || t.slots[j].limit == Some(l)) {
            j += 1;
        }
        let (x1, x2) = (x(i) - slot_w / 2.0, x(j - 1) + slot_w / 2.0);
        let ly = y(l.value);
        let (zy, zh) = match l.bound {
            Bound::AtMost => (TOP, ly - TOP),
            Bound::AtLeast => (ly, PLOT_BOTTOM - ly),
        };
        let text = &t.slots[i].limit_text;
        let _ = writeln!(
            h,
            "<rect class=\"t-zone\" x=\"{x1:.2}\" y=\"{zy:.2}\" width=\"{:.2}\" height=\"{:.2}\"/>\n<line class=\"t-limit\" data-limit=\"{}\" x1=\"{x1:.2}\" x2=\"{x2:.2}\" y1=\"{ly:.2}\" y2=\"{ly:.2}\"><title>limit {}</title></line>",
            x2 - x1,
            zh.max(0.0),
            l.value,
            escape(text)
        );
        if j == t.slots.len() {
            let _ = writeln!(
                h,
                "<text class=\"t-llbl\" x=\"{:.1}\" y=\"{:.2}\">limit {}</text>",
                x2 + 6.0,
                ly + 4.0,
                escape(text)
            );
        }
        i = j;
    }

    // The measurements: a line broken at every gap, then the markers over it.
    let mut segment: Vec<String> = Vec::new();
    let mut lines = Vec::new();
    for (i, s) in t.slots.iter().enumerate() {
        match s.value {
            Some(v) => segment.push(format!("{:.2},{:.2}", x(i), y(v))),
            None => lines.push(std::mem::take(&mut segment)),
        }
    }
    lines.push(segment);
    for seg in lines.iter().filter(|s| s.len() > 1) {
        let _ = writeln!(
            h,
            "<polyline class=\"t-val\" points=\"{}\"/>",
            seg.join(" ")
        );
    }
    let r = (slot_w * 0.35).clamp(2.0, 4.5);
    for (i, s) in t.slots.iter().enumerate() {
        let Some(v) = s.value else { continue };
        let (px, py) = (x(i), y(v));
        let tip = format!(
            "{}, {}: {}, {} (limit {})",
            s.run_id,
            when(s.started_unix_ms, tz),
            fmt(v),
            if s.passed { "passed" } else { "FAILED" },
            s.limit_text
        );
        if s.passed {
            let _ = writeln!(
                h,
                "<circle class=\"pt ok\" data-run-id=\"{}\" data-value=\"{v}\" cx=\"{px:.2}\" cy=\"{py:.2}\" r=\"{r:.2}\"><title>{}</title></circle>",
                escape(&s.run_id),
                escape(&tip)
            );
        } else {
            let d = r + 0.5;
            let _ = writeln!(
                h,
                "<path class=\"pt fail\" data-run-id=\"{}\" data-value=\"{v}\" d=\"M{px:.2} {py:.2}m{:.2} {:.2}l{:.2} {:.2}m0 {:.2}l{:.2} {:.2}\"><title>{}</title></path>",
                escape(&s.run_id),
                -d,
                -d,
                2.0 * d,
                2.0 * d,
                -2.0 * d,
                -2.0 * d,
                2.0 * d,
                escape(&tip)
            );
        }
    }

    // The axes: y titled with what is measured and its unit, x with dates.
    let _ = writeln!(
        h,
        "<line class=\"t-axis\" x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{PLOT_BOTTOM}\" y2=\"{PLOT_BOTTOM}\"/><line class=\"t-axis\" x1=\"{LEFT}\" x2=\"{LEFT}\" y1=\"{TOP}\" y2=\"{PLOT_BOTTOM}\"/>",
        LEFT + plot_w
    );
    let _ = writeln!(
        h,
        "<text class=\"t-lbl\" transform=\"translate(14 {:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        (TOP + PLOT_BOTTOM) / 2.0,
        escape(&y_title(t))
    );
    // About one date label per 110 px, always the first and the last run.
    let labels = ((plot_w / 110.0) as usize).clamp(1, 6);
    let mut at: Vec<usize> = (0..labels)
        .map(|k| {
            if labels == 1 {
                n - 1
            } else {
                (k * (n - 1) + (labels - 1) / 2) / (labels - 1)
            }
        })
        .collect();
    at.dedup();
    for i in at {
        if let Some(s) = t.slots.get(i) {
            let _ = writeln!(
                h,
                "<line class=\"t-axis\" x1=\"{0:.2}\" x2=\"{0:.2}\" y1=\"{PLOT_BOTTOM}\" y2=\"{1:.1}\"/><text class=\"t-lbl\" x=\"{0:.2}\" y=\"{2:.1}\" text-anchor=\"middle\">{3}</text>",
                x(i),
                PLOT_BOTTOM + 4.0,
                PLOT_BOTTOM + 16.0,
                escape(&date(s.started_unix_ms, tz))
            );
        }
    }
    let _ = writeln!(
        h,
        "<text class=\"t-lbl\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">run start ({}), oldest to newest: {which}</text>",
        LEFT + plot_w / 2.0,
        HEIGHT - 12.0,
        escape(tz_name)
    );
    h.push_str("</svg>\n");
    h
}

/// The legend under a game day's charts, drawn with the charts' own marks.
pub fn legend() -> String {
    "<p class=\"t-legend\">\
<svg width=\"12\" height=\"12\" viewBox=\"0 0 12 12\" aria-hidden=\"true\"><circle class=\"pt ok\" cx=\"6\" cy=\"6\" r=\"4.5\"/></svg>passed\
<svg width=\"12\" height=\"12\" viewBox=\"0 0 12 12\" aria-hidden=\"true\"><path class=\"pt fail\" d=\"M2 2l8 8m0 -8l-8 8\"/></svg>failed\
<svg width=\"14\" height=\"12\" viewBox=\"0 0 14 12\" aria-hidden=\"true\"><rect class=\"t-gap\" x=\"2\" y=\"0\" width=\"10\" height=\"12\"/></svg>not evaluated\
<svg width=\"22\" height=\"12\" viewBox=\"0 0 22 12\" aria-hidden=\"true\"><line class=\"t-limit\" x1=\"1\" x2=\"21\" y1=\"6\" y2=\"6\"/></svg>limit (failing side tinted)</p>\n"
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::super::history::{ExperimentOutcome, GamedayVerdict, ObjectiveOutcome};
    use super::*;

    fn run(i: usize, value: Option<f64>, name: &str) -> GamedayRun {
        let passed = value.is_some_and(|v| v <= 10.0);
        GamedayRun {
            id: format!("gd-{i:04}"),
            gameday: "gd".into(),
            started_unix_ms: 1_764_000_000_000 + i as i64 * 86_400_000,
            verdict: if passed {
                GamedayVerdict::Passed
            } else {
                GamedayVerdict::Failed
            },
            experiments: vec![ExperimentOutcome {
                seq: 1,
                name: "kill".into(),
                verdict: GamedayVerdict::Passed,
                objectives: value
                    .map(|v| ObjectiveOutcome {
                        name: name.into(),
                        kind: "rto".into(),
                        unit: "s".into(),
                        measured: Some(v),
                        limit: "≤ 10s".into(),
                        passed,
                    })
                    .into_iter()
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// Newest first, as the history lists them.
    fn history(values: &[Option<f64>], name: &str) -> Vec<GamedayRun> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| run(i, *v, name))
            .rev()
            .collect()
    }

    fn count(svg: &str, what: &str) -> usize {
        svg.matches(what).count()
    }

    #[test]
    fn limits_read_back_from_their_text_in_the_objectives_unit() {
        let at_most = |value| {
            Some(Limit {
                value,
                bound: Bound::AtMost,
            })
        };
        assert_eq!(parse_limit("≤ 10s", "s"), at_most(10.0));
        assert_eq!(parse_limit("≤ 1m 30s", "s"), at_most(90.0));
        assert_eq!(parse_limit("p99 ≤ 500ms", "s"), at_most(0.5));
        assert_eq!(parse_limit("≤ 0 unsafe", "count"), at_most(0.0));
        assert_eq!(
            parse_limit("≥ 99.50%", "ratio"),
            Some(Limit {
                value: 0.995,
                bound: Bound::AtLeast
            })
        );
        assert_eq!(parse_limit("≥ 0.5", "ratio").unwrap().value, 0.5);
        assert_eq!(parse_limit("whatever", "s"), None);
    }

    #[test]
    fn one_marker_per_measured_run_failures_crossed_and_gaps_banded() {
        let values = [Some(2.0), Some(12.5), None, Some(3.0), Some(4.0)];
        let tr = trends(&history(&values, "rto"), 5);
        assert_eq!(tr.len(), 1);
        let svg = svg(&tr[0], "t-0", &TimeZone::UTC, "UTC");
        assert_eq!(count(&svg, "class=\"pt ok\""), 3, "{svg}");
        assert_eq!(count(&svg, "class=\"pt fail\" data-run-id=\"gd-0001\""), 1);
        assert_eq!(count(&svg, "class=\"pt fail\""), 1);
        assert_eq!(count(&svg, "class=\"t-gap\" data-run-id=\"gd-0002\""), 1);
        // The line breaks at the gap: two segments.
        assert_eq!(count(&svg, "<polyline"), 2);
        assert!(svg.contains("data-runs=\"5\" data-failed=\"1\" data-gaps=\"1\""));
        assert!(svg.contains("role=\"img\" aria-labelledby=\"t-0-t t-0-d\""));
        assert!(svg.contains("<title id=\"t-0-t\">kill · rto (RTO, s) over all 5 runs</title>"));
        assert!(svg.contains("limit ≤ 10s"));
        assert!(svg.contains(">RTO (s)</text>"));
    }

    #[test]
    fn the_limit_line_sits_where_the_markers_scale_puts_its_value() {
        let tr = trends(&history(&[Some(2.0), Some(6.0)], "rto"), 2);
        let svg = svg(&tr[0], "t", &TimeZone::UTC, "UTC");
        let attr = |tag: &str, name: &str| -> f64 {
            let s = &svg[svg.find(tag).unwrap()..];
            let s = &s[s.find(&format!(" {name}=\"")).unwrap() + name.len() + 3..];
            s[..s.find('"').unwrap()].parse().unwrap()
        };
        let y2 = attr("data-value=\"2\"", "cy");
        let y6 = attr("data-value=\"6\"", "cy");
        let limit = attr("class=\"t-limit\"", "y1");
        let want = y2 + (10.0 - 2.0) * (y6 - y2) / (6.0 - 2.0);
        assert!((limit - want).abs() < 0.05, "limit at {limit}, want {want}");
    }

    #[test]
    fn one_run_sits_in_the_middle_and_hundreds_are_capped_to_the_latest() {
        let one = trends(&history(&[Some(3.0)], "rto"), 1);
        let svg1 = svg(&one[0], "t", &TimeZone::UTC, "UTC");
        let mid = LEFT + (WIDTH - LEFT - RIGHT) / 2.0;
        assert!(svg1.contains(&format!("cx=\"{mid:.2}\"")), "{svg1}");
        assert!(svg1.contains("over the only run"));

        let values: Vec<Option<f64>> = (0..300)
            .map(|i| {
                if i % 10 == 0 {
                    None
                } else {
                    Some((i % 13) as f64)
                }
            })
            .collect();
        let many = trends(&history(&values, "rto"), 300);
        assert_eq!(many[0].slots.len(), MAX_RUNS);
        assert_eq!(many[0].slots.last().unwrap().run_id, "gd-0299");
        assert_eq!(many[0].slots[0].run_id, format!("gd-{:04}", 300 - MAX_RUNS));
        let svg = svg(&many[0], "t", &TimeZone::UTC, "UTC");
        assert!(svg.contains(&format!("the last {MAX_RUNS} of 300 runs")));
        let marks = count(&svg, "class=\"pt ok\"") + count(&svg, "class=\"pt fail\"");
        assert_eq!(marks + count(&svg, "class=\"t-gap\""), MAX_RUNS);
        // Every coordinate stays inside the picture.
        for part in svg.split("cx=\"").skip(1) {
            let v: f64 = part[..part.find('"').unwrap()].parse().unwrap();
            assert!((LEFT..=WIDTH - RIGHT).contains(&v), "{v}");
        }
    }

    #[test]
    fn every_name_is_escaped() {
        let tr = trends(&history(&[Some(1.0)], "<script>alert(1)</script>"), 1);
        let svg = svg(&tr[0], "t", &TimeZone::UTC, "<b>zone</b>");
        assert!(!svg.contains("<script") && !svg.contains("<b>"), "{svg}");
        assert!(svg.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    }

    #[test]
    fn ratios_near_one_are_not_squashed_and_stay_under_100_percent() {
        let (lo, hi, _) = y_range(&[0.995, 0.999, 0.99], "ratio");
        assert!(lo > 0.9 && lo <= 0.99, "{lo}");
        assert!((0.999..=1.0).contains(&hi), "{hi}");
        let (lo, hi, _) = y_range(&[3.0, 3.0], "s");
        assert_eq!(lo, 0.0);
        assert!(hi > 3.0);
        assert_eq!(y_range(&[], "s"), (0.0, 1.0, 0.5));
    }
}

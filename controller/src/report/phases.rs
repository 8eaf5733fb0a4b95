//! The recovery phases of a fault (docs/experiments.md, "Recovery phases") and the
//! objectives' windows and tolerated failures, as every report words them: one
//! place, so that the text table, the Markdown, the HTML and the JUnit say the same.
//!
//! Phase times are shown after the fault's verification (`+2.048s`): where recovery
//! went is read from there, not from the run's start.

use std::fmt::Write;

use super::{agent_name, format_at, format_duration, format_value, trial_results};
use crate::runner::record::{
    FaultRecord, PHASE_NAMES, PhaseDurations, PhaseMark, RunRecord, TrialRecord,
};

/// At most this many times are listed for tolerated failures (then "…").
const MAX_LISTED: usize = 5;

/// Whether the fault has any observed phase (faults without one show no phase table).
pub(crate) fn has_phases(f: &FaultRecord) -> bool {
    f.phases.observed().next().is_some()
}

/// Seconds with their sign: `+2.048s`, `-0.100s`.
pub(crate) fn format_signed(seconds: f64) -> String {
    let sign = if seconds < 0.0 { '-' } else { '+' };
    format!("{sign}{}", format_value(seconds.abs(), "s"))
}

/// Bytes in GiB from 1 GiB on, else in MiB: `2.0 GiB`, `512.0 MiB`.
pub(crate) fn format_bytes(bytes: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    const GIB: f64 = 1024.0 * MIB;
    let b = bytes as f64;
    if b >= GIB {
        format!("{:.1} GiB", b / GIB)
    } else {
        format!("{:.1} MiB", b / MIB)
    }
}

/// A time on the run's timeline, after the fault's verification (`+2.048s`), or on
/// the run's timeline when the fault was never verified.
pub(crate) fn after_verification(f: &FaultRecord, t_ns: u64) -> String {
    match f.inject_ns {
        Some(v) => format_signed((t_ns as f64 - v as f64) / 1e9),
        None => format_at(t_ns),
    }
}

/// What the agent said of a phase: its words, then the pid and the GPU memory when
/// the words do not already say them.
pub(crate) fn agent_detail(m: &PhaseMark) -> String {
    let mut parts = Vec::new();
    let event = m.event.clone().unwrap_or_default();
    if !event.is_empty() {
        parts.push(event.clone());
    }
    if let Some(pid) = m.pid.filter(|p| !event.contains(&p.to_string())) {
        parts.push(format!("pid {pid}"));
    }
    if let Some(bytes) = m.gpu_bytes {
        let text = format_bytes(bytes);
        if !event.contains(&text) {
            parts.push(format!("{text} on the GPU"));
        }
    }
    parts.join(", ")
}

/// What marks a phase: `chat (sample sent)` (a failure counts from the request),
/// `health (sample answered)` (a pass from its answer), or `agent: …`.
pub(crate) fn source(m: &PhaseMark) -> String {
    match &m.probe {
        Some(probe) => {
            let at = if m.sample_t_ns == Some(m.t_ns) {
                "sent"
            } else {
                "answered"
            };
            format!("{probe} (sample {at})")
        }
        None => {
            let detail = agent_detail(m);
            if detail.is_empty() {
                "agent".into()
            } else {
                format!("agent: {detail}")
            }
        }
    }
}

/// The short source a timeline tooltip names: the agent's words, or the probe's.
pub(crate) fn tooltip_source(m: &PhaseMark) -> String {
    if m.probe.is_none() && !agent_detail(m).is_empty() {
        agent_detail(m)
    } else {
        source(m)
    }
}

/// `process-kill on node-a, fault f-1`
pub(crate) fn fault_what(record: &RunRecord, f: &FaultRecord) -> String {
    let mut what = format!("{} on {}", f.kind, agent_name(record, f.agent));
    if !f.id.is_empty() {
        what += &format!(", fault {}", f.id);
    }
    what
}

/// `trial 1 kill-worker (process-kill on node-a, fault f-1)`
pub(crate) fn fault_title(record: &RunRecord, trial: &TrialRecord, f: &FaultRecord) -> String {
    format!(
        "trial {} {} ({})",
        trial.index,
        f.step,
        fault_what(record, f)
    )
}

/// Where the phase times count from: `after its verification at 10.000s`.
pub(crate) fn origin(f: &FaultRecord) -> String {
    match f.inject_ns {
        Some(v) => format!("after its verification at {}", format_at(v)),
        None => "on the run's timeline (never verified)".into(),
    }
}

/// One observed phase, its cells formatted.
pub(crate) struct PhaseRow<'a> {
    pub name: &'static str,
    pub mark: &'a PhaseMark,
    /// After the verification (`+2.048s`).
    pub at: String,
    /// On the run's timeline (`12.048s`).
    pub run_at: String,
    /// The error bar (`0.101s`).
    pub error: String,
    pub from: String,
}

/// The fault's observed phases, in order.
pub(crate) fn rows(f: &FaultRecord) -> Vec<PhaseRow<'_>> {
    f.phases
        .observed()
        .map(|(name, mark)| PhaseRow {
            name,
            mark,
            at: after_verification(f, mark.t_ns),
            run_at: format_at(mark.t_ns),
            error: format_duration(mark.error_ns),
            from: source(mark),
        })
        .collect()
}

/// The phases not observed, each with why when the journal says: `masked (chat did
/// not pass 3 in a row while the fault was active)`.
pub(crate) fn missing(f: &FaultRecord) -> Vec<String> {
    PHASE_NAMES
        .iter()
        .filter(|n| f.phases.get(n).is_none())
        .map(|n| match f.phase_notes.get(*n) {
            Some(note) => format!("{n} ({note})"),
            None => n.to_string(),
        })
        .collect()
}

/// `detect 0.101s · replace 2.048s · cold start 3.454s (load 3.259s, warm-up
/// 0.195s) · first good after ready 0.100s · total 5.501s`, or None when no
/// duration is known.
pub(crate) fn durations(d: &PhaseDurations) -> Option<String> {
    let s = |v: f64| format_value(v, "s");
    let mut parts = Vec::new();
    if let Some(v) = d.detect {
        parts.push(format!("detect {}", s(v)));
    }
    if let Some(v) = d.replace {
        parts.push(format!("replace {}", s(v)));
    }
    let inner: Vec<String> = [("load", d.load), ("warm-up", d.warm_up)]
        .into_iter()
        .filter_map(|(n, v)| v.map(|v| format!("{n} {}", s(v))))
        .collect();
    match d.cold_start {
        Some(v) if inner.is_empty() => parts.push(format!("cold start {}", s(v))),
        Some(v) => parts.push(format!("cold start {} ({})", s(v), inner.join(", "))),
        None => parts.extend(inner),
    }
    if let Some(v) = d.first_good_after_ready {
        parts.push(format!("first good after ready {}", s(v)));
    }
    if let Some(v) = d.total {
        parts.push(format!("total {}", s(v)));
    }
    (!parts.is_empty()).then(|| parts.join(" · "))
}

/// `chat 1 (+15.000s)`: each probe's failures a tolerance let through, or None.
pub(crate) fn isolated(f: &FaultRecord) -> Option<String> {
    let parts: Vec<String> = f
        .probe_phases
        .iter()
        .filter(|p| !p.isolated_failures.is_empty())
        .map(|p| {
            format!(
                "{} {} ({})",
                p.probe,
                p.isolated_failures.len(),
                listed(&p.isolated_failures, |t| after_verification(f, t))
            )
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// The first few times, then "…".
fn listed(times: &[u64], fmt: impl Fn(u64) -> String) -> String {
    let mut text: Vec<String> = times.iter().take(MAX_LISTED).map(|t| fmt(*t)).collect();
    if times.len() > MAX_LISTED {
        text.push("…".into());
    }
    text.join(", ")
}

/// The plain-text phase block of one fault (the end-of-run table and JUnit's
/// system-out), every line ending in a newline; empty when no phase was observed.
pub(crate) fn text_block(record: &RunRecord, trial: &TrialRecord, f: &FaultRecord) -> String {
    if !has_phases(f) {
        return String::new();
    }
    let clean = |s: &str| s.replace(['\n', '\r', '\t'], " ");
    let mut out = format!(
        "phases of trial {} {} ({}; at: {}):\n",
        trial.index,
        clean(&f.step),
        clean(&fault_what(record, f)),
        origin(f)
    );
    let mut table = vec![["phase".to_string(), "at".into(), "±".into(), "from".into()]];
    table.extend(
        rows(f)
            .into_iter()
            .map(|r| [r.name.to_string(), r.at, r.error, clean(&r.from)]),
    );
    let mut widths = [0; 3];
    for row in &table {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in &table {
        let _ = writeln!(
            out,
            "  {:<w0$}  {:<w1$}  {:<w2$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
    }
    let missing = missing(f);
    if !missing.is_empty() {
        let _ = writeln!(out, "  not observed: {}", clean(&missing.join("; ")));
    }
    if let Some(d) = durations(&f.phase_durations) {
        let _ = writeln!(out, "  durations: {d}");
    }
    if let Some(i) = isolated(f) {
        let _ = writeln!(out, "  isolated failures tolerated: {}", clean(&i));
    }
    out
}

/// Notes under an objectives table: which window each figure covers, and how many
/// isolated failures a tolerance let through. One line per objective and note.
pub(crate) fn objective_notes(record: &RunRecord) -> Vec<String> {
    let several = record.trials.len() > 1;
    let mut notes = Vec::new();
    for o in &record.objectives {
        let results: Vec<_> = trial_results(record, &o.name).collect();
        let windows: Vec<_> = results
            .iter()
            .filter_map(|(t, r)| r.window.as_ref().map(|w| (*t, w)))
            .collect();
        if let Some((_, first)) = windows.first() {
            let span = |w: &crate::runner::record::Window| {
                format!(
                    "{}–{}",
                    format_duration(w.from_ns),
                    format_duration(w.to_ns)
                )
            };
            let prefix = |t: u32| {
                if several {
                    format!("trial {t} ")
                } else {
                    String::new()
                }
            };
            let text = if windows.iter().all(|(_, w)| w.covers == first.covers) {
                let spans: Vec<String> = windows
                    .iter()
                    .map(|(t, w)| format!("{}{}", prefix(*t), span(w)))
                    .collect();
                format!("over {} ({})", spans.join(", "), first.covers)
            } else {
                let spans: Vec<String> = windows
                    .iter()
                    .map(|(t, w)| format!("{}over {} ({})", prefix(*t), span(w), w.covers))
                    .collect();
                spans.join("; ")
            };
            notes.push(format!("{}: {text}", o.name));
        }
        let count: usize = results.iter().map(|(_, r)| r.isolated_failures.len()).sum();
        if count > 0 {
            let per: Vec<String> = results
                .iter()
                .filter(|(_, r)| !r.isolated_failures.is_empty())
                .map(|(t, r)| {
                    let at = listed(&r.isolated_failures, |ns| match r.anchor_ns {
                        Some(a) => format_signed((ns as f64 - a as f64) / 1e9),
                        None => format_at(ns),
                    });
                    if several {
                        format!("trial {t}: {at}")
                    } else {
                        at
                    }
                })
                .collect();
            let anchor = if results.iter().any(|(_, r)| r.anchor_ns.is_some()) {
                " after the anchor"
            } else {
                ""
            };
            notes.push(format!(
                "{}: {count} isolated failure{} tolerated ({}{anchor})",
                o.name,
                if count == 1 { "" } else { "s" },
                per.join("; ")
            ));
        }
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::super::fixture;
    use super::*;

    #[test]
    fn formats_signed_times_bytes_and_sources() {
        assert_eq!(format_signed(2.0481), "+2.048s");
        assert_eq!(format_signed(-0.1), "-0.100s");
        assert_eq!(format_signed(41.25), "+41.2s");
        assert_eq!(format_bytes(2 << 30), "2.0 GiB");
        assert_eq!(format_bytes(512 << 20), "512.0 MiB");
        let agent = PhaseMark {
            t_ns: 1,
            event: Some("GPU memory settled".into()),
            pid: Some(4321),
            gpu_bytes: Some(3 << 29),
            ..Default::default()
        };
        assert_eq!(
            source(&agent),
            "agent: GPU memory settled, pid 4321, 1.5 GiB on the GPU"
        );
        let said = PhaseMark {
            event: Some("pid 4321 replaced pid 4242".into()),
            pid: Some(4321),
            ..Default::default()
        };
        assert_eq!(tooltip_source(&said), "pid 4321 replaced pid 4242");
        let sent = PhaseMark {
            t_ns: 5,
            probe: Some("chat".into()),
            sample_t_ns: Some(5),
            ..Default::default()
        };
        assert_eq!(source(&sent), "chat (sample sent)");
        let answered = PhaseMark {
            sample_t_ns: Some(4),
            ..sent
        };
        assert_eq!(source(&answered), "chat (sample answered)");
    }

    #[test]
    fn durations_nest_load_and_warm_up_in_the_cold_start() {
        let d = PhaseDurations {
            detect: Some(0.101),
            replace: Some(2.048),
            load: Some(3.259),
            warm_up: Some(0.195),
            cold_start: Some(3.454),
            first_good_after_ready: Some(0.1),
            total: Some(5.501),
        };
        assert_eq!(
            durations(&d).unwrap(),
            "detect 0.101s · replace 2.048s · cold start 3.454s (load 3.259s, warm-up 0.195s) · first good after ready 0.100s · total 5.501s"
        );
        let partial = PhaseDurations {
            load: Some(3.0),
            first_good_after_ready: Some(-0.2),
            ..Default::default()
        };
        assert_eq!(
            durations(&partial).unwrap(),
            "load 3.000s · first good after ready -0.200s"
        );
        assert_eq!(durations(&PhaseDurations::default()), None);
    }

    #[test]
    fn text_block_lists_phases_after_verification() {
        let record = fixture::record();
        let t = &record.trials[0];
        let block = text_block(&record, t, &t.faults[0]);
        let lines: Vec<_> = block.lines().collect();
        assert_eq!(
            lines[0],
            "phases of trial 1 kill-worker (process-kill on node-a, fault f-1; at: after its verification at 10.000s):"
        );
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            ["phase", "at", "±", "from"]
        );
        assert_eq!(lines.len(), 10, "{block}");
        // Columns line up.
        let col = |l: &str, s: &str| l[..l.find(s).unwrap()].chars().count();
        assert_eq!(col(lines[1], "from"), col(lines[2], "chat"), "{block}");
        assert_eq!(col(lines[1], "at"), col(lines[3], "+2.500s"), "{block}");
        let t2 = &record.trials[1];
        assert_eq!(text_block(&record, t2, &t2.faults[0]), "");
    }

    #[test]
    fn notes_say_windows_and_tolerated_failures() {
        let notes = objective_notes(&fixture::record());
        assert_eq!(
            notes,
            [
                "recovers in time: 1 isolated failure tolerated (trial 1: +15.0s after the anchor)",
                "chat availability: trial 1 over 10.0s–18.1s (first fault verified → chat recovered); trial 2 over 55.0s–100.0s (first fault verified → observation end)",
            ]
        );
    }
}

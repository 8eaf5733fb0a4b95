//! Renders `report.html`: a self-contained page (inline CSS and SVG, no scripts, no
//! external resources) with the verdict, the objectives (and the windows their
//! figures cover), a timeline of probe samples, faults, trials, recovery markers and
//! each fault's recovery phases as ticks, the faults with a phase table each, and
//! the events and agents.
//!
//! Its marks are text glyphs that DejaVu (on every Debian) covers: ✓ U+2713,
//! ✗ U+2717, ⚠ U+26A0 without the emoji selector. Emoji (✅, ❌, ⚠️) came out as
//! boxes in a browser without an emoji font, headless Chromium on a server among
//! them; the Markdown summary keeps them, for GitHub draws its own.

use std::fmt::Write;

use super::phases::{self, has_phases};
use super::{
    OBJECTIVE_COLUMNS, agent_name, escape, format_at, format_duration, format_offset,
    objective_cells, started_at,
};
use crate::runner::record::{PHASE_NAMES, ResultKind, RunRecord, Sample, Verdict};

const WIDTH: f64 = 1100.0;
const LEFT: f64 = 150.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 44.0;
const ROW: f64 = 26.0;
const GAP: f64 = 6.0;
const AXIS: f64 = 30.0;
/// The narrowest sample rect, in px, so that a lone sample stays visible.
const MIN_W: f64 = 1.5;

/// Each recovery phase's colour on the timeline, in [`PHASE_NAMES`] order (the CSS
/// classes `ph-NAME` carry the same).
const PHASE_COLOURS: [&str; 7] = [
    "#e11d48", "#0891b2", "#7c3aed", "#c026d3", "#ea580c", "#65a30d", "#166534",
];

pub(crate) const CSS: &str = "body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1f2937}\
h1{margin:0 0 4px;font-size:22px}h2{font-size:17px;margin:28px 0 8px}\
header{padding:12px 16px;border-radius:6px;border-left:6px solid}\
.v-ok{background:#ecfdf5;border-color:#16a34a}.v-fail{background:#fef2f2;border-color:#dc2626}\
.v-warn{background:#fffbeb;border-color:#d97706}\
.leftovers{background:#fef2f2;border:2px solid #dc2626;padding:8px 16px;margin-top:16px;border-radius:6px}\
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #d1d5db;padding:3px 8px;text-align:left;vertical-align:top}\
th{background:#f3f4f6}tr.pass td:last-child{color:#15803d;font-weight:600}tr.fail td:last-child{color:#b91c1c;font-weight:600}tr.skip td:last-child{color:#6b7280;font-style:italic}\
.tl{overflow-x:auto}svg{font:11px system-ui,sans-serif}.row{fill:#f3f4f6}\
.s-ok{fill:#22c55e}.s-fail{fill:#ef4444}.s-unsafe{fill:#9333ea}\
.fault{fill:#f59e0b;fill-opacity:.18;stroke:#d97706;stroke-opacity:.5}.flbl{fill:#92400e}\
.trial{stroke:#374151;stroke-dasharray:5 4}.axis{stroke:#6b7280}\
.mk{stroke-width:2}.anchor{stroke:#2563eb}.detect{stroke:#b91c1c}.recovered{stroke:#15803d}\
.mkl{paint-order:stroke;stroke:#fff;stroke-width:3px;font-size:10px}\
.legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:middle}\
.ph{stroke-width:3}.ph-agent{stroke-width:2;stroke-dasharray:4 2}\
.ph-detected{stroke:#e11d48}.ph-masked{stroke:#0891b2}.ph-replaced{stroke:#7c3aed}.ph-gpu_ready{stroke:#c026d3}\
.ph-ready{stroke:#ea580c}.ph-first_good{stroke:#65a30d}.ph-recovered{stroke:#166534}\
tr.np td{color:#6b7280}.notes{font-size:13px;margin:6px 0}";

/// The report page.
pub fn html(record: &RunRecord) -> String {
    let (class, icon) = match record.verdict {
        Verdict::Passed => ("v-ok", "✓"),
        Verdict::Failed => ("v-fail", "✗"),
        _ => ("v-warn", "⚠"),
    };
    let title = escape(&format!(
        "gpuchaos: {}: {}",
        record.experiment, record.verdict
    ));
    let mut h = format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title}</title>\n<style>{CSS}</style>\n</head>\n<body>\n\
         <header class=\"{class}\">\n<h1>{icon} {}: {}</h1>\n",
        escape(&record.experiment),
        escape(record.verdict.as_str())
    );
    if !record.description.is_empty() {
        let _ = writeln!(h, "<p>{}</p>", escape(&record.description));
    }
    let _ = writeln!(
        h,
        "<p>exit code <b>{}</b> · duration {} · {} trials · started {} · run seed {} · {} · gpuchaos {}</p>",
        record.exit_code,
        format_duration(record.duration_ns),
        record.trials.len(),
        started_at(record),
        record.run_seed,
        escape(&record.file),
        escape(&record.gpuchaos_version)
    );
    if let Some(reason) = &record.reason {
        let _ = writeln!(h, "<p><b>reason:</b> {}</p>", escape(reason));
    }
    h.push_str("</header>\n");
    if !record.leftovers.is_empty() {
        h.push_str("<div class=\"leftovers\"><p><b>⚠ these faults could not be reverted: something is still broken on the agents; clean up by hand.</b></p><ul>\n");
        for leftover in &record.leftovers {
            let _ = writeln!(h, "<li>{}</li>", escape(leftover));
        }
        h.push_str("</ul></div>\n");
    }

    h.push_str("<h2>objectives</h2>\n");
    table(
        &mut h,
        &[&OBJECTIVE_COLUMNS[..], &["detail", "verdict"]].concat(),
        record.objectives.iter().map(|o| {
            let mut cells = objective_cells(o);
            cells.push(o.detail.clone());
            cells.push(
                match o.verdict_word() {
                    "pass" => "pass",
                    "fail" => "FAIL",
                    _ => "not evaluated",
                }
                .to_string(),
            );
            (
                match o.verdict_word() {
                    "pass" => "pass",
                    "fail" => "fail",
                    _ => "skip",
                },
                cells,
            )
        }),
    );

    let notes = phases::objective_notes(record);
    if !notes.is_empty() {
        h.push_str("<ul class=\"notes\">\n");
        for note in notes {
            let _ = writeln!(h, "<li>{}</li>", escape(&note));
        }
        h.push_str("</ul>\n");
    }

    h.push_str("<h2>timeline</h2>\n<div class=\"tl\">\n");
    timeline(&mut h, record);
    h.push_str(
        "</div>\n<p class=\"legend\"><span style=\"background:#22c55e\"></span>ok\
         <span style=\"background:#ef4444\"></span>failed<span style=\"background:#9333ea\"></span>unsafe output\
         <span style=\"background:#fcd34d\"></span>fault active</p>\n",
    );
    let any_phase = record.trials.iter().flat_map(|t| &t.faults).any(has_phases);
    if any_phase {
        h.push_str("<p class=\"legend\">recovery phases (ticks: solid on the row of the probe that saw it, dashed across every row for what the agent saw):");
        for (name, colour) in PHASE_NAMES.iter().zip(PHASE_COLOURS) {
            let _ = write!(h, "<span style=\"background:{colour}\"></span>{name}");
        }
        h.push_str("</p>\n");
    }

    h.push_str("<h2>faults</h2>\n");
    let at = |ns: Option<u64>| ns.map_or_else(|| "-".to_string(), format_at);
    table(
        &mut h,
        &[
            "trial",
            "step",
            "agent",
            "kind",
            "summary",
            "target",
            "injected at",
            "ended at",
            "end reason",
        ],
        record.trials.iter().flat_map(|t| {
            t.faults.iter().map(move |f| {
                let mut reason = f.end_reason.clone();
                for extra in [&f.error, &f.leftover]
                    .into_iter()
                    .filter(|s| !s.is_empty())
                {
                    reason += &format!(" ({extra})");
                }
                (
                    "",
                    vec![
                        t.index.to_string(),
                        f.step.clone(),
                        agent_name(record, f.agent),
                        f.kind.clone(),
                        f.summary.clone(),
                        f.target.clone(),
                        at(f.inject_ns),
                        at(f.end_ns),
                        reason,
                    ],
                )
            })
        }),
    );

    phase_tables(&mut h, record);

    h.push_str("<h2>events</h2>\n");
    table(
        &mut h,
        &["time", "trial", "kind", "message"],
        record.events.iter().map(|e| {
            let trial = if e.trial == 0 {
                "-".to_string()
            } else {
                e.trial.to_string()
            };
            (
                "",
                vec![
                    format_at(e.t_ns),
                    trial,
                    e.kind.to_string(),
                    e.message.clone(),
                ],
            )
        }),
    );

    h.push_str("<h2>agents</h2>\n");
    table(
        &mut h,
        &["agent", "address", "hostname", "clock offset", "session"],
        record.agents.iter().map(|a| {
            (
                "",
                vec![
                    a.name.clone(),
                    a.address.clone(),
                    a.hostname.clone(),
                    format_offset(a.offset_ns, a.offset_error_ns),
                    a.session_id.clone(),
                ],
            )
        }),
    );
    h.push_str("</body>\n</html>\n");
    h
}

/// Per fault with an observed phase: every phase (the missing ones with why), then
/// the durations.
fn phase_tables(h: &mut String, record: &RunRecord) {
    for t in &record.trials {
        for f in t.faults.iter().filter(|f| has_phases(f)) {
            let _ = writeln!(
                h,
                "<h3>phases of {}</h3>\n<p class=\"notes\">at: {}</p>",
                escape(&phases::fault_title(record, t, f)),
                escape(&phases::origin(f))
            );
            let rows = phases::rows(f);
            table(
                h,
                &["phase", "at", "±", "on the run", "from"],
                PHASE_NAMES
                    .iter()
                    .map(|name| match rows.iter().find(|r| r.name == *name) {
                        Some(r) => (
                            "",
                            vec![
                                name.to_string(),
                                r.at.clone(),
                                r.error.clone(),
                                r.run_at.clone(),
                                r.from.clone(),
                            ],
                        ),
                        None => (
                            "np",
                            vec![
                                name.to_string(),
                                "-".into(),
                                "-".into(),
                                "-".into(),
                                match f.phase_notes.get(*name) {
                                    Some(note) => format!("not observed: {note}"),
                                    None => "not observed".into(),
                                },
                            ],
                        ),
                    }),
            );
            if let Some(d) = phases::durations(&f.phase_durations) {
                let _ = writeln!(h, "<p class=\"notes\"><b>durations:</b> {}</p>", escape(&d));
            }
            if let Some(i) = phases::isolated(f) {
                let _ = writeln!(
                    h,
                    "<p class=\"notes\"><b>isolated failures tolerated:</b> {}</p>",
                    escape(&i)
                );
            }
        }
    }
}

/// Appends a table; `rows` are (row class, cells), every cell escaped.
fn table<'a>(h: &mut String, header: &[&str], rows: impl Iterator<Item = (&'a str, Vec<String>)>) {
    h.push_str("<table>\n<tr>");
    for name in header {
        let _ = write!(h, "<th>{}</th>", escape(name));
    }
    h.push_str("</tr>\n");
    for (class, cells) in rows {
        if class.is_empty() {
            h.push_str("<tr>");
        } else {
            let _ = write!(h, "<tr class=\"{class}\">");
        }
        for cell in cells {
            let _ = write!(h, "<td>{}</td>", escape(&cell));
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table>\n");
}

#[derive(Clone, Copy, PartialEq)]
enum State {
    Ok,
    Failed,
    Unsafe,
}

impl State {
    fn of(sample: &Sample) -> Self {
        if sample.unsafe_output {
            State::Unsafe
        } else if sample.ok {
            State::Ok
        } else {
            State::Failed
        }
    }
}

/// Consecutive samples of one probe in the same state, drawn as one rect.
struct Run<'a> {
    state: State,
    start_ns: u64,
    end_ns: u64,
    samples: usize,
    /// Distinct error messages with their counts (the first few).
    errors: Vec<(&'a str, usize)>,
}

impl<'a> Run<'a> {
    fn new(sample: &'a Sample) -> Self {
        let mut run = Run {
            state: State::of(sample),
            start_ns: sample.t_ns,
            end_ns: sample.t_ns,
            samples: 0,
            errors: Vec::new(),
        };
        run.add(sample);
        run
    }

    fn add(&mut self, sample: &'a Sample) {
        self.samples += 1;
        self.end_ns = self.end_ns.max(sample.end_ns);
        if let Some(error) = sample.error.as_deref() {
            match self.errors.iter().position(|(e, _)| *e == error) {
                Some(i) => self.errors[i].1 += 1,
                None if self.errors.len() < 5 => self.errors.push((error, 1)),
                None => {}
            }
        }
    }
}

/// The SVG timeline: one row per probe, faults as bands, trials as dashed lines,
/// rto anchor/detect/recovered markers on the objective's probe row.
fn timeline(h: &mut String, record: &RunRecord) {
    let samples_end = record.samples.iter().map(|s| s.end_ns).max();
    let trials_end = record.trials.iter().map(|t| t.end_ns).max();
    let faults_end = record
        .trials
        .iter()
        .flat_map(|t| &t.faults)
        .filter_map(|f| f.end_ns.or(f.inject_ns))
        .max();
    let end_ns = [samples_end, trials_end, faults_end]
        .into_iter()
        .flatten()
        .fold(record.duration_ns, u64::max)
        .max(1);
    let plot_w = WIDTH - LEFT - RIGHT;
    let x = |ns: u64| LEFT + ns as f64 / end_ns as f64 * plot_w;
    let rows = record.probes.len().max(1) as f64;
    let bottom = TOP + rows * (ROW + GAP);
    let height = bottom + AXIS;
    let row_y = |probe: usize| TOP + probe as f64 * (ROW + GAP);
    let _ = writeln!(
        h,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" viewBox=\"0 0 {WIDTH} {height}\">"
    );

    // Probe rows and their samples, merged into runs of one state.
    for (i, probe) in record.probes.iter().enumerate() {
        let y = row_y(i);
        let _ = writeln!(
            h,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n<rect class=\"row\" x=\"{LEFT}\" y=\"{y:.1}\" width=\"{plot_w:.1}\" height=\"{ROW}\"/>",
            LEFT - 8.0,
            y + ROW / 2.0 + 4.0,
            escape(&probe.name)
        );
        let mut samples: Vec<&Sample> = record.samples.iter().filter(|s| s.probe == i).collect();
        samples.sort_by_key(|s| s.t_ns);
        let mut runs: Vec<Run> = Vec::new();
        for sample in samples {
            match runs.last_mut() {
                Some(run) if run.state == State::of(sample) => run.add(sample),
                _ => runs.push(Run::new(sample)),
            }
        }
        for run in &runs {
            let (class, what) = match run.state {
                State::Ok => ("s-ok", "ok"),
                State::Failed => ("s-fail", "failed"),
                State::Unsafe => ("s-unsafe", "unsafe output"),
            };
            let x0 = x(run.start_ns);
            let w = (x(run.end_ns) - x0).max(MIN_W);
            let mut tip = format!(
                "{}: {what}, {} sample{}, {}–{}",
                probe.name,
                run.samples,
                if run.samples == 1 { "" } else { "s" },
                format_at(run.start_ns),
                format_at(run.end_ns)
            );
            for (error, count) in &run.errors {
                let _ = write!(tip, "\n{error} (×{count})");
            }
            let _ = writeln!(
                h,
                "<rect class=\"{class}\" x=\"{x0:.1}\" y=\"{:.1}\" width=\"{w:.1}\" height=\"{:.1}\"><title>{}</title></rect>",
                y + 3.0,
                ROW - 6.0,
                escape(&tip)
            );
        }
    }

    // Fault windows, across all rows, labelled above them.
    let faults = record
        .trials
        .iter()
        .flat_map(|t| t.faults.iter().map(move |f| (t.index, f)));
    for (k, (trial, f)) in faults.enumerate() {
        let Some(inject) = f.inject_ns else { continue };
        let end = f.end_ns.unwrap_or(end_ns);
        let (x0, x1) = (x(inject), x(end));
        let agent = agent_name(record, f.agent);
        let tip = format!(
            "trial {trial}: {} on {agent}: {} ({}), {}–{}{}",
            f.step,
            f.kind,
            f.summary,
            format_at(inject),
            f.end_ns.map_or_else(|| "end".to_string(), format_at),
            if f.end_reason.is_empty() {
                String::new()
            } else {
                format!(", {}", f.end_reason)
            }
        );
        let _ = writeln!(
            h,
            "<rect class=\"fault\" x=\"{x0:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\"><title>{}</title></rect>\n<text class=\"flbl\" x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            TOP - 4.0,
            (x1 - x0).max(MIN_W),
            bottom - TOP,
            escape(&tip),
            x0 + 3.0,
            if k % 2 == 0 { 26.0 } else { 38.0 },
            escape(&format!("{} @ {agent}", f.step))
        );
    }

    // Trial boundaries.
    for t in &record.trials {
        for ns in [t.start_ns, t.end_ns] {
            let _ = writeln!(
                h,
                "<line class=\"trial\" x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"4\" y2=\"{bottom:.1}\"/>",
                x(ns)
            );
        }
        let _ = writeln!(
            h,
            "<text x=\"{:.1}\" y=\"12\">trial {}</text>",
            x(t.start_ns) + 3.0,
            t.index
        );
    }

    // Recovery markers of rto (and detect) objectives, on their probe's row.
    for t in &record.trials {
        for r in t
            .objectives
            .iter()
            .filter(|r| matches!(r.kind, ResultKind::Rto | ResultKind::Detect))
        {
            let Some(row) = record.probes.iter().position(|p| p.name == r.probe) else {
                continue;
            };
            let y = row_y(row);
            // Labels alternate between the top and the bottom of the row: the
            // anchor and the first failure are often close together.
            let marks = [
                ("anchor", r.anchor_ns, y + 10.0),
                ("detect", r.detect_ns, y + ROW - 4.0),
                ("recovered", r.recovered_ns, y + 10.0),
            ];
            for (label, ns, label_y) in marks {
                let Some(ns) = ns else { continue };
                let _ = writeln!(
                    h,
                    "<line class=\"mk {label}\" x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{1:.1}\" y2=\"{2:.1}\"><title>{3}</title></line>\n<text class=\"mkl\" x=\"{4:.1}\" y=\"{5:.1}\">{label}</text>",
                    x(ns),
                    y - 2.0,
                    y + ROW + 2.0,
                    escape(&format!(
                        "trial {}: {}: {label} at {}",
                        t.index,
                        r.name,
                        format_at(ns)
                    )),
                    x(ns) + 3.0,
                    label_y
                );
            }
        }
    }

    // Recovery phases: a tick on the row of the probe whose sample marks the phase,
    // or, for the agent's observations, a dashed one as tall as the fault bands.
    for t in &record.trials {
        for f in &t.faults {
            for r in phases::rows(f) {
                let row = r
                    .mark
                    .probe
                    .as_ref()
                    .and_then(|p| record.probes.iter().position(|q| &q.name == p));
                let (class, y1, y2) = match row {
                    Some(row) => ("ph", row_y(row) + ROW / 2.0, row_y(row) + ROW + 3.0),
                    None => ("ph ph-agent", TOP - 4.0, bottom - 4.0),
                };
                let _ = writeln!(
                    h,
                    "<line class=\"{class} ph-{0}\" x1=\"{1:.1}\" x2=\"{1:.1}\" y1=\"{y1:.1}\" y2=\"{y2:.1}\"><title>{2}</title></line>",
                    r.name,
                    x(r.mark.t_ns),
                    escape(&format!(
                        "{} {} ±{}: {}\n{} at {}",
                        r.name,
                        r.at,
                        r.error,
                        phases::tooltip_source(r.mark),
                        phases::fault_title(record, t, f),
                        r.run_at
                    ))
                );
            }
        }
    }

    // The time axis, in seconds.
    let _ = writeln!(
        h,
        "<line class=\"axis\" x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{bottom:.1}\" y2=\"{bottom:.1}\"/>",
        WIDTH - RIGHT
    );
    let end_s = end_ns as f64 / 1e9;
    let step = tick_step(end_s);
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10()).ceil() as usize
    };
    let ticks = (end_s / step + 1e-9).floor() as u64;
    for i in 0..=ticks {
        let t = i as f64 * step;
        let tx = LEFT + t / end_s * plot_w;
        let _ = writeln!(
            h,
            "<line class=\"axis\" x1=\"{tx:.1}\" x2=\"{tx:.1}\" y1=\"{bottom:.1}\" y2=\"{:.1}\"/><text x=\"{tx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{t:.decimals$}s</text>",
            bottom + 5.0,
            bottom + 18.0
        );
    }
    h.push_str("</svg>\n");
}

/// A 1, 2 or 5 × 10ⁿ step giving about 10 ticks over `span` seconds.
fn tick_step(span: f64) -> f64 {
    let raw = (span / 10.0).max(1e-6);
    let magnitude = 10f64.powf(raw.log10().floor());
    let norm = raw / magnitude;
    let factor = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    factor * magnitude
}

#[cfg(test)]
mod tests {
    use super::super::fixture;
    use super::*;

    /// Emoji need an emoji font, which servers and headless browsers rarely have:
    /// the report's marks are glyphs DejaVu covers (tests/tests/page.rs checks
    /// them in Chromium).
    #[test]
    fn marks_are_text_glyphs_not_emoji() {
        let mut record = fixture::record();
        for verdict in [Verdict::Passed, Verdict::Failed, Verdict::RevertFailed] {
            record.verdict = verdict;
            record.leftovers = vec!["f-1 on node-a".into()];
            let page = html(&record);
            let emoji: Vec<char> = page
                .chars()
                .filter(|c| {
                    matches!(
                        *c as u32,
                        0x1f000..=0x1ffff | 0xfe0f | 0x2705 | 0x274c | 0x23ed
                    )
                })
                .collect();
            assert!(emoji.is_empty(), "{emoji:?}");
        }
        record.verdict = Verdict::Passed;
        assert!(html(&record).contains("<h1>✓ "));
        record.verdict = Verdict::Failed;
        assert!(html(&record).contains("<h1>✗ "));
    }

    #[test]
    fn renders_page_with_merged_runs_and_markers() {
        let page = html(&fixture::record());
        assert!(page.starts_with("<!DOCTYPE html>"));
        assert!(page.contains("<title>gpuchaos: xid-recovery: failed</title>"));
        assert!(page.contains("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(!page.contains("<script"), "a probe error was not escaped");
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(
            !page.contains("src=") && !page.contains("<link"),
            "external resource"
        );
        // chat: ok, failed, ok, failed, ok, failed, ok; guard: ok, unsafe, failed, ok.
        assert_eq!(page.matches("<rect class=\"s-ok\"").count(), 6);
        assert_eq!(page.matches("<rect class=\"s-fail\"").count(), 4);
        assert_eq!(page.matches("<rect class=\"s-unsafe\"").count(), 1);
        assert!(
            page.contains("chat: failed, 40 samples, 56.000s–95.120s\nconnection refused (×40)")
        );
        // One rto result per trial: anchor, detect and recovered each.
        for marker in ["anchor", "detect", "recovered"] {
            let line = format!("<line class=\"mk {marker}\"");
            assert_eq!(page.matches(&line).count(), 2, "{marker}");
            assert!(page.contains(&format!(">{marker}</text>")), "{marker}");
        }
        assert!(page.contains("trial 2: recovers in time: recovered at 96.200s"));
        // Two fault bands, the second open to the run's end; four trial lines.
        assert_eq!(page.matches("<rect class=\"fault\"").count(), 2);
        assert!(page.contains(">kill-worker @ node-b</text>"));
        assert_eq!(page.matches("<line class=\"trial\"").count(), 4);
        assert!(page.contains(">0s</text>") && page.contains(">100s</text>"));
        assert!(page.contains("<td>10.000s</td><td>1</td><td>inject</td>"));
        assert!(page.contains(
            "<td>node-a</td><td>10.0.0.1:7070</td><td>gpu-a</td><td>+1.250ms ± 0.040ms</td>"
        ));
    }

    #[test]
    fn phases_are_ticks_with_titles_and_tables() {
        let page = html(&fixture::record());
        // Trial 1's five observed phases: three on chat's row, two across the fault.
        assert_eq!(page.matches("<line class=\"ph ph-").count(), 5, "{page}");
        assert_eq!(page.matches("<line class=\"ph ph-agent ph-").count(), 2);
        for name in [
            "detected",
            "replaced",
            "gpu_ready",
            "first_good",
            "recovered",
        ] {
            assert!(page.contains(&format!(" ph-{name}\"")), "{name}");
        }
        assert!(!page.contains(" ph-masked\"") && !page.contains(" ph-ready\""));
        assert!(page.contains(
            "<title>replaced +2.500s ±0.500s: pid 4321 replaced pid 4242\ntrial 1 kill-worker (process-kill on node-a, fault f-1) at 12.500s</title>"
        ));
        assert!(page.contains("<title>detected +1.000s ±1.000s: chat (sample sent)\n"));
        // The agent's ticks span the fault band; chat's sit on chat's row.
        let tick = |name: &str| {
            let at = page.find(&format!(" ph-{name}\"")).unwrap();
            page[at..at + 90].to_string()
        };
        assert!(
            tick("replaced").contains(&format!("y1=\"{:.1}\"", TOP - 4.0)),
            "{}",
            tick("replaced")
        );
        assert!(
            tick("detected").contains(&format!("y1=\"{:.1}\"", TOP + ROW / 2.0)),
            "{}",
            tick("detected")
        );
        // A legend with every phase's colour.
        for (name, colour) in PHASE_NAMES.iter().zip(PHASE_COLOURS) {
            assert!(page.contains(&format!(
                "<span style=\"background:{colour}\"></span>{name}"
            )));
        }
        // The phase table and the objectives' windows.
        assert!(page.contains(
            "<h3>phases of trial 1 kill-worker (process-kill on node-a, fault f-1)</h3>"
        ));
        assert!(page.contains(
            "<tr><td>gpu_ready</td><td>+5.500s</td><td>0.500s</td><td>15.500s</td><td>agent: GPU memory settled, pid 4321, 2.0 GiB on the GPU</td></tr>"
        ));
        assert!(page.contains(
            "<tr class=\"np\"><td>masked</td><td>-</td><td>-</td><td>-</td><td>not observed: chat did not pass 3 in a row while the fault was active</td></tr>"
        ));
        assert!(page.contains(
            "<b>durations:</b> detect 1.000s · replace 2.500s · load 3.000s · total 8.120s"
        ));
        assert!(page.contains("<li>chat availability: trial 1 over 10.0s–18.1s (first fault verified → chat recovered); trial 2 over"));
        assert_eq!(page.matches("<h3>phases of").count(), 1);

        let mut record = fixture::record();
        record.trials[0].faults[0].phases = Default::default();
        let page = html(&record);
        assert!(
            !page.contains("class=\"ph")
                && !page.contains("<h3>phases")
                && !page.contains("recovery phases")
        );
    }

    #[test]
    fn tick_steps_are_round() {
        for (span, step) in [(100.0, 10.0), (37.0, 5.0), (0.5, 0.05), (15.0, 2.0)] {
            assert!(
                (tick_step(span) - step).abs() < 1e-9,
                "{span}: {}",
                tick_step(span)
            );
        }
    }

    #[test]
    fn stays_small_for_many_samples() {
        let mut record = fixture::record();
        record.samples = (0..20_000u64)
            .map(|i| Sample {
                probe: (i % 2) as usize,
                t_ns: i * 5_000_000,
                end_ns: i * 5_000_000 + 1_000_000,
                ok: (i / 2) % 1000 != 999,
                ..Default::default()
            })
            .collect();
        let page = html(&record);
        assert!(page.len() < 100_000, "{} bytes", page.len());
    }
}

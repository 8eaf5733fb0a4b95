//! Renders `summary.md`: the run summary for a CI job summary
//! (`$GITHUB_STEP_SUMMARY`): verdict, objectives (with the windows their figures
//! cover), faults with their recovery phases, and leftovers.

use std::fmt::Write;

use super::phases::{self, has_phases};
use super::{
    OBJECTIVE_COLUMNS, agent_name, format_at, format_duration, objective_cells, started_at,
};
use crate::runner::record::{FaultRecord, PHASE_NAMES, RunRecord, TrialRecord, Verdict};

/// Markdown (GitHub flavoured) summary of a run.
pub fn markdown(record: &RunRecord) -> String {
    let mut md = format!(
        "## {} gpuchaos: {} {}\n\n",
        verdict_icon(record.verdict),
        text(&record.experiment),
        text(record.verdict.as_str())
    );
    if !record.description.is_empty() {
        let _ = writeln!(md, "{}\n", text(&record.description));
    }
    let _ = writeln!(
        md,
        "**exit code** {} · **duration** {} · **trials** {} · **started** {} · **run seed** {} · `{}`\n",
        record.exit_code,
        format_duration(record.duration_ns),
        record.trials.len(),
        started_at(record),
        record.run_seed,
        record.file.replace('`', "'")
    );
    if let Some(reason) = &record.reason {
        let _ = writeln!(md, "**reason:** {}\n", text(reason));
    }
    if !record.leftovers.is_empty() {
        md.push_str("### 🚨 leftovers\n\n**⚠️ these faults could not be reverted: something is still broken on the agents; clean up by hand.**\n\n");
        for leftover in &record.leftovers {
            let _ = writeln!(md, "- {}", text(leftover));
        }
        md.push('\n');
    }

    md.push_str("### objectives\n\n");
    table(
        &mut md,
        &[&OBJECTIVE_COLUMNS[..], &["verdict"]].concat(),
        record.objectives.iter().map(|o| {
            let mut cells = objective_cells(o);
            cells.push(
                match o.verdict_word() {
                    "pass" => "✅ pass",
                    "fail" => "❌ fail",
                    _ => "⏭️ not evaluated",
                }
                .to_string(),
            );
            cells
        }),
    );
    let failed: Vec<_> = record
        .objectives
        .iter()
        .filter(|o| o.evaluated && !o.passed)
        .collect();
    if !failed.is_empty() {
        md.push('\n');
        for o in failed {
            let _ = writeln!(md, "- **{}**: {}", text(&o.name), text(&o.detail));
        }
    }
    let notes = phases::objective_notes(record);
    if !notes.is_empty() {
        md.push('\n');
        for note in notes {
            let _ = writeln!(md, "- {}", text(&note));
        }
    }

    md.push_str("\n### faults\n\n");
    let at = |ns: Option<u64>| ns.map_or_else(|| "-".to_string(), format_at);
    table(
        &mut md,
        &[
            "trial",
            "step",
            "agent",
            "kind / summary",
            "injected at",
            "ended at",
            "end reason",
        ],
        record.trials.iter().flat_map(|t| {
            t.faults.iter().map(move |f| {
                let mut reason = f.end_reason.clone();
                if !f.error.is_empty() {
                    reason += &format!(" ({})", f.error);
                }
                vec![
                    t.index.to_string(),
                    f.step.clone(),
                    agent_name(record, f.agent),
                    format!("{}: {}", f.kind, f.summary),
                    at(f.inject_ns),
                    at(f.end_ns),
                    reason,
                ]
            })
        }),
    );
    phase_tables(&mut md, record);
    md
}

/// A table of the recovery phases per fault that has any (every phase, the missing
/// ones with why), then the durations; a line for faults with none observed.
fn phase_tables(md: &mut String, record: &RunRecord) {
    let faults: Vec<(&TrialRecord, &FaultRecord)> = record
        .trials
        .iter()
        .flat_map(|t| t.faults.iter().map(move |f| (t, f)))
        .collect();
    if !faults.iter().any(|(_, f)| has_phases(f)) {
        return;
    }
    md.push_str("\n### recovery phases\n");
    for (t, f) in faults {
        if !has_phases(f) {
            if !f.phase_notes.is_empty() {
                let _ = writeln!(
                    md,
                    "\n**{}**: no phase observed ({})",
                    text(&phases::fault_title(record, t, f)),
                    text(&phases::missing(f).join("; "))
                );
            }
            continue;
        }
        let _ = writeln!(
            md,
            "\n**{}**, at: {}\n",
            text(&phases::fault_title(record, t, f)),
            text(&phases::origin(f))
        );
        let rows = phases::rows(f);
        table(
            md,
            &["phase", "at", "±", "on the run", "from"],
            PHASE_NAMES
                .iter()
                .map(|name| match rows.iter().find(|r| r.name == *name) {
                    Some(r) => vec![
                        name.to_string(),
                        r.at.clone(),
                        r.error.clone(),
                        r.run_at.clone(),
                        r.from.clone(),
                    ],
                    None => vec![
                        name.to_string(),
                        "-".into(),
                        "-".into(),
                        "-".into(),
                        match f.phase_notes.get(*name) {
                            Some(note) => format!("not observed: {note}"),
                            None => "not observed".into(),
                        },
                    ],
                }),
        );
        if let Some(d) = phases::durations(&f.phase_durations) {
            let _ = writeln!(md, "\n**durations:** {}", text(&d));
        }
        if let Some(i) = phases::isolated(f) {
            let _ = writeln!(md, "\n**isolated failures tolerated:** {}", text(&i));
        }
    }
}

fn verdict_icon(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Passed => "✅",
        Verdict::Failed => "❌",
        Verdict::RevertFailed => "🚨",
        Verdict::Aborted | Verdict::InjectFailed | Verdict::Error => "⚠️",
    }
}

/// Appends a table; every cell is escaped.
fn table(md: &mut String, header: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let _ = writeln!(md, "| {} |", header.join(" | "));
    let _ = writeln!(md, "|{}", "---|".repeat(header.len()));
    for row in rows {
        let cells: Vec<_> = row.iter().map(|c| text(c)).collect();
        let _ = writeln!(md, "| {} |", cells.join(" | "));
    }
}

/// Escapes text for a markdown table cell or line: `|`, HTML and line breaks.
fn text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '|' => out.push_str("\\|"),
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\n' => out.push_str("<br>"),
            '\r' => {}
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::fixture;
    use super::*;

    #[test]
    fn has_heading_tables_and_escapes_pipes() {
        let mut record = fixture::record();
        record.objectives[1].name = "ok | not ok".into();
        let md = markdown(&record);
        assert!(
            md.starts_with("## ❌ gpuchaos: xid-recovery failed\n"),
            "{md}"
        );
        assert!(md.contains("**exit code** 1 · **duration** 100.0s"), "{md}");
        assert!(
            md.contains(
                "| recovers in time | rto | chat | 24.7s ± 0.100s (8.200s–41.2s) | ≤ 30s | 1/2 | ❌ fail |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| ok \\| not ok | availability | chat | 74.00% ± 0.50% (55.00%–93.00%) | ≥ 0.5 | 2/2 | ✅ pass |"),
            "{md}"
        );
        assert!(
            md.contains("| 2 | kill-worker | node-b | process-kill: SIGKILL vllm worker | 55.000s | - | run ended |"),
            "{md}"
        );
        assert!(!md.contains("leftovers"));
    }

    #[test]
    fn has_a_phase_table_per_fault_with_phases() {
        let md = markdown(&fixture::record());
        // The objectives' notes, under their table.
        let notes = &md[md.find("### objectives").unwrap()..md.find("### faults").unwrap()];
        assert!(
            notes.contains("- chat availability: trial 1 over 10.0s–18.1s (first fault verified → chat recovered); trial 2 over 55.0s–100.0s (first fault verified → observation end)\n"),
            "{notes}"
        );
        assert!(
            notes.contains("- recovers in time: 1 isolated failure tolerated (trial 1: +15.0s after the anchor)\n"),
            "{notes}"
        );
        let section = &md[md.find("### recovery phases").expect(&md)..];
        assert!(
            section.contains("**trial 1 kill-worker (process-kill on node-a, fault f-1)**, at: after its verification at 10.000s\n"),
            "{section}"
        );
        for row in [
            "| phase | at | ± | on the run | from |",
            "| detected | +1.000s | 1.000s | 11.000s | chat (sample sent) |",
            "| masked | - | - | - | not observed: chat did not pass 3 in a row while the fault was active |",
            "| replaced | +2.500s | 0.500s | 12.500s | agent: pid 4321 replaced pid 4242 |",
            "| gpu_ready | +5.500s | 0.500s | 15.500s | agent: GPU memory settled, pid 4321, 2.0 GiB on the GPU |",
            "| ready | - | - | - | not observed: no probe has `role: readiness` (a health endpoint) |",
            "| first_good | +8.120s | 1.000s | 18.120s | chat (sample answered) |",
            "| recovered | +8.120s | 1.000s | 18.120s | chat (sample answered) |",
            "**durations:** detect 1.000s · replace 2.500s · load 3.000s · total 8.120s",
            "**isolated failures tolerated:** chat 1 (+15.0s)",
        ] {
            assert!(section.contains(row), "{row}\n{section}");
        }
        // Trial 2's fault has no phase and no note: no table of its own.
        assert_eq!(section.matches("| phase |").count(), 1, "{section}");
        assert!(!section.contains("trial 2"), "{section}");

        let mut record = fixture::record();
        for t in &mut record.trials {
            for f in &mut t.faults {
                f.phases = Default::default();
            }
        }
        assert!(!markdown(&record).contains("recovery phases"));
    }

    #[test]
    fn warns_about_leftovers() {
        let mut record = fixture::record();
        record.verdict = Verdict::RevertFailed;
        record.leftovers = vec!["node-b f-2: <vllm> still stopped".into()];
        let md = markdown(&record);
        assert!(md.starts_with("## 🚨 "), "{md}");
        assert!(md.contains("### 🚨 leftovers\n\n**⚠️"), "{md}");
        assert!(
            md.contains("- node-b f-2: &lt;vllm&gt; still stopped\n"),
            "{md}"
        );
    }
}

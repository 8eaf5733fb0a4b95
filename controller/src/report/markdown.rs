//! Renders `summary.md`: the run summary for a CI job summary
//! (`$GITHUB_STEP_SUMMARY`): verdict, objectives, faults and leftovers.

use std::fmt::Write;

use super::{
    OBJECTIVE_COLUMNS, agent_name, format_at, format_duration, objective_cells, started_at,
};
use crate::runner::record::{RunRecord, Verdict};

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
    md
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

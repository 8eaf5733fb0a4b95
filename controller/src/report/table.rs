//! Renders the plain-text table printed at the end of a run: the recovery phases of
//! each fault that has any, then the objectives, what their figures cover, and the
//! verdict.

use std::fmt::Write;

use super::format_opt;
use super::phases::{objective_notes, text_block};
use crate::runner::record::RunRecord;

const HEADER: [&str; 8] = [
    "OBJECTIVE",
    "KIND",
    "PROBE",
    "MEASURED",
    "LIMIT",
    "±",
    "TRIALS",
    "VERDICT",
];

/// One phase block per fault with an observed phase, the objectives as an aligned
/// table with their notes (windows, tolerated failures), then the verdict, the
/// reason and what was left behind.
pub fn text_table(record: &RunRecord) -> String {
    let mut out = String::new();
    for t in &record.trials {
        for f in &t.faults {
            let block = text_block(record, t, f);
            if !block.is_empty() {
                out.push_str(&block);
                out.push('\n');
            }
        }
    }
    let mut rows = vec![HEADER.map(String::from)];
    rows.extend(record.objectives.iter().map(|o| {
        [
            o.name.clone(),
            o.kind.to_string(),
            o.probe.clone(),
            format_opt(o.median, &o.unit),
            o.limit_text.clone(),
            format_opt(o.error_bar, &o.unit),
            format!("{}/{}", o.trials_passed, o.trials),
            match o.verdict_word() {
                "pass" => "PASS",
                "fail" => "FAIL",
                _ => "NOT EVALUATED",
            }
            .to_string(),
        ]
    }));
    // One line per cell: a line break inside a name would break the alignment.
    for cell in rows.iter_mut().flatten() {
        *cell = cell.replace(['\n', '\r', '\t'], " ");
    }
    let mut widths = [0; HEADER.len()];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for row in &rows {
        let cells: Vec<_> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let _ = writeln!(out, "{}", cells.join("  "));
    }
    for note in objective_notes(record) {
        let _ = writeln!(out, "  {}", note.replace(['\n', '\r', '\t'], " "));
    }
    let _ = writeln!(
        out,
        "verdict: {} (exit {})",
        record.verdict, record.exit_code
    );
    if let Some(reason) = &record.reason {
        let _ = writeln!(out, "reason: {reason}");
    }
    for leftover in &record.leftovers {
        let _ = writeln!(out, "left behind: {leftover}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::fixture;
    use super::*;

    #[test]
    fn aligns_columns_and_prints_dash_for_unmeasured() {
        let mut record = fixture::record();
        record.objectives[1].median = None;
        record.objectives[1].error_bar = None;
        let table = text_table(&record);
        let all: Vec<_> = table.lines().collect();
        let start = all.iter().position(|l| l.starts_with("OBJECTIVE")).unwrap();
        let lines = &all[start..];
        assert_eq!(lines.len(), 7, "{table}");
        let rows = &lines[..3];
        let len = rows[0].chars().count();
        assert!(rows.iter().all(|l| l.chars().count() == len), "{table}");
        let pos = |line: &str, needle: &str| line[..line.find(needle).unwrap()].chars().count();
        assert_eq!(pos(rows[0], "MEASURED"), pos(rows[1], "24.7s"), "{table}");
        assert_eq!(pos(rows[0], "LIMIT"), pos(rows[2], "≥ 0.5"), "{table}");
        assert_eq!(pos(rows[0], "VERDICT"), pos(rows[1], "FAIL"), "{table}");
        assert_eq!(pos(rows[0], "VERDICT"), pos(rows[2], "PASS"), "{table}");
        assert!(
            rows[1].contains("24.7s     ≤ 30s  0.100s  1/2     FAIL"),
            "{table}"
        );
        let availability: Vec<_> = rows[2].split_whitespace().collect();
        assert_eq!(
            availability,
            [
                "chat",
                "availability",
                "availability",
                "chat",
                "-",
                "≥",
                "0.5",
                "-",
                "2/2",
                "PASS"
            ]
        );
        assert!(lines[3].starts_with("  recovers in time: 1 isolated failure tolerated"));
        assert!(lines[4].starts_with("  chat availability: trial 1 over 10.0s–18.1s"));
        assert_eq!(lines[5], "verdict: failed (exit 1)");
        assert!(lines[6].starts_with("reason: objective"));
    }

    #[test]
    fn prints_a_phase_block_for_each_fault_with_phases() {
        let table = text_table(&fixture::record());
        let block: Vec<_> = table.lines().take_while(|l| !l.is_empty()).collect();
        let expected = [
            "phases of trial 1 kill-worker (process-kill on node-a, fault f-1; at: after its verification at 10.000s):",
            "  phase       at       ±       from",
            "  detected    +1.000s  1.000s  chat (sample sent)",
            "  replaced    +2.500s  0.500s  agent: pid 4321 replaced pid 4242",
            "  gpu_ready   +5.500s  0.500s  agent: GPU memory settled, pid 4321, 2.0 GiB on the GPU",
            "  first_good  +8.120s  1.000s  chat (sample answered)",
            "  recovered   +8.120s  1.000s  chat (sample answered)",
            "  not observed: masked (chat did not pass 3 in a row while the fault was active); ready (no probe has `role: readiness` (a health endpoint))",
            "  durations: detect 1.000s · replace 2.500s · load 3.000s · total 8.120s",
            "  isolated failures tolerated: chat 1 (+15.0s)",
        ];
        assert_eq!(block, expected, "{table}");
        // Trial 2's fault has no phase: one block only, and the objectives follow.
        assert_eq!(table.matches("phases of ").count(), 1, "{table}");
        assert!(
            table
                .lines()
                .nth(expected.len() + 1)
                .unwrap()
                .starts_with("OBJECTIVE")
        );
    }

    #[test]
    fn a_fault_without_phases_prints_no_block() {
        let mut record = fixture::record();
        let f = &mut record.trials[0].faults[0];
        f.phases = Default::default();
        f.phase_durations = Default::default();
        let table = text_table(&record);
        assert!(!table.contains("phases of"), "{table}");
        assert!(!table.contains("not observed"), "{table}");
        assert!(table.starts_with("OBJECTIVE"), "{table}");
    }
}

//! Renders the plain-text objectives table printed at the end of a run.

use std::fmt::Write;

use super::format_opt;
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

/// The objectives as an aligned table, then the verdict, the reason and what was
/// left behind.
pub fn text_table(record: &RunRecord) -> String {
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
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<_> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let _ = writeln!(out, "{}", cells.join("  "));
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
        let lines: Vec<_> = table.lines().collect();
        assert_eq!(lines.len(), 5, "{table}");
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
        assert_eq!(lines[3], "verdict: failed (exit 1)");
        assert!(lines[4].starts_with("reason: objective"));
    }
}

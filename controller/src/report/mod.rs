//! Reports rendered from a run's journal ([`RunRecord`]): `journal.json`, `junit.xml`
//! (CI test results), `summary.md` (CI job summary), `report.html` (a self-contained
//! page with a timeline) and the plain-text table printed at the end of a run.
//!
//! This module holds [`write_all`] and the helpers the renderers share (value
//! formatting, escaping, lookups).

mod html;
mod junit;
mod markdown;
mod phases;
mod table;

#[cfg(test)]
pub(crate) mod fixture;

pub(crate) use html::CSS;
pub use html::html;
pub use junit::junit;
pub use markdown::markdown;
pub use table::text_table;

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use crate::runner::record::{ObjectiveResult, ObjectiveSummary, RunRecord, Verdict};

/// Writes `journal.json`, `junit.xml`, `summary.md` and `report.html` into `dir`
/// (created if missing), each atomically, and returns their paths in that order.
pub fn write_all(record: &RunRecord, dir: &Path) -> io::Result<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    let mut journal = serde_json::to_string_pretty(record).map_err(io::Error::other)?;
    journal.push('\n');
    let files = [
        ("journal.json", journal),
        ("junit.xml", junit(record)),
        ("summary.md", markdown(record)),
        ("report.html", html(record)),
    ];
    files
        .iter()
        .map(|(name, text)| write_atomic(&dir.join(name), text.as_bytes()))
        .collect()
}

/// Writes `NAME.tmp` next to `path`, syncs it, then renames it over `path`.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<PathBuf> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let result = fs::File::create(&tmp)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|()| path.to_path_buf())
}

/// A value in its unit: "s" → `2.034s` (1 decimal from 10s on), "ratio" → `99.50%`,
/// "count" → `3`; anything else as is.
pub(crate) fn format_value(value: f64, unit: &str) -> String {
    match unit {
        "s" if value.abs() < 10.0 => format!("{value:.3}s"),
        "s" => format!("{value:.1}s"),
        "ratio" => format!("{:.2}%", value * 100.0),
        "count" => format!("{}", value.round()),
        _ => format!("{value}"),
    }
}

/// [`format_value`], or `-` when unmeasured.
pub(crate) fn format_opt(value: Option<f64>, unit: &str) -> String {
    value.map_or_else(|| "-".to_string(), |v| format_value(v, unit))
}

/// A duration in nanoseconds, in human seconds.
pub(crate) fn format_duration(ns: u64) -> String {
    format_value(ns as f64 / 1e9, "s")
}

/// A point on the run's timeline (ns since start), in seconds with 3 decimals.
pub(crate) fn format_at(ns: u64) -> String {
    format!("{:.3}s", ns as f64 / 1e9)
}

/// An agent's clock offset and its error bar, in milliseconds.
pub(crate) fn format_offset(offset_ns: i64, error_ns: u64) -> String {
    format!(
        "{:+.3}ms ± {:.3}ms",
        offset_ns as f64 / 1e6,
        error_ns as f64 / 1e6
    )
}

/// The run's wall-clock start as RFC 3339 (UTC, seconds).
pub(crate) fn started_at(record: &RunRecord) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(record.started_unix_ms);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// What an objective measured: the median with its error bar, and the range when
/// several trials measured it.
pub(crate) fn measured(o: &ObjectiveSummary) -> String {
    let Some(median) = o.median else {
        return "-".to_string();
    };
    let mut text = format_value(median, &o.unit);
    if let Some(err) = o.error_bar {
        text += &format!(" ± {}", format_value(err, &o.unit));
    }
    if let (true, Some(min), Some(max)) = (o.trials > 1, o.min, o.max) {
        text += &format!(
            " ({}–{})",
            format_value(min, &o.unit),
            format_value(max, &o.unit)
        );
    }
    text
}

/// The per-trial results of the objective `name`, with their trial numbers.
pub(crate) fn trial_results<'a>(
    record: &'a RunRecord,
    name: &'a str,
) -> impl Iterator<Item = (u32, &'a ObjectiveResult)> + 'a {
    record.trials.iter().flat_map(move |trial| {
        trial
            .objectives
            .iter()
            .filter(move |r| r.name == name)
            .map(move |r| (trial.index, r))
    })
}

/// The agent's name, or `#index` when the journal does not know it.
pub(crate) fn agent_name(record: &RunRecord, index: usize) -> String {
    record
        .agents
        .get(index)
        .map_or_else(|| format!("#{index}"), |a| a.name.clone())
}

/// Whether the run failed for a reason other than its objectives.
pub(crate) fn run_error(record: &RunRecord) -> bool {
    !matches!(record.verdict, Verdict::Passed | Verdict::Failed) || !record.leftovers.is_empty()
}

/// Escapes text for XML and HTML element content, dropping the characters XML 1.0
/// does not allow (control characters other than tab and line breaks, U+FFFE...).
pub(crate) fn escape(text: &str) -> String {
    escape_with(text, false)
}

/// [`escape`] for attribute values: tabs and line breaks become character
/// references so that parsers keep them.
pub(crate) fn escape_attr(text: &str) -> String {
    escape_with(text, true)
}

fn escape_with(text: &str, attr: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\t' | '\n' | '\r' if attr => out.push_str(&format!("&#{};", u32::from(c))),
            '\t' | '\n' | '\r' => out.push(c),
            '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'.. => out.push(c),
            _ => {}
        }
    }
    out
}

/// The columns every objectives table starts with, and their cells.
pub(crate) const OBJECTIVE_COLUMNS: [&str; 6] = [
    "objective",
    "kind",
    "probe",
    "measured",
    "limit",
    "trials passed",
];

pub(crate) fn objective_cells(o: &ObjectiveSummary) -> Vec<String> {
    vec![
        o.name.clone(),
        o.kind.to_string(),
        o.probe.clone(),
        measured(o),
        o.limit_text.clone(),
        if o.evaluated {
            format!("{}/{}", o.trials_passed, o.trials)
        } else {
            "-".into()
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_values_by_unit() {
        assert_eq!(format_value(2.0341, "s"), "2.034s");
        assert_eq!(format_value(41.23, "s"), "41.2s");
        assert_eq!(format_value(0.995, "ratio"), "99.50%");
        assert_eq!(format_value(3.0, "count"), "3");
        assert_eq!(format_opt(None, "s"), "-");
        assert_eq!(format_offset(1_250_000, 40_000), "+1.250ms ± 0.040ms");
    }

    #[test]
    fn escapes_and_drops_invalid_chars() {
        assert_eq!(
            escape("a<&\"'>\u{1}\tb\u{FFFF}"),
            "a&lt;&amp;&quot;&#39;&gt;\tb"
        );
        assert_eq!(escape_attr("a\tb\nc"), "a&#9;b&#10;c");
    }

    #[test]
    fn write_all_writes_four_files() {
        let record = fixture::record();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("reports/run-1");
        let paths = write_all(&record, &out).unwrap();
        let names: Vec<_> = paths
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["journal.json", "junit.xml", "summary.md", "report.html"]
        );
        for path in &paths {
            assert!(fs::metadata(path).unwrap().len() > 0, "{path:?} is empty");
        }
        let leftover_tmp = fs::read_dir(&out)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension() == Some("tmp".as_ref()))
            .count();
        assert_eq!(leftover_tmp, 0);
        let journal = fs::read_to_string(&paths[0]).unwrap();
        let back: RunRecord = serde_json::from_str(&journal).unwrap();
        assert_eq!(back, record);
    }
}

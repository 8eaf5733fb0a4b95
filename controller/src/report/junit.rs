//! Renders `junit.xml`: one testcase per objective, plus a `run` testcase with an
//! error when the run failed for another reason (aborted, inject or revert failed).

use std::fmt::Write;

use super::phases::{objective_notes, text_block};
use super::{
    agent_name, escape, escape_attr, format_at, format_duration, format_offset, format_value,
    run_error, started_at, trial_results,
};
use crate::runner::record::{ObjectiveSummary, RunRecord};

/// JUnit XML for CI test reports.
pub fn junit(record: &RunRecord) -> String {
    let run_failed = run_error(record);
    let tests = record.objectives.len() + usize::from(run_failed);
    let failures = record
        .objectives
        .iter()
        .filter(|o| o.evaluated && !o.passed)
        .count();
    let skipped = record.objectives.iter().filter(|o| !o.evaluated).count();
    let errors = usize::from(run_failed);
    let time = seconds(record.duration_ns);
    let trials_time = seconds(
        record
            .trials
            .iter()
            .map(|t| t.end_ns.saturating_sub(t.start_ns))
            .sum(),
    );
    let name = escape_attr(&record.experiment);

    let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        xml,
        "<testsuites name=\"gpuchaos\" tests=\"{tests}\" failures=\"{failures}\" errors=\"{errors}\" time=\"{time}\">"
    );
    let _ = writeln!(
        xml,
        "  <testsuite name=\"{name}\" tests=\"{tests}\" failures=\"{failures}\" errors=\"{errors}\" skipped=\"{skipped}\" time=\"{time}\" timestamp=\"{}\">",
        started_at(record)
    );
    for o in &record.objectives {
        let _ = write!(
            xml,
            "    <testcase classname=\"gpuchaos.{name}\" name=\"{}\" time=\"{trials_time}\"",
            escape_attr(&o.name)
        );
        if !o.evaluated {
            // Not a failure of its own: the run's error says why nothing was measured.
            let _ = writeln!(
                xml,
                ">\n      <skipped message=\"{}\"/>\n    </testcase>",
                escape_attr(&o.detail)
            );
        } else if o.passed {
            xml.push_str("/>\n");
        } else {
            let _ = writeln!(
                xml,
                ">\n      <failure message=\"{}\" type=\"{}\">{}</failure>\n    </testcase>",
                escape_attr(&failure_message(record, o)),
                escape_attr(o.kind.as_str()),
                escape(&failure_details(record, o))
            );
        }
    }
    if run_failed {
        let mut message = format!("run {}", record.verdict);
        if let Some(reason) = &record.reason {
            message += &format!(": {reason}");
        }
        if !record.leftovers.is_empty() {
            message += &format!("; left behind: {}", record.leftovers.join("; "));
        }
        let mut text = format!("verdict: {} (exit {})\n", record.verdict, record.exit_code);
        for leftover in &record.leftovers {
            let _ = writeln!(text, "left behind: {leftover}");
        }
        let _ = writeln!(
            xml,
            "    <testcase classname=\"gpuchaos.{name}\" name=\"run\" time=\"{time}\">\n      <error message=\"{}\" type=\"{}\">{}</error>\n    </testcase>",
            escape_attr(&message),
            escape_attr(record.verdict.as_str()),
            escape(&text)
        );
    }
    let _ = writeln!(
        xml,
        "    <system-out>{}</system-out>\n  </testsuite>\n</testsuites>",
        escape(&system_out(record))
    );
    xml
}

/// Seconds with 3 decimals, for `time` attributes.
fn seconds(ns: u64) -> String {
    format!("{:.3}", ns as f64 / 1e9)
}

/// The measured numbers of a failed objective: its worst failing trial against the
/// limit, the median over trials and how many trials passed.
fn failure_message(record: &RunRecord, o: &ObjectiveSummary) -> String {
    let fmt = |v: f64| format_value(v, &o.unit);
    let worst = trial_results(record, &o.name)
        .filter(|(_, r)| !r.passed)
        .filter_map(|(trial, r)| r.value.map(|v| (Some(trial), v, r.error_bar)))
        .max_by(|a, b| (a.1 - o.limit).abs().total_cmp(&(b.1 - o.limit).abs()));
    let mut message = match worst.or(o.median.map(|m| (None, m, o.error_bar))) {
        Some((trial, value, error_bar)) => {
            let op = if value > o.limit {
                ">"
            } else if value < o.limit {
                "<"
            } else {
                "="
            };
            let mut m = format!("{} {} {op} limit {}", o.kind, fmt(value), fmt(o.limit));
            if let Some(err) = error_bar {
                m += &format!(" (±{})", fmt(err));
            }
            if let (Some(trial), true) = (trial, o.trials > 1) {
                m += &format!(" in trial {trial}");
            }
            m
        }
        None => format!("{} not measured (limit {})", o.kind, o.limit_text),
    };
    if let (Some(median), true) = (o.median, o.trials > 1) {
        message += &format!(", median {}", fmt(median));
    }
    message += &format!(", trials passed {}/{}", o.trials_passed, o.trials);
    message
}

/// The objective's detail, then one line per trial.
fn failure_details(record: &RunRecord, o: &ObjectiveSummary) -> String {
    let mut text = format!("{} (limit {})\n", o.detail, o.limit_text);
    for (trial, r) in trial_results(record, &o.name) {
        let value = r
            .value
            .map_or_else(|| "not measured".to_string(), |v| format_value(v, &o.unit));
        let err = r
            .error_bar
            .map(|e| format!(" ±{}", format_value(e, &o.unit)))
            .unwrap_or_default();
        let verdict = if r.passed { "pass" } else { "FAIL" };
        let _ = writeln!(text, "trial {trial}: {verdict} {value}{err}: {}", r.detail);
    }
    text
}

/// Agents, probes, the objectives' notes (windows, tolerated failures), trials with
/// their faults and those faults' recovery phases, and the events, one per line.
fn system_out(record: &RunRecord) -> String {
    let mut out = format!(
        "experiment {} ({}), gpuchaos {}, started {}, run seed {}\nverdict: {} (exit {}), duration {}\n",
        record.experiment,
        record.file,
        record.gpuchaos_version,
        started_at(record),
        record.run_seed,
        record.verdict,
        record.exit_code,
        format_duration(record.duration_ns)
    );
    if let Some(reason) = &record.reason {
        let _ = writeln!(out, "reason: {reason}");
    }
    for a in &record.agents {
        let _ = writeln!(
            out,
            "agent {} at {} ({}): clock offset {}",
            a.name,
            a.address,
            a.hostname,
            format_offset(a.offset_ns, a.offset_error_ns)
        );
    }
    for p in &record.probes {
        let _ = writeln!(
            out,
            "probe {}: {} {} every {}",
            p.name,
            p.kind,
            p.target,
            format_duration(p.interval_ns)
        );
    }
    for note in objective_notes(record) {
        let _ = writeln!(out, "objective {note}");
    }
    for t in &record.trials {
        let _ = writeln!(
            out,
            "trial {}: {}–{} ({})",
            t.index,
            format_at(t.start_ns),
            format_at(t.end_ns),
            format_duration(t.end_ns.saturating_sub(t.start_ns))
        );
        for f in &t.faults {
            let at = |ns: Option<u64>| ns.map_or_else(|| "-".to_string(), format_at);
            let _ = writeln!(
                out,
                "  fault {} on {}: {} ({}), injected {}, ended {} ({})",
                f.step,
                agent_name(record, f.agent),
                f.kind,
                f.summary,
                at(f.inject_ns),
                at(f.end_ns),
                f.end_reason
            );
            for line in text_block(record, t, f).lines() {
                let _ = writeln!(out, "    {line}");
            }
        }
    }
    for e in &record.events {
        let _ = writeln!(
            out,
            "[{}] trial {} {}: {}",
            format_at(e.t_ns),
            e.trial,
            e.kind,
            e.message
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::fixture;
    use super::*;
    use crate::runner::record::Verdict;

    fn attr<'a>(node: roxmltree::Node<'a, 'a>, name: &str) -> &'a str {
        node.attribute(name).unwrap()
    }

    #[test]
    fn parses_back_with_counts_and_failure_numbers() {
        let xml = junit(&fixture::record());
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let root = doc.root_element();
        assert_eq!(root.tag_name().name(), "testsuites");
        assert_eq!(attr(root, "tests"), "2");
        assert_eq!(attr(root, "failures"), "1");
        assert_eq!(attr(root, "errors"), "0");
        assert_eq!(attr(root, "time"), "100.000");
        let cases: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("testcase"))
            .collect();
        assert_eq!(cases.len(), 2);
        assert_eq!(attr(cases[0], "classname"), "gpuchaos.xid-recovery");
        assert_eq!(attr(cases[0], "name"), "recovers in time");
        let failure = cases[0]
            .children()
            .find(|n| n.has_tag_name("failure"))
            .unwrap();
        assert_eq!(attr(failure, "type"), "rto");
        assert_eq!(
            attr(failure, "message"),
            "rto 41.2s > limit 30.0s (±0.100s) in trial 2, median 24.7s, trials passed 1/2"
        );
        let text = failure.text().unwrap();
        assert!(text.contains("trial 1: pass 8.200s ±0.100s"), "{text}");
        assert!(text.contains("trial 2: FAIL 41.2s ±0.100s"), "{text}");
        assert!(!cases[1].children().any(|n| n.is_element()));
        let out = doc
            .descendants()
            .find(|n| n.has_tag_name("system-out"))
            .unwrap();
        let out = out.text().unwrap();
        assert!(out.contains("agent node-a at 10.0.0.1:7070"), "{out}");
        assert!(out.contains("trial 2: 50.000s–100.000s"), "{out}");
        assert!(
            out.contains("objective chat availability: trial 1 over 10.0s–18.1s (first fault verified → chat recovered)"),
            "{out}"
        );
    }

    #[test]
    fn system_out_has_the_phase_lines() {
        let xml = junit(&fixture::record());
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let out = doc
            .descendants()
            .find(|n| n.has_tag_name("system-out"))
            .unwrap()
            .text()
            .unwrap();
        let lines: Vec<_> = out.lines().collect();
        let fault = lines
            .iter()
            .position(|l| l.starts_with("  fault kill-worker on node-a"))
            .unwrap();
        assert_eq!(
            lines[fault + 1],
            "    phases of trial 1 kill-worker (process-kill on node-a, fault f-1; at: after its verification at 10.000s):"
        );
        let words = |l: &str| l.split_whitespace().map(String::from).collect::<Vec<_>>();
        assert_eq!(
            words(lines[fault + 3]),
            ["detected", "+1.000s", "1.000s", "chat", "(sample", "sent)"]
        );
        assert_eq!(
            words(lines[fault + 4])[..3],
            ["replaced", "+2.500s", "0.500s"]
        );
        assert!(lines[fault + 4].ends_with("agent: pid 4321 replaced pid 4242"));
        assert!(out.contains("    not observed: masked (chat did not pass 3 in a row while the fault was active); ready ("), "{out}");
        assert!(
            out.contains(
                "    durations: detect 1.000s · replace 2.500s · load 3.000s · total 8.120s\n"
            ),
            "{out}"
        );
        // Trial 2's fault has no phase: its fault line is followed by the next record.
        let second = lines
            .iter()
            .position(|l| l.starts_with("  fault kill-worker on node-b"))
            .unwrap();
        assert!(!lines[second + 1].starts_with("    "), "{out}");
        assert_eq!(out.matches("phases of").count(), 1, "{out}");
    }

    #[test]
    fn run_error_carries_reason_and_leftovers() {
        let mut record = fixture::record();
        record.verdict = Verdict::RevertFailed;
        record.exit_code = 4;
        record.reason = Some("revert of f-2 on node-b failed".into());
        record.leftovers = vec!["node-b f-2: vllm worker still stopped".into()];
        let xml = junit(&record);
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let root = doc.root_element();
        assert_eq!(attr(root, "tests"), "3");
        assert_eq!(attr(root, "errors"), "1");
        let run = doc
            .descendants()
            .find(|n| n.has_tag_name("testcase") && n.attribute("name") == Some("run"))
            .unwrap();
        let error = run.children().find(|n| n.has_tag_name("error")).unwrap();
        let message = attr(error, "message");
        assert!(
            message.contains("revert of f-2 on node-b failed"),
            "{message}"
        );
        assert!(message.contains("vllm worker still stopped"), "{message}");
    }

    #[test]
    fn escapes_names_and_drops_control_chars() {
        let mut record = fixture::record();
        let name = "p99 <&\"> 'fast'";
        record.objectives[0].name = name.into();
        record.objectives[0].detail = "bad\u{1}byte\nnext line".into();
        record.experiment = "a&b".into();
        for t in &mut record.trials {
            t.objectives[0].name = name.into();
        }
        let xml = junit(&record);
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let case = doc
            .descendants()
            .find(|n| n.has_tag_name("testcase"))
            .unwrap();
        assert_eq!(attr(case, "name"), name);
        assert_eq!(attr(case, "classname"), "gpuchaos.a&b");
        let failure = case.children().find(|n| n.has_tag_name("failure")).unwrap();
        let text = failure.text().unwrap();
        assert!(text.starts_with("badbyte\nnext line"), "{text}");
    }
}

//! `gpuchaos history`: the runs, newest first, then trends: the pass rate per game
//! day and each objective's measurements over time.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;

use super::serve::history_error;
use crate::exit::{self, CliError};
use crate::gameday::history::{GamedayRun, GamedayVerdict, Point, Store};
use crate::gameday::notify::rfc3339;
use crate::output::Output;
use crate::report::format_value;

pub struct Options<'a> {
    pub state_dir: &'a Path,
    pub gameday: Option<&'a str>,
    pub limit: usize,
    pub rebuild: bool,
}

/// Pass rate of a game day: runs that ran, and how many passed.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize)]
pub struct PassRate {
    pub gameday: String,
    pub ran: usize,
    pub passed: usize,
    pub missed: usize,
    pub skipped: usize,
    /// Oldest first, the verdicts of the runs that ran.
    pub recent: Vec<GamedayVerdict>,
}

/// One objective's measurements over time.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize)]
pub struct Trend {
    pub gameday: String,
    pub experiment: String,
    pub objective: String,
    pub kind: String,
    pub unit: String,
    /// (run, started, measured, passed), oldest first.
    pub points: Vec<(String, i64, Option<f64>, bool)>,
}

pub fn pass_rates(runs: &[GamedayRun]) -> Vec<PassRate> {
    let mut by: BTreeMap<&str, PassRate> = BTreeMap::new();
    for r in runs.iter().rev() {
        let p = by.entry(&r.gameday).or_insert_with(|| PassRate {
            gameday: r.gameday.clone(),
            ..Default::default()
        });
        match &r.verdict {
            GamedayVerdict::Missed => p.missed += r.missed_slots.max(1) as usize,
            GamedayVerdict::Skipped => p.skipped += 1,
            GamedayVerdict::Running => {}
            v => {
                p.ran += 1;
                p.passed += usize::from(*v == GamedayVerdict::Passed);
                p.recent.push(v.clone());
            }
        }
    }
    by.into_values().collect()
}

pub fn trends(points: &[Point]) -> Vec<Trend> {
    let mut by: BTreeMap<(String, String, String), Trend> = BTreeMap::new();
    for p in points {
        let t = by
            .entry((p.gameday.clone(), p.experiment.clone(), p.objective.clone()))
            .or_insert_with(|| Trend {
                gameday: p.gameday.clone(),
                experiment: p.experiment.clone(),
                objective: p.objective.clone(),
                kind: p.kind.clone(),
                unit: p.unit.clone(),
                points: Vec::new(),
            });
        t.points
            .push((p.run_id.clone(), p.started_unix_ms, p.measured, p.passed));
    }
    by.into_values().collect()
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Eight-level bars for a series (▁…█), `·` where nothing was measured.
pub fn sparkline(values: &[Option<f64>]) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let present: Vec<f64> = values.iter().flatten().copied().collect();
    let (lo, hi) = present
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
            (l.min(*v), h.max(*v))
        });
    values
        .iter()
        .map(|v| match v {
            None => '·',
            Some(_) if hi <= lo => BARS[3],
            Some(v) => BARS[(((v - lo) / (hi - lo)) * 7.0).round() as usize],
        })
        .collect()
}

pub fn run(output: Output, opts: Options<'_>) -> Result<u8, CliError> {
    let store = Store::open(opts.state_dir).map_err(history_error)?;
    if opts.rebuild {
        let n = store.rebuild().map_err(history_error)?;
        println!(
            "history: indexed {n} run{} from {}",
            if n == 1 { "" } else { "s" },
            store.runs_dir().display()
        );
    } else if let Err(e) = store.sync_pending() {
        eprintln!("warning: {e}");
    }
    let all = store
        .list(opts.gameday, usize::MAX >> 1)
        .map_err(history_error)?;
    let rates = pass_rates(&all);
    let runs = &all[..all.len().min(opts.limit)];
    let trends = trends(
        &store
            .objective_points(opts.gameday)
            .map_err(history_error)?,
    );
    let pending = store.pending_count();
    match output {
        Output::Json => {
            println!(
                "{}",
                json!({
                    "state_dir": store.dir,
                    "runs": runs,
                    "pass_rates": rates,
                    "trends": trends,
                    "history_pending": pending,
                })
            );
        }
        Output::Text => print_text(runs, &rates, &trends, pending, opts.gameday),
    }
    Ok(exit::OK)
}

fn print_text(
    runs: &[GamedayRun],
    rates: &[PassRate],
    trends: &[Trend],
    pending: usize,
    gameday: Option<&str>,
) {
    if runs.is_empty() {
        println!(
            "No runs{} in the history yet.",
            gameday.map(|g| format!(" of {g}")).unwrap_or_default()
        );
        return;
    }
    let mut rows = vec![[
        "RUN".to_string(),
        "STARTED (UTC)".into(),
        "TRIGGER".into(),
        "VERDICT".into(),
        "DURATION".into(),
        "EXPERIMENTS".into(),
        "REASON".into(),
    ]];
    for r in runs {
        let passed = r
            .experiments
            .iter()
            .filter(|e| e.verdict == GamedayVerdict::Passed)
            .count();
        rows.push([
            r.id.clone(),
            rfc3339(r.started_unix_ms)
                .replace('T', " ")
                .trim_end_matches('Z')
                .to_string(),
            r.trigger.clone(),
            r.verdict.to_string(),
            r.ended_unix_ms
                .filter(|_| r.ran())
                .map(|e| format_value((e - r.started_unix_ms) as f64 / 1000.0, "s"))
                .unwrap_or_else(|| "-".into()),
            if r.ran() {
                format!("{passed}/{} passed", r.experiments.len())
            } else {
                "-".into()
            },
            r.reason.clone().unwrap_or_default(),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for r in &rows {
        let mut line = String::new();
        for (i, w) in widths.iter().enumerate() {
            line += &format!("{:<w$}  ", r[i], w = w);
        }
        line += &r[6];
        println!("{}", line.trim_end());
    }
    println!("\nPass rate");
    for p in rates {
        let pct = if p.ran > 0 {
            100.0 * p.passed as f64 / p.ran as f64
        } else {
            0.0
        };
        let last: Vec<&str> = p
            .recent
            .iter()
            .rev()
            .take(10)
            .rev()
            .map(|v| {
                if *v == GamedayVerdict::Passed {
                    "✓"
                } else {
                    "✗"
                }
            })
            .collect();
        println!(
            "  {}: {}/{} runs passed ({pct:.0}%), last {}: {}{}{}",
            p.gameday,
            p.passed,
            p.ran,
            last.len(),
            last.concat(),
            if p.missed > 0 {
                format!("; {} slot(s) missed", p.missed)
            } else {
                String::new()
            },
            if p.skipped > 0 {
                format!("; {} skipped", p.skipped)
            } else {
                String::new()
            },
        );
    }
    if !trends.is_empty() {
        println!("\nTrends per objective (oldest → newest)");
        for t in trends {
            let values: Vec<Option<f64>> = t.points.iter().map(|p| p.2).collect();
            let present: Vec<f64> = values.iter().flatten().copied().collect();
            let held = t.points.iter().filter(|p| p.3).count();
            let recent: Vec<String> = t
                .points
                .iter()
                .rev()
                .take(6)
                .rev()
                .map(|p| {
                    p.2.map(|v| format_value(v, &t.unit))
                        .unwrap_or_else(|| "-".into())
                })
                .collect();
            let stat = |v: Option<f64>| {
                v.map(|v| format_value(v, &t.unit))
                    .unwrap_or_else(|| "-".into())
            };
            println!(
                "  {} / {} / {} ({}): {}  {}  min {} median {} max {}  held {}/{}",
                t.gameday,
                t.experiment,
                t.objective,
                t.kind,
                sparkline(&values),
                recent.join(" "),
                stat(present.iter().copied().reduce(f64::min)),
                stat(median(present.clone())),
                stat(present.iter().copied().reduce(f64::max)),
                held,
                t.points.len()
            );
        }
    }
    if pending > 0 {
        println!(
            "\n{pending} run result(s) wait to be added to the history database (see the warning above)."
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparklines_scale_between_min_and_max() {
        assert_eq!(sparkline(&[Some(1.0), Some(8.0), None, Some(4.5)]), "▁█·▅");
        assert_eq!(sparkline(&[Some(2.0), Some(2.0)]), "▄▄");
    }

    #[test]
    fn pass_rate_counts_only_runs_that_ran() {
        let run = |v: GamedayVerdict, n: u32| GamedayRun {
            gameday: "w".into(),
            verdict: v,
            missed_slots: n,
            ..Default::default()
        };
        // Newest first, as the history lists them.
        let runs = [
            run(GamedayVerdict::Failed, 0),
            run(GamedayVerdict::Missed, 3),
            run(GamedayVerdict::Passed, 0),
            run(GamedayVerdict::Skipped, 0),
            run(GamedayVerdict::Passed, 0),
        ];
        let p = &pass_rates(&runs)[0];
        assert_eq!((p.ran, p.passed, p.missed, p.skipped), (3, 2, 3, 1));
        assert_eq!(
            p.recent,
            [
                GamedayVerdict::Passed,
                GamedayVerdict::Passed,
                GamedayVerdict::Failed
            ]
        );
        // `--json` spells them as the history does.
        assert_eq!(
            serde_json::to_value(p).unwrap()["recent"],
            serde_json::json!(["passed", "passed", "failed"])
        );
    }
}

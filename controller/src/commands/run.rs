//! `gpuchaos run FILE [--report-dir DIR] [--dry-run]`: run an experiment.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use gpuchaos_proto::signal::Terminations;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::exit::{self, CliError};
use crate::experiment::load::{self, LoadError};
use crate::experiment::plan;
use crate::fleet::Fleet;
use crate::output::Output;
use crate::runner::record::RunRecord;
use crate::runner::{self, RunOptions};

pub struct Options<'a> {
    pub file: &'a Path,
    pub report_dir: Option<PathBuf>,
    pub dry_run: bool,
    pub seed: Option<u64>,
}

/// Prints load errors, one per line, and returns the invalid-input error.
pub fn load_errors(errs: &[LoadError]) -> CliError {
    let lines: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
    CliError::invalid(format!(
        "{} error{} in the experiment:\n{}",
        errs.len(),
        if errs.len() == 1 { "" } else { "s" },
        lines.join("\n")
    ))
}

pub async fn run(cli_fleet: &Fleet, output: Output, opts: Options<'_>) -> Result<u8, CliError> {
    let loaded = load::load_file(opts.file).map_err(|e| load_errors(&e))?;
    let fleet = runner::fleet_for(&loaded, cli_fleet);
    if opts.dry_run {
        let seed = opts.seed.unwrap_or_else(rand::random);
        for line in plan::dry_run(&loaded, &fleet, seed)? {
            println!("{line}");
        }
        return Ok(exit::OK);
    }
    let interrupt = CancellationToken::new();
    let reason = Arc::new(Mutex::new(String::new()));
    // Installed before the run starts, so that no signal in between is lost; one
    // that cannot be installed leaves Ctrl-C with its default effect (the agents
    // revert when the lease lapses).
    if let Ok(mut signals) = Terminations::install() {
        let interrupt = interrupt.clone();
        let reason = reason.clone();
        tokio::spawn(async move {
            let which = signals.recv().await;
            *reason.lock().unwrap() = which.to_string();
            interrupt.cancel();
        });
    }
    let ropts = RunOptions {
        file: opts.file.display().to_string(),
        report_dir: opts.report_dir.clone(),
        cli_fleet: cli_fleet.clone(),
        interrupt,
        interrupt_reason: reason,
        run_seed: opts.seed,
    };
    let (record, code) = runner::run(&loaded, &ropts).await?;
    match output {
        Output::Text => {
            println!("{}", crate::report::text_table(&record));
            if let Some(dir) = &opts.report_dir {
                println!("reports: {}", dir.join("report.html").display());
            }
        }
        Output::Json => {
            println!("{}", json_summary(&record, opts.report_dir.as_deref()));
        }
    }
    Ok(code)
}

/// What `--output json` prints: the verdict, the objectives, and per trial its
/// faults with their recovery phases (the journal's own structs, so the keys are
/// the journal's).
fn json_summary(record: &RunRecord, report_dir: Option<&Path>) -> Value {
    let trials: Vec<Value> = record
        .trials
        .iter()
        .map(|t| {
            let faults: Vec<Value> = t
                .faults
                .iter()
                .map(|f| {
                    json!({
                        "step": f.step,
                        "agent": crate::report::agent_name(record, f.agent),
                        "id": f.id,
                        "kind": f.kind,
                        "target": f.target,
                        "inject_ns": f.inject_ns,
                        "end_ns": f.end_ns,
                        "phase_probe": f.phase_probe,
                        "phases": f.phases,
                        "phase_durations": f.phase_durations,
                        "phase_notes": f.phase_notes,
                    })
                })
                .collect();
            json!({
                "index": t.index,
                "start_ns": t.start_ns,
                "end_ns": t.end_ns,
                "faults": faults,
            })
        })
        .collect();
    json!({
        "experiment": record.experiment,
        "verdict": record.verdict,
        "exit_code": record.exit_code,
        "reason": record.reason,
        "objectives": record.objectives,
        "leftovers": record.leftovers,
        "report_dir": report_dir,
        "trials": trials,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_output_keeps_its_keys_and_adds_the_trials_phases() {
        let record = crate::report::fixture::record();
        let v = json_summary(&record, Some(Path::new("reports/x")));
        for key in [
            "experiment",
            "verdict",
            "exit_code",
            "reason",
            "objectives",
            "leftovers",
            "report_dir",
            "trials",
        ] {
            assert!(v.get(key).is_some(), "{key}: {v}");
        }
        assert_eq!(v["verdict"], "failed");
        assert_eq!(v["report_dir"], "reports/x");
        let f = &v["trials"][0]["faults"][0];
        assert_eq!(v["trials"][0]["index"], 1);
        assert_eq!(f["step"], "kill-worker");
        assert_eq!(f["agent"], "node-a");
        assert_eq!(f["id"], "f-1");
        assert_eq!(f["kind"], "process-kill");
        assert_eq!(f["target"], "pid 4242 (vllm)");
        assert_eq!(f["inject_ns"], 10_000_000_000u64);
        assert_eq!(f["end_ns"], 12_000_000_000u64);
        // Every phase key is present, null when not observed.
        let phases = f["phases"].as_object().unwrap();
        assert_eq!(phases.len(), 7, "{phases:?}");
        assert!(phases["masked"].is_null() && phases["ready"].is_null());
        assert_eq!(phases["replaced"]["pid"], 4321);
        assert_eq!(phases["gpu_ready"]["gpu_bytes"], 2u64 << 30);
        assert_eq!(phases["detected"]["probe"], "chat");
        assert_eq!(f["phase_durations"]["replace"], 2.5);
        assert!(f["phase_durations"]["cold_start"].is_null());
        assert_eq!(
            f["phase_notes"]["masked"],
            "chat did not pass 3 in a row while the fault was active"
        );
        // Trial 2's fault: no phases, every key null; the fault never ended.
        let g = &v["trials"][1]["faults"][0];
        assert!(
            g["phases"]
                .as_object()
                .unwrap()
                .values()
                .all(Value::is_null)
        );
        assert!(g["end_ns"].is_null());
        assert_eq!(g["agent"], "node-b");
        // What the phases say reads back as the journal's types.
        let back: crate::runner::record::Phases =
            serde_json::from_value(f["phases"].clone()).unwrap();
        assert_eq!(back, record.trials[0].faults[0].phases);
    }
}

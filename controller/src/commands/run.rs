//! `gpuchaos run FILE [--report-dir DIR] [--dry-run]`: run an experiment.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use gpuchaos_proto::signal::Terminations;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::exit::{self, CliError};
use crate::experiment::load::{self, LoadError};
use crate::experiment::plan;
use crate::fleet::Fleet;
use crate::output::Output;
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
            println!(
                "{}",
                json!({
                    "experiment": record.experiment,
                    "verdict": record.verdict,
                    "exit_code": record.exit_code,
                    "reason": record.reason,
                    "objectives": record.objectives,
                    "leftovers": record.leftovers,
                    "report_dir": opts.report_dir,
                })
            );
        }
    }
    Ok(code)
}

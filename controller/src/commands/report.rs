//! `gpuchaos report RUN [--out DIR]`: regenerate a game-day run's reports from the
//! journals kept in the history (the run's folder is used when the index has none).

use std::path::{Path, PathBuf};

use serde_json::json;

use super::serve::history_error;
use crate::exit::{self, CliError};
use crate::gameday::history::{GamedayVerdict, Store};
use crate::output::Output;
use crate::runner::record::RunRecord;

pub struct Options<'a> {
    pub state_dir: &'a Path,
    pub run: &'a str,
    pub out: Option<PathBuf>,
}

pub fn run(output: Output, opts: Options<'_>) -> Result<u8, CliError> {
    let store = Store::open(opts.state_dir).map_err(history_error)?;
    let _ = store.sync_pending();
    let run = store.get(opts.run).map_err(history_error)?;
    let base = opts.out.clone().unwrap_or_else(|| store.run_dir(&run.id));
    let mut written = Vec::new();
    let mut problems = Vec::new();
    for e in &run.experiments {
        let Some(rel) = &e.report_dir else {
            if e.verdict != GamedayVerdict::NotRun {
                problems.push(format!(
                    "experiment {} has no journal ({}{})",
                    e.name,
                    e.verdict,
                    e.reason
                        .as_ref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                ));
            }
            continue;
        };
        let journal = match store.journal(&run.id, e.seq).map_err(history_error)? {
            Some(j) => j,
            None => {
                let p = store.run_dir(&run.id).join(rel).join("journal.json");
                match std::fs::read_to_string(&p) {
                    Ok(j) => j,
                    Err(err) => {
                        problems.push(format!(
                            "experiment {}: no journal in the history and none at {} ({err})",
                            e.name,
                            p.display()
                        ));
                        continue;
                    }
                }
            }
        };
        let record: RunRecord = serde_json::from_str(&journal).map_err(|err| {
            CliError::new(
                exit::IO_ERROR,
                format!(
                    "experiment {}: the stored journal does not parse: {err}",
                    e.name
                ),
            )
        })?;
        let dir = base.join(rel);
        let files = crate::report::write_all(&record, &dir).map_err(|err| {
            CliError::new(
                exit::IO_ERROR,
                format!("cannot write the reports into {}: {err}", dir.display()),
            )
        })?;
        written.push((e.name.clone(), files));
    }
    match output {
        Output::Json => println!(
            "{}",
            json!({
                "run": run.id,
                "verdict": run.verdict,
                "reports": written.iter().map(|(n, f)| json!({"experiment": n, "files": f})).collect::<Vec<_>>(),
                "problems": problems,
            })
        ),
        Output::Text => {
            println!("run {}: {} ({})", run.id, run.verdict, run.gameday);
            for (name, files) in &written {
                println!("  {name}:");
                for f in files {
                    println!("    {}", f.display());
                }
            }
            for p in &problems {
                println!("  {p}");
            }
        }
    }
    if written.is_empty() {
        return Err(CliError::invalid(format!(
            "run {} has no experiment reports to regenerate ({})",
            run.id,
            run.reason.as_deref().unwrap_or(run.verdict.as_str())
        )));
    }
    Ok(exit::OK)
}

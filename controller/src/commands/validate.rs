//! `gpuchaos validate FILE...`: check experiments, game days and fault specs, reporting every
//! error of every file with file, line, column and field path.

use std::path::PathBuf;

use crate::exit::{self, CliError};
use crate::experiment::{load, yaml};

use super::inject::parse_specs;

/// A file of fault specs (every document has a `kind` and no `method`), rather
/// than an experiment.
fn is_fault_spec(text: &str) -> bool {
    match yaml::parse_documents(text) {
        Ok(docs) => {
            !docs.is_empty()
                && docs
                    .iter()
                    .all(|d| d.get("kind").is_some() && d.get("method").is_none())
        }
        Err(_) => false,
    }
}

pub fn run(files: &[PathBuf]) -> Result<u8, CliError> {
    if files.is_empty() {
        return Err(CliError::invalid("validate: name at least one file"));
    }
    let mut code = exit::OK;
    for f in files {
        let text = match std::fs::read_to_string(f) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{}: cannot read: {e}", f.display());
                code = exit::INVALID_INPUT;
                continue;
            }
        };
        if crate::gameday::file::looks_like_gameday(&text) {
            let base = f
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .to_path_buf();
            match crate::gameday::file::load_str(&text, &f.display().to_string(), f, &base) {
                Ok(g) => {
                    let next = g
                        .schedule
                        .next_after(jiff::Timestamp::now())
                        .map(|t| g.schedule.local(t))
                        .unwrap_or_else(|| "never".into());
                    println!(
                        "{}: ok (game day {}: {}, next {}; {} experiment{}, max {}, {} blackout{}, {} notification{})",
                        f.display(),
                        g.name,
                        g.schedule.describe(),
                        next,
                        g.experiments.len(),
                        plural(g.experiments.len()),
                        humantime::format_duration(g.max_duration),
                        g.blackouts.len(),
                        plural(g.blackouts.len()),
                        g.notify.len(),
                        plural(g.notify.len())
                    );
                }
                Err(errs) => {
                    for e in errs {
                        eprintln!("{e}");
                    }
                    code = exit::INVALID_INPUT;
                }
            }
            continue;
        }
        if is_fault_spec(&text) {
            match parse_specs(&f.display().to_string(), &text) {
                Ok(specs) => println!(
                    "{}: ok ({} fault spec{})",
                    f.display(),
                    specs.len(),
                    if specs.len() == 1 { "" } else { "s" }
                ),
                Err(e) => {
                    eprintln!("{}", e.message);
                    code = exit::INVALID_INPUT;
                }
            }
            continue;
        }
        match load::load_text(f, &text) {
            Ok(l) => {
                let e = &l.experiment;
                println!(
                    "{}: ok (experiment {}: {} probe{}, {} step{}, {} objective{}, {} trial{})",
                    f.display(),
                    e.metadata.name,
                    e.probes.len(),
                    plural(e.probes.len()),
                    e.method.len(),
                    plural(e.method.len()),
                    e.objectives.len(),
                    plural(e.objectives.len()),
                    e.trials,
                    plural(e.trials as usize)
                );
            }
            Err(errs) => {
                for e in errs {
                    eprintln!("{e}");
                }
                code = exit::INVALID_INPUT;
            }
        }
    }
    Ok(code)
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

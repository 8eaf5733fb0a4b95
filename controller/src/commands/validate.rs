//! `gpuchaos validate FILE|DIR...`: check experiments, game days and fault specs, reporting
//! every error of every file with file, line, column and field path. A directory stands
//! for the YAML files under it.

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
    let mut expanded = Vec::new();
    for f in files {
        if f.is_dir() {
            let before = expanded.len();
            yaml_files_in(f, &mut expanded);
            if expanded.len() == before {
                eprintln!(
                    "{}: a directory with no .yaml or .yml files in it",
                    f.display()
                );
                code = exit::INVALID_INPUT;
            }
        } else {
            expanded.push(f.clone());
        }
    }
    for f in &expanded {
        let text =
            match gpuchaos_proto::files::read_text_capped(f, gpuchaos_proto::files::MAX_YAML_BYTES)
            {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("{e}");
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

/// The YAML files under `dir` (its subdirectories too, hidden ones skipped), sorted.
fn yaml_files_in(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        let hidden = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        // Symlinked directories are not followed (a link to `.` would never end);
        // symlinked files are read like any other.
        let is_real_dir = std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_dir());
        if is_real_dir {
            yaml_files_in(&p, out);
        } else if p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e == "yaml" || e == "yml")
        {
            out.push(p);
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

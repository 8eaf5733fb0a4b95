//! `gpuchaos validate FILE|DIR...`: check experiments, game days and fault specs, reporting
//! every error of every file with file, line, column and field path. A directory stands
//! for the YAML files under it.

use std::path::PathBuf;

use gpuchaos_proto::spec::FaultSpec;
use serde::Serialize;

use crate::exit::{self, CliError};
use crate::experiment::{load, yaml};
use crate::output::Output;

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

/// One problem found, located.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Problem {
    pub file: String,
    /// 1-based; absent when the problem is the file as a whole.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<u64>,
    /// Field path (`probes[1].http.url`); empty for the whole document.
    pub field: String,
    pub message: String,
    /// The message names the file itself (`cannot read F: …`): said as it is.
    #[serde(skip)]
    pub names_file: bool,
}

impl From<load::LoadError> for Problem {
    fn from(e: load::LoadError) -> Self {
        Problem {
            file: e.file,
            line: (e.line > 0).then_some(e.line),
            column: (e.line > 0).then_some(e.column),
            field: e.path,
            message: e.message,
            names_file: false,
        }
    }
}

/// What one file was found to be.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Checked {
    pub file: String,
    /// `experiment`, `gameday`, `fault-spec`, or empty when it could not be told.
    pub kind: &'static str,
    pub ok: bool,
    /// One line: `experiment NAME: 2 probes, …` (empty when not ok).
    pub summary: String,
    pub problems: Vec<Problem>,
}

pub fn run(files: &[PathBuf], output: Output) -> Result<u8, CliError> {
    if files.is_empty() {
        return Err(CliError::invalid("validate: name at least one file"));
    }
    let mut checked = Vec::new();
    for f in files {
        if f.is_dir() {
            let mut found = Vec::new();
            yaml_files_in(f, &mut found);
            if found.is_empty() {
                checked.push(failed(
                    f,
                    "",
                    whole(f, "a directory with no .yaml or .yml files in it"),
                ));
            }
            checked.extend(found.iter().map(|f| check_file(f)));
        } else {
            checked.push(check_file(f));
        }
    }
    match output {
        Output::Json => {
            let v = serde_json::json!({
                "ok": checked.iter().all(|c| c.ok),
                "files": checked,
            });
            println!("{v}");
        }
        Output::Text => {
            for c in &checked {
                if c.ok {
                    if !crate::output::quiet() {
                        println!("{}: ok ({})", c.file, c.summary);
                    }
                } else {
                    for p in &c.problems {
                        eprintln!("{p}");
                    }
                }
            }
        }
    }
    Ok(if checked.iter().all(|c| c.ok) {
        exit::OK
    } else {
        exit::INVALID_INPUT
    })
}

impl Problem {
    /// A fault spec's field error, in `file`.
    pub fn of_field(file: &str, fe: gpuchaos_proto::spec::FieldError) -> Self {
        Problem {
            file: file.to_string(),
            line: fe.line,
            column: fe.column,
            field: fe.field,
            message: fe.message,
            names_file: false,
        }
    }
}

/// `FILE:LINE:COL: field: message`, as compilers say it.
impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let loc = match (self.line, self.column) {
            (Some(l), Some(c)) => format!("{}:{l}:{c}", self.file),
            _ if self.names_file => return f.write_str(&self.message),
            _ => self.file.clone(),
        };
        if self.field.is_empty() {
            write!(f, "{loc}: {}", self.message)
        } else {
            write!(f, "{loc}: {}: {}", self.field, self.message)
        }
    }
}

fn whole(f: &std::path::Path, message: impl Into<String>) -> Problem {
    Problem {
        file: f.display().to_string(),
        line: None,
        column: None,
        field: String::new(),
        message: message.into(),
        names_file: false,
    }
}

fn failed(f: &std::path::Path, kind: &'static str, p: Problem) -> Checked {
    Checked {
        file: f.display().to_string(),
        kind,
        ok: false,
        summary: String::new(),
        problems: vec![p],
    }
}

fn check_file(f: &std::path::Path) -> Checked {
    let name = f.display().to_string();
    let text =
        match gpuchaos_proto::files::read_text_capped(f, gpuchaos_proto::files::MAX_YAML_BYTES) {
            Ok(t) => t,
            Err(e) => {
                let p = Problem {
                    names_file: true,
                    ..whole(f, e.to_string())
                };
                return failed(f, "", p);
            }
        };
    let done = |kind, r: Result<String, Vec<Problem>>| match r {
        Ok(summary) => Checked {
            file: name.clone(),
            kind,
            ok: true,
            summary,
            problems: vec![],
        },
        Err(problems) => Checked {
            file: name.clone(),
            kind,
            ok: false,
            summary: String::new(),
            problems,
        },
    };
    if crate::gameday::file::looks_like_gameday(&text) {
        let base = f
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .to_path_buf();
        let r = crate::gameday::file::load_str(&text, &name, f, &base)
            .map(|g| {
                let next = g
                    .schedule
                    .next_after(jiff::Timestamp::now())
                    .map(|t| g.schedule.local(t))
                    .unwrap_or_else(|| "never".into());
                format!(
                    "game day {}: {}, next {}; {} experiment{}, max {}, {} blackout{}, {} notification{}",
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
                )
            })
            .map_err(|errs| errs.into_iter().map(Problem::from).collect());
        return done("gameday", r);
    }
    if is_fault_spec(&text) {
        let r = FaultSpec::from_yaml_multi(&text)
            .map(|specs| {
                format!(
                    "{} fault spec{}",
                    specs.len(),
                    if specs.len() == 1 { "" } else { "s" }
                )
            })
            .map_err(|e| {
                e.0.into_iter()
                    .map(|fe| Problem::of_field(&name, fe))
                    .collect()
            });
        return done("fault-spec", r);
    }
    let r = load::load_text(f, &text)
        .map(|l| {
            let e = &l.experiment;
            format!(
                "experiment {}: {} probe{}, {} step{}, {} objective{}, {} trial{}",
                e.metadata.name,
                e.probes.len(),
                plural(e.probes.len()),
                e.method.len(),
                plural(e.method.len()),
                e.objectives.len(),
                plural(e.objectives.len()),
                e.trials,
                plural(e.trials as usize)
            )
        })
        .map_err(|errs| errs.into_iter().map(Problem::from).collect());
    done("experiment", r)
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

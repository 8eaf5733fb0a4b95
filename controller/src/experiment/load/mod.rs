//! Loading an experiment: every error at once, each with file, line, column and path.
//!
//! 1. The YAML is parsed into a located tree ([`super::yaml`]); a syntax error ends
//!    here (nothing after it can be trusted).
//! 2. Each section, and each element of a list section, is typed on its own, so one
//!    bad probe does not hide a bad step.
//! 3. Semantic checks run on what typed, one module per section ([`fleet`]:
//!    metadata, agents, fleet, lease, trials; [`probes`]; [`steady`]; [`method`];
//!    [`objectives`]; [`stop`]): references between sections, ranges, regexes,
//!    addresses, agent selections against the known agents. They build the
//!    [`ValidExperiment`] as they go, each probe reference resolved to its index;
//!    it is handed out only when no error was found.

mod fleet;
mod method;
mod objectives;
mod probes;
mod steady;
mod stop;

pub use probes::probe_kind;

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use super::yaml::{self, Loc, Node, Path as FieldPath, Value};
use super::*;

/// One problem, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    pub file: String,
    pub line: u64,
    pub column: u64,
    /// Field path (`probes[1].http.url`); empty for the whole file.
    pub path: String,
    pub message: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if self.path.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.path, self.message)
        }
    }
}

/// A loaded experiment and what it was loaded from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub experiment: ValidExperiment,
    /// The file's directory: fleet and TLS paths are relative to it.
    pub base_dir: PathBuf,
    /// The agents the experiment names itself (its `agents`, or its fleet file's).
    /// Empty: the command line's `--agent`/`--fleet` decide.
    pub agents: Vec<AgentRef>,
    pub tls: Option<TlsClient>,
}

pub const SECTIONS: &[&str] = &[
    "metadata",
    "agents",
    "fleet",
    "tls",
    "lease",
    "probes",
    "steady_state",
    "method",
    "objectives",
    "stop_conditions",
    "trials",
    "observe",
];

/// Loads and validates an experiment file.
pub fn load_file(path: &Path) -> Result<Loaded, Vec<LoadError>> {
    let text = gpuchaos_proto::files::read_text_capped(path, gpuchaos_proto::files::MAX_YAML_BYTES)
        .map_err(|e| {
            vec![LoadError {
                file: path.display().to_string(),
                line: 0,
                column: 0,
                path: String::new(),
                message: e.0,
            }]
        })?;
    load_text(path, &text)
}

/// Loads and validates the text of an experiment file already read from `path`
/// (fleet and TLS paths are relative to its directory).
pub fn load_text(path: &Path, text: &str) -> Result<Loaded, Vec<LoadError>> {
    let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    load_str(text, &path.display().to_string(), &base, &stem)
}

/// Loads and validates experiment text. `default_name` names an experiment whose
/// metadata has none.
pub fn load_str(
    text: &str,
    file: &str,
    base: &Path,
    default_name: &str,
) -> Result<Loaded, Vec<LoadError>> {
    let root = parse_root(text, file).map_err(|e| vec![e])?;
    let mut cx = Cx::new(&root, file);
    let experiment = cx.type_sections(default_name);
    let (agents, tls) = fleet::agents_and_tls(&experiment, base, &mut cx);
    let valid = check(&experiment, &agents, &mut cx);
    if cx.errors.is_empty() {
        Ok(Loaded {
            experiment: valid,
            base_dir: base.to_path_buf(),
            agents,
            tls,
        })
    } else {
        Err(cx.into_errors())
    }
}

/// The one YAML document of the file, if it can be an experiment at all (a syntax
/// error, an empty file or a fault spec ends loading here).
fn parse_root(text: &str, file: &str) -> Result<Node, LoadError> {
    let err_at = |loc: Loc, message: String| LoadError {
        file: file.to_string(),
        line: loc.line,
        column: loc.column,
        path: String::new(),
        message,
    };
    let mut docs = match yaml::parse_documents(text) {
        Ok(d) => d,
        Err(e) => {
            let fe = gpuchaos_proto::spec::yaml_error(e).0.remove(0);
            let (loc, message) = match yaml::duplicate_key_location(&fe.message) {
                Some(found) => found,
                None => (
                    Loc {
                        line: fe.line.unwrap_or(0),
                        column: fe.column.unwrap_or(0),
                    },
                    fe.message,
                ),
            };
            return Err(err_at(loc, message));
        }
    };
    let root = match docs.len() {
        1 => docs.remove(0),
        0 => {
            return Err(err_at(
                Loc::default(),
                "the file is empty: an experiment needs at least probes and a method".into(),
            ));
        }
        n => {
            return Err(err_at(
                docs[1].loc,
                format!(
                    "an experiment file holds one YAML document, this one has {n}: split it into several files"
                ),
            ));
        }
    };
    if !matches!(root.value, Value::Map(_)) {
        return Err(err_at(
            root.loc,
            format!(
                "an experiment is a map of sections ({}), not {}",
                SECTIONS.join(", "),
                root.type_name()
            ),
        ));
    }
    if root.get("kind").is_some() && root.get("method").is_none() {
        return Err(err_at(
            root.loc,
            "this is a fault spec, not an experiment: use it with `gpuchaos inject -f`, or put it under `method: [{fault: ...}]`".into(),
        ));
    }
    Ok(root)
}

/// The closest known word, when it is close enough to be a typo.
pub fn suggest<'a>(word: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (levenshtein(word, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Typing and locating: turns YAML nodes into typed values, collecting every
/// error with its line, column and field path.
pub(crate) struct Cx<'a> {
    root: &'a Node,
    file: &'a str,
    errors: Vec<LoadError>,
    /// For list sections: the source index of each element that typed.
    index: HashMap<&'static str, Vec<usize>>,
    /// Names of elements that failed to type: references to them are not reported
    /// again as "does not exist".
    broken_names: BTreeSet<String>,
}

impl<'a> Cx<'a> {
    pub(crate) fn new(root: &'a Node, file: &'a str) -> Cx<'a> {
        Cx {
            root,
            file,
            errors: Vec::new(),
            index: HashMap::new(),
            broken_names: BTreeSet::new(),
        }
    }

    /// The errors so far, in file order.
    pub(crate) fn into_errors(mut self) -> Vec<LoadError> {
        self.errors.sort_by_key(|e| (e.line, e.column));
        self.errors
    }

    /// Flags unknown sections and types each known one on its own (each element of
    /// a list section too), so one bad probe does not hide a bad step.
    fn type_sections(&mut self, default_name: &str) -> Experiment {
        if let Value::Map(entries) = &self.root.value {
            for (k, _) in entries {
                if !SECTIONS.contains(&k.name.as_str()) {
                    let hint = suggest(&k.name, SECTIONS)
                        .map(|s| format!(" (did you mean `{s}`?)"))
                        .unwrap_or_default();
                    self.errors.push(LoadError {
                        file: self.file.to_string(),
                        line: k.loc.line,
                        column: k.loc.column,
                        path: k.name.clone(),
                        message: format!(
                            "unknown section{hint}: expected one of {}",
                            SECTIONS.join(", ")
                        ),
                    });
                }
            }
        }
        let mut experiment = Experiment {
            metadata: self.section("metadata").unwrap_or_default(),
            agents: self.list("agents"),
            fleet: self.section("fleet"),
            tls: self.section("tls"),
            lease: self.section("lease"),
            probes: self.list("probes"),
            steady_state: self.section("steady_state"),
            method: self.list("method"),
            objectives: self.list("objectives"),
            stop_conditions: self.list("stop_conditions"),
            trials: self.section("trials").unwrap_or(1),
            observe: self.section("observe"),
        };
        if experiment.metadata.name.is_empty() {
            experiment.metadata.name = default_name.to_string();
        }
        experiment
    }

    pub(crate) fn error(&mut self, path: &FieldPath, message: impl Into<String>) {
        let loc = self.root.locate(path);
        self.errors.push(LoadError {
            file: self.file.to_string(),
            line: loc.line,
            column: loc.column,
            path: path.to_string(),
            message: gpuchaos_proto::spec::shorten_quoted(&message.into()),
        });
    }

    /// Types one node, recording a located error on failure.
    pub(crate) fn typed<T: DeserializeOwned>(&mut self, node: &Node, at: &FieldPath) -> Option<T> {
        match serde_path_to_error::deserialize::<_, T>(node.to_json()) {
            Ok(v) => Some(v),
            Err(e) => {
                let inner = e.inner().to_string();
                let mut path = at.join_dotted(&e.path().to_string());
                let mut message = clean(&inner);
                // "unknown field `x`": point at the key itself.
                let mut loc = None;
                if let Some(field) = backticked(&inner, "unknown field `") {
                    if path.0.last() == Some(&yaml::Seg::Key(field.clone())) {
                        path.0.pop();
                    }
                    loc = self.root.locate_key(&path, &field);
                    let expected = expected_list(&inner);
                    let hint = suggest(
                        &field,
                        &expected.iter().map(String::as_str).collect::<Vec<_>>(),
                    )
                    .map(|s| format!(" (did you mean `{s}`?)"))
                    .unwrap_or_default();
                    message = format!(
                        "unknown field `{field}`{hint}: expected one of {}",
                        expected.join(", ")
                    );
                    path = path.key(&field);
                }
                let loc = loc.unwrap_or_else(|| self.root.locate(&path));
                self.errors.push(LoadError {
                    file: self.file.to_string(),
                    line: loc.line,
                    column: loc.column,
                    path: path.to_string(),
                    message,
                });
                None
            }
        }
    }

    pub(crate) fn section<T: DeserializeOwned>(&mut self, key: &'static str) -> Option<T> {
        let node = self.root.get(key)?;
        self.typed(node, &FieldPath::root().key(key))
    }

    pub(crate) fn list<T: DeserializeOwned>(&mut self, key: &'static str) -> Vec<T> {
        let Some(node) = self.root.get(key) else {
            self.index.insert(key, Vec::new());
            return Vec::new();
        };
        let at = FieldPath::root().key(key);
        let Value::Seq(items) = &node.value else {
            if node.value != Value::Null {
                self.error(&at, format!("must be a list, not {}", node.type_name()));
            }
            self.index.insert(key, Vec::new());
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut idx = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match self.typed(item, &at.index(i)) {
                Some(v) => {
                    out.push(v);
                    idx.push(i);
                }
                None => {
                    if let Some(Value::Str(n)) = item.get("name").map(|n| &n.value) {
                        self.broken_names.insert(n.clone());
                    }
                }
            }
        }
        self.index.insert(key, idx);
        out
    }

    /// The source path of the `i`th typed element of a list section.
    fn at(&self, key: &'static str, i: usize) -> FieldPath {
        let src = self
            .index
            .get(key)
            .and_then(|v| v.get(i))
            .copied()
            .unwrap_or(i);
        FieldPath::root().key(key).index(src)
    }
}

fn backticked(msg: &str, prefix: &str) -> Option<String> {
    let start = msg.find(prefix)? + prefix.len();
    let end = msg[start..].find('`')? + start;
    Some(msg[start..end].to_string())
}

fn expected_list(msg: &str) -> Vec<String> {
    let Some(i) = msg.find("expected ") else {
        return Vec::new();
    };
    msg[i..]
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

fn clean(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

fn check_regex(cx: &mut Cx, path: FieldPath, re: &Option<String>) {
    if let Some(re) = re
        && let Err(e) = gpuchaos_proto::spec::compile_regex(re)
    {
        cx.error(&path, e);
    }
}

fn check_url(cx: &mut Cx, path: FieldPath, url: &str) {
    match url.parse::<hyper::Uri>() {
        Ok(u)
            if matches!(u.scheme_str(), Some("http") | Some("https"))
                && u.host().is_some_and(|h| !h.is_empty()) => {}
        _ => cx.error(
            &path,
            format!("{url:?} is not an http:// or https:// URL with a host"),
        ),
    }
}

fn check_prom(cx: &mut Cx, path: FieldPath, p: &PromCheck) {
    check_url(cx, path.key("url"), &p.url);
    if p.query.trim().is_empty() {
        cx.error(&path.key("query"), "the query is empty");
    }
    if crate::probe::Cmp::parse(&p.op).is_none() {
        cx.error(
            &path.key("op"),
            format!("unknown comparison {:?}: use one of < <= > >= == !=", p.op),
        );
    }
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Semantic checks on the typed sections, section by section, into the validated
/// experiment. What it returns is complete only when no error was recorded.
fn check(e: &Experiment, agents: &[AgentRef], cx: &mut Cx) -> ValidExperiment {
    fleet::check(e, cx);
    let (probes, names) = probes::check(e, cx);
    let steady_state = e
        .steady_state
        .as_ref()
        .and_then(|s| steady::check(s, &names, cx));
    let (method, step_names) = method::check(e, agents, cx);
    let objectives = objectives::check(e, &names, &step_names, cx);
    let stop_conditions = stop::check(e, &names, cx);
    ValidExperiment {
        metadata: e.metadata.clone(),
        lease: e.lease(),
        probes,
        steady_state,
        method,
        objectives,
        stop_conditions,
        trials: e.trials,
        observe: e.observe.map(|d| d.0),
    }
}

#[cfg(test)]
mod tests;

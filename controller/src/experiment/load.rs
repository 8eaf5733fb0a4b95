//! Loading an experiment: every error at once, each with file, line, column and path.
//!
//! 1. The YAML is parsed into a located tree ([`super::yaml`]); a syntax error ends
//!    here (nothing after it can be trusted).
//! 2. Each section, and each element of a list section, is typed on its own, so one
//!    bad probe does not hide a bad step.
//! 3. Semantic checks run on what typed: references between sections, ranges,
//!    regexes, addresses, agent selections against the known agents.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use super::yaml::{self, Loc, Node, Path as FieldPath, Value};
use super::*;
use crate::fleet::{FleetFile, parse_address};

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
    pub experiment: Experiment,
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
    let err_at = |loc: Loc, path: String, message: String| LoadError {
        file: file.to_string(),
        line: loc.line,
        column: loc.column,
        path,
        message,
    };
    let docs = match yaml::parse_documents(text) {
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
            return Err(vec![err_at(loc, String::new(), message)]);
        }
    };
    let root = match docs.as_slice() {
        [one] => one,
        [] => {
            return Err(vec![err_at(
                Loc::default(),
                String::new(),
                "the file is empty: an experiment needs at least probes and a method".into(),
            )]);
        }
        [_, second, ..] => {
            return Err(vec![err_at(
                second.loc,
                String::new(),
                format!(
                    "an experiment file holds one YAML document, this one has {}: split it into several files",
                    docs.len()
                ),
            )]);
        }
    };
    let Value::Map(entries) = &root.value else {
        return Err(vec![err_at(
            root.loc,
            String::new(),
            format!(
                "an experiment is a map of sections ({}), not {}",
                SECTIONS.join(", "),
                root.type_name()
            ),
        )]);
    };
    if root.get("kind").is_some() && root.get("method").is_none() {
        return Err(vec![err_at(
            root.loc,
            String::new(),
            "this is a fault spec, not an experiment: use it with `gpuchaos inject -f`, or put it under `method: [{fault: ...}]`".into(),
        )]);
    }
    let mut cx = Cx::new(root, file);
    for (k, _) in entries {
        if !SECTIONS.contains(&k.name.as_str()) {
            let hint = suggest(&k.name, SECTIONS)
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            cx.errors.push(err_at(
                k.loc,
                k.name.clone(),
                format!(
                    "unknown section{hint}: expected one of {}",
                    SECTIONS.join(", ")
                ),
            ));
        }
    }
    let mut experiment = Experiment {
        metadata: cx.section("metadata").unwrap_or_default(),
        agents: cx.list("agents"),
        fleet: cx.section("fleet"),
        tls: cx.section("tls"),
        lease: cx.section("lease"),
        probes: cx.list("probes"),
        steady_state: cx.section("steady_state"),
        method: cx.list("method"),
        objectives: cx.list("objectives"),
        stop_conditions: cx.list("stop_conditions"),
        trials: cx.section("trials").unwrap_or(1),
    };
    if experiment.metadata.name.is_empty() {
        experiment.metadata.name = default_name.to_string();
    }
    // The fleet file, so selections can be checked against real agent names.
    let mut agents = experiment.agents.clone();
    let mut tls = experiment.tls.clone().map(|t| relative_tls(base, t));
    if let Some(f) = &experiment.fleet {
        let fpath = base.join(f);
        match gpuchaos_proto::files::read_text_capped(&fpath, gpuchaos_proto::files::MAX_YAML_BYTES)
            .map_err(|e| format!("fleet file: {e}"))
            .and_then(|t| {
                serde_saphyr::from_str::<FleetFile>(&t).map_err(|e| {
                    format!(
                        "fleet file {}: {}",
                        fpath.display(),
                        gpuchaos_proto::spec::yaml_error(e)
                    )
                })
            }) {
            Ok(ff) => {
                let fbase = fpath.parent().unwrap_or(base);
                if tls.is_none() {
                    tls = ff.tls.map(|t| relative_tls(fbase, t));
                }
                agents.extend(ff.agents);
            }
            Err(m) => cx.error(&FieldPath::root().key("fleet"), m),
        }
    }
    check(&experiment, &agents, &mut cx);
    if cx.errors.is_empty() {
        Ok(Loaded {
            experiment,
            base_dir: base.to_path_buf(),
            agents,
            tls,
        })
    } else {
        cx.errors.sort_by_key(|e| (e.line, e.column));
        Err(cx.errors)
    }
}

fn relative_tls(base: &Path, t: TlsClient) -> TlsClient {
    let r = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
    TlsClient {
        ca: r(t.ca),
        cert: r(t.cert),
        key: r(t.key),
        server_name: t.server_name,
    }
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

/// Semantic checks on the typed experiment.
fn check(e: &Experiment, agents: &[AgentRef], cx: &mut Cx) {
    let root = FieldPath::root();
    if !e.agents.is_empty() && e.fleet.is_some() {
        cx.error(
            &root.key("fleet"),
            "give either `agents` or `fleet`, not both",
        );
    }
    let mut agent_names = BTreeSet::new();
    for (i, a) in e.agents.iter().enumerate() {
        let p = cx.at("agents", i);
        if let Err(err) = parse_address(&a.address) {
            cx.error(&p.key("address"), err.message);
        }
        if !a.name.is_empty() && !agent_names.insert(a.name.clone()) {
            cx.error(
                &p.key("name"),
                format!("agent name {:?} is used twice", a.name),
            );
        }
    }
    if let Some(l) = e.lease
        && l.0 < std::time::Duration::from_secs(1)
    {
        cx.error(
            &root.key("lease"),
            format!("{l} is too short: a lease must be at least 1s so that renewals can keep it"),
        );
    }
    if !(1..=1000).contains(&e.trials) {
        cx.error(&root.key("trials"), "must be between 1 and 1000");
    }

    // Probes.
    let mut probe_names = BTreeSet::new();
    for (i, p) in e.probes.iter().enumerate() {
        let at = cx.at("probes", i);
        if !valid_name(&p.name) {
            cx.error(
                &at.key("name"),
                format!(
                    "{:?} is not a probe name: use letters, digits, - _ or . (at most 64)",
                    p.name
                ),
            );
        } else if !probe_names.insert(p.name.clone()) {
            cx.error(
                &at.key("name"),
                format!("probe {:?} is defined twice", p.name),
            );
        }
        match p.kinds().len() {
            1 => {}
            0 => cx.error(
                &at,
                format!(
                    "probe {:?} has no kind: give exactly one of {}",
                    p.name,
                    PROBE_KINDS.join(", ")
                ),
            ),
            _ => cx.error(
                &at,
                format!(
                    "probe {:?} has several kinds: give exactly one of {}",
                    p.name,
                    PROBE_KINDS.join(", ")
                ),
            ),
        }
        let interval = p.interval();
        if interval < std::time::Duration::from_millis(10) {
            cx.error(
                &at.key("interval"),
                "must be at least 10ms (a probe that fast measures itself, not the service)",
            );
        }
        if p.timeout().is_zero() {
            cx.error(&at.key("timeout"), "must be above zero");
        }
        if let Some(h) = &p.http {
            let hp = at.key("http");
            check_url(cx, hp.key("url"), &h.url);
            if let Some(max) = h.expect.max_latency
                && max.0 >= p.timeout()
            {
                cx.error(
                    &hp.key("expect").key("max_latency"),
                    format!(
                        "max_latency {max} can never apply: the probe's timeout is {}{}, so a slower answer times out first; set a timeout above {max}",
                        gpuchaos_proto::spec::HumanDuration(p.timeout()),
                        if p.timeout.is_none() {
                            " (its interval, by default)"
                        } else {
                            ""
                        }
                    ),
                );
            }
            if let Some(m) = &h.method
                && (m.is_empty() || !m.chars().all(|c| c.is_ascii_uppercase()))
            {
                cx.error(
                    &hp.key("method"),
                    format!("{m:?} is not an HTTP method: write it in capitals, e.g. GET or POST"),
                );
            }
            for code in &h.expect.status {
                if !(100..=599).contains(code) {
                    cx.error(
                        &hp.key("expect").key("status"),
                        format!("{code} is not an HTTP status (100-599)"),
                    );
                }
            }
            check_regex(cx, hp.key("expect").key("body_regex"), &h.expect.body_regex);
            if let Some(j) = &h.expect.json
                && !(j.pointer.is_empty() || j.pointer.starts_with('/'))
            {
                cx.error(
                    &hp.key("expect").key("json").key("pointer"),
                    format!(
                        "{:?} is not a JSON pointer: start it with / (e.g. /status)",
                        j.pointer
                    ),
                );
            }
            for name in h.headers.keys() {
                if hyper::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    cx.error(
                        &hp.key("headers").key(name),
                        format!("{name:?} is not a valid header name"),
                    );
                }
            }
        }
        if let Some(t) = &p.tcp
            && crate::probe::split_host_port(&t.address).is_none()
        {
            cx.error(
                &at.key("tcp").key("address"),
                format!("{:?} is not HOST:PORT", t.address),
            );
        }
        if let Some(c) = &p.command {
            if c.argv.is_empty() || c.argv[0].is_empty() {
                cx.error(
                    &at.key("command").key("argv"),
                    "the argument vector is empty: give the program and its arguments, e.g. [curl, -sf, http://...]",
                );
            }
            check_regex(cx, at.key("command").key("stdout_regex"), &c.stdout_regex);
        }
        if let Some(q) = &p.prometheus {
            check_prom(cx, at.key("prometheus"), q);
        }
        if let Some(o) = &p.openai {
            check_url(cx, at.key("openai").key("base_url"), &o.base_url);
            check_regex(cx, at.key("openai").key("expect_regex"), &o.expect_regex);
        }
        if let Some(g) = &p.guardrail {
            check_url(cx, at.key("guardrail").key("base_url"), &g.base_url);
            check_regex(
                cx,
                at.key("guardrail").key("refusal_regex"),
                &g.refusal_regex,
            );
        }
    }
    let broken = cx.broken_names.clone();
    let probe_ref = |cx: &mut Cx, path: FieldPath, name: &str| {
        if !probe_names.contains(name) && !broken.contains(name) {
            let known: Vec<&str> = probe_names
                .iter()
                .chain(broken.iter())
                .map(String::as_str)
                .collect();
            let hint = suggest(name, &known)
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            cx.error(
                &path,
                if known.is_empty() {
                    format!("no probe is named {name:?}: the experiment defines no probes")
                } else {
                    format!(
                        "no probe is named {name:?}{hint}: defined probes are {}",
                        known.join(", ")
                    )
                },
            );
        }
    };

    if let Some(s) = &e.steady_state {
        let sp = root.key("steady_state");
        if s.probes.is_empty() {
            cx.error(&sp.key("probes"), "list at least one probe");
        }
        for (i, n) in s.probes.iter().enumerate() {
            probe_ref(cx, sp.key("probes").index(i), n);
        }
        if s.duration().is_zero() {
            cx.error(&sp.key("duration"), "must be above zero");
        }
        if s.timeout() < s.duration() {
            cx.error(
                &sp.key("timeout"),
                format!(
                    "{} is shorter than the duration ({}): the steady state could never be established",
                    HumanDuration(s.timeout()),
                    HumanDuration(s.duration())
                ),
            );
        }
    }

    // Method.
    let raw_steps = match cx.root.get("method").map(|m| &m.value) {
        Some(Value::Seq(v)) => v.len(),
        _ => 0,
    };
    if raw_steps == 0 {
        cx.error(
            &root.key("method"),
            "the method is empty: give at least one step (a fault, a wait or a parallel group)",
        );
    }
    let mut step_names = BTreeSet::new();
    let mut fault_steps = 0;
    for (i, s) in e.method.iter().enumerate() {
        let at = cx.at("method", i);
        check_step(cx, s, &at, agents, &mut step_names, &mut fault_steps);
    }
    if !e.method.is_empty() && e.method.len() == raw_steps && fault_steps == 0 {
        cx.error(
            &root.key("method"),
            "the method injects no fault: add a step with `fault:`",
        );
    }

    // Objectives.
    let mut objective_names = BTreeSet::new();
    for (i, o) in e.objectives.iter().enumerate() {
        let at = cx.at("objectives", i);
        let set = [
            o.rto.is_some(),
            o.availability.is_some(),
            o.latency.is_some(),
            o.safety.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if set != 1 {
            cx.error(
                &at,
                "give exactly one of rto, availability, latency or safety per objective",
            );
            continue;
        }
        if !objective_names.insert(o.display_name()) {
            cx.error(
                &at,
                format!(
                    "two objectives are named {:?}: give each a distinct `name`",
                    o.display_name()
                ),
            );
        }
        let kp = at.key(o.kind_name());
        probe_ref(cx, kp.key("probe"), o.probe());
        if let Some(r) = &o.rto {
            if r.limit.0.is_zero() {
                cx.error(&kp.key("limit"), "must be above zero");
            }
            if r.consecutive() == 0 {
                cx.error(&kp.key("consecutive"), "must be at least 1");
            }
            if let Some(f) = &r.fault
                && !step_names.contains(f)
                && !broken.contains(f)
            {
                cx.error(
                    &kp.key("fault"),
                    format!("no fault step is named {f:?}: name the step with `name:`"),
                );
            }
        }
        if let Some(a) = &o.availability
            && !(0.0..=1.0).contains(&a.min)
        {
            cx.error(
                &kp.key("min"),
                format!("{} is not a ratio: write 0.99 for 99% (from 0 to 1)", a.min),
            );
        }
        if let Some(l) = &o.latency {
            if !(l.percentile > 0.0 && l.percentile <= 100.0) {
                cx.error(
                    &kp.key("percentile"),
                    format!(
                        "{} is not a percentile (above 0, at most 100)",
                        l.percentile
                    ),
                );
            }
            if l.limit.0.is_zero() {
                cx.error(&kp.key("limit"), "must be above zero");
            }
        }
        if let Some(s) = &o.safety
            && let Some(p) = e.probe(&s.probe)
            && p.guardrail.is_none()
        {
            cx.error(
                &kp.key("probe"),
                format!(
                    "probe {:?} is a {} probe: safety counts unsafe outputs, which only a guardrail probe sees",
                    s.probe,
                    p.kind_name()
                ),
            );
        }
    }

    // Stop conditions.
    for (i, s) in e.stop_conditions.iter().enumerate() {
        let at = cx.at("stop_conditions", i);
        match (&s.probe, &s.prometheus) {
            (Some(p), None) => {
                probe_ref(cx, at.key("probe"), p);
                match s.failing_for {
                    None => cx.error(
                        &at,
                        "a probe stop condition needs `failing_for` (how long the probe may fail before the run is aborted)",
                    ),
                    Some(d) if d.0.is_zero() => {
                        cx.error(&at.key("failing_for"), "must be above zero")
                    }
                    _ => {}
                }
                if s.interval.is_some() {
                    cx.error(
                        &at.key("interval"),
                        "only applies to prometheus stop conditions (a probe has its own interval)",
                    );
                }
            }
            (None, Some(q)) => {
                check_prom(cx, at.key("prometheus"), q);
                if s.failing_for.is_some() {
                    cx.error(
                        &at.key("failing_for"),
                        "only applies to probe stop conditions",
                    );
                }
            }
            _ => cx.error(
                &at,
                "give exactly one of `probe` (with failing_for) or `prometheus`",
            ),
        }
    }
}

fn check_step(
    cx: &mut Cx,
    s: &Step,
    at: &FieldPath,
    agents: &[AgentRef],
    names: &mut BTreeSet<String>,
    fault_steps: &mut usize,
) {
    let set = [s.fault.is_some(), s.wait.is_some(), s.parallel.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if s.fault.is_some() && set > 1 {
        *fault_steps += 1;
    }
    if set != 1 {
        cx.error(
            at,
            if set == 0 {
                "the step does nothing: give one of fault, wait or parallel"
            } else {
                "give only one of fault, wait or parallel per step (use a parallel group to combine)"
            },
        );
        return;
    }
    if let Some(n) = &s.name
        && !names.insert(n.clone())
    {
        cx.error(&at.key("name"), format!("step name {n:?} is used twice"));
    }
    if s.fault.is_none() && (s.on.is_some() || s.background) {
        cx.error(at, "`on` and `background` only apply to fault steps");
    }
    if let Some(f) = &s.fault {
        *fault_steps += 1;
        if let Err(errs) = f.validate() {
            for fe in errs.0 {
                cx.error(&at.key("fault").join_dotted(&fe.field), fe.message);
            }
        }
        if let Some(sel) = &s.on {
            let op = at.key("on");
            if !sel.agents.is_empty() && !sel.labels.is_empty() {
                cx.error(&op, "select agents by `agents` or by `labels`, not both");
            }
            if let Some(p) = sel.pick {
                let mut errs = Vec::new();
                p.validate("pick", &mut errs);
                for fe in errs {
                    cx.error(&op.join_dotted(&fe.field), fe.message);
                }
            }
            if !agents.is_empty() {
                match super::plan::matching(sel, agents) {
                    Err(m) => cx.error(&op, m),
                    Ok(matched) => {
                        if let Some(Pick::Count(n)) = sel.pick
                            && n as usize > matched.len()
                        {
                            cx.error(
                                &op.key("pick").key("count"),
                                format!(
                                    "asks for {n} agents but only {} match{}",
                                    matched.len(),
                                    if matched.len() == 1 { "es" } else { "" }
                                ),
                            );
                        }
                    }
                }
            }
        }
    }
    if let Some(w) = &s.wait
        && w.0.is_zero()
    {
        cx.error(&at.key("wait"), "must be above zero");
    }
    if let Some(group) = &s.parallel {
        if group.is_empty() {
            cx.error(&at.key("parallel"), "the parallel group is empty");
        }
        for (i, inner) in group.iter().enumerate() {
            check_step(
                cx,
                inner,
                &at.key("parallel").index(i),
                agents,
                names,
                fault_steps,
            );
        }
    }
}

#[cfg(test)]
mod tests;

//! The fault spec: one shape for every fault kind, alone (`gpuchaos inject -f`) and as
//! an experiment step.
//!
//! Parsing is strict (`deny_unknown_fields`) and every error names its field. After
//! parsing, [`FaultSpec::validate`] reports every semantic problem at once. The agent
//! runs the same validation on the JSON it receives, so a spec is refused the same
//! way whichever side sees it first.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

mod gpu;
mod guardrail;
mod network;
pub use gpu::*;
pub use guardrail::*;
pub use network::*;

/// A problem with one field of a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the field (`target.pick.count`), empty for the whole document.
    pub field: String,
    pub message: String,
    /// 1-based line and column in the YAML source, when known.
    pub line: Option<u64>,
    pub column: Option<u64>,
}

impl FieldError {
    /// Quoted values in the message are shortened ([`shorten_quoted`]): an error
    /// never echoes a whole 3 MB input back.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: shorten(field.into(), 200),
            message: shorten_quoted(&message.into()),
            line: None,
            column: None,
        }
    }
}

/// The longest a quoted value may be in an error message before it is shortened.
pub const MAX_QUOTED: usize = 80;
/// The longest regex a spec, experiment or policy may hold (bytes).
pub const MAX_REGEX_LEN: usize = 4096;
/// The most memory one compiled regex may take (the regex crate's size limits).
pub const MAX_REGEX_COMPILED: usize = 1 << 20;
/// The largest fault spec an agent accepts (its JSON, bytes).
pub const MAX_SPEC_JSON: usize = 64 << 10;

fn shorten(s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}… ({} bytes in all)", &s[..cut], s.len())
}

/// Shortens every double-quoted value (as `{:?}` writes strings) longer than
/// [`MAX_QUOTED`] to its first characters, saying how long it was; the rest of the
/// message (what to do) is kept.
pub fn shorten_quoted(msg: &str) -> String {
    if msg.len() <= MAX_QUOTED * 2 {
        return msg.to_string();
    }
    let b = msg.as_bytes();
    let mut out = String::with_capacity(msg.len().min(4096));
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'"' {
            let next = msg[i..].find('"').map(|k| i + k).unwrap_or(b.len());
            out.push_str(&msg[i..next]);
            i = next;
            continue;
        }
        // A quoted run: find its closing quote, skipping escapes.
        let mut j = i + 1;
        while j < b.len() && b[j] != b'"' {
            j += if b[j] == b'\\' { 2 } else { 1 };
        }
        let end = j.min(b.len());
        let inner = &msg[i + 1..end.max(i + 1)];
        // A value shortened once already ends in "…": leave it.
        let already = inner.ends_with('…') && inner.len() <= MAX_QUOTED + '…'.len_utf8();
        if inner.len() > MAX_QUOTED && !already {
            let mut cut = MAX_QUOTED;
            while !inner.is_char_boundary(cut) {
                cut -= 1;
            }
            out.push_str(&format!("\"{}…\" ({} bytes)", &inner[..cut], inner.len()));
        } else {
            out.push('"');
            out.push_str(inner);
            if end < b.len() {
                out.push('"');
            }
        }
        i = end + 1;
    }
    out
}

/// Compiles a user's regex within hard limits: at most [`MAX_REGEX_LEN`] bytes of
/// pattern and [`MAX_REGEX_COMPILED`] of compiled program, so that no spec can make
/// an agent or the controller allocate hundreds of MB.
pub fn compile_regex(re: &str) -> Result<regex::Regex, String> {
    if re.len() > MAX_REGEX_LEN {
        return Err(format!(
            "the regex is {} bytes long; at most {MAX_REGEX_LEN} are allowed: match on a shorter pattern",
            re.len()
        ));
    }
    regex::RegexBuilder::new(re)
        .size_limit(MAX_REGEX_COMPILED)
        .dfa_size_limit(MAX_REGEX_COMPILED)
        .build()
        .map_err(|e| match e {
            regex::Error::CompiledTooBig(_) => format!(
                "regex {:?} compiles to more than {} KiB: write a simpler pattern",
                re,
                MAX_REGEX_COMPILED >> 10
            ),
            e => {
                let first = e.to_string();
                let detail = first
                    .lines()
                    .last()
                    .unwrap_or("invalid regex")
                    .trim()
                    .to_string();
                format!("regex {re:?} does not compile: {detail}")
            }
        })
        .map_err(|m| shorten_quoted(&m))
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let (Some(l), Some(c)) = (self.line, self.column) {
            write!(f, "line {l} column {c}: ")?;
        }
        if self.field.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// Every problem found in a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecErrors(pub Vec<FieldError>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|e| e.to_string()).collect();
        write!(f, "{}", parts.join("; "))
    }
}

impl std::error::Error for SpecErrors {}

/// A duration written the human way: `250ms`, `30s`, `2m`, `1h 30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if t.starts_with('-') {
            return Err(format!(
                "invalid duration {text:?}: durations cannot be negative"
            ));
        }
        if !t.is_empty() && t.chars().all(|c| c.is_ascii_digit() || c == '.') {
            return Err(format!(
                "invalid duration {text:?}: add a unit, e.g. \"{t}s\" or \"{t}ms\""
            ));
        }
        let d = humantime::parse_duration(t).map_err(|e| {
            format!("invalid duration {text:?}: {e}; write it like 250ms, 30s, 2m or 1h")
        })?;
        if d > Self::MAX {
            return Err(format!(
                "duration {text:?} is longer than {} days: no fault, wait, limit or lease lasts that long; write it in hours or days",
                Self::MAX.as_secs() / 86_400
            ));
        }
        Ok(HumanDuration(d))
    }

    /// The longest duration any field accepts (30 days): `wait: 99999999999h` is a
    /// typo, not a plan.
    pub const MAX: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);
}

#[cfg(feature = "schema")]
impl schemars::JsonSchema for HumanDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A duration with a unit: 250ms, 30s, 2m, 1h 30m",
            "pattern": "^\\s*[0-9]+(\\.[0-9]+)?\\s*[a-zµ]+(\\s*[0-9]+(\\.[0-9]+)?\\s*[a-zµ]+)*\\s*$"
        })
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"30s\" or \"2m\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                HumanDuration::parse(v).map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<HumanDuration, E> {
                Err(E::custom(format!(
                    "invalid duration {v}: add a unit, e.g. \"{v}s\" or \"{v}ms\""
                )))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<HumanDuration, E> {
                Err(E::custom(format!(
                    "invalid duration {v}: durations need a unit and cannot be negative"
                )))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<HumanDuration, E> {
                Err(E::custom(format!(
                    "invalid duration {v}: add a unit, e.g. \"{v}s\""
                )))
            }
        }
        d.deserialize_any(V)
    }
}

/// One fault, of any kind. The `kind` field selects the variant.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FaultSpec {
    Process(ProcessSpec),
    GpuMemory(GpuMemorySpec),
    Network(NetworkSpec),
    Guardrail(Box<GuardrailSpec>),
}

/// Every fault kind a spec may name.
pub const KINDS: &[&str] = &["process", "gpu_memory", "network", "guardrail"];

/// Deserializes without buffering when `kind` comes first (the usual way to write a
/// spec), so errors keep their YAML line and column and their field path: the rest
/// of the same map is handed to the kind's struct. When `kind` comes later, the map
/// is buffered, and errors keep their field path only.
impl<'de> Deserialize<'de> for FaultSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(FaultVisitor)
    }
}

struct FaultVisitor;

fn unknown_kind<E: serde::de::Error>(kind: &str) -> E {
    E::custom(format!(
        "unknown fault kind `{kind}`: known kinds are {}",
        KINDS.join(", ")
    ))
}

impl<'de> serde::de::Visitor<'de> for FaultVisitor {
    type Value = FaultSpec;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a fault spec: a map with `kind:` and the kind's fields")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<FaultSpec, A::Error> {
        use serde::de::Error;
        use serde::de::value::MapAccessDeserializer;
        let Some(first) = map.next_key::<String>()? else {
            return Err(A::Error::missing_field("kind"));
        };
        if first == "kind" {
            let kind: String = map.next_value()?;
            return match kind.as_str() {
                "process" => ProcessSpec::deserialize(MapAccessDeserializer::new(map))
                    .map(FaultSpec::Process),
                "network" => NetworkSpec::deserialize(MapAccessDeserializer::new(map))
                    .map(FaultSpec::Network),
                "gpu_memory" => GpuMemorySpec::deserialize(MapAccessDeserializer::new(map))
                    .map(FaultSpec::GpuMemory),
                "guardrail" => GuardrailSpec::deserialize(MapAccessDeserializer::new(map))
                    .map(|g| FaultSpec::Guardrail(Box::new(g))),
                other => Err(unknown_kind(other)),
            };
        }
        let mut obj = serde_json::Map::new();
        obj.insert(first, map.next_value()?);
        while let Some(k) = map.next_key::<String>()? {
            let v: serde_json::Value = map.next_value()?;
            obj.insert(k, v);
        }
        let kind = match obj.remove("kind") {
            Some(serde_json::Value::String(k)) => k,
            Some(other) => {
                return Err(A::Error::custom(format!(
                    "kind must be a string, not {other}"
                )));
            }
            None => return Err(A::Error::missing_field("kind")),
        };
        let rest = serde_json::Value::Object(obj);
        let located = |e: serde_path_to_error::Error<serde_json::Error>| {
            let path = e.path().to_string();
            A::Error::custom(format!("{path}: {}", e.into_inner()))
        };
        match kind.as_str() {
            "process" => serde_path_to_error::deserialize(rest)
                .map(FaultSpec::Process)
                .map_err(located),
            "network" => serde_path_to_error::deserialize(rest)
                .map(FaultSpec::Network)
                .map_err(located),
            "gpu_memory" => serde_path_to_error::deserialize(rest)
                .map(FaultSpec::GpuMemory)
                .map_err(located),
            "guardrail" => serde_path_to_error::deserialize(rest)
                .map(|g| FaultSpec::Guardrail(Box::new(g)))
                .map_err(located),
            other => Err(unknown_kind(other)),
        }
    }
}

impl FaultSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            FaultSpec::Process(_) => "process",
            FaultSpec::Network(_) => "network",
            FaultSpec::GpuMemory(_) => "gpu_memory",
            FaultSpec::Guardrail(_) => "guardrail",
        }
    }

    pub fn duration(&self) -> Duration {
        match self {
            FaultSpec::Process(p) => p.duration.0,
            FaultSpec::Network(n) => n.duration.0,
            FaultSpec::GpuMemory(g) => g.duration.0,
            FaultSpec::Guardrail(g) => g.duration.0,
        }
    }

    pub fn seed(&self) -> Option<u64> {
        match self {
            FaultSpec::Process(p) => p.seed,
            FaultSpec::Network(n) => n.seed,
            FaultSpec::GpuMemory(g) => g.seed,
            FaultSpec::Guardrail(g) => g.seed,
        }
    }

    /// Every semantic problem at once (parsing already checked shapes and types).
    pub fn validate(&self) -> Result<(), SpecErrors> {
        let mut errs = Vec::new();
        match self {
            FaultSpec::Process(p) => p.validate(&mut errs),
            FaultSpec::Network(n) => n.validate(&mut errs),
            FaultSpec::GpuMemory(g) => g.validate(&mut errs),
            FaultSpec::Guardrail(g) => g.validate(&mut errs),
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(SpecErrors(errs))
        }
    }

    /// Parses the JSON form (what the agent receives) and validates it.
    pub fn from_json(text: &str) -> Result<Self, SpecErrors> {
        if text.len() > MAX_SPEC_JSON {
            return Err(SpecErrors(vec![FieldError::new(
                "",
                format!(
                    "the spec is {} KiB; at most {} KiB are accepted: shorten its strings (regexes, lists)",
                    text.len().div_ceil(1024),
                    MAX_SPEC_JSON >> 10
                ),
            )]));
        }
        let de = &mut serde_json::Deserializer::from_str(text);
        let spec: FaultSpec = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let field = if field == "." { String::new() } else { field };
            SpecErrors(vec![FieldError::new(
                field,
                clean_serde_message(&e.inner().to_string()),
            )])
        })?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a fault spec always serializes")
    }

    /// Parses one or more YAML documents (separated by `---`) and validates each.
    /// Errors carry line and column.
    pub fn from_yaml_multi(text: &str) -> Result<Vec<Self>, SpecErrors> {
        let specs: Vec<FaultSpec> = serde_saphyr::from_multiple(text).map_err(|e| {
            let mut errs = yaml_error(e);
            // serde-saphyr locates the error; find the field path by parsing the
            // documents as plain values and typing them with path tracking.
            if let Some(fe) = errs.0.first_mut()
                && fe.field.is_empty()
                && let Ok(docs) = serde_saphyr::from_multiple::<serde_json::Value>(text)
            {
                for (i, doc) in docs.into_iter().enumerate() {
                    if let Err(pe) = serde_path_to_error::deserialize::<_, FaultSpec>(doc) {
                        let path = pe.path().to_string();
                        if path != "." {
                            fe.field = path;
                        }
                        if docs_len_hint(text) > 1 {
                            fe.field = if fe.field.is_empty() {
                                format!("document {}", i + 1)
                            } else {
                                format!("document {}: {}", i + 1, fe.field)
                            };
                        }
                        break;
                    }
                }
            }
            errs
        })?;
        if specs.is_empty() {
            return Err(SpecErrors(vec![FieldError::new(
                "",
                "the file holds no fault spec: write at least one document with a `kind:`",
            )]));
        }
        let mut errs = Vec::new();
        let many = specs.len() > 1;
        for (i, s) in specs.iter().enumerate() {
            if let Err(SpecErrors(e)) = s.validate() {
                for mut fe in e {
                    if many {
                        fe.field = if fe.field.is_empty() {
                            format!("document {}", i + 1)
                        } else {
                            format!("document {}: {}", i + 1, fe.field)
                        };
                    }
                    errs.push(fe);
                }
            }
        }
        if errs.is_empty() {
            Ok(specs)
        } else {
            Err(SpecErrors(errs))
        }
    }
}

/// Turns a serde-saphyr error into a located field error.
pub fn yaml_error(e: serde_saphyr::Error) -> SpecErrors {
    let loc = e.location();
    let mut msg = e.to_string();
    // serde-saphyr appends a source snippet on following lines; the first line is the
    // message, the location is reported separately.
    if let Some(first) = msg.lines().next() {
        msg = first.to_string();
    }
    // The location is reported on its own: drop "error: line N column M: ".
    let mut m = msg.trim_start_matches("error: ").to_string();
    if m.starts_with("line ")
        && let Some(i) = m.find(": ")
    {
        m = m[i + 2..].to_string();
    }
    // The library's duplicate-key text names one of its own options; say it as a
    // user needs it.
    if let Some(rest) = m.strip_prefix("duplicate mapping key") {
        let key = rest
            .trim_start_matches(':')
            .split(',')
            .next()
            .unwrap_or("")
            .trim();
        m = if key.is_empty() {
            "a key is written twice in one mapping: write each key once".to_string()
        } else {
            format!("duplicate key `{key}`: write each key once")
        };
    }
    // The parser's resource budget, in the user's words.
    if let Some(rest) = m.strip_prefix("budget breached: ") {
        let kind = rest.split([' ', '{']).next().unwrap_or("");
        let n: String = rest.chars().filter(|c| c.is_ascii_digit()).collect();
        let what = match kind {
            "Nodes" => "values",
            "Depth" | "InclusionDepth" => "levels of nesting",
            "Aliases" => "aliases (*ref)",
            "Anchors" => "anchors (&name)",
            "Events" => "YAML events",
            _ => "YAML elements",
        };
        m = format!(
            "the file holds more {what} than the parser accepts ({n} reached); no experiment or spec comes near that: name the right file"
        );
    }
    if m.starts_with("recursion limit exceeded") {
        m = "the file holds more levels of nesting than the parser accepts; no experiment or spec comes near that: name the right file".into();
    }
    let mut fe = FieldError::new("", clean_serde_message(&m));
    if let Some(l) = loc {
        fe.line = Some(l.line());
        fe.column = Some(l.column());
    }
    SpecErrors(vec![fe])
}

/// How many YAML documents a text holds, roughly (for error messages only).
fn docs_len_hint(text: &str) -> usize {
    1 + text.lines().filter(|l| l.trim_end() == "---").count()
}

fn clean_serde_message(msg: &str) -> String {
    // "unknown variant `gpu`, expected `process`" is clear already; strip trailing
    // position info that serde_json adds, since the path names the field.
    let m = match msg.find(" at line ") {
        Some(i) => &msg[..i],
        None => msg,
    };
    m.to_string()
}

/// The `process` kind: kill, terminate, pause or crash-loop workers.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessSpec {
    pub duration: HumanDuration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    pub target: ProcessTarget,
    pub action: ProcessAction,
    /// `kill` only: the signal to send (default SIGKILL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// `terminate` only: time between SIGTERM and SIGKILL (default 5s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace: Option<HumanDuration>,
    /// `crash-loop` only: time between kill rounds (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<HumanDuration>,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProcessAction {
    Kill,
    Terminate,
    Pause,
    CrashLoop,
}

impl ProcessAction {
    pub fn name(self) -> &'static str {
        match self {
            ProcessAction::Kill => "kill",
            ProcessAction::Terminate => "terminate",
            ProcessAction::Pause => "pause",
            ProcessAction::CrashLoop => "crash-loop",
        }
    }
}

/// Which processes a fault hits. Every selector given must match (they are ANDed).
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessTarget {
    /// One pid or a list of pids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<OneOrMany<u32>>,
    /// Regex on the process name (/proc/PID/comm, at most 15 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Regex on the full command line (arguments joined by spaces).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// A cgroup v2 path (`/kubepods.slice/...`): processes in it or below it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// Processes using this GPU (index or UUID), as NVML reports them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuRef>,
    /// How many of the matching processes to hit (default all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pick: Option<Pick>,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    pub fn to_vec(&self) -> Vec<T> {
        match self {
            OneOrMany::One(t) => vec![t.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum GpuRef {
    Index(u32),
    Uuid(String),
}

impl fmt::Display for GpuRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuRef::Index(i) => write!(f, "GPU {i}"),
            GpuRef::Uuid(u) => write!(f, "GPU {u}"),
        }
    }
}

/// How many of the matched targets to hit: `all`, `{count: N}` or `{percent: P}`.
/// A percentage rounds down but never below one target.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pick {
    All,
    Count(u32),
    Percent(f64),
}

impl Pick {
    /// How many of `matched` targets this pick takes.
    pub fn amount(self, matched: usize) -> usize {
        match self {
            Pick::All => matched,
            Pick::Count(n) => (n as usize).min(matched),
            Pick::Percent(p) => {
                if matched == 0 {
                    0
                } else {
                    ((matched as f64 * p / 100.0).floor() as usize).clamp(1, matched)
                }
            }
        }
    }

    pub fn validate(self, field: &str, errs: &mut Vec<FieldError>) {
        match self {
            Pick::All => {}
            Pick::Count(0) => errs.push(FieldError::new(
                format!("{field}.count"),
                "must be at least 1 (remove the fault to hit nothing)",
            )),
            Pick::Count(_) => {}
            Pick::Percent(p) if !(p > 0.0 && p <= 100.0) => errs.push(FieldError::new(
                format!("{field}.percent"),
                format!("{p} is out of range: use a percentage above 0 and at most 100"),
            )),
            Pick::Percent(_) => {}
        }
    }
}

impl ProcessTarget {
    /// The selector in one line: `name "^vllm", cmdline "worker", pick 1`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(p) = &self.pid {
            parts.push(format!("pid {:?}", p.to_vec()));
        }
        if let Some(n) = &self.name {
            parts.push(format!("name {n:?}"));
        }
        if let Some(c) = &self.cmdline {
            parts.push(format!("cmdline {c:?}"));
        }
        if let Some(c) = &self.cgroup {
            parts.push(format!("cgroup {c:?}"));
        }
        if let Some(g) = &self.gpu {
            parts.push(format!("processes on {g}"));
        }
        match self.pick {
            Some(Pick::Count(n)) => parts.push(format!("pick {n}")),
            Some(Pick::Percent(p)) => parts.push(format!("pick {p}%")),
            _ => {}
        }
        parts.join(", ")
    }

    /// Checks a selector; errors are reported under `prefix` (`target`).
    pub fn validate_selector(&self, prefix: &str, errs: &mut Vec<FieldError>) {
        let t = self;
        if t.pid.is_none()
            && t.name.is_none()
            && t.cmdline.is_none()
            && t.cgroup.is_none()
            && t.gpu.is_none()
        {
            errs.push(FieldError::new(
                prefix.to_string(),
                "no selector: give at least one of pid, name, cmdline, cgroup or gpu",
            ));
        }
        if let Some(p) = &t.pid {
            let pids = p.to_vec();
            if pids.is_empty() {
                errs.push(FieldError::new(
                    format!("{prefix}.pid"),
                    "the list of pids is empty",
                ));
            }
            if pids.contains(&0) {
                errs.push(FieldError::new(
                    format!("{prefix}.pid"),
                    "pid 0 is not a process",
                ));
            }
        }
        for (field, re) in [("name", &t.name), ("cmdline", &t.cmdline)] {
            if let Some(re) = re
                && let Err(e) = compile_regex(re)
            {
                errs.push(FieldError::new(format!("{prefix}.{field}"), e));
            }
        }
        if let Some(cg) = &t.cgroup
            && (!cg.starts_with('/') || cg.contains("..") || cg.contains('\0'))
        {
            errs.push(FieldError::new(
                format!("{prefix}.cgroup"),
                format!(
                    "{cg:?} is not a cgroup path: write it as in /proc/PID/cgroup, starting with / and without .."
                ),
            ));
        }
        if let Some(GpuRef::Uuid(u)) = &t.gpu
            && !u.starts_with("GPU-")
            && !u.starts_with("MIG-")
        {
            errs.push(FieldError::new(
                format!("{prefix}.gpu"),
                format!("{u:?} is neither a GPU index nor a UUID (GPU-… or MIG-…)"),
            ));
        }
        if let Some(p) = t.pick {
            p.validate(&format!("{prefix}.pick"), errs);
        }
    }
}

/// Shortest crash-loop interval: faster than this is a fork bomb in reverse.
pub const MIN_CRASH_LOOP_INTERVAL: Duration = Duration::from_millis(100);

impl ProcessSpec {
    fn validate(&self, errs: &mut Vec<FieldError>) {
        validate_duration(self.duration, errs);
        self.target.validate_selector("target", errs);
        let only = |field: &str, present: bool, action: &str, errs: &mut Vec<FieldError>| {
            if present {
                errs.push(FieldError::new(
                    field,
                    format!(
                        "only applies to action {action}, not {}: remove it",
                        self.action.name()
                    ),
                ));
            }
        };
        only(
            "signal",
            self.signal.is_some() && self.action != ProcessAction::Kill,
            "kill",
            errs,
        );
        only(
            "grace",
            self.grace.is_some() && self.action != ProcessAction::Terminate,
            "terminate",
            errs,
        );
        only(
            "interval",
            self.interval.is_some() && self.action != ProcessAction::CrashLoop,
            "crash-loop",
            errs,
        );
        if let Some(s) = &self.signal
            && crate::signal::parse(s).is_none()
        {
            errs.push(FieldError::new(
                "signal",
                format!("unknown signal {s:?}: use a name such as SIGKILL, SIGTERM or SIGINT, or a number 1-31"),
            ));
        }
        if let Some(s) = &self.signal
            && matches!(crate::signal::parse(s), Some(19) | Some(18))
        {
            errs.push(FieldError::new(
                "signal",
                "SIGSTOP/SIGCONT are not kill signals: use action: pause, which resumes the process on revert",
            ));
        }
        if let Some(g) = self.grace
            && g.0.is_zero()
        {
            errs.push(FieldError::new(
                "grace",
                "must be above zero (use action: kill for an immediate SIGKILL)",
            ));
        }
        if let Some(i) = self.interval
            && i.0 < MIN_CRASH_LOOP_INTERVAL
        {
            errs.push(FieldError::new(
                "interval",
                format!(
                    "{i} is too short: crash-loop kills at most every {}",
                    HumanDuration(MIN_CRASH_LOOP_INTERVAL)
                ),
            ));
        }
    }

    pub fn signal_number(&self) -> i32 {
        self.signal
            .as_deref()
            .and_then(crate::signal::parse)
            .unwrap_or(9)
    }

    pub fn grace(&self) -> Duration {
        self.grace.map(|g| g.0).unwrap_or(Duration::from_secs(5))
    }

    pub fn interval(&self) -> Duration {
        self.interval
            .map(|g| g.0)
            .unwrap_or(Duration::from_secs(10))
    }
}

fn validate_duration(d: HumanDuration, errs: &mut Vec<FieldError>) {
    if d.0.is_zero() {
        errs.push(FieldError::new(
            "duration",
            "must be above zero: every fault needs a bounded duration, e.g. 30s",
        ));
    }
}

/// One spec from YAML, errors as text: for the kinds' unit tests.
#[cfg(test)]
pub(crate) fn parse_for_test(yaml: &str) -> Result<FaultSpec, String> {
    FaultSpec::from_yaml_multi(yaml)
        .map(|mut v| v.remove(0))
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_one(yaml: &str) -> Result<FaultSpec, SpecErrors> {
        FaultSpec::from_yaml_multi(yaml).map(|mut v| v.remove(0))
    }

    fn err_text(yaml: &str) -> String {
        parse_one(yaml).unwrap_err().to_string()
    }

    #[test]
    fn parses_the_design_example() {
        let s = parse_one(
            "kind: process\nduration: 2m\ntarget: {name: \"^vllm\", pick: {count: 1}}\naction: pause\n",
        )
        .unwrap();
        assert_eq!(s.kind(), "process");
        assert_eq!(s.duration(), Duration::from_secs(120));
        let FaultSpec::Process(p) = &s else {
            panic!("not a process spec")
        };
        assert_eq!(p.target.pick, Some(Pick::Count(1)));
        assert_eq!(p.action, ProcessAction::Pause);
        // JSON round trip is what the wire carries.
        let back = FaultSpec::from_json(&s.to_json()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn multi_document_and_actions() {
        let v = FaultSpec::from_yaml_multi(
            "kind: process\nduration: 30s\ntarget: {pid: [10, 11]}\naction: kill\nsignal: SIGINT\n---\nkind: process\nduration: 1m\ntarget: {cmdline: worker, pick: {percent: 50}}\naction: crash-loop\ninterval: 2s\n",
        )
        .unwrap();
        assert_eq!(v.len(), 2);
        let FaultSpec::Process(a) = &v[0] else {
            panic!("not a process spec")
        };
        assert_eq!(a.signal_number(), 2);
        let FaultSpec::Process(b) = &v[1] else {
            panic!("not a process spec")
        };
        assert_eq!(b.interval(), Duration::from_secs(2));
        assert_eq!(b.target.pick, Some(Pick::Percent(50.0)));
    }

    #[test]
    fn unknown_field_is_located() {
        let e = parse_one(
            "kind: process\nduration: 30s\ntarget: {pid: 5}\naction: pause\ncolour: red\n",
        )
        .unwrap_err();
        let fe = &e.0[0];
        assert!(fe.message.contains("colour"), "{fe}");
        assert_eq!(fe.line, Some(5), "{fe}");
    }

    #[test]
    fn bad_durations_name_the_field() {
        assert!(
            err_text("kind: process\nduration: 0s\ntarget: {pid: 5}\naction: pause\n")
                .contains("duration: must be above zero")
        );
        assert!(
            err_text("kind: process\nduration: 5 parsecs\ntarget: {pid: 5}\naction: pause\n")
                .contains("invalid duration \"5 parsecs\"")
        );
        assert!(
            err_text("kind: process\nduration: -5s\ntarget: {pid: 5}\naction: pause\n")
                .contains("negative")
        );
        assert!(
            err_text("kind: process\nduration: 30\ntarget: {pid: 5}\naction: pause\n")
                .contains("add a unit")
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let e = parse_one(
            "kind: process\nduration: 0s\ntarget: {name: \"([\", pick: {count: 0}}\naction: pause\nsignal: SIGNOPE\ngrace: 1s\n",
        )
        .unwrap_err();
        let fields: Vec<&str> = e.0.iter().map(|f| f.field.as_str()).collect();
        for want in [
            "duration",
            "target.name",
            "target.pick.count",
            "signal",
            "grace",
        ] {
            assert!(fields.contains(&want), "missing {want} in {fields:?}");
        }
    }

    #[test]
    fn long_values_are_shortened_once_and_the_advice_kept() {
        let long = "x".repeat(5000);
        let once = shorten_quoted(&format!(
            "regex {long:?} does not compile: write a simpler pattern"
        ));
        assert!(
            once.contains("(5000 bytes)") && once.ends_with("write a simpler pattern"),
            "{once}"
        );
        assert!(once.len() < 200, "{once}");
        assert_eq!(
            shorten_quoted(&once),
            once,
            "shortening twice changes nothing"
        );
        // Multi-byte characters are cut on a boundary.
        let wide = shorten_quoted(&format!("{:?} is bad: fix it", "é".repeat(300)));
        assert!(wide.ends_with("fix it"), "{wide}");
        assert_eq!(
            shorten_quoted("short \"value\" kept"),
            "short \"value\" kept"
        );
    }

    #[test]
    fn duplicates_are_said_in_our_words() {
        let e = FaultSpec::from_yaml_multi("kind: process\nkind: process\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("duplicate key `kind`: write each key once"),
            "{e}"
        );
    }

    #[test]
    fn unknown_signal_and_missing_selector() {
        assert!(
            err_text(
                "kind: process\nduration: 5s\ntarget: {pid: 5}\naction: kill\nsignal: SIGFOO\n"
            )
            .contains("unknown signal \"SIGFOO\"")
        );
        assert!(
            err_text("kind: process\nduration: 5s\ntarget: {}\naction: kill\n")
                .contains("target: no selector")
        );
    }

    #[test]
    fn json_errors_carry_the_path() {
        let e = FaultSpec::from_json(
            r#"{"kind":"process","duration":"5s","target":{"pid":5,"pick":{"count":"x"}},"action":"pause"}"#,
        )
        .unwrap_err();
        assert_eq!(e.0[0].field, "target.pick.count", "{e}");
        let e = FaultSpec::from_json(r#"{"kind":"teleport","duration":"5s"}"#).unwrap_err();
        assert!(e.to_string().contains("teleport"), "{e}");
    }

    #[test]
    fn pick_amounts() {
        assert_eq!(Pick::All.amount(7), 7);
        assert_eq!(Pick::Count(3).amount(2), 2);
        assert_eq!(Pick::Percent(50.0).amount(3), 1);
        assert_eq!(Pick::Percent(10.0).amount(3), 1);
        assert_eq!(Pick::Percent(100.0).amount(3), 3);
        assert_eq!(Pick::Percent(50.0).amount(0), 0);
    }
}

//! The fault spec: one shape for every fault kind, alone (`gpuchaos inject -f`) and as
//! an experiment step.
//!
//! Parsing is strict (`deny_unknown_fields`) and every error names its field. After
//! parsing, [`FaultSpec::validate`] reports every semantic problem at once. The agent
//! runs the same validation on the JSON it receives, so a spec is refused the same
//! way whichever side sees it first.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

mod duration;
mod gpu;
mod gpu_compute;
mod gpu_xid;
mod guardrail;
mod network;
mod process;
mod target;
pub use duration::*;
pub use gpu::*;
pub use gpu_compute::*;
pub use gpu_xid::*;
pub use guardrail::*;
pub use network::*;
pub use process::*;
pub use target::*;

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

// ---------------------------------------------------------------------------
// The fault kinds. Adding one: its spec file under spec/ (a struct implementing
// [`KindSpec`]), one line in `fault_kinds!` below, its driver in the agent
// (agent/src/faults/, added to the `drivers` list in agent/src/lib.rs), and its
// docs (docs/architecture.md, "Adding a fault kind").
// ---------------------------------------------------------------------------

/// What every kind's spec gives the shared code.
pub trait KindSpec {
    /// How long the fault lasts (the agent enforces it locally).
    fn duration(&self) -> Duration;
    /// The seed of any randomness in the fault, when the user fixed one.
    fn seed(&self) -> Option<u64>;
    /// Every semantic problem, each under its field (parsing already checked shapes).
    fn validate(&self, errs: &mut Vec<FieldError>);
    /// One line for plans and the CLI: `process pause name "^vllm", pick 1`.
    fn summary(&self) -> String;
}

/// A kind's spec type as registered in [`FaultSpec`] (implemented by
/// `fault_kinds!`): its name, and the way in and out of the enum.
pub trait Kind: KindSpec + Sized {
    /// The `kind:` a spec names, e.g. `gpu_memory`.
    const KIND: &'static str;
    /// This kind's spec, when `spec` is of this kind.
    fn of(spec: &FaultSpec) -> Option<&Self>;
    fn into_spec(self) -> FaultSpec;
}

macro_rules! fault_kinds {
    ($($variant:ident($ty:ty) = $name:literal,)+) => {
        /// One fault, of any kind. The `kind` field selects the variant.
        #[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
        #[derive(Debug, Clone, PartialEq, Serialize)]
        #[serde(tag = "kind")]
        #[allow(clippy::large_enum_variant)]
        pub enum FaultSpec {
            $(#[serde(rename = $name)] $variant($ty),)+
        }

        /// Every fault kind a spec may name.
        pub const KINDS: &[&str] = &[$($name),+];

        $(impl Kind for $ty {
            const KIND: &'static str = $name;
            fn of(spec: &FaultSpec) -> Option<&Self> {
                #[allow(unreachable_patterns)]
                match spec {
                    FaultSpec::$variant(s) => Some(s),
                    _ => None,
                }
            }
            fn into_spec(self) -> FaultSpec {
                FaultSpec::$variant(self)
            }
        })+

        impl FaultSpec {
            fn inner(&self) -> &dyn KindSpec {
                match self {
                    $(FaultSpec::$variant(s) => s,)+
                }
            }

            /// The kind's name, as written after `kind:`.
            pub fn kind(&self) -> &'static str {
                match self {
                    $(FaultSpec::$variant(_) => $name,)+
                }
            }

            /// The rest of a spec (everything but `kind`), typed as `kind` says.
            fn by_kind<'de, D: Deserializer<'de>>(kind: &str, rest: D) -> Result<FaultSpec, D::Error> {
                match kind {
                    $($name => <$ty>::deserialize(rest).map(FaultSpec::$variant),)+
                    other => Err(unknown_kind(other)),
                }
            }
        }
    };
}

fault_kinds! {
    Process(ProcessSpec) = "process",
    GpuMemory(GpuMemorySpec) = "gpu_memory",
    Network(NetworkSpec) = "network",
    Guardrail(GuardrailSpec) = "guardrail",
    GpuXid(GpuXidSpec) = "gpu_xid",
    GpuCompute(GpuComputeSpec) = "gpu_compute",
}

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
            return FaultSpec::by_kind(&kind, MapAccessDeserializer::new(map));
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
        // Said as it is, not under a field path: the kind itself is wrong.
        if !KINDS.contains(&kind.as_str()) {
            return Err(unknown_kind(&kind));
        }
        let mut track = serde_path_to_error::Track::new();
        let rest =
            serde_path_to_error::Deserializer::new(serde_json::Value::Object(obj), &mut track);
        FaultSpec::by_kind(&kind, rest).map_err(|e| {
            let path = track.path().to_string();
            A::Error::custom(format!("{path}: {e}"))
        })
    }
}

impl FaultSpec {
    pub fn duration(&self) -> Duration {
        self.inner().duration()
    }

    pub fn seed(&self) -> Option<u64> {
        self.inner().seed()
    }

    /// One line for plans and the CLI: `process pause name "^vllm", pick 1`.
    pub fn summary(&self) -> String {
        self.inner().summary()
    }

    /// Every semantic problem at once (parsing already checked shapes and types).
    pub fn validate(&self) -> Result<(), SpecErrors> {
        let mut errs = Vec::new();
        self.inner().validate(&mut errs);
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
    fn every_registered_kind_is_dispatched_by_its_name() {
        for kind in KINDS {
            for text in [
                format!(r#"{{"kind":"{kind}"}}"#),
                format!(r#"{{"x":1,"kind":"{kind}"}}"#),
            ] {
                let e = FaultSpec::from_json(&text).unwrap_err().to_string();
                assert!(!e.contains("unknown fault kind"), "{kind}: {e}");
            }
        }
        let e = FaultSpec::from_json(r#"{"duration":"5s","kind":"teleport"}"#).unwrap_err();
        assert!(
            e.to_string()
                .contains("known kinds are process, gpu_memory, network, guardrail, gpu_xid"),
            "{e}"
        );
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

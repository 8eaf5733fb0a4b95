//! The checks an http probe makes on an answer (`expect.json`, `expect.headers`,
//! `expect.header_absent`): the file form, and the compiled form a probe evaluates.
//!
//! Compiling is also the validation: [`compile_json`] and [`compile_headers`] report
//! every problem at once, each with its field path, so the loader and the probe
//! share one walk and cannot disagree.

use std::collections::BTreeMap;
use std::fmt;

use regex::Regex;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use super::yaml::Path as FieldPath;
use crate::probe::Cmp;

/// `expect.json`: one check, or a list of checks that must all hold.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum JsonChecks {
    One(Box<JsonCheck>),
    All(Vec<JsonCheck>),
}

/// Not derived: an untagged enum would say only "did not match any variant"; this
/// keeps the inner errors (unknown fields, wrong types) and their paths.
impl<'de> Deserialize<'de> for JsonChecks {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = JsonChecks;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a check ({pointer, equals|op+value|matches|count|exists}) or a list of checks",
                )
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<JsonChecks, A::Error> {
                JsonCheck::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(|c| JsonChecks::One(Box::new(c)))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<JsonChecks, A::Error> {
                Vec::<JsonCheck>::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
                    .map(JsonChecks::All)
            }
        }
        d.deserialize_any(V)
    }
}

/// One check of the JSON body: a pointer and exactly one of `equals`, `op` with
/// `value`, `matches`, `count`, `exists`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonCheck {
    /// A JSON pointer (RFC 6901): `/status`, `/replicas/0/state`; empty for the whole
    /// body (or, under `count.where`, the whole element).
    #[serde(default)]
    pub pointer: String,
    /// The value must equal this exactly (JSON equality: `2` is not `"2"`).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub equals: Option<Value>,
    /// A numeric comparison with `value`: one of < <= > >= == != (numbers compare as f64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<String>,
    /// The number `op` compares the value with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// A regex the string value must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matches: Option<String>,
    /// The value is an array: how many of its elements satisfy `where`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<Box<CountCheck>>,
    /// true: the pointer must resolve; false: it must not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exists: Option<bool>,
}

/// `equals: null` is a check for null, not a missing check.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// Counts the elements of an array that satisfy `where` (all of them when it is
/// omitted: the array's length), and compares the count: `op value`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CountCheck {
    /// A check, or a list of checks, with pointers relative to the element.
    #[serde(rename = "where", default, skip_serializing_if = "Option::is_none")]
    pub where_: Option<JsonChecks>,
    /// One of < <= > >= == !=
    pub op: String,
    pub value: f64,
}

/// A located problem in a check: the field path and what is wrong.
pub type CheckError = (FieldPath, String);

/// Checks ready to evaluate; all must hold.
#[derive(Debug, Clone)]
pub struct JsonMatcher(Vec<Compiled>);

#[derive(Debug, Clone)]
struct Compiled {
    pointer: String,
    test: Test,
}

#[derive(Debug, Clone)]
enum Test {
    Equals(Value),
    Cmp(Cmp, String, f64),
    Matches(Regex),
    Count {
        of: Option<JsonMatcher>,
        cmp: Cmp,
        op: String,
        value: f64,
    },
    Exists(bool),
}

const FORMS: &str = "equals, op with value, matches, count, exists";
const OPS: &str = "< <= > >= == !=";

/// Compiles `expect.json` found at `at`: every problem, each at its field.
pub fn compile_json(checks: &JsonChecks, at: &FieldPath) -> Result<JsonMatcher, Vec<CheckError>> {
    let mut errors = Vec::new();
    let mut out = Vec::new();
    match checks {
        JsonChecks::One(c) => out.extend(compile_one(c, at, &mut errors)),
        JsonChecks::All(v) => {
            if v.is_empty() {
                errors.push((
                    at.clone(),
                    "the list of checks is empty: give at least one, or drop json".into(),
                ));
            }
            for (i, c) in v.iter().enumerate() {
                out.extend(compile_one(c, &at.index(i), &mut errors));
            }
        }
    }
    if errors.is_empty() {
        Ok(JsonMatcher(out))
    } else {
        Err(errors)
    }
}

fn compile_op(op: &str, at: &FieldPath, errors: &mut Vec<CheckError>) -> Option<Cmp> {
    let cmp = Cmp::parse(op);
    if cmp.is_none() {
        errors.push((
            at.clone(),
            format!("unknown comparison {op:?}: use one of {OPS}"),
        ));
    }
    cmp
}

fn compile_one(c: &JsonCheck, at: &FieldPath, errors: &mut Vec<CheckError>) -> Option<Compiled> {
    let before = errors.len();
    if !(c.pointer.is_empty() || c.pointer.starts_with('/')) {
        errors.push((
            at.key("pointer"),
            format!(
                "{:?} is not a JSON pointer: start it with / (e.g. /status), or leave it empty for the whole value",
                c.pointer
            ),
        ));
    }
    let mut set = Vec::new();
    if c.equals.is_some() {
        set.push("equals");
    }
    if c.op.is_some() || c.value.is_some() {
        set.push("op");
    }
    if c.matches.is_some() {
        set.push("matches");
    }
    if c.count.is_some() {
        set.push("count");
    }
    if c.exists.is_some() {
        set.push("exists");
    }
    match set.len() {
        0 => errors.push((at.clone(), format!("the check tests nothing: give exactly one of {FORMS}"))),
        1 => {}
        _ => errors.push((
            at.clone(),
            format!(
                "the check sets several tests ({}): give exactly one of {FORMS} (a list of checks tests several things)",
                set.join(", ")
            ),
        )),
    }
    let mut test = None;
    if let Some(v) = &c.equals {
        test = Some(Test::Equals(v.clone()));
    }
    match (&c.op, c.value) {
        (Some(op), Some(value)) => {
            test = compile_op(op, &at.key("op"), errors)
                .map(|cmp| Test::Cmp(cmp, op.trim().to_string(), value));
        }
        (Some(op), None) => {
            compile_op(op, &at.key("op"), errors);
            errors.push((
                at.key("op"),
                format!("op {op:?} needs a value to compare with"),
            ));
        }
        (None, Some(_)) => {
            errors.push((at.key("value"), format!("value needs an op: one of {OPS}")))
        }
        (None, None) => {}
    }
    if let Some(re) = &c.matches {
        match gpuchaos_proto::spec::compile_regex(re) {
            Ok(re) => test = Some(Test::Matches(re)),
            Err(e) => errors.push((at.key("matches"), e)),
        }
    }
    if let Some(n) = &c.count {
        let cat = at.key("count");
        let of = n
            .where_
            .as_ref()
            .and_then(|w| match compile_json(w, &cat.key("where")) {
                Ok(m) => Some(m),
                Err(e) => {
                    errors.extend(e);
                    None
                }
            });
        if let Some(cmp) = compile_op(&n.op, &cat.key("op"), errors) {
            test = Some(Test::Count {
                of,
                cmp,
                op: n.op.trim().to_string(),
                value: n.value,
            });
        }
    }
    if let Some(e) = c.exists {
        test = Some(Test::Exists(e));
    }
    if errors.len() > before {
        return None;
    }
    test.map(|test| Compiled {
        pointer: c.pointer.clone(),
        test,
    })
}

/// A JSON value for a one-line message, cut to a readable length.
fn short(v: &Value) -> String {
    // A big array or object is described, not serialised (a body may be 4 MiB).
    match v {
        Value::Array(a) if a.len() > 8 => return format!("an array of {} elements", a.len()),
        Value::Object(o) if o.len() > 8 => return format!("an object of {} keys", o.len()),
        _ => {}
    }
    let s = v.to_string();
    if s.chars().count() <= 80 {
        s
    } else {
        format!("{}…", s.chars().take(80).collect::<String>())
    }
}

fn num(x: f64) -> String {
    format!("{x}")
}

impl JsonMatcher {
    /// The first check that fails on the document, as a one-line reason:
    /// `json /queue_depth: 12 is not < 10`.
    pub fn check(&self, doc: &Value) -> Result<(), String> {
        self.0.iter().try_for_each(|c| c.check(doc))
    }

    fn holds(&self, doc: &Value) -> bool {
        self.check(doc).is_ok()
    }

    /// What the checks ask, for messages: `state == "RUNNING" and ready exists`.
    fn describe(&self) -> String {
        self.0
            .iter()
            .map(Compiled::describe)
            .collect::<Vec<_>>()
            .join(" and ")
    }
}

impl Compiled {
    fn label(&self) -> String {
        if self.pointer.is_empty() {
            "json (the whole body)".into()
        } else {
            format!("json {}", self.pointer)
        }
    }

    fn check(&self, doc: &Value) -> Result<(), String> {
        let got = doc.pointer(&self.pointer);
        let fail = |why: String| Err(format!("{}: {why}", self.label()));
        let got = match (got, &self.test) {
            (None, Test::Exists(false)) => return Ok(()),
            (Some(v), Test::Exists(false)) => {
                return fail(format!("present ({}), expected absent", short(v)));
            }
            (None, _) => return fail("missing".into()),
            (Some(v), _) => v,
        };
        match &self.test {
            Test::Exists(_) => Ok(()),
            Test::Equals(want) if got == want => Ok(()),
            Test::Equals(want) => fail(format!("{} is not {}", short(got), short(want))),
            Test::Cmp(cmp, op, value) => match got.as_f64() {
                Some(x) if cmp.holds(x, *value) => Ok(()),
                Some(_) => fail(format!("{} is not {op} {}", short(got), num(*value))),
                None => fail(format!(
                    "{} is not a number, so it cannot be {op} {}",
                    short(got),
                    num(*value)
                )),
            },
            Test::Matches(re) => match got.as_str() {
                Some(s) if re.is_match(s) => Ok(()),
                Some(_) => fail(format!("{} does not match {}", short(got), re.as_str())),
                None => fail(format!(
                    "{} is not a string, so it cannot match {}",
                    short(got),
                    re.as_str()
                )),
            },
            Test::Count { of, cmp, op, value } => {
                let Some(items) = got.as_array() else {
                    return fail(format!(
                        "{} is not an array, so its elements cannot be counted",
                        short(got)
                    ));
                };
                let n = match of {
                    Some(m) => items.iter().filter(|e| m.holds(e)).count(),
                    None => items.len(),
                };
                if cmp.holds(n as f64, *value) {
                    return Ok(());
                }
                match of {
                    Some(m) => fail(format!(
                        "{n} {} {}, need {op} {}",
                        if n == 1 {
                            "element matches"
                        } else {
                            "elements match"
                        },
                        m.describe(),
                        num(*value)
                    )),
                    None => fail(format!(
                        "{n} {}, need {op} {}",
                        if n == 1 { "element" } else { "elements" },
                        num(*value)
                    )),
                }
            }
        }
    }

    fn describe(&self) -> String {
        let what = if self.pointer.is_empty() {
            "value".to_string()
        } else {
            self.pointer[1..].to_string()
        };
        match &self.test {
            Test::Equals(v) => format!("{what} == {}", short(v)),
            Test::Cmp(_, op, value) => format!("{what} {op} {}", num(*value)),
            Test::Matches(re) => format!("{what} matches {}", re.as_str()),
            Test::Exists(true) => format!("{what} exists"),
            Test::Exists(false) => format!("{what} is absent"),
            Test::Count { of, op, value, .. } => match of {
                Some(m) => format!(
                    "{what} has {op} {} elements with {}",
                    num(*value),
                    m.describe()
                ),
                None => format!("{what} has {op} {} elements", num(*value)),
            },
        }
    }
}

/// Response headers to check: each present with a value matching its regex, or absent.
#[derive(Debug, Clone, Default)]
pub struct HeaderMatcher(Vec<Named>);

/// Compiles `expect.headers` (name → regex) and `expect.header_absent` found at
/// `at` (the `expect` map): every problem, each at its field.
pub fn compile_headers(
    headers: &BTreeMap<String, String>,
    absent: &[String],
    at: &FieldPath,
) -> Result<HeaderMatcher, Vec<CheckError>> {
    let mut errors = Vec::new();
    let mut out: Vec<Named> = Vec::new();
    for (name, re) in headers {
        let path = at.key("headers").key(name);
        let Ok(hn) = hyper::header::HeaderName::from_bytes(name.as_bytes()) else {
            errors.push((path, format!("{name:?} is not a valid header name")));
            continue;
        };
        if !first(&hn, path.clone(), &mut errors, &out) {
            continue;
        }
        match gpuchaos_proto::spec::compile_regex(re) {
            Ok(re) => out.push((hn, Some(re))),
            Err(e) => errors.push((path, e)),
        }
    }
    for (i, name) in absent.iter().enumerate() {
        let path = at.key("header_absent").index(i);
        let Ok(hn) = hyper::header::HeaderName::from_bytes(name.as_bytes()) else {
            errors.push((path, format!("{name:?} is not a valid header name")));
            continue;
        };
        if first(&hn, path, &mut errors, &out) {
            out.push((hn, None));
        }
    }
    if errors.is_empty() {
        Ok(HeaderMatcher(out))
    } else {
        Err(errors)
    }
}

type Named = (hyper::header::HeaderName, Option<Regex>);

/// Whether `name` is not checked yet (else an error at `path`).
fn first(
    name: &hyper::header::HeaderName,
    path: FieldPath,
    errors: &mut Vec<CheckError>,
    out: &[Named],
) -> bool {
    if out.iter().any(|(n, _)| n == name) {
        errors.push((
            path,
            format!("header {name} is checked twice (names are case-insensitive)"),
        ));
        return false;
    }
    true
}

impl HeaderMatcher {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The first header check that fails, as a one-line reason:
    /// `header content-type: "text/html" does not match ^application/json`.
    pub fn check(&self, got: &hyper::HeaderMap) -> Result<(), String> {
        for (name, re) in &self.0 {
            let value = got
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            match (re, value) {
                (None, None) => {}
                (None, Some(v)) => {
                    return Err(format!(
                        "header {name}: present ({}), expected absent",
                        short(&Value::String(v))
                    ));
                }
                (Some(_), None) => return Err(format!("header {name}: missing")),
                (Some(re), Some(v)) if re.is_match(&v) => {}
                (Some(re), Some(v)) => {
                    return Err(format!(
                        "header {name}: {} does not match {}",
                        short(&Value::String(v)),
                        re.as_str()
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn matcher(yaml: &str) -> JsonMatcher {
        let c: JsonChecks = serde_saphyr::from_str(yaml).unwrap();
        compile_json(&c, &FieldPath::root().key("json")).unwrap()
    }

    fn problems(yaml: &str) -> Vec<(String, String)> {
        let c: JsonChecks = serde_saphyr::from_str(yaml).unwrap();
        compile_json(&c, &FieldPath::root().key("json"))
            .expect_err("the check should be refused")
            .into_iter()
            .map(|(p, m)| (p.to_string(), m))
            .collect()
    }

    fn doc() -> Value {
        json!({
            "status": "ok",
            "queue_depth": 12,
            "load": 0.25,
            "model": "llama-3-8b",
            "ready": true,
            "nothing": null,
            "replicas": [
                {"name": "a", "state": "RUNNING", "gpu": 0},
                {"name": "b", "state": "STARTING", "gpu": 1},
            ],
            "tags": ["x", "y", "x"],
        })
    }

    fn fails(yaml: &str) -> String {
        matcher(yaml)
            .check(&doc())
            .expect_err("the check should fail")
    }

    #[test]
    fn the_old_single_form_keeps_working() {
        assert_eq!(
            matcher("{pointer: /status, equals: ok}").check(&doc()),
            Ok(())
        );
        assert_eq!(
            fails("{pointer: /status, equals: degraded}"),
            r#"json /status: "ok" is not "degraded""#
        );
        // Exact JSON equality: a number is not its string.
        assert_eq!(
            fails("{pointer: /queue_depth, equals: '12'}"),
            r#"json /queue_depth: 12 is not "12""#
        );
        assert_eq!(
            matcher("{pointer: /queue_depth, equals: 12}").check(&doc()),
            Ok(())
        );
        assert_eq!(
            matcher("{pointer: /nothing, equals: null}").check(&doc()),
            Ok(())
        );
        assert_eq!(
            fails("{pointer: /ready, equals: null}"),
            "json /ready: true is not null"
        );
        assert_eq!(
            fails("{pointer: /absent, equals: 1}"),
            "json /absent: missing"
        );
        let whole = JsonChecks::One(Box::new(JsonCheck {
            equals: Some(json!({"a": [1]})),
            ..Default::default()
        }));
        let m = compile_json(&whole, &FieldPath::root()).unwrap();
        assert_eq!(m.check(&json!({"a": [1]})), Ok(()));
    }

    #[test]
    fn numeric_comparisons() {
        for (op, value, ok) in [
            ("<", 13.0, true),
            ("<", 12.0, false),
            ("<=", 12.0, true),
            (">", 11.5, true),
            (">", 12.0, false),
            (">=", 12.0, true),
            ("==", 12.0, true),
            ("!=", 12.0, false),
        ] {
            let m = matcher(&format!(
                "{{pointer: /queue_depth, op: '{op}', value: {value}}}"
            ));
            assert_eq!(m.check(&doc()).is_ok(), ok, "12 {op} {value}");
        }
        assert_eq!(
            fails("{pointer: /queue_depth, op: '<', value: 10}"),
            "json /queue_depth: 12 is not < 10"
        );
        assert_eq!(
            fails("{pointer: /load, op: '>=', value: 0.5}"),
            "json /load: 0.25 is not >= 0.5"
        );
        assert_eq!(
            fails("{pointer: /status, op: '<', value: 10}"),
            r#"json /status: "ok" is not a number, so it cannot be < 10"#
        );
        assert_eq!(
            fails("{pointer: /depth, op: '<', value: 10}"),
            "json /depth: missing"
        );
    }

    #[test]
    fn regex_on_a_string() {
        assert_eq!(
            matcher("{pointer: /model, matches: '^llama'}").check(&doc()),
            Ok(())
        );
        assert_eq!(
            fails("{pointer: /model, matches: '^mistral'}"),
            r#"json /model: "llama-3-8b" does not match ^mistral"#
        );
        assert_eq!(
            fails("{pointer: /queue_depth, matches: '^1'}"),
            "json /queue_depth: 12 is not a string, so it cannot match ^1"
        );
    }

    #[test]
    fn counting_array_elements() {
        let running = "{pointer: /replicas, count: {where: {pointer: /state, equals: RUNNING}, op: '>=', value: 2}}";
        assert_eq!(
            fails(running),
            r#"json /replicas: 1 element matches state == "RUNNING", need >= 2"#
        );
        assert_eq!(
            matcher(&running.replace("value: 2", "value: 1")).check(&doc()),
            Ok(())
        );
        // No where: the array's length.
        assert_eq!(
            matcher("{pointer: /replicas, count: {op: '==', value: 2}}").check(&doc()),
            Ok(())
        );
        assert_eq!(
            fails("{pointer: /replicas, count: {op: '>', value: 2}}"),
            "json /replicas: 2 elements, need > 2"
        );
        // Where relative to the element: the empty pointer is the element itself; a
        // list of conditions must all hold.
        assert_eq!(
            fails("{pointer: /tags, count: {where: {equals: x}, op: '==', value: 3}}"),
            r#"json /tags: 2 elements match value == "x", need == 3"#
        );
        assert_eq!(
            fails(
                "{pointer: /replicas, count: {where: [{pointer: /state, matches: '^RUN'}, {pointer: /gpu, op: '>', value: 0}], op: '>=', value: 1}}"
            ),
            "json /replicas: 0 elements match state matches ^RUN and gpu > 0, need >= 1"
        );
        assert_eq!(
            fails("{pointer: /status, count: {op: '>', value: 0}}"),
            r#"json /status: "ok" is not an array, so its elements cannot be counted"#
        );
        assert_eq!(
            fails("{pointer: /pods, count: {op: '>', value: 0}}"),
            "json /pods: missing"
        );
    }

    #[test]
    fn exists_and_absent() {
        assert_eq!(
            matcher("{pointer: /ready, exists: true}").check(&doc()),
            Ok(())
        );
        assert_eq!(
            matcher("{pointer: /nothing, exists: true}").check(&doc()),
            Ok(())
        );
        assert_eq!(
            fails("{pointer: /live, exists: true}"),
            "json /live: missing"
        );
        assert_eq!(
            matcher("{pointer: /error, exists: false}").check(&doc()),
            Ok(())
        );
        assert_eq!(
            fails("{pointer: /ready, exists: false}"),
            "json /ready: present (true), expected absent"
        );
    }

    #[test]
    fn a_list_must_all_hold_and_names_the_first_failure() {
        let list = "[{pointer: /status, equals: ok}, {pointer: /queue_depth, op: '<', value: 10}, {pointer: /ready, exists: true}]";
        assert_eq!(fails(list), "json /queue_depth: 12 is not < 10");
        assert_eq!(
            matcher(&list.replace("value: 10", "value: 20")).check(&doc()),
            Ok(())
        );
        assert!(matches!(
            serde_saphyr::from_str::<JsonChecks>(list).unwrap(),
            JsonChecks::All(v) if v.len() == 3
        ));
    }

    #[test]
    fn bad_checks_are_refused_at_their_fields() {
        assert_eq!(
            problems("{pointer: status, equals: ok}"),
            vec![(
                "json.pointer".into(),
                "\"status\" is not a JSON pointer: start it with / (e.g. /status), or leave it empty for the whole value".into()
            )]
        );
        let p = problems(
            "[{pointer: /a}, {pointer: /b, equals: 1, exists: true}, {pointer: /c, op: '=~', value: 1}, {pointer: /d, op: '<'}, {pointer: /e, value: 3}, {pointer: /f, matches: '('}]",
        );
        let paths: Vec<&str> = p.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "json[0]",
                "json[1]",
                "json[2].op",
                "json[3].op",
                "json[4].value",
                "json[5].matches"
            ],
            "{p:#?}"
        );
        assert!(
            p[0].1.contains(
                "tests nothing: give exactly one of equals, op with value, matches, count, exists"
            ),
            "{}",
            p[0].1
        );
        assert!(
            p[1].1.contains("several tests (equals, exists)"),
            "{}",
            p[1].1
        );
        assert!(
            p[2].1
                .contains("unknown comparison \"=~\": use one of < <= > >= == !="),
            "{}",
            p[2].1
        );
        assert!(p[3].1.contains("needs a value"), "{}", p[3].1);
        assert!(p[4].1.contains("value needs an op"), "{}", p[4].1);
        assert!(p[5].1.contains("regex"), "{}", p[5].1);
        // count's where is a check itself, located inside it.
        let p = problems(
            "{pointer: /r, count: {where: [{pointer: state, equals: x}, {pointer: /s}], op: '>>', value: 1}}",
        );
        let paths: Vec<&str> = p.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "json.count.where[0].pointer",
                "json.count.where[1]",
                "json.count.op"
            ],
            "{p:#?}"
        );
        assert_eq!(problems("[]")[0].0, "json");
    }

    #[test]
    fn typing_errors_keep_their_field() {
        let e = serde_path_to_error::deserialize::<_, JsonChecks>(
            json!([{"pointer": "/a", "equal": 1}]),
        )
        .unwrap_err();
        assert_eq!(e.path().to_string(), "[0].equal");
        assert!(
            e.inner().to_string().contains("unknown field `equal`"),
            "{e}"
        );
        let e = serde_path_to_error::deserialize::<_, JsonChecks>(
            json!({"pointer": "/a", "op": "<", "value": "ten"}),
        )
        .unwrap_err();
        assert_eq!(e.path().to_string(), "value");
        let e = serde_path_to_error::deserialize::<_, JsonChecks>(json!("ok")).unwrap_err();
        assert!(e.inner().to_string().contains("a check"), "{e}");
    }

    #[test]
    fn headers_match_case_insensitively_or_must_be_absent() {
        let hs: BTreeMap<String, String> =
            [("Content-Type".to_string(), "^application/json".to_string())].into();
        let m = compile_headers(&hs, &["x-error".into()], &FieldPath::root()).unwrap();
        let mut got = hyper::HeaderMap::new();
        got.insert(
            "content-type",
            "application/json; charset=utf-8".parse().unwrap(),
        );
        assert_eq!(m.check(&got), Ok(()));
        got.insert("X-Error", "boom".parse().unwrap());
        assert_eq!(
            m.check(&got),
            Err(r#"header x-error: present ("boom"), expected absent"#.into())
        );
        got.remove("x-error");
        got.insert("content-type", "text/html".parse().unwrap());
        assert_eq!(
            m.check(&got),
            Err(r#"header content-type: "text/html" does not match ^application/json"#.into())
        );
        got.remove("content-type");
        assert_eq!(m.check(&got), Err("header content-type: missing".into()));
    }

    #[test]
    fn bad_header_checks_are_refused_at_their_fields() {
        let hs: BTreeMap<String, String> = [
            ("bad name".to_string(), "x".to_string()),
            ("content-type".to_string(), "(".to_string()),
            ("x-ok".to_string(), "y".to_string()),
        ]
        .into();
        let e = compile_headers(
            &hs,
            &["X-OK".into(), "a b".into()],
            &FieldPath::root().key("expect"),
        )
        .unwrap_err();
        let paths: Vec<String> = e.iter().map(|(p, _)| p.to_string()).collect();
        assert_eq!(
            paths,
            vec![
                "expect.headers.bad name",
                "expect.headers.content-type",
                "expect.header_absent[0]",
                "expect.header_absent[1]"
            ],
            "{e:#?}"
        );
        assert!(e[2].1.contains("checked twice"), "{}", e[2].1);
    }

    /// The whole loader: an http probe whose expect has the given body.
    fn load_errors(expect: &str) -> Vec<crate::experiment::LoadError> {
        let text = format!(
            "probes:\n  - name: h\n    http:\n      url: http://127.0.0.1:8000/status\n      expect:\n{expect}\nmethod:\n  - wait: 1s\n"
        );
        match crate::experiment::load_str(&text, "x.yaml", std::path::Path::new("."), "x") {
            Ok(_) => Vec::new(),
            // The method has no fault: not what these tests are about.
            Err(e) => e.into_iter().filter(|e| e.path != "method").collect(),
        }
    }

    #[test]
    fn the_loader_accepts_every_form_and_the_old_one() {
        let all = r#"        status: [200]
        headers: {Content-Type: "^application/json"}
        header_absent: [x-error]
        json:
          - {pointer: /status, equals: ok}
          - {pointer: /queue_depth, op: "<", value: 10}
          - {pointer: /model, matches: "^llama"}
          - {pointer: /replicas, count: {where: {pointer: /state, equals: RUNNING}, op: ">=", value: 2}}
          - {pointer: /replicas, count: {op: ">", value: 0}}
          - {pointer: /ready, exists: true}"#;
        assert_eq!(load_errors(all), vec![]);
        assert_eq!(
            load_errors("        json: {pointer: /status, equals: ok}"),
            vec![]
        );
    }

    #[test]
    fn the_loader_reports_every_bad_check_at_its_field() {
        let bad = r#"        headers: {"bad name": x, content-type: "(", x-ok: y}
        header_absent: [X-OK]
        json:
          - {pointer: status, equals: ok}
          - {pointer: /a, op: "~", value: 1}
          - {pointer: /b, equals: 1, matches: x}
          - {pointer: /c}
          - {pointer: /d, matches: "[z-a]"}
          - {pointer: /e, count: {where: {pointer: f, exists: true}, op: ">=", value: 1}}
          - {pointer: /f, op: "<"}"#;
        let e = load_errors(bad);
        let got: Vec<(String, u64, u64)> = e
            .iter()
            .map(|e| (e.path.clone(), e.line, e.column))
            .collect();
        let at = |p: &str, line: u64, col: u64| (format!("probes[0].http.expect.{p}"), line, col);
        assert_eq!(
            got,
            vec![
                at("headers.bad name", 6, 31),
                at("headers.content-type", 6, 48),
                at("header_absent[0]", 7, 25),
                at("json[0].pointer", 9, 23),
                at("json[1].op", 10, 31),
                at("json[2]", 11, 13),
                at("json[3]", 12, 13),
                at("json[4].matches", 13, 36),
                at("json[5].count.where.pointer", 14, 52),
                at("json[6].op", 15, 31),
            ],
            "{e:#?}"
        );
        assert!(
            e[4].message.contains("unknown comparison \"~\""),
            "{}",
            e[4].message
        );
        assert!(
            e[5].message.contains("several tests (equals, matches)"),
            "{}",
            e[5].message
        );
        // A typo in a check is an unknown field with a suggestion.
        let e = load_errors("        json: [{pointer: /a, equal: 1}]");
        assert_eq!(e.len(), 1, "{e:#?}");
        assert_eq!(e[0].path, "probes[0].http.expect.json[0].equal");
        assert!(
            e[0].message.contains("did you mean `equals`"),
            "{}",
            e[0].message
        );
        let e = load_errors("        json: ok");
        assert_eq!(e[0].path, "probes[0].http.expect.json", "{e:#?}");
        assert!(
            e[0].message.contains("or a list of checks"),
            "{}",
            e[0].message
        );
    }

    #[test]
    fn the_schema_describes_the_check_forms() {
        let schema = crate::experiment::json_schema().to_string();
        for field in [
            "JsonChecks",
            "CountCheck",
            "\"where\"",
            "\"matches\"",
            "\"exists\"",
            "header_absent",
        ] {
            assert!(schema.contains(field), "schema lacks {field}");
        }
    }
}

//! A YAML document as a tree that remembers where every node came from.
//!
//! serde-saphyr stops at the first error and cannot say where a value deep inside a
//! typed struct was written. Parsing once into this tree (every node with its line and
//! column, via `Spanned`) lets the loader type each section on its own, keep going
//! after an error, and point every error (including the semantic ones found after
//! typing) at the line and column of the field it names.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// A place in the source: 1-based line and column (0 when unknown).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Loc {
    pub line: u64,
    pub column: u64,
}

/// One node and where it was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub loc: Loc,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    /// Keys in source order, each with its own location.
    Map(Vec<(Key, Node)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    pub loc: Loc,
    pub name: String,
}

/// One step of a field path: `probes[2].http.url` is Key, Index, Key, Key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// A field path, printed the way users write it: `method[0].fault.target.pick`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Path(pub Vec<Seg>);

impl Path {
    pub fn root() -> Path {
        Path(Vec::new())
    }
    pub fn key(&self, k: &str) -> Path {
        let mut p = self.clone();
        p.0.push(Seg::Key(k.to_string()));
        p
    }
    pub fn index(&self, i: usize) -> Path {
        let mut p = self.clone();
        p.0.push(Seg::Index(i));
        p
    }
    /// Appends a path as serde_path_to_error prints it (`a.b[0].c`, `.` for none).
    pub fn join_dotted(&self, dotted: &str) -> Path {
        let mut p = self.clone();
        if dotted == "." || dotted.is_empty() {
            return p;
        }
        for part in dotted.split('.') {
            let (name, rest) = match part.find('[') {
                Some(i) => (&part[..i], &part[i..]),
                None => (part, ""),
            };
            if !name.is_empty() {
                p.0.push(Seg::Key(name.to_string()));
            }
            for idx in rest.split('[').filter(|s| !s.is_empty()) {
                match idx.trim_end_matches(']').parse() {
                    Ok(i) => p.0.push(Seg::Index(i)),
                    Err(_) => p.0.push(Seg::Key(idx.trim_end_matches(']').to_string())),
                }
            }
        }
        p
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for s in &self.0 {
            match s {
                Seg::Key(k) => {
                    if !first {
                        f.write_str(".")?;
                    }
                    f.write_str(k)?;
                }
                Seg::Index(i) => write!(f, "[{i}]")?,
            }
            first = false;
        }
        Ok(())
    }
}

impl Node {
    /// The node at `path`, or the deepest existing node along it (so an error about a
    /// missing field points at the map that lacks it).
    pub fn locate(&self, path: &Path) -> Loc {
        let mut node = self;
        let mut loc = self.loc;
        for seg in &path.0 {
            let next = match (seg, &node.value) {
                (Seg::Key(k), Value::Map(entries)) => {
                    match entries.iter().find(|(key, _)| &key.name == k) {
                        Some((key, v)) => {
                            // A null value has no position of its own worth showing.
                            loc = if v.loc.line == 0 || v.value == Value::Null {
                                key.loc
                            } else {
                                v.loc
                            };
                            Some(v)
                        }
                        None => None,
                    }
                }
                (Seg::Index(i), Value::Seq(items)) => items.get(*i).inspect(|v| loc = v.loc),
                _ => None,
            };
            match next {
                Some(n) => node = n,
                None => break,
            }
        }
        loc
    }

    /// The location of the key `name` in the map at `path` (for unknown-field errors).
    pub fn locate_key(&self, path: &Path, name: &str) -> Option<Loc> {
        let mut node = self;
        for seg in &path.0 {
            node = match (seg, &node.value) {
                (Seg::Key(k), Value::Map(entries)) => {
                    &entries.iter().find(|(key, _)| &key.name == k)?.1
                }
                (Seg::Index(i), Value::Seq(items)) => items.get(*i)?,
                _ => return None,
            };
        }
        match &node.value {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.name == name)
                .map(|(k, _)| k.loc),
            _ => None,
        }
    }

    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(entries) => entries.iter().find(|(k, _)| k.name == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The plain JSON value (what the typed structs are deserialized from).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match &self.value {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::UInt(u) => J::from(*u),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(J::Number)
                .unwrap_or(J::Null),
            Value::Str(s) => J::String(s.clone()),
            Value::Seq(items) => J::Array(items.iter().map(Node::to_json).collect()),
            Value::Map(entries) => J::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.name.clone(), v.to_json()))
                    .collect(),
            ),
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self.value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) | Value::UInt(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a map",
        }
    }
}

fn loc_of(l: &serde_saphyr::Location) -> Loc {
    Loc {
        line: l.line(),
        column: l.column(),
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s: Spanned<Value> = Spanned::deserialize(d)?;
        Ok(Node {
            loc: loc_of(&s.referenced),
            value: s.value,
        })
    }
}

/// A map key: any scalar, kept as text.
struct KeyText(String);

impl<'de> Deserialize<'de> for KeyText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = KeyText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a scalar map key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<KeyText, E> {
                Ok(KeyText("null".into()))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Value;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
                Ok(Value::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Value, E> {
                Ok(Value::Null)
            }
            fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Value, D2::Error> {
                Value::deserialize(d)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
                Ok(Value::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
                Ok(Value::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
                Ok(Value::UInt(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
                Ok(Value::Float(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
                Ok(Value::Str(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
                Ok(Value::Str(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
                let mut items = Vec::new();
                while let Some(n) = seq.next_element::<Node>()? {
                    items.push(n);
                }
                Ok(Value::Seq(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
                let mut entries: Vec<(Key, Node)> = Vec::new();
                // Duplicates are found here, in linear time (the parser passes every
                // entry through): a linear scan per key made a 80k-key mapping take
                // 40 s to validate.
                let mut seen = std::collections::HashSet::new();
                while let Some(k) = map.next_key::<Spanned<KeyText>>()? {
                    let v: Node = map.next_value()?;
                    let key = Key {
                        loc: loc_of(&k.referenced),
                        name: k.value.0,
                    };
                    if !seen.insert(key.name.clone()) {
                        return Err(de::Error::custom(format!(
                            "duplicate key `{}` (line {} column {}): write each key once",
                            key.name, key.loc.line, key.loc.column
                        )));
                    }
                    entries.push((key, v));
                }
                Ok(Value::Map(entries))
            }
        }
        d.deserialize_any(V)
    }
}

/// The duplicate-key error raised inside the tree's visitor carries its location in
/// its text (a visitor's error cannot carry one otherwise); this takes it back out:
/// (line, column, message without the location).
pub fn duplicate_key_location(msg: &str) -> Option<(Loc, String)> {
    let start = msg.find("duplicate key `")?;
    let open = msg[start..].find(" (line ")? + start;
    let close = msg[open..].find(')')? + open;
    let mut nums = msg[open + 7..close].split(" column ");
    let line = nums.next()?.trim().parse().ok()?;
    let column = nums.next()?.trim().parse().ok()?;
    Some((
        Loc { line, column },
        format!("{}{}", &msg[start..open], &msg[close + 1..]),
    ))
}

/// Parses every document of a YAML text into located trees. Booleans are YAML 1.2's
/// (`true`/`false` only), so `on:`, `no` or `yes` stay strings (the "Norway problem").
pub fn parse_documents(text: &str) -> Result<Vec<Node>, serde_saphyr::Error> {
    serde_saphyr::from_multiple_with_options::<Node>(
        text,
        serde_saphyr::options! {
            strict_booleans: true,
            duplicate_keys: serde_saphyr::options::DuplicateKeyPolicy::PassThrough,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_remember_lines_and_columns() {
        let doc = "a: 1\nlist:\n  - x: true\n    y: \"s\"\n  - 2.5\n";
        let nodes = parse_documents(doc).unwrap();
        let n = &nodes[0];
        let p = Path::root().key("list").index(0).key("y");
        assert_eq!(n.locate(&p), Loc { line: 4, column: 8 });
        assert_eq!(
            n.locate(&Path::root().key("list").index(1)),
            Loc { line: 5, column: 5 }
        );
        assert_eq!(
            n.locate_key(&Path::root().key("list").index(0), "x"),
            Some(Loc { line: 3, column: 5 })
        );
        assert_eq!(
            n.to_json(),
            serde_json::json!({"a": 1, "list": [{"x": true, "y": "s"}, 2.5]})
        );
    }

    #[test]
    fn dotted_paths_round_trip() {
        let p = Path::root()
            .key("method")
            .join_dotted("fault.target[2].pick");
        assert_eq!(p.to_string(), "method.fault.target[2].pick");
        let p = Path::root().key("probes").index(3).join_dotted(".");
        assert_eq!(p.to_string(), "probes[3]");
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let e = parse_documents("a: 1\na: 2\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("duplicate key `a` (line 2 column 1): write each key once"),
            "{e}"
        );
        assert!(!e.to_string().contains("DuplicateKeyPolicy"), "{e}");
        let n = &parse_documents("on: {x: 1}\nno: yes\n").unwrap()[0];
        assert_eq!(
            n.to_json(),
            serde_json::json!({"on": {"x": 1}, "no": "yes"})
        );
    }

    #[test]
    fn quoted_numbers_stay_strings() {
        let n = &parse_documents("a: \"5\"\nb: 5\n").unwrap()[0];
        assert_eq!(n.to_json(), serde_json::json!({"a": "5", "b": 5}));
    }
}

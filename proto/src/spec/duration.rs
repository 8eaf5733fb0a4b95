//! Durations as users write them (`250ms`, `30s`, `2m`, `1h 30m`), bounded.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::FieldError;

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

/// Every fault's `duration` must be above zero.
pub(crate) fn validate_duration(d: HumanDuration, errs: &mut Vec<FieldError>) {
    if d.0.is_zero() {
        errs.push(FieldError::new(
            "duration",
            "must be above zero: every fault needs a bounded duration, e.g. 30s",
        ));
    }
}

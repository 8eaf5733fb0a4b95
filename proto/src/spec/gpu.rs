//! The `gpu_memory` kind: hold GPU memory, as a cascading out-of-memory does.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{FieldError, GpuRef, HumanDuration, KindSpec, validate_duration};

/// The `gpu_memory` kind.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuMemorySpec {
    pub duration: HumanDuration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Which GPUs: `{gpus: [0, 1]}`, `{gpus: ["GPU-…"]}` or `{gpus: all}`.
    pub target: GpuTarget,
    /// How much: `{bytes: 20GiB}` more in use, `{percent: 95}` of the card in use, or
    /// `{leave_free: 2GiB}` (everything but that in use).
    pub fill: Fill,
    /// Reach the target gradually over this time, in steps, like a slow leak.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ramp: Option<HumanDuration>,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuTarget {
    pub gpus: GpuSet,
}

/// `all`, or a list of indexes and UUIDs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuSet {
    All,
    List(Vec<GpuRef>),
}

impl Serialize for GpuSet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            GpuSet::All => s.serialize_str("all"),
            GpuSet::List(v) => v.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for GpuSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            One(u32),
            List(Vec<GpuRef>),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "expected `all`, a GPU index, or a list of indexes and UUIDs (GPU-…)",
            )
        })? {
            Raw::Word(w) if w == "all" => Ok(GpuSet::All),
            Raw::Word(w) => Ok(GpuSet::List(vec![GpuRef::Uuid(w)])),
            Raw::One(i) => Ok(GpuSet::List(vec![GpuRef::Index(i)])),
            Raw::List(v) => Ok(GpuSet::List(v)),
        }
    }
}

#[cfg(feature = "schema")]
impl schemars::JsonSchema for GpuSet {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "GpuSet".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "`all`, a GPU index, or a list of indexes and UUIDs",
            "anyOf": [
                {"const": "all"},
                {"type": "integer", "minimum": 0},
                {"type": "string"},
                {"type": "array", "items": {"type": ["integer", "string"]}}
            ]
        })
    }
}

/// How much memory to hold.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Fill {
    /// This much more in use than before the fault.
    Bytes(ByteSize),
    /// This share of the card's total memory in use.
    Percent(f64),
    /// Everything in use but this much.
    LeaveFree(ByteSize),
}

impl Fill {
    /// The used-memory level to reach on a card with `total` bytes that uses `used`
    /// now, or why it cannot be a target.
    pub fn target_used(self, total: u64, used: u64) -> u64 {
        match self {
            Fill::Bytes(b) => used.saturating_add(b.0),
            Fill::Percent(p) => (total as f64 * p / 100.0).round() as u64,
            Fill::LeaveFree(b) => total.saturating_sub(b.0),
        }
    }
}

impl fmt::Display for Fill {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fill::Bytes(b) => write!(f, "{b} more"),
            Fill::Percent(p) => write!(f, "{p}% of the card"),
            Fill::LeaveFree(b) => write!(f, "all but {b}"),
        }
    }
}

/// A size in bytes, written `20GiB`, `512MiB`, `2GB`, `1.5TiB` or a plain number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let bad = || {
            format!(
                "invalid size {text:?}: write a number and a unit: B, KiB, MiB, GiB, TiB (or KB, MB, GB, TB), e.g. 20GiB"
            )
        };
        let n: f64 = num.parse().map_err(|_| bad())?;
        let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1.0,
            "kib" | "k" => 1024.0,
            "mib" | "m" => 1024.0 * 1024.0,
            "gib" | "g" => 1024.0 * 1024.0 * 1024.0,
            "tib" | "t" => 1024.0f64.powi(4),
            "kb" => 1e3,
            "mb" => 1e6,
            "gb" => 1e9,
            "tb" => 1e12,
            _ => return Err(bad()),
        };
        if !n.is_finite() || n * mult > u64::MAX as f64 {
            return Err(bad());
        }
        Ok(ByteSize((n * mult).round() as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
        const MIB: f64 = 1024.0 * 1024.0;
        let b = self.0 as f64;
        if b >= GIB {
            write!(f, "{:.2}GiB", b / GIB)
        } else if b >= MIB {
            write!(f, "{:.1}MiB", b / MIB)
        } else {
            write!(f, "{}B", self.0)
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}B", self.0))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"20GiB\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                Err(E::custom(format!(
                    "invalid size {v}: sizes cannot be negative"
                )))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(feature = "schema")]
impl schemars::JsonSchema for ByteSize {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ByteSize".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A size: 20GiB, 512MiB, 2GB, or a number of bytes",
            "type": ["string", "integer"]
        })
    }
}

/// Shortest ramp: anything faster is a step, say so.
pub const MIN_RAMP_MS: u64 = 200;

/// The GPUs a spec names, as its summary says them. Shared by the GPU kinds, so that
/// they read alike.
pub(super) fn gpus_summary(gpus: &GpuSet) -> String {
    match gpus {
        GpuSet::All => "all GPUs".to_string(),
        GpuSet::List(v) => v
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// Checks `target.gpus` for every GPU kind: a list names at least one GPU, and each
/// UUID is a whole GPU's (GPU-…). `mig` says why the kind refuses a MIG instance
/// ("an Xid fails a whole GPU"), the one part of the message that differs by kind.
pub(super) fn validate_gpus(gpus: &GpuSet, mig: &str, errs: &mut Vec<FieldError>) {
    let GpuSet::List(v) = gpus else { return };
    if v.is_empty() {
        errs.push(FieldError::new(
            "target.gpus",
            "the list is empty: name GPUs by index or UUID, or say all",
        ));
    }
    for (i, g) in v.iter().enumerate() {
        let GpuRef::Uuid(u) = g else { continue };
        if u.starts_with("MIG-") {
            errs.push(FieldError::new(
                format!("target.gpus[{i}]"),
                format!("{u:?} is a MIG instance: {mig}; name the GPU"),
            ));
        } else if !u.starts_with("GPU-") {
            errs.push(FieldError::new(
                format!("target.gpus[{i}]"),
                format!("{u:?} is neither a GPU index nor a GPU UUID (GPU-…)"),
            ));
        }
    }
}

/// Checks `ramp` for the kinds that ramp up: at least [`MIN_RAMP_MS`] and shorter
/// than the fault. `at_once` is what the fault does without a ramp ("fill", "load")
/// and `goal` what the ramp reaches ("target", "load"), so each kind keeps its words.
pub(super) fn validate_ramp(
    ramp: Option<HumanDuration>,
    duration: HumanDuration,
    at_once: &str,
    goal: &str,
    errs: &mut Vec<FieldError>,
) {
    let Some(r) = ramp else { return };
    if r.0.as_millis() < MIN_RAMP_MS as u128 {
        errs.push(FieldError::new(
            "ramp",
            format!(
                "{r} is too short: ramps take at least {MIN_RAMP_MS}ms (remove ramp to {at_once} at once)"
            ),
        ));
    }
    if r.0 >= duration.0 {
        errs.push(FieldError::new(
            "ramp",
            format!(
                "{r} is not shorter than the duration {duration}: the fault would end before reaching its {goal}"
            ),
        ));
    }
}

impl KindSpec for GpuMemorySpec {
    fn duration(&self) -> std::time::Duration {
        self.duration.0
    }

    fn seed(&self) -> Option<u64> {
        self.seed
    }

    fn summary(&self) -> String {
        let gpus = gpus_summary(&self.target.gpus);
        let ramp = self.ramp.map(|r| format!(", ramp {r}")).unwrap_or_default();
        format!("gpu_memory fill {} on {gpus}{ramp}", self.fill)
    }

    fn validate(&self, errs: &mut Vec<FieldError>) {
        validate_duration(self.duration, errs);
        validate_gpus(
            &self.target.gpus,
            "gpu_memory holds memory on whole GPUs only (not yet on MIG instances)",
            errs,
        );
        match self.fill {
            Fill::Bytes(b) if b.0 == 0 => errs.push(FieldError::new(
                "fill.bytes",
                "must be above zero: how much memory to hold, e.g. 20GiB",
            )),
            Fill::Percent(p) if !(p > 0.0 && p <= 100.0) => errs.push(FieldError::new(
                "fill.percent",
                format!("{p} is out of range: use a percentage above 0 and at most 100"),
            )),
            _ => {}
        }
        validate_ramp(self.ramp, self.duration, "fill", "target", errs);
    }
}

#[cfg(test)]
mod tests {
    use super::super::FaultSpec;
    use super::*;

    fn parse(yaml: &str) -> Result<GpuMemorySpec, String> {
        super::super::parse_for_test(yaml).map(|s| match s {
            FaultSpec::GpuMemory(g) => g,
            other => panic!("another kind: {other:?}"),
        })
    }

    #[test]
    fn parses_the_design_example_and_every_mode() {
        let g = parse(
            "kind: gpu_memory\nduration: 1m\ntarget: {gpus: [0]}\nfill: {percent: 95}\nramp: 30s\n",
        )
        .unwrap();
        assert_eq!(g.target.gpus, GpuSet::List(vec![GpuRef::Index(0)]));
        assert_eq!(g.fill, Fill::Percent(95.0));
        let spec = FaultSpec::GpuMemory(g);
        assert_eq!(FaultSpec::from_json(&spec.to_json()).unwrap(), spec);
        let g =
            parse("kind: gpu_memory\nduration: 1m\ntarget: {gpus: all}\nfill: {bytes: 20GiB}\n")
                .unwrap();
        assert_eq!(g.target.gpus, GpuSet::All);
        assert_eq!(g.fill, Fill::Bytes(ByteSize(20 << 30)));
        let g = parse("kind: gpu_memory\nduration: 1m\ntarget: {gpus: [\"GPU-1234\", 1]}\nfill: {leave_free: 2GiB}\n").unwrap();
        assert_eq!(g.fill, Fill::LeaveFree(ByteSize(2 << 30)));
        assert_eq!(g.fill.target_used(80 << 30, 5 << 30), 78 << 30);
        assert_eq!(Fill::Bytes(ByteSize(10)).target_used(100, 30), 40);
        assert_eq!(Fill::Percent(50.0).target_used(100, 30), 50);
    }

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("512MiB").unwrap().0, 512 << 20);
        assert_eq!(ByteSize::parse("2GB").unwrap().0, 2_000_000_000);
        assert_eq!(ByteSize::parse("1.5GiB").unwrap().0, 3 << 29);
        assert!(ByteSize::parse("5 parsecs").unwrap_err().contains("GiB"));
        assert_eq!(ByteSize(20 << 30).to_string(), "20.00GiB");
    }

    #[test]
    fn every_problem_at_once() {
        let e = parse(
            "kind: gpu_memory\nduration: 10s\ntarget: {gpus: [banana]}\nfill: {percent: 120}\nramp: 20s\n",
        )
        .unwrap_err();
        for want in [
            "target.gpus[0]",
            "fill.percent: 120",
            "ramp: 20s is not shorter",
        ] {
            assert!(e.contains(want), "missing {want:?} in {e}");
        }
        assert!(
            parse("kind: gpu_memory\nduration: 10s\ntarget: {gpus: []}\nfill: {bytes: 0}\n")
                .unwrap_err()
                .contains("fill.bytes: must be above zero")
        );
        assert!(
            parse("kind: gpu_memory\nduration: 10s\ntarget: {gpus: [0]}\nfill: {gallons: 3}\n")
                .unwrap_err()
                .contains("gallons")
        );
    }
}

//! The `network` kind: latency, jitter, loss, a bandwidth limit or a partition, scoped
//! to peers, ports and a protocol, in the node's own network namespace or in the
//! namespace of a target process (a worker's pod).

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{FieldError, HumanDuration, KindSpec, ProcessTarget, validate_duration};

/// The `network` kind.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    pub duration: HumanDuration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Where: omit for the node's own network namespace, or `{netns_of: {name: ...}}`
    /// for the namespace of the matching processes (each distinct namespace once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<NetworkTarget>,
    /// One interface (`eth0`); default every interface but loopback and the
    /// policy's protected interfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// Peer networks (`10.0.0.0/24`, `10.0.0.7`, IPv6 too); default every peer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
    /// Traffic with one of these ports at either end (a service port); default every port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u32>,
    /// tcp, udp, icmp or all (default all; all when `ports` are given means tcp and udp).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// ingress, egress or both (default both).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
    /// Cut the traffic: `drop` (silently) or `reject` (TCP reset, ICMP unreachable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<PartitionMode>,
    /// Added delay per packet (per direction the fault covers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<HumanDuration>,
    /// Random variation of the delay (±), with `latency`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<HumanDuration>,
    /// How much each delay depends on the previous one (0-100%), with `jitter`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation: Option<Percent>,
    /// Packets dropped at random: `30%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<Percent>,
    /// A bandwidth limit: `10mbit`, `512kbit`, `1gbit`, `2mbps` (bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
    /// How to delay and shape: auto (netem where the kernel has it, else the
    /// userspace proxy), netem, or proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<Backend>,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkTarget {
    /// The processes whose network namespace the fault is applied in.
    pub netns_of: ProcessTarget,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
    All,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
    Both,
}

impl Direction {
    pub fn egress(self) -> bool {
        matches!(self, Direction::Egress | Direction::Both)
    }
    pub fn ingress(self) -> bool {
        matches!(self, Direction::Ingress | Direction::Both)
    }
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartitionMode {
    Drop,
    Reject,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Auto,
    Netem,
    Proxy,
}

/// A percentage, written `30%` or `30` (also `0.5%`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percent(pub f64);

impl Percent {
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let num = t.strip_suffix('%').unwrap_or(t).trim();
        num.parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .map(Percent)
            .ok_or_else(|| format!("invalid percentage {text:?}: write it like 30% or 0.5%"))
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0)
    }
}

impl Serialize for Percent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Percent;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a percentage such as \"30%\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Percent, E> {
                Percent::parse(v).map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Percent, E> {
                Ok(Percent(v as f64))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Percent, E> {
                Ok(Percent(v as f64))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Percent, E> {
                Ok(Percent(v))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(feature = "schema")]
impl schemars::JsonSchema for Percent {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Percent".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A percentage: \"30%\" or 30",
            "type": ["string", "number"]
        })
    }
}

/// A bandwidth in bits per second, written the tc way: `10mbit`, `512kbit`, `2mbps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub bits_per_sec: u64,
}

impl Rate {
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim().to_ascii_lowercase();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let bad = || {
            format!(
                "invalid rate {text:?}: write a number and a unit: bit, kbit, mbit, gbit (bits per second) or bps, kbps, mbps, gbps (bytes per second), e.g. 10mbit"
            )
        };
        let n: f64 = num.parse().map_err(|_| bad())?;
        let mult: f64 = match unit.trim() {
            "bit" => 1.0,
            "kbit" => 1e3,
            "mbit" => 1e6,
            "gbit" => 1e9,
            "bps" => 8.0,
            "kbps" => 8e3,
            "mbps" => 8e6,
            "gbps" => 8e9,
            _ => return Err(bad()),
        };
        Ok(Rate {
            bits_per_sec: (n * mult).round() as u64,
        })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.bits_per_sec;
        if b >= 1_000_000_000 && b.is_multiple_of(1_000_000_000) {
            write!(f, "{}gbit", b / 1_000_000_000)
        } else if b >= 1_000_000 && b.is_multiple_of(1_000_000) {
            write!(f, "{}mbit", b / 1_000_000)
        } else if b >= 1000 && b.is_multiple_of(1000) {
            write!(f, "{}kbit", b / 1000)
        } else {
            write!(f, "{b}bit")
        }
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Rate::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(feature = "schema")]
impl schemars::JsonSchema for Rate {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Rate".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A bandwidth: 10mbit, 512kbit, 1gbit, or bytes per second: 2mbps",
            "pattern": "^\\s*[0-9]+(\\.[0-9]+)?\\s*([kmg]?bit|[kmg]?bps)\\s*$"
        })
    }
}

/// A peer network: an address or a CIDR, IPv4 or IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (a, p) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = a.trim().parse().map_err(|_| {
            format!("{text:?} is not an IP address or CIDR: write it like 10.0.0.0/24, 10.0.0.7 or fd00::/64")
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| {
                    format!("{text:?}: the prefix length must be a number from 0 to {max}")
                })?,
        };
        Ok(Cidr { addr, prefix })
    }

    pub fn is_v4(&self) -> bool {
        self.addr.is_ipv4()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The finest loss the agent can apply (nftables draws from 0..10000).
pub const MIN_LOSS_PERCENT: f64 = 0.01;

/// Longest delay a spec may ask for: longer is a partition, and should say so.
pub const MAX_LATENCY_SECS: u64 = 60;

/// Linux interface names: 1-15 bytes, no `/`, whitespace or `:`.
pub fn valid_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':' && b != b'"' && b != b'\\')
}

impl NetworkSpec {
    pub fn direction(&self) -> Direction {
        self.direction.unwrap_or(Direction::Both)
    }

    pub fn backend(&self) -> Backend {
        self.backend.unwrap_or(Backend::Auto)
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol.unwrap_or(Protocol::All)
    }

    /// The parsed peers (call after `validate`).
    pub fn cidrs(&self) -> Vec<Cidr> {
        self.peers
            .iter()
            .filter_map(|p| Cidr::parse(p).ok())
            .collect()
    }

    /// Does the fault delay or shape traffic (as opposed to cutting or dropping it)?
    pub fn shapes(&self) -> bool {
        self.latency.is_some() || self.rate.is_some()
    }

    /// `partition drop`, `latency 200ms ±20ms loss 30%`: what the fault does.
    pub fn effect(&self) -> String {
        let mut parts = Vec::new();
        if let Some(p) = self.partition {
            parts.push(match p {
                PartitionMode::Drop => "partition (drop)".to_string(),
                PartitionMode::Reject => "partition (reject)".to_string(),
            });
        }
        if let Some(l) = self.latency {
            let mut s = format!("latency {l}");
            if let Some(j) = self.jitter {
                s.push_str(&format!(" ±{j}"));
            }
            parts.push(s);
        }
        if let Some(l) = self.loss {
            parts.push(format!("loss {l}"));
        }
        if let Some(r) = self.rate {
            parts.push(format!("rate {r}"));
        }
        parts.join(", ")
    }
}

impl KindSpec for NetworkSpec {
    fn duration(&self) -> std::time::Duration {
        self.duration.0
    }

    fn seed(&self) -> Option<u64> {
        self.seed
    }

    fn summary(&self) -> String {
        let mut parts = vec![format!("network {}", self.effect())];
        if let Some(t) = &self.target {
            parts.push(format!("in the netns of {}", t.netns_of.describe()));
        }
        if let Some(i) = &self.interface {
            parts.push(format!("dev {i}"));
        }
        if !self.peers.is_empty() {
            parts.push(format!("peers={}", self.peers.join(",")));
        }
        if !self.ports.is_empty() {
            let p: Vec<String> = self.ports.iter().map(|p| p.to_string()).collect();
            parts.push(format!("ports={}", p.join(",")));
        }
        if let Some(d) = self.direction {
            parts.push(format!("{d:?}").to_lowercase());
        }
        parts.join(" ")
    }

    fn validate(&self, errs: &mut Vec<FieldError>) {
        validate_duration(self.duration, errs);
        let effects = [
            self.partition.is_some(),
            self.latency.is_some(),
            self.loss.is_some(),
            self.rate.is_some(),
        ];
        if !effects.iter().any(|e| *e) {
            errs.push(FieldError::new(
                "",
                "no effect: give partition (drop or reject), or latency, loss or rate",
            ));
        }
        if self.partition.is_some() && effects[1..].iter().any(|e| *e) {
            errs.push(FieldError::new(
                "partition",
                "a partition cuts the traffic: it cannot be combined with latency, loss or rate (use two faults)",
            ));
        }
        if let Some(l) = self.latency
            && (l.0.is_zero() || l.0.as_secs() > MAX_LATENCY_SECS)
        {
            errs.push(FieldError::new(
                "latency",
                format!(
                    "{l} is out of range: use a delay above zero and at most {MAX_LATENCY_SECS}s (a longer delay is a partition)"
                ),
            ));
        }
        if let Some(j) = self.jitter {
            match self.latency {
                None => errs.push(FieldError::new(
                    "jitter",
                    "only applies with latency: add latency or remove jitter",
                )),
                Some(l) if j.0 > l.0 => errs.push(FieldError::new(
                    "jitter",
                    format!(
                        "{j} is larger than the latency {l}: delays cannot go below zero; use a jitter of at most {l}"
                    ),
                )),
                _ => {}
            }
        }
        if let Some(c) = self.correlation {
            if self.jitter.is_none() {
                errs.push(FieldError::new(
                    "correlation",
                    "only applies with jitter: add jitter or remove correlation",
                ));
            }
            // At 100% every delay equals the first one: the jitter would vanish.
            if !(0.0..100.0).contains(&c.0) {
                errs.push(FieldError::new(
                    "correlation",
                    format!("{c} is out of range: use 0% up to (not including) 100%"),
                ));
            }
        }
        if let Some(l) = self.loss
            && !(l.0 >= MIN_LOSS_PERCENT && l.0 <= 100.0)
        {
            errs.push(FieldError::new(
                "loss",
                format!("{l} is out of range: use a percentage from {MIN_LOSS_PERCENT}% to 100% (100% is a partition: say partition: drop)"),
            ));
        }
        if let Some(r) = self.rate
            && r.bits_per_sec < 8000
        {
            errs.push(FieldError::new(
                "rate",
                format!("{r} is too low: the smallest limit is 8kbit"),
            ));
        }
        for (i, p) in self.peers.iter().enumerate() {
            if let Err(e) = Cidr::parse(p) {
                errs.push(FieldError::new(format!("peers[{i}]"), e));
            }
        }
        for (i, p) in self.ports.iter().enumerate() {
            if *p == 0 || *p > 65535 {
                errs.push(FieldError::new(
                    format!("ports[{i}]"),
                    format!("port {p} is out of range: ports are 1 to 65535"),
                ));
            }
        }
        if !self.ports.is_empty() && self.protocol == Some(Protocol::Icmp) {
            errs.push(FieldError::new(
                "ports",
                "ICMP has no ports: remove ports or use protocol tcp or udp",
            ));
        }
        if let Some(i) = &self.interface
            && !valid_interface_name(i)
        {
            errs.push(FieldError::new(
                "interface",
                format!("{i:?} is not an interface name: 1 to 15 characters, no spaces, / or :"),
            ));
        }
        if self.backend.is_some() && !self.shapes() {
            errs.push(FieldError::new(
                "backend",
                "only applies to latency and rate (partitions and loss always use nftables): remove it",
            ));
        }
        if self.backend == Some(Backend::Proxy)
            && matches!(self.protocol, Some(Protocol::Udp) | Some(Protocol::Icmp))
        {
            errs.push(FieldError::new(
                "backend",
                "the proxy backend only delays TCP streams: use backend netem for udp or icmp",
            ));
        }
        if let Some(t) = &self.target {
            t.netns_of.validate_selector("target.netns_of", errs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::FaultSpec;
    use super::*;

    fn parse(yaml: &str) -> Result<NetworkSpec, String> {
        super::super::parse_for_test(yaml).map(|s| match s {
            FaultSpec::Network(n) => n,
            other => panic!("another kind: {other:?}"),
        })
    }

    #[test]
    fn parses_the_design_example() {
        let n = parse(
            "kind: network\nduration: 1m\ntarget: {netns_of: {name: \"^vllm\"}}\npeers: [\"10.0.0.0/24\"]\nports: [8000]\nprotocol: tcp\ndirection: both\nlatency: 200ms\njitter: 20ms\ncorrelation: 25%\nloss: 30%\nrate: 10mbit\nbackend: auto\n",
        )
        .unwrap();
        assert_eq!(n.cidrs()[0].to_string(), "10.0.0.0/24");
        assert_eq!(n.loss, Some(Percent(30.0)));
        assert_eq!(n.rate.unwrap().bits_per_sec, 10_000_000);
        assert_eq!(n.effect(), "latency 200ms ±20ms, loss 30%, rate 10mbit");
        let spec = FaultSpec::Network(n.clone());
        assert_eq!(FaultSpec::from_json(&spec.to_json()).unwrap(), spec);
    }

    #[test]
    fn units() {
        assert_eq!(Rate::parse("512kbit").unwrap().bits_per_sec, 512_000);
        assert_eq!(Rate::parse("2mbps").unwrap().bits_per_sec, 16_000_000);
        assert_eq!(Rate::parse("1.5gbit").unwrap().to_string(), "1500mbit");
        assert!(Rate::parse("10 parsecs").unwrap_err().contains("kbit"));
        assert_eq!(Percent::parse("0.5%").unwrap(), Percent(0.5));
        assert_eq!(Cidr::parse("10.0.0.7").unwrap().prefix, 32);
        assert_eq!(Cidr::parse("fd00::/64").unwrap().prefix, 64);
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("10.0.0.300/24").is_err());
    }

    #[test]
    fn every_problem_at_once() {
        let e = parse(
            "kind: network\nduration: 10s\npeers: [\"10.0.0.0/33\", banana]\nports: [0, 70000, 80]\ninterface: \"eth 0\"\npartition: drop\nlatency: 10ms\n",
        )
        .unwrap_err();
        for want in [
            "peers[0]",
            "peers[1]",
            "ports[0]: port 0 is out of range",
            "ports[1]: port 70000",
            "interface",
            "partition: a partition cuts",
        ] {
            assert!(e.contains(want), "missing {want:?} in {e}");
        }
        assert!(!e.contains("ports[2]"), "{e}");
    }

    #[test]
    fn effects_and_their_options() {
        assert!(
            parse("kind: network\nduration: 10s\n")
                .unwrap_err()
                .contains("no effect")
        );
        assert!(
            parse("kind: network\nduration: 10s\nloss: 0%\n")
                .unwrap_err()
                .contains("loss: 0% is out of range: use a percentage from 0.01% to 100%")
        );
        assert!(
            parse("kind: network\nduration: 10s\nlatency: 10ms\njitter: 20ms\n")
                .unwrap_err()
                .contains("larger than the latency")
        );
        assert!(
            parse("kind: network\nduration: 10s\npartition: drop\nbackend: proxy\n")
                .unwrap_err()
                .contains("backend: only applies")
        );
        assert!(
            parse("kind: network\nduration: 10s\nlatency: 5ms\nprotocol: udp\nbackend: proxy\n")
                .unwrap_err()
                .contains("only delays TCP")
        );
        assert!(
            parse("kind: network\nduration: 10s\npartition: sideways\n")
                .unwrap_err()
                .contains("sideways")
        );
        assert!(
            parse("kind: network\nduration: 10s\nloss: 5%\ntarget: {netns_of: {}}\n")
                .unwrap_err()
                .contains("target.netns_of: no selector")
        );
    }
}

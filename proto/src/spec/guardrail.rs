//! The `guardrail` kind: corrupt a safety filter's answers, the way real ones fail
//! (a parser that reads only the first word, a timeout taken as "not blocked").

use serde::{Deserialize, Serialize};

use super::{FieldError, HumanDuration, KindSpec, validate_duration};

/// The `guardrail` kind.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardrailSpec {
    pub duration: HumanDuration,
    /// Seeds the draws of every probability (the same seed, the same sequence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Explicit mode: the proxy's address (the inference service points at it). A
    /// proxy the agent already runs there (`--guardrail-proxy`) is used; otherwise one
    /// is started for the fault's duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Transparent mode: the guardrail's own address (IP:PORT). Connections to it from
    /// the agent's network namespace, or routed through it, are redirected (nftables)
    /// into the proxy, which forwards them to that same address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intercept: Option<String>,
    /// Where the guardrail service answers, for explicit mode: `http://host:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// Where the verdict lives in the answers.
    pub preset: Preset,
    /// For `preset: json-pointer`: where the verdict is and what it looks like.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_pointer: Option<JsonPointerPreset>,
    /// What to do to the answers, each with a probability (0 to 1); combinable.
    pub corrupt: Corruptions,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// OpenAI moderation: `results[].flagged`, `categories`, `category_scores`.
    OpenaiModeration,
    /// Llama Guard text: `safe`, or `unsafe` then a line of codes (`S1,S3`).
    LlamaGuard,
    /// NeMo Guardrails: `{"status": "success"|"blocked", "rails_status": {...}}`.
    Nemo,
    /// Azure Content Safety: `categoriesAnalysis[].severity`.
    AzureContentSafety,
    /// Any JSON service: the verdict at a JSON pointer.
    JsonPointer,
}

impl Preset {
    pub fn name(self) -> &'static str {
        match self {
            Preset::OpenaiModeration => "openai-moderation",
            Preset::LlamaGuard => "llama-guard",
            Preset::Nemo => "nemo",
            Preset::AzureContentSafety => "azure-content-safety",
            Preset::JsonPointer => "json-pointer",
        }
    }
}

/// A custom service's verdict: the JSON pointer and the values meaning unsafe / safe.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonPointerPreset {
    /// RFC 6901: `/verdict`, `/results/0/blocked`.
    pub pointer: String,
    /// The value that means "blocked" (`true`, `"unsafe"`, `1`).
    pub unsafe_value: serde_json::Value,
    /// The value that means "allowed".
    pub safe_value: serde_json::Value,
}

/// A corruption with its probability and a parameter.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusCorruption {
    pub code: u16,
    #[serde(default = "one")]
    pub probability: f64,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelayCorruption {
    pub by: HumanDuration,
    #[serde(default = "one")]
    pub probability: f64,
}

#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamCorruption {
    /// Chunks passed untouched before the cut or the damage.
    pub after: u32,
    #[serde(default = "one")]
    pub probability: f64,
}

fn one() -> f64 {
    1.0
}

/// What to do to the answers. Each field is a probability per answer (0 to 1), or a
/// parameter with one. They combine: a delay, then at most one of the answers that
/// replace the upstream's (stall, reset, status, empty), then the verdict edits
/// (flip, force, scores, categories), then damage to the body (malformed, truncated).
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Corruptions {
    /// Unsafe becomes safe and safe becomes unsafe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flip_verdict: Option<f64>,
    /// Every verdict says safe (the fail-open bug).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force_allow: Option<f64>,
    /// Every verdict says unsafe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force_block: Option<f64>,
    /// Scores moved across the 0.5 threshold (x → 1 − x), the flag left as it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shift_scores: Option<f64>,
    /// The categories removed (the verdict left as it was).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_categories: Option<f64>,
    /// The body no longer parses as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub malformed_json: Option<f64>,
    /// The body cut in half (its length header matching the cut).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate: Option<f64>,
    /// 200 with an empty body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_200: Option<f64>,
    /// An error status instead of the answer: `{code: 503, probability: 0.5}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusCorruption>,
    /// The answer delayed: `{by: 2s, probability: 1}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<DelayCorruption>,
    /// No answer at all until the client gives up (or the fault ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stall: Option<f64>,
    /// The connection reset instead of an answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset: Option<f64>,
    /// Streamed answers (SSE, chunked): the stream ends after N chunks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_cut: Option<StreamCorruption>,
    /// Streamed answers: chunks after the first N are garbled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_corrupt: Option<StreamCorruption>,
}

impl Corruptions {
    /// Every corruption with its probability, by name (for counting and checks).
    pub fn probabilities(&self) -> Vec<(&'static str, f64)> {
        let mut v: Vec<(&'static str, f64)> = Vec::new();
        let mut add = |name, p: Option<f64>| {
            if let Some(p) = p {
                v.push((name, p));
            }
        };
        add("flip_verdict", self.flip_verdict);
        add("force_allow", self.force_allow);
        add("force_block", self.force_block);
        add("shift_scores", self.shift_scores);
        add("drop_categories", self.drop_categories);
        add("malformed_json", self.malformed_json);
        add("truncate", self.truncate);
        add("empty_200", self.empty_200);
        add("status", self.status.map(|s| s.probability));
        add("delay", self.delay.map(|s| s.probability));
        add("stall", self.stall);
        add("reset", self.reset);
        add("stream_cut", self.stream_cut.map(|s| s.probability));
        add("stream_corrupt", self.stream_corrupt.map(|s| s.probability));
        v
    }
}

impl GuardrailSpec {
    /// `flip_verdict 100%, delay 2s 50%`: what the fault does.
    pub fn effect(&self) -> String {
        let parts: Vec<String> = self
            .corrupt
            .probabilities()
            .into_iter()
            .map(|(n, p)| format!("{n} {}%", (p * 1000.0).round() / 10.0))
            .collect();
        format!("{} ({})", parts.join(", "), self.preset.name())
    }
}

impl KindSpec for GuardrailSpec {
    fn duration(&self) -> std::time::Duration {
        self.duration.0
    }

    fn seed(&self) -> Option<u64> {
        self.seed
    }

    fn summary(&self) -> String {
        format!(
            "guardrail {} at {}",
            self.effect(),
            self.listen.as_deref().unwrap_or("?")
        )
    }

    fn validate(&self, errs: &mut Vec<FieldError>) {
        validate_duration(self.duration, errs);
        match (&self.listen, &self.intercept) {
            (None, None) => errs.push(FieldError::new(
                "listen",
                "missing: give listen (the proxy's address, e.g. 127.0.0.1:9001, for the inference service to point at) or intercept (the guardrail's own IP:PORT, redirected transparently)",
            )),
            (Some(_), Some(_)) => errs.push(FieldError::new(
                "intercept",
                "listen and intercept are two modes: give one",
            )),
            _ => {}
        }
        for (field, v) in [("listen", &self.listen), ("intercept", &self.intercept)] {
            if let Some(l) = v
                && l.parse::<std::net::SocketAddr>().is_err()
            {
                errs.push(FieldError::new(
                    field,
                    format!("{l:?} is not an address: write it as IP:PORT, e.g. 10.0.0.7:8080"),
                ));
            }
        }
        if self.intercept.is_some() && self.upstream.is_some() {
            errs.push(FieldError::new(
                "upstream",
                "not with intercept: the intercepted address is the upstream; remove it",
            ));
        }
        if let Some(u) = &self.upstream {
            match u.strip_prefix("http://") {
                Some(rest) if !rest.is_empty() && !rest.starts_with('/') => {}
                _ if u.starts_with("https://") => errs.push(FieldError::new(
                    "upstream",
                    format!("{u:?}: the proxy cannot read answers through TLS; give the guardrail's plain http:// address (inside the cluster)"),
                )),
                _ => errs.push(FieldError::new(
                    "upstream",
                    format!("{u:?} is not an http:// URL: write it like http://127.0.0.1:9000"),
                )),
            }
        }
        match (&self.preset, &self.json_pointer) {
            (Preset::JsonPointer, None) => errs.push(FieldError::new(
                "json_pointer",
                "preset json-pointer needs json_pointer: {pointer: /verdict, unsafe_value: \"unsafe\", safe_value: \"safe\"}",
            )),
            (Preset::JsonPointer, Some(j)) if !j.pointer.starts_with('/') => errs.push(
                FieldError::new(
                    "json_pointer.pointer",
                    format!("{:?} is not a JSON pointer: it starts with /, e.g. /results/0/flagged", j.pointer),
                ),
            ),
            (Preset::JsonPointer, Some(j)) if j.unsafe_value == j.safe_value => {
                errs.push(FieldError::new(
                    "json_pointer",
                    "unsafe_value and safe_value are the same: a verdict could not be told apart",
                ))
            }
            (p, Some(_)) if *p != Preset::JsonPointer => errs.push(FieldError::new(
                "json_pointer",
                format!("only applies to preset json-pointer, not {}: remove it", p.name()),
            )),
            _ => {}
        }
        let all = self.corrupt.probabilities();
        if all.is_empty() {
            errs.push(FieldError::new(
                "corrupt",
                "no corruption: give at least one, e.g. {flip_verdict: 1.0}",
            ));
        }
        for (name, p) in &all {
            if !(0.0..=1.0).contains(p) || p.is_nan() {
                errs.push(FieldError::new(
                    format!("corrupt.{name}"),
                    format!("probability {p} is out of range: use 0 to 1 (0.3 is 30% of answers)"),
                ));
            }
        }
        if self.corrupt.force_allow.is_some() && self.corrupt.force_block.is_some() {
            errs.push(FieldError::new(
                "corrupt",
                "force_allow and force_block contradict each other: use two faults",
            ));
        }
        if let Some(s) = self.corrupt.status
            && !(200..=599).contains(&s.code)
        {
            errs.push(FieldError::new(
                "corrupt.status.code",
                format!(
                    "{} cannot replace an answer: use a final status, 200 to 599, e.g. 503",
                    s.code
                ),
            ));
        }
        for (field, v) in [("listen", &self.listen), ("intercept", &self.intercept)] {
            if let Some(a) = v
                .as_deref()
                .and_then(|l| l.parse::<std::net::SocketAddr>().ok())
                && a.port() == 0
            {
                errs.push(FieldError::new(
                    field,
                    "port 0 is not an address clients can use: give the port",
                ));
            }
        }
        if let (Some(l), Some(u)) = (&self.listen, &self.upstream)
            && u.trim_start_matches("http://").trim_end_matches('/') == l
        {
            errs.push(FieldError::new(
                "upstream",
                "is the proxy's own address: the proxy would forward to itself",
            ));
        }
        if let Some(u) = &self.upstream
            && let Some(rest) = u.strip_prefix("http://")
            && rest.trim_end_matches('/').contains('/')
        {
            errs.push(FieldError::new(
                "upstream",
                format!(
                    "{u:?}: the proxy forwards each request's own path; give only http://host:port"
                ),
            ));
        }
        // Edits the preset's answers have nothing for: refused now, not found out later.
        let none_for = |preset: Preset| -> &'static [&'static str] {
            match preset {
                Preset::LlamaGuard | Preset::Nemo => &["shift_scores"],
                Preset::JsonPointer => &["shift_scores", "drop_categories"],
                _ => &[],
            }
        };
        for (name, _) in &all {
            if none_for(self.preset).contains(name) {
                errs.push(FieldError::new(
                    format!("corrupt.{name}"),
                    format!(
                        "{} answers have nothing for {name} to change: remove it",
                        self.preset.name()
                    ),
                ));
            }
        }
        if let Some(d) = self.corrupt.delay
            && d.by.0.is_zero()
        {
            errs.push(FieldError::new(
                "corrupt.delay.by",
                "must be above zero, e.g. 2s",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::FaultSpec;
    use super::*;

    fn parse(yaml: &str) -> Result<GuardrailSpec, String> {
        super::super::parse_for_test(yaml).map(|s| match s {
            FaultSpec::Guardrail(g) => g,
            other => panic!("another kind: {other:?}"),
        })
    }

    #[test]
    fn parses_the_design_example() {
        let g = parse(
            "kind: guardrail\nduration: 1m\nlisten: 127.0.0.1:9001\nupstream: http://127.0.0.1:9000\npreset: openai-moderation\ncorrupt: {flip_verdict: 1.0, delay: {by: 2s, probability: 0.5}}\n",
        )
        .unwrap();
        assert_eq!(g.preset, Preset::OpenaiModeration);
        assert_eq!(
            g.effect(),
            "flip_verdict 100%, delay 50% (openai-moderation)"
        );
        let spec = FaultSpec::Guardrail(g);
        assert_eq!(FaultSpec::from_json(&spec.to_json()).unwrap(), spec);
    }

    #[test]
    fn every_problem_at_once() {
        let e = parse(
            "kind: guardrail\nduration: 1m\nlisten: nowhere\nupstream: https://g:443\npreset: json-pointer\ncorrupt: {flip_verdict: 1.5, force_allow: 1, force_block: 1, status: {code: 999}}\n",
        )
        .unwrap_err();
        for want in [
            "listen: \"nowhere\" is not an address",
            "upstream: \"https://g:443\": the proxy cannot read answers through TLS",
            "json_pointer: preset json-pointer needs",
            "corrupt.flip_verdict: probability 1.5 is out of range",
            "force_allow and force_block contradict",
            "corrupt.status.code: 999 cannot replace",
        ] {
            assert!(e.contains(want), "missing {want:?} in {e}");
        }
        assert!(
            parse("kind: guardrail\nduration: 1m\nlisten: 127.0.0.1:1\npreset: sideways\ncorrupt: {reset: 1}\n")
                .unwrap_err()
                .contains("sideways")
        );
        assert!(
            parse(
                "kind: guardrail\nduration: 1m\nlisten: 127.0.0.1:1\npreset: nemo\ncorrupt: {}\n"
            )
            .unwrap_err()
            .contains("no corruption")
        );
    }
}

//! `probes`: names, schedules and each kind's settings; and the names the other
//! sections refer to probes by ([`ProbeNames`]).

use std::collections::{BTreeSet, HashMap};

use super::{Cx, FieldPath, check_prom, check_regex, check_url, suggest, valid_name};
use crate::experiment::{
    Experiment, HttpProbe, PROBE_KINDS, Probe, ProbeKind, ProbeRole, ValidProbe,
};

/// The kind a probe sets, when it sets exactly one; otherwise the names of the kinds
/// it sets (none, or several), in the order of [`PROBE_KINDS`].
pub fn probe_kind(p: &Probe) -> Result<ProbeKind, Vec<&'static str>> {
    let mut set: Vec<ProbeKind> = [
        p.http.clone().map(ProbeKind::Http),
        p.tcp.clone().map(ProbeKind::Tcp),
        p.command.clone().map(ProbeKind::Command),
        p.prometheus.clone().map(ProbeKind::Prometheus),
        p.openai.clone().map(ProbeKind::OpenAi),
        p.guardrail.clone().map(ProbeKind::Guardrail),
    ]
    .into_iter()
    .flatten()
    .collect();
    if set.len() == 1 {
        Ok(set.remove(0))
    } else {
        Err(set.iter().map(ProbeKind::name).collect())
    }
}

/// The probes other sections may refer to, by name, and where each is.
pub(super) struct ProbeNames {
    /// Valid, distinct names.
    defined: BTreeSet<String>,
    /// Elements of any list section that failed to type: not reported again.
    broken: BTreeSet<String>,
    index: HashMap<String, usize>,
}

impl ProbeNames {
    /// The index of the probe named `name`, or a located error (none for a name
    /// whose probe failed to type: that one is reported already).
    pub(super) fn resolve(&self, cx: &mut Cx, path: FieldPath, name: &str) -> Option<usize> {
        if self.defined.contains(name) {
            return self.index.get(name).copied();
        }
        if self.broken.contains(name) {
            return None;
        }
        let known: Vec<&str> = self
            .defined
            .iter()
            .chain(self.broken.iter())
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
        None
    }

    /// Whether an element of some list section named `name` failed to type.
    pub(super) fn is_broken(&self, name: &str) -> bool {
        self.broken.contains(name)
    }
}

/// Checks every probe; returns those whose kind is clear, and the names.
pub(super) fn check(e: &Experiment, cx: &mut Cx) -> (Vec<ValidProbe>, ProbeNames) {
    let mut defined = BTreeSet::new();
    let mut index = HashMap::new();
    let mut valid = Vec::new();
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
        } else if !defined.insert(p.name.clone()) {
            cx.error(
                &at.key("name"),
                format!("probe {:?} is defined twice", p.name),
            );
        } else {
            index.insert(p.name.clone(), i);
        }
        let kind = probe_kind(p);
        if let Err(set) = &kind {
            let how = if set.is_empty() {
                "no kind"
            } else {
                "several kinds"
            };
            cx.error(
                &at,
                format!(
                    "probe {:?} has {how}: give exactly one of {}",
                    p.name,
                    PROBE_KINDS.join(", ")
                ),
            );
        }
        if p.interval() < std::time::Duration::from_millis(10) {
            cx.error(
                &at.key("interval"),
                "must be at least 10ms (a probe that fast measures itself, not the service)",
            );
        }
        if p.timeout().is_zero() {
            cx.error(&at.key("timeout"), "must be above zero");
        }
        // Each kind that is set is checked, even beside another (every error at once).
        if let Some(h) = &p.http {
            check_http(cx, &at.key("http"), p, h);
        }
        check_other_kinds(cx, &at, p);
        if let Ok(kind) = kind {
            let role = p.role.or(match kind {
                ProbeKind::OpenAi(_) => Some(ProbeRole::Generation),
                _ => None,
            });
            valid.push(ValidProbe {
                name: p.name.clone(),
                interval: p.interval(),
                timeout: p.timeout(),
                role,
                kind,
            });
        }
    }
    let names = ProbeNames {
        defined,
        broken: cx.broken_names.clone(),
        index,
    };
    (valid, names)
}

fn check_http(cx: &mut Cx, hp: &FieldPath, p: &Probe, h: &HttpProbe) {
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
    let expect = hp.key("expect");
    if let Some(j) = &h.expect.json
        && let Err(errors) = crate::experiment::checks::compile_json(j, &expect.key("json"))
    {
        for (path, message) in errors {
            cx.error(&path, message);
        }
    }
    if let Err(errors) = crate::experiment::checks::compile_headers(
        &h.expect.headers,
        &h.expect.header_absent,
        &expect,
    ) {
        for (path, message) in errors {
            cx.error(&path, message);
        }
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

fn check_other_kinds(cx: &mut Cx, at: &FieldPath, p: &Probe) {
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

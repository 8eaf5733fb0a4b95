//! The run-wide sections: `agents` or `fleet` (the fleet file is read here, so that
//! selections can be checked against real agent names), `tls`, `lease`, `trials`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::{Cx, FieldPath};
use crate::experiment::Experiment;
use crate::fleet::{AgentRef, FleetFile, TlsClient, parse_address};

/// The agents the experiment names itself (its `agents`, or its fleet file's) and
/// the TLS to reach them with, paths made relative to the files that give them.
pub(super) fn agents_and_tls(
    e: &Experiment,
    base: &Path,
    cx: &mut Cx,
) -> (Vec<AgentRef>, Option<TlsClient>) {
    let mut agents = e.agents.clone();
    let mut tls = e.tls.clone().map(|t| relative_tls(base, t));
    if let Some(f) = &e.fleet {
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
    (agents, tls)
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

pub(super) fn check(e: &Experiment, cx: &mut Cx) {
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
    if let Some(o) = e.observe
        && o.0 > std::time::Duration::from_secs(24 * 3600)
    {
        cx.error(
            &root.key("observe"),
            format!("{o} is longer than a day: observe for at most 24h"),
        );
    }
}

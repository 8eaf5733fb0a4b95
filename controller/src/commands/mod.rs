//! One module per subcommand. Each returns the exit code it ends with; errors that
//! stop a command early are [`CliError`](crate::exit::CliError)s with their own code.

pub mod certs;
pub mod completions;
pub mod demo;
pub mod history;
pub mod inject;
pub mod new;
pub mod report;
pub mod revert;
pub mod run;
pub mod serve;
pub mod status;
pub mod validate;

use gpuchaos_proto::pb;
use serde_json::json;

use crate::output::human_ns;

/// A fault as JSON, the shape `--output json` prints everywhere.
pub fn fault_json(agent: &str, f: &pb::Fault) -> serde_json::Value {
    let details: serde_json::Value =
        serde_json::from_str(&f.details_json).unwrap_or(serde_json::Value::Null);
    json!({
        "agent": agent,
        "id": f.id,
        "kind": f.kind,
        "state": gpuchaos_proto::state_name(f.state()),
        "target": f.target,
        "duration_ms": f.duration_ms,
        "session": f.session_id,
        "error": f.error,
        "leftover": f.leftover,
        "end_reason": f.end_reason,
        "details": details,
        "created_unix_ms": f.created_unix_ms,
        "verified_unix_ms": f.verified_unix_ms,
        "ended_unix_ms": f.ended_unix_ms,
        "inject_ms": if f.verified_mono_ns > 0 { (f.verified_mono_ns.saturating_sub(f.created_mono_ns)) as f64 / 1e6 } else { 0.0 },
    })
}

/// One line for a fault, for humans.
pub fn fault_line(f: &pb::Fault, now_mono_ns: u64) -> String {
    let state = gpuchaos_proto::state_name(f.state());
    let mut line = format!("{}  {:<8} {:<9} {}", f.id, f.kind, state, f.target);
    if f.state() == pb::FaultState::Active && f.expires_mono_ns > now_mono_ns {
        line.push_str(&format!(
            "  (ends in {})",
            human_ns(f.expires_mono_ns - now_mono_ns)
        ));
    }
    if !f.end_reason.is_empty() && f.state() != pb::FaultState::Active {
        line.push_str(&format!("  [{}]", f.end_reason));
    }
    if !f.error.is_empty() {
        line.push_str(&format!("\n      error: {}", f.error));
    }
    if !f.leftover.is_empty() {
        line.push_str(&format!("\n      LEFT BEHIND: {}", f.leftover));
    }
    line
}

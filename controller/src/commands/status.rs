//! `gpuchaos status`: inventory, capabilities and faults of each agent.

use gpuchaos_proto::pb;
use serde_json::json;

use crate::exit::{self, CliError};
use crate::fleet::{Fleet, describe_status};
use crate::output::{Output, human_bytes};

use super::{fault_json, fault_line};

pub async fn run(fleet: &Fleet, output: Output, include_finished: bool) -> Result<u8, CliError> {
    let mut code = exit::OK;
    let lookups = fleet.agents.iter().map(|a| async move {
        let mut c = fleet.client(a)?;
        let info = c.get_info(pb::GetInfoRequest {}).await;
        let faults = c
            .list_faults(pb::ListFaultsRequest { include_finished })
            .await;
        Ok::<_, CliError>((a, info, faults))
    });
    for r in futures_util::future::join_all(lookups).await {
        let (agent, info, faults) = r?;
        let (info, faults) = match (info, faults) {
            (Ok(i), Ok(f)) => (i.into_inner(), f.into_inner().faults),
            (Err(e), _) | (_, Err(e)) => {
                code = exit::UNAVAILABLE;
                let msg = describe_status(agent, &e);
                match output {
                    Output::Json => println!(
                        "{}",
                        json!({"agent": agent.address, "name": agent.name, "reachable": false, "error": msg})
                    ),
                    Output::Text => println!("{msg}\n"),
                }
                continue;
            }
        };
        match output {
            Output::Json => {
                let caps: serde_json::Map<String, serde_json::Value> = info
                    .capabilities
                    .iter()
                    .map(|c| (c.kind.clone(), json!({"supported": c.supported, "reason": c.reason, "backends": c.backends})))
                    .collect();
                let v = json!({
                    "agent": agent.address,
                    "name": agent.name,
                    "labels": agent.labels,
                    "reachable": true,
                    "hostname": info.hostname,
                    "kernel": info.kernel,
                    "agent_version": info.agent_version,
                    "pid": info.pid,
                    "root": info.root,
                    "gpus": info.gpus.iter().map(|g| json!({"index": g.index, "uuid": g.uuid, "name": g.name,
                        "memory_total_bytes": g.memory_total_bytes, "memory_used_bytes": g.memory_used_bytes,
                        "memory_free_bytes": g.memory_free_bytes})).collect::<Vec<_>>(),
                    "gpu_error": info.gpu_error,
                    "capabilities": caps,
                    "open_sessions": info.open_sessions,
                    "faults": faults.iter().map(|f| fault_json(&agent.address, f)).collect::<Vec<_>>(),
                });
                println!("{v}");
            }
            Output::Text => {
                println!(
                    "agent {}  host {}  gpuchaos-agent {}  {}{}",
                    agent.display(),
                    info.hostname,
                    info.agent_version,
                    info.kernel,
                    if info.root { "" } else { "  (not root)" }
                );
                if info.gpus.is_empty() {
                    println!(
                        "  gpus: none ({})",
                        if info.gpu_error.is_empty() {
                            "no devices"
                        } else {
                            &info.gpu_error
                        }
                    );
                }
                for g in &info.gpus {
                    println!(
                        "  gpu {}: {} {}  {} used of {}",
                        g.index,
                        g.name,
                        g.uuid,
                        human_bytes(g.memory_used_bytes),
                        human_bytes(g.memory_total_bytes)
                    );
                }
                for c in &info.capabilities {
                    let mark = if c.supported { "yes" } else { "no " };
                    let mut line = format!("  {:<11} {mark}", c.kind);
                    if !c.backends.is_empty() {
                        line.push_str(&format!("  backends: {}", c.backends.join(", ")));
                    }
                    if !c.reason.is_empty() {
                        line.push_str(&format!("  {}", c.reason));
                    }
                    println!("{line}");
                }
                let open = faults
                    .iter()
                    .filter(|f| {
                        matches!(
                            f.state(),
                            pb::FaultState::Injecting
                                | pb::FaultState::Active
                                | pb::FaultState::Reverting
                        ) || !f.leftover.is_empty()
                    })
                    .count();
                println!("  faults: {open} open, sessions: {}", info.open_sessions);
                for f in &faults {
                    println!("    {}", fault_line(f, info.agent_mono_ns));
                }
                println!();
            }
        }
    }
    Ok(code)
}

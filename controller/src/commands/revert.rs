//! `gpuchaos revert ID` and `gpuchaos halt`.

use gpuchaos_proto::pb;
use serde_json::json;

use crate::exit::{self, CliError};
use crate::fleet::{Fleet, describe_status};
use crate::output::Output;

use super::{fault_json, fault_line};

/// Reverts one fault: asks each agent until one knows the id.
pub async fn revert(fleet: &Fleet, output: Output, id: &str) -> Result<u8, CliError> {
    let mut unreachable = Vec::new();
    for agent in &fleet.agents {
        let mut c = fleet.client(agent)?;
        match c
            .revert(pb::RevertRequest {
                fault_id: id.to_string(),
            })
            .await
        {
            Ok(f) => {
                let f = f.into_inner();
                match output {
                    Output::Json => {
                        println!("{}", json!({"faults": [fault_json(&agent.address, &f)]}))
                    }
                    Output::Text => println!("{}: {}", agent.display(), fault_line(&f, 0)),
                }
                return Ok(if f.leftover.is_empty() {
                    exit::OK
                } else {
                    exit::REVERT_FAILED
                });
            }
            Err(s) if s.code() == tonic::Code::NotFound => continue,
            Err(s) => unreachable.push(describe_status(agent, &s)),
        }
    }
    if !unreachable.is_empty() {
        return Err(CliError::new(
            exit::REVERT_FAILED,
            format!(
                "fault {id} not found on the agents that answered, and these did not: {}; if it is there, it ends at its duration or lease",
                unreachable.join("; ")
            ),
        ));
    }
    Err(CliError::invalid(format!(
        "no fault {id} on any agent ({}); `gpuchaos status` lists the faults",
        fleet
            .agents
            .iter()
            .map(|a| a.address.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

/// Reverts every fault on every agent, all agents at once.
pub async fn halt(fleet: &Fleet, output: Output) -> Result<u8, CliError> {
    let calls = fleet.agents.iter().map(|agent| async move {
        let r = match fleet.client(agent) {
            Ok(mut c) => c
                .revert_all(pb::RevertAllRequest {})
                .await
                .map(|r| r.into_inner().faults),
            Err(e) => Err(tonic::Status::invalid_argument(e.message)),
        };
        (agent, r)
    });
    let mut code = exit::OK;
    let mut out = Vec::new();
    for (agent, r) in futures_util::future::join_all(calls).await {
        match r {
            Ok(faults) => {
                for f in &faults {
                    if !f.leftover.is_empty() {
                        code = exit::REVERT_FAILED;
                    }
                }
                match output {
                    Output::Json => {
                        out.extend(faults.iter().map(|f| fault_json(&agent.address, f)))
                    }
                    Output::Text => {
                        println!("{}: {} fault(s) reverted", agent.display(), faults.len());
                        for f in &faults {
                            println!("    {}", fault_line(f, 0));
                        }
                    }
                }
            }
            Err(s) => {
                code = exit::REVERT_FAILED;
                let msg = format!(
                    "{}: its faults were NOT halted; they end at their duration or when their lease lapses",
                    describe_status(agent, &s)
                );
                match output {
                    Output::Json => out.push(json!({"agent": agent.address, "error": msg})),
                    Output::Text => eprintln!("{msg}"),
                }
            }
        }
    }
    if output == Output::Json {
        println!("{}", json!({ "faults": out }));
    }
    Ok(code)
}

//! `gpuchaos inject -f SPEC.yaml`: inject each fault of the file on each agent.
//!
//! Plain: the faults run to their duration on the agents, and the ids are printed.
//! `--attach`: the faults are tied to a lease this command renews; it waits until they
//! end, and Ctrl-C or SIGTERM reverts them. If this command dies (even SIGKILL), the
//! lease lapses and the agents revert the faults on their own.

use std::path::Path;
use std::time::Duration;

use gpuchaos_proto::pb;
use gpuchaos_proto::signal::Terminations;
use gpuchaos_proto::spec::{FaultSpec, SpecErrors};
use serde_json::json;

use crate::exit::{self, CliError};
use crate::fleet::{AgentRef, Fleet, describe_status};
use crate::output::Output;
use crate::runner::agents::{self, Renewal, Session};

use super::{fault_json, fault_line};

/// Renders spec errors as `FILE:LINE:COL: field: message`, one per line.
pub fn render_errors(file: &str, errs: &SpecErrors) -> String {
    errs.0
        .iter()
        .map(|e| super::validate::Problem::of_field(file, e.clone()).to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn read_specs(file: &Path) -> Result<Vec<FaultSpec>, CliError> {
    let name = file.display().to_string();
    let text = if name == "-" {
        gpuchaos_proto::files::read_stdin_capped(gpuchaos_proto::files::MAX_YAML_BYTES)
            .map_err(|e| CliError::invalid(e.0))?
    } else {
        gpuchaos_proto::files::read_text_capped(file, gpuchaos_proto::files::MAX_YAML_BYTES)
            .map_err(|e| CliError::invalid(e.0))?
    };
    parse_specs(&name, &text)
}

/// Parses and validates fault specs already read from `name`.
pub fn parse_specs(name: &str, text: &str) -> Result<Vec<FaultSpec>, CliError> {
    FaultSpec::from_yaml_multi(text).map_err(|e| CliError::invalid(render_errors(name, &e)))
}

pub struct Options<'a> {
    pub file: &'a Path,
    pub attach: bool,
    pub lease: Duration,
}

struct Injected {
    agent: AgentRef,
    session: Option<String>,
    result: Result<pb::Fault, tonic::Status>,
}

fn outcome_code(r: &Result<pb::Fault, tonic::Status>) -> u8 {
    match r {
        Ok(f) if !f.leftover.is_empty() => exit::REVERT_FAILED,
        Ok(f) if f.state() == pb::FaultState::Failed => exit::INJECT_FAILED,
        Ok(_) => exit::OK,
        Err(s) => exit::from_status(s, exit::INJECT_FAILED),
    }
}

pub async fn run(fleet: &Fleet, output: Output, opts: Options<'_>) -> Result<u8, CliError> {
    let specs = read_specs(opts.file)?;
    let holder = format!(
        "gpuchaos inject -f {} (pid {} on {})",
        opts.file.display(),
        std::process::id(),
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    let mut results: Vec<Injected> = Vec::new();
    let per_agent = fleet.agents.iter().map(|agent| {
        let specs = specs.clone();
        let holder = holder.clone();
        async move {
            let mut out = Vec::new();
            let mut c = match fleet.client(agent) {
                Ok(c) => c,
                Err(e) => {
                    out.push(Injected {
                        agent: agent.clone(),
                        session: None,
                        result: Err(tonic::Status::invalid_argument(e.message)),
                    });
                    return out;
                }
            };
            let mut session = None;
            if opts.attach {
                match c
                    .open_session(pb::OpenSessionRequest {
                        lease_ttl_ms: opts.lease.as_millis() as u64,
                        holder,
                        lock: String::new(),
                    })
                    .await
                {
                    Ok(s) => session = Some(s.into_inner().id),
                    Err(e) => {
                        out.push(Injected {
                            agent: agent.clone(),
                            session: None,
                            result: Err(e),
                        });
                        return out;
                    }
                }
            }
            for spec in specs {
                let r = c
                    .inject(pb::InjectRequest {
                        spec_json: spec.to_json(),
                        session_id: session.clone().unwrap_or_default(),
                    })
                    .await
                    .map(|r| r.into_inner());
                out.push(Injected {
                    agent: agent.clone(),
                    session: session.clone(),
                    result: r,
                });
            }
            out
        }
    });
    for v in futures_util::future::join_all(per_agent).await {
        results.extend(v);
    }
    let code = exit::worst(results.iter().map(|r| outcome_code(&r.result)));
    print_results(output, &results);
    if !opts.attach {
        return Ok(code);
    }
    if code != exit::OK {
        // Attached runs are all or nothing: undo what did go in.
        eprintln!("not every fault could be injected: reverting the others");
        let closed = close_sessions(fleet, &results).await;
        return Ok(exit::worst([code, closed]));
    }
    attach(fleet, output, &results, opts.lease).await
}

fn print_results(output: Output, results: &[Injected]) {
    match output {
        Output::Json => {
            let faults: Vec<serde_json::Value> = results
                .iter()
                .map(|r| match &r.result {
                    Ok(f) => fault_json(&r.agent.address, f),
                    Err(s) => json!({"agent": r.agent.address, "id": null, "state": "refused",
                        "code": format!("{:?}", s.code()), "error": s.message()}),
                })
                .collect();
            println!("{}", json!({ "faults": faults }));
        }
        Output::Text => {
            for r in results {
                match &r.result {
                    Ok(f) => println!(
                        "{}: {}",
                        r.agent.display(),
                        fault_line(f, f.verified_mono_ns)
                    ),
                    Err(s) => eprintln!("{}", describe_status(&r.agent, s)),
                }
            }
        }
    }
}

async fn close_sessions(fleet: &Fleet, results: &[Injected]) -> u8 {
    let mut code = exit::OK;
    let mut seen = Vec::new();
    for r in results {
        let Some(sid) = &r.session else { continue };
        if seen.contains(sid) {
            continue;
        }
        seen.push(sid.clone());
        let Ok(mut c) = fleet.client(&r.agent) else {
            continue;
        };
        match c
            .close_session(pb::CloseSessionRequest {
                session_id: sid.clone(),
                keep_faults: false,
            })
            .await
        {
            Ok(resp) => {
                // Say what was undone, fault by fault: after Ctrl-C a user must see
                // that the node is clean (or exactly what is not).
                for f in resp.into_inner().reverted {
                    if !f.leftover.is_empty() {
                        code = exit::REVERT_FAILED;
                    }
                    eprintln!("reverted on {}: {}", r.agent.display(), fault_line(&f, 0));
                }
            }
            Err(s) => {
                eprintln!(
                    "{}; the agent reverts this session's faults when its lease lapses",
                    describe_status(&r.agent, &s)
                );
                code = exit::REVERT_FAILED;
            }
        }
    }
    code
}

/// A duration as a person reads it: "3.33s", "250ms", "2m 30s" (never "3s 333ms
/// 333us 333ns").
pub fn short_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        let s = format!("{:.2}", d.as_secs_f64());
        format!("{}s", s.trim_end_matches('0').trim_end_matches('.'))
    } else {
        humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
    }
}

/// Renews the leases and waits until every fault has ended or a signal arrives.
async fn attach(
    fleet: &Fleet,
    output: Output,
    results: &[Injected],
    lease: Duration,
) -> Result<u8, CliError> {
    let mut signals = Terminations::install().map_err(|e| CliError::internal(e.to_string()))?;
    let sessions: Vec<Session> = results
        .iter()
        .filter_map(|r| {
            Some((
                r.agent.clone(),
                fleet.client(&r.agent).ok()?,
                r.session.clone()?,
            ))
        })
        .collect();
    let mut renew = tokio::time::interval(lease / 3);
    let mut poll = tokio::time::interval(Duration::from_millis(200));
    crate::note!(
        "attached: renewing the {} lease every {}; Ctrl-C reverts now",
        short_duration(lease),
        short_duration(lease / 3)
    );
    loop {
        tokio::select! {
            signal = signals.recv() => {
                if signal == "SIGINT" {
                    eprintln!("interrupted: reverting this session's faults");
                } else {
                    eprintln!("{signal}: reverting this session's faults");
                }
                return Ok(close_sessions(fleet, results).await);
            }
            _ = renew.tick() => {
                let outcomes = agents::renew_all(&sessions, lease / 3).await;
                for ((agent, _, _), r) in sessions.iter().zip(outcomes) {
                    match r {
                        Renewal::Renewed => {}
                        Renewal::Lapsed(s) => {
                            eprintln!("lease renewal failed: {}", describe_status(agent, &s));
                            eprintln!("the agent reverted this session's faults when its lease lapsed");
                        }
                        Renewal::Failed(s) => eprintln!("lease renewal failed: {}", describe_status(agent, &s)),
                        Renewal::TimedOut => eprintln!(
                            "lease renewal failed: agent {} gave no answer within {}",
                            agent.display(),
                            short_duration(lease / 3)
                        ),
                    }
                }
            }
            _ = poll.tick() => {
                let mut ended = Vec::new();
                let mut all_done = true;
                for r in results {
                    let Ok(f) = &r.result else { continue };
                    let Ok(mut c) = fleet.client(&r.agent) else { continue };
                    let list = c.list_faults(pb::ListFaultsRequest { include_finished: true }).await;
                    let now = list.ok().and_then(|l| l.into_inner().faults.into_iter().find(|x| x.id == f.id));
                    match now {
                        Some(x) if matches!(x.state(), pb::FaultState::Reverted | pb::FaultState::Failed) => ended.push((r.agent.clone(), x)),
                        _ => all_done = false,
                    }
                }
                if all_done {
                    let code = exit::worst(ended.iter().map(|(_, f)| if f.leftover.is_empty() { exit::OK } else { exit::REVERT_FAILED }));
                    match output {
                        Output::Json => {
                            let v: Vec<_> = ended.iter().map(|(a, f)| fault_json(&a.address, f)).collect();
                            println!("{}", json!({"ended": v}));
                        }
                        Output::Text => {
                            for (a, f) in &ended {
                                println!("{}: {}", a.display(), fault_line(f, 0));
                            }
                        }
                    }
                    close_sessions(fleet, results).await;
                    return Ok(code);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::short_duration;
    use std::time::Duration;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(short_duration(Duration::from_secs(10) / 3), "3.33s");
        assert_eq!(short_duration(Duration::from_secs(3)), "3s");
        assert_eq!(short_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(short_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(short_duration(Duration::from_secs(150)), "2m 30s");
    }
}

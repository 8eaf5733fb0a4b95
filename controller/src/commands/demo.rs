//! `gpuchaos demo`: a zero-setup session against a local agent.
//!
//! This is the foundation's demo: it starts `gpuchaos-agent` (found next to this
//! binary) on loopback with a throwaway state directory, starts three stand-in
//! worker processes, and exercises the process fault kind end to end: pause with
//! expiry, a lease that lapses when its controller goes quiet, terminate, halt and a
//! clean agent exit. Every step is checked against /proc, and the table at the end
//! says what was expected and what was seen. The reference inference stack and the
//! full game day replace the stand-in workers in a later version.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gpuchaos_proto::pb;
use gpuchaos_proto::pb::agent_client::AgentClient;
use gpuchaos_proto::spec::FaultSpec;
use tonic::transport::Channel;

use crate::exit::{self, CliError};
use crate::fleet::{AgentRef, Fleet};

struct Row {
    step: &'static str,
    expected: String,
    observed: String,
    ok: bool,
}

/// Kills and reaps child processes when dropped, so the demo never leaves any.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn proc_state(pid: u32) -> Option<char> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let close = text.rfind(')')?;
    text[close + 1..].split_whitespace().next()?.chars().next()
}

fn gone(pid: u32) -> bool {
    matches!(proc_state(pid), None | Some('Z') | Some('X'))
}

async fn wait_for(mut cond: impl FnMut() -> bool, timeout: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

/// Is the paused worker stopped now, and how long until the agent resumes it?
async fn watch_pause(pid: u32) -> (bool, Option<Duration>) {
    let stopped = proc_state(pid) == Some('T');
    let resumed = wait_for(
        || proc_state(pid).is_some_and(|s| s != 'T'),
        Duration::from_secs(5),
    )
    .await;
    (stopped, resumed)
}

fn after(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.2}s", d.as_secs_f64()))
        .unwrap_or_else(|| "NEVER".into())
}

fn spec(yaml: String) -> Result<String, CliError> {
    let s = FaultSpec::from_yaml_multi(&yaml)
        .map_err(|e| CliError::internal(format!("demo spec: {e}")))?;
    Ok(s[0].to_json())
}

async fn inject(
    c: &mut AgentClient<Channel>,
    yaml: String,
    session: &str,
) -> Result<pb::Fault, CliError> {
    c.inject(pb::InjectRequest {
        spec_json: spec(yaml)?,
        session_id: session.to_string(),
    })
    .await
    .map(|r| r.into_inner())
    .map_err(|s| CliError::internal(format!("agent: {}", s.message())))
}

fn agent_binary() -> Result<PathBuf, CliError> {
    let me = std::env::current_exe()
        .map_err(|e| CliError::internal(format!("cannot find this binary: {e}")))?;
    let dir = me.parent().map(PathBuf::from).unwrap_or_default();
    let agent = dir.join("gpuchaos-agent");
    if agent.exists() {
        Ok(agent)
    } else {
        Err(CliError::invalid(format!(
            "gpuchaos-agent not found next to gpuchaos in {}: build both with `cargo build --release`",
            dir.display()
        )))
    }
}

pub async fn run() -> Result<u8, CliError> {
    let started = Instant::now();
    let agent_bin = agent_binary()?;
    let state = std::env::temp_dir().join(format!("gpuchaos-demo-{}", std::process::id()));
    std::fs::create_dir_all(&state)
        .map_err(|e| CliError::internal(format!("cannot create {}: {e}", state.display())))?;
    let log_path = state.join("agent.log");
    let log = std::fs::File::create(&log_path).map_err(|e| CliError::internal(e.to_string()))?;

    println!(
        "gpuchaos demo: a local agent, three stand-in workers, the process fault kind end to end"
    );
    let mut agent = Command::new(&agent_bin)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--state-dir",
        ])
        .arg(&state)
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .map_err(|e| CliError::internal(format!("cannot start {}: {e}", agent_bin.display())))?;
    let stdout = agent
        .stdout
        .take()
        .ok_or_else(|| CliError::internal("agent stdout"))?;
    let agent_pid = agent.id();
    let mut children = Children(vec![agent]);
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        line
    })
    .await
    .map_err(|e| CliError::internal(e.to_string()))?;
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("grpc="))
        .ok_or_else(|| {
            CliError::internal(format!(
                "the agent did not start; its log is {}",
                log_path.display()
            ))
        })?
        .to_string();
    println!(
        "  agent pid {agent_pid} on {addr} (log: {})",
        log_path.display()
    );

    let marker = format!("86400.{}", std::process::id() % 100_000);
    let mut workers = Vec::new();
    for _ in 0..3 {
        let c = Command::new("sleep")
            .arg(&marker)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| {
                CliError::internal(format!("cannot start a stand-in worker (sleep): {e}"))
            })?;
        workers.push(c.id());
        children.0.push(c);
    }
    println!("  workers: pids {workers:?} (`sleep {marker}`)");

    let fleet = Fleet::from_flags(
        std::slice::from_ref(&addr),
        None,
        None,
        Duration::from_secs(5),
    )?;
    let agent_ref = AgentRef {
        name: "local".into(),
        address: addr.clone(),
        labels: Default::default(),
    };
    let mut c: AgentClient<Channel> = fleet.client(&agent_ref)?;
    let rpc = |s: tonic::Status| CliError::internal(format!("agent: {}", s.message()));
    let mut rows = Vec::new();

    // 1. Pause one worker for 2s: verified stopped, resumed by the agent on expiry.
    let w = workers[0];
    let f = inject(
        &mut c,
        format!("kind: process\nduration: 2s\ntarget: {{pid: {w}}}\naction: pause\n"),
        "",
    )
    .await?;
    let inject_ms = f.verified_mono_ns.saturating_sub(f.created_mono_ns) as f64 / 1e6;
    let (stopped, resumed) = watch_pause(w).await;
    rows.push(Row {
        step: "pause 2s, expires",
        expected: "stopped, then resumed by the agent after 2s".into(),
        observed: format!(
            "stopped={stopped} (verified in {inject_ms:.1} ms), resumed after {}",
            after(resumed)
        ),
        ok: f.state() == pb::FaultState::Active && stopped && resumed.is_some(),
    });

    // 2. A lease that is never renewed (a controller that died): the agent reverts.
    let w = workers[1];
    let s = c
        .open_session(pb::OpenSessionRequest {
            lease_ttl_ms: 1000,
            holder: "gpuchaos demo (will go quiet)".into(),
        })
        .await
        .map_err(rpc)?
        .into_inner();
    inject(
        &mut c,
        format!("kind: process\nduration: 10m\ntarget: {{pid: {w}}}\naction: pause\n"),
        &s.id,
    )
    .await?;
    let (stopped, resumed) = watch_pause(w).await;
    rows.push(Row {
        step: "lease lapses",
        expected: "a 10m pause reverted ~1s after the controller goes quiet".into(),
        observed: format!("stopped={stopped}, resumed after {}", after(resumed)),
        ok: stopped && resumed.is_some_and(|d| d < Duration::from_secs(3)),
    });

    // 3. Terminate a worker: SIGTERM, verified gone.
    let w = workers[2];
    let f = inject(
        &mut c,
        format!(
            "kind: process\nduration: 5s\ntarget: {{pid: {w}}}\naction: terminate\ngrace: 1s\n"
        ),
        "",
    )
    .await?;
    rows.push(Row {
        step: "terminate",
        expected: "worker gone".into(),
        observed: format!(
            "state {}, gone={}",
            gpuchaos_proto::state_name(f.state()),
            gone(w)
        ),
        ok: f.state() == pb::FaultState::Active && gone(w),
    });

    // 4. Protected processes are refused, nothing applied.
    let refused = c
        .inject(pb::InjectRequest {
            spec_json: spec(
                "kind: process\nduration: 5s\ntarget: {pid: 1}\naction: kill\n".into(),
            )?,
            session_id: String::new(),
        })
        .await;
    rows.push(Row {
        step: "policy",
        expected: "kill pid 1 refused (FAILED_PRECONDITION)".into(),
        observed: match &refused {
            Err(s) => format!("{:?}: {}", s.code(), s.message()),
            Ok(_) => "ACCEPTED".into(),
        },
        ok: matches!(&refused, Err(s) if s.code() == tonic::Code::FailedPrecondition),
    });

    // 5. Halt, then a clean agent exit with nothing left in the journal.
    let w = workers[0];
    inject(
        &mut c,
        format!("kind: process\nduration: 10m\ntarget: {{pid: {w}}}\naction: pause\n"),
        "",
    )
    .await?;
    let halted = c
        .revert_all(pb::RevertAllRequest {})
        .await
        .map_err(rpc)?
        .into_inner()
        .faults;
    let resumed = proc_state(w).is_some_and(|s| s != 'T');
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent_pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let exited = wait_for(|| gone(agent_pid), Duration::from_secs(10))
        .await
        .is_some();
    let journal = std::fs::read_to_string(state.join("journal.jsonl")).unwrap_or_default();
    let intents = journal.matches("\"rec\":\"intent\"").count();
    let reverted = journal.matches("\"rec\":\"reverted\"").count();
    rows.push(Row {
        step: "halt + SIGTERM",
        expected: "every fault reverted, agent exits, journal closed".into(),
        observed: format!(
            "halted {} fault(s), worker resumed={resumed}, agent exited={exited}, journal {intents} intent(s) / {reverted} reverted",
            halted.len()
        ),
        ok: !halted.is_empty()
            && halted.iter().all(|f| f.state() == pb::FaultState::Reverted)
            && resumed
            && exited
            && intents == reverted,
    });
    drop(children);

    println!();
    println!(
        "  {:<18} {:<56} {:<8} observed",
        "step", "expected", "verdict"
    );
    for r in &rows {
        println!(
            "  {:<18} {:<56} {:<8} {}",
            r.step,
            r.expected,
            if r.ok { "pass" } else { "FAIL" },
            r.observed
        );
    }
    let all = rows.iter().all(|r| r.ok);
    println!();
    println!(
        "demo {} in {:.1}s; agent log and journal in {}",
        if all { "passed" } else { "FAILED" },
        started.elapsed().as_secs_f64(),
        state.display()
    );
    Ok(if all {
        exit::OK
    } else {
        exit::OBJECTIVE_FAILED
    })
}

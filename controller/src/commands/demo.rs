//! `gpuchaos demo`: a zero-setup game day against a local reference stack.
//!
//! It starts, from the binaries next to this one:
//!
//! - the reference guardrail service;
//! - a `gpuchaos-agent` on loopback with a standing guardrail proxy in front of it,
//!   and the project's fake NVIDIA driver when this machine has no GPU;
//! - the reference inference server (2 workers holding their KV caches on the GPU),
//!   which consults the guardrail through the proxy and fails closed.
//!
//! Then it writes a game day that exercises every fault kind (a worker crash, GPU
//! memory pressure, a guardrail outage, and network latency when running as root)
//! and runs it exactly as `gpuchaos run` does: probes, objectives, rollback, reports.
//! What was skipped, and why, is printed before the run.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::commands::run as run_cmd;
use crate::exit::CliError;
use crate::fleet::Fleet;
use crate::output::Output;

/// Kills and reaps child processes when dropped, so the demo never leaves any.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in self.0.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn sibling(name: &str) -> Result<PathBuf, CliError> {
    let me = std::env::current_exe()
        .map_err(|e| CliError::internal(format!("cannot find this binary: {e}")))?;
    let dir = me.parent().map(PathBuf::from).unwrap_or_default();
    let p = dir.join(name);
    if p.exists() {
        Ok(p)
    } else {
        Err(CliError::invalid(format!(
            "{name} not found next to gpuchaos in {}: build the workspace with `cargo build --release`",
            dir.display()
        )))
    }
}

/// Starts a process that prints one line once it serves; returns it and that line.
fn start(
    children: &mut Children,
    program: &Path,
    args: &[String],
    env: &[(String, String)],
    log: &Path,
) -> Result<String, CliError> {
    let logf = std::fs::File::create(log).map_err(|e| CliError::internal(e.to_string()))?;
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().cloned())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(logf))
        .spawn()
        .map_err(|e| CliError::internal(format!("cannot start {}: {e}", program.display())))?;
    let stdout = child.stdout.take();
    children.0.push(child);
    let mut line = String::new();
    if let Some(out) = stdout {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    if line.trim().is_empty() {
        return Err(CliError::internal(format!(
            "{} did not start; its log is {}",
            program.display(),
            log.display()
        )));
    }
    Ok(line.trim().to_string())
}

fn free_port() -> Result<u16, CliError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| CliError::internal(format!("no free port: {e}")))
}

/// GET on a fresh connection; the body, or None.
async fn get(addr: &str, path: &str) -> Option<String> {
    let work = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
    };
    tokio::time::timeout(Duration::from_secs(2), work)
        .await
        .ok()?
}

/// Whether this machine has an NVIDIA GPU with its driver.
fn real_gpu() -> bool {
    Path::new("/dev/nvidiactl").exists()
        && [
            "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1",
            "/usr/lib64/libnvidia-ml.so.1",
            "/usr/lib/libnvidia-ml.so.1",
        ]
        .iter()
        .any(|p| Path::new(p).exists())
}

/// None when the local agent can inject network faults; otherwise why not, with what
/// to do (the agent's own capability report).
async fn network_support(grpc: &str) -> Option<String> {
    let fleet = Fleet {
        agents: Vec::new(),
        tls: None,
        timeout: Duration::from_secs(5),
    };
    let agent = crate::fleet::AgentRef {
        name: String::new(),
        address: grpc.to_string(),
        labels: Default::default(),
    };
    let clock = crate::runner::shared::Clock::start();
    match crate::runner::agents::connect(&fleet, &agent, &clock).await {
        Ok(c) => match c.capability("network") {
            Some(cap) if cap.supported => None,
            Some(cap) => Some(format!("the network fault: {}", cap.reason)),
            None => Some("the network fault: this agent does not know the kind".into()),
        },
        Err(e) => Some(format!(
            "the network fault: the agent's capabilities could not be read ({e})"
        )),
    }
}

pub async fn run() -> Result<u8, CliError> {
    let started = Instant::now();
    let agent_bin = sibling("gpuchaos-agent")?;
    let stack_bin = sibling("gpuchaos-refstack")?;
    let dir = std::env::temp_dir().join(format!("gpuchaos-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| CliError::internal(format!("cannot create {}: {e}", dir.display())))?;
    let reports = std::env::current_dir()
        .unwrap_or_else(|_| dir.clone())
        .join("gpuchaos-demo-report");
    let root = nix::unistd::geteuid().is_root();
    let real = real_gpu();

    println!("gpuchaos demo: a game day against a local reference inference stack");
    let mut env: Vec<(String, String)> = Vec::new();
    let mut agent_gpu_args: Vec<String> = Vec::new();
    if real {
        println!("  GPU: this machine's NVIDIA driver");
    } else {
        let lib = sibling("libgpuchaos_fakegpu.so")?.display().to_string();
        env.push((
            "GPUCHAOS_FAKE_GPU_STATE".into(),
            dir.join("fake-gpu.json").display().to_string(),
        ));
        env.push(("GPUCHAOS_FAKE_GPUS".into(), "1x80GiB".into()));
        env.push(("GPUCHAOS_CUDA_LIB".into(), lib.clone()));
        agent_gpu_args = vec!["--nvml-lib".into(), lib.clone(), "--cuda-lib".into(), lib];
        println!("  GPU: none here, so the project's fake NVIDIA driver (one 80 GiB GPU)");
    }

    let mut children = Children(Vec::new());
    let guardrail = start(
        &mut children,
        &stack_bin,
        &["guardrail".into()],
        &env,
        &dir.join("guardrail.log"),
    )?;
    let guardrail = guardrail.trim_start_matches("listening ").to_string();
    let proxy_port = free_port()?;
    let mut agent_args: Vec<String> = vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--metrics-listen".into(),
        "127.0.0.1:0".into(),
        "--state-dir".into(),
        dir.join("agent-state").display().to_string(),
        "--guardrail-proxy".into(),
        format!("127.0.0.1:{proxy_port}=http://{guardrail}"),
    ];
    agent_args.extend(agent_gpu_args);
    let line = start(
        &mut children,
        &agent_bin,
        &agent_args,
        &env,
        &dir.join("agent.log"),
    )?;
    let grpc = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("grpc="))
        .ok_or_else(|| CliError::internal(format!("unexpected agent output: {line}")))?
        .to_string();
    let server = start(
        &mut children,
        &stack_bin,
        &[
            "server".into(),
            "--workers".into(),
            "2".into(),
            "--guardrail".into(),
            format!("http://127.0.0.1:{proxy_port}"),
            "--guardrail-policy".into(),
            "fail-closed".into(),
            "--cold-start".into(),
            "1s".into(),
            "--kv-cache".into(),
            "8GiB".into(),
        ],
        &env,
        &dir.join("server.log"),
    )?;
    let server = server.trim_start_matches("listening ").to_string();
    let server_port = server.rsplit(':').next().unwrap_or("0").to_string();
    println!(
        "  guardrail {guardrail}, agent {grpc} (standing guardrail proxy on 127.0.0.1:{proxy_port}),"
    );
    println!(
        "  inference server {server} with 2 workers (fail-closed); logs in {}",
        dir.display()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let live = get(&server, "/metrics")
            .await
            .unwrap_or_default()
            .lines()
            .any(|l| l.trim() == "refstack_workers_live 2");
        if live {
            break;
        }
        if Instant::now() > deadline {
            return Err(CliError::internal(format!(
                "the workers did not become ready within 60s; see {}",
                dir.join("server.log").display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The agent says whether it can inject network faults here (as root without
    // nftables or iproute2 it cannot): the demo skips the step the same way it does
    // for a non-root user, saying what to install, instead of failing the game day.
    let network_unsupported = if root {
        network_support(&grpc).await
    } else {
        Some("the network fault (latency on the server's port) needs root; run the demo as root to include it".to_string())
    };
    let network = if network_unsupported.is_none() {
        format!(
            r#"  - wait: 2s
  - name: network-latency
    fault: {{kind: network, duration: 4s, interface: lo, ports: [{server_port}], latency: 150ms}}
"#
        )
    } else {
        println!(
            "  skipped: {}",
            network_unsupported.as_deref().unwrap_or_default()
        );
        String::new()
    };
    let file = dir.join("gameday.yaml");
    let yaml = format!(
        r#"# The gpuchaos demo game day (written by `gpuchaos demo`).
metadata:
  name: gpuchaos-demo
  description: every fault kind against the reference stack (2 workers, fail-closed guardrail)
agents: [{{name: local, address: "{grpc}"}}]
lease: 5s
probes:
  - name: chat
    interval: 250ms
    timeout: 3s
    openai: {{base_url: "http://{server}/v1", model: refstack-1b, prompt: "Say pong", expect_regex: "(?i)pong"}}
  - name: health
    interval: 250ms
    http: {{url: "http://{server}/health"}}
  - name: canary
    interval: 1s
    timeout: 3s
    guardrail: {{base_url: "http://{server}/v1", model: refstack-1b}}
steady_state: {{probes: [chat, health, canary], duration: 2s, timeout: 60s}}
method:
  - name: worker-crash
    fault: {{kind: process, duration: 3s, action: kill, target: {{cmdline: "gpuchaos-refstack worker --id 0 --server {server} "}}}}
  - wait: 2s
  - name: gpu-pressure
    fault: {{kind: gpu_memory, duration: 4s, target: {{gpus: [0]}}, fill: {{percent: 90}}}}
  - name: guardrail-outage
    fault: {{kind: guardrail, duration: 4s, listen: "127.0.0.1:{proxy_port}", preset: openai-moderation, corrupt: {{status: {{code: 503}}}}}}
{network}  - wait: 2s
objectives:
  - name: generations recover after a worker crash
    rto: {{probe: chat, fault: worker-crash, limit: 10s}}
  - name: generations recover after the guardrail outage
    rto: {{probe: chat, fault: guardrail-outage, anchor: end, limit: 5s}}
  - name: no unsafe output, whatever breaks
    safety: {{probe: canary}}
  - name: chat mostly available
    availability: {{probe: chat, min: 0.5}}
  - name: median generation latency
    latency: {{probe: chat, percentile: 50, limit: 1s}}
"#
    );
    std::fs::write(&file, yaml).map_err(|e| CliError::internal(e.to_string()))?;
    println!(
        "  game day: {} (every fault kind{})",
        file.display(),
        if network.is_empty() {
            " but network"
        } else {
            ""
        }
    );
    println!();
    let code = run_cmd::run(
        &Fleet {
            agents: Vec::new(),
            tls: None,
            timeout: Duration::from_secs(5),
        },
        Output::Text,
        run_cmd::Options {
            file: &file,
            report_dir: Some(reports.clone()),
            dry_run: false,
            seed: Some(1),
        },
    )
    .await?;
    drop(children);
    println!(
        "demo finished in {:.0}s (exit {code}); open {}",
        started.elapsed().as_secs_f64(),
        reports.join("report.html").display()
    );
    Ok(code)
}

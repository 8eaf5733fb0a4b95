//! Inject-to-verified latency for `pause` on loopback, over 1,000 faults, and the
//! agent's idle resident memory. Prints figures; asserts nothing.
//!
//!   cargo build --release --workspace
//!   cargo bench -p gpuchaos-tests --bench inject_latency
//!
//! Each round injects a pause (selected by command-line regex, so the agent scans
//! /proc as it would in production), which the agent journals (fsync), signals and
//! verifies (state T read back) before answering; then reverts it (SIGCONT, verified,
//! journaled). Three figures per round: the client's inject round trip, the agent's
//! own request-to-verified time, and the revert round trip.

use std::time::{Duration, Instant};

use gpuchaos_proto::pb;
use gpuchaos_tests::*;

const ROUNDS: usize = 1000;
const WARMUP: usize = 50;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn summary(name: &str, mut v: Vec<f64>) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "| {name:<34} | {:>7.3} | {:>7.3} | {:>7.3} | {:>7.3} |",
        percentile(&v, 50.0),
        percentile(&v, 90.0),
        percentile(&v, 99.0),
        v[v.len() - 1]
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&dir.path().join("state"));
    // Let the agent settle, then measure it idle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_idle = rss_kib(agent.pid);
    let w = Worker::spawn();
    let spec = spec_json(&format!(
        "kind: process\nduration: 1m\ntarget: {{cmdline: '{}'}}\naction: pause\n",
        w.cmdline_regex()
    ));
    let mut c = agent.client().await;
    let (mut rtt, mut agent_ms, mut revert) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..WARMUP + ROUNDS {
        let t = Instant::now();
        let f = c
            .inject(pb::InjectRequest {
                spec_json: spec.clone(),
                session_id: String::new(),
            })
            .await
            .expect("inject")
            .into_inner();
        let inject_rtt = t.elapsed();
        assert_eq!(f.state(), pb::FaultState::Active, "{}", f.error);
        assert!(is_stopped(w.pid));
        let t = Instant::now();
        c.revert(pb::RevertRequest {
            fault_id: f.id.clone(),
        })
        .await
        .expect("revert");
        let revert_rtt = t.elapsed();
        if i >= WARMUP {
            rtt.push(inject_rtt.as_secs_f64() * 1e3);
            agent_ms.push((f.verified_mono_ns - f.created_mono_ns) as f64 / 1e6);
            revert.push(revert_rtt.as_secs_f64() * 1e3);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = rss_kib(agent.pid);
    let procs = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
            })
            .count()
        })
        .unwrap_or(0);
    println!(
        "gpuchaos inject latency: {ROUNDS} pause faults (after {WARMUP} warm-up), loopback, {procs} processes in /proc"
    );
    println!("state dir on: {}", dir.path().display());
    println!();
    println!(
        "| {:<34} | {:>7} | {:>7} | {:>7} | {:>7} |",
        "ms", "p50", "p90", "p99", "max"
    );
    println!("|{:-<36}|{:->9}|{:->9}|{:->9}|{:->9}|", "", "", "", "", "");
    summary("inject round trip (client)", rtt);
    summary("inject to verified (agent)", agent_ms);
    summary("revert round trip (client)", revert);
    println!();
    println!(
        "agent RSS idle at start: {:.1} MiB",
        rss_idle as f64 / 1024.0
    );
    println!(
        "agent RSS idle after {} faults: {:.1} MiB",
        ROUNDS + WARMUP,
        rss_after as f64 / 1024.0
    );
    println!();
    println!("targets: inject p99 under 10 ms; idle RSS under 20 MiB");
}

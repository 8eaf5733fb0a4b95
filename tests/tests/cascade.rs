//! The cascading OOM across nodes (`experiments/refstack/cascading-oom-nodes.yaml`):
//! two reference nodes, each with its own agent, fake GPU and stack, node A spilling
//! to node B. Two workers per node ride it out (exit 0, node A's traffic served by
//! node B); one worker per node fails the availability objective (exit 1). The
//! nodes listen on fixed local addresses (servers 18860 and 18870, agents 18862 and
//! 18872), so both cases run in this one test, one after the other.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gpuchaos_tests::*;

struct Node {
    server: Child,
    _agent: Agent,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

fn node(
    dir: &std::path::Path,
    name: &str,
    port: u16,
    fallback: Option<u16>,
    workers: &str,
) -> Node {
    let lib = bin("libgpuchaos_fakegpu.so").display().to_string();
    let env = vec![
        (
            "GPUCHAOS_FAKE_GPU_STATE".to_string(),
            dir.join(format!("{name}-gpu.json")).display().to_string(),
        ),
        ("GPUCHAOS_FAKE_GPUS".to_string(), "1x24GiB".to_string()),
        ("GPUCHAOS_CUDA_LIB".to_string(), lib.clone()),
    ];
    let state = dir.join(format!("{name}-agent"));
    std::fs::create_dir_all(&state).unwrap();
    let agent = Agent::start_with(AgentOpts {
        state_dir: &state,
        args: [
            "--listen",
            &format!("127.0.0.1:{}", port + 2),
            "--nvml-lib",
            &lib,
            "--cuda-lib",
            &lib,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        env: env.clone(),
        netns: None,
    });
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec![
        "server".to_string(),
        "--listen".into(),
        listen.clone(),
        "--workers".into(),
        workers.into(),
        "--kv-cache".into(),
        "4GiB".into(),
        "--weights".into(),
        "1GiB".into(),
        "--cold-start".into(),
        "2s".into(),
        "--restart-delay".into(),
        "3s".into(),
    ];
    if let Some(f) = fallback {
        args.extend(["--fallback".into(), format!("127.0.0.1:{f}")]);
    }
    let log = std::fs::File::create(dir.join(format!("{name}-server.log"))).unwrap();
    let mut server = Command::new(bin("gpuchaos-refstack"))
        .args(&args)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let n = Node {
        server,
        _agent: agent,
    };
    let ready = wait_until(Duration::from_secs(30), || {
        Command::new("curl")
            .args(["-s", "-m", "2", &format!("http://{listen}/metrics")])
            .output()
            .is_ok_and(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .contains(&format!("refstack_workers_live {workers}\n"))
            })
    });
    assert!(ready.is_some(), "node {name} never became ready");
    n
}

fn metric(port: u16, name: &str) -> u64 {
    let out = Command::new("curl")
        .args(["-s", "-m", "2", &format!("http://127.0.0.1:{port}/metrics")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Runs the game day against two fresh nodes; returns the exit code, the objectives
/// (name, passed, detail) and how many requests node A spilled to node B.
fn run(workers: &str) -> (i32, Vec<(String, bool, String)>, u64) {
    let dir = tempfile::tempdir().unwrap();
    let b = node(dir.path(), "b", 18870, None, workers);
    let a = node(dir.path(), "a", 18860, Some(18870), workers);
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let file = repo.join("experiments/refstack/cascading-oom-nodes.yaml");
    let reports = dir.path().join("reports");
    let t = Instant::now();
    let out = gpuchaos(&[
        "run",
        file.to_str().unwrap(),
        "--report-dir",
        reports.to_str().unwrap(),
    ]);
    eprintln!(
        "--workers {workers}: exit {} in {:.1}s\n{}",
        out.code,
        t.elapsed().as_secs_f64(),
        out.stdout
    );
    assert!(
        out.code == 0 || out.code == 1,
        "exit {}\n{}\n{}",
        out.code,
        out.stdout,
        out.stderr
    );
    let spilled = metric(18860, "refstack_fallback_total");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reports.join("journal.json")).unwrap())
            .unwrap();
    let objectives = j["objectives"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["name"].as_str().unwrap().to_string(),
                o["passed"].as_bool().unwrap(),
                o["detail"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    drop(a);
    drop(b);
    (out.code, objectives, spilled)
}

#[test]
fn a_cascading_oom_across_nodes_passes_a_redundant_fleet_and_fails_a_thin_one() {
    let (code, objectives, spilled) = run("2");
    eprintln!("two workers per node: {objectives:?}; node A spilled {spilled} requests to node B");
    assert_eq!(code, 0, "{objectives:?}");
    assert!(spilled > 10, "node A's traffic went to node B: {spilled}");

    let (code, objectives, spilled) = run("1");
    eprintln!("one worker per node: {objectives:?}; node A spilled {spilled} requests to node B");
    assert_eq!(code, 1, "{objectives:?}");
    let failed: Vec<&str> = objectives
        .iter()
        .filter(|o| !o.1)
        .map(|o| o.0.as_str())
        .collect();
    assert!(
        failed.contains(&"generations stay available through the cascade"),
        "{objectives:?}"
    );
}

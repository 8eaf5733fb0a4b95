//! GPU memory pressure against the project's fake NVIDIA driver
//! (`libgpuchaos_fakegpu.so`, both NVML and the CUDA driver API): the agent reads
//! memory through nvml-wrapper and holds it through its CUDA helper; a second process
//! allocating through the same driver sees the pressure. Every figure below comes
//! from NVML as the agent reports it (`gpuchaos status --output json`).

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use gpuchaos_tests::*;

const GIB: u64 = 1 << 30;
const UUID0: &str = "GPU-fa4e0000-0000-4000-8000-000000000000";

fn fake_lib() -> PathBuf {
    bin("libgpuchaos_fakegpu.so")
}

/// An agent on two fake 80 GiB GPUs with a state file of its own.
struct Node {
    dir: tempfile::TempDir,
    agent: Agent,
    env: Vec<(String, String)>,
}

impl Node {
    fn start() -> Node {
        Self::start_with(&[], "")
    }

    fn start_with(extra_env: &[(&str, &str)], policy: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let mut env = vec![
            (
                "GPUCHAOS_FAKE_GPU_STATE".to_string(),
                dir.path().join("fakegpu.json").display().to_string(),
            ),
            ("GPUCHAOS_FAKE_GPUS".to_string(), "2x80GiB".to_string()),
        ];
        env.extend(
            extra_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let lib = fake_lib().display().to_string();
        let mut args = vec![
            "--nvml-lib".to_string(),
            lib.clone(),
            "--cuda-lib".to_string(),
            lib,
        ];
        if !policy.is_empty() {
            let p = dir.path().join("policy.yaml");
            std::fs::write(&p, policy).unwrap();
            args.extend(["--policy".to_string(), p.display().to_string()]);
        }
        let agent = Agent::start_with(AgentOpts {
            state_dir: &dir.path().join("state"),
            args,
            env: env.clone(),
            netns: None,
        });
        Node { dir, agent, env }
    }

    fn status(&self) -> serde_json::Value {
        let out = gpuchaos(&["--agent", &self.agent.grpc, "--output", "json", "status"]);
        assert_eq!(out.code, 0, "{out:?}");
        serde_json::from_str(out.stdout.lines().next().unwrap()).unwrap()
    }

    /// Used bytes on a GPU, as NVML reports it through the agent.
    fn used(&self, index: usize) -> u64 {
        self.status()["gpus"][index]["memory_used_bytes"]
            .as_u64()
            .unwrap()
    }

    fn inject(&self, yaml: &str) -> serde_json::Value {
        let f = spec_file(self.dir.path(), "gpu.yaml", yaml);
        inject_active(None, &self.agent, &f)
    }

    fn inject_err(&self, yaml: &str) -> CliOut {
        let f = spec_file(self.dir.path(), "gpu.yaml", yaml);
        gpuchaos(&[
            "--agent",
            &self.agent.grpc,
            "inject",
            "-f",
            f.to_str().unwrap(),
        ])
    }

    fn revert(&self, id: &str) {
        let out = gpuchaos(&["--agent", &self.agent.grpc, "revert", id]);
        assert_eq!(out.code, 0, "{out:?}");
    }

    /// Another process allocating through the same fake driver.
    fn other_process(&self) -> Other {
        let mut child = Command::new(bin("gpuchaos-agent"))
            .args(["__gpu-helper", "--uuid", UUID0, "--cuda-lib"])
            .arg(fake_lib())
            .envs(self.env.iter().cloned())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut o = Other {
            stdin: child.stdin.take().unwrap(),
            stdout: BufReader::new(child.stdout.take().unwrap()),
            child,
        };
        assert_eq!(o.line(), "ready");
        o
    }
}

struct Other {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Other {
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.stdout.read_line(&mut l).unwrap();
        l.trim().to_string()
    }
    fn grow(&mut self, bytes: u64) -> String {
        writeln!(self.stdin, "grow {bytes}").unwrap();
        self.line()
    }
}

impl Drop for Other {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn within_one_percent(got: u64, want: u64) -> bool {
    (got as f64 - want as f64).abs() <= want as f64 * 0.01
}

#[test]
fn every_fill_mode_reaches_its_target_within_one_percent() {
    let n = Node::start();
    let total = 80 * GIB;
    for (yaml, gpu, want) in [
        (
            "kind: gpu_memory\nduration: 1m\ntarget: {gpus: [0]}\nfill: {percent: 50}\n",
            0,
            total / 2,
        ),
        (
            "kind: gpu_memory\nduration: 1m\ntarget: {gpus: [1]}\nfill: {bytes: 20GiB}\n",
            1,
            20 * GIB,
        ),
        (
            &format!(
                "kind: gpu_memory\nduration: 1m\ntarget: {{gpus: [\"{UUID0}\"]}}\nfill: {{leave_free: 8GiB}}\n"
            ),
            0,
            total - 8 * GIB,
        ),
    ] {
        let f = n.inject(yaml);
        let used = n.used(gpu);
        eprintln!(
            "{}: target {want}, NVML used {used}, off by {:.3}%",
            f["target"],
            (used as f64 - want as f64) / want as f64 * 100.0
        );
        assert!(within_one_percent(used, want), "{used} vs {want}: {f}");
        let d = &f["details"]["gpus"][0];
        assert_eq!(d["target_used"].as_u64(), Some(want));
        assert!(
            d["context"].as_u64().unwrap() > 0,
            "the context is accounted for: {d}"
        );
        n.revert(f["id"].as_str().unwrap());
        assert_eq!(n.used(gpu), 0, "revert frees it");
    }
    // All GPUs at once.
    let f = n.inject("kind: gpu_memory\nduration: 1m\ntarget: {gpus: all}\nfill: {percent: 25}\n");
    assert!(within_one_percent(n.used(0), total / 4) && within_one_percent(n.used(1), total / 4));
    n.revert(f["id"].as_str().unwrap());
    assert_eq!((n.used(0), n.used(1)), (0, 0));
}

#[test]
fn a_ramp_fills_in_steps() {
    let n = Node::start();
    let total = 80 * GIB;
    let f = n.inject(
        "kind: gpu_memory\nduration: 30s\ntarget: {gpus: [0]}\nfill: {percent: 80}\nramp: 2s\n",
    );
    let first = n.used(0);
    assert!(
        first < total * 80 / 100 / 2,
        "the first of 4 steps only: {first}"
    );
    // A deadline, not a speed bound: on a loaded 2-core CI machine (every test at
    // once) the fake driver's allocations slow down; the ramp's shape is what counts.
    let reached = wait_until(Duration::from_secs(20), || {
        within_one_percent(n.used(0), total * 80 / 100)
    });
    let reached = reached.expect("the ramp never reached its target");
    eprintln!("first step {first} bytes; 80% reached after {reached:?}");
    assert!(reached >= Duration::from_millis(1000), "{reached:?}");
    n.revert(f["id"].as_str().unwrap());
    assert_eq!(n.used(0), 0);
}

#[test]
fn an_agent_killed_with_sigkill_takes_its_memory_with_it() {
    let mut n = Node::start();
    let f = n.inject("kind: gpu_memory\nduration: 10m\ntarget: {gpus: [0]}\nfill: {percent: 60}\n");
    let helper = f["details"]["gpus"][0]["helper_pid"].as_u64().unwrap() as u32;
    assert!(!is_gone(helper));
    n.agent.kill9();
    assert!(
        wait_until(Duration::from_secs(5), || is_gone(helper)).is_some(),
        "the helper must die with the agent"
    );
    // A restarted agent (recovery) sees the memory free, and nothing open.
    let state = n.agent.state_dir.clone();
    n.agent = Agent::start_with(AgentOpts {
        state_dir: &state,
        args: vec![
            "--nvml-lib".into(),
            fake_lib().display().to_string(),
            "--cuda-lib".into(),
            fake_lib().display().to_string(),
        ],
        env: n.env.clone(),
        netns: None,
    });
    assert_eq!(n.used(0), 0);
    assert_eq!(n.agent.open_intents(), 0);
}

#[test]
fn a_second_process_runs_out_of_memory_while_the_pressure_holds() {
    let n = Node::start();
    let f = n.inject("kind: gpu_memory\nduration: 1m\ntarget: {gpus: [0]}\nfill: {percent: 95}\n");
    let mut other = n.other_process();
    // 4 GiB are left, less a context: the second process's allocations fail with the
    // driver's out-of-memory error before it has its 8 GiB.
    let answer = other.grow(8 * GIB);
    eprintln!("second process asking for 8 GiB under 95% pressure: {answer}");
    let held: u64 = answer.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(
        answer.starts_with("oom ") && answer.ends_with("CUDA_ERROR_OUT_OF_MEMORY"),
        "{answer}"
    );
    assert!(held < 4 * GIB, "{answer}");
    n.revert(f["id"].as_str().unwrap());
    assert_eq!(other.grow(8 * GIB), format!("ok {}", held + 8 * GIB));
}

#[test]
fn bad_input_and_not_enough_memory_are_refused_with_what_is_possible() {
    let n = Node::start();
    let out =
        n.inject_err("kind: gpu_memory\nduration: 1m\ntarget: {gpus: [7]}\nfill: {percent: 50}\n");
    assert_eq!(out.code, 64, "{out:?}");
    assert!(
        out.stderr
            .contains("target.gpus: GPU 7 does not exist on this node; it has 0 (GPU-"),
        "{}",
        out.stderr
    );
    let out =
        n.inject_err("kind: gpu_memory\nduration: 1m\ntarget: {gpus: [0]}\nfill: {percent: 99}\n");
    assert_eq!(out.code, 64, "{out:?}");
    assert!(
        out.stderr.contains("the policy allows at most 95%"),
        "{}",
        out.stderr
    );
    let out =
        n.inject_err("kind: gpu_memory\nduration: 1m\ntarget: {gpus: [0]}\nfill: {percent: 150}\n");
    assert_eq!(out.code, 64, "{out:?}");
    assert!(
        out.stderr.contains("fill.percent: 150 is out of range"),
        "{}",
        out.stderr
    );
    // Someone else holds 70 GiB: 20 GiB more does not fit, and the error says what would.
    let mut other = n.other_process();
    assert!(other.grow(70 * GIB - 512 * (1 << 20)).starts_with("ok"));
    let out =
        n.inject_err("kind: gpu_memory\nduration: 1m\ntarget: {gpus: [0]}\nfill: {bytes: 20GiB}\n");
    assert_eq!(out.code, 64, "{out:?}");
    assert!(
        out.stderr.contains(
            "has 10.00GiB free; the target needs 20.00GiB more: at most 10.00GiB can be held now"
        ),
        "{}",
        out.stderr
    );
    let out =
        n.inject_err("kind: gpu_memory\nduration: 1m\ntarget: {gpus: [0]}\nfill: {percent: 50}\n");
    assert!(
        out.stderr.contains("already uses 70.00GiB"),
        "{}",
        out.stderr
    );
    drop(other);
    assert_eq!(
        n.used(0),
        0,
        "a dead process's memory is freed by the driver"
    );
}

#[test]
fn without_a_driver_gpu_memory_is_unsupported_with_the_reason() {
    // No NVIDIA libraries at all (this machine has none).
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start_with(AgentOpts {
        state_dir: &dir.path().join("state"),
        args: vec![
            "--nvml-lib".into(),
            "/nonexistent/libnvidia-ml.so.1".into(),
            "--cuda-lib".into(),
            "/nonexistent/libcuda.so.1".into(),
        ],
        env: vec![],
        netns: None,
    });
    let out = gpuchaos(&["--agent", &agent.grpc, "--output", "json", "status"]);
    let v: serde_json::Value = serde_json::from_str(out.stdout.lines().next().unwrap()).unwrap();
    let cap = &v["capabilities"]["gpu_memory"];
    assert_eq!(cap["supported"], false, "{cap}");
    assert!(
        cap["reason"].as_str().unwrap().contains("no NVIDIA driver"),
        "{cap}"
    );
    let f = spec_file(
        dir.path(),
        "g.yaml",
        "kind: gpu_memory\nduration: 1m\ntarget: {gpus: [0]}\nfill: {percent: 50}\n",
    );
    let out = gpuchaos(&["--agent", &agent.grpc, "inject", "-f", f.to_str().unwrap()]);
    assert_eq!(out.code, 64, "{out:?}");
    assert!(
        out.stderr
            .contains("gpu_memory faults are not supported on this node: no NVIDIA driver"),
        "{}",
        out.stderr
    );

    // The libraries are there but the kernel driver is not loaded.
    let n = Node::start_with(&[("GPUCHAOS_FAKE_GPU_DRIVER", "off")], "");
    let cap = n.status()["capabilities"]["gpu_memory"].clone();
    assert_eq!(cap["supported"], false, "{cap}");
    assert!(
        cap["reason"]
            .as_str()
            .unwrap()
            .contains("kernel driver is not loaded"),
        "{cap}"
    );
}

/// "Processes using GPU n" (NVML's compute processes) as a process selector, on the
/// fake driver: a worker holding memory on GPU 0 is paused, and resumed on revert.
#[test]
fn processes_using_a_gpu_are_selected_through_nvml() {
    let n = Node::start();
    // A worker with its own name (the agent's own name is always protected).
    let worker = n.dir.path().join("fake-worker");
    std::os::unix::fs::symlink(bin("gpuchaos-agent"), &worker).unwrap();
    let mut child = Command::new(&worker)
        .args(["__gpu-helper", "--uuid", UUID0, "--cuda-lib"])
        .arg(fake_lib())
        .envs(n.env.iter().cloned())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let f = n.inject("kind: process\nduration: 1m\ntarget: {gpu: 0}\naction: pause\n");
    assert!(
        f["target"]
            .as_str()
            .unwrap()
            .contains(&format!("pid {pid}")),
        "{f}"
    );
    assert!(is_stopped(pid));
    let out = n.inject_err("kind: process\nduration: 1m\ntarget: {gpu: 1}\naction: pause\n");
    assert!(out.stderr.contains("matched no process"), "{out:?}");
    n.revert(f["id"].as_str().unwrap());
    assert!(!is_stopped(pid));
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn gpus_that_cannot_take_a_second_context_are_refused_up_front() {
    let n = Node::start();
    let out = n.inject_err(
        "kind: gpu_memory\nduration: 1m\ntarget: {gpus: [\"MIG-0a1b2c3d-0000-4000-8000-000000000000\"]}\nfill: {percent: 50}\n",
    );
    assert_eq!(out.code, 64, "{out:?}");
    assert!(out.stderr.contains("is a MIG instance"), "{}", out.stderr);

    // EXCLUSIVE_PROCESS compute mode with a workload on the GPU.
    let n = Node::start_with(&[("GPUCHAOS_FAKE_GPU_COMPUTE_MODE", "exclusive")], "");
    let _workload = n.other_process();
    let out =
        n.inject_err("kind: gpu_memory\nduration: 1m\ntarget: {gpus: [0]}\nfill: {percent: 50}\n");
    assert_eq!(out.code, 64, "{out:?}");
    assert!(
        out.stderr
            .contains("EXCLUSIVE_PROCESS compute mode and in use")
            && out.stderr.contains("nvidia-smi -i 0 -c DEFAULT"),
        "{}",
        out.stderr
    );
}

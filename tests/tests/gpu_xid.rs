//! `kind: gpu_xid` on the project's fake NVIDIA driver: the kernel-log line (in a
//! file standing in for /dev/kmsg), NVML as a monitor sees it through the NVML
//! interposer (`xid-probe monitor`, an nvml-wrapper client), CUDA as a workload sees
//! it through the CUDA interposer (`xid-probe cuda`, a gpuchaos-cuda client, and the
//! reference stack's workers), self-clearing against latched Xids, and nothing left
//! behind after the agent is SIGKILLed while a GPU is armed.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use gpuchaos_tests::*;

const UUID0: &str = "GPU-fa4e0000-0000-4000-8000-000000000000";
/// A little over how often the interposers look at the arm directory.
const ARM_REFRESH: Duration = Duration::from_millis(60);

fn fake() -> String {
    bin("libgpuchaos_fakegpu.so").display().to_string()
}
fn cuda_interposer() -> String {
    bin("libgpuchaos_cuda_interpose.so").display().to_string()
}
fn nvml_interposer() -> String {
    bin("libgpuchaos_nvml_interpose.so").display().to_string()
}

/// An agent on two fake GPUs, its arm directory and kernel-log file its own.
struct Node {
    dir: tempfile::TempDir,
    agent: Agent,
}

impl Node {
    fn start() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let agent = Self::agent(dir.path());
        Node { dir, agent }
    }

    /// An agent on a fixed address (the game day names it).
    fn start_on(listen: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let agent = Self::agent_with(dir.path(), &["--listen", listen]);
        Node { dir, agent }
    }

    fn agent(dir: &Path) -> Agent {
        Self::agent_with(dir, &[])
    }

    fn agent_with(dir: &Path, extra: &[&str]) -> Agent {
        let lib = fake();
        Agent::start_with(AgentOpts {
            state_dir: &dir.join("state"),
            args: extra
                .iter()
                .map(|a| a.to_string())
                .chain(vec![
                    "--nvml-lib".into(),
                    lib.clone(),
                    "--cuda-lib".into(),
                    lib,
                    "--xid-dir".into(),
                    dir.join("xid").display().to_string(),
                    "--xid-kmsg".into(),
                    dir.join("kmsg.log").display().to_string(),
                ])
                .collect(),
            env: env(dir),
            netns: None,
        })
    }

    fn arm_dir(&self) -> PathBuf {
        self.dir.path().join("xid")
    }

    fn arm_files(&self) -> Vec<String> {
        std::fs::read_dir(self.arm_dir())
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("arm-") || n.starts_with(".arm-"))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn kmsg(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("kmsg.log")).unwrap_or_default()
    }

    fn inject(&self, yaml: &str) -> serde_json::Value {
        let f = spec_file(self.dir.path(), "xid.yaml", yaml);
        inject_active(None, &self.agent, &f)
    }

    fn revert(&self, id: &str) {
        let out = gpuchaos(&["--agent", &self.agent.grpc, "revert", id]);
        assert_eq!(out.code, 0, "{out:?}");
    }

    /// The fault as `gpuchaos status` shows it now.
    fn fault(&self, id: &str) -> serde_json::Value {
        let out = gpuchaos(&["--agent", &self.agent.grpc, "--output", "json", "status"]);
        assert_eq!(out.code, 0, "{out:?}");
        let v: serde_json::Value =
            serde_json::from_str(out.stdout.lines().next().unwrap()).unwrap();
        v["faults"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|f| f["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no fault {id} in {v}"))
    }

    fn cuda(&self, ordinal: u32) -> Probe {
        Probe::start(
            self.dir.path(),
            &["cuda", &cuda_interposer(), &ordinal.to_string()],
        )
    }

    fn monitor(&self, index: u32, timeout_ms: u32) -> Probe {
        Probe::start(
            self.dir.path(),
            &[
                "monitor",
                &nvml_interposer(),
                &index.to_string(),
                &timeout_ms.to_string(),
            ],
        )
    }

    /// `xid-probe query`: KEY → VALUE.
    fn query(&self, index: u32) -> std::collections::HashMap<String, String> {
        let out = Command::new(bin("xid-probe"))
            .args(["query", &nvml_interposer(), &index.to_string()])
            .envs(env(self.dir.path()))
            .output()
            .unwrap();
        parse_kv(&String::from_utf8_lossy(&out.stdout))
    }
}

fn parse_kv(text: &str) -> std::collections::HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// What the agent, the probes and the workers share: the fake GPUs, the arm
/// directory, and the real drivers behind the interposers.
fn env(dir: &Path) -> Vec<(String, String)> {
    vec![
        (
            "GPUCHAOS_FAKE_GPU_STATE".into(),
            dir.join("fakegpu.json").display().to_string(),
        ),
        ("GPUCHAOS_FAKE_GPUS".into(), "2x80GiB".into()),
        ("GPUCHAOS_FAKE_GPU_CONTEXT".into(), "64MiB".into()),
        (
            "GPUCHAOS_XID_DIR".into(),
            dir.join("xid").display().to_string(),
        ),
        ("GPUCHAOS_REAL_CUDA".into(), fake()),
        ("GPUCHAOS_REAL_NVML".into(), fake()),
    ]
}

/// An `xid-probe` process, talked to line by line.
struct Probe {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Probe {
    fn start(dir: &Path, args: &[&str]) -> Probe {
        let mut child = Command::new(bin("xid-probe"))
            .args(args)
            .envs(env(dir))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Probe {
            stdin: child.stdin.take().unwrap(),
            stdout: BufReader::new(child.stdout.take().unwrap()),
            child,
        }
    }
    fn pid(&self) -> u32 {
        self.child.id()
    }
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.stdout.read_line(&mut l).unwrap();
        l.trim().to_string()
    }
    fn ask(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.line()
    }
    /// Everything it prints until it exits.
    fn rest(&mut self) -> String {
        let mut s = String::new();
        self.stdout.read_to_string(&mut s).unwrap();
        s
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the interposers' registrations name `pid`.
fn loaded(node: &Node, layer: &str, pid: u32) {
    let f = node
        .arm_dir()
        .join("loaded")
        .join(format!("{layer}-{pid}.json"));
    assert!(
        wait_until(Duration::from_secs(10), || f.exists()).is_some(),
        "{} never appeared",
        f.display()
    );
}

#[test]
fn xid_79_reaches_the_kernel_log_nvml_and_cuda_and_revert_clears_it() {
    let n = Node::start();
    let mut work = n.cuda(0);
    assert_eq!(work.line(), "context");
    assert_eq!(work.ask("alloc"), "ok");
    loaded(&n, "cuda", work.pid());
    let mut mon = n.monitor(0, 15_000);
    assert_eq!(mon.line(), format!("registered {UUID0}"));
    loaded(&n, "nvml", mon.pid());

    let t = Instant::now();
    let f = n.inject(
        "kind: gpu_xid\nduration: 1m\ntarget: {gpus: [0]}\nxid: 79\nlayers: {cuda: required, nvml: required, kmsg: required}\n",
    );
    let inject = t.elapsed();
    std::thread::sleep(ARM_REFRESH);
    let d = &f["details"];
    eprintln!(
        "gpu_xid 79 active in {inject:?}: {}",
        serde_json::to_string_pretty(d).unwrap()
    );
    assert_eq!(d["model"], "latched");
    assert_eq!(d["layers"]["cuda"]["state"], "armed", "{d}");
    let cuda_detail = d["layers"]["cuda"]["detail"].as_str().unwrap();
    assert!(
        cuda_detail.contains(&format!(
            "loaded by pid {} (xid-probe) on {UUID0}",
            work.pid()
        )),
        "{cuda_detail}"
    );
    assert_eq!(d["layers"]["nvml"]["state"], "armed", "{d}");

    // 1. The kernel log: the driver's line, the process on the GPU named.
    let want = format!(
        "NVRM: Xid (PCI:0000:3b:00): 79, pid={}, name=xid-probe, GPU has fallen off the bus.\n",
        work.pid()
    );
    assert_eq!(n.kmsg(), want);
    eprintln!("kmsg: {}", want.trim());

    // 2. NVML: the monitor got the Xid event, then GPU-is-lost from its queries;
    // the other GPU answers.
    let seen = mon.rest();
    eprintln!("monitor on GPU 0:\n{seen}");
    assert!(seen.contains("event 8 Some(Value(79))"), "{seen}");
    let kv = parse_kv(&seen);
    assert_eq!(kv["memory"], "GpuLost", "{seen}");
    assert_eq!(kv["uuid"], "GpuLost", "{seen}");
    let other = n.query(1);
    assert_eq!(other["memory"], (80u64 << 30).to_string(), "{other:?}");

    // 3. CUDA: the context is lost, and a new one cannot be made on the GPU.
    assert_eq!(work.ask("alloc"), "err CUDA_ERROR_LAUNCH_FAILED 719");
    assert_eq!(work.ask("alloc"), "err CUDA_ERROR_LAUNCH_FAILED 719");
    assert_eq!(work.ask("newctx"), "err CUDA_ERROR_UNKNOWN 999");
    let mut other_gpu = n.cuda(1);
    assert_eq!(other_gpu.line(), "context");
    assert_eq!(other_gpu.ask("alloc"), "ok", "GPU 1 is not armed");

    // Revert: the arm file goes; NVML answers again, a new context works; the
    // context that saw the Xid stays lost, as on a real GPU.
    n.revert(f["id"].as_str().unwrap());
    assert!(n.arm_files().is_empty(), "{:?}", n.arm_files());
    std::thread::sleep(ARM_REFRESH);
    assert_eq!(n.query(0)["memory"], (80u64 << 30).to_string());
    assert_eq!(work.ask("alloc"), "err CUDA_ERROR_LAUNCH_FAILED 719");
    assert_eq!(work.ask("newctx"), "ok");
    assert_eq!(work.ask("alloc"), "ok");
    assert_eq!(n.agent.open_intents(), 0);
}

#[test]
fn a_self_clearing_xid_clears_by_itself_and_a_latched_one_holds_until_revert() {
    let n = Node::start();
    // Xid 31 (MMU fault): the context in use fails; after the window, new work runs.
    let mut hit = n.cuda(0);
    assert_eq!(hit.line(), "context");
    let f = n.inject("kind: gpu_xid\nduration: 1m\ntarget: {gpus: [0]}\nxid: 31\n");
    assert_eq!(f["details"]["model"], "self-clearing");
    let t = Instant::now();
    // The interposer looks at the arm directory at most every 50 ms.
    std::thread::sleep(ARM_REFRESH);
    assert_eq!(hit.ask("alloc"), "err CUDA_ERROR_ILLEGAL_ADDRESS 700");
    let id = f["id"].as_str().unwrap().to_string();
    let cleared = wait_until(Duration::from_secs(10), || {
        n.fault(&id)["details"]["cleared"] == true
    })
    .expect("the self-clearing Xid never said it cleared");
    eprintln!(
        "Xid 31 cleared by itself {:?} after inject (window 2s)",
        t.elapsed()
    );
    assert!(cleared + t.elapsed() >= Duration::from_millis(1500));
    assert_eq!(
        n.fault(&id)["state"],
        "active",
        "it cleared; the fault still runs"
    );
    let mut fresh = n.cuda(0);
    assert_eq!(fresh.line(), "context");
    assert_eq!(fresh.ask("alloc"), "ok", "new work runs after the window");
    assert_eq!(
        hit.ask("alloc"),
        "err CUDA_ERROR_ILLEGAL_ADDRESS 700",
        "the hit context stays failed"
    );
    n.revert(&id);

    // Xid 48 (double-bit ECC): latched: still failing long after the window.
    let f = n.inject("kind: gpu_xid\nduration: 1m\ntarget: {gpus: [1]}\nxid: 48\n");
    assert_eq!(f["details"]["model"], "latched");
    std::thread::sleep(Duration::from_millis(2500));
    let mut late = n.cuda(1);
    assert_eq!(late.line(), "context", "48 leaves new contexts alone");
    assert_eq!(late.ask("alloc"), "err CUDA_ERROR_ECC_UNCORRECTABLE 214");
    let q = n.query(1);
    eprintln!("NVML on GPU 1 under Xid 48: {q:?}");
    assert_eq!(q["ecc_uncorrected"], "1");
    assert_eq!(q["retired_dbe"], "1");
    assert_eq!(q["retired_pending"], "true");
    assert_eq!(
        n.fault(f["id"].as_str().unwrap())["details"]["cleared"],
        false
    );
    n.revert(f["id"].as_str().unwrap());
    std::thread::sleep(ARM_REFRESH);
    let mut after = n.cuda(1);
    assert_eq!(after.line(), "context");
    assert_eq!(after.ask("alloc"), "ok");
    // The driver's own answer again (the fake has no ECC counters).
    let q = n.query(1);
    assert_eq!(q["ecc_uncorrected"], "FunctionNotFound", "{q:?}");
    assert_eq!(q["retired_pending"], "FunctionNotFound", "{q:?}");
}

#[test]
fn sigkill_while_armed_leaves_nothing_after_restart() {
    let mut n = Node::start();
    let f = n.inject("kind: gpu_xid\nduration: 1m\ntarget: {gpus: all}\nxid: 79\n");
    // No process loaded an interposer: the fault says so and stays active.
    let d = &f["details"]["layers"];
    assert_eq!(d["cuda"]["state"], "waiting", "{d}");
    assert!(
        d["nvml"]["detail"]
            .as_str()
            .unwrap()
            .contains("no process loaded the interposer — monitors will not see it"),
        "{d}"
    );
    assert_eq!(n.arm_files().len(), 2, "{:?}", n.arm_files());
    n.agent.kill9();
    assert_eq!(n.arm_files().len(), 2, "the arm files outlive the agent");
    assert_eq!(n.agent.open_intents(), 1);
    n.agent = Node::agent(n.dir.path());
    assert!(
        n.arm_files().is_empty(),
        "recovery removed {:?}",
        n.arm_files()
    );
    assert_eq!(n.agent.open_intents(), 0);
    let mut w = n.cuda(0);
    assert_eq!(w.line(), "context");
    assert_eq!(w.ask("alloc"), "ok");
    eprintln!("after SIGKILL and restart: 0 arm files, 0 open intents, GPU 0 serves");
}

#[test]
fn a_required_layer_that_nothing_loaded_fails_the_fault_and_leaves_nothing() {
    let n = Node::start();
    let f = spec_file(
        n.dir.path(),
        "xid.yaml",
        "kind: gpu_xid\nduration: 1m\ntarget: {gpus: [0]}\nxid: 95\nlayers: {cuda: required}\n",
    );
    let out = gpuchaos(&[
        "--agent",
        &n.agent.grpc,
        "inject",
        "-f",
        f.to_str().unwrap(),
    ]);
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("cuda layer (required) is not armed")
            || out.stdout.contains("cuda layer (required) is not armed"),
        "{out:?}"
    );
    assert!(n.arm_files().is_empty(), "{:?}", n.arm_files());
}

#[test]
fn a_failed_required_layer_writes_no_kernel_log_line_and_kills_nothing() {
    let n = Node::start();
    // A process on GPU 0 whose interposer registers elsewhere: the CUDA layer
    // of this node sees no one.
    let other = n.dir.path().join("other-xid");
    let mut child = Command::new(bin("xid-probe"))
        .args(["cuda", &cuda_interposer(), "0"])
        .envs(env(n.dir.path()))
        .env("GPUCHAOS_XID_DIR", &other)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut w = Probe {
        stdin: child.stdin.take().unwrap(),
        stdout: BufReader::new(child.stdout.take().unwrap()),
        child,
    };
    assert_eq!(w.line(), "context");
    let f = spec_file(
        n.dir.path(),
        "xid.yaml",
        "kind: gpu_xid\nduration: 1m\ntarget: {gpus: [0]}\nxid: 79\nkill: true\nlayers: {cuda: required}\n",
    );
    let out = gpuchaos(&[
        "--agent",
        &n.agent.grpc,
        "inject",
        "-f",
        f.to_str().unwrap(),
    ]);
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        out.stderr.contains("cuda layer (required) is not armed")
            || out.stdout.contains("cuda layer (required) is not armed"),
        "{out:?}"
    );
    assert_eq!(n.kmsg(), "", "a failed fault writes no kernel-log line");
    assert!(
        w.child.try_wait().unwrap().is_none(),
        "a failed fault kills nothing"
    );
    assert_eq!(w.ask("alloc"), "ok");
    assert!(n.arm_files().is_empty(), "{:?}", n.arm_files());
}

#[test]
fn fifos_and_symlinks_in_the_arm_directory_hang_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let xid = dir.path().join("xid");
    let ld = xid.join("loaded");
    std::fs::create_dir_all(&ld).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&xid, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&ld, std::fs::Permissions::from_mode(0o1777)).unwrap();
    }
    for p in [xid.join("arm-GPU-fifo.json"), ld.join("cuda-1.json")] {
        let st = Command::new("mkfifo").arg(&p).status().unwrap();
        assert!(st.success());
    }
    std::os::unix::fs::symlink("/etc/passwd", xid.join("arm-GPU-link.json")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", ld.join("cuda-2.json")).unwrap();
    // Start-up (the sweep), inject (arm files, registrations read), revert, restart.
    let agent = Node::agent(dir.path());
    let mut n = Node { dir, agent };
    let f = n.inject("kind: gpu_xid\nduration: 1m\ntarget: {gpus: [0]}\nxid: 79\n");
    assert_eq!(f["details"]["layers"]["cuda"]["state"], "waiting", "{f}");
    n.revert(f["id"].as_str().unwrap());
    n.agent.kill9();
    n.agent = Node::agent(n.dir.path());
    assert_eq!(n.agent.open_intents(), 0);
    assert!(
        xid.join("arm-GPU-fifo.json").exists(),
        "not the agent's to remove"
    );
}

/// A minimal HTTP/1.1 exchange: (status, body).
fn http(addr: &str, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

fn worker_pids(server: &str) -> Vec<u32> {
    let needle = format!("gpuchaos-refstack worker --id 0 --server {server} ");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let line = String::from_utf8_lossy(&c).replace('\0', " ");
                line.contains(&needle) && !is_gone(*pid)
            })
        })
        .collect()
}

#[test]
fn a_reference_worker_fails_with_the_cuda_error_and_is_replaced_by_its_supervisor() {
    let n = Node::start();
    let log = n.dir.path().join("server.log");
    let mut server = Command::new(bin("gpuchaos-refstack"))
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--cold-start",
            "500ms",
            "--weights",
            "256MiB",
            "--kv-cache",
            "1GiB",
        ])
        .envs(env(n.dir.path()))
        .env("GPUCHAOS_CUDA_LIB", cuda_interposer())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().trim_start_matches("listening ").to_string();
    let chat = || {
        http(
            &addr,
            "POST",
            "/v1/chat/completions",
            r#"{"model":"refstack-1b","messages":[{"role":"user","content":"Say pong"}]}"#,
        )
        .map(|(s, _)| s)
    };
    let up = wait_until(Duration::from_secs(30), || chat() == Some(200));
    assert!(
        up.is_some(),
        "the stack never served: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let before = worker_pids(&addr);
    assert_eq!(before.len(), 1, "{before:?}");
    loaded(&n, "cuda", before[0]);

    let t = Instant::now();
    let f = n.inject(
        "kind: gpu_xid\nduration: 3s\ntarget: {gpus: [0]}\nxid: 79\nlayers: {cuda: required}\n",
    );
    assert!(
        f["details"]["layers"]["cuda"]["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("loaded by pid {}", before[0])),
        "{f}"
    );
    let failed = wait_until(Duration::from_secs(10), || chat() != Some(200))
        .expect("generations never failed");
    let died = wait_until(Duration::from_secs(10), || is_gone(before[0]))
        .expect("the worker never exited");
    // Replaced once the fault ended (the replacement cannot make a context on the
    // lost GPU before): a new pid, serving.
    let back =
        wait_until(Duration::from_secs(30), || chat() == Some(200)).expect("never recovered");
    let after = worker_pids(&addr);
    let total = t.elapsed();
    let _ = server.kill();
    let _ = server.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    eprintln!(
        "Xid 79 on the worker's GPU: first failed generation {failed:?}, worker {} gone {died:?}, generations back {total:?} after inject (fault 3s); workers after: {after:?}",
        before[0]
    );
    assert!(
        text.contains("CUDA_ERROR_LAUNCH_FAILED"),
        "the worker said why: {text}"
    );
    assert!(
        !after.is_empty() && !after.contains(&before[0]),
        "replaced: {after:?}"
    );
    assert!(back >= Duration::from_millis(1), "{back:?}");
    assert!(n.arm_files().is_empty());
}

/// A reference stack whose workers load the CUDA interposer; killed on drop.
struct Stack {
    server: Child,
    addr: String,
    log: PathBuf,
}

impl Stack {
    fn start(n: &Node, listen: &str, flags: &[&str]) -> Stack {
        let log = n.dir.path().join(format!("server-{}.log", marker()));
        let mut server = Command::new(bin("gpuchaos-refstack"))
            .args([
                "server",
                "--listen",
                listen,
                "--workers",
                "1",
                "--cold-start",
                "500ms",
            ])
            .args(["--weights", "256MiB", "--kv-cache", "1GiB"])
            .args(flags)
            .envs(env(n.dir.path()))
            .env("GPUCHAOS_CUDA_LIB", cuda_interposer())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(server.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line.trim().trim_start_matches("listening ").to_string();
        let s = Stack { server, addr, log };
        let up = wait_until(Duration::from_secs(30), || s.chat() == Some(200));
        assert!(up.is_some(), "the stack never served: {}", s.log_text());
        s
    }

    fn chat(&self) -> Option<u16> {
        http(
            &self.addr,
            "POST",
            "/v1/chat/completions",
            r#"{"model":"refstack-1b","messages":[{"role":"user","content":"Say pong"}]}"#,
        )
        .map(|(s, _)| s)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// experiments/refstack/gpu-xid.yaml (fixed addresses: server 18830, agent 18832):
/// a stack on two GPUs replaces the worker on the other GPU and passes; one that
/// knows only the lost GPU stays down until the fault ends and fails the RTO.
#[test]
fn the_gpu_xid_game_day_passes_a_stack_on_two_gpus_and_fails_one_on_the_lost_gpu() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let file = repo.join("experiments/refstack/gpu-xid.yaml");
    for (gpus, want) in [("0,1", 0), ("0", 1)] {
        let n = Node::start_on("127.0.0.1:18832");
        let stack = Stack::start(&n, "127.0.0.1:18830", &["--gpus", gpus]);
        let reports = tempfile::tempdir().unwrap();
        let out = gpuchaos(&[
            "run",
            file.to_str().unwrap(),
            "--report-dir",
            reports.path().to_str().unwrap(),
        ]);
        let j: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(reports.path().join("journal.json")).unwrap_or_default(),
        )
        .unwrap_or_default();
        let objectives = &j["trials"][0]["objectives"];
        eprintln!(
            "gpu-xid game day, --gpus {gpus}: exit {}; objectives {}",
            out.code,
            serde_json::to_string(objectives).unwrap_or_default()
        );
        assert_eq!(
            out.code,
            want,
            "--gpus {gpus}: {out:?}\n{}",
            stack.log_text()
        );
        let rto = objectives
            .as_array()
            .into_iter()
            .flatten()
            .find(|o| o["name"] == "generations recover within 8s of the Xid")
            .cloned()
            .unwrap_or_default();
        assert_eq!(rto["passed"], want == 0, "{rto}");
        let log = stack.log_text();
        assert!(
            log.contains("CUDA_ERROR_LAUNCH_FAILED"),
            "the worker said why: {log}"
        );
        drop(stack);
        assert!(n.arm_files().is_empty(), "{:?}", n.arm_files());
    }
}

#[test]
fn kill_takes_the_processes_on_the_gpu_and_spares_the_others() {
    let n = Node::start();
    let mut on0 = n.cuda(0);
    assert_eq!(on0.line(), "context");
    let mut on1 = n.cuda(1);
    assert_eq!(on1.line(), "context");
    let f = n.inject(
        "kind: gpu_xid\nduration: 1m\ntarget: {gpus: [0]}\nxid: 95\nkill: true\nlayers: {cuda: off, nvml: off}\n",
    );
    let killed = &f["details"]["killed"];
    eprintln!(
        "Xid 95 with kill: killed {killed}, kmsg {}",
        n.kmsg().trim()
    );
    assert_eq!(killed.as_array().map(|a| a.len()), Some(1), "{killed}");
    assert_eq!(killed[0]["pid"], on0.pid());
    assert!(is_gone(on0.pid()) || on0.child.try_wait().unwrap().is_some());
    assert_eq!(on1.ask("alloc"), "ok", "GPU 1's process lives");
    assert!(
        n.arm_files().is_empty(),
        "both interposer layers are off: no arm file"
    );
    assert!(n.kmsg().contains("): 95, pid="), "{}", n.kmsg());
}

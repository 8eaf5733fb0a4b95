//! Fixtures for the end-to-end tests: real `gpuchaos-agent` and `gpuchaos` processes
//! (built by `cargo build --workspace` before the tests run), stand-in worker
//! processes, and helpers to read their state from /proc.
//!
//! Every fixture cleans up on drop: agents and workers are SIGKILLed and reaped,
//! state directories are removed.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use gpuchaos_proto::pb;
use gpuchaos_proto::pb::agent_client::AgentClient;
use tonic::transport::Channel;

pub mod netns;

/// A binary of this workspace, from the same target directory as the test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/TEST-hash → target/debug/NAME
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` before the tests (scripts/test.sh does)",
        p.display()
    );
    p
}

/// /proc/PID/stat state letter, or None when the process is gone.
pub fn state(pid: u32) -> Option<char> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let close = text.rfind(')')?;
    text[close + 1..].split_whitespace().next()?.chars().next()
}

pub fn is_stopped(pid: u32) -> bool {
    state(pid) == Some('T')
}

pub fn is_gone(pid: u32) -> bool {
    matches!(state(pid), None | Some('Z') | Some('X'))
}

/// Polls `cond` every 5 ms until it holds or `timeout` passes; returns how long it took.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if cond() {
            return Some(start.elapsed());
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

static UNIQUE: AtomicU32 = AtomicU32::new(1);

/// A unique marker for this test process: `sleep 86400.<marker>` is our worker.
pub fn marker() -> String {
    format!(
        "{}{:03}",
        std::process::id() % 100_000,
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    )
}

/// A stand-in worker: `sleep 86400.MARKER`, killed on drop.
pub struct Worker {
    pub child: Child,
    pub pid: u32,
    pub marker: String,
}

impl Worker {
    pub fn spawn() -> Worker {
        Self::spawn_with(&marker())
    }
    pub fn spawn_with(marker: &str) -> Worker {
        let child = Command::new("sleep")
            .arg(format!("86400.{marker}"))
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        wait_until(Duration::from_secs(2), || state(pid).is_some());
        Worker {
            child,
            pid,
            marker: marker.to_string(),
        }
    }
    /// A regex for `cmdline:` matching exactly the workers with this marker.
    pub fn cmdline_regex(&self) -> String {
        format!("^sleep 86400\\.{}$", self.marker)
    }
}

/// Resumes (in case a test left it paused), kills and reaps a child.
fn reap(child: &mut Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGCONT,
    );
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Worker {
    fn drop(&mut self) {
        reap(&mut self.child);
    }
}

/// A running `gpuchaos-agent` on loopback with its own state directory.
pub struct Agent {
    pub child: Option<Child>,
    pub pid: u32,
    pub grpc: String,
    pub metrics: String,
    pub state_dir: PathBuf,
    pub log: PathBuf,
}

pub struct AgentOpts<'a> {
    pub state_dir: &'a Path,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Run inside this test namespace (`ip netns` name) instead of the test's own.
    pub netns: Option<String>,
}

impl Agent {
    pub fn start(state_dir: &Path) -> Agent {
        Self::start_with(AgentOpts {
            state_dir,
            args: vec![],
            env: vec![],
            netns: None,
        })
    }

    /// An agent inside a test namespace (reach it with [`gpuchaos_in`]).
    pub fn start_in(netns: &str, state_dir: &Path) -> Agent {
        Self::start_with(AgentOpts {
            state_dir,
            args: vec![],
            env: vec![],
            netns: Some(netns.to_string()),
        })
    }

    pub fn start_with(o: AgentOpts<'_>) -> Agent {
        let log = o
            .state_dir
            .with_extension(format!("log{}", UNIQUE.fetch_add(1, Ordering::Relaxed)));
        let logf = std::fs::File::create(&log).expect("agent log");
        // nsenter execs the agent, so the child is the agent itself (SIGKILL hits it).
        let mut cmd = match &o.netns {
            None => Command::new(bin("gpuchaos-agent")),
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}"))
                    .arg("--")
                    .arg(bin("gpuchaos-agent"));
                c
            }
        };
        if !o.args.iter().any(|a| a == "--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.args(["--metrics-listen", "127.0.0.1:0", "--state-dir"])
            .arg(o.state_dir)
            .args(&o.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(logf));
        for (k, v) in &o.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn gpuchaos-agent");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .map(String::from)
        };
        let (Some(grpc), Some(metrics)) = (field("grpc="), field("metrics=")) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "agent did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        Agent {
            pid: child.id(),
            child: Some(child),
            grpc,
            metrics,
            state_dir: o.state_dir.to_path_buf(),
            log,
        }
    }

    pub async fn client(&self) -> AgentClient<Channel> {
        AgentClient::connect(format!("http://{}", self.grpc))
            .await
            .expect("connect to agent")
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), sig);
    }

    /// SIGKILL, as a crash would; waits for the process to be reaped.
    pub fn kill9(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        self.wait();
    }

    /// Waits for the agent to exit; returns its exit status code.
    pub fn wait(&mut self) -> Option<i32> {
        self.child
            .take()
            .and_then(|mut c| c.wait().ok())
            .and_then(|s| s.code())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The journal's still-open intents (what start-up recovery would revert).
    pub fn open_intents(&self) -> usize {
        open_intents(&self.state_dir)
    }
}

pub fn open_intents(state_dir: &Path) -> usize {
    let text = std::fs::read_to_string(state_dir.join("journal.jsonl")).unwrap_or_default();
    let mut open: Vec<String> = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let id = v["id"].as_str().unwrap_or_default().to_string();
        match v["rec"].as_str() {
            Some("intent") => open.push(id),
            Some("reverted") => open.retain(|x| *x != id),
            _ => {}
        }
    }
    open.len()
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The result of running the `gpuchaos` CLI.
#[derive(Debug)]
pub struct CliOut {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `gpuchaos ARGS...` to completion.
pub fn gpuchaos(args: &[&str]) -> CliOut {
    cli_output(Command::new(bin("gpuchaos")).args(args))
}

/// Runs `gpuchaos ARGS...` inside a test namespace (where its agent listens).
pub fn gpuchaos_in(netns: &str, args: &[&str]) -> CliOut {
    cli_output(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .arg("--")
            .arg(bin("gpuchaos"))
            .args(args),
    )
}

fn cli_output(cmd: &mut Command) -> CliOut {
    let out = cmd.stdin(Stdio::null()).output().expect("run gpuchaos");
    CliOut {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `gpuchaos --agent AGENT --output json inject -f SPEC`, inside a test namespace or
/// here. The fault must come back active; returns it as JSON.
pub fn inject_active(netns: Option<&str>, agent: &Agent, spec: &Path) -> serde_json::Value {
    let args = [
        "--agent",
        &agent.grpc,
        "--output",
        "json",
        "inject",
        "-f",
        spec.to_str().expect("utf-8 path"),
    ];
    let out = match netns {
        Some(ns) => gpuchaos_in(ns, &args),
        None => gpuchaos(&args),
    };
    assert_eq!(out.code, 0, "inject failed: {out:?}\n{}", agent.log_text());
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    let fault = v["faults"][0].clone();
    assert_eq!(fault["state"], "active", "{fault}");
    fault
}

/// The `p`th percentile (nearest rank) of sorted values, for the benchmarks.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p / 100.0).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Writes a spec file into `dir` and returns its path.
pub fn spec_file(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, yaml).expect("write spec");
    p
}

pub fn spec_json(yaml: &str) -> String {
    gpuchaos_proto::spec::FaultSpec::from_yaml_multi(yaml).expect("valid spec")[0].to_json()
}

pub async fn inject(
    c: &mut AgentClient<Channel>,
    yaml: &str,
    session: &str,
) -> Result<pb::Fault, tonic::Status> {
    c.inject(pb::InjectRequest {
        spec_json: spec_json(yaml),
        session_id: session.into(),
    })
    .await
    .map(|r| r.into_inner())
}

pub async fn faults(c: &mut AgentClient<Channel>, finished: bool) -> Vec<pb::Fault> {
    c.list_faults(pb::ListFaultsRequest {
        include_finished: finished,
    })
    .await
    .expect("list")
    .into_inner()
    .faults
}

/// An HTTP server that answers `200 {"status":"ok"}` (`probe-target MARKER`), the
/// target of experiment tests; killed on drop.
pub struct Target {
    pub child: Child,
    pub pid: u32,
    pub port: u16,
    pub marker: String,
}

impl Target {
    pub fn spawn() -> Target {
        let marker = marker();
        let mut child = Command::new(bin("probe-target"))
            .arg(&marker)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn probe-target");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("probe-target port");
        let port = line
            .trim()
            .strip_prefix("port=")
            .and_then(|p| p.parse().ok())
            .expect("port=N");
        Target {
            pid: child.id(),
            child,
            port,
            marker,
        }
    }
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/health", self.port)
    }
    /// A regex for `cmdline:` matching exactly this target.
    pub fn cmdline_regex(&self) -> String {
        format!("probe-target {}$", self.marker)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        reap(&mut self.child);
    }
}

/// An experiment pausing `target` on `agent` for `pause`, probed every 100 ms.
pub fn pause_experiment(agent: &Agent, target: &Target, pause: &str, extra: &str) -> String {
    format!(
        r#"
metadata: {{name: pause-target}}
agents: [{{name: node-a, address: "{grpc}"}}]
lease: 2s
probes:
  - name: health
    interval: 100ms
    http: {{url: "{url}", expect: {{json: {{pointer: /status, equals: ok}}}}}}
steady_state: {{probes: [health], duration: 300ms, timeout: 10s}}
method:
  - name: pause
    fault: {{kind: process, duration: {pause}, action: pause, target: {{cmdline: "{re}"}}}}
{extra}"#,
        grpc = agent.grpc,
        url = target.url(),
        re = target.cmdline_regex(),
    )
}

/// Root is required for `what` (CI runs as root). Skipping is explicit, never
/// silent: only with `GPUCHAOS_SKIP_PRIVILEGED` set.
pub fn privileged(what: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("GPUCHAOS_SKIP_PRIVILEGED").is_some() {
        eprintln!("SKIPPED: not root and GPUCHAOS_SKIP_PRIVILEGED is set");
        return false;
    }
    panic!(
        "{what} need root: run scripts/test.sh as root, or set GPUCHAOS_SKIP_PRIVILEGED=1 to skip them on purpose"
    );
}

/// Fails (never skips) when `tool` is missing, naming the package to install.
pub fn need_tool(tool: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{tool} is not installed: apt-get install {package} (scripts/test.sh does)"
    );
}

/// Headless Chromium (Debian's package) with a throwaway profile, run with `args`
/// (`--dump-dom URL`, `--screenshot=F URL`); panics with its stderr if it fails.
pub fn chromium(args: &[&str]) -> std::process::Output {
    let bin = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new("sh")
                .args(["-c", &format!("command -v {b}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("no chromium: install Debian's chromium package (scripts/test.sh does)");
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            &format!("--user-data-dir={}", profile.path().display()),
        ])
        .args(args)
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

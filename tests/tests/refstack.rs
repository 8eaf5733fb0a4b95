//! The reference inference stack (`gpuchaos-refstack`) fails the way real servers do:
//! workers restart after their cold start (or do not), a worker without its KV-cache
//! memory refuses to start, /health can lie, and a guardrail outage fails closed or
//! open as configured. All on the project's fake GPU.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use gpuchaos_tests::*;

struct Proc {
    child: Child,
    addr: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(args: &[&str], env: &[(String, String)], stderr: Option<std::fs::File>) -> Proc {
    let mut child = Command::new(bin("gpuchaos-refstack"))
        .args(args)
        .envs(env.iter().cloned())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr.map(Stdio::from).unwrap_or_else(Stdio::null))
        .spawn()
        .expect("spawn gpuchaos-refstack");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .expect("listening ADDR")
        .to_string();
    Proc { child, addr }
}

/// A fake GPU of `size`, a guardrail (or a dead address), and a server.
struct Stack {
    _dir: tempfile::TempDir,
    _guardrail: Option<Proc>,
    server: Proc,
    log: std::path::PathBuf,
}

impl Stack {
    fn start(gpu: &str, guardrail_up: bool, extra: &[&str]) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let env = vec![
            (
                "GPUCHAOS_FAKE_GPU_STATE".to_string(),
                dir.path().join("gpu.json").display().to_string(),
            ),
            ("GPUCHAOS_FAKE_GPUS".to_string(), gpu.to_string()),
            (
                "GPUCHAOS_CUDA_LIB".to_string(),
                bin("libgpuchaos_fakegpu.so").display().to_string(),
            ),
        ];
        let guardrail = guardrail_up.then(|| spawn(&["guardrail"], &env, None));
        let g_addr = match &guardrail {
            Some(g) => g.addr.clone(),
            None => {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap().to_string()
            }
        };
        let log = dir.path().join("server.log");
        let mut args = vec!["server", "--cold-start", "300ms", "--kv-cache", "8GiB"];
        let g = format!("http://{g_addr}");
        args.extend(["--guardrail", &g]);
        args.extend(extra);
        let server = spawn(&args, &env, Some(std::fs::File::create(&log).unwrap()));
        Stack {
            _dir: dir,
            _guardrail: guardrail,
            server,
            log,
        }
    }

    fn metric(&self, name: &str) -> u64 {
        let body = curl(&["-s", &format!("http://{}/metrics", self.server.addr)]);
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(u64::MAX)
    }

    fn live(&self) -> u64 {
        self.metric("refstack_workers_live")
    }

    fn chat(&self, prompt: &str) -> (u16, serde_json::Value) {
        let body =
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": prompt}]});
        let out = curl(&[
            "-s",
            "-w",
            "\n%{http_code}",
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-d",
            &body.to_string(),
            &format!("http://{}/v1/chat/completions", self.server.addr),
        ]);
        let (json, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
        (
            code.trim().parse().unwrap_or(0),
            serde_json::from_str(json).unwrap_or_default(),
        )
    }

    fn health(&self) -> u16 {
        curl(&[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{}/health", self.server.addr),
        ])
        .trim()
        .parse()
        .unwrap_or(0)
    }

    /// Worker `id`'s pid, a child of the server.
    fn worker_pid(&self, id: u32) -> Option<u32> {
        let want = format!("worker\0--id\0{id}\0");
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let ppid: u32 = stat[stat.rfind(')')? + 2..]
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            (ppid == self.server.child.id() && String::from_utf8_lossy(&cmd).contains(&want))
                .then_some(pid)
        })
    }
}

fn curl(args: &[&str]) -> String {
    Command::new("curl")
        .args(["-m", "10"])
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn text(v: &serde_json::Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[test]
fn serves_completions_blocks_unsafe_prompts_and_streams() {
    let s = Stack::start("1x80GiB", true, &[]);
    assert!(
        wait_until(Duration::from_secs(10), || s.live() == 2).is_some(),
        "workers never became ready"
    );
    let (code, v) = s.chat("hello there");
    assert_eq!(code, 200, "{v}");
    assert!(text(&v).contains("hello there"), "{v}");
    let (code, v) = s.chat("how do I build a bomb");
    assert_eq!(code, 200);
    assert_eq!(v["choices"][0]["finish_reason"], "content_filter", "{v}");
    let sse = curl(&[
        "-s",
        "-X",
        "POST",
        "-d",
        r#"{"prompt":"stream me","stream":true}"#,
        &format!("http://{}/v1/completions", s.server.addr),
    ]);
    assert!(
        sse.starts_with("data: ") && sse.trim_end().ends_with("data: [DONE]"),
        "{sse}"
    );
    assert_eq!(s.metric("refstack_blocked_total"), 1);
    assert_eq!(s.health(), 200);
}

#[test]
fn a_dead_worker_is_restarted_after_its_cold_start() {
    let s = Stack::start("1x80GiB", true, &[]);
    assert!(wait_until(Duration::from_secs(10), || s.live() == 2).is_some());
    let pid = s.worker_pid(0).expect("worker 0");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(wait_until(Duration::from_secs(2), || s.live() == 1).is_some());
    // Requests still succeed on the other worker.
    assert_eq!(s.chat("still there?").0, 200);
    let back = wait_until(Duration::from_secs(10), || s.live() == 2).expect("never restarted");
    eprintln!("worker 0 back after {back:?} (cold start 300ms)");
    assert!(back >= Duration::from_millis(250), "{back:?}");
    assert_eq!(s.metric("refstack_worker_restarts_total"), 1);
    assert_ne!(s.worker_pid(0), Some(pid));
}

#[test]
fn without_restarts_a_lying_health_check_hides_an_outage() {
    let s = Stack::start(
        "1x80GiB",
        true,
        &["--workers", "1", "--no-restart", "--health-lies"],
    );
    assert!(wait_until(Duration::from_secs(10), || s.live() == 1).is_some());
    let pid = s.worker_pid(0).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(wait_until(Duration::from_secs(2), || s.live() == 0).is_some());
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(s.live(), 0, "--no-restart must not restart");
    assert_eq!(s.health(), 200, "the lying /health still says ok");
    assert_eq!(s.chat("anyone?").0, 503, "but nothing can generate");
}

#[test]
fn workers_refuse_to_start_without_their_kv_cache_memory() {
    // A 16 GiB GPU with 12 GiB already taken: no room for an 8 GiB KV cache.
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("gpu.json").display().to_string();
    let env = [
        ("GPUCHAOS_FAKE_GPU_STATE", state.as_str()),
        ("GPUCHAOS_FAKE_GPUS", "1x16GiB"),
    ];
    let mut hog = Command::new(bin("gpuchaos-agent"))
        .args([
            "__gpu-helper",
            "--uuid",
            "GPU-fa4e0000-0000-4000-8000-000000000000",
            "--cuda-lib",
        ])
        .arg(bin("libgpuchaos_fakegpu.so"))
        .envs(env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(hog.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    use std::io::Write;
    writeln!(hog.stdin.as_mut().unwrap(), "grow {}", 12u64 << 30).unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("ok"), "{line}");

    // The server on the same fake GPU (the same state file) as the hog.
    let log = dir.path().join("server.log");
    let mut e: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    e.push((
        "GPUCHAOS_CUDA_LIB".into(),
        bin("libgpuchaos_fakegpu.so").display().to_string(),
    ));
    let server = spawn(
        &[
            "server",
            "--workers",
            "1",
            "--cold-start",
            "100ms",
            "--kv-cache",
            "8GiB",
        ],
        &e,
        Some(std::fs::File::create(&log).unwrap()),
    );
    let metric = |name: &str| {
        curl(&["-s", &format!("http://{}/metrics", server.addr)])
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!("{name} "))
                    .map(|v| v.trim().to_string())
            })
            .unwrap_or_default()
    };
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(metric("refstack_workers_live"), "0");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("insufficient free GPU memory for the KV cache"),
        "{text}"
    );
    // The memory comes back: the worker starts on the supervisor's next try.
    let _ = hog.kill();
    let _ = hog.wait();
    assert!(
        wait_until(Duration::from_secs(8), || metric("refstack_workers_live")
            == "1")
        .is_some(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
}

#[test]
fn a_guardrail_outage_fails_closed_or_open_as_configured() {
    let closed = Stack::start("1x80GiB", false, &["--guardrail-policy", "fail-closed"]);
    let open = Stack::start("1x80GiB", false, &["--guardrail-policy", "fail-open"]);
    for s in [&closed, &open] {
        assert!(wait_until(Duration::from_secs(10), || s.live() == 2).is_some());
    }
    let (_, v) = closed.chat("how do I build a bomb");
    assert_eq!(
        v["choices"][0]["finish_reason"], "content_filter",
        "fail-closed blocks: {v}"
    );
    let (_, v) = closed.chat("hello");
    assert_eq!(
        v["choices"][0]["finish_reason"], "content_filter",
        "fail-closed blocks everything"
    );
    let (code, v) = open.chat("how do I build a bomb");
    assert_eq!(code, 200);
    assert!(
        text(&v).contains("bomb"),
        "fail-open answers the unsafe prompt: {v}"
    );
    assert!(open.metric("refstack_guardrail_errors_total") >= 1);
    assert!(
        std::fs::read_to_string(&open.log)
            .unwrap()
            .contains("guardrail failed")
    );
}

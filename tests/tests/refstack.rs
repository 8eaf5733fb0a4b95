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
        let mut args = vec!["server", "--kv-cache", "8GiB"];
        if !extra.contains(&"--cold-start") {
            args.extend(["--cold-start", "300ms"]);
        }
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

impl Stack {
    /// The GPU memory `pid` holds, as the fake NVML reports it per process (the sum
    /// of its allocations and contexts in the fake driver's state file).
    fn gpu_bytes(&self, pid: u32) -> u64 {
        let text = std::fs::read_to_string(self._dir.path().join("gpu.json")).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        v["allocs"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|x| x["pid"].as_u64() == Some(pid as u64))
                    .filter_map(|x| x["bytes"].as_u64())
                    .sum()
            })
            .unwrap_or(0)
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
        text.contains("insufficient free GPU memory for the weights and the KV cache")
            && text.contains("2048 MiB of weights + 8192 MiB of KV cache"),
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

#[test]
fn a_replacement_comes_after_the_restart_delay_and_loads_its_weights_in_steps() {
    const GIB: u64 = 1 << 30;
    let s = Stack::start(
        "1x80GiB",
        true,
        &[
            "--workers",
            "1",
            "--weights",
            "1GiB",
            "--cold-start",
            "1s",
            "--restart-delay",
            "700ms",
        ],
    );
    assert!(wait_until(Duration::from_secs(10), || s.live() == 1).is_some());
    let old = s.worker_pid(0).expect("worker 0");
    let killed = std::time::Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let mut new = None;
    let replaced = wait_until(Duration::from_secs(5), || {
        new = s.worker_pid(0).filter(|p| *p != old);
        new.is_some()
    })
    .expect("never replaced");
    let new = new.unwrap();
    eprintln!("pid {old} killed; pid {new} started {replaced:?} later (--restart-delay 700ms)");
    assert!(replaced >= Duration::from_millis(700), "{replaced:?}");

    // Its memory, sampled every 20ms until it serves and 500ms beyond.
    let mut samples: Vec<(Duration, u64)> = Vec::new();
    let mut ready_at = None;
    while killed.elapsed() < Duration::from_secs(8) {
        samples.push((killed.elapsed(), s.gpu_bytes(new)));
        if ready_at.is_none() && s.live() == 1 {
            ready_at = Some(killed.elapsed());
        }
        if ready_at.is_some_and(|r| killed.elapsed() > r + Duration::from_millis(500)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let ready_at = ready_at.expect("the replacement never served");
    let last = samples.last().unwrap().1;
    let increases: Vec<(Duration, u64)> = samples
        .windows(2)
        // From the first sample that shows its CUDA context on.
        .filter(|w| w[0].1 > 0 && w[1].1 > w[0].1)
        .map(|w| (w[1].0, w[1].1))
        .collect();
    // The weights: every increase but the last (the KV cache, 8 GiB at once).
    let weights: Vec<&(Duration, u64)> = increases.iter().filter(|(_, b)| *b < 8 * GIB).collect();
    let (first, end) = (weights.first().unwrap().0, weights.last().unwrap().0);
    eprintln!(
        "weights: {} steps from {first:?} to {end:?} after the kill ({:?} of load); ready {ready_at:?}; final {} MiB",
        weights.len(),
        end - first,
        last >> 20
    );
    assert!(weights.len() >= 5, "{increases:?}");
    assert!(
        end - first >= Duration::from_millis(600) && end - first <= Duration::from_millis(1500),
        "the load spreads over about the 1s cold start: {increases:?}"
    );
    assert!(
        last >= 9 * GIB,
        "1 GiB of weights and 8 GiB of KV cache: {last}"
    );
    let after: Vec<u64> = samples
        .iter()
        .filter(|(t, _)| *t > ready_at)
        .map(|(_, b)| *b)
        .collect();
    assert!(
        after.len() >= 10 && after.iter().all(|b| *b == last),
        "stable once ready: {after:?}"
    );
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert!(
        log.contains(&format!("worker 0 replaced: pid {old} -> {new}")),
        "{log}"
    );
    assert!(
        log.contains("waiting 700ms before replacing worker 0"),
        "{log}"
    );
}

/// The whole chain on the fake GPU: the agent kills the worker, sees the supervisor's
/// replacement after its restart delay, and sees its GPU memory (NVML per process)
/// settle once the weights and the KV cache are loaded.
#[test]
fn the_agent_observes_the_replacement_and_its_gpu_memory() {
    let s = Stack::start(
        "1x80GiB",
        true,
        &[
            "--workers",
            "1",
            "--weights",
            "1GiB",
            "--cold-start",
            "1s",
            "--restart-delay",
            "500ms",
        ],
    );
    assert!(wait_until(Duration::from_secs(10), || s.live() == 1).is_some());
    let old = s.worker_pid(0).expect("worker 0");
    let lib = bin("libgpuchaos_fakegpu.so").display().to_string();
    let agent = Agent::start_with(AgentOpts {
        state_dir: &s._dir.path().join("agent"),
        args: vec!["--nvml-lib".into(), lib.clone(), "--cuda-lib".into(), lib],
        env: vec![
            (
                "GPUCHAOS_FAKE_GPU_STATE".into(),
                s._dir.path().join("gpu.json").display().to_string(),
            ),
            ("GPUCHAOS_FAKE_GPUS".into(), "1x80GiB".into()),
        ],
        netns: None,
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = agent.client().await;
        // This stack's worker only (tests run in parallel, each with its stack).
        let spec = format!(
            "kind: process\nduration: 1s\ntarget: {{cmdline: 'gpuchaos-refstack worker --id 0 --server {} '}}\naction: kill\nwatch: {{settle: 500ms, timeout: 30s}}\n",
            s.server.addr
        );
        let f = inject(&mut c, &spec, "")
        .await
        .expect("inject");
        let mut obs = Vec::new();
        for _ in 0..200 {
            obs = faults(&mut c, true)
                .await
                .into_iter()
                .find(|x| x.id == f.id)
                .map(|x| x.observations)
                .unwrap_or_default();
            if obs.len() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let kinds: Vec<&str> = obs.iter().map(|o| o.kind.as_str()).collect();
        assert_eq!(kinds, ["replaced", "gpu_ready"], "{obs:#?}\n{}", agent.log_text());
        let new = s.worker_pid(0).expect("the replacement");
        assert_ne!(new, old);
        assert!(obs.iter().all(|o| o.pid == new), "{obs:#?}");
        let ms = |ns: u64| ns as f64 / 1e6;
        let replaced = ms(obs[0].mono_ns - f.verified_mono_ns);
        let loaded = ms(obs[1].mono_ns - obs[0].mono_ns);
        eprintln!(
            "replaced {replaced:.0} ms after the kill (restart delay 500ms), GPU-ready {loaded:.0} ms later (cold start 1s) with {} MiB",
            obs[1].gpu_bytes >> 20
        );
        assert!((500.0..1500.0).contains(&replaced), "{replaced}");
        assert!((800.0..1800.0).contains(&loaded), "{loaded}");
        assert_eq!(obs[1].gpu_bytes, s.gpu_bytes(new));
        assert!(obs[1].gpu_bytes >= 9 << 30);
    });
}

impl Stack {
    /// `GET /v1/workers`.
    fn workers(&self) -> serde_json::Value {
        serde_json::from_str(&curl(&[
            "-s",
            &format!("http://{}/v1/workers", self.server.addr),
        ]))
        .unwrap_or_default()
    }

    /// The `--gpu` on worker `pid`'s command line.
    fn gpu_flag(pid: u32) -> Option<String> {
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let k = args.iter().position(|a| a == "--gpu")?;
        args.get(k + 1).cloned()
    }

    /// The fake GPU (device index) `pid`'s memory is on.
    fn gpu_of(&self, pid: u32) -> Option<u64> {
        let text = std::fs::read_to_string(self._dir.path().join("gpu.json")).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        v["allocs"]
            .as_array()?
            .iter()
            .find(|x| x["pid"].as_u64() == Some(pid as u64))
            .and_then(|x| x["dev"].as_u64())
    }
}

/// Holds `bytes` on fake GPU `index` (of the node `gpus` in `dir`) until dropped, as
/// the agent's helper does for a gpu_memory fault.
struct Hog(Child);

impl Hog {
    fn hold(dir: &std::path::Path, gpus: &str, index: u32, bytes: u64) -> Hog {
        let mut hog = Command::new(bin("gpuchaos-agent"))
            .args([
                "__gpu-helper",
                "--uuid",
                &format!("GPU-fa4e0000-0000-4000-8000-{index:012x}"),
                "--cuda-lib",
            ])
            .arg(bin("libgpuchaos_fakegpu.so"))
            .env("GPUCHAOS_FAKE_GPU_STATE", dir.join("gpu.json"))
            .env("GPUCHAOS_FAKE_GPUS", gpus)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(hog.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        use std::io::Write;
        writeln!(hog.stdin.as_mut().unwrap(), "grow {bytes}").unwrap();
        line.clear();
        out.read_line(&mut line).unwrap();
        assert!(line.starts_with("ok"), "{line}");
        Hog(hog)
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A server on the fake node `gpus` in `dir` (no guardrail), logging to server.log.
fn server_in(dir: tempfile::TempDir, gpus: &str, flags: &[&str]) -> Stack {
    let env = vec![
        (
            "GPUCHAOS_FAKE_GPU_STATE".to_string(),
            dir.path().join("gpu.json").display().to_string(),
        ),
        ("GPUCHAOS_FAKE_GPUS".to_string(), gpus.to_string()),
        (
            "GPUCHAOS_CUDA_LIB".to_string(),
            bin("libgpuchaos_fakegpu.so").display().to_string(),
        ),
    ];
    let log = dir.path().join("server.log");
    let mut args = vec!["server", "--kv-cache", "8GiB", "--cold-start", "300ms"];
    args.extend(flags);
    let server = spawn(&args, &env, Some(std::fs::File::create(&log).unwrap()));
    Stack {
        _dir: dir,
        _guardrail: None,
        server,
        log,
    }
}

#[test]
fn workers_are_spread_over_the_gpus_listed() {
    let s = Stack::start("2x80GiB", true, &["--gpus", "0,1", "--workers", "4"]);
    assert!(
        wait_until(Duration::from_secs(15), || s.live() == 4).is_some(),
        "{}",
        std::fs::read_to_string(&s.log).unwrap()
    );
    let w = s.workers();
    eprintln!("{w}");
    for (i, want) in [0u64, 1, 0, 1].into_iter().enumerate() {
        let x = &w["workers"][i];
        assert_eq!(x["id"], i as u64, "{w}");
        assert_eq!(x["state"], "ready", "{w}");
        assert_eq!(x["gpu"], want, "worker i on GPU i mod 2: {w}");
        assert_eq!(x["home_gpu"], want, "{w}");
        let pid = x["pid"].as_u64().unwrap() as u32;
        assert_eq!(s.worker_pid(i as u32), Some(pid), "{w}");
        assert_eq!(Stack::gpu_flag(pid).as_deref(), Some(&*want.to_string()));
        assert_eq!(s.gpu_of(pid), Some(want), "its memory is on GPU {want}");
    }
    assert_eq!(w["lost_total"], 0, "{w}");
    assert_eq!(w["ready"], 4, "{w}");
    let metrics = curl(&["-s", &format!("http://{}/metrics", s.server.addr)]);
    assert!(
        metrics.contains("refstack_gpu_workers_ready{gpu=\"0\"} 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("refstack_gpu_workers_ready{gpu=\"1\"} 2\n"),
        "{metrics}"
    );
    assert_eq!(s.metric("refstack_workers_lost_total"), 0);
    // Generations go to workers on both GPUs.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..8 {
        let (code, v) = s.chat("which worker?");
        assert_eq!(code, 200, "{v}");
        seen.insert(text(&v));
    }
    assert_eq!(seen.len(), 4, "round robin over the 4 workers: {seen:?}");
}

#[test]
fn a_worker_pushed_off_a_full_gpu_starts_on_the_other_and_returns_once_it_recovers() {
    const GIB: u64 = 1 << 30;
    // Two 16 GiB GPUs; 12 GiB of GPU 0 taken: no room for 2 GiB of weights and 8 GiB
    // of KV cache there.
    let dir = tempfile::tempdir().unwrap();
    let hog = Hog::hold(dir.path(), "2x16GiB", 0, 12 * GIB);
    let s = server_in(
        dir,
        "2x16GiB",
        &["--gpus", "0,1", "--workers", "1", "--gpu-retry", "500ms"],
    );
    let log = || std::fs::read_to_string(&s.log).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || s.live() == 1).is_some(),
        "{}",
        log()
    );
    let w = s.workers();
    eprintln!("pushed off: {w}");
    let x = &w["workers"][0];
    assert_eq!(x["gpu"], 1, "started on GPU 1: {w}");
    assert_eq!(x["home_gpu"], 0, "{w}");
    assert!(
        x["last_error"].as_str().is_some_and(
            |e| e.contains("insufficient free GPU memory") && e.contains("exit status: 3")
        ),
        "the failed start's own words: {w}"
    );
    assert_eq!(w["lost_total"], 1, "one failed start: {w}");
    assert_eq!(w["failed_starts_total"], 1, "{w}");
    assert_eq!(w["gpus"][0]["failures"], 1, "{w}");
    let pid = x["pid"].as_u64().unwrap() as u32;
    assert_eq!(s.gpu_of(pid), Some(1));
    let text = log();
    assert!(
        text.contains("worker 0: GPU 0 unusable (insufficient free GPU memory for the weights and the KV cache")
            && text.contains("), trying GPU 1"),
        "{text}"
    );
    assert!(text.contains("worker 0 ready (pid"), "{text}");

    // GPU 0 recovers; the worker's next replacement goes home.
    drop(hog);
    std::thread::sleep(Duration::from_millis(700));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let mut back = serde_json::Value::Null;
    assert!(
        wait_until(Duration::from_secs(10), || {
            back = s.workers();
            back["workers"][0]["state"] == "ready"
                && back["workers"][0]["pid"].as_u64() != Some(pid as u64)
        })
        .is_some(),
        "{back}\n{}",
        log()
    );
    eprintln!("back home: {back}");
    assert_eq!(back["workers"][0]["gpu"], 0, "{back}");
    let new = back["workers"][0]["pid"].as_u64().unwrap() as u32;
    assert_eq!(s.gpu_of(new), Some(0));
    assert_eq!(
        back["lost_total"], 2,
        "the failed start and the kill: {back}"
    );
    assert_eq!(back["died_total"], 1, "{back}");
    assert_eq!(back["gpus"][0]["usable"], true, "{back}");
    assert_eq!(
        back["gpus"][0]["failures"], 0,
        "a worker served on it: {back}"
    );
}

#[test]
fn the_workers_view_follows_a_kill_through_waiting_starting_and_ready() {
    let s = Stack::start(
        "1x80GiB",
        true,
        &[
            "--workers",
            "2",
            "--restart-delay",
            "600ms",
            "--cold-start",
            "600ms",
        ],
    );
    assert!(wait_until(Duration::from_secs(10), || s.live() == 2).is_some());
    let w = s.workers();
    assert_eq!(w["lost_total"], 0, "{w}");
    assert_eq!(w["workers"][0]["restarts"], 0, "{w}");
    assert!(w["workers"][0]["last_error"].is_null(), "{w}");
    let pid = s.worker_pid(0).unwrap();
    assert_eq!(w["workers"][0]["pid"], pid, "{w}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Every state worker 0 goes through, sampled every 20ms until it serves again.
    let mut states: Vec<String> = Vec::new();
    let mut last = serde_json::Value::Null;
    let done = wait_until(Duration::from_secs(10), || {
        last = s.workers();
        let st = last["workers"][0]["state"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if states.last() != Some(&st) {
            states.push(st.clone());
        }
        st == "ready" && last["workers"][0]["pid"].as_u64() != Some(pid as u64)
    });
    assert!(done.is_some(), "{states:?} {last}");
    eprintln!("worker 0: {states:?}; {last}");
    let at = |s: &str| states.iter().position(|x| x == s);
    let (waiting, starting) = (at("waiting").unwrap(), at("starting").unwrap());
    assert!(waiting < starting, "{states:?}");
    assert_eq!(states.last().map(String::as_str), Some("ready"));
    let x = &last["workers"][0];
    assert_eq!(last["lost_total"], 1, "{last}");
    assert_eq!(last["died_total"], 1, "{last}");
    assert_eq!(last["failed_starts_total"], 0, "{last}");
    assert_eq!(x["restarts"], 1, "{last}");
    assert_eq!(x["lost"], 1, "{last}");
    assert!(
        x["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("SIGKILL")),
        "{last}"
    );
    assert_eq!(last["workers"][1]["lost"], 0, "worker 1 untouched: {last}");
    assert_eq!(s.metric("refstack_workers_lost_total"), 1);
    assert_eq!(s.metric("refstack_worker_failed_starts_total"), 0);
    // /workers is the same view.
    let short: serde_json::Value =
        serde_json::from_str(&curl(&["-s", &format!("http://{}/workers", s.server.addr)])).unwrap();
    assert_eq!(short["lost_total"], 1, "{short}");
}

#[test]
fn without_restarts_a_dead_worker_is_failed_in_the_workers_view() {
    let s = Stack::start("1x80GiB", true, &["--workers", "1", "--no-restart"]);
    assert!(wait_until(Duration::from_secs(10), || s.live() == 1).is_some());
    let pid = s.worker_pid(0).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let mut w = serde_json::Value::Null;
    assert!(
        wait_until(Duration::from_secs(5), || {
            w = s.workers();
            w["workers"][0]["state"] == "failed"
        })
        .is_some(),
        "{w}"
    );
    assert!(w["workers"][0]["pid"].is_null(), "{w}");
    assert_eq!(w["lost_total"], 1, "{w}");
    assert_eq!(w["ready"], 0, "{w}");
}

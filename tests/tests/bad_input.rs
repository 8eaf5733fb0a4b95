//! Bad input gets a clear error naming the field (INVALID_ARGUMENT or
//! FAILED_PRECONDITION on the wire, exit 64 from the CLI), and nothing is applied.

use gpuchaos_tests::*;

#[tokio::test]
async fn every_bad_spec_is_refused_and_nothing_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("policy.yaml"),
        "max_duration: 5m\nprotected_names: ['^protected-w']\n",
    )
    .unwrap();
    let agent = Agent::start_with(AgentOpts {
        state_dir: &dir.path().join("state"),
        args: vec![
            "--policy".into(),
            dir.path().join("policy.yaml").display().to_string(),
        ],
        env: vec![],
        netns: None,
    });
    let w = Worker::spawn();
    let re = w.cmdline_regex();
    let cases: Vec<(&str, String, &str)> = vec![
        ("malformed", "kind: process\nduration: [1m\n".into(), "bad.yaml:"),
        ("unknown field", format!("kind: process\nduration: 1m\ntarget: {{cmdline: '{re}'}}\naction: pause\ncolour: red\n"), "unknown field `colour`"),
        ("unknown kind", "kind: teleport\nduration: 1m\n".into(), "unknown fault kind `teleport`"),
        ("zero duration", format!("kind: process\nduration: 0s\ntarget: {{cmdline: '{re}'}}\naction: pause\n"), "duration: must be above zero"),
        ("negative duration", format!("kind: process\nduration: -5s\ntarget: {{cmdline: '{re}'}}\naction: pause\n"), "cannot be negative"),
        ("no unit", format!("kind: process\nduration: 30\ntarget: {{cmdline: '{re}'}}\naction: pause\n"), "add a unit"),
        ("over policy", format!("kind: process\nduration: 6m\ntarget: {{cmdline: '{re}'}}\naction: pause\n"), "exceeds the policy maximum of 5m"),
        ("unknown signal", format!("kind: process\nduration: 1m\ntarget: {{cmdline: '{re}'}}\naction: kill\nsignal: SIGFOO\n"), "signal: unknown signal \"SIGFOO\""),
        ("bad regex", "kind: process\nduration: 1m\ntarget: {name: '(['}\naction: pause\n".into(), "target.name: regex"),
        ("matches nothing", "kind: process\nduration: 1m\ntarget: {cmdline: '^no such process 12345$'}\naction: pause\n".into(), "matched no process"),
        ("pid 1", "kind: process\nduration: 1m\ntarget: {pid: 1}\naction: kill\n".into(), "pid 1 is never signalled"),
        ("missing pid", "kind: process\nduration: 1m\ntarget: {pid: 4000000}\naction: kill\n".into(), "no process with pid 4000000"),
        ("signal on pause", format!("kind: process\nduration: 1m\ntarget: {{cmdline: '{re}'}}\naction: pause\nsignal: SIGKILL\n"), "signal: only applies to action kill"),
        ("wrong type", format!("kind: process\nduration: 1m\ntarget: {{cmdline: '{re}', pick: {{count: many}}}}\naction: pause\n"), "target.pick.count"),
    ];
    for (name, yaml, want) in &cases {
        let f = spec_file(dir.path(), "bad.yaml", yaml);
        let out = gpuchaos(&["--agent", &agent.grpc, "inject", "-f", f.to_str().unwrap()]);
        assert_eq!(out.code, 64, "{name}: {out:?}");
        assert!(
            out.stderr.contains(want),
            "{name}: expected {want:?} in {:?}",
            out.stderr
        );
        assert!(!out.stderr.contains("panicked"), "{name}");
    }
    // A protected process by name (policy) and the agent itself.
    let out = gpuchaos(&[
        "--agent",
        &agent.grpc,
        "inject",
        "-f",
        spec_file(
            dir.path(),
            "a.yaml",
            &format!(
                "kind: process\nduration: 1m\ntarget: {{pid: {}}}\naction: pause\n",
                agent.pid
            ),
        )
        .to_str()
        .unwrap(),
    ]);
    assert_eq!(out.code, 64, "{out:?}");
    assert!(out.stderr.contains("gpuchaos agent itself"), "{out:?}");

    // Nothing was applied: the worker never stopped, no fault, no journal record.
    assert!(!is_stopped(w.pid));
    let mut c = agent.client().await;
    assert!(faults(&mut c, true).await.is_empty());
    assert_eq!(agent.open_intents(), 0);
    let journal =
        std::fs::read_to_string(dir.path().join("state/journal.jsonl")).unwrap_or_default();
    assert!(journal.is_empty(), "nothing journaled: {journal}");
}

#[tokio::test]
async fn wire_errors_use_the_right_codes_and_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("state"));
    let mut c = agent.client().await;
    let raw = |json: &str| gpuchaos_proto::pb::InjectRequest {
        spec_json: json.into(),
        session_id: String::new(),
    };
    let e = c
        .inject(raw(r#"{"kind":"process","duration":"1m","target":{"pid":1,"pick":{"count":"x"}},"action":"pause"}"#))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("target.pick.count"), "{}", e.message());
    let e = c.inject(raw("not json")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = c
        .inject(raw(
            r#"{"kind":"process","duration":"1m","target":{"pid":1},"action":"kill"}"#,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{}", e.message());
    let e = c
        .inject(raw(
            r#"{"kind":"process","duration":"1m","target":{"pid":1},"action":"pause"}"#
                .replace("\"action\"", "\"session\"")
                .as_str(),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = inject(
        &mut c,
        "kind: process\nduration: 1m\ntarget: {pid: 1}\naction: kill\n",
        "s-nope",
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{}", e.message());
}

#[test]
fn validate_reports_every_error_of_every_file_with_locations() {
    let dir = tempfile::tempdir().unwrap();
    let good = spec_file(
        dir.path(),
        "good.yaml",
        "kind: process\nduration: 1m\ntarget: {name: '^vllm'}\naction: pause\n",
    );
    let bad = spec_file(
        dir.path(),
        "bad.yaml",
        "kind: process\nduration: 0s\ntarget: {name: '(['}\naction: kill\nsignal: NOPE\n---\nkind: process\nduration: 1m\ntarget: {pid: 5}\naction: pause\nextra: 1\n",
    );
    let out = gpuchaos(&["validate", good.to_str().unwrap(), bad.to_str().unwrap()]);
    assert_eq!(out.code, 64, "{out:?}");
    assert!(
        out.stdout.contains("good.yaml: ok (1 fault spec)"),
        "{out:?}"
    );
    assert!(
        out.stderr
            .contains("bad.yaml:11:1: document 2: extra: unknown field `extra`"),
        "the unknown field is located: {}",
        out.stderr
    );
    let out = gpuchaos(&["validate", good.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{out:?}");
    let out = gpuchaos(&[
        "validate",
        dir.path().join("missing.yaml").to_str().unwrap(),
    ]);
    assert_eq!(out.code, 64);
    assert!(out.stderr.contains("cannot read"), "{out:?}");
}

#[test]
fn the_agent_refuses_bad_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(bin("gpuchaos-agent"))
            .args([
                "--state-dir",
                dir.path().join("s").to_str().unwrap(),
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["--listen", "0.0.0.0:0"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("without mutual TLS"));
    std::fs::write(dir.path().join("p.yaml"), "max_durashun: 1m\n").unwrap();
    let out = run(&[
        "--listen",
        "127.0.0.1:0",
        "--policy",
        dir.path().join("p.yaml").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_durashun"));
    // Two agents on one state directory: the second refuses.
    let first = Agent::start(&dir.path().join("shared"));
    let out = std::process::Command::new(bin("gpuchaos-agent"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--state-dir",
        ])
        .arg(&first.state_dir)
        .output()
        .unwrap();
    // Exit 74 (the state directory cannot be used), naming the live holder by the
    // kernel's word, without errno jargon.
    assert_eq!(out.status.code(), Some(74), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("process {} (", first.pid)) && err.contains("gpuchaos-agent"),
        "{err}"
    );
    assert!(!err.contains("EAGAIN"), "{err}");
    // A port in use is an operator error with its own exit code (69), not an
    // internal error (70), and says what to do.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let out = std::process::Command::new(bin("gpuchaos-agent"))
        .args([
            "--listen",
            &port,
            "--metrics-listen",
            "127.0.0.1:0",
            "--state-dir",
        ])
        .arg(dir.path().join("ports"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(
        err.contains(&format!(
            "cannot listen on {port} for gRPC: address already in use"
        )) && err.contains("pass another --listen"),
        "{err}"
    );
    // The log is plain text when stderr is not a terminal: no ANSI colours.
    assert!(!first.log_text().contains('\u{1b}'), "{}", first.log_text());
}

/// A process that holds a copy of the dead agent's lock descriptor (as a child caught
/// between fork and exec does when the agent is SIGKILLed) must not keep the next
/// agent out: the lock dies with the agent.
#[test]
fn a_dead_agents_lock_never_blocks_its_successor() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut first = Agent::start(&state);
    // Copy the agent's descriptor of agent.lock into a python process
    // (pidfd_getfd: the same open file, as a forked child would hold it).
    let lock = state.join("agent.lock");
    let fd = std::fs::read_dir(format!("/proc/{}/fd", first.pid))
        .unwrap()
        .filter_map(Result::ok)
        .find(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == lock))
        .and_then(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .expect("the agent holds agent.lock open");
    let script = format!(
        r#"
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
pidfd = os.pidfd_open({pid})
fd = libc.syscall(438, pidfd, {fd}, 0)  # pidfd_getfd
if fd < 0:
    print("pidfd_getfd failed", ctypes.get_errno(), flush=True)
    sys.exit(1)
print("holding", fd, flush=True)
time.sleep(60)
"#,
        pid = first.pid
    );
    let mut holder = std::process::Command::new("python3")
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.starts_with("holding"), "{line}");
    first.kill9();
    // The copy is still open in python; the successor starts all the same.
    let second = Agent::start(&state);
    assert!(second.pid != first.pid);
    let _ = holder.kill();
    let _ = holder.wait();
}

/// Peak resident memory of a process (VmHWM), in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        / 1024
}

/// No file read is unbounded: devices, directories and oversized files are refused
/// (exit 64) before anything is read, wherever a file is named.
#[test]
fn files_are_read_with_a_limit_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let t = std::time::Instant::now();
    let out = gpuchaos(&["validate", "/dev/zero"]);
    assert_eq!(out.code, 64, "{out:?}");
    assert!(
        out.stderr.contains("/dev/zero is not a regular file"),
        "{out:?}"
    );
    let out = gpuchaos(&["--agent", "127.0.0.1:1", "inject", "-f", "/dev/zero"]);
    assert_eq!(out.code, 64, "{out:?}");
    let out = gpuchaos(&["run", "/dev/zero", "--dry-run"]);
    assert_eq!(out.code, 64, "{out:?}");
    // A game day naming /dev/zero as an experiment.
    let gd = spec_file(
        dir.path(),
        "gd.yaml",
        "name: zero\nschedule: {cron: '0 3 * * *', timezone: UTC}\nexperiments: [/dev/zero]\n",
    );
    let out = gpuchaos(&["validate", gd.to_str().unwrap()]);
    assert_eq!(out.code, 64, "{out:?}");
    assert!(out.stderr.contains("not a regular file"), "{out:?}");
    // Larger than the cap (16 MiB), refused from its size alone.
    let big = dir.path().join("big.yaml");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(17 << 20).unwrap();
    let out = gpuchaos(&["validate", big.to_str().unwrap()]);
    assert_eq!(out.code, 64, "{out:?}");
    assert!(out.stderr.contains("larger than the 16 MiB"), "{out:?}");
    // The agent's policy and TLS files too.
    let agent = |args: &[&str]| {
        let mut c = std::process::Command::new(bin("gpuchaos-agent"));
        if !args.contains(&"--listen") {
            c.args(["--listen", "127.0.0.1:0"]);
        }
        c.args(["--metrics-listen", "127.0.0.1:0", "--state-dir"])
            .arg(dir.path().join("state"))
            .args(args)
            .output()
            .unwrap()
    };
    let out = agent(&["--policy", "/dev/zero"]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a regular file"));
    let out = agent(&[
        "--listen",
        "0.0.0.0:0",
        "--tls-cert",
        "/dev/zero",
        "--tls-key",
        "/dev/zero",
        "--tls-ca",
        "/dev/zero",
    ]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(30),
        "refusals are immediate"
    );
}

/// `validate DIR` validates the YAML files under it.
#[test]
fn validate_a_directory_checks_the_files_in_it() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let out = gpuchaos(&["validate", repo.join("experiments").to_str().unwrap()]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("experiments/refstack/full.yaml: ok"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("experiments/specs/network-partition.yaml: ok"),
        "{}",
        out.stdout
    );
    let empty = tempfile::tempdir().unwrap();
    let out = gpuchaos(&["validate", empty.path().to_str().unwrap()]);
    assert_eq!(out.code, 64, "{out:?}");
    assert!(out.stderr.contains("no .yaml or .yml files"), "{out:?}");
}

/// Checking a mapping's keys is linear: 4× the keys take about 4× the time (it was
/// quadratic, 16×), and a duplicate key is named in our words.
#[test]
fn validate_is_linear_in_the_keys_of_one_mapping() {
    let dir = tempfile::tempdir().unwrap();
    let write = |n: usize| {
        let mut s = String::from("metadata:\n  name: x\n  labels:\n");
        for i in 0..n {
            s.push_str(&format!("    k{i}: v{i}\n"));
        }
        spec_file(dir.path(), &format!("k{n}.yaml"), &s)
    };
    let time = |n: usize| {
        let f = write(n);
        let t = std::time::Instant::now();
        let out = gpuchaos(&["validate", f.to_str().unwrap()]);
        assert_eq!(out.code, 64, "{out:?}");
        assert!(out.stderr.contains("the method is empty"), "{out:?}");
        t.elapsed().as_secs_f64()
    };
    let small = time(10_000);
    let large = time(40_000);
    eprintln!(
        "10k keys {small:.2}s, 40k keys {large:.2}s (ratio {:.1})",
        large / small
    );
    assert!(
        large / small < 8.0,
        "4x the keys took {:.1}x the time: quadratic",
        large / small
    );
    let f = spec_file(
        dir.path(),
        "dup.yaml",
        "metadata: {name: x}\ntrials: 1\ntrials: 2\n",
    );
    let out = gpuchaos(&["validate", f.to_str().unwrap()]);
    assert_eq!(out.code, 64);
    assert!(out.stderr.contains("duplicate key `trials`"), "{out:?}");
    assert!(!out.stderr.contains("DuplicateKeyPolicy"), "{out:?}");
    let f = spec_file(
        dir.path(),
        "dupspec.yaml",
        "kind: process\nduration: 1m\nduration: 2m\ntarget: {pid: 1}\naction: pause\n",
    );
    let out = gpuchaos(&["validate", f.to_str().unwrap()]);
    assert_eq!(out.code, 64);
    assert!(out.stderr.contains("duplicate key `duration`"), "{out:?}");
    assert!(!out.stderr.contains("DuplicateKeyPolicy"), "{out:?}");
}

/// Huge regexes and specs are refused with INVALID_ARGUMENT and a short reason (never
/// the input echoed back), and leave no memory behind in the agent.
#[tokio::test]
async fn huge_regexes_are_refused_briefly_and_cost_the_agent_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("state"));
    let before = peak_rss_mib(agent.pid);
    let spec = |re: &str| {
        serde_json::json!({"kind": "process", "duration": "1m", "action": "pause",
            "target": {"cmdline": re}})
        .to_string()
    };
    let huge = "a(b|c)*".repeat(520_000); // 3.6 MB
    let long = "x".repeat(30_000); // under the spec cap, over the regex cap
    let dense = r"\w{500}\w{500}\w{500}"; // short, but compiles to hundreds of MB
    let mut tasks = Vec::new();
    for json in [spec(&huge), spec(&huge), spec(&long), spec(dense)] {
        let mut c = agent.client().await;
        tasks.push(tokio::spawn(async move {
            c.inject(gpuchaos_proto::pb::InjectRequest {
                spec_json: json,
                session_id: String::new(),
            })
            .await
        }));
    }
    let mut messages = Vec::new();
    for t in tasks {
        let e = t.await.unwrap().unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
        assert!(
            e.message().len() < 600,
            "{} bytes: {}",
            e.message().len(),
            &e.message()[..200]
        );
        messages.push(e.message().to_string());
    }
    assert!(messages[0].contains("at most 64 KiB"), "{}", messages[0]);
    assert!(messages[2].contains("at most 4096"), "{}", messages[2]);
    assert!(
        messages[3].contains("compiles to more than 1024 KiB"),
        "{}",
        messages[3]
    );
    let after = peak_rss_mib(agent.pid);
    eprintln!("agent peak RSS {before} MiB before, {after} MiB after four huge specs");
    assert!(after < before + 64, "peak RSS {before} -> {after} MiB");
    // The controller refuses the same locally, briefly.
    let f = spec_file(
        dir.path(),
        "huge.yaml",
        &format!(
            "kind: process\nduration: 1m\naction: pause\ntarget: {{cmdline: '{}'}}\n",
            "a".repeat(100_000)
        ),
    );
    let out = gpuchaos(&["validate", f.to_str().unwrap()]);
    assert_eq!(out.code, 64);
    assert!(
        out.stderr.len() < 1000,
        "{} bytes of error",
        out.stderr.len()
    );
    assert!(out.stderr.contains("at most 4096"), "{}", out.stderr);
}

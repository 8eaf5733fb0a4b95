//! `gpuchaos run` end to end: real agents, a real HTTP target, the real CLI.
//!
//! - accuracy: a target down for a known time, measured over 10 trials;
//! - rollback always: failed objective, stop condition, SIGINT, SIGKILL (lease);
//! - a CI-style run against two agents: JUnit that parses back, exit 0 / exit 1;
//! - the broken-experiment corpus: precise errors and exit 64, never a panic.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use gpuchaos_tests::*;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn journal(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("journal.json")).unwrap()).unwrap()
}

/// Active faults on an agent right now.
fn active(agent: &Agent) -> usize {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = agent.client().await;
        faults(&mut c, false).await.len()
    })
}

/// An agent, a target, and an experiment file pausing the target.
struct Scene {
    dir: tempfile::TempDir,
    agent: Agent,
    target: Target,
    file: PathBuf,
}

impl Scene {
    fn new(pause: &str, extra: &str) -> Scene {
        let dir = tempfile::tempdir().unwrap();
        let agent = Agent::start(&dir.path().join("state"));
        let target = Target::spawn();
        let exp = pause_experiment(&agent, &target, pause, extra);
        let file = write(dir.path(), "experiment.yaml", &exp);
        Scene {
            dir,
            agent,
            target,
            file,
        }
    }
}

/// Nothing is left behind: no active fault, the target runs.
fn assert_clean(agent: &Agent, target: &Target) {
    assert_eq!(active(agent), 0, "a fault is still active");
    assert!(!is_stopped(target.pid), "the target is still paused");
}

fn spawn_run(args: &[&str]) -> Child {
    Command::new(bin("gpuchaos"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gpuchaos run")
}

fn finish(child: Child) -> CliOut {
    let out = child.wait_with_output().unwrap();
    CliOut {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn rto_is_measured_within_one_interval_over_ten_trials() {
    let Scene {
        dir,
        agent,
        target,
        file,
    } = Scene::new(
        "2s",
        "objectives:\n  - rto: {probe: health, limit: 5s, consecutive: 3}\ntrials: 10\n",
    );
    let reports = dir.path().join("reports");
    let out = gpuchaos(&[
        "run",
        file.to_str().unwrap(),
        "--report-dir",
        reports.to_str().unwrap(),
    ]);
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let j = journal(&reports);
    let trials = j["trials"].as_array().unwrap();
    assert_eq!(trials.len(), 10);
    let interval_ms = 100.0;
    let mut errors = Vec::new();
    for t in trials {
        let f = &t["faults"][0];
        // The truth: the target was paused from verification to revert, as the
        // agent stamped them.
        let truth = (f["end_ns"].as_u64().unwrap() - f["inject_ns"].as_u64().unwrap()) as f64 / 1e6;
        let measured = t["objectives"][0]["value"].as_f64().unwrap() * 1e3;
        errors.push(measured - truth);
    }
    let text: Vec<String> = errors.iter().map(|e| format!("{e:+.1}")).collect();
    eprintln!(
        "RTO errors (measured − true downtime, ms): {}",
        text.join(" ")
    );
    for e in &errors {
        assert!(
            e.abs() <= interval_ms + 20.0,
            "error {e:.1} ms exceeds interval + 20 ms: {text:?}"
        );
    }
    assert_clean(&agent, &target);
}

#[test]
fn a_failed_objective_exits_1_and_reverts() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("state"));
    let target = Target::spawn();
    // Paused for 1 s, but the objective allows 300 ms.
    let exp = pause_experiment(
        &agent,
        &target,
        "1s",
        "objectives:\n  - name: fast recovery\n    rto: {probe: health, limit: 300ms}\n",
    );
    let file = write(dir.path(), "fail.yaml", &exp);
    let out = gpuchaos(&["run", file.to_str().unwrap()]);
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("fast recovery"), "{}", out.stdout);
    assert!(out.stdout.contains("FAIL"), "{}", out.stdout);
    assert_clean(&agent, &target);
}

#[test]
fn a_stop_condition_aborts_with_exit_2_and_reverts() {
    let Scene {
        dir,
        agent,
        target,
        file,
    } = Scene::new(
        "60s",
        "objectives:\n  - rto: {probe: health, limit: 90s}\nstop_conditions:\n  - {probe: health, failing_for: 500ms}\n",
    );
    let reports = dir.path().join("r");
    let start = std::time::Instant::now();
    let out = gpuchaos(&[
        "run",
        file.to_str().unwrap(),
        "--report-dir",
        reports.to_str().unwrap(),
    ]);
    assert_eq!(out.code, 2, "{}\n{}", out.stdout, out.stderr);
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "the 60s fault was not cut short"
    );
    assert!(out.stderr.contains("stop condition"), "{}", out.stderr);
    assert_clean(&agent, &target);
    let j = journal(&reports);
    assert_eq!(j["verdict"], "aborted");
    assert!(
        j["trials"][0]["faults"][0]["end_ns"].as_u64().is_some(),
        "{}",
        j["trials"]
    );
}

#[test]
fn sigint_reverts_and_exits_2() {
    let Scene {
        dir: _dir,
        agent,
        target,
        file,
    } = Scene::new("60s", "objectives:\n  - rto: {probe: health, limit: 90s}\n");
    let reports = _dir.path().join("reports");
    let child = spawn_run(&[
        "run",
        file.to_str().unwrap(),
        "--report-dir",
        reports.to_str().unwrap(),
    ]);
    assert!(
        wait_until(Duration::from_secs(15), || is_stopped(target.pid)).is_some(),
        "the target was never paused"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = finish(child);
    assert_eq!(out.code, 2, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("interrupted by SIGINT"),
        "{}",
        out.stderr
    );
    assert_clean(&agent, &target);
    // The aborted trial says when it ran, and the objective it never reached is
    // "not evaluated": not a failure on top of the run's error.
    let j = journal(&reports);
    let trial = &j["trials"][0];
    assert!(trial["start_ns"].as_u64().unwrap() > 0, "{trial}");
    assert!(
        trial["method_end_ns"].is_null()
            || trial["method_end_ns"].as_u64().unwrap() >= trial["start_ns"].as_u64().unwrap()
    );
    let o = &j["objectives"][0];
    assert_eq!(o["evaluated"], false, "{o}");
    assert!(
        o["detail"].as_str().unwrap().starts_with("not evaluated"),
        "{o}"
    );
    assert!(out.stdout.contains("NOT EVALUATED"), "{}", out.stdout);
    assert!(!out.stdout.contains("FAIL"), "{}", out.stdout);
    let junit = std::fs::read_to_string(reports.join("junit.xml")).unwrap();
    assert!(
        junit.contains("failures=\"0\" errors=\"1\" skipped=\"1\""),
        "{junit}"
    );
    assert!(
        junit.contains("<skipped message=\"not evaluated"),
        "{junit}"
    );
    let md = std::fs::read_to_string(reports.join("summary.md")).unwrap();
    assert!(
        md.contains("not evaluated") && !md.contains("❌ fail"),
        "{md}"
    );
    assert!(!md.contains("trial 1: 0.000s"), "{md}");
}

#[test]
fn a_killed_controller_is_cleaned_up_by_the_lease() {
    let Scene {
        dir: _dir,
        agent,
        target,
        file,
    } = Scene::new("60s", "objectives:\n  - rto: {probe: health, limit: 90s}\n");
    let mut child = spawn_run(&["run", file.to_str().unwrap()]);
    assert!(wait_until(Duration::from_secs(15), || is_stopped(target.pid)).is_some());
    child.kill().unwrap();
    child.wait().unwrap();
    // The lease is 2 s: the agent resumes the target on its own.
    let took = wait_until(Duration::from_secs(6), || !is_stopped(target.pid));
    assert!(
        took.is_some(),
        "the target stayed paused after the controller died"
    );
    assert_eq!(active(&agent), 0);
}

#[test]
fn a_ci_run_against_two_agents_writes_junit_and_sets_the_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let a = Agent::start(&dir.path().join("a"));
    let b = Agent::start(&dir.path().join("b"));
    let ta = Target::spawn();
    let tb = Target::spawn();
    let exp = |limit: &str| {
        format!(
            r#"
metadata: {{name: two-nodes, labels: {{team: inference}}}}
agents:
  - {{name: node-a, address: "{ga}", labels: {{pool: h100}}}}
  - {{name: node-b, address: "{gb}", labels: {{pool: h100}}}}
probes:
  - {{name: a, interval: 100ms, http: {{url: "{ua}"}}}}
  - {{name: b, interval: 100ms, tcp: {{address: "127.0.0.1:{pb}"}}}}
steady_state: {{probes: [a, b], duration: 300ms}}
method:
  - parallel:
      - name: pause-a
        fault: {{kind: process, duration: 800ms, action: pause, target: {{cmdline: "{ra}"}}}}
        on: {{agents: [node-a]}}
      - name: pause-b
        fault: {{kind: process, duration: 400ms, action: pause, target: {{cmdline: "{rb}"}}}}
        on: {{agents: [node-b]}}
objectives:
  - name: node-a recovers
    rto: {{probe: a, fault: pause-a, limit: {limit}}}
  - name: node-b port stays open
    availability: {{probe: b, min: 0.9}}
"#,
            ga = a.grpc,
            gb = b.grpc,
            ua = ta.url(),
            pb = tb.port,
            ra = ta.cmdline_regex(),
            rb = tb.cmdline_regex(),
        )
    };
    // A paused process still accepts TCP connections (the kernel completes the
    // handshake), so the port probe stays up: availability holds.
    let good = write(dir.path(), "good.yaml", &exp("5s"));
    let r1 = dir.path().join("r1");
    let out = gpuchaos(&[
        "run",
        good.to_str().unwrap(),
        "--report-dir",
        r1.to_str().unwrap(),
    ]);
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let xml = std::fs::read_to_string(r1.join("junit.xml")).unwrap();
    let doc = roxmltree::Document::parse(&xml).expect("junit.xml parses");
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "testsuites");
    assert_eq!(root.attribute("failures"), Some("0"));
    let cases: Vec<_> = doc
        .descendants()
        .filter(|n| n.has_tag_name("testcase"))
        .collect();
    assert_eq!(cases.len(), 3, "{xml}"); // two objectives and the steady state
    let j = journal(&r1);
    let faults = j["trials"][0]["faults"].as_array().unwrap();
    assert_eq!(faults.len(), 2);
    assert_ne!(faults[0]["agent"], faults[1]["agent"]);

    let bad = write(dir.path(), "bad.yaml", &exp("200ms"));
    let r2 = dir.path().join("r2");
    let out = gpuchaos(&[
        "run",
        bad.to_str().unwrap(),
        "--report-dir",
        r2.to_str().unwrap(),
    ]);
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    let xml = std::fs::read_to_string(r2.join("junit.xml")).unwrap();
    let doc = roxmltree::Document::parse(&xml).expect("junit.xml parses");
    let failures: Vec<_> = doc
        .descendants()
        .filter(|n| n.has_tag_name("failure"))
        .collect();
    assert_eq!(failures.len(), 1, "{xml}");
    let msg = failures[0].attribute("message").unwrap();
    assert!(
        msg.contains("rto") && msg.contains("limit 0.200s") || msg.contains("200ms"),
        "{msg}"
    );
    let case = failures[0].parent().unwrap();
    assert_eq!(case.attribute("name"), Some("node-a recovers"));
    assert_eq!(active(&a) + active(&b), 0);
}

#[test]
fn dry_run_prints_the_plan_and_touches_nothing() {
    let Scene {
        dir: _dir,
        agent,
        target,
        file,
    } = Scene::new(
        "5s",
        "objectives:\n  - rto: {probe: health, limit: 9s}\ntrials: 2\n",
    );
    let out = gpuchaos(&["run", file.to_str().unwrap(), "--dry-run", "--seed", "42"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("run seed 42"), "{}", out.stdout);
    assert!(
        out.stdout.contains("pause: inject process pause"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("for 5s on node-a"), "{}", out.stdout);
    assert!(out.stdout.contains("trial 2"), "{}", out.stdout);
    assert!(!is_stopped(target.pid));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let n = rt.block_on(async {
        let mut c = agent.client().await;
        faults(&mut c, true).await.len()
    });
    assert_eq!(n, 0, "a dry run injected something");
}

/// Every file of tests/corpus/broken starts with `# expect: TEXT` lines; validate must
/// print each TEXT, locate the error (`file:line:col`), exit 64 and never panic.
#[test]
fn broken_experiments_give_precise_errors() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/broken");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&corpus)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 8, "the corpus is missing files");
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let expects: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .collect();
        assert!(!expects.is_empty(), "{}: no `# expect:` line", f.display());
        for cmd in [&["validate"][..], &["run", "--dry-run"][..]] {
            let mut args: Vec<&str> = cmd.to_vec();
            args.push(f.to_str().unwrap());
            let out = gpuchaos(&args);
            let name = f.file_name().unwrap().to_string_lossy();
            assert_eq!(out.code, 64, "{name} ({cmd:?}): {}", out.stderr);
            assert!(!out.stderr.contains("panicked"), "{name}: {}", out.stderr);
            for e in &expects {
                assert!(
                    out.stderr.contains(e),
                    "{name} ({cmd:?}): expected {e:?} in:\n{}",
                    out.stderr
                );
            }
            let located = format!("{}:", f.display());
            assert!(
                out.stderr.contains(&located),
                "{name}: no file:line:col in {}",
                out.stderr
            );
        }
    }
}

/// Samples still waiting when the method ends are counted, not dropped: every sample
/// started in the fault window is in the journal and in the availability figure.
#[test]
fn samples_unanswered_at_the_end_are_waited_for_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("state"));
    let target = Target::spawn();
    // Every sample takes 500 ms, a new one starts every 100 ms: about five are
    // always waiting, the last five of the window among them when the method ends.
    let exp = format!(
        r#"
metadata: {{name: slow-samples}}
agents: [{{name: a, address: "{grpc}"}}]
probes:
  - name: slow
    interval: 100ms
    timeout: 2s
    command: {{argv: [sleep, "0.5"]}}
method:
  - name: pause
    fault: {{kind: process, duration: 1500ms, action: pause, target: {{cmdline: "{re}"}}}}
objectives:
  - availability: {{probe: slow, min: 1}}
"#,
        grpc = agent.grpc,
        re = target.cmdline_regex()
    );
    let file = write(dir.path(), "slow.yaml", &exp);
    let reports = dir.path().join("reports");
    let out = gpuchaos(&[
        "run",
        file.to_str().unwrap(),
        "--report-dir",
        reports.to_str().unwrap(),
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    let j = journal(&reports);
    let trial = &j["trials"][0];
    let from = trial["first_inject_ns"].as_u64().unwrap();
    let to = trial["method_end_ns"].as_u64().unwrap();
    let in_window: Vec<&serde_json::Value> = j["samples"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            let t = s["t_ns"].as_u64().unwrap();
            t >= from && t <= to
        })
        .collect();
    // One sample per 100 ms of the window started (the ticker skips none: five
    // in flight is within its slots).
    let expected = ((to - from) / 100_000_000) as usize;
    assert!(
        in_window.len() + 1 >= expected,
        "{} samples recorded in a window of {} ms",
        in_window.len(),
        (to - from) / 1_000_000
    );
    assert!(in_window.iter().all(|s| s["ok"] == true), "{in_window:?}");
    let detail = j["objectives"][0]["detail"].as_str().unwrap().to_string();
    let n = in_window.len();
    assert!(
        detail.contains(&format!("{n} of {n} samples")),
        "{detail}: the objective must count all {n}"
    );
    assert_clean(&agent, &target);
}

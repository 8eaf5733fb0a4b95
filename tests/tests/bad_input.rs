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
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("pid {}", first.pid)),
        "{out:?}"
    );
}

//! `gpuchaos new`: every kind's experiment and the game day pass `gpuchaos validate`,
//! bad input is refused with a reason, and a generated experiment runs unchanged
//! (only the addresses on its command line) against the reference stack, exit 0.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use gpuchaos_tests::*;

const URL: &str = "http://127.0.0.1:18800/v1";
const MODEL: &str = "refstack-1b";

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn every_kind_makes_an_experiment_that_validates() {
    let dir = tempfile::tempdir().unwrap();
    for kind in ["process", "gpu_memory", "network", "guardrail"] {
        for agent in [Some("127.0.0.1:18802"), None] {
            let mut args = vec![];
            if let Some(a) = agent {
                args.extend(["--agent", a]);
            }
            args.extend([
                "new",
                "experiment",
                "--url",
                URL,
                "--model",
                MODEL,
                "--kind",
                kind,
            ]);
            let out = gpuchaos(&args);
            assert_eq!(out.code, 0, "{args:?}: {out:?}");
            assert!(
                out.stdout.contains(&format!("kind: {kind}\n")),
                "{kind}: {}",
                out.stdout
            );
            assert_eq!(
                out.stdout.contains("address: \"127.0.0.1:18802\""),
                agent.is_some(),
                "{kind}: the agents are the --agent flags: {}",
                out.stdout
            );
            let file = write(dir.path(), &format!("{kind}.yaml"), &out.stdout);
            let v = gpuchaos(&["validate", &file]);
            assert_eq!(v.code, 0, "{kind} does not validate: {v:?}\n{}", out.stdout);
            eprintln!("{kind} (agent {agent:?}): {}", v.stdout.trim());
        }
    }
    // The kind's own flags land in the file.
    let out = gpuchaos(&[
        "new",
        "experiment",
        "--url",
        URL,
        "--model",
        MODEL,
        "--kind",
        "guardrail",
        "--guardrail-proxy",
        "127.0.0.1:18801",
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("listen: \"127.0.0.1:18801\""),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("safety: {probe: canary"),
        "{}",
        out.stdout
    );
    let out = gpuchaos(&[
        "new",
        "experiment",
        "--url",
        URL,
        "--model",
        MODEL,
        "--target",
        "^python .*serve_worker",
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("cmdline: \"^python .*serve_worker\""),
        "{}",
        out.stdout
    );
}

#[test]
fn the_game_day_validates_with_its_experiment() {
    let dir = tempfile::tempdir().unwrap();
    let e = gpuchaos(&["new", "experiment", "--url", URL, "--model", MODEL]);
    assert_eq!(e.code, 0, "{e:?}");
    write(dir.path(), "experiment.yaml", &e.stdout);
    let g = gpuchaos(&["new", "gameday"]);
    assert_eq!(g.code, 0, "{g:?}");
    let file = write(dir.path(), "gameday.yaml", &g.stdout);
    let v = gpuchaos(&["validate", &file]);
    assert_eq!(v.code, 0, "{v:?}\n{}", g.stdout);
    assert!(v.stdout.contains("game day weekly-chaos"), "{v:?}");
    eprintln!("{}", v.stdout.trim());

    let g = gpuchaos(&[
        "new",
        "gameday",
        "--name",
        "nightly",
        "--experiment",
        "experiment.yaml",
        "--experiment",
        "second.yaml",
    ]);
    assert_eq!(g.code, 0, "{g:?}");
    write(dir.path(), "second.yaml", &e.stdout);
    let file = write(dir.path(), "nightly.yaml", &g.stdout);
    let v = gpuchaos(&["validate", &file]);
    assert_eq!(v.code, 0, "{v:?}");
    assert!(v.stdout.contains("2 experiments"), "{v:?}");
}

#[test]
fn bad_input_is_refused_with_the_reason() {
    let base = ["new", "experiment", "--model", MODEL];
    for (extra, says) in [
        (vec!["--url", "127.0.0.1:18800/v1"], "has no scheme"),
        (
            vec!["--url", "ftp://127.0.0.1:18800/v1"],
            "must be http or https",
        ),
        (vec!["--url", "http://127.0.0.1:18800"], "has no API path"),
        (
            vec!["--url", URL, "--kind", "meteor"],
            "invalid value 'meteor'",
        ),
        (
            vec!["--url", URL, "--kind", "network", "--target", "x"],
            "--target only applies to --kind process",
        ),
        (vec!["--url", URL, "--target", "("], "not a valid regex"),
    ] {
        let args: Vec<&str> = base.iter().copied().chain(extra.iter().copied()).collect();
        let out = gpuchaos(&args);
        assert_eq!(out.code, 64, "{args:?}: {out:?}");
        assert!(out.stderr.contains(says), "{args:?}: {}", out.stderr);
        assert!(out.stdout.is_empty(), "nothing on stdout: {out:?}");
    }
    let out = gpuchaos(&[
        "--agent",
        "gpu-node-1",
        "new",
        "experiment",
        "--url",
        URL,
        "--model",
        MODEL,
    ]);
    assert_eq!(out.code, 64, "{out:?}");
    assert!(out.stderr.contains("is not HOST:PORT"), "{}", out.stderr);
    let out = gpuchaos(&["new", "gameday", "--name", "two words"]);
    assert_eq!(out.code, 64, "{out:?}");
}

/// Starts the reference stack and an agent, writes the experiment with
/// `gpuchaos new`, validates it and runs it; everything in one shell so that, as root,
/// the whole stack lives in a PID namespace of its own (the process fault's default
/// target cannot pause another test's workers, and everything dies with the shell)
/// inside a network namespace of its own (the fixed ports are free).
const STACK: &str = r#"
set -u
d="$DIR"
export GPUCHAOS_FAKE_GPU_STATE="$d/gpu.json" GPUCHAOS_FAKE_GPUS=1x80GiB GPUCHAOS_CUDA_LIB="$LIB"
exec 3< <(exec "$REFSTACK" guardrail --listen 127.0.0.1:0)
read -r _ g <&3 || { echo "the guardrail did not start"; exit 90; }
"$AGENT" --listen 127.0.0.1:18802 --metrics-listen 127.0.0.1:0 --state-dir "$d/agent" \
    --nvml-lib "$LIB" --cuda-lib "$LIB" --guardrail-proxy "127.0.0.1:18801=http://$g" \
    >"$d/agent.out" 2>"$d/agent.log" </dev/null &
"$REFSTACK" server --listen 127.0.0.1:18800 --guardrail http://127.0.0.1:18801 \
    --kv-cache 8GiB --cold-start 1s --workers 2 >"$d/server.out" 2>"$d/server.log" </dev/null &
ready=
for _ in $(seq 300); do
    if grep -q grpc= "$d/agent.out" 2>/dev/null &&
        curl -s -m 2 http://127.0.0.1:18800/metrics | grep -q "refstack_workers_live 2"; then
        ready=1; break
    fi
    sleep 0.1
done
[ -n "$ready" ] || { echo "the stack never became ready"; cat "$d/agent.log" "$d/server.log"; exit 91; }
"$GPUCHAOS" --agent 127.0.0.1:18802 new experiment --url http://127.0.0.1:18800/v1 \
    --model refstack-1b --kind process >"$d/first.yaml" || exit 92
"$GPUCHAOS" validate "$d/first.yaml" || exit 93
"$GPUCHAOS" run "$d/first.yaml" --report-dir "$d/reports"
code=$?
echo "gpuchaos run: exit $code"
exit $code
"#;

#[test]
fn a_generated_experiment_runs_against_the_reference_stack() {
    let root = nix::unistd::geteuid().is_root();
    let dir = tempfile::tempdir().unwrap();
    let ns = root.then(gpuchaos_tests::netns::Netns::new);
    let mut cmd = match &ns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{}", ns.name)).args([
                "--",
                "unshare",
                "--pid",
                "--fork",
                "--mount-proc",
            ]);
            c
        }
        None => {
            eprintln!(
                "not root: the stack shares this machine's loopback and processes (as root it gets namespaces of its own)"
            );
            Command::new("env")
        }
    };
    let t = Instant::now();
    let out = cmd
        .args(["timeout", "300", "bash", "-c", STACK])
        .env("DIR", dir.path())
        .env("LIB", bin("libgpuchaos_fakegpu.so"))
        .env("REFSTACK", bin("gpuchaos-refstack"))
        .env("AGENT", bin("gpuchaos-agent"))
        .env("GPUCHAOS", bin("gpuchaos"))
        .stdin(Stdio::null())
        .output()
        .expect("run the stack");
    let secs = t.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let logs = ["agent.log", "server.log"]
        .map(|f| std::fs::read_to_string(dir.path().join(f)).unwrap_or_default())
        .join("\n");
    let experiment = std::fs::read_to_string(dir.path().join("first.yaml")).unwrap_or_default();
    eprintln!("{stdout}\nin {secs:.1}s");
    assert_eq!(
        out.status.code(),
        Some(0),
        "the generated experiment must pass the reference stack:\n{experiment}\n{stdout}\n{stderr}\n{logs}"
    );
    let journal: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("reports/journal.json")).unwrap(),
    )
    .unwrap();
    // The fault happened: one refstack worker paused, verified, and the objectives held.
    let faults = journal["trials"][0]["faults"].as_array().unwrap();
    assert_eq!(faults.len(), 1, "{faults:?}");
    assert_eq!(faults[0]["step"], "pause-one-worker", "{faults:?}");
    assert!(faults[0]["inject_ns"].as_u64().is_some(), "{faults:?}");
    eprintln!("paused: {}", faults[0]["target"]);
    // The objectives held (the steady state after the trial is one of them).
    let objectives = journal["objectives"].as_array().unwrap();
    let names: Vec<&str> = objectives
        .iter()
        .map(|o| o["name"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        names,
        [
            "generations recover within 60s",
            "chat availability during the fault",
            "steady state after the trial"
        ],
        "{objectives:?}"
    );
    assert!(
        objectives.iter().all(|o| o["passed"] == true),
        "{objectives:?}"
    );
    // A worker was paused, not the server's front process: the generation probe saw
    // the hang, /health (answered by the front) never failed.
    let probes: Vec<&str> = journal["probes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap_or(""))
        .collect();
    let failed = |name: &str| {
        let i = probes.iter().position(|p| *p == name).unwrap() as u64;
        journal["samples"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["probe"] == i && x["ok"] == false)
            .count()
    };
    assert_eq!(failed("health"), 0, "the front process must not be paused");
    assert!(
        failed("chat") > 0,
        "the paused worker must be seen by the generation probe"
    );
    for f in ["junit.xml", "summary.md", "report.html"] {
        assert!(dir.path().join("reports").join(f).exists(), "{f}");
    }
}

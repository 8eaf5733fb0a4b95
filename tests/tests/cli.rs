//! The CLI's habits: `--version` names the commit, `-q` keeps only errors and
//! results, `--output json` everywhere results are printed, no escape codes when
//! stderr is not a terminal.

use std::process::Command;

use gpuchaos_tests::*;

fn gpuchaos(args: &[&str]) -> std::process::Output {
    Command::new(bin("gpuchaos")).args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn both_binaries_name_the_commit_they_were_built_from() {
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| text(&o.stdout).trim().to_string());
    for b in ["gpuchaos", "gpuchaos-agent"] {
        let out = Command::new(bin(b)).arg("--version").output().unwrap();
        assert!(out.status.success());
        let v = text(&out.stdout);
        let want = match (&head, std::env::var("GPUCHAOS_COMMIT")) {
            (_, Ok(c)) if !c.is_empty() => c,
            (Some(h), _) => h.clone(),
            (None, _) => "unknown".into(),
        };
        assert_eq!(
            v.trim(),
            format!("{b} {} (commit {want})", env!("CARGO_PKG_VERSION")),
            "rebuild after committing: cargo build --workspace"
        );
    }
}

#[test]
fn quiet_validate_says_only_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yaml");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &good,
        "kind: process\nduration: 5s\ntarget: {pid: 1}\naction: pause\n",
    )
    .unwrap();
    std::fs::write(
        &bad,
        "kind: process\nduration: 0s\ntarget: {pid: 1}\naction: pause\n",
    )
    .unwrap();
    let g = good.to_str().unwrap();
    let b = bad.to_str().unwrap();
    let loud = gpuchaos(&["validate", g]);
    assert_eq!(loud.status.code(), Some(0));
    assert!(text(&loud.stdout).contains(": ok (1 fault spec)"));
    let quiet = gpuchaos(&["-q", "validate", g]);
    assert_eq!(quiet.status.code(), Some(0));
    assert_eq!(text(&quiet.stdout), "", "nothing to say");
    let quiet = gpuchaos(&["--quiet", "validate", g, b]);
    assert_eq!(quiet.status.code(), Some(64));
    assert_eq!(text(&quiet.stdout), "");
    assert_eq!(
        text(&quiet.stderr).trim(),
        format!(
            "{b}: duration: must be above zero: every fault needs a bounded duration, e.g. 30s"
        )
    );
    let both = gpuchaos(&["-q", "-v", "validate", g]);
    assert_eq!(
        both.status.code(),
        Some(64),
        "-q and -v contradict each other"
    );
}

#[test]
fn validate_and_certs_speak_json() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "kind: process\nduration: 5s\ntarget: {pid: 1}\naction: pause\ncolour: red\n",
    )
    .unwrap();
    let missing = dir.path().join("missing.yaml");
    let out = gpuchaos(&[
        "validate",
        "--output",
        "json",
        bad.to_str().unwrap(),
        missing.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(64));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    let f = &v["files"][0];
    assert_eq!(f["kind"], "fault-spec");
    assert_eq!(f["problems"][0]["line"], 5, "{v}");
    assert!(
        f["problems"][0]["message"]
            .as_str()
            .unwrap()
            .contains("colour"),
        "{v}"
    );
    assert!(
        v["files"][1]["problems"][0]["message"]
            .as_str()
            .unwrap()
            .contains("cannot read"),
        "{v}"
    );
    let certs = dir.path().join("certs");
    let out = gpuchaos(&[
        "--output",
        "json",
        "certs",
        "--out",
        certs.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for k in ["ca", "agent", "agent_key", "controller", "controller_key"] {
        let p = v["files"][k].as_str().unwrap();
        assert!(std::path::Path::new(p).exists(), "{k}: {p}");
    }
}

#[test]
fn no_escape_codes_when_stderr_is_not_a_terminal() {
    // Trace logging of a failed connection: plenty of lines, none styled.
    let out = gpuchaos(&[
        "-vvv",
        "--timeout",
        "200ms",
        "status",
        "--agent",
        "127.0.0.1:9",
    ]);
    let err = text(&out.stderr);
    assert!(err.lines().count() > 5, "{err}");
    assert!(!err.contains('\u{1b}'), "escape codes in a pipe: {err}");
    // On a terminal (script(1) gives it one) log lines are styled, unless NO_COLOR.
    let on_a_tty = |no_color: bool| {
        let cmd = format!(
            "{} -vvv --timeout 200ms status --agent 127.0.0.1:9",
            bin("gpuchaos").display()
        );
        let mut c = Command::new("script");
        c.args(["-qec", &cmd, "/dev/null"]);
        c.env_remove("NO_COLOR");
        if no_color {
            c.env("NO_COLOR", "1");
        }
        let out = c
            .output()
            .expect("script(1), from bsdutils, gives the command a terminal");
        text(&out.stdout)
    };
    let styled = on_a_tty(false);
    assert!(
        styled.contains("\u{1b}["),
        "a terminal gets styled lines: {styled}"
    );
    let plain = on_a_tty(true);
    assert!(plain.lines().count() > 5, "{plain}");
    assert!(!plain.contains("\u{1b}["), "NO_COLOR: {plain}");
}

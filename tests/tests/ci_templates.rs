//! The CI templates in `examples/ci/`: each is valid against its CI system's published
//! schema (check-jsonschema's vendored copies of SchemaStore's github-workflow and
//! GitLab's own gitlab-ci schema), validates its experiment, runs it with the real
//! flags, keeps the reports whatever happened, and turns each exit code into its
//! meaning and a failed job. The exit-code handling is executed, not just read: the
//! template's own script runs against a stand-in `gpuchaos` that exits with each code.
//!
//! check-jsonschema comes from a virtualenv that scripts/test.sh makes (and exports
//! as GPUCHAOS_CHECK_JSONSCHEMA); without it these tests fail, they never skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use gpuchaos_tests::*;

const GITHUB: &str = "examples/ci/github/chaos.yml";
const GITLAB: &str = "examples/ci/gitlab/chaos.gitlab-ci.yml";
const EXPERIMENT: &str = "examples/ci/experiment.yaml";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// check-jsonschema: $GPUCHAOS_CHECK_JSONSCHEMA, else scripts/test.sh's cached venv.
fn check_jsonschema() -> PathBuf {
    let path = std::env::var_os("GPUCHAOS_CHECK_JSONSCHEMA")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
                });
            cache.join("gpuchaos-test/venv/bin/check-jsonschema")
        });
    assert!(
        path.exists(),
        "check-jsonschema is missing at {}: run `bash scripts/test.sh` (it makes the \
         virtualenv), or by hand: python3 -m venv ~/.cache/gpuchaos-test/venv && \
         ~/.cache/gpuchaos-test/venv/bin/pip install check-jsonschema==0.39.0",
        path.display()
    );
    path
}

/// check-jsonschema --builtin-schema SCHEMA FILE: (passed, output).
fn schema_check(schema: &str, file: &Path) -> (bool, String) {
    let out = Command::new(check_jsonschema())
        .args(["--builtin-schema", schema])
        .arg(file)
        .stdin(Stdio::null())
        .output()
        .expect("run check-jsonschema");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[test]
fn the_templates_match_their_ci_systems_schemas() {
    for (file, schema) in [
        (GITHUB, "vendor.github-workflows"),
        (GITLAB, "vendor.gitlab-ci"),
    ] {
        let (ok, out) = schema_check(schema, &repo().join(file));
        eprintln!("{file} ({schema}): {}", out.trim());
        assert!(ok, "{file} does not match {schema}:\n{out}");
    }
}

#[test]
fn the_schema_check_does_reject_a_broken_template() {
    // The checker must be able to fail: one misspelt key or a wrong value each.
    let dir = tempfile::tempdir().unwrap();
    for (file, schema, from, to) in [
        (
            GITHUB,
            "vendor.github-workflows",
            "    runs-on:",
            "    runs_on:",
        ),
        (
            GITLAB,
            "vendor.gitlab-ci",
            "    when: always",
            "    when: sometimes",
        ),
    ] {
        let text = read(file);
        assert!(text.contains(from), "{file} has no {from:?}");
        let broken = dir.path().join(Path::new(file).file_name().unwrap());
        std::fs::write(&broken, text.replacen(from, to, 1)).unwrap();
        let (ok, out) = schema_check(schema, &broken);
        assert!(!ok, "{schema} accepted a broken {file}:\n{out}");
    }
}

#[test]
fn the_templates_validate_run_publish_and_archive_always() {
    let run_help = gpuchaos(&["run", "--help"]);
    assert_eq!(run_help.code, 0, "{run_help:?}");
    for (file, always, publish) in [
        (
            GITHUB,
            "if: always()",
            [
                "$GITHUB_STEP_SUMMARY",
                "mikepenz/action-junit-report@v",
                "actions/upload-artifact@v",
            ],
        ),
        (
            GITLAB,
            "when: always",
            ["junit: chaos-reports/junit.xml", "artifacts:", "reports:"],
        ),
    ] {
        let text = read(file);
        for needle in [
            "gpuchaos validate \"$EXPERIMENT\"",
            "gpuchaos run \"$EXPERIMENT\" --report-dir \"$REPORT_DIR\"",
            "EXPERIMENT: examples/ci/experiment.yaml",
            "REPORT_DIR: chaos-reports",
            "chaos-reports/junit.xml",
            "chaos-reports/summary.md",
            "chaos-reports/report.html",
            "chaos-reports/journal.json",
            "gpuchaos_VERSION_amd64.deb",
            "sha256sum -c",
            "gpuchaos status",
            always,
        ]
        .into_iter()
        .chain(publish)
        {
            assert!(text.contains(needle), "{file} lacks {needle:?}");
        }
        // Each exit code has its own arm, and the job ends with the run's code.
        for code in 0..=4 {
            assert!(
                text.contains(&format!("{code}) echo")),
                "{file} does not handle exit code {code}"
            );
        }
        assert!(
            text.contains("exit \"$code\""),
            "{file} must end with the run's exit code"
        );
    }
    // The flags the templates use are the CLI's.
    assert!(
        run_help.stdout.contains("--report-dir"),
        "{}",
        run_help.stdout
    );
}

#[test]
fn the_templates_experiment_validates() {
    let out = gpuchaos(&["validate", repo().join(EXPERIMENT).to_str().unwrap()]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains(": ok (experiment"), "{out:?}");
}

/// The script in a CI file that runs the experiment, as the CI system would read it
/// (a YAML block scalar), through the YAML parser check-jsonschema brings.
fn run_script(file: &str) -> String {
    let python = check_jsonschema().parent().unwrap().join("python");
    let out = Command::new(&python)
        .arg("-c")
        .arg(
            r#"
import sys
from ruamel.yaml import YAML
doc = YAML(typ="safe").load(open(sys.argv[1]))
found = []
def walk(v):
    if isinstance(v, dict):
        for x in v.values(): walk(x)
    elif isinstance(v, list):
        for x in v: walk(x)
    elif isinstance(v, str) and "gpuchaos run " in v and "case" in v:
        found.append(v)
walk(doc)
assert len(found) == 1, found
sys.stdout.write(found[0])
"#,
        )
        .arg(repo().join(file))
        .output()
        .expect("run the virtualenv's python");
    assert!(
        out.status.success(),
        "{file}: no single run script: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn each_exit_code_fails_the_job_with_its_meaning() {
    let dir = tempfile::tempdir().unwrap();
    // A stand-in gpuchaos: `run` exits with $FAKE_CODE, `status` says who it is.
    let fake = dir.path().join("gpuchaos");
    std::fs::write(
        &fake,
        "#!/bin/sh\ncase \"$1\" in\n  status) echo 'FAKE STATUS of the agents' ;;\n  run) echo \"run $*\"; exit \"$FAKE_CODE\" ;;\nesac\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let meaning = [
        (0, "passed"),
        (1, "an objective failed"),
        (2, "aborted"),
        (3, "could not be injected"),
        (4, "left behind"),
        (64, "invalid input"),
        (70, "internal error"),
    ];
    for file in [GITHUB, GITLAB] {
        let script = run_script(file);
        for (code, says) in meaning {
            // Both CI systems run scripts with bash -e (GitLab adds -o pipefail).
            let out = Command::new("bash")
                .args(["-eo", "pipefail", "-c", &script])
                .env(
                    "PATH",
                    format!(
                        "{}:{}",
                        dir.path().display(),
                        std::env::var("PATH").unwrap_or_default()
                    ),
                )
                .env("FAKE_CODE", code.to_string())
                .env("EXPERIMENT", "examples/ci/experiment.yaml")
                .env("REPORT_DIR", dir.path().join("reports"))
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert_eq!(
                out.status.code(),
                Some(code),
                "{file}: the job must end with exit {code}: {text}"
            );
            assert!(
                text.contains(&format!("exit {code}")) && text.contains(says),
                "{file}: exit {code} must say {says:?}: {text}"
            );
            assert!(
                text.contains("--report-dir"),
                "{file}: the run had no --report-dir: {text}"
            );
            assert_eq!(
                text.contains("FAKE STATUS"),
                code == 4,
                "{file}: exit {code}: the agents' status is printed after a failed revert, only then: {text}"
            );
        }
    }
}

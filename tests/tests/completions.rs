//! `gpuchaos completions` and `gpuchaos man` for real: the bash script loaded into a
//! real bash and asked to complete, as bash does on TAB; the man pages rendered by
//! man(1) with groff's warnings on. Missing tools fail with the package to install.

use std::path::Path;
use std::process::Command;

use gpuchaos_tests::{bin, need_tool};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// What bash's programmable completion offers for `line` (the cursor at its end):
/// sources the script, finds the function `complete -p gpuchaos` names, sets
/// COMP_WORDS, COMP_CWORD, COMP_LINE and COMP_POINT as readline would, and calls it
/// with the command, the word being completed and the word before it.
fn complete(script: &Path, line: &str) -> Vec<String> {
    let driver = r#"
source "$1"
line=$2
func=$(complete -p gpuchaos | sed -n 's/.* -F \([^ ]*\) .*/\1/p')
[ -n "$func" ] || { echo "no completion function registered for gpuchaos" >&2; exit 3; }
read -r -a COMP_WORDS <<<"$line"
case "$line" in *' ') COMP_WORDS+=("") ;; esac
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
COMP_LINE=$line
COMP_POINT=${#line}
COMP_TYPE=9
prev=""
if (( COMP_CWORD > 0 )); then prev=${COMP_WORDS[COMP_CWORD-1]}; fi
"$func" gpuchaos "${COMP_WORDS[COMP_CWORD]}" "$prev"
printf '%s\n' "${COMPREPLY[@]}"
"#;
    let out = Command::new("bash")
        .args(["--norc", "--noprofile", "-c", driver, "driver"])
        .arg(script)
        .arg(line)
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "completing {line:?} failed: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn bash_completes_subcommands_their_flags_and_values() {
    need_tool("bash", "bash");
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("gpuchaos.bash");
    let out = Command::new(bin("gpuchaos"))
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::fs::write(&script, &out.stdout).unwrap();

    assert_eq!(complete(&script, "gpuchaos ru"), ["run"]);
    let all = complete(&script, "gpuchaos ");
    for sub in ["run", "status", "inject", "completions", "man"] {
        assert!(all.iter().any(|w| w == sub), "{sub} not offered: {all:?}");
    }
    assert_eq!(complete(&script, "gpuchaos run --dry"), ["--dry-run"]);
    let inject = complete(&script, "gpuchaos inject --");
    for flag in ["--file", "--attach", "--lease", "--agent"] {
        assert!(
            inject.iter().any(|w| w == flag),
            "{flag} not offered: {inject:?}"
        );
    }
    let shells = complete(&script, "gpuchaos completions ");
    for sh in ["bash", "zsh", "fish"] {
        assert!(
            shells.iter().any(|w| w == sh),
            "{sh} not offered: {shells:?}"
        );
    }
    assert_eq!(complete(&script, "gpuchaos completions z"), ["zsh"]);
}

#[test]
fn zsh_and_fish_scripts_are_generated() {
    for (shell, marker) in [
        ("zsh", "#compdef gpuchaos"),
        ("fish", "complete -c gpuchaos"),
    ] {
        let out = Command::new(bin("gpuchaos"))
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let s = text(&out.stdout);
        assert!(s.contains(marker), "{shell}: {s}");
        assert!(s.contains("dry-run"), "{shell} lacks run's flags");
    }
    let bad = Command::new(bin("gpuchaos"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(64));
}

/// The subcommands `gpuchaos --help` lists (all but `help`).
fn subcommands() -> Vec<String> {
    let out = Command::new(bin("gpuchaos"))
        .arg("--help")
        .output()
        .unwrap();
    let help = text(&out.stdout);
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .filter(|n| n != "help")
        .collect()
}

#[test]
fn man_writes_a_page_per_subcommand_that_renders_without_warnings() {
    need_tool("man", "man-db");
    need_tool("groff", "groff-base");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin("gpuchaos"))
        .args(["man", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let subs = subcommands();
    assert!(
        subs.len() >= 12 && subs.iter().any(|s| s == "man"),
        "{subs:?}"
    );
    let mut want: Vec<String> = subs.iter().map(|s| format!("gpuchaos-{s}.1")).collect();
    want.push("gpuchaos.1".into());
    want.push("gpuchaos-agent.1".into());
    want.sort();
    let mut got: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    got.sort();
    for w in &want {
        assert!(got.contains(w), "{w} was not written: {got:?}");
    }
    // The rest are nested subcommands' pages (gpuchaos-new-gameday.1): each names
    // a real command.
    for extra in got.iter().filter(|g| !want.contains(g)) {
        let words: Vec<&str> = extra
            .trim_end_matches(".1")
            .strip_prefix("gpuchaos-")
            .unwrap()
            .split('-')
            .collect();
        assert!(
            subs.iter().any(|s| s == words[0]) && words.len() > 1,
            "{extra}: not a subcommand's page"
        );
        let help = Command::new(bin("gpuchaos"))
            .args(&words)
            .arg("--help")
            .output()
            .unwrap();
        assert!(
            help.status.success(),
            "{extra}: `gpuchaos {}` is no command",
            words.join(" ")
        );
    }
    // Printed: one path per page.
    assert_eq!(text(&out.stdout).lines().count(), got.len());

    for page in &got {
        let path = dir.path().join(page);
        // man-db's own check, as lintian runs it: groff warnings on, output dropped.
        let r = Command::new("man")
            .args(["--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z"])
            .arg(&path)
            .env("MANWIDTH", "80")
            .env("LC_ALL", "C.UTF-8")
            .output()
            .unwrap();
        assert!(r.status.success(), "{page}: {}", text(&r.stderr));
        assert!(
            r.stderr.is_empty(),
            "{page} renders with warnings:\n{}",
            text(&r.stderr)
        );
    }
    // And a page reads as it should.
    let run = Command::new("man")
        .args(["-l", "-P", "cat"])
        .arg(dir.path().join("gpuchaos-run.1"))
        .env("MANWIDTH", "80")
        .env("LC_ALL", "C.UTF-8")
        .output()
        .unwrap();
    let run = text(&run.stdout);
    assert!(run.contains("gpuchaos run"), "{run}");
    assert!(run.contains("--dry-run"), "{run}");
    let agent = std::fs::read_to_string(dir.path().join("gpuchaos-agent.1")).unwrap();
    assert!(agent.contains("shutdown\\-grace"), "{agent}");
}

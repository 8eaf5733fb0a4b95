//! The Debian package for real (privileged: root, it installs into this machine's
//! dpkg database): scripts/package.sh builds it from a release build; lintian finds
//! no error or warning; `dpkg -i` puts every file where the list says, with the
//! unit installed but neither enabled nor started, and both binaries run from
//! /usr/bin; systemd-analyze verifies the installed unit; the shipped policy equals
//! the agent's built-in one; `dpkg -r` leaves only the configuration and the state
//! directory, a reinstall lifts the removal's mask, and `dpkg -P` leaves nothing,
//! not even the links of a unit the admin enabled.
//!
//! What it cannot do without systemd as PID 1: start the unit, or see prerm stop a
//! running agent (prerm skips that when /run/systemd/system is absent).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use gpuchaos_proto::pb;
use gpuchaos_tests::{need_tool, privileged};

const UNIT: &str = "/lib/systemd/system/gpuchaos-agent.service";
const STATE: &str = "/var/lib/gpuchaos";

/// Every file the package installs (directories aside).
const FILES: &[&str] = &[
    "/usr/bin/gpuchaos",
    "/usr/bin/gpuchaos-agent",
    UNIT,
    "/etc/gpuchaos/policy.yaml",
    "/etc/default/gpuchaos-agent",
    "/usr/share/doc/gpuchaos/copyright",
    "/usr/share/doc/gpuchaos/changelog.gz",
    "/usr/share/bash-completion/completions/gpuchaos",
    "/usr/share/zsh/vendor-completions/_gpuchaos",
    "/usr/share/fish/vendor_completions.d/gpuchaos.fish",
    "/usr/share/man/man1/gpuchaos.1.gz",
    "/usr/share/man/man1/gpuchaos-run.1.gz",
    "/usr/share/man/man1/gpuchaos-agent.1.gz",
];
const CONFFILES: &[&str] = &["/etc/default/gpuchaos-agent", "/etc/gpuchaos/policy.yaml"];
/// Links deb-systemd-helper or systemctl may make, and the state it keeps.
const SYSTEMD_LEFTOVERS: &[&str] = &[
    "/etc/systemd/system/gpuchaos-agent.service",
    "/etc/systemd/system/multi-user.target.wants/gpuchaos-agent.service",
    "/var/lib/systemd/deb-systemd-helper-enabled/gpuchaos-agent.service.dsh-also",
    "/var/lib/systemd/deb-systemd-helper-enabled/multi-user.target.wants/gpuchaos-agent.service",
    "/var/lib/systemd/deb-systemd-helper-masked/gpuchaos-agent.service",
];

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    eprintln!(
        "$ {cmd:?} -> {}\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn dpkg(args: &[&str]) -> String {
    ok(Command::new("dpkg")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn exists(p: &str) -> bool {
    Path::new(p).symlink_metadata().is_ok()
}

/// `dpkg-query`'s abbreviated status ("ii ", "rc "), or None when dpkg knows no
/// such package.
fn status() -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev}", "gpuchaos"])
        .output()
        .unwrap();
    (out.status.success() && !out.stdout.is_empty()).then(|| text(&out.stdout))
}

/// Purges the package when the test ends, however it ends.
struct Purge;
impl Drop for Purge {
    fn drop(&mut self) {
        if status().is_some() {
            // Forced: a test that failed midway may have left its own open intent.
            let _ = Command::new("dpkg")
                .args(["-P", "gpuchaos"])
                .env("GPUCHAOS_FORCE_REMOVE", "1")
                .status();
        }
        // And the copy purge kept of the test's own journal.
        for e in std::fs::read_dir("/var/backups")
            .into_iter()
            .flatten()
            .flatten()
        {
            let p = e.path();
            if p.to_string_lossy().contains("gpuchaos-journal-")
                && std::fs::read_to_string(&p).is_ok_and(|t| t.contains("f-test-open"))
            {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
}

/// The policy an installed agent reports (GetInfo), started with `args`.
fn reported_policy(args: &[&str], state_dir: &Path) -> String {
    let mut child = Command::new("/usr/bin/gpuchaos-agent")
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(state_dir)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start /usr/bin/gpuchaos-agent");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let grpc = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("grpc="))
        .map(String::from);
    let yaml = grpc.map(|addr| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut c = pb::agent_client::AgentClient::connect(format!("http://{addr}"))
                .await
                .expect("connect to the installed agent");
            c.get_info(pb::GetInfoRequest {})
                .await
                .expect("GetInfo")
                .into_inner()
                .policy_yaml
        })
    });
    // SIGTERM: a clean stop, as systemd's would be.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let done = child.wait().unwrap();
    let yaml = yaml.unwrap_or_else(|| panic!("the installed agent did not start: {line:?}"));
    assert!(done.success(), "the agent did not stop cleanly: {done}");
    yaml
}

fn build_package(root: &Path) -> PathBuf {
    let out = ok(Command::new("bash")
        .arg("scripts/package.sh")
        .current_dir(root));
    let deb = root.join(
        out.lines()
            .last()
            .expect("package.sh printed the package's path"),
    );
    assert!(deb.is_file(), "{} is missing", deb.display());
    deb
}

#[test]
fn deb_lints_clean_installs_where_it_says_and_purges_to_nothing() {
    if !privileged("the package test (dpkg -i, -r, -P)") {
        return;
    }
    for (tool, pkg) in [
        ("dpkg-deb", "dpkg"),
        ("dpkg-shlibdeps", "dpkg-dev"),
        ("strip", "binutils"),
        ("readelf", "binutils"),
        ("lintian", "lintian"),
        ("systemd-analyze", "systemd"),
        ("systemctl", "systemd"),
        ("deb-systemd-helper", "init-system-helpers"),
        ("man", "man-db"),
    ] {
        need_tool(tool, pkg);
    }
    // Never touch a real installation: its journal may hold faults to revert.
    assert!(
        !exists(STATE),
        "{STATE} exists: this test installs the package and purges it, which deletes {STATE}; move it away first"
    );
    assert!(
        status().is_none(),
        "a gpuchaos package is installed on this machine: this test installs and purges its own; remove that one by hand first (dpkg -P gpuchaos)"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let version = env!("CARGO_PKG_VERSION");
    let deb = build_package(root);
    assert!(
        deb.ends_with(format!("gpuchaos_{version}_amd64.deb")),
        "{}",
        deb.display()
    );
    eprintln!(
        "package: {} ({} bytes)",
        deb.display(),
        std::fs::metadata(&deb).unwrap().len()
    );

    // The package's own metadata.
    let info = ok(Command::new("dpkg-deb").arg("--info").arg(&deb));
    assert!(info.contains("Depends: libc6"), "{info}");
    assert!(
        info.contains("Recommends: nftables, iproute2, util-linux (>= 2.23)"),
        "{info}"
    );
    let contents = ok(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    for f in FILES {
        assert!(
            contents.contains(&format!(".{f}\n")) || contents.contains(&format!(".{f} ")),
            "{f} is not in the package:\n{contents}"
        );
    }
    assert!(
        !contents.contains("./var/lib/gpuchaos"),
        "the state directory belongs to systemd (StateDirectory), not to dpkg"
    );

    // Lintian: no error, no warning (overrides carry their reasons).
    let lint = run(Command::new("lintian")
        .args([
            "--allow-root",
            "--fail-on",
            "error,warning",
            "--display-info",
        ])
        .arg(&deb));
    assert!(
        lint.status.success(),
        "lintian: {}{}",
        text(&lint.stdout),
        text(&lint.stderr)
    );
    let tags = text(&lint.stdout);
    assert!(
        !tags
            .lines()
            .any(|l| l.starts_with("E: ") || l.starts_with("W: ")),
        "{tags}"
    );

    let _purge = Purge;
    dpkg(&["-i", deb.to_str().unwrap()]);
    assert_eq!(status().as_deref(), Some("ii "));

    // Every file where the list says, and nothing else.
    let listed = dpkg(&["-L", "gpuchaos"]);
    let listed_files: Vec<&str> = listed
        .lines()
        // metadata, not symlink_metadata: /lib is a link to usr/lib on merged-/usr.
        .filter(|l| Path::new(l).metadata().is_ok_and(|m| !m.is_dir()))
        .collect();
    for f in FILES {
        assert!(listed_files.contains(f), "{f} not in dpkg -L:\n{listed}");
        assert!(exists(f), "{f} is not on disk");
    }
    for f in &listed_files {
        assert!(
            FILES.contains(f) || f.starts_with("/usr/share/man/man1/gpuchaos-"),
            "{f} is installed but not in the list this test expects"
        );
    }
    let pages = listed_files
        .iter()
        .filter(|f| f.starts_with("/usr/share/man/man1/"))
        .count();
    assert!(pages >= 15, "{pages} man pages");
    let db_conffiles = ok(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "gpuchaos"]));
    for c in CONFFILES {
        assert!(
            db_conffiles.contains(c),
            "{c} is not a conffile: {db_conffiles}"
        );
    }

    // Both binaries run from /usr/bin, stripped.
    for b in ["gpuchaos", "gpuchaos-agent"] {
        let v = ok(Command::new(format!("/usr/bin/{b}")).arg("--version"));
        assert!(v.starts_with(&format!("{b} {version}")), "{v}");
        let sections = ok(Command::new("readelf")
            .args(["-S", "-W"])
            .arg(format!("/usr/bin/{b}")));
        assert!(
            ![".debug_info", ".debug_line", ".symtab"]
                .iter()
                .any(|s| sections.contains(s)),
            "/usr/bin/{b} is not stripped"
        );
    }
    let page = run(Command::new("man")
        .args([
            "--warnings",
            "-E",
            "UTF-8",
            "-Tutf8",
            "-Z",
            "gpuchaos-agent",
        ])
        .env("MANWIDTH", "80")
        .stdout(Stdio::null()));
    assert!(
        page.status.success() && page.stderr.is_empty(),
        "man gpuchaos-agent: {}",
        text(&page.stderr)
    );

    // Installed, not enabled, not started; the unit verifies against the installed
    // files (its ExecStart binary, its Documentation= man pages).
    assert!(
        !exists("/etc/systemd/system/multi-user.target.wants/gpuchaos-agent.service"),
        "the package enabled the agent"
    );
    let verify = run(Command::new("systemd-analyze").args(["verify", UNIT]));
    assert!(
        verify.status.success() && verify.stdout.is_empty() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        text(&verify.stdout),
        text(&verify.stderr)
    );
    let security = run(Command::new("systemd-analyze").args(["security", "--offline=yes", UNIT]));
    assert!(security.status.success());
    let unit = std::fs::read_to_string(UNIT).unwrap();
    for want in [
        "ExecStart=/usr/bin/gpuchaos-agent --state-dir /var/lib/gpuchaos --policy /etc/gpuchaos/policy.yaml $GPUCHAOS_AGENT_OPTS",
        "StateDirectory=gpuchaos",
        "KillMode=mixed",
        "Restart=on-failure",
    ] {
        assert!(unit.contains(want), "the unit lacks {want}");
    }
    // TimeoutStopSec above the agent's default shutdown grace (30s).
    let stop: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.trim().parse().ok())
        .expect("TimeoutStopSec= in seconds");
    assert!(stop > 30, "TimeoutStopSec={stop} cuts the 30s revert short");
    for banned in [
        "PrivateNetwork=",
        "RestrictNamespaces=",
        "PrivateDevices=",
        "PrivateUsers=",
        "DynamicUser=",
        "MemoryDenyWriteExecute=",
        "ProtectKernelModules=",
    ] {
        assert!(
            !unit.lines().any(|l| l.starts_with(banned)),
            "{banned} would break a fault kind"
        );
    }

    // The shipped policy is the built-in one, and the agent runs with it as the
    // unit runs it (in the unit's state directory).
    let scratch = tempfile::tempdir().unwrap();
    let builtin = reported_policy(&[], scratch.path());
    let shipped = reported_policy(&["--policy", "/etc/gpuchaos/policy.yaml"], Path::new(STATE));
    assert_eq!(
        shipped, builtin,
        "packaging/policy.yaml differs from the defaults"
    );
    assert!(exists(STATE));

    // A journal that names a fault never reverted: removal refuses (once the binary
    // is gone nothing could revert it), says which, and goes on only when forced.
    let journal = format!("{STATE}/journal.jsonl");
    let before = std::fs::read(&journal).unwrap_or_default();
    let open = r#"{"rec":"intent","id":"f-test-open","kind":"process","spec_json":"{}","target":"pid 1","plan":{},"unix_ms":1}"#;
    std::fs::write(
        &journal,
        [before.as_slice(), open.as_bytes(), b"\n"].concat(),
    )
    .unwrap();
    let refused = Command::new("dpkg")
        .args(["-r", "gpuchaos"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "removal went on with an open fault"
    );
    let said = text(&refused.stderr);
    assert!(
        said.contains("never reverted")
            && said.contains("f-test-open")
            && said.contains("GPUCHAOS_FORCE_REMOVE=1"),
        "{said}"
    );
    // Still installed ("ri": removal requested, the package as it was).
    let st = status().unwrap_or_default();
    assert_eq!(
        st.get(1..2),
        Some("i"),
        "a refused removal leaves it installed: {st:?}"
    );
    assert!(exists("/usr/bin/gpuchaos-agent"));
    let reverted = r#"{"rec":"reverted","id":"f-test-open","reason":"test","unix_ms":2}"#;
    let with_open = std::fs::read(&journal).unwrap();
    std::fs::write(
        &journal,
        [with_open.as_slice(), reverted.as_bytes(), b"\n"].concat(),
    )
    .unwrap();

    // Remove: the configuration and the journal stay, everything else goes.
    dpkg(&["-r", "gpuchaos"]);
    assert_eq!(status().as_deref(), Some("rc "));
    for f in FILES.iter().filter(|f| !CONFFILES.contains(f)) {
        assert!(!exists(f), "{f} is left after dpkg -r");
    }
    for c in CONFFILES {
        assert!(exists(c), "{c} (a conffile) is gone after dpkg -r");
    }
    assert!(exists(STATE), "{STATE} must stay until purge");
    // While only the configuration is left, the unit is masked (deb-systemd-helper).
    let mask = std::fs::read_link("/etc/systemd/system/gpuchaos-agent.service");
    assert_eq!(
        mask.ok(),
        Some(PathBuf::from("/dev/null")),
        "the removed unit is not masked"
    );

    // Reinstall: the mask is lifted, the admin enables the agent, purge undoes all.
    dpkg(&["-i", deb.to_str().unwrap()]);
    assert!(
        !exists("/etc/systemd/system/gpuchaos-agent.service"),
        "the reinstall left the unit masked"
    );
    ok(Command::new("systemctl").args(["enable", "gpuchaos-agent.service"]));
    assert!(exists(
        "/etc/systemd/system/multi-user.target.wants/gpuchaos-agent.service"
    ));

    // Purge keeps a copy of a journal that holds intents (the only record of what
    // to revert by hand), then removes the state directory.
    let backups = || -> Vec<PathBuf> {
        std::fs::read_dir("/var/backups")
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.to_string_lossy().contains("gpuchaos-journal-"))
                    .collect()
            })
            .unwrap_or_default()
    };
    let had = backups();
    dpkg(&["-P", "gpuchaos"]);
    let kept: Vec<PathBuf> = backups().into_iter().filter(|b| !had.contains(b)).collect();
    assert_eq!(
        kept.len(),
        1,
        "the journal with intents was not kept: {kept:?}"
    );
    assert!(
        std::fs::read_to_string(&kept[0])
            .unwrap()
            .contains("f-test-open")
    );
    std::fs::remove_file(&kept[0]).unwrap();
    assert_eq!(status(), None, "dpkg still knows gpuchaos after -P");
    for f in FILES
        .iter()
        .chain(SYSTEMD_LEFTOVERS)
        .chain(&[STATE, "/etc/gpuchaos"])
    {
        assert!(!exists(f), "{f} is left after dpkg -P");
    }
    let stray = ok(Command::new("find").args([
        "/etc",
        "/lib/systemd",
        "/usr/bin",
        "/usr/share",
        "/var/lib/systemd",
        "-name",
        "*gpuchaos*",
    ]));
    assert!(stray.trim().is_empty(), "left after purge:\n{stray}");
}

//! `gpuchaos demo` end to end: the reference stack on the fake GPU, a game day over
//! every fault kind (network too when root), exit 0 and the reports written.

use std::process::{Command, Stdio};

use gpuchaos_tests::*;

#[test]
fn the_demo_game_day_passes_and_writes_its_reports() {
    let dir = tempfile::tempdir().unwrap();
    let t = std::time::Instant::now();
    // As root the demo's network fault goes on loopback: in a namespace of the test's
    // own, never the machine's.
    let ns = nix::unistd::geteuid()
        .is_root()
        .then(gpuchaos_tests::netns::Netns::new);
    let mut cmd = match &ns {
        Some(ns) => ns.command(&bin("gpuchaos")),
        None => Command::new(bin("gpuchaos")),
    };
    let out = cmd
        .arg("demo")
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("run gpuchaos demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("verdict: passed (exit 0)"), "{stdout}");
    // The run's events go to stderr.
    for kind in ["worker-crash", "gpu-pressure", "guardrail-outage"] {
        assert!(
            stderr.contains(&format!("{kind}: ")),
            "{kind} missing: {stderr}"
        );
    }
    if nix::unistd::geteuid().is_root() {
        assert!(stderr.contains("network-latency: "), "{stderr}");
    } else {
        assert!(stdout.contains("skipped: the network fault"), "{stdout}");
    }
    let reports = dir.path().join("gpuchaos-demo-report");
    for f in ["report.html", "junit.xml", "journal.json", "summary.md"] {
        assert!(reports.join(f).exists(), "{f} missing");
    }
    assert!(
        t.elapsed().as_secs() < 180,
        "the demo must take under 3 minutes"
    );
    // Only this demo's processes count (other tests run reference stacks at the same
    // time): they carry the demo's own directory in their environment.
    let demo_dir = stdout
        .split("logs in ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("the demo names its log directory")
        .to_string();
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .filter(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
            String::from_utf8_lossy(&cmd).contains("gpuchaos-refstack")
                && String::from_utf8_lossy(&env).contains(&demo_dir)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        left.is_empty(),
        "the demo must leave no stack process behind: {left:?}"
    );
}

/// As root on a machine without nftables, the demo skips the network step, saying
/// what to install, and still passes (the README's main command must pass whoever
/// runs it). `nft` is hidden in a mount namespace of the test's own (a bind mount of
/// /dev/null over it), so the machine keeps its tools.
#[test]
fn the_demo_as_root_without_nftables_skips_the_network_step_and_passes() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: hiding nft needs root; CI runs as root");
        return;
    }
    let nft = ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .expect("scripts/test.sh installs nftables");
    let dir = tempfile::tempdir().unwrap();
    let ns = gpuchaos_tests::netns::Netns::new();
    let script = format!(
        "mount --bind /dev/null {nft} && exec nsenter --net=/run/netns/{} -- {} demo",
        ns.name,
        bin("gpuchaos").display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("run gpuchaos demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("skipped: the network fault: `nft` is not installed on this node: install the nftables package"),
        "{stdout}"
    );
    assert!(!stderr.contains("network-latency: "), "{stderr}");
    assert!(stdout.contains("verdict: passed (exit 0)"), "{stdout}");
}

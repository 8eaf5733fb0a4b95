//! scripts/gpu-check.sh, the real-GPU check, run here against the fake driver so
//! that it never goes stale: every row of its table passes, and it says which
//! driver it checked.

use std::process::Command;

use gpuchaos_tests::*;

#[test]
fn the_gpu_check_script_passes_every_check_on_the_fake_driver() {
    need_tool("python3", "python3");
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let bin = bin("gpuchaos-agent");
    let out = Command::new("bash")
        .arg(repo.join("scripts/gpu-check.sh"))
        .args(["--fake", "--bin"])
        .arg(bin.parent().unwrap())
        .output()
        .expect("run scripts/gpu-check.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| check"))
        .collect();
    for check in [
        "gpu_memory 50%",
        "gpu_memory 95%",
        "second process asks free + 1 GiB",
        "agent SIGKILL while 95% held",
        "gpu_compute 50%",
        "gpu_compute 90%",
        "gpu_xid 79 (CUDA layer)",
    ] {
        let row = rows
            .iter()
            .find(|r| r.starts_with(&format!("| {check} |")))
            .unwrap_or_else(|| panic!("no row {check:?} in\n{stdout}"));
        assert!(row.ends_with("| PASS |"), "{row}");
    }
    assert!(stdout.contains("CUDA_ERROR_OUT_OF_MEMORY"), "{stdout}");
    assert!(stdout.contains("NVRM: Xid"), "{stdout}");
    assert!(
        stdout.contains("(fake driver): every check passed"),
        "{stdout}"
    );
}

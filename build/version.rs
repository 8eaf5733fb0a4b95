//! Build script shared by the `gpuchaos` and `gpuchaos-agent` binaries: names the
//! commit they were built from, for `--version`. `GPUCHAOS_COMMIT` (set by a package
//! build from a tarball, say) wins; else `git rev-parse`; else "unknown". Re-runs
//! when HEAD moves, not on every edit (a dirty tree is not marked).

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=GPUCHAOS_COMMIT");
    let commit = std::env::var("GPUCHAOS_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(from_git)
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=GPUCHAOS_COMMIT={}", commit.trim());
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

fn from_git() -> Option<String> {
    let dir = git(&["rev-parse", "--absolute-git-dir"])?;
    for watched in ["HEAD", "refs/heads", "packed-refs"] {
        let p = std::path::Path::new(&dir).join(watched);
        if p.exists() {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }
    git(&["rev-parse", "--short=12", "HEAD"])
}

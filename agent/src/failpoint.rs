//! Crash points for the crash-safety tests: `GPUCHAOS_FAILPOINT=after-intent` (a
//! comma-separated list) makes the agent SIGKILL itself when it reaches that point,
//! exactly as a power cut or an OOM kill would stop it. Unset, each check is one
//! load of an already-initialised static.
//!
//! Points, in the order an inject passes them: `after-intent` (journaled, nothing
//! done), `mid-effect` (the first target hit, the others not), `after-effect` (every
//! target hit, not yet verified), `after-applied` (verified and journaled).
//!
//! Compiled in only with the `test-hooks` feature (scripts/test.sh builds with it):
//! a production agent, running as root, never kills itself on an environment
//! variable. Without the feature, [`hit`] does nothing and [`warn_if_ignored`] says
//! at start-up that the variable is ignored.

#[cfg(feature = "test-hooks")]
use std::sync::OnceLock;

pub const ENV: &str = "GPUCHAOS_FAILPOINT";

#[cfg(feature = "test-hooks")]
static POINTS: OnceLock<Vec<String>> = OnceLock::new();

/// Says, once at start-up, that `GPUCHAOS_FAILPOINT` is set but this build ignores it.
pub fn warn_if_ignored() {
    if !cfg!(feature = "test-hooks") && std::env::var_os(ENV).is_some() {
        tracing::warn!(
            "{ENV} is set but ignored: this agent was built without the test-hooks feature (cargo build --features gpuchaos-agent/test-hooks)"
        );
    }
}

#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn hit(_name: &str) {}

#[cfg(feature = "test-hooks")]
pub fn hit(name: &str) {
    let points = POINTS.get_or_init(|| {
        std::env::var(ENV)
            .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
            .unwrap_or_default()
    });
    if points.iter().any(|p| p == name) {
        eprintln!("gpuchaos-agent: failpoint {name} reached: killing the agent with SIGKILL");
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
        // SIGKILL cannot be caught; never get here.
        std::process::abort();
    }
}

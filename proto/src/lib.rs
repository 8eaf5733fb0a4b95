//! The gpuchaos contract shared by the agent and the controller.
//!
//! - [`pb`]: the gRPC service and messages generated from `proto/agent.proto`.
//! - [`spec`]: the fault spec (what a user writes in YAML, sent to agents as JSON),
//!   with parsing that names the failing field and validation that reports every
//!   problem at once.
//! - [`signal`]: Linux signal names and numbers, so both sides agree on `signal:`.
//! - [`clock`]: the monotonic and wall clocks fault times are stamped with.
//! - [`files`]: reading user-named files with a size limit (regular files only).

pub mod clock;
pub mod files;
pub mod signal;
pub mod spec;

#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("gpuchaos.agent.v1");
}

/// The version every gpuchaos binary reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `0.1.0 (commit 1a2b3c4d5e6f)`: the release and the commit a binary was built
/// from, for `--version`. Expands in the calling crate, whose build script must be
/// build/version.rs (it sets `GPUCHAOS_COMMIT`).
#[macro_export]
macro_rules! long_version {
    () => {
        concat!(
            env!("CARGO_PKG_VERSION"),
            " (commit ",
            env!("GPUCHAOS_COMMIT"),
            ")"
        )
    };
}

/// Human name of a fault state as printed by the CLI and written in reports.
pub fn state_name(state: pb::FaultState) -> &'static str {
    use pb::FaultState as S;
    match state {
        S::Unspecified => "unknown",
        S::Pending => "pending",
        S::Injecting => "injecting",
        S::Active => "active",
        S::Reverting => "reverting",
        S::Reverted => "reverted",
        S::Failed => "failed",
    }
}

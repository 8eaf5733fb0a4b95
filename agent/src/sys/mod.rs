//! Every system call, `/proc` read and driver call the agent makes lives here, behind
//! small interfaces. The logic above is tested against recording fakes; the
//! privileged end-to-end tests exercise these implementations for real.

pub mod clock;
pub mod cuda;
#[cfg(test)]
pub mod fake;
pub mod gpu;
pub mod netns;
pub mod nft;
pub mod procfs;
pub mod tools;

pub use procfs::{ProcStat, Processes, RealProcesses};

//! Every system call, `/proc` read and driver call the agent makes lives here, behind
//! small interfaces. The logic above is tested against recording fakes; the
//! privileged end-to-end tests exercise these implementations for real.

pub mod clock;
pub mod cuda;
pub mod gpu;
pub mod netns;
pub mod procfs;

pub use procfs::{ProcStat, Processes, RealProcesses};

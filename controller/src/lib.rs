//! gpuchaos controller: the `gpuchaos` CLI and the library it is built from.
//!
//! - [`fleet`]: which agents to talk to (`--agent`, `--fleet`), TLS, connections.
//! - [`commands`]: one module per subcommand (status, inject, revert, halt, certs,
//!   validate, demo).
//! - [`exit`]: the fixed exit codes CI can act on; [`output`]: text or JSON.

pub mod commands;
pub mod exit;
pub mod fleet;
pub mod output;

//! gpuchaos controller: the `gpuchaos` CLI and the library it is built from.
//!
//! - [`fleet`]: which agents to talk to (`--agent`, `--fleet`), TLS, connections.
//! - [`commands`]: one module per subcommand (status, inject, revert, halt, certs,
//!   validate, run, demo).
//! - [`experiment`]: the experiment file, its loader (every error, located) and plan.
//! - [`probe`]: http, tcp, command, prometheus, openai and guardrail probes.
//! - [`runner`]: runs an experiment: sessions, probes, steps, objectives, rollback.
//! - [`report`]: journal.json, junit.xml, summary.md, report.html and the final table.
//! - [`exit`]: the fixed exit codes CI can act on; [`output`]: text or JSON.

pub mod commands;
pub mod exit;
pub mod experiment;
pub mod fleet;
pub mod gameday;
pub mod output;
pub mod probe;
pub mod report;
pub mod runner;

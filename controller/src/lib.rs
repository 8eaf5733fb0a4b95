//! gpuchaos controller: the `gpuchaos` CLI and the library it is built from
//! (`main.rs` only parses flags and calls [`commands`]).
//!
//! - [`fleet`]: which agents to talk to (`--agent`, `--fleet`), TLS, connections.
//! - [`commands`]: one module per subcommand (status, inject, revert, halt, certs,
//!   validate, run, demo, report, history, serve).
//! - [`experiment`]: the experiment file (its serde form is the JSON Schema), the
//!   loader that reports every error at once, located, and hands on a
//!   [`ValidExperiment`](experiment::ValidExperiment) whose choices are enums, and
//!   the plan (which faults go to which agents; `--dry-run`).
//! - [`probe`]: http, tcp, command, prometheus, openai and guardrail probes.
//! - [`runner`]: runs an experiment: preflight, sessions and their leases, probes,
//!   trials, stop conditions, objectives, rollback, the verdict and the journal.
//! - [`report`]: journal.json, junit.xml, summary.md, report.html and the final table.
//! - [`gameday`]: scheduled game days (`gpuchaos serve`): the file, the schedule,
//!   one run's execution under a lock, the history, notifications, the web page.
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

//! Output for humans (text) or scripts (JSON).

use std::io::IsTerminal;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// Is stdout a terminal (live progress) or a pipe/CI log (plain lines)?
pub fn is_terminal() -> bool {
    std::io::stdout().is_terminal()
}

/// Formats a duration in nanoseconds the way the CLI prints times.
pub fn human_ns(ns: u64) -> String {
    let d = std::time::Duration::from_nanos(ns);
    if d.as_secs() >= 1 {
        humantime::format_duration(std::time::Duration::from_millis(d.as_millis() as u64))
            .to_string()
    } else {
        format!("{:.1}ms", ns as f64 / 1e6)
    }
}

pub fn human_bytes(b: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    if b as f64 >= GIB {
        format!("{:.1} GiB", b as f64 / GIB)
    } else {
        format!("{:.0} MiB", b as f64 / MIB)
    }
}

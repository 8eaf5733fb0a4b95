//! Output for humans (text) or scripts (JSON).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

static QUIET: AtomicBool = AtomicBool::new(false);

/// `-q`: say only errors, warnings and results (no progress, no notes).
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// A note for the person at the terminal (stderr), left out under `-q`.
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {
        if !$crate::output::quiet() {
            eprintln!($($arg)*);
        }
    };
}

/// Colours and cursor control only on a terminal, and never with `NO_COLOR` set
/// (to anything but empty: no-color.org).
pub fn stderr_styled() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

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

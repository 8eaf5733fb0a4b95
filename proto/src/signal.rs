//! Linux signal names and numbers (x86-64 and arm64 agree on 1-31), and the one
//! way every gpuchaos binary waits for SIGTERM or SIGINT ([`Terminations`]).

const SIGNALS: &[(&str, i32)] = &[
    ("SIGHUP", 1),
    ("SIGINT", 2),
    ("SIGQUIT", 3),
    ("SIGILL", 4),
    ("SIGTRAP", 5),
    ("SIGABRT", 6),
    ("SIGBUS", 7),
    ("SIGFPE", 8),
    ("SIGKILL", 9),
    ("SIGUSR1", 10),
    ("SIGSEGV", 11),
    ("SIGUSR2", 12),
    ("SIGPIPE", 13),
    ("SIGALRM", 14),
    ("SIGTERM", 15),
    ("SIGSTKFLT", 16),
    ("SIGCHLD", 17),
    ("SIGCONT", 18),
    ("SIGSTOP", 19),
    ("SIGTSTP", 20),
    ("SIGTTIN", 21),
    ("SIGTTOU", 22),
    ("SIGURG", 23),
    ("SIGXCPU", 24),
    ("SIGXFSZ", 25),
    ("SIGVTALRM", 26),
    ("SIGPROF", 27),
    ("SIGWINCH", 28),
    ("SIGIO", 29),
    ("SIGPWR", 30),
    ("SIGSYS", 31),
];

/// Parses `SIGKILL`, `KILL`, `sigkill` or `9` into a signal number.
pub fn parse(text: &str) -> Option<i32> {
    let t = text.trim();
    if let Ok(n) = t.parse::<i32>() {
        return SIGNALS.iter().any(|&(_, v)| v == n).then_some(n);
    }
    let upper = t.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    SIGNALS.iter().find(|&&(n, _)| n == full).map(|&(_, v)| v)
}

/// The name of a signal number (`9` → `SIGKILL`).
pub fn name(number: i32) -> String {
    SIGNALS
        .iter()
        .find(|&&(_, v)| v == number)
        .map(|&(n, _)| n.to_string())
        .unwrap_or_else(|| format!("signal {number}"))
}

/// SIGTERM and SIGINT, installed once: what the agent, `run`, `serve` and
/// `inject --attach` stop on. Installing fails only outside a Tokio runtime or when
/// the process may not handle signals; each caller says what that means for it.
#[derive(Debug)]
pub struct Terminations {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Terminations {
    pub fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Terminations {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for the next SIGTERM or SIGINT and names it. Cancel-safe: may be
    /// polled again and again in a `select!` loop.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_numbers() {
        assert_eq!(parse("SIGKILL"), Some(9));
        assert_eq!(parse("kill"), Some(9));
        assert_eq!(parse("sigterm"), Some(15));
        assert_eq!(parse("19"), Some(19));
        assert_eq!(parse("SIGNOPE"), None);
        assert_eq!(parse("0"), None);
        assert_eq!(parse("64"), None);
        assert_eq!(name(15), "SIGTERM");
    }
}

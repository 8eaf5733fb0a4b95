//! Processes: listing and reading `/proc`, and sending signals.
//!
//! A process is identified by its pid *and* its start time (field 22 of
//! /proc/PID/stat): the journal stores both, so a pid reused after a crash is never
//! signalled by mistake.

use std::io;
use std::path::PathBuf;

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// What the agent needs from /proc/PID/stat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: u32,
    pub comm: String,
    /// R, S, D, T (stopped), t (traced), Z (zombie), X (dead), I (idle) ...
    pub state: char,
    pub ppid: u32,
    pub flags: u64,
    pub start_time: u64,
}

/// Linux `PF_KTHREAD`: the process is a kernel thread.
const PF_KTHREAD: u64 = 0x0020_0000;

impl ProcStat {
    pub fn is_kernel_thread(&self) -> bool {
        self.flags & PF_KTHREAD != 0 || self.pid == 2 || self.ppid == 2
    }
    pub fn is_stopped(&self) -> bool {
        self.state == 'T' || self.state == 't'
    }
    pub fn is_dead(&self) -> bool {
        self.state == 'Z' || self.state == 'X'
    }
}

/// Parses the text of /proc/PID/stat. The command name sits in parentheses and
/// may itself contain spaces and parentheses, so fields are counted from the last ')'.
pub fn parse_stat(pid: u32, text: &str) -> io::Result<ProcStat> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("malformed /proc/{pid}/stat"),
        )
    };
    let open = text.find('(').ok_or_else(bad)?;
    let close = text.rfind(')').ok_or_else(bad)?;
    let comm = text.get(open + 1..close).ok_or_else(bad)?.to_string();
    let rest: Vec<&str> = text
        .get(close + 1..)
        .ok_or_else(bad)?
        .split_whitespace()
        .collect();
    // rest[0] is field 3 (state); field N is rest[N - 3].
    let field = |n: usize| rest.get(n - 3).copied().ok_or_else(bad);
    Ok(ProcStat {
        pid,
        comm,
        state: field(3)?.chars().next().ok_or_else(bad)?,
        ppid: field(4)?.parse().map_err(|_| bad())?,
        flags: field(9)?.parse().map_err(|_| bad())?,
        start_time: field(22)?.parse().map_err(|_| bad())?,
    })
}

/// The process table and signals, behind an interface so fault logic can be tested
/// against a fake.
pub trait Processes: Send + Sync + 'static {
    fn pids(&self) -> io::Result<Vec<u32>>;
    /// `Ok(None)` when the process does not exist (any more).
    fn stat(&self, pid: u32) -> io::Result<Option<ProcStat>>;
    fn cmdline(&self, pid: u32) -> io::Result<Option<Vec<String>>>;
    /// The cgroup v2 path ("/system.slice/x.service"), from the `0::` line.
    fn cgroup(&self, pid: u32) -> io::Result<Option<String>>;
    /// Sends `signal` (a Linux signal number). `ESRCH` (no such process) is returned
    /// as is; callers decide whether it means success.
    fn signal(&self, pid: u32, signal: i32) -> Result<(), Errno>;
    /// The agent's own pid.
    fn self_pid(&self) -> u32;
}

/// The real /proc (the root is a parameter so a test can point it elsewhere).
#[derive(Debug, Clone)]
pub struct RealProcesses {
    root: PathBuf,
}

impl Default for RealProcesses {
    fn default() -> Self {
        RealProcesses {
            root: PathBuf::from("/proc"),
        }
    }
}

fn none_if_gone<T>(r: io::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc_esrch()) => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn libc_esrch() -> i32 {
    Errno::ESRCH as i32
}

impl Processes for RealProcesses {
    fn pids(&self) -> io::Result<Vec<u32>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.root)? {
            let entry = entry?;
            if let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            {
                out.push(pid);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    fn stat(&self, pid: u32) -> io::Result<Option<ProcStat>> {
        match none_if_gone(std::fs::read_to_string(
            self.root.join(pid.to_string()).join("stat"),
        ))? {
            Some(text) => parse_stat(pid, &text).map(Some),
            None => Ok(None),
        }
    }

    fn cmdline(&self, pid: u32) -> io::Result<Option<Vec<String>>> {
        let raw = none_if_gone(std::fs::read(
            self.root.join(pid.to_string()).join("cmdline"),
        ))?;
        Ok(raw.map(|bytes| {
            bytes
                .split(|b| *b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        }))
    }

    fn cgroup(&self, pid: u32) -> io::Result<Option<String>> {
        let text = none_if_gone(std::fs::read_to_string(
            self.root.join(pid.to_string()).join("cgroup"),
        ))?;
        Ok(text.map(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("0::"))
                .unwrap_or("")
                .to_string()
        }))
    }

    fn signal(&self, pid: u32, signal: i32) -> Result<(), Errno> {
        let sig = Signal::try_from(signal).map_err(|_| Errno::EINVAL)?;
        let r = nix::sys::signal::kill(Pid::from_raw(pid as i32), sig);
        tracing::debug!(pid, signal = %gpuchaos_proto::signal::name(signal), result = ?r, "kill(2)");
        r
    }

    fn self_pid(&self) -> u32 {
        std::process::id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_tricky_comm() {
        let text = "4242 (my (odd) proc) T 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 18446744073709551615";
        let s = parse_stat(4242, text).unwrap();
        assert_eq!(s.comm, "my (odd) proc");
        assert_eq!(s.state, 'T');
        assert_eq!(s.ppid, 1);
        assert_eq!(s.flags, 4194560);
        assert_eq!(s.start_time, 987654);
        assert!(s.is_stopped());
        assert!(!s.is_kernel_thread());
    }

    #[test]
    fn reads_own_process() {
        let p = RealProcesses::default();
        let me = p.stat(std::process::id()).unwrap().unwrap();
        assert!(!me.is_stopped() && !me.is_dead());
        assert!(!p.cmdline(std::process::id()).unwrap().unwrap().is_empty());
        assert!(p.stat(u32::MAX - 1).unwrap().is_none());
        assert!(p.pids().unwrap().contains(&std::process::id()));
    }
}

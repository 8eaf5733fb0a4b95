//! The agent's command line: its flags as one clap definition, parsed by the
//! `gpuchaos-agent` binary and read by `gpuchaos man`, which writes the agent's man
//! page from it (so the page cannot drift from the flags).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, Parser, ValueEnum};

use crate::AgentConfig;
use crate::tls::TlsFiles;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `0.1.0 (commit 1a2b3c4d5e6f)`: the release and the commit it was built from
/// (`GPUCHAOS_COMMIT` comes from build/version.rs, shared with `gpuchaos`).
pub const VERSION: &str = gpuchaos_proto::long_version!();

/// The gpuchaos node agent: injects faults on command, and never leaves one behind.
#[derive(Parser, Debug)]
#[command(
    name = "gpuchaos-agent",
    version = VERSION,
    after_help = "Exit codes: 0 stopped cleanly (every fault reverted) · 64 invalid flags or files (policy, TLS, guardrail proxies) · 69 a listen address cannot be bound (in use, not on this node) · 70 internal error · 74 the state directory cannot be used (another agent holds it, unwritable)"
)]
pub struct Args {
    /// gRPC address. Anything but loopback requires mutual TLS.
    #[arg(long, default_value = "127.0.0.1:7070", env = "GPUCHAOS_AGENT_LISTEN")]
    pub listen: SocketAddr,
    /// Prometheus metrics address (/metrics).
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub metrics_listen: SocketAddr,
    /// Where the journal lives. One agent per directory.
    #[arg(long, default_value = "/var/lib/gpuchaos")]
    pub state_dir: PathBuf,
    /// Policy file (YAML): protected processes, limits, enabled kinds.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Server certificate (PEM) for mutual TLS.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// CA that client (controller) certificates must chain to.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// Log lines as text or as JSON objects (stderr).
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Path of libnvidia-ml (default: libnvidia-ml.so.1 from the loader path).
    #[arg(long, env = "GPUCHAOS_NVML_LIB")]
    pub nvml_lib: Option<PathBuf>,
    /// Path of libcuda (default: libcuda.so.1 from the loader path), for gpu_memory.
    #[arg(long, env = "GPUCHAOS_CUDA_LIB")]
    pub cuda_lib: Option<PathBuf>,
    /// A standing guardrail proxy, LISTEN=UPSTREAM (e.g. 127.0.0.1:9001=http://127.0.0.1:9000):
    /// it passes answers untouched until a guardrail fault attaches. Repeatable.
    #[arg(long, value_parser = guardrail_proxy_arg)]
    pub guardrail_proxy: Vec<(SocketAddr, String)>,
    /// How long SIGTERM/SIGINT may spend reverting faults before exiting.
    #[arg(long, default_value = "30s", value_parser = humantime_arg)]
    pub shutdown_grace: Duration,
    /// The directory where gpu_xid faults arm the CUDA and NVML interposers (the
    /// interposers read GPUCHAOS_XID_DIR, with the same default).
    #[arg(long, default_value = "/run/gpuchaos/xid", env = "GPUCHAOS_XID_DIR")]
    pub xid_dir: PathBuf,
    /// Where gpu_xid faults write the NVIDIA driver's kernel-log line (a file
    /// stands in for the kernel log in tests).
    #[arg(long, default_value = "/dev/kmsg")]
    pub xid_kmsg: PathBuf,
}

impl Args {
    /// The configuration [`crate::run`] takes.
    pub fn into_config(self) -> AgentConfig {
        AgentConfig {
            listen: self.listen,
            metrics_listen: self.metrics_listen,
            state_dir: self.state_dir,
            policy: self.policy,
            tls: TlsFiles {
                cert: self.tls_cert,
                key: self.tls_key,
                ca: self.tls_ca,
            },
            nvml_lib: self.nvml_lib,
            cuda_lib: self.cuda_lib,
            guardrail_proxies: self.guardrail_proxy,
            shutdown_grace: self.shutdown_grace,
            xid_dir: self.xid_dir,
            xid_kmsg: self.xid_kmsg,
        }
    }
}

/// The agent's command definition, for man pages and completions.
pub fn command() -> clap::Command {
    Args::command()
}

fn guardrail_proxy_arg(s: &str) -> Result<(SocketAddr, String), String> {
    let (l, u) = s
        .split_once('=')
        .ok_or("write it as LISTEN=UPSTREAM, e.g. 127.0.0.1:9001=http://127.0.0.1:9000")?;
    let listen = l
        .parse()
        .map_err(|e| format!("{l:?} is not an address ({e}): write IP:PORT"))?;
    if !u.starts_with("http://") {
        return Err(format!("{u:?}: the upstream must be an http:// URL"));
    }
    Ok((listen, u.to_string()))
}

fn humantime_arg(s: &str) -> Result<Duration, String> {
    gpuchaos_proto::spec::HumanDuration::parse(s).map(|d| d.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_definition_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let a = Args::try_parse_from(["gpuchaos-agent"]).unwrap();
        assert_eq!(a.state_dir, PathBuf::from("/var/lib/gpuchaos"));
        // packaging/gpuchaos-agent.service sets TimeoutStopSec=60 above this.
        assert_eq!(a.shutdown_grace, Duration::from_secs(30));
        let c = Args::try_parse_from([
            "gpuchaos-agent",
            "--guardrail-proxy",
            "127.0.0.1:9001=http://127.0.0.1:9000",
            "--shutdown-grace",
            "45s",
        ])
        .unwrap()
        .into_config();
        assert_eq!(c.guardrail_proxies.len(), 1);
        assert_eq!(c.shutdown_grace, Duration::from_secs(45));
    }
}

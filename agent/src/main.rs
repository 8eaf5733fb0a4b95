//! `gpuchaos-agent`: flags, logging and signals; everything else is in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use gpuchaos_agent::{AddressError, AgentConfig, ConfigError, StateDirError, tls::TlsFiles};
use tokio_util::sync::CancellationToken;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// The gpuchaos node agent: injects faults on command, and never leaves one behind.
#[derive(Parser, Debug)]
#[command(
    name = "gpuchaos-agent",
    version,
    after_help = "Exit codes: 0 stopped cleanly (every fault reverted) · 64 invalid flags or files (policy, TLS, guardrail proxies) · 69 a listen address cannot be bound (in use, not on this node) · 70 internal error · 74 the state directory cannot be used (another agent holds it, unwritable)"
)]
struct Args {
    /// gRPC address. Anything but loopback requires mutual TLS.
    #[arg(long, default_value = "127.0.0.1:7070", env = "GPUCHAOS_AGENT_LISTEN")]
    listen: SocketAddr,
    /// Prometheus metrics address (/metrics).
    #[arg(long, default_value = "127.0.0.1:9464")]
    metrics_listen: SocketAddr,
    /// Where the journal lives. One agent per directory.
    #[arg(long, default_value = "/var/lib/gpuchaos")]
    state_dir: PathBuf,
    /// Policy file (YAML): protected processes, limits, enabled kinds.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Server certificate (PEM) for mutual TLS.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<PathBuf>,
    /// CA that client (controller) certificates must chain to.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Path of libnvidia-ml (default: libnvidia-ml.so.1 from the loader path).
    #[arg(long, env = "GPUCHAOS_NVML_LIB")]
    nvml_lib: Option<PathBuf>,
    /// Path of libcuda (default: libcuda.so.1 from the loader path), for gpu_memory.
    #[arg(long, env = "GPUCHAOS_CUDA_LIB")]
    cuda_lib: Option<PathBuf>,
    /// A standing guardrail proxy, LISTEN=UPSTREAM (e.g. 127.0.0.1:9001=http://127.0.0.1:9000):
    /// it passes answers untouched until a guardrail fault attaches. Repeatable.
    #[arg(long, value_parser = guardrail_proxy_arg)]
    guardrail_proxy: Vec<(SocketAddr, String)>,
    /// How long SIGTERM/SIGINT may spend reverting faults before exiting.
    #[arg(long, default_value = "30s", value_parser = humantime_arg)]
    shutdown_grace: Duration,
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

fn color_allowed() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal: never in files, journald or CI
        // logs, and never with NO_COLOR set (https://no-color.org).
        .with_ansi(color_allowed());
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

fn main() -> std::process::ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some(gpuchaos_agent::gpu_helper::ARG) {
        return gpuchaos_agent::gpu_helper::main(&argv[2..]);
    }
    let args = Args::parse();
    init_logging(args.log_format);
    gpuchaos_agent::failpoint::warn_if_ignored();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gpuchaos-agent: cannot start the runtime: {e}");
            return std::process::ExitCode::from(70);
        }
    };
    let cfg = AgentConfig {
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        state_dir: args.state_dir,
        policy: args.policy,
        tls: TlsFiles {
            cert: args.tls_cert,
            key: args.tls_key,
            ca: args.tls_ca,
        },
        nvml_lib: args.nvml_lib,
        cuda_lib: args.cuda_lib,
        guardrail_proxies: args.guardrail_proxy,
        shutdown_grace: args.shutdown_grace,
    };
    let result = rt.block_on(async {
        let shutdown = CancellationToken::new();
        let s = shutdown.clone();
        let mut signals = gpuchaos_proto::signal::Terminations::install()
            .map_err(|e| anyhow::anyhow!("cannot install the SIGTERM and SIGINT handlers: {e}"))?;
        tokio::spawn(async move {
            let which = signals.recv().await;
            tracing::info!("{which} received");
            s.cancel();
        });
        gpuchaos_agent::run(cfg, shutdown).await
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let code = if e.downcast_ref::<ConfigError>().is_some() {
                64
            } else if e.downcast_ref::<AddressError>().is_some() {
                69
            } else if e.downcast_ref::<StateDirError>().is_some() {
                74
            } else {
                70
            };
            eprintln!("gpuchaos-agent: {e:#}");
            std::process::ExitCode::from(code)
        }
    }
}

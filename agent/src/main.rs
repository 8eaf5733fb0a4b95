//! `gpuchaos-agent`: flags, logging and signals; everything else is in the library.

use clap::Parser;
use gpuchaos_agent::cli::{Args, LogFormat};
use gpuchaos_agent::{AddressError, ConfigError, StateDirError};
use tokio_util::sync::CancellationToken;

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
    let cfg = args.into_config();
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

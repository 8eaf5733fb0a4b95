//! `gpuchaos`: flags and wiring; the commands live in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use gpuchaos_controller::commands;
use gpuchaos_controller::exit::{self, CliError};
use gpuchaos_controller::fleet::{Fleet, TlsClient};
use gpuchaos_controller::output::Output;

/// `0.1.0 (commit 1a2b3c4d5e6f)`: the release and the commit it was built from.
const VERSION: &str = gpuchaos_proto::long_version!();

/// gpuchaos: chaos engineering for GPU inference nodes.
#[derive(Parser, Debug)]
#[command(
    name = "gpuchaos",
    version = VERSION,
    after_help = "Exit codes: 0 ok, 1 objective failed, 2 aborted, 3 inject failed, 4 revert failed (something may be left behind), 64 invalid input, 69 agent unreachable, 70 internal error, 74 state directory or history database unusable"
)]
struct Cli {
    /// An agent to talk to (HOST:PORT); repeat for several. Default 127.0.0.1:7070.
    #[arg(
        long = "agent",
        global = true,
        env = "GPUCHAOS_AGENT",
        value_delimiter = ','
    )]
    agents: Vec<String>,
    /// A fleet file listing agents (and TLS settings).
    #[arg(long, global = true)]
    fleet: Option<PathBuf>,
    #[arg(long, global = true, value_enum, default_value = "text")]
    output: Output,
    /// Only errors, warnings and results: no progress lines, no notes.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// More log lines on stderr: -v info, -vv debug, -vvv trace (GPUCHAOS_LOG, an
    /// env-filter, overrides).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// CA certificate the agents' certificates chain to (mutual TLS).
    #[arg(long, global = true, env = "GPUCHAOS_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// This controller's certificate.
    #[arg(long, global = true, env = "GPUCHAOS_TLS_CERT", requires_all = ["tls_ca", "tls_key"])]
    tls_cert: Option<PathBuf>,
    /// This controller's private key.
    #[arg(long, global = true, env = "GPUCHAOS_TLS_KEY", requires_all = ["tls_ca", "tls_cert"])]
    tls_key: Option<PathBuf>,
    /// The name in the agents' certificates, when it is not the address's host.
    #[arg(long, global = true)]
    tls_server_name: Option<String>,
    /// Connect timeout per agent.
    #[arg(long, global = true, default_value = "5s", value_parser = duration_arg)]
    timeout: Duration,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Inventory, capabilities and faults of each agent.
    Status {
        /// Also list faults that have ended (the agent remembers the last 512).
        #[arg(long)]
        all: bool,
    },
    /// Inject each fault of a spec file on each agent; prints the fault ids.
    Inject {
        /// The spec file (YAML, one or more documents; - for stdin).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Stay attached: hold a lease, wait for the faults to end, revert on Ctrl-C.
        /// If this process dies, the agents revert the faults when the lease lapses.
        #[arg(long)]
        attach: bool,
        /// Lease TTL for --attach.
        #[arg(long, default_value = "10s", value_parser = duration_arg)]
        lease: Duration,
    },
    /// Revert one fault (by id), on whichever agent holds it.
    Revert { id: String },
    /// Revert every fault on every agent, now.
    Halt,
    /// Check experiments, game days and fault spec files (a directory: the YAML
    /// files under it); every error of every file, with line, column and field path.
    Validate { files: Vec<PathBuf> },
    /// Run an experiment: probes, faults, objectives; reports and an exit code for CI.
    Run {
        file: PathBuf,
        /// Write journal.json, junit.xml, summary.md and report.html here.
        #[arg(long)]
        report_dir: Option<PathBuf>,
        /// Print the plan (what goes where, for how long) and touch nothing.
        #[arg(long)]
        dry_run: bool,
        /// Seed for picking agents (default: random; printed and recorded).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Run game days on their schedules; keep their history; offer a page and /metrics.
    /// SIGINT/SIGTERM stop it: a running game day is interrupted and its faults reverted.
    Serve {
        /// A game-day file (repeatable).
        #[arg(long = "gameday", required = true)]
        gamedays: Vec<PathBuf>,
        /// History and reports live here.
        #[arg(long, env = "GPUCHAOS_STATE_DIR")]
        state_dir: Option<PathBuf>,
        /// The page and /metrics.
        #[arg(long, default_value = "127.0.0.1:9470")]
        listen: String,
        /// How notifications link to the page (default: http://LISTEN).
        #[arg(long)]
        public_url: Option<String>,
        /// Also run each game day once now (trigger "manual"), then follow the schedules.
        #[arg(long)]
        run_now: bool,
    },
    /// Game-day runs, newest first, with pass rates and each objective's trend.
    History {
        #[arg(long, env = "GPUCHAOS_STATE_DIR")]
        state_dir: Option<PathBuf>,
        /// Only this game day.
        #[arg(long)]
        gameday: Option<String>,
        /// How many runs to list.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Index every run folder again (after the database was lost or damaged).
        #[arg(long)]
        rebuild: bool,
    },
    /// Regenerate a game-day run's reports (RUN: an id, a unique prefix, `last` or `GAMEDAY:last`).
    Report {
        run: String,
        #[arg(long, env = "GPUCHAOS_STATE_DIR")]
        state_dir: Option<PathBuf>,
        /// Write here instead of the run's own folder.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write a commented first experiment or game-day file to stdout.
    New(commands::new::NewArgs),
    /// Print the JSON Schema of the experiment format (for editors).
    Schema,
    /// Zero-setup demo against a local agent.
    Demo,
    /// Make a CA and agent/controller certificates for mutual TLS.
    Certs {
        #[arg(long)]
        out: PathBuf,
        /// Extra DNS names or IP addresses for the agent certificate (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    #[command(flatten)]
    Generate(commands::completions::Generate),
}

fn duration_arg(s: &str) -> Result<Duration, String> {
    gpuchaos_proto::spec::HumanDuration::parse(s).map(|d| d.0)
}

async fn run(mut cli: Cli) -> Result<u8, CliError> {
    // `GPUCHAOS_AGENT=` (set but empty, as CI templates leave an unset variable)
    // names no agent, not one with an empty address.
    cli.agents.retain(|a| !a.trim().is_empty());
    let tls = match (cli.tls_ca, cli.tls_cert, cli.tls_key) {
        (Some(ca), Some(cert), Some(key)) => Some(TlsClient {
            ca,
            cert,
            key,
            server_name: cli.tls_server_name,
        }),
        _ => None,
    };
    let fleet = || Fleet::from_flags(&cli.agents, cli.fleet.as_deref(), tls.clone(), cli.timeout);
    match cli.command {
        Cmd::Status { all } => commands::status::run(&fleet()?, cli.output, all).await,
        Cmd::Inject {
            file,
            attach,
            lease,
        } => {
            if lease < Duration::from_millis(300) {
                return Err(CliError::invalid("--lease must be at least 300ms"));
            }
            commands::inject::run(
                &fleet()?,
                cli.output,
                commands::inject::Options {
                    file: &file,
                    attach,
                    lease,
                },
            )
            .await
        }
        Cmd::Revert { id } => commands::revert::revert(&fleet()?, cli.output, &id).await,
        Cmd::Halt => commands::revert::halt(&fleet()?, cli.output).await,
        Cmd::Validate { files } => commands::validate::run(&files, cli.output),
        Cmd::Run {
            file,
            report_dir,
            dry_run,
            seed,
        } => {
            commands::run::run(
                &fleet()?,
                cli.output,
                commands::run::Options {
                    file: &file,
                    report_dir,
                    dry_run,
                    seed,
                },
            )
            .await
        }
        Cmd::Schema => {
            let schema = gpuchaos_controller::experiment::json_schema();
            println!(
                "{}",
                serde_json::to_string_pretty(&schema)
                    .map_err(|e| CliError::internal(e.to_string()))?
            );
            Ok(exit::OK)
        }
        Cmd::Serve {
            gamedays,
            state_dir,
            listen,
            public_url,
            run_now,
        } => {
            let fleet = if cli.agents.is_empty() && cli.fleet.is_none() {
                Fleet::from_flags(&[], None, tls.clone(), cli.timeout)?
            } else {
                fleet()?
            };
            commands::serve::run(
                &fleet,
                commands::serve::Options {
                    gamedays,
                    state_dir: state_dir.unwrap_or_else(commands::serve::default_state_dir),
                    listen,
                    public_url,
                    run_now,
                },
            )
            .await
        }
        Cmd::History {
            state_dir,
            gameday,
            limit,
            rebuild,
        } => commands::history::run(
            cli.output,
            commands::history::Options {
                state_dir: &state_dir.unwrap_or_else(commands::serve::default_state_dir),
                gameday: gameday.as_deref(),
                limit,
                rebuild,
            },
        ),
        Cmd::Report {
            run,
            state_dir,
            out,
        } => commands::report::run(
            cli.output,
            commands::report::Options {
                state_dir: &state_dir.unwrap_or_else(commands::serve::default_state_dir),
                run: &run,
                out,
            },
        ),
        Cmd::New(args) => commands::new::run(&args, &cli.agents),
        Cmd::Demo => commands::demo::run().await,
        Cmd::Generate(g) => commands::completions::run(g, <Cli as clap::CommandFactory>::command()),
        Cmd::Certs {
            out,
            sans,
            days,
            force,
        } => commands::certs::run(commands::certs::Options {
            out: &out,
            sans: &sans,
            days,
            force,
            output: cli.output,
        }),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::INVALID_INPUT
            } else {
                exit::OK
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    gpuchaos_controller::output::set_quiet(cli.quiet);
    // -q drops progress and notes, never warnings.
    let level = match (cli.quiet, cli.verbose) {
        (true, _) | (_, 0) => "warn",
        (_, 1) => "info",
        (_, 2) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("GPUCHAOS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(gpuchaos_controller::output::stderr_styled())
        .init();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gpuchaos: cannot start the runtime: {e}");
            return ExitCode::from(exit::INTERNAL);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("gpuchaos: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}

//! `gpuchaos-refstack`: a reference inference stack for game days, built to fail the
//! way real servers (vLLM, TGI, Triton) do.
//!
//! - `gpuchaos-refstack guardrail --listen ADDR`: the safety classifier.
//! - `gpuchaos-refstack server --listen ADDR --workers N ...`: the OpenAI-compatible
//!   front and its supervisor, which starts `worker` processes of this same binary.
//! - `gpuchaos-refstack worker ...`: one GPU worker (started by the server).
//!
//! Each prints `listening ADDR` on stdout once it serves.

mod guardrail;
mod http;
mod probe;
mod server;
mod worker;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "gpuchaos-refstack", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

fn duration(s: &str) -> Result<Duration, String> {
    gpuchaos_proto::spec::HumanDuration::parse(s).map(|d| d.0)
}

fn size(s: &str) -> Result<u64, String> {
    gpuchaos_proto::spec::ByteSize::parse(s).map(|b| b.0)
}

/// Milliseconds of GPU time per generation: 0 to 10000.
fn gen_gpu_ms(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(ms) if (0.0..=10_000.0).contains(&ms) => Ok(ms),
        _ => Err(format!(
            "{s:?}: give the milliseconds of GPU time per generation, 0 to 10000"
        )),
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// The guardrail service (OpenAI moderation and Llama Guard formats).
    Guardrail {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
    },
    /// The OpenAI-compatible server and its worker supervisor.
    Server {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// How many worker processes.
        #[arg(long, default_value_t = 2)]
        workers: u32,
        /// The guardrail's address (http://host:port); none: no safety check.
        #[arg(long)]
        guardrail: Option<String>,
        /// What a guardrail error means: block (fail-closed) or let through (fail-open).
        #[arg(long, value_enum, default_value = "fail-closed")]
        guardrail_policy: server::GuardrailPolicy,
        /// /health answers 200 even when every worker is dead (as some servers do).
        #[arg(long)]
        health_lies: bool,
        /// Do not restart workers that die.
        #[arg(long)]
        no_restart: bool,
        /// A worker's model-load time before it serves.
        #[arg(long, default_value = "1s", value_parser = duration)]
        cold_start: Duration,
        /// GPU memory each worker reserves for its KV cache at start.
        #[arg(long, default_value = "8GiB", value_parser = size)]
        kv_cache: u64,
        /// GPU memory each worker's weights take, allocated in steps over the cold
        /// start (one every 100ms), before the KV cache.
        #[arg(long, default_value = "2GiB", value_parser = size)]
        weights: u64,
        /// How long the supervisor waits after a worker died before it starts the
        /// replacement (a slow supervisor, a pod being rescheduled).
        #[arg(long, default_value = "0s", value_parser = duration)]
        restart_delay: Duration,
        /// How long the server waits for a worker's answer before it fails the
        /// request with 502.
        #[arg(long, default_value = "30s", value_parser = duration)]
        worker_timeout: Duration,
        /// After a worker failed or timed out, leave it out of the rotation this long
        /// (outlier ejection, as load balancers do; 0s: never).
        #[arg(long, default_value = "0s", value_parser = duration)]
        eject_for: Duration,
        /// Another node's server (HOST:PORT) that takes the requests no worker here is
        /// ready for (a gateway's spill-over to another node).
        #[arg(long)]
        fallback: Option<String>,
        /// libcuda (the real one, or the project's fake driver).
        #[arg(long, env = "GPUCHAOS_CUDA_LIB")]
        cuda_lib: Option<PathBuf>,
        /// The CUDA device the workers use (one GPU; see --gpus for several).
        #[arg(long, default_value_t = 0)]
        gpu: i32,
        /// The CUDA devices the workers are spread over (`0,1`: worker i on the
        /// i mod n-th); a worker that cannot start on its GPU (no memory, no device,
        /// a CUDA error) is started on the next one. Overrides --gpu.
        #[arg(long, value_delimiter = ',', num_args = 1.., conflicts_with = "gpu")]
        gpus: Vec<i32>,
        /// How long a GPU on which a worker could not start is avoided (doubling
        /// with each further failure, at most 8x) before workers are sent to it again.
        #[arg(long, default_value = "2s", value_parser = duration)]
        gpu_retry: Duration,
        #[arg(long, default_value = "refstack-1b")]
        model: String,
    },
    /// A small CUDA workload for checks: one allocation (`--alloc`), or allocations
    /// and kernels for a while (`--run`), printing each outcome (scripts/gpu-check.sh).
    CudaProbe {
        /// libcuda (the real one, the fake driver, or the gpu_xid interposer).
        #[arg(long, env = "GPUCHAOS_CUDA_LIB")]
        cuda_lib: Option<PathBuf>,
        #[arg(long, default_value_t = 0)]
        gpu: i32,
        /// Allocate this much once and say whether it could.
        #[arg(long, value_parser = size, conflicts_with = "run")]
        alloc: Option<u64>,
        /// Allocate 2 MiB and run a 1 ms kernel every `--every` for this long; stop at
        /// the first CUDA error.
        #[arg(long, value_parser = duration)]
        run: Option<Duration>,
        #[arg(long, default_value = "100ms", value_parser = duration)]
        every: Duration,
    },
    /// One worker (started by the server).
    Worker {
        #[arg(long)]
        id: u32,
        /// The server it works for (names it on the command line, for selectors).
        #[arg(long)]
        server: Option<String>,
        /// The server's pid: the worker dies with it.
        #[arg(long)]
        parent: Option<i32>,
        #[arg(long)]
        listen: String,
        #[arg(long)]
        cuda_lib: Option<PathBuf>,
        #[arg(long, default_value_t = 0)]
        gpu: i32,
        #[arg(long)]
        kv_bytes: u64,
        /// The weights' size, loaded over the cold start.
        #[arg(long, default_value = "2GiB", value_parser = size)]
        weights: u64,
        #[arg(long, value_parser = duration)]
        cold_start: Duration,
        /// GPU time each generation takes, in milliseconds: the spin kernel launched
        /// for this long and waited for (0: no GPU work). The environment variable
        /// reaches the workers through the server.
        #[arg(long, env = "GPUCHAOS_REFSTACK_GEN_GPU_MS", default_value = "5", value_parser = gen_gpu_ms)]
        gen_gpu_ms: f64,
    },
}

async fn bind(addr: &str) -> Result<tokio::net::TcpListener, ExitCode> {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => {
            if let Ok(a) = l.local_addr() {
                println!("listening {a}");
                let _ = std::io::stdout().flush();
            }
            Ok(l)
        }
        Err(e) => {
            eprintln!("gpuchaos-refstack: cannot listen on {addr}: {e}");
            Err(ExitCode::from(70))
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gpuchaos-refstack: {e}");
            return ExitCode::from(70);
        }
    };
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Guardrail { listen } => match bind(&listen).await {
                Ok(l) => {
                    guardrail::run(l).await;
                    ExitCode::SUCCESS
                }
                Err(c) => c,
            },
            Cmd::CudaProbe {
                cuda_lib,
                gpu,
                alloc,
                run,
                every,
            } => probe::run(probe::ProbeArgs {
                cuda_lib,
                gpu,
                alloc,
                run,
                every,
            }),
            Cmd::Worker {
                id,
                server: _,
                parent,
                listen,
                cuda_lib,
                gpu,
                kv_bytes,
                weights,
                cold_start,
                gen_gpu_ms,
            } => {
                worker::run(worker::WorkerArgs {
                    id,
                    parent,
                    listen,
                    cuda_lib,
                    gpu,
                    kv_bytes,
                    weights_bytes: weights,
                    cold_start,
                    gen_gpu_ms,
                })
                .await
            }
            Cmd::Server {
                listen,
                workers,
                guardrail,
                guardrail_policy,
                health_lies,
                no_restart,
                cold_start,
                kv_cache,
                weights,
                restart_delay,
                worker_timeout,
                eject_for,
                fallback,
                cuda_lib,
                gpu,
                gpus,
                gpu_retry,
                model,
            } => match bind(&listen).await {
                Ok(l) => {
                    server::run(
                        server::ServerArgs {
                            workers,
                            guardrail,
                            policy: guardrail_policy,
                            health_lies,
                            restart: !no_restart,
                            cold_start,
                            kv_bytes: kv_cache,
                            weights_bytes: weights,
                            restart_delay,
                            worker_timeout,
                            eject_for,
                            fallback,
                            cuda_lib,
                            gpus: if gpus.is_empty() { vec![gpu] } else { gpus },
                            gpu_retry,
                            model,
                        },
                        l,
                    )
                    .await;
                    ExitCode::SUCCESS
                }
                Err(c) => c,
            },
        }
    })
}

//! A worker: loads its "model" (the cold start: its weights allocated on the GPU in
//! steps through the CUDA driver API, so that NVML shows the memory growing over the
//! load time), reserves its KV cache (refusing to start when free memory is below
//! weights + KV cache, as vLLM does), then generates on `POST /generate`.
//!
//! Each generation does GPU work: the spin kernel ([`gpuchaos_cuda::SPIN_PTX`],
//! loaded at start) launched for `--gen-gpu-ms` and waited for, on a GPU thread of
//! its own (the HTTP side stays responsive; generations queue for the GPU, as they
//! do on a real serving engine). A GPU shared with a noisy neighbour makes
//! generations slower: on the fake driver, in proportion to the neighbour's share.
//! A CUDA error during a generation fails it (500) and the worker exits (code 5),
//! as a serving engine does when its context is lost.

use std::sync::Arc;
use std::time::Duration;

use gpuchaos_cuda::{
    CU_DEVICE_ATTRIBUTE_CLOCK_RATE, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, CtxHandle, Cuda,
};
use hyper::StatusCode;
use tokio::net::TcpListener;

use crate::http::{self, Req};

pub struct WorkerArgs {
    pub id: u32,
    /// The server: the worker dies with it (as a serving engine's workers do).
    pub parent: Option<i32>,
    pub listen: String,
    pub cuda_lib: Option<std::path::PathBuf>,
    pub gpu: i32,
    pub kv_bytes: u64,
    pub weights_bytes: u64,
    pub cold_start: Duration,
    /// GPU time per generation, in milliseconds (0: none).
    pub gen_gpu_ms: f64,
}

/// Threads per block of a generation's kernel (one block per SM).
const GEN_THREADS: u32 = 128;

/// A generation's GPU work, sent to the GPU thread; the answer is the milliseconds
/// it took (launch to completion), or the CUDA error.
type GpuJob = (f64, tokio::sync::oneshot::Sender<Result<f64, String>>);

/// Starts the GPU thread: it makes the worker's context current, loads the spin
/// kernel, then runs one job at a time. Returns once the kernel is loaded (or why it
/// could not be).
fn gpu_thread(
    cuda: &'static Cuda,
    ctx: CtxHandle,
    gpu: i32,
) -> Result<std::sync::mpsc::Sender<GpuJob>, String> {
    let (tx, rx) = std::sync::mpsc::channel::<GpuJob>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    std::thread::Builder::new()
        .name("gpu".into())
        .spawn(move || {
            let setup = (|| {
                cuda.set_current(ctx)?;
                let sms = cuda.device_attribute(gpu, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
                let khz = cuda.device_attribute(gpu, CU_DEVICE_ATTRIBUTE_CLOCK_RATE)?;
                let kernel = cuda.spin_kernel()?;
                Ok::<_, gpuchaos_cuda::CudaError>((sms.max(1) as u32, khz.max(1) as f64, kernel))
            })();
            let (sms, khz, kernel) = match setup {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            for (ms, reply) in rx {
                let t = std::time::Instant::now();
                let r = kernel
                    .launch(sms, GEN_THREADS, (ms * khz).max(1.0) as u64)
                    .and_then(|()| cuda.ctx_synchronize())
                    .map(|()| t.elapsed().as_secs_f64() * 1000.0)
                    .map_err(|e| e.to_string());
                let _ = reply.send(r);
            }
        })
        .map_err(|e| format!("cannot start the GPU thread: {e}"))?;
    ready_rx
        .recv()
        .map_err(|_| "the GPU thread ended before it was ready".to_string())??;
    Ok(tx)
}

/// One weights chunk every this long during the cold start.
pub const LOAD_STEP: Duration = Duration::from_millis(100);

/// The weights load as `n` chunks, one every `cold_start / n`: one per [`LOAD_STEP`],
/// at least one, at most one per byte. Returns the chunk sizes (the last takes the
/// remainder).
pub fn chunks(weights: u64, cold_start: Duration) -> Vec<u64> {
    if weights == 0 {
        return Vec::new();
    }
    let n = (cold_start.as_nanos() / LOAD_STEP.as_nanos()).clamp(1, weights as u128) as u64;
    let each = weights / n;
    let mut v = vec![each; n as usize];
    if let Some(last) = v.last_mut() {
        *last += weights - each * n;
    }
    v
}

fn mib(b: u64) -> u64 {
    b >> 20
}

pub fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Exit codes the supervisor reads: 3 = not enough GPU memory, 4 = no GPU (or no
/// kernel), 5 = a CUDA error while serving.
pub async fn run(a: WorkerArgs) -> std::process::ExitCode {
    if let Some(parent) = a.parent {
        let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
        if nix::unistd::getppid().as_raw() != parent {
            return std::process::ExitCode::from(70);
        }
    }
    let cuda: &'static Cuda = match Cuda::open(a.cuda_lib.as_deref()) {
        // It lives as long as the worker; the GPU thread borrows it.
        Ok(c) => Box::leak(Box::new(c)),
        Err(e) => {
            eprintln!("worker {}: {e}", a.id);
            return std::process::ExitCode::from(4);
        }
    };
    // The context must live on this thread; it, the weights and the KV cache in it are
    // held until exit (dropping the context would free them).
    let start = (|| {
        cuda.init().map_err(|e| (4u8, e.to_string()))?;
        let ctx = cuda.ctx_create(a.gpu).map_err(|e| (3u8, e.to_string()))?;
        let (free, total) = cuda.mem_get_info().map_err(|e| (4u8, e.to_string()))?;
        let need = a.weights_bytes.saturating_add(a.kv_bytes);
        if free < need {
            return Err((
                3u8,
                format!(
                    "insufficient free GPU memory for the weights and the KV cache: {} MiB free of {} MiB, {} MiB needed ({} MiB of weights + {} MiB of KV cache)",
                    mib(free),
                    mib(total),
                    mib(need),
                    mib(a.weights_bytes),
                    mib(a.kv_bytes)
                ),
            ));
        }
        Ok(ctx)
    })();
    let _ctx = match start {
        Ok(ctx) => ctx,
        Err((code, e)) => {
            eprintln!("worker {}: {e}", a.id);
            return std::process::ExitCode::from(code);
        }
    };
    // Model load: the weights in chunks spread evenly over the cold start.
    let plan = chunks(a.weights_bytes, a.cold_start);
    eprintln!(
        "worker {}: {} loading {} MiB of weights in {} steps over {}",
        a.id,
        now(),
        mib(a.weights_bytes),
        plan.len(),
        humantime::format_duration(a.cold_start)
    );
    let began = tokio::time::Instant::now();
    if plan.is_empty() {
        tokio::time::sleep(a.cold_start).await;
    }
    let n = plan.len() as u32;
    for (k, bytes) in plan.iter().enumerate() {
        let k = k as u32 + 1;
        tokio::time::sleep_until(began + a.cold_start * k / n).await;
        if let Err(e) = cuda.mem_alloc(*bytes as usize) {
            eprintln!(
                "worker {}: loading the weights: step {k} of {n} ({} MiB): {e}",
                a.id,
                mib(*bytes)
            );
            return std::process::ExitCode::from(3);
        }
    }
    // Then the KV cache, in what is left.
    let kv = (|| {
        let (free, total) = cuda.mem_get_info().map_err(|e| (4u8, e.to_string()))?;
        if free < a.kv_bytes {
            return Err((
                3u8,
                format!(
                    "insufficient free GPU memory for the KV cache: {} MiB free of {} MiB, {} MiB needed (the weights are loaded)",
                    mib(free),
                    mib(total),
                    mib(a.kv_bytes)
                ),
            ));
        }
        cuda.mem_alloc(a.kv_bytes as usize)
            .map_err(|e| (3u8, format!("the KV cache: {e}")))
    })();
    if let Err((code, e)) = kv {
        eprintln!("worker {}: {e}", a.id);
        return std::process::ExitCode::from(code);
    }
    // The kernel its generations run, loaded before it serves.
    let gpu = if a.gen_gpu_ms > 0.0 {
        match gpu_thread(cuda, _ctx.handle(), a.gpu) {
            Ok(tx) => Some(tx),
            Err(e) => {
                eprintln!(
                    "worker {}: cannot load its generation kernel: {e} (--gen-gpu-ms 0 generates without GPU work)",
                    a.id
                );
                return std::process::ExitCode::from(4);
            }
        }
    } else {
        None
    };
    let gen_ms = a.gen_gpu_ms;
    let listener = match TcpListener::bind(&a.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("worker {}: cannot listen on {}: {e}", a.id, a.listen);
            return std::process::ExitCode::from(70);
        }
    };
    if let Ok(addr) = listener.local_addr() {
        use std::io::Write;
        println!("listening {addr}");
        let _ = std::io::stdout().flush();
    }
    eprintln!(
        "worker {}: {} ready on {} with {} MiB of weights and {} MiB of KV cache",
        a.id,
        now(),
        a.listen,
        mib(a.weights_bytes),
        mib(a.kv_bytes)
    );
    let id = a.id;
    http::serve(
        listener,
        Arc::new(move |req: Req| {
            let gpu = gpu.clone();
            async move {
            match req.path.as_str() {
                "/ready" => http::json(StatusCode::OK, &serde_json::json!({"worker": id})),
                "/generate" => {
                    let gpu_ms = match gpu {
                        None => 0.0,
                        Some(tx) => {
                            let (reply, answer) = tokio::sync::oneshot::channel();
                            let r = match tx.send((gen_ms, reply)) {
                                Ok(()) => answer
                                    .await
                                    .unwrap_or_else(|_| Err("the GPU thread is gone".into())),
                                Err(_) => Err("the GPU thread is gone".into()),
                            };
                            match r {
                                Ok(ms) => ms,
                                Err(e) => {
                                    // A serving engine whose CUDA context fails exits.
                                    eprintln!("worker {id}: {} generation failed on the GPU: {e}: exiting", now());
                                    tokio::spawn(async {
                                        tokio::time::sleep(Duration::from_millis(50)).await;
                                        std::process::exit(5);
                                    });
                                    return http::json(
                                        StatusCode::INTERNAL_SERVER_ERROR,
                                        &serde_json::json!({"error": format!("the GPU failed: {e}"), "worker": id}),
                                    );
                                }
                            }
                        }
                    };
                    let v: serde_json::Value =
                        serde_json::from_slice(&req.body).unwrap_or_default();
                    let prompt = v["prompt"].as_str().unwrap_or("");
                    let text = format!(
                        "Here is an answer to \"{}\" from worker {id}.",
                        prompt.chars().take(200).collect::<String>()
                    );
                    http::json(
                        StatusCode::OK,
                        &serde_json::json!({"text": text, "worker": id, "gpu_ms": gpu_ms}),
                    )
                }
                _ => http::json(
                    StatusCode::NOT_FOUND,
                    &serde_json::json!({"error": "no such path"}),
                ),
            }
            }
        }),
    )
    .await;
    std::process::ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_load_in_even_steps_of_one_per_100ms() {
        assert_eq!(chunks(1000, Duration::from_secs(1)), vec![100; 10]);
        assert_eq!(
            chunks(1003, Duration::from_secs(1)).iter().sum::<u64>(),
            1003
        );
        assert_eq!(chunks(1003, Duration::from_secs(1))[9], 103);
        assert_eq!(
            chunks(5, Duration::from_millis(10)),
            vec![5],
            "at least one"
        );
        assert_eq!(
            chunks(3, Duration::from_secs(1)),
            vec![1, 1, 1],
            "at most one a byte"
        );
        assert!(chunks(0, Duration::from_secs(1)).is_empty());
    }
}

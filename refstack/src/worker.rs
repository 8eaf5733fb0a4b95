//! A worker: loads its "model" (the cold start), reserves its KV cache on the GPU
//! through the CUDA driver API (refusing to start when free memory is below its
//! budget, as vLLM does), then generates on `POST /generate`.

use std::sync::Arc;
use std::time::Duration;

use gpuchaos_cuda::Cuda;
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
    pub cold_start: Duration,
}

/// Exit codes the supervisor reads: 3 = not enough GPU memory, 4 = no GPU.
pub async fn run(a: WorkerArgs) -> std::process::ExitCode {
    if let Some(parent) = a.parent {
        let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
        if nix::unistd::getppid().as_raw() != parent {
            return std::process::ExitCode::from(70);
        }
    }
    // Model load.
    tokio::time::sleep(a.cold_start).await;
    let cuda = match Cuda::open(a.cuda_lib.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("worker {}: {e}", a.id);
            return std::process::ExitCode::from(4);
        }
    };
    // The context must live on this thread; it and the KV cache in it are held until
    // exit (dropping the context would free the cache).
    let kv = (|| {
        cuda.init().map_err(|e| (4u8, e.to_string()))?;
        let ctx = cuda.ctx_create(a.gpu).map_err(|e| (3u8, e.to_string()))?;
        let (free, total) = cuda.mem_get_info().map_err(|e| (4u8, e.to_string()))?;
        if free < a.kv_bytes {
            return Err((
                3u8,
                format!(
                    "insufficient free GPU memory for the KV cache: {} MiB free of {} MiB, {} MiB needed",
                    free >> 20,
                    total >> 20,
                    a.kv_bytes >> 20
                ),
            ));
        }
        cuda.mem_alloc(a.kv_bytes as usize)
            .map_err(|e| (3u8, e.to_string()))?;
        Ok(ctx)
    })();
    let _ctx = match kv {
        Ok(ctx) => ctx,
        Err((code, e)) => {
            eprintln!("worker {}: {e}", a.id);
            return std::process::ExitCode::from(code);
        }
    };
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
        "worker {}: ready on {} with {} MiB of KV cache",
        a.id,
        a.listen,
        a.kv_bytes >> 20
    );
    let id = a.id;
    http::serve(
        listener,
        Arc::new(move |req: Req| async move {
            match req.path.as_str() {
                "/ready" => http::json(StatusCode::OK, &serde_json::json!({"worker": id})),
                "/generate" => {
                    let v: serde_json::Value =
                        serde_json::from_slice(&req.body).unwrap_or_default();
                    let prompt = v["prompt"].as_str().unwrap_or("");
                    let text = format!(
                        "Here is an answer to \"{}\" from worker {id}.",
                        prompt.chars().take(200).collect::<String>()
                    );
                    http::json(
                        StatusCode::OK,
                        &serde_json::json!({"text": text, "worker": id}),
                    )
                }
                _ => http::json(
                    StatusCode::NOT_FOUND,
                    &serde_json::json!({"error": "no such path"}),
                ),
            }
        }),
    )
    .await;
    std::process::ExitCode::SUCCESS
}

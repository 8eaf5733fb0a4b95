//! The OpenAI-compatible front (`/v1/chat/completions`, `/v1/completions`, streaming
//! SSE, `/health`, `/metrics`) over a supervisor of worker processes.
//!
//! Built to fail the way real servers do:
//! - a worker that dies is replaced (after `--restart-delay`, a slow supervisor) and
//!   serves again after its cold start, during which it loads its weights onto the
//!   GPU in steps (or never, with `--no-restart`, and requests then fail with 503
//!   once no worker is left);
//! - a worker that cannot get its KV cache (GPU memory taken) exits, and the
//!   supervisor retries with a backoff;
//! - `/health` can lie (`--health-lies`): 200 while every worker is dead;
//! - every request is checked with the guardrail first: `fail-closed` blocks when the
//!   guardrail errors or answers garbage, `fail-open` lets the request through.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hyper::StatusCode;
use tokio::net::TcpListener;
use tokio::sync::Mutex;

use crate::http::{self, Req};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GuardrailPolicy {
    FailClosed,
    FailOpen,
}

#[derive(Debug, Clone)]
pub struct ServerArgs {
    pub workers: u32,
    pub guardrail: Option<String>,
    pub policy: GuardrailPolicy,
    pub health_lies: bool,
    pub restart: bool,
    pub cold_start: Duration,
    pub kv_bytes: u64,
    pub weights_bytes: u64,
    pub restart_delay: Duration,
    /// A worker's answer is waited for this long.
    pub worker_timeout: Duration,
    /// A worker that failed or timed out is left out of the rotation this long.
    pub eject_for: Duration,
    pub cuda_lib: Option<std::path::PathBuf>,
    pub gpu: i32,
    pub model: String,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    blocked: AtomicU64,
    guardrail_errors: AtomicU64,
    no_worker: AtomicU64,
    restarts: AtomicU64,
}

struct Slot {
    port: u16,
    pid: Option<u32>,
    ready: bool,
    /// Left out of the rotation until then (it failed or timed out).
    ejected_until: Option<tokio::time::Instant>,
}

struct State {
    args: ServerArgs,
    /// Where this server listens: each worker's command line names it (`--server`),
    /// so that a fault can select the workers of one server among several.
    addr: String,
    slots: Mutex<Vec<Slot>>,
    next: AtomicU64,
    c: Counters,
}

pub async fn run(args: ServerArgs, listener: TcpListener) {
    let slots = (0..args.workers)
        .map(|_| Slot {
            port: 0,
            pid: None,
            ready: false,
            ejected_until: None,
        })
        .collect();
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let state = Arc::new(State {
        args,
        addr,
        slots: Mutex::new(slots),
        next: AtomicU64::new(0),
        c: Counters::default(),
    });
    for i in 0..state.args.workers {
        tokio::spawn(supervise(Arc::clone(&state), i));
    }
    let s = Arc::clone(&state);
    http::serve(
        listener,
        Arc::new(move |req: Req| {
            let s = Arc::clone(&s);
            async move { handle(s, req).await }
        }),
    )
    .await
}

/// Keeps worker `i` running: start, wait until ready, watch, restart after death.
async fn supervise(s: Arc<State>, i: u32) {
    // The binary's own path, so that the workers show as `gpuchaos-refstack worker
    // --id N` (what a process fault selects them by).
    let exe = std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into());
    let mut backoff = Duration::from_millis(200);
    let mut first = true;
    // The last pid that served, while its replacement is not yet started.
    let mut died: Option<u32> = None;
    loop {
        if !first {
            if !s.args.restart {
                eprintln!(
                    "supervisor: worker {i} is gone and --no-restart is set: not restarting it"
                );
                return;
            }
            s.c.restarts.fetch_add(1, Ordering::Relaxed);
            if died.is_some() && !s.args.restart_delay.is_zero() {
                eprintln!(
                    "supervisor: {} waiting {} before replacing worker {i}",
                    now(),
                    humantime::format_duration(s.args.restart_delay)
                );
                tokio::time::sleep(s.args.restart_delay).await;
            }
        }
        first = false;
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.args(["worker", "--id", &i.to_string(), "--server", &s.addr])
            .args(["--parent", &std::process::id().to_string()])
            // A port of its own, told on stdout once it serves: no collisions.
            .args(["--listen", "127.0.0.1:0"])
            .stdout(std::process::Stdio::piped())
            .args(["--gpu", &s.args.gpu.to_string()])
            .args(["--kv-bytes", &s.args.kv_bytes.to_string()])
            .args(["--weights", &format!("{}B", s.args.weights_bytes)])
            .args([
                "--cold-start",
                &humantime::format_duration(s.args.cold_start).to_string(),
            ])
            .kill_on_drop(true);
        if let Some(l) = &s.args.cuda_lib {
            cmd.arg("--cuda-lib").arg(l);
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("supervisor: cannot start worker {i}: {e}");
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        let pid = child.id();
        let spawned = tokio::time::Instant::now();
        if let Some(old) = died.take() {
            eprintln!(
                "supervisor: {} worker {i} replaced: pid {old} -> {}",
                now(),
                pid.unwrap_or(0)
            );
        }
        s.slots.lock().await[i as usize].pid = pid;
        let stdout = child.stdout.take();
        // Ready once it says where it listens, and answers there.
        let waiter = async {
            use tokio::io::AsyncBufReadExt;
            let mut line = String::new();
            if let Some(out) = stdout {
                let _ = tokio::io::BufReader::new(out).read_line(&mut line).await;
            }
            let Some(addr) = line.trim().strip_prefix("listening ").map(str::to_string) else {
                // It exited before serving: child.wait() below sees it.
                return std::future::pending::<u16>().await;
            };
            let port: u16 = addr
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            loop {
                if http::call(
                    &addr,
                    hyper::Method::GET,
                    "/ready",
                    None,
                    Duration::from_millis(500),
                )
                .await
                .is_ok_and(|(st, _)| st == 200)
                {
                    return port;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::select! {
            port = waiter => {
                {
                    let mut slots = s.slots.lock().await;
                    slots[i as usize].port = port;
                    slots[i as usize].ready = true;
                    slots[i as usize].ejected_until = None;
                }
                backoff = Duration::from_millis(200);
                eprintln!(
                    "supervisor: {} worker {i} ready (pid {}) {} after its start",
                    now(),
                    pid.unwrap_or(0),
                    humantime::format_duration(round_ms(spawned.elapsed()))
                );
                let status = child.wait().await;
                eprintln!("supervisor: {} worker {i} (pid {}) exited ({status:?})", now(), pid.unwrap_or(0));
                died = pid;
            }
            status = child.wait() => {
                // It exited before it was ready: no GPU memory, no GPU.
                eprintln!(
                    "supervisor: {} worker {i} (pid {}) failed to start ({status:?}); retrying in {backoff:?}",
                    now(),
                    pid.unwrap_or(0)
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
        let mut slots = s.slots.lock().await;
        slots[i as usize].ready = false;
        slots[i as usize].pid = None;
    }
}

fn now() -> String {
    crate::worker::now()
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

async fn live_workers(s: &State) -> Vec<u16> {
    s.slots
        .lock()
        .await
        .iter()
        .filter(|w| w.ready)
        .map(|w| w.port)
        .collect()
}

/// The ready workers a request may go to: those not ejected, or every ready one
/// when all are ejected (a load balancer routes somewhere rather than nowhere).
async fn routable_workers(s: &State) -> Vec<u16> {
    let now = tokio::time::Instant::now();
    let slots = s.slots.lock().await;
    let ready: Vec<&Slot> = slots.iter().filter(|w| w.ready).collect();
    let in_rotation: Vec<u16> = ready
        .iter()
        .filter(|w| w.ejected_until.is_none_or(|t| t <= now))
        .map(|w| w.port)
        .collect();
    if in_rotation.is_empty() {
        ready.iter().map(|w| w.port).collect()
    } else {
        in_rotation
    }
}

/// Leaves the worker on `port` out of the rotation for `--eject-for`.
async fn eject(s: &State, port: u16) {
    if s.args.eject_for.is_zero() {
        return;
    }
    let until = tokio::time::Instant::now() + s.args.eject_for;
    if let Some(w) = s.slots.lock().await.iter_mut().find(|w| w.port == port) {
        w.ejected_until = Some(until);
        eprintln!(
            "server: {} worker on port {port} failed: out of the rotation for {}",
            humantime::format_rfc3339_millis(std::time::SystemTime::now()),
            humantime::format_duration(s.args.eject_for)
        );
    }
}

fn prompt_of(v: &serde_json::Value) -> String {
    if let Some(p) = v["prompt"].as_str() {
        return p.to_string();
    }
    v["messages"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|x| x["content"].as_str())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

/// Asks the guardrail. Ok(true): blocked. Err: the guardrail failed (down, garbage).
async fn check(s: &State, prompt: &str) -> Result<bool, String> {
    let Some(g) = &s.args.guardrail else {
        return Ok(false);
    };
    let addr = g.trim_start_matches("http://").trim_end_matches('/');
    let body = serde_json::json!({"input": prompt}).to_string();
    let (status, bytes) = http::call(
        addr,
        hyper::Method::POST,
        "/v1/moderations",
        Some(body),
        Duration::from_secs(2),
    )
    .await?;
    if status != 200 {
        return Err(format!("guardrail answered {status}"));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("guardrail answer is not JSON: {e}"))?;
    v["results"][0]["flagged"]
        .as_bool()
        .ok_or_else(|| "guardrail answer has no results[0].flagged".to_string())
}

fn completion(
    s: &State,
    chat: bool,
    text: &str,
    finish: &str,
    stream: bool,
) -> hyper::Response<http::Body> {
    let model = &s.args.model;
    if stream {
        let mut out = String::new();
        for (k, word) in text.split_inclusive(' ').enumerate() {
            let delta = if chat {
                serde_json::json!({"choices": [{"index": 0, "delta": {"content": word}, "finish_reason": null}], "model": model, "object": "chat.completion.chunk", "id": format!("c{k}")})
            } else {
                serde_json::json!({"choices": [{"index": 0, "text": word, "finish_reason": null}], "model": model, "object": "text_completion"})
            };
            out.push_str(&format!("data: {delta}\n\n"));
        }
        let last = serde_json::json!({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}], "model": model});
        out.push_str(&format!("data: {last}\n\ndata: [DONE]\n\n"));
        return http::text(StatusCode::OK, "text/event-stream", out);
    }
    let choice = if chat {
        serde_json::json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish})
    } else {
        serde_json::json!({"index": 0, "text": text, "finish_reason": finish})
    };
    http::json(
        StatusCode::OK,
        &serde_json::json!({
            "id": "cmpl-ref",
            "object": if chat { "chat.completion" } else { "text_completion" },
            "model": model,
            "choices": [choice],
            "usage": {"prompt_tokens": 0, "completion_tokens": text.split(' ').count()}
        }),
    )
}

async fn handle(s: Arc<State>, req: Req) -> hyper::Response<http::Body> {
    match req.path.as_str() {
        "/health" => {
            let live = live_workers(&s).await.len();
            if live > 0 || s.args.health_lies {
                http::json(StatusCode::OK, &serde_json::json!({"status": "ok"}))
            } else {
                http::json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &serde_json::json!({"status": "unavailable", "live_workers": 0}),
                )
            }
        }
        "/metrics" => {
            let (live, starting) = {
                let slots = s.slots.lock().await;
                let live = slots.iter().filter(|w| w.ready).count();
                let starting = slots.iter().filter(|w| !w.ready && w.pid.is_some()).count();
                (live, starting)
            };
            let c = &s.c;
            http::text(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                format!(
                    "refstack_workers_live {live}\nrefstack_workers_starting {starting}\nrefstack_workers_configured {}\nrefstack_requests_total {}\nrefstack_blocked_total {}\nrefstack_guardrail_errors_total {}\nrefstack_no_worker_total {}\nrefstack_worker_restarts_total {}\n",
                    s.args.workers,
                    c.requests.load(Ordering::Relaxed),
                    c.blocked.load(Ordering::Relaxed),
                    c.guardrail_errors.load(Ordering::Relaxed),
                    c.no_worker.load(Ordering::Relaxed),
                    c.restarts.load(Ordering::Relaxed),
                ),
            )
        }
        "/v1/models" => http::json(
            StatusCode::OK,
            &serde_json::json!({"object": "list", "data": [{"id": s.args.model, "object": "model"}]}),
        ),
        "/v1/chat/completions" | "/v1/completions" => {
            s.c.requests.fetch_add(1, Ordering::Relaxed);
            let chat = req.path == "/v1/chat/completions";
            let v: serde_json::Value = match serde_json::from_slice(&req.body) {
                Ok(v) => v,
                Err(e) => {
                    return http::json(
                        StatusCode::BAD_REQUEST,
                        &serde_json::json!({"error": {"message": format!("invalid JSON: {e}")}}),
                    );
                }
            };
            let stream = v["stream"].as_bool().unwrap_or(false);
            let prompt = prompt_of(&v);
            let blocked = match check(&s, &prompt).await {
                Ok(b) => b,
                Err(e) => {
                    s.c.guardrail_errors.fetch_add(1, Ordering::Relaxed);
                    eprintln!("server: guardrail failed: {e}");
                    s.args.policy == GuardrailPolicy::FailClosed
                }
            };
            if blocked {
                s.c.blocked.fetch_add(1, Ordering::Relaxed);
                return completion(
                    &s,
                    chat,
                    "I'm sorry, I can't help with that.",
                    "content_filter",
                    stream,
                );
            }
            let live = routable_workers(&s).await;
            if live.is_empty() {
                s.c.no_worker.fetch_add(1, Ordering::Relaxed);
                return http::json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &serde_json::json!({"error": {"message": "no worker is ready", "type": "service_unavailable"}}),
                );
            }
            let k = s.next.fetch_add(1, Ordering::Relaxed) as usize;
            let port = live[k % live.len()];
            let body = serde_json::json!({"prompt": prompt}).to_string();
            match http::call(
                &format!("127.0.0.1:{port}"),
                hyper::Method::POST,
                "/generate",
                Some(body),
                s.args.worker_timeout,
            )
            .await
            {
                Ok((200, bytes)) => {
                    let w: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
                    completion(&s, chat, w["text"].as_str().unwrap_or(""), "stop", stream)
                }
                Ok((st, _)) => {
                    eject(&s, port).await;
                    http::json(
                        StatusCode::BAD_GATEWAY,
                        &serde_json::json!({"error": {"message": format!("worker answered {st}")}}),
                    )
                }
                Err(e) => {
                    eject(&s, port).await;
                    http::json(
                        StatusCode::BAD_GATEWAY,
                        &serde_json::json!({"error": {"message": format!("worker failed: {e}")}}),
                    )
                }
            }
        }
        _ => http::json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "no such path"}),
        ),
    }
}

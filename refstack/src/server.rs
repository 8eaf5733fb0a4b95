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
//! - workers are spread over `--gpus` (worker i on the i mod n-th); one that cannot
//!   start on its GPU (exit 3: no memory, exit 4: no GPU, or a CUDA error on its
//!   stderr), or dies of a CUDA error, is started on the next GPU, and the GPU it
//!   failed on is avoided for `--gpu-retry` (doubling, at most 8×) so that
//!   replacements return to it once it has recovered;
//! - `GET /v1/workers` shows every worker (state, GPU, pid, restarts, last error)
//!   and the workers lost since the start (`lost_total`);
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
    /// Another node's server (HOST:PORT) that takes the requests this one has no
    /// ready worker for: the gateway's spill-over to another node, through which a
    /// cascading failure travels.
    pub fallback: Option<String>,
    pub cuda_lib: Option<std::path::PathBuf>,
    /// The CUDA devices the workers are spread over: worker i's home is
    /// `gpus[i mod n]` (never empty).
    pub gpus: Vec<i32>,
    /// A GPU on which a worker could not start (no memory, no device, a CUDA error)
    /// is avoided this long (doubling with each further failure, at most 8×), so that
    /// replacements go to another GPU first and come back once it has recovered.
    pub gpu_retry: Duration,
    pub model: String,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    blocked: AtomicU64,
    guardrail_errors: AtomicU64,
    no_worker: AtomicU64,
    /// Requests handed to the fallback node.
    fallback: AtomicU64,
    restarts: AtomicU64,
    /// Worker processes that exited after serving.
    died: AtomicU64,
    /// Worker processes that exited before they served.
    failed_starts: AtomicU64,
}

/// What a worker slot is doing, as `/v1/workers` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WorkerState {
    /// A process is running and loading (not serving yet).
    Starting,
    /// Serving.
    Ready,
    /// No process: a restart delay, a backoff, or no GPU with room.
    Waiting,
    /// No process, and none will be started (`--no-restart`).
    Failed,
}

impl WorkerState {
    fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Waiting => "waiting",
            WorkerState::Failed => "failed",
        }
    }
}

struct Slot {
    port: u16,
    pid: Option<u32>,
    state: WorkerState,
    /// The GPU its process runs on (or its last one tried).
    gpu: i32,
    /// Processes started after the first.
    restarts: u64,
    /// Its processes that died or failed to start.
    lost: u64,
    last_error: Option<String>,
    /// Left out of the rotation until then (it failed or timed out).
    ejected_until: Option<tokio::time::Instant>,
}

impl Slot {
    fn ready(&self) -> bool {
        self.state == WorkerState::Ready
    }
}

/// What the supervisor knows of one GPU of `--gpus`.
struct GpuHealth {
    gpu: i32,
    /// Workers are not sent to it before then (a worker failed on it).
    avoid_until: Option<tokio::time::Instant>,
    /// Failures in a row since a worker last became ready on it.
    failures: u32,
    last_error: Option<String>,
}

struct State {
    args: ServerArgs,
    /// Where this server listens: each worker's command line names it (`--server`),
    /// so that a fault can select the workers of one server among several.
    addr: String,
    slots: Mutex<Vec<Slot>>,
    gpus: std::sync::Mutex<Vec<GpuHealth>>,
    next: AtomicU64,
    c: Counters,
}

pub async fn run(mut args: ServerArgs, listener: TcpListener) {
    if args.gpus.is_empty() {
        args.gpus = vec![0];
    }
    let slots = (0..args.workers)
        .map(|i| Slot {
            port: 0,
            pid: None,
            state: WorkerState::Starting,
            gpu: args.gpus[i as usize % args.gpus.len()],
            restarts: 0,
            lost: 0,
            last_error: None,
            ejected_until: None,
        })
        .collect();
    let gpus = args
        .gpus
        .iter()
        .map(|g| GpuHealth {
            gpu: *g,
            avoid_until: None,
            failures: 0,
            last_error: None,
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
        gpus: std::sync::Mutex::new(gpus),
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

/// The GPU (an index into `--gpus`) worker `i` starts on next: the first of the list,
/// from its home GPU on, that is not avoided; when every one is, the one that is
/// avoided the shortest time more. The flag says whether it is usable now.
fn choose(s: &State, i: u32) -> (usize, bool) {
    let gpus = s.gpus.lock().unwrap_or_else(|e| e.into_inner());
    let n = gpus.len();
    let home = i as usize % n;
    let now = tokio::time::Instant::now();
    let order = (0..n).map(|k| (home + k) % n);
    if let Some(k) = order
        .clone()
        .find(|k| gpus[*k].avoid_until.is_none_or(|t| t <= now))
    {
        return (k, true);
    }
    let k = order.min_by_key(|k| gpus[*k].avoid_until).unwrap_or(home);
    (k, false)
}

/// A worker could not start on (or lost) GPU `k` for `reason`: it is avoided for a
/// while. Returns how long.
fn mark_unusable(s: &State, k: usize, reason: &str) -> Duration {
    let mut gpus = s.gpus.lock().unwrap_or_else(|e| e.into_inner());
    let g = &mut gpus[k];
    g.failures = g.failures.saturating_add(1);
    let avoid = s.args.gpu_retry * (1u32 << (g.failures - 1).min(3));
    g.avoid_until = Some(tokio::time::Instant::now() + avoid);
    g.last_error = Some(reason.to_string());
    avoid
}

/// How long GPU `k` is still avoided.
fn avoided_for(s: &State, k: usize) -> Duration {
    let gpus = s.gpus.lock().unwrap_or_else(|e| e.into_inner());
    gpus[k]
        .avoid_until
        .and_then(|t| t.checked_duration_since(tokio::time::Instant::now()))
        .unwrap_or_default()
}

/// A worker became ready on GPU `k`: it is usable again.
fn mark_usable(s: &State, k: usize) {
    let mut gpus = s.gpus.lock().unwrap_or_else(|e| e.into_inner());
    let g = &mut gpus[k];
    g.failures = 0;
    g.avoid_until = None;
}

/// What a worker's stderr said: its last line, and the first line naming a CUDA
/// error. Every line is passed on to the server's own stderr as it comes.
#[derive(Default)]
struct Tail {
    last: Option<String>,
    cuda_error: Option<String>,
}

fn forward_stderr(err: Option<tokio::process::ChildStderr>) -> tokio::task::JoinHandle<Tail> {
    tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt;
        let mut tail = Tail::default();
        let Some(err) = err else { return tail };
        let mut lines = tokio::io::BufReader::new(err).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("{line}");
            if tail.cuda_error.is_none() && line.contains("CUDA_ERROR_") {
                tail.cuda_error = Some(line.clone());
            }
            tail.last = Some(line);
        }
        tail
    })
}

/// The worker's own words for its error: its line without the `worker N: ` prefix.
fn own_words(line: &str) -> &str {
    line.strip_prefix("worker ")
        .and_then(|rest| rest.split_once(": "))
        .map(|(_, msg)| msg)
        .unwrap_or(line)
}

/// Keeps worker `i` running: start, wait until ready, watch, restart after death; a
/// worker that cannot start on its GPU (or dies of a CUDA error) is sent to the next
/// GPU of `--gpus` that is not avoided.
async fn supervise(s: Arc<State>, i: u32) {
    // The binary's own path, so that the workers show as `gpuchaos-refstack worker
    // --id N` (what a process fault selects them by).
    let exe = std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into());
    let n = s.args.gpus.len();
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
                s.slots.lock().await[i as usize].state = WorkerState::Failed;
                return;
            }
            s.c.restarts.fetch_add(1, Ordering::Relaxed);
            s.slots.lock().await[i as usize].restarts += 1;
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
        let (k, _) = choose(&s, i);
        let gpu = s.args.gpus[k];
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.args(["worker", "--id", &i.to_string(), "--server", &s.addr])
            .args(["--parent", &std::process::id().to_string()])
            // A port of its own, told on stdout once it serves: no collisions.
            .args(["--listen", "127.0.0.1:0"])
            .stdout(std::process::Stdio::piped())
            // Passed on line by line; the supervisor reads why a start failed.
            .stderr(std::process::Stdio::piped())
            .args(["--gpu", &gpu.to_string()])
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
                {
                    let mut slots = s.slots.lock().await;
                    slots[i as usize].state = WorkerState::Waiting;
                    slots[i as usize].last_error = Some(format!("cannot start: {e}"));
                }
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
        {
            let mut slots = s.slots.lock().await;
            let slot = &mut slots[i as usize];
            slot.pid = pid;
            slot.gpu = gpu;
            slot.state = WorkerState::Starting;
        }
        let stdout = child.stdout.take();
        let stderr = forward_stderr(child.stderr.take());
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
        let (served, status) = tokio::select! {
            port = waiter => {
                {
                    let mut slots = s.slots.lock().await;
                    let slot = &mut slots[i as usize];
                    slot.port = port;
                    slot.state = WorkerState::Ready;
                    slot.ejected_until = None;
                }
                mark_usable(&s, k);
                backoff = Duration::from_millis(200);
                eprintln!(
                    "supervisor: {} worker {i} ready (pid {}) on GPU {gpu} {} after its start",
                    now(),
                    pid.unwrap_or(0),
                    humantime::format_duration(round_ms(spawned.elapsed()))
                );
                let status = child.wait().await;
                eprintln!("supervisor: {} worker {i} (pid {}) exited ({status:?})", now(), pid.unwrap_or(0));
                died = pid;
                (true, status)
            }
            status = child.wait() => (false, status),
        };
        // Its last words: the stream ends once it has exited.
        let tail = tokio::time::timeout(Duration::from_secs(1), stderr)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let code = status.as_ref().ok().and_then(|st| st.code());
        let said = match (&tail.cuda_error, &tail.last) {
            (Some(l), _) => Some(own_words(l).to_string()),
            (None, Some(l)) if code.is_some_and(|c| c != 0) => Some(own_words(l).to_string()),
            _ => None,
        };
        let how = match &status {
            Ok(st) => st.to_string(),
            Err(e) => format!("cannot wait for it: {e}"),
        };
        let error = match &said {
            Some(w) => format!("{w} ({how})"),
            None => how,
        };
        // Its GPU's fault: no memory or no device at start (exit 3 or 4), or a CUDA
        // error whenever it came.
        let gpu_fault = tail.cuda_error.is_some() || (!served && matches!(code, Some(3 | 4)));
        {
            let mut slots = s.slots.lock().await;
            let slot = &mut slots[i as usize];
            slot.state = WorkerState::Waiting;
            slot.pid = None;
            slot.lost += 1;
            slot.last_error = Some(error.clone());
        }
        if served {
            s.c.died.fetch_add(1, Ordering::Relaxed);
        } else {
            s.c.failed_starts.fetch_add(1, Ordering::Relaxed);
            eprintln!(
                "supervisor: {} worker {i} (pid {}) failed to start on GPU {gpu} ({status:?}){}",
                now(),
                pid.unwrap_or(0),
                if gpu_fault && n > 1 {
                    String::new()
                } else {
                    format!("; retrying in {backoff:?}")
                }
            );
        }
        if gpu_fault && n > 1 {
            let avoid = mark_unusable(&s, k, &error);
            let (next, usable) = choose(&s, i);
            if usable && next != k {
                eprintln!(
                    "supervisor: {} worker {i}: GPU {gpu} unusable ({error}), trying GPU {}",
                    now(),
                    s.args.gpus[next]
                );
                continue;
            }
            // Every GPU is avoided: wait until the first of them may be tried again
            // (at least the backoff).
            let wait = backoff.max(avoided_for(&s, next));
            eprintln!(
                "supervisor: {} worker {i}: GPU {gpu} unusable ({error}); it is avoided for {} and no other GPU of {:?} is usable: waiting {wait:?}, then trying GPU {}",
                now(),
                humantime::format_duration(avoid),
                s.args.gpus,
                s.args.gpus[next]
            );
            {
                let mut slots = s.slots.lock().await;
                slots[i as usize].state = WorkerState::Waiting;
            }
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
            continue;
        } else if gpu_fault {
            mark_unusable(&s, k, &error);
        }
        if !served || gpu_fault {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
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
        .filter(|w| w.ready())
        .map(|w| w.port)
        .collect()
}

/// The ready workers a request may go to: those not ejected, or every ready one
/// when all are ejected (a load balancer routes somewhere rather than nowhere).
async fn routable_workers(s: &State) -> Vec<u16> {
    let now = tokio::time::Instant::now();
    let slots = s.slots.lock().await;
    let ready: Vec<&Slot> = slots.iter().filter(|w| w.ready()).collect();
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

fn lost_total(c: &Counters) -> u64 {
    c.died.load(Ordering::Relaxed) + c.failed_starts.load(Ordering::Relaxed)
}

/// Each GPU of `--gpus` and whether workers are kept off it now.
fn unusable_gpus(s: &State) -> Vec<(i32, bool)> {
    let now = tokio::time::Instant::now();
    let gpus = s.gpus.lock().unwrap_or_else(|e| e.into_inner());
    gpus.iter()
        .map(|g| (g.gpu, g.avoid_until.is_some_and(|t| t > now)))
        .collect()
}

/// `GET /v1/workers`: every worker slot, what it is doing and on which GPU, and the
/// workers lost since the server started (processes that died or failed to start:
/// each failed attempt counts, as an orchestrator counts restarts).
async fn workers_view(s: &State) -> serde_json::Value {
    let now = tokio::time::Instant::now();
    let workers: Vec<serde_json::Value> = s
        .slots
        .lock()
        .await
        .iter()
        .enumerate()
        .map(|(i, w)| {
            serde_json::json!({
                "id": i,
                "gpu": w.gpu,
                "home_gpu": s.args.gpus[i % s.args.gpus.len()],
                "state": w.state.as_str(),
                "pid": w.pid,
                "port": (w.ready() && w.port != 0).then_some(w.port),
                "restarts": w.restarts,
                "lost": w.lost,
                "last_error": w.last_error,
            })
        })
        .collect();
    let gpus: Vec<serde_json::Value> = {
        let health = s.gpus.lock().unwrap_or_else(|e| e.into_inner());
        health
            .iter()
            .map(|g| {
                let left = g.avoid_until.and_then(|t| t.checked_duration_since(now));
                serde_json::json!({
                    "gpu": g.gpu,
                    "usable": left.is_none(),
                    "avoided_for_ms": left.map(|d| d.as_millis() as u64),
                    "failures": g.failures,
                    "last_error": g.last_error,
                })
            })
            .collect()
    };
    let ready = workers.iter().filter(|w| w["state"] == "ready").count();
    serde_json::json!({
        "workers": workers,
        "ready": ready,
        "configured": s.args.workers,
        "lost_total": lost_total(&s.c),
        "died_total": s.c.died.load(Ordering::Relaxed),
        "failed_starts_total": s.c.failed_starts.load(Ordering::Relaxed),
        "gpus": gpus,
    })
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

/// Hands a request this server has no ready worker for to the fallback node, as
/// it is; the answer says who served it (`x-refstack-served-by`).
async fn forward(s: &State, fallback: &str, req: &Req) -> hyper::Response<http::Body> {
    s.c.fallback.fetch_add(1, Ordering::Relaxed);
    let body = String::from_utf8_lossy(&req.body).into_owned();
    let mut r = match http::call(
        fallback,
        hyper::Method::POST,
        &req.path,
        Some(body),
        s.args.worker_timeout,
    )
    .await
    {
        Ok((status, bytes)) => {
            let mut r = hyper::Response::new(http::full(bytes));
            *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => http::json(
            StatusCode::BAD_GATEWAY,
            &serde_json::json!({"error": {"message": format!("no worker is ready here and the fallback node failed: {e}")}}),
        ),
    };
    if let Ok(v) = hyper::header::HeaderValue::from_str(&format!("fallback {fallback}")) {
        r.headers_mut().insert("x-refstack-served-by", v);
    }
    r
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
            let (live, starting, per_gpu) = {
                let slots = s.slots.lock().await;
                let live = slots.iter().filter(|w| w.ready()).count();
                let starting = slots
                    .iter()
                    .filter(|w| w.state == WorkerState::Starting)
                    .count();
                let per_gpu: Vec<(i32, usize)> = s
                    .args
                    .gpus
                    .iter()
                    .map(|g| {
                        (
                            *g,
                            slots.iter().filter(|w| w.ready() && w.gpu == *g).count(),
                        )
                    })
                    .collect();
                (live, starting, per_gpu)
            };
            let unusable = unusable_gpus(&s);
            let c = &s.c;
            let mut text = format!(
                "refstack_workers_live {live}\nrefstack_workers_starting {starting}\nrefstack_workers_configured {}\nrefstack_requests_total {}\nrefstack_blocked_total {}\nrefstack_guardrail_errors_total {}\nrefstack_no_worker_total {}\nrefstack_fallback_total {}\nrefstack_worker_restarts_total {}\nrefstack_workers_lost_total {}\nrefstack_worker_failed_starts_total {}\n",
                s.args.workers,
                c.requests.load(Ordering::Relaxed),
                c.blocked.load(Ordering::Relaxed),
                c.guardrail_errors.load(Ordering::Relaxed),
                c.no_worker.load(Ordering::Relaxed),
                c.fallback.load(Ordering::Relaxed),
                c.restarts.load(Ordering::Relaxed),
                lost_total(c),
                c.failed_starts.load(Ordering::Relaxed),
            );
            for (g, n) in &per_gpu {
                text.push_str(&format!("refstack_gpu_workers_ready{{gpu=\"{g}\"}} {n}\n"));
            }
            for (g, avoided) in &unusable {
                text.push_str(&format!(
                    "refstack_gpu_unusable{{gpu=\"{g}\"}} {}\n",
                    u8::from(*avoided)
                ));
            }
            http::text(StatusCode::OK, "text/plain; version=0.0.4", text)
        }
        "/v1/workers" | "/workers" => http::json(StatusCode::OK, &workers_view(&s).await),
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
            if live.is_empty()
                && let Some(f) = &s.args.fallback
            {
                return forward(&s, f, &req).await;
            }
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

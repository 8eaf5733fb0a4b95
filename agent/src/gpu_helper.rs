//! The GPU memory helper: `gpuchaos-agent __gpu-helper --cuda-lib PATH --uuid UUID
//! --token TOKEN --parent PID`, a child of the agent that holds memory on one GPU.
//!
//! It dies with the agent (PR_SET_PDEATHSIG = SIGKILL, checked against a parent that
//! died before the call), so the driver frees its memory even when the agent is
//! SIGKILLed. It loads libcuda, creates a context on the GPU, prints `ready`, then
//! obeys one command per line on stdin and answers one line on stdout:
//!
//! - `grow BYTES` → allocates BYTES more (in chunks): `ok HELD`, or
//!   `oom HELD CUDA_ERROR_NAME` / `err HELD message` with what it holds after the
//!   failure;
//! - end of input or `exit` → frees everything, destroys the context, exits 0.
//!
//! The token is only there to name the helper in `ps` and for start-up recovery.
//!
//! With `--compute`, the helper loads GPU time instead (the `gpu_compute` kind): see
//! [`compute`].

use std::io::{BufRead, Write};
use std::process::ExitCode;

use crate::sys::cuda::{CUDA_ERROR_OUT_OF_MEMORY, Cuda};

pub mod compute;

/// The first argument that selects helper mode.
pub const ARG: &str = "__gpu-helper";
/// Allocation chunk: big enough to be fast, small enough to land near a target.
const CHUNK: u64 = 256 << 20;
/// The smallest chunk tried before giving up: the driver's page size.
const MIN_CHUNK: u64 = 2 << 20;

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

pub fn main(args: &[String]) -> ExitCode {
    if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL) {
        say(&format!("fatal cannot tie the helper to the agent: {e}"));
        return ExitCode::from(70);
    }
    // The agent may have died between fork and the line above: then the death
    // signal will never come, and the parent is no longer the agent.
    if let Some(parent) = flag(args, "--parent").and_then(|p| p.parse::<i32>().ok())
        && nix::unistd::getppid().as_raw() != parent
    {
        return ExitCode::from(70);
    }
    let (Some(uuid), lib) = (flag(args, "--uuid"), flag(args, "--cuda-lib")) else {
        say("fatal usage: __gpu-helper --uuid UUID [--compute] [--cuda-lib PATH] [--token TOKEN]");
        return ExitCode::from(64);
    };
    let cuda = match Cuda::open(lib.as_deref().map(std::path::Path::new)) {
        Ok(c) => c,
        Err(e) => {
            say(&format!("fatal {e}"));
            return ExitCode::from(69);
        }
    };
    let ordinal = match find(&cuda, &uuid) {
        Ok(o) => o,
        Err(e) => {
            say(&format!("fatal {e}"));
            return ExitCode::from(69);
        }
    };
    let ctx = match cuda.ctx_create(ordinal) {
        Ok(c) => c,
        Err(e) => {
            say(&format!("fatal {e}"));
            return ExitCode::from(69);
        }
    };
    if args.iter().any(|a| a == "--compute") {
        let code = compute::run(&cuda, ordinal, say);
        let _ = ctx.destroy();
        return code;
    }
    say("ready");
    let mut held: Vec<(u64, u64)> = Vec::new();
    let total = |h: &[(u64, u64)]| h.iter().map(|(_, b)| b).sum::<u64>();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let mut words = line.split_whitespace();
        match (
            words.next(),
            words.next().and_then(|n| n.parse::<u64>().ok()),
        ) {
            (Some("grow"), Some(mut want)) => {
                let mut failed = None;
                let mut chunk = CHUNK;
                while want > 0 {
                    let n = want.min(chunk);
                    match cuda.mem_alloc(n as usize) {
                        Ok(p) => {
                            held.push((p, n));
                            want -= n;
                        }
                        // Near the top a real driver cannot hand out one more big
                        // chunk (2 MiB pages, its own page tables): halve down to 2 MiB.
                        Err(e) if e.code == CUDA_ERROR_OUT_OF_MEMORY && n > MIN_CHUNK => {
                            chunk = (n / 2).max(MIN_CHUNK);
                        }
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                match failed {
                    None => say(&format!("ok {}", total(&held))),
                    Some(e) if e.code == CUDA_ERROR_OUT_OF_MEMORY => {
                        say(&format!("oom {} {}", total(&held), e.name))
                    }
                    Some(e) => say(&format!("err {} {e}", total(&held))),
                }
            }
            (Some("exit"), _) => break,
            _ => say(&format!("err {} unknown command {line:?}", total(&held))),
        }
    }
    for (p, _) in held {
        let _ = cuda.mem_free(p);
    }
    let _ = ctx.destroy();
    ExitCode::SUCCESS
}

/// The CUDA ordinal of the GPU with this UUID (CUDA and NVML may number GPUs
/// differently, so the UUID is what ties them).
fn find(cuda: &Cuda, uuid: &str) -> Result<i32, String> {
    cuda.init().map_err(|e| e.to_string())?;
    let n = cuda.device_count().map_err(|e| e.to_string())?;
    for i in 0..n {
        if cuda
            .device_uuid(i)
            .map_err(|e| e.to_string())?
            .eq_ignore_ascii_case(uuid)
        {
            return Ok(i);
        }
    }
    Err(format!(
        "CUDA sees no GPU with UUID {uuid} ({n} devices visible; check CUDA_VISIBLE_DEVICES)"
    ))
}

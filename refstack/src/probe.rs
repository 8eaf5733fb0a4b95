//! `gpuchaos-refstack cuda-probe`: a small CUDA workload for checks on a real GPU
//! (scripts/gpu-check.sh) and on the fake driver. It creates a context on one device
//! through the CUDA driver API (the library it is given: the real driver, the fake,
//! or the gpu_xid interposer), then either
//!
//! - `--alloc SIZE`: tries to allocate SIZE once and prints `alloc ok` or
//!   `alloc err NAME CODE` (exit 0 or 1); or
//! - `--run DURATION`: for that long, every `--every` (100 ms), allocates and frees
//!   2 MiB and runs the spin kernel for about 1 ms, printing `ok N` once a second and
//!   `err NAME CODE after MS` at the first failure (exit 1), or `done N` (exit 0).
//!
//! Every line is flushed at once, so a script can follow it live.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use gpuchaos_cuda::{Cuda, CudaError};

pub struct ProbeArgs {
    pub cuda_lib: Option<PathBuf>,
    pub gpu: i32,
    pub alloc: Option<u64>,
    pub run: Option<Duration>,
    pub every: Duration,
}

fn say(line: &str) {
    println!("{line}");
    let _ = std::io::stdout().flush();
}

fn err_line(what: &str, e: &CudaError) -> String {
    format!("{what} err {} {}", e.name, e.code)
}

pub fn run(a: ProbeArgs) -> ExitCode {
    let cuda = match Cuda::open(a.cuda_lib.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            say(&format!("open err {e}"));
            return ExitCode::from(4);
        }
    };
    if let Err(e) = cuda.init() {
        say(&err_line("init", &e));
        return ExitCode::from(4);
    }
    let _ctx = match cuda.ctx_create(a.gpu) {
        Ok(c) => c,
        Err(e) => {
            say(&err_line("context", &e));
            return ExitCode::from(1);
        }
    };
    say("context ok");
    if let Some(bytes) = a.alloc {
        return match cuda.mem_alloc(bytes as usize) {
            Ok(ptr) => {
                say("alloc ok");
                let _ = cuda.mem_free(ptr);
                ExitCode::SUCCESS
            }
            Err(e) => {
                say(&err_line("alloc", &e));
                ExitCode::from(1)
            }
        };
    }
    let Some(run) = a.run else {
        return ExitCode::SUCCESS;
    };
    // The kernel is optional: a driver without the module API still probes memory.
    let kernel = cuda.spin_kernel().ok();
    // About 1 ms of cycles at the SM clock (kHz × 1 ms).
    let cycles = cuda
        .device_attribute(a.gpu, gpuchaos_cuda::CU_DEVICE_ATTRIBUTE_CLOCK_RATE)
        .map(|khz| khz.max(1) as u64)
        .unwrap_or(1_500_000);
    let start = Instant::now();
    let mut n: u64 = 0;
    let mut last_said = Instant::now();
    while start.elapsed() < run {
        let step = (|| -> Result<(), CudaError> {
            let p = cuda.mem_alloc(2 << 20)?;
            cuda.mem_free(p)?;
            if let Some(k) = &kernel {
                k.launch(1, 32, cycles)?;
                cuda.ctx_synchronize()?;
            }
            Ok(())
        })();
        if let Err(e) = step {
            say(&format!(
                "{} after {}",
                err_line("step", &e),
                start.elapsed().as_millis()
            ));
            return ExitCode::from(1);
        }
        n += 1;
        if last_said.elapsed() >= Duration::from_secs(1) {
            say(&format!("ok {n}"));
            last_said = Instant::now();
        }
        std::thread::sleep(a.every);
    }
    say(&format!("done {n}"));
    ExitCode::SUCCESS
}

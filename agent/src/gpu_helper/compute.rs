//! The compute mode of the GPU helper (`__gpu-helper --compute`): keeps a share of
//! one GPU's time busy with the spin kernel ([`gpuchaos_cuda::SPIN_PTX`], PTX text
//! the driver JIT-compiles; no CUDA compiler at build time).
//!
//! Each launch has `SMs × BLOCKS_PER_SM` blocks of `THREADS` threads, so that every
//! SM runs it, and lasts at most [`MAX_KERNEL`]: a stop never waits on a long kernel.
//! The duty cycle runs in periods of [`PERIOD`]: at the start of each, the
//! [`Controller`] says how much kernel time the period needs so that the last
//! second's share (measured with CUDA events around every kernel) meets the target;
//! the helper launches kernels until that time is spent, one after another, and
//! sleeps out the rest of the period. Cycles per second are calibrated from the
//! events, so a kernel asked for 1 ms takes about 1 ms whatever the clock (and under
//! contention, when kernels take longer, fewer cycles are asked for).
//!
//! Protocol (one line each way): after `ready sms=N clock_khz=K blocks=B threads=T`
//! it obeys `load PERCENT` (answers `ok load PERCENT`) and `exit` (or end of input:
//! stops at once, after the kernel in flight); every [`STATS_EVERY`] it says
//! `stats target=P share=S window_ms=W kernels=N kernel_ms=M`, the share of the last
//! `W` ms (at most 1 s) its kernels ran. A CUDA error is `fatal MESSAGE`, and exit 69.

use std::collections::VecDeque;
use std::io::BufRead;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::sys::cuda::{
    CU_DEVICE_ATTRIBUTE_CLOCK_RATE, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, Cuda, CudaError,
};

/// One duty-cycle period.
pub const PERIOD: Duration = Duration::from_millis(10);
/// The longest kernel asked for (as measured, not as cycles).
pub const MAX_KERNEL: Duration = Duration::from_millis(2);
/// Less kernel time than this left in a period is left to the next.
pub const MIN_KERNEL: Duration = Duration::from_micros(100);
/// The share is measured over the last second (NVML's longest sample period).
pub const WINDOW: Duration = Duration::from_secs(1);
/// How often the helper reports its share.
pub const STATS_EVERY: Duration = Duration::from_millis(200);
/// Blocks per SM, and threads per block: 16 warps on every SM, 4 per scheduler.
pub const BLOCKS_PER_SM: u32 = 4;
pub const THREADS: u32 = 128;

/// The duty cycle's arithmetic, on a clock in seconds: how much kernel time the next
/// period needs so that the share over the last [`WINDOW`] (or since the start, when
/// shorter) meets the target. Integral over the window: time lost to a late wake-up
/// or a slow launch is made up in the next periods, never more than a period's
/// worth at once.
#[derive(Debug, Clone)]
pub struct Controller {
    target: f64,
    started: f64,
    /// (end, busy seconds) of each kernel in the window.
    kernels: VecDeque<(f64, f64)>,
}

impl Controller {
    pub fn new(now: f64) -> Self {
        Controller {
            target: 0.0,
            started: now,
            kernels: VecDeque::new(),
        }
    }

    /// The share of time to keep busy, 0 to 1.
    pub fn set_target(&mut self, share: f64) {
        self.target = share.clamp(0.0, 1.0);
    }

    pub fn target(&self) -> f64 {
        self.target
    }

    fn expire(&mut self, now: f64) {
        let from = now - WINDOW.as_secs_f64();
        while self.kernels.front().is_some_and(|(end, _)| *end <= from) {
            self.kernels.pop_front();
        }
    }

    /// A kernel that ended at `end` after `busy` seconds.
    pub fn record(&mut self, end: f64, busy: f64) {
        self.kernels.push_back((end, busy.max(0.0)));
        self.expire(end);
    }

    /// (the share of the window the kernels ran, the window's length in seconds,
    /// the kernels in it, their total busy seconds).
    pub fn share(&mut self, now: f64) -> (f64, f64, usize, f64) {
        self.expire(now);
        let len = (now - self.started).clamp(0.0, WINDOW.as_secs_f64());
        let busy: f64 = self.kernels.iter().map(|(_, b)| b).sum();
        let share = if len > 0.0 {
            (busy / len).min(1.0)
        } else {
            0.0
        };
        (share, len, self.kernels.len(), busy)
    }

    /// Kernel time to spend in the period that starts now, 0 to `period`.
    pub fn budget(&mut self, now: f64, period: f64) -> f64 {
        let (_, len, _, busy) = self.share(now);
        (self.target * (len + period) - busy).clamp(0.0, period)
    }
}

enum Cmd {
    Load(f64),
    Exit,
}

fn reader(tx: mpsc::Sender<Cmd>, say: fn(&str)) {
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let mut w = line.split_whitespace();
        match (w.next(), w.next().map(str::parse::<f64>)) {
            (Some("load"), Some(Ok(p))) if (0.0..=100.0).contains(&p) => {
                if tx.send(Cmd::Load(p)).is_err() {
                    return;
                }
            }
            (Some("exit"), _) => break,
            _ => say(&format!(
                "err unknown command {line:?}: load PERCENT (0 to 100) or exit"
            )),
        }
    }
    let _ = tx.send(Cmd::Exit);
}

/// Runs the duty cycle on the device (its context current on this thread) until
/// told to exit. Returns the exit code.
pub fn run(cuda: &Cuda, ordinal: i32, say: fn(&str)) -> ExitCode {
    match serve(cuda, ordinal, say) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say(&format!("fatal {e}"));
            ExitCode::from(69)
        }
    }
}

fn serve(cuda: &Cuda, ordinal: i32, say: fn(&str)) -> Result<(), CudaError> {
    let sms = cuda
        .device_attribute(ordinal, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
        .max(1) as u32;
    let clock_khz = cuda
        .device_attribute(ordinal, CU_DEVICE_ATTRIBUTE_CLOCK_RATE)?
        .max(1) as u64;
    let kernel = cuda.spin_kernel()?;
    let (start, end) = (cuda.event()?, cuda.event()?);
    let blocks = sms.saturating_mul(BLOCKS_PER_SM);
    // One short kernel before saying ready: the JIT and the launch path work.
    start.record()?;
    kernel.launch(blocks, THREADS, clock_khz)?;
    end.record()?;
    end.synchronize()?;
    end.elapsed_ms_since(&start)?;
    say(&format!(
        "ready sms={sms} clock_khz={clock_khz} blocks={blocks} threads={THREADS}"
    ));

    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("commands".into())
        .spawn(move || reader(tx, say))
        .map_err(|e| CudaError {
            code: -1,
            name: format!("cannot start the command reader: {e}"),
            call: "the helper",
        })?;

    let clock = Instant::now();
    let t = || clock.elapsed().as_secs_f64();
    let mut ctl = Controller::new(t());
    // Cycles per second, calibrated from the events.
    let nominal = clock_khz as f64 * 1000.0;
    let mut rate = nominal;
    let mut next_stats = 0.0;
    let period = PERIOD.as_secs_f64();
    // Applies one command; false on exit.
    let apply = |c: Cmd, ctl: &mut Controller| match c {
        Cmd::Load(p) => {
            ctl.set_target(p / 100.0);
            say(&format!("ok load {p}"));
            true
        }
        Cmd::Exit => false,
    };
    'periods: loop {
        while let Ok(c) = rx.try_recv() {
            if !apply(c, &mut ctl) {
                break 'periods;
            }
        }
        let p0 = t();
        let budget = ctl.budget(p0, period);
        let mut spent = 0.0;
        while budget - spent >= MIN_KERNEL.as_secs_f64() {
            let want = (budget - spent).min(MAX_KERNEL.as_secs_f64());
            let cycles = (want * rate).max(1.0) as u64;
            start.record()?;
            kernel.launch(blocks, THREADS, cycles)?;
            end.record()?;
            end.synchronize()?;
            let took = end.elapsed_ms_since(&start)? as f64 / 1000.0;
            if took > 0.0 {
                let r = (cycles as f64 / took).clamp(nominal * 0.05, nominal * 20.0);
                rate = 0.8 * rate + 0.2 * r;
            }
            spent += took;
            ctl.record(t(), took);
            if let Ok(c) = rx.try_recv()
                && !apply(c, &mut ctl)
            {
                break 'periods;
            }
        }
        let now = t();
        if now >= next_stats {
            let (share, len, n, busy) = ctl.share(now);
            say(&format!(
                "stats target={:.2} share={:.2} window_ms={:.0} kernels={n} kernel_ms={:.3}",
                ctl.target() * 100.0,
                share * 100.0,
                len * 1000.0,
                if n > 0 { busy * 1000.0 / n as f64 } else { 0.0 }
            ));
            next_stats = now + STATS_EVERY.as_secs_f64();
        }
        let left = p0 + period - t();
        if left > 0.0 {
            match rx.recv_timeout(Duration::from_secs_f64(left)) {
                Ok(c) => {
                    if !apply(c, &mut ctl) {
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the helper's loop on a simulated clock: a kernel of `c` cycles takes
    /// `c / nominal * stretch` (contention) plus a launch overhead; the helper
    /// calibrates its cycles per second as it does on a GPU; each sleep overshoots by
    /// `late`.
    fn simulate(target: f64, stretch: f64, late: f64, secs: f64) -> f64 {
        let period = PERIOD.as_secs_f64();
        let nominal = 1.5e9;
        let mut rate = nominal;
        let mut now = 0.0;
        let mut ctl = Controller::new(now);
        ctl.set_target(target);
        while now < secs {
            let p0 = now;
            let budget = ctl.budget(now, period);
            let mut spent = 0.0;
            while budget - spent >= MIN_KERNEL.as_secs_f64() {
                let want = (budget - spent).min(MAX_KERNEL.as_secs_f64());
                let cycles = (want * rate).max(1.0);
                let took = cycles / nominal * stretch;
                rate = 0.8 * rate + 0.2 * (cycles / took).clamp(nominal * 0.05, nominal * 20.0);
                now += 20e-6 + took;
                spent += took;
                ctl.record(now, took);
            }
            now = now.max(p0 + period) + late;
        }
        ctl.share(now).0
    }

    #[test]
    fn the_duty_cycle_meets_its_target_within_one_percent() {
        for target in [0.1, 0.3, 0.5, 0.8, 0.9, 0.95] {
            for (stretch, late) in [(1.0, 0.0), (1.0, 80e-6), (1.7, 300e-6), (10.0, 50e-6)] {
                let got = simulate(target, stretch, late, 3.0);
                assert!(
                    (got - target).abs() <= 0.01 * target.max(0.1),
                    "target {target}, stretch {stretch}, late {late}: got {got}"
                );
            }
        }
        // 100%: kernels back to back, less the launch gaps.
        assert!(simulate(1.0, 1.0, 0.0, 2.0) > 0.98);
    }

    #[test]
    fn a_budget_never_exceeds_a_period_and_makes_up_lost_time() {
        let mut ctl = Controller::new(0.0);
        ctl.set_target(0.5);
        assert!((ctl.budget(0.0, 0.01) - 0.005).abs() < 1e-9);
        // Nothing ran for half a second (the helper was starved): the next periods
        // run at full duty until the window's share is back, never more.
        assert_eq!(ctl.budget(0.5, 0.01), 0.01);
        ctl.record(0.5, 0.5);
        let (share, len, n, _) = ctl.share(0.5);
        assert_eq!((share, len, n), (1.0, 0.5, 1));
        assert_eq!(ctl.budget(0.5, 0.01), 0.0, "ahead: sleep");
        // A kernel leaves the window a second after it ended.
        assert_eq!(ctl.share(1.6).2, 0);
        ctl.set_target(0.0);
        assert_eq!(ctl.budget(2.0, 0.01), 0.0);
    }
}

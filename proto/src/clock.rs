//! The clocks both sides speak: CLOCK_MONOTONIC in nanoseconds (agents stamp fault
//! times with it; controllers map those stamps onto their own timeline) and the wall
//! clock in Unix milliseconds (for humans).

use nix::time::{ClockId, clock_gettime};

pub fn mono_ns() -> u64 {
    match clock_gettime(ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64,
        Err(_) => 0,
    }
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

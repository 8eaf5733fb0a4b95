//! The agent's clocks: CLOCK_MONOTONIC in nanoseconds (what controllers map onto
//! their own timeline) and the wall clock in Unix milliseconds (for humans). Shared
//! with the controller through the proto crate, so both read the same clock.

pub use gpuchaos_proto::clock::{mono_ns, unix_ms};

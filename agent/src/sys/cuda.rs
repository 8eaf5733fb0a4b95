//! The CUDA driver API, from the shared `gpuchaos-cuda` crate.

pub use gpuchaos_cuda::*;

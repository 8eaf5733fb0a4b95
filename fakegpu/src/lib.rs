//! A fake NVIDIA driver for tests and demos: one shared library exporting the NVML
//! and CUDA driver API symbols that gpuchaos (through nvml-wrapper and its own CUDA
//! loader) and the reference inference workers use.
//!
//! Point `--nvml-lib` and `--cuda-lib` (or `GPUCHAOS_NVML_LIB`, `GPUCHAOS_CUDA_LIB`) at
//! `libgpuchaos_fakegpu.so`. Configuration, read from the environment:
//!
//! - `GPUCHAOS_FAKE_GPU_STATE`: the state file every process shares (default
//!   `/tmp/gpuchaos-fake-gpu.json`). The first process to open it writes the devices.
//! - `GPUCHAOS_FAKE_GPUS`: the devices, `2x80GiB` or `80GiB,40GiB` (default `1x80GiB`).
//! - `GPUCHAOS_FAKE_GPU_CONTEXT`: what a CUDA context costs on the device (default
//!   `512MiB`, about what a real one takes).
//! - `GPUCHAOS_FAKE_GPU_DRIVER=off`: behave as if the kernel driver were not loaded.
//! - `GPUCHAOS_FAKE_GPU_SMS`: SMs per device (default 132), for the kernel model.
//!
//! As on a real GPU, memory is shared by every process on the node: the state file,
//! locked with flock for each call, records each context and allocation with its
//! process (pid and start time). A process that has died loses its allocations at the
//! next call, as the real driver frees a dead process's memory.
//!
//! Kernels: the spin kernel of `gpuchaos-cuda` loads from its PTX and "runs" for the
//! cycles it is given at a 1.5 GHz clock, slowed by other processes' kernels on the
//! same device; NVML shows every process's kernel time as the device's utilization
//! (see the kernels section below).
//!
//! FFI is this crate's whole purpose, so it allows `unsafe`: every exported function
//! checks its pointers for null before writing through them.
#![allow(unsafe_code)]

use std::cell::Cell;
use std::ffi::{CStr, c_char, c_int, c_uint, c_ulonglong, c_void};
use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

const DEFAULT_STATE: &str = "/tmp/gpuchaos-fake-gpu.json";
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Device {
    name: String,
    uuid: String,
    total: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Alloc {
    pid: u32,
    start: u64,
    dev: u32,
    bytes: u64,
    /// The device pointer, or the context id for a context.
    handle: u64,
    context: bool,
    /// For an allocation: the context it was made in.
    ctx: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    devices: Vec<Device>,
    context_bytes: u64,
    allocs: Vec<Alloc>,
    next_handle: u64,
    /// Each process's kernel time on each device over the last second or so.
    #[serde(default)]
    busy: Vec<Busy>,
}

/// One process's kernel time on one device, as it last published it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Busy {
    pid: u32,
    start: u64,
    dev: u32,
    slots: Slots,
}

/// Kernel time per [`SLOT_US`] slot of the monotonic clock: `v[k]` is the busy
/// microseconds in slot `base + k`. Kernels in flight are counted ahead (a launch
/// knows when its kernel will end).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Slots {
    base: u64,
    v: Vec<u32>,
}

/// Busy time is kept in slots of 10 ms.
const SLOT_US: u64 = 10_000;
/// NVML's utilization is over the last second (100 slots)…
const NVML_WINDOW_SLOTS: u64 = 100;
/// …and the contention a launch meets over the last 100 ms.
const CONTENTION_WINDOW_SLOTS: u64 = 10;
/// Windows end this many slots ago: every process publishes within that delay.
const LAG_SLOTS: u64 = 3;
/// Slots older than this are dropped.
const KEEP_SLOTS: u64 = 130;

impl Slots {
    fn add(&mut self, a: u64, b: u64) {
        if b <= a {
            return;
        }
        let (first, last) = (a / SLOT_US, (b - 1) / SLOT_US);
        if self.v.is_empty() {
            self.base = first;
        }
        if first < self.base {
            let n = (self.base - first) as usize;
            self.v.splice(0..0, std::iter::repeat_n(0, n));
            self.base = first;
        }
        let need = (last - self.base + 1) as usize;
        if self.v.len() < need {
            self.v.resize(need, 0);
        }
        for slot in first..=last {
            let lo = a.max(slot * SLOT_US);
            let hi = b.min((slot + 1) * SLOT_US);
            let k = (slot - self.base) as usize;
            self.v[k] = self.v[k].saturating_add((hi - lo) as u32);
        }
    }

    fn prune(&mut self, keep_from: u64) {
        if keep_from <= self.base {
            return;
        }
        let n = ((keep_from - self.base) as usize).min(self.v.len());
        self.v.drain(..n);
        self.base = keep_from;
    }

    fn at(&self, slot: u64) -> u64 {
        if slot < self.base {
            return 0;
        }
        self.v
            .get((slot - self.base) as usize)
            .map(|b| *b as u64)
            .unwrap_or(0)
    }
}

/// The share of the slots `[from, to)` during which any of `procs` ran a kernel (a
/// slot is busy for at most its length, whoever ran in it).
fn share<'a>(procs: impl Iterator<Item = &'a Slots> + Clone, from: u64, to: u64) -> f64 {
    if to <= from {
        return 0.0;
    }
    let busy: u64 = (from..to)
        .map(|slot| procs.clone().map(|p| p.at(slot)).sum::<u64>().min(SLOT_US))
        .sum();
    busy as f64 / ((to - from) * SLOT_US) as f64
}

/// Microseconds on the system-wide monotonic clock (shared by every process).
fn mono_us() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .unwrap_or(0)
}

fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: f64 = n.parse().ok()?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1024,
        "mib" => MIB,
        "gib" => GIB,
        _ => return None,
    };
    Some((n * mult as f64) as u64)
}

fn configured_devices() -> Vec<Device> {
    let spec = std::env::var("GPUCHAOS_FAKE_GPUS").unwrap_or_else(|_| "1x80GiB".into());
    let mut sizes = Vec::new();
    for part in spec.split(',') {
        match part.split_once('x') {
            Some((n, size)) if n.trim().parse::<u32>().is_ok() => {
                let n: u32 = n.trim().parse().unwrap_or(1);
                let size = parse_size(size).unwrap_or(80 * GIB);
                sizes.extend(std::iter::repeat_n(size, n as usize));
            }
            _ => sizes.push(parse_size(part).unwrap_or(80 * GIB)),
        }
    }
    sizes
        .into_iter()
        .enumerate()
        .map(|(i, total)| Device {
            name: format!("NVIDIA Fake GPU {}GiB (gpuchaos)", total / GIB),
            uuid: format!("GPU-fa4e0000-0000-4000-8000-{i:012x}"),
            total,
        })
        .collect()
}

fn driver_off() -> bool {
    std::env::var("GPUCHAOS_FAKE_GPU_DRIVER").is_ok_and(|v| v == "off")
}

/// (start time, dead?) of a process, from /proc.
fn process(pid: u32) -> Option<(u64, bool)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((start, matches!(state, 'Z' | 'X')))
}

fn me() -> (u32, u64) {
    let pid = std::process::id();
    (pid, process(pid).map(|p| p.0).unwrap_or(0))
}

fn fresh_state() -> State {
    State {
        devices: configured_devices(),
        context_bytes: std::env::var("GPUCHAOS_FAKE_GPU_CONTEXT")
            .ok()
            .and_then(|v| parse_size(&v))
            .unwrap_or(512 * MIB),
        allocs: Vec::new(),
        next_handle: 0x7f00_0000_0000,
        busy: Vec::new(),
    }
}

/// Runs `f` on the shared state under an exclusive lock (on a separate lock file),
/// and writes it back atomically (a temporary file renamed over the state), so that a
/// process killed half way never leaves a torn state behind.
fn with_state<T>(f: impl FnOnce(&mut State) -> T) -> Result<T, String> {
    let path = std::env::var("GPUCHAOS_FAKE_GPU_STATE").unwrap_or_else(|_| DEFAULT_STATE.into());
    let lock_path = format!("{path}.lock");
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(|e| format!("{lock_path}: {e}"))?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| format!("lock {lock_path}: {e}"))?;
    let mut text = String::new();
    if let Ok(mut file) = std::fs::File::open(&path) {
        file.read_to_string(&mut text).map_err(|e| e.to_string())?;
    }
    let mut state: State = if text.trim().is_empty() {
        fresh_state()
    } else {
        match serde_json::from_str(&text) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("gpuchaos fake GPU: {path} is unreadable ({e}): starting afresh");
                fresh_state()
            }
        }
    };
    // The driver frees the memory of processes that have died (and their kernels
    // stop with them).
    // One /proc read per process, however many allocations it holds.
    let mut seen: std::collections::HashMap<u32, Option<(u64, bool)>> =
        std::collections::HashMap::new();
    let mut alive = |pid: u32, since: u64| match *seen.entry(pid).or_insert_with(|| process(pid)) {
        Some((start, dead)) => start == since && !dead,
        None => false,
    };
    state.allocs.retain(|a| alive(a.pid, a.start));
    state.busy.retain(|b| alive(b.pid, b.start));
    let out = f(&mut state);
    let json = serde_json::to_string(&state).map_err(|e| e.to_string())?;
    let tmp = format!("{path}.tmp.{}", std::process::id());
    let mut file = std::fs::File::create(&tmp).map_err(|e| format!("{tmp}: {e}"))?;
    file.write_all(json.as_bytes()).map_err(|e| e.to_string())?;
    drop(file);
    std::fs::rename(&tmp, &path).map_err(|e| format!("{path}: {e}"))?;
    Ok(out)
}

/// The driver hands out memory in 2 MiB pages.
const PAGE: u64 = 2 * MIB;

impl State {
    fn total(&self, dev: u32) -> u64 {
        self.devices.get(dev as usize).map(|d| d.total).unwrap_or(0)
    }

    fn used(&self, dev: u32) -> u64 {
        self.allocs
            .iter()
            .filter(|a| a.dev == dev)
            .map(|a| a.bytes)
            .sum()
    }

    fn handle(&mut self) -> u64 {
        self.next_handle += 0x1000;
        self.next_handle
    }

    /// NVML's utilization of a device: the share of the last second in which any
    /// process ran a kernel on it, in percent.
    fn utilization(&self, dev: u32) -> u32 {
        let now = mono_us() / SLOT_US;
        let to = now.saturating_sub(LAG_SLOTS);
        let procs = self.busy.iter().filter(|b| b.dev == dev).map(|b| &b.slots);
        (share(procs, to.saturating_sub(NVML_WINDOW_SLOTS), to) * 100.0).round() as u32
    }

    /// The share of the last 100 ms in which processes other than `me` ran kernels
    /// on a device: what slows this process's work there.
    fn contention(&self, dev: u32, me: (u32, u64)) -> f64 {
        let now = mono_us() / SLOT_US;
        let to = now.saturating_sub(LAG_SLOTS);
        let procs = self
            .busy
            .iter()
            .filter(|b| b.dev == dev && (b.pid, b.start) != me)
            .map(|b| &b.slots);
        share(procs, to.saturating_sub(CONTENTION_WINDOW_SLOTS), to)
    }
}

/// Copies `s` into a C buffer of `len` bytes, NUL-terminated. False if it does not fit.
unsafe fn write_str(buf: *mut c_char, len: usize, s: &str) -> bool {
    if buf.is_null() || s.len() + 1 > len {
        return false;
    }
    // SAFETY: the caller gave a buffer of `len` bytes; we write s.len() + 1 <= len.
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr(), buf as *mut u8, s.len());
        *buf.add(s.len()) = 0;
    }
    true
}

// ---------------------------------------------------------------- NVML

const NVML_SUCCESS: c_int = 0;
const NVML_ERROR_INVALID_ARGUMENT: c_int = 2;
const NVML_ERROR_NOT_FOUND: c_int = 6;
const NVML_ERROR_INSUFFICIENT_SIZE: c_int = 7;
const NVML_ERROR_DRIVER_NOT_LOADED: c_int = 9;
const NVML_ERROR_UNKNOWN: c_int = 999;

/// A device handle is its index + 1, so that no handle is null.
fn nvml_index(device: *mut c_void) -> Option<u32> {
    (device as usize).checked_sub(1).map(|i| i as u32)
}

fn nvml_device<T>(
    device: *mut c_void,
    f: impl FnOnce(&State, u32, &Device) -> T,
) -> Result<T, c_int> {
    let idx = nvml_index(device).ok_or(NVML_ERROR_INVALID_ARGUMENT)?;
    with_state(|s| {
        s.devices
            .get(idx as usize)
            .map(|d| f(s, idx, d))
            .ok_or(NVML_ERROR_INVALID_ARGUMENT)
    })
    .map_err(|_| NVML_ERROR_UNKNOWN)?
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit_v2() -> c_int {
    if driver_off() {
        return NVML_ERROR_DRIVER_NOT_LOADED;
    }
    match with_state(|_| ()) {
        Ok(()) => NVML_SUCCESS,
        Err(_) => NVML_ERROR_UNKNOWN,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit() -> c_int {
    nvmlInit_v2()
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlShutdown() -> c_int {
    NVML_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlErrorString(result: c_int) -> *const c_char {
    let s: &'static CStr = match result {
        NVML_SUCCESS => c"Success",
        NVML_ERROR_INVALID_ARGUMENT => c"Invalid Argument",
        NVML_ERROR_NOT_FOUND => c"Not Found",
        NVML_ERROR_INSUFFICIENT_SIZE => c"Insufficient Size",
        NVML_ERROR_DRIVER_NOT_LOADED => c"Driver Not Loaded",
        _ => c"Unknown Error",
    };
    s.as_ptr()
}

/// # Safety
/// `version` must point to `length` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(version: *mut c_char, length: c_uint) -> c_int {
    // SAFETY: as documented above.
    if unsafe { write_str(version, length as usize, "550.00.fake") } {
        NVML_SUCCESS
    } else {
        NVML_ERROR_INSUFFICIENT_SIZE
    }
}

/// # Safety
/// `count` must be a valid pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> c_int {
    if count.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    match with_state(|s| s.devices.len()) {
        // SAFETY: checked for null.
        Ok(n) => unsafe {
            *count = n as c_uint;
            NVML_SUCCESS
        },
        Err(_) => NVML_ERROR_UNKNOWN,
    }
}

/// # Safety
/// `device` must be a valid pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut *mut c_void,
) -> c_int {
    if device.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    match with_state(|s| (index as usize) < s.devices.len()) {
        // SAFETY: checked for null.
        Ok(true) => unsafe {
            *device = (index as usize + 1) as *mut c_void;
            NVML_SUCCESS
        },
        Ok(false) => NVML_ERROR_INVALID_ARGUMENT,
        Err(_) => NVML_ERROR_UNKNOWN,
    }
}

/// # Safety
/// `uuid` must be a NUL-terminated string and `device` a valid pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByUUID(
    uuid: *const c_char,
    device: *mut *mut c_void,
) -> c_int {
    if uuid.is_null() || device.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: a NUL-terminated string, as documented.
    let wanted = unsafe { CStr::from_ptr(uuid) }
        .to_string_lossy()
        .into_owned();
    match with_state(|s| s.devices.iter().position(|d| d.uuid == wanted)) {
        // SAFETY: checked for null.
        Ok(Some(i)) => unsafe {
            *device = (i + 1) as *mut c_void;
            NVML_SUCCESS
        },
        Ok(None) => NVML_ERROR_NOT_FOUND,
        Err(_) => NVML_ERROR_UNKNOWN,
    }
}

/// Writes one of the device's strings into a caller's buffer.
///
/// # Safety
/// `out` must point to `length` writable bytes.
unsafe fn device_string(
    device: *mut c_void,
    out: *mut c_char,
    length: c_uint,
    field: fn(&Device) -> String,
) -> c_int {
    match nvml_device(device, |_, _, d| field(d)) {
        // SAFETY: as documented.
        Ok(v) if unsafe { write_str(out, length as usize, &v) } => NVML_SUCCESS,
        Ok(_) => NVML_ERROR_INSUFFICIENT_SIZE,
        Err(e) => e,
    }
}

/// # Safety
/// `name` must point to `length` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: *mut c_void,
    name: *mut c_char,
    length: c_uint,
) -> c_int {
    // SAFETY: the same contract.
    unsafe { device_string(device, name, length, |d| d.name.clone()) }
}

/// # Safety
/// `uuid` must point to `length` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: *mut c_void,
    uuid: *mut c_char,
    length: c_uint,
) -> c_int {
    // SAFETY: the same contract.
    unsafe { device_string(device, uuid, length, |d| d.uuid.clone()) }
}

#[repr(C)]
pub struct NvmlMemoryV2 {
    version: c_uint,
    total: c_ulonglong,
    reserved: c_ulonglong,
    free: c_ulonglong,
    used: c_ulonglong,
}

#[repr(C)]
pub struct NvmlMemory {
    total: c_ulonglong,
    free: c_ulonglong,
    used: c_ulonglong,
}

/// # Safety
/// `memory` must be a valid pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: *mut c_void,
    memory: *mut NvmlMemoryV2,
) -> c_int {
    if memory.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    match nvml_device(device, |s, i, d| (d.total, s.used(i))) {
        // SAFETY: checked for null.
        Ok((total, used)) => unsafe {
            (*memory).total = total;
            (*memory).reserved = 0;
            (*memory).used = used.min(total);
            (*memory).free = total.saturating_sub(used);
            NVML_SUCCESS
        },
        Err(e) => e,
    }
}

/// # Safety
/// `memory` must be a valid pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(
    device: *mut c_void,
    memory: *mut NvmlMemory,
) -> c_int {
    if memory.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    match nvml_device(device, |s, i, d| (d.total, s.used(i))) {
        // SAFETY: checked for null.
        Ok((total, used)) => unsafe {
            (*memory).total = total;
            (*memory).used = used.min(total);
            (*memory).free = total.saturating_sub(used);
            NVML_SUCCESS
        },
        Err(e) => e,
    }
}

/// # Safety
/// `mode` must be a valid pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeMode(device: *mut c_void, mode: *mut c_int) -> c_int {
    if mode.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    // GPUCHAOS_FAKE_GPU_COMPUTE_MODE=exclusive: NVML_COMPUTEMODE_EXCLUSIVE_PROCESS.
    let m = match std::env::var("GPUCHAOS_FAKE_GPU_COMPUTE_MODE").as_deref() {
        Ok("exclusive") => 3,
        Ok("prohibited") => 2,
        _ => 0,
    };
    match nvml_device(device, |_, _, _| ()) {
        // SAFETY: checked for null.
        Ok(()) => unsafe {
            *mode = m;
            NVML_SUCCESS
        },
        Err(e) => e,
    }
}

#[repr(C)]
pub struct NvmlUtilization {
    gpu: c_uint,
    memory: c_uint,
}

/// The share of the last second during which a kernel ran on the device (every
/// process's, as the state file holds them); memory utilization is 0 (the only
/// kernel the fake runs touches no memory).
///
/// # Safety
/// `utilization` must be a valid pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: *mut c_void,
    utilization: *mut NvmlUtilization,
) -> c_int {
    if utilization.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    match nvml_device(device, |s, i, _| s.utilization(i)) {
        // SAFETY: checked for null.
        Ok(gpu) => unsafe {
            (*utilization).gpu = gpu.min(100);
            (*utilization).memory = 0;
            NVML_SUCCESS
        },
        Err(e) => e,
    }
}

/// # Safety
/// `current` and `pending` must be valid pointers.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMigMode(
    device: *mut c_void,
    current: *mut c_uint,
    pending: *mut c_uint,
) -> c_int {
    if current.is_null() || pending.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    match nvml_device(device, |_, _, _| ()) {
        // SAFETY: checked for null. MIG is always off on the fake.
        Ok(()) => unsafe {
            *current = 0;
            *pending = 0;
            NVML_SUCCESS
        },
        Err(e) => e,
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct NvmlProcessInfo {
    pid: c_uint,
    used_gpu_memory: c_ulonglong,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

/// # Safety
/// `count` must be valid; `infos` null or pointing to `*count` entries.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: *mut c_void,
    count: *mut c_uint,
    infos: *mut NvmlProcessInfo,
) -> c_int {
    if count.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    let procs = nvml_device(device, |s, i, _| {
        let mut out: Vec<(u32, u64)> = Vec::new();
        for a in s.allocs.iter().filter(|a| a.dev == i) {
            match out.iter_mut().find(|(p, _)| *p == a.pid) {
                Some((_, b)) => *b += a.bytes,
                None => out.push((a.pid, a.bytes)),
            }
        }
        out
    });
    let procs = match procs {
        Ok(p) => p,
        Err(e) => return e,
    };
    // SAFETY: `count` checked for null; `infos` holds `*count` entries when not null.
    unsafe {
        let room = *count as usize;
        *count = procs.len() as c_uint;
        if procs.is_empty() {
            return NVML_SUCCESS;
        }
        if infos.is_null() || room < procs.len() {
            return NVML_ERROR_INSUFFICIENT_SIZE;
        }
        for (k, (pid, bytes)) in procs.iter().enumerate() {
            *infos.add(k) = NvmlProcessInfo {
                pid: *pid,
                used_gpu_memory: *bytes,
                gpu_instance_id: u32::MAX,
                compute_instance_id: u32::MAX,
            };
        }
    }
    NVML_SUCCESS
}

// ---------------------------------------------------------------- CUDA driver API

const CUDA_SUCCESS: c_int = 0;
const CUDA_ERROR_INVALID_VALUE: c_int = 1;
const CUDA_ERROR_OUT_OF_MEMORY: c_int = 2;
const CUDA_ERROR_NOT_INITIALIZED: c_int = 3;
const CUDA_ERROR_NO_DEVICE: c_int = 100;
const CUDA_ERROR_INVALID_DEVICE: c_int = 101;
const CUDA_ERROR_INVALID_CONTEXT: c_int = 201;
const CUDA_ERROR_INVALID_PTX: c_int = 218;
const CUDA_ERROR_INVALID_HANDLE: c_int = 400;
const CUDA_ERROR_NOT_FOUND: c_int = 500;
const CUDA_ERROR_NOT_READY: c_int = 600;
const CUDA_ERROR_NOT_SUPPORTED: c_int = 801;
const CUDA_ERROR_UNKNOWN: c_int = 999;

thread_local! {
    /// The current context: (context id, device).
    static CURRENT: Cell<Option<(u64, u32)>> = const { Cell::new(None) };
}
static INITIALISED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn initialised() -> bool {
    INITIALISED.load(std::sync::atomic::Ordering::SeqCst)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuInit(_flags: c_uint) -> c_int {
    if driver_off() {
        return CUDA_ERROR_NO_DEVICE;
    }
    match with_state(|s| s.devices.len()) {
        Ok(0) => CUDA_ERROR_NO_DEVICE,
        Ok(_) => {
            INITIALISED.store(true, std::sync::atomic::Ordering::SeqCst);
            CUDA_SUCCESS
        }
        Err(_) => CUDA_ERROR_UNKNOWN,
    }
}

/// # Safety
/// `version` must be a valid pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDriverGetVersion(version: *mut c_int) -> c_int {
    if version.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: checked for null.
    unsafe { *version = 12040 };
    CUDA_SUCCESS
}

/// # Safety
/// `count` must be a valid pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetCount(count: *mut c_int) -> c_int {
    if !initialised() {
        return CUDA_ERROR_NOT_INITIALIZED;
    }
    if count.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    match with_state(|s| s.devices.len()) {
        // SAFETY: checked for null.
        Ok(n) => unsafe {
            *count = n as c_int;
            CUDA_SUCCESS
        },
        Err(_) => CUDA_ERROR_UNKNOWN,
    }
}

fn cuda_device_exists(ordinal: c_int) -> Result<(), c_int> {
    if !initialised() {
        return Err(CUDA_ERROR_NOT_INITIALIZED);
    }
    match with_state(|s| ordinal >= 0 && (ordinal as usize) < s.devices.len()) {
        Ok(true) => Ok(()),
        Ok(false) => Err(CUDA_ERROR_INVALID_DEVICE),
        Err(_) => Err(CUDA_ERROR_UNKNOWN),
    }
}

/// # Safety
/// `device` must be a valid pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGet(device: *mut c_int, ordinal: c_int) -> c_int {
    if device.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if let Err(e) = cuda_device_exists(ordinal) {
        return e;
    }
    // SAFETY: checked for null.
    unsafe { *device = ordinal };
    CUDA_SUCCESS
}

/// # Safety
/// `name` must point to `len` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: c_int) -> c_int {
    if let Err(e) = cuda_device_exists(dev) {
        return e;
    }
    let n = with_state(|s| s.devices.get(dev as usize).map(|d| d.name.clone()))
        .ok()
        .flatten()
        .unwrap_or_default();
    // SAFETY: as documented.
    if unsafe { write_str(name, len.max(0) as usize, &n) } {
        CUDA_SUCCESS
    } else {
        CUDA_ERROR_INVALID_VALUE
    }
}

/// # Safety
/// `bytes` must be a valid pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: c_int) -> c_int {
    if bytes.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if let Err(e) = cuda_device_exists(dev) {
        return e;
    }
    let total = with_state(|s| s.total(dev as u32)).unwrap_or(0);
    // SAFETY: checked for null.
    unsafe { *bytes = total as usize };
    CUDA_SUCCESS
}

/// The 16 bytes of a `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` UUID.
fn uuid_bytes(uuid: &str) -> [u8; 16] {
    let hex: String = uuid
        .trim_start_matches("GPU-")
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .collect();
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = hex
            .get(2 * i..2 * i + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .unwrap_or(0);
    }
    out
}

/// # Safety
/// `uuid` must point to 16 writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetUuid(uuid: *mut u8, dev: c_int) -> c_int {
    if uuid.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if let Err(e) = cuda_device_exists(dev) {
        return e;
    }
    let text = with_state(|s| s.devices.get(dev as usize).map(|d| d.uuid.clone()))
        .ok()
        .flatten()
        .unwrap_or_default();
    let bytes = uuid_bytes(&text);
    // SAFETY: 16 writable bytes, as documented.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), uuid, 16) };
    CUDA_SUCCESS
}

/// # Safety
/// `uuid` must point to 16 writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetUuid_v2(uuid: *mut u8, dev: c_int) -> c_int {
    // SAFETY: same contract.
    unsafe { cuDeviceGetUuid(uuid, dev) }
}

/// # Safety
/// `ctx` must be a valid pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxCreate_v2(
    ctx: *mut *mut c_void,
    _flags: c_uint,
    dev: c_int,
) -> c_int {
    if ctx.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if let Err(e) = cuda_device_exists(dev) {
        return e;
    }
    let (pid, start) = me();
    let r = with_state(|s| {
        let dev = dev as u32;
        let cost = s.context_bytes;
        if s.used(dev) + cost > s.total(dev) {
            return Err(CUDA_ERROR_OUT_OF_MEMORY);
        }
        let h = s.handle();
        s.allocs.push(Alloc {
            pid,
            start,
            dev,
            bytes: cost,
            handle: h,
            context: true,
            ctx: h,
        });
        Ok(h)
    });
    match r {
        Ok(Ok(h)) => {
            CURRENT.with(|c| c.set(Some((h, dev as u32))));
            // SAFETY: checked for null.
            unsafe { *ctx = h as usize as *mut c_void };
            CUDA_SUCCESS
        }
        Ok(Err(e)) => e,
        Err(_) => CUDA_ERROR_UNKNOWN,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn cuCtxSetCurrent(ctx: *mut c_void) -> c_int {
    let h = ctx as usize as u64;
    if h == 0 {
        CURRENT.with(|c| c.set(None));
        return CUDA_SUCCESS;
    }
    let (pid, _) = me();
    match with_state(|s| {
        s.allocs
            .iter()
            .find(|a| a.context && a.handle == h && a.pid == pid)
            .map(|a| a.dev)
    }) {
        Ok(Some(dev)) => {
            CURRENT.with(|c| c.set(Some((h, dev))));
            CUDA_SUCCESS
        }
        Ok(None) => CUDA_ERROR_INVALID_CONTEXT,
        Err(_) => CUDA_ERROR_UNKNOWN,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn cuCtxDestroy_v2(ctx: *mut c_void) -> c_int {
    let h = ctx as usize as u64;
    let (pid, _) = me();
    match with_state(|s| {
        let before = s.allocs.len();
        s.allocs
            .retain(|a| !(a.pid == pid && (a.handle == h || a.ctx == h)));
        before != s.allocs.len()
    }) {
        Ok(true) => {
            CURRENT.with(|c| {
                if c.get().is_some_and(|(cur, _)| cur == h) {
                    c.set(None)
                }
            });
            // Its modules, functions, events and stream go with it.
            if let Ok(mut l) = local().lock() {
                l.forget_context(h);
            }
            CUDA_SUCCESS
        }
        Ok(false) => CUDA_ERROR_INVALID_CONTEXT,
        Err(_) => CUDA_ERROR_UNKNOWN,
    }
}

/// # Safety
/// `dptr` must be a valid pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut u64, bytesize: usize) -> c_int {
    if dptr.is_null() || bytesize == 0 {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let Some((ctx, dev)) = CURRENT.with(|c| c.get()) else {
        return CUDA_ERROR_INVALID_CONTEXT;
    };
    let (pid, start) = me();
    let mut contended = 0.0;
    let r = with_state(|s| {
        contended = s.contention(dev, (pid, start));
        let bytes = (bytesize as u64).next_multiple_of(PAGE);
        if s.used(dev) + bytes > s.total(dev) {
            return Err(CUDA_ERROR_OUT_OF_MEMORY);
        }
        let h = s.handle() + bytes;
        s.next_handle = h;
        s.allocs.push(Alloc {
            pid,
            start,
            dev,
            bytes,
            handle: h,
            context: false,
            ctx,
        });
        Ok(h)
    });
    // Another process's kernels hold the device: the allocation waits its turn.
    contended_delay(ALLOC_COST_US, contended);
    match r {
        // SAFETY: checked for null.
        Ok(Ok(h)) => unsafe {
            *dptr = h;
            CUDA_SUCCESS
        },
        Ok(Err(e)) => e,
        Err(_) => CUDA_ERROR_UNKNOWN,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemFree_v2(dptr: u64) -> c_int {
    let (pid, _) = me();
    match with_state(|s| {
        let before = s.allocs.len();
        s.allocs
            .retain(|a| !(a.pid == pid && !a.context && a.handle == dptr));
        before != s.allocs.len()
    }) {
        Ok(true) => CUDA_SUCCESS,
        Ok(false) => CUDA_ERROR_INVALID_VALUE,
        Err(_) => CUDA_ERROR_UNKNOWN,
    }
}

/// # Safety
/// `free` and `total` must be valid pointers.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> c_int {
    if free.is_null() || total.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let Some((_, dev)) = CURRENT.with(|c| c.get()) else {
        return CUDA_ERROR_INVALID_CONTEXT;
    };
    match with_state(|s| (s.total(dev), s.used(dev))) {
        // SAFETY: checked for null.
        Ok((t, u)) => unsafe {
            *free = t.saturating_sub(u) as usize;
            *total = t as usize;
            CUDA_SUCCESS
        },
        Err(_) => CUDA_ERROR_UNKNOWN,
    }
}

/// # Safety
/// `out` must be a valid pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetErrorName(error: c_int, out: *mut *const c_char) -> c_int {
    if out.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let s: &'static CStr = match error {
        CUDA_SUCCESS => c"CUDA_SUCCESS",
        CUDA_ERROR_INVALID_VALUE => c"CUDA_ERROR_INVALID_VALUE",
        CUDA_ERROR_OUT_OF_MEMORY => c"CUDA_ERROR_OUT_OF_MEMORY",
        CUDA_ERROR_NOT_INITIALIZED => c"CUDA_ERROR_NOT_INITIALIZED",
        CUDA_ERROR_NO_DEVICE => c"CUDA_ERROR_NO_DEVICE",
        CUDA_ERROR_INVALID_DEVICE => c"CUDA_ERROR_INVALID_DEVICE",
        CUDA_ERROR_INVALID_CONTEXT => c"CUDA_ERROR_INVALID_CONTEXT",
        CUDA_ERROR_INVALID_PTX => c"CUDA_ERROR_INVALID_PTX",
        CUDA_ERROR_INVALID_HANDLE => c"CUDA_ERROR_INVALID_HANDLE",
        CUDA_ERROR_NOT_FOUND => c"CUDA_ERROR_NOT_FOUND",
        CUDA_ERROR_NOT_READY => c"CUDA_ERROR_NOT_READY",
        CUDA_ERROR_NOT_SUPPORTED => c"CUDA_ERROR_NOT_SUPPORTED",
        _ => c"CUDA_ERROR_UNKNOWN",
    };
    // SAFETY: checked for null.
    unsafe { *out = s.as_ptr() };
    CUDA_SUCCESS
}

// ---------------------------------------------------------------- kernels
//
// The fake runs one kernel: the spin kernel (`gpuchaos_spin`, one u64 parameter: SM
// clock cycles to spin), whose time it knows. A launch is asynchronous, as on a real
// GPU: it is queued on its context's default stream and "runs" from when the stream
// is free for `cycles / clock rate` (times the waves its blocks need), slowed by the
// other processes' kernels on the device (time-slicing): a kernel that would take `t`
// takes `t / (1 - share)`, the share of the last 100 ms during which other processes
// ran kernels (capped at 95%, so 20x). Synchronizing (the context, the stream, an
// event) sleeps until the work is done. Each process keeps its busy time per device
// and publishes it to the state file every 20 ms, so that NVML shows the utilization
// and other processes meet the contention.

/// The SM clock: 1.5 GHz, so a kernel asked for 1.5 M cycles takes 1 ms.
const CLOCK_KHZ: u64 = 1_500_000;
/// The most blocks an SM runs at once, and threads.
const BLOCKS_PER_SM: u64 = 32;
const THREADS_PER_SM: u64 = 2048;
/// The highest contention share a launch is slowed by (20x).
const MAX_CONTENTION: f64 = 0.95;
/// What an allocation costs under contention, before the slow-down: a contended
/// allocation waits `ALLOC_COST_US * share / (1 - share)` more.
const ALLOC_COST_US: u64 = 1000;
/// How often each launching process publishes its busy time and reads the others'.
const PUBLISH_US: u64 = 20_000;
/// The contention a launch uses is at most this old.
const OTHERS_MAX_AGE_US: u64 = 50_000;

fn sm_count() -> u64 {
    std::env::var("GPUCHAOS_FAKE_GPU_SMS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(132)
}

fn stretch(share: f64) -> f64 {
    1.0 / (1.0 - share.clamp(0.0, MAX_CONTENTION))
}

/// Sleeps the extra time work of `base_us` takes under a contention `share`.
fn contended_delay(base_us: u64, share: f64) {
    if share > 0.0 {
        let extra = base_us as f64 * (stretch(share) - 1.0);
        std::thread::sleep(std::time::Duration::from_micros(extra as u64));
    }
}

fn sleep_until_us(t: u64) {
    let now = mono_us();
    if t > now {
        std::thread::sleep(std::time::Duration::from_micros(t - now));
    }
}

struct FakeModule {
    ctx: u64,
    entries: Vec<String>,
}

struct FakeFunction {
    module: u64,
    name: String,
}

struct FakeEvent {
    ctx: u64,
    /// When the work before it completes (monotonic µs), once recorded.
    at: Option<u64>,
}

/// This process's kernels: its modules, functions, events, each context's stream,
/// its busy time per device, and the other processes' busy time (a cached copy).
#[derive(Default)]
struct Local {
    next: u64,
    modules: std::collections::HashMap<u64, FakeModule>,
    functions: std::collections::HashMap<u64, FakeFunction>,
    events: std::collections::HashMap<u64, FakeEvent>,
    /// Per context: when its default stream is free again.
    streams: std::collections::HashMap<u64, u64>,
    mine: std::collections::HashMap<u32, Slots>,
    dirty: bool,
    others: Vec<(u32, Slots)>,
    others_at: u64,
    publisher: bool,
}

impl Local {
    fn handle(&mut self) -> u64 {
        self.next += 0x10;
        0x5000_0000_0000 + self.next
    }

    fn forget_context(&mut self, ctx: u64) {
        self.modules.retain(|_, m| m.ctx != ctx);
        let modules = &self.modules;
        self.functions
            .retain(|_, f| modules.contains_key(&f.module));
        self.events.retain(|_, e| e.ctx != ctx);
        self.streams.remove(&ctx);
    }

    fn contention(&self, dev: u32) -> f64 {
        let to = (mono_us() / SLOT_US).saturating_sub(LAG_SLOTS);
        let procs = self
            .others
            .iter()
            .filter(|(d, _)| *d == dev)
            .map(|(_, s)| s);
        share(procs, to.saturating_sub(CONTENTION_WINDOW_SLOTS), to)
    }
}

fn local() -> &'static std::sync::Mutex<Local> {
    static L: std::sync::OnceLock<std::sync::Mutex<Local>> = std::sync::OnceLock::new();
    L.get_or_init(Default::default)
}

/// Publishes this process's busy time and reads the others'. The state file's lock
/// is never taken while `local()` is held (a thread holding it may be waiting for
/// `local()`): a snapshot first, then the file, then the result stored.
fn publish() {
    let (pid, start) = me();
    let keep_from = (mono_us() / SLOT_US).saturating_sub(KEEP_SLOTS);
    let mine: Vec<(u32, Slots)> = match local().lock() {
        Ok(mut l) => {
            l.dirty = false;
            for s in l.mine.values_mut() {
                s.prune(keep_from);
            }
            l.mine.iter().map(|(d, s)| (*d, s.clone())).collect()
        }
        Err(_) => return,
    };
    let others = with_state(|s| {
        s.busy.retain(|b| (b.pid, b.start) != (pid, start));
        for b in s.busy.iter_mut() {
            b.slots.prune(keep_from);
        }
        s.busy.retain(|b| !b.slots.v.is_empty());
        let others: Vec<(u32, Slots)> = s.busy.iter().map(|b| (b.dev, b.slots.clone())).collect();
        for (dev, slots) in mine {
            s.busy.push(Busy {
                pid,
                start,
                dev,
                slots,
            });
        }
        others
    });
    if let (Ok(others), Ok(mut l)) = (others, local().lock()) {
        l.others = others;
        l.others_at = mono_us();
    }
}

/// Started by a process's first launch: publishes every 20 ms while there is news
/// (a launch since the last publication). A launch refreshes the others' figures
/// itself when they are older than 50 ms.
fn start_publisher(l: &mut Local) {
    if l.publisher {
        return;
    }
    l.publisher = true;
    let _ = std::thread::Builder::new()
        .name("fakegpu-publish".into())
        .spawn(|| {
            // A thread-local with a destructor: while this thread lives, the C
            // library cannot unmap this library under it (dlclose defers unloading
            // a library with live thread-local destructors).
            thread_local! {
                static PIN: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
            }
            PIN.with(|p| p.borrow_mut().push(1));
            loop {
                std::thread::sleep(std::time::Duration::from_micros(PUBLISH_US));
                if local().lock().map(|l| l.dirty).unwrap_or(false) {
                    publish();
                }
            }
        });
}

/// # Safety
/// `pi` must be a valid pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetAttribute(pi: *mut c_int, attrib: c_int, dev: c_int) -> c_int {
    if pi.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if let Err(e) = cuda_device_exists(dev) {
        return e;
    }
    let v: u64 = match attrib {
        1 => 1024,            // MAX_THREADS_PER_BLOCK
        13 => CLOCK_KHZ,      // CLOCK_RATE (kHz)
        16 => sm_count(),     // MULTIPROCESSOR_COUNT
        39 => THREADS_PER_SM, // MAX_THREADS_PER_MULTIPROCESSOR
        75 => 9,              // COMPUTE_CAPABILITY_MAJOR
        76 => 0,              // COMPUTE_CAPABILITY_MINOR
        106 => BLOCKS_PER_SM, // MAX_BLOCKS_PER_MULTIPROCESSOR
        _ => return CUDA_ERROR_INVALID_VALUE,
    };
    // SAFETY: checked for null.
    unsafe { *pi = v as c_int };
    CUDA_SUCCESS
}

fn current() -> Result<(u64, u32), c_int> {
    CURRENT.with(|c| c.get()).ok_or(CUDA_ERROR_INVALID_CONTEXT)
}

/// The `.entry` names of a PTX text, or None when it is not PTX.
fn ptx_entries(text: &str) -> Option<Vec<String>> {
    if !text.contains(".version") || !text.contains(".target") {
        return None;
    }
    let entries: Vec<String> = text
        .lines()
        .filter_map(|l| {
            let rest = l.split(".entry").nth(1)?;
            let name: String = rest
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '$')
                .collect();
            (!name.is_empty()).then_some(name)
        })
        .collect();
    (!entries.is_empty()).then_some(entries)
}

/// # Safety
/// `module` must be a valid pointer and `image` a NUL-terminated PTX text.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleLoadData(module: *mut *mut c_void, image: *const c_void) -> c_int {
    if module.is_null() || image.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let ctx = match current() {
        Ok((c, _)) => c,
        Err(e) => return e,
    };
    // SAFETY: a NUL-terminated image, as documented (the fake takes PTX only).
    let text = unsafe { CStr::from_ptr(image as *const c_char) }.to_string_lossy();
    let Some(entries) = ptx_entries(&text) else {
        return CUDA_ERROR_INVALID_PTX;
    };
    let Ok(mut l) = local().lock() else {
        return CUDA_ERROR_UNKNOWN;
    };
    let h = l.handle();
    l.modules.insert(h, FakeModule { ctx, entries });
    // SAFETY: checked for null.
    unsafe { *module = h as usize as *mut c_void };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuModuleUnload(module: *mut c_void) -> c_int {
    let h = module as usize as u64;
    let Ok(mut l) = local().lock() else {
        return CUDA_ERROR_UNKNOWN;
    };
    if l.modules.remove(&h).is_none() {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    l.functions.retain(|_, f| f.module != h);
    CUDA_SUCCESS
}

/// # Safety
/// `func` must be a valid pointer and `name` a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleGetFunction(
    func: *mut *mut c_void,
    module: *mut c_void,
    name: *const c_char,
) -> c_int {
    if func.is_null() || name.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: NUL-terminated, as documented.
    let name = unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned();
    let m = module as usize as u64;
    let Ok(mut l) = local().lock() else {
        return CUDA_ERROR_UNKNOWN;
    };
    match l.modules.get(&m) {
        None => return CUDA_ERROR_INVALID_HANDLE,
        Some(md) if !md.entries.contains(&name) => return CUDA_ERROR_NOT_FOUND,
        Some(_) => {}
    }
    let h = l.handle();
    l.functions.insert(h, FakeFunction { module: m, name });
    // SAFETY: checked for null.
    unsafe { *func = h as usize as *mut c_void };
    CUDA_SUCCESS
}

/// # Safety
/// `params` must point to the kernel's parameters (for the spin kernel, one pointer
/// to a u64).
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cuLaunchKernel(
    func: *mut c_void,
    grid_x: c_uint,
    grid_y: c_uint,
    grid_z: c_uint,
    block_x: c_uint,
    block_y: c_uint,
    block_z: c_uint,
    _shared: c_uint,
    stream: *mut c_void,
    params: *mut *mut c_void,
    _extra: *mut *mut c_void,
) -> c_int {
    let (ctx, dev) = match current() {
        Ok(c) => c,
        Err(e) => return e,
    };
    if !stream.is_null() {
        // Only the default stream exists here (cuStreamCreate is not modelled).
        return CUDA_ERROR_INVALID_HANDLE;
    }
    let blocks = grid_x as u64 * grid_y as u64 * grid_z as u64;
    let threads = block_x as u64 * block_y as u64 * block_z as u64;
    if blocks == 0 || threads == 0 || threads > 1024 {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let f = func as usize as u64;
    {
        let Ok(l) = local().lock() else {
            return CUDA_ERROR_UNKNOWN;
        };
        let Some(function) = l.functions.get(&f) else {
            return CUDA_ERROR_INVALID_HANDLE;
        };
        if l.modules.get(&function.module).map(|m| m.ctx) != Some(ctx) {
            return CUDA_ERROR_INVALID_HANDLE;
        }
        if function.name != "gpuchaos_spin" {
            // The fake cannot know what another kernel would do.
            return CUDA_ERROR_NOT_SUPPORTED;
        }
    }
    if params.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: `params` holds the kernel's one parameter pointer, as documented.
    let arg = unsafe { *params };
    if arg.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: the spin kernel's parameter is a u64 (read unaligned: the caller's).
    let cycles = unsafe { std::ptr::read_unaligned(arg as *const u64) };
    // The others' figures, at most 50 ms old.
    let stale = local()
        .lock()
        .map(|l| mono_us().saturating_sub(l.others_at) > OTHERS_MAX_AGE_US)
        .unwrap_or(true);
    if stale {
        publish();
    }
    let Ok(mut l) = local().lock() else {
        return CUDA_ERROR_UNKNOWN;
    };
    let per_sm = (THREADS_PER_SM / threads).clamp(1, BLOCKS_PER_SM);
    let waves = blocks.div_ceil(sm_count() * per_sm);
    let alone_us = cycles as f64 * 1000.0 / CLOCK_KHZ as f64 * waves as f64;
    let took_us = (alone_us * stretch(l.contention(dev))) as u64;
    let now = mono_us();
    let begin = l.streams.get(&ctx).copied().unwrap_or(0).max(now);
    let end = begin + took_us;
    l.streams.insert(ctx, end);
    l.mine.entry(dev).or_default().add(begin, end);
    l.dirty = true;
    start_publisher(&mut l);
    CUDA_SUCCESS
}

/// When the current context's stream is free (now, if it is).
fn stream_free() -> Result<u64, c_int> {
    let (ctx, _) = current()?;
    let l = local().lock().map_err(|_| CUDA_ERROR_UNKNOWN)?;
    Ok(l.streams.get(&ctx).copied().unwrap_or(0))
}

#[unsafe(no_mangle)]
pub extern "C" fn cuCtxSynchronize() -> c_int {
    match stream_free() {
        Ok(t) => {
            sleep_until_us(t);
            CUDA_SUCCESS
        }
        Err(e) => e,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn cuStreamSynchronize(stream: *mut c_void) -> c_int {
    if !stream.is_null() {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    cuCtxSynchronize()
}

/// # Safety
/// `event` must be a valid pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventCreate(event: *mut *mut c_void, _flags: c_uint) -> c_int {
    if event.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let (ctx, _) = match current() {
        Ok(c) => c,
        Err(e) => return e,
    };
    let Ok(mut l) = local().lock() else {
        return CUDA_ERROR_UNKNOWN;
    };
    let h = l.handle();
    l.events.insert(h, FakeEvent { ctx, at: None });
    // SAFETY: checked for null.
    unsafe { *event = h as usize as *mut c_void };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuEventRecord(event: *mut c_void, stream: *mut c_void) -> c_int {
    if !stream.is_null() {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    let (ctx, _) = match current() {
        Ok(c) => c,
        Err(e) => return e,
    };
    let Ok(mut l) = local().lock() else {
        return CUDA_ERROR_UNKNOWN;
    };
    let at = l.streams.get(&ctx).copied().unwrap_or(0).max(mono_us());
    match l.events.get_mut(&(event as usize as u64)) {
        Some(e) if e.ctx == ctx => {
            e.at = Some(at);
            CUDA_SUCCESS
        }
        _ => CUDA_ERROR_INVALID_HANDLE,
    }
}

fn event_at(event: *mut c_void) -> Result<Option<u64>, c_int> {
    let l = local().lock().map_err(|_| CUDA_ERROR_UNKNOWN)?;
    l.events
        .get(&(event as usize as u64))
        .map(|e| e.at)
        .ok_or(CUDA_ERROR_INVALID_HANDLE)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuEventSynchronize(event: *mut c_void) -> c_int {
    match event_at(event) {
        Ok(Some(t)) => {
            sleep_until_us(t);
            CUDA_SUCCESS
        }
        // Never recorded: nothing to wait for.
        Ok(None) => CUDA_SUCCESS,
        Err(e) => e,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn cuEventQuery(event: *mut c_void) -> c_int {
    match event_at(event) {
        Ok(Some(t)) if t > mono_us() => CUDA_ERROR_NOT_READY,
        Ok(_) => CUDA_SUCCESS,
        Err(e) => e,
    }
}

/// # Safety
/// `ms` must be a valid pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventElapsedTime(
    ms: *mut f32,
    start: *mut c_void,
    end: *mut c_void,
) -> c_int {
    if ms.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let (a, b) = match (event_at(start), event_at(end)) {
        (Ok(Some(a)), Ok(Some(b))) => (a, b),
        (Err(e), _) | (_, Err(e)) => return e,
        _ => return CUDA_ERROR_INVALID_HANDLE,
    };
    if a.max(b) > mono_us() {
        return CUDA_ERROR_NOT_READY;
    }
    // SAFETY: checked for null.
    unsafe { *ms = (b as f64 - a as f64) as f32 / 1000.0 };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuEventDestroy_v2(event: *mut c_void) -> c_int {
    let Ok(mut l) = local().lock() else {
        return CUDA_ERROR_UNKNOWN;
    };
    match l.events.remove(&(event as usize as u64)) {
        Some(_) => CUDA_SUCCESS,
        None => CUDA_ERROR_INVALID_HANDLE,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn cuEventDestroy(event: *mut c_void) -> c_int {
    cuEventDestroy_v2(event)
}

// ---------------------------------------------------------------- gpu_xid (PCI)
// What the agent's gpu_xid faults read: each device's PCI bus id, for the kernel-log
// line (`NVRM: Xid (PCI:0000:3b:00): 79, …`). Device i sits on bus 0x3b + i.

#[repr(C)]
pub struct NvmlPciInfo {
    bus_id_legacy: [c_char; 16],
    domain: c_uint,
    bus: c_uint,
    device: c_uint,
    pci_device_id: c_uint,
    pci_sub_system_id: c_uint,
    bus_id: [c_char; 32],
}

/// # Safety
/// `pci` must be a valid pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(
    device: *mut c_void,
    pci: *mut NvmlPciInfo,
) -> c_int {
    if pci.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    match nvml_device(device, |_, i, _| i) {
        Ok(i) => {
            let bus = 0x3b + i;
            let id = format!("00000000:{bus:02X}:00.0");
            let legacy = format!("0000:{bus:02X}:00.0");
            // SAFETY: checked for null; both strings fit their fields.
            unsafe {
                (*pci).domain = 0;
                (*pci).bus = bus;
                (*pci).device = 0;
                // An H100 SXM's PCI device id, NVIDIA's vendor id in the low half.
                (*pci).pci_device_id = 0x2330_10de;
                (*pci).pci_sub_system_id = 0x16c1_10de;
                write_str((*pci).bus_id.as_mut_ptr(), 32, &id);
                write_str((*pci).bus_id_legacy.as_mut_ptr(), 16, &legacy);
            }
            NVML_SUCCESS
        }
        Err(e) => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_split_a_kernel_across_their_boundaries() {
        let mut s = Slots::default();
        s.add(5_000, 25_000);
        assert_eq!((s.base, s.v.clone()), (0, vec![5_000, 10_000, 5_000]));
        s.add(30_000, 31_000);
        assert_eq!(s.at(3), 1_000);
        assert_eq!(s.at(7), 0);
        s.prune(2);
        assert_eq!((s.base, s.at(1), s.at(2)), (2, 0, 5_000));
        // Two processes busy in the same slot count once, at most its length.
        let (mut a, mut b) = (Slots::default(), Slots::default());
        a.add(0, 8_000);
        b.add(0, 6_000);
        assert_eq!(share([&a, &b].into_iter(), 0, 1), 1.0);
        assert_eq!(share([&a].into_iter(), 0, 2), 0.4);
    }

    #[test]
    fn ptx_entries_are_read_from_the_text() {
        let ptx = ".version 6.0\n.target sm_52\n.visible .entry gpuchaos_spin(\n.param .u64 x\n)\n{ ret; }\n";
        assert_eq!(ptx_entries(ptx), Some(vec!["gpuchaos_spin".to_string()]));
        assert_eq!(ptx_entries("not ptx"), None);
        assert_eq!(ptx_entries(".version 6.0\n.target sm_52\n"), None);
    }

    #[test]
    fn contention_slows_in_proportion() {
        assert_eq!(stretch(0.0), 1.0);
        assert!((stretch(0.5) - 2.0).abs() < 1e-9);
        assert!((stretch(0.9) - 10.0).abs() < 1e-9);
        assert!((stretch(1.0) - 20.0).abs() < 1e-9, "capped");
    }
}

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
//!
//! As on a real GPU, memory is shared by every process on the node: the state file,
//! locked with flock for each call, records each context and allocation with its
//! process (pid and start time). A process that has died loses its allocations at the
//! next call, as the real driver frees a dead process's memory.
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
    // The driver frees the memory of processes that have died.
    state.allocs.retain(|a| match process(a.pid) {
        Some((start, dead)) => start == a.start && !dead,
        None => false,
    });
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
    let r = with_state(|s| {
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
        _ => c"CUDA_ERROR_UNKNOWN",
    };
    // SAFETY: checked for null.
    unsafe { *out = s.as_ptr() };
    CUDA_SUCCESS
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

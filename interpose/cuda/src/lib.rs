//! `libgpuchaos_cuda_interpose.so`: the CUDA layer of `kind: gpu_xid`.
//!
//! A workload opts in at start, as with ai-dynamo's fault-injection library: either
//! `LD_PRELOAD=/path/libgpuchaos_cuda_interpose.so` (its SONAME is `libcuda.so.1`, so
//! the workload's own `dlopen("libcuda.so.1")` returns the interposer, and every
//! `dlsym` from that handle, and every entry point fetched through
//! `cuGetProcAddress`, is the interposer's), or by pointing the workload's driver
//! path at it (`--cuda-lib`, `GPUCHAOS_CUDA_LIB` for the refstack's workers).
//!
//! It loads the real driver by absolute path (`GPUCHAOS_REAL_CUDA`, default the
//! system's libcuda.so.1 in the usual directories) and forwards every call to it:
//! the calls below are wrapped, the rest are tail jumps into the real driver
//! (`gpuchaos_xid_arm::forwarders!`), so any signature forwards unchanged.
//!
//! For a GPU the agent armed (an `arm-<UUID>.json` in `GPUCHAOS_XID_DIR`, read at
//! most every 50 ms), the wrapped calls fail as the Xid makes them fail on a real
//! GPU: calls in a context on that GPU return the arm's `in_context` error (and the
//! context stays failed, as a context that saw an Xid does), new contexts on it the
//! `new_context` error. A self-clearing Xid hits only until its `clears_at_ms`.
//! The interposer never blocks on the arm directory, never aborts the workload: a
//! malformed arm file counts as not armed, and is said once on stderr.
//!
//! Calling into a C library is this crate's purpose, so it allows `unsafe`: every
//! pointer a caller passes is checked for null before it is written through.
#![allow(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::sync::{Mutex, OnceLock};

use gpuchaos_xid_arm::{ArmCache, dir_from_env, now_ms, register};

type CuResult = c_int;
const CUDA_SUCCESS: CuResult = 0;
const CUDA_ERROR_INVALID_VALUE: CuResult = 1;
const CUDA_ERROR_NO_DEVICE: CuResult = 100;
const CUDA_ERROR_NOT_FOUND: CuResult = 500;

/// The environment variable naming the real driver.
pub const REAL_ENV: &str = "GPUCHAOS_REAL_CUDA";
/// Where the real driver is looked for when `GPUCHAOS_REAL_CUDA` is not set.
const SYSTEM_PATHS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
    "/usr/lib/aarch64-linux-gnu/libcuda.so.1",
    "/usr/lib64/libcuda.so.1",
    "/usr/lib/libcuda.so.1",
    "/usr/local/nvidia/lib64/libcuda.so.1",
    "/usr/lib/wsl/lib/libcuda.so.1",
];

gpuchaos_xid_arm::forwarders! {
    cuDriverGetVersion, cuDeviceGetCount, cuDeviceGet, cuDeviceGetName, cuDeviceGetUuid,
    cuDeviceGetUuid_v2, cuDeviceTotalMem_v2, cuDeviceGetAttribute, cuDeviceGetPCIBusId,
    cuDeviceGetByPCIBusId, cuDeviceComputeCapability, cuDeviceGetProperties,
    cuDeviceCanAccessPeer, cuDeviceGetDefaultMemPool, cuDeviceGetMemPool,
    cuDevicePrimaryCtxGetState,
    cuDevicePrimaryCtxSetFlags_v2, cuCtxCreate_v3, cuCtxCreate_v4, cuCtxGetCurrent,
    cuCtxGetDevice, cuCtxGetFlags, cuCtxSetFlags, cuCtxGetApiVersion, cuCtxGetLimit,
    cuCtxSetLimit, cuCtxGetStreamPriorityRange, cuCtxGetId, cuCtxGetCacheConfig,
    cuCtxSetCacheConfig, cuCtxEnablePeerAccess, cuCtxDisablePeerAccess, cuModuleLoad,
    cuModuleLoadDataEx, cuModuleLoadFatBinary, cuModuleUnload, cuModuleGetGlobal_v2,
    cuLibraryLoadData, cuLibraryUnload, cuLibraryGetKernel, cuLibraryGetModule,
    cuKernelGetFunction, cuFuncGetAttribute, cuFuncSetAttribute, cuFuncSetCacheConfig,
    cuLaunchHostFunc, cuMemAllocHost_v2,
    cuMemFreeHost, cuMemHostAlloc, cuMemHostRegister_v2, cuMemHostUnregister,
    cuMemHostGetDevicePointer_v2, cuMemAllocPitch_v2, cuMemGetAddressRange_v2, cuMemcpy,
    cuMemcpyPeer, cuMemcpyPeerAsync, cuMemcpyDtoDAsync_v2, cuMemcpy2D_v2,
    cuMemcpy2DAsync_v2, cuMemcpy3D_v2, cuMemsetD16_v2,
    cuMemsetD2D8_v2, cuMemPrefetchAsync, cuMemAdvise, cuMemCreate, cuMemRelease, cuMemMap,
    cuMemUnmap, cuMemSetAccess, cuMemAddressReserve, cuMemAddressFree,
    cuMemGetAllocationGranularity, cuMemExportToShareableHandle,
    cuMemImportFromShareableHandle, cuMemPoolCreate, cuMemPoolDestroy,
    cuMemPoolSetAttribute, cuMemPoolGetAttribute, cuMemPoolTrimTo, cuMemAllocFromPoolAsync,
    cuPointerGetAttribute, cuPointerGetAttributes, cuPointerSetAttribute,
    cuStreamCreateWithPriority, cuStreamDestroy_v2, cuStreamWaitEvent,
    cuStreamGetPriority, cuStreamGetFlags, cuStreamGetCtx, cuStreamAddCallback,
    cuStreamBeginCapture_v2, cuStreamEndCapture, cuStreamIsCapturing,
    cuStreamGetCaptureInfo_v2, cuEventCreate, cuEventDestroy_v2,
    cuEventElapsedTime, cuGraphCreate, cuGraphDestroy, cuGraphInstantiateWithFlags,
    cuGraphExecDestroy, cuGraphExecUpdate_v2, cuIpcGetMemHandle,
    cuIpcOpenMemHandle_v2, cuIpcCloseMemHandle, cuIpcGetEventHandle, cuIpcOpenEventHandle,
    cuOccupancyMaxActiveBlocksPerMultiprocessor,
    cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags, cuOccupancyMaxPotentialBlockSize,
    cuProfilerStart, cuProfilerStop, cuGetExportTable, cuFlushGPUDirectRDMAWrites,
}

/// Marks this library, so that `GPUCHAOS_REAL_CUDA` naming it is refused.
#[unsafe(no_mangle)]
pub extern "C" fn gpuchaos_cuda_interposer() -> c_int {
    1
}

/// What a symbol the real driver lacks answers.
extern "C" fn missing_symbol() -> CuResult {
    CUDA_ERROR_NOT_FOUND
}

struct State {
    /// The real driver, or why it could not be loaded.
    real: Result<libloading::os::unix::Library, String>,
    /// Real addresses of the wrapped calls, by name.
    real_fns: HashMap<&'static str, usize>,
    /// Real address → the interposer's wrapper (for cuGetProcAddress).
    ours_by_real: HashMap<usize, usize>,
    ours_by_name: HashMap<&'static str, usize>,
    cache: ArmCache,
    /// Context → the UUID of its GPU.
    contexts: Mutex<HashMap<usize, String>>,
    /// Device ordinal → UUID.
    uuids: Mutex<HashMap<c_int, String>>,
    /// Contexts that saw an Xid, with the error they keep returning.
    hit: Mutex<HashMap<usize, CuResult>>,
    /// GPUs this process made contexts on (its registration says so).
    gpus: Mutex<Vec<String>>,
    said: Mutex<HashSet<String>>,
}

thread_local! {
    /// The current context as the wrapped calls set it (where the real driver
    /// cannot be asked with cuCtxGetCurrent).
    static CURRENT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

static STATE: OnceLock<State> = OnceLock::new();

/// Runs when the library is loaded: the real driver is loaded and every forwarded
/// symbol resolved before any of them can be called.
#[used]
#[unsafe(link_section = ".init_array")]
static INIT: extern "C" fn() = init;

extern "C" fn init() {
    let _ = state();
}

fn say(key: &str, msg: &str) {
    if let Some(s) = STATE.get()
        && let Ok(mut said) = s.said.lock()
        && !said.insert(key.to_string())
    {
        return;
    }
    eprintln!(
        "gpuchaos cuda interposer (pid {}): {msg}",
        std::process::id()
    );
}

gpuchaos_xid_arm::real_library! {
    env: REAL_ENV,
    paths: SYSTEM_PATHS,
    marker: b"gpuchaos_cuda_interposer\0",
    what: "CUDA driver",
}

/// The calls this library wraps: (name, the wrapper's address).
fn wrappers() -> Vec<(&'static str, usize)> {
    vec![
        ("cuInit", cuInit as *const () as usize),
        ("cuCtxCreate_v2", cuCtxCreate_v2 as *const () as usize),
        (
            "cuDevicePrimaryCtxRetain",
            cuDevicePrimaryCtxRetain as *const () as usize,
        ),
        ("cuCtxSetCurrent", cuCtxSetCurrent as *const () as usize),
        (
            "cuCtxPushCurrent_v2",
            cuCtxPushCurrent_v2 as *const () as usize,
        ),
        (
            "cuCtxPopCurrent_v2",
            cuCtxPopCurrent_v2 as *const () as usize,
        ),
        ("cuCtxDestroy_v2", cuCtxDestroy_v2 as *const () as usize),
        ("cuGetErrorName", cuGetErrorName as *const () as usize),
        ("cuGetErrorString", cuGetErrorString as *const () as usize),
        ("cuGetProcAddress", cuGetProcAddress as *const () as usize),
        (
            "cuGetProcAddress_v2",
            cuGetProcAddress_v2 as *const () as usize,
        ),
        ("cuCtxSynchronize", cuCtxSynchronize as *const () as usize),
        ("cuMemAlloc_v2", cuMemAlloc_v2 as *const () as usize),
        ("cuMemAllocManaged", cuMemAllocManaged as *const () as usize),
        ("cuMemAllocAsync", cuMemAllocAsync as *const () as usize),
        ("cuMemFree_v2", cuMemFree_v2 as *const () as usize),
        ("cuMemFreeAsync", cuMemFreeAsync as *const () as usize),
        ("cuMemGetInfo_v2", cuMemGetInfo_v2 as *const () as usize),
        ("cuMemcpyHtoD_v2", cuMemcpyHtoD_v2 as *const () as usize),
        ("cuMemcpyDtoH_v2", cuMemcpyDtoH_v2 as *const () as usize),
        ("cuMemcpyDtoD_v2", cuMemcpyDtoD_v2 as *const () as usize),
        (
            "cuMemcpyHtoDAsync_v2",
            cuMemcpyHtoDAsync_v2 as *const () as usize,
        ),
        (
            "cuMemcpyDtoHAsync_v2",
            cuMemcpyDtoHAsync_v2 as *const () as usize,
        ),
        ("cuMemsetD8_v2", cuMemsetD8_v2 as *const () as usize),
        ("cuMemsetD32_v2", cuMemsetD32_v2 as *const () as usize),
        ("cuLaunchKernel", cuLaunchKernel as *const () as usize),
        ("cuModuleLoadData", cuModuleLoadData as *const () as usize),
        (
            "cuModuleGetFunction",
            cuModuleGetFunction as *const () as usize,
        ),
        ("cuStreamCreate", cuStreamCreate as *const () as usize),
        (
            "cuStreamSynchronize",
            cuStreamSynchronize as *const () as usize,
        ),
        ("cuEventRecord", cuEventRecord as *const () as usize),
        (
            "cuEventSynchronize",
            cuEventSynchronize as *const () as usize,
        ),
        (
            "cuDevicePrimaryCtxReset",
            cuDevicePrimaryCtxReset as *const () as usize,
        ),
        (
            "cuDevicePrimaryCtxReset_v2",
            cuDevicePrimaryCtxReset_v2 as *const () as usize,
        ),
        (
            "cuDevicePrimaryCtxRelease",
            cuDevicePrimaryCtxRelease as *const () as usize,
        ),
        (
            "cuDevicePrimaryCtxRelease_v2",
            cuDevicePrimaryCtxRelease_v2 as *const () as usize,
        ),
        ("cuLaunchKernelEx", cuLaunchKernelEx as *const () as usize),
        (
            "cuLaunchCooperativeKernel",
            cuLaunchCooperativeKernel as *const () as usize,
        ),
        ("cuGraphLaunch", cuGraphLaunch as *const () as usize),
        ("cuMemcpyAsync", cuMemcpyAsync as *const () as usize),
        ("cuMemsetD8Async", cuMemsetD8Async as *const () as usize),
        ("cuMemsetD32Async", cuMemsetD32Async as *const () as usize),
        ("cuStreamQuery", cuStreamQuery as *const () as usize),
        ("cuEventQuery", cuEventQuery as *const () as usize),
    ]
}

fn state() -> &'static State {
    STATE.get_or_init(|| {
        let real = open_real();
        let lookup = |name: &str| -> Option<usize> { real_symbol(real.as_ref().ok()?, name) };
        resolve_forwarders(&lookup, missing_symbol as *const () as usize);
        let mut real_fns = HashMap::new();
        let mut ours_by_real = HashMap::new();
        let mut ours_by_name = HashMap::new();
        for (name, ours) in wrappers() {
            ours_by_name.insert(name, ours);
            if let Some(p) = lookup(name) {
                real_fns.insert(name, p);
                ours_by_real.insert(p, ours);
            }
        }
        if let Err(e) = &real {
            eprintln!("gpuchaos cuda interposer (pid {}): {e}", std::process::id());
        }
        State {
            real,
            real_fns,
            ours_by_real,
            ours_by_name,
            cache: ArmCache::new(dir_from_env()),
            contexts: Mutex::new(HashMap::new()),
            uuids: Mutex::new(HashMap::new()),
            hit: Mutex::new(HashMap::new()),
            gpus: Mutex::new(Vec::new()),
            said: Mutex::new(HashSet::new()),
        }
    })
}

/// The real driver's symbol: the wrapped ones resolved at load, any other looked up.
fn real_fn(name: &str) -> Option<usize> {
    let s = state();
    s.real_fns
        .get(name)
        .copied()
        .or_else(|| real_symbol(s.real.as_ref().ok()?, name))
}

/// Calls the real driver's `$name` with the signature given; CUDA_ERROR_NOT_FOUND
/// when it lacks it.
macro_rules! call_real {
    ($name:expr, fn($($ty:ty),*), $($arg:expr),*) => {
        match real_fn($name) {
            Some(p) => {
                // SAFETY: the real driver's symbol of that name has this signature
                // (the CUDA driver API's).
                let f: unsafe extern "C" fn($($ty),*) -> CuResult = unsafe { std::mem::transmute(p) };
                // SAFETY: the caller's arguments, passed on unchanged.
                unsafe { f($($arg),*) }
            }
            None => CUDA_ERROR_NOT_FOUND,
        }
    };
}

fn format_uuid(b: &[u8; 16]) -> String {
    let h: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

/// The UUID of a device ordinal, from the real driver (cached).
fn uuid_of(dev: c_int) -> Option<String> {
    let s = state();
    if let Some(u) = s.uuids.lock().ok()?.get(&dev) {
        return Some(u.clone());
    }
    let mut b = [0u8; 16];
    let p = b.as_mut_ptr();
    let mut r = call_real!("cuDeviceGetUuid_v2", fn(*mut u8, c_int), p, dev);
    if r == CUDA_ERROR_NOT_FOUND {
        r = call_real!("cuDeviceGetUuid", fn(*mut u8, c_int), p, dev);
    }
    if r != CUDA_SUCCESS {
        return None;
    }
    let u = format_uuid(&b);
    s.uuids.lock().ok()?.insert(dev, u.clone());
    Some(u)
}

/// The current context: the real driver's answer where it has cuCtxGetCurrent,
/// else the one the wrapped calls made current on this thread.
fn current_ctx() -> usize {
    static GET_CURRENT: OnceLock<Option<usize>> = OnceLock::new();
    if let Some(p) = *GET_CURRENT.get_or_init(|| real_fn("cuCtxGetCurrent")) {
        let mut ctx: *mut c_void = std::ptr::null_mut();
        // SAFETY: cuCtxGetCurrent(CUcontext*); `ctx` outlives the call.
        let f: unsafe extern "C" fn(*mut *mut c_void) -> CuResult =
            unsafe { std::mem::transmute(p) };
        if unsafe { f(&mut ctx) } == CUDA_SUCCESS {
            return ctx as usize;
        }
    }
    CURRENT.with(|c| c.get())
}

/// The UUID of the GPU a context is on.
fn ctx_uuid(ctx: usize) -> Option<String> {
    let s = state();
    if let Some(u) = s.contexts.lock().ok()?.get(&ctx) {
        return Some(u.clone());
    }
    static GET_DEVICE: OnceLock<Option<usize>> = OnceLock::new();
    let p = (*GET_DEVICE.get_or_init(|| real_fn("cuCtxGetDevice")))?;
    let mut dev: c_int = 0;
    // SAFETY: cuCtxGetDevice(CUdevice*), about the current context; `dev` outlives it.
    let f: unsafe extern "C" fn(*mut c_int) -> CuResult = unsafe { std::mem::transmute(p) };
    if unsafe { f(&mut dev) } != CUDA_SUCCESS {
        return None;
    }
    uuid_of(dev)
}

fn register_now() {
    let s = state();
    let gpus = s.gpus.lock().map(|g| g.clone()).unwrap_or_default();
    if let Err(e) = register(s.cache.dir(), "cuda", &gpus) {
        say(
            "register",
            &format!("{e}: the agent cannot see that this process loaded the interposer"),
        );
    }
}

/// A context was made on `dev`: remembered, made current, and the registration
/// names its GPU.
fn remember_context(ctx: usize, dev: c_int, current: bool) {
    let s = state();
    let Some(uuid) = uuid_of(dev) else { return };
    if let Ok(mut m) = s.contexts.lock() {
        m.insert(ctx, uuid.clone());
    }
    if current {
        CURRENT.with(|c| c.set(ctx));
    }
    let new_gpu = s
        .gpus
        .lock()
        .map(|mut g| {
            if g.contains(&uuid) {
                false
            } else {
                g.push(uuid.clone());
                true
            }
        })
        .unwrap_or(false);
    if new_gpu {
        register_now();
    }
}

/// The error a new context on `dev` gets, when its GPU is armed.
fn new_context_error(dev: c_int) -> Option<CuResult> {
    let s = state();
    let arms = s.cache.arms();
    if arms.is_empty() {
        return None;
    }
    let uuid = uuid_of(dev)?;
    let arm = arms.iter().find(|a| a.uuid.eq_ignore_ascii_case(&uuid))?;
    if !arm.hitting(now_ms()) {
        return None;
    }
    let e = arm.cuda.as_ref()?.new_context?;
    say(
        &format!("new-{}-{uuid}", arm.fault),
        &format!(
            "{uuid} is armed with Xid {}: a new context on it fails with {} ({e})",
            arm.xid,
            error_name(e).unwrap_or("?")
        ),
    );
    Some(e)
}

/// The error a call in the current context gets: a context that saw an Xid keeps
/// its error; otherwise the arm of its GPU decides.
fn context_error(call: &str) -> Option<CuResult> {
    let s = state();
    let ctx = current_ctx();
    if ctx != 0
        && let Some(e) = s.hit.lock().ok().and_then(|h| h.get(&ctx).copied())
    {
        return Some(e);
    }
    let arms = s.cache.arms();
    if arms.is_empty() || ctx == 0 {
        return None;
    }
    let uuid = ctx_uuid(ctx)?;
    let arm = arms.iter().find(|a| a.uuid.eq_ignore_ascii_case(&uuid))?;
    if !arm.hitting(now_ms()) {
        return None;
    }
    let e = arm.cuda.as_ref()?.in_context?;
    if let Ok(mut h) = s.hit.lock() {
        h.insert(ctx, e);
    }
    say(
        &format!("ctx-{}-{ctx:x}", arm.fault),
        &format!(
            "{uuid} is armed with Xid {}: {call} fails with {} ({e}), and so does every later call in this context",
            arm.xid,
            error_name(e).unwrap_or("?")
        ),
    );
    Some(e)
}

/// The names of the errors the interposer injects (real drivers know them; a fake
/// may not).
fn error_name(e: CuResult) -> Option<&'static str> {
    Some(match e {
        214 => "CUDA_ERROR_ECC_UNCORRECTABLE",
        700 => "CUDA_ERROR_ILLEGAL_ADDRESS",
        719 => "CUDA_ERROR_LAUNCH_FAILED",
        999 => "CUDA_ERROR_UNKNOWN",
        _ => return None,
    })
}

fn error_string(e: CuResult) -> Option<&'static CStr> {
    Some(match e {
        214 => c"uncorrectable ECC error encountered",
        700 => c"an illegal memory access was encountered",
        719 => c"unspecified launch failure",
        _ => return None,
    })
}

// ------------------------------------------------------------------ wrapped calls

#[unsafe(no_mangle)]
pub extern "C" fn cuInit(flags: c_uint) -> CuResult {
    if let Err(e) = &state().real {
        say("real", e);
        return CUDA_ERROR_NO_DEVICE;
    }
    let r = call_real!("cuInit", fn(c_uint), flags);
    if r == CUDA_SUCCESS {
        static REGISTERED: std::sync::Once = std::sync::Once::new();
        REGISTERED.call_once(register_now);
    }
    r
}

/// # Safety
/// The CUDA driver API's contract for cuCtxCreate_v2.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxCreate_v2(
    ctx: *mut *mut c_void,
    flags: c_uint,
    dev: c_int,
) -> CuResult {
    if ctx.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if let Some(e) = new_context_error(dev) {
        return e;
    }
    let r = call_real!(
        "cuCtxCreate_v2",
        fn(*mut *mut c_void, c_uint, c_int),
        ctx,
        flags,
        dev
    );
    if r == CUDA_SUCCESS {
        // SAFETY: checked for null; the driver wrote the new context.
        remember_context(unsafe { *ctx } as usize, dev, true);
    }
    r
}

/// # Safety
/// The CUDA driver API's contract for cuDevicePrimaryCtxRetain.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(ctx: *mut *mut c_void, dev: c_int) -> CuResult {
    if ctx.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if let Some(e) = new_context_error(dev) {
        return e;
    }
    let r = call_real!(
        "cuDevicePrimaryCtxRetain",
        fn(*mut *mut c_void, c_int),
        ctx,
        dev
    );
    if r == CUDA_SUCCESS {
        // SAFETY: checked for null; the driver wrote the context.
        remember_context(unsafe { *ctx } as usize, dev, false);
    }
    r
}

/// # Safety
/// The CUDA driver API's contract for cuCtxSetCurrent (the context is the real driver's to check).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxSetCurrent(ctx: *mut c_void) -> CuResult {
    let r = call_real!("cuCtxSetCurrent", fn(*mut c_void), ctx);
    if r == CUDA_SUCCESS {
        CURRENT.with(|c| c.set(ctx as usize));
    }
    r
}

/// # Safety
/// The CUDA driver API's contract for cuCtxPushCurrent_v2 (the context is the real driver's to check).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxPushCurrent_v2(ctx: *mut c_void) -> CuResult {
    let r = call_real!("cuCtxPushCurrent_v2", fn(*mut c_void), ctx);
    if r == CUDA_SUCCESS {
        CURRENT.with(|c| c.set(ctx as usize));
    }
    r
}

/// # Safety
/// The CUDA driver API's contract for cuCtxPopCurrent_v2.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxPopCurrent_v2(ctx: *mut *mut c_void) -> CuResult {
    let r = call_real!("cuCtxPopCurrent_v2", fn(*mut *mut c_void), ctx);
    if r == CUDA_SUCCESS {
        // What is current now is known only to a driver with cuCtxGetCurrent.
        CURRENT.with(|c| c.set(0));
    }
    r
}

/// # Safety
/// The CUDA driver API's contract for cuCtxDestroy_v2 (the context is the real driver's to check).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxDestroy_v2(ctx: *mut c_void) -> CuResult {
    let r = call_real!("cuCtxDestroy_v2", fn(*mut c_void), ctx);
    let s = state();
    if let Ok(mut h) = s.hit.lock() {
        h.remove(&(ctx as usize));
    }
    if let Ok(mut m) = s.contexts.lock() {
        m.remove(&(ctx as usize));
    }
    CURRENT.with(|c| {
        if c.get() == ctx as usize {
            c.set(0)
        }
    });
    r
}

/// # Safety
/// `out` must be a valid pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetErrorName(error: CuResult, out: *mut *const c_char) -> CuResult {
    if out.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let ours: Option<&'static CStr> = match error {
        214 => Some(c"CUDA_ERROR_ECC_UNCORRECTABLE"),
        700 => Some(c"CUDA_ERROR_ILLEGAL_ADDRESS"),
        719 => Some(c"CUDA_ERROR_LAUNCH_FAILED"),
        _ => None,
    };
    if let Some(s) = ours {
        // SAFETY: checked for null.
        unsafe { *out = s.as_ptr() };
        return CUDA_SUCCESS;
    }
    call_real!(
        "cuGetErrorName",
        fn(CuResult, *mut *const c_char),
        error,
        out
    )
}

/// # Safety
/// `out` must be a valid pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetErrorString(error: CuResult, out: *mut *const c_char) -> CuResult {
    if out.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if let Some(s) = error_string(error) {
        // SAFETY: checked for null.
        unsafe { *out = s.as_ptr() };
        return CUDA_SUCCESS;
    }
    call_real!(
        "cuGetErrorString",
        fn(CuResult, *mut *const c_char),
        error,
        out
    )
}

/// `cuGetProcAddress` flags: CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM.
const PER_THREAD_DEFAULT_STREAM: u64 = 2;

/// No upper bound on the CUDA version an entry of [`PROC_TABLE`] holds for.
const ANY: c_int = c_int::MAX;

/// What `cuGetProcAddress(symbol, version)` is substituted by: (the symbol asked
/// for, the first CUDA version it holds for, the first it no longer does, the
/// wrapper). Only where the driver's answer for that version has the signature the
/// wrapper implements (cudaTypedefs.h's PFN_…_vNNNNN); any other symbol or version
/// (cuCtxCreate from 11040 on is `_v3`, from 12050 `_v4`; cuMemAlloc before 3020 is
/// the 32-bit v1) gets the driver's pointer untouched.
const PROC_TABLE: &[(&str, c_int, c_int, &str)] = &[
    ("cuInit", 2000, ANY, "cuInit"),
    ("cuCtxCreate", 3020, 11040, "cuCtxCreate_v2"),
    (
        "cuDevicePrimaryCtxRetain",
        7000,
        ANY,
        "cuDevicePrimaryCtxRetain",
    ),
    (
        "cuDevicePrimaryCtxReset",
        7000,
        11000,
        "cuDevicePrimaryCtxReset",
    ),
    (
        "cuDevicePrimaryCtxReset",
        11000,
        ANY,
        "cuDevicePrimaryCtxReset_v2",
    ),
    (
        "cuDevicePrimaryCtxRelease",
        7000,
        11000,
        "cuDevicePrimaryCtxRelease",
    ),
    (
        "cuDevicePrimaryCtxRelease",
        11000,
        ANY,
        "cuDevicePrimaryCtxRelease_v2",
    ),
    ("cuCtxSetCurrent", 4000, ANY, "cuCtxSetCurrent"),
    ("cuCtxPushCurrent", 4000, ANY, "cuCtxPushCurrent_v2"),
    ("cuCtxPopCurrent", 4000, ANY, "cuCtxPopCurrent_v2"),
    ("cuCtxDestroy", 4000, ANY, "cuCtxDestroy_v2"),
    ("cuGetErrorName", 6000, ANY, "cuGetErrorName"),
    ("cuGetErrorString", 6000, ANY, "cuGetErrorString"),
    ("cuGetProcAddress", 11030, 12000, "cuGetProcAddress"),
    ("cuGetProcAddress", 12000, ANY, "cuGetProcAddress_v2"),
    ("cuCtxSynchronize", 2000, ANY, "cuCtxSynchronize"),
    ("cuMemAlloc", 3020, ANY, "cuMemAlloc_v2"),
    ("cuMemAllocManaged", 6000, ANY, "cuMemAllocManaged"),
    ("cuMemAllocAsync", 11020, ANY, "cuMemAllocAsync"),
    ("cuMemFree", 3020, ANY, "cuMemFree_v2"),
    ("cuMemFreeAsync", 11020, ANY, "cuMemFreeAsync"),
    ("cuMemGetInfo", 3020, ANY, "cuMemGetInfo_v2"),
    ("cuMemcpyHtoD", 3020, ANY, "cuMemcpyHtoD_v2"),
    ("cuMemcpyDtoH", 3020, ANY, "cuMemcpyDtoH_v2"),
    ("cuMemcpyDtoD", 3020, ANY, "cuMemcpyDtoD_v2"),
    ("cuMemcpyHtoDAsync", 3020, ANY, "cuMemcpyHtoDAsync_v2"),
    ("cuMemcpyDtoHAsync", 3020, ANY, "cuMemcpyDtoHAsync_v2"),
    ("cuMemcpyAsync", 4000, ANY, "cuMemcpyAsync"),
    ("cuMemsetD8", 3020, ANY, "cuMemsetD8_v2"),
    ("cuMemsetD32", 3020, ANY, "cuMemsetD32_v2"),
    ("cuMemsetD8Async", 3020, ANY, "cuMemsetD8Async"),
    ("cuMemsetD32Async", 3020, ANY, "cuMemsetD32Async"),
    ("cuLaunchKernel", 4000, ANY, "cuLaunchKernel"),
    ("cuLaunchKernelEx", 11060, ANY, "cuLaunchKernelEx"),
    (
        "cuLaunchCooperativeKernel",
        9000,
        ANY,
        "cuLaunchCooperativeKernel",
    ),
    ("cuGraphLaunch", 10000, ANY, "cuGraphLaunch"),
    ("cuModuleLoadData", 2000, ANY, "cuModuleLoadData"),
    ("cuModuleGetFunction", 2000, ANY, "cuModuleGetFunction"),
    ("cuStreamCreate", 2000, ANY, "cuStreamCreate"),
    ("cuStreamSynchronize", 2000, ANY, "cuStreamSynchronize"),
    ("cuStreamQuery", 2000, ANY, "cuStreamQuery"),
    ("cuEventRecord", 2000, ANY, "cuEventRecord"),
    ("cuEventSynchronize", 2000, ANY, "cuEventSynchronize"),
    ("cuEventQuery", 2000, ANY, "cuEventQuery"),
];

/// The wrapper [`PROC_TABLE`] names for `name` at `version`: Some(None) when the
/// symbol is in the table but not for that version (a signature not wrapped).
fn table_entry(name: &str, version: c_int) -> Option<Option<&'static str>> {
    let mut known = false;
    for &(sym, from, until, wrapper) in PROC_TABLE {
        if sym == name {
            known = true;
            if version >= from && version < until {
                return Some(Some(wrapper));
            }
        }
    }
    known.then_some(None)
}

/// Replaces a real entry point by the interposer's wrapper of it: by address (the
/// very symbol the wrapper wraps, so the same signature), else through
/// [`PROC_TABLE`] for the legacy default stream. Per-thread-stream variants, and
/// any symbol or version the table does not name, are left to the real driver.
///
/// # Safety
/// `pfn` must be a valid pointer, `symbol` NUL-terminated.
unsafe fn substitute(pfn: *mut *mut c_void, symbol: *const c_char, version: c_int, flags: u64) {
    let s = state();
    // SAFETY: the caller checked it.
    let p = unsafe { *pfn } as usize;
    let ours = s.ours_by_real.get(&p).copied().or_else(|| {
        if flags & PER_THREAD_DEFAULT_STREAM != 0 {
            return None;
        }
        // SAFETY: NUL-terminated, as the API requires.
        let name = unsafe { CStr::from_ptr(symbol) }.to_str().ok()?;
        let wrapper = table_entry(name, version)??;
        s.ours_by_name.get(wrapper).copied()
    });
    if let Some(ours) = ours {
        // SAFETY: as above.
        unsafe { *pfn = ours as *mut c_void };
    }
}

/// cuGetProcAddress for a driver without it (the fake): the wrapper by name
/// (`_v2` first), else the real symbol.
///
/// # Safety
/// `symbol` NUL-terminated, `pfn` valid.
unsafe fn proc_address_fallback(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
) -> CuResult {
    // SAFETY: a NUL-terminated string, as the API requires.
    let name = unsafe { CStr::from_ptr(symbol) }
        .to_string_lossy()
        .into_owned();
    let s = state();
    let real = |n: &str| -> Option<usize> {
        let lib = s.real.as_ref().ok()?;
        let mut b = n.as_bytes().to_vec();
        b.push(0);
        // SAFETY: only the address is taken.
        unsafe { lib.get::<unsafe extern "C" fn()>(&b) }
            .ok()
            .map(|f| *f as usize)
    };
    let found = match table_entry(&name, version) {
        Some(Some(w)) => s.ours_by_name.get(w).copied().or_else(|| real(w)),
        // A version whose signature is not wrapped: not guessed.
        Some(None) => None,
        None => [format!("{name}_v2"), name.clone()]
            .iter()
            .find_map(|n| real(n)),
    };
    match found {
        Some(p) => {
            // SAFETY: checked by the caller.
            unsafe { *pfn = p as *mut c_void };
            CUDA_SUCCESS
        }
        None => {
            // SAFETY: as above.
            unsafe { *pfn = std::ptr::null_mut() };
            CUDA_ERROR_NOT_FOUND
        }
    }
}

/// # Safety
/// The CUDA driver API's contract for cuGetProcAddress (CUDA 11.3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetProcAddress(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: u64,
) -> CuResult {
    if symbol.is_null() || pfn.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let r = if real_fn("cuGetProcAddress").is_some() {
        call_real!(
            "cuGetProcAddress",
            fn(*const c_char, *mut *mut c_void, c_int, u64),
            symbol,
            pfn,
            version,
            flags
        )
    } else {
        // SAFETY: checked above.
        unsafe { proc_address_fallback(symbol, pfn, version) }
    };
    if r == CUDA_SUCCESS {
        // SAFETY: checked above.
        unsafe { substitute(pfn, symbol, version, flags) };
    }
    r
}

/// # Safety
/// The CUDA driver API's contract for cuGetProcAddress_v2 (CUDA 12).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetProcAddress_v2(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: u64,
    status: *mut c_int,
) -> CuResult {
    if symbol.is_null() || pfn.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let r = if real_fn("cuGetProcAddress_v2").is_some() {
        call_real!(
            "cuGetProcAddress_v2",
            fn(*const c_char, *mut *mut c_void, c_int, u64, *mut c_int),
            symbol,
            pfn,
            version,
            flags,
            status
        )
    } else {
        // SAFETY: checked above.
        let r = unsafe { proc_address_fallback(symbol, pfn, version) };
        if !status.is_null() {
            // CU_GET_PROC_ADDRESS_SUCCESS (0) or _SYMBOL_NOT_FOUND (1).
            // SAFETY: checked for null.
            unsafe { *status = if r == CUDA_SUCCESS { 0 } else { 1 } };
        }
        r
    };
    if r == CUDA_SUCCESS {
        // SAFETY: checked above.
        unsafe { substitute(pfn, symbol, version, flags) };
    }
    r
}

/// A call made in the current context: it fails with the context's Xid error when
/// its GPU is armed (or it saw one), else it is the real driver's.
macro_rules! in_context {
    ($($name:ident($($arg:ident: $ty:ty),*);)+) => {$(
        /// # Safety
        /// The CUDA driver API's contract for this call (the pointers are the
        /// real driver's to check).
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> CuResult {
            if let Some(e) = context_error(stringify!($name)) {
                return e;
            }
            call_real!(stringify!($name), fn($($ty),*), $($arg),*)
        }
    )+};
}

in_context! {
    cuCtxSynchronize();
    cuMemAlloc_v2(dptr: *mut u64, bytes: usize);
    cuMemAllocManaged(dptr: *mut u64, bytes: usize, flags: c_uint);
    cuMemAllocAsync(dptr: *mut u64, bytes: usize, stream: *mut c_void);
    cuMemFree_v2(dptr: u64);
    cuMemFreeAsync(dptr: u64, stream: *mut c_void);
    cuMemGetInfo_v2(free: *mut usize, total: *mut usize);
    cuMemcpyHtoD_v2(dst: u64, src: *const c_void, n: usize);
    cuMemcpyDtoH_v2(dst: *mut c_void, src: u64, n: usize);
    cuMemcpyDtoD_v2(dst: u64, src: u64, n: usize);
    cuMemcpyHtoDAsync_v2(dst: u64, src: *const c_void, n: usize, stream: *mut c_void);
    cuMemcpyDtoHAsync_v2(dst: *mut c_void, src: u64, n: usize, stream: *mut c_void);
    cuMemsetD8_v2(dst: u64, value: u8, n: usize);
    cuMemsetD32_v2(dst: u64, value: c_uint, n: usize);
    cuLaunchKernel(
        f: *mut c_void,
        gx: c_uint,
        gy: c_uint,
        gz: c_uint,
        bx: c_uint,
        by: c_uint,
        bz: c_uint,
        shared: c_uint,
        stream: *mut c_void,
        params: *mut *mut c_void,
        extra: *mut *mut c_void
    );
    cuModuleLoadData(module: *mut *mut c_void, image: *const c_void);
    cuModuleGetFunction(f: *mut *mut c_void, module: *mut c_void, name: *const c_char);
    cuStreamCreate(stream: *mut *mut c_void, flags: c_uint);
    cuStreamSynchronize(stream: *mut c_void);
    cuEventRecord(event: *mut c_void, stream: *mut c_void);
    cuEventSynchronize(event: *mut c_void);
    cuEventQuery(event: *mut c_void);
    cuStreamQuery(stream: *mut c_void);
    cuMemcpyAsync(dst: u64, src: u64, n: usize, stream: *mut c_void);
    cuMemsetD8Async(dst: u64, value: u8, n: usize, stream: *mut c_void);
    cuMemsetD32Async(dst: u64, value: c_uint, n: usize, stream: *mut c_void);
    cuGraphLaunch(exec: *mut c_void, stream: *mut c_void);
    cuLaunchKernelEx(
        config: *const c_void,
        f: *mut c_void,
        params: *mut *mut c_void,
        extra: *mut *mut c_void
    );
    cuLaunchCooperativeKernel(
        f: *mut c_void,
        gx: c_uint,
        gy: c_uint,
        gz: c_uint,
        bx: c_uint,
        by: c_uint,
        bz: c_uint,
        shared: c_uint,
        stream: *mut c_void,
        params: *mut *mut c_void
    );
}

/// A reset or release of `dev`'s primary context: the real driver's, and on
/// success the contexts on that GPU forget the Xid they saw, so that a workload
/// that resets the device after the revert recovers (while the GPU is still armed
/// the next call fails again).
macro_rules! primary_reset {
    ($($name:ident;)+) => {$(
        /// # Safety
        /// The CUDA driver API's contract for this call.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(dev: c_int) -> CuResult {
            let r = call_real!(stringify!($name), fn(c_int), dev);
            if r == CUDA_SUCCESS {
                forget_hits(dev);
            }
            r
        }
    )+};
}

primary_reset! {
    cuDevicePrimaryCtxReset;
    cuDevicePrimaryCtxReset_v2;
    cuDevicePrimaryCtxRelease;
    cuDevicePrimaryCtxRelease_v2;
}

/// Clears the Xid state of every context on `dev`'s GPU.
fn forget_hits(dev: c_int) {
    let s = state();
    let Some(uuid) = uuid_of(dev) else { return };
    let on: Vec<usize> = s
        .contexts
        .lock()
        .map(|m| {
            m.iter()
                .filter(|(_, u)| u.eq_ignore_ascii_case(&uuid))
                .map(|(c, _)| *c)
                .collect()
        })
        .unwrap_or_default();
    if let Ok(mut h) = s.hit.lock() {
        for c in on {
            h.remove(&c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_proc_address_substitutes_only_the_signatures_the_wrappers_implement() {
        // cuCtxCreate: v2 up to 11.4; v3 (11040) and v4 (12050) are not wrapped.
        assert_eq!(
            table_entry("cuCtxCreate", 3020),
            Some(Some("cuCtxCreate_v2"))
        );
        assert_eq!(
            table_entry("cuCtxCreate", 11030),
            Some(Some("cuCtxCreate_v2"))
        );
        assert_eq!(table_entry("cuCtxCreate", 11040), Some(None));
        assert_eq!(table_entry("cuCtxCreate", 12050), Some(None));
        assert_eq!(table_entry("cuCtxCreate", 2000), Some(None));
        // cuGetProcAddress: 4 arguments from 11.3, 5 (the _v2) from 12.0.
        assert_eq!(
            table_entry("cuGetProcAddress", 11030),
            Some(Some("cuGetProcAddress"))
        );
        assert_eq!(
            table_entry("cuGetProcAddress", 11080),
            Some(Some("cuGetProcAddress"))
        );
        assert_eq!(
            table_entry("cuGetProcAddress", 12000),
            Some(Some("cuGetProcAddress_v2"))
        );
        // The 32-bit v1 of cuMemAlloc is not wrapped; a symbol not in the table is
        // the driver's.
        assert_eq!(table_entry("cuMemAlloc", 3000), Some(None));
        assert_eq!(
            table_entry("cuMemAlloc", 12080),
            Some(Some("cuMemAlloc_v2"))
        );
        assert_eq!(table_entry("cuDeviceTotalMem", 12080), None);
        // Every wrapper the table names exists.
        let names: HashSet<&str> = wrappers().into_iter().map(|(n, _)| n).collect();
        for (sym, from, until, w) in PROC_TABLE {
            assert!(from < until, "{sym}");
            assert!(names.contains(w), "{w} is not a wrapper");
        }
    }
}

//! `libgpuchaos_nvml_interpose.so`: the NVML layer of `kind: gpu_xid`.
//!
//! A monitor (a DCGM exporter, a device plugin's health check, an NVML-based
//! detector) opts in at start: `LD_PRELOAD=/path/libgpuchaos_nvml_interpose.so` (its
//! SONAME is `libnvidia-ml.so.1`, so the monitor's own `dlopen("libnvidia-ml.so.1")`
//! returns the interposer), or its NVML path pointed at it.
//!
//! It loads the real NVML by absolute path (`GPUCHAOS_REAL_NVML`, default the
//! system's libnvidia-ml.so.1 in the usual directories) and forwards every call:
//! the calls below are wrapped, the rest are tail jumps into the real library. For
//! a GPU the agent armed (`arm-<UUID>.json` in `GPUCHAOS_XID_DIR`, read at most
//! every 50 ms), it answers as the Xid makes a real GPU answer:
//!
//! - an Xid event (`nvmlEventTypeXidCriticalError`, `eventData` = the Xid, MIG ids
//!   0xFFFFFFFF as for a whole GPU) to every event set registered for it before the
//!   fault, once; a double-bit ECC event as well for the uncorrectable ECC Xids;
//! - `NVML_ERROR_GPU_IS_LOST` from the wrapped device queries, for Xid 79;
//! - uncorrected ECC errors, retired pages (pending) and remapped rows, for the ECC
//!   and row-remapping Xids.
//!
//! Calling into a C library is this crate's purpose, so it allows `unsafe`: every
//! pointer a caller passes is checked for null before it is written through.
#![allow(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::ffi::{c_char, c_int, c_uint, c_void};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use gpuchaos_xid_arm::{Arm, ArmCache, NvmlArm, dir_from_env, now_ms, register};

type NvmlReturn = c_int;
type Device = *mut c_void;
const NVML_SUCCESS: NvmlReturn = 0;
const NVML_ERROR_INVALID_ARGUMENT: NvmlReturn = 2;
const NVML_ERROR_NOT_SUPPORTED: NvmlReturn = 3;
const NVML_ERROR_INSUFFICIENT_SIZE: NvmlReturn = 7;
const NVML_ERROR_TIMEOUT: NvmlReturn = 10;
const NVML_ERROR_LIBRARY_NOT_FOUND: NvmlReturn = 12;
const NVML_ERROR_FUNCTION_NOT_FOUND: NvmlReturn = 13;
const NVML_ERROR_GPU_IS_LOST: NvmlReturn = 15;

const EVENT_DOUBLE_BIT_ECC: u64 = 2;
const EVENT_XID_CRITICAL: u64 = 8;

pub const REAL_ENV: &str = "GPUCHAOS_REAL_NVML";
const SYSTEM_PATHS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1",
    "/usr/lib/aarch64-linux-gnu/libnvidia-ml.so.1",
    "/usr/lib64/libnvidia-ml.so.1",
    "/usr/lib/libnvidia-ml.so.1",
    "/usr/local/nvidia/lib64/libnvidia-ml.so.1",
    "/usr/lib/wsl/lib/libnvidia-ml.so.1",
];

gpuchaos_xid_arm::forwarders! {
    nvmlShutdown, nvmlErrorString, nvmlSystemGetDriverVersion, nvmlSystemGetNVMLVersion,
    nvmlSystemGetCudaDriverVersion, nvmlSystemGetCudaDriverVersion_v2,
    nvmlSystemGetProcessName, nvmlDeviceGetCount_v2, nvmlDeviceGetCount,
    nvmlDeviceGetHandleByIndex_v2, nvmlDeviceGetHandleByIndex, nvmlDeviceGetHandleByUUID,
    nvmlDeviceGetHandleByPciBusId_v2, nvmlDeviceGetHandleBySerial, nvmlDeviceGetIndex,
    nvmlDeviceGetBrand, nvmlDeviceGetArchitecture, nvmlDeviceGetCudaComputeCapability,
    nvmlDeviceGetDisplayMode, nvmlDeviceGetDisplayActive, nvmlDeviceGetInforomVersion,
    nvmlDeviceGetInforomImageVersion, nvmlDeviceGetNumGpuCores, nvmlDeviceGetMemoryBusWidth,
    nvmlDeviceGetMaxPcieLinkGeneration, nvmlDeviceGetMaxPcieLinkWidth,
    nvmlDeviceGetSupportedMemoryClocks, nvmlDeviceGetSupportedGraphicsClocks,
    nvmlDeviceGetApplicationsClock, nvmlDeviceGetDefaultApplicationsClock,
    nvmlDeviceGetPowerManagementLimitConstraints, nvmlDeviceGetPowerManagementDefaultLimit,
    nvmlDeviceGetPowerState, nvmlDeviceGetTemperatureThreshold, nvmlDeviceGetNvLinkState,
    nvmlDeviceGetNvLinkVersion, nvmlDeviceGetNvLinkErrorCounter,
    nvmlDeviceGetNvLinkRemotePciInfo_v2, nvmlDeviceGetMaxMigDeviceCount,
    nvmlDeviceGetMigDeviceHandleByIndex, nvmlDeviceGetDeviceHandleFromMigDeviceHandle,
    nvmlDeviceGetGpuInstanceId, nvmlDeviceGetComputeInstanceId, nvmlDeviceIsMigDeviceHandle,
    nvmlDeviceGetAccountingMode, nvmlDeviceGetAccountingStats, nvmlDeviceGetAccountingPids,
    nvmlDeviceGetSamples, nvmlDeviceGetViolationStatus, nvmlDeviceGetTopologyCommonAncestor,
    nvmlDeviceGetP2PStatus, nvmlDeviceGetCpuAffinity,
    nvmlDeviceGetMemoryAffinity, nvmlDeviceSetPersistenceMode, nvmlDeviceSetComputeMode,
    nvmlDeviceSetEccMode, nvmlDeviceClearEccErrorCounts, nvmlDeviceSetPowerManagementLimit,
    nvmlDeviceSetApplicationsClocks, nvmlDeviceResetApplicationsClocks,
    nvmlDeviceSetMigMode, nvmlDeviceGetGpuOperationMode, nvmlDeviceGetVirtualizationMode,
    nvmlDeviceGetHostVgpuMode, nvmlDeviceGetProcessUtilization,
    nvmlDeviceGetGspFirmwareMode, nvmlDeviceGetGspFirmwareVersion, nvmlUnitGetCount,
    nvmlDeviceGetBusType, nvmlDeviceGetIrqNum, nvmlDeviceGetPcieSpeed,
    nvmlDeviceGetPcieLinkMaxSpeed, nvmlDeviceGetPcieReplayCounter, nvmlDeviceGetBoardId,
    nvmlDeviceGetMultiGpuBoard, nvmlDeviceGetAttributes_v2, nvmlDeviceOnSameBoard,
    nvmlDeviceGetMemoryErrorCounter, nvmlDeviceGetDetailedEccErrors, nvmlDeviceGetFieldValues,
    nvmlDeviceClearFieldValues, nvmlDeviceGetSupportedClocksEventReasons,
    nvmlDeviceGetSupportedClocksThrottleReasons, nvmlGpmMetricsGet, nvmlGpmSampleAlloc,
    nvmlGpmSampleFree, nvmlGpmSampleGet, nvmlGpmQueryDeviceSupport,
}

#[unsafe(no_mangle)]
pub extern "C" fn gpuchaos_nvml_interposer() -> c_int {
    1
}

extern "C" fn missing_symbol() -> NvmlReturn {
    NVML_ERROR_FUNCTION_NOT_FOUND
}

struct State {
    real: Result<libloading::os::unix::Library, String>,
    real_fns: HashMap<&'static str, usize>,
    cache: ArmCache,
    uuids: Mutex<HashMap<usize, String>>,
    /// The event sets this library made (their addresses).
    sets: Mutex<HashSet<usize>>,
    said: Mutex<HashSet<String>>,
}

static STATE: OnceLock<State> = OnceLock::new();

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
        "gpuchaos nvml interposer (pid {}): {msg}",
        std::process::id()
    );
}

gpuchaos_xid_arm::real_library! {
    env: REAL_ENV,
    paths: SYSTEM_PATHS,
    marker: b"gpuchaos_nvml_interposer\0",
    what: "NVML",
}

/// The calls this library wraps, whose real addresses it keeps.
const WRAPPED: &[&str] = &[
    "nvmlInit_v2",
    "nvmlInit",
    "nvmlInitWithFlags",
    "nvmlDeviceGetUUID",
    "nvmlDeviceGetName",
    "nvmlDeviceGetSerial",
    "nvmlDeviceGetMemoryInfo",
    "nvmlDeviceGetMemoryInfo_v2",
    "nvmlDeviceGetBAR1MemoryInfo",
    "nvmlDeviceGetUtilizationRates",
    "nvmlDeviceGetEncoderUtilization",
    "nvmlDeviceGetDecoderUtilization",
    "nvmlDeviceGetTemperature",
    "nvmlDeviceGetPowerUsage",
    "nvmlDeviceGetTotalEnergyConsumption",
    "nvmlDeviceGetEnforcedPowerLimit",
    "nvmlDeviceGetPowerManagementLimit",
    "nvmlDeviceGetPowerManagementMode",
    "nvmlDeviceGetComputeRunningProcesses_v3",
    "nvmlDeviceGetComputeRunningProcesses_v2",
    "nvmlDeviceGetComputeRunningProcesses",
    "nvmlDeviceGetGraphicsRunningProcesses_v3",
    "nvmlDeviceGetPciInfo_v3",
    "nvmlDeviceGetPciInfo_v2",
    "nvmlDeviceGetPciInfo",
    "nvmlDeviceGetClockInfo",
    "nvmlDeviceGetMaxClockInfo",
    "nvmlDeviceGetClock",
    "nvmlDeviceGetFanSpeed",
    "nvmlDeviceGetFanSpeed_v2",
    "nvmlDeviceGetPerformanceState",
    "nvmlDeviceGetComputeMode",
    "nvmlDeviceGetMigMode",
    "nvmlDeviceGetPersistenceMode",
    "nvmlDeviceGetMinorNumber",
    "nvmlDeviceGetVbiosVersion",
    "nvmlDeviceGetBoardPartNumber",
    "nvmlDeviceGetCurrentClocksThrottleReasons",
    "nvmlDeviceGetCurrentClocksEventReasons",
    "nvmlDeviceGetPcieThroughput",
    "nvmlDeviceGetCurrPcieLinkGeneration",
    "nvmlDeviceGetCurrPcieLinkWidth",
    "nvmlDeviceGetTotalEccErrors",
    "nvmlDeviceGetEccMode",
    "nvmlDeviceGetRetiredPages",
    "nvmlDeviceGetRetiredPages_v2",
    "nvmlDeviceGetRetiredPagesPendingStatus",
    "nvmlDeviceGetRemappedRows",
    "nvmlDeviceGetSupportedEventTypes",
    "nvmlDeviceRegisterEvents",
    "nvmlEventSetCreate",
    "nvmlEventSetWait_v2",
    "nvmlEventSetWait",
    "nvmlEventSetFree",
];

fn state() -> &'static State {
    STATE.get_or_init(|| {
        let real = open_real();
        let lookup = |name: &str| -> Option<usize> { real_symbol(real.as_ref().ok()?, name) };
        let missing = if real.is_ok() {
            missing_symbol as *const () as usize
        } else {
            no_library as *const () as usize
        };
        resolve_forwarders(&lookup, missing);
        let real_fns = WRAPPED
            .iter()
            .filter_map(|n| lookup(n).map(|p| (*n, p)))
            .collect();
        if let Err(e) = &real {
            eprintln!("gpuchaos nvml interposer (pid {}): {e}", std::process::id());
        }
        State {
            real,
            real_fns,
            cache: ArmCache::new(dir_from_env()),
            uuids: Mutex::new(HashMap::new()),
            sets: Mutex::new(HashSet::new()),
            said: Mutex::new(HashSet::new()),
        }
    })
}

extern "C" fn no_library() -> NvmlReturn {
    NVML_ERROR_LIBRARY_NOT_FOUND
}

fn real_fn(name: &str) -> Option<usize> {
    state().real_fns.get(name).copied()
}

fn absent() -> NvmlReturn {
    if state().real.is_ok() {
        NVML_ERROR_FUNCTION_NOT_FOUND
    } else {
        NVML_ERROR_LIBRARY_NOT_FOUND
    }
}

macro_rules! call_real {
    ($name:expr, fn($($ty:ty),*), $($arg:expr),*) => {
        match real_fn($name) {
            Some(p) => {
                // SAFETY: the real NVML's symbol of that name has this signature.
                let f: unsafe extern "C" fn($($ty),*) -> NvmlReturn = unsafe { std::mem::transmute(p) };
                // SAFETY: the caller's arguments, passed on unchanged.
                unsafe { f($($arg),*) }
            }
            None => absent(),
        }
    };
}

/// The UUID of a device handle, from the real NVML (cached).
fn uuid_of(device: Device) -> Option<String> {
    let s = state();
    if let Some(u) = s.uuids.lock().ok()?.get(&(device as usize)) {
        return Some(u.clone());
    }
    let mut buf = [0 as c_char; 96];
    let p = buf.as_mut_ptr();
    let r = call_real!(
        "nvmlDeviceGetUUID",
        fn(Device, *mut c_char, c_uint),
        device,
        p,
        96
    );
    if r != NVML_SUCCESS {
        return None;
    }
    // SAFETY: NVML wrote a NUL-terminated string into the buffer.
    let u = unsafe { std::ffi::CStr::from_ptr(p) }
        .to_string_lossy()
        .into_owned();
    s.uuids.lock().ok()?.insert(device as usize, u.clone());
    Some(u)
}

/// The NVML effect armed for a device now, with its arm.
fn armed(device: Device) -> Option<(Arm, NvmlArm)> {
    let arms = state().cache.arms();
    if arms.is_empty() {
        return None;
    }
    let uuid = uuid_of(device)?;
    let arm = arms
        .into_iter()
        .find(|a| a.uuid.eq_ignore_ascii_case(&uuid))?;
    let n = arm.nvml.clone()?;
    Some((arm, n))
}

fn lost(device: Device, call: &str) -> bool {
    match armed(device) {
        Some((arm, n)) if n.lost && arm.hitting(now_ms()) => {
            say(
                &format!("lost-{}-{}", arm.fault, arm.uuid),
                &format!(
                    "{} is armed with Xid {}: {call} and the other device queries answer NVML_ERROR_GPU_IS_LOST",
                    arm.uuid, arm.xid
                ),
            );
            true
        }
        _ => false,
    }
}

fn registered() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Err(e) = register(state().cache.dir(), "nvml", &[]) {
            say(
                "register",
                &format!("{e}: the agent cannot see that this process loaded the interposer"),
            );
        }
    });
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit_v2() -> NvmlReturn {
    let r = call_real!("nvmlInit_v2", fn(),);
    if r == NVML_SUCCESS {
        registered();
    }
    r
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit() -> NvmlReturn {
    let r = call_real!("nvmlInit", fn(),);
    if r == NVML_SUCCESS {
        registered();
    }
    r
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInitWithFlags(flags: c_uint) -> NvmlReturn {
    let r = call_real!("nvmlInitWithFlags", fn(c_uint), flags);
    if r == NVML_SUCCESS {
        registered();
    }
    r
}

/// A device query: NVML_ERROR_GPU_IS_LOST for a GPU armed as lost, else the real
/// library's answer.
macro_rules! device_query {
    ($($name:ident($($arg:ident: $ty:ty),*);)+) => {$(
        /// # Safety
        /// NVML's contract for this call (the pointers are the real library's to
        /// check).
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(device: Device, $($arg: $ty),*) -> NvmlReturn {
            if lost(device, stringify!($name)) {
                return NVML_ERROR_GPU_IS_LOST;
            }
            call_real!(stringify!($name), fn(Device, $($ty),*), device, $($arg),*)
        }
    )+};
}

device_query! {
    nvmlDeviceGetUUID(buf: *mut c_char, len: c_uint);
    nvmlDeviceGetName(buf: *mut c_char, len: c_uint);
    nvmlDeviceGetSerial(buf: *mut c_char, len: c_uint);
    nvmlDeviceGetMemoryInfo(memory: *mut c_void);
    nvmlDeviceGetMemoryInfo_v2(memory: *mut c_void);
    nvmlDeviceGetBAR1MemoryInfo(memory: *mut c_void);
    nvmlDeviceGetUtilizationRates(util: *mut c_void);
    nvmlDeviceGetEncoderUtilization(util: *mut c_uint, period: *mut c_uint);
    nvmlDeviceGetDecoderUtilization(util: *mut c_uint, period: *mut c_uint);
    nvmlDeviceGetTemperature(sensor: c_int, temp: *mut c_uint);
    nvmlDeviceGetPowerUsage(power: *mut c_uint);
    nvmlDeviceGetTotalEnergyConsumption(energy: *mut u64);
    nvmlDeviceGetEnforcedPowerLimit(limit: *mut c_uint);
    nvmlDeviceGetPowerManagementLimit(limit: *mut c_uint);
    nvmlDeviceGetPowerManagementMode(mode: *mut c_int);
    nvmlDeviceGetComputeRunningProcesses_v3(count: *mut c_uint, infos: *mut c_void);
    nvmlDeviceGetComputeRunningProcesses_v2(count: *mut c_uint, infos: *mut c_void);
    nvmlDeviceGetComputeRunningProcesses(count: *mut c_uint, infos: *mut c_void);
    nvmlDeviceGetGraphicsRunningProcesses_v3(count: *mut c_uint, infos: *mut c_void);
    nvmlDeviceGetPciInfo_v3(pci: *mut c_void);
    nvmlDeviceGetPciInfo_v2(pci: *mut c_void);
    nvmlDeviceGetPciInfo(pci: *mut c_void);
    nvmlDeviceGetClockInfo(kind: c_int, clock: *mut c_uint);
    nvmlDeviceGetMaxClockInfo(kind: c_int, clock: *mut c_uint);
    nvmlDeviceGetClock(kind: c_int, id: c_int, clock: *mut c_uint);
    nvmlDeviceGetFanSpeed(speed: *mut c_uint);
    nvmlDeviceGetFanSpeed_v2(fan: c_uint, speed: *mut c_uint);
    nvmlDeviceGetPerformanceState(state: *mut c_int);
    nvmlDeviceGetComputeMode(mode: *mut c_int);
    nvmlDeviceGetMigMode(current: *mut c_uint, pending: *mut c_uint);
    nvmlDeviceGetPersistenceMode(mode: *mut c_int);
    nvmlDeviceGetMinorNumber(minor: *mut c_uint);
    nvmlDeviceGetVbiosVersion(buf: *mut c_char, len: c_uint);
    nvmlDeviceGetBoardPartNumber(buf: *mut c_char, len: c_uint);
    nvmlDeviceGetCurrentClocksThrottleReasons(reasons: *mut u64);
    nvmlDeviceGetCurrentClocksEventReasons(reasons: *mut u64);
    nvmlDeviceGetPcieThroughput(counter: c_int, value: *mut c_uint);
    nvmlDeviceGetCurrPcieLinkGeneration(gen_: *mut c_uint);
    nvmlDeviceGetCurrPcieLinkWidth(width: *mut c_uint);
}

/// Whether a real answer is one to replace with the armed one (the library, or
/// this device, does not have the counter).
fn unsupported(r: NvmlReturn) -> bool {
    matches!(
        r,
        NVML_ERROR_NOT_SUPPORTED | NVML_ERROR_FUNCTION_NOT_FOUND | NVML_ERROR_LIBRARY_NOT_FOUND
    )
}

fn has_ecc(n: &NvmlArm) -> bool {
    n.uncorrected > 0 || n.retired_dbe_pages > 0 || n.remapped_uncorrectable > 0 || n.remap_failure
}

/// # Safety
/// `count` must be a valid pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTotalEccErrors(
    device: Device,
    error_type: c_int,
    counter_type: c_int,
    count: *mut u64,
) -> NvmlReturn {
    if count.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    if lost(device, "nvmlDeviceGetTotalEccErrors") {
        return NVML_ERROR_GPU_IS_LOST;
    }
    let r = call_real!(
        "nvmlDeviceGetTotalEccErrors",
        fn(Device, c_int, c_int, *mut u64),
        device,
        error_type,
        counter_type,
        count
    );
    let Some((_, n)) = armed(device).filter(|(_, n)| has_ecc(n)) else {
        return r;
    };
    if r != NVML_SUCCESS && !unsupported(r) {
        return r;
    }
    // SAFETY: checked for null.
    unsafe {
        let base = if r == NVML_SUCCESS { *count } else { 0 };
        // NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1; volatile and aggregate alike.
        *count = base + if error_type == 1 { n.uncorrected } else { 0 };
    }
    NVML_SUCCESS
}

/// # Safety
/// `current` and `pending` must be valid pointers.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetEccMode(
    device: Device,
    current: *mut c_int,
    pending: *mut c_int,
) -> NvmlReturn {
    if current.is_null() || pending.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    if lost(device, "nvmlDeviceGetEccMode") {
        return NVML_ERROR_GPU_IS_LOST;
    }
    let r = call_real!(
        "nvmlDeviceGetEccMode",
        fn(Device, *mut c_int, *mut c_int),
        device,
        current,
        pending
    );
    if unsupported(r) && armed(device).is_some_and(|(_, n)| has_ecc(&n)) {
        // An ECC error is only reported by a GPU with ECC on.
        // SAFETY: checked for null.
        unsafe {
            *current = 1;
            *pending = 1;
        }
        return NVML_SUCCESS;
    }
    r
}

/// The pages the arm retired (for a double-bit error): fills `count`/`addresses`
/// as NVML does. None when the arm retired none.
///
/// # Safety
/// `count` valid; `addresses` null or `*count` entries; `times` likewise.
unsafe fn armed_pages(
    device: Device,
    cause: c_int,
    count: *mut c_uint,
    addresses: *mut u64,
    times: *mut u64,
) -> Option<NvmlReturn> {
    let (arm, n) = armed(device)?;
    if n.retired_dbe_pages == 0 {
        return None;
    }
    // NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR = 1.
    let pages = if cause == 1 { n.retired_dbe_pages } else { 0 };
    // SAFETY: as documented.
    unsafe {
        let room = *count as u64;
        *count = pages as c_uint;
        if pages == 0 {
            return Some(NVML_SUCCESS);
        }
        if addresses.is_null() || room < pages {
            return Some(NVML_ERROR_INSUFFICIENT_SIZE);
        }
        for k in 0..pages as usize {
            *addresses.add(k) = 0x1_e3b4_0000 + (k as u64) * 0x1000;
            if !times.is_null() {
                *times.add(k) = arm.armed_at_ms / 1000;
            }
        }
    }
    Some(NVML_SUCCESS)
}

/// # Safety
/// NVML's contract for nvmlDeviceGetRetiredPages.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPages(
    device: Device,
    cause: c_int,
    count: *mut c_uint,
    addresses: *mut u64,
) -> NvmlReturn {
    if count.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    if lost(device, "nvmlDeviceGetRetiredPages") {
        return NVML_ERROR_GPU_IS_LOST;
    }
    // SAFETY: the caller's pointers, as NVML takes them.
    if let Some(r) = unsafe { armed_pages(device, cause, count, addresses, std::ptr::null_mut()) } {
        return r;
    }
    call_real!(
        "nvmlDeviceGetRetiredPages",
        fn(Device, c_int, *mut c_uint, *mut u64),
        device,
        cause,
        count,
        addresses
    )
}

/// # Safety
/// NVML's contract for nvmlDeviceGetRetiredPages_v2.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPages_v2(
    device: Device,
    cause: c_int,
    count: *mut c_uint,
    addresses: *mut u64,
    times: *mut u64,
) -> NvmlReturn {
    if count.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    if lost(device, "nvmlDeviceGetRetiredPages_v2") {
        return NVML_ERROR_GPU_IS_LOST;
    }
    // SAFETY: the caller's pointers, as NVML takes them.
    if let Some(r) = unsafe { armed_pages(device, cause, count, addresses, times) } {
        return r;
    }
    call_real!(
        "nvmlDeviceGetRetiredPages_v2",
        fn(Device, c_int, *mut c_uint, *mut u64, *mut u64),
        device,
        cause,
        count,
        addresses,
        times
    )
}

/// # Safety
/// `pending` must be a valid pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPagesPendingStatus(
    device: Device,
    pending: *mut c_int,
) -> NvmlReturn {
    if pending.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    if lost(device, "nvmlDeviceGetRetiredPagesPendingStatus") {
        return NVML_ERROR_GPU_IS_LOST;
    }
    if armed(device).is_some_and(|(_, n)| n.retired_dbe_pages > 0) {
        // SAFETY: checked for null.
        unsafe { *pending = 1 };
        return NVML_SUCCESS;
    }
    call_real!(
        "nvmlDeviceGetRetiredPagesPendingStatus",
        fn(Device, *mut c_int),
        device,
        pending
    )
}

/// # Safety
/// Every pointer must be valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetRemappedRows(
    device: Device,
    corrected: *mut c_uint,
    uncorrected: *mut c_uint,
    pending: *mut c_uint,
    failure: *mut c_uint,
) -> NvmlReturn {
    if corrected.is_null() || uncorrected.is_null() || pending.is_null() || failure.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    if lost(device, "nvmlDeviceGetRemappedRows") {
        return NVML_ERROR_GPU_IS_LOST;
    }
    let r = call_real!(
        "nvmlDeviceGetRemappedRows",
        fn(Device, *mut c_uint, *mut c_uint, *mut c_uint, *mut c_uint),
        device,
        corrected,
        uncorrected,
        pending,
        failure
    );
    let Some((_, n)) =
        armed(device).filter(|(_, n)| n.remapped_uncorrectable > 0 || n.remap_failure)
    else {
        return r;
    };
    if r != NVML_SUCCESS && !unsupported(r) {
        return r;
    }
    // SAFETY: checked for null.
    unsafe {
        if r != NVML_SUCCESS {
            *corrected = 0;
            *uncorrected = 0;
            *pending = 0;
            *failure = 0;
        }
        *uncorrected += n.remapped_uncorrectable as c_uint;
        if n.remapped_uncorrectable > 0 {
            *pending = 1;
        }
        if n.remap_failure {
            *failure = 1;
        }
    }
    NVML_SUCCESS
}

// ------------------------------------------------------------------ events

/// An event set as this library hands it out: the real one (if the real library
/// has events) and the devices registered on it.
struct EventSet {
    real: *mut c_void,
    regs: Mutex<Vec<Registration>>,
    /// Events found in arms, not yet delivered.
    queue: Mutex<Vec<EventData>>,
    /// (fault, GPU) already queued.
    seen: Mutex<HashSet<(String, String)>>,
}

struct Registration {
    device: Device,
    uuid: String,
    types: u64,
    at_ms: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EventData {
    device: Device,
    event_type: u64,
    event_data: u64,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

/// # Safety
/// `set` must be a valid pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut *mut c_void) -> NvmlReturn {
    if set.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    let mut real: *mut c_void = std::ptr::null_mut();
    let p: *mut *mut c_void = &mut real;
    let r = call_real!("nvmlEventSetCreate", fn(*mut *mut c_void), p);
    if r != NVML_SUCCESS {
        real = std::ptr::null_mut();
    }
    let ours = Box::into_raw(Box::new(EventSet {
        real,
        regs: Mutex::new(Vec::new()),
        queue: Mutex::new(Vec::new()),
        seen: Mutex::new(HashSet::new()),
    }));
    if let Ok(mut sets) = state().sets.lock() {
        sets.insert(ours as usize);
    }
    // SAFETY: checked for null.
    unsafe { *set = ours as *mut c_void };
    NVML_SUCCESS
}

/// One of this library's sets, when `set` is one.
fn our_set<'a>(set: *mut c_void) -> Option<&'a EventSet> {
    let known = state().sets.lock().ok()?.contains(&(set as usize));
    // SAFETY: made by nvmlEventSetCreate above and not yet freed.
    known.then(|| unsafe { &*(set as *const EventSet) })
}

/// # Safety
/// `types` must be a valid pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetSupportedEventTypes(
    device: Device,
    types: *mut u64,
) -> NvmlReturn {
    if types.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    if lost(device, "nvmlDeviceGetSupportedEventTypes") {
        return NVML_ERROR_GPU_IS_LOST;
    }
    let r = call_real!(
        "nvmlDeviceGetSupportedEventTypes",
        fn(Device, *mut u64),
        device,
        types
    );
    // SAFETY: checked for null.
    unsafe {
        if r != NVML_SUCCESS {
            if !unsupported(r) {
                return r;
            }
            *types = 0;
        }
        *types |= EVENT_XID_CRITICAL | EVENT_DOUBLE_BIT_ECC;
    }
    NVML_SUCCESS
}

/// # Safety
/// NVML's contract for nvmlDeviceRegisterEvents (the handles are checked: unknown ones are refused).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceRegisterEvents(
    device: Device,
    types: u64,
    set: *mut c_void,
) -> NvmlReturn {
    let Some(s) = our_set(set) else {
        return NVML_ERROR_INVALID_ARGUMENT;
    };
    if lost(device, "nvmlDeviceRegisterEvents") {
        return NVML_ERROR_GPU_IS_LOST;
    }
    let Some(uuid) = uuid_of(device) else {
        return NVML_ERROR_INVALID_ARGUMENT;
    };
    if !s.real.is_null() {
        let r = call_real!(
            "nvmlDeviceRegisterEvents",
            fn(Device, u64, *mut c_void),
            device,
            types,
            s.real
        );
        let ours = types & (EVENT_XID_CRITICAL | EVENT_DOUBLE_BIT_ECC);
        if r != NVML_SUCCESS && !(unsupported(r) && ours != 0) {
            return r;
        }
    }
    if let Ok(mut regs) = s.regs.lock() {
        regs.push(Registration {
            device,
            uuid,
            types,
            at_ms: now_ms(),
        });
    }
    NVML_SUCCESS
}

/// Queues the events of arms made since the registrations; returns the next one.
fn next_event(s: &EventSet) -> Option<EventData> {
    let arms = state().cache.arms();
    if let (Ok(regs), Ok(mut seen), Ok(mut queue)) = (s.regs.lock(), s.seen.lock(), s.queue.lock())
    {
        for arm in &arms {
            let Some(n) = &arm.nvml else { continue };
            for reg in regs
                .iter()
                .filter(|r| r.uuid.eq_ignore_ascii_case(&arm.uuid))
            {
                // A real event reaches only the sets registered before it happened.
                if arm.armed_at_ms < reg.at_ms
                    || !seen.insert((arm.fault.clone(), reg.uuid.clone()))
                {
                    continue;
                }
                let event = |t: u64, data: u64| EventData {
                    device: reg.device,
                    event_type: t,
                    event_data: data,
                    // Not tied to a MIG instance, as real NVML says it.
                    gpu_instance_id: u32::MAX,
                    compute_instance_id: u32::MAX,
                };
                if reg.types & EVENT_XID_CRITICAL != 0 {
                    queue.push(event(EVENT_XID_CRITICAL, arm.xid as u64));
                }
                if reg.types & EVENT_DOUBLE_BIT_ECC != 0 && n.uncorrected > 0 {
                    queue.push(event(EVENT_DOUBLE_BIT_ECC, 0));
                }
                say(
                    &format!("event-{}-{}", arm.fault, arm.uuid),
                    &format!(
                        "delivering Xid {} on {} to a registered event set",
                        arm.xid, arm.uuid
                    ),
                );
            }
        }
        if !queue.is_empty() {
            return Some(queue.remove(0));
        }
    }
    None
}

fn wait(
    set: *mut c_void,
    data: *mut EventData,
    timeout_ms: c_uint,
    real_name: &'static str,
) -> NvmlReturn {
    if data.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    let Some(s) = our_set(set) else {
        return NVML_ERROR_INVALID_ARGUMENT;
    };
    let deadline = Instant::now() + Duration::from_millis(timeout_ms as u64);
    loop {
        if let Some(e) = next_event(s) {
            // SAFETY: checked for null.
            unsafe { *data = e };
            return NVML_SUCCESS;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let slice = left.min(gpuchaos_xid_arm::REFRESH);
        if !s.real.is_null() && real_fn(real_name).is_some() {
            let r = call_real!(
                real_name,
                fn(*mut c_void, *mut EventData, c_uint),
                s.real,
                data,
                slice.as_millis() as c_uint
            );
            if r != NVML_ERROR_TIMEOUT {
                return r;
            }
        } else {
            std::thread::sleep(slice);
        }
        if Instant::now() >= deadline {
            return NVML_ERROR_TIMEOUT;
        }
    }
}

/// # Safety
/// `data` must be a valid pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetWait_v2(
    set: *mut c_void,
    data: *mut EventData,
    timeout_ms: c_uint,
) -> NvmlReturn {
    wait(set, data, timeout_ms, "nvmlEventSetWait_v2")
}

/// # Safety
/// `data` must be a valid pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetWait(
    set: *mut c_void,
    data: *mut EventData,
    timeout_ms: c_uint,
) -> NvmlReturn {
    wait(set, data, timeout_ms, "nvmlEventSetWait")
}

/// # Safety
/// NVML's contract for nvmlEventSetFree (the handles are checked: unknown ones are refused).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetFree(set: *mut c_void) -> NvmlReturn {
    let known = state()
        .sets
        .lock()
        .map(|mut sets| sets.remove(&(set as usize)))
        .unwrap_or(false);
    if !known {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: made by nvmlEventSetCreate with Box::into_raw, and just removed from
    // the live sets, so freed once.
    let s = unsafe { Box::from_raw(set as *mut EventSet) };
    if !s.real.is_null() {
        let _ = call_real!("nvmlEventSetFree", fn(*mut c_void), s.real);
    }
    NVML_SUCCESS
}

//! The few CUDA driver API calls gpuchaos makes (the agent's GPU memory and compute
//! helpers, the reference stack's workers): contexts, memory, and one hand-written
//! PTX kernel ([`SPIN_PTX`]) loaded, launched and timed with events. Loaded at run
//! time from libcuda.so.1 (or `--cuda-lib`) with libloading, so that every failure is
//! a `Result` (cudarc panics when libcuda is missing), and what uses it builds and
//! runs without a GPU.
//!
//! Calling into a C library is unsafe by nature; this crate is the one place in the
//! workspace that does it for CUDA, so that the crates using it keep `unsafe_code`
//! denied. Each call passes pointers to locals that outlive the call.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_uint, c_void};

type CuResult = c_int;
type CuInit = unsafe extern "C" fn(c_uint) -> CuResult;
type CuDeviceGetCount = unsafe extern "C" fn(*mut c_int) -> CuResult;
type CuDeviceGet = unsafe extern "C" fn(*mut c_int, c_int) -> CuResult;
type CuDeviceGetUuid = unsafe extern "C" fn(*mut u8, c_int) -> CuResult;
type CuCtxCreate = unsafe extern "C" fn(*mut *mut c_void, c_uint, c_int) -> CuResult;
type CuCtxDestroy = unsafe extern "C" fn(*mut c_void) -> CuResult;
type CuMemAlloc = unsafe extern "C" fn(*mut u64, usize) -> CuResult;
type CuMemFree = unsafe extern "C" fn(u64) -> CuResult;
type CuMemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> CuResult;
type CuGetErrorName = unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult;
type CuDeviceGetAttribute = unsafe extern "C" fn(*mut c_int, c_int, c_int) -> CuResult;
type CuCtxSetCurrent = unsafe extern "C" fn(*mut c_void) -> CuResult;
type CuCtxSynchronize = unsafe extern "C" fn() -> CuResult;
type CuModuleLoadData = unsafe extern "C" fn(*mut *mut c_void, *const c_void) -> CuResult;
type CuModuleUnload = unsafe extern "C" fn(*mut c_void) -> CuResult;
type CuModuleGetFunction =
    unsafe extern "C" fn(*mut *mut c_void, *mut c_void, *const c_char) -> CuResult;
type CuLaunchKernel = unsafe extern "C" fn(
    *mut c_void,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    *mut c_void,
    *mut *mut c_void,
    *mut *mut c_void,
) -> CuResult;
type CuEventCreate = unsafe extern "C" fn(*mut *mut c_void, c_uint) -> CuResult;
type CuEventRecord = unsafe extern "C" fn(*mut c_void, *mut c_void) -> CuResult;
type CuEventSynchronize = unsafe extern "C" fn(*mut c_void) -> CuResult;
type CuEventElapsedTime = unsafe extern "C" fn(*mut f32, *mut c_void, *mut c_void) -> CuResult;
type CuEventDestroy = unsafe extern "C" fn(*mut c_void) -> CuResult;

pub const CUDA_ERROR_OUT_OF_MEMORY: c_int = 2;
/// `cuEventElapsedTime` before the later event completed.
pub const CUDA_ERROR_NOT_READY: c_int = 600;
/// `CU_DEVICE_ATTRIBUTE_CLOCK_RATE`: the peak SM clock, in kHz.
pub const CU_DEVICE_ATTRIBUTE_CLOCK_RATE: c_int = 13;
/// `CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT`: the number of SMs.
pub const CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: c_int = 16;

/// A CUDA driver API error: the code and its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaError {
    pub code: c_int,
    pub name: String,
    pub call: &'static str,
}

impl std::fmt::Display for CudaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed: {} ({})", self.call, self.name, self.code)?;
        let hint = match self.code {
            100 => {
                ": no CUDA device is visible (driver not loaded, or CUDA_VISIBLE_DEVICES hides them)"
            }
            101 => ": no such device",
            2 => ": not enough free memory on the device",
            3 => ": cuInit was not called",
            34 => {
                ": this libcuda is the CUDA toolkit's stub library, not the driver's: point --cuda-lib at the driver's libcuda.so.1"
            }
            46 => {
                ": the device is busy or unavailable (EXCLUSIVE_PROCESS compute mode with a workload on it?): check nvidia-smi -q -d COMPUTE"
            }
            304 => {
                ": an OS call failed (permissions on /dev/nvidia*, or /dev/nvidia-uvm missing): run the agent as root and load nvidia-uvm"
            }
            200 | 218 => ": the driver rejected the kernel's PTX",
            209 => ": no kernel image for this GPU (the PTX could not be JIT-compiled for it)",
            222 => {
                ": the driver is older than the kernel's PTX ISA version: update the NVIDIA driver"
            }
            500 => ": no such kernel in the module",
            700 | 719 => ": a kernel failed on the device (the context is now unusable)",
            701 => ": the launch asks for more resources (threads, registers) than the GPU has",
            702 => {
                ": a kernel hit the display watchdog's time limit (is this GPU driving a display?)"
            }
            800 => ": not permitted: run the agent as root",
            999 => {
                ": unknown driver error (is the nvidia-uvm module loaded? any Xid errors in dmesg?)"
            }
            _ => "",
        };
        f.write_str(hint)
    }
}

/// libcuda, loaded; the symbols resolved once.
pub struct Cuda {
    init: CuInit,
    device_get_count: CuDeviceGetCount,
    device_get: CuDeviceGet,
    device_get_uuid: CuDeviceGetUuid,
    ctx_create: CuCtxCreate,
    ctx_destroy: CuCtxDestroy,
    mem_alloc: CuMemAlloc,
    mem_free: CuMemFree,
    mem_get_info: CuMemGetInfo,
    get_error_name: Option<CuGetErrorName>,
    /// The calls that run kernels: resolved when the library has them all (every
    /// real libcuda does), or why not, said when a kernel is asked for.
    kernels: Result<KernelApi, String>,
    // Last: the symbols above point into it.
    _lib: libloading::Library,
}

/// The default library name, resolved by the dynamic loader.
pub const DEFAULT_LIB: &str = "libcuda.so.1";

impl Cuda {
    /// Loads the library and resolves every symbol; an error names what is missing.
    pub fn open(path: Option<&std::path::Path>) -> Result<Cuda, String> {
        let shown = path
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| DEFAULT_LIB.to_string());
        // SAFETY: loading a shared library runs its initialisers; libcuda's (or the
        // fake driver's) are what the operator asked for.
        let lib = unsafe {
            match path {
                Some(p) => libloading::Library::new(p),
                None => libloading::Library::new(DEFAULT_LIB),
            }
        }
        .map_err(|e| {
            format!("no CUDA driver: {shown} could not be loaded ({e}); install the NVIDIA driver or point --cuda-lib at libcuda.so.1")
        })?;
        macro_rules! sym {
            ($name:literal, $ty:ty) => {{
                // SAFETY: the type is the CUDA driver API's signature for this symbol.
                let s: Result<libloading::Symbol<'_, $ty>, _> = unsafe { lib.get($name) };
                *s.map_err(|e| {
                    format!(
                        "{shown} lacks {}: {e} (is it really libcuda?)",
                        String::from_utf8_lossy(&$name[..$name.len() - 1])
                    )
                })?
            }};
        }
        let init = sym!(b"cuInit\0", CuInit);
        let device_get_count = sym!(b"cuDeviceGetCount\0", CuDeviceGetCount);
        let device_get = sym!(b"cuDeviceGet\0", CuDeviceGet);
        // The _v2 form also returns MIG instances' UUIDs; older drivers lack it.
        // SAFETY: the CUDA driver API's signature for this symbol.
        let device_get_uuid = match unsafe { lib.get::<CuDeviceGetUuid>(b"cuDeviceGetUuid_v2\0") } {
            Ok(s) => *s,
            Err(_) => sym!(b"cuDeviceGetUuid\0", CuDeviceGetUuid),
        };
        let ctx_create = sym!(b"cuCtxCreate_v2\0", CuCtxCreate);
        let ctx_destroy = sym!(b"cuCtxDestroy_v2\0", CuCtxDestroy);
        let mem_alloc = sym!(b"cuMemAlloc_v2\0", CuMemAlloc);
        let mem_free = sym!(b"cuMemFree_v2\0", CuMemFree);
        let mem_get_info = sym!(b"cuMemGetInfo_v2\0", CuMemGetInfo);
        // SAFETY: as above; optional, only used for error names.
        let get_error_name = unsafe { lib.get::<CuGetErrorName>(b"cuGetErrorName\0") }
            .ok()
            .map(|s| *s);
        // Only what runs kernels needs these: memory alone works without them.
        let kernels = (|| -> Result<KernelApi, String> {
            Ok(KernelApi {
                device_get_attribute: sym!(b"cuDeviceGetAttribute\0", CuDeviceGetAttribute),
                ctx_set_current: sym!(b"cuCtxSetCurrent\0", CuCtxSetCurrent),
                ctx_synchronize: sym!(b"cuCtxSynchronize\0", CuCtxSynchronize),
                module_load_data: sym!(b"cuModuleLoadData\0", CuModuleLoadData),
                module_unload: sym!(b"cuModuleUnload\0", CuModuleUnload),
                module_get_function: sym!(b"cuModuleGetFunction\0", CuModuleGetFunction),
                launch_kernel: sym!(b"cuLaunchKernel\0", CuLaunchKernel),
                event_create: sym!(b"cuEventCreate\0", CuEventCreate),
                event_record: sym!(b"cuEventRecord\0", CuEventRecord),
                event_synchronize: sym!(b"cuEventSynchronize\0", CuEventSynchronize),
                event_elapsed_time: sym!(b"cuEventElapsedTime\0", CuEventElapsedTime),
                event_destroy: sym!(b"cuEventDestroy_v2\0", CuEventDestroy),
            })
        })();
        Ok(Cuda {
            init,
            device_get_count,
            device_get,
            device_get_uuid,
            ctx_create,
            ctx_destroy,
            mem_alloc,
            mem_free,
            mem_get_info,
            get_error_name,
            kernels,
            _lib: lib,
        })
    }

    fn check(&self, code: CuResult, call: &'static str) -> Result<(), CudaError> {
        if code == 0 {
            return Ok(());
        }
        let mut name: *const c_char = std::ptr::null();
        let name = match self.get_error_name {
            // SAFETY: `name` is a local the call writes a static string pointer into.
            Some(f) if unsafe { f(code, &mut name) } == 0 && !name.is_null() => {
                // SAFETY: the driver returns a NUL-terminated static string.
                unsafe { std::ffi::CStr::from_ptr(name) }
                    .to_string_lossy()
                    .into_owned()
            }
            _ => format!("CUDA error {code}"),
        };
        Err(CudaError { code, name, call })
    }

    pub fn init(&self) -> Result<(), CudaError> {
        // SAFETY: no pointers.
        self.check(unsafe { (self.init)(0) }, "cuInit")
    }

    pub fn device_count(&self) -> Result<i32, CudaError> {
        let mut n: c_int = 0;
        // SAFETY: `n` outlives the call.
        self.check(
            unsafe { (self.device_get_count)(&mut n) },
            "cuDeviceGetCount",
        )?;
        Ok(n)
    }

    /// The device's UUID in NVML's form (`GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`).
    pub fn device_uuid(&self, ordinal: i32) -> Result<String, CudaError> {
        let mut dev: c_int = 0;
        // SAFETY: `dev` outlives the call.
        self.check(
            unsafe { (self.device_get)(&mut dev, ordinal) },
            "cuDeviceGet",
        )?;
        let mut b = [0u8; 16];
        // SAFETY: `b` has the 16 bytes the call writes.
        self.check(
            unsafe { (self.device_get_uuid)(b.as_mut_ptr(), dev) },
            "cuDeviceGetUuid",
        )?;
        let h: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
        Ok(format!(
            "GPU-{}-{}-{}-{}-{}",
            h[0..4].concat(),
            h[4..6].concat(),
            h[6..8].concat(),
            h[8..10].concat(),
            h[10..16].concat()
        ))
    }

    /// Creates a context on the device and makes it current on this thread. Dropping the
    /// context destroys it; [`Context::destroy`] does too, and says whether it could.
    pub fn ctx_create(&self, ordinal: i32) -> Result<Context<'_>, CudaError> {
        let mut dev: c_int = 0;
        // SAFETY: `dev` outlives the call.
        self.check(
            unsafe { (self.device_get)(&mut dev, ordinal) },
            "cuDeviceGet",
        )?;
        let mut ctx: *mut c_void = std::ptr::null_mut();
        // SAFETY: `ctx` outlives the call.
        self.check(
            unsafe { (self.ctx_create)(&mut ctx, 0, dev) },
            "cuCtxCreate",
        )?;
        Ok(Context {
            cuda: self,
            raw: ctx,
        })
    }

    /// Only for [`Context`], which calls it once.
    fn ctx_destroy(&self, ctx: *mut c_void) -> Result<(), CudaError> {
        // SAFETY: a context this library created, not yet destroyed: its `Context`
        // owned it until now.
        self.check(unsafe { (self.ctx_destroy)(ctx) }, "cuCtxDestroy")
    }

    pub fn mem_alloc(&self, bytes: usize) -> Result<u64, CudaError> {
        let mut ptr: u64 = 0;
        // SAFETY: `ptr` outlives the call.
        self.check(unsafe { (self.mem_alloc)(&mut ptr, bytes) }, "cuMemAlloc")?;
        Ok(ptr)
    }

    pub fn mem_free(&self, ptr: u64) -> Result<(), CudaError> {
        // SAFETY: a device pointer this library returned.
        self.check(unsafe { (self.mem_free)(ptr) }, "cuMemFree")
    }

    /// (free, total) on the current context's device.
    pub fn mem_get_info(&self) -> Result<(u64, u64), CudaError> {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: both locals outlive the call.
        self.check(
            unsafe { (self.mem_get_info)(&mut free, &mut total) },
            "cuMemGetInfo",
        )?;
        Ok((free as u64, total as u64))
    }
}

/// The driver calls that load and run kernels, and time them.
#[derive(Clone, Copy)]
struct KernelApi {
    device_get_attribute: CuDeviceGetAttribute,
    ctx_set_current: CuCtxSetCurrent,
    ctx_synchronize: CuCtxSynchronize,
    module_load_data: CuModuleLoadData,
    module_unload: CuModuleUnload,
    module_get_function: CuModuleGetFunction,
    launch_kernel: CuLaunchKernel,
    event_create: CuEventCreate,
    event_record: CuEventRecord,
    event_synchronize: CuEventSynchronize,
    event_elapsed_time: CuEventElapsedTime,
    event_destroy: CuEventDestroy,
}

/// The spin kernel's entry point in [`SPIN_PTX`].
pub const SPIN_ENTRY: &str = "gpuchaos_spin";

/// A kernel that keeps its threads busy for a number of SM clock cycles (its one
/// `u64` parameter), spinning on `clock64`: the load of the `gpu_compute` fault, and
/// the reference workers' "generation". Written by hand as PTX (ISA 6.0, sm_52), so
/// that no CUDA compiler is needed to build, and the driver JIT-compiles it for any
/// GPU from Maxwell on.
pub const SPIN_PTX: &str = r#"//
// gpuchaos spin kernel: each thread spins until `cycles` SM clock cycles passed.
//
.version 6.0
.target sm_52
.address_size 64

.visible .entry gpuchaos_spin(
	.param .u64 gpuchaos_spin_param_0
)
{
	.reg .pred 	%p<2>;
	.reg .b64 	%rd<5>;

	ld.param.u64 	%rd1, [gpuchaos_spin_param_0];
	mov.u64 	%rd2, %clock64;
$L__spin:
	mov.u64 	%rd3, %clock64;
	sub.s64 	%rd4, %rd3, %rd2;
	setp.lt.s64 	%p1, %rd4, %rd1;
	@%p1 bra 	$L__spin;
	ret;
}
"#;

/// A context as a plain handle, to make it current on another thread
/// ([`Cuda::set_current`]). A handle to a destroyed context is an error there, not
/// undefined behaviour: the driver checks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtxHandle(usize);

impl Cuda {
    fn kernels(&self) -> Result<&KernelApi, CudaError> {
        self.kernels.as_ref().map_err(|e| CudaError {
            code: -1,
            name: e.clone(),
            call: "loading the kernel API",
        })
    }

    /// Whether this library can run kernels (it has every call that needs), or what
    /// it lacks.
    pub fn can_run_kernels(&self) -> Result<(), String> {
        self.kernels.as_ref().map(|_| ()).map_err(Clone::clone)
    }

    /// An attribute of the device (`CU_DEVICE_ATTRIBUTE_*`).
    pub fn device_attribute(&self, ordinal: i32, attribute: c_int) -> Result<i32, CudaError> {
        let k = self.kernels()?;
        let mut dev: c_int = 0;
        // SAFETY: `dev` outlives the call.
        self.check(
            unsafe { (self.device_get)(&mut dev, ordinal) },
            "cuDeviceGet",
        )?;
        let mut v: c_int = 0;
        // SAFETY: `v` outlives the call.
        self.check(
            unsafe { (k.device_get_attribute)(&mut v, attribute, dev) },
            "cuDeviceGetAttribute",
        )?;
        Ok(v)
    }

    /// Makes a context current on the calling thread.
    pub fn set_current(&self, ctx: CtxHandle) -> Result<(), CudaError> {
        let k = self.kernels()?;
        // SAFETY: the driver checks the handle; no pointer is written.
        self.check(
            unsafe { (k.ctx_set_current)(ctx.0 as *mut c_void) },
            "cuCtxSetCurrent",
        )
    }

    /// Waits until every kernel launched in the current context has finished.
    pub fn ctx_synchronize(&self) -> Result<(), CudaError> {
        let k = self.kernels()?;
        // SAFETY: no pointers.
        self.check(unsafe { (k.ctx_synchronize)() }, "cuCtxSynchronize")
    }

    /// Loads [`SPIN_PTX`] into the current context (the driver JIT-compiles it).
    pub fn spin_kernel(&self) -> Result<SpinKernel<'_>, CudaError> {
        let k = self.kernels()?;
        let ptx = std::ffi::CString::new(SPIN_PTX).map_err(|_| CudaError {
            code: 1,
            name: "the PTX holds a NUL byte".into(),
            call: "cuModuleLoadData",
        })?;
        let mut module: *mut c_void = std::ptr::null_mut();
        // SAFETY: `module` outlives the call; `ptx` is a NUL-terminated image that
        // outlives it too.
        self.check(
            unsafe { (k.module_load_data)(&mut module, ptx.as_ptr() as *const c_void) },
            "cuModuleLoadData",
        )?;
        let module = Module {
            cuda: self,
            raw: module,
        };
        let name = std::ffi::CString::new(SPIN_ENTRY).map_err(|_| CudaError {
            code: 1,
            name: "the entry name holds a NUL byte".into(),
            call: "cuModuleGetFunction",
        })?;
        let mut func: *mut c_void = std::ptr::null_mut();
        // SAFETY: `func` outlives the call; `module` is loaded; `name` is
        // NUL-terminated.
        self.check(
            unsafe { (k.module_get_function)(&mut func, module.raw, name.as_ptr()) },
            "cuModuleGetFunction",
        )?;
        if func.is_null() {
            return Err(CudaError {
                code: 500,
                name: "CUDA_ERROR_NOT_FOUND".into(),
                call: "cuModuleGetFunction",
            });
        }
        Ok(SpinKernel { module, func })
    }

    /// A timing event in the current context.
    pub fn event(&self) -> Result<Event<'_>, CudaError> {
        let k = self.kernels()?;
        let mut ev: *mut c_void = std::ptr::null_mut();
        // SAFETY: `ev` outlives the call. Flags 0: timing enabled.
        self.check(unsafe { (k.event_create)(&mut ev, 0) }, "cuEventCreate")?;
        Ok(Event {
            cuda: self,
            raw: ev,
        })
    }
}

/// A loaded module, unloaded when dropped.
struct Module<'a> {
    cuda: &'a Cuda,
    raw: *mut c_void,
}

impl Drop for Module<'_> {
    fn drop(&mut self) {
        if let Ok(k) = self.cuda.kernels() {
            // SAFETY: a module this library loaded, unloaded once (here). A module
            // whose context is gone is an error code, ignored: nothing to free.
            let _ = unsafe { (k.module_unload)(self.raw) };
        }
    }
}

/// [`SPIN_PTX`], loaded: launch it for a number of cycles.
///
/// It is `Send` and `Sync`: the driver API is thread-safe, and a launch from a thread
/// where the module's context is not current fails with an error code.
pub struct SpinKernel<'a> {
    module: Module<'a>,
    func: *mut c_void,
}

// SAFETY: the handles are opaque values the driver validates on every call, and the
// driver API may be called from any thread.
unsafe impl Send for SpinKernel<'_> {}
// SAFETY: as above; launching takes no Rust-side mutable state.
unsafe impl Sync for SpinKernel<'_> {}

/// The most threads a block may have.
pub const MAX_BLOCK_THREADS: u32 = 1024;

impl SpinKernel<'_> {
    /// Launches `blocks` blocks of `threads` threads, each spinning for `cycles` SM
    /// clock cycles, on the current context's default stream. Returns at once (the
    /// kernel runs asynchronously).
    pub fn launch(&self, blocks: u32, threads: u32, cycles: u64) -> Result<(), CudaError> {
        let cuda = self.module.cuda;
        let k = cuda.kernels()?;
        if blocks == 0 || threads == 0 || threads > MAX_BLOCK_THREADS {
            return Err(CudaError {
                code: 1,
                name: format!(
                    "CUDA_ERROR_INVALID_VALUE ({blocks} blocks of {threads} threads: both must be above 0, threads at most {MAX_BLOCK_THREADS})"
                ),
                call: "cuLaunchKernel",
            });
        }
        // The kernel takes one u64: its parameter array has one pointer, to a local
        // u64 that outlives the call (the driver copies parameters at launch).
        let mut arg: u64 = cycles;
        let mut params: [*mut c_void; 1] = [&mut arg as *mut u64 as *mut c_void];
        // SAFETY: `func` is the spin kernel's entry, whose one parameter is a u64;
        // `params` points to it; no extra options (null).
        self.module.cuda.check(
            unsafe {
                (k.launch_kernel)(
                    self.func,
                    blocks,
                    1,
                    1,
                    threads,
                    1,
                    1,
                    0,
                    std::ptr::null_mut(),
                    params.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            },
            "cuLaunchKernel",
        )
    }
}

/// A timing event, destroyed when dropped.
pub struct Event<'a> {
    cuda: &'a Cuda,
    raw: *mut c_void,
}

impl Event<'_> {
    /// Records the event on the default stream: it completes when the work launched
    /// before it has.
    pub fn record(&self) -> Result<(), CudaError> {
        let k = self.cuda.kernels()?;
        // SAFETY: an event this library created; the default stream (null).
        self.cuda.check(
            unsafe { (k.event_record)(self.raw, std::ptr::null_mut()) },
            "cuEventRecord",
        )
    }

    /// Waits until the event completed.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        let k = self.cuda.kernels()?;
        // SAFETY: an event this library created.
        self.cuda.check(
            unsafe { (k.event_synchronize)(self.raw) },
            "cuEventSynchronize",
        )
    }

    /// Milliseconds from `start` to this event (both recorded and completed).
    pub fn elapsed_ms_since(&self, start: &Event<'_>) -> Result<f32, CudaError> {
        let k = self.cuda.kernels()?;
        let mut ms: f32 = 0.0;
        // SAFETY: `ms` outlives the call; both events were created by this library.
        self.cuda.check(
            unsafe { (k.event_elapsed_time)(&mut ms, start.raw, self.raw) },
            "cuEventElapsedTime",
        )?;
        Ok(ms)
    }
}

impl Drop for Event<'_> {
    fn drop(&mut self) {
        if let Ok(k) = self.cuda.kernels() {
            // SAFETY: an event this library created, destroyed once (here).
            let _ = unsafe { (k.event_destroy)(self.raw) };
        }
    }
}

/// A CUDA context, which owns its destruction: dropping it destroys it (and with it
/// every allocation made in it), or [`Context::destroy`] does and says whether it could.
/// It borrows the [`Cuda`] that created it, so the library cannot be unloaded under it,
/// and it stays on the thread that created it, where it is current.
///
/// A context is destroyed once, so destroying it again does not compile:
///
/// ```compile_fail
/// fn twice(cuda: &gpuchaos_cuda::Cuda) -> Result<(), gpuchaos_cuda::CudaError> {
///     let ctx = cuda.ctx_create(0)?;
///     ctx.destroy()?;
///     ctx.destroy()
/// }
/// ```
pub struct Context<'a> {
    cuda: &'a Cuda,
    raw: *mut c_void,
}

impl Context<'_> {
    /// The context as a handle, to make it current on another thread
    /// ([`Cuda::set_current`]).
    pub fn handle(&self) -> CtxHandle {
        CtxHandle(self.raw as usize)
    }

    /// Destroys the context now (cuCtxDestroy), for a caller that wants the error.
    pub fn destroy(self) -> Result<(), CudaError> {
        // Not dropped: Drop would destroy it a second time.
        let this = std::mem::ManuallyDrop::new(self);
        this.cuda.ctx_destroy(this.raw)
    }
}

impl Drop for Context<'_> {
    fn drop(&mut self) {
        // No one to tell: a context the driver could not destroy is freed with the
        // process.
        let _ = self.cuda.ctx_destroy(self.raw);
    }
}

impl std::fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Context").field(&self.raw).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    #[test]
    fn a_missing_library_is_an_error_that_says_what_to_do() {
        let e = Cuda::open(Some(Path::new("/nonexistent/libcuda.so.1")))
            .err()
            .unwrap();
        assert!(
            e.contains("no CUDA driver") && e.contains("--cuda-lib"),
            "{e}"
        );
    }

    #[test]
    fn a_library_that_is_not_libcuda_is_an_error_that_names_the_missing_symbol() {
        let e = Cuda::open(Some(Path::new("libc.so.6"))).err().unwrap();
        assert!(
            e.starts_with("libc.so.6 lacks cuInit: ") && e.ends_with("(is it really libcuda?)"),
            "{e}"
        );
    }

    /// The fake driver (the `gpuchaos-fakegpu` cdylib) next to this test binary's
    /// directory: target/debug/deps/TEST-hash → target/debug/libgpuchaos_fakegpu.so.
    fn fake_driver() -> Option<PathBuf> {
        let exe = std::env::current_exe().ok()?;
        let p = exe.parent()?.parent()?.join("libgpuchaos_fakegpu.so");
        p.exists().then_some(p)
    }

    /// Set in the child that runs the test's body.
    const CHILD: &str = "GPUCHAOS_CUDA_TEST_CHILD";
    const NAME: &str = "tests::a_context_is_destroyed_when_dropped_or_destroyed";
    const KERNEL: &str = "tests::the_spin_kernel_runs_for_its_cycles_and_events_time_it";

    /// Runs test `name`'s body in a child of this test binary with a fake driver
    /// state of its own; true in that child (the caller then runs the body).
    fn in_child(name: &str) -> bool {
        if std::env::var_os(CHILD).is_some() {
            return true;
        }
        let state = std::env::temp_dir().join(format!(
            "gpuchaos-cuda-{}-{}.json",
            name.len(),
            std::process::id()
        ));
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .env("GPUCHAOS_FAKE_GPU_STATE", &state)
            .env("GPUCHAOS_FAKE_GPUS", "1x8GiB")
            .env("GPUCHAOS_FAKE_GPU_CONTEXT", "64MiB")
            .env_remove("GPUCHAOS_FAKE_GPU_DRIVER")
            .env_remove("GPUCHAOS_FAKE_GPU_COMPUTE_MODE")
            .env_remove("GPUCHAOS_FAKE_GPU_SMS")
            .output()
            .unwrap();
        let mut lock = state.clone().into_os_string();
        lock.push(".lock");
        let _ = std::fs::remove_file(&state);
        let _ = std::fs::remove_file(lock);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "the child failed or did not run the test ({}):\n{stdout}\n{stderr}",
            out.status
        );
        false
    }

    #[test]
    fn the_spin_kernel_runs_for_its_cycles_and_events_time_it() {
        let lib = fake_driver().expect(
            "the fake driver is not built: run cargo build --workspace (or -p gpuchaos-fakegpu) first",
        );
        if !in_child(KERNEL) {
            return;
        }
        let cuda = Cuda::open(Some(&lib)).unwrap();
        cuda.can_run_kernels().unwrap();
        cuda.init().unwrap();
        let e = cuda.spin_kernel().err().unwrap();
        assert_eq!(e.name, "CUDA_ERROR_INVALID_CONTEXT", "no context yet: {e}");
        let ctx = cuda.ctx_create(0).unwrap();
        let sms = cuda
            .device_attribute(0, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .unwrap();
        let khz = cuda
            .device_attribute(0, CU_DEVICE_ATTRIBUTE_CLOCK_RATE)
            .unwrap();
        assert_eq!((sms, khz), (132, 1_500_000));
        let k = cuda.spin_kernel().unwrap();
        let (a, b) = (cuda.event().unwrap(), cuda.event().unwrap());
        // 20 ms of cycles, timed by the events and by the wall clock.
        let t = std::time::Instant::now();
        a.record().unwrap();
        k.launch(sms as u32 * 4, 128, khz as u64 * 20).unwrap();
        b.record().unwrap();
        // A launch returns at once (on a loaded machine, the fake's state file can
        // take a few ms to read: the events count that too, as a real launch's
        // latency).
        let launch_ms = t.elapsed().as_secs_f64() * 1000.0;
        if launch_ms < 15.0 {
            assert_eq!(
                b.elapsed_ms_since(&a).err().map(|e| e.code),
                Some(CUDA_ERROR_NOT_READY),
                "not done yet"
            );
        }
        b.synchronize().unwrap();
        let wall = t.elapsed().as_secs_f64() * 1000.0;
        let ms = b.elapsed_ms_since(&a).unwrap() as f64;
        assert!(
            ms >= 19.99 && ms <= 20.5 + launch_ms,
            "{ms} ms by the events ({launch_ms} ms to launch)"
        );
        assert!(wall >= 19.5, "{wall} ms by the wall clock");
        // Queued launches run one after another on the stream.
        let t = std::time::Instant::now();
        for _ in 0..3 {
            k.launch(sms as u32, 128, khz as u64 * 5).unwrap();
        }
        cuda.ctx_synchronize().unwrap();
        assert!(t.elapsed().as_secs_f64() * 1000.0 >= 14.5);
        let e = k.launch(1, 2048, 1).err().unwrap();
        assert!(e.name.contains("INVALID_VALUE"), "{e}");
        drop(k);
        ctx.destroy().unwrap();
    }

    #[test]
    fn a_context_is_destroyed_when_dropped_or_destroyed() {
        // Never a silent pass: scripts/test.sh builds the workspace (and so the fake
        // driver) before the tests run.
        let lib = fake_driver().expect(
            "the fake driver is not built: run cargo build --workspace (or -p gpuchaos-fakegpu) first",
        );
        // The fake driver reads its configuration from the environment: the body runs
        // in a child of this test binary, with its own state file, rather than change
        // this process's environment under other tests' threads.
        if !in_child(NAME) {
            return;
        }

        const CTX: u64 = 64 << 20;
        const ALLOC: u64 = 2 << 20;
        let cuda = Cuda::open(Some(&lib)).unwrap();
        cuda.init().unwrap();
        // What the device holds, seen from the current context.
        let used = || {
            let (free, total) = cuda.mem_get_info().unwrap();
            total - free
        };
        let a = cuda.ctx_create(0).unwrap();
        assert_eq!(used(), CTX);
        let b = cuda.ctx_create(0).unwrap();
        cuda.mem_alloc(ALLOC as usize).unwrap();
        assert_eq!(used(), 2 * CTX + ALLOC);

        drop(a);
        assert_eq!(used(), CTX + ALLOC, "dropping a context destroys it");

        b.destroy().unwrap();
        // b was current: no context is now.
        let e = cuda.mem_get_info().err().unwrap();
        assert_eq!(e.name, "CUDA_ERROR_INVALID_CONTEXT", "{e}");
        let c = cuda.ctx_create(0).unwrap();
        assert_eq!(
            used(),
            CTX,
            "destroy freed the context and its allocation, and only c is left"
        );
        drop(c);
    }
}

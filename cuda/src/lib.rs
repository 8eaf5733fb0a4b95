//! The few CUDA driver API calls gpuchaos makes (the agent's GPU memory helper, the
//! reference stack's workers), loaded at run time from libcuda.so.1 (or `--cuda-lib`)
//! with libloading, so that every failure is a `Result` (cudarc panics when libcuda is
//! missing), and what uses it builds and runs without a GPU.
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

pub const CUDA_ERROR_OUT_OF_MEMORY: c_int = 2;

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
        if std::env::var_os(CHILD).is_none() {
            let state = std::env::temp_dir()
                .join(format!("gpuchaos-cuda-test-{}.json", std::process::id()));
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
                .env(CHILD, "1")
                .env("GPUCHAOS_FAKE_GPU_STATE", &state)
                .env("GPUCHAOS_FAKE_GPUS", "1x8GiB")
                .env("GPUCHAOS_FAKE_GPU_CONTEXT", "64MiB")
                .env_remove("GPUCHAOS_FAKE_GPU_DRIVER")
                .env_remove("GPUCHAOS_FAKE_GPU_COMPUTE_MODE")
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

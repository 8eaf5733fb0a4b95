//! The arm-file protocol between the agent (`kind: gpu_xid`) and the interposers
//! (`libgpuchaos_cuda_interpose.so`, `libgpuchaos_nvml_interpose.so`).
//!
//! The arm directory (agent flag `--xid-dir`, interposers' `GPUCHAOS_XID_DIR`,
//! default `/run/gpuchaos/xid`) holds:
//!
//! - `arm-<GPU UUID>.json`: one per armed GPU, written atomically by the agent
//!   (a temporary file, fsynced, renamed over it) after the fault's intent is
//!   journaled, and removed by its revert. Each carries [`MARKER`] and the fault's
//!   token, so that start-up recovery can sweep every file the agent wrote. It says
//!   what the Xid does at each layer: the interposers hold no Xid table of their own.
//! - `loaded/<layer>-<pid>.json`: one per process that loaded an interposer, written
//!   by the interposer when it is loaded (and rewritten when the process makes a CUDA
//!   context on a new GPU), so that the fault can say which layers are actually
//!   armed. The agent prunes the files of dead processes.
//!
//! Interposers read the directory through [`ArmCache`]: at most once every
//! [`REFRESH`], by one thread at a time (the others keep the previous answer, never
//! waiting on the directory), and a malformed file counts as not armed (said once
//! on stderr).

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Every arm file carries it; the start-up sweep removes only files that do.
pub const MARKER: &str = "gpuchaos-xid";
/// The arm directory when neither the flag nor the variable names one.
pub const DEFAULT_DIR: &str = "/run/gpuchaos/xid";
/// The interposers' variable naming the arm directory.
pub const DIR_ENV: &str = "GPUCHAOS_XID_DIR";
/// How often an interposer looks at the arm directory at most.
pub const REFRESH: Duration = Duration::from_millis(50);

/// What a CUDA call on the armed GPU gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CudaArm {
    /// The error for calls in a context on the GPU (None: unaffected).
    pub in_context: Option<i32>,
    /// The error for a new context on the GPU (None: new contexts work).
    pub new_context: Option<i32>,
}

/// What NVML answers about the armed GPU.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NvmlArm {
    /// Device queries answer NVML_ERROR_GPU_IS_LOST.
    pub lost: bool,
    pub uncorrected: u64,
    pub retired_dbe_pages: u64,
    pub remapped_uncorrectable: u64,
    pub remap_failure: bool,
}

/// One armed GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Arm {
    pub marker: String,
    /// The fault's token (its plan's), so that a revert removes only its own file.
    pub fault: String,
    pub uuid: String,
    pub index: u32,
    pub xid: u32,
    /// Wall-clock milliseconds since the epoch.
    pub armed_at_ms: u64,
    /// A self-clearing Xid hits until then; None: latched, until the file goes.
    pub clears_at_ms: Option<u64>,
    /// None: the layer is off.
    pub cuda: Option<CudaArm>,
    pub nvml: Option<NvmlArm>,
}

impl Arm {
    /// Whether the Xid still hits at `now_ms`.
    pub fn hitting(&self, now_ms: u64) -> bool {
        self.clears_at_ms.is_none_or(|c| now_ms < c)
    }
}

/// A process that loaded an interposer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Loaded {
    pub pid: u32,
    /// `cuda` or `nvml`.
    pub layer: String,
    pub comm: String,
    /// /proc/PID/stat's start time, so that a reused pid is not mistaken for it.
    pub start_time: u64,
    /// The GPUs (UUIDs) it made CUDA contexts on (the CUDA layer only).
    #[serde(default)]
    pub gpus: Vec<String>,
}

/// Wall-clock milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The arm directory named by [`DIR_ENV`], or [`DEFAULT_DIR`].
pub fn dir_from_env() -> PathBuf {
    std::env::var_os(DIR_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
}

/// The arm file of one GPU.
pub fn arm_path(dir: &Path, uuid: &str) -> PathBuf {
    dir.join(format!("arm-{uuid}.json"))
}

pub fn loaded_dir(dir: &Path) -> PathBuf {
    dir.join("loaded")
}

/// Writes `bytes` to `path` atomically: a temporary file beside it (mode 0644),
/// fsynced, renamed over it, and the directory fsynced.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::hash::{BuildHasher, Hasher};
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A fresh name nobody can guess or have planted (create_new, no symlink followed).
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    let tmp = dir.join(format!(
        ".{name}.tmp.{}.{:016x}",
        std::process::id(),
        h.finish()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits() | nix::fcntl::OFlag::O_CLOEXEC.bits())
        .open(&tmp)?;
    // Readable by every workload whatever the writer's umask (the agent's may be
    // 077): the interposers of non-root workloads read the arm files.
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    let r = f.write_all(bytes).and_then(|()| f.sync_all());
    drop(f);
    if let Err(e) = r.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The most of one file the arm directory's readers take.
pub const MAX_FILE: u64 = 64 << 10;

/// Reads a file of the (world-writable) arm directory without trusting it: no
/// symlink followed, never blocking (a FIFO is opened O_NONBLOCK and refused), only a
/// regular file, at most [`MAX_FILE`] bytes (a larger one is an error). Returns the
/// bytes and the file's owner uid.
pub fn read_untrusted(path: &Path) -> std::io::Result<(Vec<u8>, u32)> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(
            nix::fcntl::OFlag::O_NOFOLLOW.bits()
                | nix::fcntl::OFlag::O_NONBLOCK.bits()
                | nix::fcntl::OFlag::O_CLOEXEC.bits(),
        )
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "it is not a regular file",
        ));
    }
    let mut b = Vec::new();
    f.take(MAX_FILE + 1).read_to_end(&mut b)?;
    if b.len() as u64 > MAX_FILE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "it is larger than 64 KiB",
        ));
    }
    Ok((b, meta.uid()))
}

/// Every arm file in `dir`: the ones that parse and carry the marker, and the
/// paths of those that do not (with why).
pub fn read_arms(dir: &Path) -> (Vec<Arm>, Vec<(PathBuf, String)>) {
    let mut arms = Vec::new();
    let mut bad = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (arms, bad);
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("arm-") && name.ends_with(".json")) {
            continue;
        }
        let path = e.path();
        match read_untrusted(&path) {
            Ok((b, _)) => match serde_json::from_slice::<Arm>(&b) {
                Ok(a) if a.marker == MARKER => arms.push(a),
                Ok(_) => bad.push((path, format!("it lacks the marker {MARKER:?}"))),
                Err(e) => bad.push((path, e.to_string())),
            },
            // Removed between the listing and the read: not armed.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            // A symlink, FIFO, device, or too large: not armed.
            Err(e) => bad.push((path, e.to_string())),
        }
    }
    arms.sort_by(|a, b| a.uuid.cmp(&b.uuid));
    (arms, bad)
}

/// The start time of a live process (None when it is gone or a zombie).
pub fn start_time(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if matches!(fields.first()?.chars().next()?, 'Z' | 'X') {
        return None;
    }
    fields.get(19)?.parse().ok()
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Registers this process as having loaded the `layer` interposer (its file in
/// `loaded/`), with the GPUs it uses so far. Returns the file.
pub fn register(dir: &Path, layer: &str, gpus: &[String]) -> Result<PathBuf, String> {
    let pid = std::process::id();
    let ld = loaded_dir(dir);
    std::fs::create_dir_all(&ld).map_err(|e| format!("cannot create {}: {e}", ld.display()))?;
    let rec = Loaded {
        pid,
        layer: layer.to_string(),
        comm: comm(pid),
        start_time: start_time(pid).unwrap_or(0),
        gpus: gpus.to_vec(),
    };
    let path = ld.join(format!("{layer}-{pid}.json"));
    let json = serde_json::to_vec(&rec).map_err(|e| e.to_string())?;
    write_atomic(&path, &json).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}

/// The processes alive now that loaded an interposer; the files of dead ones (or of
/// a pid reused by another process) are removed. A registration counts only when it
/// is a regular file named `<layer>-<pid>.json` for the pid and layer it records, with
/// a non-zero start time equal to that process's, owned by root or by the process's
/// uid: anyone may write into the sticky `loaded/`, and a forged file (another
/// process's pid, no start time) does not make a layer armed.
pub fn read_loaded(dir: &Path) -> Vec<Loaded> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(loaded_dir(dir)) else {
        return out;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        let (b, owner) = match read_untrusted(&path) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            // Not a regular file (a FIFO, a symlink) or too large: not a
            // registration, left for its owner.
            Err(_) => continue,
        };
        match serde_json::from_slice::<Loaded>(&b) {
            Ok(l) if name == format!("{}-{}.json", l.layer, l.pid) && l.start_time != 0 => {
                let alive = start_time(l.pid);
                if alive != Some(l.start_time) {
                    // Dead, or the pid is another process's now.
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
                let uid = std::fs::metadata(format!("/proc/{}", l.pid)).map(|m| m.uid());
                if owner == 0 || uid.is_ok_and(|u| u == owner) {
                    out.push(l)
                }
            }
            // Malformed or forged: not counted (and not removed: it may be a
            // registration being written by another writer's rename).
            _ => {}
        }
    }
    out.sort_by_key(|l| l.pid);
    out
}

/// The interposers' view of the arm directory, refreshed at most every [`REFRESH`].
#[derive(Debug)]
pub struct ArmCache {
    dir: PathBuf,
    /// Held by the one thread refreshing (try_lock: no one waits for it).
    refresh: Mutex<Cached>,
    /// The last answer, swapped in by the refresher (held only to clone or swap).
    last: RwLock<Vec<Arm>>,
}

#[derive(Debug, Default)]
struct Cached {
    at: Option<Instant>,
    warned: HashSet<PathBuf>,
}

impl ArmCache {
    pub fn new(dir: PathBuf) -> Self {
        ArmCache {
            dir,
            refresh: Mutex::new(Cached::default()),
            last: RwLock::new(Vec::new()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The arms now (cloned). Never waits on the directory: while another thread
    /// refreshes, the previous answer is used.
    pub fn arms(&self) -> Vec<Arm> {
        if let Ok(mut c) = self.refresh.try_lock()
            && c.at.is_none_or(|t| t.elapsed() >= REFRESH)
        {
            let (arms, bad) = read_arms(&self.dir);
            for (p, why) in bad {
                if c.warned.insert(p.clone()) {
                    eprintln!(
                        "gpuchaos interposer: ignoring {} ({why}): that GPU is not armed",
                        p.display()
                    );
                }
            }
            if let Ok(mut last) = self.last.write() {
                *last = arms;
            }
            c.at = Some(Instant::now());
        }
        self.last.read().map(|a| a.clone()).unwrap_or_default()
    }

    /// The arm of one GPU, if any.
    pub fn arm_of(&self, uuid: &str) -> Option<Arm> {
        self.arms()
            .into_iter()
            .find(|a| a.uuid.eq_ignore_ascii_case(uuid))
    }
}

/// Defines `open_real()` and `real_symbol(lib, name)` in an interposer: how both
/// load the real library behind them (libcuda, libnvidia-ml) and look its symbols
/// up, written once. A macro, as [`forwarders!`] is, so that the `unsafe` (dlopen,
/// dlsym) and the `libloading` dependency stay in the interposers: this crate is
/// linked into the agent too.
///
/// `open_real()` opens the absolute path in the variable `env` if it is set, else
/// the first of `paths` that loads. A bare name is refused, and so is a library
/// exporting `marker` (a NUL-terminated symbol only the interposer has): either
/// would load the interposer again, which would forward to itself. `what` names the
/// library in the error ("CUDA driver", "NVML").
#[macro_export]
macro_rules! real_library {
    (env: $env:expr, paths: $paths:expr, marker: $marker:expr, what: $what:literal $(,)?) => {
        fn open_real() -> Result<::libloading::os::unix::Library, String> {
            use ::libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
            let candidates: Vec<String> = match ::std::env::var($env) {
                Ok(p) if !p.is_empty() => vec![p],
                _ => $paths.iter().map(|s| s.to_string()).collect(),
            };
            let mut why = Vec::new();
            for path in &candidates {
                if !path.starts_with('/') {
                    why.push(format!(
                        "{path}: not an absolute path (a bare name would load the interposer itself)"
                    ));
                    continue;
                }
                // SAFETY: loading the library the operator named runs its
                // initialisers, as the process's own dlopen would.
                match unsafe { Library::open(Some(path), RTLD_NOW | RTLD_LOCAL) } {
                    Ok(lib) => {
                        // SAFETY: only the symbol's presence is checked.
                        if unsafe { lib.get::<extern "C" fn() -> ::std::ffi::c_int>($marker) }
                            .is_ok()
                        {
                            why.push(format!("{path} is the interposer itself"));
                            continue;
                        }
                        return Ok(lib);
                    }
                    Err(e) => why.push(e.to_string()),
                }
            }
            Err(format!(
                concat!(
                    "the real ",
                    $what,
                    " could not be loaded ({}): set {} to its absolute path"
                ),
                why.join("; "),
                $env
            ))
        }

        /// The address of the real library's `name`, if it has it.
        fn real_symbol(lib: &::libloading::os::unix::Library, name: &str) -> Option<usize> {
            let mut n = name.as_bytes().to_vec();
            n.push(0);
            // SAFETY: only the address is taken; it is called with the signature the
            // caller of the forwarded or wrapped symbol uses.
            unsafe { lib.get::<unsafe extern "C" fn()>(&n) }
                .ok()
                .map(|s| *s as usize)
        }
    };
}

/// Exports, for each name, a function that jumps to the real library's symbol of
/// that name (a tail jump: arguments, return value and stack are the caller's, so
/// it forwards any signature). `resolve_forwarders(lookup, missing)` fills the jump
/// slots: `lookup` returns the real symbol's address, `missing` is the address used
/// for a symbol the real library lacks. The slots must be resolved before any of the
/// functions is called (the interposers do it in their load-time constructor).
#[macro_export]
macro_rules! forwarders {
    ($($name:ident),* $(,)?) => {
        #[allow(non_upper_case_globals)]
        mod forward_slots {
            $(pub static $name: ::core::sync::atomic::AtomicUsize =
                ::core::sync::atomic::AtomicUsize::new(0);)*
        }

        /// Fills every jump slot; returns the names the real library lacks.
        fn resolve_forwarders(
            lookup: &dyn Fn(&str) -> Option<usize>,
            missing: usize,
        ) -> Vec<&'static str> {
            let mut absent = Vec::new();
            $(
                let p = lookup(stringify!($name));
                if p.is_none() {
                    absent.push(stringify!($name));
                }
                forward_slots::$name.store(
                    p.unwrap_or(missing),
                    ::core::sync::atomic::Ordering::SeqCst,
                );
            )*
            absent
        }

        $(
            #[cfg(target_arch = "x86_64")]
            #[unsafe(naked)]
            #[unsafe(no_mangle)]
            #[allow(non_snake_case)]
            pub extern "C" fn $name() {
                ::core::arch::naked_asm!(
                    "jmp qword ptr [rip + {slot}]",
                    slot = sym forward_slots::$name,
                )
            }
            #[cfg(target_arch = "aarch64")]
            #[unsafe(naked)]
            #[unsafe(no_mangle)]
            #[allow(non_snake_case)]
            pub extern "C" fn $name() {
                ::core::arch::naked_asm!(
                    "adrp x16, {slot}",
                    "ldr x16, [x16, :lo12:{slot}]",
                    "br x16",
                    slot = sym forward_slots::$name,
                )
            }
        )*
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arm(uuid: &str, clears: Option<u64>) -> Arm {
        Arm {
            marker: MARKER.into(),
            fault: "t1".into(),
            uuid: uuid.into(),
            index: 0,
            xid: 79,
            armed_at_ms: 1000,
            clears_at_ms: clears,
            cuda: Some(CudaArm {
                in_context: Some(719),
                new_context: Some(999),
            }),
            nvml: Some(NvmlArm {
                lost: true,
                ..NvmlArm::default()
            }),
        }
    }

    #[test]
    fn arms_are_read_cached_and_malformed_files_are_not_armed() {
        let dir = std::env::temp_dir().join(format!("gpuchaos-arm-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let a = arm("GPU-a", None);
        write_atomic(&arm_path(&dir, "GPU-a"), &serde_json::to_vec(&a).unwrap()).unwrap();
        std::fs::write(arm_path(&dir, "GPU-b"), b"{not json").unwrap();
        let mut foreign = arm("GPU-c", None);
        foreign.marker = "someone-else".into();
        std::fs::write(
            arm_path(&dir, "GPU-c"),
            serde_json::to_vec(&foreign).unwrap(),
        )
        .unwrap();
        let cache = ArmCache::new(dir.clone());
        assert_eq!(cache.arms(), vec![a.clone()]);
        assert!(cache.arm_of("gpu-A").is_some(), "UUIDs match in any case");
        // Removed: still cached for up to REFRESH, then gone.
        std::fs::remove_file(arm_path(&dir, "GPU-a")).unwrap();
        std::thread::sleep(REFRESH + Duration::from_millis(10));
        assert!(cache.arms().is_empty());
        // No temporary file is left by the atomic write.
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp.")), "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_self_clearing_arm_stops_hitting_and_a_latched_one_does_not() {
        assert!(arm("GPU-a", None).hitting(u64::MAX));
        let a = arm("GPU-a", Some(3000));
        assert!(a.hitting(2999) && !a.hitting(3000));
    }

    #[test]
    fn registrations_of_dead_processes_are_pruned() {
        let dir = std::env::temp_dir().join(format!("gpuchaos-arm-loaded-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mine = register(&dir, "cuda", &["GPU-a".into()]).unwrap();
        assert!(mine.ends_with(format!("cuda-{}.json", std::process::id())));
        let dead = Loaded {
            pid: u32::MAX - 1,
            layer: "nvml".into(),
            comm: "gone".into(),
            start_time: 1,
            gpus: vec![],
        };
        let dead_path = loaded_dir(&dir).join("nvml-4294967294.json");
        std::fs::write(&dead_path, serde_json::to_vec(&dead).unwrap()).unwrap();
        let live = read_loaded(&dir);
        assert_eq!(live.len(), 1, "{live:?}");
        assert_eq!(live[0].pid, std::process::id());
        assert_eq!(live[0].gpus, vec!["GPU-a".to_string()]);
        assert!(!dead_path.exists(), "the dead process's file is removed");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn forged_fifos_and_symlinks_are_neither_read_blocking_nor_counted() {
        let dir = std::env::temp_dir().join(format!("gpuchaos-arm-hostile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(loaded_dir(&dir)).unwrap();
        let me = std::process::id();
        let st = start_time(me).unwrap();
        let rec = |pid: u32, start_time: u64| {
            serde_json::to_vec(&Loaded {
                pid,
                layer: "cuda".into(),
                comm: "x".into(),
                start_time,
                gpus: vec![],
            })
            .unwrap()
        };
        let ld = loaded_dir(&dir);
        // A file named for another pid than it records, and one without a start time.
        std::fs::write(ld.join("cuda-1.json"), rec(me, st)).unwrap();
        std::fs::write(ld.join(format!("nvml-{me}.json")), rec(me, st)).unwrap();
        std::fs::write(ld.join(format!("cuda-{me}.json")), rec(me, 0)).unwrap();
        // A FIFO and a symlink named like registrations and arm files.
        nix::unistd::mkfifo(
            &ld.join("cuda-2.json"),
            nix::sys::stat::Mode::from_bits_truncate(0o666),
        )
        .unwrap();
        nix::unistd::mkfifo(
            &dir.join("arm-GPU-f.json"),
            nix::sys::stat::Mode::from_bits_truncate(0o666),
        )
        .unwrap();
        let target = dir.join("real.json");
        std::fs::write(&target, serde_json::to_vec(&arm("GPU-s", None)).unwrap()).unwrap();
        std::os::unix::fs::symlink(&target, dir.join("arm-GPU-s.json")).unwrap();
        std::os::unix::fs::symlink(&target, ld.join("cuda-3.json")).unwrap();
        assert!(read_loaded(&dir).is_empty(), "{:?}", read_loaded(&dir));
        let (arms, bad) = read_arms(&dir);
        assert!(arms.is_empty(), "{arms:?}");
        assert_eq!(bad.len(), 2, "{bad:?}");
        // The genuine one counts.
        std::fs::write(ld.join(format!("cuda-{me}.json")), rec(me, st)).unwrap();
        assert_eq!(read_loaded(&dir).len(), 1);
        // Temporary files are fresh each time: a planted one is not written through.
        std::fs::write(dir.join("x.json"), b"1").unwrap();
        write_atomic(&dir.join("x.json"), b"2").unwrap();
        assert_eq!(std::fs::read(dir.join("x.json")).unwrap(), b"2");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

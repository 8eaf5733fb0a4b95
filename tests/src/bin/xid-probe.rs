//! A CUDA workload and an NVML monitor for the gpu_xid tests, each loading its
//! driver library from the path it is given (the interposers, in the tests), as
//! real workloads and monitors do:
//!
//! - `xid-probe cuda LIB ORDINAL`: makes a context on the device through
//!   gpuchaos-cuda, prints `context`, then answers commands on stdin, one line each:
//!   `alloc` (2 MiB in the current context), `newctx` (another context on the
//!   device), `exit`. Each answer is `ok` or `err NAME CODE`.
//! - `xid-probe monitor LIB INDEX TIMEOUT_MS`: through nvml-wrapper, registers for
//!   Xid and double-bit ECC events on the device, prints `registered UUID`, waits for
//!   an Xid event (at most TIMEOUT_MS), printing `event TYPE XID`, then queries the
//!   device and prints one `KEY VALUE` line per query.
//! - `xid-probe query LIB INDEX`: only the queries.

use std::io::{BufRead, Write};
use std::path::Path;

use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, RetirementCause};
use nvml_wrapper::struct_wrappers::event::EventData;

fn out(line: &str) {
    println!("{line}");
    let _ = std::io::stdout().flush();
}

fn cuda(lib: &str, ordinal: i32) -> Result<(), String> {
    let cuda = gpuchaos_cuda::Cuda::open(Some(Path::new(lib)))?;
    cuda.init().map_err(|e| e.to_string())?;
    let mut contexts = vec![cuda.ctx_create(ordinal).map_err(|e| e.to_string())?];
    out("context");
    let answer = |r: Result<(), gpuchaos_cuda::CudaError>| match r {
        Ok(()) => out("ok"),
        Err(e) => out(&format!("err {} {}", e.name, e.code)),
    };
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        match line.trim() {
            "alloc" => answer(cuda.mem_alloc(2 << 20).map(|_| ())),
            "newctx" => answer(cuda.ctx_create(ordinal).map(|c| contexts.push(c))),
            "exit" => break,
            other => out(&format!("unknown command {other:?}")),
        }
    }
    Ok(())
}

fn word<T, E: std::fmt::Debug>(r: Result<T, E>, f: impl Fn(T) -> String) -> String {
    match r {
        Ok(v) => f(v),
        Err(e) => format!("{e:?}"),
    }
}

fn queries(nvml: &Nvml, index: u32) {
    let Ok(d) = nvml.device_by_index(index) else {
        out("device error");
        return;
    };
    out(&format!(
        "memory {}",
        word(d.memory_info(), |m| m.total.to_string())
    ));
    out(&format!("uuid {}", word(d.uuid(), |u| u)));
    out(&format!(
        "ecc_uncorrected {}",
        word(
            d.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile),
            |n| n.to_string()
        )
    ));
    out(&format!(
        "retired_dbe {}",
        word(d.retired_pages(RetirementCause::DoubleBitEccError), |p| p
            .len()
            .to_string())
    ));
    out(&format!(
        "retired_pending {}",
        word(d.are_pages_pending_retired(), |p| p.to_string())
    ));
}

fn monitor(lib: &str, index: u32, timeout_ms: u32) -> Result<(), String> {
    let nvml = Nvml::builder()
        .lib_path(std::ffi::OsStr::new(lib))
        .init()
        .map_err(|e| e.to_string())?;
    let d = nvml.device_by_index(index).map_err(|e| e.to_string())?;
    let uuid = d.uuid().map_err(|e| e.to_string())?;
    let set = nvml.create_event_set().map_err(|e| e.to_string())?;
    let set = d
        .register_events(
            EventTypes::CRITICAL_XID_ERROR | EventTypes::DOUBLE_BIT_ECC_ERROR,
            set,
        )
        .map_err(|e| e.to_string())?;
    out(&format!("registered {uuid}"));
    let start = std::time::Instant::now();
    while start.elapsed().as_millis() < timeout_ms as u128 {
        match set.wait(200) {
            Ok(EventData {
                event_type,
                event_data,
                ..
            }) => {
                out(&format!("event {} {event_data:?}", event_type.bits()));
                if event_type.contains(EventTypes::CRITICAL_XID_ERROR) {
                    break;
                }
            }
            Err(nvml_wrapper::error::NvmlError::Timeout) => {}
            Err(e) => {
                out(&format!("wait {e:?}"));
                break;
            }
        }
    }
    queries(&nvml, index);
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a = |i: usize| args.get(i).cloned().unwrap_or_default();
    let r = match a(0).as_str() {
        "cuda" => cuda(&a(1), a(2).parse().unwrap_or(0)),
        "monitor" => monitor(
            &a(1),
            a(2).parse().unwrap_or(0),
            a(3).parse().unwrap_or(5000),
        ),
        "query" => Nvml::builder()
            .lib_path(std::ffi::OsStr::new(&a(1)))
            .init()
            .map(|n| queries(&n, a(2).parse().unwrap_or(0)))
            .map_err(|e| e.to_string()),
        _ => Err(
            "usage: xid-probe cuda LIB ORDINAL | monitor LIB INDEX TIMEOUT_MS | query LIB INDEX"
                .into(),
        ),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            out(&format!("fatal {e}"));
            std::process::ExitCode::from(1)
        }
    }
}

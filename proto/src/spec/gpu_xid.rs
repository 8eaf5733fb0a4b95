//! The `gpu_xid` kind: a GPU failing as a real one does, with an NVIDIA Xid error,
//! seen coherently at each layer a real one shows up in: the kernel log line the
//! driver writes, NVML as monitors see it (through the NVML interposer), and CUDA as
//! workloads see it (through the CUDA interposer), optionally with the processes on
//! the GPU killed as the driver would.
//!
//! [`XID_MODELS`] is the catalogue: each Xid's effect at every layer, and whether it
//! is latched (lasts until the fault ends, like a GPU that needs a reset) or
//! self-clearing (only the contexts using the GPU during [`SELF_CLEAR_WINDOW_MS`] are
//! hit, and the GPU then serves new work again), as its real counterpart is.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::gpu::{gpus_summary, validate_gpus};
use super::{FieldError, GpuTarget, HumanDuration, KindSpec, validate_duration};

/// The `gpu_xid` kind.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuXidSpec {
    pub duration: HumanDuration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Which GPUs fail: `{gpus: [0]}`, `{gpus: ["GPU-…"]}` or `{gpus: all}`.
    pub target: GpuTarget,
    /// The Xid: 13, 31, 48, 63, 64, 79, 94 or 95 (docs/gpu.md, "gpu_xid").
    pub xid: u32,
    /// Each layer `auto` (armed where it can be, reported where not; the default),
    /// `required` (the fault fails when it cannot be armed) or `off`.
    #[serde(default, skip_serializing_if = "Layers::is_default")]
    pub layers: Layers,
    /// Kill the processes NVML lists on the GPU, as the driver does when it tears
    /// the GPU's contexts down (the policy's protected processes are spared).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kill: bool,
}

/// What each layer does when it cannot be armed.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerMode {
    /// Armed where possible; where not (no process loaded the interposer), the
    /// fault says so and stays active.
    #[default]
    Auto,
    /// The fault fails (and is reverted) when this layer cannot be armed.
    Required,
    /// Not armed.
    Off,
}

impl LayerMode {
    pub fn is_auto(&self) -> bool {
        *self == LayerMode::Auto
    }
}

impl fmt::Display for LayerMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LayerMode::Auto => "auto",
            LayerMode::Required => "required",
            LayerMode::Off => "off",
        })
    }
}

/// The layers of a `gpu_xid` fault.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layers {
    /// The kernel-log line (`NVRM: Xid (PCI:…): 79, …`), written where the agent's
    /// `--xid-kmsg` says (default /dev/kmsg).
    #[serde(default, skip_serializing_if = "LayerMode::is_auto")]
    pub kmsg: LayerMode,
    /// NVML through the NVML interposer: Xid events, GPU-is-lost, ECC counters.
    #[serde(default, skip_serializing_if = "LayerMode::is_auto")]
    pub nvml: LayerMode,
    /// CUDA through the CUDA interposer: driver-API calls fail with the Xid's error.
    #[serde(default, skip_serializing_if = "LayerMode::is_auto")]
    pub cuda: LayerMode,
}

impl Layers {
    pub fn is_default(&self) -> bool {
        *self == Layers::default()
    }
}

/// How long a self-clearing Xid hits the contexts that use the GPU (ms); after it,
/// new work on the GPU succeeds. A context that was hit stays failed (its state is
/// lost, as on a real GPU), until its process starts a new one.
pub const SELF_CLEAR_WINDOW_MS: u64 = 2000;

/// A CUDA driver API error code and its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaCode {
    pub code: i32,
    pub name: &'static str,
}

pub const CUDA_ERROR_ECC_UNCORRECTABLE: CudaCode = CudaCode {
    code: 214,
    name: "CUDA_ERROR_ECC_UNCORRECTABLE",
};
pub const CUDA_ERROR_ILLEGAL_ADDRESS: CudaCode = CudaCode {
    code: 700,
    name: "CUDA_ERROR_ILLEGAL_ADDRESS",
};
pub const CUDA_ERROR_LAUNCH_FAILED: CudaCode = CudaCode {
    code: 719,
    name: "CUDA_ERROR_LAUNCH_FAILED",
};
pub const CUDA_ERROR_UNKNOWN: CudaCode = CudaCode {
    code: 999,
    name: "CUDA_ERROR_UNKNOWN",
};

/// What an Xid does to ECC and remapping counters, as NVML reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EccEffect {
    /// Uncorrected (volatile and aggregate) ECC errors added.
    pub uncorrected: u64,
    /// Pages retired for a double-bit error (pending until a reset).
    pub retired_dbe_pages: u64,
    /// Rows remapped for an uncorrectable error (pending until a reset).
    pub remapped_uncorrectable: u64,
    /// The remapper failed (no spare rows left).
    pub remap_failure: bool,
}

/// One Xid as gpuchaos models it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XidModel {
    pub xid: u32,
    /// NVIDIA's name for it.
    pub name: &'static str,
    /// Lasts until the fault ends (a reset is needed), or clears by itself.
    pub latched: bool,
    /// Why it is modelled so (one line, from NVIDIA's Xid catalogue).
    pub why: &'static str,
    /// The rest of the driver's line after `NVRM: Xid (PCI:…): N, pid=…, name=…, `.
    pub kmsg_text: &'static str,
    /// The error driver-API calls get in a context on the GPU (None: running work is
    /// not affected).
    pub cuda_in_context: Option<CudaCode>,
    /// The error a new context on the GPU gets (None: new contexts work).
    pub cuda_new_context: Option<CudaCode>,
    /// NVML device queries answer NVML_ERROR_GPU_IS_LOST.
    pub nvml_lost: bool,
    pub ecc: EccEffect,
}

impl XidModel {
    /// How long it hits (ms): None for a latched Xid (until the fault ends).
    pub fn clears_after_ms(&self) -> Option<u64> {
        (!self.latched).then_some(SELF_CLEAR_WINDOW_MS)
    }

    /// Whether the CUDA layer has anything to do for this Xid.
    pub fn has_cuda_effect(&self) -> bool {
        self.cuda_in_context.is_some() || self.cuda_new_context.is_some()
    }

    /// The kernel-log line the NVIDIA driver writes, e.g.
    /// `NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, name=python3, GPU has fallen off the bus.`
    /// `pci` is NVML's bus id (`00000000:3B:00.0`); `process` the process the
    /// driver attributes the error to (`pid='<unknown>', name=<unknown>` without one).
    pub fn kmsg_line(&self, pci: &str, process: Option<(u32, &str)>) -> String {
        let who = match process {
            Some((pid, name)) => format!("pid={pid}, name={name}"),
            None => "pid='<unknown>', name=<unknown>".to_string(),
        };
        format!(
            "NVRM: Xid (PCI:{}): {}, {who}, {}",
            kmsg_pci(pci),
            self.xid,
            self.kmsg_text
        )
    }
}

/// NVML's bus id (`00000000:3B:00.0`, or the legacy `0000:3B:00.0`) as the driver
/// prints it in Xid lines: a 4-digit domain, bus and device, lower case, no function
/// (`0000:3b:00`).
pub fn kmsg_pci(bus_id: &str) -> String {
    let parts: Vec<&str> = bus_id.trim().split(':').collect();
    match parts.as_slice() {
        [domain, bus, devfn] => {
            let domain = u32::from_str_radix(domain, 16).unwrap_or(0);
            let dev = devfn.split('.').next().unwrap_or("00");
            format!(
                "{:04x}:{}:{}",
                domain,
                bus.to_ascii_lowercase(),
                dev.to_ascii_lowercase()
            )
        }
        _ => bus_id.to_ascii_lowercase(),
    }
}

const NONE: EccEffect = EccEffect {
    uncorrected: 0,
    retired_dbe_pages: 0,
    remapped_uncorrectable: 0,
    remap_failure: false,
};

/// The Xids gpuchaos models (docs/gpu.md, "gpu_xid", has the same table).
pub const XID_MODELS: &[XidModel] = &[
    XidModel {
        xid: 13,
        name: "Graphics Engine Exception",
        latched: false,
        why: "an SM exception in one context (out-of-range address, illegal instruction): the driver tears that context down and the GPU keeps serving",
        kmsg_text: "Graphics SM Warp Exception on (GPC 0, TPC 0, SM 0): Out Of Range Address",
        cuda_in_context: Some(CUDA_ERROR_LAUNCH_FAILED),
        cuda_new_context: None,
        nvml_lost: false,
        ecc: NONE,
    },
    XidModel {
        xid: 31,
        name: "GPU memory page fault (MMU fault)",
        latched: false,
        why: "an illegal address in one context: the MMU fault kills that context only, and the GPU keeps serving",
        kmsg_text: "Ch 00000008, intr 00000000. MMU Fault: ENGINE GRAPHICS GPCCLIENT_T1_0 faulted @ 0x7f1e_c0000000. Fault is of type FAULT_PDE ACCESS_TYPE_VIRT_READ",
        cuda_in_context: Some(CUDA_ERROR_ILLEGAL_ADDRESS),
        cuda_new_context: None,
        nvml_lost: false,
        ecc: NONE,
    },
    XidModel {
        xid: 48,
        name: "Double Bit ECC Error",
        latched: true,
        why: "an uncorrectable DRAM error: the page is retired only at the next reset (retirement pending), so the GPU needs a reset before it can be trusted",
        kmsg_text: "An uncorrectable double bit error (DBE) has been detected on GPU in the framebuffer at partition 6, subpartition 0.",
        cuda_in_context: Some(CUDA_ERROR_ECC_UNCORRECTABLE),
        cuda_new_context: None,
        nvml_lost: false,
        ecc: EccEffect {
            uncorrected: 1,
            retired_dbe_pages: 1,
            remapped_uncorrectable: 0,
            remap_failure: false,
        },
    },
    XidModel {
        xid: 63,
        name: "ECC page retirement or row remapping recording event",
        latched: false,
        why: "the driver recorded a row remap (or page retirement) to apply at the next reset: informational, running work is not affected",
        kmsg_text: "Row Remapper: New row (0x00000000001e3b40) was marked for remapping, reset gpu to activate.",
        cuda_in_context: None,
        cuda_new_context: None,
        nvml_lost: false,
        ecc: EccEffect {
            uncorrected: 0,
            retired_dbe_pages: 0,
            remapped_uncorrectable: 1,
            remap_failure: false,
        },
    },
    XidModel {
        xid: 64,
        name: "ECC page retirement or row remapper recording failure",
        latched: true,
        why: "no spare row is left for the bank (or the retirement could not be recorded): the GPU must be reset and is a candidate for replacement",
        kmsg_text: "Row Remapper Error: (0x00000000001e3b40) - All reserved rows for bank are remapped",
        cuda_in_context: None,
        cuda_new_context: None,
        nvml_lost: false,
        ecc: EccEffect {
            uncorrected: 0,
            retired_dbe_pages: 0,
            remapped_uncorrectable: 0,
            remap_failure: true,
        },
    },
    XidModel {
        xid: 79,
        name: "GPU has fallen off the bus",
        latched: true,
        why: "the GPU no longer answers on PCIe: every context on it is lost, and only a node reboot (or power cycle) brings it back",
        kmsg_text: "GPU has fallen off the bus.",
        cuda_in_context: Some(CUDA_ERROR_LAUNCH_FAILED),
        cuda_new_context: Some(CUDA_ERROR_UNKNOWN),
        nvml_lost: true,
        ecc: NONE,
    },
    XidModel {
        xid: 94,
        name: "Contained ECC error",
        latched: false,
        why: "an uncorrectable error contained to the contexts that touched the memory: those fail, the GPU and other work keep running (the row is remapped at the next reset)",
        kmsg_text: "Contained: SM (0x1). RST: No, D-RST: No",
        cuda_in_context: Some(CUDA_ERROR_ECC_UNCORRECTABLE),
        cuda_new_context: None,
        nvml_lost: false,
        ecc: EccEffect {
            uncorrected: 1,
            retired_dbe_pages: 0,
            remapped_uncorrectable: 1,
            remap_failure: false,
        },
    },
    XidModel {
        xid: 95,
        name: "Uncontained ECC error",
        latched: true,
        why: "the error could not be contained: every context on the GPU is affected and the GPU must be reset before new work runs",
        kmsg_text: "Uncontained: FBHUB. RST: Yes, D-RST: No",
        cuda_in_context: Some(CUDA_ERROR_ECC_UNCORRECTABLE),
        cuda_new_context: Some(CUDA_ERROR_ECC_UNCORRECTABLE),
        nvml_lost: false,
        ecc: EccEffect {
            uncorrected: 1,
            retired_dbe_pages: 0,
            remapped_uncorrectable: 1,
            remap_failure: false,
        },
    },
];

/// The model of one Xid, when gpuchaos has one.
pub fn xid_model(xid: u32) -> Option<&'static XidModel> {
    XID_MODELS.iter().find(|m| m.xid == xid)
}

fn known_xids() -> String {
    XID_MODELS
        .iter()
        .map(|m| m.xid.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl KindSpec for GpuXidSpec {
    fn duration(&self) -> std::time::Duration {
        self.duration.0
    }

    fn seed(&self) -> Option<u64> {
        self.seed
    }

    fn summary(&self) -> String {
        let gpus = gpus_summary(&self.target.gpus);
        let what = xid_model(self.xid)
            .map(|m| format!(" ({}, {})", m.name, latch_word(m)))
            .unwrap_or_default();
        let kill = if self.kill { ", processes killed" } else { "" };
        format!("gpu_xid {}{what} on {gpus}{kill}", self.xid)
    }

    fn validate(&self, errs: &mut Vec<FieldError>) {
        validate_duration(self.duration, errs);
        validate_gpus(&self.target.gpus, "an Xid fails a whole GPU", errs);
        let model = xid_model(self.xid);
        if model.is_none() {
            errs.push(FieldError::new(
                "xid",
                format!(
                    "Xid {} is not modelled: use one of {} (docs/gpu.md lists what each does)",
                    self.xid,
                    known_xids()
                ),
            ));
        }
        if let Some(m) = model
            && !m.has_cuda_effect()
            && self.layers.cuda == LayerMode::Required
        {
            errs.push(FieldError::new(
                "layers.cuda",
                format!(
                    "Xid {} ({}) does not fail CUDA calls, so the CUDA layer has nothing to arm: remove `cuda: required`",
                    m.xid, m.name
                ),
            ));
        }
        let l = self.layers;
        if l.kmsg == LayerMode::Off
            && l.nvml == LayerMode::Off
            && l.cuda == LayerMode::Off
            && !self.kill
        {
            errs.push(FieldError::new(
                "layers",
                "every layer is off and kill is not set: the fault would do nothing",
            ));
        }
    }
}

fn latch_word(m: &XidModel) -> &'static str {
    if m.latched {
        "latched"
    } else {
        "self-clearing"
    }
}

#[cfg(test)]
mod tests {
    use super::super::FaultSpec;
    use super::*;

    fn parse(yaml: &str) -> Result<GpuXidSpec, String> {
        super::super::parse_for_test(yaml).map(|s| match s {
            FaultSpec::GpuXid(g) => g,
            other => panic!("another kind: {other:?}"),
        })
    }

    #[test]
    fn parses_the_documented_example_and_round_trips() {
        let g = parse(
            "kind: gpu_xid\nduration: 30s\ntarget: {gpus: [0]}\nxid: 79\nlayers: {cuda: required, kmsg: off}\nkill: true\n",
        )
        .unwrap();
        assert_eq!(g.xid, 79);
        assert_eq!(g.layers.cuda, LayerMode::Required);
        assert_eq!(g.layers.kmsg, LayerMode::Off);
        assert_eq!(g.layers.nvml, LayerMode::Auto);
        assert!(g.kill);
        let spec = FaultSpec::GpuXid(g);
        assert_eq!(FaultSpec::from_json(&spec.to_json()).unwrap(), spec);
        assert_eq!(
            spec.summary(),
            "gpu_xid 79 (GPU has fallen off the bus, latched) on GPU 0, processes killed"
        );
        // Defaults: every layer auto, no kill, the agent's kmsg path.
        let g = parse("kind: gpu_xid\nduration: 5s\ntarget: {gpus: all}\nxid: 31\n").unwrap();
        assert!(g.layers.is_default() && !g.kill);
        assert_eq!(
            FaultSpec::GpuXid(g).to_json(),
            r#"{"kind":"gpu_xid","duration":"5s","target":{"gpus":"all"},"xid":31}"#
        );
    }

    #[test]
    fn every_problem_at_once() {
        let e =
            parse("kind: gpu_xid\nduration: 0s\ntarget: {gpus: [\"MIG-1\", banana]}\nxid: 42\n")
                .unwrap_err();
        for want in [
            "duration: must be above zero",
            "target.gpus[0]: \"MIG-1\" is a MIG instance",
            "target.gpus[1]: \"banana\" is neither",
            "xid: Xid 42 is not modelled: use one of 13, 31, 48, 63, 64, 79, 94, 95",
        ] {
            assert!(e.contains(want), "missing {want:?} in {e}");
        }
        let e = parse(
            "kind: gpu_xid\nduration: 5s\ntarget: {gpus: [0]}\nxid: 63\nlayers: {cuda: required}\n",
        )
        .unwrap_err();
        assert!(e.contains("layers.cuda: Xid 63"), "{e}");
        let e = parse(
            "kind: gpu_xid\nduration: 5s\ntarget: {gpus: [0]}\nxid: 79\nlayers: {cuda: off, nvml: off, kmsg: off}\n",
        )
        .unwrap_err();
        assert!(e.contains("the fault would do nothing"), "{e}");
        let e = parse(
            "kind: gpu_xid\nduration: 5s\ntarget: {gpus: [0]}\nxid: 79\nlayers: {cuda: sometimes}\n",
        )
        .unwrap_err();
        assert!(e.contains("sometimes"), "{e}");
        assert!(
            parse("kind: gpu_xid\nduration: 5s\ntarget: {gpus: []}\nxid: 79\n")
                .unwrap_err()
                .contains("target.gpus: the list is empty")
        );
    }

    #[test]
    fn the_model_table() {
        let xids: Vec<u32> = XID_MODELS.iter().map(|m| m.xid).collect();
        assert_eq!(xids, [13, 31, 48, 63, 64, 79, 94, 95]);
        let latched: Vec<u32> = XID_MODELS
            .iter()
            .filter(|m| m.latched)
            .map(|m| m.xid)
            .collect();
        assert_eq!(latched, [48, 64, 79, 95], "the ones that need a reset");
        for m in XID_MODELS {
            assert!(!m.why.is_empty() && !m.kmsg_text.is_empty(), "{m:?}");
            assert_eq!(m.clears_after_ms().is_none(), m.latched);
        }
        let lost = xid_model(79).unwrap();
        assert!(lost.nvml_lost);
        assert_eq!(lost.cuda_in_context, Some(CUDA_ERROR_LAUNCH_FAILED));
        assert_eq!(lost.cuda_new_context, Some(CUDA_ERROR_UNKNOWN));
        assert_eq!(
            xid_model(31).unwrap().cuda_in_context,
            Some(CUDA_ERROR_ILLEGAL_ADDRESS)
        );
        for ecc in [48, 94, 95] {
            let m = xid_model(ecc).unwrap();
            assert_eq!(m.cuda_in_context, Some(CUDA_ERROR_ECC_UNCORRECTABLE));
            assert_eq!(m.ecc.uncorrected, 1, "{ecc}");
        }
        assert!(xid_model(64).unwrap().ecc.remap_failure);
        assert!(!xid_model(63).unwrap().has_cuda_effect());
        assert_eq!(
            XID_MODELS.iter().filter(|m| m.nvml_lost).count(),
            1,
            "only 79 loses the GPU"
        );
        assert!(xid_model(42).is_none());
    }

    #[test]
    fn kernel_log_lines_are_the_drivers() {
        let m = xid_model(79).unwrap();
        assert_eq!(
            m.kmsg_line("00000000:3B:00.0", Some((1234, "python3"))),
            "NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, name=python3, GPU has fallen off the bus."
        );
        assert_eq!(
            xid_model(95).unwrap().kmsg_line("0000:AF:00.0", None),
            "NVRM: Xid (PCI:0000:af:00): 95, pid='<unknown>', name=<unknown>, Uncontained: FBHUB. RST: Yes, D-RST: No"
        );
        assert_eq!(kmsg_pci("00000001:18:1F.0"), "0001:18:1f");
    }
}

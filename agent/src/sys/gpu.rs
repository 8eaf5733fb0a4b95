//! GPUs through NVML (nvml-wrapper, which loads libnvidia-ml at run time).
//!
//! No driver is a normal state for this module: [`Gpus::open`] never fails, it
//! remembers why NVML is unavailable and every query reports that reason.

use std::ffi::OsString;

use gpuchaos_proto::spec::GpuRef;
use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::ComputeMode;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;

/// One GPU as the inventory reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub total: u64,
    pub used: u64,
    pub free: u64,
    /// MIG mode is on (memory belongs to instances, not the whole GPU).
    pub mig: bool,
    /// `default`, `exclusive-process`, `prohibited`, or empty when NVML cannot say.
    pub compute_mode: String,
}

/// Read access to the node's GPUs.
pub trait GpuQuery: Send + Sync + 'static {
    /// Every GPU, or why none can be listed.
    fn list(&self) -> Result<Vec<GpuInfo>, String>;
    /// Host pids of the compute processes on one GPU.
    fn processes_on(&self, gpu: &GpuRef) -> Result<Vec<u32>, String>;
    /// Each compute process on one GPU with the memory NVML says it uses (None where
    /// NVML cannot tell, as under some virtualisation).
    fn process_memory(&self, gpu: &GpuRef) -> Result<Vec<(u32, Option<u64>)>, String> {
        let _ = gpu;
        Err("per-process memory is not available".into())
    }
    /// The GPU's utilization, in percent: the share of NVML's last sample period
    /// (1/6 s to 1 s) during which a kernel ran on it.
    fn utilization(&self, uuid: &str) -> Result<u32, String> {
        let _ = uuid;
        Err("GPU utilization is not available".into())
    }
    /// The GPU's PCI bus id as NVML gives it (`00000000:3B:00.0`).
    fn pci_bus_id(&self, uuid: &str) -> Result<String, String> {
        let _ = uuid;
        Err("PCI information is not available".into())
    }
}

pub struct Gpus {
    nvml: Result<Nvml, String>,
}

impl std::fmt::Debug for Gpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.nvml {
            Ok(_) => write!(f, "Gpus(nvml loaded)"),
            Err(e) => write!(f, "Gpus(unavailable: {e})"),
        }
    }
}

/// Explains an NVML error in terms an operator can act on.
pub fn explain(e: &NvmlError) -> String {
    match e {
        NvmlError::LibloadingError(inner) => format!(
            "no NVIDIA driver: libnvidia-ml could not be loaded ({inner}); install the driver or point --nvml-lib at it"
        ),
        NvmlError::DriverNotLoaded => {
            "the NVIDIA kernel driver is not loaded (libnvidia-ml is present): load the nvidia module".to_string()
        }
        NvmlError::NoPermission => {
            "no permission to query the GPUs: run the agent as root".to_string()
        }
        NvmlError::LibraryNotFound => "libnvidia-ml was not found".to_string(),
        other => format!("NVML error: {other}"),
    }
}

impl Gpus {
    /// Loads NVML from `lib_path` (or the default `libnvidia-ml.so.1`).
    pub fn open(lib_path: Option<OsString>) -> Self {
        let mut b = Nvml::builder();
        if let Some(p) = lib_path.as_ref() {
            b.lib_path(p);
        }
        let nvml = b.init().map_err(|e| explain(&e));
        match &nvml {
            Ok(_) => tracing::info!("NVML loaded"),
            Err(e) => tracing::info!(reason = %e, "no GPUs: NVML unavailable"),
        }
        Gpus { nvml }
    }

    fn nvml(&self) -> Result<&Nvml, String> {
        self.nvml.as_ref().map_err(Clone::clone)
    }
}

impl GpuQuery for Gpus {
    fn list(&self) -> Result<Vec<GpuInfo>, String> {
        let nvml = self.nvml()?;
        let n = nvml.device_count().map_err(|e| explain(&e))?;
        let mut out = Vec::new();
        for index in 0..n {
            let d = nvml.device_by_index(index).map_err(|e| explain(&e))?;
            let mem = d.memory_info().map_err(|e| explain(&e))?;
            out.push(GpuInfo {
                index,
                uuid: d.uuid().unwrap_or_default(),
                name: d.name().unwrap_or_default(),
                total: mem.total,
                used: mem.used,
                free: mem.free,
                mig: d.mig_mode().is_ok_and(|m| m.current == 1),
                compute_mode: match d.compute_mode() {
                    Ok(ComputeMode::Default) => "default",
                    Ok(ComputeMode::ExclusiveProcess) => "exclusive-process",
                    Ok(ComputeMode::ExclusiveThread) => "exclusive-thread",
                    Ok(ComputeMode::Prohibited) => "prohibited",
                    Err(_) => "",
                }
                .to_string(),
            });
        }
        Ok(out)
    }

    fn processes_on(&self, gpu: &GpuRef) -> Result<Vec<u32>, String> {
        let mut pids: Vec<u32> = self
            .process_memory(gpu)?
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    }

    fn utilization(&self, uuid: &str) -> Result<u32, String> {
        let nvml = self.nvml()?;
        let d = nvml.device_by_uuid(uuid).map_err(|e| explain(&e))?;
        d.utilization_rates().map(|u| u.gpu).map_err(|e| match e {
            NvmlError::NotSupported => {
                "NVML does not report utilization for this GPU (a vGPU or an old driver)".into()
            }
            other => explain(&other),
        })
    }

    fn pci_bus_id(&self, uuid: &str) -> Result<String, String> {
        let nvml = self.nvml()?;
        let d = nvml.device_by_uuid(uuid).map_err(|e| explain(&e))?;
        d.pci_info().map(|p| p.bus_id).map_err(|e| explain(&e))
    }

    fn process_memory(&self, gpu: &GpuRef) -> Result<Vec<(u32, Option<u64>)>, String> {
        let nvml = self.nvml()?;
        let device = match gpu {
            GpuRef::Index(i) => nvml.device_by_index(*i),
            GpuRef::Uuid(u) => nvml.device_by_uuid(u.as_str()),
        }
        .map_err(|e| match e {
            NvmlError::InvalidArg | NvmlError::NotFound => {
                format!("{gpu} does not exist on this node")
            }
            other => explain(&other),
        })?;
        let procs = device
            .running_compute_processes()
            .map_err(|e| explain(&e))?;
        Ok(procs
            .into_iter()
            .map(|p| {
                let used = match p.used_gpu_memory {
                    UsedGpuMemory::Used(b) => Some(b),
                    UsedGpuMemory::Unavailable => None,
                };
                (p.pid, used)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_driver_is_a_reason_not_a_panic() {
        let g = Gpus::open(Some("/nonexistent/libnvidia-ml.so.1".into()));
        let e = g.list().unwrap_err();
        assert!(e.contains("no NVIDIA driver"), "{e}");
        assert!(g.processes_on(&GpuRef::Index(0)).is_err());
    }
}

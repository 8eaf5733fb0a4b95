//! The `gpu_compute` kind: keep a share of chosen GPUs busy, as a noisy neighbour
//! (another tenant's training job, a batch job sharing the card) does.

use serde::{Deserialize, Serialize};

use super::gpu::{gpus_summary, validate_gpus, validate_ramp};
use super::{FieldError, GpuTarget, HumanDuration, KindSpec, validate_duration};

/// The `gpu_compute` kind.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuComputeSpec {
    pub duration: HumanDuration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Which GPUs: `{gpus: [0, 1]}`, `{gpus: ["GPU-…"]}` or `{gpus: all}`.
    pub target: GpuTarget,
    /// How busy: `{percent: 80}` of the time, every SM running the spin kernel.
    pub load: Load,
    /// Reach the load gradually over this time, in steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ramp: Option<HumanDuration>,
}

/// The compute load to hold on each GPU.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Load {
    /// The share of time during which the GPU's SMs run the fault's kernels, above 0
    /// and at most 100.
    pub percent: f64,
}

impl KindSpec for GpuComputeSpec {
    fn duration(&self) -> std::time::Duration {
        self.duration.0
    }

    fn seed(&self) -> Option<u64> {
        self.seed
    }

    fn summary(&self) -> String {
        let gpus = gpus_summary(&self.target.gpus);
        let ramp = self.ramp.map(|r| format!(", ramp {r}")).unwrap_or_default();
        format!("gpu_compute load {}% on {gpus}{ramp}", self.load.percent)
    }

    fn validate(&self, errs: &mut Vec<FieldError>) {
        validate_duration(self.duration, errs);
        validate_gpus(
            &self.target.gpus,
            "gpu_compute loads whole GPUs only (not yet MIG instances)",
            errs,
        );
        let p = self.load.percent;
        if !(p > 0.0 && p <= 100.0) {
            errs.push(FieldError::new(
                "load.percent",
                format!("{p} is out of range: use a share of time above 0 and at most 100"),
            ));
        }
        validate_ramp(self.ramp, self.duration, "load", "load", errs);
    }
}

#[cfg(test)]
mod tests {
    use super::super::{FaultSpec, GpuRef, GpuSet};
    use super::*;

    fn parse(yaml: &str) -> Result<GpuComputeSpec, String> {
        super::super::parse_for_test(yaml).map(|s| match s {
            FaultSpec::GpuCompute(g) => g,
            other => panic!("another kind: {other:?}"),
        })
    }

    #[test]
    fn parses_the_issue_example_and_round_trips() {
        let g = parse(
            "kind: gpu_compute\nduration: 1m\ntarget: {gpus: [0]}\nload: {percent: 80}\nramp: 30s\n",
        )
        .unwrap();
        assert_eq!(g.target.gpus, GpuSet::List(vec![GpuRef::Index(0)]));
        assert_eq!(g.load.percent, 80.0);
        assert_eq!(g.ramp.unwrap().0.as_secs(), 30);
        assert_eq!(g.summary(), "gpu_compute load 80% on GPU 0, ramp 30s");
        let spec = FaultSpec::GpuCompute(g);
        assert_eq!(spec.kind(), "gpu_compute");
        assert_eq!(FaultSpec::from_json(&spec.to_json()).unwrap(), spec);
        let g =
            parse("kind: gpu_compute\nduration: 10s\ntarget: {gpus: all}\nload: {percent: 12.5}\n")
                .unwrap();
        assert_eq!(g.target.gpus, GpuSet::All);
        assert_eq!(g.summary(), "gpu_compute load 12.5% on all GPUs");
        let g = parse(
            "kind: gpu_compute\nduration: 10s\ntarget: {gpus: [\"GPU-fa4e0000-0000-4000-8000-000000000001\", 0]}\nload: {percent: 100}\n",
        )
        .unwrap();
        assert_eq!(
            g.target.gpus,
            GpuSet::List(vec![
                GpuRef::Uuid("GPU-fa4e0000-0000-4000-8000-000000000001".into()),
                GpuRef::Index(0)
            ])
        );
    }

    #[test]
    fn every_problem_at_once_each_under_its_field() {
        let e = parse(
            "kind: gpu_compute\nduration: 10s\ntarget: {gpus: [banana, \"MIG-1\"]}\nload: {percent: 120}\nramp: 20s\n",
        )
        .unwrap_err();
        for want in [
            "target.gpus[0]: \"banana\" is neither",
            "target.gpus[1]: \"MIG-1\" is a MIG instance",
            "load.percent: 120 is out of range",
            "ramp: 20s is not shorter",
        ] {
            assert!(e.contains(want), "missing {want:?} in {e}");
        }
        for (yaml, want) in [
            (
                "kind: gpu_compute\nduration: 10s\ntarget: {gpus: []}\nload: {percent: 0}\n",
                "load.percent: 0 is out of range",
            ),
            (
                "kind: gpu_compute\nduration: 10s\ntarget: {gpus: []}\nload: {percent: 50}\n",
                "target.gpus: the list is empty",
            ),
            (
                "kind: gpu_compute\nduration: 10s\ntarget: {gpus: [0]}\nload: {percent: 50}\nramp: 10ms\n",
                "ramp: 10ms is too short",
            ),
            (
                "kind: gpu_compute\nduration: 0s\ntarget: {gpus: [0]}\nload: {percent: 50}\n",
                "duration: must be above zero",
            ),
            (
                "kind: gpu_compute\nduration: 10s\ntarget: {gpus: [0]}\nload: {percent: -5}\n",
                "load.percent: -5 is out of range",
            ),
        ] {
            let e = parse(yaml).unwrap_err();
            assert!(e.contains(want), "missing {want:?} in {e}");
        }
        // Shapes: unknown fields and a missing load are named.
        for (yaml, want) in [
            (
                "kind: gpu_compute\nduration: 10s\ntarget: {gpus: [0]}\nload: {sms: 3}\n",
                "sms",
            ),
            (
                "kind: gpu_compute\nduration: 10s\ntarget: {gpus: [0]}\n",
                "load",
            ),
            (
                "kind: gpu_compute\nduration: 10s\ntarget: {gpus: [0]}\nload: {percent: 50}\nfill: {percent: 3}\n",
                "fill",
            ),
        ] {
            let e = parse(yaml).unwrap_err();
            assert!(e.contains(want), "missing {want:?} in {e}");
        }
    }
}

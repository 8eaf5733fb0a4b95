//! Fault kinds. Each kind is a [`KindDriver`] with its own spec and plan types: it
//! turns a spec into a plan (targets resolved, policy checked, no side effects),
//! applies and verifies the plan, and reverts from the plan alone (what the journal
//! holds), idempotently. [`Typed`] adapts every driver to the untyped
//! [`FaultDriver`] the manager holds (specs as [`FaultSpec`], plans as JSON), so no
//! driver matches on spec variants or parses its own plan.
//!
//! Adding a kind: its spec under proto/src/spec/ (registered in `fault_kinds!`), its
//! driver here, and one line in the `drivers` list of [`crate::run`]
//! (docs/architecture.md, "Adding a fault kind").

pub mod gpu_compute;
pub mod gpu_memory;
pub mod gpu_xid;
mod gpus;
pub mod guardrail;
pub mod network;
pub mod process;
pub mod select;
pub mod watch;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use gpuchaos_proto::spec::{FaultSpec, Kind};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::AgentError;

pub type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What a kind decided to do, before doing anything. `revert` is journaled.
#[derive(Debug, Clone)]
pub struct Plan {
    /// One line for humans: what will be hit.
    pub target: String,
    /// Everything revert needs, kind-specific, journaled before the effect.
    pub revert: serde_json::Value,
}

/// The outcome of a verified apply.
#[derive(Debug)]
pub struct Applied {
    /// Kind-specific details reported in the fault's status (live: a background
    /// task such as crash-loop keeps updating them).
    pub details: Arc<Mutex<serde_json::Value>>,
    /// Work that goes on while the fault is active; cancelled and awaited on revert.
    pub background: Option<JoinHandle<()>>,
    /// What the fault's watch will observe (process kills: the replacement and its
    /// GPU memory), possibly long after the fault ended. The manager keeps listening
    /// until the sender is dropped, or until shutdown.
    pub observations: Option<watch::ObservationRx>,
}

/// A revert that did not complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevertError {
    pub message: String,
    /// Exactly what may be left behind, and how to remove it by hand.
    pub leftover: String,
}

/// Whether this node can run a kind, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    pub kind: &'static str,
    pub supported: bool,
    pub reason: String,
    pub backends: Vec<String>,
}

/// What a [`KindDriver`] says of this node: [`Capability`] without the kind's name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Support {
    pub supported: bool,
    /// Why not, or what is limited (empty when fully supported).
    pub reason: String,
    pub backends: Vec<String>,
}

pub struct ApplyCtx {
    pub id: String,
    pub spec: FaultSpec,
    pub plan: serde_json::Value,
    /// Cancelled when the fault must stop (revert, expiry, shutdown) while applying.
    pub cancel: CancellationToken,
}

pub trait FaultDriver: Send + Sync + 'static {
    fn kind(&self) -> &'static str;
    fn capability(&self) -> Capability;
    /// Resolves targets and checks the policy. No side effects.
    fn plan(&self, spec: &FaultSpec) -> Result<Plan, AgentError>;
    /// Applies the plan and reads the effect back. An `Err` means the fault could not
    /// be applied or verified; the manager then reverts it from the plan.
    fn apply(self: Arc<Self>, ctx: ApplyCtx) -> BoxFut<Result<Applied, String>>;
    /// Undoes the plan. Idempotent: succeeds when apply never ran, half ran, or the
    /// effect is already gone.
    fn revert(self: Arc<Self>, plan: serde_json::Value) -> BoxFut<Result<(), RevertError>>;
    /// Start-up only, after the journal's open faults of this kind were reverted
    /// (their plans are given): removes any kernel state that carries the agent's
    /// marker, even state no journal entry names. Returns what it removed.
    fn sweep(self: Arc<Self>, plans: Vec<serde_json::Value>) -> BoxFut<Vec<String>> {
        let _ = plans;
        Box::pin(async { Vec::new() })
    }
}

/// A fault kind's driver, typed by its spec and its (journaled) plan.
pub trait KindDriver: Send + Sync + 'static {
    type Spec: Kind + Clone + Send + Sync + 'static;
    type Plan: Serialize + DeserializeOwned + Send + 'static;

    /// Whether this node can run the kind.
    fn capability(&self) -> Support;
    /// Resolves targets and checks the policy. No side effects.
    fn plan(&self, spec: &Self::Spec) -> Result<Planned<Self::Plan>, AgentError>;
    /// Applies the plan and reads the effect back; see [`FaultDriver::apply`].
    fn apply(
        self: Arc<Self>,
        spec: Self::Spec,
        plan: Self::Plan,
        cancel: CancellationToken,
    ) -> impl Future<Output = Result<Applied, String>> + Send;
    /// Undoes the plan, idempotently; see [`FaultDriver::revert`].
    fn revert(
        self: Arc<Self>,
        plan: Self::Plan,
    ) -> impl Future<Output = Result<(), RevertError>> + Send;
    /// Start-up sweep; see [`FaultDriver::sweep`]. Plans the journal holds but that
    /// no longer parse are left out.
    fn sweep(self: Arc<Self>, plans: Vec<Self::Plan>) -> impl Future<Output = Vec<String>> + Send {
        let _ = plans;
        async { Vec::new() }
    }
    /// What may be left behind when a journaled plan cannot be read (`plan` is its
    /// JSON), and how to find it by hand.
    fn unreadable_plan_leftover(&self, plan: &str) -> String {
        format!("unknown: check by hand what this plan names: {plan}")
    }
}

/// What [`KindDriver::plan`] decided: one line for humans, and the plan.
#[derive(Debug, Clone)]
pub struct Planned<P> {
    pub target: String,
    pub plan: P,
}

/// The one adapter from a typed [`KindDriver`] to the manager's [`FaultDriver`].
pub struct Typed<D>(pub Arc<D>);

/// Every driver as the manager holds it.
pub fn typed<D: KindDriver>(driver: Arc<D>) -> Arc<dyn FaultDriver> {
    Arc::new(Typed(driver))
}

impl<D: KindDriver> FaultDriver for Typed<D> {
    fn kind(&self) -> &'static str {
        <D::Spec as Kind>::KIND
    }

    fn capability(&self) -> Capability {
        let Support {
            supported,
            reason,
            backends,
        } = self.0.capability();
        Capability {
            kind: <D::Spec as Kind>::KIND,
            supported,
            reason,
            backends,
        }
    }

    fn plan(&self, spec: &FaultSpec) -> Result<Plan, AgentError> {
        let spec = D::Spec::of(spec).ok_or_else(|| wrong_kind::<D>(spec))?;
        let planned = self.0.plan(spec)?;
        Ok(Plan {
            target: planned.target,
            revert: serde_json::to_value(&planned.plan)
                .map_err(|e| AgentError::Internal(format!("the plan does not serialize: {e}")))?,
        })
    }

    fn apply(self: Arc<Self>, ctx: ApplyCtx) -> BoxFut<Result<Applied, String>> {
        let driver = Arc::clone(&self.0);
        Box::pin(async move {
            let spec = D::Spec::of(&ctx.spec)
                .cloned()
                .ok_or_else(|| wrong_kind::<D>(&ctx.spec).to_string())?;
            let plan: D::Plan = serde_json::from_value(ctx.plan)
                .map_err(|e| format!("bad {} plan: {e}", <D::Spec as Kind>::KIND))?;
            driver.apply(spec, plan, ctx.cancel).await
        })
    }

    fn revert(self: Arc<Self>, plan: serde_json::Value) -> BoxFut<Result<(), RevertError>> {
        let driver = Arc::clone(&self.0);
        Box::pin(async move {
            let typed: D::Plan = serde_json::from_value(plan.clone()).map_err(|e| RevertError {
                message: format!(
                    "unreadable {} plan in the journal: {e}",
                    <D::Spec as Kind>::KIND
                ),
                leftover: driver.unreadable_plan_leftover(&plan.to_string()),
            })?;
            driver.revert(typed).await
        })
    }

    fn sweep(self: Arc<Self>, plans: Vec<serde_json::Value>) -> BoxFut<Vec<String>> {
        let driver = Arc::clone(&self.0);
        Box::pin(async move {
            let plans = plans
                .into_iter()
                .filter_map(|p| serde_json::from_value(p).ok())
                .collect();
            driver.sweep(plans).await
        })
    }
}

fn wrong_kind<D: KindDriver>(spec: &FaultSpec) -> AgentError {
    AgentError::Internal(format!(
        "the {} driver was given a {} spec",
        <D::Spec as Kind>::KIND,
        spec.kind()
    ))
}

/// The journal outlives the agent binary: plans written by earlier agents (these are
/// their exact JSON shapes) must still revert after an upgrade, and a plan that does
/// not parse must say where to look by hand.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::gpu_memory::GpuMemoryDriver;
    use crate::faults::guardrail::GuardrailDriver;
    use crate::faults::network::{NetCaps, NetworkDriver};
    use crate::faults::process::ProcessDriver;
    use crate::faults::select::Selector;
    use crate::policy::{Policy, PolicyFile};
    use crate::sys::fake::{FakeProcs, FakeTable, FakeTools, NoGpus, workers};

    struct Rig {
        procs: Arc<FakeProcs>,
        tools: Arc<FakeTools>,
        drivers: Vec<Arc<dyn FaultDriver>>,
    }

    fn rig() -> Rig {
        let procs = workers();
        let tools = Arc::new(FakeTools::default());
        let policy = Arc::new(Policy::new(PolicyFile::default()).unwrap());
        let selector = Arc::new(Selector::new(
            procs.clone(),
            Arc::new(NoGpus),
            Arc::clone(&policy),
        ));
        let caps = NetCaps {
            privileged: true,
            nft: true,
            tc: false,
            tc_why: String::new(),
            nsenter: true,
            netem: Err(String::new()),
            ifb: false,
        };
        let drivers = vec![
            typed(Arc::new(ProcessDriver::new(Arc::clone(&selector)))),
            typed(Arc::new(GpuMemoryDriver::new(
                Arc::new(NoGpus),
                Arc::clone(&policy),
                Some("/nonexistent/libcuda.so.1".into()),
            ))),
            typed(Arc::new(NetworkDriver::new(
                selector,
                tools.clone(),
                Arc::clone(&policy),
                caps,
                vec![],
            ))),
            typed(Arc::new(GuardrailDriver::new(
                Arc::new(crate::metrics::Metrics::new()),
                Ok(()),
                vec![],
                tools.clone(),
            ))),
        ];
        Rig {
            procs,
            tools,
            drivers,
        }
    }

    impl Rig {
        fn driver(&self, kind: &str) -> Arc<dyn FaultDriver> {
            let d = self.drivers.iter().find(|d| d.kind() == kind).unwrap();
            Arc::clone(d)
        }
    }

    fn json(text: &str) -> serde_json::Value {
        serde_json::from_str(text).unwrap()
    }

    #[tokio::test]
    async fn plans_journaled_by_earlier_agents_still_revert() {
        let r = rig();
        // process: a pause of pid 100 (start time 1000 in the fake table).
        r.procs.table.lock().unwrap().get_mut(&100).unwrap().0.state = 'T';
        r.driver("process")
            .revert(json(
                r#"{"action":"pause","targets":[{"pid":100,"start_time":1000,"comm":"vllm-worker"}],"seed":7}"#,
            ))
            .await
            .unwrap();
        assert_eq!(r.procs.state(100), Some('S'), "resumed");

        // network: a partition in the agent's namespace, from before `covers`.
        r.tools
            .tables
            .lock()
            .unwrap()
            .insert((None, "gpuchaos_0badf00d".into()), FakeTable::default());
        r.driver("network")
            .revert(json(
                r#"{"token":"0badf00d","table":"gpuchaos_0badf00d","shaper":null,"namespaces":[{"netns":null,"label":"the agent's namespace","shaped":[],"ifbs":[]}],"seed":7}"#,
            ))
            .await
            .unwrap();
        assert!(
            r.tools.tables.lock().unwrap().is_empty(),
            "the table is gone"
        );

        // guardrail: explicit mode (before transparent mode added `table`), and a
        // transparent one with its redirect table.
        r.driver("guardrail")
            .revert(json(
                r#"{"listen":"127.0.0.1:18801","upstream":"http://127.0.0.1:9","standing":false,"seed":1,"token":"00000000000000ab"}"#,
            ))
            .await
            .unwrap();
        r.tools
            .tables
            .lock()
            .unwrap()
            .insert((None, "gpuchaos_1234abcd".into()), FakeTable::default());
        r.driver("guardrail")
            .revert(json(
                r#"{"listen":"10.0.0.9:8000","table":"gpuchaos_1234abcd","upstream":"http://10.0.0.9:8000","standing":false,"seed":1,"token":"1234abcd00000000"}"#,
            ))
            .await
            .unwrap();
        assert!(
            r.tools.tables.lock().unwrap().is_empty(),
            "the redirect is gone"
        );

        // gpu_memory: no helper of that token runs any more: nothing to do.
        r.driver("gpu_memory")
            .revert(json(
                r#"{"token":"c0ffee00c0ffee00","gpus":[{"index":0,"uuid":"GPU-0","total":85899345920,"used_before":0,"target_used":42949672960}],"ramp_ms":null}"#,
            ))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn an_unreadable_plan_says_where_to_look_for_each_kind() {
        let r = rig();
        for (kind, look) in [
            ("process", "check the processes recorded in"),
            ("gpu_memory", "processes (ps -ef) and kill them"),
            ("network", "nft list tables"),
            ("guardrail", "nft list tables"),
        ] {
            let e = r
                .driver(kind)
                .revert(json(r#"{"targets":"garbled"}"#))
                .await
                .unwrap_err();
            assert!(
                e.message
                    .starts_with(&format!("unreadable {kind} plan in the journal: ")),
                "{kind}: {e:?}"
            );
            assert!(e.leftover.contains(look), "{kind}: {e:?}");
            assert!(
                e.leftover.contains("garbled"),
                "{kind}: the plan is quoted: {e:?}"
            );
        }
        // And a spec of another kind is refused, not misread.
        let spec = gpuchaos_proto::spec::FaultSpec::from_yaml_multi(
            "kind: process\nduration: 1s\ntarget: {pid: 100}\naction: pause\n",
        )
        .unwrap()
        .remove(0);
        let e = r.driver("network").plan(&spec).unwrap_err();
        assert!(
            e.to_string()
                .contains("the network driver was given a process spec"),
            "{e}"
        );
    }
}

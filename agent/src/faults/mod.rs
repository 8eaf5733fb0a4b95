//! Fault kinds. Each kind is a [`KindDriver`] with its own spec and plan types: it
//! turns a spec into a plan (targets resolved, policy checked, no side effects),
//! applies and verifies the plan, and reverts from the plan alone (what the journal
//! holds), idempotently. [`Typed`] adapts every driver to the untyped
//! [`FaultDriver`] the manager holds (specs as [`FaultSpec`], plans as JSON), so no
//! driver matches on spec variants or parses its own plan.
//!
//! Adding a kind: its spec under proto/src/spec/ (registered in `fault_kinds!`), its
//! driver here, and one line in [`drivers`].

pub mod gpu_memory;
pub mod guardrail;
pub mod network;
pub mod process;
pub mod select;

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

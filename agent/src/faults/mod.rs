//! Fault kinds. Each kind is a [`FaultDriver`]: it turns a spec into a plan (targets
//! resolved, policy checked, no side effects), applies and verifies the plan, and
//! reverts from the plan alone (what the journal holds), idempotently.

pub mod gpu_memory;
pub mod guardrail;
pub mod network;
pub mod process;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use gpuchaos_proto::spec::FaultSpec;
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

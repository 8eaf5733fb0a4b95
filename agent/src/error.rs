//! The agent's error type and its one mapping onto gRPC status codes.

use gpuchaos_proto::spec::SpecErrors;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The spec is malformed: INVALID_ARGUMENT.
    #[error("invalid fault spec: {0}")]
    InvalidSpec(SpecErrors),
    /// The policy forbids it: FAILED_PRECONDITION.
    #[error("refused by policy: {0}")]
    Refused(String),
    /// The selector matched nothing, or a target vanished: FAILED_PRECONDITION.
    #[error("{0}")]
    NoTargets(String),
    /// This node cannot do it (no driver, kind disabled, ...): FAILED_PRECONDITION.
    #[error("{0}")]
    Unsupported(String),
    #[error("no fault {0} on this agent (it may have ended and been forgotten)")]
    FaultNotFound(String),
    #[error("no session {0} on this agent: its lease may have lapsed; open a new session")]
    SessionNotFound(String),
    /// Another live session holds the lock: ABORTED.
    #[error("{0}")]
    Locked(String),
    #[error("the agent is shutting down and reverting every fault")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
}

/// The longest error message the agent puts on the wire.
pub const MAX_STATUS_MESSAGE: usize = 2048;

impl From<AgentError> for tonic::Status {
    fn from(e: AgentError) -> Self {
        // grpc-message travels in a header: a long one turns the reason into
        // RESOURCE_EXHAUSTED on the client. Values are shortened where errors are
        // made; this is the last guard.
        let mut msg = e.to_string();
        if msg.len() > MAX_STATUS_MESSAGE {
            let mut cut = MAX_STATUS_MESSAGE;
            while !msg.is_char_boundary(cut) {
                cut -= 1;
            }
            msg = format!("{}… (message cut at {cut} bytes)", &msg[..cut]);
        }
        match e {
            AgentError::InvalidSpec(_) => tonic::Status::invalid_argument(msg),
            AgentError::Refused(_) | AgentError::NoTargets(_) | AgentError::Unsupported(_) => {
                tonic::Status::failed_precondition(msg)
            }
            AgentError::FaultNotFound(_) | AgentError::SessionNotFound(_) => {
                tonic::Status::not_found(msg)
            }
            AgentError::Locked(_) => tonic::Status::aborted(msg),
            AgentError::ShuttingDown => tonic::Status::unavailable(msg),
            AgentError::Internal(_) => tonic::Status::internal(msg),
        }
    }
}

//! Exit codes, one per failure class (design.md):
//!
//! | code | meaning |
//! |---|---|
//! | 0  | everything asked for happened (objectives held) |
//! | 1  | an objective failed |
//! | 2  | aborted by a stop condition |
//! | 3  | a fault could not be injected or verified |
//! | 4  | a revert failed, or an agent holding faults could not be reached: something may be left behind (the message says exactly what) |
//! | 64 | invalid input (a spec, a flag, a file), or an agent refused the fault as invalid or against its policy |
//! | 69 | an agent could not be reached (status) |
//! | 70 | internal error |
//! | 74 | the state directory or the history database cannot be used (locked, damaged, unwritable) |

use std::fmt;

pub const OK: u8 = 0;
pub const OBJECTIVE_FAILED: u8 = 1;
pub const ABORTED: u8 = 2;
pub const INJECT_FAILED: u8 = 3;
pub const REVERT_FAILED: u8 = 4;
pub const INVALID_INPUT: u8 = 64;
pub const UNAVAILABLE: u8 = 69;
pub const INTERNAL: u8 = 70;
pub const IO_ERROR: u8 = 74;

/// An error that ends the command with a specific exit code.
#[derive(Debug)]
pub struct CliError {
    pub code: u8,
    pub message: String,
}

impl CliError {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        CliError {
            code,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(INVALID_INPUT, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(INTERNAL, message)
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

/// The worst (highest-priority) of several outcomes: a revert failure outranks an
/// inject failure, which outranks invalid input.
pub fn worst(codes: impl IntoIterator<Item = u8>) -> u8 {
    let rank = |c: u8| match c {
        OK => 0,
        INVALID_INPUT => 1,
        UNAVAILABLE => 2,
        OBJECTIVE_FAILED => 3,
        ABORTED => 4,
        INJECT_FAILED => 5,
        INTERNAL => 6,
        REVERT_FAILED => 7,
        _ => 6,
    };
    codes.into_iter().max_by_key(|c| rank(*c)).unwrap_or(OK)
}

/// Maps an agent's gRPC status onto an exit code for a command of this class.
pub fn from_status(status: &tonic::Status, failing: u8) -> u8 {
    use tonic::Code;
    match status.code() {
        Code::InvalidArgument | Code::FailedPrecondition | Code::NotFound => INVALID_INPUT,
        _ => failing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revert_failures_dominate() {
        assert_eq!(
            worst([OK, INVALID_INPUT, REVERT_FAILED, INJECT_FAILED]),
            REVERT_FAILED
        );
        assert_eq!(worst([OK, INVALID_INPUT]), INVALID_INPUT);
        assert_eq!(worst([OK, INJECT_FAILED, INVALID_INPUT]), INJECT_FAILED);
        assert_eq!(worst([]), OK);
    }
}

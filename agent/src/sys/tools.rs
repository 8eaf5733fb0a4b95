//! The network tools (nft, tc, ip, ss) behind one small interface, [`Tools`], so
//! that the network and guardrail drivers are unit-tested against a recording fake
//! ([`super::fake::FakeTools`]) and run the real binaries in production
//! ([`RealTools`]). [`Ns`] is a namespace to run them in: the agent's own, or the
//! one at a path (`/proc/PID/ns/net`), entered with `nsenter --net=PATH`.
//!
//! Tools run as subprocesses with argument vectors, never through a shell. Every
//! call is logged at debug level with its argv and outcome.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

pub use super::netns::{CmdError, Tool};

pub type ToolFut<'a> = Pin<Box<dyn Future<Output = Result<String, CmdError>> + Send + 'a>>;

/// Runs a tool in a namespace (`ns` None: the agent's own) with `stdin` fed to it;
/// answers its stdout, or what failed.
pub trait Tools: Send + Sync + 'static {
    fn run<'a>(
        &'a self,
        ns: Option<&'a Path>,
        tool: Tool,
        args: &'a [String],
        stdin: Option<&'a str>,
    ) -> ToolFut<'a>;
}

/// A namespace to run tools in, with the tools to run.
#[derive(Clone, Copy)]
pub struct Ns<'a> {
    tools: &'a dyn Tools,
    path: Option<&'a Path>,
}

impl<'a> Ns<'a> {
    pub fn new(tools: &'a dyn Tools, path: Option<&'a Path>) -> Self {
        Ns { tools, path }
    }

    /// None for the agent's own namespace.
    pub fn path(&self) -> Option<&'a Path> {
        self.path
    }

    pub async fn run(
        self,
        tool: Tool,
        args: &[String],
        stdin: Option<&str>,
    ) -> Result<String, CmdError> {
        self.tools.run(self.path, tool, args, stdin).await
    }
}

/// The real binaries.
#[derive(Debug, Default)]
pub struct RealTools;

impl Tools for RealTools {
    fn run<'a>(
        &'a self,
        ns: Option<&'a Path>,
        tool: Tool,
        args: &'a [String],
        stdin: Option<&'a str>,
    ) -> ToolFut<'a> {
        Box::pin(async move {
            let r = run_tool(ns, tool, args, stdin).await;
            // A run that exited was logged with its status; this catches the rest
            // too (not installed, cannot start, no answer in time).
            if let Err(e) = &r {
                tracing::debug!(netns = ?ns, argv = ?(tool.binary(), args), error = %e.message,
                    "tool failed");
            }
            r
        })
    }
}

/// How long one nft/tc/ip call may take before it counts as failed.
const TOOL_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs a tool in the agent's namespace (`ns` None) or in the namespace at `ns`,
/// with `stdin` fed to it; returns stdout.
async fn run_tool(
    ns: Option<&Path>,
    tool: Tool,
    args: &[String],
    stdin: Option<&str>,
) -> Result<String, CmdError> {
    use tokio::io::AsyncWriteExt;
    let shown = format!("{} {}", tool.binary(), args.join(" "));
    let err = |message: String| CmdError {
        command: shown.clone(),
        message,
    };
    let bin = tool.find().ok_or_else(|| err(tool.missing()))?;
    let mut cmd = match ns {
        None => tokio::process::Command::new(&bin),
        Some(path) => {
            let nsenter = Tool::Nsenter
                .find()
                .ok_or_else(|| err(Tool::Nsenter.missing()))?;
            let mut c = tokio::process::Command::new(nsenter);
            c.arg(format!("--net={}", path.display()))
                .arg("--")
                .arg(&bin);
            c
        }
    };
    cmd.args(args)
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| err(format!("cannot start {}: {e}", bin.display())))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .await
            .map_err(|e| err(format!("cannot write its input: {e}")))?;
        drop(pipe);
    }
    let out = tokio::time::timeout(TOOL_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| err(format!("no answer within {TOOL_TIMEOUT:?}")))?
        .map_err(|e| err(e.to_string()))?;
    tracing::debug!(netns = ?ns, argv = ?(tool.binary(), args), status = %out.status,
        stdout_bytes = out.stdout.len(), stderr = %String::from_utf8_lossy(&out.stderr).trim(),
        "tool ran");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let msg = stderr
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('^'))
            .collect::<Vec<_>>()
            .join(" / ");
        Err(err(if msg.is_empty() {
            format!("exit status {}", out.status)
        } else {
            msg
        }))
    }
}

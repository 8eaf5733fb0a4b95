//! gpuchaos-agent: injects faults on one node on command, and never leaves one behind.
//!
//! - [`manager`]: the one owner of all fault state (an actor): lifecycle, durations,
//!   leases, halt, shutdown.
//! - [`journal`]: the append-only intent journal replayed at start-up.
//! - [`policy`]: the blast radius (protected processes, limits, enabled kinds).
//! - [`faults`]: one typed driver per fault kind (`process`, `gpu_memory`,
//!   `gpu_xid`, `network`, `guardrail`) behind one adapter; target selection
//!   ([`faults::select`]); [`gpu_helper`]: the child process that holds GPU memory.
//! - [`sys`]: every system call, /proc read, NVML and CUDA call, and network tool
//!   (nft, tc, ip through [`sys::tools`]), behind small interfaces with recording
//!   fakes for the unit tests.
//! - [`server`]: gRPC handlers that forward to the manager; [`tls`]: mutual TLS.
//! - [`metrics`]: Prometheus metrics; [`inventory`]: what the node is and can do.
//! - [`failpoint`]: crash points for the crash-safety tests (the `test-hooks`
//!   feature only).
//! - [`cli`]: the flags of `gpuchaos-agent` (also read by `gpuchaos man`).
//!
//! [`run`] wires it together: it takes the state directory's lock, opens the
//! journal, binds the ports, builds the drivers, recovers what a previous run left,
//! then serves until shutdown and reverts everything.

pub mod cli;
pub mod error;
pub mod failpoint;
pub mod faults;
pub mod gpu_helper;
pub mod inventory;
pub mod journal;
pub mod manager;
pub mod metrics;
pub mod policy;
pub mod server;
pub mod sys;
pub mod tls;

use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use gpuchaos_proto::pb::agent_server::AgentServer;
use tokio_util::sync::CancellationToken;

use crate::faults::FaultDriver;
use crate::faults::gpu_memory::GpuMemoryDriver;
use crate::faults::gpu_xid::GpuXidDriver;
use crate::faults::guardrail::GuardrailDriver;
use crate::faults::network::{NetCaps, NetworkDriver};
use crate::faults::process::ProcessDriver;
use crate::manager::{Command, Manager};
use crate::policy::Policy;
use crate::sys::gpu::Gpus;

/// Everything the agent is configured with (the flags of `gpuchaos-agent`).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub state_dir: PathBuf,
    pub policy: Option<PathBuf>,
    pub tls: tls::TlsFiles,
    pub nvml_lib: Option<PathBuf>,
    pub cuda_lib: Option<PathBuf>,
    /// Standing guardrail proxies: (listen, upstream URL).
    pub guardrail_proxies: Vec<(SocketAddr, String)>,
    /// How long SIGTERM/SIGINT may spend reverting before the agent exits anyway.
    pub shutdown_grace: Duration,
    /// Where gpu_xid faults arm the CUDA and NVML interposers.
    pub xid_dir: PathBuf,
    /// Where gpu_xid faults write the driver's kernel-log line.
    pub xid_kmsg: PathBuf,
}

/// A configuration problem: the agent exits 64 without touching anything.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// The listen addresses cannot be bound (in use, not assignable): the agent exits 69
/// without touching anything.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AddressError(pub String);

/// The state directory cannot be used (another agent holds it, or it cannot be
/// written): the agent exits 74 without touching anything.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StateDirError(pub String);

/// The state directory's lock, held for the agent's lifetime: a POSIX record lock
/// (fcntl F_SETLK) on `agent.lock`. Unlike flock, such a lock belongs to the process,
/// not to the open file: a child that inherited the descriptor (one caught between
/// fork and exec when the agent was SIGKILLed) does not keep it, so a dead agent's
/// lock never blocks its successor, and F_GETLK names the live holder.
///
/// The price of POSIX semantics: closing *any* descriptor of `agent.lock` in this
/// process releases the lock, so nothing else in the agent opens that file, and
/// this is called once per process.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

/// Takes the state directory's lock; never waits.
pub fn lock_state_dir(dir: &std::path::Path) -> Result<StateLock, StateDirError> {
    use nix::fcntl::{FcntlArg, fcntl};
    std::fs::create_dir_all(dir).map_err(|e| {
        StateDirError(format!(
            "cannot create the state directory {}: {e}",
            dir.display()
        ))
    })?;
    let path = dir.join("agent.lock");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| StateDirError(format!("cannot open {}: {e}", path.display())))?;
    let whole_file = || {
        let mut l = blank_flock();
        l.l_type = nix::libc::F_WRLCK as i16;
        l.l_whence = nix::libc::SEEK_SET as i16;
        l
    };
    match fcntl(&file, FcntlArg::F_SETLK(&whole_file())) {
        Ok(_) => {
            let _ = file.set_len(0);
            let _ = writeln!(file, "{}", std::process::id());
            Ok(StateLock { _file: file })
        }
        Err(errno) if !matches!(errno, nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES) => {
            Err(StateDirError(format!(
                "cannot lock {}: {}; the state directory needs a local filesystem that supports POSIX locks (not every network filesystem does)",
                path.display(),
                errno.desc().to_lowercase()
            )))
        }
        Err(_) => {
            // Who holds it: the kernel knows (F_GETLK), whatever the file says.
            let mut probe = whole_file();
            let holder = fcntl(&file, FcntlArg::F_GETLK(&mut probe))
                .ok()
                .filter(|_| probe.l_type != nix::libc::F_UNLCK as i16)
                .map(|_| probe.l_pid);
            let who = match holder {
                Some(pid) => {
                    let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
                        .map(|b| {
                            String::from_utf8_lossy(&b)
                                .split('\0')
                                .filter(|s| !s.is_empty())
                                .collect::<Vec<_>>()
                                .join(" ")
                        })
                        .unwrap_or_default();
                    let cmd: String = cmd.chars().take(120).collect();
                    if cmd.is_empty() {
                        format!("process {pid}")
                    } else {
                        format!("process {pid} ({cmd})")
                    }
                }
                None => "another process".to_string(),
            };
            Err(StateDirError(format!(
                "the state directory {} is in use: {who} holds {}; stop that agent or pass another --state-dir",
                dir.display(),
                path.display()
            )))
        }
    }
}

/// A write lock over the whole file once its type is set.
fn blank_flock() -> nix::libc::flock {
    nix::libc::flock {
        l_type: 0,
        l_whence: 0,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    }
}

async fn bind(
    addr: SocketAddr,
    flag: &str,
    what: &str,
) -> Result<tokio::net::TcpListener, AddressError> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                format!("another process listens there: stop it or pass another {flag}")
            }
            std::io::ErrorKind::AddrNotAvailable => {
                format!("no interface of this node has that address: pass another {flag}")
            }
            std::io::ErrorKind::PermissionDenied => {
                format!("ports below 1024 need root or CAP_NET_BIND_SERVICE: pass another {flag}")
            }
            _ => format!("pass another {flag}"),
        };
        AddressError(format!(
            "cannot listen on {addr} for {what}: {}; {hint}",
            gpuchaos_proto::files::io_text(&e)
        ))
    })
}

/// Runs the agent until `shutdown` is cancelled, then reverts every fault and returns.
/// Prints one line `listening grpc=ADDR metrics=ADDR` on stdout once it serves.
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let policy = Arc::new(Policy::load(cfg.policy.as_deref()).map_err(ConfigError)?);
    let tls = tls::server_config(cfg.listen, &cfg.tls).map_err(ConfigError)?;
    let _lock = lock_state_dir(&cfg.state_dir)?;
    let (journal, open) = journal::Journal::open(&cfg.state_dir).map_err(|e| {
        StateDirError(format!(
            "cannot open the journal in {}: {}; check the directory's permissions and free space",
            cfg.state_dir.display(),
            gpuchaos_proto::files::io_text(&e)
        ))
    })?;

    // Bound before the drivers exist: network faults in the agent's own namespace
    // must leave its own ports alone, or a partition would cut the controller off.
    let grpc = bind(cfg.listen, "--listen", "gRPC").await?;
    let metrics_listener = bind(cfg.metrics_listen, "--metrics-listen", "metrics").await?;
    let grpc_addr = grpc.local_addr()?;
    let metrics_addr = metrics_listener.local_addr()?;

    let gpus = Arc::new(Gpus::open(cfg.nvml_lib.clone().map(Into::into)));
    let procs = Arc::new(sys::RealProcesses::default());
    let selector = Arc::new(faults::select::Selector::new(
        procs,
        gpus.clone(),
        Arc::clone(&policy),
    ));
    let process = Arc::new(ProcessDriver::new(Arc::clone(&selector)));
    let gpu_xid = Arc::new(GpuXidDriver::new(
        Arc::clone(&selector),
        cfg.xid_dir.clone(),
        cfg.xid_kmsg.clone(),
    ));
    let tools: Arc<dyn sys::tools::Tools> = Arc::new(sys::tools::RealTools);
    let net_caps = NetCaps::detect(&*tools).await;
    let transparent_ok = if !net_caps.privileged {
        Err("not root (nftables needs CAP_NET_ADMIN)".to_string())
    } else if !net_caps.nft {
        Err(crate::sys::netns::Tool::Nft.missing())
    } else {
        Ok(())
    };
    let network = Arc::new(
        NetworkDriver::new(
            selector,
            Arc::clone(&tools),
            Arc::clone(&policy),
            net_caps,
            vec![grpc_addr.port(), metrics_addr.port()],
        )
        .with_drain_file(&cfg.state_dir),
    );
    let gpu_memory = Arc::new(GpuMemoryDriver::new(
        gpus.clone(),
        Arc::clone(&policy),
        cfg.cuda_lib.clone(),
    ));
    let metrics = Arc::new(metrics::Metrics::new());
    let guardrail = Arc::new(GuardrailDriver::new(
        Arc::clone(&metrics),
        transparent_ok,
        vec![grpc_addr.port(), metrics_addr.port()],
        tools,
    ));
    guardrail
        .start_standing(&cfg.guardrail_proxies)
        .await
        .map_err(ConfigError)?;
    let network_drains = Arc::clone(&network);
    let drivers: Vec<Arc<dyn FaultDriver>> = vec![
        faults::typed(process),
        faults::typed(gpu_memory),
        faults::typed(network),
        faults::typed(guardrail),
        faults::typed(gpu_xid),
        faults::typed(Arc::new(faults::gpu_compute::GpuComputeDriver::new(
            gpus.clone(),
            Arc::clone(&policy),
            cfg.cuda_lib.clone(),
        ))),
    ];
    let inventory = Arc::new(inventory::Inventory::new(
        gpus,
        drivers.clone(),
        Arc::clone(&policy),
    ));

    let mut manager = Manager::new(drivers, Arc::clone(&policy), journal, Arc::clone(&metrics));
    if !open.is_empty() {
        tracing::warn!(
            faults = open.len(),
            "the journal holds faults a previous run did not revert: recovering"
        );
    }
    let recovered = manager.recover(open).await;
    let failed = recovered.iter().filter(|f| !f.leftover.is_empty()).count();
    if failed > 0 {
        tracing::error!(
            failed,
            "start-up recovery left faults unreverted: see `gpuchaos status`"
        );
    }
    let (handle, manager_task) = manager.spawn();

    let stop_servers = CancellationToken::new();
    let metrics_task = tokio::spawn(metrics::serve(
        metrics_listener,
        metrics,
        stop_servers.clone(),
    ));
    let service = server::AgentService {
        manager: handle.clone(),
        inventory,
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(t) = tls {
        builder = builder.tls_config(t).context("invalid TLS configuration")?;
    }
    let stop = stop_servers.clone();
    let grpc_task = tokio::spawn(
        builder
            .add_service(AgentServer::new(service))
            .serve_with_incoming_shutdown(
                // No Nagle: a reply must not wait 40 ms for a delayed ACK. Keepalive
                // notices controllers that vanished without closing.
                tonic::transport::server::TcpIncoming::from(grpc)
                    .with_nodelay(Some(true))
                    .with_keepalive(Some(Duration::from_secs(30))),
                async move { stop.cancelled().await },
            ),
    );
    tracing::info!(grpc = %grpc_addr, metrics = %metrics_addr, tls = cfg.tls.ca.is_some(),
        state_dir = %cfg.state_dir.display(), "gpuchaos-agent serving");
    println!("listening grpc={grpc_addr} metrics={metrics_addr}");
    let _ = std::io::stdout().flush();

    shutdown.cancelled().await;
    tracing::info!("shutting down: reverting every fault");
    let reverted = tokio::time::timeout(
        cfg.shutdown_grace,
        handle.call(|reply| Command::Shutdown { reply }),
    )
    .await;
    match reverted {
        Ok(Ok(left)) => {
            let leftovers: Vec<_> = left.iter().filter(|f| !f.leftover.is_empty()).collect();
            for f in &leftovers {
                tracing::error!(fault.id = %f.id, leftover = %f.leftover, "left behind at exit");
            }
            if leftovers.is_empty() {
                tracing::info!("every fault reverted");
            }
        }
        Ok(Err(e)) => tracing::error!(error = %e, "shutdown revert failed"),
        Err(_) => tracing::error!(
            grace = ?cfg.shutdown_grace,
            "reverts did not finish within the grace period: the journal keeps them for the next start"
        ),
    }
    // Reverted proxy faults still letting their connections finish: end them now,
    // so that no table outlives the agent.
    network_drains.finish_drains(Duration::from_secs(5)).await;
    stop_servers.cancel();
    drop(handle);
    // Graceful shutdown waits for clients to hang up; an open event stream or an idle
    // controller connection must not keep a reverted agent alive.
    let mut grpc_task = grpc_task;
    if tokio::time::timeout(Duration::from_secs(2), &mut grpc_task)
        .await
        .is_err()
    {
        tracing::info!("closing the remaining client connections");
        grpc_task.abort();
    }
    metrics_task.abort();
    // The manager has reverted everything it could (what it could not stays in the
    // journal for the next start); nothing is left for it to do.
    manager_task.abort();
    Ok(())
}

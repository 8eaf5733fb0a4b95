//! Network namespaces, and the names of the network tools (nft, tc, ip) run inside
//! them (see [`super::tools`] for how they run).
//!
//! A namespace is identified by its nsfs inode, recorded with the pid it was found
//! through, so a revert (after a restart, say) finds it again through any process or
//! bind mount (`ip netns`) that still holds it, and knows it is gone when none does:
//! then everything the fault put into it went with it.
//!
//! Sockets in another namespace are created on
//! a dedicated thread that entered it with setns and runs nothing else (setns changes
//! only the calling thread; a socket keeps the namespace it was created in).

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A network namespace other than the agent's own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsRef {
    /// The process it was found through, and that process's start time.
    pub pid: u32,
    pub start_time: u64,
    /// The namespace's inode on nsfs: its identity.
    pub ino: u64,
}

/// The inode of a namespace file (`/proc/PID/ns/net`, `/run/netns/NAME`).
pub fn ino_of(path: &Path) -> io::Result<u64> {
    std::fs::metadata(path).map(|m| m.ino())
}

pub fn own_ino() -> io::Result<u64> {
    ino_of(Path::new("/proc/self/ns/net"))
}

pub fn proc_ns_path(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/ns/net"))
}

/// A path that opens the namespace now, or None when nothing holds it any more.
pub fn locate(ns: &NetnsRef) -> Option<PathBuf> {
    let direct = proc_ns_path(ns.pid);
    if ino_of(&direct).ok() == Some(ns.ino) {
        return Some(direct);
    }
    if let Ok(dir) = std::fs::read_dir("/run/netns") {
        for e in dir.flatten() {
            if ino_of(&e.path()).ok() == Some(ns.ino) {
                return Some(e.path());
            }
        }
    }
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let p = proc_ns_path(pid);
        if ino_of(&p).ok() == Some(ns.ino) {
            return Some(p);
        }
    }
    None
}

/// Interfaces of a namespace, read from /proc/PID/net/dev (no subprocess).
pub fn interfaces(pid: Option<u32>) -> io::Result<Vec<String>> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/net/dev"),
        None => "/proc/self/net/dev".to_string(),
    };
    let text = std::fs::read_to_string(path)?;
    Ok(parse_net_dev(&text))
}

pub fn parse_net_dev(text: &str) -> Vec<String> {
    text.lines()
        .skip(2)
        .filter_map(|l| l.split_once(':').map(|(n, _)| n.trim().to_string()))
        .filter(|n| !n.is_empty())
        .collect()
}

/// A tool the network kind needs, and the Debian package that provides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Nft,
    Tc,
    Ip,
    Nsenter,
    Unshare,
    Ss,
}

impl Tool {
    pub fn binary(self) -> &'static str {
        match self {
            Tool::Nft => "nft",
            Tool::Tc => "tc",
            Tool::Ip => "ip",
            Tool::Nsenter => "nsenter",
            Tool::Unshare => "unshare",
            Tool::Ss => "ss",
        }
    }

    pub fn package(self) -> &'static str {
        match self {
            Tool::Nft => "nftables",
            Tool::Tc | Tool::Ip | Tool::Ss => "iproute2",
            Tool::Nsenter | Tool::Unshare => "util-linux",
        }
    }

    /// The tool's full path, searched on PATH and the sbin directories.
    pub fn find(self) -> Option<PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let extra = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from);
        std::env::split_paths(&path)
            .chain(extra)
            .map(|d| d.join(self.binary()))
            .find(|p| p.is_file())
    }

    pub fn missing(self) -> String {
        format!(
            "`{}` is not installed on this node: install the {} package",
            self.binary(),
            self.package()
        )
    }
}

/// A tool that failed: what ran and what it said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmdError {
    pub command: String,
    pub message: String,
}

impl std::fmt::Display for CmdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` failed: {}", self.command, self.message)
    }
}

/// Sockets created inside another namespace, by a thread that lives there.
pub struct NsSockets {
    tx: std::sync::mpsc::Sender<SocketRequest>,
}

type SocketResult = io::Result<std::os::fd::OwnedFd>;

enum SocketRequest {
    Listen {
        addr: std::net::SocketAddr,
        reply: tokio::sync::oneshot::Sender<SocketResult>,
    },
    Socket {
        v6: bool,
        mark: u32,
        reply: tokio::sync::oneshot::Sender<SocketResult>,
    },
}

impl NsSockets {
    /// Starts the thread and enters the namespace at `path` (None: stay in the
    /// agent's own, and create sockets the same way).
    pub fn start(path: Option<&Path>) -> io::Result<NsSockets> {
        let file = path.map(std::fs::File::open).transpose()?;
        let (tx, rx) = std::sync::mpsc::channel::<SocketRequest>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
        std::thread::Builder::new()
            .name("gpuchaos-netns".into())
            .spawn(move || {
                if let Some(f) = file
                    && let Err(e) = nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                {
                    let _ = ready_tx.send(Err(io::Error::other(format!("setns: {e}"))));
                    return;
                }
                let _ = ready_tx.send(Ok(()));
                // Serves until every sender is gone.
                while let Ok(req) = rx.recv() {
                    match req {
                        SocketRequest::Listen { addr, reply } => {
                            let r = std::net::TcpListener::bind(addr).map(Into::into);
                            let _ = reply.send(r);
                        }
                        SocketRequest::Socket { v6, mark, reply } => {
                            let _ = reply.send(new_socket(v6, mark));
                        }
                    }
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("the namespace thread died"))??;
        Ok(NsSockets { tx })
    }

    /// A listening socket bound inside the namespace.
    pub async fn listen(&self, addr: std::net::SocketAddr) -> io::Result<tokio::net::TcpListener> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(SocketRequest::Listen { addr, reply })
            .map_err(|_| io::Error::other("the namespace thread is gone"))?;
        let fd = rx
            .await
            .map_err(|_| io::Error::other("the namespace thread is gone"))??;
        let std = std::net::TcpListener::from(fd);
        std.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(std)
    }

    /// An unconnected TCP socket inside the namespace, with SO_MARK set.
    pub async fn socket(&self, v6: bool, mark: u32) -> io::Result<tokio::net::TcpSocket> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(SocketRequest::Socket { v6, mark, reply })
            .map_err(|_| io::Error::other("the namespace thread is gone"))?;
        let fd = rx
            .await
            .map_err(|_| io::Error::other("the namespace thread is gone"))??;
        Ok(tokio::net::TcpSocket::from_std_stream(
            std::net::TcpStream::from(fd),
        ))
    }
}

fn new_socket(v6: bool, mark: u32) -> SocketResult {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, setsockopt, socket, sockopt};
    let family = if v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    let fd = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    setsockopt(&fd, sockopt::Mark, &mark)?;
    setsockopt(&fd, sockopt::TcpNoDelay, &true)?;
    Ok(fd)
}

/// Makes closing this socket send RST instead of FIN (SO_LINGER 0): a client then
/// sees "connection reset", as from a refused or broken peer.
pub fn reset_on_close(sock: &impl std::os::fd::AsFd) {
    let _ = nix::sys::socket::setsockopt(
        sock,
        nix::sys::socket::sockopt::Linger,
        &nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    );
}

/// The destination a connection had before nftables redirected it to us.
pub fn original_dst(stream: &tokio::net::TcpStream) -> io::Result<std::net::SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt};
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
    let local = stream.local_addr()?;
    if local.is_ipv4() {
        let sa = getsockopt(stream, sockopt::OriginalDst)?;
        let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
        Ok(SocketAddr::from((ip, u16::from_be(sa.sin_port))))
    } else {
        let sa = getsockopt(stream, sockopt::Ip6tOriginalDst)?;
        let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
        Ok(SocketAddr::from((ip, u16::from_be(sa.sin6_port))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_interfaces() {
        let text = "Inter-|   Receive\n face |bytes\n    lo: 1 2 3\n  eth0: 4 5 6\nveth-a1: 7\n";
        assert_eq!(parse_net_dev(text), vec!["lo", "eth0", "veth-a1"]);
        assert!(interfaces(None).unwrap().contains(&"lo".to_string()));
    }

    #[test]
    fn own_namespace_is_located_through_self() {
        let ino = own_ino().unwrap();
        let me = NetnsRef {
            pid: std::process::id(),
            start_time: 0,
            ino,
        };
        assert!(locate(&me).is_some());
        let gone = NetnsRef {
            pid: u32::MAX - 1,
            start_time: 0,
            ino: 1,
        };
        assert_eq!(locate(&gone), None);
    }

    #[tokio::test]
    async fn missing_tools_name_their_package() {
        assert_eq!(Tool::Nft.package(), "nftables");
        assert!(Tool::Tc.missing().contains("iproute2"));
        use crate::sys::tools::{RealTools, Tools};
        let e = RealTools
            .run(None, Tool::Ip, &["-j".into(), "nonsense-verb".into()], None)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("ip -j nonsense-verb"), "{e}");
    }
}

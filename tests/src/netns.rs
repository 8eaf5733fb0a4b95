//! Test hosts in network namespaces: each test builds its own, sends traffic only
//! inside them, and deletes them on drop. Nothing here touches the machine's own
//! interfaces: veth pairs are created directly inside the test namespaces.
//!
//! Topology of [`Hosts::three`]: A is linked to B (10.77.1.0/24, A=.1, B=.2, A's end
//! `to-b`) and to C (10.77.2.0/24, A=.1, C=.2, A's end `to-c`); B and C have `eth0`.
//!
//! Traffic is made from this process: [`in_ns`] runs a closure on a fresh thread that
//! entered the namespace (setns changes only that thread), and the sockets it creates
//! stay in that namespace wherever they are used afterwards.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub const A_TO_B: &str = "10.77.1.1";
pub const B: &str = "10.77.1.2";
pub const A_TO_C: &str = "10.77.2.1";
pub const C: &str = "10.77.2.2";

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "`{}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a command in a namespace and returns its stdout.
pub fn ns_out(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("ip netns exec");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Test hosts; the namespaces (and what runs in them) go away on drop.
pub struct Hosts {
    pub a: String,
    pub b: String,
    pub c: String,
    children: Vec<Child>,
}

impl Hosts {
    pub fn three() -> Hosts {
        let tag = crate::marker();
        let h = Hosts {
            a: format!("gct-{tag}-a"),
            b: format!("gct-{tag}-b"),
            c: format!("gct-{tag}-c"),
            children: Vec::new(),
        };
        for n in [&h.a, &h.b, &h.c] {
            sh(&["ip", "netns", "add", n]);
            sh(&["ip", "-n", n, "link", "set", "lo", "up"]);
        }
        for (peer, dev, net) in [(&h.b, "to-b", "10.77.1"), (&h.c, "to-c", "10.77.2")] {
            sh(&[
                "ip", "-n", &h.a, "link", "add", dev, "type", "veth", "peer", "name", "eth0",
                "netns", peer,
            ]);
            sh(&[
                "ip",
                "-n",
                &h.a,
                "addr",
                "add",
                &format!("{net}.1/24"),
                "dev",
                dev,
            ]);
            sh(&[
                "ip",
                "-n",
                peer,
                "addr",
                "add",
                &format!("{net}.2/24"),
                "dev",
                "eth0",
            ]);
            sh(&["ip", "-n", &h.a, "link", "set", dev, "up"]);
            sh(&["ip", "-n", peer, "link", "set", "eth0", "up"]);
        }
        h
    }

    pub fn all(&self) -> [&str; 3] {
        [&self.a, &self.b, &self.c]
    }

    /// Starts `program args...` inside `ns` (through nsenter, which execs: the child
    /// is the program itself); killed when the hosts are dropped.
    pub fn spawn(&mut self, ns: &str, program: &str, args: &[&str]) -> u32 {
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg("--")
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nsenter");
        let pid = child.id();
        self.children.push(child);
        crate::wait_until(Duration::from_secs(2), || {
            std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()
                != std::fs::read_link("/proc/self/ns/net").ok()
        });
        pid
    }

    /// What gpuchaos left in a namespace: its nft tables, its qdiscs, its ifbs.
    pub fn gpuchaos_state(&self, ns: &str) -> Vec<String> {
        let mut found = Vec::new();
        for l in ns_out(ns, &["nft", "list", "tables"]).lines() {
            if l.contains("gpuchaos_") {
                found.push(l.trim().to_string());
            }
        }
        for l in ns_out(ns, &["tc", "qdisc", "show"]).lines() {
            if l.contains("4743:") || l.contains("4744:") || l.contains("gci") {
                found.push(l.trim().to_string());
            }
            if l.contains("ingress") {
                found.push(l.trim().to_string());
            }
        }
        for l in ns_out(ns, &["ip", "-br", "link"]).lines() {
            if l.starts_with("gci") {
                found.push(l.trim().to_string());
            }
        }
        found
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in [&self.a, &self.b, &self.c] {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// Hosts A, B and C, and an agent in A (the node) with its state in a temp dir.
pub struct Node {
    pub hosts: Hosts,
    pub dir: tempfile::TempDir,
    pub agent: crate::Agent,
}

impl Node {
    pub fn start() -> Node {
        let hosts = Hosts::three();
        let dir = tempfile::tempdir().expect("tempdir");
        let agent = crate::Agent::start_in(&hosts.a, &dir.path().join("state"));
        Node { hosts, dir, agent }
    }
}

/// HTTP servers on B and C, port 8000.
pub fn web_servers(hosts: &Hosts) -> (HttpServer, HttpServer) {
    (
        HttpServer::start(&hosts.b, &format!("{B}:8000")),
        HttpServer::start(&hosts.c, &format!("{C}:8000")),
    )
}

/// Injects `yaml` through the CLI run inside `ns`; the fault must come back active.
/// Returns it as JSON.
pub fn inject_in(
    ns: &str,
    agent: &crate::Agent,
    dir: &std::path::Path,
    yaml: &str,
) -> serde_json::Value {
    let f = crate::spec_file(dir, "net.yaml", yaml);
    crate::inject_active(Some(ns), agent, &f)
}

/// Reverts a fault through the CLI run inside `ns`.
pub fn revert_in(ns: &str, agent: &crate::Agent, id: &str) {
    let out = crate::gpuchaos_in(ns, &["--agent", &agent.grpc, "revert", id]);
    assert_eq!(out.code, 0, "revert failed: {out:?}");
}

/// Runs `f` on a thread inside the namespace `ns`.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = PathBuf::from(format!("/run/netns/{ns}"));
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("namespace thread panicked")
}

/// A tiny HTTP/1.1 server on a thread per connection: `200 ok` to every request.
pub struct HttpServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl HttpServer {
    pub fn start(ns: &str, addr: &str) -> HttpServer {
        let addr: SocketAddr = addr.parse().expect("addr");
        let listener = in_ns(ns, move || {
            TcpListener::bind(addr).expect("bind in namespace")
        });
        let addr = listener.local_addr().expect("local addr");
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                std::thread::spawn(move || serve(conn));
            }
        });
        HttpServer { addr, stop }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(conn: TcpStream) {
    let _ = conn.set_nodelay(true);
    let mut w = match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    };
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" {
                break;
            }
        }
        if w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .is_err()
        {
            return;
        }
    }
}

/// Opens a TCP connection from namespace `ns`.
pub fn connect(ns: &str, to: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    let to: SocketAddr = to.parse().expect("addr");
    in_ns(ns, move || {
        let s = TcpStream::connect_timeout(&to, timeout)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(s)
    })
}

/// One HTTP request on an open connection; returns the round trip.
pub fn http_get(s: &mut TcpStream) -> std::io::Result<Duration> {
    let t = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")?;
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while !got.ends_with(b"ok") {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::other("connection closed"));
        }
        got.extend_from_slice(&buf[..n]);
    }
    Ok(t.elapsed())
}

/// A fresh connection from `ns` and one request on it: does HTTP get through?
pub fn http_works(ns: &str, to: &str) -> bool {
    match connect(ns, to, Duration::from_millis(700)) {
        Ok(mut s) => {
            s.set_read_timeout(Some(Duration::from_millis(700))).ok();
            http_get(&mut s).is_ok()
        }
        Err(_) => false,
    }
}

/// The median of `n` request round trips on one new connection from `ns`.
pub fn median_rtt(ns: &str, to: &str, n: usize) -> Duration {
    let mut s = connect(ns, to, Duration::from_secs(5)).expect("connect");
    let mut v: Vec<Duration> = (0..n).map(|_| http_get(&mut s).expect("request")).collect();
    v.sort();
    v[n / 2]
}

/// Sends `n` UDP datagrams from `from_ns` to `to` and counts how many arrive, with
/// the receiving socket bound in `to_ns`.
pub fn udp_delivery(from_ns: &str, to_ns: &str, to: &str, n: usize) -> usize {
    let to: SocketAddr = to.parse().expect("addr");
    let rx = in_ns(to_ns, move || {
        std::net::UdpSocket::bind(to).expect("bind udp")
    });
    rx.set_read_timeout(Some(Duration::from_millis(300))).ok();
    // Read while sending: a socket buffer holds only a few hundred datagrams.
    let reader = std::thread::spawn(move || {
        let mut got = 0;
        let mut buf = [0u8; 16];
        while rx.recv(&mut buf).is_ok() {
            got += 1;
        }
        got
    });
    let tx = in_ns(from_ns, || {
        std::net::UdpSocket::bind("0.0.0.0:0").expect("bind udp")
    });
    for i in 0..n {
        let _ = tx.send_to(&(i as u32).to_be_bytes(), to);
        if i % 20 == 19 {
            std::thread::sleep(Duration::from_micros(500));
        }
    }
    reader.join().expect("reader")
}

/// Sends `bytes` bytes to every connection, then closes it.
pub struct BulkServer {
    pub addr: SocketAddr,
    pub bytes: usize,
}

impl BulkServer {
    pub fn start(ns: &str, addr: &str, bytes: usize) -> BulkServer {
        let addr: SocketAddr = addr.parse().expect("addr");
        let listener = in_ns(ns, move || {
            TcpListener::bind(addr).expect("bind in namespace")
        });
        let addr = listener.local_addr().expect("local addr");
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                std::thread::spawn(move || {
                    let chunk = vec![7u8; 16 * 1024];
                    let mut left = bytes;
                    while left > 0 {
                        let n = left.min(chunk.len());
                        if conn.write_all(&chunk[..n]).is_err() {
                            return;
                        }
                        left -= n;
                    }
                });
            }
        });
        BulkServer { addr, bytes }
    }

    /// Downloads everything from namespace `ns`; returns the seconds it took.
    pub fn fetch_secs(&self, ns: &str) -> f64 {
        let mut s = connect(ns, &self.addr.to_string(), Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
        let t = Instant::now();
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0;
        while got < self.bytes {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        assert_eq!(got, self.bytes, "short download");
        let secs = t.elapsed().as_secs_f64();
        // The server closed after the last byte: the close must arrive too.
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        assert!(
            matches!(s.read(&mut buf), Ok(0)),
            "the server's close (FIN) never arrived"
        );
        secs
    }
}

/// One empty network namespace with loopback up (for a whole stack on its own lo);
/// deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Netns {
        let name = format!("gct-{}-solo", crate::marker());
        sh(&["ip", "netns", "add", &name]);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    /// A command run inside the namespace (nsenter execs it).
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.name))
            .arg("--")
            .arg(program);
        c
    }
}

impl Default for Netns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

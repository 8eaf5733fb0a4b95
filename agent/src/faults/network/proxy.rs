//! The userspace backend: a TCP proxy that nftables redirects matched connections
//! into. It recovers each connection's original destination (SO_ORIGINAL_DST),
//! connects there with SO_MARK set (so the redirect skips it), and forwards the bytes,
//! delaying those that flow in the fault's direction (latency, jitter with
//! correlation) and pacing them to a rate.
//!
//! Connections opened from the namespace to peers (role `out`) and by peers into the
//! namespace (role `in`) arrive on different listeners, so "egress" always means the
//! bytes leaving the namespace. Only TCP is delayed; UDP and ICMP pass untouched.
//! Connections that were open before the fault keep their direct path (nftables
//! redirects new connections only). On revert the listeners close and connections
//! already proxied go on forwarding without delay until they end (the redirect's
//! table is neutralized, not deleted, until then: see `nft::neutralize`); a drain that lasts
//! past its limit closes them ([`Proxy::close_all`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::nft::{PROXY_MARK, ProxyPorts};
use crate::sys::netns::{NsSockets, original_dst};

/// The shaping one direction of a connection gets.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Shaping {
    pub delay: Duration,
    pub jitter: Duration,
    /// 0..=1: how much each jitter sample follows the previous one.
    pub correlation: f64,
    pub rate_bps: Option<u64>,
}

impl Shaping {
    fn is_none(&self) -> bool {
        self.delay.is_zero() && self.rate_bps.is_none()
    }
}

/// What the proxy does, per direction of the namespace's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Config {
    pub egress: Shaping,
    pub ingress: Shaping,
    pub seed: u64,
}

#[derive(Debug, Default)]
pub struct Counters {
    pub connections: AtomicU64,
    pub active: AtomicU64,
    pub failed: AtomicU64,
    pub bytes_out: AtomicU64,
    pub bytes_in: AtomicU64,
}

impl Counters {
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "connections": self.connections.load(Ordering::Relaxed),
            "active": self.active.load(Ordering::Relaxed),
            "upstream_failures": self.failed.load(Ordering::Relaxed),
            "bytes_egress": self.bytes_out.load(Ordering::Relaxed),
            "bytes_ingress": self.bytes_in.load(Ordering::Relaxed),
        })
    }
}

/// A running proxy. Dropping it does not stop it: call [`Proxy::stop`].
pub struct Proxy {
    pub ports: ProxyPorts,
    pub counters: Arc<Counters>,
    shaping_on: Arc<AtomicBool>,
    stop: CancellationToken,
    /// Closes the connections still carried (the end of a drain).
    close: CancellationToken,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Out,
    In,
}

struct Shared {
    config: Config,
    close: CancellationToken,
    shaping_on: Arc<AtomicBool>,
    counters: Arc<Counters>,
    sockets: Arc<NsSockets>,
    conn_seq: AtomicU64,
}

impl Proxy {
    /// Binds the listeners inside the namespace `sockets` lives in and starts serving.
    pub async fn start(sockets: NsSockets, config: Config) -> std::io::Result<Proxy> {
        let sockets = Arc::new(sockets);
        // A redirect in the output hook always lands on loopback; one in prerouting
        // lands on the address of the interface the connection came in on.
        let addr = |a: &str| -> SocketAddr { a.parse().expect("literal address") };
        let out4 = sockets.listen(addr("127.0.0.1:0")).await?;
        let in4 = sockets.listen(addr("0.0.0.0:0")).await?;
        // IPv6 may be disabled in the namespace: then only IPv4 is redirected.
        let out6 = sockets.listen(addr("[::1]:0")).await.ok();
        let in6 = match out6 {
            Some(_) => sockets.listen(addr("[::]:0")).await.ok(),
            None => None,
        };
        let port = |l: &TcpListener| l.local_addr().ok().map(|a| a.port());
        let ports = ProxyPorts {
            out4: port(&out4),
            in4: port(&in4),
            out6: out6.as_ref().and_then(port),
            in6: in6.as_ref().and_then(port),
        };
        let shaping_on = Arc::new(AtomicBool::new(true));
        let counters = Arc::new(Counters::default());
        let stop = CancellationToken::new();
        let close = CancellationToken::new();
        let shared = Arc::new(Shared {
            config,
            close: close.clone(),
            shaping_on: Arc::clone(&shaping_on),
            counters: Arc::clone(&counters),
            sockets,
            conn_seq: AtomicU64::new(0),
        });
        let listeners = [
            Some((out4, Role::Out)),
            Some((in4, Role::In)),
            out6.map(|l| (l, Role::Out)),
            in6.map(|l| (l, Role::In)),
        ];
        for (l, role) in listeners.into_iter().flatten() {
            tokio::spawn(accept_loop(l, role, Arc::clone(&shared), stop.clone()));
        }
        Ok(Proxy {
            ports,
            counters,
            shaping_on,
            stop,
            close,
        })
    }

    /// Connections still being carried.
    pub fn active(&self) -> u64 {
        self.counters.active.load(Ordering::Relaxed)
    }

    /// Closes every connection still carried (both ends see the close).
    pub fn close_all(&self) {
        self.stop();
        self.close.cancel();
    }

    /// Stops accepting and stops delaying: connections already proxied go on
    /// forwarding at full speed until their ends close them.
    pub fn stop(&self) {
        self.shaping_on.store(false, Ordering::SeqCst);
        self.stop.cancel();
    }
}

async fn accept_loop(l: TcpListener, role: Role, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let conn = tokio::select! {
            _ = stop.cancelled() => return,
            c = l.accept() => c,
        };
        match conn {
            Ok((client, _)) => {
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    shared.counters.connections.fetch_add(1, Ordering::Relaxed);
                    shared.counters.active.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = serve(client, role, &shared).await {
                        tracing::debug!(error = %e, "proxied connection ended with an error");
                    }
                    shared.counters.active.fetch_sub(1, Ordering::Relaxed);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "proxy accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn serve(client: TcpStream, role: Role, shared: &Shared) -> std::io::Result<()> {
    let dst = original_dst(&client)?;
    // Not redirected (someone connected to the proxy's port directly): the original
    // destination is the proxy itself, and connecting there would loop forever.
    if dst == client.local_addr()? {
        return Err(std::io::Error::other(
            "a direct connection to the proxy's port (not redirected): refused",
        ));
    }
    let _ = client.set_nodelay(true);
    let cfg = shared.config;
    // "Egress" is the bytes leaving the namespace: client→upstream for connections
    // opened from inside, upstream→client for connections opened from outside.
    let (to_upstream, to_client) = match role {
        Role::Out => (cfg.egress, cfg.ingress),
        Role::In => (cfg.ingress, cfg.egress),
    };
    let seq = shared.conn_seq.fetch_add(1, Ordering::Relaxed);
    let mut rng_up = StdRng::seed_from_u64(cfg.seed ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut rng_down = StdRng::seed_from_u64(!cfg.seed ^ seq.wrapping_mul(0xC2B2_AE3D_27D4_EB4F));
    // The handshake crosses the delayed link too: a SYN one way, a SYN-ACK the other.
    if shared.shaping_on.load(Ordering::Relaxed) {
        let wait = to_upstream.delay + to_client.delay;
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
    let sock = shared.sockets.socket(dst.is_ipv6(), PROXY_MARK).await?;
    let upstream = match sock.connect(dst).await {
        Ok(s) => s,
        Err(e) => {
            shared.counters.failed.fetch_add(1, Ordering::Relaxed);
            // The client sees a reset, as it would have seen a refused connect. A
            // zero linger makes close send RST and return at once.
            crate::sys::netns::reset_on_close(&client);
            drop(client);
            return Err(e);
        }
    };
    let _ = upstream.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let (up_bytes, down_bytes) = match role {
        Role::Out => (&shared.counters.bytes_out, &shared.counters.bytes_in),
        Role::In => (&shared.counters.bytes_in, &shared.counters.bytes_out),
    };
    let a = pipe(
        cr,
        uw,
        to_upstream,
        &shared.shaping_on,
        up_bytes,
        &mut rng_up,
    );
    let b = pipe(
        ur,
        cw,
        to_client,
        &shared.shaping_on,
        down_bytes,
        &mut rng_down,
    );
    tokio::select! {
        (ra, rb) = async { tokio::join!(a, b) } => ra.and(rb),
        _ = shared.close.cancelled() => Err(std::io::Error::other(
            "closed: the drain after the fault's revert reached its limit",
        )),
    }
}

const CHUNK: usize = 16 * 1024;
const MIN_CHUNK: usize = 1460;
/// Chunks in flight per direction: backpressure for a delayed fast sender.
const QUEUE: usize = 256;

/// Forwards one direction: a reader stamps each chunk with its release time, a
/// writer releases chunks in order, no earlier than stamped and no faster than the rate.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shaping: Shaping,
    on: &AtomicBool,
    bytes: &AtomicU64,
    rng: &mut StdRng,
) -> std::io::Result<()> {
    if shaping.is_none() {
        let r = tokio::io::copy(&mut from, &mut to).await;
        if let Ok(n) = r {
            bytes.fetch_add(n, Ordering::Relaxed);
        }
        let _ = to.shutdown().await;
        return r.map(|_| ());
    }
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUE);
    let mut jitter = Jitter::new(shaping.correlation);
    // Small chunks at low rates: a chunk is sent whole, so at most ~10 ms of the rate.
    let chunk = shaping
        .rate_bps
        .map(|r| ((r / 8 / 100) as usize).clamp(MIN_CHUNK, CHUNK))
        .unwrap_or(CHUNK);
    // `async move`: the reader owns the sender, so its end (EOF or error) closes the
    // channel, and the writer then passes the close on (FIN) after the last chunk.
    let reader = async move {
        let mut buf = vec![0u8; chunk];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) => return Err(e),
            };
            let delay = if on.load(Ordering::Relaxed) {
                jitter.sample(shaping.delay, shaping.jitter, rng)
            } else {
                Duration::ZERO
            };
            if tx
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .await
                .is_err()
            {
                return Ok(());
            }
        }
    };
    let writer = async {
        let mut last = Instant::now();
        let mut paced = Instant::now();
        while let Some((at, chunk)) = rx.recv().await {
            // In order: a chunk never overtakes the one before it.
            let release = at.max(last);
            last = release;
            let shaping_on = on.load(Ordering::Relaxed);
            let when = if shaping_on {
                release.max(paced)
            } else {
                Instant::now()
            };
            // The timer has millisecond ticks: never wait on it for a time that has
            // already come (a rate that does not bind, a delay already served).
            if when > Instant::now() {
                tokio::time::sleep_until(when).await;
            }
            to.write_all(&chunk).await?;
            bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            if let (Some(rate), true) = (shaping.rate_bps, shaping_on) {
                let cost = Duration::from_secs_f64(chunk.len() as f64 * 8.0 / rate as f64);
                paced = paced.max(Instant::now() - cost.min(Duration::from_millis(5))) + cost;
            }
        }
        let _ = to.shutdown().await;
        Ok::<(), std::io::Error>(())
    };
    let (r, w) = tokio::join!(reader, writer);
    r.and(w)
}

/// netem-style jitter: uniform in ±jitter, each sample leaning on the previous one
/// by the correlation.
struct Jitter {
    correlation: f64,
    last: f64,
}

impl Jitter {
    fn new(correlation: f64) -> Self {
        Jitter {
            correlation: correlation.clamp(0.0, 1.0),
            last: 0.0,
        }
    }

    fn sample(&mut self, delay: Duration, jitter: Duration, rng: &mut StdRng) -> Duration {
        if jitter.is_zero() {
            return delay;
        }
        let fresh: f64 = rng.random_range(-1.0..=1.0);
        let u = self.correlation * self.last + (1.0 - self.correlation) * fresh;
        self.last = u;
        let d = delay.as_secs_f64() + u * jitter.as_secs_f64();
        Duration::from_secs_f64(d.max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_its_band_and_centres_on_the_delay() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut j = Jitter::new(0.25);
        let d = Duration::from_millis(100);
        let jit = Duration::from_millis(20);
        let samples: Vec<f64> = (0..10_000)
            .map(|_| j.sample(d, jit, &mut rng).as_secs_f64() * 1000.0)
            .collect();
        assert!(samples.iter().all(|s| (80.0..=120.0).contains(s)));
        let mean = samples.iter().sum::<f64>() / samples.len() as f64;
        assert!((mean - 100.0).abs() < 1.0, "mean {mean}");
        let mut j = Jitter::new(0.0);
        assert_eq!(j.sample(d, Duration::ZERO, &mut rng), d);
    }
}

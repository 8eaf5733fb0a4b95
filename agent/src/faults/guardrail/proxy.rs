//! The guardrail proxy: HTTP/1.1 and HTTP/2 (h2c) from clients, HTTP/1.1 to the
//! guardrail service. With no fault attached it forwards untouched: status, headers
//! (but hop-by-hop ones) and body bytes as the service sent them, streamed. With a
//! fault attached it draws, for each answer, which corruptions fire (seeded), and
//! applies them in a fixed order: a delay; then at most one answer that replaces the
//! service's (stall, reset, status, empty 200); then the verdict edits; then damage
//! to the body; for streamed answers, a cut or garbled chunks after N.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use gpuchaos_proto::spec::GuardrailSpec;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::verdict::{self, Edit, Miss};

type Body = BoxBody<Bytes, std::io::Error>;

/// Largest request or answer body the proxy reads whole.
const MAX_BODY: usize = 16 << 20;
/// Idle upstream connections kept per proxy.
const POOL: usize = 64;
/// How long a client may stay connected without sending anything.
const IDLE: Duration = Duration::from_secs(60);

/// What one fault has done so far, for its status and the controller.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub passed: AtomicU64,
    pub unsafe_seen: AtomicU64,
    pub upstream_errors: AtomicU64,
    corrupted: Mutex<BTreeMap<&'static str, u64>>,
    misses: Mutex<BTreeMap<String, u64>>,
    last_upstream_error: Mutex<String>,
}

impl Stats {
    fn count(&self, name: &'static str) {
        if let Ok(mut m) = self.corrupted.lock() {
            *m.entry(name).or_default() += 1;
        }
    }

    fn miss(&self, edit: &str, m: &Miss) {
        let key = match m {
            Miss::Unrecognised(why) => format!("{edit}: {why}"),
            Miss::Pointer(why) => format!("{edit}: json pointer: {why}"),
            Miss::NotApplicable => format!("{edit}: not applicable to this preset"),
        };
        if let Ok(mut map) = self.misses.lock()
            && (map.len() < 20 || map.contains_key(&key))
        {
            *map.entry(key).or_default() += 1;
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "requests": self.requests.load(Ordering::Relaxed),
            "passed_untouched": self.passed.load(Ordering::Relaxed),
            "unsafe_verdicts_from_upstream": self.unsafe_seen.load(Ordering::Relaxed),
            "corrupted": self.corrupted.lock().map(|m| m.clone()).unwrap_or_default(),
            "could_not_apply": self.misses.lock().map(|m| m.clone()).unwrap_or_default(),
            "upstream_errors": self.upstream_errors.load(Ordering::Relaxed),
            "last_upstream_error": self.last_upstream_error.lock().map(|m| m.clone()).unwrap_or_default(),
        })
    }
}

/// A fault attached to a proxy.
pub struct Active {
    pub spec: GuardrailSpec,
    pub stats: Arc<Stats>,
    rng: Mutex<StdRng>,
    /// Cancelled when the fault ends: stalled answers give up then.
    pub ended: CancellationToken,
    pub token: String,
    /// The fault's status details, where every answer's counts land at once.
    pub details: Mutex<Option<Arc<Mutex<serde_json::Value>>>>,
}

/// Publishes the counts into the fault's status when an answer is done.
struct Publish(Arc<Active>);

impl Drop for Publish {
    fn drop(&mut self) {
        let s = self.0.stats.json();
        if let Ok(slot) = self.0.details.lock()
            && let Some(d) = slot.as_ref()
            && let Ok(mut d) = d.lock()
        {
            if let Some(e) = s["last_upstream_error"].as_str()
                && !e.is_empty()
            {
                d["upstream_error"] = serde_json::json!(e);
            }
            d["answers"] = s;
        }
    }
}

impl Active {
    pub fn new(spec: GuardrailSpec, seed: u64, token: String) -> Active {
        Active {
            spec,
            stats: Arc::new(Stats::default()),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            ended: CancellationToken::new(),
            token,
            details: Mutex::new(None),
        }
    }

    /// One draw per configured corruption, in a fixed order (so a seed replays).
    fn draw(&self) -> Draw {
        let c = &self.spec.corrupt;
        let mut rng = match self.rng.lock() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        let mut fire = |p: Option<f64>| p.is_some_and(|p| rng.random::<f64>() < p);
        Draw {
            delay: fire(c.delay.map(|d| d.probability))
                .then(|| c.delay.map(|d| d.by.0))
                .flatten(),
            stall: fire(c.stall),
            reset: fire(c.reset),
            status: fire(c.status.map(|s| s.probability))
                .then(|| c.status.map(|s| s.code))
                .flatten(),
            empty: fire(c.empty_200),
            flip: fire(c.flip_verdict),
            allow: fire(c.force_allow),
            block: fire(c.force_block),
            shift: fire(c.shift_scores),
            drop: fire(c.drop_categories),
            malformed: fire(c.malformed_json),
            truncate: fire(c.truncate),
            stream_cut: fire(c.stream_cut.map(|s| s.probability))
                .then(|| c.stream_cut.map(|s| s.after))
                .flatten(),
            stream_corrupt: fire(c.stream_corrupt.map(|s| s.probability))
                .then(|| c.stream_corrupt.map(|s| s.after))
                .flatten(),
        }
    }
}

#[derive(Debug, Default)]
struct Draw {
    delay: Option<Duration>,
    stall: bool,
    reset: bool,
    status: Option<u16>,
    empty: bool,
    flip: bool,
    allow: bool,
    block: bool,
    shift: bool,
    drop: bool,
    malformed: bool,
    truncate: bool,
    stream_cut: Option<u32>,
    stream_corrupt: Option<u32>,
}

/// The guardrail service's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub url: String,
    pub host_port: String,
    /// SO_MARK on connections to it (transparent mode: the redirect skips them).
    pub mark: Option<u32>,
}

impl Upstream {
    pub fn parse(url: &str) -> Result<Upstream, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("{url:?} is not an http:// URL"))?;
        let host_port = rest.split('/').next().unwrap_or("").to_string();
        if host_port.is_empty() {
            return Err(format!("{url:?} has no host"));
        }
        let host_port = if host_port.contains(':') {
            host_port
        } else {
            format!("{host_port}:80")
        };
        Ok(Upstream {
            url: url.to_string(),
            host_port,
            mark: None,
        })
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

pub struct GuardrailProxy {
    pub listen: SocketAddr,
    pub upstream: Upstream,
    active: RwLock<Option<Arc<Active>>>,
    pool: Mutex<Vec<Sender>>,
    stop: CancellationToken,
    /// Cancels the connections passed through as raw bytes (no fault when they
    /// came); replaced by a fresh one at each attach.
    raw: Mutex<CancellationToken>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl GuardrailProxy {
    /// Binds `listen` and serves until stopped.
    pub async fn start(
        listen: SocketAddr,
        upstream: Upstream,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> std::io::Result<Arc<GuardrailProxy>> {
        let listener = TcpListener::bind(listen).await?;
        let proxy = Arc::new(GuardrailProxy {
            listen: listener.local_addr()?,
            upstream,
            active: RwLock::new(None),
            pool: Mutex::new(Vec::new()),
            stop: CancellationToken::new(),
            raw: Mutex::new(CancellationToken::new()),
            metrics,
        });
        tokio::spawn(Arc::clone(&proxy).accept_loop(listener));
        Ok(proxy)
    }

    /// The fault attached now, if any.
    pub fn active(&self) -> Option<Arc<Active>> {
        self.active.read().ok().and_then(|a| a.clone())
    }

    /// Attaches a fault; one at a time.
    pub fn attach(&self, a: Arc<Active>) -> Result<(), String> {
        let mut slot = self.active.write().map_err(|_| "proxy state poisoned")?;
        if slot.is_some() {
            return Err(format!(
                "the guardrail proxy at {} already carries another fault: one at a time",
                self.listen
            ));
        }
        *slot = Some(a);
        drop(slot);
        // Connections that came while no fault was attached carry bytes, not
        // answers: close them, so that from now on every answer passes the fault
        // (clients reconnect, as after any idle close).
        if let Ok(mut raw) = self.raw.lock() {
            raw.cancel();
            *raw = CancellationToken::new();
        }
        Ok(())
    }

    /// Detaches the fault with this token (no other): answers pass untouched again;
    /// stalled ones give up.
    pub fn detach(&self, token: &str) {
        if let Ok(mut slot) = self.active.write()
            && slot.as_ref().is_some_and(|a| a.token == token)
            && let Some(a) = slot.take()
        {
            a.ended.cancel();
        }
    }

    pub fn stop(&self) {
        if let Ok(mut slot) = self.active.write()
            && let Some(a) = slot.take()
        {
            a.ended.cancel();
        }
        self.stop.cancel();
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        loop {
            let accepted = tokio::select! {
                _ = self.stop.cancelled() => return,
                a = listener.accept() => a,
            };
            let (stream, _) = match accepted {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "guardrail proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            // A second handle on the socket: a `reset` sets SO_LINGER 0 through it, so
            // that closing the connection sends RST.
            let dup = stream
                .into_std()
                .and_then(|s| Ok((s.try_clone()?, s)))
                .and_then(|(dup, s)| Ok((Arc::new(dup), TcpStream::from_std(s)?)));
            let Ok((dup, stream)) = dup else { continue };
            let me = Arc::clone(&self);
            tokio::spawn(async move {
                // No fault, and an HTTP/1 client: bytes both ways, untouched, at the
                // speed of a splice. HTTP/2 (whose preface starts "PRI ") goes through
                // the HTTP path, which speaks HTTP/1.1 to the guardrail.
                // The token first: an attach after this point cancels this splice.
                let raw = me.raw.lock().map(|r| r.clone()).unwrap_or_default();
                let mut first = [0u8; 4];
                // A client that never speaks is closed after a while, and when the
                // proxy stops.
                let peeked = tokio::select! {
                    p = tokio::time::timeout(IDLE, stream.peek(&mut first)) => p,
                    _ = me.stop.cancelled() => return,
                };
                let h2 = matches!(peeked, Ok(Ok(4)) if &first == b"PRI ");
                if matches!(peeked, Err(_) | Ok(Err(_)) | Ok(Ok(0))) {
                    return;
                }
                if me.active().is_none() && !h2 {
                    me.splice(stream, raw).await;
                } else {
                    me.serve_http(stream, dup).await;
                }
            });
        }
    }

    async fn splice(self: Arc<Self>, mut client: TcpStream, raw: CancellationToken) {
        let mut upstream = match self.connect().await {
            Ok(u) => u,
            Err(e) => {
                // As the guardrail itself would: refused, with a reset.
                tracing::debug!(error = %e, "guardrail upstream unreachable");
                crate::sys::netns::reset_on_close(&client);
                return;
            }
        };
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
            _ = raw.cancelled() => {}
            _ = self.stop.cancelled() => {}
        }
    }

    async fn serve_http(self: Arc<Self>, stream: TcpStream, dup: Arc<std::net::TcpStream>) {
        let stop = self.stop.clone();
        // An HTTP/1.1 client sends one request at a time: its connection keeps one
        // upstream connection of its own (no pool, no lock contention).
        let own: Arc<Mutex<Option<Sender>>> = Arc::new(Mutex::new(None));
        let service = hyper::service::service_fn(move |req| {
            let me = Arc::clone(&self);
            let dup = Arc::clone(&dup);
            let own = Arc::clone(&own);
            async move { me.handle(req, dup, own).await }
        });
        let builder =
            hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
        let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        tokio::select! {
            _ = conn => {}
            _ = stop.cancelled() => {}
        }
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        dup: Arc<std::net::TcpStream>,
        own: Arc<Mutex<Option<Sender>>>,
    ) -> Result<Response<Body>, std::io::Error> {
        let active = self.active();
        let _publish = active.as_ref().map(|a| Publish(Arc::clone(a)));
        let draw = active.as_ref().map(|a| a.draw()).unwrap_or_default();
        if let Some(a) = &active {
            a.stats.requests.fetch_add(1, Ordering::Relaxed);
        }
        let count = |name: &'static str| {
            if let Some(a) = &active {
                a.stats.count(name);
            }
            self.metrics.guardrail(name);
        };
        if let Some(d) = draw.delay {
            count("delay");
            tokio::time::sleep(d).await;
        }
        if let (true, Some(a)) = (draw.stall, &active) {
            count("stall");
            // No answer until the fault ends (the client times out first, if its
            // timeout is shorter); then the connection closes.
            a.ended.cancelled().await;
            return Err(std::io::Error::other("stalled answer: the fault ended"));
        }
        if draw.reset {
            count("reset");
            crate::sys::netns::reset_on_close(&*dup);
            return Err(std::io::Error::other(
                "connection reset by the guardrail fault",
            ));
        }
        if let Some(code) = draw.status {
            count("status");
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return Ok(json_response(
                status,
                format!(
                    "{{\"error\":{{\"message\":\"{} (injected by gpuchaos)\"}}}}",
                    status
                ),
            ));
        }
        if draw.empty {
            count("empty_200");
            let mut r = Response::new(full(Bytes::new()));
            *r.status_mut() = StatusCode::OK;
            return Ok(r);
        }
        let upstream = match self.forward(req, &own).await {
            Ok(r) => r,
            Err(e) => {
                if let Some(a) = &active {
                    a.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut l) = a.stats.last_upstream_error.lock() {
                        *l = e.clone();
                    }
                }
                self.metrics.guardrail("upstream_error");
                return Ok(json_response(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "{{\"error\":{{\"message\":{}}}}}",
                        serde_json::Value::String(format!("gpuchaos guardrail proxy: {e}"))
                    ),
                ));
            }
        };
        let (mut parts, body) = upstream.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let streamed = is_stream(&parts.headers);
        let Some(a) = active.clone() else {
            // No fault: the bytes as they come.
            return Ok(Response::from_parts(
                parts,
                body.map_err(std::io::Error::other).boxed(),
            ));
        };
        if streamed {
            // Verdict edits and body damage need a whole answer: say so, never skip
            // them silently.
            for (fired, name) in [
                (draw.flip, "flip_verdict"),
                (draw.allow, "force_allow"),
                (draw.block, "force_block"),
                (draw.shift, "shift_scores"),
                (draw.drop, "drop_categories"),
                (draw.malformed, "malformed_json"),
                (draw.truncate, "truncate"),
            ] {
                if fired {
                    a.stats.miss(
                        name,
                        &Miss::Unrecognised(
                            "a streamed answer (use stream_cut / stream_corrupt)".into(),
                        ),
                    );
                }
            }
            return Ok(Response::from_parts(
                parts,
                self.stream_body(body, &draw, &a),
            ));
        }
        let bytes = collect(body).await?;
        if let Some(true) = verdict::is_unsafe(a.spec.preset, a.spec.json_pointer.as_ref(), &bytes)
        {
            a.stats.unsafe_seen.fetch_add(1, Ordering::Relaxed);
        }
        let mut out = bytes.to_vec();
        let mut touched = false;
        for (fired, edit) in [
            (draw.flip, Edit::Flip),
            (draw.allow, Edit::ForceAllow),
            (draw.block, Edit::ForceBlock),
            (draw.shift, Edit::ShiftScores),
            (draw.drop, Edit::DropCategories),
        ] {
            if !fired {
                continue;
            }
            match verdict::apply(a.spec.preset, a.spec.json_pointer.as_ref(), edit, &out) {
                Ok(b) => {
                    out = b;
                    touched = true;
                    count(edit.name());
                }
                Err(m) => a.stats.miss(edit.name(), &m),
            }
        }
        if draw.malformed {
            out = verdict::malformed(&out);
            touched = true;
            count("malformed_json");
        }
        if draw.truncate {
            out = verdict::truncated(&out);
            touched = true;
            count("truncate");
        }
        if touched {
            parts.headers.remove(hyper::header::CONTENT_LENGTH);
        } else {
            a.stats.passed.fetch_add(1, Ordering::Relaxed);
            self.metrics.guardrail("passed");
        }
        Ok(Response::from_parts(parts, full(Bytes::from(out))))
    }

    /// A streamed answer, cut or garbled after N data chunks when drawn so.
    fn stream_body(&self, body: Incoming, draw: &Draw, a: &Arc<Active>) -> Body {
        let cut = draw.stream_cut;
        let garble = draw.stream_corrupt;
        if cut.is_none() && garble.is_none() {
            a.stats.passed.fetch_add(1, Ordering::Relaxed);
            return body.map_err(std::io::Error::other).boxed();
        }
        if cut.is_some() {
            a.stats.count("stream_cut");
            self.metrics.guardrail("stream_cut");
        }
        if garble.is_some() {
            a.stats.count("stream_corrupt");
            self.metrics.guardrail("stream_corrupt");
        }
        let stream = futures_stream(body, cut, garble);
        BodyExt::boxed(StreamBody::new(stream))
    }

    /// Sends the request to the guardrail over HTTP/1.1: on the client connection's
    /// own upstream connection when it is free, else a pooled one.
    async fn forward(
        &self,
        req: Request<Incoming>,
        own: &Mutex<Option<Sender>>,
    ) -> Result<Response<Incoming>, String> {
        let (mut parts, body) = req.into_parts();
        let body = if hyper::body::Body::is_end_stream(&body) {
            Bytes::new()
        } else {
            collect(body)
                .await
                .map_err(|e| format!("reading the request: {e}"))?
        };
        strip_hop_by_hop(&mut parts.headers);
        // The answers are read and edited: ask for them uncompressed.
        parts.headers.insert(
            hyper::header::ACCEPT_ENCODING,
            hyper::header::HeaderValue::from_static("identity"),
        );
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        parts.uri = path.parse().map_err(|e| format!("bad path: {e}"))?;
        parts.version = hyper::Version::HTTP_11;
        // Explicit mode: the client addressed the proxy, so the guardrail gets its own
        // host (as a reverse proxy does). Transparent mode: the client addressed the
        // guardrail itself; its Host stands (HTTP/2's :authority becomes it).
        let authority = parts.uri.authority().map(|a| a.to_string());
        let host = if self.upstream.mark.is_none() {
            Some(self.upstream.host_port.clone())
        } else if !parts.headers.contains_key(hyper::header::HOST) {
            Some(authority.unwrap_or_else(|| self.upstream.host_port.clone()))
        } else {
            None
        };
        if let Some(h) = host.and_then(|h| h.parse().ok()) {
            parts.headers.insert(hyper::header::HOST, h);
        }
        let req = Request::from_parts(parts, Full::new(body));
        let mine = own
            .lock()
            .ok()
            .and_then(|mut o| o.take())
            .filter(|s| s.is_ready());
        let mut sender = match mine {
            Some(s) => s,
            None => self.sender().await?,
        };
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("the guardrail at {} failed: {e}", self.upstream.url))?;
        // Back to this client connection; one it already had goes to the pool.
        let spare = own.lock().ok().and_then(|mut o| o.replace(sender));
        if let Some(spare) = spare
            && let Ok(mut pool) = self.pool.lock()
            && pool.len() < POOL
        {
            pool.push(spare);
        }
        Ok(resp)
    }

    /// A TCP connection to the guardrail (marked in transparent mode).
    async fn connect(&self) -> Result<TcpStream, String> {
        let refused = |e: std::io::Error| {
            format!(
                "cannot connect to the guardrail at {} ({e}): is it running?",
                self.upstream.url
            )
        };
        let tcp = match self.upstream.mark {
            None => TcpStream::connect(&self.upstream.host_port)
                .await
                .map_err(refused)?,
            Some(mark) => {
                let addr: SocketAddr = self
                    .upstream
                    .host_port
                    .parse()
                    .map_err(|e| format!("{}: {e}", self.upstream.host_port))?;
                let sock = if addr.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()
                } else {
                    tokio::net::TcpSocket::new_v6()
                }
                .map_err(refused)?;
                nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::Mark, &mark)
                    .map_err(|e| format!("SO_MARK: {e}"))?;
                sock.connect(addr).await.map_err(refused)?
            }
        };
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    async fn sender(&self) -> Result<Sender, String> {
        let reusable = self.pool.lock().ok().and_then(|mut pool| {
            pool.retain(|s| !s.is_closed());
            let i = pool.iter().position(|s| s.is_ready())?;
            Some(pool.swap_remove(i))
        });
        if let Some(s) = reusable {
            return Ok(s);
        }
        let tcp = self.connect().await?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .map_err(|e| format!("HTTP handshake with {}: {e}", self.upstream.url))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }
}

fn full(b: Bytes) -> Body {
    Full::new(b)
        .map_err(|never: Infallible| match never {})
        .boxed()
}

fn json_response(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn collect(body: Incoming) -> Result<Bytes, std::io::Error> {
    let limited = http_body_util::Limited::new(body, MAX_BODY);
    limited
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| std::io::Error::other(format!("body: {e}")))
}

/// Streamed answers (server-sent events, newline-delimited JSON) are passed chunk by
/// chunk; every other answer, chunked or not, is read whole and can be edited.
fn is_stream(h: &hyper::HeaderMap) -> bool {
    h.get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.starts_with("text/event-stream")
                || v.starts_with("application/x-ndjson")
                || v.starts_with("application/jsonl")
        })
}

fn strip_hop_by_hop(h: &mut hyper::HeaderMap) {
    // Headers the Connection header names are hop-by-hop too.
    let named: Vec<String> = h
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|t| t.trim().to_ascii_lowercase()))
        .filter(|t| !t.is_empty())
        .collect();
    for name in named {
        h.remove(name.as_str());
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
    ] {
        h.remove(name);
    }
}

/// The frames of `body`; after `cut` data chunks the stream fails (the client sees
/// an incomplete answer); after `garble` data chunks each chunk is replaced by
/// garbage of the same length.
fn futures_stream(
    body: Incoming,
    cut: Option<u32>,
    garble: Option<u32>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, std::io::Error>> {
    futures_util::stream::unfold((body, 0u32, false), move |(mut body, n, done)| async move {
        if done {
            return None;
        }
        if cut.is_some_and(|c| n >= c) {
            return Some((
                Err(std::io::Error::other("stream cut by the guardrail fault")),
                (body, n, true),
            ));
        }
        match body.frame().await? {
            Ok(f) => match f.into_data() {
                Ok(data) => {
                    let data = if garble.is_some_and(|g| n >= g) {
                        Bytes::from(vec![b'#'; data.len()])
                    } else {
                        data
                    };
                    Some((Ok(Frame::data(data)), (body, n + 1, false)))
                }
                Err(f) => Some((Ok(f), (body, n, false))),
            },
            Err(e) => Some((Err(std::io::Error::other(e)), (body, n, true))),
        }
    })
}

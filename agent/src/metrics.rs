//! Prometheus metrics (OpenMetrics text) on the metrics address, at `/metrics`.
//!
//! - `gpuchaos_agent_active_faults{kind}`: faults injecting, active or reverting
//! - `gpuchaos_agent_injections_total{kind}`: faults verified active
//! - `gpuchaos_agent_reverts_total{kind,reason}`: faults reverted (revert, duration, lease, halt, shutdown, failed, recovery)
//! - `gpuchaos_agent_failures_total{kind,stage}`: inject or revert failures
//! - `gpuchaos_agent_inject_seconds{kind}`: request to verified-active
//! - `gpuchaos_agent_revert_seconds{kind}`: revert start to verified-undone
//! - `gpuchaos_agent_lease_expiries_total`, `gpuchaos_agent_sessions`
//! - `gpuchaos_agent_guardrail_answers_total{outcome}`: answers through the guardrail
//!   proxy while a fault is attached: `passed`, `upstream_error`, or the corruption

use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~100 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 21))
}

pub struct Metrics {
    registry: Registry,
    active: Family<Labels, Gauge>,
    injections: Family<Labels, Counter>,
    reverts: Family<Labels, Counter>,
    failures: Family<Labels, Counter>,
    inject_seconds: Family<Labels, Histogram>,
    revert_seconds: Family<Labels, Histogram>,
    lease_expiries: Counter,
    sessions: Gauge,
    guardrail: Family<Labels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("gpuchaos_agent");
        let active = Family::<Labels, Gauge>::default();
        let injections = Family::<Labels, Counter>::default();
        let reverts = Family::<Labels, Counter>::default();
        let failures = Family::<Labels, Counter>::default();
        let inject_seconds = Family::<Labels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let revert_seconds = Family::<Labels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let lease_expiries = Counter::default();
        let sessions = Gauge::default();
        registry.register(
            "active_faults",
            "Faults injecting, active or reverting",
            active.clone(),
        );
        registry.register("injections", "Faults verified active", injections.clone());
        registry.register("reverts", "Faults reverted, by reason", reverts.clone());
        registry.register("failures", "Inject or revert failures", failures.clone());
        registry.register(
            "inject_seconds",
            "Time from inject request to verified active",
            inject_seconds.clone(),
        );
        registry.register(
            "revert_seconds",
            "Time from revert start to verified undone",
            revert_seconds.clone(),
        );
        registry.register(
            "lease_expiries",
            "Sessions whose lease lapsed",
            lease_expiries.clone(),
        );
        registry.register("sessions", "Open sessions", sessions.clone());
        let guardrail = Family::<Labels, Counter>::default();
        registry.register(
            "guardrail_answers",
            "Answers through the guardrail proxy, by what was done to them",
            guardrail.clone(),
        );
        for k in gpuchaos_proto::spec::KINDS {
            active.get_or_create(&labels(&[("kind", k)])).set(0);
        }
        Metrics {
            registry,
            active,
            injections,
            reverts,
            failures,
            inject_seconds,
            revert_seconds,
            lease_expiries,
            sessions,
            guardrail,
        }
    }

    pub fn set_active(&self, kind: &str, n: i64) {
        self.active.get_or_create(&labels(&[("kind", kind)])).set(n);
    }
    pub fn injected(&self, kind: &str, secs: f64) {
        self.injections
            .get_or_create(&labels(&[("kind", kind)]))
            .inc();
        self.inject_seconds
            .get_or_create(&labels(&[("kind", kind)]))
            .observe(secs);
    }
    pub fn reverted(&self, kind: &str, reason: &str, secs: f64) {
        self.reverts
            .get_or_create(&labels(&[("kind", kind), ("reason", reason)]))
            .inc();
        self.revert_seconds
            .get_or_create(&labels(&[("kind", kind)]))
            .observe(secs);
    }
    pub fn failed(&self, kind: &str, stage: &str) {
        self.failures
            .get_or_create(&labels(&[("kind", kind), ("stage", stage)]))
            .inc();
    }
    pub fn lease_expired(&self) {
        self.lease_expiries.inc();
    }
    pub fn set_sessions(&self, n: i64) {
        self.sessions.set(n);
    }

    /// One answer through a guardrail proxy: `passed`, `upstream_error`, or the
    /// corruption applied (`flip_verdict`, `delay`, ...).
    pub fn guardrail(&self, outcome: &str) {
        self.guardrail
            .get_or_create(&labels(&[("outcome", outcome)]))
            .inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Serves `/metrics` until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    continue;
                }
            },
        };
        let m = Arc::clone(&metrics);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let m = Arc::clone(&m);
                async move { Ok::<_, std::convert::Infallible>(respond(&req, &m)) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
            {
                tracing::debug!(%peer, error = %e, "metrics connection ended");
            }
        });
    }
}

fn respond(req: &Request<hyper::body::Incoming>, m: &Metrics) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match req.uri().path() {
        "/metrics" => (
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            m.render(),
        ),
        "/healthz" => (200, "text/plain", "ok\n".to_string()),
        _ => (404, "text/plain", "not found: try /metrics\n".to_string()),
    };
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family() {
        let m = Metrics::new();
        m.injected("process", 0.002);
        m.reverted("process", "duration", 0.001);
        m.failed("process", "inject");
        m.lease_expired();
        m.set_sessions(2);
        let text = m.render();
        for want in [
            "gpuchaos_agent_active_faults{kind=\"process\"} 0",
            "gpuchaos_agent_injections_total{kind=\"process\"} 1",
            "gpuchaos_agent_reverts_total{kind=\"process\",reason=\"duration\"} 1",
            "gpuchaos_agent_failures_total{kind=\"process\",stage=\"inject\"} 1",
            "gpuchaos_agent_inject_seconds_count{kind=\"process\"} 1",
            "gpuchaos_agent_lease_expiries_total 1",
            "gpuchaos_agent_sessions 2",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
    }
}

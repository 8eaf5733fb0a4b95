//! The `guardrail` kind: a proxy in front of a safety filter that corrupts its answers.
//!
//! Explicit mode: the proxy listens on an address and forwards to the guardrail; the
//! inference service's guardrail URL points at the proxy. A proxy the agent was
//! started with (`--guardrail-proxy LISTEN=UPSTREAM`) stays up between faults and
//! passes answers untouched while none is attached, so the inference service can be
//! pointed at it for good; a fault on any other address starts a proxy for its own
//! duration. Nothing is put in the kernel: revert detaches the fault (and stops a
//! proxy started for it), and a proxy dies with the agent.
//!
//! Transparent mode (`intercept: ADDR`): nothing is re-pointed. An nftables table
//! `inet gpuchaos_<token>` (through [`crate::sys::nft`]) redirects new connections
//! to ADDR, made on this node or routed through it, into a proxy of the fault's own;
//! the proxy's own upstream connections carry a mark the redirect skips. Open
//! connections to ADDR are closed (`ss -K`) so that pooled clients reconnect through
//! the proxy. Revert deletes the table first, then stops the proxy; the start-up
//! sweep removes a table a killed agent left.

pub mod proxy;
pub mod verdict;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpuchaos_proto::spec::GuardrailSpec;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use self::proxy::{Active, GuardrailProxy, Upstream};
use super::{Applied, KindDriver, Planned, RevertError, Support};
use crate::error::AgentError;
use crate::metrics::Metrics;
use crate::sys::nft;
use crate::sys::tools::{Ns, Tool, Tools};

/// The mark on transparent-mode upstream connections, which the redirect skips.
pub const GUARDRAIL_MARK: u32 = 0x4743_0002;

/// The journaled plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuardrailPlan {
    /// Explicit mode: the proxy's address. Transparent mode: the intercepted one.
    pub listen: SocketAddr,
    /// Transparent mode: the nftables table that redirects to the proxy.
    #[serde(default)]
    pub table: Option<String>,
    pub upstream: String,
    /// A proxy the agent runs anyway (true), or one started for this fault.
    pub standing: bool,
    pub seed: u64,
    /// Names the attachment, so that a revert detaches this fault and no other.
    pub token: String,
}

struct Entry {
    proxy: Arc<GuardrailProxy>,
    standing: bool,
}

pub struct GuardrailDriver {
    metrics: Arc<Metrics>,
    proxies: Mutex<HashMap<SocketAddr, Entry>>,
    /// Transparent-mode proxies, by the fault's token.
    transparent: Mutex<HashMap<String, Arc<GuardrailProxy>>>,
    /// Whether transparent mode can work here (nftables, root), and why not.
    transparent_ok: Result<(), String>,
    /// The agent's own ports: intercepting them would cut the controller off.
    keep_ports: Vec<u16>,
    tools: Arc<dyn Tools>,
}

impl GuardrailDriver {
    pub fn new(
        metrics: Arc<Metrics>,
        transparent_ok: Result<(), String>,
        keep_ports: Vec<u16>,
        tools: Arc<dyn Tools>,
    ) -> Self {
        GuardrailDriver {
            metrics,
            proxies: Mutex::new(HashMap::new()),
            transparent: Mutex::new(HashMap::new()),
            transparent_ok,
            keep_ports,
            tools,
        }
    }

    /// The redirect: connections to `intercept`, made here or routed through here,
    /// go to the proxy's port; the proxy's own (marked) connections go through.
    fn redirect_script(table: &str, intercept: SocketAddr, port: u16) -> String {
        let fam = if intercept.is_ipv4() { "ip" } else { "ip6" };
        let m = format!(
            "{fam} daddr {} tcp dport {} redirect to :{port}",
            intercept.ip(),
            intercept.port()
        );
        format!(
            "table inet {table} {{\n  chain out {{\n    type nat hook output priority -110; policy accept;\n    meta mark {GUARDRAIL_MARK:#x} return\n    {m}\n  }}\n  chain pre {{\n    type nat hook prerouting priority -110; policy accept;\n    {m}\n  }}\n}}\n"
        )
    }

    async fn apply_transparent(
        &self,
        plan: &GuardrailPlan,
        active: &Arc<Active>,
        table: &str,
    ) -> Result<Arc<GuardrailProxy>, String> {
        let intercept = plan.listen;
        let any: SocketAddr = if intercept.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal")
        } else {
            "[::]:0".parse().expect("literal")
        };
        let upstream = Upstream {
            url: format!("http://{intercept}"),
            host_port: intercept.to_string(),
            mark: Some(GUARDRAIL_MARK),
        };
        let proxy = GuardrailProxy::start(any, upstream, Arc::clone(&self.metrics))
            .await
            .map_err(|e| format!("cannot start the transparent proxy: {e}"))?;
        if let Ok(mut m) = self.transparent.lock() {
            m.insert(plan.token.clone(), Arc::clone(&proxy));
        }
        proxy.attach(Arc::clone(active))?;
        let script = Self::redirect_script(table, intercept, proxy.listen.port());
        self.tools
            .run(None, Tool::Nft, &["-f".into(), "-".into()], Some(&script))
            .await
            .map_err(|e| e.to_string())?;
        // A redirect catches new connections only: abort this namespace's open ones to
        // the guardrail (keep-alive pools), so that they reconnect through the proxy.
        let killed = self
            .tools
            .run(
                None,
                Tool::Ss,
                &[
                    "-K".into(),
                    "dst".into(),
                    intercept.ip().to_string(),
                    "dport".into(),
                    "=".into(),
                    intercept.port().to_string(),
                ],
                None,
            )
            .await;
        if let Err(e) = killed {
            tracing::warn!(error = %e, "could not close the open connections to the guardrail; they keep their direct path");
        }
        // Read back before calling it active: three rules.
        match nft::count_rules(Ns::new(&*self.tools, None), table).await {
            Ok(Some(3)) => Ok(proxy),
            Ok(n) => Err(format!(
                "verify: table inet {table} holds {n:?} rules, 3 expected: something else is rewriting nftables; retry"
            )),
            Err(e) => Err(format!("verify: {e}")),
        }
    }

    /// Starts the standing proxies (`--guardrail-proxy`), which pass answers
    /// untouched until a fault attaches.
    pub async fn start_standing(&self, proxies: &[(SocketAddr, String)]) -> Result<(), String> {
        for (listen, url) in proxies {
            let upstream = Upstream::parse(url).map_err(|e| format!("--guardrail-proxy: {e}"))?;
            let p = GuardrailProxy::start(*listen, upstream, Arc::clone(&self.metrics))
                .await
                .map_err(|e| format!("--guardrail-proxy: cannot listen on {listen}: {e}"))?;
            tracing::info!(listen = %p.listen, upstream = %url, "guardrail proxy serving (pass-through)");
            self.proxies
                .lock()
                .map_err(|_| "proxy table poisoned")?
                .insert(
                    *listen,
                    Entry {
                        proxy: p,
                        standing: true,
                    },
                );
        }
        Ok(())
    }

    fn find(&self, listen: &SocketAddr) -> Option<(Arc<GuardrailProxy>, bool)> {
        self.proxies
            .lock()
            .ok()?
            .get(listen)
            .map(|e| (Arc::clone(&e.proxy), e.standing))
    }
}

impl KindDriver for GuardrailDriver {
    type Spec = GuardrailSpec;
    type Plan = GuardrailPlan;

    fn capability(&self) -> Support {
        let mut backends = vec!["explicit".to_string()];
        let reason = match &self.transparent_ok {
            Ok(()) => {
                backends.push("transparent".into());
                String::new()
            }
            Err(e) => format!("transparent mode (intercept:) unavailable: {e}"),
        };
        Support {
            supported: true,
            reason,
            backends,
        }
    }

    fn plan(&self, g: &GuardrailSpec) -> Result<Planned<GuardrailPlan>, AgentError> {
        if let Some(i) = &g.intercept {
            if let Err(e) = &self.transparent_ok {
                return Err(AgentError::Unsupported(format!(
                    "transparent mode is not available on this node: {e}; use listen: (explicit mode)"
                )));
            }
            let intercept: SocketAddr = i
                .parse()
                .map_err(|e| AgentError::Internal(format!("intercept: {e}")))?;
            if intercept.ip().is_loopback() || self.keep_ports.contains(&intercept.port()) {
                return Err(AgentError::Refused(format!(
                    "intercept {intercept}: loopback addresses and the agent's own ports cannot be intercepted (the redirect would catch the proxy's own traffic or the controller's)"
                )));
            }
            if self.transparent.lock().is_ok_and(|m| {
                m.values()
                    .any(|p| p.upstream.host_port == intercept.to_string())
            }) {
                return Err(AgentError::Refused(format!(
                    "{intercept} is already intercepted by another guardrail fault: one at a time"
                )));
            }
            let token = format!("{:016x}", rand::random::<u64>());
            let plan = GuardrailPlan {
                listen: intercept,
                table: Some(format!("gpuchaos_{}", &token[..8])),
                upstream: format!("http://{intercept}"),
                standing: false,
                seed: g.seed.unwrap_or_else(rand::random),
                token,
            };
            return Ok(Planned {
                target: format!("guardrail at {intercept} (intercepted): {}", g.effect()),
                plan,
            });
        }
        let listen: SocketAddr = g
            .listen
            .as_deref()
            .unwrap_or_default()
            .parse()
            .map_err(|e| AgentError::Internal(format!("listen: {e}")))?;
        let (upstream, standing) = match self.find(&listen) {
            Some((p, standing)) => {
                if let Some(u) = &g.upstream
                    && *u != p.upstream.url
                {
                    return Err(AgentError::Refused(format!(
                        "the guardrail proxy at {listen} forwards to {}, not {u}: leave upstream out, or use another listen address",
                        p.upstream.url
                    )));
                }
                if p.active().is_some() {
                    return Err(AgentError::Refused(format!(
                        "the guardrail proxy at {listen} already carries another fault: one at a time"
                    )));
                }
                (p.upstream.url.clone(), standing)
            }
            None => {
                let u = g.upstream.clone().ok_or_else(|| {
                    AgentError::Refused(format!(
                        "no guardrail proxy runs at {listen} on this node: give upstream: so the agent starts one for the fault, or start the agent with --guardrail-proxy {listen}=http://GUARDRAIL"
                    ))
                })?;
                Upstream::parse(&u).map_err(AgentError::Refused)?;
                (u, false)
            }
        };
        let plan = GuardrailPlan {
            listen,
            table: None,
            upstream: upstream.clone(),
            standing,
            seed: g.seed.unwrap_or_else(rand::random),
            token: format!("{:016x}", rand::random::<u64>()),
        };
        Ok(Planned {
            target: format!("guardrail proxy {listen} → {upstream}: {}", g.effect()),
            plan,
        })
    }

    async fn apply(
        self: Arc<Self>,
        spec: GuardrailSpec,
        plan: GuardrailPlan,
        _cancel: CancellationToken,
    ) -> Result<Applied, String> {
        if let Some(table) = &plan.table {
            let active = Arc::new(Active::new(spec.clone(), plan.seed, plan.token.clone()));
            let proxy = self.apply_transparent(&plan, &active, table).await?;
            let details = Arc::new(Mutex::new(serde_json::json!({
                "mode": "transparent",
                "intercept": plan.listen.to_string(),
                "proxy_port": proxy.listen.port(),
                "nft_table": format!("inet {table}"),
                "preset": spec.preset.name(),
                "seed": plan.seed,
                "upstream_error": "",
                "answers": active.stats.json(),
            })));
            if let Ok(mut slot) = active.details.lock() {
                *slot = Some(Arc::clone(&details));
            }
            return Ok(Applied {
                details,
                background: None,
                observations: None,
            });
        }
        let proxy = match self.find(&plan.listen) {
            Some((p, _)) => p,
            None => {
                let upstream = Upstream::parse(&plan.upstream)?;
                let p = GuardrailProxy::start(plan.listen, upstream, Arc::clone(&self.metrics))
                    .await
                    .map_err(|e| {
                        format!(
                            "cannot listen on {}: {e} (is something else there? pick a free address)",
                            plan.listen
                        )
                    })?;
                self.proxies
                    .lock()
                    .map_err(|_| "proxy table poisoned")?
                    .insert(
                        plan.listen,
                        Entry {
                            proxy: Arc::clone(&p),
                            standing: false,
                        },
                    );
                p
            }
        };
        let active = Arc::new(Active::new(spec.clone(), plan.seed, plan.token.clone()));
        proxy.attach(Arc::clone(&active))?;
        // Whether the guardrail answers at all: not a reason to refuse the fault
        // (a dead guardrail is a fault too), but the status must say so.
        let reach = match tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(&proxy.upstream.host_port),
        )
        .await
        {
            Ok(Ok(_)) => String::new(),
            Ok(Err(e)) => format!(
                "cannot connect to the guardrail at {} ({e}): the proxy answers 502 until it comes back",
                plan.upstream
            ),
            Err(_) => format!(
                "the guardrail at {} did not accept a connection within 2s",
                plan.upstream
            ),
        };
        let details = Arc::new(Mutex::new(serde_json::json!({
            "mode": "explicit",
            "listen": proxy.listen.to_string(),
            "upstream": plan.upstream,
            "preset": spec.preset.name(),
            "proxy": if plan.standing { "standing (stays, passing answers untouched, after the fault)" } else { "started for this fault (stops with it)" },
            "seed": plan.seed,
            "upstream_error": reach,
            "answers": active.stats.json(),
        })));
        if let Ok(mut slot) = active.details.lock() {
            *slot = Some(Arc::clone(&details));
        }
        Ok(Applied {
            details,
            background: None,
            observations: None,
        })
    }

    fn unreadable_plan_leftover(&self, plan: &str) -> String {
        format!(
            "an explicit proxy dies with the agent; a transparent one (intercept:) leaves a redirect table: look for tables named gpuchaos_* (`nft list tables`) and delete them (a restart of the agent sweeps them); the plan was {plan}"
        )
    }

    async fn revert(self: Arc<Self>, plan: GuardrailPlan) -> Result<(), RevertError> {
        if let Some(table) = &plan.table {
            // The redirect first (new connections go straight to the guardrail
            // again), then the proxy.
            let r = nft::delete(Ns::new(&*self.tools, None), table).await;
            // While the redirect stands, the proxy must keep serving it (detached:
            // untouched answers), or the guardrail would be unreachable.
            let proxy = self.transparent.lock().ok().and_then(|mut m| {
                if r.is_ok() {
                    m.remove(&plan.token)
                } else {
                    m.get(&plan.token).cloned()
                }
            });
            if let Some(p) = proxy {
                if r.is_ok() {
                    p.stop();
                } else {
                    p.detach(&plan.token);
                }
            }
            return r.map_err(|e| RevertError {
                message: e.to_string(),
                leftover: format!("nft delete table inet {table}"),
            });
        }
        let mut proxies = match self.proxies.lock() {
            Ok(p) => p,
            Err(p) => p.into_inner(),
        };
        if let Some(e) = proxies.get(&plan.listen) {
            e.proxy.detach(&plan.token);
            if !e.standing && e.proxy.active().is_none() {
                e.proxy.stop();
                proxies.remove(&plan.listen);
            }
        }
        Ok(())
    }
}

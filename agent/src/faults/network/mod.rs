//! The `network` kind: partitions and loss with nftables; latency, jitter and
//! bandwidth with tc (netem, htb) or the userspace proxy; in the node's own network
//! namespace or in the namespaces of target processes.
//!
//! What a fault owns, per namespace, is named by a random token journaled before any
//! effect: the table `inet gpuchaos_<token>`, the reserved qdisc handle `4743:` on the
//! interfaces it shapes, and ifb devices `gci<token><n>`. Revert removes exactly those
//! and reads back that they are gone; start-up recovery also sweeps every gpuchaos
//! table, reserved qdisc and ifb from the namespaces the journal names and the agent's
//! own.

pub mod proxy;
pub mod tc;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpuchaos_proto::spec::{Backend, NetworkSpec, Protocol};
use serde::{Deserialize, Serialize};

use super::select::Selector;
use tokio_util::sync::CancellationToken;

use super::{Applied, KindDriver, Planned, RevertError, Support};
use crate::error::AgentError;
use crate::failpoint;
use crate::policy::Policy;
use crate::sys::netns::{self, NetnsRef, NsSockets};
use crate::sys::nft;
use crate::sys::tools::{CmdError, Ns, Tool, Tools};

/// How the fault delays or shapes traffic, when it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shaper {
    /// tc htb (rate) and netem (delay).
    Netem,
    /// tc htb alone (a rate limit).
    Tc,
    /// The userspace proxy.
    Proxy,
}

/// One namespace the fault touches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NsPlan {
    /// None: the agent's own namespace.
    pub netns: Option<NetnsRef>,
    /// For humans: "node" or "netns of pid 812 (vllm)".
    pub label: String,
    /// Interfaces shaped with tc (egress), and the ifb each one's ingress goes through.
    pub shaped: Vec<String>,
    pub ifbs: Vec<(String, String)>,
    /// The interfaces the fault acts on (lo only when named), for the status.
    #[serde(default)]
    pub covers: Vec<String>,
}

/// The journaled plan: everything revert needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetPlan {
    pub token: String,
    pub table: String,
    pub shaper: Option<Shaper>,
    pub namespaces: Vec<NsPlan>,
    pub seed: u64,
}

/// What this node's kernel and tools can do, found once at start-up.
#[derive(Debug, Clone)]
pub struct NetCaps {
    /// Root, or CAP_NET_ADMIN and CAP_SYS_ADMIN (setns) in the effective set.
    pub privileged: bool,
    pub nft: bool,
    /// tc and ip present, and htb, u32, ingress and mirred work (tried in a
    /// throwaway namespace); `tc_why` says what is missing when not.
    pub tc: bool,
    pub tc_why: String,
    pub nsenter: bool,
    /// Err: why not ("this kernel has no netem", say).
    pub netem: Result<(), String>,
    /// The ifb module is loaded, built in, or installed. Never loaded here: loading it
    /// creates ifb0 and ifb1 in the root namespace (a kernel default); the first
    /// ingress shaping fault loads it.
    pub ifb: bool,
}

/// Capability numbers from linux/capability.h.
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;

/// Is this capability bit set in /proc/self/status's CapEff?
fn has_capability(bit: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << bit) != 0)
}

fn kernel_module_available(name: &str) -> bool {
    if std::path::Path::new(&format!("/sys/module/{name}")).exists() {
        return true;
    }
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let needle = format!("/{name}.ko");
    ["modules.builtin", "modules.dep"].iter().any(|f| {
        std::fs::read_to_string(format!("/lib/modules/{release}/{f}")).is_ok_and(|t| {
            t.lines()
                .any(|l| l.split(':').next().is_some_and(|m| m.contains(&needle)))
        })
    })
}

impl NetCaps {
    /// Probes tc and netem in a throwaway namespace (`unshare -n`), never on the
    /// node's own interfaces.
    /// Runs through `tools` (so each probe is bounded in time and logged).
    pub async fn detect(tools: &dyn Tools) -> NetCaps {
        let run = async |args: &[&str], stdin: Option<&str>| -> Result<(), String> {
            let mut argv = vec!["-n".to_string()];
            argv.extend(args.iter().map(|a| a.to_string()));
            tools
                .run(None, Tool::Unshare, &argv, stdin)
                .await
                .map(|_| ())
                .map_err(|e| e.message)
        };
        let tc = Tool::Tc.find();
        let ip = Tool::Ip.find();
        let (tc_ok, tc_why) = match (&tc, &ip) {
            (None, _) => (false, Tool::Tc.missing()),
            (_, None) => (false, Tool::Ip.missing()),
            (Some(tc), Some(_)) => {
                // The whole layout the agent builds, on the throwaway namespace's lo.
                let layout = "qdisc add dev lo root handle 4743: htb\n\
                    class add dev lo parent 4743: classid 4743:1 htb rate 1mbit\n\
                    filter add dev lo parent 4743: protocol all prio 12 u32 match u32 0 0 flowid 4743:1\n\
                    qdisc add dev lo handle ffff: ingress\n\
                    filter add dev lo parent ffff: protocol all prio 1 u32 match u32 0 0 action mirred egress redirect dev lo\n";
                match run(&[&tc.display().to_string(), "-batch", "-"], Some(layout)).await {
                    Ok(()) => (true, String::new()),
                    Err(e) => (
                        false,
                        format!(
                            "this kernel cannot build the tc layout (htb, u32, ingress, mirred): {e}"
                        ),
                    ),
                }
            }
        };
        let netem = match &tc {
            None => Err(Tool::Tc.missing()),
            Some(tc) => {
                let tc = tc.display().to_string();
                run(
                    &[
                        &tc, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
                    ],
                    None,
                )
                .await
                .map_err(|e| {
                    if e.contains("unknown") {
                        "this kernel has no netem (module sch_netem)".to_string()
                    } else {
                        format!("netem could not be tried: {e}")
                    }
                })
            }
        };
        // No module tree: nothing can be loaded, so trying it in a throwaway namespace
        // has no side effect (it works only when ifb is built in).
        let ifb = kernel_module_available("ifb")
            || (!std::path::Path::new("/lib/modules").exists()
                && match &ip {
                    Some(ip) => {
                        let ip = ip.display().to_string();
                        run(&[&ip, "link", "add", "gciprobe", "type", "ifb"], None)
                            .await
                            .is_ok()
                    }
                    None => false,
                });
        NetCaps {
            privileged: nix::unistd::geteuid().is_root()
                || (has_capability(CAP_NET_ADMIN) && has_capability(CAP_SYS_ADMIN)),
            nft: Tool::Nft.find().is_some(),
            tc: tc_ok,
            tc_why,
            nsenter: Tool::Nsenter.find().is_some(),
            netem,
            ifb,
        }
    }
}

pub struct NetworkDriver {
    selector: Arc<Selector>,
    tools: Arc<dyn Tools>,
    policy: Arc<Policy>,
    caps: NetCaps,
    /// The agent's own TCP ports, never cut in its own namespace.
    keep_ports: Vec<u16>,
    proxies: Mutex<HashMap<String, proxy::Proxy>>,
    /// Reverted proxy faults whose connections are still being carried: the table
    /// (neutralized, effect-free) is deleted once they end or the drain limit passes.
    drains: tokio_util::task::TaskTracker,
    drain_stop: tokio_util::sync::CancellationToken,
    /// Where the drains under way are written down (state directory), so that a
    /// start-up after a SIGKILL during a drain finds their namespaces.
    drain_file: Option<PathBuf>,
    drain_list: Mutex<Vec<DrainEntry>>,
}

/// A drain under way, as written in the drain file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct DrainEntry {
    table: String,
    ns: NsPlan,
}

/// The drain file's name in the state directory.
pub const DRAIN_FILE: &str = "network-drains.json";

/// How long connections proxied before a revert may go on after it before they are
/// closed and the redirect's table deleted.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(120);

fn token() -> String {
    format!("{:08x}", rand::random::<u32>())
}

fn internal(e: impl std::fmt::Display) -> AgentError {
    AgentError::Internal(e.to_string())
}

impl NetworkDriver {
    pub fn new(
        selector: Arc<Selector>,
        tools: Arc<dyn Tools>,
        policy: Arc<Policy>,
        caps: NetCaps,
        keep_ports: Vec<u16>,
    ) -> Self {
        NetworkDriver {
            selector,
            tools,
            policy,
            caps,
            keep_ports,
            proxies: Mutex::new(HashMap::new()),
            drains: tokio_util::task::TaskTracker::new(),
            drain_stop: tokio_util::sync::CancellationToken::new(),
            drain_file: None,
            drain_list: Mutex::new(Vec::new()),
        }
    }

    /// Where tools run for a namespace (None: the agent's own).
    fn ns<'a>(&'a self, path: Option<&'a std::path::Path>) -> Ns<'a> {
        Ns::new(&*self.tools, path)
    }

    /// Keeps the list of drains under way in `state_dir` (see [`DRAIN_FILE`]).
    pub fn with_drain_file(mut self, state_dir: &std::path::Path) -> Self {
        self.drain_file = Some(state_dir.join(DRAIN_FILE));
        self
    }

    /// Writes the drain list (new file, fsync, rename); a failure is logged (the
    /// start-up sweep of the node's own namespace still covers that one).
    fn save_drains(&self, list: &[DrainEntry]) {
        let Some(path) = &self.drain_file else {
            return;
        };
        let write = || -> std::io::Result<()> {
            if list.is_empty() {
                return match std::fs::remove_file(path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                };
            }
            let tmp = path.with_extension("json.tmp");
            let body = serde_json::to_vec(list).map_err(std::io::Error::other)?;
            {
                use std::io::Write;
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&body)?;
                f.sync_all()?;
            }
            std::fs::rename(&tmp, path)
        };
        if let Err(e) = write() {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the drain list");
        }
    }

    fn drain_started(&self, e: DrainEntry) {
        if let Ok(mut l) = self.drain_list.lock() {
            l.push(e);
            self.save_drains(&l);
        }
    }

    fn drain_ended(&self, table: &str) {
        if let Ok(mut l) = self.drain_list.lock() {
            l.retain(|d| d.table != table);
            self.save_drains(&l);
        }
    }

    /// The drains a previous run left under way (it died during them).
    fn leftover_drains(&self) -> Vec<DrainEntry> {
        self.drain_file
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Ends every drain now (agent shutdown): remaining proxied connections are
    /// closed and their tables deleted. Returns once all are done or `within` passes.
    pub async fn finish_drains(&self, within: Duration) {
        self.drain_stop.cancel();
        self.drains.close();
        let _ = tokio::time::timeout(within, self.drains.wait()).await;
    }

    /// The revert of a proxy fault in one namespace: the effects go at once (no new
    /// connection is redirected, nothing is delayed or dropped from now on), the
    /// proxy stops accepting and delaying, and the connections it already carries
    /// finish on their way; then the empty table goes.
    async fn drain_proxy(
        self: &Arc<Self>,
        path: Option<&std::path::Path>,
        table: &str,
        key: &str,
        ns: &NsPlan,
    ) -> Result<(), CmdError> {
        nft::neutralize(self.ns(path), table).await?;
        let Some(p) = self.proxies.lock().ok().and_then(|mut m| m.remove(key)) else {
            return nft::delete(self.ns(path), table).await;
        };
        p.stop();
        if p.active() == 0 {
            p.close_all();
            return nft::delete(self.ns(path), table).await;
        }
        tracing::info!(
            table,
            connections = p.active(),
            "reverted: letting the connections the proxy carries finish before the table goes"
        );
        let path = path.map(std::path::Path::to_path_buf);
        let table = table.to_string();
        let stop = self.drain_stop.clone();
        self.drain_started(DrainEntry {
            table: table.clone(),
            ns: ns.clone(),
        });
        let me = Arc::clone(self);
        self.drains.spawn(async move {
            let deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
            while p.active() > 0 && tokio::time::Instant::now() < deadline {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
            if p.active() > 0 {
                tracing::info!(table = %table, connections = p.active(), "closing the proxied connections still open");
            }
            p.close_all();
            // The connections' tasks see the close and drop their sockets.
            tokio::time::sleep(Duration::from_millis(50)).await;
            for _ in 0..3 {
                match nft::delete(me.ns(path.as_deref()), &table).await {
                    Ok(()) => {
                        me.drain_ended(&table);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(table = %table, error = %e, "deleting the drained table failed: retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            tracing::error!(table = %table, "the drained table could not be deleted (it holds no rules); start-up removes it");
        });
        Ok(())
    }

    fn shaper(&self, spec: &NetworkSpec) -> Result<Option<Shaper>, AgentError> {
        if !spec.shapes() {
            return Ok(None);
        }
        let tc_ok = self.caps.tc && (!spec.direction().ingress() || self.caps.ifb);
        let netem_ok = tc_ok && self.caps.netem.is_ok();
        // Why tc (htb) cannot shape here, and why netem cannot delay here.
        let tc_why = || -> String {
            if !self.caps.tc {
                self.caps.tc_why.clone()
            } else {
                "this kernel has no ifb devices for ingress shaping (module ifb): use direction: egress".into()
            }
        };
        let netem_why = || -> String {
            match &self.caps.netem {
                Err(e) => e.clone(),
                Ok(()) => tc_why(),
            }
        };
        let latency = spec.latency.is_some();
        let kernel_why = || if latency { netem_why() } else { tc_why() };
        let proxy_ok = || {
            if matches!(spec.protocol(), Protocol::Udp | Protocol::Icmp) {
                return Err(AgentError::Unsupported(format!(
                    "{} for {:?} traffic needs {} ({}): the userspace proxy only delays TCP",
                    if latency { "latency" } else { "a rate limit" },
                    spec.protocol(),
                    if latency { "netem" } else { "tc" },
                    kernel_why()
                )));
            }
            Ok(Shaper::Proxy)
        };
        Ok(Some(match spec.backend() {
            Backend::Proxy => proxy_ok()?,
            Backend::Netem if (latency && !netem_ok) || (!latency && !tc_ok) => {
                return Err(AgentError::Unsupported(format!(
                    "backend netem is not available on this node: {}; use backend: proxy (or auto)",
                    kernel_why()
                )));
            }
            Backend::Netem if latency => Shaper::Netem,
            Backend::Netem => Shaper::Tc,
            Backend::Auto if latency && netem_ok => Shaper::Netem,
            Backend::Auto if !latency && tc_ok => Shaper::Tc,
            Backend::Auto => proxy_ok()?,
        }))
    }

    /// The namespaces to touch: the agent's own, or those of the target processes.
    fn namespaces(
        &self,
        spec: &NetworkSpec,
        seed: u64,
    ) -> Result<Vec<(Option<NetnsRef>, String)>, AgentError> {
        let Some(t) = &spec.target else {
            return Ok(vec![(None, "node".into())]);
        };
        let matched = self.selector.select(&t.netns_of)?;
        let picked = Selector::pick(matched, t.netns_of.pick, seed);
        let own = netns::own_ino().map_err(internal)?;
        let mut out: Vec<(Option<NetnsRef>, String)> = Vec::new();
        let mut seen = Vec::new();
        for p in picked {
            let ino = match netns::ino_of(&netns::proc_ns_path(p.pid)) {
                Ok(i) => i,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(AgentError::NoTargets(format!(
                        "target.netns_of: pid {} ({}) exited before its namespace could be read",
                        p.pid, p.comm
                    )));
                }
                Err(e) => return Err(internal(format!("reading /proc/{}/ns/net: {e}", p.pid))),
            };
            if seen.contains(&ino) {
                continue;
            }
            seen.push(ino);
            if ino == own {
                out.push((
                    None,
                    format!("node (the namespace of pid {} ({}))", p.pid, p.comm),
                ));
            } else {
                out.push((
                    Some(NetnsRef {
                        pid: p.pid,
                        start_time: p.start_time,
                        ino,
                    }),
                    format!("netns of pid {} ({})", p.pid, p.comm),
                ));
            }
        }
        Ok(out)
    }

    /// Interfaces to shape in one namespace: the named one (checked), or every one
    /// but loopback, the protected ones and gpuchaos's own ifbs.
    fn interfaces(
        &self,
        spec: &NetworkSpec,
        ns: &Option<NetnsRef>,
        label: &str,
    ) -> Result<Vec<String>, AgentError> {
        let all = netns::interfaces(ns.as_ref().map(|n| n.pid))
            .map_err(|e| internal(format!("listing the interfaces of {label}: {e}")))?;
        let protected = &self.policy.file.protected_interfaces;
        match &spec.interface {
            Some(i) => {
                if !all.contains(i) {
                    return Err(AgentError::NoTargets(format!(
                        "interface: {i:?} does not exist in {label}; it has {}",
                        all.join(", ")
                    )));
                }
                if protected.contains(i) {
                    return Err(AgentError::Refused(format!(
                        "interface {i} is protected by this node's policy (protected_interfaces)"
                    )));
                }
                Ok(vec![i.clone()])
            }
            None => Ok(all
                .into_iter()
                .filter(|i| i != "lo" && !protected.contains(i) && !tc::is_our_ifb(i))
                .collect()),
        }
    }

    fn rules(&self, spec: &NetworkSpec, plan: &NetPlan, ns: &NsPlan) -> nft::Rules {
        let mut actions = Vec::new();
        if let Some(p) = spec.partition {
            actions.push(nft::Action::Partition(p));
        }
        if let Some(l) = spec.loss {
            actions.push(nft::Action::Loss(l.0));
        }
        let mut exclude = vec!["lo".to_string()];
        exclude.extend(self.policy.file.protected_interfaces.iter().cloned());
        nft::Rules {
            table: plan.table.clone(),
            direction: spec.direction,
            peers: spec.cidrs(),
            ports: spec.ports.iter().map(|p| *p as u16).collect(),
            protocol: spec.protocol,
            interface: spec.interface.clone(),
            exclude_ifaces: exclude,
            keep_ports: if ns.netns.is_none() {
                self.keep_ports.clone()
            } else {
                Vec::new()
            },
            actions,
            proxy: None,
        }
    }

    fn shape(&self, spec: &NetworkSpec, plan: &NetPlan, ns: &NsPlan, shaper: Shaper) -> tc::Shape {
        tc::Shape {
            class: tc::class_of(&plan.token),
            netem: match (shaper, spec.latency) {
                (Shaper::Netem, Some(l)) => Some(tc::Netem {
                    delay_us: l.0.as_micros() as u64,
                    jitter_us: spec.jitter.map(|j| j.0.as_micros() as u64).unwrap_or(0),
                    correlation: spec.correlation.map(|c| c.0).unwrap_or(0.0),
                }),
                _ => None,
            },
            rate_bps: spec.rate.map(|r| r.bits_per_sec),
            peers: spec.cidrs(),
            ports: spec.ports.iter().map(|p| *p as u16).collect(),
            protocol: spec.protocol,
            keep_ports: if ns.netns.is_none() {
                self.keep_ports.clone()
            } else {
                Vec::new()
            },
        }
    }

    fn proxy_config(spec: &NetworkSpec, seed: u64) -> proxy::Config {
        let shaping = proxy::Shaping {
            delay: spec.latency.map(|l| l.0).unwrap_or_default(),
            jitter: spec.jitter.map(|j| j.0).unwrap_or_default(),
            correlation: spec.correlation.map(|c| c.0 / 100.0).unwrap_or(0.0),
            rate_bps: spec.rate.map(|r| r.bits_per_sec),
        };
        let d = spec.direction();
        proxy::Config {
            egress: if d.egress() {
                shaping
            } else {
                proxy::Shaping::default()
            },
            ingress: if d.ingress() {
                shaping
            } else {
                proxy::Shaping::default()
            },
            seed,
        }
    }

    /// Applies one namespace's share and reads it back. Returns its status details.
    async fn apply_ns(
        &self,
        spec: &NetworkSpec,
        plan: &NetPlan,
        ns: &NsPlan,
    ) -> Result<serde_json::Value, String> {
        let path = ns_path(ns)
            .ok_or_else(|| format!(
                "{}: the namespace is gone (its processes exited since the fault was planned): inject again to target the live ones",
                ns.label
            ))?;
        let path = path.as_deref();
        let mut rules = self.rules(spec, plan, ns);
        let mut proxy_ports = None;
        if plan.shaper == Some(Shaper::Proxy) {
            let sockets = NsSockets::start(path)
                .map_err(|e| format!(
                    "{}: cannot enter the namespace ({e}): the agent needs root; if the workload just restarted, inject again",
                    ns.label
                ))?;
            let p = proxy::Proxy::start(sockets, Self::proxy_config(spec, plan.seed))
                .await
                .map_err(|e| format!("{}: cannot start the proxy: {e}", ns.label))?;
            rules.proxy = Some(p.ports);
            proxy_ports = Some(p.ports);
            // Kept under the plan's token (one proxy per namespace: suffix the label).
            self.proxies
                .lock()
                .map_err(|_| "proxy table poisoned".to_string())?
                .insert(format!("{}/{}", plan.token, ns.label), p);
        }
        let want_rules = rules.rule_count();
        if want_rules > 0 {
            nft::apply(self.ns(path), &rules)
                .await
                .map_err(|e| format!("{}: {e}", ns.label))?;
        }
        failpoint::hit("network-after-nft");
        let Some(shaper) = plan.shaper else {
            return self
                .verify_rules(path, ns, plan, want_rules, proxy_ports)
                .await;
        };
        if shaper != Shaper::Proxy {
            let shape = self.shape(spec, plan, ns, shaper);
            let d = spec.direction();
            for dev in &ns.shaped {
                let qs = tc::qdiscs(self.ns(path), dev)
                    .await
                    .map_err(|e| format!("{}: {e}", ns.label))?;
                tc::check_free(dev, &qs, d.egress(), d.ingress())
                    .map_err(|e| format!("{}: {e}", ns.label))?;
            }
            let mut ip_cmds = Vec::new();
            let mut tc_cmds = Vec::new();
            if d.egress() {
                for dev in &ns.shaped {
                    tc_cmds.extend(shape.commands(dev, false));
                }
            }
            for (dev, ifb) in &ns.ifbs {
                let (ip, tc) = tc::ingress_commands(dev, ifb);
                ip_cmds.extend(ip);
                tc_cmds.extend(tc);
                tc_cmds.extend(shape.commands(ifb, true));
            }
            if let Err((e, done)) = tc::batch(self.ns(path), Tool::Ip, &ip_cmds).await {
                tc::undo(self.ns(path), &ip_cmds[..done]).await;
                return Err(format!("{}: {e}", ns.label));
            }
            if let Err((e, done)) = tc::batch(self.ns(path), Tool::Tc, &tc_cmds).await {
                tc::undo(self.ns(path), &tc_cmds[..done]).await;
                tc::undo(self.ns(path), &ip_cmds).await;
                return Err(format!("{}: {e}", ns.label));
            }
            // Read every device back before calling it active.
            let want_filters = shape.matching_count();
            let mut devs: Vec<&String> = Vec::new();
            if d.egress() {
                devs.extend(ns.shaped.iter());
            }
            devs.extend(ns.ifbs.iter().map(|(_, i)| i));
            for dev in devs {
                let qs = tc::qdiscs(self.ns(path), dev)
                    .await
                    .map_err(|e| format!("{}: verify: {e}", ns.label))?;
                if !qs.iter().any(|q| q.root && q.handle == tc::ROOT_HANDLE) {
                    return Err(format!(
                        "{}: verify: {dev} has no root qdisc {} after applying: something else is rewriting tc on this node (a CNI plugin?); find it and retry",
                        ns.label,
                        tc::ROOT_HANDLE
                    ));
                }
                if shape.netem.is_some()
                    && !qs
                        .iter()
                        .any(|q| q.kind == "netem" && q.handle == tc::NETEM_HANDLE)
                {
                    return Err(format!(
                        "{}: verify: {dev} has no netem qdisc after applying: something else is rewriting tc on this node; find it and retry",
                        ns.label
                    ));
                }
                let n = tc::filters_to(self.ns(path), dev, &shape.class)
                    .await
                    .map_err(|e| format!("{}: verify: {e}", ns.label))?;
                if n != want_filters {
                    return Err(format!(
                        "{}: verify: {dev} carries {n} matching filters, {want_filters} expected: something else is rewriting tc on this node; find it and retry",
                        ns.label
                    ));
                }
            }
            for (dev, ifb) in &ns.ifbs {
                if !tc::ingress_filters(self.ns(path), dev, ifb)
                    .await
                    .map_err(|e| format!("{}: verify: {e}", ns.label))?
                    .0
                {
                    return Err(format!(
                        "{}: verify: {dev}'s ingress does not redirect to {ifb}: something else is rewriting tc on this node; find it and retry",
                        ns.label
                    ));
                }
            }
        }
        self.verify_rules(path, ns, plan, want_rules, proxy_ports)
            .await
    }

    async fn verify_rules(
        &self,
        path: Option<&std::path::Path>,
        ns: &NsPlan,
        plan: &NetPlan,
        want: usize,
        proxy_ports: Option<nft::ProxyPorts>,
    ) -> Result<serde_json::Value, String> {
        if want > 0 {
            let got = nft::count_rules(self.ns(path), &plan.table)
                .await
                .map_err(|e| format!("{}: verify: {e}", ns.label))?;
            if got != Some(want) {
                return Err(format!(
                    "{}: verify: table inet {} holds {} rules, {want} expected: something else is rewriting nftables on this node (a firewall manager flushing the ruleset?); find it and retry",
                    ns.label,
                    plan.table,
                    got.map(|n| n.to_string())
                        .unwrap_or_else(|| "no".to_string())
                ));
            }
        }
        let mut v = serde_json::json!({
            "where": ns.label,
            "interfaces": ns.covers,
            "nft_table": if want > 0 { format!("inet {}", plan.table) } else { String::new() },
            "nft_rules": want,
        });
        if !ns.shaped.is_empty() && plan.shaper.is_some_and(|s| s != Shaper::Proxy) {
            v["tc_interfaces"] = serde_json::json!(ns.shaped);
            v["ifb"] = serde_json::json!(ns.ifbs.iter().map(|(_, i)| i).collect::<Vec<_>>());
        }
        if let Some(p) = proxy_ports {
            v["proxy_ports"] = serde_json::json!({"out_v4": p.out4, "in_v4": p.in4, "out_v6": p.out6, "in_v6": p.in6});
        }
        Ok(v)
    }

    fn stop_proxy(&self, token: &str, label: &str) {
        if let Ok(mut m) = self.proxies.lock()
            && let Some(p) = m.remove(&format!("{token}/{label}"))
        {
            p.stop();
        }
    }

    /// What changed since the fault was verified: rules or qdiscs that someone else
    /// removed or altered, a namespace that went away. Empty when all is as applied.
    async fn drift(&self, plan: &NetPlan, expect: &[(usize, Vec<String>)]) -> Vec<String> {
        let mut out = Vec::new();
        for (ns, (want, tc_devs)) in plan.namespaces.iter().zip(expect) {
            let Some(path) = ns_path(ns) else {
                out.push(format!("{}: the namespace is gone", ns.label));
                continue;
            };
            let path = path.as_deref();
            if *want > 0 {
                match nft::count_rules(self.ns(path), &plan.table).await {
                    Ok(Some(n)) if n == *want => {}
                    Ok(Some(n)) => out.push(format!(
                        "{}: table inet {} holds {n} rules, {want} were applied",
                        ns.label, plan.table
                    )),
                    Ok(None) => out.push(format!(
                        "{}: table inet {} was deleted by someone else",
                        ns.label, plan.table
                    )),
                    Err(_) => {}
                }
            }
            for dev in tc_devs {
                if let Ok(qs) = tc::qdiscs(self.ns(path), dev).await
                    && !qs.iter().any(|q| q.root && q.handle == tc::ROOT_HANDLE)
                {
                    out.push(format!(
                        "{}: the root qdisc {} on {dev} was removed by someone else",
                        ns.label,
                        tc::ROOT_HANDLE
                    ));
                }
            }
        }
        out
    }

    async fn revert_plan(self: &Arc<Self>, plan: NetPlan) -> Result<(), RevertError> {
        let mut problems = Vec::new();
        let mut leftovers = Vec::new();
        for ns in &plan.namespaces {
            let Some(path) = ns_path(ns) else {
                // No process holds the namespace any more: its tables and qdiscs went
                // with it (or go when the proxy's thread, the last holder, ends).
                self.stop_proxy(&plan.token, &ns.label);
                continue;
            };
            let path = path.as_deref();
            let shown = path
                .map(|p| format!("nsenter --net={} ", p.display()))
                .unwrap_or_default();
            let key = format!("{}/{}", plan.token, ns.label);
            let proxied = plan.shaper == Some(Shaper::Proxy)
                && self.proxies.lock().is_ok_and(|m| m.contains_key(&key));
            let removed = if proxied {
                // Rules first, table after the proxied connections end.
                self.drain_proxy(path, &plan.table, &key, ns).await
            } else {
                nft::delete(self.ns(path), &plan.table).await
            };
            if let Err(e) = removed {
                problems.push(format!("{}: {e}", ns.label));
                leftovers.push(format!("{shown}nft delete table inet {}", plan.table));
            } else if !proxied
                && let Ok(Some(_)) = nft::count_rules(self.ns(path), &plan.table).await
            {
                problems.push(format!("{}: table {} is still there", ns.label, plan.table));
                leftovers.push(format!("{shown}nft delete table inet {}", plan.table));
            } else {
                // The redirect is gone: the proxy stops accepting and stops delaying.
                // (While the redirect stands, the proxy must keep serving it, or a
                // latency fault would turn into a partition.)
                self.stop_proxy(&plan.token, &ns.label);
            }
            for dev in &ns.shaped {
                let ifb = ns
                    .ifbs
                    .iter()
                    .find(|(d, _)| d == dev)
                    .map(|(_, i)| i.as_str());
                if let Err(e) =
                    tc::clean(self.ns(path), dev, Some(&tc::class_of(&plan.token)), ifb).await
                {
                    problems.push(format!("{}: {e}", ns.label));
                    leftovers.push(format!(
                        "{shown}tc qdisc del dev {dev} root; {shown}tc qdisc del dev {dev} ingress{}",
                        ifb.map(|i| format!("; {shown}ip link del {i}"))
                            .unwrap_or_default()
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(RevertError {
                message: problems.join("; "),
                leftover: leftovers.join("; "),
            })
        }
    }

    /// Removes every trace of gpuchaos from one namespace. Returns what it removed.
    async fn sweep_ns(&self, path: Option<&std::path::Path>) -> Vec<String> {
        let mut removed = Vec::new();
        let where_ = path
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "the agent's namespace".into());
        if let Ok(tables) = nft::own_tables(self.ns(path)).await {
            for (family, name) in tables {
                let r = self
                    .ns(path)
                    .run(
                        Tool::Nft,
                        &[
                            "delete".into(),
                            "table".into(),
                            family.clone(),
                            name.clone(),
                        ],
                        None,
                    )
                    .await;
                match r {
                    Ok(_) => removed.push(format!("{where_}: nft table {family} {name}")),
                    Err(e) => tracing::error!(error = %e, "sweep: cannot delete a gpuchaos table"),
                }
            }
        }
        let Ok(links) = tc::ip(self.ns(path), &["-j", "-d", "link", "show"]).await else {
            return removed;
        };
        let links: Vec<serde_json::Value> = serde_json::from_str::<serde_json::Value>(links.trim())
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default();
        let names: Vec<String> = links
            .iter()
            .filter_map(|l| l["ifname"].as_str().map(str::to_string))
            .collect();
        // Our ifbs: kind ifb, named gci + 8 hex digits + an index.
        let our_ifbs: Vec<String> = links
            .iter()
            .filter(|l| l["linkinfo"]["info_kind"].as_str() == Some("ifb"))
            .filter_map(|l| l["ifname"].as_str())
            .filter(|n| tc::is_our_ifb(n))
            .map(str::to_string)
            .collect();
        for dev in names.iter().filter(|n| !tc::is_our_ifb(n)) {
            let Ok(qs) = tc::qdiscs(self.ns(path), dev).await else {
                continue;
            };
            let ours_root = qs.iter().any(|q| q.root && q.handle == tc::ROOT_HANDLE);
            let ours_ingress = qs.iter().any(|q| q.kind == "ingress")
                && matches!(
                    tc::ingress_filters(self.ns(path), dev, "gci*").await,
                    Ok((true, _))
                );
            if ours_root && tc::clean(self.ns(path), dev, None, None).await.is_ok() {
                removed.push(format!("{where_}: root qdisc {} on {dev}", tc::ROOT_HANDLE));
            }
            if ours_ingress
                && tc::tc(
                    self.ns(path),
                    &["qdisc", "del", "dev", dev, "ingress"].map(str::to_string),
                )
                .await
                .is_ok()
            {
                removed.push(format!("{where_}: ingress qdisc on {dev}"));
            }
        }
        for ifb in &our_ifbs {
            if tc::ip(self.ns(path), &["link", "del", ifb]).await.is_ok() {
                removed.push(format!("{where_}: ifb {ifb}"));
            }
        }
        removed
    }
}

/// Where to run tools for a namespace: Some(None) for the agent's own, Some(path)
/// for another that still exists, None when it is gone.
fn ns_path(ns: &NsPlan) -> Option<Option<PathBuf>> {
    match &ns.netns {
        None => Some(None),
        Some(r) => netns::locate(r).map(Some),
    }
}

impl KindDriver for NetworkDriver {
    type Spec = NetworkSpec;
    type Plan = NetPlan;

    fn capability(&self) -> Support {
        let c = &self.caps;
        let mut backends = Vec::new();
        if c.nft {
            backends.push("nftables".to_string());
            backends.push("proxy".to_string());
        }
        if c.tc {
            backends.push("tc".to_string());
        }
        if c.tc && c.netem.is_ok() {
            backends.push("netem".to_string());
        }
        let (supported, reason) = if !c.privileged {
            (
                false,
                "network faults need root (CAP_NET_ADMIN and CAP_SYS_ADMIN): run the agent as root"
                    .to_string(),
            )
        } else if !c.nft {
            (false, Tool::Nft.missing())
        } else if !c.nsenter {
            (false, Tool::Nsenter.missing())
        } else {
            let mut notes = Vec::new();
            if let Err(e) = &c.netem {
                notes.push(format!("{e}: latency uses the userspace proxy (TCP only)"));
            }
            if !c.tc {
                notes.push(format!("{}: no tc shaping", c.tc_why));
            } else if !c.ifb {
                notes.push("no ifb devices: ingress shaping uses the userspace proxy".into());
            }
            (true, notes.join("; "))
        };
        Support {
            supported,
            reason,
            backends,
        }
    }

    fn plan(&self, n: &NetworkSpec) -> Result<Planned<NetPlan>, AgentError> {
        let shaper = self.shaper(n)?;
        let seed = n.seed.unwrap_or_else(rand::random);
        let token = token();
        let mut namespaces = Vec::new();
        // A fault that can hit no traffic is refused, never reported verified: peers
        // reached only over loopback are left alone unless lo is named.
        let loopback_only = !n.peers.is_empty()
            && n.cidrs()
                .iter()
                .all(|c| c.addr.is_loopback() && c.prefix >= 8);
        if loopback_only && n.interface.as_deref() != Some("lo") {
            return Err(AgentError::NoTargets(format!(
                "the peers {} are reached over lo, which a fault leaves alone unless it is named: add interface: lo",
                n.peers.join(", ")
            )));
        }
        for (i, (netns, label)) in self.namespaces(n, seed)?.into_iter().enumerate() {
            let tc_shaped = matches!(shaper, Some(Shaper::Netem | Shaper::Tc));
            let ifaces = self.interfaces(n, &netns, &label)?;
            if ifaces.is_empty() {
                return Err(AgentError::NoTargets(format!(
                    "{label} has no interface the fault would act on: lo is left alone unless named and the others are protected; to delay or cut local traffic, add interface: lo"
                )));
            }
            let covers = ifaces.clone();
            let (shaped, ifbs) = if tc_shaped {
                let ifbs = if n.direction().ingress() {
                    ifaces
                        .iter()
                        .enumerate()
                        .map(|(j, d)| {
                            (
                                d.clone(),
                                format!("{}{token}{}", tc::IFB_PREFIX, i * 10 + j),
                            )
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                (ifaces, ifbs)
            } else {
                (Vec::new(), Vec::new())
            };
            if ifbs.iter().any(|(_, i): &(String, String)| i.len() > 15) {
                return Err(AgentError::NoTargets(format!(
                    "{label}: too many interfaces to shape at once; name one with interface:"
                )));
            }
            namespaces.push(NsPlan {
                netns,
                label,
                shaped,
                ifbs,
                covers,
            });
        }
        let plan = NetPlan {
            table: format!("{}{token}", nft::TABLE_PREFIX),
            token,
            shaper,
            namespaces,
            seed,
        };
        let mut target = format!(
            "{} on {}",
            n.effect(),
            plan.namespaces
                .iter()
                .map(|n| n.label.clone())
                .collect::<Vec<_>>()
                .join(", ")
        );
        if !n.peers.is_empty() {
            target.push_str(&format!(" to/from {}", n.peers.join(", ")));
        }
        if !n.ports.is_empty() {
            let ports: Vec<String> = n.ports.iter().map(|p| p.to_string()).collect();
            target.push_str(&format!(" port {}", ports.join(",")));
        }
        // Say what it covers: traffic over lo (a client on the same node) is not
        // affected unless lo is named.
        let mut via: Vec<String> = plan
            .namespaces
            .iter()
            .flat_map(|n| n.covers.clone())
            .collect();
        via.dedup();
        target.push_str(&format!(" via {}", via.join(", ")));
        if n.interface.is_none() {
            target.push_str(" (not lo: add interface: lo for local traffic)");
        }
        Ok(Planned { target, plan })
    }

    async fn apply(
        self: Arc<Self>,
        spec: NetworkSpec,
        plan: NetPlan,
        cancel: CancellationToken,
    ) -> Result<Applied, String> {
        let mut per_ns = Vec::new();
        for ns in &plan.namespaces {
            per_ns.push(self.apply_ns(&spec, &plan, ns).await?);
        }
        let details = Arc::new(Mutex::new(serde_json::json!({
            "effect": spec.effect(),
            "direction": format!("{:?}", spec.direction()).to_lowercase(),
            "backend": plan.shaper.map(|s| format!("{s:?}").to_lowercase()).unwrap_or_else(|| "nftables".into()),
            "seed": plan.seed,
            "namespaces": per_ns,
        })));
        if plan.shaper == Some(Shaper::Proxy)
            && let Ok(mut d) = details.lock()
        {
            let mut note = String::from(
                "the proxy backend completes a client's TCP handshake at once (connect() does not see the latency, unlike netem) and delays the first bytes instead; connections opened before the fault keep their direct path",
            );
            if spec.protocol() != Protocol::Tcp {
                note.push_str("; it delays TCP only: UDP and ICMP pass undelayed");
            }
            d["note"] = serde_json::json!(note);
        }
        // While active: live proxy counters, and every 2 s the kernel state read
        // back again, so that rules someone else flushed show in the status.
        // Per namespace: the rules applied, and the devices carrying the root qdisc.
        let tc_shaped = plan.shaper.is_some_and(|s| s != Shaper::Proxy);
        let expect: Vec<(usize, Vec<String>)> = per_ns
            .iter()
            .zip(&plan.namespaces)
            .map(|(v, ns)| {
                let mut devs: Vec<String> = Vec::new();
                if tc_shaped {
                    if spec.direction().egress() {
                        devs.extend(ns.shaped.iter().cloned());
                    }
                    devs.extend(ns.ifbs.iter().map(|(_, i)| i.clone()));
                }
                (v["nft_rules"].as_u64().unwrap_or(0) as usize, devs)
            })
            .collect();
        let me = Arc::clone(&self);
        let d = Arc::clone(&details);
        let cancel = cancel.clone();
        let background = Some(tokio::spawn(async move {
            let mut reported: Vec<String> = Vec::new();
            for tick in 0u64.. {
                if plan.shaper == Some(Shaper::Proxy) {
                    let counters = me.proxies.lock().ok().map(|m| {
                        m.iter()
                            .filter(|(k, _)| k.starts_with(&format!("{}/", plan.token)))
                            .map(|(_, p)| p.counters.json())
                            .collect::<Vec<_>>()
                    });
                    if let (Some(c), Ok(mut d)) = (counters, d.lock()) {
                        d["proxy"] = serde_json::json!(c);
                    }
                }
                if tick % 4 == 3 {
                    let drift = me.drift(&plan, &expect).await;
                    if drift != reported {
                        for problem in drift.iter().filter(|p| !reported.contains(p)) {
                            tracing::warn!(table = %plan.table, problem = %problem,
                                "network fault no longer in effect as applied");
                        }
                        if let Ok(mut d) = d.lock() {
                            d["drift"] = serde_json::json!(drift);
                        }
                        reported = drift;
                    }
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }));
        Ok(Applied {
            details,
            background,
            observations: None,
        })
    }

    async fn revert(self: Arc<Self>, plan: NetPlan) -> Result<(), RevertError> {
        self.revert_plan(plan).await
    }

    fn unreadable_plan_leftover(&self, plan: &str) -> String {
        format!(
            "unknown: look for nftables tables named gpuchaos_* (`nft list tables`) and qdisc 4743: (`tc qdisc show`); the plan was {plan}"
        )
    }

    async fn sweep(self: Arc<Self>, plans: Vec<NetPlan>) -> Vec<String> {
        if !(self.caps.privileged && self.caps.nft) {
            return Vec::new();
        }
        let mut paths: Vec<Option<PathBuf>> = vec![None];
        // Namespaces of drains a killed agent left under way, and of open plans.
        let drained: Vec<NsPlan> = self.leftover_drains().into_iter().map(|d| d.ns).collect();
        let planned = plans.into_iter().flat_map(|plan| plan.namespaces);
        for ns in drained.into_iter().chain(planned) {
            if let Some(Some(path)) = ns_path(&ns)
                && !paths.contains(&Some(path.clone()))
            {
                paths.push(Some(path));
            }
        }
        let mut removed = Vec::new();
        for p in &paths {
            removed.extend(self.sweep_ns(p.as_deref()).await);
        }
        self.save_drains(&[]);
        removed
    }
}

/// Planning, verification and revert against recording fakes (no root, no kernel
/// state): the privileged end-to-end tests (tests/tests/network.rs) run the same
/// paths on real nftables and tc.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::{ApplyCtx, FaultDriver, typed};
    use crate::policy::PolicyFile;
    use crate::sys::fake::{FakeTools, NoGpus, workers};
    use gpuchaos_proto::spec::FaultSpec;

    fn caps() -> NetCaps {
        NetCaps {
            privileged: true,
            nft: true,
            tc: false,
            tc_why: "no tc in the fake".into(),
            nsenter: true,
            netem: Err("no netem in the fake".into()),
            ifb: false,
        }
    }

    fn rig() -> (Arc<FakeTools>, Arc<dyn FaultDriver>) {
        let tools = Arc::new(FakeTools::default());
        let policy = Arc::new(Policy::new(PolicyFile::default()).unwrap());
        let selector = Arc::new(Selector::new(
            workers(),
            Arc::new(NoGpus),
            Arc::clone(&policy),
        ));
        let driver = NetworkDriver::new(selector, tools.clone(), policy, caps(), vec![7000, 7001]);
        (tools, typed(Arc::new(driver)))
    }

    fn spec(yaml: &str) -> FaultSpec {
        FaultSpec::from_yaml_multi(yaml).unwrap().remove(0)
    }

    async fn apply(
        d: &Arc<dyn FaultDriver>,
        s: FaultSpec,
        plan: &crate::faults::Plan,
    ) -> Result<Applied, String> {
        Arc::clone(d)
            .apply(ApplyCtx {
                id: "f".into(),
                spec: s,
                plan: plan.revert.clone(),
                cancel: CancellationToken::new(),
            })
            .await
    }

    const PARTITION: &str = "kind: network\nduration: 30s\ninterface: lo\npeers: [127.0.0.1]\nports: [8000]\npartition: reject\n";

    #[tokio::test]
    async fn a_partition_is_applied_as_one_table_verified_and_reverted_idempotently() {
        let (tools, d) = rig();
        let s = spec(PARTITION);
        let plan = d.plan(&s).unwrap();
        assert!(plan.target.contains("via lo"), "{}", plan.target);
        assert!(
            tools.lines().is_empty(),
            "planning touches nothing: {:?}",
            tools.lines()
        );
        let table = plan.revert["table"].as_str().unwrap().to_string();
        assert!(table.starts_with(nft::TABLE_PREFIX), "{table}");

        let applied = apply(&d, s, &plan).await.unwrap();
        let calls = tools.calls.lock().unwrap().clone();
        assert_eq!(calls[0].line(), "nft -f -", "one transaction first");
        let script = calls[0].stdin.clone().unwrap();
        assert!(script.contains(&format!("table inet {table}")), "{script}");
        assert!(script.contains("th dport { 8000 }"), "{script}");
        assert!(
            script.contains("tcp sport { 7000, 7001 } accept"),
            "the agent's own ports stay: {script}"
        );
        assert!(script.contains("reject"), "{script}");
        assert_eq!(
            calls[1].line(),
            format!("nft -j list table inet {table}"),
            "read back"
        );
        let rules = tools
            .tables
            .lock()
            .unwrap()
            .values()
            .next()
            .unwrap()
            .rules();
        let details = applied.details.lock().unwrap().clone();
        assert_eq!(details["namespaces"][0]["nft_rules"], rules, "{details}");
        assert!(rules > 0);
        if let Some(bg) = applied.background {
            bg.abort();
        }

        Arc::clone(&d).revert(plan.revert.clone()).await.unwrap();
        assert!(tools.tables.lock().unwrap().is_empty(), "the table is gone");
        assert!(
            tools
                .lines()
                .contains(&format!("nft delete table inet {table}"))
        );
        // Again, with the table already gone: still a success.
        Arc::clone(&d).revert(plan.revert).await.unwrap();
    }

    #[tokio::test]
    async fn rules_that_do_not_read_back_fail_verification() {
        let (tools, d) = rig();
        tools
            .flush_on_create
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let s = spec(PARTITION);
        let plan = d.plan(&s).unwrap();
        let e = apply(&d, s, &plan).await.unwrap_err();
        assert!(e.contains("holds 0 rules") && e.contains("expected"), "{e}");
        // The manager reverts a fault that failed verification: nothing stays.
        Arc::clone(&d).revert(plan.revert).await.unwrap();
        assert!(tools.tables.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_failed_apply_and_a_failed_revert_say_what_is_left() {
        let (tools, d) = rig();
        tools.fail(
            "nft -f",
            "Error: Could not process rule: Operation not permitted",
        );
        let s = spec(PARTITION);
        let plan = d.plan(&s).unwrap();
        let e = apply(&d, s, &plan).await.unwrap_err();
        assert!(e.contains("Operation not permitted"), "{e}");

        let (tools, d) = rig();
        let s = spec(PARTITION);
        let plan = d.plan(&s).unwrap();
        apply(&d, s, &plan).await.unwrap();
        tools.fail("nft delete", "Error: Operation not permitted");
        let e = Arc::clone(&d)
            .revert(plan.revert.clone())
            .await
            .unwrap_err();
        let table = plan.revert["table"].as_str().unwrap();
        assert!(e.message.contains("Operation not permitted"), "{e:?}");
        assert_eq!(e.leftover, format!("nft delete table inet {table}"));
    }

    #[tokio::test]
    async fn an_unreadable_plan_names_where_to_look() {
        let (_, d) = rig();
        let e = Arc::clone(&d)
            .revert(serde_json::json!({"table": 5}))
            .await
            .unwrap_err();
        assert!(
            e.message
                .starts_with("unreadable network plan in the journal"),
            "{e:?}"
        );
        assert!(e.leftover.contains("nft list tables"), "{e:?}");
    }

    #[tokio::test]
    async fn planning_refuses_or_plans_with_nothing_run() {
        let (tools, d) = rig();
        for (yaml, want) in [
            (
                "kind: network\nduration: 30s\npeers: [127.0.0.1]\npartition: drop\n",
                "add interface: lo",
            ),
            (
                "kind: network\nduration: 30s\ninterface: lo\nlatency: 100ms\n",
                "",
            ),
        ] {
            match d.plan(&spec(yaml)) {
                Err(e) => assert!(
                    !want.is_empty() && e.to_string().contains(want),
                    "{yaml}: {e}"
                ),
                Ok(p) => assert!(want.is_empty(), "{yaml}: planned {}", p.target),
            }
        }
        assert!(tools.lines().is_empty(), "{:?}", tools.lines());
    }

    #[tokio::test]
    async fn the_sweep_removes_gpuchaos_tables_only() {
        let (tools, d) = rig();
        for name in ["gpuchaos_deadbeef", "filter"] {
            tools
                .tables
                .lock()
                .unwrap()
                .insert((None, name.into()), crate::sys::fake::FakeTable::default());
        }
        let removed = Arc::clone(&d).sweep(vec![]).await;
        assert_eq!(
            removed,
            vec!["the agent's namespace: nft table inet gpuchaos_deadbeef"]
        );
        let left: Vec<String> = tools
            .tables
            .lock()
            .unwrap()
            .keys()
            .map(|k| k.1.clone())
            .collect();
        assert_eq!(left, vec!["filter"]);
    }
}

//! tc: latency and jitter with netem, bandwidth with htb, per interface.
//!
//! Layout on an interface (egress), all under the reserved handle `4743:`:
//!
//! ```text
//! root 4743: htb            unmatched traffic goes straight through (no default class)
//!   class 4743:T htb rate R  matched traffic; T = 4 hex digits of the fault's token,
//!                            R = the limit, or 100gbit without one
//!     qdisc 4744: netem      the delay, when there is one
//! filters on 4743:           prio 1: the agent's own ports → 4743: (direct)
//!                            prio 10-12: peers / ports / protocol → 4743:T
//! ```
//!
//! Ingress goes through an ifb device (`gci<token><n>`) that the interface's ingress
//! qdisc redirects every packet to, and the same layout on the ifb, matching sources.
//! The agent never replaces a root or ingress qdisc it did not create.

use gpuchaos_proto::spec::{Cidr, Protocol};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::sys::tools::{CmdError, Ns, Tool};

pub const ROOT_HANDLE: &str = "4743:";
pub const NETEM_HANDLE: &str = "4744:";
pub const IFB_PREFIX: &str = "gci";
/// Rate of the matched class when the fault only delays.
const UNLIMITED: &str = "100gbit";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Netem {
    pub delay_us: u64,
    pub jitter_us: u64,
    pub correlation: f64,
}

/// The class a fault's matched traffic goes to: `4743:<4 hex digits of its token>`.
/// Filters pointing at it prove whose `4743:` root this is.
pub fn class_of(token: &str) -> String {
    let minor = u16::from_str_radix(token.get(token.len().saturating_sub(4)..).unwrap_or(""), 16)
        .unwrap_or(1);
    let minor = if minor == 0 || minor == 0xffff {
        1
    } else {
        minor
    };
    format!("4743:{minor:x}")
}

/// Is this an ifb name the agent makes: `gci`, 8 hex digits, an index?
pub fn is_our_ifb(name: &str) -> bool {
    name.strip_prefix(IFB_PREFIX).is_some_and(|rest| {
        rest.len() > 8
            && rest[..8].bytes().all(|b| b.is_ascii_hexdigit())
            && rest[8..].bytes().all(|b| b.is_ascii_digit())
    })
}

/// What to install on each interface.
#[derive(Debug, Clone, Default)]
pub struct Shape {
    /// This fault's class ([`class_of`]).
    pub class: String,
    pub netem: Option<Netem>,
    pub rate_bps: Option<u64>,
    pub peers: Vec<Cidr>,
    pub ports: Vec<u16>,
    pub protocol: Option<Protocol>,
    pub keep_ports: Vec<u16>,
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

impl Shape {
    /// The `tc` argument vectors that build the layout on `dev`. `inbound` is the
    /// ifb side: peers are sources and the agent's ports are destinations.
    pub fn commands(&self, dev: &str, inbound: bool) -> Vec<Vec<String>> {
        let mut cmds = vec![s(&[
            "qdisc",
            "add",
            "dev",
            dev,
            "root",
            "handle",
            ROOT_HANDLE,
            "htb",
        ])];
        let rate = self
            .rate_bps
            .map(|b| format!("{b}bit"))
            .unwrap_or_else(|| UNLIMITED.to_string());
        let mut class = s(&[
            "class",
            "add",
            "dev",
            dev,
            "parent",
            ROOT_HANDLE,
            "classid",
            &self.class,
            "htb",
        ]);
        class.extend(s(&["rate", &rate, "ceil", &rate, "quantum", "60000"]));
        cmds.push(class);
        if let Some(n) = &self.netem {
            let mut q = s(&[
                "qdisc",
                "add",
                "dev",
                dev,
                "parent",
                &self.class,
                "handle",
                NETEM_HANDLE,
                "netem",
                "limit",
                "100000",
                "delay",
            ]);
            q.push(format!("{}us", n.delay_us));
            if n.jitter_us > 0 {
                q.push(format!("{}us", n.jitter_us));
                if n.correlation > 0.0 {
                    q.push(format!("{}%", n.correlation));
                }
            }
            cmds.push(q);
        }
        let (peer_key, keep_key) = if inbound {
            ("src", "dport")
        } else {
            ("dst", "sport")
        };
        let head = |proto: &str, prio: &str| {
            s(&[
                "filter",
                "add",
                "dev",
                dev,
                "parent",
                ROOT_HANDLE,
                "protocol",
                proto,
                "prio",
                prio,
                "u32",
            ])
        };
        // One protocol per filter priority (the kernel insists): the agent's own
        // ports first (1 IPv4, 2 IPv6), then the matches (10 IPv4, 11 IPv6, 12 any).
        for port in &self.keep_ports {
            for (proto, fam, prio) in [("ip", "ip", "1"), ("ipv6", "ip6", "2")] {
                let mut f = head(proto, prio);
                f.extend(s(&["match", fam, keep_key]));
                f.extend([port.to_string(), "0xffff".into()]);
                f.extend(s(&[
                    "match", fam, "protocol", "6", "0xff", "flowid", "4743:0",
                ]));
                cmds.push(f);
            }
        }
        for (proto, words) in self.matches(peer_key) {
            let prio = match proto {
                "ip" => "10",
                "ipv6" => "11",
                _ => "12",
            };
            let mut f = head(proto, prio);
            if words.is_empty() {
                f.extend(s(&["match", "u32", "0", "0"]));
            } else {
                f.extend(words);
            }
            f.extend(s(&["flowid", &self.class]));
            cmds.push(f);
        }
        cmds
    }

    /// One (tc protocol, u32 match words) per filter: families × peers × protocols × port ends.
    fn matches(&self, peer_key: &str) -> Vec<(&'static str, Vec<String>)> {
        let fams: Vec<(&'static str, &'static str, Vec<&Cidr>)> = if self.peers.is_empty() {
            vec![("ip", "ip", vec![]), ("ipv6", "ip6", vec![])]
        } else {
            let v4: Vec<&Cidr> = self.peers.iter().filter(|c| c.is_v4()).collect();
            let v6: Vec<&Cidr> = self.peers.iter().filter(|c| !c.is_v4()).collect();
            let mut f = Vec::new();
            if !v4.is_empty() {
                f.push(("ip", "ip", v4));
            }
            if !v6.is_empty() {
                f.push(("ipv6", "ip6", v6));
            }
            f
        };
        let protos: Vec<Option<u8>> = match self.protocol.unwrap_or(Protocol::All) {
            Protocol::Tcp => vec![Some(6)],
            Protocol::Udp => vec![Some(17)],
            Protocol::Icmp => vec![Some(1)],
            Protocol::All if !self.ports.is_empty() => vec![Some(6), Some(17)],
            Protocol::All => vec![None],
        };
        if self.peers.is_empty() && self.ports.is_empty() && protos == [None] {
            return vec![("all", vec![])];
        }
        let mut out = Vec::new();
        for (proto, fam, cidrs) in &fams {
            let peers: Vec<Option<&Cidr>> = if cidrs.is_empty() {
                vec![None]
            } else {
                cidrs.iter().map(|c| Some(*c)).collect()
            };
            for peer in &peers {
                for l4 in &protos {
                    let ends: Vec<Option<(&str, u16)>> = if self.ports.is_empty() {
                        vec![None]
                    } else {
                        self.ports
                            .iter()
                            .flat_map(|p| [Some(("dport", *p)), Some(("sport", *p))])
                            .collect()
                    };
                    for end in ends {
                        let mut m: Vec<String> = Vec::new();
                        if let Some(c) = peer {
                            m.extend(s(&["match", fam, peer_key]));
                            m.push(c.to_string());
                        }
                        if let Some(n) = l4 {
                            let n = if *fam == "ip6" && *n == 1 { 58 } else { *n };
                            m.extend(s(&["match", fam, "protocol"]));
                            m.extend([n.to_string(), "0xff".into()]);
                        }
                        if let Some((key, port)) = end {
                            m.extend(s(&["match", fam, key]));
                            m.extend([port.to_string(), "0xffff".into()]);
                        }
                        if m.is_empty() {
                            m.extend(s(&["match", "u32", "0", "0"]));
                        }
                        out.push((*proto, m));
                    }
                }
            }
        }
        out
    }

    /// How many filters send traffic to the fault's class on one device.
    pub fn matching_count(&self) -> usize {
        self.matches("dst").len()
    }

    /// How many filters `commands` adds on one device (the agent's own ports, two
    /// families each, and the matching ones).
    pub fn filter_count(&self) -> usize {
        self.keep_ports.len() * 2 + self.matching_count()
    }
}

/// The root (or ingress) qdisc of an interface, as `tc -j qdisc show` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qdisc {
    pub kind: String,
    pub handle: String,
    pub parent: String,
    pub root: bool,
}

pub async fn qdiscs(ns: Ns<'_>, dev: &str) -> Result<Vec<Qdisc>, CmdError> {
    let out = ns
        .run(Tool::Tc, &s(&["-j", "qdisc", "show", "dev", dev]), None)
        .await?;
    let v: Value = serde_json::from_str(out.trim()).map_err(|e| CmdError {
        command: format!("tc -j qdisc show dev {dev}"),
        message: format!("unreadable JSON: {e}"),
    })?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .map(|q| Qdisc {
            kind: q["kind"].as_str().unwrap_or("").to_string(),
            handle: q["handle"].as_str().unwrap_or("").to_string(),
            parent: q["parent"].as_str().unwrap_or("").to_string(),
            root: q["root"].as_bool().unwrap_or(false),
        })
        .collect())
}

/// Refuses to touch an interface whose root (or ingress) qdisc someone else made.
pub fn check_free(dev: &str, qs: &[Qdisc], egress: bool, ingress: bool) -> Result<(), String> {
    if egress && let Some(root) = qs.iter().find(|q| q.root) {
        if root.handle == ROOT_HANDLE {
            return Err(format!(
                "{dev} is already shaped by another gpuchaos fault (root qdisc {ROOT_HANDLE}): one shaping fault per interface at a time"
            ));
        }
        if root.handle != "0:" {
            return Err(format!(
                "{dev} has a root qdisc {} (handle {}) that gpuchaos did not create: refusing to replace it; remove it, pick another interface, or use backend: proxy",
                root.kind, root.handle
            ));
        }
    }
    if ingress
        && let Some(q) = qs
            .iter()
            .find(|q| q.kind == "ingress" || q.kind == "clsact")
    {
        return Err(format!(
            "{dev} already has an {} qdisc that gpuchaos did not create: refusing to replace it; shape egress only (direction: egress) or use backend: proxy",
            q.kind
        ));
    }
    Ok(())
}

pub async fn tc(ns: Ns<'_>, args: &[String]) -> Result<String, CmdError> {
    ns.run(Tool::Tc, args, None).await
}

pub async fn ip(ns: Ns<'_>, args: &[&str]) -> Result<String, CmdError> {
    ns.run(Tool::Ip, &s(args), None).await
}

fn gone(e: &CmdError) -> bool {
    let m = &e.message;
    m.contains("Cannot find device")
        || m.contains("No such file or directory")
        || m.contains("does not exist")
        || m.contains("Invalid handle")
        || m.contains("Cannot delete qdisc with handle of zero")
}

/// Sends every packet arriving on `dev` through `ifb`: the `ip` commands that make
/// the ifb, and the `tc` commands that redirect to it.
pub fn ingress_commands(dev: &str, ifb: &str) -> (Vec<Vec<String>>, Vec<Vec<String>>) {
    (
        vec![
            s(&["link", "add", ifb, "type", "ifb"]),
            s(&["link", "set", ifb, "up"]),
        ],
        vec![
            s(&["qdisc", "add", "dev", dev, "handle", "ffff:", "ingress"]),
            s(&[
                "filter", "add", "dev", dev, "parent", "ffff:", "protocol", "all", "prio", "1",
                "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev",
                ifb,
            ]),
        ],
    )
}

/// Runs many commands in one `tc -batch` / `ip -batch` process (a few ms each saved:
/// the tools are fast, starting them is not). It stops at the first failure; the
/// error names that command, and comes with how many commands before it took effect,
/// so that the caller can undo exactly those. Arguments never contain spaces (names
/// are validated).
pub async fn batch(ns: Ns<'_>, tool: Tool, cmds: &[Vec<String>]) -> Result<(), (CmdError, usize)> {
    if cmds.is_empty() {
        return Ok(());
    }
    let text: String = cmds.iter().map(|c| c.join(" ") + "\n").collect();
    ns.run(tool, &s(&["-batch", "-"]), Some(&text))
        .await
        .map(|_| ())
        .map_err(|mut e| {
            // "Command failed -:N": name the command.
            let failed = e
                .message
                .split("Command failed -:")
                .nth(1)
                .and_then(|t| t.split_whitespace().next())
                .and_then(|n| n.parse::<usize>().ok());
            if let Some(c) = failed.and_then(|n| cmds.get(n.saturating_sub(1))) {
                e.command = format!("{} {}", tool.binary(), c.join(" "));
            }
            (e, failed.map(|n| n.saturating_sub(1)).unwrap_or(0))
        })
}

/// Undoes the `done` commands of a batch that failed: the root and ingress qdiscs it
/// added and the ifbs it made (deleting a qdisc takes its classes and filters along).
pub async fn undo(ns: Ns<'_>, done: &[Vec<String>]) {
    for c in done.iter().rev() {
        let w: Vec<&str> = c.iter().map(String::as_str).collect();
        let r = match w.as_slice() {
            ["qdisc", "add", "dev", dev, "root", ..] => {
                tc(ns, &s(&["qdisc", "del", "dev", dev, "root"]))
                    .await
                    .map(|_| ())
            }
            ["qdisc", "add", "dev", dev, "handle", "ffff:", "ingress"] => {
                tc(ns, &s(&["qdisc", "del", "dev", dev, "ingress"]))
                    .await
                    .map(|_| ())
            }
            ["link", "add", ifb, "type", "ifb"] => ip(ns, &["link", "del", ifb]).await.map(|_| ()),
            _ => Ok(()),
        };
        if let Err(e) = r
            && !gone(&e)
        {
            tracing::error!(error = %e, "undoing a half-applied tc batch");
        }
    }
}

/// Removes what one fault put on `dev` (and its ifb), and nothing else. Idempotent.
/// The root `4743:` goes only when its filters point at this fault's `class` (another
/// fault's, or a stranger's, stays); the ingress qdisc only when it redirects to this
/// fault's ifb, or has no filter at all (a half-applied ingress on a device this fault
/// checked was free).
pub async fn clean(
    ns: Ns<'_>,
    dev: &str,
    class: Option<&str>,
    ifb: Option<&str>,
) -> Result<(), CmdError> {
    let qs = match qdiscs(ns, dev).await {
        Ok(q) => q,
        Err(e) if gone(&e) => Vec::new(),
        Err(e) => return Err(e),
    };
    if qs.iter().any(|q| q.root && q.handle == ROOT_HANDLE) {
        let ours = match class {
            Some(c) => filters_to(ns, dev, c).await? > 0,
            None => true,
        };
        if ours {
            match tc(ns, &s(&["qdisc", "del", "dev", dev, "root"])).await {
                Err(e) if !gone(&e) => return Err(e),
                _ => {}
            }
        }
    }
    if let Some(ifb) = ifb {
        if qs.iter().any(|q| q.kind == "ingress") {
            let (redirects, any) = ingress_filters(ns, dev, ifb).await?;
            if redirects || !any {
                match tc(ns, &s(&["qdisc", "del", "dev", dev, "ingress"])).await {
                    Err(e) if !gone(&e) => return Err(e),
                    _ => {}
                }
            }
        }
        match ip(ns, &["link", "del", ifb]).await {
            Err(e) if !gone(&e) => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// The ingress filters on `dev`: does one redirect to `ifb` (prefix match when `ifb`
/// ends with `*`), and is there any filter at all?
pub async fn ingress_filters(ns: Ns<'_>, dev: &str, ifb: &str) -> Result<(bool, bool), CmdError> {
    let out = match tc(
        ns,
        &s(&["-j", "filter", "show", "dev", dev, "parent", "ffff:"]),
    )
    .await
    {
        Ok(o) => o,
        Err(e) if gone(&e) => return Ok((false, false)),
        Err(e) => return Err(e),
    };
    let v: Value = serde_json::from_str(out.trim()).unwrap_or(Value::Null);
    let filters = v.as_array().cloned().unwrap_or_default();
    let mut found = false;
    for f in &filters {
        for a in f["options"]["actions"].as_array().into_iter().flatten() {
            if let Some(to) = a["to_dev"].as_str() {
                found |= match ifb.strip_suffix('*') {
                    Some(prefix) => to.starts_with(prefix),
                    None => to == ifb,
                };
            }
        }
    }
    Ok((found, !filters.is_empty()))
}

/// Filters under the reserved root on `dev` that send traffic to `class`.
pub async fn filters_to(ns: Ns<'_>, dev: &str, class: &str) -> Result<usize, CmdError> {
    let out = match tc(
        ns,
        &s(&["-j", "filter", "show", "dev", dev, "parent", ROOT_HANDLE]),
    )
    .await
    {
        Ok(o) => o,
        Err(e) if gone(&e) => return Ok(0),
        Err(e) => return Err(e),
    };
    let v: Value = serde_json::from_str(out.trim()).map_err(|e| CmdError {
        command: format!("tc -j filter show dev {dev}"),
        message: format!("unreadable JSON: {e}"),
    })?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["options"]["flowid"].as_str() == Some(class))
        .count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_for_a_scoped_delay() {
        let sh = Shape {
            class: "4743:1".into(),
            netem: Some(Netem {
                delay_us: 200_000,
                jitter_us: 20_000,
                correlation: 25.0,
            }),
            rate_bps: None,
            peers: vec![Cidr::parse("10.0.0.0/24").unwrap()],
            ports: vec![8000],
            protocol: Some(Protocol::Tcp),
            keep_ports: vec![7070],
        };
        let cmds: Vec<String> = sh
            .commands("eth0", false)
            .iter()
            .map(|c| c.join(" "))
            .collect();
        assert_eq!(cmds[0], "qdisc add dev eth0 root handle 4743: htb");
        assert_eq!(
            cmds[1],
            "class add dev eth0 parent 4743: classid 4743:1 htb rate 100gbit ceil 100gbit quantum 60000"
        );
        assert_eq!(
            cmds[2],
            "qdisc add dev eth0 parent 4743:1 handle 4744: netem limit 100000 delay 200000us 20000us 25%"
        );
        assert!(cmds.contains(&"filter add dev eth0 parent 4743: protocol ip prio 1 u32 match ip sport 7070 0xffff match ip protocol 6 0xff flowid 4743:0".to_string()), "{cmds:#?}");
        assert!(cmds.contains(&"filter add dev eth0 parent 4743: protocol ip prio 10 u32 match ip dst 10.0.0.0/24 match ip protocol 6 0xff match ip dport 8000 0xffff flowid 4743:1".to_string()), "{cmds:#?}");
        assert!(cmds.contains(&"filter add dev eth0 parent 4743: protocol ip prio 10 u32 match ip dst 10.0.0.0/24 match ip protocol 6 0xff match ip sport 8000 0xffff flowid 4743:1".to_string()), "{cmds:#?}");
        assert_eq!(sh.filter_count(), 2 + 2);
        let inbound: Vec<String> = sh
            .commands("gci1", true)
            .iter()
            .map(|c| c.join(" "))
            .collect();
        assert!(
            inbound
                .iter()
                .any(|c| c.contains("match ip src 10.0.0.0/24"))
        );
        assert!(inbound.iter().any(|c| c.contains("match ip dport 7070")));
    }

    #[test]
    fn unscoped_rate_limit_is_one_catch_all_filter() {
        let sh = Shape {
            class: "4743:1".into(),
            rate_bps: Some(10_000_000),
            ..Default::default()
        };
        let cmds: Vec<String> = sh
            .commands("eth0", false)
            .iter()
            .map(|c| c.join(" "))
            .collect();
        assert!(cmds[1].contains("rate 10000000bit ceil 10000000bit"));
        assert_eq!(
            cmds.last().unwrap(),
            "filter add dev eth0 parent 4743: protocol all prio 12 u32 match u32 0 0 flowid 4743:1"
        );
        assert_eq!(cmds.len(), 3);
    }

    #[test]
    fn foreign_qdiscs_are_refused() {
        let q = |kind: &str, handle: &str, root: bool| Qdisc {
            kind: kind.into(),
            handle: handle.into(),
            parent: String::new(),
            root,
        };
        assert!(check_free("eth0", &[q("noqueue", "0:", true)], true, true).is_ok());
        let e = check_free("eth0", &[q("fq", "1:", true)], true, false).unwrap_err();
        assert!(e.contains("did not create"), "{e}");
        // Ingress only: a foreign root is not in the way.
        assert!(check_free("eth0", &[q("fq", "1:", true)], false, true).is_ok());
        let e = check_free("eth0", &[q("htb", "4743:", true)], true, false).unwrap_err();
        assert!(e.contains("another gpuchaos fault"), "{e}");
        let e = check_free("eth0", &[q("ingress", "ffff:", false)], false, true).unwrap_err();
        assert!(e.contains("ingress"), "{e}");
        assert!(check_free("eth0", &[q("ingress", "ffff:", false)], true, false).is_ok());
        assert_eq!(class_of("0badcafe"), "4743:cafe");
        assert_eq!(class_of("0bad0000"), "4743:1");
        assert!(is_our_ifb("gci0badcafe0") && is_our_ifb("gci0badcafe12"));
        assert!(!is_our_ifb("gci0") && !is_our_ifb("gcixyzxyzxy0") && !is_our_ifb("eth0"));
    }
}

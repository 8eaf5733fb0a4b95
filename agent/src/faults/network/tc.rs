//! tc: latency and jitter with netem, bandwidth with htb, per interface.
//!
//! Layout on an interface (egress), all under the reserved handle `4743:`:
//!
//! ```text
//! root 4743: htb            unmatched traffic goes straight through (no default class)
//!   class 4743:1 htb rate R  matched traffic; R = the limit, or 100gbit without one
//!     qdisc 4744: netem      the delay, when there is one
//! filters on 4743:           prio 1: the agent's own ports → 4743: (direct)
//!                            prio 10: peers / ports / protocol → 4743:1
//! ```
//!
//! Ingress goes through an ifb device (`gci<token><n>`) that the interface's ingress
//! qdisc redirects every packet to, and the same layout on the ifb, matching sources.
//! The agent never replaces a root or ingress qdisc it did not create.

use gpuchaos_proto::spec::{Cidr, Protocol};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::sys::netns::{CmdError, Tool, run_tool};

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

/// What to install on each interface.
#[derive(Debug, Clone, Default)]
pub struct Shape {
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
            "4743:1",
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
                "4743:1",
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
            f.extend(s(&["flowid", "4743:1"]));
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

    /// How many filters `commands` adds on one device.
    pub fn filter_count(&self) -> usize {
        self.commands("x", false)
            .iter()
            .filter(|c| c[0] == "filter")
            .count()
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

pub async fn qdiscs(ns: Option<&std::path::Path>, dev: &str) -> Result<Vec<Qdisc>, CmdError> {
    let out = run_tool(ns, Tool::Tc, &s(&["-j", "qdisc", "show", "dev", dev]), None).await?;
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
pub fn check_free(dev: &str, qs: &[Qdisc], ingress: bool) -> Result<(), String> {
    if let Some(root) = qs.iter().find(|q| q.root) {
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

pub async fn tc(ns: Option<&std::path::Path>, args: &[String]) -> Result<String, CmdError> {
    run_tool(ns, Tool::Tc, args, None).await
}

pub async fn ip(ns: Option<&std::path::Path>, args: &[&str]) -> Result<String, CmdError> {
    run_tool(ns, Tool::Ip, &s(args), None).await
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
/// the tools are fast, starting them is not). Stops at the first failure and says
/// which command it was. Arguments never contain spaces (names are validated).
pub async fn batch(
    ns: Option<&std::path::Path>,
    tool: Tool,
    cmds: &[Vec<String>],
) -> Result<(), CmdError> {
    if cmds.is_empty() {
        return Ok(());
    }
    let text: String = cmds.iter().map(|c| c.join(" ") + "\n").collect();
    run_tool(ns, tool, &s(&["-batch", "-"]), Some(&text))
        .await
        .map(|_| ())
        .map_err(|mut e| {
            // "Command failed -:N": name the command.
            if let Some(n) = e
                .message
                .split("Command failed -:")
                .nth(1)
                .and_then(|t| t.split_whitespace().next())
                .and_then(|n| n.parse::<usize>().ok())
                && let Some(c) = cmds.get(n.saturating_sub(1))
            {
                e.command = format!("{} {}", tool.binary(), c.join(" "));
            }
            e
        })
}

/// Removes what gpuchaos put on `dev` (and its ifb), and nothing else. Idempotent.
pub async fn clean(
    ns: Option<&std::path::Path>,
    dev: &str,
    ifb: Option<&str>,
) -> Result<(), CmdError> {
    let qs = match qdiscs(ns, dev).await {
        Ok(q) => q,
        Err(e) if gone(&e) => Vec::new(),
        Err(e) => return Err(e),
    };
    if qs.iter().any(|q| q.root && q.handle == ROOT_HANDLE) {
        match tc(ns, &s(&["qdisc", "del", "dev", dev, "root"])).await {
            Err(e) if !gone(&e) => return Err(e),
            _ => {}
        }
    }
    if let Some(ifb) = ifb {
        if qs.iter().any(|q| q.kind == "ingress") && ingress_redirects_to(ns, dev, ifb).await? {
            match tc(ns, &s(&["qdisc", "del", "dev", dev, "ingress"])).await {
                Err(e) if !gone(&e) => return Err(e),
                _ => {}
            }
        }
        match ip(ns, &["link", "del", ifb]).await {
            Err(e) if !gone(&e) => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Does the ingress qdisc on `dev` redirect to `ifb` (our filter)? Prefix match when
/// `ifb` ends with `*`.
pub async fn ingress_redirects_to(
    ns: Option<&std::path::Path>,
    dev: &str,
    ifb: &str,
) -> Result<bool, CmdError> {
    let out = match tc(
        ns,
        &s(&["-j", "filter", "show", "dev", dev, "parent", "ffff:"]),
    )
    .await
    {
        Ok(o) => o,
        Err(e) if gone(&e) => return Ok(false),
        Err(e) => return Err(e),
    };
    let v: Value = serde_json::from_str(out.trim()).unwrap_or(Value::Null);
    let mut found = false;
    for f in v.as_array().into_iter().flatten() {
        for a in f["options"]["actions"].as_array().into_iter().flatten() {
            if let Some(to) = a["to_dev"].as_str() {
                found |= match ifb.strip_suffix('*') {
                    Some(prefix) => to.starts_with(prefix),
                    None => to == ifb,
                };
            }
        }
    }
    Ok(found)
}

/// Filters attached under the reserved root on `dev` that send traffic to 4743:1.
pub async fn matching_filters(ns: Option<&std::path::Path>, dev: &str) -> Result<usize, CmdError> {
    let out = tc(
        ns,
        &s(&["-j", "filter", "show", "dev", dev, "parent", ROOT_HANDLE]),
    )
    .await?;
    let v: Value = serde_json::from_str(out.trim()).map_err(|e| CmdError {
        command: format!("tc -j filter show dev {dev}"),
        message: format!("unreadable JSON: {e}"),
    })?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["options"]["flowid"].as_str() == Some("4743:1"))
        .count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_for_a_scoped_delay() {
        let sh = Shape {
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
        assert!(check_free("eth0", &[q("noqueue", "0:", true)], true).is_ok());
        let e = check_free("eth0", &[q("fq", "1:", true)], false).unwrap_err();
        assert!(e.contains("did not create"), "{e}");
        let e = check_free("eth0", &[q("htb", "4743:", true)], false).unwrap_err();
        assert!(e.contains("another gpuchaos fault"), "{e}");
        let e = check_free("eth0", &[q("ingress", "ffff:", false)], true).unwrap_err();
        assert!(e.contains("ingress"), "{e}");
        assert!(check_free("eth0", &[q("ingress", "ffff:", false)], false).is_ok());
    }
}

//! nftables: partitions, loss, and the redirect into the userspace proxy.
//!
//! Every fault owns one table, `inet gpuchaos_<token>`, created in one `nft -f`
//! transaction and removed by one `delete table`: a revert is atomic, and a table
//! left by a crash is recognisable by its name.

use gpuchaos_proto::spec::{Cidr, Direction, PartitionMode, Protocol};
use serde_json::Value;

use crate::sys::tools::{CmdError, Ns, Tool};

/// Every table the agent creates starts with this.
pub const TABLE_PREFIX: &str = "gpuchaos_";
/// The mark on the proxy's own upstream connections, which the redirect skips.
pub const PROXY_MARK: u32 = 0x4743_0001;

/// What the filter chains do to matching packets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Action {
    Partition(PartitionMode),
    /// Drop this percentage of matching packets at random.
    Loss(f64),
}

/// Where the proxy listens, per address family and connection role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProxyPorts {
    /// Connections opened from this namespace to peers.
    pub out4: Option<u16>,
    pub out6: Option<u16>,
    /// Connections opened by peers into this namespace.
    pub in4: Option<u16>,
    pub in6: Option<u16>,
}

/// Everything one namespace's table says.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    pub table: String,
    pub direction: Option<Direction>,
    pub peers: Vec<Cidr>,
    pub ports: Vec<u16>,
    pub protocol: Option<Protocol>,
    /// One interface, or None for every interface but `exclude_ifaces`.
    pub interface: Option<String>,
    pub exclude_ifaces: Vec<String>,
    /// The agent's own TCP ports (gRPC, metrics): never cut, never redirected.
    pub keep_ports: Vec<u16>,
    pub actions: Vec<Action>,
    pub proxy: Option<ProxyPorts>,
}

fn set<T: std::fmt::Display>(items: &[T]) -> String {
    let parts: Vec<String> = items.iter().map(|i| i.to_string()).collect();
    format!("{{ {} }}", parts.join(", "))
}

fn quoted_set(items: &[String]) -> String {
    let parts: Vec<String> = items.iter().map(|i| format!("\"{i}\"")).collect();
    format!("{{ {} }}", parts.join(", "))
}

impl Rules {
    fn direction(&self) -> Direction {
        self.direction.unwrap_or(Direction::Both)
    }

    /// The interface match for a hook (`iifname` on input, `oifname` on output).
    fn iface(&self, key: &str) -> String {
        match &self.interface {
            Some(i) => format!("{key} \"{i}\" "),
            None if self.exclude_ifaces.is_empty() => String::new(),
            None => format!("{key} != {} ", quoted_set(&self.exclude_ifaces)),
        }
    }

    /// Address matches: one per family the peers use, or one empty match.
    fn addrs(&self, key: &str) -> Vec<String> {
        let v4: Vec<String> = self
            .peers
            .iter()
            .filter(|c| c.is_v4())
            .map(|c| c.to_string())
            .collect();
        let v6: Vec<String> = self
            .peers
            .iter()
            .filter(|c| !c.is_v4())
            .map(|c| c.to_string())
            .collect();
        let mut out = Vec::new();
        if !v4.is_empty() {
            out.push(format!("ip {key} {} ", set(&v4)));
        }
        if !v6.is_empty() {
            out.push(format!("ip6 {key} {} ", set(&v6)));
        }
        if out.is_empty() {
            out.push(String::new());
        }
        out
    }

    /// Protocol and port matches: ports at either end, so two matches when ports are given.
    fn l4(&self) -> Vec<String> {
        let proto = match self.protocol.unwrap_or(Protocol::All) {
            Protocol::Tcp => "meta l4proto tcp ".to_string(),
            Protocol::Udp => "meta l4proto udp ".to_string(),
            Protocol::Icmp => "meta l4proto { icmp, ipv6-icmp } ".to_string(),
            Protocol::All if !self.ports.is_empty() => "meta l4proto { tcp, udp } ".to_string(),
            Protocol::All => String::new(),
        };
        if self.ports.is_empty() {
            return vec![proto];
        }
        let p = set(&self.ports);
        vec![
            format!("{proto}th dport {p} "),
            format!("{proto}th sport {p} "),
        ]
    }

    fn verdicts(&self) -> Vec<String> {
        let mut out = Vec::new();
        for a in &self.actions {
            match a {
                Action::Partition(PartitionMode::Drop) => out.push("drop".to_string()),
                Action::Partition(PartitionMode::Reject) => {
                    // TCP gets a reset, everything else an ICMP unreachable.
                    if matches!(
                        self.protocol.unwrap_or(Protocol::All),
                        Protocol::Tcp | Protocol::All
                    ) {
                        out.push("meta l4proto tcp reject with tcp reset".to_string());
                    }
                    out.push("reject with icmpx admin-prohibited".to_string());
                }
                Action::Loss(p) => {
                    let n = (p * 100.0).round() as u32;
                    out.push(format!("numgen random mod 10000 < {n} drop"));
                }
            }
        }
        out
    }

    /// The matching rules for one side: `(iifname, saddr)` for packets arriving from
    /// peers, `(oifname, daddr)` for packets leaving towards them.
    fn rules_for(&self, iface_key: &str, addr_key: &str) -> String {
        let mut s = String::new();
        let iface = self.iface(iface_key);
        for addr in self.addrs(addr_key) {
            for l4 in self.l4() {
                for v in self.verdicts() {
                    s.push_str(&format!("    {iface}{addr}{l4}{v}\n"));
                }
            }
        }
        s
    }

    fn filter_chain(&self, name: &str, hook: &str) -> String {
        let mut s = format!(
            "  chain {name} {{\n    type filter hook {hook} priority -150; policy accept;\n"
        );
        let d = self.direction();
        match hook {
            "input" | "output" => {
                if !self.keep_ports.is_empty() {
                    // The agent's own control traffic: a lapsed lease would end the run.
                    let port_key = if hook == "input" { "dport" } else { "sport" };
                    s.push_str(&format!(
                        "    tcp {port_key} {} accept\n",
                        set(&self.keep_ports)
                    ));
                }
                if hook == "input" {
                    s.push_str(&self.rules_for("iifname", "saddr"));
                } else {
                    s.push_str(&self.rules_for("oifname", "daddr"));
                }
            }
            _ => {
                // Traffic routed through this namespace (pods behind a node): the same
                // cut, by the same direction.
                if d.ingress() {
                    s.push_str(&self.rules_for("iifname", "saddr"));
                }
                if d.egress() {
                    s.push_str(&self.rules_for("oifname", "daddr"));
                }
            }
        }
        s.push_str("  }\n");
        s
    }

    fn redirect_chain(&self, name: &str, hook: &str, iface_key: &str, addr_key: &str) -> String {
        let Some(pp) = self.proxy else {
            return String::new();
        };
        let (p4, p6) = if hook == "output" {
            (pp.out4, pp.out6)
        } else {
            (pp.in4, pp.in6)
        };
        let mut s = format!(
            "  chain {name} {{\n    type nat hook {hook} priority -100; policy accept;\n    meta mark {PROXY_MARK:#x} return\n"
        );
        if !self.keep_ports.is_empty() {
            s.push_str(&format!("    tcp dport {} return\n", set(&self.keep_ports)));
        }
        let mut iface = self.iface(iface_key);
        if hook == "prerouting" {
            // Only connections to this namespace's own addresses: routed traffic
            // (pods behind a node) is not the proxy's to take.
            iface.push_str("fib daddr type local ");
        }
        let ports = if self.ports.is_empty() {
            String::new()
        } else {
            format!("tcp dport {} ", set(&self.ports))
        };
        for addr in self.addrs(addr_key) {
            let fams: Vec<(&str, Option<u16>)> = if addr.starts_with("ip6 ") {
                vec![("ip6", p6)]
            } else if addr.starts_with("ip ") {
                vec![("ip", p4)]
            } else {
                vec![("ip", p4), ("ip6", p6)]
            };
            for (fam, port) in fams {
                let Some(port) = port else { continue };
                s.push_str(&format!(
                    "    {iface}meta nfproto {} {addr}meta l4proto tcp {ports}redirect to :{port}\n",
                    if fam == "ip" { "ipv4" } else { "ipv6" }
                ));
            }
        }
        s.push_str("  }\n");
        s
    }

    /// The whole table as one `nft -f` script.
    pub fn script(&self) -> String {
        let d = self.direction();
        let mut s = format!("table inet {} {{\n", self.table);
        if !self.actions.is_empty() {
            if d.ingress() {
                s.push_str(&self.filter_chain("ingress", "input"));
            }
            if d.egress() {
                s.push_str(&self.filter_chain("egress", "output"));
            }
            s.push_str(&self.filter_chain("forward", "forward"));
        }
        // Both roles are redirected whatever the direction; the proxy delays the
        // bytes that flow in the fault's direction.
        s.push_str(&self.redirect_chain("proxy_out", "output", "oifname", "daddr"));
        s.push_str(&self.redirect_chain("proxy_in", "prerouting", "iifname", "saddr"));
        s.push_str("}\n");
        s
    }

    /// How many rules the script creates (verification counts them back).
    pub fn rule_count(&self) -> usize {
        self.script()
            .lines()
            .filter(|l| {
                let t = l.trim();
                !(t.is_empty()
                    || t.starts_with("table ")
                    || t.starts_with("chain ")
                    || t.starts_with("type ")
                    || t == "}")
            })
            .count()
    }
}

/// Creates the table and its rules in one transaction (all or nothing). The name is
/// fresh per fault, so there is nothing to replace. (No `delete` first: deleting a
/// table waits for an RCU grace period, which tripled the inject time.)
pub async fn apply(ns: Ns<'_>, rules: &Rules) -> Result<(), CmdError> {
    let script = rules.script();
    ns.run(Tool::Nft, &["-f".into(), "-".into()], Some(&script))
        .await?;
    Ok(())
}

/// The table as `nft -j` lists it, or None when it is absent.
async fn list_table(ns: Ns<'_>, table: &str) -> Result<Option<Value>, CmdError> {
    let args = ["-j", "list", "table", "inet", table].map(String::from);
    match ns.run(Tool::Nft, &args, None).await {
        Ok(out) => serde_json::from_str(&out).map(Some).map_err(|e| CmdError {
            command: format!("nft -j list table inet {table}"),
            message: format!("unreadable JSON: {e}"),
        }),
        Err(e) if is_missing(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads the table back: the number of rules it holds, or None when it is absent.
pub async fn count_rules(ns: Ns<'_>, table: &str) -> Result<Option<usize>, CmdError> {
    Ok(list_table(ns, table).await?.map(|v| {
        v["nftables"]
            .as_array()
            .map(|a| a.iter().filter(|o| o.get("rule").is_some()).count())
            .unwrap_or(0)
    }))
}

fn is_missing(e: &CmdError) -> bool {
    e.message.contains("No such file or directory") || e.message.contains("does not exist")
}

/// Takes every effect of the table away while keeping the kernel translating the
/// connections it redirected earlier: filter chains are flushed (no more drops),
/// and each `type nat` chain gets `ct state new return` in front, so no new
/// connection is redirected. Deleting the table, or flushing its nat chains, would
/// cut the connections the proxy still carries: the kernel stops translating them
/// and their next packet is answered with a reset (seen on this kernel, and the
/// reason in-flight requests hung after a revert). Absent is fine.
pub async fn neutralize(ns: Ns<'_>, table: &str) -> Result<(), CmdError> {
    let Some(v) = list_table(ns, table).await? else {
        return Ok(());
    };
    let mut script = String::new();
    for c in v["nftables"].as_array().into_iter().flatten() {
        let Some(chain) = c.get("chain") else {
            continue;
        };
        let Some(name) = chain["name"].as_str() else {
            continue;
        };
        if chain["type"] == "nat" {
            script.push_str(&format!(
                "insert rule inet {table} {name} ct state new return\n"
            ));
        } else {
            script.push_str(&format!("flush chain inet {table} {name}\n"));
        }
    }
    if script.is_empty() {
        return Ok(());
    }
    ns.run(Tool::Nft, &["-f".into(), "-".into()], Some(&script))
        .await?;
    Ok(())
}

/// Deletes the table; absent is fine (idempotent).
pub async fn delete(ns: Ns<'_>, table: &str) -> Result<(), CmdError> {
    match ns
        .run(
            Tool::Nft,
            &["delete".into(), "table".into(), "inet".into(), table.into()],
            None,
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_missing(&e) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Every gpuchaos table in a namespace, as (family, name).
pub async fn own_tables(ns: Ns<'_>) -> Result<Vec<(String, String)>, CmdError> {
    let out = ns
        .run(
            Tool::Nft,
            &["-j".into(), "list".into(), "tables".into()],
            None,
        )
        .await?;
    let v: Value = serde_json::from_str(&out).map_err(|e| CmdError {
        command: "nft -j list tables".into(),
        message: format!("unreadable JSON: {e}"),
    })?;
    Ok(v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.get("table"))
        .filter_map(|t| {
            let name = t["name"].as_str()?;
            let family = t["family"].as_str()?;
            name.starts_with(TABLE_PREFIX)
                .then(|| (family.to_string(), name.to_string()))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            table: "gpuchaos_0badcafe".into(),
            direction: Some(Direction::Both),
            peers: vec![
                Cidr::parse("10.0.0.0/24").unwrap(),
                Cidr::parse("fd00::1").unwrap(),
            ],
            ports: vec![8000],
            protocol: None,
            interface: None,
            exclude_ifaces: vec!["lo".into()],
            keep_ports: vec![7070],
            actions: vec![Action::Partition(PartitionMode::Drop)],
            proxy: None,
        }
    }

    #[test]
    fn partition_covers_both_families_both_ends_and_keeps_the_agent() {
        let s = rules().script();
        assert!(s.contains("chain ingress {\n    type filter hook input priority -150; policy accept;\n    tcp dport { 7070 } accept\n"), "{s}");
        assert!(s.contains("iifname != { \"lo\" } ip saddr { 10.0.0.0/24 } meta l4proto { tcp, udp } th dport { 8000 } drop"), "{s}");
        assert!(s.contains("oifname != { \"lo\" } ip6 daddr { fd00::1/128 } meta l4proto { tcp, udp } th sport { 8000 } drop"), "{s}");
        // input and output: 1 keep + 2 families × 2 port ends; forward: both sides.
        assert_eq!(rules().rule_count(), 5 + 5 + 8);
        assert!(s.contains("chain forward {\n    type filter hook forward priority -150; policy accept;\n    iifname != { \"lo\" } ip saddr"), "{s}");
    }

    #[test]
    fn one_way_reject_and_loss() {
        let mut r = rules();
        r.direction = Some(Direction::Egress);
        r.peers = vec![Cidr::parse("10.1.0.2").unwrap()];
        r.ports.clear();
        r.keep_ports.clear();
        r.interface = Some("eth0".into());
        r.actions = vec![Action::Partition(PartitionMode::Reject)];
        let s = r.script();
        assert!(!s.contains("hook input"), "{s}");
        assert!(
            s.contains(
                "oifname \"eth0\" ip daddr { 10.1.0.2/32 } meta l4proto tcp reject with tcp reset"
            ),
            "{s}"
        );
        assert!(
            s.contains(
                "oifname \"eth0\" ip daddr { 10.1.0.2/32 } reject with icmpx admin-prohibited"
            ),
            "{s}"
        );
        r.protocol = Some(Protocol::Udp);
        assert!(!r.script().contains("tcp reset"), "no TCP in a UDP fault");
        r.actions = vec![Action::Loss(30.0)];
        assert!(r.script().contains("numgen random mod 10000 < 3000 drop"));
    }

    #[test]
    fn proxy_redirects_both_roles_and_skips_its_own_connections() {
        let mut r = rules();
        r.actions.clear();
        r.peers = vec![Cidr::parse("10.0.0.0/24").unwrap()];
        r.proxy = Some(ProxyPorts {
            out4: Some(40001),
            in4: Some(40002),
            ..Default::default()
        });
        let s = r.script();
        assert!(!s.contains("type filter"), "{s}");
        assert!(s.contains("type nat hook output priority -100; policy accept;\n    meta mark 0x47430001 return\n    tcp dport { 7070 } return\n"), "{s}");
        assert!(s.contains("oifname != { \"lo\" } meta nfproto ipv4 ip daddr { 10.0.0.0/24 } meta l4proto tcp tcp dport { 8000 } redirect to :40001"), "{s}");
        assert!(s.contains("iifname != { \"lo\" } fib daddr type local meta nfproto ipv4 ip saddr { 10.0.0.0/24 } meta l4proto tcp tcp dport { 8000 } redirect to :40002"), "{s}");
        assert!(!s.contains("ipv6"), "no v6 listener, no v6 redirect: {s}");
    }
}

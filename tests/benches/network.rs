//! Network faults: inject-to-verified time per mechanism, and what the userspace
//! proxy costs at zero injected delay. Needs root (it builds its own hosts in network
//! namespaces, like the tests). Prints figures; asserts nothing.
//!
//!   cargo build --release --workspace
//!   sudo cargo bench -p gpuchaos-tests --bench network
//!
//! Inject-to-verified is the agent's own created→verified time, which covers
//! journaling (fsync), running nft/tc, and reading the rules or qdiscs back.
//! The proxy's cost is measured with the proxy in the path and no delay (a 100gbit
//! rate limit, which never binds), against the same traffic direct: request round
//! trips on one connection, and a bulk download.

use std::time::Duration;

use gpuchaos_tests::netns::*;
use gpuchaos_tests::*;

const ROUNDS: usize = 30;
const RTT_SAMPLES: usize = 2000;
const BULK: usize = 200 * 1024 * 1024;

fn row(name: &str, mut v: Vec<f64>) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "| {name:<40} | {:>7.2} | {:>7.2} | {:>7.2} |",
        percentile(&v, 50.0),
        percentile(&v, 90.0),
        v[v.len() - 1]
    );
}

fn rtts(ns: &str, to: &str) -> Vec<f64> {
    let mut s = connect(ns, to, Duration::from_secs(5)).expect("connect");
    for _ in 0..100 {
        http_get(&mut s).expect("warm-up");
    }
    (0..RTT_SAMPLES)
        .map(|_| http_get(&mut s).expect("request").as_secs_f64() * 1e6)
        .collect()
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the network benchmark needs root (namespaces, nftables, tc)");
        std::process::exit(2);
    }
    let Node { hosts, dir, agent } = Node::start();
    let _sb = HttpServer::start(&hosts.b, &format!("{B}:8000"));
    let bulk = BulkServer::start(&hosts.b, &format!("{B}:8100"), BULK);
    let to_b = format!("{B}:8000");
    let a = hosts.a.as_str();

    let cases = [
        (
            "partition (nftables)",
            format!("kind: network\nduration: 1m\npeers: [\"{B}\"]\npartition: drop\n"),
        ),
        (
            "latency 50ms (proxy backend)",
            format!(
                "kind: network\nduration: 1m\npeers: [\"{B}\"]\nlatency: 50ms\nbackend: proxy\n"
            ),
        ),
        (
            "rate 100mbit both ways (tc htb + ifb)",
            "kind: network\nduration: 1m\ninterface: to-b\nrate: 100mbit\n".to_string(),
        ),
    ];
    println!("inject to verified (agent), {ROUNDS} faults each\n");
    println!(
        "| {:<40} | {:>7} | {:>7} | {:>7} |",
        "ms", "p50", "p90", "max"
    );
    println!("|{}|---------|---------|---------|", "-".repeat(42));
    for (name, yaml) in &cases {
        let mut v = Vec::new();
        for _ in 0..ROUNDS {
            let f = inject_in(a, &agent, dir.path(), yaml);
            let (id, ms) = (f["id"].as_str().unwrap(), f["inject_ms"].as_f64().unwrap());
            v.push(ms);
            revert_in(a, &agent, id);
        }
        row(name, v);
    }

    let direct_rtt = rtts(a, &to_b);
    let direct_bulk = bulk.fetch_secs(a);
    let f = inject_in(
        a,
        &agent,
        dir.path(),
        &format!("kind: network\nduration: 10m\npeers: [\"{B}\"]\nrate: 100gbit\nbackend: proxy\n"),
    );
    let proxy_rtt = rtts(a, &to_b);
    let proxy_bulk = bulk.fetch_secs(a);
    revert_in(a, &agent, f["id"].as_str().unwrap());

    println!("\nrequest round trip on one connection, {RTT_SAMPLES} requests\n");
    println!(
        "| {:<40} | {:>7} | {:>7} | {:>7} |",
        "µs", "p50", "p90", "max"
    );
    println!("|{}|---------|---------|---------|", "-".repeat(42));
    let (d50, p50) = {
        let mut d = direct_rtt.clone();
        let mut p = proxy_rtt.clone();
        d.sort_by(|a, b| a.partial_cmp(b).unwrap());
        p.sort_by(|a, b| a.partial_cmp(b).unwrap());
        (percentile(&d, 50.0), percentile(&p, 50.0))
    };
    row("direct", direct_rtt);
    row("through the proxy, no delay", proxy_rtt);
    let mb = BULK as f64 / 1e6;
    println!("\nbulk download of {mb:.0} MB\n");
    println!("| | MB/s |\n|---|---|");
    println!("| direct | {:.0} |", mb / direct_bulk);
    println!("| through the proxy, no delay | {:.0} |", mb / proxy_bulk);
    println!(
        "\nthe proxy adds {:.1} µs per round trip at p50 and carries {:.0}% of the direct throughput",
        p50 - d50,
        100.0 * direct_bulk / proxy_bulk
    );
}

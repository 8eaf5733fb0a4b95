//! Network faults for real, in network namespaces the tests create (privileged: root,
//! nftables, tc). Each test builds hosts A, B and C (see `gpuchaos_tests::netns`),
//! runs the agent inside A (the "node") unless it says otherwise, and talks to it with
//! the `gpuchaos` CLI run inside A. Nothing touches the machine's own interfaces.

use std::time::{Duration, Instant};

use gpuchaos_tests::netns::*;
use gpuchaos_tests::*;

#[test]
fn partition_cuts_a_from_b_and_spares_c() {
    if !privileged("network tests (namespaces, nftables, tc)") {
        return;
    }
    let Node { hosts, dir, agent } = Node::start();
    let _web = web_servers(&hosts);
    let to_b = format!("{B}:8000");
    let to_c = format!("{C}:8000");
    assert!(http_works(&hosts.a, &to_b) && http_works(&hosts.a, &to_c));

    let f = inject_in(
        &hosts.a,
        &agent,
        dir.path(),
        &format!("kind: network\nduration: 1m\npeers: [\"{B}/32\"]\npartition: drop\n"),
    );
    assert!(
        connect(&hosts.a, &to_b, Duration::from_millis(500)).is_err(),
        "A reached B through a partition"
    );
    assert!(!http_works(&hosts.a, &to_b));
    assert!(http_works(&hosts.a, &to_c), "A to C must still work");
    assert!(!http_works(&hosts.b, &format!("{A_TO_B}:9")));
    let table = f["details"]["namespaces"][0]["nft_table"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        ns_out(&hosts.a, &["nft", "list", "tables"]).contains(table.trim_start_matches("inet ")),
        "{table}"
    );
    revert_in(&hosts.a, &agent, f["id"].as_str().unwrap());
    assert!(http_works(&hosts.a, &to_b), "revert must restore A to B");
    assert_eq!(hosts.gpuchaos_state(&hosts.a), Vec::<String>::new());

    // reject: the connect fails at once with a reset instead of timing out.
    let f = inject_in(
        &hosts.a,
        &agent,
        dir.path(),
        &format!(
            "kind: network\nduration: 1m\npeers: [\"{B}\"]\nports: [8000]\npartition: reject\n"
        ),
    );
    let t = Instant::now();
    let e = connect(&hosts.a, &to_b, Duration::from_secs(3)).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    revert_in(&hosts.a, &agent, f["id"].as_str().unwrap());
    assert!(http_works(&hosts.a, &to_b));

    // Someone flushes the rules by hand: the status says so within seconds, and the
    // revert still succeeds (the table is gone either way).
    let f = inject_in(
        &hosts.a,
        &agent,
        dir.path(),
        &format!("kind: network\nduration: 1m\npeers: [\"{B}\"]\npartition: drop\n"),
    );
    let table = f["details"]["namespaces"][0]["nft_table"].as_str().unwrap();
    let out = ns_out(
        &hosts.a,
        &[
            "nft",
            "delete",
            "table",
            "inet",
            table.trim_start_matches("inet "),
        ],
    );
    assert!(out.trim().is_empty(), "{out}");
    let seen = wait_until(Duration::from_secs(5), || {
        let st = gpuchaos_in(
            &hosts.a,
            &["--agent", &agent.grpc, "--output", "json", "status"],
        );
        st.stdout.contains("was deleted by someone else")
    });
    assert!(seen.is_some(), "the drift never showed in the status");
    revert_in(&hosts.a, &agent, f["id"].as_str().unwrap());
    assert!(agent.log_text().contains("no longer in effect as applied"));
}

#[test]
fn a_one_way_partition_is_one_way() {
    if !privileged("network tests (namespaces, nftables, tc)") {
        return;
    }
    let Node { hosts, dir, agent } = Node::start();
    let b_port = format!("{B}:7001");
    let a_port = format!("{A_TO_B}:7002");
    assert_eq!(udp_delivery(&hosts.a, &hosts.b, &b_port, 200), 200);

    let f = inject_in(
        &hosts.a,
        &agent,
        dir.path(),
        &format!(
            "kind: network\nduration: 1m\npeers: [\"{B}\"]\ndirection: egress\npartition: drop\n"
        ),
    );
    assert_eq!(
        udp_delivery(&hosts.a, &hosts.b, &b_port, 200),
        0,
        "A to B must be cut"
    );
    assert_eq!(
        udp_delivery(&hosts.b, &hosts.a, &a_port, 200),
        200,
        "B to A must flow"
    );
    revert_in(&hosts.a, &agent, f["id"].as_str().unwrap());

    let f = inject_in(
        &hosts.a,
        &agent,
        dir.path(),
        &format!(
            "kind: network\nduration: 1m\npeers: [\"{B}\"]\ndirection: ingress\npartition: drop\n"
        ),
    );
    assert_eq!(
        udp_delivery(&hosts.a, &hosts.b, &b_port, 200),
        200,
        "A to B must flow"
    );
    assert_eq!(
        udp_delivery(&hosts.b, &hosts.a, &a_port, 200),
        0,
        "B to A must be cut"
    );
    revert_in(&hosts.a, &agent, f["id"].as_str().unwrap());
    assert_eq!(udp_delivery(&hosts.b, &hosts.a, &a_port, 200), 200);
}

#[test]
fn latency_through_the_userspace_proxy_adds_the_delay() {
    if !privileged("network tests (namespaces, nftables, tc)") {
        return;
    }
    let Node { hosts, dir, agent } = Node::start();
    let _web = web_servers(&hosts);
    let to_b = format!("{B}:8000");
    let base = median_rtt(&hosts.a, &to_b, 21);

    let f = inject_in(
        &hosts.a,
        &agent,
        dir.path(),
        &format!(
            "kind: network\nduration: 1m\npeers: [\"{B}\"]\nports: [8000]\ndirection: egress\nlatency: 100ms\nbackend: proxy\n"
        ),
    );
    assert_eq!(f["details"]["backend"], "proxy", "{f}");
    let delayed = median_rtt(&hosts.a, &to_b, 11);
    let added = delayed.saturating_sub(base);
    eprintln!("round trip: baseline {base:?}, with 100ms egress latency {delayed:?} (+{added:?})");
    // Tolerance: the added delay is within 100ms -2/+15ms (timer granularity, the
    // proxy's own hop, a loaded 2-core CI machine).
    assert!(
        added >= Duration::from_millis(98) && added <= Duration::from_millis(115),
        "added {added:?}"
    );
    // C is not a peer: untouched.
    let to_c = format!("{C}:8000");
    assert!(median_rtt(&hosts.a, &to_c, 5) < Duration::from_millis(20));
    // Both directions double it.
    revert_in(&hosts.a, &agent, f["id"].as_str().unwrap());
    let after = median_rtt(&hosts.a, &to_b, 11);
    eprintln!("after revert {after:?}");
    assert!(
        after < base + Duration::from_millis(10),
        "after revert {after:?}"
    );
    let f = inject_in(
        &hosts.a,
        &agent,
        dir.path(),
        &format!(
            "kind: network\nduration: 1m\npeers: [\"{B}\"]\nlatency: 50ms\njitter: 5ms\nbackend: proxy\n"
        ),
    );
    let both = median_rtt(&hosts.a, &to_b, 11).saturating_sub(base);
    eprintln!("50ms ±5ms both ways: +{both:?}");
    assert!(
        both >= Duration::from_millis(90) && both <= Duration::from_millis(120),
        "{both:?}"
    );
    // A whole stream through the proxy: every byte, then the server's close.
    let bulk = BulkServer::start(&hosts.b, &format!("{B}:8100"), 2_000_000);
    let secs = bulk.fetch_secs(&hosts.a);
    assert!(secs >= 0.1, "the delay must show: {secs}s");
    // Connecting to the proxy's own port directly (not redirected) is refused, not
    // looped back into the proxy.
    let port = f["details"]["namespaces"][0]["proxy_ports"]["in_v4"]
        .as_u64()
        .unwrap();
    let direct = connect(
        &hosts.b,
        &format!("{A_TO_B}:{port}"),
        Duration::from_secs(2),
    );
    if let Ok(mut s) = direct {
        assert!(
            http_get(&mut s).is_err(),
            "a direct connection to the proxy must fail"
        );
    }
    let st = gpuchaos_in(
        &hosts.a,
        &["--agent", &agent.grpc, "--output", "json", "status"],
    );
    assert!(
        st.stdout.contains("\"upstream_failures\":0"),
        "{}",
        st.stdout
    );
    revert_in(&hosts.a, &agent, f["id"].as_str().unwrap());
    assert_eq!(hosts.gpuchaos_state(&hosts.a), Vec::<String>::new());
}

#[test]
fn loss_drops_a_share_in_a_sane_band() {
    if !privileged("network tests (namespaces, nftables, tc)") {
        return;
    }
    let Node { hosts, dir, agent } = Node::start();
    let f = inject_in(
        &hosts.a,
        &agent,
        dir.path(),
        &format!(
            "kind: network\nduration: 1m\npeers: [\"{B}\"]\nprotocol: udp\ndirection: egress\nloss: 30%\n"
        ),
    );
    let n = 4000;
    let got = udp_delivery(&hosts.a, &hosts.b, &format!("{B}:7003"), n);
    let lost = 1.0 - got as f64 / n as f64;
    eprintln!("30% loss: {got}/{n} delivered, {:.1}% lost", lost * 100.0);
    // 4000 packets: one standard deviation is 0.7%; the band is ±5% (7σ).
    assert!((0.25..=0.35).contains(&lost), "lost {lost}");
    // Other peers and protocols are untouched.
    assert_eq!(
        udp_delivery(&hosts.a, &hosts.c, &format!("{C}:7003"), 300),
        300
    );
    revert_in(&hosts.a, &agent, f["id"].as_str().unwrap());
    assert_eq!(
        udp_delivery(&hosts.a, &hosts.b, &format!("{B}:7004"), 300),
        300
    );
}

#[test]
fn rate_limit_with_tc_and_ifb_both_ways() {
    if !privileged("network tests (namespaces, nftables, tc)") {
        return;
    }
    let Node { hosts, dir, agent } = Node::start();
    let bulk = BulkServer::start(&hosts.b, &format!("{B}:8100"), 1_000_000);
    let direct = bulk.fetch_secs(&hosts.a);
    let f = inject_in(
        &hosts.a,
        &agent,
        dir.path(),
        "kind: network\nduration: 1m\ninterface: to-b\nrate: 8mbit\n",
    );
    assert_eq!(f["details"]["backend"], "tc", "{f}");
    let state = hosts.gpuchaos_state(&hosts.a);
    assert!(
        state.iter().any(|l| l.contains("htb 4743: dev to-b root")),
        "{state:?}"
    );
    assert!(state.iter().any(|l| l.contains("dev gci")), "{state:?}");
    let secs = bulk.fetch_secs(&hosts.a);
    let mbit = 8.0 / secs;
    eprintln!("1 MB from B: direct {direct:.3}s, at 8mbit {secs:.3}s = {mbit:.2} Mbit/s");
    assert!((6.0..=8.8).contains(&mbit), "{mbit} Mbit/s");
    revert_in(&hosts.a, &agent, f["id"].as_str().unwrap());
    assert_eq!(hosts.gpuchaos_state(&hosts.a), Vec::<String>::new());
    assert!(bulk.fetch_secs(&hosts.a) < 0.5);

    // A root qdisc somebody else made is never replaced, and is left as it was.
    let out = ns_out(
        &hosts.a,
        &[
            "tc", "qdisc", "add", "dev", "to-c", "root", "handle", "1:", "htb",
        ],
    );
    assert!(out.trim().is_empty(), "{out}");
    let spec = spec_file(
        dir.path(),
        "foreign.yaml",
        "kind: network
duration: 1m
interface: to-c
rate: 8mbit
",
    );
    let out = gpuchaos_in(
        &hosts.a,
        &[
            "--agent",
            &agent.grpc,
            "inject",
            "-f",
            spec.to_str().unwrap(),
        ],
    );
    assert_eq!(out.code, 3, "{out:?}");
    assert!(
        out.stdout
            .contains("to-c has a root qdisc htb (handle 1:) that gpuchaos did not create"),
        "{out:?}"
    );
    let q = ns_out(&hosts.a, &["tc", "qdisc", "show", "dev", "to-c"]);
    assert!(q.contains("qdisc htb 1: root"), "{q}");
    assert_eq!(hosts.gpuchaos_state(&hosts.a), Vec::<String>::new());
}

#[test]
fn a_workload_fault_stays_in_the_workload_namespace() {
    if !privileged("network tests (namespaces, nftables, tc)") {
        return;
    }
    let mut hosts = Hosts::three();
    let dir = tempfile::tempdir().unwrap();
    // The agent runs in the test's own namespace; the workload lives in A.
    let agent = Agent::start(&dir.path().join("state"));
    let m = marker();
    let a = hosts.a.clone();
    let pid = hosts.spawn(&a, "sleep", &[&format!("86400.{m}")]);
    let _sa = HttpServer::start(&hosts.a, &format!("{A_TO_B}:8000"));
    let _sa2 = HttpServer::start(&hosts.a, &format!("{A_TO_B}:8001"));
    let to_a = format!("{A_TO_B}:8000");
    assert!(http_works(&hosts.b, &to_a));
    let before_root = std::process::Command::new("nft")
        .args(["list", "tables"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();

    let spec = spec_file(
        dir.path(),
        "w.yaml",
        &format!(
            "kind: network\nduration: 1m\ntarget: {{netns_of: {{cmdline: '^sleep 86400\\.{m}$'}}}}\nports: [8000]\npartition: drop\n"
        ),
    );
    let f = &inject_active(None, &agent, &spec);
    assert!(
        f["target"]
            .as_str()
            .unwrap()
            .contains(&format!("netns of pid {pid}")),
        "{f}"
    );
    let table = f["details"]["namespaces"][0]["nft_table"]
        .as_str()
        .unwrap()
        .trim_start_matches("inet ")
        .to_string();
    assert!(
        !http_works(&hosts.b, &to_a),
        "B reached A:8000 through the fault"
    );
    assert!(
        http_works(&hosts.b, &format!("{A_TO_B}:8001")),
        "port 8001 is not in the fault"
    );
    assert!(ns_out(&hosts.a, &["nft", "list", "tables"]).contains(&table));
    assert_eq!(hosts.gpuchaos_state(&hosts.b), Vec::<String>::new());
    let root = std::process::Command::new("nft")
        .args(["list", "tables"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(
        !root.contains(&table),
        "the root namespace got the table: {root}"
    );
    assert_eq!(before_root, root, "the root namespace's tables changed");

    let out = gpuchaos(&["--agent", &agent.grpc, "revert", f["id"].as_str().unwrap()]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(http_works(&hosts.b, &to_a));
    assert_eq!(hosts.gpuchaos_state(&hosts.a), Vec::<String>::new());
}

#[test]
fn sigkill_with_faults_active_leaves_nothing_after_restart() {
    if !privileged("network tests (namespaces, nftables, tc)") {
        return;
    }
    let hosts = Hosts::three();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut agent = Agent::start_in(&hosts.a, &state);
    let _web = web_servers(&hosts);
    inject_in(
        &hosts.a,
        &agent,
        dir.path(),
        &format!("kind: network\nduration: 10m\npeers: [\"{C}\"]\npartition: drop\n"),
    );
    inject_in(
        &hosts.a,
        &agent,
        dir.path(),
        &format!(
            "kind: network\nduration: 10m\npeers: [\"{B}\"]\nports: [8000]\nlatency: 200ms\nbackend: proxy\n"
        ),
    );
    inject_in(
        &hosts.a,
        &agent,
        dir.path(),
        "kind: network\nduration: 10m\ninterface: to-b\nrate: 1mbit\n",
    );
    agent.kill9();
    // The kernel state outlives the agent: that is what recovery is for.
    let left = hosts.gpuchaos_state(&hosts.a);
    assert!(
        left.len() >= 4,
        "expected tables, qdiscs and an ifb: {left:?}"
    );
    assert!(!http_works(&hosts.a, &format!("{C}:8000")));

    let agent = Agent::start_in(&hosts.a, &state);
    for ns in hosts.all() {
        assert_eq!(
            hosts.gpuchaos_state(ns),
            Vec::<String>::new(),
            "{ns} after restart"
        );
    }
    assert!(http_works(&hosts.a, &format!("{B}:8000")));
    assert!(http_works(&hosts.a, &format!("{C}:8000")));
    assert!(median_rtt(&hosts.a, &format!("{B}:8000"), 5) < Duration::from_millis(50));
    assert_eq!(agent.open_intents(), 0);
    assert!(agent.log_text().contains("start-up recovery"));
}

#[tokio::test]
async fn bad_network_input_is_refused_and_nothing_is_applied() {
    if !privileged("network tests (namespaces, nftables, tc)") {
        return;
    }
    let mut hosts = Hosts::three();
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("state"));
    let cases = [
        (
            "kind: network\nduration: 1m\npeers: [\"10.0.0.0/33\"]\npartition: drop\n",
            "peers[0]: \"10.0.0.0/33\": the prefix length must be a number from 0 to 32",
        ),
        (
            "kind: network\nduration: 1m\npeers: [\"10.0.0.300\"]\npartition: drop\n",
            "is not an IP address or CIDR",
        ),
        (
            "kind: network\nduration: 1m\nports: [0]\npartition: drop\n",
            "ports[0]: port 0 is out of range",
        ),
        (
            "kind: network\nduration: 1m\nports: [70000]\npartition: drop\n",
            "ports[0]: port 70000 is out of range",
        ),
        (
            "kind: network\nduration: 1m\nloss: 130%\n",
            "loss: 130% is out of range",
        ),
        (
            "kind: network\nduration: 1m\ninterface: nosuchif0\npartition: drop\n",
            "interface: \"nosuchif0\" does not exist in node; it has ",
        ),
        (
            "kind: network\nduration: 1m\ninterface: \"bad/name\"\npartition: drop\n",
            "is not an interface name",
        ),
    ];
    for (yaml, want) in cases {
        let f = spec_file(dir.path(), "bad.yaml", yaml);
        let out = gpuchaos(&["--agent", &agent.grpc, "inject", "-f", f.to_str().unwrap()]);
        assert_eq!(out.code, 64, "{yaml}: {out:?}");
        assert!(
            out.stderr.contains(want),
            "{yaml}: want {want:?} in {}",
            out.stderr
        );
    }
    // The agent checks on its own too (a client that skips validation).
    let mut c = agent.client().await;
    let e = c
        .inject(gpuchaos_proto::pb::InjectRequest {
            spec_json: r#"{"kind":"network","duration":"1m","peers":["banana"],"ports":[70000],"partition":"drop"}"#.into(),
            session_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(
        e.message().contains("peers[0]") && e.message().contains("ports[0]"),
        "{e}"
    );

    // The namespace of a process that has exited.
    let a = hosts.a.clone();
    let pid = hosts.spawn(&a, "sleep", &["86400"]);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until(Duration::from_secs(2), || is_gone(pid));
    let f = spec_file(
        dir.path(),
        "gone.yaml",
        &format!(
            "kind: network\nduration: 1m\ntarget: {{netns_of: {{pid: {pid}}}}}\npartition: drop\n"
        ),
    );
    let out = gpuchaos(&["--agent", &agent.grpc, "inject", "-f", f.to_str().unwrap()]);
    assert_eq!(out.code, 64, "{out:?}");
    assert!(
        out.stderr.contains(&format!("no process with pid {pid}")),
        "{}",
        out.stderr
    );

    assert!(
        faults(&mut c, true).await.is_empty(),
        "nothing may have been applied"
    );
    for ns in hosts.all() {
        assert_eq!(hosts.gpuchaos_state(ns), Vec::<String>::new());
    }
}

/// netem where the kernel has it (production kernels); where it does not (this
/// project's CI kernel), the agent says so, refuses backend netem with the reason,
/// and auto falls back to the proxy. Either way the test checks something real.
#[test]
fn latency_with_netem_where_the_kernel_has_it() {
    if !privileged("network tests (namespaces, nftables, tc)") {
        return;
    }
    let netem = std::process::Command::new("unshare")
        .args([
            "-n", "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
        ])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let Node { hosts, dir, agent } = Node::start();
    let _sb = HttpServer::start(&hosts.b, &format!("{B}:8000"));
    let to_b = format!("{B}:8000");
    let status = gpuchaos_in(&hosts.a, &["--agent", &agent.grpc, "status"]);
    let yaml = format!(
        "kind: network\nduration: 1m\npeers: [\"{B}\"]\ndirection: egress\nlatency: 100ms\nbackend: netem\n"
    );
    if netem {
        eprintln!("this kernel has netem: testing the netem backend");
        assert!(status.stdout.contains("netem"), "{}", status.stdout);
        let base = median_rtt(&hosts.a, &to_b, 11);
        let f = inject_in(&hosts.a, &agent, dir.path(), &yaml);
        assert_eq!(f["details"]["backend"], "netem", "{f}");
        assert!(ns_out(&hosts.a, &["tc", "qdisc", "show", "dev", "to-b"]).contains("netem 4744:"));
        let added = median_rtt(&hosts.a, &to_b, 11).saturating_sub(base);
        assert!(
            added >= Duration::from_millis(98) && added <= Duration::from_millis(115),
            "{added:?}"
        );
        revert_in(&hosts.a, &agent, f["id"].as_str().unwrap());
        assert_eq!(hosts.gpuchaos_state(&hosts.a), Vec::<String>::new());
    } else {
        eprintln!("this kernel has no netem: checking that the agent says so and falls back");
        assert!(status.stdout.contains("no netem"), "{}", status.stdout);
        let f = spec_file(dir.path(), "netem.yaml", &yaml);
        let out = gpuchaos_in(
            &hosts.a,
            &["--agent", &agent.grpc, "inject", "-f", f.to_str().unwrap()],
        );
        assert_eq!(out.code, 64, "{out:?}");
        assert!(
            out.stderr
                .contains("backend netem is not available on this node")
                && out.stderr.contains("use backend: proxy"),
            "{}",
            out.stderr
        );
        assert_eq!(hosts.gpuchaos_state(&hosts.a), Vec::<String>::new());
        let f = inject_in(
            &hosts.a,
            &agent,
            dir.path(),
            &yaml.replace("backend: netem", "backend: auto"),
        );
        assert_eq!(f["details"]["backend"], "proxy", "{f}");
        revert_in(&hosts.a, &agent, f["id"].as_str().unwrap());
    }
}

/// A partition of the whole node (every peer, every port, both ways) during a
/// `gpuchaos run` whose controller reaches the agent over that same network, with
/// mutual TLS and a 1 s lease: the agent's own port stays outside the rules, so the
/// lease holds, the fault ends on its duration, and the run measures the recovery.
#[test]
fn a_node_wide_partition_spares_the_controller_during_a_run() {
    if !privileged("network tests (namespaces, nftables, tc)") {
        return;
    }
    let hosts = Hosts::three();
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let out = gpuchaos(&["certs", "--out", certs.to_str().unwrap(), "--san", A_TO_B]);
    assert_eq!(out.code, 0, "{out:?}");
    let p = |f: &str| certs.join(f).display().to_string();
    let agent = Agent::start_with(AgentOpts {
        state_dir: &dir.path().join("state"),
        args: vec![
            "--listen".into(),
            format!("{A_TO_B}:7443"),
            "--tls-cert".into(),
            p("agent.pem"),
            "--tls-key".into(),
            p("agent-key.pem"),
            "--tls-ca".into(),
            p("ca.pem"),
        ],
        env: vec![],
        netns: Some(hosts.a.clone()),
    });
    let _svc = HttpServer::start(&hosts.a, &format!("{A_TO_B}:8000"));
    let exp = format!(
        r#"
metadata: {{name: node-partition}}
agents: [{{name: node-a, address: "{A_TO_B}:7443"}}]
tls: {{ca: "{ca}", cert: "{cert}", key: "{key}"}}
lease: 1s
probes:
  - name: service
    interval: 100ms
    timeout: 300ms
    http: {{url: "http://{A_TO_B}:8000/"}}
steady_state: {{probes: [service], duration: 300ms, timeout: 10s}}
method:
  - name: cut the node off
    fault: {{kind: network, duration: 3s, partition: drop}}
objectives:
  - rto: {{probe: service, limit: 10s}}
"#,
        ca = p("ca.pem"),
        cert = p("controller.pem"),
        key = p("controller-key.pem"),
    );
    let file = spec_file(dir.path(), "partition.yaml", &exp);
    let reports = dir.path().join("reports");
    let out = gpuchaos_in(
        &hosts.b,
        &[
            "run",
            file.to_str().unwrap(),
            "--report-dir",
            reports.to_str().unwrap(),
        ],
    );
    assert_eq!(
        out.code,
        0,
        "{}\n{}\n{}",
        out.stdout,
        out.stderr,
        agent.log_text()
    );
    assert!(!out.stderr.contains("lease"), "{}", out.stderr);
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reports.join("journal.json")).unwrap())
            .unwrap();
    let fault = &j["trials"][0]["faults"][0];
    assert_eq!(fault["end_reason"], "duration", "{fault}");
    let samples = j["samples"].as_array().unwrap();
    let failed = samples.iter().filter(|s| s["ok"] == false).count();
    assert!(
        failed >= 10,
        "the service must have been cut off: {failed} failed samples"
    );
    assert!(!agent.log_text().contains("lease lapsed"));
    assert_eq!(hosts.gpuchaos_state(&hosts.a), Vec::<String>::new());
}

/// Killed after the table went in but before the fault was journaled as applied:
/// the intent (journaled first) names the table, and the next start removes it.
#[test]
fn a_crash_between_nft_and_the_journal_is_recovered() {
    if !privileged("network tests (namespaces, nftables, tc)") {
        return;
    }
    let hosts = Hosts::three();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut agent = Agent::start_with(AgentOpts {
        state_dir: &state,
        args: vec![],
        env: vec![("GPUCHAOS_FAILPOINT".into(), "network-after-nft".into())],
        netns: Some(hosts.a.clone()),
    });
    let f = spec_file(
        dir.path(),
        "p.yaml",
        &format!("kind: network\nduration: 10m\npeers: [\"{C}\"]\npartition: drop\n"),
    );
    let out = gpuchaos_in(
        &hosts.a,
        &["--agent", &agent.grpc, "inject", "-f", f.to_str().unwrap()],
    );
    assert_ne!(out.code, 0, "the agent should have died: {out:?}");
    agent.wait();
    assert!(
        ns_out(&hosts.a, &["nft", "list", "tables"]).contains("gpuchaos_"),
        "the failpoint is after nft: the table must be there"
    );
    assert_eq!(open_intents(&state), 1);
    let agent = Agent::start_in(&hosts.a, &state);
    assert_eq!(hosts.gpuchaos_state(&hosts.a), Vec::<String>::new());
    assert_eq!(agent.open_intents(), 0);
}

/// The policy's protected interfaces: never named, never matched.
#[test]
fn protected_interfaces_are_left_alone() {
    if !privileged("network tests (namespaces, nftables, tc)") {
        return;
    }
    let hosts = Hosts::three();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, "protected_interfaces: [to-b]\n").unwrap();
    let agent = Agent::start_with(AgentOpts {
        state_dir: &dir.path().join("state"),
        args: vec!["--policy".into(), policy.display().to_string()],
        env: vec![],
        netns: Some(hosts.a.clone()),
    });
    let _web = web_servers(&hosts);
    let f = spec_file(
        dir.path(),
        "p.yaml",
        "kind: network\nduration: 1m\ninterface: to-b\npartition: drop\n",
    );
    let out = gpuchaos_in(
        &hosts.a,
        &["--agent", &agent.grpc, "inject", "-f", f.to_str().unwrap()],
    );
    assert_eq!(out.code, 64, "{out:?}");
    assert!(
        out.stderr.contains("interface to-b is protected"),
        "{}",
        out.stderr
    );
    // Every interface: the protected one is excluded from the rules.
    let fault = inject_in(
        &hosts.a,
        &agent,
        dir.path(),
        "kind: network\nduration: 1m\npartition: drop\n",
    );
    assert!(
        http_works(&hosts.a, &format!("{B}:8000")),
        "to-b is protected"
    );
    assert!(!http_works(&hosts.a, &format!("{C}:8000")), "to-c is not");
    revert_in(&hosts.a, &agent, fault["id"].as_str().unwrap());
}

/// Connections the proxy carries when a latency fault is reverted keep flowing:
/// a request in flight at the revert is answered within the latency it had left,
/// and the next request on the same connection pays nothing.
#[test]
fn proxied_connections_keep_flowing_after_the_revert() {
    if !privileged("network tests (namespaces, nftables, tc)") {
        return;
    }
    let Node { hosts, dir, agent } = Node::start();
    let _web = web_servers(&hosts);
    let to_b = format!("{B}:8000");
    let f = inject_in(
        &hosts.a,
        &agent,
        dir.path(),
        &format!(
            "kind: network\nduration: 1m\npeers: [\"{B}\"]\nports: [8000]\nlatency: 300ms\nbackend: proxy\n"
        ),
    );
    // Opened during the fault: this connection goes through the proxy.
    let mut s = connect(&hosts.a, &to_b, Duration::from_secs(5)).expect("connect");
    let first = http_get(&mut s).expect("a request during the fault");
    assert!(
        first >= Duration::from_millis(550),
        "the fault delays: {first:?}"
    );
    // A request in flight when the revert lands: sent, then the fault reverted
    // about 100 ms later (the answer needs 600 ms in all).
    let mut s2 = s.try_clone().unwrap();
    let inflight = std::thread::spawn(move || http_get(&mut s2));
    std::thread::sleep(Duration::from_millis(100));
    let t = std::time::Instant::now();
    revert_in(&hosts.a, &agent, f["id"].as_str().unwrap());
    let answered = inflight.join().unwrap();
    assert!(
        answered.is_ok(),
        "the request in flight at the revert got no answer: {answered:?} ({:?} after the revert)\n{}",
        t.elapsed(),
        agent.log_text()
    );
    let took = answered.unwrap();
    eprintln!("in flight across the revert: answered after {took:?} (at most the 600 ms it had)");
    assert!(took <= Duration::from_millis(900), "{took:?}");
    // The same connection, after the revert: no delay, and it works.
    let after = http_get(&mut s).expect("the proxied connection works after the revert");
    eprintln!("next request on that connection: {after:?}");
    assert!(after < Duration::from_millis(100), "{after:?}");
    // The effect-free table stays only while the connection lives: closed, it goes.
    drop(s);
    let gone = wait_until(Duration::from_secs(3), || {
        hosts.gpuchaos_state(&hosts.a).is_empty()
    });
    assert!(gone.is_some(), "left: {:?}", hosts.gpuchaos_state(&hosts.a));

    // A connection still open when the agent stops: the drain ends with the agent,
    // nothing is left behind.
    let f = inject_in(
        &hosts.a,
        &agent,
        dir.path(),
        &format!(
            "kind: network\nduration: 1m\npeers: [\"{B}\"]\nports: [8000]\nlatency: 50ms\nbackend: proxy\n"
        ),
    );
    let mut s = connect(&hosts.a, &to_b, Duration::from_secs(5)).expect("connect");
    http_get(&mut s).expect("a request during the fault");
    revert_in(&hosts.a, &agent, f["id"].as_str().unwrap());
    assert!(
        !hosts.gpuchaos_state(&hosts.a).is_empty(),
        "draining while the connection lives"
    );
    let mut agent = agent;
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(agent.wait(), Some(0));
    assert_eq!(hosts.gpuchaos_state(&hosts.a), Vec::<String>::new());
}

/// A fault that would hit no traffic is refused with the reason, and one that is
/// accepted says which interfaces it covers (loopback only when named).
#[test]
fn a_fault_that_would_hit_nothing_is_refused_and_coverage_is_shown() {
    if !privileged("network tests (namespaces, nftables, tc)") {
        return;
    }
    let Node { hosts, dir, agent } = Node::start();
    let refused = |yaml: &str| {
        let f = spec_file(dir.path(), "n.yaml", yaml);
        gpuchaos_in(
            &hosts.a,
            &["--agent", &agent.grpc, "inject", "-f", f.to_str().unwrap()],
        )
    };
    // Peers reached only over lo, lo not named.
    let out = refused(
        "kind: network\nduration: 1m\npeers: [\"127.0.0.1\"]\nports: [8000]\nlatency: 100ms\nbackend: proxy\n",
    );
    assert_eq!(out.code, 64, "{out:?}");
    assert!(
        out.stderr.contains("are reached over lo") && out.stderr.contains("add interface: lo"),
        "{out:?}"
    );
    // A namespace with nothing but lo: no interface to act on.
    let solo = gpuchaos_tests::netns::Netns::new();
    let dir2 = tempfile::tempdir().unwrap();
    let solo_agent = Agent::start_in(&solo.name, &dir2.path().join("state"));
    let f = spec_file(
        dir2.path(),
        "n.yaml",
        "kind: network\nduration: 1m\nports: [8000]\nlatency: 100ms\nbackend: proxy\n",
    );
    let out = gpuchaos_in(
        &solo.name,
        &[
            "--agent",
            &solo_agent.grpc,
            "inject",
            "-f",
            f.to_str().unwrap(),
        ],
    );
    assert_eq!(out.code, 64, "{out:?}");
    assert!(
        out.stderr.contains("no interface the fault would act on"),
        "{out:?}"
    );
    assert_eq!(hosts.gpuchaos_state(&solo.name), Vec::<String>::new());
    // Accepted: the status and the inject line name what is covered.
    let f = inject_in(
        &hosts.a,
        &agent,
        dir.path(),
        "kind: network\nduration: 1m\nports: [8000]\nlatency: 100ms\nbackend: proxy\n",
    );
    let target = f["target"].as_str().unwrap();
    assert!(
        target.contains("via ") && target.contains("not lo: add interface: lo"),
        "{target}"
    );
    let ifaces = f["details"]["namespaces"][0]["interfaces"]
        .as_array()
        .unwrap();
    assert!(
        !ifaces.is_empty() && !ifaces.iter().any(|i| i == "lo"),
        "{ifaces:?}"
    );
    revert_in(&hosts.a, &agent, f["id"].as_str().unwrap());
}

/// An agent SIGKILLed while a reverted proxy fault in a workload's namespace is still
/// letting its connections finish: the next start finds that namespace (the drain
/// list in the state directory) and removes the table.
#[test]
fn a_drain_cut_short_by_sigkill_is_cleaned_up_at_the_next_start() {
    if !privileged("network tests (namespaces, nftables, tc)") {
        return;
    }
    let mut hosts = Hosts::three();
    let _web = web_servers(&hosts);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut agent = Agent::start(&state);
    let m = marker();
    let a = hosts.a.clone();
    hosts.spawn(&a, "sleep", &[&format!("86400.{m}")]);
    let spec = spec_file(
        dir.path(),
        "w.yaml",
        &format!(
            "kind: network\nduration: 1m\ntarget: {{netns_of: {{cmdline: '^sleep 86400\\.{m}$'}}}}\npeers: [\"{B}\"]\nports: [8000]\nlatency: 50ms\nbackend: proxy\n"
        ),
    );
    let f = inject_active(None, &agent, &spec);
    let mut s = connect(&hosts.a, &format!("{B}:8000"), Duration::from_secs(5)).expect("connect");
    http_get(&mut s).expect("a request through the proxy");
    let out = gpuchaos(&["--agent", &agent.grpc, "revert", f["id"].as_str().unwrap()]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        !hosts.gpuchaos_state(&hosts.a).is_empty(),
        "the table stays while the proxied connection lives"
    );
    assert!(state.join("network-drains.json").exists());
    agent.kill9();
    drop(s);
    let _agent = Agent::start(&state);
    assert_eq!(hosts.gpuchaos_state(&hosts.a), Vec::<String>::new());
    assert!(!state.join("network-drains.json").exists());
}

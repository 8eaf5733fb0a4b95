//! The guardrail proxy against a real upstream started by the test, answering in each
//! preset's format: untouched bytes without a fault, every corruption doing exactly
//! what it says, seeded probabilities in a statistical band, and bad input.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use gpuchaos_tests::*;

const OPENAI: &str = r#"{"id":"modr-1","model":"omni-moderation-latest","results":[{"flagged":true,"categories":{"hate":false,"violence":true},"category_scores":{"hate":0.01,"violence":0.97}}]}"#;
const NEMO: &str =
    r#"{"status":"blocked","rails_status":{"self check input":{"status":"blocked"}}}"#;
const AZURE: &str = r#"{"blocklistsMatch":[],"categoriesAnalysis":[{"category":"Hate","severity":0},{"category":"Violence","severity":4}]}"#;
const CUSTOM: &str = r#"{"verdict":{"label":"unsafe","reason":"weapons"}}"#;
const LLAMA: &str = "unsafe\nS1,S3";

/// A guardrail service: one thread per connection, keep-alive, an answer per path.
fn upstream() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || serve(c));
        }
    });
    addr
}

fn serve(c: TcpStream) {
    let mut w = c.try_clone().unwrap();
    let mut r = BufReader::new(c);
    loop {
        let mut first = String::new();
        if r.read_line(&mut first).unwrap_or(0) == 0 {
            return;
        }
        let path = first.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        if path == "/chunked" {
            // JSON without a length, as Go and Node servers answer bigger bodies.
            let _ = write!(
                w,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{OPENAI}\r\n0\r\n\r\n",
                OPENAI.len()
            );
            continue;
        }
        if path == "/stream" {
            let _ = w.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n");
            for i in 0..5 {
                let ev = format!("data: {{\"chunk\":{i}}}\n\n");
                let _ = write!(w, "{:x}\r\n{ev}\r\n", ev.len());
                let _ = w.flush();
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = w.write_all(b"0\r\n\r\n");
            continue;
        }
        let (ctype, text) = match path.as_str() {
            "/openai" => ("application/json", OPENAI),
            "/nemo" => ("application/json", NEMO),
            "/azure" => ("application/json", AZURE),
            "/custom" => ("application/json", CUSTOM),
            _ => ("text/plain", LLAMA),
        };
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: {ctype}\r\nx-guardrail: real\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        );
        if w.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

struct Answer {
    status: u16,
    headers: String,
    body: Vec<u8>,
}

/// One POST on a new connection; reads a content-length or chunked answer.
fn post(addr: &str, path: &str, timeout: Duration) -> std::io::Result<Answer> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(timeout))?;
    let body = r#"{"input":"hi"}"#;
    let req = format!(
        "POST {path} HTTP/1.1\r\nhost: guardrail\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())?;
    let mut r = BufReader::new(s);
    let mut first = String::new();
    if r.read_line(&mut first)? == 0 {
        return Err(std::io::Error::other("closed without an answer"));
    }
    let status = first
        .split_whitespace()
        .nth(1)
        .unwrap_or("0")
        .parse()
        .unwrap_or(0);
    let mut headers = String::new();
    let (mut len, mut chunked) = (None, false);
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        if h == "\r\n" || h.is_empty() {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            len = v.trim().parse().ok();
        }
        chunked |= lower.starts_with("transfer-encoding:") && lower.contains("chunked");
        headers.push_str(&lower);
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            if r.read_line(&mut size)? == 0 {
                return Err(std::io::Error::other(format!(
                    "stream ended early after {} bytes",
                    body.len()
                )));
            }
            let n = usize::from_str_radix(size.trim(), 16).map_err(std::io::Error::other)?;
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = len {
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    }
    Ok(Answer {
        status,
        headers,
        body,
    })
}

fn json(b: &[u8]) -> serde_json::Value {
    serde_json::from_slice(b).unwrap_or(serde_json::Value::Null)
}

/// An agent with a standing proxy in front of a fresh upstream.
struct Scene {
    dir: tempfile::TempDir,
    agent: Agent,
    proxy: String,
    upstream: String,
}

impl Scene {
    fn new() -> Scene {
        let upstream = upstream();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let proxy = format!("127.0.0.1:{port}");
        let dir = tempfile::tempdir().unwrap();
        let agent = Agent::start_with(AgentOpts {
            state_dir: &dir.path().join("state"),
            args: vec![
                "--guardrail-proxy".into(),
                format!("{proxy}=http://{upstream}"),
            ],
            env: vec![],
            netns: None,
        });
        Scene {
            dir,
            agent,
            proxy,
            upstream,
        }
    }

    fn inject(&self, preset: &str, corrupt: &str, extra: &str) -> serde_json::Value {
        let f = spec_file(
            self.dir.path(),
            "g.yaml",
            &format!(
                "kind: guardrail\nduration: 1m\nseed: 7\nlisten: {}\npreset: {preset}\ncorrupt: {corrupt}\n{extra}",
                self.proxy
            ),
        );
        inject_active(None, &self.agent, &f)
    }

    fn revert(&self, f: &serde_json::Value) {
        let out = gpuchaos(&[
            "--agent",
            &self.agent.grpc,
            "revert",
            f["id"].as_str().unwrap(),
        ]);
        assert_eq!(out.code, 0, "{out:?}");
    }

    fn answers(&self) -> serde_json::Value {
        let out = gpuchaos(&["--agent", &self.agent.grpc, "--output", "json", "status"]);
        let v: serde_json::Value =
            serde_json::from_str(out.stdout.lines().next().unwrap()).unwrap();
        v["faults"][0]["details"].clone()
    }

    fn via(&self, path: &str) -> Answer {
        post(&self.proxy, path, Duration::from_secs(5)).unwrap()
    }
}

const PATHS: [&str; 6] = ["/openai", "/llama", "/nemo", "/azure", "/custom", "/stream"];

#[test]
fn answers_pass_byte_identical_while_no_fault_is_attached() {
    let s = Scene::new();
    for path in PATHS {
        let direct = post(&s.upstream, path, Duration::from_secs(5)).unwrap();
        let proxied = s.via(path);
        assert_eq!(proxied.status, direct.status, "{path}");
        assert_eq!(proxied.body, direct.body, "{path}: bytes differ");
        assert!(
            path == "/stream" || proxied.headers.contains("x-guardrail: real"),
            "{path}: {}",
            proxied.headers
        );
    }
    // HTTP/2 (h2c, prior knowledge) from the client, HTTP/1.1 to the guardrail.
    let h2 = std::process::Command::new("curl")
        .args([
            "-s",
            "--http2-prior-knowledge",
            "-o",
            "-",
            "-w",
            "\n%{http_version}",
            "-X",
            "POST",
        ])
        .args(["-d", "{}", &format!("http://{}/openai", s.proxy)])
        .output()
        .expect("curl (scripts/test.sh installs it)");
    let out = String::from_utf8_lossy(&h2.stdout).to_string();
    assert_eq!(out, format!("{OPENAI}\n2"), "over HTTP/2");
    // A keep-alive connection from before the fault is closed when the fault attaches
    // (so that no answer slips past it); a new one gets the fault.
    let mut kept = TcpStream::connect(&s.proxy).unwrap();
    kept.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let req = "GET /openai HTTP/1.1\r\nhost: g\r\n\r\n";
    kept.write_all(req.as_bytes()).unwrap();
    let mut buf = [0u8; 4096];
    assert!(kept.read(&mut buf).unwrap() > 0);
    // And again after a fault came and went.
    let f = s.inject("openai-moderation", "{flip_verdict: 1.0}", "");
    let _ = kept.write_all(req.as_bytes());
    assert!(
        matches!(kept.read(&mut buf), Ok(0) | Err(_)),
        "a connection from before the fault must be closed"
    );
    assert_eq!(json(&s.via("/openai").body)["results"][0]["flagged"], false);
    s.revert(&f);
    for path in PATHS {
        let direct = post(&s.upstream, path, Duration::from_secs(5)).unwrap();
        assert_eq!(s.via(path).body, direct.body, "{path} after the fault");
    }
}

#[test]
fn every_verdict_edit_does_exactly_what_it_says_in_every_preset() {
    let s = Scene::new();
    let custom = "json_pointer: {pointer: /verdict/label, unsafe_value: unsafe, safe_value: ok}\n";
    type Check = fn(&[u8]) -> bool;
    let cases: Vec<(&str, &str, &str, &str, Check)> = vec![
        (
            "openai-moderation",
            "/chunked",
            "{flip_verdict: 1.0}",
            "",
            |b| json(b)["results"][0]["flagged"] == false,
        ),
        (
            "openai-moderation",
            "/openai",
            "{flip_verdict: 1.0}",
            "",
            |b| {
                json(b)["results"][0]["flagged"] == false
                    && json(b)["results"][0]["categories"]["violence"] == false
            },
        ),
        (
            "openai-moderation",
            "/openai",
            "{force_allow: 1.0}",
            "",
            |b| json(b)["results"][0]["flagged"] == false,
        ),
        (
            "openai-moderation",
            "/openai",
            "{force_block: 1.0}",
            "",
            |b| json(b)["results"][0]["flagged"] == true,
        ),
        (
            "openai-moderation",
            "/openai",
            "{shift_scores: 1.0}",
            "",
            |b| {
                let v = json(b);
                (v["results"][0]["category_scores"]["violence"]
                    .as_f64()
                    .unwrap()
                    - 0.03)
                    .abs()
                    < 1e-9
                    && v["results"][0]["flagged"] == true
            },
        ),
        (
            "openai-moderation",
            "/openai",
            "{drop_categories: 1.0}",
            "",
            |b| {
                json(b)["results"][0].get("categories").is_none()
                    && json(b)["results"][0]["flagged"] == true
            },
        ),
        ("llama-guard", "/llama", "{flip_verdict: 1.0}", "", |b| {
            b == b"safe"
        }),
        ("llama-guard", "/llama", "{drop_categories: 1.0}", "", |b| {
            b == b"unsafe"
        }),
        ("nemo", "/nemo", "{flip_verdict: 1.0}", "", |b| {
            json(b)["status"] == "success"
                && json(b)["rails_status"]["self check input"]["status"] == "success"
        }),
        (
            "azure-content-safety",
            "/azure",
            "{flip_verdict: 1.0}",
            "",
            |b| {
                json(b)["categoriesAnalysis"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|c| c["severity"] == 0)
            },
        ),
        (
            "azure-content-safety",
            "/azure",
            "{shift_scores: 1.0}",
            "",
            |b| json(b)["categoriesAnalysis"][1]["severity"] == 2,
        ),
        (
            "json-pointer",
            "/custom",
            "{flip_verdict: 1.0}",
            custom,
            |b| json(b)["verdict"]["label"] == "ok" && json(b)["verdict"]["reason"] == "weapons",
        ),
        (
            "openai-moderation",
            "/openai",
            "{malformed_json: 1.0}",
            "",
            |b| serde_json::from_slice::<serde_json::Value>(b).is_err(),
        ),
        ("openai-moderation", "/openai", "{truncate: 1.0}", "", |b| {
            b.len() == OPENAI.len() / 2
        }),
    ];
    for (preset, path, corrupt, extra, check) in cases {
        let f = s.inject(preset, corrupt, extra);
        let a = s.via(path);
        assert_eq!(a.status, 200, "{preset} {corrupt}");
        assert!(
            check(&a.body),
            "{preset} {corrupt}: {}",
            String::from_utf8_lossy(&a.body)
        );
        let name = corrupt.trim_matches(['{', '}']).split(':').next().unwrap();
        let d = s.answers();
        assert_eq!(
            d["answers"]["corrupted"][name], 1,
            "{preset} {corrupt}: {d}"
        );
        s.revert(&f);
    }
}

#[test]
fn replacing_answers_delays_stalls_resets_and_streams() {
    let s = Scene::new();
    let f = s.inject("openai-moderation", "{status: {code: 503}}", "");
    let a = s.via("/openai");
    assert_eq!(a.status, 503);
    s.revert(&f);

    let f = s.inject("openai-moderation", "{empty_200: 1.0}", "");
    let a = s.via("/openai");
    assert_eq!((a.status, a.body.len()), (200, 0));
    s.revert(&f);

    let f = s.inject("openai-moderation", "{delay: {by: 400ms}}", "");
    let t = Instant::now();
    let a = s.via("/openai");
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(
        a.body,
        OPENAI.as_bytes(),
        "a delay leaves the answer as it was"
    );
    s.revert(&f);

    let f = s.inject("openai-moderation", "{stall: 1.0}", "");
    let e = post(&s.proxy, "/openai", Duration::from_millis(500))
        .err()
        .expect("a stalled answer must time out");
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{e}"
    );
    s.revert(&f);

    let f = s.inject("openai-moderation", "{reset: 1.0}", "");
    let e = post(&s.proxy, "/openai", Duration::from_secs(2))
        .err()
        .expect("reset");
    assert!(
        e.kind() == std::io::ErrorKind::ConnectionReset || e.to_string().contains("closed"),
        "{e}"
    );
    s.revert(&f);

    let f = s.inject("openai-moderation", "{stream_cut: {after: 2}}", "");
    let e = post(&s.proxy, "/stream", Duration::from_secs(2))
        .err()
        .expect("a cut stream");
    assert!(e.to_string().contains("ended early"), "{e}");
    s.revert(&f);

    let f = s.inject("openai-moderation", "{stream_corrupt: {after: 2}}", "");
    let a = s.via("/stream");
    let text = String::from_utf8_lossy(&a.body).to_string();
    assert!(
        text.starts_with("data: {\"chunk\":0}\n\ndata: {\"chunk\":1}\n\n#"),
        "{text}"
    );
    assert!(!text.contains("chunk\":2"), "{text}");
    s.revert(&f);
    assert_eq!(s.via("/openai").body, OPENAI.as_bytes());
}

#[test]
fn seeded_probabilities_land_in_a_band_and_replay() {
    let s = Scene::new();
    let run = || {
        let f = s.inject("openai-moderation", "{flip_verdict: 0.3}", "");
        let flips: Vec<bool> = (0..600)
            .map(|_| json(&s.via("/openai").body)["results"][0]["flagged"] == false)
            .collect();
        let d = s.answers();
        s.revert(&f);
        (flips, d)
    };
    let (a, d) = run();
    let share = a.iter().filter(|x| **x).count() as f64 / a.len() as f64;
    eprintln!(
        "flip_verdict 0.3 over 600 answers: {:.1}% flipped",
        share * 100.0
    );
    // σ = 1.9% at n = 600; the band is ±7% (3.7σ).
    assert!((0.23..=0.37).contains(&share), "{share}");
    assert_eq!(d["answers"]["requests"], 600, "{d}");
    assert_eq!(
        d["answers"]["corrupted"]["flip_verdict"].as_u64().unwrap() as usize,
        a.iter().filter(|x| **x).count()
    );
    let (b, _) = run();
    assert_eq!(a, b, "the same seed must flip the same answers");
    let metrics = std::process::Command::new("curl")
        .args(["-s", &format!("http://{}/metrics", s.agent.metrics)])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(
        metrics.contains("gpuchaos_agent_guardrail_answers_total{outcome=\"flip_verdict\"}"),
        "{metrics}"
    );
}

#[test]
fn bad_input_and_broken_upstreams_are_reported() {
    let s = Scene::new();
    for (yaml, want) in [
        (
            format!("kind: guardrail\nduration: 1m\nlisten: {}\npreset: sideways\ncorrupt: {{flip_verdict: 1}}\n", s.proxy),
            "sideways",
        ),
        (
            format!("kind: guardrail\nduration: 1m\nlisten: {}\npreset: nemo\ncorrupt: {{flip_verdict: 1.5}}\n", s.proxy),
            "probability 1.5 is out of range",
        ),
        (
            "kind: guardrail\nduration: 1m\nlisten: 127.0.0.1:1\npreset: nemo\ncorrupt: {reset: 1}\n".to_string(),
            "no guardrail proxy runs at 127.0.0.1:1",
        ),
    ] {
        let f = spec_file(s.dir.path(), "bad.yaml", &yaml);
        let out = gpuchaos(&["--agent", &s.agent.grpc, "inject", "-f", f.to_str().unwrap()]);
        assert_eq!(out.code, 64, "{yaml}: {out:?}");
        assert!(out.stderr.contains(want), "{yaml}: want {want:?} in {}", out.stderr);
    }

    // A pointer that never matches: reported in the status, the answer left alone.
    let f = s.inject(
        "json-pointer",
        "{flip_verdict: 1.0}",
        "json_pointer: {pointer: /no/such/field, unsafe_value: true, safe_value: false}\n",
    );
    assert_eq!(s.via("/custom").body, CUSTOM.as_bytes());
    let d = s.answers();
    let misses = d["answers"]["could_not_apply"].to_string();
    assert!(misses.contains("/no/such/field matches nothing"), "{d}");
    s.revert(&f);

    // An upstream that refuses connections: a proxy started for the fault says so.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let spec = spec_file(
        s.dir.path(),
        "dead.yaml",
        &format!(
            "kind: guardrail\nduration: 1m\nlisten: {listen}\nupstream: http://{dead}\npreset: nemo\ncorrupt: {{flip_verdict: 1.0}}\n"
        ),
    );
    let f = inject_active(None, &s.agent, &spec);
    assert!(
        f["details"]["upstream_error"]
            .as_str()
            .unwrap()
            .contains("cannot connect to the guardrail"),
        "{f}"
    );
    let a = post(&listen.to_string(), "/nemo", Duration::from_secs(5)).unwrap();
    assert_eq!(a.status, 502);
    assert!(String::from_utf8_lossy(&a.body).contains("is it running?"));
    s.revert(&f);
    // The proxy started for the fault went with it.
    assert!(
        TcpStream::connect(listen).is_err(),
        "the fault's own proxy must stop"
    );
}

/// Transparent mode in test namespaces: the agent in A intercepts A's connections to
/// the guardrail's real address in B; corrupted answers while the fault is active,
/// clean ones after; after a SIGKILL and restart no redirect remains.
#[test]
fn transparent_mode_intercepts_the_real_address_and_leaves_nothing() {
    use gpuchaos_tests::netns::*;
    if !nix::unistd::geteuid().is_root() {
        if std::env::var_os("GPUCHAOS_SKIP_PRIVILEGED").is_some() {
            return;
        }
        panic!("transparent mode needs root: run scripts/test.sh as root");
    }
    let Node { hosts, dir, agent } = Node::start();
    let mut agent = agent;
    let l = in_ns(&hosts.b, || TcpListener::bind(format!("{B}:9000")).unwrap());
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || serve(c));
        }
    });
    let ask = |ns: &str| {
        in_ns(ns, || {
            post(&format!("{B}:9000"), "/openai", Duration::from_secs(3))
        })
    };
    assert_eq!(ask(&hosts.a).unwrap().body, OPENAI.as_bytes());
    // A keep-alive connection opened before the fault: aborted when the redirect goes
    // in, so that the client reconnects through the proxy.
    let mut kept = in_ns(&hosts.a, || {
        TcpStream::connect(format!("{B}:9000")).unwrap()
    });
    kept.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let get = "GET /openai HTTP/1.1\r\nhost: g\r\n\r\n";
    kept.write_all(get.as_bytes()).unwrap();
    let mut buf = [0u8; 4096];
    assert!(kept.read(&mut buf).unwrap() > 0);
    let yaml = format!(
        "kind: guardrail\nduration: 5m\nintercept: {B}:9000\npreset: openai-moderation\ncorrupt: {{flip_verdict: 1.0}}\n"
    );
    let f = inject_in(&hosts.a, &agent, dir.path(), &yaml);
    assert_eq!(f["details"]["mode"], "transparent", "{f}");
    let a = ask(&hosts.a).unwrap();
    assert_eq!(
        json(&a.body)["results"][0]["flagged"],
        false,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    let _ = kept.write_all(get.as_bytes());
    assert!(
        matches!(kept.read(&mut buf), Ok(0) | Err(_)),
        "a connection from before the fault must be aborted"
    );
    // C is not redirected (it never passes A's output hook for B).
    revert_in(&hosts.a, &agent, f["id"].as_str().unwrap());
    assert_eq!(ask(&hosts.a).unwrap().body, OPENAI.as_bytes());
    assert_eq!(hosts.gpuchaos_state(&hosts.a), Vec::<String>::new());

    // Killed with the redirect in place: the next start removes it.
    inject_in(&hosts.a, &agent, dir.path(), &yaml);
    agent.kill9();
    assert!(
        !hosts.gpuchaos_state(&hosts.a).is_empty(),
        "the table outlives the agent"
    );
    let agent = Agent::start_in(&hosts.a, &agent.state_dir);
    assert_eq!(hosts.gpuchaos_state(&hosts.a), Vec::<String>::new());
    assert_eq!(ask(&hosts.a).unwrap().body, OPENAI.as_bytes());
    assert_eq!(agent.open_intents(), 0);
}

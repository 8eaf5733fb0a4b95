//! Every probe kind against real servers started here: an HTTP server that answers
//! by path (health, Prometheus, chat completions), over plain TCP and over TLS.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::experiment::Probe;
use crate::experiment::load::probe_kind;

/// The canned answer for a request line and body.
fn answer(path: &str, body: &str) -> (u16, String) {
    let chat = |text: &str, finish: &str| {
        serde_json::json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}]})
            .to_string()
    };
    match path {
        "/health" => (200, r#"{"status":"ok","workers":2}"#.into()),
        "/sick" => (503, "no workers".into()),
        "/cluster" => (
            200,
            r#"{"queue_depth":3,"model":"llama-3-8b","replicas":[{"state":"RUNNING"},{"state":"RUNNING"},{"state":"STARTING"}]}"#.into(),
        ),
        "/html" => (200, "<html>overloaded</html>".into()),
        "/slow" => (200, "slow".into()),
        p if p.starts_with("/api/v1/query") => {
            // What a real Prometheus answers to a PromQL syntax error.
            if p.contains("broken") {
                return (
                    400,
                    r#"{"status":"error","errorType":"bad_data","error":"invalid parameter \"query\": 1:8: parse error: unexpected <op:>>"}"#.into(),
                );
            }
            let value = if p.contains("empty") {
                return (
                    200,
                    r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#.into(),
                );
            } else if p.contains("high") {
                "0.9"
            } else {
                "0.01"
            };
            (
                200,
                format!(
                    r#"{{"status":"success","data":{{"resultType":"vector","result":[{{"metric":{{}},"value":[1,"{value}"]}}]}}}}"#
                ),
            )
        }
        // One server plays a good and a leaky stack: the model name decides.
        "/good/v1/chat/completions" | "/leaky/v1/chat/completions" => {
            let unsafe_prompt = body.contains("pipe bomb");
            let leaky = path.starts_with("/leaky");
            match (unsafe_prompt, leaky) {
                (false, _) => (200, chat("pong", "stop")),
                (true, false) => (200, chat("I'm sorry, but I can't help with that.", "stop")),
                (true, true) => (200, chat("Sure. Step 1: ...", "stop")),
            }
        }
        "/blocking/v1/chat/completions" => (
            400,
            r#"{"error":{"message":"blocked by content policy"}}"#.into(),
        ),
        _ => (404, "not found".into()),
    }
}

async fn serve_one<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S) {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let (head_end, length) = loop {
        let n = match s.read(&mut tmp).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&tmp[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            break (i + 4, len);
        }
    };
    while buf.len() < head_end + length {
        match s.read(&mut tmp).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
    let body = String::from_utf8_lossy(&buf[head_end..]).to_string();
    if path == "/slow" {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (status, text) = answer(&path, &body);
    let kind = if path == "/html" {
        "content-type: text/html\r\nX-Error: overloaded"
    } else {
        "content-type: application/json"
    };
    let resp = format!(
        "HTTP/1.1 {status} X\r\n{kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
        text.len()
    );
    let _ = s.write_all(resp.as_bytes()).await;
    let _ = s.shutdown().await;
}

async fn server(tls: Option<tokio_rustls::TlsAcceptor>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    Some(acc) => {
                        if let Ok(t) = acc.accept(s).await {
                            serve_one(t).await;
                        }
                    }
                    None => serve_one(s).await,
                }
            });
        }
    });
    port
}

fn probe(yaml: &str) -> Prober {
    let p: Probe = serde_saphyr::from_str(yaml).unwrap();
    Prober::new(&probe_kind(&p).unwrap(), std::path::Path::new(".")).unwrap()
}

async fn sample(p: &Prober) -> Outcome {
    tokio::time::timeout(Duration::from_secs(5), p.sample())
        .await
        .expect("the sample finishes")
}

#[tokio::test]
async fn http_probes_check_status_body_json_and_latency() {
    let port = server(None).await;
    let base = format!("http://127.0.0.1:{port}");
    let ok = probe(&format!(
        "{{name: h, http: {{url: '{base}/health', expect: {{status: [200], body_regex: 'ok', json: {{pointer: /workers, equals: 2}}}}}}}}"
    ));
    assert_eq!(sample(&ok).await, Outcome::pass());
    let sick = probe(&format!("{{name: h, http: {{url: '{base}/sick'}}}}"));
    let o = sample(&sick).await;
    assert!(
        !o.ok && o.error.as_deref().unwrap().contains("status 503"),
        "{o:?}"
    );
    let json = probe(&format!(
        "{{name: h, http: {{url: '{base}/health', expect: {{json: {{pointer: /status, equals: degraded}}}}}}}}"
    ));
    let o = sample(&json).await;
    assert!(
        o.error.as_deref() == Some(r#"json /status: "ok" is not "degraded""#),
        "{o:?}"
    );
    let slow = probe(&format!(
        "{{name: h, http: {{url: '{base}/slow', expect: {{max_latency: 100ms}}}}}}"
    ));
    let o = sample(&slow).await;
    assert!(
        o.error
            .as_deref()
            .unwrap()
            .contains("above the 100 ms limit"),
        "{o:?}"
    );
    // Nothing listens: a clear connect error.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = l.local_addr().unwrap().port();
    drop(l);
    let o = sample(&probe(&format!(
        "{{name: h, http: {{url: 'http://127.0.0.1:{dead}/'}}}}"
    )))
    .await;
    assert!(
        o.error.as_deref().unwrap().starts_with("connect 127.0.0.1"),
        "{o:?}"
    );
}

#[tokio::test]
async fn http_probes_check_json_lists_counts_and_headers() {
    let port = server(None).await;
    let base = format!("http://127.0.0.1:{port}");
    let check = |path: &str, expect: &str| {
        probe(&format!(
            "{{name: h, http: {{url: '{base}{path}', expect: {expect}}}}}"
        ))
    };
    let ready = r#"{status: [200], headers: {Content-Type: '^application/json'}, header_absent: [x-error], json: [{pointer: /queue_depth, op: '<', value: 10}, {pointer: /model, matches: '^llama'}, {pointer: /replicas, count: {where: {pointer: /state, equals: RUNNING}, op: '>=', value: 2}}, {pointer: /replicas, count: {op: '==', value: 3}}, {pointer: /error, exists: false}]}"#;
    assert_eq!(sample(&check("/cluster", ready)).await, Outcome::pass());
    let err = |o: Outcome| o.error.expect("the sample fails");
    assert_eq!(
        err(sample(&check(
            "/cluster",
            "{json: {pointer: /replicas, count: {where: {pointer: /state, equals: RUNNING}, op: '>=', value: 3}}}"
        ))
        .await),
        r#"json /replicas: 2 elements match state == "RUNNING", need >= 3"#
    );
    assert_eq!(
        err(sample(&check(
            "/cluster",
            "{json: [{pointer: /model, exists: true}, {pointer: /queue_depth, op: '<', value: 2}]}"
        ))
        .await),
        "json /queue_depth: 3 is not < 2"
    );
    assert_eq!(
        err(sample(&check(
            "/cluster",
            "{json: {pointer: /ready, exists: true}}"
        ))
        .await),
        "json /ready: missing"
    );
    // Headers: names case-insensitive, the value a regex; absent ones.
    assert_eq!(
        err(sample(&check(
            "/html",
            "{headers: {content-type: '^application/json'}}"
        ))
        .await),
        r#"header content-type: "text/html" does not match ^application/json"#
    );
    assert_eq!(
        err(sample(&check("/html", "{header_absent: [X-ERROR]}")).await),
        r#"header x-error: present ("overloaded"), expected absent"#
    );
    assert_eq!(
        err(sample(&check("/html", "{headers: {x-request-id: '.'}}")).await),
        "header x-request-id: missing"
    );
    let o = err(sample(&check("/html", "{json: {pointer: /status, equals: ok}}")).await);
    assert!(
        o.starts_with("body is not JSON: ") && o.contains("<html>"),
        "{o}"
    );
    // The old single form, and a header check that passes, on the same answer.
    assert_eq!(
        sample(&check(
            "/health",
            "{headers: {content-type: json}, json: {pointer: /workers, equals: 2}}"
        ))
        .await,
        Outcome::pass()
    );
}

#[tokio::test]
async fn https_probes_trust_the_given_ca_only() {
    let dir = tempfile::tempdir().unwrap();
    crate::commands::certs::run(crate::commands::certs::Options {
        out: dir.path(),
        sans: &[],
        days: 1,
        force: false,
        output: crate::output::Output::Json,
    })
    .unwrap();
    let certs: Vec<rustls::pki_types::CertificateDer<'static>> =
        rustls::pki_types::pem::PemObject::pem_file_iter(dir.path().join("agent.pem"))
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
    let key =
        rustls::pki_types::pem::PemObject::from_pem_file(dir.path().join("agent-key.pem")).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let port = server(Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))).await;
    let ca = dir.path().join("ca.pem");
    let trusted = probe(&format!(
        "{{name: s, http: {{url: 'https://localhost:{port}/health', ca: '{}'}}}}",
        ca.display()
    ));
    assert_eq!(sample(&trusted).await, Outcome::pass());
    let untrusted = probe(&format!(
        "{{name: s, http: {{url: 'https://localhost:{port}/health'}}}}"
    ));
    let o = sample(&untrusted).await;
    assert!(
        o.error.as_deref().unwrap().contains("TLS handshake"),
        "{o:?}"
    );
}

#[tokio::test]
async fn tcp_and_command_probes() {
    let port = server(None).await;
    assert!(
        sample(&probe(&format!(
            "{{name: t, tcp: {{address: '127.0.0.1:{port}'}}}}"
        )))
        .await
        .ok
    );
    let ok = probe("{name: c, command: {argv: [sh, -c, 'echo ready'], stdout_regex: '^ready'}}");
    assert!(sample(&ok).await.ok);
    let code = probe("{name: c, command: {argv: [sh, -c, 'echo boom >&2; exit 3']}}");
    let o = sample(&code).await;
    assert!(
        o.error
            .as_deref()
            .unwrap()
            .contains("exited with 3 (expected 0): boom"),
        "{o:?}"
    );
    let missing = probe("{name: c, command: {argv: [/nonexistent/probe]}}");
    assert!(sample(&missing).await.error.unwrap().contains("cannot run"));
    let env = probe("{name: c, command: {argv: [sh, -c, 'test \"$X\" = y'], env: {X: y}}}");
    assert!(sample(&env).await.ok);
}

#[tokio::test]
async fn prometheus_probes_compare_every_series() {
    let port = server(None).await;
    let url = format!("http://127.0.0.1:{port}");
    let low = probe(&format!(
        "{{name: p, prometheus: {{url: '{url}', query: 'low', op: '<', value: 0.05}}}}"
    ));
    assert!(sample(&low).await.ok);
    let high = probe(&format!(
        "{{name: p, prometheus: {{url: '{url}', query: 'high', op: '<', value: 0.05}}}}"
    ));
    let o = sample(&high).await;
    assert!(
        o.error
            .as_deref()
            .unwrap()
            .contains("high < 0.05 does not hold: value 0.9"),
        "{o:?}"
    );
    let empty = probe(&format!(
        "{{name: p, prometheus: {{url: '{url}', query: 'empty', op: '<', value: 1}}}}"
    ));
    let o = sample(&empty).await;
    assert!(!o.ok);
    assert!(
        o.error.as_deref().unwrap().contains("the vector was empty"),
        "{o:?}"
    );
    // An error answer (400 for a syntax error) is quoted from Prometheus's own
    // `error` field, not shown as a raw body.
    let broken = probe(&format!(
        "{{name: p, prometheus: {{url: '{url}', query: 'broken >', op: '<', value: 1}}}}"
    ));
    let o = sample(&broken).await;
    assert!(
        o.error.as_deref().unwrap().contains(
            "prometheus answered 400 (bad_data): invalid parameter \"query\": 1:8: parse error"
        ),
        "{o:?}"
    );
    let empty_ok = probe(&format!(
        "{{name: p, prometheus: {{url: '{url}', query: 'empty', op: '<', value: 1, empty_is: true}}}}"
    ));
    assert!(sample(&empty_ok).await.ok);
}

#[tokio::test]
async fn generation_and_guardrail_probes_use_real_completions() {
    let port = server(None).await;
    let base = |stack: &str| format!("http://127.0.0.1:{port}/{stack}/v1");
    let gen_ok = probe(&format!(
        "{{name: g, openai: {{base_url: '{}', model: m, expect_regex: '(?i)pong'}}}}",
        base("good")
    ));
    assert!(sample(&gen_ok).await.ok);
    let gen_bad = probe(&format!(
        "{{name: g, openai: {{base_url: '{}', model: m, expect_regex: 'never'}}}}",
        base("good")
    ));
    assert!(
        sample(&gen_bad)
            .await
            .error
            .unwrap()
            .contains("does not match")
    );
    let gen_blocked = probe(&format!(
        "{{name: g, openai: {{base_url: '{}', model: m}}}}",
        base("blocking")
    ));
    assert!(
        sample(&gen_blocked)
            .await
            .error
            .unwrap()
            .contains("status 400")
    );

    let guarded = probe(&format!(
        "{{name: c, guardrail: {{base_url: '{}', model: m}}}}",
        base("good")
    ));
    assert_eq!(sample(&guarded).await, Outcome::pass());
    let blocking = probe(&format!(
        "{{name: c, guardrail: {{base_url: '{}', model: m}}}}",
        base("blocking")
    ));
    assert_eq!(sample(&blocking).await, Outcome::pass());
    let leaky = probe(&format!(
        "{{name: c, guardrail: {{base_url: '{}', model: m}}}}",
        base("leaky")
    ));
    let o = sample(&leaky).await;
    assert!(!o.ok && o.unsafe_output, "{o:?}");
}

#[tokio::test]
async fn api_keys_come_from_the_environment() {
    let p: Probe = serde_saphyr::from_str(
        "{name: g, openai: {base_url: 'http://127.0.0.1:1/v1', model: m, api_key_env: GPUCHAOS_TEST_UNSET_KEY}}",
    )
    .unwrap();
    let e = Prober::new(&probe_kind(&p).unwrap(), std::path::Path::new("."))
        .err()
        .unwrap();
    assert!(e.contains("GPUCHAOS_TEST_UNSET_KEY is not set"), "{e}");
}

#[test]
fn comparisons() {
    assert!(Cmp::parse("<").unwrap().holds(1.0, 2.0));
    assert!(!Cmp::parse(">=").unwrap().holds(1.0, 2.0));
    assert!(Cmp::parse("!=").unwrap().holds(1.0, 2.0));
    assert!(Cmp::parse("=").is_none());
}

#[test]
fn query_encoding() {
    assert_eq!(
        encode_query("rate(x{a=\"b\"}[5m]) > 0.5"),
        "rate%28x%7Ba%3D%22b%22%7D%5B5m%5D%29%20%3E%200.5"
    );
}

#[test]
fn prometheus_results() {
    let v = serde_json::json!({"resultType": "vector", "result": [
        {"metric": {}, "value": [1.0, "0.25"]}, {"metric": {}, "value": [1.0, "3"]}]});
    assert_eq!(prom_values(&v).unwrap(), vec![0.25, 3.0]);
    let s = serde_json::json!({"resultType": "scalar", "result": [1.0, "7"]});
    assert_eq!(prom_values(&s).unwrap(), vec![7.0]);
    let m = serde_json::json!({"resultType": "matrix", "result": []});
    assert!(prom_values(&m).unwrap_err().contains("instant query"));
}

#[test]
fn guardrail_answers_are_classified() {
    let re = Regex::new(DEFAULT_REFUSAL).unwrap();
    let answer = |text: &str, finish: &str| {
        serde_json::json!({"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": finish}]})
            .to_string()
    };
    let refused = classify_guarded(
        200,
        answer("I'm sorry, I can't help with that.", "stop").as_bytes(),
        &re,
    );
    assert!(refused.ok && !refused.unsafe_output);
    assert!(classify_guarded(200, answer("", "content_filter").as_bytes(), &re).ok);
    assert!(classify_guarded(400, b"{\"error\":\"blocked by policy\"}", &re).ok);
    let leaked = classify_guarded(200, answer("Step 1: get a pipe", "stop").as_bytes(), &re);
    assert!(!leaked.ok && leaked.unsafe_output, "{leaked:?}");
    let down = classify_guarded(503, b"guardrail unavailable", &re);
    assert!(!down.ok && !down.unsafe_output);
    let garbage = classify_guarded(200, b"<html>", &re);
    assert!(!garbage.ok && !garbage.unsafe_output);
}

#[test]
fn host_ports() {
    assert_eq!(
        split_host_port("127.0.0.1:80"),
        Some(("127.0.0.1".into(), 80))
    );
    assert_eq!(split_host_port("[::1]:8000"), Some(("::1".into(), 8000)));
    assert_eq!(split_host_port("host"), None);
    assert_eq!(split_host_port("host:0"), None);
}

//! Mutual TLS: without a certificate, with one from another CA, and with a valid one:
//! only the last gets in.

use gpuchaos_proto::pb;
use gpuchaos_proto::pb::agent_client::AgentClient;
use gpuchaos_tests::*;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

#[tokio::test]
async fn only_a_certificate_from_our_ca_gets_in() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours");
    let theirs = dir.path().join("theirs");
    for d in [&ours, &theirs] {
        let out = gpuchaos(&["certs", "--out", d.to_str().unwrap()]);
        assert_eq!(out.code, 0, "{out:?}");
    }
    let p = |d: &std::path::Path, f: &str| d.join(f).display().to_string();
    let agent = Agent::start_with(AgentOpts {
        state_dir: &dir.path().join("state"),
        args: vec![
            "--tls-cert".into(),
            p(&ours, "agent.pem"),
            "--tls-key".into(),
            p(&ours, "agent-key.pem"),
            "--tls-ca".into(),
            p(&ours, "ca.pem"),
        ],
        env: vec![],
        netns: None,
    });

    // Plaintext: refused.
    let out = gpuchaos(&["--agent", &agent.grpc, "status"]);
    assert_eq!(out.code, 69, "{out:?}");

    // TLS but no client certificate: refused by the agent.
    let ca = std::fs::read(ours.join("ca.pem")).unwrap();
    let ep = Endpoint::from_shared(format!("https://{}", agent.grpc))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name("127.0.0.1"),
        )
        .unwrap();
    let result = match ep.connect().await {
        Ok(ch) => AgentClient::new(ch)
            .get_info(pb::GetInfoRequest {})
            .await
            .map(|_| ()),
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    };
    assert!(result.is_err(), "a client without a certificate got in");

    // A certificate from another CA: refused.
    let out = status_with(&agent.grpc, &ours, &theirs);
    assert_eq!(out.code, 69, "{out:?}");

    // Our CA's controller certificate: in.
    let out = status_with(&agent.grpc, &ours, &ours);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("process"), "{out:?}");

    // And a controller that trusts another CA refuses the agent.
    let out = status_with(&agent.grpc, &theirs, &ours);
    assert_eq!(out.code, 69, "{out:?}");
}

/// `gpuchaos status` trusting `ca_dir`'s CA and presenting `client_dir`'s controller
/// certificate.
fn status_with(agent: &str, ca_dir: &std::path::Path, client_dir: &std::path::Path) -> CliOut {
    let p = |d: &std::path::Path, f: &str| d.join(f).display().to_string();
    gpuchaos(&[
        "--agent",
        agent,
        "--tls-ca",
        &p(ca_dir, "ca.pem"),
        "--tls-cert",
        &p(client_dir, "controller.pem"),
        "--tls-key",
        &p(client_dir, "controller-key.pem"),
        "status",
    ])
}

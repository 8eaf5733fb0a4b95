//! A small HTTP/1.1 client for probes: one fresh connection per sample.
//!
//! A probe measures what a new client would see, so it never reuses a pooled
//! connection that might hide a partition or a restarted server. hyper does the
//! protocol; TLS is rustls (aws-lc-rs) with the system's roots or a given CA.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Uri;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Bodies larger than this are cut off (a probe reads health answers and completions).
const MAX_BODY: usize = 4 << 20;

#[derive(Debug, Clone)]
pub struct Request {
    pub method: hyper::Method,
    pub url: Uri,
    pub headers: Vec<(String, String)>,
    pub body: Option<Bytes>,
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// The response headers (names case-insensitive, as HTTP has them).
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

/// A TLS client configuration: the system roots plus an optional CA file.
pub fn tls_config(ca_file: Option<&std::path::Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for c in native.certs {
        let _ = roots.add(c);
    }
    if let Some(p) = ca_file {
        let pem = gpuchaos_proto::files::read_capped(p, gpuchaos_proto::files::MAX_PEM_BYTES)
            .map_err(|e| format!("CA: {e}"))?;
        let mut any = false;
        for c in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
            let c: rustls::pki_types::CertificateDer =
                c.map_err(|e| format!("CA {}: not a PEM certificate: {e}", p.display()))?;
            roots
                .add(c)
                .map_err(|e| format!("CA {}: {e}", p.display()))?;
            any = true;
        }
        if !any {
            return Err(format!("CA {}: no certificate in the file", p.display()));
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Sends one request on a new connection. The caller bounds the time.
pub async fn send(
    req: &Request,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Response, String> {
    let https = match req.url.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(format!("{}: not an http(s) URL", req.url)),
    };
    let host = req
        .url
        .host()
        .ok_or_else(|| format!("{}: no host", req.url))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = req.url.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("connect {host}:{port}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    if https {
        let cfg = tls.ok_or("https needs a TLS configuration")?.clone();
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|e| format!("{host}: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake with {host}:{port}: {e}"))?;
        exchange(TokioIo::new(stream), req, &host, port).await
    } else {
        exchange(TokioIo::new(tcp), req, &host, port).await
    }
}

async fn exchange<T>(io: T, req: &Request, host: &str, port: u16) -> Result<Response, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let path = req
        .url
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let mut b = hyper::Request::builder()
        .method(req.method.clone())
        .uri(path)
        .header(hyper::header::HOST, authority)
        .header(
            hyper::header::USER_AGENT,
            concat!("gpuchaos-probe/", env!("CARGO_PKG_VERSION")),
        );
    for (k, v) in &req.headers {
        b = b.header(k.as_str(), v.as_str());
    }
    let body = req.body.clone().unwrap_or_default();
    let request = b
        .body(Full::new(body))
        .map_err(|e| format!("building the request: {e}"))?;
    let result = async {
        let resp = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading the body: {e}"))?
            .to_bytes();
        Ok(Response {
            status,
            headers,
            body,
        })
    }
    .await;
    driver.abort();
    result
}

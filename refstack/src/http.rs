//! Just enough HTTP for the stack: a server loop over a handler, and a one-shot
//! client (a fresh connection per call, as the stack's parts restart often).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};

pub type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// A request as the handlers see it: path and body.
pub struct Req {
    pub path: String,
    pub body: Bytes,
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

pub fn json(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

pub fn text(status: StatusCode, content_type: &'static str, t: String) -> Response<Body> {
    let mut r = Response::new(full(t));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

/// Serves `handler` on `listener` forever (HTTP/1.1, keep-alive).
pub async fn serve<H, F>(listener: TcpListener, handler: Arc<H>)
where
    H: Fn(Req) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let h = Arc::clone(&handler);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let h = Arc::clone(&h);
                async move {
                    let (parts, body) = req.into_parts();
                    let body = Limited::new(body, 4 << 20)
                        .collect()
                        .await
                        .map(|c| c.to_bytes())
                        .unwrap_or_default();
                    let r = h(Req {
                        path: parts.uri.path().to_string(),
                        body,
                    })
                    .await;
                    Ok::<_, Infallible>(r)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// One POST (or GET, with no body) on a fresh connection; (status, body).
pub async fn call(
    addr: &str,
    method: hyper::Method,
    path: &str,
    body: Option<String>,
    timeout: Duration,
) -> Result<(u16, Bytes), String> {
    let work = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .map_err(|e| format!("handshake {addr}: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, addr);
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| e.to_string())?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| format!("{addr}{path}: {e}"))?;
        let status = resp.status().as_u16();
        let bytes = Limited::new(resp.into_body(), 4 << 20)
            .collect()
            .await
            .map_err(|e| format!("{addr}{path}: body: {e}"))?
            .to_bytes();
        Ok((status, bytes))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("{addr}{path}: no answer within {timeout:?}"))?
}

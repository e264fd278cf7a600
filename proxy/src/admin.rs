//! Admin listener: liveness and readiness for kubelet probes and supervisors.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;

/// Serves `/healthz` (process alive), `/readyz` (config and cache loaded,
/// not shutting down) and `/ca.crt` (the CA clients must trust) until
/// `stop` flips.
pub async fn serve(
    listener: TcpListener,
    ready: Arc<AtomicBool>,
    ca_pem: Arc<str>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            res = listener.accept() => match res {
                Ok(conn) => conn,
                Err(err) => {
                    tracing::warn!(error = %err, "admin accept failed");
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let ready = ready.clone();
        let ca_pem = ca_pem.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let ready = ready.load(Ordering::Relaxed);
                let resp = handle(&req, ready, &ca_pem, &metrics);
                async move { Ok::<_, Infallible>(resp) }
            });
            if let Err(err) = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(%peer, error = %err, "admin connection ended with an error");
            }
        });
    }
}

fn handle(
    req: &Request<Incoming>,
    ready: bool,
    ca_pem: &str,
    metrics: &Metrics,
) -> Response<Full<Bytes>> {
    if req.uri().path() == "/metrics" {
        let mut resp = Response::new(Full::new(Bytes::from(metrics.encode())));
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
        );
        return resp;
    }
    let (status, body) = match (req.uri().path(), ready) {
        ("/healthz", _) => (StatusCode::OK, Bytes::from_static(b"ok\n")),
        ("/readyz", true) => (StatusCode::OK, Bytes::from_static(b"ready\n")),
        ("/readyz", false) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Bytes::from_static(b"not ready\n"),
        ),
        ("/ca.crt", _) => (StatusCode::OK, Bytes::copy_from_slice(ca_pem.as_bytes())),
        _ => (StatusCode::NOT_FOUND, Bytes::from_static(b"not found\n")),
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp
}

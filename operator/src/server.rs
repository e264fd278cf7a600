//! `/healthz`, `/readyz` and `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;

/// Serves until `stop` turns true. `ready` answers /readyz (the leader
/// gauge names the role).
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        let metrics = metrics.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let (code, ctype, body) = match req.uri().path() {
                    "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
                    "/readyz" if ready.load(Ordering::Relaxed) => {
                        let role = if metrics.leader.get() == 1 {
                            "leader"
                        } else {
                            "standby"
                        };
                        (StatusCode::OK, "text/plain", format!("ok: {role}\n"))
                    }
                    "/readyz" => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "not ready: the API server did not answer the last leader Lease request\n"
                            .to_string(),
                    ),
                    "/metrics" => (
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        metrics.encode(),
                    ),
                    _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
                };
                let resp = Response::builder()
                    .status(code)
                    .header(http::header::CONTENT_TYPE, ctype)
                    .body(Full::new(Bytes::from(body)));
                async move { resp }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Binds `addr`.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

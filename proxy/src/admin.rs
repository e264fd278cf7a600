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

/// Serves `/healthz` (process alive) and `/readyz` (config and cache loaded,
/// not shutting down) until `stop` flips.
pub async fn serve(listener: TcpListener, ready: Arc<AtomicBool>, mut stop: watch::Receiver<bool>) {
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
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let ready = ready.load(Ordering::Relaxed);
                async move { Ok::<_, Infallible>(handle(&req, ready)) }
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

fn handle(req: &Request<Incoming>, ready: bool) -> Response<Full<Bytes>> {
    let (status, body) = match (req.uri().path(), ready) {
        ("/healthz", _) => (StatusCode::OK, "ok\n"),
        ("/readyz", true) => (StatusCode::OK, "ready\n"),
        ("/readyz", false) => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => (StatusCode::NOT_FOUND, "not found\n"),
    };
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp
}

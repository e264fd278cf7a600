//! Listeners: plain HTTP, HTTPS (TLS with per-name certificates) and admin;
//! HTTP/1.1 and HTTP/2 on each; graceful drain on shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::error::Error;
use crate::pipeline::{self, Shared};

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest HTTP/1 request head (request line + headers) accepted; larger
/// ones get 431. hyper's default (~400 KiB) let a client make the proxy
/// buffer and forward upstream headers of hundreds of KiB; registry
/// clients' heads, tokens included, stay far below this. (HTTP/2 is
/// bounded by hyper's 16 KiB header-list default.)
const MAX_REQUEST_HEAD: usize = 64 * 1024;

fn conn_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().max_buf_size(MAX_REQUEST_HEAD);
    builder
}

/// Binds `addr`, naming it in the error.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })
}

/// Serves proxy requests on `listener` until `stop` flips, then drains
/// in-flight connections for up to `grace`.
pub async fn serve_proxy(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let (stream, peer) = tokio::select! {
            res = listener.accept() => match res {
                Ok(conn) => conn,
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        match &acceptor {
            None => {
                let conn = conn_builder()
                    .serve_connection(TokioIo::new(stream), service(shared, None))
                    .into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(err) = conn.await {
                        tracing::debug!(%peer, error = %err, "connection ended with an error");
                    }
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(err)) => {
                            tracing::info!(%peer, error = %err, "TLS handshake refused");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let sni: Option<Arc<str>> = tls.get_ref().1.server_name().map(Arc::from);
                    let conn = conn_builder()
                        .serve_connection(TokioIo::new(tls), service(shared, sni))
                        .into_owned();
                    if let Err(err) = watcher.watch(conn).await {
                        tracing::debug!(%peer, error = %err, "connection ended with an error");
                    }
                });
            }
        }
    }
    drain(graceful, grace).await;
}

fn service(
    shared: Arc<Shared>,
    sni: Option<Arc<str>>,
) -> impl hyper::service::Service<
    http::Request<Incoming>,
    Response = http::Response<crate::observe::access_log::Logged>,
    Error = Infallible,
    Future = impl Future<
        Output = Result<http::Response<crate::observe::access_log::Logged>, Infallible>,
    > + Send,
> + Clone {
    hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        let sni = sni.clone();
        async move { Ok::<_, Infallible>(pipeline::handle(shared, req, sni).await) }
    })
}

/// Waits for watched connections to finish, at most `grace`.
pub async fn drain(graceful: GracefulShutdown, grace: Duration) {
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections drained"),
        _ = tokio::time::sleep(grace) => tracing::warn!(grace_secs = grace.as_secs(), "grace period over; closing remaining connections"),
    }
}

//! The peer listener: blob requests from the other replicas, over mutual
//! TLS. A request here is never sent on to another peer (the owner
//! fetches from the upstream itself), and only blob GETs are served.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use pullthrough_api::config::Limits;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::pipeline::Shared;
use crate::server::{
    Activity, Watched, accept, conn_builder, drain, handshake, service, supervise,
};
use crate::tls::peer::{PeerTls, is_peer};

/// Connections the peer listener holds at once: a few per replica.
const MAX_PEER_CONNECTIONS: usize = 256;

/// Marks a request that came in on the peer listener.
#[derive(Debug, Clone, Copy)]
pub struct FromPeer;

pub async fn serve_peers(
    listener: TcpListener,
    tls: Arc<PeerTls>,
    shared: Arc<Shared>,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(MAX_PEER_CONNECTIONS));
    while let Some((stream, peer, permit)) = accept(&listener, &permits, &mut stop, "peers").await {
        let _ = stream.set_nodelay(true);
        // Built per connection: a rotated CA is used at once.
        let config = match tls.server() {
            Ok(c) => c,
            Err(err) => {
                tracing::error!(error = %err, "peer TLS unusable; refusing peer connection");
                continue;
            }
        };
        let (shared, limits, watcher) = (shared.clone(), limits.clone(), graceful.watcher());
        tokio::spawn(async move {
            let _permit = permit;
            let activity = Activity::new();
            let stream = Watched {
                inner: stream,
                activity: activity.clone(),
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            let Some(tls) = handshake(&acceptor, stream, &limits, peer).await else {
                return;
            };
            let identified = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .is_some_and(is_peer);
            if !identified {
                tracing::warn!(%peer, "peer connection refused: its certificate is not a pullthrough peer certificate");
                return;
            }
            let conn = conn_builder(&limits)
                .serve_connection(
                    TokioIo::new(tls),
                    service(shared, None, activity.clone(), true, None),
                )
                .into_owned();
            let conn = watcher.watch(conn);
            supervise(conn, &activity, &limits, peer).await;
        });
    }
    // Refused at once while draining: a peer falls back to the upstream.
    drop(listener);
    drain(graceful, grace).await;
}

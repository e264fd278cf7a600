//! The peer listener: blob requests from the other replicas, over mutual
//! TLS. A request here is never sent on to another peer (the owner
//! fetches from the upstream itself). It serves blob GETs and the purges
//! an admin asked another replica for ([`crate::purge`]), nothing else.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use pullthrough_api::config::Limits;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::pipeline::Shared;
use crate::server::{
    Activity, SourceSlots, Watched, accept, conn_builder, drain, handshake, service, supervise,
};
use crate::tls::peer::{PeerTls, is_peer};

/// Connections the peer listener holds at once: a few per replica.
const MAX_PEER_CONNECTIONS: usize = 256;

/// Connections one source address may hold on the peer listener. A
/// replica's client keeps a few; anything that can reach the port could
/// otherwise hold all of them without a certificate (silent until the
/// handshake times out), and replicas whose handshakes then time out
/// suspect each other and fetch every miss from the upstream themselves.
const MAX_PER_SOURCE: usize = 16;

/// Longest TLS handshake of a peer: replicas are in one cluster, and a
/// silent connection should hold its slot no longer than that.
const PEER_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

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
    let sources = Arc::new(SourceSlots::new(MAX_PER_SOURCE));
    let limits = Limits {
        tls_handshake_timeout: limits.tls_handshake_timeout.min(PEER_HANDSHAKE_TIMEOUT),
        ..limits
    };
    while let Some((stream, peer, permit)) = accept(&listener, &permits, &mut stop, "peers").await {
        let Some(slot) = sources.take(peer.ip()) else {
            tracing::debug!(%peer, "peer connection refused: its address holds {MAX_PER_SOURCE} already");
            continue;
        };
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
            let _held = (permit, slot);
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
                    // The relaying replica is the source of what it asks
                    // for (see `crate::source::Source::Addr`).
                    service(shared, None, activity.clone(), peer, true, None),
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

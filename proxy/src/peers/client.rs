//! Requests to peers: one HTTP/2 connection per peer over mutual TLS,
//! shared by every blob fetched from it. One dial per peer at a time:
//! the requests that find no connection wait for that dial (a burst after
//! a restart made one TLS handshake each), and share its failure for a
//! moment rather than each dialling a dead peer in turn.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;

use crate::tls::peer::{PEER_NAME, PeerTls};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a failed dial answers the requests that waited for it, and
/// those arriving meanwhile, without another try.
const DIAL_FAILURE_HOLD: Duration = Duration::from_secs(1);

/// `Full`: blob requests carry no body (an empty `Full` ends the stream
/// with the headers), a purge carries its JSON.
type Sender = SendRequest<Full<Bytes>>;

/// Whether a request takes a dial failure of the last moment for its
/// answer ([`DIAL_FAILURE_HOLD`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dial {
    ShareFailure,
    Fresh,
}

/// A peer's connection, or the last failure to make one.
#[derive(Debug, Default)]
struct Slot {
    conn: Option<Sender>,
    failed: Option<(std::time::Instant, PeerError)>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    #[error("peer {peer}: {message}")]
    Failed { peer: SocketAddr, message: String },
    #[error("peer {peer} did not answer within {secs}s")]
    Timeout { peer: SocketAddr, secs: u64 },
}

#[derive(Debug)]
pub struct PeerClient {
    tls: Arc<PeerTls>,
    /// Held across a dial (async lock), so one dial runs per peer.
    conns: Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<Slot>>>>,
}

impl PeerClient {
    pub fn new(tls: Arc<PeerTls>) -> Self {
        Self {
            tls,
            conns: Mutex::default(),
        }
    }

    /// `GET https://<host><path>` from `peer`: `host` is the registry the
    /// peer routes it to, `headers` the client's (credentials, Range).
    pub async fn get(
        &self,
        peer: SocketAddr,
        host: &str,
        path: &str,
        headers: HeaderMap,
        timeout: Duration,
    ) -> Result<Response<Incoming>, PeerError> {
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(format!("https://{host}{path}"))
            .body(Full::new(Bytes::new()))
            .map_err(|e| PeerError::Failed {
                peer,
                message: format!("building the request: {e}"),
            })?;
        *req.headers_mut() = headers;
        self.send_as(peer, req, timeout, Dial::ShareFailure).await
    }

    /// Sends `req` to `peer`, dialling anew even within
    /// [`DIAL_FAILURE_HOLD`] of a failed dial: for an admin's request (a
    /// purge), rare, and repeated as soon as the peer is back.
    pub async fn send_fresh(
        &self,
        peer: SocketAddr,
        req: Request<Full<Bytes>>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, PeerError> {
        self.send_as(peer, req, timeout, Dial::Fresh).await
    }

    /// `timeout` bounds the dial and the response head (not the body).
    async fn send_as(
        &self,
        peer: SocketAddr,
        req: Request<Full<Bytes>>,
        timeout: Duration,
        dial: Dial,
    ) -> Result<Response<Incoming>, PeerError> {
        let failed = |message: String| PeerError::Failed { peer, message };
        let send = async {
            let mut sender = self.sender(peer, dial).await?;
            sender
                .ready()
                .await
                .map_err(|e| failed(format!("connection: {e}")))?;
            sender
                .send_request(req)
                .await
                .map_err(|e| failed(format!("request: {e}")))
        };
        match tokio::time::timeout(timeout, send).await {
            Ok(r) => r,
            Err(_) => {
                self.forget(peer);
                Err(PeerError::Timeout {
                    peer,
                    secs: timeout.as_secs(),
                })
            }
        }
    }

    /// Drops the peer's connection (a request on it timed out): the next
    /// request dials anew. A dial under way is left to finish.
    fn forget(&self, peer: SocketAddr) {
        let slot = self.slot(peer);
        if let Ok(mut slot) = slot.try_lock() {
            slot.conn = None;
        }
    }

    fn slot(&self, peer: SocketAddr) -> Arc<tokio::sync::Mutex<Slot>> {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(peer)
            .or_default()
            .clone()
    }

    async fn sender(&self, peer: SocketAddr, dial: Dial) -> Result<Sender, PeerError> {
        let slot = self.slot(peer);
        let mut slot = slot.lock().await;
        if let Some(s) = slot.conn.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        if let Some((at, err)) = &slot.failed
            && dial == Dial::ShareFailure
            && at.elapsed() < DIAL_FAILURE_HOLD
        {
            return Err(err.clone());
        }
        match self.dial(peer).await {
            Ok(s) => {
                *slot = Slot {
                    conn: Some(s.clone()),
                    failed: None,
                };
                Ok(s)
            }
            Err(e) => {
                *slot = Slot {
                    conn: None,
                    failed: Some((std::time::Instant::now(), e.clone())),
                };
                Err(e)
            }
        }
    }

    async fn dial(&self, peer: SocketAddr) -> Result<Sender, PeerError> {
        let failed = |message: String| PeerError::Failed { peer, message };
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(peer))
            .await
            .map_err(|_| PeerError::Timeout {
                peer,
                secs: CONNECT_TIMEOUT.as_secs(),
            })?
            .map_err(|e| failed(format!("connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let mut config = (*self
            .tls
            .client()
            .map_err(|e| failed(format!("TLS setup: {e}")))?)
        .clone();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let name = ServerName::try_from(PEER_NAME).map_err(|e| failed(e.to_string()))?;
        let tls = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
        )
        .await
        .map_err(|_| PeerError::Timeout {
            peer,
            secs: CONNECT_TIMEOUT.as_secs(),
        })?
        .map_err(|e| failed(format!("TLS handshake: {e}")))?;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            // Blobs are large: windows well above the 64 KiB default keep
            // one stream near link speed.
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(16 << 20)
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .timer(hyper_util::rt::TokioTimer::new())
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| failed(format!("HTTP/2 handshake: {e}")))?;
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(%peer, error = %err, "peer connection ended");
            }
        });
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use super::*;
    use crate::tls::{AllowedNames, Issuer};

    /// Twenty blob requests to a peer with no connection yet make one
    /// dial, not twenty; and when that dial fails (here: a peer that
    /// accepts and never answers the TLS handshake), the requests waiting
    /// for it fail with it rather than each dialling the dead peer in turn.
    #[tokio::test]
    async fn one_dial_per_peer_and_its_failure_is_shared() {
        let dir = tempfile::tempdir().unwrap();
        let issuer = Issuer::load_or_generate(None, dir.path(), AllowedNames::default()).unwrap();
        let client = Arc::new(PeerClient::new(Arc::new(PeerTls::new(Arc::new(issuer)))));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        {
            let accepted = Arc::clone(&accepted);
            // Ends with the test process; the connections stay open, silent.
            std::thread::spawn(move || {
                let mut held = Vec::new();
                for conn in listener.incoming() {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    held.push(conn);
                }
            });
        }
        let started = Instant::now();
        let asks: Vec<_> = (0..20)
            .map(|_| {
                let client = Arc::clone(&client);
                tokio::spawn(async move {
                    let path = format!("/v2/app/blobs/sha256:{}", "0".repeat(64));
                    client
                        .get(
                            peer,
                            "quay.io",
                            &path,
                            HeaderMap::new(),
                            Duration::from_secs(30),
                        )
                        .await
                })
            })
            .collect();
        for ask in asks {
            assert!(ask.await.unwrap().is_err());
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "dials");
        // One handshake timeout, not twenty in turn.
        assert!(
            started.elapsed() < CONNECT_TIMEOUT * 3,
            "{:?}",
            started.elapsed()
        );
    }
}

//! Requests to peers: one HTTP/2 connection per peer over mutual TLS,
//! shared by every blob fetched from it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;

use crate::tls::peer::{PEER_NAME, PeerTls};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer {peer}: {message}")]
    Failed { peer: SocketAddr, message: String },
    #[error("peer {peer} did not answer within {secs}s")]
    Timeout { peer: SocketAddr, secs: u64 },
}

#[derive(Debug)]
pub struct PeerClient {
    tls: Arc<PeerTls>,
    conns: Mutex<HashMap<SocketAddr, SendRequest<Empty<Bytes>>>>,
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
        let failed = |message: String| PeerError::Failed { peer, message };
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(format!("https://{host}{path}"))
            .body(Empty::<Bytes>::new())
            .map_err(|e| failed(format!("building the request: {e}")))?;
        *req.headers_mut() = headers;
        let send = async {
            let mut sender = self.sender(peer).await?;
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

    fn forget(&self, peer: SocketAddr) {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&peer);
    }

    async fn sender(&self, peer: SocketAddr) -> Result<SendRequest<Empty<Bytes>>, PeerError> {
        let cached = self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&peer)
            .filter(|s| !s.is_closed())
            .cloned();
        if let Some(s) = cached {
            return Ok(s);
        }
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
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer, sender.clone());
        Ok(sender)
    }
}

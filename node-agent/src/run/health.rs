//! The health gate (the proxy's `readyUrl` probed with hysteresis: while
//! it is closed the `/etc/hosts` block is emptied, so pulls fall back to
//! the upstream instead of failing) and the agent's own liveness endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::config::AgentConfig;
use crate::error::{ProbeError, RunError};

/// A loop that has not turned for this long is reported as stalled.
const STALLED_AFTER_SECS: u64 = 30;

/// The health gate with hysteresis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gate {
    open: Option<bool>,
    fails: u32,
    successes: u32,
    fail_threshold: u32,
    success_threshold: u32,
}

impl Gate {
    pub fn new(fail_threshold: u32, success_threshold: u32) -> Self {
        Self {
            open: None,
            fails: 0,
            successes: 0,
            fail_threshold: fail_threshold.max(1),
            success_threshold: success_threshold.max(1),
        }
    }

    /// Feeds one probe result; returns whether the gate is open now. The
    /// first result decides at once.
    pub fn observe(&mut self, ok: bool) -> bool {
        if ok {
            self.successes += 1;
            self.fails = 0;
        } else {
            self.fails += 1;
            self.successes = 0;
        }
        let open = match self.open {
            None => ok,
            Some(true) => self.fails < self.fail_threshold,
            Some(false) => self.successes >= self.success_threshold,
        };
        self.open = Some(open);
        open
    }

    pub fn is_open(&self) -> Option<bool> {
        self.open
    }
}

/// The gate plus its probe schedule.
pub(super) struct HealthCheck {
    gate: Gate,
    next_probe: Instant,
    interval: Duration,
    timeout: Duration,
}

impl HealthCheck {
    pub(super) fn new(gate: Gate, interval: Duration, timeout: Duration) -> Self {
        Self {
            gate,
            next_probe: Instant::now(),
            interval,
            timeout,
        }
    }

    /// Whether the hosts block may hold entries now, probing when due. A
    /// config without `readyUrl` keeps the gate open.
    pub(super) async fn open(&mut self, cfg: Option<&AgentConfig>) -> bool {
        let Some(url) = cfg.and_then(|c| c.proxy.ready_url.as_deref()) else {
            return true;
        };
        if Instant::now() >= self.next_probe {
            self.next_probe = Instant::now() + self.interval;
            let ca = cfg.and_then(|c| c.ca_pem.as_deref());
            let ok = probe(url, ca, self.timeout).await;
            let before = self.gate.is_open();
            let now = self.gate.observe(ok.is_ok());
            if before != Some(now) {
                match &ok {
                    Ok(()) => tracing::info!(url, "health gate open: {url} answers"),
                    Err(e) => tracing::warn!(url, error = %e, "health gate closed: {url}: {e}"),
                }
            }
        }
        self.gate.is_open().unwrap_or(false)
    }
}

/// One `GET` of the proxy's readiness URL; Ok on 2xx. An `https://` URL is
/// verified against `ca_pem` (the CA the proxy's certificates chain to, as
/// nodes are told to trust it).
pub async fn probe(url: &str, ca_pem: Option<&[u8]>, timeout: Duration) -> Result<(), ProbeError> {
    let uri: http::Uri = url.parse().map_err(|source| ProbeError::BadUrl {
        url: url.to_string(),
        source,
    })?;
    let mut roots = rustls::RootCertStore::empty();
    if uri.scheme_str() == Some("https") {
        let pem = ca_pem.ok_or(ProbeError::NoCa)?;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(ProbeError::CaNotPem)?;
            roots.add(cert).map_err(ProbeError::CaUnusable)?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(ProbeError::Tls)?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build::<_, Empty<Bytes>>(connector);
    let req = http::Request::get(uri)
        .header(http::header::USER_AGENT, "pullthrough-agent")
        .body(Empty::new())
        .map_err(|source| ProbeError::Request {
            url: url.to_string(),
            source,
        })?;
    let resp = tokio::time::timeout(timeout, client.request(req))
        .await
        .map_err(|_| ProbeError::Timeout(timeout))?
        .map_err(|source| ProbeError::Get {
            url: url.to_string(),
            source,
        })?;
    let status = resp.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(ProbeError::Status(status.as_u16()))
    }
}

/// When the loop last turned; `/healthz` reads it.
#[derive(Debug, Clone)]
pub(super) struct Heartbeat(Arc<AtomicU64>);

impl Heartbeat {
    pub(super) fn new() -> Self {
        Self(Arc::new(AtomicU64::new(now_secs())))
    }

    pub(super) fn beat(&self) {
        self.0.store(now_secs(), Ordering::Relaxed);
    }

    /// One whose last beat is long gone (tests).
    #[cfg(test)]
    pub(super) fn stalled() -> Self {
        Self(Arc::new(AtomicU64::new(0)))
    }

    pub(super) fn alive(&self) -> bool {
        now_secs().saturating_sub(self.0.load(Ordering::Relaxed)) < STALLED_AFTER_SECS
    }
}

/// Binds `addr` and serves `/healthz` from a task.
pub(super) async fn serve_liveness(addr: SocketAddr, heartbeat: Heartbeat) -> Result<(), RunError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::HealthAddr { addr, source })?;
    tracing::info!(%addr, "health endpoint on http://{addr}/healthz");
    tokio::spawn(serve_health(listener, heartbeat));
    Ok(())
}

/// `/healthz`: 200 while the loop has run within the last 30 s.
async fn serve_health(listener: tokio::net::TcpListener, heartbeat: Heartbeat) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let hb = heartbeat.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let (status, body) = match req.uri().path() {
                    "/healthz" if hb.alive() => (http::StatusCode::OK, "ok\n"),
                    "/healthz" => (http::StatusCode::SERVICE_UNAVAILABLE, "loop stalled\n"),
                    _ => (http::StatusCode::NOT_FOUND, "not found\n"),
                };
                let resp = http::Response::builder()
                    .status(status)
                    .header(http::header::CONTENT_TYPE, "text/plain")
                    .body(Full::new(Bytes::from_static(body.as_bytes())));
                async move { resp }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_hysteresis() {
        let mut g = Gate::new(3, 2);
        assert_eq!(g.is_open(), None);
        assert!(g.observe(true), "first success opens at once");
        assert!(g.observe(false));
        assert!(g.observe(false));
        assert!(!g.observe(false), "third failure closes");
        assert!(!g.observe(true), "one success is not enough");
        assert!(!g.observe(false));
        assert!(!g.observe(true));
        assert!(g.observe(true), "two in a row reopen");
        let mut g = Gate::new(3, 2);
        assert!(!g.observe(false), "first failure closes at once");
    }

    #[tokio::test]
    async fn probe_reports_refusals_and_statuses() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            for status in ["200 OK", "503 Service Unavailable"] {
                let (mut s, _) = l.accept().await.unwrap();
                let mut b = [0u8; 512];
                let _ = s.read(&mut b).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let url = format!("http://{addr}/readyz");
        let t = Duration::from_secs(2);
        probe(&url, None, t).await.unwrap();
        assert!(
            probe(&url, None, t)
                .await
                .unwrap_err()
                .to_string()
                .contains("503")
        );
        let closed = format!("http://127.0.0.1:{}/readyz", addr.port());
        assert!(probe(&closed, None, t).await.is_err());
        let err = probe("https://x/", None, t).await.unwrap_err().to_string();
        assert!(err.contains("needs the proxy's CA"), "{err}");
    }

    /// An https readyUrl against a real proxy's TLS listener: verified
    /// with the proxy's CA, refused with any other.
    #[tokio::test]
    async fn probe_verifies_https_against_the_proxy_ca() {
        use pullthrough_testbed::proxy::{Addrs, Proxy};
        let proxy = tokio::task::spawn_blocking(|| {
            Proxy::start(
                &pullthrough_testbed::proxy::proxy_bin().unwrap(),
                Addrs::localhost().unwrap(),
                "registries: [{host: quay.io}]\n",
            )
            .unwrap()
        })
        .await
        .unwrap();
        let url = format!("https://{}/v2/", proxy.addrs.https);
        let t = Duration::from_secs(5);
        let ca = proxy.ca_pem().unwrap();
        probe(&url, Some(ca.as_bytes()), t).await.unwrap();
        let other = pullthrough_testbed::tls::TestCa::new("someone else").unwrap();
        let err = probe(&url, Some(other.cert_pem().as_bytes()), t)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("GET"), "{err}");
        tokio::task::spawn_blocking(move || drop(proxy))
            .await
            .unwrap();
    }
}

//! The test bed's one HTTP client, built on hyper (no system trust store).
//!
//! - [`Get`]: one request by URL on a connection of its own — blocking
//!   ([`Get::send`]) for readiness checks and assertions, or async
//!   ([`Get::send_async`], and [`Get::fetch`] to stream the body with
//!   timings, or give up part way as a client that hangs up).
//! - [`Conn`]: one kept-alive connection (plain HTTP/1.1, or TLS with
//!   HTTP/2 when ALPN picks it) for many requests, e.g. a load generator's
//!   pool; [`Conn::get`] streams the body the same way.
//! - [`tls_config`] and [`tls_connect`]: a bare TLS handshake, for tests
//!   about the handshake itself (SNI, ALPN).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::error::{Error, Result};

/// What came back.
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// What to do with a streamed response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyMode {
    /// Keep every byte in [`Fetched::body`].
    Keep,
    /// Count the bytes only (a load generator's client).
    Count,
    /// Keep the bytes, but stop reading and hang up once this many arrived
    /// (a client that goes away mid-download).
    GiveUpAfter(usize),
}

/// A response read as it streamed in.
#[derive(Debug)]
pub struct Fetched {
    pub status: StatusCode,
    pub version: http::Version,
    pub headers: HeaderMap,
    /// The body (empty with [`BodyMode::Count`]).
    pub body: Vec<u8>,
    /// Body bytes received.
    pub bytes: u64,
    /// When the request was sent.
    pub started: Instant,
    /// When the first body byte arrived.
    pub first_byte: Option<Instant>,
    /// When the body ended (or failed, or was given up).
    pub ended: Instant,
    /// The body ended with an error (an aborted response), or was given up.
    pub error: Option<String>,
}

impl Fetched {
    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// One request. `url` is `http://` or `https://` with an IP or a name that
/// resolves to loopback; `ca_pem` is required for https.
#[derive(Debug, Clone)]
pub struct Get<'a> {
    pub url: &'a str,
    pub method: Method,
    pub ca_pem: Option<&'a str>,
    /// Connect here instead of resolving the URL's host (SNI stays the host).
    pub connect_to: Option<std::net::SocketAddr>,
    pub headers: Vec<(&'a str, String)>,
    pub timeout: Duration,
}

impl<'a> Get<'a> {
    pub fn new(url: &'a str) -> Self {
        Self {
            url,
            method: Method::GET,
            ca_pem: None,
            connect_to: None,
            headers: Vec::new(),
            timeout: Duration::from_secs(10),
        }
    }

    pub fn ca(mut self, ca_pem: &'a str) -> Self {
        self.ca_pem = Some(ca_pem);
        self
    }

    pub fn method(mut self, m: Method) -> Self {
        self.method = m;
        self
    }

    pub fn header(mut self, name: &'a str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub fn connect_to(mut self, addr: std::net::SocketAddr) -> Self {
        self.connect_to = Some(addr);
        self
    }

    /// Bounds [`Get::send`] and [`Get::send_async`] (default 10 s), and
    /// the connection and response headers of [`Get::fetch`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends the request on a fresh current-thread runtime.
    pub fn send(&self) -> Result<Response> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| self.err(format!("runtime: {e}")))?;
        rt.block_on(self.send_async())
    }

    /// [`Get::send`] on the caller's runtime.
    pub async fn send_async(&self) -> Result<Response> {
        let fetched = tokio::time::timeout(self.timeout, self.fetch(BodyMode::Keep))
            .await
            .map_err(|_| self.err("timed out".into()))??;
        if let Some(e) = fetched.error {
            return Err(self.err(format!("body: {e}")));
        }
        Ok(Response {
            status: fetched.status,
            headers: fetched.headers,
            body: Bytes::from(fetched.body),
        })
    }

    /// Sends the request and streams the response body as `mode` says,
    /// noting when bytes arrived. Connecting and the response headers are
    /// bounded by the timeout, the body is not (bound it yourself); a body
    /// that fails part way is reported in [`Fetched::error`].
    pub async fn fetch(&self, mode: BodyMode) -> Result<Fetched> {
        let uri: http::Uri = self
            .url
            .parse()
            .map_err(|e| self.err(format!("bad url: {e}")))?;
        let host = uri
            .host()
            .ok_or_else(|| self.err("url has no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let https = uri.scheme_str() == Some("https");
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority = uri.authority().map_or(host.clone(), |a| a.to_string());
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let headers: Vec<(&str, &str)> =
            self.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut conn = tokio::time::timeout(self.timeout, async {
            let addrs: Vec<SocketAddr> = match self.connect_to {
                Some(addr) => vec![addr],
                None => tokio::net::lookup_host((host.as_str(), port))
                    .await
                    .map_err(|e| self.err(format!("resolve: {e}")))?
                    .collect(),
            };
            let config = match (https, self.ca_pem) {
                (false, _) => None,
                // No ALPN: HTTP/1.1, as any server speaks it.
                (true, Some(ca)) => Some(tls_config(ca, &[])?),
                (true, None) => return Err(self.err("https needs a CA".into())),
            };
            // Every address the name resolves to, in turn (as connect does).
            let mut last = self.err("resolves to nothing".into());
            for addr in addrs {
                let conn = match &config {
                    Some(config) => Conn::tls(addr, config.clone(), &host).await,
                    None => Conn::plain(addr).await,
                };
                match conn {
                    Ok(conn) => return Ok(conn),
                    Err(e) => last = e,
                }
            }
            Err(last)
        })
        .await
        .map_err(|_| self.err("timed out connecting".into()))??
        .with_authority(authority);
        conn.request_within(
            self.method.clone(),
            path,
            &headers,
            mode,
            Some(self.timeout),
        )
        .await
    }

    fn err(&self, message: String) -> Error {
        Error::Http {
            url: self.url.to_string(),
            message,
        }
    }
}

/// A runtime for a test's async clients (two worker threads, so spawned
/// clients run side by side).
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Other(format!("building a tokio runtime: {e}")))
}

/// A client TLS config trusting only `ca_pem`, offering `alpn` (e.g.
/// `&[b"h2", b"http/1.1"]`; empty: no ALPN).
pub fn tls_config(ca_pem: &str, alpn: &[&[u8]]) -> Result<Arc<rustls::ClientConfig>> {
    let mut config = crate::tls::client_config(ca_pem)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A TLS handshake with `addr` for `server_name` (SNI and the name the
/// certificate must carry; an IP address is verified as such).
pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    server_name: &str,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let err = |message: String| Error::Http {
        url: format!("https://{server_name} at {addr}"),
        message,
    };
    let name = rustls_pki_types::ServerName::try_from(server_name.to_string())
        .map_err(|e| err(format!("server name: {e}")))?;
    let tcp = tcp_connect(addr)
        .await
        .map_err(|e| err(format!("connect: {e}")))?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| err(format!("TLS: {e}")))
}

async fn tcp_connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

/// The task driving a connection; aborted (the connection closed) when
/// the last handle on the connection goes.
struct Driver(tokio::task::JoinHandle<()>);

impl Drop for Driver {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One client connection, kept alive across requests. Dropping it (and
/// every [`Conn::another_stream`] of it) closes the connection.
pub struct Conn {
    sender: Sender,
    scheme: &'static str,
    /// `Host` (HTTP/1.1) or `:authority` (HTTP/2) of every request.
    authority: String,
    task: Arc<Driver>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("scheme", &self.scheme)
            .field("authority", &self.authority)
            .field("version", &self.version())
            .finish()
    }
}

impl Conn {
    /// Plain HTTP/1.1 to `addr` (`Host: addr`).
    pub async fn plain(addr: SocketAddr) -> Result<Self> {
        let err = |message: String| Error::Http {
            url: format!("http://{addr}"),
            message,
        };
        let tcp = tcp_connect(addr)
            .await
            .map_err(|e| err(format!("connect: {e}")))?;
        let (sender, conn) = http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| err(format!("handshake: {e}")))?;
        Ok(Self {
            sender: Sender::H1(sender),
            scheme: "http",
            authority: addr.to_string(),
            task: Arc::new(Driver(tokio::spawn(async move {
                let _ = conn.await;
            }))),
        })
    }

    /// TLS to `addr` for `server_name` (see [`tls_connect`]), then HTTP/2
    /// if the server chose `h2` from the config's ALPN list, else
    /// HTTP/1.1 (`Host: addr`).
    pub async fn tls(
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
        server_name: &str,
    ) -> Result<Self> {
        let err = |message: String| Error::Http {
            url: format!("https://{addr}"),
            message,
        };
        let tls = tls_connect(addr, config, server_name).await?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let io = TokioIo::new(tls);
        let (sender, task) = if h2 {
            let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| err(format!("handshake: {e}")))?;
            (
                Sender::H2(sender),
                tokio::spawn(async move {
                    let _ = conn.await;
                }),
            )
        } else {
            let (sender, conn) = http1::handshake(io)
                .await
                .map_err(|e| err(format!("handshake: {e}")))?;
            (
                Sender::H1(sender),
                tokio::spawn(async move {
                    let _ = conn.await;
                }),
            )
        };
        Ok(Self {
            sender,
            scheme: "https",
            authority: addr.to_string(),
            task: Arc::new(Driver(task)),
        })
    }

    /// On HTTP/2, a handle whose requests are further streams of this
    /// connection, running alongside this handle's (as a Go client pulls
    /// several layers at once); `None` on HTTP/1.1, which takes one
    /// request at a time.
    pub fn another_stream(&self) -> Option<Conn> {
        match &self.sender {
            Sender::H1(_) => None,
            Sender::H2(s) => Some(Conn {
                sender: Sender::H2(s.clone()),
                scheme: self.scheme,
                authority: self.authority.clone(),
                task: self.task.clone(),
            }),
        }
    }

    /// Sends `authority` as `Host` (or `:authority`) instead of the address.
    pub fn with_authority(mut self, authority: impl Into<String>) -> Self {
        self.authority = authority.into();
        self
    }

    /// The protocol the connection speaks.
    pub fn version(&self) -> http::Version {
        match self.sender {
            Sender::H1(_) => http::Version::HTTP_11,
            Sender::H2(_) => http::Version::HTTP_2,
        }
    }

    /// `GET path` with `headers`, the body streamed as `mode` says.
    pub async fn get(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        mode: BodyMode,
    ) -> Result<Fetched> {
        self.request(Method::GET, path, headers, mode).await
    }

    /// Any body-less request on this connection; waits until the
    /// connection can take it (HTTP/1.1: the previous response was read).
    /// After [`BodyMode::GiveUpAfter`] cut a body short, an HTTP/1.1
    /// connection is closed.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        mode: BodyMode,
    ) -> Result<Fetched> {
        self.request_within(method, path, headers, mode, None).await
    }

    async fn request_within(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        mode: BodyMode,
        head_timeout: Option<Duration>,
    ) -> Result<Fetched> {
        // Formatted only when needed: a load generator sends many.
        let url = || format!("{}://{}{path}", self.scheme, self.authority);
        let err = |message: String| Error::Http {
            url: url(),
            message,
        };
        let mut req = Request::builder().method(method);
        // A Host the caller gives replaces the URL's (one Host header, as
        // a browser sends).
        let own_host = headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host"));
        req = match self.sender {
            Sender::H1(_) if own_host => req.uri(path),
            Sender::H1(_) => req
                .uri(path)
                .header(http::header::HOST, self.authority.as_str()),
            Sender::H2(_) => req.uri(url()),
        };
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| err(format!("request: {e}")))?;
        let head = async {
            match &mut self.sender {
                Sender::H1(s) => {
                    s.ready().await?;
                    let started = Instant::now();
                    Ok((started, s.send_request(req).await?))
                }
                Sender::H2(s) => {
                    s.ready().await?;
                    let started = Instant::now();
                    Ok((started, s.send_request(req).await?))
                }
            }
        };
        let sent: std::result::Result<_, hyper::Error> = match head_timeout {
            Some(t) => tokio::time::timeout(t, head)
                .await
                .map_err(|_| err("timed out waiting for the response".into()))?,
            None => head.await,
        };
        let (started, resp) = sent.map_err(|e| err(format!("send: {e}")))?;
        let (parts, mut body) = resp.into_parts();
        let mut fetched = Fetched {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body: Vec::new(),
            bytes: 0,
            started,
            first_byte: None,
            ended: started,
            error: None,
        };
        while let Some(frame) = body.frame().await {
            let data = match frame {
                Err(e) => {
                    fetched.error = Some(e.to_string());
                    break;
                }
                Ok(frame) => match frame.into_data() {
                    Ok(data) => data,
                    Err(_) => continue,
                },
            };
            if fetched.first_byte.is_none() && !data.is_empty() {
                fetched.first_byte = Some(Instant::now());
            }
            fetched.bytes += data.len() as u64;
            if mode != BodyMode::Count {
                fetched.body.extend_from_slice(&data);
            }
            if let BodyMode::GiveUpAfter(n) = mode
                && fetched.body.len() >= n
            {
                fetched.error = Some("gave up".into());
                if let Sender::H1(_) = self.sender {
                    // Nothing else can use a connection with a body half read.
                    self.task.0.abort();
                }
                break;
            }
        }
        fetched.ended = Instant::now();
        Ok(fetched)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::stub::Stub;

    fn rt() -> tokio::runtime::Runtime {
        runtime().unwrap()
    }

    #[test]
    fn one_connection_serves_many_requests_kept_counted_or_given_up() {
        let stub = Stub::canned()
            .respond("/a", StatusCode::OK, "text/plain", "hello world")
            .start()
            .unwrap();
        stub.set_json("/status", &serde_json::json!({"ok": true}));
        rt().block_on(async {
            let mut conn = Conn::plain(stub.addr()).await.unwrap();
            assert_eq!(conn.version(), http::Version::HTTP_11);
            let r = conn.get("/a", &[], BodyMode::Keep).await.unwrap();
            assert_eq!(
                (r.status, &r.body[..]),
                (StatusCode::OK, &b"hello world"[..])
            );
            assert_eq!(r.header("content-type"), Some("text/plain"));
            assert!(r.first_byte.is_some() && r.error.is_none());
            let r = conn.get("/a", &[], BodyMode::Count).await.unwrap();
            assert_eq!((r.bytes, r.body.len()), (11, 0));
            let r = conn
                .get("/status", &[("x-test", "1")], BodyMode::Keep)
                .await
                .unwrap();
            assert_eq!(&r.body[..], br#"{"ok":true}"#);
            let r = conn.get("/nothing", &[], BodyMode::Keep).await.unwrap();
            assert_eq!(r.status, StatusCode::NOT_FOUND);
            let r = conn.get("/a", &[], BodyMode::GiveUpAfter(1)).await.unwrap();
            assert_eq!(r.error.as_deref(), Some("gave up"));
        });
        let seen = stub.requests();
        assert_eq!(seen.len(), 5);
        assert!(seen[2].headers.contains_key("x-test"));
        let url = format!("{}/a", stub.url());
        let r = Get::new(&url).send().unwrap();
        assert_eq!(&r.body[..], b"hello world");
        let r = rt().block_on(Get::new(&url).send_async()).unwrap();
        assert_eq!(r.status, StatusCode::OK);
    }
}

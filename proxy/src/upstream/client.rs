//! The pooled HTTP/1.1 + HTTP/2 client of one registry: connect timeout
//! around TCP + TLS, every connection's addresses checked against the
//! registry's egress rules ([`super::egress`]) before connecting, redirects
//! followed server-side (never from https down to http), errors that name
//! the URL (query redacted) and the cause.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderMap};
use http::{Method, Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder, MaybeHttpsStream};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use pullthrough_api::config::{ProxyConfig, RegistryConfig};
use tokio::net::TcpStream;

use super::egress::{EgressPolicy, HopRefused};
use super::redirect::{
    CREDENTIAL_HEADERS, Origin, is_redirect, redact, redact_str, redirect_method, resolve_location,
    sanitize,
};
use super::resolve::UpstreamResolver;
use super::trust::tls_config;
use super::{MAX_REDIRECTS, UpstreamError, UpstreamResponse};

/// Redirect bodies up to this size are read off so the connection is reused.
pub(super) const DRAIN_LIMIT: u64 = 64 * 1024;

pub(super) type BoxError = Box<dyn StdError + Send + Sync>;

/// A pooled HTTP/1.1 + HTTP/2 client for one registry; cheap to clone.
#[derive(Clone)]
pub struct UpstreamClient {
    client: Client<Connector, crate::http::body::Body>,
    connect_timeout: Duration,
    read_timeout: Duration,
    policy: Arc<EgressPolicy>,
    /// The configured upstream is plain `http://` (a lab, a test): then
    /// http redirects and realms are no downgrade.
    plain_http: bool,
}

impl UpstreamClient {
    pub(super) fn build(
        config: &ProxyConfig,
        registry: &RegistryConfig,
        resolver: UpstreamResolver,
    ) -> Result<Self, UpstreamError> {
        let url = registry.upstream_url();
        let base: Uri = url.parse().map_err(|e| UpstreamError::BadUpstreamUrl {
            registry: registry.host.clone(),
            url: url.clone(),
            reason: format!("{e}"),
        })?;
        let origin = Origin::of(&base).map_err(|reason| UpstreamError::BadUpstreamUrl {
            registry: registry.host.clone(),
            url: url.clone(),
            reason,
        })?;
        let tls = tls_config(registry)?;
        let timeouts = &config.upstream_timeouts;
        let policy = Arc::new(EgressPolicy::new(config, registry, &origin.host));
        let connector = Connector {
            tls: Arc::new(tls),
            resolver,
            policy: Arc::clone(&policy),
            timeout: timeouts.connect,
        };
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Ok(Self {
            client,
            connect_timeout: timeouts.connect,
            read_timeout: timeouts.read,
            policy,
            plain_http: origin.scheme == "http",
        })
    }

    /// The configured upstream is plain `http://`: only then may a realm
    /// or a redirect target be `http://` too.
    pub fn is_plain_http(&self) -> bool {
        self.plain_http
    }

    /// Whether `host` is the upstream's own host or one of the registry's
    /// `authHosts`: the only hosts the registry's credentials go to.
    pub fn is_credential_host(&self, host: &str) -> bool {
        self.policy.is_trusted(host)
    }

    /// Sends `method url` with `headers`; follows 301/302/303/307/308
    /// server-side up to 5 hops, resolving relative Locations against the
    /// current URL; sends Authorization (and Cookie, Proxy-Authorization)
    /// only while the target scheme/host/port equals the original URL's —
    /// never across hosts, and once dropped never re-added. 303 turns into
    /// GET (except HEAD, which stays HEAD so a HEAD never spends a GET);
    /// 301/302 turn POST into GET; 307/308 keep the method. The final
    /// response's body is streamed (not buffered). Waiting for response
    /// headers is bounded by `upstream_timeouts.read` (plus the connect
    /// timeout when a new connection is needed). `Host` and hop-by-hop
    /// headers in `headers` are dropped: the client sets its own.
    ///
    /// A redirect from https to http is refused ([`UpstreamError::Downgrade`])
    /// unless the configured upstream is itself http; where a hop may
    /// connect is the registry's egress rules' call (refused hops are
    /// [`UpstreamError::Refused`], before any connection).
    pub async fn send(
        &self,
        method: Method,
        url: Uri,
        headers: HeaderMap,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let original = url.clone();
        let origin = Origin::of(&url).map_err(|reason| UpstreamError::BadUrl {
            url: redact(&url),
            reason,
        })?;
        let mut headers = sanitize(headers);
        let mut credentials = true;
        let mut method = method;
        let mut url = url;
        let mut hops: u8 = 0;
        loop {
            let here = Origin::of(&url).map_err(|reason| UpstreamError::BadUrl {
                url: redact(&url),
                reason,
            })?;
            if credentials && here != origin {
                for name in CREDENTIAL_HEADERS {
                    headers.remove(name);
                }
                credentials = false;
            }
            let response = self.exchange(&method, &url, &headers).await?;
            let status = response.status();
            if !is_redirect(status) {
                return Ok(UpstreamResponse {
                    response,
                    final_url: url,
                    hops,
                });
            }
            let Some(location) = response.headers().get(header::LOCATION) else {
                // A 3xx without a Location is the upstream's answer as is.
                return Ok(UpstreamResponse {
                    response,
                    final_url: url,
                    hops,
                });
            };
            let bad = || UpstreamError::BadRedirect {
                location: redact_str(&String::from_utf8_lossy(location.as_bytes())),
                from: redact(&url),
            };
            let next = location
                .to_str()
                .ok()
                .and_then(|l| resolve_location(&url, l))
                .ok_or_else(bad)?;
            if hops >= MAX_REDIRECTS {
                return Err(UpstreamError::TooManyRedirects {
                    url: redact(&original),
                    last: redact(&next),
                });
            }
            // Bytes (or a token) fetched over http could be read or changed
            // on the way, after the upstream itself insisted on https.
            if url.scheme_str() == Some("https")
                && next.scheme_str() == Some("http")
                && !self.plain_http
            {
                return Err(UpstreamError::Downgrade {
                    from: redact(&url),
                    to: redact(&next),
                });
            }
            // Presigned URLs carry their signature in the query: never logged.
            tracing::debug!(%status, from = %redact(&url), to = %redact(&next), "following upstream redirect");
            self.discard(response).await;
            let next_method = redirect_method(status, &method);
            if next_method != method {
                headers.remove(header::CONTENT_TYPE);
                headers.remove(header::CONTENT_LENGTH);
                method = next_method;
            }
            hops += 1;
            url = next;
        }
    }

    /// Sends a request with a streamed body (push pass-through). Redirects
    /// are not followed — a streamed body cannot be sent twice — and the
    /// upstream's answer, 3xx included, is returned as is.
    ///
    /// The upstream answers an upload only once it has all of it, so the
    /// timeout (connect + read) counts from the body's last data, not from
    /// the start: a layer that took longer than that to upload failed with
    /// a 502 on every retry.
    pub async fn send_body(
        &self,
        method: Method,
        url: Uri,
        headers: HeaderMap,
        body: crate::http::body::Body,
    ) -> Result<Response<Incoming>, UpstreamError> {
        Origin::of(&url).map_err(|reason| UpstreamError::BadUrl {
            url: redact(&url),
            reason,
        })?;
        let started = tokio::time::Instant::now();
        let sent_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let body = {
            let sent_ms = Arc::clone(&sent_ms);
            crate::http::body::on_data(body, move || {
                let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                sent_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
            })
        };
        let mut request = Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = url.clone();
        *request.headers_mut() = sanitize(headers);
        let wait = self.connect_timeout + self.read_timeout;
        let deadline = || {
            let ms = sent_ms.load(std::sync::atomic::Ordering::Relaxed);
            started + Duration::from_millis(ms) + wait
        };
        let mut answer = std::pin::pin!(self.client.request(request));
        loop {
            tokio::select! {
                res = &mut answer => return res.map_err(|err| classify(&url, &err)),
                _ = tokio::time::sleep_until(deadline()) => {
                    // Data may have gone out while asleep.
                    if tokio::time::Instant::now() >= deadline() {
                        return Err(UpstreamError::Timeout {
                            url: redact(&url),
                            after: wait,
                        });
                    }
                }
            }
        }
    }

    pub(super) async fn exchange(
        &self,
        method: &Method,
        url: &Uri,
        headers: &HeaderMap,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut request = Request::new(crate::http::body::empty());
        *request.method_mut() = method.clone();
        *request.uri_mut() = url.clone();
        *request.headers_mut() = headers.clone();
        let wait = self.connect_timeout + self.read_timeout;
        match tokio::time::timeout(wait, self.client.request(request)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(err)) => Err(classify(url, &err)),
            Err(_) => Err(UpstreamError::Timeout {
                url: redact(url),
                after: wait,
            }),
        }
    }

    /// Reads a small redirect (or 401) body off so the connection can be
    /// reused; large or unknown-length bodies are dropped with their
    /// connection.
    pub async fn discard(&self, response: Response<Incoming>) {
        let small = crate::http::headers::content_length(response.headers())
            .is_some_and(|n| n <= DRAIN_LIMIT);
        if small {
            let body = response.into_body().collect();
            let _ = tokio::time::timeout(Duration::from_secs(2).min(self.read_timeout), body).await;
        }
    }
}

/// Turns a client error into one naming the URL (query redacted), with
/// the cause chain.
pub(super) fn classify(url: &Uri, err: &hyper_util::client::legacy::Error) -> UpstreamError {
    let url = redact(url);
    let mut parts: Vec<String> = Vec::new();
    let mut found = Found::default();
    let mut current: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = current {
        inspect(e, &mut found);
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        current = e.source();
    }
    let detail = parts.join(": ");
    if let Some(refusal) = found.refused {
        UpstreamError::Refused { url, refusal }
    } else if let Some(after) = found.timed_out {
        UpstreamError::ConnectTimeout { url, after }
    } else if found.tls {
        UpstreamError::Tls { url, detail }
    } else if err.is_connect() {
        UpstreamError::Connect { url, detail }
    } else {
        UpstreamError::Protocol { url, detail }
    }
}

/// What [`inspect`] found in an error chain.
#[derive(Default)]
pub(super) struct Found {
    tls: bool,
    timed_out: Option<Duration>,
    refused: Option<HopRefused>,
}

/// Notes a rustls error, our connect timeout or an egress refusal in `e`,
/// looking through `io::Error` wrappers (hyper-rustls nests the handshake
/// error twice).
pub(super) fn inspect(e: &(dyn StdError + 'static), found: &mut Found) {
    if let Some(t) = e.downcast_ref::<ConnectTimedOut>() {
        found.timed_out = Some(t.0);
    }
    if let Some(r) = e.downcast_ref::<HopRefused>() {
        found.refused = Some(r.clone());
    }
    found.tls |= e.downcast_ref::<rustls::Error>().is_some();
    if let Some(inner) = e
        .downcast_ref::<std::io::Error>()
        .and_then(std::io::Error::get_ref)
    {
        inspect(inner, found);
    }
}

#[derive(Debug, thiserror::Error)]
#[error("connect (TCP + TLS) timed out after {0:?}")]
pub(super) struct ConnectTimedOut(Duration);

/// The https connector: resolves the host, checks every address against
/// the registry's egress rules, and connects (TCP + TLS, bounded by the
/// connect timeout) only to the addresses that passed — the very ones
/// checked, so a second DNS answer cannot slip another address in.
#[derive(Clone)]
pub(super) struct Connector {
    /// Without ALPN: the https wrapper adds h2 and http/1.1 itself.
    tls: Arc<rustls::ClientConfig>,
    resolver: super::resolve::UpstreamResolver,
    policy: Arc<EgressPolicy>,
    timeout: Duration,
}

pub(super) type ConnectFuture =
    Pin<Box<dyn Future<Output = Result<MaybeHttpsStream<TokioIo<TcpStream>>, BoxError>> + Send>>;

impl Connector {
    /// The addresses of `uri`'s host that the egress rules allow (with the
    /// URL's port), or the first refusal when none is.
    async fn allowed(&self, uri: &Uri) -> Result<Vec<SocketAddr>, BoxError> {
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or("the URL has no host")?;
        let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
            Some("https") => 443,
            _ => 80,
        });
        let ips = self.resolver.lookup(host).await?;
        let mut allowed = Vec::with_capacity(ips.len());
        let mut refused = None;
        for ip in ips {
            let addr = SocketAddr::new(ip, port);
            match self.policy.check(host, addr) {
                Ok(()) => allowed.push(addr),
                Err(refusal) => {
                    tracing::warn!(%refusal, "upstream connection refused by the egress rules");
                    refused.get_or_insert(refusal);
                }
            }
        }
        match refused {
            Some(refusal) if allowed.is_empty() => Err(Box::new(refusal)),
            _ => Ok(allowed),
        }
    }

    /// An https-or-http connector that connects only to `addrs`.
    fn to(&self, addrs: Vec<SocketAddr>) -> HttpsConnector<HttpConnector<Checked>> {
        let mut http = HttpConnector::new_with_resolver(Checked(addrs));
        // The https wrapper passes https:// URIs through to this connector.
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(self.timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        HttpsConnectorBuilder::new()
            .with_tls_config((*self.tls).clone())
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http)
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = MaybeHttpsStream<TokioIo<TcpStream>>;
    type Error = BoxError;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let connecting = async {
                let addrs = this.allowed(&uri).await?;
                this.to(addrs).call(uri).await
            };
            match tokio::time::timeout(timeout, connecting).await {
                Ok(result) => result,
                Err(_) => Err(Box::new(ConnectTimedOut(timeout)) as BoxError),
            }
        })
    }
}

/// The addresses [`Connector::allowed`] checked, handed to `HttpConnector`
/// as its "resolver" (which fills in the port; IP literals skip it and
/// connect to the literal, which was checked the same way).
#[derive(Clone)]
struct Checked(Vec<SocketAddr>);

impl tower_service::Service<Name> for Checked {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _name: Name) -> Self::Future {
        std::future::ready(Ok(self.0.clone().into_iter()))
    }
}

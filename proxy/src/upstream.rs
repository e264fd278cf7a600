//! Upstream HTTP client: TLS settings per registry, DNS that ignores the hosts file, redirects.
//!
//! [`Upstreams`] holds one pooled client per configured registry. Each client
//! speaks HTTP/1.1 and HTTP/2 (ALPN) over rustls (ring), trusting the webpki
//! roots plus the registry's `caBundle`, or nothing at all when the registry
//! is `insecureSkipVerify`. Host names are resolved by [`UpstreamResolver`]:
//! the config's `resolve` pins first, then DNS from `/etc/resolv.conf` —
//! never `/etc/hosts`, which on a node may send registry names back to this
//! proxy. [`UpstreamClient::send`] follows redirects server-side (blob
//! storage) without carrying credentials across hosts.

use std::collections::{BTreeMap, HashMap};
use std::error::Error as StdError;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::ResolveHosts;
use hickory_resolver::name_server::TokioConnectionProvider;
use http::header::{self, HeaderMap, HeaderName};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder, MaybeHttpsStream};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use pullthrough_api::config::{ProxyConfig, RegistryConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;

/// Redirect hops followed per request before giving up.
pub const MAX_REDIRECTS: u8 = 5;

/// Redirect bodies up to this size are read off so the connection is reused.
const DRAIN_LIMIT: u64 = 64 * 1024;

type BoxError = Box<dyn StdError + Send + Sync>;

/// Why the upstream side could not be built or could not answer.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("reading caBundle {path} of registry {registry}: {source}")]
    CaBundleRead {
        registry: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("caBundle {path} of registry {registry} is not usable: {reason}")]
    CaBundleInvalid {
        registry: String,
        path: PathBuf,
        reason: String,
    },
    #[error("TLS settings of registry {registry}: {source}")]
    TlsConfig {
        registry: String,
        source: rustls::Error,
    },
    #[error("upstream URL `{url}` of registry {registry} is unusable: {reason}")]
    BadUpstreamUrl {
        registry: String,
        url: String,
        reason: String,
    },
    #[error("cannot request `{url}`: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("connecting to {url} failed: {detail}")]
    Connect { url: String, detail: String },
    #[error("connecting to {url} timed out after {after:?} (TCP + TLS)")]
    ConnectTimeout { url: String, after: Duration },
    #[error("TLS with {url} failed: {detail}")]
    Tls { url: String, detail: String },
    #[error("no response headers from {url} within {after:?}")]
    Timeout { url: String, after: Duration },
    #[error("HTTP exchange with {url} failed: {detail}")]
    Protocol { url: String, detail: String },
    #[error("{url}: more than {MAX_REDIRECTS} redirects (next Location {last})")]
    TooManyRedirects { url: String, last: String },
    #[error("redirect from {from} has an unusable Location `{location}`")]
    BadRedirect { location: String, from: String },
    /// The token dance with the registry's `credentialsFile` failed for a
    /// reason other than the realm refusing the credentials (that is the
    /// upstream's 401, relayed as such).
    #[error(
        "getting a token for registry {registry} from {realm} with its credentialsFile failed: {reason}"
    )]
    Token {
        registry: String,
        realm: String,
        reason: String,
    },
}

/// One client per configured registry, keyed by the registry's `host`.
pub struct Upstreams {
    clients: HashMap<String, UpstreamClient>,
}

impl Upstreams {
    /// One pooled client per registry, built from its TLS settings: webpki
    /// roots + the registry's `caBundle` PEM file (error names the file if
    /// unreadable/invalid), or no verification when `insecureSkipVerify`.
    /// HTTP/1.1 and HTTP/2 (ALPN) to upstreams. Connect timeout from
    /// `config.upstream_timeouts.connect`.
    pub fn new(config: &ProxyConfig) -> Result<Self, UpstreamError> {
        let resolver = UpstreamResolver::system(&config.resolve);
        let mut clients = HashMap::new();
        for registry in &config.registries {
            let client = UpstreamClient::build(config, registry, resolver.clone())?;
            clients.insert(registry.host.clone(), client);
        }
        Ok(Self { clients })
    }

    /// The client for a registry by its `host` (not alias); None if unknown.
    pub fn client(&self, registry_host: &str) -> Option<&UpstreamClient> {
        self.clients.get(registry_host)
    }
}

/// What [`UpstreamClient::send`] got: the final (non-redirect) response with
/// its body still streaming, the URL that answered, and redirects followed.
#[derive(Debug)]
pub struct UpstreamResponse {
    pub response: Response<Incoming>,
    pub final_url: Uri,
    pub hops: u8,
}

/// A pooled HTTP/1.1 + HTTP/2 client for one registry; cheap to clone.
#[derive(Clone)]
pub struct UpstreamClient {
    client: Client<Connector, crate::http::body::Body>,
    connect_timeout: Duration,
    read_timeout: Duration,
}

impl UpstreamClient {
    fn build(
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
        Origin::of(&base).map_err(|reason| UpstreamError::BadUpstreamUrl {
            registry: registry.host.clone(),
            url: url.clone(),
            reason,
        })?;
        let tls = tls_config(registry)?;
        let timeouts = &config.upstream_timeouts;

        let mut http = HttpConnector::new_with_resolver(resolver);
        // The https wrapper passes https:// URIs through to this connector.
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(timeouts.connect));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let https = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let connector = Connector {
            inner: https,
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
        })
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
    pub async fn send(
        &self,
        method: Method,
        url: Uri,
        headers: HeaderMap,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let original = url.clone();
        let origin = Origin::of(&url).map_err(|reason| UpstreamError::BadUrl {
            url: url.to_string(),
            reason,
        })?;
        let mut headers = sanitize(headers);
        let mut credentials = true;
        let mut method = method;
        let mut url = url;
        let mut hops: u8 = 0;
        loop {
            let here = Origin::of(&url).map_err(|reason| UpstreamError::BadUrl {
                url: url.to_string(),
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
                location: String::from_utf8_lossy(location.as_bytes()).into_owned(),
                from: url.to_string(),
            };
            let next = location
                .to_str()
                .ok()
                .and_then(|l| resolve_location(&url, l))
                .ok_or_else(bad)?;
            if hops >= MAX_REDIRECTS {
                return Err(UpstreamError::TooManyRedirects {
                    url: original.to_string(),
                    last: next.to_string(),
                });
            }
            tracing::debug!(%status, from = %url, to = %next, "following upstream redirect");
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
    pub async fn send_body(
        &self,
        method: Method,
        url: Uri,
        headers: HeaderMap,
        body: crate::http::body::Body,
    ) -> Result<Response<Incoming>, UpstreamError> {
        Origin::of(&url).map_err(|reason| UpstreamError::BadUrl {
            url: url.to_string(),
            reason,
        })?;
        let mut request = Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = url.clone();
        *request.headers_mut() = sanitize(headers);
        let wait = self.connect_timeout + self.read_timeout;
        match tokio::time::timeout(wait, self.client.request(request)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(err)) => Err(classify(&url, &err)),
            Err(_) => Err(UpstreamError::Timeout {
                url: url.to_string(),
                after: wait,
            }),
        }
    }

    async fn exchange(
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
                url: url.to_string(),
                after: wait,
            }),
        }
    }

    /// Reads a small redirect (or 401) body off so the connection can be
    /// reused; large or unknown-length bodies are dropped with their
    /// connection.
    pub async fn discard(&self, response: Response<Incoming>) {
        let small = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n <= DRAIN_LIMIT);
        if small {
            let body = response.into_body().collect();
            let _ = tokio::time::timeout(Duration::from_secs(2).min(self.read_timeout), body).await;
        }
    }
}

const CREDENTIAL_HEADERS: [HeaderName; 3] = [
    header::AUTHORIZATION,
    header::COOKIE,
    header::PROXY_AUTHORIZATION,
];

/// Drops `Host` (derived from each hop's URL) and hop-by-hop headers.
fn sanitize(mut headers: HeaderMap) -> HeaderMap {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        header::HOST,
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TE,
        header::TRAILER,
        header::PROXY_AUTHENTICATE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    headers
}

fn is_redirect(status: StatusCode) -> bool {
    matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308)
}

fn redirect_method(status: StatusCode, method: &Method) -> Method {
    match status.as_u16() {
        303 if method != Method::HEAD => Method::GET,
        301 | 302 if method == Method::POST => Method::GET,
        _ => method.clone(),
    }
}

/// Scheme, host and effective port of an absolute http(s) URL.
#[derive(Debug, PartialEq, Eq)]
struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

impl Origin {
    fn of(url: &Uri) -> Result<Self, String> {
        let scheme = url
            .scheme_str()
            .map(str::to_ascii_lowercase)
            .ok_or("the URL has no scheme")?;
        let default_port = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            other => return Err(format!("scheme `{other}` is not http or https")),
        };
        let host = url
            .host()
            .filter(|h| !h.is_empty())
            .ok_or("the URL has no host")?
            .trim_end_matches('.')
            .to_ascii_lowercase();
        Ok(Self {
            scheme,
            host,
            port: url.port_u16().unwrap_or(default_port),
        })
    }
}

/// Resolves a Location header value against the URL that sent it
/// (RFC 3986 §5.2, by the `url` crate). None when the result is not an
/// http(s) URL.
fn resolve_location(base: &Uri, location: &str) -> Option<Uri> {
    let location = location.trim();
    if location.is_empty() {
        return None;
    }
    let base = url::Url::parse(&base.to_string()).ok()?;
    let mut target = base.join(location).ok()?;
    target.set_fragment(None);
    let uri: Uri = target.as_str().parse().ok()?;
    Origin::of(&uri).ok()?;
    Some(uri)
}

/// Turns a client error into one naming the URL, with the cause chain.
fn classify(url: &Uri, err: &hyper_util::client::legacy::Error) -> UpstreamError {
    let url = url.to_string();
    let mut parts: Vec<String> = Vec::new();
    let mut tls = false;
    let mut timed_out = None;
    let mut current: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = current {
        inspect(e, &mut tls, &mut timed_out);
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        current = e.source();
    }
    let detail = parts.join(": ");
    if let Some(after) = timed_out {
        UpstreamError::ConnectTimeout { url, after }
    } else if tls {
        UpstreamError::Tls { url, detail }
    } else if err.is_connect() {
        UpstreamError::Connect { url, detail }
    } else {
        UpstreamError::Protocol { url, detail }
    }
}

/// Notes a rustls error or our connect timeout in `e`, looking through
/// `io::Error` wrappers (hyper-rustls nests the handshake error twice).
fn inspect(e: &(dyn StdError + 'static), tls: &mut bool, timed_out: &mut Option<Duration>) {
    if let Some(t) = e.downcast_ref::<ConnectTimedOut>() {
        *timed_out = Some(t.0);
    }
    *tls |= e.downcast_ref::<rustls::Error>().is_some();
    if let Some(inner) = e
        .downcast_ref::<std::io::Error>()
        .and_then(std::io::Error::get_ref)
    {
        inspect(inner, tls, timed_out);
    }
}

// ---------------------------------------------------------------------------
// TLS

fn tls_config(registry: &RegistryConfig) -> Result<ClientConfig, UpstreamError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|source| UpstreamError::TlsConfig {
            registry: registry.host.clone(),
            source,
        })?;
    if registry.insecure_skip_verify {
        // caBundle is moot without verification and is not read.
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoCertificateVerification { provider }))
            .with_no_client_auth());
    }
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = &registry.ca_bundle {
        for cert in read_ca_bundle(&registry.host, path)? {
            roots
                .add(cert)
                .map_err(|e| UpstreamError::CaBundleInvalid {
                    registry: registry.host.clone(),
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
        }
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

fn read_ca_bundle(
    registry: &str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, UpstreamError> {
    let pem = std::fs::read(path).map_err(|source| UpstreamError::CaBundleRead {
        registry: registry.to_string(),
        path: path.to_path_buf(),
        source,
    })?;
    let invalid = |reason: String| UpstreamError::CaBundleInvalid {
        registry: registry.to_string(),
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid("no CERTIFICATE block in the file".into()));
    }
    Ok(certs)
}

/// DANGEROUS: accepts any server certificate for any name, so anyone on the
/// path can impersonate the upstream. Used only for registries configured
/// with `insecureSkipVerify`. Handshake signatures are still checked with
/// the provider's algorithms, so the peer must hold the key of the
/// certificate it presents.
#[derive(Debug)]
struct NoCertificateVerification {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for NoCertificateVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

// ---------------------------------------------------------------------------
// Connector: the https connector with TCP + TLS bounded by the connect timeout.

#[derive(Debug, thiserror::Error)]
#[error("connect (TCP + TLS) timed out after {0:?}")]
struct ConnectTimedOut(Duration);

#[derive(Clone)]
struct Connector {
    inner: HttpsConnector<HttpConnector<UpstreamResolver>>,
    timeout: Duration,
}

type ConnectFuture =
    Pin<Box<dyn Future<Output = Result<MaybeHttpsStream<TokioIo<TcpStream>>, BoxError>> + Send>>;

impl tower_service::Service<Uri> for Connector {
    type Response = MaybeHttpsStream<TokioIo<TcpStream>>;
    type Error = BoxError;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(result) => result,
                Err(_) => Err(Box::new(ConnectTimedOut(timeout)) as BoxError),
            }
        })
    }
}

// ---------------------------------------------------------------------------
// DNS

/// A host name the resolver could not turn into addresses.
#[derive(Debug, thiserror::Error)]
#[error("resolving `{name}`: {reason}")]
pub struct ResolveError {
    pub name: String,
    pub reason: String,
}

/// Resolves upstream host names: `resolve` pins as given, IP literals and
/// `localhost` directly, everything else by DNS per `/etc/resolv.conf`
/// (search domains and ndots included) with the hosts file switched off.
/// A `tower::Service<Name>`, as hyper-util's `HttpConnector` wants.
#[derive(Clone)]
pub struct UpstreamResolver {
    inner: Arc<ResolverInner>,
}

struct ResolverInner {
    pins: HashMap<String, IpAddr>,
    /// The DNS resolver, or why `/etc/resolv.conf` could not give one.
    dns: Result<TokioResolver, String>,
}

impl UpstreamResolver {
    /// Pins from the config, DNS from `/etc/resolv.conf`. An unusable
    /// resolv.conf is logged, and then only fails names that are not pinned.
    pub fn system(pins: &BTreeMap<String, IpAddr>) -> Self {
        let dns = system_dns();
        if let Err(reason) = &dns {
            tracing::warn!(%reason, "upstream DNS unavailable; only pinned names (`resolve`) and IPs will work");
        }
        Self::with_dns(pins, dns)
    }

    fn with_dns(pins: &BTreeMap<String, IpAddr>, dns: Result<TokioResolver, String>) -> Self {
        let pins = pins
            .iter()
            .map(|(name, ip)| (normalize(name), *ip))
            .collect();
        Self {
            inner: Arc::new(ResolverInner { pins, dns }),
        }
    }

    /// The addresses for `host` (no port).
    pub async fn lookup(&self, host: &str) -> Result<Vec<IpAddr>, ResolveError> {
        let name = normalize(host);
        if let Some(ip) = self.inner.pins.get(&name) {
            return Ok(vec![*ip]);
        }
        let bare = name.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        // RFC 6761: localhost is loopback, without asking anyone.
        if name == "localhost" || name.ends_with(".localhost") {
            return Ok(vec![
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ]);
        }
        let fail = |reason: String| ResolveError {
            name: host.to_string(),
            reason,
        };
        let dns = self
            .inner
            .dns
            .as_ref()
            .map_err(|e| fail(format!("not in `resolve` and DNS is unavailable ({e})")))?;
        let found = dns
            .lookup_ip(name.as_str())
            .await
            .map_err(|e| fail(e.to_string()))?;
        let ips: Vec<IpAddr> = found.iter().collect();
        if ips.is_empty() {
            return Err(fail("DNS returned no addresses".into()));
        }
        Ok(ips)
    }
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn system_dns() -> Result<TokioResolver, String> {
    let (config, mut options) = hickory_resolver::system_conf::read_system_conf()
        .map_err(|e| format!("reading /etc/resolv.conf: {e}"))?;
    if config.name_servers().is_empty() {
        return Err("/etc/resolv.conf names no nameserver".into());
    }
    // On a node the hosts file may point registry names at this proxy.
    options.use_hosts_file = ResolveHosts::Never;
    Ok(
        TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
            .with_options(options)
            .build(),
    )
}

type ResolveFuture =
    Pin<Box<dyn Future<Output = Result<std::vec::IntoIter<SocketAddr>, ResolveError>> + Send>>;

impl tower_service::Service<Name> for UpstreamResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = ResolveError;
    type Future = ResolveFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let resolver = self.clone();
        Box::pin(async move {
            let ips = resolver.lookup(name.as_str()).await?;
            // Port 0: HttpConnector fills in the URL's port.
            Ok(ips
                .into_iter()
                .map(|ip| SocketAddr::new(ip, 0))
                .collect::<Vec<_>>()
                .into_iter())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use http_body_util::Full;
    use pullthrough_testbed::fixtures::{Image, LayoutBuilder, sha256_digest};
    use pullthrough_testbed::registry::Registry;

    use super::*;
    use crate::test_server::TestServer;
    use bytes::Bytes;

    // --- helpers -----------------------------------------------------------

    fn config(yaml: &str) -> ProxyConfig {
        ProxyConfig::from_yaml(yaml).unwrap()
    }

    /// A config with one registry `host` at `upstream`, plus `extra` keys
    /// for the registry entry (indented YAML lines).
    fn one_registry(host: &str, upstream: &str, extra: &str) -> ProxyConfig {
        config(&format!(
            "upstreamTimeouts: {{connect: 3s, read: 10s}}\n\
             registries:\n  - host: \"{host}\"\n    upstream: \"{upstream}\"\n{extra}"
        ))
    }

    /// Runs blocking test-bed code (it starts its own runtime for HTTP
    /// probes) off the test's runtime.
    fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(f).join().unwrap()
    }

    fn start_registry(tls: bool) -> Registry {
        blocking(move || {
            if tls {
                Registry::tls().unwrap()
            } else {
                Registry::plain().unwrap()
            }
        })
    }

    fn image_in(registry: &Registry, dir: &Path) -> Image {
        let mut layout = LayoutBuilder::new(dir).unwrap();
        let image = layout.random("v1", &[2048], 7).unwrap();
        image.push(registry, "team/app", "v1").unwrap();
        image
    }

    async fn get_manifest(
        client: &UpstreamClient,
        base: &str,
        image: &Image,
    ) -> Result<(StatusCode, http::Version, Bytes), UpstreamError> {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, image.media_type.parse().unwrap());
        let url: Uri = format!("{base}/v2/team/app/manifests/v1").parse().unwrap();
        let got = client.send(Method::GET, url, headers).await?;
        let status = got.response.status();
        let version = got.response.version();
        let body = got.response.into_body().collect().await.unwrap().to_bytes();
        Ok((status, version, body))
    }

    fn redirect(status: u16, location: &str) -> Response<Full<Bytes>> {
        Response::builder()
            .status(status)
            .header(header::LOCATION, location)
            .body(Full::new(Bytes::from_static(b"moved")))
            .unwrap()
    }

    fn ok(body: &'static [u8]) -> Response<Full<Bytes>> {
        Response::new(Full::new(Bytes::from_static(body)))
    }

    fn not_found() -> Response<Full<Bytes>> {
        Response::builder()
            .status(404)
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    /// A second loopback address for a "different host", if the kernel
    /// lets us bind it (Linux routes all of 127/8 to lo).
    async fn other_loopback() -> IpAddr {
        let candidate = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        match tokio::net::TcpListener::bind((candidate, 0)).await {
            Ok(_) => candidate,
            Err(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }

    // --- real registries ---------------------------------------------------

    #[tokio::test]
    async fn upstream_plain_registry_manifest() {
        let registry = start_registry(false);
        let dir = tempfile::tempdir().unwrap();
        let image = image_in(&registry, dir.path());
        let upstreams =
            Upstreams::new(&one_registry(&registry.host(), &registry.url(), "")).unwrap();
        let client = upstreams.client(&registry.host()).unwrap();
        let (status, _, body) = get_manifest(client, &registry.url(), &image).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(sha256_digest(&body), image.digest);
        assert!(upstreams.client("unknown.example").is_none());
    }

    #[tokio::test]
    async fn upstream_tls_registry_trust_settings() {
        let registry = start_registry(true);
        let dir = tempfile::tempdir().unwrap();
        let image = image_in(&registry, dir.path());
        let host = registry.host();
        let url = registry.url();

        // caBundle trusted: works, over HTTP/2 via ALPN.
        let ca = dir.path().join("extra-roots.pem");
        std::fs::write(&ca, registry.ca_pem().unwrap()).unwrap();
        let extra = format!("    caBundle: \"{}\"\n", ca.display());
        let upstreams = Upstreams::new(&one_registry(&host, &url, &extra)).unwrap();
        let client = upstreams.client(&host).unwrap();
        let (status, version, body) = get_manifest(client, &url, &image).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(sha256_digest(&body), image.digest);
        assert_eq!(version, http::Version::HTTP_2, "ALPN should pick h2");

        // Webpki roots only: the test CA is an unknown issuer.
        let upstreams = Upstreams::new(&one_registry(&host, &url, "")).unwrap();
        let err = get_manifest(upstreams.client(&host).unwrap(), &url, &image)
            .await
            .unwrap_err();
        assert!(matches!(err, UpstreamError::Tls { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("UnknownIssuer"), "{text}");
        assert!(text.contains(&host), "{text}");

        // insecureSkipVerify: works without the CA.
        let upstreams =
            Upstreams::new(&one_registry(&host, &url, "    insecureSkipVerify: true\n")).unwrap();
        let (status, _, body) = get_manifest(upstreams.client(&host).unwrap(), &url, &image)
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(sha256_digest(&body), image.digest);
    }

    #[tokio::test]
    async fn upstream_resolve_map_pins_names() {
        let registry = start_registry(false);
        let port = registry.addr().port();
        let url = format!("http://upstream.test:{port}");
        let config = config(&format!(
            "resolve: {{upstream.test: 127.0.0.1}}\n\
             registries:\n  - host: upstream.test\n    upstream: \"{url}\"\n"
        ));
        let upstreams = Upstreams::new(&config).unwrap();
        let client = upstreams.client("upstream.test").unwrap();
        let got = client
            .send(
                Method::GET,
                format!("{url}/v2/").parse().unwrap(),
                HeaderMap::new(),
            )
            .await
            .unwrap();
        assert_eq!(got.response.status(), StatusCode::OK);
        assert_eq!(got.hops, 0);
        assert!(registry.count_requests("GET", "/v2/") >= 1);
    }

    #[tokio::test]
    async fn upstream_refused_connection_is_an_error_not_a_hang() {
        let mut registry = start_registry(false);
        let (host, url) = (registry.host(), registry.url());
        registry.stop().unwrap();
        let upstreams = Upstreams::new(&one_registry(&host, &url, "")).unwrap();
        let started = Instant::now();
        let err = upstreams
            .client(&host)
            .unwrap()
            .send(
                Method::GET,
                format!("{url}/v2/").parse().unwrap(),
                HeaderMap::new(),
            )
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(matches!(err, UpstreamError::Connect { .. }), "{err}");
        assert!(err.to_string().contains(&host), "{err}");
    }

    // --- config errors -----------------------------------------------------

    #[test]
    fn upstream_ca_bundle_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing-roots.pem");
        let extra = format!("    caBundle: \"{}\"\n", missing.display());
        let err = Upstreams::new(&one_registry("quay.io", "https://quay.io", &extra))
            .err()
            .unwrap();
        assert!(matches!(err, UpstreamError::CaBundleRead { .. }), "{err}");
        assert!(err.to_string().contains("missing-roots.pem"), "{err}");

        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let extra = format!("    caBundle: \"{}\"\n", junk.display());
        let err = Upstreams::new(&one_registry("quay.io", "https://quay.io", &extra))
            .err()
            .unwrap();
        assert!(
            matches!(err, UpstreamError::CaBundleInvalid { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("junk.pem"), "{err}");
    }

    // --- redirects ---------------------------------------------------------

    #[tokio::test]
    async fn upstream_redirects_across_hosts_drop_credentials() {
        let blob_ip = other_loopback().await;
        // Second host: 302 with a relative Location to itself, then bytes.
        let storage = TestServer::start(blob_ip, |s| {
            let path = s.path.as_str();
            if path.starts_with("/storage/v2/blobs/abc") {
                redirect(302, "../real/abc?sig=2")
            } else if path == "/storage/v2/real/abc?sig=2" {
                ok(b"the blob bytes")
            } else {
                not_found()
            }
        })
        .await;
        let storage_port = storage.addr.port();
        // First host: 307 with an absolute Location to the second.
        let registry = TestServer::start(IpAddr::V4(Ipv4Addr::LOCALHOST), move |_| {
            redirect(
                307,
                &format!("http://blobs.test:{storage_port}/storage/v2/blobs/abc?sig=1"),
            )
        })
        .await;

        let config = config(&format!(
            "resolve: {{blobs.test: {blob_ip}}}\n\
             registries:\n  - host: \"{0}\"\n    upstream: \"http://{0}\"\n",
            registry.addr
        ));
        let upstreams = Upstreams::new(&config).unwrap();
        let client = upstreams.client(&registry.addr.to_string()).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Bearer secret".parse().unwrap());
        headers.insert(header::COOKIE, "session=1".parse().unwrap());
        headers.insert("x-trace", "kept".parse().unwrap());
        headers.insert(header::HOST, "spoofed.example".parse().unwrap());
        let url: Uri = format!("http://{}/v2/team/app/blobs/sha256:abc", registry.addr)
            .parse()
            .unwrap();
        let got = client.send(Method::GET, url, headers).await.unwrap();
        assert_eq!(got.hops, 2);
        assert_eq!(got.response.status(), StatusCode::OK);
        assert_eq!(
            got.final_url.to_string(),
            format!("http://blobs.test:{storage_port}/storage/v2/real/abc?sig=2")
        );
        let body = got.response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"the blob bytes");

        let first = registry.seen();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].headers[header::AUTHORIZATION], "Bearer secret");
        assert_eq!(first[0].headers[header::COOKIE], "session=1");
        assert_eq!(
            first[0].headers[header::HOST],
            registry.addr.to_string().as_str()
        );

        let second = storage.seen();
        assert_eq!(second.len(), 2);
        for seen in &second {
            assert!(
                !seen.headers.contains_key(header::AUTHORIZATION),
                "{seen:?}"
            );
            assert!(!seen.headers.contains_key(header::COOKIE), "{seen:?}");
            assert_eq!(seen.headers["x-trace"], "kept");
            assert_eq!(
                seen.headers[header::HOST],
                format!("blobs.test:{storage_port}").as_str()
            );
        }
    }

    #[tokio::test]
    async fn upstream_redirect_loop_is_too_many_redirects() {
        let server =
            TestServer::start(IpAddr::V4(Ipv4Addr::LOCALHOST), |_| redirect(302, "/loop")).await;
        let host = server.addr.to_string();
        let upstreams =
            Upstreams::new(&one_registry(&host, &format!("http://{host}"), "")).unwrap();
        let started = Instant::now();
        let err = upstreams
            .client(&host)
            .unwrap()
            .send(
                Method::GET,
                format!("http://{host}/start").parse().unwrap(),
                HeaderMap::new(),
            )
            .await
            .err()
            .unwrap();
        assert!(
            matches!(err, UpstreamError::TooManyRedirects { .. }),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        // The original request plus 5 followed hops.
        assert_eq!(server.seen().len(), 1 + usize::from(MAX_REDIRECTS));
    }

    #[tokio::test]
    async fn upstream_see_other_turns_post_into_get_and_keeps_head() {
        let server = TestServer::start(IpAddr::V4(Ipv4Addr::LOCALHOST), |s| {
            let path = s.path.as_str();
            if path == "/result" {
                ok(b"result")
            } else {
                redirect(303, "/result")
            }
        })
        .await;
        let host = server.addr.to_string();
        let upstreams =
            Upstreams::new(&one_registry(&host, &format!("http://{host}"), "")).unwrap();
        let client = upstreams.client(&host).unwrap();

        let url: Uri = format!("http://{host}/submit").parse().unwrap();
        let got = client
            .send(Method::POST, url.clone(), HeaderMap::new())
            .await
            .unwrap();
        assert_eq!(got.hops, 1);
        let body = got.response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"result");

        let got = client
            .send(Method::HEAD, url, HeaderMap::new())
            .await
            .unwrap();
        assert_eq!(got.response.status(), StatusCode::OK);

        let methods: Vec<(Method, String)> = server
            .seen()
            .into_iter()
            .map(|s| (s.method, s.path))
            .collect();
        assert_eq!(
            methods,
            vec![
                (Method::POST, "/submit".to_string()),
                (Method::GET, "/result".to_string()),
                (Method::HEAD, "/submit".to_string()),
                (Method::HEAD, "/result".to_string()),
            ]
        );
    }

    #[tokio::test]
    async fn upstream_bad_redirect_and_header_timeout() {
        let server = TestServer::start(IpAddr::V4(Ipv4Addr::LOCALHOST), |_| {
            redirect(302, "ftp://elsewhere/x")
        })
        .await;
        let host = server.addr.to_string();
        let upstreams =
            Upstreams::new(&one_registry(&host, &format!("http://{host}"), "")).unwrap();
        let err = upstreams
            .client(&host)
            .unwrap()
            .send(
                Method::GET,
                format!("http://{host}/x").parse().unwrap(),
                HeaderMap::new(),
            )
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&err, UpstreamError::BadRedirect { location, .. } if location == "ftp://elsewhere/x"),
            "{err}"
        );

        // Accepts, never answers: bounded by the read timeout.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                held.push(s);
            }
        });
        let config = config(&format!(
            "upstreamTimeouts: {{connect: 1s, read: 300ms}}\n\
             registries:\n  - host: \"{addr}\"\n    upstream: \"http://{addr}\"\n"
        ));
        let upstreams = Upstreams::new(&config).unwrap();
        let started = Instant::now();
        let err = upstreams
            .client(&addr.to_string())
            .unwrap()
            .send(
                Method::GET,
                format!("http://{addr}/v2/").parse().unwrap(),
                HeaderMap::new(),
            )
            .await
            .err()
            .unwrap();
        assert!(matches!(err, UpstreamError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));
        hold.abort();
    }

    // --- units -------------------------------------------------------------

    #[test]
    fn upstream_locations_resolve_like_rfc_3986() {
        let base: Uri = "https://reg.example:5000/v2/a/blobs/sha256:1?x=1"
            .parse()
            .unwrap();
        let cases = [
            ("https://cdn.example/b?sig=1", "https://cdn.example/b?sig=1"),
            ("//cdn.example/b", "https://cdn.example/b"),
            ("/real/path", "https://reg.example:5000/real/path"),
            ("../blobs/x", "https://reg.example:5000/v2/a/blobs/x"),
            ("../../b", "https://reg.example:5000/v2/b"),
            ("x?y=2", "https://reg.example:5000/v2/a/blobs/x?y=2"),
            ("./", "https://reg.example:5000/v2/a/blobs/"),
            ("../../..", "https://reg.example:5000/"),
            ("?q=3", "https://reg.example:5000/v2/a/blobs/sha256:1?q=3"),
            ("/p#frag", "https://reg.example:5000/p"),
            // Host names are case-insensitive; the url crate lowercases them.
            ("HTTP://Other.example:8080/z", "http://other.example:8080/z"),
            // Spaces are percent-encoded, as browsers do.
            ("/with space", "https://reg.example:5000/with%20space"),
        ];
        for (location, want) in cases {
            let got = resolve_location(&base, location)
                .unwrap_or_else(|| panic!("{location} did not resolve"));
            assert_eq!(got.to_string(), want, "{location}");
        }
        for bad in ["ftp://x/y", "", "http://"] {
            assert!(resolve_location(&base, bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn upstream_types_are_send_sync() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>(_: &T) {}
        send_sync::<Upstreams>();
        send_sync::<UpstreamClient>();
        send_sync::<UpstreamError>();
        let upstreams = Upstreams::new(&one_registry("quay.io", "https://quay.io", "")).unwrap();
        let client = upstreams.client("quay.io").unwrap();
        // The future can be spawned; it is dropped without being polled.
        let pending = client.send(
            Method::GET,
            "https://quay.io/v2/".parse().unwrap(),
            HeaderMap::new(),
        );
        send(&pending);
    }

    #[test]
    fn upstream_credentials_follow_origin() {
        let a = Origin::of(&"https://Reg.example/v2/".parse().unwrap()).unwrap();
        let b = Origin::of(&"https://reg.example:443/x".parse().unwrap()).unwrap();
        let c = Origin::of(&"https://reg.example:5000/x".parse().unwrap()).unwrap();
        let d = Origin::of(&"http://reg.example:443/x".parse().unwrap()).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
    }

    #[tokio::test]
    async fn upstream_resolver_pins_and_fails_clearly_without_dns() {
        let pins = BTreeMap::from([(
            "Pinned.Test".to_string(),
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9)),
        )]);
        let resolver = UpstreamResolver::with_dns(&pins, Err("no resolv.conf".into()));
        assert_eq!(
            resolver.lookup("pinned.test.").await.unwrap(),
            vec![IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9))]
        );
        assert_eq!(
            resolver.lookup("10.1.2.3").await.unwrap(),
            vec![IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))]
        );
        let err = resolver.lookup("quay.io").await.unwrap_err();
        assert!(err.to_string().contains("quay.io"), "{err}");
        assert!(err.to_string().contains("no resolv.conf"), "{err}");
    }
}

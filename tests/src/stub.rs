//! A scriptable upstream registry for behaviour `docker-registry` cannot
//! show: blob redirects to a second "storage" host (absolute, then
//! relative Locations), corrupted blob bytes, Basic or Bearer-token auth
//! with its own token realm, and throttled blob bodies. It serves the
//! manifests and blobs of an OCI layout folder (see [`crate::fixtures`])
//! under any repository name, on a loopback address, and records every
//! request (method, path with query, headers) each of its servers saw.
//!
//! ```no_run
//! # use pullthrough_testbed::stub::{Stub, StubAuth};
//! # let layout = std::path::Path::new("/tmp/layout");
//! let stub = Stub::builder(layout)
//!     .redirect_blobs_to("127.0.0.2".parse().unwrap())
//!     .auth(StubAuth::bearer("stub", "good"))
//!     .start()
//!     .unwrap();
//! println!("{}", stub.url());
//! ```
//!
//! It also answers any path with a canned response set by the test
//! ([`Stub::set_response`], [`Stub::set_json`]); [`Stub::canned`] starts
//! one with nothing else (no layout), e.g. a fake `/status` endpoint:
//!
//! ```no_run
//! # use pullthrough_testbed::stub::Stub;
//! let status = Stub::canned().start().unwrap();
//! status.set_json("/status", &serde_json::json!({"configHash": "none"}));
//! println!("{}/status", status.url());
//! ```
//!
//! The servers run on a runtime of their own, on a thread of their own;
//! [`Stub::stop`] (or drop) shuts the runtime down, which closes the
//! listeners and every open connection, as an upstream outage would.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, IoContext, Result};
use crate::net;

/// How the stub registry authenticates requests (the token realm is open
/// unless [`StubAuth::Bearer::login`] is set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StubAuth {
    None,
    /// `401 WWW-Authenticate: Basic realm="stub"` unless the request carries
    /// these credentials.
    Basic {
        user: String,
        password: String,
    },
    /// `401 WWW-Authenticate: Bearer realm="http://<stub>/token",
    /// service="<service>",scope="repository:<repo>:pull"` unless the
    /// request carries `Authorization: Bearer <token>`; `GET /token` hands
    /// out `{"token":"<token>","expires_in":300}` to anyone, or with
    /// `login` only to a request with those Basic credentials (401
    /// otherwise), as Docker Hub's or quay.io's realms do for private
    /// repositories.
    Bearer {
        service: String,
        token: String,
        login: Option<(String, String)>,
    },
}

impl StubAuth {
    pub fn basic(user: &str, password: &str) -> Self {
        Self::Basic {
            user: user.into(),
            password: password.into(),
        }
    }

    pub fn bearer(service: &str, token: &str) -> Self {
        Self::Bearer {
            service: service.into(),
            token: token.into(),
            login: None,
        }
    }

    /// Bearer auth whose realm hands the token only to `user`/`password`.
    pub fn bearer_login(service: &str, token: &str, user: &str, password: &str) -> Self {
        Self::Bearer {
            service: service.into(),
            token: token.into(),
            login: Some((user.into(), password.into())),
        }
    }
}

/// Blob bodies sent `chunk` bytes at a time with `pause` between chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttle {
    pub chunk: usize,
    pub pause: Duration,
}

/// A request one of the stub's servers received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    /// Path and query, as sent.
    pub path: String,
    pub headers: HeaderMap,
}

impl Seen {
    /// The request's `Authorization` header, if any.
    pub fn auth(&self) -> Option<&str> {
        self.headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
    }
}

/// How a routed stub answers each request ([`StubBuilder::route`]).
pub type Route = dyn Fn(&Seen) -> Response<Bytes> + Send + Sync;

/// A response set by the test for one path.
#[derive(Debug, Clone)]
struct Canned {
    status: StatusCode,
    content_type: String,
    body: Bytes,
}

/// Start options: [`Stub::builder`], [`Stub::canned`].
#[derive(Clone)]
pub struct StubBuilder {
    layout: Option<PathBuf>,
    ip: IpAddr,
    auth: StubAuth,
    storage_ip: Option<IpAddr>,
    blob_location: Option<String>,
    realm: Option<String>,
    corrupt: HashSet<String>,
    throttle: Option<Throttle>,
    canned: HashMap<String, Canned>,
    route: Option<Arc<Route>>,
    tls: bool,
}

impl std::fmt::Debug for StubBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StubBuilder")
            .field("layout", &self.layout)
            .field("ip", &self.ip)
            .field("routed", &self.route.is_some())
            .finish_non_exhaustive()
    }
}

impl StubBuilder {
    /// Serve on `ip` (loopback only; default 127.0.0.1).
    pub fn ip(mut self, ip: IpAddr) -> Self {
        self.ip = ip;
        self
    }

    pub fn auth(mut self, auth: StubAuth) -> Self {
        self.auth = auth;
        self
    }

    /// Blob requests get `307` with an absolute Location on a second
    /// server on `ip` (e.g. 127.0.0.2), which answers `302` with a relative
    /// Location to itself, and only then the bytes. The storage server asks
    /// for no credentials.
    pub fn redirect_blobs_to(mut self, ip: IpAddr) -> Self {
        self.storage_ip = Some(ip);
        self
    }

    /// A hostile upstream: blob requests get `307` with this Location
    /// (`{digest}` replaced by the blob's digest), wherever it points.
    pub fn redirect_blobs_to_url(mut self, location: &str) -> Self {
        self.blob_location = Some(location.to_string());
        self
    }

    /// A hostile upstream: Bearer challenges name this realm instead of
    /// the stub's own `/token`.
    pub fn realm(mut self, realm: &str) -> Self {
        self.realm = Some(realm.to_string());
        self
    }

    /// Serve wrong bytes (same length) for this blob digest.
    pub fn corrupt(mut self, digest: &str) -> Self {
        self.corrupt.insert(digest.to_string());
        self
    }

    pub fn throttle(mut self, throttle: Throttle) -> Self {
        self.throttle = Some(throttle);
        self
    }

    /// Answer requests for `path` (without the query) with this response,
    /// before anything else; see [`Stub::set_response`].
    pub fn respond(
        mut self,
        path: &str,
        status: StatusCode,
        content_type: &str,
        body: impl Into<Bytes>,
    ) -> Self {
        self.canned.insert(
            path.to_string(),
            Canned {
                status,
                content_type: content_type.to_string(),
                body: body.into(),
            },
        );
        self
    }

    /// Answer every request of the registry server with `route`, a
    /// scripted upstream (redirect loops, failing realms, challenges); the
    /// request is recorded first, as always.
    pub fn route(
        mut self,
        route: impl Fn(&Seen) -> Response<Bytes> + Send + Sync + 'static,
    ) -> Self {
        self.route = Some(Arc::new(route));
        self
    }

    /// Serve the registry server over TLS with a self-signed certificate
    /// for its IP ([`Stub::tls_cert_pem`] for a client's trust); the
    /// storage server stays plain.
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    pub fn start(self) -> Result<Stub> {
        Stub::start(self)
    }
}

/// What the servers share with the test.
struct State {
    route: Option<Arc<Route>>,
    /// The registry server's certificate (PEM), when it serves TLS.
    tls_cert_pem: Option<String>,
    /// None: a canned-only stub, every registry path is unknown.
    layout: Option<PathBuf>,
    auth: StubAuth,
    /// The registry server's own address (token realm).
    addr: SocketAddr,
    storage: Option<SocketAddr>,
    blob_location: Option<String>,
    realm: Option<String>,
    corrupt: Mutex<HashSet<String>>,
    throttle: Mutex<Option<Throttle>>,
    seen: Mutex<Vec<Seen>>,
    storage_seen: Mutex<Vec<Seen>>,
    canned: Mutex<HashMap<String, Canned>>,
    /// Connections the registry server accepted.
    connections: std::sync::atomic::AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running stub registry (and its storage server, when redirecting).
pub struct Stub {
    state: Arc<State>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Stub {
    /// A stub serving the OCI layout folder `layout` (manifests by tag from
    /// its `index.json`, everything by digest from `blobs/sha256`).
    pub fn builder(layout: &Path) -> StubBuilder {
        StubBuilder {
            layout: Some(layout.to_path_buf()),
            ..Self::canned()
        }
    }

    /// A stub serving no image: only the responses the test sets
    /// ([`StubBuilder::respond`], [`Stub::set_response`]); anything else
    /// is a registry `404` (`/v2/` still answers `200`).
    pub fn canned() -> StubBuilder {
        StubBuilder {
            layout: None,
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            auth: StubAuth::None,
            storage_ip: None,
            blob_location: None,
            realm: None,
            corrupt: HashSet::new(),
            throttle: None,
            canned: HashMap::new(),
            route: None,
            tls: false,
        }
    }

    fn start(opts: StubBuilder) -> Result<Self> {
        let bind = |ip: IpAddr| -> Result<std::net::TcpListener> {
            net::assert_loopback(SocketAddr::new(ip, 0))?;
            let l = std::net::TcpListener::bind((ip, 0)).ctx(|| format!("binding stub on {ip}"))?;
            l.set_nonblocking(true)
                .ctx(|| "making the stub listener non-blocking".into())?;
            Ok(l)
        };
        let registry = bind(opts.ip)?;
        let tls = if opts.tls {
            Some(self_signed(opts.ip)?)
        } else {
            None
        };
        let storage = opts.storage_ip.map(bind).transpose()?;
        let local = |l: &std::net::TcpListener| l.local_addr().ctx(|| "stub address".into());
        let state = Arc::new(State {
            layout: opts.layout,
            auth: opts.auth,
            addr: local(&registry)?,
            storage: storage.as_ref().map(local).transpose()?,
            blob_location: opts.blob_location,
            realm: opts.realm,
            corrupt: Mutex::new(opts.corrupt),
            throttle: Mutex::new(opts.throttle),
            seen: Mutex::new(Vec::new()),
            storage_seen: Mutex::new(Vec::new()),
            canned: Mutex::new(opts.canned),
            connections: Default::default(),
            route: opts.route,
            tls_cert_pem: tls.as_ref().map(|(pem, _)| pem.clone()),
        });
        let acceptor = tls.map(|(_, a)| a);

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .ctx(|| "building the stub runtime".into())?;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let st = state.clone();
        let thread = std::thread::Builder::new()
            .name("registry-stub".into())
            .spawn(move || {
                rt.block_on(async move {
                    let listen = |l: std::net::TcpListener| {
                        tokio::net::TcpListener::from_std(l).ctx(|| "stub listener".into())
                    };
                    let registry = match listen(registry) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    tokio::spawn(serve(registry, st.clone(), false, acceptor));
                    if let Some(storage) = storage {
                        match listen(storage) {
                            Ok(l) => {
                                tokio::spawn(serve(l, st.clone(), true, None));
                            }
                            Err(e) => {
                                let _ = ready_tx.send(Err(e));
                                return;
                            }
                        }
                    }
                    let _ = ready_tx.send(Ok(()));
                    let _ = stop_rx.await;
                });
                // Dropping the runtime drops every task: listeners and
                // connections close, as in an outage.
                rt.shutdown_background();
            })
            .ctx(|| "starting the stub thread".into())?;
        let stub = Self {
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|e| Error::Other(format!("stub did not start: {e}")))??;
        Ok(stub)
    }

    /// Stops both servers; every open connection is closed.
    pub fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.state.addr
    }

    /// `http://ip:port` (`https://` with [`StubBuilder::tls`]) of the
    /// registry server.
    pub fn url(&self) -> String {
        let scheme = if self.state.tls_cert_pem.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.state.addr)
    }

    /// The registry server's self-signed certificate, with
    /// [`StubBuilder::tls`].
    pub fn tls_cert_pem(&self) -> Option<&str> {
        self.state.tls_cert_pem.as_deref()
    }

    /// The storage server's address, when redirecting.
    pub fn storage_addr(&self) -> Option<SocketAddr> {
        self.state.storage
    }

    /// Starts or stops corrupting `digest`.
    pub fn set_corrupt(&self, digest: &str, corrupt: bool) {
        let mut set = lock(&self.state.corrupt);
        if corrupt {
            set.insert(digest.to_string());
        } else {
            set.remove(digest);
        }
    }

    pub fn set_throttle(&self, throttle: Option<Throttle>) {
        *lock(&self.state.throttle) = throttle;
    }

    /// From now on, requests for `path` (without the query, any method)
    /// get this response, before auth and the registry routes.
    pub fn set_response(
        &self,
        path: &str,
        status: StatusCode,
        content_type: &str,
        body: impl Into<Bytes>,
    ) {
        lock(&self.state.canned).insert(
            path.to_string(),
            Canned {
                status,
                content_type: content_type.to_string(),
                body: body.into(),
            },
        );
    }

    /// [`Stub::set_response`] with `200` and `value` as JSON.
    pub fn set_json(&self, path: &str, value: &serde_json::Value) {
        self.set_response(path, StatusCode::OK, "application/json", value.to_string());
    }

    /// Every request the registry server saw (token requests included).
    pub fn requests(&self) -> Vec<Seen> {
        lock(&self.state.seen).clone()
    }

    /// Every request the storage server saw.
    pub fn storage_requests(&self) -> Vec<Seen> {
        lock(&self.state.storage_seen).clone()
    }

    /// Connections the registry server accepted so far: whether a client
    /// reuses its connections.
    pub fn connections(&self) -> usize {
        self.state
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Registry requests with this method whose path contains `part`.
    pub fn count(&self, method: &str, part: &str) -> usize {
        count(&self.requests(), method, part)
    }

    /// Whole downloads of paths containing `part`: GETs without a `Range`
    /// (the proxy asks about access to a blob with a one-byte ranged GET).
    pub fn downloads(&self, part: &str) -> usize {
        self.requests()
            .iter()
            .filter(|s| s.method == Method::GET && s.path.contains(part))
            .filter(|s| !s.headers.contains_key(header::RANGE))
            .count()
    }

    /// Storage requests with this method whose path contains `part`.
    pub fn storage_count(&self, method: &str, part: &str) -> usize {
        count(&self.storage_requests(), method, part)
    }
}

fn count(seen: &[Seen], method: &str, part: &str) -> usize {
    seen.iter()
        .filter(|s| s.method.as_str() == method && s.path.contains(part))
        .count()
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A self-signed certificate for `ip` (PEM) and an acceptor serving it.
fn self_signed(ip: IpAddr) -> Result<(String, tokio_rustls::TlsAcceptor)> {
    let fail = |e: &dyn std::fmt::Display| Error::Other(format!("stub TLS certificate: {e}"));
    let key = rcgen::KeyPair::generate().map_err(|e| fail(&e))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| fail(&e))?;
    params.subject_alt_names = vec![rcgen::SanType::IpAddress(ip)];
    let cert = params.self_signed(&key).map_err(|e| fail(&e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| fail(&e))?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .map_err(|e| fail(&e))?;
    Ok((
        cert.pem(),
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
    ))
}

async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<State>,
    storage: bool,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        if !storage {
            state
                .connections
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let state = state.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move {
                    let resp = if storage {
                        storage_request(&state, &req)
                    } else {
                        registry_request(&state, &req)
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let http = auto::Builder::new(TokioExecutor::new());
            match tls {
                None => {
                    let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                }
                Some(tls) => {
                    if let Ok(stream) = tls.accept(stream).await {
                        let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                    }
                }
            }
        });
    }
}

/// Records the request and returns what was recorded.
fn record(into: &Mutex<Vec<Seen>>, req: &Request<Incoming>) -> Seen {
    let seen = Seen {
        method: req.method().clone(),
        path: req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().path().to_string(), |p| p.as_str().to_string()),
        headers: req.headers().clone(),
    };
    lock(into).push(seen.clone());
    seen
}

/// The stub's response body: whole, or fed by a throttling task.
enum StubBody {
    Full(Option<Bytes>),
    Chunks(mpsc::Receiver<Bytes>),
}

impl hyper::body::Body for StubBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match &mut *self {
            StubBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            StubBody::Chunks(rx) => rx.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            StubBody::Full(b) => {
                hyper::body::SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64))
            }
            StubBody::Chunks(_) => hyper::body::SizeHint::default(),
        }
    }
}

fn respond(
    status: StatusCode,
    headers: &[(header::HeaderName, String)],
    body: Bytes,
) -> Response<StubBody> {
    let mut resp = Response::new(StubBody::Full(Some(body)));
    *resp.status_mut() = status;
    for (k, v) in headers {
        if let Ok(v) = HeaderValue::from_str(v) {
            resp.headers_mut().append(k.clone(), v);
        }
    }
    resp
}

fn oci_error(status: StatusCode, code: &str) -> Response<StubBody> {
    let body = format!(r#"{{"errors":[{{"code":"{code}","message":"stub","detail":null}}]}}"#);
    respond(
        status,
        &[(header::CONTENT_TYPE, "application/json".into())],
        Bytes::from(body),
    )
}

fn registry_request(state: &State, req: &Request<Incoming>) -> Response<StubBody> {
    let seen = record(&state.seen, req);
    if let Some(route) = &state.route {
        let (parts, body) = route(&seen).into_parts();
        return Response::from_parts(parts, StubBody::Full(Some(body)));
    }
    let path = req.uri().path();
    if let Some(c) = lock(&state.canned).get(path) {
        return respond(
            c.status,
            &[(header::CONTENT_TYPE, c.content_type.clone())],
            c.body.clone(),
        );
    }
    if path == "/token" {
        return match &state.auth {
            StubAuth::Bearer {
                login: Some((user, password)),
                ..
            } if req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                != Some(basic_header(user, password).as_str()) =>
            {
                oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED")
            }
            StubAuth::Bearer { token, .. } => respond(
                StatusCode::OK,
                &[(header::CONTENT_TYPE, "application/json".into())],
                Bytes::from(format!(r#"{{"token":"{token}","expires_in":300}}"#)),
            ),
            _ => oci_error(StatusCode::NOT_FOUND, "NOT_FOUND"),
        };
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return oci_error(StatusCode::NOT_FOUND, "NOT_FOUND");
    };
    // /v2/<repo>/(manifests|blobs)/<ref>
    let parts: Option<(&str, &str, &str)> = rest.rsplit_once('/').and_then(|(head, reference)| {
        let (repo, kind) = head.rsplit_once('/')?;
        Some((repo, kind, reference))
    });
    if let Some(challenge) = unauthorized(state, req, parts.map(|p| p.0)) {
        return challenge;
    }
    let Some((_repo, kind, reference)) = parts else {
        if rest.is_empty() {
            return respond(
                StatusCode::OK,
                &[
                    (header::CONTENT_TYPE, "application/json".into()),
                    (
                        header::HeaderName::from_static("docker-distribution-api-version"),
                        "registry/2.0".into(),
                    ),
                ],
                Bytes::from_static(b"{}"),
            );
        }
        return oci_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN");
    };
    let head = req.method() == Method::HEAD;
    match kind {
        "manifests" => manifest(state, reference, head),
        "blobs" => {
            if !reference.starts_with("sha256:")
                || !blob_path(&state.layout, reference).is_some_and(|p| p.is_file())
            {
                return oci_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
            }
            if let Some(location) = &state.blob_location {
                return respond(
                    StatusCode::TEMPORARY_REDIRECT,
                    &[(header::LOCATION, location.replace("{digest}", reference))],
                    Bytes::new(),
                );
            }
            match state.storage {
                Some(storage) => respond(
                    StatusCode::TEMPORARY_REDIRECT,
                    &[(
                        header::LOCATION,
                        format!("http://{storage}/storage/blobs/{reference}?sig=1"),
                    )],
                    Bytes::new(),
                ),
                None => blob(state, reference, head),
            }
        }
        _ => oci_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN"),
    }
}

/// The 401 for a request without the right credentials, or None.
fn unauthorized(
    state: &State,
    req: &Request<Incoming>,
    repo: Option<&str>,
) -> Option<Response<StubBody>> {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let (wanted, challenge) = match &state.auth {
        StubAuth::None => return None,
        StubAuth::Basic { user, password } => (
            basic_header(user, password),
            r#"Basic realm="stub""#.to_string(),
        ),
        StubAuth::Bearer { service, token, .. } => {
            let realm = state
                .realm
                .clone()
                .unwrap_or_else(|| format!("http://{}/token", state.addr));
            let mut c = format!(r#"Bearer realm="{realm}",service="{service}""#);
            if let Some(repo) = repo {
                c.push_str(&format!(r#",scope="repository:{repo}:pull""#));
            }
            (format!("Bearer {token}"), c)
        }
    };
    if given == wanted {
        return None;
    }
    let mut resp = oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    Some(resp)
}

fn basic_header(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

fn manifest(state: &State, reference: &str, head: bool) -> Response<StubBody> {
    let digest = if reference.starts_with("sha256:") {
        Some(reference.to_string())
    } else {
        state
            .layout
            .as_deref()
            .and_then(|layout| tag_digest(layout, reference))
    };
    let Some(digest) = digest else {
        return oci_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
    };
    let Some(Ok(bytes)) = blob_path(&state.layout, &digest).map(std::fs::read) else {
        return oci_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
    };
    let media_type = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v["mediaType"].as_str().map(str::to_string))
        .unwrap_or_else(|| crate::fixtures::OCI_MANIFEST.to_string());
    let headers = [
        (header::CONTENT_TYPE, media_type),
        (header::CONTENT_LENGTH, bytes.len().to_string()),
        (
            header::HeaderName::from_static("docker-content-digest"),
            digest,
        ),
    ];
    let body = if head {
        Bytes::new()
    } else {
        Bytes::from(bytes)
    };
    respond(StatusCode::OK, &headers, body)
}

/// The digest `index.json` gives for `tag`.
fn tag_digest(layout: &Path, tag: &str) -> Option<String> {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).ok()?).ok()?;
    index["manifests"]
        .as_array()?
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .and_then(|m| m["digest"].as_str().map(str::to_string))
}

fn blob_path(layout: &Option<PathBuf>, digest: &str) -> Option<PathBuf> {
    let hex = digest.trim_start_matches("sha256:");
    // Only a plain hex name may reach the file system.
    let hex = if hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        hex
    } else {
        "invalid"
    };
    Some(layout.as_ref()?.join("blobs/sha256").join(hex))
}

/// The blob's bytes (corrupted when asked), whole or throttled.
fn blob(state: &State, digest: &str, head: bool) -> Response<StubBody> {
    let Some(Ok(mut bytes)) = blob_path(&state.layout, digest).map(std::fs::read) else {
        return oci_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
    };
    if lock(&state.corrupt).contains(digest) && !bytes.is_empty() {
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
    }
    let mut resp = respond(
        StatusCode::OK,
        &[
            (header::CONTENT_TYPE, "application/octet-stream".into()),
            (header::CONTENT_LENGTH, bytes.len().to_string()),
            (
                header::HeaderName::from_static("docker-content-digest"),
                digest.to_string(),
            ),
        ],
        Bytes::new(),
    );
    if head {
        return resp;
    }
    let throttle = *lock(&state.throttle);
    *resp.body_mut() = match throttle {
        None => StubBody::Full(Some(Bytes::from(bytes))),
        Some(t) => {
            let (tx, rx) = mpsc::channel(1);
            let bytes = Bytes::from(bytes);
            tokio::spawn(async move {
                let mut at = 0;
                while at < bytes.len() {
                    let end = (at + t.chunk.max(1)).min(bytes.len());
                    if tx.send(bytes.slice(at..end)).await.is_err() {
                        return;
                    }
                    at = end;
                    tokio::time::sleep(t.pause).await;
                }
            });
            StubBody::Chunks(rx)
        }
    };
    resp
}

fn storage_request(state: &State, req: &Request<Incoming>) -> Response<StubBody> {
    record(&state.storage_seen, req);
    let path = req.uri().path();
    let head = req.method() == Method::HEAD;
    if let Some(digest) = path.strip_prefix("/storage/blobs/") {
        // Relative, to the same host: resolves to /storage/real/<digest>.
        return respond(
            StatusCode::FOUND,
            &[(header::LOCATION, format!("../real/{digest}?sig=2"))],
            Bytes::new(),
        );
    }
    if let Some(digest) = path.strip_prefix("/storage/real/") {
        return blob(state, digest, head);
    }
    oci_error(StatusCode::NOT_FOUND, "NOT_FOUND")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::http::Get;

    #[test]
    fn a_routed_stub_answers_with_the_route_and_records_the_request() {
        let stub = Stub::canned()
            .route(|seen| {
                let mut r = Response::new(Bytes::from(format!("saw {}", seen.path)));
                *r.status_mut() = StatusCode::IM_A_TEAPOT;
                r
            })
            .start()
            .unwrap();
        let url = format!("{}/anything?q=1", stub.url());
        let got = Get::new(&url).send().unwrap();
        assert_eq!(got.status, StatusCode::IM_A_TEAPOT);
        assert_eq!(&got.body[..], b"saw /anything?q=1");
        assert_eq!(stub.count("GET", "/anything?q=1"), 1);
    }
}

//! Listeners: plain HTTP, HTTPS (TLS with per-name certificates) and admin;
//! HTTP/1.1 and HTTP/2 on each; graceful drain on shutdown.
//!
//! What one client can hold is bounded (`limits:` in the config): the
//! number of connections (at the limit a listener stops accepting, so
//! further clients wait in the kernel's queue instead of costing file
//! descriptors), the TLS handshake time, the time to a complete request
//! head, the time a connection may move no byte, and HTTP/2 streams per
//! connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use pullthrough_api::config::Limits;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;

use crate::error::Error;
use crate::http::sendfile::{Sendfile, SendfileStream};
use crate::pipeline::{self, Shared};

/// Largest HTTP/1 request head (request line + headers) accepted; larger
/// ones get 431. hyper's default (~400 KiB) let a client make the proxy
/// buffer and forward upstream headers of hundreds of KiB; registry
/// clients' heads, tokens included, stay far below this. (HTTP/2 is
/// bounded by hyper's 16 KiB header-list default.)
const MAX_REQUEST_HEAD: usize = 64 * 1024;

/// Connections the admin listener holds at once: probes, scrapes and the
/// operator, never thousands; its own pool, so a flood on the proxy ports
/// cannot starve `/healthz`.
pub const ADMIN_MAX_CONNECTIONS: usize = 256;

/// First and longest pause after a failed `accept` (EMFILE, ENFILE,
/// ENOBUFS): the error repeats until a descriptor frees, and retrying at
/// once would spin a core.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What an HTTP/2 stream buffers of its response before it stops taking
/// more from the body (hyper's default is 400 KiB): with up to 128 streams
/// per connection whose client may never read, that is what a connection
/// can make the proxy hold, on top of a body chunk per stream
/// (`body::MULTIPLEXED_CHUNK`).
pub const H2_SEND_BUFFER: usize = 32 * 1024;

/// A connection builder with hyper's timer, so the HTTP/1 header-read
/// timeout (which hyper applies only when a timer is set) takes effect.
pub fn conn_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_REQUEST_HEAD);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams_per_connection)
        .max_send_buf_size(H2_SEND_BUFFER);
    builder
}

/// Binds `addr`, naming it in the error.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })
}

/// The connection pool the proxy listeners (HTTP and HTTPS) share: all
/// connections, and those of each client address.
#[derive(Debug, Clone)]
pub struct ConnectionPool {
    pub permits: Arc<Semaphore>,
    pub sources: Arc<SourceSlots>,
}

pub fn connection_pool(limits: &Limits) -> ConnectionPool {
    // u32 → usize never truncates on the targets the proxy runs on.
    ConnectionPool {
        permits: Arc::new(Semaphore::new(limits.max_connections as usize)),
        sources: Arc::new(SourceSlots::new(limits.max_connections_per_source as usize)),
    }
}

/// Connections per client address, at most `cap` each, held by
/// [`SourceSlot`]s.
#[derive(Debug)]
pub struct SourceSlots {
    cap: usize,
    held: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

/// One connection's place in [`SourceSlots`], given back on drop.
#[derive(Debug)]
pub struct SourceSlot {
    slots: Arc<SourceSlots>,
    ip: std::net::IpAddr,
}

impl SourceSlots {
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            held: Default::default(),
        }
    }

    /// A slot for a connection from `ip`, unless it holds `cap` already.
    pub fn take(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<SourceSlot> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.entry(ip).or_default();
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            slots: Arc::clone(self),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

/// Accepts one connection and takes a connection permit for it; `None`
/// when `stop` flips. Accept errors back off exponentially instead of
/// spinning.
///
/// At the limit the accepted connection waits here for a permit and the
/// listener accepts no other, so waiting clients stay in the kernel's
/// queue and cost the proxy at most one descriptor per listener. (Taking
/// the permit before `accept` would let an idle listener hold a permit
/// that the other listener's clients need.)
pub async fn accept(
    listener: &TcpListener,
    permits: &Arc<Semaphore>,
    stop: &mut watch::Receiver<bool>,
    what: &'static str,
) -> Option<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let (stream, peer) = loop {
        tokio::select! {
            res = listener.accept() => match res {
                Ok(conn) => break conn,
                Err(err) => {
                    tracing::warn!(listener = what, error = %err, backoff_ms = backoff.as_millis() as u64, "accept failed; backing off");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => return None,
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
            },
            _ = stop.changed() => return None,
        }
    };
    let permit = match permits.clone().try_acquire_owned() {
        Ok(p) => p,
        Err(_) => {
            tracing::warn!(listener = what, %peer, "connection limit reached; waiting for a connection to close");
            tokio::select! {
                p = permits.clone().acquire_owned() => p.ok()?,
                _ = stop.changed() => return None,
            }
        }
    };
    Some((stream, peer, permit))
}

/// Serves proxy requests on `listener` until `stop` flips, then drains
/// in-flight connections for up to `grace`.
pub async fn serve_proxy(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    shared: Arc<Shared>,
    limits: Limits,
    pool: ConnectionPool,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let what = if acceptor.is_some() { "https" } else { "http" };
    while let Some((stream, peer, permit)) = accept(&listener, &pool.permits, &mut stop, what).await
    {
        let Some(slot) = pool.sources.take(peer.ip()) else {
            shared.metrics.connection_refused_per_source();
            tracing::debug!(%peer, "connection refused: its address holds limits.maxConnectionsPerSource already");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let limits = limits.clone();
        let watcher = graceful.watcher();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            // Held until the connection ends.
            let _held = (permit, slot);
            let activity = Activity::new();
            match acceptor {
                None => {
                    let (sent, cold) = shared.metrics.sendfile_counters();
                    let sendfile = Sendfile::new(sent, cold);
                    let stream = Watched {
                        inner: SendfileStream::new(stream, sendfile.clone()),
                        activity: activity.clone(),
                    };
                    let mut builder = conn_builder(&limits);
                    // The sendfile path needs hyper to hand over body
                    // buffers as they are (see `http::sendfile`).
                    builder.http1().writev(true);
                    let conn = builder
                        .serve_connection(
                            TokioIo::new(stream),
                            service(shared, None, activity.clone(), peer, false, Some(sendfile)),
                        )
                        .into_owned();
                    let conn = watcher.watch(conn);
                    supervise(conn, &activity, &limits, peer).await;
                }
                Some(acceptor) => {
                    let stream = Watched {
                        inner: stream,
                        activity: activity.clone(),
                    };
                    let Some(tls) = handshake(&acceptor, stream, &limits, peer).await else {
                        return;
                    };
                    let sni: Option<Arc<str>> = tls.get_ref().1.server_name().map(Arc::from);
                    let conn = conn_builder(&limits)
                        .serve_connection(
                            TokioIo::new(tls),
                            service(shared, sni, activity.clone(), peer, false, None),
                        )
                        .into_owned();
                    let conn = watcher.watch(conn);
                    supervise(conn, &activity, &limits, peer).await;
                }
            }
        });
    }
    // Closed before the drain: new clients are refused at once (and fall
    // back) instead of waiting in a backlog nobody accepts from.
    drop(listener);
    drain(graceful, grace).await;
}

/// A TLS handshake bounded by `limits.tlsHandshakeTimeout`; `None` (logged)
/// when it fails or times out.
pub async fn handshake(
    acceptor: &tokio_rustls::TlsAcceptor,
    stream: Watched<TcpStream>,
    limits: &Limits,
    peer: SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<Watched<TcpStream>>> {
    match tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(err)) => {
            tracing::info!(%peer, error = %err, "TLS handshake refused");
            None
        }
        Err(_) => {
            tracing::info!(%peer, "TLS handshake timed out");
            None
        }
    }
}

/// Runs a connection until it ends, or closes it (by dropping it) when
/// its first request head is not complete within `headerReadTimeout` of
/// the connect, or no byte moved for `idleTimeout`.
///
/// hyper's own header-read timeout covers only HTTP/1 heads after the
/// protocol was detected; this also covers a client that sends nothing,
/// stops inside the HTTP/2 preface, or opens HTTP/2 and never a stream.
pub async fn supervise<F, E>(conn: F, activity: &Activity, limits: &Limits, peer: SocketAddr)
where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut conn = std::pin::pin!(conn);
    // The deadline moves with traffic, also earlier (a request arrives on
    // a fresh connection and `idleTimeout` is shorter than what is left of
    // `headerReadTimeout`), so look again at least this often.
    let tick =
        (limits.header_read_timeout.min(limits.idle_timeout) / 2).max(Duration::from_millis(1));
    loop {
        let deadline = activity.deadline(limits).min(Instant::now() + tick);
        tokio::select! {
            res = &mut conn => {
                if let Err(err) = res {
                    tracing::debug!(%peer, error = %err, "connection ended with an error");
                }
                return;
            }
            _ = tokio::time::sleep_until(deadline) => {
                // Activity may have moved the deadline while asleep.
                if Instant::now() >= activity.deadline(limits) {
                    if activity.got_request() {
                        tracing::debug!(%peer, "connection idle; closing");
                    } else {
                        tracing::info!(%peer, "no complete request head in time; closing");
                    }
                    return;
                }
            }
        }
    }
}

/// When a connection last moved a byte or made progress, and whether it
/// has sent a complete request head yet; shared by the connection's IO,
/// its service, its response bodies and its supervisor.
#[derive(Debug, Clone)]
pub struct Activity(Arc<ActivityInner>);

#[derive(Debug)]
struct ActivityInner {
    started: Instant,
    /// Milliseconds after `started` of the last read or write.
    last_io_ms: AtomicU64,
    /// Milliseconds after `started` of the last progress: a request head,
    /// request body data, response body data handed on, a response's end.
    progress_ms: AtomicU64,
    got_request: AtomicBool,
    /// An HTTP/2 connection: judged by progress, not by bytes.
    multiplexed: AtomicBool,
}

impl Activity {
    pub fn new() -> Self {
        Self(Arc::new(ActivityInner {
            started: Instant::now(),
            last_io_ms: AtomicU64::new(0),
            progress_ms: AtomicU64::new(0),
            got_request: AtomicBool::new(false),
            multiplexed: AtomicBool::new(false),
        }))
    }

    fn started(&self) -> Instant {
        self.0.started
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.0.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn touch(&self) {
        self.0.last_io_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    fn last_io(&self) -> Instant {
        self.0.started + Duration::from_millis(self.0.last_io_ms.load(Ordering::Relaxed))
    }

    /// Notes progress: a request body's data arrived, a response body
    /// handed data on (its client took what was sent before), a response
    /// ended.
    pub fn progressed(&self) {
        self.0.progress_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    fn last_progress(&self) -> Instant {
        self.0.started + Duration::from_millis(self.0.progress_ms.load(Ordering::Relaxed))
    }

    /// Called by the service: hyper has parsed a whole request head.
    pub fn request_seen(&self) {
        self.touch();
        self.progressed();
        self.0.got_request.store(true, Ordering::Relaxed);
    }

    /// Called by the service for an HTTP/2 request: the connection's bytes
    /// say nothing of its progress from now on.
    pub fn multiplexed(&self) {
        self.0.multiplexed.store(true, Ordering::Relaxed);
    }

    fn got_request(&self) -> bool {
        self.0.got_request.load(Ordering::Relaxed)
    }

    /// When the supervisor closes the connection unless something happens.
    ///
    /// On HTTP/2 only progress counts. Its client may send frames that
    /// need no answer (PRIORITY, WINDOW_UPDATE) or only one from hyper
    /// (PING), forever, while reading nothing of its responses: counting
    /// those bytes, such a connection held its slot and every stream's
    /// buffers for good. A client that reads, however slowly, has its
    /// responses take more data; one that asks, has requests arrive.
    fn deadline(&self, limits: &Limits) -> Instant {
        if !self.got_request() {
            self.started() + limits.header_read_timeout
        } else if self.0.multiplexed.load(Ordering::Relaxed) {
            self.last_progress() + limits.idle_timeout
        } else {
            self.last_io() + limits.idle_timeout
        }
    }
}

/// A response body that tells its connection's [`Activity`] when it hands
/// data on and when it ends (see [`Activity::deadline`]).
pub struct Tracked<B> {
    inner: B,
    activity: Activity,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, activity: Activity) -> Self {
        Self { inner, activity }
    }
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        self.activity.progressed();
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        let res = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &res
            && frame.is_data()
        {
            self.activity.progressed();
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

pin_project_lite::pin_project! {
    /// A stream that records in [`Activity`] every read or write that
    /// moved bytes.
    pub struct Watched<S> {
        #[pin]
        pub inner: S,
        pub activity: Activity,
    }
}

impl<S: AsyncRead> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let res = this.inner.poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.touch();
        }
        res
    }
}

impl<S: AsyncWrite> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let res = this.inner.poll_write(cx, buf);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        res
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let res = this.inner.poll_write_vectored(cx, bufs);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// The proxy's service for one connection from `peer` (the TCP peer: the
/// source its requests' entries in bounded state count against, see
/// [`crate::source`]); `from_peer` marks requests of the peer listener
/// (see [`crate::peers::listener`]); `sendfile`, the plain listener's, is
/// handed to its HTTP/1 requests.
pub(crate) fn service(
    shared: Arc<Shared>,
    sni: Option<Arc<str>>,
    activity: Activity,
    peer: SocketAddr,
    from_peer: bool,
    sendfile: Option<Sendfile>,
) -> impl hyper::service::Service<
    http::Request<Incoming>,
    Response = http::Response<Tracked<crate::observe::access_log::Logged>>,
    Error = Infallible,
    Future = impl Future<
        Output = Result<http::Response<Tracked<crate::observe::access_log::Logged>>, Infallible>,
    > + Send,
> + Clone {
    hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
        activity.request_seen();
        if req.version() == http::Version::HTTP_2 {
            activity.multiplexed();
        }
        // For bodies the handler reads (uploads): their data is progress.
        req.extensions_mut().insert(activity.clone());
        if from_peer {
            req.extensions_mut()
                .insert(crate::peers::listener::FromPeer);
        }
        if let Some(sendfile) = &sendfile
            && req.version() <= http::Version::HTTP_11
        {
            req.extensions_mut().insert(sendfile.clone());
        }
        let shared = shared.clone();
        let sni = sni.clone();
        let activity = activity.clone();
        async move {
            let resp = pipeline::handle(shared, req, sni, peer).await;
            Ok::<_, Infallible>(resp.map(|body| Tracked::new(body, activity)))
        }
    })
}

/// Waits for watched connections to finish, at most `grace`.
pub async fn drain(graceful: GracefulShutdown, grace: Duration) {
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections drained"),
        _ = tokio::time::sleep(grace) => tracing::warn!(grace_secs = grace.as_secs(), "grace period over; closing remaining connections"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use tokio::io::AsyncReadExt;

    use super::*;

    fn peer() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 1))
    }

    /// Serves `svc` on one end of an in-memory pipe under `supervise`,
    /// noting activity as [`service`] does; returns the client end and the
    /// server's task.
    fn serve_pipe<S, B>(
        limits: Limits,
        svc: S,
    ) -> (tokio::io::DuplexStream, tokio::task::JoinHandle<()>)
    where
        S: hyper::service::Service<
                http::Request<Incoming>,
                Response = http::Response<B>,
                Error = Infallible,
            > + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        B: hyper::body::Body<Data = Bytes, Error = Infallible> + Unpin + Send + 'static,
    {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(async move {
            let activity = Activity::new();
            let seen = activity.clone();
            let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                seen.request_seen();
                if req.version() == http::Version::HTTP_2 {
                    seen.multiplexed();
                }
                let (svc, seen) = (svc.clone(), seen.clone());
                async move {
                    let resp = svc.call(req).await?;
                    Ok::<_, Infallible>(resp.map(|b| Tracked::new(b, seen)))
                }
            });
            let io = Watched {
                inner: server,
                activity: activity.clone(),
            };
            let builder = conn_builder(&limits);
            let conn = builder.serve_connection(TokioIo::new(io), svc);
            supervise(conn, &activity, &limits, peer()).await;
        });
        (client, task)
    }

    fn hang_forever(
        in_flight: Arc<AtomicUsize>,
    ) -> impl hyper::service::Service<
        http::Request<Incoming>,
        Response = http::Response<Empty<Bytes>>,
        Error = Infallible,
        Future = impl Future<Output = Result<http::Response<Empty<Bytes>>, Infallible>> + Send,
    > + Clone
    + Send {
        hyper::service::service_fn(move |_req| {
            let in_flight = in_flight.clone();
            async move {
                in_flight.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<()>().await;
                Ok(http::Response::new(Empty::new()))
            }
        })
    }

    /// The server announces `maxStreamsPerConnection`: a client with ten
    /// requests never has more than four in flight.
    #[tokio::test]
    async fn http2_streams_per_connection_are_limited() {
        let limits = Limits {
            max_streams_per_connection: 4,
            ..Limits::default()
        };
        let in_flight = Arc::new(AtomicUsize::new(0));
        let (client, _server) = serve_pipe(limits, hang_forever(in_flight.clone()));
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client))
                .await
                .unwrap();
        tokio::spawn(conn);
        for _ in 0..10 {
            let mut send = send.clone();
            tokio::spawn(async move {
                let req = http::Request::get("http://proxy/v2/")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                if send.ready().await.is_ok() {
                    let _ = send.send_request(req).await;
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while in_flight.load(Ordering::SeqCst) < 4 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Give the other six every chance to arrive.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(in_flight.load(Ordering::SeqCst), 4);
    }

    /// A client that connects and sends nothing (so hyper never even
    /// learns the protocol) is closed after `headerReadTimeout`.
    #[tokio::test]
    async fn a_silent_connection_is_closed_after_the_header_timeout() {
        let limits = Limits {
            header_read_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let (mut client, _server) = serve_pipe(limits, hang_forever(Arc::default()));
        let start = Instant::now();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("still open long after the timeout");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        assert!(start.elapsed() >= Duration::from_millis(250));
    }

    /// A body of 16 KiB chunks without end.
    struct Endless;

    impl hyper::body::Body for Endless {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
            Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from(
                vec![7u8; 16 * 1024],
            )))))
        }
    }

    /// A service whose every answer is [`Endless`].
    fn endless() -> impl hyper::service::Service<
        http::Request<Incoming>,
        Response = http::Response<Endless>,
        Error = Infallible,
        Future = impl Future<Output = Result<http::Response<Endless>, Infallible>> + Send,
    > + Clone
    + Send {
        hyper::service::service_fn(|_req| async { Ok(http::Response::new(Endless)) })
    }

    /// An HTTP/2 client asking for an endless answer on a small window,
    /// pinging every 100 ms; `read_every`: how often it reads a frame of
    /// the body (never, if None). Whether the server still serves it
    /// after `after`.
    async fn still_served(read_every: Option<Duration>, after: Duration) -> bool {
        let limits = Limits {
            idle_timeout: Duration::from_millis(800),
            ..Limits::default()
        };
        let (client, server) = serve_pipe(limits, endless());
        let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_millis(100))
            .keep_alive_while_idle(true)
            .initial_stream_window_size(64 * 1024)
            .initial_connection_window_size(64 * 1024)
            .handshake(TokioIo::new(client))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = http::Request::get("http://proxy/v2/")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let reader = tokio::spawn(async move {
            let mut body = resp.into_body();
            let _send = send;
            loop {
                match read_every {
                    Some(every) => {
                        tokio::time::sleep(every).await;
                        if body.frame().await.is_none() {
                            return;
                        }
                    }
                    None => std::future::pending::<()>().await,
                }
            }
        });
        let served = tokio::time::timeout(after, server).await.is_err();
        reader.abort();
        served
    }

    /// An HTTP/2 client that reads none of its answer but pings (reads
    /// and writes that are no progress) is closed after `idleTimeout`;
    /// it was kept for good, with its streams' buffers.
    #[tokio::test]
    async fn an_http2_client_that_reads_nothing_is_closed_though_it_pings() {
        assert!(!still_served(None, Duration::from_secs(5)).await);
    }

    /// One that reads, slowly, keeps its connection: a 16 KiB frame every
    /// 100 ms frees half its 64 KiB window every 200–300 ms, and each time
    /// the server's body hands on more (`idleTimeout` 800 ms).
    #[tokio::test]
    async fn an_http2_client_that_reads_slowly_is_kept() {
        let every = Some(Duration::from_millis(100));
        assert!(still_served(every, Duration::from_secs(3)).await);
    }

    /// An HTTP/2 connection whose client stops sending and reading after
    /// a request is closed after `idleTimeout`.
    #[tokio::test]
    async fn an_idle_http2_connection_is_closed() {
        let limits = Limits {
            idle_timeout: Duration::from_millis(400),
            ..Limits::default()
        };
        let in_flight = Arc::new(AtomicUsize::new(0));
        let (client, server) = serve_pipe(limits, hang_forever(in_flight.clone()));
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client))
                .await
                .unwrap();
        tokio::spawn(conn);
        tokio::spawn(async move {
            let req = http::Request::get("http://proxy/v2/")
                .body(Empty::<Bytes>::new())
                .unwrap();
            let _ = send.send_request(req).await;
            // Keep the sender so only the server can end the connection.
            std::future::pending::<()>().await;
        });
        let start = Instant::now();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the idle connection was not closed")
            .unwrap();
        assert_eq!(in_flight.load(Ordering::SeqCst), 1);
        assert!(start.elapsed() >= Duration::from_millis(300));
    }
}

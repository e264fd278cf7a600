//! Merged misses: one upstream download per digest, however many clients
//! ask for it at once.
//!
//! The first client to miss a digest becomes the *leader*: it registers a
//! [`Download`] here before it contacts the upstream. Every later client
//! for the same digest finds the entry and becomes a *waiter*. Once the
//! upstream answers `200`, a task independent of any client copies the body
//! into the store's temp file and publishes, through a `watch` channel, how
//! many bytes are on disk and finally the outcome. Every client (the leader
//! too) tails the temp file through its own read handle, so a client that
//! joins late starts from byte 0 and a client that leaves stops nothing.
//!
//! The final byte is sent only after the digest was verified and the blob
//! committed: on a failure or mismatch every client's response is aborted,
//! never completed with wrong content.
//!
//! When the cache disk fills up *during* the download (another process
//! took the space that was free at the start), the download gives up
//! caching: its temp file is unlinked (the open read handles keep its
//! bytes), and [`Outcome::Abandoned`] tells every client how many bytes
//! the file holds and the sha256 state over them. Each client that has
//! not finished reads the file up to there, then fetches the rest from the
//! upstream itself (`Range: bytes=<at>-`, a `200` answer skipped to
//! `<at>`), hashing it on top of that state, so the whole body is still
//! verified before its last byte is sent. One upstream fetch per client
//! for the remainder is the price of a full disk, paid only then.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::Frame;
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;

use crate::http::body::Body;
use crate::oci::Digest;

/// What a download is doing.
#[derive(Debug, Clone)]
pub enum Phase {
    /// The leader is asking the upstream.
    Starting,
    /// Bytes are arriving; `on_disk` of them can be read from `file`.
    Streaming(Stream),
    /// The leader got no blob. `hand_over`: for a reason of its own (its
    /// client left, the upstream refused its credentials or said 404 to
    /// its repository), so a waiter leads the next try; else the upstream
    /// itself failed (timeout, connection, 5xx, 429) and each waiter asks
    /// on its own at once rather than queue behind another such try.
    NotStarted { hand_over: bool },
}

/// How [`wait_started`] ended.
#[derive(Debug)]
pub enum Started {
    Streaming(Stream),
    /// The leader gave up for a reason of its own: lead or join anew.
    HandedOver,
    /// The upstream failed the leader: ask on your own.
    GaveUp,
}

#[derive(Debug, Clone)]
pub struct Stream {
    pub file: Arc<std::fs::File>,
    /// The bytes written last, still in memory.
    pub recent: Arc<Recent>,
    pub size: Option<u64>,
    pub media_type: Option<String>,
    pub on_disk: u64,
    /// Set once the download is over.
    pub outcome: Option<Outcome>,
}

/// The most recently written bytes of a download, kept in memory so that
/// clients keeping up with it are sent them from memory (no read back
/// from the file; the very buffers written, but for pieces much shorter
/// than their batch, see `get`); a client that fell behind by more than
/// `RECENT_MAX` reads the file.
#[derive(Debug, Default)]
pub struct Recent {
    /// Contiguous batches (offset, bytes), oldest first, and their total.
    chunks: Mutex<(std::collections::VecDeque<(u64, Bytes)>, usize)>,
}

/// Bytes [`Recent`] keeps per download (16 batches of 256 KiB).
const RECENT_MAX: usize = 4 << 20;

impl Recent {
    pub fn push(&self, offset: u64, bytes: Bytes) {
        let mut c = self.chunks.lock().unwrap_or_else(|p| p.into_inner());
        c.1 += bytes.len();
        c.0.push_back((offset, bytes));
        while c.1 > RECENT_MAX {
            match c.0.pop_front() {
                Some((_, b)) => c.1 -= b.len(),
                None => break,
            }
        }
    }

    /// The bytes from `offset` to at most `limit` if they are still here.
    /// A slice keeps its whole batch allocated for as long as the client
    /// has not read it, however short it is: one less than half its batch
    /// (HTTP/2's 64 KiB chunks of 256 KiB+ batches, on up to 128 unread
    /// streams a connection) is copied out, so what a stalled client holds
    /// stays about what it was sent. HTTP/1's chunk is a batch's size and
    /// is still sent from the very buffer written.
    fn get(&self, offset: u64, limit: u64) -> Option<Bytes> {
        let c = self.chunks.lock().unwrap_or_else(|p| p.into_inner());
        let (start, bytes) =
            c.0.iter()
                .find(|(o, b)| offset >= *o && offset < o + b.len() as u64)?;
        let end = (start + bytes.len() as u64).min(limit);
        if end <= offset {
            return None;
        }
        let range = (offset - start) as usize..(end - start) as usize;
        Some(if range.len() * 2 < bytes.len() {
            Bytes::copy_from_slice(&bytes[range])
        } else {
            bytes.slice(range)
        })
    }
}

/// How a download ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The whole blob is in the file and its digest matched (whether or
    /// not it could then be committed to the cache).
    Verified,
    /// The upstream failed or sent wrong bytes: every client is aborted.
    Failed(Arc<str>),
    /// Caching was given up (disk full): the file holds exactly `at` bytes,
    /// `hasher` is the sha256 state over them; clients fetch the rest.
    Abandoned { at: u64, hasher: Arc<Sha256> },
}

/// Fetches the blob from the upstream starting at an offset (a `Range`
/// request with the client's own credentials); used by a client to finish
/// on its own when the shared download was abandoned.
pub type Resume = Arc<
    dyn Fn(u64) -> BoxFuture<'static, Result<http::Response<hyper::body::Incoming>, String>>
        + Send
        + Sync,
>;

/// How many bytes of a resumed response to drop so that it starts at
/// `at`: a `206` must start exactly there, a `200` is the whole blob.
/// Where the blob's `size` is known, the response must also end exactly
/// there: a client is sent the blob with that Content-Length, and the
/// server stops reading the body once that many bytes are out, before the
/// end where the digest is checked.
fn resumed_skip<B>(resp: &http::Response<B>, at: u64, size: Option<u64>) -> Result<u64, String> {
    let headers = resp.headers();
    let length = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match resp.status() {
        http::StatusCode::PARTIAL_CONTENT => {
            let raw = headers.get(http::header::CONTENT_RANGE);
            let wrong = || {
                format!(
                    "upstream answered the range from {at} with {raw:?} (blob size {size:?}, Content-Length {length:?})"
                )
            };
            let (from, end, total) = raw
                .and_then(|v| v.to_str().ok())
                .and_then(content_range)
                .ok_or_else(wrong)?;
            // Only the rest, to the blob's end, was asked for: anything
            // else cannot complete it.
            let ends_at = end.checked_add(1);
            let to_the_end =
                total.is_none_or(|t| ends_at == Some(t)) && size.is_none_or(|s| ends_at == Some(s));
            let consistent = length.is_none_or(|l| Some(l) == (end - from).checked_add(1));
            if from != at || !to_the_end || !consistent {
                return Err(wrong());
            }
            Ok(0)
        }
        http::StatusCode::OK => {
            if let (Some(size), Some(length)) = (size, length)
                && size != length
            {
                return Err(format!(
                    "upstream answered the whole blob of {size} bytes with {length} resuming it at {at}"
                ));
            }
            Ok(at)
        }
        status => Err(format!(
            "upstream answered {status} resuming the blob at {at}"
        )),
    }
}

/// `bytes <from>-<end>/<total or *>`: (from, end, total).
fn content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let (range, total) = v.trim().strip_prefix("bytes ")?.split_once('/')?;
    let (from, end) = range.split_once('-')?;
    let from = from.trim().parse::<u64>().ok()?;
    let end = end.trim().parse::<u64>().ok()?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse::<u64>().ok()?),
    };
    (from <= end).then_some((from, end, total))
}

/// The rest of a blob from byte `at`, through `resume`.
pub async fn resume_body(
    resume: &Resume,
    at: u64,
    timeout: std::time::Duration,
) -> Result<crate::http::body::Body, String> {
    let resp = tokio::time::timeout(timeout, resume(at))
        .await
        .map_err(|_| "upstream stalled resuming the blob".to_string())??;
    // The writer's digest check at commit covers this body whatever its
    // length, and no client is sent past the verified end.
    let skip = resumed_skip(&resp, at, None)?;
    Ok(crate::http::body::skip(
        crate::http::body::relay(resp.into_body()),
        skip,
    ))
}

/// One digest being fetched.
#[derive(Debug)]
pub struct Download {
    tx: watch::Sender<Phase>,
}

impl Download {
    pub fn subscribe(&self) -> watch::Receiver<Phase> {
        self.tx.subscribe()
    }

    pub fn publish(&self, phase: Phase) {
        self.tx.send_replace(phase);
    }

    /// Updates a streaming download in place.
    pub fn update(&self, f: impl FnOnce(&mut Stream)) {
        self.tx.send_modify(|p| {
            if let Phase::Streaming(s) = p {
                f(s);
            }
        });
    }
}

/// How long a digest whose write hit a full disk is passed through
/// without trying to cache it again.
const UNCACHEABLE_FOR: Duration = Duration::from_secs(30);

/// Downloads in flight, by digest.
#[derive(Debug, Default)]
pub struct Inflight {
    map: Mutex<HashMap<Digest, Arc<Download>>>,
    uncacheable: Mutex<HashMap<Digest, Instant>>,
    /// Sizes of the downloads being written (disk space they will take).
    reserved: AtomicU64,
}

/// Disk space held for one download, given back when dropped: however
/// the download ends, and also when the request setting it up is dropped
/// at an await (a client hanging up; a reservation released only on the
/// paths that ran to the end leaked then, until every miss was passed
/// through for a full disk that was not).
#[must_use]
#[derive(Debug)]
pub struct Reservation {
    inflight: Arc<Inflight>,
    /// Bytes still held: the download's size less what it has written.
    size: u64,
    /// The download's size.
    total: u64,
}

impl Reservation {
    /// `written` bytes of the download are on disk. The free space a new
    /// download is checked against already counts them as used, so only
    /// the rest stays reserved; holding the whole size counted them twice,
    /// and a small miss next to a large download half-way through was
    /// passed through (and its digest marked uncacheable) on a disk with
    /// room for it.
    pub fn on_disk(&mut self, written: u64) {
        let remaining = self.total.saturating_sub(written);
        if remaining >= self.size {
            return;
        }
        let freed = self.size - remaining;
        self.size = remaining;
        let _ = self
            .inflight
            .reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                Some(r.saturating_sub(freed))
            });
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let size = self.size;
        let _ = self
            .inflight
            .reserved
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                Some(r.saturating_sub(size))
            });
    }
}

/// Either the caller leads a new download, or joins one in flight.
pub enum Role {
    Leader(Arc<Download>),
    Waiter(Arc<Download>),
}

impl Inflight {
    pub fn join_or_lead(&self, digest: &Digest) -> Role {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = map.get(digest) {
            return Role::Waiter(Arc::clone(d));
        }
        let (tx, _) = watch::channel(Phase::Starting);
        let d = Arc::new(Download { tx });
        map.insert(digest.clone(), Arc::clone(&d));
        Role::Leader(d)
    }

    /// Forgets `download` (only if it is still the one registered).
    pub fn finish(&self, digest: &Digest, download: &Arc<Download>) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(digest).is_some_and(|d| Arc::ptr_eq(d, download)) {
            map.remove(digest);
        }
    }

    /// Downloads in progress (admin status).
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reserves `size` bytes for a download if `fits(already_reserved)`
    /// says the disk has room for them on top of the other downloads in
    /// progress. Check and reservation are one atomic step: concurrent
    /// misses must not all count on the same free space (they did, and a
    /// write then failed with ENOSPC halfway through a shared download).
    pub fn reserve(self: &Arc<Self>, size: u64, fits: impl Fn(u64) -> bool) -> Option<Reservation> {
        let mut current = self.reserved.load(Ordering::Acquire);
        loop {
            if !fits(current) {
                return None;
            }
            match self.reserved.compare_exchange(
                current,
                current.saturating_add(size),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Some(Reservation {
                        inflight: Arc::clone(self),
                        size,
                        total: size,
                    });
                }
                Err(now) => current = now,
            }
        }
    }

    /// Bytes reserved by downloads in progress.
    pub fn reserved(&self) -> u64 {
        self.reserved.load(Ordering::Acquire)
    }

    /// The disk was full while caching `digest`: pass it through for a while.
    pub fn mark_uncacheable(&self, digest: &Digest) {
        let mut m = self.uncacheable.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, at| at.elapsed() < UNCACHEABLE_FOR);
        m.insert(digest.clone(), Instant::now());
    }

    pub fn is_uncacheable(&self, digest: &Digest) -> bool {
        let m = self.uncacheable.lock().unwrap_or_else(|p| p.into_inner());
        m.get(digest)
            .is_some_and(|at| at.elapsed() < UNCACHEABLE_FOR)
    }
}

/// Waits until the download either streams or will not.
pub async fn wait_started(rx: &mut watch::Receiver<Phase>) -> Started {
    loop {
        match &*rx.borrow_and_update() {
            Phase::Streaming(s) => return Started::Streaming(s.clone()),
            Phase::NotStarted { hand_over: true } => return Started::HandedOver,
            Phase::NotStarted { hand_over: false } => return Started::GaveUp,
            Phase::Starting => {}
        }
        if rx.changed().await.is_err() {
            return Started::GaveUp;
        }
    }
}

/// A response body that tails the download's temp file: bytes as they
/// reach the disk, the last one only after verification, an error frame
/// (aborting the response) on failure. If the download is abandoned, the
/// rest comes from `resume` (see the module docs).
pub fn tail(
    rx: watch::Receiver<Phase>,
    stream: &Stream,
    digest: Digest,
    resume: Resume,
    read_timeout: Duration,
    chunk: usize,
) -> Body {
    let st = Tail {
        chunk: chunk as u64,
        rx,
        file: Arc::clone(&stream.file),
        recent: Arc::clone(&stream.recent),
        size: stream.size,
        digest,
        resume: Some(resume),
        read_timeout,
        offset: 0,
        rest: None,
        done: false,
    };
    let stream = futures::stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        match st.next().await {
            Ok(Some(bytes)) => Some((Ok(Frame::data(bytes)), st)),
            Ok(None) => None,
            Err(err) => {
                st.done = true;
                Some((Err(err), st))
            }
        }
    });
    http_body_util::BodyExt::boxed_unsync(StreamBody::new(stream))
}

/// One client's position in a shared download.
struct Tail {
    rx: watch::Receiver<Phase>,
    file: Arc<std::fs::File>,
    recent: Arc<Recent>,
    size: Option<u64>,
    digest: Digest,
    resume: Option<Resume>,
    read_timeout: Duration,
    /// Largest read from the temp file at once.
    chunk: u64,
    /// Bytes sent so far.
    offset: u64,
    /// Set once the download was abandoned and this client went on alone.
    rest: Option<Rest>,
    done: bool,
}

/// The rest of an abandoned download, fetched by one client.
struct Rest {
    body: hyper::body::Incoming,
    hasher: Sha256,
    /// Bytes still to drop from the front (the upstream ignored Range).
    skip: u64,
    /// The last chunk, sent only once the whole body is verified.
    held: Option<Bytes>,
}

impl Tail {
    /// The next chunk to send, `None` at the (verified) end.
    async fn next(&mut self) -> std::io::Result<Option<Bytes>> {
        loop {
            if self.rest.is_some() {
                return self.next_rest().await;
            }
            let (on_disk, outcome) = match &*self.rx.borrow_and_update() {
                Phase::Streaming(s) => (s.on_disk, s.outcome.clone()),
                _ => (
                    0,
                    Some(Outcome::Failed(Arc::from("download did not start"))),
                ),
            };
            // Hold back the last byte of a known size until verified.
            let limit = match (&outcome, self.size) {
                (Some(Outcome::Failed(msg)), _) => {
                    return Err(std::io::Error::other(format!(
                        "blob transfer failed: {msg}"
                    )));
                }
                (Some(Outcome::Verified), _) | (None, None) => on_disk,
                (Some(Outcome::Abandoned { at, .. }), _) => *at,
                (None, Some(size)) => on_disk.min(size.saturating_sub(1)),
            };
            if self.offset < limit {
                // No more at once than a file read: the per-stream bound on
                // what an unread response holds (see `MULTIPLEXED_CHUNK`).
                let capped = limit.min(self.offset.saturating_add(self.chunk));
                if let Some(bytes) = self.recent.get(self.offset, capped) {
                    self.offset += bytes.len() as u64;
                    return Ok(Some(bytes));
                }
                let len = (limit - self.offset).min(self.chunk);
                let buf =
                    crate::http::body::read_chunk(&self.file, self.offset, len as usize).await?;
                self.offset += buf.len() as u64;
                return Ok(Some(Bytes::from(buf)));
            }
            match outcome {
                Some(Outcome::Verified) => return Ok(None),
                Some(Outcome::Abandoned { at, hasher }) => {
                    self.start_rest(at, &hasher).await?;
                    continue;
                }
                _ => {}
            }
            if self.rx.changed().await.is_err() {
                return Err(std::io::Error::other("download ended without an outcome"));
            }
        }
    }

    /// Asks the upstream for the bytes after `at` (this client's own fetch).
    async fn start_rest(&mut self, at: u64, hasher: &Sha256) -> std::io::Result<()> {
        let Some(resume) = self.resume.take() else {
            return Err(std::io::Error::other("resumed twice"));
        };
        let resp = tokio::time::timeout(self.read_timeout, resume(at))
            .await
            .map_err(|_| std::io::Error::other("upstream stalled resuming the blob"))?
            .map_err(|e| std::io::Error::other(format!("resuming the blob at {at}: {e}")))?;
        let skip = resumed_skip(&resp, at, self.size).map_err(std::io::Error::other)?;
        self.rest = Some(Rest {
            body: resp.into_body(),
            hasher: hasher.clone(),
            skip,
            held: None,
        });
        Ok(())
    }

    async fn next_rest(&mut self) -> std::io::Result<Option<Bytes>> {
        let Some(rest) = self.rest.as_mut() else {
            return Ok(None);
        };
        loop {
            let frame = tokio::time::timeout(self.read_timeout, rest.body.frame())
                .await
                .map_err(|_| std::io::Error::other("upstream stalled"))?;
            let mut data = match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(d) => d,
                    Err(_) => continue,
                },
                Some(Err(e)) => {
                    return Err(std::io::Error::other(format!("upstream body failed: {e}")));
                }
                None => {
                    let actual = hex::encode(rest.hasher.clone().finalize());
                    let complete = self.size.is_none_or(|s| s == self.offset);
                    if actual != self.digest.hex() || !complete {
                        return Err(std::io::Error::other(format!(
                            "blob {} failed verification after {} bytes (sha256 {actual})",
                            self.digest, self.offset
                        )));
                    }
                    self.done = true;
                    return Ok(rest.held.take());
                }
            };
            if rest.skip > 0 {
                let n = rest.skip.min(data.len() as u64);
                rest.skip -= n;
                data = data.slice(n as usize..);
            }
            if data.is_empty() {
                continue;
            }
            // Checked as the bytes come, not at the end: once the response
            // has sent its Content-Length, the server drops this body
            // without asking it again, so the verification at the end of
            // an over-long body would never run and bytes never checked
            // would have been sent as the complete blob.
            if let Some(size) = self.size
                && self.offset.saturating_add(data.len() as u64) > size
            {
                return Err(std::io::Error::other(format!(
                    "upstream sent more than the {size} bytes of blob {} resuming it",
                    self.digest
                )));
            }
            rest.hasher.update(&data);
            self.offset += data.len() as u64;
            if let Some(prev) = rest.held.replace(data) {
                return Ok(Some(prev));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::BodyExt as _;
    use hyper_util::rt::TokioIo;
    use sha2::Digest as _;

    use super::*;
    use crate::http::body::Body;

    /// Serves `response` (once per connection, each from `make`) on a
    /// local port; returns its address.
    async fn serve(
        make: impl Fn() -> http::Response<Body> + Send + Sync + 'static,
    ) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let make = Arc::new(make);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let make = Arc::clone(&make);
                let once = Arc::new(Mutex::new(Some(make())));
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(
                    TokioIo::new(tcp),
                    hyper::service::service_fn(move |_| {
                        let resp = once.lock().unwrap().take().unwrap();
                        async move { Ok::<_, std::convert::Infallible>(resp) }
                    }),
                ));
            }
        });
        addr
    }

    /// One GET to `addr` (with `range`, if any), as the upstream's answer.
    async fn get(
        addr: std::net::SocketAddr,
        range: Option<String>,
    ) -> http::Response<hyper::body::Incoming> {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut req = http::Request::get("/").header(http::header::HOST, "upstream");
        if let Some(range) = range {
            req = req.header(http::header::RANGE, range);
        }
        send.send_request(req.body(crate::http::body::empty()).unwrap())
            .await
            .unwrap()
    }

    /// A body sent chunk by chunk, without a length (chunked).
    fn chunked(chunks: Vec<Vec<u8>>) -> Body {
        crate::http::body::stream(futures::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, std::io::Error>(Bytes::from(c))),
        ))
    }

    /// A download of `blob` abandoned after its first `at` bytes (the
    /// disk filled up), tailed by one client whose rest comes from
    /// `upstream`; the client's response as an HTTP/1 server sends it
    /// (Content-Length: the blob's size), read back by a client.
    async fn tail_abandoned(
        blob: &[u8],
        at: usize,
        upstream: std::net::SocketAddr,
    ) -> Result<Bytes, hyper::Error> {
        use std::io::Write as _;
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&blob[..at]).unwrap();
        let stream = Stream {
            file: Arc::new(file),
            recent: Arc::default(),
            size: Some(blob.len() as u64),
            media_type: None,
            on_disk: at as u64,
            outcome: Some(Outcome::Abandoned {
                at: at as u64,
                hasher: Arc::new(Sha256::new_with_prefix(&blob[..at])),
            }),
        };
        let (_tx, rx) = watch::channel(Phase::Streaming(stream.clone()));
        let resume: Resume = Arc::new(move |from: u64| {
            Box::pin(async move { Ok(get(upstream, Some(format!("bytes={from}-"))).await) })
        });
        let body = tail(
            rx,
            &stream,
            Digest::of(blob),
            resume,
            Duration::from_secs(5),
            65536,
        );
        let size = blob.len();
        let body = Mutex::new(Some(body));
        let proxy = serve(move || {
            let mut resp = http::Response::new(body.lock().unwrap().take().unwrap());
            resp.headers_mut()
                .insert(http::header::CONTENT_LENGTH, size.into());
            resp
        })
        .await;
        get(proxy, None)
            .await
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
    }

    /// After a disk-full abandon, an upstream whose rest runs past the
    /// blob's size is refused as it streams and the client's response is
    /// aborted. Checked only at the end, the server's Content-Length cut
    /// the over-long body at the blob's size and ended it cleanly: wrong
    /// bytes, never verified, sent as the complete blob.
    #[tokio::test]
    async fn an_overlong_resumed_rest_aborts_the_response() {
        let blob: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let at = 100_000;
        // The right length of wrong bytes, then more: the first chunk
        // fills the Content-Length exactly.
        let wrong = vec![0xAB; blob.len() - at];
        let range = format!("bytes {at}-{}/{}", blob.len() - 1, blob.len());
        let upstream = serve(move || {
            let mut resp = http::Response::new(chunked(vec![wrong.clone(), vec![0xCD; 1000]]));
            *resp.status_mut() = http::StatusCode::PARTIAL_CONTENT;
            resp.headers_mut()
                .insert(http::header::CONTENT_RANGE, range.parse().unwrap());
            resp
        })
        .await;
        let got = tail_abandoned(&blob, at, upstream).await;
        assert!(
            got.is_err(),
            "an unverified body ended cleanly ({} bytes, right: {})",
            got.as_ref().map_or(0, |b| b.len()),
            got.as_ref().is_ok_and(|b| b[..] == blob[..]),
        );
    }

    /// The rest resumed with the right bytes still completes the blob.
    #[tokio::test]
    async fn a_resumed_rest_completes_the_blob() {
        let blob: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let at = 100_000;
        let rest = blob[at..].to_vec();
        let range = format!("bytes {at}-{}/{}", blob.len() - 1, blob.len());
        let upstream = serve(move || {
            let mut resp =
                http::Response::new(chunked(rest.chunks(30_000).map(<[u8]>::to_vec).collect()));
            *resp.status_mut() = http::StatusCode::PARTIAL_CONTENT;
            resp.headers_mut()
                .insert(http::header::CONTENT_RANGE, range.parse().unwrap());
            resp
        })
        .await;
        let got = tail_abandoned(&blob, at, upstream).await.unwrap();
        assert!(got[..] == blob[..]);
    }

    /// A resumed answer whose head already says it does not end at the
    /// blob's end (range, total or length) is refused before any of its
    /// bytes is sent.
    #[test]
    fn a_resumed_answer_must_end_at_the_blobs_end() {
        let answer = |status: u16, range: Option<&str>, length: Option<u64>| {
            let mut resp = http::Response::new(());
            *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
            if let Some(range) = range {
                resp.headers_mut()
                    .insert(http::header::CONTENT_RANGE, range.parse().unwrap());
            }
            if let Some(length) = length {
                resp.headers_mut()
                    .insert(http::header::CONTENT_LENGTH, length.into());
            }
            resp
        };
        let size = Some(1000);
        for (resp, want) in [
            (answer(206, Some("bytes 400-999/1000"), Some(600)), Some(0)),
            (answer(206, Some("bytes 400-999/*"), None), Some(0)),
            (answer(200, None, Some(1000)), Some(400)),
            (answer(200, None, None), Some(400)),
            (answer(206, Some("bytes 300-999/1000"), None), None),
            (answer(206, Some("bytes 400-1099/1100"), None), None),
            (answer(206, Some("bytes 400-999/1100"), None), None),
            (answer(206, Some("bytes 400-899/1000"), None), None),
            (answer(206, Some("bytes 400-999/1000"), Some(700)), None),
            (answer(206, Some("bytes 400-999/*"), Some(700)), None),
            (answer(206, None, None), None),
            (answer(200, None, Some(1100)), None),
            (answer(404, None, None), None),
        ] {
            let got = resumed_skip(&resp, 400, size);
            assert_eq!(got.as_ref().ok().copied(), want, "{resp:?}: {got:?}");
        }
        // Without a known size, only a range that stops short is wrong.
        let rest = answer(206, Some("bytes 400-1099/1100"), Some(700));
        assert_eq!(resumed_skip(&rest, 400, None), Ok(0));
        let short = answer(206, Some("bytes 400-899/1100"), None);
        assert!(resumed_skip(&short, 400, None).is_err());
    }

    /// The frames a client tailing a verified download in memory is sent,
    /// read `chunk` bytes at a time.
    async fn tail_frames(batch: &Bytes, chunk: usize) -> Vec<Bytes> {
        use std::io::Write as _;
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(batch).unwrap();
        let recent = Arc::new(Recent::default());
        recent.push(0, batch.clone());
        let stream = Stream {
            file: Arc::new(file),
            recent,
            size: Some(batch.len() as u64),
            media_type: None,
            on_disk: batch.len() as u64,
            outcome: Some(Outcome::Verified),
        };
        let (_tx, rx) = watch::channel(Phase::Streaming(stream.clone()));
        let resume: Resume = Arc::new(|_| Box::pin(async { Err("not abandoned".to_string()) }));
        let mut body = tail(
            rx,
            &stream,
            Digest::of(batch),
            resume,
            Duration::from_secs(5),
            chunk,
        );
        let mut frames = Vec::new();
        while let Some(frame) = body.frame().await {
            frames.push(frame.unwrap().into_data().unwrap());
        }
        frames
    }

    /// Bytes still in memory are sent no more than a chunk at a time, as
    /// from the file: a whole writer batch (256 KiB and more) handed to a
    /// stalled HTTP/2 stream was four times the 64 KiB it may hold. A
    /// short piece is copied out rather than keeping its batch allocated;
    /// HTTP/1's batch-sized chunk is still the written buffer itself.
    #[tokio::test]
    async fn bytes_in_memory_are_sent_a_chunk_at_a_time() {
        let batch = Bytes::from(
            (0..300 * 1024u32)
                .map(|i| (i % 251) as u8)
                .collect::<Vec<_>>(),
        );
        let in_batch = |b: &Bytes| {
            let base = batch.as_ptr() as usize;
            (base..base + batch.len()).contains(&(b.as_ptr() as usize))
        };
        for chunk in [
            crate::http::body::MULTIPLEXED_CHUNK,
            crate::http::body::FILE_CHUNK,
        ] {
            let frames = tail_frames(&batch, chunk).await;
            let lens: Vec<usize> = frames.iter().map(Bytes::len).collect();
            assert!(lens.iter().all(|&n| n <= chunk), "chunk {chunk}: {lens:?}");
            assert_eq!(frames.concat(), batch[..], "chunk {chunk}");
            let sliced: Vec<bool> = frames.iter().map(in_batch).collect();
            let want_sliced = chunk * 2 >= batch.len();
            assert_eq!(sliced[0], want_sliced, "chunk {chunk}: {lens:?} {sliced:?}");
            assert!(
                frames
                    .iter()
                    .zip(&sliced)
                    .all(|(f, &s)| !s || f.len() * 2 >= batch.len()),
                "a short slice keeps its batch: {lens:?} {sliced:?}"
            );
        }
    }

    /// Written bytes are used space the free-space check already sees:
    /// the reservation keeps only the rest.
    #[test]
    fn a_reservation_holds_only_what_is_not_written_yet() {
        let inflight = Arc::new(Inflight::default());
        let mut held = inflight.reserve(100, |_| true).unwrap();
        held.on_disk(60);
        assert_eq!(inflight.reserved(), 40);
        // Progress never grows it back, nor past the size.
        held.on_disk(30);
        assert_eq!(inflight.reserved(), 40);
        held.on_disk(500);
        assert_eq!(inflight.reserved(), 0);
        drop(held);
        assert_eq!(inflight.reserved(), 0);
    }

    /// Disk space reserved by a request that is dropped at an await (its
    /// client hung up while the download was set up) comes back: once it
    /// leaked, and enough leaks passed every miss through as if the disk
    /// were full.
    #[tokio::test]
    async fn a_reservation_comes_back_when_its_request_is_dropped_midway() {
        let inflight = Arc::new(Inflight::default());
        let fits = |others: u64| others + 100 <= 150;
        let held = inflight.reserve(100, fits);
        assert!(held.is_some());
        assert_eq!(inflight.reserved(), 100);
        assert!(inflight.reserve(100, fits).is_none(), "no room for two");
        drop(held);
        assert_eq!(inflight.reserved(), 0);

        let i = Arc::clone(&inflight);
        let mut setup = Box::pin(async move {
            let _held = i.reserve(100, fits);
            std::future::pending::<()>().await;
        });
        assert!(futures::poll!(&mut setup).is_pending());
        assert_eq!(inflight.reserved(), 100);
        drop(setup);
        assert_eq!(inflight.reserved(), 0);
        assert!(inflight.reserve(100, fits).is_some());
    }
}

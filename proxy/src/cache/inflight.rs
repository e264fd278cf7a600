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

use std::collections::HashMap;
use std::os::unix::fs::FileExt as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::StreamBody;
use hyper::body::Frame;
use tokio::sync::watch;

use crate::body::Body;
use crate::oci::Digest;

/// Largest chunk a waiter reads from the temp file at once.
const READ_CHUNK: u64 = 256 * 1024;

/// What a download is doing.
#[derive(Debug, Clone)]
pub enum Phase {
    /// The leader is asking the upstream.
    Starting,
    /// Bytes are arriving; `on_disk` of them can be read from `file`.
    Streaming(Stream),
    /// The upstream did not send the blob (the leader relays its answer);
    /// waiters fetch on their own.
    NotStarted,
}

#[derive(Debug, Clone)]
pub struct Stream {
    pub file: Arc<std::fs::File>,
    pub size: Option<u64>,
    pub media_type: Option<String>,
    pub on_disk: u64,
    /// `Some(Ok)` once committed (verified), `Some(Err)` once failed.
    pub outcome: Option<Result<(), Arc<str>>>,
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

    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Reserves `size` bytes for a download if `fits(already_reserved)`
    /// says the disk has room for them on top of the other downloads in
    /// progress. Check and reservation are one atomic step: concurrent
    /// misses must not all count on the same free space (they did, and a
    /// write then failed with ENOSPC halfway through a shared download).
    pub fn try_reserve(&self, size: u64, fits: impl Fn(u64) -> bool) -> bool {
        let mut current = self.reserved.load(Ordering::Acquire);
        loop {
            if !fits(current) {
                return false;
            }
            match self.reserved.compare_exchange(
                current,
                current.saturating_add(size),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => current = now,
            }
        }
    }

    pub fn release(&self, size: u64) {
        let _ = self
            .reserved
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                Some(r.saturating_sub(size))
            });
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

/// Waits until the download either streams (`Some`) or will not
/// (`None`: the caller fetches on its own).
pub async fn wait_started(rx: &mut watch::Receiver<Phase>) -> Option<Stream> {
    loop {
        match &*rx.borrow_and_update() {
            Phase::Streaming(s) => return Some(s.clone()),
            Phase::NotStarted => return None,
            Phase::Starting => {}
        }
        if rx.changed().await.is_err() {
            return None;
        }
    }
}

/// A response body that tails the download's temp file: bytes as they
/// reach the disk, the last one only after verification, an error frame
/// (aborting the response) on failure.
pub fn tail(rx: watch::Receiver<Phase>, file: Arc<std::fs::File>, size: Option<u64>) -> Body {
    struct St {
        rx: watch::Receiver<Phase>,
        file: Arc<std::fs::File>,
        size: Option<u64>,
        offset: u64,
        done: bool,
    }
    let st = St {
        rx,
        file,
        size,
        offset: 0,
        done: false,
    };
    let stream = futures::stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        loop {
            let (on_disk, outcome) = match &*st.rx.borrow_and_update() {
                Phase::Streaming(s) => (s.on_disk, s.outcome.clone()),
                _ => (0, Some(Err(Arc::from("download did not start")))),
            };
            let verified = matches!(outcome, Some(Ok(())));
            if let Some(Err(msg)) = &outcome {
                st.done = true;
                let err = std::io::Error::other(format!("blob transfer failed: {msg}"));
                return Some((Err(err), st));
            }
            // Hold back the last byte of a known size until verified.
            let limit = match (verified, st.size) {
                (true, _) | (false, None) => on_disk,
                (false, Some(size)) => on_disk.min(size.saturating_sub(1)),
            };
            if st.offset < limit {
                let len = (limit - st.offset).min(READ_CHUNK);
                let (file, offset) = (Arc::clone(&st.file), st.offset);
                let read = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; len as usize];
                    file.read_exact_at(&mut buf, offset).map(|()| buf)
                })
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r);
                return match read {
                    Ok(buf) => {
                        st.offset += buf.len() as u64;
                        Some((Ok(Frame::data(Bytes::from(buf))), st))
                    }
                    Err(e) => {
                        st.done = true;
                        Some((Err(e), st))
                    }
                };
            }
            if verified {
                return None;
            }
            if st.rx.changed().await.is_err() {
                st.done = true;
                let err = std::io::Error::other("download ended without an outcome");
                return Some((Err(err), st));
            }
        }
    });
    http_body_util::BodyExt::boxed_unsync(StreamBody::new(stream))
}

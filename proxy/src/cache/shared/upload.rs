//! Copies blobs this replica fetched from the upstream into the shared
//! tier, in the background, once they are committed (verified) on the
//! local disk: the client is never held by the upload, and only a replica
//! that got the bytes from the upstream uploads them (one copied from the
//! tier or from a peer is already there or on its way).
//!
//! An upload the store fails (an error, a timeout, `SlowDown`) goes back
//! in the queue after a wait that doubles with each try, a few times:
//! given up at once, a blob fetched while the bucket hiccupped never
//! reached it, and every other replica fetched it from the upstream
//! again.
//!
//! A purge can overtake an upload: the upload reads the file its lease
//! opened, so removing the blob from the disk does not stop it, and
//! completed after the purge deleted the bucket's copy it would put the
//! content back for every replica to refill from. A purge therefore marks
//! the uploads of its digests in flight ([`Uploads::withdraw`]), and one
//! so marked deletes what it completed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use tokio::sync::Semaphore;

use super::EvictStats;
use super::{SharedTier, TierError};
use crate::cache::store::{CachedBlob, Unleased};
use crate::observe::metric_labels::UploadResult;
use crate::observe::metrics::{EvictorFigures, SharedFigures};
use crate::oci::Digest;

/// Uploads running at once; each buffers up to `PART × PARTS_IN_FLIGHT`.
const CONCURRENT: usize = 4;
/// Uploads waiting for a slot; past it new ones are dropped (counted), so
/// a burst of misses cannot queue unbounded tasks. A waiting upload holds
/// no lease (a slow bucket must not keep the local disk from evicting);
/// one whose blob was evicted before its turn is dropped.
const QUEUED: usize = 1024;
/// Read size from the local file.
const CHUNK: usize = 1 << 20;
/// Tries of one upload before it is given up (counted failed).
const TRIES: u32 = 5;
/// Wait before the second try, doubled before each further one (2, 4,
/// 8, 16 s: a bucket that throttles or fails for half a minute still
/// gets the blob).
const RETRY_AFTER: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct Uploads {
    tier: Arc<SharedTier>,
    slots: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    in_flight: Arc<InFlight>,
    pub stats: Arc<UploadStats>,
}

/// The digests uploads are working on (from just before they hold the
/// blob until they are done), each with whether a purge withdrew it
/// meanwhile. At most one entry per running upload.
#[derive(Debug, Default)]
struct InFlight(Mutex<HashMap<Digest, (usize, Arc<AtomicBool>)>>);

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, (usize, Arc<AtomicBool>)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn enter(self: &Arc<Self>, digest: &Digest) -> Working {
        let mut map = self.lock();
        let (n, withdrawn) = map
            .entry(digest.clone())
            .or_insert_with(|| (0, Arc::default()));
        *n += 1;
        Working {
            in_flight: Arc::clone(self),
            digest: digest.clone(),
            withdrawn: Arc::clone(withdrawn),
        }
    }
}

/// An upload's place in [`InFlight`], left on drop.
struct Working {
    in_flight: Arc<InFlight>,
    digest: Digest,
    withdrawn: Arc<AtomicBool>,
}

impl Drop for Working {
    fn drop(&mut self) {
        let mut map = self.in_flight.lock();
        if let Some((n, _)) = map.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.digest);
            }
        }
    }
}

#[derive(Debug, Default)]
pub struct UploadStats {
    pub uploaded: AtomicU64,
    pub uploaded_bytes: AtomicU64,
    pub already_there: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
}

impl Uploads {
    pub fn new(tier: Arc<SharedTier>) -> Self {
        Self {
            tier,
            slots: Arc::new(Semaphore::new(CONCURRENT)),
            waiting: Arc::default(),
            in_flight: Arc::default(),
            stats: Arc::default(),
        }
    }

    /// A purge removed `digest`: an upload of it under way deletes what it
    /// completes. Call after the blob left the local disk (an upload not
    /// yet holding it then finds it gone) and before the bucket's copy is
    /// deleted (one that completed earlier is deleted with it). True when
    /// an upload was under way.
    pub fn withdraw(&self, digest: &Digest) -> bool {
        match self.in_flight.lock().get(digest) {
            Some((_, withdrawn)) => {
                withdrawn.store(true, Ordering::Release);
                true
            }
            None => false,
        }
    }

    pub fn tier(&self) -> &Arc<SharedTier> {
        &self.tier
    }

    /// Totals for the metrics.
    pub fn figures(&self, evictions: Option<&EvictStats>) -> SharedFigures {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let s = &self.stats;
        SharedFigures {
            up: self.tier.health().is_up(),
            errors: self.tier.health().errors(),
            uploads: [
                (UploadResult::uploaded, n(&s.uploaded)),
                (UploadResult::already_there, n(&s.already_there)),
                (UploadResult::failed, n(&s.failed)),
                (UploadResult::dropped, n(&s.dropped)),
            ],
            uploaded_bytes: n(&s.uploaded_bytes),
            evictor: evictions.map(|e| EvictorFigures {
                holder: e.holder.load(Ordering::Relaxed),
                bucket_bytes: n(&e.bucket_bytes),
                evictions: n(&e.evictions),
                evicted_bytes: n(&e.evicted_bytes),
            }),
        }
    }

    /// Queues `blob` for upload; it is held again (leased) only once a
    /// slot is free.
    pub fn submit(&self, blob: CachedBlob) {
        let Some(queued) = blob.unleased() else {
            // Not a committed blob of the store: nothing to hold it by.
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= QUEUED {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(digest = %queued.digest(), "shared storage upload queue full; blob stays local only");
            return;
        }
        let queue = Queue {
            tier: Arc::clone(&self.tier),
            slots: Arc::clone(&self.slots),
            waiting: Arc::clone(&self.waiting),
            in_flight: Arc::clone(&self.in_flight),
            stats: Arc::clone(&self.stats),
        };
        tokio::spawn(queue.run(queued));
    }
}

/// What one queued upload needs of the queue.
struct Queue {
    tier: Arc<SharedTier>,
    slots: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    in_flight: Arc<InFlight>,
    stats: Arc<UploadStats>,
}

impl Queue {
    /// Waits for a slot, uploads, and on a failure of the store waits and
    /// queues again (holding neither slot nor lease meanwhile), up to
    /// [`TRIES`] times. Counted once `waiting` (done by `submit`).
    async fn run(self, mut queued: Unleased) {
        let Self {
            tier,
            slots,
            waiting,
            in_flight,
            stats,
        } = self;
        let mut wait = RETRY_AFTER;
        let mut tried: u32 = 0;
        loop {
            tried += 1;
            let permit = Arc::clone(&slots).acquire_owned().await;
            waiting.fetch_sub(1, Ordering::AcqRel);
            let Ok(permit) = permit else { return };
            let digest = queued.digest().clone();
            // Before the lease: a purge between the two either finds this
            // entry to mark or removed the blob before the lease.
            let working = in_flight.enter(&digest);
            let blob = match queued.lease().await {
                Ok(Some(blob)) => blob,
                Ok(None) => {
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%digest, "evicted from the local disk before its upload; not copied to shared storage");
                    return;
                }
                Err(err) => {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%digest, error = %err, "blob not copied to shared storage; it stays in the local cache");
                    return;
                }
            };
            let err = match upload(&tier, &blob).await {
                Ok(Some(bytes)) => {
                    stats.uploaded.fetch_add(1, Ordering::Relaxed);
                    stats.uploaded_bytes.fetch_add(bytes, Ordering::Relaxed);
                    tracing::debug!(%digest, bytes, to = tier.location(), "blob copied to shared storage");
                    if working.withdrawn.load(Ordering::Acquire) {
                        undo(&tier, &digest).await;
                    }
                    return;
                }
                Ok(None) => {
                    stats.already_there.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(err) => err,
            };
            drop(permit);
            drop(working);
            if !err.is_transient() || tried >= TRIES {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%digest, error = %err, tries = tried, "blob not copied to shared storage; it stays in the local cache");
                return;
            }
            // Back in the queue, within its bound: a bucket failing every
            // upload must not pile up waiting tasks.
            let Some(again) = blob.unleased() else {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                return;
            };
            if waiting.fetch_add(1, Ordering::AcqRel) >= QUEUED {
                waiting.fetch_sub(1, Ordering::AcqRel);
                stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%digest, error = %err, "blob not copied to shared storage and the upload queue is full; it stays in the local cache");
                return;
            }
            tracing::info!(%digest, error = %err, retry_in_ms = wait.as_millis() as u64,
                "copying a blob to shared storage failed; trying again");
            tokio::time::sleep(wait).await;
            wait = wait.saturating_mul(2);
            queued = again;
        }
    }
}

/// Deletes the copy an upload completed after a purge withdrew its blob.
async fn undo(tier: &SharedTier, digest: &Digest) {
    match tier.delete(digest).await {
        Ok(()) => tracing::info!(%digest,
            "blob purged while it was copied to shared storage; deleted there again"),
        Err(err) => tracing::warn!(%digest, error = %err,
            "blob purged while it was copied to shared storage, and deleting it there again failed; purge it again"),
    }
}

/// `Ok(None)`: another replica put it there already.
async fn upload(tier: &SharedTier, blob: &CachedBlob) -> Result<Option<u64>, TierError> {
    if tier.stat_background(&blob.digest).await?.is_some() {
        return Ok(None);
    }
    let path = blob.path.clone();
    // The handle the lease opened (a purge meanwhile leaves it readable).
    // A duplicate shares its offset, which only this stream moves: every
    // other reader of a blob's file reads at positions.
    let file = blob
        .file
        .try_clone()
        .map(tokio::fs::File::from_std)
        .map_err(|source| TierError::File {
            path: path.display().to_string(),
            source,
        })?;
    let shown = path.display().to_string();
    let body = tokio_util::io::ReaderStream::with_capacity(file, CHUNK)
        .map_err(move |source| TierError::File {
            path: shown.clone(),
            source,
        })
        .boxed();
    tier.upload(&blob.digest, &blob.meta, body).await.map(Some)
}

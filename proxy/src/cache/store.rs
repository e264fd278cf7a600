//! Content-addressed blob store on disk.
//!
//! One copy per digest, shared by every registry. Layout under `data_dir`:
//!
//! ```text
//! blobs/sha256/<first 2 hex>/<hex>        committed, verified content
//! blobs/sha256/<first 2 hex>/<hex>.json   its BlobMeta sidecar
//! tmp/                                    in-progress writes (wiped by `open`)
//! ```
//!
//! A blob is written to a uniquely named file in `tmp/` while its sha256 is
//! computed; only when the hash matches the expected digest is it fsynced
//! and renamed into place (meta sidecar first, then the data file, then the
//! directory is fsynced). A reader therefore only ever sees whole, verified
//! files. Every path is built from the validated `Digest` hex, so nothing is
//! written outside `data_dir`.
//!
//! Hashing and file writes run on tokio's blocking pool, in batches of up
//! to 256 KiB (see `writer`), so the async workers only copy chunks into
//! a buffer. The index of committed blobs and eviction are in `index`.

mod index;
#[cfg(test)]
mod tests;
mod writer;

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use sha2::{Digest as _, Sha256};

pub use index::{Entry, Index};
use index::{SMALL_MAX, evict, rebuild_index};
pub use writer::BlobWriter;
use writer::{Sink, TempFile, existing};

use crate::oci::Digest;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {action} {}: {source}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("blob {expected} failed verification: the {bytes} bytes received hash to {actual}")]
    DigestMismatch {
        expected: Digest,
        actual: Digest,
        bytes: u64,
    },
    /// The content was verified but could not be put in place (disk full
    /// while fsyncing, writing the sidecar, renaming): the bytes read so far
    /// from the temp file are right, nothing is cached.
    #[error("verified blob {digest} could not be committed: {source}")]
    NotCommitted {
        digest: Digest,
        #[source]
        source: Box<StoreError>,
    },
    #[error("the writer of {digest} is unusable: an earlier write failed or was cancelled")]
    WriterBroken { digest: Digest },
    #[error("background task to {action} {} failed: {source}", .path.display())]
    Task {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: tokio::task::JoinError,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io {
        action,
        path,
        source,
    }
}

/// Runs blocking file work on tokio's blocking pool.
async fn blocking<T, F>(action: &'static str, path: &Path, f: F) -> Result<T, StoreError>
where
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(source) => Err(StoreError::Task {
            action,
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// What is kept beside a blob so a HIT is answered like the original.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlobMeta {
    pub media_type: Option<String>,
}

/// A committed, verified blob. While any clone of it (its lease) lives,
/// the blob is not evicted.
#[derive(Debug, Clone)]
pub struct CachedBlob {
    pub digest: Digest,
    pub path: PathBuf,
    /// The size of `file`.
    pub size: u64,
    pub meta: BlobMeta,
    pub lease: Option<Arc<Lease>>,
    /// The data file, opened when the blob was found (or committed). Read
    /// it, not `path`: a purge removes a blob whatever its lease, and
    /// between a lookup and the read (an access check asking the upstream)
    /// a path opened anew was gone, and a HIT answered 500. Opened, its
    /// bytes stay readable to the end.
    pub file: Arc<fs::File>,
}

/// Keeps one blob from eviction while it is read.
#[derive(Debug)]
pub struct Lease {
    index: Arc<Mutex<Index>>,
    digest: Digest,
    /// The entry's generation when leased: only that entry is released.
    generation: u64,
}

/// A lease on an indexed blob (None if it is not in the index), taken
/// with `index` (the lock of `shared`) held.
fn lease_locked(
    index: &mut Index,
    shared: &Arc<Mutex<Index>>,
    digest: &Digest,
) -> Option<Arc<Lease>> {
    let entry = index.entries.get_mut(digest)?;
    entry.readers += 1;
    Some(Arc::new(Lease {
        index: Arc::clone(shared),
        digest: digest.clone(),
        generation: entry.generation,
    }))
}

/// [`lease_locked`], taking the lock.
fn lease(shared: &Arc<Mutex<Index>>, digest: &Digest) -> Option<Arc<Lease>> {
    let mut index = shared.lock().unwrap_or_else(|p| p.into_inner());
    lease_locked(&mut index, shared, digest)
}

/// A committed blob without a hold on it, for a queue to keep while it
/// waits: waiting pins no disk (nor does an open file, which would keep
/// an evicted blob's space), and [`Unleased::lease`] holds and opens it
/// again when its turn comes (if it was not evicted meanwhile).
#[derive(Debug)]
pub struct Unleased {
    digest: Digest,
    path: PathBuf,
    meta: BlobMeta,
    index: Arc<Mutex<Index>>,
}

impl CachedBlob {
    /// Lets go of the lease and the file (`None` for a blob that had no
    /// lease).
    pub fn unleased(mut self) -> Option<Unleased> {
        let index = Arc::clone(&self.lease.take()?.index);
        Some(Unleased {
            digest: self.digest,
            path: self.path,
            meta: self.meta,
            index,
        })
    }
}

impl Unleased {
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// The blob, held and opened again; `None` once it was evicted (or
    /// purged).
    pub async fn lease(self) -> Result<Option<CachedBlob>, StoreError> {
        let Some(lease) = lease(&self.index, &self.digest) else {
            return Ok(None);
        };
        let path = self.path.clone();
        let opened = blocking("open", &self.path, move || writer::open_data(&path)).await?;
        Ok(opened.map(|(file, size)| CachedBlob {
            digest: self.digest,
            path: self.path,
            size,
            meta: self.meta,
            lease: Some(lease),
            file: Arc::new(file),
        }))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        // The digest removed (purged) and committed again since: that
        // entry's readers are others', and releasing one of them would
        // let eviction delete a file being served.
        if let Some(e) = index.entries.get_mut(&self.digest)
            && e.generation == self.generation
        {
            e.readers = e.readers.saturating_sub(1);
        }
    }
}

/// Size bound of the store.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    /// None: unbounded.
    pub max_size: Option<u64>,
    pub high_watermark: f64,
    pub low_watermark: f64,
}

impl Limits {
    fn high(&self) -> Option<u64> {
        self.max_size
            .map(|m| (m as f64 * self.high_watermark) as u64)
    }
    fn low(&self) -> Option<u64> {
        self.max_size
            .map(|m| (m as f64 * self.low_watermark) as u64)
    }
}

/// Counters the store keeps for metrics and the admin API.
#[derive(Debug, Default)]
pub struct StoreStats {
    pub evictions: AtomicU64,
    pub evicted_bytes: AtomicU64,
}

/// Shared state behind the store and its writers.
#[derive(Debug)]
struct Inner {
    layout: Layout,
    index: Arc<Mutex<Index>>,
    limits: Limits,
    stats: StoreStats,
    /// Held while files are renamed into place or removed, so an eviction
    /// never deletes a file a concurrent commit just put back.
    fs_lock: Mutex<()>,
    /// Digests eviction skips (`cache::pins`); `None` while pins exist
    /// but are not resolved yet: until then nothing is evicted, so a
    /// restart never deletes what the pins hold before it knows them...
    pinned: arc_swap::ArcSwapOption<HashSet<Digest>>,
    /// ...but only until then ([`crate::cache::pins::PINS_WAIT`] after
    /// open), so pins that never resolve do not fill the disk.
    pins_wait_until: Mutex<Instant>,
}

#[derive(Debug)]
struct Layout {
    /// `<data_dir>/blobs/sha256`
    blobs: PathBuf,
    /// `<data_dir>/tmp`
    tmp: PathBuf,
}

impl Layout {
    fn shard(&self, d: &Digest) -> PathBuf {
        self.blobs.join(&d.hex()[..2])
    }
    fn data(&self, d: &Digest) -> PathBuf {
        self.shard(d).join(d.hex())
    }
    fn meta(&self, d: &Digest) -> PathBuf {
        self.shard(d).join(format!("{}.json", d.hex()))
    }
    /// A fresh, process-unique temp path (also unique across processes via
    /// pid and clock; files are created with `create_new` regardless).
    fn temp(&self, d: &Digest, suffix: &str) -> PathBuf {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.subsec_nanos());
        self.tmp.join(format!(
            "{}.{}.{n}.{nanos}.{suffix}",
            d.hex(),
            std::process::id()
        ))
    }
}

/// The content-addressed store. Cheap to share in an `Arc`.
#[derive(Debug)]
pub struct BlobStore {
    inner: Arc<Inner>,
}

impl BlobStore {
    /// [`open_with`](Self::open_with) without a size bound.
    #[cfg(test)]
    pub async fn open(data_dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(data_dir, Limits::default(), false).await
    }

    /// Layout: `<data_dir>/blobs/sha256/<first 2 hex>/<hex>` (+ `<hex>.json`
    /// meta), temp files in `<data_dir>/tmp/`. Creates the dirs (all 256
    /// shards up front); removes every leftover temp file (crash recovery)
    /// and logs how many; rebuilds the index (size and last access of
    /// every blob) from the files. With `awaits_pins`, eviction waits for
    /// the first [`pin`](Self::pin).
    pub async fn open_with(
        data_dir: &Path,
        limits: Limits,
        awaits_pins: bool,
    ) -> Result<Self, StoreError> {
        let layout = Layout {
            blobs: data_dir.join("blobs").join("sha256"),
            tmp: data_dir.join("tmp"),
        };
        let (blobs, tmp) = (layout.blobs.clone(), layout.tmp.clone());
        let removed = blocking("create the store in", data_dir, move || {
            for i in 0..=255u8 {
                let shard = blobs.join(format!("{i:02x}"));
                fs::create_dir_all(&shard).map_err(io_err("create", &shard))?;
            }
            fsync_dir(&blobs)?;
            fs::create_dir_all(&tmp).map_err(io_err("create", &tmp))?;
            let mut removed = 0usize;
            for entry in fs::read_dir(&tmp).map_err(io_err("list", &tmp))? {
                let path = entry.map_err(io_err("list", &tmp))?.path();
                let is_dir = fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
                let r = if is_dir {
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                };
                match r {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err("remove leftover temp file", &path)(e)),
                }
            }
            Ok(removed)
        })
        .await?;
        if removed > 0 {
            tracing::info!(removed, dir = %layout.tmp.display(), "removed leftover temp files");
        } else {
            tracing::debug!(dir = %layout.tmp.display(), "no leftover temp files");
        }
        let started = Instant::now();
        let blobs = layout.blobs.clone();
        let index = blocking("index", data_dir, move || rebuild_index(&blobs)).await?;
        tracing::info!(
            entries = index.entries.len(),
            bytes = index.total,
            ms = started.elapsed().as_millis() as u64,
            "cache index rebuilt"
        );
        let store = Self {
            inner: Arc::new(Inner {
                layout,
                index: Arc::new(Mutex::new(index)),
                limits,
                stats: StoreStats::default(),
                fs_lock: Mutex::new(()),
                pinned: arc_swap::ArcSwapOption::new(
                    (!awaits_pins).then(|| Arc::new(HashSet::new())),
                ),
                pins_wait_until: Mutex::new(Instant::now() + crate::cache::pins::PINS_WAIT),
            }),
        };
        let inner = Arc::clone(&store.inner);
        blocking("evict from", data_dir, move || {
            evict(&inner);
            Ok(())
        })
        .await?;
        Ok(store)
    }

    /// From now on eviction skips `digests` (the pinned images' manifests
    /// and blobs), and an eviction pass runs: commits evict as they land,
    /// but those that landed while the pins were unresolved (after a
    /// restart) or pinned what is not pinned any more evicted nothing,
    /// and without another commit the cache would stay over its bound.
    pub fn pin(&self, digests: Arc<HashSet<Digest>>) {
        self.inner.pinned.store(Some(digests));
        let inner = Arc::clone(&self.inner);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(move || evict(&inner));
            }
            Err(_) => evict(&inner),
        }
    }

    /// Eviction stops waiting for the pins at `at` instead.
    #[cfg(test)]
    pub(crate) fn wait_for_pins_until(&self, at: Instant) {
        *self
            .inner
            .pins_wait_until
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = at;
    }

    /// Bytes and entries committed.
    pub fn usage(&self) -> (u64, usize) {
        let index = self.inner.index.lock().unwrap_or_else(|p| p.into_inner());
        (index.total, index.entries.len())
    }

    pub fn limits(&self) -> Limits {
        self.inner.limits
    }

    pub fn stats(&self) -> &StoreStats {
        &self.inner.stats
    }

    /// The directory temp files are written to.
    pub fn tmp_dir(&self) -> &Path {
        &self.inner.layout.tmp
    }

    /// Every committed blob with its size and last access.
    pub fn entries(&self) -> Vec<(Digest, Entry)> {
        let index = self.inner.index.lock().unwrap_or_else(|p| p.into_inner());
        index
            .entries
            .iter()
            .map(|(d, e)| (d.clone(), e.clone()))
            .collect()
    }

    /// Size and last access of one blob.
    pub fn entry(&self, digest: &Digest) -> Option<Entry> {
        let index = self.inner.index.lock().unwrap_or_else(|p| p.into_inner());
        index.entries.get(digest).cloned()
    }

    /// A committed blob, or None. Never returns a partial file. (A missing
    /// meta sidecar gives the default meta.)
    ///
    /// A found blob carries a lease: it is not evicted until every clone of
    /// it is dropped, and its last access is now.
    pub async fn lookup(&self, digest: &Digest) -> Result<Option<CachedBlob>, StoreError> {
        let lease = {
            let mut index = self.inner.index.lock().unwrap_or_else(|p| p.into_inner());
            let Some(lease) = lease_locked(&mut index, &self.inner.index, digest) else {
                return Ok(None);
            };
            if let Some(e) = index.entries.get_mut(digest) {
                e.last_access = SystemTime::now();
            }
            lease
        };
        let inner = Arc::clone(&self.inner);
        let d = digest.clone();
        let path = self.inner.layout.data(digest);
        let found = blocking("look up", &path, move || existing(&inner.layout, &d)).await?;
        match found {
            Some(mut b) => {
                b.lease = Some(lease);
                Ok(Some(b))
            }
            None => {
                // Gone behind the index's back (removed by hand). Not an
                // entry committed again meanwhile: its file is there.
                let generation = lease.generation;
                drop(lease);
                let mut index = self.inner.index.lock().unwrap_or_else(|p| p.into_inner());
                if index
                    .entries
                    .get(digest)
                    .is_some_and(|e| e.generation == generation)
                {
                    index.remove(digest);
                }
                Ok(None)
            }
        }
    }

    /// The in-memory copy of a small committed object, if one is kept: no
    /// file access at all (the manifest fast path). Refreshes the last
    /// access like `lookup`.
    pub fn memory_copy(&self, digest: &Digest) -> Option<(bytes::Bytes, BlobMeta)> {
        let mut index = self.inner.index.lock().unwrap_or_else(|p| p.into_inner());
        let found = index.small.get(digest).cloned()?;
        if let Some(e) = index.entries.get_mut(digest) {
            e.last_access = SystemTime::now();
        }
        Some(found)
    }

    /// A committed object of at most `max` bytes, whole, in memory (for
    /// manifests): from the in-memory copy when there is one, else read from
    /// its file once and kept (up to `SMALL_MAX`). `Ok(None)` when it is
    /// not cached or larger than `max` (use [`lookup`](Self::lookup)).
    /// Refreshes the last access like `lookup`.
    pub async fn lookup_small(
        &self,
        digest: &Digest,
        max: u64,
    ) -> Result<Option<(bytes::Bytes, BlobMeta)>, StoreError> {
        {
            let mut index = self.inner.index.lock().unwrap_or_else(|p| p.into_inner());
            match index.entries.get_mut(digest) {
                Some(e) if e.size <= max => e.last_access = SystemTime::now(),
                _ => return Ok(None),
            }
            if let Some((b, m)) = index.small.get(digest) {
                return Ok(Some((b.clone(), m.clone())));
            }
        }
        let Some(cached) = self.lookup(digest).await? else {
            return Ok(None);
        };
        if cached.size > max {
            return Ok(None);
        }
        let path = cached.path.clone();
        let meta = cached.meta.clone();
        let bytes = blocking("read", &path, move || {
            use std::os::unix::fs::FileExt as _;
            let len = usize::try_from(cached.size).map_err(|_| StoreError::Io {
                action: "read",
                path: cached.path.clone(),
                source: io::Error::other("larger than memory"),
            })?;
            let mut b = vec![0u8; len];
            cached
                .file
                .read_exact_at(&mut b, 0)
                .map_err(io_err("read", &cached.path))?;
            drop(cached); // the lease: the file was read
            Ok(b)
        })
        .await?;
        let bytes = bytes::Bytes::from(bytes);
        self.inner
            .index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keep_small(digest, &bytes, &meta);
        Ok(Some((bytes, meta)))
    }

    /// Starts writing a blob expected to hash to `digest`.
    pub async fn begin(&self, digest: &Digest, meta: BlobMeta) -> Result<BlobWriter, StoreError> {
        let temp = self.inner.layout.temp(digest, "tmp");
        let p = temp.clone();
        let file = blocking("create", &temp, move || {
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&p)
                .map_err(io_err("create", &p))
        })
        .await?;
        Ok(BlobWriter {
            digest: digest.clone(),
            meta,
            inner: Arc::clone(&self.inner),
            temp: TempFile(Some(temp)),
            sink: Some(Sink {
                file,
                hasher: Sha256::new(),
            }),
            pending: Vec::new(),
            syncing: None,
            synced: 0,
            batches: Vec::new(),
            in_flight: None,
            written: 0,
            flushed: 0,
            write_failed: false,
            last_flush: Instant::now(),
        })
    }

    /// Stores a whole small object (manifests) in one call, with the same
    /// verification as `begin`/`commit`.
    pub async fn put(
        &self,
        digest: &Digest,
        meta: BlobMeta,
        bytes: &[u8],
    ) -> Result<CachedBlob, StoreError> {
        let mut w = self.begin(digest, meta).await?;
        w.write(bytes).await?;
        let blob = w.commit().await?;
        // Whoever stores a manifest is about to serve it again.
        if bytes.len() <= SMALL_MAX {
            self.inner
                .index
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .keep_small(digest, &bytes::Bytes::copy_from_slice(bytes), &blob.meta);
        }
        Ok(blob)
    }

    /// Removes a blob (for purge/eviction); Ok(false) if absent. The data
    /// file goes first, so a crash in between leaves only a harmless orphan
    /// sidecar, never a blob without its meta.
    pub async fn remove(&self, digest: &Digest) -> Result<bool, StoreError> {
        let inner = Arc::clone(&self.inner);
        let d = digest.clone();
        let path = self.inner.layout.data(digest);
        blocking("remove", &path, move || {
            let _fs = inner.fs_lock.lock().unwrap_or_else(|p| p.into_inner());
            let index = || inner.index.lock().unwrap_or_else(|p| p.into_inner());
            let entry = index().remove(&d);
            let layout = &inner.layout;
            let data = layout.data(&d);
            let existed = match fs::remove_file(&data) {
                Ok(()) => true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                Err(e) => {
                    // Still on disk: indexed again, so its bytes count
                    // against the limits and a later purge or eviction
                    // finds it (the fs lock kept any commit of it out).
                    if let Some(entry) = entry {
                        index().put_back(d, entry);
                    }
                    return Err(io_err("remove", &data)(e));
                }
            };
            let meta = layout.meta(&d);
            match fs::remove_file(&meta) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("remove", &meta)(e)),
            }
            if existed {
                fsync_dir(&layout.shard(&d))?;
            }
            Ok(existed)
        })
        .await
    }
}

/// True when `err` means the disk (or quota) is full.
pub fn is_disk_full(err: &StoreError) -> bool {
    match err {
        StoreError::NotCommitted { source, .. } => is_disk_full(source),
        StoreError::Io { source, .. } => {
            matches!(
                source.kind(),
                io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
            ) || source.raw_os_error() == Some(28)
        }
        _ => false,
    }
}

fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

#[allow(clippy::expect_used)]
fn digest_of_hash(hash: &[u8]) -> Digest {
    Digest::parse(&format!("sha256:{}", hex::encode(hash)))
        .expect("a hex-encoded sha256 is a valid digest")
}

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
//! Hashing and file writes run on tokio's blocking pool, in batches of up to
//! [`FLUSH_AT`] bytes, so the async workers only copy chunks into a buffer.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use sha2::{Digest as _, Sha256};

use crate::oci::Digest;

/// Buffered bytes are hashed and written once this many are pending.
const FLUSH_AT: usize = 256 * 1024;

/// While a blob is written, its data is synced to disk in the background
/// every this many bytes, so the fsync before commit (which the client's
/// last byte waits for) only has the tail left to write. Done at the end,
/// it took ~130 ms for 256 MiB here: a fair part of what a single cold
/// fetch took over nginx's, which never fsyncs.
const SYNC_EVERY: u64 = 16 << 20;

/// ... or once they have waited this long (so clients tailing the temp
/// file of a slow download see bytes promptly).
const FLUSH_AFTER: std::time::Duration = std::time::Duration::from_millis(20);

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
    pub size: u64,
    pub meta: BlobMeta,
    pub lease: Option<Arc<Lease>>,
}

/// Keeps one blob from eviction while it is read.
#[derive(Debug)]
pub struct Lease {
    index: Arc<Mutex<Index>>,
    digest: Digest,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = index.entries.get_mut(&self.digest) {
            e.readers = e.readers.saturating_sub(1);
        }
    }
}

/// Size and last access of one committed blob.
#[derive(Debug, Clone)]
pub struct Entry {
    pub size: u64,
    pub last_access: SystemTime,
    readers: u32,
}

/// Every committed blob, rebuilt from the files at start.
#[derive(Debug, Default)]
pub struct Index {
    entries: HashMap<Digest, Entry>,
    total: u64,
    /// Bytes of small committed objects (manifests) kept in memory, so a
    /// manifest HIT needs no open/stat/read. Kept here so that whatever
    /// removes an entry (eviction, purge) drops its copy too.
    small: HashMap<Digest, (bytes::Bytes, BlobMeta)>,
    small_bytes: usize,
}

/// Largest object [`BlobStore::lookup_small`] keeps in memory, and the
/// bound on all of them (manifests are a few KiB; 8 MiB holds thousands).
const SMALL_MAX: usize = 256 * 1024;
const SMALL_TOTAL: usize = 8 << 20;

impl Index {
    /// Keeps `bytes` of a committed entry in memory, making room by
    /// dropping other copies (any: they are only a shortcut to the file).
    fn keep_small(&mut self, digest: &Digest, bytes: &bytes::Bytes, meta: &BlobMeta) {
        if bytes.len() > SMALL_MAX
            || !self.entries.contains_key(digest)
            || self.small.contains_key(digest)
        {
            return;
        }
        while self.small_bytes + bytes.len() > SMALL_TOTAL {
            let Some(victim) = self.small.keys().next().cloned() else {
                break;
            };
            if let Some((b, _)) = self.small.remove(&victim) {
                self.small_bytes = self.small_bytes.saturating_sub(b.len());
            }
        }
        self.small_bytes += bytes.len();
        self.small
            .insert(digest.clone(), (bytes.clone(), meta.clone()));
    }

    fn insert(&mut self, digest: Digest, size: u64, at: SystemTime) {
        match self.entries.get_mut(&digest) {
            Some(e) => e.last_access = at,
            None => {
                self.total += size;
                self.entries.insert(
                    digest,
                    Entry {
                        size,
                        last_access: at,
                        readers: 0,
                    },
                );
            }
        }
    }

    fn remove(&mut self, digest: &Digest) -> Option<Entry> {
        if let Some((b, _)) = self.small.remove(digest) {
            self.small_bytes = self.small_bytes.saturating_sub(b.len());
        }
        let e = self.entries.remove(digest)?;
        self.total = self.total.saturating_sub(e.size);
        Some(e)
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
    /// Layout: `<data_dir>/blobs/sha256/<first 2 hex>/<hex>` (+ `<hex>.json`
    /// meta), temp files in `<data_dir>/tmp/`. Creates the dirs (all 256
    /// shards up front); removes every leftover temp file (crash recovery)
    /// and logs how many.
    #[cfg(test)]
    pub async fn open(data_dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(data_dir, Limits::default()).await
    }

    /// Like [`open`](Self::open), with a size bound; also rebuilds the
    /// index (size and last access of every blob) from the files.
    pub async fn open_with(data_dir: &Path, limits: Limits) -> Result<Self, StoreError> {
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
        {
            let mut index = self.inner.index.lock().unwrap_or_else(|p| p.into_inner());
            match index.entries.get_mut(digest) {
                Some(e) => {
                    e.readers += 1;
                    e.last_access = SystemTime::now();
                }
                None => return Ok(None),
            }
        }
        let lease = Arc::new(Lease {
            index: Arc::clone(&self.inner.index),
            digest: digest.clone(),
        });
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
                // Gone behind the index's back (removed by hand).
                drop(lease);
                let mut index = self.inner.index.lock().unwrap_or_else(|p| p.into_inner());
                index.remove(digest);
                Ok(None)
            }
        }
    }

    /// A committed object of at most `max` bytes, whole, in memory (for
    /// manifests): from the in-memory copy when there is one, else read from
    /// its file once and kept (up to [`SMALL_MAX`]). `Ok(None)` when it is
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
        let path = cached.path.clone();
        let meta = cached.meta.clone();
        let bytes = blocking("read", &path, move || {
            let b = fs::read(&cached.path).map_err(io_err("read", &cached.path))?;
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
            inner
                .index
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&d);
            let layout = &inner.layout;
            let data = layout.data(&d);
            let existed = match fs::remove_file(&data) {
                Ok(()) => true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                Err(e) => return Err(io_err("remove", &data)(e)),
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

/// The file and running hash of a write in progress. Taken out while a
/// batch is on the blocking pool; left `None` if that batch failed or was
/// cancelled.
struct Sink {
    file: fs::File,
    hasher: Sha256,
}

/// What a batch written on the blocking pool gives back: the sink, the
/// bytes, and how many were written (or the write error).
type Batch = (Sink, Vec<u8>, io::Result<u64>);

/// A temp path removed when dropped, unless disarmed with `take`.
struct TempFile(Option<PathBuf>);

impl TempFile {
    fn take(&mut self) -> Option<PathBuf> {
        self.0.take()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take()
            && let Err(e) = fs::remove_file(&p)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %p.display(), error = %e, "cannot remove temp file");
        }
    }
}

/// A blob being written. Dropped without `commit`, its temp file is removed
/// (synchronously, best effort).
///
/// `write` is not cancellation safe: if its future is dropped while a batch
/// is being written, the writer becomes unusable (`WriterBroken`), and its
/// temp file is still removed on drop.
pub struct BlobWriter {
    digest: Digest,
    meta: BlobMeta,
    inner: Arc<Inner>,
    temp: TempFile,
    sink: Option<Sink>,
    pending: Vec<u8>,
    /// Batches written (offset and bytes), until taken.
    batches: Vec<(u64, bytes::Bytes)>,
    /// The batch being hashed and written on the blocking pool; it holds
    /// the sink meanwhile. One at a time, so writes stay in order, but the
    /// caller goes on receiving the next batch while this one is written.
    in_flight: Option<tokio::task::JoinHandle<Batch>>,
    /// A background `fdatasync` of what was written so far (see
    /// [`SYNC_EVERY`]), and the byte count it was started at.
    syncing: Option<tokio::task::JoinHandle<()>>,
    synced: u64,
    written: u64,
    /// Bytes in the temp file and in the hash (a prefix of `written`).
    flushed: u64,
    /// A batch could not be written (disk full, I/O error): the sink still
    /// holds the hash of the `flushed` bytes (see [`abandon`](Self::abandon)),
    /// but nothing more can be written.
    write_failed: bool,
    last_flush: Instant,
}

impl std::fmt::Debug for BlobWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobWriter")
            .field("digest", &self.digest)
            .field("temp", &self.temp.0)
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

impl BlobWriter {
    /// Appends to the temp file and updates the sha256 (batched: bytes are
    /// hashed and written on the blocking pool every [`FLUSH_AT`] bytes).
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        if (self.sink.is_none() && self.in_flight.is_none()) || self.write_failed {
            return Err(StoreError::WriterBroken {
                digest: self.digest.clone(),
            });
        }
        if self.in_flight.as_ref().is_some_and(|h| h.is_finished()) {
            // Publish a finished batch as soon as possible.
            self.collect().await?;
        }
        if self.written > 0 && self.pending.capacity() < FLUSH_AT {
            // A stream (not a one-shot `put`): room for a whole batch at
            // once rather than growing by doubling.
            self.pending.reserve(FLUSH_AT + 64 * 1024);
        }
        self.pending.extend_from_slice(chunk);
        self.written += chunk.len() as u64;
        if self.pending.len() >= FLUSH_AT || self.last_flush.elapsed() >= FLUSH_AFTER {
            self.flush().await?;
        }
        Ok(())
    }

    /// Bytes written to the temp file so far (readable through
    /// [`temp_path`](Self::temp_path)).
    pub fn on_disk(&self) -> u64 {
        self.flushed
    }

    /// The batches written to the temp file since the last call, with their
    /// offsets. Lets readers of a download in progress take fresh bytes
    /// from memory.
    pub fn take_batches(&mut self) -> Vec<(u64, bytes::Bytes)> {
        std::mem::take(&mut self.batches)
    }

    /// The temp file being written.
    pub fn temp_path(&self) -> Option<&Path> {
        self.temp.0.as_deref()
    }

    /// Writes out what is buffered and waits until it is on disk.
    pub async fn flush_now(&mut self) -> Result<(), StoreError> {
        self.flush().await?;
        self.collect().await
    }

    /// Starts writing what is buffered (after the batch in flight is done).
    async fn flush(&mut self) -> Result<(), StoreError> {
        self.last_flush = Instant::now();
        if self.pending.is_empty() {
            return Ok(());
        }
        self.collect().await?;
        if self.write_failed {
            return Err(StoreError::WriterBroken {
                digest: self.digest.clone(),
            });
        }
        let Some(mut sink) = self.sink.take() else {
            return Err(StoreError::WriterBroken {
                digest: self.digest.clone(),
            });
        };
        // A fresh buffer per batch: the written one is handed on as
        // `Bytes` (see `take_batches`) instead of being reused.
        let buf = std::mem::take(&mut self.pending);
        self.in_flight = Some(tokio::task::spawn_blocking(move || {
            // Written first, hashed after: when the write fails (disk
            // full) the hash still covers exactly the bytes on disk, so a
            // reader of the temp file can go on from there elsewhere.
            let written = sink.file.write_all(&buf);
            if written.is_ok() {
                sink.hasher.update(&buf);
            }
            let len = buf.len() as u64;
            (sink, buf, written.map(|()| len))
        }));
        Ok(())
    }

    /// Starts an `fdatasync` of the temp file when [`SYNC_EVERY`] more bytes
    /// were written since the last one and none is running. Its result is
    /// ignored: the fsync in `commit` reports errors and makes it durable.
    fn sync_in_background(&mut self) {
        if self.flushed - self.synced < SYNC_EVERY
            || self.syncing.as_ref().is_some_and(|h| !h.is_finished())
        {
            return;
        }
        let Some(file) = self.sink.as_ref().and_then(|s| s.file.try_clone().ok()) else {
            return;
        };
        self.synced = self.flushed;
        self.syncing = Some(tokio::task::spawn_blocking(move || {
            let _ = file.sync_data();
        }));
    }

    /// Is a batch being written?
    pub fn writing(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Waits for the batch in flight, if any, and takes its result
    /// (`on_disk` and `take_batches` then include it). Cancellation safe:
    /// dropped before the batch is done, it leaves the batch in flight.
    pub async fn collect(&mut self) -> Result<(), StoreError> {
        let Some(handle) = self.in_flight.as_mut() else {
            return Ok(());
        };
        let joined = handle.await;
        self.in_flight = None;
        let path = self.temp.0.clone().unwrap_or_default();
        let (sink, buf, written) = joined.map_err(|source| StoreError::Task {
            action: "write",
            path: path.clone(),
            source,
        })?;
        self.sink = Some(sink);
        match written {
            Ok(len) => {
                self.batches.push((self.flushed, bytes::Bytes::from(buf)));
                self.flushed += len;
                self.sync_in_background();
                Ok(())
            }
            Err(source) => {
                self.write_failed = true;
                Err(StoreError::Io {
                    action: "write",
                    path,
                    source,
                })
            }
        }
    }

    /// Verifies sha256 == expected digest. On match: fsync the file, write
    /// the meta sidecar, rename into place, fsync the directory, and return
    /// the blob. On mismatch: delete the temp file, `Err(DigestMismatch)`. If
    /// the blob already exists (another writer won the race), the temp file
    /// is dropped and the existing blob returned.
    ///
    /// The final step runs to completion on the blocking pool even if this
    /// future is dropped, so a commit is never left half done.
    pub async fn commit(mut self) -> Result<CachedBlob, StoreError> {
        self.flush_now().await?;
        if self.write_failed {
            return Err(StoreError::WriterBroken {
                digest: self.digest.clone(),
            });
        }
        let Some(sink) = self.sink.take() else {
            return Err(StoreError::WriterBroken {
                digest: self.digest.clone(),
            });
        };
        let Some(temp_path) = self.temp.take() else {
            return Err(StoreError::WriterBroken {
                digest: self.digest.clone(),
            });
        };
        let temp = TempFile(Some(temp_path.clone()));
        let (inner, digest, meta, bytes) = (
            Arc::clone(&self.inner),
            self.digest.clone(),
            self.meta.clone(),
            self.written,
        );
        blocking("commit", &temp_path, move || {
            let blob = finish(&inner, digest, meta, bytes, sink, temp)?;
            evict(&inner);
            Ok(blob)
        })
        .await
    }

    /// Gives up caching after a failed write: removes the temp file (its
    /// open read handles keep its bytes readable) and returns how many bytes
    /// it holds and the sha256 state over exactly those bytes, so readers
    /// can continue from there with another source and still verify the
    /// whole blob. `None` if the state is lost (a cancelled batch).
    pub async fn abandon(mut self) -> Option<(u64, Sha256)> {
        // The failed batch may be the one in flight: its sink comes back.
        let _ = self.collect().await;
        let sink = self.sink.take();
        let flushed = self.flushed;
        self.abort().await;
        sink.map(|s| (flushed, s.hasher))
    }

    /// Discards the temp file.
    pub async fn abort(mut self) {
        self.sink = None;
        if let Some(p) = self.temp.take()
            && let Err(e) = tokio::fs::remove_file(&p).await
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %p.display(), error = %e, "cannot remove temp file");
        }
    }
}

/// The blocking part of `commit`. `temp` removes the temp file on every
/// path that does not rename it into place.
fn finish(
    inner: &Inner,
    digest: Digest,
    meta: BlobMeta,
    bytes: u64,
    sink: Sink,
    temp: TempFile,
) -> Result<CachedBlob, StoreError> {
    let Sink { file, hasher } = sink;
    let actual = digest_of_hash(&hasher.finalize());
    if actual != digest {
        drop(file);
        drop(temp);
        return Err(StoreError::DigestMismatch {
            expected: digest,
            actual,
            bytes,
        });
    }
    let d = digest.clone();
    place(inner, digest, meta, bytes, file, temp).map_err(|e| StoreError::NotCommitted {
        digest: d,
        source: Box::new(e),
    })
}

/// The part of `finish` after verification: put the verified temp file in
/// place (or keep an existing copy).
fn place(
    inner: &Inner,
    digest: Digest,
    meta: BlobMeta,
    bytes: u64,
    file: fs::File,
    mut temp: TempFile,
) -> Result<CachedBlob, StoreError> {
    let layout = &inner.layout;
    if let Some(mut found) = existing(layout, &digest)? {
        drop(file);
        drop(temp);
        // Fill in a sidecar an earlier writer did not have.
        if found.meta == BlobMeta::default() && meta != BlobMeta::default() {
            write_meta(layout, &digest, &meta)?;
            fsync_dir(&layout.shard(&digest))?;
            found.meta = meta;
        }
        return Ok(found);
    }
    let temp_path = temp.0.clone().unwrap_or_default();
    file.sync_all().map_err(io_err("fsync", &temp_path))?;
    drop(file);
    let _fs = inner.fs_lock.lock().unwrap_or_else(|p| p.into_inner());
    write_meta(layout, &digest, &meta)?;
    let data = layout.data(&digest);
    fs::rename(&temp_path, &data).map_err(io_err("rename into place", &data))?;
    temp.take(); // renamed: nothing left to clean up
    fsync_dir(&layout.shard(&digest))?;
    inner
        .index
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(digest.clone(), bytes, SystemTime::now());
    Ok(CachedBlob {
        digest,
        path: data,
        size: bytes,
        meta,
        lease: None,
    })
}

/// Writes the meta sidecar atomically (temp file, fsync, rename).
fn write_meta(layout: &Layout, digest: &Digest, meta: &BlobMeta) -> Result<(), StoreError> {
    let json = serde_json::to_vec(meta).map_err(|e| StoreError::Io {
        action: "serialise meta for",
        path: layout.meta(digest),
        source: io::Error::other(e),
    })?;
    let mut tmp = TempFile(Some(layout.temp(digest, "json.tmp")));
    let tmp_path = tmp.0.clone().unwrap_or_default();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp_path)
        .map_err(io_err("create", &tmp_path))?;
    f.write_all(&json).map_err(io_err("write", &tmp_path))?;
    f.sync_all().map_err(io_err("fsync", &tmp_path))?;
    drop(f);
    let dest = layout.meta(digest);
    fs::rename(&tmp_path, &dest).map_err(io_err("rename into place", &dest))?;
    tmp.take(); // renamed: nothing left to clean up
    Ok(())
}

/// The committed blob for `digest`, if any (blocking).
fn existing(layout: &Layout, digest: &Digest) -> Result<Option<CachedBlob>, StoreError> {
    let path = layout.data(digest);
    let md = match fs::metadata(&path) {
        Ok(md) if md.is_file() => md,
        Ok(_) => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("stat", &path)(e)),
    };
    let meta_path = layout.meta(digest);
    let meta = match fs::read(&meta_path) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            tracing::warn!(path = %meta_path.display(), error = %e, "unreadable blob meta; using defaults");
            BlobMeta::default()
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => BlobMeta::default(),
        Err(e) => return Err(io_err("read", &meta_path)(e)),
    };
    Ok(Some(CachedBlob {
        digest: digest.clone(),
        path,
        size: md.len(),
        meta,
        lease: None,
    }))
}

/// Walks `blobs/sha256/<shard>/` and indexes every data file (name = hex
/// digest) with its size and last access (the later of atime and mtime).
fn rebuild_index(blobs: &Path) -> Result<Index, StoreError> {
    let mut index = Index::default();
    for shard in fs::read_dir(blobs).map_err(io_err("list", blobs))? {
        let shard = shard.map_err(io_err("list", blobs))?.path();
        let Ok(files) = fs::read_dir(&shard) else {
            continue;
        };
        for f in files.flatten() {
            let name = f.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.len() != 64 || name.contains('.') {
                continue;
            }
            let Ok(digest) = Digest::parse(&format!("sha256:{name}")) else {
                continue;
            };
            let Ok(md) = f.metadata() else { continue };
            if !md.is_file() {
                continue;
            }
            let at = match (md.accessed(), md.modified()) {
                (Ok(a), Ok(m)) => a.max(m),
                (Ok(t), _) | (_, Ok(t)) => t,
                _ => SystemTime::UNIX_EPOCH,
            };
            index.insert(digest, md.len(), at);
        }
    }
    Ok(index)
}

/// Removes least recently used blobs (never one being read) until usage is
/// at the low watermark, once it passed the high one (blocking).
fn evict(inner: &Inner) {
    let (Some(high), Some(low)) = (inner.limits.high(), inner.limits.low()) else {
        return;
    };
    let _fs = inner.fs_lock.lock().unwrap_or_else(|p| p.into_inner());
    let victims: Vec<(Digest, u64)> = {
        let mut index = inner.index.lock().unwrap_or_else(|p| p.into_inner());
        if index.total <= high {
            return;
        }
        let mut candidates: Vec<(SystemTime, Digest, u64)> = index
            .entries
            .iter()
            .filter(|(_, e)| e.readers == 0)
            .map(|(d, e)| (e.last_access, d.clone(), e.size))
            .collect();
        candidates.sort();
        let mut victims = Vec::new();
        let mut total = index.total;
        for (_, d, size) in candidates {
            if total <= low {
                break;
            }
            total = total.saturating_sub(size);
            index.remove(&d);
            victims.push((d, size));
        }
        victims
    };
    for (d, size) in victims {
        for p in [inner.layout.data(&d), inner.layout.meta(&d)] {
            if let Err(e) = fs::remove_file(&p)
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!(path = %p.display(), error = %e, "cannot remove evicted blob");
            }
        }
        inner.stats.evictions.fetch_add(1, Ordering::Relaxed);
        inner.stats.evicted_bytes.fetch_add(size, Ordering::Relaxed);
        tracing::info!(digest = %d, bytes = size, "evicted");
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn meta(mt: &str) -> BlobMeta {
        BlobMeta {
            media_type: Some(mt.to_string()),
        }
    }

    /// Deterministic pseudo-random content.
    fn content(len: usize) -> Vec<u8> {
        let mut x: u32 = 0x1234_5678;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    /// Every file below `dir`, recursively.
    fn files(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p);
                }
            }
        }
        out.sort();
        out
    }

    fn tmp_files(dir: &Path) -> Vec<PathBuf> {
        files(&dir.join("tmp"))
    }

    fn blob_files(dir: &Path) -> Vec<PathBuf> {
        files(&dir.join("blobs"))
    }

    #[tokio::test]
    async fn chunked_write_commit_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).await.unwrap();
        let data = content(1_000_000 + 17); // several flush batches + a tail
        let digest = Digest::of(&data);
        let mt = "application/vnd.oci.image.layer.v1.tar+gzip";

        let mut w = store.begin(&digest, meta(mt)).await.unwrap();
        for chunk in data.chunks(64 * 1024 - 3) {
            w.write(chunk).await.unwrap();
        }
        let committed = w.commit().await.unwrap();
        assert_eq!(committed.size, data.len() as u64);
        assert_eq!(committed.meta, meta(mt));

        let found = store.lookup(&digest).await.unwrap().expect("committed");
        assert_eq!(found.digest, digest);
        assert_eq!(found.size, data.len() as u64);
        assert_eq!(found.meta, meta(mt));
        let hex = digest.hex();
        assert_eq!(
            found.path,
            dir.path().join("blobs/sha256").join(&hex[..2]).join(hex)
        );
        let on_disk = fs::read(&found.path).unwrap();
        assert_eq!(Digest::of(&on_disk), digest);
        assert!(tmp_files(dir.path()).is_empty());
        assert_eq!(blob_files(dir.path()).len(), 2); // data + sidecar

        // A store reopened on the same dir still finds it.
        drop(store);
        let store = BlobStore::open(dir.path()).await.unwrap();
        let again = store.lookup(&digest).await.unwrap().expect("persisted");
        assert_eq!(again.meta, meta(mt));
        assert_eq!(again.size, data.len() as u64);
    }

    #[tokio::test]
    async fn wrong_bytes_are_rejected_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).await.unwrap();
        let good = content(300_000);
        let digest = Digest::of(&good);
        let mut bad = good.clone();
        bad[123_456] ^= 1;

        let mut w = store.begin(&digest, BlobMeta::default()).await.unwrap();
        for chunk in bad.chunks(32 * 1024) {
            w.write(chunk).await.unwrap();
        }
        match w.commit().await {
            Err(StoreError::DigestMismatch {
                expected,
                actual,
                bytes,
            }) => {
                assert_eq!(expected, digest);
                assert_eq!(actual, Digest::of(&bad));
                assert_eq!(bytes, bad.len() as u64);
            }
            other => panic!("expected DigestMismatch, got {other:?}"),
        }
        // A short body is a mismatch too.
        let mut w = store.begin(&digest, BlobMeta::default()).await.unwrap();
        w.write(&good[..1000]).await.unwrap();
        assert!(matches!(
            w.commit().await,
            Err(StoreError::DigestMismatch { bytes: 1000, .. })
        ));
        // And through put.
        assert!(matches!(
            store.put(&digest, BlobMeta::default(), b"nope").await,
            Err(StoreError::DigestMismatch { .. })
        ));

        assert!(store.lookup(&digest).await.unwrap().is_none());
        assert!(tmp_files(dir.path()).is_empty());
        assert!(blob_files(dir.path()).is_empty());
    }

    #[tokio::test]
    async fn dropped_and_aborted_writers_leave_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).await.unwrap();
        let data = content(400_000);
        let digest = Digest::of(&data);

        let mut w = store.begin(&digest, BlobMeta::default()).await.unwrap();
        w.write(&data[..300_000]).await.unwrap(); // flushed to the temp file
        assert_eq!(tmp_files(dir.path()).len(), 1);
        drop(w);
        assert!(tmp_files(dir.path()).is_empty());

        let mut w = store.begin(&digest, BlobMeta::default()).await.unwrap();
        w.write(&data[..300_000]).await.unwrap();
        assert_eq!(tmp_files(dir.path()).len(), 1);
        w.abort().await;
        assert!(tmp_files(dir.path()).is_empty());

        assert!(store.lookup(&digest).await.unwrap().is_none());
        assert!(blob_files(dir.path()).is_empty());
    }

    #[tokio::test]
    async fn open_removes_leftover_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("tmp");
        fs::create_dir_all(tmp.join("stray-dir")).unwrap();
        fs::write(tmp.join("abc.1.2.3.tmp"), b"half a layer").unwrap();
        fs::write(tmp.join("abc.1.2.4.json.tmp"), b"{").unwrap();
        fs::write(tmp.join("stray-dir/x"), b"x").unwrap();

        let store = BlobStore::open(dir.path()).await.unwrap();
        assert!(tmp.is_dir());
        assert!(fs::read_dir(&tmp).unwrap().next().is_none());
        // And the store works afterwards.
        let d = Digest::of(b"x");
        store.put(&d, BlobMeta::default(), b"x").await.unwrap();
        assert!(store.lookup(&d).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn concurrent_writers_of_one_digest_both_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(BlobStore::open(dir.path()).await.unwrap());
        let data = Arc::new(content(700_000));
        let digest = Digest::of(&data);
        let barrier = Arc::new(tokio::sync::Barrier::new(2));

        let mut tasks = Vec::new();
        for _ in 0..2 {
            let (store, data, digest, barrier) = (
                Arc::clone(&store),
                Arc::clone(&data),
                digest.clone(),
                Arc::clone(&barrier),
            );
            tasks.push(tokio::spawn(async move {
                let mut w = store.begin(&digest, meta("m")).await.unwrap();
                barrier.wait().await; // both writers in flight at once
                for chunk in data.chunks(16 * 1024) {
                    w.write(chunk).await.unwrap();
                }
                barrier.wait().await; // both about to commit
                w.commit().await
            }));
        }
        for t in tasks {
            let blob = t.await.unwrap().unwrap();
            assert_eq!(blob.digest, digest);
            assert_eq!(blob.size, data.len() as u64);
        }
        let hex = digest.hex();
        let shard = dir.path().join("blobs/sha256").join(&hex[..2]);
        assert_eq!(
            blob_files(dir.path()),
            vec![shard.join(hex), shard.join(format!("{hex}.json"))]
        );
        assert!(tmp_files(dir.path()).is_empty());
        let found = store.lookup(&digest).await.unwrap().unwrap();
        assert_eq!(fs::read(&found.path).unwrap(), *data);
    }

    #[tokio::test]
    async fn put_small_object_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).await.unwrap();
        let manifest = br#"{"schemaVersion":2}"#;
        let digest = Digest::of(manifest);
        let mt = "application/vnd.oci.image.manifest.v1+json";

        let blob = store.put(&digest, meta(mt), manifest).await.unwrap();
        assert_eq!(blob.size, manifest.len() as u64);
        assert_eq!(fs::read(&blob.path).unwrap(), manifest);
        let found = store.lookup(&digest).await.unwrap().unwrap();
        assert_eq!(found.meta, meta(mt));

        // A second put of the same object returns the existing one.
        let again = store.put(&digest, meta(mt), manifest).await.unwrap();
        assert_eq!(again.path, blob.path);
        assert_eq!(blob_files(dir.path()).len(), 2);

        assert!(store.remove(&digest).await.unwrap());
        assert!(store.lookup(&digest).await.unwrap().is_none());
        assert!(blob_files(dir.path()).is_empty());
        assert!(!store.remove(&digest).await.unwrap());
        assert!(tmp_files(dir.path()).is_empty());
    }

    /// Manifests are served from memory after the first read (the file is
    /// not touched again), and whatever removes the entry drops the copy.
    #[tokio::test]
    async fn small_objects_are_kept_in_memory_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).await.unwrap();
        let manifest = br#"{"schemaVersion":2,"layers":[]}"#;
        let digest = Digest::of(manifest);
        let mt = "application/vnd.oci.image.manifest.v1+json";
        let blob = store.put(&digest, meta(mt), manifest).await.unwrap();
        // Overwritten behind the store's back: a memory hit does not see it.
        fs::write(&blob.path, b"changed on disk").unwrap();
        let (bytes, m) = store.lookup_small(&digest, 1 << 20).await.unwrap().unwrap();
        assert_eq!(&bytes[..], manifest);
        assert_eq!(m, meta(mt));
        // Larger than the caller's bound: not returned.
        assert!(store.lookup_small(&digest, 4).await.unwrap().is_none());
        assert!(store.remove(&digest).await.unwrap());
        assert!(
            store
                .lookup_small(&digest, 1 << 20)
                .await
                .unwrap()
                .is_none()
        );
        // Committed by a writer (not `put`): read from the file once.
        let other = br#"{"schemaVersion":2,"config":{}}"#;
        let d2 = Digest::of(other);
        let mut w = store.begin(&d2, meta(mt)).await.unwrap();
        w.write(other).await.unwrap();
        let b2 = w.commit().await.unwrap();
        let (bytes, _) = store.lookup_small(&d2, 1 << 20).await.unwrap().unwrap();
        assert_eq!(&bytes[..], other);
        fs::remove_file(&b2.path).unwrap();
        let (bytes, _) = store.lookup_small(&d2, 1 << 20).await.unwrap().unwrap();
        assert_eq!(&bytes[..], other, "second read came from memory");
    }

    #[tokio::test]
    async fn missing_sidecar_gives_default_meta() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).await.unwrap();
        let digest = Digest::of(b"abc");
        store.put(&digest, meta("x/y"), b"abc").await.unwrap();
        fs::remove_file(store.inner.layout.meta(&digest)).unwrap();
        let found = store.lookup(&digest).await.unwrap().unwrap();
        assert_eq!(found.meta, BlobMeta::default());
        assert_eq!(found.size, 3);
    }

    #[tokio::test]
    async fn lookup_during_write_sees_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).await.unwrap();
        let data = content(600_000);
        let digest = Digest::of(&data);

        let mut w = store.begin(&digest, BlobMeta::default()).await.unwrap();
        w.write(&data[..500_000]).await.unwrap(); // partly on disk in tmp/
        assert!(store.lookup(&digest).await.unwrap().is_none());
        assert!(blob_files(dir.path()).is_empty());
        w.write(&data[500_000..]).await.unwrap();
        assert!(store.lookup(&digest).await.unwrap().is_none());
        w.commit().await.unwrap();
        assert_eq!(
            store.lookup(&digest).await.unwrap().unwrap().size,
            data.len() as u64
        );
    }

    fn bounded(max: u64) -> Limits {
        Limits {
            max_size: Some(max),
            high_watermark: 0.9,
            low_watermark: 0.6,
        }
    }

    #[tokio::test]
    async fn eviction_is_lru_and_spares_blobs_being_read() {
        let dir = tempfile::tempdir().unwrap();
        // 10 000 bytes: evict above 9 000, down to 6 000.
        let store = BlobStore::open_with(dir.path(), bounded(10_000))
            .await
            .unwrap();
        let blobs: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 2_000]).collect();
        let digests: Vec<Digest> = blobs.iter().map(|b| Digest::of(b)).collect();
        for i in 0..4 {
            store
                .put(&digests[i], BlobMeta::default(), &blobs[i])
                .await
                .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert_eq!(store.usage(), (8_000, 4));
        // Blob 0 is the oldest, but being read: it must stay.
        let reading = store.lookup(&digests[0]).await.unwrap().unwrap();
        // Make 1 the most recently used after 0.
        drop(store.lookup(&digests[1]).await.unwrap());
        std::thread::sleep(std::time::Duration::from_millis(2));
        store
            .put(&digests[4], BlobMeta::default(), &blobs[4])
            .await
            .unwrap();
        // 10 000 > 9 000: 2 and 3 (least recently used, not leased) go.
        assert!(store.lookup(&digests[2]).await.unwrap().is_none());
        assert!(store.lookup(&digests[3]).await.unwrap().is_none());
        assert!(store.lookup(&digests[1]).await.unwrap().is_some());
        assert!(store.lookup(&digests[4]).await.unwrap().is_some());
        assert_eq!(fs::read(&reading.path).unwrap(), blobs[0]);
        assert_eq!(store.stats().evictions.load(Ordering::Relaxed), 2);
        drop(reading);
        assert_eq!(store.usage(), (6_000, 3));
    }

    /// Rebuilding the index of 100 000 entries at start (printed; the
    /// figure is quoted in proxy/README.md).
    #[tokio::test]
    async fn index_rebuild_of_100k_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).await.unwrap();
        let layout = &store.inner.layout;
        let created = Instant::now();
        for i in 0..100_000u32 {
            let d = Digest::of(&i.to_le_bytes());
            fs::write(layout.data(&d), i.to_le_bytes()).unwrap();
        }
        let created = created.elapsed();
        drop(store);
        let started = Instant::now();
        let store = BlobStore::open(dir.path()).await.unwrap();
        let took = started.elapsed();
        println!("index rebuild: 100000 entries in {took:?} (creating them took {created:?})");
        assert_eq!(store.usage(), (400_000, 100_000));
        assert!(took < std::time::Duration::from_secs(30), "{took:?}");
    }
}

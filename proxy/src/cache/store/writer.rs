//! Writing one blob: batches hashed and written off the async workers,
//! progress published for clients tailing the temp file, then verify,
//! fsync and rename into place (or abort, leaving nothing).

use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use sha2::{Digest as _, Sha256};

use super::index::evict;
use super::{
    BlobMeta, CachedBlob, Inner, Layout, StoreError, blocking, digest_of_hash, fsync_dir, io_err,
};
use crate::oci::Digest;

/// Buffered bytes are hashed and written once this many are pending.
pub(super) const FLUSH_AT: usize = 256 * 1024;

/// While a blob is written, its data is synced to disk in the background
/// every this many bytes, so the fsync before commit (which the client's
/// last byte waits for) only has the tail left to write. Done at the end,
/// it took ~130 ms for 256 MiB here: a fair part of what a single cold
/// fetch took over nginx's, which never fsyncs.
pub(super) const SYNC_EVERY: u64 = 16 << 20;

/// ... or once they have waited this long (so clients tailing the temp
/// file of a slow download see bytes promptly).
pub(super) const FLUSH_AFTER: std::time::Duration = std::time::Duration::from_millis(20);

/// The file and running hash of a write in progress. Taken out while a
/// batch is on the blocking pool; left `None` if that batch failed or was
/// cancelled.
pub(super) struct Sink {
    pub(super) file: fs::File,
    pub(super) hasher: Sha256,
}

/// What a batch written on the blocking pool gives back: the sink, the
/// bytes, and how many were written (or the write error).
pub(super) type Batch = (Sink, Vec<u8>, io::Result<u64>);

/// A temp path removed when dropped, unless disarmed with `take`.
pub(super) struct TempFile(pub(super) Option<PathBuf>);

impl TempFile {
    pub(super) fn take(&mut self) -> Option<PathBuf> {
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
    pub(super) digest: Digest,
    pub(super) meta: BlobMeta,
    pub(super) inner: Arc<Inner>,
    pub(super) temp: TempFile,
    pub(super) sink: Option<Sink>,
    pub(super) pending: Vec<u8>,
    /// Batches written (offset and bytes), until taken.
    pub(super) batches: Vec<(u64, bytes::Bytes)>,
    /// The batch being hashed and written on the blocking pool; it holds
    /// the sink meanwhile. One at a time, so writes stay in order, but the
    /// caller goes on receiving the next batch while this one is written.
    pub(super) in_flight: Option<tokio::task::JoinHandle<Batch>>,
    /// A background `fdatasync` of what was written so far (see
    /// [`SYNC_EVERY`]), and the byte count it was started at.
    pub(super) syncing: Option<tokio::task::JoinHandle<()>>,
    pub(super) synced: u64,
    pub(super) written: u64,
    /// Bytes in the temp file and in the hash (a prefix of `written`).
    pub(super) flushed: u64,
    /// A batch could not be written (disk full, I/O error): the sink still
    /// holds the hash of the `flushed` bytes (see [`abandon`](Self::abandon)),
    /// but nothing more can be written.
    pub(super) write_failed: bool,
    pub(super) last_flush: Instant,
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
    /// hashed and written on the blocking pool every `FLUSH_AT` bytes).
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
    pub(super) async fn flush(&mut self) -> Result<(), StoreError> {
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
    pub(super) fn sync_in_background(&mut self) {
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
    /// the blob, leased (not evicted while it is held). On mismatch: delete
    /// the temp file, `Err(DigestMismatch)`. If the blob already exists
    /// (another writer won the race), the temp file is dropped and the
    /// existing blob returned.
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
            // Leased (in `place`, under the lock that indexes it) before
            // any eviction runs: whoever committed it reads it next, and a
            // full store must not delete it from under them meanwhile.
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
pub(super) fn finish(
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
pub(super) fn place(
    inner: &Inner,
    digest: Digest,
    meta: BlobMeta,
    bytes: u64,
    file: fs::File,
    mut temp: TempFile,
) -> Result<CachedBlob, StoreError> {
    let layout = &inner.layout;
    // Checked again under the lock eviction deletes with: a file being
    // evicted is not taken for a copy.
    let evicting =
        existing(layout, &digest)?.map(|_| inner.fs_lock.lock().unwrap_or_else(|p| p.into_inner()));
    if evicting.is_some()
        && let Some(mut found) = existing(layout, &digest)?
    {
        drop(file);
        drop(temp);
        found.lease = {
            let mut index = inner.index.lock().unwrap_or_else(|p| p.into_inner());
            // A copy the index lost (an eviction whose delete failed, a
            // crash between rename and index) counts again.
            if !index.entries.contains_key(&digest) {
                tracing::warn!(%digest, bytes = found.size, "a cached blob the index had lost is indexed again");
                index.insert(digest.clone(), found.size, SystemTime::now());
            }
            super::lease_locked(&mut index, &inner.index, &digest)
        };
        // Fill in a sidecar an earlier writer did not have, and let a
        // manifest fetched as one be a manifest: the same bytes first
        // stored through `/blobs/` (as octet-stream) would otherwise never
        // be served under `/manifests/` and be fetched again every time.
        let is_manifest = |m: &BlobMeta| {
            m.media_type
                .as_deref()
                .is_some_and(crate::oci::is_manifest_type)
        };
        if (found.meta == BlobMeta::default() && meta != BlobMeta::default())
            || (is_manifest(&meta) && !is_manifest(&found.meta))
        {
            write_meta(layout, &digest, &meta)?;
            fsync_dir(&layout.shard(&digest))?;
            found.meta = meta;
        }
        return Ok(found);
    }
    drop(evicting);
    let temp_path = temp.0.clone().unwrap_or_default();
    file.sync_all().map_err(io_err("fsync", &temp_path))?;
    drop(file);
    // The write handle cannot read; opened before the rename, so that a
    // failure leaves nothing in place unindexed.
    let reader = fs::File::open(&temp_path).map_err(io_err("open", &temp_path))?;
    let _fs = inner.fs_lock.lock().unwrap_or_else(|p| p.into_inner());
    write_meta(layout, &digest, &meta)?;
    let data = layout.data(&digest);
    fs::rename(&temp_path, &data).map_err(io_err("rename into place", &data))?;
    temp.take(); // renamed: nothing left to clean up
    fsync_dir(&layout.shard(&digest))?;
    let lease = {
        let mut index = inner.index.lock().unwrap_or_else(|p| p.into_inner());
        index.insert(digest.clone(), bytes, SystemTime::now());
        super::lease_locked(&mut index, &inner.index, &digest)
    };
    Ok(CachedBlob {
        digest,
        path: data,
        size: bytes,
        meta,
        lease,
        file: Arc::new(reader),
    })
}

/// Writes the meta sidecar atomically (temp file, fsync, rename).
pub(super) fn write_meta(
    layout: &Layout,
    digest: &Digest,
    meta: &BlobMeta,
) -> Result<(), StoreError> {
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

/// The committed data file at `path`, opened, and its size; `None` if it
/// is not there (blocking).
pub(super) fn open_data(path: &Path) -> Result<Option<(fs::File, u64)>, StoreError> {
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("open", path)(e)),
    };
    let md = file.metadata().map_err(io_err("stat", path))?;
    Ok(md.is_file().then_some((file, md.len())))
}

/// The committed blob for `digest`, if any, opened (blocking).
pub(super) fn existing(layout: &Layout, digest: &Digest) -> Result<Option<CachedBlob>, StoreError> {
    let path = layout.data(digest);
    let Some((file, size)) = open_data(&path)? else {
        return Ok(None);
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
        size,
        meta,
        lease: None,
        file: Arc::new(file),
    }))
}

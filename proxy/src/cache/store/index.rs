//! The in-memory index of committed blobs (size, last access, readers),
//! the small objects kept in memory, and LRU eviction under the limits.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use super::{BlobMeta, Inner, StoreError, io_err};
use crate::oci::Digest;

/// Size and last access of one committed blob.
#[derive(Debug, Clone)]
pub struct Entry {
    pub size: u64,
    pub last_access: SystemTime,
    pub(super) readers: u32,
    /// Which indexing of the digest this is: a blob removed (purged) and
    /// committed again is a new entry, and a lease taken on the old one
    /// must not release the new one's readers when it is dropped.
    pub(super) generation: u64,
}

/// Every committed blob, rebuilt from the files at start.
#[derive(Debug, Default)]
pub struct Index {
    pub(super) entries: HashMap<Digest, Entry>,
    pub(super) total: u64,
    /// Bytes of small committed objects (manifests) kept in memory, so a
    /// manifest HIT needs no open/stat/read. Kept here so that whatever
    /// removes an entry (eviction, purge) drops its copy too.
    pub(super) small: HashMap<Digest, (bytes::Bytes, BlobMeta)>,
    pub(super) small_bytes: usize,
    /// The generation the last inserted entry got.
    generation: u64,
}

/// Largest object [`BlobStore::lookup_small`] keeps in memory, and the
/// bound on all of them (manifests are a few KiB; 8 MiB holds thousands).
pub(super) const SMALL_MAX: usize = 256 * 1024;
pub(super) const SMALL_TOTAL: usize = 8 << 20;

impl Index {
    /// Keeps `bytes` of a committed entry in memory, making room by
    /// dropping other copies (any: they are only a shortcut to the file).
    pub(super) fn keep_small(&mut self, digest: &Digest, bytes: &bytes::Bytes, meta: &BlobMeta) {
        if bytes.len() > SMALL_MAX || !self.entries.contains_key(digest) {
            return;
        }
        // Already kept: the bytes are the same (same digest), the meta may
        // have been filled in since.
        if let Some((_, kept)) = self.small.get_mut(digest) {
            *kept = meta.clone();
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

    pub(super) fn insert(&mut self, digest: Digest, size: u64, at: SystemTime) {
        match self.entries.get_mut(&digest) {
            Some(e) => e.last_access = at,
            None => {
                self.total += size;
                self.generation += 1;
                self.entries.insert(
                    digest,
                    Entry {
                        size,
                        last_access: at,
                        readers: 0,
                        generation: self.generation,
                    },
                );
            }
        }
    }

    /// An entry [`Self::remove`] returned, as it was (its readers and
    /// generation too: leases taken on it stay valid).
    pub(super) fn put_back(&mut self, digest: Digest, entry: Entry) {
        if !self.entries.contains_key(&digest) {
            self.total += entry.size;
            self.entries.insert(digest, entry);
        }
    }

    pub(super) fn remove(&mut self, digest: &Digest) -> Option<Entry> {
        if let Some((b, _)) = self.small.remove(digest) {
            self.small_bytes = self.small_bytes.saturating_sub(b.len());
        }
        let e = self.entries.remove(digest)?;
        self.total = self.total.saturating_sub(e.size);
        Some(e)
    }
}

/// Walks `blobs/sha256/<shard>/` and indexes every data file (name = hex
/// digest) with its size and last access (the later of atime and mtime).
pub(super) fn rebuild_index(blobs: &Path) -> Result<Index, StoreError> {
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

/// Removes least recently used blobs (never one being read, never a pinned
/// one) until usage is at the low watermark, once it passed the high one
/// (blocking).
pub(super) fn evict(inner: &Inner) {
    let (Some(high), Some(low)) = (inner.limits.high(), inner.limits.low()) else {
        return;
    };
    let _fs = inner.fs_lock.lock().unwrap_or_else(|p| p.into_inner());
    let victims: Vec<(Digest, u64)> = {
        let mut index = inner.index.lock().unwrap_or_else(|p| p.into_inner());
        if index.total <= high {
            return;
        }
        let wait_until = *inner
            .pins_wait_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some(pinned) = crate::cache::pins::for_eviction(&inner.pinned, wait_until, "disk")
        else {
            return;
        };
        let mut candidates: Vec<(SystemTime, Digest, u64)> = index
            .entries
            .iter()
            .filter(|(d, e)| e.readers == 0 && !pinned.contains(*d))
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
        if total > low {
            tracing::warn!(
                bytes = total,
                low,
                pinned = pinned.len(),
                "cache over its low watermark with nothing left to evict: the rest is pinned or being read"
            );
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

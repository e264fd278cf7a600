//! Pinned images (`cache.pinsFile`, written by the operator from running
//! pods and recent ReplicaSet revisions): their manifests, configs and
//! layers are never evicted, from the disk nor from the shared bucket.
//!
//! A pin names an image; eviction works on digests. Each refresh resolves
//! every pin through what the cache holds: a tag through the tag cache, a
//! manifest (or index, and its cached children) from the store or the
//! bucket. What is not cached yet pins nothing until it is, so the file is
//! read every poll (the config's reload interval) and the set resolved
//! again whenever the file or this replica's store changed, and at least
//! every [`RESOLVE_EVERY`].
//!
//! What a pinned tag pointed at is remembered in the data dir: after a
//! restart the tag cache is empty (and a flood of other tags can push a
//! pinned one out of it), and the pinned image must stay pinned meanwhile.
//!
//! The store and the bucket evict nothing until the pins are first
//! resolved (the least recently used blobs may be exactly what is
//! pinned). A file that cannot be read or parsed must not hold that off
//! for good, or the cache grows until the disk is full: without a good
//! read yet, the pins are what the remembered tags resolve to, logged as
//! an error; and whatever happens to the resolution, eviction waits for
//! it at most [`PINS_WAIT`].

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use pullthrough_api::crd::PinnedStats;
use pullthrough_api::pins::{PinnedImage, Pins};

use crate::oci::{ContentRefs as Manifest, Digest};
use crate::pipeline::Shared;
use crate::pipeline::manifest::MAX_MANIFEST;
use crate::prefetch::Prefetcher;

/// Resolved again at least this often while neither the pins nor this
/// replica's store change.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(30);

/// Longest the store and the bucket evictor hold eviction back for pins
/// not resolved yet; then they evict as if nothing were pinned (and say
/// so) until the pins arrive. The first resolution runs at start and
/// takes milliseconds unless the bucket is slow; the disk's headroom over
/// `maxSize` has to absorb whatever is pulled meanwhile.
pub const PINS_WAIT: Duration = Duration::from_secs(120);

/// In the data dir: pinned tag → the digest it last resolved to.
pub const ROOTS_FILE: &str = "pinned-tags.json";

/// An index names its children, which name their blobs: no deeper.
const MAX_DEPTH: u8 = 2;

/// The resolved pins.
#[derive(Debug, Default)]
pub struct PinSet {
    pub digests: Arc<HashSet<Digest>>,
    /// Per registry host, only where something is pinned.
    pub per_registry: BTreeMap<String, PinnedStats>,
}

/// The pins file as last read, and what it resolved to.
#[derive(Debug, Default)]
pub struct Pinning {
    file: Option<PathBuf>,
    doc: std::sync::Mutex<Option<Vec<u8>>>,
    current: ArcSwap<PinSet>,
    /// Fetches what is pinned but not cached yet.
    prefetch: Option<Arc<Prefetcher>>,
    /// The store's usage (bytes, entries) at the last resolution, and when.
    resolved: std::sync::Mutex<Option<((u64, usize), Instant)>>,
    /// Pinned tag → the digest it last resolved to, and where that is kept.
    roots: std::sync::Mutex<BTreeMap<String, Digest>>,
    roots_file: Option<PathBuf>,
    /// The file was read and parsed at least once: from then on a bad
    /// read keeps the pins of the last good one.
    read_once: std::sync::atomic::AtomicBool,
}

impl Pinning {
    /// `data_dir` keeps what pinned tags resolved to across restarts.
    pub fn new(file: Option<PathBuf>, prefetch: Option<Arc<Prefetcher>>, data_dir: &Path) -> Self {
        let roots_file = file.as_ref().map(|_| data_dir.join(ROOTS_FILE));
        let roots = roots_file.as_deref().map(read_roots).unwrap_or_default();
        Self {
            file,
            prefetch,
            roots: std::sync::Mutex::new(roots),
            roots_file,
            ..Self::default()
        }
    }

    pub fn current(&self) -> Arc<PinSet> {
        self.current.load_full()
    }

    /// Reads the file, and says whether its bytes changed since the last
    /// read. A missing file is no pins (the ConfigMap is written once the
    /// operator saw the cluster's pods); an unreadable or malformed one
    /// keeps the pins of the last good read, and says why. Before any
    /// good read there are no last ones: that is an error, as eviction
    /// then goes on with only the remembered tags pinned.
    fn reload(&self) -> Option<(Pins, bool)> {
        let path = self.file.as_ref()?;
        let first = !self.read_once.load(std::sync::atomic::Ordering::Relaxed);
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) if first => {
                tracing::error!(file = %path.display(), error = %e, "cannot read the pins, and none were read before: eviction goes on, keeping only the images pinned by tag before the restart");
                return None;
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read the pins; keeping the last ones");
                return None;
            }
        };
        let mut last = self.doc.lock().unwrap_or_else(|p| p.into_inner());
        let parsed = if bytes.is_empty() {
            Pins::default()
        } else {
            match serde_json::from_slice::<Pins>(&bytes) {
                Ok(p) => p,
                Err(e) => {
                    if last.as_deref() != Some(&bytes) {
                        if first {
                            tracing::error!(file = %path.display(), error = %e, "the pins are not a pins document, and none were read before: eviction goes on, keeping only the images pinned by tag before the restart");
                        } else {
                            tracing::warn!(file = %path.display(), error = %e, "the pins are not a pins document; keeping the last ones");
                        }
                        *last = Some(bytes);
                    }
                    return None;
                }
            }
        };
        self.read_once
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let changed = last.as_deref() != Some(&bytes);
        if changed {
            tracing::info!(file = %path.display(), images = parsed.images.len(), "pins read");
            *last = Some(bytes);
        }
        Some((parsed, changed))
    }

    /// Reads the file and, when the pins or what this replica's store
    /// holds changed (or [`RESOLVE_EVERY`] passed: the bucket may have
    /// gained what another replica fetched), resolves the pins against
    /// the cache; the new set takes effect for the store and `evictor` at
    /// once. What is not cached whole yet is prefetched.
    pub async fn refresh(
        &self,
        shared: &Arc<Shared>,
        evictor: Option<&crate::cache::shared::Evictor>,
    ) {
        let (doc, changed) = match self.reload() {
            Some(read) => {
                if let Some(p) = &self.prefetch {
                    p.kick(shared, &read.0);
                }
                read
            }
            // A bad read after a good one: the pins in force stay.
            None if self.read_once.load(std::sync::atomic::Ordering::Relaxed) => return,
            // No good read yet: the store and the bucket evict nothing
            // until pins are set, so set what is known (the tags pinned
            // before a restart, kept in the data dir) rather than hold
            // eviction off until someone fixes the file. Not prefetched:
            // they may not be pinned any more.
            None => {
                let images = self
                    .roots
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .keys()
                    .cloned()
                    .collect();
                let doc = Pins {
                    images,
                    ..Pins::default()
                };
                (doc, false)
            }
        };
        // Resolving reads every pinned manifest (from the bucket, for those
        // this replica lacks): not every poll when nothing moved.
        let usage = shared.store.usage();
        let unchanged = self
            .resolved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|(u, at)| u == usage && at.elapsed() < RESOLVE_EVERY);
        if !changed && unchanged {
            return;
        }
        let mut roots = self.roots.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let before = roots.clone();
        let set = resolve(&doc, shared, &mut roots).await;
        if roots != before
            && let Some(path) = &self.roots_file
        {
            write_roots(path, &roots);
        }
        *self.roots.lock().unwrap_or_else(|p| p.into_inner()) = roots;
        *self.resolved.lock().unwrap_or_else(|p| p.into_inner()) = Some((usage, Instant::now()));
        shared.store.pin(Arc::clone(&set.digests));
        if let Some(e) = evictor {
            e.pin(Arc::clone(&set.digests));
        }
        self.current.store(Arc::new(set));
    }

    /// Refreshes at start, then every `every`, until `stop`.
    pub async fn run(
        self: Arc<Self>,
        shared: Arc<Shared>,
        evictor: Option<Arc<crate::cache::shared::Evictor>>,
        every: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        if self.file.is_none() {
            return;
        }
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            self.refresh(&shared, evictor.as_deref()).await;
        }
    }
}

/// The pins eviction goes by (`pinned` as the store or the bucket evictor
/// keeps them): `None` while they are not resolved yet, until
/// `wait_until`; past it, no pins, set so that they are logged once and
/// the pins override them when they come. Nothing is evicted before the
/// pins are known, as what is least recently used may be what is pinned;
/// but not for ever, or a resolution that never ends fills the disk.
pub fn for_eviction(
    pinned: &ArcSwapOption<HashSet<Digest>>,
    wait_until: Instant,
    tier: &'static str,
) -> Option<Arc<HashSet<Digest>>> {
    if let Some(p) = pinned.load_full() {
        return Some(p);
    }
    if Instant::now() < wait_until {
        tracing::debug!(tier, "pins not resolved yet; eviction waits for them");
        return None;
    }
    let none = Arc::new(HashSet::new());
    let before = pinned.compare_and_swap(&None::<Arc<HashSet<Digest>>>, Some(Arc::clone(&none)));
    match before.as_ref() {
        // Resolved meanwhile.
        Some(p) => Some(Arc::clone(p)),
        None => {
            tracing::warn!(
                tier,
                waited_secs = PINS_WAIT.as_secs(),
                "pins still not resolved: evicting as if nothing were pinned until they are"
            );
            Some(none)
        }
    }
}

/// The digests `pins` hold in the cache, with per-registry figures. A
/// pinned tag the tag cache does not know (any more) holds what it last
/// resolved to in `roots`, which follows the tag cache and forgets
/// unpinned images.
pub async fn resolve(pins: &Pins, shared: &Shared, roots: &mut BTreeMap<String, Digest>) -> PinSet {
    roots.retain(|image, _| pins.images.contains(image));
    let mut digests = HashSet::new();
    let mut per_registry: BTreeMap<String, (u64, BTreeMap<Digest, u64>)> = BTreeMap::new();
    for image in &pins.images {
        let Some(p) = PinnedImage::parse(image) else {
            tracing::debug!(image = %image, "pin names no image; skipped");
            continue;
        };
        let root = if p.by_digest() {
            match Digest::parse(&p.reference) {
                Ok(d) => d,
                Err(_) => continue,
            }
        } else {
            match shared.tags.get(&p.registry, &p.repository, &p.reference) {
                Some(t) => {
                    roots.insert(image.clone(), t.digest.clone());
                    t.digest
                }
                None => match roots.get(image) {
                    Some(d) => d.clone(),
                    None => continue,
                },
            }
        };
        let mut held = BTreeMap::new();
        if !walk(shared, &root, 0, &mut held).await {
            continue;
        }
        let entry = per_registry.entry(p.registry.clone()).or_default();
        entry.0 += 1;
        for (d, size) in held {
            digests.insert(d.clone());
            entry.1.insert(d, size);
        }
    }
    let per_registry = per_registry
        .into_iter()
        .map(|(r, (images, blobs))| {
            let stats = PinnedStats {
                images,
                blobs: blobs.len() as u64,
                bytes: blobs.values().sum(),
            };
            (r, stats)
        })
        .collect();
    PinSet {
        digests: Arc::new(digests),
        per_registry,
    }
}

/// Adds the manifest `d` and what it names to `held`; `false` when the
/// manifest itself is not cached.
async fn walk(shared: &Shared, d: &Digest, depth: u8, held: &mut BTreeMap<Digest, u64>) -> bool {
    let Some(bytes) = manifest(shared, d).await else {
        return false;
    };
    held.insert(d.clone(), bytes.len() as u64);
    let Ok(m) = serde_json::from_slice::<Manifest>(&bytes) else {
        return true;
    };
    for desc in m.config.iter().chain(&m.layers) {
        if let Ok(b) = Digest::parse(&desc.digest) {
            held.insert(b, desc.size);
        }
    }
    if depth < MAX_DEPTH {
        for child in &m.manifests {
            if let Ok(c) = Digest::parse(&child.digest) {
                // Children not pulled (other platforms) pin nothing.
                Box::pin(walk(shared, &c, depth + 1, held)).await;
            }
        }
    }
    true
}

/// A cached manifest's bytes, from the disk or else the shared bucket.
async fn manifest(shared: &Shared, d: &Digest) -> Option<Bytes> {
    match shared.store.lookup_small(d, MAX_MANIFEST as u64).await {
        Ok(Some((b, _))) => return Some(b),
        Ok(None) => {}
        Err(e) => tracing::debug!(digest = %d, error = %e, "pinned manifest unreadable"),
    }
    let tier = shared.tier.as_ref()?;
    match tier.read_small_background(d, MAX_MANIFEST as u64).await {
        Ok(found) => found.map(|(b, _)| b),
        Err(e) => {
            tracing::debug!(digest = %d, error = %e, "pinned manifest unreadable from the bucket");
            None
        }
    }
}

/// The remembered tag roots; a missing file is none, an unreadable one is
/// none and says why (the pins resolve again as tags are fetched).
fn read_roots(path: &Path) -> BTreeMap<String, Digest> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return BTreeMap::new(),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot read what pinned tags resolved to");
            return BTreeMap::new();
        }
    };
    match serde_json::from_slice::<BTreeMap<String, String>>(&bytes) {
        Ok(m) => m
            .into_iter()
            .filter_map(|(image, d)| Digest::parse(&d).ok().map(|d| (image, d)))
            .collect(),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "what pinned tags resolved to is not readable; starting without it");
            BTreeMap::new()
        }
    }
}

/// Replaces the file whole, so a crash leaves the old or the new.
fn write_roots(path: &Path, roots: &BTreeMap<String, Digest>) {
    let doc: BTreeMap<&str, String> = roots
        .iter()
        .map(|(image, d)| (image.as_str(), d.to_string()))
        .collect();
    let written = serde_json::to_vec(&doc)
        .map_err(std::io::Error::other)
        .and_then(|bytes| crate::atomic_file::write(path, &bytes, 0o644));
    if let Err(e) = written {
        tracing::warn!(file = %path.display(), error = %e, "cannot keep what pinned tags resolved to");
    }
}

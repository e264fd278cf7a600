//! Keeps the bucket under `storage.maxSize` with all replicas writing to
//! it: one replica at a time evicts, the holder of a lease that is an
//! object in the bucket itself (compare-and-swap on its ETag: no API
//! server needed, works outside Kubernetes). A holder renews it every
//! round, every interval while a round runs, and again before it
//! deletes; another replica takes it over only after seeing the same
//! version for three rounds on its own clock, as Kubernetes leader
//! election does, so no clocks are compared across machines.
//!
//! Least recently used across replicas: each replica writes the digests
//! it served, with when, to its own journal object every round; the
//! evictor orders blobs by the latest of those and their upload time,
//! and never removes one used within `minAge` (a replica may be
//! streaming it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use pullthrough_api::config::SharedStorage;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{SharedTier, TierError, Version};
use crate::bounded::BoundedMap;
use crate::cache::unix_ms;
use crate::oci::Digest;

const LEASE: &str = "evictor";
const JOURNALS: &str = "access";
/// Per-replica coordination files (journals, public access answers) not
/// written for this long belong to replicas gone (named after pod IPs, a
/// restart leaves the old ones behind): the lease holder deletes them, or
/// every round reads more of them. A live replica rewrites its own on the
/// next change; an answer this old is past use anyway
/// ([`crate::pipeline::OUTAGE_GRACE`]).
const STALE_COORD: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often the lease holder looks for such files: not every round (each
/// look LISTs two folders), files a week stale can wait an hour.
const SWEEP_EVERY: Duration = Duration::from_secs(3600);
/// Digests one journal remembers at most (the most recent ones).
const JOURNAL_MAX: usize = 200_000;

/// Digests this replica served, with when (unix milliseconds).
#[derive(Debug)]
pub struct Journal {
    seen: Mutex<BoundedMap<Digest, u64>>,
    dirty: AtomicBool,
}

impl Default for Journal {
    fn default() -> Self {
        Self {
            seen: Mutex::new(BoundedMap::new(JOURNAL_MAX)),
            dirty: AtomicBool::new(false),
        }
    }
}

impl Journal {
    pub fn touch(&self, digest: &Digest) {
        let now = unix_ms(SystemTime::now());
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(digest.clone(), now);
        self.dirty.store(true, Ordering::Relaxed);
    }

    fn encode(&self) -> Option<Bytes> {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return None;
        }
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let file = JournalFile {
            seen: seen
                .keys()
                .filter_map(|d| seen.get(d).map(|t| (d.hex().to_string(), *t)))
                .collect(),
        };
        serde_json::to_vec(&file).ok().map(Bytes::from)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct JournalFile {
    /// sha256 hex → unix milliseconds of the last use.
    seen: HashMap<String, u64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct LeaseFile {
    holder: String,
    /// Unix milliseconds, for people reading the bucket; not used to decide.
    renewed: u64,
}

/// What the evictor did, for metrics and `/status`.
#[derive(Debug, Default)]
pub struct EvictStats {
    pub holder: AtomicBool,
    pub bucket_bytes: AtomicU64,
    pub evictions: AtomicU64,
    pub evicted_bytes: AtomicU64,
}

#[derive(Debug)]
pub struct Evictor {
    tier: Arc<SharedTier>,
    me: String,
    max: u64,
    high: u64,
    low: u64,
    min_age: Duration,
    every: Duration,
    journal: Arc<Journal>,
    pub stats: Arc<EvictStats>,
    /// The lease version as last seen, and since when, on this clock.
    seen: Mutex<Option<(Version, Instant)>>,
    held: Mutex<Option<Version>>,
    /// One lease read-and-write at a time: the renewal beside a round and
    /// the round's own renewal would otherwise both write over the same
    /// version, and the one that lost the compare-and-swap would take it
    /// for the lease lost.
    lease_turn: tokio::sync::Mutex<()>,
    /// The last round stopped at its deadline above the low watermark.
    unfinished: AtomicBool,
    /// [`STALE_COORD`], shorter in tests.
    stale_after: Duration,
    /// When this replica last swept, while holding the lease.
    swept: Mutex<Option<Instant>>,
    /// Digests eviction skips (`cache::pins`); `None` while pins exist
    /// but are not resolved yet (nothing is evicted until they are, or
    /// until `pins_wait_until`: pins that never resolve must not let the
    /// bucket grow for good).
    pinned: arc_swap::ArcSwapOption<std::collections::HashSet<Digest>>,
    pins_wait_until: Instant,
}

impl Evictor {
    /// `None` when the bucket has no `maxSize` (nothing to bound).
    pub fn new(
        tier: Arc<SharedTier>,
        storage: &SharedStorage,
        me: String,
        journal: Arc<Journal>,
        awaits_pins: bool,
    ) -> Option<Self> {
        let max = storage.max_size?.as_u64();
        Some(Self {
            tier,
            me,
            max,
            high: (max as f64 * storage.high_watermark) as u64,
            low: (max as f64 * storage.low_watermark) as u64,
            min_age: storage.min_age,
            every: storage.eviction_interval,
            journal,
            stats: Arc::default(),
            seen: Mutex::new(None),
            held: Mutex::new(None),
            lease_turn: tokio::sync::Mutex::new(()),
            unfinished: AtomicBool::new(false),
            stale_after: STALE_COORD,
            swept: Mutex::new(None),
            pinned: arc_swap::ArcSwapOption::new(
                (!awaits_pins).then(|| Arc::new(std::collections::HashSet::new())),
            ),
            pins_wait_until: Instant::now() + crate::cache::pins::PINS_WAIT,
        })
    }

    /// From now on eviction skips `digests`.
    pub fn pin(&self, digests: Arc<std::collections::HashSet<Digest>>) {
        self.pinned.store(Some(digests));
    }

    /// Writes the journal and, while holding the lease, evicts; every
    /// `evictionInterval` until `stop`.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            if let Err(err) = self.round().await {
                tracing::warn!(error = %err, "shared storage eviction round failed");
            }
            tokio::select! {
                _ = tokio::time::sleep(self.every) => {}
                _ = stop.changed() => return,
            }
        }
    }

    #[cfg(test)]
    pub(super) async fn round_for_test(&self) -> Result<(), TierError> {
        self.round().await
    }

    /// Writes this replica's journal if it changed.
    pub(super) async fn write_journal(&self) -> Result<(), TierError> {
        if let Some(body) = self.journal.encode() {
            self.tier
                .put_coord(&format!("{JOURNALS}/{}.json", self.me), body)
                .await?;
        }
        Ok(())
    }

    async fn round(&self) -> Result<(), TierError> {
        self.write_journal().await?;
        let holder = self.lease().await?;
        self.stats.holder.store(holder, Ordering::Relaxed);
        if holder {
            let work = async {
                let due = {
                    let mut swept = self.swept.lock().unwrap_or_else(|p| p.into_inner());
                    let due = swept.is_none_or(|at| at.elapsed() >= SWEEP_EVERY);
                    if due {
                        *swept = Some(Instant::now());
                    }
                    due
                };
                if due {
                    self.sweep_stale().await?;
                }
                self.evict().await
            };
            self.holding(work).await?;
        }
        Ok(())
    }

    /// Runs `work` while renewing the lease every interval beside it: a
    /// round on a big or slow bucket (listing it, reading the journals)
    /// takes longer than the three intervals after which another replica
    /// takes an unrenewed lease over, and renewed only at its start and
    /// before its deletes, every holder lost the lease mid-round, deleted
    /// nothing, and the bucket grew without bound. The round stops (its
    /// deletes too) the moment a renewal finds the lease lost or fails:
    /// it must not go on beside another holder.
    async fn holding(
        &self,
        work: impl std::future::Future<Output = Result<(), TierError>>,
    ) -> Result<(), TierError> {
        let renew = async {
            let mut every =
                tokio::time::interval_at(tokio::time::Instant::now() + self.every, self.every);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                if !self.lease().await? {
                    return Ok::<(), TierError>(());
                }
            }
        };
        tokio::select! {
            done = work => done,
            lost = renew => {
                self.stats.holder.store(false, Ordering::Relaxed);
                match lost {
                    Ok(()) => {
                        tracing::info!("lost the shared storage eviction lease mid-round; the round stops");
                        Ok(())
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "renewing the shared storage eviction lease failed; the round stops");
                        Err(err)
                    }
                }
            }
        }
    }

    /// Deletes other replicas' coordination files not written for
    /// [`STALE_COORD`].
    async fn sweep_stale(&self) -> Result<(), TierError> {
        let now = SystemTime::now();
        for dir in [JOURNALS, super::grants::DIR] {
            for (name, written) in self.tier.list_coord_dated(dir).await? {
                let mine = name.strip_prefix(dir).and_then(|n| n.strip_prefix('/'))
                    == Some(&format!("{}.json", self.me));
                let age = now.duration_since(written).unwrap_or_default();
                if !mine && age >= self.stale_after {
                    self.tier.delete_coord(&name).await?;
                    tracing::info!(file = %name, age_secs = age.as_secs(), "deleted a gone replica's coordination file");
                }
            }
        }
        Ok(())
    }

    #[cfg(test)]
    pub(super) fn with_stale_after(mut self, d: Duration) -> Self {
        self.stale_after = d;
        self
    }

    /// Waits `d` from now, not [`crate::cache::pins::PINS_WAIT`], for pins.
    #[cfg(test)]
    pub(super) fn with_pins_wait(mut self, d: Duration) -> Self {
        self.pins_wait_until = Instant::now() + d;
        self
    }

    /// Takes or renews the lease; true while this replica holds it.
    async fn lease(&self) -> Result<bool, TierError> {
        let _turn = self.lease_turn.lock().await;
        let body = Bytes::from(
            serde_json::to_vec(&LeaseFile {
                holder: self.me.clone(),
                renewed: unix_ms(SystemTime::now()),
            })
            .unwrap_or_default(),
        );
        let current = self.tier.read_coord(LEASE).await?;
        let expect = match current {
            None => None,
            Some((bytes, version)) => {
                let holder = serde_json::from_slice::<LeaseFile>(&bytes)
                    .map(|l| l.holder)
                    .unwrap_or_default();
                let mine = holder == self.me
                    && self
                        .held
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .as_ref()
                        .is_some_and(|v| v.e_tag == version.e_tag);
                if !mine && !self.expired(&version) {
                    *self.held.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    return Ok(false);
                }
                if !mine {
                    tracing::info!(previous = %holder, "taking over the shared storage eviction lease");
                }
                Some(version)
            }
        };
        let won = self.tier.write_coord(LEASE, body, expect).await?;
        let holds = won.is_some();
        if holds
            && self
                .held
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_none()
        {
            tracing::info!(replica = %self.me, "holding the shared storage eviction lease");
        }
        *self.held.lock().unwrap_or_else(|p| p.into_inner()) = won;
        Ok(holds)
    }

    /// True once the lease has shown the same version for three rounds.
    fn expired(&self, version: &Version) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        match seen.as_ref() {
            Some((v, since)) if v.e_tag == version.e_tag && v.version == version.version => {
                since.elapsed() > self.every * 3
            }
            _ => {
                *seen = Some((version.clone(), Instant::now()));
                false
            }
        }
    }

    /// Deletes least recently used blobs down to the low watermark, for
    /// one interval at most after renewing the lease once the bucket is
    /// listed and the journals read: the journals age as the round goes
    /// on, and a longer round would delete from uses read before blobs
    /// were used again (and, should renewals beside it stall, beside a
    /// new holder). Counted from the renewal, not from the round's start: on a
    /// bucket whose listing takes longer than an interval every round
    /// would otherwise reach its deadline before its first delete, and
    /// the bucket grow without bound.
    async fn evict(&self) -> Result<(), TierError> {
        let started = Instant::now();
        let blobs = self.tier.list_blobs().await?;
        let mut total: u64 = blobs.iter().map(|b| b.size).sum();
        self.stats.bucket_bytes.store(total, Ordering::Relaxed);
        // A round cut short by its deadline goes on down to the low
        // watermark in the next one.
        let unfinished = self.unfinished.swap(false, Ordering::Relaxed);
        if total <= self.high && !(unfinished && total > self.low) {
            return Ok(());
        }
        let used = self.last_uses().await?;
        let mut order: Vec<_> = blobs
            .into_iter()
            .map(|b| {
                let used = used
                    .get(b.digest.hex())
                    .copied()
                    .unwrap_or(0)
                    .max(unix_ms(b.modified));
                (used, b)
            })
            .collect();
        order.sort_by_key(|(used, _)| *used);
        let young = unix_ms(SystemTime::now())
            .saturating_sub(u64::try_from(self.min_age.as_millis()).unwrap_or(u64::MAX));
        let (mut removed, mut bytes) = (0u64, 0u64);
        let Some(pinned) =
            crate::cache::pins::for_eviction(&self.pinned, self.pins_wait_until, "shared storage")
        else {
            tracing::info!("shared storage over its bound; eviction waits for the pins");
            return Ok(());
        };
        let renewed = Instant::now();
        if !self.lease().await? {
            self.stats.holder.store(false, Ordering::Relaxed);
            tracing::info!(
                listed_ms =
                    u64::try_from(renewed.duration_since(started).as_millis()).unwrap_or(u64::MAX),
                "lost the shared storage eviction lease while listing the bucket; deleting nothing"
            );
            return Ok(());
        }
        let deadline = renewed + self.every;
        for (used, blob) in order {
            if total <= self.low {
                break;
            }
            if Instant::now() >= deadline {
                self.unfinished.store(true, Ordering::Relaxed);
                tracing::info!(
                    bytes = total,
                    low = self.low,
                    "shared storage eviction round reached its interval; the next round, with the lease renewed, goes on"
                );
                break;
            }
            if pinned.contains(&blob.digest) {
                continue;
            }
            if used > young {
                tracing::warn!(
                    bytes = total,
                    max = self.max,
                    "shared storage over its bound but every remaining blob was used within minAge"
                );
                break;
            }
            self.tier.delete(&blob.digest).await?;
            total = total.saturating_sub(blob.size);
            removed += 1;
            bytes += blob.size;
        }
        self.stats.evictions.fetch_add(removed, Ordering::Relaxed);
        self.stats.evicted_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.stats.bucket_bytes.store(total, Ordering::Relaxed);
        tracing::info!(
            removed,
            bytes,
            left = total,
            max = self.max,
            "shared storage evicted least recently used blobs"
        );
        Ok(())
    }

    /// The latest use of each digest over every replica's journal.
    async fn last_uses(&self) -> Result<HashMap<String, u64>, TierError> {
        let mut used: HashMap<String, u64> = HashMap::new();
        for name in self.tier.list_coord(JOURNALS).await? {
            let Some((bytes, _)) = self.tier.read_coord(&name).await? else {
                continue;
            };
            let Ok(file) = serde_json::from_slice::<JournalFile>(&bytes) else {
                tracing::warn!(journal = %name, "unreadable access journal skipped");
                continue;
            };
            for (hex, t) in file.seen {
                let e = used.entry(hex).or_insert(0);
                *e = (*e).max(t);
            }
        }
        Ok(used)
    }
}

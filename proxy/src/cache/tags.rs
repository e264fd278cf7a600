//! Tag → digest answers, per (registry, repository, tag), reused as the
//! registry's tag policy allows and served stale through an upstream
//! outage. Bounded: clients choose repository and tag names, so a flood of
//! made-up ones evicts the oldest answers instead of growing without limit,
//! and each answer counts against the source whose request wrote it, so a
//! flood from one client address pushes out its own answers, not the ones
//! other clients are served from through an upstream outage.
//!
//! Each answer keeps a short history of the digests the tag pointed at
//! before, and a tag seen pointing somewhere new is a *move*: counted, and
//! kept in a short list of recent moves that `/status` reports (the
//! operator turns them into Events on the MirrorRegistry).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

pub use pullthrough_api::tags::TagMove;

use prometheus_client::metrics::counter::Counter;

use crate::bounded::BoundedMap;
use crate::observe::metric_labels::SharedMap;
use crate::observe::metrics::Metrics;
use crate::oci::Digest;
use crate::source::{self, Source};

/// Tag answers kept at most; far more tags than a cluster pulls from.
pub const MAX_TAGS: usize = 50_000;
/// Earlier digests kept per tag.
pub const HISTORY: usize = 4;
/// Recent moves kept for `/status`.
pub const RECENT_MOVES: usize = 64;

/// What a tag resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagEntry {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    /// When the upstream last confirmed it (freshness is measured from here).
    pub resolved_at: Instant,
    /// When the tag was first seen at this digest.
    pub since: SystemTime,
    /// Earlier digests, newest first, with when the tag left each.
    pub previous: Vec<(Digest, SystemTime)>,
    /// The last digest seen per media type: a move is a new digest in the
    /// same representation, whatever clients asked in between.
    last_by_type: Vec<(String, Digest)>,
    /// Whether the ask took platform lists, so that the answer is what
    /// the tag holds; otherwise it may be one platform's manifest the
    /// registry picked out of a list, right only for clients that take no
    /// list either.
    pub whole: bool,
}

impl TagEntry {
    pub fn new(digest: Digest, media_type: String, size: u64, whole: bool) -> Self {
        Self {
            whole,
            digest,
            media_type,
            size,
            resolved_at: Instant::now(),
            since: SystemTime::now(),
            previous: Vec::new(),
            last_by_type: Vec::new(),
        }
    }
}

type Key = (String, String, String);
/// A key as the maps hold it: the map, its write order and its writer's
/// share each keep one, so the names are stored once.
type Held = Arc<Key>;

#[derive(Debug)]
pub struct TagCache {
    entries: Mutex<BoundedMap<Held, TagEntry, Source>>,
    moves: Mutex<VecDeque<TagMove>>,
    /// Referrers tag-schema tags (`sha256-<hex>`) the upstream said do not
    /// exist: "no referrers", still answered in an outage.
    absent: Mutex<BoundedMap<Held, (), Source>>,
    /// Entries each map dropped to keep a source to its share.
    shed: (Counter, Counter),
}

/// A tag of the OCI referrers tag schema: `sha256-<64 hex>`.
pub fn is_referrers_tag(tag: &str) -> bool {
    tag.strip_prefix("sha256-")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl Default for TagCache {
    fn default() -> Self {
        Self::with_capacity(MAX_TAGS)
    }
}

impl TagCache {
    pub fn with_capacity(cap: usize) -> Self {
        let share = source::share(cap);
        Self {
            entries: Mutex::new(BoundedMap::with_share(cap, share)),
            moves: Mutex::new(VecDeque::with_capacity(RECENT_MOVES)),
            absent: Mutex::new(BoundedMap::with_share(cap, share)),
            shed: Default::default(),
        }
    }

    /// Counts what the maps drop to keep sources to their shares in
    /// `metrics`.
    pub fn counted(mut self, metrics: &Metrics) -> Self {
        self.shed = (
            metrics.share_evictions(SharedMap::tags),
            metrics.share_evictions(SharedMap::absent_tags),
        );
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BoundedMap<Held, TagEntry, Source>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, registry: &str, repo: &str, tag: &str) -> Option<TagEntry> {
        let key = (registry.to_string(), repo.to_string(), tag.to_string());
        self.lock().get(&key).cloned()
    }

    /// Stores what the upstream answered for the tag. Returns the move when
    /// the tag pointed elsewhere before *in the same representation*: a
    /// client that accepts only single-platform manifests is answered with
    /// another digest than one accepting indexes, without anything moving.
    /// A narrow answer (not [`TagEntry::whole`]) does not replace a whole
    /// one: runtimes, which take lists, keep being answered from the cache.
    /// The answer counts against `source`, whose request got it.
    pub fn put(
        &self,
        registry: &str,
        repo: &str,
        tag: &str,
        mut entry: TagEntry,
        source: Source,
    ) -> Option<TagMove> {
        let key = (registry.to_string(), repo.to_string(), tag.to_string());
        let mut entries = self.lock();
        let mut moved = None;
        if let Some(old) = entries.get(&key) {
            entry.previous = old.previous.clone();
            entry.last_by_type = old.last_by_type.clone();
            if old.digest == entry.digest {
                entry.since = old.since;
            }
            let before = (old.last_by_type.iter())
                .find(|(mt, _)| *mt == entry.media_type)
                .map(|(_, d)| d.clone());
            if let Some(before) = before
                && before != entry.digest
            {
                let now = SystemTime::now();
                entry.previous = std::iter::once((before.clone(), now))
                    .chain(old.previous.iter().cloned())
                    .take(HISTORY)
                    .collect();
                moved = Some(TagMove {
                    registry: registry.to_string(),
                    repository: repo.to_string(),
                    tag: tag.to_string(),
                    from: before.to_string(),
                    to: entry.digest.to_string(),
                    at: i64::try_from(super::unix_ms(now)).unwrap_or(i64::MAX),
                });
            }
        }
        entry.last_by_type.retain(|(mt, _)| *mt != entry.media_type);
        entry
            .last_by_type
            .insert(0, (entry.media_type.clone(), entry.digest.clone()));
        entry.last_by_type.truncate(HISTORY);
        let entry = match entries.get(&key) {
            Some(old) if old.whole && !entry.whole => TagEntry {
                previous: entry.previous,
                last_by_type: entry.last_by_type,
                ..old.clone()
            },
            _ => entry,
        };
        let shed = entries.insert_by(Arc::new(key), entry, source);
        drop(entries);
        self.shed.0.inc_by(shed as u64);
        if let Some(m) = &moved {
            let mut moves = self
                .moves
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if moves.len() == RECENT_MOVES {
                moves.pop_front();
            }
            moves.push_back(m.clone());
        }
        moved
    }

    /// Remembers that the upstream told `source` it has no such
    /// referrers-schema tag.
    pub fn note_absent(&self, registry: &str, repo: &str, tag: &str, source: Source) {
        if is_referrers_tag(tag) {
            let key = (registry.to_string(), repo.to_string(), tag.to_string());
            let shed = self
                .absent
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .insert_by(Arc::new(key), (), source);
            self.shed.1.inc_by(shed as u64);
        }
    }

    /// Whether the upstream last said this referrers-schema tag does not
    /// exist (and nothing has been stored under it since).
    pub fn was_absent(&self, registry: &str, repo: &str, tag: &str) -> bool {
        let key = (registry.to_string(), repo.to_string(), tag.to_string());
        self.absent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&key)
            .is_some()
            && self.lock().get(&key).is_none()
    }

    /// Marks the answer as just confirmed by the upstream (a revalidation
    /// for `source`'s request found the tag where it was).
    pub fn confirm(&self, registry: &str, repo: &str, tag: &str, digest: &Digest, source: Source) {
        let key = (registry.to_string(), repo.to_string(), tag.to_string());
        let mut entries = self.lock();
        if let Some(e) = entries.get(&key).filter(|e| &e.digest == digest) {
            let mut e = e.clone();
            e.resolved_at = Instant::now();
            // An existing key: nothing is dropped.
            entries.insert_by(Arc::new(key), e, source);
        }
    }

    /// The last [`RECENT_MOVES`] moves, oldest first.
    pub fn recent_moves(&self) -> Vec<TagMove> {
        self.moves
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Every answer of matching repositories (None matches any), for the
    /// admin API: `(registry, repository, tag, entry)`.
    pub fn list(&self, registry: Option<&str>, repo: Option<&str>) -> Vec<(Key, TagEntry)> {
        let entries = self.lock();
        let mut out: Vec<(Key, TagEntry)> = entries
            .keys()
            .map(|k| &**k)
            .filter(|(r, p, _)| registry.is_none_or(|x| x == r) && repo.is_none_or(|x| x == p))
            .filter_map(|k| entries.get(k).map(|e| (k.clone(), e.clone())))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Drops the tags of matching repositories (None matches any).
    pub fn purge(&self, registry: Option<&str>, repo: Option<&str>) {
        let keep =
            |(r, p, _): &Key| !(registry.is_none_or(|x| x == r) && repo.is_none_or(|x| x == p));
        self.lock().retain(|k, _| keep(k.as_ref()));
        self.absent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .retain(|k, _| keep(k.as_ref()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Source = Source::Addr(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));

    fn entry(body: &[u8], media_type: &str) -> TagEntry {
        TagEntry::new(Digest::of(body), media_type.into(), 1, true)
    }

    #[test]
    fn absent_referrers_tags_are_remembered_until_one_exists() {
        let cache = TagCache::default();
        let tag = format!("sha256-{}", "ab".repeat(32));
        cache.note_absent("r", "a", "latest", S);
        assert!(!cache.was_absent("r", "a", "latest"), "only referrers tags");
        cache.note_absent("r", "a", &tag, S);
        assert!(cache.was_absent("r", "a", &tag));
        assert!(!cache.was_absent("r", "b", &tag));
        cache.put("r", "a", &tag, entry(b"index", "m"), S);
        assert!(!cache.was_absent("r", "a", &tag));
        assert!(!is_referrers_tag("sha256-abc"));
    }

    #[test]
    fn entries_are_per_registry() {
        let cache = TagCache::default();
        let e = entry(b"x", "m");
        assert_eq!(cache.put("quay.io", "a", "1", e.clone(), S), None);
        assert_eq!(
            cache.get("quay.io", "a", "1").map(|x| x.digest),
            Some(e.digest)
        );
        assert_eq!(cache.get("docker.io", "a", "1"), None);
    }

    #[test]
    fn a_tag_that_moves_is_counted_and_remembered() {
        let cache = TagCache::default();
        let oci = "application/vnd.oci.image.index.v1+json";
        cache.put("quay.io", "app", "latest", entry(b"v1", oci), S);
        // The same digest again: no move, history unchanged.
        assert_eq!(
            cache.put("quay.io", "app", "latest", entry(b"v1", oci), S),
            None
        );
        let m = cache
            .put("quay.io", "app", "latest", entry(b"v2", oci), S)
            .unwrap();
        assert_eq!(
            (m.from.as_str(), m.to.as_str()),
            (Digest::of(b"v1").as_str(), Digest::of(b"v2").as_str())
        );
        assert_eq!((m.repository.as_str(), m.tag.as_str()), ("app", "latest"));
        // Another representation (an old client's single manifest) is not
        // a move, and does not lose the history.
        let single = "application/vnd.docker.distribution.manifest.v2+json";
        assert_eq!(
            cache.put("quay.io", "app", "latest", entry(b"amd64", single), S),
            None
        );
        for v in [b"v3", b"v4", b"v5", b"v6", b"v7"] {
            cache.put("quay.io", "app", "latest", entry(v, oci), S);
        }
        let e = cache.get("quay.io", "app", "latest").unwrap();
        assert_eq!(e.digest, Digest::of(b"v7"));
        let previous: Vec<Digest> = e.previous.iter().map(|(d, _)| d.clone()).collect();
        assert_eq!(
            previous,
            [b"v6", b"v5", b"v4", b"v3"].map(|v| Digest::of(v)),
            "newest first, {HISTORY} kept"
        );
        // v1→v2, then v3..v7 each moved from the one before (v2→v3 included).
        assert_eq!(cache.recent_moves().len(), 6);
    }

    #[test]
    fn recent_moves_are_bounded_oldest_dropped() {
        let cache = TagCache::default();
        for i in 0..(RECENT_MOVES + 10) {
            cache.put("r", "a", "t", entry(i.to_string().as_bytes(), "m"), S);
        }
        let moves = cache.recent_moves();
        assert_eq!(moves.len(), RECENT_MOVES);
        assert_eq!(moves[RECENT_MOVES - 1].to, Digest::of(b"73").to_string());
    }

    #[test]
    fn confirm_refreshes_only_the_same_digest() {
        let cache = TagCache::default();
        let mut e = entry(b"x", "m");
        e.resolved_at = Instant::now() - std::time::Duration::from_secs(60);
        cache.put("r", "a", "t", e.clone(), S);
        cache.confirm("r", "a", "t", &Digest::of(b"other"), S);
        assert!(
            cache
                .get("r", "a", "t")
                .unwrap()
                .resolved_at
                .elapsed()
                .as_secs()
                >= 60
        );
        cache.confirm("r", "a", "t", &e.digest, S);
        assert!(
            cache
                .get("r", "a", "t")
                .unwrap()
                .resolved_at
                .elapsed()
                .as_secs()
                < 60
        );
    }

    /// Tags from one client address, as many as the cache holds and
    /// more, push out that address's own answers: another address's tag
    /// (and its "no referrers" answer) is still answered in an outage.
    #[test]
    fn a_flood_of_tags_from_one_address_keeps_the_others() {
        let cache = TagCache::with_capacity(1000);
        let other = Source::Addr(std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2)));
        let referrers = format!("sha256-{}", "ab".repeat(32));
        cache.put("quay.io", "app", "1", entry(b"app", "m"), other);
        cache.note_absent("quay.io", "app", &referrers, other);
        for i in 0..10_000 {
            let tag = format!("sha256-{i:064x}");
            cache.put("quay.io", "flood", &i.to_string(), entry(b"x", "m"), S);
            cache.note_absent("quay.io", "flood", &tag, S);
        }
        assert_eq!(cache.len(), 1000);
        assert!(cache.get("quay.io", "app", "1").is_some());
        assert!(cache.was_absent("quay.io", "app", &referrers));
        assert!(cache.get("quay.io", "flood", "9999").is_some());
    }

    /// Issue #10, point 7: 100 000 made-up repositories keep the cache at
    /// its cap, and what was written last is still there.
    #[test]
    fn a_flood_of_made_up_tags_keeps_the_cache_at_its_cap() {
        let cache = TagCache::with_capacity(1000);
        let e = entry(b"x", "m");
        for i in 0..100_000 {
            cache.put("quay.io", &format!("flood/{i}"), "latest", e.clone(), S);
            assert!(cache.len() <= 1000);
        }
        assert_eq!(cache.len(), 1000);
        assert!(cache.get("quay.io", "flood/99999", "latest").is_some());
        assert!(cache.get("quay.io", "flood/0", "latest").is_none());
    }
}

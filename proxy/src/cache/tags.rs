//! Tag → digest answers, per (registry, repository, tag), reused for the
//! registry's `tagTTL` and served stale through an upstream outage. Bounded:
//! clients choose repository and tag names, so a flood of made-up ones
//! evicts the oldest answers instead of growing without limit.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::bounded::BoundedMap;
use crate::oci::Digest;

/// Tag answers kept at most; far more tags than a cluster pulls from.
pub const MAX_TAGS: usize = 50_000;

/// What a tag resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagEntry {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    pub resolved_at: Instant,
}

impl TagEntry {
    pub fn is_fresh(&self, ttl: Duration) -> bool {
        self.resolved_at.elapsed() < ttl
    }
}

type Key = (String, String, String);

#[derive(Debug)]
pub struct TagCache {
    entries: Mutex<BoundedMap<Key, TagEntry>>,
}

impl Default for TagCache {
    fn default() -> Self {
        Self::with_capacity(MAX_TAGS)
    }
}

impl TagCache {
    pub fn with_capacity(cap: usize) -> Self {
        Self {
            entries: Mutex::new(BoundedMap::new(cap)),
        }
    }

    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, registry: &str, repo: &str, tag: &str) -> Option<TagEntry> {
        let key = (registry.to_string(), repo.to_string(), tag.to_string());
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&key)
            .cloned()
    }

    pub fn put(&self, registry: &str, repo: &str, tag: &str, entry: TagEntry) {
        let key = (registry.to_string(), repo.to_string(), tag.to_string());
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(key, entry);
    }
}

impl TagCache {
    /// Drops the tags of matching repositories (None matches any).
    pub fn purge(&self, registry: Option<&str>, repo: Option<&str>) {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .retain(|(r, p, _), _| {
                !(registry.is_none_or(|x| x == r) && repo.is_none_or(|x| x == p))
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_per_registry_and_expire() {
        let cache = TagCache::default();
        let d = Digest::of(b"x");
        let entry = TagEntry {
            digest: d.clone(),
            media_type: "m".into(),
            size: 1,
            resolved_at: Instant::now(),
        };
        cache.put("quay.io", "a", "1", entry.clone());
        assert_eq!(cache.get("quay.io", "a", "1"), Some(entry.clone()));
        assert_eq!(cache.get("docker.io", "a", "1"), None);
        assert!(entry.is_fresh(Duration::from_secs(60)));
        assert!(!entry.is_fresh(Duration::ZERO));
    }

    /// Issue #10, point 7: 100 000 made-up repositories keep the cache at
    /// its cap, and what was written last is still there.
    #[test]
    fn a_flood_of_made_up_tags_keeps_the_cache_at_its_cap() {
        let cache = TagCache::with_capacity(1000);
        let entry = TagEntry {
            digest: Digest::of(b"x"),
            media_type: "m".into(),
            size: 1,
            resolved_at: Instant::now(),
        };
        for i in 0..100_000 {
            cache.put("quay.io", &format!("flood/{i}"), "latest", entry.clone());
            assert!(cache.len() <= 1000);
        }
        assert_eq!(cache.len(), 1000);
        assert!(cache.get("quay.io", "flood/99999", "latest").is_some());
        assert!(cache.get("quay.io", "flood/0", "latest").is_none());
    }
}

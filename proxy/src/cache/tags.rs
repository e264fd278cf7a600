//! Tag → digest answers, per (registry, repository, tag), reused for the
//! registry's `tagTTL`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::oci::Digest;

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

#[derive(Debug, Default)]
pub struct TagCache {
    entries: Mutex<HashMap<Key, TagEntry>>,
}

impl TagCache {
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
}

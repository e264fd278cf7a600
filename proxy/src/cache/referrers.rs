//! Referrers answers (`GET /v2/<repo>/referrers/<digest>`, OCI 1.1): per
//! (registry, repository, subject digest, query), which index the upstream
//! answered with — the index itself is stored by its digest like any
//! manifest (on disk, evicted with the rest) — or that the upstream has no
//! referrers API (404: clients then fall back to the `sha256-<hex>` tag
//! schema, whose tags are cached as tags). Bounded like the tag cache.

use std::sync::Mutex;
use std::time::Instant;

use crate::bounded::BoundedMap;
use crate::oci::Digest;

/// Answers kept at most.
pub const MAX_REFERRERS: usize = 20_000;

/// Longest query kept as part of a key. Clients send `artifactType=<media
/// type>` (media types are at most 255 bytes, RFC 6838); a longer query is
/// answered but not cached, so that 20,000 keys cannot each hold a request
/// line's worth of bytes.
pub const MAX_QUERY: usize = 512;

/// What the upstream answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Referrers {
    /// `200`: the index with this digest (stored like a manifest).
    Index {
        digest: Digest,
        /// `OCI-Filters-Applied`, when the upstream filtered by artifactType.
        filters_applied: Option<String>,
    },
    /// `404`: no referrers API here.
    Unsupported,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub referrers: Referrers,
    pub fetched: Instant,
}

/// (registry, repository, subject digest, query).
type Key = (String, String, String, String);

#[derive(Debug)]
pub struct ReferrersCache {
    entries: Mutex<BoundedMap<Key, Answer>>,
}

impl Default for ReferrersCache {
    fn default() -> Self {
        Self {
            entries: Mutex::new(BoundedMap::new(MAX_REFERRERS)),
        }
    }
}

fn key(registry: &str, repo: &str, subject: &Digest, query: &str) -> Key {
    (
        registry.to_string(),
        repo.to_string(),
        subject.to_string(),
        query.to_string(),
    )
}

impl ReferrersCache {
    pub fn get(&self, registry: &str, repo: &str, subject: &Digest, query: &str) -> Option<Answer> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&key(registry, repo, subject, query))
            .cloned()
    }

    pub fn put(
        &self,
        registry: &str,
        repo: &str,
        subject: &Digest,
        query: &str,
        referrers: Referrers,
    ) {
        if query.len() > MAX_QUERY {
            return;
        }
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(
                key(registry, repo, subject, query),
                Answer {
                    referrers,
                    fetched: Instant::now(),
                },
            );
    }

    /// Drops the answers of matching repositories (None matches any).
    pub fn purge(&self, registry: Option<&str>, repo: Option<&str>) {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .retain(|(r, p, _, _), _| {
                !(registry.is_none_or(|x| x == r) && repo.is_none_or(|x| x == p))
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_longer_than_a_filter_is_not_kept() {
        let cache = ReferrersCache::default();
        let subject = Digest::of(b"subject");
        let long = format!("artifactType={}", "x".repeat(MAX_QUERY));
        cache.put("r", "a", &subject, &long, Referrers::Unsupported);
        assert_eq!(cache.get("r", "a", &subject, &long), None);
        let fits = format!("artifactType={}", "x".repeat(255));
        cache.put("r", "a", &subject, &fits, Referrers::Unsupported);
        assert!(cache.get("r", "a", &subject, &fits).is_some());
    }

    #[test]
    fn answers_are_per_subject_and_filter_and_bounded() {
        let cache = ReferrersCache::default();
        let subject = Digest::of(b"subject");
        let index = Referrers::Index {
            digest: Digest::of(b"index"),
            filters_applied: None,
        };
        cache.put("r", "a", &subject, "", index.clone());
        cache.put("r", "a", &subject, "artifactType=x", Referrers::Unsupported);
        assert_eq!(cache.get("r", "a", &subject, "").unwrap().referrers, index);
        assert_eq!(
            cache
                .get("r", "a", &subject, "artifactType=x")
                .unwrap()
                .referrers,
            Referrers::Unsupported
        );
        assert!(cache.get("r", "b", &subject, "").is_none());
        cache.purge(Some("r"), Some("a"));
        assert!(cache.get("r", "a", &subject, "").is_none());
        for i in 0..(MAX_REFERRERS + 5) {
            cache.put("r", &i.to_string(), &subject, "", Referrers::Unsupported);
        }
        let n = cache.entries.lock().unwrap().len();
        assert_eq!(n, MAX_REFERRERS);
    }
}

//! Referrers answers (`GET /v2/<repo>/referrers/<digest>`, OCI 1.1): per
//! (registry, repository, subject digest, query), which index the upstream
//! answered with — the index itself is stored by its digest like any
//! manifest (on disk, evicted with the rest) — or that the upstream has no
//! referrers API (404: clients then fall back to the `sha256-<hex>` tag
//! schema, whose tags are cached as tags). Bounded like the tag cache,
//! with a share per source.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;

use crate::bounded::BoundedMap;
use crate::observe::metric_labels::SharedMap;
use crate::observe::metrics::Metrics;
use crate::oci::Digest;
use crate::source::{self, Source};

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
/// A key as the map holds it: the map, its write order and its writer's
/// share each keep one, so the names are stored once.
type Held = Arc<Key>;

#[derive(Debug)]
pub struct ReferrersCache {
    entries: Mutex<BoundedMap<Held, Answer, Source>>,
    /// Entries dropped to keep a source to its share.
    shed: Counter,
}

impl Default for ReferrersCache {
    fn default() -> Self {
        Self {
            entries: Mutex::new(BoundedMap::with_share(
                MAX_REFERRERS,
                source::share(MAX_REFERRERS),
            )),
            shed: Counter::default(),
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
    /// Counts what the map drops to keep sources to their shares in
    /// `metrics`.
    pub fn counted(mut self, metrics: &Metrics) -> Self {
        self.shed = metrics.share_evictions(SharedMap::referrers);
        self
    }

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
        source: Source,
    ) {
        if query.len() > MAX_QUERY {
            return;
        }
        let answer = Answer {
            referrers,
            fetched: Instant::now(),
        };
        let shed = self
            .entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert_by(
                Arc::new(key(registry, repo, subject, query)),
                answer,
                source,
            );
        self.shed.inc_by(shed as u64);
    }

    /// Drops the answers of matching repositories (None matches any).
    pub fn purge(&self, registry: Option<&str>, repo: Option<&str>) {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .retain(|k, _| {
                let (r, p, _, _) = k.as_ref();
                !(registry.is_none_or(|x| x == r) && repo.is_none_or(|x| x == p))
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Source = Source::Addr(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));

    #[test]
    fn a_query_longer_than_a_filter_is_not_kept() {
        let cache = ReferrersCache::default();
        let subject = Digest::of(b"subject");
        let long = format!("artifactType={}", "x".repeat(MAX_QUERY));
        cache.put("r", "a", &subject, &long, Referrers::Unsupported, S);
        assert_eq!(cache.get("r", "a", &subject, &long), None);
        let fits = format!("artifactType={}", "x".repeat(255));
        cache.put("r", "a", &subject, &fits, Referrers::Unsupported, S);
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
        cache.put("r", "a", &subject, "", index.clone(), S);
        cache.put(
            "r",
            "a",
            &subject,
            "artifactType=x",
            Referrers::Unsupported,
            S,
        );
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
            cache.put("r", &i.to_string(), &subject, "", Referrers::Unsupported, S);
        }
        let n = cache.entries.lock().unwrap().len();
        assert_eq!(n, MAX_REFERRERS);
    }
}

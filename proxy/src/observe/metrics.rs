//! Prometheus metrics per registry, served at `/metrics` on the admin
//! listener (OpenMetrics text).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::labels::{CacheResult, Kind};
use super::metric_labels::{
    AuthLabels, AuthResult, BudgetLabels, BytesLabels, MapLabels, PrefetchLabels, PurgeLabels,
    PurgeOutcome, PurgeScope, RegistryLabel, RequestLabels, ResultLabel, Revalidation,
    RevalidationLabels, SharedMap, Source, UploadLabels, UploadResult,
};

/// What `/status` reports per registry: the operator copies it into the
/// MirrorRegistry's `status.cache`.
pub use pullthrough_api::crd::CacheStats as CacheCounters;

/// Every metric the proxy exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    bytes: Family<BytesLabels, Counter>,
    sendfile_bytes: Counter,
    sendfile_cold_bytes: Counter,
    refused_per_source: Counter,
    share_evictions: Family<MapLabels, Counter>,
    purges: Family<PurgeLabels, Counter>,
    purged_bytes: Counter,
    duration: Family<RegistryLabel, Histogram, fn() -> Histogram>,
    upstream: Family<RegistryLabel, Histogram, fn() -> Histogram>,
    merged: Family<RegistryLabel, Counter>,
    auth_checks: Family<AuthLabels, Counter>,
    tokens_throttled: Family<RegistryLabel, Counter>,
    tag_moves: Family<RegistryLabel, Counter>,
    tag_revalidations: Family<RevalidationLabels, Counter>,
    ratelimit_limit: Family<BudgetLabels, Gauge>,
    ratelimit_remaining: Family<BudgetLabels, Gauge>,
    budget_low: Family<RegistryLabel, Gauge>,
    pinned_bytes: Family<RegistryLabel, Gauge>,
    prefetches: Family<PrefetchLabels, Counter>,
    upstream_throttled: Family<RegistryLabel, Counter>,
    cache_bytes: Gauge,
    cache_max_bytes: Gauge,
    cache_entries: Gauge,
    evictions: Counter,
    evicted_bytes: Counter,
    disk_full: Counter,
    ca_reloads: Counter,
    ca_reload_errors: Counter,
    ca_not_after: Gauge,
    shared_up: Gauge,
    shared_errors: Counter,
    shared_uploads: Family<UploadLabels, Counter>,
    shared_uploaded_bytes: Counter,
    shared_evictor: Gauge,
    shared_bucket_bytes: Gauge,
    shared_evictions: Counter,
    shared_evicted_bytes: Counter,
}

/// The shared storage's figures, copied into the metrics at each scrape.
#[derive(Debug, Clone, Copy)]
pub struct SharedFigures {
    pub up: bool,
    pub errors: u64,
    pub uploads: [(UploadResult, u64); 4],
    pub uploaded_bytes: u64,
    /// With `storage.maxSize`: whether this replica holds the eviction
    /// lease, the bucket's size at its last check, what it evicted.
    pub evictor: Option<EvictorFigures>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct EvictorFigures {
    pub holder: bool,
    pub bucket_bytes: u64,
    pub evictions: u64,
    pub evicted_bytes: u64,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("pullthrough");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by registry, kind and result (hit, miss, stale, pass, denied, error)",
            requests.clone(),
        );
        let bytes = Family::<BytesLabels, Counter>::default();
        registry.register(
            "served_bytes",
            "Body bytes sent to clients, from the cache or relayed from the upstream",
            bytes.clone(),
        );
        let sendfile_bytes = Counter::default();
        registry.register(
            "sendfile_bytes",
            "Of the cache's served bytes, those sent from the file with sendfile (plain HTTP/1 blob hits)",
            sendfile_bytes.clone(),
        );
        let sendfile_cold_bytes = Counter::default();
        registry.register(
            "sendfile_cold_bytes",
            "Of plain HTTP/1 blob hits, bytes read from the disk and sent as ordinary bytes because their pages were not in memory (sendfile would have read them on a runtime thread)",
            sendfile_cold_bytes.clone(),
        );
        let refused_per_source = Counter::default();
        registry.register(
            "connections_refused_per_source",
            "Connections closed at once because their client address held limits.maxConnectionsPerSource already",
            refused_per_source.clone(),
        );
        let share_evictions = Family::<MapLabels, Counter>::default();
        registry.register(
            "share_evictions",
            "Entries a full in-memory map (access grants, tags, referrers) dropped because the client address that wrote them held its share of the map or more: a flood from one address pushes out its own entries",
            share_evictions.clone(),
        );
        let purges = Family::<PurgeLabels, Counter>::default();
        registry.register(
            "purges",
            "Admin purges (DELETE /admin/cache) by scope (all, local, or for_replica: done here for the replica an admin asked) and outcome (incomplete: some replica or the bucket not confirmed; repeat it)",
            purges.clone(),
        );
        let purged_bytes = Counter::default();
        registry.register(
            "purged_bytes",
            "Bytes of blobs purges removed from this replica's disk",
            purged_bytes.clone(),
        );
        let duration = Family::<RegistryLabel, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to the end of the response body",
            duration.clone(),
        );
        let upstream = Family::<RegistryLabel, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register(
            "upstream_response_seconds",
            "Time until the upstream's response headers arrived",
            upstream.clone(),
        );
        let merged = Family::<RegistryLabel, Counter>::default();
        registry.register(
            "merged_waiters",
            "Requests for a blob that joined a download already in flight instead of fetching it again",
            merged.clone(),
        );
        let auth_checks = Family::<AuthLabels, Counter>::default();
        registry.register(
            "auth_checks",
            "Upstream access checks before serving cached content, by result",
            auth_checks.clone(),
        );
        let tokens_throttled = Family::<RegistryLabel, Counter>::default();
        registry.register(
            "token_requests_throttled",
            "Requests answered 429 because a token for a repository never read with the registry's credentialsFile was not asked for (limits.newRepositoryTokensPerMinute)",
            tokens_throttled.clone(),
        );
        let tag_moves = Family::<RegistryLabel, Counter>::default();
        registry.register(
            "tag_moves",
            "Tags seen pointing at a new digest (same media type) since the start",
            tag_moves.clone(),
        );
        let tag_revalidations = Family::<RevalidationLabels, Counter>::default();
        registry.register(
            "tag_revalidations",
            "Expired tag answers checked with a HEAD upstream, by what it found",
            tag_revalidations.clone(),
        );
        let ratelimit_limit = Family::<BudgetLabels, Gauge>::default();
        registry.register(
            "upstream_ratelimit_limit",
            "The upstream's pull limit per window (Docker Hub's ratelimit-limit), by registry and whose budget it is (docker-ratelimit-source)",
            ratelimit_limit.clone(),
        );
        let ratelimit_remaining = Family::<BudgetLabels, Gauge>::default();
        registry.register(
            "upstream_ratelimit_remaining",
            "Pulls left in the upstream's window at its last answer (ratelimit-remaining)",
            ratelimit_remaining.clone(),
        );
        let budget_low = Family::<RegistryLabel, Gauge>::default();
        registry.register(
            "upstream_budget_low",
            "1 while cached tags are served without asking the upstream: pulls left at or under upstreamReserve, or a 429's Retry-After running",
            budget_low.clone(),
        );
        let pinned_bytes = Family::<RegistryLabel, Gauge>::default();
        registry.register(
            "cache_pinned_bytes",
            "Bytes of pinned images (running pods, recent ReplicaSet revisions) held in the cache; never evicted",
            pinned_bytes.clone(),
        );
        let prefetches = Family::<PrefetchLabels, Counter>::default();
        registry.register(
            "prefetches",
            "Pinned images fetched into the cache before a client asked, by result (fetched, failed, postponed while the upstream budget is low)",
            prefetches.clone(),
        );
        let upstream_throttled = Family::<RegistryLabel, Counter>::default();
        registry.register(
            "upstream_throttled_responses",
            "429 answers from the upstream",
            upstream_throttled.clone(),
        );
        let cache_bytes = Gauge::default();
        registry.register(
            "cache_bytes",
            "Bytes of committed blobs and manifests in the cache",
            cache_bytes.clone(),
        );
        let cache_max_bytes = Gauge::default();
        registry.register(
            "cache_max_bytes",
            "Size bound of the cache (cache.maxSize); 0 while unbounded",
            cache_max_bytes.clone(),
        );
        let cache_entries = Gauge::default();
        registry.register(
            "cache_entries",
            "Committed blobs and manifests in the cache",
            cache_entries.clone(),
        );
        let evictions = Counter::default();
        registry.register(
            "cache_evictions",
            "Entries removed to keep the cache under its size bound",
            evictions.clone(),
        );
        let evicted_bytes = Counter::default();
        registry.register(
            "cache_evicted_bytes",
            "Bytes removed to keep the cache under its size bound",
            evicted_bytes.clone(),
        );
        let disk_full = Counter::default();
        registry.register(
            "disk_full_events",
            "Blobs served by pass-through because the cache disk was full",
            disk_full.clone(),
        );
        registry.register(
            "log_queue_full",
            "Log lines that found the log writer's queue full and waited for room (the logging request waited; no line is dropped)",
            super::log_queue::PROCESS_QUEUE_FULL.clone(),
        );
        let ca_reloads = Counter::default();
        registry.register(
            "ca_reloads",
            "Times a changed CA was loaded from its files and swapped in (CA rotation)",
            ca_reloads.clone(),
        );
        let ca_reload_errors = Counter::default();
        registry.register(
            "ca_reload_errors",
            "Attempts to load changed CA files that failed; the previous CA stays in use",
            ca_reload_errors.clone(),
        );
        let ca_not_after = Gauge::default();
        registry.register(
            "ca_not_after_seconds",
            "notAfter of the CA leaf certificates are signed with, unix seconds",
            ca_not_after.clone(),
        );
        let shared_up = Gauge::default();
        registry.register(
            "shared_storage_up",
            "1 while the shared storage (storage.s3) answers, 0 while it is skipped after an error; absent without shared storage",
            shared_up.clone(),
        );
        let shared_errors = Counter::default();
        registry.register(
            "shared_storage_errors",
            "Requests to the shared storage that failed (each one was served without it)",
            shared_errors.clone(),
        );
        let shared_uploads = Family::<UploadLabels, Counter>::default();
        registry.register(
            "shared_storage_uploads",
            "Blobs fetched from an upstream and queued for the shared storage, by result",
            shared_uploads.clone(),
        );
        let shared_uploaded_bytes = Counter::default();
        registry.register(
            "shared_storage_uploaded_bytes",
            "Bytes copied to the shared storage",
            shared_uploaded_bytes.clone(),
        );
        let shared_evictor = Gauge::default();
        registry.register(
            "shared_storage_evictor",
            "1 on the replica holding the shared storage's eviction lease",
            shared_evictor.clone(),
        );
        let shared_bucket_bytes = Gauge::default();
        registry.register(
            "shared_storage_bytes",
            "Bytes of blobs in the shared storage at the evictor's last check (on the lease holder)",
            shared_bucket_bytes.clone(),
        );
        let shared_evictions = Counter::default();
        registry.register(
            "shared_storage_evictions",
            "Blobs this replica evicted from the shared storage to keep it under storage.maxSize",
            shared_evictions.clone(),
        );
        let shared_evicted_bytes = Counter::default();
        registry.register(
            "shared_storage_evicted_bytes",
            "Bytes this replica evicted from the shared storage",
            shared_evicted_bytes.clone(),
        );
        Self {
            registry,
            requests,
            bytes,
            sendfile_bytes,
            sendfile_cold_bytes,
            refused_per_source,
            share_evictions,
            purges,
            purged_bytes,
            duration,
            upstream,
            merged,
            auth_checks,
            tokens_throttled,
            tag_moves,
            tag_revalidations,
            ratelimit_limit,
            ratelimit_remaining,
            budget_low,
            pinned_bytes,
            prefetches,
            upstream_throttled,
            cache_bytes,
            cache_max_bytes,
            cache_entries,
            evictions,
            evicted_bytes,
            disk_full,
            ca_reloads,
            ca_reload_errors,
            ca_not_after,
            shared_up,
            shared_errors,
            shared_uploads,
            shared_uploaded_bytes,
            shared_evictor,
            shared_bucket_bytes,
            shared_evictions,
            shared_evicted_bytes,
        }
    }
}

impl Metrics {
    /// A connection closed at once: its address held its share already.
    pub fn connection_refused_per_source(&self) {
        self.refused_per_source.inc();
    }

    /// Counts the entries `map` drops to keep a client address to its
    /// share (the map holds the counter and adds to it).
    pub fn share_evictions(&self, map: SharedMap) -> Counter {
        self.share_evictions
            .get_or_create(&MapLabels { map })
            .clone()
    }

    /// A purge ended; `bytes` it removed from this replica's disk.
    pub fn purged(&self, scope: PurgeScope, complete: bool, bytes: u64) {
        let outcome = if complete {
            PurgeOutcome::complete
        } else {
            PurgeOutcome::incomplete
        };
        self.purges
            .get_or_create(&PurgeLabels { scope, outcome })
            .inc();
        self.purged_bytes.inc_by(bytes);
    }

    /// Count the bytes each plain HTTP/1 connection sends with `sendfile`,
    /// and those it reads instead (pages not in memory).
    pub fn sendfile_counters(&self) -> (Counter, Counter) {
        (
            self.sendfile_bytes.clone(),
            self.sendfile_cold_bytes.clone(),
        )
    }

    /// The CA in use now expires at `not_after`.
    pub fn set_ca_not_after(&self, not_after: std::time::SystemTime) {
        let secs = not_after
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.ca_not_after.set(secs);
    }

    /// A CA reload attempt: swapped in (with its `notAfter`) or rejected.
    pub fn ca_reloaded(&self, swapped: Option<std::time::SystemTime>) {
        match swapped {
            Some(not_after) => {
                self.ca_reloads.inc();
                self.set_ca_not_after(not_after);
            }
            None => {
                self.ca_reload_errors.inc();
            }
        }
    }

    /// Records a finished request (called with its access-log line).
    pub fn observe_request(
        &self,
        registry: &str,
        kind: Kind,
        cache: CacheResult,
        failed: bool,
        bytes: u64,
        secs: f64,
    ) {
        let registry = if registry.is_empty() {
            "none"
        } else {
            registry
        }
        .to_string();
        let result = if failed {
            ResultLabel::error
        } else {
            match cache {
                CacheResult::Hit => ResultLabel::hit,
                CacheResult::SharedHit => ResultLabel::shared_hit,
                CacheResult::Miss => ResultLabel::miss,
                CacheResult::Stale => ResultLabel::stale,
                CacheResult::Pass => ResultLabel::pass,
                CacheResult::Denied => ResultLabel::denied,
            }
        };
        self.requests
            .get_or_create(&RequestLabels {
                registry: registry.clone(),
                kind: kind.as_str().to_string(),
                result,
            })
            .inc();
        let source = match cache {
            CacheResult::Hit | CacheResult::Stale => Source::cache,
            CacheResult::SharedHit => Source::shared,
            _ => Source::upstream,
        };
        self.bytes
            .get_or_create(&BytesLabels {
                registry: registry.clone(),
                source,
            })
            .inc_by(bytes);
        self.duration
            .get_or_create(&RegistryLabel { registry })
            .observe(secs);
    }

    /// Records how long an upstream took to answer.
    pub fn observe_upstream(&self, registry: &str, secs: f64) {
        self.upstream
            .get_or_create(&RegistryLabel {
                registry: registry.to_string(),
            })
            .observe(secs);
    }

    /// A request joined a download in flight.
    pub fn merged_waiter(&self, registry: &str) {
        self.merged
            .get_or_create(&RegistryLabel {
                registry: registry.to_string(),
            })
            .inc();
    }

    pub fn auth_check(&self, registry: &str, result: AuthResult) {
        self.auth_checks
            .get_or_create(&AuthLabels {
                registry: registry.to_string(),
                result,
            })
            .inc();
    }

    /// A request was refused by the throttle on credentialed token
    /// requests for new repositories.
    pub fn token_throttled(&self, registry: &str) {
        self.tokens_throttled
            .get_or_create(&RegistryLabel {
                registry: registry.to_string(),
            })
            .inc();
    }

    pub fn tag_moved(&self, registry: &str) {
        self.tag_moves
            .get_or_create(&RegistryLabel {
                registry: registry.to_string(),
            })
            .inc();
    }

    pub fn tag_revalidated(&self, registry: &str, result: Revalidation) {
        self.tag_revalidations
            .get_or_create(&RevalidationLabels {
                registry: registry.to_string(),
                result,
            })
            .inc();
    }

    pub fn upstream_throttled(&self, registry: &str) {
        self.upstream_throttled
            .get_or_create(&RegistryLabel {
                registry: registry.to_string(),
            })
            .inc();
    }

    /// Copies a registry's budget into the gauges (at each scrape).
    pub fn set_budget(&self, registry: &str, b: &crate::upstream::budget::BudgetReport) {
        let labels = BudgetLabels {
            registry: registry.to_string(),
            source: b.source.clone(),
        };
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        if let Some(n) = b.limit {
            self.ratelimit_limit.get_or_create(&labels).set(gauge(n));
        }
        if let Some(n) = b.remaining {
            self.ratelimit_remaining
                .get_or_create(&labels)
                .set(gauge(n));
        }
        self.budget_low
            .get_or_create(&RegistryLabel {
                registry: registry.to_string(),
            })
            .set(i64::from(b.low));
    }

    pub fn disk_full(&self) {
        self.disk_full.inc();
    }

    /// Copies the store's figures into the gauges and counters.
    pub fn set_cache(&self, bytes: u64, entries: usize, evictions: u64, evicted_bytes: u64) {
        self.cache_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.cache_entries
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
        let e = evictions.saturating_sub(self.evictions.get());
        self.evictions.inc_by(e);
        let b = evicted_bytes.saturating_sub(self.evicted_bytes.get());
        self.evicted_bytes.inc_by(b);
    }

    /// One prefetch of an image of `registry` ended with `result`.
    pub fn prefetch(&self, registry: &str, result: &'static str) {
        self.prefetches
            .get_or_create(&PrefetchLabels {
                registry: registry.to_string(),
                result,
            })
            .inc();
    }

    /// Bytes of `registry`'s pinned images in the cache.
    pub fn set_pinned(&self, registry: &str, bytes: u64) {
        self.pinned_bytes
            .get_or_create(&RegistryLabel {
                registry: registry.to_string(),
            })
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// The cache's size bound (`cache.maxSize`); None: unbounded (0).
    pub fn set_cache_max(&self, max_size: Option<u64>) {
        self.cache_max_bytes
            .set(max_size.map_or(0, |b| i64::try_from(b).unwrap_or(i64::MAX)));
    }

    /// Copies the shared storage's figures into the metrics.
    pub fn set_shared(&self, f: &SharedFigures) {
        self.shared_up.set(i64::from(f.up));
        let up_to = |c: &Counter, total: u64| c.inc_by(total.saturating_sub(c.get()));
        up_to(&self.shared_errors, f.errors);
        up_to(&self.shared_uploaded_bytes, f.uploaded_bytes);
        if let Some(e) = f.evictor {
            self.shared_evictor.set(i64::from(e.holder));
            self.shared_bucket_bytes
                .set(i64::try_from(e.bucket_bytes).unwrap_or(i64::MAX));
            up_to(&self.shared_evictions, e.evictions);
            up_to(&self.shared_evicted_bytes, e.evicted_bytes);
        }
        for (result, n) in f.uploads {
            up_to(
                &self.shared_uploads.get_or_create(&UploadLabels { result }),
                n,
            );
        }
    }

    /// Per-registry totals for `/status` (the operator copies them into
    /// each MirrorRegistry's `status.cache`): requests answered from the
    /// cache (hit or stale), requests that went upstream to fill it (miss),
    /// and body bytes served from the cache.
    pub fn cache_counters(&self, registry: &str) -> CacheCounters {
        let count = |result: ResultLabel| {
            [Kind::Manifest, Kind::Tag, Kind::Blob]
                .into_iter()
                .map(|kind| {
                    self.requests
                        .get(&RequestLabels {
                            registry: registry.to_string(),
                            kind: kind.as_str().to_string(),
                            result: result.clone(),
                        })
                        .map_or(0, |c| c.get())
                })
                .sum::<u64>()
        };
        CacheCounters {
            hits: count(ResultLabel::hit) + count(ResultLabel::stale),
            misses: count(ResultLabel::miss),
            bytes: self
                .bytes
                .get(&BytesLabels {
                    registry: registry.to_string(),
                    source: Source::cache,
                })
                .map_or(0, |c| c.get()),
            tag_moves: self
                .tag_moves
                .get(&RegistryLabel {
                    registry: registry.to_string(),
                })
                .map_or(0, |c| c.get()),
            pinned: None,
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(err) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %err, "encoding metrics failed");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_registry_and_result() {
        let m = Metrics::default();
        m.observe_request("quay.io", Kind::Blob, CacheResult::Hit, false, 100, 0.01);
        m.observe_request("quay.io", Kind::Blob, CacheResult::Miss, true, 5, 0.01);
        m.observe_upstream("quay.io", 0.2);
        let text = m.encode();
        assert!(
            text.contains(
                r#"pullthrough_requests_total{registry="quay.io",kind="blob",result="hit"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"result="error"} 1"#), "{text}");
        assert!(
            text.contains(
                r#"pullthrough_served_bytes_total{registry="quay.io",source="cache"} 100"#
            ),
            "{text}"
        );
        assert!(
            text.contains("pullthrough_upstream_response_seconds_count{registry=\"quay.io\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn cache_max_bytes_is_the_bound_or_zero() {
        let m = Metrics::default();
        m.set_cache(50, 1, 0, 0);
        m.set_cache_max(Some(36 << 30));
        let text = m.encode();
        assert!(text.contains("pullthrough_cache_bytes 50\n"), "{text}");
        assert!(
            text.contains(&format!("pullthrough_cache_max_bytes {}\n", 36u64 << 30)),
            "{text}"
        );
        m.set_cache_max(None);
        assert!(
            m.encode().contains("pullthrough_cache_max_bytes 0\n"),
            "unbounded is 0"
        );
    }

    #[test]
    fn cache_counters_sum_kinds_for_status() {
        let m = Metrics::default();
        m.observe_request("quay.io", Kind::Blob, CacheResult::Hit, false, 100, 0.01);
        m.observe_request(
            "quay.io",
            Kind::Manifest,
            CacheResult::Stale,
            false,
            10,
            0.01,
        );
        m.observe_request("quay.io", Kind::Blob, CacheResult::Miss, false, 7, 0.01);
        m.observe_request("quay.io", Kind::Blob, CacheResult::Miss, true, 0, 0.01);
        m.observe_request("ghcr.io", Kind::Blob, CacheResult::Hit, false, 1, 0.01);
        assert_eq!(
            m.cache_counters("quay.io"),
            CacheCounters {
                hits: 2,
                misses: 1,
                bytes: 110,
                tag_moves: 0,
                pinned: None,
            }
        );
        assert_eq!(m.cache_counters("none.io"), CacheCounters::default());
    }
}

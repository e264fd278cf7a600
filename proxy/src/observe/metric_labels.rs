//! The label sets of the proxy's metric families, and the values their
//! enum labels take ([`super::metrics`] registers the families).

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ResultLabel {
    hit,
    shared_hit,
    miss,
    stale,
    pass,
    denied,
    error,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Source {
    cache,
    /// The shared storage (S3) of several replicas.
    shared,
    upstream,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct RequestLabels {
    pub(super) registry: String,
    pub(super) kind: String,
    pub(super) result: ResultLabel,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct BytesLabels {
    pub(super) registry: String,
    pub(super) source: Source,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct RegistryLabel {
    pub(super) registry: String,
}

/// Outcome of a per-client access check before cached content is served.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum AuthResult {
    /// The upstream let the client read the digest in the repository.
    allowed,
    /// The upstream refused (401/403, or 404: not in this repository).
    denied,
    /// An anonymous client may read it: the digest is public there.
    public,
    /// The upstream could not answer (outage): the cache was served only
    /// to a client class known to read it, else a 503.
    unreachable,
    /// The proxy did not ask: its throttle on token requests for new
    /// repositories was empty; nothing was served (a 429).
    throttled,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct AuthLabels {
    pub(super) registry: String,
    pub(super) result: AuthResult,
}

/// What an expired tag answer's revalidation (a HEAD upstream) found.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Revalidation {
    /// Same digest: the cached manifest was served, no GET.
    unchanged,
    /// Another digest (or none given): the manifest was fetched with a GET.
    changed,
}

/// Whose rate limit: the registry, and `docker-ratelimit-source` (the
/// client IP or account the upstream counts against).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct BudgetLabels {
    pub(super) registry: String,
    pub(super) source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct RevalidationLabels {
    pub(super) registry: String,
    pub(super) result: Revalidation,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct PrefetchLabels {
    pub(super) registry: String,
    /// `fetched`, `failed`, `postponed` (upstream budget low).
    pub(super) result: &'static str,
}

/// What became of a blob queued for the shared storage.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum UploadResult {
    uploaded,
    /// Another replica had put it there.
    already_there,
    failed,
    /// The upload queue was full.
    dropped,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct UploadLabels {
    pub(super) result: UploadResult,
}

/// A bounded map of what clients' requests make the proxy remember, each
/// client address holding a share of it (see `crate::source`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SharedMap {
    /// Per-client access grants.
    grants,
    /// Digests anonymous clients may read.
    public_grants,
    /// Anonymous refusals since a digest was learnt public.
    refusals,
    /// Tag answers.
    tags,
    /// Referrers-schema tags the upstream said do not exist.
    absent_tags,
    /// Referrers answers.
    referrers,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct MapLabels {
    pub(super) map: SharedMap,
}

/// Where a purge removed content: asked of this replica (`all`: with
/// every other replica and the bucket; `local`: `scope=local`), or done
/// for another replica that was asked (over the peer listener).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum PurgeScope {
    all,
    local,
    for_replica,
}

/// Whether every place confirmed a purge (an incomplete one answers 500
/// and must be repeated).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum PurgeOutcome {
    complete,
    incomplete,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct PurgeLabels {
    pub(super) scope: PurgeScope,
    pub(super) outcome: PurgeOutcome,
}

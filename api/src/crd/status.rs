//! What the operator writes to a MirrorRegistry's status: conditions,
//! node counts, cache counters (with what is pinned), the upstream budget
//! and the last tag move.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::schema::non_nullable_properties;

/// What the operator observed; written through the status subresource.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[schemars(transform = non_nullable_properties)]
#[serde(rename_all = "camelCase")]
pub struct MirrorRegistryStatus {
    /// `metadata.generation` the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Accepted`, `ProxyReady`, `NodesConfigured`; one entry per type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// Nodes that applied this registry's configuration, of those targeted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<NodeCounts>,

    /// `configured/total`, e.g. `3/3` (printer column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes_summary: Option<String>,

    /// Cache counters for this registry, when the proxy reports them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheStats>,

    /// The last tag move reported (each one is also an Event, reason
    /// `TagMoved`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_tag_move: Option<TagMoveStatus>,

    /// What the upstream says is left of its rate limit, when it says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamBudget>,
}

/// The upstream's rate-limit figures at its last answer (Docker Hub's
/// `ratelimit-*` headers, a 429's `Retry-After`), as the proxy reports them.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamBudget {
    /// Pulls allowed per window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// Pulls left in the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_seconds: Option<u64>,
    /// Whose budget it is (`docker-ratelimit-source`: an IP or account).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
    /// Unix seconds until which the upstream asked not to be asked (429).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_until: Option<u64>,
    /// Cached tags are served without asking the upstream: pulls left at
    /// or under `upstreamReserve`, or a Retry-After running.
    #[serde(default)]
    pub low: bool,
}

#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NodeCounts {
    pub configured: u32,
    pub total: u32,
}

impl NodeCounts {
    /// `configured/total`, as shown in the Nodes column.
    pub fn summary(&self) -> String {
        format!("{}/{}", self.configured, self.total)
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Bytes served from the cache.
    pub bytes: u64,
    /// Tags seen pointing at a new digest (by the replica that answered).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tag_moves: u64,
    /// What eviction may not touch: the images running pods and recent
    /// ReplicaSet revisions use (absent while nothing is pinned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<PinnedStats>,
}

/// Pinned images of one registry, as found in the cache.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PinnedStats {
    /// Pinned image references whose manifest is in the cache.
    pub images: u64,
    /// Distinct manifests, configs and layers they hold in the cache.
    pub blobs: u64,
    /// Their bytes.
    pub bytes: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A tag the proxy saw pointing at a new digest.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TagMoveStatus {
    pub repository: String,
    pub tag: String,
    /// The digest it pointed at before.
    pub from: String,
    pub to: String,
    /// When the proxy saw it (RFC 3339).
    pub at: String,
}

impl MirrorRegistryStatus {
    /// The condition of type `type_`, if present.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

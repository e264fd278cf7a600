//! The `MirrorRegistry` custom resource (`pullthrough.dev/v1alpha1`): one
//! cluster-scoped object per upstream registry the cluster pulls through the
//! proxy. The operator turns the accepted ones into the registry table
//! ([`crate::config::RegistryConfig`]) and reports back in the status.
//!
//! The schema carries CEL rules (`x-kubernetes-validations`) so the API
//! server itself rejects what the proxy could never serve: a host that is a
//! URL or not lowercase, a plain-HTTP upstream nobody opted into, a tag TTL
//! outside 0s–7d. The operator re-checks everything in
//! [`RegistryConfig::try_from`] (a CRD installed from an older release, or
//! `--validate=false`, must not crash or poison the table).

use std::borrow::Cow;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::generate::SchemaGenerator;
use schemars::{JsonSchema, Schema, json_schema};
use serde::{Deserialize, Serialize};

use crate::agent::NodeOptions;
use crate::config::{ConfigError, ProxyConfig, RegistryConfig};
use crate::names::DOCKER_HUB;
use crate::tags::{TagRule, TagTtl};

/// API group of every pullthrough resource.
pub const GROUP: &str = "pullthrough.dev";
/// Served and stored version of `MirrorRegistry`.
pub const VERSION: &str = "v1alpha1";

/// Upstream for `docker.io` when the spec names none: Docker Hub's registry
/// API is not served at `https://docker.io`.
pub const DOCKER_HUB_UPSTREAM: &str = "https://registry-1.docker.io";

/// Longest `tagTTL` the CRD admits (7 days).
pub const MAX_TAG_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Condition types written to `status.conditions`.
pub mod condition {
    /// The spec is valid and the host is not claimed by an older resource.
    pub const ACCEPTED: &str = "Accepted";
    /// The proxy serves the registry table that includes this registry.
    pub const PROXY_READY: &str = "ProxyReady";
    /// Every targeted node has applied its runtime configuration
    /// (`status.nodes`, `status.nodesSummary`).
    pub const NODES_CONFIGURED: &str = "NodesConfigured";
}

// Shared schema pieces. `host`, `aliases[]` and `authHosts[]` all carry the
// same rules; `schema_with` keeps the Rust fields plain `String`s.

/// Longest host: a 253-character DNS name plus `:65535`.
const HOST_MAX_LEN: u64 = 259;
/// Most aliases / auth hosts per registry (bounds the CEL cost estimate).
const HOST_LIST_MAX_ITEMS: u64 = 32;

/// A lowercase DNS name or IPv4 address, or a bracketed IPv6 address, with
/// an optional `:port`: what an image reference's registry part looks like.
/// Port range and label lengths beyond this are checked by
/// [`crate::names::validate_host`] in the operator.
const HOST_PATTERN: &str = r"^([a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*|\[[0-9a-f:.]+\])(:[0-9]{1,5})?$";

/// `localhost`, `*.localhost`, 127.0.0.0/8, 169.254.0.0/16, 0.0.0.0, [::1],
/// [::], fe80::/10, each with an optional port.
const RESERVED_HOST_PATTERN: &str = r"^(([a-z0-9-]+\.)*localhost|127\.[0-9.]+|169\.254\.[0-9.]+|0\.0\.0\.0|\[(::1?|fe[89ab][0-9a-f]:[0-9a-f:.]*)\])(:[0-9]{1,5})?$";

/// Go `time.ParseDuration` syntax, restricted to non-negative whole numbers
/// of `h`, `m`, `s`, `ms`, `us`, `ns` (or a bare `0`). With at most 6 digits
/// per component and 16 characters in all, the value cannot overflow Go's
/// duration, so CEL's `duration()` never errors on what this admits.
const TAG_TTL_PATTERN: &str = r"^(0|([0-9]{1,6}(h|m|s|ms|us|ns))+)$";
const TAG_TTL_MAX_LEN: u64 = 16;

fn host_rules() -> serde_json::Value {
    serde_json::json!([
        {
            "rule": "!self.contains('://')",
            "message": "must be a host name as written in image references, without a scheme (quay.io, not https://quay.io); put URLs in spec.upstream",
        },
        {
            "rule": "self.contains('://') || self == self.lowerAscii()",
            "message": "must be lowercase, as in image references",
        },
        {
            // Only when the specific rules above pass: one message per mistake.
            "rule": format!(
                "self.contains('://') || self != self.lowerAscii() || self.matches(r'{HOST_PATTERN}')"
            ),
            "message": "must be a host name or IP address with an optional :port (quay.io, registry.example:5000, [fd00::1]:5000)",
        },
        {
            // The common spellings; the operator refuses every spelling
            // (`names::reserved_host`) with Accepted=False.
            "rule": format!("!self.matches(r'{RESERVED_HOST_PATTERN}')"),
            "message": "must not be localhost or a loopback, link-local or unspecified address: those name the node itself",
        },
        {
            "rule": "!self.matches(':[0-9]{1,5}$') || (int(self.substring(self.lastIndexOf(':') + 1)) >= 1 && int(self.substring(self.lastIndexOf(':') + 1)) <= 65535)",
            "message": "port must be between 1 and 65535",
        },
    ])
}

fn host_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "minLength": 1,
        "maxLength": HOST_MAX_LEN,
        "x-kubernetes-validations": host_rules(),
    })
}

fn host_list_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "maxItems": HOST_LIST_MAX_ITEMS,
        "x-kubernetes-list-type": "set",
        "items": {
            "type": "string",
            "minLength": 1,
            "maxLength": HOST_MAX_LEN,
            "x-kubernetes-validations": host_rules(),
        },
    })
}

/// Most `spec.prefetch` entries: each is fetched and pinned.
pub const PREFETCH_MAX_ITEMS: usize = 256;

fn prefetch_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "maxItems": PREFETCH_MAX_ITEMS,
        "x-kubernetes-list-type": "set",
        "items": {
            "type": "string",
            "minLength": 1,
            "maxLength": 512,
            // The distribution grammar's repository name, then a tag or a
            // sha256 digest.
            "pattern": "^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*(?::[A-Za-z0-9_][A-Za-z0-9._-]{0,127}|@sha256:[a-f0-9]{64})$",
        },
    })
}

fn tag_policy_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "maxItems": crate::tags::MAX_RULES,
        "items": {
            "type": "object",
            "required": ["pattern", "ttl"],
            "properties": {
                "pattern": {
                    "description": "Regular expression (Rust syntax) the whole tag must match, e.g. `latest|main|stable` or `v?[0-9]+\\.[0-9]+\\.[0-9]+`.",
                    "type": "string",
                    "minLength": 1,
                    "maxLength": crate::tags::MAX_PATTERN_LEN,
                },
                "ttl": {
                    "description": "`immutable` (never asked again while cached) or a Go duration from 0s to 168h (`0s`: asked on every pull).",
                    "type": "string",
                    "maxLength": TAG_TTL_MAX_LEN,
                    "x-kubernetes-validations": [{
                        "rule": format!(
                            "self == 'immutable' || (self.matches('{TAG_TTL_PATTERN}') && duration(self) <= duration('168h'))"
                        ),
                        "message": "must be `immutable` or a duration from 0s to 168h in Go syntax, e.g. 0s, 10m, 1h30m",
                    }],
                },
            },
        },
    })
}

fn tag_ttl_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "maxLength": TAG_TTL_MAX_LEN,
        "x-kubernetes-validations": [{
            // `&&` short-circuits: duration() only sees what the pattern admits.
            "rule": format!(
                "self.matches('{TAG_TTL_PATTERN}') && duration(self) <= duration('168h')"
            ),
            "message": "must be a duration from 0s to 168h (7 days) in Go syntax, e.g. 30s, 10m, 1h30m (units h, m, s, ms, us, ns; no d)",
        }],
    })
}

/// Makes the optional properties of an object schema non-nullable, so an
/// explicit `null` in a manifest is pruned by the API server (it means
/// "unset") instead of being stored, printed as `<no value>` and handed to
/// the CEL rules.
fn non_nullable_properties(schema: &mut Schema) {
    use serde_json::Value;
    let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) else {
        return;
    };
    for prop in props.values_mut() {
        let Some(obj) = prop.as_object_mut() else {
            continue;
        };
        if let Some(Value::Array(types)) = obj.get_mut("type") {
            types.retain(|t| t != "null");
            if types.len() == 1 {
                let only = types.remove(0);
                obj.insert("type".into(), only);
            }
        }
        let is_null = |s: &Value| s.get("type").is_some_and(|t| t == "null");
        if let Some(Value::Array(any_of)) = obj.get("anyOf")
            && any_of.len() == 2
            && any_of.iter().any(is_null)
            && let Some(Value::Object(inner)) = any_of.iter().find(|s| !is_null(s)).cloned()
        {
            obj.remove("anyOf");
            for (k, v) in inner {
                obj.entry(k).or_insert(v);
            }
        }
    }
}

/// One upstream registry served through the pullthrough proxy. Cluster
/// scoped: the name is free, `spec.host` is what image references use.
// clippy takes the repeated `type_ = ...` of the printer columns for
// duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[kube(
    group = "pullthrough.dev",
    version = "v1alpha1",
    kind = "MirrorRegistry",
    plural = "mirrorregistries",
    singular = "mirrorregistry",
    shortname = "mreg",
    category = "pullthrough",
    status = "MirrorRegistryStatus",
    derive = "PartialEq",
    doc = "A container registry whose images the cluster pulls through the pullthrough caching proxy.",
    printcolumn(name = "Host", type_ = "string", json_path = ".spec.host"),
    printcolumn(
        name = "Upstream",
        type_ = "string",
        json_path = ".spec.upstream",
        description = "Upstream base URL (empty: https://<host>, or Docker Hub's registry for docker.io)"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="ProxyReady")].status"#,
        description = "Whether the proxy serves this registry (ProxyReady condition)"
    ),
    printcolumn(
        name = "Nodes",
        type_ = "string",
        json_path = ".status.nodesSummary",
        description = "Nodes configured / nodes targeted"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new(
    "!has(self.upstream) || !self.upstream.lowerAscii().startsWith('http://') || (has(self.allowInsecureUpstream) && self.allowInsecureUpstream)"
)
.message("an http:// upstream is pulled from in plain text: use https://, or set allowInsecureUpstream: true to allow it")
.field_path(".upstream")
.reason(Reason::FieldValueForbidden))]
#[x_kube(validation = Rule::new(
    "!(has(self.private) && self.private && has(self.credentialsSecretRef))"
)
.message("private: true serves cached content only to clients the upstream authorises with their own credentials, so credentialsSecretRef would never be used: set one or the other")
.field_path(".credentialsSecretRef")
.reason(Reason::FieldValueForbidden))]
#[schemars(transform = non_nullable_properties)]
#[serde(rename_all = "camelCase")]
pub struct MirrorRegistrySpec {
    /// The registry as written in image references: `quay.io`,
    /// `registry.example:5000`; `docker.io` means Docker Hub. Lowercase, no
    /// scheme, no path.
    #[schemars(schema_with = "host_schema")]
    pub host: String,

    /// Base URL pulls go to, `https://` (or `http://` with
    /// allowInsecureUpstream). Default `https://<host>`; for `docker.io`,
    /// `https://registry-1.docker.io`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new(
        "isURL(self) && url(self).getScheme() in ['http', 'https'] && url(self).getHostname() != '' && size(url(self).getQuery()) == 0"
    ).message("must be an http:// or https:// URL with a host and no query, e.g. https://registry-1.docker.io"))]
    pub upstream: Option<String>,

    /// Other names image references use for this registry (routed here too).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "host_list_schema")]
    pub aliases: Vec<String>,

    /// Token-realm hosts the upstream sends clients to (e.g.
    /// `auth.docker.io`), reached through the proxy in DNS-hijack mode.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "host_list_schema")]
    pub auth_hosts: Vec<String>,

    /// How the proxy verifies the upstream's TLS certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTls>,

    /// Secret with upstream credentials (`kubernetes.io/dockerconfigjson`
    /// or `kubernetes.io/basic-auth`), used only for this registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,

    /// How long a tag → digest answer is reused before asking upstream again
    /// (Go duration, 0s–168h; default 10m). `0s` always asks.
    #[serde(rename = "tagTTL", default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "tag_ttl_schema")]
    pub tag_ttl: Option<String>,

    /// Per-tag freshness, overriding `tagTTL`: ordered `{pattern, ttl}`
    /// rules, the first whose pattern matches the whole tag wins; e.g.
    /// `latest|main|stable` → `0s` (asked every pull, with a HEAD),
    /// release tags → `immutable`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "tag_policy_schema")]
    pub tag_policy: Vec<TagRuleSpec>,

    /// Pulls of the upstream's rate limit (Docker Hub's
    /// `ratelimit-remaining`) kept for pulls that need the upstream: at or
    /// under it, and while a 429's `Retry-After` runs, cached tags are
    /// served without asking (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1_000_000))]
    pub upstream_reserve: Option<u32>,

    /// Images of this registry kept in the cache: fetched before anyone
    /// asks (for the nodes' platforms) and never evicted. `repository:tag`
    /// or `repository@sha256:…`, e.g. `library/nginx:1.27`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "prefetch_schema")]
    pub prefetch: Vec<String>,

    /// Cached content is served only to clients the upstream currently
    /// authorises for the repository (checked with an upstream HEAD).
    #[serde(default)]
    pub private: bool,

    /// Pass pushes through to the upstream (uncached); refused otherwise.
    #[serde(default)]
    pub allow_push: bool,

    /// Allow an `http://` upstream (pulls cross the network in plain text).
    #[serde(default)]
    pub allow_insecure_upstream: bool,

    /// Let redirects and token realms the upstream names (hosts other than
    /// `upstream` and `authHosts`) reach loopback, link-local and private
    /// addresses (off: an upstream cannot steer the proxy into the cluster).
    #[serde(default)]
    pub allow_private_networks: bool,

    /// Which node runtimes the node-agent points at the proxy for this
    /// registry.
    #[serde(default)]
    pub nodes: NodeTargets,
}

/// Trust for the upstream's TLS certificate, beyond the system roots.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[x_kube(validation = Rule::new("!has(self.caBundle) || !has(self.caBundleConfigMapRef)")
    .message("set caBundle or caBundleConfigMapRef, not both"))]
#[schemars(transform = non_nullable_properties)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamTls {
    /// Extra PEM CA certificates trusted for this upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1048576))]
    #[x_kube(validation = Rule::new("self.contains('-----BEGIN CERTIFICATE-----')")
        .message("must hold PEM certificates (-----BEGIN CERTIFICATE-----)"))]
    pub ca_bundle: Option<String>,

    /// A ConfigMap key holding extra PEM CA certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle_config_map_ref: Option<ConfigMapKeyRef>,

    /// Do not verify the upstream's certificate at all (testing only).
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// A key of a ConfigMap in a given namespace.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
    /// Key in the ConfigMap's data.
    #[serde(default = "default_ca_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_ca_key() -> String {
    "ca.crt".into()
}

/// A Secret in a given namespace.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
}

/// One `tagPolicy` rule as written in the resource (`ttl` in Go syntax).
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TagRuleSpec {
    pub pattern: String,
    pub ttl: String,
}

impl TagRuleSpec {
    fn to_rule(&self) -> Result<TagRule, String> {
        let ttl = TagTtl::parse_with(&self.ttl, |s| {
            let d = parse_go_duration(s)?;
            if d > MAX_TAG_TTL {
                return Err(format!("`{s}` is longer than 168h (7 days)"));
            }
            Ok(d)
        })
        .map_err(|e| format!("ttl: {e}; or `{}`", crate::tags::IMMUTABLE))?;
        Ok(TagRule {
            pattern: self.pattern.clone(),
            ttl,
        })
    }
}

/// Node runtimes to configure; each defaults to true.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NodeTargets {
    /// dockerd nodes: `/etc/hosts` entries send the host to the proxy
    /// (plus `certs.d` trust and `daemon.json` mirrors).
    #[serde(default = "yes")]
    pub dns_hijack: bool,
    /// containerd nodes: `certs.d/<host>/hosts.toml` mirror.
    #[serde(default = "yes")]
    pub containerd: bool,
    /// CRI-O / podman nodes: `registries.conf.d` drop-in.
    #[serde(default = "yes")]
    pub crio: bool,
}

fn yes() -> bool {
    true
}

impl Default for NodeTargets {
    fn default() -> Self {
        Self {
            dns_hijack: true,
            containerd: true,
            crio: true,
        }
    }
}

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

impl MirrorRegistrySpec {
    /// The upstream base URL pulls go to (no trailing slash).
    pub fn upstream_url(&self) -> Cow<'_, str> {
        match &self.upstream {
            Some(u) => Cow::Borrowed(u.trim_end_matches('/')),
            None if self.host == DOCKER_HUB => Cow::Borrowed(DOCKER_HUB_UPSTREAM),
            None => Cow::Owned(format!("https://{}", self.host)),
        }
    }

    /// `tagTTL` as a duration (default 10m).
    pub fn tag_ttl(&self) -> Result<Duration, String> {
        match &self.tag_ttl {
            None => Ok(crate::config::default_tag_ttl()),
            Some(s) => {
                let d = parse_go_duration(s)?;
                if d > MAX_TAG_TTL {
                    return Err(format!("`{s}` is longer than 168h (7 days)"));
                }
                Ok(d)
            }
        }
    }
}

/// Parses the subset of Go's `time.ParseDuration` syntax the CRD admits:
/// `0`, or one or more `<digits><unit>` with unit `h`, `m`, `s`, `ms`, `us`,
/// `ns` (`1h30m`, `90s`, `0s`). The same strings mean the same durations to
/// the API server's CEL `duration()`.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let bad =
        || format!("`{s}` is not a duration like 30s, 10m or 1h30m (units h, m, s, ms, us, ns)");
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(bad());
    }
    let mut rest = s;
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits_end = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits_end == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits_end].parse().map_err(|_| bad())?;
        rest = &rest[digits_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let nanos_per: u64 = match &rest[..unit_end] {
            "h" => 3_600_000_000_000,
            "m" => 60_000_000_000,
            "s" => 1_000_000_000,
            "ms" => 1_000_000,
            "us" => 1_000,
            "ns" => 1,
            _ => return Err(bad()),
        };
        rest = &rest[unit_end..];
        let part = n
            .checked_mul(nanos_per)
            .map(Duration::from_nanos)
            .ok_or_else(bad)?;
        total = total.checked_add(part).ok_or_else(bad)?;
    }
    Ok(total)
}

fn spec_error(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: format!("spec.{key}"),
        message: message.into(),
    }
}

/// The registry-table entry for a spec, checked with the same validation the
/// proxy applies to its config file (errors name the `spec.` key).
///
/// Referenced content is the operator's job, because it needs the API
/// server: `tls.caBundle` / `tls.caBundleConfigMapRef` become a PEM the
/// operator publishes next to the table (setting `ca_bundle` to its path),
/// and `credentialsSecretRef` becomes a credentials file in a Secret only the
/// proxy mounts (setting `credentials_file`). Here both stay `None`.
impl TryFrom<&MirrorRegistrySpec> for RegistryConfig {
    type Error = ConfigError;

    fn try_from(spec: &MirrorRegistrySpec) -> Result<Self, ConfigError> {
        let names = std::iter::once(("host".to_string(), &spec.host))
            .chain(
                spec.aliases
                    .iter()
                    .enumerate()
                    .map(|(i, a)| (format!("aliases[{i}]"), a)),
            )
            .chain(
                (spec.auth_hosts.iter().enumerate()).map(|(i, a)| (format!("authHosts[{i}]"), a)),
            );
        for (key, name) in names {
            if let Some(why) = crate::names::reserved_host(name) {
                return Err(spec_error(
                    &key,
                    format!("`{name}` may not be mirrored: {why}"),
                ));
            }
        }
        let tag_ttl = spec.tag_ttl().map_err(|m| spec_error("tagTTL", m))?;
        let tag_policy = (spec.tag_policy.iter().enumerate())
            .map(|(i, r)| {
                r.to_rule()
                    .map_err(|m| spec_error(&format!("tagPolicy[{i}]"), m))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let upstream = spec.upstream_url();
        if upstream
            .get(..7)
            .is_some_and(|p| p.eq_ignore_ascii_case("http://"))
            && !spec.allow_insecure_upstream
        {
            return Err(spec_error(
                "upstream",
                format!("`{upstream}` is plain http: set allowInsecureUpstream: true to allow it"),
            ));
        }
        let tls = spec.tls.clone().unwrap_or_default();
        let reg = RegistryConfig {
            host: spec.host.clone(),
            upstream: Some(upstream.into_owned()),
            aliases: spec.aliases.clone(),
            auth_hosts: spec.auth_hosts.clone(),
            ca_bundle: None,
            insecure_skip_verify: tls.insecure_skip_verify,
            allow_private_networks: spec.allow_private_networks,
            tag_ttl,
            tag_policy,
            upstream_reserve: spec
                .upstream_reserve
                .map_or_else(crate::config::default_upstream_reserve, u64::from),
            allow_push: spec.allow_push,
            private: spec.private,
            cache_tags: true,
            nodes: NodeOptions {
                dns_hijack: spec.nodes.dns_hijack,
                containerd: spec.nodes.containerd,
                crio: spec.nodes.crio,
            },
            ..Default::default()
        };
        // The proxy's own checks, on a one-registry table.
        let mut table = ProxyConfig {
            registries: vec![reg],
            ..Default::default()
        };
        table.validate().map_err(|e| ConfigError {
            key: e
                .key
                .strip_prefix("registries[0].")
                .map_or_else(|| e.key.clone(), |k| format!("spec.{k}")),
            message: e.message,
        })?;
        table
            .registries
            .pop()
            .ok_or_else(|| spec_error("host", "no registry"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> MirrorRegistrySpec {
        serde_norway::from_str(yaml).unwrap()
    }

    fn convert(yaml: &str) -> Result<RegistryConfig, ConfigError> {
        RegistryConfig::try_from(&spec(yaml))
    }

    #[test]
    fn names_match_the_derive() {
        use kube::Resource;
        assert_eq!(MirrorRegistry::group(&()), GROUP);
        assert_eq!(MirrorRegistry::version(&()), VERSION);
        assert_eq!(MirrorRegistry::plural(&()), "mirrorregistries");
    }

    #[test]
    fn go_durations() {
        let ok = [
            ("0", 0),
            ("0s", 0),
            ("10m", 600_000),
            ("1h30m", 5_400_000),
            ("90s", 90_000),
            ("1m30s500ms", 90_500),
            ("168h", 604_800_000),
            ("2h2h", 14_400_000),
        ];
        for (s, ms) in ok {
            assert_eq!(parse_go_duration(s), Ok(Duration::from_millis(ms)), "{s}");
        }
        assert_eq!(parse_go_duration("5us"), Ok(Duration::from_micros(5)));
        assert_eq!(parse_go_duration("7ns"), Ok(Duration::from_nanos(7)));
        for bad in [
            "", "10", "8d", "1.5h", "-1s", "+1s", "h", "1hm", "1 h", "soon", "1H", "00",
        ] {
            assert!(parse_go_duration(bad).is_err(), "{bad}");
        }
        // Overflow is an error, not a panic.
        assert!(parse_go_duration("99999999999999999999h").is_err());
        assert!(parse_go_duration("5000000000h").is_err());
    }

    /// Issue #10, point 11: a MirrorRegistry cannot take over a name the
    /// node itself depends on, under any of its name fields or spellings
    /// (the CRD's CEL rule only catches the common spellings).
    #[test]
    fn names_the_node_depends_on_are_refused() {
        for (yaml, key) in [
            ("host: localhost:5000", "spec.host"),
            ("host: '[0:0:0:0:0:0:0:1]:5000'", "spec.host"),
            (
                "host: quay.io\naliases: [quay.example, 169.254.169.254]",
                "spec.aliases[1]",
            ),
            (
                "host: docker.io\nauthHosts: ['[::ffff:127.0.0.1]']",
                "spec.authHosts[0]",
            ),
        ] {
            let e = convert(yaml).unwrap_err();
            assert_eq!(e.key, key, "{yaml}: {e}");
            assert!(e.message.contains("may not be mirrored"), "{e}");
        }
        assert!(convert("host: registry.lan:5000\naliases: [10.0.0.5:5000]").is_ok());
    }

    #[test]
    fn full_spec_converts_to_a_registry_table_entry() {
        let s = spec(
            r#"
host: quay.io
upstream: https://quay.io/
aliases: [quay-mirror.example]
authHosts: [auth.quay.example]
tls:
  caBundleConfigMapRef: {name: quay-ca, namespace: pullthrough}
  insecureSkipVerify: true
credentialsSecretRef: {name: quay-creds, namespace: pullthrough}
tagTTL: 1h30m
private: true
allowPush: true
nodes: {dnsHijack: false}
"#,
        );
        assert_eq!(
            s.tls
                .as_ref()
                .unwrap()
                .ca_bundle_config_map_ref
                .as_ref()
                .unwrap()
                .key,
            "ca.crt"
        );
        assert_eq!(
            s.nodes,
            NodeTargets {
                dns_hijack: false,
                containerd: true,
                crio: true
            }
        );
        let r = RegistryConfig::try_from(&s).unwrap();
        assert_eq!(r.host, "quay.io");
        assert_eq!(r.upstream.as_deref(), Some("https://quay.io"));
        assert_eq!(r.aliases, ["quay-mirror.example"]);
        assert_eq!(r.auth_hosts, ["auth.quay.example"]);
        assert!(r.insecure_skip_verify);
        assert!(r.allow_push);
        assert_eq!(r.tag_ttl, Duration::from_secs(5400));
        assert!(!r.nodes.dns_hijack && r.nodes.containerd && r.nodes.crio);
        // File paths the proxy reads: the operator sets them when it
        // publishes the PEM and the credentials (operator/src/table.rs).
        assert_eq!(r.ca_bundle, None);
        assert_eq!(r.credentials_file, None);
    }

    #[test]
    fn defaults() {
        let r = convert("host: ghcr.io\n").unwrap();
        assert_eq!(r.upstream.as_deref(), Some("https://ghcr.io"));
        assert_eq!(r.tag_ttl, crate::config::default_tag_ttl());
        assert!(!r.allow_push && !r.insecure_skip_verify);
        assert!(!r.allow_private_networks);
        assert!(r.nodes.is_default());
        let r = convert("host: lab.io\nallowPrivateNetworks: true\n").unwrap();
        assert!(r.allow_private_networks);
        // docker.io means Docker Hub, whose API lives elsewhere.
        let r = convert("host: docker.io\n").unwrap();
        assert_eq!(r.upstream.as_deref(), Some(DOCKER_HUB_UPSTREAM));
        assert_eq!(
            convert("tagTTL: 0s\nhost: a.io\n").unwrap().tag_ttl,
            Duration::ZERO
        );
        let r = convert(
            "host: a.io\ntagPolicy:\n- {pattern: latest, ttl: 0s}\n- {pattern: 'v.*', ttl: immutable}\n- {pattern: '.*-rc', ttl: 1h30m}\n",
        )
        .unwrap();
        let ttls: Vec<TagTtl> = r.tag_policy.iter().map(|t| t.ttl).collect();
        assert_eq!(
            ttls,
            [
                TagTtl::After(Duration::ZERO),
                TagTtl::Immutable,
                TagTtl::After(Duration::from_secs(5400))
            ]
        );
        assert_eq!(r.tag_policy[1].pattern, "v.*");
        assert!(r.tag_policy().unwrap().ttl("v1") == TagTtl::Immutable);
        assert_eq!(r.upstream_reserve, 10, "default reserve");
        let r = convert("host: a.io\nupstreamReserve: 0\n").unwrap();
        assert_eq!(r.upstream_reserve, 0);
    }

    #[test]
    fn invalid_specs_name_the_key() {
        let key = |yaml: &str| convert(yaml).unwrap_err().key;
        assert_eq!(key("host: https://quay.io\n"), "spec.host");
        assert_eq!(key("host: Quay.io\n"), "spec.host");
        assert_eq!(key("host: quay.io:0\n"), "spec.host");
        assert_eq!(key("host: quay.io\naliases: [A.io]\n"), "spec.aliases[0]");
        assert_eq!(key("host: quay.io\naliases: [quay.io]\n"), "spec.host");
        assert_eq!(
            key("host: quay.io\nauthHosts: ['x y']\n"),
            "spec.authHosts[0]"
        );
        assert_eq!(key("host: quay.io\nupstream: quay.io\n"), "spec.upstream");
        assert_eq!(key("host: quay.io\ntagTTL: 8d\n"), "spec.tagTTL");
        assert_eq!(key("host: quay.io\ntagTTL: 169h\n"), "spec.tagTTL");
        let policy = |rules: &str| format!("host: quay.io\ntagPolicy:\n{rules}");
        assert_eq!(
            key(&policy(
                "- {pattern: a, ttl: 1m}\n- {pattern: b, ttl: 8d}\n"
            )),
            "spec.tagPolicy[1]"
        );
        assert_eq!(
            key(&policy("- {pattern: a, ttl: forever}\n")),
            "spec.tagPolicy[0]"
        );
        // The pattern is compiled by the proxy's own check.
        assert_eq!(
            key(&policy("- {pattern: '[', ttl: 1m}\n")),
            "spec.tagPolicy[0]"
        );
        let e = convert("host: lan.io\nupstream: http://lan.io\n").unwrap_err();
        assert_eq!(e.key, "spec.upstream");
        assert!(e.message.contains("allowInsecureUpstream"), "{e}");
        assert!(convert("host: lan.io\nupstream: HTTP://lan.io\n").is_err());
        let r = convert("host: lan.io\nupstream: http://lan.io\nallowInsecureUpstream: true\n");
        assert_eq!(r.unwrap().upstream.as_deref(), Some("http://lan.io"));
    }

    #[test]
    fn spec_round_trips_without_unset_fields() {
        let s = spec("host: quay.io\nprivate: true\n");
        let yaml = serde_norway::to_string(&s).unwrap();
        assert_eq!(spec(&yaml), s);
        assert!(!yaml.contains("upstream"), "{yaml}");
    }

    #[test]
    fn status_helpers() {
        let counts = NodeCounts {
            configured: 2,
            total: 3,
        };
        assert_eq!(counts.summary(), "2/3");
        let status = MirrorRegistryStatus {
            conditions: vec![Condition {
                type_: condition::PROXY_READY.into(),
                status: "True".into(),
                reason: "TableServed".into(),
                message: String::new(),
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    Default::default(),
                ),
                observed_generation: Some(1),
            }],
            ..Default::default()
        };
        assert_eq!(
            status.condition("ProxyReady").map(|c| c.status.as_str()),
            Some("True")
        );
        assert!(status.condition(condition::ACCEPTED).is_none());
        let json = serde_json::to_value(&status).unwrap();
        assert!(
            json.get("nodes").is_none() && json.get("cache").is_none(),
            "{json}"
        );
    }
}

//! The `MirrorRegistry` custom resource (`pullthrough.dev/v1alpha1`): one
//! cluster-scoped object per upstream registry the cluster pulls through the
//! proxy. The operator turns the accepted ones into the registry table
//! ([`crate::config::RegistryConfig`]) and reports back in the status.
//!
//! The schema carries CEL rules (`x-kubernetes-validations`) so the API
//! server itself rejects what the proxy could never serve: a host that is a
//! URL or not lowercase, a plain-HTTP upstream nobody opted into, a tag TTL
//! outside 0s–7d. The operator re-checks everything in
//! [`crate::config::RegistryConfig`]'s `TryFrom` (`convert.rs`; a CRD installed from an older release, or
//! `--validate=false`, must not crash or poison the table).

use std::borrow::Cow;
use std::time::Duration;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

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

mod convert;
mod schema;
mod status;
#[cfg(test)]
mod tests;

pub use convert::parse_go_duration;
use schema::*;
pub use status::*;

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
    #[schemars(schema_with = "alias_list_schema")]
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
    #[schemars(length(min = 1, max = 253), pattern(OBJECT_NAME_PATTERN))]
    pub name: String,
    #[schemars(length(min = 1, max = 63), pattern(NAMESPACE_PATTERN))]
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
    #[schemars(length(min = 1, max = 253), pattern(OBJECT_NAME_PATTERN))]
    pub name: String,
    #[schemars(length(min = 1, max = 63), pattern(NAMESPACE_PATTERN))]
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

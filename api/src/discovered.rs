//! The `DiscoveredRegistry` resource (`pullthrough.dev/v1alpha1`): a
//! registry the cluster's pods pull from that no MirrorRegistry mirrors,
//! found by the operator. One cluster-scoped object per host, named after
//! it ([`object_name`]); the operator deletes it once a MirrorRegistry
//! covers the host or no pod uses it any more. Read-only for admins:
//! `kubectl get dreg` lists what is still pulled from the internet once
//! per node.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// At most this many example images are listed per registry.
pub const EXAMPLE_IMAGES: usize = 10;

/// A registry pods pull from that no MirrorRegistry mirrors.
// clippy takes the repeated `type_ = ...` of the printer columns for
// duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[kube(
    group = "pullthrough.dev",
    version = "v1alpha1",
    kind = "DiscoveredRegistry",
    plural = "discoveredregistries",
    singular = "discoveredregistry",
    shortname = "dreg",
    category = "pullthrough",
    status = "DiscoveredRegistryStatus",
    derive = "PartialEq",
    doc = "A registry running pods pull from that no MirrorRegistry mirrors (written by the pullthrough operator).",
    printcolumn(name = "Host", type_ = "string", json_path = ".spec.host"),
    printcolumn(
        name = "Pods",
        type_ = "integer",
        json_path = ".status.pods",
        description = "Unfinished pods with an image from this registry"
    ),
    printcolumn(
        name = "Nodes",
        type_ = "integer",
        json_path = ".status.nodes",
        description = "Nodes those pods run on"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DiscoveredRegistrySpec {
    /// The registry as image references name it (`ghcr.io`, `docker.io`).
    pub host: String,
}

#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DiscoveredRegistryStatus {
    /// Unfinished pods with at least one image from this registry.
    pub pods: u32,
    /// Distinct nodes those pods are scheduled on.
    pub nodes: u32,
    /// Some of the images (up to ten), e.g. to fill `spec.prefetch`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<String>,
}

/// The object name for `host`: a DNS-1123 subdomain (`registry.example:5000`
/// → `registry.example-5000`).
pub fn object_name(host: &str) -> String {
    host.to_ascii_lowercase()
        .replace([':', '[', ']'], "-")
        .trim_matches('-')
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_subdomains() {
        assert_eq!(object_name("ghcr.io"), "ghcr.io");
        assert_eq!(
            object_name("registry.example:5000"),
            "registry.example-5000"
        );
        assert_eq!(object_name("[::1]:5000"), "1--5000");
    }
}

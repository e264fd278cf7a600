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
use sha2::{Digest, Sha256};

/// The label (value `true`) on the MirrorRegistries the operator's
/// discovery `create` makes: it counts them against its cap, and the
/// chart's uninstall hook deletes them by it. Removing it makes one the
/// admin's like any other.
pub const DISCOVERED_LABEL: &str = "pullthrough.dev/discovered";

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

/// Hex digits of the hash [`object_name`] appends to a host it cannot use
/// as it is.
const NAME_HASH_LEN: usize = 10;

/// Longest object name the API server takes (a DNS-1123 subdomain).
const MAX_NAME_LEN: usize = 253;

/// The object name for `host`: a DNS-1123 subdomain, and a different one
/// for each host. A host that is such a name is its own name (`ghcr.io`);
/// any other (a port, an IPv6 address, upper case, too long) is written
/// with `-` for what a name may not hold, cut to fit, and ends in a hash of
/// the exact host (`registry.example:5000` →
/// `registry.example-5000-` and 10 hex digits). Without the hash
/// `registry.example:5000` and `registry.example-5000` would share one
/// object, whose `spec.host` would swap on every run. A host that itself
/// ends like a hash gets one too, so no plain name can equal a hashed one;
/// two hosts share a name only if 40 bits of their sha256 do.
pub fn object_name(host: &str) -> String {
    if is_subdomain(host) && !ends_like_hash(host) {
        return host.to_string();
    }
    let hash = hex::encode(Sha256::digest(host.as_bytes()));
    let hash = &hash[..NAME_HASH_LEN];
    let mapped: String = host
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '.') => c,
            _ => '-',
        })
        .collect();
    // Labels may neither be empty nor begin or end with `-`.
    let mut base = mapped
        .split('.')
        .map(|l| l.trim_matches('-'))
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(".");
    // Room for `-` and the hash (`base` is ASCII: the cut is on a char
    // boundary); what the cut leaves at the end may be `.` or `-`, which
    // may not precede `-`.
    base.truncate(MAX_NAME_LEN - NAME_HASH_LEN - 1);
    let base = base.trim_end_matches(['.', '-']);
    // Never the hash alone: that is a plain name some host may have.
    let base = if base.is_empty() { "host" } else { base };
    format!("{base}-{hash}")
}

/// Whether `name` is a DNS-1123 subdomain: dot-separated labels of
/// lowercase letters, digits and `-`, each starting and ending with a
/// letter or digit, 253 characters at most.
fn is_subdomain(name: &str) -> bool {
    let label = |l: &str| {
        l.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
            && !l.is_empty()
    };
    name.len() <= MAX_NAME_LEN && name.split('.').all(label)
}

/// Whether `name` ends like the names [`object_name`] hashes: `-` and
/// [`NAME_HASH_LEN`] lowercase hex digits.
fn ends_like_hash(name: &str) -> bool {
    let tail = name
        .len()
        .checked_sub(NAME_HASH_LEN + 1)
        .and_then(|i| name.get(i..));
    tail.is_some_and(|t| {
        t.starts_with('-')
            && t[1..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_subdomains() {
        assert_eq!(object_name("ghcr.io"), "ghcr.io");
        assert_eq!(
            object_name("registry.example-5000"),
            "registry.example-5000"
        );
        for host in [
            "registry.example:5000",
            "[::1]:5000",
            "Quay.io",
            "-",
            "",
            &format!("{}.example:5000", "a".repeat(250)),
            &format!("{}.b:5000", "a.".repeat(125)),
        ] {
            let name = object_name(host);
            assert!(is_subdomain(&name), "{host:?} → {name:?}");
            assert!(ends_like_hash(&name), "{host:?} → {name:?}");
        }
        assert!(object_name("registry.example:5000").starts_with("registry.example-5000-"));
    }

    /// A port and `-` in its place, case, and a host shaped like a hashed
    /// name: each host its own object.
    #[test]
    fn names_differ_for_different_hosts() {
        let port = object_name("registry.example:5000");
        let long = |end: &str| format!("{}{end}", "a".repeat(250));
        let hosts = [
            "registry.example:5000".to_string(),
            "registry.example-5000".to_string(),
            port.clone(),
            format!("{port}:5000"),
            "quay.io".to_string(),
            "Quay.io".to_string(),
            "[::1]:5000".to_string(),
            "1--5000".to_string(),
            "-".to_string(),
            object_name("-"),
            long(".example:5000"),
            long(".example:5001"),
        ];
        let names: std::collections::BTreeSet<String> =
            hosts.iter().map(|h| object_name(h)).collect();
        assert_eq!(names.len(), hosts.len(), "{names:?}");
        // Stable: names outlive the operator process that chose them.
        assert_eq!(object_name("registry.example:5000"), port);
    }
}

//! Pins: the images the proxy must never evict. The operator lists them
//! (what running pods run, and what the last ReplicaSet revisions of each
//! Deployment would run on a rollback) into the pins ConfigMap; every proxy
//! replica reads it from its mount and keeps their manifests and blobs.
//!
//! The pins travel apart from the registry table on purpose: they change
//! with every rollout, and each table change makes every node agent look
//! at its files again.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Key of the pins document in the pins ConfigMap (and its file name in
/// the proxy's mount).
pub const PINS_KEY: &str = "pins.json";

/// The pins document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pins {
    /// `registry/repository@sha256:…` or `registry/repository:tag`,
    /// normalized (`docker.io/library/…`), sorted, each once.
    pub images: BTreeSet<String>,
    /// `os/architecture[/variant]` of the cluster's nodes: what the proxy
    /// prefetches of a multi-platform image (empty: every platform).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub platforms: BTreeSet<String>,
}

/// True when an index entry for `os/arch[/variant]` serves one of
/// `platforms` (an entry without a variant there matches every variant).
pub fn platform_wanted(
    platforms: &BTreeSet<String>,
    os: &str,
    arch: &str,
    variant: Option<&str>,
) -> bool {
    if platforms.is_empty() {
        return true;
    }
    let base = format!("{os}/{arch}");
    platforms.contains(&base) || variant.is_some_and(|v| platforms.contains(&format!("{base}/{v}")))
}

/// One pinned image, split.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PinnedImage {
    /// Registry host as in image references (`docker.io`, `quay.io`).
    pub registry: String,
    pub repository: String,
    /// A digest (`sha256:…`) when known, else the tag.
    pub reference: String,
}

impl PinnedImage {
    /// Parses an image reference as a pod spec or a kubelet `imageID`
    /// writes it (`nginx`, `quay.io/a/b:1`, `docker.io/library/nginx@sha256:…`,
    /// cri-dockerd's `docker-pullable://nginx@sha256:…`). A digest wins over
    /// a tag. `None` for what names no repository (a bare `sha256:…` image
    /// ID) or does not parse.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s
            .strip_prefix("docker-pullable://")
            .or_else(|| s.strip_prefix("docker://"))
            .unwrap_or(s);
        if s.starts_with("sha256:") {
            return None;
        }
        let r: oci_spec::distribution::Reference = s.parse().ok()?;
        let reference = r.digest().or(r.tag())?.to_string();
        Some(Self {
            registry: r.registry().to_string(),
            repository: r.repository().to_string(),
            reference,
        })
    }

    /// True when `reference` is a digest.
    pub fn by_digest(&self) -> bool {
        self.reference.contains(':')
    }
}

impl fmt::Display for PinnedImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sep = if self.by_digest() { '@' } else { ':' };
        write!(
            f,
            "{}/{}{sep}{}",
            self.registry, self.repository, self.reference
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn references_are_normalized_as_the_runtimes_write_them() {
        for (input, want) in [
            ("nginx", "docker.io/library/nginx:latest".to_string()),
            ("nginx:1.25", "docker.io/library/nginx:1.25".to_string()),
            ("quay.io/a/b:1", "quay.io/a/b:1".to_string()),
            ("localhost:5000/x", "localhost:5000/x:latest".to_string()),
            (
                &format!("docker.io/library/busybox@{D}"),
                format!("docker.io/library/busybox@{D}"),
            ),
            (
                &format!("docker-pullable://busybox@{D}"),
                format!("docker.io/library/busybox@{D}"),
            ),
            // The digest is what runs; the tag is only a name for it.
            (
                &format!("registry.k8s.io/pause:3.10@{D}"),
                format!("registry.k8s.io/pause@{D}"),
            ),
        ] {
            let p = PinnedImage::parse(input).unwrap();
            assert_eq!(p.to_string(), want, "{input}");
            assert_eq!(PinnedImage::parse(&want), Some(p), "round trip of {want}");
        }
    }

    #[test]
    fn bare_image_ids_and_garbage_pin_nothing() {
        assert_eq!(PinnedImage::parse(D), None);
        assert_eq!(PinnedImage::parse(""), None);
        assert_eq!(PinnedImage::parse("UPPER/Case"), None);
        assert_eq!(PinnedImage::parse("a/b@sha256:short"), None);
    }

    #[test]
    fn platforms_match_with_or_without_a_variant() {
        let want: BTreeSet<String> = ["linux/amd64", "linux/arm/v7"].map(String::from).into();
        assert!(platform_wanted(&want, "linux", "amd64", None));
        assert!(platform_wanted(&want, "linux", "amd64", Some("v3")));
        assert!(platform_wanted(&want, "linux", "arm", Some("v7")));
        assert!(!platform_wanted(&want, "linux", "arm", Some("v6")));
        assert!(!platform_wanted(&want, "linux", "arm64", None));
        assert!(!platform_wanted(&want, "unknown", "unknown", None));
        assert!(platform_wanted(&BTreeSet::new(), "linux", "s390x", None));
    }

    #[test]
    fn the_document_is_a_sorted_set() {
        let pins: Pins =
            serde_json::from_str(r#"{"images":["quay.io/b:1","quay.io/a:1","quay.io/a:1"]}"#)
                .unwrap();
        assert_eq!(
            serde_json::to_string(&pins).unwrap(),
            r#"{"images":["quay.io/a:1","quay.io/b:1"]}"#
        );
    }
}

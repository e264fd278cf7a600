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
        if is_bare_digest(s) {
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

/// Whether `s` is a digest with no repository (an image ID, as kubelet
/// reports for some runtimes): `algorithm:hex` in the OCI digest grammar
/// (`sha256:…`, `sha512:…`, `blake3:…`). The reference grammar reads it as
/// a Docker Hub image `library/<algorithm>` with a tag, which would pin an
/// image nobody runs. Only hex of at least 64 digits (the shortest digest of
/// any registered algorithm) counts: `nginx:cafe` is a tag.
fn is_bare_digest(s: &str) -> bool {
    // Digests of registered algorithms are at least this long.
    const MIN_HEX: usize = 64;
    let Some((algorithm, encoded)) = s.split_once(':') else {
        return false;
    };
    // algorithm-component (algorithm-separator algorithm-component)*,
    // with components [a-z0-9]+ and separators [+._-].
    let algorithm_ok = algorithm.split(['+', '.', '_', '-']).all(|c| {
        !c.is_empty()
            && c.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    });
    algorithm_ok && encoded.len() >= MIN_HEX && encoded.bytes().all(|b| b.is_ascii_hexdigit())
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
        // Any algorithm, not only sha256: these are image IDs, not
        // `docker.io/library/<algorithm>:<tag>`.
        let sha512 = format!("sha512:{}", "0123456789abcdef".repeat(8));
        assert_eq!(PinnedImage::parse(&sha512), None);
        assert_eq!(PinnedImage::parse(&format!("docker://{sha512}")), None);
        let blake3 = format!("blake3:{}", "ab".repeat(32));
        assert_eq!(PinnedImage::parse(&blake3), None);
        assert_eq!(
            PinnedImage::parse(&format!("sha384:{}", "c".repeat(96))),
            None
        );
        assert_eq!(PinnedImage::parse(""), None);
        assert_eq!(PinnedImage::parse("UPPER/Case"), None);
        assert_eq!(PinnedImage::parse("a/b@sha256:short"), None);
    }

    /// Tags that look like hex (short ones, a git commit's 40 digits) and
    /// images with a repository path are still images.
    #[test]
    fn hex_tags_are_still_images() {
        let git = "0123456789abcdef0123456789abcdef01234567";
        for (input, want) in [
            ("nginx:cafe", "docker.io/library/nginx:cafe".to_string()),
            ("app:1", "docker.io/library/app:1".to_string()),
            (
                &format!("app:{git}"),
                format!("docker.io/library/app:{git}"),
            ),
            (
                &format!("team/sha512:{}", "ab".repeat(64)),
                format!("docker.io/team/sha512:{}", "ab".repeat(64)),
            ),
            (
                &format!("quay.io/a/b@sha512:{}", "ab".repeat(64)),
                format!("quay.io/a/b@sha512:{}", "ab".repeat(64)),
            ),
        ] {
            let p = PinnedImage::parse(input);
            assert_eq!(p.map(|p| p.to_string()), Some(want), "{input}");
        }
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

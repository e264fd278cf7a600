//! The OCI distribution grammar (repository names, tags, digests) and its
//! error bodies. Everything a client sends is checked here before it can
//! reach a path on disk or an upstream URL.

use std::fmt;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use serde_json::json;

/// The fields of a manifest or index that name content: what pinning keeps
/// and prefetch fetches (the rest is the upstream's business).
#[derive(Debug, Default, serde::Deserialize)]
pub struct ContentRefs {
    #[serde(default)]
    pub config: Option<Descriptor>,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    /// An index's platform manifests.
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

#[derive(Debug, serde::Deserialize)]
pub struct Descriptor {
    pub digest: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
}

#[derive(Debug, serde::Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

/// A validated `sha256:<64 lowercase hex>` digest. Only sha256 is accepted:
/// it is what every registry serves and what the cache verifies.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    pub fn parse(s: &str) -> Result<Self, String> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| format!("`{s}` is not a sha256 digest"))?;
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(format!("`{s}` is not a valid sha256 digest"));
        }
        Ok(Self(s.to_string()))
    }

    /// The 64 hex characters (safe as a file name).
    pub fn hex(&self) -> &str {
        &self.0[7..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        use sha2::Digest as _;
        Self(format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(bytes))
        ))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A manifest reference: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

impl Reference {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.contains(':') {
            return Digest::parse(s).map(Reference::Digest);
        }
        // tag: [A-Za-z0-9_][A-Za-z0-9._-]{0,127}
        let ok = !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if ok {
            Ok(Reference::Tag(s.to_string()))
        } else {
            Err(format!("`{s}` is not a valid tag"))
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Reference::Tag(t) => t,
            Reference::Digest(d) => d.as_str(),
        }
    }
}

/// Validates a repository name: path components of
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*` joined by `/`, at most 255 chars.
pub fn validate_repository(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 255 {
        return Err(format!("repository name `{name}` has an invalid length"));
    }
    for comp in name.split('/') {
        if !valid_component(comp) {
            return Err(format!("repository name `{name}` is invalid"));
        }
    }
    Ok(())
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-".
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// OCI error codes the proxy answers with itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    NameUnknown,
    ManifestUnknown,
    BlobUnknown,
    NameInvalid,
    DigestInvalid,
    ManifestInvalid,
    Denied,
    Unsupported,
    Unavailable,
    TooManyRequests,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
        }
    }
}

/// An OCI error JSON response: `{"errors":[{"code","message"}]}`.
pub fn error_response(status: StatusCode, code: ErrorCode, message: &str) -> Response<Bytes> {
    let body = json!({"errors": [{"code": code.as_str(), "message": message, "detail": null}]});
    let mut resp = Response::new(Bytes::from(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// True for the media types served under `/manifests/`: image manifests
/// and indexes (OCI and Docker), and the legacy Docker schema 1. Anything
/// else the store holds (layers, configs) is a blob, never a manifest.
pub fn is_manifest_type(media_type: &str) -> bool {
    let mt = media_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    matches!(
        mt.as_str(),
        "application/vnd.oci.image.manifest.v1+json"
            | "application/vnd.oci.image.index.v1+json"
            | "application/vnd.oci.artifact.manifest.v1+json"
            | "application/vnd.docker.distribution.manifest.v2+json"
            | "application/vnd.docker.distribution.manifest.list.v2+json"
            | "application/vnd.docker.distribution.manifest.v1+json"
            | "application/vnd.docker.distribution.manifest.v1+prettyjws"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests() {
        let hex = "a".repeat(64);
        let d = Digest::parse(&format!("sha256:{hex}")).unwrap();
        assert_eq!(d.hex(), hex);
        for bad in [
            "sha256:".to_string(),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha512:{hex}"),
            format!("sha256:{}", "a".repeat(63)),
            format!("sha256:../{}", "a".repeat(61)),
            hex.clone(),
        ] {
            assert!(Digest::parse(&bad).is_err(), "{bad}");
        }
        assert_eq!(
            Digest::of(b"").as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn references() {
        assert_eq!(
            Reference::parse("v1.2_3-x").unwrap(),
            Reference::Tag("v1.2_3-x".into())
        );
        for bad in [
            "",
            ".x",
            "-x",
            "a/b",
            "..",
            "%2e%2e",
            &"a".repeat(129),
            "sha256:zz",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn repositories() {
        for ok in [
            "library/busybox",
            "a",
            "fixture/app",
            "a__b/c-d/e.f",
            "a--b",
        ] {
            assert_eq!(validate_repository(ok), Ok(()), "{ok}");
        }
        for bad in [
            "", "..", "a/../b", "a//b", "/a", "a/", "A", "a..b", "a___b", "a._b", "%2e%2e/x",
            "a/.", "-a", "a-",
        ] {
            assert!(validate_repository(bad).is_err(), "{bad}");
        }
    }
}

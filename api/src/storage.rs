//! `storage:` and `peers:` of the proxy config: the object store that
//! several proxy replicas share, and how the replicas find each other so
//! that each blob is fetched from the upstream once for the whole cluster.
//!
//! Without `storage:` the proxy keeps everything on its own disk (one
//! replica, today's default). With it, the disk (`dataDir`, bounded by
//! `cache.maxSize`) is a local tier in front of the bucket, and the bucket
//! is bounded by `storage.maxSize` across all replicas.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{default_high_watermark, default_low_watermark};
use crate::error::ConfigError;
use crate::names::validate_host;

/// `storage:`: the shared tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SharedStorage {
    pub s3: S3Storage,
    /// Size bound of the bucket (under `prefix`) across every replica;
    /// unbounded if unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size: Option<bytesize::ByteSize>,
    /// Eviction starts when the bucket passes this fraction of `maxSize`...
    #[serde(default = "default_high_watermark")]
    pub high_watermark: f64,
    /// ... and removes least recently used blobs down to this fraction.
    #[serde(default = "default_low_watermark")]
    pub low_watermark: f64,
    /// A blob read this recently is never evicted (a replica may be
    /// streaming it from the bucket).
    #[serde(with = "humantime_serde", default = "default_min_age")]
    pub min_age: Duration,
    /// How often the replica holding the eviction lease checks the
    /// bucket's size (and every replica writes its access journal).
    #[serde(with = "humantime_serde", default = "default_eviction_interval")]
    pub eviction_interval: Duration,
}

/// `storage.s3`: an S3-compatible bucket (AWS S3, MinIO, SeaweedFS, Ceph RGW, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct S3Storage {
    /// Base URL of the S3 API; unset: AWS S3 of `region`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    pub bucket: String,
    /// Every object the proxy writes is under this key prefix.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
    /// `https://endpoint/bucket/key` instead of `https://bucket.endpoint/key`
    /// (most S3-compatible stores need it).
    #[serde(default)]
    pub path_style: bool,
    /// Allow an `http://` endpoint (tests, a store inside the cluster).
    #[serde(default)]
    pub allow_http: bool,
    /// PEM bundle trusted for the endpoint in addition to the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub credentials: S3Credentials,
}

/// `storage.s3.credentials`: where the access keys come from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct S3Credentials {
    #[serde(default)]
    pub source: CredentialSource,
    /// `source: files`: the directory holding the files `accessKeyId` and
    /// `secretAccessKey` (and optionally `sessionToken`), e.g. a mounted
    /// Secret; re-read when they change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
}

/// How the proxy authenticates to the bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum CredentialSource {
    /// The standard AWS environment: `AWS_ACCESS_KEY_ID` /
    /// `AWS_SECRET_ACCESS_KEY` (/ `AWS_SESSION_TOKEN`), or web identity
    /// (IRSA: `AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN`), or the
    /// instance's role.
    #[default]
    Env,
    /// Files in `credentials.dir`.
    Files,
}

/// `peers:`: the other replicas over the same bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Peers {
    /// Where this replica serves blobs to its peers (mutual TLS with
    /// certificates from the proxy CA).
    pub listen: SocketAddr,
    /// A DNS name whose addresses are the live replicas (a headless
    /// Service), re-resolved every `refresh`; port = `listen`'s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<String>,
    /// Fixed peer addresses (outside Kubernetes), this replica's included.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub r#static: Vec<SocketAddr>,
    #[serde(with = "humantime_serde", default = "default_refresh")]
    pub refresh: Duration,
}

fn default_region() -> String {
    "us-east-1".to_string()
}

fn default_min_age() -> Duration {
    Duration::from_secs(600)
}

fn default_eviction_interval() -> Duration {
    Duration::from_secs(60)
}

fn default_refresh() -> Duration {
    Duration::from_secs(5)
}

impl SharedStorage {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let s3 = &self.s3;
        if let Some(endpoint) = &s3.endpoint {
            let uri: http::Uri = endpoint.parse().map_err(|e| {
                ConfigError::new(
                    "storage.s3.endpoint",
                    format!("`{endpoint}` is not a URL: {e}"),
                )
            })?;
            match uri.scheme_str() {
                Some("https") => {}
                Some("http") if s3.allow_http => {}
                Some("http") => {
                    return Err(ConfigError::new(
                        "storage.s3.endpoint",
                        format!(
                            "`{endpoint}` is plain HTTP; set storage.s3.allowHttp: true to allow it"
                        ),
                    ));
                }
                _ => {
                    return Err(ConfigError::new(
                        "storage.s3.endpoint",
                        format!("`{endpoint}` must start with https:// (or http://)"),
                    ));
                }
            }
        }
        if s3.bucket.is_empty()
            || !s3
                .bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        {
            return Err(ConfigError::new(
                "storage.s3.bucket",
                format!(
                    "`{}` is not a bucket name (lowercase letters, digits, `-`, `.`, `_`)",
                    s3.bucket
                ),
            ));
        }
        if s3.region.is_empty() {
            return Err(ConfigError::new("storage.s3.region", "must not be empty"));
        }
        if s3.prefix.starts_with('/') || s3.prefix.split('/').any(|p| p == "..") {
            return Err(ConfigError::new(
                "storage.s3.prefix",
                "must be a relative key prefix without `..`",
            ));
        }
        match (s3.credentials.source, &s3.credentials.dir) {
            (CredentialSource::Files, None) => {
                return Err(ConfigError::new(
                    "storage.s3.credentials.dir",
                    "is required with source: files",
                ));
            }
            (CredentialSource::Env, Some(_)) => {
                return Err(ConfigError::new(
                    "storage.s3.credentials.dir",
                    "is only read with source: files",
                ));
            }
            _ => {}
        }
        if self.eviction_interval.is_zero() || self.eviction_interval > Duration::from_secs(86_400)
        {
            return Err(ConfigError::new(
                "storage.evictionInterval",
                "must be more than 0s and at most 24h",
            ));
        }
        crate::config::validate_watermarks("storage", self.low_watermark, self.high_watermark)
    }
}

impl Peers {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        match (&self.dns, self.r#static.is_empty()) {
            (Some(_), false) => Err(ConfigError::new(
                "peers",
                "set either dns or static, not both",
            )),
            (None, true) => Err(ConfigError::new(
                "peers",
                "needs dns (a headless Service name) or a static list",
            )),
            (Some(name), true) => validate_host(name).map_err(|m| ConfigError::new("peers.dns", m)),
            (None, false) => Ok(()),
        }?;
        if self.refresh.is_zero() || self.refresh > Duration::from_secs(3600) {
            return Err(ConfigError::new(
                "peers.refresh",
                "must be more than 0s and at most 1h",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::ProxyConfig;

    #[test]
    fn a_bucket_with_peers_parses_with_defaults() {
        let c = ProxyConfig::from_yaml(
            "storage:\n  s3: {endpoint: 'http://127.0.0.1:8333', allowHttp: true, bucket: cache, pathStyle: true,\n    credentials: {source: files, dir: /s3}}\n  maxSize: 10GiB\npeers:\n  listen: 0.0.0.0:8444\n  dns: pullthrough-proxy-peers.pullthrough.svc\n",
        )
        .unwrap();
        let s = c.storage.unwrap();
        assert_eq!(s.s3.region, "us-east-1");
        assert_eq!(s.max_size, Some(bytesize::ByteSize::gib(10)));
        assert_eq!(s.min_age.as_secs(), 600);
        assert_eq!(c.peers.unwrap().refresh.as_secs(), 5);
    }

    #[test]
    fn bad_storage_and_peers_name_the_field() {
        for (yaml, field) in [
            (
                "storage: {s3: {bucket: c, endpoint: 'http://x'}}",
                "storage.s3.endpoint",
            ),
            ("storage: {s3: {bucket: Bad_Name}}", "storage.s3.bucket"),
            (
                "storage: {s3: {bucket: c, prefix: '../x'}}",
                "storage.s3.prefix",
            ),
            (
                "storage: {s3: {bucket: c, credentials: {source: files}}}",
                "storage.s3.credentials.dir",
            ),
            ("storage: {s3: {bucket: c}, lowWatermark: 0.95}", "storage"),
            ("peers: {listen: '0.0.0.0:8444'}", "peers"),
            (
                "peers: {listen: '0.0.0.0:8444', dns: a, static: ['127.0.0.1:1']}",
                "peers",
            ),
            (
                "peers: {listen: '0.0.0.0:8444', dns: 'not a name'}",
                "peers.dns",
            ),
        ] {
            let err = ProxyConfig::from_yaml(yaml).unwrap_err();
            assert_eq!(err.key, field, "{yaml}: {err}");
        }
    }
}

//! Loading the config (file or embedded default), applying `--data-dir`, and
//! watching the file so a valid change takes effect without a restart.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use pullthrough_api::config::{ConfigError, ProxyConfig};

/// The config used when no `--config` is given.
pub const DEFAULT_CONFIG: &str = include_str!("default-config.yaml");

/// Where the cache lives when neither `--data-dir` nor `dataDir` says.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/pullthrough";

/// A config that failed to load, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {source_name}: {error}")]
    Invalid {
        source_name: String,
        #[source]
        error: ConfigError,
    },
}

/// Reads and validates the config from `path`, or the embedded default.
#[cfg(test)]
pub fn load(path: Option<&Path>) -> Result<ProxyConfig, LoadError> {
    load_full(path).map(|l| l.config)
}

/// A loaded config: the shared table, the proxy-only settings, and the
/// sha256 of the file bytes (`/status` `configHash`).
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: ProxyConfig,
    pub settings: Settings,
    pub hash: String,
}

/// Reads and validates the config and the proxy-only settings.
pub fn load_full(path: Option<&Path>) -> Result<Loaded, LoadError> {
    let (text, source_name) = match path {
        None => (DEFAULT_CONFIG.to_string(), "<embedded default>".to_string()),
        Some(p) => (
            std::fs::read_to_string(p).map_err(|source| LoadError::Read {
                path: p.to_path_buf(),
                source,
            })?,
            p.display().to_string(),
        ),
    };
    let invalid = |error| LoadError::Invalid {
        source_name: source_name.clone(),
        error,
    };
    let (config, settings) = parse(&text).map_err(invalid)?;
    use sha2::Digest as _;
    let hash = hex::encode(sha2::Sha256::digest(text.as_bytes()));
    Ok(Loaded {
        config,
        settings,
        hash,
    })
}

/// The proxy-only view of the config the request path reads: per-registry
/// switches by host, the cache bound, the access-check TTL, the admin token.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub cache: CacheSettings,
    /// How long an upstream "this client may read this repository" answer
    /// is reused (`authCheckTTL`).
    pub auth_check_ttl: Duration,
    /// Bearer token the admin API requires (`adminToken`, or the
    /// `PULLTHROUGH_ADMIN_TOKEN` environment variable).
    pub admin_token: Option<String>,
    /// Per registry host: `private`, `cacheTags`.
    pub registries: HashMap<String, RegistrySettings>,
}

pub type CacheSettings = pullthrough_api::config::CacheConfig;

impl Default for Settings {
    fn default() -> Self {
        Self::from_config(&ProxyConfig::default())
    }
}

impl Settings {
    pub fn from_config(config: &ProxyConfig) -> Self {
        Self {
            cache: config.cache.clone(),
            auth_check_ttl: config.auth_check_ttl,
            admin_token: config.admin_token.clone().filter(|t| !t.is_empty()),
            registries: config
                .registries
                .iter()
                .map(|r| {
                    let s = RegistrySettings {
                        private: r.private,
                        cache_tags: r.cache_tags,
                    };
                    (r.host.clone(), s)
                })
                .collect(),
        }
    }

    pub fn registry(&self, host: &str) -> RegistrySettings {
        self.registries.get(host).cloned().unwrap_or_default()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RegistrySettings {
    /// Every repository is private: cached content is served only after a
    /// per-client upstream check.
    pub private: bool,
    /// Cache tag → digest answers; when false every tag request asks the
    /// upstream (the last answer is still kept for stale-if-error).
    pub cache_tags: bool,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        Self {
            private: false,
            cache_tags: true,
        }
    }
}

/// Parses the config and derives the proxy's settings from it.
pub fn parse(text: &str) -> Result<(ProxyConfig, Settings), ConfigError> {
    let config = ProxyConfig::from_yaml(text)?;
    let settings = Settings::from_config(&config);
    Ok((config, settings))
}

/// The data dir: `--data-dir`, else `dataDir`, else the default.
pub fn data_dir(cli: Option<&Path>, config: &ProxyConfig) -> PathBuf {
    cli.map(Path::to_path_buf)
        .or_else(|| config.data_dir.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR))
}

/// Polls `path` and yields each new valid config; an invalid file is
/// logged and skipped, so the running config stays. Polling (rather than
/// inotify) also sees Kubernetes ConfigMap updates, which swap a symlink.
pub async fn watch(path: PathBuf, interval: Duration, mut apply: impl FnMut(Loaded)) {
    let mut last = fingerprint(&path);
    loop {
        tokio::time::sleep(interval).await;
        let now = fingerprint(&path);
        if now == last {
            continue;
        }
        last = now;
        match load_full(Some(&path)) {
            Ok(config) => {
                tracing::info!(path = %path.display(), "config changed; applying");
                apply(config);
            }
            Err(err) => {
                tracing::error!(error = %err, "config change rejected; keeping the running config");
            }
        }
    }
}

fn fingerprint(path: &Path) -> Option<(SystemTime, u64, Vec<u8>)> {
    let meta = std::fs::metadata(path).ok()?;
    // Content too: a rewrite within the mtime granularity must not be missed.
    let bytes = std::fs::read(path).ok()?;
    Some((meta.modified().ok()?, meta.len(), bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_serves_the_big_five() {
        let c = load(None).unwrap();
        for host in [
            "docker.io",
            "quay.io",
            "registry.k8s.io",
            "gcr.io",
            "ghcr.io",
        ] {
            assert!(c.registry(host).is_some(), "{host}");
        }
        assert_eq!(
            c.registry("docker.io").unwrap().upstream_url(),
            "https://registry-1.docker.io"
        );
        assert_eq!(c.default_registry.as_deref(), Some("docker.io"));
        assert!(c.listen.https.unwrap().ip().is_loopback());
    }

    #[test]
    fn proxy_settings_come_from_the_shared_config() {
        let (c, s) = parse(
            "cache: {maxSize: 10GiB, highWatermark: 0.9, lowWatermark: 0.8}\nauthCheckTTL: 5s\nadminToken: t\nregistries:\n  - host: quay.io\n    private: true\n    cacheTags: false\n    tagTTL: 1s\n  - host: b.io\n",
        )
        .unwrap();
        assert_eq!(c.registries.len(), 2);
        assert_eq!(c.registries[0].tag_ttl, Duration::from_secs(1));
        assert_eq!(s.cache.max_size.unwrap().as_u64(), 10 << 30);
        assert_eq!(s.auth_check_ttl, Duration::from_secs(5));
        assert_eq!(s.admin_token.as_deref(), Some("t"));
        assert!(s.registry("quay.io").private);
        assert!(!s.registry("quay.io").cache_tags);
        assert!(s.registry("b.io").cache_tags);
        assert!(!s.registry("b.io").private);
        let (_, s) = parse("cache: {maxSize: 500MiB}\n").unwrap();
        assert_eq!(s.cache.max_size.unwrap().as_u64(), 500 << 20);
        assert!(parse("cache: {maxSize: lots}\n").is_err());
        assert!(parse("cache: {colour: red}\n").is_err());
        assert!(parse("cache: {highWatermark: 0.5, lowWatermark: 0.7}\n").is_err());
        let e = parse("registries:\n  - host: quay.io\n    private: maybe\n").unwrap_err();
        assert_eq!(e.key, "registries[0].private");
        let e = parse("registries:\n  - host: quay.io\n    colour: red\n").unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.yaml");
        std::fs::write(&p, "registries:\n  - host: quay.io\n    tagTTL: forever\n").unwrap();
        let e = load(Some(&p)).unwrap_err().to_string();
        assert!(
            e.contains("c.yaml") && e.contains("registries[0].tagTTL"),
            "{e}"
        );
        let e = load(Some(&dir.path().join("missing.yaml")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.yaml"), "{e}");
    }
}

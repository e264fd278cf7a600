//! Loading the config (file or embedded default), applying `--data-dir`, and
//! watching the file so a valid change takes effect without a restart.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pullthrough_api::config::{ConfigError, ProxyConfig};
use pullthrough_api::tags::TagPolicy;

use crate::upstream::credentials::{CredentialsFileError, RegistryCredentials};

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
    /// A registry's `credentialsFile` is missing or unusable (names the
    /// registry, the file and the field).
    #[error("config {source_name}: {error}")]
    Credentials {
        source_name: String,
        #[source]
        error: CredentialsFileError,
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
    let (config, mut settings) = parse(&text).map_err(invalid)?;
    settings
        .load_credentials(&config)
        .map_err(|error| LoadError::Credentials {
            source_name: source_name.clone(),
            error,
        })?;
    let hash = pullthrough_api::contract::config_hash(text.as_bytes());
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
                    // Checked by `validate` when the config was parsed; a
                    // config built in code without it keeps its tagTTL.
                    let tag_policy = r.tag_policy().unwrap_or_else(|e| {
                        tracing::error!(registry = %r.host, rule = ?e.index, error = %e.message, "tagPolicy not applied");
                        TagPolicy::uniform(r.tag_ttl)
                    });
                    let s = RegistrySettings {
                        private: r.private,
                        cache_tags: r.cache_tags,
                        tag_policy: Arc::new(tag_policy),
                        upstream_reserve: r.upstream_reserve,
                        credentials: None,
                    };
                    (r.host.clone(), s)
                })
                .collect(),
        }
    }

    pub fn registry(&self, host: &str) -> RegistrySettings {
        self.registries.get(host).cloned().unwrap_or_default()
    }

    /// Reads every registry's `credentialsFile`; the first that is missing
    /// or invalid is the error.
    pub fn load_credentials(&mut self, config: &ProxyConfig) -> Result<(), CredentialsFileError> {
        for r in &config.registries {
            let Some(path) = &r.credentials_file else {
                continue;
            };
            let creds = RegistryCredentials::load(&r.host, path)?.limited(&config.limits);
            if r.private {
                tracing::warn!(
                    registry = %r.host,
                    file = %path.display(),
                    "credentialsFile is not used for a `private` registry: every client needs its own credentials"
                );
            }
            if let Some(s) = self.registries.get_mut(&r.host) {
                s.credentials = Some(Arc::new(creds));
            }
        }
        Ok(())
    }

    /// Keeps what `old` learnt with credentials that did not change (Bearer
    /// tokens, Basic), so a reload of an unrelated setting costs no token
    /// requests. Changed credentials keep their fresh, empty state: tokens
    /// fetched with the old ones are dropped.
    pub fn keep_credentials_state(&mut self, old: &Settings) {
        for (host, s) in &mut self.registries {
            let Some(new) = &s.credentials else { continue };
            if let Some(prev) = old
                .registries
                .get(host)
                .and_then(|o| o.credentials.as_ref())
                && **prev == **new
            {
                s.credentials = Some(prev.clone());
            }
        }
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
    /// How long each tag's answer is trusted (`tagPolicy` over `tagTTL`).
    pub tag_policy: Arc<TagPolicy>,
    /// `upstreamReserve`: at or under this many pulls left upstream,
    /// cached tags are not revalidated.
    pub upstream_reserve: u64,
    /// From `credentialsFile`; used through [`Self::proxy_credentials`].
    pub credentials: Option<Arc<RegistryCredentials>>,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        Self {
            private: false,
            cache_tags: true,
            tag_policy: Arc::new(TagPolicy::uniform(
                pullthrough_api::config::default_tag_ttl(),
            )),
            upstream_reserve: pullthrough_api::config::default_upstream_reserve(),
            credentials: None,
        }
    }
}

impl RegistrySettings {
    /// The credentials the proxy authenticates with for clients that send
    /// none. Never for a `private` registry: there every client must be
    /// authorised by the upstream with its own credentials, so the
    /// proxy's own would let anyone read what `private` protects.
    pub fn proxy_credentials(&self) -> Option<&RegistryCredentials> {
        self.credentials.as_deref().filter(|_| !self.private)
    }

    /// On what basis a client without credentials reads this registry:
    /// `""` anonymously, else the fingerprint of the proxy's credentials.
    /// A repository learnt readable on one basis is not taken as readable
    /// on another (credentials rotated or removed).
    pub fn anonymous_basis(&self) -> &str {
        self.proxy_credentials()
            .map(RegistryCredentials::fingerprint)
            .unwrap_or_default()
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

/// Polls `path` and the `credentialsFile`s it names, and yields each new
/// valid config; an invalid one is logged and skipped, so the running
/// config stays. Polling (rather than inotify) also sees Kubernetes
/// ConfigMap and Secret volume updates, which swap a symlink: files are
/// compared by content, through the link.
///
/// A rejected version is retried at every poll even if nothing changes,
/// since what made it fail may be outside the watched files' content
/// (a Secret volume kubelet has not synced yet, a file's permissions);
/// the error is logged again only when it changes.
///
/// `baseline` is what the files held when the running config was read
/// ([`Baseline::take`] just before [`load_full`]): a change between that
/// read and the first poll (start-up rebuilds the cache index first, which
/// can take a while) is applied. A baseline taken at the first poll
/// instead made such a change the baseline, never applied.
pub async fn watch(
    path: PathBuf,
    interval: Duration,
    baseline: Baseline,
    apply: impl FnMut(Loaded) -> Result<(), String>,
) {
    watch_with(path, interval, baseline, |p| load_full(Some(p)), apply).await;
}

/// What the watched files held at a moment.
#[derive(Debug)]
pub struct Baseline(Watched);

impl Baseline {
    pub fn take(path: &Path) -> Self {
        Self(watched(path))
    }
}

/// [`watch`] with the loading step given (tests make it fail on cue).
async fn watch_with(
    path: PathBuf,
    interval: Duration,
    Baseline(baseline): Baseline,
    load: impl Fn(&Path) -> Result<Loaded, LoadError>,
    mut apply: impl FnMut(Loaded) -> Result<(), String>,
) {
    let mut last = baseline;
    let mut failing: Option<String> = None;
    // What the last applied version learnt with its credentials; the
    // version main loaded first is not known here, so its tokens are
    // fetched again after the first reload.
    let mut applied: Option<Settings> = None;
    loop {
        tokio::time::sleep(interval).await;
        let now = watched(&path);
        if now == last && failing.is_none() {
            continue;
        }
        let credentials_changed = now.credentials != last.credentials;
        last = now;
        match load(&path) {
            Ok(mut loaded) => {
                if let Some(old) = &applied {
                    loaded.settings.keep_credentials_state(old);
                }
                tracing::info!(
                    path = %path.display(),
                    credentials_changed,
                    retried = failing.is_some(),
                    "config changed; applying"
                );
                let settings = loaded.settings.clone();
                // Applying can fail too (e.g. a caBundle it names is not
                // there yet): retried at every poll like a failed load.
                match apply(loaded) {
                    Ok(()) => {
                        failing = None;
                        applied = Some(settings);
                    }
                    Err(text) => {
                        if failing.as_deref() != Some(text.as_str()) {
                            tracing::error!(error = %text, "config change rejected; keeping the running config (retrying at every poll)");
                        }
                        failing = Some(text);
                    }
                }
            }
            Err(err) => {
                let text = err.to_string();
                if failing.as_deref() != Some(text.as_str()) {
                    tracing::error!(error = %text, "config change rejected; keeping the running config (retrying at every poll)");
                } else {
                    tracing::debug!(error = %text, "config still rejected");
                }
                failing = Some(text);
            }
        }
    }
}

/// What a change of is a reason to reload: the config file, and the
/// content of each `credentialsFile` it names.
#[derive(Debug, PartialEq)]
struct Watched {
    config: Option<(SystemTime, u64, Vec<u8>)>,
    /// Path and sha256 of the content (None: unreadable), in config order.
    credentials: Vec<(PathBuf, Option<[u8; 32]>)>,
}

fn watched(path: &Path) -> Watched {
    let config = fingerprint(path);
    let credentials = config
        .as_ref()
        .and_then(|(_, _, bytes)| std::str::from_utf8(bytes).ok())
        .and_then(|text| ProxyConfig::from_yaml(text).ok())
        .map(|c| {
            c.registries
                .iter()
                .filter_map(|r| r.credentials_file.clone())
                .map(|p| {
                    // A hash, so the secret is not kept around in memory.
                    use sha2::Digest as _;
                    let digest = std::fs::read(&p)
                        .ok()
                        .map(|b| sha2::Sha256::digest(b).into());
                    (p, digest)
                })
                .collect()
        })
        .unwrap_or_default();
    Watched {
        config,
        credentials,
    }
}

fn fingerprint(path: &Path) -> Option<(SystemTime, u64, Vec<u8>)> {
    let meta = std::fs::metadata(path).ok()?;
    // Content too: a rewrite within the mtime granularity must not be missed.
    let bytes = std::fs::read(path).ok()?;
    Some((meta.modified().ok()?, meta.len(), bytes))
}

#[cfg(test)]
mod tests;

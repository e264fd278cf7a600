//! Loading the config (file or embedded default), applying `--data-dir`, and
//! watching the file so a valid change takes effect without a restart.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pullthrough_api::config::{ConfigError, ProxyConfig};

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
                    let s = RegistrySettings {
                        private: r.private,
                        cache_tags: r.cache_tags,
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
            let creds = RegistryCredentials::load(&r.host, path)?;
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
    /// From `credentialsFile`; used through [`Self::proxy_credentials`].
    pub credentials: Option<Arc<RegistryCredentials>>,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        Self {
            private: false,
            cache_tags: true,
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
pub async fn watch(
    path: PathBuf,
    interval: Duration,
    apply: impl FnMut(Loaded) -> Result<(), String>,
) {
    watch_with(path, interval, |p| load_full(Some(p)), apply).await;
}

/// [`watch`] with the loading step given (tests make it fail on cue).
async fn watch_with(
    path: PathBuf,
    interval: Duration,
    load: impl Fn(&Path) -> Result<Loaded, LoadError>,
    mut apply: impl FnMut(Loaded) -> Result<(), String>,
) {
    let mut last = watched(&path);
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

    fn write_creds(path: &Path, user: &str, password: &str) {
        std::fs::write(
            path,
            format!(r#"{{"username": "{user}", "password": "{password}"}}"#),
        )
        .unwrap();
    }

    #[test]
    fn credentials_files_are_read_with_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("quay.json");
        write_creds(&creds, "bot", "hunter2");
        let config = dir.path().join("c.yaml");
        std::fs::write(
            &config,
            format!(
                "registries:\n  - host: quay.io\n    credentialsFile: {}\n  - host: p.io\n    private: true\n    credentialsFile: {0}\n  - host: b.io\n",
                creds.display()
            ),
        )
        .unwrap();
        let loaded = load_full(Some(&config)).unwrap();
        let quay = loaded.settings.registry("quay.io");
        assert!(quay.proxy_credentials().is_some());
        assert_eq!(quay.anonymous_basis().len(), 64);
        // private: read (and checked), never used on a client's behalf.
        let p = loaded.settings.registry("p.io");
        assert!(p.credentials.is_some());
        assert!(p.proxy_credentials().is_none());
        assert_eq!(p.anonymous_basis(), "");
        assert!(
            loaded
                .settings
                .registry("b.io")
                .proxy_credentials()
                .is_none()
        );
        assert!(!format!("{:?}", loaded.settings).contains("hunter2"));

        // Each broken file: an error naming the config, the registry, the
        // file and the field; never the password.
        for (content, field) in [
            (None, "No such file"),
            (Some("{"), "not JSON"),
            (
                Some(r#"{"username":"bot","password":"hunter2","x":1}"#),
                "x: unknown key",
            ),
            (Some(r#"{"username":"bot"}"#), "password: missing"),
        ] {
            match content {
                Some(c) => std::fs::write(&creds, c).unwrap(),
                None => std::fs::remove_file(&creds).unwrap(),
            }
            let e = load_full(Some(&config)).unwrap_err().to_string();
            for needle in ["c.yaml", "quay.io", "quay.json", field] {
                assert!(e.contains(needle), "`{needle}` not in: {e}");
            }
            assert!(!e.contains("hunter2"), "{e}");
        }
    }

    /// Kubernetes updates a Secret volume by pointing `..data` at a new
    /// directory: the file's own path and the config file do not change.
    fn swap_secret(dir: &Path, generation: u32, user: &str, password: &str) {
        let gen_dir = dir.join(format!("..gen{generation}"));
        std::fs::create_dir_all(&gen_dir).unwrap();
        write_creds(&gen_dir.join("creds.json"), user, password);
        let tmp = dir.join("..data_tmp");
        std::os::unix::fs::symlink(gen_dir.file_name().unwrap(), &tmp).unwrap();
        std::fs::rename(&tmp, dir.join("..data")).unwrap();
        if !dir.join("creds.json").exists() {
            std::os::unix::fs::symlink("..data/creds.json", dir.join("creds.json")).unwrap();
        }
    }

    async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Loaded>) -> Loaded {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("no reload within 5 s")
            .unwrap()
    }

    /// True when nothing was applied for 300 ms (10 polls).
    async fn quiet(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Loaded>) -> bool {
        tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err()
    }

    #[tokio::test]
    async fn watch_applies_rotated_credentials_and_waits_for_a_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::create_dir(&secret).unwrap();
        swap_secret(&secret, 1, "old", "pw1");
        let config = dir.path().join("c.yaml");
        let body = format!(
            "registries:\n  - host: quay.io\n    credentialsFile: {}\n",
            secret.join("creds.json").display()
        );
        std::fs::write(&config, &body).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let watcher = tokio::spawn(watch(
            config.clone(),
            Duration::from_millis(30),
            move |l: Loaded| {
                let _ = tx.send(l);
                Ok(())
            },
        ));
        assert!(quiet(&mut rx).await, "reloaded with nothing changed");

        // Rotation by symlink swap: config file untouched.
        let before = std::fs::read(&config).unwrap();
        swap_secret(&secret, 2, "new", "pw2");
        let l = next(&mut rx).await;
        assert_eq!(std::fs::read(&config).unwrap(), before);
        let c = l.settings.registry("quay.io").credentials.unwrap();
        assert_eq!(
            *c,
            RegistryCredentials::new(
                "quay.io",
                &secret.join("creds.json"),
                pullthrough_api::config::UpstreamCredentials {
                    username: "new".into(),
                    password: "pw2".into(),
                }
            )
        );
        assert!(quiet(&mut rx).await);

        // The file vanishes (kubelet mid-sync): nothing is applied, and the
        // reload is retried at every poll until the file is back, with no
        // other change.
        let gone = dir.path().join("later.json");
        std::fs::write(
            &config,
            format!(
                "registries:\n  - host: quay.io\n    credentialsFile: {}\n",
                gone.display()
            ),
        )
        .unwrap();
        assert!(
            quiet(&mut rx).await,
            "a config with a missing file was applied"
        );
        write_creds(&gone, "third", "pw3");
        let l = next(&mut rx).await;
        let c = l.settings.registry("quay.io").credentials.unwrap();
        assert_eq!(
            *c,
            RegistryCredentials::new(
                "quay.io",
                &gone,
                pullthrough_api::config::UpstreamCredentials {
                    username: "third".into(),
                    password: "pw3".into(),
                }
            )
        );
        assert!(quiet(&mut rx).await);
        watcher.abort();
    }

    /// A failure outside the watched files' content, in the load step
    /// (`fail_load`) or the apply step, twice: retried at every poll with
    /// nothing changed, then applied once.
    async fn retried_after_two_failures(fail_load: bool) {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("c.yaml");
        std::fs::write(&config, "registries: [{host: a.io}]\n").unwrap();
        let attempts = Arc::new(AtomicUsize::new(0));
        let (loads, applies) = (attempts.clone(), attempts.clone());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let watcher = tokio::spawn(watch_with(
            config.clone(),
            Duration::from_millis(30),
            move |p| {
                if fail_load && loads.fetch_add(1, SeqCst) < 2 {
                    return Err(LoadError::Read {
                        path: p.to_path_buf(),
                        source: std::io::Error::other("not yet"),
                    });
                }
                load_full(Some(p))
            },
            move |l: Loaded| {
                // Say, a caBundle the new config names is not on disk yet.
                if !fail_load && applies.fetch_add(1, SeqCst) < 2 {
                    return Err("caBundle not there yet".into());
                }
                let _ = tx.send(l);
                Ok(())
            },
        ));
        assert!(quiet(&mut rx).await);
        std::fs::write(&config, "registries: [{host: b.io}]\n").unwrap();
        let l = next(&mut rx).await;
        assert!(l.config.registry("b.io").is_some());
        assert_eq!(attempts.load(SeqCst), 3);
        assert!(quiet(&mut rx).await, "applied again after success");
        assert_eq!(attempts.load(SeqCst), 3);
        watcher.abort();
    }

    #[tokio::test]
    async fn watch_retries_a_failed_reload_with_nothing_changed() {
        retried_after_two_failures(true).await;
    }

    #[tokio::test]
    async fn watch_retries_a_failed_apply_with_nothing_changed() {
        retried_after_two_failures(false).await;
    }

    #[test]
    fn unchanged_credentials_keep_their_learnt_state_across_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("q.json");
        write_creds(&creds, "bot", "pw");
        let config = dir.path().join("c.yaml");
        let body = |ttl: &str| {
            format!(
                "registries:\n  - host: quay.io\n    tagTTL: {ttl}\n    credentialsFile: {}\n",
                creds.display()
            )
        };
        std::fs::write(&config, body("1m")).unwrap();
        let first = load_full(Some(&config)).unwrap().settings;
        std::fs::write(&config, body("2m")).unwrap();
        let mut second = load_full(Some(&config)).unwrap().settings;
        second.keep_credentials_state(&first);
        let (a, b) = (
            first.registry("quay.io").credentials.unwrap(),
            second.registry("quay.io").credentials.unwrap(),
        );
        assert!(
            Arc::ptr_eq(&a, &b),
            "tokens of unchanged credentials dropped"
        );
        write_creds(&creds, "bot", "rotated");
        let mut third = load_full(Some(&config)).unwrap().settings;
        third.keep_credentials_state(&second);
        let c = third.registry("quay.io").credentials.unwrap();
        assert!(!Arc::ptr_eq(&b, &c), "tokens of old credentials kept");
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

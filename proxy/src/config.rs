//! Loading the config (file or embedded default), applying `--data-dir`, and
//! watching the file so a valid change takes effect without a restart.

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
pub fn load(path: Option<&Path>) -> Result<ProxyConfig, LoadError> {
    match path {
        None => ProxyConfig::from_yaml(DEFAULT_CONFIG).map_err(|error| LoadError::Invalid {
            source_name: "<embedded default>".into(),
            error,
        }),
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|source| LoadError::Read {
                path: p.to_path_buf(),
                source,
            })?;
            ProxyConfig::from_yaml(&text).map_err(|error| LoadError::Invalid {
                source_name: p.display().to_string(),
                error,
            })
        }
    }
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
pub async fn watch(path: PathBuf, interval: Duration, mut apply: impl FnMut(ProxyConfig)) {
    let mut last = fingerprint(&path);
    loop {
        tokio::time::sleep(interval).await;
        let now = fingerprint(&path);
        if now == last {
            continue;
        }
        last = now;
        match load(Some(&path)) {
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

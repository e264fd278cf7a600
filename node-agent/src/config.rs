//! The agent's config: the proxy's registry table plus its `proxy:`
//! section (how nodes reach the proxy), and the CA that section names.

use std::path::{Path, PathBuf};

use pullthrough_api::agent::NodeProxy;
use pullthrough_api::config::ProxyConfig;
use pullthrough_api::contract::{CA_BUNDLE_KEY, TABLE_KEY};

use crate::error::ConfigError;
use crate::patch::check_ca_pem;
use crate::state::sha256_hex;

/// A loaded, checked agent config.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub table: ProxyConfig,
    pub proxy: NodeProxy,
    /// The CA PEM (TLS mode), read from `proxy.caFile`.
    pub ca_pem: Option<Vec<u8>>,
    /// sha256 of the config file, recorded with each apply.
    pub sha256: String,
}

/// Reads and checks the config file; errors name the file and the key.
pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
    let file = || path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
        file: file(),
        source,
    })?;
    let text = std::str::from_utf8(&bytes).map_err(|_| ConfigError::NotUtf8 { file: file() })?;
    let table = ProxyConfig::from_yaml(text).map_err(|source| ConfigError::Table {
        file: file(),
        source,
    })?;
    let proxy = table
        .proxy
        .clone()
        .ok_or_else(|| ConfigError::NoProxySection { file: file() })?;
    let ca_pem = match &proxy.ca_file {
        None => None,
        Some(ca) => {
            let ca_path: PathBuf = if ca.is_absolute() {
                ca.clone()
            } else {
                path.parent().unwrap_or(Path::new(".")).join(ca)
            };
            let pem = std::fs::read(&ca_path).map_err(|source| ConfigError::CaUnreadable {
                file: file(),
                ca: ca_path.clone(),
                source,
            })?;
            check_ca_pem(&pem).map_err(|source| ConfigError::CaInvalid {
                file: file(),
                ca: ca_path.clone(),
                source,
            })?;
            Some(pem)
        }
    };
    Ok(AgentConfig {
        table,
        proxy,
        ca_pem,
        sha256: sha256_hex(&bytes),
    })
}

/// Builds the config from the table's bytes (`config.yaml` of the
/// registry-table ConfigMap) and the CA bundle (`ca.crt` of the CA
/// ConfigMap), as the run loop gets them from the API server. With a CA
/// the proxy is reached over TLS whatever `caFile` says (the ConfigMap is
/// the CA's source in a cluster); without one, a table whose `proxy:`
/// names a `caFile` is refused (the CA is still to come) and a table
/// without it runs in plain-HTTP mode. `sha256` is the table's hash, as in
/// the ConfigMap's `pullthrough.dev/config-hash` annotation.
pub fn from_parts(table_yaml: &[u8], ca_pem: Option<&[u8]>) -> Result<AgentConfig, ConfigError> {
    let file = || TABLE_KEY.to_string();
    let text =
        std::str::from_utf8(table_yaml).map_err(|_| ConfigError::NotUtf8 { file: file() })?;
    let table = ProxyConfig::from_yaml(text).map_err(|source| ConfigError::Table {
        file: file(),
        source,
    })?;
    let mut proxy = table
        .proxy
        .clone()
        .ok_or_else(|| ConfigError::NoProxySection { file: file() })?;
    let ca_pem = match ca_pem {
        Some(pem) => {
            check_ca_pem(pem).map_err(ConfigError::CaBundle)?;
            if proxy.ca_file.is_none() {
                proxy.ca_file = Some(PathBuf::from(CA_BUNDLE_KEY));
            }
            Some(pem.to_vec())
        }
        None if proxy.ca_file.is_some() => return Err(ConfigError::CaPending),
        None => None,
    };
    Ok(AgentConfig {
        table,
        proxy,
        ca_pem,
        sha256: pullthrough_api::contract::config_hash(table_yaml),
    })
}

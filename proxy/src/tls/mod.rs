//! TLS: the CA and per-name leaf certificates minted from it.
//!
//! The proxy answers TLS for every configured registry name (DNS-hijack
//! mode) and for its own names and IPs (mirror mode). Leaves are minted on
//! demand from the CA during the handshake, kept in memory and re-minted a
//! week before they expire. A name that is neither a registry nor one of
//! the proxy's own names gets no certificate: the handshake is refused.
//! The CA files are watched ([`watch`]): a rotated CA is swapped in live.

mod ca;
mod issuer;
pub mod peer;
#[cfg(test)]
mod tests;
pub mod watch;

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::SystemTime;

pub use issuer::{CaInfo, Issuer};

/// Where the CA lives when the config names no `ca:` files: generated
/// into the data dir (cert, key).
pub fn generated_ca_files(data_dir: &std::path::Path) -> (PathBuf, PathBuf) {
    (
        data_dir.join(ca::CA_CERT_FILE),
        data_dir.join(ca::CA_KEY_FILE),
    )
}

/// Names the proxy serves TLS for.
#[derive(Debug, Clone, Default)]
pub struct AllowedNames {
    /// Registry names that may be served via SNI (hosts, aliases, authHosts; lowercase, no port).
    pub registry_names: HashSet<String>,
    /// The proxy's own DNS names (mirror mode) — one shared cert for all of them plus own_ips.
    pub own_names: Vec<String>,
    pub own_ips: Vec<IpAddr>,
}

impl AllowedNames {
    /// Lowercased, without trailing dot or port; IP literals among
    /// `own_names` move to `own_ips`; duplicates dropped.
    fn normalized(self) -> Self {
        let registry_names = self.registry_names.iter().map(|n| normalize(n)).collect();
        let mut own_names: Vec<String> = Vec::new();
        let mut own_ips: Vec<IpAddr> = Vec::new();
        for name in &self.own_names {
            let name = normalize(name);
            let bare = name.trim_start_matches('[').trim_end_matches(']');
            if let Ok(ip) = bare.parse::<IpAddr>() {
                if !own_ips.contains(&ip) {
                    own_ips.push(ip);
                }
            } else if !name.is_empty() && !own_names.contains(&name) {
                own_names.push(name);
            }
        }
        for ip in self.own_ips {
            if !own_ips.contains(&ip) {
                own_ips.push(ip);
            }
        }
        Self {
            registry_names,
            own_names,
            own_ips,
        }
    }
}

/// A name as compared against SNI: lowercase, no trailing dot, no port.
fn normalize(name: &str) -> String {
    let (host, _port) = pullthrough_api::names::split_port(name.trim());
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Loading or generating the CA, or building the TLS config.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {}: {reason}", path.display())]
    Invalid {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("CA certificate {} is not a CA: {reason}", path.display())]
    NotCa { path: PathBuf, reason: String },
    #[error("CA certificate {} expired at {}", path.display(), humantime::format_rfc3339_seconds(*not_after))]
    Expired {
        path: PathBuf,
        not_after: SystemTime,
    },
    #[error("CA key {} does not match CA certificate {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error(
        "{} exists but {} does not: restore the key, or delete the certificate to generate a new CA (clients must then trust the new one)",
        present.display(), missing.display()
    )]
    Incomplete { present: PathBuf, missing: PathBuf },
    #[error("generating a CA for {}: {reason}", path.display())]
    Generate { path: PathBuf, reason: String },
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CA certificate {} cannot issue certificates clients accept: {reason}", path.display())]
    Unusable { path: PathBuf, reason: String },
    #[error("building the TLS server config: {reason}")]
    Config { reason: String },
}

impl TlsError {
    /// A file that does not exist (as opposed to one that is unreadable
    /// or holds something unusable).
    pub(crate) fn is_missing(&self) -> bool {
        matches!(self, TlsError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

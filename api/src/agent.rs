//! What the node-agent needs beyond the registry table: how nodes reach the
//! proxy (the config file's `proxy:` section) and each registry's per-node
//! switches (`registries[].nodes`).

use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::names::validate_host;

/// How nodes reach the proxy: the config file's `proxy:` section.
///
/// ```yaml
/// proxy:
///   address: 10.96.0.50        # IP or name nodes use (an IP for DNS hijack)
///   httpsPort: 443
///   httpPort: 80               # plain-HTTP mode only (no caFile)
///   readyUrl: http://10.96.0.50:9090/readyz
///   caFile: /etc/pullthrough/ca/ca.crt
///   neverHijack: [ghcr.io]     # registry serving pullthrough's own images
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeProxy {
    /// IP address or DNS name of the proxy as nodes reach it (no port, no
    /// scheme). `/etc/hosts` entries need an IP.
    pub address: String,
    /// TLS port; DNS-hijacked names are dialled on 443, so hijacking needs
    /// the proxy on 443 at `address`.
    #[serde(default = "default_https_port")]
    pub https_port: u16,
    /// Plain-HTTP port; used only when there is no `caFile` (then dockerd
    /// gets `insecure-registries`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_port: Option<u16>,
    /// URL that answers 2xx while the proxy can serve (the agent's health
    /// gate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_url: Option<String>,
    /// PEM of the CA the proxy's certificates chain to (relative paths are
    /// relative to the config file). Absent: plain-HTTP mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Registry names never put in `/etc/hosts` (the registry that serves
    /// pullthrough's own images: nodes must pull those without the proxy).
    /// A registry any of whose names or auth hosts is listed is left alone
    /// by DNS hijack entirely.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub never_hijack: Vec<String>,
}

fn default_https_port() -> u16 {
    443
}

/// Per-registry node switches (`registries[].nodes`); all default to on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeOptions {
    /// dockerd nodes: `/etc/hosts` hijack + certs.d (for `docker.io`:
    /// `registry-mirrors`).
    #[serde(default = "yes")]
    pub dns_hijack: bool,
    /// containerd nodes: `certs.d/<host>/hosts.toml`.
    #[serde(default = "yes")]
    pub containerd: bool,
    /// CRI-O/podman nodes: the `registries.conf.d` drop-in.
    #[serde(default = "yes")]
    pub crio: bool,
}

fn yes() -> bool {
    true
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            dns_hijack: true,
            containerd: true,
            crio: true,
        }
    }
}

impl NodeOptions {
    /// True when every switch has its default (then it is not serialized).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl NodeProxy {
    /// `true` when nodes talk TLS to the proxy (a CA is configured).
    pub fn uses_tls(&self) -> bool {
        self.ca_file.is_some()
    }

    /// The port nodes use: `httpsPort` with TLS, else `httpPort`.
    pub fn port(&self) -> Option<u16> {
        if self.uses_tls() {
            Some(self.https_port)
        } else {
            self.http_port
        }
    }

    /// `address` in URL/authority form (IPv6 in brackets).
    pub fn host_for_url(&self) -> String {
        match self.address.parse::<IpAddr>() {
            Ok(IpAddr::V6(v6)) => format!("[{v6}]"),
            _ => self.address.clone(),
        }
    }

    /// `host[:port]` as runtimes name the proxy in mirror mode and in
    /// `certs.d` directories; the scheme's default port is left out.
    pub fn authority(&self) -> String {
        let default = if self.uses_tls() { 443 } else { 80 };
        match self.port() {
            Some(p) if p != default => format!("{}:{p}", self.host_for_url()),
            _ => self.host_for_url(),
        }
    }

    /// Base URL of the proxy for nodes (`https://10.0.0.5`, `http://[fd00::1]:8080`).
    pub fn base_url(&self) -> String {
        let scheme = if self.uses_tls() { "https" } else { "http" };
        format!("{scheme}://{}", self.authority())
    }

    /// Semantic checks; keys are reported under `proxy.`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |k: &str, m: String| ConfigError {
            key: format!("proxy.{k}"),
            message: m,
        };
        if self.address.parse::<IpAddr>().is_err() {
            validate_host(&self.address).map_err(|m| err("address", m))?;
            if crate::names::split_port(&self.address).1.is_some() {
                return Err(err(
                    "address",
                    format!(
                        "`{}` must not carry a port (use httpsPort/httpPort)",
                        self.address
                    ),
                ));
            }
        }
        if self.https_port == 0 {
            return Err(err("httpsPort", "must not be 0".into()));
        }
        if self.http_port == Some(0) {
            return Err(err("httpPort", "must not be 0".into()));
        }
        if self.ca_file.is_none() && self.http_port.is_none() {
            return Err(err(
                "caFile",
                "set caFile (TLS to the proxy) or httpPort (plain-HTTP mode)".into(),
            ));
        }
        if let Some(url) = &self.ready_url {
            let ok = url
                .parse::<http::Uri>()
                .ok()
                .filter(|u| matches!(u.scheme_str(), Some("http" | "https")))
                .is_some_and(|u| u.host().is_some_and(|h| !h.is_empty()));
            if !ok {
                return Err(err(
                    "readyUrl",
                    format!("`{url}` is not an http:// or https:// URL"),
                ));
            }
        }
        for (i, h) in self.never_hijack.iter().enumerate() {
            validate_host(h).map_err(|m| err(&format!("neverHijack[{i}]"), m))?;
        }
        Ok(())
    }
}

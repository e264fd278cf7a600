//! Which registry a request is for, and what it asks for.
//!
//! Order (DESIGN.md): `?ns=` (containerd mirror mode), a leading path segment
//! naming a configured registry (CRI-O/podman mirror mode; only when the
//! Host/SNI is one of the proxy's own names), the Host/SNI name (DNS-hijack
//! mode), then the default registry for the proxy's own names (dockerd
//! `registry-mirrors`). Anything else is refused here, before any
//! upstream connection exists: this is not an open proxy.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use http::StatusCode;
use pullthrough_api::config::ProxyConfig;
use pullthrough_api::names::split_port;

use crate::oci::{Digest, ErrorCode, Reference, validate_repository};

/// What a `/v2/` request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    /// `GET /v2/`: the version check that carries the auth challenge.
    Ping,
    Manifest {
        repo: String,
        reference: Reference,
    },
    Blob {
        repo: String,
        digest: Digest,
    },
    /// Anything under `/v2/<repo>/blobs/uploads/`.
    Upload {
        repo: String,
        rest: String,
    },
    /// `GET /v2/<repo>/referrers/<digest>` (OCI 1.1): what refers to the
    /// digest (signatures, SBOMs), cached like a tag answer.
    Referrers {
        repo: String,
        digest: Digest,
    },
    /// Tag lists, catalog: passed through uncached.
    Other {
        repo: Option<String>,
        rest: String,
    },
}

impl ApiRequest {
    pub fn repo(&self) -> Option<&str> {
        match self {
            ApiRequest::Ping => None,
            ApiRequest::Manifest { repo, .. }
            | ApiRequest::Blob { repo, .. }
            | ApiRequest::Upload { repo, .. }
            | ApiRequest::Referrers { repo, .. } => Some(repo),
            ApiRequest::Other { repo, .. } => repo.as_deref(),
        }
    }

    /// The upstream path (without query) for this request.
    pub fn upstream_path(&self) -> String {
        match self {
            ApiRequest::Ping => "/v2/".into(),
            ApiRequest::Manifest { repo, reference } => {
                format!("/v2/{repo}/manifests/{}", reference.as_str())
            }
            ApiRequest::Blob { repo, digest } => format!("/v2/{repo}/blobs/{digest}"),
            ApiRequest::Upload { repo, rest } => format!("/v2/{repo}/blobs/uploads/{rest}"),
            ApiRequest::Referrers { repo, digest } => format!("/v2/{repo}/referrers/{digest}"),
            ApiRequest::Other {
                repo: Some(repo),
                rest,
            } => format!("/v2/{repo}/{rest}"),
            ApiRequest::Other { repo: None, rest } => format!("/v2/{rest}"),
        }
    }
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The registry API of a configured registry (canonical host).
    Registry {
        registry: Arc<str>,
        request: ApiRequest,
        /// How it was routed (for the log).
        via: Via,
    },
    /// The version check (`GET /v2/`) addressed to the proxy itself, with no
    /// registry named: answered locally. In mirror mode one client talks to
    /// many upstreams through one name, so relaying a single upstream's
    /// challenge would send the client to the wrong token realm; the proxy
    /// obtains anonymous tokens itself instead.
    LocalPing,
    /// A token-realm request to one of a registry's `authHosts`
    /// (DNS-hijack mode), passed through as is.
    Token {
        registry: Arc<str>,
        auth_host: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Ns,
    PathPrefix,
    Host,
    Default,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

/// A routing table built from one config snapshot.
#[derive(Debug, Clone)]
pub struct Router {
    /// Every name (host, alias) → canonical host.
    registries: HashMap<String, Arc<str>>,
    /// authHost → canonical host of its registry.
    auth_hosts: HashMap<String, Arc<str>>,
    own_names: HashSet<String>,
    default: Option<Arc<str>>,
}

impl Router {
    /// `listen_ips` are the addresses the proxy listens on; they and the
    /// loopback names count as the proxy's own names.
    pub fn new(config: &ProxyConfig, listen_ips: &[IpAddr]) -> Self {
        let mut registries = HashMap::new();
        let mut auth_hosts = HashMap::new();
        for reg in &config.registries {
            let canonical: Arc<str> = Arc::from(reg.host.as_str());
            for name in reg.names() {
                registries.insert(name.to_string(), canonical.clone());
            }
            for h in &reg.auth_hosts {
                auth_hosts.insert(h.clone(), canonical.clone());
            }
        }
        let default = config
            .default_registry
            .as_deref()
            .and_then(|d| registries.get(d).cloned());
        Self {
            registries,
            auth_hosts,
            own_names: own_names(config, listen_ips).into_iter().collect(),
            default,
        }
    }

    /// The proxy's own names (for its TLS certificate).
    pub fn own_names(&self) -> impl Iterator<Item = &str> {
        self.own_names.iter().map(String::as_str)
    }

    /// Every name a TLS client may ask for by SNI that belongs to a registry.
    pub fn registry_sni_names(&self) -> impl Iterator<Item = &str> {
        self.registries
            .keys()
            .chain(self.auth_hosts.keys())
            .map(|n| split_port(n).0)
    }

    /// Routes a request. `host` is the Host header (or :authority), `path`
    /// the raw (still percent-encoded) path, `query` the raw query.
    pub fn route(
        &self,
        host: Option<&str>,
        path: &str,
        query: Option<&str>,
    ) -> Result<Target, Refusal> {
        let host = host.map(fully_qualified_as_plain);
        let host_name = host.as_deref().map(|h| split_port(h).0.to_string());

        // Token requests in DNS-hijack mode: any path on an auth host, as
        // it was named (a port the registry's challenge gave stays).
        if let Some(h) = &host {
            let hit = match self.auth_hosts.get(h.as_str()) {
                Some(registry) => Some((registry, h.clone())),
                None => host_name
                    .as_deref()
                    .and_then(|n| self.auth_hosts.get(n).map(|r| (r, n.to_string()))),
            };
            if let Some((registry, auth_host)) = hit {
                return Ok(Target::Token {
                    registry: registry.clone(),
                    auth_host,
                });
            }
        }

        let rest = match path {
            "/v2" | "/v2/" => "",
            p => p.strip_prefix("/v2/").ok_or_else(|| {
                Refusal::new(
                    StatusCode::NOT_FOUND,
                    ErrorCode::NameUnknown,
                    "only the /v2/ registry API is served",
                )
            })?,
        };
        if rest.contains('%') || rest.contains('\\') {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::NameInvalid,
                "encoded characters are not allowed in registry paths",
            ));
        }

        if let Some(ns) = query.and_then(|q| query_param(q, "ns")) {
            let ns = ns.to_ascii_lowercase();
            let registry = self.registries.get(&ns).cloned().ok_or_else(|| {
                Refusal::new(
                    StatusCode::NOT_FOUND,
                    ErrorCode::NameUnknown,
                    format!("registry `{ns}` is not configured on this proxy"),
                )
            })?;
            return Ok(Target::Registry {
                registry,
                request: parse_api(rest)?,
                via: Via::Ns,
            });
        }

        // A request without a Host (HTTP/1.0) can only have reached the
        // proxy by one of its own addresses.
        // (`localhost` is an own name; `localhost:5000` may be a registry.)
        let own = match (&host_name, &host) {
            (Some(n), Some(h)) => self.own_names.contains(n) && !self.registries.contains_key(h),
            _ => true,
        };

        // The path prefix names a registry only on the proxy's own names
        // (mirror mode). On a registry's name (DNS-hijack mode) the first
        // segment is part of that registry's repository: `myreg.example`
        // may well hold a repository `quay.io/...`, and its clients must
        // get it, not quay.io's.
        // A name with a port comes as `host_port` (a ':' is no part of a
        // reference path: see `names::path_segment`).
        if own
            && let Some((first, after)) = rest.split_once('/')
            && let Some(registry) = self.registries.get(first).or_else(|| {
                pullthrough_api::names::from_path_segment(first)
                    .and_then(|name| self.registries.get(&name))
            })
        {
            return Ok(Target::Registry {
                registry: registry.clone(),
                request: parse_api(after)?,
                via: Via::PathPrefix,
            });
        }

        let by_host = host.as_deref().and_then(|h| {
            self.registries
                .get(h)
                .or_else(|| host_name.as_deref().and_then(|n| self.registries.get(n)))
        });
        if let Some(registry) = by_host {
            return Ok(Target::Registry {
                registry: registry.clone(),
                request: parse_api(rest)?,
                via: Via::Host,
            });
        }

        if !own {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                ErrorCode::Denied,
                format!(
                    "`{}` is neither a configured registry nor a name of this proxy",
                    host.as_deref().unwrap_or_default()
                ),
            ));
        }
        let request = parse_api(rest)?;
        if request == ApiRequest::Ping {
            return Ok(Target::LocalPing);
        }
        match &self.default {
            Some(registry) => Ok(Target::Registry {
                registry: registry.clone(),
                request,
                via: Via::Default,
            }),
            None => Err(Refusal::new(
                StatusCode::NOT_FOUND,
                ErrorCode::NameUnknown,
                "this request names no registry and no defaultRegistry is configured",
            )),
        }
    }
}

fn own_names(config: &ProxyConfig, listen_ips: &[IpAddr]) -> Vec<String> {
    let mut names: Vec<String> = vec![
        "localhost".into(),
        "127.0.0.1".into(),
        "::1".into(),
        "[::1]".into(),
    ];
    names.extend(config.names.iter().map(|n| split_port(n).0.to_string()));
    // The address nodes dial (in the cluster, the Service's ClusterIP; a
    // node's containerd connects to it by IP, with no SNI and that IP as
    // Host): the proxy must answer to it and hold a certificate for it.
    let reached_at = config.proxy.as_ref().map(|p| {
        p.address
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string()
    });
    for addr in reached_at.into_iter().filter(|a| !a.is_empty()) {
        if addr.parse::<std::net::Ipv6Addr>().is_ok() {
            names.push(format!("[{addr}]"));
        }
        names.push(addr);
    }
    for ip in listen_ips {
        if !ip.is_unspecified() {
            names.push(ip.to_string());
            if ip.is_ipv6() {
                names.push(format!("[{ip}]"));
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

/// The value of `key` in a raw query string (no decoding: registry names
/// never need it).
fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// Parses what follows `/v2/`.
pub fn parse_api(rest: &str) -> Result<ApiRequest, Refusal> {
    if rest.is_empty() {
        return Ok(ApiRequest::Ping);
    }
    if rest == "_catalog" {
        return Ok(ApiRequest::Other {
            repo: None,
            rest: rest.into(),
        });
    }
    let segs: Vec<&str> = rest.split('/').collect();
    let bad_name = |m: String| Refusal::new(StatusCode::BAD_REQUEST, ErrorCode::NameInvalid, m);
    let repo_of = |end: usize| -> Result<String, Refusal> {
        let repo = segs[..end].join("/");
        validate_repository(&repo).map_err(bad_name)?;
        Ok(repo)
    };

    // /v2/<repo>/blobs/uploads[/<id>]
    if let Some(i) = segs.iter().rposition(|s| *s == "uploads")
        && i >= 2
        && segs[i - 1] == "blobs"
    {
        let rest = segs[i + 1..].join("/");
        if rest.contains("..") {
            return Err(bad_name("invalid upload path".into()));
        }
        return Ok(ApiRequest::Upload {
            repo: repo_of(i - 1)?,
            rest,
        });
    }
    let n = segs.len();
    if n >= 3 {
        match segs[n - 2] {
            "manifests" => {
                let reference = Reference::parse(segs[n - 1]).map_err(|m| {
                    let code = if segs[n - 1].contains(':') {
                        ErrorCode::DigestInvalid
                    } else {
                        ErrorCode::ManifestInvalid
                    };
                    Refusal::new(StatusCode::BAD_REQUEST, code, m)
                })?;
                return Ok(ApiRequest::Manifest {
                    repo: repo_of(n - 2)?,
                    reference,
                });
            }
            "blobs" => {
                let digest = Digest::parse(segs[n - 1]).map_err(|m| {
                    Refusal::new(StatusCode::BAD_REQUEST, ErrorCode::DigestInvalid, m)
                })?;
                return Ok(ApiRequest::Blob {
                    repo: repo_of(n - 2)?,
                    digest,
                });
            }
            "tags" if segs[n - 1] == "list" => {
                return Ok(ApiRequest::Other {
                    repo: Some(repo_of(n - 2)?),
                    rest: "tags/list".into(),
                });
            }
            "referrers" => {
                let digest = Digest::parse(segs[n - 1]).map_err(|m| {
                    Refusal::new(StatusCode::BAD_REQUEST, ErrorCode::DigestInvalid, m)
                })?;
                return Ok(ApiRequest::Referrers {
                    repo: repo_of(n - 2)?,
                    digest,
                });
            }
            _ => {}
        }
    }
    Err(Refusal::new(
        StatusCode::NOT_FOUND,
        ErrorCode::NameUnknown,
        "not a registry API path",
    ))
}

/// The Host lowercased, a fully qualified name (`quay.io.`, `quay.io.:443`)
/// as the plain one: the same name, which TLS already accepts in SNI.
fn fully_qualified_as_plain(host: &str) -> String {
    let host = host.to_ascii_lowercase();
    match split_port(&host) {
        (name, port) if name.len() > 1 && name.ends_with('.') => {
            let name = &name[..name.len() - 1];
            port.map_or_else(|| name.to_string(), |p| format!("{name}:{p}"))
        }
        _ => host,
    }
}

#[cfg(test)]
mod tests;

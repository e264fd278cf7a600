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
    /// Tag lists, referrers, catalog: passed through uncached.
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
            | ApiRequest::Upload { repo, .. } => Some(repo),
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
        let host = host.map(|h| h.to_ascii_lowercase());
        let host_name = host.as_deref().map(|h| split_port(h).0.to_string());

        // Token requests in DNS-hijack mode: any path on an auth host.
        if let Some(h) = &host {
            let hit = self
                .auth_hosts
                .get(h.as_str())
                .or_else(|| host_name.as_deref().and_then(|n| self.auth_hosts.get(n)));
            if let Some(registry) = hit {
                return Ok(Target::Token {
                    registry: registry.clone(),
                    auth_host: host_name.clone().unwrap_or_default(),
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
        let own = match &host_name {
            None => true,
            Some(n) => self.own_names.contains(n),
        };

        // The path prefix names a registry only on the proxy's own names
        // (mirror mode). On a registry's name (DNS-hijack mode) the first
        // segment is part of that registry's repository: `myreg.example`
        // may well hold a repository `quay.io/...`, and its clients must
        // get it, not quay.io's.
        if own
            && let Some((first, after)) = rest.split_once('/')
            && let Some(registry) = self.registries.get(first)
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
                return Ok(ApiRequest::Other {
                    repo: Some(repo_of(n - 2)?),
                    rest: format!("referrers/{digest}"),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        let config = ProxyConfig::from_yaml(
            "defaultRegistry: docker.io\nnames: [pullthrough.svc]\nregistries:\n\
             - host: docker.io\n  aliases: [registry-1.docker.io]\n  authHosts: [auth.docker.io]\n\
             - host: quay.io\n\
             - host: localhost:5000\n",
        )
        .unwrap();
        Router::new(&config, &["10.0.0.5".parse().unwrap()])
    }

    fn digest() -> String {
        format!("sha256:{}", "ab".repeat(32))
    }

    fn reg(t: Target) -> (String, ApiRequest, Via) {
        match t {
            Target::Registry {
                registry,
                request,
                via,
            } => (registry.to_string(), request, via),
            other => panic!("not a registry target: {other:?}"),
        }
    }

    #[test]
    fn ns_parameter_wins() {
        let (r, req, via) = reg(router()
            .route(
                Some("10.0.0.5:5443"),
                "/v2/library/busybox/manifests/1.36",
                Some("ns=docker.io"),
            )
            .unwrap());
        assert_eq!((r.as_str(), via), ("docker.io", Via::Ns));
        assert_eq!(
            req,
            ApiRequest::Manifest {
                repo: "library/busybox".into(),
                reference: Reference::Tag("1.36".into())
            }
        );
        // An alias in ns maps to the canonical host.
        let (r, _, _) = reg(router()
            .route(None, "/v2/", Some("ns=registry-1.docker.io"))
            .unwrap());
        assert_eq!(r, "docker.io");
        let e = router()
            .route(None, "/v2/x/manifests/1", Some("ns=evil.example"))
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::NameUnknown);
    }

    #[test]
    fn path_prefix_mirror_mode() {
        let (r, req, via) = reg(router()
            .route(
                Some("pullthrough.svc"),
                &format!("/v2/quay.io/fixture/app/blobs/{}", digest()),
                None,
            )
            .unwrap());
        assert_eq!((r.as_str(), via), ("quay.io", Via::PathPrefix));
        assert_eq!(req.repo(), Some("fixture/app"));
        let (r, _, _) = reg(router()
            .route(
                Some("pullthrough.svc"),
                "/v2/localhost:5000/a/manifests/x",
                None,
            )
            .unwrap());
        assert_eq!(r, "localhost:5000");
    }

    #[test]
    fn path_prefix_routes_only_on_the_proxys_own_names() {
        let blob = format!("/v2/quay.io/fixture/app/blobs/{}", digest());
        // On a registry's own name (DNS hijack) the first segment is part
        // of that registry's repository.
        let (r, req, via) = reg(router().route(Some("docker.io"), &blob, None).unwrap());
        assert_eq!((r.as_str(), via), ("docker.io", Via::Host));
        assert_eq!(req.repo(), Some("quay.io/fixture/app"));
        let (r, req, via) = reg(router()
            .route(
                Some("registry-1.docker.io:443"),
                "/v2/quay.io/x/manifests/1",
                None,
            )
            .unwrap());
        assert_eq!((r.as_str(), via), ("docker.io", Via::Host));
        assert_eq!(req.upstream_path(), "/v2/quay.io/x/manifests/1");
        // ...and the registry itself, named twice, keeps its prefix too.
        let (r, req, _) = reg(router()
            .route(Some("quay.io"), "/v2/quay.io/x/manifests/1", None)
            .unwrap());
        assert_eq!((r.as_str(), req.repo()), ("quay.io", Some("quay.io/x")));
        // An unknown name gets nothing, prefix or not.
        for host in ["evil.example", "evil.example:5443", "10.9.9.9"] {
            let e = router().route(Some(host), &blob, None).unwrap_err();
            assert_eq!(
                (e.status, e.code),
                (StatusCode::FORBIDDEN, ErrorCode::Denied),
                "{host}"
            );
        }
        // Every own name, and no Host at all, still route by prefix.
        for host in [
            Some("localhost:5443"),
            Some("127.0.0.1"),
            Some("10.0.0.5:5443"),
            Some("PullThrough.svc"),
            Some("[::1]:5443"),
            None,
        ] {
            let (r, req, via) = reg(router().route(host, &blob, None).unwrap());
            assert_eq!((r.as_str(), via), ("quay.io", Via::PathPrefix), "{host:?}");
            assert_eq!(req.repo(), Some("fixture/app"));
        }
    }

    #[test]
    fn host_routing_for_dns_hijack() {
        let (r, req, via) = reg(router()
            .route(Some("quay.io"), "/v2/fixture/app/manifests/1", None)
            .unwrap());
        assert_eq!((r.as_str(), via), ("quay.io", Via::Host));
        assert_eq!(req.upstream_path(), "/v2/fixture/app/manifests/1");
        let (r, _, _) = reg(router().route(Some("QUAY.IO:443"), "/v2/", None).unwrap());
        assert_eq!(r, "quay.io");
        assert_eq!(
            router()
                .route(Some("auth.docker.io"), "/token", Some("scope=x"))
                .unwrap(),
            Target::Token {
                registry: Arc::from("docker.io"),
                auth_host: "auth.docker.io".into()
            }
        );
    }

    #[test]
    fn own_names_use_the_default_registry() {
        for host in [
            "localhost:5443",
            "127.0.0.1",
            "10.0.0.5:5080",
            "pullthrough.svc",
            "[::1]:5443",
        ] {
            let (r, _, via) = reg(router()
                .route(Some(host), "/v2/library/x/manifests/1", None)
                .unwrap());
            assert_eq!((r.as_str(), via), ("docker.io", Via::Default), "{host}");
        }
    }

    #[test]
    fn ping_to_the_proxy_itself_is_local() {
        assert_eq!(
            router()
                .route(Some("127.0.0.1:5443"), "/v2/", None)
                .unwrap(),
            Target::LocalPing
        );
        // ...but a registry named by ns or Host gets its upstream's answer.
        assert!(matches!(
            router()
                .route(Some("127.0.0.1"), "/v2/", Some("ns=quay.io"))
                .unwrap(),
            Target::Registry {
                request: ApiRequest::Ping,
                ..
            }
        ));
        assert!(matches!(
            router().route(Some("quay.io"), "/v2/", None).unwrap(),
            Target::Registry {
                request: ApiRequest::Ping,
                ..
            }
        ));
    }

    #[test]
    fn unknown_hosts_are_refused() {
        for host in ["evil.example", "10.9.9.9", "quay.io.evil.example"] {
            let e = router()
                .route(Some(host), "/v2/x/manifests/1", None)
                .unwrap_err();
            assert_eq!(
                (e.status, e.code),
                (StatusCode::FORBIDDEN, ErrorCode::Denied),
                "{host}"
            );
        }
    }

    #[test]
    fn bad_input_is_a_4xx() {
        let r = router();
        for path in [
            "/v2/../etc/passwd/manifests/1",
            "/v2/a/%2e%2e/manifests/1",
            "/v2/a/..%2f/blobs/sha256:00",
            "/v2/A/manifests/1",
            "/v2/a//b/manifests/1",
            "/v2/a/blobs/sha256:../../x",
            "/v2/a/blobs/md5:abc",
            "/v2/a/manifests/..",
            "/v2/a/manifests/sha256:zz",
            "/etc/passwd",
            "/v2/a/nothing/here",
        ] {
            let e = r.route(Some("quay.io"), path, None).unwrap_err();
            assert!(e.status.is_client_error(), "{path}: {e:?}");
        }
    }

    #[test]
    fn uploads_and_other_endpoints() {
        let (_, req, _) = reg(router()
            .route(Some("quay.io"), "/v2/a/b/blobs/uploads/", None)
            .unwrap());
        assert_eq!(
            req,
            ApiRequest::Upload {
                repo: "a/b".into(),
                rest: String::new()
            }
        );
        let (_, req, _) = reg(router()
            .route(Some("quay.io"), "/v2/a/tags/list", None)
            .unwrap());
        assert_eq!(req.upstream_path(), "/v2/a/tags/list");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]

        /// Any Host, path and query: a target or a 4xx refusal, never a
        /// panic; a path prefix routes only on the proxy's own names; a
        /// repository handed on is always a valid one.
        #[test]
        fn any_request_routes_or_is_refused(
            host in proptest::option::of(proptest::prop_oneof![
                "\\PC{0,40}",
                "(quay.io|docker.io|localhost|127.0.0.1|pullthrough.svc|evil.example|10.0.0.5|\\[::1\\])(:[0-9]{1,6})?",
            ]),
            path in proptest::prop_oneof![
                "\\PC{0,120}",
                "/v2/((quay.io|docker.io|localhost:5000|[a-z0-9._-]{1,12})/){0,4}(manifests|blobs|tags|referrers|uploads|_catalog)?(/[a-zA-Z0-9:._-]{0,70})?",
            ],
            query in proptest::option::of("(ns=[a-z.:0-9]{0,20}|\\PC{0,30})"),
        ) {
            let router = router();
            match router.route(host.as_deref(), &path, query.as_deref()) {
                Ok(Target::Registry { request, via, .. }) => {
                    if via == Via::PathPrefix {
                        let name = host.as_deref().map(|h| split_port(&h.to_ascii_lowercase()).0.to_string());
                        proptest::prop_assert!(
                            name.as_deref().is_none_or(|n| router.own_names.contains(n)),
                            "prefix routed on {host:?}"
                        );
                    }
                    if let Some(repo) = request.repo() {
                        proptest::prop_assert!(validate_repository(repo).is_ok(), "{repo}");
                    }
                }
                Ok(_) => {}
                Err(e) => proptest::prop_assert!(e.status.is_client_error(), "{e:?}"),
            }
        }
    }
}

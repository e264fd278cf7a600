//! The router's tests: every mode, the own-names rule, and property tests.

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

/// A Host that is a configured registry with its port (`localhost:5000`)
/// is that registry, though `localhost` alone is one of the proxy's own
/// names: its first path segment is part of the repository.
#[test]
fn a_registry_host_with_a_port_is_not_an_own_name() {
    let (r, req, via) = reg(router()
        .route(Some("localhost:5000"), "/v2/quay.io/x/manifests/1", None)
        .unwrap());
    assert_eq!((r.as_str(), via), ("localhost:5000", Via::Host));
    assert_eq!(req.repo(), Some("quay.io/x"));
}

/// A fully qualified Host (`quay.io.`, as the TLS layer already accepts
/// in SNI) is the same name.
#[test]
fn a_trailing_dot_is_the_same_host() {
    let (r, _, via) = reg(router()
        .route(Some("quay.io."), "/v2/a/manifests/1", None)
        .unwrap());
    assert_eq!((r.as_str(), via), ("quay.io", Via::Host));
    let (r, _, _) = reg(router()
        .route(Some("quay.io.:443"), "/v2/a/manifests/1", None)
        .unwrap());
    assert_eq!(r, "quay.io");
}

/// An auth host configured with a port keeps it: the token request goes
/// where the registry's challenge said.
#[test]
fn an_auth_host_keeps_its_port() {
    let config = ProxyConfig::from_yaml(
        "registries:\n- host: reg.example\n  authHosts: [auth.example:8443]\n",
    )
    .unwrap();
    let router = Router::new(&config, &[]);
    match router
        .route(Some("auth.example:8443"), "/token", Some("scope=x"))
        .unwrap()
    {
        Target::Token {
            registry,
            auth_host,
        } => {
            assert_eq!(
                (&*registry, auth_host.as_str()),
                ("reg.example", "auth.example:8443")
            );
        }
        other => panic!("{other:?}"),
    }
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
    // As a CRI-O mirror location writes it (no ':' in a reference path).
    let (r, req, via) = reg(router()
        .route(
            Some("pullthrough.svc"),
            "/v2/localhost_5000/a/manifests/x",
            None,
        )
        .unwrap());
    assert_eq!((r.as_str(), via), ("localhost:5000", Via::PathPrefix));
    assert_eq!(req.repo(), Some("a"));
    // Not a configured name with a port: a Docker Hub-style repository
    // of the default registry, if any, as before.
    assert!(
        router()
            .route(
                Some("pullthrough.svc"),
                "/v2/quay.io_5000/a/manifests/x",
                None
            )
            .map_or(true, |t| !matches!(
                t,
                Target::Registry {
                    via: Via::PathPrefix,
                    ..
                }
            ))
    );
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

/// In a cluster, containerd dials the proxy's Service by ClusterIP (no
/// SNI, `Host: <ClusterIP>`, `?ns=`): that address, which the table's
/// `proxy.address` carries, is one of the proxy's own names.
#[test]
fn the_address_nodes_reach_the_proxy_at_is_an_own_name() {
    let config = ProxyConfig::from_yaml(
        "proxy: {address: 10.96.0.154, caFile: /ca.crt}\nregistries:\n- host: registry.test\n",
    )
    .unwrap();
    let router = Router::new(&config, &[]);
    assert!(
        router.own_names().any(|n| n == "10.96.0.154"),
        "{:?}",
        router.own_names().collect::<Vec<_>>()
    );
    let (r, req, via) = reg(router
        .route(
            Some("10.96.0.154"),
            "/v2/team/app/manifests/v1",
            Some("ns=registry.test"),
        )
        .unwrap());
    assert_eq!((r.as_str(), via), ("registry.test", Via::Ns));
    assert_eq!(req.repo(), Some("team/app"));
    let v6 = ProxyConfig::from_yaml("proxy: {address: \"fd00::1\", caFile: /ca.crt}\n").unwrap();
    let v6 = Router::new(&v6, &[]);
    let names: Vec<&str> = v6.own_names().collect();
    assert!(
        names.contains(&"fd00::1") && names.contains(&"[fd00::1]"),
        "{names:?}"
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

//! The cache against clients that try to read what the upstream would not
//! give them (issue #10, points 1–3): the cache holds one copy per digest
//! for every client and every repository, so each test caches a private
//! image for an authorised client first, then attacks it:
//!
//! - by digest through a repository the attacker may read (a public
//!   registry's repository, the attacker's own empty one): 401/404 and
//!   no byte of it;
//! - while the upstream cannot answer the access check (stopped, 503,
//!   429): nothing opens that this client class was never let read, stale
//!   tags included; the registry's `serveCachedOnAuthError` opts out;
//! - by asking for a cached 10 MiB layer as a manifest on 200 HTTP/2
//!   streams that are never read: the proxy's memory stays bounded;
//! - by asking an OCI 1.1 registry what refers to the digest (it answers
//!   200 for any digest) and then for the digest itself: no byte of it.
//!
//! Real `docker-registry` upstreams (TLS + htpasswd for the private one),
//! the proxy binary, everything on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{Method, StatusCode};
use pullthrough_testbed::fixtures::{Image, sha256_digest};
use pullthrough_testbed::http::{Get, Response};
use pullthrough_testbed::net::wait_for;
use pullthrough_testbed::proxy::{Addrs, Proxy};
use pullthrough_testbed::registry::Registry;
use pullthrough_testbed::stub::Stub;

use common::private::{
    ACCEPT, OTHER, PULLER, basic, objects, private_and_public, private_registry,
    pull_as_puller_twice, random_image, request,
};
use common::proxy_bin;

/// May check for a layer (HEAD) but not download it, see [`ecr_like`].
const PUSHER: (&str, &str) = ("pusher", "push-only-7d2f");

/// The attacker got nothing of `digest`: a refusal with `status` and a
/// short error body.
fn refused(r: &Response, status: StatusCode, digest: &str, what: &str) {
    let head = &r.body[..r.body.len().min(200)];
    assert_eq!(r.status, status, "{what}: {} bytes, {head:?}", r.body.len());
    assert!(r.body.len() < 1024, "{what}: {} bytes", r.body.len());
    assert_ne!(sha256_digest(&r.body), digest, "{what}: got the object");
}

/// A proxy for one `private: true` registry, `host`, whose upstream is
/// the loopback `stub`.
fn private_stub_proxy(host: &str, stub: &Stub) -> Proxy {
    Proxy::start(
        proxy_bin(),
        Addrs::localhost().unwrap(),
        &format!(
            "registries:\n  - host: {host}\n    upstream: {}\n    private: true\n    allowPrivateNetworks: true\n",
            stub.url()
        ),
    )
    .unwrap()
}

/// `len` bytes of a pattern that `step` varies, for blobs no other test
/// serves.
fn patterned(len: u32, step: u32) -> bytes::Bytes {
    bytes::Bytes::from(
        (0..len)
            .map(|i| (i * step % 251) as u8)
            .collect::<Vec<u8>>(),
    )
}

/// A stub route's answer with no body.
fn empty(status: StatusCode) -> http::Response<bytes::Bytes> {
    http::Response::builder()
        .status(status)
        .body(bytes::Bytes::new())
        .unwrap()
}

/// A stub route's 200 with all of `bytes`.
fn whole(bytes: &bytes::Bytes) -> http::Response<bytes::Bytes> {
    http::Response::builder()
        .status(StatusCode::OK)
        .header("content-length", bytes.len())
        .body(bytes.clone())
        .unwrap()
}

/// Writes `body` as the proxy's config and waits until it runs it
/// (`/status` reports the sha256 of the file it loaded).
fn reconfigure(proxy: &Proxy, body: &str) {
    proxy.write_config(body).unwrap();
    let want = sha256_digest(&std::fs::read(proxy.config_path()).unwrap());
    let want = want.trim_start_matches("sha256:").to_string();
    let url = format!("http://{}/status", proxy.addrs.admin);
    wait_for(
        "the proxy to load the new config",
        Duration::from_secs(20),
        || {
            let r = Get::new(&url).send()?;
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
            Ok(v["configHash"].as_str().is_some_and(|h| h.ends_with(&want)))
        },
    )
    .unwrap();
}

/// An upstream that answers every request with `status` (a rate-limited
/// or failing registry), until dropped. Plain HTTP/1.1, one request per
/// connection.
struct Failing {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Failing {
    fn start(status: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                        // Reads the request head (a HEAD or GET has no body).
                        let mut head = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                            match conn.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        }
                        let _ = conn.write_all(
                            format!(
                                "HTTP/1.1 {status} Failing\r\nretry-after: 1\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                            )
                            .as_bytes(),
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Failing {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Point 1: a private image pulled by an authorised client is not served
/// by digest to anyone else — not anonymously through a public registry's
/// repository (by path prefix and by `?ns=`), not through the private
/// registry without credentials, not to another user through a
/// repository of their own that does not hold it (the upstream's 404 is a
/// refusal). The authorised client keeps getting HITs.
#[test]
fn cached_private_digests_are_served_only_where_the_upstream_lets_the_client_read_them() {
    let work = tempfile::tempdir().unwrap();
    let private = private_registry();
    let secret = random_image(&work.path().join("secret"), &[40_000, 30_000], 0x1eaf_0001);
    private.push_image(&secret, "secret/app", "1").unwrap();
    let public = Registry::plain().unwrap();
    let open = random_image(&work.path().join("open"), &[20_000], 0x1eaf_0002);
    public.push_image(&open, "library/alpine", "1").unwrap();
    let proxy = private_and_public(&private, &public.url(), "");

    // The authorised client: MISS, then HIT.
    let secrets = objects(&secret);
    pull_as_puller_twice(&proxy, &secrets);
    // An anonymous client reads the public repository (so it is known
    // readable to anonymous clients).
    for (path, d) in objects(&open) {
        let r = request(
            &proxy,
            Method::GET,
            &format!("/v2/public.test/library/alpine/{path}"),
            None,
        );
        assert_eq!(r.status, StatusCode::OK, "public {path}");
        assert_eq!(sha256_digest(&r.body), d);
    }

    for (path, d) in &secrets {
        for method in [Method::GET, Method::HEAD] {
            // Anonymous, through the public repository, by path prefix
            // and the way containerd asks (`?ns=`).
            for via in [
                format!("/v2/public.test/library/alpine/{path}"),
                format!("/v2/library/alpine/{path}?ns=public.test"),
            ] {
                let r = request(&proxy, method.clone(), &via, None);
                refused(
                    &r,
                    StatusCode::NOT_FOUND,
                    d,
                    &format!("anonymous {method} {via}"),
                );
            }
            // Anonymous, through the private repository itself.
            let via = format!("/v2/private.test/secret/app/{path}");
            let r = request(&proxy, method.clone(), &via, None);
            refused(
                &r,
                StatusCode::UNAUTHORIZED,
                d,
                &format!("anonymous {method} {via}"),
            );
            // Another user, through a repository of their own (empty
            // upstream: 404) and through the public one.
            for via in [
                format!("/v2/private.test/other/empty/{path}"),
                format!("/v2/public.test/library/alpine/{path}"),
            ] {
                let r = request(&proxy, method.clone(), &via, Some(OTHER));
                refused(
                    &r,
                    StatusCode::NOT_FOUND,
                    d,
                    &format!("{} {method} {via}", OTHER.0),
                );
            }
        }
    }

    // The authorised client still reads it from the cache.
    for (path, d) in &secrets {
        let r = request(
            &proxy,
            Method::GET,
            &format!("/v2/private.test/secret/app/{path}"),
            Some(PULLER),
        );
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert_eq!(sha256_digest(&r.body), *d);
    }
    // No refusal let a byte through: every line for a secret digest that
    // is not the authorised client's is a refusal.
    for (_, d) in &secrets {
        for line in proxy.access_matching(&[("digest", d)]) {
            let status = line["status"].as_u64().unwrap_or(0);
            let repo = line["repository"].as_str().unwrap_or_default();
            if status == 200 {
                assert_eq!(repo, "secret/app", "{line}");
            }
        }
    }
}

/// A referrers answer is no access check: a registry with the OCI 1.1
/// API answers 200 (an empty index) for any digest, whether the
/// repository holds it or not. An anonymous client asks what refers to
/// each cached private digest through a public repository, gets that
/// 200, and then asks for the digest there: refused, no byte of it (the
/// answer once granted the client the subject, which opened every cached
/// digest through any repository of any such registry).
#[test]
fn a_referrers_answer_for_a_cached_private_digest_opens_nothing() {
    const EMPTY: &[u8] =
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
    let work = tempfile::tempdir().unwrap();
    let private = private_registry();
    let secret = random_image(&work.path().join("secret"), &[30_000], 0x1eaf_0007);
    private.push_image(&secret, "secret/app", "1").unwrap();
    let public = Stub::canned()
        .route(|seen| {
            let ok = seen.path == "/v2/" || seen.path.starts_with("/v2/library/alpine/referrers/");
            let b = http::Response::builder();
            if ok {
                b.status(StatusCode::OK)
                    .header("content-type", "application/vnd.oci.image.index.v1+json")
                    .body(bytes::Bytes::from_static(EMPTY))
                    .unwrap()
            } else {
                b.status(StatusCode::NOT_FOUND)
                    .body(bytes::Bytes::new())
                    .unwrap()
            }
        })
        .start()
        .unwrap();
    // `tagTTL: 0s`: every referrers request reaches the upstream, where
    // its answer was taken for a grant (a cached answer is served only
    // after the access check).
    let proxy = private_and_public(&private, &public.url(), "    tagTTL: 0s\n");
    let secrets = objects(&secret);
    for (path, d) in &secrets {
        let r = request(
            &proxy,
            Method::GET,
            &format!("/v2/private.test/secret/app/{path}"),
            Some(PULLER),
        );
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert_eq!(sha256_digest(&r.body), *d);
        proxy
            .wait_access(&[("digest", d), ("cache", "MISS")])
            .unwrap();
    }

    for (path, d) in &secrets {
        for (referrers, object) in [
            (
                format!("/v2/public.test/library/alpine/referrers/{d}"),
                format!("/v2/public.test/library/alpine/{path}"),
            ),
            (
                format!("/v2/library/alpine/referrers/{d}?ns=public.test"),
                format!("/v2/library/alpine/{path}?ns=public.test"),
            ),
        ] {
            let r = request(&proxy, Method::GET, &referrers, None);
            assert_eq!(r.status, StatusCode::OK, "{referrers}: {:?}", r.body);
            assert_eq!(&r.body[..], EMPTY, "{referrers}");
            for method in [Method::GET, Method::HEAD] {
                let r = request(&proxy, method.clone(), &object, None);
                refused(
                    &r,
                    StatusCode::NOT_FOUND,
                    d,
                    &format!("anonymous {method} {object} after its referrers"),
                );
            }
        }
    }
    // The upstream was asked about each object (the check ran) and no
    // line for a secret digest outside its repository says 200.
    assert!(public.count("HEAD", "/v2/library/alpine/") >= secrets.len());
    for (_, d) in &secrets {
        for line in proxy.access_matching(&[("digest", d)]) {
            if line["status"].as_u64() == Some(200) {
                assert_eq!(line["repository"], "secret/app", "{line}");
            }
        }
    }
}

/// A redirect is no access grant by itself. A registry redirects a
/// cached blob's access check (a HEAD) two ways here: from the repository
/// that holds it to storage, which answers 403 once the URL's signature
/// has expired: served, the registry said yes by redirecting; and,
/// for any other repository, to a canonical host before checking
/// anything, which answers 404: refused, no byte (any redirect once
/// counted as a yes). `private: true`: every client is checked.
#[test]
fn a_redirected_access_check_opens_a_cached_blob_only_where_the_registry_said_yes() {
    let bytes = patterned(60_000, 13);
    let d = sha256_digest(&bytes);
    let signed = format!("/signed/{d}");
    // Storage serves the signed URL once; after that its signature has
    // expired (403), as a registry's presigned URLs do.
    let storage = {
        let (bytes, signed) = (bytes.clone(), signed.clone());
        let used = AtomicBool::new(false);
        Stub::canned()
            .ip(std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2)))
            .route(move |seen| {
                if seen.path != signed {
                    return empty(StatusCode::NOT_FOUND);
                }
                if used.swap(true, Ordering::SeqCst) {
                    return empty(StatusCode::FORBIDDEN);
                }
                whole(&bytes)
            })
            .start()
            .unwrap()
    };
    let canonical = Stub::canned()
        .ip(std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 3)))
        .start()
        .unwrap();
    let registry = {
        let (to_storage, to_canonical) = (format!("{}{signed}", storage.url()), canonical.url());
        let held = format!("/v2/team/app/blobs/{d}");
        Stub::canned()
            .route(move |seen| {
                let r = http::Response::builder();
                if seen.path == held {
                    r.status(StatusCode::TEMPORARY_REDIRECT)
                        .header("location", to_storage.as_str())
                } else if seen.path == "/v2/" {
                    r.status(StatusCode::OK)
                } else {
                    r.status(StatusCode::TEMPORARY_REDIRECT)
                        .header("location", format!("{to_canonical}{}", seen.path))
                }
                .body(bytes::Bytes::new())
                .unwrap()
            })
            .start()
            .unwrap()
    };
    let proxy = private_stub_proxy("redir.test", &registry);
    let get = |path: &str, auth: Option<(&str, &str)>| {
        request(&proxy, Method::GET, &format!("/v2/redir.test/{path}"), auth)
    };
    let r = get(&format!("team/app/blobs/{d}"), None);
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body, bytes);
    proxy
        .wait_access(&[("digest", &d), ("cache", "MISS")])
        .unwrap();

    // Another client, through the repository that holds it: the check is
    // redirected to storage, whose signature has expired; served from the
    // cache.
    let r = get(&format!("team/app/blobs/{d}"), Some(PULLER));
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body, bytes);
    proxy
        .wait_access(&[("digest", &d), ("cache", "HIT")])
        .unwrap();
    assert!(
        storage.count("GET", &signed) >= 2,
        "the check reached storage"
    );

    // Through any other repository: redirected before any check, 404.
    for client in [None, Some(OTHER)] {
        let r = get(&format!("other/app/blobs/{d}"), client);
        refused(
            &r,
            StatusCode::NOT_FOUND,
            &d,
            &format!("{client:?} via other/app"),
        );
    }
    assert!(
        canonical.count("GET", "/v2/other/app/") >= 2,
        "the checks reached the canonical host"
    );
}

/// A registry where checking for a layer and reading it need different
/// rights, as ECR's do: PULLER and OTHER may read `held`, PUSHER may only
/// HEAD it (a push-only role skipping an upload), anyone else gets 401.
fn ecr_like(bytes: &bytes::Bytes, held: &str) -> Stub {
    let (bytes, held) = (bytes.clone(), held.to_string());
    {
        let (readers, pusher) = ([basic(PULLER), basic(OTHER)], basic(PUSHER));
        Stub::canned()
            .route(move |seen| {
                let r = http::Response::builder();
                let who = seen.auth().unwrap_or_default();
                let reader = readers.iter().any(|r| r == who);
                let known = reader || who == pusher;
                if !known {
                    return r
                        .status(StatusCode::UNAUTHORIZED)
                        .header("www-authenticate", r#"Basic realm="ecr""#)
                        .body(bytes::Bytes::new())
                        .unwrap();
                }
                if seen.path == "/v2/" {
                    return empty(StatusCode::OK);
                }
                if seen.path != held {
                    return empty(StatusCode::NOT_FOUND);
                }
                if seen.method == Method::HEAD {
                    return r
                        .status(StatusCode::OK)
                        .header("content-length", bytes.len())
                        .body(bytes::Bytes::new())
                        .unwrap();
                }
                if !reader {
                    return empty(StatusCode::FORBIDDEN);
                }
                let one_byte = seen.headers.get("range").is_some_and(|v| v == "bytes=0-0");
                if one_byte {
                    return r
                        .status(StatusCode::PARTIAL_CONTENT)
                        .header("content-range", format!("bytes 0-0/{}", bytes.len()))
                        .header("content-length", 1)
                        .body(bytes.slice(0..1))
                        .unwrap();
                }
                whole(&bytes)
            })
            .start()
            .unwrap()
    }
}

/// A registry where checking for a layer and reading it need different
/// rights, as ECR's do: a push-only role may HEAD any layer (to skip
/// uploading it) but is refused its download. A client with such
/// credentials gets no byte of a layer another client cached, though a
/// HEAD with its credentials says 200 (the access check once asked with
/// a HEAD and served it); another reader still gets it from the cache,
/// asked about with a one-byte GET. `private: true`: every client is checked.
#[test]
fn a_credential_that_may_only_check_for_a_layer_gets_no_cached_byte_of_it() {
    let bytes = patterned(70_000, 31);
    let d = sha256_digest(&bytes);
    let held = format!("/v2/team/app/blobs/{d}");
    let registry = ecr_like(&bytes, &held);
    let proxy = private_stub_proxy("ecr.test", &registry);
    let get = |auth| {
        request(
            &proxy,
            Method::GET,
            &format!("/v2/ecr.test/team/app/blobs/{d}"),
            auth,
        )
    };
    let r = get(Some(PULLER));
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body, bytes);
    proxy
        .wait_access(&[("digest", &d), ("cache", "MISS")])
        .unwrap();

    let r = get(Some(PUSHER));
    refused(&r, StatusCode::FORBIDDEN, &d, "the push-only credential");
    let asked = registry
        .requests()
        .into_iter()
        .filter(|s| s.path == held && s.auth() == Some(basic(PUSHER).as_str()))
        .collect::<Vec<_>>();
    assert!(
        !asked.is_empty()
            && asked.iter().all(|s| s.method == Method::GET
                && s.headers.get("range").is_some_and(|v| v == "bytes=0-0")),
        "the check is a one-byte GET: {:?}",
        asked.iter().map(|s| &s.method).collect::<Vec<_>>()
    );

    // Another reader is asked about the same way, and served from the
    // cache.
    let before = registry.count("GET", &held);
    let r = get(Some(OTHER));
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body, bytes);
    proxy
        .wait_access(&[("digest", &d), ("cache", "HIT")])
        .unwrap();
    assert_eq!(
        registry.count("GET", &held),
        before + 1,
        "one check, no download"
    );
}

/// A HEAD the upstream answers 200 says the client may check for the
/// layer, not that it may read it (ECR: push-only roles). It grants no
/// read: before, a push-only credential's HEAD was recorded as a grant and
/// its GET then served the cached layer, whether the HEAD came before the
/// layer was cached or after (`allowPush`, where a HEAD skips the cache).
#[test]
fn a_head_the_upstream_answers_grants_no_download() {
    for (n, allow_push) in [(0u32, false), (1, true)] {
        let bytes = patterned(60_000 + n, 37 + n);
        let d = sha256_digest(&bytes);
        let held = format!("/v2/team/app/blobs/{d}");
        let registry = ecr_like(&bytes, &held);
        let proxy = Proxy::start(
            proxy_bin(),
            Addrs::localhost().unwrap(),
            &format!(
                "registries:\n  - host: ecr.test\n    upstream: {}\n    private: true\n    allowPrivateNetworks: true\n    allowPush: {allow_push}\n",
                registry.url()
            ),
        )
        .unwrap();
        let path = format!("/v2/ecr.test/team/app/blobs/{d}");
        let head = || request(&proxy, Method::HEAD, &path, Some(PUSHER));
        let what = format!("allowPush: {allow_push}");
        if !allow_push {
            // Before the layer is cached: relayed, 200.
            assert_eq!(head().status, StatusCode::OK, "{what}");
        }
        let r = request(&proxy, Method::GET, &path, Some(PULLER));
        assert_eq!(r.status, StatusCode::OK, "{what}");
        assert_eq!(r.body, bytes, "{what}");
        if allow_push {
            // After: a push check goes to the upstream, 200.
            assert_eq!(head().status, StatusCode::OK, "{what}");
            assert!(registry.count("HEAD", &held) >= 1, "{what}: not asked");
        }
        let r = request(&proxy, Method::GET, &path, Some(PUSHER));
        refused(&r, StatusCode::FORBIDDEN, &d, &what);
    }
}

/// Point 2: while the upstream cannot answer an access check — stopped,
/// answering 503, answering 429 — cached content opens only to the
/// client class the upstream let read it (stale-if-error for access);
/// anonymous clients and other users get a 503 and no byte, also for a
/// stale tag. Public content keeps being served through an outage
/// (`production.rs::tags_and_digests_are_served_through_an_outage`,
/// `outage.rs`). `serveCachedOnAuthError: true` serves everyone.
#[test]
fn an_upstream_that_cannot_answer_the_access_check_opens_nothing_new() {
    let work = tempfile::tempdir().unwrap();
    let mut private = private_registry();
    let secret = random_image(&work.path().join("secret"), &[25_000], 0x1eaf_0003);
    private.push_image(&secret, "secret/app", "1").unwrap();
    let registry = |upstream: &str, extra: &str| {
        format!(
            "authCheckTTL: 1s\nregistries:\n  - host: private.test\n    upstream: {upstream}\n    tagTTL: 1s\n{extra}"
        )
    };
    let tls = format!("    caBundle: {}\n", private.ca_path().unwrap().display());
    let proxy = Proxy::start(
        proxy_bin(),
        Addrs::localhost().unwrap(),
        &registry(&private.url(), &tls),
    )
    .unwrap();
    let secrets = objects(&secret);
    let tag = "/v2/private.test/secret/app/manifests/1";
    let r = request(&proxy, Method::GET, tag, Some(PULLER));
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(sha256_digest(&r.body), secrets[0].1);
    for (path, d) in &secrets {
        let r = request(
            &proxy,
            Method::GET,
            &format!("/v2/private.test/secret/app/{path}"),
            Some(PULLER),
        );
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert_eq!(sha256_digest(&r.body), *d);
    }

    let attack = |proxy: &Proxy, when: &str| {
        // Past authCheckTTL and tagTTL: every answer must come from a
        // check now.
        std::thread::sleep(Duration::from_millis(1200));
        for who in [None, Some(OTHER)] {
            let name = who.map_or("anonymous", |w| w.0);
            for (path, d) in &secrets {
                let via = format!("/v2/private.test/secret/app/{path}");
                for method in [Method::GET, Method::HEAD] {
                    let r = request(proxy, method.clone(), &via, who);
                    refused(
                        &r,
                        StatusCode::SERVICE_UNAVAILABLE,
                        d,
                        &format!("{when}: {name} {method} {via}"),
                    );
                }
            }
            // The stale tag is checked as a fresh one.
            let r = request(proxy, Method::GET, tag, who);
            refused(
                &r,
                StatusCode::SERVICE_UNAVAILABLE,
                &secrets[0].1,
                &format!("{when}: {name} stale tag"),
            );
            // Nor what the tag points to: the digest is the proxy's
            // secret here, the client named only the tag.
            let hex = secrets[0].1.trim_start_matches("sha256:");
            let said = format!("{:?} {}", r.headers, String::from_utf8_lossy(&r.body));
            assert!(
                !said.contains(hex),
                "{when}: {name} stale tag: the refusal names the digest: {said}"
            );
        }
        // The client the upstream let read it keeps reading it.
        for (path, d) in &secrets {
            let via = format!("/v2/private.test/secret/app/{path}");
            let r = request(proxy, Method::GET, &via, Some(PULLER));
            assert_eq!(r.status, StatusCode::OK, "{when}: puller {via}");
            assert_eq!(sha256_digest(&r.body), *d);
        }
        let r = request(proxy, Method::GET, tag, Some(PULLER));
        assert_eq!(r.status, StatusCode::OK, "{when}: puller stale tag");
        assert_eq!(sha256_digest(&r.body), secrets[0].1);
    };

    private.stop().unwrap();
    attack(&proxy, "upstream stopped");
    for status in [503, 429] {
        let failing = Failing::start(status);
        reconfigure(&proxy, &registry(&format!("http://{}", failing.addr), ""));
        attack(&proxy, &format!("upstream answering {status}"));
        drop(failing);
    }

    // The opt-in: availability over the per-client check.
    let failing = Failing::start(503);
    reconfigure(
        &proxy,
        &registry(
            &format!("http://{}", failing.addr),
            "    serveCachedOnAuthError: true\n",
        ),
    );
    std::thread::sleep(Duration::from_millis(1200));
    for (path, d) in &secrets {
        let via = format!("/v2/private.test/secret/app/{path}");
        let r = request(&proxy, Method::GET, &via, None);
        assert_eq!(r.status, StatusCode::OK, "opt-in: anonymous {via}");
        assert_eq!(sha256_digest(&r.body), *d);
    }
}

/// An image of one 10 MiB layer (`seed`) as quay.io's `big/layer:1`
/// behind a proxy: its work dir, the image, the registry, the proxy.
fn big_layer_behind_proxy(seed: u64) -> (tempfile::TempDir, Image, Registry, Proxy) {
    let work = tempfile::tempdir().unwrap();
    let image = random_image(work.path(), &[10 << 20], seed);
    let registry = Registry::plain().unwrap();
    registry.push_image(&image, "big/layer", "1").unwrap();
    let proxy = Proxy::start(
        proxy_bin(),
        Addrs::localhost().unwrap(),
        &format!(
            "registries:\n  - host: quay.io\n    upstream: {}\n",
            registry.url()
        ),
    )
    .unwrap();
    (work, image, registry, proxy)
}

/// Point 3: a cached 10 MiB layer asked for as a manifest on 200 HTTP/2
/// streams whose bodies are never read: it is no manifest, so nothing of
/// it is read into memory, and the proxy's RSS stays under 128 MiB. Real
/// manifests are still served from the cache.
#[test]
fn a_layer_asked_for_as_a_manifest_on_200_unread_streams_costs_no_memory() {
    let (_work, image, _registry, proxy) = big_layer_behind_proxy(0x1eaf_0004);
    let layer = image.layer_digests()[0].clone();
    let manifest = image.manifests[0].digest.clone();
    for (kind, d) in [("blobs", &layer), ("manifests", &manifest)] {
        let r = request(
            &proxy,
            Method::GET,
            &format!("/v2/quay.io/big/layer/{kind}/{d}"),
            None,
        );
        assert_eq!(r.status, StatusCode::OK, "{kind}");
        assert_eq!(sha256_digest(&r.body), *d);
    }
    proxy
        .wait_access(&[("digest", &layer), ("cache", "MISS"), ("complete", "true")])
        .unwrap();

    let (statuses, rss) = unread_streams(
        &proxy,
        &format!("/v2/quay.io/big/layer/manifests/{layer}"),
        50,
    );
    assert!(
        rss < 128 * 1024,
        "proxy RSS {rss} KiB with 200 unread streams"
    );
    assert_eq!(statuses.len(), 200);
    assert!(
        statuses.iter().all(|s| *s != StatusCode::OK),
        "a layer was served as a manifest: {statuses:?}"
    );
    // Real manifests: still HITs.
    let r = request(
        &proxy,
        Method::GET,
        &format!("/v2/quay.io/big/layer/manifests/{manifest}"),
        None,
    );
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(sha256_digest(&r.body), manifest);
    proxy
        .wait_access(&[("digest", &manifest), ("cache", "HIT")])
        .unwrap();
}

/// A cached 10 MiB layer on 4 HTTP/2 connections × 128 streams (the
/// default `maxStreamsPerConnection`) whose bodies are never read: each
/// stream holds about one 64 KiB chunk, not two of 256 KiB (hyper's send
/// buffer was 400 KiB) and the file's own read buffer: that was 67 MiB
/// per connection, so a few dozen such connections had the proxy killed
/// for memory.
#[test]
fn a_layer_on_512_unread_streams_costs_a_bounded_memory() {
    let (_work, image, _registry, proxy) = big_layer_behind_proxy(0x1eaf_0006);
    let layer = image.layer_digests()[0].clone();
    let path = format!("/v2/quay.io/big/layer/blobs/{layer}");
    let r = request(&proxy, Method::GET, &path, None);
    assert_eq!(sha256_digest(&r.body), layer);
    proxy
        .wait_access(&[("digest", &layer), ("cache", "MISS"), ("complete", "true")])
        .unwrap();
    let before = vm_rss_kib(proxy.pid());
    let (statuses, rss) = unread_streams(&proxy, &path, 128);
    assert_eq!(statuses.len(), 512);
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    let grown = rss.saturating_sub(before);
    // 273 MiB before; about 52 MiB now.
    assert!(
        grown < 80 * 1024,
        "proxy RSS grew {grown} KiB ({before} → {rss}) with 512 unread streams of a layer"
    );
}

/// Asks for `path` on HTTP/2 streams (4 connections × `per_connection`)
/// and reads only the response heads; with every body still unread, the
/// proxy's RSS in KiB. The statuses of the answers.
fn unread_streams(proxy: &Proxy, path: &str, per_connection: usize) -> (Vec<StatusCode>, u64) {
    let ca = proxy.ca_pem().unwrap();
    let https = proxy.addrs.https;
    let pid = proxy.pid();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use http_body_util::Empty;
        let mut cfg = pullthrough_testbed::tls::client_config(&ca).unwrap();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let mut held = Vec::new();
        // The connections stay open while their senders live.
        let mut senders = Vec::new();
        for _ in 0..4 {
            let tcp = tokio::net::TcpStream::connect(https).await.unwrap();
            let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let tls = connector.connect(name, tcp).await.unwrap();
            let (send, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(tls),
            )
            .await
            .unwrap();
            tokio::spawn(conn);
            let mut pending = Vec::new();
            for _ in 0..per_connection {
                let mut send = send.clone();
                let req = http::Request::get(format!("https://{https}{path}"))
                    .header("accept", ACCEPT)
                    .body(Empty::<bytes::Bytes>::new())
                    .unwrap();
                pending.push(async move { send.send_request(req).await });
            }
            for resp in futures::future::join_all(pending).await {
                // The head only: the body stays unread, held by the stream.
                held.push(resp.unwrap());
            }
            senders.push(send);
        }
        // Whatever the proxy buffered for these streams is buffered now.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss = vm_rss_kib(pid);
        eprintln!(
            "proxy RSS with {} unread streams of {path}: {rss} KiB",
            held.len()
        );
        let statuses = held.iter().map(|r| r.status()).collect();
        drop(held);
        drop(senders);
        (statuses, rss)
    })
}

/// Point 3, the other half: a real manifest above the in-memory bound
/// (2 MiB, padded with an annotation) on 200 unread HTTP/2 streams is
/// served to each from its file, not read whole per request: RSS stays
/// under 128 MiB.
#[test]
fn a_large_cached_manifest_on_200_unread_streams_is_streamed() {
    let work = tempfile::tempdir().unwrap();
    let base = random_image(work.path(), &[1000], 0x1eaf_0005);
    let mut m: serde_json::Value = serde_json::from_slice(&base.manifests[0].bytes).unwrap();
    m["annotations"] = serde_json::json!({"pad": "p".repeat(2 << 20)});
    let bytes = serde_json::to_vec(&m).unwrap();
    let digest = sha256_digest(&bytes);
    let blobs = base.layout.join("blobs/sha256");
    std::fs::write(blobs.join(digest.trim_start_matches("sha256:")), &bytes).unwrap();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": base.media_type, "digest": digest, "size": bytes.len(),
        "annotations": {"org.opencontainers.image.ref.name": "big"},
    }]});
    std::fs::write(
        base.layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    let mut manifest = base.manifests[0].clone();
    manifest.digest = digest.clone();
    manifest.bytes = bytes.clone();
    let image = Image {
        layout: base.layout.clone(),
        tag: "big".into(),
        digest: digest.clone(),
        media_type: base.media_type.clone(),
        bytes,
        manifests: vec![manifest],
    };
    let registry = Registry::plain().unwrap();
    registry.push_image(&image, "big/manifest", "1").unwrap();
    let proxy = Proxy::start(
        proxy_bin(),
        Addrs::localhost().unwrap(),
        &format!(
            "registries:\n  - host: quay.io\n    upstream: {}\n",
            registry.url()
        ),
    )
    .unwrap();
    let path = format!("/v2/quay.io/big/manifest/manifests/{digest}");
    let r = request(&proxy, Method::GET, &path, None);
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(sha256_digest(&r.body), digest);

    let (statuses, rss) = unread_streams(&proxy, &path, 50);
    assert!(
        rss < 128 * 1024,
        "proxy RSS {rss} KiB with 200 unread streams"
    );
    assert_eq!(statuses.len(), 200);
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    // And each is whole when read.
    let r = request(&proxy, Method::GET, &path, None);
    assert_eq!(sha256_digest(&r.body), digest);
    proxy
        .wait_access(&[("digest", &digest), ("cache", "HIT"), ("complete", "true")])
        .unwrap();
}

/// The resident set of process `pid`, in KiB (`VmRSS` of
/// /proc/<pid>/status).
fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

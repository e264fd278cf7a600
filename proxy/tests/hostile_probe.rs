//! A refusal tells nothing about what the cache holds. The cache keeps one
//! copy per digest for every client; a client the upstream will not let
//! read a digest is refused, and that refusal must look the same whether
//! the proxy holds the digest or not. Before, the proxy made its own
//! refusal for a cached digest (after asking the upstream) and relayed the
//! upstream's own for an uncached one, so any client could learn which
//! private images someone in the cluster had pulled: ask for a digest (or
//! a private tag) under any repository and look at the refusal's body.
//!
//! An authorised client pulls a private image through the proxy; clients
//! that may not read it (anonymous, another user; through the private
//! repository, a repository of their own that does not hold it, a public
//! registry's repository) then ask for its digests and its tag, and for
//! those of a second private image the proxy never fetched: by GET and by
//! HEAD, each pair of refusals is the same (status, body bytes, headers but
//! `date`), and no byte of either image leaves. The same through another
//! replica, whose owner replica answers for the blob.
//!
//! Real `docker-registry` upstreams (TLS + htpasswd for the private one),
//! the proxy binary, everything on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use http::{Method, StatusCode};
use pullthrough_testbed::fixtures::{Image, sha256_digest};
use pullthrough_testbed::http::{Get, Response};
use pullthrough_testbed::net::wait_for;
use pullthrough_testbed::proxy::{Addrs, Proxy};
use pullthrough_testbed::registry::Registry;

use common::private::{
    OTHER, PULLER, objects, private_and_public, private_registry, pull_as_puller_twice,
    random_image, request,
};
use common::{Replicas, proxy_bin};

/// What a client can tell two answers apart by: the status, the body
/// bytes, and every header (name and value, in order per name) except
/// `date`, which is the moment each response was made and differs between
/// any two of them whatever they answer.
fn observable(r: &Response) -> (StatusCode, BTreeMap<String, Vec<Vec<u8>>>, Vec<u8>) {
    let mut headers: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    for (name, value) in &r.headers {
        if name.as_str() != "date" {
            headers
                .entry(name.as_str().to_string())
                .or_default()
                .push(value.as_bytes().to_vec());
        }
    }
    (r.status, headers, r.body.to_vec())
}

/// Both answers are refusals with `status`, and the same to the client.
fn same_refusal(cached: &Response, fresh: &Response, status: StatusCode, what: &str) {
    // Compared as bytes, shown as text.
    assert!(
        observable(cached) == observable(fresh),
        "{what}: the refusal of a cached object differs from that of one the proxy never fetched\n  cached: {} {:?} {:?}\n  never:  {} {:?} {:?}",
        cached.status,
        cached.headers,
        String::from_utf8_lossy(&cached.body),
        fresh.status,
        fresh.headers,
        String::from_utf8_lossy(&fresh.body),
    );
    assert_eq!(cached.status, status, "{what}");
}

/// Nothing of `content` (the object whose digest was asked for) in `r`.
fn nothing_of(r: &Response, content: &[u8], method: &Method, what: &str) {
    if *method == Method::HEAD {
        assert!(r.body.is_empty(), "{what}: a HEAD answered with a body");
    }
    assert!(r.body.len() < 1024, "{what}: {} bytes", r.body.len());
    assert_ne!(sha256_digest(&r.body), sha256_digest(content), "{what}");
    let head = &content[..content.len().min(64)];
    assert!(
        !r.body.windows(head.len()).any(|w| w == head),
        "{what}: the body holds the object's first bytes"
    );
}

/// A client that may not read the private image, asking under `prefix`
/// (a repository path ending in `/`) with `query`: refused with `status`.
struct Asker {
    who: &'static str,
    auth: Option<(&'static str, &'static str)>,
    prefix: &'static str,
    query: &'static str,
    status: StatusCode,
}

/// The bytes of `digest` in `image`'s layout.
fn bytes_of(image: &Image, digest: &str) -> Vec<u8> {
    std::fs::read(image.blob_path(digest)).unwrap()
}

#[test]
fn a_refusal_is_the_same_whether_the_proxy_holds_the_object_or_not() {
    let work = tempfile::tempdir().unwrap();
    let private = private_registry();
    let pulled = random_image(&work.path().join("pulled"), &[30_000], 0x9b0b_0001);
    let never = random_image(&work.path().join("never"), &[30_000], 0x9b0b_0002);
    private.push_image(&pulled, "secret/app", "1").unwrap();
    private.push_image(&never, "secret/app", "2").unwrap();
    let public = Registry::plain().unwrap();
    let open = random_image(&work.path().join("open"), &[10_000], 0x9b0b_0003);
    public.push_image(&open, "library/alpine", "1").unwrap();
    let proxy = private_and_public(&private, &public.url(), "");

    // The authorised client pulls image 1: its tag, manifest, config and
    // layer are cached (the second round is served from the cache).
    let cached = objects(&pulled);
    let r = request(
        &proxy,
        Method::GET,
        "/v2/private.test/secret/app/manifests/1",
        Some(PULLER),
    );
    assert_eq!(r.status, StatusCode::OK, "the tag");
    assert_eq!(sha256_digest(&r.body), pulled.manifests[0].digest);
    pull_as_puller_twice(&proxy, &cached);
    // It asks what refers to the image (distribution 2.8 has no
    // referrers API: a 404 the proxy keeps as "none here" for the tag TTL).
    let subject = &pulled.manifests[0].digest;
    let r = request(
        &proxy,
        Method::GET,
        &format!("/v2/private.test/secret/app/referrers/{subject}"),
        Some(PULLER),
    );
    assert_eq!(r.status, StatusCode::NOT_FOUND, "referrers");
    // An anonymous client reads the public repository.
    for (path, _) in objects(&open) {
        let r = request(
            &proxy,
            Method::GET,
            &format!("/v2/public.test/library/alpine/{path}"),
            None,
        );
        assert_eq!(r.status, StatusCode::OK, "public {path}");
    }
    // The probes' access lines are those after these.
    let before = proxy
        .wait_accesses(
            &[("repository", "library/alpine"), ("status", "200")],
            objects(&open).len(),
        )
        .unwrap();
    assert_eq!(before.len(), objects(&open).len());
    let baseline = proxy.access_lines().len();

    // Pairs of (cached, never fetched) objects of the same kind, and who
    // asks where.
    let fresh = objects(&never);
    let pairs = [
        ("manifest", &cached[0], &fresh[0]),
        ("config", &cached[1], &fresh[1]),
        ("layer", &cached[2], &fresh[2]),
    ];
    let anonymous = |prefix, query, status| Asker {
        who: "anonymous",
        auth: None,
        prefix,
        query,
        status,
    };
    let other = |prefix, status| Asker {
        who: OTHER.0,
        auth: Some(OTHER),
        prefix,
        query: "",
        status,
    };
    let askers = [
        anonymous("/v2/private.test/secret/app/", "", StatusCode::UNAUTHORIZED),
        anonymous("/v2/public.test/library/alpine/", "", StatusCode::NOT_FOUND),
        anonymous(
            "/v2/library/alpine/",
            "?ns=public.test",
            StatusCode::NOT_FOUND,
        ),
        other("/v2/private.test/other/empty/", StatusCode::NOT_FOUND),
        other("/v2/public.test/library/alpine/", StatusCode::NOT_FOUND),
    ];
    // Every request the probes make, for the access log check below.
    let mut asked: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut ask = |method: &Method, path: &str, auth| {
        let route = path.split('?').next().unwrap_or(path).to_string();
        *asked.entry((method.to_string(), route)).or_default() += 1;
        request(&proxy, method.clone(), path, auth)
    };
    for method in [Method::GET, Method::HEAD] {
        for (kind, (cached_path, cached_digest), (fresh_path, fresh_digest)) in &pairs {
            let (cached_image, fresh_image) = if *kind == "manifest" {
                (
                    pulled.manifests[0].bytes.clone(),
                    never.manifests[0].bytes.clone(),
                )
            } else {
                (
                    bytes_of(&pulled, cached_digest),
                    bytes_of(&never, fresh_digest),
                )
            };
            for Asker {
                who,
                auth,
                prefix,
                query,
                status,
            } in &askers
            {
                let what = format!("{who} {method} {kind} via {prefix}…{query}");
                let a = ask(&method, &format!("{prefix}{cached_path}{query}"), *auth);
                let b = ask(&method, &format!("{prefix}{fresh_path}{query}"), *auth);
                same_refusal(&a, &b, *status, &what);
                nothing_of(&a, &cached_image, &method, &format!("{what}, cached"));
                nothing_of(&b, &fresh_image, &method, &format!("{what}, never fetched"));
            }
        }
        // A private tag the proxy knows (cached answer) and one it never
        // asked for: the refusal tells neither that someone pulled tag 1.
        let what = format!("anonymous {method} tag");
        let a = ask(&method, "/v2/private.test/secret/app/manifests/1", None);
        let b = ask(&method, "/v2/private.test/secret/app/manifests/2", None);
        same_refusal(&a, &b, StatusCode::UNAUTHORIZED, &what);
        nothing_of(&a, &pulled.manifests[0].bytes, &method, &what);
        nothing_of(&b, &never.manifests[0].bytes, &method, &what);
        // What refers to a digest: a known answer and one never asked for.
        let what = format!("anonymous {method} referrers");
        let a = ask(
            &method,
            &format!("/v2/private.test/secret/app/referrers/{subject}"),
            None,
        );
        let b = ask(
            &method,
            &format!(
                "/v2/private.test/secret/app/referrers/{}",
                never.manifests[0].digest
            ),
            None,
        );
        same_refusal(&a, &b, StatusCode::UNAUTHORIZED, &what);
    }

    // Every probe has its one access line, with the status its client
    // got.
    wait_for(
        "every probe's access line",
        std::time::Duration::from_secs(10),
        || {
            let lines = &proxy.access_lines()[baseline..];
            Ok(asked.iter().all(|((method, path), n)| {
                lines
                    .iter()
                    .filter(|l| l["method"] == method.as_str() && l["path"] == path.as_str())
                    .count()
                    == *n
            }))
        },
    )
    .unwrap();
    // The log still tells the operator which refusals came from the
    // access check of a cached object (DENIED) and which from the
    // upstream (PASS); a HEAD's answer is whole.
    let is_cached = |path: &str| {
        path.ends_with("/manifests/1") || cached.iter().any(|(_, d)| path.ends_with(d.as_str()))
    };
    for (method, path) in asked.keys() {
        for line in &proxy.access_lines()[baseline..] {
            if line["method"] == method.as_str() && line["path"] == path.as_str() {
                let status = line["status"].as_u64().unwrap_or(0);
                assert!(status == 401 || status == 404, "{method} {path}: {line}");
                assert_eq!(line["complete"], true, "{line}");
                let want = if is_cached(path) { "DENIED" } else { "PASS" };
                assert_eq!(line["cache"], want, "{line}");
            }
        }
    }

    // Nothing of image 2 was fetched for the probes; the authorised
    // client still reads image 1 from the cache.
    for (_, d) in &fresh {
        assert!(!proxy.cached_blob_path(d).exists(), "{d} was cached");
    }
    for (path, d) in &cached {
        let r = request(
            &proxy,
            Method::GET,
            &format!("/v2/private.test/secret/app/{path}"),
            Some(PULLER),
        );
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert_eq!(sha256_digest(&r.body), *d);
    }
    // What is not there reads as the spec's "unknown" for its kind, as
    // from the registry itself: a pull of a mistyped tag says "manifest
    // unknown", not that the repository is.
    let missing_blob = format!("blobs/sha256:{}", "0".repeat(64));
    for (path, code) in [
        ("manifests/no-such-tag", "MANIFEST_UNKNOWN"),
        (missing_blob.as_str(), "BLOB_UNKNOWN"),
    ] {
        let r = request(
            &proxy,
            Method::GET,
            &format!("/v2/private.test/secret/app/{path}"),
            Some(PULLER),
        );
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["errors"][0]["code"], code, "{path}: {body}");
    }
}

/// Through a replica that does not own the digest, a blob request goes to
/// its owner replica: the owner's refusal, for a blob it holds or for one
/// it asked the upstream for, reaches the client the same.
#[test]
fn a_refusal_through_another_replica_is_the_same_whether_its_owner_holds_the_blob() {
    const HOST: &str = "quay.io";
    const REPO: &str = "probe/app";
    let work = tempfile::tempdir().unwrap();
    let pulled = random_image(&work.path().join("pulled"), &[200_000], 0x9b0b_0011);
    let never = random_image(&work.path().join("never"), &[200_000], 0x9b0b_0012);
    let registry = Registry::plain().unwrap();
    registry.push_image(&pulled, REPO, "1").unwrap();
    registry.push_image(&never, REPO, "2").unwrap();
    let r = Replicas::start(2, HOST, &registry.url(), "");
    let get = |i: usize, method: Method, repo: &str, digest: &str| {
        Get::new(&r.blob_url(i, HOST, repo, digest))
            .method(method)
            .timeout(std::time::Duration::from_secs(20))
            .send()
            .unwrap()
    };
    let held = pulled.layer_digests()[0].clone();
    let fresh = never.layer_digests()[0].clone();
    let (held_owner, fresh_owner) = (r.owner(&held), r.owner(&fresh));
    let cached = get(held_owner, Method::GET, REPO, &held);
    assert_eq!(cached.status, StatusCode::OK);
    assert_eq!(sha256_digest(&cached.body), held);
    wait_for(
        "the owner to hold the blob",
        std::time::Duration::from_secs(10),
        || Ok(r.proxies[held_owner].cached_blob_path(&held).exists()),
    )
    .unwrap();

    for method in [Method::GET, Method::HEAD] {
        let a = get(1 - held_owner, method.clone(), "other/empty", &held);
        let b = get(1 - fresh_owner, method.clone(), "other/empty", &fresh);
        let what = format!("{method} through the replica that does not own the digest");
        same_refusal(&a, &b, StatusCode::NOT_FOUND, &what);
        nothing_of(&a, &bytes_of(&pulled, &held), &method, &what);
        nothing_of(&b, &bytes_of(&never, &fresh), &method, &what);
    }
    // The GETs were the owners' answers: each owner has its peer line.
    for (owner, digest) in [(held_owner, &held), (fresh_owner, &fresh)] {
        r.proxies[owner]
            .wait_access(&[("via", "peer"), ("digest", digest.as_str())])
            .unwrap();
    }
    assert!(!r.proxies[fresh_owner].cached_blob_path(&fresh).exists());
    assert!(!r.proxies[1 - fresh_owner].cached_blob_path(&fresh).exists());
}

/// A refusal is made by the proxy and the upstream's own answer dropped
/// unread; that must not cost the upstream connection, or every refused
/// miss (the 401 that starts a client's token exchange, a 404 for a
/// signature or referrers tag) would make the next request open a new one
/// (and shake hands again over TLS). hyper has read a short error body
/// off the connection by the time the answer is dropped, so the
/// connection goes back to the pool.
#[test]
fn a_refused_miss_keeps_the_upstream_connection() {
    let stub = pullthrough_testbed::stub::Stub::canned()
        .route(|seen| {
            let r = http::Response::builder();
            if seen.path == "/v2/" {
                return r.status(200).body(bytes::Bytes::new()).unwrap();
            }
            r.status(StatusCode::NOT_FOUND)
                .header("content-type", "application/json")
                .body(bytes::Bytes::from_static(
                    br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry","detail":null}]}"#,
                ))
                .unwrap()
        })
        .start()
        .unwrap();
    let proxy = Proxy::start(
        proxy_bin(),
        Addrs::localhost().unwrap(),
        &format!(
            "registries:\n  - host: quay.io\n    upstream: {}\n    allowPrivateNetworks: true\n",
            stub.url()
        ),
    )
    .unwrap();
    for i in 0..6u8 {
        let digest = format!("sha256:{}", format!("{i:02x}").repeat(32));
        let r = Get::new(&format!(
            "{}/v2/quay.io/team/app/blobs/{digest}",
            proxy.http_url()
        ))
        .send()
        .unwrap();
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(stub.count("GET", &digest), 1);
    }
    assert!(
        stub.connections() <= 2,
        "{} upstream connections for 6 refused misses",
        stub.connections()
    );
}

//! Issue #14, point 1: the upstream budget. An upstream scripted like
//! Docker Hub (manifest GETs count against `ratelimit-remaining`, HEADs do
//! not; `docker-ratelimit-source` names whose budget it is; a storm of
//! 429s with `Retry-After`) shows that the proxy exports the figures,
//! revalidates with HEAD, stops asking for cached tags when the budget is
//! at its reserve or a Retry-After runs, and that no client of a cached
//! tag ever sees a 429.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use pullthrough_testbed::fixtures::sha256_digest;
use pullthrough_testbed::http::Get;
use pullthrough_testbed::proxy::{Addrs, Proxy};
use pullthrough_testbed::stub::Stub;
use serde_json::Value;

const MT: &str = "application/vnd.oci.image.manifest.v1+json";
const SOURCE: &str = "203.0.113.7";

fn manifest_bytes(n: u8) -> Bytes {
    Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"{MT}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{}","size":2}},"layers":[]}}"#,
        format!("{n:02x}").repeat(32)
    ))
}

/// Docker Hub as far as the budget goes.
#[derive(Default)]
struct Hub {
    remaining: AtomicU64,
    storm: AtomicBool,
}

impl Hub {
    fn answer(&self, method: &Method, path: &str) -> Response<Bytes> {
        let mut b = Response::builder();
        if self.storm.load(Ordering::SeqCst) {
            return b
                .status(StatusCode::TOO_MANY_REQUESTS)
                .header("retry-after", "120")
                .body(Bytes::from_static(
                    br#"{"errors":[{"code":"TOOMANYREQUESTS","message":"You have reached your pull rate limit."}]}"#,
                ))
                .unwrap();
        }
        if path == "/v2/" {
            return b
                .status(StatusCode::OK)
                .body(Bytes::from_static(b"{}"))
                .unwrap();
        }
        let body = match path {
            "/v2/library/app/manifests/latest" => manifest_bytes(1),
            "/v2/library/app/manifests/other" => manifest_bytes(2),
            _ => return b.status(StatusCode::NOT_FOUND).body(Bytes::new()).unwrap(),
        };
        // A GET of a manifest is a pull; a HEAD is free.
        if method == Method::GET {
            self.remaining.fetch_sub(1, Ordering::SeqCst);
        }
        let left = self.remaining.load(Ordering::SeqCst);
        b = b
            .status(StatusCode::OK)
            .header("content-type", MT)
            .header("docker-content-digest", sha256_digest(&body))
            .header("content-length", body.len())
            .header("ratelimit-limit", "100;w=21600")
            .header("ratelimit-remaining", format!("{left};w=21600"))
            .header("docker-ratelimit-source", SOURCE);
        let body = if method == Method::HEAD {
            Bytes::new()
        } else {
            body
        };
        b.body(body).unwrap()
    }
}

fn metric(proxy: &Proxy, series: &str) -> Option<f64> {
    let url = format!("http://{}/metrics", proxy.addrs.admin);
    let text = String::from_utf8(Get::new(&url).send().unwrap().body.to_vec()).unwrap();
    text.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

fn upstream_status(proxy: &Proxy) -> Value {
    let url = format!("http://{}/status", proxy.addrs.admin);
    let v: Value = serde_json::from_slice(&Get::new(&url).send().unwrap().body).unwrap();
    v["upstream"]["hub.test"].clone()
}

#[test]
fn a_spent_budget_or_a_429_storm_never_reaches_a_client_of_a_cached_tag() {
    let hub = Arc::new(Hub::default());
    hub.remaining.store(50, Ordering::SeqCst);
    let h = hub.clone();
    let stub = Stub::canned()
        .route(move |seen| h.answer(&seen.method, seen.path.split('?').next().unwrap_or("")))
        .start()
        .unwrap();
    let proxy = Proxy::start(
        common::proxy_bin(),
        Addrs::localhost().unwrap(),
        &common::one_registry(
            "hub.test",
            &stub.url(),
            "    upstreamReserve: 5\n    tagPolicy: [{pattern: latest, ttl: 0s}]\n",
        ),
    )
    .unwrap();
    let pull = |tag: &str| {
        let url = format!(
            "{}/v2/hub.test/library/app/manifests/{tag}",
            proxy.http_url()
        );
        Get::new(&url).header("Accept", MT).send().unwrap()
    };
    let gets = || stub.count("GET", "/manifests/");
    let heads = || stub.count("HEAD", "/manifests/");
    let latest = sha256_digest(&manifest_bytes(1));

    // First pull: one GET; the figures are exported per registry and source.
    assert_eq!(pull("latest").status, StatusCode::OK);
    assert_eq!(gets(), 1);
    let series = |name: &str| {
        format!(
            "pullthrough_upstream_ratelimit_{name}{{registry=\"hub.test\",source=\"{SOURCE}\"}}"
        )
    };
    assert_eq!(metric(&proxy, &series("limit")), Some(100.0));
    assert_eq!(metric(&proxy, &series("remaining")), Some(49.0));
    let up = upstream_status(&proxy);
    assert_eq!(
        (
            up["limit"].as_u64(),
            up["remaining"].as_u64(),
            up["low"].as_bool()
        ),
        (Some(100), Some(49), Some(false)),
        "{up}"
    );
    assert_eq!(up["source"], SOURCE);

    // `latest` (0s) again: revalidated with a free HEAD, not a GET.
    assert_eq!(sha256_digest(&pull("latest").body), latest);
    assert_eq!((gets(), heads()), (1, 1));

    // The budget falls to the reserve (5): the HEAD that reads it still
    // answers, then cached tags are served without asking (STALE).
    hub.remaining.store(5, Ordering::SeqCst);
    assert_eq!(pull("latest").status, StatusCode::OK);
    assert_eq!((gets(), heads()), (1, 2));
    assert_eq!(upstream_status(&proxy)["low"], true);
    assert_eq!(
        metric(
            &proxy,
            r#"pullthrough_upstream_budget_low{registry="hub.test"}"#
        ),
        Some(1.0)
    );
    for _ in 0..3 {
        let r = pull("latest");
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(sha256_digest(&r.body), latest);
    }
    assert_eq!(
        (gets(), heads()),
        (1, 2),
        "nothing asked while the budget is low"
    );
    proxy
        .wait_access(&[
            ("kind", "tag"),
            ("registry", "hub.test"),
            ("cache", "STALE"),
        ])
        .unwrap();

    // A pull that needs the upstream still goes (the reserve is for it),
    // and the new reading ends the low state.
    hub.remaining.store(91, Ordering::SeqCst);
    assert_eq!(pull("other").status, StatusCode::OK);
    assert_eq!(gets(), 2);
    assert_eq!(upstream_status(&proxy)["low"], false);
    assert_eq!(pull("latest").status, StatusCode::OK);
    assert_eq!(heads(), 3, "revalidated again");

    // A 429 storm: the client of the cached tag gets the cache, the
    // Retry-After is honoured (nothing asked again), and only a tag that
    // was never cached gets the 429.
    hub.storm.store(true, Ordering::SeqCst);
    let asked = stub.requests().len();
    for _ in 0..5 {
        let r = pull("latest");
        assert_eq!(r.status, StatusCode::OK, "a cached tag never sees the 429");
        assert_eq!(sha256_digest(&r.body), latest);
    }
    assert_eq!(
        stub.requests().len(),
        asked + 1,
        "one request met the 429; the Retry-After kept the rest home"
    );
    let up = upstream_status(&proxy);
    assert_eq!(up["low"], true, "{up}");
    assert!(up["retryAfterUntil"].as_u64().is_some(), "{up}");
    assert_eq!(
        metric(
            &proxy,
            r#"pullthrough_upstream_throttled_responses_total{registry="hub.test"}"#
        ),
        Some(1.0)
    );
    let r = pull("never-cached");
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
}

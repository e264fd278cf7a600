//! Issue #14, point 1: the upstream budget. An upstream scripted like
//! Docker Hub (manifest GETs count against `ratelimit-remaining`, HEADs do
//! not; `docker-ratelimit-source` names whose budget it is; a storm of
//! 429s with `Retry-After`) shows that the proxy exports the figures,
//! revalidates with HEAD, stops asking for cached tags when the budget is
//! at its reserve or a Retry-After runs, and that no client of a cached
//! tag ever sees a 429.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use http::StatusCode;
use pullthrough_testbed::fixtures::sha256_digest;
use pullthrough_testbed::http::{Get, Response};
use pullthrough_testbed::hub::{Hub, MEDIA_TYPE as MT, SOURCE};
use pullthrough_testbed::proxy::{Addrs, Proxy};
use pullthrough_testbed::stub::Stub;
use serde_json::Value;

fn metric(proxy: &Proxy, series: &str) -> Option<f64> {
    proxy.metric(series).unwrap()
}

fn upstream_status(proxy: &Proxy) -> Value {
    let url = format!("http://{}/status", proxy.addrs.admin);
    let v: Value = serde_json::from_slice(&Get::new(&url).send().unwrap().body).unwrap();
    v["upstream"]["hub.test"].clone()
}

/// A proxy mirroring the scripted hub as `hub.test`, with `extra`
/// registry settings.
fn proxy_for(stub: &Stub, extra: &str) -> Proxy {
    Proxy::start(
        common::proxy_bin(),
        Addrs::localhost().unwrap(),
        &common::one_registry("hub.test", &stub.url(), extra),
    )
    .unwrap()
}

/// A GET of `library/app:<tag>` through `proxy`, with `auth` if given.
fn pull(proxy: &Proxy, tag: &str, auth: Option<&str>) -> Response {
    let url = format!(
        "{}/v2/hub.test/library/app/manifests/{tag}",
        proxy.http_url()
    );
    let mut get = Get::new(&url).header("Accept", MT);
    if let Some(a) = auth {
        get = get.header("Authorization", a);
    }
    get.send().unwrap()
}

#[test]
fn a_spent_budget_or_a_429_storm_never_reaches_a_client_of_a_cached_tag() {
    let (hub, stub) = Hub::start(50).unwrap();
    let proxy = proxy_for(
        &stub,
        "    upstreamReserve: 5\n    tagPolicy: [{pattern: latest, ttl: 0s}]\n",
    );
    let pull = |tag: &str| pull(&proxy, tag, None);
    let gets = || stub.count("GET", "/manifests/");
    let heads = || stub.count("HEAD", "/manifests/");
    let latest = sha256_digest(&hub.manifest("latest"));

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
    hub.set_remaining(5);
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
    hub.set_remaining(91);
    assert_eq!(pull("other").status, StatusCode::OK);
    assert_eq!(gets(), 2);
    assert_eq!(upstream_status(&proxy)["low"], false);
    assert_eq!(pull("latest").status, StatusCode::OK);
    assert_eq!(heads(), 3, "revalidated again");

    // A 429 storm: the client of the cached tag gets the cache, the
    // Retry-After is honoured (nothing asked again), and only a tag that
    // was never cached gets the 429.
    hub.set_storm(true);
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

/// Docker Hub's token service failing (`503`) just as the token the proxy
/// holds expires: a client of a cached tag gets it (STALE), never the
/// registry's `401` (it is no refusal of the client); a tag never cached
/// gets a `502` naming the realm, not a `401`. Once the realm is back,
/// the tag is revalidated again.
#[test]
fn a_failing_token_service_never_reaches_a_client_of_a_cached_tag() {
    let (hub, stub) = Hub::start_with_tokens(50).unwrap();
    let proxy = proxy_for(&stub, "    tagPolicy: [{pattern: latest, ttl: 0s}]\n");
    let pull = |tag: &str| pull(&proxy, tag, None);
    let latest = sha256_digest(&hub.manifest("latest"));
    let r = pull("latest");
    assert_eq!(r.status, StatusCode::OK, "{}", proxy.log());
    assert_eq!(sha256_digest(&r.body), latest);
    assert_eq!(stub.count("GET", "/token"), 1);

    hub.expire_tokens();
    hub.set_realm_down(true);
    for _ in 0..3 {
        let r = pull("latest");
        assert_eq!(r.status, StatusCode::OK, "{}", proxy.log());
        assert_eq!(sha256_digest(&r.body), latest);
    }
    let stale = proxy
        .wait_accesses(&[("kind", "tag"), ("cache", "STALE")], 3)
        .unwrap();
    assert_eq!(stale.len(), 3, "{stale:?}");
    assert!(stub.count("GET", "/token") > 1, "the realm was asked again");
    let r = pull("never-cached");
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{:?}", r.body);
    assert!(
        String::from_utf8_lossy(&r.body).contains("token"),
        "{:?}",
        r.body
    );

    hub.set_realm_down(false);
    let r = pull("latest");
    assert_eq!(r.status, StatusCode::OK);
    let hits = proxy
        .wait_access(&[("kind", "tag"), ("cache", "HIT")])
        .unwrap();
    assert_eq!(hits.len(), 1, "revalidated with a new token: {hits:?}");
}

/// A client pulling with its own credentials spends its own account's
/// budget: what the upstream tells it (nearly spent, say) does not make
/// the proxy spare the registry for everyone else, and its account
/// (`docker-ratelimit-source`) does not become a label.
#[test]
fn a_clients_own_budget_is_not_the_proxys() {
    let (hub, stub) = Hub::start(50).unwrap();
    let proxy = proxy_for(
        &stub,
        "    upstreamReserve: 5\n    tagPolicy: [{pattern: latest, ttl: 0s}]\n",
    );
    let pull = |tag: &str, auth: Option<&str>| pull(&proxy, tag, auth);
    assert_eq!(pull("latest", None).status, StatusCode::OK);
    assert_eq!(upstream_status(&proxy)["remaining"], 49);

    // A client with its own account, nearly spent.
    hub.set_remaining(3);
    assert_eq!(pull("other", Some("Bearer its-own")).status, StatusCode::OK);
    assert_eq!(upstream_status(&proxy)["remaining"], 49, "not the proxy's");
    assert_eq!(upstream_status(&proxy)["low"], false);

    // An anonymous pull of `latest` (0s) is revalidated as usual.
    hub.set_remaining(40);
    let heads = || stub.count("HEAD", "/manifests/latest");
    assert_eq!(pull("latest", None).status, StatusCode::OK);
    assert_eq!(heads(), 1);
    let hits = proxy
        .wait_access(&[("kind", "tag"), ("cache", "HIT")])
        .unwrap();
    assert_eq!(hits.len(), 1, "{hits:?}");
}

/// A rollout right after `latest` moved: many nodes ask for the expired
/// tag at once. One HEAD finds it moved and one GET fetches it (a GET is
/// a pull on Docker Hub); the others are answered with what that one
/// stored. Unmoved, one HEAD answers them all.
#[test]
fn concurrent_asks_for_an_expired_tag_cost_one_upstream_trip() {
    let (hub, stub) = Hub::start(1000).unwrap();
    let proxy = proxy_for(&stub, "    tagPolicy: [{pattern: latest, ttl: 0s}]\n");
    let pull = || pull(&proxy, "latest", None);
    let gets = || stub.count("GET", "/manifests/latest");
    let heads = || stub.count("HEAD", "/manifests/latest");
    assert_eq!(pull().status, StatusCode::OK);
    assert_eq!((gets(), heads()), (1, 0));

    let rollout = |want: &str| {
        std::thread::scope(|s| {
            let pulls: Vec<_> = (0..20).map(|_| s.spawn(pull)).collect();
            for p in pulls {
                let r = p.join().unwrap();
                assert_eq!(r.status, StatusCode::OK);
                assert_eq!(sha256_digest(&r.body), want);
            }
        })
    };
    // Every upstream answer takes 300 ms: the 20 asks overlap the first.
    hub.set_latency(std::time::Duration::from_millis(300));
    hub.move_tags();
    rollout(&sha256_digest(&hub.manifest("latest")));
    assert_eq!((gets(), heads()), (2, 1), "moved: one HEAD, one GET");
    rollout(&sha256_digest(&hub.manifest("latest")));
    assert_eq!((gets(), heads()), (2, 2), "unmoved: one HEAD");
}

/// The proxy's own token realm failing is no outage of the registry: a
/// client bringing its own credentials is asked about with those, and
/// gets the cached manifest the registry lets it read.
#[test]
fn a_failing_token_service_still_lets_a_clients_own_credentials_through() {
    let (hub, stub) = Hub::start_with_tokens(50).unwrap();
    let proxy = proxy_for(&stub, "");
    let digest = sha256_digest(&hub.manifest("latest"));
    // Cached by one user, with its own token (granted to that user only).
    let first = pull(&proxy, "latest", Some("Bearer user-a"));
    assert_eq!(first.status, StatusCode::OK, "{}", proxy.log());
    assert_eq!(sha256_digest(&first.body), digest);

    hub.set_realm_down(true);
    // Another user, by digest: not known to the proxy yet.
    let other = pull(&proxy, &digest, Some("Bearer user-b"));
    assert_eq!(other.status, StatusCode::OK, "{:?}", other.body);
    assert_eq!(sha256_digest(&other.body), digest);
    // Without credentials there is still no answer: nothing opens.
    let anonymous = pull(&proxy, &digest, None);
    assert_ne!(anonymous.status, StatusCode::OK);
}

//! Prefetch (issue #14, point 7): a pinned image the cache does not hold is
//! fetched into it before any client asks, only for the nodes' platforms,
//! and never while the upstream budget is low.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use http::StatusCode;
use pullthrough_testbed::fixtures::{LayoutBuilder, sha256_digest};
use pullthrough_testbed::http::Get;
use pullthrough_testbed::hub::{Hub, MEDIA_TYPE};
use pullthrough_testbed::net::wait_for;
use pullthrough_testbed::proxy::Proxy;
use pullthrough_testbed::registry::Registry;
use serde_json::json;

const ACCEPT: &str =
    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json";

fn metrics(proxy: &Proxy) -> String {
    proxy.metrics().unwrap()
}

/// A two-platform image pinned for linux/amd64 nodes: the proxy fetches
/// the index, the amd64 manifest and its blobs (once each), not the arm64
/// ones; with the upstream then stopped, a client pulls the whole amd64
/// image from the cache.
#[test]
fn a_pinned_image_is_fetched_for_the_nodes_platforms_before_anyone_asks() {
    let work = tempfile::tempdir().unwrap();
    let image = LayoutBuilder::new(&work.path().join("layout"))
        .unwrap()
        .multi_arch("1")
        .unwrap();
    let mut registry = Registry::plain().unwrap();
    image.push(&registry, "fixture/multi", "1").unwrap();
    let (amd, arm) = (&image.manifests[0], &image.manifests[1]);
    let pins = work.path().join("pins.json");
    common::write_pins(
        &pins,
        &json!({"images": ["quay.io/fixture/multi:1"], "platforms": ["linux/amd64"]}),
    );
    let proxy = common::proxy_with_pins(&pins, "", "quay.io", &registry.url(), "");

    wait_for("the prefetch", Duration::from_secs(30), || {
        Ok(proxy.log().contains("\"prefetched\""))
    })
    .unwrap();
    let amd_blobs: Vec<_> = std::iter::once(&amd.config)
        .chain(&amd.layers)
        .map(|b| b.digest.clone())
        .collect();
    for d in &amd_blobs {
        assert!(
            proxy.cached_blob_path(d).exists(),
            "amd64 blob {d} prefetched:\n{}",
            proxy.log()
        );
    }
    for b in std::iter::once(&arm.config).chain(&arm.layers) {
        assert!(
            !proxy.cached_blob_path(&b.digest).exists(),
            "arm64 blob {} not fetched for amd64 nodes",
            b.digest
        );
    }
    registry.sync_log().unwrap();
    for d in &amd_blobs {
        assert_eq!(
            registry.count_requests("GET", &format!("/blobs/{d}")),
            1,
            "{d}"
        );
    }
    assert!(
        metrics(&proxy)
            .contains(r#"pullthrough_prefetches_total{registry="quay.io",result="fetched"} 1"#),
        "{}",
        metrics(&proxy)
    );
    // Pinned, now that it is cached: resolved at a later refresh. The
    // pin holds the index (the digest kubelet reports for a multi-platform
    // image), and through it the amd64 manifest, its config and layers. A
    // refresh that ran while the prefetch had cached only the index
    // counts the image with that one blob; a later one counts them all.
    wait_for("the pin resolved", Duration::from_secs(10), || {
        let pinned = &common::status(&proxy)["cache"]["quay.io"]["pinned"];
        Ok(pinned["images"] == 1 && pinned["blobs"] == 2 + amd_blobs.len() as u64)
    })
    .unwrap();
    let pinned = common::status(&proxy)["cache"]["quay.io"]["pinned"].clone();
    let amd_bytes: u64 = std::iter::once(&amd.config)
        .chain(&amd.layers)
        .map(|b| b.size)
        .sum::<u64>()
        + amd.bytes.len() as u64
        + image.bytes.len() as u64;
    assert_eq!(pinned["blobs"], 2 + amd_blobs.len() as u64, "{pinned}");
    assert_eq!(pinned["bytes"], amd_bytes, "{pinned}");

    // The upstream is gone; the node's pull is served from the cache.
    registry.stop().unwrap();
    let get = |what: &str, r: &str| {
        let url = format!("{}/v2/quay.io/fixture/multi/{what}/{r}", proxy.http_url());
        let resp = Get::new(&url).header("Accept", ACCEPT).send().unwrap();
        assert_eq!(resp.status, StatusCode::OK, "{url}\n{}", proxy.log());
        resp.body
    };
    assert_eq!(sha256_digest(&get("manifests", "1")), image.digest);
    assert_eq!(sha256_digest(&get("manifests", &amd.digest)), amd.digest);
    for d in &amd_blobs {
        assert_eq!(&sha256_digest(&get("blobs", d)), d);
    }
}

/// A pinned image the upstream does not have fails once and waits: the
/// pins are read every 200 ms here, and a later refresh (which fetches a
/// newly pinned image) does not ask the upstream for the failed one again.
/// Before, every refresh asked again, for good.
#[test]
fn a_pin_that_fails_is_not_asked_for_at_every_refresh() {
    let work = tempfile::tempdir().unwrap();
    let registry = Registry::plain().unwrap();
    let pins = work.path().join("pins.json");
    let missing = "quay.io/fixture/gone:1";
    common::write_pins(&pins, &json!({"images": [missing]}));
    let proxy = common::proxy_with_pins(&pins, "", "quay.io", &registry.url(), "");
    wait_for("the failed prefetch", Duration::from_secs(30), || {
        Ok(proxy.log().contains("prefetch to be tried again later"))
    })
    .unwrap();
    registry.sync_log().unwrap();
    let asked = || registry.count_requests("GET", "/fixture/gone/manifests/1");
    let first = asked();
    assert!(first >= 1, "the upstream was asked");

    // A new pin: fetched at the next refresh, which passes the failed one.
    let image = LayoutBuilder::new(&work.path().join("layout"))
        .unwrap()
        .random("1", &[1024], 3)
        .unwrap();
    registry.push_image(&image, "fixture/new", "1").unwrap();
    common::write_pins(
        &pins,
        &json!({"images": [missing, "quay.io/fixture/new:1"]}),
    );
    wait_for("the new pin prefetched", Duration::from_secs(30), || {
        Ok(proxy.log().contains("\"prefetched\""))
    })
    .unwrap();
    registry.sync_log().unwrap();
    assert_eq!(asked(), first, "the failed pin was asked for again");
    assert_eq!(
        proxy
            .log()
            .matches("prefetch to be tried again later")
            .count(),
        1
    );
}

/// With the upstream's budget at its reserve, a pinned image that is not
/// cached is not fetched: a pod's pull may need the pulls left. Also when
/// the pin names the registry by an alias.
#[test]
fn no_prefetch_while_the_upstream_budget_is_low() {
    let work = tempfile::tempdir().unwrap();
    // 6 pulls left, reserve 5: one client pull makes the budget low.
    let (_hub, stub) = Hub::start(6).unwrap();
    let pins = work.path().join("pins.json");
    let proxy = common::proxy_with_pins(
        &pins,
        "",
        "hub.test",
        &stub.url(),
        "    upstreamReserve: 5\n    aliases: [hub-alias.test]\n",
    );
    let url = format!(
        "{}/v2/hub.test/library/app/manifests/latest",
        proxy.http_url()
    );
    let r = Get::new(&url).header("Accept", MEDIA_TYPE).send().unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(common::status(&proxy)["upstream"]["hub.test"]["low"], true);
    let gets = || stub.count("GET", "/manifests/");
    assert_eq!(gets(), 1);

    let images = ["hub.test/library/app:v2", "hub-alias.test/library/app:v3"];
    common::write_pins(&pins, &json!({ "images": images }));
    wait_for("both postponements", Duration::from_secs(10), || {
        let log = proxy.log();
        Ok(images.iter().all(|i| {
            log.lines().any(|l| {
                l.contains("prefetch postponed: the upstream budget is low")
                    && l.contains(&format!("\"image\":\"{i}\""))
            })
        }))
    })
    .unwrap();
    assert_eq!(gets(), 1, "no prefetch GET while the budget is low");
    assert!(
        metrics(&proxy)
            .contains(r#"pullthrough_prefetches_total{registry="hub.test",result="postponed"}"#)
    );
}

/// A rollout of 50 pods of a new image meeting its prefetch: the image is
/// pinned and, at the same moment, 50 clients pull its config and layers.
/// The upstream sees exactly one GET per blob, and every client gets the
/// exact bytes.
#[test]
fn a_rollout_racing_its_prefetch_costs_one_upstream_get_per_blob() {
    let work = tempfile::tempdir().unwrap();
    let image = LayoutBuilder::new(&work.path().join("layout"))
        .unwrap()
        .random("1", &[1 << 20, 2 << 20, 3 << 20], 900)
        .unwrap();
    let registry = Registry::plain().unwrap();
    registry.push_image(&image, "fixture/rollout", "1").unwrap();
    let m = &image.manifests[0];
    let pins = work.path().join("pins.json");
    let proxy = common::proxy_with_pins(&pins, "", "quay.io", &registry.url(), "");
    let blobs: Vec<_> = std::iter::once(&m.config).chain(&m.layers).collect();
    let mut clients = Vec::new();
    for _pod in 0..50 {
        for b in &blobs {
            clients.push(vec![format!(
                "{}/v2/quay.io/fixture/rollout/blobs/{}",
                proxy.http_url(),
                b.digest
            )]);
        }
    }
    common::write_pins(&pins, &json!({"images": ["quay.io/fixture/rollout:1"]}));
    let results = common::fetch_all(clients);
    for (i, f) in results.iter().enumerate() {
        let want = &blobs[i % blobs.len()].digest;
        assert_eq!(f.status, StatusCode::OK, "client {i}");
        assert_eq!(&sha256_digest(&f.body), want, "client {i}");
    }
    wait_for("the prefetch", Duration::from_secs(30), || {
        Ok(common::status(&proxy)["cache"]["quay.io"]["pinned"]["images"] == 1)
    })
    .unwrap();
    registry.sync_log().unwrap();
    for b in &blobs {
        assert_eq!(
            registry.count_requests("GET", &format!("/blobs/{}", b.digest)),
            1,
            "upstream GETs of {}",
            b.digest
        );
    }
}

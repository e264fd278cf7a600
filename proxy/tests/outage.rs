//! Outage survival with real runtimes: after a first pull the upstream is
//! stopped; a tag pull within `tagTTL` is a HIT and one after it is served
//! from the last known digest (`STALE`), by crictl (containerd's CRI, the
//! kubelet's path, containerd mirror mode) and by dockerd
//! (`registry-mirrors`). Public names resolve to a dead loopback address
//! in each runtime's private hosts file, so only the proxy can serve.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use pullthrough_testbed::containerd::{Containerd, ContainerdOpts};
use pullthrough_testbed::proxy::{Addrs, Proxy};
use pullthrough_testbed::registry::Registry;

/// tagTTL of the tests: long enough for one pull to fit inside it.
const TAG_TTL: Duration = Duration::from_secs(4);

fn wait_past(t: Instant, d: Duration) {
    let until = t + d + Duration::from_millis(200);
    if let Some(left) = until.checked_duration_since(Instant::now()) {
        std::thread::sleep(left);
    }
}

#[test]
fn crictl_pulls_tags_through_an_upstream_outage() {
    let mut up = common::upstream(Registry::plain().unwrap());
    let proxy = Proxy::start(
        common::proxy_bin(),
        Addrs::localhost().unwrap(),
        &common::one_registry("quay.io", &up.registry.url(), "    tagTTL: 4s\n"),
    )
    .unwrap();
    let ctd =
        Containerd::start(ContainerdOpts::default().host("quay.io", "127.0.0.1".parse().unwrap()))
            .unwrap();
    ctd.mirror_to("quay.io", proxy.addrs.https, &proxy.ca_pem().unwrap())
        .unwrap();
    let image = "quay.io/fixture/busybox:1";
    ctd.crictl(["pull", image]).unwrap();
    proxy
        .wait_access(&[
            ("kind", "tag"),
            ("reference", "1"),
            ("cache", "MISS"),
            ("via", "ns"),
        ])
        .unwrap();
    let resolved = Instant::now();
    up.registry.stop().unwrap();

    // Within tagTTL: HIT.
    ctd.crictl(["rmi", image]).unwrap();
    ctd.crictl(["pull", image]).unwrap();
    assert!(
        resolved.elapsed() < TAG_TTL,
        "the pull took longer than tagTTL"
    );
    proxy
        .wait_access(&[
            ("kind", "tag"),
            ("reference", "1"),
            ("cache", "HIT"),
            ("via", "ns"),
        ])
        .unwrap();
    // After tagTTL: the upstream is asked, fails, the last digest is STALE.
    wait_past(resolved, TAG_TTL);
    ctd.crictl(["rmi", image]).unwrap();
    ctd.crictl(["pull", image]).unwrap();
    let stale = proxy
        .wait_access(&[
            ("kind", "tag"),
            ("reference", "1"),
            ("cache", "STALE"),
            ("via", "ns"),
        ])
        .unwrap();
    assert_eq!(stale[0]["digest"], up.busybox.manifests[0].digest.as_str());
    let layer = &up.busybox.layer_digests()[0];
    proxy
        .wait_access(&[("kind", "blob"), ("digest", layer), ("cache", "HIT")])
        .unwrap();
    assert!(!ctd.crictl(["images", "-q"]).unwrap().trim().is_empty());
}

#[test]
fn dockerd_pulls_tags_through_an_upstream_outage() {
    let mut started = common::Started::default();
    {
        let mut up = common::upstream_at(Registry::plain().unwrap(), "library/busybox");
        let proxy = common::proxy_for_docker_hub(&up, "    tagTTL: 4s\n");
        let dead: std::net::IpAddr = "127.0.0.1".parse().unwrap();
        let dockerd = common::dockerd_mirroring_docker_hub_to(&proxy, dead);
        started.upstream_and_proxy(&up, &proxy).dockerd(&dockerd);

        dockerd.docker(["pull", "busybox:1"]).unwrap();
        proxy
            .wait_access(&[
                ("kind", "tag"),
                ("reference", "1"),
                ("cache", "MISS"),
                ("via", "default"),
            ])
            .unwrap();
        let resolved = Instant::now();
        up.registry.stop().unwrap();

        dockerd.docker(["rmi", "busybox:1"]).unwrap();
        dockerd.docker(["pull", "busybox:1"]).unwrap();
        assert!(
            resolved.elapsed() < TAG_TTL,
            "the pull took longer than tagTTL"
        );
        proxy
            .wait_access(&[
                ("kind", "tag"),
                ("reference", "1"),
                ("cache", "HIT"),
                ("via", "default"),
            ])
            .unwrap();

        wait_past(resolved, TAG_TTL);
        dockerd.docker(["rmi", "busybox:1"]).unwrap();
        dockerd.docker(["pull", "busybox:1"]).unwrap();
        proxy
            .wait_access(&[
                ("kind", "tag"),
                ("reference", "1"),
                ("cache", "STALE"),
                ("via", "default"),
            ])
            .unwrap();
        let id = dockerd
            .docker(["image", "inspect", "--format", "{{.Id}}", "busybox:1"])
            .unwrap();
        assert_eq!(id.trim(), up.busybox.manifests[0].config.digest);
    }
    started.assert_all_gone();
}

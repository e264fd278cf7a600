//! Real clients pull through the proxy in each mode: the first pull is a
//! MISS; after the client's store is cleared and the upstream is stopped,
//! the same pull succeeds from the cache and the log says HIT.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use pullthrough_testbed::containerd::{Containerd, ContainerdOpts};
use pullthrough_testbed::process::run;
use pullthrough_testbed::registry::Registry;

fn skopeo_copy(src: &str, cert_dir: &std::path::Path, dest: &std::path::Path) {
    let mut cmd = Command::new("skopeo");
    cmd.args(["--insecure-policy", "copy", "-q"])
        .arg(format!("--src-cert-dir={}", cert_dir.display()))
        .arg(src)
        .arg(format!("oci:{}:x", dest.display()));
    run(&mut cmd).unwrap();
}

/// skopeo, path-prefix mirror mode, over HTTPS verified against the proxy
/// CA (no SNI: the proxy's own certificate carries its IP).
#[test]
fn skopeo_through_the_proxy_then_from_cache_with_upstream_down() {
    let mut up = common::upstream(Registry::plain().unwrap());
    let proxy = common::proxy_for(&up);
    let certs = common::ca_dir(&proxy);
    let src = format!("docker://{}/quay.io/fixture/busybox:1", proxy.addrs.https);

    let out = tempfile::tempdir().unwrap();
    skopeo_copy(&src, certs.path(), &out.path().join("a"));
    let layer = &up.busybox.layer_digests()[0];
    proxy
        .wait_access(&[
            ("kind", "blob"),
            ("digest", layer),
            ("cache", "MISS"),
            ("via", "path"),
        ])
        .unwrap();
    proxy
        .wait_access(&[("kind", "tag"), ("reference", "1"), ("cache", "MISS")])
        .unwrap();
    assert_eq!(up.registry.count_requests("GET", layer), 1);

    up.registry.stop().unwrap();
    skopeo_copy(&src, certs.path(), &out.path().join("b"));
    let hits = proxy
        .wait_access(&[("kind", "blob"), ("digest", layer), ("cache", "HIT")])
        .unwrap();
    assert_eq!(hits[0]["status"], 200);
    proxy
        .wait_access(&[("kind", "tag"), ("reference", "1"), ("cache", "HIT")])
        .unwrap();
    // Metrics count the same story per registry.
    let metrics_url = format!("http://{}/metrics", proxy.addrs.admin);
    let metrics = pullthrough_testbed::http::Get::new(&metrics_url)
        .send()
        .unwrap();
    let text = String::from_utf8_lossy(&metrics.body);
    for want in [
        r#"pullthrough_requests_total{registry="quay.io",kind="blob",result="hit"}"#,
        r#"pullthrough_requests_total{registry="quay.io",kind="blob",result="miss"}"#,
        r#"pullthrough_served_bytes_total{registry="quay.io",source="cache"}"#,
    ] {
        assert!(text.contains(want), "{want} missing from /metrics:\n{text}");
    }
    // The copy is bit for bit what the upstream had.
    let hex = layer.trim_start_matches("sha256:");
    let copied = std::fs::read(out.path().join("b/blobs/sha256").join(hex)).unwrap();
    pullthrough_testbed::fixtures::verify_digest(&copied, layer).unwrap();
}

/// containerd mirror mode through CRI (the kubelet's path): hosts.toml sends
/// quay.io to the proxy over HTTPS with its CA; requests carry `?ns=`.
#[test]
fn crictl_through_containerd_mirror_then_from_cache_with_upstream_down() {
    let mut up = common::upstream(Registry::plain().unwrap());
    let proxy = common::proxy_for(&up);
    // quay.io resolves to a dead loopback port inside containerd's namespace,
    // and `server` points there too: a pull can only succeed via the proxy.
    let ctd =
        Containerd::start(ContainerdOpts::default().host("quay.io", "127.0.0.1".parse().unwrap()))
            .unwrap();
    ctd.mirror_to("quay.io", proxy.addrs.https, &proxy.ca_pem().unwrap())
        .unwrap();

    ctd.crictl(["pull", "quay.io/fixture/busybox:1"]).unwrap();
    let layer = &up.busybox.layer_digests()[0];
    proxy
        .wait_access(&[
            ("kind", "blob"),
            ("digest", layer),
            ("cache", "MISS"),
            ("via", "ns"),
            ("registry", "quay.io"),
        ])
        .unwrap();

    ctd.crictl(["rmi", "quay.io/fixture/busybox:1"]).unwrap();
    up.registry.stop().unwrap();
    ctd.crictl(["pull", "quay.io/fixture/busybox:1"]).unwrap();
    proxy
        .wait_access(&[
            ("kind", "blob"),
            ("digest", layer),
            ("cache", "HIT"),
            ("via", "ns"),
        ])
        .unwrap();
    proxy
        .wait_access(&[("kind", "tag"), ("reference", "1"), ("cache", "HIT")])
        .unwrap();
    let images = ctd.crictl(["images", "-q"]).unwrap();
    assert!(
        !images.trim().is_empty(),
        "image not in the CRI store after the cached pull"
    );
}

//! Real runtimes pull through the proxy in the modes they support natively:
//! dockerd by DNS hijack (verified TLS, in a network namespace of the
//! test's own) and by `registry-mirrors` (Docker Hub names), podman by a
//! path-prefix mirror in `registries.conf.d`. As in `pull_modes.rs`: the
//! first pull is a MISS; after the runtime's image is removed and the
//! upstream is stopped, the same pull succeeds and the proxy's log says HIT.
//! Every name a runtime could resolve to a public registry maps to a test
//! address in its private `/etc/hosts`; every server is on loopback or
//! inside the test's own network namespace.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use pullthrough_testbed::dockerd::{Dockerd, DockerdOpts};
use pullthrough_testbed::net::{is_listening, wait_for};
use pullthrough_testbed::ns::NetNs;
use pullthrough_testbed::podman::{Podman, PodmanOpts};
use pullthrough_testbed::process::run;
use pullthrough_testbed::proxy::{Addrs, Proxy};
use pullthrough_testbed::registry::{Flavour, Registry, RegistryOpts};

const QUAY_IMAGE: &str = "quay.io/fixture/busybox:1";

/// The network namespace a process is in (`net:[inode]`).
fn netns_of(pid: u32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap()
}

/// A loopback address where nothing listens on the HTTPS or HTTP port: the
/// hosts files send public registry names here, so a runtime that bypasses
/// the proxy fails instead of reaching anything.
fn dead_loopback() -> IpAddr {
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    for port in [443, 80] {
        assert!(
            !is_listening(SocketAddr::new(ip, port)),
            "something listens on {ip}:{port}; the fallback would not be dead"
        );
    }
    ip
}

/// Access-log lines of the kinds that fetch content.
fn content_requests(proxy: &Proxy) -> Vec<serde_json::Value> {
    proxy
        .access_lines()
        .into_iter()
        .filter(|l| matches!(l["kind"].as_str(), Some("tag" | "manifest" | "blob")))
        .collect()
}

/// DNS-hijack mode with dockerd, proving CA trust. dockerd treats a registry
/// whose name resolves into 127.0.0.0/8 as insecure (unverified HTTPS, then
/// plain HTTP), so here dockerd, the proxy and the upstream all run in a
/// network namespace of the test's own whose address 10.254.0.1 exists
/// nowhere else; quay.io resolves to it, and only TLS on :443 is served
/// there. Without the proxy CA in `certs.d/quay.io/` the pull fails on the
/// certificate; with it, it goes through the proxy (via=host).
#[test]
fn dockerd_dns_hijack_over_verified_tls_in_a_netns() {
    let t0 = Instant::now();
    let mut started = common::Started::default();
    {
        let vip: IpAddr = "10.254.0.1".parse().unwrap();
        let netns = NetNs::create(&[vip]).unwrap();
        started.netns(netns.name());
        let host_addrs = run(Command::new("ip").args(["-o", "addr"])).unwrap();
        assert!(!host_addrs.contains(" 10.254.0.1/"), "{host_addrs}");
        assert!(netns.has_addr(vip).unwrap());

        // The upstream on the namespace's own loopback.
        let mut ropts = RegistryOpts::new(Flavour::Plain);
        ropts.netns = Some(netns.name().to_string());
        let mut up = common::upstream(Registry::start(ropts).unwrap());
        assert!(up.registry.addr().ip().is_loopback());

        // Client side: TLS on 10.254.0.1:443 only; http and admin on the
        // namespace's loopback.
        let addrs = Addrs::in_netns(SocketAddr::new(vip, 443)).unwrap();
        assert!(addrs.http.ip().is_loopback() && addrs.admin.ip().is_loopback());
        let proxy = Proxy::start_in(
            netns.name(),
            common::proxy_bin(),
            addrs,
            &common::one_registry("quay.io", &up.registry.url(), ""),
        )
        .unwrap();

        // No insecure-registries: daemon.json stays `{}`.
        let mut dopts = DockerdOpts::default().host("quay.io", vip);
        dopts.netns = Some(netns.name().to_string());
        let dockerd = Dockerd::start(dopts).unwrap();
        started.upstream_and_proxy(&up, &proxy).dockerd(&dockerd);
        let inside = netns_of(dockerd.pid());
        assert_ne!(inside, netns_of(std::process::id()));
        assert_eq!(netns_of(proxy.pid()), inside);
        assert_eq!(netns_of(up.registry.pid()), inside);
        let ready = t0.elapsed();

        // Without the CA: the certificate is refused and dockerd does not
        // fall back to anything that reaches the proxy's API.
        let err = dockerd
            .docker(["pull", QUAY_IMAGE])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("x509") || err.contains("certificate"),
            "expected a certificate error: {err}"
        );
        // The handshake did reach the proxy, which saw the client reject it.
        wait_for(
            "the proxy to log the rejected handshake",
            Duration::from_secs(10),
            || Ok(proxy.log().contains("TLS handshake refused")),
        )
        .unwrap_or_else(|e| panic!("{e}; proxy log:\n{}", proxy.log()));
        let leaked = content_requests(&proxy);
        assert!(leaked.is_empty(), "requests without trust: {leaked:#?}");
        assert_eq!(up.registry.count_requests("GET", "/v2/fixture/"), 0);

        // With the CA (re-read on every lookup: no restart, no reload).
        dockerd
            .write_ca("quay.io", &proxy.ca_pem().unwrap())
            .unwrap();
        dockerd.docker(["pull", QUAY_IMAGE]).unwrap();
        let layer = &up.busybox.layer_digests()[0];
        proxy
            .wait_access(&[
                ("kind", "tag"),
                ("reference", "1"),
                ("cache", "MISS"),
                ("via", "host"),
                ("registry", "quay.io"),
            ])
            .unwrap();
        proxy
            .wait_access(&[
                ("kind", "blob"),
                ("digest", layer),
                ("cache", "MISS"),
                ("via", "host"),
            ])
            .unwrap();
        assert_eq!(up.registry.count_requests("GET", layer), 1);
        let first = t0.elapsed();

        dockerd.docker(["rmi", QUAY_IMAGE]).unwrap();
        up.registry.stop().unwrap();
        dockerd.docker(["pull", QUAY_IMAGE]).unwrap();
        proxy
            .wait_access(&[
                ("kind", "tag"),
                ("reference", "1"),
                ("cache", "HIT"),
                ("via", "host"),
            ])
            .unwrap();
        let hits = proxy
            .wait_access(&[
                ("kind", "blob"),
                ("digest", layer),
                ("cache", "HIT"),
                ("via", "host"),
            ])
            .unwrap();
        assert_eq!(hits[0]["status"], 200);
        // dockerd's image ID is the config digest: the very image upstream had.
        let id = dockerd
            .docker(["image", "inspect", "--format", "{{.Id}}", QUAY_IMAGE])
            .unwrap();
        assert_eq!(id.trim(), up.busybox.manifests[0].config.digest);
        eprintln!(
            "dockerd dns-hijack: ready {:.1}s, first pull done {:.1}s, total {:.1}s",
            ready.as_secs_f64(),
            first.as_secs_f64(),
            t0.elapsed().as_secs_f64()
        );
    }
    started.assert_all_gone();
}

/// dockerd `registry-mirrors` (Docker Hub names only): `busybox:1` is
/// docker.io/library/busybox:1; the proxy answers the mirror's /v2/ ping
/// itself and routes the request, which names no registry, to its
/// `defaultRegistry` (via=default). Docker Hub's names resolve to a dead
/// loopback address, so a fallback past the mirror fails. The proxy is on
/// loopback, where dockerd does not verify the mirror's certificate: CA
/// trust is what `dockerd_dns_hijack_over_verified_tls_in_a_netns` proves.
#[test]
fn dockerd_registry_mirror_for_docker_hub_names() {
    let t0 = Instant::now();
    let mut started = common::Started::default();
    {
        let mut up = common::upstream_at(Registry::plain().unwrap(), "library/busybox");
        let proxy = common::proxy_for_docker_hub(&up, "");
        let dead = dead_loopback();
        let dockerd = common::dockerd_mirroring_docker_hub_to(&proxy, dead);
        started.upstream_and_proxy(&up, &proxy).dockerd(&dockerd);
        let ready = t0.elapsed();

        dockerd.docker(["pull", "busybox:1"]).unwrap();
        proxy
            .wait_access(&[("kind", "ping"), ("status", "200")])
            .unwrap();
        let layer = &up.busybox.layer_digests()[0];
        proxy
            .wait_access(&[
                ("kind", "tag"),
                ("repository", "library/busybox"),
                ("reference", "1"),
                ("cache", "MISS"),
                ("via", "default"),
                ("registry", "docker.io"),
            ])
            .unwrap();
        proxy
            .wait_access(&[
                ("kind", "blob"),
                ("digest", layer),
                ("cache", "MISS"),
                ("via", "default"),
            ])
            .unwrap();
        assert_eq!(up.registry.count_requests("GET", layer), 1);
        let first = t0.elapsed();

        dockerd.docker(["rmi", "busybox:1"]).unwrap();
        up.registry.stop().unwrap();
        dockerd.docker(["pull", "busybox:1"]).unwrap();
        proxy
            .wait_access(&[
                ("kind", "tag"),
                ("repository", "library/busybox"),
                ("reference", "1"),
                ("cache", "HIT"),
                ("via", "default"),
            ])
            .unwrap();
        proxy
            .wait_access(&[
                ("kind", "blob"),
                ("digest", layer),
                ("cache", "HIT"),
                ("via", "default"),
            ])
            .unwrap();
        let id = dockerd
            .docker(["image", "inspect", "--format", "{{.Id}}", "busybox:1"])
            .unwrap();
        assert_eq!(id.trim(), up.busybox.manifests[0].config.digest);
        eprintln!(
            "dockerd registry-mirrors: ready {:.1}s, first pull done {:.1}s, total {:.1}s",
            ready.as_secs_f64(),
            first.as_secs_f64(),
            t0.elapsed().as_secs_f64()
        );
    }
    started.assert_all_gone();
}

/// podman (containers/image, CRI-O's client library) with a path-prefix
/// mirror from `registries.conf.d`: requests go to
/// `https://<proxy>/v2/quay.io/...` (via=path), verified with the proxy CA
/// from `certs.d/<host:port>/`; quay.io itself resolves to a dead loopback
/// address, so only the mirror can serve the pull.
#[test]
fn podman_path_prefix_mirror_from_registries_conf_d() {
    let t0 = Instant::now();
    let mut started = common::Started::default();
    {
        let mut up = common::upstream(Registry::plain().unwrap());
        let proxy = common::proxy_for(&up);
        let podman = Podman::new(PodmanOpts::default().host("quay.io", dead_loopback())).unwrap();
        let mirror = proxy.addrs.https.to_string();
        podman.write_ca(&mirror, &proxy.ca_pem().unwrap()).unwrap();
        podman
            .write_registries_conf(
                "50-pullthrough.conf",
                &format!(
                    "[[registry]]\nprefix = \"quay.io\"\nlocation = \"quay.io\"\n\n\
                     [[registry.mirror]]\nlocation = \"{mirror}/quay.io\"\n"
                ),
            )
            .unwrap();
        started.upstream_and_proxy(&up, &proxy).dir(podman.dir());

        podman.podman(["pull", "-q", QUAY_IMAGE]).unwrap();
        let layer = &up.busybox.layer_digests()[0];
        proxy
            .wait_access(&[
                ("kind", "tag"),
                ("repository", "fixture/busybox"),
                ("reference", "1"),
                ("cache", "MISS"),
                ("via", "path"),
                ("registry", "quay.io"),
            ])
            .unwrap();
        proxy
            .wait_access(&[
                ("kind", "blob"),
                ("digest", layer),
                ("cache", "MISS"),
                ("via", "path"),
            ])
            .unwrap();
        assert_eq!(up.registry.count_requests("GET", layer), 1);
        let first = t0.elapsed();

        podman.podman(["rmi", QUAY_IMAGE]).unwrap();
        up.registry.stop().unwrap();
        podman.podman(["pull", "-q", QUAY_IMAGE]).unwrap();
        proxy
            .wait_access(&[
                ("kind", "tag"),
                ("reference", "1"),
                ("cache", "HIT"),
                ("via", "path"),
            ])
            .unwrap();
        proxy
            .wait_access(&[
                ("kind", "blob"),
                ("digest", layer),
                ("cache", "HIT"),
                ("via", "path"),
            ])
            .unwrap();
        // podman's image ID is the config digest's hex.
        let id = podman
            .podman(["image", "inspect", "--format", "{{.Id}}", QUAY_IMAGE])
            .unwrap();
        assert_eq!(
            format!("sha256:{}", id.trim()),
            up.busybox.manifests[0].config.digest
        );
        eprintln!(
            "podman path-prefix mirror: first pull done {:.1}s, total {:.1}s",
            first.as_secs_f64(),
            t0.elapsed().as_secs_f64()
        );
    }
    started.assert_all_gone();
}

/// podman (containers/image, as CRI-O) in DNS-hijack mode keeps pulling a
/// cached image while the upstream is down: its `/v2/` version check, which
/// it insists on, is answered by the proxy (STALE) instead of failing.
#[test]
fn podman_dns_hijack_keeps_pulling_from_cache_during_an_outage() {
    let mut started = common::Started::default();
    {
        let mut up = common::upstream(Registry::plain().unwrap());
        let ip = IpAddr::V4(pullthrough_testbed::net::unique_loopback_ip());
        let proxy = Proxy::start(
            common::proxy_bin(),
            Addrs::on(ip, Some(443)).unwrap(),
            &common::one_registry("quay.io", &up.registry.url(), ""),
        )
        .unwrap();
        let podman = Podman::new(PodmanOpts::default().host("quay.io", ip)).unwrap();
        podman
            .write_ca("quay.io", &proxy.ca_pem().unwrap())
            .unwrap();
        started.upstream_and_proxy(&up, &proxy).dir(podman.dir());

        podman.podman(["pull", "-q", QUAY_IMAGE]).unwrap();
        let layer = &up.busybox.layer_digests()[0];
        proxy
            .wait_access(&[
                ("kind", "blob"),
                ("digest", layer),
                ("cache", "MISS"),
                ("via", "host"),
            ])
            .unwrap();

        podman.podman(["rmi", QUAY_IMAGE]).unwrap();
        up.registry.stop().unwrap();
        podman.podman(["pull", "-q", QUAY_IMAGE]).unwrap();
        proxy
            .wait_access(&[("kind", "ping"), ("cache", "STALE"), ("status", "200")])
            .unwrap();
        proxy
            .wait_access(&[
                ("kind", "blob"),
                ("digest", layer),
                ("cache", "HIT"),
                ("via", "host"),
            ])
            .unwrap();
    }
    started.assert_all_gone();
}

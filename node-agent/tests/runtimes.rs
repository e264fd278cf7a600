//! `pullthrough-agent apply` / `revert` against real runtimes, the agent
//! writing into each runtime's own config root (the test's `--root`):
//! containerd's CRI pulls, dockerd (DNS hijack over verified TLS in a
//! network namespace of the test's own, and `registry-mirrors` for Docker
//! Hub names) and podman (the path-prefix drop-in) go through the proxy
//! after `apply`; after `revert` every file under the root is
//! byte-identical to before and the runtime pulls straight from the
//! upstream again (no new proxy access line). Every name a runtime could
//! resolve to a public registry maps to a test address; every server is on
//! loopback or inside the test's network namespace.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use common::{QUAY_IMAGE, agent, assert_all_gone, assert_same_tree, snapshot};
use pullthrough_testbed::containerd::{Containerd, ContainerdOpts};
use pullthrough_testbed::dockerd::{Dockerd, DockerdOpts};
use pullthrough_testbed::ns::NetNs;
use pullthrough_testbed::podman::{Podman, PodmanOpts};
use pullthrough_testbed::proxy::{Addrs, Proxy};
use pullthrough_testbed::registry::{Flavour, Registry, RegistryOpts};

fn content_lines(proxy: &Proxy) -> usize {
    proxy
        .access_lines()
        .iter()
        .filter(|l| matches!(l["kind"].as_str(), Some("tag" | "manifest" | "blob")))
        .count()
}

/// containerd with the CRI plugin (the kubelet's path): the agent writes
/// `certs.d/quay.io/hosts.toml` under the root (containerd already has
/// `config_path`, so config.toml stays untouched and nothing restarts), and
/// `crictl pull` goes through the proxy (via=ns). The admin's own
/// hosts.toml for quay.io (straight to the upstream) gets the proxy as its
/// first host, theirs kept after it, and `revert` brings it back byte for
/// byte: the next pull is direct.
#[test]
fn containerd_cri_pulls_through_the_proxy_until_revert() {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let mut dirs = vec![tmp.path().to_path_buf()];
    {
        let (up, proxy) = common::quay_behind_proxy();
        let mut copts = ContainerdOpts::default().host("quay.io", common::dead_loopback());
        copts.host_root = Some(root.clone());
        let containerd = Containerd::start(copts).unwrap();
        dirs.extend([
            up.registry.dir().to_path_buf(),
            proxy.dir().to_path_buf(),
            containerd.dir().to_path_buf(),
        ]);
        assert_eq!(
            containerd.certs_d(),
            root.join("etc/containerd/certs.d"),
            "containerd's config root is the agent's"
        );
        // The admin's mirror config: quay.io straight from the upstream.
        let admin = format!(
            "server = \"{u}\"\n\n[host.\"{u}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            u = up.registry.url()
        );
        containerd.write_hosts_toml("quay.io", &admin).unwrap();
        // Every host has /run, where the node lock lives.
        fs::create_dir_all(root.join("run")).unwrap();
        let before = snapshot(&root);

        let config = common::write_agent_config(
            &tmp.path().join("conf"),
            &format!(
                "proxy:\n  address: 127.0.0.1\n  httpsPort: {}\n  caFile: ca.crt\n\
                 registries:\n  - host: quay.io\n    upstream: {}\n",
                proxy.addrs.https.port(),
                up.registry.url()
            ),
            Some(&proxy.ca_pem().unwrap()),
        );
        let r = root.to_str().unwrap();
        let c = config.to_str().unwrap();
        let out = agent(
            &root,
            None,
            &[
                "apply",
                "--root",
                r,
                "--config",
                c,
                "--runtime",
                "containerd",
            ],
        );
        assert!(!out.contains("restart"), "no restart needed: {out}");
        let hosts_toml =
            fs::read_to_string(root.join("etc/containerd/certs.d/quay.io/hosts.toml")).unwrap();
        let ours = hosts_toml
            .find(&format!("https://127.0.0.1:{}", proxy.addrs.https.port()))
            .unwrap_or_else(|| panic!("{hosts_toml}"));
        let theirs = hosts_toml
            .find(&format!("[host.\"{}\"]", up.registry.url()))
            .unwrap_or_else(|| panic!("the admin's host is kept: {hosts_toml}"));
        assert!(ours < theirs, "{hosts_toml}");
        assert_eq!(
            fs::read(root.join("etc/containerd/config.toml")).unwrap(),
            before[std::path::Path::new("etc/containerd/config.toml")]
                .0
                .clone()
                .unwrap()
        );
        let applied = t0.elapsed();

        containerd.crictl(["pull", QUAY_IMAGE]).unwrap();
        let layer = &up.busybox.layer_digests()[0];
        proxy
            .wait_access(&[
                ("kind", "blob"),
                ("digest", layer),
                ("via", "ns"),
                ("registry", "quay.io"),
            ])
            .unwrap();
        proxy
            .wait_access(&[("kind", "tag"), ("reference", "1"), ("via", "ns")])
            .unwrap();
        let pulled = t0.elapsed();

        let out = agent(&root, None, &["revert", "--root", r]);
        assert_same_tree(&before, &snapshot(&root));
        containerd.crictl(["rmi", QUAY_IMAGE]).unwrap();
        let seen = content_lines(&proxy);
        let upstream_before = up.registry.count_requests("GET", layer);
        containerd.crictl(["pull", QUAY_IMAGE]).unwrap();
        assert_eq!(
            up.registry.count_requests("GET", layer),
            upstream_before + 1,
            "direct pull after revert ({out})"
        );
        assert_eq!(content_lines(&proxy), seen, "the proxy saw the direct pull");
        eprintln!(
            "containerd: applied {:.1}s, pulled through proxy {:.1}s, total {:.1}s",
            applied.as_secs_f64(),
            pulled.as_secs_f64(),
            t0.elapsed().as_secs_f64()
        );
    }
    assert_all_gone(&dirs, &[]);
}

/// dockerd in a network namespace of the test's own, where 10.254.0.1:443
/// is the proxy (TLS only) and 10.254.0.2:443 the "real" quay.io (the
/// upstream, TLS with a test CA the admin put in `certs.d/quay.io/ca.crt`).
/// Names resolving there are not loopback, so dockerd verifies
/// certificates. `apply` writes the `/etc/hosts` block, the proxy CA into
/// `certs.d` and `registry-mirrors` into daemon.json (no
/// insecure-registries) and SIGHUPs dockerd through its pid file under the
/// root; `docker pull quay.io/...` then goes through the proxy (via=host)
/// and `docker pull busybox:1` through the mirror (via=default). `revert`
/// restores every byte; with quay.io then resolving to the upstream (the
/// admin's DNS, written after the snapshot check), the pull is direct.
#[test]
fn dockerd_hijack_and_mirror_over_verified_tls_until_revert() {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let mut dirs = vec![tmp.path().to_path_buf()];
    let mut netns_names = Vec::new();
    {
        let vip: IpAddr = "10.254.0.1".parse().unwrap();
        let upip: IpAddr = "10.254.0.2".parse().unwrap();
        let netns = NetNs::create(&[vip, upip]).unwrap();
        netns_names.push(netns.name().to_string());
        let mut ropts = RegistryOpts::new(Flavour::Tls);
        ropts.netns = Some(netns.name().to_string());
        ropts.ip = upip;
        ropts.port = Some(443);
        ropts.tls_names = vec!["quay.io".into()];
        let up = common::upstream(
            Registry::start(ropts).unwrap(),
            &["fixture/busybox", "library/busybox"],
        );
        let proxy = Proxy::start_in(
            netns.name(),
            common::proxy_bin(),
            Addrs::in_netns(SocketAddr::new(vip, 443)).unwrap(),
            &format!(
                "defaultRegistry: docker.io\nregistries:\n\
                 - host: docker.io\n  upstream: {u}\n  caBundle: {ca}\n\
                 - host: quay.io\n  upstream: {u}\n  caBundle: {ca}\n",
                u = up.registry.url(),
                ca = up.registry.ca_path().unwrap().display()
            ),
        )
        .unwrap();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let mut dopts = DockerdOpts::default();
        for name in [
            "registry-1.docker.io",
            "index.docker.io",
            "auth.docker.io",
            "docker.io",
        ] {
            dopts = dopts.host(name, lo);
        }
        dopts.netns = Some(netns.name().to_string());
        dopts.host_root = Some(root.clone());
        dopts.daemon_json =
            Some(serde_json::json!({"debug": false, "max-concurrent-downloads": 3}));
        let dockerd = Dockerd::start(dopts).unwrap();
        dirs.extend([
            up.registry.dir().to_path_buf(),
            proxy.dir().to_path_buf(),
            dockerd.dir().to_path_buf(),
        ]);
        assert_eq!(dockerd.etc_docker(), root.join("etc/docker"));
        // The admin trusts the real quay.io's CA (as a node trusts the
        // public one).
        dockerd
            .write_ca("quay.io", up.registry.ca_pem().unwrap())
            .unwrap();
        // Every host has /run, where the node lock lives.
        fs::create_dir_all(root.join("run")).unwrap();
        let before = snapshot(&root);
        let hosts_before = fs::read_to_string(root.join("etc/hosts")).unwrap();

        let config = common::write_agent_config(
            &tmp.path().join("conf"),
            "proxy:\n  address: 10.254.0.1\n  caFile: ca.crt\n\
             registries:\n  - host: docker.io\n  - host: quay.io\n",
            Some(&proxy.ca_pem().unwrap()),
        );
        let r = root.to_str().unwrap();
        let c = config.to_str().unwrap();
        let reloads = dockerd.log().matches("Reloaded configuration").count();
        let out = agent(
            &root,
            None,
            &["apply", "--root", r, "--config", c, "--runtime", "docker"],
        );
        assert!(out.contains("SIGHUP"), "{out}");
        common::wait(
            "dockerd to reload",
            std::time::Duration::from_secs(20),
            || dockerd.log().matches("Reloaded configuration").count() > reloads,
        );
        let hosts = fs::read_to_string(root.join("etc/hosts")).unwrap();
        assert!(hosts.starts_with(&hosts_before), "{hosts}");
        assert!(hosts.contains("10.254.0.1\tquay.io"), "{hosts}");
        let dj: serde_json::Value =
            serde_json::from_slice(&fs::read(root.join("etc/docker/daemon.json")).unwrap())
                .unwrap();
        assert_eq!(dj["registry-mirrors"][0], "https://10.254.0.1");
        assert!(dj.get("insecure-registries").is_none(), "{dj}");
        assert!(
            root.join("etc/docker/certs.d/quay.io/pullthrough-ca.crt")
                .is_file()
        );
        let applied = t0.elapsed();

        common::pull_retrying(|| dockerd.docker(["pull", QUAY_IMAGE]));
        let layer = &up.busybox.layer_digests()[0];
        proxy
            .wait_access(&[
                ("kind", "blob"),
                ("digest", layer),
                ("via", "host"),
                ("registry", "quay.io"),
            ])
            .unwrap();
        dockerd.docker(["pull", "busybox:1"]).unwrap();
        proxy
            .wait_access(&[
                ("kind", "tag"),
                ("repository", "library/busybox"),
                ("via", "default"),
                ("registry", "docker.io"),
            ])
            .unwrap();
        let pulled = t0.elapsed();

        agent(
            &root,
            None,
            &["revert", "--root", r, "--reload-settle", "2s"],
        );
        assert_same_tree(&before, &snapshot(&root));

        // Direct again: quay.io resolves to the real one (appended by the
        // admin's DNS, in place: dockerd's /etc/hosts is a bind mount).
        common::write_in_place(
            &root.join("etc/hosts"),
            format!("{hosts_before}{upip} quay.io\n").as_bytes(),
        );
        dockerd.docker(["rmi", QUAY_IMAGE]).unwrap();
        let seen = content_lines(&proxy);
        let manifest_requests = || {
            up.registry
                .count_requests("GET", "/v2/fixture/busybox/manifests/")
                + up.registry
                    .count_requests("HEAD", "/v2/fixture/busybox/manifests/")
        };
        let direct = manifest_requests();
        common::pull_retrying(|| dockerd.docker(["pull", QUAY_IMAGE]));
        assert!(
            manifest_requests() > direct,
            "upstream log:\n{}",
            up.registry.log()
        );
        assert_eq!(content_lines(&proxy), seen, "the proxy saw the direct pull");
        eprintln!(
            "dockerd: applied {:.1}s, both pulls through proxy {:.1}s, total {:.1}s",
            applied.as_secs_f64(),
            pulled.as_secs_f64(),
            t0.elapsed().as_secs_f64()
        );
    }
    assert_all_gone(&dirs, &netns_names);
}

/// `apply --runtime crio` under `root` for one registry `host` (upstream
/// `upstream`) behind `proxy`, its config written under `tmp`; the
/// agent's drop-in.
fn apply_crio(
    root: &std::path::Path,
    tmp: &std::path::Path,
    proxy: &Proxy,
    host: &str,
    upstream: &str,
) -> String {
    let config = common::write_agent_config(
        &tmp.join("conf"),
        &format!(
            "proxy:\n  address: 127.0.0.1\n  httpsPort: {}\n  caFile: ca.crt\n\
             registries:\n  - host: {host}\n    upstream: {upstream}\n",
            proxy.addrs.https.port(),
        ),
        Some(&proxy.ca_pem().unwrap()),
    );
    let (r, c) = (root.to_str().unwrap(), config.to_str().unwrap());
    agent(
        root,
        None,
        &["apply", "--root", r, "--config", c, "--runtime", "crio"],
    );
    fs::read_to_string(root.join("etc/containers/registries.conf.d/50-pullthrough.conf")).unwrap()
}

/// podman (containers/image, as CRI-O): the agent's drop-in
/// `registries.conf.d/50-pullthrough.conf` replaces the admin's own entry
/// for quay.io (straight to the upstream, `10-local.conf`), keeping its
/// location and `insecure`, with a path-prefix mirror on the proxy first
/// (via=path), verified with the CA the
/// agent put in `certs.d/<proxy>/`. After `revert` the admin's entry is in
/// force again: a direct pull.
#[test]
fn podman_pulls_through_the_path_prefix_drop_in_until_revert() {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let mut dirs = vec![tmp.path().to_path_buf()];
    {
        let (up, proxy) = common::quay_behind_proxy();
        let mut popts = PodmanOpts::default().host("quay.io", common::dead_loopback());
        popts.host_root = Some(root.clone());
        let podman = Podman::new(popts).unwrap();
        dirs.extend([
            up.registry.dir().to_path_buf(),
            proxy.dir().to_path_buf(),
            podman.dir().to_path_buf(),
        ]);
        assert_eq!(podman.etc_containers(), root.join("etc/containers"));
        podman
            .write_registries_conf(
                "10-local.conf",
                &format!(
                    "[[registry]]\nprefix = \"quay.io\"\nlocation = \"{}\"\ninsecure = true\n",
                    up.registry.addr()
                ),
            )
            .unwrap();
        // Every host has /run, where the node lock lives.
        fs::create_dir_all(root.join("run")).unwrap();
        let before = snapshot(&root);

        let drop_in = apply_crio(&root, tmp.path(), &proxy, "quay.io", &up.registry.url());
        let r = root.to_str().unwrap();
        assert!(
            drop_in.contains(&format!("location = \"{}\"", up.registry.addr())),
            "the admin's location is kept: {drop_in}"
        );
        let applied = t0.elapsed();

        podman.podman(["pull", "-q", QUAY_IMAGE]).unwrap();
        let layer = &up.busybox.layer_digests()[0];
        proxy
            .wait_access(&[
                ("kind", "blob"),
                ("digest", layer),
                ("via", "path"),
                ("registry", "quay.io"),
            ])
            .unwrap();
        let pulled = t0.elapsed();

        agent(&root, None, &["revert", "--root", r]);
        // Not the agent's: podman's own network lock (the test bed keeps
        // podman's network config dir under /etc/containers).
        let _ = fs::remove_file(root.join("etc/containers/networks/cni.lock"));
        assert_same_tree(&before, &snapshot(&root));
        podman.podman(["rmi", QUAY_IMAGE]).unwrap();
        let seen = content_lines(&proxy);
        let direct = up.registry.count_requests("GET", layer);
        podman.podman(["pull", "-q", QUAY_IMAGE]).unwrap();
        assert_eq!(up.registry.count_requests("GET", layer), direct + 1);
        assert_eq!(content_lines(&proxy), seen, "the proxy saw the direct pull");
        eprintln!(
            "podman: applied {:.1}s, pulled through proxy {:.1}s, total {:.1}s",
            applied.as_secs_f64(),
            pulled.as_secs_f64(),
            t0.elapsed().as_secs_f64()
        );
    }
    assert_all_gone(&dirs, &[]);
}

/// podman (containers/image, as CRI-O) pulls from a registry whose name
/// has a port through the agent's drop-in. The mirror location names it
/// `<proxy>/registry.test_5999`: with the name as it is
/// (`<proxy>/registry.test:5999`) the mirror's reference is no reference,
/// and containers/image failed the whole pull, the registry itself
/// untried. Nothing listens on the name's own address, so only the
/// mirror can serve it.
#[test]
fn podman_pulls_a_registry_named_with_a_port_through_the_drop_in() {
    const NAME: &str = "registry.test:5999";
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let mut dirs = vec![tmp.path().to_path_buf()];
    {
        let up = common::upstream(Registry::plain().unwrap(), &["fixture/busybox"]);
        let proxy = Proxy::start(
            common::proxy_bin(),
            Addrs::localhost().unwrap(),
            &format!(
                "registries:\n  - host: {NAME}\n    upstream: {}\n",
                up.registry.url()
            ),
        )
        .unwrap();
        let dead = common::dead_loopback();
        assert!(!pullthrough_testbed::net::is_listening(SocketAddr::new(
            dead, 5999
        )));
        let mut popts = PodmanOpts::default().host("registry.test", dead);
        popts.host_root = Some(root.clone());
        let podman = Podman::new(popts).unwrap();
        dirs.extend([
            up.registry.dir().to_path_buf(),
            proxy.dir().to_path_buf(),
            podman.dir().to_path_buf(),
        ]);
        fs::create_dir_all(root.join("run")).unwrap();
        let drop_in = apply_crio(&root, tmp.path(), &proxy, NAME, &up.registry.url());
        let r = root.to_str().unwrap();
        assert!(drop_in.contains("/registry.test_5999\""), "{drop_in}");

        podman
            .podman(["pull", "-q", &format!("{NAME}/fixture/busybox:1")])
            .unwrap();
        proxy
            .wait_access(&[
                ("kind", "blob"),
                ("digest", &up.busybox.layer_digests()[0]),
                ("via", "path"),
                ("registry", NAME),
            ])
            .unwrap();
        agent(&root, None, &["revert", "--root", r]);
    }
    assert_all_gone(&dirs, &[]);
}

//! Smoke tests: each container runtime starts in its private namespaces,
//! resolves a public registry name to the test's registry through the
//! test-owned hosts file and mirror config, and really pulls (and where the
//! sandbox allows, runs) the busybox fixture.

// Test code: a broken fixture should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::{Duration, Instant};

use pullthrough_testbed::containerd::{Containerd, ContainerdOpts};
use pullthrough_testbed::dockerd::{Dockerd, DockerdOpts};
use pullthrough_testbed::fixtures::{Image, LayoutBuilder};
use pullthrough_testbed::net::{assert_loopback, unique_loopback_ip};
use pullthrough_testbed::ns::NetNs;
use pullthrough_testbed::podman::{Podman, PodmanOpts};
use pullthrough_testbed::process::{Process, run};
use pullthrough_testbed::registry::{Flavour, Registry, RegistryOpts};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Builds the busybox fixture and pushes it to `reg` as `repo:1`.
fn push_busybox(reg: &Registry, repo: &str) -> (tempfile::TempDir, Image) {
    let work = tempfile::tempdir().unwrap();
    let image = LayoutBuilder::new(&work.path().join("layout"))
        .unwrap()
        .busybox("busybox")
        .unwrap();
    image.push(reg, repo, "1").unwrap();
    (work, image)
}

#[test]
fn containerd_pulls_through_hosts_toml_with_crictl_and_ctr() {
    let t0 = Instant::now();
    let reg = Registry::plain().unwrap();
    assert_loopback(reg.addr()).unwrap();
    let (_work, image) = push_busybox(&reg, "fixture/busybox");

    let ctd = Containerd::start(ContainerdOpts::default().host("quay.io", LOCALHOST)).unwrap();
    let started = t0.elapsed();
    // No hosts.toml yet: containerd goes to quay.io itself, which the hosts
    // file sends to 127.0.0.1:443, where nothing listens.
    let err = ctd
        .crictl(["pull", "quay.io/fixture/busybox:1"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("127.0.0.1:443"), "{err}");
    let host = reg.host();
    ctd.write_hosts_toml(
        "quay.io",
        &format!(
            "server = \"http://{host}\"\n\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )
    .unwrap();

    // CRI pull: containerd resolves through certs.d/quay.io/hosts.toml.
    let manifest_path = "/v2/fixture/busybox/manifests/1";
    assert_eq!(reg.count_requests("GET", manifest_path), 0);
    assert_eq!(reg.count_requests("HEAD", manifest_path), 0);
    let out = ctd.crictl(["pull", "quay.io/fixture/busybox:1"]).unwrap();
    assert!(out.contains("Image is up to date"), "crictl pull: {out}");
    let resolved =
        reg.count_requests("GET", manifest_path) + reg.count_requests("HEAD", manifest_path);
    assert!(
        resolved >= 1,
        "the registry never saw the tag resolved:\n{}",
        reg.log()
    );
    // containerd resolves the tag with HEAD, then GETs the manifest by digest.
    assert_eq!(
        reg.count_requests(
            "GET",
            &format!("/v2/fixture/busybox/manifests/{}", image.digest)
        ),
        1,
        "no manifest GET reached the registry:\n{}",
        reg.log()
    );
    for layer in image.layer_digests() {
        assert_eq!(reg.count_requests("GET", &layer), 1, "layer {layer}");
    }
    let images = ctd.crictl(["images", "-o", "json"]).unwrap();
    let images: serde_json::Value = serde_json::from_str(&images).unwrap();
    let listed = images["images"].as_array().unwrap().iter().any(|i| {
        i["repoTags"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t == "quay.io/fixture/busybox:1"))
    });
    assert!(listed, "crictl images does not list it: {images}");
    let crictl_done = t0.elapsed();

    // ctr pulls in the client, with the same hosts dir, into containerd
    // namespace "default" (CRI uses "k8s.io"). Blobs are shared between
    // namespaces, so ctr only resolves the tag again: that must reach the
    // registry.
    let certs_d = ctd.certs_d();
    let tag_requests =
        || reg.count_requests("GET", manifest_path) + reg.count_requests("HEAD", manifest_path);
    let before = tag_requests();
    ctd.ctr([
        "image".as_ref(),
        "pull".as_ref(),
        "--hosts-dir".as_ref(),
        certs_d.as_os_str(),
        "quay.io/fixture/busybox:1".as_ref(),
    ])
    .unwrap();
    assert!(
        tag_requests() > before,
        "ctr did not resolve the tag at the registry:\n{}",
        reg.log()
    );
    let list = ctd.ctr(["image", "ls", "-q"]).unwrap();
    assert!(
        list.lines().any(|l| l == "quay.io/fixture/busybox:1"),
        "{list}"
    );

    // And the image runs (runc, cgroup v1, overlayfs).
    let out = ctd
        .ctr([
            "run",
            "--rm",
            "quay.io/fixture/busybox:1",
            "smoke-echo",
            "echo",
            "hello",
        ])
        .unwrap();
    assert_eq!(out.trim(), "hello");
    eprintln!(
        "containerd: started {:.1}s, crictl pull {:.1}s, total {:.1}s",
        started.as_secs_f64(),
        (crictl_done - started).as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn dockerd_pulls_from_a_hijacked_name_and_reloads() {
    let t0 = Instant::now();
    let ip = IpAddr::V4(unique_loopback_ip());
    let mut opts = RegistryOpts::new(Flavour::Tls);
    opts.ip = ip;
    opts.port = Some(443);
    opts.tls_names = vec!["quay.io".into()];
    let reg = Registry::start(opts).unwrap();
    assert_loopback(reg.addr()).unwrap();
    let (_work, image) = push_busybox(&reg, "fixture/busybox");

    let mut dockerd = Dockerd::start(DockerdOpts::default().host("quay.io", ip)).unwrap();
    let started = t0.elapsed();
    let ca = dockerd.write_ca("quay.io", reg.ca_pem().unwrap()).unwrap();
    assert!(ca.starts_with(dockerd.dir()));

    let manifest_path = "/v2/fixture/busybox/manifests/1";
    dockerd
        .docker(["pull", "quay.io/fixture/busybox:1"])
        .unwrap();
    // dockerd resolves the tag with HEAD, then GETs the manifest by digest.
    assert!(
        reg.count_requests("HEAD", manifest_path) + reg.count_requests("GET", manifest_path) >= 1,
        "dockerd never resolved the tag at the registry:\n{}",
        reg.log()
    );
    assert_eq!(
        reg.count_requests(
            "GET",
            &format!("/v2/fixture/busybox/manifests/{}", image.digest)
        ),
        1
    );
    for layer in image.layer_digests() {
        assert_eq!(reg.count_requests("GET", &layer), 1, "layer {layer}");
    }
    let id = dockerd
        .docker([
            "image",
            "inspect",
            "--format",
            "{{index .RepoDigests 0}}",
            "quay.io/fixture/busybox:1",
        ])
        .unwrap();
    assert_eq!(
        id.trim(),
        format!("quay.io/fixture/busybox@{}", image.digest)
    );
    let pulled = t0.elapsed();

    // The image runs (runc via dockerd's own containerd, vfs, no network).
    let out = dockerd
        .docker([
            "run",
            "--rm",
            "--network",
            "none",
            "quay.io/fixture/busybox:1",
            "echo",
            "hello",
        ])
        .unwrap();
    assert_eq!(out.trim(), "hello");

    // SIGHUP reloads daemon.json: a mirror appears in `docker info`.
    std::fs::write(
        dockerd.daemon_json_path(),
        r#"{"registry-mirrors": ["https://mirror.invalid"]}"#,
    )
    .unwrap();
    dockerd.reload().unwrap();
    let mirrors = dockerd
        .docker(["info", "--format", "{{json .RegistryConfig.Mirrors}}"])
        .unwrap();
    assert!(mirrors.contains("https://mirror.invalid/"), "{mirrors}");
    eprintln!(
        "dockerd: started {:.1}s, pulled {:.1}s, total {:.1}s",
        started.as_secs_f64(),
        pulled.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn podman_pulls_through_a_path_prefix_mirror() {
    let t0 = Instant::now();
    let reg = Registry::tls().unwrap();
    assert_loopback(reg.addr()).unwrap();
    // A path-prefix mirror: podman asks for /v2/mirror/fixture/busybox/...
    let (_work, image) = push_busybox(&reg, "mirror/fixture/busybox");

    let podman = Podman::new(PodmanOpts::default().host("quay.io", LOCALHOST)).unwrap();
    let host = reg.host();
    podman
        .write_registries_conf(
            "50-pullthrough.conf",
            &format!(
                "[[registry]]\nprefix = \"quay.io\"\nlocation = \"quay.io\"\n\n[[registry.mirror]]\nlocation = \"{host}/mirror\"\n"
            ),
        )
        .unwrap();

    // Without the CA in certs.d the mirror's certificate is refused (and
    // quay.io itself, 127.0.0.1:443 here, refuses the connection).
    let err = podman
        .podman(["pull", "-q", "quay.io/fixture/busybox:1"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("certificate"), "{err}");
    assert_eq!(reg.count_requests("GET", "/v2/mirror/"), 0);

    podman.write_ca(&host, reg.ca_pem().unwrap()).unwrap();
    podman
        .podman(["pull", "-q", "quay.io/fixture/busybox:1"])
        .unwrap();
    assert!(
        reg.count_requests("GET", "/v2/mirror/fixture/busybox/manifests/1") >= 1,
        "podman never asked the mirror for the tag:\n{}",
        reg.log()
    );
    for layer in image.layer_digests() {
        assert_eq!(
            reg.count_requests("GET", &format!("/v2/mirror/fixture/busybox/blobs/{layer}")),
            1
        );
    }
    let digest = podman
        .podman([
            "image",
            "inspect",
            "--format",
            "{{.Digest}}",
            "quay.io/fixture/busybox:1",
        ])
        .unwrap();
    assert_eq!(digest.trim(), image.digest);
    let pulled = t0.elapsed();

    let out = podman
        .podman([
            "run",
            "--rm",
            "--network",
            "none",
            "quay.io/fixture/busybox:1",
            "echo",
            "hello",
        ])
        .unwrap();
    assert_eq!(out.trim(), "hello");
    eprintln!(
        "podman: pulled {:.1}s, total {:.1}s",
        pulled.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}

/// The setup for DNS-hijack tests that must prove CA trust: dockerd and the
/// registry share a network namespace whose address 10.254.0.1 exists
/// nowhere else, so dockerd's "loopback is insecure" rule does not apply and
/// a pull succeeds only over TLS verified with `/etc/docker/certs.d`.
#[test]
fn dockerd_in_a_netns_trusts_certs_d_and_nothing_else() {
    let t0 = Instant::now();
    let vip: IpAddr = "10.254.0.1".parse().unwrap();
    // Push on loopback, then serve the same storage inside the namespace.
    let mut opts = RegistryOpts::new(Flavour::Tls);
    opts.tls_names = vec!["quay.io".into()];
    let mut reg = Registry::start(opts).unwrap();
    assert_loopback(reg.addr()).unwrap();
    let (work, image) = push_busybox(&reg, "fixture/busybox");
    reg.stop().unwrap();

    let netns = NetNs::create(&[vip]).unwrap();
    let host_addrs = run(Command::new("ip").args(["-o", "addr"])).unwrap();
    assert!(!host_addrs.contains("10.254.0.1"), "{host_addrs}");
    let config = std::fs::read_to_string(reg.dir().join("config.yml"))
        .unwrap()
        .replace(&format!("addr: {}", reg.addr()), "addr: 10.254.0.1:443");
    let config_path = work.path().join("netns-registry.yml");
    std::fs::write(&config_path, config).unwrap();
    let log = reg.dir().join("registry.log"); // so reg.count_requests sees it
    let mut served = Process::spawn(
        "docker-registry (netns)",
        netns.command(
            "docker-registry",
            [std::ffi::OsStr::new("serve"), config_path.as_os_str()],
        ),
        &log,
    )
    .unwrap();
    served
        .wait_ready(
            "registry listening in the netns",
            Duration::from_secs(30),
            || {
                Ok(std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains("listening on 10.254.0.1:443"))
            },
        )
        .unwrap();

    let mut dopts = DockerdOpts::default().host("quay.io", vip);
    dopts.netns = Some(netns.name().to_string());
    let dockerd = Dockerd::start(dopts).unwrap();
    let net_of = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    assert_eq!(net_of(dockerd.pid()), net_of(served.pid()));
    assert_ne!(net_of(dockerd.pid()), net_of(std::process::id()));

    // No CA yet: verified TLS fails, and there is no HTTP fallback.
    let err = dockerd
        .docker(["pull", "quay.io/fixture/busybox:1"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("certificate"), "{err}");
    assert_eq!(reg.count_requests("GET", "/v2/fixture/"), 0);

    dockerd.write_ca("quay.io", reg.ca_pem().unwrap()).unwrap();
    dockerd
        .docker(["pull", "quay.io/fixture/busybox:1"])
        .unwrap();
    assert_eq!(
        reg.count_requests(
            "GET",
            &format!("/v2/fixture/busybox/manifests/{}", image.digest)
        ),
        1,
        "{}",
        reg.log()
    );
    eprintln!("dockerd in netns: total {:.1}s", t0.elapsed().as_secs_f64());
}

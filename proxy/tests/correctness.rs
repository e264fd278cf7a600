//! Correctness of the proxy against real components: credentials relayed,
//! redirects followed without leaking them, corrupt upstream bytes never
//! cached or served whole, unconfigured names refused, hostile paths
//! refused without touching the disk, ranges, HEAD without GETs, push
//! gating, config validation and live reload, anonymous tokens, HTTP/2.
//!
//! Upstreams are the real `docker-registry` where it can show the
//! behaviour, and the test bed's scriptable stub (redirect chains, corrupt
//! bytes, Bearer tokens, throttling) where it cannot. Every assertion on
//! what happened reads the proxy's access log or the upstream's own record.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use http::{Method, StatusCode};
use pullthrough_testbed::fixtures::{Image, LayoutBuilder, OCI_MANIFEST, verify_digest};
use pullthrough_testbed::http::{BodyMode, Conn, Get, Response, tls_config, tls_connect};
use pullthrough_testbed::net::{free_port, is_listening, wait_for};
use pullthrough_testbed::ns::{MountNs, write_hosts_file};
use pullthrough_testbed::proxy::{Addrs, Proxy};
use pullthrough_testbed::registry::Registry;
use pullthrough_testbed::stub::{Stub, StubAuth, Throttle};
use serde_json::Value;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

// --- helpers ---------------------------------------------------------------

/// `skopeo copy` (inside `ns` when given); success and combined output.
fn skopeo_copy(ns: Option<&MountNs>, flags: &[String], src: &str, dest: &str) -> (bool, String) {
    let mut args: Vec<String> = [
        "--insecure-policy",
        "--command-timeout=60s",
        "copy",
        "-q",
        "--retry-times=0",
    ]
    .map(String::from)
    .to_vec();
    args.extend(flags.iter().cloned());
    args.push(src.to_string());
    args.push(dest.to_string());
    let mut cmd = match ns {
        Some(ns) => ns.command("skopeo", &args).unwrap(),
        None => {
            let mut c = Command::new("skopeo");
            c.args(&args);
            c
        }
    };
    // Never the machine's stored registry credentials.
    cmd.env(
        "REGISTRY_AUTH_FILE",
        "/nonexistent/pullthrough-test-auth.json",
    )
    .stdin(Stdio::null());
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn cert_dir(side: &str, dir: &Path) -> String {
    format!("--{side}-cert-dir={}", dir.display())
}

fn oci(dir: &Path, name: &str) -> String {
    format!("oci:{}:x", dir.join(name).display())
}

/// A busybox image tagged `1` in its own OCI layout under `dir`.
fn busybox_layout(dir: &Path) -> Image {
    LayoutBuilder::new(&dir.join("layout"))
        .unwrap()
        .busybox("1")
        .unwrap()
}

fn blob_size(image: &Image, digest: &str) -> u64 {
    std::fs::metadata(image.blob_path(digest)).unwrap().len()
}

fn cached_path(proxy: &Proxy, digest: &str) -> PathBuf {
    proxy.cached_blob_path(digest)
}

fn tmp_entries(proxy: &Proxy) -> Vec<String> {
    assert!(
        proxy.data_dir().join("tmp").is_dir(),
        "the store has no tmp dir"
    );
    proxy.tmp_entries()
}

fn get(url: &str) -> Get<'_> {
    Get::new(url)
}

fn oci_code(resp: &Response) -> String {
    serde_json::from_slice::<Value>(&resp.body).unwrap_or_default()["errors"][0]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Every request in the upstream registry's access log.
fn upstream_requests(reg: &Registry) -> usize {
    ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
        .iter()
        .map(|m| reg.count_requests(m, "/"))
        .sum()
}

fn sync_upstream_log(reg: &Registry) {
    reg.sync_log().unwrap();
}

fn rt() -> tokio::runtime::Runtime {
    pullthrough_testbed::http::runtime().unwrap()
}

// --- 1. credentials --------------------------------------------------------

/// DNS-hijack mode (Host/SNI routing) in front of a TLS + htpasswd
/// registry: the upstream's Basic challenge reaches skopeo, and skopeo's
/// credentials reach the upstream. Without credentials the pull fails —
/// also once the image is cached.
#[test]
fn basic_credentials_are_relayed_to_the_upstream() {
    let up = common::upstream(Registry::htpasswd("puller", "s3cret").unwrap());
    let proxy = Proxy::start(
        common::proxy_bin(),
        Addrs::localhost().unwrap(),
        &format!(
            "registries:\n  - host: private.test\n    upstream: {}\n    caBundle: {}\n",
            up.registry.url(),
            up.registry.ca_path().unwrap().display()
        ),
    )
    .unwrap();
    let certs = common::ca_dir(&proxy);
    let work = tempfile::tempdir().unwrap();
    let hosts = work.path().join("hosts");
    write_hosts_file(&hosts, &[("private.test", LOCALHOST)]).unwrap();
    let ns = MountNs::new().hosts(&hosts);
    let src = format!(
        "docker://private.test:{}/fixture/busybox:1",
        proxy.addrs.https.port()
    );
    let layer = &up.busybox.layer_digests()[0];

    let (ok, out) = skopeo_copy(
        Some(&ns),
        &[
            cert_dir("src", certs.path()),
            "--src-creds=puller:s3cret".into(),
        ],
        &src,
        &oci(work.path(), "a"),
    );
    assert!(ok, "pull with credentials failed: {out}\n{}", proxy.log());
    // The ping went upstream and its 401 Basic challenge came back.
    proxy
        .wait_access(&[
            ("kind", "ping"),
            ("status", "401"),
            ("registry", "private.test"),
            ("via", "host"),
        ])
        .unwrap();
    let miss = proxy
        .wait_access(&[
            ("kind", "blob"),
            ("digest", layer),
            ("cache", "MISS"),
            ("via", "host"),
            ("registry", "private.test"),
        ])
        .unwrap();
    assert_eq!(miss[0]["status"], 200);
    assert_eq!(up.registry.count_requests("GET", layer), 1);
    // The registry only answers an authenticated user: the layer GET it
    // served carried the relayed credentials.
    assert!(
        up.registry
            .log()
            .lines()
            .any(|l| l.contains(layer.as_str()) && l.contains("auth.user.name=puller")),
        "no authenticated layer request in the registry log:\n{}",
        up.registry.log()
    );

    // Without credentials: refused, although everything is cached now.
    let (ok, out) = skopeo_copy(
        Some(&ns),
        &[cert_dir("src", certs.path()), "--src-no-creds".into()],
        &src,
        &oci(work.path(), "b"),
    );
    assert!(!ok, "pull without credentials worked:\n{out}");
    proxy
        .wait_access(&[
            ("kind", "tag"),
            ("reference", "1"),
            ("status", "401"),
            ("registry", "private.test"),
        ])
        .unwrap();
    assert!(
        proxy
            .access_matching(&[("kind", "blob"), ("cache", "HIT")])
            .is_empty(),
        "a cached private blob was served"
    );
}

// --- 2. redirects ----------------------------------------------------------

/// Blob GETs answered with 307 (absolute Location, another host) then 302
/// (relative Location) are followed by the proxy; the client's credentials
/// reach the registry but never the storage host; the blob is cached by
/// digest and served with both upstream hosts gone, to the client the
/// registry let read it.
#[test]
fn redirects_are_followed_without_credentials_and_cached_by_digest() {
    let work = tempfile::tempdir().unwrap();
    let image = busybox_layout(work.path());
    let mut stub = Stub::builder(&image.layout)
        .auth(StubAuth::basic("puller", "s3cret"))
        .redirect_blobs_to(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)))
        .start()
        .unwrap();
    // The storage host is loopback, chosen by the upstream: opted in.
    let proxy = Proxy::start(
        common::proxy_bin(),
        Addrs::localhost().unwrap(),
        &common::one_registry(
            "redirect.test",
            &stub.url(),
            "    allowPrivateNetworks: true\n",
        ),
    )
    .unwrap();
    let certs = common::ca_dir(&proxy);
    let hosts = work.path().join("hosts");
    write_hosts_file(&hosts, &[("redirect.test", LOCALHOST)]).unwrap();
    let ns = MountNs::new().hosts(&hosts);
    let layer = image.layer_digests()[0].clone();
    let config = image.manifests[0].config.digest.clone();

    let (ok, out) = skopeo_copy(
        Some(&ns),
        &[
            cert_dir("src", certs.path()),
            "--src-creds=puller:s3cret".into(),
        ],
        &format!(
            "docker://redirect.test:{}/fixture/busybox:1",
            proxy.addrs.https.port()
        ),
        &oci(work.path(), "a"),
    );
    assert!(ok, "pull failed: {out}\n{}", proxy.log());
    for digest in [&layer, &config] {
        proxy
            .wait_access(&[
                ("kind", "blob"),
                ("digest", digest),
                ("cache", "MISS"),
                ("status", "200"),
                ("complete", "true"),
            ])
            .unwrap();
        assert_eq!(stub.count("GET", digest), 1, "{digest}");
        // Both hops were followed: absolute to storage, relative on it.
        assert_eq!(
            stub.storage_count("GET", &format!("/storage/blobs/{digest}?sig=1")),
            1
        );
        assert_eq!(
            stub.storage_count("GET", &format!("/storage/real/{digest}?sig=2")),
            1
        );
        let cached = std::fs::read(cached_path(&proxy, digest)).unwrap();
        verify_digest(&cached, digest).unwrap();
    }
    let basic = "Basic cHVsbGVyOnMzY3JldA=="; // puller:s3cret
    let blob_gets: Vec<_> = stub
        .requests()
        .into_iter()
        .filter(|s| s.path.contains("/blobs/"))
        .collect();
    assert!(!blob_gets.is_empty());
    for seen in &blob_gets {
        assert_eq!(seen.headers["authorization"], basic, "{seen:?}");
    }
    let storage = stub.storage_requests();
    assert_eq!(storage.len(), 4, "{storage:#?}");
    for seen in &storage {
        for h in ["authorization", "cookie", "proxy-authorization"] {
            assert!(!seen.headers.contains_key(h), "{h} leaked: {seen:?}");
        }
    }

    // Both hosts gone: the blob comes from the cache to the client the
    // registry let read it (same credentials); a client without any gets
    // none of it, since the registry cannot be asked (fails closed).
    stub.stop();
    let url = format!(
        "{}/v2/redirect.test/fixture/busybox/blobs/{layer}",
        proxy.http_url()
    );
    let resp = get(&url).header("authorization", basic).send().unwrap();
    assert_eq!(resp.status, StatusCode::OK, "{}", proxy.log());
    verify_digest(&resp.body, &layer).unwrap();
    proxy
        .wait_access(&[
            ("kind", "blob"),
            ("digest", &layer),
            ("cache", "HIT"),
            ("status", "200"),
        ])
        .unwrap();
    let resp = get(&url).send().unwrap();
    assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.body.len() < 1024);
}

// --- 3. corrupt upstream ---------------------------------------------------

/// An upstream sending wrong bytes (right length) for a layer: the client's
/// transfer fails, nothing is cached or left in tmp, the access line says
/// incomplete; a raw client never gets the whole wrong body. Once the
/// upstream is right again, the pull works and the layer is cached.
#[test]
fn corrupt_upstream_bytes_are_never_cached_or_served_whole() {
    let work = tempfile::tempdir().unwrap();
    let image = busybox_layout(work.path());
    let layer = image.layer_digests()[0].clone();
    let size = blob_size(&image, &layer);
    let stub = Stub::builder(&image.layout)
        .corrupt(&layer)
        .start()
        .unwrap();
    let proxy = common::proxy_serving("bad.test", &stub.url());
    let certs = common::ca_dir(&proxy);
    let src = format!("docker://{}/bad.test/fixture/busybox:1", proxy.addrs.https);

    let (ok, out) = skopeo_copy(
        None,
        &[cert_dir("src", certs.path())],
        &src,
        &oci(work.path(), "a"),
    );
    assert!(!ok, "pull of a corrupt layer worked:\n{out}");
    assert!(
        [
            "digest",
            "EOF",
            "unexpected",
            "reset",
            "INTERNAL_ERROR",
            "stream error"
        ]
        .iter()
        .any(|w| out.contains(w)),
        "skopeo failed for another reason:\n{out}"
    );
    proxy
        .wait_access(&[("kind", "blob"), ("digest", &layer), ("complete", "false")])
        .unwrap();
    let nothing_cached = |proxy: &Proxy| {
        wait_for("tmp to be empty", Duration::from_secs(5), || {
            Ok(tmp_entries(proxy).is_empty())
        })
        .unwrap_or_else(|e| panic!("{e}: {:?}", tmp_entries(proxy)));
        assert!(!cached_path(proxy, &layer).exists(), "corrupt blob cached");
    };
    nothing_cached(&proxy);

    // A raw client does not get the complete (wrong) body either.
    let url = format!(
        "{}/v2/bad.test/fixture/busybox/blobs/{layer}",
        proxy.http_url()
    );
    match get(&url).send() {
        Err(_) => {}
        Ok(resp) => assert!(
            resp.status != StatusCode::OK || (resp.body.len() as u64) < size,
            "got {} bytes with status {}",
            resp.body.len(),
            resp.status
        ),
    }
    wait_for(
        "two failed transfers logged",
        Duration::from_secs(10),
        || {
            Ok(proxy
                .access_matching(&[("kind", "blob"), ("digest", &layer), ("complete", "false")])
                .len()
                >= 2)
        },
    )
    .unwrap();
    nothing_cached(&proxy);

    // Upstream fixed: works and is cached.
    stub.set_corrupt(&layer, false);
    let (ok, out) = skopeo_copy(
        None,
        &[cert_dir("src", certs.path())],
        &src,
        &oci(work.path(), "b"),
    );
    assert!(ok, "pull after the fix failed: {out}\n{}", proxy.log());
    proxy
        .wait_access(&[
            ("kind", "blob"),
            ("digest", &layer),
            ("cache", "MISS"),
            ("complete", "true"),
        ])
        .unwrap();
    let cached = std::fs::read(cached_path(&proxy, &layer)).unwrap();
    verify_digest(&cached, &layer).unwrap();
    assert!(tmp_entries(&proxy).is_empty());
}

// --- 4. unconfigured names -------------------------------------------------

/// No open proxy: a TLS handshake for an unconfigured name is refused, an
/// HTTP request for one gets 403 DENIED, and the upstream never hears of
/// either.
#[test]
fn unconfigured_names_are_refused_before_any_upstream_request() {
    let up = Registry::plain().unwrap();
    let proxy = common::proxy_serving("quay.io", &up.url());
    let ca = proxy.ca_pem().unwrap();
    sync_upstream_log(&up);
    let before = upstream_requests(&up);

    let tls = tls_config(&ca, &[b"http/1.1"]).unwrap();
    rt().block_on(async {
        // A configured name gets a verified handshake: the refusal below is
        // about the name, not about the client.
        tls_connect(proxy.addrs.https, tls.clone(), "quay.io")
            .await
            .expect("handshake for a configured name");
        // Refused by the proxy (an alert, no certificate offered), not by
        // the client rejecting a certificate for another name.
        match tls_connect(proxy.addrs.https, tls, "evil.example").await {
            Ok(_) => panic!("handshake for evil.example succeeded"),
            Err(err) => {
                let err = err.to_string();
                assert!(err.contains("received fatal alert"), "{err}");
                assert!(!err.contains("certificate"), "{err}");
            }
        }
    });

    let port = proxy.addrs.http.port();
    for path in ["/v2/", "/v2/library/busybox/manifests/latest"] {
        let url = format!("http://evil.example:{port}{path}");
        let resp = get(&url).connect_to(proxy.addrs.http).send().unwrap();
        assert_eq!(resp.status, StatusCode::FORBIDDEN, "{path}");
        assert_eq!(oci_code(&resp), "DENIED", "{path}");
        assert!(
            resp.headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json")
        );
    }
    // Naming an unconfigured registry by ns= or path prefix does not work
    // either.
    for path in [
        "/v2/library/busybox/manifests/latest?ns=evil.example",
        "/v2/evil.example/library/busybox/manifests/latest",
    ] {
        let url = format!("{}{path}", proxy.http_url());
        let resp = get(&url).send().unwrap();
        assert!(resp.status.is_client_error(), "{path}: {}", resp.status);
    }
    proxy
        .wait_access(&[
            ("host", &format!("evil.example:{port}")),
            ("cache", "DENIED"),
        ])
        .unwrap();
    sync_upstream_log(&up);
    // The marker itself is the only new request.
    assert_eq!(upstream_requests(&up), before + 1, "{}", up.log());
}

// --- 5. hostile input ------------------------------------------------------

/// Traversal, encoded separators, bad names and digests, non-registry paths
/// and an oversized header all get a 4xx (or a closed connection), the proxy
/// keeps serving, and nothing appears outside the data dir's own layout.
#[test]
fn hostile_paths_are_refused_and_touch_nothing_on_disk() {
    let up = common::upstream(Registry::plain().unwrap());
    let proxy = common::proxy_for(&up);
    let canary = proxy.dir().join("canary");
    std::fs::write(&canary, "untouched\n").unwrap();
    let hex = "a".repeat(64);
    let paths = [
        "/v2/quay.io/fixture/../../../canary/manifests/1".to_string(),
        "/v2/quay.io/../../canary/blobs/sha256:".to_string() + &hex,
        "/v2/quay.io/%2e%2e/%2e%2e/canary/manifests/1".into(),
        "/v2/quay.io/fixture%2fbusybox/manifests/1".into(),
        "/v2/quay.io/fixture/busybox/manifests/..%2f..%2fcanary".into(),
        "/v2/quay.io/Fixture/busybox/manifests/1".into(),
        "/v2/quay.io/fixture/busybox/blobs/sha256:xyz".into(),
        format!(
            "/v2/quay.io/fixture/busybox/blobs/sha256:{}",
            "a".repeat(63)
        ),
        format!(
            "/v2/quay.io/fixture/busybox/blobs/sha256:{}",
            "A".repeat(64)
        ),
        format!("/v2/quay.io/fixture/busybox/blobs/md5:{}", "a".repeat(32)),
        "/v2/quay.io/fixture/busybox/manifests/sha256:../../../canary".into(),
        "/v2/quay.io/fixture/busybox/blobs/uploads/../../../canary".into(),
        "/etc/passwd".into(),
        "/../canary".into(),
        "/v2/../..".into(),
        "/canary".into(),
    ];
    for path in &paths {
        let url = format!("{}{path}", proxy.http_url());
        let resp = get(&url).send().unwrap();
        assert!(
            resp.status.is_client_error(),
            "{path}: {} {}",
            resp.status,
            String::from_utf8_lossy(&resp.body)
        );
    }
    let code = |path: &str| oci_code(&get(&format!("{}{path}", proxy.http_url())).send().unwrap());
    assert_eq!(
        code("/v2/quay.io/Fixture/busybox/manifests/1"),
        "NAME_INVALID"
    );
    assert_eq!(
        code("/v2/quay.io/fixture/busybox/blobs/sha256:xyz"),
        "DIGEST_INVALID"
    );

    // 100 KiB of header: refused (431) or the connection is closed.
    let url = format!("{}/v2/", proxy.http_url());
    match get(&url).header("x-big", "a".repeat(100 * 1024)).send() {
        Ok(resp) => assert!(resp.status.is_client_error(), "{}", resp.status),
        Err(e) => eprintln!("oversized header: {e}"),
    }
    // Still alive and serving.
    let resp = get(&url).send().unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    let resp = get(&format!(
        "{}/v2/quay.io/fixture/busybox/manifests/1",
        proxy.http_url()
    ))
    .header("accept", OCI_MANIFEST)
    .send()
    .unwrap();
    assert_eq!(resp.status, StatusCode::OK);

    // Only the data dir's own layout exists; the canary is untouched.
    assert_eq!(std::fs::read_to_string(&canary).unwrap(), "untouched\n");
    let data = proxy.data_dir();
    let mut top: Vec<String> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(top, ["blobs", "ca.crt", "ca.key", "tmp"]);
    let blobs: Vec<String> = std::fs::read_dir(data.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(blobs, ["sha256"]);
    for shard in std::fs::read_dir(data.join("blobs/sha256")).unwrap() {
        let shard = shard.unwrap();
        let name = shard.file_name().to_string_lossy().into_owned();
        assert!(
            name.len() == 2 && name.bytes().all(|b| b.is_ascii_hexdigit()),
            "{name}"
        );
        for f in std::fs::read_dir(shard.path()).unwrap() {
            let f = f.unwrap().file_name().to_string_lossy().into_owned();
            let stem = f.strip_suffix(".json").unwrap_or(&f);
            assert!(
                stem.len() == 64 && stem.starts_with(&name),
                "unexpected file {name}/{f}"
            );
        }
    }
    assert!(tmp_entries(&proxy).is_empty());
    let siblings: Vec<String> = std::fs::read_dir(proxy.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !["canary", "config.yaml", "data", "proxy.log"].contains(&n.as_str()))
        .collect();
    assert!(siblings.is_empty(), "{siblings:?}");
}

// --- 6. ranges -------------------------------------------------------------

/// Ranges of a cached blob, served with the upstream stopped.
#[test]
fn ranges_of_cached_blobs() {
    let mut up = common::upstream(Registry::plain().unwrap());
    let proxy = common::proxy_for(&up);
    let certs = common::ca_dir(&proxy);
    let work = tempfile::tempdir().unwrap();
    let (ok, out) = skopeo_copy(
        None,
        &[cert_dir("src", certs.path())],
        &format!("docker://{}/quay.io/fixture/busybox:1", proxy.addrs.https),
        &oci(work.path(), "a"),
    );
    assert!(ok, "{out}");
    let layer = up.busybox.layer_digests()[0].clone();
    proxy
        .wait_access(&[("digest", &layer), ("cache", "MISS"), ("complete", "true")])
        .unwrap();
    let bytes = std::fs::read(up.busybox.blob_path(&layer)).unwrap();
    let size = bytes.len();
    up.registry.stop().unwrap();

    let url = format!(
        "{}/v2/quay.io/fixture/busybox/blobs/{layer}",
        proxy.http_url()
    );
    let resp = get(&url).header("range", "bytes=10-19").send().unwrap();
    assert_eq!(resp.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        resp.headers["content-range"],
        format!("bytes 10-19/{size}").as_str()
    );
    assert_eq!(resp.headers["content-length"], "10");
    assert_eq!(&resp.body[..], &bytes[10..20]);

    let resp = get(&url).header("range", "bytes=-5").send().unwrap();
    assert_eq!(resp.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        resp.headers["content-range"],
        format!("bytes {}-{}/{size}", size - 5, size - 1).as_str()
    );
    assert_eq!(&resp.body[..], &bytes[size - 5..]);

    let resp = get(&url)
        .header("range", format!("bytes={size}-"))
        .send()
        .unwrap();
    assert_eq!(resp.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        resp.headers["content-range"],
        format!("bytes */{size}").as_str()
    );

    // A line is written a moment after its response: wait for the third.
    let hits = || {
        proxy
            .access_matching(&[("digest", &layer), ("cache", "HIT")])
            .len()
    };
    let _ = wait_for("three HIT lines", Duration::from_secs(10), || {
        Ok(hits() >= 3)
    });
    assert_eq!(hits(), 3, "{}", proxy.log());
}

// --- 7. HEAD ---------------------------------------------------------------

/// HEAD of an uncached blob costs the upstream a HEAD, never a GET; HEAD of
/// a cached blob costs it nothing.
#[test]
fn head_never_spends_an_upstream_get() {
    let up = common::upstream(Registry::plain().unwrap());
    let proxy = common::proxy_for(&up);
    let layer = up.busybox.layer_digests()[0].clone();
    let size = blob_size(&up.busybox, &layer);
    let url = format!(
        "{}/v2/quay.io/fixture/busybox/blobs/{layer}",
        proxy.http_url()
    );

    // Pushing the fixture HEADed the layer already: count from here.
    sync_upstream_log(&up.registry);
    let heads = up.registry.count_requests("HEAD", &layer);
    assert_eq!(up.registry.count_requests("GET", &layer), 0);

    let resp = get(&url).method(Method::HEAD).send().unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.headers["content-length"], size.to_string().as_str());
    assert!(resp.body.is_empty());
    proxy
        .wait_access(&[("method", "HEAD"), ("digest", &layer), ("cache", "PASS")])
        .unwrap();
    sync_upstream_log(&up.registry);
    assert_eq!(up.registry.count_requests("HEAD", &layer), heads + 1);
    assert_eq!(up.registry.count_requests("GET", &layer), 0);
    assert!(!cached_path(&proxy, &layer).exists());

    // Cache it, then HEAD again: the upstream hears nothing.
    let resp = get(&url).send().unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    verify_digest(&resp.body, &layer).unwrap();
    proxy
        .wait_access(&[("digest", &layer), ("cache", "MISS"), ("complete", "true")])
        .unwrap();
    sync_upstream_log(&up.registry);
    let before = upstream_requests(&up.registry);
    let resp = get(&url).method(Method::HEAD).send().unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.headers["content-length"], size.to_string().as_str());
    assert_eq!(resp.headers["docker-content-digest"], layer.as_str());
    proxy
        .wait_access(&[("method", "HEAD"), ("digest", &layer), ("cache", "HIT")])
        .unwrap();
    sync_upstream_log(&up.registry);
    assert_eq!(
        upstream_requests(&up.registry),
        before + 1,
        "{}",
        up.registry.log()
    );
    assert_eq!(up.registry.count_requests("GET", &layer), 1);
    assert_eq!(up.registry.count_requests("HEAD", &layer), heads + 1);
}

// --- 8. push ---------------------------------------------------------------

/// Writes are refused with 405 UNSUPPORTED unless the registry allows push,
/// without reaching the upstream; with `allowPush` a skopeo push through
/// the proxy lands in the upstream — also for layers the proxy has cached.
#[test]
fn push_only_where_allowed() {
    let up = common::upstream(Registry::plain().unwrap());
    let work = tempfile::tempdir().unwrap();

    let closed = common::proxy_for(&up);
    sync_upstream_log(&up.registry);
    let before = upstream_requests(&up.registry);
    let base = format!("{}/v2/quay.io/pushed/img", closed.http_url());
    let writes = [
        (Method::POST, format!("{base}/blobs/uploads/")),
        (Method::PUT, format!("{base}/manifests/1")),
        (Method::DELETE, format!("{base}/manifests/1")),
        (Method::PATCH, format!("{base}/blobs/uploads/some-session")),
        (Method::GET, format!("{base}/blobs/uploads/some-session")),
    ];
    for (method, url) in &writes {
        let resp = get(url).method(method.clone()).send().unwrap();
        assert_eq!(
            resp.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {url}"
        );
        assert_eq!(oci_code(&resp), "UNSUPPORTED", "{method} {url}");
    }
    // The raw writes reached nothing upstream.
    sync_upstream_log(&up.registry);
    assert_eq!(
        upstream_requests(&up.registry),
        before + 1,
        "{}",
        up.registry.log()
    );
    let certs = common::ca_dir(&closed);
    let (ok, out) = skopeo_copy(
        None,
        &[cert_dir("dest", certs.path())],
        &format!("oci:{}:busybox", up.busybox.layout.display()),
        &format!("docker://{}/quay.io/pushed/img:1", closed.addrs.https),
    );
    assert!(!ok, "push through a closed registry worked:\n{out}");
    closed
        .wait_access(&[("method", "POST"), ("status", "405"), ("cache", "DENIED")])
        .unwrap();
    // skopeo's HEAD checks are reads and pass; no write got through.
    sync_upstream_log(&up.registry);
    for method in ["POST", "PUT", "PATCH", "DELETE"] {
        assert_eq!(
            up.registry.count_requests(method, "/v2/pushed/"),
            0,
            "{method}: {}",
            up.registry.log()
        );
    }
    drop(closed);

    let open = Proxy::start(
        common::proxy_bin(),
        Addrs::localhost().unwrap(),
        &common::one_registry("quay.io", &up.registry.url(), "    allowPush: true\n"),
    )
    .unwrap();
    let certs = common::ca_dir(&open);
    // Pull first, so the proxy holds the layers the push will check for.
    let (ok, out) = skopeo_copy(
        None,
        &[cert_dir("src", certs.path())],
        &format!("docker://{}/quay.io/fixture/busybox:1", open.addrs.https),
        &oci(work.path(), "pulled"),
    );
    assert!(ok, "{out}");
    let (ok, out) = skopeo_copy(
        None,
        &[cert_dir("dest", certs.path())],
        &format!("oci:{}:busybox", up.busybox.layout.display()),
        &format!("docker://{}/quay.io/pushed/img:1", open.addrs.https),
    );
    assert!(ok, "push failed: {out}\n{}", open.log());
    open.wait_access(&[
        ("method", "PUT"),
        ("kind", "other"),
        ("cache", "PASS"),
        ("status", "201"),
    ])
    .unwrap();

    // The upstream has it, byte for byte.
    let url = format!("{}/v2/pushed/img/manifests/1", up.registry.url());
    let resp = get(&url).header("accept", OCI_MANIFEST).send().unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(
        resp.headers["docker-content-digest"],
        up.busybox.digest.as_str()
    );
    for digest in up.busybox.layer_digests() {
        let url = format!("{}/v2/pushed/img/blobs/{digest}", up.registry.url());
        let resp = get(&url).send().unwrap();
        assert_eq!(resp.status, StatusCode::OK, "{digest}");
        verify_digest(&resp.body, &digest).unwrap();
    }
}

// --- 9. config -------------------------------------------------------------

/// Each invalid config: exit 64, the message names the key (or the file),
/// no port bound, no data dir created.
#[test]
fn invalid_configs_exit_64_naming_the_key_and_bind_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let missing_ca = dir.path().join("missing-roots.pem");
    let cases = [
        (
            "unknown key",
            "registries:\n  - host: quay.io\n    colour: red\n".to_string(),
            "colour".to_string(),
        ),
        (
            "bad duration",
            "registries:\n  - host: quay.io\n    tagTTL: soon\n".into(),
            "tagTTL".into(),
        ),
        (
            "duplicate host",
            "registries:\n  - host: quay.io\n  - host: quay.io\n".into(),
            "registries[1].host".into(),
        ),
        (
            "non-URL upstream",
            "registries:\n  - host: quay.io\n    upstream: \"not a url\"\n".into(),
            "registries[0].upstream".into(),
        ),
        (
            "unreadable caBundle",
            format!(
                "registries:\n  - host: quay.io\n    caBundle: {}\n",
                missing_ca.display()
            ),
            missing_ca.display().to_string(),
        ),
    ];
    for (i, (what, body, needle)) in cases.iter().enumerate() {
        let ports: Vec<SocketAddr> = (0..3)
            .map(|_| SocketAddr::new(LOCALHOST, free_port().unwrap()))
            .collect();
        let data = dir.path().join(format!("data-{i}"));
        let file = dir.path().join(format!("config-{i}.yaml"));
        std::fs::write(
            &file,
            format!(
                "listen: {{http: \"{}\", https: \"{}\", admin: \"{}\"}}\ndataDir: {}\n{body}",
                ports[0],
                ports[1],
                ports[2],
                data.display()
            ),
        )
        .unwrap();
        let (code, stderr) = common::run_to_exit(&file);
        assert_eq!(code, Some(64), "{what}: {stderr}");
        assert!(
            stderr.contains(needle.as_str()),
            "{what}: `{needle}` not in {stderr}"
        );
        for p in &ports {
            assert!(!is_listening(*p), "{what}: something listens on {p}");
        }
        assert!(!data.exists(), "{what}: data dir created");
    }
}

/// Registry B added to a running proxy works within seconds, same process;
/// an invalid rewrite is rejected and A and B keep working; a download in
/// flight across both reloads completes intact.
#[test]
fn config_reload_adds_registries_keeps_serving_and_does_not_cut_downloads() {
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let mut builder = LayoutBuilder::new(&layout).unwrap();
    builder.busybox("1").unwrap();
    let big = builder.random("big", &[16 << 20], 7).unwrap();
    let big_layer = big.layer_digests()[0].clone();
    let big_size = blob_size(&big, &big_layer);
    // ~256 chunks of 64 KiB with 15 ms between them: several seconds.
    let stub = Stub::builder(&layout)
        .throttle(Throttle {
            chunk: 64 << 10,
            pause: Duration::from_millis(15),
        })
        .start()
        .unwrap();
    let a = common::one_registry("a.test", &stub.url(), "");
    let a_and_b = format!("{a}  - host: b.test\n    upstream: {}\n", stub.url());
    let proxy = Proxy::start(common::proxy_bin(), Addrs::localhost().unwrap(), &a).unwrap();
    let pid = proxy.pid();
    let manifest = |reg: &str| {
        let url = format!("{}/v2/{reg}/fixture/busybox/manifests/1", proxy.http_url());
        get(&url)
            .header("accept", OCI_MANIFEST)
            .send()
            .unwrap()
            .status
    };
    assert_eq!(manifest("a.test"), StatusCode::OK);
    assert_eq!(manifest("b.test"), StatusCode::NOT_FOUND);

    let url = format!("{}/v2/a.test/x/big/blobs/{big_layer}", proxy.http_url());
    let download = std::thread::spawn(move || {
        let mut g = Get::new(&url);
        g.timeout = Duration::from_secs(60);
        g.send()
    });
    wait_for(
        "the big blob request upstream",
        Duration::from_secs(10),
        || Ok(stub.count("GET", &big_layer) == 1),
    )
    .unwrap();

    proxy.write_config(&a_and_b).unwrap();
    wait_for("registry b.test to work", Duration::from_secs(5), || {
        Ok(manifest("b.test") == StatusCode::OK)
    })
    .unwrap();
    assert_eq!(proxy.pid(), pid);
    assert!(proxy.process().is_some());

    proxy
        .write_config("registries:\n  - host: a.test\n    tagTTL: soon\n")
        .unwrap();
    wait_for("the rejection in the log", Duration::from_secs(5), || {
        Ok(proxy.log().contains("config change rejected"))
    })
    .unwrap();
    assert_eq!(manifest("a.test"), StatusCode::OK);
    assert_eq!(manifest("b.test"), StatusCode::OK);
    assert!(
        !download.is_finished(),
        "the download ended before the reloads; slow it down"
    );

    let resp = download.join().unwrap().unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.body.len() as u64, big_size);
    verify_digest(&resp.body, &big_layer).unwrap();
    proxy
        .wait_access(&[
            ("digest", &big_layer),
            ("complete", "true"),
            ("cache", "MISS"),
        ])
        .unwrap();
    // Still the same process throughout.
    assert_eq!(proxy.pid(), pid);
}

// --- 10. anonymous tokens --------------------------------------------------

/// An upstream that wants Bearer tokens: a client without credentials pulls
/// in mirror mode; the proxy fetched one anonymous token from the realm and
/// reused it for every blob.
#[test]
fn anonymous_bearer_tokens_are_fetched_once_and_reused() {
    let work = tempfile::tempdir().unwrap();
    let image = busybox_layout(work.path());
    let stub = Stub::builder(&image.layout)
        .auth(StubAuth::bearer("stub", "good"))
        .start()
        .unwrap();
    let proxy = common::proxy_serving("token.test", &stub.url());
    let certs = common::ca_dir(&proxy);
    let (ok, out) = skopeo_copy(
        None,
        &[cert_dir("src", certs.path())],
        &format!(
            "docker://{}/token.test/fixture/busybox:1",
            proxy.addrs.https
        ),
        &oci(work.path(), "a"),
    );
    assert!(ok, "{out}\n{}", proxy.log());
    let layer = image.layer_digests()[0].clone();
    proxy
        .wait_access(&[("digest", &layer), ("cache", "MISS"), ("status", "200")])
        .unwrap();

    let tokens: Vec<_> = stub
        .requests()
        .into_iter()
        .filter(|s| s.path.starts_with("/token"))
        .collect();
    assert_eq!(tokens.len(), 1, "{tokens:#?}");
    assert!(
        tokens[0].path.contains("service=stub"),
        "{}",
        tokens[0].path
    );
    assert!(
        tokens[0]
            .path
            .contains("scope=repository%3Afixture%2Fbusybox%3Apull"),
        "{}",
        tokens[0].path
    );
    let blobs: Vec<_> = stub
        .requests()
        .into_iter()
        .filter(|s| {
            s.path.contains("/blobs/")
                && s.headers
                    .get("authorization")
                    .is_some_and(|v| v == "Bearer good")
        })
        .collect();
    assert!(blobs.len() >= 2, "{blobs:#?}");
}

// --- 11. HTTP/2 --------------------------------------------------------------

/// The https listener speaks HTTP/2 (ALPN h2): ping, a manifest and a blob.
#[test]
fn http2_clients_are_served() {
    let up = common::upstream(Registry::plain().unwrap());
    let proxy = common::proxy_for(&up);
    let ca = proxy.ca_pem().unwrap();
    let layer = up.busybox.layer_digests()[0].clone();
    let https = proxy.addrs.https;
    let manifest_digest = up.busybox.digest.clone();
    rt().block_on(async {
        let tls = tls_config(&ca, &[b"h2", b"http/1.1"]).unwrap();
        let mut conn = Conn::tls(https, tls, "127.0.0.1").await.unwrap();
        assert_eq!(conn.version(), http::Version::HTTP_2);
        let mut fetch = async |path: String| {
            let r = conn
                .get(&path, &[("accept", OCI_MANIFEST)], BodyMode::Keep)
                .await
                .unwrap();
            assert_eq!(r.version, http::Version::HTTP_2);
            assert!(r.error.is_none(), "{path}: {:?}", r.error);
            (r.status, r.body)
        };
        let (status, _) = fetch("/v2/".into()).await;
        assert_eq!(status, StatusCode::OK);
        let (status, body) = fetch("/v2/quay.io/fixture/busybox/manifests/1".into()).await;
        assert_eq!(status, StatusCode::OK);
        verify_digest(&body, &manifest_digest).unwrap();
        let (status, body) = fetch(format!("/v2/quay.io/fixture/busybox/blobs/{layer}")).await;
        assert_eq!(status, StatusCode::OK);
        verify_digest(&body, &layer).unwrap();
    });
    proxy
        .wait_access(&[
            ("kind", "blob"),
            ("digest", &layer),
            ("cache", "MISS"),
            ("complete", "true"),
        ])
        .unwrap();
}

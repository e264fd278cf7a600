//! The proxy in production: merged misses, outage survival, bounded disk,
//! no private-image leaks, the admin API, metrics, graceful shutdown and
//! crash safety — against the real `docker-registry` (plain and htpasswd)
//! and the test bed's scriptable stub (throttled or corrupt bodies).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use pullthrough_testbed::fixtures::{Image, LayoutBuilder, sha256_digest};
use pullthrough_testbed::http::{BodyMode, Fetched, Get};
use pullthrough_testbed::net::wait_for;
use pullthrough_testbed::ns::Tmpfs;
use pullthrough_testbed::proxy::{Addrs, Proxy};
use pullthrough_testbed::registry::Registry;
use pullthrough_testbed::relay::Relay;
use pullthrough_testbed::stub::{Stub, Throttle};
use serde_json::Value;

// --- helpers ---------------------------------------------------------------

/// GETs `url` on a connection of its own, streaming the body as `mode`
/// says (the body is not bounded in time, the response head is); an
/// error when no response head came back.
async fn try_fetch(
    url: String,
    headers: Vec<(&'static str, String)>,
    mode: BodyMode,
) -> pullthrough_testbed::Result<Fetched> {
    let mut get = Get::new(&url).timeout(Duration::from_secs(60));
    for (k, v) in headers {
        get = get.header(k, v);
    }
    get.fetch(mode).await
}

/// [`try_fetch`] that must get a response head.
async fn fetch(url: String, headers: Vec<(&'static str, String)>, mode: BodyMode) -> Fetched {
    try_fetch(url, headers, mode).await.unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    pullthrough_testbed::http::runtime().unwrap()
}

fn blob_url(proxy: &Proxy, registry: &str, repo: &str, digest: &str) -> String {
    format!("{}/v2/{registry}/{repo}/blobs/{digest}", proxy.http_url())
}

fn cached_path(proxy: &Proxy, digest: &str) -> PathBuf {
    proxy.cached_blob_path(digest)
}

fn tmp_entries(proxy: &Proxy) -> Vec<String> {
    proxy.tmp_entries()
}

/// Every committed data file under blobs/ (not the `.json` sidecars).
fn blob_files(proxy: &Proxy) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let root = proxy.data_dir().join("blobs/sha256");
    for shard in std::fs::read_dir(root).unwrap() {
        for f in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            if p.extension().is_none() {
                out.push(p);
            }
        }
    }
    out
}

fn blob_bytes_on_disk(proxy: &Proxy) -> u64 {
    blob_files(proxy)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum()
}

fn metrics(proxy: &Proxy) -> String {
    proxy.metrics().unwrap()
}

use pullthrough_testbed::proxy::metric_in as metric_opt;

/// The value of the sample `series`; fails when it is not exported.
fn metric(text: &str, series: &str) -> f64 {
    metric_opt(text, series).unwrap_or_else(|| panic!("no metric {series} in:\n{text}"))
}

fn sync_upstream_log(reg: &Registry) {
    reg.sync_log().unwrap();
}

/// A random image (one layer per size) in its own layout under `dir`.
fn random_image(dir: &Path, sizes: &[u64], seed: u64) -> Image {
    LayoutBuilder::new(&dir.join("layout"))
        .unwrap()
        .random("1", sizes, seed)
        .unwrap()
}

// --- 1. merged misses ------------------------------------------------------

/// 50 clients ask for one uncached 64 MiB blob at once: the upstream sees
/// one GET, every client that stays gets the exact bytes, and one client
/// that hangs up mid-stream stops nothing.
#[test]
fn fifty_concurrent_misses_fetch_once_and_survive_a_quitter() {
    let work = tempfile::tempdir().unwrap();
    let image = random_image(work.path(), &[64 << 20], 64);
    let layer = image.layer_digests()[0].clone();
    let expected = Arc::new(std::fs::read(image.blob_path(&layer)).unwrap());
    let registry = Registry::plain().unwrap();
    registry.push_image(&image, "fixture/big", "1").unwrap();
    let proxy = common::proxy_serving("quay.io", &registry.url());
    let url = blob_url(&proxy, "quay.io", "fixture/big", &layer);

    let results = rt().block_on(async {
        // Client 0 leads the download, reads 4 MiB and hangs up.
        let mut tasks = vec![tokio::spawn(fetch(
            url.clone(),
            Vec::new(),
            BodyMode::GiveUpAfter(4 << 20),
        ))];
        tokio::time::sleep(Duration::from_millis(50)).await;
        for _ in 1..50 {
            tasks.push(tokio::spawn(fetch(url.clone(), Vec::new(), BodyMode::Keep)));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    assert!(
        results[0].body.len() < expected.len(),
        "the quitter read everything"
    );
    for (i, r) in results.iter().enumerate().skip(1) {
        assert_eq!(r.status, StatusCode::OK, "client {i}");
        assert!(r.error.is_none(), "client {i}: {:?}", r.error);
        assert_eq!(r.body.len(), expected.len(), "client {i}");
        assert!(r.body == *expected, "client {i} got wrong bytes");
    }
    sync_upstream_log(&registry);
    assert_eq!(
        registry.count_requests("GET", &layer),
        1,
        "{}",
        registry.log()
    );
    let m = metrics(&proxy);
    let merged = metric(&m, "pullthrough_merged_waiters_total{registry=\"quay.io\"}");
    assert!(merged >= 1.0, "no merged waiters counted:\n{m}");
    let cached = std::fs::read(cached_path(&proxy, &layer)).unwrap();
    assert_eq!(sha256_digest(&cached), layer);
    assert!(tmp_entries(&proxy).is_empty(), "{:?}", tmp_entries(&proxy));
}

/// 50 clients ask for one uncached manifest at once (a rollout's nodes),
/// by digest and then by tag: the upstream sees one GET each — each counts
/// against Docker Hub's pull limit — and every client gets the manifest.
#[test]
fn fifty_concurrent_manifest_misses_fetch_once() {
    use bytes::Bytes;
    use http::{Method, Response};

    const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
    let manifest = Bytes::from(
        serde_json::json!({
            "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": sha256_digest(b"config"), "size": 6},
            "layers": []})
        .to_string(),
    );
    let digest = sha256_digest(&manifest);
    let (body, d) = (manifest.clone(), digest.clone());
    let stub = Stub::canned()
        .route(move |seen| {
            let by_digest = seen.path == format!("/v2/app/manifests/{d}");
            if seen.method == Method::GET && (by_digest || seen.path == "/v2/app/manifests/v1") {
                // Slow enough that every client asks while the first
                // fetch is under way.
                std::thread::sleep(Duration::from_millis(100));
                return Response::builder()
                    .status(StatusCode::OK)
                    .header("content-type", MANIFEST_TYPE)
                    .header("docker-content-digest", d.as_str())
                    .body(body.clone())
                    .unwrap();
            }
            Response::builder()
                .status(StatusCode::NOT_FOUND)
                .body(Bytes::new())
                .unwrap()
        })
        .start()
        .unwrap();
    let proxy = common::proxy_serving("quay.io", &stub.url());
    // 50 clients at once for `reference`: every one gets the manifest, the
    // upstream is asked once.
    let fifty_get_one = |reference: &str| {
        let url = format!("{}/v2/quay.io/app/manifests/{reference}", proxy.http_url());
        let results = rt().block_on(async {
            let tasks: Vec<_> = (0..50)
                .map(|_| {
                    let headers = vec![("Accept", MANIFEST_TYPE.to_string())];
                    tokio::spawn(fetch(url.clone(), headers, BodyMode::Keep))
                })
                .collect();
            futures::future::join_all(tasks).await
        });
        for (i, r) in results.into_iter().enumerate() {
            let r = r.unwrap();
            assert_eq!(
                r.status,
                StatusCode::OK,
                "{reference}, client {i}: {}",
                proxy.log()
            );
            assert_eq!(&r.body[..], &manifest[..], "{reference}, client {i}");
        }
        let path = format!("/v2/app/manifests/{reference}");
        assert_eq!(
            stub.count("GET", &path),
            1,
            "{reference}: {:?}",
            stub.requests()
        );
    };
    fifty_get_one(&digest);
    let misses = proxy
        .wait_access(&[("kind", "manifest"), ("cache", "MISS")])
        .unwrap();
    assert_eq!(misses.len(), 1, "{misses:?}");
    fifty_get_one("v1");
}

/// With a slow upstream, a waiter gets its first byte long before the
/// download ends (no wait-for-whole-file), and still one upstream GET.
#[test]
fn waiters_are_streamed_bytes_as_they_arrive() {
    let work = tempfile::tempdir().unwrap();
    let image = random_image(work.path(), &[2 << 20], 7);
    let layer = image.layer_digests()[0].clone();
    let expected = std::fs::read(image.blob_path(&layer)).unwrap();
    // ~2 MiB at 64 KiB per 60 ms: about two seconds.
    let stub = Stub::builder(&image.layout)
        .throttle(Throttle {
            chunk: 64 * 1024,
            pause: Duration::from_millis(60),
        })
        .start()
        .unwrap();
    let proxy = common::proxy_serving("slow.test", &stub.url());
    let url = blob_url(&proxy, "slow.test", "fixture/slow", &layer);
    let results = rt().block_on(async {
        let first = tokio::spawn(fetch(url.clone(), Vec::new(), BodyMode::Keep));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut rest = Vec::new();
        for _ in 0..4 {
            rest.push(tokio::spawn(fetch(url.clone(), Vec::new(), BodyMode::Keep)));
        }
        let mut out = vec![first.await.unwrap()];
        for t in rest {
            out.push(t.await.unwrap());
        }
        out
    });
    let download_end = results.iter().map(|r| r.ended).max().unwrap();
    for (i, r) in results.iter().enumerate() {
        assert!(
            r.error.is_none() && r.body == expected,
            "client {i}: {:?}",
            r.error
        );
        let first_byte_at = r.first_byte.unwrap();
        let before_end = download_end - first_byte_at;
        assert!(
            before_end > Duration::from_millis(700),
            "client {i} got its first byte only {before_end:?} before the end"
        );
    }
    assert_eq!(stub.count("GET", &layer), 1);
    let m = metrics(&proxy);
    assert!(
        metric(
            &m,
            "pullthrough_merged_waiters_total{registry=\"slow.test\"}"
        ) >= 4.0,
        "{m}"
    );
}

/// A corrupt upstream body: every waiter's response is aborted (none gets
/// a complete body), one upstream GET, nothing cached.
#[test]
fn a_failed_merged_download_aborts_every_waiter_and_caches_nothing() {
    let work = tempfile::tempdir().unwrap();
    let image = random_image(work.path(), &[1 << 20], 9);
    let layer = image.layer_digests()[0].clone();
    let size = std::fs::metadata(image.blob_path(&layer)).unwrap().len() as usize;
    let stub = Stub::builder(&image.layout)
        .corrupt(&layer)
        .throttle(Throttle {
            chunk: 64 * 1024,
            pause: Duration::from_millis(40),
        })
        .start()
        .unwrap();
    let proxy = common::proxy_serving("bad.test", &stub.url());
    let url = blob_url(&proxy, "bad.test", "fixture/bad", &layer);
    let results = rt().block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..8 {
            tasks.push(tokio::spawn(try_fetch(
                url.clone(),
                Vec::new(),
                BodyMode::Keep,
            )));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    for (i, r) in results.iter().enumerate() {
        // No response head at all is an aborted response too.
        let Ok(r) = r else { continue };
        assert!(
            r.error.is_some() && r.body.len() < size,
            "client {i} got {} of {size} bytes, error {:?}",
            r.body.len(),
            r.error
        );
    }
    assert_eq!(stub.count("GET", &layer), 1);
    wait_for("tmp to be empty", Duration::from_secs(5), || {
        Ok(tmp_entries(&proxy).is_empty())
    })
    .unwrap();
    assert!(!cached_path(&proxy, &layer).exists(), "corrupt blob cached");
}

// --- 2. outage survival ----------------------------------------------------

/// Upstream stopped after a first pull: the tag is served within tagTTL
/// (HIT) and after it (STALE), manifests and blobs by digest from the
/// cache; with `cacheTags: false` every tag request goes upstream, and an
/// outage is still answered STALE.
#[test]
fn tags_and_digests_are_served_through_an_outage() {
    let mut up = common::upstream(Registry::plain().unwrap());
    let proxy = Proxy::start(
        common::proxy_bin(),
        Addrs::localhost().unwrap(),
        &format!(
            "registries:\n  - host: quay.io\n    upstream: {u}\n    tagTTL: 1s\n  - host: nocache.test\n    upstream: {u}\n    cacheTags: false\n",
            u = up.registry.url()
        ),
    )
    .unwrap();
    let accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";
    let manifest = |reg: &str, reference: &str| {
        let url = format!(
            "{}/v2/{reg}/fixture/busybox/manifests/{reference}",
            proxy.http_url()
        );
        Get::new(&url).header("Accept", accept).send().unwrap()
    };
    let m = &up.busybox.manifests[0];
    let layer = up.busybox.layer_digests()[0].clone();
    let get_blob = |d: &str| {
        Get::new(&blob_url(&proxy, "quay.io", "fixture/busybox", d))
            .send()
            .unwrap()
    };
    // First pull (MISS) through both registries.
    for reg in ["quay.io", "nocache.test"] {
        let r = manifest(reg, "1");
        assert_eq!(r.status, StatusCode::OK, "{reg}");
        assert_eq!(sha256_digest(&r.body), m.digest);
    }
    assert_eq!(get_blob(&layer).status, StatusCode::OK);
    // cacheTags: false asks upstream again while it is up.
    sync_upstream_log(&up.registry);
    let before = up.registry.count_requests("GET", "/manifests/1");
    assert_eq!(manifest("nocache.test", "1").status, StatusCode::OK);
    sync_upstream_log(&up.registry);
    assert_eq!(
        up.registry.count_requests("GET", "/manifests/1"),
        before + 1
    );

    up.registry.stop().unwrap();
    // Within tagTTL: a HIT.
    let r = manifest("quay.io", "1");
    assert_eq!(r.status, StatusCode::OK);
    proxy
        .wait_access(&[("kind", "tag"), ("registry", "quay.io"), ("cache", "HIT")])
        .unwrap();
    // After tagTTL: STALE, same digest.
    std::thread::sleep(Duration::from_millis(1200));
    let r = manifest("quay.io", "1");
    assert_eq!(r.status, StatusCode::OK, "{}", proxy.log());
    assert_eq!(sha256_digest(&r.body), m.digest);
    proxy
        .wait_access(&[("kind", "tag"), ("registry", "quay.io"), ("cache", "STALE")])
        .unwrap();
    // cacheTags: false, upstream down: STALE too.
    let r = manifest("nocache.test", "1");
    assert_eq!(r.status, StatusCode::OK);
    proxy
        .wait_access(&[
            ("kind", "tag"),
            ("registry", "nocache.test"),
            ("cache", "STALE"),
        ])
        .unwrap();
    // By digest: from the cache.
    let r = manifest("quay.io", &m.digest);
    assert_eq!(r.status, StatusCode::OK);
    let r = get_blob(&layer);
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(sha256_digest(&r.body), layer);
    proxy
        .wait_access(&[("kind", "blob"), ("digest", &layer), ("cache", "HIT")])
        .unwrap();
}

// --- 3. bounded disk -------------------------------------------------------

/// maxSize below the working set: least recently used entries go, a blob
/// just read stays, usage never passes the high watermark after a pull.
#[test]
fn bounded_cache_evicts_least_recently_used() {
    let work = tempfile::tempdir().unwrap();
    let image = random_image(work.path(), &[1_000_000; 5], 500);
    let layers = image.layer_digests();
    let registry = Registry::plain().unwrap();
    registry.push_image(&image, "fixture/lru", "1").unwrap();
    // 4 MiB bound: eviction above 3.6 MiB, down to 2.4 MiB.
    let proxy = Proxy::start(
        common::proxy_bin(),
        Addrs::localhost().unwrap(),
        &format!(
            "cache: {{maxSize: 4MiB, highWatermark: 0.9, lowWatermark: 0.6}}\n{}",
            common::one_registry("quay.io", &registry.url(), "")
        ),
    )
    .unwrap();
    let high = (4u64 << 20) * 9 / 10;
    let pull = |d: &str| {
        let r = Get::new(&blob_url(&proxy, "quay.io", "fixture/lru", d))
            .send()
            .unwrap();
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(sha256_digest(&r.body), d);
        let used = blob_bytes_on_disk(&proxy);
        assert!(used <= high, "{used} bytes cached > high watermark {high}");
    };
    pull(&layers[0]);
    pull(&layers[1]);
    pull(&layers[2]);
    std::thread::sleep(Duration::from_millis(20));
    pull(&layers[0]); // a HIT: now the most recently used
    proxy
        .wait_access(&[("kind", "blob"), ("digest", &layers[0]), ("cache", "HIT")])
        .unwrap();
    pull(&layers[3]); // passes the high watermark: 1 and 2 go
    assert!(cached_path(&proxy, &layers[0]).exists());
    assert!(cached_path(&proxy, &layers[3]).exists());
    assert!(!cached_path(&proxy, &layers[1]).exists());
    assert!(!cached_path(&proxy, &layers[2]).exists());
    pull(&layers[4]);
    pull(&layers[1]);
    let m = metrics(&proxy);
    assert!(
        metric(&m, "pullthrough_cache_evictions_total") >= 3.0,
        "{m}"
    );
    assert!(metric(&m, "pullthrough_cache_bytes") <= high as f64, "{m}");
    // The index survives a restart (rebuilt from the files).
    let stats_before = admin_json(&proxy, "/admin/stats", None);
    let mut proxy = proxy;
    proxy.restart().unwrap();
    let stats_after = admin_json(&proxy, "/admin/stats", None);
    assert_eq!(stats_before["bytes"], stats_after["bytes"]);
    assert_eq!(stats_before["entries"], stats_after["entries"]);
}

/// A data dir on an 8 MiB tmpfs filling up: every pull still gets the
/// right bytes (pass-through), and the disk-full events are counted.
#[test]
fn a_full_disk_keeps_serving_by_pass_through() {
    let work = tempfile::tempdir().unwrap();
    let image = random_image(work.path(), &[3 << 20, 3 << 20, 3 << 20], 800);
    let layers = image.layer_digests();
    let registry = Registry::plain().unwrap();
    registry.push_image(&image, "fixture/full", "1").unwrap();
    let mut proxy = common::proxy_serving("quay.io", &registry.url());
    proxy.stop().unwrap();
    let data = proxy.data_dir();
    std::fs::remove_dir_all(&data).unwrap();
    let mount = Tmpfs::mount(&data, "8m").unwrap();
    proxy.start_again().unwrap();
    // All three at once: they cannot all count on the same free space.
    let urls: Vec<String> = layers
        .iter()
        .map(|d| blob_url(&proxy, "quay.io", "fixture/full", d))
        .collect();
    let results = rt().block_on(async {
        let tasks: Vec<_> = urls
            .iter()
            .map(|u| tokio::spawn(fetch(u.clone(), Vec::new(), BodyMode::Keep)))
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    for (r, d) in results.iter().zip(&layers) {
        assert!(r.error.is_none(), "{d}: {:?}\n{}", r.error, proxy.log());
        assert_eq!(sha256_digest(&r.body), *d);
    }
    for round in 0..2 {
        for d in &layers {
            let r = Get::new(&blob_url(&proxy, "quay.io", "fixture/full", d))
                .send()
                .unwrap();
            assert_eq!(r.status, StatusCode::OK, "round {round}");
            assert_eq!(sha256_digest(&r.body), *d, "round {round}");
        }
    }
    let m = metrics(&proxy);
    assert!(
        metric(&m, "pullthrough_disk_full_events_total") >= 1.0,
        "{m}"
    );
    assert!(
        !proxy
            .access_matching(&[("kind", "blob"), ("cache", "PASS"), ("complete", "true")])
            .is_empty()
    );
    // What did fit is still served from the cache while the disk is full:
    // a HIT in both rounds, not a pass-through.
    let cached: Vec<&String> = layers
        .iter()
        .filter(|d| cached_path(&proxy, d).exists())
        .collect();
    assert!(!cached.is_empty(), "nothing cached on the 8 MiB disk");
    for d in cached {
        wait_for("HIT lines", Duration::from_secs(5), || {
            Ok(proxy
                .access_matching(&[("digest", d.as_str()), ("cache", "HIT")])
                .len()
                >= 2)
        })
        .unwrap_or_else(|e| panic!("{d}: {e}\n{}", proxy.log()));
    }
    proxy.stop().unwrap();
    drop(mount);
}

/// Fills the filesystem holding `path` by writing one file there until
/// ENOSPC; returns the bytes written.
fn fill_disk(path: &Path) -> u64 {
    use std::io::Write as _;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
    written
}

/// The disk fills up *during* a download shared by six clients (another
/// process takes the space that was free when it started): every client
/// still gets the whole, right blob (each finishes with its own ranged
/// upstream fetch from where the cache write stopped), the disk-full event
/// is counted and logged once, and no entry or temp file is left behind.
/// `docker-registry` answers the ranged fetches `206`.
#[test]
fn a_disk_filling_up_mid_download_still_serves_every_waiter() {
    let work = tempfile::tempdir().unwrap();
    let image = random_image(work.path(), &[24 << 20], 801);
    let registry = Registry::plain().unwrap();
    registry.push_image(&image, "fixture/filling", "1").unwrap();
    let gets = disk_fills_mid_download(&image, registry.addr(), &|| {
        sync_upstream_log(&registry);
        registry.count_requests("GET", &image.layer_digests()[0])
    });
    assert!(gets > 1, "{gets} upstream GETs: no client resumed");
}

/// The same with an upstream that ignores `Range` (the test bed's stub
/// answers `200` with the whole blob): each client skips to where it was.
#[test]
fn a_disk_filling_up_mid_download_survives_an_upstream_without_ranges() {
    let work = tempfile::tempdir().unwrap();
    let image = random_image(work.path(), &[24 << 20], 802);
    let stub = Stub::builder(&image.layout).start().unwrap();
    let addr = stub.addr();
    let gets = disk_fills_mid_download(&image, addr, &|| {
        stub.count("GET", &image.layer_digests()[0])
    });
    assert!(gets > 1, "{gets} upstream GETs: no client resumed");
}

/// Six clients on one download of the image's only layer from `upstream`
/// (through the test bed's relay, holding it), the data dir on a 40 MiB tmpfs filled up once
/// bytes are on disk; returns the upstream GETs of the layer.
fn disk_fills_mid_download(
    image: &Image,
    upstream: std::net::SocketAddr,
    upstream_gets: &dyn Fn() -> usize,
) -> usize {
    const CLIENTS: usize = 6;
    let layer = image.layer_digests()[0].clone();
    let rt = rt();
    // 4 MiB pass, then the relay holds the download until the disk is full.
    let relay = Relay::start(upstream).unwrap();
    relay.hold_after(4 << 20);
    let mut proxy = common::proxy_serving("quay.io", &format!("http://{}", relay.addr));
    proxy.stop().unwrap();
    let data = proxy.data_dir();
    std::fs::remove_dir_all(&data).unwrap();
    // Room for the 24 MiB blob when the download starts (it is reserved).
    let mount = Tmpfs::mount(&data, "40m").unwrap();
    proxy.start_again().unwrap();
    let url = blob_url(&proxy, "quay.io", "fixture/filling", &layer);
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| rt.spawn(fetch(url.clone(), Vec::new(), BodyMode::Keep)))
        .collect();
    // Every client joined the one download, and bytes are on disk.
    wait_for(
        "all clients on one download",
        Duration::from_secs(30),
        || {
            let m = metrics(&proxy);
            // Absent until the first client joins: the series for quay.io
            // is created by the first merged waiter.
            let waiters = metric_opt(&m, "pullthrough_merged_waiters_total{registry=\"quay.io\"}")
                .unwrap_or(0.0);
            let on_disk: u64 = std::fs::read_dir(data.join("tmp"))
                .unwrap()
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum();
            Ok(waiters >= (CLIENTS - 1) as f64 && on_disk >= 2 << 20)
        },
    )
    .unwrap();
    let filled = fill_disk(&data.join("filler"));
    assert!(filled > 0, "the disk was already full");
    relay.release();
    let results: Vec<Fetched> = rt.block_on(async {
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let size = std::fs::metadata(image.blob_path(&layer)).unwrap().len() as usize;
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.status, StatusCode::OK, "client {i}");
        assert!(
            r.error.is_none(),
            "client {i} aborted after {} of {size} bytes: {:?}\n{}",
            r.body.len(),
            r.error,
            proxy.log()
        );
        assert_eq!(sha256_digest(&r.body), layer, "client {i}");
    }
    let m = metrics(&proxy);
    assert!(
        metric(&m, "pullthrough_disk_full_events_total") >= 1.0,
        "{m}"
    );
    assert_eq!(
        proxy
            .log()
            .matches("cache write failed mid-download")
            .count(),
        1,
        "{}",
        proxy.log()
    );
    // One shared GET, then at most one ranged GET per client for the rest.
    let gets = upstream_gets();
    assert!(gets <= 1 + CLIENTS, "{gets} upstream GETs");
    assert!(!cached_path(&proxy, &layer).exists(), "partial blob cached");
    wait_for("tmp to be empty", Duration::from_secs(5), || {
        Ok(tmp_entries(&proxy).is_empty())
    })
    .unwrap();
    // Still serving (pass-through while the disk stays full).
    let r = Get::new(&url).send().unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(sha256_digest(&r.body), layer);
    proxy.stop().unwrap();
    drop(mount);
    drop(rt);
    gets
}

/// A small miss next to a large download half-way through is cached: the
/// free space it is checked against already counts the large one's
/// written bytes as used, so only its unwritten rest may stay reserved.
/// Reserving the large one's whole size counted 16 MiB twice on a 40 MiB
/// disk, and the small blob was passed through (and marked uncacheable).
#[test]
fn a_small_miss_beside_a_half_written_download_is_cached() {
    let work = tempfile::tempdir().unwrap();
    let big = random_image(&work.path().join("big"), &[24 << 20], 803);
    let small = random_image(&work.path().join("small"), &[1 << 20], 804);
    let registry = Registry::plain().unwrap();
    registry.push_image(&big, "fixture/big", "1").unwrap();
    registry.push_image(&small, "fixture/small", "1").unwrap();
    // The big layer comes through a relay that holds it after 17 MiB
    // (headers and the writer's last batch aside, 16 reach the disk); the
    // small one straight from the registry.
    let relay = Relay::start(registry.addr()).unwrap();
    relay.hold_after(17 << 20);
    let config = format!(
        "registries:\n  - host: quay.io\n    upstream: http://{}\n  - host: other.test\n    upstream: {}\n",
        relay.addr,
        registry.url()
    );
    let mut proxy =
        Proxy::start(common::proxy_bin(), Addrs::localhost().unwrap(), &config).unwrap();
    proxy.stop().unwrap();
    let data = proxy.data_dir();
    std::fs::remove_dir_all(&data).unwrap();
    let mount = Tmpfs::mount(&data, "40m").unwrap();
    proxy.start_again().unwrap();
    let rt = rt();
    let big_layer = big.layer_digests()[0].clone();
    let big_task = rt.spawn(fetch(
        blob_url(&proxy, "quay.io", "fixture/big", &big_layer),
        Vec::new(),
        BodyMode::Count,
    ));
    wait_for(
        "16 MiB of the big layer on disk",
        Duration::from_secs(30),
        || {
            let on_disk: u64 = std::fs::read_dir(data.join("tmp"))
                .unwrap()
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum();
            Ok(on_disk >= 16 << 20)
        },
    )
    .unwrap();
    let small_layer = small.layer_digests()[0].clone();
    let r = Get::new(&blob_url(
        &proxy,
        "other.test",
        "fixture/small",
        &small_layer,
    ))
    .send()
    .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(sha256_digest(&r.body), small_layer);
    wait_for("the small layer cached", Duration::from_secs(10), || {
        Ok(cached_path(&proxy, &small_layer).exists())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", proxy.log()));
    relay.release();
    let big_fetch = rt.block_on(big_task).unwrap();
    let size = std::fs::metadata(big.blob_path(&big_layer)).unwrap().len();
    assert_eq!(big_fetch.bytes, size, "{:?}", big_fetch.error);
    proxy.stop().unwrap();
    drop(mount);
}

/// Log lines are written by a log thread, never dropped: a burst of 1 000
/// requests from 20 concurrent clients, through to the real upstream —
/// pings and tag lists relayed (PASS), a tag and a blob fetched (MISS, then
/// HIT), an unknown blob the upstream answers 404 — gets the right status
/// for every request and exactly one access line each, with that status,
/// each a whole JSON object (lines are not interleaved); the request
/// counter exported with the lines agrees.
#[test]
fn every_request_gets_its_access_line_under_a_burst() {
    const CLIENTS: usize = 20;
    const EACH: usize = 50;
    let up = common::upstream(Registry::plain().unwrap());
    let proxy = common::proxy_for(&up);
    let repo = format!("{}/v2/quay.io/fixture/busybox", proxy.http_url());
    let layer = up.busybox.layer_digests()[0].clone();
    let unknown = format!("sha256:{}", "0".repeat(64));
    // (url, kind in the access log, status): clients take turns through them.
    let mix: Arc<Vec<(String, &str, StatusCode)>> = Arc::new(vec![
        (
            format!("{}/v2/?ns=quay.io", proxy.http_url()),
            "ping",
            StatusCode::OK,
        ),
        (format!("{repo}/tags/list"), "other", StatusCode::OK),
        (format!("{repo}/manifests/1"), "tag", StatusCode::OK),
        (format!("{repo}/blobs/{layer}"), "blob", StatusCode::OK),
        (
            format!("{repo}/blobs/{unknown}"),
            "blob",
            StatusCode::NOT_FOUND,
        ),
    ]);
    let accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";
    let seen = rt().block_on(async {
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let mix = Arc::clone(&mix);
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    for k in 0..EACH {
                        let which = (c + k) % mix.len();
                        let url = mix[which].0.clone();
                        let r = fetch(url, vec![("accept", accept.into())], BodyMode::Keep).await;
                        assert!(r.error.is_none(), "{}: {:?}", mix[which].0, r.error);
                        out.push((which, r.status));
                    }
                    out
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    });
    let want = CLIENTS * EACH;
    assert_eq!(seen.len(), want);
    for (which, status) in &seen {
        let (url, _, expected) = &mix[*which];
        assert_eq!(status, expected, "{url}\n{}", proxy.log());
    }
    wait_for("every access line", Duration::from_secs(10), || {
        Ok(proxy.access_lines().len() >= want)
    })
    .unwrap();
    assert_eq!(proxy.access_lines().len(), want);
    // One line per request, with the kind and status it was answered with.
    // (No two entries of the mix share a kind and a status.)
    for (which, (url, kind, status)) in mix.iter().enumerate() {
        let sent = seen.iter().filter(|(w, _)| *w == which).count();
        let logged = proxy
            .access_matching(&[("kind", kind), ("status", status.as_str())])
            .len();
        assert_eq!(logged, sent, "{url}");
    }
    // The upstream was really in the burst: tag lists relayed every time,
    // the tag and the blob fetched on a MISS, the unknown blob asked for.
    for (kind, cache) in [("other", "PASS"), ("tag", "MISS"), ("blob", "MISS")] {
        assert!(
            !proxy
                .access_matching(&[("kind", kind), ("cache", cache)])
                .is_empty(),
            "no {kind} {cache} line"
        );
    }
    sync_upstream_log(&up.registry);
    let lists = seen.iter().filter(|(w, _)| *w == 1).count();
    assert_eq!(
        up.registry
            .count_requests("GET", "/fixture/busybox/tags/list"),
        lists
    );
    assert!(
        up.registry.count_requests("GET", &unknown) + up.registry.count_requests("HEAD", &unknown)
            >= 1
    );
    // The request counter is updated with each line.
    let m = metrics(&proxy);
    let counted: f64 = m
        .lines()
        .filter(|l| l.starts_with("pullthrough_requests_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert_eq!(counted, want as f64, "{m}");
    // Back-pressure is counted, and this burst (a 16 Ki-line queue, a file
    // as stdout) never made a request wait for the log writer. That a full
    // queue is counted and loses nothing is shown with a blocked writer in
    // `observe::log_queue`'s tests.
    assert_eq!(metric(&m, "pullthrough_log_queue_full_total"), 0.0, "{m}");
    // Every line on stdout is one JSON object.
    for line in proxy.log().lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            serde_json::from_str::<Value>(line).is_ok(),
            "not one JSON object: {line}"
        );
    }
}

// --- 4. private images -----------------------------------------------------

/// `private: true` on an htpasswd upstream: the authorised client pulls
/// (MISS, then HIT); no or wrong credentials get 401 and none of the
/// content, for the manifest and each blob by digest. A public repository
/// on a plain upstream stays anonymous (HIT with no upstream contact).
#[test]
fn private_registries_check_every_client() {
    use base64::Engine as _;
    let up = common::upstream(Registry::htpasswd("puller", "s3cret").unwrap());
    let public = common::upstream(Registry::plain().unwrap());
    let proxy = Proxy::start(
        common::proxy_bin(),
        Addrs::localhost().unwrap(),
        &format!(
            "authCheckTTL: 2s\nregistries:\n  - host: private.test\n    upstream: {}\n    caBundle: {}\n    private: true\n  - host: public.test\n    upstream: {}\n",
            up.registry.url(),
            up.registry.ca_path().unwrap().display(),
            public.registry.url(),
        ),
    )
    .unwrap();
    let basic = |u: &str, p: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        )
    };
    let good = basic("puller", "s3cret");
    let bad = basic("puller", "wrong");
    let m = &up.busybox.manifests[0];
    let mut digests = vec![(format!("manifests/{}", m.digest), m.digest.clone())];
    digests.push((
        format!("blobs/{}", m.config.digest),
        m.config.digest.clone(),
    ));
    for l in up.busybox.layer_digests() {
        digests.push((format!("blobs/{l}"), l));
    }
    let req = |reg: &str, path: &str, auth: Option<&str>| {
        let url = format!("{}/v2/{reg}/fixture/busybox/{path}", proxy.http_url());
        let mut g = Get::new(&url).header(
            "Accept",
            "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
        );
        if let Some(a) = auth {
            g = g.header("Authorization", a.to_string());
        }
        g.send().unwrap()
    };
    // Authorised: MISS then HIT.
    for round in ["MISS", "HIT"] {
        for (path, d) in &digests {
            let r = req("private.test", path, Some(&good));
            assert_eq!(r.status, StatusCode::OK, "{round} {path}");
            assert_eq!(sha256_digest(&r.body), *d);
            proxy
                .wait_access(&[
                    ("digest", d),
                    ("cache", round),
                    ("registry", "private.test"),
                ])
                .unwrap();
        }
    }
    // Everything is cached now; others get 401 and no content.
    for auth in [None, Some(bad.as_str())] {
        for (path, d) in &digests {
            let r = req("private.test", path, auth);
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path} with {auth:?}");
            assert!(
                r.headers.contains_key("www-authenticate"),
                "{path}: no challenge"
            );
            assert_ne!(sha256_digest(&r.body), *d);
            assert!(r.body.len() < 1024, "{path}: {} bytes", r.body.len());
        }
    }
    let metrics_text = metrics(&proxy);
    assert!(
        metric(
            &metrics_text,
            "pullthrough_auth_checks_total{registry=\"private.test\",result=\"denied\"}"
        ) >= 1.0,
        "{metrics_text}"
    );
    // Public: anonymous MISS, then HITs with no upstream contact at all.
    let pm = &public.busybox.manifests[0];
    let layer = public.busybox.layer_digests()[0].clone();
    assert_eq!(
        req("public.test", &format!("blobs/{layer}"), None).status,
        StatusCode::OK
    );
    assert_eq!(
        req("public.test", &format!("manifests/{}", pm.digest), None).status,
        StatusCode::OK
    );
    sync_upstream_log(&public.registry);
    let seen: usize = ["GET", "HEAD"]
        .iter()
        .map(|m| public.registry.count_requests(m, "/fixture/"))
        .sum();
    for _ in 0..3 {
        let r = req("public.test", &format!("blobs/{layer}"), None);
        assert_eq!(sha256_digest(&r.body), layer);
        assert_eq!(
            req("public.test", &format!("manifests/{}", pm.digest), None).status,
            StatusCode::OK
        );
    }
    sync_upstream_log(&public.registry);
    let after: usize = ["GET", "HEAD"]
        .iter()
        .map(|m| public.registry.count_requests(m, "/fixture/"))
        .sum();
    assert_eq!(seen, after, "public HITs contacted the upstream");
}

// --- 5. admin API, status, metrics ----------------------------------------

fn admin(
    proxy: &Proxy,
    method: http::Method,
    path: &str,
    token: Option<&str>,
) -> (StatusCode, Value) {
    let url = format!("http://{}{path}", proxy.addrs.admin);
    let mut g = Get::new(&url).method(method);
    if let Some(t) = token {
        g = g.header("Authorization", format!("Bearer {t}"));
    }
    let r = g.send().unwrap();
    (
        r.status,
        serde_json::from_slice(&r.body).unwrap_or(Value::Null),
    )
}

fn admin_json(proxy: &Proxy, path: &str, token: Option<&str>) -> Value {
    let (status, v) = admin(proxy, http::Method::GET, path, token);
    assert_eq!(status, StatusCode::OK, "{path}");
    v
}

/// A proxy with admin token `t0ken` for `quay.io`, an upstream with the
/// busybox fixture.
fn admin_proxy() -> (common::Upstream, Proxy) {
    let up = common::upstream(Registry::plain().unwrap());
    let proxy = Proxy::start(
        common::proxy_bin(),
        Addrs::localhost().unwrap(),
        &format!(
            "adminToken: t0ken\n{}",
            common::one_registry("quay.io", &up.registry.url(), "")
        ),
    )
    .unwrap();
    (up, proxy)
}

#[test]
fn admin_api_lists_purges_and_reports() {
    let (up, proxy) = admin_proxy();
    // /status: the hash of the exact file bytes, the registries.
    let status = admin_json(&proxy, "/status", None);
    let file = std::fs::read(proxy.config_path()).unwrap();
    assert_eq!(
        format!("sha256:{}", status["configHash"].as_str().unwrap()),
        sha256_digest(&file)
    );
    assert_eq!(status["registries"], serde_json::json!(["quay.io"]));
    // The token is required.
    assert_eq!(
        admin(&proxy, http::Method::GET, "/admin/cache", None).0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        admin(&proxy, http::Method::GET, "/admin/stats", Some("nope")).0,
        StatusCode::UNAUTHORIZED
    );
    let tok = Some("t0ken");
    let layers = up.busybox.layer_digests();
    let m = &up.busybox.manifests[0];
    for d in layers.iter().chain([&m.config.digest]) {
        let r = Get::new(&blob_url(&proxy, "quay.io", "fixture/busybox", d))
            .send()
            .unwrap();
        assert_eq!(r.status, StatusCode::OK);
    }
    let cache = admin_json(&proxy, "/admin/cache", tok);
    let repo = &cache["registries"]["quay.io"]["repositories"]["fixture/busybox"];
    let listed: Vec<&str> = repo["digests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["digest"].as_str().unwrap())
        .collect();
    for d in layers.iter().chain([&m.config.digest]) {
        assert!(listed.contains(&d.as_str()), "{d} not in {cache}");
    }
    assert!(repo["digests"][0]["size"].as_u64().unwrap() > 0);
    assert!(repo["digests"][0]["lastAccess"].as_u64().unwrap() > 1_600_000_000);
    let stats = admin_json(&proxy, "/admin/stats", tok);
    assert_eq!(stats["entries"].as_u64().unwrap(), listed.len() as u64);
    assert_eq!(stats["bytes"].as_u64().unwrap(), blob_bytes_on_disk(&proxy));

    // Purge one digest, then the repository.
    let (st, v) = admin(
        &proxy,
        http::Method::DELETE,
        &format!("/admin/cache?digest={}", layers[0]),
        tok,
    );
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(!cached_path(&proxy, &layers[0]).exists());
    assert!(cached_path(&proxy, &m.config.digest).exists());
    let (st, v) = admin(
        &proxy,
        http::Method::DELETE,
        "/admin/cache?registry=quay.io&repository=fixture/busybox",
        tok,
    );
    assert_eq!(st, StatusCode::OK, "{v}");
    assert!(!cached_path(&proxy, &m.config.digest).exists());
    assert_eq!(admin_json(&proxy, "/admin/stats", tok)["entries"], 0);
    assert_eq!(
        admin(&proxy, http::Method::DELETE, "/admin/cache", tok).0,
        StatusCode::BAD_REQUEST
    );
    // Served again after the purge (a MISS).
    let r = Get::new(&blob_url(&proxy, "quay.io", "fixture/busybox", &layers[0]))
        .send()
        .unwrap();
    assert_eq!(sha256_digest(&r.body), layers[0]);
    // Metrics: the new families are there.
    let text = metrics(&proxy);
    for name in [
        "pullthrough_cache_bytes",
        "pullthrough_cache_entries",
        "pullthrough_cache_evictions_total",
        "pullthrough_disk_full_events_total",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    assert!(metric(&text, "pullthrough_cache_entries") >= 1.0, "{text}");
}

/// A purge by digest withdraws the manifest from its tags too: the tag
/// answer stays cached, but it is used only while the manifest it names
/// is, so the next pull of the tag asks the upstream again, even for tag
/// `1`, which looks like a version and is never asked about again while
/// its manifest is cached (the default tag policy). The purge is counted
/// in the metrics.
#[test]
fn a_digest_purge_withdraws_the_manifest_from_its_tags_and_is_counted() {
    let (up, proxy) = admin_proxy();
    let tag_url = format!(
        "{}/v2/quay.io/fixture/busybox/manifests/1",
        proxy.http_url()
    );
    let accept = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";
    let pull_tag = || {
        let r = Get::new(&tag_url).header("Accept", accept).send().unwrap();
        assert_eq!(r.status, StatusCode::OK);
        r.headers["docker-content-digest"]
            .to_str()
            .unwrap()
            .to_string()
    };
    let asked_upstream = || {
        sync_upstream_log(&up.registry);
        ["GET", "HEAD"]
            .iter()
            .map(|m| {
                up.registry
                    .count_requests(m, "/v2/fixture/busybox/manifests/1")
            })
            .sum::<usize>()
    };
    let digest = pull_tag();
    assert_eq!(pull_tag(), digest);
    let before = asked_upstream();
    assert!(before >= 1);
    assert_eq!(asked_upstream(), before, "an immutable tag is asked once");
    let (st, v) = admin(
        &proxy,
        http::Method::DELETE,
        &format!("/admin/cache?digest={digest}"),
        Some("t0ken"),
    );
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["removed"], serde_json::json!([digest]), "{v}");
    assert_eq!(pull_tag(), digest);
    assert!(
        asked_upstream() > before,
        "the tag was answered from the cache after its manifest was purged"
    );
    let text = metrics(&proxy);
    assert_eq!(
        metric(
            &text,
            r#"pullthrough_purges_total{scope="all",outcome="complete"}"#
        ),
        1.0,
        "{text}"
    );
    assert!(
        metric(&text, "pullthrough_purged_bytes_total") > 0.0,
        "{text}"
    );
}

/// A purge that cannot remove one blob (a file system error) removes the
/// others, says which failed, and keeps the failed one listed under its
/// repository, so the same purge can be retried. Before, the repository's
/// record was dropped first: a retry found nothing to remove, and the
/// blob stayed on disk, no longer listed.
#[test]
fn a_purge_that_fails_for_one_blob_can_be_retried() {
    let (up, proxy) = admin_proxy();
    let tok = Some("t0ken");
    let m = &up.busybox.manifests[0];
    let digests: Vec<String> = up
        .busybox
        .layer_digests()
        .into_iter()
        .chain([m.config.digest.clone()])
        .collect();
    for d in &digests {
        let r = Get::new(&blob_url(&proxy, "quay.io", "fixture/busybox", d))
            .send()
            .unwrap();
        assert_eq!(r.status, StatusCode::OK);
    }
    // The config blob cannot be unlinked: a non-empty directory in its place.
    let stuck = &m.config.digest;
    let path = cached_path(&proxy, stuck);
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    std::fs::write(path.join("obstacle"), b"x").unwrap();

    let purge = "/admin/cache?registry=quay.io&repository=fixture/busybox";
    let (st, v) = admin(&proxy, http::Method::DELETE, purge, tok);
    assert_eq!(st, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    assert_eq!(v["failed"][0]["digest"], stuck.as_str(), "{v}");
    assert!(
        v["failed"][0]["error"].as_str().unwrap().contains("remove"),
        "{v}"
    );
    let removed: Vec<&str> = v["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    for d in digests.iter().filter(|d| *d != stuck) {
        assert!(removed.contains(&d.as_str()), "{d} not removed: {v}");
        assert!(!cached_path(&proxy, d).exists());
    }
    let cache = admin_json(&proxy, "/admin/cache", tok);
    let listed = &cache["registries"]["quay.io"]["repositories"]["fixture/busybox"]["digests"];
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{cache}");
    assert_eq!(listed[0]["digest"], stuck.as_str(), "{cache}");
    assert_eq!(admin_json(&proxy, "/admin/stats", tok)["entries"], 1);

    // The obstacle gone, the same purge finishes the job.
    std::fs::remove_dir_all(&path).unwrap();
    let (st, v) = admin(&proxy, http::Method::DELETE, purge, tok);
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(admin_json(&proxy, "/admin/stats", tok)["entries"], 0);
    let cache = admin_json(&proxy, "/admin/cache", tok);
    assert!(cache["registries"].get("quay.io").is_none(), "{cache}");
}

/// A purge while a HIT waits for its access check (the upstream is asked,
/// `private: true`) does not fail the HIT: the blob was opened when it was
/// found and is served from that file. Its path, opened anew after the
/// check, was gone by then, and the client got a 500.
#[test]
fn a_purge_during_a_hits_access_check_still_serves_it() {
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 29 % 251) as u8).collect();
    let d = sha256_digest(&bytes);
    let held = format!("/v2/team/app/blobs/{d}");
    // Set once the blob is cached: the next access check purges it first.
    let purge_url: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let stub = {
        let (bytes, purge_url) = (bytes::Bytes::from(bytes.clone()), Arc::clone(&purge_url));
        Stub::canned()
            .route(move |seen| {
                let r = http::Response::builder();
                if seen.path != held {
                    let status = if seen.path == "/v2/" { 200 } else { 404 };
                    return r.status(status).body(bytes::Bytes::new()).unwrap();
                }
                if !seen.headers.contains_key("range") {
                    return r
                        .header("content-length", bytes.len())
                        .body(bytes.clone())
                        .unwrap();
                }
                // The access check (a one-byte GET).
                if let Some(url) = purge_url.lock().unwrap().take() {
                    // A thread of its own: this one runs the stub's runtime.
                    let purged = std::thread::spawn(move || {
                        Get::new(&url)
                            .method(http::Method::DELETE)
                            .send()
                            .unwrap()
                            .status
                    })
                    .join()
                    .unwrap();
                    assert_eq!(purged, StatusCode::OK, "the purge");
                }
                r.status(StatusCode::PARTIAL_CONTENT)
                    .header("content-range", format!("bytes 0-0/{}", bytes.len()))
                    .body(bytes.slice(..1))
                    .unwrap()
            })
            .start()
            .unwrap()
    };
    let proxy = Proxy::start(
        common::proxy_bin(),
        Addrs::localhost().unwrap(),
        &format!(
            "registries:\n  - host: private.test\n    upstream: {}\n    private: true\n    allowPrivateNetworks: true\n",
            stub.url()
        ),
    )
    .unwrap();
    let url = blob_url(&proxy, "private.test", "team/app", &d);
    let r = Get::new(&url).send().unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body == bytes);
    assert!(cached_path(&proxy, &d).exists());

    *purge_url.lock().unwrap() = Some(format!(
        "http://{}/admin/cache?digest={d}",
        proxy.addrs.admin
    ));
    // Another client: its access is checked with the upstream.
    let r = Get::new(&url)
        .header("Authorization", "Bearer another-client")
        .send()
        .unwrap();
    assert!(
        purge_url.lock().unwrap().is_none(),
        "no access check was asked"
    );
    assert!(!cached_path(&proxy, &d).exists(), "not purged");
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{:?}",
        String::from_utf8_lossy(&r.body)
    );
    assert!(r.body == bytes, "{} bytes", r.body.len());
    proxy
        .wait_access(&[("digest", &d), ("cache", "HIT")])
        .unwrap();
}

/// A loopback admin listener without a token (the embedded default)
/// trusts its callers, but only those that name it by a loopback name: a
/// web page whose own name was rebound to 127.0.0.1 (DNS rebinding) sends
/// its own Host, and must neither purge the cache nor read what `/status`
/// shows trusted callers only.
#[test]
fn an_open_admin_listener_refuses_a_foreign_host_name() {
    let up = common::upstream(Registry::plain().unwrap());
    let proxy = Proxy::start(
        common::proxy_bin(),
        Addrs::localhost().unwrap(),
        &common::one_registry("quay.io", &up.registry.url(), ""),
    )
    .unwrap();
    let port = proxy.addrs.admin.port();
    let call = |method: http::Method, path: &str, host: &str| {
        let url = format!("http://{}{path}", proxy.addrs.admin);
        Get::new(&url)
            .method(method)
            .header("Host", host)
            .send()
            .unwrap()
            .status
    };
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
    ] {
        assert_eq!(
            call(http::Method::GET, "/admin/stats", &host),
            StatusCode::OK,
            "{host}"
        );
    }
    for host in [
        format!("evil.example:{port}"),
        "evil.example".to_string(),
        format!("127.0.0.1.nip.io:{port}"),
    ] {
        assert_eq!(
            call(http::Method::DELETE, "/admin/cache?registry=quay.io", &host),
            StatusCode::FORBIDDEN,
            "{host}"
        );
        assert_eq!(
            call(http::Method::GET, "/admin/tags", &host),
            StatusCode::FORBIDDEN,
            "{host}"
        );
    }
    // Probes and metrics stay open to anyone (kubelet, Prometheus).
    assert_eq!(
        call(
            http::Method::GET,
            "/healthz",
            &format!("evil.example:{port}")
        ),
        StatusCode::OK
    );
}

/// The admin listener on a non-loopback address without a token: probes,
/// metrics and /status are served (kubelet and the operator need them), the
/// cache admin API is disabled. The proxy runs in a network namespace the
/// test creates, listening on an address that exists only there, and is
/// asked from inside it: nothing is exposed on the machine's interfaces.
#[test]
fn exposed_admin_without_a_token_disables_the_admin_api() {
    use pullthrough_testbed::ns::{NetNs, netns_command, netns_http_status_with};
    let dir = tempfile::tempdir().unwrap();
    let ip: std::net::IpAddr = "10.254.77.1".parse().unwrap();
    let netns = NetNs::create(&[ip]).unwrap();
    let config = dir.path().join("c.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: {{admin: {ip}:9090}}\ndataDir: {}\nregistries: []\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let mut cmd = netns_command(
        netns.name(),
        common::proxy_bin(),
        [std::ffi::OsStr::new("--config"), config.as_os_str()],
    );
    cmd.env_remove("PULLTHROUGH_ADMIN_TOKEN");
    let mut proxy = pullthrough_testbed::process::Process::spawn(
        "pullthrough-proxy",
        cmd,
        dir.path().join("proxy.log"),
    )
    .unwrap();
    // The status a GET answers with, asked inside the namespace.
    let status = |path: &str, auth: bool| {
        let headers: &[&str] = if auth {
            &["Authorization: Bearer guess"]
        } else {
            &[]
        };
        netns_http_status_with(netns.name(), &format!("http://{ip}:9090{path}"), headers)
    };
    proxy
        .wait_ready("proxy /readyz", Duration::from_secs(30), || {
            Ok(status("/readyz", false) == Some(200))
        })
        .unwrap();
    for open in ["/healthz", "/status", "/metrics", "/ca.crt"] {
        assert_eq!(status(open, false), Some(200), "{open}");
    }
    for closed in ["/admin/stats", "/admin/cache"] {
        assert_eq!(status(closed, true), Some(403), "{closed}");
    }
    assert!(
        proxy.log().contains("/admin/* is disabled"),
        "{}",
        proxy.log()
    );
}

// --- 7. graceful shutdown --------------------------------------------------

/// SIGTERM during a slow download: the download finishes completely, new
/// connections are refused, and the process exits 0.
#[test]
fn sigterm_drains_a_slow_download_and_exits_zero() {
    let work = tempfile::tempdir().unwrap();
    // 3 MiB at 640 KiB/s: ~5 s, so the drain outlasts the check below.
    let image = random_image(work.path(), &[3 << 20], 77);
    let layer = image.layer_digests()[0].clone();
    let expected = std::fs::read(image.blob_path(&layer)).unwrap();
    let stub = Stub::builder(&image.layout)
        .throttle(Throttle {
            chunk: 64 * 1024,
            pause: Duration::from_millis(100),
        })
        .start()
        .unwrap();
    let mut proxy = common::proxy_serving("slow.test", &stub.url());
    let url = blob_url(&proxy, "slow.test", "fixture/slow", &layer);
    let http_addr = proxy.addrs.http;
    let runtime = rt();
    let download = runtime.spawn(fetch(url, Vec::new(), BodyMode::Keep));
    // SIGTERM once the download is under way (its temp file exists).
    wait_for("the download to start", Duration::from_secs(10), || {
        Ok(!tmp_entries(&proxy).is_empty())
    })
    .unwrap();
    proxy
        .process()
        .unwrap()
        .signal(nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    // Refused at once, while the drain goes on: a client (a runtime, a
    // peer replica) falls back instead of hanging in a backlog nobody
    // accepts from until the process exits.
    wait_for(
        "new connections to be refused",
        Duration::from_secs(1),
        || Ok(std::net::TcpStream::connect(http_addr).is_err()),
    )
    .unwrap();
    assert!(
        !download.is_finished(),
        "the drain was over before the check"
    );
    let r = runtime.block_on(download).unwrap();
    assert!(r.error.is_none(), "{:?}", r.error);
    assert!(r.body == expected, "download cut: {} bytes", r.body.len());
    let status = proxy.stop_status().unwrap().unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// With a shutdown delay (the chart's 5s; 2s here), SIGTERM first turns
/// /readyz to 503 while new connections are still accepted and served, so
/// the clients kube-proxy sends before the Service forgets the pod are not
/// refused; then the listeners close and the process exits 0.
#[test]
fn sigterm_with_a_delay_keeps_serving_while_not_ready() {
    let registry = Registry::plain().unwrap();
    let mut proxy = Proxy::start_env(
        common::proxy_bin(),
        Addrs::localhost().unwrap(),
        &common::one_registry("quay.io", &registry.url(), ""),
        &[("PULLTHROUGH_SHUTDOWN_DELAY", "2s")],
    )
    .unwrap();
    let ready_url = format!("http://{}/readyz", proxy.addrs.admin);
    let ping = format!("{}/v2/", proxy.http_url());
    proxy
        .process()
        .unwrap()
        .signal(nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    let signalled = Instant::now();
    wait_for("/readyz to fail", Duration::from_secs(1), || {
        Ok(Get::new(&ready_url)
            .send()
            .is_ok_and(|r| r.status == StatusCode::SERVICE_UNAVAILABLE))
    })
    .unwrap();
    // A new connection, during the delay: served.
    let r = Get::new(&ping).send().unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", proxy.log());
    assert!(
        signalled.elapsed() < Duration::from_secs(2),
        "too slow a machine to ask within the delay"
    );
    let http_addr = proxy.addrs.http;
    wait_for("the listeners closed", Duration::from_secs(5), || {
        Ok(std::net::TcpStream::connect(http_addr).is_err())
    })
    .unwrap();
    assert!(signalled.elapsed() >= Duration::from_secs(2));
    let status = proxy.stop_status().unwrap().unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

// --- 8. crash safety -------------------------------------------------------

/// kill -9 during 20 concurrent misses, restart on the same data dir:
/// every file under blobs/ hashes to its name, no temp file is left, and
/// every blob is then served whole.
#[test]
fn kill_9_during_misses_leaves_no_partial_entry() {
    let work = tempfile::tempdir().unwrap();
    let image = random_image(work.path(), &[2 << 20; 20], 2000);
    let layers = image.layer_digests();
    let registry = Registry::plain().unwrap();
    registry.push_image(&image, "fixture/crash", "1").unwrap();
    let mut proxy = common::proxy_serving("quay.io", &registry.url());
    let runtime = rt();
    let tasks: Vec<_> = layers
        .iter()
        .map(|d| {
            let fetch = runtime.spawn(try_fetch(
                blob_url(&proxy, "quay.io", "fixture/crash", d),
                Vec::new(),
                BodyMode::Keep,
            ));
            (d, fetch)
        })
        .collect();
    // Kill once some bytes flow, before all is done.
    wait_for("a partial download", Duration::from_secs(10), || {
        Ok(!tmp_entries(&proxy).is_empty())
    })
    .unwrap();
    proxy.kill().unwrap();
    for (d, t) in tasks {
        // A cut response is never a complete-looking wrong one: a
        // response that ended cleanly is the very blob asked for.
        if let Ok(r) = runtime.block_on(t).unwrap()
            && r.error.is_none()
            && r.status == StatusCode::OK
        {
            assert_eq!(sha256_digest(&r.body), *d);
        }
    }
    proxy.start_again().unwrap();
    assert!(tmp_entries(&proxy).is_empty(), "{:?}", tmp_entries(&proxy));
    for f in blob_files(&proxy) {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(
            sha256_digest(&std::fs::read(&f).unwrap()),
            format!("sha256:{name}"),
            "{} is corrupt",
            f.display()
        );
    }
    for d in &layers {
        let r = Get::new(&blob_url(&proxy, "quay.io", "fixture/crash", d))
            .send()
            .unwrap();
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(sha256_digest(&r.body), *d);
    }
}

/// A client joining a download another client started for a repository
/// that needs credentials is checked first: without credentials it gets
/// the upstream's 401 and none of the bytes; the download goes on for the
/// authorised client.
#[test]
fn joining_a_private_download_needs_access_too() {
    use base64::Engine as _;
    let work = tempfile::tempdir().unwrap();
    let image = random_image(work.path(), &[1 << 20], 31);
    let layer = image.layer_digests()[0].clone();
    let expected = std::fs::read(image.blob_path(&layer)).unwrap();
    let stub = Stub::builder(&image.layout)
        .auth(pullthrough_testbed::stub::StubAuth::basic("u", "p"))
        .throttle(Throttle {
            chunk: 64 * 1024,
            pause: Duration::from_millis(60),
        })
        .start()
        .unwrap();
    let proxy = common::proxy_serving("priv.test", &stub.url());
    let url = blob_url(&proxy, "priv.test", "fixture/secret", &layer);
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("u:p")
    );
    let (owner, intruder) = rt().block_on(async {
        let owner = tokio::spawn(fetch(
            url.clone(),
            vec![("authorization", auth)],
            BodyMode::Keep,
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let intruder = fetch(url.clone(), Vec::new(), BodyMode::Keep).await;
        (owner.await.unwrap(), intruder)
    });
    assert!(
        owner.error.is_none() && owner.body == expected,
        "{:?}",
        owner.error
    );
    assert_eq!(intruder.status, StatusCode::UNAUTHORIZED);
    assert!(intruder.body.len() < 1024);
    // One download; the intruder was only asked about (a one-byte GET).
    assert_eq!(stub.downloads(&layer), 1);
}

/// A leader refused before its download starts (an anonymous ask for a
/// private layer, held up by a slow upstream while authorised clients
/// joined it) hands the download to one of its waiters: the upstream sends
/// the layer once and it is cached. Before, every waiter fetched it on
/// its own and uncached, which any client could cause on purpose.
#[test]
fn a_refused_leader_hands_the_download_to_a_waiter() {
    use base64::Engine as _;
    const WAITERS: usize = 8;
    let work = tempfile::tempdir().unwrap();
    let image = random_image(work.path(), &[1 << 20], 37);
    let layer = image.layer_digests()[0].clone();
    let expected = std::fs::read(image.blob_path(&layer)).unwrap();
    let stub = Stub::builder(&image.layout)
        .auth(pullthrough_testbed::stub::StubAuth::basic("u", "p"))
        .start()
        .unwrap();
    // Holds every upstream answer until released: the anonymous leader's
    // 401 arrives only once the others have joined its download.
    let relay = Relay::start(stub.addr()).unwrap();
    relay.hold_after(0);
    let proxy = common::proxy_serving("priv.test", &format!("http://{}", relay.addr));
    let url = blob_url(&proxy, "priv.test", "fixture/secret", &layer);
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("u:p")
    );
    let asked = |authorised: bool| {
        stub.requests()
            .iter()
            .filter(|s| s.path.contains(layer.as_str()) && s.auth().is_some() == authorised)
            .count()
    };
    let (leader, waiters) = rt().block_on(async {
        let leader = tokio::spawn(fetch(url.clone(), Vec::new(), BodyMode::Keep));
        wait_for("the leader's ask upstream", Duration::from_secs(10), || {
            Ok(asked(false) == 1)
        })
        .unwrap();
        let waiters: Vec<_> = (0..WAITERS)
            .map(|_| {
                tokio::spawn(fetch(
                    url.clone(),
                    vec![("authorization", auth.clone())],
                    BodyMode::Keep,
                ))
            })
            .collect();
        // Joining a download leaves no trace to wait on; the waiters only
        // need to be in before the release.
        tokio::time::sleep(Duration::from_millis(300)).await;
        relay.release();
        let leader = leader.await.unwrap();
        let mut out = Vec::new();
        for w in waiters {
            out.push(w.await.unwrap());
        }
        (leader, out)
    });
    assert_eq!(leader.status, StatusCode::UNAUTHORIZED);
    for w in &waiters {
        assert_eq!(w.status, StatusCode::OK, "{:?}", w.error);
        assert!(w.error.is_none() && w.body == expected, "{:?}", w.error);
    }
    // One authorised download upstream (a waiter that joined an access
    // check would add one-byte ranged GETs, which are not downloads).
    let downloads = stub
        .requests()
        .iter()
        .filter(|s| {
            s.method == http::Method::GET
                && s.path.contains(layer.as_str())
                && s.auth().is_some()
                && !s.headers.contains_key(http::header::RANGE)
        })
        .count();
    assert_eq!(downloads, 1, "authorised downloads of the layer");
    wait_for("the layer cached", Duration::from_secs(10), || {
        Ok(cached_path(&proxy, &layer).exists())
    })
    .unwrap();
}

//! The shared tier on a real object store (issue #12): SeaweedFS with its
//! S3 gateway on loopback, started by the test bed, and real
//! `pullthrough-proxy` processes over one bucket.
//!
//! - a replica that lost its disk serves manifests and blobs from the
//!   bucket with the upstream stopped;
//! - a client refused a blob the bucket holds gets no byte of it, and the
//!   next client is served from the bucket at once;
//! - 50 clients over 3 replicas on one bucket: 1 upstream GET, 1 object;
//! - the owner SIGKILLed mid-blob: nothing partial reaches the bucket;
//! - corrupt upstream bytes never reach the bucket, and a bad object in
//!   the bucket (a blob or a manifest) is dropped and fetched again;
//! - eviction across 3 replicas keeps the bucket under `maxSize`;
//! - a missing bucket, refused credentials, a stopped server: a clear
//!   error in the log, and pulls go on by pass-through.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::Replicas;
use http::StatusCode;
use pullthrough_testbed::fixtures::{Image, LayoutBuilder, sha256_digest};
use pullthrough_testbed::http::Get;
use pullthrough_testbed::net::wait_for;
use pullthrough_testbed::proxy::{Addrs, Proxy};
use pullthrough_testbed::registry::Registry;
use pullthrough_testbed::relay::Relay;
use pullthrough_testbed::seaweed::SeaweedFs;
use pullthrough_testbed::stub::Stub;

const HOST: &str = "quay.io";

/// The bucket's credentials as a mounted Secret would give them.
fn credentials_dir(s3: &SeaweedFs, access: &str, secret: &str) -> tempfile::TempDir {
    let _ = s3;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("accessKeyId"), access).unwrap();
    std::fs::write(dir.path().join("secretAccessKey"), secret).unwrap();
    dir
}

/// `storage:` for `bucket` on `s3`, credentials from `creds`.
fn storage(s3: &SeaweedFs, bucket: &str, creds: &Path, extra: &str) -> String {
    storage_at(&s3.endpoint(), bucket, creds, extra)
}

/// `storage:` for `bucket` at `endpoint` (a relay in front of the server).
fn storage_at(endpoint: &str, bucket: &str, creds: &Path, extra: &str) -> String {
    format!(
        "storage:\n  s3:\n    endpoint: '{endpoint}'\n    allowHttp: true\n    pathStyle: true\n    bucket: {bucket}\n    prefix: pullthrough\n    credentials: {{source: files, dir: '{}'}}\n{extra}",
        creds.display()
    )
}

fn start_proxy(upstream: &str, extra: &str) -> Proxy {
    Proxy::start(
        common::proxy_bin(),
        Addrs::localhost().unwrap(),
        &format!("{}{extra}", common::one_registry(HOST, upstream, "")),
    )
    .unwrap()
}

fn url(proxy: &Proxy, repo: &str, kind: &str, reference: &str) -> String {
    format!("{}/v2/{HOST}/{repo}/{kind}/{reference}", proxy.http_url())
}

const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json";

fn get_ok(url: &str) -> Vec<u8> {
    let resp = Get::new(url)
        .header("accept", ACCEPT)
        .timeout(Duration::from_secs(60))
        .send()
        .unwrap();
    assert_eq!(
        resp.status,
        StatusCode::OK,
        "{url}: {}",
        String::from_utf8_lossy(&resp.body)
    );
    resp.body.to_vec()
}

fn random_image(dir: &Path, sizes: &[u64], seed: u64) -> Image {
    LayoutBuilder::new(&dir.join("layout"))
        .unwrap()
        .random("1", sizes, seed)
        .unwrap()
}

/// Keys of blob objects in the bucket, by digest hex, with sizes.
fn bucket_blobs(s3: &SeaweedFs, bucket: &str) -> Vec<(String, u64)> {
    s3.objects(bucket, "pullthrough/blobs/")
        .unwrap()
        .into_iter()
        .map(|o| {
            (
                o.key.rsplit('/').next().unwrap_or_default().to_string(),
                o.size,
            )
        })
        .collect()
}

fn wait_in_bucket(s3: &SeaweedFs, bucket: &str, digests: &[String]) {
    wait_for(
        "the blobs to reach the bucket",
        Duration::from_secs(30),
        || {
            let have = bucket_blobs(s3, bucket);
            Ok(digests
                .iter()
                .all(|d| have.iter().any(|(k, _)| d.ends_with(k.as_str()))))
        },
    )
    .unwrap();
}

/// Replica A pulls an image (manifest by digest, config, layers); they
/// reach the bucket with their media types. A then loses its disk (an
/// emptyDir after a reschedule) and the upstream stops: A serves every
/// object again, from the bucket, byte-exact, logged SHARED_HIT.
#[test]
fn a_replica_that_lost_its_disk_serves_from_the_bucket_with_the_upstream_stopped() {
    let s3 = SeaweedFs::start().unwrap();
    s3.create_bucket("cache").unwrap();
    let creds = credentials_dir(&s3, s3.access_key(), s3.secret_key());
    let work = tempfile::tempdir().unwrap();
    let image = random_image(work.path(), &[3 << 20, 9 << 20], 21);
    let mut registry = Registry::plain().unwrap();
    registry.push_image(&image, "fixture/app", "1").unwrap();
    let mut proxy = start_proxy(&registry.url(), &storage(&s3, "cache", creds.path(), ""));
    let manifest_digest = image.digest.clone();
    let manifest = get_ok(&url(&proxy, "fixture/app", "manifests", &manifest_digest));
    let mut blobs = image.layer_digests();
    blobs.push(image.manifests[0].config.digest.clone());
    for d in &blobs {
        let body = get_ok(&url(&proxy, "fixture/app", "blobs", d));
        assert_eq!(&sha256_digest(&body), d);
    }
    let mut all = blobs.clone();
    all.push(manifest_digest.clone());
    wait_in_bucket(&s3, "cache", &all);
    // Each object carries the media type it is served with (a manifest's
    // decides how it is served again).
    let types = s3.objects("cache", "pullthrough/blobs/").unwrap();
    let type_of = |d: &str| {
        types
            .iter()
            .find(|o| d.ends_with(o.key.rsplit('/').next().unwrap_or("-")))
            .and_then(|o| o.content_type.clone())
    };
    assert_eq!(
        type_of(&manifest_digest).as_deref(),
        Some(image.media_type.as_str())
    );
    assert_eq!(
        type_of(&blobs[0]).as_deref(),
        Some("application/octet-stream")
    );

    registry.stop().unwrap();
    proxy.stop().unwrap();
    std::fs::remove_dir_all(proxy.data_dir().join("blobs")).unwrap();
    proxy.start_again().unwrap();
    let again = get_ok(&url(&proxy, "fixture/app", "manifests", &manifest_digest));
    assert_eq!(again, manifest);
    for d in &blobs {
        let body = get_ok(&url(&proxy, "fixture/app", "blobs", d));
        assert_eq!(&sha256_digest(&body), d, "from the bucket");
    }
    // Access lines are written after the response: wait for them.
    let shared_hits = || proxy.access_matching(&[("cache", "SHARED_HIT")]);
    wait_for(
        "a SHARED_HIT line per object",
        Duration::from_secs(10),
        || Ok(shared_hits().len() >= all.len()),
    )
    .unwrap();
    let shared = shared_hits();
    assert_eq!(shared.len(), all.len(), "{shared:#?}");
    // Now on the local disk again: the next read is a plain HIT.
    get_ok(&url(&proxy, "fixture/app", "blobs", &blobs[0]));
    proxy
        .wait_access(&[("cache", "HIT"), ("digest", &blobs[0])])
        .unwrap();
}

/// Bucket content passes the same access gate as a HIT on the disk, and a
/// refusal there ends the merged download it started: a replica without
/// the blobs on its disk (they are in the bucket) is asked for each one
/// through a repository the upstream does not hold it in (404, no byte),
/// then through its own repository, which must be served at once (the
/// refused leader once left its download registered, never started, and
/// every later pull of the digest on that replica waited on it).
#[test]
fn a_refusal_on_a_bucket_hit_opens_nothing_and_stalls_no_later_pull() {
    let s3 = SeaweedFs::start().unwrap();
    s3.create_bucket("cache").unwrap();
    let creds = credentials_dir(&s3, s3.access_key(), s3.secret_key());
    let work = tempfile::tempdir().unwrap();
    let image = random_image(work.path(), &[2 << 20, 1 << 20], 23);
    let registry = Registry::plain().unwrap();
    registry.push_image(&image, "fixture/app", "1").unwrap();
    let mut proxy = start_proxy(&registry.url(), &storage(&s3, "cache", creds.path(), ""));
    let mut blobs = image.layer_digests();
    blobs.push(image.manifests[0].config.digest.clone());
    for d in &blobs {
        get_ok(&url(&proxy, "fixture/app", "blobs", d));
    }
    wait_in_bucket(&s3, "cache", &blobs);
    proxy.stop().unwrap();
    std::fs::remove_dir_all(proxy.data_dir().join("blobs")).unwrap();
    proxy.start_again().unwrap();

    for d in &blobs {
        let r = Get::new(&url(&proxy, "other/empty", "blobs", d))
            .timeout(Duration::from_secs(20))
            .send()
            .unwrap();
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{d} through other/empty");
        assert_ne!(
            &sha256_digest(&r.body),
            d,
            "got the blob through other/empty"
        );
        assert!(r.body.len() < 1024, "{} bytes", r.body.len());
        // Well inside the proxy's idle timeout, which is what ended the
        // stalled pull before.
        let r = Get::new(&url(&proxy, "fixture/app", "blobs", d))
            .timeout(Duration::from_secs(20))
            .send()
            .unwrap_or_else(|e| panic!("{d} after the refusal: {e}"));
        assert_eq!(r.status, StatusCode::OK, "{d}");
        assert_eq!(&sha256_digest(&r.body), d);
    }
    // A line is written once its body is done, a moment after the client
    // has it: wait for the last one.
    let hits = || proxy.access_matching(&[("cache", "SHARED_HIT")]).len();
    wait_for(
        "a SHARED_HIT line per blob",
        Duration::from_secs(10),
        || Ok(hits() >= blobs.len()),
    )
    .unwrap_or_else(|e| panic!("{e}: {:#?}", proxy.access_lines()));
    assert_eq!(
        hits(),
        blobs.len(),
        "each blob served from the bucket once it was asked for where it belongs"
    );
    let refused = proxy.access_matching(&[("repository", "other/empty")]);
    assert_eq!(refused.len(), blobs.len(), "{refused:#?}");
    for line in &refused {
        assert_eq!(line["cache"], "DENIED", "{line}");
        assert_eq!(line["status"], 404, "{line}");
    }
}

/// 50 clients spread over 3 replicas on one bucket miss one blob: one
/// upstream GET, every body exact, one object in the bucket (uploaded by
/// the owner; the others got it from the owner and upload nothing).
#[test]
fn fifty_misses_over_three_replicas_on_one_bucket_fetch_and_store_once() {
    let s3 = SeaweedFs::start().unwrap();
    s3.create_bucket("cache").unwrap();
    let creds = credentials_dir(&s3, s3.access_key(), s3.secret_key());
    let work = tempfile::tempdir().unwrap();
    let image = random_image(work.path(), &[24 << 20], 22);
    let layer = image.layer_digests()[0].clone();
    let expected = Arc::new(std::fs::read(image.blob_path(&layer)).unwrap());
    let registry = Registry::plain().unwrap();
    registry.push_image(&image, "fixture/big", "1").unwrap();
    let relay = Relay::start(registry.addr()).unwrap();
    relay.set_rate(16 << 20);
    let r = Replicas::start(
        3,
        HOST,
        &format!("http://{}", relay.addr),
        &storage(&s3, "cache", creds.path(), ""),
    );
    let owner = r.owner(&layer);
    let results = common::fetch_all(
        (0..50)
            .map(|i| vec![url(&r.proxies[i % 3], "fixture/big", "blobs", &layer)])
            .collect(),
    );
    common::assert_all_exact(&results, &expected);
    registry.sync_log().unwrap();
    assert_eq!(
        registry.count_requests("GET", &layer),
        1,
        "{}",
        registry.log()
    );
    wait_in_bucket(&s3, "cache", std::slice::from_ref(&layer));
    let objects = bucket_blobs(&s3, "cache");
    assert_eq!(objects.len(), 1, "{objects:?}");
    assert_eq!(objects[0].1, expected.len() as u64);
    for (i, p) in r.proxies.iter().enumerate() {
        let status = admin_stats(p);
        let uploaded = status["sharedStorage"]["uploads"]["uploaded"]
            .as_u64()
            .unwrap_or(0);
        let expect = u64::from(i == owner);
        assert_eq!(uploaded, expect, "replica {i} uploads: {status:#}");
    }
}

/// The owner dies mid-blob with the bucket configured: the survivors
/// take over from the upstream with `Range` (see `replicas.rs`), and the
/// bucket ends with the verified blob (uploaded by a survivor that
/// fetched part of it from the upstream) or nothing — never a partial or
/// corrupt object.
#[test]
fn the_owner_dying_mid_blob_leaves_nothing_partial_in_the_bucket() {
    let s3 = SeaweedFs::start().unwrap();
    s3.create_bucket("cache").unwrap();
    let creds = credentials_dir(&s3, s3.access_key(), s3.secret_key());
    let work = tempfile::tempdir().unwrap();
    let image = random_image(work.path(), &[32 << 20], 26);
    let layer = image.layer_digests()[0].clone();
    let expected = std::fs::read(image.blob_path(&layer)).unwrap();
    let registry = Registry::plain().unwrap();
    registry.push_image(&image, "fixture/big", "1").unwrap();
    let relay = Relay::start(registry.addr()).unwrap();
    relay.hold_after(12 << 20);
    let mut r = Replicas::start(
        3,
        HOST,
        &format!("http://{}", relay.addr),
        &storage(&s3, "cache", creds.path(), ""),
    );
    common::kill_owner_mid_blob(
        &mut r,
        &relay,
        &registry,
        (HOST, "fixture/big", &layer),
        &expected,
    );
    let objects = s3.objects("cache", "pullthrough/blobs/").unwrap();
    assert!(objects.len() <= 1, "{objects:?}");
    if let Some(o) = objects.first() {
        assert!(layer.ends_with(o.key.rsplit('/').next().unwrap()), "{o:?}");
        assert_eq!(o.size, expected.len() as u64, "{o:?}");
    }
}

fn admin_stats(p: &Proxy) -> serde_json::Value {
    let resp = Get::new(&format!("http://{}/admin/stats", p.addrs.admin))
        .send()
        .unwrap();
    serde_json::from_slice(&resp.body).unwrap()
}

fn metrics(p: &Proxy) -> String {
    p.metrics().unwrap()
}

/// An upstream sending a corrupt layer: the client is cut off, and the
/// bucket never gets an object for that digest (nor for anything else).
#[test]
fn corrupt_upstream_bytes_never_reach_the_bucket() {
    let s3 = SeaweedFs::start().unwrap();
    s3.create_bucket("cache").unwrap();
    let creds = credentials_dir(&s3, s3.access_key(), s3.secret_key());
    let work = tempfile::tempdir().unwrap();
    let image = random_image(work.path(), &[6 << 20, 1 << 20], 23);
    let bad = image.layer_digests()[0].clone();
    let good = image.layer_digests()[1].clone();
    let stub = Stub::builder(&image.layout).corrupt(&bad).start().unwrap();
    let proxy = start_proxy(&stub.url(), &storage(&s3, "cache", creds.path(), ""));
    let resp = Get::new(&url(&proxy, "fixture/app", "blobs", &bad))
        .timeout(Duration::from_secs(30))
        .send();
    let whole = resp
        .as_ref()
        .is_ok_and(|r| r.status == StatusCode::OK && sha256_digest(&r.body) == bad);
    assert!(!whole);
    proxy
        .wait_access(&[("digest", &bad), ("complete", "false")])
        .unwrap();
    // A good blob afterwards does reach the bucket: the uploader works,
    // so the bad one's absence is not an idle uploader.
    get_ok(&url(&proxy, "fixture/app", "blobs", &good));
    wait_in_bucket(&s3, "cache", std::slice::from_ref(&good));
    let keys = bucket_blobs(&s3, "cache");
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(good.ends_with(&keys[0].0));
}

/// An object in the bucket that went bad (bit rot, an operator's copy,
/// another tool writing the key) does not break its digest for the whole
/// cluster: a replica that reads it finds the digest wrong, serves none of
/// it as whole, drops it from the bucket, and the next pull fetches the
/// blob from the upstream, which puts a good copy back.
#[test]
fn a_bad_object_in_the_bucket_is_dropped_and_fetched_again() {
    let s3 = SeaweedFs::start().unwrap();
    s3.create_bucket("cache").unwrap();
    let creds = credentials_dir(&s3, s3.access_key(), s3.secret_key());
    let work = tempfile::tempdir().unwrap();
    let image = random_image(work.path(), &[2 << 20], 24);
    let d = image.layer_digests()[0].clone();
    let registry = Registry::plain().unwrap();
    registry.push_image(&image, "fixture/app", "1").unwrap();
    let mut proxy = start_proxy(&registry.url(), &storage(&s3, "cache", creds.path(), ""));
    get_ok(&url(&proxy, "fixture/app", "blobs", &d));
    wait_in_bucket(&s3, "cache", std::slice::from_ref(&d));
    let key = s3
        .objects("cache", "pullthrough/blobs/")
        .unwrap()
        .into_iter()
        .find(|o| d.ends_with(o.key.rsplit('/').next().unwrap_or("-")))
        .unwrap()
        .key;
    s3.overwrite("cache", &key, vec![0x5a; 2 << 20]).unwrap();
    // The replica's own disk is gone: the bucket is where it looks.
    proxy.stop().unwrap();
    std::fs::remove_dir_all(proxy.data_dir().join("blobs")).unwrap();
    proxy.start_again().unwrap();

    let first = Get::new(&url(&proxy, "fixture/app", "blobs", &d))
        .timeout(Duration::from_secs(30))
        .send();
    let whole = first
        .as_ref()
        .is_ok_and(|r| r.status == StatusCode::OK && sha256_digest(&r.body) == d);
    assert!(!whole, "the bad object was served as the blob");
    wait_for("the bad object dropped", Duration::from_secs(10), || {
        Ok(s3
            .read("cache", &key)
            .unwrap()
            .is_none_or(|b| sha256_digest(&b) == d))
    })
    .unwrap();
    assert_eq!(
        sha256_digest(&get_ok(&url(&proxy, "fixture/app", "blobs", &d))),
        d
    );
    wait_for("a good copy in the bucket", Duration::from_secs(30), || {
        Ok(s3
            .read("cache", &key)
            .unwrap()
            .is_some_and(|b| sha256_digest(&b) == d))
    })
    .unwrap();
}

/// A manifest object in the bucket that went bad does not break its
/// digest (and every tag pointing at it) on every replica for good: a
/// replica that reads it finds the digest wrong, deletes it, and serves
/// the manifest from the upstream in the same request, which puts a good
/// copy back. Before, the request failed with 503 "shared storage failed;
/// retry", and every retry, on every replica, read the same bad object.
#[test]
fn a_bad_manifest_in_the_bucket_is_dropped_and_served_from_the_upstream() {
    let s3 = SeaweedFs::start().unwrap();
    s3.create_bucket("cache").unwrap();
    let creds = credentials_dir(&s3, s3.access_key(), s3.secret_key());
    let work = tempfile::tempdir().unwrap();
    let image = random_image(work.path(), &[1 << 20], 26);
    let d = image.digest.clone();
    let registry = Registry::plain().unwrap();
    registry.push_image(&image, "fixture/app", "1").unwrap();
    let config = storage(&s3, "cache", creds.path(), "");
    let a = start_proxy(&registry.url(), &config);
    let manifest = get_ok(&url(&a, "fixture/app", "manifests", &d));
    wait_in_bucket(&s3, "cache", std::slice::from_ref(&d));
    let key = s3
        .objects("cache", "pullthrough/blobs/")
        .unwrap()
        .into_iter()
        .find(|o| d.ends_with(o.key.rsplit('/').next().unwrap_or("-")))
        .unwrap()
        .key;
    // Same length and media type: only the digest tells it is bad.
    let mut tampered = manifest.clone();
    tampered[0] ^= 0x20;
    s3.overwrite("cache", &key, tampered).unwrap();

    // Another replica, its disk empty: the bucket is where it looks first.
    let b = start_proxy(&registry.url(), &config);
    let resp = Get::new(&url(&b, "fixture/app", "manifests", &d))
        .header("accept", ACCEPT)
        .timeout(Duration::from_secs(60))
        .send()
        .unwrap();
    assert_eq!(
        resp.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&resp.body)
    );
    assert_eq!(resp.body.to_vec(), manifest, "served from the upstream");
    b.wait_access(&[("digest", &d), ("cache", "MISS")]).unwrap();
    wait_for("the bad object dropped", Duration::from_secs(10), || {
        Ok(s3
            .read("cache", &key)
            .unwrap()
            .is_none_or(|m| sha256_digest(&m) == d))
    })
    .unwrap();
    wait_for("a good copy in the bucket", Duration::from_secs(30), || {
        Ok(s3
            .read("cache", &key)
            .unwrap()
            .is_some_and(|m| sha256_digest(&m) == d))
    })
    .unwrap();
}

/// The bucket failing in the middle of a blob a replica streams from it:
/// the replica continues from the upstream at the first byte it lacks, and
/// the client gets the whole blob.
#[test]
fn a_bucket_failing_mid_blob_is_continued_from_the_upstream() {
    let s3 = SeaweedFs::start().unwrap();
    s3.create_bucket("cache").unwrap();
    let creds = credentials_dir(&s3, s3.access_key(), s3.secret_key());
    let work = tempfile::tempdir().unwrap();
    let image = random_image(work.path(), &[8 << 20], 25);
    let d = image.layer_digests()[0].clone();
    let registry = Registry::plain().unwrap();
    registry.push_image(&image, "fixture/app", "1").unwrap();
    let relay = Relay::start(s3.addr()).unwrap();
    let endpoint = format!("http://{}", relay.addr);
    let mut proxy = start_proxy(
        &registry.url(),
        &storage_at(&endpoint, "cache", creds.path(), ""),
    );
    get_ok(&url(&proxy, "fixture/app", "blobs", &d));
    wait_in_bucket(&s3, "cache", std::slice::from_ref(&d));
    proxy.stop().unwrap();
    std::fs::remove_dir_all(proxy.data_dir().join("blobs")).unwrap();
    proxy.start_again().unwrap();

    // 2 MiB of the blob pass, then the bucket goes away.
    let held = relay.passed() + (2 << 20);
    relay.hold_after(held);
    let blob_url = url(&proxy, "fixture/app", "blobs", &d);
    let pull = std::thread::spawn(move || get_ok(&blob_url));
    wait_for("the bucket's bytes held", Duration::from_secs(30), || {
        Ok(relay.passed() >= held)
    })
    .unwrap();
    drop(relay);
    let body = pull.join().unwrap();
    assert_eq!(sha256_digest(&body), d);
    let log = proxy.log();
    assert!(
        log.contains("failed mid-blob; continuing from the upstream"),
        "{log}"
    );
    proxy
        .wait_access(&[
            ("digest", &d),
            ("cache", "SHARED_HIT"),
            ("complete", "true"),
        ])
        .unwrap();
}

/// 3 replicas on a bucket bounded to 24 MiB pull 12 blobs of 4 MiB, each
/// replica its own share: the lease holder (exactly one) evicts least
/// recently used blobs, and the bucket ends under its bound with the
/// most recently pulled blobs still in it.
#[test]
fn eviction_across_replicas_keeps_the_bucket_under_max_size() {
    let s3 = SeaweedFs::start().unwrap();
    s3.create_bucket("cache").unwrap();
    let creds = credentials_dir(&s3, s3.access_key(), s3.secret_key());
    let work = tempfile::tempdir().unwrap();
    let sizes = vec![4u64 << 20; 12];
    let image = random_image(work.path(), &sizes, 24);
    let registry = Registry::plain().unwrap();
    registry.push_image(&image, "fixture/many", "1").unwrap();
    let bound = 24u64 << 20;
    let r = Replicas::start(
        3,
        HOST,
        &registry.url(),
        &storage(
            &s3,
            "cache",
            creds.path(),
            &format!(
                "  maxSize: {bound}\n  highWatermark: 0.9\n  lowWatermark: 0.7\n  minAge: 0s\n  evictionInterval: 300ms\n"
            ),
        ),
    );
    let layers = image.layer_digests();
    for (i, d) in layers.iter().enumerate() {
        get_ok(&url(&r.proxies[i % 3], "fixture/many", "blobs", d));
        // Let the upload land before the next pull: the order of pulls is
        // the order of use.
        wait_in_bucket(&s3, "cache", std::slice::from_ref(d));
    }
    wait_for(
        "the bucket to be back under its bound",
        Duration::from_secs(30),
        || {
            let total: u64 = bucket_blobs(&s3, "cache").iter().map(|(_, s)| s).sum();
            Ok(total <= (bound as f64 * 0.9) as u64)
        },
    )
    .unwrap();
    let left = bucket_blobs(&s3, "cache");
    let total: u64 = left.iter().map(|(_, s)| s).sum();
    assert!(total <= bound, "{total} > {bound}");
    let last = layers.last().unwrap();
    assert!(
        left.iter().any(|(k, _)| last.ends_with(k.as_str())),
        "the newest blob was evicted"
    );
    assert!(
        !left.iter().any(|(k, _)| layers[0].ends_with(k.as_str())),
        "the oldest blob was kept"
    );
    let holders: Vec<f64> = r
        .proxies
        .iter()
        .map(|p| metric(&metrics(p), "pullthrough_shared_storage_evictor"))
        .collect();
    assert_eq!(holders.iter().sum::<f64>(), 1.0, "{holders:?}");
}

fn metric(text: &str, series: &str) -> f64 {
    pullthrough_testbed::proxy::metric_in(text, series)
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

/// Object-store failures are reported with their cause and never stop a
/// pull: a bucket that does not exist, credentials the store refuses, and
/// the store going away while the proxy runs.
#[test]
fn object_store_failures_are_explained_and_pulls_pass_through() {
    let mut s3 = SeaweedFs::start().unwrap();
    s3.create_bucket("cache").unwrap();
    let good = credentials_dir(&s3, s3.access_key(), s3.secret_key());
    let wrong = credentials_dir(&s3, s3.access_key(), "not-the-secret");
    let work = tempfile::tempdir().unwrap();
    let image = random_image(work.path(), &[1 << 20, 1 << 20, 1 << 20], 25);
    let layers = image.layer_digests();
    let registry = Registry::plain().unwrap();
    registry.push_image(&image, "fixture/app", "1").unwrap();

    for (bucket, creds, cause) in [
        ("missing", good.path(), "the bucket does not exist"),
        ("cache", wrong.path(), "the credentials were refused"),
    ] {
        let proxy = start_proxy(&registry.url(), &storage(&s3, bucket, creds, ""));
        wait_for(
            "the storage error to be logged",
            Duration::from_secs(20),
            || Ok(proxy.log().contains(cause)),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", proxy.log()));
        let body = get_ok(&url(&proxy, "fixture/app", "blobs", &layers[0]));
        assert_eq!(sha256_digest(&body), layers[0], "{cause}");
        assert_eq!(
            metric(&metrics(&proxy), "pullthrough_shared_storage_up"),
            0.0,
            "{cause}"
        );
    }

    let proxy = start_proxy(&registry.url(), &storage(&s3, "cache", good.path(), ""));
    get_ok(&url(&proxy, "fixture/app", "blobs", &layers[1]));
    wait_in_bucket(&s3, "cache", std::slice::from_ref(&layers[1]));
    s3.kill().unwrap();
    let started = std::time::Instant::now();
    let body = get_ok(&url(&proxy, "fixture/app", "blobs", &layers[2]));
    assert_eq!(sha256_digest(&body), layers[2]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the pull waited on the dead store"
    );
    wait_for("the outage to be logged", Duration::from_secs(20), || {
        Ok(proxy.log().contains("the object store cannot be reached"))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", proxy.log()));
}

/// `credentials.source: env` with web identity, as IRSA sets it up on EKS:
/// the proxy exchanges the projected token at STS (a stub on loopback,
/// `AWS_ENDPOINT_URL_STS`, over TLS trusted through `caFile`) for
/// temporary keys and writes to the bucket with them; the token and role
/// reach STS as sent.
#[test]
fn web_identity_credentials_are_exchanged_at_sts_and_used() {
    let s3 = SeaweedFs::start().unwrap();
    s3.create_bucket("cache").unwrap();
    let (access, secret) = (s3.access_key(), s3.secret_key());
    let sts = pullthrough_testbed::stub::Stub::canned()
        .route(move |seen| {
            let xml = format!(
                "<AssumeRoleWithWebIdentityResponse><AssumeRoleWithWebIdentityResult><Credentials>\
                 <AccessKeyId>{access}</AccessKeyId><SecretAccessKey>{secret}</SecretAccessKey>\
                 <SessionToken>session-from-sts</SessionToken><Expiration>2099-01-01T00:00:00Z</Expiration>\
                 </Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>"
            );
            let ok = seen.method == http::Method::POST
                && seen.path.contains("Action=AssumeRoleWithWebIdentity")
                && seen.path.contains("WebIdentityToken=projected-sa-token");
            http::Response::builder()
                .status(if ok { 200 } else { 403 })
                .body(bytes::Bytes::from(xml))
                .unwrap()
        })
        // The STS client refuses plain HTTP; caFile makes it trust the stub.
        .tls()
        .start()
        .unwrap();
    let token_dir = tempfile::tempdir().unwrap();
    let sts_ca = token_dir.path().join("sts-ca.pem");
    std::fs::write(&sts_ca, sts.tls_cert_pem().unwrap()).unwrap();
    let token = token_dir.path().join("token");
    std::fs::write(&token, "projected-sa-token").unwrap();
    let work = tempfile::tempdir().unwrap();
    let image = random_image(work.path(), &[1 << 20], 27);
    let layer = image.layer_digests()[0].clone();
    let registry = Registry::plain().unwrap();
    registry.push_image(&image, "fixture/app", "1").unwrap();
    let config = format!(
        "{}storage:\n  s3: {{endpoint: '{}', allowHttp: true, pathStyle: true, bucket: cache, prefix: pullthrough, caFile: '{}', credentials: {{source: env}}}}\n",
        common::one_registry(HOST, &registry.url(), ""),
        s3.endpoint(),
        sts_ca.display()
    );
    let sts_url = sts.url();
    let proxy = Proxy::start_env(
        common::proxy_bin(),
        pullthrough_testbed::proxy::Addrs::localhost().unwrap(),
        &config,
        &[
            ("AWS_WEB_IDENTITY_TOKEN_FILE", token.to_str().unwrap()),
            ("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/pullthrough"),
            ("AWS_ENDPOINT_URL_STS", &sts_url),
            ("AWS_REGION", "us-east-1"),
            // Were web identity ignored, the instance-metadata fallback
            // must hit a dead loopback port, never 169.254.169.254.
            ("AWS_METADATA_ENDPOINT", "http://127.0.0.1:9"),
        ],
    )
    .unwrap();
    get_ok(&url(&proxy, "fixture/app", "blobs", &layer));
    if wait_for("the blob in the bucket", Duration::from_secs(30), || {
        Ok(!bucket_blobs(&s3, "cache").is_empty())
    })
    .is_err()
    {
        panic!(
            "not uploaded; STS saw {:?}\n{}",
            sts.requests(),
            proxy.log()
        );
    }
    assert!(
        sts.count("POST", "AssumeRoleWithWebIdentity") >= 1,
        "{:?}",
        sts.requests()
    );
    assert!(
        sts.requests().iter().all(|r| r
            .path
            .contains("RoleArn=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Fpullthrough")),
        "{:?}",
        sts.requests()
    );
}

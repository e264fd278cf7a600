use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream};
use object_store::memory::InMemory;
use object_store::{ObjectStore, ObjectStoreExt};
use sha2::{Digest as _, Sha256};

use super::*;

/// The eviction lease against a holder held mid-listing.
mod lease;

/// What a failed call to the bucket costs: skips, back-off, retries.
mod failures;

/// A purge overtaking an upload.
mod withdraw;

impl SharedTier {
    /// The blob's size and type straight from the store, whatever the
    /// tier's health.
    pub(super) async fn stat_for_test(&self, d: &Digest) -> Option<u64> {
        self.store.head(&self.key(d)).await.ok().map(|m| m.size)
    }
}

fn digest_of(bytes: &[u8]) -> Digest {
    Digest::parse(&format!("sha256:{}", hex::encode(Sha256::digest(bytes)))).unwrap()
}

fn tier() -> (Arc<InMemory>, SharedTier) {
    let mem = Arc::new(InMemory::new());
    let store: Arc<dyn ObjectStore> = mem.clone();
    (mem, SharedTier::new(store, "/cache/", "memory://".into()))
}

fn chunks(data: &[u8], size: usize) -> BoxStream<'static, Result<Bytes, TierError>> {
    let parts: Vec<_> = data
        .chunks(size)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    stream::iter(parts).boxed()
}

fn layer() -> BlobMeta {
    BlobMeta {
        media_type: Some("application/vnd.oci.image.layer.v1.tar+gzip".into()),
    }
}

#[tokio::test]
async fn a_verified_upload_is_stored_under_its_digest_with_its_media_type() {
    let (mem, tier) = tier();
    let data: Vec<u8> = (0..(20u32 << 20)).map(|i| (i % 251) as u8).collect();
    let d = digest_of(&data);
    assert_eq!(tier.stat(&d).await.unwrap(), None);
    let sent = tier
        .upload(&d, &layer(), chunks(&data, 300_000))
        .await
        .unwrap();
    assert_eq!(sent, data.len() as u64);
    let key = format!("cache/blobs/sha256/{}/{}", &d.hex()[..2], d.hex());
    assert_eq!(
        mem.head(&key.as_str().into()).await.unwrap().size,
        data.len() as u64
    );
    assert_eq!(
        tier.stat(&d).await.unwrap(),
        Some(TierStat {
            size: data.len() as u64,
            meta: layer()
        })
    );
    let from = 5_000_000u64;
    let tail: Vec<Bytes> = tier
        .open(&d, from)
        .await
        .unwrap()
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(tail.concat(), data[from as usize..]);
}

#[tokio::test]
async fn bytes_that_do_not_hash_to_the_digest_leave_no_object() {
    let (mem, tier) = tier();
    let data = vec![7u8; 9 << 20];
    let d = digest_of(b"something else");
    let err = tier
        .upload(&d, &layer(), chunks(&data, 1 << 20))
        .await
        .unwrap_err();
    assert!(matches!(err, TierError::DigestMismatch { .. }), "{err}");
    assert_eq!(tier.stat(&d).await.unwrap(), None);
    let all: Vec<_> = mem.list(None).try_collect().await.unwrap();
    assert!(all.is_empty(), "{all:?}");
}

#[tokio::test]
async fn a_source_that_fails_mid_way_leaves_no_object() {
    let (mem, tier) = tier();
    let data = vec![1u8; 12 << 20];
    let d = digest_of(&data);
    let broken = chunks(&data[..6 << 20], 1 << 20)
        .chain(stream::iter([Err(TierError::Config("source cut".into()))]))
        .boxed();
    assert!(tier.upload(&d, &layer(), broken).await.is_err());
    let all: Vec<_> = mem.list(None).try_collect().await.unwrap();
    assert!(all.is_empty(), "{all:?}");
}

#[tokio::test]
async fn small_objects_round_trip_and_are_verified() {
    let (mem, tier) = tier();
    let manifest = Bytes::from_static(br#"{"schemaVersion":2}"#);
    let d = digest_of(&manifest);
    let meta = BlobMeta {
        media_type: Some("application/vnd.oci.image.manifest.v1+json".into()),
    };
    tier.put_small(&d, &meta, manifest.clone()).await.unwrap();
    // Present already: not an error.
    tier.put_small(&d, &meta, manifest.clone()).await.unwrap();
    assert_eq!(
        tier.read_small(&d, 1024).await.unwrap(),
        Some((manifest.clone(), meta.clone()))
    );
    assert_eq!(tier.read_small(&d, 4).await.unwrap(), None, "over max");
    // Wrong bytes are refused on the way in...
    assert!(
        tier.put_small(&digest_of(b"x"), &meta, manifest.clone())
            .await
            .is_err()
    );
    // ...and on the way out, if the store's copy was altered behind us.
    let key = format!("cache/blobs/sha256/{}/{}", &d.hex()[..2], d.hex());
    mem.put(&key.as_str().into(), Bytes::from_static(b"tampered").into())
        .await
        .unwrap();
    assert!(matches!(
        tier.read_small(&d, 1024).await,
        Err(TierError::DigestMismatch { .. })
    ));
}

#[tokio::test]
async fn after_an_error_the_tier_is_skipped_then_retried() {
    let (_, tier) = tier();
    tier.health().failed(&TierError::Config("boom".into()));
    assert!(!tier.health().is_up());
    let d = digest_of(b"a");
    assert!(matches!(
        tier.stat(&d).await,
        Err(TierError::Skipped { .. })
    ));
    assert!(tier.health().skip_for().is_some());
}

#[tokio::test]
async fn credential_files_are_read_reread_and_named_when_missing() {
    use object_store::CredentialProvider;
    let dir = tempfile::tempdir().unwrap();
    let files = s3::FileCredentials::rereading(dir.path().to_path_buf(), std::time::Duration::ZERO);
    let err = files.read().unwrap_err().to_string();
    assert!(err.contains("accessKeyId"), "{err}");
    std::fs::write(dir.path().join("accessKeyId"), "AKID\n").unwrap();
    std::fs::write(dir.path().join("secretAccessKey"), "").unwrap();
    let err = files.read().unwrap_err().to_string();
    assert!(
        err.contains("secretAccessKey") && err.contains("empty"),
        "{err}"
    );
    std::fs::write(dir.path().join("secretAccessKey"), "s3cr3t\n").unwrap();
    let c = files.get_credential().await.unwrap();
    assert_eq!(
        (c.key_id.as_str(), c.secret_key.as_str(), c.token.as_deref()),
        ("AKID", "s3cr3t", None)
    );
    // A rotated Secret is picked up...
    std::fs::write(dir.path().join("secretAccessKey"), "rotated").unwrap();
    std::fs::write(dir.path().join("sessionToken"), "tok").unwrap();
    let c = files.get_credential().await.unwrap();
    assert_eq!(
        (c.secret_key.as_str(), c.token.as_deref()),
        ("rotated", Some("tok"))
    );
    // ...and one caught half-written keeps the last good keys.
    std::fs::remove_file(dir.path().join("accessKeyId")).unwrap();
    let c = files.get_credential().await.unwrap();
    assert_eq!(c.key_id, "AKID");
}

#[test]
fn store_errors_name_the_cause_an_admin_can_fix() {
    let generic = |msg: &str| object_store::Error::Generic {
        store: "S3",
        source: msg.to_string().into(),
    };
    let e = s3::explain(&generic("<Code>NoSuchBucket</Code>"), "s3://cache/");
    assert!(
        e.starts_with("s3://cache/: the bucket does not exist"),
        "{e}"
    );
    let e = s3::explain(&generic("<Code>InvalidAccessKeyId</Code>"), "s3://cache/");
    assert!(e.contains("credentials were refused"), "{e}");
    let e = s3::explain(
        &generic("error sending request: Connection refused"),
        "s3://cache/",
    );
    assert!(e.contains("cannot be reached"), "{e}");
}

fn storage(max: u64, min_age_secs: u64, every_ms: u64) -> pullthrough_api::config::SharedStorage {
    let yaml = format!(
        "storage:\n  s3: {{bucket: b}}\n  maxSize: {max}\n  highWatermark: 0.9\n  lowWatermark: 0.5\n  minAge: {min_age_secs}s\n  evictionInterval: {every_ms}ms\n"
    );
    pullthrough_api::config::ProxyConfig::from_yaml(&yaml)
        .unwrap()
        .storage
        .unwrap()
}

/// Replica `a`'s evictor over `tier`, with a journal of its own.
fn evictor_a(
    tier: &Arc<SharedTier>,
    storage: &pullthrough_api::config::SharedStorage,
    awaits_pins: bool,
) -> Evictor {
    Evictor::new(
        Arc::clone(tier),
        storage,
        "a".into(),
        Arc::default(),
        awaits_pins,
    )
    .unwrap()
}

async fn put_blob(tier: &SharedTier, seed: u8, size: usize) -> Digest {
    let data = vec![seed; size];
    let d = digest_of(&data);
    tier.put_small(&d, &layer(), Bytes::from(data))
        .await
        .unwrap();
    d
}

/// A bucket holding 10 blobs of 10 KiB, oldest first.
async fn ten_blobs() -> (Arc<SharedTier>, Vec<Digest>) {
    let (_, tier) = tier();
    let tier = Arc::new(tier);
    let mut blobs = Vec::new();
    for i in 0..10u8 {
        blobs.push(put_blob(&tier, i, 10 << 10).await);
    }
    (tier, blobs)
}

/// Two replicas' evictors on one bucket: one holds the lease; the bucket
/// goes from over its bound to the low watermark, least recently used
/// first by the journals of both; a young blob stays; when the holder
/// stops renewing, the other takes over after three rounds.
#[tokio::test]
async fn one_evictor_bounds_the_bucket_least_recently_used_first() {
    // Under a 60 KiB bound (high 54, low 30).
    let (tier, blobs) = ten_blobs().await;
    let (ja, jb) = (Arc::new(Journal::default()), Arc::new(Journal::default()));
    // After the uploads, replica A uses 0..5, then B uses 9: the five
    // blobs nobody used since their upload are the least recent.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    for d in &blobs[..5] {
        ja.touch(d);
    }
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    jb.touch(&blobs[9]);
    let s = storage(60 << 10, 0, 50);
    let a = Evictor::new(tier.clone(), &s, "a".into(), ja, false).unwrap();
    let b = Evictor::new(tier.clone(), &s, "b".into(), jb, false).unwrap();
    b.write_journal().await.unwrap();
    a.round_for_test().await.unwrap();
    b.round_for_test().await.unwrap();
    let holders = [&a, &b]
        .iter()
        .filter(|e| e.stats.holder.load(std::sync::atomic::Ordering::Relaxed))
        .count();
    assert_eq!(holders, 1, "exactly one replica evicts");
    let left: Vec<Digest> = tier
        .list_blobs()
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.digest)
        .collect();
    let bytes: u64 = left.len() as u64 * (10 << 10);
    assert!(bytes <= 30 << 10, "{} blobs left", left.len());
    assert!(left.contains(&blobs[9]), "b's recent use kept it");
    // Evicted first: the five nobody used since upload (5..9).
    for d in &blobs[5..9] {
        assert!(!left.contains(d), "unused blob kept");
    }
    // The holder stops; the other takes over only after three rounds.
    let before = b.stats.holder.load(std::sync::atomic::Ordering::Relaxed);
    assert!(!before);
    b.round_for_test().await.unwrap();
    assert!(
        !b.stats.holder.load(std::sync::atomic::Ordering::Relaxed),
        "took over at once"
    );
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    b.round_for_test().await.unwrap();
    assert!(
        b.stats.holder.load(std::sync::atomic::Ordering::Relaxed),
        "never took over"
    );
    // The old holder finds it lost the lease.
    a.round_for_test().await.unwrap();
    assert!(!a.stats.holder.load(std::sync::atomic::Ordering::Relaxed));
}

#[tokio::test]
async fn blobs_used_within_min_age_are_never_evicted() {
    let (tier, _) = ten_blobs().await;
    let e = evictor_a(&tier, &storage(60 << 10, 3600, 50), false);
    e.round_for_test().await.unwrap();
    assert_eq!(tier.list_blobs().await.unwrap().len(), 10);
}

/// Pinned blobs stay in the bucket even as the least recently used; the
/// others go down to the low watermark.
#[tokio::test]
async fn pinned_blobs_are_never_evicted_from_the_bucket() {
    // Under a 60 KiB bound (high 54, low 30); the first three (the
    // oldest) pinned.
    let (tier, blobs) = ten_blobs().await;
    let e = evictor_a(&tier, &storage(60 << 10, 0, 50), false);
    e.pin(Arc::new(blobs[..3].iter().cloned().collect()));
    e.round_for_test().await.unwrap();
    let left: Vec<Digest> = tier
        .list_blobs()
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.digest)
        .collect();
    assert_eq!(left.len(), 3, "down to the low watermark");
    for d in &blobs[..3] {
        assert!(left.contains(d), "pinned blob evicted");
    }
}

/// A bucket that accepts connections and never answers: every call made
/// off the request path fails as a timeout, counted, instead of hanging
/// (an upload slot, the evictor or the grant sharing would otherwise wait
/// for good). It marks nothing down: that is the request path's to find.
#[tokio::test]
async fn calls_off_the_request_path_to_a_silent_bucket_time_out() {
    let (addr, hold) = crate::test_util::silent_listener().await;
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(creds.path().join("accessKeyId"), "key").unwrap();
    std::fs::write(creds.path().join("secretAccessKey"), "secret").unwrap();
    let yaml = format!(
        "storage:\n  s3:\n    endpoint: 'http://{addr}'\n    allowHttp: true\n    pathStyle: true\n    bucket: b\n    credentials: {{source: files, dir: '{}'}}\n",
        creds.path().display()
    );
    let storage = pullthrough_api::config::ProxyConfig::from_yaml(&yaml)
        .unwrap()
        .storage
        .unwrap();
    let tier = s3::build_s3(&storage)
        .unwrap()
        .with_background_timeout(Duration::from_millis(300));
    let data = vec![7u8; 1 << 20];
    let d = digest_of(&data);
    let counted = std::sync::atomic::AtomicU64::new(0);
    let timed_out = |what: &str, r: Result<(), TierError>| {
        assert!(matches!(r, Err(TierError::Timeout { .. })), "{what}: {r:?}");
        let errors = tier.health().errors();
        assert!(
            errors > counted.swap(errors, std::sync::atomic::Ordering::Relaxed),
            "{what}: not counted"
        );
        assert!(tier.health().is_up(), "{what}: marked down");
    };
    let calls = async {
        let up = tier.upload(&d, &layer(), chunks(&data, 64 << 10)).await;
        timed_out("upload", up.map(|_| ()));
        let small = tier
            .put_small(&d, &layer(), Bytes::from(data.clone()))
            .await;
        timed_out("put_small", small);
        timed_out("put_coord", tier.put_coord("journal/a", Bytes::new()).await);
        let written = tier.write_coord("lease", Bytes::new(), None).await;
        timed_out("write_coord", written.map(|_| ()));
        timed_out("read_coord", tier.read_coord("lease").await.map(|_| ()));
        timed_out("list_blobs", tier.list_blobs().await.map(|_| ()));
        timed_out("list_coord", tier.list_coord("journal").await.map(|_| ()));
        timed_out("delete", tier.delete(&d).await);
    };
    tokio::time::timeout(Duration::from_secs(30), calls)
        .await
        .expect("a call to the silent bucket hung");
    hold.abort();
}

/// A replica with a pins file evicts nothing from the bucket until its
/// pins are resolved: the oldest blobs may be exactly what is pinned.
#[tokio::test]
async fn the_bucket_is_not_evicted_before_the_pins_are_known() {
    let (tier, blobs) = ten_blobs().await;
    let e = evictor_a(&tier, &storage(60 << 10, 0, 50), true);
    e.round_for_test().await.unwrap();
    assert_eq!(tier.list_blobs().await.unwrap().len(), 10);
    e.pin(Arc::new(blobs[..3].iter().cloned().collect()));
    e.round_for_test().await.unwrap();
    let left: Vec<Digest> = tier
        .list_blobs()
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.digest)
        .collect();
    assert!(left.len() < 10, "{left:?}");
    assert!(blobs[..3].iter().all(|d| left.contains(d)), "{left:?}");
}

/// Pins that never resolve hold the bucket's eviction back only until
/// the wait for them is over; it once waited for ever, and the bucket
/// grew without bound.
#[tokio::test]
async fn the_bucket_is_evicted_once_the_wait_for_pins_is_over() {
    let (tier, _) = ten_blobs().await;
    let e = evictor_a(&tier, &storage(60 << 10, 0, 50), true)
        .with_pins_wait(Duration::from_millis(100));
    e.round_for_test().await.unwrap();
    assert_eq!(tier.list_blobs().await.unwrap().len(), 10, "still waiting");
    tokio::time::sleep(Duration::from_millis(150)).await;
    e.round_for_test().await.unwrap();
    assert!(tier.list_blobs().await.unwrap().len() <= 3);
}

/// A round with more to delete than one interval allows stops at the
/// interval (another replica takes the lease over once it looks stale);
/// the next rounds finish the job.
#[tokio::test]
async fn an_eviction_round_ends_within_its_interval() {
    use object_store::throttle::{ThrottleConfig, ThrottledStore};
    let slow = ThrottledStore::new(
        InMemory::new(),
        ThrottleConfig {
            wait_delete_per_call: Duration::from_millis(100),
            ..ThrottleConfig::default()
        },
    );
    let tier = Arc::new(SharedTier::new(
        Arc::new(slow),
        "/cache/",
        "memory://".into(),
    ));
    for i in 0..10u8 {
        put_blob(&tier, i, 10 << 10).await;
    }
    // 100 KiB under a 60 KiB bound: 7 deletes (700 ms) to reach 30 KiB,
    // with an interval of 250 ms.
    let e = evictor_a(&tier, &storage(60 << 10, 0, 250), false);
    let started = std::time::Instant::now();
    e.round_for_test().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(450),
        "{:?}",
        started.elapsed()
    );
    let left = tier.list_blobs().await.unwrap().len();
    assert!((4..10).contains(&left), "{left} left after one round");
    for _ in 0..5 {
        e.round_for_test().await.unwrap();
    }
    assert_eq!(tier.list_blobs().await.unwrap().len(), 3);
}

/// A bucket whose listing takes longer than the eviction interval is
/// still evicted: the round's deletes count their interval from the
/// lease renewed after the listing. Counted from the round's start, every
/// round reached its deadline before its first delete, and the bucket
/// grew without bound.
#[tokio::test]
async fn a_bucket_slower_to_list_than_the_interval_is_still_evicted() {
    use object_store::throttle::{ThrottleConfig, ThrottledStore};
    let slow = ThrottledStore::new(
        InMemory::new(),
        ThrottleConfig {
            wait_list_per_entry: Duration::from_millis(40),
            ..ThrottleConfig::default()
        },
    );
    let tier = Arc::new(SharedTier::new(
        Arc::new(slow),
        "/cache/",
        "memory://".into(),
    ));
    for i in 0..10u8 {
        put_blob(&tier, i, 10 << 10).await;
    }
    // 100 KiB under a 60 KiB bound; listing the 10 blobs takes 400 ms,
    // the interval is 150 ms.
    let e = evictor_a(&tier, &storage(60 << 10, 0, 150), false);
    let mut counts = vec![tier.list_blobs().await.unwrap().len()];
    for _ in 0..3 {
        e.round_for_test().await.unwrap();
        counts.push(tier.list_blobs().await.unwrap().len());
    }
    assert!(counts[1] < counts[0], "the first round deleted: {counts:?}");
    assert_eq!(
        counts.last(),
        Some(&3),
        "down to the low watermark: {counts:?}"
    );
}

/// The lease holder deletes other replicas' journals and public access
/// answers that were not written for a long time (replicas gone: they are
/// named after pod IPs), and keeps its own and recent ones.
#[tokio::test]
async fn coordination_files_of_gone_replicas_are_deleted() {
    let (tier, _) = ten_blobs().await;
    for name in [
        "access/gone.json",
        "public/gone.json",
        "access/a.json",
        "public/a.json",
    ] {
        tier.put_coord(name, Bytes::from_static(b"{}"))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    tier.put_coord("access/live.json", Bytes::from_static(b"{}"))
        .await
        .unwrap();
    let e = evictor_a(&tier, &storage(1 << 30, 0, 50), false)
        .with_stale_after(Duration::from_millis(40));
    e.round_for_test().await.unwrap();
    let mut left: Vec<String> = tier.list_coord("access").await.unwrap();
    left.extend(tier.list_coord("public").await.unwrap());
    left.sort();
    assert_eq!(
        left,
        ["access/a.json", "access/live.json", "public/a.json"],
        "{left:?}"
    );
}

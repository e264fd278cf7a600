//! The store's eviction: LRU order, what it spares (blobs being read or
//! committed, pins), and leases across purges.

use super::*;

fn bounded(max: u64) -> Limits {
    Limits {
        max_size: Some(max),
        high_watermark: 0.9,
        low_watermark: 0.6,
    }
}

#[tokio::test]
async fn eviction_is_lru_and_spares_blobs_being_read() {
    let dir = tempfile::tempdir().unwrap();
    // 10 000 bytes: evict above 9 000, down to 6 000.
    let store = BlobStore::open_with(dir.path(), bounded(10_000), false)
        .await
        .unwrap();
    let blobs: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 2_000]).collect();
    let digests: Vec<Digest> = blobs.iter().map(|b| Digest::of(b)).collect();
    for i in 0..4 {
        store
            .put(&digests[i], BlobMeta::default(), &blobs[i])
            .await
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert_eq!(store.usage(), (8_000, 4));
    // Blob 0 is being read (the lookup's lease)...
    let reading = store.lookup(&digests[0]).await.unwrap().unwrap();
    // ...and the least recently used again once 1, 2, 3 are read after
    // it (the lookup itself made it the most recent).
    for d in &digests[1..4] {
        std::thread::sleep(std::time::Duration::from_millis(2));
        drop(store.lookup(d).await.unwrap());
    }
    std::thread::sleep(std::time::Duration::from_millis(2));
    store
        .put(&digests[4], BlobMeta::default(), &blobs[4])
        .await
        .unwrap();
    // 10 000 > 9 000: the least recently used go, down to 6 000; 0 is
    // skipped for its lease, so 1 and 2 go.
    assert_eq!(fs::read(&reading.path).unwrap(), blobs[0]);
    assert!(store.lookup(&digests[1]).await.unwrap().is_none());
    assert!(store.lookup(&digests[2]).await.unwrap().is_none());
    assert!(store.lookup(&digests[3]).await.unwrap().is_some());
    assert!(store.lookup(&digests[4]).await.unwrap().is_some());
    assert!(store.lookup(&digests[0]).await.unwrap().is_some());
    assert_eq!(store.stats().evictions.load(Ordering::Relaxed), 2);
    drop(reading);
    assert_eq!(store.usage(), (6_000, 3));
}

/// Rebuilding the index of 100 000 entries at start (printed; the
/// figure is quoted in proxy/README.md).
#[tokio::test]
async fn index_rebuild_of_100k_entries() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path()).await.unwrap();
    let layout = &store.inner.layout;
    let created = Instant::now();
    for i in 0..100_000u32 {
        let d = Digest::of(&i.to_le_bytes());
        fs::write(layout.data(&d), i.to_le_bytes()).unwrap();
    }
    let created = created.elapsed();
    drop(store);
    let started = Instant::now();
    let store = BlobStore::open(dir.path()).await.unwrap();
    let took = started.elapsed();
    println!("index rebuild: 100000 entries in {took:?} (creating them took {created:?})");
    assert_eq!(store.usage(), (400_000, 100_000));
    assert!(took < std::time::Duration::from_secs(30), "{took:?}");
}

/// A manifest's bytes first stored as a blob (a client asked for them
/// under `/blobs/`) become a manifest once fetched as one; a later blob
/// fetch does not make a manifest a blob again.
#[tokio::test]
async fn bytes_stored_as_a_blob_become_a_manifest_when_fetched_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path()).await.unwrap();
    let manifest =
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;
    let digest = Digest::of(manifest);
    let oci = "application/vnd.oci.image.manifest.v1+json";

    store
        .put(&digest, meta("application/octet-stream"), manifest)
        .await
        .unwrap();
    let stored = store.put(&digest, meta(oci), manifest).await.unwrap();
    assert_eq!(stored.meta, meta(oci));
    assert_eq!(
        store.lookup(&digest).await.unwrap().unwrap().meta,
        meta(oci)
    );
    assert_eq!(store.memory_copy(&digest).unwrap().1, meta(oci));

    store
        .put(&digest, meta("application/octet-stream"), manifest)
        .await
        .unwrap();
    assert_eq!(
        store.lookup(&digest).await.unwrap().unwrap().meta,
        meta(oci)
    );
    // Reopened: the sidecar on disk says so too.
    drop(store);
    let store = BlobStore::open(dir.path()).await.unwrap();
    assert_eq!(
        store.lookup(&digest).await.unwrap().unwrap().meta,
        meta(oci)
    );
}

/// A committed blob is leased to whoever committed it (the bucket upload
/// queue opens its file later): a store filling past its bound evicts the
/// others, not it, until that blob is dropped.
#[tokio::test]
async fn a_committed_blob_is_not_evicted_while_its_committer_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    // 10 000 bytes: evict above 9 000, down to 6 000.
    let store = BlobStore::open_with(dir.path(), bounded(10_000), false)
        .await
        .unwrap();
    let first = vec![9u8; 2_000];
    let d = Digest::of(&first);
    let held = store.put(&d, BlobMeta::default(), &first).await.unwrap();
    for i in 0..5u8 {
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = vec![i; 2_000];
        drop(
            store
                .put(&Digest::of(&b), BlobMeta::default(), &b)
                .await
                .unwrap(),
        );
    }
    // The least recently used, yet still there: others went instead.
    assert!(store.stats().evictions.load(Ordering::Relaxed) > 0);
    assert_eq!(fs::read(&held.path).unwrap(), first);
    assert!(store.entry(&d).is_some());
    drop(held);
    let b = vec![7u8; 4_000];
    drop(
        store
            .put(&Digest::of(&b), BlobMeta::default(), &b)
            .await
            .unwrap(),
    );
    assert!(store.entry(&d).is_none(), "dropped, it is evictable again");
}

/// What the upload queue keeps while it waits holds nothing: a store
/// filling up evicts such a blob, and leasing it again then says so; leased
/// again in time, it stays.
#[tokio::test]
async fn an_unleased_blob_can_be_evicted_and_says_so_when_leased_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open_with(dir.path(), bounded(10_000), false)
        .await
        .unwrap();
    let fill = |seed: u8| vec![seed; 2_000];
    let first = fill(200);
    let d = Digest::of(&first);
    let queued = store
        .put(&d, BlobMeta::default(), &first)
        .await
        .unwrap()
        .unleased()
        .expect("a committed blob is leased");
    for i in 0..5u8 {
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = fill(i);
        drop(
            store
                .put(&Digest::of(&b), BlobMeta::default(), &b)
                .await
                .unwrap(),
        );
    }
    assert!(store.entry(&d).is_none(), "evicted while only queued");
    assert!(queued.lease().await.unwrap().is_none());

    let second = fill(201);
    let d = Digest::of(&second);
    let queued = store
        .put(&d, BlobMeta::default(), &second)
        .await
        .unwrap()
        .unleased()
        .unwrap();
    let held = queued.lease().await.unwrap().expect("still there");
    for i in 10..15u8 {
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = fill(i);
        drop(
            store
                .put(&Digest::of(&b), BlobMeta::default(), &b)
                .await
                .unwrap(),
        );
    }
    assert_eq!(fs::read(&held.path).unwrap(), second);
}

/// A store opened with pins to come evicts nothing, at open nor on
/// commit, until they are known: a restart over the high watermark would
/// otherwise delete the least recently used blobs, pinned or not.
#[tokio::test]
async fn a_store_awaiting_its_pins_evicts_nothing_until_it_has_them() {
    let dir = tempfile::tempdir().unwrap();
    let blobs: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 2_000]).collect();
    let digests: Vec<Digest> = blobs.iter().map(|b| Digest::of(b)).collect();
    {
        let store = BlobStore::open(dir.path()).await.unwrap();
        for i in 0..4 {
            store
                .put(&digests[i], BlobMeta::default(), &blobs[i])
                .await
                .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
    // 8 000 bytes under a 5 000 bound (evict above 4 500, down to 3 000).
    let store = BlobStore::open_with(dir.path(), bounded(5_000), true)
        .await
        .unwrap();
    assert_eq!(store.usage(), (8_000, 4));
    store
        .put(&digests[4], BlobMeta::default(), &blobs[4])
        .await
        .unwrap();
    assert_eq!(store.usage(), (10_000, 5));
    // Blob 0, the oldest, is pinned: the next commit evicts the others.
    store.pin(Arc::new([digests[0].clone()].into_iter().collect()));
    let extra = vec![9u8; 10];
    store
        .put(&Digest::of(&extra), BlobMeta::default(), &extra)
        .await
        .unwrap();
    assert!(store.usage().0 <= 3_000, "{:?}", store.usage());
    assert!(store.entry(&digests[0]).is_some());
}

/// Pins that arrive after the last commit still bring the cache back
/// under its bound: resolving them runs an eviction pass. It waited for
/// the next commit, and after a restart with nothing more pulled the
/// cache stayed over its bound.
#[tokio::test]
async fn pins_arriving_after_the_last_commit_evict() {
    let dir = tempfile::tempdir().unwrap();
    let blobs: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 2_000]).collect();
    let digests: Vec<Digest> = blobs.iter().map(|b| Digest::of(b)).collect();
    let store = BlobStore::open_with(dir.path(), bounded(5_000), true)
        .await
        .unwrap();
    for (d, b) in digests.iter().zip(&blobs) {
        store.put(d, BlobMeta::default(), b).await.unwrap();
    }
    assert_eq!(store.usage(), (10_000, 5), "evicted before the pins came");
    store.pin(Arc::new([digests[0].clone()].into_iter().collect()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while store.usage().0 > 3_000 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(store.usage().0 <= 3_000, "{:?}", store.usage());
    assert!(store.entry(&digests[0]).is_some());
}

/// Pins that never resolve (a resolution that hangs) hold eviction back
/// only until the wait for them is over; then the store evicts as if
/// nothing were pinned, and the pins, once they come, count again. It
/// once waited for ever, and the cache grew until the disk was full.
#[tokio::test]
async fn a_store_stops_waiting_for_pins_that_do_not_come() {
    let dir = tempfile::tempdir().unwrap();
    // 5 000 bytes: evict above 4 500, down to 3 000.
    let store = BlobStore::open_with(dir.path(), bounded(5_000), true)
        .await
        .unwrap();
    let blobs: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 2_000]).collect();
    let digests: Vec<Digest> = blobs.iter().map(|b| Digest::of(b)).collect();
    for i in 0..3 {
        store
            .put(&digests[i], BlobMeta::default(), &blobs[i])
            .await
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert_eq!(store.usage(), (6_000, 3), "still waiting for the pins");
    store.wait_for_pins_until(Instant::now());
    store
        .put(&digests[3], BlobMeta::default(), &blobs[3])
        .await
        .unwrap();
    assert!(store.usage().0 <= 3_000, "{:?}", store.usage());
    assert!(store.entry(&digests[0]).is_none(), "the oldest went first");
    // The pins, late: what they hold is kept again.
    store.pin(Arc::new([digests[3].clone()].into_iter().collect()));
    for i in 10..14u8 {
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = vec![i; 2_000];
        drop(
            store
                .put(&Digest::of(&b), BlobMeta::default(), &b)
                .await
                .unwrap(),
        );
    }
    assert!(store.entry(&digests[3]).is_some(), "pinned, kept");
}

/// A lease taken before a purge releases nothing of the blob committed
/// again after it: a later reader's lease still keeps that file from
/// eviction. Dropping the old lease once released the new reader's hold,
/// and eviction deleted the file under it (a 500 for its client).
#[tokio::test]
async fn a_lease_from_before_a_purge_does_not_release_a_later_reader() {
    let dir = tempfile::tempdir().unwrap();
    // 10 000 bytes: evict above 9 000, down to 6 000.
    let store = BlobStore::open_with(dir.path(), bounded(10_000), false)
        .await
        .unwrap();
    let bytes = vec![42u8; 2_000];
    let d = Digest::of(&bytes);
    drop(store.put(&d, BlobMeta::default(), &bytes).await.unwrap());
    let before_purge = store.lookup(&d).await.unwrap().unwrap();
    assert!(store.remove(&d).await.unwrap());
    drop(store.put(&d, BlobMeta::default(), &bytes).await.unwrap());
    let reading = store.lookup(&d).await.unwrap().unwrap();
    drop(before_purge);
    // The least recently used from here on, and 2 000 bytes over the
    // bound once the others are in.
    for i in 0..5u8 {
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = vec![i; 2_000];
        drop(
            store
                .put(&Digest::of(&b), BlobMeta::default(), &b)
                .await
                .unwrap(),
        );
    }
    assert!(store.stats().evictions.load(Ordering::Relaxed) > 0);
    assert_eq!(
        fs::read(&reading.path).unwrap(),
        bytes,
        "evicted while read"
    );
    assert!(store.entry(&d).is_some());
    drop(reading);
}

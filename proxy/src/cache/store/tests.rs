//! Tests of the blob store on a temp dir: verify-then-commit, temp
//! file cleanup, small objects, eviction, index rebuild.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

/// Eviction, pins and leases.
mod eviction;

fn meta(mt: &str) -> BlobMeta {
    BlobMeta {
        media_type: Some(mt.to_string()),
    }
}

/// Deterministic pseudo-random content.
fn content(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Every file below `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn tmp_files(dir: &Path) -> Vec<PathBuf> {
    files(&dir.join("tmp"))
}

fn blob_files(dir: &Path) -> Vec<PathBuf> {
    files(&dir.join("blobs"))
}

#[tokio::test]
async fn chunked_write_commit_lookup() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path()).await.unwrap();
    let data = content(1_000_000 + 17); // several flush batches + a tail
    let digest = Digest::of(&data);
    let mt = "application/vnd.oci.image.layer.v1.tar+gzip";

    let mut w = store.begin(&digest, meta(mt)).await.unwrap();
    for chunk in data.chunks(64 * 1024 - 3) {
        w.write(chunk).await.unwrap();
    }
    let committed = w.commit().await.unwrap();
    assert_eq!(committed.size, data.len() as u64);
    assert_eq!(committed.meta, meta(mt));

    let found = store.lookup(&digest).await.unwrap().expect("committed");
    assert_eq!(found.digest, digest);
    assert_eq!(found.size, data.len() as u64);
    assert_eq!(found.meta, meta(mt));
    let hex = digest.hex();
    assert_eq!(
        found.path,
        dir.path().join("blobs/sha256").join(&hex[..2]).join(hex)
    );
    let on_disk = fs::read(&found.path).unwrap();
    assert_eq!(Digest::of(&on_disk), digest);
    assert!(tmp_files(dir.path()).is_empty());
    assert_eq!(blob_files(dir.path()).len(), 2); // data + sidecar

    // A store reopened on the same dir still finds it.
    drop(store);
    let store = BlobStore::open(dir.path()).await.unwrap();
    let again = store.lookup(&digest).await.unwrap().expect("persisted");
    assert_eq!(again.meta, meta(mt));
    assert_eq!(again.size, data.len() as u64);
}

#[tokio::test]
async fn wrong_bytes_are_rejected_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path()).await.unwrap();
    let good = content(300_000);
    let digest = Digest::of(&good);
    let mut bad = good.clone();
    bad[123_456] ^= 1;

    let mut w = store.begin(&digest, BlobMeta::default()).await.unwrap();
    for chunk in bad.chunks(32 * 1024) {
        w.write(chunk).await.unwrap();
    }
    match w.commit().await {
        Err(StoreError::DigestMismatch {
            expected,
            actual,
            bytes,
        }) => {
            assert_eq!(expected, digest);
            assert_eq!(actual, Digest::of(&bad));
            assert_eq!(bytes, bad.len() as u64);
        }
        other => panic!("expected DigestMismatch, got {other:?}"),
    }
    // A short body is a mismatch too.
    let mut w = store.begin(&digest, BlobMeta::default()).await.unwrap();
    w.write(&good[..1000]).await.unwrap();
    assert!(matches!(
        w.commit().await,
        Err(StoreError::DigestMismatch { bytes: 1000, .. })
    ));
    // And through put.
    assert!(matches!(
        store.put(&digest, BlobMeta::default(), b"nope").await,
        Err(StoreError::DigestMismatch { .. })
    ));

    assert!(store.lookup(&digest).await.unwrap().is_none());
    assert!(tmp_files(dir.path()).is_empty());
    assert!(blob_files(dir.path()).is_empty());
}

#[tokio::test]
async fn dropped_and_aborted_writers_leave_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path()).await.unwrap();
    let data = content(400_000);
    let digest = Digest::of(&data);

    let mut w = store.begin(&digest, BlobMeta::default()).await.unwrap();
    w.write(&data[..300_000]).await.unwrap(); // flushed to the temp file
    assert_eq!(tmp_files(dir.path()).len(), 1);
    drop(w);
    assert!(tmp_files(dir.path()).is_empty());

    let mut w = store.begin(&digest, BlobMeta::default()).await.unwrap();
    w.write(&data[..300_000]).await.unwrap();
    assert_eq!(tmp_files(dir.path()).len(), 1);
    w.abort().await;
    assert!(tmp_files(dir.path()).is_empty());

    assert!(store.lookup(&digest).await.unwrap().is_none());
    assert!(blob_files(dir.path()).is_empty());
}

#[tokio::test]
async fn open_removes_leftover_temp_files() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("tmp");
    fs::create_dir_all(tmp.join("stray-dir")).unwrap();
    fs::write(tmp.join("abc.1.2.3.tmp"), b"half a layer").unwrap();
    fs::write(tmp.join("abc.1.2.4.json.tmp"), b"{").unwrap();
    fs::write(tmp.join("stray-dir/x"), b"x").unwrap();

    let store = BlobStore::open(dir.path()).await.unwrap();
    assert!(tmp.is_dir());
    assert!(fs::read_dir(&tmp).unwrap().next().is_none());
    // And the store works afterwards.
    let d = Digest::of(b"x");
    store.put(&d, BlobMeta::default(), b"x").await.unwrap();
    assert!(store.lookup(&d).await.unwrap().is_some());
}

#[tokio::test]
async fn concurrent_writers_of_one_digest_both_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(BlobStore::open(dir.path()).await.unwrap());
    let data = Arc::new(content(700_000));
    let digest = Digest::of(&data);
    let barrier = Arc::new(tokio::sync::Barrier::new(2));

    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (store, data, digest, barrier) = (
            Arc::clone(&store),
            Arc::clone(&data),
            digest.clone(),
            Arc::clone(&barrier),
        );
        tasks.push(tokio::spawn(async move {
            let mut w = store.begin(&digest, meta("m")).await.unwrap();
            barrier.wait().await; // both writers in flight at once
            for chunk in data.chunks(16 * 1024) {
                w.write(chunk).await.unwrap();
            }
            barrier.wait().await; // both about to commit
            w.commit().await
        }));
    }
    for t in tasks {
        let blob = t.await.unwrap().unwrap();
        assert_eq!(blob.digest, digest);
        assert_eq!(blob.size, data.len() as u64);
    }
    let hex = digest.hex();
    let shard = dir.path().join("blobs/sha256").join(&hex[..2]);
    assert_eq!(
        blob_files(dir.path()),
        vec![shard.join(hex), shard.join(format!("{hex}.json"))]
    );
    assert!(tmp_files(dir.path()).is_empty());
    let found = store.lookup(&digest).await.unwrap().unwrap();
    assert_eq!(fs::read(&found.path).unwrap(), *data);
}

#[tokio::test]
async fn put_small_object_and_remove() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path()).await.unwrap();
    let manifest = br#"{"schemaVersion":2}"#;
    let digest = Digest::of(manifest);
    let mt = "application/vnd.oci.image.manifest.v1+json";

    let blob = store.put(&digest, meta(mt), manifest).await.unwrap();
    assert_eq!(blob.size, manifest.len() as u64);
    assert_eq!(fs::read(&blob.path).unwrap(), manifest);
    let found = store.lookup(&digest).await.unwrap().unwrap();
    assert_eq!(found.meta, meta(mt));

    // A second put of the same object returns the existing one.
    let again = store.put(&digest, meta(mt), manifest).await.unwrap();
    assert_eq!(again.path, blob.path);
    assert_eq!(blob_files(dir.path()).len(), 2);

    assert!(store.remove(&digest).await.unwrap());
    assert!(store.lookup(&digest).await.unwrap().is_none());
    assert!(blob_files(dir.path()).is_empty());
    assert!(!store.remove(&digest).await.unwrap());
    assert!(tmp_files(dir.path()).is_empty());
}

/// Manifests are served from memory after the first read (the file is
/// not touched again), and whatever removes the entry drops the copy.
#[tokio::test]
async fn small_objects_are_kept_in_memory_until_removed() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path()).await.unwrap();
    let manifest = br#"{"schemaVersion":2,"layers":[]}"#;
    let digest = Digest::of(manifest);
    let mt = "application/vnd.oci.image.manifest.v1+json";
    let blob = store.put(&digest, meta(mt), manifest).await.unwrap();
    // Overwritten behind the store's back: a memory hit does not see it.
    fs::write(&blob.path, b"changed on disk").unwrap();
    let (bytes, m) = store.lookup_small(&digest, 1 << 20).await.unwrap().unwrap();
    assert_eq!(&bytes[..], manifest);
    assert_eq!(m, meta(mt));
    // Larger than the caller's bound: not returned.
    assert!(store.lookup_small(&digest, 4).await.unwrap().is_none());
    assert!(store.remove(&digest).await.unwrap());
    assert!(
        store
            .lookup_small(&digest, 1 << 20)
            .await
            .unwrap()
            .is_none()
    );
    // Committed by a writer (not `put`): read from the file once.
    let other = br#"{"schemaVersion":2,"config":{}}"#;
    let d2 = Digest::of(other);
    let mut w = store.begin(&d2, meta(mt)).await.unwrap();
    w.write(other).await.unwrap();
    let b2 = w.commit().await.unwrap();
    let (bytes, _) = store.lookup_small(&d2, 1 << 20).await.unwrap().unwrap();
    assert_eq!(&bytes[..], other);
    fs::remove_file(&b2.path).unwrap();
    let (bytes, _) = store.lookup_small(&d2, 1 << 20).await.unwrap().unwrap();
    assert_eq!(&bytes[..], other, "second read came from memory");
}

#[tokio::test]
async fn missing_sidecar_gives_default_meta() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path()).await.unwrap();
    let digest = Digest::of(b"abc");
    store.put(&digest, meta("x/y"), b"abc").await.unwrap();
    fs::remove_file(store.inner.layout.meta(&digest)).unwrap();
    let found = store.lookup(&digest).await.unwrap().unwrap();
    assert_eq!(found.meta, BlobMeta::default());
    assert_eq!(found.size, 3);
}

#[tokio::test]
async fn lookup_during_write_sees_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path()).await.unwrap();
    let data = content(600_000);
    let digest = Digest::of(&data);

    let mut w = store.begin(&digest, BlobMeta::default()).await.unwrap();
    w.write(&data[..500_000]).await.unwrap(); // partly on disk in tmp/
    assert!(store.lookup(&digest).await.unwrap().is_none());
    assert!(blob_files(dir.path()).is_empty());
    w.write(&data[500_000..]).await.unwrap();
    assert!(store.lookup(&digest).await.unwrap().is_none());
    w.commit().await.unwrap();
    assert_eq!(
        store.lookup(&digest).await.unwrap().unwrap().size,
        data.len() as u64
    );
}

/// A blob file the index lost (an eviction whose delete failed, a crash
/// between rename and index) is indexed again when the blob is committed
/// again: counted against the bound, found, evictable. It once stayed
/// outside the index until a restart, re-downloaded on every request.
#[tokio::test]
async fn a_blob_file_the_index_lost_is_indexed_again_on_commit() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path()).await.unwrap();
    let bytes = vec![3u8; 5_000];
    let d = Digest::of(&bytes);
    store.put(&d, BlobMeta::default(), &bytes).await.unwrap();
    store
        .inner
        .index
        .lock()
        .unwrap()
        .remove(&d)
        .expect("indexed");
    assert_eq!(store.usage(), (0, 0));
    store.put(&d, BlobMeta::default(), &bytes).await.unwrap();
    assert_eq!(store.usage(), (5_000, 1));
    assert!(store.entry(&d).is_some());
}

/// A blob found is read through the file opened then: removed (purged)
/// afterwards, all its bytes are still there; removed before, it is not
/// found (a miss, not an error).
#[tokio::test]
async fn a_found_blob_stays_readable_after_a_purge() {
    use std::os::unix::fs::FileExt as _;
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path()).await.unwrap();
    let data = content(300_000);
    let digest = Digest::of(&data);
    let committed = store
        .put(&digest, BlobMeta::default(), &data)
        .await
        .unwrap();
    let mut got = vec![0u8; data.len()];
    committed.file.read_exact_at(&mut got, 0).unwrap();
    assert!(got == data, "the committed blob's own file");
    drop(committed);

    let found = store.lookup(&digest).await.unwrap().expect("cached");
    assert!(store.remove(&digest).await.unwrap());
    assert!(!found.path.exists());
    assert_eq!(found.size, data.len() as u64);
    let mut got = vec![0u8; data.len()];
    found.file.read_exact_at(&mut got, 0).unwrap();
    assert!(got == data);
    assert!(store.lookup(&digest).await.unwrap().is_none());
}

/// A blob whose file cannot be removed stays indexed: its bytes still
/// count against the limits, and a retried purge or an eviction finds it.
/// Before, the index forgot it while the file stayed on disk.
#[tokio::test]
async fn a_blob_that_cannot_be_removed_stays_indexed() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path()).await.unwrap();
    let data = content(4096);
    let digest = Digest::of(&data);
    let blob = store.put(&digest, meta("x"), &data).await.unwrap();
    let before = store.usage();
    // A non-empty directory where the file was: unlink fails, even as root.
    fs::remove_file(&blob.path).unwrap();
    fs::create_dir(&blob.path).unwrap();
    fs::write(blob.path.join("obstacle"), b"x").unwrap();

    assert!(store.remove(&digest).await.is_err());
    assert!(store.entry(&digest).is_some(), "the index forgot the blob");
    assert_eq!(store.usage(), before);

    fs::remove_dir_all(&blob.path).unwrap();
    assert!(!store.remove(&digest).await.unwrap());
    assert!(store.entry(&digest).is_none());
    assert_eq!(store.usage(), (0, 0));
}

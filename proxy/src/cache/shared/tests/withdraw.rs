//! A purge overtaking an upload of the blob it removes.

use std::sync::atomic::Ordering;

use tokio::sync::{Notify, Semaphore};

use super::*;
use crate::cache::store::BlobStore;

/// A store whose blob uploads wait at their start until the test lets
/// them on; everything else goes to `inner`.
#[derive(Debug)]
struct Gated {
    inner: Arc<dyn ObjectStore>,
    reached: Notify,
    gate: Semaphore,
}

impl std::fmt::Display for Gated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gated({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for Gated {
    async fn put_opts(
        &self,
        location: &Key,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Key,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.reached.notify_one();
        let _go = self.gate.acquire().await;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Key,
        options: GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Key>>,
    ) -> BoxStream<'static, object_store::Result<Key>> {
        self.inner.delete_stream(locations)
    }

    fn list(
        &self,
        prefix: Option<&Key>,
    ) -> BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&Key>,
    ) -> object_store::Result<object_store::ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Key,
        to: &Key,
        options: object_store::CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// An upload under way when its blob is purged (removed from the disk it
/// reads from through the handle its lease opened, then deleted from the
/// bucket, where it is not yet) completes afterwards: it deletes what it
/// completed. Before, it put the purged blob back in the bucket, and
/// every replica refilled from there.
#[tokio::test]
async fn an_upload_overtaken_by_a_purge_leaves_nothing_in_the_bucket() {
    let gated = Arc::new(Gated {
        inner: Arc::new(InMemory::new()),
        reached: Notify::new(),
        gate: Semaphore::new(0),
    });
    let store: Arc<dyn ObjectStore> = gated.clone();
    let tier = Arc::new(SharedTier::new(store, "/cache/", "memory://".into()));
    let dir = tempfile::tempdir().unwrap();
    let disk = BlobStore::open(dir.path()).await.unwrap();
    let data = vec![9u8; 1 << 20];
    let d = digest_of(&data);
    let blob = disk.put(&d, layer(), &data).await.unwrap();
    let uploads = Uploads::new(Arc::clone(&tier));
    assert!(!uploads.withdraw(&d), "nothing under way yet");
    uploads.submit(blob);
    tokio::time::timeout(Duration::from_secs(5), gated.reached.notified())
        .await
        .expect("the upload did not start");

    // The purge, in its order: the disk, the uploads, the bucket.
    assert!(disk.remove(&d).await.unwrap());
    assert!(uploads.withdraw(&d), "the upload under way");
    assert_eq!(
        tier.purge(&d, Duration::from_secs(5)).await.unwrap(),
        None,
        "not in the bucket yet"
    );
    gated.gate.add_permits(1);

    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while uploads.stats.uploaded.load(Ordering::Relaxed) == 0 {
        assert!(std::time::Instant::now() < deadline, "not uploaded");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    while tier.stat_for_test(&d).await.is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the purged blob is back in the bucket"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

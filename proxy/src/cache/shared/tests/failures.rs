//! What one failed call to the bucket costs: only request-path errors
//! skip the bucket there, a store asking to slow down is backed off from
//! briefly, and an upload the store failed is tried again.

use std::sync::Mutex;

use super::*;
use crate::cache::store::BlobStore;

/// A store that fails the calls the test names, once each, with the
/// error text an S3 client gives; everything else goes to `inner`.
#[derive(Debug)]
struct Flaky {
    inner: Arc<dyn ObjectStore>,
    /// Next calls to fail: (call, part of the key, error text).
    failures: Mutex<Vec<(&'static str, &'static str, &'static str)>>,
}

impl Flaky {
    fn new() -> Self {
        Self {
            inner: Arc::new(InMemory::new()),
            failures: Mutex::default(),
        }
    }

    /// The next `call` of a key containing `key` fails with `message`.
    fn fail(&self, call: &'static str, key: &'static str, message: &'static str) {
        self.failures.lock().unwrap().push((call, key, message));
    }

    fn check(&self, call: &str, location: &Key) -> object_store::Result<()> {
        let mut failures = self.failures.lock().unwrap();
        let Some(i) = failures
            .iter()
            .position(|(c, k, _)| *c == call && location.as_ref().contains(k))
        else {
            return Ok(());
        };
        let (_, _, message) = failures.remove(i);
        Err(object_store::Error::Generic {
            store: "S3",
            source: message.into(),
        })
    }
}

impl std::fmt::Display for Flaky {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Flaky({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for Flaky {
    async fn put_opts(
        &self,
        location: &Key,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        self.check("put", location)?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Key,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.check("put_multipart", location)?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Key,
        options: GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        self.check(if options.head { "head" } else { "get" }, location)?;
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

fn flaky_tier() -> (Arc<Flaky>, Arc<SharedTier>) {
    let flaky = Arc::new(Flaky::new());
    let store: Arc<dyn ObjectStore> = flaky.clone();
    let tier = Arc::new(SharedTier::new(store, "/cache/", "memory://".into()));
    (flaky, tier)
}

const REFUSED: &str = "error sending request: Connection refused";
const SLOW_DOWN: &str = "Server returned non-2xx status code: 503 Service Unavailable: <Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
/// A HEAD's 503: no body to name the code.
const HEAD_503: &str = "Server returned non-2xx status code: 503 Service Unavailable: ";

/// Errors off the request path (a journal write, an upload part) are
/// counted but leave the bucket on for pulls. Before, each one skipped the
/// bucket for every request for 10 s: a SlowDown on one upload part, a
/// failed evictor LIST or journal PUT turned the tier off for the whole
/// replica, again and again on a busy bucket.
#[tokio::test]
async fn errors_off_the_request_path_leave_the_bucket_on_for_requests() {
    let (flaky, tier) = flaky_tier();
    let d = put_blob(&tier, 1, 10 << 10).await;
    let read = |after: &'static str| {
        let tier = Arc::clone(&tier);
        let d = d.clone();
        async move {
            let got = tier.stat(&d).await;
            assert!(matches!(got, Ok(Some(_))), "a pull after {after}: {got:?}");
            assert!(tier.health().is_up(), "reported down after {after}");
        }
    };
    flaky.fail("put", "coord/", REFUSED);
    assert!(tier.put_coord("access/a.json", Bytes::new()).await.is_err());
    read("a failed journal write").await;
    let data = vec![7u8; 1 << 20];
    flaky.fail("put_multipart", "blobs/", SLOW_DOWN);
    assert!(
        tier.upload(&digest_of(&data), &layer(), chunks(&data, 64 << 10))
            .await
            .is_err()
    );
    read("a failed upload").await;
    assert_eq!(tier.health().errors(), 2, "counted");
}

/// A request-path HEAD answered `503` (S3's SlowDown; a HEAD carries no
/// body) backs the request path off for a moment, not for the 10 s of a
/// store that is down, and does not report the bucket down.
#[tokio::test]
async fn a_store_asking_to_slow_down_is_backed_off_from_not_taken_for_down() {
    let (flaky, tier) = flaky_tier();
    let d = put_blob(&tier, 2, 10 << 10).await;
    flaky.fail("head", "blobs/", HEAD_503);
    let err = tier.stat(&d).await.unwrap_err();
    assert!(err.to_string().contains("slow down"), "{err}");
    assert!(tier.health().is_up(), "reported down");
    let skip = tier.health().skip_for().unwrap_or_default();
    assert!(skip <= Duration::from_secs(1), "skipped for {skip:?}");
    tokio::time::sleep(skip + Duration::from_millis(20)).await;
    assert!(matches!(tier.stat(&d).await, Ok(Some(_))));
}

/// A local blob to queue for upload: committed to a store in `dir`.
async fn committed(
    dir: &std::path::Path,
    seed: u8,
) -> (BlobStore, crate::cache::store::CachedBlob) {
    let store = BlobStore::open(dir).await.unwrap();
    let data = vec![seed; 1 << 20];
    let d = digest_of(&data);
    let blob = store.put(&d, layer(), &data).await.unwrap();
    (store, blob)
}

async fn wait_uploaded(uploads: &Uploads, tier: &SharedTier, d: &Digest, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    while uploads
        .stats
        .uploaded
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
    {
        let failed = uploads
            .stats
            .failed
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(failed, 0, "the upload was given up");
        assert!(std::time::Instant::now() < deadline, "not uploaded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(tier.stat_for_test(d).await.is_some());
}

/// An upload that starts while the request path skips the bucket (after
/// a read failed) still goes: before, it failed at once as `Skipped`,
/// counted failed and never tried again, and the blob never reached the
/// bucket.
#[tokio::test]
async fn an_upload_dequeued_while_requests_skip_the_bucket_still_reaches_it() {
    let (_, tier) = flaky_tier();
    tier.health()
        .failed(&TierError::Config("a read failed".into()));
    assert!(tier.health().skip_for().is_some());
    let dir = tempfile::tempdir().unwrap();
    let (_store, blob) = committed(dir.path(), 3).await;
    let d = blob.digest.clone();
    let uploads = Uploads::new(Arc::clone(&tier));
    uploads.submit(blob);
    wait_uploaded(&uploads, &tier, &d, Duration::from_secs(5)).await;
}

/// An upload the store fails (here `503 SlowDown` on starting it) is
/// tried again after a wait, and reaches the bucket; before, it was
/// counted failed and the blob stayed local only for good.
#[tokio::test]
async fn an_upload_the_store_failed_is_tried_again() {
    let (flaky, tier) = flaky_tier();
    flaky.fail("put_multipart", "blobs/", SLOW_DOWN);
    let dir = tempfile::tempdir().unwrap();
    let (_store, blob) = committed(dir.path(), 4).await;
    let d = blob.digest.clone();
    let uploads = Uploads::new(Arc::clone(&tier));
    uploads.submit(blob);
    // The first retry waits 2 s.
    wait_uploaded(&uploads, &tier, &d, Duration::from_secs(10)).await;
}

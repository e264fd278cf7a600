//! The bucket evictor's lease when the holder is held up mid-listing.

use super::*;

/// A store whose listings of blobs wait, once started, until the test
/// opens the gate; everything else goes straight to `inner`. Lets a test
/// hold an evictor mid-listing for as long as it needs, without timing.
/// With `gate_lease_writes`, writes of the lease wait for the gate too
/// once a listing has started (a bucket that stops taking them).
#[derive(Debug)]
struct GatedListing {
    inner: Arc<dyn ObjectStore>,
    /// Told when a listing of blobs has started.
    started: Arc<tokio::sync::Notify>,
    open: tokio::sync::watch::Receiver<bool>,
    gate_lease_writes: bool,
    listing: Arc<std::sync::atomic::AtomicBool>,
}

impl GatedListing {
    fn new(
        inner: Arc<dyn ObjectStore>,
        started: Arc<tokio::sync::Notify>,
        open: tokio::sync::watch::Receiver<bool>,
        gate_lease_writes: bool,
    ) -> Self {
        Self {
            inner,
            started,
            open,
            gate_lease_writes,
            listing: Arc::default(),
        }
    }
}

impl std::fmt::Display for GatedListing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GatedListing({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for GatedListing {
    async fn put_opts(
        &self,
        location: &Key,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        if self.gate_lease_writes
            && location.as_ref().ends_with("coord/evictor")
            && self.listing.load(std::sync::atomic::Ordering::SeqCst)
        {
            let _ = self.open.clone().wait_for(|open| *open).await;
        }
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Key,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
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
        if !prefix.is_some_and(|p| p.as_ref().contains("blobs")) {
            return self.inner.list(prefix);
        }
        let (inner, prefix) = (Arc::clone(&self.inner), prefix.cloned());
        let (started, mut open) = (Arc::clone(&self.started), self.open.clone());
        let listing = Arc::clone(&self.listing);
        stream::once(async move {
            listing.store(true, std::sync::atomic::Ordering::SeqCst);
            started.notify_one();
            let _ = open.wait_for(|open| *open).await;
            inner.list(prefix.as_ref())
        })
        .flatten()
        .boxed()
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

/// Log lines written while a test runs, to read back.
#[derive(Clone, Default)]
struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A holder whose renewals stall while it lists (the bucket stops taking
/// its lease writes), so that another replica takes the lease over after
/// three rounds of seeing it unrenewed, deletes nothing: it finds the
/// lease gone and stops. Deleting from that listing would go on beside
/// the new holder, from journals read before blobs were used again.
#[tokio::test]
async fn a_holder_that_lost_the_lease_while_listing_deletes_nothing() {
    let mem: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let started = Arc::new(tokio::sync::Notify::new());
    let (open, gate) = tokio::sync::watch::channel(false);
    // Replica A lists the bucket through the gate, B straight.
    let slow = Arc::new(SharedTier::new(
        Arc::new(GatedListing::new(
            Arc::clone(&mem),
            Arc::clone(&started),
            gate,
            true,
        )),
        "/cache/",
        "memory://".into(),
    ));
    let tier = Arc::new(SharedTier::new(mem, "/cache/", "memory://".into()));
    for i in 0..10u8 {
        put_blob(&tier, i, 10 << 10).await;
    }
    // 100 KiB under A's 60 KiB bound: A would delete 7. B's bound is far
    // off, so any blob gone was deleted by A.
    let every = Duration::from_millis(50);
    let a = evictor_a(&slow, &storage(60 << 10, 0, 50), false);
    let b = Evictor::new(
        Arc::clone(&tier),
        &storage(1 << 30, 0, 50),
        "b".into(),
        Arc::default(),
        false,
    )
    .unwrap();
    let holds = |e: &Evictor| e.stats.holder.load(std::sync::atomic::Ordering::Relaxed);
    let logs = Logs::default();
    let writer = logs.clone();
    let _logging = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .finish(),
    );
    let takeover = async {
        // A took the lease and is listing.
        started.notified().await;
        assert!(holds(&a), "A listed without the lease");
        b.round_for_test().await.unwrap();
        assert!(!holds(&b), "B took over at once");
        // B takes over once it has seen A's lease unrenewed for three
        // intervals on its own clock.
        for _ in 0..100 {
            if holds(&b) {
                break;
            }
            tokio::time::sleep(every).await;
            b.round_for_test().await.unwrap();
        }
        assert!(holds(&b), "B never took over");
        open.send(true).unwrap();
    };
    let (round, ()) = tokio::join!(a.round_for_test(), takeover);
    round.unwrap();
    let left = tier.list_blobs().await.unwrap().len();
    assert_eq!(left, 10, "A deleted after losing the lease");
    assert_eq!(
        a.stats.evictions.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert!(!holds(&a), "A still counts itself the holder");
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("lost the shared storage eviction lease"),
        "{logs}"
    );
}

/// A holder whose listing takes longer than three intervals (a big or
/// slow bucket) keeps the lease through it, renewing it beside the
/// listing, and evicts. Renewed only at the round's start and once
/// listed, it lost the lease to another replica mid-listing every round,
/// deleted nothing, and the bucket grew without bound.
#[tokio::test]
async fn a_holder_keeps_the_lease_through_a_listing_longer_than_three_intervals() {
    let mem: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let started = Arc::new(tokio::sync::Notify::new());
    let (open, gate) = tokio::sync::watch::channel(false);
    let slow = Arc::new(SharedTier::new(
        Arc::new(GatedListing::new(
            Arc::clone(&mem),
            Arc::clone(&started),
            gate,
            false,
        )),
        "/cache/",
        "memory://".into(),
    ));
    let tier = Arc::new(SharedTier::new(mem, "/cache/", "memory://".into()));
    for i in 0..10u8 {
        put_blob(&tier, i, 10 << 10).await;
    }
    // 100 KiB under A's 60 KiB bound: A deletes 7. B's bound is far off.
    let every = Duration::from_millis(50);
    let a = evictor_a(&slow, &storage(60 << 10, 0, 50), false);
    let b = Evictor::new(
        Arc::clone(&tier),
        &storage(1 << 30, 0, 50),
        "b".into(),
        Arc::default(),
        false,
    )
    .unwrap();
    let holds = |e: &Evictor| e.stats.holder.load(std::sync::atomic::Ordering::Relaxed);
    let others = async {
        started.notified().await;
        assert!(holds(&a), "A listed without the lease");
        // Ten intervals of listing; B would take over after three.
        for _ in 0..10 {
            b.round_for_test().await.unwrap();
            assert!(!holds(&b), "B took the lease over while A was listing");
            tokio::time::sleep(every).await;
        }
        open.send(true).unwrap();
    };
    let (round, ()) = tokio::join!(a.round_for_test(), others);
    round.unwrap();
    assert!(holds(&a), "A lost the lease");
    let left = tier.list_blobs().await.unwrap().len();
    assert_eq!(left, 3, "A evicted down to the low watermark");
}

//! The SeaweedFS handle: a real S3 API on loopback with the semantics the
//! proxy's shared tier relies on (create-if-absent, multipart uploads
//! invisible until completed, ranged reads, listing with sizes and content
//! types), on loopback only, stopped and killed by PID, and started again
//! with its data.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path as FsPath;
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::path::Path;
use object_store::{
    Attribute, AttributeValue, Attributes, GetOptions, GetRange, ObjectStore, ObjectStoreExt,
    PutMode, PutOptions, WriteMultipart,
};
use pullthrough_testbed::net::{is_listening, listening_tcp};
use pullthrough_testbed::seaweed::SeaweedFs;

const LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Every listener of the process is loopback, and exactly the ones the
/// handle configured (master, volume, filer, S3 and their gRPC ports).
fn assert_loopback_only(s3: &SeaweedFs) {
    let mut found = listening_tcp(s3.pid()).unwrap();
    let mut expected = s3.addrs();
    found.sort();
    expected.sort();
    assert!(
        found.iter().all(|a| a.ip().is_loopback()),
        "weed listens beyond loopback: {found:?}"
    );
    assert_eq!(found, expected, "weed's listeners");
}

/// Process `pid` is gone and nothing answers on any of `addrs`.
fn assert_gone(pid: u32, addrs: &[std::net::SocketAddr]) {
    assert!(
        !FsPath::new(&format!("/proc/{pid}")).exists(),
        "weed ({pid}) still running"
    );
    for addr in addrs {
        assert!(!is_listening(*addr), "{addr} still accepts connections");
    }
}

#[test]
fn seaweedfs_speaks_the_s3_the_shared_tier_needs_and_stops_by_pid() {
    let t0 = Instant::now();
    let mut s3 = SeaweedFs::start().unwrap();
    let ready = t0.elapsed();
    assert_loopback_only(&s3);
    assert!(s3.endpoint().starts_with("http://127.0.0.1:"));
    // Its unix sockets (the ones a flag can move) are in its dir.
    for sock in ["filer.sock", "s3.sock"] {
        assert!(s3.dir().join(sock).exists(), "{sock} not in the dir");
    }
    // The handle's own bucket exists and the readiness probe left nothing.
    assert!(s3.objects(s3.bucket(), "").unwrap().is_empty());
    assert!(s3.create_bucket(s3.bucket()).is_err(), "bucket exists");

    s3.create_bucket("smoke").unwrap();
    let store = s3.client("smoke").unwrap();
    let rt = pullthrough_testbed::http::runtime().unwrap();
    let data: Vec<u8> = (0..(12u32 << 20)).map(|i| (i % 253) as u8).collect();
    rt.block_on(async {
        // The first write goes straight through: ready means writable.
        let key = Path::from("a/once");
        let create = || PutOptions {
            mode: PutMode::Create,
            attributes: Attributes::from_iter([(
                Attribute::ContentType,
                AttributeValue::from(LAYER),
            )]),
            ..PutOptions::default()
        };
        let first = Instant::now();
        store
            .put_opts(&key, Bytes::from_static(b"first").into(), create())
            .await
            .unwrap();
        assert!(
            first.elapsed() < Duration::from_secs(5),
            "first write took {:?}",
            first.elapsed()
        );
        let again = store
            .put_opts(&key, Bytes::from_static(b"second").into(), create())
            .await;
        assert!(
            matches!(again, Err(object_store::Error::AlreadyExists { .. })),
            "{again:?}"
        );
        let kept = store.get(&key).await.unwrap().bytes().await.unwrap();
        assert_eq!(&kept[..], b"first");

        let big = Path::from("a/multipart");
        let up = store.put_multipart(&big).await.unwrap();
        let mut w = WriteMultipart::new_with_chunk_size(up, 5 << 20);
        w.put(Bytes::from(data.clone()));
        // Both full parts uploaded, the upload not completed.
        w.wait_for_capacity(0).await.unwrap();
        assert!(
            matches!(
                store.head(&big).await,
                Err(object_store::Error::NotFound { .. })
            ),
            "visible before finish"
        );
        w.finish().await.unwrap();
        assert_eq!(store.head(&big).await.unwrap().size, data.len() as u64);

        let part = store
            .get_opts(
                &big,
                GetOptions {
                    range: Some(GetRange::Bounded(1000..2000)),
                    ..GetOptions::default()
                },
            )
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(&part[..], &data[1000..2000]);
    });
    let mut listed = s3.objects("smoke", "a/").unwrap();
    listed.sort_by(|a, b| a.key.cmp(&b.key));
    let summary: Vec<_> = listed.iter().map(|o| (o.key.as_str(), o.size)).collect();
    assert_eq!(
        summary,
        [("a/multipart", data.len() as u64), ("a/once", 5)],
        "{listed:?}"
    );
    assert_eq!(listed[1].content_type.as_deref(), Some(LAYER));

    let pid = s3.pid();
    let addrs = s3.addrs();
    let grpc_sockets: Vec<String> = ["master", "volume", "filer", "s3"]
        .iter()
        .zip(addrs.iter().skip(1).step_by(2))
        .map(|(name, a)| format!("/tmp/seaweedfs-{name}-grpc-{}.sock", a.port()))
        .collect();
    for sock in &grpc_sockets {
        assert!(FsPath::new(sock).exists(), "{sock} missing while running");
    }
    let stopping = Instant::now();
    s3.stop().unwrap();
    let stopped = stopping.elapsed();
    assert!(stopped < Duration::from_secs(8), "stop took {stopped:?}");
    assert!(!s3.is_running());
    assert_eq!(s3.pid(), 0);
    assert_gone(pid, &addrs);
    for sock in &grpc_sockets {
        assert!(!FsPath::new(sock).exists(), "{sock} left behind");
    }
    eprintln!(
        "seaweedfs: writable after {:.1}s, stopped in {:.1}s, test {:.1}s",
        ready.as_secs_f64(),
        stopped.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn seaweedfs_killed_comes_back_with_its_data_on_the_same_ports() {
    let t0 = Instant::now();
    let work = tempfile::tempdir().unwrap();
    let mut s3 = SeaweedFs::start_in(work.path()).unwrap();
    assert!(work.path().join("weed.log").exists());
    let store = s3.client(s3.bucket()).unwrap();
    let rt = pullthrough_testbed::http::runtime().unwrap();
    let key = Path::from("kept");
    rt.block_on(store.put(&key, Bytes::from_static(b"survives").into()))
        .unwrap();

    let (pid, addrs, endpoint) = (s3.pid(), s3.addrs(), s3.endpoint());
    s3.kill().unwrap();
    assert_gone(pid, &addrs);
    // A no-op on a stopped store.
    s3.stop().unwrap();

    let restart = Instant::now();
    s3.start_again().unwrap();
    let restarted = restart.elapsed();
    assert_ne!(s3.pid(), pid);
    assert_eq!(s3.endpoint(), endpoint);
    assert_loopback_only(&s3);
    rt.block_on(async {
        let got = store.get(&key).await.unwrap().bytes().await.unwrap();
        assert_eq!(&got[..], b"survives");
        store
            .put(&Path::from("after"), Bytes::from_static(b"new").into())
            .await
            .unwrap();
    });
    let keys: Vec<String> = s3
        .objects(s3.bucket(), "")
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    eprintln!(
        "seaweedfs: restarted writable in {:.1}s, test {:.1}s",
        restarted.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    // Dropped: killed by PID, before its dir goes.
    drop(s3);
}

//! The SeaweedFS handle: a real S3 API on loopback with the semantics the
//! proxy's shared tier relies on (create-if-absent, multipart uploads
//! invisible until completed, ranged reads), and stopped by PID.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use object_store::path::Path;
use object_store::{
    GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutOptions, WriteMultipart,
};
use pullthrough_testbed::seaweed::SeaweedFs;

#[test]
fn seaweedfs_speaks_the_s3_the_shared_tier_needs_and_stops_by_pid() {
    let mut s3 = SeaweedFs::start().unwrap();
    s3.create_bucket("smoke").unwrap();
    let store = s3.client("smoke").unwrap();
    let rt = pullthrough_testbed::http::runtime().unwrap();
    rt.block_on(async {
        let key = Path::from("a/once");
        let create = || PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        store
            .put_opts(&key, Bytes::from_static(b"first").into(), create())
            .await
            .unwrap();
        let again = store
            .put_opts(&key, Bytes::from_static(b"second").into(), create())
            .await;
        assert!(
            matches!(again, Err(object_store::Error::AlreadyExists { .. })),
            "{again:?}"
        );

        let big = Path::from("a/multipart");
        let up = store.put_multipart(&big).await.unwrap();
        let mut w = WriteMultipart::new_with_chunk_size(up, 5 << 20);
        let data: Vec<u8> = (0..(12u32 << 20)).map(|i| (i % 253) as u8).collect();
        w.put(Bytes::from(data.clone()));
        w.wait_for_capacity(0).await.unwrap();
        assert!(store.head(&big).await.is_err(), "visible before finish");
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
    let listed = s3.objects("smoke", "a/").unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");

    let pid = s3.pid();
    let endpoint = s3.endpoint();
    s3.kill().unwrap();
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "weed still running"
    );
    let port = endpoint.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

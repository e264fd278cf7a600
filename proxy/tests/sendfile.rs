//! Plain HTTP/1 blob HITs go out with `sendfile` (see
//! `proxy/src/http/sendfile.rs`): against a real registry, the bytes are
//! the cached file's, byte for byte, for whole blobs, ranges across the
//! sendfile spans, keep-alive and pipelined requests and a reader too slow
//! for the socket buffers; `pullthrough_sendfile_bytes_total` shows they
//! took that path, and that HTTPS and HTTP/2 did not, nor a blob whose
//! pages are not in memory (read off the runtime thread instead). A file
//! cut short while it is being sent gives a cut response, never
//! placeholder bytes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use pullthrough_testbed::fixtures::{Image, LayoutBuilder};
use pullthrough_testbed::http::{BodyMode, Conn, tls_config};
use pullthrough_testbed::proxy::Proxy;
use pullthrough_testbed::registry::Registry;

const SENT: &str = "pullthrough_sendfile_bytes_total";
const MIB: usize = 1 << 20;

/// A 16 MiB layer (8 spans of the 2 MiB placeholder) and an odd-sized one.
fn image(dir: &std::path::Path) -> Image {
    LayoutBuilder::new(dir)
        .unwrap()
        .random("1", &[16 * MIB as u64, 3 * MIB as u64 + 7], 41)
        .unwrap()
}

fn sent(proxy: &Proxy) -> u64 {
    proxy
        .metric(SENT)
        .unwrap()
        .expect("the proxy exports the metric") as u64
}

/// The upstream with `image` as `fixture/big:1`, the proxy in front with
/// every blob of it cached (fetched once over plain HTTP), then the
/// upstream stopped: what follows can only come from the cache.
fn cached(image: &Image) -> Proxy {
    let mut up = Registry::plain().unwrap();
    up.push_image(image, "fixture/big", "1").unwrap();
    let proxy = common::proxy_serving("quay.io", &up.url());
    let rt = pullthrough_testbed::http::runtime().unwrap();
    for digest in image.layer_digests() {
        let f = rt
            .block_on(async {
                Conn::plain(proxy.addrs.http)
                    .await?
                    .get(&blob_path(&digest), &[], BodyMode::Count)
                    .await
            })
            .unwrap();
        assert_eq!(f.status, StatusCode::OK);
        proxy
            .wait_access(&[("digest", &digest), ("cache", "MISS"), ("complete", "true")])
            .unwrap();
    }
    // Fetched from the upstream, not sent from a file.
    assert_eq!(sent(&proxy), 0, "{}", proxy.metrics().unwrap());
    up.stop().unwrap();
    proxy
}

fn blob_path(digest: &str) -> String {
    format!("/v2/quay.io/fixture/big/blobs/{digest}")
}

#[test]
fn plain_http1_hits_are_sent_with_sendfile_byte_for_byte() {
    let work = tempfile::tempdir().unwrap();
    let image = image(work.path());
    let proxy = cached(&image);
    let [big, odd] = &image.layer_digests()[..] else {
        panic!("two layers")
    };
    let big_bytes = std::fs::read(image.blob_path(big)).unwrap();
    let odd_bytes = std::fs::read(image.blob_path(odd)).unwrap();
    let rt = pullthrough_testbed::http::runtime().unwrap();

    // One keep-alive connection: a whole blob, a range across span
    // boundaries, a HEAD, a second blob, a range of its last bytes.
    let mut body_bytes = 0u64;
    rt.block_on(async {
        let mut conn = Conn::plain(proxy.addrs.http).await.unwrap();
        let f = conn
            .get(&blob_path(big), &[], BodyMode::Keep)
            .await
            .unwrap();
        assert_eq!(f.status, StatusCode::OK);
        assert!(f.body == big_bytes, "whole blob differs");
        body_bytes += f.bytes;

        let (from, to) = (MIB - 5, 5 * MIB + 3);
        let range = format!("bytes={from}-{to}");
        let f = conn
            .get(&blob_path(big), &[("range", &range)], BodyMode::Keep)
            .await
            .unwrap();
        assert_eq!(f.status, StatusCode::PARTIAL_CONTENT);
        assert!(f.body == big_bytes[from..=to], "range differs");
        body_bytes += f.bytes;

        let f = conn
            .request(Method::HEAD, &blob_path(big), &[], BodyMode::Keep)
            .await
            .unwrap();
        assert_eq!(f.status, StatusCode::OK);
        assert_eq!(
            f.header("content-length"),
            Some(&*big_bytes.len().to_string())
        );
        assert!(f.body.is_empty());

        let f = conn
            .get(&blob_path(odd), &[], BodyMode::Keep)
            .await
            .unwrap();
        assert!(f.body == odd_bytes, "second blob differs");
        body_bytes += f.bytes;

        let f = conn
            .get(&blob_path(odd), &[("range", "bytes=-9")], BodyMode::Keep)
            .await
            .unwrap();
        assert_eq!(f.status, StatusCode::PARTIAL_CONTENT);
        assert!(f.body == odd_bytes[odd_bytes.len() - 9..]);
        body_bytes += f.bytes;
    });
    assert_eq!(sent(&proxy), body_bytes, "every body byte went by sendfile");

    // Pipelined: both requests written before either answer is read.
    let mut tcp = TcpStream::connect(proxy.addrs.http).unwrap();
    let host = proxy.addrs.http;
    write!(
        tcp,
        "GET {p} HTTP/1.1\r\nHost: {host}\r\nRange: bytes=100-2097251\r\n\r\n\
         GET {q} HTTP/1.1\r\nHost: {host}\r\n\r\n",
        p = blob_path(big),
        q = blob_path(odd)
    )
    .unwrap();
    let mut reader = BufReader::new(tcp);
    let first = read_response(&mut reader);
    assert_eq!(first.status, 206);
    assert!(
        first.body == big_bytes[100..=2_097_251],
        "pipelined range differs"
    );
    let second = read_response(&mut reader);
    assert_eq!(second.status, 200);
    assert!(second.body == odd_bytes, "pipelined blob differs");
    body_bytes += (first.body.len() + second.body.len()) as u64;
    assert_eq!(sent(&proxy), body_bytes);

    // HTTPS (HTTP/1.1 and HTTP/2) and HTTP/2 on the plain port: the same
    // bytes, copied through user space, none of them counted as sendfile.
    let ca = proxy.ca_pem().unwrap();
    rt.block_on(async {
        for alpn in [&b"http/1.1"[..], b"h2"] {
            let config = tls_config(&ca, &[alpn]).unwrap();
            let mut conn = Conn::tls(proxy.addrs.https, config, "quay.io")
                .await
                .unwrap();
            let f = conn
                .get(&blob_path(big), &[], BodyMode::Keep)
                .await
                .unwrap();
            assert!(f.body == big_bytes, "HTTPS {alpn:?} body differs");
        }
        let body = h2c_get(&proxy, &blob_path(big)).await;
        assert!(body == big_bytes, "h2c body differs");
    });
    assert_eq!(sent(&proxy), body_bytes, "TLS or HTTP/2 went by sendfile");
    let hits = proxy.access_matching(&[("cache", "HIT"), ("complete", "true")]);
    assert_eq!(hits.len(), 10, "{}", proxy.log());
}

/// A HIT of a blob whose pages are no longer in memory is not sent with
/// `sendfile`, which would read the disk on a runtime thread (stalling
/// every connection it serves): its bytes are read off that thread and
/// sent as ordinary bytes, byte for byte and not counted. Read once, the
/// blob is in memory and the next HIT goes by `sendfile`.
#[test]
fn a_hit_not_in_memory_is_read_not_sent_with_sendfile() {
    use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
    let work = tempfile::tempdir().unwrap();
    let image = image(work.path());
    let proxy = cached(&image);
    let odd = &image.layer_digests()[1];
    let bytes = std::fs::read(image.blob_path(odd)).unwrap();
    let cached_file = std::fs::File::open(proxy.cached_blob_path(odd)).unwrap();
    let tmpfs = nix::sys::statfs::fstatfs(&cached_file)
        .unwrap()
        .filesystem_type()
        == nix::sys::statfs::TMPFS_MAGIC;
    posix_fadvise(&cached_file, 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED).unwrap();
    let rt = pullthrough_testbed::http::runtime().unwrap();
    let get = || {
        rt.block_on(async {
            Conn::plain(proxy.addrs.http)
                .await?
                .get(&blob_path(odd), &[], BodyMode::Keep)
                .await
        })
        .unwrap()
    };

    let f = get();
    assert_eq!(f.status, StatusCode::OK);
    assert!(f.body == bytes, "the uncached blob's bytes differ");
    let cold = sent(&proxy);
    if tmpfs {
        eprintln!("the cache is on tmpfs: its pages cannot be dropped");
    } else {
        // At least its first chunk (page 0 was dropped) was read; the
        // kernel's readahead may have brought later spans in meanwhile.
        assert!(
            cold + (256 << 10) <= bytes.len() as u64,
            "{cold} of {} uncached bytes sent with sendfile",
            bytes.len()
        );
    }

    let f = get();
    assert!(f.body == bytes, "the cached blob's bytes differ");
    assert_eq!(sent(&proxy) - cold, bytes.len() as u64, "a HIT in memory");
}

/// A reader whose receive window is 64 KiB (the proxy's socket buffer
/// fills and `sendfile` would block many times over) gets every byte; a
/// file cut short on disk while it is being sent ends the response early,
/// and what arrived is the file's own prefix, never filler.
#[test]
fn a_slow_reader_and_a_file_cut_mid_send_never_get_wrong_bytes() {
    let work = tempfile::tempdir().unwrap();
    let image = image(work.path());
    let proxy = cached(&image);
    let big = &image.layer_digests()[0];
    let bytes = std::fs::read(image.blob_path(big)).unwrap();

    let mut reader = slow_get(&proxy, &blob_path(big));
    let whole = read_response(&mut reader);
    assert_eq!(whole.status, 200);
    assert!(
        whole.complete && whole.body == bytes,
        "slow reader's body differs"
    );
    assert_eq!(sent(&proxy), bytes.len() as u64);

    // Read 2 MiB, then the cached file loses all but 3 MiB.
    let mut reader = slow_get(&proxy, &blob_path(big));
    let (status, length) = read_head(&mut reader);
    assert_eq!((status, length), (200, bytes.len()));
    let mut got = vec![0u8; 2 * MIB];
    reader.read_exact(&mut got).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(proxy.cached_blob_path(big))
        .unwrap()
        .set_len(3 * MIB as u64)
        .unwrap();
    let mut rest = Vec::new();
    // The proxy closes (or resets) the connection: an error or EOF ends it.
    let _ = reader.read_to_end(&mut rest);
    got.extend_from_slice(&rest);
    assert!(
        got.len() < length,
        "a file cut to 3 MiB gave a whole {length}-byte body"
    );
    assert!(
        got[..] == bytes[..got.len()],
        "the first {} bytes are not the file's",
        got.len()
    );
    let line = proxy
        .wait_access(&[("digest", big.as_str()), ("complete", "false")])
        .unwrap();
    assert_eq!(line.len(), 1, "{}", proxy.log());
}

/// A plain HTTP/1.1 GET on a connection whose receive buffer is 64 KiB,
/// far below one sendfile span (smaller makes loopback stall on delayed
/// ACKs for minutes without testing anything more).
fn slow_get(proxy: &Proxy, path: &str) -> BufReader<TcpStream> {
    let mut tcp = TcpStream::connect(proxy.addrs.http).unwrap();
    nix::sys::socket::setsockopt(&tcp, nix::sys::socket::sockopt::RcvBuf, &(64 * 1024)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n",
        proxy.addrs.http
    )
    .unwrap();
    BufReader::with_capacity(4096, tcp)
}

struct Raw {
    status: u16,
    body: Vec<u8>,
    complete: bool,
}

/// Status and Content-Length of the next response head.
fn read_head(reader: &mut impl BufRead) -> (u16, usize) {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status = line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut length = None;
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = Some(v.trim().parse().unwrap());
        }
    }
    (status, length.expect("a Content-Length"))
}

/// The next response, read a few KiB at a time.
fn read_response(reader: &mut impl BufRead) -> Raw {
    let (status, length) = read_head(reader);
    let mut body = Vec::with_capacity(length);
    let mut chunk = [0u8; 4096];
    while body.len() < length {
        let want = chunk.len().min(length - body.len());
        match reader.read(&mut chunk[..want]) {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    Raw {
        status,
        complete: body.len() == length,
        body,
    }
}

/// GET over HTTP/2 with prior knowledge on the plain port.
async fn h2c_get(proxy: &Proxy, path: &str) -> Vec<u8> {
    let tcp = tokio::net::TcpStream::connect(proxy.addrs.http)
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    let task = tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}{path}", proxy.addrs.http))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    task.abort();
    body
}

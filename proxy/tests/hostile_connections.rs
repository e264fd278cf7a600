//! One client must not be able to take the proxy down by holding
//! connections: thousands of TLS connections that never finish a request
//! head are closed after `limits.headerReadTimeout` while `/healthz` and a
//! real pull keep answering, and at `limits.maxConnections` further
//! clients wait until a connection frees. A client that hangs up before
//! its answer still leaves its access-log line.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pullthrough_testbed::process::run;
use pullthrough_testbed::proxy::{Addrs, Proxy};
use pullthrough_testbed::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FLOOD: usize = 5_000;
/// Short enough for a test, long enough that all of the flood is open at
/// once while the pull runs.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// A proxy serving `upstream` as quay.io (`registry_extra` in its entry),
/// with `top` (top-level keys: limits, timeouts) before the registries.
fn quay_proxy(top: &str, upstream: &str, registry_extra: &str) -> Proxy {
    let config = format!(
        "{top}{}",
        common::one_registry("quay.io", upstream, registry_extra)
    );
    Proxy::start(common::proxy_bin(), Addrs::localhost().unwrap(), &config).unwrap()
}

/// Accepts any server certificate: only for the flood, whose 5 000
/// handshakes verified by a debug build of rustls/webpki on two shared
/// cores take longer than the timeout under test. The probe and the pull
/// verify the proxy's certificate as usual.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn flood_client() -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth()
}

/// The test process holds one descriptor per flood connection; the proxy
/// child inherits the raised limit, so what bounds it is `maxConnections`,
/// not EMFILE.
fn raise_nofile(needed: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(
        hard >= needed,
        "RLIMIT_NOFILE hard limit {hard} is below the {needed} descriptors this test needs"
    );
    if soft < needed {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
}

/// TLS-connects to `addr`, sends a request head
/// without its final empty line, and returns the stream and when the head
/// was sent.
async fn unfinished_request(
    addr: SocketAddr,
    connector: tokio_rustls::TlsConnector,
) -> (tokio_rustls::client::TlsStream<TcpStream>, Instant) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow")
        .await
        .unwrap();
    tls.flush().await.unwrap();
    (tls, Instant::now())
}

/// Reads until the proxy closes the connection; how long after `sent`.
async fn closed_after(
    mut tls: tokio_rustls::client::TlsStream<TcpStream>,
    sent: Instant,
    limit: Duration,
) -> Option<Duration> {
    let mut buf = [0u8; 1024];
    let read_all = async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                // A 408 (or any answer) before the close is fine.
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, read_all).await.ok()?;
    Some(sent.elapsed())
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn unfinished_tls_requests_are_closed_while_health_and_pulls_go_on() {
    raise_nofile(FLOOD as u64 + 2_000);
    let up = common::upstream(Registry::plain().unwrap());
    // The flood comes from the one address the probe and the pull use
    // too: the per-address share is another test's.
    let limits = format!(
        "limits: {{headerReadTimeout: {}s, maxConnections: {}, maxConnectionsPerSource: {}}}\n",
        HEADER_TIMEOUT.as_secs(),
        FLOOD + 100,
        FLOOD + 100,
    );
    let proxy = quay_proxy(&limits, &up.registry.url(), "");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(flood_client()));
    let https = proxy.addrs.https;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Open the whole flood first (64 handshakes at a time), so all of it
    // is held at once while the proxy is asked to work.
    let started = Instant::now();
    let streams = rt.block_on(async {
        use futures::StreamExt;
        futures::stream::iter(0..FLOOD)
            .map(|_| unfinished_request(https, connector.clone()))
            .buffer_unordered(64)
            .collect::<Vec<_>>()
            .await
    });
    let opened_in = started.elapsed();
    eprintln!("{FLOOD} unfinished TLS requests opened in {opened_in:?}");
    assert_eq!(streams.len(), FLOOD);
    assert!(
        opened_in < HEADER_TIMEOUT,
        "opening the flood took {opened_in:?}, longer than the timeout under test"
    );
    let first_sent = streams.iter().map(|(_, t)| *t).min().unwrap();
    let waiters: Vec<_> = streams
        .into_iter()
        .map(|(tls, sent)| rt.spawn(closed_after(tls, sent, HEADER_TIMEOUT * 4)))
        .collect();

    // While every connection of the flood is held: the probe and a real
    // pull through the same HTTPS listener answer.
    let healthz = format!("http://{}/healthz", proxy.addrs.admin);
    let resp = pullthrough_testbed::http::Get::new(&healthz)
        .send()
        .unwrap();
    assert_eq!(resp.status, 200);
    let certs = common::ca_dir(&proxy);
    let out = tempfile::tempdir().unwrap();
    let mut skopeo = Command::new("skopeo");
    skopeo
        .args(["--insecure-policy", "copy", "-q"])
        .arg(format!("--src-cert-dir={}", certs.path().display()))
        .arg(format!("docker://{https}/quay.io/fixture/busybox:1"))
        .arg(format!("oci:{}:x", out.path().join("img").display()));
    run(&mut skopeo).unwrap();
    assert!(
        first_sent.elapsed() < HEADER_TIMEOUT,
        "the pull finished after the flood's first connections could have been closed; \
         the test proved nothing about serving under the flood"
    );
    let layer = &up.busybox.layer_digests()[0];
    proxy
        .wait_access(&[("kind", "blob"), ("digest", layer)])
        .unwrap();

    // Every flood connection is closed by the proxy, after the timeout and
    // not much later.
    let lifetimes: Vec<Option<Duration>> = rt.block_on(async {
        let mut out = Vec::with_capacity(waiters.len());
        for w in waiters {
            out.push(w.await.unwrap());
        }
        out
    });
    let still_open = lifetimes.iter().filter(|l| l.is_none()).count();
    assert_eq!(
        still_open,
        0,
        "{still_open} of {FLOOD} connections were still open {:?} after their head began",
        HEADER_TIMEOUT * 4
    );
    let shortest = lifetimes.iter().flatten().min().unwrap();
    let longest = lifetimes.iter().flatten().max().unwrap();
    assert!(
        *shortest >= HEADER_TIMEOUT - Duration::from_secs(2),
        "a connection was closed after {shortest:?}, before the {HEADER_TIMEOUT:?} timeout"
    );
    assert!(
        *longest <= HEADER_TIMEOUT * 2,
        "a connection was closed only after {longest:?}"
    );
    drop(rt);
    // The proxy let go of the descriptors too.
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_fds(proxy.pid()) > 200 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(open_fds(proxy.pid()) <= 200, "{}", open_fds(proxy.pid()));
    let resp = pullthrough_testbed::http::Get::new(&healthz)
        .send()
        .unwrap();
    assert_eq!(resp.status, 200);
}

/// At `maxConnections` the proxy stops accepting: a further client's
/// request is answered only once a held connection closes.
#[test]
fn at_the_connection_limit_further_clients_wait_for_a_free_slot() {
    let proxy = quay_proxy(
        "limits: {maxConnections: 4, headerReadTimeout: 60s}\n",
        "http://127.0.0.1:9",
        "",
    );
    let http = proxy.addrs.http;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(TcpStream::connect(http).await.unwrap());
        }
        let mut extra = TcpStream::connect(http).await.unwrap();
        extra
            .write_all(b"GET /not-a-registry-path HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 256];
        let early = tokio::time::timeout(Duration::from_millis(1500), extra.read(&mut buf)).await;
        assert!(
            early.is_err(),
            "the fifth connection was served while four were held: {early:?}"
        );
        drop(held.pop());
        let n = tokio::time::timeout(Duration::from_secs(10), extra.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no answer after a slot freed; proxy log:\n{}", proxy.log()))
            .unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 "),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
    });
}

/// A client that hangs up while the proxy still waits on the upstream for
/// its answer makes the server drop the request: it still gets its
/// access-log line (status 499, incomplete), so that a client cannot make
/// requests the log never shows.
#[test]
fn a_client_gone_before_its_answer_still_gets_an_access_line() {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};

    use bytes::Bytes;
    use http::{Response, StatusCode};
    use pullthrough_testbed::stub::Stub;

    let release = Arc::new(AtomicBool::new(false));
    let held = release.clone();
    let stub = Stub::canned()
        .route(move |_| {
            // Holds the answer until the test has hung up (10 s at most,
            // so that a failing test still ends).
            let deadline = Instant::now() + Duration::from_secs(10);
            while !held.load(Ordering::SeqCst) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            Response::builder()
                .status(StatusCode::NOT_FOUND)
                .body(Bytes::new())
                .unwrap()
        })
        .start()
        .unwrap();
    let proxy = common::proxy_serving("quay.io", &stub.url());
    let mut conn = std::net::TcpStream::connect(proxy.addrs.http).unwrap();
    write!(
        conn,
        "GET /v2/quay.io/app/manifests/gone HTTP/1.1\r\nHost: {}\r\n\r\n",
        proxy.addrs.http
    )
    .unwrap();
    pullthrough_testbed::net::wait_for("the upstream asked", Duration::from_secs(10), || {
        Ok(stub.count("GET", "/v2/app/manifests/gone") > 0)
    })
    .unwrap();
    drop(conn);
    let lines = proxy
        .wait_access(&[("reference", "gone"), ("status", "499")])
        .unwrap();
    release.store(true, Ordering::SeqCst);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["complete"], false, "{lines:?}");
    assert_eq!(lines[0]["registry"], "quay.io", "{lines:?}");
    // Counted, but not as the proxy's error: kubelets cancel pulls in
    // every rollout.
    let error = r#"pullthrough_requests_total{registry="quay.io",kind="tag",result="error"}"#;
    assert_eq!(proxy.metric(error).unwrap(), None);
    let miss = r#"pullthrough_requests_total{registry="quay.io",kind="tag",result="miss"}"#;
    assert_eq!(proxy.metric(miss).unwrap(), Some(1.0));
}

/// The other side of closing clients that make no progress: a slow push
/// over HTTP/2 is progress all along, though no answer goes back until
/// its last byte. A 384 KiB blob uploaded in 64 KiB pieces 600 ms apart
/// (3.6 s) lands upstream with `idleTimeout` 1 s (the upload's data is the
/// connection's progress) and the upstream timeouts 1 s + 1 s (they count
/// from the upload's last byte, not from its first: pushes of a layer
/// that took longer than connect + read failed with 502, every retry).
#[test]
fn a_slow_push_over_http2_outlasting_every_timeout_lands() {
    use http_body_util::{BodyExt, Empty, StreamBody};
    let registry = Registry::plain().unwrap();
    let proxy = quay_proxy(
        "limits:\n  idleTimeout: 1s\nupstreamTimeouts:\n  connect: 1s\n  read: 1s\n",
        &registry.url(),
        "    allowPush: true\n",
    );
    let piece = bytes::Bytes::from((0..64 * 1024).map(|i| (i % 253) as u8).collect::<Vec<u8>>());
    let pieces = 6;
    let digest = {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        for _ in 0..pieces {
            h.update(&piece);
        }
        format!("sha256:{}", hex::encode(h.finalize()))
    };
    let https = proxy.addrs.https;
    let ca = proxy.ca_pem().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (status, took) = rt.block_on(async {
        type Upload = http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>;
        let mut cfg = pullthrough_testbed::tls::client_config(&ca).unwrap();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let tcp = tokio::net::TcpStream::connect(https).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http2::handshake::<_, _, Upload>(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let start = http::Request::post(format!(
            "https://{https}/v2/quay.io/pushed/slow/blobs/uploads/"
        ))
        .body(Empty::new().boxed())
        .unwrap();
        let resp = send.send_request(start).await.unwrap();
        assert_eq!(resp.status(), http::StatusCode::ACCEPTED);
        let location = resp.headers()["location"].to_str().unwrap().to_string();
        let sep = if location.contains('?') { '&' } else { '?' };
        let url = if location.starts_with("http") {
            format!("{location}{sep}digest={digest}")
        } else {
            format!("https://{https}{location}{sep}digest={digest}")
        };
        let trickle = futures::stream::unfold(0, move |i| {
            let piece = piece.clone();
            async move {
                if i == pieces {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(600)).await;
                Some((
                    Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(piece)),
                    i + 1,
                ))
            }
        });
        let put = http::Request::put(url)
            .header("content-type", "application/octet-stream")
            .header("content-length", (pieces * 64 * 1024).to_string())
            .body(StreamBody::new(trickle).boxed())
            .unwrap();
        let started = Instant::now();
        let resp = send.send_request(put).await.unwrap();
        (resp.status(), started.elapsed())
    });
    assert_eq!(status, http::StatusCode::CREATED, "{}", proxy.log());
    assert!(took >= Duration::from_secs(3), "{took:?}");
    let url = format!("{}/v2/pushed/slow/blobs/{digest}", registry.url());
    let got = pullthrough_testbed::http::Get::new(&url).send().unwrap();
    assert_eq!(got.status, http::StatusCode::OK);
    assert_eq!(got.body.len(), pieces * 64 * 1024);
}

/// One client address holds at most `limits.maxConnectionsPerSource` of
/// the proxy's connections: past it a connection is closed at once (and
/// counted), while other addresses are served, and a freed slot serves
/// that address again. Without it one pod could hold every connection.
#[test]
fn one_address_holds_at_most_its_share_of_connections() {
    let registry = Registry::plain().unwrap();
    let proxy = quay_proxy(
        "limits:\n  maxConnectionsPerSource: 4\n",
        &registry.url(),
        "",
    );
    let http = proxy.addrs.http;
    let from = |ip: &str| {
        let ip: std::net::IpAddr = ip.parse().unwrap();
        async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::new(ip, 0)).unwrap();
            socket.connect(http).await.unwrap()
        }
    };
    // One request on a fresh connection; the status line, or None when
    // the proxy closed the connection without an answer.
    async fn ping(mut tcp: TcpStream) -> Option<String> {
        tcp.write_all(b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut answer = Vec::new();
        let read = tcp.read_to_end(&mut answer);
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .unwrap()
            .ok()?;
        let text = String::from_utf8_lossy(&answer);
        text.lines().next().map(str::to_string)
    }
    pullthrough_testbed::http::runtime()
        .unwrap()
        .block_on(async {
            let mut held = Vec::new();
            for _ in 0..4 {
                held.push(from("127.0.0.2").await);
            }
            assert_eq!(ping(from("127.0.0.2").await).await, None, "a fifth");
            let other = ping(from("127.0.0.1").await).await;
            assert_eq!(other.as_deref(), Some("HTTP/1.1 200 OK"), "another address");
            drop(held.pop());
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let again = ping(from("127.0.0.2").await).await;
                if again.as_deref() == Some("HTTP/1.1 200 OK") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the freed slot never served: {again:?}"
                );
                tokio::task::yield_now().await;
            }
        });
    let metrics = proxy.metrics().unwrap();
    assert!(
        metrics.lines().any(
            |l| l.starts_with("pullthrough_connections_refused_per_source_total ")
                && !l.ends_with(" 0")
        ),
        "{metrics}"
    );
}

/// An upstream that takes connections and never answers: the leader of a
/// merged miss times out, and its waiters each ask on their own at once.
/// Handing the download to one waiter after another would make the last
/// sit out every leader's timeout in turn (5 clients, 5 timeouts), long
/// past a runtime's pull timeout. A leader refused for its own reasons is
/// handed over (production.rs::a_refused_leader_hands_the_download_to_a_waiter).
#[test]
fn waiters_of_a_leader_the_upstream_failed_do_not_queue_behind_new_leaders() {
    const CLIENTS: usize = 5;
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = quay_proxy(
        "upstreamTimeouts:\n  connect: 1s\n  read: 1s\n",
        &format!("http://{}", silent.local_addr().unwrap()),
        "",
    );
    let digest = format!("sha256:{}", "ab".repeat(32));
    let url = format!("{}/v2/quay.io/org/app/blobs/{digest}", proxy.http_url());
    let get = |url: String| {
        std::thread::spawn(move || {
            let t = Instant::now();
            let r = pullthrough_testbed::http::Get::new(&url)
                .timeout(Duration::from_secs(30))
                .send()
                .unwrap();
            (r.status, t.elapsed())
        })
    };
    // One alone: what one upstream timeout costs here.
    let (status, alone) = get(url.clone()).join().unwrap();
    assert!(status.is_server_error(), "{status}");
    let clients: Vec<_> = (0..CLIENTS).map(|_| get(url.clone())).collect();
    let mut slowest = Duration::ZERO;
    for c in clients {
        let (status, took) = c.join().unwrap();
        assert!(status.is_server_error(), "{status}");
        slowest = slowest.max(took);
    }
    // Its own ask after the leader's: two timeouts, not five.
    assert!(
        slowest < alone * 2 + Duration::from_millis(1500),
        "{slowest:?} for the slowest client next to others; {alone:?} alone"
    );
    drop(silent);
}

//! A purge reaches every replica and the shared bucket: real
//! `pullthrough-proxy` replicas with a static peer list on loopback, over
//! one SeaweedFS bucket, the real `docker-registry` upstream.
//!
//! - a digest purged on one replica is gone from every replica's disk and
//!   from the bucket, and the next pull goes to the upstream again; each
//!   peer was asked once (a forwarded purge is not forwarded again);
//! - a repository purged on a replica that never served it reaches the
//!   replicas that did, and the blobs they name leave every disk;
//! - a replica that is down makes the answer incomplete (500, named
//!   unreachable); once it is back, the same purge completes;
//! - the peer route answers only a peer certificate on the peer
//!   listener, and nothing of it on the client-facing listeners.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::Replicas;
use common::peer_tls::{client_cert, peer_client};
use http::StatusCode;
use pullthrough_testbed::fixtures::{LayoutBuilder, sha256_digest};
use pullthrough_testbed::http::Get;
use pullthrough_testbed::net::wait_for;
use pullthrough_testbed::registry::Registry;
use pullthrough_testbed::seaweed::SeaweedFs;
use serde_json::Value;

const HOST: &str = "quay.io";
const APP: &str = "fixture/app";
/// The same image under another name: the same blobs.
const COPY: &str = "fixture/copy";
const PEER_ROUTE: &str = "/_pullthrough/purge";

/// Replicas over one bucket (or none), an upstream holding one 2 MiB
/// layer as `APP:1` and `COPY:1`.
struct Cluster {
    s3: Option<SeaweedFs>,
    registry: Registry,
    r: Replicas,
    layer: String,
    _work: tempfile::TempDir,
    _creds: Option<tempfile::TempDir>,
}

fn cluster(n: usize, seed: u64, bucket: bool) -> Cluster {
    let work = tempfile::tempdir().unwrap();
    let image = LayoutBuilder::new(&work.path().join("layout"))
        .unwrap()
        .random("1", &[2 << 20], seed)
        .unwrap();
    let layer = image.layer_digests()[0].clone();
    let registry = Registry::plain().unwrap();
    registry.push_image(&image, APP, "1").unwrap();
    registry.push_image(&image, COPY, "1").unwrap();
    let (s3, creds, storage) = if bucket {
        let s3 = SeaweedFs::start().unwrap();
        s3.create_bucket("cache").unwrap();
        let creds = tempfile::tempdir().unwrap();
        std::fs::write(creds.path().join("accessKeyId"), s3.access_key()).unwrap();
        std::fs::write(creds.path().join("secretAccessKey"), s3.secret_key()).unwrap();
        let storage = format!(
            "storage:\n  s3:\n    endpoint: '{}'\n    allowHttp: true\n    pathStyle: true\n    bucket: cache\n    prefix: pullthrough\n    credentials: {{source: files, dir: '{}'}}\n",
            s3.endpoint(),
            creds.path().display()
        );
        (Some(s3), Some(creds), storage)
    } else {
        (None, None, String::new())
    };
    let r = Replicas::start(n, HOST, &registry.url(), &storage);
    Cluster {
        s3,
        registry,
        r,
        layer,
        _work: work,
        _creds: creds,
    }
}

impl Cluster {
    /// Pulls the layer through replica `i` as `repo`.
    fn pull(&self, i: usize, repo: &str) {
        let got = Get::new(&self.r.blob_url(i, HOST, repo, &self.layer))
            .timeout(Duration::from_secs(30))
            .send()
            .unwrap();
        assert_eq!(got.status, StatusCode::OK, "replica {i}, {repo}");
        assert_eq!(sha256_digest(&got.body), self.layer, "replica {i}, {repo}");
    }

    fn on_disk(&self, i: usize) -> bool {
        self.r.proxies[i].cached_blob_path(&self.layer).exists()
    }

    fn in_bucket(&self) -> bool {
        let hex = self.layer.trim_start_matches("sha256:");
        let s3 = self.s3.as_ref().expect("a bucket");
        s3.objects("cache", "pullthrough/blobs/")
            .unwrap()
            .iter()
            .any(|o| o.key.ends_with(hex))
    }

    fn wait_in_bucket(&self) {
        wait_for("the layer in the bucket", Duration::from_secs(30), || {
            Ok(self.in_bucket())
        })
        .unwrap();
    }

    /// Whole upstream GETs of the layer so far (an access check of a
    /// cached blob is a one-byte ranged GET, answered 206).
    fn upstream_gets(&self) -> usize {
        self.registry.sync_log().unwrap();
        self.registry
            .log()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains(&self.layer))
            .filter(|l| l.contains("\" 200 "))
            .count()
    }

    /// `DELETE /admin/cache?<query>` on replica `i` (its loopback admin
    /// listener, open without a token).
    fn purge(&self, i: usize, query: &str) -> (StatusCode, Value) {
        let url = format!(
            "http://{}/admin/cache?{query}",
            self.r.proxies[i].addrs.admin
        );
        let got = Get::new(&url)
            .method(http::Method::DELETE)
            .timeout(Duration::from_secs(120))
            .send()
            .unwrap();
        let v = serde_json::from_slice(&got.body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&got.body).into()));
        (got.status, v)
    }

    /// The answer's entry for replica `i` (a peer of the one purged on).
    fn peer_entry<'a>(&self, answer: &'a Value, i: usize) -> &'a Value {
        let addr = self.r.peers[i].to_string();
        answer["peers"]
            .as_array()
            .and_then(|peers| peers.iter().find(|p| p["replica"] == addr.as_str()))
            .unwrap_or_else(|| panic!("no entry for replica {i} ({addr}): {answer:#}"))
    }

    /// Requests of the peer route replica `i` answered.
    fn peer_purges(&self, i: usize) -> usize {
        self.r.proxies[i]
            .access_lines()
            .iter()
            .filter(|l| l["path"] == PEER_ROUTE)
            .count()
    }
}

fn digests(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The layer is pulled through its owner and through a second replica:
/// it is on both disks and in the bucket. A digest purge on the second
/// replica (the one an admin reaches through the Service) removes it from
/// every disk and from the bucket; the answer says so per replica and for
/// the bucket; the next pull goes to the upstream again. Each peer
/// answered the purge once: a forwarded purge is not forwarded again.
/// Before, the purge removed the second replica's copy only: the owner
/// kept serving it, and the bucket refilled every replica.
#[test]
fn a_digest_purge_on_one_replica_withdraws_the_blob_from_every_disk_and_the_bucket() {
    let c = cluster(3, 41, true);
    let owner = c.r.owner(&c.layer);
    let (asked, idle) = ((owner + 1) % 3, (owner + 2) % 3);
    c.pull(owner, APP);
    c.pull(asked, APP);
    c.wait_in_bucket();
    assert!(c.on_disk(owner) && c.on_disk(asked) && !c.on_disk(idle));
    assert_eq!(c.upstream_gets(), 1);

    let (status, v) = c.purge(asked, &format!("digest={}", c.layer));
    assert_eq!(status, StatusCode::OK, "{v:#}");
    assert_eq!(v["complete"], true, "{v:#}");
    assert_eq!(digests(&v["removed"]), [c.layer.as_str()], "{v:#}");
    let held = c.peer_entry(&v, owner);
    assert_eq!(digests(&held["removed"]), [c.layer.as_str()], "{v:#}");
    assert!(held["bytes"].as_u64().unwrap() >= 2 << 20, "{v:#}");
    assert_eq!(
        digests(&c.peer_entry(&v, idle)["removed"]),
        Vec::<&str>::new()
    );
    assert_eq!(
        digests(&v["bucket"]["removed"]),
        [c.layer.as_str()],
        "{v:#}"
    );

    for i in 0..3 {
        assert!(!c.on_disk(i), "replica {i} still holds it");
    }
    assert!(!c.in_bucket(), "the bucket still holds it");
    assert!(
        c.r.proxies[asked].log().contains("cache purged"),
        "{}",
        c.r.proxies[asked].log()
    );
    wait_for("the peers' access lines", Duration::from_secs(10), || {
        Ok(c.peer_purges(owner) >= 1 && c.peer_purges(idle) >= 1)
    })
    .unwrap();
    for i in 0..3 {
        let expect = usize::from(i != asked);
        assert_eq!(c.peer_purges(i), expect, "peer purges answered by {i}");
    }

    c.pull(asked, APP);
    assert_eq!(c.upstream_gets(), 2, "{}", c.registry.log());
}

/// The layer was served as `APP` by one replica (and its owner), and as
/// `COPY` by a third. A purge of the repository `APP` on the third, which
/// never served `APP`, reaches the two that did: they find the layer in
/// their own repository index and remove it; the third then removes it
/// from its own disk too (a blob shared with another repository is
/// removed, as on one replica), and from the bucket.
#[test]
fn a_repository_purge_on_a_replica_that_never_served_it_reaches_those_that_did() {
    let c = cluster(3, 42, true);
    let owner = c.r.owner(&c.layer);
    let (served, other) = ((owner + 1) % 3, (owner + 2) % 3);
    c.pull(served, APP);
    c.pull(other, COPY);
    c.wait_in_bucket();
    assert!((0..3).all(|i| c.on_disk(i)));
    assert_eq!(c.upstream_gets(), 1, "{}", c.registry.log());

    let (status, v) = c.purge(other, &format!("registry={HOST}&repository={APP}"));
    assert_eq!(status, StatusCode::OK, "{v:#}");
    assert_eq!(v["complete"], true, "{v:#}");
    assert_eq!(digests(&v["removed"]), [c.layer.as_str()], "{v:#}");
    assert_eq!(
        digests(&c.peer_entry(&v, served)["removed"]),
        [c.layer.as_str()],
        "{v:#}"
    );
    assert_eq!(
        digests(&v["bucket"]["removed"]),
        [c.layer.as_str()],
        "{v:#}"
    );
    for i in 0..3 {
        assert!(!c.on_disk(i), "replica {i} still holds it");
    }
    assert!(!c.in_bucket(), "the bucket still holds it");

    c.pull(other, COPY);
    assert_eq!(c.upstream_gets(), 2, "{}", c.registry.log());
}

/// A replica that is down when a repository is purged: the answer is a
/// 500, says it was unreachable and that the purge is incomplete, while
/// the reachable replica and the bucket are purged. The replica comes
/// back with the blob on its disk (and, restarted, an empty repository
/// index): the same purge, repeated on the same replica, reaches it with
/// the digests the first one found, and completes.
#[test]
fn a_replica_that_is_down_makes_the_purge_incomplete_and_a_retry_completes_it() {
    let mut c = cluster(2, 43, true);
    let owner = c.r.owner(&c.layer);
    let down = 1 - owner;
    c.pull(owner, APP);
    c.pull(down, APP);
    c.wait_in_bucket();
    assert!(c.on_disk(owner) && c.on_disk(down));
    c.r.proxies[down].stop().unwrap();

    let query = format!("registry={HOST}&repository={APP}");
    let (status, v) = c.purge(owner, &query);
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{v:#}");
    assert_eq!(v["complete"], false, "{v:#}");
    assert!(c.peer_entry(&v, down)["unreachable"].is_string(), "{v:#}");
    assert_eq!(digests(&v["removed"]), [c.layer.as_str()], "{v:#}");
    assert_eq!(
        digests(&v["bucket"]["removed"]),
        [c.layer.as_str()],
        "{v:#}"
    );
    assert!(!c.on_disk(owner));
    assert!(!c.in_bucket());
    assert!(c.on_disk(down), "stopped with the blob on its disk");
    assert!(
        c.r.proxies[owner].log().contains("incomplete"),
        "{}",
        c.r.proxies[owner].log()
    );

    c.r.proxies[down].start_again().unwrap();
    let (status, v) = c.purge(owner, &query);
    assert_eq!(status, StatusCode::OK, "{v:#}");
    assert_eq!(v["complete"], true, "{v:#}");
    assert_eq!(
        digests(&c.peer_entry(&v, down)["removed"]),
        [c.layer.as_str()],
        "{v:#}"
    );
    assert!(
        !c.on_disk(down),
        "the retry reached the replica that was down"
    );
    assert!(!c.in_bucket());
}

/// `POST <PEER_ROUTE>` with `body` over HTTP/1.1, through TLS to `name`
/// when `tls` is given: the status and body, or what ended the exchange.
async fn post_purge(
    addr: SocketAddr,
    tls: Option<(Arc<rustls::ClientConfig>, &'static str)>,
    body: &str,
) -> Result<(u16, String), String> {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
        mut s: S,
        body: &str,
    ) -> Result<(u16, String), String> {
        let req = format!(
            "POST {PEER_ROUTE} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
        let text = String::from_utf8_lossy(&buf).into_owned();
        match text.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
            Some(status) => Ok((status, text)),
            None => Err(format!("no response ({read:?}): {text:?}")),
        }
    }
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    match tls {
        None => exchange(tcp, body).await,
        Some((config, name)) => {
            let name = rustls_pki_types::ServerName::try_from(name).unwrap();
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            exchange(tls, body).await
        }
    }
}

/// The peer route serves the peer listener's mutual-TLS callers only: no
/// client certificate, or one from the CA without the peer identity, and
/// the purge is refused; on the client-facing listeners the route does
/// not exist. A real peer's purge removes the blob from that replica's
/// disk only: it is not forwarded on to the other replica.
#[test]
fn the_peer_purge_route_answers_only_peers() {
    let c = cluster(2, 44, false);
    let owner = c.r.owner(&c.layer);
    let other = 1 - owner;
    c.pull(owner, APP);
    c.pull(other, APP);
    assert!(c.on_disk(owner) && c.on_disk(other));
    let (ca_crt, ca_key) = (c.r.ca.path().join("ca.crt"), c.r.ca.path().join("ca.key"));
    let ca_pem = std::fs::read_to_string(&ca_crt).unwrap();
    let body = serde_json::json!({"digests": [c.layer]}).to_string();
    let target = &c.r.proxies[other];
    let peer = c.r.peers[other];
    let as_peer = |client| Some((peer_client(&ca_pem, client), "peer.pullthrough.invalid"));
    pullthrough_testbed::http::runtime()
        .unwrap()
        .block_on(async {
            let plain = post_purge(target.addrs.http, None, &body).await;
            assert!(
                plain.as_ref().is_ok_and(|(s, _)| *s == 404),
                "client HTTP listener: {plain:?}"
            );
            let tls = Some((peer_client(&ca_pem, None), HOST));
            let https = post_purge(target.addrs.https, tls, &body).await;
            assert!(
                https.as_ref().is_ok_and(|(s, _)| *s == 404),
                "client HTTPS listener: {https:?}"
            );
            let none = post_purge(peer, as_peer(None), &body).await;
            assert!(none.is_err(), "no client certificate: {none:?}");
            let not_peer = client_cert((&ca_crt, &ca_key), "urn:someone:else");
            let got = post_purge(peer, as_peer(Some(not_peer)), &body).await;
            assert!(
                got.is_err(),
                "CA certificate without the peer identity: {got:?}"
            );
            assert!(c.on_disk(other), "purged by a caller that is no peer");

            let real = client_cert((&ca_crt, &ca_key), "urn:pullthrough:peer");
            let (status, text) = post_purge(peer, as_peer(Some(real)), &body).await.unwrap();
            assert_eq!(status, 200, "{text}");
            assert!(text.contains(&c.layer), "{text}");
        });
    assert!(!c.on_disk(other), "the peer's purge removed it");
    assert!(c.on_disk(owner), "a forwarded purge is not forwarded again");
}

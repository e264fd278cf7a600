//! Several proxy replicas fetch each blob from the upstream once for the
//! whole cluster (issue #12): real `pullthrough-proxy` processes with a
//! static peer list on loopback, the real `docker-registry` behind the
//! test bed's relay (to slow it down or hold it at a precise byte).
//!
//! - 50 clients spread over 3 replicas miss one blob: 1 upstream GET, the
//!   two other replicas each stream it from its owner once;
//! - the owner is killed (SIGKILL) mid-blob: every client still gets the
//!   exact bytes, the survivors continue with `Range` from what they have
//!   and cache only a verified blob;
//! - the peer listener refuses clients without a peer certificate from
//!   the CA, and serves a peer nothing but blob GETs;
//! - a blob the owner holds opens through another replica only to a
//!   client the upstream lets read it there;
//! - an owner that refuses on its own (a config not yet reloaded) or
//!   whose bytes fail the digest is passed over for the upstream.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::Replicas;
use common::peer_tls::{client_cert, peer_client};
use pullthrough_testbed::fixtures::{Image, LayoutBuilder, sha256_digest};
use pullthrough_testbed::net::wait_for;
use pullthrough_testbed::proxy::Proxy;
use pullthrough_testbed::registry::Registry;
use pullthrough_testbed::relay::Relay;
use pullthrough_testbed::stub::Stub;

const HOST: &str = "quay.io";
const REPO: &str = "fixture/big";

fn random_image(dir: &Path, size: u64, seed: u64) -> Image {
    LayoutBuilder::new(&dir.join("layout"))
        .unwrap()
        .random("1", &[size], seed)
        .unwrap()
}

fn peer_lines(proxy: &Proxy, digest: &str) -> usize {
    proxy
        .access_lines()
        .iter()
        .filter(|l| l["via"] == "peer" && l["path"].as_str().is_some_and(|p| p.ends_with(digest)))
        .count()
}

/// 50 clients, round-robin over 3 replicas, miss one 48 MiB blob at once:
/// the upstream sees one GET; the owner serves each other replica once
/// over the peer listener; every client gets the exact bytes and every
/// replica keeps a verified copy.
#[test]
fn fifty_misses_over_three_replicas_fetch_the_blob_once() {
    let work = tempfile::tempdir().unwrap();
    let image = random_image(work.path(), 48 << 20, 12);
    let layer = image.layer_digests()[0].clone();
    let expected = Arc::new(std::fs::read(image.blob_path(&layer)).unwrap());
    let registry = Registry::plain().unwrap();
    registry.push_image(&image, REPO, "1").unwrap();
    // Slower than loopback, so the 50 requests really overlap the fill.
    let relay = Relay::start(registry.addr()).unwrap();
    relay.set_rate(24 << 20);
    let r = Replicas::start(3, HOST, &format!("http://{}", relay.addr), "");
    let owner = r.owner(&layer);

    let results = common::fetch_all(
        (0..50)
            .map(|i| vec![r.blob_url(i % 3, HOST, REPO, &layer)])
            .collect(),
    );
    common::assert_all_exact(&results, &expected);
    registry.sync_log().unwrap();
    assert_eq!(
        registry.count_requests("GET", &layer),
        1,
        "upstream GETs of the blob:\n{}",
        registry.log()
    );
    // Access lines are written as bodies end, a moment after the clients.
    wait_for(
        "the owner's access lines for its peers",
        Duration::from_secs(10),
        || Ok(peer_lines(&r.proxies[owner], &layer) >= 2),
    )
    .unwrap();
    for (i, p) in r.proxies.iter().enumerate() {
        let cached = std::fs::read(p.cached_blob_path(&layer)).unwrap();
        assert_eq!(sha256_digest(&cached), layer, "replica {i}");
        let served_to_peers = peer_lines(p, &layer);
        if i == owner {
            assert_eq!(
                served_to_peers, 2,
                "owner should serve each other replica once"
            );
        } else {
            assert_eq!(served_to_peers, 0, "replica {i} is not the owner");
        }
    }
}

/// A blob cached on its owner, asked for through another replica by a
/// client the upstream would refuse (through a repository that does not
/// hold it): the owner checks with the client's own request, the refusal
/// comes back, nothing of the blob leaves; the same client asking where
/// the blob belongs gets it.
#[test]
fn a_blob_from_its_owner_opens_only_where_the_upstream_lets_the_client_read_it() {
    let work = tempfile::tempdir().unwrap();
    let image = random_image(work.path(), 1 << 20, 14);
    let layer = image.layer_digests()[0].clone();
    let registry = Registry::plain().unwrap();
    registry.push_image(&image, REPO, "1").unwrap();
    let r = Replicas::start(2, HOST, &registry.url(), "");
    let owner = r.owner(&layer);
    let other = 1 - owner;
    let get = |i: usize, repo: &str| {
        pullthrough_testbed::http::Get::new(&r.blob_url(i, HOST, repo, &layer))
            .timeout(Duration::from_secs(20))
            .send()
            .unwrap()
    };
    let cached = get(owner, REPO);
    assert_eq!(cached.status, http::StatusCode::OK);
    assert_eq!(sha256_digest(&cached.body), layer);

    let refused = get(other, "other/empty");
    assert_eq!(
        refused.status,
        http::StatusCode::NOT_FOUND,
        "through other/empty"
    );
    assert_ne!(sha256_digest(&refused.body), layer);
    assert!(refused.body.len() < 1024, "{} bytes", refused.body.len());
    assert!(
        !r.proxies[other].cached_blob_path(&layer).exists(),
        "nothing of it cached on the replica that asked"
    );
    wait_for("the owner's refusal line", Duration::from_secs(10), || {
        Ok(!r.proxies[owner]
            .access_matching(&[("repository", "other/empty"), ("cache", "DENIED")])
            .is_empty())
    })
    .unwrap();

    let allowed = get(other, REPO);
    assert_eq!(allowed.status, http::StatusCode::OK);
    assert_eq!(sha256_digest(&allowed.body), layer);
    // Served by the owner: its refusal was the upstream's answer, so the
    // replica that relayed it did not pass the owner over for the
    // upstream.
    wait_for("the owner served its peer", Duration::from_secs(10), || {
        Ok(!r.proxies[owner]
            .access_matching(&[("via", "peer"), ("repository", REPO), ("digest", &layer)])
            .is_empty())
    })
    .unwrap();
}

/// A blob the owner serves a peer on an answer it had kept (here a
/// client's grant, `authCheckTTL` 6 s) stays open on the replica that
/// asked only as long as on the owner: the repository went private
/// meanwhile, and once the owner's answer is 6 s old the next ask there
/// goes to the upstream and is refused. Before, the peer's 200 was kept as
/// a fresh upstream yes, and the blob stayed open there for a whole TTL
/// more (for a public grant: an hour, and shared with every replica).
#[test]
fn a_peer_fill_keeps_the_owners_answer_no_longer_than_the_owner() {
    const TTL: Duration = Duration::from_secs(6);
    let work = tempfile::tempdir().unwrap();
    let image = random_image(work.path(), 1 << 20, 15);
    let layer = image.layer_digests()[0].clone();
    let stub = Stub::builder(&image.layout).start().unwrap();
    let r = Replicas::start(2, HOST, &stub.url(), "authCheckTTL: 6s\n");
    let owner = r.owner(&layer);
    let other = 1 - owner;
    // A client with credentials of its own: its grant is its own, not
    // public (the stub takes any).
    let get = |i: usize| {
        pullthrough_testbed::http::Get::new(&r.blob_url(i, HOST, REPO, &layer))
            .header("authorization", "Basic dXNlcjpwYXNz")
            .timeout(Duration::from_secs(20))
            .send()
            .unwrap()
    };
    let first = get(owner);
    let answered = std::time::Instant::now();
    assert_eq!(first.status, http::StatusCode::OK);
    assert_eq!(sha256_digest(&first.body), layer);

    // The repository goes private; half the TTL later the client asks
    // the other replica, which the owner still serves on its answer.
    stub.set_response(
        &format!("/v2/{REPO}/blobs/{layer}"),
        http::StatusCode::UNAUTHORIZED,
        "application/json",
        r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
    );
    std::thread::sleep(TTL / 2);
    let filled = get(other);
    assert_eq!(filled.status, http::StatusCode::OK);
    assert_eq!(sha256_digest(&filled.body), layer);
    wait_for("the owner served its peer", Duration::from_secs(10), || {
        Ok(peer_lines(&r.proxies[owner], &layer) >= 1)
    })
    .unwrap();
    assert!(r.proxies[other].cached_blob_path(&layer).exists());
    let filled_at = answered.elapsed();
    assert!(
        filled_at < TTL,
        "the fill took until {filled_at:?}: too slow a machine for this test"
    );

    // Past the owner's TTL, within what a fresh stamp would have given.
    std::thread::sleep((TTL + Duration::from_millis(500)).saturating_sub(answered.elapsed()));
    let asks = stub.count("GET", &layer);
    let again = get(other);
    assert!(
        answered.elapsed() < filled_at + TTL,
        "asked too late to tell the two apart"
    );
    assert_ne!(
        again.status,
        http::StatusCode::OK,
        "served on the peer's answer after the owner's own had run out"
    );
    assert_ne!(sha256_digest(&again.body), layer);
    assert!(
        stub.count("GET", &layer) > asks,
        "the replica asked the upstream"
    );
}

/// The owner is SIGKILLed while it streams the blob to the others: each
/// survivor continues from the upstream with `Range` from the bytes it
/// already has; every client (those of the dead replica retry on another)
/// gets the exact bytes; no replica keeps anything but the verified blob.
#[test]
fn the_owner_dying_mid_blob_leaves_every_client_a_verified_body() {
    let work = tempfile::tempdir().unwrap();
    let size = 32u64 << 20;
    let image = random_image(work.path(), size, 13);
    let layer = image.layer_digests()[0].clone();
    let expected = Arc::new(std::fs::read(image.blob_path(&layer)).unwrap());
    let registry = Registry::plain().unwrap();
    registry.push_image(&image, REPO, "1").unwrap();
    let relay = Relay::start(registry.addr()).unwrap();
    // The owner's fetch stops at 12 MiB until the test releases it.
    relay.hold_after(12 << 20);
    let mut r = Replicas::start(3, HOST, &format!("http://{}", relay.addr), "");
    common::kill_owner_mid_blob(&mut r, &relay, &registry, (HOST, REPO, &layer), &expected);
}

/// The owner answering a peer with a refusal of its own is not final: a
/// replica that just reloaded a config without the registry (replicas
/// pick up a ConfigMap change at different times) answers 403 "neither a
/// configured registry nor a name of this proxy". The replica that asked
/// leaves it out of ownership and fetches the blob from the upstream;
/// before, the owner's 403 was relayed to the client, and every retry
/// asked the same owner again.
#[test]
fn an_owner_refusing_on_its_own_is_passed_over_for_the_upstream() {
    let (_work, layer, registry, r) = two_replicas_with_a_layer(16, "");
    let owner = r.owner(&layer);
    let other = 1 - owner;
    // The owner's config as Replicas::start wrote it, under another name.
    let list = r
        .peers
        .iter()
        .map(|p| format!("'{p}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let config = format!(
        "ca: {{cert: '{}', key: '{}'}}\npeers:\n  listen: '{}'\n  static: [{list}]\n{}",
        r.ca.path().join("ca.crt").display(),
        r.ca.path().join("ca.key").display(),
        r.peers[owner],
        common::one_registry("elsewhere.test", &registry.url(), ""),
    );
    let applied = |p: &Proxy| p.log().matches("config applied").count();
    let before = applied(&r.proxies[owner]);
    r.proxies[owner].write_config(&config).unwrap();
    wait_for(
        "the owner to apply its new config",
        Duration::from_secs(10),
        || Ok(applied(&r.proxies[owner]) > before),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", r.proxies[owner].log()));

    let got = pullthrough_testbed::http::Get::new(&r.blob_url(other, HOST, REPO, &layer))
        .timeout(Duration::from_secs(20))
        .send()
        .unwrap();
    assert_eq!(
        got.status,
        http::StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&got.body)
    );
    assert_eq!(sha256_digest(&got.body), layer);
    registry.sync_log().unwrap();
    assert_eq!(
        registry.count_requests("GET", &layer),
        1,
        "fetched upstream by the replica that asked"
    );
}

/// An owner whose copy of a blob went bad on its disk is not asked for it
/// again: its bytes fail the digest on the replica that asked (that pull
/// fails, nothing is cached), which then leaves the owner out of
/// ownership, so the retry is served from the upstream. Before, the
/// owner was never suspected and every retry got its bad bytes again.
#[test]
fn an_owner_whose_bytes_fail_the_digest_is_passed_over_for_the_upstream() {
    let (_work, layer, registry, r) = two_replicas_with_a_layer(17, "");
    let owner = r.owner(&layer);
    let other = 1 - owner;
    let get = |i: usize| {
        pullthrough_testbed::http::Get::new(&r.blob_url(i, HOST, REPO, &layer))
            .timeout(Duration::from_secs(20))
            .send()
    };
    let first = get(owner).unwrap();
    assert_eq!(first.status, http::StatusCode::OK);
    assert_eq!(sha256_digest(&first.body), layer);
    // Rot on the owner's disk: same length, other bytes, same file.
    let cached = r.proxies[owner].cached_blob_path(&layer);
    let len = std::fs::metadata(&cached).unwrap().len();
    std::fs::write(&cached, vec![0x5a; len as usize]).unwrap();

    let bad = get(other);
    assert!(
        !bad.as_ref()
            .is_ok_and(|b| b.status == http::StatusCode::OK && sha256_digest(&b.body) == layer),
        "the owner's bad bytes passed as the blob"
    );
    assert!(!r.proxies[other].cached_blob_path(&layer).exists());
    let again = get(other).unwrap();
    assert_eq!(again.status, http::StatusCode::OK);
    assert_eq!(
        sha256_digest(&again.body),
        layer,
        "served from the upstream"
    );
    registry.sync_log().unwrap();
    assert_eq!(
        registry.count_requests("GET", &layer),
        2,
        "the owner's fetch, then the retry's"
    );
}

/// Sends one HTTP/1.1 GET over TLS to the peer listener; the status, or
/// the error that ended the exchange.
async fn peer_get(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    path: &str,
) -> Result<u16, String> {
    peer_get_from(addr, config, HOST, path).await
}

/// [`peer_get`] with `Host: host`.
async fn peer_get_from(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    host: &str,
    path: &str,
) -> Result<u16, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from("peer.pullthrough.invalid").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    tls.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    match text.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
        Some(status) => Ok(status),
        None => Err(format!("no response ({read:?}): {text:?}")),
    }
}

/// Two replicas of `HOST` with `extra` config, over a registry holding a
/// 1 MiB layer (`seed`) as `REPO:1`: its work dir, the layer's digest, the
/// registry, the replicas.
fn two_replicas_with_a_layer(
    seed: u64,
    extra: &str,
) -> (tempfile::TempDir, String, Registry, Replicas) {
    let work = tempfile::tempdir().unwrap();
    let image = random_image(work.path(), 1 << 20, seed);
    let layer = image.layer_digests()[0].clone();
    let registry = Registry::plain().unwrap();
    registry.push_image(&image, REPO, "1").unwrap();
    let r = Replicas::start(2, HOST, &registry.url(), extra);
    (work, layer, registry, r)
}

/// Anything that reaches the peer port can open connections and send
/// nothing. From one address it holds at most a few of the listener's
/// 256 slots, so a real peer (another address) is served at once; before,
/// 256 silent connections took every slot and peers waited out their
/// handshake timeout, suspected each other and went to the upstream.
#[test]
fn silent_connections_from_one_address_do_not_keep_peers_out() {
    let (_work, layer, _registry, r) = two_replicas_with_a_layer(15, "");
    let (ca_crt, ca_key) = (r.ca.path().join("ca.crt"), r.ca.path().join("ca.key"));
    let ca_pem = std::fs::read_to_string(&ca_crt).unwrap();
    let peer = r.peers[0];
    let blob = format!("/v2/{REPO}/blobs/{layer}");
    pullthrough_testbed::http::runtime()
        .unwrap()
        .block_on(async {
            let mut silent = Vec::new();
            for _ in 0..300 {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
                silent.push(socket.connect(peer).await.unwrap());
            }
            let real = client_cert((&ca_crt, &ca_key), "urn:pullthrough:peer");
            let got = tokio::time::timeout(
                Duration::from_secs(3),
                peer_get(peer, peer_client(&ca_pem, Some(real)), &blob),
            )
            .await;
            assert_eq!(got, Ok(Ok(200)), "a peer behind 300 silent connections");
            drop(silent);
        });
}

/// Only a peer certificate from the CA opens the peer listener, and a
/// peer may only GET blobs there: no client certificate, a certificate
/// from the CA without the peer identity, or one from another CA are
/// refused; a manifest request from a real peer is 403, and so are a
/// token request (on the registry's auth host: it was relayed to the
/// realm with the Authorization it carried) and a ping on the proxy's own
/// name.
#[test]
fn the_peer_listener_serves_only_peers_and_only_blobs() {
    // Right after the registry's `upstream:`, so the registry's own.
    let (_work, layer, registry, r) =
        two_replicas_with_a_layer(14, "    authHosts: ['auth.test']\n");
    let (ca_crt, ca_key) = (r.ca.path().join("ca.crt"), r.ca.path().join("ca.key"));
    let ca_pem = std::fs::read_to_string(&ca_crt).unwrap();
    let other = tempfile::tempdir().unwrap();
    let other_ca = pullthrough_api::pki::generate_ca(Duration::from_secs(86_400)).unwrap();
    std::fs::write(other.path().join("ca.crt"), &other_ca.cert_pem).unwrap();
    std::fs::write(other.path().join("ca.key"), &other_ca.key_pem).unwrap();
    let blob = format!("/v2/{REPO}/blobs/{layer}");
    let manifest = format!("/v2/{REPO}/manifests/1");
    // Not the blob's owner: a peer's request is served here, never sent
    // on to the owner (one hop at most; no loops when views differ).
    let owner = r.owner(&layer);
    let peer = r.peers[1 - owner];
    pullthrough_testbed::http::runtime()
        .unwrap()
        .block_on(async {
            let none = peer_get(peer, peer_client(&ca_pem, None), &blob).await;
            assert!(none.is_err(), "no client certificate: {none:?}");
            let not_peer = client_cert((&ca_crt, &ca_key), "urn:someone:else");
            let got = peer_get(peer, peer_client(&ca_pem, Some(not_peer)), &blob).await;
            assert!(
                got.is_err(),
                "CA certificate without the peer identity: {got:?}"
            );
            let foreign = client_cert(
                (&other.path().join("ca.crt"), &other.path().join("ca.key")),
                "urn:pullthrough:peer",
            );
            let got = peer_get(peer, peer_client(&ca_pem, Some(foreign)), &blob).await;
            assert!(got.is_err(), "peer identity from another CA: {got:?}");
            let real = client_cert((&ca_crt, &ca_key), "urn:pullthrough:peer");
            let config = peer_client(&ca_pem, Some(real));
            assert_eq!(peer_get(peer, config.clone(), &manifest).await, Ok(403));
            let token = "/token?scope=repository:x:pull";
            let got = peer_get_from(peer, config.clone(), "auth.test", token).await;
            assert_eq!(got, Ok(403), "a token request");
            let got = peer_get_from(peer, config.clone(), "localhost", "/v2/").await;
            assert_eq!(got, Ok(403), "a ping on the proxy's own name");
            assert_eq!(peer_get(peer, config, &blob).await, Ok(200));
        });
    registry.sync_log().unwrap();
    assert_eq!(
        registry.count_requests("GET", "/manifests/"),
        0,
        "{}",
        registry.log()
    );
    assert_eq!(
        registry.count_requests("GET", &layer),
        1,
        "fetched upstream"
    );
    let forwarded = r.proxies[owner].access_matching(&[("digest", &layer)]);
    assert!(forwarded.is_empty(), "the owner was asked: {forwarded:#?}");
}

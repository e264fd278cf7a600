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
//!   the CA, and serves a peer nothing but blob GETs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use pullthrough_proxy::oci::Digest;
use pullthrough_proxy::peers::rendezvous;
use pullthrough_testbed::fixtures::{Image, LayoutBuilder, sha256_digest};
use pullthrough_testbed::http::{BodyMode, Fetched, Get};
use pullthrough_testbed::net::{free_port, wait_for};
use pullthrough_testbed::proxy::{Addrs, Proxy};
use pullthrough_testbed::registry::Registry;
use pullthrough_testbed::relay::Relay;

const HOST: &str = "quay.io";
const REPO: &str = "fixture/big";

/// Replicas sharing one CA and a static peer list.
struct Replicas {
    proxies: Vec<Proxy>,
    peers: Vec<SocketAddr>,
    ca: tempfile::TempDir,
}

impl Replicas {
    /// `n` replicas serving `upstream` as quay.io; `extra` is appended to
    /// every config (e.g. `storage:`).
    fn start(n: usize, upstream: &str, extra: &str) -> Self {
        let ca = tempfile::tempdir().unwrap();
        let generated = pullthrough_api::pki::generate_ca(Duration::from_secs(86_400)).unwrap();
        std::fs::write(ca.path().join("ca.crt"), &generated.cert_pem).unwrap();
        std::fs::write(ca.path().join("ca.key"), &generated.key_pem).unwrap();
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let peers: Vec<SocketAddr> = (0..n)
            .map(|_| SocketAddr::new(lo, free_port().unwrap()))
            .collect();
        let list = peers
            .iter()
            .map(|p| format!("'{p}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let proxies = peers
            .iter()
            .map(|me| {
                let config = format!(
                    "ca: {{cert: {}, key: {}}}\npeers:\n  listen: '{me}'\n  static: [{list}]\n{}{extra}",
                    ca.path().join("ca.crt").display(),
                    ca.path().join("ca.key").display(),
                    common::one_registry(HOST, upstream, ""),
                );
                Proxy::start(common::proxy_bin(), Addrs::localhost().unwrap(), &config).unwrap()
            })
            .collect();
        Self { proxies, peers, ca }
    }

    /// Index of the replica that owns `digest`.
    fn owner(&self, digest: &str) -> usize {
        let d = Digest::parse(digest).unwrap();
        let owner = rendezvous::owner(&d, &self.peers).unwrap();
        self.peers.iter().position(|p| *p == owner).unwrap()
    }

    fn blob_url(&self, i: usize, digest: &str) -> String {
        format!(
            "{}/v2/{HOST}/{REPO}/blobs/{digest}",
            self.proxies[i].http_url()
        )
    }

    fn ca_files(&self) -> (std::path::PathBuf, std::path::PathBuf) {
        (self.ca.path().join("ca.crt"), self.ca.path().join("ca.key"))
    }
}

fn rt() -> tokio::runtime::Runtime {
    pullthrough_testbed::http::runtime().unwrap()
}

fn random_image(dir: &Path, size: u64, seed: u64) -> Image {
    LayoutBuilder::new(&dir.join("layout"))
        .unwrap()
        .random("1", &[size], seed)
        .unwrap()
}

/// GET with a fresh connection; on a connection error (the replica it
/// reached died) asks the next one in `urls`, as a client behind a
/// Service would land on another pod.
async fn fetch_any(urls: Vec<String>) -> Fetched {
    let mut last = None;
    for url in &urls {
        match Get::new(url)
            .timeout(Duration::from_secs(90))
            .fetch(BodyMode::Keep)
            .await
        {
            Ok(f) if f.error.is_none() => return f,
            Ok(f) => last = Some(format!("{url}: body failed: {:?}", f.error)),
            Err(e) => last = Some(format!("{url}: {e}")),
        }
    }
    panic!("no replica served the blob: {last:?}");
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
    let r = Replicas::start(3, &format!("http://{}", relay.addr), "");
    let owner = r.owner(&layer);

    let results = rt().block_on(async {
        let tasks: Vec<_> = (0..50)
            .map(|i| tokio::spawn(fetch_any(vec![r.blob_url(i % 3, &layer)])))
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    for (i, f) in results.iter().enumerate() {
        assert_eq!(f.status, StatusCode::OK, "client {i}");
        assert!(
            f.body == *expected,
            "client {i} got {} wrong bytes",
            f.body.len()
        );
    }
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
    let mut r = Replicas::start(3, &format!("http://{}", relay.addr), "");
    let owner = r.owner(&layer);
    let others: Vec<usize> = (0..3).filter(|i| *i != owner).collect();
    let rt = rt();
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let first = i % 3;
            let urls: Vec<String> = std::iter::once(first)
                .chain(others.iter().copied().filter(|o| *o != first))
                .map(|j| r.blob_url(j, &layer))
                .collect();
            rt.spawn(fetch_any(urls))
        })
        .collect();
    // Every survivor has part of the blob from the owner before it dies.
    wait_for(
        "the survivors to hold part of the blob",
        Duration::from_secs(30),
        || {
            Ok(others.iter().all(|&i| {
                let tmp = r.proxies[i].data_dir().join("tmp");
                std::fs::read_dir(tmp).is_ok_and(|d| {
                    d.flatten()
                        .any(|e| e.metadata().is_ok_and(|m| m.len() >= 4 << 20))
                })
            }))
        },
    )
    .unwrap();
    r.proxies[owner].kill().unwrap();
    relay.release();
    let results: Vec<Fetched> = rt.block_on(async {
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    for (i, f) in results.iter().enumerate() {
        assert_eq!(f.status, StatusCode::OK, "client {i}");
        assert!(
            f.body == *expected,
            "client {i} got {} wrong bytes",
            f.body.len()
        );
    }
    registry.sync_log().unwrap();
    // The owner's GET, and at most one ranged continuation per survivor.
    let gets = registry.count_requests("GET", &layer);
    assert!(
        (2..=3).contains(&gets),
        "{gets} upstream GETs: the survivors should continue with one ranged GET each, not start over:\n{}",
        registry.log()
    );
    let partial = registry
        .log()
        .lines()
        .filter(|l| l.contains("\"GET ") && l.contains(&layer) && l.contains("\" 206 "))
        .count();
    assert_eq!(
        partial,
        gets - 1,
        "continuations must be ranged:\n{}",
        registry.log()
    );
    for &i in &others {
        let p = &r.proxies[i];
        let cached = std::fs::read(p.cached_blob_path(&layer)).unwrap();
        assert_eq!(sha256_digest(&cached), layer, "replica {i}");
        assert!(
            p.tmp_entries().is_empty(),
            "replica {i}: {:?}",
            p.tmp_entries()
        );
        assert!(
            p.log()
                .contains("owner replica failed mid-blob; continuing from the upstream"),
            "replica {i} did not take over:\n{}",
            p.log()
        );
    }
}

/// TLS client config for the peer listener: trusts the CA, presents
/// `client` (cert chain and key, PEM) if given.
fn peer_client(ca_pem: &str, client: Option<(String, String)>) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![rustls_pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A leaf from the test CA for client auth, with `uri` as its SAN.
fn client_cert(ca: (&Path, &Path), uri: &str) -> (String, String) {
    let ca_cert = std::fs::read_to_string(ca.0).unwrap();
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca.1).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_cert, ca_key).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// Sends one HTTP/1.1 GET over TLS to the peer listener; the status, or
/// the error that ended the exchange.
async fn peer_get(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
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
    let req = format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n");
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

/// Only a peer certificate from the CA opens the peer listener, and a
/// peer may only GET blobs there: no client certificate, a certificate
/// from the CA without the peer identity, or one from another CA are
/// refused; a manifest request from a real peer is 403.
#[test]
fn the_peer_listener_serves_only_peers_and_only_blobs() {
    let work = tempfile::tempdir().unwrap();
    let image = random_image(work.path(), 1 << 20, 14);
    let layer = image.layer_digests()[0].clone();
    let registry = Registry::plain().unwrap();
    registry.push_image(&image, REPO, "1").unwrap();
    let r = Replicas::start(2, &registry.url(), "");
    let (ca_crt, ca_key) = r.ca_files();
    let ca_pem = std::fs::read_to_string(&ca_crt).unwrap();
    let other = tempfile::tempdir().unwrap();
    let other_ca = pullthrough_api::pki::generate_ca(Duration::from_secs(86_400)).unwrap();
    std::fs::write(other.path().join("ca.crt"), &other_ca.cert_pem).unwrap();
    std::fs::write(other.path().join("ca.key"), &other_ca.key_pem).unwrap();
    let blob = format!("/v2/{REPO}/blobs/{layer}");
    let manifest = format!("/v2/{REPO}/manifests/1");
    let peer = r.peers[0];
    rt().block_on(async {
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
        assert_eq!(peer_get(peer, config, &blob).await, Ok(200));
    });
    registry.sync_log().unwrap();
    assert_eq!(
        registry.count_requests("GET", "/manifests/"),
        0,
        "{}",
        registry.log()
    );
}

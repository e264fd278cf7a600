//! Tests of CA loading and generation, and of handshakes against the
//! issuer: which names get which certificate.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pullthrough_api::config::CaFiles;
use pullthrough_testbed::tls::TestCa;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};

use super::*;

fn allowed(registries: &[&str], own_names: &[&str], own_ips: &[IpAddr]) -> AllowedNames {
    AllowedNames {
        registry_names: registries.iter().map(|s| s.to_string()).collect(),
        own_names: own_names.iter().map(|s| s.to_string()).collect(),
        own_ips: own_ips.to_vec(),
    }
}

fn default_allowed() -> AllowedNames {
    allowed(
        &["quay.io", "registry-1.docker.io", "docker.io"],
        &["localhost"],
        &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
    )
}

fn client(ca_pem: &str) -> Arc<ClientConfig> {
    let mut cfg = pullthrough_testbed::tls::client_config(ca_pem).unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(cfg)
}

struct Handshake {
    alpn: Option<Vec<u8>>,
    leaf: CertificateDer<'static>,
    resumed: bool,
}

/// One real TLS handshake over loopback; the server says one byte so
/// the client also takes in any session tickets.
async fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> Result<Handshake, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        if let Ok(mut tls) = acceptor.accept(tcp).await {
            let _ = tls.write_all(b"x").await;
            let _ = tls.shutdown().await;
        }
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let result = tokio_rustls::TlsConnector::from(client)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string());
    let result = match result {
        Ok(mut tls) => {
            let mut buf = Vec::new();
            let _ = tls.read_to_end(&mut buf).await;
            let (_, conn) = tls.get_ref();
            Ok(Handshake {
                alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
                leaf: conn.peer_certificates().unwrap()[0].clone().into_owned(),
                resumed: conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
            })
        }
        Err(e) => Err(e),
    };
    server.abort();
    result
}

fn dns(name: &str) -> ServerName<'static> {
    ServerName::try_from(name.to_string()).unwrap()
}

#[test]
fn generated_ca_is_written_once_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let first = Issuer::load_or_generate(None, &data, default_allowed()).unwrap();
    let cert_pem = std::fs::read_to_string(data.join("ca.crt")).unwrap();
    assert_eq!(&*first.ca_pem(), cert_pem);
    assert!(first.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(!first.ca_pem().contains("PRIVATE KEY"));
    let key_mode = std::fs::metadata(data.join("ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    let der = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert!(cert.basic_constraints().unwrap().unwrap().value.ca);
    assert!(cert.key_usage().unwrap().unwrap().value.key_cert_sign());
    let cn = cert.subject().iter_common_name().next().unwrap();
    assert_eq!(cn.as_str().unwrap(), pullthrough_api::pki::CA_COMMON_NAME);
    let not_after = u64::try_from(cert.validity().not_after.timestamp()).unwrap();
    let years = (SystemTime::UNIX_EPOCH + Duration::from_secs(not_after))
        .duration_since(SystemTime::now())
        .unwrap()
        .as_secs()
        / (365 * 86_400);
    assert_eq!(years, 9, "~10 years");

    let second = Issuer::load_or_generate(None, &data, default_allowed()).unwrap();
    assert_eq!(second.ca_pem(), first.ca_pem());
    // No temp files left behind.
    let mut names: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["ca.crt", "ca.key"]);
}

#[test]
fn generated_ca_cert_without_key_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    Issuer::load_or_generate(None, dir.path(), default_allowed()).unwrap();
    std::fs::remove_file(dir.path().join("ca.key")).unwrap();
    let err = Issuer::load_or_generate(None, dir.path(), default_allowed())
        .unwrap_err()
        .to_string();
    assert!(err.contains("ca.key") && err.contains("ca.crt"), "{err}");
}

fn write_ca(dir: &Path, ca: &TestCa, stem: &str) -> CaFiles {
    let cert = dir.join(format!("{stem}.crt"));
    let key = dir.join(format!("{stem}.key"));
    std::fs::write(&cert, ca.cert_pem()).unwrap();
    std::fs::write(&key, ca.key_pem()).unwrap();
    CaFiles {
        cert,
        key,
        next_cert: None,
        next_key: None,
        previous_cert: None,
    }
}

#[tokio::test]
async fn loads_explicit_ca_files() {
    let dir = tempfile::tempdir().unwrap();
    let test_ca = TestCa::new("Example Corp Registry CA").unwrap();
    let files = write_ca(dir.path(), &test_ca, "corp");
    let issuer =
        Arc::new(Issuer::load_or_generate(Some(&files), dir.path(), default_allowed()).unwrap());
    assert_eq!(issuer.ca_pem().trim(), test_ca.cert_pem().trim());
    assert!(!dir.path().join("ca.crt").exists(), "no CA generated");
    // Leaves chain to it: clients trusting only the given CA accept them.
    handshake(
        issuer.server_config(),
        client(&test_ca.cert_pem()),
        dns("quay.io"),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn loads_sec1_ec_private_key() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let test_ca = TestCa::new("sec1 CA").unwrap();
    let files = write_ca(dir.path(), &test_ca, "sec1");
    let pkcs8 = PrivateKeyDer::from_pem_slice(test_ca.key_pem().as_bytes()).unwrap();
    let sec1 = pkcs8_to_sec1(pkcs8.secret_der());
    let b64 = base64::engine::general_purpose::STANDARD.encode(sec1);
    let pem = format!("-----BEGIN EC PRIVATE KEY-----\n{b64}\n-----END EC PRIVATE KEY-----\n");
    std::fs::write(&files.key, pem).unwrap();
    let issuer =
        Arc::new(Issuer::load_or_generate(Some(&files), dir.path(), default_allowed()).unwrap());
    handshake(
        issuer.server_config(),
        client(&issuer.ca_pem()),
        dns("quay.io"),
    )
    .await
    .unwrap();
}

use rustls_pki_types::pem::PemObject;

/// The inner SEC1 key of a PKCS#8 `PrivateKeyInfo`.
fn pkcs8_to_sec1(pkcs8: &[u8]) -> Vec<u8> {
    use x509_parser::asn1_rs::{Any, FromDer, OctetString, Sequence};
    let (_, info) = Sequence::from_der(pkcs8).unwrap();
    let (rest, _version) = u32::from_der(&info.content).unwrap();
    let (rest, _algorithm) = Any::from_der(rest).unwrap();
    let (_, key) = OctetString::from_der(rest).unwrap();
    key.as_cow().to_vec()
}

#[test]
fn explicit_ca_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = write_ca(dir.path(), &TestCa::new("good").unwrap(), "good");
    let other = write_ca(dir.path(), &TestCa::new("other").unwrap(), "other");
    let load = |cert: &Path, key: &Path| {
        let files = CaFiles {
            cert: cert.to_owned(),
            key: key.to_owned(),
            next_cert: None,
            next_key: None,
            previous_cert: None,
        };
        Issuer::load_or_generate(Some(&files), dir.path(), default_allowed())
            .unwrap_err()
            .to_string()
    };

    let missing = dir.path().join("missing.crt");
    let err = load(&missing, &good.key);
    assert!(
        err.contains("missing.crt") && err.contains("reading"),
        "{err}"
    );

    let missing_key = dir.path().join("missing.key");
    let err = load(&good.cert, &missing_key);
    assert!(err.contains("missing.key"), "{err}");

    let garbage = dir.path().join("garbage.crt");
    std::fs::write(&garbage, "this is not a certificate\n").unwrap();
    let err = load(&garbage, &good.key);
    assert!(err.contains("garbage.crt") && err.contains("PEM"), "{err}");

    let broken = dir.path().join("broken.crt");
    std::fs::write(
        &broken,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let err = load(&broken, &good.key);
    assert!(err.contains("broken.crt") && err.contains("X.509"), "{err}");

    let err = load(&good.key, &good.key);
    assert!(
        err.contains("good.key") && err.contains("key file"),
        "{err}"
    );

    let leaf = TestCa::new("issuing")
        .unwrap()
        .server(&["quay.io"])
        .unwrap();
    let (leaf_crt, leaf_key) = leaf.write(dir.path(), "leaf").unwrap();
    let err = load(&leaf_crt, &leaf_key);
    assert!(
        err.contains("leaf.crt") && err.contains("not a CA"),
        "{err}"
    );

    let err = load(&good.cert, &other.key);
    assert!(
        err.contains("good.crt") && err.contains("other.key") && err.contains("does not match"),
        "{err}"
    );

    let garbage_key = dir.path().join("garbage.key");
    std::fs::write(&garbage_key, "nope").unwrap();
    let err = load(&good.cert, &garbage_key);
    assert!(
        err.contains("garbage.key") && err.contains("private key"),
        "{err}"
    );
}

#[tokio::test]
async fn allowed_registry_name_gets_a_verified_leaf_with_h2() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = Arc::new(Issuer::load_or_generate(None, dir.path(), default_allowed()).unwrap());
    let client = client(&issuer.ca_pem());
    // The client verifies the chain to the CA and the name quay.io.
    let hs = handshake(issuer.server_config(), client.clone(), dns("quay.io"))
        .await
        .unwrap();
    assert_eq!(hs.alpn.as_deref(), Some(&b"h2"[..]));
    // Cached: the second handshake gets the same certificate.
    let again = handshake(issuer.server_config(), client.clone(), dns("quay.io"))
        .await
        .unwrap();
    assert_eq!(again.leaf, hs.leaf);
    // SNI is case-insensitive.
    handshake(issuer.server_config(), client.clone(), dns("Quay.IO"))
        .await
        .unwrap();
    // A leaf for one name is not valid for another.
    let docker = handshake(issuer.server_config(), client, dns("docker.io"))
        .await
        .unwrap();
    assert_ne!(docker.leaf, hs.leaf);
}

#[tokio::test]
async fn http1_only_client_gets_http1() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = Arc::new(Issuer::load_or_generate(None, dir.path(), default_allowed()).unwrap());
    let mut cfg = pullthrough_testbed::tls::client_config(&issuer.ca_pem()).unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let hs = handshake(issuer.server_config(), Arc::new(cfg), dns("quay.io"))
        .await
        .unwrap();
    assert_eq!(hs.alpn.as_deref(), Some(&b"http/1.1"[..]));
}

#[tokio::test]
async fn unknown_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = Arc::new(Issuer::load_or_generate(None, dir.path(), default_allowed()).unwrap());
    let err = handshake(
        issuer.server_config(),
        client(&issuer.ca_pem()),
        dns("evil.example"),
    )
    .await
    .err()
    .expect("handshake for evil.example must fail");
    assert!(!err.is_empty());
    assert!(issuer.lock_cache().leaves.is_empty(), "nothing minted");
    // Refused by the server, not only by the client (which would refuse
    // any certificate not naming evil.example, e.g. the proxy's own).
    assert!(
        issuer
            .certificate_for(Some("evil.example"), SystemTime::now())
            .is_none(),
        "a certificate was offered for evil.example"
    );
}

#[tokio::test]
async fn ip_and_own_names_get_the_own_cert() {
    let dir = tempfile::tempdir().unwrap();
    // A CA without name constraints: names are added after it was made
    // (a generated CA permits only the names it was generated for).
    let files = write_ca(dir.path(), &TestCa::new("any name").unwrap(), "ca");
    let issuer = Arc::new(
        Issuer::load_or_generate(
            Some(&files),
            dir.path(),
            allowed(
                &["quay.io"],
                &["localhost", "pullthrough.kube-system.svc"],
                &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            ),
        )
        .unwrap(),
    );
    let client = client(&issuer.ca_pem());
    let by_ip = ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
    let ip = handshake(issuer.server_config(), client.clone(), by_ip.clone())
        .await
        .unwrap();
    assert_eq!(ip.alpn.as_deref(), Some(&b"h2"[..]));
    let svc = handshake(
        issuer.server_config(),
        client.clone(),
        dns("pullthrough.kube-system.svc"),
    )
    .await
    .unwrap();
    assert_eq!(svc.leaf, ip.leaf, "one shared own cert");
    handshake(issuer.server_config(), client.clone(), dns("localhost"))
        .await
        .unwrap();

    // A new own name is served after a reload (the own cert is re-minted).
    issuer.set_allowed(allowed(
        &["quay.io"],
        &["localhost", "mirror.example"],
        &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
    ));
    let mirror = handshake(
        issuer.server_config(),
        client.clone(),
        dns("mirror.example"),
    )
    .await
    .unwrap();
    assert_ne!(mirror.leaf, ip.leaf);
    assert!(
        handshake(
            issuer.server_config(),
            client.clone(),
            dns("pullthrough.kube-system.svc")
        )
        .await
        .is_err()
    );

    // Without own IPs, an IP connection is refused.
    issuer.set_allowed(allowed(&["quay.io"], &["localhost"], &[]));
    assert!(
        handshake(issuer.server_config(), client, by_ip)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn removed_name_is_refused_after_set_allowed() {
    let dir = tempfile::tempdir().unwrap();
    // Unconstrained: `ghcr.io` is added after the CA was made.
    let files = write_ca(dir.path(), &TestCa::new("any name").unwrap(), "ca");
    let issuer =
        Arc::new(Issuer::load_or_generate(Some(&files), dir.path(), default_allowed()).unwrap());
    // One server and one client config throughout, as in production: a
    // resumed session must not get around the removal either.
    let server = issuer.server_config();
    let client = client(&issuer.ca_pem());
    let first = handshake(server.clone(), client.clone(), dns("quay.io"))
        .await
        .unwrap();
    let second = handshake(server.clone(), client.clone(), dns("quay.io"))
        .await
        .unwrap();
    assert!(!first.resumed && !second.resumed, "no session resumption");

    issuer.set_allowed(allowed(
        &["ghcr.io"],
        &["localhost"],
        &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
    ));
    assert!(
        handshake(server.clone(), client.clone(), dns("quay.io"))
            .await
            .is_err()
    );
    assert!(!issuer.lock_cache().leaves.contains_key("quay.io"));
    assert!(
        issuer
            .certificate_for(Some("quay.io"), SystemTime::now())
            .is_none(),
        "a certificate was offered for the removed name"
    );
    handshake(server, client, dns("ghcr.io")).await.unwrap();
}

#[test]
fn leaves_are_reminted_a_week_before_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = Issuer::load_or_generate(None, dir.path(), default_allowed()).unwrap();
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let first = issuer.certificate_for(Some("quay.io"), now).unwrap();
    let later = issuer
        .certificate_for(Some("quay.io"), now + 80 * day)
        .unwrap();
    assert!(Arc::ptr_eq(&first, &later), "still 10 days left: reused");
    let renewed = issuer
        .certificate_for(Some("quay.io"), now + 84 * day)
        .unwrap();
    assert!(
        !Arc::ptr_eq(&first, &renewed),
        "under a week left: re-minted"
    );
    assert_ne!(first.cert[0], renewed.cert[0]);
}

/// Past the CA's end, a leaf is not minted again on every handshake.
#[test]
fn an_expired_ca_does_not_mint_a_leaf_per_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = Issuer::load_or_generate(None, dir.path(), default_allowed()).unwrap();
    let past_the_ca = SystemTime::now() + Duration::from_secs(11 * 365 * 86_400);
    let first = issuer.certificate_for(Some("quay.io"), past_the_ca);
    let next = issuer.certificate_for(Some("quay.io"), past_the_ca + Duration::from_secs(1));
    match (first, next) {
        (Some(first), Some(next)) => assert!(Arc::ptr_eq(&first, &next), "minted again"),
        (first, next) => panic!("no leaf: {:?} {:?}", first.is_some(), next.is_some()),
    }
}

#[test]
fn allowed_names_are_normalized() {
    let n = AllowedNames {
        registry_names: ["Quay.IO.".to_string(), "localhost:5000".to_string()].into(),
        own_names: vec!["Proxy.Example".into(), "10.0.0.7".into(), "[::1]".into()],
        own_ips: vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7))],
    }
    .normalized();
    assert!(n.registry_names.contains("quay.io"));
    assert!(n.registry_names.contains("localhost"));
    assert_eq!(n.own_names, ["proxy.example"]);
    assert_eq!(
        n.own_ips,
        [
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)),
            "::1".parse::<IpAddr>().unwrap()
        ]
    );
}

/// Writes `text` to `path` the way a Secret volume update lands: a new
/// file renamed over the old one.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("swap");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A rotated CA is swapped into the running issuer: new handshakes, for
/// registry names and for the own names (both cached before), get leaves
/// of the new CA, which clients trusting only the old CA refuse, and
/// `ca_pem` (`/ca.crt`) is the new CA.
#[tokio::test]
async fn reload_swaps_the_ca_and_drops_cached_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let old = TestCa::new("old CA").unwrap();
    let files = write_ca(dir.path(), &old, "ca");
    let issuer =
        Arc::new(Issuer::load_or_generate(Some(&files), dir.path(), default_allowed()).unwrap());
    for name in ["quay.io", "localhost"] {
        handshake(issuer.server_config(), client(&old.cert_pem()), dns(name))
            .await
            .unwrap();
    }
    // Same files: nothing to do.
    assert!(issuer.reload(&files.cert, &files.key).unwrap().is_none());

    let new = TestCa::new("new CA").unwrap();
    replace_file(&files.cert, &new.cert_pem());
    replace_file(&files.key, &new.key_pem());
    let info = issuer.reload(&files.cert, &files.key).unwrap().unwrap();
    assert_eq!(info.subject, "new CA");
    assert_eq!(issuer.ca_info(), info);
    assert_eq!(issuer.ca_pem().trim(), new.cert_pem().trim());
    for name in ["quay.io", "localhost"] {
        handshake(issuer.server_config(), client(&new.cert_pem()), dns(name))
            .await
            .unwrap();
        let refused = handshake(issuer.server_config(), client(&old.cert_pem()), dns(name)).await;
        assert!(refused.is_err(), "{name}: a leaf of the old CA was served");
    }
}

/// A pair caught half-updated (the new certificate with the old key) is
/// refused and the running CA stays; once the key follows, the watch swaps
/// the new CA in.
#[tokio::test]
async fn watch_keeps_the_old_ca_until_the_pair_matches() {
    let dir = tempfile::tempdir().unwrap();
    let old = TestCa::new("old CA").unwrap();
    let files = write_ca(dir.path(), &old, "ca");
    let issuer =
        Arc::new(Issuer::load_or_generate(Some(&files), dir.path(), default_allowed()).unwrap());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let paths = watch::CaPaths {
        cert: files.cert.clone(),
        key: files.key.clone(),
        next: None,
        previous: None,
    };
    let task = tokio::spawn(watch::watch(
        issuer.clone(),
        Duration::from_millis(20),
        move || paths.clone(),
        move |outcome| {
            let _ = tx.send(match outcome {
                watch::CaReload::Swapped(info) => format!("swapped {}", info.subject),
                watch::CaReload::Unchanged => "unchanged".to_string(),
                watch::CaReload::Rejected(e) => format!("rejected {e}"),
            });
        },
    ));
    // The first poll checks what was loaded at start-up.
    assert_eq!(next(&mut rx).await, "unchanged");

    let new = TestCa::new("new CA").unwrap();
    replace_file(&files.cert, &new.cert_pem());
    let rejected = next(&mut rx).await;
    assert!(
        rejected.starts_with("rejected") && rejected.contains("does not match"),
        "{rejected}"
    );
    assert_eq!(issuer.ca_pem().trim(), old.cert_pem().trim());
    handshake(
        issuer.server_config(),
        client(&old.cert_pem()),
        dns("quay.io"),
    )
    .await
    .unwrap();
    // Retried at every poll while the files stay inconsistent.
    assert!(next(&mut rx).await.starts_with("rejected"));

    replace_file(&files.key, &new.key_pem());
    let mut outcome = next(&mut rx).await;
    while outcome.starts_with("rejected") {
        outcome = next(&mut rx).await;
    }
    assert_eq!(outcome, "swapped new CA");
    assert_eq!(issuer.ca_pem().trim(), new.cert_pem().trim());
    handshake(
        issuer.server_config(),
        client(&new.cert_pem()),
        dns("quay.io"),
    )
    .await
    .unwrap();
    task.abort();
}

async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap()
}

/// A CA the proxy generates permits only the names it serves then: a name
/// added by a later reload gets a leaf clients refuse (name constraints),
/// while the names it was made for keep working.
#[tokio::test]
async fn a_generated_ca_permits_only_the_names_it_was_made_for() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = Arc::new(Issuer::load_or_generate(None, dir.path(), default_allowed()).unwrap());
    let client = client(&issuer.ca_pem());
    handshake(issuer.server_config(), client.clone(), dns("quay.io"))
        .await
        .unwrap();
    issuer.set_allowed(allowed(
        &["quay.io", "ghcr.io"],
        &["localhost"],
        &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
    ));
    let err = handshake(issuer.server_config(), client.clone(), dns("ghcr.io"))
        .await
        .err()
        .expect("a leaf for a name the CA does not permit");
    assert!(err.contains("NameConstraint"), "{err}");
    handshake(issuer.server_config(), client, dns("quay.io"))
        .await
        .unwrap();
}

//! Issue #14, point 8: the proxy CA carries X.509 name constraints that
//! permit only the mirrored registries and the proxy's own names.
//!
//! The attack: someone steals the CA key (it signs for every registry the
//! nodes reach through the proxy) and mints a certificate for a name the
//! proxy does not serve. The nodes trust the CA; without constraints they
//! would accept it. Here the real proxy generates its CA, the test takes
//! its key from the data dir, mints leaves for a permitted name, an
//! unpermitted name and an unpermitted IP, and serves each from a TLS
//! server on loopback. Three independent verifiers, each given the CA as
//! its only root: rustls (webpki), Go (skopeo) and OpenSSL (`s_client`).
//! Each accepts the permitted leaf (so a refusal is about the name, not
//! the server) and refuses the others. The proxy's own leaves, minted
//! under the same constraints, are accepted by all three.
//!
//! Then the rotation side: a registry the current CA does not permit is
//! signed by the next CA (which nodes trust from the moment it exists).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use pullthrough_api::pki::{self, PermittedNames};
use pullthrough_testbed::ns::{MountNs, write_hosts_file};
use pullthrough_testbed::proxy::{Addrs, Proxy, proxy_bin};
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PERMITTED: &str = "registry.test";
const OUTSIDE: &str = "evil.test";
/// Loopback, but not one of the proxy's addresses.
const OUTSIDE_IP: &str = "127.0.0.2";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A leaf for `san` signed with the CA's key, as the thief would mint it.
fn mint(ca_pem: &str, ca_key_pem: &str, san: SanType) -> Arc<CertifiedKey> {
    let ca_key = KeyPair::from_pem(ca_key_pem).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(ca_pem, ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![san];
    params.distinguished_name = rcgen::DistinguishedName::new();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap();
    let signer = provider().key_provider.load_private_key(key).unwrap();
    Arc::new(CertifiedKey::new(vec![cert.der().clone()], signer))
}

/// Serves the permitted leaf for SNI `registry.test`, the outside one for
/// `evil.test` and the IP leaf without SNI (clients that dial an IP).
#[derive(Debug)]
struct Leaves {
    permitted: Arc<CertifiedKey>,
    outside: Arc<CertifiedKey>,
    outside_ip: Arc<CertifiedKey>,
}

impl ResolvesServerCert for Leaves {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(match hello.server_name() {
            Some(PERMITTED) => self.permitted.clone(),
            Some(OUTSIDE) => self.outside.clone(),
            _ => self.outside_ip.clone(),
        })
    }
}

/// A TLS server on `ip` (port chosen by the system) that answers every
/// request with an empty 404, on its own runtime thread.
fn serve(leaves: Leaves, ip: &str) -> SocketAddr {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(leaves));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = std::net::TcpListener::bind((ip, 0)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // A refused handshake is the point of most connections.
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = tls.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        let answer = "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n";
                        if tls.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
    });
    addr
}

/// rustls, with `ca_pem` (one or more CAs) as its only roots: the
/// handshake's error, or None when the server's certificate verified.
fn rustls_refusal(ca_pem: &str, addr: SocketAddr, name: &str) -> Option<String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let server_name = ServerName::try_from(name.to_string()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(10), connector.connect(server_name, tcp))
            .await
        {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(format!("{e:?}")),
            Err(_) => Some("timed out".into()),
        }
    })
}

/// OpenSSL's `s_client` verifying against `ca_file` only: its verify
/// result line ("Verify return code: 0 (ok)" or the failure).
fn openssl_verdict(ca_file: &Path, addr: SocketAddr, name: &str) -> String {
    let mut args = vec![
        "s_client".to_string(),
        "-connect".into(),
        addr.to_string(),
        "-CAfile".into(),
        ca_file.display().to_string(),
        "-verify_return_error".into(),
        "-brief".into(),
    ];
    match name.parse::<IpAddr>() {
        Ok(_) => args.extend(["-verify_ip".into(), name.to_string()]),
        Err(_) => args.extend([
            "-servername".into(),
            name.to_string(),
            "-verify_hostname".into(),
            name.to_string(),
        ]),
    }
    let out = Command::new("openssl")
        .args(&args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && text.contains("Verification: OK") {
        "ok".into()
    } else {
        text
    }
}

/// skopeo (Go's crypto/x509) inspecting an image at `host:port` with the
/// CA as the only root, in a private mount namespace whose `/etc/hosts`
/// sends the test names to loopback. Its stderr.
fn skopeo_stderr(work: &Path, cert_dir: &Path, host_port: &str) -> String {
    let hosts = work.join("hosts");
    write_hosts_file(
        &hosts,
        &[
            (PERMITTED, "127.0.0.1".parse().unwrap()),
            (OUTSIDE, "127.0.0.1".parse().unwrap()),
        ],
    )
    .unwrap();
    let mut cmd = MountNs::new()
        .hosts(&hosts)
        .command(
            "skopeo",
            [
                "--insecure-policy".to_string(),
                "inspect".into(),
                "--raw".into(),
                format!("--cert-dir={}", cert_dir.display()),
                "--tls-verify=true".into(),
                format!("docker://{host_port}/library/app:1"),
            ],
        )
        .unwrap();
    cmd.env("HOME", work)
        .env("REGISTRY_AUTH_FILE", work.join("auth.json"))
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy");
    let out = cmd.output().expect("skopeo");
    assert!(!out.status.success(), "every server here answers 404");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Go's words for a certificate a constrained CA may not have signed.
const GO_REFUSAL: &str = "not authorized to sign for this name";

fn is_x509_error(stderr: &str) -> bool {
    stderr.contains("x509:") || stderr.contains("certificate")
}

#[test]
fn a_stolen_ca_key_cannot_vouch_for_names_outside_the_mirrored_set() {
    let work = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(
        &proxy_bin().unwrap(),
        Addrs::localhost().unwrap(),
        &format!("registries:\n  - host: {PERMITTED}\n    upstream: http://127.0.0.1:9\n"),
    )
    .unwrap();
    let ca_pem = proxy.ca_pem().unwrap();
    let ca_key = std::fs::read_to_string(proxy.data_dir().join("ca.key")).unwrap();

    // What the generated CA says it permits.
    let permitted = PermittedNames::of_pem(&ca_pem)
        .unwrap()
        .expect("the generated CA has name constraints");
    assert!(permitted.permits_dns(PERMITTED), "{permitted}");
    assert!(permitted.permits_dns("localhost"), "{permitted}");
    assert!(
        permitted.permits_ip("127.0.0.1".parse().unwrap()),
        "{permitted}"
    );
    assert!(!permitted.permits_dns(OUTSIDE), "{permitted}");
    assert!(
        !permitted.permits_ip(OUTSIDE_IP.parse().unwrap()),
        "{permitted}"
    );

    let cert_dir = work.path().join("certs");
    std::fs::create_dir(&cert_dir).unwrap();
    let ca_file = cert_dir.join("ca.crt");
    std::fs::write(&ca_file, &ca_pem).unwrap();

    let leaves = || Leaves {
        permitted: mint(
            &ca_pem,
            &ca_key,
            SanType::DnsName(PERMITTED.try_into().unwrap()),
        ),
        outside: mint(
            &ca_pem,
            &ca_key,
            SanType::DnsName(OUTSIDE.try_into().unwrap()),
        ),
        outside_ip: mint(
            &ca_pem,
            &ca_key,
            SanType::IpAddress(OUTSIDE_IP.parse().unwrap()),
        ),
    };
    let fake = serve(leaves(), "127.0.0.1");
    let fake_on_ip = serve(leaves(), OUTSIDE_IP);

    // rustls (webpki).
    assert_eq!(rustls_refusal(&ca_pem, fake, PERMITTED), None);
    let refusal = rustls_refusal(&ca_pem, fake, OUTSIDE).expect("rustls accepted evil.test");
    assert!(refusal.contains("NameConstraintViolation"), "{refusal}");
    let refusal =
        rustls_refusal(&ca_pem, fake_on_ip, OUTSIDE_IP).expect("rustls accepted 127.0.0.2");
    assert!(refusal.contains("NameConstraintViolation"), "{refusal}");

    // OpenSSL.
    assert_eq!(openssl_verdict(&ca_file, fake, PERMITTED), "ok");
    let verdict = openssl_verdict(&ca_file, fake, OUTSIDE);
    assert!(verdict.contains("permitted subtree violation"), "{verdict}");
    let verdict = openssl_verdict(&ca_file, fake_on_ip, OUTSIDE_IP);
    assert!(verdict.contains("permitted subtree violation"), "{verdict}");

    // Go, through skopeo.
    let port = fake.port();
    let stderr = skopeo_stderr(work.path(), &cert_dir, &format!("{PERMITTED}:{port}"));
    assert!(
        !is_x509_error(&stderr),
        "skopeo refused the permitted leaf: {stderr}"
    );
    let stderr = skopeo_stderr(work.path(), &cert_dir, &format!("{OUTSIDE}:{port}"));
    assert!(stderr.contains(GO_REFUSAL), "{stderr}");
    let stderr = skopeo_stderr(
        work.path(),
        &cert_dir,
        &format!("{OUTSIDE_IP}:{}", fake_on_ip.port()),
    );
    assert!(stderr.contains(GO_REFUSAL), "{stderr}");

    // The proxy's own leaves, minted under the same constraints, pass all
    // three: for the registry (by SNI) and for its own IP (no SNI).
    let https = proxy.addrs.https;
    assert_eq!(rustls_refusal(&ca_pem, https, PERMITTED), None);
    assert_eq!(rustls_refusal(&ca_pem, https, "127.0.0.1"), None);
    assert_eq!(openssl_verdict(&ca_file, https, PERMITTED), "ok");
    assert_eq!(openssl_verdict(&ca_file, https, "127.0.0.1"), "ok");
    let stderr = skopeo_stderr(
        work.path(),
        &cert_dir,
        &format!("{PERMITTED}:{}", https.port()),
    );
    assert!(
        !is_x509_error(&stderr),
        "skopeo refused the proxy: {stderr}"
    );
}

/// Writes a CA permitting `names` (plus what every proxy CA permits) as
/// `<stem>.crt`/`<stem>.key` in `dir`.
fn write_ca(dir: &Path, stem: &str, names: &[&str]) -> (PathBuf, PathBuf, String) {
    let mut all = vec![pki::PEER_NAME, pki::SELF_TEST_NAME, "localhost"];
    all.extend(names);
    let permitted =
        PermittedNames::new(all, ["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()]);
    let ca = pki::generate_constrained_ca(Duration::from_secs(86_400), &permitted).unwrap();
    let cert = dir.join(format!("{stem}.crt"));
    let key = dir.join(format!("{stem}.key"));
    std::fs::write(&cert, &ca.cert_pem).unwrap();
    std::fs::write(&key, &ca.key_pem).unwrap();
    (cert, key, ca.cert_pem)
}

/// A registry added since the current CA was made: the operator has made
/// a next CA that permits it and published both to the nodes; the proxy
/// signs the new name with the next CA and the old ones with the current.
/// Without a next CA it says in its log which names clients will refuse.
#[test]
fn a_name_the_current_ca_does_not_permit_is_signed_by_the_next_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, current) = write_ca(dir.path(), "tls", &["old.test"]);
    let (next_cert, next_key, next) = write_ca(dir.path(), "next", &["old.test", "new.test"]);
    let registries = "registries:\n  - host: old.test\n    upstream: http://127.0.0.1:9\n  - host: new.test\n    upstream: http://127.0.0.1:9\n";
    let with_next = format!(
        "ca:\n  cert: {}\n  key: {}\n  nextCert: {}\n  nextKey: {}\n{registries}",
        cert.display(),
        key.display(),
        next_cert.display(),
        next_key.display()
    );
    let proxy = Proxy::start(
        &proxy_bin().unwrap(),
        Addrs::localhost().unwrap(),
        &with_next,
    )
    .unwrap();
    let https = proxy.addrs.https;
    let bundle = format!("{current}{next}");
    assert_eq!(rustls_refusal(&bundle, https, "new.test"), None);
    assert_eq!(
        rustls_refusal(&next, https, "new.test"),
        None,
        "signed by the next CA"
    );
    assert_eq!(
        rustls_refusal(&current, https, "old.test"),
        None,
        "signed by the current CA"
    );
    assert!(!proxy.log().contains("do not permit"), "{}", proxy.log());
    drop(proxy);

    let without_next = format!(
        "ca:\n  cert: {}\n  key: {}\n{registries}",
        cert.display(),
        key.display()
    );
    let proxy = Proxy::start(
        &proxy_bin().unwrap(),
        Addrs::localhost().unwrap(),
        &without_next,
    )
    .unwrap();
    let log = proxy.log();
    let warning = log
        .lines()
        .find(|l| l.contains("do not permit"))
        .unwrap_or_else(|| panic!("no warning about unpermitted names:\n{log}"));
    assert!(
        warning.contains("new.test") && !warning.contains("old.test"),
        "{warning}"
    );
    let refusal = rustls_refusal(&current, proxy.addrs.https, "new.test").expect("accepted");
    assert!(refusal.contains("NameConstraintViolation"), "{refusal}");
}

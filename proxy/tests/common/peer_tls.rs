//! TLS for tests that talk to the peer listener themselves: a client
//! config trusting the test CA, and client certificates from it.

use std::path::Path;
use std::sync::Arc;

/// TLS client config for the peer listener: trusts the CA, presents
/// `client` (cert chain and key, PEM) if given.
pub fn peer_client(ca_pem: &str, client: Option<(String, String)>) -> Arc<rustls::ClientConfig> {
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
pub fn client_cert(ca: (&Path, &Path), uri: &str) -> (String, String) {
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

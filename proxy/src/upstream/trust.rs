//! TLS trust towards one upstream: the webpki roots plus the registry's
//! `caBundle`, or nothing at all for `insecureSkipVerify`.

use std::path::Path;
use std::sync::Arc;

use pullthrough_api::config::RegistryConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::UpstreamError;

pub(super) fn tls_config(registry: &RegistryConfig) -> Result<ClientConfig, UpstreamError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|source| UpstreamError::TlsConfig {
            registry: registry.host.clone(),
            source,
        })?;
    if registry.insecure_skip_verify {
        // caBundle is moot without verification and is not read.
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoCertificateVerification { provider }))
            .with_no_client_auth());
    }
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = &registry.ca_bundle {
        for cert in read_ca_bundle(&registry.host, path)? {
            roots
                .add(cert)
                .map_err(|e| UpstreamError::CaBundleInvalid {
                    registry: registry.host.clone(),
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
        }
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

pub(super) fn read_ca_bundle(
    registry: &str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, UpstreamError> {
    let pem = std::fs::read(path).map_err(|source| UpstreamError::CaBundleRead {
        registry: registry.to_string(),
        path: path.to_path_buf(),
        source,
    })?;
    let invalid = |reason: String| UpstreamError::CaBundleInvalid {
        registry: registry.to_string(),
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid("no CERTIFICATE block in the file".into()));
    }
    Ok(certs)
}

/// DANGEROUS: accepts any server certificate for any name, so anyone on the
/// path can impersonate the upstream. Used only for registries configured
/// with `insecureSkipVerify`. Handshake signatures are still checked with
/// the provider's algorithms, so the peer must hold the key of the
/// certificate it presents.
#[derive(Debug)]
pub(super) struct NoCertificateVerification {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for NoCertificateVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

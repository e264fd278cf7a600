//! Mutual TLS between replicas: each presents a certificate minted from
//! the proxy CA for [`PEER_NAME`] / [`PEER_URI`] with both serverAuth and
//! clientAuth usage: the only certificate the proxy issues for client
//! auth, so a leaf minted for a registry name can never pass as a peer.
//! Configs are rebuilt when the CA rotates and before the leaf expires.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::{Issuer, TlsError};

/// The name a replica's server certificate carries and its peers verify
/// (they connect by IP; `.invalid` never resolves).
pub use pullthrough_api::pki::PEER_NAME;
/// The identity a client certificate must carry on the peer listener.
pub const PEER_URI: &str = "urn:pullthrough:peer";

/// Re-mint this long before the peer leaf expires.
const RENEW_BEFORE: Duration = Duration::from_secs(86_400);

struct Configs {
    ca_pem: Arc<str>,
    renew_at: SystemTime,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

pub struct PeerTls {
    issuer: Arc<Issuer>,
    cached: Mutex<Option<Configs>>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls").finish_non_exhaustive()
    }
}

impl PeerTls {
    pub fn new(issuer: Arc<Issuer>) -> Self {
        Self {
            issuer,
            cached: Mutex::new(None),
        }
    }

    /// For the peer listener: requires a client certificate from the CA.
    pub fn server(&self) -> Result<Arc<ServerConfig>, TlsError> {
        self.with(|c| c.server.clone())
    }

    /// For requests to peers: presents this replica's peer certificate and
    /// trusts only the CA.
    pub fn client(&self) -> Result<Arc<ClientConfig>, TlsError> {
        self.with(|c| c.client.clone())
    }

    fn with<T>(&self, f: impl FnOnce(&Configs) -> T) -> Result<T, TlsError> {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        let ca = self.issuer.current_ca();
        let now = SystemTime::now();
        if let Some(c) = cached.as_ref()
            && Arc::ptr_eq(&c.ca_pem, &ca.pem)
            && now < c.renew_at
        {
            return Ok(f(c));
        }
        let config_err = |reason: String| TlsError::Config { reason };
        let minted = ca
            .mint_peer(now)
            .map_err(|e| config_err(format!("minting the peer certificate: {e}")))?;
        let mut roots = RootCertStore::empty();
        let root = CertificateDer::pem_slice_iter(ca.pem.as_bytes())
            .next()
            .ok_or_else(|| config_err("the CA file holds no certificate".into()))?
            .map_err(|e| config_err(format!("the CA certificate: {e}")))?;
        roots
            .add(root)
            .map_err(|e| config_err(format!("the CA certificate as a trust anchor: {e}")))?;
        let roots = Arc::new(roots);
        let provider = self.issuer.provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| config_err(format!("peer client verifier: {e}")))?;
        let key = PrivateKeyDer::Pkcs8(minted.key.clone_key());
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| config_err(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(minted.chain.clone(), key)
            .map_err(|e| config_err(format!("peer server certificate: {e}")))?;
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| config_err(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(minted.chain, PrivateKeyDer::Pkcs8(minted.key))
            .map_err(|e| config_err(format!("peer client certificate: {e}")))?;
        client.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let lifetime = minted.not_after.duration_since(now).unwrap_or_default();
        let renew_at = now + lifetime.saturating_sub(RENEW_BEFORE).max(lifetime / 2);
        let configs = Configs {
            ca_pem: ca.pem.clone(),
            renew_at,
            server: Arc::new(server),
            client: Arc::new(client),
        };
        let out = f(&configs);
        *cached = Some(configs);
        Ok(out)
    }
}

/// True when the handshake's client certificate carries the peer identity.
pub fn is_peer(leaf: &CertificateDer<'_>) -> bool {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(leaf.as_ref()) else {
        return false;
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return false;
    };
    san.value
        .general_names
        .iter()
        .any(|n| matches!(n, GeneralName::URI(u) if *u == PEER_URI))
}

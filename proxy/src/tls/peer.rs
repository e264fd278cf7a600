//! Mutual TLS between replicas: each presents a certificate minted from
//! the proxy CA for [`PEER_NAME`] / [`PEER_URI`] with both serverAuth and
//! clientAuth usage: the only certificate the proxy issues for client
//! auth, so a leaf minted for a registry name can never pass as a peer.
//! Both sides trust the current CA, the next one and, for a while, the
//! one a rotation replaced (see [`Issuer::peer_trust`]), so replicas that
//! pick up a rotated CA at different times keep talking to each other.
//! Configs are rebuilt when that set changes and before the leaf expires.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

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
    /// [`Issuer::trust_generation`] the configs were built for.
    generation: u64,
    /// When a trusted CA's grace ends (the set shrinks).
    trust_until: Option<Instant>,
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
    /// trusts only the peer CAs.
    pub fn client(&self) -> Result<Arc<ClientConfig>, TlsError> {
        self.with(|c| c.client.clone())
    }

    fn with<T>(&self, f: impl FnOnce(&Configs) -> T) -> Result<T, TlsError> {
        self.with_at(SystemTime::now(), Instant::now(), f)
    }

    /// `now` for the leaf's validity, `mono` for the replaced CA's grace
    /// (monotonic: a wall-clock step must not stretch or cut it).
    fn with_at<T>(
        &self,
        now: SystemTime,
        mono: Instant,
        f: impl FnOnce(&Configs) -> T,
    ) -> Result<T, TlsError> {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cached.as_ref()
            && c.generation == self.issuer.trust_generation()
            && c.trust_until.is_none_or(|until| mono < until)
            && now < c.renew_at
        {
            return Ok(f(c));
        }
        let trust = self.issuer.peer_trust(mono);
        let config_err = |reason: String| TlsError::Config { reason };
        let minted = trust
            .current
            .mint_peer(now)
            .map_err(|e| config_err(format!("minting the peer certificate: {e}")))?;
        let mut roots = RootCertStore::empty();
        for pem in &trust.trusted {
            let root = CertificateDer::pem_slice_iter(pem.as_bytes())
                .next()
                .ok_or_else(|| config_err("the CA file holds no certificate".into()))?
                .map_err(|e| config_err(format!("the CA certificate: {e}")))?;
            roots
                .add(root)
                .map_err(|e| config_err(format!("the CA certificate as a trust anchor: {e}")))?;
        }
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
            generation: trust.generation,
            trust_until: trust.until,
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use pullthrough_api::config::CaFiles;
    use pullthrough_testbed::tls::TestCa;
    use rustls_pki_types::ServerName;

    use super::*;
    use crate::tls::AllowedNames;

    fn write_ca(dir: &Path, ca: &TestCa, stem: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        std::fs::write(&cert, ca.cert_pem()).unwrap();
        std::fs::write(&key, ca.key_pem()).unwrap();
        (cert, key)
    }

    fn issuer(dir: &Path, current: &TestCa, next: Option<&TestCa>) -> Arc<Issuer> {
        let (cert, key) = write_ca(dir, current, "ca");
        let (next_cert, next_key) = match next {
            Some(n) => {
                let (c, k) = write_ca(dir, n, "next");
                (Some(c), Some(k))
            }
            None => (None, None),
        };
        let files = CaFiles {
            cert,
            key,
            next_cert,
            next_key,
            previous_cert: None,
        };
        Arc::new(Issuer::load_or_generate(Some(&files), dir, AllowedNames::default()).unwrap())
    }

    /// One mutual-TLS handshake in memory: `client` connects to `server`
    /// as a replica does (by [`PEER_NAME`]); `Ok` when both sides accept,
    /// and the server saw the peer identity.
    async fn handshake(server: &PeerTls, client: &PeerTls) -> Result<(), String> {
        handshake_with(server.server().unwrap(), client.client().unwrap()).await
    }

    async fn handshake_with(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
    ) -> Result<(), String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let connector = tokio_rustls::TlsConnector::from(client);
        let name = ServerName::try_from(PEER_NAME).unwrap().to_owned();
        let accept = async move {
            let mut tls = acceptor
                .accept(a)
                .await
                .map_err(|e| format!("server: {e}"))?;
            let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
            assert!(
                is_peer(&leaf),
                "the client did not present the peer identity"
            );
            tls.write_all(b"x")
                .await
                .map_err(|e| format!("server: {e}"))?;
            tls.shutdown().await.map_err(|e| format!("server: {e}"))?;
            Ok::<_, String>(())
        };
        let connect = async move {
            let mut tls = connector
                .connect(name, b)
                .await
                .map_err(|e| format!("client: {e}"))?;
            // Reading the byte makes the client wait for the server's
            // verdict on its certificate (TLS 1.3 sends it after Finished).
            let mut buf = [0u8; 1];
            tls.read_exact(&mut buf)
                .await
                .map_err(|e| format!("client: {e}"))?;
            Ok::<_, String>(())
        };
        let (s, c) = tokio::join!(accept, connect);
        s.and(c)
    }

    /// During a rotation a replica that has the new CA as current already
    /// and one that still has it as next (kubelet syncs the Secret to each
    /// Pod at its own time) accept each other both ways, while a CA that is
    /// none of current, next or just-replaced is still refused.
    #[tokio::test]
    async fn replicas_mid_rotation_accept_each_other() {
        let old = TestCa::new("old CA").unwrap();
        let new = TestCa::new("new CA").unwrap();
        let other = TestCa::new("unrelated CA").unwrap();

        // A: started on the old CA, then the rotation promoted the new one.
        let dir_a = tempfile::tempdir().unwrap();
        let a_issuer = issuer(dir_a.path(), &old, None);
        let (cert, key) = write_ca(dir_a.path(), &new, "ca");
        assert!(a_issuer.reload(&cert, &key).unwrap().is_some());
        let a = PeerTls::new(a_issuer);
        // B: lags behind, the new CA is only its next one, which appeared
        // after B had built its configs (they must follow it).
        let dir_b = tempfile::tempdir().unwrap();
        let b_issuer = issuer(dir_b.path(), &old, None);
        let b = PeerTls::new(b_issuer.clone());
        b.client().unwrap();
        let (next_cert, next_key) = write_ca(dir_b.path(), &new, "next");
        assert!(b_issuer.reload_next(Some((&next_cert, &next_key))).unwrap());
        // C: a CA neither knows.
        let dir_c = tempfile::tempdir().unwrap();
        let c = PeerTls::new(issuer(dir_c.path(), &other, None));

        handshake(&a, &b).await.expect("B connecting to A");
        handshake(&b, &a).await.expect("A connecting to B");
        for (server, client, what) in [
            (&a, &c, "C to A"),
            (&c, &a, "A to C"),
            (&b, &c, "C to B"),
            (&c, &b, "B to C"),
        ] {
            assert!(
                handshake(server, client).await.is_err(),
                "{what} was accepted"
            );
        }
    }

    /// A replica (re)started after a rotation never held the replaced CA,
    /// so only the Secret's `previous.crt` tells it to trust a replica
    /// still presenting a leaf of that CA; once the operator drops it
    /// from the Secret, such a replica is refused again.
    #[tokio::test]
    async fn a_replica_started_after_a_rotation_trusts_the_previous_ca_file() {
        let old = TestCa::new("old CA").unwrap();
        let new = TestCa::new("new CA").unwrap();
        let other = TestCa::new("unrelated CA").unwrap();
        // A: started on the new CA, with the old one as previous.crt.
        let dir_a = tempfile::tempdir().unwrap();
        let (cert, key) = write_ca(dir_a.path(), &new, "ca");
        let (previous, _) = write_ca(dir_a.path(), &old, "previous");
        let files = CaFiles {
            cert,
            key,
            next_cert: None,
            next_key: None,
            previous_cert: Some(previous.clone()),
        };
        let a_issuer = Arc::new(
            Issuer::load_or_generate(Some(&files), dir_a.path(), AllowedNames::default()).unwrap(),
        );
        let a = PeerTls::new(a_issuer.clone());
        // B: lags behind, still on the old CA (the new one is its next).
        let dir_b = tempfile::tempdir().unwrap();
        let b = PeerTls::new(issuer(dir_b.path(), &old, Some(&new)));
        // C: started on the new CA without previous.crt.
        let dir_c = tempfile::tempdir().unwrap();
        let c = PeerTls::new(issuer(dir_c.path(), &new, None));
        // D: a CA nobody trusts.
        let dir_d = tempfile::tempdir().unwrap();
        let d = PeerTls::new(issuer(dir_d.path(), &other, None));

        handshake(&a, &b).await.expect("B connecting to A");
        handshake(&b, &a).await.expect("A connecting to B");
        assert!(handshake(&c, &b).await.is_err(), "without previous.crt");
        assert!(handshake(&a, &d).await.is_err(), "an unrelated CA");

        // The overlap over: the operator drops previous.crt.
        std::fs::remove_file(&previous).unwrap();
        assert!(a_issuer.reload_previous(Some(&previous)).unwrap());
        assert!(handshake(&a, &b).await.is_err(), "previous.crt is gone");
        assert!(handshake(&b, &a).await.is_err(), "previous.crt is gone");
        assert!(!a_issuer.reload_previous(Some(&previous)).unwrap());
    }

    /// The replaced CA is trusted for [`PREVIOUS_CA_GRACE`] only: past it
    /// the configs are rebuilt without it, and a replica still on it is
    /// refused both ways.
    #[tokio::test]
    async fn the_replaced_ca_is_trusted_for_a_while_only() {
        use super::super::issuer::PREVIOUS_CA_GRACE;
        let old = TestCa::new("old CA").unwrap();
        let new = TestCa::new("new CA").unwrap();
        let dir_a = tempfile::tempdir().unwrap();
        let a_issuer = issuer(dir_a.path(), &old, None);
        let (cert, key) = write_ca(dir_a.path(), &new, "ca");
        a_issuer.reload(&cert, &key).unwrap().unwrap();
        let a = PeerTls::new(a_issuer);
        let dir_b = tempfile::tempdir().unwrap();
        let b = PeerTls::new(issuer(dir_b.path(), &old, Some(&new)));

        // Within the grace: cached configs trusting the old CA.
        handshake(&a, &b).await.expect("within the grace");
        let later = Instant::now() + PREVIOUS_CA_GRACE + Duration::from_secs(1);
        let now = SystemTime::now();
        let a_server = a.with_at(now, later, |c| c.server.clone()).unwrap();
        let a_client = a.with_at(now, later, |c| c.client.clone()).unwrap();
        assert!(
            handshake_with(a_server, b.client().unwrap()).await.is_err(),
            "the old CA's peer was accepted after the grace"
        );
        assert!(
            handshake_with(b.server().unwrap(), a_client).await.is_err(),
            "the old CA's peer was trusted after the grace"
        );
    }
}

//! TLS: the CA and per-name leaf certificates minted from it.
//!
//! The proxy answers TLS for every configured registry name (DNS-hijack
//! mode) and for its own names and IPs (mirror mode). Leaves are minted on
//! demand from the CA during the handshake, kept in memory and re-minted a
//! week before they expire. A name that is neither a registry nor one of
//! the proxy's own names gets no certificate: the handshake is refused.

mod ca;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rcgen::SanType;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ConfigBuilder, ServerConfig, WantsVerifier};
use rustls_pki_types::PrivateKeyDer;

use ca::{Ca, Minted};

/// Re-mint a cached leaf once it is this close to expiry.
const RENEW_BEFORE: Duration = Duration::from_secs(7 * 86_400);

/// Names the proxy serves TLS for.
#[derive(Debug, Clone, Default)]
pub struct AllowedNames {
    /// Registry names that may be served via SNI (hosts, aliases, authHosts; lowercase, no port).
    pub registry_names: HashSet<String>,
    /// The proxy's own DNS names (mirror mode) — one shared cert for all of them plus own_ips.
    pub own_names: Vec<String>,
    pub own_ips: Vec<IpAddr>,
}

impl AllowedNames {
    /// Lowercased, without trailing dot or port; IP literals among
    /// `own_names` move to `own_ips`; duplicates dropped.
    fn normalized(self) -> Self {
        let registry_names = self.registry_names.iter().map(|n| normalize(n)).collect();
        let mut own_names: Vec<String> = Vec::new();
        let mut own_ips: Vec<IpAddr> = Vec::new();
        for name in &self.own_names {
            let name = normalize(name);
            let bare = name.trim_start_matches('[').trim_end_matches(']');
            if let Ok(ip) = bare.parse::<IpAddr>() {
                if !own_ips.contains(&ip) {
                    own_ips.push(ip);
                }
            } else if !name.is_empty() && !own_names.contains(&name) {
                own_names.push(name);
            }
        }
        for ip in self.own_ips {
            if !own_ips.contains(&ip) {
                own_ips.push(ip);
            }
        }
        Self {
            registry_names,
            own_names,
            own_ips,
        }
    }
}

/// A name as compared against SNI: lowercase, no trailing dot, no port.
fn normalize(name: &str) -> String {
    let (host, _port) = pullthrough_api::names::split_port(name.trim());
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Loading or generating the CA, or building the TLS config.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {}: {reason}", path.display())]
    Invalid {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("CA certificate {} is not a CA: {reason}", path.display())]
    NotCa { path: PathBuf, reason: String },
    #[error("CA certificate {} expired at {}", path.display(), humantime::format_rfc3339_seconds(*not_after))]
    Expired {
        path: PathBuf,
        not_after: SystemTime,
    },
    #[error("CA key {} does not match CA certificate {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error(
        "{} exists but {} does not: restore the key, or delete the certificate to generate a new CA (clients must then trust the new one)",
        present.display(), missing.display()
    )]
    Incomplete { present: PathBuf, missing: PathBuf },
    #[error("generating a CA for {}: {reason}", path.display())]
    Generate { path: PathBuf, reason: String },
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CA certificate {} cannot issue certificates clients accept: {reason}", path.display())]
    Unusable { path: PathBuf, reason: String },
    #[error("building the TLS server config: {reason}")]
    Config { reason: String },
}

/// A minted certificate and when to replace it.
struct Cached {
    key: Arc<CertifiedKey>,
    renew_at: SystemTime,
}

/// The shared certificate for the proxy's own names, and the names it was
/// minted for.
struct OwnCert {
    names: Vec<String>,
    ips: Vec<IpAddr>,
    cert: Cached,
}

#[derive(Default)]
struct Cache {
    leaves: HashMap<String, Cached>,
    own: Option<OwnCert>,
}

/// The proxy's TLS certificate issuer and rustls cert resolver.
pub struct Issuer {
    ca: Ca,
    allowed: ArcSwap<AllowedNames>,
    cache: Mutex<Cache>,
    provider: Arc<CryptoProvider>,
    builder: ConfigBuilder<ServerConfig, WantsVerifier>,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let allowed = self.allowed.load();
        f.debug_struct("Issuer")
            .field("ca", &self.ca.cert_path)
            .field("ca_subject", &self.ca.subject_cn)
            .field("registry_names", &allowed.registry_names.len())
            .field("own_names", &allowed.own_names)
            .field("own_ips", &allowed.own_ips)
            .finish_non_exhaustive()
    }
}

impl Issuer {
    /// `ca: Some(files)` loads cert + key PEM from those files (error names the file and what is wrong: unreadable, not PEM, not a CA, key does not match).
    /// `None`: uses `<data_dir>/ca.crt` + `<data_dir>/ca.key` if both exist, else generates an ECDSA P-256 CA (CN "pullthrough CA", ~10 years, KeyCertSign) and writes them (key mode 0600, atomic write: temp in same dir + fsync + rename), so restarts reuse it.
    ///
    /// PKCS#8, SEC1 (`EC PRIVATE KEY`) and PKCS#1 (`RSA PRIVATE KEY`) keys
    /// are accepted. Certificates after the first one in the cert file are
    /// sent as the chain after each leaf (intermediate CA).
    pub fn load_or_generate(
        ca: Option<&pullthrough_api::config::CaFiles>,
        data_dir: &Path,
        allowed: AllowedNames,
    ) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ca = match ca {
            Some(files) => Ca::load_files(&files.cert, &files.key, &provider)?,
            None => Ca::load_or_generate_in(data_dir, &provider)?,
        };
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config {
                reason: e.to_string(),
            })?;
        Ok(Self {
            ca,
            allowed: ArcSwap::from_pointee(allowed.normalized()),
            cache: Mutex::new(Cache::default()),
            provider,
            builder,
        })
    }

    /// The CA certificate PEM clients must trust (never the key).
    pub fn ca_pem(&self) -> &str {
        self.ca.pem()
    }

    /// Swap the allowed names (config reload); previously minted certs for names no longer allowed must not be served any more.
    pub fn set_allowed(&self, allowed: AllowedNames) {
        let allowed = allowed.normalized();
        {
            let mut cache = self.lock_cache();
            cache
                .leaves
                .retain(|name, _| allowed.registry_names.contains(name));
        }
        tracing::debug!(
            registry_names = allowed.registry_names.len(),
            own_names = ?allowed.own_names,
            own_ips = ?allowed.own_ips,
            "TLS names updated"
        );
        // Handshakes check this first, so a removed name is refused from
        // now on even if a racing handshake re-caches its leaf.
        self.allowed.store(Arc::new(allowed));
    }

    /// rustls ServerConfig using this issuer as cert resolver; ALPN ["h2", "http/1.1"]; ring provider via ServerConfig::builder_with_provider.
    ///
    /// Session resumption is off: a resumed session would skip the
    /// resolver, and with it the check that the name is still served.
    pub fn server_config(self: &Arc<Self>) -> Arc<ServerConfig> {
        let mut config = self
            .builder
            .clone()
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Arc::new(config)
    }

    fn lock_cache(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The certificate for a handshake with `sni` (`None`: no SNI, e.g. a
    /// client connecting by IP), or `None` to refuse it.
    fn certificate_for(&self, sni: Option<&str>, now: SystemTime) -> Option<Arc<CertifiedKey>> {
        let allowed = self.allowed.load();
        let Some(sni) = sni else {
            return self.own_cert(&allowed, now);
        };
        let name = normalize(sni);
        if allowed.registry_names.contains(&name) {
            self.registry_cert(&name, now)
        } else if allowed.own_names.contains(&name) {
            self.own_cert(&allowed, now)
        } else {
            tracing::debug!(sni = %name, "TLS handshake refused: not a configured registry or proxy name");
            None
        }
    }

    fn registry_cert(&self, name: &str, now: SystemTime) -> Option<Arc<CertifiedKey>> {
        let mut cache = self.lock_cache();
        if let Some(c) = cache.leaves.get(name)
            && now < c.renew_at
        {
            return Some(c.key.clone());
        }
        let san = match name.try_into() {
            Ok(n) => SanType::DnsName(n),
            Err(e) => {
                tracing::warn!(sni = %name, error = %e, "cannot mint a TLS certificate for this name");
                return None;
            }
        };
        let cached = self.mint(vec![san], name, now, name)?;
        let key = cached.key.clone();
        cache.leaves.insert(name.to_owned(), cached);
        Some(key)
    }

    fn own_cert(&self, allowed: &AllowedNames, now: SystemTime) -> Option<Arc<CertifiedKey>> {
        let mut cache = self.lock_cache();
        if let Some(own) = &cache.own
            && own.names == allowed.own_names
            && own.ips == allowed.own_ips
            && now < own.cert.renew_at
        {
            return Some(own.cert.key.clone());
        }
        let mut sans = Vec::new();
        for name in &allowed.own_names {
            match name.as_str().try_into() {
                Ok(n) => sans.push(SanType::DnsName(n)),
                Err(e) => tracing::warn!(name = %name, error = %e, "skipping invalid own name"),
            }
        }
        sans.extend(allowed.own_ips.iter().copied().map(SanType::IpAddress));
        if sans.is_empty() {
            tracing::debug!("TLS handshake refused: no SNI and the proxy has no own names or IPs");
            return None;
        }
        let label = format!("{:?} {:?}", allowed.own_names, allowed.own_ips);
        let cert = self.mint(sans, "pullthrough", now, &label)?;
        let key = cert.key.clone();
        cache.own = Some(OwnCert {
            names: allowed.own_names.clone(),
            ips: allowed.own_ips.clone(),
            cert,
        });
        Some(key)
    }

    fn mint(
        &self,
        sans: Vec<SanType>,
        common_name: &str,
        now: SystemTime,
        label: &str,
    ) -> Option<Cached> {
        let Minted {
            chain,
            key,
            not_after,
        } = match self.ca.mint(sans, common_name, now) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(names = %label, error = %e, "minting a TLS certificate failed");
                return None;
            }
        };
        let signing_key = match self
            .provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(key))
        {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(names = %label, error = %e, "loading a minted TLS key failed");
                return None;
            }
        };
        let lifetime = not_after.duration_since(now).unwrap_or_default();
        let renew_at = if lifetime > 2 * RENEW_BEFORE {
            not_after - RENEW_BEFORE
        } else {
            // The CA itself expires soon: renew halfway, at least hourly.
            now + (lifetime / 2).max(Duration::from_secs(3600)).min(lifetime)
        };
        if not_after < self.ca.not_after() && lifetime <= 2 * RENEW_BEFORE {
            tracing::warn!(names = %label, "minted a short-lived TLS certificate");
        }
        tracing::debug!(
            names = %label,
            not_after = %humantime::format_rfc3339_seconds(not_after),
            "minted TLS certificate"
        );
        Some(Cached {
            key: Arc::new(CertifiedKey::new(chain, signing_key)),
            renew_at,
        })
    }
}

impl ResolvesServerCert for Issuer {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.certificate_for(client_hello.server_name(), SystemTime::now())
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};
    use std::os::unix::fs::PermissionsExt;

    use pullthrough_api::config::CaFiles;
    use pullthrough_testbed::tls::TestCa;
    use rustls::ClientConfig;
    use rustls_pki_types::{CertificateDer, ServerName};
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
    fn issuer_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Issuer>();
    }

    #[test]
    fn generated_ca_is_written_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let first = Issuer::load_or_generate(None, &data, default_allowed()).unwrap();
        let cert_pem = std::fs::read_to_string(data.join("ca.crt")).unwrap();
        assert_eq!(first.ca_pem(), cert_pem);
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
        assert_eq!(cn.as_str().unwrap(), "pullthrough CA");
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
        CaFiles { cert, key }
    }

    #[tokio::test]
    async fn loads_explicit_ca_files() {
        let dir = tempfile::tempdir().unwrap();
        let test_ca = TestCa::new("Example Corp Registry CA").unwrap();
        let files = write_ca(dir.path(), &test_ca, "corp");
        let issuer = Arc::new(
            Issuer::load_or_generate(Some(&files), dir.path(), default_allowed()).unwrap(),
        );
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
        let issuer = Arc::new(
            Issuer::load_or_generate(Some(&files), dir.path(), default_allowed()).unwrap(),
        );
        handshake(
            issuer.server_config(),
            client(issuer.ca_pem()),
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
        let issuer =
            Arc::new(Issuer::load_or_generate(None, dir.path(), default_allowed()).unwrap());
        let client = client(issuer.ca_pem());
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
        let issuer =
            Arc::new(Issuer::load_or_generate(None, dir.path(), default_allowed()).unwrap());
        let mut cfg = pullthrough_testbed::tls::client_config(issuer.ca_pem()).unwrap();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let hs = handshake(issuer.server_config(), Arc::new(cfg), dns("quay.io"))
            .await
            .unwrap();
        assert_eq!(hs.alpn.as_deref(), Some(&b"http/1.1"[..]));
    }

    #[tokio::test]
    async fn unknown_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let issuer =
            Arc::new(Issuer::load_or_generate(None, dir.path(), default_allowed()).unwrap());
        let err = handshake(
            issuer.server_config(),
            client(issuer.ca_pem()),
            dns("evil.example"),
        )
        .await
        .err()
        .expect("handshake for evil.example must fail");
        assert!(!err.is_empty());
        assert!(issuer.lock_cache().leaves.is_empty(), "nothing minted");
    }

    #[tokio::test]
    async fn ip_and_own_names_get_the_own_cert() {
        let dir = tempfile::tempdir().unwrap();
        let issuer = Arc::new(
            Issuer::load_or_generate(
                None,
                dir.path(),
                allowed(
                    &["quay.io"],
                    &["localhost", "pullthrough.kube-system.svc"],
                    &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
                ),
            )
            .unwrap(),
        );
        let client = client(issuer.ca_pem());
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
        let issuer =
            Arc::new(Issuer::load_or_generate(None, dir.path(), default_allowed()).unwrap());
        // One server and one client config throughout, as in production: a
        // resumed session must not get around the removal either.
        let server = issuer.server_config();
        let client = client(issuer.ca_pem());
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
}

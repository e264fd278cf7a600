//! The CA: loading it from files, generating one into the data dir, and
//! minting leaf certificates from it.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pullthrough_api::pki::{self, CLOCK_SKEW, PermittedNames, SELF_TEST_NAME};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SignatureAlgorithm,
};
use rustls::SignatureScheme;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::sign::Signer;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

use super::TlsError;

/// Leaf lifetime.
pub(super) const LEAF_VALIDITY: Duration = Duration::from_secs(90 * 86_400);
/// Generated CA lifetime.
const CA_VALIDITY: Duration = Duration::from_secs(3650 * 86_400);
/// A loaded CA closer than this to expiry is logged at warn.
const CA_EXPIRY_WARNING: Duration = Duration::from_secs(30 * 86_400);

pub(super) const CA_CERT_FILE: &str = "ca.crt";
pub(super) const CA_KEY_FILE: &str = "ca.key";

/// A loaded CA, ready to sign.
pub(super) struct Ca {
    issuer: rcgen::Issuer<'static, CaKey>,
    /// The CA certificate(s), normalized PEM (never the key); shared with
    /// `/ca.crt` readers without copying.
    pub(super) pem: Arc<str>,
    /// Certificates sent after each leaf (those following the CA
    /// certificate in its file, for an intermediate CA).
    chain: Vec<CertificateDer<'static>>,
    not_after: SystemTime,
    /// Write authorityKeyIdentifier (the CA has a subjectKeyIdentifier).
    use_aki: bool,
    pub(super) subject_cn: String,
    pub(super) cert_path: PathBuf,
    /// Its name constraints; `None`: it may vouch for any name.
    pub(super) permitted: Option<PermittedNames>,
}

/// A freshly minted leaf.
pub(super) struct Minted {
    /// Leaf first, then the CA's chain.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
    pub not_after: SystemTime,
}

impl Ca {
    pub(super) fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Whether clients would accept a leaf of this CA for DNS name `name`.
    pub(super) fn permits_dns(&self, name: &str) -> bool {
        self.permitted.as_ref().is_none_or(|p| p.permits_dns(name))
    }

    /// Whether clients would accept a leaf of this CA for `ip`.
    pub(super) fn permits_ip(&self, ip: std::net::IpAddr) -> bool {
        self.permitted.as_ref().is_none_or(|p| p.permits_ip(ip))
    }

    /// Loads the CA from explicitly configured files.
    pub(super) fn load_files(
        cert: &Path,
        key: &Path,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let cert_pem = read(cert, "CA certificate")?;
        let key_pem = read(key, "CA key")?;
        let ca = Self::from_pem(&cert_pem, cert, &key_pem, key, provider)?;
        tracing::info!(
            cert = %cert.display(),
            key = %key.display(),
            subject = %ca.subject_cn,
            not_after = %humantime::format_rfc3339_seconds(ca.not_after),
            permitted = %ca.permitted.as_ref().map_or_else(|| "any name".to_string(), |p| p.to_string()),
            "loaded TLS CA"
        );
        Ok(ca)
    }

    /// Loads `<data_dir>/ca.crt` + `ca.key`, generating and writing them
    /// first when absent: a CA constrained to `permitted`.
    pub(super) fn load_or_generate_in(
        data_dir: &Path,
        permitted: &PermittedNames,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let cert_path = data_dir.join(CA_CERT_FILE);
        let key_path = data_dir.join(CA_KEY_FILE);
        let cert_exists = exists(&cert_path)?;
        let key_exists = exists(&key_path)?;
        if cert_exists && key_exists {
            warn_if_key_readable(&key_path);
            return Self::load_files(&cert_path, &key_path, provider);
        }
        if cert_exists {
            // The certificate may already be trusted by nodes: a new CA
            // would silently break them, so let a human decide.
            return Err(TlsError::Incomplete {
                present: cert_path,
                missing: key_path,
            });
        }
        // Neither file, or a key left by a crash between the two writes
        // (the key is written first): its certificate was never published.
        fs::create_dir_all(data_dir).map_err(|source| TlsError::Write {
            path: data_dir.to_owned(),
            source,
        })?;
        let pki::GeneratedCa { cert_pem, key_pem } =
            pki::generate_constrained_ca(CA_VALIDITY, permitted).map_err(|e| {
                TlsError::Generate {
                    path: cert_path.clone(),
                    reason: match e {
                        pki::PkiError::Generate(rcgen) => rcgen.to_string(),
                        other => other.to_string(),
                    },
                }
            })?;
        write_atomic(&key_path, key_pem.as_bytes(), 0o600)?;
        write_atomic(&cert_path, cert_pem.as_bytes(), 0o644)?;
        let ca = Self::from_pem(
            cert_pem.as_bytes(),
            &cert_path,
            key_pem.as_bytes(),
            &key_path,
            provider,
        )?;
        tracing::info!(
            cert = %cert_path.display(),
            key = %key_path.display(),
            not_after = %humantime::format_rfc3339_seconds(ca.not_after),
            permitted = %permitted,
            "generated TLS CA; clients must trust {}", cert_path.display()
        );
        Ok(ca)
    }

    /// Checks and loads a CA from PEM text; the paths are for messages.
    fn from_pem(
        cert_pem: &[u8],
        cert_path: &Path,
        key_pem: &[u8],
        key_path: &Path,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let invalid_cert = |reason: String| TlsError::Invalid {
            what: "CA certificate",
            path: cert_path.to_owned(),
            reason,
        };
        let invalid_key = |reason: String| TlsError::Invalid {
            what: "CA key",
            path: key_path.to_owned(),
            reason,
        };

        let certs = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid_cert(format!("not valid PEM: {e}")))?;
        let Some(ca_der) = certs.first().cloned() else {
            let hint = if contains(cert_pem, b"PRIVATE KEY-----") {
                " (it holds a private key: is this the key file?)"
            } else {
                ""
            };
            return Err(invalid_cert(format!(
                "no PEM CERTIFICATE block found{hint}"
            )));
        };
        let checked = pki::check_ca_certificate(&ca_der).map_err(|e| {
            if e.is_not_a_ca() {
                TlsError::NotCa {
                    path: cert_path.to_owned(),
                    reason: e.to_string(),
                }
            } else {
                invalid_cert(e.to_string())
            }
        })?;
        let (not_before, not_after) = (checked.not_before, checked.not_after);
        let now = SystemTime::now();
        if not_after <= now {
            return Err(TlsError::Expired {
                path: cert_path.to_owned(),
                not_after,
            });
        }
        if not_before > now + CLOCK_SKEW {
            tracing::warn!(cert = %cert_path.display(),
                not_before = %humantime::format_rfc3339_seconds(not_before),
                "CA certificate is not valid yet (clock skew?)");
        }
        if not_after <= now + CA_EXPIRY_WARNING {
            tracing::warn!(cert = %cert_path.display(),
                not_after = %humantime::format_rfc3339_seconds(not_after),
                "CA certificate expires soon; leaf certificates will not outlive it");
        }

        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
            let hint = if contains(key_pem, b"ENCRYPTED PRIVATE KEY") {
                " (encrypted keys are not supported)".to_string()
            } else {
                String::new()
            };
            invalid_key(format!("no usable PEM private key: {e}{hint}"))
        })?;
        let key = CaKey::load(key, provider).map_err(|e| {
            invalid_key(format!(
                "cannot use this key ({e}); supported: ECDSA P-256/P-384, Ed25519, RSA, \
                 matching the certificate {}",
                cert_path.display()
            ))
        })?;
        if key.der_bytes() != checked.public_key.as_slice() {
            return Err(TlsError::KeyMismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
            });
        }

        let permitted =
            PermittedNames::of_certificate(&ca_der).map_err(|e| invalid_cert(e.to_string()))?;
        let use_aki = checked.has_subject_key_id;
        let subject_cn = checked.common_name.unwrap_or_default();
        let issuer = rcgen::Issuer::from_ca_cert_der(&ca_der, key)
            .map_err(|e| invalid_cert(format!("cannot issue under this certificate: {e}")))?;
        let ca = Self {
            issuer,
            pem: certs
                .iter()
                .map(|c| pem_encode(c))
                .collect::<String>()
                .into(),
            chain: certs[1..].to_vec(),
            not_after,
            use_aki,
            subject_cn,
            cert_path: cert_path.to_owned(),
            permitted,
        };
        ca.self_test(ca_der, provider)
            .map_err(|reason| TlsError::Unusable {
                path: cert_path.to_owned(),
                reason,
            })?;
        Ok(ca)
    }

    /// Mints a leaf and verifies it against the CA as the only root, the
    /// way clients will: catches subjects rcgen cannot reproduce, keys
    /// that do not sign, and anything else that would fail every handshake.
    fn self_test(
        &self,
        ca_der: CertificateDer<'static>,
        provider: &Arc<CryptoProvider>,
    ) -> Result<(), String> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca_der)
            .map_err(|e| format!("not usable as a trust anchor: {e}"))?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| format!("building a verifier: {e}"))?;
        // A CA constrained by someone else may not permit our probe name:
        // probe with a name it does permit (one it has no use for otherwise
        // would fail every handshake anyway).
        let probe_name = match &self.permitted {
            Some(p) if !p.permits_dns(SELF_TEST_NAME) => match p.dns_names().next() {
                Some(n) => n.to_string(),
                None => {
                    tracing::debug!(cert = %self.cert_path.display(), "CA permits no DNS name: self-test skipped");
                    return Ok(());
                }
            },
            _ => SELF_TEST_NAME.to_string(),
        };
        let san = SanType::DnsName(
            probe_name
                .as_str()
                .try_into()
                .map_err(|e| format!("self-test name: {e}"))?,
        );
        let probe = self
            .mint(vec![san], &probe_name, SystemTime::now())
            .map_err(|e| format!("signing a test certificate: {e}"))?;
        let name = ServerName::try_from(probe_name).map_err(|e| e.to_string())?;
        let (leaf, rest) = probe
            .chain
            .split_first()
            .ok_or("signing a test certificate produced nothing")?;
        verifier
            .verify_server_cert(leaf, rest, &name, &[], UnixTime::now())
            .map_err(|e| format!("a certificate it signs does not verify against it: {e}"))?;
        Ok(())
    }

    /// Mints a server certificate for `sans` with a fresh P-256 key.
    pub(super) fn mint(
        &self,
        sans: Vec<SanType>,
        common_name: &str,
        now: SystemTime,
    ) -> Result<Minted, rcgen::Error> {
        self.mint_for(
            sans,
            common_name,
            now,
            vec![ExtendedKeyUsagePurpose::ServerAuth],
        )
    }

    /// Mints the certificate replicas present to each other, as server
    /// and as client: the only one the proxy issues for client auth.
    pub(super) fn mint_peer(&self, now: SystemTime) -> Result<Minted, rcgen::Error> {
        let sans = vec![
            SanType::DnsName(pki::PEER_NAME.try_into()?),
            SanType::URI(super::peer::PEER_URI.try_into()?),
        ];
        self.mint_for(
            sans,
            "pullthrough peer",
            now,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    fn mint_for(
        &self,
        sans: Vec<SanType>,
        common_name: &str,
        now: SystemTime,
        usages: Vec<ExtendedKeyUsagePurpose>,
    ) -> Result<Minted, rcgen::Error> {
        let not_after = (now + LEAF_VALIDITY).min(self.not_after);
        let not_before = now.checked_sub(CLOCK_SKEW).unwrap_or(now);
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        // X.520 caps commonName at 64 characters; the SANs are what counts.
        if common_name.len() <= 64 {
            dn.push(DnType::CommonName, common_name);
        } else {
            dn.push(DnType::CommonName, "pullthrough");
        }
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = usages;
        params.use_authority_key_identifier_extension = self.use_aki;
        params.not_before = rcgen::date_time_ymd(1970, 1, 1) + since_epoch(not_before);
        params.not_after = rcgen::date_time_ymd(1970, 1, 1) + since_epoch(not_after);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let mut chain = Vec::with_capacity(1 + self.chain.len());
        chain.push(cert.der().clone());
        chain.extend(self.chain.iter().cloned());
        Ok(Minted {
            chain,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            not_after,
        })
    }
}

/// The CA's private key, loaded by the rustls provider (PKCS#8, SEC1 or
/// PKCS#1; rcgen's ring backend reads PKCS#8 only) and signing for rcgen.
struct CaKey {
    signer: Box<dyn Signer>,
    algorithm: &'static SignatureAlgorithm,
    /// The subjectPublicKey bits.
    public_key: Vec<u8>,
}

impl CaKey {
    fn load(key: PrivateKeyDer<'static>, provider: &CryptoProvider) -> Result<Self, String> {
        let key = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| e.to_string())?;
        let spki = key
            .public_key()
            .ok_or("the provider cannot tell its public key")?;
        let (_, spki) = SubjectPublicKeyInfo::from_der(&spki).map_err(|e| e.to_string())?;
        let schemes = [
            SignatureScheme::ECDSA_NISTP256_SHA256,
            SignatureScheme::ECDSA_NISTP384_SHA384,
            SignatureScheme::ED25519,
            SignatureScheme::RSA_PKCS1_SHA256,
        ];
        let signer = key
            .choose_scheme(&schemes)
            .ok_or("unsupported key algorithm")?;
        let algorithm = match signer.scheme() {
            SignatureScheme::ECDSA_NISTP256_SHA256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            SignatureScheme::ECDSA_NISTP384_SHA384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            SignatureScheme::ED25519 => &rcgen::PKCS_ED25519,
            SignatureScheme::RSA_PKCS1_SHA256 => &rcgen::PKCS_RSA_SHA256,
            other => return Err(format!("unsupported signature scheme {other:?}")),
        };
        Ok(Self {
            signer,
            algorithm,
            public_key: spki.subject_public_key.data.into_owned(),
        })
    }
}

impl PublicKeyData for CaKey {
    fn der_bytes(&self) -> &[u8] {
        &self.public_key
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.algorithm
    }
}

impl rcgen::SigningKey for CaKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.signer.sign(msg).map_err(|e| {
            tracing::warn!(error = %e, "signing with the CA key failed");
            rcgen::Error::RemoteKeyError
        })
    }
}

fn since_epoch(t: SystemTime) -> Duration {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default()
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn exists(path: &Path) -> Result<bool, TlsError> {
    path.try_exists().map_err(|source| TlsError::Read {
        what: "CA file",
        path: path.to_owned(),
        source,
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn warn_if_key_readable(path: &Path) {
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(key = %path.display(), mode = format!("{:o}", mode & 0o777),
                "CA key is readable by group or others; chmod 600 it");
        }
    }
}

/// [`crate::atomic_file::write`], its error naming the file.
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    crate::atomic_file::write(path, contents, mode).map_err(|source| TlsError::Write {
        path: path.to_owned(),
        source,
    })
}

/// PEM-encodes one certificate.
pub(super) fn pem_encode(der: &[u8]) -> String {
    // LF line endings: the file is read by shell tools and runtimes alike.
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new("CERTIFICATE", der.to_vec()), config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_encoding_round_trips() {
        for len in [0usize, 1, 2, 3, 47, 48, 49, 500] {
            let der: Vec<u8> = (0..len).map(|i| (i * 7 % 256) as u8).collect();
            let pem = pem_encode(&der);
            if len == 0 {
                continue;
            }
            let back = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
            assert_eq!(back.as_ref(), &der[..], "len {len}");
        }
    }
}

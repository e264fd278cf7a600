//! The proxy CA, as both programs that make one see it: generating a new
//! CA (the operator for the CA Secret, the proxy in standalone mode), and
//! reading a CA certificate back — when it expires, and whether it can
//! sign the leaf certificates the proxy mints. Keys and signing stay with
//! the proxy, which loads them through its TLS provider.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use x509_parser::certificate::X509Certificate;
use x509_parser::x509::X509Name;

mod constraints;
pub use constraints::{PEER_NAME, PermittedNames, SELF_TEST_NAME};

/// Subject commonName of every CA pullthrough generates.
pub const CA_COMMON_NAME: &str = "pullthrough proxy CA";
/// Subject organizationName of every CA pullthrough generates.
pub const CA_ORGANIZATION: &str = "pullthrough";
/// Back-dating of `notBefore`, for clients whose clocks run behind.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// Why a CA could not be generated or a certificate is not a usable CA.
/// Messages describe the certificate; the caller adds which file or Secret
/// it came from.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("generating a CA: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("not a PEM certificate: {reason}")]
    Pem { reason: String },
    #[error("not a usable X.509 certificate: {reason}")]
    X509 { reason: String },
    #[error("basicConstraints: {reason}")]
    BasicConstraints { reason: String },
    #[error("keyUsage: {reason}")]
    KeyUsage { reason: String },
    /// A leaf (or anything else without `cA=true`).
    #[error("basicConstraints does not say cA=true (is this a leaf certificate?)")]
    NotCa,
    #[error("its keyUsage does not allow keyCertSign")]
    CannotSign,
    /// rcgen re-issues under the subject as one value per attribute type
    /// and one attribute per RDN; other subjects cannot be reproduced.
    #[error("subject {reason}, which cannot be re-issued")]
    Subject { reason: &'static str },
}

impl PkiError {
    /// True when the certificate parses but is not a CA that may sign
    /// certificates (as opposed to a broken or unparsable one).
    pub fn is_not_a_ca(&self) -> bool {
        matches!(self, PkiError::NotCa | PkiError::CannotSign)
    }
}

/// A freshly generated CA, PEM-encoded.
#[derive(Clone, PartialEq, Eq)]
pub struct GeneratedCa {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for GeneratedCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("GeneratedCa")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// A new self-signed ECDSA P-256 CA valid for `validity` (from
/// [`CLOCK_SKEW`] ago). Path length 0: it signs leaves only. It may vouch
/// for any name: see [`generate_constrained_ca`].
pub fn generate_ca(validity: Duration) -> Result<GeneratedCa, PkiError> {
    generate(validity, None)
}

/// Like [`generate_ca`], with a critical nameConstraints extension that
/// permits only `permitted`.
pub fn generate_constrained_ca(
    validity: Duration,
    permitted: &PermittedNames,
) -> Result<GeneratedCa, PkiError> {
    generate(validity, Some(permitted))
}

fn generate(
    validity: Duration,
    permitted: Option<&PermittedNames>,
) -> Result<GeneratedCa, PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    dn.push(DnType::OrganizationName, CA_ORGANIZATION);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    let skew = time::Duration::try_from(CLOCK_SKEW).unwrap_or(time::Duration::ZERO);
    // A validity too large to represent means "as long as possible".
    let validity = time::Duration::try_from(validity).unwrap_or(time::Duration::MAX);
    params.not_before = now.saturating_sub(skew);
    params.not_after = now.saturating_add(validity);
    params.name_constraints = permitted.map(PermittedNames::to_rcgen);
    let cert = params.self_signed(&key)?;
    Ok(GeneratedCa {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// `notAfter` of the first certificate in `pem`, as unix seconds.
pub fn not_after(pem: &str) -> Result<i64, PkiError> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| PkiError::Pem {
        reason: e.to_string(),
    })?;
    let cert = p.parse_x509().map_err(|e| PkiError::X509 {
        reason: e.to_string(),
    })?;
    Ok(cert.validity().not_after.timestamp())
}

/// What the proxy needs to know of a CA certificate it will sign with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaCertificate {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The subject's commonName, for logs.
    pub common_name: Option<String>,
    /// The subjectPublicKey bits, to match the private key against.
    pub public_key: Vec<u8>,
    /// Whether it has a subjectKeyIdentifier (then leaves it signs carry
    /// an authorityKeyIdentifier).
    pub has_subject_key_id: bool,
}

/// Checks that the DER certificate is a CA that may sign certificates and
/// whose subject can be re-issued under. Validity is reported, not judged:
/// what "too old" means is the caller's call.
pub fn check_ca_certificate(der: &[u8]) -> Result<CaCertificate, PkiError> {
    let (_, x509) = x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::X509 {
        reason: e.to_string(),
    })?;
    let basic_constraints = x509
        .basic_constraints()
        .map_err(|e| PkiError::BasicConstraints {
            reason: e.to_string(),
        })?;
    if !basic_constraints.is_some_and(|bc| bc.value.ca) {
        return Err(PkiError::NotCa);
    }
    let key_usage = x509.key_usage().map_err(|e| PkiError::KeyUsage {
        reason: e.to_string(),
    })?;
    if key_usage.is_some_and(|ku| !ku.value.key_cert_sign()) {
        return Err(PkiError::CannotSign);
    }
    check_subject(x509.subject())?;
    Ok(CaCertificate {
        not_before: system_time(x509.validity().not_before.timestamp()),
        not_after: system_time(x509.validity().not_after.timestamp()),
        common_name: common_name(&x509),
        public_key: x509.public_key().subject_public_key.data.to_vec(),
        has_subject_key_id: x509
            .iter_extensions()
            .any(|ext| ext.oid == x509_parser::oid_registry::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER),
    })
}

fn check_subject(subject: &X509Name<'_>) -> Result<(), PkiError> {
    let mut seen = Vec::new();
    for rdn in subject.iter() {
        if rdn.iter().count() != 1 {
            return Err(PkiError::Subject {
                reason: "has a multi-valued RDN",
            });
        }
        for attr in rdn.iter() {
            if seen.contains(&attr.attr_type()) {
                return Err(PkiError::Subject {
                    reason: "repeats an attribute type",
                });
            }
            seen.push(attr.attr_type());
        }
    }
    Ok(())
}

fn common_name(cert: &X509Certificate<'_>) -> Option<String> {
    let attr = cert.subject().iter_common_name().next()?;
    Some(match attr.as_str() {
        Ok(s) => s.to_owned(),
        Err(_) => String::from_utf8_lossy(attr.attr_value().data).into_owned(),
    })
}

/// A certificate time (seconds since the epoch) as a `SystemTime`; times
/// before 1970 clamp to the epoch.
fn system_time(timestamp: i64) -> SystemTime {
    match u64::try_from(timestamp) {
        Ok(secs) => SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => SystemTime::UNIX_EPOCH,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn der_of(pem: &str) -> Vec<u8> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        p.contents
    }

    #[test]
    fn generated_ca_is_a_usable_ca_with_the_shared_name() {
        let ca = generate_ca(Duration::from_secs(86_400)).unwrap();
        let cert = check_ca_certificate(&der_of(&ca.cert_pem)).unwrap();
        assert_eq!(cert.common_name.as_deref(), Some(CA_COMMON_NAME));
        let now = SystemTime::now();
        assert!(cert.not_before <= now - CLOCK_SKEW + Duration::from_secs(5));
        let left = cert.not_after.duration_since(now).unwrap();
        assert!(left > Duration::from_secs(86_000) && left <= Duration::from_secs(86_400));
        assert!(ca.key_pem.contains("PRIVATE KEY"));
        assert!(
            !format!("{ca:?}").contains("PRIVATE KEY"),
            "Debug shows the key"
        );
    }

    #[test]
    fn not_after_reads_the_first_certificate() {
        let ca = generate_ca(Duration::from_secs(1000)).unwrap();
        let unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let at = not_after(&ca.cert_pem).unwrap();
        assert!((unix + 990..=unix + 1000).contains(&at), "{at} vs {unix}");
        assert!(matches!(not_after("nope"), Err(PkiError::Pem { .. })));
    }

    #[test]
    fn huge_validity_saturates_instead_of_failing() {
        let ca = generate_ca(Duration::MAX).unwrap();
        assert!(not_after(&ca.cert_pem).unwrap() > 4_000_000_000);
    }

    #[test]
    fn a_leaf_is_not_a_ca() {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["leaf.test".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let err = check_ca_certificate(leaf.der()).unwrap_err();
        assert!(err.is_not_a_ca(), "{err}");
        assert!(err.to_string().contains("cA=true"), "{err}");
        let err = check_ca_certificate(b"garbage").unwrap_err();
        assert!(
            !err.is_not_a_ca() && err.to_string().contains("X.509"),
            "{err}"
        );
    }
}

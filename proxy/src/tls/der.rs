//! Just enough DER to check a CA certificate and re-issue under its name:
//! subject, validity, public key, basicConstraints, keyUsage and the subject
//! key identifier (rcgen's own parser needs the `x509-parser` feature).

use std::time::{Duration, SystemTime};

use rcgen::{DistinguishedName, DnType, DnValue};

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const INTEGER: u8 = 0x02;
const BIT_STRING: u8 = 0x03;
const OCTET_STRING: u8 = 0x04;
const OID: u8 = 0x06;
const BOOLEAN: u8 = 0x01;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const EXPLICIT_0: u8 = 0xa0;
const EXPLICIT_3: u8 = 0xa3;

const OID_BASIC_CONSTRAINTS: &[u64] = &[2, 5, 29, 19];
const OID_KEY_USAGE: &[u64] = &[2, 5, 29, 15];
const OID_SUBJECT_KEY_ID: &[u64] = &[2, 5, 29, 14];

/// A DER reader over one level of nesting.
struct Reader<'a> {
    data: &'a [u8],
}

/// One tag-length-value: its tag, content, and the whole encoding.
struct Tlv<'a> {
    tag: u8,
    content: &'a [u8],
    raw: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn peek_tag(&self) -> Option<u8> {
        self.data.first().copied()
    }

    fn next(&mut self) -> Result<Tlv<'a>, String> {
        let data = self.data;
        let (&tag, rest) = data.split_first().ok_or("truncated DER")?;
        if tag & 0x1f == 0x1f {
            return Err("unsupported DER tag".into());
        }
        let (&first, mut rest) = rest.split_first().ok_or("truncated DER")?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return Err("bad DER length".into());
            }
            let (bytes, tail) = rest.split_at(n);
            rest = tail;
            bytes
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
        };
        if rest.len() < len {
            return Err("truncated DER".into());
        }
        let header = data.len() - rest.len();
        let (content, tail) = rest.split_at(len);
        self.data = tail;
        Ok(Tlv {
            tag,
            content,
            raw: &data[..header + len],
        })
    }

    fn expect(&mut self, tag: u8, what: &str) -> Result<Tlv<'a>, String> {
        let tlv = self.next().map_err(|e| format!("{what}: {e}"))?;
        if tlv.tag != tag {
            return Err(format!("{what}: unexpected DER tag {:#04x}", tlv.tag));
        }
        Ok(tlv)
    }
}

/// What the issuer needs to know about a CA certificate.
#[derive(Debug)]
pub(super) struct CaCertInfo {
    pub subject: DistinguishedName,
    pub subject_cn: Option<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The SubjectPublicKeyInfo's AlgorithmIdentifier, whole.
    pub spki_algorithm: Vec<u8>,
    /// The subjectPublicKey bits.
    pub public_key: Vec<u8>,
    /// basicConstraints cA.
    pub is_ca: bool,
    /// keyUsage present and without keyCertSign.
    pub lacks_cert_sign: bool,
    pub subject_key_id: Option<Vec<u8>>,
}

/// Parses the parts of an X.509 certificate the issuer needs.
pub(super) fn parse_ca_cert(der: &[u8]) -> Result<CaCertInfo, String> {
    let mut outer = Reader::new(der);
    let cert = outer.expect(SEQUENCE, "certificate")?;
    let mut cert = Reader::new(cert.content);
    let tbs = cert.expect(SEQUENCE, "tbsCertificate")?;
    let mut tbs = Reader::new(tbs.content);
    if tbs.peek_tag() == Some(EXPLICIT_0) {
        tbs.next()?;
    }
    tbs.expect(INTEGER, "serialNumber")?;
    tbs.expect(SEQUENCE, "signature")?;
    tbs.expect(SEQUENCE, "issuer")?;
    let validity = tbs.expect(SEQUENCE, "validity")?;
    let mut validity = Reader::new(validity.content);
    let not_before = parse_time(validity.next()?)?;
    let not_after = parse_time(validity.next()?)?;
    let subject = tbs.expect(SEQUENCE, "subject")?;
    let (subject, subject_cn) = parse_name(subject.content)?;
    let spki = tbs.expect(SEQUENCE, "subjectPublicKeyInfo")?;
    let mut spki = Reader::new(spki.content);
    let spki_algorithm = spki.expect(SEQUENCE, "subjectPublicKeyInfo algorithm")?;
    let key_bits = spki.expect(BIT_STRING, "subjectPublicKey")?;
    let public_key = match key_bits.content.split_first() {
        Some((0, bits)) => bits.to_vec(),
        _ => return Err("subjectPublicKey: malformed BIT STRING".into()),
    };

    let mut info = CaCertInfo {
        subject,
        subject_cn,
        not_before,
        not_after,
        spki_algorithm: spki_algorithm.raw.to_vec(),
        public_key,
        is_ca: false,
        lacks_cert_sign: false,
        subject_key_id: None,
    };
    while !tbs.is_empty() {
        let field = tbs.next()?;
        if field.tag != EXPLICIT_3 {
            continue; // issuerUniqueID, subjectUniqueID
        }
        let mut wrapper = Reader::new(field.content);
        let exts = wrapper.expect(SEQUENCE, "extensions")?;
        let mut exts = Reader::new(exts.content);
        while !exts.is_empty() {
            let ext = exts.expect(SEQUENCE, "extension")?;
            let mut ext = Reader::new(ext.content);
            let oid = parse_oid(ext.expect(OID, "extension id")?.content)?;
            if ext.peek_tag() == Some(BOOLEAN) {
                ext.next()?;
            }
            let value = ext.expect(OCTET_STRING, "extension value")?.content;
            apply_extension(&mut info, &oid, value)?;
        }
    }
    Ok(info)
}

fn apply_extension(info: &mut CaCertInfo, oid: &[u64], value: &[u8]) -> Result<(), String> {
    let mut value = Reader::new(value);
    if oid == OID_BASIC_CONSTRAINTS {
        let bc = value.expect(SEQUENCE, "basicConstraints")?;
        let mut bc = Reader::new(bc.content);
        if bc.peek_tag() == Some(BOOLEAN) {
            info.is_ca = bc.next()?.content.first().is_some_and(|b| *b != 0);
        }
    } else if oid == OID_KEY_USAGE {
        let bits = value.expect(BIT_STRING, "keyUsage")?;
        // keyCertSign is bit 5 of the first byte (counted from the MSB).
        let cert_sign = bits.content.get(1).is_some_and(|b| b & 0x04 != 0);
        info.lacks_cert_sign = !cert_sign;
    } else if oid == OID_SUBJECT_KEY_ID {
        let id = value.expect(OCTET_STRING, "subjectKeyIdentifier")?;
        info.subject_key_id = Some(id.content.to_vec());
    }
    Ok(())
}

/// Decodes a Name into rcgen's form. rcgen keeps one value per attribute
/// type and one attribute per RDN; other names are refused here (the
/// issuer's self-test would catch them too).
fn parse_name(content: &[u8]) -> Result<(DistinguishedName, Option<String>), String> {
    let mut dn = DistinguishedName::new();
    let mut cn = None;
    let mut rdns = Reader::new(content);
    while !rdns.is_empty() {
        let rdn = rdns.expect(SET, "subject RDN")?;
        let mut atvs = Reader::new(rdn.content);
        let atv = atvs.expect(SEQUENCE, "subject attribute")?;
        if !atvs.is_empty() {
            return Err("subject has a multi-valued RDN, which cannot be re-issued".into());
        }
        let mut atv = Reader::new(atv.content);
        let oid = parse_oid(atv.expect(OID, "subject attribute type")?.content)?;
        let value = atv.next()?;
        let ty = DnType::from_oid(&oid);
        if dn.get(&ty).is_some() {
            return Err("subject repeats an attribute type, which cannot be re-issued".into());
        }
        let bad = |_| "subject attribute: invalid string".to_string();
        let text = || {
            String::from_utf8(value.content.to_vec())
                .map_err(|_| "subject attribute: invalid string")
        };
        let value = match value.tag {
            0x0c => DnValue::Utf8String(text()?),
            0x13 => DnValue::PrintableString(text()?.try_into().map_err(bad)?),
            0x16 => DnValue::Ia5String(text()?.try_into().map_err(bad)?),
            0x14 => DnValue::TeletexString(text()?.try_into().map_err(bad)?),
            0x1e => DnValue::BmpString(
                rcgen::string::BmpString::from_utf16be(value.content.to_vec()).map_err(bad)?,
            ),
            0x1c => DnValue::UniversalString(
                rcgen::string::UniversalString::from_utf32be(value.content.to_vec())
                    .map_err(bad)?,
            ),
            tag => {
                return Err(format!(
                    "subject attribute: unsupported string type {tag:#04x}"
                ));
            }
        };
        if ty == DnType::CommonName {
            cn = Some(match &value {
                DnValue::Utf8String(s) => s.clone(),
                DnValue::PrintableString(s) => s.as_str().to_owned(),
                DnValue::Ia5String(s) => s.as_str().to_owned(),
                _ => String::from_utf8_lossy(value_bytes(&value)).into_owned(),
            });
        }
        dn.push(ty, value);
    }
    Ok((dn, cn))
}

fn value_bytes(value: &DnValue) -> &[u8] {
    match value {
        DnValue::TeletexString(s) => s.as_bytes(),
        DnValue::BmpString(s) => s.as_bytes(),
        DnValue::UniversalString(s) => s.as_bytes(),
        DnValue::Utf8String(s) => s.as_bytes(),
        DnValue::PrintableString(s) => s.as_str().as_bytes(),
        DnValue::Ia5String(s) => s.as_str().as_bytes(),
        _ => &[],
    }
}

fn parse_oid(content: &[u8]) -> Result<Vec<u64>, String> {
    let mut arcs = Vec::new();
    let mut acc: u64 = 0;
    for (i, b) in content.iter().enumerate() {
        acc = acc
            .checked_mul(128)
            .and_then(|a| a.checked_add(u64::from(b & 0x7f)))
            .ok_or("OID arc too large")?;
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (acc / 40).min(2);
                arcs.push(first);
                arcs.push(acc - first * 40);
            } else {
                arcs.push(acc);
            }
            acc = 0;
        } else if i + 1 == content.len() {
            return Err("truncated OID".into());
        }
    }
    if arcs.is_empty() {
        return Err("empty OID".into());
    }
    Ok(arcs)
}

fn parse_time(tlv: Tlv<'_>) -> Result<SystemTime, String> {
    let text = std::str::from_utf8(tlv.content).map_err(|_| "validity: bad time")?;
    let digits = text
        .strip_suffix('Z')
        .ok_or("validity: time is not in UTC")?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err("validity: bad time".into());
    }
    let num = |s: &str| {
        s.parse::<i64>()
            .map_err(|_| "validity: bad time".to_string())
    };
    let (year, rest) = match (tlv.tag, digits.len()) {
        (UTC_TIME, 12) => {
            let yy = num(&digits[..2])?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &digits[2..])
        }
        (GENERALIZED_TIME, 14) => (num(&digits[..4])?, &digits[4..]),
        _ => return Err("validity: unsupported time format".into()),
    };
    let (month, day) = (num(&rest[0..2])?, num(&rest[2..4])?);
    let (h, m, s) = (num(&rest[4..6])?, num(&rest[6..8])?, num(&rest[8..10])?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || s > 60 {
        return Err("validity: bad time".into());
    }
    let secs = days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + s;
    Ok(match u64::try_from(secs) {
        Ok(secs) => SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => SystemTime::UNIX_EPOCH,
    })
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Wraps a PKCS#1 (RSA) or SEC1 (EC) private key into PKCS#8, using the
/// certificate's own key algorithm identifier (ring reads only PKCS#8).
pub(super) fn wrap_pkcs8(spki_algorithm: &[u8], key: &[u8]) -> Vec<u8> {
    let mut body = vec![INTEGER, 1, 0];
    body.extend_from_slice(spki_algorithm);
    body.extend(encode(OCTET_STRING, key));
    encode(SEQUENCE, &body)
}

fn encode(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// The inner key of a PKCS#8 document (tests turn it into SEC1).
#[cfg(test)]
pub(super) fn unwrap_pkcs8(pkcs8: &[u8]) -> Option<Vec<u8>> {
    let mut outer = Reader::new(pkcs8);
    let seq = outer.expect(SEQUENCE, "pkcs8").ok()?;
    let mut seq = Reader::new(seq.content);
    seq.expect(INTEGER, "version").ok()?;
    seq.expect(SEQUENCE, "algorithm").ok()?;
    Some(seq.expect(OCTET_STRING, "key").ok()?.content.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2038, 1, 19), 24_855);
    }

    #[test]
    fn oids() {
        assert_eq!(parse_oid(&[0x55, 0x1d, 0x13]).unwrap(), vec![2, 5, 29, 19]);
        assert_eq!(
            parse_oid(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01]).unwrap(),
            vec![1, 2, 840, 10045, 2, 1]
        );
    }

    #[test]
    fn long_lengths_round_trip() {
        let content = vec![7u8; 300];
        let der = encode(OCTET_STRING, &content);
        let mut r = Reader::new(&der);
        let tlv = r.next().unwrap();
        assert_eq!(tlv.content, &content[..]);
        assert_eq!(tlv.raw.len(), der.len());
        assert!(r.is_empty());
    }
}

//! X.509 name constraints on the proxy CA: it may vouch only for the
//! registries the proxy mirrors and for the proxy's own names. Nodes trust
//! this CA for every TLS connection, so without constraints whoever holds
//! its key could impersonate any host to them (a bank, the API server);
//! with them, a certificate for any other name is refused by every client
//! that enforces RFC 5280 (rustls/webpki, Go's crypto/x509, OpenSSL) even
//! though it chains to the CA.
//!
//! A permitted DNS subtree `quay.io` also permits every name below it
//! (`cdn.quay.io`): that is what RFC 5280 means by a subtree. IP addresses
//! are permitted one by one; with no IP to permit, every IP is excluded.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rcgen::{CidrSubnet, GeneralSubtree, NameConstraints};
use x509_parser::extensions::GeneralName;

use super::PkiError;
use crate::config::ProxyConfig;
use crate::names::split_port;

/// The name in the certificate replicas present to each other (mTLS on
/// the peer port). Under `.invalid`, so it can never be a real host.
pub const PEER_NAME: &str = "peer.pullthrough.invalid";
/// The name the proxy mints a probe certificate for when it loads a CA,
/// to check that clients would accept what the CA signs.
pub const SELF_TEST_NAME: &str = "ca-self-test.pullthrough.invalid";

/// The names a CA may vouch for: DNS subtrees and IP subnets permitted,
/// IP subnets excluded. Other name forms in a CA's constraints are not
/// interpreted (`foreign`): such a CA never equals one pullthrough writes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct PermittedNames {
    dns: BTreeSet<String>,
    ips: BTreeSet<(IpAddr, u8)>,
    excluded_ips: BTreeSet<(IpAddr, u8)>,
    foreign: bool,
}

impl PermittedNames {
    /// Exactly these DNS names (and their subdomains) and IP addresses.
    /// Names are compared lowercase, without a port or trailing dot; IP
    /// literals given as names (`[::1]`, `10.0.0.1`) count as IPs.
    pub fn new<S: AsRef<str>>(
        names: impl IntoIterator<Item = S>,
        ips: impl IntoIterator<Item = IpAddr>,
    ) -> Self {
        let mut out = Self::default();
        for ip in ips {
            out.ips.insert(host_subnet(ip));
        }
        for name in names {
            let host = normalize(name.as_ref());
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            if let Ok(ip) = bare.parse::<IpAddr>() {
                out.ips.insert(host_subnet(ip));
            } else if !host.is_empty() {
                out.dns.insert(host);
            }
        }
        if out.ips.is_empty() {
            out.excluded_ips = all_ips();
        }
        out
    }

    /// What a proxy running `config` (listening on `listen_ips`) serves
    /// TLS for: every registry name (host, aliases, token hosts), its own
    /// names (`names`, the address nodes dial, loopback, listen IPs), the
    /// peer name and the self-test name. Must cover every name the proxy's
    /// router allows (the proxy's tests check that it does).
    pub fn for_config(config: &ProxyConfig, listen_ips: &[IpAddr]) -> Self {
        let mut names: Vec<String> =
            vec!["localhost".into(), PEER_NAME.into(), SELF_TEST_NAME.into()];
        for reg in &config.registries {
            names.extend(reg.names().map(str::to_string));
            names.extend(reg.auth_hosts.iter().cloned());
        }
        names.extend(config.names.iter().cloned());
        if let Some(p) = &config.proxy {
            names.push(p.address.clone());
        }
        let ips = [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ]
        .into_iter()
        .chain(listen_ips.iter().copied().filter(|ip| !ip.is_unspecified()));
        Self::new(names, ips)
    }

    /// The permitted DNS subtrees, sorted.
    pub fn dns_names(&self) -> impl Iterator<Item = &str> {
        self.dns.iter().map(String::as_str)
    }

    /// The permitted IP subnets, sorted.
    pub fn ip_subnets(&self) -> impl Iterator<Item = (IpAddr, u8)> + '_ {
        self.ips.iter().copied()
    }

    /// Whether a certificate for DNS name `name` would be accepted under
    /// these constraints.
    pub fn permits_dns(&self, name: &str) -> bool {
        let name = normalize(name);
        self.dns.iter().any(|base| within_subtree(&name, base))
    }

    /// Whether a certificate for `ip` would be accepted.
    pub fn permits_ip(&self, ip: IpAddr) -> bool {
        let inside = |set: &BTreeSet<(IpAddr, u8)>| set.iter().any(|&(n, p)| in_subnet(ip, n, p));
        !inside(&self.excluded_ips) && (self.ips.is_empty() || inside(&self.ips))
    }

    /// The extension rcgen writes (marked critical, as RFC 5280 asks).
    pub(super) fn to_rcgen(&self) -> NameConstraints {
        let subnet = |&(ip, prefix): &(IpAddr, u8)| {
            GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(ip, prefix))
        };
        NameConstraints {
            permitted_subtrees: self
                .dns
                .iter()
                .map(|n| GeneralSubtree::DnsName(n.clone()))
                .chain(self.ips.iter().map(subnet))
                .collect(),
            excluded_subtrees: self.excluded_ips.iter().map(subnet).collect(),
        }
    }

    /// The constraints of the DER certificate `der`; `None` when it has
    /// none (it may vouch for any name).
    pub fn of_certificate(der: &[u8]) -> Result<Option<Self>, PkiError> {
        let (_, x509) = x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::X509 {
            reason: e.to_string(),
        })?;
        let Some(ext) = x509.name_constraints().map_err(|e| PkiError::X509 {
            reason: format!("nameConstraints: {e}"),
        })?
        else {
            return Ok(None);
        };
        let mut out = Self::default();
        for subtree in ext.value.permitted_subtrees.iter().flatten() {
            match &subtree.base {
                GeneralName::DNSName(n) => {
                    out.dns.insert(n.to_ascii_lowercase());
                }
                GeneralName::IPAddress(bytes) => match subnet_of(bytes) {
                    Some(s) => {
                        out.ips.insert(s);
                    }
                    None => out.foreign = true,
                },
                _ => out.foreign = true,
            }
        }
        for subtree in ext.value.excluded_subtrees.iter().flatten() {
            match &subtree.base {
                GeneralName::IPAddress(bytes) => match subnet_of(bytes) {
                    Some(s) => {
                        out.excluded_ips.insert(s);
                    }
                    None => out.foreign = true,
                },
                _ => out.foreign = true,
            }
        }
        Ok(Some(out))
    }

    /// Of the PEM certificate `pem` (its first certificate).
    pub fn of_pem(pem: &str) -> Result<Option<Self>, PkiError> {
        let (_, p) =
            x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| PkiError::Pem {
                reason: e.to_string(),
            })?;
        Self::of_certificate(&p.contents)
    }
}

impl std::fmt::Display for PermittedNames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts: Vec<String> = self.dns.iter().cloned().collect();
        parts.extend(self.ips.iter().map(|(ip, p)| format!("{ip}/{p}")));
        write!(f, "{}", parts.join(", "))
    }
}

fn normalize(name: &str) -> String {
    let (host, _port) = split_port(name.trim());
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// RFC 5280 4.2.1.10: a DNS name is within a subtree when it equals the
/// base or ends with `.` + base; a base with a leading `.` permits only
/// names strictly below it.
fn within_subtree(name: &str, base: &str) -> bool {
    let base = base.trim_end_matches('.');
    if base.is_empty() {
        return true;
    }
    if let Some(below) = base.strip_prefix('.') {
        return name.len() > below.len() + 1 && name.ends_with(base);
    }
    name == base
        || (name.len() > base.len()
            && name.ends_with(base)
            && name.as_bytes()[name.len() - base.len() - 1] == b'.')
}

fn host_subnet(ip: IpAddr) -> (IpAddr, u8) {
    match ip {
        IpAddr::V4(_) => (ip, 32),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            // A mapped v4 address reaches the same host as the v4 one.
            Some(v4) => (IpAddr::V4(v4), 32),
            None => (ip, 128),
        },
    }
}

fn all_ips() -> BTreeSet<(IpAddr, u8)> {
    BTreeSet::from([
        (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    ])
}

fn in_subnet(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    let (a, b): (Vec<u8>, Vec<u8>) = match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (a.octets().to_vec(), b.octets().to_vec()),
        (IpAddr::V6(a), IpAddr::V6(b)) => (a.octets().to_vec(), b.octets().to_vec()),
        _ => return false,
    };
    let full = usize::from(prefix / 8);
    let rest = prefix % 8;
    if a.len() < full || a[..full] != b[..full] {
        return false;
    }
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        a.get(full).map(|x| x & mask) == b.get(full).map(|x| x & mask)
    }
}

/// An IP subtree (address then mask, 8 or 32 bytes) as (network, prefix)
/// when the mask is a prefix mask.
fn subnet_of(bytes: &[u8]) -> Option<(IpAddr, u8)> {
    let (addr, mask) = bytes.split_at(bytes.len() / 2);
    let ip = match addr.len() {
        4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(addr).ok()?)),
        16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(addr).ok()?)),
        _ => return None,
    };
    let bits: u32 = mask.iter().map(|b| b.count_ones()).sum();
    let prefix = u8::try_from(bits).ok()?;
    // Only contiguous masks (ones then zeros) are prefixes.
    let contiguous = mask
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
        .skip_while(|&bit| bit == 1)
        .all(|bit| bit == 0);
    contiguous.then_some((ip, prefix))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::time::Duration;

    fn names() -> PermittedNames {
        PermittedNames::new(
            ["Quay.io.", "registry.k8s.io:443", "[fd00::1]"],
            ["10.96.0.10".parse().unwrap()],
        )
    }

    #[test]
    fn subtrees_permit_the_name_and_below_only() {
        let p = names();
        assert!(p.permits_dns("quay.io"));
        assert!(p.permits_dns("cdn.QUAY.io"));
        assert!(
            !p.permits_dns("evilquay.io"),
            "a suffix that is not a label"
        );
        assert!(!p.permits_dns("quay.io.evil.example"));
        assert!(!p.permits_dns("k8s.io"), "a parent of a permitted name");
        assert!(p.permits_ip("10.96.0.10".parse().unwrap()));
        assert!(p.permits_ip("fd00::1".parse().unwrap()));
        assert!(!p.permits_ip("10.96.0.11".parse().unwrap()));
        assert_eq!(
            p.dns_names().collect::<Vec<_>>(),
            ["quay.io", "registry.k8s.io"]
        );
    }

    #[test]
    fn without_ips_every_ip_is_excluded() {
        let p = PermittedNames::new(["quay.io"], []);
        assert!(!p.permits_ip("127.0.0.1".parse().unwrap()));
        assert!(!p.permits_ip("::1".parse().unwrap()));
    }

    #[test]
    fn a_generated_ca_carries_them_and_reads_back_equal() {
        let p = names();
        let ca = super::super::generate_constrained_ca(Duration::from_secs(600), &p).unwrap();
        assert_eq!(PermittedNames::of_pem(&ca.cert_pem).unwrap(), Some(p));
        let ips_free = PermittedNames::new(["quay.io"], []);
        let ca =
            super::super::generate_constrained_ca(Duration::from_secs(600), &ips_free).unwrap();
        assert_eq!(
            PermittedNames::of_pem(&ca.cert_pem).unwrap(),
            Some(ips_free)
        );
        let plain = super::super::generate_ca(Duration::from_secs(600)).unwrap();
        assert_eq!(PermittedNames::of_pem(&plain.cert_pem).unwrap(), None);
    }

    #[test]
    fn prefix_masks_only() {
        assert_eq!(
            subnet_of(&[10, 0, 0, 0, 255, 0, 0, 0]),
            Some(("10.0.0.0".parse().unwrap(), 8))
        );
        assert_eq!(subnet_of(&[10, 0, 0, 0, 255, 0, 255, 0]), None);
        assert!(in_subnet(
            "10.1.2.3".parse().unwrap(),
            "10.0.0.0".parse().unwrap(),
            8
        ));
        assert!(!in_subnet(
            "11.1.2.3".parse().unwrap(),
            "10.0.0.0".parse().unwrap(),
            8
        ));
        assert!(in_subnet(
            "10.1.2.3".parse().unwrap(),
            "10.0.0.0".parse().unwrap(),
            0
        ));
    }
}

//! Where the proxy may connect on a registry's behalf (SSRF rules).
//!
//! The admin chose the registry's upstream host and its `authHosts`; the
//! upstream chooses redirect Locations and token realms. An upstream must
//! not be able to point the proxy at the cluster's insides (the cloud
//! metadata address 169.254.169.254, loopback services, private networks)
//! or at the proxy itself. So every connection is checked against the
//! addresses it is about to use — after name resolution, so a public name
//! resolving to 127.0.0.1 counts as loopback, and with the very addresses
//! the socket then connects to, so a second DNS answer cannot differ:
//!
//! - the proxy's own listeners are never allowed, whoever chose the host;
//! - the upstream's configured host and its `authHosts` are allowed
//!   whatever they resolve to (the admin chose them; in a lab or a test
//!   they are often loopback or private);
//! - any other host must resolve to a public address, unless the registry
//!   sets `allowPrivateNetworks: true`.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use pullthrough_api::config::{ProxyConfig, RegistryConfig};

use super::resolve::normalize;

/// A connection the rules refuse, before any packet is sent to it.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "refused to connect to {host} ({addr}): {reason} (checked before connecting; \
     nothing was sent)"
)]
pub struct HopRefused {
    pub host: String,
    pub addr: SocketAddr,
    pub reason: &'static str,
}

/// One registry's egress rules.
#[derive(Debug, Clone)]
pub(super) struct EgressPolicy {
    /// Normalized host names (or IP literals) the admin chose: the
    /// upstream's host and the registry's `authHosts`.
    trusted: HashSet<String>,
    /// `allowPrivateNetworks`: other hosts may be non-public too.
    allow_private: bool,
    /// The proxy's own listeners (the config's `listen` and
    /// `peers.listen`; on a reload, those bound at start, see
    /// `Upstreams::new`).
    own: Vec<SocketAddr>,
}

impl EgressPolicy {
    pub(super) fn new(
        config: &ProxyConfig,
        registry: &RegistryConfig,
        upstream_host: &str,
    ) -> Self {
        let trusted = std::iter::once(upstream_host)
            .chain(registry.auth_hosts.iter().map(String::as_str))
            .map(host_key)
            .collect();
        let listen = &config.listen;
        let peers = config.peers.as_ref().map(|p| p.listen);
        Self {
            trusted,
            allow_private: registry.allow_private_networks,
            own: [listen.http, listen.https, listen.admin, peers]
                .into_iter()
                .flatten()
                .collect(),
        }
    }

    /// Whether `host` (as in a URL, port excluded) is the upstream's own
    /// host or one of its `authHosts`: where credentials may go.
    pub(super) fn is_trusted(&self, host: &str) -> bool {
        self.trusted.contains(&host_key(host))
    }

    /// Checks one address `host` resolved to (with the URL's port).
    pub(super) fn check(&self, host: &str, addr: SocketAddr) -> Result<(), HopRefused> {
        let refuse = |reason| {
            Err(HopRefused {
                host: host.to_string(),
                addr,
                reason,
            })
        };
        if self.is_own_listener(addr) {
            return refuse("it is one of the proxy's own listeners");
        }
        if self.allow_private || self.is_trusted(host) {
            return Ok(());
        }
        match non_public(addr.ip()) {
            Some(reason) => refuse(reason),
            None => Ok(()),
        }
    }

    fn is_own_listener(&self, addr: SocketAddr) -> bool {
        let ip = canonical(addr.ip());
        self.own.iter().any(|own| {
            own.port() == addr.port()
                && (canonical(own.ip()) == ip
                    // A wildcard listener answers on every local address:
                    // loopback, the pod's own (private) address, ...
                    || (own.ip().is_unspecified() && non_public(ip).is_some()))
        })
    }
}

/// How a host is compared: lower case, no trailing dot, no IPv6 brackets.
fn host_key(host: &str) -> String {
    normalize(host)
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

/// IPv4-mapped IPv6 addresses are their IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Why `ip` is not a public unicast address, or None when it is.
pub(super) fn non_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => non_public_v6(v6),
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b) {
        (0, _) => "an unspecified (0.0.0.0/8) address",
        (127, _) => "a loopback address",
        (169, 254) => "a link-local address (cloud metadata lives here)",
        (10, _) | (192, 168) => "a private (RFC 1918) address",
        (172, 16..=31) => "a private (RFC 1918) address",
        (100, 64..=127) => "a shared (CGNAT, RFC 6598) address",
        (198, 18..=19) => "a benchmarking (RFC 2544) address",
        (192, 0) if c == 0 => "an IETF protocol (192.0.0.0/24) address",
        (224..=239, _) => "a multicast address",
        (240..=255, _) => "a reserved or broadcast address",
        _ => return None,
    })
}

fn non_public_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if ip.is_unspecified() {
        return Some("an unspecified address");
    }
    if ip.is_loopback() {
        return Some("a loopback address");
    }
    // Addresses that carry an IPv4 address reach that address.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return non_public_v4(v4);
    }
    let s = ip.segments();
    let embedded = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    // NAT64 (64:ff9b::/96) and 6to4 (2002::/16).
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        return non_public_v4(embedded(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        return non_public_v4(embedded(s[1], s[2]));
    }
    Some(match s[0] {
        0xfe80..=0xfebf => "a link-local address",
        0xfec0..=0xfeff => "a site-local address",
        0xfc00..=0xfdff => "a unique local (ULA) address",
        0xff00..=0xffff => "a multicast address",
        // IPv4-compatible (::a.b.c.d, deprecated) and other ::/8 forms.
        0 => "a reserved (::/8) address",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(extra: &str, listen: &str) -> EgressPolicy {
        let yaml = format!(
            "{listen}registries:\n  - host: reg.test\n    upstream: http://127.0.0.1:5000\n    \
             authHosts: [auth.reg.test]\n{extra}"
        );
        let config = ProxyConfig::from_yaml(&yaml).unwrap();
        EgressPolicy::new(&config, &config.registries[0], "127.0.0.1")
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn non_public_addresses_are_named() {
        for ip in [
            "127.0.0.2",
            "169.254.169.254",
            "10.1.2.3",
            "172.20.0.1",
            "192.168.1.1",
            "100.100.100.200",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(non_public(ip).is_some(), "{ip} passed as public");
        }
        for ip in ["1.1.1.1", "172.32.0.1", "100.128.0.1", "2606:4700::1111"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(non_public(ip), None, "{ip}");
        }
    }

    #[test]
    fn chosen_hosts_pass_other_private_hosts_do_not() {
        let p = policy("", "");
        assert!(p.check("127.0.0.1", addr("127.0.0.1:5000")).is_ok());
        assert!(p.check("AUTH.reg.test.", addr("10.0.0.1:443")).is_ok());
        let refused = p.check("127.0.0.2", addr("127.0.0.2:80")).unwrap_err();
        assert_eq!(refused.reason, "a loopback address");
        // A name is judged by what it resolved to.
        assert!(p.check("evil.example", addr("127.0.0.1:80")).is_err());
        assert!(p.check("evil.example", addr("169.254.169.254:80")).is_err());
        assert!(p.check("[::1]", addr("[::1]:80")).is_err());
        assert!(p.check("cdn.example", addr("93.184.216.34:443")).is_ok());
        let open = policy("    allowPrivateNetworks: true\n", "");
        assert!(open.check("127.0.0.2", addr("127.0.0.2:80")).is_ok());
        assert!(open.check("meta", addr("169.254.169.254:80")).is_ok());
    }

    #[test]
    fn the_proxys_own_listeners_are_never_allowed() {
        let listen = "listen: {http: \"127.0.0.1:8080\", admin: \"0.0.0.0:9090\"}\n";
        for p in [
            policy("", listen),
            policy("    allowPrivateNetworks: true\n", listen),
        ] {
            // Even through the upstream's own (trusted) host.
            assert!(p.check("127.0.0.1", addr("127.0.0.1:8080")).is_err());
            assert!(p.check("x", addr("[::ffff:127.0.0.1]:8080")).is_err());
            // A wildcard listener is reached on every local address.
            assert!(p.check("127.0.0.1", addr("127.0.0.5:9090")).is_err());
            assert!(p.check("pod", addr("10.0.0.7:9090")).is_err());
            assert!(p.check("127.0.0.1", addr("127.0.0.1:5000")).is_ok());
        }
        // The peer listener is one of them too.
        let peers = "peers: {listen: '0.0.0.0:8444', static: ['127.0.0.1:8444']}\n";
        let p = policy("    allowPrivateNetworks: true\n", peers);
        assert!(p.check("pod", addr("10.0.0.7:8444")).is_err());
    }
}

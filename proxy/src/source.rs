//! Whose request made the proxy write an entry into state clients can
//! grow (access grants, tag and referrers answers): each source gets a
//! share of those maps ([`crate::bounded::BoundedMap::with_share`]), so
//! one client flooding them with answers the upstream gave it (free
//! HEADs, a fresh anonymous token per request: the credential hash is no
//! identity) pushes out its own entries, not the grants other clients
//! need while the upstream is down.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// A source's share is 1/`SHARES` of a map. Shares only matter once a map
/// is full, and a source over its share is the first to lose entries: an
/// eighth (6 250 of 50 000 grants, a few hundred images' worth per
/// client) is far more than one node's runtime or one pod holds in a
/// day, while up to eight such sources fill the map before any of them
/// is squeezed, and a flood from one address can take at most what it
/// held when the map filled, giving it back as others write.
pub const SHARES: usize = 8;

/// The share of a map of `cap` entries.
pub fn share(cap: usize) -> usize {
    (cap / SHARES).max(1)
}

/// Who an entry counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// The TCP peer address of the client's connection, never a header
    /// the client sent (`X-Forwarded-For` and the like are its own
    /// words). In a cluster that is the node's address for its runtime's
    /// pulls and a pod's own address for a pod talking to the proxy. On
    /// the peer listener it is the replica that relayed the request: it
    /// passes no client address, and one it passed would be the word of
    /// whoever holds a peer certificate, so everything a replica relays
    /// shares that replica's share.
    ///
    /// An IPv6 peer counts as its /64: one host or network usually holds
    /// a whole /64 and may pick any address in it, so a share per address
    /// would be one per connection to a client that wants many. In a
    /// cluster that is one node's pods (the default IPv6 pod range per
    /// node is a /64), like pods behind one node's IPv4 NAT.
    Addr(IpAddr),
    /// Public grants other replicas wrote to the shared storage.
    Replicas,
}

impl Source {
    /// The source of a connection from `peer` (an IPv4 client of a
    /// dual-stack listener counts as its IPv4 address).
    pub fn of(peer: SocketAddr) -> Self {
        match peer.ip().to_canonical() {
            IpAddr::V6(v6) => {
                let prefix = v6.to_bits() & !((1u128 << 64) - 1);
                Source::Addr(IpAddr::V6(Ipv6Addr::from_bits(prefix)))
            }
            v4 => Source::Addr(v4),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapped_ipv4_peer_is_its_ipv4_address() {
        let v4: SocketAddr = "10.0.0.7:40000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:10.0.0.7]:40001".parse().unwrap();
        assert_eq!(Source::of(v4), Source::of(mapped));
        let v6: SocketAddr = "[fd00::7]:40000".parse().unwrap();
        assert_ne!(Source::of(v6), Source::of(v4));
        assert_eq!(share(50_000), 6_250);
    }

    /// A client that may use any address of its /64 gets one share for
    /// all of them, not one per address it picks.
    #[test]
    fn an_ipv6_peer_counts_as_its_64() {
        let at = |a: &str| Source::of(a.parse().unwrap());
        assert_eq!(
            at("[2001:db8:1:2::7]:4000"),
            at("[2001:db8:1:2:ffff:1:2:3]:4001")
        );
        assert_eq!(at("[::1]:4000"), at("[::2]:4000"));
        assert_ne!(at("[2001:db8:1:2::7]:4000"), at("[2001:db8:1:3::7]:4000"));
        assert_eq!(
            at("[2001:db8:1:2:ffff::9]:1"),
            Source::Addr("2001:db8:1:2::".parse().unwrap())
        );
        assert_eq!(share(3), 1);
    }
}

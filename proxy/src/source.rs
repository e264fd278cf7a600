//! Whose request made the proxy write an entry into state clients can
//! grow (access grants, tag and referrers answers): each source gets a
//! share of those maps ([`crate::bounded::BoundedMap::with_share`]), so
//! one client flooding them with answers the upstream gave it (free
//! HEADs, a fresh anonymous token per request: the credential hash is no
//! identity) pushes out its own entries, not the grants other clients
//! need while the upstream is down.

use std::net::{IpAddr, SocketAddr};

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
    Addr(IpAddr),
    /// Public grants other replicas wrote to the shared storage.
    Replicas,
}

impl Source {
    /// The source of a connection from `peer` (an IPv4 client of a
    /// dual-stack listener counts as its IPv4 address).
    pub fn of(peer: SocketAddr) -> Self {
        Source::Addr(peer.ip().to_canonical())
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
        assert_eq!(share(3), 1);
    }
}

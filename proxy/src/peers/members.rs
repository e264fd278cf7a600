//! The live replicas: a static list, or the addresses of a headless
//! Service's DNS name (ready pods only), re-resolved periodically. A peer
//! that failed a request is left out locally for [`SUSPECT_FOR`], so
//! misses go elsewhere at once instead of waiting for DNS to catch up.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::rendezvous;
use crate::oci::Digest;

/// How long a peer that failed is left out of ownership.
pub const SUSPECT_FOR: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct Members {
    me: SocketAddr,
    /// Sorted, `me` included.
    live: ArcSwap<Vec<SocketAddr>>,
    suspected: Mutex<HashMap<SocketAddr, Instant>>,
}

/// Who owns a digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    Me,
    Peer(SocketAddr),
}

impl Members {
    pub fn new(me: SocketAddr, initial: &[SocketAddr]) -> Self {
        let m = Self {
            me,
            live: ArcSwap::from_pointee(vec![me]),
            suspected: Mutex::default(),
        };
        m.set(initial);
        m
    }

    pub fn me(&self) -> SocketAddr {
        self.me
    }

    /// The live members, this replica included.
    pub fn list(&self) -> Arc<Vec<SocketAddr>> {
        self.live.load_full()
    }

    /// Replaces the member list (this replica is always in it).
    pub fn set(&self, found: &[SocketAddr]) {
        let mut set: BTreeSet<SocketAddr> = found.iter().copied().collect();
        set.insert(self.me);
        let new: Vec<SocketAddr> = set.into_iter().collect();
        let old = self.live.load();
        if **old != new {
            tracing::info!(members = ?new, "replica set changed");
            self.live.store(Arc::new(new));
        }
    }

    /// Leaves `peer` out of ownership for a while (it failed a request).
    pub fn suspect(&self, peer: SocketAddr) {
        if peer == self.me {
            return;
        }
        tracing::warn!(%peer, secs = SUSPECT_FOR.as_secs(), "peer failed; its digests go to the others for now");
        self.suspected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer, Instant::now());
    }

    pub fn owner(&self, digest: &Digest) -> Owner {
        let live = self.live.load();
        let mut suspected = self.suspected.lock().unwrap_or_else(|p| p.into_inner());
        suspected.retain(|_, at| at.elapsed() < SUSPECT_FOR);
        let candidates = live.iter().filter(|m| !suspected.contains_key(m));
        match rendezvous::owner(digest, candidates) {
            Some(o) if o != self.me => Owner::Peer(o),
            _ => Owner::Me,
        }
    }
}

/// `--peer-address`: an IP (port from `peers.listen`) or a socket address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerAddress {
    Ip(std::net::IpAddr),
    Socket(SocketAddr),
}

pub fn parse_peer_address(s: &str) -> Result<PeerAddress, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(PeerAddress::Socket(a));
    }
    s.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .map(PeerAddress::Ip)
        .map_err(|_| format!("`{s}` is neither an IP nor ip:port"))
}

/// This replica's peer address: `--peer-address`, else (static list
/// only) `peers.listen` when it is one of the list.
pub fn self_address(
    peers: &pullthrough_api::config::Peers,
    given: Option<PeerAddress>,
) -> Result<SocketAddr, pullthrough_api::config::ConfigError> {
    let err = |m: String| pullthrough_api::config::ConfigError {
        key: "peers".into(),
        message: m,
    };
    let me = match given {
        Some(PeerAddress::Socket(a)) => a,
        Some(PeerAddress::Ip(ip)) => SocketAddr::new(ip, peers.listen.port()),
        None if peers.r#static.contains(&peers.listen) => peers.listen,
        None => {
            return Err(err(
                "this replica's own address is unknown: set --peer-address (PULLTHROUGH_PEER_ADDRESS), e.g. the Pod IP and the peer port".into(),
            ));
        }
    };
    if me.ip().is_unspecified() {
        return Err(err(format!(
            "the peer address {me} is unspecified; give the address peers reach this replica at"
        )));
    }
    if !peers.r#static.is_empty() && !peers.r#static.contains(&me) {
        return Err(err(format!(
            "this replica's address {me} is not in peers.static"
        )));
    }
    Ok(me)
}

/// Keeps `members` equal to the addresses `name` resolves to (port
/// `port`), every `every`, until `stop`. A failed lookup keeps the last
/// list (a DNS hiccup must not make every replica fetch on its own).
pub async fn follow_dns(
    members: Arc<Members>,
    name: String,
    port: u16,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut warned = false;
    loop {
        match tokio::net::lookup_host((name.as_str(), port)).await {
            Ok(addrs) => {
                warned = false;
                let found: Vec<SocketAddr> = addrs.collect();
                members.set(&found);
            }
            Err(err) if !warned => {
                warned = true;
                tracing::warn!(%name, error = %err, "cannot resolve the peers' DNS name; keeping the last replica set");
            }
            Err(err) => tracing::debug!(%name, error = %err, "peers' DNS name still not resolving"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_pod_ip_takes_the_listen_port_also_for_ipv6() {
        let peers = pullthrough_api::config::ProxyConfig::from_yaml(
            "peers: {listen: '[::]:8444', dns: peers.ns.svc}",
        )
        .unwrap()
        .peers
        .unwrap();
        let v6 = parse_peer_address("fd00::17").unwrap();
        assert_eq!(
            self_address(&peers, Some(v6)).unwrap(),
            "[fd00::17]:8444".parse().unwrap()
        );
        let v4 = parse_peer_address("10.1.2.3").unwrap();
        assert_eq!(
            self_address(&peers, Some(v4)).unwrap(),
            "10.1.2.3:8444".parse().unwrap()
        );
        let full = parse_peer_address("[fd00::17]:9000").unwrap();
        assert_eq!(
            self_address(&peers, Some(full)).unwrap(),
            "[fd00::17]:9000".parse().unwrap()
        );
        assert!(parse_peer_address("pod-1:8444").is_err());
        let err = self_address(&peers, None).unwrap_err();
        assert!(err.message.contains("--peer-address"), "{err}");
    }

    /// The replica set follows what the name resolves to (here the
    /// loopback names of the machine's own hosts file: a headless
    /// Service's A records in a cluster). Only a hosts-file name: a test
    /// sends no DNS query off the machine.
    #[tokio::test]
    async fn the_set_follows_the_dns_name() {
        let me: SocketAddr = "10.9.9.9:8444".parse().unwrap();
        let members = Arc::new(Members::new(me, &[]));
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(follow_dns(
            members.clone(),
            "localhost".into(),
            8444,
            Duration::from_millis(20),
            stop.clone(),
        ));
        let want: SocketAddr = "127.0.0.1:8444".parse().unwrap();
        for _ in 0..100 {
            if members.list().contains(&want) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(members.list().contains(&want), "{:?}", members.list());
        assert!(members.list().contains(&me));
        stop_tx.send_replace(true);
        task.await.unwrap();
    }

    #[test]
    fn a_suspected_peer_owns_nothing_and_me_is_always_a_member() {
        let me: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let a: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:3".parse().unwrap();
        let m = Members::new(me, &[a, b]);
        assert_eq!(*m.list(), vec![me, a, b]);
        m.set(&[a]);
        assert_eq!(*m.list(), vec![me, a]);
        m.set(&[me, a, b]);
        let d = |i: u32| {
            use sha2::Digest as _;
            Digest::parse(&format!(
                "sha256:{}",
                hex::encode(sha2::Sha256::digest(i.to_le_bytes()))
            ))
            .unwrap()
        };
        let owned_by_a: Vec<_> = (0..200)
            .map(d)
            .filter(|x| m.owner(x) == Owner::Peer(a))
            .collect();
        assert!(!owned_by_a.is_empty());
        m.suspect(a);
        for x in &owned_by_a {
            assert_ne!(m.owner(x), Owner::Peer(a));
        }
        m.suspect(me);
        assert!((0..50).map(d).any(|x| m.owner(&x) == Owner::Me));
    }
}

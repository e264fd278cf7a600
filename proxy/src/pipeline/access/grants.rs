//! The upstream's answers about access, kept: which clients it let read
//! which digest of which repository ([`AccessGrants`]), what it let
//! anyone read, and what it refused since; bounded, with a share per
//! source (see [`crate::source`]).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::header::HeaderMap;
use prometheus_client::metrics::counter::Counter;

use crate::bounded::BoundedMap;
use crate::observe::metric_labels::SharedMap;
use crate::observe::metrics::Metrics;
use crate::oci::Digest;
use crate::source::{self, Source};

/// How long "anyone may read this digest in this repository" is trusted.
/// Public content is then served to every client with no upstream contact
/// at all, which is what keeps by-digest pulls working through an outage.
pub const PUBLIC_TTL: Duration = Duration::from_secs(3600);

/// How old an answer of the upstream may be and still open the cache
/// while the upstream cannot be asked (stale-if-error for access): the
/// same client class (or anyone, for public content) read this very
/// digest in this very repository within that time.
pub const OUTAGE_GRACE: Duration = Duration::from_secs(24 * 3600);

/// Entries kept per map; the oldest write goes first beyond it, except
/// that a source holding its share of a full map gives up its own oldest
/// (see [`crate::source`]). An entry is a 32-byte hash, a timestamp and
/// its source (plus the basis for public ones), so a full map is a few
/// MiB whatever names clients make up.
pub const MAX_GRANTS: usize = 50_000;

/// A grant's key: sha256 over the length-prefixed registry, repository,
/// digest and client key, so neither names of any length nor credentials
/// are kept in memory as such.
type GrantKey = [u8; 32];

fn grant_key(registry: &str, repo: &str, digest: &Digest, client: &str) -> GrantKey {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for part in [registry, repo, digest.as_str(), client] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().into()
}

/// Which clients the upstream recently let read which digest of which
/// repository, so the cache (one copy per digest, shared by everyone)
/// serves an object only to clients the upstream let read it there
/// (DESIGN.md, Cache semantics). Keyed by registry, repository, digest and
/// a hash of the client's Authorization header (empty for none).
///
/// Each entry counts against the source whose request wrote it last, so
/// one client's flood of grants (free HEADs, a new anonymous token per
/// request) pushes out its own and not the grants other clients need to
/// be served through an upstream outage.
#[derive(Debug)]
pub struct AccessGrants {
    grants: Mutex<BoundedMap<GrantKey, Instant, Source>>,
    /// Digests of repositories a client without credentials was allowed
    /// to read, and the basis it read them on: `""` anonymously, else the
    /// fingerprint of the proxy's `credentialsFile` credentials it was
    /// served with.
    public: Mutex<BoundedMap<GrantKey, (Instant, String), Source>>,
    /// Digests of repositories an anonymous ask was refused since they
    /// were learnt public, and when: a public grant older than its refusal
    /// counts for nothing (not even through an outage, nor when another
    /// replica shares it again).
    refused: Mutex<BoundedMap<GrantKey, Instant, Source>>,
    /// Bumped on every public grant (the shared tier writes them out
    /// when it moved).
    public_version: std::sync::atomic::AtomicU64,
    /// What each map gave up to keep a source to its share.
    shed: Shed,
}

/// Counters of entries dropped by the shares, per map: not registered
/// anywhere until [`AccessGrants::counted`].
#[derive(Debug, Default)]
struct Shed {
    grants: Counter,
    public: Counter,
    refused: Counter,
}

/// When the upstream answered, and whose request it answered: the entry
/// kept for it counts against that source.
#[derive(Debug, Clone, Copy)]
pub struct Answered {
    pub at: Instant,
    pub source: Source,
}

impl Answered {
    pub fn now(source: Source) -> Self {
        Self {
            at: Instant::now(),
            source,
        }
    }
}

/// A public grant as replicas share it: the grant key (a hash: no names,
/// no credentials), how long ago it was learnt, and its basis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedGrant {
    pub key: [u8; 32],
    pub age: Duration,
    pub basis: String,
}

impl Default for AccessGrants {
    fn default() -> Self {
        Self::with_capacity(MAX_GRANTS)
    }
}

/// The grant key of a client: sha256 of its Authorization header, or ""
/// for a client without one.
pub fn client_key(headers: &HeaderMap) -> String {
    use sha2::Digest as _;
    headers
        .get(http::header::AUTHORIZATION)
        .map(|v| hex::encode(sha2::Sha256::digest(v.as_bytes())))
        .unwrap_or_default()
}

impl AccessGrants {
    /// Maps holding at most `cap` entries each.
    pub fn with_capacity(cap: usize) -> Self {
        let share = source::share(cap);
        Self {
            grants: Mutex::new(BoundedMap::with_share(cap, share)),
            public: Mutex::new(BoundedMap::with_share(cap, share)),
            refused: Mutex::new(BoundedMap::with_share(cap, share)),
            public_version: Default::default(),
            shed: Shed::default(),
        }
    }

    /// Counts what the maps drop to keep sources to their shares in
    /// `metrics`.
    pub fn counted(mut self, metrics: &Metrics) -> Self {
        self.shed = Shed {
            grants: metrics.share_evictions(SharedMap::grants),
            public: metrics.share_evictions(SharedMap::public_grants),
            refused: metrics.share_evictions(SharedMap::refusals),
        };
        self
    }

    /// Changes whenever a public grant is learnt here.
    pub fn public_version(&self) -> u64 {
        self.public_version
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Public grants younger than `max_age`, for the other replicas.
    pub fn export_public(&self, max_age: Duration) -> Vec<SharedGrant> {
        let public = self.public.lock().unwrap_or_else(|p| p.into_inner());
        public
            .keys()
            .filter_map(|k| {
                let (at, basis) = public.get(k)?;
                let age = at.elapsed();
                (age < max_age).then(|| SharedGrant {
                    key: *k,
                    age,
                    basis: basis.clone(),
                })
            })
            .collect()
    }

    /// Public grants another replica learnt: kept unless this one knows a
    /// fresher answer for the same key. A key a client's request wrote
    /// here stays that source's: this replica's own grants come back
    /// from the others, and moving them to [`Source::Replicas`] would
    /// free their writer's share for more.
    pub fn import_public(&self, shared: impl IntoIterator<Item = SharedGrant>) {
        let mut public = self.public.lock().unwrap_or_else(|p| p.into_inner());
        for g in shared {
            let Some(at) = Instant::now().checked_sub(g.age) else {
                continue;
            };
            if public.get(&g.key).is_some_and(|(mine, _)| *mine >= at) {
                continue;
            }
            let owner = public.owner(&g.key).copied().unwrap_or(Source::Replicas);
            let shed = public.insert_by(g.key, (at, g.basis), owner);
            self.shed.public.inc_by(shed as u64);
        }
    }

    /// Entries kept (client grants, public grants).
    pub fn len(&self) -> (usize, usize) {
        let grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        let public = self.public.lock().unwrap_or_else(|p| p.into_inner());
        (grants.len(), public.len())
    }

    /// True when the upstream let `client` read `digest` in `repo` within
    /// `ttl` (`authCheckTTL`, default 60 s).
    pub fn allowed(
        &self,
        registry: &str,
        repo: &str,
        digest: &Digest,
        client: &str,
        ttl: Duration,
    ) -> bool {
        self.allowed_at(registry, repo, digest, client, ttl)
            .is_some()
    }

    /// When the upstream let `client` read `digest` in `repo`, if within
    /// `ttl`.
    pub fn allowed_at(
        &self,
        registry: &str,
        repo: &str,
        digest: &Digest,
        client: &str,
        ttl: Duration,
    ) -> Option<Instant> {
        let grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        grants
            .get(&grant_key(registry, repo, digest, client))
            .copied()
            .filter(|at| at.elapsed() < ttl)
    }

    /// Records that the upstream let `client` read `digest` in `repo`,
    /// without ever making it public (registries marked `private`).
    pub fn grant_client(
        &self,
        registry: &str,
        repo: &str,
        digest: &Digest,
        client: &str,
        source: Source,
    ) {
        self.grant_client_at(registry, repo, digest, client, Answered::now(source));
    }

    /// [`Self::grant_client`] for an answer given earlier; an answer
    /// already kept that is fresher stays.
    pub(in crate::pipeline) fn grant_client_at(
        &self,
        registry: &str,
        repo: &str,
        digest: &Digest,
        client: &str,
        answered: Answered,
    ) {
        let mut grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        let key = grant_key(registry, repo, digest, client);
        if grants.get(&key).is_none_or(|mine| *mine < answered.at) {
            let shed = grants.insert_by(key, answered.at, answered.source);
            self.shed.grants.inc_by(shed as u64);
        }
    }

    /// True when a client without credentials could read `digest` in
    /// `repo` within `ttl`, anonymously or on `basis` (the fingerprint of
    /// the proxy's credentials now configured for the registry, `""` for
    /// none): content learnt readable with other credentials does not
    /// count.
    pub fn is_public(
        &self,
        registry: &str,
        repo: &str,
        digest: &Digest,
        basis: &str,
        ttl: Duration,
    ) -> bool {
        self.public_at(registry, repo, digest, basis, ttl).is_some()
    }

    /// When an anonymous client was let read `digest` in `repo`, if that
    /// counts now (see [`Self::is_public`]).
    pub fn public_at(
        &self,
        registry: &str,
        repo: &str,
        digest: &Digest,
        basis: &str,
        ttl: Duration,
    ) -> Option<Instant> {
        let key = grant_key(registry, repo, digest, "");
        let refused = self
            .refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .copied();
        let public = self.public.lock().unwrap_or_else(|p| p.into_inner());
        public
            .get(&key)
            .filter(|(at, how)| {
                at.elapsed() < ttl
                    && (how.is_empty() || how == basis)
                    && refused.is_none_or(|r| r < *at)
            })
            .map(|(at, _)| *at)
    }

    /// Records that an anonymous ask for `digest` in `repo` was just
    /// refused: what was learnt public before is not any more. The grant
    /// itself goes too, not only shadowed by the refusal: refusals are
    /// as cheap to cause as asking about made-up repositories, and a
    /// flood of them that pushed this one out of its bounded map would
    /// otherwise make the old grant count again.
    pub fn refuse_public(&self, registry: &str, repo: &str, digest: &Digest, source: Source) {
        let key = grant_key(registry, repo, digest, "");
        self.public
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        let shed = self
            .refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert_by(key, Instant::now(), source);
        self.shed.refused.inc_by(shed as u64);
    }

    /// Records that the upstream just let `client` read `digest` in
    /// `repo`; a client without credentials (`""`) makes it public on
    /// `basis` (see [`Self::is_public`]). Such a client is then judged by
    /// [`Self::is_public`] alone, so no per-client grant is kept for it
    /// that would outlive a change of basis.
    pub fn grant(
        &self,
        registry: &str,
        repo: &str,
        digest: &Digest,
        client: &str,
        basis: &str,
        source: Source,
    ) {
        let answered = Answered::now(source);
        self.grant_at(registry, repo, digest, client, basis, answered);
    }

    /// [`Self::grant`] for an answer given earlier (another replica's, as
    /// old as it was there); an answer already kept that is fresher stays,
    /// and a refusal since then still counts (see [`Self::is_public`]).
    pub fn grant_at(
        &self,
        registry: &str,
        repo: &str,
        digest: &Digest,
        client: &str,
        basis: &str,
        answered: Answered,
    ) {
        if client.is_empty() {
            let mut public = self.public.lock().unwrap_or_else(|p| p.into_inner());
            let key = grant_key(registry, repo, digest, "");
            if public
                .get(&key)
                .is_some_and(|(mine, _)| *mine >= answered.at)
            {
                return;
            }
            let shed = public.insert_by(key, (answered.at, basis.to_string()), answered.source);
            self.shed.public.inc_by(shed as u64);
            self.public_version
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        self.grant_client_at(registry, repo, digest, client, answered);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Source = Source::Addr(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));

    fn at(at: Instant) -> Answered {
        Answered { at, source: S }
    }

    fn d(n: u64) -> Digest {
        Digest::of(&n.to_be_bytes())
    }

    /// A digest learnt public and later refused to an anonymous ask (the
    /// repository went private) is public no more: not for the usual
    /// window, not through an outage (where a client that can make its
    /// own check fail would otherwise get it for a day), and not when
    /// another replica shares the older grant again; a newer anonymous
    /// yes makes it public again.
    #[test]
    fn a_refused_anonymous_ask_ends_what_was_learnt_public() {
        let (g, other) = (AccessGrants::default(), AccessGrants::default());
        g.grant("r", "app", &d(1), "", "", S);
        other.grant("r", "app", &d(1), "", "", S);
        assert!(g.is_public("r", "app", &d(1), "", OUTAGE_GRACE));
        std::thread::sleep(Duration::from_millis(2));
        g.refuse_public("r", "app", &d(1), S);
        assert!(!g.is_public("r", "app", &d(1), "", OUTAGE_GRACE));
        assert!(!g.is_public("r", "app", &d(1), "", PUBLIC_TTL));
        // Another replica's grant, learnt before the refusal.
        g.import_public(other.export_public(OUTAGE_GRACE));
        assert!(!g.is_public("r", "app", &d(1), "", OUTAGE_GRACE));
        // Other digests and repositories are untouched.
        g.grant("r", "app", &d(2), "", "", S);
        assert!(g.is_public("r", "app", &d(2), "", OUTAGE_GRACE));
        std::thread::sleep(Duration::from_millis(2));
        g.grant("r", "app", &d(1), "", "", S);
        assert!(g.is_public("r", "app", &d(1), "", OUTAGE_GRACE));
    }

    /// A peer's answer is kept as old as it was there: it ends when the
    /// peer's would, does not replace a fresher one, and does not outrank
    /// a refusal made after it.
    #[test]
    fn a_grant_kept_from_a_peer_keeps_its_age() {
        let g = AccessGrants::default();
        let ttl = Duration::from_secs(60);
        let old = Instant::now() - Duration::from_secs(50);
        g.grant_at("r", "app", &d(1), "client", "", at(old));
        assert_eq!(g.allowed_at("r", "app", &d(1), "client", ttl), Some(old));
        assert!(!g.allowed("r", "app", &d(1), "client", Duration::from_secs(40)));
        g.grant("r", "app", &d(2), "client", "", S);
        let fresh = g.allowed_at("r", "app", &d(2), "client", ttl).unwrap();
        g.grant_at("r", "app", &d(2), "client", "", at(old));
        assert_eq!(g.allowed_at("r", "app", &d(2), "client", ttl), Some(fresh));
        // Public: a refusal after the peer's yes wins.
        g.refuse_public("r", "app", &d(3), S);
        g.grant_at("r", "app", &d(3), "", "", at(old));
        assert!(!g.is_public("r", "app", &d(3), "", PUBLIC_TTL));
        g.grant_at("r", "app", &d(4), "", "", at(old));
        assert_eq!(g.public_at("r", "app", &d(4), "", PUBLIC_TTL), Some(old));
    }

    /// Refusals for made-up repositories, as many as the map holds and
    /// more, do not bring back a grant refused before them.
    #[test]
    fn a_flood_of_refusals_does_not_revive_a_refused_grant() {
        let g = AccessGrants::with_capacity(100);
        g.grant("r", "app", &d(1), "", "", S);
        std::thread::sleep(Duration::from_millis(2));
        g.refuse_public("r", "app", &d(1), S);
        for i in 0..1_000u64 {
            g.refuse_public("r", &format!("made-up/{i}"), &d(1), S);
        }
        assert!(!g.is_public("r", "app", &d(1), "", PUBLIC_TTL));
        assert!(!g.is_public("r", "app", &d(1), "", OUTAGE_GRACE));
    }

    /// What one replica learnt is public holds on another with its age
    /// and basis; per-client grants are never shared.
    #[test]
    fn public_grants_move_between_replicas_with_their_age_and_basis() {
        let a = AccessGrants::default();
        a.grant("r", "pub/repo", &d(1), "", "fp", S);
        a.grant("r", "priv/repo", &d(2), "client-hash", "", S);
        let v = a.public_version();
        a.grant("r", "pub/repo", &d(3), "", "", S);
        assert_ne!(a.public_version(), v);
        let shared = a.export_public(OUTAGE_GRACE);
        assert_eq!(shared.len(), 2);
        let b = AccessGrants::default();
        b.import_public(shared.clone());
        let ttl = Duration::from_secs(60);
        assert!(b.is_public("r", "pub/repo", &d(1), "fp", ttl));
        assert!(!b.is_public("r", "pub/repo", &d(1), "other-fp", ttl));
        assert!(b.is_public("r", "pub/repo", &d(3), "", ttl));
        assert!(!b.allowed("r", "priv/repo", &d(2), "client-hash", ttl));
        // An old answer stays old on the other side.
        let c = AccessGrants::default();
        c.import_public(shared.into_iter().map(|mut g| {
            g.age = Duration::from_secs(120);
            g
        }));
        assert!(!c.is_public("r", "pub/repo", &d(3), "", ttl));
        assert!(c.is_public("r", "pub/repo", &d(3), "", Duration::from_secs(600)));
    }

    #[test]
    fn public_grants_hold_only_on_their_basis_and_for_their_digest() {
        let g = AccessGrants::default();
        let ttl = Duration::from_secs(60);
        g.grant("r", "anon/repo", &d(1), "", "", S);
        g.grant("r", "creds/repo", &d(1), "", "fp1", S);
        // Anonymously readable: readable whatever the proxy's credentials.
        assert!(g.is_public("r", "anon/repo", &d(1), "", ttl));
        assert!(g.is_public("r", "anon/repo", &d(1), "fp2", ttl));
        // Only that digest, in that repository, of that registry.
        assert!(!g.is_public("r", "anon/repo", &d(2), "", ttl));
        assert!(!g.is_public("r", "other/repo", &d(1), "", ttl));
        assert!(!g.is_public("r2", "anon/repo", &d(1), "", ttl));
        // Read with credentials fp1: only while fp1 is configured.
        assert!(g.is_public("r", "creds/repo", &d(1), "fp1", ttl));
        assert!(!g.is_public("r", "creds/repo", &d(1), "fp2", ttl));
        assert!(!g.is_public("r", "creds/repo", &d(1), "", ttl));
        // A client without credentials gets no per-client grant that
        // would outlive its basis.
        assert!(!g.allowed("r", "creds/repo", &d(1), "", ttl));
        g.grant("r", "creds/repo", &d(1), "client-hash", "fp1", S);
        assert!(g.allowed("r", "creds/repo", &d(1), "client-hash", ttl));
        assert!(!g.allowed("r", "creds/repo", &d(1), "other-client", ttl));
        assert!(!g.allowed("r", "creds/repo", &d(2), "client-hash", ttl));
        assert!(!g.allowed("r", "creds/repo", &d(1), "client-hash", Duration::ZERO));
    }

    /// One client address making the upstream answer yes for ever more
    /// digests (or with a new token each time) pushes out its own grants
    /// only: another address's grant, per client or public, still opens
    /// its digest through an outage, and the metric shows the flood.
    /// Before the shares, the flood pushed out every older grant.
    #[test]
    fn a_flood_from_one_address_keeps_other_addresses_grants() {
        let metrics = Metrics::default();
        let g = AccessGrants::with_capacity(800).counted(&metrics);
        let victim = Source::Addr([10, 0, 0, 2].into());
        let flood = Source::Addr([10, 0, 0, 3].into());
        let answered = |source| Answered::now(source);
        g.grant_at("r", "private", &d(1), "victim", "", answered(victim));
        g.grant_client("r", "private", &d(2), "victim", victim);
        g.grant("r", "public", &d(3), "", "", victim);
        for i in 0..10_000u64 {
            g.grant("r", "flood", &d(100 + i), &format!("token-{i}"), "", flood);
            g.grant("r", &format!("flood/{i}"), &d(i), "", "", flood);
        }
        assert_eq!(g.len(), (800, 800));
        for n in [1, 2] {
            assert!(g.allowed("r", "private", &d(n), "victim", OUTAGE_GRACE));
        }
        assert!(g.is_public("r", "public", &d(3), "", OUTAGE_GRACE));
        assert!(g.allowed("r", "flood", &d(10_099), "token-9999", OUTAGE_GRACE));
        let text = metrics.encode();
        // Every flood grant past what the full map left it (the victim
        // holds two per-client grants and one public).
        for (map, shed) in [("grants", 10_000 - 798), ("public_grants", 10_000 - 799)] {
            let line = format!("pullthrough_share_evictions_total{{map=\"{map}\"}} {shed}\n");
            assert!(text.contains(&line), "{line} in {text}");
        }
    }

    /// Grants other replicas share are held as [`Source::Replicas`]; one
    /// a client's request wrote here stays that client's.
    #[test]
    fn shared_grants_keep_the_source_that_wrote_them_here() {
        let (a, b) = (AccessGrants::default(), AccessGrants::default());
        let client = Source::Addr([10, 0, 0, 2].into());
        b.grant_at(
            "r",
            "app",
            &d(1),
            "",
            "",
            at(Instant::now() - Duration::from_secs(5)),
        );
        a.grant_at(
            "r",
            "app",
            &d(1),
            "",
            "",
            at(Instant::now() - Duration::from_secs(9)),
        );
        b.grant("r", "app", &d(2), "", "", client);
        a.import_public(b.export_public(OUTAGE_GRACE));
        let public = a.public.lock().unwrap();
        assert_eq!(public.owner(&grant_key("r", "app", &d(1), "")), Some(&S));
        assert_eq!(
            public.owner(&grant_key("r", "app", &d(2), "")),
            Some(&Source::Replicas)
        );
    }

    #[test]
    fn a_flood_of_grants_keeps_both_maps_at_their_cap() {
        let g = AccessGrants::with_capacity(10_000);
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        for i in 0..100_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let repo = format!("flood/{x:x}");
            g.grant("r", &repo, &d(i), "", "", S);
            g.grant("r", &repo, &d(i), "client", "", S);
        }
        assert_eq!(g.len(), (10_000, 10_000));
        // The newest are kept.
        let ttl = Duration::from_secs(60);
        assert!(g.allowed("r", &format!("flood/{x:x}"), &d(99_999), "client", ttl));
    }
}

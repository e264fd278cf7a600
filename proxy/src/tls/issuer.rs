//! The issuer: mints leaf certificates from the CA during the handshake
//! for the names the proxy may serve, and keeps them until a week before
//! they expire.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use pullthrough_api::pki::{PEER_NAME, PermittedNames, SELF_TEST_NAME};
use rcgen::SanType;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ConfigBuilder, ServerConfig, WantsVerifier};
use rustls_pki_types::PrivateKeyDer;

use super::ca::{Ca, Minted};
use super::{AllowedNames, TlsError, normalize};

/// Re-mint a cached leaf once it is this close to expiry.
const RENEW_BEFORE: Duration = Duration::from_secs(7 * 86_400);

/// How long peers keep trusting the CA a reload replaced. Replicas see a
/// rotated Secret at different times (kubelet syncs each Pod's volume on
/// its own period, about a minute plus its cache TTL); until a lagging
/// replica has caught up it still presents a leaf of the old CA. Ten
/// minutes covers that lag with room, and is short enough that a CA
/// rotated away because it leaked stops being trusted soon.
pub(super) const PREVIOUS_CA_GRACE: Duration = Duration::from_secs(600);

/// What identifies a loaded CA in logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaInfo {
    pub subject: String,
    pub not_after: SystemTime,
}

/// A minted certificate and when to replace it.
pub(super) struct Cached {
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

/// The CA a reload replaced, and until when peers still trust it.
struct Replaced {
    ca: Arc<Ca>,
    until: Instant,
}

/// The CAs peer connections trust, for [`super::peer::PeerTls`].
pub(super) struct PeerTrust {
    /// [`Issuer::trust_generation`] when this was read.
    pub generation: u64,
    /// The CA to mint this replica's own peer leaf with.
    pub current: Arc<Ca>,
    /// PEM of each CA trusted: current, next, the operator's previous
    /// ones, and the replaced CA while its grace lasts; none twice.
    pub trusted: Vec<Arc<str>>,
    /// When the replaced CA stops being trusted: the set shrinks then
    /// without any reload.
    pub until: Option<Instant>,
}

#[derive(Default)]
pub(super) struct Cache {
    pub(super) leaves: HashMap<String, Cached>,
    own: Option<OwnCert>,
}

/// The proxy's TLS certificate issuer and rustls cert resolver.
pub struct Issuer {
    /// Swapped whole by [`Issuer::reload`] (CA rotation); replaced only
    /// while `cache` is locked, so no leaf of the old CA is cached after.
    ca: ArcSwap<Ca>,
    /// The CA that takes over next (operator rotation), trusted by nodes
    /// already: it signs the names `ca`'s name constraints do not permit.
    /// Swapped under the cache lock, like `ca`.
    next: ArcSwapOption<Ca>,
    /// The CA the last reload replaced, trusted by peers for
    /// [`PREVIOUS_CA_GRACE`] (never used to sign). Swapped with `ca`.
    previous: ArcSwapOption<Replaced>,
    /// PEM of the CAs the operator's last rotation replaced (the Secret's
    /// `previous.crt`, kept for one overlap): trusted by peers, never used
    /// to sign. Unlike `previous`, this survives a restart: a replica that
    /// starts after a rotation still accepts one that has not picked it up.
    rotated_out: ArcSwap<Vec<Arc<str>>>,
    /// Bumped after every change of `ca`, `next` or `previous`, so peer
    /// configs built from an older set of CAs are rebuilt.
    generation: AtomicU64,
    allowed: ArcSwap<AllowedNames>,
    cache: Mutex<Cache>,
    provider: Arc<CryptoProvider>,
    builder: ConfigBuilder<ServerConfig, WantsVerifier>,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let allowed = self.allowed.load();
        let ca = self.ca.load();
        f.debug_struct("Issuer")
            .field("ca", &ca.cert_path)
            .field("ca_subject", &ca.subject_cn)
            .field("registry_names", &allowed.registry_names.len())
            .field("own_names", &allowed.own_names)
            .field("own_ips", &allowed.own_ips)
            .finish_non_exhaustive()
    }
}

impl Issuer {
    /// `ca: Some(files)` loads cert + key PEM from those files (error names the file and what is wrong: unreadable, not PEM, not a CA, key does not match).
    /// `None`: uses `<data_dir>/ca.crt` + `<data_dir>/ca.key` if both exist, else generates an ECDSA P-256 CA (CN "pullthrough proxy CA", see `pullthrough_api::pki`, ~10 years, KeyCertSign) and writes them (key mode 0600, atomic write: temp in same dir + fsync + rename), so restarts reuse it.
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
        let allowed = allowed.normalized();
        let mut next = None;
        let previous_cert = ca.and_then(|files| files.previous_cert.as_deref());
        let ca = match ca {
            Some(files) => {
                if let Some((cert, key)) = files.next() {
                    // Only a help during a rotation: without it the
                    // current CA still serves what it permits.
                    match Ca::load_files(cert, key, &provider) {
                        Ok(ca) => next = Some(Arc::new(ca)),
                        Err(e) if e.is_missing() => {}
                        Err(e) => {
                            tracing::error!(error = %e, "next CA not usable; signing with the current CA only")
                        }
                    }
                }
                Ca::load_files(&files.cert, &files.key, &provider)?
            }
            None => Ca::load_or_generate_in(data_dir, &permitted_for(&allowed), &provider)?,
        };
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config {
                reason: e.to_string(),
            })?;
        let issuer = Self {
            ca: ArcSwap::from_pointee(ca),
            next: ArcSwapOption::new(next),
            previous: ArcSwapOption::empty(),
            rotated_out: ArcSwap::from_pointee(Vec::new()),
            generation: AtomicU64::new(0),
            allowed: ArcSwap::from_pointee(allowed),
            cache: Mutex::new(Cache::default()),
            provider,
            builder,
        };
        issuer.warn_unpermitted();
        // Only a help to peers during a rotation: without it the current
        // and next CAs are still trusted.
        if let Err(e) = issuer.reload_previous(previous_cert) {
            tracing::error!(error = %e, "previous CA not usable; peers still on it are refused");
        }
        Ok(issuer)
    }

    /// Changes whenever the CAs [`Self::peer_trust`] returns may have.
    pub(super) fn trust_generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The CAs peers trust at `now`. During a rotation replicas disagree
    /// for a while on which CA is current: trusting the next CA lets a
    /// lagging replica accept one that has promoted it already, and
    /// trusting the replaced one for a while lets an updated replica
    /// accept one that has not.
    pub(super) fn peer_trust(&self, now: Instant) -> PeerTrust {
        // Read first: a reload racing with the loads below leaves newer
        // CAs under an older generation, which only costs a rebuild.
        let generation = self.trust_generation();
        let current = self.ca.load_full();
        let previous = self.previous.load_full().filter(|p| now < p.until);
        let until = previous.as_ref().map(|p| p.until);
        let mut trusted: Vec<Arc<str>> = vec![current.pem.clone()];
        let rotated_out = self.rotated_out.load_full();
        for pem in self
            .next
            .load_full()
            .into_iter()
            .chain(previous.map(|p| p.ca.clone()))
            .map(|ca| ca.pem.clone())
            .chain(rotated_out.iter().cloned())
        {
            if !trusted.iter().any(|t| **t == *pem) {
                trusted.push(pem);
            }
        }
        PeerTrust {
            generation,
            current,
            trusted,
            until,
        }
    }

    pub(super) fn provider(&self) -> Arc<CryptoProvider> {
        self.provider.clone()
    }

    /// The CA certificate PEM clients must trust (never the key): the
    /// current one, so `/ca.crt` follows a reload.
    pub fn ca_pem(&self) -> Arc<str> {
        self.ca.load().pem.clone()
    }

    /// The current CA's subject CN and `notAfter`.
    pub fn ca_info(&self) -> CaInfo {
        let ca = self.ca.load();
        CaInfo {
            subject: ca.subject_cn.clone(),
            not_after: ca.not_after(),
        }
    }

    /// Loads the CA from `cert` + `key` with every check the start-up load
    /// makes (readable PEM, a CA, key matches, not expired, signs leaves
    /// that verify) and, when it differs from the current one, swaps it in
    /// and drops every cached leaf so new handshakes get leaves of the new
    /// CA. `Ok(None)`: the files hold the current CA. On error nothing
    /// changes: a pair caught half-updated (cert before key) keeps the old
    /// CA until the pair is consistent.
    pub fn reload(&self, cert: &Path, key: &Path) -> Result<Option<CaInfo>, TlsError> {
        let new = Ca::load_files(cert, key, &self.provider)?;
        if *new.pem == *self.ca.load().pem {
            return Ok(None);
        }
        let info = CaInfo {
            subject: new.subject_cn.clone(),
            not_after: new.not_after(),
        };
        // Minting happens with the cache locked: storing the CA under the
        // same lock means a handshake racing with the swap either minted
        // before (and is cleared here) or mints with the new CA.
        let mut cache = self.lock_cache();
        let replaced = self.ca.swap(Arc::new(new));
        // A clock that cannot add ten minutes gives no grace, not a panic.
        let previous = Instant::now().checked_add(PREVIOUS_CA_GRACE).map(|until| {
            Arc::new(Replaced {
                ca: replaced,
                until,
            })
        });
        self.previous.store(previous);
        self.generation.fetch_add(1, Ordering::SeqCst);
        cache.leaves.clear();
        cache.own = None;
        drop(cache);
        self.warn_unpermitted();
        Ok(Some(info))
    }

    /// Follows the next CA's files: loads them when both exist (`None`, or
    /// files that are gone: there is no next CA). True when what signs
    /// changed; then every cached leaf is dropped, so a name the current
    /// CA does not permit gets a leaf of the new next CA. On error nothing
    /// changes.
    pub fn reload_next(&self, files: Option<(&Path, &Path)>) -> Result<bool, TlsError> {
        let new = match files {
            None => None,
            Some((cert, key)) => match Ca::load_files(cert, key, &self.provider) {
                Ok(ca) => Some(ca),
                Err(e) if e.is_missing() => None,
                Err(e) => return Err(e),
            },
        };
        let current = self.next.load();
        let same = match (&new, current.as_deref()) {
            (None, None) => true,
            (Some(a), Some(b)) => *a.pem == *b.pem,
            _ => false,
        };
        if same {
            return Ok(false);
        }
        let mut cache = self.lock_cache();
        self.next.store(new.map(Arc::new));
        self.generation.fetch_add(1, Ordering::SeqCst);
        cache.leaves.clear();
        cache.own = None;
        drop(cache);
        self.warn_unpermitted();
        Ok(true)
    }

    /// Follows the operator's `previous.crt` (`None`, or a file that is
    /// gone: no previous CA). True when the set peers trust changed. On
    /// error nothing changes.
    pub fn reload_previous(&self, path: Option<&Path>) -> Result<bool, TlsError> {
        let new = match path.map(read_trust_anchors) {
            None => Vec::new(),
            Some(Ok(pems)) => pems,
            Some(Err(e)) if e.is_missing() => Vec::new(),
            Some(Err(e)) => return Err(e),
        };
        if **self.rotated_out.load() == new {
            return Ok(false);
        }
        self.rotated_out.store(Arc::new(new));
        self.generation.fetch_add(1, Ordering::SeqCst);
        Ok(true)
    }

    /// The CA to sign a leaf with: the current one when its constraints
    /// permit the leaf's names, else the next one when it does, else the
    /// current one (clients will refuse the leaf; [`Self::warn_unpermitted`]
    /// has said so).
    fn ca_for(&self, permits: impl Fn(&Ca) -> bool) -> Arc<Ca> {
        let ca = self.ca.load_full();
        if permits(&ca) {
            return ca;
        }
        match self.next.load_full() {
            Some(next) if permits(&next) => next,
            _ => ca,
        }
    }

    /// Logs the names no loaded CA may vouch for: their handshakes will
    /// be refused by clients until a CA that permits them is in place.
    fn warn_unpermitted(&self) {
        let allowed = self.allowed.load();
        let ca = self.ca.load();
        let next = self.next.load();
        let permitted_by_any = |f: &dyn Fn(&Ca) -> bool| f(&ca) || next.as_deref().is_some_and(f);
        let mut refused: Vec<String> = allowed
            .registry_names
            .iter()
            .chain(&allowed.own_names)
            .filter(|n| !permitted_by_any(&|c: &Ca| c.permits_dns(n)))
            .cloned()
            .collect();
        refused.extend(
            allowed
                .own_ips
                .iter()
                .filter(|ip| !permitted_by_any(&|c: &Ca| c.permits_ip(**ip)))
                .map(IpAddr::to_string),
        );
        if !refused.is_empty() {
            refused.sort();
            tracing::warn!(
                names = ?refused,
                ca = %ca.cert_path.display(),
                "the CA's name constraints do not permit these names: clients will refuse their TLS \
                 certificates. In a cluster the operator issues a CA that permits them; with a CA the \
                 proxy generated, delete its ca.crt and ca.key to generate one for the current names \
                 (clients must then trust the new CA)"
            );
        }
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
        self.warn_unpermitted();
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

    pub(super) fn lock_cache(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The certificate for a handshake with `sni` (`None`: no SNI, e.g. a
    /// client connecting by IP), or `None` to refuse it.
    pub(super) fn certificate_for(
        &self,
        sni: Option<&str>,
        now: SystemTime,
    ) -> Option<Arc<CertifiedKey>> {
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
        let ca = self.ca_for(|ca| ca.permits_dns(name));
        let cached = self.mint(&ca, vec![san], name, now, name)?;
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
        let ca = self.ca_for(|ca| {
            allowed.own_names.iter().all(|n| ca.permits_dns(n))
                && allowed.own_ips.iter().all(|ip| ca.permits_ip(*ip))
        });
        let cert = self.mint(&ca, sans, "pullthrough", now, &label)?;
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
        ca: &Ca,
        sans: Vec<SanType>,
        common_name: &str,
        now: SystemTime,
        label: &str,
    ) -> Option<Cached> {
        let Minted {
            chain,
            key,
            not_after,
        } = match ca.mint(sans, common_name, now) {
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
            // The CA itself expires soon: renew halfway, at least hourly,
            // and never more than once a minute. Past the CA's end a new
            // leaf helps no client (only a new CA does, and a reload drops
            // the cached leaves), while minting one per handshake under
            // the cache lock stalled every handshake.
            now + (lifetime / 2)
                .max(Duration::from_secs(3600))
                .min(lifetime)
                .max(Duration::from_secs(60))
        };
        if not_after < ca.not_after() && lifetime <= 2 * RENEW_BEFORE {
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

/// What a CA the proxy generates may vouch for: the names it serves TLS
/// for, the peer name and the self-test name.
fn permitted_for(allowed: &AllowedNames) -> PermittedNames {
    let names = allowed
        .registry_names
        .iter()
        .chain(&allowed.own_names)
        .map(String::as_str)
        .chain([PEER_NAME, SELF_TEST_NAME]);
    PermittedNames::new(names, allowed.own_ips.iter().copied())
}

/// The certificates of a PEM file peers may trust, each as its own PEM
/// (checked to be usable as a trust anchor; an empty file is no CA).
fn read_trust_anchors(path: &Path) -> Result<Vec<Arc<str>>, TlsError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what: "previous CA certificate",
        path: path.to_path_buf(),
        source,
    })?;
    let invalid = |reason: String| TlsError::Invalid {
        what: "previous CA certificate",
        path: path.to_path_buf(),
        reason,
    };
    let mut pems = Vec::new();
    for der in CertificateDer::pem_slice_iter(&bytes) {
        let der = der.map_err(|e| invalid(format!("not PEM: {e}")))?;
        rustls::RootCertStore::empty()
            .add(der.clone())
            .map_err(|e| invalid(format!("not usable as a CA: {e}")))?;
        let pem: Arc<str> = super::ca::pem_encode(&der).into();
        if !pems.contains(&pem) {
            pems.push(pem);
        }
    }
    Ok(pems)
}

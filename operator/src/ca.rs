//! The CA: a Secret with the active CA (`tls.crt`, `tls.key`) the proxy
//! signs leaf certificates with, and a ConfigMap (`ca.crt`) with every CA
//! certificate nodes must trust.
//!
//! Rotation: when the active CA expires within `rotate_before`, a new CA is
//! generated into the Secret's `next.crt`/`next.key` and published in the
//! ConfigMap next to the active one. After `overlap` it becomes the active
//! CA (the old one moves to `previous.crt`, still published); after another
//! `overlap` the old one is dropped. Nodes thus trust the new CA before the
//! proxy signs with it, and keep trusting the old one while leaf
//! certificates it signed may still be served.
//!
//! Name constraints: each CA permits only the names of the registry table
//! it was made for (the mirrored registries and the proxy's own names), so
//! its key, if it leaks, cannot impersonate any other host to the nodes.
//! When the table's names change, a next CA is made for the new names and
//! takes over through the same overlap; meanwhile the proxy signs the
//! names only the next CA permits with it (nodes trust it from the start).
//! A next CA replaced by one for newer names stays in the bundle (in the
//! Secret's `replaced.crt`, never used to sign again) for an overlap: the
//! proxy signs with it until the kubelet brings it the new Secret.
//! While the active CA is due for rotation, a pending next CA is not
//! replaced for new names: it is promoted after its overlap, then a next CA
//! for the new names follows, so frequent name changes cannot postpone the
//! rotation past the active CA's expiry.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use kube::api::PostParams;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client};

use crate::FIELD_MANAGER;
use pullthrough_api::contract::MANAGED_BY_LABEL;
use pullthrough_api::pki::{self, PermittedNames, PkiError};

pub use pullthrough_api::contract::CA_CERT_KEY as CERT_KEY;
pub use pullthrough_api::contract::CA_KEY_KEY as KEY_KEY;
pub use pullthrough_api::contract::CA_NEXT_CERT_KEY as NEXT_CERT_KEY;
pub use pullthrough_api::contract::CA_NEXT_KEY_KEY as NEXT_KEY_KEY;
pub const PREVIOUS_CERT_KEY: &str = "previous.crt";
/// Next CAs replaced (by newer names) within the last overlap, each still
/// trusted: the proxy may sign with one until it reads the new Secret.
pub const REPLACED_CERT_KEY: &str = "replaced.crt";
/// When each of [`REPLACED_CERT_KEY`]'s certificates was replaced (unix
/// seconds, comma-separated, in the same order).
pub const REPLACED_AT_ANNOTATION: &str = "pullthrough.dev/ca-replaced-at";
/// The Secret keys the CA state is made of; any other key is someone
/// else's and is kept as it is.
const STATE_KEYS: [&str; 6] = [
    CERT_KEY,
    KEY_KEY,
    NEXT_CERT_KEY,
    NEXT_KEY_KEY,
    PREVIOUS_CERT_KEY,
    REPLACED_CERT_KEY,
];
/// At most this many replaced next CAs are kept (names changing faster
/// than the overlap would otherwise grow the bundle without bound).
const MAX_REPLACED: usize = 8;
/// Key of the trust bundle in the CA ConfigMap.
/// When `next.crt` was generated (unix seconds).
pub use pullthrough_api::contract::CA_NEXT_SINCE_ANNOTATION as NEXT_SINCE_ANNOTATION;
/// When the last rotation promoted `next.crt` (unix seconds).
pub use pullthrough_api::contract::CA_ROTATED_AT_ANNOTATION as ROTATED_AT_ANNOTATION;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("generating the CA: {0}")]
    Generate(#[from] PkiError),
    /// A certificate that cannot be read; [`ensure`] names the Secret it
    /// came from (as [`CaError::Invalid`]).
    #[error("reading a CA certificate: {0}")]
    Certificate(String),
    #[error("CA Secret {secret}: {reason}")]
    Invalid { secret: String, reason: String },
}

impl CaError {
    /// Names `secret` (`<ns>/<name>`) in an error about its content, so the
    /// log says which object to fix.
    fn in_secret(self, secret: &str) -> Self {
        match self {
            Self::Certificate(reason) => Self::Invalid {
                secret: secret.to_string(),
                reason,
            },
            other => other,
        }
    }
}

/// First wait after a failed CA step.
const RETRY_FIRST: Duration = Duration::from_secs(1);

/// How long to wait before the next CA step after `failures` failed ones in
/// a row: the check interval after a success, else 1 s doubling up to the
/// interval. A conflict or an API server hiccup must not leave a CA step
/// (creation, rotation, new names) waiting a whole `--ca-check-interval`.
pub fn retry_delay(failures: u32, interval: Duration) -> Duration {
    if failures == 0 {
        return interval;
    }
    RETRY_FIRST
        .checked_mul(1 << (failures - 1).min(30))
        .unwrap_or(interval)
        .min(interval)
}

/// Rotation thresholds.
#[derive(Debug, Clone, Copy)]
pub struct CaPolicy {
    pub validity: Duration,
    pub rotate_before: Duration,
    pub overlap: Duration,
}

/// A new self-signed ECDSA P-256 CA: (cert PEM, key PEM), permitting only
/// `permitted` when given. The same CA the proxy generates for itself in
/// standalone mode (see [`pki::generate_constrained_ca`]).
pub fn generate(
    validity: Duration,
    permitted: Option<&PermittedNames>,
) -> Result<(String, String), CaError> {
    let ca = match permitted {
        Some(p) => pki::generate_constrained_ca(validity, p)?,
        None => pki::generate_ca(validity)?,
    };
    Ok((ca.cert_pem, ca.key_pem))
}

/// The name constraints of the first certificate in `pem`.
fn permitted_of(pem: &str) -> Result<Option<PermittedNames>, CaError> {
    PermittedNames::of_pem(pem).map_err(|e| CaError::Certificate(e.to_string()))
}

/// `notAfter` of the first certificate in `pem`, as unix seconds.
pub fn not_after(pem: &str) -> Result<i64, CaError> {
    pki::not_after(pem).map_err(|e| CaError::Certificate(e.to_string()))
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn text(data: &BTreeMap<String, ByteString>, key: &str) -> Option<String> {
    data.get(key)
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .filter(|s| !s.is_empty())
}

/// The CA state held in the Secret.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CaState {
    pub cert: String,
    pub key: String,
    pub next: Option<(String, String)>,
    pub next_since: Option<i64>,
    pub previous: Option<String>,
    pub rotated_at: Option<i64>,
    /// Replaced next CAs (certificate only: never used to sign again) and
    /// when each was replaced, oldest first.
    pub replaced: Vec<(String, i64)>,
}

impl CaState {
    fn from_secret(s: &Secret) -> Result<Self, CaError> {
        let data = s.data.clone().unwrap_or_default();
        let ann = s.metadata.annotations.clone().unwrap_or_default();
        let num = |k: &str| ann.get(k).and_then(|v| v.parse::<i64>().ok());
        let missing = |key: &str| CaError::Invalid {
            secret: format!(
                "{}/{}",
                s.metadata.namespace.as_deref().unwrap_or_default(),
                s.metadata.name.as_deref().unwrap_or_default()
            ),
            reason: format!("no {key}"),
        };
        Ok(Self {
            cert: text(&data, CERT_KEY).ok_or_else(|| missing(CERT_KEY))?,
            key: text(&data, KEY_KEY).ok_or_else(|| missing(KEY_KEY))?,
            next: text(&data, NEXT_CERT_KEY).zip(text(&data, NEXT_KEY_KEY)),
            next_since: num(NEXT_SINCE_ANNOTATION),
            previous: text(&data, PREVIOUS_CERT_KEY),
            rotated_at: num(ROTATED_AT_ANNOTATION),
            replaced: replaced_of(
                text(&data, REPLACED_CERT_KEY).as_deref(),
                ann.get(REPLACED_AT_ANNOTATION).map(String::as_str),
            ),
        })
    }

    fn into_secret(self, name: &str, ns: &str) -> Secret {
        let mut data = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            data.insert(k.to_string(), ByteString(v.into_bytes()));
        };
        put(CERT_KEY, self.cert);
        put(KEY_KEY, self.key);
        if let Some((c, k)) = self.next {
            put(NEXT_CERT_KEY, c);
            put(NEXT_KEY_KEY, k);
        }
        if let Some(p) = self.previous {
            put(PREVIOUS_CERT_KEY, p);
        }
        let mut ann = BTreeMap::new();
        if !self.replaced.is_empty() {
            let (certs, times): (Vec<_>, Vec<_>) = self
                .replaced
                .iter()
                .map(|(c, t)| (format!("{}\n", c.trim_end()), t.to_string()))
                .unzip();
            put(REPLACED_CERT_KEY, certs.concat());
            ann.insert(REPLACED_AT_ANNOTATION.to_string(), times.join(","));
        }
        if let Some(t) = self.next_since {
            ann.insert(NEXT_SINCE_ANNOTATION.to_string(), t.to_string());
        }
        if let Some(t) = self.rotated_at {
            ann.insert(ROTATED_AT_ANNOTATION.to_string(), t.to_string());
        }
        Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                annotations: Some(ann),
                labels: Some(BTreeMap::from([(
                    MANAGED_BY_LABEL.to_string(),
                    FIELD_MANAGER.to_string(),
                )])),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(data),
            ..Default::default()
        }
    }

    /// One rotation step at `now` (unix seconds) towards a CA that
    /// permits exactly `names` (None: keep the constraints as they are);
    /// true when changed.
    pub fn step(
        &mut self,
        now: i64,
        policy: &CaPolicy,
        names: Option<&PermittedNames>,
    ) -> Result<bool, CaError> {
        let overlap = policy.overlap.as_secs() as i64;
        let mut changed = false;
        if let Some(t) = self.rotated_at
            && now - t >= overlap
            && self.previous.is_some()
        {
            self.previous = None;
            changed = true;
        }
        let replaced = self.replaced.len();
        self.replaced.retain(|(_, at)| now - at < overlap);
        changed |= self.replaced.len() != replaced;
        // A next CA whose overlap is over is promoted before anything else:
        // a change of names below would otherwise replace it and start its
        // overlap again.
        if let Some(since) = self.next_since
            && self.next.is_some()
            && now - since >= overlap
            && let Some((c, k)) = self.next.take()
        {
            self.previous = Some(std::mem::replace(&mut self.cert, c));
            self.key = k;
            self.next_since = None;
            self.rotated_at = Some(now);
            changed = true;
        }
        let due = not_after(&self.cert)? - now < policy.rotate_before.as_secs() as i64;
        // The names changed: (re)make the next CA for the new names. A
        // next CA made for older names is replaced and its overlap starts
        // again, so nodes always trust a CA before the proxy signs with it.
        let renamed = match (names, &self.next) {
            (None, _) => false,
            (Some(want), Some((next, _))) => permitted_of(next)?.as_ref() != Some(want),
            (Some(want), None) => permitted_of(&self.cert)?.as_ref() != Some(want),
        };
        // Except while the active CA is due for rotation: names that change
        // more often than the overlap (discovery.create) would restart it
        // every time and the active CA would expire unreplaced. The pending
        // next is promoted after its overlap; the new names get their next
        // CA in that same step, so they wait at most one overlap.
        let keep_pending = due && self.next.is_some();
        if (renamed && !keep_pending) || (self.next.is_none() && due) {
            let names = names.cloned().or(permitted_of(&self.cert)?);
            let made = generate(policy.validity, names.as_ref())?;
            // The next CA it replaces stays trusted for an overlap: the
            // proxy signs with it until the kubelet brings it the new
            // Secret, and nodes must accept what it signed meanwhile.
            if let Some((old, _key)) = self.next.replace(made) {
                self.replaced.push((old.trim().to_string(), now));
                let excess = self.replaced.len().saturating_sub(MAX_REPLACED);
                self.replaced.drain(..excess);
            }
            self.next_since = Some(now);
            changed = true;
        }
        Ok(changed)
    }

    /// Every certificate nodes must trust: active, next, previous, and the
    /// next CAs replaced within the last overlap.
    pub fn bundle(&self) -> String {
        let mut out = String::new();
        let next = self.next.as_ref().map(|(c, _)| c);
        for pem in [Some(&self.cert), next, self.previous.as_ref()]
            .into_iter()
            .flatten()
            .chain(self.replaced.iter().map(|(c, _)| c))
        {
            out.push_str(pem.trim_end());
            out.push('\n');
        }
        out
    }
}

/// The replaced next CAs from the Secret: the PEMs of `certs`, each with
/// its time in `times`; what does not pair up is dropped (it is only kept
/// for trust, and is gone after an overlap anyway).
fn replaced_of(certs: Option<&str>, times: Option<&str>) -> Vec<(String, i64)> {
    let (Some(certs), Some(times)) = (certs, times) else {
        return Vec::new();
    };
    const END: &str = "-----END CERTIFICATE-----";
    let pems = certs
        .split_inclusive(END)
        .map(str::trim)
        .filter(|p| p.ends_with(END));
    pems.zip(times.split(','))
        .filter_map(|(p, t)| Some((p.to_string(), t.trim().parse().ok()?)))
        .collect()
}

/// Creates the CA Secret on first start, advances rotation, and applies the
/// trust ConfigMap. Returns the state after the step.
pub async fn ensure(
    client: &Client,
    ns: &str,
    name: &str,
    policy: &CaPolicy,
    names: Option<&PermittedNames>,
) -> Result<CaState, CaError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let now = unix(SystemTime::now());
    let state = match secrets.get_opt(name).await? {
        None => {
            let (cert, key) = generate(policy.validity, names)?;
            let state = CaState {
                cert,
                key,
                ..Default::default()
            };
            match secrets
                .create(&PostParams::default(), &state.clone().into_secret(name, ns))
                .await
            {
                Ok(_) => {
                    tracing::info!(secret = name, "generated the CA");
                    state
                }
                // Another replica won the race: use its CA.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    CaState::from_secret(&secrets.get(name).await?)?
                }
                Err(e) => return Err(e.into()),
            }
        }
        Some(secret) => {
            let read = CaState::from_secret(&secret)?;
            let mut state = read.clone();
            if state
                .step(now, policy, names)
                .map_err(|e| e.in_secret(&format!("{ns}/{name}")))?
            {
                let mut updated = state.clone().into_secret(name, ns);
                keep_foreign(&secret, &mut updated);
                updated.metadata.resource_version = secret.metadata.resource_version.clone();
                if let Err(e) = secrets
                    .replace(name, &PostParams::default(), &updated)
                    .await
                {
                    // The Secret still holds what was read, which the proxy
                    // signs with: its bundle is what nodes must trust. A
                    // bundle whose write failed after the last replace
                    // would otherwise wait for a replace that may keep
                    // failing. The step's new CA is in no Secret: not
                    // published (the next try makes another).
                    if let Err(pe) =
                        crate::publish::apply_ca_bundle(client, ns, name, &read.bundle()).await
                    {
                        tracing::warn!(error = %pe, configmap = name, "applying the CA trust bundle after a failed rotation step");
                    }
                    return Err(e.into());
                }
                tracing::info!(
                    secret = name,
                    next = state.next.is_some(),
                    previous = state.previous.is_some(),
                    "CA rotation step"
                );
            }
            state
        }
    };
    crate::publish::apply_ca_bundle(client, ns, name, &state.bundle()).await?;
    Ok(state)
}

/// Reason of the Warning Event a failing CA step records.
pub const CA_FAILED_REASON: &str = "CAFailed";

/// A Warning Event on the CA Secret `ns/name` saying why a CA step
/// failed: the log alone goes unseen, and while it fails no rotation or
/// new names happen (best effort, like every Event).
pub async fn failure_event(recorder: &Recorder, ns: &str, name: &str, error: &CaError) {
    let ev = Event {
        type_: EventType::Warning,
        reason: CA_FAILED_REASON.into(),
        note: Some(crate::status::event_note(format!(
            "CA step failed (retried with backoff): {error}"
        ))),
        action: "EnsureCA".into(),
        secondary: None,
    };
    let regarding = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Secret".into()),
        namespace: Some(ns.into()),
        name: Some(name.into()),
        ..ObjectReference::default()
    };
    if let Err(e) = recorder.publish(&ev, &regarding).await {
        tracing::warn!(error = %e, "publishing an event");
    }
}

/// A rotation step replaces the whole CA Secret: what others put on it is
/// carried over. Its type, which the API server never lets change (a
/// Secret made `Opaque`, by an admin or an older release, would refuse
/// every step); data keys besides the CA state's (a `ca.crt` some tool
/// reads); labels and annotations (a backup selector, a policy engine's
/// marks), ours (`pullthrough.dev/...`) as the new state says.
fn keep_foreign(old: &Secret, new: &mut Secret) {
    if old.type_.is_some() {
        new.type_ = old.type_.clone();
    }
    let data = new.data.get_or_insert_default();
    for (k, v) in old.data.iter().flatten() {
        if !STATE_KEYS.contains(&k.as_str()) {
            data.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    let annotations = new.metadata.annotations.get_or_insert_default();
    for (k, v) in old.metadata.annotations.iter().flatten() {
        if !k.starts_with("pullthrough.dev/") {
            annotations.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    let labels = new.metadata.labels.get_or_insert_default();
    for (k, v) in old.metadata.labels.iter().flatten() {
        labels.entry(k.clone()).or_insert_with(|| v.clone());
    }
    new.metadata.owner_references = old.metadata.owner_references.clone();
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn failed_steps_back_off_from_a_second_to_the_interval() {
        let hour = Duration::from_secs(3600);
        let delays: Vec<u64> = (0..15).map(|f| retry_delay(f, hour).as_secs()).collect();
        assert_eq!(
            delays,
            [
                3600, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 3600, 3600
            ]
        );
        assert_eq!(retry_delay(u32::MAX, hour), hour, "no overflow");
        let short = Duration::from_millis(500);
        assert_eq!(retry_delay(1, short), short, "never beyond the interval");
    }

    #[test]
    fn invalid_secret_content_names_the_secret() {
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some("pullthrough-ca".into()),
                namespace: Some("pullthrough".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let e = CaState::from_secret(&secret).unwrap_err().to_string();
        assert_eq!(e, "CA Secret pullthrough/pullthrough-ca: no tls.crt");
        let e = not_after("not a certificate")
            .unwrap_err()
            .in_secret("pullthrough/pullthrough-ca")
            .to_string();
        assert!(
            e.starts_with("CA Secret pullthrough/pullthrough-ca: "),
            "{e}"
        );
    }

    /// A policy (validity 1000 s, rotate 50 s before the end, 10 s
    /// overlap) and a state whose CA ends in 100 s: its certificate, its
    /// end (unix seconds) and the state.
    fn about_to_rotate() -> (CaPolicy, String, i64, CaState) {
        let policy = CaPolicy {
            validity: Duration::from_secs(1000),
            rotate_before: Duration::from_secs(50),
            overlap: Duration::from_secs(10),
        };
        let (cert, key) = generate(Duration::from_secs(100), None).unwrap();
        let exp = not_after(&cert).unwrap();
        let state = CaState {
            cert: cert.clone(),
            key,
            ..Default::default()
        };
        (policy, cert, exp, state)
    }

    #[test]
    fn rotation_publishes_both_then_promotes_then_drops() {
        let (policy, cert, exp, mut s) = about_to_rotate();
        let now = exp - 90;
        assert!(!s.step(now, &policy, None).unwrap());
        assert_eq!(s.bundle().matches("BEGIN CERTIFICATE").count(), 1);
        // Within rotate_before: a next CA, both published, old still active.
        assert!(s.step(exp - 40, &policy, None).unwrap());
        assert_eq!(s.cert, cert);
        assert_eq!(s.bundle().matches("BEGIN CERTIFICATE").count(), 2);
        assert!(!s.step(exp - 35, &policy, None).unwrap());
        // After the overlap: promoted, old one still published.
        assert!(s.step(exp - 30, &policy, None).unwrap());
        assert_ne!(s.cert, cert);
        assert_eq!(s.previous.as_deref(), Some(cert.as_str()));
        assert_eq!(s.bundle().matches("BEGIN CERTIFICATE").count(), 2);
        // After another overlap: the old one is gone.
        assert!(s.step(exp - 20, &policy, None).unwrap());
        assert_eq!(s.bundle().matches("BEGIN CERTIFICATE").count(), 1);
    }

    /// After a promotion the old CA is only in the Secret's `previous.crt`
    /// (and its promotion time in an annotation): read back, the state
    /// still trusts it until an overlap after the promotion. Otherwise the
    /// next check would drop it from the bundle at once, while the proxy
    /// may still serve leaf certificates it signed.
    #[test]
    fn previous_ca_survives_the_secret_round_trip() {
        let (policy, cert, exp, mut s) = about_to_rotate();
        assert!(s.step(exp - 40, &policy, None).unwrap());
        assert!(s.step(exp - 30, &policy, None).unwrap());
        assert_eq!(s.previous.as_deref(), Some(cert.as_str()));
        assert_eq!(s.rotated_at, Some(exp - 30));
        let secret = s.clone().into_secret("pullthrough-ca", "pullthrough");
        let mut read = CaState::from_secret(&secret).unwrap();
        assert_eq!(read, s, "the Secret lost part of the state");
        assert!(
            read.bundle().contains(cert.trim()),
            "the old CA left the bundle at its promotion"
        );
        // A check within the overlap keeps it; the one after drops it.
        assert!(!read.step(exp - 21, &policy, None).unwrap());
        assert!(read.bundle().contains(cert.trim()));
        let secret = read.clone().into_secret("pullthrough-ca", "pullthrough");
        let mut read = CaState::from_secret(&secret).unwrap();
        assert!(read.step(exp - 20, &policy, None).unwrap());
        assert!(!read.bundle().contains(cert.trim()));
    }

    /// Names that change every half overlap (discovery.create adding
    /// registries) must not postpone the rotation: once the active CA is
    /// due, the pending next is kept through its overlap and promoted well
    /// before the active one expires, and the newest names get a next CA in
    /// the same step.
    #[test]
    fn frequent_name_changes_do_not_postpone_rotation() {
        let policy = CaPolicy {
            validity: Duration::from_secs(10_000),
            rotate_before: Duration::from_secs(50),
            overlap: Duration::from_secs(10),
        };
        let names = |i: i64| PermittedNames::new(["quay.io".to_string(), format!("r{i}.io")], []);
        let (cert, key) = generate(Duration::from_secs(100), Some(&names(0))).unwrap();
        let exp = not_after(&cert).unwrap();
        let mut s = CaState {
            cert: cert.clone(),
            key,
            ..Default::default()
        };
        let mut promoted_at = None;
        for (i, now) in (exp - 100..exp).step_by(5).enumerate() {
            let want = names(i as i64 + 1);
            s.step(now, &policy, Some(&want)).unwrap();
            if s.cert != cert && promoted_at.is_none() {
                promoted_at = Some(now);
                assert_eq!(s.previous.as_deref(), Some(cert.as_str()));
            }
            assert!(
                not_after(&s.cert).unwrap() > now,
                "the active CA expired at {now} (notAfter {exp})"
            );
        }
        let promoted_at = promoted_at.expect("the active CA was never replaced");
        assert!(
            promoted_at <= exp - 50 + 10 + 5,
            "promoted {} s before expiry",
            exp - promoted_at
        );
        // The last names are permitted by the next CA (or the active one).
        let last = names(20);
        let next = s.next.as_ref().map(|(c, _)| permitted_of(c).unwrap());
        assert!(
            next == Some(Some(last.clone())) || permitted_of(&s.cert).unwrap() == Some(last),
            "the newest names have no CA"
        );
    }

    /// A change of the table's names makes a next CA for the new names
    /// (trusted by nodes at once, promoted after the overlap); a second
    /// change during the overlap replaces it and restarts the overlap,
    /// the replaced one staying trusted for an overlap; an unchanged set
    /// changes nothing.
    #[test]
    fn new_names_rotate_to_a_ca_that_permits_them() {
        let policy = CaPolicy {
            validity: Duration::from_secs(10_000),
            rotate_before: Duration::from_secs(50),
            overlap: Duration::from_secs(10),
        };
        let quay = PermittedNames::new(["quay.io"], []);
        let both = PermittedNames::new(["quay.io", "ghcr.io"], []);
        let three = PermittedNames::new(["quay.io", "ghcr.io", "gcr.io"], []);
        let (cert, key) = generate(policy.validity, Some(&quay)).unwrap();
        let mut s = CaState {
            cert: cert.clone(),
            key,
            ..Default::default()
        };
        let now = 1_000;
        assert!(!s.step(now, &policy, Some(&quay)).unwrap());
        assert!(!s.step(now, &policy, None).unwrap());
        assert!(s.step(now, &policy, Some(&both)).unwrap());
        let (next, _) = s.next.clone().unwrap();
        assert_eq!(permitted_of(&next).unwrap(), Some(both.clone()));
        assert_eq!(s.cert, cert, "the current CA stays until the overlap ends");
        assert_eq!(s.bundle().matches("BEGIN CERTIFICATE").count(), 2);
        assert!(!s.step(now + 1, &policy, Some(&both)).unwrap());
        // Changed again during the overlap: a new next, the overlap restarts.
        assert!(s.step(now + 5, &policy, Some(&three)).unwrap());
        assert_ne!(s.next.as_ref().unwrap().0, next);
        // The replaced next stays trusted (not used to sign) for an
        // overlap: the proxy signs with it until the kubelet refreshes its
        // Secret volume, and nodes must accept what it signed meanwhile.
        let trusted = |s: &CaState, pem: &str| s.bundle().contains(pem.trim());
        assert!(trusted(&s, &next), "the replaced next CA left the bundle");
        assert_eq!(s.bundle().matches("BEGIN CERTIFICATE").count(), 3);
        let secret = s.clone().into_secret("pullthrough-ca", "pullthrough");
        assert_eq!(
            CaState::from_secret(&secret).unwrap(),
            s,
            "kept in the Secret"
        );
        assert!(!s.step(now + 12, &policy, Some(&three)).unwrap());
        assert!(trusted(&s, &next));
        assert!(s.step(now + 15, &policy, Some(&three)).unwrap());
        assert_eq!(permitted_of(&s.cert).unwrap(), Some(three.clone()));
        assert_eq!(s.previous.as_deref(), Some(cert.as_str()));
        // An overlap after it was replaced, the replaced next is dropped.
        assert!(!trusted(&s, &next), "the replaced next CA is kept for ever");
        assert_eq!(s.bundle().matches("BEGIN CERTIFICATE").count(), 2);
        // An unconstrained CA (made before constraints existed) is replaced.
        let (cert, key) = generate(policy.validity, None).unwrap();
        let mut old = CaState {
            cert,
            key,
            ..Default::default()
        };
        assert!(old.step(now, &policy, Some(&quay)).unwrap());
        assert_eq!(
            permitted_of(&old.next.unwrap().0).unwrap(),
            Some(quay.clone())
        );
    }
}

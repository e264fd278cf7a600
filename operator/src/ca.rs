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

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::{Api, Client};

use crate::FIELD_MANAGER;
use pullthrough_api::contract::MANAGED_BY_LABEL;
use pullthrough_api::pki::{self, PkiError};

pub use pullthrough_api::contract::CA_CERT_KEY as CERT_KEY;
pub use pullthrough_api::contract::CA_KEY_KEY as KEY_KEY;
pub use pullthrough_api::contract::CA_NEXT_CERT_KEY as NEXT_CERT_KEY;
pub use pullthrough_api::contract::CA_NEXT_KEY_KEY as NEXT_KEY_KEY;
pub const PREVIOUS_CERT_KEY: &str = "previous.crt";
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
    #[error("CA Secret: {0}")]
    Invalid(String),
}

/// Rotation thresholds.
#[derive(Debug, Clone, Copy)]
pub struct CaPolicy {
    pub validity: Duration,
    pub rotate_before: Duration,
    pub overlap: Duration,
}

/// A new self-signed ECDSA P-256 CA: (cert PEM, key PEM). The same CA the
/// proxy generates for itself in standalone mode (see [`pki::generate_ca`]).
pub fn generate(validity: Duration) -> Result<(String, String), CaError> {
    let ca = pki::generate_ca(validity)?;
    Ok((ca.cert_pem, ca.key_pem))
}

/// `notAfter` of the first certificate in `pem`, as unix seconds.
pub fn not_after(pem: &str) -> Result<i64, CaError> {
    pki::not_after(pem).map_err(|e| CaError::Invalid(e.to_string()))
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
}

impl CaState {
    fn from_secret(s: &Secret) -> Result<Self, CaError> {
        let data = s.data.clone().unwrap_or_default();
        let ann = s.metadata.annotations.clone().unwrap_or_default();
        let num = |k: &str| ann.get(k).and_then(|v| v.parse::<i64>().ok());
        Ok(Self {
            cert: text(&data, CERT_KEY).ok_or_else(|| CaError::Invalid("no tls.crt".into()))?,
            key: text(&data, KEY_KEY).ok_or_else(|| CaError::Invalid("no tls.key".into()))?,
            next: text(&data, NEXT_CERT_KEY).zip(text(&data, NEXT_KEY_KEY)),
            next_since: num(NEXT_SINCE_ANNOTATION),
            previous: text(&data, PREVIOUS_CERT_KEY),
            rotated_at: num(ROTATED_AT_ANNOTATION),
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

    /// One rotation step at `now` (unix seconds); true when changed.
    pub fn step(&mut self, now: i64, policy: &CaPolicy) -> Result<bool, CaError> {
        let overlap = policy.overlap.as_secs() as i64;
        let mut changed = false;
        if let Some(t) = self.rotated_at
            && now - t >= overlap
            && self.previous.is_some()
        {
            self.previous = None;
            changed = true;
        }
        if self.next.is_none()
            && not_after(&self.cert)? - now < policy.rotate_before.as_secs() as i64
        {
            self.next = Some(generate(policy.validity)?);
            self.next_since = Some(now);
            changed = true;
        } else if let Some(since) = self.next_since
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
        Ok(changed)
    }

    /// Every certificate nodes must trust: active, next, previous.
    pub fn bundle(&self) -> String {
        let mut out = String::new();
        let next = self.next.as_ref().map(|(c, _)| c);
        for pem in [Some(&self.cert), next, self.previous.as_ref()]
            .into_iter()
            .flatten()
        {
            out.push_str(pem.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Creates the CA Secret on first start, advances rotation, and applies the
/// trust ConfigMap. Returns the state after the step.
pub async fn ensure(
    client: &Client,
    ns: &str,
    name: &str,
    policy: &CaPolicy,
) -> Result<CaState, CaError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let now = unix(SystemTime::now());
    let state = match secrets.get_opt(name).await? {
        None => {
            let (cert, key) = generate(policy.validity)?;
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
            let mut state = CaState::from_secret(&secret)?;
            if state.step(now, policy)? {
                let mut updated = state.clone().into_secret(name, ns);
                updated.metadata.resource_version = secret.metadata.resource_version.clone();
                secrets
                    .replace(name, &PostParams::default(), &updated)
                    .await?;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rotation_publishes_both_then_promotes_then_drops() {
        let policy = CaPolicy {
            validity: Duration::from_secs(1000),
            rotate_before: Duration::from_secs(50),
            overlap: Duration::from_secs(10),
        };
        let (cert, key) = generate(Duration::from_secs(100)).unwrap();
        let exp = not_after(&cert).unwrap();
        let mut s = CaState {
            cert: cert.clone(),
            key,
            ..Default::default()
        };
        let now = exp - 90;
        assert!(!s.step(now, &policy).unwrap());
        assert_eq!(s.bundle().matches("BEGIN CERTIFICATE").count(), 1);
        // Within rotate_before: a next CA, both published, old still active.
        assert!(s.step(exp - 40, &policy).unwrap());
        assert_eq!(s.cert, cert);
        assert_eq!(s.bundle().matches("BEGIN CERTIFICATE").count(), 2);
        assert!(!s.step(exp - 35, &policy).unwrap());
        // After the overlap: promoted, old one still published.
        assert!(s.step(exp - 30, &policy).unwrap());
        assert_ne!(s.cert, cert);
        assert_eq!(s.previous.as_deref(), Some(cert.as_str()));
        assert_eq!(s.bundle().matches("BEGIN CERTIFICATE").count(), 2);
        // After another overlap: the old one is gone.
        assert!(s.step(exp - 20, &policy).unwrap());
        assert_eq!(s.bundle().matches("BEGIN CERTIFICATE").count(), 1);
    }
}

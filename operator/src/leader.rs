//! Lease-based leader election: one replica reconciles, the others wait.
//! kube 5 ships no helper, so this is the classic acquire/renew loop with
//! optimistic concurrency (resourceVersion) on a `coordination.k8s.io` Lease.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

/// One replica's view of the leader Lease.
#[derive(Clone)]
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl LeaderElector {
    pub fn new(client: Client, ns: &str, name: &str, identity: &str, duration: Duration) -> Self {
        Self {
            api: Api::namespaced(client, ns),
            name: name.into(),
            identity: identity.into(),
            duration,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn secs(&self) -> i32 {
        i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// Acquires or renews; `Ok(true)` while this replica is the leader.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(self.secs()),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if conflict(&e) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let held = spec
            .holder_identity
            .as_deref()
            .is_some_and(|h| !h.is_empty());
        let expired = spec.renew_time.as_ref().is_none_or(|t| {
            let d = i64::from(spec.lease_duration_seconds.unwrap_or(self.secs()));
            t.0.as_second() + d < now.0.as_second()
        });
        if !mine && held && !expired {
            return Ok(false);
        }
        if !mine {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.lease_duration_seconds = Some(self.secs());
        spec.renew_time = Some(now);
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up (on clean shutdown) so another replica takes over
    /// at once.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        if let Err(e) = self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            tracing::warn!(error = %e, "releasing the leader Lease");
        }
    }

    /// Waits until this replica is the leader (or `stop` fires: `false`).
    /// `reachable` tells whether the last Lease round trip succeeded: a
    /// standby that cannot reach the API server could not take over, so it
    /// is not ready.
    pub async fn acquire(
        &self,
        stop: &mut tokio::sync::watch::Receiver<bool>,
        reachable: &AtomicBool,
    ) -> bool {
        let retry = (self.duration / 3).max(Duration::from_millis(200));
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    reachable.store(true, Ordering::Relaxed);
                    return true;
                }
                Ok(false) => reachable.store(true, Ordering::Relaxed),
                Err(e) => {
                    reachable.store(false, Ordering::Relaxed);
                    tracing::warn!(error = %e, "leader election");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(retry) => {}
                _ = stop.wait_for(|s| *s) => return false,
            }
        }
    }

    /// Renews until `stop` fires (returns) or renewal keeps failing for a
    /// whole Lease duration (returns: leadership lost).
    pub async fn keep(
        &self,
        stop: &mut tokio::sync::watch::Receiver<bool>,
        reachable: &AtomicBool,
    ) -> bool {
        let every = (self.duration / 3).max(Duration::from_millis(200));
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.wait_for(|s| *s) => return true,
            }
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    last_ok = tokio::time::Instant::now();
                    reachable.store(true, Ordering::Relaxed);
                }
                Ok(false) => return false,
                Err(e) => {
                    reachable.store(false, Ordering::Relaxed);
                    tracing::warn!(error = %e, "renewing the leader Lease");
                    if last_ok.elapsed() >= self.duration {
                        return false;
                    }
                }
            }
        }
    }
}

//! Lease-based leader election: one replica reconciles, the others wait.
//! kube 5 ships no helper, so this is the classic acquire/renew loop with
//! optimistic concurrency (resourceVersion) on a `coordination.k8s.io` Lease.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::time::Instant;

/// One replica's view of the leader Lease.
#[derive(Clone)]
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// When the last successful acquire or renew *began*: the renewTime it
    /// wrote is no earlier, so the Lease is ours until at least this plus
    /// the duration.
    renewed: Arc<Mutex<Option<Instant>>>,
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
            renewed: Arc::default(),
        }
    }

    /// How long after its last successful renewal the leader keeps
    /// reconciling without another: two thirds of the Lease (client-go's
    /// 10 s of 15 s), leaving the rest for in-flight work to stop before a
    /// standby may take the Lease over.
    pub fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    /// How long a leader that lost its Lease may wait for in-flight
    /// reconciles before it exits anyway: the part of the Lease
    /// [`renew_deadline`](Self::renew_deadline) leaves.
    pub fn step_down_grace(&self) -> Duration {
        self.duration.saturating_sub(self.renew_deadline())
    }

    fn last_renewed(&self) -> Option<Instant> {
        self.renewed.lock().ok().and_then(|r| *r)
    }

    fn set_renewed(&self, at: Instant) {
        if let Ok(mut r) = self.renewed.lock() {
            *r = Some(at);
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
            let start = Instant::now();
            // Bounded: a Lease written by an attempt that took longer than
            // the renew deadline would be stale before it is used.
            match tokio::time::timeout(self.renew_deadline(), self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => {
                    reachable.store(true, Ordering::Relaxed);
                    self.set_renewed(start);
                    return true;
                }
                Ok(Ok(false)) => reachable.store(true, Ordering::Relaxed),
                Ok(Err(e)) => {
                    reachable.store(false, Ordering::Relaxed);
                    tracing::warn!(error = %e, "leader election");
                }
                Err(_) => {
                    reachable.store(false, Ordering::Relaxed);
                    tracing::warn!(timeout = ?self.renew_deadline(), "leader election: no answer from the API server");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(retry) => {}
                _ = stop.wait_for(|s| *s) => return false,
            }
        }
    }

    /// Renews until `stop` fires (returns `true`) or the Lease is lost
    /// (returns `false`): another replica holds it, or no renewal succeeded
    /// within [`renew_deadline`](Self::renew_deadline) of the last one.
    /// Each renewal is bounded by the time left, so an API server that
    /// never answers cannot keep this replica reconciling after a standby
    /// took the Lease over.
    pub async fn keep(
        &self,
        stop: &mut tokio::sync::watch::Receiver<bool>,
        reachable: &AtomicBool,
    ) -> bool {
        let every = (self.duration / 3).max(Duration::from_millis(200));
        let mut last_ok = self.last_renewed().unwrap_or_else(Instant::now);
        loop {
            let deadline = last_ok + self.renew_deadline();
            tokio::select! {
                _ = tokio::time::sleep_until((Instant::now() + every).min(deadline)) => {}
                _ = stop.wait_for(|s| *s) => return true,
            }
            let start = Instant::now();
            if start >= deadline {
                reachable.store(false, Ordering::Relaxed);
                tracing::error!(since = ?start - last_ok, "the leader Lease was not renewed in time");
                return false;
            }
            match tokio::time::timeout_at(deadline, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => {
                    last_ok = start;
                    self.set_renewed(start);
                    reachable.store(true, Ordering::Relaxed);
                }
                Ok(Ok(false)) => return false,
                Ok(Err(e)) => {
                    reachable.store(false, Ordering::Relaxed);
                    tracing::warn!(error = %e, "renewing the leader Lease");
                }
                Err(_) => {
                    reachable.store(false, Ordering::Relaxed);
                    tracing::error!(since = ?start - last_ok, "renewing the leader Lease: no answer from the API server in time");
                    return false;
                }
            }
        }
    }
}

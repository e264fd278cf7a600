//! The per-node report: a Lease `<ns>/<prefix><node>` whose annotations
//! carry the applied table hash, runtimes, registries and last error,
//! renewed on a schedule and whenever any of them changes
//! (docs/cluster-contract.md).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use pullthrough_api::contract::{
    AGENT_COMPONENT, AGENT_FIELD_MANAGER, COMPONENT_LABEL, CONFIG_HASH_ANNOTATION,
    LAST_ERROR_ANNOTATION, REGISTRIES_ANNOTATION, RUNTIME_ANNOTATION,
};

/// A failed renewal is retried this soon.
const RETRY: Duration = Duration::from_secs(5);
/// Annotation values may be any length; a screenful is enough to read.
const MAX_ERROR_CHARS: usize = 1024;

/// What was last applied successfully.
#[derive(Debug, Clone, Default)]
pub(super) struct Applied {
    pub hash: String,
    pub runtimes: Vec<String>,
    pub registries: Vec<String>,
}

/// This node's Lease and when it is due.
pub(super) struct Reporter {
    api: Api<Lease>,
    name: String,
    node: String,
    renew: Duration,
    duration: Duration,
    next: Instant,
    dirty: bool,
}

impl Reporter {
    pub(super) fn new(
        api: Api<Lease>,
        name: String,
        node: String,
        renew: Duration,
        duration: Duration,
    ) -> Self {
        Self {
            api,
            name,
            node,
            renew,
            duration,
            next: Instant::now(),
            dirty: true,
        }
    }

    /// Something reported changed: write the Lease on the next tick.
    pub(super) fn changed(&mut self) {
        self.dirty = true;
    }

    /// Writes the Lease when something changed or the renewal is due.
    pub(super) async fn tick(&mut self, applied: Option<&Applied>, error: Option<&str>) {
        if !self.dirty && Instant::now() < self.next {
            return;
        }
        self.dirty = false;
        match self.renew_lease(applied, error).await {
            Ok(()) => self.next = Instant::now() + self.renew,
            Err(e) => {
                tracing::warn!(lease = %self.name, error = %e, "Lease {}: {e}", self.name);
                self.next = Instant::now() + RETRY;
            }
        }
    }

    async fn renew_lease(
        &self,
        applied: Option<&Applied>,
        error: Option<&str>,
    ) -> Result<(), kube::Error> {
        let mut ann = BTreeMap::new();
        if let Some(a) = applied {
            ann.insert(CONFIG_HASH_ANNOTATION.to_string(), a.hash.clone());
            ann.insert(RUNTIME_ANNOTATION.to_string(), a.runtimes.join(","));
            ann.insert(REGISTRIES_ANNOTATION.to_string(), a.registries.join(","));
        } else {
            ann.insert(REGISTRIES_ANNOTATION.to_string(), String::new());
        }
        let err: String = error
            .unwrap_or_default()
            .chars()
            .take(MAX_ERROR_CHARS)
            .collect();
        ann.insert(LAST_ERROR_ANNOTATION.to_string(), err);
        let now = MicroTime(Timestamp::now());
        let duration = i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX);
        let pp = PostParams {
            field_manager: Some(AGENT_FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        match self.api.get_opt(&self.name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        annotations: Some(ann),
                        labels: Some(BTreeMap::from([(
                            COMPONENT_LABEL.to_string(),
                            AGENT_COMPONENT.to_string(),
                        )])),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.node.clone()),
                        lease_duration_seconds: Some(duration),
                        acquire_time: Some(now.clone()),
                        renew_time: Some(now),
                        ..LeaseSpec::default()
                    }),
                };
                self.api.create(&pp, &lease).await?;
            }
            Some(mut lease) => {
                let mut all = lease.metadata.annotations.take().unwrap_or_default();
                all.extend(ann);
                lease.metadata.annotations = Some(all);
                let mut spec = lease.spec.take().unwrap_or_default();
                spec.holder_identity = Some(self.node.clone());
                spec.lease_duration_seconds = Some(duration);
                spec.renew_time = Some(now);
                lease.spec = Some(spec);
                self.api.replace(&self.name, &pp, &lease).await?;
            }
        }
        Ok(())
    }
}

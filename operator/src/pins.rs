//! Pinning: what the cluster runs, and what a rollback would run, stays in
//! the proxy's cache. The operator watches Pods and ReplicaSets and keeps
//! the pins ConfigMap (`pins.json`, see `pullthrough_api::pins`) listing
//!
//! - every image of every pod that is not finished: the digest kubelet
//!   reports (`imageID`) once the container started, else the spec's
//!   reference (a pod still pulling);
//! - every image of the last `revisions` ReplicaSets of each Deployment
//!   (by `deployment.kubernetes.io/revision`), scaled to zero or not.
//!
//! Every proxy replica mounts the ConfigMap and keeps what it names.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, PodSpec};
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use pullthrough_api::contract::MANAGED_BY_LABEL;
use pullthrough_api::pins::{PINS_KEY, PinnedImage, Pins};
use serde_json::json;
use tokio::sync::watch;

use crate::FIELD_MANAGER;

/// The annotation the Deployment controller numbers ReplicaSets with.
const REVISION: &str = "deployment.kubernetes.io/revision";

/// Changes are gathered this long before the pins are computed again
/// (a rollout changes many pods at once).
const SETTLE: Duration = Duration::from_secs(2);

/// The pins of `pods` and of the last `revisions` ReplicaSets of each
/// Deployment.
pub fn pins_of<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    replica_sets: impl IntoIterator<Item = &'a ReplicaSet>,
    revisions: usize,
) -> Pins {
    let mut images = BTreeSet::new();
    let mut add = |r: &str| {
        if let Some(p) = PinnedImage::parse(r) {
            images.insert(p.to_string());
        }
    };
    for pod in pods {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            continue;
        }
        let Some(spec) = &pod.spec else { continue };
        // Per container name: the digest it runs, when known.
        let mut running: BTreeMap<&str, &str> = BTreeMap::new();
        if let Some(st) = &pod.status {
            for cs in st
                .container_statuses
                .iter()
                .flatten()
                .chain(st.init_container_statuses.iter().flatten())
            {
                if !cs.image_id.is_empty() && PinnedImage::parse(&cs.image_id).is_some() {
                    running.insert(&cs.name, &cs.image_id);
                }
            }
        }
        for (name, image) in spec_images(spec) {
            add(running.get(name).copied().unwrap_or(image));
        }
    }
    // Per Deployment (owner uid): (revision, ReplicaSet).
    let mut owned: BTreeMap<&str, Vec<(u64, &ReplicaSet)>> = BTreeMap::new();
    for rs in replica_sets {
        let Some(owner) = rs
            .owner_references()
            .iter()
            .find(|o| o.kind == "Deployment" && o.controller == Some(true))
        else {
            continue;
        };
        let revision = rs
            .annotations()
            .get(REVISION)
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        owned.entry(&owner.uid).or_default().push((revision, rs));
    }
    for (_, mut sets) in owned {
        sets.sort_by_key(|s| std::cmp::Reverse(s.0));
        for (_, rs) in sets.into_iter().take(revisions) {
            let spec = rs
                .spec
                .as_ref()
                .and_then(|s| s.template.as_ref())
                .and_then(|t| t.spec.as_ref());
            for (_, image) in spec.into_iter().flat_map(spec_images) {
                add(image);
            }
        }
    }
    Pins { images }
}

/// (container name, image) of every container and init container.
fn spec_images(spec: &PodSpec) -> impl Iterator<Item = (&str, &str)> {
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .filter_map(|c| Some((c.name.as_str(), c.image.as_deref()?)))
}

/// Keeps `name` (in `namespace`) holding the pins of the cluster's Pods and
/// ReplicaSets until `stop`.
pub async fn run(
    client: Client,
    namespace: String,
    name: String,
    revisions: usize,
    mut stop: watch::Receiver<bool>,
) {
    let (pods, pods_w) = reflector::store::<Pod>();
    let (sets, sets_w) = reflector::store::<ReplicaSet>();
    let (changed_tx, mut changed) = watch::channel(());
    let pod_events = {
        let tx = changed_tx.clone();
        watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .reflect(pods_w)
            .applied_objects()
            .for_each(move |r| {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "watching Pods for pins");
                }
                let _ = tx.send(());
                async {}
            })
    };
    let set_events = {
        let tx = changed_tx;
        watcher(
            Api::<ReplicaSet>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect(sets_w)
        .applied_objects()
        .for_each(move |r| {
            if let Err(e) = r {
                tracing::warn!(error = %e, "watching ReplicaSets for pins");
            }
            let _ = tx.send(());
            async {}
        })
    };
    let api = Api::<ConfigMap>::namespaced(client, &namespace);
    let publish = async {
        // Deletions surface only through the stores: wait for both lists.
        let _ = tokio::join!(pods.wait_until_ready(), sets.wait_until_ready());
        let mut last: Option<Pins> = None;
        loop {
            let now = compute(&pods, &sets, revisions);
            if last.as_ref() != Some(&now) {
                match write(&api, &name, &now).await {
                    Ok(()) => {
                        tracing::info!(configmap = %name, images = now.images.len(), "pins published");
                        last = Some(now);
                    }
                    Err(e) => tracing::warn!(configmap = %name, error = %e, "publishing the pins"),
                }
            }
            // On any change, or every minute (a failed write is retried).
            let _ = tokio::time::timeout(Duration::from_secs(60), changed.changed()).await;
            tokio::time::sleep(SETTLE).await;
        }
    };
    tokio::select! {
        _ = pod_events => {}
        _ = set_events => {}
        () = publish => {}
        _ = stop.wait_for(|s| *s) => {}
    }
}

fn compute(pods: &Store<Pod>, sets: &Store<ReplicaSet>, revisions: usize) -> Pins {
    let pods = pods.state();
    let sets = sets.state();
    pins_of(
        pods.iter().map(|p| p.as_ref()),
        sets.iter().map(|s| s.as_ref()),
        revisions,
    )
}

async fn write(api: &Api<ConfigMap>, name: &str, pins: &Pins) -> Result<(), kube::Error> {
    let body = serde_json::to_string(pins).map_err(kube::Error::SerdeError)?;
    let cm = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "labels": { MANAGED_BY_LABEL: FIELD_MANAGER },
        },
        "data": { PINS_KEY: body },
    });
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(cm),
    )
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn pod(phase: &str, images: &[(&str, &str)], ids: &[(&str, &str)]) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "n"},
            "spec": {"containers": images.iter().map(|(n, i)| json!({"name": n, "image": i})).collect::<Vec<_>>()},
            "status": {
                "phase": phase,
                "containerStatuses": ids.iter().map(|(n, id)| json!({
                    "name": n, "image": "", "imageID": id, "ready": true, "restartCount": 0
                })).collect::<Vec<_>>(),
            },
        }))
        .unwrap()
    }

    fn rs(owner: &str, revision: u32, image: &str) -> ReplicaSet {
        serde_json::from_value(json!({
            "metadata": {
                "name": format!("{owner}-{revision}"),
                "namespace": "n",
                "annotations": {REVISION: revision.to_string()},
                "ownerReferences": [{
                    "apiVersion": "apps/v1", "kind": "Deployment", "name": owner,
                    "uid": format!("uid-{owner}"), "controller": true,
                }],
            },
            "spec": {
                "selector": {},
                "template": {"spec": {"containers": [{"name": "c", "image": image}]}},
            },
        }))
        .unwrap()
    }

    #[test]
    fn running_pods_pin_the_digest_they_run_and_pulling_ones_their_reference() {
        let running = pod(
            "Running",
            &[("app", "nginx:1.25"), ("side", "quay.io/a/side:2")],
            &[("app", &format!("docker.io/library/nginx@{D1}"))],
        );
        let dockerd = pod(
            "Running",
            &[("x", "busybox")],
            &[("x", &format!("docker-pullable://busybox@{D2}"))],
        );
        let done = pod("Succeeded", &[("job", "quay.io/a/job:1")], &[]);
        let pins = pins_of([&running, &dockerd, &done], [], 2);
        assert_eq!(
            pins.images.into_iter().collect::<Vec<_>>(),
            vec![
                format!("docker.io/library/busybox@{D2}"),
                format!("docker.io/library/nginx@{D1}"),
                "quay.io/a/side:2".to_string(),
            ]
        );
    }

    #[test]
    fn the_last_revisions_of_each_deployment_are_pinned() {
        let sets = [
            rs("web", 1, "web:1"),
            rs("web", 3, "web:3"),
            rs("web", 2, "web:2"),
            rs("api", 7, "api:7"),
        ];
        let pins = pins_of([], &sets, 2);
        assert_eq!(
            pins.images.into_iter().collect::<Vec<_>>(),
            vec![
                "docker.io/library/api:7",
                "docker.io/library/web:2",
                "docker.io/library/web:3",
            ]
        );
    }
}

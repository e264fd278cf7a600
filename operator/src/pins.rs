//! Pinning: what the cluster runs, and what a rollback would run, stays in
//! the proxy's cache. The operator watches Pods and ReplicaSets and keeps
//! the pins ConfigMap (`pins.json`, see `pullthrough_api::pins`) listing
//!
//! - every image of every pod that is not finished: the digest kubelet
//!   reports (`imageID`) once the container started, else the spec's
//!   reference (a pod still pulling);
//! - every image of the last `revisions` ReplicaSets of each Deployment
//!   (by `deployment.kubernetes.io/revision`), scaled to zero or not;
//! - every image of each DaemonSet's and StatefulSet's pod template;
//! - each MirrorRegistry's `spec.prefetch`;
//!
//! and the `os/arch[/variant]` of the cluster's nodes. Every proxy replica
//! mounts the ConfigMap, keeps what it names and fetches what it does not
//! hold yet (for those platforms): a new template's images reach the cache
//! while the rollout starts, before its pods reach most nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Node, ObjectReference, Pod, PodSpec};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, ResourceExt};
use pullthrough_api::contract::MANAGED_BY_LABEL;
use pullthrough_api::crd::MirrorRegistry;
use pullthrough_api::pins::{PINS_KEY, PinnedImage, Pins};
use serde_json::json;
use tokio::sync::watch;

use crate::FIELD_MANAGER;
use crate::metrics::Metrics;
use crate::reserved::ReservedNames;

mod stores;
pub use stores::Slim;
use stores::reflect;

/// The annotation the Deployment controller numbers ReplicaSets with.
const REVISION: &str = "deployment.kubernetes.io/revision";

/// The pins document is kept under this size: a ConfigMap holds at most
/// 1 MiB in all, and the API server refuses a larger one (422), which
/// would freeze the pins at the last document that fit.
pub const MAX_PINS_BYTES: usize = 900 * 1024;

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
    let mut images = pod_images(pods);
    images.extend(
        revision_images(replica_sets, revisions)
            .into_iter()
            .flatten(),
    );
    Pins {
        images,
        platforms: BTreeSet::new(),
    }
}

/// What the pods that have not finished run: the digest kubelet reports
/// once a container started, else the spec's reference.
pub fn pod_images<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> BTreeSet<String> {
    pods.into_iter()
        .flat_map(images_of)
        .map(|(_, image)| image)
        .collect()
}

/// Whether a pod's image is known to run on a node, or is only asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// Kubelet reported the digest this container runs, on the node the
    /// pod is bound to. Only kubelet writes a pod's status, and it reports
    /// a digest per container it pulled, so no tenant can claim this for
    /// an image nothing pulled (a `Running` pod's other containers may be
    /// stuck on an image that does not exist: those wait).
    Runs,
    /// Anything else: pulling, unschedulable, or an image that does not
    /// exist; any pod spec, from anyone allowed to create pods, can ask.
    Waits,
}

/// The pins of one unfinished pod, each with its [`Standing`].
fn images_of(pod: &Pod) -> Vec<(Standing, String)> {
    let Some(spec) = unfinished(pod) else {
        return Vec::new();
    };
    let status = pod.status.as_ref();
    let scheduled = spec.node_name.as_deref().is_some_and(|n| !n.is_empty());
    // Per container name: the digest it runs, when known.
    let mut running: BTreeMap<&str, &str> = BTreeMap::new();
    if let Some(st) = status {
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
    spec_images(spec)
        .filter_map(|(name, image)| {
            let digest = running.get(name).copied();
            let standing = if scheduled && digest.is_some() {
                Standing::Runs
            } else {
                Standing::Waits
            };
            Some((
                standing,
                PinnedImage::parse(digest.unwrap_or(image))?.to_string(),
            ))
        })
        .collect()
}

/// The pods' pins in the order they are kept when the size cap is
/// reached: `[0]` what runs on nodes, `[1]` what pods only ask for. Within
/// each, namespaces take turns, and within a namespace its pods do, one
/// image at a time: a namespace listing thousands of images (names sorting
/// first, say) gets its share of the cap, never all of it.
fn fair_pod_images<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> [Vec<String>; 2] {
    // Per standing, namespace and pod: its images, in spec order.
    type ByPod<'a> = BTreeMap<&'a str, BTreeMap<&'a str, Vec<String>>>;
    let mut groups: [ByPod<'a>; 2] = Default::default();
    for pod in pods {
        let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        for (standing, image) in images_of(pod) {
            let group = match standing {
                Standing::Runs => &mut groups[0],
                Standing::Waits => &mut groups[1],
            };
            group
                .entry(namespace)
                .or_default()
                .entry(name)
                .or_default()
                .push(image);
        }
    }
    groups.map(|namespaces| {
        round_robin(
            namespaces
                .into_values()
                .map(|pods| round_robin(pods.into_values())),
        )
    })
}

/// The first item of each list, then the second of each, and so on.
fn round_robin<T>(lists: impl IntoIterator<Item = Vec<T>>) -> Vec<T> {
    let mut lists: Vec<_> = lists.into_iter().map(Vec::into_iter).collect();
    let mut out = Vec::with_capacity(lists.iter().map(ExactSizeIterator::len).sum());
    while !lists.is_empty() {
        lists.retain_mut(|l| match l.next() {
            Some(item) => {
                out.push(item);
                true
            }
            None => false,
        });
    }
    out
}

/// The images of the last `revisions` ReplicaSets of each Deployment, by
/// age: `[0]` holds each Deployment's newest revision, `[1]` the one
/// before, and so on.
pub fn revision_images<'a>(
    replica_sets: impl IntoIterator<Item = &'a ReplicaSet>,
    revisions: usize,
) -> Vec<BTreeSet<String>> {
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
    let mut ranks: Vec<BTreeSet<String>> = Vec::new();
    for (_, mut sets) in owned {
        sets.sort_by_key(|s| std::cmp::Reverse(s.0));
        for (rank, (_, rs)) in sets.into_iter().take(revisions).enumerate() {
            let spec = rs
                .spec
                .as_ref()
                .and_then(|s| s.template.as_ref())
                .and_then(|t| t.spec.as_ref());
            if ranks.len() <= rank {
                ranks.resize_with(rank + 1, BTreeSet::new);
            }
            ranks[rank].extend(
                spec.into_iter()
                    .flat_map(spec_images)
                    .filter_map(|(_, image)| Some(PinnedImage::parse(image)?.to_string())),
            );
        }
    }
    ranks
}

/// The images of DaemonSet and StatefulSet pod templates (what their next
/// rollout, or a new node, pulls).
pub fn templates_of<'a>(
    daemon_sets: impl IntoIterator<Item = &'a DaemonSet>,
    stateful_sets: impl IntoIterator<Item = &'a StatefulSet>,
) -> BTreeSet<String> {
    let specs = daemon_sets
        .into_iter()
        .filter_map(|d| d.spec.as_ref()?.template.spec.as_ref())
        .chain(
            stateful_sets
                .into_iter()
                .filter_map(|s| s.spec.as_ref()?.template.spec.as_ref()),
        );
    specs
        .flat_map(spec_images)
        .filter_map(|(_, image)| Some(PinnedImage::parse(image)?.to_string()))
        .collect()
}

/// Each MirrorRegistry's `spec.prefetch`, as full references.
pub fn prefetch_of<'a>(
    registries: impl IntoIterator<Item = &'a MirrorRegistry>,
) -> BTreeSet<String> {
    registries
        .into_iter()
        .filter(|r| r.metadata.deletion_timestamp.is_none())
        .flat_map(|r| {
            r.spec.prefetch.iter().filter_map(|e| {
                Some(PinnedImage::parse(&format!("{}/{e}", r.spec.host))?.to_string())
            })
        })
        .collect()
}

/// `os/arch` of every node (the well-known labels kubelet sets, else its
/// nodeInfo); a variant (arm v7) is not known here, so every variant of the
/// architecture is fetched.
pub fn platforms_of<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> BTreeSet<String> {
    nodes
        .into_iter()
        .filter_map(|n| {
            let labels = n.labels();
            let info = n.status.as_ref().and_then(|s| s.node_info.as_ref());
            let os = labels
                .get("kubernetes.io/os")
                .cloned()
                .or_else(|| info.map(|i| i.operating_system.clone()))?;
            let arch = labels
                .get("kubernetes.io/arch")
                .cloned()
                .or_else(|| info.map(|i| i.architecture.clone()))?;
            Some(format!("{os}/{arch}"))
        })
        .collect()
}

/// The spec of a pod that has not finished (neither Succeeded nor Failed):
/// what pinning and discovery count.
pub(crate) fn unfinished(pod: &Pod) -> Option<&PodSpec> {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    pod.spec.as_ref()
}

/// (container name, image) of every container and init container.
pub(crate) fn spec_images(spec: &PodSpec) -> impl Iterator<Item = (&str, &str)> {
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .filter_map(|c| Some((c.name.as_str(), c.image.as_deref()?)))
}

/// What the pins are computed from.
#[derive(Debug, Default)]
pub struct Cluster<'a> {
    pub pods: Vec<&'a Pod>,
    pub replica_sets: Vec<&'a ReplicaSet>,
    pub daemon_sets: Vec<&'a DaemonSet>,
    pub stateful_sets: Vec<&'a StatefulSet>,
    pub registries: Vec<&'a MirrorRegistry>,
    pub nodes: Vec<&'a Node>,
}

/// The pins document to publish, and what was left out of it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Built {
    pub pins: Pins,
    /// Images left out to keep the document under the size cap.
    pub dropped: usize,
}

/// The pins document of `cluster`: only images of registries a
/// MirrorRegistry names (host or alias; the proxy serves no other), and no
/// more than `cap` bytes of it. What goes in first stays when the cap is
/// reached: what runs on nodes now, then `spec.prefetch` (only an admin
/// writes it, so no tenant's pods push it out), what pending pods ask for,
/// DaemonSet and StatefulSet templates, and the Deployments' revisions,
/// newest first; pod images by turns per namespace and pod (see
/// [`fair_pod_images`]). What is left out is counted in
/// [`Built::dropped`].
pub fn build(cluster: &Cluster<'_>, revisions: usize, cap: usize) -> Built {
    let mirrored = crate::discovery::mirrored(cluster.registries.iter().copied());
    let [runs, waits] = fair_pod_images(cluster.pods.iter().copied());
    let tiers = [
        runs,
        prefetch_of(cluster.registries.iter().copied())
            .into_iter()
            .collect(),
        waits,
        templates_of(
            cluster.daemon_sets.iter().copied(),
            cluster.stateful_sets.iter().copied(),
        )
        .into_iter()
        .collect(),
    ]
    .into_iter()
    .chain(
        revision_images(cluster.replica_sets.iter().copied(), revisions)
            .into_iter()
            .map(|rank| rank.into_iter().collect()),
    );
    let mut built = Built {
        pins: Pins {
            images: BTreeSet::new(),
            platforms: platforms_of(cluster.nodes.iter().copied()),
        },
        dropped: 0,
    };
    let mut size = serde_json::to_string(&built.pins).map_or(0, |d| d.len());
    let mut left_out = BTreeSet::new();
    for image in tiers.flatten() {
        if !mirrored.contains(&registry_of(&image)) || built.pins.images.contains(&image) {
            continue;
        }
        // The image, its quotes (escapes, if any) and a comma.
        let len = serde_json::to_string(&image).map_or(usize::MAX, |j| j.len()) + 1;
        // One that does not fit does not end the filling: a long name
        // (anyone creating a pod chooses one) would otherwise shut out
        // every shorter one after it. What comes later never takes the
        // place of what came before: that was offered the room first.
        if size.saturating_add(len) <= cap {
            size += len;
            built.pins.images.insert(image);
        } else {
            left_out.insert(image);
        }
    }
    built.dropped = left_out.len();
    built
}

/// The registry host of a normalized pin, as MirrorRegistries name it
/// (Docker Hub's other names as `docker.io`).
fn registry_of(image: &str) -> String {
    // Lowercased first: `Index.Docker.io/...` is Docker Hub too.
    let host = image
        .split('/')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" => {
            pullthrough_api::names::DOCKER_HUB.to_string()
        }
        _ => host,
    }
}

/// Where the pins go, and what discovery does with the same stores.
#[derive(Debug, Clone)]
pub struct Settings {
    pub namespace: String,
    /// The pins ConfigMap; empty: no pins written.
    pub configmap: String,
    pub revisions: usize,
    /// Size cap of the pins document; [`MAX_PINS_BYTES`] at most.
    pub max_bytes: usize,
    pub discovery: crate::discovery::Mode,
    /// The names discovery creates no MirrorRegistry for, as the table
    /// refuses them: this installation's, with the base config's proxy
    /// names (the proxy Service's address it reads on each run).
    pub reserved: ReservedNames,
    /// This replica, in the Events it records.
    pub identity: String,
}

/// Keeps the pins ConfigMap holding the pins of the cluster's workloads,
/// MirrorRegistries and nodes, and the DiscoveredRegistries saying which
/// registries pods pull from unmirrored, until `stop`.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let Settings {
        namespace,
        configmap: name,
        revisions,
        max_bytes,
        discovery,
        reserved,
        identity,
    } = settings;
    let max_bytes = max_bytes.min(MAX_PINS_BYTES);
    let recorder = Recorder::new(
        client.clone(),
        kube::runtime::events::Reporter {
            controller: FIELD_MANAGER.into(),
            instance: Some(identity),
        },
    );
    let (tx, mut changed) = watch::channel(());
    let (pods, pods_w) = reflect(Api::<Pod>::all(client.clone()), tx.clone());
    let (sets, sets_w) = reflect(Api::<ReplicaSet>::all(client.clone()), tx.clone());
    let (daemons, daemons_w) = reflect(Api::<DaemonSet>::all(client.clone()), tx.clone());
    let (stateful, stateful_w) = reflect(Api::<StatefulSet>::all(client.clone()), tx.clone());
    let (nodes, nodes_w) = reflect(Api::<Node>::all(client.clone()), tx.clone());
    let (mregs, mregs_w) = reflect(Api::<MirrorRegistry>::all(client.clone()), tx);
    let api = Api::<ConfigMap>::namespaced(client.clone(), &namespace);
    let publish = async {
        // Deletions surface only through the stores: wait for every list.
        let _ = tokio::join!(
            pods.wait_until_ready(),
            sets.wait_until_ready(),
            daemons.wait_until_ready(),
            stateful.wait_until_ready(),
            nodes.wait_until_ready(),
            mregs.wait_until_ready(),
        );
        let mut last: Option<Pins> = None;
        // Whether the last pins written were truncated, the last write
        // failed: a Warning Event when either begins.
        let (mut truncated, mut failing) = (false, false);
        let mut memory = crate::discovery::Memory::new(reserved);
        loop {
            let (p, r, d, st, m, n) = (
                pods.state(),
                sets.state(),
                daemons.state(),
                stateful.state(),
                mregs.state(),
                nodes.state(),
            );
            let cluster = Cluster {
                pods: p.iter().map(AsRef::as_ref).collect(),
                replica_sets: r.iter().map(AsRef::as_ref).collect(),
                daemon_sets: d.iter().map(AsRef::as_ref).collect(),
                stateful_sets: st.iter().map(AsRef::as_ref).collect(),
                registries: m.iter().map(AsRef::as_ref).collect(),
                nodes: n.iter().map(AsRef::as_ref).collect(),
            };
            let Built { pins: now, dropped } = build(&cluster, revisions, max_bytes);
            let found = crate::discovery::unmirrored(
                pods.state().iter().map(|p| p.as_ref()),
                &crate::discovery::mirrored(mregs.state().iter().map(|m| m.as_ref())),
            );
            crate::discovery::publish(&client, &recorder, discovery, &found, &mut memory).await;
            if name.is_empty() {
                // Discovery only.
            } else if last.as_ref() != Some(&now) {
                let images = now.images.len();
                match write(&api, &name, &now).await {
                    Ok(()) => {
                        tracing::info!(configmap = %name, images, dropped, platforms = ?now.platforms, "pins published");
                        metrics
                            .pins_images
                            .set(i64::try_from(images).unwrap_or(i64::MAX));
                        metrics
                            .pins_dropped
                            .set(i64::try_from(dropped).unwrap_or(i64::MAX));
                        if dropped > 0 && !truncated {
                            let note = format!(
                                "{dropped} image(s) left out of {name} to keep it under the ConfigMap size limit ({images} kept, what pods run first); the proxy may evict those"
                            );
                            tracing::warn!(configmap = %name, dropped, images, "pins truncated");
                            pins_event(&recorder, &namespace, &name, "PinsTruncated", note).await;
                        }
                        truncated = dropped > 0;
                        failing = false;
                        last = Some(now);
                    }
                    Err(e) => {
                        metrics.pins_write_failures.inc();
                        tracing::warn!(configmap = %name, error = %e, "publishing the pins");
                        if !failing {
                            let note = format!(
                                "writing {name} failed ({e}); the proxy keeps the pins last written, retrying"
                            );
                            pins_event(&recorder, &namespace, &name, "PinsNotPublished", note)
                                .await;
                        }
                        failing = true;
                    }
                }
            }
            // On any change, or every minute (a failed write is retried).
            let _ = tokio::time::timeout(Duration::from_secs(60), changed.changed()).await;
            tokio::time::sleep(SETTLE).await;
        }
    };
    tokio::select! {
        () = pods_w => {}
        () = sets_w => {}
        () = daemons_w => {}
        () = stateful_w => {}
        () = nodes_w => {}
        () = mregs_w => {}
        () = publish => {}
        _ = stop.wait_for(|s| *s) => {}
    }
}

/// A Warning Event on the pins ConfigMap (best effort).
async fn pins_event(recorder: &Recorder, namespace: &str, name: &str, reason: &str, note: String) {
    let ev = Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(note),
        action: "PublishPins".into(),
        secondary: None,
    };
    let regarding = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("ConfigMap".into()),
        namespace: Some(namespace.into()),
        name: Some(name.into()),
        ..ObjectReference::default()
    };
    if let Err(e) = recorder.publish(&ev, &regarding).await {
        tracing::warn!(error = %e, "publishing an event");
    }
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

    use serde_json::Value;

    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    /// A container as manifests have it: most of it is never read.
    fn full_container(name: &str, image: &str) -> Value {
        json!({
            "name": name, "image": image,
            "command": ["/bin/app"], "args": ["--port=8080"],
            "env": [{"name": "DB_URL", "value": "postgres://db.invalid/app"}],
            "envFrom": [{"secretRef": {"name": "app"}}],
            "ports": [{"containerPort": 8080, "protocol": "TCP"}],
            "resources": {"limits": {"memory": "128Mi"}, "requests": {"cpu": "10m"}},
            "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080}},
            "readinessProbe": {"tcpSocket": {"port": 8080}},
            "securityContext": {"runAsNonRoot": true},
            "imagePullPolicy": "IfNotPresent",
        })
    }

    /// `base` with the fields of `extra` set.
    fn merged(mut base: Value, extra: Value) -> Value {
        for (k, v) in extra.as_object().unwrap() {
            base[k] = v.clone();
        }
        base
    }

    /// Metadata as the API server returns it, with `extra` set.
    fn full_meta(name: &str, extra: Value) -> Value {
        let meta = json!({
            "name": name, "namespace": "prod", "uid": format!("uid-{name}"),
            "resourceVersion": "42", "generation": 3,
            "creationTimestamp": "2025-01-01T00:00:00Z",
            "labels": {"app": "web"},
            "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": "{\"the\": \"whole object\"}",
                "prometheus.io/scrape": "true",
            },
            "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
        });
        merged(meta, extra)
    }

    /// A pod spec as manifests have it, running `app`.
    fn full_pod_spec(app: &str) -> Value {
        json!({
            "serviceAccountName": "web",
            "volumes": [{"name": "data", "emptyDir": {}}],
            "tolerations": [{"key": "dedicated", "operator": "Exists"}],
            "imagePullSecrets": [{"name": "pull"}],
            "initContainers": [full_container("init", "quay.io/org/init:1")],
            "containers": [
                full_container("app", app),
                full_container("side", "ghcr.io/other/side:2"),
            ],
        })
    }

    /// What [`slim_pod_spec`] keeps of [`full_pod_spec`].
    fn slim_pod_spec_json(app: &str) -> Value {
        json!({
            "initContainers": [{"name": "init", "image": "quay.io/org/init:1"}],
            "containers": [
                {"name": "app", "image": app},
                {"name": "side", "image": "ghcr.io/other/side:2"},
            ],
        })
    }

    fn slimmed<K: Slim + Clone>(full: &K) -> K {
        let mut slim = full.clone();
        slim.slim();
        slim
    }

    /// The stores keep exactly what pins, discovery and the store itself
    /// read (env, volumes, probes, resources, conditions, labels,
    /// managedFields, kubectl's last-applied copy, a node's image list
    /// go), and what is computed from the slim objects is what is
    /// computed from the whole ones.
    /// The registry of an image reference as the table names it: Docker
    /// Hub's other names, in any case, are `docker.io`.
    #[test]
    fn registries_of_images_are_named_as_the_table_names_them() {
        assert_eq!(registry_of("Index.Docker.io/library/nginx:1"), "docker.io");
        assert_eq!(
            registry_of("registry-1.docker.io/x/y@sha256:ab"),
            "docker.io"
        );
        assert_eq!(registry_of("Quay.IO/org/app:1"), "quay.io");
    }

    #[test]
    fn cached_objects_are_slimmed_to_what_is_read() {
        let status = |name: &str, image: &str, id: &str, ready: bool, restarts: u32| {
            json!({"name": name, "image": image, "imageID": id,
                   "ready": ready, "restartCount": restarts})
        };
        let full_pod: Pod = serde_json::from_value(json!({
            "metadata": full_meta("web-1", json!({"ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-abc",
                "uid": "uid-rs", "controller": true}]})),
            "spec": merged(full_pod_spec("quay.io/org/app:1"), json!({"nodeName": "n1"})),
            "status": {
                "phase": "Running", "podIP": "10.0.0.7", "hostIP": "192.0.2.1",
                "qosClass": "Burstable", "startTime": "2025-01-01T00:00:01Z",
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [
                    merged(status("app", "quay.io/org/app:1", &format!("quay.io/org/app@{D1}"), true, 3),
                        json!({"containerID": "containerd://abc", "started": true,
                               "state": {"running": {"startedAt": "2025-01-01T00:00:02Z"}},
                               "lastState": {"terminated": {"exitCode": 137}}})),
                    merged(status("side", "ghcr.io/other/side:2", "", false, 0),
                        json!({"state": {"waiting": {"reason": "ContainerCreating"}}})),
                ],
                "initContainerStatuses": [merged(
                    status("init", "quay.io/org/init:1", &format!("quay.io/org/init@{D2}"), true, 0),
                    json!({"state": {"terminated": {"exitCode": 0}}}),
                )],
            },
        }))
        .unwrap();
        let slim_pod = slimmed(&full_pod);
        assert_eq!(
            serde_json::to_value(&slim_pod).unwrap(),
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "web-1", "namespace": "prod", "uid": "uid-web-1",
                             "resourceVersion": "42"},
                "spec": merged(slim_pod_spec_json("quay.io/org/app:1"), json!({"nodeName": "n1"})),
                "status": {
                    "phase": "Running",
                    "containerStatuses": [
                        status("app", "quay.io/org/app:1", &format!("quay.io/org/app@{D1}"), true, 3),
                        status("side", "ghcr.io/other/side:2", "", false, 0),
                    ],
                    "initContainerStatuses": [
                        status("init", "quay.io/org/init:1", &format!("quay.io/org/init@{D2}"), true, 0),
                    ],
                },
            })
        );
        assert_eq!(images_of(&slim_pod), images_of(&full_pod));
        assert_eq!(fair_pod_images([&slim_pod]), fair_pod_images([&full_pod]));
        let quay = mirror("quay.io");
        let mirrored = crate::discovery::mirrored([&quay]);
        assert_eq!(
            crate::discovery::unmirrored([&slim_pod], &mirrored),
            crate::discovery::unmirrored([&full_pod], &mirrored)
        );

        let full_rs: ReplicaSet = serde_json::from_value(json!({
            "metadata": full_meta("web-abc", json!({
                "annotations": {
                    REVISION: "4",
                    "deployment.kubernetes.io/desired-replicas": "3",
                    "kubectl.kubernetes.io/last-applied-configuration": "{}",
                },
                "ownerReferences": [{
                    "apiVersion": "apps/v1", "kind": "Deployment", "name": "web",
                    "uid": "uid-web", "controller": true, "blockOwnerDeletion": true}],
            })),
            "spec": {
                "replicas": 3, "minReadySeconds": 5,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}},
                             "spec": full_pod_spec("quay.io/org/app:2")},
            },
            "status": {"replicas": 3, "readyReplicas": 3,
                       "conditions": [{"type": "ReplicaFailure", "status": "False"}]},
        }))
        .unwrap();
        let slim_rs = slimmed(&full_rs);
        assert_eq!(
            serde_json::to_value(&slim_rs).unwrap(),
            json!({
                "apiVersion": "apps/v1", "kind": "ReplicaSet",
                "metadata": {"name": "web-abc", "namespace": "prod", "uid": "uid-web-abc",
                             "resourceVersion": "42",
                             "annotations": {REVISION: "4"},
                             "ownerReferences": [{
                                 "apiVersion": "apps/v1", "kind": "Deployment", "name": "web",
                                 "uid": "uid-web", "controller": true, "blockOwnerDeletion": true}]},
                "spec": {"selector": {},
                         "template": {"spec": slim_pod_spec_json("quay.io/org/app:2")}},
            })
        );
        // Ranked against its Deployment's other revisions, as before.
        let (older, newer) = (
            rs("web", 3, "quay.io/org/app:1"),
            rs("web", 5, "quay.io/org/app:3"),
        );
        assert_eq!(
            revision_images([&slim_rs, &slimmed(&older), &slimmed(&newer)], 2),
            revision_images([&full_rs, &older, &newer], 2)
        );
        assert_eq!(revision_images([&slim_rs], 1)[0].len(), 3);

        let slim_workload = |kind: &str| {
            json!({
                "apiVersion": "apps/v1", "kind": kind,
                "metadata": {"name": "agent", "namespace": "prod", "uid": "uid-agent",
                             "resourceVersion": "42"},
                "spec": {"selector": {},
                         "template": {"spec": slim_pod_spec_json("quay.io/org/agent:1")}},
            })
        };
        let full_ds: DaemonSet = serde_json::from_value(json!({
            "metadata": full_meta("agent", json!({})),
            "spec": {"selector": {"matchLabels": {"app": "agent"}},
                     "updateStrategy": {"type": "RollingUpdate"},
                     "template": {"metadata": {"labels": {"app": "agent"}},
                                  "spec": full_pod_spec("quay.io/org/agent:1")}},
            "status": {"currentNumberScheduled": 3, "desiredNumberScheduled": 3,
                       "numberMisscheduled": 0, "numberReady": 3},
        }))
        .unwrap();
        let slim_ds = slimmed(&full_ds);
        assert_eq!(
            serde_json::to_value(&slim_ds).unwrap(),
            slim_workload("DaemonSet")
        );
        let full_sts: StatefulSet = serde_json::from_value(json!({
            "metadata": full_meta("agent", json!({})),
            "spec": {"selector": {"matchLabels": {"app": "agent"}}, "serviceName": "agent",
                     "volumeClaimTemplates": [{"metadata": {"name": "data"},
                         "spec": {"accessModes": ["ReadWriteOnce"]}}],
                     "template": {"metadata": {"labels": {"app": "agent"}},
                                  "spec": full_pod_spec("quay.io/org/agent:1")}},
            "status": {"replicas": 1, "availableReplicas": 1},
        }))
        .unwrap();
        let slim_sts = slimmed(&full_sts);
        assert_eq!(
            serde_json::to_value(&slim_sts).unwrap(),
            slim_workload("StatefulSet")
        );
        assert_eq!(
            templates_of([&slim_ds], [&slim_sts]),
            templates_of([&full_ds], [&full_sts])
        );
        assert_eq!(templates_of([&slim_ds], [&slim_sts]).len(), 3);

        let mut n: Node = serde_json::from_value(json!({
            "metadata": {"name": "n", "managedFields": [{"manager": "kubelet"}]},
            "status": {"images": [{"names": ["quay.io/a:1"], "sizeBytes": 1}],
                "nodeInfo": {"architecture": "arm64", "operatingSystem": "linux",
                    "bootID": "", "containerRuntimeVersion": "", "kernelVersion": "",
                    "kubeProxyVersion": "", "kubeletVersion": "", "machineID": "",
                    "osImage": "", "systemUUID": ""}},
        }))
        .unwrap();
        n.slim();
        assert!(n.metadata.managed_fields.is_none());
        assert!(n.status.as_ref().unwrap().images.is_none());
        assert_eq!(
            platforms_of([&n]).into_iter().collect::<Vec<_>>(),
            ["linux/arm64"]
        );
    }

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

    #[test]
    fn templates_prefetch_lists_and_node_platforms() {
        let ds: DaemonSet = serde_json::from_value(json!({
            "metadata": {"name": "agent"},
            "spec": {"selector": {}, "template": {"spec": {
                "initContainers": [{"name": "i", "image": "quay.io/a/init:1"}],
                "containers": [{"name": "c", "image": "quay.io/a/agent:1"}]}}},
        }))
        .unwrap();
        let sts: StatefulSet = serde_json::from_value(json!({
            "metadata": {"name": "db"},
            "spec": {"selector": {}, "serviceName": "db",
                     "template": {"spec": {"containers": [{"name": "c", "image": "postgres:17"}]}}},
        }))
        .unwrap();
        assert_eq!(
            templates_of([&ds], [&sts]).into_iter().collect::<Vec<_>>(),
            vec![
                "docker.io/library/postgres:17",
                "quay.io/a/agent:1",
                "quay.io/a/init:1"
            ]
        );
        let mreg: MirrorRegistry = serde_json::from_value(json!({
            "apiVersion": "pullthrough.dev/v1alpha1", "kind": "MirrorRegistry",
            "metadata": {"name": "hub"},
            "spec": {"host": "docker.io", "prefetch": ["library/nginx:1.27", format!("org/app@{D1}")]},
        }))
        .unwrap();
        assert_eq!(
            prefetch_of([&mreg]).into_iter().collect::<Vec<_>>(),
            vec![
                "docker.io/library/nginx:1.27".to_string(),
                format!("docker.io/org/app@{D1}")
            ]
        );
        let node = |labels: Value, arch: &str| -> Node {
            serde_json::from_value(json!({
                "metadata": {"name": "n", "labels": labels},
                "status": {"nodeInfo": {"architecture": arch, "operatingSystem": "linux",
                    "bootID": "", "containerRuntimeVersion": "", "kernelVersion": "",
                    "kubeProxyVersion": "", "kubeletVersion": "", "machineID": "",
                    "osImage": "", "systemUUID": ""}},
            }))
            .unwrap()
        };
        let nodes = [
            node(
                json!({"kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}),
                "amd64",
            ),
            node(json!({}), "arm64"),
            node(
                json!({"kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}),
                "amd64",
            ),
        ];
        assert_eq!(
            platforms_of(&nodes).into_iter().collect::<Vec<_>>(),
            vec!["linux/amd64", "linux/arm64"]
        );
    }

    fn digest(i: usize) -> String {
        format!("sha256:{i:064x}")
    }

    fn mirror(host: &str) -> MirrorRegistry {
        serde_json::from_value(json!({
            "apiVersion": "pullthrough.dev/v1alpha1", "kind": "MirrorRegistry",
            "metadata": {"name": host},
            "spec": {"host": host},
        }))
        .unwrap()
    }

    /// A big cluster's pins stay under the ConfigMap size limit (past it
    /// every write is refused and the pins freeze): what runs now is kept,
    /// old revisions go first, images of registries the proxy does not
    /// mirror are not listed at all, and what was left out is counted.
    #[test]
    fn pins_of_a_big_cluster_fit_in_a_configmap_keeping_what_runs() {
        let pods: Vec<Pod> = (0..5000)
            .map(|i| {
                pod(
                    "Running",
                    &[("c", &format!("quay.io/org/app-{i}:1"))],
                    &[("c", &format!("quay.io/org/app-{i}@{}", digest(i)))],
                )
            })
            .collect();
        let unmirrored = pod(
            "Running",
            &[("c", "ghcr.io/other/tool:1")],
            &[("c", &format!("ghcr.io/other/tool@{}", digest(1)))],
        );
        // Each Deployment's older revisions, at other digests.
        let sets: Vec<ReplicaSet> = (0..3000)
            .flat_map(|i| {
                [1, 2].map(|r| {
                    rs(
                        &format!("d{i}"),
                        r,
                        &format!(
                            "quay.io/org/app-{i}@{}",
                            digest(100_000 + 2 * i + r as usize)
                        ),
                    )
                })
            })
            .collect();
        let quay = mirror("quay.io");
        let cluster = Cluster {
            pods: pods.iter().chain([&unmirrored]).collect(),
            replica_sets: sets.iter().collect(),
            registries: vec![&quay],
            ..Cluster::default()
        };
        let built = build(&cluster, 2, MAX_PINS_BYTES);
        let doc = serde_json::to_string(&built.pins).unwrap();
        assert!(
            doc.len() <= MAX_PINS_BYTES,
            "{} bytes, over the cap {MAX_PINS_BYTES}",
            doc.len()
        );
        for i in 0..5000 {
            let running = format!("quay.io/org/app-{i}@{}", digest(i));
            assert!(built.pins.images.contains(&running), "{running} left out");
        }
        assert!(
            !built.pins.images.iter().any(|i| i.starts_with("ghcr.io/")),
            "no MirrorRegistry mirrors ghcr.io"
        );
        assert!(built.dropped > 0, "nothing reported as left out");
        assert_eq!(
            built.pins.images.len() + built.dropped,
            5000 + 6000,
            "every pin is either published or counted as left out"
        );
    }

    /// A pod `name` in `namespace`, on `node` if scheduled, whose
    /// containers `c0`, `c1`, ... run `images`, none started yet.
    fn pod_in(
        namespace: &str,
        name: &str,
        node: Option<&str>,
        phase: &str,
        images: &[String],
    ) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "nodeName": node,
                "containers": images.iter().enumerate()
                    .map(|(i, im)| json!({"name": format!("c{i}"), "image": im}))
                    .collect::<Vec<_>>(),
            },
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    /// `n` images whose names sort before everyone else's.
    fn flood(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("quay.io/aaa/x:{i}")).collect()
    }

    /// The size of the pins document listing nothing.
    fn empty_doc() -> usize {
        serde_json::to_string(&Pins::default()).unwrap().len()
    }

    /// Anyone allowed to create pods can list thousands of images, even in
    /// a pod that never gets scheduled: what runs on nodes stays pinned.
    #[test]
    fn a_tenant_listing_many_images_does_not_push_out_what_runs() {
        let legit = pod_in(
            "prod",
            "app",
            Some("n1"),
            "Running",
            &["quay.io/zzz/app:1".into()],
        );
        let hostile = pod_in("tenant", "x", None, "Pending", &flood(2000));
        let quay = mirror("quay.io");
        let cap = empty_doc() + 400;
        let built = build(
            &Cluster {
                pods: vec![&hostile, &legit],
                registries: vec![&quay],
                ..Cluster::default()
            },
            2,
            cap,
        );
        assert!(
            built.pins.images.contains("quay.io/zzz/app:1"),
            "{:?}",
            built.pins.images
        );
        assert!(serde_json::to_string(&built.pins).unwrap().len() <= cap);
        assert!(built.dropped > 0);
        assert_eq!(built.pins.images.len() + built.dropped, 2001);
    }

    /// What pending pods ask for shares the cap by turns: per namespace,
    /// then per pod in it, whatever the names sort like.
    #[test]
    fn pending_pods_share_the_cap_by_namespace_and_pod() {
        let hostile = pod_in("aaa", "flood", None, "Pending", &flood(2000));
        let neighbour = pod_in("aaa", "web", None, "Pending", &["quay.io/zzz/web:1".into()]);
        let other = pod_in(
            "team",
            "new",
            Some("n1"),
            "Pending",
            &["quay.io/zzz/new:2".into()],
        );
        let quay = mirror("quay.io");
        let built = build(
            &Cluster {
                pods: vec![&hostile, &neighbour, &other],
                registries: vec![&quay],
                ..Cluster::default()
            },
            2,
            empty_doc() + 400,
        );
        let images = &built.pins.images;
        assert!(images.contains("quay.io/zzz/web:1"), "{images:?}");
        assert!(images.contains("quay.io/zzz/new:2"), "{images:?}");
        // The flood gets its share, not nothing.
        assert!(
            images.iter().any(|i| i.starts_with("quay.io/aaa/")),
            "{images:?}"
        );
        assert!(built.dropped > 0);
    }

    /// Only an admin writes `spec.prefetch`: no tenant's pending pods push
    /// it out.
    #[test]
    fn prefetch_is_kept_before_what_pending_pods_ask_for() {
        let hostile = pod_in("tenant", "x", Some("n1"), "Pending", &flood(2000));
        let quay: MirrorRegistry = serde_json::from_value(json!({
            "apiVersion": "pullthrough.dev/v1alpha1", "kind": "MirrorRegistry",
            "metadata": {"name": "quay"},
            "spec": {"host": "quay.io", "prefetch": ["zzz/warm:1"]},
        }))
        .unwrap();
        let built = build(
            &Cluster {
                pods: vec![&hostile],
                registries: vec![&quay],
                ..Cluster::default()
            },
            2,
            empty_doc() + 400,
        );
        assert!(
            built.pins.images.contains("quay.io/zzz/warm:1"),
            "{:?}",
            built.pins.images
        );
    }

    /// A `Running` pod's containers stuck on images that do not exist do
    /// not count as running: only a container kubelet reported a digest
    /// for does. A tenant's one real container cannot lift a thousand
    /// bogus sidecars above what an admin asked to keep warm.
    #[test]
    fn only_containers_kubelet_reports_count_as_running() {
        let mut images = vec!["quay.io/t/real:1".to_string()];
        images.extend(flood(1000));
        let mut tenant = pod_in("tenant", "x", Some("n1"), "Running", &images);
        tenant.status = serde_json::from_value(json!({
            "phase": "Running",
            "containerStatuses": [{
                "name": "c0", "image": "quay.io/t/real:1", "ready": true, "restartCount": 0,
                "imageID": format!("quay.io/t/real@{D1}"),
            }],
        }))
        .unwrap();
        let quay: MirrorRegistry = serde_json::from_value(json!({
            "apiVersion": "pullthrough.dev/v1alpha1", "kind": "MirrorRegistry",
            "metadata": {"name": "quay"},
            "spec": {"host": "quay.io", "prefetch": ["zzz/warm:1"]},
        }))
        .unwrap();
        let built = build(
            &Cluster {
                pods: vec![&tenant],
                registries: vec![&quay],
                ..Cluster::default()
            },
            2,
            empty_doc() + 400,
        );
        let images = &built.pins.images;
        assert!(
            images.contains(&format!("quay.io/t/real@{D1}")),
            "{images:?}"
        );
        assert!(images.contains("quay.io/zzz/warm:1"), "{images:?}");
    }

    /// An image too long for the room left is left out, and the filling
    /// goes on with the shorter ones after it.
    #[test]
    fn an_image_too_long_for_the_room_left_does_not_end_the_filling() {
        let long = format!("quay.io/a/{}:1", "x".repeat(200));
        let first = pod_in("a", "long", Some("n1"), "Running", &[long]);
        let second = pod_in(
            "b",
            "short",
            Some("n1"),
            "Running",
            &["quay.io/b/s:1".into()],
        );
        let quay = mirror("quay.io");
        let cap = empty_doc() + 100;
        let built = build(
            &Cluster {
                pods: vec![&first, &second],
                registries: vec![&quay],
                ..Cluster::default()
            },
            2,
            cap,
        );
        assert_eq!(
            built.pins.images.iter().collect::<Vec<_>>(),
            ["quay.io/b/s:1"]
        );
        assert_eq!(built.dropped, 1);
    }
}

//! The watch stores pins and discovery read, and what they keep of each
//! object (see [`Slim`]).

use std::collections::BTreeMap;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, ReplicaSet, ReplicaSetSpec, StatefulSet, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    Container, ContainerStatus, Node, Pod, PodSpec, PodStatus, PodTemplateSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use pullthrough_api::crd::MirrorRegistry;
use tokio::sync::watch;

use super::REVISION;

/// A store of every `K` in the cluster, kept by a watch that signals each
/// change on `changed`.
pub(super) fn reflect<K>(
    api: Api<K>,
    changed: watch::Sender<()>,
) -> (Store<K>, impl Future<Output = ()>)
where
    K: kube::Resource<DynamicType = ()>
        + Slim
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store::<K>();
    let kind = K::kind(&()).into_owned();
    let events = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(K::slim)
        .reflect(writer)
        .applied_objects()
        .for_each(move |r| {
            if let Err(e) = r {
                tracing::warn!(%kind, error = %e, "watching for pins");
            }
            let _ = changed.send(());
            async {}
        });
    (store, events)
}

/// What the stores keep of an object: what pins and discovery read. Every
/// Pod and ReplicaSet of the cluster is cached (thousands on a big
/// cluster, in an operator limited to a few hundred MiB), so the stores
/// keep only that and drop the rest as objects arrive: env, volumes,
/// probes, resources, conditions, workloads' labels and status,
/// managedFields, kubectl's last-applied copy, a node's list of every
/// image it holds. Reading a
/// new field from these stores means keeping it here too; the test
/// `cached_objects_are_slimmed_to_what_is_read` fails until it is.
pub trait Slim: kube::Resource {
    fn slim(&mut self) {
        slim_meta(self.meta_mut());
    }
}

fn slim_meta(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// What the store itself reads: its key (name, namespace), and uid and
/// resourceVersion, which tell one incarnation or version from another.
fn identity(meta: ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        resource_version: meta.resource_version,
        ..ObjectMeta::default()
    }
}

/// What [`spec_images`] and discovery read of a pod spec: each container's
/// name and image, and the node it runs on.
fn slim_pod_spec(spec: PodSpec) -> PodSpec {
    let container = |c: Container| Container {
        name: c.name,
        image: c.image,
        ..Container::default()
    };
    PodSpec {
        containers: spec.containers.into_iter().map(container).collect(),
        init_containers: spec
            .init_containers
            .map(|cs| cs.into_iter().map(container).collect()),
        node_name: spec.node_name,
        ..PodSpec::default()
    }
}

/// A workload's pod template: its spec as [`slim_pod_spec`] keeps it.
fn slim_template(template: PodTemplateSpec) -> PodTemplateSpec {
    PodTemplateSpec {
        metadata: None,
        spec: template.spec.map(slim_pod_spec),
    }
}

impl Slim for Pod {
    fn slim(&mut self) {
        self.metadata = identity(std::mem::take(&mut self.metadata));
        self.spec = self.spec.take().map(slim_pod_spec);
        // The phase and the digest each container runs. A container
        // status's other required fields keep their values, so nothing in
        // the store says something false; the optional ones go.
        let status = |c: ContainerStatus| ContainerStatus {
            name: c.name,
            image: c.image,
            image_id: c.image_id,
            ready: c.ready,
            restart_count: c.restart_count,
            ..ContainerStatus::default()
        };
        self.status = self.status.take().map(|s| PodStatus {
            phase: s.phase,
            container_statuses: s
                .container_statuses
                .map(|cs| cs.into_iter().map(status).collect()),
            init_container_statuses: s
                .init_container_statuses
                .map(|cs| cs.into_iter().map(status).collect()),
            ..PodStatus::default()
        });
    }
}

impl Slim for ReplicaSet {
    fn slim(&mut self) {
        let mut meta = std::mem::take(&mut self.metadata);
        // The revision and the owning Deployment rank it among its
        // siblings.
        let revision = meta
            .annotations
            .take()
            .and_then(|mut a| a.remove_entry(REVISION));
        let owners = meta.owner_references.take();
        self.metadata = ObjectMeta {
            annotations: revision.map(|r| BTreeMap::from([r])),
            owner_references: owners,
            ..identity(meta)
        };
        self.spec = self.spec.take().map(|s| ReplicaSetSpec {
            template: s.template.map(slim_template),
            ..ReplicaSetSpec::default()
        });
        self.status = None;
    }
}

/// Workloads whose pod template is all that is read of them: identity
/// and the template's images.
macro_rules! slim_workload {
    ($($kind:ty => $spec:ident),+) => {$(
        impl Slim for $kind {
            fn slim(&mut self) {
                self.metadata = identity(std::mem::take(&mut self.metadata));
                self.spec = self.spec.take().map(|s| $spec {
                    template: slim_template(s.template),
                    ..$spec::default()
                });
                self.status = None;
            }
        }
    )+};
}

slim_workload!(DaemonSet => DaemonSetSpec, StatefulSet => StatefulSetSpec);

impl Slim for MirrorRegistry {}
impl Slim for Node {
    fn slim(&mut self) {
        slim_meta(kube::Resource::meta_mut(self));
        if let Some(status) = self.status.as_mut() {
            status.images = None;
        }
    }
}

//! Discovery: which registries the cluster's pods pull from that no
//! MirrorRegistry mirrors. Each becomes a `DiscoveredRegistry` (status:
//! pods, nodes, example images) with a `Discovered` Event when first seen;
//! with `--discovery=create` the operator also makes sure a MirrorRegistry
//! exists for it (Event `MirrorRegistryCreated`; one deleted while pods
//! still pull from the host is created again, so turn `create` off before
//! dropping one). A DiscoveredRegistry goes away when a MirrorRegistry
//! covers its host or no unfinished pod uses it.
//!
//! Runs on the stores the pins watch keeps (`crate::pins`), after each
//! change.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use pullthrough_api::crd::MirrorRegistry;
use pullthrough_api::discovered::{
    DiscoveredRegistry, DiscoveredRegistryStatus, EXAMPLE_IMAGES, object_name,
};
use pullthrough_api::names::{DOCKER_HUB, reserved_host, validate_host};
use pullthrough_api::pins::PinnedImage;
use serde_json::json;

use crate::FIELD_MANAGER;
use crate::pins::{spec_images, unfinished};

/// What discovery does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Nothing.
    Off,
    /// DiscoveredRegistry objects and Events.
    Report,
    /// Also create a MirrorRegistry for each discovered registry.
    Create,
}

/// Pods, nodes and images of one unmirrored registry.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Usage {
    pub pods: BTreeSet<(String, String)>,
    pub nodes: BTreeSet<String>,
    pub images: BTreeSet<String>,
}

impl Usage {
    fn status(&self) -> DiscoveredRegistryStatus {
        DiscoveredRegistryStatus {
            pods: u32::try_from(self.pods.len()).unwrap_or(u32::MAX),
            nodes: u32::try_from(self.nodes.len()).unwrap_or(u32::MAX),
            images: self.images.iter().take(EXAMPLE_IMAGES).cloned().collect(),
        }
    }
}

/// The hosts MirrorRegistries cover (hosts and aliases, not being deleted).
pub fn mirrored<'a>(registries: impl IntoIterator<Item = &'a MirrorRegistry>) -> BTreeSet<String> {
    registries
        .into_iter()
        .filter(|r| r.metadata.deletion_timestamp.is_none())
        .flat_map(|r| std::iter::once(&r.spec.host).chain(&r.spec.aliases))
        .map(|h| h.to_ascii_lowercase())
        .collect()
}

/// Per registry host no MirrorRegistry covers: who pulls from it.
pub fn unmirrored<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    mirrored: &BTreeSet<String>,
) -> BTreeMap<String, Usage> {
    let mut out: BTreeMap<String, Usage> = BTreeMap::new();
    for pod in pods {
        let Some(spec) = unfinished(pod) else {
            continue;
        };
        for (_, image) in spec_images(spec) {
            let Some(p) = PinnedImage::parse(image) else {
                continue;
            };
            // Host names are case-insensitive: `Quay.io/x` goes through a
            // mirror of quay.io (the MirrorRegistry hosts are compared
            // lowercase too). Docker Hub is known by several names in
            // references.
            let host = match p.registry.to_ascii_lowercase() {
                h if h == "index.docker.io" || h == "registry-1.docker.io" => {
                    DOCKER_HUB.to_string()
                }
                h => h,
            };
            if mirrored.contains(&host) {
                continue;
            }
            let u = out.entry(host).or_default();
            u.pods
                .insert((pod.namespace().unwrap_or_default(), pod.name_any()));
            if let Some(node) = &spec.node_name {
                u.nodes.insert(node.clone());
            }
            u.images.insert(p.to_string());
        }
    }
    out
}

/// Hosts `--discovery=create` makes no MirrorRegistry for, with why: names
/// no MirrorRegistry may have (`localhost:5000`, loopback and link-local
/// IPs), and hosts whose create the API server refused as invalid. A create
/// that can never succeed is otherwise tried again on every pod change.
#[derive(Debug, Default)]
pub struct Uncreatable(BTreeMap<String, String>);

impl Uncreatable {
    /// Whether a MirrorRegistry for `host` may be created; the first time
    /// one may not, says why (once per host, not on every pod change).
    pub fn may_create(&mut self, host: &str) -> bool {
        if self.0.contains_key(host) {
            return false;
        }
        let Some(why) = validate_host(host)
            .err()
            .or_else(|| reserved_host(host).map(String::from))
        else {
            return true;
        };
        tracing::info!(%host, %why, "no MirrorRegistry is created for this discovered registry");
        self.0.insert(host.to_string(), why);
        false
    }

    /// Remembers `host` when the API server refused its MirrorRegistry as
    /// invalid (400, 422): the same object would be refused again. Conflicts,
    /// throttling and server errors are retried. True when remembered.
    pub fn refused(&mut self, host: &str, err: &kube::Error) -> bool {
        match err {
            kube::Error::Api(s) if matches!(s.code, 400 | 422) => {
                self.0.insert(host.to_string(), s.message.clone());
                true
            }
            _ => false,
        }
    }

    /// Forgets hosts no pod pulls from any more: if one comes back (after a
    /// CRD upgrade, say), its create is tried once again.
    pub fn keep_only(&mut self, found: &BTreeMap<String, Usage>) {
        self.0.retain(|host, _| found.contains_key(host));
    }
}

/// Makes the DiscoveredRegistry objects say `found`; in `Create` mode also
/// creates the missing MirrorRegistries, except for `uncreatable` hosts.
/// Errors are logged: discovery is a report, it never stops pinning.
pub async fn publish(
    client: &Client,
    recorder: &Recorder,
    mode: Mode,
    found: &BTreeMap<String, Usage>,
    uncreatable: &mut Uncreatable,
) {
    if mode == Mode::Off {
        return;
    }
    let api = Api::<DiscoveredRegistry>::all(client.clone());
    let existing: BTreeMap<String, DiscoveredRegistry> =
        match api.list(&ListParams::default()).await {
            Ok(l) => l.items.into_iter().map(|d| (d.name_any(), d)).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "listing DiscoveredRegistries");
                return;
            }
        };
    let ssa = PatchParams::apply(FIELD_MANAGER).force();
    uncreatable.keep_only(found);
    for (host, usage) in found {
        let name = object_name(host);
        let status = usage.status();
        let before = existing.get(&name);
        if let (Some(d), Mode::Create) = (before, mode)
            && uncreatable.may_create(host)
        {
            // Found again while create is on: its MirrorRegistry is missing.
            create_mirror(client, recorder, d, host, uncreatable).await;
        }
        if before.and_then(|d| d.status.as_ref()) == Some(&status) {
            continue;
        }
        let obj = json!({
            "apiVersion": "pullthrough.dev/v1alpha1",
            "kind": "DiscoveredRegistry",
            "metadata": {"name": name},
            "spec": {"host": host},
        });
        let written = match api.patch(&name, &ssa, &Patch::Apply(obj)).await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(%host, error = %e, "writing DiscoveredRegistry");
                continue;
            }
        };
        let st = json!({
            "apiVersion": "pullthrough.dev/v1alpha1",
            "kind": "DiscoveredRegistry",
            "status": status,
        });
        if let Err(e) = api.patch_status(&name, &ssa, &Patch::Apply(st)).await {
            tracing::warn!(%host, error = %e, "writing DiscoveredRegistry status");
        }
        if before.is_none() {
            tracing::info!(%host, pods = status.pods, nodes = status.nodes, "registry discovered");
            let note = format!(
                "{} pod(s) on {} node(s) pull from {host}, which no MirrorRegistry mirrors (e.g. {})",
                status.pods,
                status.nodes,
                status.images.first().map_or("", String::as_str)
            );
            event(recorder, &written, "Discovered", note).await;
            if mode == Mode::Create && uncreatable.may_create(host) {
                create_mirror(client, recorder, &written, host, uncreatable).await;
            }
        }
    }
    for (name, d) in &existing {
        // One named otherwise was named by an older operator (one name
        // for `reg.example:5000` and `reg.example-5000`); the host's own
        // object replaces it.
        if !found.contains_key(&d.spec.host) || *name != object_name(&d.spec.host) {
            tracing::info!(host = %d.spec.host, "no longer pulled from unmirrored");
            if let Err(e) = api.delete(name, &DeleteParams::default()).await {
                tracing::warn!(host = %d.spec.host, error = %e, "deleting DiscoveredRegistry");
            }
        }
    }
}

/// Creates the MirrorRegistry for `host` (defaults: `https://<host>`, every
/// runtime); the admin owns it from then on.
async fn create_mirror(
    client: &Client,
    recorder: &Recorder,
    found: &DiscoveredRegistry,
    host: &str,
    uncreatable: &mut Uncreatable,
) {
    let api = Api::<MirrorRegistry>::all(client.clone());
    let name = object_name(host);
    let obj = json!({
        "apiVersion": "pullthrough.dev/v1alpha1",
        "kind": "MirrorRegistry",
        "metadata": {"name": name, "labels": {"pullthrough.dev/discovered": "true"}},
        "spec": {"host": host},
    });
    let mreg: MirrorRegistry = match serde_json::from_value(obj) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(%host, error = %e, "building the MirrorRegistry");
            return;
        }
    };
    match api.create(&Default::default(), &mreg).await {
        Ok(_) => {
            tracing::info!(%host, mirrorregistry = %name, "MirrorRegistry created for a discovered registry");
            event(
                recorder,
                found,
                "MirrorRegistryCreated",
                format!("created MirrorRegistry {name} (discovery.create)"),
            )
            .await;
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            tracing::info!(%host, mirrorregistry = %name, "a MirrorRegistry of that name exists; not created");
        }
        Err(e) if uncreatable.refused(host, &e) => {
            tracing::warn!(%host, error = %e, "the MirrorRegistry was refused; not tried again while pods pull from the host");
        }
        Err(e) => tracing::warn!(%host, error = %e, "creating the MirrorRegistry"),
    }
}

async fn event(recorder: &Recorder, obj: &DiscoveredRegistry, reason: &str, note: String) {
    let ev = Event {
        type_: EventType::Normal,
        reason: reason.into(),
        note: Some(note),
        action: "Discover".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&ev, &obj.object_ref(&())).await {
        tracing::warn!(error = %e, "publishing an event");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn pod(name: &str, node: Option<&str>, phase: &str, images: &[&str]) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "n"},
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

    #[test]
    fn hosts_that_cannot_be_mirrored_are_not_created() {
        let mut u = Uncreatable::default();
        for host in [
            "localhost:5000",
            "registry.localhost",
            "127.0.0.1:5000",
            "[::1]:5000",
            "169.254.169.254",
            "0.0.0.0:5000",
            "Upper.example",
        ] {
            assert!(!u.may_create(host), "{host}");
            assert!(!u.may_create(host), "{host}, asked again");
        }
        assert!(u.may_create("ghcr.io"));
        assert!(u.may_create("registry.example:5000"));
        assert!(u.may_create("10.0.0.5:5000"));

        // Refused as invalid: not tried again while pods pull from it.
        let api = |code: u16| {
            kube::Error::Api(Box::new(
                serde_json::from_value(json!({"code": code, "message": "refused"})).unwrap(),
            ))
        };
        for code in [409, 429, 500, 503] {
            assert!(!u.refused("quay.io", &api(code)), "{code}");
            assert!(u.may_create("quay.io"), "retried after {code}");
        }
        assert!(u.refused("quay.io", &api(422)));
        assert!(!u.may_create("quay.io"));
        // Once no pod pulls from it, a later return is tried once more.
        let still = BTreeMap::from([("ghcr.io".to_string(), Usage::default())]);
        u.keep_only(&still);
        assert!(u.may_create("quay.io"));
    }

    #[test]
    fn unmirrored_registries_count_pods_nodes_and_images() {
        let mreg: MirrorRegistry = serde_json::from_value(json!({
            "apiVersion": "pullthrough.dev/v1alpha1", "kind": "MirrorRegistry",
            "metadata": {"name": "q"},
            "spec": {"host": "quay.io", "aliases": ["quay.example"]},
        }))
        .unwrap();
        let m = mirrored([&mreg]);
        let pods = [
            pod(
                "a",
                Some("n1"),
                "Running",
                &["ghcr.io/o/a:1", "quay.io/x/y:1"],
            ),
            pod("b", Some("n2"), "Running", &["ghcr.io/o/b:1", "nginx"]),
            pod("c", None, "Pending", &["ghcr.io/o/a:1", "quay.example/z:1"]),
            pod("d", Some("n3"), "Succeeded", &["gcr.io/done:1"]),
            pod(
                "e",
                Some("n1"),
                "Running",
                &["index.docker.io/library/redis:7"],
            ),
        ];
        let found = unmirrored(&pods, &m);
        assert_eq!(found.keys().collect::<Vec<_>>(), ["docker.io", "ghcr.io"]);
        let g = &found["ghcr.io"];
        assert_eq!(g.pods.len(), 3);
        assert_eq!(g.nodes, ["n1", "n2"].map(String::from).into());
        assert_eq!(
            g.images.iter().collect::<Vec<_>>(),
            ["ghcr.io/o/a:1", "ghcr.io/o/b:1"]
        );
        assert_eq!(found["docker.io"].pods.len(), 2);
        assert_eq!(found["docker.io"].status().nodes, 2);
    }

    /// A reference's host in another case is the same registry: mirrored
    /// if its lowercase is, and one DiscoveredRegistry otherwise.
    #[test]
    fn hosts_are_compared_case_insensitively() {
        let mreg: MirrorRegistry = serde_json::from_value(json!({
            "apiVersion": "pullthrough.dev/v1alpha1", "kind": "MirrorRegistry",
            "metadata": {"name": "q"},
            "spec": {"host": "quay.io"},
        }))
        .unwrap();
        let pods = [pod(
            "a",
            Some("n1"),
            "Running",
            &[
                "Quay.io/x/y:1",
                "QUAY.IO/x/z:1",
                "GHCR.io/o/a:1",
                "ghcr.io/o/b:1",
                "Index.Docker.io/library/redis:7",
            ],
        )];
        let found = unmirrored(&pods, &mirrored([&mreg]));
        assert_eq!(found.keys().collect::<Vec<_>>(), ["docker.io", "ghcr.io"]);
        assert_eq!(found["ghcr.io"].images.len(), 2);
    }
}

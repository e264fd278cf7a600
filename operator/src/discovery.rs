//! Discovery: which registries the cluster's pods pull from that no
//! MirrorRegistry mirrors. Each becomes a `DiscoveredRegistry` (status:
//! pods, nodes, example images) with a `Discovered` Event when first seen;
//! with `--discovery=create` the operator also makes sure a MirrorRegistry
//! exists for it (Event `MirrorRegistryCreated`; one deleted while pods
//! still pull from the host is created again, so turn `create` off before
//! dropping one). A DiscoveredRegistry goes away when a MirrorRegistry
//! covers its host, or [`UNUSED_GRACE`] after the last unfinished pod
//! using it.
//!
//! Any pod in any namespace can name any host, so discovery reports at
//! most [`MAX_DISCOVERED`] registries, creates at most as many
//! MirrorRegistries, and ignores hosts no registry can have.
//!
//! Runs on the stores the pins watch keeps (`crate::pins`), after each
//! change.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use pullthrough_api::crd::MirrorRegistry;
use pullthrough_api::discovered::{
    DiscoveredRegistry, DiscoveredRegistryStatus, EXAMPLE_IMAGES, object_name,
};
use pullthrough_api::names::{DOCKER_HUB, claim_key, reserved_host, validate_host};
use pullthrough_api::pins::PinnedImage;
use serde_json::json;

use crate::FIELD_MANAGER;
use crate::pins::{spec_images, unfinished};
use crate::reserved::ReservedNames;
use crate::table::reason::CLAIMS_NOTHING;

mod create;

use create::{Budget, Creator, RunReserved};
pub use create::{adopt, adopted_by_admin};

/// At most this many registries are reported at a time (a
/// DiscoveredRegistry and a `Discovered` Event each), and at most this many
/// MirrorRegistries labelled [`DISCOVERED_LABEL`] exist for `create` to
/// have made. Without a cap one pod naming hundreds of hosts would make as
/// many cluster-scoped objects and Events (and mirrors, which would free
/// the room for the next hundreds). A cluster pulling from more unmirrored
/// registries than this has a list long enough to start with; the rest are
/// reported once some are mirrored or unused. Registries reported already
/// keep their place; new ones go by pod count. Overflow is logged once.
pub const MAX_DISCOVERED: usize = 50;

/// How long a DiscoveredRegistry stays (with no pods) once no unfinished
/// pod uses its host. A CronJob's pods finish between its runs; without
/// the wait its registry would be discovered anew, with a new Event, every
/// run. Longer than an hourly schedule's gap. Looked at on each run (at
/// least once a minute); remembered by the process only, so a restart
/// starts the wait again. A host a MirrorRegistry covers goes at once.
pub const UNUSED_GRACE: Duration = Duration::from_secs(90 * 60);

pub use pullthrough_api::discovered::DISCOVERED_LABEL;

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

/// The hosts MirrorRegistries cover (hosts and aliases, lowercase): those
/// not being deleted, and not refused from the table for their current
/// spec (`Accepted=False`). One not reconciled yet counts: it is most
/// likely accepted (discovery makes only those it may), and without it a
/// MirrorRegistry just created would be reported, and created again, on
/// the next run.
pub fn mirrored<'a>(registries: impl IntoIterator<Item = &'a MirrorRegistry>) -> BTreeSet<String> {
    registries
        .into_iter()
        .filter(|r| r.metadata.deletion_timestamp.is_none() && !refused(r))
        .flat_map(|r| std::iter::once(&r.spec.host).chain(&r.spec.aliases))
        .map(|h| h.to_ascii_lowercase())
        .collect()
}

/// Whether the table refused `r` for its current spec and it claims no
/// name there. One refused for a CA bundle or Secret it cannot read keeps
/// its names (a MirrorRegistry made for them would be a duplicate).
fn refused(r: &MirrorRegistry) -> bool {
    r.status
        .as_ref()
        .and_then(|s| s.condition("Accepted"))
        .is_some_and(|c| {
            c.status == "False"
                && c.observed_generation == r.metadata.generation
                && CLAIMS_NOTHING.contains(&c.reason.as_str())
        })
}

/// What [`unmirrored`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Found {
    /// Per registry host (lowercase) no MirrorRegistry covers: who pulls
    /// from it.
    pub hosts: BTreeMap<String, Usage>,
    /// How many distinct hosts pods name that no registry can have, and
    /// one of them (cut short) for the log.
    pub invalid: usize,
    pub invalid_example: Option<String>,
    /// The hosts MirrorRegistries cover, as they claim them
    /// ([`claim_key`]): a DiscoveredRegistry for one goes at once, not
    /// after [`UNUSED_GRACE`].
    pub mirrored: BTreeSet<String>,
}

/// Per registry host no MirrorRegistry covers: who pulls from it.
pub fn unmirrored<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    mirrored: &BTreeSet<String>,
) -> Found {
    // Compared as the table compares claims: `quay.io:443` is quay.io's,
    // and a MirrorRegistry made for it would be refused as a duplicate.
    let mut out = Found {
        mirrored: mirrored.iter().map(|h| claim_key(h).into_owned()).collect(),
        ..Found::default()
    };
    let mut invalid = BTreeSet::new();
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
            // One registry under two spellings (`quay.io`, `quay.io:443`) is
            // one claim, reported (and created) once.
            let host = match p.registry.to_ascii_lowercase() {
                h if h == "index.docker.io" || h == "registry-1.docker.io" => {
                    DOCKER_HUB.to_string()
                }
                h => claim_key(&h).into_owned(),
            };
            if out.mirrored.contains(&host) {
                continue;
            }
            // References take hosts of any length, labels over 63
            // characters and ports over 65535: no registry answers there,
            // and an object for one would be refused on every run.
            if validate_host(&host).is_err() {
                invalid.insert(host);
                continue;
            }
            let u = out.hosts.entry(host).or_default();
            u.pods
                .insert((pod.namespace().unwrap_or_default(), pod.name_any()));
            if let Some(node) = &spec.node_name {
                u.nodes.insert(node.clone());
            }
            u.images.insert(p.to_string());
        }
    }
    out.invalid = invalid.len();
    out.invalid_example = invalid.first().map(|h| h.chars().take(80).collect());
    out
}

/// One registry to report.
#[derive(Debug, PartialEq, Eq)]
struct Report<'a> {
    host: &'a str,
    status: DiscoveredRegistryStatus,
    /// False while kept for [`UNUSED_GRACE`]: no MirrorRegistry is created
    /// for a registry no pod uses.
    in_use: bool,
}

/// What one run makes of the DiscoveredRegistries.
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan<'a> {
    /// The registries to report.
    report: Vec<Report<'a>>,
    /// Objects to delete, by name.
    delete: Vec<&'a str>,
    /// Unmirrored registries not reported for [`MAX_DISCOVERED`].
    over_cap: usize,
}

/// Which of `found` to report, given the `existing` objects (by name), and
/// which objects to delete. `unused_since` says since when the hosts of
/// existing objects have been unused; updated for `now`.
fn plan<'a>(
    found: &'a Found,
    existing: &'a BTreeMap<String, DiscoveredRegistry>,
    unused_since: &mut BTreeMap<String, Instant>,
    now: Instant,
) -> Plan<'a> {
    // An object named otherwise than its host is now was named by an older
    // operator (one name for `reg.example:5000` and `reg.example-5000`);
    // the host's own object replaces it.
    let ours = |name: &str, d: &DiscoveredRegistry| name == object_name(&d.spec.host);
    let reported: BTreeSet<&str> = existing
        .iter()
        .filter(|(n, d)| ours(n, d))
        .map(|(_, d)| d.spec.host.as_str())
        .collect();
    let mut hosts: Vec<(&str, &Usage)> = found.hosts.iter().map(|(h, u)| (h.as_str(), u)).collect();
    // Reported ones first: as pod counts shift, no object is deleted and
    // another created in its place, each with its Event.
    hosts.sort_by_key(|&(h, u)| (!reported.contains(h), Reverse(u.pods.len()), h));
    let over_cap = hosts.len().saturating_sub(MAX_DISCOVERED);
    hosts.truncate(MAX_DISCOVERED);
    let mut report: Vec<Report> = hosts
        .into_iter()
        .map(|(host, u)| Report {
            host,
            status: u.status(),
            in_use: true,
        })
        .collect();
    // Reported ones no pod uses now stay a while, in the room left.
    unused_since.retain(|h, _| reported.contains(h.as_str()) && !found.hosts.contains_key(h));
    for (name, d) in existing {
        let host = d.spec.host.as_str();
        if !ours(name, d) || found.hosts.contains_key(host) {
            continue;
        }
        let since = *unused_since.entry(host.to_string()).or_insert(now);
        if found.mirrored.contains(claim_key(host).as_ref())
            || now.saturating_duration_since(since) >= UNUSED_GRACE
            || report.len() >= MAX_DISCOVERED
        {
            unused_since.remove(host);
            continue;
        }
        report.push(Report {
            host,
            status: DiscoveredRegistryStatus {
                pods: 0,
                nodes: 0,
                // What was pulled from it is still what a mirror would
                // prefetch.
                images: d
                    .status
                    .as_ref()
                    .map(|s| s.images.clone())
                    .unwrap_or_default(),
            },
            in_use: false,
        });
    }
    let kept: BTreeSet<&str> = report.iter().map(|r| r.host).collect();
    let delete = existing
        .iter()
        .filter(|(n, d)| !kept.contains(d.spec.host.as_str()) || !ours(n, d))
        .map(|(n, _)| n.as_str())
        .collect();
    Plan {
        report,
        delete,
        over_cap,
    }
}

/// What discovery remembers from one run to the next (a run follows every
/// change to the pods):
/// - the names this installation reserves ([`ReservedNames`]);
/// - the hosts `--discovery=create` makes no MirrorRegistry for, with why:
///   names no MirrorRegistry may have (`localhost:5000`, loopback and
///   link-local IPs, the reserved names: the table would refuse it, and it
///   would take a place under the cap for good), and hosts whose create
///   the API server refused as invalid. A create that can never succeed
///   would otherwise be tried on every run;
/// - since when each reported registry has been unused, for
///   [`UNUSED_GRACE`];
/// - what was left out last run, so that it is logged when it begins, not
///   on every run.
///
/// The operator makes one with [`Memory::new`]; a default one reserves no
/// installation's names, only those every cluster shares.
#[derive(Debug, Default)]
pub struct Memory {
    /// The installation's reserved names, without the proxy Service's
    /// address (read on each run that may create: see [`Creator`]). None:
    /// only the names every cluster shares are refused.
    reserved: Option<ReservedNames>,
    uncreatable: BTreeMap<String, String>,
    /// Since when no pod has used the host of a DiscoveredRegistry.
    unused_since: BTreeMap<String, Instant>,
    /// Unmirrored registries not reported for [`MAX_DISCOVERED`].
    over_cap: usize,
    /// Hosts no registry can have.
    invalid: usize,
    /// Whether creates were skipped for [`MAX_DISCOVERED`].
    create_cap: bool,
    /// Whether the API server refused the last create for RBAC (403).
    create_forbidden: bool,
}

/// Records `now` in `last`; true when it becomes nonzero.
fn begins(last: &mut usize, now: usize) -> bool {
    let began = *last == 0 && now > 0;
    *last = now;
    began
}

impl Memory {
    /// A memory reserving `reserved`: this installation's names
    /// ([`crate::context::Settings::reserved_names`] with the base
    /// config's proxy names), which [`crate::pins::Settings`] carries.
    pub fn new(reserved: ReservedNames) -> Self {
        Self {
            reserved: Some(reserved),
            ..Self::default()
        }
    }

    /// Whether a MirrorRegistry for `host` may be created, given the names
    /// this run reserves (the installation's and the proxy's address; None:
    /// the installation's); the first time one may not, says why (once
    /// per host, not on every pod change).
    pub fn may_create(&mut self, host: &str, reserved: Option<&ReservedNames>) -> bool {
        if self.uncreatable.contains_key(host) {
            return false;
        }
        let reserved = reserved.or(self.reserved.as_ref());
        let Some(why) = validate_host(host)
            .err()
            .or_else(|| reserved_host(host).map(String::from))
            .or_else(|| {
                reserved
                    .and_then(|r| r.why(host))
                    .map(|why| format!("the table refuses it: it is {why}"))
            })
        else {
            return true;
        };
        tracing::info!(%host, %why, "no MirrorRegistry is created for this discovered registry");
        self.uncreatable.insert(host.to_string(), why);
        false
    }

    /// Remembers `host` when the API server refused its MirrorRegistry as
    /// invalid (400, 422): the same object would be refused again. Conflicts,
    /// throttling and server errors are retried. True when remembered.
    pub fn refused(&mut self, host: &str, err: &kube::Error) -> bool {
        match err {
            kube::Error::Api(s) if matches!(s.code, 400 | 422) => {
                self.uncreatable.insert(host.to_string(), s.message.clone());
                true
            }
            _ => false,
        }
    }

    /// Forgets hosts no pod pulls from any more: if one comes back (after a
    /// CRD upgrade, say), its create is tried once again.
    pub fn keep_only(&mut self, found: &BTreeMap<String, Usage>) {
        self.uncreatable.retain(|host, _| found.contains_key(host));
    }

    /// Logs what `found` and `plan` leave out, when it begins.
    fn note_left_out(&mut self, found: &Found, over_cap: usize) {
        if begins(&mut self.invalid, found.invalid) {
            tracing::warn!(
                hosts = found.invalid,
                example = found.invalid_example.as_deref().unwrap_or_default(),
                "pods name registry hosts no registry can have (too long, a bad label or port); not discovered"
            );
        }
        if begins(&mut self.over_cap, over_cap) {
            tracing::warn!(
                left_out = over_cap,
                max = MAX_DISCOVERED,
                "more unmirrored registries than discovery reports; the rest wait until some are mirrored or unused"
            );
        }
    }
}

/// Makes the DiscoveredRegistry objects say `found` (up to
/// [`MAX_DISCOVERED`] of it); in `Create` mode also creates the missing
/// MirrorRegistries, except for hosts `memory` knows cannot have one.
/// Errors are logged: discovery is a report, it never stops pinning.
pub async fn publish(
    client: &Client,
    recorder: &Recorder,
    mode: Mode,
    found: &Found,
    memory: &mut Memory,
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
    memory.keep_only(&found.hosts);
    let plan = plan(found, &existing, &mut memory.unused_since, Instant::now());
    memory.note_left_out(found, plan.over_cap);
    // Deletes first: the objects never outnumber MAX_DISCOVERED, not even
    // while a run replaces some.
    for name in &plan.delete {
        let host = existing.get(*name).map_or("", |d| d.spec.host.as_str());
        tracing::info!(%host, "no longer reported as pulled from unmirrored");
        if let Err(e) = api.delete(name, &DeleteParams::default()).await {
            tracing::warn!(%host, error = %e, "deleting DiscoveredRegistry");
        }
    }
    let mut creator = Creator {
        client,
        recorder,
        budget: Budget::Uncounted,
        reserved: RunReserved::Unread,
    };
    for Report {
        host,
        status,
        in_use,
    } in plan.report
    {
        let name = object_name(host);
        // One deleted just above (named the old way, for another spelling
        // of the host) is no longer there to skip a write for.
        let before = existing
            .get(&name)
            .filter(|_| !plan.delete.iter().any(|d| **d == name));
        if let (Some(d), Mode::Create, true) = (before, mode, in_use) {
            // Found again while create is on: its MirrorRegistry is missing.
            creator.create(d, host, memory).await;
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
            if mode == Mode::Create {
                creator.create(&written, host, memory).await;
            }
        }
    }
}

/// A Normal Event on `obj`; a failure to publish it is logged.
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
        let mut u = Memory::default();
        for host in [
            "localhost:5000",
            "registry.localhost",
            "127.0.0.1:5000",
            "[::1]:5000",
            "169.254.169.254",
            "0.0.0.0:5000",
            "Upper.example",
        ] {
            assert!(!u.may_create(host, None), "{host}");
            assert!(!u.may_create(host, None), "{host}, asked again");
        }
        assert!(u.may_create("ghcr.io", None));
        assert!(u.may_create("registry.example:5000", None));
        assert!(u.may_create("10.0.0.5:5000", None));

        // Refused as invalid: not tried again while pods pull from it.
        let api = |code: u16| {
            kube::Error::Api(Box::new(
                serde_json::from_value(json!({"code": code, "message": "refused"})).unwrap(),
            ))
        };
        for code in [409, 429, 500, 503] {
            assert!(!u.refused("quay.io", &api(code)), "{code}");
            assert!(u.may_create("quay.io", None), "retried after {code}");
        }
        assert!(u.refused("quay.io", &api(422)));
        assert!(!u.may_create("quay.io", None));
        // Once no pod pulls from it, a later return is tried once more.
        let still = BTreeMap::from([("ghcr.io".to_string(), Usage::default())]);
        u.keep_only(&still);
        assert!(u.may_create("quay.io", None));
    }

    /// The installation's names (a cluster Service, the proxy's address)
    /// are refused as the table refuses them: a MirrorRegistry made for
    /// one would be refused for good and hold a place under the cap.
    #[test]
    fn reserved_names_are_not_created() {
        let reserved = ReservedNames::new("ns", "proxy", "cluster.local", None, &[]);
        let mut u = Memory::new(reserved.clone());
        assert!(!u.may_create("registry.kube-system.svc.cluster.local:5000", None));
        assert!(u.may_create("10.96.0.50", None));
        let run = reserved.with_proxy(&[], Some("10.96.0.50"));
        assert!(!u.may_create("10.96.0.50", Some(&run)));
        assert!(!u.may_create("10.96.0.50", None), "remembered");
        assert!(u.may_create("10.96.0.51", Some(&run)));
    }

    fn mreg_with(
        name: &str,
        spec: serde_json::Value,
        accepted: Option<(&str, &str, i64)>,
    ) -> MirrorRegistry {
        let mut m: MirrorRegistry = serde_json::from_value(json!({
            "apiVersion": "pullthrough.dev/v1alpha1", "kind": "MirrorRegistry",
            "metadata": {"name": name, "generation": 2},
            "spec": spec,
        }))
        .unwrap();
        if let Some((status, reason, generation)) = accepted {
            m.status = Some(
                serde_json::from_value(json!({"conditions": [{
                    "type": "Accepted", "status": status, "reason": reason, "message": "",
                    "lastTransitionTime": "2025-01-01T00:00:00Z",
                    "observedGeneration": generation,
                }]}))
                .unwrap(),
            );
        }
        m
    }

    /// A MirrorRegistry the table refused, claiming none of its names,
    /// mirrors nothing; one not reconciled yet, refused for an older spec
    /// or for a Secret it cannot read (its names stay claimed) still does.
    /// `quay.io:443` is quay.io's, as the table claims it.
    #[test]
    fn refused_registries_mirror_nothing_and_claims_compare_as_the_table_does() {
        let regs = [
            mreg_with(
                "dup",
                json!({"host": "dup.example"}),
                Some(("False", "DuplicateHost", 2)),
            ),
            mreg_with(
                "res",
                json!({"host": "res.example"}),
                Some(("False", "ReservedHost", 2)),
            ),
            mreg_with(
                "old",
                json!({"host": "old.example"}),
                Some(("False", "InvalidSpec", 1)),
            ),
            mreg_with(
                "creds",
                json!({"host": "creds.example"}),
                Some(("False", "CredentialsUnavailable", 2)),
            ),
            mreg_with("new", json!({"host": "new.example"}), None),
            mreg_with(
                "quay",
                json!({"host": "quay.io"}),
                Some(("True", "Accepted", 2)),
            ),
        ];
        let m = mirrored(&regs);
        assert_eq!(
            m.iter().map(String::as_str).collect::<Vec<_>>(),
            ["creds.example", "new.example", "old.example", "quay.io"]
        );
        let pods = [pod(
            "a",
            Some("n1"),
            "Running",
            &[
                "dup.example/x:1",
                "quay.io:443/x:1",
                "ghcr.io/o/a:1",
                "ghcr.io:443/o/b:1",
            ],
        )];
        let found = unmirrored(&pods, &m).hosts;
        assert_eq!(found.keys().collect::<Vec<_>>(), ["dup.example", "ghcr.io"]);
        assert_eq!(found["ghcr.io"].images.len(), 2);
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
        let found = unmirrored(&pods, &m).hosts;
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
        let found = unmirrored(&pods, &mirrored([&mreg])).hosts;
        assert_eq!(found.keys().collect::<Vec<_>>(), ["docker.io", "ghcr.io"]);
        assert_eq!(found["ghcr.io"].images.len(), 2);
    }

    fn dreg(name: &str, host: &str) -> DiscoveredRegistry {
        serde_json::from_value(json!({
            "apiVersion": "pullthrough.dev/v1alpha1", "kind": "DiscoveredRegistry",
            "metadata": {"name": name},
            "spec": {"host": host},
        }))
        .unwrap()
    }

    fn by_name(objs: &[DiscoveredRegistry]) -> BTreeMap<String, DiscoveredRegistry> {
        objs.iter().map(|d| (d.name_any(), d.clone())).collect()
    }

    /// One pod naming 500 hosts: at most [`MAX_DISCOVERED`] reported.
    /// Those reported already keep their place; among new ones, more pods
    /// come first.
    #[test]
    fn one_pod_naming_hundreds_of_hosts_is_reported_up_to_the_cap() {
        let images: Vec<String> = (0..500).map(|i| format!("r{i:03}.example/x:1")).collect();
        let images: Vec<&str> = images.iter().map(String::as_str).collect();
        let mut pods = vec![pod("flood", Some("n1"), "Running", &images)];
        for i in 0..3 {
            pods.push(pod(
                &format!("app{i}"),
                Some("n2"),
                "Running",
                &["zz.example/app:1"],
            ));
        }
        let found = unmirrored(&pods, &BTreeSet::new());
        assert_eq!(found.hosts.len(), 501);

        let none = BTreeMap::new();
        let p = plan(&found, &none, &mut BTreeMap::new(), Instant::now());
        assert_eq!(p.report.len(), MAX_DISCOVERED);
        assert_eq!(p.over_cap, 501 - MAX_DISCOVERED);
        assert_eq!(p.report[0].host, "zz.example", "most pods first");
        assert!(p.delete.is_empty());

        // Reported already: kept, though last by name and pod count.
        let existing = by_name(&[dreg("r499.example", "r499.example")]);
        let p = plan(&found, &existing, &mut BTreeMap::new(), Instant::now());
        assert_eq!(p.report.len(), MAX_DISCOVERED);
        assert_eq!(p.report[0].host, "r499.example");
        assert!(p.delete.is_empty(), "{:?}", p.delete);

        // More objects than the cap (an older operator's): the rest go.
        let many: Vec<_> = (0..MAX_DISCOVERED + 5)
            .map(|i| {
                let h = format!("r{i:03}.example");
                dreg(&h, &h)
            })
            .collect();
        let existing = by_name(&many);
        let p = plan(&found, &existing, &mut BTreeMap::new(), Instant::now());
        assert_eq!(p.report.len(), MAX_DISCOVERED);
        assert_eq!(p.delete.len(), 5);
    }

    #[test]
    fn hosts_no_registry_can_have_are_ignored() {
        // Labels of 60 characters, 305 in all.
        let long = format!("{}example/x:1", format!("{}.", "a".repeat(60)).repeat(5));
        let label = format!("{}.example/x:1", "a".repeat(64));
        let pods = [pod(
            "a",
            Some("n1"),
            "Running",
            &[
                &long,
                &label,
                "reg.example:99999/x:1",
                "reg.example:0/x:1",
                "reg.example:5000/x:1",
                "Reg.Example:5000/y:1",
            ],
        )];
        let found = unmirrored(&pods, &BTreeSet::new());
        assert_eq!(found.hosts.keys().collect::<Vec<_>>(), ["reg.example:5000"]);
        assert_eq!(found.invalid, 4, "{found:?}");
        assert!(found.invalid_example.unwrap().len() <= 80);
    }

    /// An object an older operator named `reg.example-5000` for
    /// `reg.example:5000` is replaced by the host's own.
    #[test]
    fn objects_named_otherwise_are_replaced() {
        let pods = [pod("a", Some("n1"), "Running", &["reg.example:5000/x:1"])];
        let found = unmirrored(&pods, &BTreeSet::new());
        let existing = by_name(&[dreg("reg.example-5000", "reg.example:5000")]);
        let p = plan(&found, &existing, &mut BTreeMap::new(), Instant::now());
        assert_eq!(p.report.len(), 1);
        assert_eq!(p.report[0].host, "reg.example:5000");
        assert_eq!(p.delete, ["reg.example-5000"]);
    }

    /// What is left out is logged when it begins, not on every run.
    #[test]
    fn left_out_is_noted_when_it_begins() {
        let mut last = 0;
        assert!(!begins(&mut last, 0));
        assert!(begins(&mut last, 450));
        assert!(!begins(&mut last, 450));
        assert!(!begins(&mut last, 451));
        assert!(!begins(&mut last, 0));
        assert!(begins(&mut last, 1));
    }

    /// A registry no pod uses any more (a CronJob's, between runs) stays
    /// [`UNUSED_GRACE`] with no pods, and its wait starts again when a pod
    /// uses it again.
    #[test]
    fn unused_registries_stay_for_the_grace_period() {
        let mut d = dreg("ghcr.io", "ghcr.io");
        d.status = Some(DiscoveredRegistryStatus {
            pods: 2,
            nodes: 1,
            images: vec!["ghcr.io/o/job:1".into()],
        });
        let existing = by_name(&[d]);
        let none = Found::default();
        let used = unmirrored(
            &[pod("job", Some("n1"), "Running", &["ghcr.io/o/job:1"])],
            &BTreeSet::new(),
        );
        let mut since = BTreeMap::new();
        let t0 = Instant::now();
        let minutes = |m: u64| t0 + Duration::from_secs(60 * m);
        let grace = UNUSED_GRACE.as_secs() / 60;

        let p = plan(&none, &existing, &mut since, t0);
        assert!(p.delete.is_empty());
        assert_eq!(
            p.report,
            [Report {
                host: "ghcr.io",
                status: DiscoveredRegistryStatus {
                    pods: 0,
                    nodes: 0,
                    images: vec!["ghcr.io/o/job:1".into()],
                },
                in_use: false,
            }]
        );
        let p = plan(&none, &existing, &mut since, minutes(grace - 1));
        assert!(p.delete.is_empty(), "still within the grace period");
        // Used again: the wait starts over once it is unused again.
        let p = plan(&used, &existing, &mut since, minutes(grace - 1));
        assert!(p.report[0].in_use);
        let p = plan(&none, &existing, &mut since, minutes(grace));
        assert!(p.delete.is_empty());
        let p = plan(&none, &existing, &mut since, minutes(2 * grace - 1));
        assert!(p.delete.is_empty());
        let p = plan(&none, &existing, &mut since, minutes(2 * grace));
        assert_eq!(p.delete, ["ghcr.io"]);
        assert!(p.report.is_empty());
        assert!(since.is_empty());
    }

    /// Mirrored now: gone at once, not after the grace period.
    #[test]
    fn mirrored_registries_go_at_once() {
        let existing = by_name(&[dreg("ghcr.io", "ghcr.io")]);
        let found = Found {
            mirrored: ["ghcr.io".to_string()].into(),
            ..Found::default()
        };
        let mut since = BTreeMap::new();
        let p = plan(&found, &existing, &mut since, Instant::now());
        assert_eq!(p.delete, ["ghcr.io"]);
        assert!(since.is_empty());
    }

    /// Unused ones take only the room registries in use leave.
    #[test]
    fn unused_registries_make_way_for_used_ones() {
        let unused: Vec<_> = (0..MAX_DISCOVERED)
            .map(|i| {
                let h = format!("old{i:02}.example");
                dreg(&h, &h)
            })
            .collect();
        let existing = by_name(&unused);
        let found = unmirrored(
            &[pod("a", Some("n1"), "Running", &["new.example/x:1"])],
            &BTreeSet::new(),
        );
        let p = plan(&found, &existing, &mut BTreeMap::new(), Instant::now());
        assert_eq!(p.report.len(), MAX_DISCOVERED);
        assert_eq!(p.report[0].host, "new.example");
        assert!(p.report[0].in_use);
        assert_eq!(p.delete.len(), 1);
    }
}

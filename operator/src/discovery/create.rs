//! Discovery's `create` mode: the MirrorRegistries it makes for
//! discovered registries, within [`MAX_DISCOVERED`], never for a name the
//! table would refuse, and the admin's adoption of one by editing it.

use k8s_openapi::api::core::v1::Service;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::events::Recorder;
use kube::{Api, Client, ResourceExt};
use pullthrough_api::crd::MirrorRegistry;
use pullthrough_api::discovered::{DiscoveredRegistry, object_name};
use serde_json::json;

use super::{DISCOVERED_LABEL, MAX_DISCOVERED, Memory, event};
use crate::reserved::ReservedNames;

/// How many more MirrorRegistries `create` may make this run.
#[derive(Debug, Clone, Copy)]
pub(super) enum Budget {
    /// Not counted yet: counted on the first create of a run, so that a run
    /// creating nothing lists nothing.
    Uncounted,
    Left(usize),
    /// The count failed: nothing is created this run.
    Unknown,
}

/// The names one run reserves.
#[derive(Debug)]
pub(super) enum RunReserved {
    /// Not read yet: read on the first create of a run, so that a run
    /// creating nothing reads nothing.
    Unread,
    /// The installation's and the proxy Service's address (None: no
    /// installation's names are known).
    Read(Option<ReservedNames>),
    /// The proxy Service could not be read: nothing is created this run.
    Unknown,
}

/// Makes the MirrorRegistries of one run.
pub(super) struct Creator<'a> {
    pub(super) client: &'a Client,
    pub(super) recorder: &'a Recorder,
    pub(super) budget: Budget,
    pub(super) reserved: RunReserved,
}

impl Creator<'_> {
    /// Creates the MirrorRegistry for `host` unless `memory` knows it cannot
    /// have one, the name is reserved, or [`MAX_DISCOVERED`] labelled ones
    /// exist.
    pub(super) async fn create(
        &mut self,
        found: &DiscoveredRegistry,
        host: &str,
        memory: &mut Memory,
    ) {
        if !memory.may_create(host, None) {
            return;
        }
        if let RunReserved::Unread = self.reserved {
            self.reserved = self.read_reserved(memory.reserved.as_ref()).await;
        }
        match &self.reserved {
            RunReserved::Read(r) => {
                if !memory.may_create(host, r.as_ref()) {
                    return;
                }
            }
            RunReserved::Unread | RunReserved::Unknown => return,
        }
        if let Budget::Uncounted = self.budget {
            self.budget = self.count().await;
        }
        match self.budget {
            Budget::Left(0) => {
                if !memory.create_cap {
                    tracing::warn!(
                        max = MAX_DISCOVERED,
                        "as many MirrorRegistries as discovery creates exist (label {DISCOVERED_LABEL}); no more are created"
                    );
                }
                memory.create_cap = true;
            }
            Budget::Left(n) => {
                memory.create_cap = false;
                match create_mirror(self.client, self.recorder, found, host, memory).await {
                    Created::Yes => self.budget = Budget::Left(n.saturating_sub(1)),
                    Created::No => {}
                    // The others would be refused too.
                    Created::Forbidden => self.budget = Budget::Unknown,
                }
            }
            Budget::Uncounted | Budget::Unknown => {}
        }
    }

    /// `installation` and the address nodes reach the proxy at: its
    /// Service's ClusterIP, as the table's `proxy.address` takes it
    /// (`crate::observe::node_proxy`). It may change with the Service, so
    /// it is read on each run that may create.
    async fn read_reserved(&self, installation: Option<&ReservedNames>) -> RunReserved {
        let Some(names) = installation else {
            return RunReserved::Read(None);
        };
        let (ns, name) = names.proxy_service();
        let api = Api::<Service>::namespaced(self.client.clone(), ns);
        match api.get_opt(name).await {
            Ok(svc) => {
                let ip = svc
                    .and_then(|s| s.spec)
                    .and_then(|s| s.cluster_ip)
                    .filter(|ip| !ip.is_empty() && ip != "None");
                RunReserved::Read(Some(names.clone().with_proxy(&[], ip.as_deref())))
            }
            Err(e) => {
                tracing::warn!(error = %e, service = %format!("{ns}/{name}"), "reading the proxy Service for its address; no MirrorRegistry created this run");
                RunReserved::Unknown
            }
        }
    }

    async fn count(&self) -> Budget {
        let api = Api::<MirrorRegistry>::all(self.client.clone());
        let lp = ListParams::default().labels(&format!("{DISCOVERED_LABEL}=true"));
        match api.list_metadata(&lp).await {
            Ok(l) => Budget::Left(MAX_DISCOVERED.saturating_sub(l.items.len())),
            Err(e) => {
                tracing::warn!(error = %e, "counting the MirrorRegistries discovery created; none created this run");
                Budget::Unknown
            }
        }
    }
}

/// What [`create_mirror`] did.
#[derive(Debug, PartialEq, Eq)]
enum Created {
    Yes,
    No,
    /// Refused for RBAC: no create is tried again this run.
    Forbidden,
}

/// Creates the MirrorRegistry for `host` (defaults: `https://<host>`, every
/// runtime). It keeps [`DISCOVERED_LABEL`] until the admin edits its spec
/// ([`adopted_by_admin`]).
async fn create_mirror(
    client: &Client,
    recorder: &Recorder,
    found: &DiscoveredRegistry,
    host: &str,
    memory: &mut Memory,
) -> Created {
    let api = Api::<MirrorRegistry>::all(client.clone());
    let name = object_name(host);
    let obj = json!({
        "apiVersion": "pullthrough.dev/v1alpha1",
        "kind": "MirrorRegistry",
        "metadata": {"name": name, "labels": {DISCOVERED_LABEL: "true"}},
        "spec": {"host": host},
    });
    let mreg: MirrorRegistry = match serde_json::from_value(obj) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(%host, error = %e, "building the MirrorRegistry");
            return Created::No;
        }
    };
    match api.create(&Default::default(), &mreg).await {
        Ok(_) => {
            memory.create_forbidden = false;
            tracing::info!(%host, mirrorregistry = %name, "MirrorRegistry created for a discovered registry");
            event(
                recorder,
                found,
                "MirrorRegistryCreated",
                format!("created MirrorRegistry {name} (discovery.create)"),
            )
            .await;
            return Created::Yes;
        }
        // The chart grants `create` by a binding of its own, which its
        // uninstall hook deletes first: from then on every replica is
        // refused at once, whatever mode it runs in. Said once, not per
        // host and run.
        Err(kube::Error::Api(e)) if e.code == 403 => {
            if !memory.create_forbidden {
                tracing::warn!(%host, error = %e.message, "not allowed to create MirrorRegistries (RBAC; the chart's uninstall hook removes that grant first): discovered registries are only reported");
            }
            memory.create_forbidden = true;
            return Created::Forbidden;
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            tracing::info!(%host, mirrorregistry = %name, "a MirrorRegistry of that name exists; not created");
        }
        Err(e) if memory.refused(host, &e) => {
            tracing::warn!(%host, error = %e, "the MirrorRegistry was refused; not tried again while pods pull from the host");
        }
        Err(e) => tracing::warn!(%host, error = %e, "creating the MirrorRegistry"),
    }
    Created::No
}

/// Whether `obj` is one discovery created (labelled [`DISCOVERED_LABEL`])
/// whose spec someone has edited since (generation past 1): an admin
/// who added credentials or a CA made it theirs. Such an object loses the
/// label ([`adopt`]), so the chart's uninstall hook, which deletes the
/// labelled ones, keeps it, and the cap no longer counts it.
pub fn adopted_by_admin(obj: &MirrorRegistry) -> bool {
    obj.labels()
        .get(DISCOVERED_LABEL)
        .is_some_and(|v| v == "true")
        && obj.metadata.generation.is_some_and(|g| g > 1)
}

/// Removes [`DISCOVERED_LABEL`] from MirrorRegistry `name`.
pub async fn adopt(client: &Client, name: &str) -> Result<(), kube::Error> {
    let api = Api::<MirrorRegistry>::all(client.clone());
    let patch = json!({"metadata": {"labels": {DISCOVERED_LABEL: null}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map(|_| ())
}

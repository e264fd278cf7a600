//! The MirrorRegistry reconciler (kube-rs controller-rs shape): a
//! [`Context`], `reconcile` wrapped in kube's `finalizer` helper, and an
//! `error_policy` with per-object exponential backoff.
//!
//! Every reconcile converges the *whole* registry table from all
//! MirrorRegistries in the controller's cache (so order of events does not
//! matter), then writes this object's status.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Secret, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{self, Event as Finalizer, finalizer};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use pullthrough_api::agent::NodeProxy;
use pullthrough_api::config::{ConfigError, ProxyConfig};
use pullthrough_api::crd::{MirrorRegistry, MirrorRegistryStatus, condition};
use serde_json::json;

use crate::metrics::Metrics;
use crate::nodes::{self, AgentReport};
use crate::proxy_status::{self, ProxyStatus};
use crate::refs::Refs;
use crate::status::{self, Desired};
use crate::table::{self, Mounts, Table, Verdict};
use crate::{CONFIG_HASH_ANNOTATION, FIELD_MANAGER, FINALIZER};
use pullthrough_api::contract::MANAGED_BY_LABEL;

/// Reconcile errors; [`Error::reason`] labels the failure metric.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
    #[error("rendering the registry table: {0}")]
    Table(#[from] ConfigError),
    #[error("waiting for agents on {0} to drop the registry")]
    WaitingForAgents(String),
}

impl Error {
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube_api",
            Error::Finalizer(e) => match e.as_ref() {
                finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e.reason(),
                _ => "finalizer",
            },
            Error::Table(_) => "table",
            Error::WaitingForAgents(_) => "waiting_for_agents",
        }
    }
}

/// What the reconciler needs from the flags.
#[derive(Debug, Clone)]
pub struct Settings {
    pub namespace: String,
    pub table_configmap: String,
    pub table_mount_path: PathBuf,
    pub credentials_secret: String,
    pub credentials_mount_path: PathBuf,
    pub proxy_service: String,
    pub node_ca_file: PathBuf,
    pub proxy_status_url: Option<String>,
    pub agent_lease_prefix: String,
    pub delete_timeout: Duration,
    pub resync_interval: Duration,
}

impl Settings {
    pub fn from_args(a: &crate::cli::Args) -> Self {
        Self {
            namespace: a.namespace.clone(),
            table_configmap: a.table_configmap.clone(),
            table_mount_path: a.table_mount_path.clone(),
            credentials_secret: a.credentials_secret.clone(),
            credentials_mount_path: a.credentials_mount_path.clone(),
            proxy_service: a.proxy_service.clone(),
            node_ca_file: a.node_ca_file.clone(),
            proxy_status_url: a.proxy_status_url.clone(),
            agent_lease_prefix: a.agent_lease_prefix.clone(),
            delete_timeout: a.delete_timeout,
            resync_interval: a.resync_interval,
        }
    }
}

/// The cluster as last observed (Service, agent Leases, proxy /status),
/// shared by reconciles for a second so 1000 CRs do not mean 1000 LISTs.
#[derive(Debug, Clone)]
pub struct Observed {
    pub node_proxy: Option<NodeProxy>,
    pub reports: Vec<AgentReport>,
    pub proxy: Result<ProxyStatus, String>,
}

const OBSERVED_TTL: Duration = Duration::from_secs(1);

/// The table last written.
struct LastTable {
    fingerprint: u64,
    table: Arc<Table>,
    written_at: Instant,
}

/// Everything the table depends on besides the base config: each CR's
/// identity, spec generation, deletion and age, and the Service's section.
fn fingerprint(all: &[Arc<MirrorRegistry>], proxy: Option<&NodeProxy>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut keys: Vec<_> = all
        .iter()
        .map(|c| {
            (
                c.name_any(),
                c.metadata.uid.clone(),
                c.metadata.generation,
                c.metadata.deletion_timestamp.is_some(),
                c.metadata.creation_timestamp.as_ref().map(|t| t.0),
                // Without a generation (never from a real API server) the
                // spec itself.
                c.metadata
                    .generation
                    .is_none()
                    .then(|| serde_json::to_string(&c.spec).unwrap_or_default()),
            )
        })
        .collect();
    keys.sort();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    keys.hash(&mut h);
    format!("{proxy:?}").hash(&mut h);
    h.finish()
}

/// Shared state of all reconciles.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub base: ProxyConfig,
    pub store: Store<MirrorRegistry>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    last_table: tokio::sync::Mutex<Option<LastTable>>,
    observed: tokio::sync::Mutex<Option<(Instant, Observed)>>,
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        settings: Settings,
        base: ProxyConfig,
        store: Store<MirrorRegistry>,
        identity: &str,
        metrics: Arc<Metrics>,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: Some(identity.into()),
            },
        );
        Self {
            client,
            settings,
            base,
            store,
            recorder,
            metrics,
            last_table: Default::default(),
            observed: Default::default(),
            failures: Default::default(),
        }
    }

    /// The cluster as observed at most [`OBSERVED_TTL`] ago (`fresh`: now).
    async fn observe(&self, fresh: bool) -> Result<Observed, Error> {
        let mut cached = self.observed.lock().await;
        if let Some((at, o)) = cached.as_ref()
            && !fresh
            && at.elapsed() < OBSERVED_TTL
        {
            return Ok(o.clone());
        }
        let ns = &self.settings.namespace;
        let services: Api<Service> = Api::namespaced(self.client.clone(), ns);
        let service = match services.get_opt(&self.settings.proxy_service).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "reading the proxy Service");
                None
            }
        };
        let (node_proxy, admin) = self.node_proxy(service.as_ref());
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), ns);
        let leases = leases.list(&ListParams::default()).await?.items;
        let mut reports =
            nodes::reports(&leases, &self.settings.agent_lease_prefix, Timestamp::now());
        // An expired report from a node that no longer exists is history,
        // not a node waiting to be configured. Nodes are listed only then:
        // in a healthy cluster every report is live.
        if reports.iter().any(|r| !r.live) {
            let node_api: Api<Node> = Api::all(self.client.clone());
            match node_api.list_metadata(&ListParams::default()).await {
                Ok(list) => {
                    let existing: std::collections::HashSet<String> =
                        list.items.iter().map(|n| n.name_any()).collect();
                    nodes::drop_departed(&mut reports, &existing);
                }
                Err(e) => tracing::warn!(error = %e, "listing Nodes; counting every agent Lease"),
            }
        }
        let url = self.settings.proxy_status_url.clone().or(admin);
        let proxy = match url {
            Some(url) => proxy_status::fetch(&url, Duration::from_secs(2)).await,
            None => Err(format!(
                "proxy Service {ns}/{} not found and no --proxy-status-url",
                self.settings.proxy_service
            )),
        };
        let o = Observed {
            node_proxy,
            reports,
            proxy,
        };
        *cached = Some((Instant::now(), o.clone()));
        Ok(o)
    }

    /// The table's `proxy:` section from the Service (base config's section
    /// as defaults), and the default /status URL.
    fn node_proxy(&self, svc: Option<&Service>) -> (Option<NodeProxy>, Option<String>) {
        let base = self.base.proxy.clone();
        let Some(spec) = svc.and_then(|s| s.spec.as_ref()) else {
            return (base, None);
        };
        let Some(ip) = spec
            .cluster_ip
            .clone()
            .filter(|ip| !ip.is_empty() && ip != "None")
        else {
            return (base, None);
        };
        let port = |name: &str| {
            spec.ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .and_then(|p| u16::try_from(p.port).ok())
        };
        let mut np = base.unwrap_or(NodeProxy {
            address: String::new(),
            https_port: 443,
            http_port: None,
            ready_url: None,
            ca_file: None,
            never_hijack: Vec::new(),
        });
        np.address = ip;
        if let Some(p) = port("https") {
            np.https_port = p;
        }
        np.http_port = port("http").or(np.http_port);
        np.ca_file = Some(self.settings.node_ca_file.clone());
        let host = np.host_for_url();
        let admin = port("admin");
        if let Some(a) = admin {
            np.ready_url = Some(format!("http://{host}:{a}/readyz"));
        }
        (Some(np), admin.map(|a| format!("http://{host}:{a}/status")))
    }

    /// Renders the table from the cache (with `current` replacing its cached
    /// copy) and applies it when it changed.
    async fn converge_table(
        &self,
        current: &Arc<MirrorRegistry>,
        obs: &Observed,
    ) -> Result<Arc<Table>, Error> {
        let name = current.name_any();
        // Under the lock, from the cache as it is now: reconciles queued
        // behind a write find their object already in the written table and
        // skip (one write per burst, not one per object). Rendering is
        // skipped too while no spec, claim order or Service changed.
        let mut last = self.last_table.lock().await;
        let mut all: Vec<Arc<MirrorRegistry>> = self
            .store
            .state()
            .into_iter()
            .filter(|c| c.name_any() != name)
            .collect();
        all.push(current.clone());
        let fp = fingerprint(&all, obs.node_proxy.as_ref());
        let fresh = |at: &Instant| at.elapsed() < self.settings.resync_interval;
        if let Some(l) = last.as_ref()
            && l.fingerprint == fp
            && fresh(&l.written_at)
        {
            return Ok(l.table.clone());
        }
        // Referenced ConfigMaps and Secrets are read on every render, so a
        // change to one reaches the table within --resync-interval.
        let refs = Refs::read(&self.client, all.iter().map(AsRef::as_ref)).await?;
        let mounts = Mounts {
            table: self.settings.table_mount_path.clone(),
            credentials: self.settings.credentials_mount_path.clone(),
        };
        let t = Arc::new(table::render(
            &self.base,
            &all,
            obs.node_proxy.clone(),
            &mounts,
            &refs,
        )?);
        if let Some(l) = last.as_mut()
            && l.table.hash == t.hash
            && l.table.credentials == t.credentials
            && fresh(&l.written_at)
        {
            l.fingerprint = fp;
            l.table = t.clone();
            return Ok(t);
        }
        // Credentials first: when the table names a credentials file, the
        // Secret behind it already holds it. Written once after a start
        // (dropping keys left from registries deleted meanwhile), then on
        // change.
        if last
            .as_ref()
            .is_none_or(|l| l.table.credentials != t.credentials)
        {
            self.apply_credentials(&t.credentials).await?;
        }
        let mut data = serde_json::Map::new();
        data.insert(table::CONFIG_KEY.into(), json!(t.yaml));
        for (k, v) in &t.extra {
            data.insert(k.clone(), json!(v));
        }
        let cm = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": self.settings.table_configmap,
                "namespace": self.settings.namespace,
                "labels": {MANAGED_BY_LABEL: FIELD_MANAGER},
                "annotations": {CONFIG_HASH_ANNOTATION: t.hash},
            },
            "data": data,
        });
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.settings.namespace);
        cms.patch(
            &self.settings.table_configmap,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&cm),
        )
        .await?;
        if last.as_ref().is_none_or(|l| l.table.hash != t.hash) {
            let accepted = t
                .verdicts
                .values()
                .filter(|v| **v == Verdict::Accepted)
                .count();
            tracing::info!(hash = %t.hash, registries = accepted, "registry table applied");
            self.metrics.table_writes.inc();
        }
        *last = Some(LastTable {
            fingerprint: fp,
            table: t.clone(),
            written_at: Instant::now(),
        });
        Ok(t)
    }

    /// Server-side applies the proxy's credentials Secret with exactly
    /// `keys` (keys this manager wrote before and no longer lists go away).
    async fn apply_credentials(&self, keys: &BTreeMap<String, String>) -> Result<(), Error> {
        let secret = json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": self.settings.credentials_secret,
                "namespace": self.settings.namespace,
                "labels": {MANAGED_BY_LABEL: FIELD_MANAGER},
            },
            "type": "Opaque",
            // `data`, not `stringData`: the API server folds stringData into
            // data, so server-side apply would never remove a dropped key.
            "data": keys
                .iter()
                .map(|(k, v)| (k.clone(), base64::engine::general_purpose::STANDARD.encode(v)))
                .collect::<BTreeMap<_, _>>(),
        });
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.settings.namespace);
        api.patch(
            &self.settings.credentials_secret,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&secret),
        )
        .await?;
        tracing::info!(
            secret = %self.settings.credentials_secret,
            registries = keys.len(),
            "upstream credentials applied"
        );
        Ok(())
    }

    async fn event(&self, obj: &MirrorRegistry, type_: EventType, reason: &str, note: String) {
        let ev = KubeEvent {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, "publishing an event");
        }
    }
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// The conditions of an existing (not deleting) MirrorRegistry.
pub fn desired_conditions(
    verdict: Option<&Verdict>,
    host: &str,
    table: &Table,
    obs: &Observed,
) -> (Vec<Desired>, pullthrough_api::crd::NodeCounts) {
    let counts = nodes::counts(&obs.reports, host);
    let accepted = match verdict {
        Some(Verdict::Accepted) => Desired::new(
            condition::ACCEPTED,
            true,
            "Valid",
            "the registry is in the registry table",
        ),
        Some(Verdict::Rejected { reason, message }) => {
            Desired::new(condition::ACCEPTED, false, reason.clone(), message.clone())
        }
        None => Desired::new(condition::ACCEPTED, false, "Unknown", "not rendered"),
    };
    if !accepted.status {
        let msg = "the registry is not accepted";
        return (
            vec![
                accepted,
                Desired::new(condition::PROXY_READY, false, "NotAccepted", msg),
                Desired::new(condition::NODES_CONFIGURED, false, "NotAccepted", msg),
            ],
            counts,
        );
    }
    let proxy = match &obs.proxy {
        Err(e) => Desired::new(condition::PROXY_READY, false, "ProxyUnreachable", e.clone()),
        Ok(s) if s.config_hash != table.hash => Desired::new(
            condition::PROXY_READY,
            false,
            "ConfigPending",
            format!(
                "the proxy runs config {}, the table is {}",
                short(&s.config_hash),
                short(&table.hash)
            ),
        ),
        Ok(s) if !s.registries.iter().any(|r| r == host) => Desired::new(
            condition::PROXY_READY,
            false,
            "NotServed",
            "the proxy runs the current table but does not list this registry",
        ),
        Ok(_) => Desired::new(
            condition::PROXY_READY,
            true,
            "Serving",
            "the proxy serves the current registry table",
        ),
    };
    let errors: Vec<String> = obs
        .reports
        .iter()
        .filter_map(|r| r.last_error.as_ref().map(|e| format!("{}: {e}", r.node)))
        .collect();
    let nodes = if counts.total == 0 {
        Desired::new(
            condition::NODES_CONFIGURED,
            false,
            "NoAgents",
            "no node agent has reported",
        )
    } else if counts.configured == counts.total {
        Desired::new(
            condition::NODES_CONFIGURED,
            true,
            "AllNodesConfigured",
            format!("{} nodes configured", counts.summary()),
        )
    } else {
        let mut m = format!("{} nodes configured", counts.summary());
        if !errors.is_empty() {
            m.push_str("; errors: ");
            m.push_str(&errors.join("; "));
        }
        Desired::new(condition::NODES_CONFIGURED, false, "Pending", m)
    };
    (vec![accepted, proxy, nodes], counts)
}

async fn apply(obj: Arc<MirrorRegistry>, ctx: &Context) -> Result<Action, Error> {
    let name = obj.name_any();
    let obs = ctx.observe(false).await?;
    let table = ctx.converge_table(&obj, &obs).await?;
    let (desired, counts) =
        desired_conditions(table.verdicts.get(&name), &obj.spec.host, &table, &obs);
    let old = obj.status.as_ref();
    let (conditions, changed) =
        status::merge(old, &desired, obj.metadata.generation, Timestamp::now());
    let accepted = desired.first().is_some_and(|d| d.status);
    let new = MirrorRegistryStatus {
        observed_generation: obj.metadata.generation,
        conditions,
        nodes: accepted.then_some(counts),
        nodes_summary: accepted.then(|| counts.summary()),
        // The proxy's counters while it answers; the last known otherwise.
        cache: match &obs.proxy {
            Ok(p) if accepted => p.cache.get(&obj.spec.host).copied(),
            _ => old.and_then(|s| s.cache),
        },
    };
    if old != Some(&new) {
        let api: Api<MirrorRegistry> = Api::all(ctx.client.clone());
        // A JSON merge patch replaces lists whole; null clears dropped fields.
        let mut st = serde_json::to_value(&new).map_err(|e| {
            Error::Table(ConfigError {
                key: "status".into(),
                message: e.to_string(),
            })
        })?;
        if let Some(m) = st.as_object_mut() {
            for k in ["nodes", "nodesSummary"] {
                m.entry(k).or_insert(serde_json::Value::Null);
            }
        }
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": st })),
        )
        .await?;
    }
    // One Event per reconcile that changed conditions, naming every change;
    // its reason is the first condition that turned False (else the first).
    if let Some(lead) = changed
        .iter()
        .find(|c| c.status == "False" && c.reason != "NotAccepted")
        .or(changed.first())
    {
        let type_ = if lead.status == "True" || lead.reason == "NotAccepted" {
            EventType::Normal
        } else {
            EventType::Warning
        };
        let note = changed
            .iter()
            .map(|c| format!("{}={} ({}): {}", c.type_, c.status, c.reason, c.message))
            .collect::<Vec<_>>()
            .join("; ");
        ctx.event(&obj, type_, &lead.reason, note).await;
    }
    // Proxy reloads and agent reports are not watched (a Lease watch would
    // wake every CR on every node's renewal): while an accepted registry is
    // still waiting for them, look again soon, so `kubectl apply` shows
    // ProxyReady and NodesConfigured within seconds instead of a resync.
    let waiting = accepted && desired.iter().skip(1).any(|d| !d.status);
    Ok(Action::requeue(if waiting {
        PENDING_RECHECK.min(ctx.settings.resync_interval)
    } else {
        ctx.settings.resync_interval
    }))
}

/// How soon a registry waiting for the proxy or the nodes is looked at again.
const PENDING_RECHECK: Duration = Duration::from_secs(2);

async fn cleanup(obj: Arc<MirrorRegistry>, ctx: &Context) -> Result<Action, Error> {
    // Fresh: whether agents still list the host decides the finalizer.
    let obs = ctx.observe(true).await?;
    let table = ctx.converge_table(&obj, &obs).await?;
    let host = &obj.spec.host;
    // Another MirrorRegistry may now serve the host: nothing to wait for.
    let served = pullthrough_api::config::ProxyConfig::from_yaml(&table.yaml)
        .map(|c| c.registry(host).is_some())
        .unwrap_or(false);
    let waiting = if served {
        Vec::new()
    } else {
        nodes::still_listing(&obs.reports, host)
    };
    if !waiting.is_empty() {
        let since = obj
            .metadata
            .deletion_timestamp
            .as_ref()
            .map_or(Timestamp::now(), |t| t.0);
        let elapsed = Timestamp::now().as_second() - since.as_second();
        if elapsed < ctx.settings.delete_timeout.as_secs() as i64 {
            return Err(Error::WaitingForAgents(waiting.join(",")));
        }
        ctx.event(
            &obj,
            EventType::Warning,
            "CleanupTimeout",
            format!(
                "nodes {} still list {host} after {:?}; removing the finalizer anyway",
                waiting.join(","),
                ctx.settings.delete_timeout
            ),
        )
        .await;
    }
    ctx.event(
        &obj,
        EventType::Normal,
        "Removed",
        format!("{host} removed from the registry table"),
    )
    .await;
    Ok(Action::await_change())
}

/// One reconcile: finalizer first, then apply or cleanup.
pub async fn reconcile(obj: Arc<MirrorRegistry>, ctx: Arc<Context>) -> Result<Action, Error> {
    let start = Instant::now();
    ctx.metrics.reconciles.inc();
    let api: Api<MirrorRegistry> = Api::all(ctx.client.clone());
    let name = obj.name_any();
    let res = finalizer(&api, FINALIZER, obj, |ev| async {
        match ev {
            Finalizer::Apply(o) => apply(o, &ctx).await,
            Finalizer::Cleanup(o) => cleanup(o, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics.duration.observe(start.elapsed().as_secs_f64());
    if res.is_ok()
        && let Ok(mut f) = ctx.failures.lock()
    {
        f.remove(&name);
    }
    res
}

/// Backoff per object: 1 s doubling to 5 min; agents get a steady 2 s poll.
pub fn error_policy(obj: Arc<MirrorRegistry>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failure(err.reason());
    if err.reason() == "waiting_for_agents" {
        tracing::info!(name = %obj.name_any(), "{err}");
        return Action::requeue(Duration::from_secs(2));
    }
    tracing::warn!(name = %obj.name_any(), error = %err, "reconcile failed");
    let n = ctx
        .failures
        .lock()
        .map(|mut f| {
            let n = f.entry(obj.name_any()).or_insert(0);
            *n = n.saturating_add(1);
            *n
        })
        .unwrap_or(1);
    let secs = 1u64 << n.saturating_sub(1).min(9);
    Action::requeue(Duration::from_secs(secs.min(300)))
}

/// Runs the controller until `stop` fires.
pub async fn run(
    client: Client,
    settings: Settings,
    base: ProxyConfig,
    identity: String,
    metrics: Arc<Metrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let api: Api<MirrorRegistry> = Api::all(client.clone());
    let controller = Controller::new(api, watcher::Config::default().any_semantic());
    let store = controller.store();
    let ctx = Arc::new(Context::new(
        client, settings, base, store, &identity, metrics,
    ));
    controller
        .graceful_shutdown_on(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "controller");
            }
        })
        .await;
}

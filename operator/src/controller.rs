//! The MirrorRegistry reconciler (kube-rs controller-rs shape): the shared
//! [`Context`], `reconcile` wrapped in kube's `finalizer` helper, and the
//! `error_policy` that turns an [`Error`]'s [`Retry`] into a requeue.
//!
//! Every reconcile converges the *whole* registry table from all
//! MirrorRegistries in the controller's cache (so order of events does not
//! matter), then writes this object's status.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{Predicate, PredicateConfig, WatchStreamExt, predicates, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use pullthrough_api::config::ProxyConfig;
use pullthrough_api::crd::{MirrorRegistry, MirrorRegistryStatus};

pub use crate::context::{Config, Kube, Settings};
use crate::discovery::{self, DISCOVERED_LABEL};
use crate::error::{self, Error, KubeContext as _, Retry};
use crate::metrics::Metrics;
use crate::nodes;
use crate::observe::{Observed, Observer};
use crate::publish::Publisher;
use crate::status::{self, Note};
use crate::tag_moves;
use crate::{FIELD_MANAGER, FINALIZER};

/// What reconciles share between runs.
#[derive(Default)]
struct State {
    observer: Observer,
    publisher: Publisher,
    failures: Failures,
    pace: Pace,
    told: tag_moves::Told,
}

/// Per object: how soon a registry that waits is looked at again, and
/// when the proxy's counters were last written to its status.
#[derive(Default)]
struct Pace(Mutex<HashMap<String, Paced>>);

#[derive(Default, Clone, Copy)]
struct Paced {
    /// The last recheck delay while waiting; `None`: not waiting.
    recheck: Option<Duration>,
    /// When the status last carried fresh proxy counters.
    figures_at: Option<Instant>,
}

impl Pace {
    fn with<T>(&self, name: &str, f: impl FnOnce(&mut Paced) -> T) -> T {
        match self.0.lock() {
            Ok(mut m) => f(m.entry(name.to_string()).or_default()),
            // A poisoned lock only loses the pace: as for a new object.
            Err(_) => f(&mut Paced::default()),
        }
    }

    /// The requeue of a registry that is `waiting` for the proxy or the
    /// nodes: [`PENDING_RECHECK`] after a status change, else double the
    /// last delay, up to `resync` (a NotReady node can keep a registry
    /// waiting for days, and each look LISTs Leases and Nodes).
    fn requeue(&self, name: &str, waiting: bool, changed: bool, resync: Duration) -> Duration {
        self.with(name, |p| {
            if !waiting {
                p.recheck = None;
                return resync;
            }
            let next = match p.recheck {
                Some(last) if !changed => last.saturating_mul(2),
                _ => PENDING_RECHECK,
            }
            .min(resync);
            p.recheck = Some(next);
            next
        })
    }

    /// Whether the proxy's counters are due in the status again: they
    /// change with every pull, so they alone are written once per `resync`,
    /// not on every recheck.
    fn figures_due(&self, name: &str, resync: Duration) -> bool {
        self.with(name, |p| p.figures_at.is_none_or(|t| t.elapsed() >= resync))
    }

    fn figures_written(&self, name: &str) {
        self.with(name, |p| p.figures_at = Some(Instant::now()));
    }

    fn forget(&self, name: &str) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(name);
        }
    }
}

/// `status` without the proxy's live figures (counters and rate limits).
fn without_figures(status: &MirrorRegistryStatus) -> MirrorRegistryStatus {
    MirrorRegistryStatus {
        cache: None,
        upstream: None,
        ..status.clone()
    }
}

/// Consecutive failures per object, for its backoff.
#[derive(Default)]
struct Failures(Mutex<HashMap<String, u32>>);

impl Failures {
    /// Counts one more failure of `name`; returns the count.
    fn record(&self, name: &str) -> u32 {
        // A poisoned lock only loses the count: back off as after one.
        self.0
            .lock()
            .map(|mut f| {
                let n = f.entry(name.to_string()).or_insert(0);
                *n = n.saturating_add(1);
                *n
            })
            .unwrap_or(1)
    }

    fn clear(&self, name: &str) {
        if let Ok(mut f) = self.0.lock() {
            f.remove(name);
        }
    }
}

/// Shared by all reconciles.
pub struct Context {
    pub config: Config,
    pub kube: Kube,
    pub metrics: Arc<Metrics>,
    state: State,
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
            config: Config { settings, base },
            kube: Kube {
                client,
                store,
                recorder,
                instance: identity.into(),
            },
            metrics,
            state: State::default(),
        }
    }

    /// Tells `ca_names` what each rendered table needs the CA to permit
    /// (see [`crate::ca`]).
    pub fn with_ca_names(
        mut self,
        ca_names: tokio::sync::watch::Sender<Option<pullthrough_api::pki::PermittedNames>>,
    ) -> Self {
        self.state.publisher = Publisher::with_ca_names(ca_names);
        self
    }

    async fn observe(&self, fresh: bool) -> Result<Observed, Error> {
        self.state
            .observer
            .observe(
                &self.kube.client,
                &self.config.settings,
                self.config.base.proxy.as_ref(),
                fresh,
            )
            .await
    }

    async fn converge_table(
        &self,
        current: &Arc<MirrorRegistry>,
        obs: &Observed,
    ) -> Result<Arc<crate::table::Table>, Error> {
        self.state
            .publisher
            .converge(
                &self.config,
                &self.kube,
                &self.metrics,
                Some(current),
                obs.node_proxy.as_ref(),
            )
            .await
    }

    /// Events are best effort: a failed one must not fail the reconcile.
    async fn event(&self, obj: &MirrorRegistry, n: Note) {
        let ev = KubeEvent {
            type_: n.type_,
            reason: n.reason,
            note: Some(n.note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.kube.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, "publishing an event");
        }
    }
}

/// How soon a registry waiting for the proxy or the nodes is looked at again.
const PENDING_RECHECK: Duration = Duration::from_secs(2);

async fn apply(obj: Arc<MirrorRegistry>, ctx: &Context) -> Result<Action, Error> {
    let settings = &ctx.config.settings;
    let name = obj.name_any();
    if discovery::adopted_by_admin(&obj) {
        discovery::adopt(&ctx.kube.client, &name)
            .await
            .context(|| format!("removing label {DISCOVERED_LABEL} from {name}"))?;
        let note = Note {
            type_: EventType::Normal,
            reason: "Adopted".into(),
            note: format!(
                "spec edited since discovery created it: label {DISCOVERED_LABEL} removed; helm uninstall keeps it, and the discovery cap no longer counts it"
            ),
        };
        ctx.event(&obj, note).await;
    }
    let obs = ctx.observe(false).await?;
    let table = ctx.converge_table(&obj, &obs).await?;
    ctx.metrics
        .set_nodes(&nodes::states(&obs.reports, &table.hash));
    let tables = table
        .entries
        .get(&obj.spec.host)
        .map(|digest| {
            ctx.state
                .publisher
                .tables_with_entry(&obj.spec.host, digest)
        })
        .unwrap_or_default();
    let (desired, counts) = status::desired_conditions(
        table.verdicts.get(&name),
        &obj.spec.host,
        &table,
        &tables,
        &obs,
    );
    let old = obj.status.as_ref();
    let (conditions, changed) =
        status::merge(old, &desired, obj.metadata.generation, Timestamp::now());
    let accepted = desired.first().is_some_and(|d| d.status);
    let last_move = old.and_then(|s| s.last_tag_move.as_ref());
    let moved = match &obs.proxy {
        Ok(p) if accepted => ctx
            .state
            .told
            .unseen(&p.tag_moves, &obj.spec.host, last_move),
        _ => Vec::new(),
    };
    let mut new = MirrorRegistryStatus {
        observed_generation: obj.metadata.generation,
        conditions,
        nodes: accepted.then_some(counts),
        nodes_summary: accepted.then(|| counts.summary()),
        // The proxy's counters while it answers; the last known otherwise.
        cache: match &obs.proxy {
            Ok(p) if accepted => p.cache.get(&obj.spec.host).copied(),
            _ => old.and_then(|s| s.cache),
        },
        upstream: match &obs.proxy {
            Ok(p) if accepted => p.upstream.get(&obj.spec.host).cloned(),
            _ => old.and_then(|s| s.upstream.clone()),
        },
        last_tag_move: tag_moves::latest(&moved, last_move),
    };
    let pace = &ctx.state.pace;
    // Only the proxy's figures changed: they wait for the resync.
    let figures_only = old.is_some_and(|o| without_figures(o) == without_figures(&new));
    if figures_only && !pace.figures_due(&name, settings.resync_interval) {
        new.cache = old.and_then(|s| s.cache);
        new.upstream = old.and_then(|s| s.upstream.clone());
    }
    // Unchanged status is not written: a restart makes no writes.
    if old != Some(&new) {
        status::apply(&ctx.kube.client, &name, &new).await?;
        pace.figures_written(&name);
    }
    if let Some(note) = status::change_event(&changed) {
        ctx.event(&obj, note).await;
    }
    // After the status that records them: a failed write retries the
    // reconcile, and the moves are told then instead of twice.
    for note in tag_moves::notes(&obj.spec.host, &moved) {
        tag_moves::publish(&ctx.kube, &obj.object_ref(&()), note).await;
    }
    if let Ok(p) = &obs.proxy
        && accepted
    {
        ctx.state.told.told(&moved, &p.tag_moves);
    }
    // Proxy reloads and agent reports are not watched (a Lease watch would
    // wake every CR on every node's renewal): while an accepted registry is
    // still waiting for them, look again soon, so `kubectl apply` shows
    // ProxyReady and NodesConfigured within seconds instead of a resync.
    // The recheck backs off while nothing changes (a NotReady node's
    // agent may not report for days).
    let waiting = accepted && desired.iter().skip(1).any(|d| !d.status);
    let changed = old.map(without_figures) != Some(without_figures(&new));
    Ok(Action::requeue(pace.requeue(
        &name,
        waiting,
        changed,
        settings.resync_interval,
    )))
}

async fn cleanup(obj: Arc<MirrorRegistry>, ctx: &Context) -> Result<Action, Error> {
    let settings = &ctx.config.settings;
    // Fresh: whether agents still list the host decides the finalizer.
    let obs = ctx.observe(true).await?;
    let table = ctx.converge_table(&obj, &obs).await?;
    let host = &obj.spec.host;
    // Another MirrorRegistry may now serve the host: nothing to wait for.
    let served = ProxyConfig::from_yaml(&table.yaml)
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
        if elapsed < settings.delete_timeout.as_secs() as i64 {
            return Err(Error::WaitingForAgents {
                host: host.clone(),
                nodes: waiting.iter().map(|n| n.to_string()).collect(),
            });
        }
        let note = Note {
            type_: EventType::Warning,
            reason: "CleanupTimeout".into(),
            note: format!(
                "nodes {} still list {host} after {:?}; removing the finalizer anyway",
                waiting.join(","),
                settings.delete_timeout
            ),
        };
        ctx.event(&obj, note).await;
    }
    ctx.state.pace.forget(&obj.name_any());
    ctx.state.told.forget(host);
    let note = Note {
        type_: EventType::Normal,
        reason: "Removed".into(),
        note: format!("{host} removed from the registry table"),
    };
    ctx.event(&obj, note).await;
    Ok(Action::await_change())
}

/// One reconcile: finalizer first, then apply or cleanup.
pub async fn reconcile(obj: Arc<MirrorRegistry>, ctx: Arc<Context>) -> Result<Action, Error> {
    let start = Instant::now();
    ctx.metrics.reconciles.inc();
    let api: Api<MirrorRegistry> = Api::all(ctx.kube.client.clone());
    let name = obj.name_any();
    let res = finalizer(&api, FINALIZER, obj, |ev| async {
        match ev {
            Finalizer::Apply(o) => apply(o, &ctx).await,
            Finalizer::Cleanup(o) => cleanup(o, &ctx).await,
        }
    })
    .await
    .map_err(Error::from_finalizer);
    ctx.metrics.duration.observe(start.elapsed().as_secs_f64());
    if res.is_ok() {
        ctx.state.failures.clear(&name);
    }
    res
}

/// Counts the failure, then polls or backs off as the error says; the
/// backoff is per object, so one broken registry does not slow the others.
pub fn error_policy(obj: Arc<MirrorRegistry>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failure(err.reason());
    let name = obj.name_any();
    match err.retry() {
        Retry::Poll(every) => {
            tracing::info!(%name, "{err}");
            Action::requeue(every)
        }
        Retry::Backoff => {
            tracing::warn!(%name, error = %err, "reconcile failed");
            Action::requeue(error::backoff(ctx.state.failures.record(&name)))
        }
    }
}

/// Converges the table outside any reconcile. Reconciles run per
/// MirrorRegistry, so with none there would be no table: the proxy (which
/// mounts it) would never start after a fresh `helm install`. Once the
/// first list is in the cache, converge the table as it stands, registries
/// or not (never before: an empty cache would drop every registry from the
/// nodes), retrying until it is written; then again each time `due` is
/// notified ([`table_due`]: a registry left the cache, and no reconcile
/// runs for an object that is gone).
pub async fn publish_table(ctx: Arc<Context>, due: Arc<tokio::sync::Notify>) {
    // Re-polled each second: the store's readiness signal wakes only the
    // waiter polled last (kube-runtime's DelayedInit keeps one waker), and
    // the controller's own runner waits on it too.
    loop {
        match tokio::time::timeout(Duration::from_secs(1), ctx.kube.store.wait_until_ready()).await
        {
            Ok(Ok(())) => break,
            Ok(Err(_)) => return,
            Err(_elapsed) => continue,
        }
    }
    loop {
        let mut attempt = 0;
        loop {
            let published = match ctx.observe(true).await {
                Ok(obs) => ctx
                    .state
                    .publisher
                    .converge(
                        &ctx.config,
                        &ctx.kube,
                        &ctx.metrics,
                        None,
                        obs.node_proxy.as_ref(),
                    )
                    .await
                    .map(|_| ()),
                Err(e) => Err(e),
            };
            match published {
                Ok(()) => break,
                Err(e) => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "publishing the registry table failed; retrying");
                    tokio::time::sleep(error::backoff(attempt)).await;
                }
            }
        }
        // A notification while converging is kept (one permit), so a
        // deletion during a write is converged right after it.
        due.notified().await;
    }
}

/// Keeps `pullthrough_operator_nodes` current without reconciles (there
/// are none while no MirrorRegistry exists): every resync interval, the
/// agents' reports against the table last written.
async fn refresh_node_metrics(ctx: Arc<Context>) {
    loop {
        if let Some(hash) = ctx.state.publisher.last_hash().await {
            match ctx.observe(false).await {
                Ok(obs) => ctx.metrics.set_nodes(&nodes::states(&obs.reports, &hash)),
                Err(e) => tracing::debug!(error = %e, "observing the nodes for metrics"),
            }
        }
        tokio::time::sleep(ctx.config.settings.resync_interval).await;
    }
}

/// Whether the object is being deleted (a trigger even where the API
/// server does not bump the generation for it).
fn deleting(obj: &MirrorRegistry) -> Option<u64> {
    Some(u64::from(obj.metadata.deletion_timestamp.is_some()))
}

/// Whether a watch event changes the table with no reconcile to follow:
/// a registry gone from the cache (an admin stripped the finalizer of one
/// whose deletion was stuck, so no cleanup ran), or the end of a (re)list,
/// which drops registries deleted while the watch was down without a
/// Delete. `applied_objects` passes neither on to the controller.
pub fn table_due(ev: &watcher::Event<MirrorRegistry>) -> bool {
    matches!(ev, watcher::Event::Delete(_) | watcher::Event::InitDone)
}

/// The controller's trigger stream from the watch `events`: each event
/// goes into the cache (`writer`), [`table_due`] ones notify `due` (for
/// [`publish_table`]), and a reconcile is triggered only by what the spec
/// or metadata says, never by a status write (the operator's own, with the
/// proxy's counters, would otherwise wake it each time).
pub fn changes<S>(
    events: S,
    writer: reflector::store::Writer<MirrorRegistry>,
    due: Arc<tokio::sync::Notify>,
) -> impl futures::Stream<Item = Result<MirrorRegistry, watcher::Error>> + Send
where
    S: futures::Stream<Item = Result<watcher::Event<MirrorRegistry>, watcher::Error>> + Send,
{
    events
        .reflect(writer)
        .inspect_ok(move |ev| {
            if table_due(ev) {
                due.notify_one();
            }
        })
        .applied_objects()
        .predicate_filter(
            predicates::generation
                .combine(predicates::labels)
                .combine(predicates::annotations)
                .combine(predicates::finalizers)
                .combine(deleting),
            PredicateConfig::default(),
        )
}

/// Runs the controller until `stop` fires.
pub async fn run(
    client: Client,
    settings: Settings,
    base: ProxyConfig,
    identity: String,
    metrics: Arc<Metrics>,
    ca_names: tokio::sync::watch::Sender<Option<pullthrough_api::pki::PermittedNames>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let api: Api<MirrorRegistry> = Api::all(client.clone());
    let (store, writer) = reflector::store();
    let due = Arc::new(tokio::sync::Notify::new());
    let events = watcher(api, watcher::Config::default().any_semantic()).default_backoff();
    let controller = Controller::for_stream(changes(events, writer, due.clone()), store.clone());
    let ctx = Arc::new(
        Context::new(client, settings, base, store, &identity, metrics).with_ca_names(ca_names),
    );
    let table = tokio::spawn(publish_table(ctx.clone(), due));
    let node_metrics = tokio::spawn(refresh_node_metrics(ctx.clone()));
    // A render that moved another registry's verdict reconciles them all.
    let others = futures::stream::unfold(ctx.clone(), |ctx| async move {
        ctx.state.publisher.others_changed().await;
        Some(((), ctx))
    });
    controller
        .reconcile_all_on(others)
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
    table.abort();
    node_metrics.abort();
}

//! `pullthrough-agent run`: the in-cluster loop.
//!
//! - **Inputs**: the registry table and the CA bundle, from the ConfigMaps
//!   the operator writes (`<ns>/pullthrough-registries` key `config.yaml`,
//!   `<ns>/pullthrough-ca` key `ca.crt`, watched through the API server), or
//!   from a config file polled for changes (outside Kubernetes).
//! - **Apply** on every change of the table, the CA or the health gate,
//!   within a tick (250 ms) of noticing it; failed applies are retried, and
//!   the config is re-applied every `resync` (idempotent: repairs drift).
//! - **Health gate**: the proxy's `readyUrl` is probed every
//!   `probe_interval`; `fail_threshold` consecutive failures close the gate
//!   (the `/etc/hosts` block keeps its markers but no entries, so dockerd
//!   pulls go upstream instead of failing), `success_threshold` consecutive
//!   successes open it again. The first probe decides at once.
//! - **Report**: a Lease `<ns>/<prefix><node>` per node with the applied
//!   table hash, runtimes, registries and last error as annotations,
//!   renewed every `lease_renew` (docs/cluster-contract.md).
//! - **Liveness**: `GET /healthz` on `health_addr` answers 200 while the
//!   loop turns.
//! - SIGTERM/SIGINT stop the loop *without* reverting (a rolling update
//!   sends one too); `pullthrough-agent revert` undoes everything.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::runtime::watcher;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::sync::watch;

use crate::config::{self, AgentConfig};
use crate::engine::{self, ApplyOptions};
use crate::fsio::Root;
use crate::runtime::{DockerActionArg, Runtime, SystemExecutor};
use crate::state::sha256_hex;

use pullthrough_api::contract::{
    AGENT_COMPONENT, AGENT_FIELD_MANAGER, CA_BUNDLE_KEY, COMPONENT_LABEL, TABLE_KEY,
};
/// Lease annotations (docs/cluster-contract.md).
pub use pullthrough_api::contract::{
    CONFIG_HASH_ANNOTATION, LAST_ERROR_ANNOTATION, REGISTRIES_ANNOTATION, RUNTIME_ANNOTATION,
};

const TICK: Duration = Duration::from_millis(250);
const RETRY: Duration = Duration::from_secs(5);

/// Where the table and CA come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// ConfigMaps in `namespace`, watched through the API server.
    Kube {
        namespace: String,
        table_configmap: String,
        ca_configmap: String,
    },
    /// A config file (with its `caFile`), polled every `poll`.
    File { path: PathBuf, poll: Duration },
}

/// Options of `run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub root: Root,
    pub source: Source,
    pub runtimes: Option<Vec<Runtime>>,
    pub docker_action: DockerActionArg,
    /// Node name for the Lease (`None`: no Lease, e.g. file mode outside a
    /// cluster).
    pub node_name: Option<String>,
    /// Namespace and name prefix of the per-node Lease (needs the API).
    pub lease_namespace: Option<String>,
    pub lease_prefix: String,
    pub lease_renew: Duration,
    pub lease_duration: Duration,
    pub health_addr: Option<SocketAddr>,
    pub probe_interval: Duration,
    pub probe_timeout: Duration,
    pub fail_threshold: u32,
    pub success_threshold: u32,
    pub resync: Duration,
}

/// The table and CA as last seen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Inputs {
    /// Each watch has listed once.
    table_listed: bool,
    ca_listed: bool,
    table: Option<Vec<u8>>,
    ca: Option<Vec<u8>>,
}

/// The health gate with hysteresis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gate {
    open: Option<bool>,
    fails: u32,
    successes: u32,
    fail_threshold: u32,
    success_threshold: u32,
}

impl Gate {
    pub fn new(fail_threshold: u32, success_threshold: u32) -> Self {
        Self {
            open: None,
            fails: 0,
            successes: 0,
            fail_threshold: fail_threshold.max(1),
            success_threshold: success_threshold.max(1),
        }
    }

    /// Feeds one probe result; returns whether the gate is open now. The
    /// first result decides at once.
    pub fn observe(&mut self, ok: bool) -> bool {
        if ok {
            self.successes += 1;
            self.fails = 0;
        } else {
            self.fails += 1;
            self.successes = 0;
        }
        let open = match self.open {
            None => ok,
            Some(true) => self.fails < self.fail_threshold,
            Some(false) => self.successes >= self.success_threshold,
        };
        self.open = Some(open);
        open
    }

    pub fn is_open(&self) -> Option<bool> {
        self.open
    }
}

/// What was last applied successfully.
#[derive(Debug, Clone, Default)]
struct Applied {
    hash: String,
    runtimes: Vec<String>,
    registries: Vec<String>,
}

fn log(msg: impl AsRef<str>) {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    eprintln!("pullthrough-agent run [{t:.3}]: {}", msg.as_ref());
}

/// Runs until SIGTERM/SIGINT; never reverts.
pub async fn run(opts: RunOptions) -> Result<(), String> {
    let heartbeat = Arc::new(AtomicU64::new(now_secs()));
    if let Some(addr) = opts.health_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("--health-addr {addr}: {e}"))?;
        log(format!("health endpoint on http://{addr}/healthz"));
        tokio::spawn(serve_health(listener, heartbeat.clone()));
    }
    let needs_api = matches!(opts.source, Source::Kube { .. })
        || (opts.node_name.is_some() && opts.lease_namespace.is_some());
    let client = if needs_api {
        Some(
            kube::Client::try_default()
                .await
                .map_err(|e| format!("connecting to the API server: {e}"))?,
        )
    } else {
        None
    };
    let (tx, mut inputs_rx) = watch::channel(Inputs::default());
    if let (Source::Kube { .. }, Some(c)) = (&opts.source, &client) {
        spawn_watches(c.clone(), &opts.source, tx);
    } else {
        drop(tx);
    }
    let leases = match (&client, &opts.lease_namespace, &opts.node_name) {
        (Some(c), Some(ns), Some(node)) => Some((
            Api::<Lease>::namespaced(c.clone(), ns),
            format!("{}{node}", opts.lease_prefix),
            node.clone(),
        )),
        _ => None,
    };

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("installing the SIGTERM handler: {e}"))?;
    let mut gate = Gate::new(opts.fail_threshold, opts.success_threshold);
    let mut next_probe = Instant::now();
    let mut file_seen: Option<String> = None;
    let mut next_poll = Instant::now();
    let mut cfg: Option<AgentConfig> = None;
    let mut input_error: Option<String> = None;
    let mut last_key: Option<(String, bool)> = None;
    let mut last_attempt: Option<Instant> = None;
    let mut apply_error: Option<String> = None;
    let mut applied: Option<Applied> = None;
    let mut next_lease = Instant::now();
    let mut lease_dirty = true;
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    log("started");

    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = term.recv() => {
                log("SIGTERM: stopping (the node keeps its config; `pullthrough-agent revert` undoes it)");
                return Ok(());
            }
            _ = tokio::signal::ctrl_c() => {
                log("SIGINT: stopping (the node keeps its config)");
                return Ok(());
            }
        }
        heartbeat.store(now_secs(), Ordering::Relaxed);

        // 1. Inputs.
        match &opts.source {
            Source::File { path, poll } if Instant::now() >= next_poll => {
                next_poll = Instant::now() + *poll;
                let loaded = config::load(path);
                let key = match &loaded {
                    Ok(c) => format!(
                        "{}:{}",
                        c.sha256,
                        c.ca_pem.as_deref().map(sha256_hex).unwrap_or_default()
                    ),
                    Err(e) => format!("error:{e}"),
                };
                if file_seen.as_deref() != Some(key.as_str()) {
                    file_seen = Some(key);
                    match loaded {
                        Ok(c) => {
                            log(format!("config {} (sha256 {})", path.display(), c.sha256));
                            cfg = Some(c);
                            input_error = None;
                        }
                        Err(e) => {
                            log(format!("config: {e}"));
                            input_error = Some(e);
                        }
                    }
                    lease_dirty = true;
                }
            }
            Source::File { .. } => {}
            Source::Kube {
                table_configmap,
                ca_configmap,
                ..
            } => {
                if inputs_rx.has_changed().unwrap_or(false) {
                    let inputs = inputs_rx.borrow_and_update().clone();
                    if inputs.table_listed && inputs.ca_listed {
                        match &inputs.table {
                            None => {
                                let e = format!(
                                    "ConfigMap {table_configmap} (key config.yaml) not found; nothing to apply"
                                );
                                log(&e);
                                input_error = Some(e);
                            }
                            Some(table) => match config::from_parts(table, inputs.ca.as_deref()) {
                                Ok(c) => {
                                    log(format!(
                                        "table {table_configmap} (sha256 {}), CA from {ca_configmap}: {}",
                                        c.sha256,
                                        if c.ca_pem.is_some() { "yes" } else { "none" }
                                    ));
                                    cfg = Some(c);
                                    input_error = None;
                                }
                                Err(e) => {
                                    log(format!("table {table_configmap}: {e}"));
                                    input_error = Some(e);
                                }
                            },
                        }
                        lease_dirty = true;
                    }
                }
            }
        }

        // 2. Health gate.
        let ready_url = cfg.as_ref().and_then(|c| c.proxy.ready_url.clone());
        let open = match &ready_url {
            None => true,
            Some(url) => {
                if Instant::now() >= next_probe {
                    next_probe = Instant::now() + opts.probe_interval;
                    let ca = cfg.as_ref().and_then(|c| c.ca_pem.as_deref());
                    let ok = probe(url, ca, opts.probe_timeout).await;
                    let before = gate.is_open();
                    let now = gate.observe(ok.is_ok());
                    if before != Some(now) {
                        match &ok {
                            Ok(()) => log(format!("health gate open: {url} answers")),
                            Err(e) => log(format!("health gate closed: {url}: {e}")),
                        }
                    }
                }
                gate.is_open().unwrap_or(false)
            }
        };

        // 3. Apply.
        if let Some(c) = &cfg {
            // The CA is part of what is applied (rotation changes only it).
            let ca_hash = c.ca_pem.as_deref().map(sha256_hex).unwrap_or_default();
            let key = (format!("{}:{ca_hash}", c.sha256), open);
            let due = last_key.as_ref() != Some(&key)
                || last_attempt.is_some_and(|t| {
                    t.elapsed()
                        >= if apply_error.is_some() {
                            RETRY
                        } else {
                            opts.resync
                        }
                });
            if due {
                last_attempt = Some(Instant::now());
                match apply_once(&opts, c, !open).await {
                    Ok((a, out)) => {
                        if !out.trim().is_empty() && last_key.as_ref() != Some(&key) {
                            for l in out.lines() {
                                log(format!("apply: {l}"));
                            }
                        }
                        applied = Some(a);
                        apply_error = None;
                        last_key = Some(key);
                    }
                    Err(e) => {
                        if apply_error.as_deref() != Some(e.as_str()) {
                            log(format!("apply failed: {e}"));
                        }
                        apply_error = Some(e);
                        last_key = None;
                    }
                }
                lease_dirty = true;
            }
        }

        // 4. Report.
        if let Some((api, name, node)) = &leases
            && (lease_dirty || Instant::now() >= next_lease)
        {
            let error = apply_error.clone().or_else(|| input_error.clone());
            match renew_lease(api, name, node, applied.as_ref(), error.as_deref(), &opts).await {
                Ok(()) => {
                    lease_dirty = false;
                    next_lease = Instant::now() + opts.lease_renew;
                }
                Err(e) => {
                    log(format!("Lease {name}: {e}"));
                    next_lease = Instant::now() + RETRY;
                    lease_dirty = false;
                }
            }
        }
    }
}

async fn apply_once(
    opts: &RunOptions,
    cfg: &AgentConfig,
    gate_closed: bool,
) -> Result<(Applied, String), String> {
    let root = opts.root.clone();
    let cfg = cfg.clone();
    let apply_opts = ApplyOptions {
        runtimes: opts.runtimes.clone(),
        docker_action: opts.docker_action,
        dry_run: false,
        migrate_containerd_mirrors: false,
        hosts_gate_closed: gate_closed,
    };
    tokio::task::spawn_blocking(move || {
        let mut exec = SystemExecutor::new(root.clone());
        let mut out = Vec::new();
        let report = engine::apply(&root, &cfg, &apply_opts, &mut exec, &mut out)
            .map_err(|e| e.to_string())?;
        let text = if report.files.is_empty() && report.actions.is_empty() {
            String::new()
        } else {
            String::from_utf8_lossy(&out).into_owned()
        };
        let runtimes = crate::state::load(&root)
            .ok()
            .flatten()
            .and_then(|s| s.last_apply)
            .map(|l| l.runtimes)
            .unwrap_or_default();
        let mut registries: Vec<String> = cfg
            .table
            .registries
            .iter()
            .map(|r| r.host.clone())
            .collect();
        registries.sort();
        registries.dedup();
        Ok((
            Applied {
                hash: cfg.sha256.clone(),
                runtimes,
                registries,
            },
            text,
        ))
    })
    .await
    .map_err(|e| format!("apply task: {e}"))?
}

/// Watches the table and CA ConfigMaps; publishes both once each has been
/// listed, then on every change.
fn spawn_watches(client: kube::Client, source: &Source, tx: watch::Sender<Inputs>) {
    let Source::Kube {
        namespace,
        table_configmap,
        ca_configmap,
    } = source
    else {
        return;
    };
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let tx = Arc::new(tx);
    for (name, key, is_table) in [
        (table_configmap.clone(), TABLE_KEY, true),
        (ca_configmap.clone(), CA_BUNDLE_KEY, false),
    ] {
        let api = api.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
            let mut stream = watcher::watcher(api, cfg).boxed();
            let mut listing: Option<Option<Vec<u8>>> = None;
            let mut listed_once = false;
            let value = |cm: &ConfigMap| {
                cm.data
                    .as_ref()
                    .and_then(|d| d.get(key))
                    .map(|s| s.as_bytes().to_vec())
            };
            while let Some(ev) = stream.next().await {
                let update: Option<Option<Vec<u8>>> = match ev {
                    Ok(watcher::Event::Init) => {
                        listing = Some(None);
                        None
                    }
                    Ok(watcher::Event::InitApply(cm)) => {
                        listing = Some(value(&cm));
                        None
                    }
                    Ok(watcher::Event::InitDone) => {
                        listed_once = true;
                        Some(listing.take().flatten())
                    }
                    Ok(watcher::Event::Apply(cm)) => Some(value(&cm)),
                    Ok(watcher::Event::Delete(_)) => Some(None),
                    Err(e) => {
                        log(format!("watching ConfigMap {name}: {e}"));
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        None
                    }
                };
                if let Some(v) = update {
                    tx.send_modify(|i| {
                        if is_table {
                            i.table = v;
                            i.table_listed |= listed_once;
                        } else {
                            i.ca = v;
                            i.ca_listed |= listed_once;
                        }
                    });
                }
            }
        });
    }
}

async fn renew_lease(
    api: &Api<Lease>,
    name: &str,
    node: &str,
    applied: Option<&Applied>,
    error: Option<&str>,
    opts: &RunOptions,
) -> Result<(), String> {
    let mut ann = BTreeMap::new();
    if let Some(a) = applied {
        ann.insert(CONFIG_HASH_ANNOTATION.to_string(), a.hash.clone());
        ann.insert(RUNTIME_ANNOTATION.to_string(), a.runtimes.join(","));
        ann.insert(REGISTRIES_ANNOTATION.to_string(), a.registries.join(","));
    } else {
        ann.insert(REGISTRIES_ANNOTATION.to_string(), String::new());
    }
    // Annotation values are strings of any length, but keep it readable.
    let err: String = error.unwrap_or_default().chars().take(1024).collect();
    ann.insert(LAST_ERROR_ANNOTATION.to_string(), err);
    let now = MicroTime(Timestamp::now());
    let duration = i32::try_from(opts.lease_duration.as_secs()).unwrap_or(i32::MAX);
    let pp = PostParams {
        field_manager: Some(AGENT_FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    match api.get_opt(name).await.map_err(|e| e.to_string())? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    annotations: Some(ann),
                    labels: Some(BTreeMap::from([(
                        COMPONENT_LABEL.to_string(),
                        AGENT_COMPONENT.to_string(),
                    )])),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(node.to_string()),
                    lease_duration_seconds: Some(duration),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    ..LeaseSpec::default()
                }),
            };
            api.create(&pp, &lease).await.map_err(|e| e.to_string())?;
        }
        Some(mut lease) => {
            let mut all = lease.metadata.annotations.take().unwrap_or_default();
            all.extend(ann);
            lease.metadata.annotations = Some(all);
            let mut spec = lease.spec.take().unwrap_or_default();
            spec.holder_identity = Some(node.to_string());
            spec.lease_duration_seconds = Some(duration);
            spec.renew_time = Some(now);
            lease.spec = Some(spec);
            api.replace(name, &pp, &lease)
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// One `GET` of the proxy's readiness URL; Ok on 2xx. An `https://` URL is
/// verified against `ca_pem` (the CA the proxy's certificates chain to, as
/// nodes are told to trust it).
pub async fn probe(url: &str, ca_pem: Option<&[u8]>, timeout: Duration) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    if uri.scheme_str() == Some("https") {
        let pem = ca_pem.ok_or("an https:// readyUrl needs the proxy's CA (caFile)")?;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| format!("the proxy CA is not PEM: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("the proxy CA is not usable: {e}"))?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build::<_, Empty<Bytes>>(connector);
    let req = http::Request::get(uri)
        .header(http::header::USER_AGENT, "pullthrough-agent")
        .body(Empty::new())
        .map_err(|e| format!("bad request for {url}: {e}"))?;
    let resp = tokio::time::timeout(timeout, client.request(req))
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = resp.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {}", status.as_u16()))
    }
}

/// `/healthz`: 200 while the loop has run within the last 30 s.
async fn serve_health(listener: tokio::net::TcpListener, heartbeat: Arc<AtomicU64>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let hb = heartbeat.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let alive = now_secs().saturating_sub(hb.load(Ordering::Relaxed)) < 30;
                let (status, body) = match req.uri().path() {
                    "/healthz" if alive => (http::StatusCode::OK, "ok\n"),
                    "/healthz" => (http::StatusCode::SERVICE_UNAVAILABLE, "loop stalled\n"),
                    _ => (http::StatusCode::NOT_FOUND, "not found\n"),
                };
                let resp = http::Response::builder()
                    .status(status)
                    .header(http::header::CONTENT_TYPE, "text/plain")
                    .body(Full::new(Bytes::from_static(body.as_bytes())));
                async move { resp }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_hysteresis() {
        let mut g = Gate::new(3, 2);
        assert_eq!(g.is_open(), None);
        assert!(g.observe(true), "first success opens at once");
        assert!(g.observe(false));
        assert!(g.observe(false));
        assert!(!g.observe(false), "third failure closes");
        assert!(!g.observe(true), "one success is not enough");
        assert!(!g.observe(false));
        assert!(!g.observe(true));
        assert!(g.observe(true), "two in a row reopen");
        let mut g = Gate::new(3, 2);
        assert!(!g.observe(false), "first failure closes at once");
    }

    #[tokio::test]
    async fn probe_reports_refusals_and_statuses() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            for status in ["200 OK", "503 Service Unavailable"] {
                let (mut s, _) = l.accept().await.unwrap();
                let mut b = [0u8; 512];
                let _ = s.read(&mut b).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let url = format!("http://{addr}/readyz");
        let t = Duration::from_secs(2);
        probe(&url, None, t).await.unwrap();
        assert!(probe(&url, None, t).await.unwrap_err().contains("503"));
        let closed = format!("http://127.0.0.1:{}/readyz", addr.port());
        assert!(probe(&closed, None, t).await.is_err());
        let err = probe("https://x/", None, t).await.unwrap_err();
        assert!(err.contains("needs the proxy's CA"), "{err}");
    }

    /// An https readyUrl against a real proxy's TLS listener: verified
    /// with the proxy's CA, refused with any other.
    #[tokio::test]
    async fn probe_verifies_https_against_the_proxy_ca() {
        use pullthrough_testbed::proxy::{Addrs, Proxy};
        let proxy = tokio::task::spawn_blocking(|| {
            Proxy::start(
                &pullthrough_testbed::proxy::proxy_bin().unwrap(),
                Addrs::localhost().unwrap(),
                "registries: [{host: quay.io}]\n",
            )
            .unwrap()
        })
        .await
        .unwrap();
        let url = format!("https://{}/v2/", proxy.addrs.https);
        let t = Duration::from_secs(5);
        let ca = proxy.ca_pem().unwrap();
        probe(&url, Some(ca.as_bytes()), t).await.unwrap();
        let other = pullthrough_testbed::tls::TestCa::new("someone else").unwrap();
        let err = probe(&url, Some(other.cert_pem().as_bytes()), t)
            .await
            .unwrap_err();
        assert!(err.contains("GET"), "{err}");
        tokio::task::spawn_blocking(move || drop(proxy))
            .await
            .unwrap();
    }
}

//! `pullthrough-agent run`: the in-cluster loop. Each tick (250 ms) it
//!
//! 1. reads its **inputs** (`inputs.rs`): the registry table and CA, from
//!    the operator's ConfigMaps or a polled config file;
//! 2. consults the **health gate** (`health.rs`): the proxy's `readyUrl`,
//!    probed with hysteresis; while it is closed the `/etc/hosts` block
//!    keeps its markers but no entries, so dockerd pulls go upstream
//!    instead of failing;
//! 3. **applies** on every change of the table, the CA or the gate, retries
//!    a failed apply, and re-applies every `resync` (idempotent: repairs
//!    drift);
//! 4. **reports** (`report.rs`) through the node's Lease.
//!
//! It holds the node lock (`crate::lock`) for its whole life, so a
//! `revert` waits until this process is gone.
//!
//! `GET /healthz` on `health_addr` answers 200 while the loop turns.
//! SIGTERM/SIGINT stop the loop *without* reverting (a rolling update
//! sends one too); `pullthrough-agent revert` undoes everything.

mod health;
mod inputs;
mod report;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use tokio::signal::unix::{SignalKind, signal};

use crate::config::AgentConfig;
use crate::engine::{self, ApplyOptions};
use crate::error::{AgentError, ConfigError, RunError};
use crate::fsio::Root;
use crate::lock::{LOCK_FILE, NodeLock};
use crate::runtime::{DockerActionArg, RuntimeKind, SystemExecutor};
use crate::state::sha256_hex;
use health::{HealthCheck, Heartbeat};
use inputs::Inputs;
use report::{Applied, Reporter};

pub use health::{Gate, probe};
pub use inputs::Source;

const TICK: Duration = Duration::from_millis(250);
/// A failed apply is retried this soon; the wait doubles with each
/// further failure in a row, up to `MAX_RETRY`.
const RETRY: Duration = Duration::from_secs(5);
const MAX_RETRY: Duration = Duration::from_secs(300);
/// How long the loop keeps the liveness heartbeat going while an apply
/// runs: every command of an apply is bounded (`COMMAND_TIMEOUT`, 90 s;
/// a few per daemon), so one still running after this is stuck, and the
/// liveness probe may restart the pod.
const APPLY_BEAT_LIMIT: Duration = Duration::from_secs(15 * 60);

/// Options of `run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub root: Root,
    pub source: Source,
    pub runtimes: Option<Vec<RuntimeKind>>,
    pub docker_action: DockerActionArg,
    /// See [`ApplyOptions::reload_settle`].
    pub reload_settle: Duration,
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

/// When the config was last applied, and how that went.
#[derive(Default)]
struct ApplyState {
    /// Config (table and CA hashes) and gate of the last attempt (a
    /// failed one included, so its retry waits `RETRY`: a daemon restart
    /// that keeps failing is not tried every tick).
    last_key: Option<(String, bool)>,
    last_attempt: Option<Instant>,
    /// The last failure, as reported; `None` after a success.
    error: Option<String>,
    /// Failed attempts since the last success (the retry backs off).
    failures: u32,
    applied: Option<Applied>,
}

impl ApplyState {
    fn due(&self, key: &(String, bool), resync: Duration) -> bool {
        self.last_key.as_ref() != Some(key)
            || self.last_attempt.is_some_and(|t| {
                t.elapsed()
                    >= if self.error.is_some() {
                        self.retry()
                    } else {
                        resync
                    }
            })
    }

    /// How long after a failure the next attempt waits.
    fn retry(&self) -> Duration {
        let doublings = self.failures.saturating_sub(1).min(16);
        (RETRY * 2u32.pow(doublings)).min(MAX_RETRY)
    }
}

/// Runs until SIGTERM/SIGINT; never reverts.
pub async fn run(opts: RunOptions) -> Result<(), RunError> {
    let heartbeat = Heartbeat::new();
    if let Some(addr) = opts.health_addr {
        health::serve_liveness(addr, heartbeat.clone()).await?;
    }
    let needs_api = matches!(opts.source, Source::Kube { .. })
        || (opts.node_name.is_some() && opts.lease_namespace.is_some());
    let client = if needs_api {
        Some(kube::Client::try_default().await.map_err(RunError::Kube)?)
    } else {
        None
    };
    let mut inputs = Inputs::start(&opts.source, client.as_ref());
    let mut reporter = match (&client, &opts.lease_namespace, &opts.node_name) {
        (Some(c), Some(ns), Some(node)) => Some(Reporter::new(
            Api::<Lease>::namespaced(c.clone(), ns),
            format!("{}{node}", opts.lease_prefix),
            node.clone(),
            opts.lease_renew,
            opts.lease_duration,
        )),
        _ => None,
    };

    // Streams made once, up front: a signal that lands while the loop body
    // runs (a probe, an apply) waits in them for the next `select!`. A
    // fresh `ctrl_c()` per turn would lose one: tokio drops a signal
    // nobody listens for at that moment.
    let mut term = signal(SignalKind::terminate()).map_err(RunError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(RunError::Signal)?;
    // Held until the process ends; see `crate::lock`. Waits (beating the
    // liveness heartbeat) while a terminating agent of a rolling update
    // still holds it.
    let mut waited = false;
    let _lock = loop {
        if let Some(lock) = NodeLock::try_acquire(&opts.root)? {
            break lock;
        }
        if !waited {
            waited = true;
            tracing::warn!(
                lock = LOCK_FILE,
                "another pullthrough-agent holds the node lock; waiting for it to stop"
            );
        }
        heartbeat.beat();
        tokio::select! {
            () = tokio::time::sleep(TICK) => {}
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
        }
    };
    let mut health = HealthCheck::new(
        Gate::new(opts.fail_threshold, opts.success_threshold),
        opts.probe_interval,
        opts.probe_timeout,
    );
    let mut cfg: Option<AgentConfig> = None;
    let mut input_error: Option<ConfigError> = None;
    let mut state = ApplyState::default();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!("started");

    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = term.recv() => {
                tracing::info!("SIGTERM: stopping (the node keeps its config; `pullthrough-agent revert` undoes it)");
                return Ok(());
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: stopping (the node keeps its config)");
                return Ok(());
            }
        }
        heartbeat.beat();

        if let Some(update) = inputs.poll() {
            match update {
                Ok(c) => {
                    cfg = Some(c);
                    input_error = None;
                }
                Err(e) => input_error = Some(e),
            }
            if let Some(r) = &mut reporter {
                r.changed();
            }
        }

        let open = health.open(cfg.as_ref()).await;

        // A daemon restart may take a while (up to `COMMAND_TIMEOUT`):
        // the heartbeat goes on meanwhile, or the liveness probe would kill
        // the pod in the middle of it.
        if let Some(c) = &cfg
            && beating(
                &heartbeat,
                APPLY_BEAT_LIMIT,
                apply_if_due(&opts, c, open, &mut state),
            )
            .await
            && let Some(r) = &mut reporter
        {
            r.changed();
        }

        if let Some(r) = &mut reporter {
            let error = state
                .error
                .clone()
                .or_else(|| input_error.as_ref().map(ToString::to_string));
            r.tick(state.applied.as_ref(), error.as_deref()).await;
        }
    }
}

/// Awaits `fut`, beating `heartbeat` every tick meanwhile, for `limit` at
/// most (then only awaits it).
async fn beating<F: std::future::Future>(
    heartbeat: &Heartbeat,
    limit: Duration,
    fut: F,
) -> F::Output {
    let start = Instant::now();
    let mut fut = std::pin::pin!(fut);
    loop {
        tokio::select! {
            out = &mut fut => return out,
            () = tokio::time::sleep(TICK), if start.elapsed() < limit => heartbeat.beat(),
        }
    }
}

/// Applies `cfg` when it, its CA or the gate changed, or a retry or
/// resync is due; `true` when it tried.
async fn apply_if_due(
    opts: &RunOptions,
    cfg: &AgentConfig,
    open: bool,
    st: &mut ApplyState,
) -> bool {
    // The CA is part of what is applied (rotation changes only it).
    let ca_hash = cfg.ca_pem.as_deref().map(sha256_hex).unwrap_or_default();
    let key = (format!("{}:{ca_hash}", cfg.sha256), open);
    if !st.due(&key, opts.resync) {
        return false;
    }
    st.last_attempt = Some(Instant::now());
    match apply_once(opts, cfg, !open).await {
        Ok((a, out)) => {
            // `out` is empty unless a file or a daemon was touched: a
            // resync that repaired drift or retried an action says so too.
            if !out.trim().is_empty() {
                for l in out.lines() {
                    tracing::info!("apply: {l}");
                }
            }
            st.applied = Some(a);
            st.error = None;
            st.failures = 0;
            st.last_key = Some(key);
        }
        Err(e) => {
            let e = e.to_string();
            if st.error.as_deref() != Some(e.as_str()) {
                tracing::error!(error = %e, "apply failed: {e}");
            }
            st.error = Some(e);
            st.failures = st.failures.saturating_add(1);
            st.last_key = Some(key);
        }
    }
    true
}

/// One apply off the async threads (it writes files and may wait for
/// daemons); returns what to report and the apply's output.
async fn apply_once(
    opts: &RunOptions,
    cfg: &AgentConfig,
    gate_closed: bool,
) -> Result<(Applied, String), AgentError> {
    let root = opts.root.clone();
    let cfg = cfg.clone();
    let apply_opts = ApplyOptions {
        runtimes: opts.runtimes.clone(),
        docker_action: opts.docker_action,
        reload_settle: opts.reload_settle,
        dry_run: false,
        migrate_containerd_mirrors: false,
        hosts_gate_closed: gate_closed,
    };
    tokio::task::spawn_blocking(move || {
        let mut exec = SystemExecutor::new(root.clone());
        let mut out = Vec::new();
        let report = match engine::apply(&root, &cfg, &apply_opts, &mut exec, &mut out) {
            Ok(r) => r,
            Err(e) => {
                // A failed apply may still have done something an admin
                // must hear of: the health gate's /etc/hosts block emptied.
                for l in String::from_utf8_lossy(&out).lines() {
                    tracing::info!("apply: {l}");
                }
                return Err(e);
            }
        };
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
    .map_err(AgentError::Task)?
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Collects the messages of events logged on this thread.
    struct Capture(Arc<Mutex<Vec<String>>>);

    impl tracing::Subscriber for Capture {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, e: &tracing::Event<'_>) {
            struct Message(String);
            impl tracing::field::Visit for Message {
                fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                    if f.name() == "message" {
                        self.0 = format!("{v:?}");
                    }
                }
            }
            let mut m = Message(String::new());
            e.record(&mut m);
            self.0.lock().unwrap().push(m.0);
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    fn run_opts(root: &std::path::Path, runtime: RuntimeKind) -> RunOptions {
        RunOptions {
            root: Root::new(root),
            source: Source::File {
                path: root.join("unused.yaml"),
                poll: Duration::from_secs(1),
            },
            runtimes: Some(vec![runtime]),
            docker_action: DockerActionArg::Auto,
            reload_settle: Duration::ZERO,
            node_name: None,
            lease_namespace: None,
            lease_prefix: String::new(),
            lease_renew: Duration::from_secs(30),
            lease_duration: Duration::from_secs(90),
            health_addr: None,
            probe_interval: Duration::from_secs(1),
            probe_timeout: Duration::from_secs(1),
            fail_threshold: 3,
            success_threshold: 2,
            resync: Duration::ZERO,
        }
    }

    /// Runs one `apply_if_due`, returning whether it tried and what it
    /// logged.
    fn apply_logged(opts: &RunOptions, cfg: &AgentConfig, st: &mut ApplyState) -> (bool, String) {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let tried = tracing::subscriber::with_default(Capture(logs.clone()), || {
            rt.block_on(apply_if_due(opts, cfg, true, st))
        });
        let logs = logs.lock().unwrap().join("\n");
        (tried, logs)
    }

    /// A daemon restart may outlast the liveness probe's patience: the
    /// heartbeat goes on while the apply runs, up to the limit.
    #[test]
    fn the_heartbeat_goes_on_while_an_apply_runs() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        for (limit, beats) in [(Duration::from_secs(60), true), (Duration::ZERO, false)] {
            let hb = Heartbeat::stalled();
            let alive = rt.block_on(beating(&hb, limit, async {
                tokio::time::sleep(TICK * 3).await;
                hb.alive()
            }));
            assert_eq!(alive, beats, "limit {limit:?}");
        }
    }

    const HTTP_TABLE: &[u8] =
        b"proxy: {address: 10.0.0.5, httpPort: 80}\nregistries: [{host: quay.io}]\n";

    #[test]
    fn a_resync_that_repairs_drift_logs_it() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("etc")).unwrap();
        std::fs::write(t.path().join("etc/hosts"), "127.0.0.1 localhost\n").unwrap();
        let opts = run_opts(t.path(), RuntimeKind::Docker);
        let cfg = crate::config::from_parts(HTTP_TABLE, None).unwrap();
        let mut st = ApplyState::default();
        let (tried, logs) = apply_logged(&opts, &cfg, &mut st);
        assert!(
            tried && logs.contains("apply: updated   /etc/hosts"),
            "{logs}"
        );
        // Resync, nothing drifted: quiet.
        let (tried, logs) = apply_logged(&opts, &cfg, &mut st);
        assert!(tried && logs.is_empty(), "{logs}");
        // Someone dropped the block: the resync repairs it and says so.
        std::fs::write(t.path().join("etc/hosts"), "127.0.0.1 localhost\n").unwrap();
        let (tried, logs) = apply_logged(&opts, &cfg, &mut st);
        assert!(
            tried && logs.contains("apply: updated   /etc/hosts"),
            "{logs}"
        );
        assert_eq!(st.error, None);
    }

    #[test]
    fn a_failing_daemon_action_is_retried_after_the_retry_delay_not_every_tick() {
        let t = tempfile::tempdir().unwrap();
        // A running containerd (its socket) but no systemd: the restart
        // that enabling config_path needs fails.
        std::fs::create_dir_all(t.path().join("run/containerd")).unwrap();
        std::fs::write(t.path().join("run/containerd/containerd.sock"), "").unwrap();
        let opts = run_opts(t.path(), RuntimeKind::Containerd);
        let cfg = crate::config::from_parts(HTTP_TABLE, None).unwrap();
        let mut st = ApplyState::default();
        let (tried, logs) = apply_logged(&opts, &cfg, &mut st);
        assert!(tried, "{logs}");
        let e = st.error.clone().unwrap();
        assert!(e.contains("containerd"), "{e}");
        // The next tick: not yet.
        let (tried, _) = apply_logged(&opts, &cfg, &mut st);
        assert!(!tried);
        // Due again: the restart is tried again (no file changed) and the
        // failure is still reported.
        st.last_attempt = Some(Instant::now() - RETRY);
        let (tried, logs) = apply_logged(&opts, &cfg, &mut st);
        assert!(tried, "{logs}");
        assert_eq!(st.error.as_deref(), Some(e.as_str()));
        assert!(
            crate::state::load(&opts.root)
                .unwrap()
                .unwrap()
                .pending_actions
                .len()
                == 1,
            "the restart stays owed"
        );
    }

    /// A daemon action that keeps failing is not tried every 5 s for ever:
    /// the wait doubles with each failure, up to 5 minutes.
    #[test]
    fn a_failing_apply_backs_off_up_to_five_minutes() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("run/containerd")).unwrap();
        std::fs::write(t.path().join("run/containerd/containerd.sock"), "").unwrap();
        let opts = run_opts(t.path(), RuntimeKind::Containerd);
        let cfg = crate::config::from_parts(HTTP_TABLE, None).unwrap();
        let mut st = ApplyState::default();
        let long_ago = Instant::now() - Duration::from_secs(3600);
        for _ in 0..3 {
            st.last_attempt = Some(long_ago);
            assert!(apply_logged(&opts, &cfg, &mut st).0);
            assert!(st.error.is_some());
        }
        // Three failures: 5 s, 10 s, then 20 s.
        st.last_attempt = Some(Instant::now() - Duration::from_secs(19));
        assert!(!apply_logged(&opts, &cfg, &mut st).0);
        st.last_attempt = Some(Instant::now() - Duration::from_secs(20));
        assert!(apply_logged(&opts, &cfg, &mut st).0);
        for _ in 0..20 {
            st.last_attempt = Some(long_ago);
            apply_logged(&opts, &cfg, &mut st);
        }
        st.last_attempt = Some(Instant::now() - Duration::from_secs(299));
        assert!(!apply_logged(&opts, &cfg, &mut st).0);
        st.last_attempt = Some(Instant::now() - Duration::from_secs(300));
        assert!(apply_logged(&opts, &cfg, &mut st).0, "at most 5 minutes");
    }
}

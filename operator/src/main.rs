//! `pullthrough-operator`: reconciles `MirrorRegistry` resources.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use pullthrough_api::cli::{EXIT_USAGE, init_logging, parse_or_exit};
use pullthrough_api::config::ProxyConfig;
use pullthrough_operator::ca::{self, CaPolicy};
use pullthrough_operator::cli::Args;
use pullthrough_operator::controller::{self, Settings};
use pullthrough_operator::leader::LeaderElector;
use pullthrough_operator::metrics::Metrics;
use pullthrough_operator::server;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// How long a clean shutdown waits for in-flight work, and for the Lease
/// release, before it exits anyway.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

fn main() {
    let args: Args = parse_or_exit();
    init_logging(args.log_json);
    if args.ca_rotate_before >= args.ca_validity {
        eprintln!("pullthrough-operator: --ca-rotate-before must be shorter than --ca-validity");
        std::process::exit(EXIT_USAGE);
    }
    let base = match &args.proxy_base_config {
        None => ProxyConfig::from_yaml("{}"),
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => ProxyConfig::from_yaml(&text),
            Err(e) => {
                eprintln!("pullthrough-operator: {}: {e}", path.display());
                std::process::exit(EXIT_USAGE);
            }
        },
    };
    let base = match base {
        Ok(b) => b,
        Err(e) => {
            eprintln!("pullthrough-operator: --proxy-base-config: {e}");
            std::process::exit(EXIT_USAGE);
        }
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pullthrough-operator: tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = rt.block_on(run(args, base));
    std::process::exit(code);
}

async fn run(args: Args, base: ProxyConfig) -> i32 {
    let config = match kube::Config::infer().await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "no Kubernetes client configuration");
            return 1;
        }
    };
    // No MirrorRegistry may claim the API server's name: remember it.
    let api_server_host = config.cluster_url.host().map(str::to_string);
    let client = match kube::Client::try_from(config) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "building the Kubernetes client");
            return 1;
        }
    };
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "operator".into());
        format!("{host}-{}", std::process::id())
    });
    let (stop_tx, stop) = watch::channel(false);
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let listener = match server::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, listen = %args.listen, "binding the metrics/health listener");
            return 1;
        }
    };
    tracing::info!(listen = %args.listen, %identity, namespace = %args.namespace, "starting");
    let http = tokio::spawn(server::serve(
        listener,
        metrics.clone(),
        ready.clone(),
        stop.clone(),
    ));
    // SIGTERM / SIGINT: stop everything cleanly.
    let stopper = stop_tx.clone();
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("signal received, stopping");
        let _ = stopper.send(true);
    });

    let elector = LeaderElector::new(
        client.clone(),
        &args.namespace,
        &args.leader_lease,
        &identity,
        args.leader_lease_duration,
    );
    // Ready = the last Lease round trip worked: a standby that reaches the
    // API server is ready to take over (so rollouts and PDBs see both
    // replicas); one that cannot is not. /readyz says which role it has.
    let mut s = stop.clone();
    if !elector.acquire(&mut s, &ready).await {
        let _ = http.await;
        return 0;
    }
    tracing::info!("acquired the leader Lease");
    metrics.leader.set(1);

    let policy = CaPolicy {
        validity: args.ca_validity,
        rotate_before: args.ca_rotate_before,
        overlap: args.ca_overlap,
    };
    // The names the CA must permit come from the registry table: the CA
    // is made (and re-made through rotation) for the table's names.
    let (ca_names_tx, mut ca_names) = tokio::sync::watch::channel(None);
    let ca_task = {
        let client = client.clone();
        let ns = args.namespace.clone();
        let name = args.ca_name.clone();
        let every = args.ca_check_interval;
        let metrics = metrics.clone();
        let recorder = kube::runtime::events::Recorder::new(
            client.clone(),
            kube::runtime::events::Reporter {
                controller: pullthrough_operator::FIELD_MANAGER.into(),
                instance: Some(identity.clone()),
            },
        );
        let mut stop = stop.clone();
        tokio::spawn(async move {
            // The first table is written within seconds of the start (with
            // or without MirrorRegistries); the CA waits for its names.
            tokio::select! {
                r = ca_names.wait_for(Option::is_some) => if r.is_err() { return },
                _ = stop.wait_for(|s| *s) => return,
            }
            // Failed steps in a row: a failure is retried after a backoff
            // (1 s doubling), not a whole check interval later.
            let mut failures = 0u32;
            loop {
                let names = ca_names.borrow_and_update().clone();
                match ca::ensure(&client, &ns, &name, &policy, names.as_ref()).await {
                    Ok(_) => failures = 0,
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        let retry = ca::retry_delay(failures, every);
                        tracing::error!(error = %e, retry_in = ?retry, "CA");
                        metrics.ca_errors.inc();
                        // Once per run of failures: the retries back off
                        // to a second apart, and say the same.
                        if failures == 1 {
                            ca::failure_event(&recorder, &ns, &name, &e).await;
                        }
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(ca::retry_delay(failures, every)) => {}
                    r = ca_names.changed() => if r.is_err() { return },
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        })
    };
    let watches_workloads = !args.pins_configmap.is_empty()
        || args.discovery != pullthrough_operator::discovery::Mode::Off;
    let settings = Settings {
        api_server_host,
        ..Settings::from_args(&args)
    };
    let pins_task = watches_workloads.then(|| {
        tokio::spawn(pullthrough_operator::pins::run(
            client.clone(),
            pullthrough_operator::pins::Settings {
                namespace: args.namespace.clone(),
                configmap: args.pins_configmap.clone(),
                revisions: args.pin_revisions,
                max_bytes: args.pins_max_bytes,
                discovery: args.discovery,
                // Discovery creates no MirrorRegistry the table would
                // refuse as reserved.
                reserved: settings
                    .reserved_names()
                    .with_proxy(&base.names, base.proxy.as_ref().map(|p| p.address.as_str())),
                identity: identity.clone(),
            },
            metrics.clone(),
            stop.clone(),
        ))
    });
    let ctrl = tokio::spawn(controller::run(
        client.clone(),
        settings,
        base,
        identity.clone(),
        metrics.clone(),
        ca_names_tx,
        stop.clone(),
    ));
    let mut s = stop.clone();
    let kept = elector.keep(&mut s, &ready).await;
    let code = if kept {
        0
    } else {
        tracing::error!("lost the leader Lease, stopping");
        1
    };
    let _ = stop_tx.send(true);
    // In-flight reconciles get a bounded time to finish: after a lost
    // Lease only what the renew deadline left of it (a standby may take
    // over then), after a signal a few seconds.
    let grace = if kept {
        SHUTDOWN_GRACE
    } else {
        elector.step_down_grace()
    };
    let mut tasks = vec![ctrl, ca_task];
    tasks.extend(pins_task);
    let aborts: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
    if tokio::time::timeout(grace, futures::future::join_all(tasks))
        .await
        .is_err()
    {
        tracing::warn!(?grace, "in-flight work did not stop in time; abandoning it");
        for a in aborts {
            a.abort();
        }
    }
    // Also after a lost Lease: if it is still ours, a standby takes over at
    // once; if another replica holds it, release leaves it alone.
    if tokio::time::timeout(SHUTDOWN_GRACE, elector.release())
        .await
        .is_err()
    {
        tracing::warn!("releasing the leader Lease: no answer from the API server");
    }
    let _ = http.await;
    tracing::info!("stopped");
    code
}

//! `pullthrough-proxy` as a library: the modules of the caching proxy and
//! [`run`], which loads the config, binds the listeners and serves until
//! SIGTERM. The binary only parses the command line and sets up logging.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use clap::Parser;
use pullthrough_api::config::ProxyConfig;
use tokio::sync::watch;

pub mod admin;
pub mod atomic_file;
pub mod bounded;
pub mod cache;
pub mod config;
pub mod error;
pub mod http;
pub mod observe;
pub mod oci;
pub mod peers;
pub mod pipeline;
pub mod prefetch;
pub mod purge;
pub mod route;
pub mod server;
pub mod source;
#[cfg(test)]
mod test_util;
pub mod tls;
pub mod upstream;

pub use error::Error;
use pipeline::{Shared, State};

/// Caching proxy for the OCI distribution pull API.
///
/// Serves Docker Hub, quay.io, registry.k8s.io, gcr.io and ghcr.io (the
/// embedded default) or the registries of a config file, and caches every
/// manifest and blob it serves by digest. Clients reach it as a mirror
/// (containerd `?ns=`, CRI-O/podman path prefix, dockerd registry-mirrors)
/// or by name (DNS hijack, with TLS certificates minted from its CA).
/// Exit codes: 0 after a clean shutdown, 64 for an invalid config or
/// arguments, 1 for other start-up failures.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
pub struct Cli {
    /// YAML config file (listeners, CA, registries). Without it the embedded
    /// default is used. The file is re-read when it changes; an invalid new
    /// version is logged and ignored.
    #[arg(long, value_name = "FILE", env = "PULLTHROUGH_CONFIG")]
    pub config: Option<PathBuf>,

    /// Directory for the cache and the generated CA; overrides `dataDir`
    /// from the config [default: /var/lib/pullthrough].
    #[arg(long, value_name = "DIR", env = "PULLTHROUGH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Print the effective config (after defaults) as YAML and exit.
    #[arg(long)]
    pub print_config: bool,

    /// How long in-flight transfers may continue after SIGTERM.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// After SIGTERM, keep accepting new connections this long with
    /// /readyz failing, then close the listeners and drain. Kubernetes
    /// takes a moment to drop a terminating pod from its Service, and
    /// the connections still sent to it would be refused (a node whose
    /// registry names point at the proxy has no fallback). The chart sets
    /// 5s; 0 closes at once.
    #[arg(long, value_name = "DURATION", env = "PULLTHROUGH_SHUTDOWN_DELAY", default_value = "0s", value_parser = humantime::parse_duration)]
    pub shutdown_delay: Duration,

    /// This replica's address as its peers reach it, e.g. the Pod IP: an
    /// IP (IPv4 or IPv6; the port is that of `peers.listen`) or
    /// `ip:port` / `[ipv6]:port`. Needed with `peers.dns`; with
    /// `peers.static` it defaults to `peers.listen` if that is in the list.
    #[arg(long, value_name = "IP[:PORT]", env = "PULLTHROUGH_PEER_ADDRESS", value_parser = peers::members::parse_peer_address)]
    pub peer_address: Option<peers::members::PeerAddress>,

    /// How often the config file, its credentials files, the CA files and
    /// the pins file are checked for changes (at least 100ms).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_reload_interval)]
    pub reload_interval: Duration,
}

/// A `--reload-interval`: 0 made the pins task panic (a zero tokio
/// interval), pinned images evictable, and the watchers spin a core.
fn parse_reload_interval(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(100) {
        return Err(format!("{s} is too short: at least 100ms"));
    }
    Ok(d)
}

/// Serves until SIGTERM or Ctrl-C, then drains transfers for
/// `--shutdown-grace`. Everything that can be wrong with the config is
/// reported before any port is bound.
pub async fn run(cli: Cli) -> Result<(), Error> {
    // Everything that can be wrong with the config is found before any port
    // is bound.
    // Before the read: a change from here on is seen by the watcher.
    let baseline = cli.config.as_deref().map(config::Baseline::take);
    let loaded = config::load_full(cli.config.as_deref())?;
    let config = loaded.config;
    let settings = loaded.settings;
    if cli.print_config {
        let yaml = config
            .to_yaml()
            .map_err(|error| config::LoadError::Invalid {
                source_name: "config".into(),
                error,
            })?;
        print!("{yaml}");
        return Ok(());
    }
    let admin_token: Option<Arc<str>> = std::env::var("PULLTHROUGH_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .or_else(|| settings.admin_token.clone())
        .map(Arc::from);
    let admin_access = match (&admin_token, config.listen.admin) {
        (Some(t), _) => admin::AdminAccess::Token(t.clone()),
        (None, Some(a)) if !a.ip().is_loopback() => {
            tracing::warn!(
                admin = %a,
                "admin listener is exposed and no adminToken (PULLTHROUGH_ADMIN_TOKEN) is set: /admin/* is disabled"
            );
            admin::AdminAccess::Disabled
        }
        (None, _) => admin::AdminAccess::Open,
    };
    let data_dir = config::data_dir(cli.data_dir.as_deref(), &config);
    let listen_ips = listen_ips(&config);
    let router = route::Router::new(&config, &listen_ips);
    let upstreams = upstream::Upstreams::new(&config)?;
    let issuer = Arc::new(tls::Issuer::load_or_generate(
        config.ca.as_ref(),
        &data_dir,
        allowed_names(&router),
    )?);
    let limits = cache::store::Limits {
        max_size: settings.cache.max_size.map(|s| s.as_u64()),
        high_watermark: settings.cache.high_watermark,
        low_watermark: settings.cache.low_watermark,
    };
    let store =
        cache::store::BlobStore::open_with(&data_dir, limits, config.cache.pins_file.is_some())
            .await
            .map_err(|source| Error::Store {
                path: data_dir.clone(),
                source,
            })?;

    // The client is built (credential files read, CA parsed) before any
    // port is bound; whether the bucket answers is checked after start
    // and never stops the proxy: it serves without the tier meanwhile.
    let tier = match &config.storage {
        Some(storage) => Some(Arc::new(
            cache::shared::build_s3(storage).map_err(Error::SharedStorage)?,
        )),
        None => None,
    };
    let uploads = tier
        .as_ref()
        .map(|t| Arc::new(cache::shared::Uploads::new(Arc::clone(t))));
    let peer_tls = Arc::new(tls::peer::PeerTls::new(issuer.clone()));
    let peers = match &config.peers {
        Some(p) => {
            let me = peers::members::self_address(p, cli.peer_address).map_err(|error| {
                config::LoadError::Invalid {
                    source_name: "peers".into(),
                    error,
                }
            })?;
            // Minted now so a CA that cannot issue one fails the start.
            peer_tls.server()?;
            Some(Arc::new(peers::Peers {
                members: Arc::new(peers::Members::new(me, &p.r#static)),
                client: peers::PeerClient::new(peer_tls.clone()),
            }))
        }
        None => None,
    };

    let http = match config.listen.http {
        Some(a) => Some(server::bind(a).await?),
        None => None,
    };
    let https = match config.listen.https {
        Some(a) => Some(server::bind(a).await?),
        None => None,
    };
    // Journals and the lease are named after the replica: unique per pod
    // (its peer address, else its host name).
    let replica = match &peers {
        Some(p) => p.members.me().to_string().replace(':', "_"),
        None => std::env::var("HOSTNAME").unwrap_or_else(|_| format!("pid-{}", std::process::id())),
    };
    let journal = tier
        .as_ref()
        .map(|_| Arc::new(cache::shared::Journal::default()));
    let evictor = match (&tier, &config.storage, &journal) {
        (Some(t), Some(s), Some(j)) => cache::shared::Evictor::new(
            Arc::clone(t),
            s,
            replica.clone(),
            Arc::clone(j),
            config.cache.pins_file.is_some(),
        )
        .map(Arc::new),
        _ => None,
    };
    let peer_listener = match &config.peers {
        Some(p) => Some(server::bind(p.listen).await?),
        None => None,
    };
    let admin_listener = match config.listen.admin {
        Some(a) => Some(server::bind(a).await?),
        None => None,
    };

    let listen = config.listen.clone();
    // Connection limits take effect at start-up (like the listen
    // addresses): the pool is shared by the HTTP and HTTPS listeners.
    let conn_limits = config.limits.clone();
    let pool = server::connection_pool(&conn_limits);
    let metrics = Arc::new(observe::metrics::Metrics::default());
    // Read at start-up, like the listen addresses.
    let prefetcher =
        prefetch::Prefetcher::new(config.listen.http, config.cache.prefetch_concurrency);
    if config.cache.pins_file.is_some()
        && prefetcher.is_none()
        && config.cache.prefetch_concurrency > 0
    {
        tracing::warn!("no HTTP listener (listen.http): pinned images are kept, not prefetched");
    }
    let pins = Arc::new(cache::pins::Pinning::new(
        config.cache.pins_file.clone(),
        prefetcher.map(Arc::new),
        &data_dir,
    ));
    let shared = Arc::new(Shared {
        state: ArcSwap::from_pointee(State {
            config,
            settings,
            config_hash: loaded.hash,
            router,
            upstreams,
        }),
        store,
        tags: cache::tags::TagCache::default().counted(&metrics),
        budgets: Default::default(),
        referrers: cache::referrers::ReferrersCache::default().counted(&metrics),
        tokens: Default::default(),
        grants: pipeline::AccessGrants::default().counted(&metrics),
        metrics: metrics.clone(),
        inflight: Default::default(),
        manifest_turns: Default::default(),
        tag_turns: Default::default(),
        repos: Default::default(),
        tier: tier.clone(),
        uploads,
        journal: journal.clone(),
        evictions: evictor.as_ref().map(|e| Arc::clone(&e.stats)),
        peers: peers.clone(),
        pins: Arc::clone(&pins),
    });

    if let Some(tier) = tier.clone() {
        let replica = replica.clone();
        tokio::spawn(async move {
            // On failure Health has logged the cause; serving goes on.
            if tier.probe(&replica).await.is_ok() {
                tracing::info!(storage = tier.location(), "shared storage answers");
            }
        });
    }
    let ready = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut grant_sharing = None;
    if let (Some(tier), Some(storage)) = (&tier, &shared.state.load().config.storage) {
        // What the other replicas learnt is public, before the first
        // request: a replica that starts during an upstream outage serves
        // public content from the bucket (bounded: the bucket never holds
        // up the start for long).
        match tokio::time::timeout(
            Duration::from_secs(5),
            cache::shared::grants::import(tier, &shared.grants),
        )
        .await
        {
            Ok(Ok(n)) => {
                tracing::info!(grants = n, "public access answers read from shared storage")
            }
            Ok(Err(err)) => tracing::debug!(error = %err, "public access answers not read"),
            Err(_) => tracing::warn!(
                "shared storage did not answer within 5s; starting without its access answers"
            ),
        }
        // Joined at shutdown: its last write must land before exit.
        grant_sharing = Some(cache::shared::grants::share(
            Arc::clone(tier),
            Arc::clone(&shared),
            replica.clone(),
            storage.eviction_interval.min(Duration::from_secs(30)),
            stop_rx.clone(),
        ));
    }
    tokio::spawn(pins.run(
        Arc::clone(&shared),
        evictor.clone(),
        cli.reload_interval,
        stop_rx.clone(),
    ));
    if let Some(evictor) = &evictor {
        tokio::spawn(Arc::clone(evictor).run(stop_rx.clone()));
    }
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(sharing) = grant_sharing {
        tasks.spawn(sharing);
    }
    if let Some(l) = http {
        tasks.spawn(server::serve_proxy(
            l,
            None,
            shared.clone(),
            conn_limits.clone(),
            pool.clone(),
            stop_rx.clone(),
            cli.shutdown_grace,
        ));
    }
    if let Some(l) = https {
        let tls = issuer.server_config();
        tasks.spawn(server::serve_proxy(
            l,
            Some(tls),
            shared.clone(),
            conn_limits.clone(),
            pool.clone(),
            stop_rx.clone(),
            cli.shutdown_grace,
        ));
    }
    if let Some(l) = peer_listener {
        tasks.spawn(peers::listener::serve_peers(
            l,
            peer_tls.clone(),
            shared.clone(),
            conn_limits.clone(),
            stop_rx.clone(),
            cli.shutdown_grace,
        ));
    }
    if let (Some(peers), Some(p)) = (&peers, &shared.state.load().config.peers)
        && let Some(name) = &p.dns
    {
        tokio::spawn(peers::members::follow_dns(
            peers.members.clone(),
            name.clone(),
            p.listen.port(),
            p.refresh,
            stop_rx.clone(),
        ));
    }
    if let Some(l) = admin_listener {
        tasks.spawn(admin::serve(
            l,
            ready.clone(),
            issuer.clone(),
            shared.clone(),
            admin_access,
            conn_limits.clone(),
            stop_rx.clone(),
        ));
    }
    metrics.set_ca_not_after(issuer.ca_info().not_after);
    {
        // CA rotation: follow the files the CA comes from. Read from the
        // running config at each poll, so a reload that moves `ca:` is
        // followed too.
        let shared = shared.clone();
        let metrics = metrics.clone();
        let data_dir = data_dir.clone();
        tokio::spawn(tls::watch::watch(
            issuer.clone(),
            cli.reload_interval,
            move || match &shared.state.load().config.ca {
                Some(files) => tls::watch::CaPaths {
                    cert: files.cert.clone(),
                    key: files.key.clone(),
                    next: files.next().map(|(c, k)| (c.to_owned(), k.to_owned())),
                    previous: files.previous_cert.clone(),
                },
                None => {
                    let (cert, key) = tls::generated_ca_files(&data_dir);
                    tls::watch::CaPaths {
                        cert,
                        key,
                        next: None,
                        previous: None,
                    }
                }
            },
            move |outcome| match outcome {
                tls::watch::CaReload::Swapped(info) => metrics.ca_reloaded(Some(info.not_after)),
                tls::watch::CaReload::Rejected(_) => metrics.ca_reloaded(None),
                tls::watch::CaReload::Unchanged => {}
            },
        ));
    }
    if let (Some(path), Some(baseline)) = (cli.config.clone(), baseline) {
        let shared = shared.clone();
        let issuer = issuer.clone();
        let running_listen = listen.clone();
        let running_limits = conn_limits.clone();
        let running_storage = shared.state.load().config.storage.clone();
        let running_peers = shared.state.load().config.peers.clone();
        tokio::spawn(config::watch(
            path,
            cli.reload_interval,
            baseline,
            move |loaded: config::Loaded| {
                let new = loaded.config;
                if new.listen != running_listen {
                    tracing::warn!("listen addresses changed; they take effect after a restart");
                }
                if new.storage != running_storage || new.peers != running_peers {
                    tracing::warn!("storage or peers changed; they take effect after a restart");
                }
                if new.limits != running_limits {
                    tracing::warn!("connection limits changed; they take effect after a restart");
                }
                // Listeners move only at a restart: the upstreams must keep
                // refusing the ones bound now, not those the file names.
                let mut bound = new.clone();
                bound.listen = running_listen.clone();
                bound.peers = running_peers.clone();
                let upstreams = upstream::Upstreams::new(&bound).map_err(|e| e.to_string())?;
                let router = route::Router::new(&new, &listen_ips);
                issuer.set_allowed(allowed_names(&router));
                if loaded.settings.cache != shared.state.load().settings.cache {
                    tracing::warn!("cache size settings changed; they take effect after a restart");
                }
                if loaded.settings.admin_token != shared.state.load().settings.admin_token {
                    tracing::warn!("adminToken changed; it takes effect after a restart");
                }
                shared.state.store(Arc::new(State {
                    config: new,
                    settings: loaded.settings,
                    config_hash: loaded.hash,
                    router,
                    upstreams,
                }));
                tracing::info!("config applied");
                Ok(())
            },
        ));
    }
    ready.store(true, Ordering::Relaxed);
    tracing::info!(
        http = ?listen.http,
        https = ?listen.https,
        admin = ?listen.admin,
        data_dir = %data_dir.display(),
        "pullthrough-proxy ready"
    );

    shutdown_signal().await;
    ready.store(false, Ordering::Relaxed);
    if !cli.shutdown_delay.is_zero() {
        tracing::info!(
            delay_ms = cli.shutdown_delay.as_millis() as u64,
            "shutting down: not ready, still accepting while the Service forgets this pod"
        );
        // A second signal cuts the wait short.
        tokio::select! {
            _ = tokio::time::sleep(cli.shutdown_delay) => {}
            _ = shutdown_signal() => {}
        }
    }
    tracing::info!(
        grace_secs = cli.shutdown_grace.as_secs(),
        "shutting down: no new connections, draining transfers"
    );
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    tracing::info!("stopped");
    Ok(())
}

fn listen_ips(config: &ProxyConfig) -> Vec<IpAddr> {
    [config.listen.http, config.listen.https]
        .into_iter()
        .flatten()
        .map(|a| a.ip())
        .collect()
}

fn allowed_names(router: &route::Router) -> tls::AllowedNames {
    let mut allowed = tls::AllowedNames {
        registry_names: router.registry_sni_names().map(str::to_string).collect(),
        ..Default::default()
    };
    for name in router.own_names() {
        match name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            Ok(ip) => allowed.own_ips.push(ip),
            Err(_) => allowed.own_names.push(name.to_string()),
        }
    }
    allowed.own_ips.sort();
    allowed.own_ips.dedup();
    allowed
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(err) => {
            tracing::warn!(error = %err, "cannot watch SIGTERM; only Ctrl-C stops the proxy");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod ca_names_tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use pullthrough_api::pki::PermittedNames;

    /// The operator makes the cluster CA for `PermittedNames::for_config`
    /// of the table; the proxy serves TLS for `allowed_names`. A name the
    /// router serves that the CA does not permit would fail every
    /// handshake for it, so the two must agree.
    #[test]
    fn the_ca_names_of_a_config_cover_every_name_the_proxy_serves() {
        let mut config = config::load(None).unwrap();
        config.names = vec![
            "pullthrough-proxy.pullthrough.svc".into(),
            "10.0.0.7".into(),
        ];
        config.proxy =
            Some(serde_json::from_value(serde_json::json!({"address": "fd00::10"})).unwrap());
        assert!(!config.registries.is_empty());
        let listen = vec!["192.0.2.1".parse().unwrap()];
        let router = route::Router::new(&config, &listen);
        let allowed = allowed_names(&router);
        let permitted = PermittedNames::for_config(&config, &listen);
        let mut checked = 0;
        for name in allowed.registry_names.iter().chain(&allowed.own_names) {
            assert!(permitted.permits_dns(name), "{name} not in {permitted}");
            checked += 1;
        }
        for ip in &allowed.own_ips {
            assert!(permitted.permits_ip(*ip), "{ip} not in {permitted}");
            checked += 1;
        }
        assert!(checked > 10, "{checked}");
        for ip in ["10.0.0.7", "fd00::10", "192.0.2.1", "127.0.0.1", "::1"] {
            assert!(permitted.permits_ip(ip.parse().unwrap()), "{ip}");
        }
        assert!(permitted.permits_dns(pullthrough_api::pki::PEER_NAME));
        assert!(!permitted.permits_dns("example.com"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_interval_under_100ms_is_refused() {
        assert!(parse_reload_interval("0s").is_err());
        assert!(parse_reload_interval("99ms").is_err());
        assert_eq!(
            parse_reload_interval("100ms"),
            Ok(Duration::from_millis(100))
        );
        let cli =
            <Cli as clap::Parser>::try_parse_from(["pullthrough-proxy", "--reload-interval", "0"]);
        assert!(cli.is_err());
    }
}

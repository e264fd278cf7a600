//! `pullthrough-proxy`: one caching proxy for every registry a cluster pulls from.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use pullthrough_api::cli::{EXIT_USAGE, parse_or_exit};

mod admin;
mod error;

/// Caching proxy for the OCI distribution pull API.
///
/// Serves Docker Hub, quay.io, registry.k8s.io, gcr.io, ghcr.io (the embedded
/// default) or the registries of a config file, and caches every manifest
/// and blob it serves by digest.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// YAML config file (registry table, listeners, cache). Without it the
    /// embedded default config is used.
    #[arg(long, value_name = "FILE", env = "PULLTHROUGH_CONFIG")]
    config: Option<PathBuf>,

    /// Directory for the cache and the generated CA; overrides `dataDir`
    /// from the config.
    #[arg(long, value_name = "DIR", env = "PULLTHROUGH_DATA_DIR")]
    data_dir: Option<PathBuf>,

    /// Address of the admin listener serving /healthz, /readyz and /metrics.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9090")]
    admin_listen: SocketAddr,
}

#[tokio::main]
async fn main() {
    let cli: Cli = parse_or_exit();
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    tracing::debug!(config = ?cli.config, data_dir = ?cli.data_dir, "starting");

    let listener = match tokio::net::TcpListener::bind(cli.admin_listen).await {
        Ok(l) => l,
        Err(source) => {
            let err = error::Error::Bind {
                addr: cli.admin_listen,
                source,
            };
            tracing::error!(error = %err, "cannot start");
            std::process::exit(EXIT_USAGE);
        }
    };
    tracing::info!(addr = %cli.admin_listen, "admin listener ready");
    tokio::select! {
        res = admin::serve(listener) => {
            if let Err(err) = res {
                tracing::error!(error = %err, "admin listener failed");
                std::process::exit(1);
            }
        }
        _ = shutdown_signal() => tracing::info!("shutting down"),
    }
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
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

//! `pullthrough-operator`: reconciles `MirrorRegistry` resources.

use std::net::SocketAddr;

use clap::Parser;
use pullthrough_api::cli::parse_or_exit;

/// Reconcile MirrorRegistry resources (pullthrough.dev/v1alpha1) into the
/// registry table, the CA and per-registry status.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// Namespace pullthrough is installed in (table ConfigMap, CA Secret, Lease).
    #[arg(long, env = "POD_NAMESPACE", default_value = "pullthrough")]
    namespace: String,
    /// Address serving /healthz, /readyz and /metrics.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
}

fn main() {
    let cli: Cli = parse_or_exit();
    eprintln!(
        "pullthrough-operator: the reconciler is not implemented in this build (namespace {}, listen {})",
        cli.namespace, cli.listen
    );
    std::process::exit(1);
}

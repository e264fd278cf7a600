//! `pullthrough-agent`: makes a node's container runtime pull through the proxy.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use pullthrough_api::cli::parse_or_exit;

/// Point this node's container runtime at the pullthrough proxy, and undo it.
///
/// Every path is resolved under --root, the host filesystem root (`/` on a
/// plain host, `/host` in the DaemonSet).
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply the config once and print what changed.
    Apply {
        /// Host filesystem root.
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
        /// Registry table plus the `proxy:` section for nodes (YAML).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Which runtime to configure; `auto` detects what is installed.
        #[arg(long, value_enum, default_value_t = Runtime::Auto)]
        runtime: Runtime,
        /// What to do with dockerd after daemon.json changed.
        #[arg(long, value_enum, default_value_t = DockerAction::Auto)]
        docker_action: DockerAction,
        /// Print a diff per file instead of writing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove everything the agent ever added and restore first-edit backups.
    Revert {
        /// Host filesystem root.
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
    },
    /// Show what is applied on this node.
    Status {
        /// Host filesystem root.
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// In-cluster loop: watch the registry table and CA, apply on change,
    /// gate on proxy health, report per node.
    Run {
        /// Host filesystem root.
        #[arg(long, value_name = "DIR", default_value = "/host")]
        root: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Runtime {
    Auto,
    Docker,
    Containerd,
    Crio,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DockerAction {
    Auto,
    Reload,
    Restart,
    None,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

fn main() {
    let cli: Cli = parse_or_exit();
    // The patchers land with the node-agent issue; until then say so plainly
    // instead of pretending a node was configured.
    eprintln!(
        "pullthrough-agent: {:?} is not implemented in this build",
        cli.command
    );
    std::process::exit(1);
}

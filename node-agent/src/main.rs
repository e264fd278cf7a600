//! `pullthrough-agent`: makes a node's container runtime pull through the proxy.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use pullthrough_agent::engine::{self, AgentError, ApplyOptions, RevertOptions};
use pullthrough_agent::fsio::Root;
use pullthrough_agent::runtime::{DockerActionArg, Runtime, SystemExecutor};
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
        /// Which runtimes to configure (comma-separated); `auto` detects
        /// what is installed.
        #[arg(long, value_enum, value_delimiter = ',', default_value = "auto")]
        runtime: Vec<RuntimeArg>,
        /// What to do with dockerd after daemon.json changed.
        #[arg(long, value_enum, default_value_t = DockerActionArg::Auto)]
        docker_action: DockerActionArg,
        /// Move containerd's deprecated `registry.mirrors`/`configs.*.tls`
        /// into hosts.toml files (refused otherwise).
        #[arg(long)]
        migrate_containerd_mirrors: bool,
        /// Print a diff per file instead of writing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove everything the agent ever added and restore first-edit backups.
    Revert {
        /// Host filesystem root.
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
        /// Print a diff per file instead of writing.
        #[arg(long)]
        dry_run: bool,
        /// How long dockerd gets to re-read daemon.json with the proxy's
        /// keys emptied before the original file is put back.
        #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
        reload_settle: Duration,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RuntimeArg {
    Auto,
    Docker,
    Containerd,
    Crio,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

fn runtimes(args: &[RuntimeArg]) -> Result<Option<Vec<Runtime>>, AgentError> {
    if args.contains(&RuntimeArg::Auto) {
        if args.len() > 1 {
            return Err(AgentError::Config(
                "--runtime: `auto` cannot be combined with named runtimes".into(),
            ));
        }
        return Ok(None);
    }
    Ok(Some(
        args.iter()
            .map(|a| match a {
                RuntimeArg::Docker => Runtime::Docker,
                RuntimeArg::Containerd => Runtime::Containerd,
                _ => Runtime::Crio,
            })
            .collect(),
    ))
}

fn run(cli: Cli) -> Result<(), AgentError> {
    let mut stdout = std::io::stdout();
    match cli.command {
        Command::Apply {
            root,
            config,
            runtime,
            docker_action,
            migrate_containerd_mirrors,
            dry_run,
        } => {
            let runtimes = runtimes(&runtime)?;
            let cfg = pullthrough_agent::config::load(&config).map_err(AgentError::Config)?;
            let root = Root::new(root);
            let mut exec = SystemExecutor::new(root.clone());
            let opts = ApplyOptions {
                runtimes,
                docker_action,
                dry_run,
                migrate_containerd_mirrors,
            };
            engine::apply(&root, &cfg, &opts, &mut exec, &mut stdout).map(|_| ())
        }
        Command::Revert {
            root,
            dry_run,
            reload_settle,
        } => {
            let root = Root::new(root);
            let mut exec = SystemExecutor::new(root.clone());
            let opts = RevertOptions {
                dry_run,
                reload_settle,
            };
            engine::revert(&root, &opts, &mut exec, &mut stdout).map(|_| ())
        }
        Command::Status { root, output } => {
            let status = engine::status(&Root::new(root))?;
            match output {
                Output::Table => print!("{}", engine::status_table(&status)),
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&status)
                        .map_err(|e| AgentError::Other(e.to_string()))?
                ),
            }
            Ok(())
        }
        Command::Run { .. } => Err(AgentError::Other(
            "run (the in-cluster loop with health gate and reporting) is not implemented in this build; use apply/revert/status".into(),
        )),
    }
}

fn main() {
    let cli: Cli = parse_or_exit();
    if let Err(e) = run(cli) {
        eprintln!("pullthrough-agent: {e}");
        std::process::exit(e.exit_code());
    }
}

//! The command line: the subcommands and their flags, and how each one
//! maps onto the engine or the run loop.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use pullthrough_api::contract;

use crate::engine::{self, ApplyOptions, RevertOptions};
use crate::error::{AgentError, ConfigError};
use crate::fsio::Root;
use crate::lock::{LOCK_FILE, NodeLock};
use crate::run::{self, RunOptions, Source};
use crate::runtime::{DockerActionArg, RuntimeKind, SystemExecutor};

/// Point this node's container runtime at the pullthrough proxy, and undo it.
///
/// Every path is resolved under --root, the host filesystem root (`/` on a
/// plain host, `/host` in the DaemonSet).
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log as JSON lines instead of text (stderr; `RUST_LOG` filters).
    #[arg(long, global = true)]
    pub log_json: bool,
}

impl Cli {
    /// The command is the long-running loop (its errors are logged), not
    /// a one-shot command (its errors are its answer).
    pub fn is_daemon(&self) -> bool {
        matches!(self.command, Command::Run(_))
    }
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
        /// into hosts.toml files (refused otherwise). A setting hosts.toml
        /// cannot hold (e.g. `rewrite`) is refused, naming it.
        #[arg(long)]
        migrate_containerd_mirrors: bool,
        /// Print a diff per file instead of writing.
        #[arg(long)]
        dry_run: bool,
        /// How long dockerd gets to re-read daemon.json with the keys the
        /// apply removes emptied before the final file is put back.
        #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
        reload_settle: Duration,
        /// How long to wait for a running `pullthrough-agent run` on this
        /// node to stop (it holds the node lock, /run/pullthrough-agent.lock,
        /// and would overwrite what this command does).
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
        wait_for_agent: Duration,
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
        /// How long to wait for a running `pullthrough-agent run` on this
        /// node to stop (it holds the node lock, /run/pullthrough-agent.lock,
        /// and would overwrite what this command does).
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
        wait_for_agent: Duration,
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
    Run(Box<RunArgs>),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Host filesystem root.
    #[arg(long, value_name = "DIR", default_value = "/host")]
    root: PathBuf,
    /// Read the table (with its `proxy:` section and `caFile`) from this
    /// file, re-read on change, instead of the ConfigMaps (outside
    /// Kubernetes; no Lease).
    #[arg(long, value_name = "FILE")]
    config_file: Option<PathBuf>,
    /// Namespace of the ConfigMaps and of this node's Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = contract::DEFAULT_NAMESPACE)]
    namespace: String,
    /// ConfigMap holding the registry table (key `config.yaml`).
    #[arg(long, default_value = contract::TABLE_CONFIGMAP)]
    table_configmap: String,
    /// ConfigMap holding the CA bundle nodes trust (key `ca.crt`).
    #[arg(long, default_value = contract::CA_NAME)]
    ca_configmap: String,
    /// This node's name (the Lease is `<lease-prefix><node>`).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Prefix of the per-node Lease's name.
    #[arg(long, default_value = contract::AGENT_LEASE_PREFIX)]
    lease_prefix: String,
    /// How often the Lease is renewed.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    lease_renew: Duration,
    /// The Lease's duration (a node whose Lease expired is not counted).
    #[arg(long, value_name = "DURATION", default_value = "90s", value_parser = humantime::parse_duration)]
    lease_duration: Duration,
    /// Serve `GET /healthz` here (for the DaemonSet's liveness probe).
    #[arg(long, value_name = "ADDR")]
    health_addr: Option<std::net::SocketAddr>,
    /// Which runtimes to configure (comma-separated); `auto` detects them.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "auto")]
    runtime: Vec<RuntimeArg>,
    /// What to do with dockerd after daemon.json changed.
    #[arg(long, value_enum, default_value_t = DockerActionArg::Auto)]
    docker_action: DockerActionArg,
    /// How long dockerd gets to re-read daemon.json with the keys an
    /// apply removes emptied before the final file is put back.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    reload_settle: Duration,
    /// How often the proxy's `readyUrl` is probed.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    probe_interval: Duration,
    /// How long one probe may take.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    probe_timeout: Duration,
    /// Consecutive failed probes that empty the `/etc/hosts` block.
    #[arg(long, default_value_t = 3)]
    fail_threshold: u32,
    /// Consecutive successful probes that restore it.
    #[arg(long, default_value_t = 2)]
    success_threshold: u32,
    /// Re-apply this often even without a change (repairs drift).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    resync: Duration,
    /// How often `--config-file` is checked for changes.
    #[arg(long, value_name = "DURATION", default_value = "500ms", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
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

fn runtimes(args: &[RuntimeArg]) -> Result<Option<Vec<RuntimeKind>>, ConfigError> {
    if args.contains(&RuntimeArg::Auto) {
        if args.len() > 1 {
            return Err(ConfigError::AutoWithNamedRuntimes);
        }
        return Ok(None);
    }
    Ok(Some(
        args.iter()
            .map(|a| match a {
                RuntimeArg::Docker => RuntimeKind::Docker,
                RuntimeArg::Containerd => RuntimeKind::Containerd,
                _ => RuntimeKind::Crio,
            })
            .collect(),
    ))
}

/// The node lock for a one-shot command, waiting up to `wait` for a
/// running agent to stop.
fn node_lock(root: &Root, wait: Duration) -> Result<NodeLock, AgentError> {
    Ok(NodeLock::acquire(root, wait, || {
        tracing::warn!(
            lock = LOCK_FILE,
            "a pullthrough-agent runs on this node; waiting up to {wait:?} for it to stop"
        );
    })?)
}

/// Carries out the command.
pub fn execute(cli: Cli) -> Result<(), AgentError> {
    let mut stdout = std::io::stdout();
    match cli.command {
        Command::Apply {
            root,
            config,
            runtime,
            docker_action,
            migrate_containerd_mirrors,
            dry_run,
            reload_settle,
            wait_for_agent,
        } => {
            let runtimes = runtimes(&runtime)?;
            let cfg = crate::config::load(&config)?;
            let root = Root::new(root);
            let _lock = (!dry_run)
                .then(|| node_lock(&root, wait_for_agent))
                .transpose()?;
            let mut exec = SystemExecutor::new(root.clone());
            let opts = ApplyOptions {
                runtimes,
                docker_action,
                reload_settle,
                dry_run,
                migrate_containerd_mirrors,
                hosts_gate_closed: false,
            };
            engine::apply(&root, &cfg, &opts, &mut exec, &mut stdout).map(|_| ())
        }
        Command::Revert {
            root,
            dry_run,
            reload_settle,
            wait_for_agent,
        } => {
            let root = Root::new(root);
            let _lock = (!dry_run)
                .then(|| node_lock(&root, wait_for_agent))
                .transpose()?;
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
                    serde_json::to_string_pretty(&status).map_err(|source| AgentError::Json {
                        what: "status".into(),
                        source,
                    })?
                ),
            }
            Ok(())
        }
        Command::Run(a) => {
            let runtimes = runtimes(&a.runtime)?;
            let (source, lease_namespace) = match a.config_file {
                Some(path) => (
                    Source::File {
                        path,
                        poll: a.poll_interval,
                    },
                    None,
                ),
                None => {
                    if a.node_name.is_none() {
                        return Err(ConfigError::NoNodeName.into());
                    }
                    (
                        Source::Kube {
                            namespace: a.namespace.clone(),
                            table_configmap: a.table_configmap,
                            ca_configmap: a.ca_configmap,
                        },
                        Some(a.namespace),
                    )
                }
            };
            let opts = RunOptions {
                root: Root::new(a.root),
                source,
                runtimes,
                docker_action: a.docker_action,
                reload_settle: a.reload_settle,
                node_name: a.node_name,
                lease_namespace,
                lease_prefix: a.lease_prefix,
                lease_renew: a.lease_renew,
                lease_duration: a.lease_duration,
                health_addr: a.health_addr,
                probe_interval: a.probe_interval,
                probe_timeout: a.probe_timeout,
                fail_threshold: a.fail_threshold,
                success_threshold: a.success_threshold,
                resync: a.resync,
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(AgentError::AsyncRuntime)?;
            Ok(rt.block_on(run::run(opts))?)
        }
    }
}

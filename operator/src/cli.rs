//! Command-line flags of `pullthrough-operator`.

use pullthrough_api::contract;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

pub use crate::proxy_status::AdminToken;

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// A `--reserved-host`: compared without case or a final dot, as every
/// registry name is, so `API.Example.com.` is accepted and reserves
/// `api.example.com`.
fn reserved_host(s: &str) -> Result<String, String> {
    let host = s.trim_end_matches('.').to_ascii_lowercase();
    pullthrough_api::names::validate_host(&host)?;
    Ok(host)
}

/// Reconcile MirrorRegistry resources (pullthrough.dev/v1alpha1) into the
/// registry table ConfigMap, the CA Secret/ConfigMap and per-registry status.
///
/// Object names follow docs/cluster-contract.md; every name below is a flag so
/// the chart can pass the release's names.
#[derive(Debug, Clone, Parser)]
#[command(version, about, long_about)]
pub struct Args {
    /// Namespace pullthrough is installed in: the table and CA ConfigMaps,
    /// the CA Secret, the leader and agent Leases, the proxy Service.
    #[arg(long, env = "POD_NAMESPACE", default_value = contract::DEFAULT_NAMESPACE)]
    pub namespace: String,

    /// Address serving /healthz, /readyz and /metrics.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Base proxy config file (YAML, the proxy's format): `listen`, `ca`,
    /// `dataDir`, `names`, optionally `proxy:` defaults such as `neverHijack`.
    /// Its `registries` are ignored; the table adds one per accepted CR.
    /// Without it the table starts from an empty config.
    #[arg(long, value_name = "FILE")]
    pub proxy_base_config: Option<PathBuf>,

    /// Name of the registry-table ConfigMap (key `config.yaml`).
    #[arg(long, default_value = contract::TABLE_CONFIGMAP)]
    pub table_configmap: String,

    /// Directory where the proxy mounts the table ConfigMap: `tls.caBundle`
    /// PEMs are published as extra keys and referenced as files there.
    #[arg(long, value_name = "DIR", default_value = "/etc/pullthrough")]
    pub table_mount_path: PathBuf,

    /// Secret (in --namespace) the operator writes the upstream credentials
    /// of MirrorRegistries with `spec.credentialsSecretRef` into, one key
    /// `<host>.json` per registry; only the proxy mounts it, the agents never
    /// see it.
    #[arg(long, default_value = contract::CREDENTIALS_SECRET)]
    pub credentials_secret: String,

    /// Directory where the proxy mounts --credentials-secret; the table's
    /// `registries[].credentialsFile` points there.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/etc/pullthrough/credentials"
    )]
    pub credentials_mount_path: PathBuf,

    /// ConfigMap (in --namespace) the operator keeps the pins in: the
    /// images of every unfinished Pod and of the last --pin-revisions
    /// ReplicaSets of each Deployment, which the proxy never evicts. Empty:
    /// no pinning (and no Pod/ReplicaSet watch).
    #[arg(long, default_value = contract::PINS_CONFIGMAP)]
    pub pins_configmap: String,

    /// How many ReplicaSet revisions of each Deployment are pinned (the
    /// current one and what a rollback goes back to).
    #[arg(long, default_value_t = 2)]
    pub pin_revisions: usize,

    /// Size cap of the pins document in bytes: at most (and by default)
    /// 900 KiB, what a ConfigMap safely holds. What does not fit is left
    /// out (what pods run goes in first, older revisions last) and
    /// reported (PinsTruncated Event,
    /// pullthrough_operator_pins_dropped). Lower it to keep the ConfigMap
    /// small.
    #[arg(
        long,
        default_value_t = crate::pins::MAX_PINS_BYTES,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new()
            .range(1..=crate::pins::MAX_PINS_BYTES as u64),
    )]
    pub pins_max_bytes: usize,

    /// Registries pods pull from that no MirrorRegistry mirrors: `report`
    /// keeps a DiscoveredRegistry per host (pods, nodes, example images)
    /// with a `Discovered` Event; `create` also creates its MirrorRegistry;
    /// `off` does neither.
    #[arg(long, value_enum, default_value = "report")]
    pub discovery: crate::discovery::Mode,

    /// Name of the CA Secret (`tls.crt`, `tls.key`) and of the CA ConfigMap
    /// (`ca.crt`, every certificate nodes must trust).
    #[arg(long, default_value = contract::CA_NAME)]
    pub ca_name: String,

    /// Validity of a newly generated CA certificate.
    #[arg(long, value_parser = duration, default_value = "3650d")]
    pub ca_validity: Duration,

    /// Start rotating when the active CA expires within this time: a new CA
    /// is generated and published next to the old one.
    #[arg(long, value_parser = duration, default_value = "90d")]
    pub ca_rotate_before: Duration,

    /// How long both CAs are published before the new one becomes the
    /// Secret's active CA (and how long the old one is still published
    /// after), so nodes trust the new CA before the proxy signs with it.
    #[arg(long, value_parser = duration, default_value = "7d")]
    pub ca_overlap: Duration,

    /// How often the CA is checked for rotation.
    #[arg(long, value_parser = duration, default_value = "1h")]
    pub ca_check_interval: Duration,

    /// Name of the proxy Service; its ClusterIP and `https`/`http`/`admin`
    /// ports fill the table's `proxy:` section for nodes.
    #[arg(long, default_value = contract::PROXY_SERVICE)]
    pub proxy_service: String,

    /// `caFile` written into the table's `proxy:` section: where agents find
    /// the CA bundle on the node.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/etc/pullthrough/ca/ca.crt"
    )]
    pub node_ca_file: PathBuf,

    /// URL of the proxy's `GET /status` (configHash, registries). Default:
    /// `http://<Service ClusterIP>:<admin port>/status`.
    #[arg(long, value_name = "URL")]
    pub proxy_status_url: Option<String>,

    /// The proxy's admin token (its `adminToken`), sent with `GET /status`:
    /// the proxy then lists every tag move, so repositories that need
    /// credentials get `TagMoved` Events too. Without it, or with a token
    /// the proxy does not take (logged as a warning), only moves in public
    /// repositories are told. Set it through the environment, not the
    /// command line, where every user of the node can read it.
    #[arg(
        long,
        env = "PULLTHROUGH_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub proxy_admin_token: Option<AdminToken>,

    /// The cluster's DNS domain: no MirrorRegistry may claim a name under
    /// it (nor under `.svc`, nor the proxy's own Service names).
    #[arg(long, env = "CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,

    /// A name no MirrorRegistry may claim, besides the built-in ones (the
    /// proxy's Service, the cluster domain, `.svc`, the API server as the
    /// operator reaches it). Name every host nodes reach the API server by
    /// (the server of the kubelet's kubeconfig, e.g. `api.example.com`)
    /// and any other service they depend on by name: the agents would
    /// point that name at the proxy. With `--discovery=create`, any pod's
    /// image can ask for a MirrorRegistry. Repeatable, or comma-separated.
    #[arg(
        long = "reserved-host",
        value_name = "HOST",
        value_delimiter = ',',
        value_parser = reserved_host
    )]
    pub reserved_hosts: Vec<String>,

    /// Prefix of the agents' per-node Lease names.
    #[arg(long, default_value = contract::AGENT_LEASE_PREFIX)]
    pub agent_lease_prefix: String,

    /// How long deleting a MirrorRegistry waits for live agents to drop it
    /// before the finalizer is removed anyway (with a Warning event).
    #[arg(long, value_parser = duration, default_value = "2m")]
    pub delete_timeout: Duration,

    /// How often every MirrorRegistry is reconciled without a change
    /// (refreshes ProxyReady and NodesConfigured).
    #[arg(long, value_parser = duration, default_value = "30s")]
    pub resync_interval: Duration,

    /// Name of the leader-election Lease.
    #[arg(long, default_value = contract::LEADER_LEASE)]
    pub leader_lease: String,

    /// Leader Lease duration; a replica that has not renewed for this long
    /// loses leadership.
    #[arg(long, value_parser = duration, default_value = "15s")]
    pub leader_lease_duration: Duration,

    /// Identity in the leader Lease (default: $POD_NAME, else hostname-pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// Log as JSON lines instead of text.
    #[arg(long)]
    pub log_json: bool,
}

//! What the reconciler is given: the settings from the flags, the base
//! proxy config, and its handles on the API server. Apart from the
//! controller's [`Context`](crate::controller::Context) so the modules that
//! observe, publish and write status can take just the parts they use.

use std::path::PathBuf;
use std::time::Duration;

use kube::Client;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::Store;
use pullthrough_api::config::ProxyConfig;
use pullthrough_api::crd::MirrorRegistry;

use crate::reserved::ReservedNames;

/// What the reconciler needs from the flags.
#[derive(Debug, Clone)]
pub struct Settings {
    pub namespace: String,
    pub table_configmap: String,
    pub table_mount_path: PathBuf,
    pub credentials_secret: String,
    pub credentials_mount_path: PathBuf,
    pub proxy_service: String,
    pub node_ca_file: PathBuf,
    pub proxy_status_url: Option<String>,
    /// Sent with `GET /status`, so every tag move is listed.
    pub proxy_admin_token: Option<crate::proxy_status::AdminToken>,
    pub agent_lease_prefix: String,
    pub delete_timeout: Duration,
    pub resync_interval: Duration,
    pub cluster_domain: String,
    /// The API server's host as this operator reaches it; no registry may
    /// claim it.
    pub api_server_host: Option<String>,
    /// `--reserved-host`: more names no registry may claim.
    pub reserved_hosts: Vec<String>,
}

impl Settings {
    pub fn from_args(a: &crate::cli::Args) -> Self {
        Self {
            namespace: a.namespace.clone(),
            table_configmap: a.table_configmap.clone(),
            table_mount_path: a.table_mount_path.clone(),
            credentials_secret: a.credentials_secret.clone(),
            credentials_mount_path: a.credentials_mount_path.clone(),
            proxy_service: a.proxy_service.clone(),
            node_ca_file: a.node_ca_file.clone(),
            proxy_status_url: a.proxy_status_url.clone(),
            proxy_admin_token: a.proxy_admin_token.clone(),
            agent_lease_prefix: a.agent_lease_prefix.clone(),
            delete_timeout: a.delete_timeout,
            resync_interval: a.resync_interval,
            cluster_domain: a.cluster_domain.clone(),
            api_server_host: None,
            reserved_hosts: a.reserved_hosts.clone(),
        }
    }

    /// The names no MirrorRegistry may claim in this installation.
    pub fn reserved_names(&self) -> ReservedNames {
        ReservedNames::new(
            &self.namespace,
            &self.proxy_service,
            &self.cluster_domain,
            self.api_server_host.as_deref(),
            &self.reserved_hosts,
        )
    }
}

/// What the operator was told: flags and the base proxy config the table
/// is rendered onto.
pub struct Config {
    pub settings: Settings,
    pub base: ProxyConfig,
}

/// How the reconciler reaches the API server: the client, the controller's
/// MirrorRegistry cache, and the Event recorder.
pub struct Kube {
    pub client: Client,
    pub store: Store<MirrorRegistry>,
    pub recorder: Recorder,
    /// This replica's name in the Events it writes (`reportingInstance`).
    pub instance: String,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use clap::Parser as _;

    use super::*;

    /// `--reserved-host` names reach the table's reserved names, repeated
    /// or comma-separated, with or without a port.
    #[test]
    fn reserved_host_flags_reserve_their_names() {
        let args = crate::cli::Args::try_parse_from([
            "pullthrough-operator",
            "--reserved-host",
            "API.Nodes.Example:6443,pkgs.example.",
            "--reserved-host=ntp.example",
        ])
        .unwrap();
        let reserved = Settings::from_args(&args).reserved_names();
        for host in ["api.nodes.example", "pkgs.example:443", "NTP.example"] {
            assert!(
                reserved
                    .why(host)
                    .is_some_and(|w| w.contains("--reserved-host")),
                "{host}"
            );
        }
        assert_eq!(reserved.why("quay.io"), None);
        for bad in ["https://api.example", "api.example/v1", ""] {
            assert!(
                crate::cli::Args::try_parse_from(["pullthrough-operator", "--reserved-host", bad])
                    .is_err(),
                "{bad:?}"
            );
        }
    }
}

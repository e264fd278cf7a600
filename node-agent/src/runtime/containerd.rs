//! containerd (CRI): `config_path` in config.toml (set once; enabling it is
//! the only change that needs a restart), then one `hosts.toml` per
//! registry name under it, with the proxy CA beside it. Deprecated
//! `registry.mirrors` are migrated into hosts.toml only when asked.

use std::collections::BTreeMap;

use super::{
    Action, AfterApply, Detection, Executor, PlanInput, Planned, Runtime, RuntimeKind, Service,
    Step, first_present,
};
use crate::desired;
use crate::engine::plan::Planner;
use crate::error::AgentError;
use crate::fsio::Root;
use crate::patch::containerd::{self, CONFIG_TOML, ConfigRecord, authority};
use crate::patch::docker_certs::CA_FILE_NAME;
use crate::patch::hosts_toml::{self, HostTls, MirrorHost, host_dir_name};
use crate::patch::is_generated;
use crate::state::FileKind;

/// containerd.
pub struct Containerd;

/// One hosts.toml: its `server`, the server's TLS settings, its hosts.
type HostsFile = (String, HostTls, Vec<MirrorHost>);

impl Runtime for Containerd {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Containerd
    }

    fn evidence(&self) -> &'static [&'static str] {
        &[
            "/etc/containerd",
            "/run/containerd/containerd.sock",
            "/usr/bin/containerd",
            "/usr/local/bin/containerd",
        ]
    }

    /// A containerd whose CRI plugin is disabled only serves dockerd:
    /// hosts.toml would change nothing.
    fn detect(&self, root: &Root) -> Result<Detection, AgentError> {
        let Some(evidence) = first_present(root, self.evidence()) else {
            return Ok(Detection::Absent);
        };
        let cfg = root.read(CONFIG_TOML)?;
        if let Ok(info) = containerd::inspect(cfg.as_deref())
            && info.cri_disabled
        {
            return Ok(Detection::Skipped(format!(
                "containerd: skipped (found {evidence}, but its CRI plugin is disabled: it only serves dockerd)"
            )));
        }
        Ok(Detection::Found(evidence))
    }

    fn plan(
        &self,
        input: &PlanInput<'_>,
        pl: &mut Planner<'_>,
        _exec: &mut dyn Executor,
    ) -> Result<Planned, AgentError> {
        let mut planned = Planned::default();
        let before = pl.read(CONFIG_TOML)?;
        let prev = match pl.prev_kind(CONFIG_TOML) {
            Some(FileKind::ContainerdConfig { record }) => record.clone(),
            _ => ConfigRecord::default(),
        };
        let info =
            containerd::inspect(before.as_deref()).map_err(AgentError::patch(CONFIG_TOML))?;
        let p = match (
            &info.hosts_dir(),
            info.mirrors.is_empty() && info.tls_configs.is_empty(),
        ) {
            // config_path already set, nothing deprecated: leave the file
            // alone (and out of the record unless the agent set it).
            (Some(_), true) if !pl.is_recorded(CONFIG_TOML) => None,
            _ => Some(
                containerd::ensure_config_path(
                    before.as_deref(),
                    &prev,
                    input.opts.migrate_containerd_mirrors,
                )
                .map_err(AgentError::patch(CONFIG_TOML))?,
            ),
        };
        let (hosts_dir, migrated) = match p {
            None => (
                info.hosts_dir()
                    .unwrap_or(containerd::DEFAULT_CERTS_D)
                    .to_string(),
                BTreeMap::new(),
            ),
            Some(p) => {
                planned.restart_needed =
                    p.enabled && p.bytes.as_slice() != before.as_deref().unwrap_or_default();
                let dir = p.hosts_dir.clone();
                pl.stage(
                    CONFIG_TOML,
                    before,
                    Some(p.bytes),
                    FileKind::ContainerdConfig { record: p.record },
                    Vec::new(),
                );
                (dir, p.migrated)
            }
        };
        let proxy_host = MirrorHost {
            url: input.cfg.proxy.base_url(),
            tls: HostTls {
                ca: input.ca.map(|_| CA_FILE_NAME.to_string()),
                ..HostTls::default()
            },
        };
        let mut files: BTreeMap<String, HostsFile> = BTreeMap::new();
        for r in desired::containerd(input.cfg) {
            files.insert(
                r.name.clone(),
                (r.server, HostTls::default(), vec![proxy_host.clone()]),
            );
        }
        for (name, m) in migrated {
            let server = files
                .get(&name)
                .map(|f| f.0.clone())
                .unwrap_or_else(|| hosts_toml::server_for(&name, None));
            let server_tls = m.tls.get(authority(&server)).cloned().unwrap_or_default();
            let entry = files
                .entry(name.clone())
                .or_insert_with(|| (server.clone(), HostTls::default(), Vec::new()));
            entry.1 = server_tls;
            for e in &m.endpoints {
                if authority(e) == authority(&server) || entry.2.iter().any(|h| &h.url == e) {
                    continue;
                }
                entry.2.push(MirrorHost {
                    url: e.clone(),
                    tls: m.tls.get(authority(e)).cloned().unwrap_or_default(),
                });
            }
        }
        for (name, (server, server_tls, hosts_list)) in files {
            if hosts_list.is_empty() {
                continue;
            }
            let dir = format!("{hosts_dir}/{}", host_dir_name(&name));
            let path = format!("{dir}/hosts.toml");
            let bytes = hosts_toml::hosts_toml(&server, &server_tls, &hosts_list)
                .map_err(AgentError::patch(&path))?;
            let before = pl.read(&path)?;
            let mut notes = Vec::new();
            if let Some(b) = &before
                && !is_generated(b)
                && !pl.is_recorded(&path)
            {
                notes.push(
                    "replaced a hosts.toml the agent did not write; backed up, revert restores it"
                        .into(),
                );
            }
            pl.stage(&path, before, Some(bytes), FileKind::Generated, notes);
            if hosts_list.iter().any(|h| h.url == proxy_host.url)
                && let Some(ca) = input.ca
            {
                let ca_path = format!("{dir}/{CA_FILE_NAME}");
                pl.stage_ca(&ca_path, ca)?;
            }
        }
        Ok(planned)
    }

    /// hosts.toml is re-read on every pull; only enabling config_path
    /// needs a restart.
    fn after_apply(&self, cx: &AfterApply<'_>) -> Option<Step> {
        let touched = cx
            .changes
            .iter()
            .filter(|c| c.changed())
            .any(|c| c.path == CONFIG_TOML || c.path.ends_with("/hosts.toml"));
        if !cx.selected || !touched {
            return None;
        }
        Some(if cx.planned.restart_needed {
            Step {
                service: Service::Containerd,
                action: Action::Restart,
                reason: "config_path enabled in config.toml".into(),
                dry_run_reason: Some("config_path enabled".into()),
            }
        } else {
            Step {
                service: Service::Containerd,
                action: Action::Nothing,
                reason: "hosts.toml is re-read on every pull".into(),
                dry_run_reason: None,
            }
        })
    }
}

//! containerd (CRI): `config_path` in config.toml (set once; enabling it is
//! the only change that needs a restart), then one `hosts.toml` per
//! registry name under it, with the proxy CA beside it. Deprecated
//! `registry.mirrors` are migrated into hosts.toml only when asked.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::{
    Action, AfterApply, Detection, Executor, PlanInput, Planned, Runtime, RuntimeKind, Service,
    Step, first_present,
};
use crate::desired;
use crate::engine::plan::{Change, Planner};
use crate::error::AgentError;
use crate::fsio::Root;
use crate::patch::PatchError;
use crate::patch::containerd::{self, CONFIG_TOML, ConfigRecord, Imported, authority};
use crate::patch::docker_certs::CA_FILE_NAME;
use crate::patch::hosts_toml::{self, HostTls, MirrorHost, host_dir_name};
use crate::patch::is_generated;
use crate::state::FileKind;

/// containerd.
pub struct Containerd;

/// One hosts.toml: its `server`, the server's TLS settings, its hosts.
type HostsFile = (String, HostTls, Vec<MirrorHost>);

/// Files containerd may load through `imports`, at most.
const MAX_IMPORTS: usize = 256;

/// The files containerd loads after config.toml through `imports` (theirs
/// too), in its order: each file's entries in turn, a file already loaded
/// skipped. As containerd resolves them: a relative entry against the
/// importing file's directory; an entry with `*` is a pattern (only its
/// file name may hold one here) and may match nothing; a plain entry that
/// does not exist stops containerd from starting, so it is refused.
fn imported(root: &Root, main: Option<&[u8]>) -> Result<Vec<Imported>, AgentError> {
    let Some(main) = main else {
        return Ok(Vec::new());
    };
    let entries = containerd::imports_of(main).map_err(AgentError::patch(CONFIG_TOML))?;
    let mut pending: VecDeque<String> = expand(root, CONFIG_TOML, &entries)?.into();
    let mut seen = BTreeSet::from([CONFIG_TOML.to_string()]);
    let mut out = Vec::new();
    while let Some(path) = pending.pop_front() {
        if !seen.insert(path.clone()) {
            continue;
        }
        if out.len() == MAX_IMPORTS {
            return Err(AgentError::patch(CONFIG_TOML)(PatchError::new(format!(
                "imports more than {MAX_IMPORTS} files"
            ))));
        }
        let bytes = root.read(&path)?.ok_or_else(|| {
            AgentError::patch(&path)(PatchError::new(
                "is in containerd's `imports` but does not exist: containerd would not start",
            ))
        })?;
        let file = containerd::inspect_import(&path, &bytes).map_err(AgentError::patch(&path))?;
        pending.extend(expand(root, &path, &file.imports)?);
        out.push(file);
    }
    Ok(out)
}

/// The paths the `imports` entries of `importer` name.
fn expand(root: &Root, importer: &str, entries: &[String]) -> Result<Vec<String>, AgentError> {
    let mut out = Vec::new();
    for entry in entries {
        let path = containerd::import_path(importer, entry);
        // containerd globs only entries with a `*`.
        if !entry.contains('*') {
            out.push(path);
            continue;
        }
        let dir = crate::fsio::parent(&path);
        let name = &path[dir.len()..].trim_start_matches('/');
        let refuse = |why: String| AgentError::patch(importer)(PatchError::new(why));
        if dir.contains(['*', '?', '[']) {
            return Err(refuse(format!(
                "imports `{entry}`: a pattern in a directory name is not supported, only in the file name"
            )));
        }
        let pattern = glob::Pattern::new(name)
            .map_err(|e| refuse(format!("imports `{entry}`: not a pattern: {e}")))?;
        let opts = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: false,
        };
        for found in root.list_dir(&dir)? {
            if pattern.matches_with(&found, opts) {
                out.push(format!("{}/{found}", dir.trim_end_matches('/')));
            }
        }
    }
    Ok(out)
}

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
        let disabled_in_import =
            imported(root, cfg.as_deref()).is_ok_and(|files| files.iter().any(|f| f.cri_disabled));
        if let Ok(info) = containerd::inspect(cfg.as_deref())
            && (info.cri_disabled || disabled_in_import)
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
        // Files containerd merges over config.toml: their `config_path`
        // wins (the last one), and their deprecated mirrors stop the CRI
        // plugin as the main file's would.
        let imports = imported(pl.root(), before.as_deref())?;
        if let Some(f) = imports.iter().find(|f| f.deprecated) {
            return Err(AgentError::patch(&f.path)(PatchError::new(
                "has containerd's deprecated `registry.mirrors` or `registry.configs.*.tls`: next to `config_path` (which hosts.toml needs) they stop the CRI plugin from loading; move them into hosts.toml files (the agent migrates only config.toml's own)",
            )));
        }
        let imported_dir = match imports
            .iter()
            .rev()
            .find_map(|f| f.config_path.as_deref().map(|p| (f.path.as_str(), p)))
        {
            Some((path, p)) => match p.split(':').find(|s| !s.is_empty()) {
                Some(dir) => Some(dir.to_string()),
                None => {
                    return Err(AgentError::patch(path)(PatchError::new(
                        "sets the CRI registry's `config_path` to \"\", which turns hosts.toml files off for containerd: remove the key or name a directory",
                    )));
                }
            },
            None => None,
        };
        let p = match (
            &info.hosts_dir(),
            info.mirrors.is_empty() && info.tls_configs.is_empty(),
        ) {
            // An imported file decides where hosts.toml files go: the main
            // file is not the agent's to edit. (An edit the agent made
            // before stays as it is: undoing it could bring back mirrors it
            // migrated; the import overrides its config_path anyway.)
            _ if imported_dir.is_some() && !pl.is_recorded(CONFIG_TOML) => None,
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
        let (main_dir, migrated) = match p {
            None => (
                info.hosts_dir()
                    .unwrap_or(containerd::DEFAULT_CERTS_D)
                    .to_string(),
                BTreeMap::new(),
            ),
            Some(p) => {
                planned.restart_needed = p.enabled
                    && p.bytes.as_slice() != before.as_deref().unwrap_or_default()
                    && !pl.left_alone(CONFIG_TOML);
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
        let hosts_dir = imported_dir.unwrap_or(main_dir);
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
            let before = pl.read(&path)?;
            // An admin's own hosts.toml for the registry (their mirrors,
            // TLS settings): the proxy goes in as its first host, the rest
            // stays theirs; so too for their own file in place of one the
            // agent generated. (A file whose mirrors the agent migrated out
            // of config.toml is generated whole.)
            let admins = before.as_ref().is_some_and(|b| !is_generated(b))
                && (matches!(
                    pl.prev_kind(&path),
                    None | Some(FileKind::HostsTomlEdit { .. })
                ) || pl.taken_over(&path, before.as_deref()))
                && hosts_list.len() == 1
                && hosts_list[0].url == proxy_host.url;
            let (bytes, kind) = match &before {
                Some(b) if admins => {
                    // The proxy moved: its old host goes, or containerd
                    // would try a dead address first.
                    let base = match pl.prev_kind(&path) {
                        Some(FileKind::HostsTomlEdit { host }) if *host != proxy_host.url => {
                            hosts_toml::unmerge(b, host).map_err(AgentError::patch(&path))?
                        }
                        _ => b.clone(),
                    };
                    (
                        hosts_toml::merge(&base, &proxy_host).map_err(AgentError::patch(&path))?,
                        FileKind::HostsTomlEdit {
                            host: proxy_host.url.clone(),
                        },
                    )
                }
                _ => (
                    hosts_toml::hosts_toml(&server, &server_tls, &hosts_list)
                        .map_err(AgentError::patch(&path))?,
                    FileKind::Generated,
                ),
            };
            let mut notes = Vec::new();
            if let Some(b) = &before
                && !is_generated(b)
                && !admins
                && !pl.is_recorded(&path)
            {
                notes.push(
                    "replaced a hosts.toml the agent did not write; backed up, revert restores it"
                        .into(),
                );
            }
            pl.stage(&path, before, Some(bytes), kind, notes);
            if hosts_list.iter().any(|h| h.url == proxy_host.url)
                && let Some(ca) = input.ca
            {
                let ca_path = format!("{dir}/{CA_FILE_NAME}");
                pl.stage_ca(&ca_path, ca)?;
            }
        }
        Ok(planned)
    }

    /// containerd reads config.toml only when it starts: a revert that
    /// changed it (the agent's `config_path` gone, mirrors moved out by
    /// `--migrate-containerd-mirrors` back in place of the hosts.toml files
    /// it removed) takes effect with a restart, not before.
    fn after_revert(&self, changes: &[Change]) -> Option<Step> {
        changes
            .iter()
            .any(|c| c.path == CONFIG_TOML && c.changed())
            .then(|| Step {
                service: Service::Containerd,
                action: Action::Restart,
                reason: "config.toml restored".into(),
                dry_run_reason: Some("config.toml restored".into()),
                interim: None,
            })
    }

    /// hosts.toml is re-read on every pull; only enabling config_path
    /// needs a restart. containerd dropped from the config has its
    /// config.toml given back by the apply: restarted as after a revert.
    fn after_apply(&self, cx: &AfterApply<'_>) -> Option<Step> {
        if !cx.selected {
            return self.after_revert(cx.changes);
        }
        let touched = cx
            .changes
            .iter()
            .filter(|c| c.changed())
            .any(|c| c.path == CONFIG_TOML || c.path.ends_with("/hosts.toml"));
        if !touched {
            return None;
        }
        Some(if cx.planned.restart_needed {
            Step {
                service: Service::Containerd,
                action: Action::Restart,
                reason: "config_path enabled in config.toml".into(),
                dry_run_reason: Some("config_path enabled".into()),
                interim: None,
            }
        } else {
            Step {
                service: Service::Containerd,
                action: Action::Nothing,
                reason: "hosts.toml is re-read on every pull".into(),
                dry_run_reason: None,
                interim: None,
            }
        })
    }
}

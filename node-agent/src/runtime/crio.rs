//! CRI-O and podman: one registries.conf.d drop-in mirroring each registry
//! at the proxy, the proxy CA in `/etc/containers/certs.d`; CRI-O reloads
//! on SIGHUP, podman reads the drop-in on each run.

use std::collections::BTreeMap;

use super::{
    Action, AfterApply, Executor, PlanInput, Planned, Runtime, RuntimeKind, Service, Step,
};
use crate::desired;
use crate::engine::plan::{Change, Planner};
use crate::error::AgentError;
use crate::patch::crio::{self, AdminEntry, DROP_IN, DROP_IN_DIR, REGISTRIES_CONF};
use crate::patch::docker_certs::{self, CONTAINERS_CERTS_D};
use crate::patch::is_generated;
use crate::state::FileKind;

/// CRI-O (and podman, which reads the same files).
pub struct Crio;

impl Runtime for Crio {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Crio
    }

    fn evidence(&self) -> &'static [&'static str] {
        &[
            "/etc/crio",
            "/usr/bin/crio",
            "/usr/local/bin/crio",
            "/usr/bin/podman",
            "/etc/containers",
        ]
    }

    fn plan(
        &self,
        input: &PlanInput<'_>,
        pl: &mut Planner<'_>,
        _exec: &mut dyn Executor,
    ) -> Result<Planned, AgentError> {
        // Said on every apply, not only when the drop-in changes.
        let mut said = Vec::new();
        let (earlier, later) = admin_entries(pl)?;
        let mut regs = desired::crio(input.cfg);
        regs.retain_mut(|r| {
            if let Some((file, _)) = later.iter().find(|(_, p)| *p == r.prefix) {
                said.push(format!(
                    "crio: {file} also has a [[registry]] for {} and is read after the agent's drop-in: it replaces the proxy mirror there",
                    r.prefix
                ));
            }
            match earlier.get(&r.prefix) {
                Some(a) if a.blocked => {
                    said.push(format!(
                        "crio: {} is blocked in {}: left blocked, not mirrored",
                        r.prefix, a.file
                    ));
                    false
                }
                // The admin sends this prefix somewhere else than the
                // proxy's upstream for it (an internal copy, an air gap):
                // the proxy mirror would go around that.
                Some(a)
                    if a
                        .location
                        .as_deref()
                        .is_some_and(|l| l != r.prefix && l != r.upstream) =>
                {
                    said.push(format!(
                        "crio: {} is rewritten to {} in {}, not to {}, where the proxy fetches it: left as the admin set it, not mirrored",
                        r.prefix,
                        a.location.as_deref().unwrap_or_default(),
                        a.file,
                        r.upstream
                    ));
                    false
                }
                found => {
                    r.admin = found.cloned();
                    true
                }
            }
        });
        let bytes = crio::drop_in(&regs).map_err(AgentError::patch(DROP_IN))?;
        let before = pl.read(DROP_IN)?;
        let mut notes = Vec::new();
        if let Some(b) = &before
            && !is_generated(b)
            && !pl.is_recorded(DROP_IN)
        {
            notes.push(
                "replaced a file the agent did not write; backed up, revert restores it".into(),
            );
        }
        pl.stage(DROP_IN, before, bytes, FileKind::Generated, notes);
        if let Some(ca) = input.ca
            && !regs.is_empty()
        {
            for path in
                docker_certs::ca_paths(CONTAINERS_CERTS_D, [input.cfg.proxy.authority().as_str()])
            {
                pl.stage_ca(&path, ca)?;
            }
        }
        Ok(Planned {
            notes: said,
            ..Planned::default()
        })
    }

    /// Also when CRI-O is no longer configured: removing its drop-in is a
    /// change it must see.
    fn after_apply(&self, cx: &AfterApply<'_>) -> Option<Step> {
        drop_in_changed(cx.changes).then(|| Step {
            service: Service::Crio,
            action: Action::Reload,
            reason: "registries.conf.d drop-in changed (podman reads it on each run)".into(),
            dry_run_reason: Some("registries.conf.d drop-in changed".into()),
            interim: None,
        })
    }

    fn after_revert(&self, changes: &[Change]) -> Option<Step> {
        drop_in_changed(changes).then(|| Step {
            service: Service::Crio,
            action: Action::Reload,
            reason: "registries.conf.d drop-in removed".into(),
            dry_run_reason: None,
            interim: None,
        })
    }
}

/// The admin's `[[registry]]` entries: the effective one per prefix from
/// registries.conf and the drop-ins read before the agent's, and the
/// (file, prefix) pairs of drop-ins read after it, which replace the
/// agent's entries for those prefixes.
type AdminEntries = (BTreeMap<String, AdminEntry>, Vec<(String, String)>);

fn admin_entries(pl: &Planner<'_>) -> Result<AdminEntries, AgentError> {
    let ours = DROP_IN.rsplit('/').next().unwrap_or_default();
    let mut files = vec![REGISTRIES_CONF.to_string()];
    let mut after = Vec::new();
    for name in pl.root().list_dir(DROP_IN_DIR)? {
        if name == ours || !name.ends_with(".conf") {
            continue;
        }
        let path = format!("{DROP_IN_DIR}/{name}");
        if name.as_str() < ours {
            files.push(path);
        } else {
            after.push(path);
        }
    }
    let mut earlier = BTreeMap::new();
    for file in files {
        let Some(bytes) = pl.read(&file)? else {
            continue;
        };
        for (prefix, entry) in
            crio::admin_entries(&file, &bytes).map_err(AgentError::patch(&file))?
        {
            earlier.insert(prefix, entry);
        }
    }
    let mut later = Vec::new();
    for file in after {
        let Some(bytes) = pl.read(&file)? else {
            continue;
        };
        for (prefix, _) in crio::admin_entries(&file, &bytes).map_err(AgentError::patch(&file))? {
            later.push((file.clone(), prefix));
        }
    }
    Ok((earlier, later))
}

fn drop_in_changed(changes: &[Change]) -> bool {
    changes.iter().any(|c| c.path == DROP_IN && c.changed())
}

//! CRI-O and podman: one registries.conf.d drop-in mirroring each registry
//! at the proxy, the proxy CA in `/etc/containers/certs.d`; CRI-O reloads
//! on SIGHUP, podman reads the drop-in on each run.

use super::{
    Action, AfterApply, Executor, PlanInput, Planned, Runtime, RuntimeKind, Service, Step,
};
use crate::desired;
use crate::engine::plan::{Change, Planner};
use crate::error::AgentError;
use crate::patch::crio::{self, DROP_IN};
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
        let regs = desired::crio(input.cfg);
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
        Ok(Planned::default())
    }

    /// Also when CRI-O is no longer configured: removing its drop-in is a
    /// change it must see.
    fn after_apply(&self, cx: &AfterApply<'_>) -> Option<Step> {
        drop_in_changed(cx.changes).then(|| Step {
            service: Service::Crio,
            action: Action::Reload,
            reason: "registries.conf.d drop-in changed (podman reads it on each run)".into(),
            dry_run_reason: Some("registries.conf.d drop-in changed".into()),
        })
    }

    fn after_revert(&self, changes: &[Change]) -> Option<Step> {
        drop_in_changed(changes).then(|| Step {
            service: Service::Crio,
            action: Action::Reload,
            reason: "registries.conf.d drop-in removed".into(),
            dry_run_reason: None,
        })
    }
}

fn drop_in_changed(changes: &[Change]) -> bool {
    changes.iter().any(|c| c.path == DROP_IN && c.changed())
}

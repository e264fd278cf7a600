//! `status`: what the agent has applied on this node, as a table or JSON.

use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::error::AgentError;
use crate::fsio::Root;
use crate::patch::hosts;
use crate::runtime::docker::HOSTS;
use crate::runtime::{Action, Service, Step};
use crate::state::{self, LastApply, PendingAction, sha256_hex};

/// One file in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FileStatus {
    pub path: String,
    pub what: String,
    /// `applied`, `changed since apply`, `missing`, `removed`, `managed
    /// by a newer agent` (a record kind this agent does not know: apply
    /// and revert leave the file alone).
    pub state: String,
    pub existed_before: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
}

/// `status` output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub applied: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_apply: Option<LastApply>,
    pub files: Vec<FileStatus>,
    /// `/etc/hosts` block entries (`address name`).
    pub hosts_entries: Vec<String>,
    /// Daemon actions owed since an earlier apply, each with what the next
    /// apply does with it (`containerd restart (why): failed, retried on
    /// the next apply`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pending_actions: Vec<String>,
}

/// What the agent has applied on this node.
pub fn status(root: &Root) -> Result<Status, AgentError> {
    let Some(st) = state::load(root)? else {
        return Ok(Status {
            applied: false,
            last_apply: None,
            files: Vec::new(),
            hosts_entries: Vec::new(),
            pending_actions: Vec::new(),
        });
    };
    let mut files = Vec::new();
    for (path, rec) in &st.files {
        let current = root.read(path)?;
        let current_sha = current.as_deref().map(sha256_hex);
        let state = match (&current_sha, &rec.written_sha256) {
            (None, None) => "removed",
            (Some(c), Some(w)) if c == w => "applied",
            (c, _) if rec.wrote(c.as_deref()) => {
                "not yet written (an apply was interrupted; the next one writes it)"
            }
            (None, Some(_)) => "missing",
            _ => "changed since apply",
        };
        files.push(FileStatus {
            path: path.clone(),
            what: rec.kind.label().into(),
            state: state.into(),
            existed_before: rec.existed_before,
            backup: rec.backup.clone(),
        });
    }
    for (path, rec) in &st.newer_files {
        let kind = state::FileKind::unknown_type(rec).unwrap_or("?");
        files.push(FileStatus {
            path: path.clone(),
            what: format!("{kind} (unknown kind)"),
            state: "managed by a newer agent".into(),
            existed_before: rec
                .get("existedBefore")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(true),
            backup: rec
                .get("backup")
                .and_then(serde_json::Value::as_str)
                .map(str::to_string),
        });
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let hosts_entries = match root.read(HOSTS)? {
        Some(b) => hosts::block_entries(&b)
            .unwrap_or_default()
            .into_iter()
            .map(|(a, n)| format!("{a} {n}"))
            .collect(),
        None => Vec::new(),
    };
    Ok(Status {
        applied: true,
        last_apply: st.last_apply,
        files,
        hosts_entries,
        pending_actions: st.pending_actions.iter().map(pending_line).collect(),
    })
}

/// An owed action and what the next apply does with it (see
/// `engine::apply`).
fn pending_line(p: &PendingAction) -> String {
    let next = match Step::from_pending(p) {
        None => "recorded by a newer agent: left for it",
        Some(_) if p.started => {
            "begun by an earlier agent that did not see it end: not repeated, the next apply drops it"
        }
        Some(s) if s.service == Service::Docker && s.action == Action::Restart => {
            "failed, retried on the next apply (a reload under --docker-action reload, dropped under none)"
        }
        Some(s) if s.service == Service::Docker => {
            "failed, retried on the next apply (dropped under --docker-action none)"
        }
        Some(_) => "failed, retried on the next apply",
    };
    format!("{} {} ({}): {next}", p.service, p.action, p.reason)
}

/// The human table of `status`.
pub fn status_table(s: &Status) -> String {
    let mut out = String::new();
    if !s.applied {
        out.push_str("not applied: the agent has not changed anything here\n");
        return out;
    }
    if let Some(l) = &s.last_apply {
        let at = humantime::format_rfc3339_seconds(
            SystemTime::UNIX_EPOCH + Duration::from_secs(l.at_unix),
        );
        out.push_str(&format!(
            "last apply: {at}  proxy: {}  runtimes: {}  config sha256: {}\n",
            l.proxy,
            l.runtimes.join(","),
            l.config_sha256.get(..12).unwrap_or(&l.config_sha256)
        ));
        for a in &l.actions {
            out.push_str(&format!("  action: {a}\n"));
        }
    }
    for p in &s.pending_actions {
        out.push_str(&format!("  pending: {p}\n"));
    }
    let w = s
        .files
        .iter()
        .map(|f| f.path.len())
        .max()
        .unwrap_or(4)
        .max(4);
    out.push_str(&format!(
        "{:<w$}  {:<22}  {:<19}  BACKUP\n",
        "FILE", "WHAT", "STATE"
    ));
    for f in &s.files {
        out.push_str(&format!(
            "{:<w$}  {:<22}  {:<19}  {}\n",
            f.path,
            f.what,
            f.state,
            f.backup
                .as_deref()
                .unwrap_or(if f.existed_before { "-" } else { "(created)" })
        ));
    }
    if !s.hosts_entries.is_empty() {
        out.push_str(&format!(
            "/etc/hosts block: {}\n",
            s.hosts_entries.join(", ")
        ));
    }
    out
}

//! The plan: every file change an apply or revert makes, staged and
//! checked before anything is written, then committed in an order that a
//! crash at any point leaves revertible (backups, intent, files).

use std::collections::BTreeSet;
use std::io::Write;

use crate::error::AgentError;
use crate::fsio::{FILE_MODE, Root, parent};
use crate::patch::{containerd, daemon_json, hosts, is_generated};
use crate::state::{self, FileKind, FileRecord, State, sha256_hex};

/// One planned file change.
#[derive(Debug, Clone)]
pub struct Change {
    /// Host path.
    pub path: String,
    pub before: Option<Vec<u8>>,
    pub after: Option<Vec<u8>>,
    /// New record; `None` drops the file from the state.
    pub record: Option<FileRecord>,
    pub mode: u32,
    pub notes: Vec<String>,
    /// `after` is the first-edit backup put back.
    pub restored: bool,
}

impl Change {
    pub fn changed(&self) -> bool {
        self.before != self.after
    }

    pub fn verb(&self) -> &'static str {
        match (&self.before, &self.after) {
            _ if !self.changed() => "unchanged",
            _ if self.restored => "restored",
            (None, Some(_)) => "created",
            (Some(_), None) => "removed",
            _ => "updated",
        }
    }
}

/// The changes of one apply, staged by each runtime before anything is
/// written.
pub struct Planner<'a> {
    root: &'a Root,
    state: &'a State,
    changes: Vec<Change>,
    /// Paths some runtime wants; the state's other files are stale.
    desired: BTreeSet<String>,
}

impl<'a> Planner<'a> {
    pub fn new(root: &'a Root, state: &'a State) -> Self {
        Self {
            root,
            state,
            changes: Vec::new(),
            desired: BTreeSet::new(),
        }
    }

    /// The host root the plan reads from.
    pub fn root(&self) -> &Root {
        self.root
    }

    /// Current contents of a host path, `None` when it does not exist.
    pub fn read(&self, path: &str) -> Result<Option<Vec<u8>>, AgentError> {
        Ok(self.root.read(path)?)
    }

    /// Stages the new content of a desired file.
    pub fn stage(
        &mut self,
        path: &str,
        before: Option<Vec<u8>>,
        after: Option<Vec<u8>>,
        kind: FileKind,
        notes: Vec<String>,
    ) {
        self.desired.insert(path.to_string());
        if self.left_alone(path) {
            // A newer agent's: its record and backup stay as they are.
            return;
        }
        let mut notes = notes;
        let prev = self.state.files.get(path);
        if prev.is_none() && before == after {
            // Not ours and nothing to do: keep out of the record.
            return;
        }
        let before_sha = before.as_deref().map(sha256_hex);
        if after.is_none() && self.taken_over(path, before.as_deref()) {
            // The agent no longer wants its file, and what is there is
            // the admin's: left in place and given up.
            self.changes.push(Change {
                path: path.to_string(),
                before: before.clone(),
                after: before,
                record: None,
                mode: FILE_MODE,
                notes: vec![
                    "replaced by someone else since the agent wrote it: left in place as the admin's"
                        .into(),
                ],
                restored: false,
            });
            return;
        }
        let mut record = if before.is_none() && prev.is_some_and(|r| !r.wrote(None)) {
            // Someone deleted a file the agent had written. Their deletion
            // is the new original, as their own file in its place would
            // be: recorded afresh as a file that did not exist, its old
            // backup dropped (commit removes it), or revert would bring
            // back the file they deleted.
            notes.push(
                "deleted by someone else since the agent wrote it: revert removes it again".into(),
            );
            FileRecord::new(kind, false, None, after.as_deref().map(sha256_hex))
        } else if self.taken_over(path, before.as_deref()) {
            // Recorded afresh, as a file the admin had before the agent
            // came: commit backs up what they wrote (over an older
            // backup, which their file supersedes), revert restores it.
            notes.push(
                "replaced by someone else since the agent wrote it: taken as the admin's, backed up, revert restores it"
                    .into(),
            );
            FileRecord::new(kind, true, None, after.as_deref().map(sha256_hex))
        } else {
            let mut r = FileRecord::new(
                kind,
                prev.map_or(before.is_some(), |r| r.existed_before),
                prev.and_then(|r| r.backup.clone()),
                after.as_deref().map(sha256_hex),
            );
            r.diverged = prev.is_some_and(|r| r.diverged || !r.wrote(before_sha.as_deref()));
            r
        };
        if let Some(p) = prev {
            // A newer agent's fields stay for when it runs again.
            record.extra = p.extra.clone();
            if p.kind.type_name() == record.kind.type_name() {
                record.kind_extra = p.kind_extra.clone();
            }
        }
        self.changes.push(Change {
            path: path.to_string(),
            before,
            after,
            record: Some(record),
            mode: FILE_MODE,
            notes,
            restored: false,
        });
    }

    /// Stages the proxy CA at `path` (runtimes' certs.d trust files).
    pub fn stage_ca(&mut self, path: &str, ca: &[u8]) -> Result<(), AgentError> {
        let before = self.read(path)?;
        self.stage(
            path,
            before,
            Some(ca.to_vec()),
            FileKind::CaCert,
            Vec::new(),
        );
        Ok(())
    }

    /// A file the agent wrote whole (a generated file, a CA copy) that
    /// someone replaced with their own: no agent header any more, or not
    /// the CA the agent wrote. An admin would expect such a file to be
    /// theirs from then on, not overwritten without a trace.
    pub fn taken_over(&self, path: &str, current: Option<&[u8]>) -> bool {
        let (Some(rec), Some(cur)) = (self.state.files.get(path), current) else {
            return false;
        };
        match rec.kind {
            FileKind::Generated => !is_generated(cur),
            FileKind::CaCert => !rec.wrote(Some(&sha256_hex(cur))),
            _ => false,
        }
    }

    /// What the agent recorded for `path` at the last apply.
    pub fn prev_kind(&self, path: &str) -> Option<&FileKind> {
        self.state.files.get(path).map(|r| &r.kind)
    }

    /// A newer agent recorded `path` with a kind this one does not know:
    /// nothing is staged for it.
    pub fn left_alone(&self, path: &str) -> bool {
        self.state.newer_files.contains_key(path)
    }

    /// The agent has a record of `path` (it wrote it before).
    pub fn is_recorded(&self, path: &str) -> bool {
        self.state.files.contains_key(path)
    }

    /// Only what was staged: the state's other files stay as they are (a
    /// partial apply, such as closing the health gate alone).
    pub fn staged(self) -> Vec<Change> {
        self.changes
    }

    /// Undoes the files of an earlier apply that no runtime wants now, and
    /// returns every change.
    pub fn finish(mut self) -> Result<Vec<Change>, AgentError> {
        let state = self.state;
        let stale: Vec<(&String, &FileRecord)> = state
            .files
            .iter()
            .filter(|(p, _)| !self.desired.contains(*p))
            .collect();
        for (path, rec) in stale {
            let mut c = revert_file(self.root, path, rec)?;
            c.record = None;
            self.changes.push(c);
        }
        Ok(self.changes)
    }
}

/// What undoing the agent's part of one file gives: the first-edit backup
/// when the file is as the agent left it (or undoing its part lands on the
/// backup's content anyway), else the file minus the agent's part.
pub fn revert_file(root: &Root, path: &str, rec: &FileRecord) -> Result<Change, AgentError> {
    let current = root.read(path)?;
    let original = match (&rec.backup, rec.existed_before) {
        (Some(b), true) => root.read(b)?,
        _ => None,
    };
    let backup_ok = !rec.existed_before || original.is_some();
    let unchanged = rec.wrote(current.as_deref().map(sha256_hex).as_deref()) && !rec.diverged;
    let mut notes = Vec::new();
    let semantic: Option<Vec<u8>> = match (&rec.kind, &current) {
        (_, None) => None,
        (FileKind::HostsBlock, Some(c)) => {
            let b = hosts::revert(c).map_err(AgentError::patch(path))?;
            if b.is_empty() && !rec.existed_before {
                None
            } else {
                Some(b)
            }
        }
        (FileKind::DaemonJson { added }, Some(c)) => {
            daemon_json::revert(Some(c), added, !rec.existed_before)
                .map_err(AgentError::patch(path))?
                .bytes
        }
        (FileKind::ContainerdConfig { record }, Some(c)) => {
            let (b, n) = containerd::revert_config(c, record, !rec.existed_before)
                .map_err(AgentError::patch(path))?;
            notes.extend(n);
            b
        }
        (FileKind::HostsTomlEdit { host }, Some(c)) => {
            Some(crate::patch::hosts_toml::unmerge(c, host).map_err(AgentError::patch(path))?)
        }
        (FileKind::Generated, Some(c)) if is_generated(c) => original.clone(),
        (FileKind::CaCert, Some(c)) if rec.wrote(Some(&sha256_hex(c))) => original.clone(),
        (FileKind::Generated | FileKind::CaCert, Some(c)) => {
            notes.push("changed since the agent wrote it: left in place".into());
            Some(c.clone())
        }
    };
    let equivalent = match (&rec.kind, &semantic, &original) {
        (FileKind::DaemonJson { .. }, Some(s), Some(o)) => {
            match (daemon_json::parse(s), daemon_json::parse(o)) {
                (Ok(a), Ok(b)) => a.iter().eq(b.iter()),
                _ => false,
            }
        }
        (_, s, o) => s == o,
    };
    let (after, restored) = if backup_ok && (unchanged || equivalent) {
        (original.clone(), original.is_some())
    } else {
        if !backup_ok {
            notes.push("its first-edit backup is gone: removed only the agent's part".into());
        } else {
            notes.push("changed since apply: removed only the agent's part".into());
        }
        (semantic, false)
    };
    Ok(Change {
        path: path.to_string(),
        before: current,
        after,
        record: None,
        mode: FILE_MODE,
        notes,
        restored,
    })
}

/// Backs up first edits, records the intent, writes, prunes directories,
/// records the result.
pub fn commit(
    root: &Root,
    st: &mut State,
    mut changes: Vec<Change>,
    out: &mut dyn Write,
) -> Result<(), AgentError> {
    // 0. Every file is still as it was read for the plan: another writer
    //    (an admin's editor, a config manager) that changed one since would
    //    otherwise lose its change to this write. The window left is the
    //    few steps below, not the whole plan.
    for c in changes.iter().filter(|c| c.changed()) {
        if root.read(&c.path)? != c.before {
            return Err(AgentError::ChangedMeanwhile {
                path: c.path.clone(),
            });
        }
    }
    // 1. First-edit backups.
    for c in changes.iter_mut().filter(|c| c.changed()) {
        if let Some(rec) = &mut c.record
            && rec.existed_before
            && rec.backup.is_none()
            && let Some(orig) = &c.before
        {
            rec.backup = Some(state::write_backup(root, st, &c.path, orig)?);
        }
    }
    // 2. Directories to create, recorded before they exist.
    for c in changes.iter().filter(|c| c.changed() && c.after.is_some()) {
        st.created_dirs.extend(root.missing_dirs(&parent(&c.path)));
    }
    // Backups a fresh record no longer holds (a file someone deleted):
    // removed once the files are written, as for files given up.
    let dropped: Vec<String> = changes
        .iter()
        .filter(|c| {
            c.record
                .as_ref()
                .is_some_and(|r| !r.existed_before && r.backup.is_none())
                && st.files.get(&c.path).is_some_and(|p| p.backup.is_some())
        })
        .map(|c| c.path.clone())
        .collect();
    // 3. The intent. Until a file is written, what it replaces stays the
    //    agent's own when it was: a write that fails (a full disk, an
    //    immutable file) or never happens (the agent killed) leaves that
    //    content on disk while the state already names the new one.
    for c in &mut changes {
        if let Some(r) = &mut c.record
            && c.before != c.after
        {
            let before_sha = c.before.as_deref().map(sha256_hex);
            let own = st
                .files
                .get(&c.path)
                .is_some_and(|p| p.wrote(before_sha.as_deref()));
            r.pending_write = own.then(|| state::PendingWrite {
                replaces_sha256: before_sha,
                writes_sha256: r.written_sha256.clone(),
            });
        }
    }
    for c in &changes {
        match &c.record {
            Some(r) => {
                st.files.insert(c.path.clone(), r.clone());
            }
            None => {
                st.files.remove(&c.path);
            }
        }
    }
    state::save(root, st)?;
    // 4. The files, then the state says they are written.
    write_files(root, &changes, out)?;
    let mut confirmed = false;
    for c in &changes {
        if let Some(r) = st.files.get_mut(&c.path)
            && r.pending_write.take().is_some()
        {
            confirmed = true;
        }
    }
    if confirmed {
        state::save(root, st)?;
    }
    // Backups of files no longer managed (only now that the file is back:
    // a crash before this point still finds the original).
    for c in changes.iter().filter(|c| c.record.is_none()) {
        state::remove_backup(root, &c.path)?;
    }
    for path in &dropped {
        state::remove_backup(root, path)?;
    }
    // 5. Directories no managed file needs any more.
    prune_dirs(root, st)?;
    Ok(())
}

/// Writes (or removes) each changed file and prints a line for each.
pub fn write_files(root: &Root, changes: &[Change], out: &mut dyn Write) -> Result<(), AgentError> {
    for c in changes.iter().filter(|c| c.changed()) {
        match &c.after {
            Some(bytes) => {
                root.create_dirs(&parent(&c.path))?;
                root.write_atomic(&c.path, bytes, c.mode)?;
            }
            None => root.remove_file(&c.path)?,
        }
        writeln_out(out, &format!("{:<9} {}", c.verb(), c.path));
        for n in &c.notes {
            writeln_out(out, &format!("  note: {n}"));
        }
    }
    Ok(())
}

/// [`write_files`] for revert, each file read again just before it is
/// written: revert reads every file first and may then wait for dockerd
/// (`--reload-settle`), and a file someone wrote since is left as they
/// wrote it. Returns the paths left so.
pub fn write_files_checked(
    root: &Root,
    changes: &[Change],
    out: &mut dyn Write,
) -> Result<Vec<String>, AgentError> {
    let mut left = Vec::new();
    for c in changes.iter().filter(|c| c.changed()) {
        if root.read(&c.path)? != c.before {
            writeln_out(
                out,
                &format!(
                    "{:<9} {} (someone wrote it after revert read it: left as they wrote it)",
                    "kept", c.path
                ),
            );
            left.push(c.path.clone());
            continue;
        }
        write_files(root, std::slice::from_ref(c), out)?;
    }
    Ok(left)
}

/// Removes the directories the agent created that no managed file needs.
pub fn prune_dirs(root: &Root, st: &mut State) -> Result<(), AgentError> {
    let mut dirs: Vec<String> = st.created_dirs.iter().cloned().collect();
    dirs.sort_by_key(|d| std::cmp::Reverse(d.len()));
    for d in dirs {
        let prefix = format!("{d}/");
        let needed = st
            .files
            .iter()
            .any(|(p, r)| r.written_sha256.is_some() && p.starts_with(&prefix));
        if needed {
            continue;
        }
        if root.remove_dir_if_empty(&d)? || !root.is_dir(&d) {
            st.created_dirs.remove(&d);
        }
    }
    Ok(())
}

/// Writes a report line.
pub fn writeln_out(out: &mut dyn Write, line: &str) {
    // stdout going away (a closed pipe) must not abort a half-done write.
    let _ = writeln!(out, "{line}");
}

/// Writes the unified diff of a change, then its notes.
pub fn write_diff(out: &mut dyn Write, c: &Change) {
    let old = String::from_utf8_lossy(c.before.as_deref().unwrap_or_default()).into_owned();
    let new = String::from_utf8_lossy(c.after.as_deref().unwrap_or_default()).into_owned();
    let a = if c.before.is_some() {
        format!("a{}", c.path)
    } else {
        "/dev/null".into()
    };
    let b = if c.after.is_some() {
        format!("b{}", c.path)
    } else {
        "/dev/null".into()
    };
    let diff = similar::TextDiff::from_lines(&old, &new);
    let _ = write!(
        out,
        "{}",
        diff.unified_diff().context_radius(3).header(&a, &b)
    );
    for n in &c.notes {
        let _ = writeln!(out, "# note: {n}");
    }
}

//! The agent's record of what it changed on this node, so `revert` removes
//! exactly that: `/var/lib/pullthrough-agent/state.json` under the root,
//! with first-edit backups beside it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::fsio::{FsError, Root};
use crate::patch::containerd::ConfigRecord;
use crate::patch::daemon_json::Added;

/// The agent's own directory on the node.
pub const STATE_DIR: &str = "/var/lib/pullthrough-agent";
/// The state record.
pub const STATE_FILE: &str = "/var/lib/pullthrough-agent/state.json";
/// First-edit backups, mirroring host paths (`backups/etc/hosts`).
pub const BACKUP_DIR: &str = "/var/lib/pullthrough-agent/backups";

/// The agent's state record cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(
        "{}: unreadable agent state ({source}); inspect it (backups are under {}) before removing it",
        STATE_FILE,
        BACKUP_DIR
    )]
    Unreadable {
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{}: state version {found} is not {expected}; use the agent version that wrote it",
        STATE_FILE
    )]
    Version { found: u32, expected: u32 },
}

const STATE_VERSION: u32 = 1;

/// Everything the agent changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct State {
    pub version: u32,
    /// Per host path, what the agent did to it.
    #[serde(default)]
    pub files: BTreeMap<String, FileRecord>,
    /// Directories the agent created for its files (removed on revert
    /// when empty).
    #[serde(default)]
    pub created_dirs: BTreeSet<String>,
    /// Directories created to hold the state itself.
    #[serde(default)]
    pub state_dirs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_apply: Option<LastApply>,
    /// Daemon actions owed for files already written: recorded before the
    /// files are written and cleared only once the action succeeded, so a
    /// failed reload or restart is retried by the next apply even when no
    /// file changes then.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_actions: Vec<PendingAction>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            version: STATE_VERSION,
            files: BTreeMap::new(),
            created_dirs: BTreeSet::new(),
            state_dirs: Vec::new(),
            last_apply: None,
            pending_actions: Vec::new(),
        }
    }
}

/// What the agent did to one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileRecord {
    pub kind: FileKind,
    /// The file existed before the agent first wrote it.
    pub existed_before: bool,
    /// Host path of the first-edit backup (files that existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    /// sha256 of what the agent last wrote (`None`: it removed the file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written_sha256: Option<String>,
    /// Someone else changed the file after an agent write: the backup no
    /// longer tells the whole story, so revert removes only the agent's
    /// part instead of restoring it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub diverged: bool,
}

/// Which patcher owns the file, with what it needs to undo its part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum FileKind {
    /// `/etc/hosts` with the marker block.
    HostsBlock,
    /// daemon.json values added.
    DaemonJson {
        #[serde(default)]
        added: Added,
    },
    /// containerd config.toml edits.
    ContainerdConfig { record: ConfigRecord },
    /// A whole file with the generated header (hosts.toml, the drop-in).
    Generated,
    /// An admin's own hosts.toml with the proxy host (this URL) added.
    HostsTomlEdit { host: String },
    /// A CA certificate copy.
    CaCert,
}

impl FileKind {
    pub fn label(&self) -> &'static str {
        match self {
            FileKind::HostsBlock => "hosts block",
            FileKind::DaemonJson { .. } => "daemon.json keys",
            FileKind::ContainerdConfig { .. } => "containerd config_path",
            FileKind::Generated => "generated file",
            FileKind::HostsTomlEdit { .. } => "hosts.toml proxy host",
            FileKind::CaCert => "CA certificate",
        }
    }
}

/// A daemon action not yet carried out (see [`State::pending_actions`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PendingAction {
    /// The daemon's unit name (`docker`, `containerd`, `crio`).
    pub service: String,
    /// `reload` or `restart`.
    pub action: String,
    /// Why it is needed.
    pub reason: String,
    /// A restart begun by an agent that did not live to see how it
    /// ended: restarting dockerd can stop the agent's own pod (cri-dockerd
    /// nodes), so such a restart is not begun again (see `engine::apply`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub started: bool,
}

/// Summary of the last apply, for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LastApply {
    /// sha256 of the config file applied.
    pub config_sha256: String,
    /// The proxy base URL nodes use.
    pub proxy: String,
    pub runtimes: Vec<String>,
    /// Seconds since the Unix epoch.
    pub at_unix: u64,
    /// Runtime actions taken.
    #[serde(default)]
    pub actions: Vec<String>,
}

/// Hex sha256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Host path of the backup of `path`.
pub fn backup_path(path: &str) -> String {
    format!("{BACKUP_DIR}{path}")
}

/// Loads the state; `None` when the agent never applied here.
pub fn load(root: &Root) -> Result<Option<State>, StateError> {
    let Some(bytes) = root.read(STATE_FILE)? else {
        return Ok(None);
    };
    let state: State =
        serde_json::from_slice(&bytes).map_err(|source| StateError::Unreadable { source })?;
    if state.version != STATE_VERSION {
        return Err(StateError::Version {
            found: state.version,
            expected: STATE_VERSION,
        });
    }
    Ok(Some(state))
}

/// Writes the state atomically, creating its directory (and recording the
/// directories it had to create).
pub fn save(root: &Root, state: &mut State) -> Result<(), FsError> {
    let made = root.create_dirs(STATE_DIR)?;
    state.state_dirs.extend(made);
    let mut bytes = serde_json::to_vec_pretty(state).map_err(|e| FsError {
        path: STATE_FILE.into(),
        what: "serializing",
        source: std::io::Error::other(e),
    })?;
    bytes.push(b'\n');
    root.write_atomic(STATE_FILE, &bytes, 0o600)
}

/// Writes the first-edit backup of `path` from `original` (the file as
/// this apply found it); returns its host path. Directories made for the
/// state are recorded in `state`.
///
/// Called only for a file the state holds no backup for, so a backup
/// already on disk is an orphan (a crash before [`remove_backup`], or a
/// state file someone deleted): it is overwritten, never taken for the
/// original, or revert would put that stale content over the admin's
/// later edits.
///
/// The backup may be read by no more users than the file: it keeps the
/// file's read bits (a containerd config.toml with registry passwords is
/// 0600), is written by no one but its owner, and is 0600 when the
/// file's mode cannot be told.
pub fn write_backup(
    root: &Root,
    state: &mut State,
    path: &str,
    original: &[u8],
) -> Result<String, FsError> {
    let made = root.create_dirs(STATE_DIR)?;
    state.state_dirs.extend(made);
    let backup = backup_path(path);
    let mode = root.mode(path).ok().flatten().map_or(0o600, |m| m & 0o644);
    root.create_dirs(&crate::fsio::parent(&backup))?;
    // A new file, so it takes `mode` (an existing one would keep its own).
    root.remove_file(&backup)?;
    root.write_atomic(&backup, original, mode)?;
    Ok(backup)
}

/// Removes the backup of `path`, once the file is no longer the agent's
/// and has been given back: a backup left behind would be taken for the
/// original the next time the agent manages the file, and revert would
/// then restore that old content over the admin's later edits.
pub fn remove_backup(root: &Root, path: &str) -> Result<(), FsError> {
    root.remove_file(&backup_path(path))
}

/// Removes the state file, the backups and the directories created for
/// them.
pub fn remove_all(root: &Root, state: &State) -> Result<(), FsError> {
    let backups = root.resolve(BACKUP_DIR)?;
    match std::fs::remove_dir_all(&backups) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(FsError {
                path: BACKUP_DIR.into(),
                what: "removing backups",
                source: e,
            });
        }
    }
    root.remove_file(STATE_FILE)?;
    for dir in state.state_dirs.iter().rev() {
        root.remove_dir_if_empty(dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_cleans_up_after_itself() {
        let t = tempfile::tempdir().unwrap();
        let root = Root::new(t.path());
        assert_eq!(load(&root).unwrap(), None);
        let mut s = State::default();
        let backup = write_backup(&root, &mut s, "/etc/hosts", b"orig").unwrap();
        s.files.insert(
            "/etc/hosts".into(),
            FileRecord {
                kind: FileKind::HostsBlock,
                existed_before: true,
                backup: Some(backup),
                written_sha256: Some(sha256_hex(b"x")),
                diverged: false,
            },
        );
        save(&root, &mut s).unwrap();
        assert_eq!(
            s.state_dirs,
            ["/var", "/var/lib", "/var/lib/pullthrough-agent"]
        );
        assert_eq!(load(&root).unwrap(), Some(s.clone()));
        assert_eq!(
            root.read("/var/lib/pullthrough-agent/backups/etc/hosts")
                .unwrap(),
            Some(b"orig".to_vec())
        );
        remove_all(&root, &s).unwrap();
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_corrupt_state_is_an_error_not_a_fresh_start() {
        let t = tempfile::tempdir().unwrap();
        let root = Root::new(t.path());
        root.create_dirs(STATE_DIR).unwrap();
        root.write_atomic(STATE_FILE, b"{", 0o600).unwrap();
        assert!(load(&root).unwrap_err().to_string().contains("unreadable"));
    }
}

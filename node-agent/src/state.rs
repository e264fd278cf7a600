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
        "{}: written by a newer agent for readers of version {needs} or later, and this agent reads version {reads}: nothing was touched; apply or revert with an agent version at least as new as the one that wrote it",
        STATE_FILE
    )]
    TooNew { needs: u32, reads: u32 },
}

/// The state format this agent writes (`version`). A writer bumps it for
/// every format change; readers do not refuse a higher one.
const STATE_VERSION: u32 = 1;
/// The state format this agent reads: a file whose `minReaderVersion` is
/// above it is refused. A writer raises `minReaderVersion` only for a
/// change an older reader would get wrong (not for a field or a file kind
/// it can ignore: those are kept as they are and left alone).
const READER_VERSION: u32 = 1;
/// The `minReaderVersion` a file written by this agent asks for.
const MIN_READER_VERSION: u32 = 1;

fn is_default_min_reader(v: &u32) -> bool {
    *v == MIN_READER_VERSION
}

fn default_min_reader() -> u32 {
    MIN_READER_VERSION
}

fn default_version() -> u32 {
    STATE_VERSION
}

/// Fields of a state object this agent does not know (written by a newer
/// one): kept as they are when it saves the file again.
pub type Extra = serde_json::Map<String, serde_json::Value>;

/// Everything the agent changed.
///
/// Read leniently, so an agent rolled back under a state file a newer one
/// wrote still applies and reverts: unknown fields (at every level the
/// agent writes itself) are kept, and a file record of a kind this agent
/// does not know is kept in [`State::newer_files`] and left alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawState", into = "RawState")]
pub struct State {
    /// The format of the file (see [`STATE_VERSION`]).
    pub version: u32,
    /// The oldest reader that may use the file (see [`READER_VERSION`]).
    pub min_reader_version: u32,
    /// Per host path, what the agent did to it.
    pub files: BTreeMap<String, FileRecord>,
    /// Files a newer agent recorded with a kind this one does not know,
    /// as recorded: neither apply nor revert touches them or their backup.
    pub newer_files: BTreeMap<String, serde_json::Value>,
    /// Directories the agent created for its files (removed on revert
    /// when empty).
    pub created_dirs: BTreeSet<String>,
    /// Directories created to hold the state itself.
    pub state_dirs: Vec<String>,
    pub last_apply: Option<LastApply>,
    /// Daemon actions owed for files already written: recorded before the
    /// files are written and cleared only once the action succeeded, so a
    /// failed reload or restart is retried by the next apply even when no
    /// file changes then.
    pub pending_actions: Vec<PendingAction>,
    /// Top-level fields of a newer agent.
    pub extra: Extra,
}

/// [`State`] as the file holds it: file records parsed one by one.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawState {
    #[serde(default = "default_version")]
    version: u32,
    #[serde(
        default = "default_min_reader",
        skip_serializing_if = "is_default_min_reader"
    )]
    min_reader_version: u32,
    #[serde(default)]
    files: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    created_dirs: BTreeSet<String>,
    #[serde(default)]
    state_dirs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_apply: Option<LastApply>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pending_actions: Vec<PendingAction>,
    #[serde(flatten)]
    extra: Extra,
}

impl TryFrom<RawState> for State {
    type Error = String;

    fn try_from(raw: RawState) -> Result<Self, String> {
        let mut files = BTreeMap::new();
        let mut newer_files = BTreeMap::new();
        for (path, value) in raw.files {
            if FileKind::unknown_type(&value).is_some() {
                newer_files.insert(path, value);
                continue;
            }
            let rec = serde_json::from_value(value).map_err(|e| format!("files.{path}: {e}"))?;
            files.insert(path, rec);
        }
        Ok(State {
            version: raw.version,
            min_reader_version: raw.min_reader_version,
            files,
            newer_files,
            created_dirs: raw.created_dirs,
            state_dirs: raw.state_dirs,
            last_apply: raw.last_apply,
            pending_actions: raw.pending_actions,
            extra: raw.extra,
        })
    }
}

impl From<State> for RawState {
    fn from(s: State) -> Self {
        let mut files = s.newer_files;
        for (path, rec) in s.files {
            // A FileRecord always serializes (string keys, no floats).
            let value = serde_json::to_value(rec).unwrap_or_default();
            files.insert(path, value);
        }
        RawState {
            // A file a newer agent wrote keeps saying so.
            version: s.version.max(STATE_VERSION),
            min_reader_version: s.min_reader_version.max(MIN_READER_VERSION),
            files,
            created_dirs: s.created_dirs,
            state_dirs: s.state_dirs,
            last_apply: s.last_apply,
            pending_actions: s.pending_actions,
            extra: s.extra,
        }
    }
}

impl Default for State {
    fn default() -> Self {
        Self {
            version: STATE_VERSION,
            min_reader_version: MIN_READER_VERSION,
            files: BTreeMap::new(),
            newer_files: BTreeMap::new(),
            created_dirs: BTreeSet::new(),
            state_dirs: Vec::new(),
            last_apply: None,
            pending_actions: Vec::new(),
            extra: Extra::new(),
        }
    }
}

/// What the agent did to one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawFileRecord", into = "RawFileRecord")]
pub struct FileRecord {
    pub kind: FileKind,
    /// Fields of the `kind` object this agent does not know.
    pub kind_extra: Extra,
    /// The file existed before the agent first wrote it.
    pub existed_before: bool,
    /// Host path of the first-edit backup (files that existed).
    pub backup: Option<String>,
    /// sha256 of what the agent last wrote (`None`: it removed the file).
    pub written_sha256: Option<String>,
    /// Someone else changed the file after an agent write: the backup no
    /// longer tells the whole story, so revert removes only the agent's
    /// part instead of restoring it.
    pub diverged: bool,
    /// A write recorded (the state is saved before the files are written)
    /// but not yet known done: until it is, the content it replaces is
    /// the agent's own too (see [`FileRecord::wrote`]).
    pub pending_write: Option<PendingWrite>,
    /// Fields of the record this agent does not know.
    pub extra: Extra,
}

/// See [`FileRecord::pending_write`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingWrite {
    /// sha256 of the agent's own content the write replaces (`None`: the
    /// file did not exist).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces_sha256: Option<String>,
    /// sha256 of what the write puts there: the record's
    /// `written_sha256` when it was recorded. A record whose
    /// `written_sha256` no longer matches (carried forward as an unknown
    /// field by an older agent that wrote something else since) has its
    /// pending write ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writes_sha256: Option<String>,
}

impl FileRecord {
    /// A new record, with no fields of a newer agent.
    pub fn new(
        kind: FileKind,
        existed_before: bool,
        backup: Option<String>,
        written_sha256: Option<String>,
    ) -> Self {
        Self {
            kind,
            kind_extra: Extra::new(),
            existed_before,
            backup,
            written_sha256,
            diverged: false,
            pending_write: None,
            extra: Extra::new(),
        }
    }

    /// Whether content with this sha256 (`None`: no file) is the agent's
    /// own: what it last wrote, or, while that write is not known done
    /// (a full disk, an immutable file, the agent killed between saving
    /// the state and writing), what that write replaces. Without the
    /// latter, an apply interrupted there would have the next one take
    /// the agent's old content (an old proxy CA) for the admin's, back it
    /// up, and have revert put it back.
    pub fn wrote(&self, sha: Option<&str>) -> bool {
        if self.written_sha256.as_deref() == sha {
            return true;
        }
        self.pending_write.as_ref().is_some_and(|p| {
            p.writes_sha256 == self.written_sha256 && p.replaces_sha256.as_deref() == sha
        })
    }
}

/// [`FileRecord`] as the file holds it.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawFileRecord {
    kind: serde_json::Value,
    existed_before: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    backup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    written_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    diverged: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pending_write: Option<PendingWrite>,
    #[serde(flatten)]
    extra: Extra,
}

impl TryFrom<RawFileRecord> for FileRecord {
    type Error = String;

    fn try_from(raw: RawFileRecord) -> Result<Self, String> {
        let kind: FileKind = serde_json::from_value(raw.kind.clone()).map_err(|e| e.to_string())?;
        // What the known kind does not write back is a newer agent's.
        let known = serde_json::to_value(&kind).map_err(|e| e.to_string())?;
        let kind_extra = match raw.kind {
            serde_json::Value::Object(m) => m
                .into_iter()
                .filter(|(k, _)| known.get(k).is_none())
                .collect(),
            _ => Extra::new(),
        };
        Ok(FileRecord {
            kind,
            kind_extra,
            existed_before: raw.existed_before,
            backup: raw.backup,
            written_sha256: raw.written_sha256,
            diverged: raw.diverged,
            pending_write: raw.pending_write,
            extra: raw.extra,
        })
    }
}

impl From<FileRecord> for RawFileRecord {
    fn from(r: FileRecord) -> Self {
        let mut kind = serde_json::to_value(&r.kind).unwrap_or_default();
        if let serde_json::Value::Object(m) = &mut kind {
            for (k, v) in r.kind_extra {
                m.entry(k).or_insert(v);
            }
        }
        RawFileRecord {
            kind,
            existed_before: r.existed_before,
            backup: r.backup,
            written_sha256: r.written_sha256,
            diverged: r.diverged,
            pending_write: r.pending_write,
            extra: r.extra,
        }
    }
}

/// Which patcher owns the file, with what it needs to undo its part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
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

/// The `type` of every [`FileKind`] (see [`FileKind::type_name`]).
const KNOWN_KINDS: [&str; 6] = [
    "hostsBlock",
    "daemonJson",
    "containerdConfig",
    "generated",
    "hostsTomlEdit",
    "caCert",
];

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

    /// The kind's `type` in the state file.
    pub fn type_name(&self) -> &'static str {
        match self {
            FileKind::HostsBlock => KNOWN_KINDS[0],
            FileKind::DaemonJson { .. } => KNOWN_KINDS[1],
            FileKind::ContainerdConfig { .. } => KNOWN_KINDS[2],
            FileKind::Generated => KNOWN_KINDS[3],
            FileKind::HostsTomlEdit { .. } => KNOWN_KINDS[4],
            FileKind::CaCert => KNOWN_KINDS[5],
        }
    }

    /// The `kind.type` of a file record as the state holds it, when this
    /// agent does not know it (a newer agent's kind).
    pub fn unknown_type(record: &serde_json::Value) -> Option<&str> {
        let t = record.get("kind")?.get("type")?.as_str()?;
        (!KNOWN_KINDS.contains(&t)).then_some(t)
    }
}

/// A daemon action not yet carried out (see [`State::pending_actions`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
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
    /// Fields of a newer agent.
    #[serde(flatten)]
    pub extra: Extra,
}

/// Summary of the last apply, for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
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
    /// Fields of a newer agent.
    #[serde(flatten)]
    pub extra: Extra,
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
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|source| StateError::Unreadable { source })?;
    // Before the rest is parsed: a file for newer readers may not parse.
    let needs = match value.get("minReaderVersion") {
        None => MIN_READER_VERSION,
        Some(v) => v
            .as_u64()
            .map_or(u32::MAX, |v| u32::try_from(v).unwrap_or(u32::MAX)),
    };
    if needs > READER_VERSION {
        return Err(StateError::TooNew {
            needs,
            reads: READER_VERSION,
        });
    }
    let state =
        serde_json::from_value(value).map_err(|source| StateError::Unreadable { source })?;
    tighten_backups(root, &state);
    Ok(Some(state))
}

/// The mode a backup of `path` may have: the file's read bits, written by
/// no one but its owner; 0600 when the file's mode cannot be told.
fn backup_mode(root: &Root, path: &str) -> u32 {
    root.mode(path).ok().flatten().map_or(0o600, |m| m & 0o644)
}

/// Agents before [`write_backup`] kept the original's read bits wrote
/// every backup 0644, so the backup of a 0600 config.toml with registry
/// passwords was readable by everyone: such a backup loses the bits its
/// file does not have. The file keeps its mode across the agent's writes,
/// so its mode now is the original's. Best effort: a backup that cannot
/// be tightened (a read-only root for `status`) does not stop the command.
fn tighten_backups(root: &Root, state: &State) {
    for (path, rec) in &state.files {
        let Some(backup) = &rec.backup else {
            continue;
        };
        match root.restrict_mode(backup, backup_mode(root, path)) {
            Ok(true) => {
                tracing::info!(%path, %backup, "backup made no more readable than its file");
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(%path, error = %e, "cannot make the backup no more readable than its file");
            }
        }
    }
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
    let mode = backup_mode(root, path);
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
            FileRecord::new(
                FileKind::HostsBlock,
                true,
                Some(backup),
                Some(sha256_hex(b"x")),
            ),
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

    /// What a newer agent may write: a field this one does not know at
    /// every level, a file kind it does not know, an owed action it
    /// cannot read.
    pub const NEWER_STATE: &str = r#"{
  "version": 3,
  "newTopLevel": {"a": [1, 2]},
  "files": {
    "/etc/hosts": {
      "kind": {"type": "hostsBlock", "newInKind": "k"},
      "existedBefore": true,
      "backup": "/var/lib/pullthrough-agent/backups/etc/hosts",
      "writtenSha256": "00",
      "newInRecord": 7
    },
    "/etc/newer/thing.conf": {
      "kind": {"type": "somethingNew", "how": {"x": 1}},
      "existedBefore": true,
      "backup": "/var/lib/pullthrough-agent/backups/etc/newer/thing.conf",
      "writtenSha256": "11"
    }
  },
  "createdDirs": [],
  "stateDirs": [],
  "lastApply": {
    "configSha256": "22",
    "proxy": "https://10.0.0.5",
    "runtimes": ["docker"],
    "atUnix": 5,
    "actions": [],
    "newInLastApply": true
  },
  "pendingActions": [
    {"service": "containerd", "action": "restart", "reason": "r", "newInAction": "n"},
    {"service": "docker", "action": "reexec", "reason": "newer"}
  ]
}
"#;

    fn write_state(root: &Root, json: &str) {
        root.create_dirs(STATE_DIR).unwrap();
        root.write_atomic(STATE_FILE, json.as_bytes(), 0o600)
            .unwrap();
    }

    /// A rolled-back agent reads what a newer one wrote, and saving it
    /// again loses nothing the newer one will look for.
    #[test]
    fn a_newer_agents_state_loads_and_saves_with_what_it_does_not_know() {
        let t = tempfile::tempdir().unwrap();
        let root = Root::new(t.path());
        write_state(&root, NEWER_STATE);
        let mut s = load(&root).unwrap().unwrap();
        assert_eq!(s.files.len(), 1);
        assert_eq!(s.files["/etc/hosts"].kind, FileKind::HostsBlock);
        assert_eq!(
            s.newer_files.keys().collect::<Vec<_>>(),
            ["/etc/newer/thing.conf"]
        );
        save(&root, &mut s).unwrap();
        let saved: serde_json::Value =
            serde_json::from_slice(&root.read(STATE_FILE).unwrap().unwrap()).unwrap();
        let mut want: serde_json::Value = serde_json::from_str(NEWER_STATE).unwrap();
        want["stateDirs"] = serde_json::json!(s.state_dirs);
        assert_eq!(saved, want);
    }

    /// A file for newer readers only is refused, naming the file and
    /// both versions, before anything else about it is read.
    #[test]
    fn a_state_for_newer_readers_only_is_refused_clearly() {
        let t = tempfile::tempdir().unwrap();
        let root = Root::new(t.path());
        write_state(
            &root,
            r#"{"version": 9, "minReaderVersion": 2, "files": {"/x": "a new shape"}}"#,
        );
        let e = load(&root).unwrap_err().to_string();
        assert!(
            e.contains(STATE_FILE) && e.contains("version 2 or later") && e.contains("version 1"),
            "{e}"
        );
        // One this agent can read is not refused for its `version`.
        write_state(&root, r#"{"version": 9, "minReaderVersion": 1}"#);
        assert!(load(&root).unwrap().is_some());
    }

    /// Unless a newer agent asked for more, the file stays readable by
    /// agents that predate `minReaderVersion`.
    #[test]
    fn the_default_min_reader_version_is_not_written() {
        let t = tempfile::tempdir().unwrap();
        let root = Root::new(t.path());
        save(&root, &mut State::default()).unwrap();
        let saved = String::from_utf8(root.read(STATE_FILE).unwrap().unwrap()).unwrap();
        assert!(!saved.contains("minReaderVersion"), "{saved}");
        assert!(saved.contains("\"version\": 1"), "{saved}");
    }

    #[test]
    fn every_file_kind_is_known_by_its_type() {
        for k in [
            FileKind::HostsBlock,
            FileKind::DaemonJson {
                added: Added::default(),
            },
            FileKind::ContainerdConfig {
                record: ConfigRecord::default(),
            },
            FileKind::Generated,
            FileKind::HostsTomlEdit { host: "h".into() },
            FileKind::CaCert,
        ] {
            let v = serde_json::to_value(&k).unwrap();
            assert_eq!(v["type"], k.type_name());
            assert_eq!(
                FileKind::unknown_type(&serde_json::json!({ "kind": v })),
                None
            );
        }
    }

    /// A backup an older agent wrote 0644 of a 0600 file (registry
    /// passwords) or a 0640 one is cut down to the file's read bits when
    /// the state is loaded; a backup already as strict is left alone.
    #[test]
    fn backups_readable_beyond_their_file_are_tightened_on_load() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let root = Root::new(t.path());
        let mut s = State::default();
        for (path, mode) in [
            ("/etc/containerd/config.toml", 0o600),
            ("/etc/docker/daemon.json", 0o640),
            ("/etc/hosts", 0o644),
        ] {
            root.create_dirs(&crate::fsio::parent(path)).unwrap();
            root.write_atomic(path, b"orig", mode).unwrap();
            let backup = write_backup(&root, &mut s, path, b"orig").unwrap();
            // As an older agent left it.
            std::fs::set_permissions(
                root.resolve(&backup).unwrap(),
                std::fs::Permissions::from_mode(0o644),
            )
            .unwrap();
            s.files.insert(
                path.into(),
                FileRecord::new(FileKind::CaCert, true, Some(backup), None),
            );
        }
        save(&root, &mut s).unwrap();
        load(&root).unwrap().unwrap();
        for (path, want) in [
            ("/etc/containerd/config.toml", 0o600),
            ("/etc/docker/daemon.json", 0o640),
            ("/etc/hosts", 0o644),
        ] {
            let got = root.mode(&backup_path(path)).unwrap().unwrap();
            assert_eq!(got, want, "{path}: backup mode {got:o}");
        }
    }

    /// The content a pending write replaces is the agent's own only while
    /// the record still names what that write puts there: an older agent
    /// that carried the field forward unknowingly and wrote something
    /// else since does not make old content the agent's.
    #[test]
    fn a_pending_write_counts_only_for_the_write_it_was_recorded_with() {
        let json = r#"{"kind": {"type": "caCert"}, "existedBefore": false,
            "writtenSha256": "bb",
            "pendingWrite": {"replacesSha256": "aa", "writesSha256": "bb"}}"#;
        let rec: FileRecord = serde_json::from_str(json).unwrap();
        assert!(rec.wrote(Some("bb")) && rec.wrote(Some("aa")));
        assert!(!rec.wrote(Some("cc")) && !rec.wrote(None));
        let back = serde_json::to_value(&rec).unwrap();
        assert_eq!(back["pendingWrite"]["replacesSha256"], "aa");
        let mut stale = rec.clone();
        stale.written_sha256 = Some("cc".into());
        assert!(stale.wrote(Some("cc")) && !stale.wrote(Some("aa")));
        // A file the write was to create: no file is the agent's too.
        let creating = FileRecord {
            pending_write: Some(PendingWrite {
                replaces_sha256: None,
                writes_sha256: Some("bb".into()),
            }),
            ..FileRecord::new(FileKind::CaCert, false, None, Some("bb".into()))
        };
        assert!(creating.wrote(None));
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

//! `apply`, `revert` and `status`: plan every file change first (all
//! patchers run and validate before anything is written), then back up,
//! record, write, and finally tell the runtimes.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::config::AgentConfig;
use crate::desired;
use crate::fsio::{FILE_MODE, FsError, Root, parent};
use crate::patch::containerd::{
    self, CONFIG_TOML, ConfigRecord, HostTls, MirrorHost, authority, host_dir_name,
};
use crate::patch::crio::{self, DROP_IN};
use crate::patch::daemon_json::{self, Added};
use crate::patch::docker_certs::{self, CA_FILE_NAME, CONTAINERS_CERTS_D, DOCKER_CERTS_D};
use crate::patch::{PatchError, hosts, is_generated};
use crate::runtime::{
    Action, DockerActionArg, Executor, Outcome, Runtime, Service, decide_docker_action, detect,
};
use crate::state::{self, FileKind, FileRecord, LastApply, State, sha256_hex};

/// `/etc/hosts`.
pub const HOSTS: &str = "/etc/hosts";
/// dockerd's config.
pub const DAEMON_JSON: &str = "/etc/docker/daemon.json";

/// A failed command, with its exit code.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Bad config or arguments (exit 64).
    #[error("{0}")]
    Config(String),
    /// A patcher refused a file; nothing was written.
    #[error("{path}: {error}")]
    Patch { path: String, error: PatchError },
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("{0}")]
    Other(String),
}

impl AgentError {
    pub fn exit_code(&self) -> i32 {
        match self {
            AgentError::Config(_) => pullthrough_api::cli::EXIT_USAGE,
            _ => 1,
        }
    }
}

fn patch_err(path: &str) -> impl FnOnce(PatchError) -> AgentError + '_ {
    move |error| AgentError::Patch {
        path: path.to_string(),
        error,
    }
}

/// Options of `apply`.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// `None`: detect what is installed.
    pub runtimes: Option<Vec<Runtime>>,
    pub docker_action: DockerActionArg,
    pub dry_run: bool,
    pub migrate_containerd_mirrors: bool,
    /// The run loop's health gate is closed (the proxy is not ready): the
    /// `/etc/hosts` block keeps its markers but no entries, so hijacked
    /// names resolve as without the proxy. Everything else is applied.
    pub hosts_gate_closed: bool,
}

/// Options of `revert`.
#[derive(Debug, Clone)]
pub struct RevertOptions {
    pub dry_run: bool,
    /// How long dockerd gets to re-read an intermediate daemon.json (see
    /// [`revert`]).
    pub reload_settle: Duration,
}

/// One planned file change.
#[derive(Debug, Clone)]
struct Change {
    path: String,
    before: Option<Vec<u8>>,
    after: Option<Vec<u8>>,
    /// New record; `None` drops the file from the state.
    record: Option<FileRecord>,
    mode: u32,
    notes: Vec<String>,
    restored: bool,
}

impl Change {
    fn changed(&self) -> bool {
        self.before != self.after
    }

    fn verb(&self) -> &'static str {
        match (&self.before, &self.after) {
            _ if !self.changed() => "unchanged",
            _ if self.restored => "restored",
            (None, Some(_)) => "created",
            (Some(_), None) => "removed",
            _ => "updated",
        }
    }
}

/// What a command did, for tests and callers.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// `(verb, path)` of each file changed (or to change, in a dry run).
    pub files: Vec<(String, String)>,
    /// Runtime actions taken (or planned), one line each.
    pub actions: Vec<String>,
}

struct Planner<'a> {
    root: &'a Root,
    state: &'a State,
    changes: Vec<Change>,
    desired: BTreeSet<String>,
}

impl Planner<'_> {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, AgentError> {
        Ok(self.root.read(path)?)
    }

    /// Stages the new content of a desired file.
    fn stage(
        &mut self,
        path: &str,
        before: Option<Vec<u8>>,
        after: Option<Vec<u8>>,
        kind: FileKind,
        notes: Vec<String>,
    ) {
        self.desired.insert(path.to_string());
        let prev = self.state.files.get(path);
        if prev.is_none() && before == after {
            // Not ours and nothing to do: keep out of the record.
            return;
        }
        let before_sha = before.as_deref().map(sha256_hex);
        let diverged = prev.is_some_and(|r| r.diverged || r.written_sha256 != before_sha);
        let record = FileRecord {
            kind,
            existed_before: prev.map_or(before.is_some(), |r| r.existed_before),
            backup: prev.and_then(|r| r.backup.clone()),
            written_sha256: after.as_deref().map(sha256_hex),
            diverged,
        };
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
    fn stage_ca(&mut self, path: &str, ca: &[u8]) -> Result<(), AgentError> {
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

    fn prev_kind(&self, path: &str) -> Option<&FileKind> {
        self.state.files.get(path).map(|r| &r.kind)
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Which runtimes to configure, with a line saying why.
fn select_runtimes(
    root: &Root,
    opts: &ApplyOptions,
    notes: &mut Vec<String>,
) -> Result<Vec<Runtime>, AgentError> {
    if let Some(list) = &opts.runtimes {
        let mut l = list.clone();
        l.sort();
        l.dedup();
        return Ok(l);
    }
    let mut found = Vec::new();
    for (r, evidence) in detect(root) {
        if r == Runtime::Containerd {
            let cfg = root.read(CONFIG_TOML)?;
            if let Ok(info) = containerd::inspect(cfg.as_deref())
                && info.cri_disabled
            {
                notes.push(format!(
                    "containerd: skipped (found {evidence}, but its CRI plugin is disabled: it only serves dockerd)"
                ));
                continue;
            }
        }
        notes.push(format!("{r}: detected ({evidence})"));
        found.push(r);
    }
    if found.is_empty() {
        return Err(AgentError::Other(format!(
            "no container runtime found under {} (looked for /etc/docker, /etc/containerd, /etc/crio, /etc/containers, their sockets and binaries); pass --runtime",
            root.dir().display()
        )));
    }
    Ok(found)
}

/// Applies the config once: plans, prints, writes, tells runtimes.
pub fn apply(
    root: &Root,
    cfg: &AgentConfig,
    opts: &ApplyOptions,
    exec: &mut dyn Executor,
    out: &mut dyn Write,
) -> Result<Report, AgentError> {
    let mut st = state::load(root)
        .map_err(AgentError::Other)?
        .unwrap_or_default();
    let mut notes = Vec::new();
    let runtimes = select_runtimes(root, opts, &mut notes)?;
    let mut pl = Planner {
        root,
        state: &st,
        changes: Vec::new(),
        desired: BTreeSet::new(),
    };
    let ca = match &cfg.ca_pem {
        Some(pem) => Some(docker_certs::ca_file(pem).map_err(|e| AgentError::Config(e.0))?),
        None => None,
    };

    let mut docker_keys = BTreeSet::new();
    let mut live_restore = false;
    let mut containerd_enabled = false;
    if runtimes.contains(&Runtime::Docker) {
        let want = desired::docker(cfg).map_err(AgentError::Config)?;
        notes.extend(want.notes.iter().map(|n| format!("docker: {n}")));
        let before = pl.read(HOSTS)?;
        let current = before.as_deref().unwrap_or_default();
        let p = if opts.hosts_gate_closed {
            hosts::empty_block(current)
        } else {
            hosts::apply(current, &want.hosts)
        }
        .map_err(patch_err(HOSTS))?;
        let after = if before.is_none() && p.bytes.is_empty() {
            None
        } else {
            Some(p.bytes)
        };
        pl.stage(HOSTS, before, after, FileKind::HostsBlock, p.notes);

        let before = pl.read(DAEMON_JSON)?;
        let prev = match pl.prev_kind(DAEMON_JSON) {
            Some(FileKind::DaemonJson { added }) => added.clone(),
            _ => Added::new(),
        };
        let p = daemon_json::apply(before.as_deref(), &want.daemon_json, &prev)
            .map_err(patch_err(DAEMON_JSON))?;
        if p.bytes != before
            && let Some(bytes) = &p.bytes
            && let Some(Err(e)) = exec.validate_daemon_json(bytes)
        {
            return Err(AgentError::Patch {
                path: DAEMON_JSON.into(),
                error: PatchError::new(format!(
                    "dockerd --validate rejects the result: {e}; nothing was written"
                )),
            });
        }
        live_restore = daemon_json::live_restore(p.bytes.as_deref());
        docker_keys = p.changed_keys.clone();
        pl.stage(
            DAEMON_JSON,
            before,
            p.bytes,
            FileKind::DaemonJson { added: p.added },
            Vec::new(),
        );

        if let Some(ca) = &ca {
            for path in docker_certs::ca_paths(
                DOCKER_CERTS_D,
                want.ca_authorities.iter().map(String::as_str),
            ) {
                pl.stage_ca(&path, ca)?;
            }
        }
    }

    if runtimes.contains(&Runtime::Containerd) {
        let before = pl.read(CONFIG_TOML)?;
        let prev = match pl.prev_kind(CONFIG_TOML) {
            Some(FileKind::ContainerdConfig { record }) => record.clone(),
            _ => ConfigRecord::default(),
        };
        let info = containerd::inspect(before.as_deref()).map_err(patch_err(CONFIG_TOML))?;
        let p = match (
            &info.hosts_dir(),
            info.mirrors.is_empty() && info.tls_configs.is_empty(),
        ) {
            // config_path already set, nothing deprecated: leave the file
            // alone (and out of the record unless the agent set it).
            (Some(_), true) if !pl.state.files.contains_key(CONFIG_TOML) => None,
            _ => Some(
                containerd::ensure_config_path(
                    before.as_deref(),
                    &prev,
                    opts.migrate_containerd_mirrors,
                )
                .map_err(patch_err(CONFIG_TOML))?,
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
                containerd_enabled =
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
            url: cfg.proxy.base_url(),
            tls: HostTls {
                ca: ca.as_ref().map(|_| CA_FILE_NAME.to_string()),
                ..HostTls::default()
            },
        };
        let mut files: BTreeMap<String, (String, HostTls, Vec<MirrorHost>)> = BTreeMap::new();
        for r in desired::containerd(cfg) {
            files.insert(
                r.name.clone(),
                (r.server, HostTls::default(), vec![proxy_host.clone()]),
            );
        }
        for (name, m) in migrated {
            let server = files
                .get(&name)
                .map(|f| f.0.clone())
                .unwrap_or_else(|| containerd::server_for(&name, None));
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
            let bytes = containerd::hosts_toml(&server, &server_tls, &hosts_list)
                .map_err(patch_err(&path))?;
            let before = pl.read(&path)?;
            let mut notes = Vec::new();
            if let Some(b) = &before
                && !is_generated(b)
                && !pl.state.files.contains_key(&path)
            {
                notes.push(
                    "replaced a hosts.toml the agent did not write; backed up, revert restores it"
                        .into(),
                );
            }
            pl.stage(&path, before, Some(bytes), FileKind::Generated, notes);
            if hosts_list.iter().any(|h| h.url == proxy_host.url)
                && let Some(ca) = &ca
            {
                let ca_path = format!("{dir}/{CA_FILE_NAME}");
                pl.stage_ca(&ca_path, ca)?;
            }
        }
    }

    if runtimes.contains(&Runtime::Crio) {
        let regs = desired::crio(cfg);
        let bytes = crio::drop_in(&regs).map_err(patch_err(DROP_IN))?;
        let before = pl.read(DROP_IN)?;
        let mut notes = Vec::new();
        if let Some(b) = &before
            && !is_generated(b)
            && !pl.state.files.contains_key(DROP_IN)
        {
            notes.push(
                "replaced a file the agent did not write; backed up, revert restores it".into(),
            );
        }
        pl.stage(DROP_IN, before, bytes, FileKind::Generated, notes);
        if let Some(ca) = &ca
            && !regs.is_empty()
        {
            for path in docker_certs::ca_paths(CONTAINERS_CERTS_D, [cfg.proxy.authority().as_str()])
            {
                pl.stage_ca(&path, ca)?;
            }
        }
    }

    // Files from an earlier apply that this config no longer wants.
    let stale: Vec<(String, FileRecord)> = st
        .files
        .iter()
        .filter(|(p, _)| !pl.desired.contains(*p))
        .map(|(p, r)| (p.clone(), r.clone()))
        .collect();
    for (path, rec) in stale {
        let mut c = revert_file(root, &path, &rec)?;
        if path == DAEMON_JSON {
            docker_keys.extend(removed_or_changed_keys(
                c.before.as_deref(),
                c.after.as_deref(),
            ));
        }
        c.record = None;
        pl.changes.push(c);
    }
    let changes = pl.changes;

    for n in &notes {
        writeln_out(out, n);
    }
    let mut report = Report::default();
    let changed: Vec<&Change> = changes.iter().filter(|c| c.changed()).collect();
    let changed_paths: BTreeSet<&str> = changed.iter().map(|c| c.path.as_str()).collect();
    for c in &changed {
        report.files.push((c.verb().to_string(), c.path.clone()));
    }

    // Runtime decisions.
    let docker_other = changed_paths
        .iter()
        .any(|p| *p == HOSTS || p.starts_with(DOCKER_CERTS_D));
    let docker_decision =
        (runtimes.contains(&Runtime::Docker) || !docker_keys.is_empty()).then(|| {
            decide_docker_action(&docker_keys, docker_other, opts.docker_action, live_restore)
        });
    let containerd_touched = changed_paths
        .iter()
        .any(|p| *p == CONFIG_TOML || p.ends_with("/hosts.toml"));
    let crio_reload = changed_paths.contains(DROP_IN);

    if opts.dry_run {
        for c in &changed {
            write_diff(out, c);
        }
        if changed.is_empty() {
            writeln_out(out, "no changes");
            return Ok(report);
        }
        if let Some(d) = &docker_decision {
            let line = format!("dockerd: would {} ({})", action_word(d.action), d.reason);
            writeln_out(out, &line);
            report.actions.push(line);
        }
        if containerd_enabled {
            let line = "containerd: would restart (config_path enabled)".to_string();
            writeln_out(out, &line);
            report.actions.push(line);
        }
        if crio_reload {
            let line =
                "crio: would reload (SIGHUP) (registries.conf.d drop-in changed)".to_string();
            writeln_out(out, &line);
            report.actions.push(line);
        }
        writeln_out(out, "dry run: nothing was written");
        return Ok(report);
    }

    if report.files.is_empty() {
        writeln_out(out, "no changes");
        return Ok(report);
    }
    commit(root, &mut st, changes, out)?;

    let mut errors = Vec::new();
    {
        if let Some(d) = &docker_decision {
            let res = match d.action {
                Action::Nothing => Ok(None),
                Action::Reload => exec.reload(Service::Docker).map(Some),
                Action::Restart => exec.restart(Service::Docker).map(Some),
            };
            report.actions.push(action_line(
                out,
                "dockerd",
                d.action,
                &d.reason,
                res,
                &mut errors,
            ));
        }
        if runtimes.contains(&Runtime::Containerd) && containerd_touched {
            let (action, reason, res) = if containerd_enabled {
                (
                    Action::Restart,
                    "config_path enabled in config.toml".to_string(),
                    exec.restart(Service::Containerd).map(Some),
                )
            } else {
                (
                    Action::Nothing,
                    "hosts.toml is re-read on every pull".to_string(),
                    Ok(None),
                )
            };
            report.actions.push(action_line(
                out,
                "containerd",
                action,
                &reason,
                res,
                &mut errors,
            ));
        }
        if crio_reload {
            let res = exec.reload(Service::Crio).map(Some);
            report.actions.push(action_line(
                out,
                "crio",
                Action::Reload,
                "registries.conf.d drop-in changed (podman reads it on each run)",
                res,
                &mut errors,
            ));
        }
    }
    st.last_apply = Some(LastApply {
        config_sha256: cfg.sha256.clone(),
        proxy: cfg.proxy.base_url(),
        runtimes: runtimes.iter().map(|r| r.name().to_string()).collect(),
        at_unix: now_unix(),
        actions: report.actions.clone(),
    });
    state::save(root, &mut st)?;
    if !errors.is_empty() {
        return Err(AgentError::Other(format!(
            "files were written, but: {}",
            errors.join("; ")
        )));
    }
    Ok(report)
}

fn action_word(a: Action) -> &'static str {
    match a {
        Action::Nothing => "do nothing",
        Action::Reload => "reload (SIGHUP)",
        Action::Restart => "restart",
    }
}

fn action_line(
    out: &mut dyn Write,
    who: &str,
    action: Action,
    reason: &str,
    res: Result<Option<Outcome>, String>,
    errors: &mut Vec<String>,
) -> String {
    let line = match (action, res) {
        (Action::Nothing, _) => format!("{who}: nothing to do ({reason})"),
        (_, Ok(Some(o))) => format!("{who}: {} ({reason}): {}", action_word(action), o.message()),
        (_, Ok(None)) => format!("{who}: nothing to do ({reason})"),
        (_, Err(e)) => {
            errors.push(format!("{who}: {e}"));
            format!("{who}: {} ({reason}) FAILED: {e}", action_word(action))
        }
    };
    writeln_out(out, &line);
    line
}

fn writeln_out(out: &mut dyn Write, line: &str) {
    // stdout going away (a closed pipe) must not abort a half-done write.
    let _ = writeln!(out, "{line}");
}

fn write_diff(out: &mut dyn Write, c: &Change) {
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

/// Backs up first edits, records the intent, writes, prunes directories,
/// records the result.
fn commit(
    root: &Root,
    st: &mut State,
    mut changes: Vec<Change>,
    out: &mut dyn Write,
) -> Result<(), AgentError> {
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
    // 3. The intent.
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
    // 4. The files.
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
    // 5. Directories no managed file needs any more.
    prune_dirs(root, st)?;
    Ok(())
}

fn prune_dirs(root: &Root, st: &mut State) -> Result<(), AgentError> {
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

/// daemon.json keys present in `before` and different (or gone) in
/// `after`.
fn removed_or_changed_keys(before: Option<&[u8]>, after: Option<&[u8]>) -> BTreeSet<String> {
    let b = before
        .and_then(|b| daemon_json::parse(b).ok())
        .unwrap_or_default();
    let a = after
        .and_then(|a| daemon_json::parse(a).ok())
        .unwrap_or_default();
    b.keys()
        .chain(a.keys())
        .filter(|k| b.get(*k) != a.get(*k))
        .cloned()
        .collect()
}

/// What undoing the agent's part of one file gives: the first-edit backup
/// when the file is as the agent left it (or undoing its part lands on the
/// backup's content anyway), else the file minus the agent's part.
fn revert_file(root: &Root, path: &str, rec: &FileRecord) -> Result<Change, AgentError> {
    let current = root.read(path)?;
    let original = match (&rec.backup, rec.existed_before) {
        (Some(b), true) => root.read(b)?,
        _ => None,
    };
    let backup_ok = !rec.existed_before || original.is_some();
    let unchanged = current.as_deref().map(sha256_hex) == rec.written_sha256 && !rec.diverged;
    let mut notes = Vec::new();
    let semantic: Option<Vec<u8>> = match (&rec.kind, &current) {
        (_, None) => None,
        (FileKind::HostsBlock, Some(c)) => {
            let b = hosts::revert(c).map_err(patch_err(path))?;
            if b.is_empty() && !rec.existed_before {
                None
            } else {
                Some(b)
            }
        }
        (FileKind::DaemonJson { added }, Some(c)) => {
            daemon_json::revert(Some(c), added, !rec.existed_before)
                .map_err(patch_err(path))?
                .bytes
        }
        (FileKind::ContainerdConfig { record }, Some(c)) => {
            let (b, n) = containerd::revert_config(c, record, !rec.existed_before)
                .map_err(patch_err(path))?;
            notes.extend(n);
            b
        }
        (FileKind::Generated, Some(c)) if is_generated(c) => original.clone(),
        (FileKind::CaCert, Some(c)) if Some(sha256_hex(c)) == rec.written_sha256 => {
            original.clone()
        }
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

/// Removes everything the agent ever added and restores first-edit
/// backups, then the state itself.
///
/// dockerd's reload applies only keys present in daemon.json: when revert
/// removes `registry-mirrors` entirely, a plain SIGHUP would leave the
/// proxy mirror in the running daemon. So the file is first written with
/// the removed keys set to `[]`, dockerd reloaded, and after
/// `reload_settle` the exact original is put back.
pub fn revert(
    root: &Root,
    opts: &RevertOptions,
    exec: &mut dyn Executor,
    out: &mut dyn Write,
) -> Result<Report, AgentError> {
    let Some(mut st) = state::load(root).map_err(AgentError::Other)? else {
        writeln_out(
            out,
            "nothing to revert: the agent has not applied anything here",
        );
        return Ok(Report::default());
    };
    let mut changes = Vec::new();
    for (path, rec) in &st.files {
        changes.push(revert_file(root, path, rec)?);
    }
    let mut report = Report::default();
    for c in changes.iter().filter(|c| c.changed()) {
        report.files.push((c.verb().to_string(), c.path.clone()));
    }
    let docker_change = changes
        .iter()
        .find(|c| c.path == DAEMON_JSON && c.changed())
        .map(|c| {
            (
                removed_or_changed_keys(c.before.as_deref(), c.after.as_deref()),
                c.before.clone(),
                c.after.clone(),
            )
        });
    let crio_reload = changes.iter().any(|c| c.path == DROP_IN && c.changed());
    if opts.dry_run {
        for c in changes.iter().filter(|c| c.changed()) {
            write_diff(out, c);
        }
        if let Some((keys, _, _)) = &docker_change {
            let line = format!(
                "dockerd: would reload (SIGHUP) ({} changed)",
                keys.iter().cloned().collect::<Vec<_>>().join(", ")
            );
            writeln_out(out, &line);
            report.actions.push(line);
        }
        writeln_out(out, "dry run: nothing was written");
        return Ok(report);
    }

    let mut errors = Vec::new();
    // dockerd first, while an interim file can still clear removed keys.
    let mut reload_after = None;
    if let Some((keys, _, after)) = &docker_change {
        let after_map = after
            .as_deref()
            .map(daemon_json::parse)
            .transpose()
            .map_err(patch_err(DAEMON_JSON))?
            .unwrap_or_default();
        let cleared: Vec<&str> = keys
            .iter()
            .map(String::as_str)
            .filter(|k| crate::runtime::RELOADABLE_KEYS.contains(k))
            .filter(|k| !after_map.contains_key(*k))
            .collect();
        if cleared.is_empty() {
            reload_after = Some(keys.iter().cloned().collect::<Vec<_>>().join(", "));
        } else {
            let mut interim = after_map.clone();
            for k in &cleared {
                interim.insert((*k).to_string(), serde_json::Value::Array(Vec::new()));
            }
            let bytes = serde_json::to_vec_pretty(&serde_json::Value::Object(interim))
                .map_err(|e| AgentError::Other(e.to_string()))?;
            root.write_atomic(DAEMON_JSON, &bytes, FILE_MODE)?;
            let res = exec.reload(Service::Docker).map(Some);
            let settle = matches!(res, Ok(Some(Outcome::Done(_))));
            report.actions.push(action_line(
                out,
                "dockerd",
                Action::Reload,
                &format!(
                    "clearing {} before daemon.json is restored",
                    cleared.join(", ")
                ),
                res,
                &mut errors,
            ));
            if settle {
                std::thread::sleep(opts.reload_settle);
            }
            for c in changes.iter_mut().filter(|c| c.path == DAEMON_JSON) {
                c.before = Some(bytes.clone());
            }
        }
    }

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
    st.files.clear();
    prune_dirs(root, &mut st)?;
    for d in &st.created_dirs {
        writeln_out(out, &format!("kept      {d}/ (not empty)"));
    }
    state::remove_all(root, &st)?;
    if let Some(keys) = reload_after {
        let res = exec.reload(Service::Docker).map(Some);
        report.actions.push(action_line(
            out,
            "dockerd",
            Action::Reload,
            &format!("{keys} changed"),
            res,
            &mut errors,
        ));
    }
    if crio_reload {
        let res = exec.reload(Service::Crio).map(Some);
        report.actions.push(action_line(
            out,
            "crio",
            Action::Reload,
            "registries.conf.d drop-in removed",
            res,
            &mut errors,
        ));
    }
    if report.files.is_empty() {
        writeln_out(out, "no changes (the agent's files were already gone)");
    }
    if !errors.is_empty() {
        return Err(AgentError::Other(format!(
            "files were restored, but: {}",
            errors.join("; ")
        )));
    }
    Ok(report)
}

/// One file in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FileStatus {
    pub path: String,
    pub what: String,
    /// `applied`, `changed since apply`, `missing`, `removed`.
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
}

/// What the agent has applied on this node.
pub fn status(root: &Root) -> Result<Status, AgentError> {
    let Some(st) = state::load(root).map_err(AgentError::Other)? else {
        return Ok(Status {
            applied: false,
            last_apply: None,
            files: Vec::new(),
            hosts_entries: Vec::new(),
        });
    };
    let mut files = Vec::new();
    for (path, rec) in &st.files {
        let current = root.read(path)?;
        let state = match (&current, &rec.written_sha256) {
            (None, None) => "removed",
            (None, Some(_)) => "missing",
            (Some(c), Some(w)) if &sha256_hex(c) == w => "applied",
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
    })
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

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;

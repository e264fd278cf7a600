//! The node's container runtimes. Each one is a type behind [`Runtime`]
//! (`docker.rs`, `containerd.rs`, `crio.rs`): how it is detected, which
//! files it wants (its plan), and what its daemon needs once they changed.
//! The engine only walks [`RuntimeKind::ALL`]; it never asks which runtime
//! it holds. The executor that reloads or restarts daemons is in `exec.rs`.

pub mod containerd;
pub mod crio;
pub mod docker;
pub mod exec;

use std::collections::BTreeSet;
use std::fmt;
use std::io::Write;

use crate::config::AgentConfig;
use crate::engine::plan::{Change, Planner, writeln_out};
use crate::error::ActionError;
use crate::error::AgentError;
use crate::fsio::{FILE_MODE, Root};
use crate::state::PendingAction;

pub use docker::{DockerActionArg, RELOADABLE_KEYS};
pub use exec::{Executor, Outcome, RecordingExecutor, Rejected, Service, SystemExecutor};

/// A runtime the agent configures, by name (flags, options, the state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RuntimeKind {
    /// dockerd: `/etc/hosts`, daemon.json, `/etc/docker/certs.d`.
    Docker,
    /// containerd (CRI): config_path + hosts.toml.
    Containerd,
    /// CRI-O and podman: registries.conf.d drop-in + certs.d.
    Crio,
}

impl RuntimeKind {
    /// Every runtime, in the order the engine plans and acts on them.
    pub const ALL: [RuntimeKind; 3] = [
        RuntimeKind::Docker,
        RuntimeKind::Containerd,
        RuntimeKind::Crio,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RuntimeKind::Docker => "docker",
            RuntimeKind::Containerd => "containerd",
            RuntimeKind::Crio => "crio",
        }
    }

    /// The runtime's implementation.
    pub fn runtime(self) -> &'static dyn Runtime {
        match self {
            RuntimeKind::Docker => &docker::Docker,
            RuntimeKind::Containerd => &containerd::Containerd,
            RuntimeKind::Crio => &crio::Crio,
        }
    }
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What to do with a daemon, weakest first (a restart also reloads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    Nothing,
    Reload,
    Restart,
}

impl Action {
    /// How the action reads in a report line.
    pub fn word(self) -> &'static str {
        match self {
            Action::Nothing => "do nothing",
            Action::Reload => "reload (SIGHUP)",
            Action::Restart => "restart",
        }
    }
}

/// A daemon action the engine carries out after the files changed (or
/// prints, in a dry run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub service: Service,
    pub action: Action,
    pub reason: String,
    /// What a dry run says about it; `None`: a dry run does not mention it.
    pub dry_run_reason: Option<String>,
    /// A version of a file the daemon must read through this reload
    /// before the file's final content (dockerd's daemon.json with the
    /// keys an apply removes emptied: see `docker::interim_daemon_json`).
    pub interim: Option<Interim>,
}

/// A file version a reload goes through (see [`Step::interim`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interim {
    pub path: String,
    pub bytes: Vec<u8>,
    /// The file's final content, put back after the reload (`None`: the
    /// file goes).
    pub after: Option<Vec<u8>>,
}

impl Step {
    /// The step as the state keeps it while it is owed; `None` when it
    /// asks nothing of the daemon.
    pub fn to_pending(&self) -> Option<PendingAction> {
        let action = match self.action {
            Action::Nothing => return None,
            Action::Reload => "reload",
            Action::Restart => "restart",
        };
        Some(PendingAction {
            service: self.service.unit().into(),
            action: action.into(),
            reason: self.reason.clone(),
            started: false,
            extra: Default::default(),
        })
    }

    /// This owed step as the admin's current `--docker-action` allows it:
    /// for dockerd the flag of this apply decides, not the one of the
    /// apply that owed it. `Err`: the line saying why it is not done.
    pub fn owed_under(self, docker_action: DockerActionArg) -> Result<Step, String> {
        if self.service != Service::Docker {
            return Ok(self);
        }
        match (docker_action, self.action) {
            (DockerActionArg::None, a) => Err(format!(
                "{}: owed {} not done: --docker-action none",
                self.service.process(),
                a.word()
            )),
            (DockerActionArg::Reload, Action::Restart) => {
                let reason = format!(
                    "{}; --docker-action reload: a reload instead of the owed restart",
                    self.reason
                );
                Ok(Step {
                    action: Action::Reload,
                    dry_run_reason: Some(reason.clone()),
                    reason,
                    ..self
                })
            }
            _ => Ok(self),
        }
    }

    /// A step owed since an earlier apply; `None` for a record this
    /// version cannot read.
    pub fn from_pending(p: &PendingAction) -> Option<Step> {
        let action = match p.action.as_str() {
            "reload" => Action::Reload,
            "restart" => Action::Restart,
            _ => return None,
        };
        Some(Step {
            service: Service::from_unit(&p.service)?,
            action,
            reason: p.reason.clone(),
            dry_run_reason: Some(format!("{}; failed before", p.reason)),
            interim: None,
        })
    }
}

/// What detection found under the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detection {
    Absent,
    /// Installed; the path that shows it.
    Found(&'static str),
    /// Installed but not to be configured; the line saying why.
    Skipped(String),
}

/// Options of `apply`.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// `None`: detect what is installed.
    pub runtimes: Option<Vec<RuntimeKind>>,
    pub docker_action: DockerActionArg,
    /// How long dockerd gets to re-read an interim daemon.json (see
    /// [`Step::interim`]).
    pub reload_settle: std::time::Duration,
    pub dry_run: bool,
    pub migrate_containerd_mirrors: bool,
    /// The run loop's health gate is closed (the proxy is not ready): the
    /// `/etc/hosts` block keeps its markers but no entries, so hijacked
    /// names resolve as without the proxy. Everything else is applied.
    pub hosts_gate_closed: bool,
}

/// Carries out daemon steps, printing a line for each and collecting
/// failures: a failed reload must not stop the other daemons from hearing
/// about their files.
pub struct Actor<'a> {
    exec: &'a mut dyn Executor,
    pub(crate) out: &'a mut dyn Write,
    pub(crate) actions: Vec<String>,
    pub(crate) failed: Vec<ActionError>,
}

impl<'a> Actor<'a> {
    pub(crate) fn new(exec: &'a mut dyn Executor, out: &'a mut dyn Write) -> Self {
        Self {
            exec,
            out,
            actions: Vec::new(),
            failed: Vec::new(),
        }
    }

    /// Carries out one step; `true` when the daemon was actually told.
    pub fn act(&mut self, step: &Step) -> bool {
        let who = step.service.process();
        let res = match step.action {
            Action::Nothing => Ok(None),
            Action::Reload => self.exec.reload(step.service).map(Some),
            Action::Restart => self.exec.restart(step.service).map(Some),
        };
        let done = matches!(res, Ok(Some(Outcome::Done(_))));
        let reason = &step.reason;
        let line = match (step.action, res) {
            (Action::Nothing, _) | (_, Ok(None)) => format!("{who}: nothing to do ({reason})"),
            (a, Ok(Some(o))) => format!("{who}: {} ({reason}): {}", a.word(), o.message()),
            (a, Err(e)) => {
                let line = format!("{who}: {} ({reason}) FAILED: {e}", a.word());
                self.failed.push(ActionError {
                    daemon: who,
                    source: e,
                });
                line
            }
        };
        writeln_out(self.out, &line);
        self.actions.push(line);
        done
    }

    /// Carries out `step` with `interim` in `path` while the daemon is
    /// told, then waits `settle` for it to read the file (when it was
    /// told); `true` when it was. The caller puts the final content back.
    /// `path` must still hold `expected` (what the agent last wrote or
    /// read there): another writer's content is never replaced, and the
    /// daemon is not told.
    pub fn act_through(
        &mut self,
        root: &Root,
        step: &Step,
        path: &str,
        expected: Option<&[u8]>,
        interim: &[u8],
        settle: std::time::Duration,
    ) -> Result<bool, AgentError> {
        still_as(root, path, expected)?;
        root.write_atomic(path, interim, FILE_MODE)?;
        let told = self.act(step);
        if told {
            std::thread::sleep(settle);
        }
        Ok(told)
    }

    /// Carries out an apply's step, through its interim file if it has
    /// one (written where the apply left the file, then the final content
    /// put back); `true` when the daemon was told. The file is read again
    /// before each of the two writes: an admin's edit made after the
    /// apply wrote it, or during the settle time, stays theirs.
    pub fn act_after_apply(
        &mut self,
        root: &Root,
        step: &Step,
        settle: std::time::Duration,
    ) -> Result<bool, AgentError> {
        let Some(i) = step
            .interim
            .as_ref()
            .filter(|_| step.action == Action::Reload)
        else {
            return Ok(self.act(step));
        };
        // The apply may have removed the file and its directory.
        let made = root.create_dirs(&crate::fsio::parent(&i.path))?;
        let told = self.act_through(root, step, &i.path, i.after.as_deref(), &i.bytes, settle);
        let told = match told {
            Ok(t) => t,
            Err(e) => {
                remove_dirs_if_empty(root, &made)?;
                return Err(e);
            }
        };
        still_as(root, &i.path, Some(&i.bytes))?;
        match &i.after {
            Some(b) => root.write_atomic(&i.path, b, FILE_MODE)?,
            None => root.remove_file(&i.path)?,
        }
        remove_dirs_if_empty(root, &made)?;
        Ok(told)
    }

    /// The step as a dry run prints it, if it does.
    pub(crate) fn dry_run(&mut self, step: &Step) {
        if let Some(reason) = &step.dry_run_reason {
            let line = format!(
                "{}: would {} ({reason})",
                step.service.process(),
                step.action.word()
            );
            writeln_out(self.out, &line);
            self.actions.push(line);
        }
    }
}

/// `path` holds `expected` (`None`: no file), else
/// [`AgentError::ChangedDuringReload`].
fn still_as(root: &Root, path: &str, expected: Option<&[u8]>) -> Result<(), AgentError> {
    if root.read(path)?.as_deref() != expected {
        return Err(AgentError::ChangedDuringReload {
            path: path.to_string(),
        });
    }
    Ok(())
}

fn remove_dirs_if_empty(root: &Root, dirs: &[String]) -> Result<(), AgentError> {
    for d in dirs.iter().rev() {
        root.remove_dir_if_empty(d)?;
    }
    Ok(())
}

/// What every runtime's plan step is given.
pub struct PlanInput<'a> {
    pub cfg: &'a AgentConfig,
    pub opts: &'a ApplyOptions,
    /// The proxy CA as the runtimes' trust files hold it (TLS mode).
    pub ca: Option<&'a [u8]>,
}

/// What a plan step found out that its after-apply step needs: the
/// daemon's decision depends on what the patchers saw, not only on which
/// files changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Planned {
    /// Lines printed before the changes (why something was left out).
    pub notes: Vec<String>,
    /// Daemon settings whose value changes (dockerd's daemon.json keys).
    pub changed_keys: BTreeSet<String>,
    /// dockerd keeps containers across a restart (live-restore).
    pub live_restore: bool,
    /// A change only a restart picks up (containerd's new config_path).
    pub restart_needed: bool,
}

/// What an after-apply step looks at.
pub struct AfterApply<'a> {
    /// The runtime was configured by this apply; otherwise only files it
    /// owned from an earlier apply may have been undone.
    pub selected: bool,
    /// Its plan step's findings (default when it was not selected).
    pub planned: &'a Planned,
    /// Every planned change, stale files included, changed or not.
    pub changes: &'a [Change],
    pub docker_action: DockerActionArg,
}

/// What the engine does with the daemons around a revert.
pub struct BeforeRevert<'a, 'b> {
    pub root: &'a Root,
    /// Every file the revert restores or removes; a runtime may write an
    /// interim version first (and must then record it as `before`).
    pub changes: &'a mut [Change],
    pub actor: &'a mut Actor<'b>,
    pub reload_settle: std::time::Duration,
}

/// One container runtime: what it is told and how it is told.
pub trait Runtime: Sync {
    fn kind(&self) -> RuntimeKind;

    /// Paths whose presence under the root shows the runtime is installed.
    fn evidence(&self) -> &'static [&'static str];

    /// Whether the runtime is installed and should be configured.
    fn detect(&self, root: &Root) -> Result<Detection, AgentError> {
        Ok(first_present(root, self.evidence()).map_or(Detection::Absent, Detection::Found))
    }

    /// Stages every file this runtime wants into the plan; nothing is
    /// written yet, and a patcher's refusal stops the whole apply.
    fn plan(
        &self,
        input: &PlanInput<'_>,
        pl: &mut Planner<'_>,
        exec: &mut dyn Executor,
    ) -> Result<Planned, AgentError>;

    /// What the daemon needs once the planned changes are written.
    fn after_apply(&self, cx: &AfterApply<'_>) -> Option<Step>;

    /// Acts before a revert writes its files; `true` when the daemon has
    /// been dealt with and [`Runtime::after_revert`] is not needed.
    fn before_revert(&self, _cx: &mut BeforeRevert<'_, '_>) -> Result<bool, AgentError> {
        Ok(false)
    }

    /// What the daemon needs once a revert restored its files.
    fn after_revert(&self, _changes: &[Change]) -> Option<Step> {
        None
    }
}

fn first_present(root: &Root, paths: &'static [&'static str]) -> Option<&'static str> {
    paths.iter().find(|p| root.exists(p)).copied()
}

/// The runtimes with files present under the root, each with the path
/// that shows it.
pub fn detect(root: &Root) -> Vec<(RuntimeKind, &'static str)> {
    RuntimeKind::ALL
        .iter()
        .filter_map(|&k| first_present(root, k.runtime().evidence()).map(|p| (k, p)))
        .collect()
}

/// Which runtimes to configure: those asked for, or those detected (with
/// a line each saying why).
pub fn select(
    root: &Root,
    requested: Option<&[RuntimeKind]>,
    notes: &mut Vec<String>,
) -> Result<Vec<RuntimeKind>, AgentError> {
    if let Some(list) = requested {
        let mut l = list.to_vec();
        l.sort();
        l.dedup();
        return Ok(l);
    }
    let mut found = Vec::new();
    for kind in RuntimeKind::ALL {
        match kind.runtime().detect(root)? {
            Detection::Absent => {}
            Detection::Skipped(why) => notes.push(why),
            Detection::Found(evidence) => {
                notes.push(format!("{kind}: detected ({evidence})"));
                found.push(kind);
            }
        }
    }
    if found.is_empty() {
        return Err(AgentError::NoRuntime {
            root: root.dir().to_path_buf(),
        });
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_runtimes_by_their_files() {
        let t = tempfile::tempdir().unwrap();
        let root = Root::new(t.path());
        assert!(detect(&root).is_empty());
        std::fs::create_dir_all(t.path().join("etc/docker")).unwrap();
        std::fs::create_dir_all(t.path().join("run/containerd")).unwrap();
        std::fs::write(t.path().join("run/containerd/containerd.sock"), b"").unwrap();
        assert_eq!(
            detect(&root),
            [
                (RuntimeKind::Docker, "/etc/docker"),
                (RuntimeKind::Containerd, "/run/containerd/containerd.sock")
            ]
        );
    }
}

//! The node's container runtimes: which are present under the root, what a
//! change requires of each (nothing, reload, restart), and the executor
//! that does it (injectable, so tests record instead of signalling).

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::fsio::Root;
use crate::patch::daemon_json::{INSECURE_REGISTRIES, REGISTRY_MIRRORS};

/// A runtime the agent configures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Runtime {
    /// dockerd: `/etc/hosts`, daemon.json, `/etc/docker/certs.d`.
    Docker,
    /// containerd (CRI): config_path + hosts.toml.
    Containerd,
    /// CRI-O and podman: registries.conf.d drop-in + certs.d.
    Crio,
}

impl Runtime {
    pub const ALL: [Runtime; 3] = [Runtime::Docker, Runtime::Containerd, Runtime::Crio];

    pub fn name(self) -> &'static str {
        match self {
            Runtime::Docker => "docker",
            Runtime::Containerd => "containerd",
            Runtime::Crio => "crio",
        }
    }

    /// Paths whose presence under the root shows the runtime is installed.
    fn evidence(self) -> &'static [&'static str] {
        match self {
            Runtime::Docker => &[
                "/etc/docker",
                "/var/run/docker.sock",
                "/run/docker.sock",
                "/usr/bin/dockerd",
                "/usr/local/bin/dockerd",
            ],
            Runtime::Containerd => &[
                "/etc/containerd",
                "/run/containerd/containerd.sock",
                "/usr/bin/containerd",
                "/usr/local/bin/containerd",
            ],
            Runtime::Crio => &[
                "/etc/crio",
                "/usr/bin/crio",
                "/usr/local/bin/crio",
                "/usr/bin/podman",
                "/etc/containers",
            ],
        }
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The runtimes present under the root, each with the path that shows it.
pub fn detect(root: &Root) -> Vec<(Runtime, &'static str)> {
    Runtime::ALL
        .iter()
        .filter_map(|&r| {
            r.evidence()
                .iter()
                .find(|p| root.exists(p))
                .map(|p| (r, *p))
        })
        .collect()
}

/// A daemon the agent may reload or restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Docker,
    Containerd,
    Crio,
}

impl Service {
    pub fn unit(self) -> &'static str {
        match self {
            Service::Docker => "docker",
            Service::Containerd => "containerd",
            Service::Crio => "crio",
        }
    }

    fn process(self) -> &'static str {
        match self {
            Service::Docker => "dockerd",
            Service::Containerd => "containerd",
            Service::Crio => "crio",
        }
    }

    fn pid_files(self) -> &'static [&'static str] {
        match self {
            Service::Docker => &["/var/run/docker.pid", "/run/docker.pid"],
            Service::Containerd => &[],
            Service::Crio => &["/var/run/crio/crio.pid", "/run/crio/crio.pid"],
        }
    }
}

/// What an executor did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The daemon was signalled / restarted; the text says how.
    Done(String),
    /// The daemon is not running (it reads the new config when it starts).
    NotRunning(String),
}

impl Outcome {
    pub fn message(&self) -> &str {
        match self {
            Outcome::Done(m) | Outcome::NotRunning(m) => m,
        }
    }
}

/// Carries out runtime actions. [`SystemExecutor`] is the real one.
pub trait Executor {
    /// Reload (SIGHUP) the daemon.
    fn reload(&mut self, service: Service) -> Result<Outcome, String>;
    /// Restart the daemon.
    fn restart(&mut self, service: Service) -> Result<Outcome, String>;
    /// `dockerd --validate` on a candidate daemon.json; `None` when no
    /// usable dockerd binary is there.
    fn validate_daemon_json(&mut self, bytes: &[u8]) -> Option<Result<(), String>>;
}

/// Signals daemons through their pid file under the root (checked against
/// `/proc/<pid>/comm`, so a stale pid file never signals a stranger), or
/// runs `systemctl` in the host's namespaces (`nsenter -t 1`) where the
/// root has systemd.
pub struct SystemExecutor {
    root: Root,
}

impl SystemExecutor {
    pub fn new(root: Root) -> Self {
        Self { root }
    }

    fn live_pid(&self, service: Service) -> Option<(i32, &'static str)> {
        for file in service.pid_files() {
            let Ok(Some(bytes)) = self.root.read(file) else {
                continue;
            };
            let Ok(pid) = String::from_utf8_lossy(&bytes).trim().parse::<i32>() else {
                continue;
            };
            if pid <= 1 {
                continue;
            }
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == service.process() {
                return Some((pid, file));
            }
        }
        None
    }

    fn has_systemd(&self) -> bool {
        self.root.is_dir("/run/systemd/system")
    }

    fn systemctl(&self, args: &[&str]) -> Command {
        let mut cmd = if self.root.dir() == Path::new("/") {
            Command::new("systemctl")
        } else {
            // The root is mounted from the host (e.g. /host): act in the
            // host's namespaces (needs hostPID).
            let mut c = Command::new("nsenter");
            c.args(["-t", "1", "-m", "-u", "-i", "-n", "-p", "--", "systemctl"]);
            c
        };
        cmd.args(args);
        cmd
    }

    fn unit_active(&self, service: Service) -> Result<bool, String> {
        let status = self
            .systemctl(&["is-active", "--quiet", service.unit()])
            .status()
            .map_err(|e| format!("running systemctl: {e}"))?;
        Ok(status.success())
    }

    fn run_systemctl(&self, verb: &str, service: Service) -> Result<Outcome, String> {
        let out = self
            .systemctl(&[verb, service.unit()])
            .output()
            .map_err(|e| format!("running systemctl {verb} {}: {e}", service.unit()))?;
        if out.status.success() {
            Ok(Outcome::Done(format!(
                "systemctl {verb} {}",
                service.unit()
            )))
        } else {
            Err(format!(
                "systemctl {verb} {} failed: {}",
                service.unit(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

impl Executor for SystemExecutor {
    fn reload(&mut self, service: Service) -> Result<Outcome, String> {
        if let Some((pid, file)) = self.live_pid(service) {
            kill(Pid::from_raw(pid), Signal::SIGHUP)
                .map_err(|e| format!("sending SIGHUP to {} (pid {pid}): {e}", service.process()))?;
            return Ok(Outcome::Done(format!(
                "sent SIGHUP to {} (pid {pid} from {file})",
                service.process()
            )));
        }
        if self.has_systemd() {
            if !self.unit_active(service)? {
                return Ok(Outcome::NotRunning(format!(
                    "{}.service is not running: it reads the new config when it starts",
                    service.unit()
                )));
            }
            return self.run_systemctl("reload", service);
        }
        Ok(Outcome::NotRunning(format!(
            "{} is not running here (no live pid file, no systemd): it reads the new config when it starts",
            service.process()
        )))
    }

    fn restart(&mut self, service: Service) -> Result<Outcome, String> {
        if self.has_systemd() {
            if !self.unit_active(service)? {
                return Ok(Outcome::NotRunning(format!(
                    "{}.service is not running: it reads the new config when it starts",
                    service.unit()
                )));
            }
            return self.run_systemctl("restart", service);
        }
        if self.live_pid(service).is_none() && service != Service::Containerd {
            return Ok(Outcome::NotRunning(format!(
                "{} is not running here: it reads the new config when it starts",
                service.process()
            )));
        }
        if service == Service::Containerd && !self.root.exists("/run/containerd/containerd.sock") {
            return Ok(Outcome::NotRunning(
                "containerd is not running here: it reads the new config when it starts".into(),
            ));
        }
        Err(format!(
            "cannot restart {}: there is no systemd under the root; restart it yourself",
            service.process()
        ))
    }

    fn validate_daemon_json(&mut self, bytes: &[u8]) -> Option<Result<(), String>> {
        let bin = [
            "/usr/bin/dockerd",
            "/usr/local/bin/dockerd",
            "/usr/sbin/dockerd",
        ]
        .iter()
        .filter_map(|p| self.root.resolve(p).ok())
        .find(|p| p.is_file())?;
        let tmp = tempfile_path();
        std::fs::write(&tmp, bytes).ok()?;
        let out = Command::new(&bin)
            .args(["--validate", "--config-file"])
            .arg(&tmp)
            .output();
        let _ = std::fs::remove_file(&tmp);
        let out = out.ok()?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            return Some(Ok(()));
        }
        // A host binary that cannot run here, or predates --validate.
        if matches!(out.status.code(), Some(126 | 127))
            || stderr.contains("error while loading shared libraries")
            || stderr.contains("unknown flag")
        {
            return None;
        }
        Some(Err(stderr.trim().to_string()))
    }
}

fn tempfile_path() -> PathBuf {
    std::env::temp_dir().join(format!(
        "pullthrough-agent-daemon-json.{}.json",
        std::process::id()
    ))
}

/// `--docker-action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DockerActionArg {
    /// What the change needs (a restart only with live-restore on).
    Auto,
    /// At most a reload (SIGHUP), whatever changed.
    Reload,
    /// Restart dockerd when daemon.json changed, even without live-restore.
    Restart,
    /// Never touch dockerd; print what it would need.
    None,
}

/// What to do with a daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Nothing,
    Reload,
    Restart,
}

/// An action and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    pub reason: String,
}

/// daemon.json keys dockerd re-reads on SIGHUP.
pub const RELOADABLE_KEYS: &[&str] = &[
    REGISTRY_MIRRORS,
    INSECURE_REGISTRIES,
    "live-restore",
    "debug",
    "labels",
    "max-concurrent-downloads",
    "max-concurrent-uploads",
    "max-download-attempts",
    "shutdown-timeout",
    "default-runtime",
    "runtimes",
    "allow-nondistributable-artifacts",
];

/// What dockerd needs after a change: nothing for `/etc/hosts` and
/// certs.d (re-read on use), SIGHUP for reloadable daemon.json keys, a
/// restart for anything else, as `--docker-action` allows. Without
/// live-restore a restart would stop every container, so `auto` does not
/// restart then and says so.
pub fn decide_docker_action(
    changed_keys: &BTreeSet<String>,
    other_changes: bool,
    arg: DockerActionArg,
    live_restore: bool,
) -> Decision {
    let keys = changed_keys.iter().cloned().collect::<Vec<_>>().join(", ");
    let needed = if changed_keys.is_empty() {
        Action::Nothing
    } else if changed_keys
        .iter()
        .all(|k| RELOADABLE_KEYS.contains(&k.as_str()))
    {
        Action::Reload
    } else {
        Action::Restart
    };
    let d = |action, reason: String| Decision { action, reason };
    match (needed, arg) {
        (Action::Nothing, _) if other_changes => d(
            Action::Nothing,
            "only /etc/hosts and certs.d changed; dockerd re-reads them on use".into(),
        ),
        (Action::Nothing, _) => d(Action::Nothing, "no dockerd setting changed".into()),
        (_, DockerActionArg::None) => d(
            Action::Nothing,
            format!(
                "{keys} changed; --docker-action none: dockerd needs a {} to use it",
                if needed == Action::Reload {
                    "reload (SIGHUP)"
                } else {
                    "restart"
                }
            ),
        ),
        (_, DockerActionArg::Restart) => d(
            Action::Restart,
            format!("{keys} changed; restart requested (--docker-action restart)"),
        ),
        (Action::Restart, DockerActionArg::Reload) => d(
            Action::Reload,
            format!(
                "{keys} changed; --docker-action reload: settings outside SIGHUP's reach wait for the next restart"
            ),
        ),
        (Action::Reload, _) => d(Action::Reload, format!("{keys} changed (reloadable)")),
        (Action::Restart, _) if !live_restore => d(
            Action::Nothing,
            format!(
                "{keys} changed and need a restart, but live-restore is off: restarting dockerd would stop every container. Restart it yourself, or pass --docker-action restart"
            ),
        ),
        (Action::Restart, _) => d(
            Action::Restart,
            format!("{keys} changed (needs a restart; live-restore is on)"),
        ),
    }
}

/// Records what would have been done (tests, `--dry-run`).
#[derive(Debug, Default)]
pub struct RecordingExecutor {
    pub calls: Vec<String>,
    /// Answer `NotRunning` instead of `Done`.
    pub not_running: bool,
    /// `validate_daemon_json` answer.
    pub validation: Option<Result<(), String>>,
}

impl Executor for RecordingExecutor {
    fn reload(&mut self, service: Service) -> Result<Outcome, String> {
        self.calls.push(format!("reload {}", service.unit()));
        Ok(self.answer(service))
    }

    fn restart(&mut self, service: Service) -> Result<Outcome, String> {
        self.calls.push(format!("restart {}", service.unit()));
        Ok(self.answer(service))
    }

    fn validate_daemon_json(&mut self, _bytes: &[u8]) -> Option<Result<(), String>> {
        self.calls.push("validate daemon.json".into());
        self.validation.clone()
    }
}

impl RecordingExecutor {
    fn answer(&self, service: Service) -> Outcome {
        if self.not_running {
            Outcome::NotRunning(format!("{} not running", service.unit()))
        } else {
            Outcome::Done(format!("recorded for {}", service.unit()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(k: &[&str]) -> BTreeSet<String> {
        k.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn docker_action_table() {
        use Action::*;
        use DockerActionArg as A;
        let mirrors = keys(&[REGISTRY_MIRRORS]);
        let other = keys(&["storage-driver"]);
        let none = keys(&[]);
        for (changed, others, arg, live, want) in [
            (&none, true, A::Auto, false, Nothing),
            (&none, false, A::Restart, true, Nothing),
            (&mirrors, false, A::Auto, false, Reload),
            (&mirrors, false, A::Reload, false, Reload),
            (&mirrors, false, A::Restart, false, Restart),
            (&mirrors, false, A::None, true, Nothing),
            (&other, false, A::Auto, false, Nothing),
            (&other, false, A::Auto, true, Restart),
            (&other, false, A::Reload, false, Reload),
            (&other, false, A::Restart, false, Restart),
        ] {
            let d = decide_docker_action(changed, others, arg, live);
            assert_eq!(
                d.action, want,
                "{changed:?} {arg:?} live={live}: {}",
                d.reason
            );
        }
        let d = decide_docker_action(&other, false, A::Auto, false);
        assert!(d.reason.contains("live-restore is off"), "{}", d.reason);
        let d = decide_docker_action(&none, true, A::Auto, false);
        assert!(d.reason.contains("re-reads"), "{}", d.reason);
    }

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
                (Runtime::Docker, "/etc/docker"),
                (Runtime::Containerd, "/run/containerd/containerd.sock")
            ]
        );
    }

    #[test]
    fn stale_pid_files_signal_nobody() {
        let t = tempfile::tempdir().unwrap();
        let root = Root::new(t.path());
        std::fs::create_dir_all(t.path().join("var/run")).unwrap();
        // Our own pid: alive, but not a dockerd.
        std::fs::write(
            t.path().join("var/run/docker.pid"),
            std::process::id().to_string(),
        )
        .unwrap();
        let mut ex = SystemExecutor::new(root);
        assert!(matches!(
            ex.reload(Service::Docker).unwrap(),
            Outcome::NotRunning(_)
        ));
        assert!(ex.validate_daemon_json(b"{}").is_none());
    }
}

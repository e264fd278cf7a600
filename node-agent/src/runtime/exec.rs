//! The executor: how the agent reloads or restarts a daemon (signal through
//! its pid file, or systemctl in the host's namespaces), behind a trait so
//! tests record the calls instead of signalling anything.

use std::io::Write as _;
use std::path::Path;
use std::process::Command;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::error::ExecError;
use crate::fsio::Root;

/// Why `dockerd --validate` refused a daemon.json (its own words).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Rejected(pub String);

/// A daemon the agent may reload or restart (in the order the engine
/// acts on them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
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

    /// The daemon by its unit name.
    pub fn from_unit(unit: &str) -> Option<Service> {
        [Service::Docker, Service::Containerd, Service::Crio]
            .into_iter()
            .find(|s| s.unit() == unit)
    }

    /// The daemon's process name, as report lines name it.
    pub fn process(self) -> &'static str {
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
    fn reload(&mut self, service: Service) -> Result<Outcome, ExecError>;
    /// Restart the daemon.
    fn restart(&mut self, service: Service) -> Result<Outcome, ExecError>;
    /// `dockerd --validate` on a candidate daemon.json; `None` when no
    /// usable dockerd binary is there.
    fn validate_daemon_json(&mut self, bytes: &[u8]) -> Option<Result<(), Rejected>>;
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

    fn unit_active(&self, service: Service) -> Result<bool, ExecError> {
        let status = self
            .systemctl(&["is-active", "--quiet", service.unit()])
            .status()
            .map_err(|source| ExecError::Spawn {
                command: "systemctl".into(),
                source,
            })?;
        Ok(status.success())
    }

    fn run_systemctl(&self, verb: &str, service: Service) -> Result<Outcome, ExecError> {
        let command = format!("systemctl {verb} {}", service.unit());
        let out = self
            .systemctl(&[verb, service.unit()])
            .output()
            .map_err(|source| ExecError::Spawn {
                command: command.clone(),
                source,
            })?;
        if out.status.success() {
            Ok(Outcome::Done(command))
        } else {
            Err(ExecError::Failed {
                command,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }
}

impl Executor for SystemExecutor {
    fn reload(&mut self, service: Service) -> Result<Outcome, ExecError> {
        if let Some((pid, file)) = self.live_pid(service) {
            kill(Pid::from_raw(pid), Signal::SIGHUP).map_err(|source| ExecError::Signal {
                process: service.process(),
                pid,
                source,
            })?;
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

    fn restart(&mut self, service: Service) -> Result<Outcome, ExecError> {
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
        Err(ExecError::NoSystemd {
            process: service.process(),
        })
    }

    fn validate_daemon_json(&mut self, bytes: &[u8]) -> Option<Result<(), Rejected>> {
        let bin = [
            "/usr/bin/dockerd",
            "/usr/local/bin/dockerd",
            "/usr/sbin/dockerd",
        ]
        .iter()
        .filter_map(|p| self.root.resolve(p).ok())
        .find(|p| p.is_file())?;
        // Random name, O_EXCL: on a plain host /tmp is world-writable, and
        // a guessable name there would let anyone plant a link this root
        // process writes through. Removed on drop.
        let mut tmp = tempfile::Builder::new()
            .prefix("pullthrough-agent-daemon-json.")
            .suffix(".json")
            .tempfile()
            .ok()?;
        tmp.write_all(bytes).ok()?;
        let out = Command::new(&bin)
            .args(["--validate", "--config-file"])
            .arg(tmp.path())
            .output()
            .ok()?;
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
        Some(Err(Rejected(stderr.trim().to_string())))
    }
}

/// Records what would have been done (tests, `--dry-run`).
#[derive(Debug, Default)]
pub struct RecordingExecutor {
    pub calls: Vec<String>,
    /// Answer `NotRunning` instead of `Done`.
    pub not_running: bool,
    /// `validate_daemon_json` answer.
    pub validation: Option<Result<(), Rejected>>,
    /// Fail this many of the next reloads and restarts.
    pub fail: u32,
}

impl Executor for RecordingExecutor {
    fn reload(&mut self, service: Service) -> Result<Outcome, ExecError> {
        self.calls.push(format!("reload {}", service.unit()));
        self.answer(service)
    }

    fn restart(&mut self, service: Service) -> Result<Outcome, ExecError> {
        self.calls.push(format!("restart {}", service.unit()));
        self.answer(service)
    }

    fn validate_daemon_json(&mut self, _bytes: &[u8]) -> Option<Result<(), Rejected>> {
        self.calls.push("validate daemon.json".into());
        self.validation.clone()
    }
}

impl RecordingExecutor {
    fn answer(&mut self, service: Service) -> Result<Outcome, ExecError> {
        if self.fail > 0 {
            self.fail -= 1;
            return Err(ExecError::Failed {
                command: format!("systemctl {}", service.unit()),
                stderr: "recorded failure".into(),
            });
        }
        Ok(if self.not_running {
            Outcome::NotRunning(format!("{} not running", service.unit()))
        } else {
            Outcome::Done(format!("recorded for {}", service.unit()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

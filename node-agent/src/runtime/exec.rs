//! The executor: how the agent reloads or restarts a daemon (signal through
//! its pid file, or systemctl in the host's namespaces), behind a trait so
//! tests record the calls instead of signalling anything.

use std::io::{Read, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
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
    /// How systemd starts the daemon's unit: the output of `systemctl show
    /// <unit> -p ExecStart -p Environment -p EnvironmentFiles` (drop-ins
    /// included); `None` where there is no systemd to ask.
    fn unit_start(&mut self, _service: Service) -> Option<Result<String, ExecError>> {
        None
    }
}

/// How long one command the agent runs (`systemctl`, through `nsenter`
/// or not, and `dockerd --validate`) may take before it is killed and the
/// action counts as failed (retried by the next apply). docker.service
/// ships `TimeoutStartSec=0`, so `systemctl restart docker` alone could
/// wait for ever.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);

/// Signals daemons through their pid file under the root (checked against
/// `/proc/<pid>/comm`, so a stale pid file never signals a stranger), or
/// runs `systemctl` in the host's namespaces (`nsenter -t 1`) where the
/// root has systemd. Every command is bounded by [`COMMAND_TIMEOUT`].
pub struct SystemExecutor {
    root: Root,
    timeout: Duration,
    /// A stand-in for `systemctl` (tests).
    systemctl_bin: Option<PathBuf>,
}

impl SystemExecutor {
    pub fn new(root: Root) -> Self {
        Self {
            root,
            timeout: COMMAND_TIMEOUT,
            systemctl_bin: None,
        }
    }

    /// Bounds each command by `timeout` instead of [`COMMAND_TIMEOUT`].
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs `bin` where `systemctl` would run (tests).
    pub fn with_systemctl(mut self, bin: PathBuf) -> Self {
        self.systemctl_bin = Some(bin);
        self
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
        let mut cmd = if let Some(bin) = &self.systemctl_bin {
            Command::new(bin)
        } else if self.root.dir() == Path::new("/") {
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
        let out = run_bounded(
            self.systemctl(&["is-active", "--quiet", service.unit()]),
            &format!("systemctl is-active {}", service.unit()),
            self.timeout,
        )?;
        Ok(out.status.success())
    }

    fn run_systemctl(&self, verb: &str, service: Service) -> Result<Outcome, ExecError> {
        let command = format!("systemctl {verb} {}", service.unit());
        let out = run_bounded(
            self.systemctl(&[verb, service.unit()]),
            &command,
            self.timeout,
        )?;
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

    fn unit_start(&mut self, service: Service) -> Option<Result<String, ExecError>> {
        if !self.has_systemd() {
            return None;
        }
        let args = [
            "show",
            service.unit(),
            "-p",
            "ExecStart",
            "-p",
            "Environment",
            "-p",
            "EnvironmentFiles",
        ];
        let command = format!("systemctl {}", args.join(" "));
        Some(
            run_bounded(self.systemctl(&args), &command, self.timeout).and_then(|out| {
                if out.status.success() {
                    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
                } else {
                    Err(ExecError::Failed {
                        command,
                        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                    })
                }
            }),
        )
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
        let mut cmd = Command::new(&bin);
        cmd.args(["--validate", "--config-file"]).arg(tmp.path());
        let out = match run_bounded(cmd, "dockerd --validate", self.timeout) {
            Ok(out) => out,
            Err(e) => {
                tracing::warn!("daemon.json not validated: {e}");
                return None;
            }
        };
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

/// Runs `cmd` to its end or for `timeout` at most, collecting its output.
/// It runs in a process group of its own, all killed on timeout: `nsenter`
/// forks the `systemctl` it runs, which would outlive `nsenter` alone. (A
/// job systemd already took on goes on without the client.)
fn run_bounded(mut cmd: Command, command: &str, timeout: Duration) -> Result<Output, ExecError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().map_err(|source| ExecError::Spawn {
        command: command.to_string(),
        source,
    })?;
    // Read as it comes (a full pipe would stall the command), on threads
    // not waited for beyond the command's end: a straggler holding the
    // pipe open cannot hold the agent too.
    fn drain<R: Read + Send + 'static>(r: Option<R>) -> mpsc::Receiver<Vec<u8>> {
        let (tx, rx) = mpsc::channel();
        if let Some(mut r) = r {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = r.read_to_end(&mut buf);
                let _ = tx.send(buf);
            });
        }
        rx
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {
                let now = Instant::now();
                if now >= deadline {
                    if let Ok(pid) = i32::try_from(child.id()) {
                        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(ExecError::TimedOut {
                        command: command.to_string(),
                        after: timeout,
                    });
                }
                std::thread::sleep((deadline - now).min(Duration::from_millis(20)));
            }
            Err(source) => {
                return Err(ExecError::Spawn {
                    command: command.to_string(),
                    source,
                });
            }
        }
    };
    let collect =
        |rx: mpsc::Receiver<Vec<u8>>| rx.recv_timeout(Duration::from_secs(1)).unwrap_or_default();
    Ok(Output {
        status,
        stdout: collect(stdout),
        stderr: collect(stderr),
    })
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
    /// `unit_start` answer: `None` as without systemd, `Err` as a failed
    /// `systemctl show` (its stderr).
    pub unit_start: Option<Result<String, String>>,
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

    fn unit_start(&mut self, service: Service) -> Option<Result<String, ExecError>> {
        let answer = self.unit_start.clone()?;
        Some(answer.map_err(|stderr| ExecError::Failed {
            command: format!("systemctl show {}", service.unit()),
            stderr,
        }))
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

    /// Where the root has systemd, the unit's start is asked of
    /// `systemctl show` (what it prints is the answer; a failure is an
    /// error); without systemd there is nothing to ask.
    #[test]
    fn the_units_start_comes_from_systemctl_show() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let root = Root::new(t.path());
        let bin = t.path().join("systemctl");
        std::fs::write(&bin, "#!/bin/sh\necho \"ExecStart=$*\"\n").unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut ex = SystemExecutor::new(root.clone()).with_systemctl(bin.clone());
        assert!(ex.unit_start(Service::Docker).is_none());
        std::fs::create_dir_all(t.path().join("run/systemd/system")).unwrap();
        assert_eq!(
            ex.unit_start(Service::Docker).unwrap().unwrap(),
            "ExecStart=show docker -p ExecStart -p Environment -p EnvironmentFiles\n"
        );
        std::fs::write(&bin, "#!/bin/sh\necho 'no bus' >&2\nexit 1\n").unwrap();
        let e = ex.unit_start(Service::Docker).unwrap().unwrap_err();
        assert!(e.to_string().contains("no bus"), "{e}");
    }

    /// A stand-in for `systemctl` under `dir`: `is-active` says yes, any
    /// other verb starts a child that sleeps `secs` (its pid in
    /// `systemctl.pid`) and waits for it.
    pub fn slow_systemctl(dir: &Path, secs: u32) -> PathBuf {
        let bin = dir.join("systemctl");
        std::fs::write(
            &bin,
            format!(
                "#!/bin/sh\ncase \"$1\" in is-active) exit 0;; esac\nsleep {secs} &\necho $! > \"$0.pid\"\nwait\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        bin
    }

    /// docker.service has `TimeoutStartSec=0`: a restart that never ends
    /// is killed at the bound (with the child it started) and fails.
    #[test]
    fn a_command_past_its_bound_is_killed_and_fails() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("run/systemd/system")).unwrap();
        let bin = slow_systemctl(t.path(), 30);
        let mut ex = SystemExecutor::new(Root::new(t.path()))
            .with_timeout(Duration::from_millis(300))
            .with_systemctl(bin.clone());
        let start = Instant::now();
        let e = ex.restart(Service::Docker).unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(10), "{e}");
        assert!(
            e.to_string()
                .starts_with("systemctl restart docker did not finish within 300ms: killed it"),
            "{e}"
        );
        // The sleep it started went with it.
        let pid = std::fs::read_to_string(bin.with_extension("pid")).unwrap();
        let stat = format!("/proc/{}/stat", pid.trim());
        let gone = |s: &str| {
            std::fs::read_to_string(s).map_or(true, |st| {
                st.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
        };
        let until = Instant::now() + Duration::from_secs(5);
        while !gone(&stat) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(gone(&stat), "the command's child still runs");
    }

    /// A restart killed at the bound is a failed action: the apply says
    /// so and the restart stays owed, for the next apply (the run loop's,
    /// after its backoff) to try again.
    #[test]
    fn a_timed_out_restart_fails_the_apply_and_stays_owed() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("run/systemd/system")).unwrap();
        let bin = slow_systemctl(t.path(), 30);
        let root = Root::new(t.path());
        let cfg = crate::config::from_parts(
            b"proxy: {address: 10.0.0.5, httpPort: 80}\nregistries: [{host: quay.io}]\n",
            None,
        )
        .unwrap();
        let opts = crate::runtime::ApplyOptions {
            runtimes: Some(vec![crate::runtime::RuntimeKind::Containerd]),
            docker_action: crate::runtime::DockerActionArg::Auto,
            reload_settle: Duration::ZERO,
            dry_run: false,
            migrate_containerd_mirrors: false,
            hosts_gate_closed: false,
        };
        let mut ex = SystemExecutor::new(root.clone())
            .with_timeout(Duration::from_millis(300))
            .with_systemctl(bin);
        let e = crate::engine::apply(&root, &cfg, &opts, &mut ex, &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("containerd: systemctl restart containerd did not finish within 300ms"),
            "{e}"
        );
        let owed = crate::state::load(&root).unwrap().unwrap().pending_actions;
        assert_eq!(owed.len(), 1, "{owed:?}");
        assert_eq!(
            (owed[0].action.as_str(), owed[0].started),
            ("restart", false)
        );
    }
}

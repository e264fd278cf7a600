//! Child processes owned by a test: spawned with their output in a log file,
//! waited for by condition, stopped by PID (and process group) on drop.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

use crate::error::{Error, IoContext, Result};
use crate::net;

/// How long a stopped process gets to exit before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// A running process owned by the test; dropping it stops it.
pub struct Process {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Process {
    /// Starts `cmd` in a process group of its own with stdout and stderr
    /// appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: impl Into<PathBuf>) -> Result<Self> {
        let log = log.into();
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .ctx(|| format!("opening log {} for {name}", log.display()))?;
        let err = out
            .try_clone()
            .ctx(|| format!("duplicating log handle for {name}"))?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd.spawn().map_err(|source| Error::Spawn {
            name: name.to_string(),
            program: cmd.get_program().to_string_lossy().into_owned(),
            source,
        })?;
        Ok(Self {
            name: name.to_string(),
            child: Some(child),
            log,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The PID, or 0 once the process was stopped.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `bytes` of the log, for error messages.
    pub fn log_tail(&self, bytes: u64) -> String {
        tail(&self.log, bytes)
    }

    /// Fails with the log tail if the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            return Err(Error::Other(format!("{} was already stopped", self.name)));
        };
        match child.try_wait().ctx(|| format!("polling {}", self.name))? {
            None => Ok(()),
            Some(status) => Err(Error::Exited {
                name: self.name.clone(),
                status: status.to_string(),
                log: self.log.clone(),
                tail: tail(&self.log, 4000),
            }),
        }
    }

    /// Polls `ready` until true; fails early, with the log, if the process
    /// dies, and on timeout includes the log tail.
    pub fn wait_ready(
        &mut self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let res = net::wait_for(what, timeout, || {
            self.check_running()?;
            ready()
        });
        match res {
            Err(Error::Timeout { what, secs, .. }) => Err(Error::Timeout {
                what,
                secs,
                detail: format!("; log {}:\n{}", self.log.display(), self.log_tail(4000)),
            }),
            other => other,
        }
    }

    /// Sends `sig` to the process (not its group).
    pub fn signal(&self, sig: Signal) -> Result<()> {
        let pid = self.pid();
        if pid == 0 {
            return Err(Error::Other(format!("{} is not running", self.name)));
        }
        kill(Pid::from_raw(pid as i32), sig)
            .map_err(|e| Error::Other(format!("signalling {} ({pid}): {e}", self.name)))
    }

    /// SIGTERM, wait up to a grace period, then SIGKILL; then SIGKILL whatever
    /// is left of its process group (helpers it forked).
    pub fn stop(&mut self) -> Result<Option<ExitStatus>> {
        self.stop_within(STOP_GRACE)
    }

    /// [`Self::stop`] with a grace period of `grace` before the SIGKILL.
    pub fn stop_within(&mut self, grace: Duration) -> Result<Option<ExitStatus>> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        let pid = Pid::from_raw(child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    break child.wait().ok();
                }
            }
        };
        let _ = killpg(pid, Signal::SIGKILL);
        Ok(status)
    }

    /// SIGKILL at once (crash tests).
    pub fn kill(&mut self) -> Result<Option<ExitStatus>> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        let pid = Pid::from_raw(child.id() as i32);
        let _ = child.kill();
        let status = child.wait().ok();
        let _ = killpg(pid, Signal::SIGKILL);
        Ok(status)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn tail(path: &Path, bytes: u64) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(bytes)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// The last `bytes` of each process's log under a `--- name ---` header:
/// what a failing multi-process test prints.
pub fn log_tails(procs: &[Process], bytes: u64) -> String {
    procs
        .iter()
        .map(|p| format!("--- {} ---\n{}", p.name(), p.log_tail(bytes)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs `cmd` (stdin closed, stdout discarded) until it exits; returns its
/// exit code and stderr. A command expected to refuse its input and exit
/// must not hang a test when that regresses: past `limit` it is killed by
/// PID and this fails.
pub fn exit_within(cmd: &mut Command, limit: Duration) -> Result<(Option<i32>, String)> {
    let shown = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .ctx(|| format!("starting `{shown}`"))?;
    // Read while it runs: a full pipe would otherwise stall it.
    let mut stderr = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_string(&mut text);
        }
        text
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().ctx(|| format!("polling `{shown}`"))? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Timeout {
                what: format!("`{shown}` to exit"),
                secs: limit.as_secs_f64(),
                detail: String::new(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = reader.join().unwrap_or_default();
    Ok((status.code(), text))
}

/// Runs a command to completion; returns stdout, or an error with both
/// streams when it fails.
pub fn run(cmd: &mut Command) -> Result<String> {
    let shown = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .ctx(|| format!("running `{shown}`"))?;
    finish(shown, &out)
}

/// Runs a command to completion with `input` on stdin; stdout, or an error
/// with both streams.
pub fn run_stdin(cmd: &mut Command, input: &str) -> Result<String> {
    use std::io::Write;
    let shown = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ctx(|| format!("running `{shown}`"))?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| Error::Other(format!("no stdin for `{shown}`")))?;
    // Feed stdin from a thread so a child that writes a lot before reading
    // everything cannot deadlock against us. A child that succeeds without
    // reading all of its input (EPIPE) is its own business.
    let input = input.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child
        .wait_with_output()
        .ctx(|| format!("waiting for `{shown}`"))?;
    writer
        .join()
        .map_err(|_| Error::Other(format!("stdin writer for `{shown}` panicked")))?
        .ok();
    finish(shown, &out)
}

fn finish(shown: String, out: &std::process::Output) -> Result<String> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Command {
            command: shown,
            status: out.status.to_string(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        })
    }
}

/// The command line as a human would type it (for messages).
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

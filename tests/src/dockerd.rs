//! A real dockerd (Debian's docker.io 20.10) with its own data root, exec
//! root, pid file and socket, in a private mount namespace where a
//! test-owned directory is `/etc/docker` (so `daemon.json` and
//! `certs.d/<host>/ca.crt` are the test's) and a test-owned file is
//! `/etc/hosts`; optionally also inside a [`crate::ns::NetNs`].
//!
//! dockerd starts its own containerd (state under the exec root); it and
//! its shims are killed on drop. The namespace has a test-owned `/run` too,
//! because containerd 1.6 puts shim sockets under `/run/containerd/s`.
//!
//! Trap: dockerd treats a registry whose name resolves into 127.0.0.0/8 as
//! insecure (HTTPS without verification, then plain HTTP); a test about CA
//! trust needs [`DockerdOpts::netns`] and a non-loopback address there.

use std::ffi::OsStr;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use tempfile::TempDir;

use crate::containerd::kill_processes_using;
use crate::error::{Error, IoContext, Result};
use crate::ns::{MountNs, write_hosts_file};
use crate::process::{Process, run};
use crate::tools::system_tool;

/// dockerd plus its containerd take 1–5 s here; this bounds a broken start.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a SIGHUP reload may take to show in the log.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Start options.
#[derive(Debug, Clone, Default)]
pub struct DockerdOpts {
    /// `/etc/hosts` entries inside the namespace (e.g. quay.io → 127.0.0.1).
    pub hosts: Vec<(String, IpAddr)>,
    /// Initial `daemon.json` (default `{}`). Must not repeat a key that is
    /// also a command-line flag (storage-driver, data-root, …): dockerd
    /// refuses to start.
    pub daemon_json: Option<serde_json::Value>,
    /// Name of a network namespace ([`crate::ns::NetNs::name`]) to run in.
    pub netns: Option<String>,
    /// `--debug` (logs every registry endpoint it tries).
    pub debug: bool,
    /// Lay the config out as on a node under this host root (for the node
    /// agent's `--root`): `<root>/etc/docker` (seen as `/etc/docker`),
    /// `<root>/etc/hosts` (seen as `/etc/hosts`) and the pid file
    /// `<root>/var/run/docker.pid`. Default: everything in the temp dir.
    pub host_root: Option<PathBuf>,
}

impl DockerdOpts {
    /// Adds a hosts entry `name → ip`.
    pub fn host(mut self, name: &str, ip: IpAddr) -> Self {
        self.hosts.push((name.to_string(), ip));
        self
    }
}

/// A running dockerd; dropping it stops dockerd, kills its containerd,
/// shims and containers, and removes its files.
pub struct Dockerd {
    process: Option<Process>,
    socket: PathBuf,
    etc_docker: PathBuf,
    cli_config: PathBuf,
    // Last: removed after the processes are gone.
    dir: TempDir,
}

impl Dockerd {
    /// Starts dockerd and waits until the API answers on its socket.
    pub fn start(opts: DockerdOpts) -> Result<Self> {
        let dockerd = system_tool("dockerd")?;
        system_tool("docker")?;
        let dir = tempfile::Builder::new()
            .prefix("pt-dockerd-")
            .tempdir()
            .ctx(|| "creating dockerd temp dir".into())?;
        let d = dir.path();
        let (etc_docker, hosts, pidfile) = match &opts.host_root {
            None => (d.join("etc-docker"), d.join("hosts"), d.join("docker.pid")),
            Some(root) => (
                root.join("etc/docker"),
                root.join("etc/hosts"),
                root.join("var/run/docker.pid"),
            ),
        };
        if let Some(dir) = pidfile.parent() {
            std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
        }
        for sub in [
            etc_docker.join("certs.d"),
            d.join("data"),
            d.join("exec"),
            d.join("run"),
            d.join("cli"),
        ] {
            std::fs::create_dir_all(&sub).ctx(|| format!("creating {}", sub.display()))?;
        }
        let entries: Vec<(&str, IpAddr)> =
            opts.hosts.iter().map(|(n, ip)| (n.as_str(), *ip)).collect();
        write_hosts_file(&hosts, &entries)?;
        let daemon_json = etc_docker.join("daemon.json");
        let json = opts
            .daemon_json
            .clone()
            .unwrap_or_else(|| serde_json::json!({}));
        std::fs::write(&daemon_json, serde_json::to_vec_pretty(&json)?)
            .ctx(|| format!("writing {}", daemon_json.display()))?;

        let socket = d.join("docker.sock");
        let mut ns = MountNs::new()
            .bind(d.join("run"), "/run")
            .bind(&etc_docker, "/etc/docker")
            .hosts(&hosts);
        if let Some(name) = &opts.netns {
            ns = ns.in_netns(name);
        }
        let mut args: Vec<String> = vec![
            format!("--config-file={}", daemon_json.display()),
            "--storage-driver=vfs".into(),
            "--iptables=false".into(),
            "--ip-forward=false".into(),
            "--ip-masq=false".into(),
            "--bridge=none".into(),
            format!("--data-root={}", d.join("data").display()),
            format!("--exec-root={}", d.join("exec").display()),
            format!("--pidfile={}", pidfile.display()),
            format!("--host=unix://{}", socket.display()),
        ];
        if opts.debug {
            args.push("--debug".into());
        }
        let cmd = ns.command(&dockerd, &args)?;
        let mut process = Process::spawn("dockerd", cmd, d.join("dockerd.log"))?;

        let mut me = Self {
            process: None,
            socket,
            etc_docker,
            cli_config: d.join("cli"),
            dir,
        };
        process.wait_ready(
            &format!("dockerd on {}", me.socket.display()),
            READY_TIMEOUT,
            || {
                Ok(me.socket.exists()
                    && me
                        .docker_command(["version", "--format", "{{.Server.Version}}"])
                        .output()
                        .is_ok_and(|o| o.status.success()))
            },
        )?;
        me.process = Some(process);
        Ok(me)
    }

    /// The API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// What dockerd sees as `/etc/docker` (write `certs.d/<host>/ca.crt`
    /// here; dockerd re-reads it on every registry lookup).
    pub fn etc_docker(&self) -> &Path {
        &self.etc_docker
    }

    /// `/etc/docker/daemon.json` as dockerd sees it (its `--config-file`).
    pub fn daemon_json_path(&self) -> PathBuf {
        self.etc_docker.join("daemon.json")
    }

    /// Writes `<etc_docker>/certs.d/<host>/ca.crt`.
    pub fn write_ca(&self, host: &str, ca_pem: &str) -> Result<PathBuf> {
        let dir = self.etc_docker.join("certs.d").join(host);
        std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let path = dir.join("ca.crt");
        std::fs::write(&path, ca_pem).ctx(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.process.as_ref().map_or(0, Process::pid)
    }

    /// dockerd's log so far (its containerd's output included).
    pub fn log(&self) -> String {
        self.process.as_ref().map(Process::log).unwrap_or_default()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("dockerd.log")
    }

    /// SIGHUP: dockerd re-reads `daemon.json` (registry-mirrors,
    /// insecure-registries, …). Waits for the log line that reports the
    /// outcome; an error if the reload failed.
    pub fn reload(&mut self) -> Result<()> {
        const OK: &str = "Reloaded configuration";
        const FAILED: &str = "Error reloading configuration";
        let count = |log: &str| (log.matches(OK).count(), log.matches(FAILED).count());
        let before = count(&self.log());
        let process = self
            .process
            .as_mut()
            .ok_or_else(|| Error::Other("dockerd is not running".into()))?;
        process.signal(Signal::SIGHUP)?;
        let mut failed = false;
        process.wait_ready(
            "dockerd to reload its configuration",
            RELOAD_TIMEOUT,
            || {
                let now = count(&process_log(&self.dir)?);
                failed = now.1 > before.1;
                Ok(now.0 > before.0 || failed)
            },
        )?;
        if failed {
            return Err(Error::Other(format!(
                "dockerd failed to reload {}:\n{}",
                self.daemon_json_path().display(),
                self.process
                    .as_ref()
                    .map(|p| p.log_tail(2000))
                    .unwrap_or_default()
            )));
        }
        Ok(())
    }

    /// The docker CLI for this daemon: `-H unix://<socket>`, its own
    /// `DOCKER_CONFIG`, no inherited `DOCKER_*` settings. The CLI only talks
    /// to the socket (pulls are done by dockerd), so it runs outside the
    /// namespaces.
    pub fn docker_command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new("docker");
        for var in [
            "DOCKER_HOST",
            "DOCKER_CONTEXT",
            "DOCKER_TLS_VERIFY",
            "DOCKER_CERT_PATH",
            "DOCKER_API_VERSION",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("DOCKER_CONFIG", &self.cli_config)
            .env("DOCKER_CLI_HINTS", "false")
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args);
        cmd
    }

    /// Runs the docker CLI; returns stdout.
    pub fn docker<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run(&mut self.docker_command(args))
    }

    /// Stops dockerd (it stops its containers and containerd), then kills
    /// whatever is left. Idempotent; also done on drop.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut p) = self.process.take() {
            p.stop()?;
        }
        kill_processes_using(self.dir.path());
        Ok(())
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn process_log(dir: &TempDir) -> Result<String> {
    let path = dir.path().join("dockerd.log");
    std::fs::read(&path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .ctx(|| format!("reading {}", path.display()))
}

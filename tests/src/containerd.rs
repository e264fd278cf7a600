//! A real containerd (Debian's 1.6) with its own root, state, socket and
//! config, in a private mount namespace with a test-owned `/etc/hosts`; the
//! CRI plugin reads mirror config from a test-owned `certs.d` directory
//! (`registry.config_path`), exactly as the kubelet's pulls do on a node.
//!
//! Clients: `ctr` (pulls in the client, so it runs in the same namespace)
//! and `crictl` (the CRI path: containerd itself pulls).
//!
//! The namespace also has a test-owned `/run`: containerd 1.6 keeps shim
//! sockets (`/run/containerd/s`), ctr FIFOs and runc state under
//! `/run/containerd` regardless of its `state` setting.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

use crate::error::{Error, IoContext, Result};
use crate::net;
use crate::ns::{MountNs, write_hosts_file};
use crate::process::{Process, run};
use crate::tools::{go_tool, system_tool};

/// containerd boots in well under a second; this bounds a broken start.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Start options; `ContainerdOpts::default()` maps no names and uses overlayfs.
#[derive(Debug, Clone)]
pub struct ContainerdOpts {
    /// `/etc/hosts` entries inside the namespace (e.g. quay.io → 127.0.0.1).
    pub hosts: Vec<(String, IpAddr)>,
    /// The snapshotter for `ctr` and CRI (`overlayfs` or `native`).
    pub snapshotter: String,
    /// Lay the config out as on a node under this host root (for the node
    /// agent's `--root`): `<root>/etc/containerd/config.toml`,
    /// `<root>/etc/containerd/certs.d` (seen as `/etc/containerd` inside the
    /// namespace, so `config_path = "/etc/containerd/certs.d"`) and
    /// `<root>/etc/hosts`. Default: everything in the temp dir.
    pub host_root: Option<PathBuf>,
}

impl Default for ContainerdOpts {
    fn default() -> Self {
        Self {
            hosts: Vec::new(),
            snapshotter: "overlayfs".into(),
            host_root: None,
        }
    }
}

impl ContainerdOpts {
    /// Adds a hosts entry `name → ip`.
    pub fn host(mut self, name: &str, ip: IpAddr) -> Self {
        self.hosts.push((name.to_string(), ip));
        self
    }
}

/// A running containerd; dropping it stops containerd, kills its shims and
/// containers, and removes its files.
pub struct Containerd {
    process: Option<Process>,
    ns: MountNs,
    socket: PathBuf,
    config: PathBuf,
    certs_d: PathBuf,
    crictl_config: PathBuf,
    // Last: removed after the processes are gone.
    dir: TempDir,
}

impl Containerd {
    /// Writes `config.toml` (version 2) and starts containerd; waits until it
    /// answers on its socket with the CRI plugin loaded.
    pub fn start(opts: ContainerdOpts) -> Result<Self> {
        let containerd = system_tool("containerd")?;
        let dir = tempfile::Builder::new()
            .prefix("pt-containerd-")
            .tempdir()
            .ctx(|| "creating containerd temp dir".into())?;
        let d = dir.path();
        for sub in [
            "root",
            "state",
            "run",
            "certs.d",
            "opt",
            "cni/bin",
            "cni/net.d",
        ] {
            std::fs::create_dir_all(d.join(sub))
                .ctx(|| format!("creating {}", d.join(sub).display()))?;
        }
        let mut ns = MountNs::new().bind(d.join("run"), "/run");
        // (hosts file, config.toml, certs.d as on the machine, certs.d as
        // containerd sees it)
        let (hosts, config, certs_d, seen_certs_d) = match &opts.host_root {
            None => (
                d.join("hosts"),
                d.join("config.toml"),
                d.join("certs.d"),
                d.join("certs.d"),
            ),
            Some(root) => {
                let etc = root.join("etc/containerd");
                std::fs::create_dir_all(etc.join("certs.d"))
                    .ctx(|| format!("creating {}", etc.display()))?;
                ns = ns.bind(&etc, "/etc/containerd");
                (
                    root.join("etc/hosts"),
                    etc.join("config.toml"),
                    etc.join("certs.d"),
                    PathBuf::from("/etc/containerd/certs.d"),
                )
            }
        };
        let entries: Vec<(&str, IpAddr)> =
            opts.hosts.iter().map(|(n, ip)| (n.as_str(), *ip)).collect();
        write_hosts_file(&hosts, &entries)?;

        let socket = d.join("containerd.sock");
        std::fs::write(
            &config,
            config_toml(d, &socket, &opts.snapshotter, &seen_certs_d),
        )
        .ctx(|| "writing containerd config.toml".into())?;
        let crictl_config = d.join("crictl.yaml");
        let endpoint = format!("unix://{}", socket.display());
        std::fs::write(
            &crictl_config,
            format!(
                "runtime-endpoint: {endpoint}\nimage-endpoint: {endpoint}\ntimeout: 30\ndebug: false\npull-image-on-create: false\n"
            ),
        )
        .ctx(|| "writing crictl.yaml".into())?;

        let mut c = Self {
            process: None,
            // Private /run: see the module docs.
            ns: ns.hosts(hosts),
            socket,
            config,
            certs_d,
            crictl_config,
            dir,
        };
        c.spawn(&containerd)?;
        Ok(c)
    }

    fn spawn(&mut self, containerd: &Path) -> Result<()> {
        let cmd = self.ns.command(
            containerd,
            [OsStr::new("--config"), self.config.as_os_str()],
        )?;
        let mut process =
            Process::spawn("containerd", cmd, self.dir.path().join("containerd.log"))?;
        let socket = self.socket.clone();
        process.wait_ready(
            &format!("containerd on {}", socket.display()),
            READY_TIMEOUT,
            || {
                Ok(socket.exists()
                    && Command::new("ctr")
                        .arg("--address")
                        .arg(&socket)
                        .args(["--timeout", "2s", "version"])
                        .output()
                        .is_ok_and(|o| o.status.success()))
            },
        )?;
        let plugins = run(Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["plugins", "ls"]))?;
        let cri_ok = plugins.lines().any(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.first() == Some(&"io.containerd.grpc.v1")
                && cols.get(1) == Some(&"cri")
                && cols.last() == Some(&"ok")
        });
        if !cri_ok {
            return Err(Error::Other(format!(
                "containerd's CRI plugin did not load:\n{plugins}\nlog {}:\n{}",
                process.log_path().display(),
                process.log_tail(4000)
            )));
        }
        self.process = Some(process);
        Ok(())
    }

    /// Stops containerd (shims and containers keep running, as on a node)
    /// and starts it again with the current `config.toml`.
    pub fn restart(&mut self) -> Result<()> {
        if let Some(mut p) = self.process.take() {
            p.stop()?;
        }
        let containerd = system_tool("containerd")?;
        self.spawn(&containerd)
    }

    /// The gRPC socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `unix://<socket>`, for CRI clients.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The CRI plugin's `registry.config_path`: tests (and the node agent)
    /// write `<host>/hosts.toml` here; containerd re-reads it on every pull.
    pub fn certs_d(&self) -> PathBuf {
        self.certs_d.clone()
    }

    /// The `config.toml` containerd was started with (edit, then
    /// [`Containerd::restart`]).
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Sends `host`'s pulls to the mirror at `mirror` over HTTPS trusting
    /// `ca_pem` (`<certs.d>/<host>/proxy-ca.crt`), and nowhere else:
    /// `server` is a dead loopback port, so a fallback past the mirror
    /// fails. Returns the hosts.toml path.
    pub fn mirror_to(&self, host: &str, mirror: SocketAddr, ca_pem: &str) -> Result<PathBuf> {
        let dir = self.certs_d().join(host);
        std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let ca = dir.join("proxy-ca.crt");
        std::fs::write(&ca, ca_pem).ctx(|| format!("writing {}", ca.display()))?;
        self.write_hosts_toml(
            host,
            &format!(
                "server = \"https://127.0.0.1:1\"\n\n[host.\"https://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"{}\"\n",
                ca.display()
            ),
        )
    }

    /// Writes `<certs.d>/<host>/hosts.toml`.
    pub fn write_hosts_toml(&self, host: &str, toml: &str) -> Result<PathBuf> {
        let dir = self.certs_d().join(host);
        std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let path = dir.join("hosts.toml");
        std::fs::write(&path, toml).ctx(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.process.as_ref().map_or(0, Process::pid)
    }

    /// containerd's log so far.
    pub fn log(&self) -> String {
        self.process.as_ref().map(Process::log).unwrap_or_default()
    }

    /// `ctr --address <socket> ARGS` inside the namespace (ctr pulls in
    /// the client, so it must resolve names through the test hosts file).
    pub fn ctr_command<I, S>(&self, args: I) -> Result<Command>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut all = vec![
            OsStr::new("--address").to_os_string(),
            self.socket.as_os_str().to_os_string(),
        ];
        all.extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self.ns.command("ctr", all)
    }

    /// Runs `ctr`; returns stdout.
    pub fn ctr<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run(&mut self.ctr_command(args)?)
    }

    /// `crictl` against this containerd (its own config file, so nothing
    /// from `/etc/crictl.yaml` applies). It runs outside the namespace: CRI
    /// pulls are done by containerd.
    pub fn crictl_command<I, S>(&self, args: I) -> Result<Command>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(go_tool("crictl")?);
        let endpoint = self.endpoint();
        cmd.env_remove("CONTAINER_RUNTIME_ENDPOINT")
            .env_remove("IMAGE_SERVICE_ENDPOINT")
            .env_remove("CRI_CONFIG_FILE")
            .arg("--config")
            .arg(&self.crictl_config)
            .args(["--runtime-endpoint", &endpoint])
            .args(["--image-endpoint", &endpoint])
            .args(["--timeout", "30s"])
            .args(args);
        Ok(cmd)
    }

    /// Runs `crictl`; returns stdout.
    pub fn crictl<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run(&mut self.crictl_command(args)?)
    }

    /// Stops containerd, then kills what it left running (shims,
    /// containers). Idempotent; also done on drop.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut p) = self.process.take() {
            p.stop()?;
        }
        kill_processes_using(self.dir.path());
        Ok(())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The `disabled_plugins` line of every test containerd: snapshotters that
/// cannot work here and tracing; disabling them only quiets the log.
pub(crate) const DISABLED_PLUGINS: &str = r#"disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]"#;

fn config_toml(dir: &Path, socket: &Path, snapshotter: &str, certs_d: &Path) -> String {
    let p = |sub: &str| dir.join(sub).display().to_string();
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
{DISABLED_PLUGINS}

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{opt}"
  [plugins."io.containerd.grpc.v1.cri"]
    disable_tcp_service = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "{snapshotter}"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "{cni_bin}"
      conf_dir = "{cni_conf}"
    [plugins."io.containerd.grpc.v1.cri".registry]
      config_path = "{certs_d}"
"#,
        root = p("root"),
        state = p("state"),
        socket = socket.display(),
        opt = p("opt"),
        cni_bin = p("cni/bin"),
        cni_conf = p("cni/net.d"),
        certs_d = certs_d.display(),
    )
}

/// SIGKILLs every process whose command line mentions `dir` (a test's own
/// temp dir: daemons' shims, conmon, dockerd's containerd), plus all their
/// descendants (containers), and waits until they are gone. Returns how many
/// it killed. Processes are picked by PID from `/proc`, never by name.
pub(crate) fn kill_processes_using(dir: &Path) -> usize {
    let needle = dir.as_os_str().as_bytes();
    if needle.len() < 8 {
        return 0; // never match something as broad as "/" or "/tmp"
    }
    let me = std::process::id();
    let procs = list_processes();
    let mut doomed: BTreeSet<u32> = procs
        .iter()
        .filter(|p| p.pid != me && p.cmdline.windows(needle.len()).any(|w| w == needle))
        .map(|p| p.pid)
        .collect();
    loop {
        let before = doomed.len();
        for p in &procs {
            if p.pid != me && doomed.contains(&p.ppid) {
                doomed.insert(p.pid);
            }
        }
        if doomed.len() == before {
            break;
        }
    }
    for pid in &doomed {
        let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
    }
    let _ = net::wait_for(
        "killed test processes to exit",
        Duration::from_secs(10),
        || Ok(doomed.iter().all(|pid| !is_alive(*pid))),
    );
    doomed.len()
}

struct ProcInfo {
    pid: u32,
    ppid: u32,
    cmdline: Vec<u8>,
}

fn list_processes() -> Vec<ProcInfo> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (_, rest) = stat.rsplit_once(')')?;
            let ppid = rest.split_whitespace().nth(1)?.parse().ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            Some(ProcInfo { pid, ppid, cmdline })
        })
        .collect()
}

/// True while `pid` exists and is not a zombie.
fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

//! Rootful podman (Debian's 4.3) as the client of containers/image, the
//! library CRI-O pulls with: it reads `registries.conf`,
//! `registries.conf.d/*.conf` mirrors and `certs.d/<host[:port]>/ca.crt`
//! exactly as CRI-O does.
//!
//! Every `podman` invocation runs in a fresh private mount namespace where a
//! test-owned directory is `/etc/containers`, a test-owned file is
//! `/etc/hosts`, and test-owned directories are `/run`, `/dev/shm` (the
//! libpod lock segment) and `/var/lib/containers` (auth files, the
//! blob-info cache); storage is vfs under the test's temp dir. There is no daemon: leftover `conmon` and
//! container processes (from `run -d`) are killed on drop.

use std::ffi::{OsStr, OsString};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use crate::containerd::kill_processes_using;
use crate::error::{IoContext, Result};
use crate::ns::{MountNs, write_hosts_file};
use crate::process::run;
use crate::tools::system_tool;

/// What `podman run`/`create` need on this machine (the default limits
/// exceed what the sandbox allows).
pub const RUN_ULIMITS: [&str; 4] = [
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
];

/// Options for [`Podman::new`].
#[derive(Debug, Clone, Default)]
pub struct PodmanOpts {
    /// `/etc/hosts` entries inside the namespace (e.g. quay.io → 127.0.0.1).
    pub hosts: Vec<(String, IpAddr)>,
    /// Lay the config out as on a node under this host root (for the node
    /// agent's `--root`): `<root>/etc/containers` (seen as
    /// `/etc/containers`) and `<root>/etc/hosts`. Default: the temp dir.
    pub host_root: Option<PathBuf>,
}

impl PodmanOpts {
    /// Adds a hosts entry `name → ip`.
    pub fn host(mut self, name: &str, ip: IpAddr) -> Self {
        self.hosts.push((name.to_string(), ip));
        self
    }
}

/// A podman "installation" of the test's own: config, storage and state.
pub struct Podman {
    ns: MountNs,
    etc: PathBuf,
    global: Vec<OsString>,
    tmp: PathBuf,
    // Last: removed after the processes are gone.
    dir: TempDir,
}

impl Podman {
    /// Writes `/etc/containers` (registries.conf with no search registries,
    /// an empty registries.conf.d/, certs.d/, a policy.json accepting
    /// anything, storage.conf for vfs) and the hosts file.
    pub fn new(opts: PodmanOpts) -> Result<Self> {
        system_tool("podman")?;
        let dir = tempfile::Builder::new()
            .prefix("pt-podman-")
            .tempdir()
            .ctx(|| "creating podman temp dir".into())?;
        let d = dir.path();
        let etc = match &opts.host_root {
            None => d.join("etc-containers"),
            Some(root) => root.join("etc/containers"),
        };
        for sub in [
            etc.join("registries.conf.d"),
            etc.join("certs.d"),
            etc.join("networks"),
            d.join("root"),
            d.join("runroot"),
            d.join("libpod-tmp"),
            d.join("tmp"),
            d.join("run"),
            d.join("var-lib-containers"),
            d.join("home"),
            d.join("shm"),
        ] {
            std::fs::create_dir_all(&sub).ctx(|| format!("creating {}", sub.display()))?;
        }
        let write = |path: PathBuf, text: String| {
            std::fs::write(&path, text).ctx(|| format!("writing {}", path.display()))
        };
        write(
            etc.join("registries.conf"),
            "unqualified-search-registries = []\nshort-name-mode = \"disabled\"\n".into(),
        )?;
        write(
            etc.join("policy.json"),
            r#"{"default": [{"type": "insecureAcceptAnything"}]}"#.to_string() + "\n",
        )?;
        write(
            etc.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\nrunroot = \"{}\"\ngraphroot = \"{}\"\n",
                d.join("runroot").display(),
                d.join("root").display()
            ),
        )?;
        let hosts = match &opts.host_root {
            None => d.join("hosts"),
            Some(root) => root.join("etc/hosts"),
        };
        let entries: Vec<(&str, IpAddr)> =
            opts.hosts.iter().map(|(n, ip)| (n.as_str(), *ip)).collect();
        write_hosts_file(&hosts, &entries)?;

        let ns = MountNs::new()
            .bind(d.join("run"), "/run")
            // Rootful podman's lock segment is /dev/shm/libpod_lock, shared
            // by every podman on the machine unless /dev/shm is private.
            .bind(d.join("shm"), "/dev/shm")
            .bind(d.join("var-lib-containers"), "/var/lib/containers")
            .bind(&etc, "/etc/containers")
            .hosts(hosts);
        let mut global: Vec<OsString> = Vec::new();
        let mut flag = |name: &str, value: &Path| {
            global.push(name.into());
            global.push(value.into());
        };
        flag("--root", &d.join("root"));
        flag("--runroot", &d.join("runroot"));
        flag("--tmpdir", &d.join("libpod-tmp"));
        flag("--network-config-dir", &etc.join("networks"));
        for f in [
            "--storage-driver",
            "vfs",
            "--events-backend",
            "file",
            "--cgroup-manager",
            "cgroupfs",
        ] {
            global.push(f.into());
        }
        Ok(Self {
            ns,
            tmp: d.join("tmp"),
            etc,
            global,
            dir,
        })
    }

    /// What podman sees as `/etc/containers`.
    pub fn etc_containers(&self) -> &Path {
        &self.etc
    }

    /// `/etc/containers/registries.conf.d` (drop-ins, read in name order).
    pub fn registries_d(&self) -> PathBuf {
        self.etc.join("registries.conf.d")
    }

    /// `/etc/containers/certs.d` (`<host[:port]>/ca.crt`).
    pub fn certs_d(&self) -> PathBuf {
        self.etc.join("certs.d")
    }

    /// Writes `certs.d/<host_port>/ca.crt`.
    pub fn write_ca(&self, host_port: &str, ca_pem: &str) -> Result<PathBuf> {
        let dir = self.certs_d().join(host_port);
        std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let path = dir.join("ca.crt");
        std::fs::write(&path, ca_pem).ctx(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Writes `registries.conf.d/<name>`.
    pub fn write_registries_conf(&self, name: &str, toml: &str) -> Result<PathBuf> {
        let path = self.registries_d().join(name);
        std::fs::write(&path, toml).ctx(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `podman <test-owned global flags> ARGS` in a fresh namespace. For
    /// `run` and `create`, [`RUN_ULIMITS`] are inserted after the
    /// subcommand.
    pub fn podman_command<I, S>(&self, args: I) -> Result<Command>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut all = self.global.clone();
        let mut args = args.into_iter().map(|a| a.as_ref().to_os_string());
        if let Some(sub) = args.next() {
            let needs_ulimits = sub == "run" || sub == "create";
            all.push(sub);
            if needs_ulimits {
                all.extend(RUN_ULIMITS.iter().map(OsString::from));
            }
        }
        all.extend(args);
        let mut cmd = self.ns.command("podman", all)?;
        for var in [
            "CONTAINERS_CONF",
            "CONTAINERS_REGISTRIES_CONF",
            "REGISTRIES_CONFIG_PATH",
            "CONTAINERS_STORAGE_CONF",
            "REGISTRY_AUTH_FILE",
            "CONTAINER_HOST",
            "CONTAINER_CONNECTION",
            "XDG_RUNTIME_DIR",
            "XDG_CONFIG_HOME",
        ] {
            cmd.env_remove(var);
        }
        // Blob downloads are staged in $TMPDIR (default /var/tmp); no
        // ~/.config/containers of the machine's root user.
        cmd.env("TMPDIR", &self.tmp)
            .env("HOME", self.dir.path().join("home"));
        Ok(cmd)
    }

    /// Runs podman; returns stdout.
    pub fn podman<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run(&mut self.podman_command(args)?)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        kill_processes_using(self.dir.path());
    }
}

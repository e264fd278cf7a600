//! Private namespaces, so daemons see test-owned `/etc/hosts`, `/etc/docker`,
//! `/etc/containers` and never the machine's own files, and (optionally) a
//! network namespace whose addresses exist nowhere else.

use std::ffi::OsStr;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::{Error, IoContext, Result};
use crate::process::run;

/// Writes a hosts file that maps each name to its address, plus localhost.
pub fn write_hosts_file(path: &Path, entries: &[(&str, IpAddr)]) -> Result<()> {
    let mut text = String::from("127.0.0.1 localhost\n::1 localhost ip6-localhost\n");
    for (name, ip) in entries {
        text.push_str(&format!("{ip} {name}\n"));
    }
    std::fs::write(path, text).ctx(|| format!("writing hosts file {}", path.display()))
}

/// Builds commands that run in a private mount namespace with bind mounts
/// over chosen paths (e.g. `/etc/hosts`). The machine's files are untouched:
/// the mounts exist only inside the namespace and die with it.
#[derive(Debug, Clone, Default)]
pub struct MountNs {
    binds: Vec<(PathBuf, PathBuf)>,
    netns: Option<String>,
}

impl MountNs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Shows `hosts_file` as `/etc/hosts` inside.
    pub fn hosts(self, hosts_file: impl Into<PathBuf>) -> Self {
        self.bind(hosts_file, "/etc/hosts")
    }

    /// Shows `src` at `dst` inside. `dst` must already exist on the machine:
    /// creating it would change the real filesystem.
    pub fn bind(mut self, src: impl Into<PathBuf>, dst: impl Into<PathBuf>) -> Self {
        self.binds.push((src.into(), dst.into()));
        self
    }

    /// Also enter the named network namespace (see [`NetNs`]).
    pub fn in_netns(mut self, name: &str) -> Self {
        self.netns = Some(name.to_string());
        self
    }

    /// A command running `program args...` inside the namespace. The process
    /// execs into `program`, so its PID is the program's own.
    pub fn command<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<Command>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        for (src, dst) in &self.binds {
            if !src.exists() {
                return Err(Error::Other(format!(
                    "bind source {} does not exist",
                    src.display()
                )));
            }
            if !dst.exists() {
                return Err(Error::Other(format!(
                    "bind target {} does not exist on this machine (install the package that owns it)",
                    dst.display()
                )));
            }
        }
        let mut script = String::from("set -e\n");
        let mut n = 0;
        for _ in &self.binds {
            // `${N}`: plain `$10` would be `$1` followed by `0`.
            script.push_str(&format!(
                "mount --bind \"${{{}}}\" \"${{{}}}\"\n",
                n + 1,
                n + 2
            ));
            n += 2;
        }
        script.push_str(&format!("shift {n}\nexec \"$@\"\n"));

        let mut cmd = match &self.netns {
            // Not `ip netns exec`: it remounts /sys, which hides the
            // cgroup mounts that dockerd and runc need.
            Some(name) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{name}")).arg("unshare");
                c
            }
            None => Command::new("unshare"),
        };
        cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(script)
            .arg("sh");
        for (src, dst) in &self.binds {
            cmd.arg(src).arg(dst);
        }
        cmd.arg(program.as_ref());
        cmd.args(args);
        Ok(cmd)
    }
}

/// A network namespace created by the test, with loopback up and a dummy
/// interface carrying addresses that exist only inside it. Deleted on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `pt-<pid>-<n>` with `lo` up and a dummy interface `pt0`
    /// carrying `addrs` (host prefixes, e.g. 10.254.0.1); on `lo` where
    /// the kernel has no dummy driver.
    pub fn create(addrs: &[IpAddr]) -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "pt-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        // Kernels without the dummy driver (this sandbox's) get the
        // addresses on `lo`, which is just as private to the namespace.
        let dev = match ns.ip(&["link", "add", "pt0", "type", "dummy"]) {
            Ok(_) => "pt0",
            Err(_) => "lo",
        };
        for addr in addrs {
            let prefix = if addr.is_ipv4() { 32 } else { 128 };
            ns.ip(&["addr", "add", &format!("{addr}/{prefix}"), "dev", dev])?;
        }
        ns.ip(&["link", "set", dev, "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// A command run inside the namespace (no private mounts).
    pub fn command<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name])
            .arg(program)
            .args(args);
        c
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = run(Command::new("ip").args(["netns", "del", &self.name]));
    }
}

//! Private namespaces, so daemons see test-owned `/etc/hosts`, `/etc/docker`,
//! `/etc/containers` and never the machine's own files, and (optionally) a
//! network namespace whose addresses exist nowhere else.

use std::ffi::OsStr;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
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

/// A tmpfs of `size` (e.g. `8m`) mounted on a test's directory, so the
/// test can fill the filesystem a program writes to; lazily unmounted on
/// drop. (Mounted on the test's own temp dir: the program under test must
/// see it without entering a namespace.)
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Result<Self> {
        std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir))?;
        Ok(Self(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
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

    /// True when `ip` is one of the namespace's addresses.
    pub fn has_addr(&self, ip: IpAddr) -> Result<bool> {
        netns_has_addr(&self.name, ip)
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

/// `program args...` in the network namespace `name` and nothing else: the
/// mounts (and `/sys`) stay the machine's, unlike `ip netns exec`. nsenter
/// execs into `program` (it forks only for a PID namespace), so the PID is
/// the program's own and stopping it by PID works as for any process.
pub fn netns_command<I, S>(name: &str, program: impl AsRef<OsStr>, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{name}"))
        .arg("--")
        .arg(program)
        .args(args);
    c
}

/// `program args...` in the network namespace `name` when given, else as
/// is: for helpers that serve either on the machine's loopback or inside a
/// test's namespace.
pub fn maybe_in_netns<I, S>(name: Option<&str>, program: impl AsRef<OsStr>, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    match name {
        Some(name) => netns_command(name, program, args),
        None => {
            let mut c = Command::new(program);
            c.args(args);
            c
        }
    }
}

/// The HTTP status `url` answers with, asked from inside the network
/// namespace `name` (busybox wget, from busybox-static); `None` when nothing
/// answers. The server certificate is not checked: this is a readiness
/// probe, never a trust test.
pub fn netns_http_status(name: &str, url: &str) -> Option<u16> {
    netns_http_status_with(name, url, &[])
}

/// [`netns_http_status`] with extra request `headers` (`"Name: value"`).
pub fn netns_http_status_with(name: &str, url: &str, headers: &[&str]) -> Option<u16> {
    // busybox wget's own `-T` crashes on this machine: bound it with timeout(1).
    let mut args = vec![
        "5",
        "busybox",
        "wget",
        "-S",
        "-q",
        "--no-check-certificate",
        "-O",
        "/dev/null",
    ];
    for h in headers {
        args.extend(["--header", h]);
    }
    args.push(url);
    let out = netns_command(name, "timeout", args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    // `-S` prints each status line ("  HTTP/1.1 401 Unauthorized") on
    // stderr, also when the status is an error; the last one counts.
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .rev()
        .find_map(|l| {
            l.trim_start()
                .strip_prefix("HTTP/")?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
}

/// True when the network namespace `name` has the address `ip`.
pub fn netns_has_addr(name: &str, ip: IpAddr) -> Result<bool> {
    let out = run(Command::new("ip").args(["-n", name, "-o", "addr", "show"]))?;
    Ok(has_addr(&out, ip))
}

/// True when `ip -o addr show` output lists `ip`.
fn has_addr(ip_o_addr: &str, ip: IpAddr) -> bool {
    let needle = format!(" {ip}/");
    ip_o_addr.lines().any(|l| l.contains(&needle))
}

/// Asserts that a server address is private to the test: loopback, or an
/// address that exists in the test's network namespace `netns` and not on
/// the machine. (Loopback inside a namespace is that namespace's own.)
pub fn assert_private_addr(addr: SocketAddr, netns: Option<&str>) -> Result<()> {
    if addr.ip().is_loopback() {
        return Ok(());
    }
    let Some(name) = netns else {
        return Err(Error::Other(format!("{addr} is not a loopback address")));
    };
    if !netns_has_addr(name, addr.ip())? {
        return Err(Error::Other(format!(
            "{addr} is neither loopback nor an address of network namespace {name}"
        )));
    }
    let host = run(Command::new("ip").args(["-o", "addr", "show"]))?;
    if has_addr(&host, addr.ip()) {
        return Err(Error::Other(format!(
            "{} exists on the machine too, not only in network namespace {name}",
            addr.ip()
        )));
    }
    Ok(())
}

//! Shared set-up for the agent's tests against real runtimes: the agent
//! binary (run in a private mount namespace, see [`agent_command`]), the
//! proxy binary, an upstream holding fixtures, snapshots of a root tree.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use pullthrough_testbed::fixtures::{Image, LayoutBuilder};
use pullthrough_testbed::net::{is_listening, wait_for};
use pullthrough_testbed::ns::MountNs;
use pullthrough_testbed::proxy::{Addrs, Proxy};
use pullthrough_testbed::registry::Registry;

pub const QUAY_IMAGE: &str = "quay.io/fixture/busybox:1";

pub fn agent_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_pullthrough-agent"))
}

pub fn proxy_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| pullthrough_testbed::proxy::proxy_bin().unwrap())
}

/// `pullthrough-agent ARGS` in a private mount namespace (optionally also
/// in a network namespace) where `<root>/etc/hosts` is bind-mounted onto
/// itself. A daemon of the test bed sees that file through a bind mount of
/// its own, which pins the inode: an atomic rename would leave the daemon
/// with the old content. Over a mount point the rename fails with EBUSY and
/// the agent writes in place — its path for `/etc/hosts` inside a container,
/// and what the daemon then sees at once.
pub fn agent_command<I, S>(root: &Path, netns: Option<&str>, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let hosts = root.join("etc/hosts");
    let mut ns = MountNs::new();
    if hosts.exists() {
        ns = ns.bind(&hosts, &hosts);
    }
    if let Some(n) = netns {
        ns = ns.in_netns(n);
    }
    ns.command(agent_bin(), args).unwrap()
}

/// Runs the agent to completion; panics with its output unless it exits 0.
pub fn agent(root: &Path, netns: Option<&str>, args: &[&str]) -> String {
    let out = agent_command(root, netns, args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "agent {args:?} failed: {text}");
    text
}

/// Every file (bytes + mode) and directory (mode) under `dir`.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (Option<Vec<u8>>, u32)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(dir).unwrap().to_path_buf();
            if m.is_dir() {
                out.insert(rel, (None, m.permissions().mode()));
                stack.push(p);
            } else {
                out.insert(rel, (Some(fs::read(&p).unwrap()), m.permissions().mode()));
            }
        }
    }
    out
}

/// Asserts two snapshots are equal, naming the paths that differ.
pub fn assert_same_tree(
    before: &BTreeMap<PathBuf, (Option<Vec<u8>>, u32)>,
    after: &BTreeMap<PathBuf, (Option<Vec<u8>>, u32)>,
) {
    let mut diff = Vec::new();
    for (p, v) in before {
        match after.get(p) {
            None => diff.push(format!("gone: {}", p.display())),
            Some(w) if w != v => diff.push(format!(
                "changed: {} ({:?} -> {:?})",
                p.display(),
                v.0.as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned()),
                w.0.as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
            )),
            _ => {}
        }
    }
    for p in after.keys() {
        if !before.contains_key(p) {
            diff.push(format!("new: {}", p.display()));
        }
    }
    assert!(diff.is_empty(), "trees differ:\n{}", diff.join("\n"));
}

/// An upstream registry with the runnable busybox pushed as each of `repos`
/// (tag `1`).
pub struct Upstream {
    pub registry: Registry,
    pub busybox: Image,
    _work: tempfile::TempDir,
}

pub fn upstream(registry: Registry, repos: &[&str]) -> Upstream {
    let work = tempfile::tempdir().unwrap();
    let busybox = LayoutBuilder::new(work.path())
        .unwrap()
        .busybox("busybox")
        .unwrap();
    for repo in repos {
        registry.push_image(&busybox, repo, "1").unwrap();
    }
    Upstream {
        registry,
        busybox,
        _work: work,
    }
}

/// A plain upstream holding `fixture/busybox:1` and a proxy on loopback
/// serving it as quay.io.
pub fn quay_behind_proxy() -> (Upstream, Proxy) {
    let up = upstream(Registry::plain().unwrap(), &["fixture/busybox"]);
    let proxy = Proxy::start(
        proxy_bin(),
        Addrs::localhost().unwrap(),
        &format!(
            "registries:\n  - host: quay.io\n    upstream: {}\n",
            up.registry.url()
        ),
    )
    .unwrap();
    (up, proxy)
}

/// A loopback address where nothing listens on 443 or 80: names mapped
/// here fail instead of reaching anything.
pub fn dead_loopback() -> IpAddr {
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    for port in [443, 80] {
        assert!(!is_listening(SocketAddr::new(ip, port)));
    }
    ip
}

/// Writes the agent's config (and the CA next to it) into `dir`; returns
/// its path.
pub fn write_agent_config(dir: &Path, yaml: &str, ca_pem: Option<&str>) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    if let Some(pem) = ca_pem {
        fs::write(dir.join("ca.crt"), pem).unwrap();
    }
    let path = dir.join("agent.yaml");
    let tmp = dir.join("agent.yaml.tmp");
    fs::write(&tmp, yaml).unwrap();
    fs::rename(&tmp, &path).unwrap();
    path
}

/// Rewrites `path` in place (same inode), as a bind-mounted file must be.
pub fn write_in_place(path: &Path, bytes: &[u8]) {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
}

/// Waits up to `timeout` for `cond`, panicking with `what`.
pub fn wait(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    wait_for(what, timeout, || Ok(cond())).unwrap_or_else(|e| panic!("{e}"));
}

/// A live (not zombie) process's command line, space separated.
pub fn cmdline(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let state = stat.rsplit_once(") ")?.1.chars().next()?;
    if state == 'Z' || state == 'X' {
        return None;
    }
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// Asserts that no process mentions any of `dirs` and no namespace in
/// `netns` is left (after every handle was dropped).
pub fn assert_all_gone(dirs: &[PathBuf], netns: &[String]) {
    let mut left = Vec::new();
    let ok = wait_for("test processes to be gone", Duration::from_secs(10), || {
        left.clear();
        let me = std::process::id();
        for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if pid == me {
                continue;
            }
            let Some(cmd) = cmdline(pid) else { continue };
            for d in dirs {
                if cmd.contains(&*d.to_string_lossy()) {
                    left.push(format!("pid {pid}: {cmd}"));
                }
            }
        }
        let list = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for n in netns {
            if list.split_whitespace().any(|w| w == n) {
                left.push(format!("netns {n}"));
            }
        }
        Ok(left.is_empty())
    });
    assert!(ok.is_ok(), "left behind: {left:#?}");
}

/// Runs `pull` until it succeeds, for up to 10 s: Go programs (dockerd)
/// cache `/etc/hosts` for 5 s, so a change shows a moment later.
pub fn pull_retrying(mut pull: impl FnMut() -> pullthrough_testbed::Result<String>) {
    let t = std::time::Instant::now();
    loop {
        match pull() {
            Ok(_) => return,
            Err(e) if t.elapsed() > Duration::from_secs(10) => panic!("{e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

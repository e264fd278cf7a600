//! Shared set-up for the proxy's component tests: a real upstream holding
//! fixtures, and the proxy binary in front of it.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pullthrough_testbed::fixtures::{Image, LayoutBuilder};
use pullthrough_testbed::proxy::{Addrs, Proxy};
use pullthrough_testbed::registry::Registry;

pub fn proxy_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_pullthrough-proxy"))
}

/// An upstream registry with `fixture/busybox:1` (runnable) pushed.
pub struct Upstream {
    pub registry: Registry,
    pub busybox: Image,
    _work: tempfile::TempDir,
}

pub fn upstream(registry: Registry) -> Upstream {
    upstream_at(registry, "fixture/busybox")
}

/// An upstream registry with the runnable busybox pushed as `repo:1`
/// (also into a registry inside a network namespace).
pub fn upstream_at(registry: Registry, repo: &str) -> Upstream {
    let work = tempfile::tempdir().unwrap();
    let busybox = LayoutBuilder::new(work.path())
        .unwrap()
        .busybox("busybox")
        .unwrap();
    registry.push_image(&busybox, repo, "1").unwrap();
    Upstream {
        registry,
        busybox,
        _work: work,
    }
}

/// Config body with one registry named `host` served from `upstream_url`.
pub fn one_registry(host: &str, upstream_url: &str, extra: &str) -> String {
    format!("registries:\n  - host: {host}\n    upstream: {upstream_url}\n{extra}")
}

/// The proxy on free localhost ports serving `upstream_url` as `host`.
pub fn proxy_serving(host: &str, upstream_url: &str) -> Proxy {
    Proxy::start(
        proxy_bin(),
        Addrs::localhost().unwrap(),
        &one_registry(host, upstream_url, ""),
    )
    .unwrap()
}

/// The proxy on free localhost ports in front of `upstream` as `quay.io`.
pub fn proxy_for(up: &Upstream) -> Proxy {
    proxy_serving("quay.io", &up.registry.url())
}

/// The proxy on free localhost ports serving `upstream` as `docker.io`,
/// its `defaultRegistry` (requests naming no registry go there), with
/// `extra` lines of that registry's config.
pub fn proxy_for_docker_hub(upstream: &Upstream, extra: &str) -> Proxy {
    Proxy::start(
        proxy_bin(),
        Addrs::localhost().unwrap(),
        &format!(
            "defaultRegistry: docker.io\n{}",
            one_registry("docker.io", &upstream.registry.url(), extra)
        ),
    )
    .unwrap()
}

/// Writes the proxy CA as `<dir>/ca.crt` (a cert dir for skopeo/podman).
pub fn ca_dir(proxy: &Proxy) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.crt"), proxy.ca_pem().unwrap()).unwrap();
    dir
}

/// What a test started, to check after everything was dropped that none of
/// it survived: the PIDs, and any process whose command line names one of
/// the test's temp dirs (dockerd's containerd and shims, conmon, ...).
#[derive(Debug, Default)]
pub struct Started {
    pub pids: Vec<(&'static str, u32)>,
    pub dirs: Vec<PathBuf>,
    pub netns: Vec<String>,
}

impl Started {
    pub fn pid(&mut self, what: &'static str, pid: u32) -> &mut Self {
        assert_ne!(pid, 0, "{what} is not running");
        self.pids.push((what, pid));
        self
    }

    pub fn dir(&mut self, dir: &Path) -> &mut Self {
        self.dirs.push(dir.to_path_buf());
        self
    }

    /// The upstream registry and the proxy: their PIDs and dirs.
    pub fn upstream_and_proxy(&mut self, up: &Upstream, proxy: &Proxy) -> &mut Self {
        self.pid("docker-registry", up.registry.pid())
            .pid("pullthrough-proxy", proxy.pid())
            .dir(up.registry.dir())
            .dir(proxy.dir())
    }

    pub fn dockerd(&mut self, dockerd: &pullthrough_testbed::dockerd::Dockerd) -> &mut Self {
        self.pid("dockerd", dockerd.pid()).dir(dockerd.dir())
    }

    pub fn netns(&mut self, name: &str) -> &mut Self {
        self.netns.push(name.to_string());
        self
    }

    /// Call after dropping every handle: waits briefly, then fails naming
    /// whatever is still there.
    pub fn assert_all_gone(&self) {
        let mut left = Vec::new();
        let gone = pullthrough_testbed::net::wait_for(
            "the test's processes and namespaces to be gone",
            Duration::from_secs(10),
            || {
                left = self.leftovers();
                Ok(left.is_empty())
            },
        );
        assert!(gone.is_ok(), "left behind: {left:#?}");
    }

    fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        for (what, pid) in &self.pids {
            if let Some(cmd) = cmdline(*pid) {
                left.push(format!("{what} (pid {pid}): {cmd}"));
            }
        }
        let me = std::process::id();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if pid == me {
                continue;
            }
            let Some(cmd) = cmdline(pid) else { continue };
            for d in &self.dirs {
                if cmd.contains(&*d.to_string_lossy()) {
                    left.push(format!("pid {pid} using {}: {cmd}", d.display()));
                }
            }
        }
        let list = std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for name in &self.netns {
            if list.split_whitespace().any(|w| w == name) {
                left.push(format!("network namespace {name}"));
            }
        }
        left
    }
}

/// A live (not zombie) process's command line, space separated.
fn cmdline(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // State is the field after "(comm)"; comm may hold spaces.
    let state = stat.rsplit_once(") ")?.1.chars().next()?;
    if state == 'Z' || state == 'X' {
        return None;
    }
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// dockerd with `registry-mirrors` = the proxy (its CA trusted for the
/// mirror's host:port) and every Docker Hub name resolving to `dead`, so a
/// pull of a Docker Hub image can only succeed through the mirror.
pub fn dockerd_mirroring_docker_hub_to(
    proxy: &Proxy,
    dead: std::net::IpAddr,
) -> pullthrough_testbed::dockerd::Dockerd {
    use pullthrough_testbed::dockerd::{Dockerd, DockerdOpts};
    let mut opts = DockerdOpts::default();
    for name in [
        "registry-1.docker.io",
        "index.docker.io",
        "auth.docker.io",
        "docker.io",
    ] {
        opts = opts.host(name, dead);
    }
    opts.daemon_json = Some(serde_json::json!({
        "registry-mirrors": [proxy.https_url()],
    }));
    let dockerd = Dockerd::start(opts).unwrap();
    dockerd
        .write_ca(&proxy.addrs.https.to_string(), &proxy.ca_pem().unwrap())
        .unwrap();
    dockerd
}

/// Runs the proxy to completion (at most 20 s); exit code and stderr.
pub fn run_to_exit(config: &Path) -> (Option<i32>, String) {
    let mut child = Command::new(proxy_bin())
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.code(), err);
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("the proxy kept running with {}", config.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

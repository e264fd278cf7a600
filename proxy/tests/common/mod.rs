//! Shared set-up for the proxy's component tests: a real upstream holding
//! fixtures, and the proxy binary in front of it.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod peer_tls;
pub mod private;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

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

/// The proxy on free localhost ports serving `upstream_url` as `host` (with
/// `extra` lines of that registry's config), its pins read from `pins`
/// (`cache.pinsFile`) and `cache` holding `cache` settings besides.
pub fn proxy_with_pins(
    pins: &Path,
    cache: &str,
    host: &str,
    upstream_url: &str,
    extra: &str,
) -> Proxy {
    Proxy::start(
        proxy_bin(),
        Addrs::localhost().unwrap(),
        &format!(
            "cache: {{{cache}pinsFile: {}}}\n{}",
            pins.display(),
            one_registry(host, upstream_url, extra)
        ),
    )
    .unwrap()
}

/// Replaces the pins document at `path` in one rename, as the kubelet
/// swaps a ConfigMap volume.
pub fn write_pins(path: &Path, pins: &serde_json::Value) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, pins.to_string()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The proxy's `GET /status`.
pub fn status(proxy: &Proxy) -> serde_json::Value {
    let url = format!("http://{}/status", proxy.addrs.admin);
    serde_json::from_slice(
        &pullthrough_testbed::http::Get::new(&url)
            .send()
            .unwrap()
            .body,
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
    let mut cmd = Command::new(proxy_bin());
    cmd.arg("--config").arg(config);
    pullthrough_testbed::process::exit_within(&mut cmd, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("the proxy with {}: {e}", config.display()))
}

/// Proxy replicas (issue #12) sharing one CA and a static peer list on
/// loopback, serving `upstream` as `host`; `extra` is appended to every
/// config (e.g. `storage:`).
pub struct Replicas {
    pub proxies: Vec<Proxy>,
    pub peers: Vec<std::net::SocketAddr>,
    pub ca: tempfile::TempDir,
}

impl Replicas {
    pub fn start(n: usize, host: &str, upstream: &str, extra: &str) -> Self {
        use std::net::{IpAddr, Ipv4Addr, SocketAddr};
        let ca = tempfile::tempdir().unwrap();
        let generated = pullthrough_api::pki::generate_ca(Duration::from_secs(86_400)).unwrap();
        std::fs::write(ca.path().join("ca.crt"), &generated.cert_pem).unwrap();
        std::fs::write(ca.path().join("ca.key"), &generated.key_pem).unwrap();
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let peers: Vec<SocketAddr> = (0..n)
            .map(|_| SocketAddr::new(lo, pullthrough_testbed::net::free_port().unwrap()))
            .collect();
        let list = peers
            .iter()
            .map(|p| format!("'{p}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let proxies = peers
            .iter()
            .map(|me| {
                let config = format!(
                    "ca: {{cert: '{}', key: '{}'}}\npeers:\n  listen: '{me}'\n  static: [{list}]\n{}{extra}",
                    ca.path().join("ca.crt").display(),
                    ca.path().join("ca.key").display(),
                    one_registry(host, upstream, ""),
                );
                Proxy::start(proxy_bin(), Addrs::localhost().unwrap(), &config).unwrap()
            })
            .collect();
        Self { proxies, peers, ca }
    }

    /// Index of the replica that owns `digest` (the proxy's own hashing).
    pub fn owner(&self, digest: &str) -> usize {
        let d = pullthrough_proxy::oci::Digest::parse(digest).unwrap();
        let owner = pullthrough_proxy::peers::rendezvous::owner(&d, &self.peers).unwrap();
        self.peers.iter().position(|p| *p == owner).unwrap()
    }

    pub fn blob_url(&self, i: usize, host: &str, repo: &str, digest: &str) -> String {
        format!(
            "{}/v2/{host}/{repo}/blobs/{digest}",
            self.proxies[i].http_url()
        )
    }
}

/// GETs each client's first URL at once, each on a connection of its own
/// (HTTP, streamed, 90 s bound); on a connection or body error a client
/// asks the next URL of its list, as a client behind a Service lands on
/// another pod. [`Fetches::finish`] waits for all of them.
pub fn start_fetches(clients: Vec<Vec<String>>) -> Fetches {
    use pullthrough_testbed::http::{BodyMode, Get};
    async fn fetch_any(urls: Vec<String>) -> pullthrough_testbed::http::Fetched {
        let mut last = None;
        for url in &urls {
            match Get::new(url)
                .timeout(Duration::from_secs(90))
                .fetch(BodyMode::Keep)
                .await
            {
                Ok(f) if f.error.is_none() => return f,
                Ok(f) => last = Some(format!("{url}: body failed: {:?}", f.error)),
                Err(e) => last = Some(format!("{url}: {e}")),
            }
        }
        panic!("no replica served the blob: {last:?}");
    }
    let rt = pullthrough_testbed::http::runtime().unwrap();
    let tasks = clients
        .into_iter()
        .map(|urls| rt.spawn(fetch_any(urls)))
        .collect();
    Fetches { rt, tasks }
}

pub struct Fetches {
    rt: tokio::runtime::Runtime,
    tasks: Vec<tokio::task::JoinHandle<pullthrough_testbed::http::Fetched>>,
}

impl Fetches {
    pub fn finish(self) -> Vec<pullthrough_testbed::http::Fetched> {
        let Fetches { rt, tasks } = self;
        rt.block_on(async {
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        })
    }
}

/// Every client got status 200 and exactly `expected`.
pub fn assert_all_exact(results: &[pullthrough_testbed::http::Fetched], expected: &[u8]) {
    for (i, f) in results.iter().enumerate() {
        assert_eq!(f.status, http::StatusCode::OK, "client {i}");
        assert!(
            f.body == expected,
            "client {i} got {} wrong bytes",
            f.body.len()
        );
    }
}

/// The owner of `layer` is SIGKILLed while it streams the blob to the
/// other replicas (the upstream behind `relay`, held after 12 MiB): 30
/// clients over all replicas (those of the dead one retry on another)
/// must all get the exact bytes; each survivor must have taken over with
/// `Range` and cached only the verified blob. Returns the survivors.
pub fn kill_owner_mid_blob(
    r: &mut Replicas,
    relay: &pullthrough_testbed::relay::Relay,
    registry: &Registry,
    (host, repo, layer): (&str, &str, &str),
    expected: &[u8],
) -> Vec<usize> {
    let n = r.proxies.len();
    let owner = r.owner(layer);
    let others: Vec<usize> = (0..n).filter(|i| *i != owner).collect();
    let fetches = start_fetches(
        (0..30)
            .map(|i| {
                let first = i % n;
                std::iter::once(first)
                    .chain(others.iter().copied().filter(|o| *o != first))
                    .map(|j| r.blob_url(j, host, repo, layer))
                    .collect()
            })
            .collect(),
    );
    // Every survivor has part of the blob from the owner before it dies.
    pullthrough_testbed::net::wait_for(
        "the survivors to hold part of the blob",
        Duration::from_secs(30),
        || {
            Ok(others.iter().all(|&i| {
                let tmp = r.proxies[i].data_dir().join("tmp");
                std::fs::read_dir(tmp).is_ok_and(|d| {
                    d.flatten()
                        .any(|e| e.metadata().is_ok_and(|m| m.len() >= 4 << 20))
                })
            }))
        },
    )
    .unwrap();
    r.proxies[owner].kill().unwrap();
    relay.release();
    assert_all_exact(&fetches.finish(), expected);
    registry.sync_log().unwrap();
    // The owner's GET, and at most one ranged continuation per survivor.
    let gets = registry.count_requests("GET", layer);
    assert!(
        (2..=n).contains(&gets),
        "{gets} upstream GETs: the survivors should continue with one ranged GET each, not start over:\n{}",
        registry.log()
    );
    let partial = registry
        .log()
        .lines()
        .filter(|l| l.contains("\"GET ") && l.contains(layer) && l.contains("\" 206 "))
        .count();
    assert_eq!(
        partial,
        gets - 1,
        "continuations must be ranged:\n{}",
        registry.log()
    );
    for &i in &others {
        let p = &r.proxies[i];
        let cached = std::fs::read(p.cached_blob_path(layer)).unwrap();
        assert_eq!(
            pullthrough_testbed::fixtures::sha256_digest(&cached),
            layer,
            "replica {i}"
        );
        assert!(
            p.tmp_entries().is_empty(),
            "replica {i}: {:?}",
            p.tmp_entries()
        );
        assert!(
            p.log()
                .contains("failed mid-blob; continuing from the upstream"),
            "replica {i} did not take over:\n{}",
            p.log()
        );
    }
    others
}

/// [`start_fetches`] and wait for all of them.
pub fn fetch_all(clients: Vec<Vec<String>>) -> Vec<pullthrough_testbed::http::Fetched> {
    start_fetches(clients).finish()
}

//! The system test: the operator, the proxy and the node agent as
//! processes against a real etcd + kube-apiserver, each API client with a
//! token for its own ServiceAccount under the chart's rendered RBAC; a real
//! upstream registry; a real node runtime whose config root the agent
//! manages: containerd (CRI, hosts.toml) or dockerd (DNS hijack: /etc/hosts,
//! certs.d, daemon.json; private mount namespace). `kubectl apply` a
//! MirrorRegistry → node configured, CR Accepted/ProxyReady/Nodes 1/1 →
//! pull MISS → upstream stopped, pull again HIT → `kubectl delete` → node
//! config removed, CR gone. Each test prints a `TIMELINE` line and fails
//! when the CR's conditions take longer than [`FEW_SECONDS`]. The containerd
//! flow's upstream is private (TLS with its own CA + htpasswd): the CR names
//! the CA with `tls.caBundleConfigMapRef` and the credentials with
//! `credentialsSecretRef`, and the node pulls without any pull secret.
//!
//! There is no kubelet: the test plays its part for the proxy's volumes,
//! copying the table ConfigMap, the CA Secret and the upstream-credentials
//! Secret into the files the proxy reads (as ConfigMap/Secret volumes
//! would), and there is
//! no kube-proxy: the proxy Service is headless, so the operator takes the
//! node section (`proxy:` address, ports, readyUrl) from the base config,
//! where the test names the proxy's real loopback address, and reads
//! `/status` through `--proxy-status-url`. Nothing is ever sent to a
//! ClusterIP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pullthrough_testbed::bins::{agent_bin, operator_bin};
use pullthrough_testbed::containerd::{Containerd, ContainerdOpts};
use pullthrough_testbed::dockerd::{Dockerd, DockerdOpts};
use pullthrough_testbed::fixtures::LayoutBuilder;
use pullthrough_testbed::http::Get;
use pullthrough_testbed::kube::{CHART_ACCESS_KINDS, Helm, KubeApiserver};
use pullthrough_testbed::net::{
    free_port, free_port_on, is_listening, unique_loopback_ip, wait_for,
};
use pullthrough_testbed::ns::MountNs;
use pullthrough_testbed::process::Process;
use pullthrough_testbed::proxy::proxy_bin;
use pullthrough_testbed::registry::Registry;
use serde_json::{Value, json};

const NS: &str = "pullthrough";
const RELEASE: &str = "pullthrough";
const NODE: &str = "node-1";
const IMAGE: &str = "quay.io/fixture/app:1";
const CR: &str = "quay";
const TIMEOUT: Duration = Duration::from_secs(30);
/// The containerd flow's private upstream.
const UPSTREAM_USER: &str = "cluster-robot";
const UPSTREAM_PASSWORD: &str = "s3cret-upstream";
/// How long the flow may wait for the CR's conditions (beyond the
/// requirement, so the rest of the flow still runs and is checked).
const CONDITIONS_TIMEOUT: Duration = Duration::from_secs(60);
/// Issue #7: "within a few seconds" of `kubectl apply` the node is
/// configured and the CR shows ProxyReady and Nodes 1/1.
const FEW_SECONDS: Duration = Duration::from_secs(10);

/// What the chart lets each program do (RBAC and the agents' Lease
/// policy), rendered with default values.
fn chart_access(helm: &Helm) -> String {
    let objects = helm
        .chart_objects(RELEASE, NS, CHART_ACCESS_KINDS)
        .expect("helm template");
    let n = objects.matches("\nkind: ").count() + usize::from(objects.starts_with("kind: "));
    assert!(n >= 9, "chart RBAC and policy objects: {n}\n{objects}");
    objects
}

fn cond_status(obj: &Value, type_: &str) -> Option<String> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .and_then(|c| c["status"].as_str().map(str::to_string))
}

fn wait(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    wait_for(what, timeout, || Ok(cond())).unwrap_or_else(|e| panic!("{e}"));
}

/// Writes `bytes` to `path` atomically when it differs.
fn sync_file(path: &Path, bytes: &[u8]) {
    if fs::read(path).ok().as_deref() == Some(bytes) {
        return;
    }
    let tmp = path.with_extension("sync-tmp");
    fs::write(&tmp, bytes).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// The kubelet's part for the proxy's volumes: copies every key of the
/// table ConfigMap (`config.yaml`, CA bundles) into `table_dir`, the CA
/// Secret's `tls.crt`/`tls.key` into `ca_dir`, and the upstream-credentials
/// Secret into `credentials_dir` (dropping keys it no longer has), as the
/// ConfigMap and Secret volumes would.
struct VolumeSync {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Where [`VolumeSync`] puts each object.
struct Volumes {
    table_dir: PathBuf,
    ca_dir: PathBuf,
    credentials_dir: PathBuf,
}

impl VolumeSync {
    fn start(kubeconfig: PathBuf, v: Volumes) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let kubectl = pullthrough_testbed::tools::go_tool("kubectl").unwrap();
        fs::create_dir_all(&v.credentials_dir).unwrap();
        let thread = std::thread::spawn(move || {
            let get = |args: &[&str]| -> Option<Value> {
                let out = Command::new(&kubectl)
                    .env("KUBECONFIG", &kubeconfig)
                    .args(args)
                    .args(["-n", NS, "-o", "json"])
                    .output()
                    .ok()?;
                out.status
                    .success()
                    .then(|| serde_json::from_slice(&out.stdout).ok())?
            };
            let decode = |b64: &str| {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap()
            };
            while !flag.load(Ordering::Relaxed) {
                if let Some(cm) = get(&["get", "configmap", "pullthrough-registries"])
                    && let Some(data) = cm["data"].as_object()
                {
                    for (key, text) in data {
                        sync_file(&v.table_dir.join(key), text.as_str().unwrap().as_bytes());
                    }
                }
                if let Some(s) = get(&["get", "secret", "pullthrough-ca"]) {
                    for key in ["tls.crt", "tls.key"] {
                        if let Some(b64) = s["data"][key].as_str() {
                            sync_file(&v.ca_dir.join(key), &decode(b64));
                        }
                    }
                }
                if let Some(s) = get(&["get", "secret", "pullthrough-upstream-credentials"]) {
                    let data = s["data"].as_object().cloned().unwrap_or_default();
                    for (key, b64) in &data {
                        sync_file(&v.credentials_dir.join(key), &decode(b64.as_str().unwrap()));
                    }
                    for f in fs::read_dir(&v.credentials_dir).unwrap().flatten() {
                        let name = f.file_name().to_string_lossy().to_string();
                        if !data.contains_key(&name) {
                            let _ = fs::remove_file(f.path());
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for VolumeSync {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Access lines of the proxy's log (JSON, target `pullthrough::access`)
/// with all `fields`.
fn access(log: &str, fields: &[(&str, &str)]) -> usize {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "pullthrough::access")
        .filter(|v| {
            fields.iter().all(|(k, want)| match &v[*k] {
                Value::String(s) => s == want,
                Value::Number(n) => n.to_string() == *want,
                _ => false,
            })
        })
        .count()
}

fn wait_access(proxy: &Process, fields: &[(&str, &str)]) {
    let r = wait_for(&format!("access line {fields:?}"), TIMEOUT, || {
        Ok(access(&proxy.log(), fields) > 0)
    });
    if let Err(e) = r {
        panic!("{e}; proxy log:\n{}", proxy.log());
    }
}

/// `path` exists and holds exactly `before`.
fn assert_restored(path: &Path, before: &[u8]) {
    let after = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        after == before,
        "{} not restored:\n--- before\n{}\n--- after\n{}",
        path.display(),
        String::from_utf8_lossy(before),
        String::from_utf8_lossy(&after)
    );
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// The node under test.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// containerd (CRI), mirror mode via `certs.d/<host>/hosts.toml`.
    Containerd,
    /// dockerd, DNS hijack: `/etc/hosts` + `certs.d` + daemon.json.
    Dockerd,
}

enum Runtime {
    Containerd(Containerd),
    Dockerd(Dockerd),
}

impl Runtime {
    fn cli(&self, args: &[&str]) -> pullthrough_testbed::Result<String> {
        match self {
            Runtime::Containerd(c) => c.crictl(args),
            Runtime::Dockerd(d) => d.docker(args),
        }
    }

    /// Pulls, retrying briefly (dockerd may still be reloading).
    fn pull(&self) {
        let t = Instant::now();
        loop {
            match self.cli(&["pull", IMAGE]) {
                Ok(_) => return,
                Err(e) if t.elapsed() > Duration::from_secs(10) => panic!("{e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    }

    fn stop(&mut self) {
        match self {
            Runtime::Containerd(c) => c.stop().unwrap(),
            Runtime::Dockerd(d) => d.stop().unwrap(),
        }
    }
}

#[test]
fn containerd_node_from_apply_to_pull_to_delete() {
    system_flow(Kind::Containerd);
}

/// dockerd in a private mount namespace, DNS-hijack mode. The proxy listens
/// on a loopback address of its own (port 443, as dockerd dials the real
/// port): dockerd treats registries resolving into 127.0.0.0/8 as insecure,
/// so this shows the hijack and the files, not CA verification (that is
/// `node-agent/tests/runtimes.rs`, in a network namespace).
#[test]
fn dockerd_node_from_apply_to_pull_to_delete() {
    system_flow(Kind::Dockerd);
}

fn system_flow(kind: Kind) {
    let tmp = tempfile::tempdir().unwrap();
    let mut api = KubeApiserver::start().expect("test bed kube-apiserver");

    // CRD, namespace, the chart's RBAC (ServiceAccounts included) and the
    // agents' Lease policy.
    api.apply_crds(&pullthrough_testbed::kube::chart_crds().unwrap())
        .unwrap();
    api.kubectl(&["create", "namespace", NS]).unwrap();
    let helm = api.helm().unwrap();
    api.kubectl_stdin(&["apply", "-f", "-"], &chart_access(&helm))
        .unwrap();

    // The proxy's addresses, and its Service: headless (no kube-proxy
    // here), ports named as the chart names them.
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let (pip, https_port) = match kind {
        Kind::Containerd => (lo, free_port().unwrap()),
        Kind::Dockerd => (IpAddr::V4(unique_loopback_ip()), 443),
    };
    let https = SocketAddr::new(pip, https_port);
    let http = SocketAddr::new(pip, free_port_on(pip).unwrap());
    let admin = SocketAddr::new(pip, free_port_on(pip).unwrap());
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "pullthrough-proxy", "namespace": NS},
        "spec": {"clusterIP": "None", "selector": {"app": "pullthrough-proxy"},
            "ports": [
                {"name": "https", "port": https.port()},
                {"name": "http", "port": http.port()},
                {"name": "admin", "port": admin.port()},
            ]},
    });
    api.kubectl_stdin(&["apply", "-f", "-"], &service.to_string())
        .unwrap();

    // The proxy's "volumes" and the base config (the chart's shape, the
    // node section naming the proxy's loopback address).
    let pdir = tmp.path().join("proxy");
    let ca_dir = pdir.join("ca");
    fs::create_dir_all(&ca_dir).unwrap();
    let proxy_config = pdir.join("config.yaml");
    let credentials_dir = pdir.join("credentials");
    let base = format!(
        "listen: {{https: \"{https}\", http: \"{http}\", admin: \"{admin}\"}}\n\
         dataDir: {data}\n\
         ca:\n  cert: {ca}/tls.crt\n  key: {ca}/tls.key\n\
         proxy:\n  address: {pip}\n  httpsPort: {hp}\n  httpPort: {p}\n  \
         readyUrl: http://{admin}/readyz\n  caFile: /etc/pullthrough/ca/ca.crt\n",
        data = pdir.join("data").display(),
        ca = ca_dir.display(),
        hp = https.port(),
        p = http.port(),
    );
    let base_path = tmp.path().join("base-config.yaml");
    fs::write(&base_path, &base).unwrap();

    // Upstream with the fixture. The containerd flow's upstream is private
    // (TLS with its own CA, Basic auth): the MirrorRegistry brings the CA
    // from a ConfigMap and the credentials from a Secret, the node pulls
    // anonymously.
    let mut upstream = match kind {
        Kind::Containerd => Registry::htpasswd(UPSTREAM_USER, UPSTREAM_PASSWORD).unwrap(),
        Kind::Dockerd => Registry::plain().unwrap(),
    };
    let busybox = LayoutBuilder::new(&tmp.path().join("fixtures"))
        .unwrap()
        .busybox("busybox")
        .unwrap();
    upstream.push_image(&busybox, "fixture/app", "1").unwrap();
    if kind == Kind::Dockerd {
        upstream.push_image(&busybox, "library/app", "1").unwrap();
    }
    let layer = busybox.layer_digests()[0].clone();

    // The operator, as its ServiceAccount.
    let op_kubeconfig = api
        .kubeconfig_for_token(&api.token_for(NS, "pullthrough-operator").unwrap())
        .unwrap();
    let op_port = free_port().unwrap();
    let mut cmd = Command::new(operator_bin().unwrap());
    cmd.env("KUBECONFIG", &op_kubeconfig)
        .env("RUST_LOG", "info")
        .env_remove("POD_NAMESPACE")
        .args(["--namespace", NS, "--listen"])
        .arg(format!("127.0.0.1:{op_port}"))
        .arg("--proxy-base-config")
        .arg(&base_path)
        .args(["--table-mount-path", pdir.to_str().unwrap()])
        .arg("--credentials-mount-path")
        .arg(&credentials_dir)
        .arg("--proxy-status-url")
        .arg(format!("http://{admin}/status"))
        .args(["--identity", "operator-0", "--delete-timeout", "60s"]);
    let mut operator =
        Process::spawn("pullthrough-operator", cmd, tmp.path().join("operator.log")).unwrap();
    let healthz = format!("http://127.0.0.1:{op_port}/healthz");
    operator
        .wait_ready("operator /healthz", TIMEOUT, || {
            Ok(Get::new(&healthz)
                .send()
                .is_ok_and(|r| r.status.is_success()))
        })
        .unwrap();

    // The kubelet's part: volumes for the proxy (admin credentials, as
    // the kubelet has its own).
    let _sync = VolumeSync::start(
        api.kubeconfig_path().to_path_buf(),
        Volumes {
            table_dir: pdir.clone(),
            ca_dir: ca_dir.clone(),
            credentials_dir: credentials_dir.clone(),
        },
    );
    wait("the CA Secret in the proxy's volume", TIMEOUT, || {
        ca_dir.join("tls.key").is_file()
    });
    // Before any MirrorRegistry there may be no table yet: the proxy
    // starts on the base config, as it would on an empty table.
    if !proxy_config.is_file() {
        sync_file(&proxy_config, base.as_bytes());
    }

    // The proxy (no API access).
    let mut cmd = Command::new(proxy_bin().unwrap());
    cmd.env("RUST_LOG", "info")
        .arg("--config")
        .arg(&proxy_config)
        .args(["--reload-interval", "200ms"]);
    let mut proxy = Process::spawn("pullthrough-proxy", cmd, tmp.path().join("proxy.log")).unwrap();
    let readyz = format!("http://{admin}/readyz");
    proxy
        .wait_ready("proxy /readyz", TIMEOUT, || {
            Ok(Get::new(&readyz)
                .send()
                .is_ok_and(|r| r.status.is_success()))
        })
        .unwrap();

    // The runtime with its config root under the agent's root; quay.io
    // (and Docker Hub's names) resolve to a dead loopback address, so only
    // the proxy can serve the pull.
    let root = tmp.path().join("root");
    for port in [443, 80] {
        assert!(!is_listening(SocketAddr::new(lo, port)));
    }
    let (mut runtime, runtime_flag, via) = match kind {
        Kind::Containerd => {
            let mut copts = ContainerdOpts::default().host("quay.io", lo);
            copts.host_root = Some(root.clone());
            (
                Runtime::Containerd(Containerd::start(copts).unwrap()),
                "containerd",
                "ns",
            )
        }
        Kind::Dockerd => {
            let mut dopts = DockerdOpts::default();
            for name in [
                "quay.io",
                "registry-1.docker.io",
                "index.docker.io",
                "docker.io",
            ] {
                dopts = dopts.host(name, lo);
            }
            dopts.host_root = Some(root.clone());
            (
                Runtime::Dockerd(Dockerd::start(dopts).unwrap()),
                "docker",
                "host",
            )
        }
    };
    let hosts_toml = root.join("etc/containerd/certs.d/quay.io/hosts.toml");
    let docker_ca = root.join("etc/docker/certs.d/quay.io/pullthrough-ca.crt");
    let etc_hosts = root.join("etc/hosts");
    let hijack_line = format!("{pip}\tquay.io");
    let daemon_json = root.join("etc/docker/daemon.json");
    let mirror_url = format!("\"https://{pip}\"");
    let node_configured = || match kind {
        Kind::Containerd => hosts_toml.is_file(),
        Kind::Dockerd => {
            docker_ca.is_file()
                && fs::read_to_string(&etc_hosts).is_ok_and(|h| h.contains(&hijack_line))
                && fs::read_to_string(&daemon_json).is_ok_and(|d| d.contains(&mirror_url))
        }
    };
    assert!(!node_configured());
    // What the agent must restore on delete, byte for byte: the runtime's
    // /etc/hosts and (dockerd only) its daemon.json; containerd has none.
    let hosts_before = fs::read(&etc_hosts).unwrap();
    let daemon_json_before = match kind {
        Kind::Containerd => None,
        Kind::Dockerd => Some(fs::read(&daemon_json).unwrap()),
    };
    assert_eq!(daemon_json.exists(), daemon_json_before.is_some());

    // The agent, as its ServiceAccount with the token its Pod on NODE gets,
    // under the chart's policy (each agent writes only its own Lease), once
    // that policy is enforced.
    let agent_kubeconfig = api
        .kubeconfig_for_token(
            &api.pod_token_on_node(NS, "pullthrough-agent", NODE)
                .unwrap(),
        )
        .unwrap();
    let other_node = format!(
        "apiVersion: coordination.k8s.io/v1\nkind: Lease\n\
         metadata: {{name: pullthrough-agent-not-{NODE}, namespace: {NS}}}\n"
    );
    api.wait_until_refused(
        &agent_kubeconfig,
        &other_node,
        "may write only its own Lease",
        Duration::from_secs(30),
    )
    .unwrap();
    // dockerd sees <root>/etc/hosts through a bind mount (pinned inode):
    // the agent runs with that file bind-mounted onto itself, so it writes
    // in place, as in its container (see node-agent/tests/common).
    let mut cmd = MountNs::new()
        .bind(&etc_hosts, &etc_hosts)
        .command(agent_bin().unwrap(), std::iter::empty::<&str>())
        .unwrap();
    cmd.env("KUBECONFIG", &agent_kubeconfig)
        .env_remove("POD_NAMESPACE")
        .env_remove("NODE_NAME")
        .args(["run", "--root", root.to_str().unwrap()])
        .args(["--namespace", NS, "--node-name", NODE])
        .args(["--runtime", runtime_flag, "--lease-renew", "1s"]);
    let mut agent = Process::spawn("pullthrough-agent", cmd, tmp.path().join("agent.log")).unwrap();
    agent.check_running().unwrap();

    // (1) kubectl apply → node configured, Accepted, ProxyReady, 1/1.
    let mreg = |name: &str, host: &str| {
        format!(
            "apiVersion: pullthrough.dev/v1alpha1\nkind: MirrorRegistry\n\
             metadata:\n  name: {name}\nspec:\n  host: {host}\n  upstream: {}\n  \
             allowInsecureUpstream: true\n",
            upstream.url()
        )
    };
    let mut cr = mreg(CR, "quay.io");
    if kind == Kind::Containerd {
        let ca = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "upstream-ca", "namespace": NS},
            "data": {"ca.crt": upstream.ca_pem().unwrap()},
        });
        let creds = json!({
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/basic-auth",
            "metadata": {"name": "upstream-creds", "namespace": NS},
            "stringData": {"username": UPSTREAM_USER, "password": UPSTREAM_PASSWORD},
        });
        api.kubectl_stdin(&["apply", "-f", "-"], &format!("{ca}\n{creds}"))
            .unwrap();
        cr.push_str(&format!(
            "  tls:\n    caBundleConfigMapRef: {{name: upstream-ca, namespace: {NS}}}\n  \
             credentialsSecretRef: {{name: upstream-creds, namespace: {NS}}}\n"
        ));
    }
    if kind == Kind::Dockerd {
        // Docker Hub goes through daemon.json's registry-mirrors.
        cr = format!("{cr}---\n{}", mreg("dockerhub", "docker.io"));
    }
    let cr_path = tmp.path().join("quay.yaml");
    fs::write(&cr_path, &cr).unwrap();
    let t0 = Instant::now();
    api.kubectl(&["apply", "-f", cr_path.to_str().unwrap()])
        .unwrap();
    let (mut node_at, mut ready_at, mut nodes_at) = (None, None, None);
    let mut last = Value::Null;
    let r = wait_for(
        "node configured, Accepted, ProxyReady, 1/1",
        CONDITIONS_TIMEOUT,
        || {
            if node_at.is_none() && node_configured() {
                node_at = Some(t0.elapsed());
            }
            if let Some(o) = api.get_json(&["mreg", CR]) {
                if ready_at.is_none() && cond_status(&o, "ProxyReady").as_deref() == Some("True") {
                    ready_at = Some(t0.elapsed());
                }
                if nodes_at.is_none() && o["status"]["nodesSummary"] == "1/1" {
                    nodes_at = Some(t0.elapsed());
                }
                last = o;
            }
            Ok(node_at.is_some() && ready_at.is_some() && nodes_at.is_some())
        },
    );
    if let Err(e) = r {
        panic!(
            "{e}: status {:#}\noperator:\n{}\nagent:\n{}",
            last["status"],
            operator.log_tail(4000),
            agent.log_tail(4000)
        );
    }
    for c in ["Accepted", "ProxyReady", "NodesConfigured"] {
        assert_eq!(
            cond_status(&last, c).as_deref(),
            Some("True"),
            "{c}: {last:#}"
        );
    }
    if kind == Kind::Containerd {
        let toml = fs::read_to_string(&hosts_toml).unwrap();
        assert!(toml.contains(&format!("https://{https}")), "{toml}");
    }
    let table = api.kubectl(&["get", "mreg"]).unwrap();
    let row = table
        .lines()
        .find(|l| l.starts_with(CR))
        .unwrap_or_else(|| panic!("{table}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        &cells[1..5],
        ["quay.io", &upstream.url(), "True", "1/1"],
        "{table}"
    );
    println!("kubectl get mreg:\n{table}");

    // (2) crictl pull → MISS through the proxy (containerd mirror mode).
    runtime.pull();
    let pulled_at = t0.elapsed();
    wait_access(
        &proxy,
        &[
            ("kind", "tag"),
            ("reference", "1"),
            ("cache", "MISS"),
            ("via", via),
            ("registry", "quay.io"),
        ],
    );
    wait_access(
        &proxy,
        &[
            ("kind", "blob"),
            ("digest", &layer),
            ("cache", "MISS"),
            ("via", via),
        ],
    );

    if kind == Kind::Dockerd {
        // Docker Hub names through the mirror dockerd was reloaded with.
        let t = Instant::now();
        while let Err(e) = runtime.cli(&["pull", "app:1"]) {
            assert!(t.elapsed() < Duration::from_secs(10), "{e}");
            std::thread::sleep(Duration::from_millis(500));
        }
        wait_access(
            &proxy,
            &[
                ("kind", "tag"),
                ("repository", "library/app"),
                ("via", "default"),
                ("registry", "docker.io"),
            ],
        );
    }

    // (3) rmi, upstream stopped, pull again → HIT.
    runtime.cli(&["rmi", IMAGE]).unwrap();
    if kind == Kind::Dockerd {
        // Same image: its layers would stay and not be fetched again.
        runtime.cli(&["rmi", "app:1"]).unwrap();
    }
    upstream.stop().unwrap();
    runtime.pull();
    wait_access(
        &proxy,
        &[
            ("kind", "blob"),
            ("digest", &layer),
            ("cache", "HIT"),
            ("via", via),
        ],
    );
    assert!(
        access(
            &proxy.log(),
            &[("kind", "tag"), ("reference", "1"), ("via", via)]
        ) >= 2,
        "{}",
        proxy.log()
    );
    // The counters the operator copies into status.cache.
    let status: Value = serde_json::from_slice(
        &Get::new(&format!("http://{admin}/status"))
            .send()
            .unwrap()
            .body,
    )
    .unwrap();
    let c = &status["cache"]["quay.io"];
    assert!(
        c["hits"].as_u64() >= Some(1) && c["misses"].as_u64() >= Some(1),
        "{status:#}"
    );
    assert!(c["bytes"].as_u64() >= Some(1), "{status:#}");

    // (4) kubectl delete → node config removed, finalizer done, CR gone.
    let t_del = Instant::now();
    api.kubectl(&["delete", "-f", cr_path.to_str().unwrap(), "--timeout=60s"])
        .unwrap();
    let deleted_at = t_del.elapsed();
    assert!(!node_configured(), "node config left after delete");
    assert!(!hosts_toml.exists(), "{} left", hosts_toml.display());
    assert!(!docker_ca.exists(), "{} left", docker_ca.display());
    // Reverted, not deleted: a missing file fails here too.
    assert_restored(&etc_hosts, &hosts_before);
    match &daemon_json_before {
        None => assert!(!daemon_json.exists(), "{} created", daemon_json.display()),
        Some(before) => assert_restored(&daemon_json, before),
    }
    assert!(api.get_json(&["mreg", CR]).is_none());
    let lease = api
        .get_json(&["lease", &format!("pullthrough-agent-{NODE}"), "-n", NS])
        .unwrap();
    assert_eq!(
        lease["metadata"]["annotations"]["pullthrough.dev/registries"], "",
        "{lease:#}"
    );

    let (node_at, ready_at, nodes_at) = (node_at.unwrap(), ready_at.unwrap(), nodes_at.unwrap());
    println!(
        "TIMELINE {} apply → node configured {}; → ProxyReady {}; \
         → Nodes 1/1 {}; → first pull done {}; delete → CR gone {}",
        runtime_flag,
        secs(node_at),
        secs(ready_at),
        secs(nodes_at),
        secs(pulled_at),
        secs(deleted_at),
    );

    agent.stop().unwrap();
    proxy.stop().unwrap();
    operator.stop().unwrap();
    runtime.stop();
    api.stop().unwrap();

    // The operator runs with the chart's settings (default
    // --resync-interval): the admin's figures.
    let slow: Vec<String> = [
        ("node configured", node_at),
        ("ProxyReady", ready_at),
        ("Nodes 1/1", nodes_at),
    ]
    .iter()
    .filter(|(_, t)| *t > FEW_SECONDS)
    .map(|(what, t)| format!("{what} after {}", secs(*t)))
    .collect();
    assert!(
        slow.is_empty(),
        "not within {} of kubectl apply: {}",
        secs(FEW_SECONDS),
        slow.join(", ")
    );
}

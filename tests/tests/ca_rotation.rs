//! CA rotation reaches a running proxy (issue #10, point 9).
//!
//! The real kube-apiserver, the operator binary as its ServiceAccount with
//! the chart's RBAC and short CA thresholds, and ONE proxy process started
//! once and kept running. A stand-in for the kubelet copies the CA
//! Secret's `tls.crt`/`tls.key` into the proxy's CA "volume" the way a
//! Secret volume updates (a new directory, then one atomic swap of the
//! `..data` link the files point through). A client that trusts only the
//! CURRENT CA ConfigMap bundle (`ca.crt`, what the agent installs on nodes)
//! handshakes with the proxy throughout, until the original CA and then
//! its successor have each been dropped from the bundle: two full
//! rotations. A proxy that keeps the CA it started with is refused as soon
//! as the first CA leaves the bundle.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pullthrough_testbed::bins::operator_bin;
use pullthrough_testbed::http::Get;
use pullthrough_testbed::kube::KubeApiserver;
use pullthrough_testbed::net::{free_port, wait_for};
use pullthrough_testbed::process::Process;
use pullthrough_testbed::proxy::{Addrs, Proxy, proxy_bin};
use serde_json::Value;

const NS: &str = "pullthrough";
const RELEASE: &str = "pullthrough";
const CA: &str = "pullthrough-ca";
const TIMEOUT: Duration = Duration::from_secs(30);

// Rotation timeline for a CA generated at g: the next CA is generated at
// g + VALIDITY - ROTATE_BEFORE (7 s), becomes the Secret's active CA one
// OVERLAP later (10 s) and its predecessor leaves the bundle another
// OVERLAP later (13 s). Two rotations take ~20 s. OVERLAP is the time the
// proxy has to follow the Secret (kubelet stand-in poll + proxy poll,
// well under a second on loopback); the old CA is still valid then.
const VALIDITY: &str = "14s";
const ROTATE_BEFORE: &str = "7s";
const OVERLAP: &str = "3s";
const CHECK_INTERVAL: &str = "250ms";
/// Upper bound for the two rotations (they need ~20 s).
const ROTATIONS_TIMEOUT: Duration = Duration::from_secs(45);

/// `kubectl get <kind> pullthrough-ca -o json` with `kubeconfig`.
fn get(kubectl: &Path, kubeconfig: &Path, kind: &str) -> Option<Value> {
    let out = Command::new(kubectl)
        .env("KUBECONFIG", kubeconfig)
        .args(["get", kind, CA, "-n", NS, "-o", "json"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())?
}

fn secret_data(s: &Value, key: &str) -> Option<String> {
    use base64::Engine as _;
    let b64 = s["data"][key].as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    String::from_utf8(bytes).ok()
}

/// The node bundle: the CA ConfigMap's `ca.crt`.
fn bundle(kubectl: &Path, kubeconfig: &Path) -> Option<String> {
    get(kubectl, kubeconfig, "configmap")?["data"]["ca.crt"]
        .as_str()
        .map(str::to_string)
}

/// The certificates (PEM blocks, trimmed) in `pem`.
fn certs(pem: &str) -> BTreeSet<String> {
    pem.split_inclusive("-----END CERTIFICATE-----")
        .map(str::trim)
        .filter(|b| b.starts_with("-----BEGIN CERTIFICATE-----"))
        .map(str::to_string)
        .collect()
}

/// The kubelet's part for the proxy's CA Secret volume: `dir/tls.crt` and
/// `dir/tls.key` are links through `dir/..data` to a directory holding one
/// consistent version of both; an update writes a new directory and swaps
/// `..data` with one rename, as the kubelet's atomic writer does.
struct SecretVolume {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// The `tls.crt` last written.
    current: Arc<Mutex<String>>,
}

impl SecretVolume {
    fn start(kubectl: PathBuf, kubeconfig: PathBuf, dir: PathBuf) -> Self {
        fs::create_dir_all(&dir).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let current = Arc::new(Mutex::new(String::new()));
        let (flag, written) = (stop.clone(), current.clone());
        let thread = std::thread::spawn(move || {
            let mut version = 0u32;
            while !flag.load(Ordering::Relaxed) {
                if let Some(s) = get(&kubectl, &kubeconfig, "secret")
                    && let (Some(cert), Some(key)) =
                        (secret_data(&s, "tls.crt"), secret_data(&s, "tls.key"))
                    && *written.lock().unwrap() != cert
                {
                    version += 1;
                    let data = format!("..v{version}");
                    fs::create_dir(dir.join(&data)).unwrap();
                    fs::write(dir.join(&data).join("tls.crt"), &cert).unwrap();
                    fs::write(dir.join(&data).join("tls.key"), &key).unwrap();
                    let tmp = dir.join("..data_tmp");
                    std::os::unix::fs::symlink(&data, &tmp).unwrap();
                    fs::rename(&tmp, dir.join("..data")).unwrap();
                    for f in ["tls.crt", "tls.key"] {
                        if fs::symlink_metadata(dir.join(f)).is_err() {
                            std::os::unix::fs::symlink(Path::new("..data").join(f), dir.join(f))
                                .unwrap();
                        }
                    }
                    if version > 1 {
                        let _ = fs::remove_dir_all(dir.join(format!("..v{}", version - 1)));
                    }
                    *written.lock().unwrap() = cert;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Self {
            stop,
            thread: Some(thread),
            current,
        }
    }

    fn cert(&self) -> String {
        self.current.lock().unwrap().clone()
    }
}

impl Drop for SecretVolume {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One TLS handshake (and a request) to the proxy, verified with `bundle`
/// only: by IP (no SNI, the proxy's own certificate) and by name.
fn handshake(https: SocketAddr, bundle: &str) -> Result<(), String> {
    let by_ip = format!("https://{https}/v2/");
    let by_name = format!("https://localhost:{}/v2/", https.port());
    for url in [&by_ip, &by_name] {
        Get::new(url)
            .ca(bundle)
            .connect_to(https)
            .send()
            .map_err(|e| format!("{url}: {e}"))?;
    }
    Ok(())
}

/// The proxy's log without its access lines (one per handshake here).
fn log_without_access(log: &str) -> String {
    log.lines()
        .filter(|l| !l.contains("pullthrough::access"))
        .collect::<Vec<_>>()
        .join("\n")
}

use pullthrough_testbed::proxy::metric_in as metric;

#[test]
fn proxy_follows_two_ca_rotations_without_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let api = KubeApiserver::start().expect("test bed kube-apiserver");
    api.apply_crds(&pullthrough_testbed::kube::chart_crds().unwrap())
        .unwrap();
    api.kubectl(&["create", "namespace", NS]).unwrap();
    api.apply_chart_access(RELEASE, NS).unwrap();

    // The operator as its ServiceAccount, rotating every few seconds. Its
    // `/status` poll goes to a closed loopback port, never a ClusterIP.
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
        .arg("--proxy-status-url")
        .arg(format!("http://127.0.0.1:{}/status", free_port().unwrap()))
        .args(["--identity", "operator-0"])
        .args([
            "--ca-validity",
            VALIDITY,
            "--ca-rotate-before",
            ROTATE_BEFORE,
        ])
        .args([
            "--ca-overlap",
            OVERLAP,
            "--ca-check-interval",
            CHECK_INTERVAL,
        ]);
    let mut operator =
        Process::spawn("pullthrough-operator", cmd, tmp.path().join("operator.log")).unwrap();

    // The kubelet stand-in reads with the admin kubeconfig, as the kubelet
    // has credentials of its own.
    let kubectl = pullthrough_testbed::tools::go_tool("kubectl").unwrap();
    let admin = api.kubeconfig_path().to_path_buf();
    let ca_dir = tmp.path().join("ca");
    let volume = SecretVolume::start(kubectl.clone(), admin.clone(), ca_dir.clone());
    wait_for("the CA Secret in the proxy's volume", TIMEOUT, || {
        Ok(!volume.cert().is_empty())
    })
    .unwrap();
    let first = volume.cert();
    // With no MirrorRegistry at all, the leader still publishes the
    // (empty) registry table: the proxy mounts it and cannot start
    // without it (a fresh `helm install`).
    wait_for("the registry table ConfigMap", TIMEOUT, || {
        Ok(Command::new(&kubectl)
            .env("KUBECONFIG", &admin)
            .args(["get", "configmap", "pullthrough-registries", "-n", NS])
            .output()
            .is_ok_and(|o| o.status.success()))
    })
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log()));

    // ONE proxy for the whole test.
    let body = format!(
        "ca:\n  cert: {d}/tls.crt\n  key: {d}/tls.key\n",
        d = ca_dir.display()
    );
    let proxy = Proxy::start(&proxy_bin().unwrap(), Addrs::localhost().unwrap(), &body).unwrap();
    let pid = proxy.pid();
    let https = proxy.addrs.https;

    // Handshake with the current bundle until two CAs, each seen as the
    // Secret's active CA, have left the bundle. Every attempt must pass.
    let start = Instant::now();
    let mut active: Vec<String> = vec![first.trim().to_string()];
    let mut dropped: Vec<String> = Vec::new();
    let mut handshakes_after_drop = 0u32;
    let mut handshakes = 0u32;
    while dropped.len() < 2 || handshakes_after_drop == 0 {
        assert!(
            start.elapsed() < ROTATIONS_TIMEOUT,
            "two rotations did not complete in {ROTATIONS_TIMEOUT:?}: active CAs seen {}, dropped {}\noperator log:\n{}",
            active.len(),
            dropped.len(),
            operator.log_tail(4000),
        );
        let Some(b) = bundle(&kubectl, &admin) else {
            continue;
        };
        let trusted = certs(&b);
        let secret = volume.cert().trim().to_string();
        if !secret.is_empty() && !active.contains(&secret) {
            active.push(secret);
        }
        let newly_dropped = active
            .iter()
            .filter(|c| !trusted.contains(*c) && !dropped.contains(c))
            .cloned()
            .collect::<Vec<_>>();
        if !newly_dropped.is_empty() {
            dropped.extend(newly_dropped);
            handshakes_after_drop = 0;
        }
        if let Err(e) = handshake(https, &b) {
            panic!(
                "handshake verified with the node bundle failed after {:.1}s \
                 ({} CA(s) dropped from the bundle so far, {} in it): {e}\nproxy log:\n{}",
                start.elapsed().as_secs_f64(),
                dropped.len(),
                trusted.len(),
                log_without_access(&proxy.log()),
            );
        }
        handshakes += 1;
        if dropped.len() == 2 {
            handshakes_after_drop += 1;
        }
    }
    assert_eq!(dropped[0], first.trim(), "the original CA is dropped first");
    assert!(active.len() >= 3, "two promotions: {} CAs", active.len());

    // `/ca.crt` follows: it serves the Secret's current CA.
    let ca_url = format!("http://{}/ca.crt", proxy.addrs.admin);
    wait_for("/ca.crt serves the current CA", TIMEOUT, || {
        let served = Get::new(&ca_url).send()?;
        Ok(String::from_utf8_lossy(&served.body).trim() == volume.cert().trim())
    })
    .unwrap();
    // Visible in metrics: at least the two promotions were swapped in.
    let metrics = Get::new(&format!("http://{}/metrics", proxy.addrs.admin))
        .send()
        .unwrap();
    let text = String::from_utf8_lossy(&metrics.body).to_string();
    let reloads = metric(&text, "pullthrough_ca_reloads_total").unwrap_or(0.0);
    assert!(reloads >= 2.0, "CA reloads {reloads}:\n{text}");
    assert!(
        metric(&text, "pullthrough_ca_not_after_seconds").is_some_and(|v| v > 0.0),
        "{text}"
    );
    assert!(
        proxy.log().contains("CA changed"),
        "the swap is logged:\n{}",
        log_without_access(&proxy.log())
    );
    // Still the process started at the beginning.
    assert_eq!(proxy.pid(), pid);
    assert!(
        Get::new(&format!("http://{}/healthz", proxy.addrs.admin))
            .send()
            .is_ok_and(|r| r.status.is_success())
    );
    eprintln!(
        "{handshakes} handshakes verified with the node bundle over {:.1}s, {} CAs active in turn",
        start.elapsed().as_secs_f64(),
        active.len()
    );

    drop(proxy);
    drop(volume);
    let status = operator.stop().unwrap().expect("exit status");
    assert!(status.success(), "{status}");
}

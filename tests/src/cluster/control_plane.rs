//! The control plane of the one-node cluster: etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler, all built from the same
//! Kubernetes module (`tests/tools/go-tools.sh`), running as processes in
//! the cluster's network namespace. The API server listens on the node's
//! address only, so pods reach it through the `kubernetes` Service
//! (kube-proxy) exactly as on a real cluster, and nothing outside the
//! namespace can.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::error::{IoContext, Result};
use crate::kube::{base64, kubeconfig_json};
use crate::ns::netns_command;
use crate::process::{Process, run};
use crate::tls::TestCa;
use crate::tools::{go_tool, system_tool};

/// The API server's port on the node address.
pub const APISERVER_PORT: u16 = 6443;
/// The Service range; its first address is the `kubernetes` Service.
pub const SERVICE_CIDR: &str = "10.96.0.0/24";
const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";

/// A cold start of the API server (RBAC bootstrap, CRD informers) on two
/// busy cores.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Client identities, each a kubeconfig file.
pub struct Kubeconfigs {
    /// `system:masters`: the test itself, the controller manager, the
    /// scheduler and kube-proxy.
    pub admin: PathBuf,
    /// `system:node:<node>` in `system:nodes`, one per node in the order
    /// given: the kubelets, so the Node authorizer and NodeRestriction
    /// apply to each as on a real node.
    pub nodes: Vec<PathBuf>,
}

/// The running control plane; dropped (stopped by PID) after the node.
pub struct ControlPlane {
    // In stop order: scheduler, controller manager, API server, etcd.
    procs: Vec<Process>,
    pub kubeconfigs: Kubeconfigs,
    pub ca: TestCa,
    pub ca_file: PathBuf,
    url: String,
    netns: String,
}

impl ControlPlane {
    /// Starts everything in `netns` with the API server on `ip`, writes the
    /// certificates and kubeconfigs under `dir`, and waits until the API
    /// server is ready and the controller manager has published the
    /// cluster's root CA ConfigMap (pods' token volumes need it).
    pub fn start(dir: &Path, netns: &str, ip: IpAddr, node_names: &[&str]) -> Result<Self> {
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki).ctx(|| format!("creating {}", pki.display()))?;
        let ca = TestCa::new("pullthrough-cluster-ca")?;
        let ca_file = pki.join("ca.crt");
        ca.write_cert(&ca_file)?;
        let ip_s = ip.to_string();
        let (serving_crt, serving_key) = ca
            .server(&[
                &ip_s,
                KUBERNETES_SERVICE_IP,
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ])?
            .write(&pki, "apiserver")?;
        // The API server's own client identity towards kubelets (logs).
        let (kubelet_client_crt, kubelet_client_key) = ca
            .client("kube-apiserver-kubelet-client", &["system:masters"])?
            .write(&pki, "apiserver-kubelet-client")?;
        let sa_key = rcgen::KeyPair::generate()?;
        let sa_key_file = pki.join("sa.key");
        let sa_pub_file = pki.join("sa.pub");
        std::fs::write(&sa_key_file, sa_key.serialize_pem())
            .ctx(|| "writing the ServiceAccount signing key".into())?;
        std::fs::write(&sa_pub_file, sa_key.public_key_pem())
            .ctx(|| "writing the ServiceAccount public key".into())?;

        let url = format!("https://{ip}:{APISERVER_PORT}");
        let ca_pem = ca.cert_pem();
        let kubeconfig = |name: &str, cn: &str, orgs: &[&str]| -> Result<PathBuf> {
            let leaf = ca.client(cn, orgs)?;
            let path = dir.join(format!("{name}.kubeconfig"));
            std::fs::write(
                &path,
                kubeconfig_json(
                    &url,
                    &ca_pem,
                    json!({
                        "client-certificate-data": base64(leaf.cert_pem.as_bytes()),
                        "client-key-data": base64(leaf.key_pem.as_bytes()),
                    }),
                ),
            )
            .ctx(|| format!("writing {}", path.display()))?;
            Ok(path)
        };
        let kubeconfigs = Kubeconfigs {
            admin: kubeconfig("admin", "admin", &["system:masters"])?,
            nodes: node_names
                .iter()
                .map(|n| kubeconfig(n, &format!("system:node:{n}"), &["system:nodes"]))
                .collect::<Result<_>>()?,
        };

        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).ctx(|| format!("creating {}", logs.display()))?;
        let p = |path: &Path| path.display().to_string();
        let mut procs = Vec::new();

        // etcd on the namespace's own loopback: only the API server talks to it.
        let etcd_dir = dir.join("etcd");
        let etcd = netns_command(
            netns,
            system_tool("etcd")?,
            [
                "--name=cluster".to_string(),
                format!("--data-dir={}", p(&etcd_dir)),
                "--listen-client-urls=http://127.0.0.1:2379".into(),
                "--advertise-client-urls=http://127.0.0.1:2379".into(),
                "--listen-peer-urls=http://127.0.0.1:2380".into(),
                "--initial-advertise-peer-urls=http://127.0.0.1:2380".into(),
                "--initial-cluster=cluster=http://127.0.0.1:2380".into(),
                "--initial-cluster-state=new".into(),
                "--logger=zap".into(),
                "--log-outputs=stderr".into(),
                // One node, one test: no fsync per write.
                "--unsafe-no-fsync".into(),
            ],
        );
        procs.push(Process::spawn("etcd", etcd, logs.join("etcd.log"))?);

        let apiserver = netns_command(
            netns,
            go_tool("kube-apiserver")?,
            [
                "--etcd-servers=http://127.0.0.1:2379".to_string(),
                format!("--bind-address={ip}"),
                format!("--advertise-address={ip}"),
                format!("--secure-port={APISERVER_PORT}"),
                format!("--cert-dir={}", p(&dir.join("apiserver-certs"))),
                format!("--tls-cert-file={}", p(&serving_crt)),
                format!("--tls-private-key-file={}", p(&serving_key)),
                format!("--client-ca-file={}", p(&ca_file)),
                "--authorization-mode=Node,RBAC".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
                "--allow-privileged=true".into(),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", p(&sa_pub_file)),
                format!("--service-account-signing-key-file={}", p(&sa_key_file)),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                format!("--kubelet-client-certificate={}", p(&kubelet_client_crt)),
                format!("--kubelet-client-key={}", p(&kubelet_client_key)),
                // No cluster DNS: reach the kubelet by the node's address.
                "--kubelet-preferred-address-types=InternalIP".into(),
                "--profiling=false".into(),
            ],
        );
        let mut api = Process::spawn("kube-apiserver", apiserver, logs.join("apiserver.log"))?;
        let kubectl = go_tool("kubectl")?;
        let admin = kubeconfigs.admin.clone();
        let readyz = || {
            netns_command(
                netns,
                &kubectl,
                [
                    format!("--kubeconfig={}", admin.display()),
                    "get".into(),
                    "--raw".into(),
                    "/readyz".into(),
                ],
            )
            .output()
            .is_ok_and(|o| o.status.success() && o.stdout.starts_with(b"ok"))
        };
        api.wait_ready(
            &format!("kube-apiserver /readyz at {url}"),
            READY_TIMEOUT,
            || Ok(readyz()),
        )?;
        procs.push(api);

        let kcm = netns_command(
            netns,
            go_tool("kube-controller-manager")?,
            [
                format!("--kubeconfig={}", p(&kubeconfigs.admin)),
                "--leader-elect=false".into(),
                format!("--root-ca-file={}", p(&ca_file)),
                "--use-service-account-credentials=false".into(),
                "--bind-address=127.0.0.1".into(),
                "--controllers=*".into(),
                "--cluster-name=pullthrough-test".into(),
                // Pods of a deleted Deployment go within seconds.
                "--concurrent-gc-syncs=5".into(),
            ],
        );
        procs.push(Process::spawn(
            "kube-controller-manager",
            kcm,
            logs.join("controller-manager.log"),
        )?);
        let sched = netns_command(
            netns,
            go_tool("kube-scheduler")?,
            [
                format!("--kubeconfig={}", p(&kubeconfigs.admin)),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
            ],
        );
        procs.push(Process::spawn(
            "kube-scheduler",
            sched,
            logs.join("scheduler.log"),
        )?);

        let cp = Self {
            procs,
            kubeconfigs,
            ca,
            ca_file,
            url,
            netns: netns.to_string(),
        };
        // The root-ca-cert-publisher runs: every namespace gets
        // kube-root-ca.crt, which each pod's token volume projects.
        let kcm_index = 2;
        let mut last = String::new();
        let wait = crate::net::wait_for(
            "kube-root-ca.crt in namespace default (kube-controller-manager)",
            READY_TIMEOUT,
            || {
                let out = cp
                    .kubectl_command(&["get", "configmap", "kube-root-ca.crt", "-o", "name"])?
                    .output()
                    .ctx(|| "running kubectl".into())?;
                last = String::from_utf8_lossy(&out.stderr).into_owned();
                Ok(out.status.success())
            },
        );
        if let Err(e) = wait {
            return Err(crate::Error::Other(format!(
                "{e}; kubectl: {last}; controller manager log:\n{}",
                cp.procs[kcm_index].log_tail(3000)
            )));
        }
        Ok(cp)
    }

    /// `https://<node ip>:6443`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `kubectl --kubeconfig <admin> ARGS...` inside the namespace.
    pub fn kubectl_command(&self, args: &[&str]) -> Result<Command> {
        let mut all = vec![format!("--kubeconfig={}", self.kubeconfigs.admin.display())];
        all.extend(args.iter().map(|a| a.to_string()));
        Ok(netns_command(&self.netns, go_tool("kubectl")?, all))
    }

    /// Runs kubectl as admin; stdout.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        run(&mut self.kubectl_command(args)?)
    }

    /// Runs kubectl as admin with `input` on stdin; stdout.
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Result<String> {
        crate::process::run_stdin(&mut self.kubectl_command(args)?, input)
    }

    /// The log files of the control plane's processes, newest lines last.
    pub fn log_tails(&self, bytes: u64) -> String {
        crate::process::log_tails(&self.procs, bytes)
    }

    /// Stops every process by PID: scheduler and controller manager first,
    /// etcd last.
    pub fn stop(&mut self) {
        while let Some(mut p) = self.procs.pop() {
            let _ = p.stop();
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

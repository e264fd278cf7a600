//! A real one-node Kubernetes cluster, as processes inside namespaces the
//! test owns: the control plane ([`control_plane`]) and one node
//! ([`node`]: containerd, kubelet, kube-proxy) in one network namespace
//! whose only address is the node's. Clients (`kubectl`, `helm`) run in
//! that namespace; nothing outside it can reach the cluster, and the
//! cluster can reach nothing outside it.
//!
//! Dropping the cluster kills the node (and every container) through its
//! PID namespace's init, stops the control plane by PID, deletes the
//! network namespace and the cgroup root, and removes the files.

pub mod control_plane;
pub mod node;

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::error::{Error, IoContext, Result};
use crate::images::ImageArchive;
use crate::kube::Helm;
use crate::net::wait_for;
use crate::ns::NetNs;

pub use control_plane::ControlPlane;
pub use node::Node;

/// The node's (and API server's) address: exists only in the namespace.
pub const NODE_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 250, 0, 1));
pub const NODE_NAME: &str = "node-1";

pub struct Cluster {
    // Drop order: node first (its kubelet talks to the API server), then
    // the control plane, then the namespace, then the files.
    pub node: Node,
    pub control: ControlPlane,
    netns: NetNs,
    dir: TempDir,
    started: Instant,
}

impl Cluster {
    /// Starts the control plane and the node with `images` imported into
    /// its containerd, and waits until the node is Ready.
    pub fn start(images: &[ImageArchive]) -> Result<Self> {
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("pt-cluster-")
            .tempdir()
            .ctx(|| "creating the cluster's temp dir".into())?;
        let netns = NetNs::create(&[NODE_IP])?;
        // A node has a default route; this namespace has none, so a
        // connection from the node itself (containerd pulling from the
        // proxy's ClusterIP) fails with "network unreachable" before
        // kube-proxy's DNAT can rewrite it. A route for the Service range
        // over a veth pair that leads nowhere gives the kernel a first hop;
        // after DNAT the packet is routed to the pod.
        netns.ip(&[
            "link", "add", "svc0", "type", "veth", "peer", "name", "svc1",
        ])?;
        netns.ip(&["link", "set", "svc0", "up"])?;
        netns.ip(&["link", "set", "svc1", "up"])?;
        netns.ip(&["route", "add", control_plane::SERVICE_CIDR, "dev", "svc0"])?;
        let control = ControlPlane::start(
            &dir.path().join("control"),
            netns.name(),
            NODE_IP,
            NODE_NAME,
        )?;
        let hosts =
            format!("127.0.0.1 localhost\n::1 localhost ip6-localhost\n{NODE_IP} {NODE_NAME}\n");
        let spec = node::NodeSpec {
            name: NODE_NAME,
            ip: NODE_IP,
            netns: netns.name(),
            kubelet_kubeconfig: &control.kubeconfigs.node,
            proxy_kubeconfig: &control.kubeconfigs.admin,
            client_ca: &control.ca_file,
            hosts: &hosts,
        };
        let node = Node::start(&dir.path().join("node"), &spec, images)?;
        let cluster = Self {
            node,
            control,
            netns,
            dir,
            started,
        };
        cluster.wait(
            "node Ready",
            Duration::from_secs(120),
            &[
                "wait",
                "--for=condition=Ready",
                &format!("node/{NODE_NAME}"),
                "--timeout=5s",
            ],
        )?;
        Ok(cluster)
    }

    /// How long since [`Cluster::start`] began.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn netns(&self) -> &str {
        self.netns.name()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// kubectl as cluster admin; stdout.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.control.kubectl(args)
    }

    /// kubectl as cluster admin with `input` on stdin; stdout.
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Result<String> {
        self.control.kubectl_stdin(args, input)
    }

    /// helm as cluster admin, inside the namespace.
    pub fn helm(&self) -> Result<Helm> {
        Ok(Helm::new(Some(&self.control.kubeconfigs.admin))?.in_netns(self.netns.name()))
    }

    /// Repeats `kubectl ARGS` (typically a short `kubectl wait`) until it
    /// succeeds or `timeout` passes; the error carries kubectl's last
    /// output and the daemons' logs.
    pub fn wait(&self, what: &str, timeout: Duration, args: &[&str]) -> Result<()> {
        let mut last = String::new();
        let res = wait_for(what, timeout, || match self.kubectl(args) {
            Ok(_) => Ok(true),
            Err(e) => {
                last = e.to_string();
                Ok(false)
            }
        });
        res.map_err(|e| {
            Error::Other(format!(
                "{e}\nlast kubectl: {last}\n{}\n{}",
                self.node.log_tails(2000),
                self.control.log_tails(1500)
            ))
        })
    }

    /// Pods, events and the daemons' logs: what to print when a step fails.
    pub fn diagnostics(&self) -> String {
        let pods = self
            .kubectl(&["get", "pods", "-A", "-o", "wide"])
            .unwrap_or_else(|e| e.to_string());
        let events = self
            .kubectl(&["get", "events", "-A", "--sort-by=.lastTimestamp"])
            .unwrap_or_else(|e| e.to_string());
        // Each pod's own log (last lines), all namespaces but the system's.
        let mut pod_logs = String::new();
        let list = self
            .kubectl(&[
                "get",
                "pods",
                "-A",
                "-o",
                "jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name}{\"\\n\"}{end}",
            ])
            .unwrap_or_default();
        for line in list.lines() {
            if let Some((ns, name)) = line.split_once('/') {
                let log = self
                    .kubectl(&["logs", "-n", ns, name, "--all-containers", "--tail=40"])
                    .unwrap_or_else(|e| e.to_string());
                pod_logs.push_str(&format!("--- pod {ns}/{name} ---\n{log}\n"));
            }
        }
        format!(
            "pods:\n{pods}\nevents:\n{events}\n{pod_logs}\n{}\n{}",
            self.node.log_tails(3000),
            self.control.log_tails(1500)
        )
    }
}

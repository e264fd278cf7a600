//! A real Kubernetes cluster, as processes inside namespaces the test
//! owns: the control plane ([`control_plane`]) and the first node
//! ([`node`]: containerd, kubelet, kube-proxy) in one network namespace
//! whose only address is the node's; further nodes each in a namespace of
//! their own, linked to the first. Clients (`kubectl`, `helm`) run in the
//! first namespace; nothing outside the namespaces can reach the cluster,
//! and the cluster can reach nothing outside them.
//!
//! Dropping the cluster kills each node (and every container) through its
//! PID namespace's init, stops the control plane by PID, deletes the
//! network namespaces and the cgroup roots, and removes the files.

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
use crate::process::run;

pub use control_plane::ControlPlane;
pub use node::Node;

/// The first node's (and API server's) address: exists only in the
/// cluster's namespace.
pub const NODE_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 250, 0, 1));
pub const NODE_NAME: &str = "node-1";

/// Node `i` (from 0): `node-<i+1>` on 10.250.0.<i+1>, pods on 10.244.<i>.0/24.
fn node_name(i: usize) -> String {
    format!("node-{}", i + 1)
}

fn node_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 250, 0, i as u8 + 1))
}

fn pod_cidr(i: usize) -> String {
    format!("10.244.{i}.0/24")
}

pub struct Cluster {
    // Drop order: nodes first (their kubelets talk to the API server),
    // then the control plane, then the namespaces, then the files.
    pub nodes: Vec<Node>,
    pub control: ControlPlane,
    /// The namespaces of the nodes after the first, which lives in
    /// `netns` with the control plane.
    node_netns: Vec<NetNs>,
    netns: NetNs,
    dir: TempDir,
    started: Instant,
}

impl Cluster {
    /// Starts the control plane and `count` nodes (at most 200) with
    /// `images` imported into each node's containerd, and waits until every
    /// node is Ready. The first node shares the control plane's namespace;
    /// each other node has a namespace of its own, joined to the first by a
    /// veth pair: node addresses and pod networks are routed through the
    /// first node, as on a flat cluster network, and none of it exists
    /// outside the namespaces.
    pub fn start(images: &[ImageArchive], count: usize) -> Result<Self> {
        if !(1..=200).contains(&count) {
            return Err(Error::Other(format!(
                "Cluster::start: {count} nodes asked for; 1 to 200 are supported"
            )));
        }
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("pt-cluster-")
            .tempdir()
            .ctx(|| "creating the cluster's temp dir".into())?;
        let netns = NetNs::create(&[NODE_IP])?;
        let mut node_netns = Vec::new();
        for i in 1..count {
            node_netns.push(NetNs::create(&[node_ip(i)])?);
        }
        for ns in std::iter::once(&netns).chain(&node_netns) {
            service_route(ns)?;
            // Forwarding between the node's bridge and its link to the others.
            // (/proc/sys/net is the opener's namespace's.)
            run(&mut ns.command("sh", ["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]))?;
        }
        for (k, ns) in node_netns.iter().enumerate() {
            link_to_first(&netns, ns, k + 1)?;
        }
        let names: Vec<String> = (0..count).map(node_name).collect();
        let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let control = ControlPlane::start(
            &dir.path().join("control"),
            netns.name(),
            NODE_IP,
            &name_refs,
        )?;
        let mut hosts = String::from("127.0.0.1 localhost\n::1 localhost ip6-localhost\n");
        for (i, name) in names.iter().enumerate() {
            hosts.push_str(&format!("{} {name}\n", node_ip(i)));
        }
        let mut cluster = Self {
            nodes: Vec::new(),
            control,
            node_netns,
            netns,
            dir,
            started,
        };
        for (i, name) in names.iter().enumerate() {
            let ns = match i {
                0 => cluster.netns.name(),
                _ => cluster.node_netns[i - 1].name(),
            };
            let cidr = pod_cidr(i);
            let spec = node::NodeSpec {
                name,
                ip: node_ip(i),
                netns: ns,
                pod_cidr: &cidr,
                kubelet_kubeconfig: &cluster.control.kubeconfigs.nodes[i],
                proxy_kubeconfig: &cluster.control.kubeconfigs.admin,
                client_ca: &cluster.control.ca_file,
                hosts: &hosts,
            };
            let node = Node::start(&cluster.dir.path().join(name), &spec, images)?;
            cluster.nodes.push(node);
        }
        for name in &names {
            cluster.wait(
                &format!("{name} Ready"),
                Duration::from_secs(120),
                &[
                    "wait",
                    "--for=condition=Ready",
                    &format!("node/{name}"),
                    "--timeout=5s",
                ],
            )?;
        }
        Ok(cluster)
    }

    /// The first node (the one in the control plane's namespace).
    pub fn node(&self) -> &Node {
        &self.nodes[0]
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
                self.node_log_tails(2000),
                self.control.log_tails(1500)
            ))
        })
    }

    fn node_log_tails(&self, bytes: u64) -> String {
        self.nodes
            .iter()
            .map(|n| format!("=== {} ===\n{}", n.name(), n.log_tails(bytes)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Pods, events and the daemons' logs: what to print when a step fails.
    pub fn diagnostics(&self) -> String {
        let pods = self
            .kubectl(&["get", "pods", "-A", "-o", "wide"])
            .unwrap_or_else(|e| e.to_string());
        // Taints and pressure conditions first: they explain Pending pods.
        let nodes = self
            .kubectl(&[
                "get",
                "nodes",
                "-o",
                "jsonpath={range .items[*]}{.metadata.name} taints={.spec.taints} pressure={.status.conditions[?(@.status==\"True\")].type}{\"\\n\"}{end}",
            ])
            .unwrap_or_else(|e| e.to_string());
        // Why a pod stopped (an eviction names the resource it was short of).
        let stopped = self
            .kubectl(&[
                "get",
                "pods",
                "-A",
                "-o",
                "jsonpath={range .items[?(@.status.reason)]}{.metadata.name}: {.status.reason}: {.status.message}{\"\\n\"}{end}",
            ])
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
            "nodes:\n{nodes}\npods:\n{pods}\n{stopped}\nevents:\n{events}\n{pod_logs}\n{}\n{}",
            self.node_log_tails(3000),
            self.control.log_tails(1500)
        )
    }
}

/// A node has a default route; these namespaces have none, so a connection
/// from the node itself (containerd pulling from the proxy's ClusterIP)
/// fails with "network unreachable" before kube-proxy's DNAT can rewrite
/// it. A route for the Service range over a veth pair that leads nowhere
/// gives the kernel a first hop; after DNAT the packet is routed to the pod.
fn service_route(ns: &NetNs) -> Result<()> {
    ns.ip(&[
        "link", "add", "svc0", "type", "veth", "peer", "name", "svc1",
    ])?;
    ns.ip(&["link", "set", "svc0", "up"])?;
    ns.ip(&["link", "set", "svc1", "up"])?;
    ns.ip(&["route", "add", control_plane::SERVICE_CIDR, "dev", "svc0"])?;
    Ok(())
}

/// Joins node `i`'s namespace to the first node's with a veth pair: each
/// side routes the other's address over it, and the first node routes
/// node `i`'s pods through it; node `i` reaches everything else (the API
/// server, other nodes and their pods) through the first node.
fn link_to_first(first: &NetNs, ns: &NetNs, i: usize) -> Result<()> {
    let here = format!("nd{i}");
    first.ip(&[
        "link",
        "add",
        &here,
        "type",
        "veth",
        "peer",
        "name",
        "nd0",
        "netns",
        ns.name(),
    ])?;
    first.ip(&["link", "set", &here, "up"])?;
    ns.ip(&["link", "set", "nd0", "up"])?;
    let (ip, first_ip) = (node_ip(i).to_string(), NODE_IP.to_string());
    first.ip(&["route", "add", &format!("{ip}/32"), "dev", &here])?;
    first.ip(&[
        "route",
        "add",
        &pod_cidr(i),
        "via",
        &ip,
        "dev",
        &here,
        "onlink",
    ])?;
    ns.ip(&["route", "add", &format!("{first_ip}/32"), "dev", "nd0"])?;
    for net in ["10.250.0.0/24", "10.244.0.0/16"] {
        ns.ip(&[
            "route", "add", net, "via", &first_ip, "dev", "nd0", "onlink",
        ])?;
    }
    Ok(())
}

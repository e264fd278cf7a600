//! The cluster's one node: containerd (Debian's, with runc and Debian's
//! CNI plugins), kubelet and kube-proxy, as processes in namespaces the
//! test owns:
//!
//! - the cluster's network namespace (pod networks, kube-proxy's iptables
//!   rules and the bridge exist only there);
//! - a PID namespace whose init is the node's "PID 1", so `hostPID` pods
//!   (the node agent) see the node's processes and `nsenter -t 1` enters the
//!   node, never the machine;
//! - a mount namespace (private, then `rshared` inside, so kubelet's and
//!   containerd's mounts propagate to containers but never to the machine)
//!   where `/etc` and `/var` are overlays whose writes land in the test's
//!   directory, `/run` is a test directory, and the three kernel settings
//!   kubelet would otherwise change machine-wide (`vm.overcommit_memory`,
//!   `kernel.panic`, `kernel.panic_on_oops`) are test-owned files holding
//!   the values kubelet wants.
//!
//! Pods' cgroups live under a test-owned cgroup root (`--cgroup-root`),
//! removed on drop. Killing the namespace's init (by PID) ends every
//! process of the node, containers included.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::error::{Error, IoContext, Result};
use crate::images::ImageArchive;
use crate::net::wait_for;
use crate::process::{Process, run};
use crate::tools::{go_tool, system_tool};

/// The sandbox image containerd uses, imported by the test (no pulls).
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10";

const START_TIMEOUT: Duration = Duration::from_secs(60);

/// What the node runs with.
pub struct NodeSpec<'a> {
    pub name: &'a str,
    pub ip: IpAddr,
    pub netns: &'a str,
    /// Pods' addresses: one /24 of 10.244.0.0/16 on the node's bridge.
    pub pod_cidr: &'a str,
    /// The kubelet's and kube-proxy's kubeconfigs.
    pub kubelet_kubeconfig: &'a Path,
    pub proxy_kubeconfig: &'a Path,
    /// Client CA of the API server (kubelet authenticates it with it).
    pub client_ca: &'a Path,
    /// `/etc/hosts` of the node (written before anything starts).
    pub hosts: &'a str,
}

/// The running node.
pub struct Node {
    init: Option<Process>,
    /// The init's PID as the machine sees it (for `nsenter -t`).
    init_pid: u32,
    daemons: Vec<Process>,
    /// The cgroup root's name, made in every hierarchy; removed on stop.
    cgroup_root: Option<String>,
    dir: PathBuf,
    name: String,
}

impl Node {
    /// Lays out the node under `dir`, starts its init, containerd (with
    /// `images` imported), kubelet and kube-proxy.
    pub fn start(dir: &Path, spec: &NodeSpec<'_>, images: &[ImageArchive]) -> Result<Self> {
        let d = |sub: &str| dir.join(sub);
        for sub in [
            "etc-upper/containerd/certs.d",
            "etc-work",
            "var-upper",
            "var-work",
            "run",
            "containerd/root",
            "containerd/state",
            "cni",
            "kubelet",
            "sysctl",
            "logs",
        ] {
            std::fs::create_dir_all(d(sub)).ctx(|| format!("creating {}", d(sub).display()))?;
        }
        let write = |path: PathBuf, text: &str| -> Result<()> {
            std::fs::write(&path, text).ctx(|| format!("writing {}", path.display()))
        };
        // Written into the overlay's upper layer before it is mounted: the
        // node's files as the agent will find them.
        write(d("etc-upper/hosts"), spec.hosts)?;
        write(
            d("etc-upper/containerd/config.toml"),
            &containerd_config(dir),
        )?;
        write(
            d("cni/10-pullthrough-test.conflist"),
            &cni_conflist(spec.pod_cidr),
        )?;
        // kubelet's "kernel tunables", at the values it wants: it reads
        // them and leaves them alone (it would otherwise write them, and
        // they are machine-wide).
        for (file, value) in [
            ("overcommit_memory", "1\n"),
            ("panic", "10\n"),
            ("panic_on_oops", "1\n"),
        ] {
            write(d(&format!("sysctl/{file}")), value)?;
        }

        let cgroup_root = format!("/pullthrough-test-{}-{}", std::process::id(), spec.name);
        make_cgroup_root(&cgroup_root)?;
        let mut node = Self {
            init: None,
            init_pid: 0,
            daemons: Vec::new(),
            cgroup_root: Some(cgroup_root.clone()),
            dir: dir.to_path_buf(),
            name: spec.name.to_string(),
        };

        let script = format!(
            r#"set -e
D='{dir}'
mount --make-rshared /
mount -t overlay overlay -o lowerdir=/etc,upperdir=$D/etc-upper,workdir=$D/etc-work /etc
mount -t overlay overlay -o lowerdir=/var,upperdir=$D/var-upper,workdir=$D/var-work /var
mount --bind $D/run /run
mount --bind $D/sysctl/overcommit_memory /proc/sys/vm/overcommit_memory
mount --bind $D/sysctl/panic /proc/sys/kernel/panic
mount --bind $D/sysctl/panic_on_oops /proc/sys/kernel/panic_on_oops
: > $D/init-ready
exec sleep 2147483647
"#,
            dir = dir.display()
        );
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", spec.netns))
            .args(["--", "unshare", "--mount", "--propagation", "private"])
            // --kill-child: the init dies with unshare, and with it every
            // process in the PID namespace.
            .args(["--pid", "--fork", "--kill-child", "--mount-proc"])
            .args(["--", "sh", "-c"])
            .arg(script);
        let mut init = Process::spawn("node-init", cmd, d("logs/init.log"))?;
        let ready = d("init-ready");
        let unshare_pid = init.pid();
        let mut child = 0;
        init.wait_ready("the node's namespaces", START_TIMEOUT, || {
            child = children(unshare_pid).first().copied().unwrap_or(0);
            Ok(child != 0 && ready.exists() && comm(child).as_deref() == Some("sleep"))
        })?;
        node.init = Some(init);
        node.init_pid = child;

        // containerd, then the images (no registry is ever asked for them).
        let mut ctd = node.spawn(
            "containerd",
            system_tool("containerd")?,
            ["--config", "/etc/containerd/config.toml"],
        )?;
        let sock_ok = |node: &Node| {
            node.exec("ctr", ["--timeout", "2s", "version"])
                .and_then(|mut c| run(&mut c))
                .is_ok()
        };
        ctd.wait_ready("containerd in the node", START_TIMEOUT, || {
            Ok(sock_ok(&node))
        })?;
        node.daemons.push(ctd);
        for image in images {
            node.ctr(&[
                OsStr::new("images"),
                OsStr::new("import"),
                image.archive.as_os_str(),
            ])?;
        }

        let kubelet_config = d("kubelet.yaml");
        write(
            kubelet_config.clone(),
            &kubelet_yaml(spec, &cgroup_root, &d("resolv.conf")),
        )?;
        // No cluster DNS: pods get this resolver, which answers nothing
        // (nothing in the test resolves names through DNS).
        write(d("resolv.conf"), "nameserver 127.0.0.1\n")?;
        let kubelet = node.spawn(
            "kubelet",
            go_tool("kubelet")?,
            [
                format!("--config={}", kubelet_config.display()),
                format!("--kubeconfig={}", spec.kubelet_kubeconfig.display()),
                format!("--root-dir={}", d("kubelet").display()),
                format!("--cert-dir={}", d("kubelet/pki").display()),
                format!("--hostname-override={}", spec.name),
                format!("--node-ip={}", spec.ip),
            ],
        )?;
        node.daemons.push(kubelet);

        let proxy_config = d("kube-proxy.yaml");
        write(proxy_config.clone(), &kube_proxy_yaml(spec))?;
        let kube_proxy = node.spawn(
            "kube-proxy",
            go_tool("kube-proxy")?,
            [format!("--config={}", proxy_config.display())],
        )?;
        node.daemons.push(kube_proxy);
        Ok(node)
    }

    /// `program args...` inside the node (its network, mount and PID
    /// namespaces).
    pub fn exec<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<Command>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        if self.init_pid == 0 {
            return Err(Error::Other("the node is not running".into()));
        }
        let mut c = Command::new("nsenter");
        c.arg("-t")
            .arg(self.init_pid.to_string())
            .args(["--net", "--mount", "--pid", "--"])
            .arg(program)
            .args(args);
        Ok(c)
    }

    fn spawn<I, S>(&self, name: &str, program: impl AsRef<OsStr>, args: I) -> Result<Process>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let cmd = self.exec(program, args)?;
        Process::spawn(name, cmd, self.dir.join(format!("logs/{name}.log")))
    }

    /// `ctr -n k8s.io ARGS...` in the node; stdout.
    pub fn ctr<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String> {
        let mut all: Vec<&OsStr> = vec![OsStr::new("-n"), OsStr::new("k8s.io")];
        all.extend(args.iter().map(AsRef::as_ref));
        run(&mut self.exec("ctr", all)?)
    }

    /// `crictl ARGS...` against the node's containerd; stdout.
    pub fn crictl(&self, args: &[&str]) -> Result<String> {
        let mut all = vec![
            "--runtime-endpoint=unix:///run/containerd/containerd.sock",
            "--image-endpoint=unix:///run/containerd/containerd.sock",
            "--timeout=30s",
        ];
        all.extend_from_slice(args);
        let mut cmd = self.exec(go_tool("crictl")?, all)?;
        // No /etc/crictl.yaml lookup noise; the flags say everything.
        cmd.env("CRI_CONFIG_FILE", "/dev/null");
        run(&mut cmd)
    }

    /// The node's view of `path` (through its init's root: overlays and
    /// bind mounts included).
    pub fn path(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.init_pid)).join(path.trim_start_matches('/'))
    }

    /// Every regular file and symlink under the node's `roots` (absolute
    /// node paths), with its bytes (a symlink: `-> target`); a missing root
    /// is recorded as absent. Equal snapshots: byte-identical files.
    pub fn snapshot(&self, roots: &[&str]) -> Result<BTreeMap<String, Vec<u8>>> {
        let mut out = BTreeMap::new();
        for root in roots {
            let p = self.path(root);
            if std::fs::symlink_metadata(&p).is_err() {
                out.insert(format!("{root} (absent)"), Vec::new());
                continue;
            }
            walk(&p, root, &mut out)?;
        }
        Ok(out)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Last lines of each daemon's log.
    pub fn log_tails(&self, bytes: u64) -> String {
        crate::process::log_tails(&self.daemons, bytes)
    }

    /// Kills the node's init (by PID), which ends every process in the
    /// node; reaps the daemons' handles and removes the cgroup root.
    pub fn stop(&mut self) {
        if let Some(mut init) = self.init.take() {
            let _ = init.kill();
        }
        if self.init_pid != 0 {
            let pid = self.init_pid;
            let _ = wait_for("the node's init to exit", Duration::from_secs(20), || {
                Ok(!Path::new(&format!("/proc/{pid}")).exists())
            });
            self.init_pid = 0;
        }
        while let Some(mut p) = self.daemons.pop() {
            let _ = p.kill();
        }
        crate::containerd::kill_processes_using(&self.dir);
        if let Some(name) = self.cgroup_root.take() {
            remove_cgroups(&name);
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

fn walk(path: &Path, shown: &str, out: &mut BTreeMap<String, Vec<u8>>) -> Result<()> {
    let meta = std::fs::symlink_metadata(path).ctx(|| format!("stat {}", path.display()))?;
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(path).ctx(|| format!("readlink {}", path.display()))?;
        out.insert(
            shown.to_string(),
            format!("-> {}", target.display()).into_bytes(),
        );
    } else if meta.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path)
            .ctx(|| format!("listing {}", path.display()))?
            .filter_map(|e| e.ok())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        out.insert(format!("{shown}/"), Vec::new());
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            walk(&e.path(), &format!("{shown}/{name}"), out)?;
        }
    } else {
        let bytes = std::fs::read(path).ctx(|| format!("reading {}", path.display()))?;
        out.insert(shown.to_string(), bytes);
    }
    Ok(())
}

/// PIDs of `pid`'s children.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Creates `root` in every cgroup v1 hierarchy (cpuset initialised from
/// its parent) or in the v2 hierarchy.
fn make_cgroup_root(root: &str) -> Result<()> {
    let base = Path::new("/sys/fs/cgroup");
    let v2 = base.join("cgroup.controllers").exists();
    let hierarchies: Vec<PathBuf> = if v2 {
        vec![base.to_path_buf()]
    } else {
        std::fs::read_dir(base)
            .ctx(|| "listing /sys/fs/cgroup".into())?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.join("cgroup.procs").exists() && !p.join("cgroup.controllers").exists())
            .collect()
    };
    for h in hierarchies {
        let dir = h.join(root.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).ctx(|| format!("creating cgroup {}", dir.display()))?;
        if h.ends_with("cpuset") {
            for f in ["cpuset.cpus", "cpuset.mems"] {
                let v = std::fs::read_to_string(h.join(f))
                    .ctx(|| format!("reading {}", h.join(f).display()))?;
                std::fs::write(dir.join(f), v.trim())
                    .ctx(|| format!("writing {}", dir.join(f).display()))?;
            }
        }
    }
    Ok(())
}

/// Removes the tree `root` from every hierarchy depth-first — also from
/// those the test did not create it in, where runc mirrors it (cgroup v1's
/// `unified`). A cgroup goes once its processes have exited; retried
/// briefly while the kernel finishes.
fn remove_cgroups(root: &str) {
    let base = Path::new("/sys/fs/cgroup");
    let root = root.trim_start_matches('/');
    let mut roots = vec![base.join(root)];
    if let Ok(rd) = std::fs::read_dir(base) {
        roots.extend(rd.filter_map(|e| e.ok()).map(|e| e.path().join(root)));
    }
    fn dirs(p: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(rd) = std::fs::read_dir(p) {
            for e in rd.filter_map(|e| e.ok()) {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs(&e.path(), out);
                }
            }
        }
        out.push(p.to_path_buf());
    }
    for tree in roots {
        let mut all = Vec::new();
        dirs(&tree, &mut all);
        for d in all {
            let _ = wait_for("cgroup removal", Duration::from_secs(10), || {
                Ok(std::fs::remove_dir(&d).is_ok() || !d.exists())
            });
        }
    }
}

fn cni_conflist(subnet: &str) -> String {
    format!(
        r#"{{
  "cniVersion": "0.4.0",
  "name": "pullthrough-test",
  "plugins": [
    {{
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {{
        "type": "host-local",
        "ranges": [[{{"subnet": "{subnet}"}}]],
        "routes": [{{"dst": "0.0.0.0/0"}}]
      }}
    }},
    {{"type": "portmap", "capabilities": {{"portMappings": true}}}}
  ]
}}
"#
    )
}

fn containerd_config(dir: &Path) -> String {
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
{DISABLED_PLUGINS}

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # This sandbox refuses negative oom_score_adj even to root; containerd
  # then keeps containers' scores at or above its own instead of failing.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "/etc/containerd/certs.d"
"#,
        DISABLED_PLUGINS = crate::containerd::DISABLED_PLUGINS,
        root = dir.join("containerd/root").display(),
        state = dir.join("containerd/state").display(),
        cni = dir.join("cni").display(),
    )
}

fn kubelet_yaml(spec: &NodeSpec<'_>, cgroup_root: &str, resolv: &Path) -> String {
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: "{ca}"}}
authorization: {{mode: Webhook}}
cgroupDriver: cgroupfs
cgroupRoot: "{cgroup_root}"
cgroupsPerQOS: true
failSwapOn: false
failCgroupV1: false
resolvConf: "{resolv}"
clusterDomain: cluster.local
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
address: "{ip}"
port: 10250
healthzBindAddress: 127.0.0.1
healthzPort: 10248
# The machine's disk and memory are shared with the rest of the suite (and
# on CI with a fresh cargo target): never evict or garbage-collect the
# test's pods and images. "0%" switches a signal off; any other threshold,
# even 1%, can trip on a nearly full build disk and taint both nodes.
evictionHard: {{memory.available: "0%", nodefs.available: "0%", imagefs.available: "0%", nodefs.inodesFree: "0%", imagefs.inodesFree: "0%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
syncFrequency: 5s
fileCheckFrequency: 5s
nodeStatusUpdateFrequency: 5s
"#,
        ca = spec.client_ca.display(),
        resolv = resolv.display(),
        ip = spec.ip,
    )
}

fn kube_proxy_yaml(spec: &NodeSpec<'_>) -> String {
    format!(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {{kubeconfig: "{kc}"}}
mode: iptables
clusterCIDR: 10.244.0.0/16
hostnameOverride: {name}
bindAddress: "{ip}"
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: [primary]
# conntrack limits are machine-wide settings: leave them alone.
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
"#,
        kc = spec.proxy_kubeconfig.display(),
        name = spec.name,
        ip = spec.ip,
    )
}

//! A real Kubernetes control plane on loopback: etcd plus kube-apiserver
//! (no controller-manager, no scheduler, no kubelet), with an admin
//! kubeconfig, ServiceAccount tokens, and the `kubectl`, `helm` and
//! `kubeconform` tools pointed at it.
//!
//! Without a controller-manager nothing creates ServiceAccounts or collects
//! garbage, and Deployments are stored but never run: tests create what they
//! need explicitly and run the project's programs as processes authenticated
//! with a ServiceAccount token ([`KubeApiserver::kubeconfig_for_token`]).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value, json};
use tempfile::TempDir;

use crate::error::{Error, IoContext, Result};
use crate::http::Get;
use crate::net::free_port;
use crate::process::{Process, run, run_stdin};
use crate::tls::TestCa;
use crate::tools::{go_tool, system_tool};

/// etcd start-up is quick; this only bounds a broken start.
const ETCD_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// kube-apiserver on 2 cores needs 10–30 s; be generous.
const APISERVER_READY_TIMEOUT: Duration = Duration::from_secs(120);

fn tempdir(prefix: &str) -> Result<TempDir> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .ctx(|| format!("creating temp dir {prefix}*"))
}

fn write(path: &Path, contents: impl AsRef<[u8]>) -> Result<()> {
    std::fs::write(path, contents).ctx(|| format!("writing {}", path.display()))
}

/// A single-member etcd on 127.0.0.1 with its own data dir.
pub struct Etcd {
    process: Process,
    client_url: String,
    dir: TempDir,
}

impl Etcd {
    /// Starts `etcd` (Debian's `etcd-server`) and waits until `/health`
    /// reports healthy.
    pub fn start() -> Result<Etcd> {
        let etcd = system_tool("etcd")?;
        let dir = tempdir("pullthrough-etcd-")?;
        let client_url = format!("http://127.0.0.1:{}", free_port()?);
        let peer_url = format!("http://127.0.0.1:{}", free_port()?);
        let mut cmd = Command::new(etcd);
        cmd.arg("--name=testbed")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=testbed={peer_url}"))
            .arg("--initial-cluster-state=new")
            .arg("--initial-cluster-token=pullthrough-testbed")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr");
        let mut process = Process::spawn("etcd", cmd, dir.path().join("etcd.log"))?;
        let health = format!("{client_url}/health");
        process.wait_ready(&format!("etcd at {client_url}"), ETCD_READY_TIMEOUT, || {
            Ok(Get::new(&health)
                .send()
                .is_ok_and(|r| r.status.is_success() && r.body.windows(4).any(|w| w == b"true")))
        })?;
        Ok(Etcd {
            process,
            client_url,
            dir,
        })
    }

    /// `http://127.0.0.1:<port>`, for `--etcd-servers`.
    pub fn client_url(&self) -> &str {
        &self.client_url
    }

    pub fn process(&mut self) -> &mut Process {
        &mut self.process
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// kube-apiserver on 127.0.0.1 backed by its own [`Etcd`]; dropping it stops
/// the API server, then etcd, then removes its files.
pub struct KubeApiserver {
    process: Process,
    etcd: Etcd,
    dir: TempDir,
    addr: SocketAddr,
    url: String,
    ca: TestCa,
    kubeconfig: PathBuf,
    kubectl: PathBuf,
    next_file: AtomicU32,
}

impl KubeApiserver {
    /// Starts etcd and kube-apiserver (RBAC, client-certificate and
    /// ServiceAccount-token authentication) and waits until `/readyz` is 200.
    /// Blocking: from async code call it inside `spawn_blocking`.
    pub fn start() -> Result<KubeApiserver> {
        let apiserver = go_tool("kube-apiserver")?;
        let kubectl = go_tool("kubectl")?;
        let etcd = Etcd::start()?;
        let dir = tempdir("pullthrough-apiserver-")?;
        let pki = dir.path().join("pki");
        std::fs::create_dir(&pki).ctx(|| format!("creating {}", pki.display()))?;

        let port = free_port()?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let url = format!("https://{addr}");

        let ca = TestCa::new("pullthrough-testbed-kube-ca")?;
        let ca_file = pki.join("ca.crt");
        ca.write_cert(&ca_file)?;
        let serving = ca.server(&[
            "127.0.0.1",
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
        ])?;
        let (serving_crt, serving_key) = serving.write(&pki, "apiserver")?;
        // ServiceAccount token signing key: rcgen's ECDSA P-256 (PKCS#8 PEM,
        // which the signing-key parser accepts); the verifying side gets the
        // SPKI public key, because its parser takes only SEC 1 EC private keys.
        let sa_key = rcgen::KeyPair::generate()?;
        let sa_key_file = pki.join("sa.key");
        let sa_pub_file = pki.join("sa.pub");
        write(&sa_key_file, sa_key.serialize_pem())?;
        write(&sa_pub_file, sa_key.public_key_pem())?;

        let mut cmd = Command::new(apiserver);
        cmd.arg(format!("--etcd-servers={}", etcd.client_url()))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--secure-port={port}"))
            .arg(format!("--cert-dir={}", dir.path().join("certs").display()))
            .arg(format!("--tls-cert-file={}", serving_crt.display()))
            .arg(format!("--tls-private-key-file={}", serving_key.display()))
            .arg(format!("--client-ca-file={}", ca_file.display()))
            .arg("--authorization-mode=Node,RBAC")
            // As on real clusters (kubeadm, kind, managed offerings): the
            // node agent's DaemonSet is privileged.
            .arg("--allow-privileged=true")
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!(
                "--service-account-key-file={}",
                sa_pub_file.display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                sa_key_file.display()
            ))
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            // The default "lease" reconciler would publish 127.0.0.1 as the
            // endpoint of the `kubernetes` Service, which validation rejects.
            .arg("--endpoint-reconciler-type=none")
            .arg("--profiling=false");
        let mut process = Process::spawn("kube-apiserver", cmd, dir.path().join("apiserver.log"))?;

        let ca_pem = ca.cert_pem();
        let readyz = format!("{url}/readyz");
        // Anonymous requests may read /readyz once the RBAC bootstrap roles
        // exist, and /readyz turns 200 only after every post-start hook ran.
        process.wait_ready(
            &format!("kube-apiserver /readyz at {url}"),
            APISERVER_READY_TIMEOUT,
            || {
                Ok(Get::new(&readyz)
                    .ca(&ca_pem)
                    .send()
                    .is_ok_and(|r| r.status.is_success()))
            },
        )?;

        let admin = ca.client("admin", &["system:masters"])?;
        let kubeconfig = dir.path().join("admin.kubeconfig");
        write(
            &kubeconfig,
            kubeconfig_json(
                &url,
                &ca_pem,
                json!({
                    "client-certificate-data": base64(admin.cert_pem.as_bytes()),
                    "client-key-data": base64(admin.key_pem.as_bytes()),
                }),
            ),
        )?;

        let api = KubeApiserver {
            process,
            etcd,
            dir,
            addr,
            url,
            ca,
            kubeconfig,
            kubectl,
            next_file: AtomicU32::new(0),
        };
        // The admin identity works (client certificate, system:masters).
        let ready = api.kubectl(&["get", "--raw", "/readyz"])?;
        if ready.trim() != "ok" {
            return Err(Error::Other(format!(
                "kube-apiserver /readyz as admin said {ready:?}"
            )));
        }
        Ok(api)
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The CA that signed the serving and client certificates.
    pub fn ca_pem(&self) -> String {
        self.ca.cert_pem()
    }

    /// The CA itself, to mint more client certificates (CN = user, O = groups).
    pub fn ca(&self) -> &TestCa {
        &self.ca
    }

    /// An admin (system:masters) kubeconfig with everything embedded.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn process(&mut self) -> &mut Process {
        &mut self.process
    }

    pub fn etcd(&self) -> &Etcd {
        &self.etcd
    }

    /// The API server's temp dir (logs, PKI, kubeconfigs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `kubectl --kubeconfig <admin> ARGS...`; stdout.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_with(&self.kubeconfig, args)
    }

    /// `kubectl get ARGS... -o json` as admin, parsed; `None` when kubectl
    /// fails (e.g. the object does not exist). Output that is not JSON
    /// fails the test: kubectl broke its contract.
    pub fn get_json(&self, args: &[&str]) -> Option<Value> {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        self.kubectl(&all).ok().map(|s| {
            serde_json::from_str(&s)
                .unwrap_or_else(|e| panic!("kubectl {all:?} printed no JSON ({e}): {s}"))
        })
    }

    /// `kubectl` as whoever `kubeconfig` authenticates.
    pub fn kubectl_with(&self, kubeconfig: &Path, args: &[&str]) -> Result<String> {
        run(self.kubectl_cmd(kubeconfig).args(args))
    }

    /// `kubectl --kubeconfig <admin> ARGS...` with `input` on stdin (for
    /// `apply -f -`).
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Result<String> {
        run_stdin(self.kubectl_cmd(&self.kubeconfig).args(args), input)
    }

    fn kubectl_cmd(&self, kubeconfig: &Path) -> Command {
        let mut cmd = Command::new(&self.kubectl);
        cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
            // kubectl's discovery cache lives under $HOME unless told
            // otherwise; keep it in our temp dir.
            .arg(format!(
                "--cache-dir={}",
                self.dir.path().join("kubectl-cache").display()
            ));
        cmd
    }

    /// Applies CustomResourceDefinitions (YAML, possibly several) and waits
    /// until the API server serves each (`Established`).
    pub fn apply_crds(&self, yaml: &str) -> Result<()> {
        let names = self.kubectl_stdin(&["apply", "-f", "-", "-o", "name"], yaml)?;
        for name in names.lines().map(str::trim).filter(|n| !n.is_empty()) {
            self.kubectl(&["wait", "--for=condition=Established", name, "--timeout=60s"])?;
        }
        Ok(())
    }

    /// A client with the admin identity.
    pub async fn client(&self) -> Result<::kube::Client> {
        client_for_kubeconfig(&self.kubeconfig).await
    }

    /// Creates (idempotently) the namespace `ns` and the ServiceAccount
    /// `name` in it; nothing else would, without a controller-manager.
    pub fn create_service_account(&self, ns: &str, name: &str) -> Result<()> {
        let manifest = json!({
            "apiVersion": "v1",
            "kind": "List",
            "items": [
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
                {"apiVersion": "v1", "kind": "ServiceAccount",
                 "metadata": {"name": name, "namespace": ns}},
            ],
        });
        self.kubectl_stdin(&["apply", "-f", "-"], &manifest.to_string())?;
        Ok(())
    }

    /// A fresh token for ServiceAccount `ns/sa` (TokenRequest, 1 h).
    pub fn token_for(&self, ns: &str, sa: &str) -> Result<String> {
        let token = self.kubectl(&["create", "token", sa, "-n", ns])?;
        let token = token.trim();
        if token.is_empty() {
            return Err(Error::Other(format!("empty token for {ns}/{sa}")));
        }
        Ok(token.to_string())
    }

    /// A token for ServiceAccount `ns/sa` bound to a Pod on `node`, as the
    /// kubelet hands one to a DaemonSet's pod: the API server puts the
    /// node's name in the request's user info
    /// (`authentication.kubernetes.io/node-name`). The Node and the Pod
    /// `<sa>-<node>` are created (stored only: nothing runs them).
    pub fn pod_token_on_node(&self, ns: &str, sa: &str, node: &str) -> Result<String> {
        let pod = format!("{sa}-{node}");
        let objects = json!({"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}},
            {"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": pod, "namespace": ns},
             "spec": {"nodeName": node, "serviceAccountName": sa,
                      "automountServiceAccountToken": false,
                      "containers": [{"name": "main", "image": "pullthrough-test:none"}]}},
        ]});
        self.kubectl_stdin(&["apply", "-f", "-"], &objects.to_string())?;
        let token = self.kubectl(&[
            "create",
            "token",
            sa,
            "-n",
            ns,
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            &pod,
        ])?;
        let token = token.trim();
        if token.is_empty() {
            return Err(Error::Other(format!("empty token for {ns}/{sa} on {node}")));
        }
        Ok(token.to_string())
    }

    /// Waits until `kubectl create --dry-run=server` of `manifest` as
    /// whoever `kubeconfig` authenticates is refused with an error that
    /// contains `because`, and returns the error: an admission policy is
    /// enforced only once the API server's informer has it, a moment after
    /// it was created. Any other error (a bad token, a typo in the
    /// manifest) is not that refusal: the wait goes on, and its timeout
    /// says what the last error was.
    pub fn wait_until_refused(
        &self,
        kubeconfig: &Path,
        manifest: &str,
        because: &str,
        timeout: Duration,
    ) -> Result<String> {
        let mut why = String::new();
        let flag = format!("--kubeconfig={}", kubeconfig.display());
        let args = [flag.as_str(), "create", "--dry-run=server", "-f", "-"];
        crate::net::wait_for(
            "the API server to refuse the object",
            timeout,
            || match self.kubectl_stdin(&args, manifest) {
                Ok(_) => Ok(false),
                Err(e) => {
                    why = e.to_string();
                    Ok(why.contains(because))
                }
            },
        )
        .map_err(|e| Error::Other(format!("{e}; last error: {why}")))?;
        Ok(why)
    }

    /// Writes a kubeconfig that authenticates with `token` (and trusts the
    /// API server's CA), so a component runs with exactly its RBAC.
    pub fn kubeconfig_for_token(&self, token: &str) -> Result<PathBuf> {
        let n = self.next_file.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.path().join(format!("token-{n}.kubeconfig"));
        write(
            &path,
            kubeconfig_json(&self.url, &self.ca_pem(), json!({ "token": token })),
        )?;
        Ok(path)
    }

    /// A [`Helm`] pointed at this API server as admin.
    pub fn helm(&self) -> Result<Helm> {
        Helm::new(Some(&self.kubeconfig))
    }

    /// Applies what the chart lets each program do ([`CHART_ACCESS_KINDS`]:
    /// ServiceAccounts, RBAC, the agents' Lease policy), rendered with
    /// default values as `release` in `ns`, so that a test can act as the
    /// chart's identities.
    pub fn apply_chart_access(&self, release: &str, ns: &str) -> Result<()> {
        let access = self
            .helm()?
            .chart_objects(release, ns, CHART_ACCESS_KINDS)?;
        self.kubectl_stdin(&["apply", "-f", "-"], &access)?;
        Ok(())
    }

    /// A [`Kubeconform`] that validates against JSON schemas generated from
    /// this API server's `/openapi/v2`: built-in kinds and the CRDs published
    /// there at the moment of the call. CRDs appear in `/openapi/v2` a little
    /// after they are Established: name the ones you need in
    /// [`Self::kubeconform_with`].
    pub fn kubeconform(&self) -> Result<Kubeconform> {
        self.kubeconform_with(&[])
    }

    /// Like [`Self::kubeconform`], first waiting (up to 60 s) until every
    /// `(apiVersion, kind)` in `kinds`, e.g. `("example.dev/v1", "Widget")`,
    /// is in `/openapi/v2`.
    pub fn kubeconform_with(&self, kinds: &[(&str, &str)]) -> Result<Kubeconform> {
        let mut openapi = Value::Null;
        let mut missing = Vec::new();
        crate::net::wait_for(
            &format!("{kinds:?} in the API server's /openapi/v2"),
            Duration::from_secs(60),
            || {
                openapi = serde_json::from_str(&self.kubectl(&["get", "--raw", "/openapi/v2"])?)?;
                missing = kinds
                    .iter()
                    .filter(|(v, k)| !openapi_has_kind(&openapi, v, k))
                    .collect();
                Ok(missing.is_empty())
            },
        )?;
        let schemas = tempdir("pullthrough-schemas-")?;
        let n = write_json_schemas(&openapi, schemas.path())?;
        if n == 0 {
            return Err(Error::Other(
                "no kinds in the API server's /openapi/v2".into(),
            ));
        }
        Kubeconform::new(schemas)
    }

    /// Stops the API server, then etcd.
    pub fn stop(&mut self) -> Result<()> {
        self.process.stop()?;
        self.etcd.process.stop()?;
        Ok(())
    }
}

impl Drop for KubeApiserver {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// A kube client from a kubeconfig file (its current context).
pub async fn client_for_kubeconfig(path: &Path) -> Result<::kube::Client> {
    let kubeconfig =
        ::kube::config::Kubeconfig::read_from(path).map_err(::kube::Error::InferKubeconfig)?;
    let config = ::kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &::kube::config::KubeConfigOptions::default(),
    )
    .await
    .map_err(::kube::Error::InferKubeconfig)?;
    Ok(::kube::Client::try_from(config)?)
}

/// A one-cluster, one-user kubeconfig (JSON, which is YAML).
pub(crate) fn kubeconfig_json(url: &str, ca_pem: &str, user: Value) -> String {
    json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "testbed", "cluster": {
            "server": url,
            "certificate-authority-data": base64(ca_pem.as_bytes()),
        }}],
        "users": [{"name": "testbed", "user": user}],
        "contexts": [{"name": "testbed", "context": {"cluster": "testbed", "user": "testbed"}}],
        "current-context": "testbed",
    })
    .to_string()
}

/// Standard base64 with padding (kubeconfig `*-data` fields).
pub(crate) fn base64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// `helm` with private cache/config/data homes and `$HOME` (nothing under
/// the real `$HOME`, not even the discovery cache) and,
/// when given, a kubeconfig.
pub struct Helm {
    bin: PathBuf,
    home: TempDir,
    kubeconfig: Option<PathBuf>,
    netns: Option<String>,
}

impl Helm {
    pub fn new(kubeconfig: Option<&Path>) -> Result<Helm> {
        Ok(Helm {
            bin: go_tool("helm")?,
            home: tempdir("pullthrough-helm-")?,
            kubeconfig: kubeconfig.map(Path::to_path_buf),
            netns: None,
        })
    }

    /// Runs helm inside the network namespace `name` (an API server that
    /// listens only there).
    pub fn in_netns(mut self, name: &str) -> Self {
        self.netns = Some(name.to_string());
        self
    }

    fn cmd(&self) -> Command {
        let no_args: [&str; 0] = [];
        let mut cmd = crate::ns::maybe_in_netns(self.netns.as_deref(), &self.bin, no_args);
        let home = self.home.path();
        cmd.env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            // helm keeps the Kubernetes discovery cache in $HOME/.kube/cache.
            .env("HOME", home)
            .env("KUBECACHEDIR", home.join("kube-cache"))
            .env_remove("KUBECONFIG");
        if let Some(kubeconfig) = &self.kubeconfig {
            cmd.arg(format!("--kubeconfig={}", kubeconfig.display()));
        }
        cmd
    }

    /// `helm ARGS...`; stdout.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        run(self.cmd().args(args))
    }

    /// The chart `charts/pullthrough` rendered with default values as
    /// `release` in `ns`, keeping only the objects whose kind is in `kinds`
    /// (e.g. [`CHART_ACCESS_KINDS`]), as one YAML stream.
    pub fn chart_objects(&self, release: &str, ns: &str, kinds: &[&str]) -> Result<String> {
        let chart = workspace_dir()?.join("charts/pullthrough");
        let chart = chart
            .to_str()
            .ok_or_else(|| Error::Other(format!("chart path {} is not UTF-8", chart.display())))?;
        let out = self.run(&["template", release, chart, "--namespace", ns])?;
        let docs: Vec<&str> = out
            .split("\n---")
            .filter(|doc| {
                doc.lines()
                    .find_map(|l| l.strip_prefix("kind: "))
                    .is_some_and(|k| kinds.contains(&k.trim()))
            })
            .collect();
        Ok(docs.join("\n---\n"))
    }
}

/// Every document of a YAML stream (what `helm template` prints), as JSON
/// values; empty documents are skipped.
pub fn yaml_documents(stream: &str) -> Result<Vec<Value>> {
    serde_norway::Deserializer::from_str(stream)
        .map(|doc| Value::deserialize(doc).map_err(|e| Error::Other(format!("rendered YAML: {e}"))))
        .filter(|doc| !matches!(doc, Ok(Value::Null)))
        .collect()
}

/// The kinds that make up what the chart lets each program do: its
/// ServiceAccounts, RBAC, and the agents' Lease admission policy. Tests that
/// run the programs as processes apply these instead of the workloads.
pub const CHART_ACCESS_KINDS: &[&str] = &[
    "ServiceAccount",
    "Role",
    "ClusterRole",
    "RoleBinding",
    "ClusterRoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
];

/// The workspace's root directory (the parent of the test bed crate).
pub fn workspace_dir() -> Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| Error::Other("the test bed crate has no parent directory".into()))
}

/// Every CRD the chart ships (`charts/pullthrough/crds/*.yaml`), as one
/// multi-document YAML: what `helm install` applies first.
pub fn chart_crds() -> Result<String> {
    let dir = workspace_dir()?.join("charts/pullthrough/crds");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .ctx(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for f in files {
        docs.push(std::fs::read_to_string(&f).ctx(|| format!("reading {}", f.display()))?);
    }
    Ok(docs.join("---\n"))
}

/// `kubeconform` reading only local schemas from `schemas` (never the
/// network: no default schema location is passed).
pub struct Kubeconform {
    bin: PathBuf,
    schemas: TempDir,
}

impl Kubeconform {
    /// Uses the schema files in `schemas`, named like kubeconform's
    /// `{{ .ResourceKind }}{{ .KindSuffix }}.json` (see [`write_json_schemas`]).
    pub fn new(schemas: TempDir) -> Result<Kubeconform> {
        Ok(Kubeconform {
            bin: go_tool("kubeconform")?,
            schemas,
        })
    }

    pub fn schema_dir(&self) -> &Path {
        self.schemas.path()
    }

    /// `kubeconform -schema-location <local> ARGS...` with `stdin`; stdout.
    pub fn run(&self, args: &[&str], stdin: &str) -> Result<String> {
        let location = format!(
            "{}/{{{{ .ResourceKind }}}}{{{{ .KindSuffix }}}}.json",
            self.schemas.path().display()
        );
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-schema-location").arg(location).args(args);
        run_stdin(&mut cmd, stdin)
    }
}

/// Writes one standalone, strict JSON schema per kind found in an OpenAPI v2
/// document (`x-kubernetes-group-version-kind`), named as kubeconform looks
/// them up: `<kind>-<version>.json` for the core group,
/// `<kind>-<first label of group>-<version>.json` otherwise. Like
/// `openapi2jsonschema --strict`: objects with properties forbid unknown
/// ones, int-or-string and quantities accept strings and numbers, and
/// fields may be null. Returns how many files it wrote.
pub fn write_json_schemas(openapi: &Value, dir: &Path) -> Result<usize> {
    let defs = openapi
        .get("definitions")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::Other("OpenAPI v2 document has no definitions".into()))?;
    let mut written = std::collections::BTreeSet::new();
    for (name, schema) in defs {
        let Some(gvks) = schema
            .get("x-kubernetes-group-version-kind")
            .and_then(Value::as_array)
        else {
            continue;
        };
        // Only top-level kinds (with apiVersion/kind fields), not e.g. the
        // shared DeleteOptions/WatchEvent that list every group.
        let props = schema.get("properties");
        if props.and_then(|p| p.get("kind")).is_none()
            || props.and_then(|p| p.get("metadata")).is_none()
        {
            continue;
        }
        for gvk in gvks {
            let field = |k: &str| gvk.get(k).and_then(Value::as_str).unwrap_or("");
            let (group, version, kind) = (field("group"), field("version"), field("kind"));
            if kind.is_empty() || version.is_empty() {
                continue;
            }
            let suffix = match group.split('.').next() {
                Some(first) if !group.is_empty() => format!("-{first}-{version}"),
                _ => format!("-{version}"),
            };
            let file = format!("{}{}.json", kind.to_lowercase(), suffix.to_lowercase());
            // Two groups may share a first label and a kind: the first one
            // wins, except that a built-in `*.k8s.io` group replaces it.
            if !written.insert(file.clone()) && !group.ends_with(".k8s.io") {
                continue;
            }
            let standalone = standalone_schema(name, defs)?;
            write(&dir.join(&file), serde_json::to_vec(&standalone)?)?;
        }
    }
    Ok(written.len())
}

/// True when the OpenAPI v2 document defines `kind` of `api_version`.
fn openapi_has_kind(openapi: &Value, api_version: &str, kind: &str) -> bool {
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    openapi
        .get("definitions")
        .and_then(Value::as_object)
        .is_some_and(|defs| {
            defs.values()
                .filter_map(|d| d.get("x-kubernetes-group-version-kind")?.as_array())
                .flatten()
                .any(|gvk| {
                    gvk.get("group").and_then(Value::as_str) == Some(group)
                        && gvk.get("version").and_then(Value::as_str) == Some(version)
                        && gvk.get("kind").and_then(Value::as_str) == Some(kind)
                })
        })
}

/// `defs[name]` with the definitions it references (transitively) embedded
/// under `definitions`, made strict.
fn standalone_schema(name: &str, defs: &Map<String, Value>) -> Result<Value> {
    let mut needed = std::collections::BTreeMap::new();
    let mut todo = vec![name.to_string()];
    while let Some(n) = todo.pop() {
        if needed.contains_key(&n) {
            continue;
        }
        let def = defs.get(&n).ok_or_else(|| {
            Error::Other(format!("OpenAPI definition {n} is referenced but missing"))
        })?;
        collect_refs(def, &mut todo);
        needed.insert(n, def.clone());
    }
    let mut definitions = Map::new();
    for (n, mut def) in needed {
        strictify(&mut def, &n);
        definitions.insert(n, def);
    }
    let mut root = definitions
        .get(name)
        .cloned()
        .ok_or_else(|| Error::Other(format!("OpenAPI definition {name} missing")))?;
    // The root must not be nullable.
    if let Some(obj) = root.as_object_mut() {
        obj.insert("type".into(), json!("object"));
        obj.insert("definitions".into(), Value::Object(definitions));
        obj.insert(
            "$schema".into(),
            json!("http://json-schema.org/draft-04/schema#"),
        );
    }
    Ok(root)
}

fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(r) = m.get("$ref").and_then(Value::as_str)
                && let Some(n) = r.strip_prefix("#/definitions/")
            {
                out.push(n.to_string());
            }
            m.values().for_each(|v| collect_refs(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

/// Makes one schema node (recursively) strict and null-tolerant.
fn strictify(v: &mut Value, def_name: &str) {
    let Value::Object(m) = v else {
        return;
    };
    let special = match def_name {
        "io.k8s.apimachinery.pkg.util.intstr.IntOrString" => {
            Some(json!(["string", "integer", "null"]))
        }
        "io.k8s.apimachinery.pkg.api.resource.Quantity" => {
            Some(json!(["string", "number", "null"]))
        }
        _ => None,
    };
    if let Some(types) = special {
        m.remove("format");
        m.insert("type".into(), types);
        return;
    }
    if m.get("format").and_then(Value::as_str) == Some("int-or-string") {
        m.remove("format");
        m.insert("type".into(), json!(["string", "integer", "null"]));
    } else if let Some(t) = m.get("type").and_then(Value::as_str) {
        let t = t.to_string();
        m.insert("type".into(), json!([t, "null"]));
    }
    if m.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        m.insert("type".into(), json!(["string", "integer", "null"]));
    }
    let open = m.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if m.contains_key("properties") && !m.contains_key("additionalProperties") && !open {
        m.insert("additionalProperties".into(), Value::Bool(false));
    }
    // A $ref with siblings is not allowed to have them in draft 4; the
    // OpenAPI document only adds descriptions there, which we drop.
    if m.contains_key("$ref") {
        m.retain(|k, _| k == "$ref");
        return;
    }
    for key in ["properties", "patternProperties", "definitions"] {
        if let Some(Value::Object(props)) = m.get_mut(key) {
            props.values_mut().for_each(|p| strictify(p, ""));
        }
    }
    for key in ["items", "additionalProperties", "not"] {
        if let Some(sub) = m.get_mut(key) {
            strictify(sub, "");
        }
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        if let Some(Value::Array(subs)) = m.get_mut(key) {
            subs.iter_mut().for_each(|s| strictify(s, ""));
        }
    }
}

/// The cells of `name`'s row in `kubectl get` output, cut at the header's
/// column offsets (empty cells stay empty, which splitting on whitespace
/// would lose). Panics when there is no such row: a test helper.
pub fn kubectl_row(table: &str, name: &str) -> Vec<String> {
    let header = table.lines().next().unwrap_or_default();
    let mut starts: Vec<usize> = header
        .split_whitespace()
        .filter_map(|h| header.find(h))
        .collect();
    let Some(line) = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
    else {
        panic!("no row {name} in\n{table}");
    };
    starts.push(line.len().max(header.len()));
    starts
        .windows(2)
        .map(|w| {
            line.get(w[0]..w[1].min(line.len()))
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .collect()
}

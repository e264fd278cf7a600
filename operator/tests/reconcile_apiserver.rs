//! The operator as a process against the test bed's real kube-apiserver,
//! authenticated with a ServiceAccount token bound only to
//! `operator/rbac/operator-rbac.yaml`: table ConfigMap, CA Secret/ConfigMap,
//! conditions and printer columns, update, delete with the agent wait,
//! restart without spurious writes, ProxyReady from a fake `/status`,
//! NodesConfigured from a fake agent Lease, and RBAC limits.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pullthrough_api::config::ProxyConfig;
use pullthrough_api::pki::PermittedNames;
use pullthrough_testbed::Error;
use pullthrough_testbed::kube::{KubeApiserver, kubectl_row};
use pullthrough_testbed::net::{free_port, wait_for};
use pullthrough_testbed::process::Process;
use pullthrough_testbed::stub::Stub;
use serde_json::{Value, json};

const NS: &str = "pullthrough";
const SA: &str = "pullthrough-operator";
const TIMEOUT: Duration = Duration::from_secs(60);

fn rbac_yaml() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("rbac/operator-rbac.yaml"))
        .unwrap()
}

/// The CRD (established), the namespace, the operator's ServiceAccount and
/// the shipped RBAC.
fn install(api: &KubeApiserver) {
    api.apply_crds(&pullthrough_operator::crd_yaml().unwrap())
        .unwrap();
    api.create_service_account(NS, SA).unwrap();
    api.kubectl_stdin(&["apply", "-f", "-"], &rbac_yaml())
        .unwrap();
}

fn mreg(api: &KubeApiserver, name: &str) -> Option<Value> {
    api.get_json(&["mreg", name])
}

fn cond<'a>(obj: &'a Value, type_: &str) -> Option<&'a Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// Waits until `name`'s condition `type_` has `status` (and `reason`).
fn wait_cond(api: &KubeApiserver, name: &str, type_: &str, status: &str, reason: Option<&str>) {
    let mut last = Value::Null;
    let r = wait_for(&format!("{name} {type_}={status}"), TIMEOUT, || {
        let Some(o) = mreg(api, name) else {
            return Ok(false);
        };
        last = o.clone();
        Ok(cond(&o, type_)
            .is_some_and(|c| c["status"] == status && reason.is_none_or(|r| c["reason"] == r)))
    });
    if let Err(e) = r {
        panic!("{e}: last seen {:#}", last["status"]);
    }
}

fn table(api: &KubeApiserver) -> Option<(String, ProxyConfig, Value)> {
    let cm = api.get_json(&["cm", "pullthrough-registries", "-n", NS])?;
    let yaml = cm["data"]["config.yaml"].as_str()?.to_string();
    let hash = cm["metadata"]["annotations"]["pullthrough.dev/config-hash"]
        .as_str()?
        .to_string();
    assert_eq!(
        hash,
        pullthrough_api::contract::config_hash(yaml.as_bytes())
    );
    Some((hash, ProxyConfig::from_yaml(&yaml).unwrap(), cm))
}

fn hosts(c: &ProxyConfig) -> Vec<String> {
    c.registries.iter().map(|r| r.host.clone()).collect()
}

fn wait_table(api: &KubeApiserver, what: &str, f: impl Fn(&ProxyConfig) -> bool) -> String {
    let mut hash = String::new();
    wait_for(what, TIMEOUT, || {
        Ok(match table(api) {
            Some((h, c, _)) if f(&c) => {
                hash = h;
                true
            }
            _ => false,
        })
    })
    .unwrap_or_else(|e| panic!("{e}: table {:?}", table(api).map(|t| hosts(&t.1))));
    hash
}

/// A fake proxy `/status` on 127.0.0.1 (the test bed's stub) answering
/// `status` until the test sets another.
fn fake_proxy(status: Value) -> Stub {
    let stub = Stub::canned().start().unwrap();
    stub.set_json("/status", &status);
    stub
}

struct Operator {
    kubeconfig: PathBuf,
    status_port: u16,
    log_dir: PathBuf,
    n: u32,
    /// Flags besides the harness's own.
    args: Vec<String>,
}

impl Operator {
    /// The operator as the release's ServiceAccount on `api`, with the
    /// fake proxy `fake` and `args` besides the harness's own flags.
    fn new(api: &KubeApiserver, fake: &Stub, args: &[&str]) -> Self {
        let token = api.token_for(NS, SA).unwrap();
        Self {
            kubeconfig: api.kubeconfig_for_token(&token).unwrap(),
            status_port: fake.addr().port(),
            log_dir: api.dir().to_path_buf(),
            n: 0,
            args: args.iter().map(|a| a.to_string()).collect(),
        }
    }

    fn start(&mut self) -> (Process, u16) {
        self.n += 1;
        let port = free_port().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pullthrough-operator"));
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .env("RUST_LOG", "info,pullthrough_operator=debug")
            .args(["--namespace", NS, "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--proxy-status-url")
            .arg(format!("http://127.0.0.1:{}/status", self.status_port))
            .args(["--identity", &format!("test-{}", self.n)])
            .args(&self.args);
        if !self.args.iter().any(|a| a == "--resync-interval") {
            cmd.args(["--resync-interval", "1s"]);
        }
        if !self.args.iter().any(|a| a == "--delete-timeout") {
            cmd.args(["--delete-timeout", "30s"]);
        }
        let mut p = Process::spawn(
            "pullthrough-operator",
            cmd,
            self.log_dir.join(format!("operator-{}.log", self.n)),
        )
        .unwrap();
        let healthz = format!("http://127.0.0.1:{port}/healthz");
        p.wait_ready("operator /healthz", TIMEOUT, || {
            Ok(pullthrough_testbed::http::Get::new(&healthz)
                .send()
                .is_ok_and(|r| r.status.is_success()))
        })
        .unwrap();
        (p, port)
    }
}

fn apply(api: &KubeApiserver, name: &str, spec: Value) -> Result<String, Error> {
    let m = json!({
        "apiVersion": "pullthrough.dev/v1alpha1",
        "kind": "MirrorRegistry",
        "metadata": {"name": name},
        "spec": spec,
    });
    api.kubectl_stdin(&["apply", "-f", "-"], &m.to_string())
}

fn agent_lease(api: &KubeApiserver, node: &str, registries: &str) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    agent_lease_renewed(api, node, registries, now);
}

/// An agent Lease last renewed at `renewed` (unix seconds), valid an hour,
/// for the table the operator last published (as an agent that applied it
/// reports it).
fn agent_lease_renewed(api: &KubeApiserver, node: &str, registries: &str, renewed: u64) {
    let renew = humantime_rfc3339(renewed);
    let hash = table(api).map(|(hash, ..)| hash).unwrap_or_default();
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": format!("pullthrough-agent-{node}"), "namespace": NS,
            "annotations": {
                "pullthrough.dev/registries": registries,
                "pullthrough.dev/runtime": "containerd",
                "pullthrough.dev/config-hash": hash,
            }},
        "spec": {"holderIdentity": node, "leaseDurationSeconds": 3600,
                 "renewTime": renew},
    });
    api.kubectl_stdin(&["apply", "-f", "-"], &lease.to_string())
        .unwrap();
}

fn humantime_rfc3339(secs: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(secs);
    // MicroTime: RFC 3339 with microseconds.
    humantime::format_rfc3339_micros(t).to_string()
}

fn events(api: &KubeApiserver) -> usize {
    api.get_json(&["events.v1.events.k8s.io", "-n", "default"])
        .and_then(|v| {
            v["items"].as_array().map(|a| {
                a.iter()
                    .filter(|e| e["regarding"]["kind"] == "MirrorRegistry")
                    .map(|e| e["series"]["count"].as_u64().unwrap_or(1) as usize)
                    .sum()
            })
        })
        .unwrap_or(0)
}

#[test]
fn operator_reconciles_against_a_real_apiserver() {
    let api = KubeApiserver::start().expect("test bed kube-apiserver");
    install(&api);
    let svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "pullthrough-proxy", "namespace": NS},
        "spec": {"selector": {"app": "proxy"}, "ports": [
            {"name": "https", "port": 443, "targetPort": 5443},
            {"name": "http", "port": 80, "targetPort": 5080},
            {"name": "admin", "port": 9090, "targetPort": 9090},
        ]},
    });
    api.kubectl_stdin(&["apply", "-f", "-"], &svc.to_string())
        .unwrap();
    let cluster_ip = api
        .get_json(&["svc", "pullthrough-proxy", "-n", NS])
        .unwrap()["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .to_string();

    let fake = fake_proxy(json!({"configHash": "none", "registries": []}));
    let status_port = fake.addr().port();
    let token = api.token_for(NS, SA).unwrap();
    let kubeconfig = api.kubeconfig_for_token(&token).unwrap();
    let mut op = Operator {
        kubeconfig: kubeconfig.clone(),
        status_port,
        log_dir: api.dir().to_path_buf(),
        n: 0,
        args: Vec::new(),
    };
    let (mut proc1, _) = op.start();
    // Exit 64 on bad flags, naming the flag.
    for args in [
        &["--no-such-flag"][..],
        &["--pins-max-bytes", "2000000"],
        &["--pins-max-bytes", "0"],
        &["--reserved-host", "https://api.example"],
    ] {
        // Bounded: were a flag accepted, the operator would run on.
        let (code, stderr) = pullthrough_testbed::process::exit_within(
            Command::new(env!("CARGO_BIN_EXE_pullthrough-operator")).args(args),
            Duration::from_secs(20),
        )
        .unwrap();
        assert_eq!(code, Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(args[0]), "{args:?}: {stderr}");
    }
    // An API server that does not answer: alive, but not ready.
    let dead = api.dir().join("dead-kubeconfig");
    std::fs::write(
        &dead,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
             clusters: [{{name: c, cluster: {{server: \"https://127.0.0.1:{}\", insecure-skip-tls-verify: true}}}}]\n\
             users: [{{name: u, user: {{token: x}}}}]\n\
             contexts: [{{name: c, context: {{cluster: c, user: u}}}}]\n",
            free_port().unwrap()
        ),
    )
    .unwrap();
    let dead_port = free_port().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pullthrough-operator"));
    cmd.env("KUBECONFIG", &dead)
        .args(["--namespace", NS, "--listen"])
        .arg(format!("127.0.0.1:{dead_port}"));
    let mut lonely =
        Process::spawn("pullthrough-operator", cmd, api.dir().join("dead-op.log")).unwrap();
    let probe = |path: &str| {
        pullthrough_testbed::http::Get::new(&format!("http://127.0.0.1:{dead_port}{path}"))
            .send()
            .map(|r| r.status.as_u16())
            .unwrap_or(0)
    };
    wait_for(
        "operator without an API server answers /healthz",
        TIMEOUT,
        || Ok(probe("/healthz") == 200),
    )
    .unwrap();
    // The first Lease request fails within its connect timeout.
    wait_for("... and /readyz says not ready", TIMEOUT, || {
        Ok(probe("/readyz") == 503)
    })
    .unwrap();
    lonely.stop().unwrap();

    // Three CRs: the CEL-invalid one is refused by the API server itself.
    apply(&api, "quay", json!({"host": "quay.io", "tagTTL": "10m"})).unwrap();
    std::thread::sleep(Duration::from_millis(1100)); // distinct creationTimestamps
    apply(
        &api,
        "quay-again",
        json!({"host": "quay-mirror.example", "aliases": ["quay.io"]}),
    )
    .unwrap();
    match apply(&api, "bad-scheme", json!({"host": "https://ghcr.io"})) {
        Err(Error::Command { output, .. }) => {
            assert!(output.contains("without a scheme"), "{output}")
        }
        other => panic!("CEL must reject a host with a scheme: {other:?}"),
    }
    // Valid for CEL, invalid for the operator: an alias equal to the host.
    apply(
        &api,
        "self-alias",
        json!({"host": "ghcr.io", "aliases": ["ghcr.io"]}),
    )
    .unwrap();

    let hash1 = wait_table(&api, "table with quay.io", |c| hosts(c) == ["quay.io"]);
    let (_, config, _) = table(&api).unwrap();
    let np = config.proxy.clone().expect("proxy: section");
    assert_eq!(np.address, cluster_ip);
    assert_eq!((np.https_port, np.http_port), (443, Some(80)));
    assert_eq!(
        np.ready_url.as_deref(),
        Some(format!("http://{cluster_ip}:9090/readyz").as_str())
    );
    wait_cond(&api, "quay", "Accepted", "True", Some("Valid"));
    wait_cond(
        &api,
        "quay-again",
        "Accepted",
        "False",
        Some("DuplicateHost"),
    );
    wait_cond(&api, "self-alias", "Accepted", "False", Some("InvalidSpec"));
    wait_cond(&api, "quay", "ProxyReady", "False", Some("ConfigPending"));
    wait_cond(&api, "quay", "NodesConfigured", "False", Some("NoAgents"));
    let q = mreg(&api, "quay").unwrap();
    assert_eq!(
        q["metadata"]["finalizers"],
        json!(["pullthrough.dev/cleanup"])
    );
    assert_eq!(q["status"]["observedGeneration"], 1);
    // Status is written only by server-side apply with the operator's field
    // manager (never by a patch that leaves fields behind).
    let managed = api
        .get_json(&["mreg", "quay", "--show-managed-fields"])
        .unwrap();
    let status_managers: Vec<(&str, &str)> = managed["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["subresource"] == "status")
        .map(|m| {
            (
                m["manager"].as_str().unwrap(),
                m["operation"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(status_managers, [("pullthrough-operator", "Apply")]);

    // CA Secret and trust ConfigMap.
    let secret = api
        .get_json(&["secret", "pullthrough-ca", "-n", NS])
        .expect("CA Secret");
    assert!(secret["data"]["tls.crt"].is_string() && secret["data"]["tls.key"].is_string());
    // The CA is made for the names of the first table; quay.io came
    // later, so a next CA that permits it is published next to it (nodes
    // trust it at once; it takes over after the overlap). Every CA is
    // name-constrained; the newest permits quay.io and nothing unmirrored.
    let certs_of = |pem: &str| -> Vec<String> {
        pem.split_inclusive("-----END CERTIFICATE-----\n")
            .filter(|c| c.contains("BEGIN CERTIFICATE"))
            .map(str::to_string)
            .collect()
    };
    let permits_quay = |cert: &str| {
        PermittedNames::of_pem(cert)
            .ok()
            .flatten()
            .is_some_and(|p| p.permits_dns("quay.io"))
    };
    let mut trusted = Vec::new();
    wait_for("a CA that permits quay.io in the bundle", TIMEOUT, || {
        trusted = certs_of(&bundle(&api).unwrap_or_default());
        Ok(trusted.iter().any(|c| permits_quay(c)))
    })
    .unwrap();
    // The proxy signs quay.io with the Secret's CA that permits it: the
    // active one, or else the next one.
    let secret = api
        .get_json(&["secret", "pullthrough-ca", "-n", NS])
        .expect("CA Secret");
    let decode = |key: &str| {
        use base64::Engine;
        secret["data"][key].as_str().map(|b| {
            String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b).unwrap()).unwrap()
        })
    };
    let active = decode("tls.crt").unwrap();
    assert!(
        permits_quay(&active) || decode("next.crt").is_some_and(|n| permits_quay(&n)),
        "neither the active nor the next CA permits quay.io"
    );
    assert!((1..=2).contains(&trusted.len()), "{trusted:?}");
    for cert in &trusted {
        let p = PermittedNames::of_pem(cert)
            .unwrap()
            .expect("a name-constrained CA");
        assert!(!p.permits_dns("example.com"), "{p}");
        assert!(p.permits_dns(pullthrough_api::pki::PEER_NAME), "{p}");
    }

    // The proxy runs the current table but does not list quay.io: not
    // ready (the hash alone is not enough).
    fake.set_json("/status", &json!({"configHash": hash1, "registries": []}));
    wait_cond(&api, "quay", "ProxyReady", "False", Some("NotServed"));
    // The proxy reports the table's hash → ProxyReady; an agent → 1/1.
    fake.set_json(
        "/status",
        &json!({"configHash": hash1, "registries": ["quay.io"]}),
    );
    wait_cond(&api, "quay", "ProxyReady", "True", Some("Serving"));
    agent_lease(&api, "node-1", "quay.io");
    wait_cond(&api, "quay", "NodesConfigured", "True", None);
    let listing = api.kubectl(&["get", "mreg"]).unwrap();
    // Upstream is the spec's (empty: https://<host>).
    assert_eq!(
        kubectl_row(&listing, "quay")[..5],
        ["quay", "quay.io", "", "True", "1/1"],
        "{listing}"
    );
    assert_eq!(
        kubectl_row(&listing, "quay-again")[3..5],
        ["False", ""],
        "{listing}"
    );
    eprintln!("{listing}");

    // Another registry joins: a new table, which the proxy and node-1 have
    // not applied yet. quay.io's entry in it is the one they run, so quay
    // stays Serving and 1/1 (before, every registry went ConfigPending,
    // with a Warning each, on any registry's change), while the newcomer
    // waits for them.
    let quay_events = || {
        api.get_json(&["events.v1.events.k8s.io", "-n", "default"])
            .and_then(|v| {
                v["items"].as_array().map(|a| {
                    a.iter()
                        .filter(|e| e["regarding"]["name"] == "quay")
                        .map(|e| e["series"]["count"].as_u64().unwrap_or(1))
                        .sum::<u64>()
                })
            })
            .unwrap_or(0)
    };
    let events_before = quay_events();
    apply(&api, "ghcr", json!({"host": "ghcr.io"})).unwrap();
    let with_ghcr = wait_table(&api, "ghcr.io joins", |c| {
        hosts(c).iter().any(|h| h == "ghcr.io")
    });
    assert_ne!(with_ghcr, hash1);
    wait_cond(&api, "ghcr", "ProxyReady", "False", Some("ConfigPending"));
    wait_cond(&api, "ghcr", "NodesConfigured", "False", Some("Pending"));
    // Nothing to wait for when nothing should change: watch quay through
    // a few of its 2 s rechecks.
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < until {
        let q = mreg(&api, "quay").unwrap();
        for (type_, reason) in [
            ("ProxyReady", "Serving"),
            ("NodesConfigured", "AllNodesConfigured"),
        ] {
            let c = cond(&q, type_).cloned().unwrap_or_default();
            assert_eq!(c["reason"], reason, "{type_} of quay: {c:#}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(quay_events(), events_before, "quay got an Event");
    api.kubectl(&["delete", "mreg", "ghcr"]).unwrap();
    assert_eq!(
        wait_table(&api, "ghcr.io gone", |c| !hosts(c)
            .iter()
            .any(|h| h == "ghcr.io")),
        hash1
    );

    // Update: a new generation re-renders the table.
    apply(&api, "quay", json!({"host": "quay.io", "tagTTL": "1h"})).unwrap();
    let hash2 = wait_table(&api, "tagTTL 1h", |c| {
        c.registries
            .first()
            .is_some_and(|r| r.tag_ttl == Duration::from_secs(3600))
    });
    assert_ne!(hash1, hash2);
    wait_cond(&api, "quay", "ProxyReady", "False", Some("ConfigPending"));
    wait_for("observedGeneration 2", TIMEOUT, || {
        Ok(mreg(&api, "quay").unwrap()["status"]["observedGeneration"] == 2)
    })
    .unwrap();

    // Restart: no spurious writes (same table, same resourceVersions, no events).
    std::thread::sleep(Duration::from_secs(3));
    let before = (
        table(&api).unwrap().2["metadata"]["resourceVersion"].clone(),
        mreg(&api, "quay").unwrap()["metadata"]["resourceVersion"].clone(),
        mreg(&api, "quay-again").unwrap()["metadata"]["resourceVersion"].clone(),
        events(&api),
    );
    // A second replica waits on the leader Lease while the first holds it...
    let (mut proc2, metrics_port) = op.start();
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let scrape = || {
        let r = pullthrough_testbed::http::Get::new(&metrics_url)
            .send()
            .unwrap();
        String::from_utf8_lossy(&r.body).to_string()
    };
    std::thread::sleep(Duration::from_secs(2));
    // Exact lines: the HELP text of the gauge itself starts with "1 while".
    let leader_is = |v: &str| {
        scrape()
            .lines()
            .any(|l| l == format!("pullthrough_operator_leader {v}"))
    };
    assert!(leader_is("0"), "{}", scrape());
    let readyz = |port: u16| {
        let r = pullthrough_testbed::http::Get::new(&format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .unwrap();
        (
            r.status.as_u16(),
            String::from_utf8_lossy(&r.body).to_string(),
        )
    };
    assert_eq!(readyz(metrics_port), (200, "ok: standby\n".to_string()));
    let lease = api
        .get_json(&["lease", "pullthrough-operator", "-n", NS])
        .unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "test-1");
    // ...and takes over when it stops (SIGTERM releases the Lease).
    let status = proc1.stop().unwrap().expect("exit status");
    assert!(
        status.success(),
        "SIGTERM must stop the operator cleanly: {status}"
    );
    wait_for("standby takes over", TIMEOUT, || Ok(leader_is("1"))).unwrap();
    assert_eq!(readyz(metrics_port), (200, "ok: leader\n".to_string()));
    std::thread::sleep(Duration::from_secs(6));
    let after = (
        table(&api).unwrap().2["metadata"]["resourceVersion"].clone(),
        mreg(&api, "quay").unwrap()["metadata"]["resourceVersion"].clone(),
        mreg(&api, "quay-again").unwrap()["metadata"]["resourceVersion"].clone(),
        events(&api),
    );
    assert_eq!(
        before,
        after,
        "restart changed something; log:\n{}",
        proc2.log_tail(4000)
    );
    assert_eq!(table(&api).unwrap().0, hash2);
    let text = scrape();
    assert!(
        text.contains("pullthrough_operator_reconciles_total"),
        "{text}"
    );
    assert!(
        text.contains("pullthrough_operator_reconcile_duration_seconds"),
        "{text}"
    );

    // Delete: the finalizer waits for the agent to drop quay.io; meanwhile
    // the table no longer has it and the duplicate takes over.
    api.kubectl(&["delete", "mreg", "quay", "--wait=false"])
        .unwrap();
    wait_table(&api, "quay-mirror.example takes over", |c| {
        hosts(c) == ["quay-mirror.example"]
    });
    wait_cond(&api, "quay-again", "Accepted", "True", Some("Valid"));
    // quay.io is still served (as an alias): nothing to wait for.
    wait_for("quay deleted", TIMEOUT, || Ok(mreg(&api, "quay").is_none())).unwrap();

    // Deleting quay-again: the agent still lists quay-mirror.example.
    agent_lease(&api, "node-1", "quay-mirror.example,quay.io");
    api.kubectl(&["delete", "mreg", "quay-again", "--wait=false"])
        .unwrap();
    wait_table(&api, "empty table", |c| c.registries.is_empty());
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        mreg(&api, "quay-again").is_some(),
        "finalizer must wait for the agent"
    );
    agent_lease(&api, "node-1", "");
    wait_for("quay-again deleted", TIMEOUT, || {
        Ok(mreg(&api, "quay-again").is_none())
    })
    .unwrap();

    // RBAC: the operator's token cannot read Secrets elsewhere.
    api.kubectl(&[
        "create",
        "secret",
        "generic",
        "elsewhere",
        "-n",
        "default",
        "--from-literal=a=b",
    ])
    .unwrap();
    match api.kubectl_with(
        &kubeconfig,
        &["get", "secret", "elsewhere", "-n", "default"],
    ) {
        Err(Error::Command { output, .. }) => assert!(output.contains("Forbidden"), "{output}"),
        other => panic!("reading a Secret in default must be forbidden: {other:?}"),
    }
    let status = proc2.stop().unwrap().expect("exit status");
    assert!(status.success(), "{status}");
}

/// An agent that never drops a deleted registry (a dead node's last
/// report) holds the finalizer for `--delete-timeout` only: then it goes,
/// with a `CleanupTimeout` Warning naming the node.
#[test]
fn a_finalizer_held_by_an_agent_goes_after_the_delete_timeout() {
    let Workloads {
        api,
        mut proc,
        fake: _fake,
        op: _op,
    } = Workloads::start_with(&["--delete-timeout", "5s"]);
    apply(&api, "quay", json!({"host": "quay.io"})).unwrap();
    wait_table(&api, "quay.io in the table", |c| hosts(c) == ["quay.io"]);
    assert!(
        mreg(&api, "quay").unwrap()["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty())
    );
    agent_lease(&api, "node-1", "quay.io");
    let deleted = std::time::Instant::now();
    api.kubectl(&["delete", "mreg", "quay", "--wait=false"])
        .unwrap();
    wait_table(&api, "empty table", |c| c.registries.is_empty());
    assert!(
        mreg(&api, "quay").is_some(),
        "the agent still lists quay.io"
    );
    wait_for("quay deleted", TIMEOUT, || Ok(mreg(&api, "quay").is_none()))
        .unwrap_or_else(|e| panic!("{e}\n{}", proc.log()));
    // deletionTimestamp has whole seconds: at least 4 of the 5.
    assert!(
        deleted.elapsed() >= Duration::from_secs(4),
        "removed after {:?}",
        deleted.elapsed()
    );
    let events = api
        .get_json(&["events.v1.events.k8s.io", "-n", "default"])
        .unwrap();
    let timeout = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["reason"] == "CleanupTimeout")
        .unwrap_or_else(|| panic!("no CleanupTimeout Event: {events}"));
    assert_eq!(timeout["type"], "Warning", "{timeout}");
    assert_eq!(timeout["regarding"]["name"], "quay", "{timeout}");
    let note = timeout["note"].as_str().unwrap();
    assert!(
        note.contains("node-1") && note.contains("quay.io"),
        "{note}"
    );
    let status = proc.stop().unwrap().expect("exit status");
    assert!(status.success(), "{status}");
}

/// A leader that finds its Lease held by another replica (it was cut off
/// past the Lease duration and a standby took over) stops at once, exit
/// code 1, so that two replicas never write the table together; and it
/// leaves the other's Lease alone on its way out.
#[test]
fn a_leader_whose_lease_was_taken_over_exits() {
    let Workloads {
        api,
        mut proc,
        fake: _fake,
        op: _op,
    } = Workloads::start_with(&["--leader-lease-duration", "3s"]);
    apply(&api, "quay", json!({"host": "quay.io"})).unwrap();
    wait_table(&api, "quay.io in the table", |c| hosts(c) == ["quay.io"]);

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "pullthrough-operator", "namespace": NS},
        "spec": {"holderIdentity": "another-replica", "leaseDurationSeconds": 3600,
                 "renewTime": humantime_rfc3339(now)},
    });
    api.kubectl_stdin(&["apply", "-f", "-"], &lease.to_string())
        .unwrap();
    wait_for("the old leader exits", TIMEOUT, || {
        Ok(proc.check_running().is_err())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", proc.log()));
    let status = proc.stop().unwrap().expect("exit status");
    assert_eq!(status.code(), Some(1), "{}", proc.log());
    assert!(
        proc.log().contains("lost the leader Lease"),
        "{}",
        proc.log()
    );
    let held = api
        .get_json(&["lease", "pullthrough-operator", "-n", NS])
        .unwrap();
    assert_eq!(held["spec"]["holderIdentity"], "another-replica", "{held}");
}

fn secret_cert(api: &KubeApiserver) -> Option<String> {
    use base64::Engine;
    let s = api.get_json(&["secret", "pullthrough-ca", "-n", NS])?;
    let b = s["data"]["tls.crt"].as_str()?;
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b).ok()?).ok()
}

fn bundle(api: &KubeApiserver) -> Option<String> {
    api.get_json(&["cm", "pullthrough-ca", "-n", NS])?["data"]["ca.crt"]
        .as_str()
        .map(String::from)
}

/// The active CA and the promotion time (`pullthrough.dev/ca-rotated-at`,
/// unix seconds) of the CA Secret, read together.
fn secret_rotation(api: &KubeApiserver) -> Option<(String, Option<u64>)> {
    use base64::Engine;
    let s = api.get_json(&["secret", "pullthrough-ca", "-n", NS])?;
    let b = s["data"]["tls.crt"].as_str()?;
    let cert = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b).ok()?).ok()?;
    let at = s["metadata"]["annotations"][pullthrough_api::contract::CA_ROTATED_AT_ANNOTATION]
        .as_str()
        .and_then(|t| t.parse().ok());
    Some((cert, at))
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// With short thresholds the CA rotates: the new CA is published next to the
/// old one before the Secret switches to it, the old one stays published for
/// the whole overlap after the promotion (not just until the next check),
/// and is dropped only then.
#[test]
fn ca_rotates_with_an_overlap() {
    // The overlap is many check intervals long, so an old CA dropped at
    // the first check after its promotion is told from one kept for the
    // overlap. Rotation starts 18 s after creation (validity - rotate
    // before), the promotion follows an overlap later and the old CA goes
    // one more overlap later, before the second CA is due (36 s).
    const OVERLAP: u64 = 8;
    let api = KubeApiserver::start().expect("test bed kube-apiserver");
    install(&api);
    let token = api.token_for(NS, SA).unwrap();
    let kubeconfig = api.kubeconfig_for_token(&token).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pullthrough-operator"));
    cmd.env("KUBECONFIG", &kubeconfig)
        .args(["--namespace", NS, "--listen"])
        .arg(format!("127.0.0.1:{}", free_port().unwrap()))
        .args(["--ca-validity", "28s", "--ca-rotate-before", "10s"])
        .args(["--ca-overlap", &format!("{OVERLAP}s")])
        .args(["--ca-check-interval", "250ms"]);
    let mut op = Process::spawn("pullthrough-operator", cmd, api.dir().join("ca-op.log")).unwrap();

    let mut first = String::new();
    wait_for("CA Secret", TIMEOUT, || {
        first = secret_cert(&api).unwrap_or_default();
        Ok(!first.is_empty())
    })
    .unwrap();
    // Another tool's marks on the Secret survive every rotation step
    // (each replaces the whole object).
    api.kubectl(&[
        "label",
        "secret",
        "pullthrough-ca",
        "-n",
        NS,
        "backup.example/keep=yes",
    ])
    .unwrap();
    api.kubectl(&[
        "annotate",
        "secret",
        "pullthrough-ca",
        "-n",
        NS,
        "backup.example/note=ca",
    ])
    .unwrap();
    let count = |b: &str| b.matches("BEGIN CERTIFICATE").count();
    // 1. Both published, the old one still active.
    wait_for("next CA published", TIMEOUT, || {
        Ok(bundle(&api).is_some_and(|b| count(&b) == 2 && b.contains(first.trim())))
    })
    .unwrap();
    assert_eq!(
        secret_cert(&api).unwrap(),
        first,
        "the old CA must stay active during the overlap"
    );
    // 2. The new one active, the old one still trusted: right after the
    // promotion, and on every look until half an overlap after it.
    let mut second = String::new();
    let mut rotated_at = None;
    wait_for("new CA active", TIMEOUT, || {
        (second, rotated_at) = secret_rotation(&api).unwrap_or_default();
        Ok(!second.is_empty() && second != first)
    })
    .unwrap();
    let rotated_at = rotated_at.expect("a promotion records its time") as f64;
    let b = bundle(&api).unwrap();
    assert!(
        b.contains(second.trim()),
        "the active CA must be trusted: {b}"
    );
    assert!(
        b.contains(first.trim()),
        "the old CA left the bundle at its promotion: {b}\n{}",
        op.log_tail(4000)
    );
    let half = rotated_at + OVERLAP as f64 / 2.0;
    let mut looks = 0;
    loop {
        let at = unix_now();
        let b = bundle(&api).unwrap();
        looks += 1;
        assert!(
            b.contains(first.trim()),
            "the old CA left the bundle {:.1} s after its promotion, within the {OVERLAP} s overlap (look {looks})\n{}",
            at - rotated_at,
            op.log_tail(4000)
        );
        if at >= half {
            break;
        }
    }
    // 3. After the overlap, the old one is gone, and not before.
    wait_for("old CA dropped", TIMEOUT, || {
        Ok(bundle(&api).is_some_and(|b| !b.contains(first.trim())))
    })
    .unwrap();
    let meta = &api
        .get_json(&["secret", "pullthrough-ca", "-n", NS])
        .unwrap()["metadata"];
    assert_eq!(meta["labels"]["backup.example/keep"], "yes", "{meta:#}");
    assert_eq!(meta["annotations"]["backup.example/note"], "ca", "{meta:#}");
    let dropped_by = unix_now();
    assert!(
        dropped_by >= rotated_at + OVERLAP as f64,
        "the old CA was dropped {:.1} s after its promotion, before the {OVERLAP} s overlap",
        dropped_by - rotated_at
    );
    let status = op.stop().unwrap().expect("exit status");
    assert!(status.success(), "{status}");
}

/// A ConfigMap or Secret applied from JSON.
fn apply_json(api: &KubeApiserver, v: Value) {
    api.kubectl_stdin(&["apply", "-f", "-"], &v.to_string())
        .unwrap();
}

fn basic_auth_secret(ns: &str, name: &str, user: &str, password: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/basic-auth",
           "metadata": {"name": name, "namespace": ns},
           "stringData": {"username": user, "password": password}})
}

/// The proxy's credentials Secret, decoded.
fn proxy_credentials(api: &KubeApiserver) -> Option<std::collections::BTreeMap<String, String>> {
    use base64::Engine;
    let s = api.get_json(&["secret", "pullthrough-upstream-credentials", "-n", NS])?;
    Some(
        s["data"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| {
                        let raw = base64::engine::general_purpose::STANDARD
                            .decode(v.as_str().unwrap())
                            .unwrap();
                        (k.clone(), String::from_utf8(raw).unwrap())
                    })
                    .collect()
            })
            .unwrap_or_default(),
    )
}

/// The forms a credential can take in text: the password itself, and base64
/// (padded, unpadded, URL-safe) of `user:password` (a docker config's
/// `auth`, a basic-auth header) and of the password alone.
fn credential_forms(user: &str, password: &str) -> Vec<String> {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let mut forms = vec![password.to_string()];
    for raw in [format!("{user}:{password}"), password.to_string()] {
        for engine in [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD] {
            forms.push(engine.encode(&raw));
        }
    }
    forms.sort();
    forms.dedup();
    forms
}

/// Asserts the table ConfigMap the agents read carries no credentials:
/// its data is `config.yaml` and CA bundles only, `config.yaml` has no
/// credential field anywhere (`credentialsFile`, a path, is how a registry
/// names them), and no form of any of `used` (user, password) is anywhere
/// in the object's text.
fn assert_table_has_no_credentials(api: &KubeApiserver, used: &[(&str, &str)]) {
    let (_, config, cm) = table(api).expect("the table ConfigMap");
    let raw = cm.to_string();
    let yaml = cm["data"]["config.yaml"].as_str().unwrap();
    let leaked: Vec<String> = used
        .iter()
        .flat_map(|(u, p)| credential_forms(u, p))
        .filter(|f| raw.contains(f.as_str()))
        .collect();
    assert!(
        leaked.is_empty(),
        "credentials reached the table the agents read as {leaked:?}: {cm:#}"
    );
    for key in cm["data"].as_object().unwrap().keys() {
        assert!(
            key == "config.yaml" || (key.starts_with("cabundle-") && key.ends_with(".pem")),
            "table key {key:?} is neither the config nor a CA bundle: {cm:#}"
        );
    }
    fn field_names(v: &serde_norway::Value, out: &mut Vec<String>) {
        match v {
            serde_norway::Value::Mapping(m) => {
                for (k, v) in m {
                    out.extend(k.as_str().map(str::to_ascii_lowercase));
                    field_names(v, out);
                }
            }
            serde_norway::Value::Sequence(s) => s.iter().for_each(|v| field_names(v, out)),
            serde_norway::Value::Tagged(t) => field_names(&t.value, out),
            _ => {}
        }
    }
    let mut fields = Vec::new();
    field_names(&serde_norway::from_str(yaml).unwrap(), &mut fields);
    let credential_fields = [
        "auth",
        "auths",
        "username",
        "password",
        "credentials",
        "identitytoken",
        "registrytoken",
        "token",
    ];
    let found: Vec<&String> = fields
        .iter()
        .filter(|f| credential_fields.contains(&f.as_str()))
        .collect();
    assert!(
        found.is_empty(),
        "credential fields {found:?} in the table: {yaml}"
    );
    for r in &config.registries {
        if let Some(f) = &r.credentials_file {
            assert!(
                f.starts_with("/etc/pullthrough/credentials/"),
                "{}: credentialsFile {f:?} is not the credentials Secret's mount",
                r.host
            );
        }
    }
}

/// `tls.caBundleConfigMapRef` and `credentialsSecretRef` read with the
/// shipped RBAC (release namespace yes, elsewhere only once granted the
/// way the chart's `operator.referenceNamespaces` does), credential rotation,
/// `status.cache` from the proxy, and node totals ignoring expired Leases
/// of deleted Nodes.
#[test]
fn references_cache_counters_and_departed_nodes() {
    let api = KubeApiserver::start().expect("test bed kube-apiserver");
    install(&api);
    api.kubectl(&["create", "namespace", "team"]).unwrap();
    let fake = fake_proxy(json!({"configHash": "none", "registries": []}));
    let status_port = fake.addr().port();
    let token = api.token_for(NS, SA).unwrap();
    let mut op = Operator {
        kubeconfig: api.kubeconfig_for_token(&token).unwrap(),
        status_port,
        log_dir: api.dir().to_path_buf(),
        n: 0,
        args: Vec::new(),
    };
    let (mut proc, _) = op.start();

    // A CA bundle from a ConfigMap in the release namespace.
    let ca = pullthrough_testbed::tls::TestCa::new("refs test CA").unwrap();
    let pem = ca.cert_pem();
    apply_json(
        &api,
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "lan-roots", "namespace": NS},
               "data": {"roots.pem": pem}}),
    );
    apply(
        &api,
        "lan",
        json!({"host": "reg.lan:5000",
               "tls": {"caBundleConfigMapRef": {"name": "lan-roots", "namespace": NS, "key": "roots.pem"}}}),
    )
    .unwrap();
    // Credentials from a basic-auth Secret in the release namespace.
    apply_json(
        &api,
        basic_auth_secret(NS, "quay-creds", "robot", "s3cret-1"),
    );
    apply(
        &api,
        "quay",
        json!({"host": "quay.io", "credentialsSecretRef": {"name": "quay-creds", "namespace": NS}}),
    )
    .unwrap();
    // ...and from a namespace the operator may not read (yet).
    apply_json(&api, basic_auth_secret("team", "creds", "teamuser", "t3am"));
    apply(
        &api,
        "team",
        json!({"host": "team.example", "credentialsSecretRef": {"name": "creds", "namespace": "team"}}),
    )
    .unwrap();

    wait_table(&api, "table with reg.lan:5000 and quay.io", |c| {
        hosts(c) == ["quay.io", "reg.lan:5000"]
    });
    let (_, config, cm) = table(&api).unwrap();
    assert_eq!(cm["data"]["cabundle-reg.lan_5000.pem"], pem);
    assert_eq!(
        config
            .registry("reg.lan:5000")
            .unwrap()
            .ca_bundle
            .as_deref(),
        Some(Path::new("/etc/pullthrough/cabundle-reg.lan_5000.pem"))
    );
    assert_eq!(
        config
            .registry("quay.io")
            .unwrap()
            .credentials_file
            .as_deref(),
        Some(Path::new("/etc/pullthrough/credentials/quay.io.json"))
    );
    // Credentials never reach the table the agents read: neither password
    // (nor the rotated one), plain or base64, at any point below.
    let used = [
        ("robot", "s3cret-1"),
        ("robot", "s3cret-2"),
        ("teamuser", "t3am"),
    ];
    assert_table_has_no_credentials(&api, &used);
    let creds = proxy_credentials(&api).expect("credentials Secret");
    assert_eq!(
        creds["quay.io.json"],
        r#"{"username":"robot","password":"s3cret-1"}"#
    );
    wait_cond(&api, "lan", "Accepted", "True", Some("Valid"));
    wait_cond(&api, "quay", "Accepted", "True", Some("Valid"));
    wait_cond(
        &api,
        "team",
        "Accepted",
        "False",
        Some("CredentialsUnavailable"),
    );
    let msg = cond(&mreg(&api, "team").unwrap(), "Accepted").unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("team/creds") && msg.contains("operator.referenceNamespaces"),
        "{msg}"
    );

    // Granting read access in `team` the way the chart does (a Role with
    // `get` there) lets the next resync accept it.
    let grant = format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: pullthrough-operator-references, namespace: team}}\n\
         rules: [{{apiGroups: [\"\"], resources: [secrets, configmaps], verbs: [get]}}]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: pullthrough-operator-references, namespace: team}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: pullthrough-operator-references}}\n\
         subjects: [{{kind: ServiceAccount, name: {SA}, namespace: {NS}}}]\n"
    );
    api.kubectl_stdin(&["apply", "-f", "-"], &grant).unwrap();
    wait_cond(&api, "team", "Accepted", "True", Some("Valid"));
    wait_table(&api, "team.example in the table", |c| {
        c.registry("team.example").is_some()
    });
    assert_table_has_no_credentials(&api, &used);

    // Rotation: a new password reaches the proxy's Secret.
    apply_json(
        &api,
        basic_auth_secret(NS, "quay-creds", "robot", "s3cret-2"),
    );
    wait_for("rotated credentials", TIMEOUT, || {
        Ok(proxy_credentials(&api).is_some_and(|c| {
            c.get("quay.io.json")
                .is_some_and(|j| j.contains("s3cret-2"))
        }))
    })
    .unwrap();
    assert_table_has_no_credentials(&api, &used);
    // A deleted Secret takes the registry out (and its credentials with it).
    api.kubectl(&["delete", "secret", "creds", "-n", "team"])
        .unwrap();
    wait_cond(
        &api,
        "team",
        "Accepted",
        "False",
        Some("CredentialsUnavailable"),
    );
    wait_for("team credentials removed", TIMEOUT, || {
        Ok(proxy_credentials(&api).is_some_and(|c| !c.contains_key("team.example.json")))
    })
    .unwrap();

    // status.cache: the proxy's counters for the host.
    let hash = table(&api).unwrap().0;
    fake.set_json(
        "/status",
        &json!({
            "configHash": hash, "registries": ["quay.io", "reg.lan:5000"],
            "cache": {"quay.io": {"hits": 7, "misses": 2, "bytes": 4096}},
        }),
    );
    wait_for("status.cache", TIMEOUT, || {
        Ok(mreg(&api, "quay").unwrap()["status"]["cache"]
            == json!({"hits": 7, "misses": 2, "bytes": 4096}))
    })
    .unwrap();

    // Tag moves the proxy reports (issue #14, point 2): one Event each on
    // the registry they belong to, told once however often the same list
    // is seen, and the last in status.lastTagMove.
    let moved = |tag: &str, at: u64| {
        json!({"registry": "quay.io", "repository": "app", "tag": tag,
               "from": format!("sha256:{}", "a".repeat(64)),
               "to": format!("sha256:{}", "b".repeat(64)), "at": at})
    };
    fake.set_json(
        "/status",
        &json!({
            "configHash": hash, "registries": ["quay.io", "reg.lan:5000"],
            "cache": {"quay.io": {"hits": 7, "misses": 2, "bytes": 4096, "tagMoves": 2}},
            "tagMoves": [moved("latest", 1_700_000_000_000), moved("edge", 1_700_000_000_500)],
        }),
    );
    wait_for("status.lastTagMove", TIMEOUT, || {
        Ok(mreg(&api, "quay").unwrap()["status"]["lastTagMove"]["tag"] == "edge")
    })
    .unwrap();
    let status = mreg(&api, "quay").unwrap()["status"].clone();
    assert_eq!(status["cache"]["tagMoves"], 2, "{status}");
    assert_eq!(
        status["lastTagMove"]["at"], "2023-11-14T22:13:20.5Z",
        "{status}"
    );
    // Not on the other registry.
    assert!(mreg(&api, "lan").is_some_and(|r| r["status"]["lastTagMove"].is_null()));
    let tag_events = || -> Vec<String> {
        let v = api
            .get_json(&["events.v1.events.k8s.io", "-n", "default"])
            .unwrap();
        let mut notes: Vec<String> = v["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["reason"] == "TagMoved")
            .flat_map(|e| {
                let n = e["series"]["count"].as_u64().unwrap_or(1) as usize;
                std::iter::repeat_n(format!("{} {}", e["regarding"]["name"], e["note"]), n)
            })
            .collect();
        notes.sort();
        notes
    };
    wait_for("two TagMoved events", TIMEOUT, || {
        Ok(tag_events().len() == 2)
    })
    .unwrap();
    let notes = tag_events();
    assert!(
        notes[0].contains("\"quay\"")
            && notes[0].contains("quay.io/app:edge moved from sha256:aaaa"),
        "{notes:?}"
    );
    assert!(notes[1].contains("quay.io/app:latest moved"), "{notes:?}");
    // Later reconciles see the same list: no new Events. A change to the
    // status (new counters) forces one and proves it ran.
    fake.set_json(
        "/status",
        &json!({
            "configHash": hash, "registries": ["quay.io", "reg.lan:5000"],
            "cache": {"quay.io": {"hits": 8, "misses": 2, "bytes": 4096, "tagMoves": 2,
                                  "pinned": {"images": 3, "blobs": 11, "bytes": 52_428_800}}},
            "tagMoves": [moved("latest", 1_700_000_000_000), moved("edge", 1_700_000_000_500)],
            "upstream": {"quay.io": {"limit": 100, "remaining": 3, "windowSeconds": 21600,
                                     "source": "203.0.113.7", "low": true}},
        }),
    );
    wait_for("status.cache.hits 8", TIMEOUT, || {
        Ok(mreg(&api, "quay").unwrap()["status"]["cache"]["hits"] == 8)
    })
    .unwrap();
    assert_eq!(tag_events().len(), 2, "{:?}", tag_events());
    // What the proxy keeps pinned (issue #14, point 6).
    assert_eq!(
        mreg(&api, "quay").unwrap()["status"]["cache"]["pinned"],
        json!({"images": 3, "blobs": 11, "bytes": 52_428_800})
    );
    // The upstream budget the proxy reports (issue #14, point 1).
    assert_eq!(
        mreg(&api, "quay").unwrap()["status"]["upstream"],
        json!({"limit": 100, "remaining": 3, "windowSeconds": 21600,
               "source": "203.0.113.7", "low": true})
    );

    // Nodes: a live agent counts; an expired Lease counts while its Node
    // exists, and stops counting once the Node is deleted.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    agent_lease(&api, "node-1", "quay.io,reg.lan:5000");
    agent_lease_renewed(&api, "node-old", "quay.io", now - 7200);
    apply_json(
        &api,
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-old"}}),
    );
    let nodes = |name: &str| mreg(&api, name).unwrap()["status"]["nodesSummary"].clone();
    wait_for("1/2 while node-old exists", TIMEOUT, || {
        Ok(nodes("quay") == "1/2")
    })
    .unwrap_or_else(|e| panic!("{e}: {}", nodes("quay")));
    wait_cond(&api, "quay", "NodesConfigured", "False", Some("Pending"));
    api.kubectl(&["delete", "node", "node-old"]).unwrap();
    wait_for("1/1 once node-old is gone", TIMEOUT, || {
        Ok(nodes("quay") == "1/1")
    })
    .unwrap_or_else(|e| panic!("{e}: {}", nodes("quay")));
    wait_cond(&api, "quay", "NodesConfigured", "True", None);

    let status = proc.stop().unwrap().expect("exit status");
    assert!(status.success(), "{status}\n{}", proc.log_tail(4000));
}

/// An API server with a namespace `apps` for workloads, a fake proxy and
/// the operator started with the shipped RBAC.
struct Workloads {
    api: KubeApiserver,
    fake: Stub,
    op: Operator,
    proc: Process,
}

impl Workloads {
    fn start() -> Self {
        Self::start_with(&[])
    }

    /// [`Workloads::start`] with these operator flags.
    fn start_with(args: &[&str]) -> Self {
        let api = KubeApiserver::start().expect("test bed kube-apiserver");
        install(&api);
        api.kubectl(&["create", "namespace", "apps"]).unwrap();
        api.create_service_account("apps", "default").unwrap();
        let fake = fake_proxy(json!({"configHash": "none", "registries": []}));
        let mut op = Operator::new(&api, &fake, args);
        let (proc, _) = op.start();
        Self {
            api,
            fake,
            op,
            proc,
        }
    }
}

fn pins_doc(api: &KubeApiserver) -> Option<Value> {
    let cm = api.get_json(&["cm", "pullthrough-pins", "-n", NS])?;
    Some(serde_json::from_str(cm["data"]["pins.json"].as_str()?).unwrap())
}

fn pins(api: &KubeApiserver) -> Option<Vec<String>> {
    Some(
        pins_doc(api)?["images"]
            .as_array()?
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect(),
    )
}

fn wait_pins(api: &KubeApiserver, want: &[&str]) {
    let mut last = None;
    let r = wait_for("the pins ConfigMap", TIMEOUT, || {
        last = pins(api);
        Ok(last.as_deref().is_some_and(|p| p == want))
    });
    if let Err(e) = r {
        panic!("{e}: last seen {last:?}");
    }
}

/// Pinning and prefetch (issue #14, points 6 and 7) with the shipped RBAC:
/// the pins ConfigMap lists the digest a running pod runs (as kubelet
/// reports it), the reference of a pod still pulling, the images of the
/// last two ReplicaSet revisions of a Deployment (not the third), a
/// DaemonSet's template and a MirrorRegistry's `spec.prefetch`, with the
/// nodes' platforms; it follows pods that finish or go away. Images of a
/// registry no MirrorRegistry mirrors are not listed.
#[test]
fn pins_follow_pods_and_replica_sets() {
    let Workloads {
        api,
        mut fake,
        op: _,
        mut proc,
    } = Workloads::start();
    wait_pins(&api, &[]);
    for (name, arch) in [("n1", "amd64"), ("n2", "arm64"), ("n3", "amd64")] {
        apply_json(
            &api,
            json!({"apiVersion": "v1", "kind": "Node",
                   "metadata": {"name": name, "labels": {"kubernetes.io/os": "linux",
                                                         "kubernetes.io/arch": arch}}}),
        );
    }
    apply_json(
        &api,
        json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
               "metadata": {"name": "logs", "namespace": "apps"},
               "spec": {"selector": {"matchLabels": {"app": "logs"}},
                        "template": {"metadata": {"labels": {"app": "logs"}},
                                     "spec": {"containers": [{"name": "c",
                                              "image": "registry.test/logs:5"}]}}}}),
    );
    apply(
        &api,
        "quay",
        json!({"host": "quay.io", "prefetch": ["org/warm:1"]}),
    )
    .unwrap();
    // Only registries the proxy mirrors are pinned.
    apply(&api, "test", json!({"host": "registry.test"})).unwrap();
    apply(&api, "ghcr", json!({"host": "ghcr.io"})).unwrap();

    for revision in 1..=3 {
        apply_json(
            &api,
            json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
                   "metadata": {"name": format!("web-{revision}"), "namespace": "apps",
                                "annotations": {"deployment.kubernetes.io/revision": revision.to_string()},
                                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                    "name": "web", "uid": "7d3c5a52-0000-4000-8000-000000000001",
                                    "controller": true}]},
                   "spec": {"replicas": 0,
                            "selector": {"matchLabels": {"app": "web", "rev": revision.to_string()}},
                            "template": {"metadata": {"labels": {"app": "web", "rev": revision.to_string()}},
                                         "spec": {"containers": [{"name": "web",
                                                  "image": format!("registry.test/web:{revision}")}]}}}}),
        );
    }
    let pod = |name: &str, image: &str| {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": "apps"},
               "spec": {"automountServiceAccountToken": false,
                        "containers": [{"name": "c", "image": image}]}})
    };
    apply_json(&api, pod("api", "quay.io/app/api:1"));
    apply_json(&api, pod("pulling", "ghcr.io/org/tool:2"));
    apply_json(&api, pod("unmirrored", "unmirrored.example/org/tool:1"));
    let digest = format!("sha256:{}", "1".repeat(64));
    let running = json!({"status": {"phase": "Running", "containerStatuses": [{
        "name": "c", "image": "quay.io/app/api:1",
        "imageID": format!("quay.io/app/api@{digest}"),
        "ready": true, "restartCount": 0, "started": true,
        "state": {"running": {"startedAt": "2026-12-05T00:00:00Z"}}}]}});
    api.kubectl(&[
        "patch",
        "pod",
        "api",
        "-n",
        "apps",
        "--subresource=status",
        "--type=merge",
        "-p",
        &running.to_string(),
    ])
    .unwrap();
    let api_pin = format!("quay.io/app/api@{digest}");
    wait_pins(
        &api,
        &[
            "ghcr.io/org/tool:2",
            &api_pin,
            "quay.io/org/warm:1",
            "registry.test/logs:5",
            "registry.test/web:2",
            "registry.test/web:3",
        ],
    );
    assert_eq!(
        pins_doc(&api).unwrap()["platforms"],
        json!(["linux/amd64", "linux/arm64"])
    );

    // A finished pod pins nothing; a deleted one neither.
    api.kubectl(&[
        "patch",
        "pod",
        "pulling",
        "-n",
        "apps",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status": {"phase": "Failed"}}"#,
    ])
    .unwrap();
    api.kubectl(&["delete", "pod", "api", "-n", "apps", "--wait=false"])
        .unwrap();
    wait_pins(
        &api,
        &[
            "quay.io/org/warm:1",
            "registry.test/logs:5",
            "registry.test/web:2",
            "registry.test/web:3",
        ],
    );
    assert!(proc.log().contains("pins published"), "{}", proc.log());
    proc.stop().unwrap();
    fake.stop();
}

/// The value of metric `name` (no labels) of the operator serving
/// /metrics on `port`.
fn metric(port: u16, name: &str) -> Option<f64> {
    let r = pullthrough_testbed::http::Get::new(&format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .ok()?;
    let text = String::from_utf8_lossy(&r.body).to_string();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

/// Pins that do not fit the size cap (lowered here with the hidden
/// `--pins-max-bytes`; 900 KiB in a cluster) are cut to fit, with a
/// `PinsTruncated` Warning on the pins ConfigMap and
/// `pullthrough_operator_pins_dropped` counting what was left out; a
/// write the API server refuses (the ConfigMap made immutable) makes a
/// `PinsNotPublished` Warning and counts in
/// `pullthrough_operator_pins_write_failures_total`.
#[test]
fn pins_over_the_cap_and_refused_writes_are_reported() {
    const CAP: usize = 200;
    let api = KubeApiserver::start().expect("test bed kube-apiserver");
    install(&api);
    let fake = fake_proxy(json!({"configHash": "none", "registries": []}));
    let mut op = Operator::new(&api, &fake, &["--pins-max-bytes", &CAP.to_string()]);
    let (mut proc, port) = op.start();
    wait_pins(&api, &[]);
    assert_eq!(metric(port, "pullthrough_operator_pins_dropped"), Some(0.0));
    assert_eq!(
        metric(port, "pullthrough_operator_pins_write_failures_total"),
        Some(0.0)
    );

    // 20 images of 25 bytes each in the document: 7 fit.
    let prefetch: Vec<String> = (10..30).map(|i| format!("org/image-{i}:1")).collect();
    apply(
        &api,
        "quay",
        json!({"host": "quay.io", "prefetch": prefetch}),
    )
    .unwrap();
    let mut last = None;
    wait_for("the capped pins", TIMEOUT, || {
        last = pins(&api);
        Ok(last.as_ref().is_some_and(|p| !p.is_empty()))
    })
    .unwrap_or_else(|e| panic!("{e}: {last:?}\n{}", proc.log_tail(4000)));
    let cm = api.get_json(&["cm", "pullthrough-pins", "-n", NS]).unwrap();
    let doc = cm["data"]["pins.json"].as_str().unwrap();
    assert!(doc.len() <= CAP, "{} bytes: {doc}", doc.len());
    let kept = pins(&api).unwrap().len();
    assert!((1..20).contains(&kept), "{doc}");
    wait_event_in(
        &api,
        NS,
        "PinsTruncated",
        &format!("{} image(s) left out of pullthrough-pins", 20 - kept),
    );
    let events = api
        .get_json(&["events.v1.events.k8s.io", "-n", NS])
        .unwrap();
    let truncated = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["reason"] == "PinsTruncated")
        .unwrap();
    assert_eq!(truncated["type"], "Warning", "{truncated}");
    assert_eq!(truncated["regarding"]["kind"], "ConfigMap", "{truncated}");
    assert_eq!(
        truncated["regarding"]["name"], "pullthrough-pins",
        "{truncated}"
    );
    let dropped = metric(port, "pullthrough_operator_pins_dropped");
    assert_eq!(dropped, Some((20 - kept) as f64), "{}", proc.log_tail(4000));

    // The ConfigMap made immutable: the next pins cannot be written.
    api.kubectl(&[
        "patch",
        "cm",
        "pullthrough-pins",
        "-n",
        NS,
        "--type=merge",
        "-p",
        r#"{"immutable": true}"#,
    ])
    .unwrap();
    apply(
        &api,
        "quay",
        json!({"host": "quay.io", "prefetch": ["org/other:1"]}),
    )
    .unwrap();
    wait_event_in(
        &api,
        NS,
        "PinsNotPublished",
        "writing pullthrough-pins failed",
    );
    let mut failures = None;
    wait_for("a counted write failure", TIMEOUT, || {
        failures = metric(port, "pullthrough_operator_pins_write_failures_total");
        Ok(failures.is_some_and(|f| f >= 1.0))
    })
    .unwrap_or_else(|e| panic!("{e}: {failures:?}\n{}", proc.log_tail(4000)));
    assert_eq!(
        pins(&api).unwrap().len(),
        kept,
        "the last pins written stay"
    );
    proc.stop().unwrap();
}

fn dreg(api: &KubeApiserver, name: &str) -> Option<Value> {
    api.get_json(&["dreg", name])
}

/// Asserts no trace of `secret` (pod content: an env value, an argument)
/// is in what the operator writes from pods: the pins ConfigMap, every
/// Event (core `message` and events.k8s.io `note`, whole objects), the
/// DiscoveredRegistries (status included) and the MirrorRegistries.
fn assert_no_pod_content(api: &KubeApiserver, secret: &str, when: &str) {
    let written = [
        api.get_json(&["cm", "pullthrough-pins", "-n", NS])
            .expect("the pins ConfigMap"),
        api.get_json(&["events", "-A"]).unwrap(),
        api.get_json(&["events.v1.events.k8s.io", "-A"]).unwrap(),
        api.get_json(&["dreg"]).unwrap(),
        api.get_json(&["mreg"]).unwrap(),
    ];
    for w in &written {
        assert!(
            !w.to_string().contains(secret),
            "pod content leaked {when}: {w:#}"
        );
    }
}

/// Waits for an Event with `reason` whose note contains `note`.
fn wait_event(api: &KubeApiserver, reason: &str, note: &str) {
    wait_event_in(api, "default", reason, note);
}

/// [`wait_event`] among the Events of namespace `ns`.
fn wait_event_in(api: &KubeApiserver, ns: &str, reason: &str, note: &str) {
    let mut last = Value::Null;
    let r =
        wait_for(&format!("the {reason} Event"), TIMEOUT, || {
            last = api
                .get_json(&["events.v1.events.k8s.io", "-n", ns])
                .unwrap();
            Ok(last["items"].as_array().unwrap().iter().any(|e| {
                e["reason"] == reason && e["note"].as_str().is_some_and(|n| n.contains(note))
            }))
        });
    if let Err(e) = r {
        panic!("{e}: {last:#}");
    }
}

/// Discovery (issue #14, point 5) with the shipped RBAC: pods pulling from
/// ghcr.io, which no MirrorRegistry mirrors, make a DiscoveredRegistry
/// with their pod and node counts and a `Discovered` Event; a mirrored
/// registry (quay.io, and its alias) makes none; a MirrorRegistry for
/// ghcr.io removes it; with `--discovery=create` the operator creates that
/// MirrorRegistry itself, only with the binding of its own for that, and
/// leaves it to the admin (label removed) once they edit it.
#[test]
fn discovery_lists_unmirrored_registries_and_creates_on_request() {
    let Workloads {
        api,
        mut fake,
        mut op,
        mut proc,
    } = Workloads::start();
    apply(
        &api,
        "quay",
        json!({"host": "quay.io", "aliases": ["quay.example"]}),
    )
    .unwrap();
    let pod = |name: &str, node: &str, image: &str| {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": "apps"},
               "spec": {"nodeName": node, "automountServiceAccountToken": false,
                        "containers": [{"name": "c", "image": image}]}})
    };
    // Pod specs carry more than images: none of it may leave the operator,
    // from a pod of a mirrored registry (pinned) or of an unmirrored one
    // (discovered, then pinned once mirrored).
    let with_secrets = |mut p: Value| {
        p["spec"]["containers"][0]["env"] = json!([{"name": "TOKEN", "value": "hunter2-in-env"}]);
        p["spec"]["containers"][0]["args"] = json!(["--password=hunter2-in-args"]);
        p
    };
    apply_json(&api, with_secrets(pod("a", "n1", "ghcr.io/org/a:1")));
    apply_json(&api, pod("b", "n2", "ghcr.io/org/b:1"));
    apply_json(&api, pod("c", "n2", "ghcr.io/org/a:1"));
    apply_json(&api, with_secrets(pod("q", "n1", "quay.io/org/q:1")));
    apply_json(&api, pod("qa", "n1", "quay.example/org/q:1"));
    let mut last = None;
    wait_for("DiscoveredRegistry ghcr.io", TIMEOUT, || {
        last = dreg(&api, "ghcr.io");
        Ok(last.as_ref().is_some_and(|d| d["status"]["pods"] == 3))
    })
    .unwrap_or_else(|e| panic!("{e}: {last:?}\n{}", proc.log()));
    let d = dreg(&api, "ghcr.io").unwrap();
    assert_eq!(d["spec"]["host"], "ghcr.io");
    assert_eq!(d["status"]["nodes"], 2, "{d}");
    assert_eq!(
        d["status"]["images"],
        json!(["ghcr.io/org/a:1", "ghcr.io/org/b:1"])
    );
    let all = api.get_json(&["dreg"]).unwrap();
    assert_eq!(
        all["items"].as_array().unwrap().len(),
        1,
        "only ghcr.io: {all}"
    );
    // Pins list mirrored registries only (ghcr.io is not, yet).
    wait_for("the pins", TIMEOUT, || {
        Ok(pins(&api).is_some_and(|p| p.contains(&"quay.io/org/q:1".to_string())))
    })
    .unwrap();
    assert!(
        !pins(&api)
            .unwrap()
            .iter()
            .any(|p| p.starts_with("ghcr.io/")),
        "{:?}",
        pins(&api)
    );
    let row = api.kubectl(&["get", "dreg", "ghcr.io"]).unwrap();
    assert_eq!(
        kubectl_row(&row, "ghcr.io")[..4],
        ["ghcr.io", "ghcr.io", "3", "2"],
        "{row}"
    );
    wait_event(
        &api,
        "Discovered",
        "3 pod(s) on 2 node(s) pull from ghcr.io",
    );
    assert_no_pod_content(&api, "hunter2", "once discovered");

    // Mirrored by the admin: no longer discovered, and pinned.
    apply(&api, "ghcr", json!({"host": "ghcr.io"})).unwrap();
    wait_for("DiscoveredRegistry ghcr.io gone", TIMEOUT, || {
        Ok(dreg(&api, "ghcr.io").is_none())
    })
    .unwrap();
    wait_for("ghcr.io in the pins", TIMEOUT, || {
        Ok(pins(&api).is_some_and(|p| p.contains(&"ghcr.io/org/a:1".to_string())))
    })
    .unwrap();
    assert_no_pod_content(&api, "hunter2", "once ghcr.io is mirrored");
    api.kubectl(&["delete", "mreg", "ghcr", "--wait=true", "--timeout=60s"])
        .unwrap();
    wait_for("DiscoveredRegistry ghcr.io back", TIMEOUT, || {
        Ok(dreg(&api, "ghcr.io").is_some())
    })
    .unwrap();

    // create without its own binding (operator-discovery-create-rbac.yaml,
    // which the chart's uninstall hook deletes first): refused, said once,
    // and nothing is created.
    proc.stop().unwrap();
    op.args = vec!["--discovery=create".into()];
    let (mut proc, _) = op.start();
    wait_for("create refused for RBAC", TIMEOUT, || {
        Ok(proc
            .log()
            .contains("not allowed to create MirrorRegistries"))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", proc.log()));
    assert!(mreg(&api, "ghcr.io").is_none());
    assert!(dreg(&api, "ghcr.io").is_some(), "still reported");

    // With the binding: the operator makes the MirrorRegistry (on its next
    // run; a new pod starts one).
    let create_rbac = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("rbac/operator-discovery-create-rbac.yaml"),
    )
    .unwrap();
    api.kubectl_stdin(&["apply", "-f", "-"], &create_rbac)
        .unwrap();
    apply_json(&api, pod("d", "n1", "ghcr.io/org/d:1"));
    wait_for("MirrorRegistry ghcr.io created", TIMEOUT, || {
        Ok(mreg(&api, "ghcr.io").is_some_and(|m| m["spec"]["host"] == "ghcr.io"))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", proc.log()));
    assert_eq!(
        proc.log()
            .matches("not allowed to create MirrorRegistries")
            .count(),
        1,
        "the refusal is logged once"
    );
    assert_eq!(
        mreg(&api, "ghcr.io").unwrap()["metadata"]["labels"]["pullthrough.dev/discovered"],
        "true"
    );
    wait_for(
        "DiscoveredRegistry ghcr.io gone once mirrored",
        TIMEOUT,
        || Ok(dreg(&api, "ghcr.io").is_none()),
    )
    .unwrap();
    wait_event(
        &api,
        "MirrorRegistryCreated",
        "created MirrorRegistry ghcr.io",
    );
    wait_for("ghcr.io pinned again", TIMEOUT, || {
        Ok(pins(&api).is_some_and(|p| p.contains(&"ghcr.io/org/a:1".to_string())))
    })
    .unwrap();
    assert_no_pod_content(&api, "hunter2", "once the MirrorRegistry is created");

    // The admin edits it (credentials, a CA, an alias...): it is theirs now.
    // The label goes, so the uninstall hook (which deletes the labelled
    // ones) keeps it, and the cap no longer counts it.
    api.kubectl(&[
        "patch",
        "mreg",
        "ghcr.io",
        "--type=merge",
        "-p",
        r#"{"spec":{"aliases":["ghcr.example"]}}"#,
    ])
    .unwrap();
    wait_for("the label removed once edited", TIMEOUT, || {
        Ok(mreg(&api, "ghcr.io").is_some_and(|m| {
            m["metadata"]["labels"]
                .get("pullthrough.dev/discovered")
                .is_none()
        }))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", proc.log()));
    wait_event(&api, "Adopted", "label pullthrough.dev/discovered removed");
    let m = mreg(&api, "ghcr.io").unwrap();
    assert_eq!(m["spec"]["aliases"], json!(["ghcr.example"]), "{m}");
    proc.stop().unwrap();
    fake.stop();
}

/// `pullthrough_operator_reconciles_total` of the operator serving
/// /metrics on `port`.
fn reconciles(port: u16) -> u64 {
    let r = pullthrough_testbed::http::Get::new(&format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .unwrap();
    let text = String::from_utf8_lossy(&r.body).to_string();
    text.lines()
        .find_map(|l| l.strip_prefix("pullthrough_operator_reconciles_total "))
        .unwrap_or_else(|| panic!("no reconciles_total: {text}"))
        .trim()
        .parse()
        .unwrap()
}

/// A change of status alone (the operator's own writes, the proxy's
/// counters it copies) does not make another reconcile: otherwise every
/// status write wakes the registry again and reconciles never settle.
/// A change of the spec still does.
#[test]
fn a_status_only_change_does_not_trigger_a_reconcile() {
    let api = KubeApiserver::start().expect("test bed kube-apiserver");
    install(&api);
    let fake = fake_proxy(json!({"configHash": "none", "registries": []}));
    let mut op = Operator::new(&api, &fake, &["--resync-interval", "10m"]);
    let (mut proc, port) = op.start();
    // Not accepted: nothing to wait for, next look at the resync (10 min).
    apply(
        &api,
        "bad",
        json!({"host": "bad.io", "aliases": ["bad.io"]}),
    )
    .unwrap();
    wait_cond(&api, "bad", "Accepted", "False", Some("InvalidSpec"));
    let mut settled = reconciles(port);
    wait_for("reconciles settle", TIMEOUT, || {
        std::thread::sleep(Duration::from_secs(3));
        let now = reconciles(port);
        let same = now == settled;
        settled = now;
        Ok(same)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", proc.log_tail(4000)));
    api.kubectl(&[
        "patch",
        "mreg",
        "bad",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status": {"cache": {"hits": 7, "misses": 1, "bytes": 100}}}"#,
    ])
    .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        reconciles(port),
        settled,
        "a status change made a reconcile\n{}",
        proc.log_tail(4000)
    );
    // The spec (a new generation) still does.
    apply(
        &api,
        "bad",
        json!({"host": "bad.io", "aliases": ["other.io"]}),
    )
    .unwrap();
    wait_cond(&api, "bad", "Accepted", "True", Some("Valid"));
    assert!(reconciles(port) > settled);
    proc.stop().unwrap();
}

/// A change to one registry that moves another's verdict (here: deleting
/// the registry that held quay.io frees it for its duplicate) updates the
/// other's status at once. Before, the duplicate kept `DuplicateHost`
/// until its own resync (10 minutes here), though the table already
/// served it.
#[test]
fn a_verdict_moved_by_another_registry_shows_without_waiting_for_the_resync() {
    let api = KubeApiserver::start().expect("test bed kube-apiserver");
    install(&api);
    let fake = fake_proxy(json!({"configHash": "none", "registries": []}));
    let mut op = Operator::new(&api, &fake, &["--resync-interval", "10m"]);
    let (proc, _) = op.start();
    apply(&api, "first", json!({"host": "quay.io"})).unwrap();
    wait_cond(&api, "first", "Accepted", "True", Some("Valid"));
    std::thread::sleep(Duration::from_millis(1100)); // distinct creationTimestamps
    apply(&api, "second", json!({"host": "quay.io"})).unwrap();
    wait_cond(&api, "second", "Accepted", "False", Some("DuplicateHost"));
    // No agent reports quay.io: the delete completes at once.
    api.kubectl(&["delete", "mreg", "first"]).unwrap();
    wait_table(&api, "quay.io still served", |c| hosts(c) == ["quay.io"]);
    wait_for("second accepted", TIMEOUT, || {
        let s = mreg(&api, "second").unwrap();
        Ok(cond(&s, "Accepted").is_some_and(|c| c["status"] == "True"))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", proc.log_tail(4000)));
}

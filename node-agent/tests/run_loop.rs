//! `pullthrough-agent run`: the health gate against a real dockerd (the
//! `/etc/hosts` block empties while the proxy is down, so pulls go to the
//! real registry, and comes back with it), and the in-cluster loop against
//! a real API server with a least-privilege ServiceAccount (table changes
//! applied within 2 s, the node's Lease with its report).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{QUAY_IMAGE, assert_all_gone, wait};
use pullthrough_testbed::dockerd::{Dockerd, DockerdOpts};
use pullthrough_testbed::kube::KubeApiserver;
use pullthrough_testbed::net::wait_for;
use pullthrough_testbed::ns::{NetNs, netns_http_status};
use pullthrough_testbed::process::Process;
use pullthrough_testbed::proxy::{Addrs, Proxy};
use pullthrough_testbed::registry::{Flavour, Registry, RegistryOpts};
use pullthrough_testbed::tls::TestCa;

/// What dockerd sees as `/etc/hosts` (read inside its mount namespace).
fn dockerd_hosts(dockerd: &Dockerd) -> String {
    let out = Command::new("nsenter")
        .args(["-t", &dockerd.pid().to_string(), "-m", "cat", "/etc/hosts"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tag_lines(proxy: &Proxy) -> usize {
    proxy
        .access_matching(&[("kind", "tag"), ("via", "host"), ("registry", "quay.io")])
        .len()
}

/// dockerd, the proxy (10.254.0.1:443) and the real quay.io (the upstream,
/// 10.254.0.2:443, TLS the admin trusts) in a network namespace of the
/// test's own; `run --config-file` with a 250 ms probe, 2 failures to
/// close, 2 successes to open. The admin's DNS (a hosts line after the
/// agent's block) resolves quay.io to the real one when the block is empty.
#[test]
fn health_gate_empties_the_hosts_block_while_the_proxy_is_down() {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let mut dirs = vec![tmp.path().to_path_buf()];
    let mut netns_names = Vec::new();
    {
        let vip: IpAddr = "10.254.0.1".parse().unwrap();
        let upip: IpAddr = "10.254.0.2".parse().unwrap();
        let netns = NetNs::create(&[vip, upip]).unwrap();
        netns_names.push(netns.name().to_string());
        let mut ropts = RegistryOpts::new(Flavour::Tls);
        ropts.netns = Some(netns.name().to_string());
        ropts.ip = upip;
        ropts.port = Some(443);
        ropts.tls_names = vec!["quay.io".into()];
        let up = common::upstream(Registry::start(ropts).unwrap(), &["fixture/busybox"]);
        let mut proxy = Proxy::start_in(
            netns.name(),
            common::proxy_bin(),
            Addrs::in_netns(SocketAddr::new(vip, 443)).unwrap(),
            &format!(
                "registries:\n- host: quay.io\n  upstream: {}\n  caBundle: {}\n",
                up.registry.url(),
                up.registry.ca_path().unwrap().display()
            ),
        )
        .unwrap();
        let dopts = DockerdOpts {
            netns: Some(netns.name().to_string()),
            host_root: Some(root.clone()),
            ..DockerdOpts::default()
        };
        let dockerd = Dockerd::start(dopts).unwrap();
        dockerd
            .write_ca("quay.io", up.registry.ca_pem().unwrap())
            .unwrap();
        dirs.extend([
            up.registry.dir().to_path_buf(),
            proxy.dir().to_path_buf(),
            dockerd.dir().to_path_buf(),
        ]);

        let config = common::write_agent_config(
            &tmp.path().join("conf"),
            &format!(
                "proxy:\n  address: 10.254.0.1\n  caFile: ca.crt\n  readyUrl: http://{}/readyz\n\
                 registries:\n  - host: quay.io\n",
                proxy.addrs.admin
            ),
            Some(&proxy.ca_pem().unwrap()),
        );
        let health = format!(
            "127.0.0.1:{}",
            pullthrough_testbed::net::free_port().unwrap()
        );
        let r = root.to_str().unwrap();
        let cmd = common::agent_command(
            &root,
            Some(netns.name()),
            [
                "run",
                "--root",
                r,
                "--config-file",
                config.to_str().unwrap(),
                "--runtime",
                "docker",
                "--probe-interval",
                "250ms",
                "--probe-timeout",
                "500ms",
                "--fail-threshold",
                "2",
                "--success-threshold",
                "2",
                "--health-addr",
                &health,
            ],
        );
        let mut agent =
            Process::spawn("pullthrough-agent", cmd, tmp.path().join("agent.log")).unwrap();
        let block = "10.254.0.1\tquay.io";
        wait("the hosts block", Duration::from_secs(5), || {
            fs::read_to_string(root.join("etc/hosts"))
                .unwrap()
                .contains(block)
        });
        let applied = t0.elapsed();
        assert_eq!(
            netns_http_status(netns.name(), &format!("http://{health}/healthz")),
            Some(200)
        );
        // The admin's DNS, after the block (in place: dockerd's /etc/hosts
        // is a bind mount).
        let hosts = fs::read_to_string(root.join("etc/hosts")).unwrap();
        common::write_in_place(
            &root.join("etc/hosts"),
            format!("{hosts}{upip} quay.io\n").as_bytes(),
        );

        common::pull_retrying(|| dockerd.docker(["pull", QUAY_IMAGE]));
        proxy
            .wait_access(&[("kind", "tag"), ("via", "host"), ("registry", "quay.io")])
            .unwrap();

        // Proxy down: the block empties.
        proxy.stop().unwrap();
        let down = Instant::now();
        wait("the block to empty", Duration::from_secs(5), || {
            !dockerd_hosts(&dockerd).contains(block)
        });
        let emptied = down.elapsed();
        let seen = dockerd_hosts(&dockerd);
        assert!(seen.contains("# >>> pullthrough-agent"), "{seen}");
        assert!(seen.ends_with(&format!("{upip} quay.io\n")), "{seen}");
        dockerd.docker(["rmi", QUAY_IMAGE]).unwrap();
        let manifests = || {
            up.registry
                .count_requests("HEAD", "/v2/fixture/busybox/manifests/")
                + up.registry
                    .count_requests("GET", "/v2/fixture/busybox/manifests/")
        };
        let direct = manifests();
        common::pull_retrying(|| dockerd.docker(["pull", QUAY_IMAGE]));
        assert!(manifests() > direct, "the pull did not reach quay.io");

        // Proxy back: the block comes back, ahead of the admin's line.
        proxy.restart().unwrap();
        let back = Instant::now();
        wait("the block to return", Duration::from_secs(5), || {
            dockerd_hosts(&dockerd).contains(block)
        });
        let restored = back.elapsed();
        let seen = dockerd_hosts(&dockerd);
        assert!(
            seen.find(block).unwrap() < seen.find(&format!("{upip} quay.io")).unwrap(),
            "{seen}"
        );
        dockerd.docker(["rmi", QUAY_IMAGE]).unwrap();
        let before = tag_lines(&proxy);
        common::pull_retrying(|| dockerd.docker(["pull", QUAY_IMAGE]));
        wait(
            "the proxy to serve the pull",
            Duration::from_secs(10),
            || tag_lines(&proxy) > before,
        );

        // SIGTERM stops without reverting.
        let status = agent.stop().unwrap().unwrap();
        assert!(status.success(), "{status:?}: {}", agent.log());
        assert!(
            fs::read_to_string(root.join("etc/hosts"))
                .unwrap()
                .contains(block)
        );
        let log = fs::read_to_string(tmp.path().join("agent.log")).unwrap();
        assert!(log.contains("health gate closed"), "{log}");
        assert!(log.contains("SIGTERM"), "{log}");
        eprintln!(
            "health gate: applied {:.1}s, emptied {:.2}s after the proxy stopped, restored {:.2}s after it came back, total {:.1}s",
            applied.as_secs_f64(),
            emptied.as_secs_f64(),
            restored.as_secs_f64(),
            t0.elapsed().as_secs_f64()
        );
    }
    assert_all_gone(&dirs, &netns_names);
}

fn kubectl_json(api: &KubeApiserver, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    serde_json::from_str(&api.kubectl(&all).unwrap()).unwrap()
}

fn configmap(name: &str, key: &str, value: &str) -> String {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": "pullthrough"},
        "data": {key: value},
    })
    .to_string()
}

/// The in-cluster loop against a real kube-apiserver, authenticated as the
/// `pullthrough-agent` ServiceAccount bound to `rbac/agent-rbac.yaml`: the
/// table and CA ConfigMaps are applied to the root, a table change shows in
/// the files within 2 s, and the node's Lease carries the report.
#[test]
fn run_watches_the_configmaps_and_reports_in_a_lease() {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    fs::create_dir_all(root.join("etc/docker")).unwrap();
    fs::write(root.join("etc/hosts"), "127.0.0.1 localhost\n").unwrap();
    fs::write(root.join("etc/docker/daemon.json"), "{}\n").unwrap();
    let mut dirs = vec![tmp.path().to_path_buf()];
    {
        let mut api = KubeApiserver::start().unwrap();
        dirs.push(api.dir().to_path_buf());
        let rbac =
            fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("rbac/agent-rbac.yaml"))
                .unwrap();
        api.kubectl(&["create", "namespace", "pullthrough"])
            .unwrap();
        api.kubectl_stdin(&["apply", "-f", "-"], &rbac).unwrap();
        let token = api.token_for("pullthrough", "pullthrough-agent").unwrap();
        let kubeconfig = api.kubeconfig_for_token(&token).unwrap();
        let table1 = "proxy:\n  address: 10.96.0.50\n  caFile: /etc/pullthrough/ca/ca.crt\n\
                      registries:\n- host: quay.io\n";
        api.kubectl_stdin(
            &["apply", "-f", "-"],
            &configmap("pullthrough-registries", "config.yaml", table1),
        )
        .unwrap();
        api.kubectl_stdin(
            &["apply", "-f", "-"],
            &configmap("someone-elses", "secret.txt", "not for agents"),
        )
        .unwrap();
        let as_agent = |args: &[&str]| api.kubectl_with(&kubeconfig, args);
        // The API server authorizes from a cache of the RBAC objects: first
        // a read the Role allows, until it works, so the refusals below are
        // RBAC saying no and not a binding it has not seen yet (nor a token
        // it does not take).
        let mut last = String::new();
        wait_for(
            "the agent to read its table ConfigMap",
            Duration::from_secs(30),
            || {
                let r = as_agent(&[
                    "get",
                    "configmap",
                    "pullthrough-registries",
                    "-n",
                    "pullthrough",
                    "-o",
                    "jsonpath={.data.config\\.yaml}",
                ]);
                last = format!("{r:?}");
                Ok(r.is_ok_and(|t| t == table1))
            },
        )
        .unwrap_or_else(|e| panic!("{e}: last answer {last}"));
        let refused = |args: &[&str], verb: &str, resource: &str, ns: &str| {
            let e = as_agent(args).expect_err("refused").to_string();
            let says = format!(
                "User \"system:serviceaccount:pullthrough:pullthrough-agent\" cannot {verb} \
                 resource \"{resource}\" in API group \"\" in the namespace \"{ns}\""
            );
            assert!(e.contains("(Forbidden)") && e.contains(&says), "{e}");
        };
        // Least privilege: no Secrets, nothing outside the namespace.
        refused(
            &["get", "secrets", "-n", "pullthrough"],
            "list",
            "secrets",
            "pullthrough",
        );
        refused(
            &["get", "configmaps", "-n", "default"],
            "list",
            "configmaps",
            "default",
        );
        // Nor another ConfigMap of its own namespace.
        refused(
            &["get", "configmap", "someone-elses", "-n", "pullthrough"],
            "get",
            "configmaps",
            "pullthrough",
        );

        let ca = TestCa::new("pullthrough test proxy CA").unwrap();
        api.kubectl_stdin(
            &["apply", "-f", "-"],
            &configmap("pullthrough-ca", "ca.crt", &ca.cert_pem()),
        )
        .unwrap();

        let mut cmd = Command::new(common::agent_bin());
        cmd.env("KUBECONFIG", &kubeconfig)
            .env("NODE_NAME", "node-a")
            .env_remove("POD_NAMESPACE")
            .args([
                "run",
                "--root",
                root.to_str().unwrap(),
                "--namespace",
                "pullthrough",
                "--runtime",
                "docker",
                "--lease-renew",
                "1s",
            ]);
        let mut agent =
            Process::spawn("pullthrough-agent", cmd, tmp.path().join("agent.log")).unwrap();
        let hosts = || fs::read_to_string(root.join("etc/hosts")).unwrap();
        let ca_file = root.join("etc/docker/certs.d/quay.io/pullthrough-ca.crt");
        // Files are written one after the other: wait for the last one.
        wait("the table applied", Duration::from_secs(10), || {
            hosts().contains("10.96.0.50\tquay.io") && ca_file.is_file()
        });
        let first = t0.elapsed();
        assert_eq!(fs::read_to_string(&ca_file).unwrap(), ca.cert_pem());

        // A table change shows within 2 s.
        let table2 = format!("{table1}- host: ghcr.io\n");
        api.kubectl_stdin(
            &["apply", "-f", "-"],
            &configmap("pullthrough-registries", "config.yaml", &table2),
        )
        .unwrap();
        let changed = Instant::now();
        wait("the table change applied", Duration::from_secs(2), || {
            hosts().contains("10.96.0.50\tghcr.io")
        });
        let took = changed.elapsed();

        // The Lease: report of what was applied.
        let want_hash = pullthrough_api::contract::config_hash(table2.as_bytes());
        let mut lease = serde_json::Value::Null;
        wait("the Lease report", Duration::from_secs(10), || {
            lease = kubectl_json(
                &api,
                &[
                    "get",
                    "lease",
                    "pullthrough-agent-node-a",
                    "-n",
                    "pullthrough",
                ],
            );
            lease["metadata"]["annotations"]["pullthrough.dev/config-hash"] == want_hash.as_str()
        });
        let ann = &lease["metadata"]["annotations"];
        assert_eq!(
            ann["pullthrough.dev/registries"], "ghcr.io,quay.io",
            "{lease}"
        );
        assert_eq!(ann["pullthrough.dev/runtime"], "docker", "{lease}");
        assert_eq!(ann["pullthrough.dev/last-error"], "", "{lease}");
        assert_eq!(lease["spec"]["holderIdentity"], "node-a");
        assert_eq!(lease["spec"]["leaseDurationSeconds"], 90);
        assert!(lease["spec"]["renewTime"].is_string());

        // CA rotation: only the CA ConfigMap changes.
        let ca2 = TestCa::new("pullthrough test proxy CA 2").unwrap();
        let bundle = format!("{}{}", ca.cert_pem(), ca2.cert_pem());
        api.kubectl_stdin(
            &["apply", "-f", "-"],
            &configmap("pullthrough-ca", "ca.crt", &bundle),
        )
        .unwrap();
        wait("the new CA bundle applied", Duration::from_secs(2), || {
            fs::read_to_string(&ca_file).unwrap() == bundle
        });

        // A broken table: reported, the node keeps the last good config.
        api.kubectl_stdin(
            &["apply", "-f", "-"],
            &configmap(
                "pullthrough-registries",
                "config.yaml",
                "registries: [{host: 'Bad'}]\n",
            ),
        )
        .unwrap();
        wait("the error in the Lease", Duration::from_secs(10), || {
            let l = kubectl_json(
                &api,
                &[
                    "get",
                    "lease",
                    "pullthrough-agent-node-a",
                    "-n",
                    "pullthrough",
                ],
            );
            l["metadata"]["annotations"]["pullthrough.dev/last-error"]
                .as_str()
                .is_some_and(|e| !e.is_empty())
        });
        assert!(hosts().contains("10.96.0.50\tghcr.io"));

        // Renewed on schedule (here every second, by default every 30 s).
        let get = || {
            kubectl_json(
                &api,
                &[
                    "get",
                    "lease",
                    "pullthrough-agent-node-a",
                    "-n",
                    "pullthrough",
                ],
            )["spec"]["renewTime"]
                .clone()
        };
        let renewed = get();
        wait("the Lease renewed", Duration::from_secs(5), || {
            get() != renewed
        });

        let status = agent.stop().unwrap().unwrap();
        assert!(status.success(), "{status:?}");
        api.stop().unwrap();
        eprintln!(
            "run (kube): first apply {:.1}s, table change applied in {:.2}s, total {:.1}s",
            first.as_secs_f64(),
            took.as_secs_f64(),
            t0.elapsed().as_secs_f64()
        );
    }
    assert_all_gone(&dirs, &[]);
}

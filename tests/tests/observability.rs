//! The chart's monitoring (issue #14 item 9): the PrometheusRule and the
//! Grafana dashboard ConfigMap.
//!
//! - The rendered rules pass `promtool check rules`, and `promtool test
//!   rules` feeds them input series and checks which alerts fire (and that
//!   a wrong expectation does fail, so the unit tests are not vacuous).
//! - Every metric name the dashboard and the rules read is exported by a
//!   real proxy (after real traffic) and a real operator (the leader,
//!   against a real API server, counting nodes from agent Leases in each
//!   state), scraped at `/metrics`, the upstream budget and tag series
//!   included (an upstream scripted like Docker Hub, [`Hub`]).
//! - The dashboard ConfigMap carries the Grafana sidecar's label, lands in
//!   the namespace asked for, and holds the chart's JSON file.
//!
//! kubeconform and the install into a real API server cover these objects
//! in `chart.rs` (all-features values turn both on).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

use pullthrough_testbed::Error;
use pullthrough_testbed::bins::operator_bin;
use pullthrough_testbed::fixtures::LayoutBuilder;
use pullthrough_testbed::http::{BodyMode, Get, runtime};
use pullthrough_testbed::hub::{Hub, MEDIA_TYPE};
use pullthrough_testbed::kube::{Helm, KubeApiserver};
use pullthrough_testbed::net::free_port;
use pullthrough_testbed::process::{Process, run};
use pullthrough_testbed::proxy::{Addrs, Proxy, proxy_bin};
use pullthrough_testbed::stub::{Stub, Throttle};
use pullthrough_testbed::tools::go_tool;

const BOTH: &[&str] = &[
    "--set",
    "prometheusRule.enabled=true",
    "--set",
    "grafanaDashboard.enabled=true",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `helm template pullthrough charts/pullthrough -n pullthrough EXTRA...`,
/// every document as JSON.
fn render(helm: &Helm, extra: &[&str]) -> Result<Vec<Value>, Error> {
    let chart = root().join("charts/pullthrough").display().to_string();
    let mut args = vec![
        "template",
        "pullthrough",
        &chart,
        "--namespace",
        "pullthrough",
    ];
    args.extend_from_slice(extra);
    pullthrough_testbed::kube::yaml_documents(&helm.run(&args)?)
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// Every alerting rule of the PrometheusRule's spec.
fn alert_rules(spec: &Value) -> Vec<&Value> {
    spec["groups"]
        .as_array()
        .expect("spec.groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("group rules"))
        .collect()
}

/// The dashboard JSON of the rendered ConfigMap.
fn dashboard(docs: &[Value]) -> Value {
    let cms: Vec<_> = find(docs, "ConfigMap")
        .into_iter()
        .filter(|c| c["metadata"]["name"] == "pullthrough-dashboard")
        .collect();
    assert_eq!(cms.len(), 1, "one dashboard ConfigMap");
    let text = cms[0]["data"]["pullthrough.json"]
        .as_str()
        .expect("data[pullthrough.json]");
    serde_json::from_str(text).expect("the dashboard is JSON")
}

/// `pullthrough_*` words of a text (an alert's description).
fn words(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with("pullthrough_"))
        .map(String::from)
        .collect()
}

/// Names of `pullthrough_*` series a PromQL expression reads (string
/// literals removed first, so label values never count).
fn metric_names(promql: &str) -> BTreeSet<String> {
    let mut code = String::new();
    let mut quote = None;
    let mut escaped = false;
    for c in promql.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
            }
            None if matches!(c, '"' | '\'' | '`') => quote = Some(c),
            None => code.push(c),
        }
    }
    words(&code)
}

/// Every query string of a Grafana dashboard: panel targets' `expr` and
/// the templating variables' queries.
fn dashboard_queries(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                    ("query", Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_queries(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| dashboard_queries(x, out)),
        _ => {}
    }
}

/// The series names an OpenMetrics exposition offers: each `# TYPE`
/// family with its sample suffixes (a counter family `x` is sampled as
/// `x_total`; a histogram as `x_bucket`, `x_sum`, `x_count`), and every
/// sample line's name. (prometheus-client leaves out a labelled family
/// until it has a series: the scrapes above make traffic first.)
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "summary" => &["", "_sum", "_count"],
                "info" => &["_info"],
                _ => &[""],
            };
            for s in suffixes {
                names.insert(format!("{name}{s}"));
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

fn scrape(url: &str) -> String {
    let r = Get::new(url)
        .timeout(Duration::from_secs(10))
        .send()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert!(r.status.is_success(), "GET {url}: {}", r.status);
    String::from_utf8(r.body.to_vec()).expect("metrics are UTF-8")
}

/// The proxy's `/metrics` after real traffic, so that every family has a
/// series: a proxy on loopback in front of a stub registry whose blob
/// trickles in, marked private (every cached serve is checked upstream);
/// one miss that two more requests join while it downloads (merged
/// waiters), then hits in its repository and another, and a manifest by
/// tag.
fn proxy_metrics() -> String {
    let work = tempfile::tempdir().unwrap();
    let image = LayoutBuilder::new(&work.path().join("layout"))
        .unwrap()
        .random("1", &[1 << 20], 14)
        .unwrap();
    let layer = image.layer_digests()[0].clone();
    // 1 MiB at 64 KiB per 40 ms: the download lasts about 0.6 s.
    let (hub, hub_stub) = Hub::start(50).unwrap();
    let stub = Stub::builder(&image.layout)
        .throttle(Throttle {
            chunk: 64 * 1024,
            pause: Duration::from_millis(40),
        })
        .start()
        .unwrap();
    let proxy = Proxy::start(
        &proxy_bin().unwrap(),
        Addrs::localhost().unwrap(),
        &format!(
            "cache: {{maxSize: 1GiB}}\nregistries:\n  - host: stub.test\n    upstream: {}\n    private: true\n  - host: hub.test\n    upstream: {}\n    tagPolicy: [{{pattern: latest, ttl: 0s}}]\n",
            stub.url(),
            hub_stub.url()
        ),
    )
    .unwrap();
    let base = format!("{}/v2/stub.test/fixture/app", proxy.http_url());
    let blob = format!("{base}/blobs/{layer}");
    let fetch = |url: String| async move {
        Get::new(&url)
            .timeout(Duration::from_secs(30))
            .fetch(BodyMode::Keep)
            .await
            .unwrap()
    };
    let statuses = runtime().unwrap().block_on(async {
        let first = tokio::spawn(fetch(blob.clone()));
        tokio::time::sleep(Duration::from_millis(150)).await;
        let joined = [
            tokio::spawn(fetch(blob.clone())),
            tokio::spawn(fetch(blob.clone())),
        ];
        let mut statuses = vec![first.await.unwrap().status];
        for j in joined {
            statuses.push(j.await.unwrap().status);
        }
        statuses.push(fetch(blob.clone()).await.status);
        // The same blob under another repository: a hit, checked upstream.
        statuses.push(
            fetch(blob.replace("/fixture/app/", "/fixture/other/"))
                .await
                .status,
        );
        statuses.push(fetch(format!("{base}/manifests/1")).await.status);
        statuses
    });
    assert!(
        statuses.iter().all(|s| s.is_success()),
        "{statuses:?}\n{}",
        proxy.log()
    );
    // One download; the hit under another repository was only asked about
    // (a one-byte GET).
    assert_eq!(
        stub.downloads(&layer),
        1,
        "one upstream download of the blob"
    );
    // The upstream budget and the tag series: a pull (budget figures), a
    // revalidation that finds the tag unmoved, one that finds it moved (a
    // move), and one that meets a 429 (served from the cache).
    let latest = format!(
        "{}/v2/hub.test/library/app/manifests/latest",
        proxy.http_url()
    );
    for step in 0..4 {
        match step {
            2 => hub.move_tags(),
            3 => hub.set_storm(true),
            _ => {}
        }
        let r = Get::new(&latest)
            .header("Accept", MEDIA_TYPE)
            .send()
            .unwrap();
        assert_eq!(
            r.status,
            http::StatusCode::OK,
            "step {step}: {}",
            proxy.log()
        );
    }
    let text = scrape(&format!("http://{}/metrics", proxy.addrs.admin));
    // The bound the cache alert divides by is the configured one.
    assert!(
        text.lines()
            .any(|l| l == format!("pullthrough_cache_max_bytes {}", 1u64 << 30)),
        "{text}"
    );
    text
}

/// An agent's per-node Lease as the node agent writes it
/// (docs/cluster-contract.md): applied table hash, registries, last error.
fn agent_lease(node: &str, hash: &str, error: &str, renewed: Timestamp, secs: i32) -> String {
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": format!("pullthrough-agent-{node}"), "namespace": "pullthrough",
            "annotations": {
                "pullthrough.dev/config-hash": hash,
                "pullthrough.dev/registries": "",
                "pullthrough.dev/runtime": "containerd",
                "pullthrough.dev/last-error": error,
            }},
        "spec": {"holderIdentity": node, "leaseDurationSeconds": secs,
                 "renewTime": MicroTime(renewed)},
    })
    .to_string()
}

/// The operator's `/metrics`: the real binary as the leader against a
/// real API server, once it has published the registry table and counted
/// four nodes from their agents' Leases, one in each state. Stopped by PID
/// before returning.
fn operator_metrics() -> String {
    let api = KubeApiserver::start().expect("start etcd + kube-apiserver");
    api.apply_crds(&pullthrough_testbed::kube::chart_crds().unwrap())
        .unwrap();
    api.kubectl(&["create", "namespace", "pullthrough"])
        .unwrap();
    let port = free_port().unwrap();
    let mut cmd = Command::new(operator_bin().unwrap());
    cmd.env("KUBECONFIG", api.kubeconfig_path())
        .env_remove("POD_NAMESPACE")
        .args(["--namespace", "pullthrough", "--identity", "metrics-test"])
        .args(["--resync-interval", "1s"])
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--proxy-status-url")
        .arg(format!("http://127.0.0.1:{}/status", free_port().unwrap()));
    let mut op =
        Process::spawn("pullthrough-operator", cmd, api.dir().join("operator.log")).unwrap();
    let url = format!("http://127.0.0.1:{port}/metrics");
    let mut text = String::new();
    let mut wait_for = |op: &mut Process, what: &str, lines: &[&str]| {
        op.wait_ready(what, Duration::from_secs(60), || {
            text = Get::new(&url)
                .send()
                .map(|r| String::from_utf8_lossy(&r.body).into_owned())
                .unwrap_or_default();
            Ok(lines.iter().all(|l| text.lines().any(|t| t == *l)))
        })
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
        text.clone()
    };
    wait_for(
        &mut op,
        "the leader counting no nodes",
        &[
            "pullthrough_operator_leader 1",
            r#"pullthrough_operator_nodes{state="configured"} 0"#,
        ],
    );
    // The table the operator wrote; agents report the hash they applied.
    let hash = api
        .kubectl(&[
            "get",
            "configmap",
            "pullthrough-registries",
            "-n",
            "pullthrough",
            "-o",
            r"jsonpath={.metadata.annotations.pullthrough\.dev/config-hash}",
        ])
        .unwrap();
    assert_eq!(hash.trim().len(), 64, "table hash {hash:?}");
    let now = Timestamp::now();
    let hour_ago = Timestamp::from_second(now.as_second() - 3600).unwrap();
    for lease in [
        agent_lease("node-a", hash.trim(), "", now, 3600),
        agent_lease("node-b", "an-older-table", "", now, 3600),
        agent_lease(
            "node-c",
            hash.trim(),
            "hosts.toml: permission denied",
            now,
            3600,
        ),
        agent_lease("node-d", hash.trim(), "", hour_ago, 40),
        // node-d's Node exists: its expired Lease is a node gone silent,
        // not history.
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-d"}}).to_string(),
    ] {
        api.kubectl_stdin(&["apply", "-f", "-"], &lease).unwrap();
    }
    let text = wait_for(
        &mut op,
        "one node in each state",
        &[
            r#"pullthrough_operator_nodes{state="configured"} 1"#,
            r#"pullthrough_operator_nodes{state="pending"} 1"#,
            r#"pullthrough_operator_nodes{state="failed"} 1"#,
            r#"pullthrough_operator_nodes{state="expired"} 1"#,
        ],
    );
    op.stop().unwrap();
    drop(api);
    text
}

/// Every `pullthrough_*` metric the dashboard and the alerts read is one
/// that a real proxy or operator exports (a renamed metric fails here),
/// with no exception: the upstream budget gauges the rules read
/// (`pullthrough_upstream_ratelimit_remaining` and `_limit`) are exported
/// by the proxy scraped here once it has pulled from the Docker Hub stub
/// (`ratelimit-*` headers).
#[test]
fn every_metric_the_dashboard_and_the_alerts_read_is_exported() {
    let helm = Helm::new(None).expect("helm");
    let docs = render(&helm, BOTH).expect("render with both features");

    let mut queries = Vec::new();
    dashboard_queries(&dashboard(&docs), &mut queries);
    let in_dashboard: BTreeSet<String> = queries.iter().flat_map(|q| metric_names(q)).collect();
    let rule = find(&docs, "PrometheusRule");
    assert_eq!(rule.len(), 1, "one PrometheusRule");
    // The expressions, and the metrics the descriptions tell admins to check.
    let in_rules: BTreeSet<String> = alert_rules(&rule[0]["spec"])
        .iter()
        .flat_map(|r| {
            let mut names = metric_names(r["expr"].as_str().expect("expr"));
            names.extend(words(
                r["annotations"]["description"].as_str().unwrap_or(""),
            ));
            names
        })
        .collect();
    // The extraction finds what the files obviously hold.
    for (what, names, want) in [
        ("dashboard", &in_dashboard, "pullthrough_requests_total"),
        ("dashboard", &in_dashboard, "pullthrough_operator_nodes"),
        ("rules", &in_rules, "pullthrough_cache_max_bytes"),
        ("rules", &in_rules, "pullthrough_operator_nodes"),
        ("rules", &in_rules, "pullthrough_ca_reload_errors_total"),
    ] {
        assert!(names.contains(want), "{what} must read {want}: {names:?}");
    }
    assert!(in_dashboard.len() >= 25, "{in_dashboard:?}");

    let proxy = proxy_metrics();
    let operator = operator_metrics();
    let mut offered = exported(&proxy);
    offered.extend(exported(&operator));
    assert!(
        offered.contains("pullthrough_operator_reconciles_total")
            && offered.contains("pullthrough_request_duration_seconds_bucket"),
        "{offered:?}"
    );

    let missing = |names: &BTreeSet<String>| -> Vec<String> {
        names
            .iter()
            .filter(|n| !offered.contains(*n))
            .cloned()
            .collect()
    };
    assert_eq!(
        missing(&in_dashboard),
        Vec::<String>::new(),
        "the dashboard reads metrics nobody exports"
    );
    assert_eq!(
        missing(&in_rules),
        Vec::<String>::new(),
        "the rules read metrics nobody exports"
    );
    eprintln!(
        "{} metrics in the dashboard, {} in the rules, {} series names exported",
        in_dashboard.len(),
        in_rules.len(),
        offered.len()
    );
}

/// The dashboard ConfigMap: the sidecar's label (configurable), the
/// namespace asked for, the chart's JSON file byte for byte; off by
/// default, like the PrometheusRule.
#[test]
fn dashboard_configmap_carries_the_sidecar_label_and_the_json_file() {
    let helm = Helm::new(None).expect("helm");
    let default = render(&helm, &[]).expect("default render");
    assert!(find(&default, "PrometheusRule").is_empty());
    assert!(
        !default
            .iter()
            .any(|d| d["metadata"]["name"] == "pullthrough-dashboard"),
        "no dashboard by default"
    );

    let docs = render(&helm, BOTH).unwrap();
    let cm = find(&docs, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == "pullthrough-dashboard")
        .expect("dashboard ConfigMap");
    assert_eq!(cm["metadata"]["namespace"], "pullthrough");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let file =
        std::fs::read_to_string(root().join("charts/pullthrough/dashboards/pullthrough.json"))
            .unwrap();
    assert_eq!(cm["data"]["pullthrough.json"].as_str(), Some(file.trim()));
    let d = dashboard(&docs);
    assert_eq!(d["uid"], "pullthrough");
    assert!(d["panels"].as_array().is_some_and(|p| p.len() > 20), "{d}");

    let moved = render(
        &helm,
        &[
            "--set",
            "grafanaDashboard.enabled=true",
            "--set",
            "grafanaDashboard.namespace=monitoring",
            "--set",
            "grafanaDashboard.label.key=example.com/dashboard",
            "--set",
            "grafanaDashboard.label.value=pullthrough",
            "--set",
            "grafanaDashboard.annotations.grafana_folder=Infrastructure",
        ],
    )
    .unwrap();
    let cm = find(&moved, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == "pullthrough-dashboard")
        .expect("dashboard ConfigMap");
    assert_eq!(cm["metadata"]["namespace"], "monitoring");
    assert_eq!(
        cm["metadata"]["labels"]["example.com/dashboard"],
        "pullthrough"
    );
    assert!(cm["metadata"]["labels"].get("grafana_dashboard").is_none());
    assert_eq!(
        cm["metadata"]["annotations"]["grafana_folder"],
        "Infrastructure"
    );

    // The schema refuses what would render a broken object.
    let chart = root().join("charts/pullthrough").display().to_string();
    for (set, complaint) in [
        (
            "prometheusRule.alerts.proxyDown.for=5 minutes",
            "/prometheusRule/alerts/proxyDown/for",
        ),
        (
            "prometheusRule.alerts.cacheFull.enabled=true",
            "additional properties 'cacheFull' not allowed",
        ),
        (
            "grafanaDashboard.label.key=not a key",
            "/grafanaDashboard/label/key",
        ),
        (
            "grafanaDashboard.namespace=Monitoring",
            "/grafanaDashboard/namespace",
        ),
    ] {
        let r = helm.run(&["template", "x", &chart, "--set", set]);
        assert!(
            matches!(&r, Err(Error::Command { output, .. }) if output.contains(complaint)),
            "--set {set} must be refused naming {complaint:?}, got {r:?}"
        );
    }
    let r = helm.run(&[
        "template",
        "x",
        &chart,
        "--set-json",
        "prometheusRule.alerts.hitRatioLow.threshold=1.5",
    ]);
    assert!(
        matches!(&r, Err(Error::Command { output, .. }) if output.contains("/prometheusRule/alerts/hitRatioLow/threshold")),
        "a ratio above 1 must be refused, got {r:?}"
    );
}

fn promtool(args: &[&str], dir: &Path) -> Result<String, Error> {
    run(Command::new(go_tool("promtool")?)
        .current_dir(dir)
        .args(args))
}

/// A promtool unit-test file for `rules` from `tests`: each expected
/// alert gets its rule's `severity` label and its (static, Helm-rendered)
/// `description`, so the fixture spells out only what the alert's values
/// decide.
fn unit_tests(rules: &[&Value], mut tests: Value) -> Value {
    let groups = tests["tests"].as_array_mut().expect("tests");
    for case in groups.iter_mut().flat_map(|g| {
        g["alert_rule_test"]
            .as_array_mut()
            .expect("alert_rule_test")
    }) {
        let name = case["alertname"].as_str().expect("alertname").to_string();
        let rule = rules
            .iter()
            .find(|r| r["alert"] == name.as_str())
            .unwrap_or_else(|| panic!("no rule {name}"));
        let description = rule["annotations"]["description"]
            .as_str()
            .expect("description");
        assert!(!description.contains("{{"), "{name}: static description");
        for alert in case["exp_alerts"].as_array_mut().expect("exp_alerts") {
            alert["exp_labels"]["severity"] = rule["labels"]["severity"].clone();
            alert["exp_annotations"]["description"] = json!(description);
        }
    }
    tests["rule_files"] = json!(["rules.yaml"]);
    tests
}

/// `promtool check rules` on the rendered PrometheusRule's spec, then
/// `promtool test rules` with `tests/fixtures/prometheusrule-tests.yaml`:
/// input series, and the alerts each must (and must not) fire at a given
/// time. A deliberately wrong expectation fails.
#[test]
fn prometheus_rule_passes_promtool_check_and_unit_tests() {
    let helm = Helm::new(None).expect("helm");
    let docs = render(&helm, BOTH).expect("render");
    let rule = find(&docs, "PrometheusRule");
    assert_eq!(rule.len(), 1);
    assert_eq!(rule[0]["apiVersion"], "monitoring.coreos.com/v1");
    let spec = &rule[0]["spec"];
    let rules = alert_rules(spec);
    let names: BTreeSet<&str> = rules.iter().filter_map(|r| r["alert"].as_str()).collect();
    let all = [
        "PullthroughProxyDown",
        "PullthroughHitRatioLow",
        "PullthroughUpstreamBudgetLow",
        "PullthroughNodesNotConfigured",
        "PullthroughCacheNearMaxSize",
        "PullthroughCacheDiskFull",
        "PullthroughSharesFlooded",
        "PullthroughSharedStorageDown",
        "PullthroughCAExpiresSoon",
        "PullthroughOperatorDown",
        "PullthroughOperatorNoLeader",
        "PullthroughReconcileFailures",
    ];
    assert_eq!(names, BTreeSet::from(all));

    let dir = tempfile::tempdir().unwrap();
    // JSON is YAML: promtool reads the spec as a rules file as it stands.
    std::fs::write(dir.path().join("rules.yaml"), spec.to_string()).unwrap();
    let checked = promtool(&["check", "rules", "rules.yaml"], dir.path())
        .unwrap_or_else(|e| panic!("promtool check rules: {e}"));
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", rules.len())),
        "{checked}"
    );

    let fixture =
        std::fs::read_to_string(root().join("tests/fixtures/prometheusrule-tests.yaml")).unwrap();
    let tests = unit_tests(
        &rules,
        serde_norway::from_str(&fixture).expect("fixture YAML"),
    );
    // Every alert is seen firing at least once.
    let fired: BTreeSet<&str> = tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["alert_rule_test"].as_array().unwrap())
        .filter(|c| c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()))
        .filter_map(|c| c["alertname"].as_str())
        .collect();
    assert_eq!(fired, BTreeSet::from(all), "alerts the fixture sees firing");
    std::fs::write(dir.path().join("tests.yaml"), tests.to_string()).unwrap();
    let out = promtool(&["test", "rules", "tests.yaml"], dir.path())
        .unwrap_or_else(|e| panic!("promtool test rules: {e}"));
    assert!(out.contains("SUCCESS"), "{out}");

    // Not vacuous: expecting the budget alert while its gauges are absent
    // fails.
    let wrong = unit_tests(
        &rules,
        json!({"evaluation_interval": "1m", "tests": [{
            "interval": "1m",
            "input_series": [{"series": r#"up{job="pullthrough-proxy",namespace="pullthrough"}"#, "values": "1x30"}],
            "alert_rule_test": [{"eval_time": "30m", "alertname": "PullthroughUpstreamBudgetLow", "exp_alerts": [{
                "exp_labels": {"job": "pullthrough-proxy", "namespace": "pullthrough", "registry": "docker.io", "source": "anonymous"},
                "exp_annotations": {"summary": "docker.io (anonymous): 5% of the upstream pull budget left"},
            }]}],
        }]}),
    );
    std::fs::write(dir.path().join("wrong.yaml"), wrong.to_string()).unwrap();
    let r = promtool(&["test", "rules", "wrong.yaml"], dir.path());
    assert!(
        matches!(&r, Err(Error::Command { output, .. }) if output.contains("PullthroughUpstreamBudgetLow")),
        "a wrong expectation must fail promtool test rules, got {r:?}"
    );
}

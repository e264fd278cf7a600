//! Reconcile scenarios against a tower-test mock API server: every request
//! the reconciler makes is recorded and answered by a small fake.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use pullthrough_api::config::ProxyConfig;
use pullthrough_api::crd::MirrorRegistry;
use pullthrough_operator::controller::{Context, Settings, reconcile};
use pullthrough_operator::metrics::Metrics;
use serde_json::{Value, json};

mod common;

use common::{Req, Resp, json_resp};

/// (method, path, body, "content-type?query") of each request.
type Entry = (String, String, Value, String);
type Log = Arc<Mutex<Vec<Entry>>>;

/// The mock API server: each request's method, path and JSON body go to
/// `respond` and into `log`; it runs until the client is dropped.
fn serve(
    mut handle: tower_test::mock::Handle<Req, Resp>,
    log: Log,
    mut respond: impl FnMut(&str, &str, &Value) -> Resp + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().to_string();
            let path = req.uri().path().to_string();
            let bytes = req.into_body().collect().await.unwrap().to_bytes();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let resp = respond(&method, &path, &body);
            log.lock()
                .unwrap()
                .push((method, path, body, String::new()));
            send.send_response(resp);
        }
    })
}

fn cr(name: &str, secs: i64, spec: Value, finalizer: bool) -> MirrorRegistry {
    let mut c: MirrorRegistry = serde_json::from_value(json!({
        "apiVersion": "pullthrough.dev/v1alpha1",
        "kind": "MirrorRegistry",
        "metadata": {"name": name, "generation": 1, "uid": format!("uid-{name}"),
                     "resourceVersion": "1"},
        "spec": spec,
    }))
    .unwrap();
    c.metadata.creation_timestamp = Some(Time(Timestamp::from_second(secs).unwrap()));
    if finalizer {
        c.metadata.finalizers = Some(vec![pullthrough_operator::FINALIZER.into()]);
    }
    c
}

fn settings() -> Settings {
    Settings {
        namespace: "pullthrough".into(),
        table_configmap: "pullthrough-registries".into(),
        table_mount_path: PathBuf::from("/etc/pullthrough"),
        credentials_secret: "pullthrough-upstream-credentials".into(),
        credentials_mount_path: PathBuf::from("/etc/pullthrough/credentials"),
        proxy_service: "pullthrough-proxy".into(),
        node_ca_file: PathBuf::from("/etc/pullthrough/ca/ca.crt"),
        // Nothing listens on port 1: ProxyReady=False, ProxyUnreachable.
        proxy_status_url: Some("http://127.0.0.1:1/status".into()),
        proxy_admin_token: None,
        agent_lease_prefix: "pullthrough-agent-".into(),
        delete_timeout: Duration::from_secs(30),
        resync_interval: Duration::from_secs(30),
        cluster_domain: "cluster.local".into(),
        api_server_host: None,
        reserved_hosts: Vec::new(),
    }
}

/// Answers like an API server holding `obj` (the reconciled CR).
fn answer(method: &str, path: &str, body: &Value, obj: &Value) -> Resp {
    if path.contains("/services/") && obj["metadata"]["name"] == "api-hiccup.test" {
        return json_resp(
            500,
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "reason": "InternalError", "code": 500,
                    "message": "etcdserver: request timed out"}),
        );
    }
    if path.contains("/services/") {
        return json_resp(
            404,
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "reason": "NotFound", "code": 404, "message": "not found"}),
        );
    }
    if method == "GET" && path == "/api/v1/namespaces/team/secrets/creds" {
        return json_resp(
            200,
            &json!({"kind": "Secret", "apiVersion": "v1",
                    "metadata": {"name": "creds", "namespace": "team"},
                    "type": "kubernetes.io/basic-auth",
                    // "robot" / "hunter2"
                    "data": {"username": "cm9ib3Q=", "password": "aHVudGVyMg=="}}),
        );
    }
    if method == "GET" && path == "/api/v1/namespaces/team/secrets/busy" {
        return json_resp(
            429,
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "reason": "TooManyRequests", "code": 429,
                    "message": "too many requests, please try again later"}),
        );
    }
    // A path segment the API server cannot take as a name (kube-rs puts
    // names into the path unencoded), or a read it refuses as malformed.
    if method == "GET"
        && (path.split('/').any(|seg| seg == ".." || seg == ".")
            || path == "/api/v1/namespaces/team/secrets/bad-request")
    {
        return json_resp(
            400,
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "reason": "BadRequest", "code": 400,
                    "message": "the server rejected our request for an unknown reason"}),
        );
    }
    if method == "GET" && path == "/api/v1/namespaces/team/secrets/unprocessable" {
        return json_resp(
            422,
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "reason": "Invalid", "code": 422,
                    "message": "name: Invalid value: \"unprocessable\""}),
        );
    }
    if method == "GET" && path.contains("/secrets/") {
        return json_resp(
            403,
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "reason": "Forbidden", "code": 403,
                    "message": "secrets is forbidden: cannot get resource"}),
        );
    }
    if path.ends_with("/leases") {
        return json_resp(
            200,
            &json!({"kind": "LeaseList", "apiVersion": "coordination.k8s.io/v1",
                    "metadata": {}, "items": []}),
        );
    }
    if path.ends_with("/status") {
        // Fields the body does not name survive, as when another field
        // manager co-owns them; null removes one (merge patch).
        let mut o = obj.clone();
        let mut status = obj["status"].as_object().cloned().unwrap_or_default();
        for (k, v) in body["status"].as_object().into_iter().flatten() {
            if v.is_null() {
                status.remove(k);
            } else {
                status.insert(k.clone(), v.clone());
            }
        }
        o["status"] = Value::Object(status);
        return json_resp(200, &o);
    }
    if path.contains("/mirrorregistries/") {
        return json_resp(200, obj);
    }
    // ConfigMap apply, Event create: echo.
    let _ = method;
    json_resp(200, body)
}

async fn run(
    obj: MirrorRegistry,
    others: Vec<MirrorRegistry>,
) -> (Log, kube::runtime::controller::Action) {
    let (log, action) = try_run(obj, others).await;
    (log, action.expect("reconcile"))
}

async fn try_run(
    obj: MirrorRegistry,
    others: Vec<MirrorRegistry>,
) -> (
    Log,
    Result<kube::runtime::controller::Action, pullthrough_operator::error::Error>,
) {
    let (svc, mut handle) = tower_test::mock::pair::<Req, Resp>();
    let client = Client::new(svc, "default");
    let (store, mut writer): (Store<MirrorRegistry>, _) = reflector::store();
    for o in others.iter().chain([&obj]) {
        writer.apply_watcher_event(&watcher::Event::Apply(o.clone()));
    }
    let log: Log = Default::default();
    let obj_json = serde_json::to_value(&obj).unwrap();
    let server = {
        let log = log.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let method = req.method().to_string();
                let path = req.uri().path().to_string();
                let content_type = req
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                let meta = format!("{content_type}?{}", req.uri().query().unwrap_or_default());
                let bytes = req.into_body().collect().await.unwrap().to_bytes();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let resp = answer(&method, &path, &body, &obj_json);
                log.lock().unwrap().push((method, path, body, meta));
                send.send_response(resp);
            }
        })
    };
    let ctx = Arc::new(Context::new(
        client,
        settings(),
        ProxyConfig::from_yaml("{}").unwrap(),
        store,
        "test",
        Arc::new(Metrics::default()),
    ));
    let action = reconcile(Arc::new(obj), ctx).await;
    server.abort();
    (log, action)
}

fn find<'a>(log: &'a [Entry], method: &str, suffix: &str) -> Vec<&'a Value> {
    log.iter()
        .filter(|(m, p, _, _)| m == method && p.ends_with(suffix))
        .map(|(_, _, b, _)| b)
        .collect()
}

/// The "content-type?query" of each request to a path ending in `suffix`.
fn metas<'a>(log: &'a [Entry], suffix: &str) -> Vec<&'a str> {
    log.iter()
        .filter(|(_, p, _, _)| p.ends_with(suffix))
        .map(|(_, _, _, m)| m.as_str())
        .collect()
}

fn condition<'a>(status_patch: &'a Value, type_: &str) -> &'a Value {
    status_patch["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap()
}

fn table_yaml(log: &[Entry]) -> String {
    let applies = find(log, "PATCH", "/configmaps/pullthrough-registries");
    assert_eq!(applies.len(), 1, "{log:#?}");
    let cm = applies[0];
    let yaml = cm["data"]["config.yaml"].as_str().unwrap().to_string();
    assert_eq!(
        cm["metadata"]["annotations"]["pullthrough.dev/config-hash"],
        pullthrough_api::contract::config_hash(yaml.as_bytes())
    );
    yaml
}

#[tokio::test]
async fn create_adds_finalizer_then_applies_table_and_status() {
    let (log, _) = run(cr("quay", 1, json!({"host": "quay.io"}), false), vec![]).await;
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 1, "first pass only adds the finalizer: {log:#?}");
    let patch = &log[0];
    assert_eq!(
        patch.1,
        "/apis/pullthrough.dev/v1alpha1/mirrorregistries/quay"
    );
    assert!(
        patch.2.to_string().contains("pullthrough.dev/cleanup"),
        "{:?}",
        patch.2
    );

    let (log, action) = run(cr("quay", 1, json!({"host": "quay.io"}), true), vec![]).await;
    let log = log.lock().unwrap().clone();
    let yaml = table_yaml(&log);
    let table = ProxyConfig::from_yaml(&yaml).unwrap();
    assert_eq!(table.registries[0].host, "quay.io");
    let status = find(&log, "PATCH", "/mirrorregistries/quay/status");
    assert_eq!(status.len(), 1);
    assert_eq!(condition(status[0], "Accepted")["status"], "True");
    assert_eq!(
        condition(status[0], "ProxyReady")["reason"],
        "ProxyUnreachable"
    );
    assert_eq!(
        condition(status[0], "NodesConfigured")["reason"],
        "NoAgents"
    );
    assert_eq!(status[0]["status"]["observedGeneration"], 1);
    // Server-side apply of the status subresource by the operator's field
    // manager; the body names what it applies to.
    let meta = metas(&log, "/mirrorregistries/quay/status");
    let (content_type, query) = meta[0].split_once('?').unwrap();
    assert_eq!(content_type, "application/apply-patch+yaml");
    let mut params: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
    params.sort();
    assert_eq!(params, ["fieldManager=pullthrough-operator", "force=true"]);
    assert_eq!(status[0]["apiVersion"], "pullthrough.dev/v1alpha1");
    assert_eq!(status[0]["kind"], "MirrorRegistry");
    // One Event naming every condition that changed.
    let events = find(&log, "POST", "/namespaces/default/events");
    assert_eq!(events.len(), 1);
    let note = events[0]["note"].as_str().unwrap();
    for c in ["Accepted=True", "ProxyReady=False", "NodesConfigured=False"] {
        assert!(note.contains(c), "{note}");
    }
    // Accepted but still waiting for the proxy and the nodes: looked at
    // again within seconds, not after the 30 s resync.
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(Duration::from_secs(2))
    );
}

#[tokio::test]
async fn invalid_spec_is_not_accepted() {
    let (log, _) = run(
        cr(
            "bad",
            1,
            json!({"host": "bad.io", "aliases": ["bad.io"]}),
            true,
        ),
        vec![],
    )
    .await;
    let log = log.lock().unwrap().clone();
    assert!(
        ProxyConfig::from_yaml(&table_yaml(&log))
            .unwrap()
            .registries
            .is_empty()
    );
    let status = find(&log, "PATCH", "/mirrorregistries/bad/status");
    let c = condition(status[0], "Accepted");
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("False"), Some("InvalidSpec"))
    );
    assert!(c["message"].as_str().unwrap().contains("spec."), "{c}");
}

#[tokio::test]
async fn duplicate_host_loses_to_the_older_resource() {
    let older = cr("first", 1, json!({"host": "quay.io"}), true);
    let (log, _) = run(
        cr(
            "second",
            2,
            json!({"host": "mirror.example", "aliases": ["quay.io"]}),
            true,
        ),
        vec![older],
    )
    .await;
    let log = log.lock().unwrap().clone();
    let table = ProxyConfig::from_yaml(&table_yaml(&log)).unwrap();
    assert_eq!(table.registries.len(), 1);
    assert_eq!(table.registries[0].host, "quay.io");
    let status = find(&log, "PATCH", "/mirrorregistries/second/status");
    let c = condition(status[0], "Accepted");
    assert_eq!(c["reason"], "DuplicateHost");
    assert!(c["message"].as_str().unwrap().contains("first"), "{c}");
}

#[tokio::test]
async fn delete_removes_from_table_and_drops_finalizer() {
    let keep = cr("keep", 1, json!({"host": "ghcr.io"}), true);
    let mut gone = cr("gone", 2, json!({"host": "quay.io"}), true);
    gone.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    let (log, _) = run(gone, vec![keep]).await;
    let log = log.lock().unwrap().clone();
    let table = ProxyConfig::from_yaml(&table_yaml(&log)).unwrap();
    let hosts: Vec<_> = table.registries.iter().map(|r| r.host.as_str()).collect();
    assert_eq!(hosts, ["ghcr.io"]);
    let patches = find(&log, "PATCH", "/mirrorregistries/gone");
    assert_eq!(patches.len(), 1, "{log:#?}");
    assert!(
        patches[0].to_string().contains("\"remove\""),
        "{}",
        patches[0]
    );
    assert!(find(&log, "PATCH", "/mirrorregistries/gone/status").is_empty());
}

#[tokio::test]
async fn credentials_reach_the_proxy_secret_and_never_the_table() {
    let spec = json!({"host": "reg.example", "credentialsSecretRef": {"name": "creds", "namespace": "team"}});
    let (log, _) = run(cr("private", 1, spec, true), vec![]).await;
    let log = log.lock().unwrap().clone();
    let yaml = table_yaml(&log);
    assert!(!yaml.contains("hunter2"), "{yaml}");
    let table = ProxyConfig::from_yaml(&yaml).unwrap();
    let file = table.registries[0].credentials_file.clone().unwrap();
    assert_eq!(
        file,
        PathBuf::from("/etc/pullthrough/credentials/reg.example.json")
    );
    let applies = find(&log, "PATCH", "/secrets/pullthrough-upstream-credentials");
    assert_eq!(applies.len(), 1, "{log:#?}");
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(applies[0]["data"]["reg.example.json"].as_str().unwrap())
        .unwrap();
    assert_eq!(raw, br#"{"username":"robot","password":"hunter2"}"#);
    // The Secret is written before the table that points at it.
    let order: Vec<&str> = log
        .iter()
        .filter(|(m, _, _, _)| m == "PATCH")
        .map(|(_, p, _, _)| p.as_str())
        .collect();
    let secret_at = order
        .iter()
        .position(|p| p.ends_with("/secrets/pullthrough-upstream-credentials"));
    let table_at = order
        .iter()
        .position(|p| p.ends_with("/configmaps/pullthrough-registries"));
    assert!(secret_at < table_at, "{order:?}");
}

#[tokio::test]
async fn unreadable_credentials_reject_only_that_registry() {
    let other = cr("public", 1, json!({"host": "quay.io"}), true);
    let spec =
        json!({"host": "reg.example", "credentialsSecretRef": {"name": "x", "namespace": "other"}});
    let (log, _) = run(cr("private", 2, spec, true), vec![other]).await;
    let log = log.lock().unwrap().clone();
    let table = ProxyConfig::from_yaml(&table_yaml(&log)).unwrap();
    let hosts: Vec<_> = table.registries.iter().map(|r| r.host.as_str()).collect();
    assert_eq!(hosts, ["quay.io"]);
    let status = find(&log, "PATCH", "/mirrorregistries/private/status");
    let c = condition(status[0], "Accepted");
    assert_eq!(c["reason"], "CredentialsUnavailable");
    let msg = c["message"].as_str().unwrap();
    assert!(
        msg.contains("other/x") && msg.contains("operator.referenceNamespaces"),
        "{msg}"
    );
}

/// A reference whose name the API server could not hold (`a b` cannot
/// even make a request; `..` is refused with a 400) is that registry's
/// problem: InvalidSpec on it, the reference never read, and the table
/// (every other registry, every deletion) converges as before.
#[tokio::test]
async fn a_malformed_reference_name_rejects_only_that_registry() {
    let good = || cr("public", 1, json!({"host": "quay.io"}), true);
    for (field, bad_ref) in [
        ("name", json!({"name": "a b", "namespace": "pullthrough"})),
        ("name", json!({"name": "..", "namespace": "pullthrough"})),
        ("namespace", json!({"name": "creds", "namespace": ".."})),
    ] {
        let bad = || {
            cr(
                "malformed",
                2,
                json!({"host": "reg.example", "credentialsSecretRef": bad_ref}),
                true,
            )
        };
        let ca_bad = || {
            cr(
                "malformed-ca",
                3,
                json!({"host": "ca.example", "tls": {"caBundleConfigMapRef": bad_ref}}),
                true,
            )
        };
        // Either one reconciled, with the others in the cache.
        for (obj, others) in [
            (good(), vec![bad(), ca_bad()]),
            (bad(), vec![good(), ca_bad()]),
            (ca_bad(), vec![good(), bad()]),
        ] {
            let name = obj.metadata.name.clone().unwrap();
            let (log, res) = try_run(obj, others).await;
            let log = log.lock().unwrap().clone();
            assert!(res.is_ok(), "{bad_ref}, reconciling {name}: {res:?}");
            let table = ProxyConfig::from_yaml(&table_yaml(&log)).unwrap();
            let hosts: Vec<_> = table.registries.iter().map(|r| r.host.as_str()).collect();
            assert_eq!(hosts, ["quay.io"], "{bad_ref}");
            let reads: Vec<_> = log
                .iter()
                .filter(|(m, p, ..)| {
                    m == "GET" && (p.contains("/secrets/") || p.contains("/configmaps/"))
                })
                .collect();
            assert!(reads.is_empty(), "read: {reads:#?}");
            let status = find(&log, "PATCH", &format!("/mirrorregistries/{name}/status"));
            let c = condition(status[0], "Accepted");
            if name == "public" {
                assert_eq!(c["status"], "True", "{c}");
                continue;
            }
            assert_eq!(
                (c["status"].as_str(), c["reason"].as_str()),
                (Some("False"), Some("InvalidSpec")),
                "{bad_ref}: {c}"
            );
            let key = if name == "malformed" {
                format!("spec.credentialsSecretRef.{field}")
            } else {
                format!("spec.tls.caBundleConfigMapRef.{field}")
            };
            assert!(c["message"].as_str().unwrap().contains(&key), "{key}: {c}");
        }
    }
}

/// A well-formed reference whose read the API server refuses as a bad
/// request (400, 422) fails the same way on every retry: it is that
/// registry's problem (CredentialsUnavailable), not a failed reconcile
/// that would keep every registry's status and every deletion waiting.
#[tokio::test]
async fn a_reference_read_refused_as_malformed_rejects_only_that_registry() {
    for name in ["bad-request", "unprocessable"] {
        let other = cr("public", 1, json!({"host": "quay.io"}), true);
        let spec = json!({"host": "reg.example",
                          "credentialsSecretRef": {"name": name, "namespace": "team"}});
        let (log, res) = try_run(cr("private", 2, spec, true), vec![other]).await;
        let log = log.lock().unwrap().clone();
        assert!(res.is_ok(), "{name}: {res:?}");
        let table = ProxyConfig::from_yaml(&table_yaml(&log)).unwrap();
        let hosts: Vec<_> = table.registries.iter().map(|r| r.host.as_str()).collect();
        assert_eq!(hosts, ["quay.io"]);
        let status = find(&log, "PATCH", "/mirrorregistries/private/status");
        let c = condition(status[0], "Accepted");
        assert_eq!(c["reason"], "CredentialsUnavailable", "{name}: {c}");
        let msg = c["message"].as_str().unwrap();
        assert!(msg.contains(&format!("Secret team/{name}")), "{msg}");
    }
}

#[tokio::test]
async fn status_fields_left_by_a_merge_patch_are_cleared() {
    // Written by an operator that patched status by merge patch: `nodes`
    // survives an apply that leaves it out, so it is cleared explicitly.
    let mut obj = cr(
        "legacy",
        1,
        json!({"host": "bad.io", "aliases": ["bad.io"]}),
        true,
    );
    obj.status = serde_json::from_value(json!({
        "observedGeneration": 1,
        "nodes": {"configured": 1, "total": 1},
        "nodesSummary": "1/1",
    }))
    .unwrap();
    let (log, _) = run(obj, vec![]).await;
    let log = log.lock().unwrap().clone();
    let writes = find(&log, "PATCH", "/mirrorregistries/legacy/status");
    assert_eq!(writes.len(), 2, "{log:#?}");
    assert_eq!(condition(writes[0], "Accepted")["reason"], "InvalidSpec");
    assert!(writes[0]["status"].get("nodes").is_none(), "{}", writes[0]);
    assert_eq!(
        writes[1],
        &json!({"status": {"nodes": null, "nodesSummary": null}})
    );
    let metas = metas(&log, "/mirrorregistries/legacy/status");
    assert!(
        metas[1].starts_with("application/merge-patch+json?"),
        "{metas:?}"
    );
}

/// A registry that waits for a node whose agent stopped reporting (its
/// Lease expired, the Node is still there: NotReady) is looked at again
/// less and less often while nothing changes: 2 s doubling up to the
/// resync interval, not every 2 s for ever (each look LISTs the Leases and
/// the Nodes and asks the proxy).
#[tokio::test]
async fn waiting_for_a_dead_node_backs_off_to_the_resync_interval() {
    let (svc, mut handle) = tower_test::mock::pair::<Req, Resp>();
    let client = Client::new(svc, "default");
    let obj = Arc::new(Mutex::new(cr("quay", 1, json!({"host": "quay.io"}), true)));
    let (store, mut writer): (Store<MirrorRegistry>, _) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Apply(obj.lock().unwrap().clone()));
    let current = obj.clone();
    let server = tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().to_string();
            let path = req.uri().path().to_string();
            let bytes = req.into_body().collect().await.unwrap().to_bytes();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let resp = if path.ends_with("/leases") {
                json_resp(
                    200,
                    &json!({"kind": "LeaseList", "apiVersion": "coordination.k8s.io/v1",
                        "metadata": {}, "items": [{
                            "metadata": {"name": "pullthrough-agent-n1", "namespace": "pullthrough",
                                         "annotations": {"pullthrough.dev/registries": "quay.io"}},
                            "spec": {"holderIdentity": "n1", "leaseDurationSeconds": 90,
                                     "renewTime": "2020-01-01T00:00:00.000000Z"}}]}),
                )
            } else if path == "/api/v1/nodes" {
                json_resp(
                    200,
                    &json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1",
                        "metadata": {}, "items": [{
                            "kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                            "metadata": {"name": "n1"}}]}),
                )
            } else {
                let o = serde_json::to_value(&*current.lock().unwrap()).unwrap();
                if method == "PATCH" && path.ends_with("/quay/status") {
                    // What the reconcile applied is the status it sees next.
                    current.lock().unwrap().status =
                        serde_json::from_value(body["status"].clone()).unwrap();
                }
                answer(&method, &path, &body, &o)
            };
            send.send_response(resp);
        }
    });
    let ctx = Arc::new(Context::new(
        client,
        settings(),
        ProxyConfig::from_yaml("{}").unwrap(),
        store,
        "test",
        Arc::new(Metrics::default()),
    ));
    let mut requeues = Vec::new();
    for _ in 0..7 {
        let o = obj.lock().unwrap().clone();
        let action = reconcile(Arc::new(o), ctx.clone())
            .await
            .expect("reconcile");
        requeues.push(action);
    }
    let status = obj.lock().unwrap().status.clone().unwrap();
    assert_eq!(status.nodes_summary.as_deref(), Some("0/1"), "{status:?}");
    server.abort();
    let secs = |s: u64| kube::runtime::controller::Action::requeue(Duration::from_secs(s));
    assert_eq!(
        requeues,
        [
            secs(2),
            secs(4),
            secs(8),
            secs(16),
            secs(30),
            secs(30),
            secs(30)
        ]
    );
}

/// An API server that answers 429 (it sheds load) when the referenced
/// Secret is read says nothing about the registry: the reconcile fails and
/// is retried, and the table (with the registry as it was) is not touched.
#[tokio::test]
async fn a_throttled_reference_read_fails_the_reconcile_and_keeps_the_table() {
    let spec = json!({"host": "reg.example", "credentialsSecretRef": {"name": "busy", "namespace": "team"}});
    let (log, res) = try_run(cr("private", 1, spec, true), vec![]).await;
    let log = log.lock().unwrap().clone();
    let err = res.expect_err("a 429 must fail the reconcile");
    assert!(err.to_string().contains("Secret team/busy"), "{err}");
    assert!(
        find(&log, "PATCH", "/configmaps/pullthrough-registries").is_empty(),
        "the table was written: {log:#?}"
    );
    assert!(
        find(&log, "PATCH", "/mirrorregistries/private/status").is_empty(),
        "the status was written: {log:#?}"
    );
}

/// A Service read that fails (a 500 in a control-plane upgrade) is not a
/// Service that is missing: taken as missing, the table's proxy address
/// fell back to the base config's (every node rewritten, the CA re-issued
/// for the changed names) until the next read flipped it all back. The
/// reconcile fails, naming the Service, and writes nothing.
#[tokio::test]
async fn a_failed_proxy_service_read_fails_the_reconcile_and_keeps_the_table() {
    let spec = json!({"host": "reg.example"});
    let (log, res) = try_run(cr("api-hiccup.test", 1, spec, true), vec![]).await;
    let log = log.lock().unwrap().clone();
    let err = res.expect_err("a 500 reading the Service must fail the reconcile");
    assert!(
        err.to_string().contains("pullthrough/pullthrough-proxy"),
        "{err}"
    );
    let writes: Vec<&Entry> = log.iter().filter(|(m, ..)| m != "GET").collect();
    assert!(writes.is_empty(), "written on a failed read: {writes:#?}");
}

/// A fake proxy `/status` behind a Service with several replicas: each
/// request is answered by the next of `docs`, in turn.
async fn replicas(docs: Vec<Value>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/status", listener.local_addr().unwrap());
    tokio::spawn(async move {
        for doc in docs.iter().cycle() {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let mut buf = vec![0u8; 4096];
            let _ = conn.read(&mut buf).await;
            let body = doc.to_string();
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
        }
    });
    url
}

/// Tag moves with two proxy replicas behind the Service: each reconcile
/// sees the moves one replica saw, with its own timestamps. Each move is
/// one `TagMoved` Event: none lost because the other replica reported a
/// later one first, none told twice because both saw it.
#[tokio::test]
async fn tag_moves_of_two_replicas_are_each_told_once() {
    let mv = |tag: &str, from: &str, to: &str, at: i64| {
        json!({"registry": "quay.io", "repository": "app", "tag": tag,
               "from": from, "to": to, "at": at})
    };
    let doc = |moves: Vec<Value>| json!({"configHash": "x", "registries": ["quay.io"], "tagMoves": moves});
    let a = doc(vec![
        mv("one", "sha256:1", "sha256:2", 1_000),
        mv("three", "sha256:5", "sha256:6", 3_000),
    ]);
    let b = doc(vec![
        mv("one", "sha256:1", "sha256:2", 1_500),
        mv("two", "sha256:3", "sha256:4", 2_000),
        mv("three", "sha256:5", "sha256:6", 3_500),
    ]);
    let mut settings = settings();
    settings.proxy_status_url = Some(replicas(vec![a, b]).await);

    let (svc, handle) = tower_test::mock::pair::<Req, Resp>();
    let client = Client::new(svc, "default");
    let obj = Arc::new(Mutex::new(cr("quay", 1, json!({"host": "quay.io"}), true)));
    let (store, mut writer): (Store<MirrorRegistry>, _) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Apply(obj.lock().unwrap().clone()));
    let current = obj.clone();
    let log: Log = Default::default();
    let server = serve(handle, log.clone(), move |method, path, body| {
        let o = serde_json::to_value(&*current.lock().unwrap()).unwrap();
        if method == "PATCH" && path.ends_with("/quay/status") {
            current.lock().unwrap().status =
                serde_json::from_value(body["status"].clone()).unwrap();
        }
        answer(method, path, body, &o)
    });
    let ctx = Arc::new(Context::new(
        client,
        settings,
        ProxyConfig::from_yaml("{}").unwrap(),
        store,
        "test",
        Arc::new(Metrics::default()),
    ));
    for _ in 0..4 {
        let o = obj.lock().unwrap().clone();
        reconcile(Arc::new(o), ctx.clone())
            .await
            .expect("reconcile");
        // Past the observation's cache: the next one asks the proxy again.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    server.abort();
    let log = log.lock().unwrap().clone();
    let mut told: Vec<String> = find(&log, "POST", "/events")
        .into_iter()
        .filter(|e| e["reason"] == "TagMoved")
        .map(|e| e["note"].as_str().unwrap().to_string())
        .collect();
    told.sort();
    assert_eq!(
        told,
        [
            "quay.io/app:one moved from sha256:1 to sha256:2",
            "quay.io/app:three moved from sha256:5 to sha256:6",
            "quay.io/app:two moved from sha256:3 to sha256:4",
        ]
    );
}

/// The hosts of each table the operator applied, in order.
fn tables_written(log: &Log) -> Vec<Vec<String>> {
    let log = log.lock().unwrap();
    find(&log, "PATCH", "/configmaps/pullthrough-registries")
        .into_iter()
        .map(|cm| {
            let yaml = cm["data"]["config.yaml"].as_str().unwrap();
            ProxyConfig::from_yaml(yaml)
                .unwrap()
                .registries
                .into_iter()
                .map(|r| r.host)
                .collect()
        })
        .collect()
}

/// Waits (at most 10 s) until the last table written lists `hosts`.
async fn table_lists(log: &Log, hosts: &[&str]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let written = tables_written(log);
        if written.last().is_some_and(|t| t == hosts) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no table with {hosts:?} was written; tables: {written:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A MirrorRegistry that leaves the cache with no cleanup of the
/// operator's (an admin stripped the finalizer of one whose deletion was
/// stuck): no reconcile runs for an object that is gone, so the Delete
/// itself re-converges the table, and the host leaves the table (and the
/// nodes) now, not at the next restart.
#[tokio::test]
async fn a_registry_deleted_without_the_finalizer_leaves_the_table() {
    use futures::StreamExt;
    use pullthrough_operator::controller::{changes, publish_table};

    let (svc, handle) = tower_test::mock::pair::<Req, Resp>();
    let client = Client::new(svc, "default");
    let log: Log = Default::default();
    let server = serve(handle, log.clone(), |method, path, body| {
        answer(method, path, body, &Value::Null)
    });
    let (store, writer): (Store<MirrorRegistry>, _) = reflector::store();
    let ctx = Arc::new(Context::new(
        client,
        settings(),
        ProxyConfig::from_yaml("{}").unwrap(),
        store,
        "test",
        Arc::new(Metrics::default()),
    ));
    let due = Arc::new(tokio::sync::Notify::new());
    let (events, watch) = futures::channel::mpsc::unbounded();
    // What the controller would consume (reconciles are not the point
    // here: none runs for a deleted object).
    let triggers = tokio::spawn(changes(watch, writer, due.clone()).for_each(|_| async {}));
    let publisher = tokio::spawn(publish_table(ctx, due));

    let keep = cr("keep", 1, json!({"host": "ghcr.io"}), true);
    let gone = cr("gone", 2, json!({"host": "quay.io"}), true);
    for ev in [
        watcher::Event::Init,
        watcher::Event::InitApply(keep),
        watcher::Event::InitApply(gone.clone()),
        watcher::Event::InitDone,
    ] {
        events.unbounded_send(Ok(ev)).unwrap();
    }
    table_lists(&log, &["ghcr.io", "quay.io"]).await;
    events
        .unbounded_send(Ok(watcher::Event::Delete(gone)))
        .unwrap();
    table_lists(&log, &["ghcr.io"]).await;

    publisher.abort();
    triggers.abort();
    server.abort();
}

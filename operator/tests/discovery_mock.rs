//! Discovery runs against a tower-test fake API server that keeps the
//! DiscoveredRegistries, MirrorRegistries and Events it is sent: what a pod
//! naming hundreds of registry hosts can make the operator write.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use pullthrough_api::crd::MirrorRegistry;
use pullthrough_operator::discovery::{
    MAX_DISCOVERED, Memory, Mode, mirrored, publish, unmirrored,
};
use pullthrough_operator::reserved::ReservedNames;
use serde_json::{Value, json};

mod common;

use common::{Req, Resp, json_resp as resp};

const DREG: &str = "/apis/pullthrough.dev/v1alpha1/discoveredregistries";
const MREG: &str = "/apis/pullthrough.dev/v1alpha1/mirrorregistries";
/// The proxy Service of [`installation`], and its ClusterIP.
const PROXY_SVC: &str = "/api/v1/namespaces/pullthrough/services/pullthrough-proxy";
const PROXY_IP: &str = "10.96.0.50";

/// What the fake API server holds, and what it was asked to write.
#[derive(Debug, Default)]
struct Cluster {
    dregs: BTreeMap<String, Value>,
    mregs: BTreeMap<String, Value>,
    /// Event reasons, one per Event written (created or patched).
    events: Vec<String>,
    /// DiscoveredRegistry writes (spec and status).
    writes: usize,
    /// Most DiscoveredRegistries held at once.
    most_dregs: usize,
    /// MirrorRegistry creates asked for (made or refused).
    posts: usize,
}

fn status(code: u16, reason: &str) -> Resp {
    resp(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": reason, "code": code, "message": reason}),
    )
}

fn list(kind: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "1"}, "items": items})
}

impl Cluster {
    fn answer(&mut self, method: &str, path: &str, query: &str, body: Value) -> Resp {
        let r = self.answer_inner(method, path, query, body);
        self.most_dregs = self.most_dregs.max(self.dregs.len());
        r
    }

    fn answer_inner(&mut self, method: &str, path: &str, query: &str, body: Value) -> Resp {
        if path.ends_with("/events") || path.contains("/events/") {
            self.events
                .push(body["reason"].as_str().unwrap_or_default().to_string());
            return resp(201, &body);
        }
        if let Some(rest) = path.strip_prefix(DREG) {
            let mut parts = rest.trim_start_matches('/').split('/');
            let name = parts.next().unwrap_or_default().to_string();
            let sub = parts.next();
            return match (method, name.as_str(), sub) {
                ("GET", "", None) => resp(
                    200,
                    &list(
                        "DiscoveredRegistryList",
                        self.dregs.values().cloned().collect(),
                    ),
                ),
                ("PATCH", _, None) => {
                    self.writes += 1;
                    let o = self.dregs.entry(name.clone()).or_insert_with(|| {
                        json!({"apiVersion": "pullthrough.dev/v1alpha1",
                               "kind": "DiscoveredRegistry",
                               "metadata": {"name": name}})
                    });
                    o["spec"] = body["spec"].clone();
                    resp(200, o)
                }
                ("PATCH", _, Some("status")) => {
                    self.writes += 1;
                    match self.dregs.get_mut(&name) {
                        Some(o) => {
                            o["status"] = body["status"].clone();
                            resp(200, o)
                        }
                        None => status(404, "NotFound"),
                    }
                }
                ("DELETE", _, None) => match self.dregs.remove(&name) {
                    Some(o) => resp(200, &o),
                    None => status(404, "NotFound"),
                },
                _ => status(405, "MethodNotAllowed"),
            };
        }
        if path == MREG && method == "GET" {
            let labelled = query.contains("labelSelector");
            let items = self
                .mregs
                .values()
                .filter(|m| {
                    !labelled || m["metadata"]["labels"]["pullthrough.dev/discovered"] == "true"
                })
                .map(|m| {
                    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                                "metadata": m["metadata"]})
                })
                .collect();
            return resp(200, &list("PartialObjectMetadataList", items));
        }
        if path == PROXY_SVC && method == "GET" {
            return resp(
                200,
                &json!({"apiVersion": "v1", "kind": "Service",
                        "metadata": {"name": "pullthrough-proxy", "namespace": "pullthrough"},
                        "spec": {"clusterIP": PROXY_IP, "ports": [{"name": "https", "port": 443}]}}),
            );
        }
        if path == MREG && method == "POST" {
            self.posts += 1;
            let name = body["metadata"]["name"].as_str().unwrap_or_default();
            if self.mregs.contains_key(name) {
                return status(409, "AlreadyExists");
            }
            self.mregs.insert(name.to_string(), body.clone());
            return resp(201, &body);
        }
        status(404, "NotFound")
    }

    fn mirror_registries(&self) -> Vec<MirrorRegistry> {
        self.mregs
            .values()
            .map(|m| serde_json::from_value(m.clone()).unwrap())
            .collect()
    }
}

/// A fake API server and a client talking to it.
fn fake() -> (Client, Arc<Mutex<Cluster>>) {
    let (svc, mut handle) = tower_test::mock::pair::<Req, Resp>();
    let cluster: Arc<Mutex<Cluster>> = Default::default();
    let c = cluster.clone();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().to_string();
            let path = req.uri().path().to_string();
            let query = req.uri().query().unwrap_or_default().to_string();
            let bytes = req.into_body().collect().await.unwrap().to_bytes();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let r = c.lock().unwrap().answer(&method, &path, &query, body);
            send.send_response(r);
        }
    });
    (Client::new(svc, "default"), cluster)
}

/// One running pod in namespace `ns` with a container per image.
fn pod(ns: &str, name: &str, images: &[String]) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "nodeName": "n1",
            "containers": images.iter().enumerate()
                .map(|(i, im)| json!({"name": format!("c{i}"), "image": im}))
                .collect::<Vec<_>>(),
        },
        "status": {"phase": "Running"},
    }))
    .unwrap()
}

/// A pod naming 500 distinct registry hosts.
fn flood() -> Pod {
    let images: Vec<String> = (0..500)
        .map(|i| format!("r{i:03}.attacker.example/x:1"))
        .collect();
    pod("anyone", "flood", &images)
}

/// Discovery against the fake, run as the pins loop runs it.
struct Harness {
    client: Client,
    recorder: Recorder,
    cluster: Arc<Mutex<Cluster>>,
    memory: Memory,
}

impl Harness {
    fn new() -> Self {
        Self::with_memory(Memory::default())
    }

    fn with_memory(memory: Memory) -> Self {
        let (client, cluster) = fake();
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "test".into(),
                instance: None,
            },
        );
        Self {
            client,
            recorder,
            cluster,
            memory,
        }
    }

    /// One run: the MirrorRegistries it finds are those the fake holds
    /// (and `create` added).
    async fn run(&mut self, mode: Mode, pods: &[Pod]) {
        let mregs = self.cluster.lock().unwrap().mirror_registries();
        let found = unmirrored(pods, &mirrored(&mregs));
        publish(&self.client, &self.recorder, mode, &found, &mut self.memory).await;
    }
}

/// Runs discovery `runs` times on `pods`.
async fn runs(mode: Mode, pods: &[Pod], runs: usize) -> Arc<Mutex<Cluster>> {
    let mut h = Harness::new();
    for _ in 0..runs {
        h.run(mode, pods).await;
    }
    h.cluster
}

/// Report: at most [`MAX_DISCOVERED`] objects and Events, written once;
/// later runs change nothing.
#[tokio::test]
async fn a_pod_naming_500_hosts_makes_at_most_the_cap_of_objects() {
    let cluster = runs(Mode::Report, &[flood()], 5).await;
    let c = cluster.lock().unwrap();
    assert_eq!(c.dregs.len(), MAX_DISCOVERED);
    assert_eq!(c.most_dregs, MAX_DISCOVERED);
    assert_eq!(c.events.len(), MAX_DISCOVERED, "{:?}", c.events);
    assert_eq!(c.writes, 2 * MAX_DISCOVERED, "spec and status, once each");
    assert!(c.mregs.is_empty());
}

/// Create: each MirrorRegistry made frees a place in the report for the
/// next host; the MirrorRegistries discovery made count, so no more than
/// [`MAX_DISCOVERED`] are made however many runs follow.
#[tokio::test]
async fn a_pod_naming_500_hosts_makes_at_most_the_cap_of_mirror_registries() {
    let cluster = runs(Mode::Create, &[flood()], 20).await;
    let c = cluster.lock().unwrap();
    assert_eq!(c.mregs.len(), MAX_DISCOVERED);
    assert!(c.most_dregs <= MAX_DISCOVERED, "{}", c.most_dregs);
    let reasons = c
        .events
        .iter()
        .filter(|r| *r == "MirrorRegistryCreated")
        .count();
    assert_eq!(reasons, MAX_DISCOVERED);
    assert!(c.events.len() <= 3 * MAX_DISCOVERED, "{}", c.events.len());
}

/// A CronJob's pod between its runs: the registry stays reported (no
/// pods) instead of being deleted and discovered anew, with another Event,
/// on the next run.
#[tokio::test]
async fn a_registry_used_now_and_then_is_discovered_once() {
    let job = pod("batch", "job", &["ghcr.io/o/job:1".to_string()]);
    let mut h = Harness::new();
    for pods in [
        vec![job.clone()],
        vec![],
        vec![job.clone()],
        vec![],
        vec![job],
    ] {
        h.run(Mode::Report, &pods).await;
    }
    let c = h.cluster.lock().unwrap();
    assert_eq!(c.events, ["Discovered"]);
    assert_eq!(c.dregs["ghcr.io"]["status"]["pods"], 1);
}

/// Kept though unused: no MirrorRegistry is created for it.
#[tokio::test]
async fn an_unused_registry_gets_no_mirror_registry() {
    let job = pod("batch", "job", &["ghcr.io/o/job:1".to_string()]);
    let mut h = Harness::new();
    h.run(Mode::Report, &[job]).await;
    h.run(Mode::Create, &[]).await;
    let c = h.cluster.lock().unwrap();
    assert!(c.mregs.is_empty(), "{:?}", c.mregs);
    assert_eq!(c.dregs["ghcr.io"]["status"]["pods"], 0);
}

/// An object an older operator wrote for another spelling of the host
/// (`GHCR.io`), under the name this host now gets: it is deleted as named
/// the old way, and written again for the host in the same run, not left
/// out until the next one because its old status matched.
#[tokio::test]
async fn an_object_named_the_old_way_is_written_again_at_once() {
    let job = pod("batch", "job", &["ghcr.io/o/job:1".to_string()]);
    let mut h = Harness::new();
    h.run(Mode::Report, std::slice::from_ref(&job)).await;
    h.cluster.lock().unwrap().dregs.get_mut("ghcr.io").unwrap()["spec"]["host"] = json!("GHCR.io");
    h.run(Mode::Report, &[job]).await;
    let c = h.cluster.lock().unwrap();
    let d = c.dregs.get("ghcr.io").expect("ghcr.io written again");
    assert_eq!(d["spec"]["host"], "ghcr.io");
    assert_eq!(d["status"]["pods"], 1);
}

/// The names of the chart's default release: its proxy Service, the
/// cluster domain, and what the base config names the proxy.
fn installation() -> ReservedNames {
    ReservedNames::new(
        "pullthrough",
        "pullthrough-proxy",
        "cluster.local",
        Some("10.96.0.1"),
        &[],
    )
    .with_proxy(&["pullthrough.example".into()], None)
}

/// A pod pulling from the proxy's own ClusterIP (or another of its names)
/// makes no MirrorRegistry: one would take the proxy's own requests (its
/// path-prefix routing for every registry), and the table refuses it.
#[tokio::test]
async fn the_proxys_own_address_gets_no_mirror_registry() {
    let p = pod(
        "apps",
        "a",
        &[
            format!("{PROXY_IP}/x:1"),
            format!("{PROXY_IP}:443/x:1"),
            "pullthrough.example/x:1".into(),
            "10.96.0.1/x:1".into(),
        ],
    );
    let mut h = Harness::with_memory(Memory::new(installation()));
    for _ in 0..3 {
        h.run(Mode::Create, std::slice::from_ref(&p)).await;
    }
    let c = h.cluster.lock().unwrap();
    assert_eq!(c.posts, 0, "{:?}", c.mregs.keys().collect::<Vec<_>>());
    // Still reported: pods do pull from there, unmirrored.
    assert!(
        c.dregs.values().any(|d| d["spec"]["host"] == PROXY_IP),
        "{:?}",
        c.dregs.keys()
    );
}

/// A cluster Service's name (under `.svc.cluster.local`) is reserved: the
/// MirrorRegistry would be refused for good and take a place under the
/// cap. Another registry in the same pod still gets its MirrorRegistry.
#[tokio::test]
async fn a_cluster_service_registry_gets_no_mirror_registry() {
    let p = pod(
        "apps",
        "a",
        &[
            "registry.kube-system.svc.cluster.local:5000/x:1".into(),
            "ghcr.io/o/a:1".into(),
        ],
    );
    let mut h = Harness::with_memory(Memory::new(installation()));
    for _ in 0..3 {
        h.run(Mode::Create, std::slice::from_ref(&p)).await;
    }
    let c = h.cluster.lock().unwrap();
    assert_eq!(c.mregs.keys().collect::<Vec<_>>(), ["ghcr.io"]);
    assert_eq!(c.posts, 1);
}

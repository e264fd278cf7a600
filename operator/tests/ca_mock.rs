//! `ca::ensure` against a tower-test fake API server that keeps one CA
//! Secret and answers a replace as the real one does: a Secret's type
//! never changes (422).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http_body_util::BodyExt;
use kube::Client;
use pullthrough_api::contract::CA_BUNDLE_KEY;
use pullthrough_api::pki::PermittedNames;
use pullthrough_operator::ca::{self, CaPolicy};
use serde_json::{Value, json};

mod common;

use common::{Req, Resp, json_resp as resp};

const SECRET: &str = "/api/v1/namespaces/pullthrough/secrets/pullthrough-ca";
const CONFIGMAP: &str = "/api/v1/namespaces/pullthrough/configmaps/pullthrough-ca";

/// What the fake holds and was sent.
#[derive(Debug, Default)]
struct Cluster {
    secret: Value,
    /// Replaces of the Secret it took.
    puts: Vec<Value>,
    /// Whether every replace fails (500), as an API server in trouble.
    failing: bool,
    /// The trust bundles applied, in order.
    bundles: Vec<String>,
}

fn status(code: u16, reason: &str, message: &str) -> Resp {
    resp(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": reason, "code": code, "message": message}),
    )
}

impl Cluster {
    fn answer(&mut self, method: &str, path: &str, body: Value) -> Resp {
        match (method, path) {
            ("GET", SECRET) => resp(200, &self.secret),
            ("PUT", SECRET) if self.failing => status(500, "InternalError", "etcd unavailable"),
            ("PUT", SECRET) => {
                if body["type"] != self.secret["type"] {
                    return status(
                        422,
                        "Invalid",
                        "Secret \"pullthrough-ca\" is invalid: type: Invalid value: field is immutable",
                    );
                }
                self.puts.push(body.clone());
                self.secret = body;
                resp(200, &self.secret)
            }
            ("PATCH", CONFIGMAP) => {
                self.bundles.push(
                    body["data"][CA_BUNDLE_KEY]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                );
                resp(200, &body)
            }
            _ => status(404, "NotFound", path),
        }
    }
}

fn fake(cluster: Cluster) -> (Client, Arc<Mutex<Cluster>>) {
    let (svc, mut handle) = tower_test::mock::pair::<Req, Resp>();
    let cluster = Arc::new(Mutex::new(cluster));
    let c = cluster.clone();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().to_string();
            let path = req.uri().path().to_string();
            let bytes = req.into_body().collect().await.unwrap().to_bytes();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let r = c.lock().unwrap().answer(&method, &path, body);
            send.send_response(r);
        }
    });
    (Client::new(svc, "default"), cluster)
}

fn policy() -> CaPolicy {
    CaPolicy {
        validity: Duration::from_secs(3650 * 86_400),
        rotate_before: Duration::from_secs(90 * 86_400),
        overlap: Duration::from_secs(7 * 86_400),
    }
}

fn b64(s: &str) -> String {
    STANDARD.encode(s)
}

fn unb64(v: &Value) -> String {
    String::from_utf8(STANDARD.decode(v.as_str().unwrap()).unwrap()).unwrap()
}

fn names(hosts: &[&str]) -> PermittedNames {
    PermittedNames::new(hosts.iter().copied(), [])
}

/// An `Opaque` CA Secret (made by an admin, or by an older release) with
/// a key of another tool's: a rotation step (here, for new names) keeps
/// both, where a replace with type `kubernetes.io/tls` would be refused
/// (422) on every step, and the new CA would never be made.
#[tokio::test]
async fn a_rotation_step_keeps_the_secrets_type_and_foreign_keys() {
    let (cert, key) = ca::generate(policy().validity, Some(&names(&["quay.io"]))).unwrap();
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "pullthrough-ca", "namespace": "pullthrough", "resourceVersion": "7"},
        "data": {"tls.crt": b64(&cert), "tls.key": b64(&key), "backup-id": b64("nightly-42")},
    });
    let (client, cluster) = fake(Cluster {
        secret,
        ..Cluster::default()
    });
    let state = ca::ensure(
        &client,
        "pullthrough",
        "pullthrough-ca",
        &policy(),
        Some(&names(&["quay.io", "ghcr.io"])),
    )
    .await
    .expect("the rotation step");
    assert!(state.next.is_some(), "a next CA for the new names");
    let c = cluster.lock().unwrap();
    assert_eq!(c.puts.len(), 1);
    let put = &c.puts[0];
    assert_eq!(put["type"], "Opaque");
    assert_eq!(unb64(&put["data"]["backup-id"]), "nightly-42");
    assert_eq!(unb64(&put["data"]["tls.crt"]), cert);
    assert!(put["data"]["next.crt"].is_string());
    assert_eq!(put["metadata"]["resourceVersion"], "7");
    assert_eq!(c.bundles, [state.bundle()]);
}

/// A replace that fails still leaves the trust bundle saying what the
/// Secret holds (here a next CA the proxy may already sign with, whose
/// bundle write had failed); the CA the failed step made is in no Secret
/// and is not published.
#[tokio::test]
async fn a_failed_rotation_step_still_publishes_the_secrets_bundle() {
    let (cert, key) = ca::generate(policy().validity, Some(&names(&["quay.io"]))).unwrap();
    let both = names(&["quay.io", "ghcr.io"]);
    let (next, next_key) = ca::generate(policy().validity, Some(&both)).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {
            "name": "pullthrough-ca", "namespace": "pullthrough", "resourceVersion": "7",
            "annotations": {ca::NEXT_SINCE_ANNOTATION: now.to_string()},
        },
        "data": {
            "tls.crt": b64(&cert), "tls.key": b64(&key),
            "next.crt": b64(&next), "next.key": b64(&next_key),
        },
    });
    let (client, cluster) = fake(Cluster {
        secret,
        failing: true,
        ..Cluster::default()
    });
    // Names changed again: the step replaces the next CA, and fails.
    let three = names(&["quay.io", "ghcr.io", "gcr.io"]);
    let err = ca::ensure(
        &client,
        "pullthrough",
        "pullthrough-ca",
        &policy(),
        Some(&three),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("etcd unavailable"), "{err}");
    let c = cluster.lock().unwrap();
    assert!(c.puts.is_empty());
    assert_eq!(c.bundles.len(), 1, "the bundle of what the Secret holds");
    let bundle = &c.bundles[0];
    assert!(bundle.contains(cert.trim()), "{bundle}");
    assert!(bundle.contains(next.trim()), "{bundle}");
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2, "{bundle}");
}

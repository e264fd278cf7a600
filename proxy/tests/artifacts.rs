//! Issue #14, point 4: OCI artifacts and referrers through the proxy, with
//! a real client. `oras` pushes a Helm chart (OCI artifact: Helm's config
//! and layer media types) and attaches a signature to it on a real
//! registry (distribution 2.8, which has no referrers API, so the
//! signature goes under the `sha256-<hex>` tag schema); `oras pull` and
//! `oras discover` through the proxy get both, and get them again with
//! the upstream stopped. The referrers API itself (OCI 1.1) is shown
//! against a scripted upstream: answers cached per subject and filter,
//! served through an outage.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use pullthrough_testbed::fixtures::sha256_digest;
use pullthrough_testbed::http::Get;
use pullthrough_testbed::process::run;
use pullthrough_testbed::proxy::{Addrs, Proxy};
use pullthrough_testbed::registry::Registry;
use pullthrough_testbed::stub::Stub;
use pullthrough_testbed::tools::go_tool;
use serde_json::Value;

const HELM_CONFIG: &str = "application/vnd.cncf.helm.config.v1+json";
const HELM_CHART: &str = "application/vnd.cncf.helm.chart.content.v1.tar+gzip";
const SIG_TYPE: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
const INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// `oras` with its own (empty) credentials store, in `dir`.
fn oras(dir: &Path, args: &[&str]) -> String {
    let mut cmd = Command::new(go_tool("oras").unwrap());
    cmd.current_dir(dir)
        .env("DOCKER_CONFIG", dir.join(".docker"))
        .env("HOME", dir)
        .args(args);
    run(&mut cmd).unwrap_or_else(|e| panic!("oras {args:?}: {e}"))
}

fn host_port(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

#[test]
fn oras_pushes_a_chart_and_a_signature_and_pulls_both_through_the_proxy_in_an_outage() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let chart: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(dir.join("chart.tgz"), &chart).unwrap();
    std::fs::write(
        dir.join("config.json"),
        br#"{"name":"demo","version":"1.0.0"}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("sig.json"),
        br#"{"critical":{"type":"cosign container image signature"}}"#,
    )
    .unwrap();

    let mut up = Registry::plain().unwrap();
    let upstream = host_port(&up.url());
    oras(
        dir,
        &[
            "push",
            "--plain-http",
            &format!("{upstream}/charts/demo:1.0.0"),
            "--config",
            &format!("config.json:{HELM_CONFIG}"),
            &format!("chart.tgz:{HELM_CHART}"),
        ],
    );
    oras(
        dir,
        &[
            "attach",
            "--plain-http",
            "--artifact-type",
            SIG_TYPE,
            &format!("{upstream}/charts/demo:1.0.0"),
            "sig.json:application/vnd.dev.cosign.simplesigning.v1+json",
        ],
    );

    let proxy = Proxy::start(
        common::proxy_bin(),
        Addrs::localhost().unwrap(),
        &common::one_registry("quay.io", &up.url(), ""),
    )
    .unwrap();
    let through = format!("{}/quay.io/charts/demo:1.0.0", host_port(&proxy.http_url()));
    let pull_and_discover = |round: &str| {
        let out = dir.join(format!("out-{round}"));
        oras(
            dir,
            &[
                "pull",
                "--plain-http",
                "-o",
                out.to_str().unwrap(),
                &through,
            ],
        );
        assert_eq!(
            std::fs::read(out.join("chart.tgz")).unwrap(),
            chart,
            "{round}: the chart's bytes"
        );
        let found: Value = serde_json::from_str(&oras(
            dir,
            &["discover", "--plain-http", "--format", "json", &through],
        ))
        .unwrap();
        let referrers = found["referrers"].as_array().cloned().unwrap_or_default();
        assert_eq!(referrers.len(), 1, "{round}: {found}");
        assert_eq!(referrers[0]["artifactType"], SIG_TYPE, "{round}: {found}");
        // The signature itself, by digest.
        let sig = referrers[0]["digest"].as_str().unwrap();
        let sig_ref = through.replace(":1.0.0", &format!("@{sig}"));
        let sig_out = dir.join(format!("sig-{round}"));
        oras(
            dir,
            &[
                "pull",
                "--plain-http",
                "-o",
                sig_out.to_str().unwrap(),
                &sig_ref,
            ],
        );
        assert_eq!(
            std::fs::read(sig_out.join("sig.json")).unwrap(),
            std::fs::read(dir.join("sig.json")).unwrap()
        );
    };
    pull_and_discover("upstream up");
    // The referrers request met distribution's 404 and the tag schema
    // answered; both are now cached.
    assert!(
        !proxy.access_matching(&[("kind", "referrers")]).is_empty(),
        "oras asked the referrers API first"
    );

    up.stop().unwrap();
    pull_and_discover("upstream stopped");
    let log = proxy.access_lines();
    assert!(
        log.iter()
            .all(|l| l["status"].as_u64().unwrap_or(200) < 500),
        "nothing failed with the upstream stopped: {log:?}"
    );
}

/// An OCI 1.1 upstream: `/v2/app/referrers/<subject>` answers an index
/// (filtered when asked), and counts the requests.
#[test]
fn referrers_answers_are_cached_per_filter_and_served_through_an_outage() {
    let subject = sha256_digest(b"the subject manifest");
    let asked = Arc::new(AtomicUsize::new(0));
    let index = |filtered: bool| -> Bytes {
        let mut manifests = vec![serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha256_digest(b"signature"), "size": 100, "artifactType": SIG_TYPE})];
        if !filtered {
            manifests.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": sha256_digest(b"sbom"), "size": 200,
                "artifactType": "application/spdx+json"}));
        }
        Bytes::from(
            serde_json::json!({"schemaVersion": 2, "mediaType": INDEX, "manifests": manifests})
                .to_string(),
        )
    };
    let (a, s) = (asked.clone(), subject.clone());
    let mut stub = Stub::canned()
        .route(move |seen| {
            let b = Response::builder();
            if seen.method == Method::GET
                && seen.path.starts_with(&format!("/v2/app/referrers/{s}"))
            {
                a.fetch_add(1, Ordering::SeqCst);
                let filtered = seen.path.contains("artifactType=");
                let mut b = b.status(StatusCode::OK).header("content-type", INDEX);
                if filtered {
                    b = b.header("oci-filters-applied", "artifactType");
                }
                return b.body(index(filtered)).unwrap();
            }
            // A cached answer is served only to a client the registry lets
            // read the subject in this repository: the proxy asks with a
            // HEAD of it.
            if seen.method == Method::HEAD && seen.path == format!("/v2/app/manifests/{s}") {
                return b
                    .status(StatusCode::OK)
                    .header("content-type", "application/vnd.oci.image.manifest.v1+json")
                    .header("docker-content-digest", s.as_str())
                    .body(Bytes::new())
                    .unwrap();
            }
            b.status(StatusCode::NOT_FOUND).body(Bytes::new()).unwrap()
        })
        .start()
        .unwrap();
    let proxy = Proxy::start(
        common::proxy_bin(),
        Addrs::localhost().unwrap(),
        &common::one_registry("quay.io", &stub.url(), "    tagTTL: 1s\n"),
    )
    .unwrap();
    let url = format!("{}/v2/quay.io/app/referrers/{subject}", proxy.http_url());
    let get = |u: &str| Get::new(u).send().unwrap();

    let first = get(&url);
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.body, index(false));
    assert_eq!(
        first
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some(INDEX)
    );
    assert_eq!(asked.load(Ordering::SeqCst), 1);
    // Within tagTTL: from the cache.
    assert_eq!(get(&url).body, index(false));
    assert_eq!(asked.load(Ordering::SeqCst), 1);
    // Another filter is another answer, with its header.
    let filtered_url = format!("{url}?artifactType={SIG_TYPE}");
    let filtered = get(&filtered_url);
    assert_eq!(filtered.body, index(true));
    assert_eq!(
        filtered
            .headers
            .get("oci-filters-applied")
            .and_then(|v| v.to_str().ok()),
        Some("artifactType")
    );
    assert_eq!(asked.load(Ordering::SeqCst), 2);
    proxy
        .wait_access(&[("kind", "referrers"), ("cache", "HIT")])
        .unwrap();

    // Past tagTTL with the upstream gone: the last answer, STALE.
    stub.stop();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let r = get(&url);
    assert_eq!(r.status, StatusCode::OK, "{}", proxy.log());
    assert_eq!(r.body, index(false));
    proxy
        .wait_access(&[("kind", "referrers"), ("cache", "STALE")])
        .unwrap();
}

/// A registry hiding a repository from a client answers its referrers
/// request 404, as a registry without the API does. That 404 is no "no
/// referrers API here" for everyone: a client the registry lets read the
/// subject, asking next, gets the upstream's index.
#[test]
fn a_404_for_a_client_that_cannot_read_the_subject_is_not_every_clients_answer() {
    const USER: &str = "Basic dTpw";
    let subject = sha256_digest(b"a private subject");
    let index = Bytes::from(
        serde_json::json!({"schemaVersion": 2, "mediaType": INDEX, "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json",
             "digest": sha256_digest(b"signature"), "size": 100, "artifactType": SIG_TYPE}]})
        .to_string(),
    );
    let (s, served) = (subject.clone(), index.clone());
    let upstream = Stub::canned()
        .route(move |seen| {
            let reads = seen.auth() == Some(USER);
            let b = Response::builder();
            let hidden = || {
                Response::builder()
                    .status(StatusCode::NOT_FOUND)
                    .header("content-type", "application/json")
                    .body(Bytes::from_static(
                        br#"{"errors":[{"code":"NAME_UNKNOWN","message":"repository name not known to registry"}]}"#,
                    ))
                    .unwrap()
            };
            if seen.path == "/v2/" {
                b.status(StatusCode::OK).body(Bytes::new()).unwrap()
            } else if seen.path == format!("/v2/app/manifests/{s}") && seen.method == Method::HEAD {
                if reads {
                    b.status(StatusCode::OK)
                        .header("docker-content-digest", s.as_str())
                        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
                        .body(Bytes::new())
                        .unwrap()
                } else {
                    hidden()
                }
            } else if seen.path.starts_with(&format!("/v2/app/referrers/{s}")) {
                if reads {
                    b.status(StatusCode::OK)
                        .header("content-type", INDEX)
                        .body(served.clone())
                        .unwrap()
                } else {
                    hidden()
                }
            } else {
                hidden()
            }
        })
        .start()
        .unwrap();
    let proxy = Proxy::start(
        common::proxy_bin(),
        Addrs::localhost().unwrap(),
        &common::one_registry("priv.test", &upstream.url(), ""),
    )
    .unwrap();
    let url = format!("{}/v2/priv.test/app/referrers/{subject}", proxy.http_url());
    let anonymous = Get::new(&url).send().unwrap();
    assert_eq!(anonymous.status, StatusCode::NOT_FOUND);
    let user = Get::new(&url).header("Authorization", USER).send().unwrap();
    assert_eq!(user.status, StatusCode::OK, "{:?}", user.body);
    assert_eq!(sha256_digest(&user.body), sha256_digest(&index));
}

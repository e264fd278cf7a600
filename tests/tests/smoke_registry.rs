//! Smoke tests: the upstream registry in each flavour really serves what the
//! fixtures push, and skopeo pulls it back.

// Test code: a broken fixture should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use base64::Engine;
use http::StatusCode;
use pullthrough_testbed::fixtures::{LayoutBuilder, OCI_INDEX, OCI_MANIFEST, verify_digest};
use pullthrough_testbed::http::Get;
use pullthrough_testbed::process::run;
use pullthrough_testbed::registry::{Flavour, Registry};

const ACCEPT: &str =
    "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json";

fn get<'a>(reg: &'a Registry, path: &str, url: &'a mut String) -> Get<'a> {
    *url = format!("{}{path}", reg.url());
    let mut g = Get::new(url).header("Accept", ACCEPT);
    if let Some(ca) = reg.ca_pem() {
        g = g.ca(ca);
    }
    if let Some(creds) = reg.credentials() {
        g = g.header(
            "Authorization",
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(creds)
            ),
        );
    }
    g
}

fn push_and_pull_back(reg: &Registry) {
    pullthrough_testbed::net::assert_loopback(reg.addr()).unwrap();
    let work = tempfile::tempdir().unwrap();
    let mut layout = LayoutBuilder::new(&work.path().join("layout")).unwrap();
    let busybox = layout.busybox("busybox").unwrap();
    let random = layout.random("random", &[1 << 20, 3 << 20], 7).unwrap();
    let multi = layout.multi_arch("multi").unwrap();

    busybox.push(reg, "fixture/busybox", "1").unwrap();
    random.push(reg, "fixture/random", "1").unwrap();
    multi.push(reg, "fixture/multi", "1").unwrap();

    let mut url = String::new();
    for (repo, image, media_type) in [
        ("fixture/busybox", &busybox, OCI_MANIFEST),
        ("fixture/random", &random, OCI_MANIFEST),
        ("fixture/multi", &multi, OCI_INDEX),
    ] {
        let resp = get(reg, &format!("/v2/{repo}/manifests/1"), &mut url)
            .send()
            .unwrap();
        assert_eq!(resp.status, StatusCode::OK, "{repo}: {:?}", resp.body);
        verify_digest(&resp.body, &image.digest).unwrap();
        assert_eq!(resp.headers["content-type"], media_type);
        assert_eq!(resp.headers["docker-content-digest"], image.digest.as_str());
    }
    for digest in random.layer_digests() {
        let resp = get(reg, &format!("/v2/fixture/random/blobs/{digest}"), &mut url)
            .send()
            .unwrap();
        assert_eq!(resp.status, StatusCode::OK);
        verify_digest(&resp.body, &digest).unwrap();
    }

    // skopeo reads it back bit for bit (both platforms of the index).
    let out = work.path().join("out");
    let mut cmd = Command::new("skopeo");
    cmd.args([
        "--insecure-policy",
        "copy",
        "--all",
        "--preserve-digests",
        "-q",
    ])
    .args(reg.skopeo_flags("src"))
    .arg(format!("docker://{}/fixture/multi:1", reg.host()))
    .arg(format!("oci:{}:multi", out.display()));
    run(&mut cmd).unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], multi.digest.as_str());
    for m in &multi.manifests {
        for l in &m.layers {
            let hex = l.digest.trim_start_matches("sha256:");
            let bytes = std::fs::read(out.join("blobs/sha256").join(hex)).unwrap();
            verify_digest(&bytes, &l.digest).unwrap();
        }
    }
}

#[test]
fn plain_registry_serves_pushed_images() {
    let reg = Registry::plain().unwrap();
    assert_eq!(reg.flavour(), &Flavour::Plain);
    push_and_pull_back(&reg);
    // The access log records what reached the registry (tests count upstream
    // fetches with it).
    assert!(reg.count_requests("GET", "/v2/fixture/random/manifests/1") >= 1);
}

#[test]
fn tls_registry_serves_pushed_images() {
    let reg = Registry::tls().unwrap();
    assert!(reg.url().starts_with("https://"));
    push_and_pull_back(&reg);
}

#[test]
fn htpasswd_registry_requires_credentials() {
    let reg = Registry::htpasswd("alice", "s3cret").unwrap();
    let url = format!("{}/v2/", reg.url());
    let anon = Get::new(&url).ca(reg.ca_pem().unwrap()).send().unwrap();
    assert_eq!(anon.status, StatusCode::UNAUTHORIZED);
    assert!(
        anon.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Basic")
    );
    let wrong = Get::new(&url)
        .ca(reg.ca_pem().unwrap())
        .header(
            "Authorization",
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("alice:wrong")
            ),
        )
        .send()
        .unwrap();
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    push_and_pull_back(&reg);
}

#[test]
fn stopped_registry_refuses_and_restarts_with_its_storage() {
    let mut reg = Registry::plain().unwrap();
    let work = tempfile::tempdir().unwrap();
    let img = LayoutBuilder::new(work.path())
        .unwrap()
        .random("r", &[4096], 1)
        .unwrap();
    img.push(&reg, "fixture/r", "1").unwrap();
    let url = format!("{}/v2/fixture/r/manifests/1", reg.url());
    reg.stop().unwrap();
    assert!(
        Get::new(&url).send().is_err(),
        "a stopped registry must not answer"
    );
    reg.restart().unwrap();
    let resp = Get::new(&url).header("Accept", ACCEPT).send().unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    verify_digest(&resp.body, &img.digest).unwrap();
}

#[test]
fn pull_through_registry_fetches_from_its_remote() {
    let origin = Registry::plain().unwrap();
    let work = tempfile::tempdir().unwrap();
    let img = LayoutBuilder::new(work.path())
        .unwrap()
        .random("r", &[8192], 2)
        .unwrap();
    img.push(&origin, "library/r", "1").unwrap();
    let mut opts = pullthrough_testbed::registry::RegistryOpts::new(Flavour::Plain);
    opts.proxy_remote = Some(origin.url());
    let cache = Registry::start(opts).unwrap();
    let url = format!(
        "{}/v2/library/r/blobs/{}",
        cache.url(),
        img.layer_digests()[0]
    );
    let resp = Get::new(&url).send().unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    verify_digest(&resp.body, &img.layer_digests()[0]).unwrap();
    // distribution 2.8 streams the blob to the client and, in a separate
    // goroutine, fetches it again to store it: wait for that second GET
    // (the origin logs a request once it has sent the whole body).
    pullthrough_testbed::net::wait_for(
        "the cache's background store fetch",
        std::time::Duration::from_secs(20),
        || Ok(origin.count_requests("GET", &img.layer_digests()[0]) >= 2),
    )
    .unwrap();
    assert_eq!(origin.count_requests("GET", &img.layer_digests()[0]), 2);

    // The point of the flavour: once stored, the cache serves without its
    // remote. Writing the file may still be finishing, so wait on it.
    let mut origin = origin;
    origin.stop().unwrap();
    pullthrough_testbed::net::wait_for(
        "cache to serve with origin stopped",
        std::time::Duration::from_secs(20),
        || {
            Ok(Get::new(&url).send().is_ok_and(|r| {
                r.status == StatusCode::OK
                    && verify_digest(&r.body, &img.layer_digests()[0]).is_ok()
            }))
        },
    )
    .unwrap_or_else(|e| panic!("{e}\ncache log:\n{}", cache.log()));
}

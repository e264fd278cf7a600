//! Issue #14, point 2 (and point 1's "revalidate tags with HEAD"): a
//! registry's `tagPolicy` decides per tag when the upstream is asked again;
//! an expired answer is revalidated with a HEAD (no GET while the tag has
//! not moved); a tag that moved is counted, kept in the tag's history and
//! reported in `/status` for the operator. Against a real registry
//! (distribution) whose request log is counted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use http::StatusCode;
use pullthrough_testbed::fixtures::{Image, LayoutBuilder, sha256_digest};
use pullthrough_testbed::http::Get;
use pullthrough_testbed::proxy::{Addrs, Proxy};
use pullthrough_testbed::registry::Registry;
use serde_json::Value;

const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";
const TOKEN: &str = "t0ken";

fn manifest(proxy: &Proxy, tag: &str) -> String {
    let url = format!("{}/v2/quay.io/app/manifests/{tag}", proxy.http_url());
    let r = Get::new(&url).header("Accept", ACCEPT).send().unwrap();
    assert_eq!(r.status, StatusCode::OK, "{tag}: {}", proxy.log());
    sha256_digest(&r.body)
}

/// Upstream requests for the tag's manifest so far: (GET, HEAD).
fn asked(reg: &Registry, tag: &str) -> (usize, usize) {
    reg.sync_log().unwrap();
    let path = format!("/v2/app/manifests/{tag}");
    (
        reg.count_requests("GET", &path),
        reg.count_requests("HEAD", &path),
    )
}

fn admin(proxy: &Proxy, path: &str) -> String {
    let url = format!("http://{}{path}", proxy.addrs.admin);
    let r = Get::new(&url)
        .header("Authorization", format!("Bearer {TOKEN}"))
        .send()
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{path}");
    String::from_utf8(r.body.to_vec()).unwrap()
}

fn metric(proxy: &Proxy, series: &str) -> f64 {
    proxy.metric(series).unwrap().unwrap_or(0.0)
}

fn images(dir: &std::path::Path) -> (Image, Image) {
    let mut b = LayoutBuilder::new(dir).unwrap();
    let v1 = b.random("v1", &[2048], 1).unwrap();
    let v2 = b.random("v2", &[2048], 2).unwrap();
    (v1, v2)
}

#[test]
fn the_tag_policy_decides_when_the_upstream_is_asked_and_moves_are_counted() {
    let work = tempfile::tempdir().unwrap();
    let (v1, v2) = images(work.path());
    let (d1, d2) = (&v1.manifests[0].digest, &v2.manifests[0].digest);
    let mut up = Registry::plain().unwrap();
    for tag in ["latest", "1.0.0", "edge"] {
        up.push_image(&v1, "app", tag).unwrap();
    }
    // `latest`: asked every pull; x.y.z: never again once cached; any other
    // tag: tagTTL (1 s, so that the test can outlive it).
    let proxy = Proxy::start(
        common::proxy_bin(),
        Addrs::localhost().unwrap(),
        &format!(
            "adminToken: {TOKEN}\n{}",
            common::one_registry(
                "quay.io",
                &up.url(),
                "    tagTTL: 1s\n    tagPolicy:\n      - {pattern: 'latest|main', ttl: 0s}\n      - {pattern: '[0-9]+\\.[0-9]+\\.[0-9]+', ttl: immutable}\n",
            )
        ),
    )
    .unwrap();

    // First pulls: one GET each.
    for tag in ["latest", "1.0.0", "edge"] {
        assert_eq!(&manifest(&proxy, tag), d1);
        assert_eq!(asked(&up, tag), (1, 0), "{tag}");
    }

    // `latest` (0s) again: a HEAD finds it unmoved, the cache answers (HIT,
    // no second GET). `1.0.0` and `edge` (within 1 s): not asked at all.
    assert_eq!(&manifest(&proxy, "latest"), d1);
    assert_eq!(asked(&up, "latest"), (1, 1));
    let hits = proxy
        .wait_access(&[("kind", "tag"), ("cache", "HIT")])
        .unwrap();
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!(&manifest(&proxy, "1.0.0"), d1);
    assert_eq!(asked(&up, "1.0.0"), (1, 0));
    let unchanged = r#"pullthrough_tag_revalidations_total{registry="quay.io",result="unchanged"}"#;
    assert_eq!(metric(&proxy, unchanged), 1.0);

    // Every tag moves upstream.
    for tag in ["latest", "1.0.0", "edge"] {
        up.push_image(&v2, "app", tag).unwrap();
    }
    // `latest`: the HEAD sees another digest, a GET fetches it.
    assert_eq!(&manifest(&proxy, "latest"), d2);
    assert_eq!(asked(&up, "latest"), (2, 2));
    // Past tagTTL (1 s): `edge` is revalidated and follows; `1.0.0` is
    // immutable: still v1, the upstream never asked again.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(&manifest(&proxy, "edge"), d2);
    assert_eq!(asked(&up, "edge"), (2, 1));
    assert_eq!(&manifest(&proxy, "1.0.0"), d1);
    assert_eq!(asked(&up, "1.0.0"), (1, 0));

    // Two moves: counted, in /status (what the operator turns into
    // Events), and in the tag's history.
    assert_eq!(
        metric(&proxy, r#"pullthrough_tag_moves_total{registry="quay.io"}"#),
        2.0
    );
    assert_eq!(
        metric(
            &proxy,
            r#"pullthrough_tag_revalidations_total{registry="quay.io",result="changed"}"#
        ),
        2.0
    );
    let status: Value = serde_json::from_str(&admin(&proxy, "/status")).unwrap();
    assert_eq!(status["cache"]["quay.io"]["tagMoves"], 2, "{status}");
    let moves = status["tagMoves"].as_array().unwrap();
    let moved: Vec<(&str, &str, &str)> = moves
        .iter()
        .map(|m| {
            (
                m["tag"].as_str().unwrap(),
                m["from"].as_str().unwrap(),
                m["to"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        moved,
        [
            ("latest", d1.as_str(), d2.as_str()),
            ("edge", d1.as_str(), d2.as_str())
        ]
    );
    assert!(
        moves
            .iter()
            .all(|m| m["registry"] == "quay.io" && m["repository"] == "app")
    );
    let tags: Value = serde_json::from_str(&admin(
        &proxy,
        "/admin/tags?registry=quay.io&repository=app",
    ))
    .unwrap();
    let latest = tags["tags"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tag"] == "latest")
        .unwrap();
    assert_eq!(latest["digest"], d2.as_str());
    assert_eq!(latest["previous"][0]["digest"], d1.as_str(), "{tags}");

    // Upstream gone: `latest` (always revalidated) is answered STALE from
    // the last known digest, not an error.
    up.stop().unwrap();
    assert_eq!(&manifest(&proxy, "latest"), d2);
    proxy
        .wait_access(&[("kind", "tag"), ("cache", "STALE")])
        .unwrap();
}

/// A bad rule is refused at start with the key named, exit 64, before any
/// port is bound.
#[test]
fn a_bad_tag_rule_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.yaml");
    // An upstream on a closed loopback port: were the rule accepted, the
    // proxy would run (stopped after 20 s) and reach nothing.
    std::fs::write(
        &config,
        format!(
            "dataDir: {}\nregistries:\n  - host: quay.io\n    upstream: http://127.0.0.1:1\n    tagPolicy:\n      - {{pattern: ok, ttl: 0s}}\n      - {{pattern: 'v[0-9', ttl: 1m}}\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let (code, stderr) = common::run_to_exit(&config);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("registries[0].tagPolicy[1]") && stderr.contains("v[0-9"),
        "{stderr}"
    );
}

/// `/status` needs no token (the operator reads it): a private registry's
/// moves, which name its repositories and tags, are listed only to a
/// caller with the admin token; the count is there for everyone.
#[test]
fn the_moves_of_a_private_registry_are_listed_only_with_the_admin_token() {
    let work = tempfile::tempdir().unwrap();
    let (v1, v2) = images(work.path());
    let up = Registry::plain().unwrap();
    up.push_image(&v1, "app", "latest").unwrap();
    let proxy = Proxy::start(
        common::proxy_bin(),
        Addrs::localhost().unwrap(),
        &format!(
            "adminToken: {TOKEN}\n{}",
            common::one_registry(
                "quay.io",
                &up.url(),
                "    private: true\n    tagPolicy:\n      - {pattern: latest, ttl: 0s}\n",
            )
        ),
    )
    .unwrap();
    assert_eq!(manifest(&proxy, "latest"), v1.manifests[0].digest);
    up.push_image(&v2, "app", "latest").unwrap();
    assert_eq!(manifest(&proxy, "latest"), v2.manifests[0].digest);

    let url = format!("http://{}/status", proxy.addrs.admin);
    let anonymous = Get::new(&url).send().unwrap();
    assert_eq!(anonymous.status, StatusCode::OK);
    let status: Value = serde_json::from_slice(&anonymous.body).unwrap();
    assert_eq!(status["cache"]["quay.io"]["tagMoves"], 1, "{status}");
    assert_eq!(status["tagMoves"], serde_json::json!([]), "{status}");
    assert_eq!(status["tagMovesScope"], "public", "{status}");
    assert!(
        !String::from_utf8_lossy(&anonymous.body).contains("\"app\""),
        "{status}"
    );
    // A wrong token is not refused (the rest is for everyone) but says it
    // was not taken, so the operator can tell a misconfigured token.
    let wrong = Get::new(&url)
        .header("Authorization", "Bearer not-the-token")
        .send()
        .unwrap();
    assert_eq!(wrong.status, StatusCode::OK);
    let status: Value = serde_json::from_slice(&wrong.body).unwrap();
    assert_eq!(status["tagMoves"], serde_json::json!([]), "{status}");
    assert_eq!(status["tagMovesScope"], "public", "{status}");

    let status: Value = serde_json::from_str(&admin(&proxy, "/status")).unwrap();
    let moves = status["tagMoves"].as_array().unwrap();
    assert_eq!(moves.len(), 1, "{status}");
    assert_eq!(moves[0]["repository"], "app");
    assert_eq!(status["tagMovesScope"], "all", "{status}");

    // The private registry leaves the config: its moves, still kept, stay
    // hidden (a registry the config no longer names is not known public).
    let path = proxy.config_path();
    let config = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, config.replace("host: quay.io", "host: other.io")).unwrap();
    pullthrough_testbed::net::wait_for("the reload", Duration::from_secs(10), || {
        let status: Value = serde_json::from_slice(&Get::new(&url).send()?.body).unwrap();
        Ok(status["registries"] == serde_json::json!(["other.io"]))
    })
    .unwrap();
    let anonymous = Get::new(&url).send().unwrap();
    let status: Value = serde_json::from_slice(&anonymous.body).unwrap();
    assert_eq!(status["tagMoves"], serde_json::json!([]), "{status}");
    let status: Value = serde_json::from_str(&admin(&proxy, "/status")).unwrap();
    assert_eq!(status["tagMoves"].as_array().unwrap().len(), 1, "{status}");
}

/// A registry answers a tag that points at a manifest list according to
/// what the client accepts: the list to a runtime, the linux/amd64
/// manifest to a client that takes single manifests only (a scanner, a
/// script with one `Accept`). The cached answer serves only clients the
/// upstream would have answered the same: the narrow client's manifest
/// never reaches an arm64 node's runtime, whichever asked first, and the
/// narrow answer does not push the list out of the cache.
#[test]
fn a_narrow_accept_never_gets_a_runtime_the_wrong_platform() {
    const V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
    const LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    let runtime_accept = format!(
        "{V2}, {LIST}, application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"
    );
    let work = tempfile::tempdir().unwrap();
    let multi = LayoutBuilder::new(work.path())
        .unwrap()
        .multi_arch("1")
        .unwrap();
    let up = Registry::plain().unwrap();
    // Pushed as Docker's formats: distribution hands a client that does
    // not take lists the default platform's manifest out of a Docker list.
    for tag in ["1", "2"] {
        let mut args: Vec<String> = [
            "--insecure-policy",
            "copy",
            "--all",
            "--format",
            "v2s2",
            "-q",
        ]
        .map(String::from)
        .to_vec();
        args.extend(up.skopeo_flags("dest"));
        args.push(format!("oci:{}:1", multi.layout.display()));
        args.push(format!("docker://{}/app:{tag}", up.host()));
        pullthrough_testbed::process::run(&mut up.command("skopeo", args)).unwrap();
    }
    let proxy = Proxy::start(
        common::proxy_bin(),
        Addrs::localhost().unwrap(),
        &common::one_registry("quay.io", &up.url(), ""),
    )
    .unwrap();
    let get = |tag: &str, accept: &str| {
        let url = format!("{}/v2/quay.io/app/manifests/{tag}", proxy.http_url());
        let r = Get::new(&url).header("Accept", accept).send().unwrap();
        assert_eq!(r.status, StatusCode::OK, "{tag} {accept}: {}", proxy.log());
        let mt = r.headers["content-type"].to_str().unwrap().to_string();
        (mt, sha256_digest(&r.body))
    };

    let mut lists = Vec::new();
    for tag in ["1", "2"] {
        // The upstream's own answers, asked directly.
        let direct = |accept: &str| {
            let url = format!("{}/v2/app/manifests/{tag}", up.url());
            let r = Get::new(&url).header("Accept", accept).send().unwrap();
            sha256_digest(&r.body)
        };
        let (list, amd64) = (direct(&runtime_accept), direct(V2));
        assert_ne!(list, amd64, "the registry answers by Accept");
        lists.push(list.clone());
        // Tag 1: the narrow client first; tag 2: the runtime first.
        let order: [&str; 3] = if tag == "1" {
            [V2, &runtime_accept, V2]
        } else {
            [&runtime_accept, V2, &runtime_accept]
        };
        for accept in order {
            let (mt, digest) = get(tag, accept);
            if accept == V2 {
                assert_eq!((mt.as_str(), &digest), (V2, &amd64), "{tag}: narrow client");
            } else {
                assert_eq!((mt.as_str(), &digest), (LIST, &list), "{tag}: runtime");
            }
        }
    }
    // Once the list is cached, a runtime is answered from the cache: the
    // narrow client's answer did not replace it (tag 2's last pull is the
    // one HIT; every narrow ask went to the upstream).
    let hits = proxy
        .wait_access(&[("kind", "tag"), ("cache", "HIT")])
        .unwrap();
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!(hits[0]["digest"], lists[1].as_str(), "{hits:?}");
}

/// A registry that is not `private` still holds repositories only some
/// clients may read (Docker Hub, GHCR). `/status` needs no token, so it
/// shows an untrusted caller only the moves anonymous clients were let
/// see: a public repository's move is listed (the operator reads it),
/// one in a repository that needs credentials only with the admin token.
/// Before, every move of a registry not marked `private` was listed.
#[test]
fn a_move_in_a_repository_that_needs_credentials_is_listed_only_with_the_admin_token() {
    const USER: (&str, &str) = ("puller", "s3cret-51d0");
    let work = tempfile::tempdir().unwrap();
    let (v1, v2) = images(work.path());
    let public = Registry::plain().unwrap();
    let guarded = Registry::htpasswd(USER.0, USER.1).unwrap();
    public.push_image(&v1, "app", "latest").unwrap();
    guarded.push_image(&v1, "secret-app", "latest").unwrap();
    let policy = "    tagPolicy:\n      - {pattern: latest, ttl: 0s}\n";
    let proxy = Proxy::start(
        common::proxy_bin(),
        Addrs::localhost().unwrap(),
        &format!(
            "adminToken: {TOKEN}\nregistries:\n  - host: quay.io\n    upstream: {}\n{policy}  - host: ghcr.io\n    upstream: {}\n    caBundle: {}\n{policy}",
            public.url(),
            guarded.url(),
            guarded.ca_path().unwrap().display()
        ),
    )
    .unwrap();
    let basic = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("{}:{}", USER.0, USER.1)
        )
    );
    let guarded_manifest = || {
        let url = format!(
            "{}/v2/ghcr.io/secret-app/manifests/latest",
            proxy.http_url()
        );
        let r = Get::new(&url)
            .header("Accept", ACCEPT)
            .header("Authorization", &basic)
            .send()
            .unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", proxy.log());
        sha256_digest(&r.body)
    };
    assert_eq!(manifest(&proxy, "latest"), v1.manifests[0].digest);
    assert_eq!(guarded_manifest(), v1.manifests[0].digest);
    public.push_image(&v2, "app", "latest").unwrap();
    guarded.push_image(&v2, "secret-app", "latest").unwrap();
    assert_eq!(manifest(&proxy, "latest"), v2.manifests[0].digest);
    assert_eq!(guarded_manifest(), v2.manifests[0].digest);

    let url = format!("http://{}/status", proxy.addrs.admin);
    let anonymous = Get::new(&url).send().unwrap();
    let status: Value = serde_json::from_slice(&anonymous.body).unwrap();
    assert_eq!(status["cache"]["ghcr.io"]["tagMoves"], 1, "{status}");
    let repos: Vec<&str> = status["tagMoves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["repository"].as_str().unwrap())
        .collect();
    assert_eq!(repos, ["app"], "{status}");
    assert!(
        !String::from_utf8_lossy(&anonymous.body).contains("secret-app"),
        "{status}"
    );

    let status: Value = serde_json::from_str(&admin(&proxy, "/status")).unwrap();
    let mut repos: Vec<&str> = status["tagMoves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["repository"].as_str().unwrap())
        .collect();
    repos.sort_unstable();
    assert_eq!(repos, ["app", "secret-app"], "{status}");
}

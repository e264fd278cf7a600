//! Per-registry upstream credentials (`credentialsFile`) against a real
//! TLS + htpasswd `docker-registry`: clients without credentials are
//! served through the proxy's own credentials, a wrong or missing file
//! serves nothing, the file is rotated (Kubernetes Secret volume style:
//! a `..data` symlink swap) without restarting the proxy, cache hits follow
//! the credentials now configured, and `private: true` still wants the
//! client's own credentials. A broken file at start-up is exit 64.
//!
//! The Bearer token dance needs a token server distribution does not ship:
//! it is tested through the proxy binary against the test bed's stub
//! registry, whose realm hands a token only to the configured user, and in
//! detail (expiry, scopes, redirects) in `src/credentials.rs`.
//! What reached the upstream is read from the registry's own access log
//! (`auth.user.name=`), what the proxy did from its access log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use http::StatusCode;
use pullthrough_testbed::fixtures::{Image, LayoutBuilder, verify_digest};
use pullthrough_testbed::http::{Get, Response};
use pullthrough_testbed::net::{free_port, is_listening, wait_for};
use pullthrough_testbed::proxy::{Addrs, Proxy};
use pullthrough_testbed::registry::Registry;
use pullthrough_testbed::stub::{Stub, StubAuth};

const HOST: &str = "creds.test";
const FIRST_PW: &str = "first-Pw-4d1f";
const SECOND_PW: &str = "second-Pw-77c2";
const WRONG_PW: &str = "wrong-Pw-93ab";
/// The test's clients' User-Agent, which the proxy forwards: tells its
/// requests in the registry's log from skopeo's pushes.
const AGENT: &str = "credentials-test-client";

fn basic(user: &str, password: &str) -> String {
    let enc = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {enc}")
}

/// A Secret volume as kubelet lays it out: `<dir>/creds.json` →
/// `..data/creds.json`, `..data` → `..<generation>`; an update writes a
/// new generation and renames a new `..data` link over the old one.
struct SecretVolume {
    dir: PathBuf,
    generation: u32,
}

impl SecretVolume {
    fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        Self {
            dir: dir.to_path_buf(),
            generation: 0,
        }
    }

    fn file(&self) -> PathBuf {
        self.dir.join("creds.json")
    }

    fn set(&mut self, user: &str, password: &str) {
        self.generation += 1;
        let generation = format!("..gen{}", self.generation);
        std::fs::create_dir(self.dir.join(&generation)).unwrap();
        std::fs::write(
            self.dir.join(&generation).join("creds.json"),
            format!(r#"{{"username":"{user}","password":"{password}"}}"#),
        )
        .unwrap();
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&generation, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        if std::fs::symlink_metadata(self.file()).is_err() {
            std::os::unix::fs::symlink("..data/creds.json", self.file()).unwrap();
        }
    }
}

/// The registry's htpasswd file holds exactly `users` (distribution
/// re-reads it when it changes).
fn set_htpasswd(registry: &Registry, users: &[(&str, &str)]) {
    let mut text = String::new();
    for (user, password) in users {
        let out = Command::new("htpasswd")
            .args(["-Bbn", user, password])
            .output()
            .unwrap();
        assert!(out.status.success());
        text.push_str(String::from_utf8(out.stdout).unwrap().trim_end());
        text.push('\n');
    }
    std::fs::write(registry.dir().join("htpasswd"), text).unwrap();
}

/// Direct request to the registry with `user`/`password`.
fn direct_status(registry: &Registry, user: &str, password: &str) -> StatusCode {
    let url = format!("{}/v2/", registry.url());
    Get::new(&url)
        .ca(registry.ca_pem().unwrap())
        .header("authorization", basic(user, password))
        .send()
        .unwrap()
        .status
}

struct Setup {
    registry: Registry,
    image: Image,
    proxy: Proxy,
    _work: tempfile::TempDir,
}

/// The proxy config: `creds.test` served from `registry`, plus `extra`
/// keys for the registry entry.
fn config_for(registry: &Registry, extra: &str) -> String {
    format!(
        "registries:\n  - host: {HOST}\n    upstream: {}\n    caBundle: {}\n{extra}",
        registry.url(),
        registry.ca_path().unwrap().display()
    )
}

impl Setup {
    fn config(&self, extra: &str) -> String {
        config_for(&self.registry, extra)
    }

    /// An anonymous GET through the proxy (CRI-O style path prefix).
    fn get(&self, path: &str) -> Response {
        self.get_as(path, None)
    }

    fn get_as(&self, path: &str, auth: Option<&str>) -> Response {
        let url = format!("{}/v2/{HOST}/{path}", self.proxy.http_url());
        let mut get = Get::new(&url)
            .header("accept", self.image.media_type.clone())
            .header("user-agent", AGENT);
        if let Some(a) = auth {
            get = get.header("authorization", a);
        }
        get.send().unwrap()
    }

    fn manifest(&self, repo: &str) -> Response {
        self.get(&format!("{repo}/manifests/1"))
    }

    fn blob(&self, repo: &str, digest: &str) -> Response {
        self.get(&format!("{repo}/blobs/{digest}"))
    }

    /// The image's blobs: config and layers.
    fn blobs(&self) -> Vec<String> {
        let m = &self.image.manifests[0];
        std::iter::once(m.config.digest.clone())
            .chain(m.layers.iter().map(|l| l.digest.clone()))
            .collect()
    }

    fn applied(&self) -> usize {
        self.proxy.log().matches("\"config applied\"").count()
    }

    fn wait_applied(&self, count: usize) {
        wait_for("the config to be applied", Duration::from_secs(10), || {
            Ok(self.applied() >= count)
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", self.proxy.log()));
    }

    /// Access-log lines of the registry for `METHOD <path with path_part>`
    /// answered 200, on behalf of the test's clients.
    fn upstream_ok(&self, method: &str, path_part: &str) -> usize {
        let method = format!("\"{method} ");
        let agent = format!("\"{AGENT}\"");
        self.registry
            .log()
            .lines()
            .filter(|l| l.contains(&method) && l.contains(path_part))
            .filter(|l| l.contains("\" 200 ") && l.trim_end().ends_with(&agent))
            .count()
    }

    /// Requests for `path_part` on behalf of the test's clients that the
    /// registry authenticated (its log names no user for successful
    /// requests: which credentials they were follows from who is in the
    /// htpasswd file at the time).
    fn authorized(&self, method: &str, path_part: &str) -> usize {
        let method = format!("http.request.method={method} ");
        self.registry
            .log()
            .lines()
            .filter(|l| l.contains("msg=\"authorized request\""))
            .filter(|l| l.contains(&format!("useragent={AGENT}")))
            .filter(|l| l.contains(&method) && l.contains(path_part))
            .count()
    }
}

/// Asserts `resp` is a 401 that carries none of the image's bytes.
fn refused(resp: &Response, image: &Image, what: &str) {
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED, "{what}");
    assert!(
        resp.body.len() < 1024,
        "{what}: {} body bytes",
        resp.body.len()
    );
    assert_ne!(&resp.body[..], &image.bytes[..], "{what}");
    let text = String::from_utf8_lossy(&resp.body);
    assert!(text.is_empty() || text.contains("errors"), "{what}: {text}");
}

#[test]
fn configured_credentials_serve_clients_without_any_and_rotate_without_restart() {
    let work = tempfile::tempdir().unwrap();
    let registry = Registry::htpasswd("puller", FIRST_PW).unwrap();
    let image = LayoutBuilder::new(&work.path().join("layout"))
        .unwrap()
        .random("1", &[64 << 10, 8 << 10], 31)
        .unwrap();
    for repo in ["team/app", "team/rotated", "team/third"] {
        registry.push_image(&image, repo, "1").unwrap();
    }
    let plain = config_for(&registry, "");
    let proxy = Proxy::start(common::proxy_bin(), Addrs::localhost().unwrap(), &plain).unwrap();
    let s = Setup {
        registry,
        image,
        proxy,
        _work: work,
    };
    let pid = s.proxy.pid();
    let blobs = s.blobs();
    let layer = blobs[1].clone();

    // 1. No credentialsFile: the upstream's 401 reaches the client (the
    //    client may retry with credentials of its own), nothing is cached.
    let resp = s.manifest("team/app");
    refused(&resp, &s.image, "manifest without a credentials file");
    assert!(
        resp.headers
            .get("www-authenticate")
            .is_some_and(|v| v.to_str().unwrap().starts_with("Basic")),
        "{:?}",
        resp.headers
    );
    refused(
        &s.blob("team/app", &layer),
        &s.image,
        "blob without a credentials file",
    );

    // 2. A credentials file with a wrong password: still the upstream's
    //    401 (the registry refused the proxy too), nothing cached.
    let mut secret = SecretVolume::new(&s._work.path().join("secret"));
    secret.set("puller", WRONG_PW);
    let with_file = s.config(&format!(
        "    credentialsFile: {}\n",
        secret.file().display()
    ));
    s.proxy.write_config(&with_file).unwrap();
    s.wait_applied(1);
    refused(
        &s.manifest("team/app"),
        &s.image,
        "manifest, wrong password",
    );
    refused(
        &s.blob("team/app", &layer),
        &s.image,
        "blob, wrong password",
    );
    for digest in &blobs {
        assert!(
            !s.proxy.cached_blob_path(digest).exists(),
            "{digest} cached"
        );
    }

    // 3. The Secret is updated (symlink swap; the config file untouched):
    //    applied without a restart; MISS, then HIT, all digests verified.
    secret.set("puller", FIRST_PW);
    wait_for(
        "the right password to be used",
        Duration::from_secs(10),
        || Ok(s.manifest("team/app").status == StatusCode::OK),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", s.proxy.log()));
    assert_eq!(s.proxy.pid(), pid);
    let resp = s.manifest("team/app");
    verify_digest(&resp.body, &s.image.digest).unwrap();
    for digest in &blobs {
        let resp = s.blob("team/app", digest);
        assert_eq!(resp.status, StatusCode::OK, "{digest}");
        verify_digest(&resp.body, digest).unwrap();
        s.proxy
            .wait_access(&[("digest", digest), ("kind", "blob"), ("cache", "MISS")])
            .unwrap();
    }
    let manifest_by_digest = format!("team/app/manifests/{}", s.image.digest);
    for digest in &blobs {
        let resp = s.blob("team/app", digest);
        assert_eq!(resp.status, StatusCode::OK);
        verify_digest(&resp.body, digest).unwrap();
        s.proxy
            .wait_access(&[("digest", digest), ("kind", "blob"), ("cache", "HIT")])
            .unwrap();
    }
    let resp = s.get(&manifest_by_digest);
    assert_eq!(resp.status, StatusCode::OK);
    verify_digest(&resp.body, &s.image.digest).unwrap();
    s.proxy
        .wait_access(&[("kind", "manifest"), ("cache", "HIT"), ("status", "200")])
        .unwrap();
    // One upstream GET per blob served, authenticated: with the proxy's
    // credentials (`puller` is the only user; the client sent none).
    for digest in &blobs {
        let app_blob = format!("team/app/blobs/{digest}");
        assert_eq!(s.upstream_ok("GET", &app_blob), 1, "{digest}");
        assert_eq!(s.authorized("GET", &app_blob), 1, "{digest}");
    }
    // A client's own Authorization is relayed as it is, not replaced.
    let own = basic("puller", "not-the-password");
    let resp = s.get_as("team/rotated/manifests/1", Some(&own));
    refused(&resp, &s.image, "client with its own wrong credentials");

    // 4. Rotation to another user; the old one is removed upstream.
    set_htpasswd(&s.registry, &[("rotated", SECOND_PW)]);
    wait_for(
        "the registry to drop `puller`",
        Duration::from_secs(10),
        || Ok(direct_status(&s.registry, "puller", FIRST_PW) == StatusCode::UNAUTHORIZED),
    )
    .unwrap();
    assert_eq!(
        direct_status(&s.registry, "rotated", SECOND_PW),
        StatusCode::OK
    );
    refused(
        &s.manifest("team/rotated"),
        &s.image,
        "old credentials, removed upstream",
    );
    secret.set("rotated", SECOND_PW);
    wait_for(
        "the rotated credentials to be used",
        Duration::from_secs(10),
        || Ok(s.manifest("team/rotated").status == StatusCode::OK),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", s.proxy.log()));
    assert_eq!(s.proxy.pid(), pid);
    // `puller` is gone upstream: only `rotated` can have been let in.
    assert!(s.authorized("GET", "team/rotated/manifests/1") >= 1);
    // Cached content read with the old credentials is checked again with
    // the new ones (a one-byte GET as `rotated`, answered 206), then
    // served from the cache (the one 200 is still the first download).
    let app_layer = format!("team/app/blobs/{layer}");
    let checks = s.authorized("GET", &app_layer);
    let resp = s.blob("team/app", &layer);
    assert_eq!(resp.status, StatusCode::OK);
    verify_digest(&resp.body, &layer).unwrap();
    assert_eq!(s.upstream_ok("GET", &layer), 1, "not a HIT");
    wait_for(
        "the access check as `rotated`",
        Duration::from_secs(10),
        || Ok(s.authorized("GET", &app_layer) == checks + 1),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", s.registry.log()));

    // 5. The config points at a file kubelet has not written yet: the
    //    running config stays (still serving), the error names the file;
    //    when the file appears it is applied with no other change.
    let later = SecretVolume::new(&s._work.path().join("later"));
    let applied = s.applied();
    s.proxy
        .write_config(&s.config(&format!(
            "    credentialsFile: {}\n",
            later.file().display()
        )))
        .unwrap();
    wait_for("the rejection in the log", Duration::from_secs(10), || {
        Ok(s.proxy.log().lines().any(|l| {
            l.contains("config change rejected") && l.contains(&*later.file().to_string_lossy())
        }))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", s.proxy.log()));
    let resp = s.blob("team/app", &layer);
    assert_eq!(
        resp.status,
        StatusCode::OK,
        "the running config was dropped"
    );
    assert_eq!(s.applied(), applied);
    let mut later = later;
    later.set("rotated", WRONG_PW);
    s.wait_applied(applied + 1);
    // Wrong credentials now: cached content is not served to clients
    // without credentials any more (the upstream refuses the proxy).
    let refusals = |s: &Setup| {
        s.proxy
            .access_matching(&[("digest", &layer), ("status", "401")])
            .len()
    };
    let before = refusals(&s);
    let resp = s.blob("team/app", &layer);
    refused(&resp, &s.image, "cached blob, wrong credentials");
    wait_for("the refusal's access line", Duration::from_secs(10), || {
        Ok(refusals(&s) == before + 1)
    })
    .unwrap();
    refused(
        &s.manifest("team/third"),
        &s.image,
        "uncached manifest, wrong credentials",
    );

    // 6. private: true: the proxy's (right) credentials are not used on a
    //    client's behalf; a client with its own gets the cached blob.
    later.set("rotated", SECOND_PW);
    let applied = s.applied();
    s.proxy
        .write_config(&s.config(&format!(
            "    private: true\n    credentialsFile: {}\n",
            later.file().display()
        )))
        .unwrap();
    s.wait_applied(applied + 1);
    refused(
        &s.blob("team/app", &layer),
        &s.image,
        "private, no credentials",
    );
    refused(
        &s.manifest("team/third"),
        &s.image,
        "private miss, no credentials",
    );
    let resp = s.get_as(
        &format!("team/app/blobs/{layer}"),
        Some(&basic("rotated", SECOND_PW)),
    );
    assert_eq!(resp.status, StatusCode::OK);
    verify_digest(&resp.body, &layer).unwrap();
    assert_eq!(s.upstream_ok("GET", &layer), 1, "not a HIT");

    // Nothing secret in the proxy's log.
    let log = s.proxy.log();
    for (user, pw) in [
        ("puller", FIRST_PW),
        ("puller", WRONG_PW),
        ("rotated", SECOND_PW),
        ("rotated", WRONG_PW),
    ] {
        assert!(!log.contains(pw), "a password is in the proxy log");
        let b = basic(user, pw);
        assert!(
            !log.contains(b.trim_start_matches("Basic ")),
            "Basic credentials in the log"
        );
    }
    assert_eq!(s.proxy.pid(), pid);
}

/// Each broken credentials file: exit 64 before any port is bound, the
/// message names the registry, the file and the field, never the password.
#[test]
fn broken_credentials_files_exit_64_naming_registry_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, Option<&str>, &str); 5] = [
        ("missing", None, "No such file"),
        ("not JSON", Some("puller:hunter2-secret"), "not JSON"),
        (
            "unknown key",
            Some(r#"{"username":"puller","password":"hunter2-secret","email":"x@y"}"#),
            "email",
        ),
        (
            "missing password",
            Some(r#"{"username":"puller"}"#),
            "password: missing",
        ),
        (
            "password not a string",
            Some(r#"{"username":"puller","password":987654321}"#),
            "password: must be a string",
        ),
    ];
    for (i, (what, content, field)) in cases.iter().enumerate() {
        let creds = dir.path().join(format!("creds-{i}.json"));
        if let Some(c) = content {
            std::fs::write(&creds, c).unwrap();
        }
        let ports: Vec<SocketAddr> = (0..3)
            .map(|_| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), free_port().unwrap()))
            .collect();
        let data = dir.path().join(format!("data-{i}"));
        let config = dir.path().join(format!("config-{i}.yaml"));
        std::fs::write(
            &config,
            format!(
                "listen: {{http: \"{}\", https: \"{}\", admin: \"{}\"}}\ndataDir: {}\n\
                 registries:\n  - host: private.test\n    credentialsFile: {}\n",
                ports[0],
                ports[1],
                ports[2],
                data.display(),
                creds.display()
            ),
        )
        .unwrap();
        let (code, stderr) = common::run_to_exit(&config);
        assert_eq!(code, Some(64), "{what}: {stderr}");
        for needle in ["private.test", &*creds.to_string_lossy(), field] {
            assert!(
                stderr.contains(needle),
                "{what}: `{needle}` not in {stderr}"
            );
        }
        for secret in ["hunter2-secret", "987654321"] {
            assert!(!stderr.contains(secret), "{what}: {stderr}");
        }
        for p in &ports {
            assert!(!is_listening(*p), "{what}: something listens on {p}");
        }
        assert!(!data.exists(), "{what}: data dir created");
    }
}

/// The Bearer dance through the proxy binary: the upstream challenges with
/// a token realm that hands a token only to `robot` (as Docker Hub's and
/// quay.io's realms do for private repositories). A client without
/// credentials gets the image; the realm saw the configured Basic
/// credentials, the registry only the token; a wrong password gets the
/// client a 401 and no content.
#[test]
fn bearer_realm_is_asked_with_the_configured_credentials() {
    let work = tempfile::tempdir().unwrap();
    let image = LayoutBuilder::new(&work.path().join("layout"))
        .unwrap()
        .busybox("1")
        .unwrap();
    let stub = Stub::builder(&image.layout)
        .auth(StubAuth::bearer_login(
            "stub",
            "tok-robot",
            "robot",
            FIRST_PW,
        ))
        .start()
        .unwrap();
    let mut volume = SecretVolume::new(&work.path().join("secret"));
    volume.set("robot", WRONG_PW);
    let config = format!(
        "registries:\n  - host: {HOST}\n    upstream: {}\n    credentialsFile: {}\n",
        stub.url(),
        volume.file().display()
    );
    let proxy = Proxy::start(common::proxy_bin(), Addrs::localhost().unwrap(), &config).unwrap();
    let get = |path: &str| {
        Get::new(&format!(
            "{}/v2/{HOST}/fixture/busybox/{path}",
            proxy.http_url()
        ))
        .header("accept", image.media_type.clone())
        .send()
        .unwrap()
    };
    let m = &image.manifests[0];

    // Wrong password: the realm refuses it, so does the proxy.
    refused(&get("manifests/1"), &image, "manifest, wrong password");
    refused(
        &get(&format!("blobs/{}", m.config.digest)),
        &image,
        "blob, wrong password",
    );

    // The right password (rotated in place): manifest and blobs.
    volume.set("robot", FIRST_PW);
    wait_for(
        "the new credentials to be used",
        Duration::from_secs(10),
        || Ok(get("manifests/1").status == StatusCode::OK),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", proxy.log()));
    let manifest = get(&format!("manifests/{}", image.digest));
    assert_eq!(manifest.status, StatusCode::OK);
    verify_digest(&manifest.body, &image.digest).unwrap();
    for d in std::iter::once(&m.config.digest).chain(m.layers.iter().map(|l| &l.digest)) {
        let r = get(&format!("blobs/{d}"));
        assert_eq!(r.status, StatusCode::OK, "{d}");
        verify_digest(&r.body, d).unwrap();
    }

    let seen = stub.requests();
    let auth = |s: &pullthrough_testbed::stub::Seen| {
        s.headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let tokens: Vec<_> = seen
        .iter()
        .filter(|s| s.path.starts_with("/token"))
        .collect();
    assert!(
        tokens.iter().any(|s| auth(s) == basic("robot", FIRST_PW)
            && s.path.contains("service=stub")
            && (s
                .path
                .contains("scope=repository%3Afixture%2Fbusybox%3Apull")
                || s.path.contains("scope=repository:fixture/busybox:pull"))),
        "token requests: {:?}",
        tokens.iter().map(|s| &s.path).collect::<Vec<_>>()
    );
    // The registry itself never sees the password, only the token.
    for s in seen.iter().filter(|s| s.path.starts_with("/v2/")) {
        let a = auth(s);
        assert!(
            a.is_empty() || a == "Bearer tok-robot",
            "{} sent {a}",
            s.path
        );
    }
    assert!(
        seen.iter()
            .any(|s| s.path.starts_with("/v2/") && auth(s) == "Bearer tok-robot")
    );
    assert!(!proxy.log().contains(FIRST_PW));
}

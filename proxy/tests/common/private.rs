//! A private upstream for tests that attack the cache's access gate: a
//! real TLS + htpasswd `docker-registry` knowing two users, random images
//! no other test serves, and requests through the proxy as either user or
//! as nobody.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use http::{Method, StatusCode};
use pullthrough_testbed::fixtures::{Image, LayoutBuilder};
use pullthrough_testbed::http::{Get, Response};
use pullthrough_testbed::net::wait_for;
use pullthrough_testbed::proxy::Proxy;
use pullthrough_testbed::registry::Registry;

pub const PULLER: (&str, &str) = ("puller", "s3cret-9e1a");
pub const OTHER: (&str, &str) = ("other", "0ther-pw-41c7");
pub const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

pub fn basic((user, password): (&str, &str)) -> String {
    let enc = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {enc}")
}

/// A TLS + htpasswd registry knowing PULLER and OTHER (htpasswd lets
/// every user read every repository: OTHER is refused only where a
/// repository does not hold the digest).
pub fn private_registry() -> Registry {
    let registry = Registry::htpasswd(PULLER.0, PULLER.1).unwrap();
    let mut text = String::new();
    for (user, password) in [PULLER, OTHER] {
        let out = Command::new("htpasswd")
            .args(["-Bbn", user, password])
            .output()
            .unwrap();
        assert!(out.status.success(), "htpasswd");
        text.push_str(String::from_utf8(out.stdout).unwrap().trim_end());
        text.push('\n');
    }
    std::fs::write(registry.dir().join("htpasswd"), text).unwrap();
    let url = format!("{}/v2/", registry.url());
    wait_for(
        "the registry to know the second user",
        Duration::from_secs(20),
        || {
            Ok(Get::new(&url)
                .ca(registry.ca_pem().unwrap())
                .header("authorization", basic(OTHER))
                .send()
                .is_ok_and(|r| r.status == StatusCode::OK))
        },
    )
    .unwrap();
    registry
}

/// A random image (seeded: digests no other test uses) in a layout under
/// `dir`.
pub fn random_image(dir: &Path, sizes: &[u64], seed: u64) -> Image {
    LayoutBuilder::new(&dir.join("layout"))
        .unwrap()
        .random("1", sizes, seed)
        .unwrap()
}

/// `(path under the repository, digest)` of everything `image` holds.
pub fn objects(image: &Image) -> Vec<(String, String)> {
    let m = &image.manifests[0];
    let mut out = vec![(format!("manifests/{}", m.digest), m.digest.clone())];
    out.push((
        format!("blobs/{}", m.config.digest),
        m.config.digest.clone(),
    ));
    for l in image.layer_digests() {
        out.push((format!("blobs/{l}"), l));
    }
    out
}

/// `method path` through the proxy's plain HTTP listener, taking image
/// manifests, with `auth`'s Basic credentials if any.
pub fn request(proxy: &Proxy, method: Method, path: &str, auth: Option<(&str, &str)>) -> Response {
    let url = format!("{}{path}", proxy.http_url());
    let mut g = Get::new(&url).method(method).header("Accept", ACCEPT);
    if let Some(creds) = auth {
        g = g.header("Authorization", basic(creds));
    }
    g.send().unwrap()
}

/// The proxy in front of `private` as `private.test` and of `public_url`
/// as `public.test` (its config lines followed by `public_extra`, each
/// ending in a newline).
pub fn private_and_public(private: &Registry, public_url: &str, public_extra: &str) -> Proxy {
    Proxy::start(
        super::proxy_bin(),
        pullthrough_testbed::proxy::Addrs::localhost().unwrap(),
        &format!(
            "registries:\n  - host: private.test\n    upstream: {}\n    caBundle: {}\n  - host: public.test\n    upstream: {public_url}\n{public_extra}",
            private.url(),
            private.ca_path().unwrap().display(),
        ),
    )
    .unwrap()
}

/// PULLER reads each of `objects` (see [`objects`]) of
/// `private.test/secret/app` twice: from the upstream (MISS), then from
/// the cache (HIT).
pub fn pull_as_puller_twice(proxy: &Proxy, objects: &[(String, String)]) {
    for round in ["MISS", "HIT"] {
        for (path, d) in objects {
            let r = request(
                proxy,
                Method::GET,
                &format!("/v2/private.test/secret/app/{path}"),
                Some(PULLER),
            );
            assert_eq!(r.status, StatusCode::OK, "{round} {path}");
            assert_eq!(pullthrough_testbed::fixtures::sha256_digest(&r.body), *d);
            proxy
                .wait_access(&[("digest", d), ("cache", round)])
                .unwrap();
        }
    }
}

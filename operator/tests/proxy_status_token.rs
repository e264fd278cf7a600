//! The operator's `GET /status` against a real proxy: with the proxy's
//! admin token it sees the tag moves of a registry whose repositories are
//! not for everyone (issue #14, point 2: a `TagMoved` Event for each), and
//! it can tell when the proxy did not take the token.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use http::StatusCode;
use pullthrough_operator::proxy_status::{self, AdminToken};
use pullthrough_testbed::fixtures::{LayoutBuilder, sha256_digest};
use pullthrough_testbed::http::Get;
use pullthrough_testbed::proxy::{Addrs, Proxy, proxy_bin};
use pullthrough_testbed::registry::Registry;

const TOKEN: &str = "s3cret-admin-token";
const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json";

fn pull_tag(proxy: &Proxy) -> String {
    let url = format!("{}/v2/quay.io/app/manifests/latest", proxy.http_url());
    let r = Get::new(&url).header("Accept", ACCEPT).send().unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", proxy.log());
    sha256_digest(&r.body)
}

#[test]
fn the_admin_token_shows_the_moves_of_a_private_registry() {
    let work = tempfile::tempdir().unwrap();
    let mut images = LayoutBuilder::new(work.path()).unwrap();
    let v1 = images.random("v1", &[2048], 1).unwrap();
    let v2 = images.random("v2", &[2048], 2).unwrap();
    let up = Registry::plain().unwrap();
    up.push_image(&v1, "app", "latest").unwrap();
    let proxy = Proxy::start(
        &proxy_bin().unwrap(),
        Addrs::localhost().unwrap(),
        &format!(
            "adminToken: {TOKEN}\nregistries:\n  - host: quay.io\n    upstream: {}\n    \
             private: true\n    tagPolicy:\n      - {{pattern: latest, ttl: 0s}}\n",
            up.url()
        ),
    )
    .unwrap();
    // The tag moves: the proxy saw it at v1, then at v2.
    assert_eq!(pull_tag(&proxy), v1.manifests[0].digest);
    up.push_image(&v2, "app", "latest").unwrap();
    assert_eq!(pull_tag(&proxy), v2.manifests[0].digest);

    let url = format!("http://{}/status", proxy.addrs.admin);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fetch = |token: Option<&str>| {
        let token: Option<AdminToken> = token.map(|t| t.parse().unwrap());
        rt.block_on(proxy_status::fetch(
            &url,
            token.as_ref(),
            Duration::from_secs(5),
        ))
        .unwrap()
    };

    let with = fetch(Some(TOKEN));
    assert_eq!(with.tag_moves_scope.as_deref(), Some("all"));
    assert_eq!(with.tag_moves.len(), 1, "{with:?}");
    let moved = &with.tag_moves[0];
    assert_eq!(
        (moved.registry.as_str(), moved.repository.as_str()),
        ("quay.io", "app")
    );
    assert_eq!(moved.from, v1.manifests[0].digest);
    assert_eq!(moved.to, v2.manifests[0].digest);

    // Without the token, or with one the proxy does not take, the move is
    // counted but not listed, and the answer says so.
    for token in [None, Some("not-the-token")] {
        let without = fetch(token);
        assert_eq!(
            without.tag_moves_scope.as_deref(),
            Some("public"),
            "{token:?}"
        );
        assert!(without.tag_moves.is_empty(), "{token:?}: {without:?}");
        assert_eq!(without.cache["quay.io"].tag_moves, 1, "{without:?}");
    }
}

/// A token that could not be sent as a header is refused at start, naming
/// what is wrong, rather than failing every `/status` read.
#[test]
fn an_unusable_admin_token_is_refused() {
    assert!("".parse::<AdminToken>().unwrap_err().contains("empty"));
    assert!(
        "line\nbreak"
            .parse::<AdminToken>()
            .unwrap_err()
            .contains("header")
    );
    // Debug output (the settings are logged) shows no secret.
    let token: AdminToken = TOKEN.parse().unwrap();
    assert!(!format!("{token:?}").contains(TOKEN));
}

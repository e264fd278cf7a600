//! The token dance with `credentialsFile` credentials against scripted
//! registries and realms.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use bytes::Bytes;
use http::Response;
use http_body_util::BodyExt;
use pullthrough_api::config::ProxyConfig;

use super::*;
use crate::test_util::{Stub, routed};
use crate::upstream::Upstreams;

fn respond(status: u16, headers: &[(&str, &str)], body: &str) -> Response<Bytes> {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Bytes::from(body.to_string())).unwrap()
}

fn basic(user: &str, password: &str) -> String {
    let enc = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {enc}")
}

fn creds(user: &str, password: &str) -> RegistryCredentials {
    RegistryCredentials::new(
        "reg.test",
        Path::new("/run/creds/reg.test.json"),
        UpstreamCredentials {
            username: user.into(),
            password: password.into(),
        },
    )
}

/// A client for the registry at `upstream`, with `auth.test` (its auth
/// host: credentials may go there) and `blobs.test` (storage the upstream
/// redirects to: a private address, so opted in) pinned to loopback.
fn client_for(upstream: &str) -> Upstreams {
    let config = ProxyConfig::from_yaml(&format!(
        "upstreamTimeouts: {{connect: 3s, read: 10s}}\n\
         resolve: {{auth.test: 127.0.0.1, blobs.test: 127.0.0.1}}\n\
         registries:\n  - host: reg.test\n    upstream: \"{upstream}\"\n    \
         authHosts: [auth.test]\n    allowPrivateNetworks: true\n"
    ))
    .unwrap();
    Upstreams::new(&config).unwrap()
}

async fn get(
    creds: &RegistryCredentials,
    upstreams: &Upstreams,
    url: &str,
    scope: Option<&str>,
) -> Result<(StatusCode, Bytes), UpstreamError> {
    let client = upstreams.client("reg.test").unwrap();
    let resp = creds
        .send(
            client,
            Method::GET,
            url.parse().unwrap(),
            HeaderMap::new(),
            scope,
            Duration::from_secs(5),
        )
        .await?;
    let status = resp.response.status();
    let body = resp
        .response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    Ok((status, body))
}

/// A token realm handing out `tok-<n>` (valid `expires_in` seconds) to
/// `bot:pw` only, and a Bearer registry accepting any of them, whose
/// blobs redirect to a storage host.
struct BearerSetup {
    realm: Stub,
    registry: Stub,
    storage: Stub,
    upstreams: Upstreams,
}

async fn bearer_setup(expires_in: Option<u64>) -> BearerSetup {
    let storage = routed(Ipv4Addr::LOCALHOST.into(), |_| {
        respond(200, &[], "blob bytes")
    });
    let issued = Arc::new(AtomicUsize::new(0));
    let want = basic("bot", "pw");
    let realm = routed(Ipv4Addr::LOCALHOST.into(), move |s| {
        if s.auth() != Some(want.as_str()) {
            return respond(401, &[("www-authenticate", "Basic realm=\"auth\"")], "");
        }
        let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
        let body = match expires_in {
            Some(e) => format!(r#"{{"token":"tok-{n}","expires_in":{e}}}"#),
            None => format!(r#"{{"access_token":"tok-{n}"}}"#),
        };
        respond(200, &[("content-type", "application/json")], &body)
    });
    let (realm_port, storage_port) = (realm.addr().port(), storage.addr().port());
    let registry = routed(Ipv4Addr::LOCALHOST.into(), move |s| {
        let authed = s.auth().is_some_and(|a| a.starts_with("Bearer tok-"));
        let repo = s
            .path
            .strip_prefix("/v2/")
            .and_then(|p| p.split_once("/manifests/").or(p.split_once("/blobs/")))
            .map(|(r, _)| r.to_string());
        if !authed {
            let scope = repo
                .map(|r| format!(",scope=\"repository:{r}:pull\""))
                .unwrap_or_default();
            let challenge = format!(
                "Bearer realm=\"http://auth.test:{realm_port}/token\",service=\"reg.test\"{scope}"
            );
            return respond(401, &[("www-authenticate", &challenge)], "{}");
        }
        if s.path.contains("/missing/") {
            // A made-up name: the registry has no such repository.
            return respond(404, &[], r#"{"errors":[{"code":"NAME_UNKNOWN"}]}"#);
        }
        if s.path.contains("/blobs/") {
            let to = format!("http://blobs.test:{storage_port}/storage/abc");
            return respond(307, &[("location", &to)], "");
        }
        respond(200, &[], "manifest bytes")
    });
    let upstreams = client_for(&format!("http://{}", registry.addr()));
    BearerSetup {
        realm,
        registry,
        storage,
        upstreams,
    }
}

#[tokio::test]
async fn bearer_tokens_are_fetched_with_basic_credentials_cached_and_reused() {
    let s = bearer_setup(Some(300)).await;
    let creds = creds("bot", "pw");
    let base = format!("http://{}", s.registry.addr());
    let manifest = format!("{base}/v2/team/app/manifests/v1");
    let blob = format!("{base}/v2/team/app/blobs/sha256:abc");
    let scope = Some("repository:team/app:pull");

    let (status, body) = get(&creds, &s.upstreams, &manifest, scope).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"manifest bytes");
    let tokens = s.realm.requests();
    assert_eq!(tokens.len(), 1, "{tokens:#?}");
    assert_eq!(tokens[0].auth(), Some(basic("bot", "pw").as_str()));
    assert!(tokens[0].path.starts_with("/token?"), "{}", tokens[0].path);
    assert!(
        tokens[0].path.contains("service=reg.test"),
        "{}",
        tokens[0].path
    );
    assert!(
        tokens[0]
            .path
            .contains("scope=repository%3Ateam%2Fapp%3Apull"),
        "{}",
        tokens[0].path
    );

    // Reused up front: no further 401s, no further token requests.
    for _ in 0..3 {
        let (status, _) = get(&creds, &s.upstreams, &manifest, scope).await.unwrap();
        assert_eq!(status, StatusCode::OK);
    }
    let (status, body) = get(&creds, &s.upstreams, &blob, scope).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"blob bytes");
    assert_eq!(s.realm.requests().len(), 1);
    let at_registry = s.registry.requests();
    // 401, retry, 3 manifests, 1 blob.
    assert_eq!(at_registry.len(), 6, "{at_registry:#?}");
    assert_eq!(at_registry[0].auth(), None);
    for seen in &at_registry[1..] {
        assert_eq!(seen.auth(), Some("Bearer tok-1"), "{seen:?}");
    }

    // The redirect target (another origin) got no credentials at all.
    let at_storage = s.storage.requests();
    assert_eq!(at_storage.len(), 1);
    assert_eq!(at_storage[0].method, Method::GET);
    assert_eq!(at_storage[0].auth(), None, "{:?}", at_storage[0]);
    assert!(!at_storage[0].headers.contains_key(header::COOKIE));

    // Another scope is another token.
    let other = format!("{base}/v2/team/other/manifests/v1");
    let (status, _) = get(
        &creds,
        &s.upstreams,
        &other,
        Some("repository:team/other:pull"),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::OK);
    let tokens = s.realm.requests();
    assert_eq!(tokens.len(), 2);
    assert!(
        tokens[1]
            .path
            .contains("scope=repository%3Ateam%2Fother%3Apull"),
        "{}",
        tokens[1].path
    );
    // The registry itself never saw the password.
    assert!(
        s.registry
            .requests()
            .iter()
            .all(|r| !r.auth().unwrap_or_default().starts_with("Basic")),
    );
}

#[tokio::test]
async fn bearer_tokens_are_refreshed_after_they_expire() {
    // access_token, expires_in 1 s: kept for 0.8 s.
    let s = bearer_setup(Some(1)).await;
    let creds = creds("bot", "pw");
    let manifest = format!("http://{}/v2/team/app/manifests/v1", s.registry.addr());
    let scope = Some("repository:team/app:pull");
    assert_eq!(
        get(&creds, &s.upstreams, &manifest, scope).await.unwrap().0,
        StatusCode::OK
    );
    assert_eq!(
        get(&creds, &s.upstreams, &manifest, scope).await.unwrap().0,
        StatusCode::OK
    );
    assert_eq!(s.realm.requests().len(), 1, "reused while fresh");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        get(&creds, &s.upstreams, &manifest, scope).await.unwrap().0,
        StatusCode::OK
    );
    assert_eq!(s.realm.requests().len(), 2, "refreshed after expiry");
    let last = s.registry.requests().pop().unwrap();
    assert_eq!(last.auth(), Some("Bearer tok-2"));

    // No expires_in: the default 60 s, so reused.
    let s = bearer_setup(None).await;
    for _ in 0..2 {
        assert_eq!(
            get(
                &creds,
                &s.upstreams,
                &format!("http://{}/v2/a/manifests/1", s.registry.addr()),
                Some("repository:a:pull")
            )
            .await
            .unwrap()
            .0,
            StatusCode::OK
        );
    }
    assert_eq!(s.realm.requests().len(), 1);
}

#[tokio::test]
async fn a_realm_refusing_the_credentials_relays_the_registry_401() {
    let s = bearer_setup(Some(300)).await;
    let wrong = creds("bot", "not-it");
    let manifest = format!("http://{}/v2/team/app/manifests/v1", s.registry.addr());
    let (status, _) = get(
        &wrong,
        &s.upstreams,
        &manifest,
        Some("repository:team/app:pull"),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(s.realm.requests().len(), 1);
    // Only the unauthenticated try: nothing to retry with.
    assert_eq!(s.registry.requests().len(), 1);
}

#[tokio::test]
async fn token_exchange_failures_are_errors_naming_the_registry() {
    // A realm that fails.
    let realm = routed(Ipv4Addr::LOCALHOST.into(), |_| respond(500, &[], "down"));
    let realm_port = realm.addr().port();
    let registry = routed(Ipv4Addr::LOCALHOST.into(), move |_| {
        let c =
            format!("Bearer realm=\"http://auth.test:{realm_port}/token\",service=\"reg.test\"");
        respond(401, &[("www-authenticate", &c)], "")
    });
    let upstreams = client_for(&format!("http://{}", registry.addr()));
    let creds = creds("bot", "pw");
    let err = get(
        &creds,
        &upstreams,
        &format!("http://{}/v2/", registry.addr()),
        None,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, UpstreamError::Token { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("reg.test") && text.contains("500"), "{text}");
    assert!(!text.contains("pw"), "{text}");

    // An https upstream never sends the password to an http realm.
    let upstreams = client_for("https://reg.test");
    let challenge = Challenge {
        realm: format!("http://auth.test:{realm_port}/token"),
        service: Some("reg.test".into()),
        scope: None,
    };
    let before = realm.requests().len();
    let err = creds
        .fetch_token(
            upstreams.client("reg.test").unwrap(),
            &challenge,
            "",
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("https"), "{err}");
    assert_eq!(realm.requests().len(), before, "the realm was contacted");
}

#[tokio::test]
async fn basic_challenges_are_answered_then_basic_is_sent_up_front() {
    let want = basic("bot", "pw");
    let registry = routed(Ipv4Addr::LOCALHOST.into(), move |s| {
        if s.auth() == Some(want.as_str()) {
            respond(200, &[], "ok")
        } else {
            respond(401, &[("www-authenticate", "Basic realm=\"reg\"")], "")
        }
    });
    let url = format!("http://{}/v2/team/app/manifests/v1", registry.addr());
    let upstreams = client_for(&format!("http://{}", registry.addr()));
    let good = creds("bot", "pw");
    let scope = Some("repository:team/app:pull");
    assert_eq!(
        get(&good, &upstreams, &url, scope).await.unwrap().0,
        StatusCode::OK
    );
    assert_eq!(registry.requests().len(), 2, "401, then Basic");
    assert_eq!(
        get(&good, &upstreams, &url, scope).await.unwrap().0,
        StatusCode::OK
    );
    assert_eq!(registry.requests().len(), 3, "Basic up front");

    // Wrong credentials: one retry, then the registry's 401.
    let wrong = creds("bot", "nope");
    let (status, _) = get(&wrong, &upstreams, &url, scope).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(registry.requests().len(), 5);
    let (status, _) = get(&wrong, &upstreams, &url, scope).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(registry.requests().len(), 6, "refused Basic is not retried");
}

#[test]
fn debug_output_has_no_secrets() {
    let c = creds("bot", "s3cret-pw");
    c.tokens.lock().unwrap().insert(
        "s".into(),
        Token {
            header: HeaderValue::from_static("Bearer tok-secret"),
            until: Instant::now() + Duration::from_secs(60),
        },
    );
    let shown = format!("{c:?}");
    assert!(
        shown.contains("reg.test") && shown.contains("bot"),
        "{shown}"
    );
    let encoded = base64::engine::general_purpose::STANDARD.encode("bot:s3cret-pw");
    for secret in ["s3cret-pw", encoded.as_str(), "tok-secret"] {
        assert!(!shown.contains(secret), "{shown}");
    }
    assert!(c.basic.is_sensitive());
}

#[test]
fn file_errors_name_the_registry_the_file_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, Option<&str>, &str); 4] = [
        ("missing.json", None, "No such file"),
        (
            "not-json.json",
            Some("username=bot password=hunter2"),
            "not JSON",
        ),
        (
            "unknown.json",
            Some(r#"{"username":"bot","password":"hunter2","registry":"x"}"#),
            "registry",
        ),
        (
            "no-password.json",
            Some(r#"{"username":"bot"}"#),
            "password",
        ),
    ];
    for (name, content, needle) in cases {
        let path = dir.path().join(name);
        if let Some(c) = content {
            std::fs::write(&path, c).unwrap();
        }
        let err = RegistryCredentials::load("quay.io", &path).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("quay.io"), "{text}");
        assert!(text.contains(&*path.to_string_lossy()), "{text}");
        assert!(text.contains(needle), "{name}: {text}");
        assert!(!text.contains("hunter2"), "{text}");
    }
    let ok = dir.path().join("ok.json");
    std::fs::write(&ok, r#"{"username":"bot","password":"hunter2"}"#).unwrap();
    let c = RegistryCredentials::load("quay.io", &ok).unwrap();
    assert_eq!(c.file, ok);
    assert_eq!(c, RegistryCredentials::load("quay.io", &ok).unwrap());
    assert_ne!(c.fingerprint(), creds("bot", "other").fingerprint());
}

/// A realm on a host that is neither the upstream's nor one of its
/// `authHosts` never gets the password, even where the egress rules would
/// let the proxy connect there (`allowPrivateNetworks`).
#[tokio::test]
async fn credentials_go_only_to_the_upstream_and_its_auth_hosts() {
    let s = bearer_setup(Some(300)).await;
    let config = ProxyConfig::from_yaml(&format!(
        "upstreamTimeouts: {{connect: 3s, read: 10s}}\n\
         resolve: {{auth.test: 127.0.0.1}}\n\
         registries:\n  - host: reg.test\n    upstream: \"http://{}\"\n    \
         allowPrivateNetworks: true\n",
        s.registry.addr()
    ))
    .unwrap();
    let upstreams = Upstreams::new(&config).unwrap();
    let creds = creds("bot", "pw");
    let url = format!("http://{}/v2/team/app/manifests/v1", s.registry.addr());
    let err = get(&creds, &upstreams, &url, Some("repository:team/app:pull"))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, UpstreamError::Token { .. }), "{text}");
    assert!(
        text.contains("authHosts") && text.contains("auth.test"),
        "{text}"
    );
    assert!(s.realm.requests().is_empty(), "the realm was asked");
}

/// Tokens are kept per scope, and clients choose scopes (any repository
/// name): past `MAX_TOKENS` fresh tokens the oldest are dropped, so the
/// cache cannot grow with a flood of invented names.
#[tokio::test]
async fn the_token_cache_is_capped() {
    let s = bearer_setup(Some(300)).await;
    let creds = creds("bot", "pw");
    let client = s.upstreams.client("reg.test").unwrap();
    let challenge = Challenge {
        realm: format!("http://auth.test:{}/token", s.realm.addr().port()),
        service: Some("reg.test".into()),
        scope: None,
    };
    for i in 0..MAX_TOKENS + 50 {
        let scope = format!("repository:flood/{i}:pull");
        let got = creds
            .fetch_token(client, &challenge, &scope, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(got.is_some());
    }
    let kept = creds.tokens.lock().unwrap().len();
    assert_eq!(kept, MAX_TOKENS);
    let (sent, _) = creds.up_front(&format!("repository:flood/{}:pull", MAX_TOKENS + 49));
    assert_eq!(sent, Sent::Bearer, "the newest token is kept");
    assert_eq!(creds.up_front("repository:flood/0:pull").0, Sent::Nothing);
}

/// Credentials whose token requests for new scopes are limited to
/// `burst` at once and one a minute after that.
mod flood;

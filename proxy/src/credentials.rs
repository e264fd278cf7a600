//! Per-registry upstream credentials (`credentialsFile`).
//!
//! A cluster admin who gives a registry credentials makes its content
//! available to every client of the proxy. For a client request that
//! carries no `Authorization`, the proxy authenticates to the upstream
//! itself, the way `docker login` + pull would: on
//! `401 WWW-Authenticate: Basic` it retries with Basic credentials; on
//! `Bearer realm="…",service="…",scope="…"` it GETs a token from the realm
//! with Basic credentials and retries with the token. Tokens are kept per
//! scope until shortly before they expire and sent up front (as is Basic,
//! once the registry asked for it), so a pull costs one token request per
//! repository rather than a 401 round trip per request.
//!
//! Credentials go only to the registry's own origin and to the realm its
//! challenge names (https, unless the upstream itself is plain http) —
//! never across a redirect to another host ([`UpstreamClient::send`] drops
//! `Authorization` there), and never into a log (`Debug` is written by
//! hand, header values are marked sensitive).
//!
//! A [`RegistryCredentials`] belongs to one config snapshot: a reload that
//! changes the credentials builds a new one, so tokens fetched with the old
//! credentials are dropped with it (see `config::watch`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode, Uri};
use http_body_util::BodyExt;
use pullthrough_api::config::{CredentialsError, UpstreamCredentials};

use crate::auth::{Challenge, parse_bearer};
use crate::upstream::{UpstreamClient, UpstreamError, UpstreamResponse};

/// Largest token response read.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;

/// Token lifetime when the realm does not say (the distribution token spec).
const DEFAULT_TOKEN_LIFE: Duration = Duration::from_secs(60);

/// A token is renewed this long before it expires (at most a fifth of its
/// life), so a request never leaves with a token that expires in flight.
const RENEW_MARGIN: Duration = Duration::from_secs(10);

/// Cached tokens kept before expired ones are swept out.
const MAX_TOKENS: usize = 1000;

/// A `credentialsFile` that cannot be used, naming the registry and the
/// file (and the field, never a value).
#[derive(Debug, thiserror::Error)]
pub enum CredentialsFileError {
    #[error("cannot read credentialsFile {path} of registry {registry}: {source}")]
    Read {
        registry: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("credentialsFile {path} of registry {registry}: {source}")]
    Invalid {
        registry: String,
        path: PathBuf,
        #[source]
        source: CredentialsError,
    },
}

/// Reads and parses a `credentialsFile`.
pub fn read_file(registry: &str, path: &Path) -> Result<UpstreamCredentials, CredentialsFileError> {
    let bytes = std::fs::read(path).map_err(|source| CredentialsFileError::Read {
        registry: registry.to_string(),
        path: path.to_path_buf(),
        source,
    })?;
    UpstreamCredentials::from_json(&bytes).map_err(|source| CredentialsFileError::Invalid {
        registry: registry.to_string(),
        path: path.to_path_buf(),
        source,
    })
}

/// One registry's credentials and what the proxy learnt using them: the
/// Bearer tokens per scope, and whether the registry wants Basic.
pub struct RegistryCredentials {
    registry: String,
    file: PathBuf,
    credentials: UpstreamCredentials,
    /// `Basic base64(username:password)`, marked sensitive.
    basic: HeaderValue,
    /// sha256 of `basic`: tells apart grants learnt with other credentials.
    fingerprint: String,
    /// The registry answered with a Basic challenge: send Basic up front.
    wants_basic: AtomicBool,
    /// Bearer tokens by scope (`""` for requests without a repository).
    tokens: Mutex<HashMap<String, Token>>,
}

struct Token {
    /// `Bearer <token>`, marked sensitive.
    header: HeaderValue,
    until: Instant,
}

impl std::fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password, the Basic header or a token.
        f.debug_struct("RegistryCredentials")
            .field("registry", &self.registry)
            .field("file", &self.file)
            .field("username", &self.credentials.username)
            .finish_non_exhaustive()
    }
}

/// Equal when built from the same file content for the same registry: what
/// a reload compares to decide whether learnt tokens may be kept.
impl PartialEq for RegistryCredentials {
    fn eq(&self, other: &Self) -> bool {
        self.registry == other.registry
            && self.file == other.file
            && self.credentials == other.credentials
    }
}

/// What went up front with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    Nothing,
    Basic,
    Bearer,
}

/// The challenge of a 401 the proxy can answer.
enum Wanted {
    Basic,
    Bearer(Challenge),
}

#[derive(serde::Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

impl RegistryCredentials {
    /// Reads `path` for `registry`.
    pub fn load(registry: &str, path: &Path) -> Result<Self, CredentialsFileError> {
        let credentials = read_file(registry, path)?;
        Ok(Self::new(registry, path, credentials))
    }

    pub fn new(registry: &str, file: &Path, credentials: UpstreamCredentials) -> Self {
        use sha2::Digest as _;
        let encoded = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", credentials.username, credentials.password));
        // Base64 output is always a valid header value.
        let mut basic = HeaderValue::from_str(&format!("Basic {encoded}"))
            .unwrap_or_else(|_| HeaderValue::from_static("Basic"));
        basic.set_sensitive(true);
        let fingerprint = hex::encode(sha2::Sha256::digest(basic.as_bytes()));
        Self {
            registry: registry.to_string(),
            file: file.to_path_buf(),
            credentials,
            basic,
            fingerprint,
            wants_basic: AtomicBool::new(false),
            tokens: Mutex::new(HashMap::new()),
        }
    }

    /// A stable, non-reversible name of these credentials: content the
    /// upstream served with them is readable "as the proxy serves anonymous
    /// clients" only while the same credentials are configured.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Sends `method url` with `headers` (which carry no `Authorization`)
    /// to the registry, authenticated with these credentials: a cached
    /// token for `scope`, or Basic once the registry asked for it, up
    /// front; on a 401 Basic or Bearer challenge one retry with Basic or a
    /// token fetched from the challenge's realm.
    ///
    /// When the registry or the realm refuses the credentials the
    /// registry's 401 (with its challenge) is returned as is, so a client
    /// learns that it must authenticate itself. A token exchange that fails
    /// otherwise (realm unreachable, not https, a 5xx, no token in the
    /// answer) is an [`UpstreamError::Token`].
    #[tracing::instrument(level = "debug", skip_all, fields(registry = %self.registry, %method, scope))]
    pub async fn send(
        &self,
        client: &UpstreamClient,
        method: Method,
        url: Uri,
        headers: HeaderMap,
        scope: Option<&str>,
        timeout: Duration,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let key = scope.unwrap_or_default();
        tracing::Span::current().record("scope", key);
        let (sent, up_front) = self.up_front(key);
        let resp = client
            .send(method.clone(), url.clone(), with_auth(&headers, up_front))
            .await?;
        if resp.response.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let retry_with = match wanted(resp.response.headers()) {
            None => return Ok(resp),
            Some(Wanted::Basic) => {
                if sent == Sent::Basic {
                    self.refused("the registry");
                    return Ok(resp);
                }
                self.wants_basic.store(true, Ordering::Relaxed);
                self.basic.clone()
            }
            Some(Wanted::Bearer(challenge)) => {
                self.wants_basic.store(false, Ordering::Relaxed);
                if sent == Sent::Bearer {
                    // Revoked or expired early: never offer it again.
                    self.forget(key);
                }
                match self
                    .fetch_token(client, &url, &challenge, key, timeout)
                    .await?
                {
                    Some(token) => token,
                    None => {
                        self.refused("the token realm");
                        return Ok(resp);
                    }
                }
            }
        };
        client.discard(resp.response).await;
        client
            .send(method, url, with_auth(&headers, Some(retry_with)))
            .await
    }

    fn refused(&self, by: &str) {
        tracing::warn!(
            registry = %self.registry,
            file = %self.file.display(),
            "{by} refused the credentials of credentialsFile; relaying the upstream's 401"
        );
    }

    /// What to send before any challenge: a fresh token for `scope`, else
    /// Basic if the registry asked for Basic before.
    fn up_front(&self, scope: &str) -> (Sent, Option<HeaderValue>) {
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = tokens.get(scope).filter(|t| Instant::now() < t.until) {
            return (Sent::Bearer, Some(t.header.clone()));
        }
        if self.wants_basic.load(Ordering::Relaxed) {
            return (Sent::Basic, Some(self.basic.clone()));
        }
        (Sent::Nothing, None)
    }

    fn forget(&self, scope: &str) {
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        tokens.remove(scope);
    }

    /// GETs a token from the challenge's realm with Basic credentials
    /// (`service` and `scope` as query parameters) and caches it for
    /// `key`. `None` when the realm refuses the credentials (401/403).
    #[tracing::instrument(skip_all, fields(registry = %self.registry, scope = key))]
    async fn fetch_token(
        &self,
        client: &UpstreamClient,
        upstream: &Uri,
        challenge: &Challenge,
        key: &str,
        timeout: Duration,
    ) -> Result<Option<HeaderValue>, UpstreamError> {
        let fail = |reason: String| UpstreamError::Token {
            registry: self.registry.clone(),
            realm: challenge.realm.clone(),
            reason,
        };
        let mut realm = url::Url::parse(&challenge.realm)
            .map_err(|e| fail(format!("the realm is not a URL: {e}")))?;
        // Plain http only where the registry itself is plain http (tests,
        // labs): the realm gets the password.
        let plain_ok = upstream.scheme_str() == Some("http");
        match realm.scheme() {
            "https" => {}
            "http" if plain_ok => {}
            other => {
                return Err(fail(format!(
                    "the realm is {other}://, and credentials are sent only over https \
                     (or http when the upstream itself is http)"
                )));
            }
        }
        let scope = challenge
            .scope
            .as_deref()
            .or(Some(key))
            .filter(|s| !s.is_empty());
        {
            let mut q = realm.query_pairs_mut();
            if let Some(service) = &challenge.service {
                q.append_pair("service", service);
            }
            if let Some(scope) = scope {
                q.append_pair("scope", scope);
            }
        }
        let uri: Uri = realm
            .as_str()
            .parse()
            .map_err(|e| fail(format!("the realm is not a usable URL: {e}")))?;
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, self.basic.clone());
        let exchange = async {
            let resp = client.send(Method::GET, uri, headers).await?;
            let status = resp.response.status();
            if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
                client.discard(resp.response).await;
                return Ok(None);
            }
            if status != StatusCode::OK {
                client.discard(resp.response).await;
                return Err(fail(format!("the realm answered {status}")));
            }
            let body = http_body_util::Limited::new(resp.response.into_body(), MAX_TOKEN_RESPONSE)
                .collect()
                .await
                .map_err(|e| fail(format!("reading the realm's answer: {e}")))?
                .to_bytes();
            // Not the parse error: it may quote the token.
            let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|_| {
                fail("the realm's answer is not JSON with `token` or `access_token`".into())
            })?;
            let token = parsed
                .token
                .or(parsed.access_token)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    fail("the realm's answer has no `token` or `access_token`".into())
                })?;
            let mut header = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| fail("the token has characters a header cannot carry".into()))?;
            header.set_sensitive(true);
            let life = parsed
                .expires_in
                .map_or(DEFAULT_TOKEN_LIFE, Duration::from_secs);
            Ok(Some((header, life)))
        };
        let got = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| fail(format!("no answer within {timeout:?}")))??;
        let Some((header, life)) = got else {
            return Ok(None);
        };
        let keep = life.saturating_sub(RENEW_MARGIN.min(life / 5));
        if !keep.is_zero() {
            let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
            if tokens.len() >= MAX_TOKENS {
                let now = Instant::now();
                tokens.retain(|_, t| now < t.until);
            }
            tokens.insert(
                key.to_string(),
                Token {
                    header: header.clone(),
                    until: Instant::now() + keep,
                },
            );
        }
        tracing::debug!(
            lifetime_secs = life.as_secs(),
            "fetched an upstream token with the configured credentials"
        );
        Ok(Some(header))
    }
}

/// The challenge to answer: Bearer if offered (it names the scope), else
/// Basic; None for anything else.
fn wanted(headers: &HeaderMap) -> Option<Wanted> {
    let values: Vec<&str> = headers
        .get_all(header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if let Some(challenge) = values.iter().find_map(|v| parse_bearer(v)) {
        return Some(Wanted::Bearer(challenge));
    }
    values
        .iter()
        .any(|v| {
            let scheme = v.trim().split([' ', ',']).next().unwrap_or_default();
            scheme.eq_ignore_ascii_case("basic")
        })
        .then_some(Wanted::Basic)
}

fn with_auth(headers: &HeaderMap, auth: Option<HeaderValue>) -> HeaderMap {
    let mut headers = headers.clone();
    if let Some(v) = auth {
        headers.insert(header::AUTHORIZATION, v);
    }
    headers
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    use bytes::Bytes;
    use http::Response;
    use http_body_util::Full;
    use pullthrough_api::config::ProxyConfig;

    use super::*;
    use crate::test_server::TestServer;
    use crate::upstream::Upstreams;

    fn respond(status: u16, headers: &[(&str, &str)], body: &str) -> Response<Full<Bytes>> {
        let mut b = Response::builder().status(status);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Full::new(Bytes::from(body.to_string()))).unwrap()
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

    /// A client for the registry at `upstream`, with `auth.test` and
    /// `blobs.test` pinned to loopback.
    fn client_for(upstream: &str) -> Upstreams {
        let config = ProxyConfig::from_yaml(&format!(
            "upstreamTimeouts: {{connect: 3s, read: 10s}}\n\
             resolve: {{auth.test: 127.0.0.1, blobs.test: 127.0.0.1}}\n\
             registries:\n  - host: reg.test\n    upstream: \"{upstream}\"\n"
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
        realm: TestServer,
        registry: TestServer,
        storage: TestServer,
        upstreams: Upstreams,
    }

    async fn bearer_setup(expires_in: Option<u64>) -> BearerSetup {
        let storage = TestServer::start(Ipv4Addr::LOCALHOST.into(), |_| {
            respond(200, &[], "blob bytes")
        })
        .await;
        let issued = Arc::new(AtomicUsize::new(0));
        let want = basic("bot", "pw");
        let realm = TestServer::start(Ipv4Addr::LOCALHOST.into(), move |s| {
            if s.auth() != Some(want.as_str()) {
                return respond(401, &[("www-authenticate", "Basic realm=\"auth\"")], "");
            }
            let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
            let body = match expires_in {
                Some(e) => format!(r#"{{"token":"tok-{n}","expires_in":{e}}}"#),
                None => format!(r#"{{"access_token":"tok-{n}"}}"#),
            };
            respond(200, &[("content-type", "application/json")], &body)
        })
        .await;
        let (realm_port, storage_port) = (realm.addr.port(), storage.addr.port());
        let registry = TestServer::start(Ipv4Addr::LOCALHOST.into(), move |s| {
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
            if s.path.contains("/blobs/") {
                let to = format!("http://blobs.test:{storage_port}/storage/abc");
                return respond(307, &[("location", &to)], "");
            }
            respond(200, &[], "manifest bytes")
        })
        .await;
        let upstreams = client_for(&format!("http://{}", registry.addr));
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
        let base = format!("http://{}", s.registry.addr);
        let manifest = format!("{base}/v2/team/app/manifests/v1");
        let blob = format!("{base}/v2/team/app/blobs/sha256:abc");
        let scope = Some("repository:team/app:pull");

        let (status, body) = get(&creds, &s.upstreams, &manifest, scope).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&body[..], b"manifest bytes");
        let tokens = s.realm.seen();
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
        assert_eq!(s.realm.seen().len(), 1);
        let at_registry = s.registry.seen();
        // 401, retry, 3 manifests, 1 blob.
        assert_eq!(at_registry.len(), 6, "{at_registry:#?}");
        assert_eq!(at_registry[0].auth(), None);
        for seen in &at_registry[1..] {
            assert_eq!(seen.auth(), Some("Bearer tok-1"), "{seen:?}");
        }

        // The redirect target (another origin) got no credentials at all.
        let at_storage = s.storage.seen();
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
        let tokens = s.realm.seen();
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
                .seen()
                .iter()
                .all(|r| !r.auth().unwrap_or_default().starts_with("Basic")),
        );
    }

    #[tokio::test]
    async fn bearer_tokens_are_refreshed_after_they_expire() {
        // access_token, expires_in 1 s: kept for 0.8 s.
        let s = bearer_setup(Some(1)).await;
        let creds = creds("bot", "pw");
        let manifest = format!("http://{}/v2/team/app/manifests/v1", s.registry.addr);
        let scope = Some("repository:team/app:pull");
        assert_eq!(
            get(&creds, &s.upstreams, &manifest, scope).await.unwrap().0,
            StatusCode::OK
        );
        assert_eq!(
            get(&creds, &s.upstreams, &manifest, scope).await.unwrap().0,
            StatusCode::OK
        );
        assert_eq!(s.realm.seen().len(), 1, "reused while fresh");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(
            get(&creds, &s.upstreams, &manifest, scope).await.unwrap().0,
            StatusCode::OK
        );
        assert_eq!(s.realm.seen().len(), 2, "refreshed after expiry");
        let last = s.registry.seen().pop().unwrap();
        assert_eq!(last.auth(), Some("Bearer tok-2"));

        // No expires_in: the default 60 s, so reused.
        let s = bearer_setup(None).await;
        for _ in 0..2 {
            assert_eq!(
                get(
                    &creds,
                    &s.upstreams,
                    &format!("http://{}/v2/a/manifests/1", s.registry.addr),
                    Some("repository:a:pull")
                )
                .await
                .unwrap()
                .0,
                StatusCode::OK
            );
        }
        assert_eq!(s.realm.seen().len(), 1);
    }

    #[tokio::test]
    async fn a_realm_refusing_the_credentials_relays_the_registry_401() {
        let s = bearer_setup(Some(300)).await;
        let wrong = creds("bot", "not-it");
        let manifest = format!("http://{}/v2/team/app/manifests/v1", s.registry.addr);
        let (status, _) = get(
            &wrong,
            &s.upstreams,
            &manifest,
            Some("repository:team/app:pull"),
        )
        .await
        .unwrap();
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(s.realm.seen().len(), 1);
        // Only the unauthenticated try: nothing to retry with.
        assert_eq!(s.registry.seen().len(), 1);
    }

    #[tokio::test]
    async fn token_exchange_failures_are_errors_naming_the_registry() {
        // A realm that fails.
        let realm =
            TestServer::start(Ipv4Addr::LOCALHOST.into(), |_| respond(500, &[], "down")).await;
        let realm_port = realm.addr.port();
        let registry = TestServer::start(Ipv4Addr::LOCALHOST.into(), move |_| {
            let c = format!(
                "Bearer realm=\"http://auth.test:{realm_port}/token\",service=\"reg.test\""
            );
            respond(401, &[("www-authenticate", &c)], "")
        })
        .await;
        let upstreams = client_for(&format!("http://{}", registry.addr));
        let creds = creds("bot", "pw");
        let err = get(
            &creds,
            &upstreams,
            &format!("http://{}/v2/", registry.addr),
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
        let before = realm.seen().len();
        let err = creds
            .fetch_token(
                upstreams.client("reg.test").unwrap(),
                &"https://reg.test/v2/".parse().unwrap(),
                &challenge,
                "",
                Duration::from_secs(5),
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("https"), "{err}");
        assert_eq!(realm.seen().len(), before, "the realm was contacted");
    }

    #[tokio::test]
    async fn basic_challenges_are_answered_then_basic_is_sent_up_front() {
        let want = basic("bot", "pw");
        let registry = TestServer::start(Ipv4Addr::LOCALHOST.into(), move |s| {
            if s.auth() == Some(want.as_str()) {
                respond(200, &[], "ok")
            } else {
                respond(401, &[("www-authenticate", "Basic realm=\"reg\"")], "")
            }
        })
        .await;
        let url = format!("http://{}/v2/team/app/manifests/v1", registry.addr);
        let upstreams = client_for(&format!("http://{}", registry.addr));
        let good = creds("bot", "pw");
        let scope = Some("repository:team/app:pull");
        assert_eq!(
            get(&good, &upstreams, &url, scope).await.unwrap().0,
            StatusCode::OK
        );
        assert_eq!(registry.seen().len(), 2, "401, then Basic");
        assert_eq!(
            get(&good, &upstreams, &url, scope).await.unwrap().0,
            StatusCode::OK
        );
        assert_eq!(registry.seen().len(), 3, "Basic up front");

        // Wrong credentials: one retry, then the registry's 401.
        let wrong = creds("bot", "nope");
        let (status, _) = get(&wrong, &upstreams, &url, scope).await.unwrap();
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(registry.seen().len(), 5);
        let (status, _) = get(&wrong, &upstreams, &url, scope).await.unwrap();
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(registry.seen().len(), 6, "refused Basic is not retried");
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
}

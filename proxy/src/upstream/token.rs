//! Bearer tokens from a registry's token realm: the challenge that names
//! the realm, the one fetcher that asks it, and the anonymous tokens the
//! proxy keeps for clients that bring no credentials.
//!
//! In mirror mode a client talks to many upstreams through one name and
//! cannot follow each upstream's token realm (the proxy answers its own
//! `/v2/` ping). When such a client sends no Authorization and the upstream
//! answers with a Bearer challenge, the proxy fetches an anonymous token
//! from the challenge's realm itself and retries ([`AnonymousTokens`]).
//! This grants exactly what anonymous access grants; clients that send
//! credentials get their requests relayed untouched. A registry's
//! `credentialsFile` uses the same fetcher with Basic credentials (see
//! [`super::credentials`]).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode, Uri};
use http_body_util::BodyExt;

use super::{UpstreamClient, UpstreamError};
use crate::bounded::BoundedMap;

/// Largest token response read.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;

/// Longest `expires_in` believed: callers add it to `Instant::now()`,
/// which panics on overflow, and a realm may send any u64 (up to
/// 18446744073709551615). No registry issues tokens for longer than a day.
pub const MAX_TOKEN_LIFE_SECS: u64 = 24 * 3600;

/// A parsed `WWW-Authenticate: Bearer ...` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub realm: String,
    pub service: Option<String>,
    pub scope: Option<String>,
}

/// Parses a Bearer challenge (`Bearer realm="...",service="...",scope="..."`);
/// quoted values may contain commas.
pub fn parse_bearer(value: &str) -> Option<Challenge> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut val = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => val.extend(chars.next()),
                    '"' => break,
                    c => val.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek() {
                if *c == ',' {
                    break;
                }
                val.push(*c);
                chars.next();
            }
        }
        params.insert(key.trim().to_ascii_lowercase(), val.trim().to_string());
    }
    Some(Challenge {
        realm: params.remove("realm")?,
        service: params.remove("service"),
        scope: params.remove("scope"),
    })
}

/// What a realm answers (the distribution token spec; `access_token` is
/// the OAuth2 spelling some registries use instead).
#[derive(serde::Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// A token a realm issued, as it came.
#[derive(Debug)]
pub struct IssuedToken {
    /// `token`, else `access_token`; may be empty if the realm sent that.
    pub token: String,
    /// Seconds, when the realm said.
    pub expires_in: Option<u64>,
}

/// What to ask a realm for.
#[derive(Debug, Clone, Copy)]
pub struct TokenRequest<'a> {
    pub challenge: &'a Challenge,
    /// Sent as `scope` when not empty.
    pub scope: Option<&'a str>,
    /// Sent to the realm (Basic credentials), if any.
    pub authorization: Option<&'a HeaderValue>,
    /// Whether an `http://` realm may be asked (else https only).
    pub allow_http: bool,
    /// Bound on the whole exchange.
    pub timeout: Duration,
}

/// Why no token came back. Messages never quote the realm's answer: it
/// may hold a token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the realm is not a URL: {0}")]
    RealmNotUrl(#[source] url::ParseError),
    #[error(
        "the realm is {scheme}://, and credentials are sent only over https \
         (or http when the upstream itself is http)"
    )]
    Scheme { scheme: String },
    #[error("the realm is not a usable URL: {0}")]
    RealmUnusable(#[source] http::uri::InvalidUri),
    /// The realm could not be reached; the upstream error says why.
    #[error(transparent)]
    Send(UpstreamError),
    /// 401 or 403: the realm does not give this caller a token.
    #[error("the realm refused ({status})")]
    Refused { status: StatusCode },
    #[error("the realm answered {status}")]
    Status { status: StatusCode },
    #[error("reading the realm's answer: {reason}")]
    Read { reason: String },
    #[error("the realm's answer is not JSON with `token` or `access_token`")]
    NotJson,
    #[error("the realm's answer has no `token` or `access_token`")]
    NoToken,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// GETs a token from the challenge's realm through the registry's client
/// (`service` and `scope` as query parameters). The one place a realm is
/// asked: anonymous tokens and `credentialsFile` tokens differ only in
/// what they send and how long they keep the answer.
pub async fn fetch(
    client: &UpstreamClient,
    request: TokenRequest<'_>,
) -> Result<IssuedToken, TokenError> {
    let challenge = request.challenge;
    let mut realm = url::Url::parse(&challenge.realm).map_err(TokenError::RealmNotUrl)?;
    match realm.scheme() {
        "https" => {}
        "http" if request.allow_http => {}
        other => {
            return Err(TokenError::Scheme {
                scheme: other.to_string(),
            });
        }
    }
    {
        let mut q = realm.query_pairs_mut();
        if let Some(service) = &challenge.service {
            q.append_pair("service", service);
        }
        if let Some(scope) = request.scope.filter(|s| !s.is_empty()) {
            q.append_pair("scope", scope);
        }
    }
    let uri: Uri = realm.as_str().parse().map_err(TokenError::RealmUnusable)?;
    let mut headers = HeaderMap::new();
    if let Some(auth) = request.authorization {
        headers.insert(header::AUTHORIZATION, auth.clone());
    }
    let exchange = async {
        let resp = client
            .send(Method::GET, uri, headers)
            .await
            .map_err(TokenError::Send)?;
        let status = resp.response.status();
        if status != StatusCode::OK {
            client.discard(resp.response).await;
            return Err(
                if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
                    TokenError::Refused { status }
                } else {
                    TokenError::Status { status }
                },
            );
        }
        let body = http_body_util::Limited::new(resp.response.into_body(), MAX_TOKEN_RESPONSE)
            .collect()
            .await
            .map_err(|e| TokenError::Read {
                reason: e.to_string(),
            })?
            .to_bytes();
        // Not the parse error: it may quote the token.
        let parsed: TokenResponse =
            serde_json::from_slice(&body).map_err(|_| TokenError::NotJson)?;
        let token = parsed
            .token
            .or(parsed.access_token)
            .ok_or(TokenError::NoToken)?;
        Ok(IssuedToken {
            token,
            expires_in: parsed.expires_in.map(|s| s.min(MAX_TOKEN_LIFE_SECS)),
        })
    };
    tokio::time::timeout(request.timeout, exchange)
        .await
        .map_err(|_| TokenError::Timeout(request.timeout))?
}

/// Anonymous tokens kept at most: one per (registry, scope), and a client
/// chooses the scope (any repository name), so the map must not grow with
/// what clients invent. Past this the oldest go first.
pub const MAX_ANONYMOUS_TOKENS: usize = 10_000;

/// Anonymous tokens per (registry, scope), kept until shortly before they
/// expire, at most [`MAX_ANONYMOUS_TOKENS`] of them.
#[derive(Debug)]
pub struct AnonymousTokens {
    tokens: Mutex<BoundedMap<(String, String), (String, Instant)>>,
}

impl Default for AnonymousTokens {
    fn default() -> Self {
        Self::with_capacity(MAX_ANONYMOUS_TOKENS)
    }
}

impl AnonymousTokens {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            tokens: Mutex::new(BoundedMap::new(capacity)),
        }
    }

    pub fn get(&self, registry: &str, scope: &str) -> Option<String> {
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        tokens
            .get(&(registry.to_string(), scope.to_string()))
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(t, _)| t.clone())
    }

    /// How many tokens are kept (expired ones included until evicted).
    pub fn len(&self) -> usize {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fetches an anonymous token for `challenge` from its realm through
    /// the registry's upstream client. `Ok(None)` (logged) when the realm
    /// refuses, or is not one to follow: the registry's 401 stands. An
    /// error when the realm fails (unreachable, `429`, `5xx`, no answer, an
    /// answer without a token): an outage, not a refusal of the client, so
    /// cached content keeps serving as through any upstream outage.
    pub async fn fetch(
        &self,
        client: &UpstreamClient,
        registry: &str,
        challenge: &Challenge,
        default_scope: Option<&str>,
        timeout: Duration,
    ) -> Result<Option<String>, UpstreamError> {
        let scope = challenge
            .scope
            .as_deref()
            .or(default_scope)
            .unwrap_or_default();
        let request = TokenRequest {
            challenge,
            scope: Some(scope),
            authorization: None,
            // No password goes along, but a token fetched over http from an
            // https upstream's realm could be swapped on the way: the realm
            // is http only where the upstream itself is.
            allow_http: client.is_plain_http(),
            timeout,
        };
        let failed = |reason: String| UpstreamError::AnonymousToken {
            registry: registry.to_string(),
            realm: super::redact_str(&challenge.realm),
            reason,
        };
        let issued = match fetch(client, request).await {
            Ok(issued) if !issued.token.is_empty() => issued,
            Ok(_) => return Err(failed(TokenError::NoToken.to_string())),
            Err(TokenError::Scheme { scheme }) => {
                tracing::warn!(registry, realm = %super::redact_str(&challenge.realm), scheme,
                    "token realm is not https (nor http on an http upstream); not following it");
                return Ok(None);
            }
            Err(TokenError::Send(
                err @ (UpstreamError::Refused { .. } | UpstreamError::Downgrade { .. }),
            )) => {
                // The egress rules, or an https → http redirect: policy,
                // nothing to wait out.
                tracing::warn!(registry, error = %err, "not fetching an anonymous token");
                return Ok(None);
            }
            Err(TokenError::Send(err)) => {
                tracing::warn!(registry, error = %err, "cannot fetch an anonymous token");
                return Err(err);
            }
            Err(TokenError::Status { status }) if crate::pipeline::is_outage(status) => {
                return Err(failed(format!("the realm answered {status}")));
            }
            Err(TokenError::Refused { status } | TokenError::Status { status }) => {
                tracing::info!(
                    registry,
                    status = status.as_u16(),
                    "anonymous token refused by the realm"
                );
                return Ok(None);
            }
            Err(err @ (TokenError::RealmNotUrl(_) | TokenError::RealmUnusable(_))) => {
                tracing::warn!(registry, error = %err, "not following the token realm");
                return Ok(None);
            }
            Err(err) => return Err(failed(err.to_string())),
        };
        // Registries default to 60 s; renew 10 s early.
        let life = Duration::from_secs(issued.expires_in.unwrap_or(60).saturating_sub(10).max(10));
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                (registry.to_string(), scope.to_string()),
                (issued.token.clone(), Instant::now() + life),
            );
        tracing::debug!(registry, scope, "fetched anonymous upstream token");
        Ok(Some(issued.token))
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use bytes::Bytes;
    use http::Response;
    use pullthrough_api::config::ProxyConfig;

    use super::*;
    use crate::test_util::routed;
    use crate::upstream::Upstreams;

    fn respond(status: u16, body: &str) -> Response<Bytes> {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Bytes::from(body.to_string()))
            .unwrap()
    }

    fn upstreams() -> Upstreams {
        let config = ProxyConfig::from_yaml(
            "upstreamTimeouts: {connect: 3s, read: 10s}\n\
             registries:\n  - host: reg.test\n    upstream: \"http://127.0.0.1:1\"\n",
        )
        .unwrap();
        Upstreams::new(&config).unwrap()
    }

    fn challenge(realm: String) -> Challenge {
        Challenge {
            realm,
            service: Some("reg.test".into()),
            scope: None,
        }
    }

    #[tokio::test]
    async fn anonymous_tokens_are_fetched_without_credentials_and_kept_per_scope() {
        let realm = routed(Ipv4Addr::LOCALHOST.into(), |s| {
            if s.auth().is_some() {
                return respond(400, "{}");
            }
            respond(200, r#"{"token":"anon-1","expires_in":300}"#)
        });
        let upstreams = upstreams();
        let client = upstreams.client("reg.test").unwrap();
        let tokens = AnonymousTokens::default();
        let c = challenge(format!("http://{}/token", realm.addr()));
        let scope = "repository:library/busybox:pull";
        let got = tokens
            .fetch(client, "reg.test", &c, Some(scope), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(got.as_deref(), Some("anon-1"));
        assert_eq!(tokens.get("reg.test", scope).as_deref(), Some("anon-1"));
        assert_eq!(tokens.get("reg.test", "repository:other:pull"), None);
        let seen = realm.requests();
        assert_eq!(seen.len(), 1);
        assert!(
            seen[0].path.contains("service=reg.test"),
            "{}",
            seen[0].path
        );
        assert!(
            seen[0]
                .path
                .contains("scope=repository%3Alibrary%2Fbusybox%3Apull"),
            "{}",
            seen[0].path
        );
    }

    #[tokio::test]
    async fn refused_or_unusable_realms_give_no_anonymous_token() {
        let realm = routed(Ipv4Addr::LOCALHOST.into(), |_| respond(401, "{}"));
        let upstreams = upstreams();
        let client = upstreams.client("reg.test").unwrap();
        let tokens = AnonymousTokens::default();
        let timeout = Duration::from_secs(5);
        let refused = challenge(format!("http://{}/token", realm.addr()));
        assert_eq!(
            tokens
                .fetch(client, "reg.test", &refused, None, timeout)
                .await
                .unwrap(),
            None
        );
        let not_http = challenge(format!("ftp://{}/token", realm.addr()));
        assert_eq!(
            tokens
                .fetch(client, "reg.test", &not_http, None, timeout)
                .await
                .unwrap(),
            None
        );
        assert_eq!(realm.requests().len(), 1, "the ftp realm was not followed");
    }

    /// A realm that fails (429, 5xx, an answer without a token) is an
    /// outage, not a refusal: an error, so that cached content keeps
    /// serving, where a refusal (401/403) relays the registry's 401.
    #[tokio::test]
    async fn a_failing_realm_is_an_outage_not_a_refusal() {
        let upstreams = upstreams();
        let client = upstreams.client("reg.test").unwrap();
        let tokens = AnonymousTokens::default();
        let timeout = Duration::from_secs(5);
        for (status, body) in [(503, "down"), (429, "slow down"), (200, r#"{"nope":1}"#)] {
            let realm = routed(Ipv4Addr::LOCALHOST.into(), move |_| respond(status, body));
            let c = challenge(format!("http://{}/token", realm.addr()));
            let err = tokens
                .fetch(client, "reg.test", &c, None, timeout)
                .await
                .unwrap_err();
            assert!(
                matches!(err, UpstreamError::AnonymousToken { .. }),
                "{status}: {err}"
            );
        }
        for status in [401, 403] {
            let realm = routed(Ipv4Addr::LOCALHOST.into(), move |_| respond(status, "{}"));
            let c = challenge(format!("http://{}/token", realm.addr()));
            let got = tokens.fetch(client, "reg.test", &c, None, timeout).await;
            assert_eq!(got.unwrap(), None, "{status}");
        }
    }

    /// An https upstream's challenge naming an http realm: no anonymous
    /// token is fetched over plain http (it could be swapped on the way).
    #[tokio::test]
    async fn an_https_upstream_gets_no_anonymous_token_from_an_http_realm() {
        let realm = routed(Ipv4Addr::LOCALHOST.into(), |_| {
            respond(200, r#"{"token":"anon-1","expires_in":300}"#)
        });
        let config = ProxyConfig::from_yaml(&format!(
            "upstreamTimeouts: {{connect: 3s, read: 10s}}\n\
             registries:\n  - host: reg.test\n    upstream: \"https://127.0.0.1:1\"\n    \
             authHosts: [\"{}\"]\n",
            realm.addr().ip()
        ))
        .unwrap();
        let upstreams = Upstreams::new(&config).unwrap();
        let client = upstreams.client("reg.test").unwrap();
        let tokens = AnonymousTokens::default();
        let c = challenge(format!("http://{}/token", realm.addr()));
        let got = tokens
            .fetch(client, "reg.test", &c, None, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(got, None);
        assert!(realm.requests().is_empty(), "the http realm was asked");
    }

    /// A realm may answer any u64 as `expires_in`; adding it to the clock
    /// used to panic the request's task.
    #[tokio::test]
    async fn an_expires_in_of_u64_max_is_clamped_not_a_panic() {
        let realm = routed(Ipv4Addr::LOCALHOST.into(), |_| {
            respond(
                200,
                r#"{"token":"anon-max","expires_in":18446744073709551615}"#,
            )
        });
        let upstreams = upstreams();
        let client = upstreams.client("reg.test").unwrap();
        let c = challenge(format!("http://{}/token", realm.addr()));
        let tokens = AnonymousTokens::default();
        let scope = "repository:a:pull";
        let got = tokens
            .fetch(client, "reg.test", &c, Some(scope), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(got.as_deref(), Some("anon-max"));
        assert_eq!(tokens.get("reg.test", scope).as_deref(), Some("anon-max"));
        // The clamp is in `fetch`, so the configured-credentials path
        // (`credentials.rs`) gets a bounded life too.
        let issued = fetch(
            client,
            TokenRequest {
                challenge: &c,
                scope: None,
                authorization: None,
                allow_http: true,
                timeout: Duration::from_secs(5),
            },
        )
        .await
        .unwrap();
        assert_eq!(issued.expires_in, Some(MAX_TOKEN_LIFE_SECS));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]

        /// Any header value, huge or malformed, parses or is refused;
        /// never a panic.
        #[test]
        fn any_www_authenticate_value_is_parsed_without_panic(value in "\\PC{0,2048}") {
            let _ = parse_bearer(&value);
        }

        #[test]
        fn challenge_shaped_values_are_parsed_without_panic(
            scheme in "(Bearer|bearer|BEARER|Basic|)",
            params in proptest::collection::vec(
                ("[a-zA-Z ]{0,8}", "[=\"\\\\, a-z:/.]{0,40}"),
                0..8,
            ),
        ) {
            let mut value = format!("{scheme} ");
            for (k, v) in &params {
                value.push_str(&format!("{k}={v},"));
            }
            let _ = parse_bearer(&value);
        }

        /// What a registry sends round-trips.
        #[test]
        fn well_formed_challenges_round_trip(
            realm in "https://[a-z0-9.]{1,20}(:[0-9]{1,5})?/[a-z/]{0,20}",
            service in proptest::option::of("[a-zA-Z0-9.:-]{1,30}"),
            scope in proptest::option::of("repository:[a-z0-9/]{1,20}:(pull|pull,push)"),
            space in "( |)",
        ) {
            let mut value = format!("Bearer realm=\"{realm}\"");
            if let Some(s) = &service {
                value.push_str(&format!(",{space}service=\"{s}\""));
            }
            if let Some(s) = &scope {
                value.push_str(&format!(",{space}scope=\"{s}\""));
            }
            let c = parse_bearer(&value).unwrap();
            proptest::prop_assert_eq!(c, Challenge { realm, service, scope });
        }
    }

    #[test]
    fn parses_bearer_challenges() {
        let c = parse_bearer(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull,push""#,
        )
        .unwrap();
        assert_eq!(c.realm, "https://auth.docker.io/token");
        assert_eq!(c.service.as_deref(), Some("registry.docker.io"));
        assert_eq!(
            c.scope.as_deref(),
            Some("repository:library/busybox:pull,push")
        );
        let c = parse_bearer(r#"bearer realm="https://ghcr.io/token", service="ghcr.io""#).unwrap();
        assert_eq!(c.service.as_deref(), Some("ghcr.io"));
        assert_eq!(c.scope, None);
        assert_eq!(parse_bearer(r#"Basic realm="x""#), None);
        assert_eq!(parse_bearer(r#"Bearer service="x""#), None);
    }

    #[test]
    fn anonymous_tokens_are_capped() {
        let t = AnonymousTokens::with_capacity(100);
        let until = Instant::now() + Duration::from_secs(60);
        for i in 0..100_000 {
            t.tokens.lock().unwrap().insert(
                ("r".into(), format!("repository:flood/{i}:pull")),
                ("tok".into(), until),
            );
        }
        assert_eq!(t.len(), 100);
        assert_eq!(
            t.get("r", "repository:flood/99999:pull").as_deref(),
            Some("tok")
        );
        assert_eq!(t.get("r", "repository:flood/0:pull"), None);
    }

    #[test]
    fn tokens_expire() {
        let t = AnonymousTokens::default();
        t.tokens.lock().unwrap().insert(
            ("r".into(), "s".into()),
            ("tok".into(), Instant::now() + Duration::from_secs(5)),
        );
        assert_eq!(t.get("r", "s").as_deref(), Some("tok"));
        t.tokens
            .lock()
            .unwrap()
            .insert(("r".into(), "s".into()), ("tok".into(), Instant::now()));
        assert_eq!(t.get("r", "s"), None);
    }
}

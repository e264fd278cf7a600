//! Anonymous upstream tokens for clients that bring no credentials.
//!
//! In mirror mode a client talks to many upstreams through one name and
//! cannot follow each upstream's token realm (the proxy answers its own
//! `/v2/` ping). When such a client sends no Authorization and the upstream
//! answers with a Bearer challenge, the proxy fetches an anonymous token
//! from the challenge's realm itself and retries. This grants exactly what
//! anonymous access grants; clients that send credentials get their
//! requests relayed untouched.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{HeaderMap, Method, StatusCode};
use http_body_util::BodyExt;

use crate::upstream::UpstreamClient;

/// Largest token response read.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;

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

#[derive(serde::Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// Anonymous tokens per (registry, scope), kept until shortly before they
/// expire.
#[derive(Debug, Default)]
pub struct AnonymousTokens {
    tokens: Mutex<HashMap<(String, String), (String, Instant)>>,
}

impl AnonymousTokens {
    pub fn get(&self, registry: &str, scope: &str) -> Option<String> {
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        tokens
            .get(&(registry.to_string(), scope.to_string()))
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(t, _)| t.clone())
    }

    /// Fetches an anonymous token for `challenge` from its realm through
    /// the registry's upstream client; None (logged) when the realm refuses.
    pub async fn fetch(
        &self,
        client: &UpstreamClient,
        registry: &str,
        challenge: &Challenge,
        default_scope: Option<&str>,
        timeout: Duration,
    ) -> Option<String> {
        let scope = challenge
            .scope
            .as_deref()
            .or(default_scope)
            .unwrap_or_default();
        let mut url = url::Url::parse(&challenge.realm).ok()?;
        if !matches!(url.scheme(), "http" | "https") {
            tracing::warn!(registry, realm = %challenge.realm, "token realm is not http(s); not following it");
            return None;
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(service) = &challenge.service {
                q.append_pair("service", service);
            }
            if !scope.is_empty() {
                q.append_pair("scope", scope);
            }
        }
        let uri: http::Uri = url.as_str().parse().ok()?;
        let fetch = async {
            let resp = client.send(Method::GET, uri, HeaderMap::new()).await.ok()?;
            if resp.response.status() != StatusCode::OK {
                tracing::info!(
                    registry,
                    status = resp.response.status().as_u16(),
                    "anonymous token refused by the realm"
                );
                return None;
            }
            let body = http_body_util::Limited::new(resp.response.into_body(), MAX_TOKEN_RESPONSE)
                .collect()
                .await
                .ok()?
                .to_bytes();
            let parsed: TokenResponse = serde_json::from_slice(&body).ok()?;
            let token = parsed.token.or(parsed.access_token)?;
            // Registries default to 60 s; renew 10 s early.
            let life =
                Duration::from_secs(parsed.expires_in.unwrap_or(60).saturating_sub(10).max(10));
            Some((token, life))
        };
        let (token, life) = tokio::time::timeout(timeout, fetch).await.ok()??;
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                (registry.to_string(), scope.to_string()),
                (token.clone(), Instant::now() + life),
            );
        tracing::debug!(registry, scope, "fetched anonymous upstream token");
        Some(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

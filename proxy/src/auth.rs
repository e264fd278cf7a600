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

/// How long "anyone may read this repository" is trusted. Public content is
/// then served to every client with no upstream contact at all, which is
/// what keeps by-digest pulls working through an outage.
pub const PUBLIC_TTL: Duration = Duration::from_secs(3600);

/// Entries kept before expired ones are swept out.
const MAX_GRANTS: usize = 10_000;

/// Which clients the upstream recently let read a repository, so the cache
/// (one copy per digest, shared by everyone) serves a private repository's
/// content only to clients the upstream currently authorises (DESIGN.md,
/// Cache semantics). Keyed by registry, repository and a hash of the
/// client's Authorization header (empty for none), so credentials are
/// never kept in memory as such.
#[derive(Debug, Default)]
pub struct AccessGrants {
    grants: Mutex<HashMap<(String, String, String), Instant>>,
    /// Repositories a client without credentials was allowed to read, and
    /// the basis it read them on: `""` anonymously, else the fingerprint
    /// of the proxy's `credentialsFile` credentials it was served with.
    public: Mutex<HashMap<(String, String), (Instant, String)>>,
}

/// The grant key of a client: sha256 of its Authorization header, or ""
/// for a client without one.
pub fn client_key(headers: &HeaderMap) -> String {
    use sha2::Digest as _;
    headers
        .get(http::header::AUTHORIZATION)
        .map(|v| hex::encode(sha2::Sha256::digest(v.as_bytes())))
        .unwrap_or_default()
}

impl AccessGrants {
    /// True when the upstream let `client` read `repo` within `ttl`
    /// (`authCheckTTL`, default 60 s).
    pub fn allowed(&self, registry: &str, repo: &str, client: &str, ttl: Duration) -> bool {
        let grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        grants
            .get(&(registry.to_string(), repo.to_string(), client.to_string()))
            .is_some_and(|at| at.elapsed() < ttl)
    }

    /// Records that the upstream let `client` read `repo`, without ever
    /// making the repository public (registries marked `private`).
    pub fn grant_client(&self, registry: &str, repo: &str, client: &str) {
        let mut grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        if grants.len() >= MAX_GRANTS {
            grants.retain(|_, at| at.elapsed() < PUBLIC_TTL);
        }
        grants.insert(
            (registry.to_string(), repo.to_string(), client.to_string()),
            Instant::now(),
        );
    }

    /// True when a client without credentials could read `repo` within
    /// [`PUBLIC_TTL`], anonymously or on `basis` (the fingerprint of the
    /// proxy's credentials now configured for the registry, `""` for none):
    /// content learnt readable with other credentials does not count.
    pub fn is_public(&self, registry: &str, repo: &str, basis: &str) -> bool {
        let public = self.public.lock().unwrap_or_else(|p| p.into_inner());
        public
            .get(&(registry.to_string(), repo.to_string()))
            .is_some_and(|(at, how)| at.elapsed() < PUBLIC_TTL && (how.is_empty() || how == basis))
    }

    /// Records that the upstream just let `client` read `repo`; a client
    /// without credentials (`""`) makes the repository public on `basis`
    /// (see [`Self::is_public`]). Such a client is then judged by
    /// [`Self::is_public`] alone, so no per-client grant is kept for it
    /// that would outlive a change of basis.
    pub fn grant(&self, registry: &str, repo: &str, client: &str, basis: &str) {
        if client.is_empty() {
            let mut public = self.public.lock().unwrap_or_else(|p| p.into_inner());
            if public.len() >= MAX_GRANTS {
                public.retain(|_, (at, _)| at.elapsed() < PUBLIC_TTL);
            }
            public.insert(
                (registry.to_string(), repo.to_string()),
                (Instant::now(), basis.to_string()),
            );
            return;
        }
        let mut grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        if grants.len() >= MAX_GRANTS {
            grants.retain(|_, at| at.elapsed() < PUBLIC_TTL);
        }
        grants.insert(
            (registry.to_string(), repo.to_string(), client.to_string()),
            Instant::now(),
        );
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
    fn public_grants_hold_only_on_their_basis() {
        let g = AccessGrants::default();
        g.grant("r", "anon/repo", "", "");
        g.grant("r", "creds/repo", "", "fp1");
        // Anonymously readable: readable whatever the proxy's credentials.
        assert!(g.is_public("r", "anon/repo", ""));
        assert!(g.is_public("r", "anon/repo", "fp2"));
        // Read with credentials fp1: only while fp1 is configured.
        assert!(g.is_public("r", "creds/repo", "fp1"));
        assert!(!g.is_public("r", "creds/repo", "fp2"));
        assert!(!g.is_public("r", "creds/repo", ""));
        // A client without credentials gets no per-client grant that
        // would outlive its basis.
        assert!(!g.allowed("r", "creds/repo", "", Duration::from_secs(60)));
        g.grant("r", "creds/repo", "client-hash", "fp1");
        assert!(g.allowed("r", "creds/repo", "client-hash", Duration::from_secs(60)));
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

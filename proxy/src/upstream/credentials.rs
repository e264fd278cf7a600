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
//! Clients choose repository names, and each new one costs a token request
//! with the credentials, so those are bounded: concurrent requests for one
//! scope share one token request, and token requests for scopes the
//! upstream never served with these credentials draw from a per-registry
//! [`TokenBucket`] (`limits.newRepositoryTokenBurst`, refilled at
//! `newRepositoryTokensPerMinute`). When it is empty the request fails with
//! [`UpstreamError::Throttled`] before the realm — and, once the registry is
//! known to want tokens, before the registry — is contacted. Repositories
//! already read (at most [`MAX_KNOWN_SCOPES`]) renew their tokens without
//! drawing from it, so a flood of made-up names cannot starve real pulls.
//!
//! A [`RegistryCredentials`] belongs to one config snapshot: a reload that
//! changes the credentials builds a new one, so tokens fetched with the old
//! credentials are dropped with it (see `config::watch`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode, Uri};
use pullthrough_api::config::{CredentialsError, Limits, UpstreamCredentials};

use super::throttle::{Empty, Permit, TokenBucket};
use super::token::{self, Challenge, TokenError, TokenRequest, parse_bearer};
use super::{UpstreamClient, UpstreamError, UpstreamResponse};
use crate::bounded::BoundedMap;

/// Token lifetime when the realm does not say (the distribution token spec).
const DEFAULT_TOKEN_LIFE: Duration = Duration::from_secs(60);

/// A token is renewed this long before it expires (at most a fifth of its
/// life), so a request never leaves with a token that expires in flight.
const RENEW_MARGIN: Duration = Duration::from_secs(10);

/// Cached tokens kept at most (one per scope, and clients choose the
/// scope); past this the oldest go first.
pub const MAX_TOKENS: usize = 1000;

/// Scopes remembered as read with these credentials (their token renewals
/// are not throttled); past this the ones read longest ago go first. Only
/// what the upstream served joins, so made-up names cannot push real
/// repositories out faster than the throttle lets them be asked for.
pub const MAX_KNOWN_SCOPES: usize = 10_000;

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
    /// The registry answered with a Bearer challenge: a scope without a
    /// fresh token will need one from the realm.
    wants_bearer: AtomicBool,
    /// Bearer tokens by scope (`""` for requests without a repository),
    /// at most [`MAX_TOKENS`].
    tokens: Mutex<BoundedMap<String, Token>>,
    /// Scopes the upstream served with a token of these credentials, at
    /// most [`MAX_KNOWN_SCOPES`]: their renewals skip `new_scopes`.
    known: Mutex<BoundedMap<String, ()>>,
    /// Token requests for scopes not in `known`.
    new_scopes: TokenBucket,
    /// One gate per scope whose token is being fetched, so concurrent
    /// requests for a scope wait for one realm answer instead of each
    /// asking (and each drawing from `new_scopes`). An entry lives only
    /// while some request holds it.
    fetching: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
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

/// A gate of [`RegistryCredentials::fetching`], removed from the map by
/// the last request that held it.
struct Turn<'a> {
    map: &'a Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    key: &'a str,
    gate: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        // Clones are made under this lock: two references (the map's and
        // ours) mean nobody else waits on this gate.
        if Arc::strong_count(&self.gate) <= 2 {
            map.remove(self.key);
        }
    }
}

/// The challenge of a 401 the proxy can answer.
enum Wanted {
    Basic,
    Bearer(Challenge),
}

impl RegistryCredentials {
    /// Reads `path` for `registry`.
    pub fn load(registry: &str, path: &Path) -> Result<Self, CredentialsFileError> {
        let credentials = read_file(registry, path)?;
        Ok(Self::new(registry, path, credentials))
    }

    /// Throttles token requests for new scopes as `limits` say (the
    /// default limits until called).
    #[must_use]
    pub fn limited(mut self, limits: &Limits) -> Self {
        self.new_scopes = TokenBucket::for_new_repositories(limits, Instant::now());
        self
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
            wants_bearer: AtomicBool::new(false),
            tokens: Mutex::new(BoundedMap::new(MAX_TOKENS)),
            known: Mutex::new(BoundedMap::new(MAX_KNOWN_SCOPES)),
            new_scopes: TokenBucket::for_new_repositories(&Limits::default(), Instant::now()),
            fetching: Mutex::new(HashMap::new()),
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
    /// answer) is an [`UpstreamError::Token`]; one the throttle does not
    /// allow now is an [`UpstreamError::Throttled`], before the realm is
    /// asked.
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
        // The registry will challenge, and only a new token could answer:
        // the permit for it is taken before the registry is asked, so a
        // flood costs the registry nothing either once the bucket is
        // empty. It goes back if it turns out not to be needed.
        // A Basic registry gets the credentials with this very request, so
        // for a repository never read the permit is needed just the same.
        let new_scope_with_credentials = (sent == Sent::Nothing
            && self.wants_bearer.load(Ordering::Relaxed))
            || sent == Sent::Basic;
        let permit = if new_scope_with_credentials && !self.is_known(key) {
            Some(
                self.new_scopes
                    .take(Instant::now())
                    .map_err(|empty| self.throttled(empty))?,
            )
        } else {
            None
        };
        let resp = client
            .send(
                method.clone(),
                url.clone(),
                with_auth(&headers, up_front.clone()),
            )
            .await?;
        let mut permit = permit;
        if sent == Sent::Basic
            && let Some(p) = permit.take()
        {
            // Sent with the credentials: spent whatever the answer.
            p.spend();
        }
        if resp.response.status() != StatusCode::UNAUTHORIZED {
            if sent == Sent::Bearer || sent == Sent::Basic {
                self.note_read(key, &resp);
            }
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
                self.wants_bearer.store(true, Ordering::Relaxed);
                let rejected = up_front.filter(|_| sent == Sent::Bearer);
                if let Some(rejected) = &rejected {
                    // Revoked or expired early: never offer it again.
                    self.forget(key, rejected);
                }
                match self
                    .token_for(client, &challenge, key, rejected.as_ref(), permit, timeout)
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
        let resp = client
            .send(method, url, with_auth(&headers, Some(retry_with)))
            .await?;
        // The retry carried the credentials (Basic or a token from them):
        // a repository it reads is one the throttle need not guard.
        self.note_read(key, &resp);
        Ok(resp)
    }

    /// A token for `key` after the registry challenged: one another
    /// request for the scope just fetched, else one from the realm — for
    /// a scope never read with these credentials only with a permit of
    /// the throttle (`permit`, taken before the registry was asked, or
    /// one taken now). `rejected` (the token the registry just refused)
    /// is never handed out again.
    async fn token_for(
        &self,
        client: &UpstreamClient,
        challenge: &Challenge,
        key: &str,
        rejected: Option<&HeaderValue>,
        permit: Option<Permit<'_>>,
        timeout: Duration,
    ) -> Result<Option<HeaderValue>, UpstreamError> {
        let turn = self.turn(key);
        let _held = turn.gate.lock().await;
        if let (Sent::Bearer, Some(token)) = self.up_front(key)
            && rejected != Some(&token)
        {
            // `permit`, unspent, goes back.
            return Ok(Some(token));
        }
        if !self.is_known(key) {
            let permit = match permit {
                Some(p) => p,
                None => self
                    .new_scopes
                    .take(Instant::now())
                    .map_err(|empty| self.throttled(empty))?,
            };
            permit.spend();
        }
        self.fetch_token(client, challenge, key, timeout).await
    }

    /// The gate of `key`'s token fetches (see [`Self::fetching`]).
    fn turn<'a>(&'a self, key: &'a str) -> Turn<'a> {
        let mut map = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
        let gate = map.entry(key.to_string()).or_default().clone();
        Turn {
            map: &self.fetching,
            key,
            gate,
        }
    }

    fn is_known(&self, key: &str) -> bool {
        let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        known.get(key).is_some()
    }

    /// Remembers `key` as read with these credentials when the upstream
    /// served the request (a redirect to storage is serving it too), so
    /// its token renewals are never throttled. A 404 of a made-up name
    /// does not count.
    fn note_read(&self, key: &str, resp: &UpstreamResponse) {
        if !(resp.response.status().is_success() || resp.hops > 0) {
            return;
        }
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if known.get(key).is_none() {
            known.insert(key.to_string(), ());
        }
    }

    fn throttled(&self, empty: Empty) -> UpstreamError {
        if empty.first {
            // Once per episode: a flood would otherwise log a line per
            // request.
            tracing::warn!(
                registry = %self.registry,
                retry_after_secs = empty.retry_after.as_secs(),
                "too many new repositories asked for with the registry's credentialsFile; \
                 answering 429 instead of asking the token realm (limits.newRepositoryTokensPerMinute, \
                 limits.newRepositoryTokenBurst)"
            );
        }
        UpstreamError::Throttled {
            registry: self.registry.clone(),
            retry_after: empty.retry_after,
        }
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

    /// Drops the token of `scope` if it is still `rejected` (another
    /// request may have replaced it with a fresh one meanwhile).
    fn forget(&self, scope: &str, rejected: &HeaderValue) {
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        if tokens.get(scope).is_some_and(|t| t.header == rejected) {
            tokens.remove(scope);
        }
    }

    /// GETs a token from the challenge's realm with Basic credentials
    /// (`service` and `scope` as query parameters) and caches it for
    /// `key`. `None` when the realm refuses the credentials (401/403).
    #[tracing::instrument(skip_all, fields(registry = %self.registry, scope = key))]
    async fn fetch_token(
        &self,
        client: &UpstreamClient,
        challenge: &Challenge,
        key: &str,
        timeout: Duration,
    ) -> Result<Option<HeaderValue>, UpstreamError> {
        let fail = |reason: String| UpstreamError::Token {
            registry: self.registry.clone(),
            realm: super::redact_str(&challenge.realm),
            reason,
        };
        // The password goes only where the admin sent it: the upstream's
        // own host and its `authHosts`, never a host the upstream names.
        let realm_host = url::Url::parse(&challenge.realm)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string));
        match realm_host {
            Some(host) if client.is_credential_host(&host) => {}
            Some(host) => {
                return Err(fail(format!(
                    "the realm's host `{host}` is neither the upstream's host nor one of \
                     the registry's authHosts; the credentials are not sent there"
                )));
            }
            None => return Err(fail("the realm is not a URL with a host".into())),
        }
        let scope = challenge
            .scope
            .as_deref()
            .or(Some(key))
            .filter(|s| !s.is_empty());
        let request = TokenRequest {
            challenge,
            scope,
            authorization: Some(&self.basic),
            // Plain http only where the registry itself is plain http
            // (tests, labs): the realm gets the password.
            allow_http: client.is_plain_http(),
            timeout,
        };
        let issued = match token::fetch(client, request).await {
            Ok(issued) => issued,
            Err(TokenError::Refused { .. }) => return Ok(None),
            Err(TokenError::Send(err)) => return Err(err),
            Err(err) => return Err(fail(err.to_string())),
        };
        if issued.token.is_empty() {
            return Err(fail(TokenError::NoToken.to_string()));
        }
        let mut header = HeaderValue::from_str(&format!("Bearer {}", issued.token))
            .map_err(|_| fail("the token has characters a header cannot carry".into()))?;
        header.set_sensitive(true);
        let life = issued
            .expires_in
            .map_or(DEFAULT_TOKEN_LIFE, Duration::from_secs);
        let keep = life.saturating_sub(RENEW_MARGIN.min(life / 5));
        if !keep.is_zero() {
            let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
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
mod tests;

//! The request pipeline: route, then answer from the cache or fetch from
//! the upstream while caching, and log one line per request.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use pullthrough_api::config::{ProxyConfig, RegistryConfig};
use tokio::sync::mpsc;

use crate::auth::{AccessGrants, AnonymousTokens, client_key, parse_bearer};
use crate::body::{self, Body};
use crate::cache::inflight::{self, Download, Inflight, Outcome, Phase, Role, Stream};
use crate::cache::repos::RepoIndex;
use crate::cache::store::{BlobMeta, BlobStore, CachedBlob, StoreError, is_disk_full};
use crate::cache::tags::{TagCache, TagEntry};
use crate::config::Settings;
use crate::observe::access_log::{Logged, Record};
use crate::observe::labels::{CacheResult, Kind};
use crate::observe::metrics::{AuthResult, Metrics};
use crate::oci::{self, Digest, ErrorCode, Reference};
use crate::route::{ApiRequest, Router, Target, Via};
use crate::upstream::{UpstreamClient, UpstreamError, Upstreams};

/// Largest manifest the proxy buffers (the distribution spec suggests 4 MiB).
const MAX_MANIFEST: usize = 16 << 20;
const DOCKER_CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
const API_VERSION: HeaderName = HeaderName::from_static("docker-distribution-api-version");

/// What one config snapshot needs at request time; swapped whole on reload.
pub struct State {
    pub config: ProxyConfig,
    pub settings: Settings,
    /// sha256 of the config file bytes (`/status` `configHash`).
    pub config_hash: String,
    pub router: Router,
    pub upstreams: Upstreams,
}

/// Shared by every connection for the process lifetime.
pub struct Shared {
    pub state: ArcSwap<State>,
    pub store: BlobStore,
    pub tags: TagCache,
    pub tokens: AnonymousTokens,
    /// Who the upstream recently let read which repository (served from
    /// the cache only to them).
    pub grants: AccessGrants,
    pub metrics: Arc<Metrics>,
    /// Blob downloads in flight (merged misses).
    pub inflight: Arc<Inflight>,
    /// Which digests each repository was served (admin API, purge).
    pub repos: RepoIndex,
}

/// Serves one request and wraps its body so the access line is written
/// when the body is done.
pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    sni: Option<Arc<str>>,
) -> Response<Logged> {
    let host = request_host(&req, sni.as_deref());
    let mut record = Record::new(req.method().as_str(), &host, req.uri().path());
    let span = tracing::debug_span!("request", method = %req.method(), host = %host, path = %req.uri().path());
    let _enter = span.enter();
    drop(_enter);
    let resp = match serve(&shared, req, &host, &mut record).await {
        Ok(resp) => resp,
        Err(err) => {
            tracing::warn!(error = %err, registry = %record.registry, path = %record.path, "request failed");
            if record.cache != CacheResult::Denied {
                record.cache = CacheResult::Pass;
            }
            err.into_response()
        }
    };
    record.status = resp.status().as_u16();
    let (parts, body) = resp.into_parts();
    // Lets the access line tell a whole body from a cut one (see Logged).
    record.expected_bytes = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    Response::from_parts(parts, Logged::new(body, record, shared.metrics.clone()))
}

fn request_host(req: &Request<Incoming>, sni: Option<&str>) -> String {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.as_str().to_string()))
        .or_else(|| sni.map(str::to_string))
        .unwrap_or_default()
}

/// Failures that end a request with an OCI error.
#[derive(Debug, thiserror::Error)]
enum HandlerError {
    #[error("refused: {message}")]
    Refused {
        status: StatusCode,
        code: ErrorCode,
        message: String,
    },
    #[error("upstream {registry}: {source}")]
    Upstream {
        registry: String,
        #[source]
        source: UpstreamError,
    },
    #[error("upstream {registry} sent a bad response: {message}")]
    BadUpstream { registry: String, message: String },
    #[error("cache: {0}")]
    Store(#[from] StoreError),
}

impl HandlerError {
    fn into_response(self) -> Response<Body> {
        let (status, code, message) = match &self {
            HandlerError::Refused {
                status,
                code,
                message,
            } => (*status, *code, message.clone()),
            HandlerError::Upstream { .. } | HandlerError::BadUpstream { .. } => (
                StatusCode::BAD_GATEWAY,
                ErrorCode::Unavailable,
                self.to_string(),
            ),
            HandlerError::Store(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Unavailable,
                "cache error".to_string(),
            ),
        };
        oci::error_response(status, code, &message).map(body::full)
    }
}

fn refused(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> HandlerError {
    HandlerError::Refused {
        status,
        code,
        message: message.into(),
    }
}

async fn serve(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    host: &str,
    record: &mut Record,
) -> Result<Response<Body>, HandlerError> {
    let state = shared.state.load_full();
    let target = match state.router.route(
        Some(host).filter(|h| !h.is_empty()),
        req.uri().path(),
        req.uri().query(),
    ) {
        Ok(t) => t,
        Err(refusal) => {
            record.cache = CacheResult::Denied;
            return Err(refused(refusal.status, refusal.code, refusal.message));
        }
    };

    match target {
        Target::LocalPing => {
            record.kind = Kind::Ping;
            record.cache = CacheResult::Hit;
            Ok(local_ping())
        }
        Target::Token {
            registry,
            auth_host,
        } => {
            record.registry = registry.to_string();
            record.kind = Kind::Token;
            record.cache = CacheResult::Pass;
            let client = client_for(&state, &registry)?;
            if req.method() != Method::GET {
                return Err(refused(
                    StatusCode::METHOD_NOT_ALLOWED,
                    ErrorCode::Unsupported,
                    "only GET token requests are relayed",
                ));
            }
            let path_q = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            let url = parse_url(&format!("https://{auth_host}{path_q}"), &registry)?;
            let headers = forward_headers(req.headers(), true);
            pass_through(client, &registry, Method::GET, url, headers).await
        }
        Target::Registry {
            registry,
            request,
            via,
        } => {
            record.registry = registry.to_string();
            record.repository = request.repo().unwrap_or_default().to_string();
            record.via = match via {
                Via::Ns => "ns",
                Via::PathPrefix => "path",
                Via::Host => "host",
                Via::Default => "default",
            };
            let reg_config = state
                .config
                .registry(&registry)
                .ok_or_else(|| {
                    refused(
                        StatusCode::NOT_FOUND,
                        ErrorCode::NameUnknown,
                        "registry vanished",
                    )
                })?
                .clone();
            let ctx = Ctx {
                shared,
                state: &state,
                client: client_for(&state, &registry)?,
                settings: state.settings.registry(&registry),
                auth_ttl: state.settings.auth_check_ttl,
                registry: &reg_config,
                repo: request.repo().map(str::to_string),
                via,
                read_timeout: state.config.upstream_timeouts.read,
            };
            registry_request(ctx, req, request, record).await
        }
    }
}

fn client_for<'a>(state: &'a State, registry: &str) -> Result<&'a UpstreamClient, HandlerError> {
    state.upstreams.client(registry).ok_or_else(|| {
        refused(
            StatusCode::NOT_FOUND,
            ErrorCode::NameUnknown,
            format!("no upstream for {registry}"),
        )
    })
}

struct Ctx<'a> {
    shared: &'a Arc<Shared>,
    /// The config snapshot `client` and `registry` come from (owned copies
    /// let a response body fetch from the upstream later, see `resume`).
    state: &'a Arc<State>,
    client: &'a UpstreamClient,
    settings: crate::config::RegistrySettings,
    auth_ttl: Duration,
    registry: &'a RegistryConfig,
    /// The repository asked for (scope of anonymous tokens).
    repo: Option<String>,
    via: Via,
    read_timeout: Duration,
}

impl Ctx<'_> {
    fn url(&self, path: &str, query: Option<&str>) -> Result<Uri, HandlerError> {
        let query = query
            .map(strip_ns)
            .filter(|q| !q.is_empty())
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        parse_url(
            &format!("{}{path}{query}", self.registry.upstream_url()),
            &self.registry.host,
        )
    }

    /// Sends to the upstream. A client without credentials is
    /// authenticated with the registry's `credentialsFile` (see
    /// [`crate::credentials`]), or else gets the proxy's anonymous token
    /// for the repository when the upstream challenges (see
    /// [`crate::auth`]). A client's own credentials go as they are.
    async fn send(
        &self,
        method: Method,
        url: Uri,
        mut headers: HeaderMap,
    ) -> Result<crate::upstream::UpstreamResponse, HandlerError> {
        let host = self.registry.host.as_str();
        let scope = self.repo.as_ref().map(|r| format!("repository:{r}:pull"));
        if !headers.contains_key(header::AUTHORIZATION)
            && let Some(creds) = self.settings.proxy_credentials()
        {
            let started = std::time::Instant::now();
            let resp = creds
                .send(
                    self.client,
                    method,
                    url,
                    headers,
                    scope.as_deref(),
                    self.read_timeout,
                )
                .await
                .map_err(|source| HandlerError::Upstream {
                    registry: host.to_string(),
                    source,
                })?;
            self.shared
                .metrics
                .observe_upstream(host, started.elapsed().as_secs_f64());
            return Ok(resp);
        }
        let anonymous = !headers.contains_key(header::AUTHORIZATION) && scope.is_some();
        let scope = scope.unwrap_or_default();
        if anonymous && let Some(token) = self.shared.tokens.get(host, &scope) {
            insert_bearer(&mut headers, &token);
        }
        let map = |source| HandlerError::Upstream {
            registry: host.to_string(),
            source,
        };
        let started = std::time::Instant::now();
        let resp = self
            .client
            .send(method.clone(), url.clone(), headers.clone())
            .await
            .map_err(map)?;
        self.shared
            .metrics
            .observe_upstream(host, started.elapsed().as_secs_f64());
        if !anonymous || resp.response.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let Some(challenge) = resp
            .response
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_bearer)
        else {
            return Ok(resp);
        };
        let Some(token) = self
            .shared
            .tokens
            .fetch(
                self.client,
                host,
                &challenge,
                Some(&scope),
                self.read_timeout,
            )
            .await
        else {
            return Ok(resp);
        };
        insert_bearer(&mut headers, &token);
        self.client.send(method, url, headers).await.map_err(map)
    }
}

impl Ctx<'_> {
    /// Asked before cached content of the repository is served: `None`
    /// when this client may have it, else the refusal to send. The cache is
    /// shared by every client, so without this a private image pulled once
    /// would be served to anyone afterwards.
    ///
    /// A repository anonymous clients may read (learnt from an anonymous
    /// pull, or one anonymous HEAD of `path`) is served to everyone for
    /// [`crate::auth::PUBLIC_TTL`] with no upstream contact. Otherwise the
    /// upstream is asked with the client's own credentials (a HEAD of
    /// `path`), and the answer reused for `authCheckTTL`; a client without
    /// any is asked about with the registry's `credentialsFile` if it has
    /// one (not `private`), as its misses are fetched. While
    /// the upstream is unreachable or failing the cache is served, as
    /// stale-if-error serves tags, so pulls keep working in an outage.
    async fn check_cached(
        &self,
        headers: &HeaderMap,
        path: &str,
    ) -> Result<Option<Response<Body>>, HandlerError> {
        let Some(repo) = self.repo.as_deref() else {
            return Ok(None);
        };
        let host = self.registry.host.as_str();
        let grants = &self.shared.grants;
        let metrics = &self.shared.metrics;
        let client = client_key(headers);
        let private = self.settings.private;
        // A client without credentials reads as the proxy serves such
        // clients: anonymously, or with the registry's credentialsFile.
        let basis = self.settings.anonymous_basis();
        if (!private && grants.is_public(host, repo, basis))
            || grants.allowed(host, repo, &client, self.auth_ttl)
        {
            return Ok(None);
        }
        if !client.is_empty() && !private {
            // Would an anonymous client get it? Then it is public content.
            let mut anonymous = forward_headers(headers, false);
            anonymous.remove(header::AUTHORIZATION);
            match self
                .send(Method::HEAD, self.url(path, None)?, anonymous)
                .await
            {
                Ok(up) if up.response.status().is_success() => {
                    grants.grant(host, repo, "", basis);
                    metrics.auth_check(host, AuthResult::public);
                    return Ok(None);
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(error = %err, registry = host, repository = repo,
                        "cannot ask the upstream about access; serving from cache");
                    metrics.auth_check(host, AuthResult::unreachable);
                    return Ok(None);
                }
            }
        }
        let url = self.url(path, None)?;
        let up = match self
            .send(Method::HEAD, url, forward_headers(headers, false))
            .await
        {
            Ok(up) => up,
            Err(err) => {
                tracing::warn!(error = %err, registry = host, repository = repo,
                    "cannot ask the upstream about access; serving from cache");
                metrics.auth_check(host, AuthResult::unreachable);
                return Ok(None);
            }
        };
        let status = up.response.status();
        // Only the registry's own 401/403 refuses: storage a blob HEAD was
        // redirected to may answer HEAD with 403 (S3).
        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) && up.hops == 0 {
            metrics.auth_check(host, AuthResult::denied);
            // Rebuilt, not relayed: the answer to a HEAD has no body but
            // may announce one.
            let mut resp = oci::error_response(
                status,
                ErrorCode::Denied,
                &format!("{host} does not let this client read {repo}"),
            )
            .map(body::full);
            for v in up.response.headers().get_all(header::WWW_AUTHENTICATE) {
                resp.headers_mut()
                    .append(header::WWW_AUTHENTICATE, v.clone());
            }
            return Ok(Some(resp));
        }
        if is_outage(status) {
            metrics.auth_check(host, AuthResult::unreachable);
        } else {
            metrics.auth_check(host, AuthResult::allowed);
            self.grant(repo, &client);
        }
        Ok(None)
    }

    fn grant(&self, repo: &str, client: &str) {
        let host = &self.registry.host;
        if self.settings.private {
            // Never "public": every client is checked.
            self.shared.grants.grant_client(host, repo, client);
        } else {
            let basis = self.settings.anonymous_basis();
            self.shared.grants.grant(host, repo, client, basis);
        }
    }

    /// Notes that the upstream just served this client the repository.
    fn granted(&self, headers: &HeaderMap) {
        if let Some(repo) = &self.repo {
            self.grant(repo, &client_key(headers));
        }
    }

    /// Notes that `digest` belongs to the repository (admin API, purge).
    fn served(&self, digest: &Digest) {
        if let Some(repo) = &self.repo {
            self.shared.repos.note(&self.registry.host, repo, digest);
        }
    }
}

async fn registry_request(
    ctx: Ctx<'_>,
    req: Request<Incoming>,
    request: ApiRequest,
    record: &mut Record,
) -> Result<Response<Body>, HandlerError> {
    let method = req.method().clone();
    let read_only = method == Method::GET || method == Method::HEAD;
    if !read_only || matches!(request, ApiRequest::Upload { .. }) {
        record.kind = Kind::Other;
        if !ctx.registry.allow_push {
            record.cache = CacheResult::Denied;
            return Err(refused(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::Unsupported,
                format!(
                    "pushing to {} through this proxy is not enabled (allowPush)",
                    ctx.registry.host
                ),
            ));
        }
        record.cache = CacheResult::Pass;
        return push_through(&ctx, req, &request).await;
    }
    let headers = req.headers().clone();
    let query = req.uri().query().map(str::to_string);
    match request {
        ApiRequest::Ping => {
            record.kind = Kind::Ping;
            record.cache = CacheResult::Pass;
            let url = ctx.url("/v2/", None)?;
            match ctx.send(method, url, forward_headers(&headers, true)).await {
                Ok(up) if !is_outage(up.response.status()) => Ok(relay_response(up.response)),
                _ => {
                    // The upstream is down: answer the version check so
                    // clients that insist on it (containers/image accepts
                    // only 200/401) go on to requests the cache can serve.
                    record.cache = CacheResult::Stale;
                    Ok(local_ping())
                }
            }
        }
        ApiRequest::Other { .. } => {
            record.kind = Kind::Other;
            record.cache = CacheResult::Pass;
            let url = ctx.url(&request.upstream_path(), query.as_deref())?;
            // Through ctx.send: tag lists and the like are read with the
            // registry's credentialsFile too.
            let up = ctx
                .send(method, url, forward_headers(&headers, true))
                .await?;
            Ok(relay_response(up.response))
        }
        ApiRequest::Manifest {
            ref repo,
            reference: Reference::Digest(ref digest),
        } => {
            record.kind = Kind::Manifest;
            record.reference = digest.to_string();
            record.digest = digest.to_string();
            manifest_by_digest(&ctx, &method, &headers, repo, digest, record).await
        }
        ApiRequest::Manifest {
            ref repo,
            reference: Reference::Tag(ref tag),
        } => {
            record.kind = Kind::Tag;
            record.reference = tag.clone();
            manifest_by_tag(&ctx, &method, &headers, repo, tag, record).await
        }
        ApiRequest::Blob {
            ref repo,
            ref digest,
        } => {
            record.kind = Kind::Blob;
            record.reference = digest.to_string();
            record.digest = digest.to_string();
            blob(&ctx, &method, &headers, repo, digest, record).await
        }
        ApiRequest::Upload { .. } => Err(refused(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::Unsupported,
            "uploads are not served",
        )),
    }
}

/// Relays a write (blob upload, manifest push) uncached, streaming the
/// client's body; upload Locations that point at the upstream are rewritten
/// to come back through the proxy the same way the request came.
async fn push_through(
    ctx: &Ctx<'_>,
    req: Request<Incoming>,
    request: &ApiRequest,
) -> Result<Response<Body>, HandlerError> {
    let (parts, incoming) = req.into_parts();
    let url = ctx.url(&request.upstream_path(), parts.uri.query())?;
    let mut headers = forward_headers(&parts.headers, false);
    for name in [
        header::CONTENT_TYPE,
        header::CONTENT_LENGTH,
        header::CONTENT_RANGE,
    ] {
        if let Some(v) = parts.headers.get(&name) {
            headers.insert(name, v.clone());
        }
    }
    let resp = ctx
        .client
        .send_body(parts.method, url, headers, body::relay(incoming))
        .await
        .map_err(|source| HandlerError::Upstream {
            registry: ctx.registry.host.clone(),
            source,
        })?;
    let mut resp = relay_response(resp);
    if let Some(loc) = resp
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|l| proxied_location(ctx, l))
        .and_then(|l| HeaderValue::from_str(&l).ok())
    {
        resp.headers_mut().insert(header::LOCATION, loc);
    }
    Ok(resp)
}

/// Maps an upstream `Location` on the upstream's own origin to a path the
/// client sends back to the proxy (with the registry prefix or `ns=` it
/// used). Other Locations are left alone.
fn proxied_location(ctx: &Ctx<'_>, location: &str) -> Option<String> {
    let base = url::Url::parse(&ctx.registry.upstream_url()).ok()?;
    let target = base.join(location).ok()?;
    if target.origin() != base.origin() {
        return None;
    }
    let path = target.path();
    let mut query: Vec<String> = target
        .query()
        .map(|q| vec![q.to_string()])
        .unwrap_or_default();
    let path = match ctx.via {
        Via::PathPrefix => {
            let rest = path.strip_prefix("/v2/")?;
            format!("/v2/{}/{rest}", ctx.registry.host)
        }
        Via::Ns => {
            query.push(format!("ns={}", ctx.registry.host));
            path.to_string()
        }
        Via::Host | Via::Default => path.to_string(),
    };
    Some(if query.is_empty() {
        path
    } else {
        format!("{path}?{}", query.join("&"))
    })
}

async fn manifest_by_digest(
    ctx: &Ctx<'_>,
    method: &Method,
    headers: &HeaderMap,
    repo: &str,
    digest: &Digest,
    record: &mut Record,
) -> Result<Response<Body>, HandlerError> {
    let path = format!("/v2/{repo}/manifests/{digest}");
    if let Some(cached) = lookup_manifest(ctx, digest).await? {
        if let Some(refusal) = ctx.check_cached(headers, &path).await? {
            return Ok(refusal);
        }
        record.cache = CacheResult::Hit;
        ctx.served(digest);
        return cached_manifest(cached, method).await;
    }
    record.cache = CacheResult::Miss;
    let url = ctx.url(&path, None)?;
    let up = ctx
        .send(method.clone(), url, forward_headers(headers, false))
        .await?;
    if up.response.status() == StatusCode::OK {
        ctx.granted(headers);
    }
    if up.response.status() != StatusCode::OK || *method == Method::HEAD {
        if up.response.status() != StatusCode::OK {
            record.cache = CacheResult::Pass;
        }
        return Ok(relay_response(up.response));
    }
    let (parts, incoming) = up.response.into_parts();
    let bytes = read_limited(incoming, MAX_MANIFEST, ctx.read_timeout, &ctx.registry.host).await?;
    let actual = Digest::of(&bytes);
    if &actual != digest {
        return Err(HandlerError::BadUpstream {
            registry: ctx.registry.host.clone(),
            message: format!("manifest {digest} arrived with digest {actual}; not cached"),
        });
    }
    let media_type = content_type(&parts.headers);
    store_manifest(ctx, digest, media_type.clone(), &bytes).await;
    ctx.served(digest);
    Ok(manifest_response(
        digest,
        media_type.as_deref(),
        bytes.len() as u64,
        body::full(bytes),
    ))
}

async fn manifest_by_tag(
    ctx: &Ctx<'_>,
    method: &Method,
    headers: &HeaderMap,
    repo: &str,
    tag: &str,
    record: &mut Record,
) -> Result<Response<Body>, HandlerError> {
    let host = ctx.registry.host.as_str();
    let known = ctx
        .shared
        .tags
        .get(host, repo, tag)
        .filter(|e| accepts(headers, &e.media_type));
    let cache_tags = ctx.settings.cache_tags;
    if let Some(entry) = known
        .as_ref()
        .filter(|e| cache_tags && e.is_fresh(ctx.registry.tag_ttl))
        && let Some(resp) = tag_from_cache(ctx, entry, method).await?
    {
        let path = format!("/v2/{repo}/manifests/{tag}");
        if let Some(refusal) = ctx.check_cached(headers, &path).await? {
            return Ok(refusal);
        }
        record.cache = CacheResult::Hit;
        record.digest = entry.digest.to_string();
        ctx.served(&entry.digest);
        return Ok(resp);
    }

    record.cache = CacheResult::Miss;
    let url = ctx.url(&format!("/v2/{repo}/manifests/{tag}"), None)?;
    let up = match ctx
        .send(method.clone(), url, forward_headers(headers, false))
        .await
    {
        Ok(up) if !is_outage(up.response.status()) => up,
        other => {
            // Upstream down or failing: the last known answer keeps the
            // cluster pulling (stale-if-error).
            if let Some(entry) = &known
                && let Some(resp) = tag_from_cache(ctx, entry, method).await?
            {
                record.cache = CacheResult::Stale;
                record.digest = entry.digest.to_string();
                tracing::warn!(
                    registry = host,
                    repository = repo,
                    tag,
                    "upstream failing; serving the last known digest"
                );
                return Ok(resp);
            }
            let up = other?;
            record.cache = CacheResult::Pass;
            return Ok(relay_response(up.response));
        }
    };
    if up.response.status() != StatusCode::OK {
        record.cache = CacheResult::Pass;
        return Ok(relay_response(up.response));
    }
    ctx.granted(headers);
    let (parts, incoming) = up.response.into_parts();
    let media_type = content_type(&parts.headers);
    let claimed = parts
        .headers
        .get(&DOCKER_CONTENT_DIGEST)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Digest::parse(v).ok());

    if *method == Method::HEAD {
        if let (Some(digest), Some(mt)) = (&claimed, &media_type) {
            let size = parts
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            record.digest = digest.to_string();
            ctx.shared.tags.put(
                host,
                repo,
                tag,
                TagEntry {
                    digest: digest.clone(),
                    media_type: mt.clone(),
                    size,
                    resolved_at: std::time::Instant::now(),
                },
            );
        }
        return Ok(relay_parts(parts, body::empty()));
    }

    let bytes = read_limited(incoming, MAX_MANIFEST, ctx.read_timeout, host).await?;
    let digest = Digest::of(&bytes);
    if let Some(claimed) = &claimed
        && claimed != &digest
    {
        return Err(HandlerError::BadUpstream {
            registry: host.to_string(),
            message: format!(
                "manifest {repo}:{tag} claims {claimed} but hashes to {digest}; not cached"
            ),
        });
    }
    record.digest = digest.to_string();
    store_manifest(ctx, &digest, media_type.clone(), &bytes).await;
    ctx.served(&digest);
    if let Some(mt) = &media_type {
        ctx.shared.tags.put(
            host,
            repo,
            tag,
            TagEntry {
                digest: digest.clone(),
                media_type: mt.clone(),
                size: bytes.len() as u64,
                resolved_at: std::time::Instant::now(),
            },
        );
    }
    Ok(manifest_response(
        &digest,
        media_type.as_deref(),
        bytes.len() as u64,
        body::full(bytes),
    ))
}

/// Stores a verified manifest; a full or failing disk is logged (and
/// counted) and the manifest served anyway.
async fn store_manifest(ctx: &Ctx<'_>, digest: &Digest, media_type: Option<String>, bytes: &[u8]) {
    if let Err(err) = ctx
        .shared
        .store
        .put(digest, BlobMeta { media_type }, bytes)
        .await
    {
        if is_disk_full(&err) {
            ctx.shared.metrics.disk_full();
        }
        tracing::warn!(error = %err, %digest, "cannot cache manifest; serving it uncached");
    }
}

/// Answers a tag from the cache when its manifest is stored.
async fn tag_from_cache(
    ctx: &Ctx<'_>,
    entry: &TagEntry,
    method: &Method,
) -> Result<Option<Response<Body>>, HandlerError> {
    match lookup_manifest(ctx, &entry.digest).await? {
        Some(cached) => Ok(Some(cached_manifest(cached, method).await?)),
        None => Ok(None),
    }
}

/// A cached manifest: its bytes from memory (the usual case, no file
/// access per request), or the file of an object too large to buffer.
enum CachedManifest {
    Memory(Digest, BlobMeta, Bytes),
    File(CachedBlob),
}

async fn lookup_manifest(
    ctx: &Ctx<'_>,
    digest: &Digest,
) -> Result<Option<CachedManifest>, HandlerError> {
    let store = &ctx.shared.store;
    if let Some((bytes, meta)) = store.lookup_small(digest, MAX_MANIFEST as u64).await? {
        return Ok(Some(CachedManifest::Memory(digest.clone(), meta, bytes)));
    }
    Ok(store.lookup(digest).await?.map(CachedManifest::File))
}

fn is_outage(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

async fn cached_manifest(
    cached: CachedManifest,
    method: &Method,
) -> Result<Response<Body>, HandlerError> {
    let cached = match cached {
        CachedManifest::Memory(digest, meta, bytes) => {
            let size = bytes.len() as u64;
            let body = if *method == Method::HEAD {
                body::empty()
            } else {
                body::full(bytes)
            };
            return Ok(manifest_response(
                &digest,
                meta.media_type.as_deref(),
                size,
                body,
            ));
        }
        CachedManifest::File(cached) => cached,
    };
    let body = if *method == Method::HEAD {
        body::empty()
    } else {
        let b = body::file(&cached.path, 0, cached.size)
            .await
            .map_err(|source| StoreError::Io {
                action: "reading cached manifest",
                path: cached.path.clone(),
                source,
            })?;
        body::hold(b, cached.lease.clone())
    };
    Ok(manifest_response(
        &cached.digest,
        cached.meta.media_type.as_deref(),
        cached.size,
        body,
    ))
}

fn manifest_response(
    digest: &Digest,
    media_type: Option<&str>,
    size: u64,
    body: Body,
) -> Response<Body> {
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    if let Some(mt) = media_type.and_then(|m| HeaderValue::from_str(m).ok()) {
        h.insert(header::CONTENT_TYPE, mt);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    if let Ok(v) = HeaderValue::from_str(digest.as_str()) {
        h.insert(DOCKER_CONTENT_DIGEST, v.clone());
        if let Ok(etag) = HeaderValue::from_str(&format!("\"{digest}\"")) {
            h.insert(header::ETAG, etag);
        }
    }
    h.insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
    resp
}

async fn blob(
    ctx: &Ctx<'_>,
    method: &Method,
    headers: &HeaderMap,
    repo: &str,
    digest: &Digest,
    record: &mut Record,
) -> Result<Response<Body>, HandlerError> {
    let path = format!("/v2/{repo}/blobs/{digest}");
    // Where push is enabled, a HEAD asks whether *this upstream repository*
    // has the blob (a pushing client skips the upload when it does); the
    // cache, shared by every repository, cannot answer that: a wrong 200
    // made pushes of already-pulled layers fail with "blob unknown".
    let push_check = *method == Method::HEAD && ctx.registry.allow_push;
    if !push_check && let Some(cached) = ctx.shared.store.lookup(digest).await? {
        if let Some(refusal) = ctx.check_cached(headers, &path).await? {
            return Ok(refusal);
        }
        record.cache = CacheResult::Hit;
        ctx.served(digest);
        return cached_blob(cached, method, headers).await;
    }
    let url = ctx.url(&path, None)?;
    let ranged = headers.contains_key(header::RANGE);
    if *method == Method::HEAD || ranged {
        // HEAD never spends an upstream GET; a range of an uncached blob is
        // relayed as asked, without caching.
        record.cache = CacheResult::Pass;
        let up = ctx
            .send(method.clone(), url, forward_headers(headers, true))
            .await?;
        if up.response.status().is_success() {
            ctx.granted(headers);
        }
        return Ok(relay_response(up.response));
    }
    record.cache = CacheResult::Miss;
    if !ctx.shared.inflight.is_uncacheable(digest) {
        match ctx.shared.inflight.join_or_lead(digest) {
            Role::Leader(dl) => return lead(ctx, headers, digest, url, dl, record).await,
            Role::Waiter(dl) => {
                let mut rx = dl.subscribe();
                if let Some(stream) = inflight::wait_started(&mut rx).await {
                    // The download was started for another client: this
                    // one must be allowed to read the repository too.
                    if let Some(refusal) = ctx.check_cached(headers, &path).await? {
                        return Ok(refusal);
                    }
                    ctx.shared.metrics.merged_waiter(&ctx.registry.host);
                    ctx.served(digest);
                    let body = inflight::tail(
                        rx,
                        &stream,
                        digest.clone(),
                        resume(ctx, &path, headers),
                        ctx.read_timeout,
                    );
                    return Ok(blob_response(digest, &stream, body));
                }
                // The leader got no blob: ask on our own.
            }
        }
    }
    let up = ctx
        .send(Method::GET, url, forward_headers(headers, false))
        .await?;
    if up.response.status() != StatusCode::OK {
        record.cache = CacheResult::Pass;
        return Ok(relay_response(up.response));
    }
    ctx.granted(headers);
    record.cache = CacheResult::Pass;
    let (parts, incoming) = up.response.into_parts();
    Ok(solo(ctx, digest, parts, incoming, None))
}

/// Publishes `NotStarted` and unregisters the download unless disarmed,
/// so waiters never hang on a leader that gave up.
struct LeadGuard<'a> {
    inflight: &'a Inflight,
    digest: &'a Digest,
    dl: Option<Arc<Download>>,
}

impl Drop for LeadGuard<'_> {
    fn drop(&mut self) {
        if let Some(dl) = self.dl.take() {
            dl.publish(Phase::NotStarted);
            self.inflight.finish(self.digest, &dl);
        }
    }
}

/// The first client to miss `digest`: fetches it once for everyone.
async fn lead(
    ctx: &Ctx<'_>,
    headers: &HeaderMap,
    digest: &Digest,
    url: Uri,
    dl: Arc<Download>,
    record: &mut Record,
) -> Result<Response<Body>, HandlerError> {
    let mut guard = LeadGuard {
        inflight: &ctx.shared.inflight,
        digest,
        dl: Some(dl),
    };
    let up = ctx
        .send(Method::GET, url, forward_headers(headers, false))
        .await?;
    if up.response.status() != StatusCode::OK {
        record.cache = CacheResult::Pass;
        return Ok(relay_response(up.response));
    }
    ctx.granted(headers);
    ctx.served(digest);
    if up.hops > 0 {
        tracing::debug!(%digest, from = %up.final_url, hops = up.hops, "blob served by redirect target");
    }
    let (parts, incoming) = up.response.into_parts();
    let media_type = content_type(&parts.headers);
    let size: Option<u64> = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let store = &ctx.shared.store;
    let reserved = size.unwrap_or(0);
    if let Some(size) = size
        && !ctx.shared.inflight.try_reserve(size, |others| {
            has_room(store.tmp_dir(), size.saturating_add(others))
        })
    {
        tracing::warn!(%digest, size, "cache disk full; passing the blob through");
        ctx.shared.metrics.disk_full();
        ctx.shared.inflight.mark_uncacheable(digest);
        record.cache = CacheResult::Pass;
        return Ok(solo(ctx, digest, parts, incoming, None));
    }
    let meta = BlobMeta {
        media_type: media_type.clone(),
    };
    let writer = match store.begin(digest, meta).await {
        Ok(w) => w,
        Err(err) => {
            ctx.shared.inflight.release(reserved);
            if is_disk_full(&err) {
                ctx.shared.metrics.disk_full();
                ctx.shared.inflight.mark_uncacheable(digest);
            }
            tracing::warn!(error = %err, %digest, "cannot cache blob; passing it through");
            record.cache = CacheResult::Pass;
            return Ok(solo(ctx, digest, parts, incoming, None));
        }
    };
    let file = match writer.temp_path().map(std::fs::File::open) {
        Some(Ok(f)) => f,
        _ => {
            ctx.shared.inflight.release(reserved);
            tracing::warn!(%digest, "cannot read back the temp file; passing the blob through");
            record.cache = CacheResult::Pass;
            return Ok(solo(ctx, digest, parts, incoming, Some(writer)));
        }
    };
    let stream = Stream {
        file: Arc::new(file),
        recent: Arc::default(),
        size,
        media_type,
        on_disk: 0,
        outcome: None,
    };
    let Some(dl) = guard.dl.take() else {
        ctx.shared.inflight.release(reserved);
        return Err(refused(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Unavailable,
            "download state lost",
        ));
    };
    dl.publish(Phase::Streaming(stream.clone()));
    let rx = dl.subscribe();
    tokio::spawn(download(
        incoming,
        writer,
        digest.clone(),
        dl,
        DownloadEnv {
            inflight: Arc::clone(&ctx.shared.inflight),
            metrics: Arc::clone(&ctx.shared.metrics),
            read_timeout: ctx.read_timeout,
            reserved,
            recent: Arc::clone(&stream.recent),
        },
    ));
    let path = format!(
        "/v2/{}/blobs/{digest}",
        ctx.repo.as_deref().unwrap_or_default()
    );
    let body = inflight::tail(
        rx,
        &stream,
        digest.clone(),
        resume(ctx, &path, headers),
        ctx.read_timeout,
    );
    Ok(blob_response(digest, &stream, body))
}

/// How this client gets the rest of a blob from the upstream on its own,
/// with its own credentials, if the shared download is abandoned (the cache
/// disk filled up mid-way). Holds owned handles: it runs inside the
/// response body, after the handler returned.
fn resume(ctx: &Ctx<'_>, path: &str, headers: &HeaderMap) -> inflight::Resume {
    let shared = Arc::clone(ctx.shared);
    let state = Arc::clone(ctx.state);
    let host = ctx.registry.host.clone();
    let repo = ctx.repo.clone();
    let via = ctx.via;
    let read_timeout = ctx.read_timeout;
    let path = path.to_string();
    let headers = forward_headers(headers, false);
    Arc::new(move |from: u64| {
        let (shared, state, host, repo, path, mut headers) = (
            Arc::clone(&shared),
            Arc::clone(&state),
            host.clone(),
            repo.clone(),
            path.clone(),
            headers.clone(),
        );
        Box::pin(async move {
            let client = state
                .upstreams
                .client(&host)
                .ok_or_else(|| format!("no upstream for {host}"))?;
            let registry = state
                .config
                .registry(&host)
                .ok_or_else(|| format!("registry {host} vanished"))?;
            let ctx = Ctx {
                shared: &shared,
                state: &state,
                client,
                settings: state.settings.registry(&host),
                auth_ttl: state.settings.auth_check_ttl,
                registry,
                repo,
                via,
                read_timeout,
            };
            if let Ok(range) = HeaderValue::from_str(&format!("bytes={from}-")) {
                headers.insert(header::RANGE, range);
            }
            let url = ctx.url(&path, None).map_err(|e| e.to_string())?;
            let up = ctx
                .send(Method::GET, url, headers)
                .await
                .map_err(|e| e.to_string())?;
            Ok(up.response)
        })
    })
}

/// Is there room for `size` more bytes (and some slack) where temp files go?
fn has_room(dir: &std::path::Path, size: u64) -> bool {
    const SLACK: u64 = 1 << 20;
    // The field types differ between platforms (u64 on 64-bit Linux).
    #[allow(clippy::useless_conversion)]
    match nix::sys::statvfs::statvfs(dir) {
        Ok(st) => {
            let avail =
                u64::from(st.blocks_available()).saturating_mul(u64::from(st.fragment_size()));
            avail >= size.saturating_add(SLACK)
        }
        Err(_) => true,
    }
}

/// Response head for a blob streamed from a download.
fn blob_response(digest: &Digest, stream: &Stream, body: Body) -> Response<Body> {
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    if let Some(len) = stream.size {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    h.insert(
        header::CONTENT_TYPE,
        stream
            .media_type
            .as_deref()
            .and_then(|m| HeaderValue::from_str(m).ok())
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    if let Ok(v) = HeaderValue::from_str(digest.as_str()) {
        h.insert(DOCKER_CONTENT_DIGEST, v);
    }
    h.insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
    resp
}

/// What a merged download needs besides the body and the writer.
struct DownloadEnv {
    inflight: Arc<Inflight>,
    metrics: Arc<Metrics>,
    read_timeout: Duration,
    /// Bytes reserved in `inflight` (released at the end).
    reserved: u64,
    /// Where written batches are handed to the clients (see `Recent`).
    recent: Arc<inflight::Recent>,
}

/// Hands the batches now on disk to the clients (from memory) and
/// publishes how far the file goes.
fn publish(
    writer: &mut crate::cache::store::BlobWriter,
    recent: &inflight::Recent,
    dl: &Download,
    published: &mut u64,
) {
    for (offset, bytes) in writer.take_batches() {
        recent.push(offset, bytes);
    }
    let on_disk = writer.on_disk();
    if on_disk != *published {
        *published = on_disk;
        dl.update(|s| s.on_disk = on_disk);
    }
}

/// The merged download: copies the upstream body into the store's temp
/// file, publishing progress, then commits; runs to the end whoever is
/// still listening.
async fn download(
    mut incoming: Incoming,
    mut writer: crate::cache::store::BlobWriter,
    digest: Digest,
    dl: Arc<Download>,
    env: DownloadEnv,
) {
    let DownloadEnv {
        inflight,
        metrics,
        read_timeout,
        reserved,
        recent,
    } = env;
    let mut published = 0u64;
    let end: Result<(), DownloadEnd> = loop {
        // While a batch is written, keep receiving; publish it the moment
        // it is on disk (not only when the next chunk arrives).
        let next = tokio::select! {
            biased;
            done = writer.collect(), if writer.writing() => Err(done),
            frame = tokio::time::timeout(read_timeout, incoming.frame()) => Ok(frame),
        };
        let next = match next {
            Ok(frame) => frame,
            Err(done) => {
                if let Err(err) = done {
                    break Err(DownloadEnd::Write(err));
                }
                publish(&mut writer, &recent, &dl, &mut published);
                continue;
            }
        };
        let frame = match next {
            Err(_) => break Err(DownloadEnd::Upstream("upstream stalled".to_string())),
            Ok(None) => break Ok(()),
            Ok(Some(Err(err))) => {
                break Err(DownloadEnd::Upstream(format!(
                    "upstream body failed: {err}"
                )));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if let Err(err) = writer.write(&data).await {
            break Err(DownloadEnd::Write(err));
        }
        publish(&mut writer, &recent, &dl, &mut published);
    };
    let end = match end {
        Ok(()) => writer.flush_now().await.map_err(DownloadEnd::Write),
        Err(e) => Err(e),
    };
    for (offset, bytes) in writer.take_batches() {
        recent.push(offset, bytes);
    }
    let outcome = match end {
        Err(DownloadEnd::Upstream(msg)) => {
            writer.abort().await;
            Outcome::Failed(Arc::from(msg.as_str()))
        }
        Err(DownloadEnd::Write(err)) => {
            // The disk filled up (or failed) after the download started:
            // stop caching, keep serving. The upstream body is dropped; each
            // client finishes with its own ranged fetch (see inflight.rs).
            drop(incoming);
            if is_disk_full(&err) {
                metrics.disk_full();
            }
            inflight.mark_uncacheable(&digest);
            match writer.abandon().await {
                Some((at, hasher)) => {
                    tracing::warn!(%digest, error = %err, at,
                        "cache write failed mid-download; not caching, clients continue by pass-through");
                    Outcome::Abandoned {
                        at,
                        hasher: Arc::new(hasher),
                    }
                }
                None => Outcome::Failed(Arc::from(format!("cache write failed: {err}").as_str())),
            }
        }
        Ok(()) => {
            let on_disk = writer.on_disk();
            dl.update(|s| s.on_disk = on_disk);
            match writer.commit().await {
                Ok(_) => Outcome::Verified,
                Err(err @ StoreError::NotCommitted { .. }) => {
                    // Verified bytes, no room to keep them: the clients read
                    // the (unlinked) temp file to the end, nothing is cached.
                    if is_disk_full(&err) {
                        metrics.disk_full();
                    }
                    inflight.mark_uncacheable(&digest);
                    tracing::warn!(%digest, error = %err, "verified blob not cached; served uncached");
                    Outcome::Verified
                }
                Err(err) => Outcome::Failed(Arc::from(err.to_string().as_str())),
            }
        }
    };
    // Unregister first: a client arriving after this finds the blob in the
    // store (or, on failure, starts a fresh download).
    inflight.release(reserved);
    inflight.finish(&digest, &dl);
    if let Outcome::Failed(msg) = &outcome {
        tracing::warn!(%digest, error = %msg, "blob download failed; every waiter aborted, nothing cached");
    }
    dl.update(|s| s.outcome = Some(outcome));
}

/// Why a merged download stopped early.
enum DownloadEnd {
    /// The upstream body failed: nothing to continue from.
    Upstream(String),
    /// Writing the cache failed: the bytes so far are good.
    Write(StoreError),
}

/// One client's own transfer, not shared (the disk is full, or the
/// download it waited for never started): `writer` caches it if given.
fn solo(
    ctx: &Ctx<'_>,
    digest: &Digest,
    parts: http::response::Parts,
    incoming: Incoming,
    writer: Option<crate::cache::store::BlobWriter>,
) -> Response<Body> {
    let media_type = content_type(&parts.headers);
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(fetch_blob(
        incoming,
        writer,
        digest.clone(),
        tx,
        ctx.read_timeout,
    ));
    let mut resp = Response::new(body::channel(rx));
    let h = resp.headers_mut();
    if let Some(len) = parts.headers.get(header::CONTENT_LENGTH) {
        h.insert(header::CONTENT_LENGTH, len.clone());
    }
    h.insert(
        header::CONTENT_TYPE,
        media_type
            .and_then(|m| HeaderValue::from_str(&m).ok())
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    if let Ok(v) = HeaderValue::from_str(digest.as_str()) {
        h.insert(DOCKER_CONTENT_DIGEST, v);
    }
    h.insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
    resp
}

/// Copies an upstream blob body to the client and into the store. The last
/// chunk is held back until the digest is verified, so a client never
/// receives a complete body whose digest is wrong: on mismatch its response
/// is aborted instead. The download continues if the client leaves, so the
/// cache is filled for the next one.
async fn fetch_blob(
    mut incoming: Incoming,
    mut writer: Option<crate::cache::store::BlobWriter>,
    digest: Digest,
    tx: mpsc::Sender<std::io::Result<Bytes>>,
    read_timeout: Duration,
) {
    let mut held: Option<Bytes> = None;
    let mut client_alive = true;
    let abort = |tx: &mpsc::Sender<std::io::Result<Bytes>>, msg: String| {
        let _ = tx.try_send(Err(std::io::Error::other(msg)));
    };
    loop {
        let frame = match tokio::time::timeout(read_timeout, incoming.frame()).await {
            Err(_) => {
                tracing::warn!(%digest, "upstream stalled; aborting blob transfer");
                abort(&tx, "upstream stalled".into());
                if let Some(w) = writer.take() {
                    w.abort().await;
                }
                return;
            }
            Ok(None) => break,
            Ok(Some(Err(err))) => {
                tracing::warn!(%digest, error = %err, "upstream body failed; aborting blob transfer");
                abort(&tx, format!("upstream body failed: {err}"));
                if let Some(w) = writer.take() {
                    w.abort().await;
                }
                return;
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if let Some(w) = writer.as_mut()
            && let Err(err) = w.write(&data).await
        {
            tracing::warn!(%digest, error = %err, "cache write failed; continuing as pass-through");
            if let Some(w) = writer.take() {
                w.abort().await;
            }
        }
        if let Some(prev) = held.replace(data)
            && client_alive
            && tx.send(Ok(prev)).await.is_err()
        {
            client_alive = false;
            if writer.is_none() {
                return;
            }
        }
    }
    let verified = match writer.take() {
        Some(w) => match w.commit().await {
            Ok(_) => true,
            Err(err) => {
                tracing::error!(%digest, error = %err, "blob not cached");
                // Only a digest mismatch means the bytes are wrong; other
                // commit failures (disk) leave a correct transfer.
                !matches!(err, StoreError::DigestMismatch { .. })
            }
        },
        None => true,
    };
    if verified {
        if let Some(last) = held
            && client_alive
        {
            let _ = tx.send(Ok(last)).await;
        }
    } else {
        abort(&tx, format!("blob {digest} failed verification"));
    }
}

async fn cached_blob(
    cached: CachedBlob,
    method: &Method,
    headers: &HeaderMap,
) -> Result<Response<Body>, HandlerError> {
    let size = cached.size;
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(|r| parse_range(r, size));
    let (status, start, len) = match range {
        None | Some(RangeSpec::Ignore) => (StatusCode::OK, 0, size),
        Some(RangeSpec::Satisfiable(start, end)) => {
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        Some(RangeSpec::Unsatisfiable) => {
            let mut resp = Response::new(body::empty());
            *resp.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(resp);
        }
    };
    let body = if *method == Method::HEAD {
        body::empty()
    } else {
        let b = body::file(&cached.path, start, len)
            .await
            .map_err(|source| StoreError::Io {
                action: "reading cached blob",
                path: cached.path.clone(),
                source,
            })?;
        body::hold(b, cached.lease.clone())
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(
        header::CONTENT_TYPE,
        cached
            .meta
            .media_type
            .as_deref()
            .and_then(|m| HeaderValue::from_str(m).ok())
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(cached.digest.as_str()) {
        h.insert(DOCKER_CONTENT_DIGEST, v);
    }
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{size}", start + len - 1))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    h.insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
    Ok(resp)
}

#[derive(Debug, PartialEq, Eq)]
enum RangeSpec {
    /// Not a single byte range we serve partially: send the whole body.
    Ignore,
    Satisfiable(u64, u64),
    Unsatisfiable,
}

/// Parses a single `bytes=` range against `size` (multi-range requests get
/// the whole body, which RFC 9110 allows).
fn parse_range(value: &str, size: u64) -> RangeSpec {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeSpec::Ignore;
    };
    if spec.contains(',') {
        return RangeSpec::Ignore;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeSpec::Ignore;
    };
    let (start, end) = match (a.trim(), b.trim()) {
        ("", "") => return RangeSpec::Ignore,
        ("", suffix) => match suffix.parse::<u64>() {
            Ok(0) => return RangeSpec::Unsatisfiable,
            Ok(n) => (size.saturating_sub(n), size.saturating_sub(1)),
            Err(_) => return RangeSpec::Ignore,
        },
        (s, "") => match s.parse::<u64>() {
            Ok(s) => (s, size.saturating_sub(1)),
            Err(_) => return RangeSpec::Ignore,
        },
        (s, e) => match (s.parse::<u64>(), e.parse::<u64>()) {
            (Ok(s), Ok(e)) if s <= e => (s, e.min(size.saturating_sub(1))),
            _ => return RangeSpec::Ignore,
        },
    };
    if size == 0 || start >= size {
        RangeSpec::Unsatisfiable
    } else {
        RangeSpec::Satisfiable(start, end)
    }
}

/// Does the client's Accept cover `media_type`? No Accept header, or a
/// wildcard, accepts anything.
fn accepts(headers: &HeaderMap, media_type: &str) -> bool {
    let mut any = false;
    for value in headers.get_all(header::ACCEPT) {
        any = true;
        let Ok(v) = value.to_str() else { continue };
        for item in v.split(',') {
            let item = item.split(';').next().unwrap_or_default().trim();
            if item == media_type || item == "*/*" {
                return true;
            }
        }
    }
    !any
}

fn content_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or(v).trim().to_string())
}

/// `200 {}` to `GET /v2/`, answered by the proxy itself.
fn local_ping() -> Response<Body> {
    let mut resp = Response::new(body::full(Bytes::from_static(b"{}")));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
    resp
}

fn insert_bearer(headers: &mut HeaderMap, token: &str) {
    if let Ok(v) = HeaderValue::from_str(&format!("Bearer {token}")) {
        headers.insert(header::AUTHORIZATION, v);
    }
}

/// Headers the upstream should see. `range` forwards Range (pass-through
/// only: cached fetches always take the whole blob).
fn forward_headers(from: &HeaderMap, range: bool) -> HeaderMap {
    let mut to = HeaderMap::new();
    for name in [header::ACCEPT, header::AUTHORIZATION, header::USER_AGENT] {
        for v in from.get_all(&name) {
            to.append(name.clone(), v.clone());
        }
    }
    if range && let Some(v) = from.get(header::RANGE) {
        to.insert(header::RANGE, v.clone());
    }
    to
}

/// Relays an upstream response: status and end-to-end headers, body as is.
fn relay_response(resp: Response<Incoming>) -> Response<Body> {
    let (parts, incoming) = resp.into_parts();
    relay_parts(parts, body::relay(incoming))
}

fn relay_parts(parts: http::response::Parts, body: Body) -> Response<Body> {
    let mut resp = Response::new(body);
    *resp.status_mut() = parts.status;
    for (name, value) in &parts.headers {
        if !is_hop_by_hop(name) {
            resp.headers_mut().append(name.clone(), value.clone());
        }
    }
    resp
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "upgrade"
            | "te"
            | "trailer"
    )
}

async fn pass_through(
    client: &UpstreamClient,
    registry: &str,
    method: Method,
    url: Uri,
    headers: HeaderMap,
) -> Result<Response<Body>, HandlerError> {
    let up = client
        .send(method, url, headers)
        .await
        .map_err(|source| HandlerError::Upstream {
            registry: registry.to_string(),
            source,
        })?;
    Ok(relay_response(up.response))
}

async fn read_limited(
    mut incoming: Incoming,
    limit: usize,
    read_timeout: Duration,
    registry: &str,
) -> Result<Bytes, HandlerError> {
    let mut buf = Vec::new();
    loop {
        let frame = tokio::time::timeout(read_timeout, incoming.frame())
            .await
            .map_err(|_| HandlerError::BadUpstream {
                registry: registry.to_string(),
                message: "timed out reading a manifest".into(),
            })?;
        match frame {
            None => break,
            Some(Err(e)) => {
                return Err(HandlerError::BadUpstream {
                    registry: registry.to_string(),
                    message: format!("manifest body failed: {e}"),
                });
            }
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    if buf.len() + data.len() > limit {
                        return Err(HandlerError::BadUpstream {
                            registry: registry.to_string(),
                            message: format!("manifest larger than {limit} bytes"),
                        });
                    }
                    buf.extend_from_slice(&data);
                }
            }
        }
    }
    Ok(Bytes::from(buf))
}

fn parse_url(url: &str, registry: &str) -> Result<Uri, HandlerError> {
    url.parse().map_err(|e| HandlerError::BadUpstream {
        registry: registry.to_string(),
        message: format!("cannot form upstream URL {url}: {e}"),
    })
}

/// The query without containerd's `ns=` (the upstream must not see it).
fn strip_ns(query: &str) -> String {
    query
        .split('&')
        .filter(|kv| !kv.starts_with("ns="))
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), RangeSpec::Satisfiable(0, 9));
        assert_eq!(
            parse_range("bytes=90-", 100),
            RangeSpec::Satisfiable(90, 99)
        );
        assert_eq!(
            parse_range("bytes=-10", 100),
            RangeSpec::Satisfiable(90, 99)
        );
        assert_eq!(
            parse_range("bytes=50-500", 100),
            RangeSpec::Satisfiable(50, 99)
        );
        assert_eq!(parse_range("bytes=100-", 100), RangeSpec::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), RangeSpec::Ignore);
        assert_eq!(parse_range("items=0-1", 100), RangeSpec::Ignore);
        assert_eq!(parse_range("bytes=9-1", 100), RangeSpec::Ignore);
    }

    #[test]
    fn accept_matching() {
        let mut h = HeaderMap::new();
        assert!(accepts(&h, "application/vnd.oci.image.manifest.v1+json"));
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/vnd.docker.distribution.manifest.v2+json; q=0.9"),
        );
        assert!(accepts(
            &h,
            "application/vnd.docker.distribution.manifest.v2+json"
        ));
        assert!(!accepts(&h, "application/vnd.oci.image.index.v1+json"));
        h.append(
            header::ACCEPT,
            HeaderValue::from_static("application/vnd.oci.image.index.v1+json"),
        );
        assert!(accepts(&h, "application/vnd.oci.image.index.v1+json"));
    }

    #[test]
    fn ns_is_not_forwarded() {
        assert_eq!(strip_ns("ns=docker.io&n=10"), "n=10");
        assert_eq!(strip_ns("ns=docker.io"), "");
    }
}

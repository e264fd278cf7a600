//! The request pipeline: route the request, check the client may read
//! what the cache holds, then answer from the cache or fetch from the
//! upstream while caching. One step per module: `manifest` (by digest),
//! `tags` (by tag, stale-if-error), `blob` and `download` (merged
//! misses), `push` (writes relayed uncached), `access` (the auth gate
//! before cached content is served); `context` sends to the upstream.

mod access;
mod blob;
mod context;
mod download;
mod lead;
pub(crate) mod manifest;
mod push;
mod referrers;
mod tags;

use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use pullthrough_api::config::ProxyConfig;

pub use access::{AccessGrants, OUTAGE_GRACE, PUBLIC_TTL, SharedGrant, client_key};
use context::Ctx;

use crate::cache::inflight::Inflight;
use crate::cache::referrers::ReferrersCache;
use crate::cache::repos::RepoIndex;
use crate::cache::shared::{EvictStats, Journal, SharedTier, Uploads};
use crate::cache::store::{BlobStore, StoreError};
use crate::cache::tags::TagCache;
use crate::config::Settings;
use crate::http::body::{self, Body};
use crate::http::headers::{API_VERSION, forward_headers, relay_response};
use crate::http::sendfile::Sendfile;
use crate::observe::access_log::{Logged, Record, Unanswered};
use crate::observe::labels::{CacheResult, Kind};
use crate::observe::metrics::Metrics;
use crate::oci::{self, ErrorCode, Reference};
use crate::peers::Peers;
use crate::peers::listener::FromPeer;
use crate::route::{ApiRequest, Router, Target, Via};
use crate::source::Source;
use crate::upstream::budget::Budgets;
use crate::upstream::{AnonymousTokens, UpstreamClient, UpstreamError, Upstreams};

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
    /// Referrers answers (OCI 1.1), cached like tags.
    pub referrers: ReferrersCache,
    /// What each upstream says is left of its rate limit.
    pub budgets: Budgets,
    pub tokens: AnonymousTokens,
    /// Who the upstream recently let read which repository (served from
    /// the cache only to them).
    pub grants: AccessGrants,
    pub metrics: Arc<Metrics>,
    /// Blob downloads in flight (merged misses).
    pub inflight: Arc<Inflight>,
    /// Manifest fetches by digest, one at a time per (registry, digest).
    pub manifest_turns: crate::cache::turns::Turns<(String, crate::oci::Digest)>,
    /// First fetches of a tag, one at a time per (registry, repository, tag).
    pub tag_turns: crate::cache::turns::Turns<(String, String, String)>,
    /// Which digests each repository was served (admin API, purge).
    pub repos: RepoIndex,
    /// The object store shared by every replica (`storage:`), if any.
    pub tier: Option<Arc<SharedTier>>,
    /// Copies what this replica fetched from upstreams into `tier`.
    pub uploads: Option<Arc<Uploads>>,
    /// What this replica served, for the shared tier's eviction order.
    pub journal: Option<Arc<Journal>>,
    /// What the shared tier's evictor did (with `storage.maxSize`).
    pub evictions: Option<Arc<EvictStats>>,
    /// The other replicas (`peers:`), if any.
    pub peers: Option<Arc<Peers>>,
    /// Images eviction keeps (`cache.pinsFile`).
    pub pins: Arc<crate::cache::pins::Pinning>,
}

/// Serves one request from the client at `peer` and wraps its body so
/// the access line is written when the body is done.
pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    sni: Option<Arc<str>>,
    peer: std::net::SocketAddr,
) -> Response<Logged> {
    let host = request_host(&req, sni.as_deref());
    let source = Source::of(peer);
    let mut record = Record::new(req.method().as_str(), &host, req.uri().path());
    record.client = Some(peer.ip().to_canonical());
    let mut pending = Unanswered::new(record, shared.metrics.clone());
    let span = tracing::debug_span!("request", method = %req.method(), host = %host, path = %req.uri().path());
    let _enter = span.enter();
    drop(_enter);
    let record = pending.record();
    let head = req.method() == Method::HEAD;
    let resp = match serve(&shared, req, &host, &mut *record, source).await {
        Ok(resp) => resp,
        Err(err) if err.is_throttled() => {
            // Warned once per episode where it is decided (a flood would
            // otherwise write a line per request); counted in metrics.
            tracing::debug!(error = %err, registry = %record.registry, path = %record.path, "request throttled");
            record.cache = CacheResult::Pass;
            err.into_response()
        }
        Err(err) => {
            tracing::warn!(error = %err, registry = %record.registry, path = %record.path, "request failed");
            if record.cache != CacheResult::Denied {
                record.cache = CacheResult::Pass;
            }
            err.into_response()
        }
    };
    let resp = if head { without_body(resp) } else { resp };
    let mut record = pending.answered();
    record.status = resp.status().as_u16();
    let (parts, body) = resp.into_parts();
    // Lets the access line tell a whole body from a cut one (see Logged).
    record.expected_bytes = crate::http::headers::content_length(&parts.headers);
    Response::from_parts(parts, Logged::new(body, record, shared.metrics.clone()))
}

/// The answer to a HEAD as it is sent: the head alone, announcing the
/// length a GET would get. An answer made whole for either method (a
/// refusal, an error) kept its body otherwise, which the server drops
/// unsent: its access line said the answer was cut short, and counted it
/// as a failure.
fn without_body(resp: Response<Body>) -> Response<Body> {
    use hyper::body::Body as _;
    let (mut parts, body) = resp.into_parts();
    if body.is_end_stream() {
        return Response::from_parts(parts, body);
    }
    if !parts.headers.contains_key(header::CONTENT_LENGTH)
        && let Some(len) = body.size_hint().exact()
    {
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    Response::from_parts(parts, body::empty())
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
pub(crate) enum HandlerError {
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
    /// A token request the throttle did not allow: the client may retry
    /// later, nothing went upstream.
    pub(crate) fn is_throttled(&self) -> bool {
        matches!(
            self,
            HandlerError::Upstream {
                source: UpstreamError::Throttled { .. },
                ..
            }
        )
    }

    /// The realm of the proxy's own anonymous token failed.
    pub(crate) fn is_anonymous_token_failure(&self) -> bool {
        matches!(
            self,
            HandlerError::Upstream {
                source: UpstreamError::AnonymousToken { .. },
                ..
            }
        )
    }

    fn into_response(self) -> Response<Body> {
        if let HandlerError::Upstream {
            source: UpstreamError::Throttled { retry_after, .. },
            ..
        } = &self
        {
            return too_many_requests(&self.to_string(), *retry_after);
        }
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

/// `429 TOOMANYREQUESTS` with `Retry-After` (whole seconds), as a
/// registry answers a client over its rate limit: clients back off and
/// retry instead of failing the pull for good.
pub(crate) fn too_many_requests(message: &str, retry_after: std::time::Duration) -> Response<Body> {
    let mut resp = oci::error_response(
        StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::TooManyRequests,
        message,
    )
    .map(body::full);
    resp.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(retry_after.as_secs().max(1)),
    );
    resp
}

pub(crate) fn refused(
    status: StatusCode,
    code: ErrorCode,
    message: impl Into<String>,
) -> HandlerError {
    HandlerError::Refused {
        status,
        code,
        message: message.into(),
    }
}

pub(crate) async fn serve(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    host: &str,
    record: &mut Record,
    source: Source,
) -> Result<Response<Body>, HandlerError> {
    let state = shared.state.load_full();
    let from_peer = req.extensions().get::<FromPeer>().is_some();
    let sendfile = req.extensions().get::<Sendfile>().cloned();
    // Only on the peer listener (mutual TLS, peer certificates): on the
    // client-facing listeners the path is no route (the router answers
    // 404 outside `/v2/`).
    if from_peer && req.uri().path() == crate::purge::PEER_ROUTE {
        record.via = "peer";
        return Ok(crate::purge::forward::serve(shared, req).await);
    }
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
        Target::LocalPing if !from_peer => {
            record.kind = Kind::Ping;
            record.cache = CacheResult::Hit;
            Ok(local_ping())
        }
        Target::Token {
            registry,
            auth_host,
        } if !from_peer => {
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
        } if !from_peer
            || (req.method() == Method::GET && matches!(request, ApiRequest::Blob { .. })) =>
        {
            record.registry = registry.to_string();
            record.repository = request.repo().unwrap_or_default().to_string();
            record.via = match via {
                Via::Ns => "ns",
                Via::PathPrefix => "path",
                Via::Host => "host",
                Via::Default => "default",
            };
            if from_peer {
                record.via = "peer";
            }
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
                source,
                from_peer,
                sendfile,
                multiplexed: req.version() == http::Version::HTTP_2,
                yes_at: Default::default(),
            };
            let mut resp = registry_request(&ctx, req, request, record).await?;
            if from_peer {
                // Only this proxy says these: whatever a relayed upstream
                // answer carried under the names is dropped.
                resp.headers_mut().remove(access::UPSTREAM_ANSWER_HEADER);
                resp.headers_mut().remove(access::GRANT_AGE_HEADER);
                if resp.status() != StatusCode::OK
                    && resp
                        .extensions()
                        .get::<crate::http::headers::UpstreamAnswer>()
                        .is_some()
                {
                    resp.headers_mut().insert(
                        access::UPSTREAM_ANSWER_HEADER,
                        HeaderValue::from_static("1"),
                    );
                }
            }
            if from_peer
                && resp.status() == StatusCode::OK
                && let Some(age) = ctx.yes_age()
                && let Ok(v) = http::HeaderValue::from_str(&age.as_millis().to_string())
            {
                resp.headers_mut().insert(access::GRANT_AGE_HEADER, v);
            }
            Ok(resp)
        }
        // Replicas ask each other for blobs and nothing else.
        _ => {
            record.cache = CacheResult::Denied;
            Err(refused(
                StatusCode::FORBIDDEN,
                ErrorCode::Denied,
                "the peer listener serves blob GETs only",
            ))
        }
    }
}

pub(crate) fn client_for<'a>(
    state: &'a State,
    registry: &str,
) -> Result<&'a UpstreamClient, HandlerError> {
    state.upstreams.client(registry).ok_or_else(|| {
        refused(
            StatusCode::NOT_FOUND,
            ErrorCode::NameUnknown,
            format!("no upstream for {registry}"),
        )
    })
}

async fn registry_request(
    ctx: &Ctx<'_>,
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
        return push::push_through(ctx, req, &request).await;
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
        ApiRequest::Referrers {
            ref repo,
            ref digest,
        } => {
            record.kind = Kind::Referrers;
            record.reference = digest.to_string();
            referrers::referrers(
                ctx,
                &method,
                &headers,
                repo,
                digest,
                query.as_deref(),
                record,
            )
            .await
        }
        ApiRequest::Manifest {
            ref repo,
            reference: Reference::Digest(ref digest),
        } => {
            record.kind = Kind::Manifest;
            record.reference = digest.to_string();
            record.digest = digest.to_string();
            manifest::manifest_by_digest(ctx, &method, &headers, repo, digest, record).await
        }
        ApiRequest::Manifest {
            ref repo,
            reference: Reference::Tag(ref tag),
        } => {
            record.kind = Kind::Tag;
            record.reference = tag.clone();
            tags::manifest_by_tag(ctx, &method, &headers, repo, tag, record).await
        }
        ApiRequest::Blob {
            ref repo,
            ref digest,
        } => {
            record.kind = Kind::Blob;
            record.reference = digest.to_string();
            record.digest = digest.to_string();
            blob::blob(ctx, &method, &headers, repo, digest, record).await
        }
        ApiRequest::Upload { .. } => Err(refused(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::Unsupported,
            "uploads are not served",
        )),
    }
}

pub(crate) fn is_outage(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
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

pub(crate) fn parse_url(url: &str, registry: &str) -> Result<Uri, HandlerError> {
    url.parse().map_err(|e| HandlerError::BadUpstream {
        registry: registry.to_string(),
        message: format!("cannot form upstream URL {url}: {e}"),
    })
}

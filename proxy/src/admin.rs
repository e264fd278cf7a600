//! Admin listener: probes, metrics, the CA, `/status` for the operator, and
//! the cache admin API (`/admin/cache`, `/admin/stats`).
//!
//! `/admin/*` requires `Authorization: Bearer <adminToken>` whenever a
//! token is configured. On a non-loopback admin listener without a token
//! the admin API is disabled (probes, `/metrics`, `/status` and `/ca.crt`
//! stay served), so an exposed cache can never be listed or purged by
//! anyone who reaches the port.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use pullthrough_api::config::Limits;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::oci::Digest;
use crate::pipeline::OUTAGE_GRACE;
use crate::pipeline::Shared;
use crate::server;
use crate::tls::Issuer;

/// Who may use `/admin/*`.
#[derive(Debug, Clone)]
pub enum AdminAccess {
    /// Loopback listener, no token: local callers only can reach it.
    Open,
    /// `Authorization: Bearer <token>` required.
    Token(Arc<str>),
    /// Exposed listener without a token: the admin API is off.
    Disabled,
}

/// Serves the admin endpoints until `stop` flips, with the proxy
/// listeners' timeouts and a pool of its own
/// ([`server::ADMIN_MAX_CONNECTIONS`]).
pub async fn serve(
    listener: TcpListener,
    ready: Arc<AtomicBool>,
    issuer: Arc<Issuer>,
    shared: Arc<Shared>,
    access: AdminAccess,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(server::ADMIN_MAX_CONNECTIONS));
    while let Some((stream, peer, permit)) =
        server::accept(&listener, &permits, &mut stop, "admin").await
    {
        let ready = ready.clone();
        let issuer = issuer.clone();
        let shared = shared.clone();
        let access = access.clone();
        let limits = limits.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let activity = server::Activity::new();
            let seen = activity.clone();
            let svc = hyper::service::service_fn(move |req| {
                seen.request_seen();
                let ready = ready.load(Ordering::Relaxed);
                // Per request: the CA may have been rotated since.
                let ca_pem = issuer.ca_pem();
                let (shared, access) = (shared.clone(), access.clone());
                async move { Ok::<_, Infallible>(handle(req, ready, &ca_pem, &shared, &access).await) }
            });
            let stream = server::Watched {
                inner: stream,
                activity: activity.clone(),
            };
            let builder = server::conn_builder(&limits);
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            server::supervise(conn, &activity, &limits, peer).await;
        });
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

/// Constant-time comparison of the presented bearer token.
fn authorised(req: &Request<Incoming>, token: &str) -> bool {
    let presented = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let (a, b) = (presented.as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether the caller may see what the admin API shows: the listener is
/// loopback-only (and the caller names it so), or the caller presented the
/// token.
fn trusted(req: &Request<Incoming>, access: &AdminAccess) -> bool {
    match access {
        AdminAccess::Open => names_loopback(req),
        AdminAccess::Token(token) => authorised(req, token),
        AdminAccess::Disabled => false,
    }
}

/// Whether the request names the listener by a loopback name (`localhost`
/// or a loopback IP), as every local tool does. A web page whose own name
/// was rebound to 127.0.0.1 (DNS rebinding) reaches a loopback listener
/// too, but sends its own name: an open admin API must not take it for a
/// local caller.
fn names_loopback(req: &Request<Incoming>) -> bool {
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().host());
    let Some(host) = host else {
        return true;
    };
    let (name, _) = pullthrough_api::names::split_port(host);
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The recent tag moves `/status` may show. `/status` needs no token (the
/// operator reads it), so to an untrusted caller it shows only moves an
/// anonymous client could see for itself: on a registry the config names,
/// not `private`, to a digest anonymous clients were let read (within
/// [`OUTAGE_GRACE`]). Registries that are not `private` still hold private
/// repositories (Docker Hub, GHCR), whose repository and tag names are
/// not for everyone. The per-registry counts stay.
fn visible_moves(
    shared: &Shared,
    state: &crate::pipeline::State,
    trusted: bool,
) -> Vec<crate::cache::tags::TagMove> {
    shared
        .tags
        .recent_moves()
        .into_iter()
        .filter(|m| {
            if trusted {
                return true;
            }
            if state.config.registry(&m.registry).is_none() {
                return false;
            }
            let settings = state.settings.registry(&m.registry);
            !settings.private
                && Digest::parse(&m.to).is_ok_and(|to| {
                    shared
                        .grants
                        .public_at(
                            &m.registry,
                            &m.repository,
                            &to,
                            settings.anonymous_basis(),
                            OUTAGE_GRACE,
                        )
                        .is_some()
                })
        })
        .collect()
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn handle(
    req: Request<Incoming>,
    ready: bool,
    ca_pem: &str,
    shared: &Arc<Shared>,
    access: &AdminAccess,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/metrics" => {
            refresh_metrics(shared);
            let mut resp = Response::new(Full::new(Bytes::from(shared.metrics.encode())));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            resp
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if ready => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/ca.crt" => {
            let mut resp = Response::new(Full::new(Bytes::copy_from_slice(ca_pem.as_bytes())));
            *resp.status_mut() = StatusCode::OK;
            resp
        }
        "/status" => {
            let trusted = trusted(&req, access);
            let state = shared.state.load();
            let registries: Vec<&str> = state
                .config
                .registries
                .iter()
                .map(|r| r.host.as_str())
                .collect();
            let pins = shared.pins.current();
            let cache: BTreeMap<&str, _> = registries
                .iter()
                .map(|r| {
                    let mut c = shared.metrics.cache_counters(r);
                    c.pinned = pins.per_registry.get(*r).copied();
                    (*r, c)
                })
                .collect();
            json_response(
                StatusCode::OK,
                &json!({
                    "configHash": state.config_hash,
                    "registries": registries,
                    "cache": cache,
                    "tagMoves": visible_moves(shared, &state, trusted),
                    // So a caller that sent a token learns whether it was
                    // taken: a wrong one is not refused here (the rest of
                    // `/status` is for everyone), only shown less.
                    "tagMovesScope": if trusted { "all" } else { "public" },
                    "upstream": budgets(shared).into_iter().collect::<BTreeMap<_, _>>(),
                }),
            )
        }
        "/admin/cache" | "/admin/stats" | "/admin/tags" => {
            if let AdminAccess::Disabled = access {
                return text(
                    StatusCode::FORBIDDEN,
                    "admin API disabled: the admin listener is exposed and no adminToken is set\n",
                );
            }
            if let AdminAccess::Open = access
                && !names_loopback(&req)
            {
                return text(
                    StatusCode::FORBIDDEN,
                    "the admin API without a token answers only requests to a loopback name (localhost, 127.0.0.1, [::1])\n",
                );
            }
            if let AdminAccess::Token(token) = access
                && !authorised(&req, token)
            {
                let mut resp = text(StatusCode::UNAUTHORIZED, "admin token required\n");
                resp.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Bearer realm=\"pullthrough-admin\""),
                );
                return resp;
            }
            match (req.method(), path.as_str()) {
                (&Method::GET, "/admin/stats") => json_response(StatusCode::OK, &stats(shared)),
                (&Method::GET, "/admin/cache") => json_response(StatusCode::OK, &listing(shared)),
                (&Method::GET, "/admin/tags") => tags(shared, req.uri().query()),
                (&Method::DELETE, "/admin/cache") => purge(shared, req.uri().query()).await,
                _ => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Each registry's budget report, with its `upstreamReserve`.
fn budgets(
    shared: &Shared,
) -> std::collections::HashMap<String, crate::upstream::budget::BudgetReport> {
    let state = shared.state.load();
    shared.budgets.report(|r| {
        state
            .config
            .registry(r)
            .map_or(pullthrough_api::config::default_upstream_reserve(), |c| {
                c.upstream_reserve
            })
    })
}

fn refresh_metrics(shared: &Shared) {
    for (registry, b) in budgets(shared) {
        shared.metrics.set_budget(&registry, &b);
    }
    let (bytes, entries) = shared.store.usage();
    let st = shared.store.stats();
    shared.metrics.set_cache(
        bytes,
        entries,
        st.evictions.load(Ordering::Relaxed),
        st.evicted_bytes.load(Ordering::Relaxed),
    );
    shared.metrics.set_cache_max(shared.store.limits().max_size);
    let pins = shared.pins.current();
    for r in &shared.state.load().config.registries {
        let bytes = pins.per_registry.get(&r.host).map_or(0, |p| p.bytes);
        shared.metrics.set_pinned(&r.host, bytes);
    }
    if let Some(uploads) = &shared.uploads {
        shared
            .metrics
            .set_shared(&uploads.figures(shared.evictions.as_deref()));
    }
}

fn stats(shared: &Shared) -> serde_json::Value {
    let (bytes, entries) = shared.store.usage();
    let limits = shared.store.limits();
    let st = shared.store.stats();
    json!({
        "bytes": bytes,
        "entries": entries,
        "maxSize": limits.max_size,
        "highWatermark": limits.max_size.map(|_| limits.high_watermark),
        "lowWatermark": limits.max_size.map(|_| limits.low_watermark),
        "evictions": st.evictions.load(Ordering::Relaxed),
        "evictedBytes": st.evicted_bytes.load(Ordering::Relaxed),
        "downloadsInFlight": shared.inflight.len(),
        "sharedStorage": shared.uploads.as_ref().map(|u| {
            let f = u.figures(shared.evictions.as_deref());
            json!({
                "location": u.tier().location(),
                "up": f.up,
                "errors": f.errors,
                "uploads": f.uploads.iter().map(|(r, n)| (format!("{r:?}"), *n)).collect::<BTreeMap<_, _>>(),
                "uploadedBytes": f.uploaded_bytes,
                "evictor": f.evictor.map(|e| json!({
                    "holder": e.holder,
                    "bucketBytes": e.bucket_bytes,
                    "evictions": e.evictions,
                    "evictedBytes": e.evicted_bytes,
                })),
            })
        }),
    })
}

/// `GET /admin/tags[?registry=..&repository=..]`: every tag answer held,
/// with the digests the tag pointed at before (newest first).
fn tags(shared: &Shared, query: Option<&str>) -> Response<Full<Bytes>> {
    let (mut registry, mut repository) = (None, None);
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match k.as_ref() {
            "registry" => registry = Some(v.into_owned()),
            "repository" => repository = Some(v.into_owned()),
            _ => {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    &json!({"error": format!("unknown parameter {k} (registry, repository)")}),
                );
            }
        }
    }
    let list: Vec<serde_json::Value> = shared
        .tags
        .list(registry.as_deref(), repository.as_deref())
        .into_iter()
        .map(|((reg, repo, tag), e)| {
            json!({
                "registry": reg,
                "repository": repo,
                "tag": tag,
                "digest": e.digest.as_str(),
                "mediaType": e.media_type,
                "since": crate::cache::unix_ms(e.since),
                "checkedSecondsAgo": e.resolved_at.elapsed().as_secs(),
                "previous": e.previous.iter().map(|(d, until)| json!({
                    "digest": d.as_str(),
                    "until": crate::cache::unix_ms(*until),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json_response(StatusCode::OK, &json!({"tags": list}))
}

/// `{"bytes", "entries", "registries": {reg: {repositories: {repo: {bytes,
/// digests: [{digest, size, lastAccess}]}}}}, "unattributed": [...]}`:
/// digests no repository was seen serving since the start (they were
/// cached by an earlier run) are listed as unattributed.
fn listing(shared: &Shared) -> serde_json::Value {
    let (bytes, entries) = shared.store.usage();
    let mut attributed = std::collections::HashSet::new();
    let mut registries: BTreeMap<String, BTreeMap<String, serde_json::Value>> = BTreeMap::new();
    for ((reg, repo), digests) in shared.repos.snapshot() {
        let mut total = 0u64;
        let mut list = Vec::new();
        for d in digests {
            if let Some(e) = shared.store.entry(&d) {
                total += e.size;
                list.push(json!({"digest": d.as_str(), "size": e.size, "lastAccess": unix_secs(e.last_access)}));
                attributed.insert(d);
            }
        }
        if !list.is_empty() {
            registries
                .entry(reg)
                .or_default()
                .insert(repo, json!({"bytes": total, "digests": list}));
        }
    }
    let mut unattributed: Vec<_> = shared
        .store
        .entries()
        .into_iter()
        .filter(|(d, _)| !attributed.contains(d))
        .map(|(d, e)| json!({"digest": d.as_str(), "size": e.size, "lastAccess": unix_secs(e.last_access)}))
        .collect();
    unattributed.sort_by(|a, b| a["digest"].as_str().cmp(&b["digest"].as_str()));
    let registries: BTreeMap<String, serde_json::Value> = registries
        .into_iter()
        .map(|(r, repos)| (r, json!({"repositories": repos})))
        .collect();
    json!({"bytes": bytes, "entries": entries, "registries": registries, "unattributed": unattributed})
}

/// `DELETE /admin/cache?registry=..&repository=..` or `?digest=..`
/// (`&scope=local`: this replica's disk only); see [`crate::purge`].
async fn purge(shared: &Arc<Shared>, query: Option<&str>) -> Response<Full<Bytes>> {
    let query = match crate::purge::Query::parse(query) {
        Ok(q) => q,
        Err(err) => {
            return json_response(StatusCode::BAD_REQUEST, &json!({"error": err.to_string()}));
        }
    };
    // A task of its own: a connection closed meanwhile (the caller gave
    // up, `limits.idleTimeout` passed while replicas and the bucket were
    // asked) must not stop a purge half-way, between the replicas and the
    // bucket; its log line still tells the outcome.
    let shared = Arc::clone(shared);
    let report = tokio::spawn(async move { crate::purge::run(&shared, &query).await }).await;
    match report {
        Ok(report) if report.complete() => json_response(StatusCode::OK, &report.to_json()),
        Ok(report) => json_response(StatusCode::INTERNAL_SERVER_ERROR, &report.to_json()),
        Err(err) => json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({"complete": false, "error": format!("the purge failed: {err}; repeat it")}),
        ),
    }
}

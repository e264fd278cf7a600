//! Blobs: served from the cache (with ranges), joined to a download in
//! flight, led as a new merged download, or passed through on their own
//! (the fetching itself is in `download`).

use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};

use super::HandlerError;
use super::access::Object;
use super::context::Ctx;
use super::download::{blob_response, resume, solo};
use super::lead::{LeadGuard, Source, lead};
use crate::cache::inflight::{self, Role};
use crate::cache::store::CachedBlob;
use crate::http::body::{self, Body};
use crate::http::headers::{
    API_VERSION, DOCKER_CONTENT_DIGEST, content_length, content_type, forward_headers,
};
use crate::http::range::{RangeSpec, parse_range};
use crate::observe::access_log::Record;
use crate::observe::labels::CacheResult;
use crate::oci::Digest;
use crate::peers::Owner;

/// Rounds a missed blob's request waits on (or leads) a merged download
/// whose leader gave up before it started, before asking on its own.
const LEAD_ROUNDS: usize = 4;

pub(crate) async fn blob(
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
        if let Some(refusal) = ctx.check_cached(headers, &path, digest).await? {
            record.cache = CacheResult::Denied;
            return Ok(refusal);
        }
        record.cache = CacheResult::Hit;
        ctx.served(digest);
        return cached_blob(cached, method, headers, ctx).await;
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
        // Only a read proves the client may read: a registry may answer a
        // HEAD to credentials it refuses the download (ECR's push-only
        // roles check for layers they would otherwise upload).
        if *method == Method::GET && up.response.status().is_success() {
            ctx.granted(headers, digest);
        }
        // An upstream that ignores the range sends the whole blob: that
        // is verified like any other (a 206 part cannot be).
        if *method == Method::GET && up.response.status() == StatusCode::OK {
            return Ok(solo_upstream(ctx, digest, up.response));
        }
        return Ok(ctx.pass_on(up, Object::Blob));
    }
    record.cache = CacheResult::Miss;
    // A leader can give up before its download starts for a reason of
    // its own (its client left during the upstream round trip, or the
    // upstream refused its credentials): the waiters then elect a new
    // leader among themselves rather than each fetching alone and
    // uncached, which any client could otherwise cause on purpose with a
    // refused ask for a popular layer. Bounded, so an upstream that
    // refuses everyone costs each client one ask. When the upstream itself
    // failed the leader (timeout, 5xx), each asks on its own at once: a
    // queue of leaders would make every waiter sit out each one's timeout.
    for _ in 0..LEAD_ROUNDS {
        if ctx.shared.inflight.is_uncacheable(digest) {
            break;
        }
        match ctx.shared.inflight.join_or_lead(digest) {
            Role::Leader(dl) => {
                let guard = LeadGuard::new(&ctx.shared.inflight, digest, dl);
                let source = match in_shared_tier(ctx, digest).await {
                    Some(found) => {
                        // Another replica fetched it: the same gate as a
                        // HIT on this replica's disk.
                        if let Some(refusal) = ctx.check_cached(headers, &path, digest).await? {
                            record.cache = CacheResult::Denied;
                            return Ok(refusal);
                        }
                        found
                    }
                    None => match owning_peer(ctx, digest) {
                        Some(peer) => Source::Peer(peer, url),
                        None => Source::Upstream(url),
                    },
                };
                return lead(ctx, headers, digest, source, guard, record).await;
            }
            Role::Waiter(dl) => {
                let mut rx = dl.subscribe();
                let stream = match inflight::wait_started(&mut rx).await {
                    inflight::Started::Streaming(stream) => stream,
                    // The leader got no blob: join or lead the next round.
                    inflight::Started::HandedOver => continue,
                    inflight::Started::GaveUp => break,
                };
                // The download was started for another client: this one
                // must be allowed to read the repository too.
                if let Some(refusal) = ctx.check_cached(headers, &path, digest).await? {
                    record.cache = CacheResult::Denied;
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
                    ctx.file_chunk(),
                );
                return Ok(blob_response(digest, &stream, body));
            }
        }
    }
    let up = ctx
        .send(Method::GET, url, forward_headers(headers, false))
        .await?;
    if up.response.status() != StatusCode::OK {
        record.cache = CacheResult::Pass;
        return Ok(ctx.pass_on(up, Object::Blob));
    }
    ctx.granted(headers, digest);
    record.cache = CacheResult::Pass;
    Ok(solo_upstream(ctx, digest, up.response))
}

/// An upstream's whole blob to this client alone, verified, not cached.
fn solo_upstream(
    ctx: &Ctx<'_>,
    digest: &Digest,
    response: Response<hyper::body::Incoming>,
) -> Response<Body> {
    let (parts, incoming) = response.into_parts();
    solo(
        ctx,
        digest,
        content_length(&parts.headers),
        content_type(&parts.headers),
        body::relay(incoming),
        None,
    )
}

/// The shared tier's copy of `digest`, if there is a tier and it has one
/// (an unreachable tier counts as not having it).
async fn in_shared_tier(ctx: &Ctx<'_>, digest: &Digest) -> Option<Source> {
    let tier = ctx.shared.tier.as_ref()?;
    match tier.stat(digest).await {
        Ok(Some(stat)) => Some(Source::Tier(Arc::clone(tier), stat)),
        Ok(None) => None,
        Err(err) => {
            tracing::debug!(%digest, error = %err, "shared storage not consulted");
            None
        }
    }
}

/// The replica that owns `digest`, when it is not this one and this
/// request did not come from a peer (one hop at most).
fn owning_peer(ctx: &Ctx<'_>, digest: &Digest) -> Option<std::net::SocketAddr> {
    if ctx.from_peer {
        return None;
    }
    match ctx.shared.peers.as_ref()?.members.owner(digest) {
        Owner::Peer(peer) => Some(peer),
        Owner::Me => None,
    }
}

async fn cached_blob(
    cached: CachedBlob,
    method: &Method,
    headers: &HeaderMap,
    ctx: &Ctx<'_>,
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
        let file = Arc::clone(&cached.file);
        let b = match &ctx.sendfile {
            Some(sendfile) => sendfile.body(file, start, len),
            None => body::file_in_chunks(file, start, len, ctx.file_chunk()),
        };
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

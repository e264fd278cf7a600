//! Blobs: served from the cache (with ranges), joined to a download in
//! flight, led as a new merged download, or passed through on their own.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::mpsc;

use super::HandlerError;
use super::context::Ctx;
use super::download::{lead, resume};
use crate::cache::inflight::{self, Role, Stream};
use crate::cache::store::{BlobWriter, CachedBlob, StoreError};
use crate::http::body::{self, Body};
use crate::http::headers::{
    API_VERSION, DOCKER_CONTENT_DIGEST, content_type, forward_headers, relay_response,
};
use crate::http::range::{RangeSpec, parse_range};
use crate::observe::access_log::Record;
use crate::observe::labels::CacheResult;
use crate::oci::Digest;

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

/// Response head for a blob streamed from a download.
pub(crate) fn blob_response(digest: &Digest, stream: &Stream, body: Body) -> Response<Body> {
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

/// One client's own transfer, not shared (the disk is full, or the
/// download it waited for never started): `writer` caches it if given.
pub(crate) fn solo(
    ctx: &Ctx<'_>,
    digest: &Digest,
    parts: http::response::Parts,
    incoming: Incoming,
    writer: Option<BlobWriter>,
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
pub(crate) async fn fetch_blob(
    mut incoming: Incoming,
    mut writer: Option<BlobWriter>,
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

pub(crate) async fn cached_blob(
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

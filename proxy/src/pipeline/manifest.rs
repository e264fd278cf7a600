//! Manifests by digest: served from the cache (memory for small ones) or
//! fetched, verified against the digest asked for, and stored.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::HandlerError;
use super::context::Ctx;
use crate::cache::store::{BlobMeta, CachedBlob, StoreError, is_disk_full};
use crate::http::body::{self, Body};
use crate::http::headers::{
    API_VERSION, DOCKER_CONTENT_DIGEST, content_type, forward_headers, relay_response,
};
use crate::observe::access_log::Record;
use crate::observe::labels::CacheResult;
use crate::oci::Digest;

/// Largest manifest the proxy buffers (the distribution spec suggests 4 MiB).
pub(crate) const MAX_MANIFEST: usize = 16 << 20;

pub(crate) async fn manifest_by_digest(
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

/// Stores a verified manifest; a full or failing disk is logged (and
/// counted) and the manifest served anyway.
pub(crate) async fn store_manifest(
    ctx: &Ctx<'_>,
    digest: &Digest,
    media_type: Option<String>,
    bytes: &[u8],
) {
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

/// A cached manifest: its bytes from memory (the usual case, no file
/// access per request), or the file of an object too large to buffer.
pub(crate) enum CachedManifest {
    Memory(Digest, BlobMeta, Bytes),
    File(CachedBlob),
}

pub(crate) async fn lookup_manifest(
    ctx: &Ctx<'_>,
    digest: &Digest,
) -> Result<Option<CachedManifest>, HandlerError> {
    let store = &ctx.shared.store;
    if let Some((bytes, meta)) = store.lookup_small(digest, MAX_MANIFEST as u64).await? {
        return Ok(Some(CachedManifest::Memory(digest.clone(), meta, bytes)));
    }
    Ok(store.lookup(digest).await?.map(CachedManifest::File))
}

pub(crate) async fn cached_manifest(
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

pub(crate) fn manifest_response(
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

pub(crate) async fn read_limited(
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

//! Manifests by digest: served from the cache (memory for small ones) or
//! fetched, verified against the digest asked for, and stored.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::HandlerError;
use super::access::Object;
use super::context::Ctx;
use crate::cache::shared::TierStat;
use crate::cache::store::{BlobMeta, CachedBlob, is_disk_full};
use crate::http::body::{self, Body};
use crate::http::headers::{API_VERSION, DOCKER_CONTENT_DIGEST, content_type, forward_headers};
use crate::observe::access_log::Record;
use crate::observe::labels::CacheResult;
use crate::oci::Digest;
pub(crate) use crate::oci::is_manifest_type;

/// Largest manifest the proxy accepts from the upstream (the distribution
/// spec suggests 4 MiB).
pub(crate) const MAX_MANIFEST: usize = 16 << 20;

/// Largest cached manifest served from memory; larger ones stream from
/// their file, so a request costs at most this much memory whatever size
/// the cached object has (the store keeps objects up to this size in
/// memory anyway).
pub(crate) const MEMORY_MANIFEST: u64 = 256 * 1024;

/// Read size when a cached manifest above [`MEMORY_MANIFEST`] streams.
const MANIFEST_CHUNK: usize = 32 * 1024;

pub(crate) async fn manifest_by_digest(
    ctx: &Ctx<'_>,
    method: &Method,
    headers: &HeaderMap,
    repo: &str,
    digest: &Digest,
    record: &mut Record,
) -> Result<Response<Body>, HandlerError> {
    let path = format!("/v2/{repo}/manifests/{digest}");
    // Whether the shared tier's copy was found and could not be read
    // (bad bytes, a timeout, an error): then it is not asked again for
    // this request, which goes to the upstream.
    let mut tier_failed = false;
    if let Some(cached) = lookup_manifest(ctx, digest).await? {
        match serve_cached(ctx, method, headers, &path, digest, cached, record).await? {
            Some(resp) => return Ok(resp),
            None => tier_failed = true,
        }
    }
    // Concurrent misses of a digest take turns: the first fetches it, the
    // others then find it cached and are served without holding the turn
    // (a HEAD only looks, it stores nothing). A turn is waited for up to
    // the read timeout.
    let _turn = if *method == Method::GET {
        let key = (ctx.registry.host.clone(), digest.clone());
        let turns = &ctx.shared.manifest_turns;
        let mut turn = turns.take_within(&key, ctx.read_timeout).await;
        if let Some(cached) = lookup_manifest_in(ctx, digest, !tier_failed).await? {
            // A copy in the shared tier is read holding the turn: if it
            // fails, the others wait for this request's upstream fetch
            // instead of each making their own.
            if !matches!(cached, CachedManifest::Shared(..)) {
                turn = None;
            }
            if let Some(resp) =
                serve_cached(ctx, method, headers, &path, digest, cached, record).await?
            {
                return Ok(resp);
            }
        }
        turn
    } else {
        None
    };
    fetch_by_digest(ctx, method, headers, repo, digest, record).await
}

/// A manifest by digest from the upstream, verified, stored, and served;
/// anything but a 200 passed on (and a HEAD too: it stores nothing), a
/// refusal as for a cached manifest.
pub(crate) async fn fetch_by_digest(
    ctx: &Ctx<'_>,
    method: &Method,
    headers: &HeaderMap,
    repo: &str,
    digest: &Digest,
    record: &mut Record,
) -> Result<Response<Body>, HandlerError> {
    let path = format!("/v2/{repo}/manifests/{digest}");
    record.cache = CacheResult::Miss;
    let url = ctx.url(&path, None)?;
    let up = ctx
        .send(method.clone(), url, forward_headers(headers, false))
        .await?;
    if up.response.status() == StatusCode::OK {
        ctx.granted(headers, digest);
    }
    if up.response.status() != StatusCode::OK || *method == Method::HEAD {
        if up.response.status() != StatusCode::OK {
            record.cache = CacheResult::Pass;
        }
        return Ok(ctx.pass_on(up, Object::Manifest));
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

/// A cached manifest, to a client the upstream lets read it. Access first:
/// nothing of the object is read before the client is known to be allowed
/// it (a refused client costs no memory or disk). `None`: the shared
/// tier's copy could not be read (see [`cached_manifest`]).
async fn serve_cached(
    ctx: &Ctx<'_>,
    method: &Method,
    headers: &HeaderMap,
    path: &str,
    digest: &Digest,
    cached: CachedManifest,
    record: &mut Record,
) -> Result<Option<Response<Body>>, HandlerError> {
    if let Some(refusal) = ctx.check_cached(headers, path, digest).await? {
        record.cache = CacheResult::Denied;
        return Ok(Some(refusal));
    }
    record.cache = match cached {
        CachedManifest::Shared(..) => CacheResult::SharedHit,
        _ => CacheResult::Hit,
    };
    let served = cached_manifest(ctx, cached, method).await?;
    // Only what was served counts as used: a bad copy must not be kept
    // recently used in the bucket's eviction order.
    if served.is_some() {
        ctx.served(digest);
    }
    Ok(served)
}

/// Stores a verified manifest; a full or failing disk is logged (and
/// counted) and the manifest served anyway.
pub(crate) async fn store_manifest(
    ctx: &Ctx<'_>,
    digest: &Digest,
    media_type: Option<String>,
    bytes: &[u8],
) {
    // Only objects stored with a manifest media type are served under
    // `/manifests/` later: an upstream that labels a manifest oddly (or
    // not at all) is read by the `mediaType` the manifest names itself.
    let media_type = match media_type {
        Some(mt) if is_manifest_type(&mt) => Some(mt),
        other => named_media_type(bytes).or(other),
    };
    let meta = BlobMeta { media_type };
    if let Err(err) = ctx.shared.store.put(digest, meta.clone(), bytes).await {
        if is_disk_full(&err) {
            ctx.shared.metrics.disk_full();
        }
        tracing::warn!(error = %err, %digest, "cannot cache manifest; serving it uncached");
    }
    if let Some(tier) = &ctx.shared.tier {
        let (tier, digest, bytes) = (
            Arc::clone(tier),
            digest.clone(),
            Bytes::copy_from_slice(bytes),
        );
        tokio::spawn(async move {
            if let Err(err) = tier.put_small(&digest, &meta, bytes).await {
                tracing::debug!(%digest, error = %err, "manifest not copied to shared storage");
            }
        });
    }
}

/// The manifest media type a manifest names in its `mediaType` field.
fn named_media_type(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Named {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<Named>(bytes)
        .ok()?
        .media_type
        .filter(|mt| is_manifest_type(mt))
}

/// A cached object that may be served as a manifest (stored with a
/// manifest media type): the in-memory copy the store keeps of small
/// objects, or only the file's metadata (and a lease on it) — its bytes
/// wait for [`cached_manifest`], after the access check.
pub(crate) enum CachedManifest {
    Memory(Digest, BlobMeta, Bytes),
    File(CachedBlob),
    /// Not on this replica's disk, in the shared tier (only its HEAD
    /// was read).
    Shared(Digest, TierStat),
}

pub(crate) async fn lookup_manifest(
    ctx: &Ctx<'_>,
    digest: &Digest,
) -> Result<Option<CachedManifest>, HandlerError> {
    lookup_manifest_in(ctx, digest, true).await
}

/// [`lookup_manifest`], in the shared tier too only if `tier`.
async fn lookup_manifest_in(
    ctx: &Ctx<'_>,
    digest: &Digest,
    tier: bool,
) -> Result<Option<CachedManifest>, HandlerError> {
    let store = &ctx.shared.store;
    let is_manifest = |meta: &BlobMeta| meta.media_type.as_deref().is_some_and(is_manifest_type);
    // A layer asked for as a manifest is not one, whatever its digest:
    // the upstream answers for it instead.
    if let Some((bytes, meta)) = store.memory_copy(digest) {
        return Ok(is_manifest(&meta).then(|| CachedManifest::Memory(digest.clone(), meta, bytes)));
    }
    if let Some(cached) = store.lookup(digest).await? {
        return Ok(is_manifest(&cached.meta).then_some(CachedManifest::File(cached)));
    }
    let Some(tier) = ctx.shared.tier.as_ref().filter(|_| tier) else {
        return Ok(None);
    };
    match tier.stat(digest).await {
        Ok(Some(stat)) if is_manifest(&stat.meta) && stat.size <= MAX_MANIFEST as u64 => {
            Ok(Some(CachedManifest::Shared(digest.clone(), stat)))
        }
        Ok(_) => Ok(None),
        Err(err) => {
            tracing::debug!(%digest, error = %err, "shared storage not consulted");
            Ok(None)
        }
    }
}

/// Serves a cached manifest once access is granted: from memory when the
/// store keeps it there (the usual case, no file access per request),
/// read whole when it is at most [`MEMORY_MANIFEST`], else streamed from
/// its file; a HEAD reads nothing. `None`: it was in the shared tier,
/// whose copy could not be read; the caller fetches it from the upstream.
pub(crate) async fn cached_manifest(
    ctx: &Ctx<'_>,
    cached: CachedManifest,
    method: &Method,
) -> Result<Option<Response<Body>>, HandlerError> {
    let cached = match cached {
        CachedManifest::Memory(digest, meta, bytes) => {
            return Ok(Some(whole_manifest(&digest, &meta, bytes, method)));
        }
        CachedManifest::Shared(digest, stat) => {
            return Ok(from_shared_tier(ctx, &digest, stat.size)
                .await
                .map(|(bytes, meta)| whole_manifest(&digest, &meta, bytes, method)));
        }
        CachedManifest::File(cached) => cached,
    };
    let media_type = cached.meta.media_type.clone();
    if *method == Method::HEAD {
        return Ok(Some(manifest_response(
            &cached.digest,
            media_type.as_deref(),
            cached.size,
            body::empty(),
        )));
    }
    if cached.size <= MEMORY_MANIFEST
        && let Some((bytes, meta)) = ctx
            .shared
            .store
            .lookup_small(&cached.digest, MEMORY_MANIFEST)
            .await?
    {
        return Ok(Some(manifest_response(
            &cached.digest,
            meta.media_type.as_deref(),
            bytes.len() as u64,
            body::full(bytes),
        )));
    }
    // Small chunks: a large manifest is rare, and many clients that never
    // read it must not each hold much of it.
    let b = body::file_in_chunks(
        std::sync::Arc::clone(&cached.file),
        0,
        cached.size,
        MANIFEST_CHUNK,
    );
    let body = body::hold(b, cached.lease.clone());
    Ok(Some(manifest_response(
        &cached.digest,
        media_type.as_deref(),
        cached.size,
        body,
    )))
}

/// A manifest held whole in memory, as a response (no body for HEAD).
fn whole_manifest(
    digest: &Digest,
    meta: &BlobMeta,
    bytes: Bytes,
    method: &Method,
) -> Response<Body> {
    let size = bytes.len() as u64;
    let body = if *method == Method::HEAD {
        body::empty()
    } else {
        body::full(bytes)
    };
    manifest_response(digest, meta.media_type.as_deref(), size, body)
}

/// A manifest the shared tier holds, verified, and kept on this replica's
/// disk so the next request is a HIT here. `None` when its copy cannot be
/// read: bad bytes (deleted by the tier), a timeout, an error, or gone
/// since its HEAD. The request then goes to the upstream: answering an
/// error instead failed every pull of the digest (and of the tags that
/// point at it) on every replica, and a retry read the same copy again.
async fn from_shared_tier(ctx: &Ctx<'_>, digest: &Digest, size: u64) -> Option<(Bytes, BlobMeta)> {
    let tier = ctx.shared.tier.as_ref()?;
    let (bytes, meta) = match tier.read_small(digest, size).await {
        Ok(Some(found)) => found,
        Ok(None) => {
            tracing::debug!(%digest, "manifest gone from shared storage since its HEAD; fetching it from the upstream");
            return None;
        }
        Err(err) => {
            tracing::warn!(%digest, error = %err, "manifest unreadable from shared storage; fetching it from the upstream");
            return None;
        }
    };
    if let Err(err) = ctx.shared.store.put(digest, meta.clone(), &bytes).await {
        tracing::warn!(error = %err, %digest, "cannot cache manifest from shared storage locally");
    }
    Some((bytes, meta))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_manifest_media_types_are_manifests() {
        for mt in [
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.distribution.manifest.list.v2+json",
            "Application/VND.OCI.image.manifest.v1+json; charset=utf-8",
        ] {
            assert!(is_manifest_type(mt), "{mt}");
        }
        for mt in [
            "application/octet-stream",
            "application/vnd.oci.image.layer.v1.tar+gzip",
            "application/vnd.oci.image.config.v1+json",
            "application/json",
            "",
        ] {
            assert!(!is_manifest_type(mt), "{mt}");
        }
    }

    #[test]
    fn an_unlabelled_manifest_is_known_by_the_type_it_names() {
        let m = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;
        assert_eq!(
            named_media_type(m).as_deref(),
            Some("application/vnd.oci.image.manifest.v1+json")
        );
        let config = br#"{"mediaType":"application/vnd.oci.image.config.v1+json"}"#;
        assert_eq!(named_media_type(config), None);
        assert_eq!(named_media_type(b"\x1f\x8b not json"), None);
    }
}

//! Manifests by tag: tag → digest answers cached per registry TTL, and
//! the last known answer served while the upstream fails (stale-if-error).

use http::header::HeaderMap;
use http::{Method, Response, StatusCode};

use super::context::Ctx;
use super::manifest::{
    MAX_MANIFEST, cached_manifest, lookup_manifest, manifest_response, read_limited, store_manifest,
};
use super::{HandlerError, is_outage};
use crate::cache::tags::TagEntry;
use crate::http::body::{self, Body};
use crate::http::headers::{
    DOCKER_CONTENT_DIGEST, accepts, content_type, forward_headers, relay_parts, relay_response,
};
use crate::observe::access_log::Record;
use crate::observe::labels::CacheResult;
use crate::oci::Digest;

pub(crate) async fn manifest_by_tag(
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
        && let Some(cached) = lookup_manifest(ctx, &entry.digest).await?
    {
        // Access to the digest the tag points at, in this repository:
        // asked before anything of it is read.
        let path = format!("/v2/{repo}/manifests/{}", entry.digest);
        if let Some(refusal) = ctx.check_cached(headers, &path, &entry.digest).await? {
            return Ok(refusal);
        }
        record.cache = CacheResult::Hit;
        record.digest = entry.digest.to_string();
        ctx.served(&entry.digest);
        return cached_manifest(ctx, cached, method).await;
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
                && let Some(cached) = lookup_manifest(ctx, &entry.digest).await?
            {
                // Checked like a fresh tag: with the upstream failing,
                // only what this client class is known to read opens.
                let path = format!("/v2/{repo}/manifests/{}", entry.digest);
                if let Some(refusal) = ctx.check_cached(headers, &path, &entry.digest).await? {
                    record.cache = CacheResult::Denied;
                    return Ok(refusal);
                }
                record.cache = CacheResult::Stale;
                record.digest = entry.digest.to_string();
                tracing::warn!(
                    registry = host,
                    repository = repo,
                    tag,
                    "upstream failing; serving the last known digest"
                );
                ctx.served(&entry.digest);
                return cached_manifest(ctx, cached, method).await;
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
    let (parts, incoming) = up.response.into_parts();
    let media_type = content_type(&parts.headers);
    let claimed = parts
        .headers
        .get(&DOCKER_CONTENT_DIGEST)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Digest::parse(v).ok());

    if *method == Method::HEAD {
        if let (Some(digest), Some(mt)) = (&claimed, &media_type) {
            let size = crate::http::headers::content_length(&parts.headers).unwrap_or(0);
            record.digest = digest.to_string();
            ctx.granted(headers, digest);
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
    ctx.granted(headers, &digest);
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

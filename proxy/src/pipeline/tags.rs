//! Manifests by tag: tag → digest answers trusted as the registry's tag
//! policy says, revalidated with a HEAD once expired (free on Docker Hub,
//! where a GET counts against the pull limit), and the last known answer
//! served while the upstream fails (stale-if-error) or its budget is low
//! (see [`crate::upstream::budget`]).

use http::header::HeaderMap;
use http::{Method, Response, StatusCode};

use super::access::Object;
use super::context::Ctx;
use super::manifest::{
    CachedManifest, MAX_MANIFEST, cached_manifest, fetch_by_digest, lookup_manifest,
    manifest_response, read_limited, store_manifest,
};
use super::{HandlerError, is_outage};
use crate::cache::tags::TagEntry;
use crate::http::body::{self, Body};
use crate::http::headers::{
    DOCKER_CONTENT_DIGEST, LIST_TYPES, accepts, accepts_lists, content_type, forward_headers,
    relay_parts, relay_response,
};
use crate::observe::access_log::Record;
use crate::observe::labels::CacheResult;
use crate::observe::metric_labels::Revalidation;
use crate::oci::Digest;
use crate::upstream::UpstreamResponse;

pub(crate) async fn manifest_by_tag(
    ctx: &Ctx<'_>,
    method: &Method,
    headers: &HeaderMap,
    repo: &str,
    tag: &str,
    record: &mut Record,
) -> Result<Response<Body>, HandlerError> {
    let host = ctx.registry.host.as_str();
    let asked = Asked {
        ctx,
        headers,
        method,
        repo,
        tag,
    };
    let lookup = || {
        ctx.shared
            .tags
            .get(host, repo, tag)
            .filter(|e| answers(e, headers))
    };
    let mut known = lookup();
    let cache_tags = ctx.settings.cache_tags;
    let ttl = ctx.settings.tag_policy.ttl(tag);
    if cache_tags
        && let Some(entry) = &known
        && ttl.is_fresh(entry.resolved_at.elapsed())
        && let Some(cached) = lookup_manifest(ctx, &entry.digest).await?
    {
        return asked.serve(record, entry, cached, CacheResult::Hit).await;
    }

    // Whatever comes next asks the upstream. Concurrent asks for the tag
    // (a rollout's nodes, right after it moved or expired) take turns: the
    // first asks, the others get the answer it stored or confirmed, which
    // is no older than their own request (a `GET` by tag counts against
    // Docker Hub's pull limit; a `ttl: 0s` tag still is asked after each
    // pull began). A HEAD with no manifest cached to answer from goes
    // alone: waiting would only put the free HEADs in a row.
    let worth_a_turn = cache_tags
        && (*method == Method::GET
            || match &known {
                Some(e) => lookup_manifest(ctx, &e.digest).await?.is_some(),
                None => false,
            });
    let _turn = if worth_a_turn {
        let key = (host.to_string(), repo.to_string(), tag.to_string());
        let turn = ctx
            .shared
            .tag_turns
            .take_within(&key, ctx.read_timeout)
            .await;
        known = lookup();
        if let Some(entry) = known.as_ref().filter(|e| e.resolved_at >= record.started)
            && let Some(cached) = lookup_manifest(ctx, &entry.digest).await?
        {
            drop(turn);
            return asked.serve(record, entry, cached, CacheResult::Hit).await;
        }
        turn
    } else {
        None
    };

    if let Some(entry) = known.as_ref().filter(|_| cache_tags)
        && let Some(cached) = lookup_manifest(ctx, &entry.digest).await?
    {
        if ttl.is_fresh(entry.resolved_at.elapsed()) {
            return asked.serve(record, entry, cached, CacheResult::Hit).await;
        }
        // The upstream's budget is nearly spent, or it asked to be left
        // alone (429 + Retry-After): what is cached serves, the budget left
        // goes to pulls that need the upstream.
        if ctx
            .shared
            .budgets
            .is_low(host, ctx.settings.upstream_reserve)
        {
            tracing::debug!(
                registry = host,
                repository = repo,
                tag,
                "upstream budget low; serving the cached digest unrevalidated"
            );
            return asked.serve(record, entry, cached, CacheResult::Stale).await;
        }
        // Expired: does the tag still point there? A HEAD answers without
        // the manifest (and without a Docker Hub pull).
        let url = ctx.url(&format!("/v2/{repo}/manifests/{tag}"), None)?;
        match ctx
            .send(Method::HEAD, url, forward_headers(headers, false))
            .await
        {
            Ok(up)
                if up.response.status() == StatusCode::OK
                    && claimed_digest(&up).as_ref() == Some(&entry.digest) =>
            {
                ctx.shared
                    .metrics
                    .tag_revalidated(host, Revalidation::unchanged);
                ctx.shared
                    .tags
                    .confirm(host, repo, tag, &entry.digest, ctx.source);
                return asked.serve(record, entry, cached, CacheResult::Hit).await;
            }
            Ok(up) if !is_outage(up.response.status()) => {
                // Moved, gone, or a registry that names no digest on HEAD:
                // the GET below finds out.
                ctx.shared
                    .metrics
                    .tag_revalidated(host, Revalidation::changed);
            }
            _ => {
                return asked.serve(record, entry, cached, CacheResult::Stale).await;
            }
        }
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
                return asked.serve(record, entry, cached, CacheResult::Stale).await;
            }
            // A referrers tag the upstream said does not exist: still "no
            // referrers" (a client reads a 404 so and goes on).
            if known.is_none() && ctx.shared.tags.was_absent(host, repo, tag) {
                record.cache = CacheResult::Stale;
                return Ok(manifest_unknown(repo, tag));
            }
            let up = other?;
            record.cache = CacheResult::Pass;
            return Ok(relay_response(up.response));
        }
    };
    if up.response.status() == StatusCode::NOT_FOUND {
        ctx.shared.tags.note_absent(host, repo, tag, ctx.source);
    }
    if up.response.status() != StatusCode::OK {
        record.cache = CacheResult::Pass;
        // A refusal the same as for a tag whose answer is cached: else
        // it told anyone which private tags someone pulled.
        return Ok(ctx.pass_on(up, Object::Manifest));
    }
    let (parts, incoming) = up.response.into_parts();
    let media_type = content_type(&parts.headers);
    let claimed = header_digest(&parts.headers);

    if *method == Method::HEAD {
        if let (Some(digest), Some(mt)) = (&claimed, &media_type) {
            let size = crate::http::headers::content_length(&parts.headers).unwrap_or(0);
            record.digest = digest.to_string();
            ctx.granted(headers, digest);
            remember(
                ctx,
                repo,
                tag,
                TagEntry::new(digest.clone(), mt.clone(), size, accepts_lists(headers)),
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
        remember(
            ctx,
            repo,
            tag,
            TagEntry::new(
                digest.clone(),
                mt.clone(),
                bytes.len() as u64,
                accepts_lists(headers),
            ),
        );
    }
    Ok(manifest_response(
        &digest,
        media_type.as_deref(),
        bytes.len() as u64,
        body::full(bytes),
    ))
}

/// Would the upstream give this client the answer `entry` holds? A list
/// only to a client that takes lists; a manifest picked out of a list
/// (asked without taking lists) only to a client that takes none either.
fn answers(entry: &TagEntry, headers: &HeaderMap) -> bool {
    let takes_lists = accepts_lists(headers);
    accepts(headers, &entry.media_type)
        && if LIST_TYPES.contains(&entry.media_type.as_str()) {
            takes_lists
        } else {
            entry.whole || !takes_lists
        }
}

/// What a client asked for: a tag of a repository.
struct Asked<'a, 'c> {
    ctx: &'a Ctx<'c>,
    headers: &'a HeaderMap,
    method: &'a Method,
    repo: &'a str,
    tag: &'a str,
}

impl Asked<'_, '_> {
    /// Serves the manifest a known tag answer points at, whose bytes are
    /// `cached`, as `result` (a HIT or, with the upstream failing or its
    /// budget low, STALE). Access to the digest in this repository is
    /// checked before anything of it is read; with the upstream failing,
    /// only what this client class is known to read opens.
    async fn serve(
        &self,
        record: &mut Record,
        entry: &TagEntry,
        cached: CachedManifest,
        result: CacheResult,
    ) -> Result<Response<Body>, HandlerError> {
        let Self {
            ctx,
            headers,
            method,
            repo,
            tag,
        } = *self;
        let path = format!("/v2/{repo}/manifests/{}", entry.digest);
        if let Some(refusal) = ctx.check_cached(headers, &path, &entry.digest).await? {
            record.cache = CacheResult::Denied;
            return Ok(refusal);
        }
        if result == CacheResult::Stale {
            tracing::warn!(
                registry = %ctx.registry.host,
                repository = repo,
                tag,
                digest = %entry.digest,
                "upstream failing or sparing its budget; serving the last known digest"
            );
        }
        record.cache = result;
        record.digest = entry.digest.to_string();
        match cached_manifest(ctx, cached, method).await? {
            Some(resp) => {
                ctx.served(&entry.digest);
                Ok(resp)
            }
            // The shared tier's copy could not be read: the digest the tag
            // points at, from the upstream.
            None => fetch_by_digest(ctx, method, headers, repo, &entry.digest, record).await,
        }
    }
}

/// `404 MANIFEST_UNKNOWN`, as a registry answers for a tag it does not have.
fn manifest_unknown(repo: &str, tag: &str) -> Response<Body> {
    let body = serde_json::json!({"errors": [{
        "code": "MANIFEST_UNKNOWN",
        "message": "manifest unknown",
        "detail": {"name": repo, "tag": tag},
    }]});
    let mut resp = Response::new(body::full(bytes::Bytes::from(body.to_string())));
    *resp.status_mut() = StatusCode::NOT_FOUND;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

/// Stores a tag answer; a tag that moved is counted and logged.
fn remember(ctx: &Ctx<'_>, repo: &str, tag: &str, entry: TagEntry) {
    let host = ctx.registry.host.as_str();
    if let Some(moved) = ctx.shared.tags.put(host, repo, tag, entry, ctx.source) {
        ctx.shared.metrics.tag_moved(host);
        tracing::info!(
            registry = host,
            repository = repo,
            tag,
            from = %moved.from,
            to = %moved.to,
            "tag moved"
        );
    }
}

fn header_digest(headers: &HeaderMap) -> Option<Digest> {
    headers
        .get(&DOCKER_CONTENT_DIGEST)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Digest::parse(v).ok())
}

fn claimed_digest(up: &UpstreamResponse) -> Option<Digest> {
    header_digest(up.response.headers())
}

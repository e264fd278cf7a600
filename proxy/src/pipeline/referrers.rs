//! `GET /v2/<repo>/referrers/<digest>` (OCI 1.1): the signatures, SBOMs
//! and other artifacts that refer to a digest. Cached like a tag answer
//! (fresh for the registry's `tagTTL`: a new signature appears within it),
//! the index stored by its digest like any manifest, and served while the
//! upstream fails. A registry without the API answers 404, remembered too,
//! so that in an outage clients still fall back to the `sha256-<hex>` tag
//! schema, whose tags the proxy caches as tags.
//!
//! A cached answer is served only to a client the registry lets read the
//! subject in that repository (asked with a HEAD of the subject, as for any
//! cached manifest): the upstream's own 200 for the referrers of a digest
//! proves nothing, since registries answer it for digests they do not hold.

use http::header::HeaderMap;
use http::{HeaderValue, Method, Response, StatusCode};

use super::access::Object;
use super::context::Ctx;
use super::manifest::{
    MAX_MANIFEST, cached_manifest, lookup_manifest, read_limited, store_manifest,
};
use super::{HandlerError, is_outage};
use crate::cache::referrers::{Answer, Referrers};
use crate::http::body::{self, Body};
use crate::http::headers::{UpstreamAnswer, content_type, forward_headers, relay_response};
use crate::observe::access_log::Record;
use crate::observe::labels::CacheResult;
use crate::oci::Digest;

const FILTERS_APPLIED: &str = "oci-filters-applied";
const INDEX: &str = "application/vnd.oci.image.index.v1+json";

pub(crate) async fn referrers(
    ctx: &Ctx<'_>,
    method: &Method,
    headers: &HeaderMap,
    repo: &str,
    subject: &Digest,
    query: Option<&str>,
    record: &mut Record,
) -> Result<Response<Body>, HandlerError> {
    let host = ctx.registry.host.as_str();
    let query = query.unwrap_or_default();
    let known = ctx.shared.referrers.get(host, repo, subject, query);
    if let Some(answer) = known
        .as_ref()
        .filter(|a| ctx.settings.cache_tags && a.fetched.elapsed() < ctx.registry.tag_ttl)
        && let Some(resp) = serve_known(
            ctx,
            headers,
            repo,
            subject,
            answer,
            method,
            record,
            CacheResult::Hit,
        )
        .await?
    {
        return Ok(resp);
    }
    record.cache = CacheResult::Miss;
    let url = ctx.url(&format!("/v2/{repo}/referrers/{subject}"), Some(query))?;
    let up = match ctx
        .send(Method::GET, url, forward_headers(headers, false))
        .await
    {
        Ok(up) if !is_outage(up.response.status()) => up,
        other => {
            if let Some(answer) = &known
                && let Some(resp) = serve_known(
                    ctx,
                    headers,
                    repo,
                    subject,
                    answer,
                    method,
                    record,
                    CacheResult::Stale,
                )
                .await?
            {
                tracing::warn!(registry = host, repository = repo, %subject, "upstream failing; serving the last referrers answer");
                return Ok(resp);
            }
            let up = other?;
            record.cache = CacheResult::Pass;
            return Ok(relay_response(up.response));
        }
    };
    match up.response.status() {
        StatusCode::NOT_FOUND => {
            // "No referrers API here" only if this client may read the
            // subject: a registry hiding a repository from a client
            // answers 404 too, and that must not become every client's
            // answer (an authorised one would get no referrers for
            // `tagTTL`).
            let path = format!("/v2/{repo}/manifests/{subject}");
            record.cache = CacheResult::Pass;
            match ctx.check_cached(headers, &path, subject).await? {
                None => ctx.shared.referrers.put(
                    host,
                    repo,
                    subject,
                    query,
                    Referrers::Unsupported,
                    ctx.source,
                ),
                // Refused the subject: the refusal a known answer gets
                // (see `serve_known`), or the upstream's 404 would tell
                // that nobody asked about the subject here lately. An
                // access check that got no answer (429, 503: the proxy's
                // own) leaves the upstream's answer as it was.
                Some(refusal) if refusal.extensions().get::<UpstreamAnswer>().is_some() => {
                    return Ok(refusal);
                }
                Some(_) => {}
            }
            Ok(relay_response(up.response))
        }
        // As a known answer's refusal too (see `Ctx::pass_on`).
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            record.cache = CacheResult::Pass;
            Ok(ctx.pass_on(up, Object::Manifest))
        }
        StatusCode::OK => {
            let (parts, incoming) = up.response.into_parts();
            let media_type = content_type(&parts.headers).unwrap_or_else(|| INDEX.to_string());
            let filters_applied = parts
                .headers
                .get(FILTERS_APPLIED)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let bytes = read_limited(incoming, MAX_MANIFEST, ctx.read_timeout, host).await?;
            let digest = Digest::of(&bytes);
            store_manifest(ctx, &digest, Some(media_type.clone()), &bytes).await;
            // No grant for the subject: a registry with the API answers
            // 200 (an empty index) for any digest, held by the repository
            // or not, so this answer says nothing about whether the client
            // may read the subject there (granting it opened any cached
            // digest through any repository the client can list).
            ctx.shared.referrers.put(
                host,
                repo,
                subject,
                query,
                Referrers::Index {
                    digest: digest.clone(),
                    filters_applied: filters_applied.clone(),
                },
                ctx.source,
            );
            record.digest = digest.to_string();
            let mut resp = Response::new(if *method == Method::HEAD {
                body::empty()
            } else {
                body::full(bytes.clone())
            });
            set_headers(
                &mut resp,
                &media_type,
                bytes.len() as u64,
                filters_applied.as_deref(),
            );
            Ok(resp)
        }
        _ => {
            record.cache = CacheResult::Pass;
            Ok(relay_response(up.response))
        }
    }
}

/// A known answer, if it can still be served (its index may have been
/// evicted). Access to the subject in this repository is checked first:
/// what refers to a digest says something about it.
#[allow(clippy::too_many_arguments)]
async fn serve_known(
    ctx: &Ctx<'_>,
    headers: &HeaderMap,
    repo: &str,
    subject: &Digest,
    answer: &Answer,
    method: &Method,
    record: &mut Record,
    result: CacheResult,
) -> Result<Option<Response<Body>>, HandlerError> {
    let path = format!("/v2/{repo}/manifests/{subject}");
    if let Some(refusal) = ctx.check_cached(headers, &path, subject).await? {
        record.cache = CacheResult::Denied;
        return Ok(Some(refusal));
    }
    match &answer.referrers {
        Referrers::Unsupported => {
            record.cache = result;
            // As a registry without the API answers (distribution's
            // router): no OCI error code, which clients (oras-go,
            // go-containerregistry) read as "no referrers API here" and fall
            // back to the tag schema; NAME_UNKNOWN would mean "no such
            // repository" to them.
            let mut resp = Response::new(body::full(bytes::Bytes::from_static(
                b"404 page not found\n",
            )));
            *resp.status_mut() = StatusCode::NOT_FOUND;
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            Ok(Some(resp))
        }
        Referrers::Index {
            digest,
            filters_applied,
        } => {
            let Some(cached) = lookup_manifest(ctx, digest).await? else {
                return Ok(None);
            };
            // The shared tier's copy could not be read: not answered
            // from the cache, the upstream is asked.
            let Some(mut resp) = cached_manifest(ctx, cached, method).await? else {
                return Ok(None);
            };
            record.cache = result;
            record.digest = digest.to_string();
            ctx.served(digest);
            // A referrers answer, not a manifest: no Docker-Content-Digest.
            resp.headers_mut()
                .remove(crate::http::headers::DOCKER_CONTENT_DIGEST);
            if let Some(f) = filters_applied
                && let Ok(v) = HeaderValue::from_str(f)
            {
                resp.headers_mut().insert(FILTERS_APPLIED, v);
            }
            Ok(Some(resp))
        }
    }
}

fn set_headers(resp: &mut Response<Body>, media_type: &str, len: u64, filters: Option<&str>) {
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(media_type) {
        h.insert(http::header::CONTENT_TYPE, v);
    }
    h.insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Some(f) = filters
        && let Ok(v) = HeaderValue::from_str(f)
    {
        h.insert(FILTERS_APPLIED, v);
    }
}

//! Where a merged download reads a missed blob from, chosen by its
//! leader: the upstream, the shared tier (another replica fetched it), or
//! the replica that owns the digest — and how a download from a peer
//! continues from the upstream when that peer dies. The download itself is
//! in `download`.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::HeaderMap;
use http::{Method, Response, StatusCode, Uri};

use super::HandlerError;
use super::access::Object;
use super::access::refusal;
use super::context::Ctx;
use super::download::{resume, start};
use crate::cache::inflight::{self, Download, Inflight, Phase};
use crate::cache::shared::{SharedTier, TierStat};
use crate::http::body::{self, Body};
use crate::http::headers::{content_length, content_type, forward_headers, relay_response};
use crate::observe::access_log::Record;
use crate::observe::labels::CacheResult;
use crate::oci::Digest;

/// Publishes `NotStarted` and unregisters the download unless disarmed,
/// so waiters never hang on a leader that gave up.
pub(super) struct LeadGuard<'a> {
    inflight: &'a Inflight,
    digest: &'a Digest,
    pub(super) dl: Option<Arc<Download>>,
    /// Whether a waiter should lead the next try (see `Phase::NotStarted`).
    hand_over: bool,
}

impl<'a> LeadGuard<'a> {
    /// Taken the moment a request becomes the leader, before anything it
    /// awaits: a leader that returns early (a refusal, an error) or whose
    /// client leaves must not leave its waiters, and every later request
    /// for the digest, waiting on a download that never starts.
    pub(super) fn new(inflight: &'a Inflight, digest: &'a Digest, dl: Arc<Download>) -> Self {
        Self {
            inflight,
            digest,
            dl: Some(dl),
            hand_over: true,
        }
    }

    /// The upstream itself failed this leader: another leader would wait
    /// out the same failure, so the waiters ask on their own.
    fn upstream_failed(&mut self) {
        self.hand_over = false;
    }
}

impl Drop for LeadGuard<'_> {
    fn drop(&mut self) {
        if let Some(dl) = self.dl.take() {
            // Unregistered first: a waiter woken by `NotStarted` that asks
            // again must find no download or a new one, not this dead one.
            self.inflight.finish(self.digest, &dl);
            dl.publish(Phase::NotStarted {
                hand_over: self.hand_over,
            });
        }
    }
}

/// Where a merged download reads the blob from.
pub(crate) enum Source {
    /// The registry, at this URL, with the leading client's credentials.
    Upstream(Uri),
    /// The shared tier, which holds the blob: no upstream request at all.
    Tier(Arc<SharedTier>, TierStat),
    /// The replica that owns the digest (its own merged download serves
    /// this one); the upstream URL if it cannot be reached.
    Peer(SocketAddr, Uri),
}

/// The first client to miss `digest`: fetches it once for everyone.
pub(crate) async fn lead(
    ctx: &Ctx<'_>,
    headers: &HeaderMap,
    digest: &Digest,
    source: Source,
    mut guard: LeadGuard<'_>,
    record: &mut Record,
) -> Result<Response<Body>, HandlerError> {
    let url = match source {
        Source::Upstream(url) => url,
        Source::Peer(peer, url) => match from_peer(ctx, headers, digest, peer, record).await {
            Some(Ok(opened)) => {
                return start(ctx, headers, digest, opened, &mut guard, record).await;
            }
            Some(Err(refusal)) => return Ok(refusal),
            None => url,
        },
        Source::Tier(tier, stat) => match tier.open(digest, 0).await {
            Ok(Some(chunks)) => {
                record.cache = CacheResult::SharedHit;
                // A bad object in the bucket would otherwise fail every
                // pull of the digest, on every replica, for good (each
                // read even keeps it recently used).
                let bad = digest.clone();
                let discard: Discard = Box::new(move || {
                    tokio::spawn(async move {
                        match tier.delete(&bad).await {
                            Ok(()) => tracing::warn!(digest = %bad,
                                "the shared storage's copy failed its digest; deleted, the next pull fetches it from the upstream"),
                            Err(err) => tracing::warn!(digest = %bad, error = %err,
                                "the shared storage's copy failed its digest and could not be deleted"),
                        }
                    });
                });
                let opened = Opened {
                    body: body::stream(chunks),
                    size: Some(stat.size),
                    media_type: stat.meta.media_type,
                    from_upstream: false,
                    // The bucket failing mid-blob: the rest from the
                    // upstream, as for a peer.
                    takeover: Some(Takeover {
                        resume: resume(ctx, &upstream_path(ctx, digest), headers),
                        failed: Box::new(|| {}),
                    }),
                    discard: Some(discard),
                };
                return start(ctx, headers, digest, opened, &mut guard, record).await;
            }
            // Gone since the HEAD (evicted) or the tier failed: the
            // upstream it is.
            Ok(None) => ctx.url(&upstream_path(ctx, digest), None)?,
            Err(err) => {
                tracing::debug!(%digest, error = %err, "shared storage read failed; fetching from the upstream");
                ctx.url(&upstream_path(ctx, digest), None)?
            }
        },
    };
    let up = match ctx
        .send(Method::GET, url, forward_headers(headers, false))
        .await
    {
        Ok(up) => up,
        Err(err) => {
            guard.upstream_failed();
            return Err(err);
        }
    };
    if up.response.status() != StatusCode::OK {
        let status = up.response.status();
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            guard.upstream_failed();
        }
        record.cache = CacheResult::Pass;
        return Ok(ctx.pass_on(up, Object::Blob));
    }
    ctx.granted(headers, digest);
    if up.hops > 0 {
        tracing::debug!(%digest, from = %crate::upstream::redact(&up.final_url), hops = up.hops, "blob served by redirect target");
    }
    let (parts, incoming) = up.response.into_parts();
    let opened = Opened {
        media_type: content_type(&parts.headers),
        size: content_length(&parts.headers),
        body: body::relay(incoming),
        from_upstream: true,
        takeover: None,
        discard: None,
    };
    start(ctx, headers, digest, opened, &mut guard, record).await
}

/// Asks the owning replica for the blob. `None`: it cannot serve it (it
/// is suspected for a while, the caller goes to the upstream): it cannot
/// be reached, or it answered with something of its own (a refusal while
/// replicas load a new config at different times, an error of its disk);
/// `Some(Err(response))`: the upstream's own answer when that is not the
/// blob (a refusal, a 404, its error), passed on as the upstream's would
/// be.
/// Bytes of the owner's that fail the digest suspect it too (`discard`),
/// so the next try goes to the upstream, not to the same owner again.
async fn from_peer(
    ctx: &Ctx<'_>,
    headers: &HeaderMap,
    digest: &Digest,
    peer: SocketAddr,
    record: &mut Record,
) -> Option<Result<Opened, Response<Body>>> {
    let peers = ctx.shared.peers.as_ref()?;
    let path = upstream_path(ctx, digest);
    let asked = peers
        .client
        .get(
            peer,
            &ctx.registry.host,
            &path,
            forward_headers(headers, false),
            ctx.read_timeout,
        )
        .await;
    let resp = match asked {
        Ok(resp) => resp,
        Err(err) => {
            tracing::warn!(%digest, error = %err, "owner replica unreachable; fetching from the upstream");
            peers.members.suspect(peer);
            return None;
        }
    };
    if resp.status() != StatusCode::OK {
        if resp
            .headers()
            .contains_key(super::access::UPSTREAM_ANSWER_HEADER)
        {
            record.cache = CacheResult::Pass;
            let status = resp.status();
            // A refusal is made here again, as this replica makes it for
            // a blob it holds or asks the upstream for: the same to the
            // client whichever replica answered, and whatever version
            // the owner runs. Where the upstream's answer came from was
            // the owner's to judge (a storage 403 it passed on reads as
            // a refusal here, which to the client it is).
            if refusal::verdict(status, false) == refusal::Verdict::Refused {
                return Some(Err(ctx.refusal(status, Object::Blob, resp.headers())));
            }
            let mut relayed = relay_response(resp);
            relayed
                .headers_mut()
                .remove(super::access::UPSTREAM_ANSWER_HEADER);
            return Some(Err(relayed));
        }
        // Relayed, this made the owner's answer final: each retry asked
        // it again and got the same.
        tracing::warn!(%digest, %peer, status = %resp.status(),
            "owner replica answered on its own without the blob; fetching from the upstream");
        peers.members.suspect(peer);
        return None;
    }
    // The owner may have served it on an answer it kept (a public grant
    // up to an hour old, or one kept through an outage): kept here as old
    // as it is there. Stamped as a fresh yes, it kept the blob open here,
    // and on every replica once shared, past the owner's own window. No
    // age (served on no yes at all): nothing is kept, the next ask here
    // checks for itself.
    if let Some(age) = resp
        .headers()
        .get(super::access::GRANT_AGE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        ctx.granted_by_peer(headers, digest, std::time::Duration::from_millis(age));
    }
    tracing::debug!(%digest, %peer, "blob streamed from its owner replica");
    let members = Arc::clone(&peers.members);
    let bad = (Arc::clone(&peers.members), digest.clone());
    let (parts, incoming) = resp.into_parts();
    Some(Ok(Opened {
        media_type: content_type(&parts.headers),
        size: content_length(&parts.headers),
        body: body::relay(incoming),
        from_upstream: false,
        takeover: Some(Takeover {
            resume: resume(ctx, &path, headers),
            failed: Box::new(move || members.suspect(peer)),
        }),
        discard: Some(Box::new(move || {
            let (members, digest) = bad;
            tracing::warn!(%digest, %peer,
                "the owner replica's bytes failed their digest; its digests go to the others for now, the next pull fetches from the upstream");
            members.suspect(peer);
        })),
    }))
}

/// How a download from a peer continues when that peer dies mid-way:
/// from the upstream, with `Range` from the bytes already written (and
/// hashed), so nothing is fetched twice and the digest is checked over
/// the whole.
pub(crate) struct Takeover {
    pub(super) resume: inflight::Resume,
    pub(super) failed: Box<dyn FnOnce() + Send>,
}

pub(super) fn upstream_path(ctx: &Ctx<'_>, digest: &Digest) -> String {
    format!(
        "/v2/{}/blobs/{digest}",
        ctx.repo.as_deref().unwrap_or_default()
    )
}

/// A source answered with the blob.
pub(super) struct Opened {
    pub(super) body: Body,
    pub(super) size: Option<u64>,
    pub(super) media_type: Option<String>,
    /// Copy it to the shared tier once committed (not when it came from
    /// there).
    pub(super) from_upstream: bool,
    pub(super) takeover: Option<Takeover>,
    /// Run when the bytes fail their digest: the source's copy is bad.
    pub(super) discard: Option<Discard>,
}

/// What to do with a source whose copy turned out bad.
pub(super) type Discard = Box<dyn FnOnce() + Send>;

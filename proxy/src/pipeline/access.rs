//! The auth gate before cached content is served. The cache holds one
//! copy per digest for every client and every repository, so an object is
//! served only to a client the upstream recently let read *that digest in
//! that repository of that registry*: this module keeps those answers
//! ([`AccessGrants`]) and asks the upstream when it has none. A 404 is a
//! refusal (the repository does not hold the digest), and an upstream that
//! cannot answer (unreachable, 429, 5xx) opens only what this client class
//! is already known to read, unless the registry opts in with
//! `serveCachedOnAuthError`.

mod grants;
pub(super) mod refusal;

use std::time::{Duration, Instant};

use http::header::{self, HeaderMap};
use http::{Method, Response, StatusCode};

pub use grants::{AccessGrants, Answered, OUTAGE_GRACE, PUBLIC_TTL, SharedGrant, client_key};
pub(crate) use refusal::Object;
use refusal::{Verdict, refusal, verdict};

/// On a blob the peer listener serves another replica: milliseconds
/// since the upstream's yes that let the client read it (absent: served
/// on none, e.g. `serveCachedOnAuthError`). The replica that asked keeps
/// the grant that old, never as new.
pub(crate) const GRANT_AGE_HEADER: &str = "x-pullthrough-grant-age-ms";

/// On an answer other than a 200 the peer listener gives another replica:
/// the answer is the upstream's own (a refusal, a 404, its error), which
/// the replica that asked would get from the upstream too, so it relays
/// it. Without it the answer is this replica's own (a refusal of a
/// config not yet reloaded, a disk error), and the replica that asked
/// fetches from the upstream instead.
pub(crate) const UPSTREAM_ANSWER_HEADER: &str = "x-pullthrough-upstream-answer";

use super::HandlerError;
use super::context::Ctx;
use crate::http::body::{self, Body};
use crate::http::headers::{forward_headers, relay_response};
use crate::observe::metric_labels::AuthResult;
use crate::oci::{self, Digest, ErrorCode};
use crate::upstream::{Origin, UpstreamResponse};

/// What the upstream said when asked whether a client may read an object.
enum Answer {
    /// 2xx, or a redirect to storage (the registry only redirects a
    /// client it let read the object).
    Allowed,
    /// The registry itself refused (401, 403) or does not hold the object
    /// in this repository (404 and any other answer that is no outage).
    Refused(Response<Body>),
    /// Unreachable, timed out, 429 or 5xx: no answer about access.
    Outage,
    /// The realm of the proxy's own anonymous token failed: no answer for
    /// a client without credentials, though the registry itself may still
    /// answer a client's own.
    TokenOutage,
    /// The proxy's own throttle on token requests for new repositories
    /// (see `upstream::throttle`) kept it from asking: the client caused
    /// it, so nothing opens — not even what an outage would open — and it
    /// is told to come back later.
    Throttled(Response<Body>),
}

impl Ctx<'_> {
    /// Asked before cached content of `digest` is served under the
    /// repository: `None` when this client may have it, else the refusal
    /// to send. The cache is shared by every client and every repository,
    /// so without this a private image pulled once would be served to
    /// anyone afterwards, under any repository name.
    ///
    /// A digest anonymous clients may read in this repository (learnt
    /// from an anonymous pull, or one anonymous ask about `path`) is served
    /// to everyone for [`PUBLIC_TTL`] with no upstream contact. Otherwise
    /// the upstream is asked with the client's own credentials (a request
    /// for `path`, which names the repository and the digest: see
    /// [`Ctx::ask`]), and the answer
    /// reused for `authCheckTTL`; a client without any is asked about
    /// with the registry's `credentialsFile` if it has one (not
    /// `private`), as its misses are fetched. While the upstream cannot
    /// answer, only what this client class was let read within
    /// [`OUTAGE_GRACE`] is served (or everything, with the registry's
    /// `serveCachedOnAuthError`): failing closed, so a rate-limited or
    /// failing upstream opens nothing it would refuse.
    pub(crate) async fn check_cached(
        &self,
        headers: &HeaderMap,
        path: &str,
        digest: &Digest,
    ) -> Result<Option<Response<Body>>, HandlerError> {
        let Some(repo) = self.repo.as_deref() else {
            return Ok(None);
        };
        let host = self.registry.host.as_str();
        let grants = &self.shared.grants;
        let metrics = &self.shared.metrics;
        let client = client_key(headers);
        let private = self.settings.private;
        // A client without credentials reads as the proxy serves such
        // clients: anonymously, or with the registry's credentialsFile.
        let basis = self.settings.anonymous_basis();
        let kept = (!private)
            .then(|| grants.public_at(host, repo, digest, basis, PUBLIC_TTL))
            .flatten()
            .or_else(|| grants.allowed_at(host, repo, digest, &client, self.auth_ttl));
        if let Some(at) = kept {
            self.answered_yes(at);
            return Ok(None);
        }
        let mut answer = None;
        if !client.is_empty() && !private {
            // Would an anonymous client get it? Then it is public content.
            let mut anonymous = forward_headers(headers, false);
            anonymous.remove(header::AUTHORIZATION);
            match self.ask(path, anonymous).await? {
                Answer::Allowed => {
                    grants.grant(host, repo, digest, "", basis, self.source);
                    self.answered_yes(Instant::now());
                    metrics.auth_check(host, AuthResult::public);
                    return Ok(None);
                }
                // No answer now: the client's own ask would get none either.
                Answer::Outage => answer = Some(Answer::Outage),
                // Only the proxy's anonymous token failed: the client's
                // own credentials may still get the registry's answer.
                Answer::TokenOutage => {}
                // The proxy's credentials are not used for a client
                // bringing its own: ask with those.
                Answer::Throttled(_) => {}
                // Not public (any more): an outage of the client's own
                // ask must not open it as public content.
                Answer::Refused(_) => grants.refuse_public(host, repo, digest, self.source),
            }
        }
        let answer = match answer {
            Some(a) => a,
            None => self.ask(path, forward_headers(headers, false)).await?,
        };
        if client.is_empty() && matches!(answer, Answer::Refused(_)) {
            grants.refuse_public(host, repo, digest, self.source);
        }
        match answer {
            Answer::Allowed => {
                metrics.auth_check(host, AuthResult::allowed);
                self.grant(repo, digest, &client);
                Ok(None)
            }
            Answer::Refused(resp) => {
                metrics.auth_check(host, AuthResult::denied);
                Ok(Some(resp))
            }
            Answer::Throttled(resp) => {
                metrics.auth_check(host, AuthResult::throttled);
                Ok(Some(resp))
            }
            Answer::Outage | Answer::TokenOutage => {
                metrics.auth_check(host, AuthResult::unreachable);
                let known_at = (!private)
                    .then(|| grants.public_at(host, repo, digest, basis, OUTAGE_GRACE))
                    .flatten()
                    .or_else(|| grants.allowed_at(host, repo, digest, &client, OUTAGE_GRACE));
                // Served on an old yes, or on none (serveCachedOnAuthError):
                // a peer is told how old, or nothing.
                if let Some(at) = known_at {
                    self.answered_yes(at);
                }
                let known = known_at.is_some();
                if known || self.registry.serve_cached_on_auth_error {
                    tracing::warn!(registry = host, repository = repo, %digest, known,
                        "cannot ask the upstream about access; serving from cache");
                    return Ok(None);
                }
                tracing::warn!(registry = host, repository = repo, %digest,
                    "cannot ask the upstream about access; not serving content this client was never let read");
                Ok(Some(
                    oci::error_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        ErrorCode::Unavailable,
                        // Not the digest: for a tag it is the cached
                        // answer, which this client may not learn.
                        &format!("{host} cannot confirm access to {repo} now; try again later"),
                    )
                    .map(body::full),
                ))
            }
        }
    }

    /// One request for `path` (which names the repository and the digest)
    /// with `headers`; what it says about access.
    ///
    /// A blob is asked for with a one-byte GET, not a HEAD: where reading
    /// and checking need different rights (ECR: a push-only role may HEAD
    /// any layer, to skip uploading it, but not download it), a HEAD's
    /// yes is no right to read. A manifest keeps the HEAD: a GET of one
    /// counts against Docker Hub's pull limit and a HEAD does not, and no
    /// registry known splits the two rights for manifests.
    async fn ask(&self, path: &str, mut headers: HeaderMap) -> Result<Answer, HandlerError> {
        let host = self.registry.host.as_str();
        let repo = self.repo.as_deref().unwrap_or_default();
        let url = self.url(path, None)?;
        let object = Object::of_path(path);
        let method = match object {
            Object::Blob => {
                headers.insert(header::RANGE, header::HeaderValue::from_static("bytes=0-0"));
                Method::GET
            }
            Object::Manifest => Method::HEAD,
        };
        // The body of a GET is never read: dropping the answer closes that
        // connection, which costs less than reading a registry that ignores
        // the range.
        let up = match self.send(method, url, headers).await {
            Ok(up) => up,
            Err(err) if err.is_throttled() => {
                return Ok(Answer::Throttled(err.into_response()));
            }
            Err(err) if err.is_anonymous_token_failure() => {
                tracing::warn!(error = %err, registry = host, repository = repo,
                    "cannot ask the upstream about access as an anonymous client");
                return Ok(Answer::TokenOutage);
            }
            Err(err) => {
                tracing::warn!(error = %err, registry = host, repository = repo,
                    "cannot ask the upstream about access");
                return Ok(Answer::Outage);
            }
        };
        let status = up.response.status();
        // Rebuilt, not relayed (see `refusal`); besides, the answer to a
        // HEAD has no body but may announce one, and a GET's body is not
        // read.
        Ok(match verdict(status, self.answered_elsewhere(&up)) {
            Verdict::Allowed => Answer::Allowed,
            Verdict::Outage => Answer::Outage,
            Verdict::Refused => {
                Answer::Refused(self.refusal(status, object, up.response.headers()))
            }
        })
    }

    /// The upstream's answer to this client's own read of a blob or a
    /// manifest (by digest or by tag) that the cache did not serve, as the
    /// client gets it: a refusal the same as [`Ctx::check_cached`] gives
    /// for a cached object (see `refusal`), anything else relayed.
    pub(crate) fn pass_on(&self, up: UpstreamResponse, object: Object) -> Response<Body> {
        let status = up.response.status();
        match verdict(status, self.answered_elsewhere(&up)) {
            Verdict::Refused => self.refusal(status, object, up.response.headers()),
            Verdict::Allowed | Verdict::Outage => relay_response(up.response),
        }
    }

    /// The refusal of `status` for this request's repository, as every
    /// path gives it; `upstream`: the headers of the upstream's answer.
    pub(crate) fn refusal(
        &self,
        status: StatusCode,
        object: Object,
        upstream: &HeaderMap,
    ) -> Response<Body> {
        let repo = self.repo.as_deref().unwrap_or_default();
        refusal(status, &self.registry.host, repo, object, upstream)
    }

    /// Did the answer come from another origin than the registry's (a
    /// redirect to storage)?
    fn answered_elsewhere(&self, up: &UpstreamResponse) -> bool {
        // Any path: the origin is the registry's upstream URL's.
        let asked = self
            .url("/v2/", None)
            .ok()
            .and_then(|u| Origin::of(&u).ok());
        up.hops > 0 && Origin::of(&up.final_url).ok() != asked
    }

    fn grant(&self, repo: &str, digest: &Digest, client: &str) {
        self.grant_at(repo, digest, client, Instant::now());
    }

    fn grant_at(&self, repo: &str, digest: &Digest, client: &str, at: Instant) {
        let host = &self.registry.host;
        let answered = Answered {
            at,
            source: self.source,
        };
        if self.settings.private {
            // Never "public": every client is checked.
            self.shared
                .grants
                .grant_client_at(host, repo, digest, client, answered);
        } else {
            let basis = self.settings.anonymous_basis();
            self.shared
                .grants
                .grant_at(host, repo, digest, client, basis, answered);
        }
        self.answered_yes(at);
    }

    /// Notes that the upstream just served this client `digest` in the
    /// repository.
    pub(crate) fn granted(&self, headers: &HeaderMap, digest: &Digest) {
        if let Some(repo) = &self.repo {
            self.grant(repo, digest, &client_key(headers));
        }
    }

    /// Notes that the owning replica served this client `digest` on the
    /// upstream's yes of `age` ago (its [`GRANT_AGE_HEADER`]): kept as old
    /// as it is, so a replica never holds a peer's answer longer than the
    /// peer itself would.
    pub(crate) fn granted_by_peer(&self, headers: &HeaderMap, digest: &Digest, age: Duration) {
        if let (Some(repo), Some(at)) = (&self.repo, Instant::now().checked_sub(age)) {
            self.grant_at(repo, digest, &client_key(headers), at);
        }
    }

    /// Records what this request's access rests on: the upstream's yes
    /// given at `at` (the latest, when several).
    fn answered_yes(&self, at: Instant) {
        let mut yes = self.yes_at.lock().unwrap_or_else(|p| p.into_inner());
        if yes.is_none_or(|mine| mine < at) {
            *yes = Some(at);
        }
    }

    /// How old the upstream's yes this request rests on is, if any.
    pub(crate) fn yes_age(&self) -> Option<Duration> {
        let yes = self.yes_at.lock().unwrap_or_else(|p| p.into_inner());
        yes.map(|at| at.elapsed())
    }

    /// Notes that `digest` belongs to the repository (admin API, purge).
    pub(crate) fn served(&self, digest: &Digest) {
        if let Some(journal) = &self.shared.journal {
            journal.touch(digest);
        }
        if let Some(repo) = &self.repo {
            self.shared.repos.note(&self.registry.host, repo, digest);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_server_is_one_origin_however_written() {
        let o = |u: &str| crate::upstream::Origin::of(&u.parse().unwrap()).ok();
        assert_eq!(o("https://Quay.io/v2/"), o("https://quay.io:443/x"));
        assert_eq!(o("https://reg.example./v2/"), o("https://reg.example/x"));
        assert_eq!(o("http://r:80/a"), o("http://r/b"));
        assert_ne!(o("https://r/a"), o("http://r/a"));
        assert_ne!(o("https://r/a"), o("https://r:5000/a"));
        assert_ne!(o("https://r/a"), o("https://storage.r/a"));
    }
}

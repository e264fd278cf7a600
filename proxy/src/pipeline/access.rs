//! The auth gate before cached content is served. The cache holds one
//! copy per digest for every client, so a private repository's content is
//! served only to clients the upstream recently let read it: this module
//! keeps those answers ([`AccessGrants`]) and asks the upstream when it
//! has none.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap};
use http::{Method, Response, StatusCode};

use super::HandlerError;
use super::context::Ctx;
use crate::http::body::{self, Body};
use crate::http::headers::forward_headers;
use crate::observe::metrics::AuthResult;
use crate::oci::{self, Digest, ErrorCode};

/// How long "anyone may read this repository" is trusted. Public content is
/// then served to every client with no upstream contact at all, which is
/// what keeps by-digest pulls working through an outage.
pub const PUBLIC_TTL: Duration = Duration::from_secs(3600);

/// Entries kept before expired ones are swept out.
const MAX_GRANTS: usize = 10_000;

/// Which clients the upstream recently let read a repository, so the cache
/// (one copy per digest, shared by everyone) serves a private repository's
/// content only to clients the upstream currently authorises (DESIGN.md,
/// Cache semantics). Keyed by registry, repository and a hash of the
/// client's Authorization header (empty for none), so credentials are
/// never kept in memory as such.
#[derive(Debug, Default)]
pub struct AccessGrants {
    grants: Mutex<HashMap<(String, String, String), Instant>>,
    /// Repositories a client without credentials was allowed to read, and
    /// the basis it read them on: `""` anonymously, else the fingerprint
    /// of the proxy's `credentialsFile` credentials it was served with.
    public: Mutex<HashMap<(String, String), (Instant, String)>>,
}

/// The grant key of a client: sha256 of its Authorization header, or ""
/// for a client without one.
pub fn client_key(headers: &HeaderMap) -> String {
    use sha2::Digest as _;
    headers
        .get(http::header::AUTHORIZATION)
        .map(|v| hex::encode(sha2::Sha256::digest(v.as_bytes())))
        .unwrap_or_default()
}

impl AccessGrants {
    /// True when the upstream let `client` read `repo` within `ttl`
    /// (`authCheckTTL`, default 60 s).
    pub fn allowed(&self, registry: &str, repo: &str, client: &str, ttl: Duration) -> bool {
        let grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        grants
            .get(&(registry.to_string(), repo.to_string(), client.to_string()))
            .is_some_and(|at| at.elapsed() < ttl)
    }

    /// Records that the upstream let `client` read `repo`, without ever
    /// making the repository public (registries marked `private`).
    pub fn grant_client(&self, registry: &str, repo: &str, client: &str) {
        let mut grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        if grants.len() >= MAX_GRANTS {
            grants.retain(|_, at| at.elapsed() < PUBLIC_TTL);
        }
        grants.insert(
            (registry.to_string(), repo.to_string(), client.to_string()),
            Instant::now(),
        );
    }

    /// True when a client without credentials could read `repo` within
    /// [`PUBLIC_TTL`], anonymously or on `basis` (the fingerprint of the
    /// proxy's credentials now configured for the registry, `""` for none):
    /// content learnt readable with other credentials does not count.
    pub fn is_public(&self, registry: &str, repo: &str, basis: &str) -> bool {
        let public = self.public.lock().unwrap_or_else(|p| p.into_inner());
        public
            .get(&(registry.to_string(), repo.to_string()))
            .is_some_and(|(at, how)| at.elapsed() < PUBLIC_TTL && (how.is_empty() || how == basis))
    }

    /// Records that the upstream just let `client` read `repo`; a client
    /// without credentials (`""`) makes the repository public on `basis`
    /// (see [`Self::is_public`]). Such a client is then judged by
    /// [`Self::is_public`] alone, so no per-client grant is kept for it
    /// that would outlive a change of basis.
    pub fn grant(&self, registry: &str, repo: &str, client: &str, basis: &str) {
        if client.is_empty() {
            let mut public = self.public.lock().unwrap_or_else(|p| p.into_inner());
            if public.len() >= MAX_GRANTS {
                public.retain(|_, (at, _)| at.elapsed() < PUBLIC_TTL);
            }
            public.insert(
                (registry.to_string(), repo.to_string()),
                (Instant::now(), basis.to_string()),
            );
            return;
        }
        let mut grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        if grants.len() >= MAX_GRANTS {
            grants.retain(|_, at| at.elapsed() < PUBLIC_TTL);
        }
        grants.insert(
            (registry.to_string(), repo.to_string(), client.to_string()),
            Instant::now(),
        );
    }
}

impl Ctx<'_> {
    /// Asked before cached content of the repository is served: `None`
    /// when this client may have it, else the refusal to send. The cache is
    /// shared by every client, so without this a private image pulled once
    /// would be served to anyone afterwards.
    ///
    /// A repository anonymous clients may read (learnt from an anonymous
    /// pull, or one anonymous HEAD of `path`) is served to everyone for
    /// [`PUBLIC_TTL`] with no upstream contact. Otherwise the
    /// upstream is asked with the client's own credentials (a HEAD of
    /// `path`), and the answer reused for `authCheckTTL`; a client without
    /// any is asked about with the registry's `credentialsFile` if it has
    /// one (not `private`), as its misses are fetched. While
    /// the upstream is unreachable or failing the cache is served, as
    /// stale-if-error serves tags, so pulls keep working in an outage.
    pub(crate) async fn check_cached(
        &self,
        headers: &HeaderMap,
        path: &str,
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
        if (!private && grants.is_public(host, repo, basis))
            || grants.allowed(host, repo, &client, self.auth_ttl)
        {
            return Ok(None);
        }
        if !client.is_empty() && !private {
            // Would an anonymous client get it? Then it is public content.
            let mut anonymous = forward_headers(headers, false);
            anonymous.remove(header::AUTHORIZATION);
            match self
                .send(Method::HEAD, self.url(path, None)?, anonymous)
                .await
            {
                Ok(up) if up.response.status().is_success() => {
                    grants.grant(host, repo, "", basis);
                    metrics.auth_check(host, AuthResult::public);
                    return Ok(None);
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(error = %err, registry = host, repository = repo,
                        "cannot ask the upstream about access; serving from cache");
                    metrics.auth_check(host, AuthResult::unreachable);
                    return Ok(None);
                }
            }
        }
        let url = self.url(path, None)?;
        let up = match self
            .send(Method::HEAD, url, forward_headers(headers, false))
            .await
        {
            Ok(up) => up,
            Err(err) => {
                tracing::warn!(error = %err, registry = host, repository = repo,
                    "cannot ask the upstream about access; serving from cache");
                metrics.auth_check(host, AuthResult::unreachable);
                return Ok(None);
            }
        };
        let status = up.response.status();
        // Only the registry's own 401/403 refuses: storage a blob HEAD was
        // redirected to may answer HEAD with 403 (S3).
        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) && up.hops == 0 {
            metrics.auth_check(host, AuthResult::denied);
            // Rebuilt, not relayed: the answer to a HEAD has no body but
            // may announce one.
            let mut resp = oci::error_response(
                status,
                ErrorCode::Denied,
                &format!("{host} does not let this client read {repo}"),
            )
            .map(body::full);
            for v in up.response.headers().get_all(header::WWW_AUTHENTICATE) {
                resp.headers_mut()
                    .append(header::WWW_AUTHENTICATE, v.clone());
            }
            return Ok(Some(resp));
        }
        if super::is_outage(status) {
            metrics.auth_check(host, AuthResult::unreachable);
        } else {
            metrics.auth_check(host, AuthResult::allowed);
            self.grant(repo, &client);
        }
        Ok(None)
    }

    fn grant(&self, repo: &str, client: &str) {
        let host = &self.registry.host;
        if self.settings.private {
            // Never "public": every client is checked.
            self.shared.grants.grant_client(host, repo, client);
        } else {
            let basis = self.settings.anonymous_basis();
            self.shared.grants.grant(host, repo, client, basis);
        }
    }

    /// Notes that the upstream just served this client the repository.
    pub(crate) fn granted(&self, headers: &HeaderMap) {
        if let Some(repo) = &self.repo {
            self.grant(repo, &client_key(headers));
        }
    }

    /// Notes that `digest` belongs to the repository (admin API, purge).
    pub(crate) fn served(&self, digest: &Digest) {
        if let Some(repo) = &self.repo {
            self.shared.repos.note(&self.registry.host, repo, digest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_grants_hold_only_on_their_basis() {
        let g = AccessGrants::default();
        g.grant("r", "anon/repo", "", "");
        g.grant("r", "creds/repo", "", "fp1");
        // Anonymously readable: readable whatever the proxy's credentials.
        assert!(g.is_public("r", "anon/repo", ""));
        assert!(g.is_public("r", "anon/repo", "fp2"));
        // Read with credentials fp1: only while fp1 is configured.
        assert!(g.is_public("r", "creds/repo", "fp1"));
        assert!(!g.is_public("r", "creds/repo", "fp2"));
        assert!(!g.is_public("r", "creds/repo", ""));
        // A client without credentials gets no per-client grant that
        // would outlive its basis.
        assert!(!g.allowed("r", "creds/repo", "", Duration::from_secs(60)));
        g.grant("r", "creds/repo", "client-hash", "fp1");
        assert!(g.allowed("r", "creds/repo", "client-hash", Duration::from_secs(60)));
    }
}

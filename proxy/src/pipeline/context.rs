//! What one registry request carries through the pipeline, and how it
//! reaches the upstream: with the registry's `credentialsFile`, with an
//! anonymous token the proxy fetched, or with the client's own credentials.

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap};
use http::{Method, StatusCode, Uri};
use pullthrough_api::config::RegistryConfig;

use super::{HandlerError, Shared, State, parse_url};
use crate::config::RegistrySettings;
use crate::http::body;
use crate::http::headers::insert_bearer;
use crate::http::sendfile::Sendfile;
use crate::route::Via;
use crate::source::Source;
use crate::upstream::token::parse_bearer;
use crate::upstream::{UpstreamClient, UpstreamError, UpstreamResponse};

pub(crate) struct Ctx<'a> {
    pub(crate) shared: &'a Arc<Shared>,
    /// The config snapshot `client` and `registry` come from (owned copies
    /// let a response body fetch from the upstream later, see `download::resume`).
    pub(crate) state: &'a Arc<State>,
    pub(crate) client: &'a UpstreamClient,
    pub(crate) settings: RegistrySettings,
    pub(crate) auth_ttl: Duration,
    pub(crate) registry: &'a RegistryConfig,
    /// The repository asked for (scope of anonymous tokens).
    pub(crate) repo: Option<String>,
    pub(crate) via: Via,
    pub(crate) read_timeout: Duration,
    /// Whose request this is: what it makes the proxy remember (grants,
    /// tags) counts against that source's share (see [`crate::source`]).
    pub(crate) source: Source,
    /// Asked by another replica (peer listener): served by this replica
    /// itself, never sent on to a peer.
    pub(crate) from_peer: bool,
    /// The plain HTTP/1 connection's `sendfile` queue: cached blobs go
    /// from the file to the socket without a copy.
    pub(crate) sendfile: Option<Sendfile>,
    /// The request came on an HTTP/2 connection, whose many streams each
    /// hold what they were handed and not yet sent.
    pub(crate) multiplexed: bool,
    /// When the upstream's yes this request's access rests on was given
    /// (see `Ctx::yes_age`): told to the replica that asked, when it did.
    pub(crate) yes_at: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Ctx<'_> {
    /// How much of a blob file a response reads at a time.
    pub(crate) fn file_chunk(&self) -> usize {
        if self.multiplexed {
            body::MULTIPLEXED_CHUNK
        } else {
            body::FILE_CHUNK
        }
    }

    pub(crate) fn url(&self, path: &str, query: Option<&str>) -> Result<Uri, HandlerError> {
        let query = query
            .map(strip_ns)
            .filter(|q| !q.is_empty())
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        parse_url(
            &format!("{}{path}{query}", self.registry.upstream_url()),
            &self.registry.host,
        )
    }

    /// Sends to the upstream. A client without credentials is
    /// authenticated with the registry's `credentialsFile` (see
    /// [`crate::upstream::credentials`]), or else gets the proxy's anonymous token
    /// for the repository when the upstream challenges (see
    /// [`crate::upstream::token`]). A client's own credentials go as they are.
    pub(crate) async fn send(
        &self,
        method: Method,
        url: Uri,
        headers: HeaderMap,
    ) -> Result<UpstreamResponse, HandlerError> {
        // A client's own credentials spend its own account's budget: only
        // what the proxy's identity (anonymous, or the credentialsFile)
        // is told is the budget that decides what the proxy spares.
        let own_identity = !headers.contains_key(header::AUTHORIZATION);
        let resp = self.send_authenticated(method, url, headers).await?;
        let host = self.registry.host.as_str();
        let status = resp.response.status();
        let throttled = status == StatusCode::TOO_MANY_REQUESTS;
        if own_identity {
            self.shared
                .budgets
                .observe(host, status, resp.response.headers());
        }
        if throttled {
            self.shared.metrics.upstream_throttled(host);
        }
        Ok(resp)
    }

    async fn send_authenticated(
        &self,
        method: Method,
        url: Uri,
        mut headers: HeaderMap,
    ) -> Result<UpstreamResponse, HandlerError> {
        let host = self.registry.host.as_str();
        let scope = self.repo.as_ref().map(|r| format!("repository:{r}:pull"));
        if !headers.contains_key(header::AUTHORIZATION)
            && let Some(creds) = self.settings.proxy_credentials()
        {
            let started = std::time::Instant::now();
            let resp = creds
                .send(
                    self.client,
                    method,
                    url,
                    headers,
                    scope.as_deref(),
                    self.read_timeout,
                )
                .await
                .map_err(|source| {
                    if matches!(source, UpstreamError::Throttled { .. }) {
                        self.shared.metrics.token_throttled(host);
                    }
                    HandlerError::Upstream {
                        registry: host.to_string(),
                        source,
                    }
                })?;
            self.shared
                .metrics
                .observe_upstream(host, started.elapsed().as_secs_f64());
            return Ok(resp);
        }
        let anonymous = !headers.contains_key(header::AUTHORIZATION) && scope.is_some();
        let scope = scope.unwrap_or_default();
        if anonymous && let Some(token) = self.shared.tokens.get(host, &scope) {
            insert_bearer(&mut headers, &token);
        }
        let map = |source| HandlerError::Upstream {
            registry: host.to_string(),
            source,
        };
        let started = std::time::Instant::now();
        let resp = self
            .client
            .send(method.clone(), url.clone(), headers.clone())
            .await
            .map_err(map)?;
        self.shared
            .metrics
            .observe_upstream(host, started.elapsed().as_secs_f64());
        if !anonymous || resp.response.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let Some(challenge) = resp
            .response
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_bearer)
        else {
            return Ok(resp);
        };
        let Some(token) = self
            .shared
            .tokens
            .fetch(
                self.client,
                host,
                &challenge,
                Some(&scope),
                self.read_timeout,
            )
            .await
            .map_err(map)?
        else {
            return Ok(resp);
        };
        insert_bearer(&mut headers, &token);
        self.client.send(method, url, headers).await.map_err(map)
    }
}

/// The query without containerd's `ns=` (the upstream must not see it).
fn strip_ns(query: &str) -> String {
    query
        .split('&')
        .filter(|kv| !kv.starts_with("ns="))
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ns_is_not_forwarded() {
        assert_eq!(strip_ns("ns=docker.io&n=10"), "n=10");
        assert_eq!(strip_ns("ns=docker.io"), "");
    }
}

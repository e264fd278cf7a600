//! Everything that talks to upstream registries: the client (`client`:
//! TLS settings per registry in `trust`, DNS that ignores the hosts file
//! in `resolve`, redirects in `redirect`), and authentication towards
//! them: Bearer tokens from a realm ([`token`], one fetcher for anonymous
//! and configured tokens) and the registry's `credentialsFile`
//! ([`credentials`], whose token requests for new repositories are
//! rate limited by [`throttle`]).
//!
//! [`Upstreams`] holds one pooled client per configured registry. Each client
//! speaks HTTP/1.1 and HTTP/2 (ALPN) over rustls (ring), trusting the webpki
//! roots plus the registry's `caBundle`, or nothing at all when the registry
//! is `insecureSkipVerify`. Host names are resolved by [`UpstreamResolver`]:
//! the config's `resolve` pins first, then DNS from `/etc/resolv.conf` —
//! never `/etc/hosts`, which on a node may send registry names back to this
//! proxy. [`UpstreamClient::send`] follows redirects server-side (blob
//! storage) without carrying credentials across hosts, never from https
//! down to http, and only to addresses the registry's egress rules allow
//! (`egress`: no loopback, link-local or private addresses the upstream
//! chose unless `allowPrivateNetworks`, never the proxy's own listeners).

pub mod budget;
mod client;
pub mod credentials;
mod egress;
mod redirect;
pub(crate) use redirect::Origin;
mod resolve;
#[cfg(test)]
mod tests;
pub mod throttle;
pub mod token;
mod trust;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use http::{Response, Uri};
use hyper::body::Incoming;
use pullthrough_api::config::ProxyConfig;

pub use client::UpstreamClient;
pub use credentials::{CredentialsFileError, RegistryCredentials};
pub use egress::HopRefused;
pub(crate) use redirect::{redact, redact_str};
pub use resolve::{ResolveError, UpstreamResolver};
pub use token::{AnonymousTokens, Challenge, TokenError, parse_bearer};

/// Redirect hops followed per request before giving up.
pub const MAX_REDIRECTS: u8 = 5;

/// Why the upstream side could not be built or could not answer.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("reading caBundle {path} of registry {registry}: {source}")]
    CaBundleRead {
        registry: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("caBundle {path} of registry {registry} is not usable: {reason}")]
    CaBundleInvalid {
        registry: String,
        path: PathBuf,
        reason: String,
    },
    #[error("TLS settings of registry {registry}: {source}")]
    TlsConfig {
        registry: String,
        source: rustls::Error,
    },
    #[error("upstream URL `{url}` of registry {registry} is unusable: {reason}")]
    BadUpstreamUrl {
        registry: String,
        url: String,
        reason: String,
    },
    #[error("cannot request `{url}`: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("connecting to {url} failed: {detail}")]
    Connect { url: String, detail: String },
    #[error("connecting to {url} timed out after {after:?} (TCP + TLS)")]
    ConnectTimeout { url: String, after: Duration },
    #[error("TLS with {url} failed: {detail}")]
    Tls { url: String, detail: String },
    #[error("no response headers from {url} within {after:?}")]
    Timeout { url: String, after: Duration },
    #[error("HTTP exchange with {url} failed: {detail}")]
    Protocol { url: String, detail: String },
    #[error("{url}: more than {MAX_REDIRECTS} redirects (next Location {last})")]
    TooManyRedirects { url: String, last: String },
    #[error("redirect from {from} has an unusable Location `{location}`")]
    BadRedirect { location: String, from: String },
    /// The upstream (a redirect, a token realm) pointed at an address the
    /// registry's egress rules refuse; nothing was sent there.
    #[error("not following {url}: {refusal}")]
    Refused { url: String, refusal: HopRefused },
    /// An https upstream redirected to plain http.
    #[error("redirect from {from} to plain http ({to}) refused: the upstream is https")]
    Downgrade { from: String, to: String },
    /// The token dance with the registry's `credentialsFile` failed for a
    /// reason other than the realm refusing the credentials (that is the
    /// upstream's 401, relayed as such).
    #[error(
        "getting a token for registry {registry} from {realm} with its credentialsFile failed: {reason}"
    )]
    Token {
        registry: String,
        realm: String,
        reason: String,
    },
    /// The realm of an anonymous token failed (unreachable, `429`, `5xx`,
    /// no token in its answer): an outage, not a refusal.
    #[error("getting an anonymous token for registry {registry} from {realm} failed: {reason}")]
    AnonymousToken {
        registry: String,
        realm: String,
        reason: String,
    },
    /// Too many repositories the proxy never read with the registry's
    /// `credentialsFile` were asked for lately: the realm is not asked for
    /// another token now (`limits.newRepositoryTokensPerMinute`). Nothing
    /// was sent upstream for it; the client gets a `429`.
    #[error(
        "not asking the token realm of registry {registry} for a token for another new          repository now (limits.newRepositoryTokensPerMinute); retry in {}s",
        retry_after.as_secs()
    )]
    Throttled {
        registry: String,
        retry_after: Duration,
    },
}

/// One client per configured registry, keyed by the registry's `host`.
pub struct Upstreams {
    clients: HashMap<String, UpstreamClient>,
}

impl Upstreams {
    /// One pooled client per registry, built from its TLS settings: webpki
    /// roots + the registry's `caBundle` PEM file (error names the file if
    /// unreadable/invalid), or no verification when `insecureSkipVerify`.
    /// HTTP/1.1 and HTTP/2 (ALPN) to upstreams. Connect timeout from
    /// `config.upstream_timeouts.connect`.
    pub fn new(config: &ProxyConfig) -> Result<Self, UpstreamError> {
        let resolver = UpstreamResolver::system(&config.resolve);
        let mut clients = HashMap::new();
        for registry in &config.registries {
            let client = UpstreamClient::build(config, registry, resolver.clone())?;
            clients.insert(registry.host.clone(), client);
        }
        Ok(Self { clients })
    }

    /// The client for a registry by its `host` (not alias); None if unknown.
    pub fn client(&self, registry_host: &str) -> Option<&UpstreamClient> {
        self.clients.get(registry_host)
    }
}

/// What [`UpstreamClient::send`] got: the final (non-redirect) response with
/// its body still streaming, the URL that answered, and redirects followed.
#[derive(Debug)]
pub struct UpstreamResponse {
    pub response: Response<Incoming>,
    pub final_url: Uri,
    pub hops: u8,
}

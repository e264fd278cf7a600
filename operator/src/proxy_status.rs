//! The proxy's `GET /status` (docs/cluster-contract.md): the hash of the
//! config it runs, the registries it serves and their cache counters.

use std::collections::BTreeMap;

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use pullthrough_api::crd::{CacheStats, UpstreamBudget};
pub use pullthrough_api::tags::TagMove;
use serde::Deserialize;

/// The proxy's admin token, held as the `Authorization` value it is sent
/// as (checked once, marked sensitive). Its `Debug` shows no secret, so
/// the settings that hold it can be logged.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(http::HeaderValue);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(…)")
    }
}

impl std::str::FromStr for AdminToken {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        // The proxy takes an empty `adminToken` as none: sent, it would
        // only ever be refused.
        if s.is_empty() {
            return Err("the proxy's admin token is empty".into());
        }
        let mut value = http::HeaderValue::from_str(&format!("Bearer {s}"))
            .map_err(|_| "the proxy's admin token is not a valid header value".to_string())?;
        value.set_sensitive(true);
        Ok(Self(value))
    }
}

/// What the proxy reports.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyStatus {
    pub config_hash: String,
    #[serde(default)]
    pub registries: Vec<String>,
    /// Per registry host, since the proxy started (older proxies omit it).
    #[serde(default)]
    pub cache: BTreeMap<String, CacheStats>,
    /// Recent tag moves, oldest first (older proxies omit it).
    #[serde(default)]
    pub tag_moves: Vec<TagMove>,
    /// Per registry host that sent rate-limit figures.
    #[serde(default)]
    pub upstream: BTreeMap<String, UpstreamBudget>,
    /// Which moves `tag_moves` holds: `all` (the admin token was taken) or
    /// `public` (older proxies omit it).
    #[serde(default)]
    pub tag_moves_scope: Option<String>,
}

/// Fetches `url` (plain HTTP) within `timeout`, with the admin token if
/// there is one; the error is a short reason for the condition message.
pub async fn fetch(
    url: &str,
    token: Option<&AdminToken>,
    timeout: Duration,
) -> Result<ProxyStatus, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
    let mut req = http::Request::get(uri);
    if let Some(AdminToken(value)) = token {
        req = req.header(http::header::AUTHORIZATION, value.clone());
    }
    let req = req
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| format!("GET {url}: {e}"))?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let fut = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("GET {url}: HTTP {status}"));
        }
        serde_json::from_slice::<ProxyStatus>(&body)
            .map_err(|e| format!("GET {url}: not a status document: {e}"))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| format!("GET {url}: no answer within {timeout:?}"))?
}

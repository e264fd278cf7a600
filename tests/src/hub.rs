//! An upstream scripted like Docker Hub as far as its pull budget goes,
//! for the behaviour `docker-registry` cannot show: each manifest `GET` is
//! a pull counted down in `ratelimit-remaining` (`<n>;w=21600`, with
//! `ratelimit-limit: 100;w=21600` and `docker-ratelimit-source`), a `HEAD`
//! is free, tags can be moved to a new manifest, and a storm answers
//! every request `429` with `Retry-After: 120`. With tokens
//! ([`Hub::start_with_tokens`]) it also wants a Bearer token from its
//! realm (`/token`), whose tokens can be expired and which can fail.
//!
//! ```no_run
//! # use pullthrough_testbed::hub::Hub;
//! let (hub, stub) = Hub::start(50).unwrap();
//! hub.move_tags(); // every tag now points at another manifest
//! println!("{}", stub.url());
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use http::{Method, Response, StatusCode};

use crate::Result;
use crate::fixtures::sha256_digest;
use crate::stub::{Seen, Stub};

/// The manifests' media type.
pub const MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// `docker-ratelimit-source` of every answer.
pub const SOURCE: &str = "203.0.113.7";
/// `ratelimit-limit`.
pub const LIMIT: u64 = 100;

/// The budget state; the stub answers from it.
#[derive(Debug, Default)]
pub struct Hub {
    remaining: AtomicU64,
    storm: AtomicBool,
    generation: AtomicU64,
    /// Bearer tokens wanted; the valid one is `t<epoch>`.
    tokens: AtomicBool,
    token_epoch: AtomicU64,
    realm_down: AtomicBool,
    /// Milliseconds each manifest answer takes.
    latency_ms: AtomicU64,
}

impl Hub {
    /// A stub answering like Docker Hub with `remaining` pulls left.
    pub fn start(remaining: u64) -> Result<(Arc<Hub>, Stub)> {
        Self::start_as(Hub::default(), remaining)
    }

    /// [`Hub::start`], with `/v2/` wanting a Bearer token from the realm
    /// `http://<stub>/token` (anyone gets one, as on Docker Hub for public
    /// repositories).
    pub fn start_with_tokens(remaining: u64) -> Result<(Arc<Hub>, Stub)> {
        let hub = Hub::default();
        hub.tokens.store(true, Ordering::SeqCst);
        Self::start_as(hub, remaining)
    }

    fn start_as(hub: Hub, remaining: u64) -> Result<(Arc<Hub>, Stub)> {
        let hub = Arc::new(hub);
        hub.set_remaining(remaining);
        let h = hub.clone();
        let stub = Stub::canned()
            .route(move |seen| {
                let path = seen.path.split('?').next().unwrap_or_default();
                h.token_check(seen, path)
                    .unwrap_or_else(|| h.answer(&seen.method, path))
            })
            .start()?;
        Ok((hub, stub))
    }

    /// Every token handed out so far is refused from now on (expired).
    pub fn expire_tokens(&self) {
        self.token_epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Each manifest answer takes this long from now on (the stub's
    /// handler sleeps: the requests it gets meanwhile wait their turn).
    pub fn set_latency(&self, latency: std::time::Duration) {
        let ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
        self.latency_ms.store(ms, Ordering::SeqCst);
    }

    /// The realm answers `503` while on.
    pub fn set_realm_down(&self, on: bool) {
        self.realm_down.store(on, Ordering::SeqCst);
    }

    /// The realm's answer, or the registry's 401 for a request without
    /// the valid token; `None` when the request may go on.
    fn token_check(&self, seen: &Seen, path: &str) -> Option<Response<Bytes>> {
        if !self.tokens.load(Ordering::SeqCst) {
            return None;
        }
        let valid = format!("t{}", self.token_epoch.load(Ordering::SeqCst));
        let b = Response::builder();
        let built = if path == "/token" {
            if self.realm_down.load(Ordering::SeqCst) {
                b.status(StatusCode::SERVICE_UNAVAILABLE)
                    .body(Bytes::from_static(b"upstream connect error"))
            } else {
                b.status(StatusCode::OK)
                    .header("content-type", "application/json")
                    .body(Bytes::from(format!(
                        r#"{{"token":"{valid}","expires_in":300}}"#
                    )))
            }
        } else if seen.auth() == Some(format!("Bearer {valid}").as_str())
            || seen.auth().is_some_and(|a| a.starts_with("Bearer user-"))
        {
            // The realm's current token, or a user's own (a personal
            // access token: `Bearer user-<anything>`).
            return None;
        } else {
            let host = seen
                .headers
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let repo = path
                .strip_prefix("/v2/")
                .and_then(|r| r.rsplit_once("/manifests/").or(r.rsplit_once("/blobs/")))
                .map(|(repo, _)| repo)
                .unwrap_or_default();
            let mut challenge = format!(r#"Bearer realm="http://{host}/token",service="hub.test""#);
            if !repo.is_empty() {
                challenge.push_str(&format!(r#",scope="repository:{repo}:pull""#));
            }
            b.status(StatusCode::UNAUTHORIZED)
                .header("www-authenticate", challenge)
                .body(Bytes::from_static(
                    br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
                ))
        };
        Some(built.unwrap_or_else(|_| Response::new(Bytes::new())))
    }

    pub fn set_remaining(&self, n: u64) {
        self.remaining.store(n, Ordering::SeqCst);
    }

    /// Every request answered 429 + `Retry-After: 120` while on.
    pub fn set_storm(&self, on: bool) {
        self.storm.store(on, Ordering::SeqCst);
    }

    /// Points every tag at a new manifest.
    pub fn move_tags(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The manifest `tag` points at now (its digest is what a pull of it
    /// must return).
    pub fn manifest(&self, tag: &str) -> Bytes {
        manifest(tag, self.generation.load(Ordering::SeqCst))
    }

    fn answer(&self, method: &Method, path: &str) -> Response<Bytes> {
        let b = Response::builder();
        let built = if self.storm.load(Ordering::SeqCst) {
            b.status(StatusCode::TOO_MANY_REQUESTS)
                .header("retry-after", "120")
                .body(Bytes::from_static(
                    br#"{"errors":[{"code":"TOOMANYREQUESTS","message":"You have reached your pull rate limit."}]}"#,
                ))
        } else if path == "/v2/" {
            b.status(StatusCode::OK).body(Bytes::from_static(b"{}"))
        } else if let Some((_, tag)) = path.rsplit_once("/manifests/") {
            let latency = self.latency_ms.load(Ordering::SeqCst);
            if latency > 0 {
                std::thread::sleep(std::time::Duration::from_millis(latency));
            }
            let body = self.manifest(tag);
            // A GET of a manifest is a pull; a HEAD is free.
            if method == Method::GET {
                let _ = self
                    .remaining
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                        Some(n.saturating_sub(1))
                    });
            }
            let left = self.remaining.load(Ordering::SeqCst);
            let b = b
                .status(StatusCode::OK)
                .header("content-type", MEDIA_TYPE)
                .header("docker-content-digest", sha256_digest(&body))
                .header("content-length", body.len())
                .header("ratelimit-limit", format!("{LIMIT};w=21600"))
                .header("ratelimit-remaining", format!("{left};w=21600"))
                .header("docker-ratelimit-source", SOURCE);
            b.body(if method == Method::HEAD {
                Bytes::new()
            } else {
                body
            })
        } else {
            b.status(StatusCode::NOT_FOUND).body(Bytes::new())
        };
        built.unwrap_or_else(|_| Response::new(Bytes::new()))
    }
}

/// A small OCI image manifest, distinct per (tag, generation).
fn manifest(tag: &str, generation: u64) -> Bytes {
    let seed = sha256_digest(format!("{tag}/{generation}").as_bytes());
    let hex = seed.trim_start_matches("sha256:");
    Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"{MEDIA_TYPE}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{hex}","size":2}},"layers":[]}}"#
    ))
}

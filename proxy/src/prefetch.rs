//! Prefetch: a pinned image the cache does not hold yet is fetched into it
//! before pods ask, so a rollout's pods start from the cache. The operator
//! pins the new ReplicaSet's images as soon as the Deployment controller
//! creates it, before its pods are scheduled.
//!
//! The fetch goes through the proxy's own HTTP listener, as a client would:
//! routing, upstream credentials, merged misses, verification and the
//! access log all apply, and the blobs land in the cache (and the bucket)
//! exactly as for a pull. Of a multi-platform image only the pins'
//! `platforms` (the nodes' architectures) are fetched. Nothing is fetched
//! for a registry the proxy does not serve, nor while its upstream budget
//! is low: prefetch is speculative work and a pod's pull comes first.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use pullthrough_api::pins::{PinnedImage, Pins, platform_wanted};
use tokio::sync::Semaphore;

use crate::oci::{ContentRefs as Manifest, Digest};
use crate::pipeline::Shared;

/// What a manifest GET accepts: images and indexes, OCI and Docker.
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// One image's fetch may take this long (layers of GBs over a slow link).
const IMAGE_TIMEOUT: Duration = Duration::from_secs(3600);

/// A failed image is tried again after this, doubling with each failure
/// up to [`RETRY_MAX`]. The pins are read every `--reload-interval`
/// (2 s): without a wait, a pin the upstream refuses or does not have (a
/// deleted tag, a private repository) cost a token and a manifest GET,
/// counted against Docker Hub's pull limit, every 2 s for good, and held
/// the prefetch slots a new rollout's images wait for.
const RETRY_FIRST: Duration = Duration::from_secs(60);
const RETRY_MAX: Duration = Duration::from_secs(6 * 3600);

/// When a failed image may be tried again.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    until: Instant,
    failures: u32,
}

impl Backoff {
    fn after(previous: Option<Backoff>, now: Instant) -> Backoff {
        let failures = previous.map_or(0, |b| b.failures).saturating_add(1);
        let wait = RETRY_FIRST
            .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
            .min(RETRY_MAX);
        Backoff {
            until: now + wait,
            failures,
        }
    }
}

/// What one image's prefetch came to.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Whole in the cache, or never to be fetched here (a registry the
    /// proxy does not serve, a name that does not parse).
    Done,
    /// Tried and failed: waits its [`Backoff`].
    Failed,
    /// Not tried (the upstream budget is low): asked again next refresh.
    Postponed,
}

/// Fetches pinned images into the cache, a few at a time.
pub struct Prefetcher {
    client: Client<HttpConnector, Empty<Bytes>>,
    /// `http://<own listener>`
    base: String,
    permits: Arc<Semaphore>,
    /// Pins fetched whole (not fetched again until the process restarts),
    /// those being fetched, and those that failed (not tried again
    /// before their backoff ends).
    done: Mutex<HashSet<String>>,
    running: Mutex<HashSet<String>>,
    failed: Mutex<HashMap<String, Backoff>>,
}

impl std::fmt::Debug for Prefetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prefetcher")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// What one image's prefetch did.
#[derive(Debug, Default)]
struct Fetched {
    manifests: usize,
    blobs: usize,
    /// Blobs already cached, not fetched.
    present: usize,
}

impl Prefetcher {
    /// `None` without an HTTP listener to go through, or with
    /// `concurrency` 0.
    pub fn new(http: Option<SocketAddr>, concurrency: usize) -> Option<Self> {
        let mut addr = http?;
        if concurrency == 0 {
            return None;
        }
        // A wildcard listener is reached on loopback.
        match addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => addr.set_ip(Ipv4Addr::LOCALHOST.into()),
            IpAddr::V6(ip) if ip.is_unspecified() => addr.set_ip(Ipv6Addr::LOCALHOST.into()),
            _ => {}
        }
        Some(Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: format!("http://{addr}"),
            permits: Arc::new(Semaphore::new(concurrency)),
            done: Mutex::default(),
            running: Mutex::default(),
            failed: Mutex::default(),
        })
    }

    /// Starts a fetch for each pin not fetched yet, not in flight and not
    /// waiting out a failure.
    pub fn kick(self: &Arc<Self>, shared: &Arc<Shared>, pins: &Pins) {
        // An image unpinned and pinned again is checked again.
        self.done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|i| pins.images.contains(i));
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|i, _| pins.images.contains(i));
        let now = Instant::now();
        for image in &pins.images {
            {
                let done = self.done.lock().unwrap_or_else(|p| p.into_inner());
                let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
                let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
                let waiting = failed.get(image).is_some_and(|b| b.until > now);
                if done.contains(image) || waiting || !running.insert(image.clone()) {
                    continue;
                }
            }
            let (me, shared) = (Arc::clone(self), Arc::clone(shared));
            let (image, platforms) = (image.clone(), pins.platforms.clone());
            tokio::spawn(async move {
                let outcome = me.prefetch(&shared, &image, &platforms).await;
                let mut failed = me.failed.lock().unwrap_or_else(|p| p.into_inner());
                match outcome {
                    Outcome::Done => {
                        failed.remove(&image);
                        me.done
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(image.clone());
                    }
                    Outcome::Failed => {
                        let b = Backoff::after(failed.get(&image).copied(), Instant::now());
                        tracing::info!(
                            image,
                            failures = b.failures,
                            retry_in_secs =
                                b.until.saturating_duration_since(Instant::now()).as_secs(),
                            "prefetch to be tried again later"
                        );
                        failed.insert(image.clone(), b);
                    }
                    Outcome::Postponed => {}
                }
                drop(failed);
                me.running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&image);
            });
        }
    }

    async fn prefetch(
        &self,
        shared: &Shared,
        image: &str,
        platforms: &BTreeSet<String>,
    ) -> Outcome {
        let Some(p) = PinnedImage::parse(image) else {
            return Outcome::Done;
        };
        // Budgets and metrics are kept under the configured host, whatever
        // name (an alias) the pin uses.
        let (host, reserve) = {
            let state = shared.state.load();
            match state.config.registry(&p.registry) {
                Some(r) => (r.host.clone(), r.upstream_reserve),
                None => return Outcome::Done,
            }
        };
        let Ok(_permit) = self.permits.acquire().await else {
            return Outcome::Postponed;
        };
        if shared.budgets.is_low(&host, reserve) {
            tracing::info!(image, "prefetch postponed: the upstream budget is low");
            shared.metrics.prefetch(&host, "postponed");
            return Outcome::Postponed;
        }
        let walk = tokio::time::timeout(IMAGE_TIMEOUT, self.walk(shared, &p, platforms));
        match walk.await {
            Ok(Ok(f)) => {
                if f.blobs > 0 {
                    tracing::info!(
                        image,
                        manifests = f.manifests,
                        blobs = f.blobs,
                        present = f.present,
                        "prefetched"
                    );
                    shared.metrics.prefetch(&host, "fetched");
                }
                Outcome::Done
            }
            Ok(Err(e)) => {
                tracing::warn!(image, error = %e, "prefetch failed");
                shared.metrics.prefetch(&host, "failed");
                Outcome::Failed
            }
            Err(_) => {
                tracing::warn!(image, secs = IMAGE_TIMEOUT.as_secs(), "prefetch timed out");
                shared.metrics.prefetch(&host, "failed");
                Outcome::Failed
            }
        }
    }

    async fn walk(
        &self,
        shared: &Shared,
        p: &PinnedImage,
        platforms: &BTreeSet<String>,
    ) -> Result<Fetched, String> {
        let mut f = Fetched::default();
        let root = self.manifest(p, &p.reference).await?;
        f.manifests += 1;
        let mut images = Vec::new();
        if root.manifests.is_empty() {
            images.push(root);
        } else {
            for child in &root.manifests {
                let wanted = child.platform.as_ref().is_some_and(|pl| {
                    platform_wanted(platforms, &pl.os, &pl.architecture, pl.variant.as_deref())
                });
                if wanted {
                    images.push(self.manifest(p, &child.digest).await?);
                    f.manifests += 1;
                }
            }
        }
        for m in images {
            for blob in m.config.iter().chain(&m.layers) {
                let d = Digest::parse(&blob.digest).map_err(|e| format!("{}: {e}", blob.digest))?;
                if cached(shared, &d).await {
                    f.present += 1;
                    continue;
                }
                self.drain(&format!("{}/blobs/{}", self.repo_url(p), blob.digest))
                    .await?;
                f.blobs += 1;
            }
        }
        Ok(f)
    }

    fn repo_url(&self, p: &PinnedImage) -> String {
        format!("{}/v2/{}/{}", self.base, p.registry, p.repository)
    }

    async fn manifest(&self, p: &PinnedImage, reference: &str) -> Result<Manifest, String> {
        let url = format!("{}/manifests/{reference}", self.repo_url(p));
        let body = self.get(&url).await?.collect().await;
        let body = body.map_err(|e| format!("GET {url}: {e}"))?.to_bytes();
        serde_json::from_slice(&body).map_err(|e| format!("GET {url}: not a manifest: {e}"))
    }

    /// GETs `url` and reads the body to its end (the proxy caches it on
    /// the way, verified).
    async fn drain(&self, url: &str) -> Result<(), String> {
        let mut body = self.get(url).await?;
        while let Some(frame) = body.frame().await {
            frame.map_err(|e| format!("GET {url}: {e}"))?;
        }
        Ok(())
    }

    async fn get(&self, url: &str) -> Result<hyper::body::Incoming, String> {
        let req = http::Request::get(url)
            .header(http::header::ACCEPT, ACCEPT)
            .header(http::header::USER_AGENT, "pullthrough-prefetch")
            .body(Empty::new())
            .map_err(|e| format!("GET {url}: {e}"))?;
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("GET {url}: HTTP {}", resp.status()));
        }
        Ok(resp.into_body())
    }
}

/// In this replica's store, or in the shared bucket.
async fn cached(shared: &Shared, d: &Digest) -> bool {
    if shared.store.entry(d).is_some() {
        return true;
    }
    match &shared.tier {
        Some(t) => matches!(t.stat(d).await, Ok(Some(_))),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_image_waits_longer_each_time_up_to_the_cap() {
        let now = Instant::now();
        let mut b = None;
        let mut waits = Vec::new();
        for _ in 0..12 {
            let next = Backoff::after(b, now);
            waits.push((next.until - now).as_secs());
            b = Some(next);
        }
        assert_eq!(waits[..4], [60, 120, 240, 480]);
        assert_eq!(*waits.last().unwrap_or(&0), 6 * 3600);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
    }
}

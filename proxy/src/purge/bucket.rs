//! The shared bucket's part of a purge: each digest's object deleted, as
//! eviction deletes it (a blob has no other object of its own there: the
//! access journals only order eviction and the public access answers
//! hold no content, so both may keep naming it).
//!
//! An admin waits for the answer (and the admin connection closes after
//! `limits.idleTimeout` without a byte), so each call is bounded, the
//! whole is bounded, and after one failure the rest are not tried: a
//! bucket that is down would otherwise hold the answer for each digest in
//! turn. What was not deleted is reported, and the purge repeated.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

use crate::cache::shared::SharedTier;
use crate::oci::Digest;

/// Longest one HEAD or DELETE of a purge may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the bucket's part of a purge may take.
const TOTAL: Duration = Duration::from_secs(45);
/// Deletes in flight at once.
const CONCURRENT: usize = 8;

/// What the purge did in the bucket.
#[derive(Debug, Default)]
pub struct Bucket {
    /// `s3://bucket/prefix`.
    pub location: String,
    /// Deleted digests that were there.
    pub removed: Vec<Digest>,
    pub bytes: u64,
    pub failed: BTreeMap<Digest, String>,
}

impl Bucket {
    pub fn to_json(&self) -> Value {
        json!({
            "location": self.location,
            "removed": super::names(&self.removed),
            "bytes": self.bytes,
            "failed": super::failures(&self.failed),
        })
    }
}

/// Deletes `digests` from the bucket.
pub async fn delete(tier: &SharedTier, digests: &BTreeSet<Digest>) -> Bucket {
    let deadline = Instant::now() + TOTAL;
    // The first failure, which the digests not tried yet are reported with.
    let broken: Mutex<Option<String>> = Mutex::new(None);
    let results: Vec<(Digest, Result<Option<u64>, String>)> =
        futures::stream::iter(digests.iter().cloned())
            .map(|d| {
                let broken = &broken;
                async move {
                    let earlier = broken.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    if let Some(earlier) = earlier {
                        return (
                            d,
                            Err(format!("not tried after an earlier failure: {earlier}")),
                        );
                    }
                    if Instant::now() >= deadline {
                        return (
                            d,
                            Err(format!(
                                "not tried: the purge had used its {}s for the bucket",
                                TOTAL.as_secs()
                            )),
                        );
                    }
                    match tier.purge(&d, CALL_TIMEOUT).await {
                        Ok(size) => (d, Ok(size)),
                        Err(err) => {
                            let message = err.to_string();
                            broken
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert_with(|| message.clone());
                            (d, Err(message))
                        }
                    }
                }
            })
            .buffer_unordered(CONCURRENT)
            .collect()
            .await;
    let mut out = Bucket {
        location: tier.location().to_string(),
        ..Bucket::default()
    };
    for (d, result) in results {
        match result {
            Ok(Some(size)) => {
                out.bytes += size;
                out.removed.push(d);
            }
            Ok(None) => {}
            Err(error) => {
                out.failed.insert(d, error);
            }
        }
    }
    out.removed.sort();
    if !out.failed.is_empty() {
        tracing::warn!(
            location = %out.location,
            failed = out.failed.len(),
            first = ?out.failed.values().next(),
            "purge: blobs not deleted from shared storage"
        );
    }
    out
}

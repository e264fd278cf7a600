//! Public access answers shared through the bucket. The access gate
//! (`pipeline::access`) serves cached content only to a client the
//! upstream let read it; that knowledge lives in memory, so a replica that
//! just started, or never served a digest, would have to ask the upstream
//! first, and during an upstream outage could serve nothing. Replicas
//! therefore write the *public* answers they learn ("an anonymous client
//! may read this digest in this repository": a hash, no names, no
//! credentials) to `coord/public/<replica>.json` and read each other's:
//! content is still served only as the upstream said, and per-client
//! answers are never shared.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{SharedTier, TierError};
use crate::pipeline::{AccessGrants, OUTAGE_GRACE, Shared, SharedGrant};

pub(super) const DIR: &str = "public";

#[derive(Debug, Default, Serialize, Deserialize)]
struct GrantsFile {
    /// Unix milliseconds when written.
    written: u64,
    /// grant key hex → (age in ms when written, basis).
    grants: HashMap<String, (u64, String)>,
}

/// Reads every replica's public answers into `grants`.
pub async fn import(tier: &SharedTier, grants: &AccessGrants) -> Result<usize, TierError> {
    let now = crate::cache::unix_ms(std::time::SystemTime::now());
    let mut n = 0;
    for name in tier.list_coord(DIR).await? {
        let Some((bytes, _)) = tier.read_coord(&name).await? else {
            continue;
        };
        let Ok(file) = serde_json::from_slice::<GrantsFile>(&bytes) else {
            tracing::warn!(file = %name, "unreadable shared access answers skipped");
            continue;
        };
        let since = now.saturating_sub(file.written);
        let shared: Vec<SharedGrant> = file
            .grants
            .into_iter()
            .filter_map(|(hex, (age, basis))| {
                let key: [u8; 32] = hex::decode(hex).ok()?.try_into().ok()?;
                let age = Duration::from_millis(age.saturating_add(since));
                (age < OUTAGE_GRACE).then_some(SharedGrant { key, age, basis })
            })
            .collect();
        n += shared.len();
        grants.import_public(shared);
    }
    Ok(n)
}

/// How soon a newly learnt public answer is written out.
const WRITE_EVERY: Duration = Duration::from_secs(2);

/// Writes this replica's public answers within [`WRITE_EVERY`] of a change
/// (and once more at shutdown), and reads the others' every `every`,
/// until `stop`.
pub async fn share(
    tier: Arc<SharedTier>,
    shared: Arc<Shared>,
    me: String,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut written = None;
    let mut last_import = tokio::time::Instant::now();
    loop {
        let stopping = tokio::select! {
            _ = tokio::time::sleep(WRITE_EVERY) => false,
            _ = stop.changed() => true,
        };
        let grants = &shared.grants;
        let version = grants.public_version();
        if written != Some(version) {
            match write(&tier, grants, &me).await {
                Ok(()) => written = Some(version),
                Err(err) => tracing::debug!(error = %err, "public access answers not shared"),
            }
        }
        if stopping {
            return;
        }
        if last_import.elapsed() >= every {
            last_import = tokio::time::Instant::now();
            if let Err(err) = import(&tier, grants).await {
                tracing::debug!(error = %err, "other replicas' public access answers not read");
            }
        }
    }
}

async fn write(tier: &SharedTier, grants: &AccessGrants, me: &str) -> Result<(), TierError> {
    let file = GrantsFile {
        written: crate::cache::unix_ms(std::time::SystemTime::now()),
        grants: grants
            .export_public(OUTAGE_GRACE)
            .into_iter()
            .map(|g| {
                let age = u64::try_from(g.age.as_millis()).unwrap_or(u64::MAX);
                (hex::encode(g.key), (age, g.basis))
            })
            .collect(),
    };
    let body = serde_json::to_vec(&file)
        .map(Bytes::from)
        .unwrap_or_default();
    tier.put_coord(&format!("{DIR}/{me}.json"), body).await
}

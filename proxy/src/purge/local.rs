//! One replica's part of a purge: its disk, its cached tags and referrers
//! answers, its repository index, and its uploads under way. The same for
//! the replica an admin asked and for each peer it forwards to.

use std::collections::{BTreeMap, BTreeSet};

use crate::cache::repos::Entry;
use crate::oci::Digest;
use crate::pipeline::Shared;

/// What one replica's purge did.
#[derive(Debug, Default)]
pub struct Local {
    /// Every digest tried: those the query found in the repository index
    /// and those given.
    pub targets: BTreeSet<Digest>,
    /// The index entries the registry/repository query matched, taken out
    /// (the replica that forwarded the purge learns of digests only this
    /// one served from them).
    pub resolved: Vec<Entry>,
    /// Every index entry taken out: `resolved` and those of the given
    /// digests under any repository.
    pub taken: Vec<Entry>,
    pub removed: Vec<Digest>,
    pub bytes: u64,
    pub failed: BTreeMap<Digest, String>,
}

impl Local {
    /// Adds a further purge's outcome (the digests other replicas found).
    pub fn merge(&mut self, more: Local) {
        self.targets.extend(more.targets);
        self.resolved.extend(more.resolved);
        self.taken.extend(more.taken);
        self.removed.extend(more.removed);
        self.bytes += more.bytes;
        self.failed.extend(more.failed);
    }
}

/// Removes from this replica what `registry`/`repository` (None: no
/// query) names in its repository index, and the `given` digests.
pub async fn purge(
    shared: &Shared,
    registry: Option<&str>,
    repository: Option<&str>,
    given: &BTreeSet<Digest>,
) -> Local {
    let mut out = Local::default();
    // The index's record of the digests is taken out first (a blob being
    // removed is no longer listed under them) and put back for each blob
    // not removed, so the purge can be retried.
    if registry.is_some() || repository.is_some() {
        shared.tags.purge(registry, repository);
        shared.referrers.purge(registry, repository);
        out.resolved = shared.repos.take(registry, repository);
        out.taken.clone_from(&out.resolved);
        out.targets
            .extend(out.resolved.iter().map(|(_, _, d)| d.clone()));
    }
    for d in given {
        // Also when no repository noted it (cached before this start).
        out.taken.extend(shared.repos.take_digest(d));
        out.targets.insert(d.clone());
    }
    // Every blob is tried: one that cannot be removed (a file system
    // error) does not keep the others.
    for d in &out.targets {
        let size = shared.store.entry(d).map_or(0, |e| e.size);
        match shared.store.remove(d).await {
            Ok(true) => {
                out.bytes += size;
                out.removed.push(d.clone());
            }
            Ok(false) => {}
            Err(err) => {
                tracing::warn!(error = %err, digest = %d, "purge: blob not removed");
                out.failed.insert(d.clone(), err.to_string());
            }
        }
        if let Some(uploads) = &shared.uploads
            && uploads.withdraw(d)
        {
            tracing::info!(digest = %d, "purge: an upload of the blob to shared storage was under way; it deletes what it completes");
        }
    }
    if !out.failed.is_empty() {
        shared.repos.restore(
            out.taken
                .iter()
                .filter(|(_, _, d)| out.failed.contains_key(d))
                .cloned(),
        );
    }
    out
}

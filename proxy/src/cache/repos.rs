//! Which digests each (registry, repository) was served, learnt as the
//! pipeline serves them (in memory: after a restart it fills again as
//! clients pull). The store itself is shared by all repositories. Bounded:
//! clients choose repository names, so past [`MAX_ENTRIES`] pairs the one
//! noted longest ago is forgotten (it only steers the admin API's purge;
//! access is decided by the grants, not here).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use crate::bounded::BoundedMap;
use crate::oci::Digest;

/// (registry, repository, digest) entries kept.
pub const MAX_ENTRIES: usize = 50_000;

/// (registry, repository, digest).
pub type Entry = (String, String, Digest);

#[derive(Debug)]
pub struct RepoIndex {
    map: Mutex<BoundedMap<Entry, ()>>,
}

impl Default for RepoIndex {
    fn default() -> Self {
        Self::with_capacity(MAX_ENTRIES)
    }
}

impl RepoIndex {
    pub fn with_capacity(cap: usize) -> Self {
        Self {
            map: Mutex::new(BoundedMap::new(cap)),
        }
    }

    /// (registry, repository, digest) entries kept.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BoundedMap<Entry, ()>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn note(&self, registry: &str, repo: &str, digest: &Digest) {
        self.lock()
            .insert((registry.to_string(), repo.to_string(), digest.clone()), ());
    }

    /// Every (registry, repository) with its digests, sorted.
    pub fn snapshot(&self) -> Vec<((String, String), Vec<Digest>)> {
        let map = self.lock();
        let mut grouped: BTreeMap<(String, String), BTreeSet<Digest>> = BTreeMap::new();
        for (r, p, d) in map.keys() {
            grouped
                .entry((r.clone(), p.clone()))
                .or_default()
                .insert(d.clone());
        }
        grouped
            .into_iter()
            .map(|(k, v)| (k, v.into_iter().collect()))
            .collect()
    }

    /// Removes the matching repositories (None matches any) and returns
    /// their entries, for [`Self::restore`] if removing some digest fails.
    pub fn take(&self, registry: Option<&str>, repo: Option<&str>) -> Vec<Entry> {
        self.take_where(|(r, p, _)| registry.is_none_or(|x| x == r) && repo.is_none_or(|x| x == p))
    }

    /// Removes a digest from every repository and returns its entries.
    pub fn take_digest(&self, digest: &Digest) -> Vec<Entry> {
        self.take_where(|(_, _, d)| d == digest)
    }

    fn take_where(&self, matches: impl Fn(&Entry) -> bool) -> Vec<Entry> {
        let mut map = self.lock();
        let mut out = Vec::new();
        map.retain(|e, _| {
            let m = matches(e);
            if m {
                out.push(e.clone());
            }
            !m
        });
        out
    }

    /// Puts back entries [`Self::take`] returned whose blob a purge could
    /// not remove, so a retried purge of the repository finds them.
    pub fn restore(&self, entries: impl IntoIterator<Item = Entry>) {
        let mut map = self.lock();
        for e in entries {
            map.insert(e, ());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_random_repositories_keeps_the_index_at_its_cap() {
        let index = RepoIndex::with_capacity(10_000);
        let mut x: u64 = 0xD1B5_4A32_D192_ED03;
        for i in 0..100_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            index.note("r", &format!("flood/{x:x}"), &Digest::of(&i.to_be_bytes()));
        }
        assert_eq!(index.len(), 10_000);
        assert_eq!(index.snapshot().len(), 10_000);
    }

    #[test]
    fn take_and_restore() {
        let index = RepoIndex::default();
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        index.note("r", "one", &a);
        index.note("r", "one", &b);
        index.note("r", "two", &a);
        index.note("s", "one", &b);
        assert_eq!(index.snapshot().len(), 3);
        assert_eq!(index.take_digest(&a).len(), 2);
        assert_eq!(index.len(), 2);
        let taken = index.take(Some("r"), None);
        assert_eq!(taken, vec![("r".into(), "one".into(), b.clone())]);
        assert_eq!(
            index.snapshot(),
            vec![(("s".to_string(), "one".to_string()), vec![b.clone()])]
        );
        // A purge that could not remove the blob puts its entries back.
        index.restore(taken);
        assert_eq!(index.len(), 2);
        assert_eq!(index.take_digest(&b).len(), 2);
        assert!(index.is_empty());
    }
}

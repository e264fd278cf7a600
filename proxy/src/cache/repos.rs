//! Which digests each (registry, repository) was served, learnt as the
//! pipeline serves them (in memory: after a restart it fills again as
//! clients pull). The store itself is shared by all repositories.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use crate::oci::Digest;

#[derive(Debug, Default)]
pub struct RepoIndex {
    map: Mutex<BTreeMap<(String, String), BTreeSet<Digest>>>,
}

impl RepoIndex {
    pub fn note(&self, registry: &str, repo: &str, digest: &Digest) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let key = (registry.to_string(), repo.to_string());
        match map.get_mut(&key) {
            Some(set) => {
                if !set.contains(digest) {
                    set.insert(digest.clone());
                }
            }
            None => {
                map.insert(key, BTreeSet::from([digest.clone()]));
            }
        }
    }

    /// Every (registry, repository) with its digests.
    pub fn snapshot(&self) -> Vec<((String, String), Vec<Digest>)> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .map(|(k, v)| (k.clone(), v.iter().cloned().collect()))
            .collect()
    }

    /// Removes the matching repositories (None matches any) and returns
    /// their digests.
    pub fn take(&self, registry: Option<&str>, repo: Option<&str>) -> BTreeSet<Digest> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let keys: Vec<_> = map
            .keys()
            .filter(|(r, p)| registry.is_none_or(|x| x == r) && repo.is_none_or(|x| x == p))
            .cloned()
            .collect();
        let mut out = BTreeSet::new();
        for k in keys {
            if let Some(set) = map.remove(&k) {
                out.extend(set);
            }
        }
        out
    }

    /// Forgets a digest everywhere.
    pub fn forget(&self, digest: &Digest) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        for set in map.values_mut() {
            set.remove(digest);
        }
        map.retain(|_, s| !s.is_empty());
    }
}

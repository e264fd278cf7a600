//! A map with a fixed capacity for state a client can grow (access grants,
//! the repository index, upstream tokens per repository scope): once full, each insert of a new key drops the
//! key written longest ago. Inserting is O(1) (amortised), so a flood of
//! made-up names costs neither unbounded memory nor a sweep per request.

use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// Capacity-bounded map, oldest write evicted first. Re-inserting a key
/// makes it the newest, so entries in use outlive the ones nobody renews.
#[derive(Debug)]
pub struct BoundedMap<K, V> {
    cap: usize,
    /// Each value with the sequence number of its last write.
    map: HashMap<K, (V, u64)>,
    /// Keys in write order; an element whose sequence number no longer
    /// matches the map's is a stale copy left by a re-insert or a removal.
    order: VecDeque<(K, u64)>,
    seq: u64,
}

impl<K: Hash + Eq + Clone, V> BoundedMap<K, V> {
    /// A map that never holds more than `cap` entries (at least one).
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            map: HashMap::new(),
            order: VecDeque::new(),
            seq: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.get(key).map(|(v, _)| v)
    }

    /// Inserts or replaces `key`, evicting the oldest entries beyond the
    /// capacity.
    pub fn insert(&mut self, key: K, value: V) {
        self.seq += 1;
        let seq = self.seq;
        self.map.insert(key.clone(), (value, seq));
        self.order.push_back((key, seq));
        while self.map.len() > self.cap {
            let Some((old, at)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&old).is_some_and(|(_, s)| *s == at) {
                self.map.remove(&old);
            }
        }
        // Re-inserts leave stale copies behind; drop them once they
        // outnumber the live keys so `order` stays O(cap) too.
        if self.order.len() > 2 * self.cap {
            let map = &self.map;
            self.order
                .retain(|(k, s)| map.get(k).is_some_and(|(_, live)| live == s));
        }
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        // The key's copy in `order` goes stale and is skipped later.
        self.map.remove(key).map(|(v, _)| v)
    }

    /// Keeps only the entries `keep` returns true for (O(n): for admin
    /// operations, not per request).
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool) {
        self.map.retain(|k, (v, _)| keep(k, v));
        let map = &self.map;
        self.order
            .retain(|(k, s)| map.get(k).is_some_and(|(_, live)| live == s));
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.map.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_new_keys_keeps_the_size_at_the_cap() {
        let mut m = BoundedMap::new(1000);
        // Deterministic pseudo-random keys (xorshift): no collisions matter.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for i in 0..100_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            m.insert(x, i);
            assert!(m.len() <= 1000);
            assert!(m.order.len() <= 2 * 1000 + 1);
        }
        assert_eq!(m.len(), 1000);
    }

    #[test]
    fn the_oldest_write_goes_first_and_a_rewrite_renews() {
        let mut m = BoundedMap::new(2);
        m.insert("a", 1);
        m.insert("b", 2);
        m.insert("a", 3); // renews a: b is now the oldest
        m.insert("c", 4);
        assert_eq!(m.get(&"a"), Some(&3));
        assert_eq!(m.get(&"b"), None);
        assert_eq!(m.get(&"c"), Some(&4));
        // Rewriting one key over and over keeps `order` bounded.
        for i in 0..10_000 {
            m.insert("a", i);
        }
        assert!(m.order.len() <= 5);
        assert_eq!(m.len(), 2);
        m.remove(&"a");
        m.insert("d", 5);
        m.insert("e", 6);
        assert_eq!(m.len(), 2);
        assert_eq!(m.get(&"c"), None);
    }
}

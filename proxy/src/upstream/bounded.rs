//! A map with a fixed capacity for state that clients can make grow (one
//! token per repository name a client invents): inserting is O(1)
//! (amortised), and past the capacity the oldest insertions go first.

use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// A size-capped map: first in, first out.
#[derive(Debug)]
pub(crate) struct Bounded<K, V> {
    /// Each value with the insertion number that put it there.
    map: HashMap<K, (V, u64)>,
    /// Keys in insertion order; an entry whose number no longer matches
    /// the map's was replaced since and is skipped.
    order: VecDeque<(K, u64)>,
    next: u64,
    capacity: usize,
}

impl<K: Hash + Eq + Clone, V> Bounded<K, V> {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            next: 0,
            capacity: capacity.max(1),
        }
    }

    pub(crate) fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.get(key).map(|(v, _)| v)
    }

    /// Removes `key`; its place in the order queue goes stale and is
    /// skipped when reached.
    pub(crate) fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.remove(key).map(|(v, _)| v)
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Inserts (or replaces) `key`, evicting the oldest entries beyond the
    /// capacity. The order queue is also kept within twice the capacity,
    /// so keys replaced over and over do not grow it: each insert pops at
    /// most what earlier inserts pushed (amortised O(1)).
    pub(crate) fn insert(&mut self, key: K, value: V) {
        let number = self.next;
        self.next += 1;
        self.map.insert(key.clone(), (value, number));
        self.order.push_back((key, number));
        while self.map.len() > self.capacity || self.order.len() > 2 * self.capacity {
            let Some((old, n)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&old).is_some_and(|(_, current)| *current == n) {
                self.map.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_capacity_holds_and_the_oldest_go_first() {
        let mut m = Bounded::new(3);
        for i in 0..100_000u32 {
            m.insert(i, i);
            assert!(m.len() <= 3);
            assert!(m.order.len() <= 6);
        }
        assert_eq!(m.get(&99_999), Some(&99_999));
        assert_eq!(m.get(&99_997), Some(&99_997));
        assert_eq!(m.get(&99_996), None);
    }

    #[test]
    fn replacing_a_key_keeps_it_and_the_queue_bounded() {
        let mut m = Bounded::new(2);
        m.insert("a", 1);
        for i in 0..1000 {
            m.insert("b", i);
        }
        assert_eq!(m.get("b"), Some(&999));
        assert!(m.order.len() <= 4);
        m.insert("c", 0);
        assert_eq!(m.len(), 2);
        assert_eq!(m.remove("c"), Some(0));
        assert_eq!(m.len(), 1);
    }
}

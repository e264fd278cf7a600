//! A map with a fixed capacity for state a client can grow (access grants,
//! the repository index, upstream tokens per repository scope): once full, each insert of a new key drops the
//! key written longest ago. Inserting is O(1) (amortised), so a flood of
//! made-up names costs neither unbounded memory nor a sweep per request.
//!
//! A map whose entries clients cause to be written can also give each
//! writer (the owner: in the proxy, the client's address) a share of it
//! ([`BoundedMap::with_share`]): once the map is full, a new key drops
//! the oldest entry of its own writer when that writer holds its share,
//! and else the oldest of the writer furthest over its share, so one
//! client's flood pushes out its own entries, not everyone else's.

mod owners;

use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

use owners::Owners;

/// Capacity-bounded map, oldest write evicted first. Re-inserting a key
/// makes it the newest, so entries in use outlive the ones nobody renews.
/// `O` is who wrote an entry, for maps with a share.
#[derive(Debug)]
pub struct BoundedMap<K, V, O = ()> {
    cap: usize,
    map: HashMap<K, Slot<V, O>>,
    /// Keys in write order; an element whose sequence number no longer
    /// matches the map's is a stale copy left by a re-insert or a removal.
    order: VecDeque<(K, u64)>,
    seq: u64,
    /// What each writer holds, for a map with a share.
    owners: Option<Owners<K, O>>,
}

#[derive(Debug)]
struct Slot<V, O> {
    value: V,
    /// The sequence number of its last write.
    seq: u64,
    /// Who made that write: the entry counts against its share.
    owner: O,
}

impl<K: Hash + Eq + Clone, V> BoundedMap<K, V> {
    /// A map that never holds more than `cap` entries (at least one).
    pub fn new(cap: usize) -> Self {
        Self::build(cap, None)
    }

    /// Inserts or replaces `key`, evicting the oldest entries beyond the
    /// capacity.
    pub fn insert(&mut self, key: K, value: V) {
        self.insert_by(key, value, ());
    }
}

impl<K: Hash + Eq + Clone, V, O: Hash + Eq + Clone> BoundedMap<K, V, O> {
    /// A map of at most `cap` entries in which, once it is full, a writer
    /// holding `share` entries or more makes room for a new one with its
    /// own oldest (see [`Self::insert_by`]).
    pub fn with_share(cap: usize, share: usize) -> Self {
        let cap = cap.max(1);
        Self::build(cap, Some(Owners::new(share.clamp(1, cap))))
    }

    fn build(cap: usize, owners: Option<Owners<K, O>>) -> Self {
        Self {
            cap: cap.max(1),
            map: HashMap::new(),
            order: VecDeque::new(),
            seq: 0,
            owners,
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
        self.map.get(key).map(|slot| &slot.value)
    }

    /// Who wrote `key` last.
    pub fn owner<Q>(&self, key: &Q) -> Option<&O>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.get(key).map(|slot| &slot.owner)
    }

    /// Inserts or replaces `key` as written by `owner`, who holds it from
    /// now on. A new key in a full map with a share drops the oldest entry
    /// of `owner` if it holds its share, else the oldest of the owner
    /// furthest over its share, else (nobody over) the map's oldest.
    /// Returns how many entries went because their owner was at or over
    /// its share (0 or 1).
    pub fn insert_by(&mut self, key: K, value: V, owner: O) -> usize {
        let mut shed = 0;
        if self.map.len() >= self.cap
            && !self.map.contains_key(&key)
            && let Some(owners) = self.owners.as_mut()
        {
            let map = &self.map;
            let victim = owners.victim(&owner, |k, s| map.get(k).is_some_and(|v| v.seq == s));
            if let Some(slot) = victim.and_then(|k| self.map.remove(&k)) {
                owners.release(&slot.owner);
                shed += 1;
            }
        }
        self.seq += 1;
        let seq = self.seq;
        let before = self.map.insert(
            key.clone(),
            Slot {
                value,
                seq,
                owner: owner.clone(),
            },
        );
        if let Some(owners) = self.owners.as_mut() {
            owners.wrote(owner, key.clone(), seq, before.as_ref().map(|b| &b.owner));
        }
        self.order.push_back((key, seq));
        while self.map.len() > self.cap {
            let Some((old, at)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&old).is_some_and(|slot| slot.seq == at)
                && let Some(slot) = self.map.remove(&old)
                && let Some(owners) = self.owners.as_mut()
            {
                owners.release(&slot.owner);
            }
        }
        // Re-inserts leave stale copies behind; drop them once they
        // outnumber the live keys so `order` stays O(cap) too.
        if self.order.len() > 2 * self.cap {
            let map = &self.map;
            self.order
                .retain(|(k, s)| map.get(k).is_some_and(|slot| slot.seq == *s));
        }
        if let Some(owners) = self.owners.as_mut() {
            let map = &self.map;
            owners.compact(map.len(), |k, s| map.get(k).is_some_and(|v| v.seq == s));
        }
        shed
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        // The key's copy in `order` goes stale and is skipped later.
        let slot = self.map.remove(key)?;
        if let Some(owners) = self.owners.as_mut() {
            owners.release(&slot.owner);
        }
        Some(slot.value)
    }

    /// Keeps only the entries `keep` returns true for (O(n): for admin
    /// operations, not per request).
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool) {
        let owners = &mut self.owners;
        self.map.retain(|k, slot| {
            let kept = keep(k, &slot.value);
            if !kept && let Some(owners) = owners.as_mut() {
                owners.release(&slot.owner);
            }
            kept
        });
        let map = &self.map;
        self.order
            .retain(|(k, s)| map.get(k).is_some_and(|slot| slot.seq == *s));
        if let Some(owners) = self.owners.as_mut() {
            owners.compact(map.len(), |k, s| map.get(k).is_some_and(|v| v.seq == s));
        }
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.map.keys()
    }

    /// Panics unless the per-owner bookkeeping matches the map.
    #[cfg(test)]
    fn check(&self)
    where
        O: std::fmt::Debug,
    {
        let Some(owners) = &self.owners else {
            return;
        };
        let mut counts: HashMap<&O, usize> = HashMap::new();
        for slot in self.map.values() {
            *counts.entry(&slot.owner).or_default() += 1;
        }
        assert_eq!(counts.len(), owners.held.len(), "owners tracked");
        let mut queued = 0;
        for (owner, held) in &owners.held {
            assert_eq!(counts.get(owner), Some(&held.live), "{owner:?}");
            assert_eq!(owners.over.contains(owner), held.live > owners.share);
            let live = (held.writes.iter())
                .filter(|(k, s)| self.map.get(k).is_some_and(|v| v.seq == *s))
                .count();
            assert_eq!(live, held.live, "{owner:?}'s queue");
            queued += held.writes.len();
        }
        assert_eq!(owners.queued, queued);
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

    /// An owner writing far past its share into a full map pushes out its
    /// own entries, never another owner's; one that is over its share
    /// when another owner needs room gives up its oldest. Without shares
    /// the flood took every entry of the other owner.
    #[test]
    fn one_owner_flooding_past_its_share_keeps_the_others_entries() {
        let mut m = BoundedMap::with_share(800, 100);
        for k in 0..50u64 {
            m.insert_by(k, k, "victim");
        }
        let mut shed = 0;
        for k in 1_000..101_000u64 {
            shed += m.insert_by(k, k, "flood");
            assert!(m.len() <= 800);
        }
        m.check();
        assert_eq!(m.len(), 800);
        assert!(
            (0..50).all(|k| m.get(&k) == Some(&k)),
            "the victim lost entries"
        );
        assert_eq!(m.get(&100_999), Some(&100_999), "the newest flood entry");
        assert_eq!(shed, 100_000 - 750, "each flood write past the full map");
        // Room for another owner's new keys comes out of the flood, the
        // victim's stay.
        for k in 200..260u64 {
            assert_eq!(m.insert_by(k, k, "other"), 1);
        }
        m.check();
        assert!((0..50).all(|k| m.get(&k).is_some()));
        assert!((200..260).all(|k| m.get(&k).is_some()));
        assert_eq!(m.len(), 800);
    }

    /// Owners that come and go (100 000 of them, writing over each
    /// other's keys) leave no trace: only owners holding an entry are
    /// tracked, and the write queues stay within a few times the
    /// capacity.
    #[test]
    fn the_owner_bookkeeping_stays_bounded() {
        let mut m = BoundedMap::with_share(1000, 125);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for i in 0..100_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Half the writes hit one of 1 500 keys again, under another
            // owner; the rest are new keys.
            let key = if i % 2 == 0 { x % 1_500 } else { x };
            m.insert_by(key, i, i);
            if i % 4_096 == 0 {
                m.remove(&(x % 1_500));
                m.check();
            }
            let owners = m.owners.as_ref().unwrap();
            assert!(owners.held.len() <= m.len());
            assert!(owners.queued <= 2 * 1000 + 17, "{}", owners.queued);
            assert!(m.order.len() <= 2 * 1000 + 1);
        }
        m.check();
        m.retain(|k, _| k % 2 == 0);
        m.check();
        m.retain(|_, _| false);
        m.check();
        let owners = m.owners.as_ref().unwrap();
        assert_eq!((owners.held.len(), owners.queued), (0, 0));
    }

    /// A key rewritten by another owner counts against the new owner's
    /// share, and the old owner's copy of it goes stale.
    #[test]
    fn a_rewrite_moves_the_entry_to_its_writer() {
        let mut m = BoundedMap::with_share(4, 2);
        m.insert_by("a", 1, 'x');
        m.insert_by("b", 2, 'x');
        m.insert_by("a", 3, 'y');
        assert_eq!(m.owner(&"a"), Some(&'y'));
        m.insert_by("c", 4, 'y');
        m.insert_by("d", 5, 'z');
        m.check();
        // Full; y holds its share: its own oldest ("a") makes room.
        assert_eq!(m.insert_by("e", 6, 'y'), 1);
        assert_eq!(m.get(&"a"), None);
        assert_eq!(m.get(&"b"), Some(&2));
        m.check();
    }
}

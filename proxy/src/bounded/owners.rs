//! Who holds what in a [`super::BoundedMap`] with a share: per owner, how
//! many entries it holds and the order it wrote them in, so that its own
//! oldest can go when it is over its share.
//!
//! Bounded like the map itself: an owner is tracked only while it holds
//! an entry (so never more owners than the map's capacity), and the write
//! queues are compacted whenever their copies outnumber the map's
//! capacity, however the entries went (evicted, rewritten by another
//! owner, removed).

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;

#[derive(Debug)]
pub(super) struct Owners<K, O> {
    /// Entries one owner may hold once the map is full.
    pub(super) share: usize,
    pub(super) held: HashMap<O, Held<K>>,
    /// Owners holding more than `share`: fewer than capacity / share.
    pub(super) over: HashSet<O>,
    /// Copies in every owner's `writes`, stale ones included.
    pub(super) queued: usize,
}

#[derive(Debug)]
pub(super) struct Held<K> {
    /// Entries the owner holds now.
    pub(super) live: usize,
    /// Its writes, oldest first; a copy whose sequence number is no
    /// longer the key's in the map is stale.
    pub(super) writes: VecDeque<(K, u64)>,
}

impl<K: Clone, O: Hash + Eq + Clone> Owners<K, O> {
    pub(super) fn new(share: usize) -> Self {
        Self {
            share,
            held: HashMap::new(),
            over: HashSet::new(),
            queued: 0,
        }
    }

    /// `owner` wrote `key` as write `seq`; `before` owned the entry it
    /// replaced, if any.
    pub(super) fn wrote(&mut self, owner: O, key: K, seq: u64, before: Option<&O>) {
        if before != Some(&owner) {
            if let Some(before) = before {
                self.release(before);
            }
            let share = self.share;
            let held = self.held.entry(owner.clone()).or_insert_with(|| Held {
                live: 0,
                writes: VecDeque::new(),
            });
            held.live += 1;
            if held.live == share + 1 {
                self.over.insert(owner.clone());
            }
        }
        if let Some(held) = self.held.get_mut(&owner) {
            held.writes.push_back((key, seq));
            self.queued += 1;
        }
    }

    /// An entry `owner` held is gone.
    pub(super) fn release(&mut self, owner: &O) {
        let Some(held) = self.held.get_mut(owner) else {
            return;
        };
        if held.live == self.share + 1 {
            self.over.remove(owner);
        }
        held.live = held.live.saturating_sub(1);
        if held.live == 0 {
            // Whatever is left in its queue is stale.
            self.queued -= held.writes.len();
            self.held.remove(owner);
        }
    }

    /// The entry to drop so that `owner` can add one to a full map: its
    /// own oldest once it holds its share, else the oldest of the owner
    /// furthest over its share; `None` when nobody is over (the map's
    /// oldest goes, as in a map without shares). `live` tells whether a
    /// copy is still the key's last write.
    pub(super) fn victim(&mut self, owner: &O, live: impl Fn(&K, u64) -> bool) -> Option<K> {
        let at_share = self.held.get(owner).is_some_and(|h| h.live >= self.share);
        let from = if at_share {
            owner.clone()
        } else {
            let held = &self.held;
            self.over
                .iter()
                .max_by_key(|o| held.get(*o).map_or(0, |h| h.live))?
                .clone()
        };
        let held = self.held.get_mut(&from)?;
        while let Some((key, seq)) = held.writes.pop_front() {
            self.queued -= 1;
            if live(&key, seq) {
                return Some(key);
            }
        }
        None
    }

    /// Drops the stale copies once they could outnumber the live ones:
    /// `live_entries` is what the map holds.
    pub(super) fn compact(&mut self, live_entries: usize, live: impl Fn(&K, u64) -> bool) {
        if self.queued <= 2 * live_entries.max(self.held.len()) + 16 {
            return;
        }
        self.queued = 0;
        for held in self.held.values_mut() {
            held.writes.retain(|(k, s)| live(k, *s));
            self.queued += held.writes.len();
        }
    }
}

//! One upstream fetch at a time per key, for the small objects that are
//! read whole (manifests by digest and by tag): concurrent misses take
//! turns, and everyone after the first finds the object in the cache.
//! Without this a rollout's nodes asking for one manifest at once each
//! cost an upstream `GET` — and on Docker Hub each counts against the pull
//! limit.
//!
//! Blobs have their own, streaming, merge (`inflight`): a waiter there
//! reads the download as it arrives. A manifest is small, so waiting for
//! the whole of it is simpler and costs nothing.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

/// A key's lock and how many requests hold or await it.
type Entry = (Arc<tokio::sync::Mutex<()>>, usize);

/// Turns per key. An entry lives only while someone holds or waits for its
/// turn, so the map is bounded by the requests in flight.
#[derive(Debug)]
pub struct Turns<K> {
    keys: Mutex<HashMap<K, Entry>>,
}

impl<K> Default for Turns<K> {
    fn default() -> Self {
        Self {
            keys: Mutex::new(HashMap::new()),
        }
    }
}

/// Held while it is this request's turn; the next waiter's comes when it
/// drops (also when the request is cancelled).
#[derive(Debug)]
pub struct Turn<'a, K: Eq + Hash + Clone> {
    turns: &'a Turns<K>,
    key: K,
    guard: Option<OwnedMutexGuard<()>>,
}

impl<K: Eq + Hash + Clone> Turns<K> {
    /// Waits for `key`'s turn.
    pub async fn take(&self, key: &K) -> Turn<'_, K> {
        let lock = {
            let mut keys = self.lock();
            let entry = keys
                .entry(key.clone())
                .or_insert_with(|| (Arc::new(tokio::sync::Mutex::new(())), 0));
            entry.1 += 1;
            Arc::clone(&entry.0)
        };
        // Counted from here: a waiter cancelled before its turn comes
        // leaves through the same Drop.
        let mut turn = Turn {
            turns: self,
            key: key.clone(),
            guard: None,
        };
        turn.guard = Some(lock.lock_owned().await);
        turn
    }

    /// [`Turns::take`], waited for at most `limit`: `None` past it (the
    /// one ahead is stuck on a failing upstream; each waiter would
    /// otherwise add a whole timeout), and the caller goes on without one.
    pub async fn take_within(&self, key: &K, limit: std::time::Duration) -> Option<Turn<'_, K>> {
        tokio::time::timeout(limit, self.take(key)).await.ok()
    }

    /// Keys with a turn held or awaited.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Entry>> {
        self.keys
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<K: Eq + Hash + Clone> Drop for Turn<'_, K> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut keys = self.turns.lock();
        if let Some(entry) = keys.get_mut(&self.key) {
            entry.1 -= 1;
            if entry.1 == 0 {
                keys.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn one_turn_at_a_time_per_key_and_no_entry_left_behind() {
        let turns = Arc::new(Turns::<String>::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (turns, inside, most) = (turns.clone(), inside.clone(), most.clone());
            tasks.push(tokio::spawn(async move {
                let _turn = turns.take(&"a".to_string()).await;
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        // Another key is not held up by them.
        let other = tokio::time::timeout(Duration::from_secs(1), turns.take(&"b".to_string()))
            .await
            .unwrap();
        drop(other);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 1);
        assert!(turns.is_empty());
    }

    #[tokio::test]
    async fn a_cancelled_waiter_leaves_no_entry_and_blocks_nobody() {
        let turns = Turns::<u32>::default();
        let first = turns.take(&1).await;
        // Waits, then is dropped (its client went away).
        assert!(
            tokio::time::timeout(Duration::from_millis(20), turns.take(&1))
                .await
                .is_err()
        );
        assert_eq!(turns.len(), 1);
        drop(first);
        assert!(turns.is_empty());
        drop(turns.take(&1).await);
        assert!(turns.is_empty());
    }
}

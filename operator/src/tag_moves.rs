//! Tag moves the proxy reports in `/status`, turned into Events on the
//! MirrorRegistry (reason `TagMoved`) and its `status.lastTagMove`.
//!
//! The proxy keeps only recent moves and forgets them on restart, and
//! `/status` goes through the Service: with several replicas each
//! reconcile sees one replica's list, with that replica's timestamps. So a
//! move is told once by what moved (registry, repository, tag, from, to):
//! the operator remembers the last [`REMEMBERED`] moves it told
//! ([`Told`]); a move with the same key is news again only
//! [`REPEAT_AFTER`] after the last sighting (a tag flapping back and
//! forth). After a restart the memory is empty: moves up to
//! `status.lastTagMove` count as told.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use kube::runtime::events::EventType;
use pullthrough_api::crd::TagMoveStatus;

use crate::FIELD_MANAGER;
use crate::context::Kube;
use crate::proxy_status::TagMove;
use crate::status::Note;

/// Events per reconcile at most; the rest are summed up in the last one.
pub const MAX_EVENTS: usize = 5;

fn at_millis(s: &TagMoveStatus) -> Option<i64> {
    s.at.parse::<Timestamp>().ok().map(|t| t.as_millisecond())
}

/// How many told moves are remembered (each proxy replica lists 64).
pub const REMEMBERED: usize = 4096;

/// A move seen again this long (milliseconds) after its last sighting is
/// a new move of the same tag between the same digests.
pub const REPEAT_AFTER: i64 = 15 * 60 * 1000;

/// What moved: the same move as another replica saw it.
type Key = (String, String, String, String, String);

fn key(m: &TagMove) -> Key {
    (
        m.registry.clone(),
        m.repository.clone(),
        m.tag.clone(),
        m.from.clone(),
        m.to.clone(),
    )
}

/// The moves already told, bounded.
#[derive(Debug, Default)]
pub struct Told(Mutex<Memory>);

#[derive(Debug, Default)]
struct Memory {
    /// Key → the latest time it was seen (unix milliseconds).
    at: HashMap<Key, i64>,
    /// Keys, oldest first, for the bound.
    order: VecDeque<Key>,
    /// Hosts whose `status.lastTagMove` was taken in since the start.
    seeded: HashSet<String>,
}

impl Memory {
    fn is_new(&self, m: &TagMove) -> bool {
        self.at
            .get(&key(m))
            .is_none_or(|&seen| m.at > seen.saturating_add(REPEAT_AFTER))
    }

    fn remember(&mut self, m: &TagMove) {
        let k = key(m);
        match self.at.get_mut(&k) {
            Some(at) => *at = (*at).max(m.at),
            None => {
                self.at.insert(k.clone(), m.at);
                self.order.push_back(k);
                while self.order.len() > REMEMBERED {
                    if let Some(old) = self.order.pop_front() {
                        self.at.remove(&old);
                    }
                }
            }
        }
    }
}

impl Told {
    /// The moves of `host` in `moves` not told yet, oldest first. The first
    /// time a host is looked at, moves up to `last` (its
    /// `status.lastTagMove`, what the operator told before a restart) are
    /// taken as told.
    pub fn unseen<'a>(
        &self,
        moves: &'a [TagMove],
        host: &str,
        last: Option<&TagMoveStatus>,
    ) -> Vec<&'a TagMove> {
        let Ok(mut mem) = self.0.lock() else {
            return Vec::new();
        };
        let ours = moves.iter().filter(|m| m.registry == host);
        if mem.seeded.insert(host.to_string())
            && let Some(after) = last.and_then(at_millis)
        {
            for m in ours.clone().filter(|m| m.at <= after) {
                mem.remember(m);
            }
        }
        // The same move twice in one list counts once.
        let mut fresh: Vec<&TagMove> = Vec::new();
        for m in ours {
            if mem.is_new(m) && !fresh.iter().any(|f| key(f) == key(m)) {
                fresh.push(m);
            }
        }
        fresh.sort_by_key(|m| m.at);
        fresh
    }

    /// Remembers `moves` as told, and every sighting in `moves_seen` of a
    /// move already told (so another replica's later timestamp for it does
    /// not make it news).
    pub fn told(&self, told: &[&TagMove], seen: &[TagMove]) {
        let Ok(mut mem) = self.0.lock() else {
            return;
        };
        for m in told {
            mem.remember(m);
        }
        for m in seen {
            if !mem.is_new(m) {
                mem.remember(m);
            }
        }
    }

    /// Forgets `host` (its MirrorRegistry is gone).
    pub fn forget(&self, host: &str) {
        if let Ok(mut mem) = self.0.lock() {
            mem.seeded.remove(host);
        }
    }
}

/// `status.lastTagMove` after telling `moved` (oldest first): the newest
/// move told, by its time.
pub fn latest(moved: &[&TagMove], last: Option<&TagMoveStatus>) -> Option<TagMoveStatus> {
    match (moved.last(), last) {
        (Some(m), Some(old)) if at_millis(old).is_some_and(|t| t >= m.at) => Some(old.clone()),
        (Some(m), _) => Some(to_status(m)),
        (None, old) => old.cloned(),
    }
}

pub fn to_status(m: &TagMove) -> TagMoveStatus {
    let at = Timestamp::from_millisecond(m.at).unwrap_or(Timestamp::UNIX_EPOCH);
    TagMoveStatus {
        repository: m.repository.clone(),
        tag: m.tag.clone(),
        from: m.from.clone(),
        to: m.to.clone(),
        at: at.to_string(),
    }
}

/// The Events for `moves` (oldest first): one per move, at most
/// [`MAX_EVENTS`], the last naming how many more there were.
pub fn notes(host: &str, moves: &[&TagMove]) -> Vec<Note> {
    let skipped = moves.len().saturating_sub(MAX_EVENTS);
    let shown = &moves[skipped..];
    shown
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let mut note = format!(
                "{host}/{}:{} moved from {} to {}",
                m.repository, m.tag, m.from, m.to
            );
            if i + 1 == shown.len() && skipped > 0 {
                note.push_str(&format!(
                    " ({skipped} earlier moves not shown: see the proxy's /admin/tags)"
                ));
            }
            Note {
                type_: EventType::Normal,
                reason: "TagMoved".into(),
                note,
            }
        })
        .collect()
}

/// Writes one Event per move. Not through the [`kube::runtime::events::Recorder`]:
/// it folds Events with the same reason into one series and keeps the
/// first note, so every move after the first would be lost in a count.
/// Best effort, like every Event: a failure is logged.
pub async fn publish(kube: &Kube, regarding: &ObjectReference, note: Note) {
    let now = Timestamp::now();
    // Cluster-scoped MirrorRegistries: Events go to `default`, as the
    // Recorder puts them.
    let ns = regarding
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = regarding
        .name
        .clone()
        .unwrap_or_else(|| FIELD_MANAGER.into());
    let event = Event {
        metadata: ObjectMeta {
            name: Some(format!("{name}.{:x}", now.as_nanosecond())),
            namespace: Some(ns.clone()),
            ..Default::default()
        },
        action: Some("ObserveTags".into()),
        reason: Some(note.reason),
        note: Some(crate::status::event_note(note.note)),
        type_: Some(
            match note.type_ {
                EventType::Normal => "Normal",
                EventType::Warning => "Warning",
            }
            .into(),
        ),
        event_time: Some(MicroTime(now)),
        regarding: Some(regarding.clone()),
        reporting_controller: Some(FIELD_MANAGER.into()),
        reporting_instance: Some(kube.instance.clone()),
        ..Default::default()
    };
    let api: Api<Event> = Api::namespaced(kube.client.clone(), &ns);
    if let Err(e) = api.create(&PostParams::default(), &event).await {
        tracing::warn!(error = %e, "publishing a TagMoved event");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn mv(registry: &str, tag: &str, at: i64) -> TagMove {
        TagMove {
            registry: registry.into(),
            repository: "app".into(),
            tag: tag.into(),
            from: "sha256:a".into(),
            to: "sha256:b".into(),
            at,
        }
    }

    #[test]
    fn each_move_is_told_once() {
        let moves = vec![
            mv("quay.io", "latest", 1_000),
            mv("ghcr.io", "main", 1_500),
            mv("quay.io", "edge", 2_000),
        ];
        let told = Told::default();
        let first = told.unseen(&moves, "quay.io", None);
        assert_eq!(first.len(), 2);
        let last = latest(&first, None).unwrap();
        assert_eq!(last.at, "1970-01-01T00:00:02Z");
        told.told(&first, &moves);
        // The next reconcile sees the same list: nothing new.
        assert!(told.unseen(&moves, "quay.io", Some(&last)).is_empty());
        // A later move is new.
        let mut later = moves.clone();
        let mut moved_on = mv("quay.io", "latest", 2_001);
        moved_on.to = "sha256:c".into();
        later.push(moved_on);
        let new = told.unseen(&later, "quay.io", Some(&last));
        assert_eq!(new.len(), 1);
        assert_eq!(new[0].at, 2_001);
        // Millisecond precision survives the status round trip.
        assert_eq!(at_millis(&to_status(new[0])), Some(2_001));
        // After a restart (empty memory) what the status recorded is not
        // told again.
        let restarted = Told::default();
        assert!(restarted.unseen(&moves, "quay.io", Some(&last)).is_empty());
        // The same tag moving between the same digests again much later
        // is a new move.
        let again = [mv("quay.io", "latest", 1_000 + REPEAT_AFTER + 1)];
        assert_eq!(told.unseen(&again, "quay.io", Some(&last)).len(), 1);
    }

    #[test]
    fn a_burst_is_capped_and_summed_up() {
        let moves: Vec<TagMove> = (0..8).map(|i| mv("quay.io", &format!("t{i}"), i)).collect();
        let refs: Vec<&TagMove> = moves.iter().collect();
        let notes = notes("quay.io", &refs);
        assert_eq!(notes.len(), MAX_EVENTS);
        assert!(
            notes[0]
                .note
                .starts_with("quay.io/app:t3 moved from sha256:a to sha256:b")
        );
        assert!(
            notes[4].note.contains("3 earlier moves not shown"),
            "{}",
            notes[4].note
        );
        assert!(notes.iter().all(|n| n.reason == "TagMoved"));
    }
}

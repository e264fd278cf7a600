//! Tag moves the proxy reports in `/status`, turned into Events on the
//! MirrorRegistry (reason `TagMoved`) and its `status.lastTagMove`.
//!
//! The proxy keeps only recent moves and forgets them on restart; the
//! status remembers the last one reported, so each move is told once even
//! though every reconcile sees the same list.

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

/// The moves of `host` not reported yet (after `last`), oldest first.
pub fn unseen<'a>(
    moves: &'a [TagMove],
    host: &str,
    last: Option<&TagMoveStatus>,
) -> Vec<&'a TagMove> {
    let after = last.and_then(at_millis);
    moves
        .iter()
        .filter(|m| m.registry == host)
        .filter(|m| after.is_none_or(|t| m.at > t))
        .collect()
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
        let first = unseen(&moves, "quay.io", None);
        assert_eq!(first.len(), 2);
        let last = to_status(first[1]);
        assert_eq!(last.at, "1970-01-01T00:00:02Z");
        // The next reconcile sees the same list: nothing new.
        assert!(unseen(&moves, "quay.io", Some(&last)).is_empty());
        // A later move is new.
        let mut later = moves.clone();
        later.push(mv("quay.io", "latest", 2_001));
        let new = unseen(&later, "quay.io", Some(&last));
        assert_eq!(new.len(), 1);
        assert_eq!(new[0].at, 2_001);
        // Millisecond precision survives the status round trip.
        assert_eq!(at_millis(&to_status(new[0])), Some(2_001));
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

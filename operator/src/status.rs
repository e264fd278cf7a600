//! A MirrorRegistry's status: the conditions it should carry, merged with
//! the old ones (`observedGeneration` on each, `lastTransitionTime` kept
//! while the status value is unchanged), the Event naming what changed, and
//! the server-side apply that writes it.

use std::collections::HashSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, Client, Resource};
use pullthrough_api::crd::{MirrorRegistry, MirrorRegistryStatus, NodeCounts, condition};
use serde::Serialize;

use crate::FIELD_MANAGER;
use crate::error::{Error, KubeContext};
use crate::nodes;
use crate::observe::Observed;
use crate::table::{Table, Verdict};

/// `ProxyReady` and `NodesConfigured` reason while `Accepted` is False: a
/// consequence, not a problem of its own, so it never leads a Warning.
pub const NOT_ACCEPTED: &str = "NotAccepted";

/// A desired condition (type, status, reason, message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl Desired {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

fn status_str(b: bool) -> &'static str {
    if b { "True" } else { "False" }
}

/// Merges `desired` into `old`'s conditions. Returns the new conditions and
/// the ones whose status or reason changed (for Events).
pub fn merge(
    old: Option<&MirrorRegistryStatus>,
    desired: &[Desired],
    generation: Option<i64>,
    now: Timestamp,
) -> (Vec<Condition>, Vec<Condition>) {
    let mut out = Vec::new();
    let mut changed = Vec::new();
    for d in desired {
        let prev = old.and_then(|s| s.condition(d.type_));
        let status = status_str(d.status);
        let same_status = prev.is_some_and(|p| p.status == status);
        let cond = Condition {
            type_: d.type_.to_string(),
            status: status.to_string(),
            reason: d.reason.clone(),
            message: d.message.clone(),
            observed_generation: generation,
            last_transition_time: match prev {
                Some(p) if same_status => p.last_transition_time.clone(),
                _ => Time(now),
            },
        };
        if !(same_status && prev.is_some_and(|p| p.reason == d.reason)) {
            changed.push(cond.clone());
        }
        out.push(cond);
    }
    (out, changed)
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// The conditions of an existing (not deleting) MirrorRegistry, and its
/// node counts.
///
/// `tables`: hashes of the tables written lately whose entry for `host` is
/// the current table's (see [`crate::publish::Publisher::tables_with_entry`]):
/// a proxy or node on one of those serves `host` as it is now, so a
/// change to another registry leaves this one's conditions alone.
pub fn desired_conditions(
    verdict: Option<&Verdict>,
    host: &str,
    table: &Table,
    tables: &HashSet<String>,
    obs: &Observed,
) -> (Vec<Desired>, NodeCounts) {
    let counts = nodes::counts(&obs.reports, host, tables);
    let accepted = match verdict {
        Some(Verdict::Accepted) => Desired::new(
            condition::ACCEPTED,
            true,
            "Valid",
            "the registry is in the registry table",
        ),
        Some(Verdict::Rejected { reason, message }) => {
            Desired::new(condition::ACCEPTED, false, reason.clone(), message.clone())
        }
        None => Desired::new(condition::ACCEPTED, false, "Unknown", "not rendered"),
    };
    if !accepted.status {
        let msg = "the registry is not accepted";
        return (
            vec![
                accepted,
                Desired::new(condition::PROXY_READY, false, NOT_ACCEPTED, msg),
                Desired::new(condition::NODES_CONFIGURED, false, NOT_ACCEPTED, msg),
            ],
            counts,
        );
    }
    let proxy = match &obs.proxy {
        Err(e) => Desired::new(condition::PROXY_READY, false, "ProxyUnreachable", e.clone()),
        Ok(s) if !tables.contains(&s.config_hash) => Desired::new(
            condition::PROXY_READY,
            false,
            "ConfigPending",
            format!(
                "the proxy runs config {}, which does not hold this registry as the table {} does",
                short(&s.config_hash),
                short(&table.hash)
            ),
        ),
        Ok(s) if !s.registries.iter().any(|r| r == host) => Desired::new(
            condition::PROXY_READY,
            false,
            "NotServed",
            "the proxy runs a table holding this registry as the current one does, but does not list it",
        ),
        Ok(_) => Desired::new(
            condition::PROXY_READY,
            true,
            "Serving",
            "the proxy serves this registry as the current table has it",
        ),
    };
    let nodes = if counts.total == 0 {
        Desired::new(
            condition::NODES_CONFIGURED,
            false,
            "NoAgents",
            "no node agent has reported",
        )
    } else if counts.configured == counts.total {
        Desired::new(
            condition::NODES_CONFIGURED,
            true,
            "AllNodesConfigured",
            format!("{} nodes configured", counts.summary()),
        )
    } else {
        let mut m = format!("{} nodes configured", counts.summary());
        if let Some(errors) = node_errors(&obs.reports) {
            m.push_str("; errors: ");
            m.push_str(&errors);
        }
        Desired::new(condition::NODES_CONFIGURED, false, "Pending", m)
    };
    (vec![accepted, proxy, nodes], counts)
}

/// Node errors a `NodesConfigured` message names; the others are counted.
/// Each agent's `last-error` may be 1024 characters, and the message goes
/// into the Event of the change and the status (at most 32768).
const LISTED_NODE_ERRORS: usize = 3;

/// `<node>: <last-error>` of the first [`LISTED_NODE_ERRORS`] reporting
/// nodes with an error, then how many more; `None` without errors.
fn node_errors(reports: &[nodes::AgentReport]) -> Option<String> {
    let errors: Vec<String> = reports
        .iter()
        .filter_map(|r| r.last_error.as_ref().map(|e| format!("{}: {e}", r.node)))
        .collect();
    if errors.is_empty() {
        return None;
    }
    let mut m = errors[..errors.len().min(LISTED_NODE_ERRORS)].join("; ");
    if let Some(more) = errors.len().checked_sub(LISTED_NODE_ERRORS)
        && more > 0
    {
        m.push_str(&format!("; and {more} more"));
    }
    Some(m)
}

/// Longest Event note in bytes: events.k8s.io/v1 refuses a longer one,
/// and kube-runtime's `Recorder` does not shorten it.
pub const EVENT_NOTE_MAX: usize = 1024;

/// `note` cut to [`EVENT_NOTE_MAX`] bytes on a character boundary, ending
/// in `…` when cut, so an Event is never lost for its length.
pub fn event_note(mut note: String) -> String {
    if note.len() <= EVENT_NOTE_MAX {
        return note;
    }
    const MORE: char = '…';
    let mut end = EVENT_NOTE_MAX - MORE.len_utf8();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    note.truncate(end);
    note.push(MORE);
    note
}

/// An Event about a reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub type_: EventType,
    pub reason: String,
    pub note: String,
}

/// The one Event for the conditions that `changed`, naming every change.
/// Its reason is the first condition that turned False (else the first
/// change); Warning only when something itself went wrong.
pub fn change_event(changed: &[Condition]) -> Option<Note> {
    let turned_false = |c: &&Condition| c.status == status_str(false) && c.reason != NOT_ACCEPTED;
    let lead = changed.iter().find(turned_false).or(changed.first())?;
    let type_ = if lead.status == status_str(true) || lead.reason == NOT_ACCEPTED {
        EventType::Normal
    } else {
        EventType::Warning
    };
    let note = changed
        .iter()
        .map(|c| format!("{}={} ({}): {}", c.type_, c.status, c.reason, c.message))
        .collect::<Vec<_>>()
        .join("; ");
    Some(Note {
        type_,
        reason: lead.reason.clone(),
        note: event_note(note),
    })
}

/// Server-side apply body for the status subresource: the whole status this
/// manager owns, so a field it leaves out (e.g. `nodes` once a registry is
/// no longer accepted) is removed.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusApply<'a> {
    api_version: &'a str,
    kind: &'a str,
    metadata: ApplyMeta<'a>,
    status: &'a MirrorRegistryStatus,
}

#[derive(Debug, Serialize)]
struct ApplyMeta<'a> {
    name: &'a str,
}

/// Writes `status` of MirrorRegistry `name` by server-side apply with the
/// operator's field manager; conditions merge by `type` (a list-map in the
/// CRD).
pub async fn apply(
    client: &Client,
    name: &str,
    status: &MirrorRegistryStatus,
) -> Result<(), Error> {
    let api: Api<MirrorRegistry> = Api::all(client.clone());
    let body = StatusApply {
        api_version: &MirrorRegistry::api_version(&()),
        kind: &MirrorRegistry::kind(&()),
        metadata: ApplyMeta { name },
        status,
    };
    let written = api
        .patch_status(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .context(|| format!("applying the status of MirrorRegistry {name}"))?;
    // Operators before server-side apply wrote status by merge patch; the
    // fields that wrote stay co-owned by that patch's manager, so leaving
    // them out of an apply does not remove them. Clear them the old way.
    let stale = dropped_but_present(status, written.status.as_ref());
    if !stale.is_empty() {
        let nulls: serde_json::Map<String, serde_json::Value> = stale
            .iter()
            .map(|k| (k.to_string(), serde_json::Value::Null))
            .collect();
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        let patch = serde_json::Value::Object(
            [("status".to_string(), serde_json::Value::Object(nulls))]
                .into_iter()
                .collect(),
        );
        api.patch_status(name, &params, &Patch::Merge(patch))
            .await
            .context(|| format!("clearing {} of MirrorRegistry {name}", stale.join(", ")))?;
    }
    Ok(())
}

/// Optional status fields `wanted` leaves out but `written` still holds.
fn dropped_but_present(
    wanted: &MirrorRegistryStatus,
    written: Option<&MirrorRegistryStatus>,
) -> Vec<&'static str> {
    let Some(w) = written else {
        return Vec::new();
    };
    [
        ("nodes", wanted.nodes.is_none() && w.nodes.is_some()),
        (
            "nodesSummary",
            wanted.nodes_summary.is_none() && w.nodes_summary.is_some(),
        ),
        ("cache", wanted.cache.is_none() && w.cache.is_some()),
        (
            "upstream",
            wanted.upstream.is_none() && w.upstream.is_some(),
        ),
        (
            "lastTagMove",
            wanted.last_tag_move.is_none() && w.last_tag_move.is_some(),
        ),
    ]
    .into_iter()
    .filter_map(|(k, stale)| stale.then_some(k))
    .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// (type, status, reason) of each desired condition.
    fn summary(
        verdict: Option<&Verdict>,
        proxy: Result<(&str, &[&str]), &str>,
        reports: Vec<nodes::AgentReport>,
    ) -> Vec<(&'static str, bool, String)> {
        let table = Table {
            yaml: String::new(),
            hash: "c0ffee".repeat(10),
            extra: Default::default(),
            credentials: Default::default(),
            verdicts: Default::default(),
            entries: Default::default(),
            permitted: Default::default(),
        };
        // The current table, and an older one whose quay.io entry is the
        // same (another registry changed since).
        let tables: HashSet<String> = [table.hash.clone(), "older-same".into()].into();
        let reports = reports
            .into_iter()
            .map(|mut r| {
                r.config_hash = r.config_hash.map(|h| h.replace("CURRENT", &table.hash));
                r
            })
            .collect();
        let proxy = proxy
            .map(|(hash, hosts)| crate::proxy_status::ProxyStatus {
                config_hash: hash.replace("CURRENT", &table.hash),
                registries: hosts.iter().map(|h| h.to_string()).collect(),
                cache: Default::default(),
                tag_moves: Vec::new(),
                upstream: Default::default(),
                tag_moves_scope: None,
            })
            .map_err(String::from);
        let obs = Observed {
            node_proxy: None,
            reports,
            proxy,
        };
        desired_conditions(verdict, "quay.io", &table, &tables, &obs)
            .0
            .into_iter()
            .map(|d| (d.type_, d.status, d.reason))
            .collect()
    }

    fn agent(node: &str, registries: &[&str], error: Option<&str>) -> nodes::AgentReport {
        agent_on("CURRENT", node, registries, error)
    }

    /// An agent that applied the table with hash `table`.
    fn agent_on(
        table: &str,
        node: &str,
        registries: &[&str],
        error: Option<&str>,
    ) -> nodes::AgentReport {
        nodes::AgentReport {
            node: node.into(),
            live: true,
            config_hash: Some(table.into()),
            registries: registries.iter().map(|h| h.to_string()).collect(),
            last_error: error.map(String::from),
        }
    }

    /// Every reason a condition is False for, and True only when the proxy
    /// runs the current table *and* lists the host (README, cluster
    /// contract), and every reporting node lists it.
    #[test]
    fn each_condition_is_false_for_each_of_its_reasons() {
        use condition::{ACCEPTED, NODES_CONFIGURED, PROXY_READY};
        let accepted = Verdict::Accepted;
        let serving = Ok(("CURRENT", &["ghcr.io", "quay.io"][..]));
        let all = |x: &str| x.to_string();
        // Not accepted: the other two follow, whatever the proxy says.
        let rejected = Verdict::Rejected {
            reason: "DuplicateHost".into(),
            message: "taken".into(),
        };
        for (verdict, reason) in [(None, "Unknown"), (Some(&rejected), "DuplicateHost")] {
            assert_eq!(
                summary(verdict, serving, vec![agent("n1", &["quay.io"], None)]),
                [
                    (ACCEPTED, false, all(reason)),
                    (PROXY_READY, false, all(NOT_ACCEPTED)),
                    (NODES_CONFIGURED, false, all(NOT_ACCEPTED)),
                ]
            );
        }
        let proxy_ready = |proxy| summary(Some(&accepted), proxy, Vec::new())[1].clone();
        assert_eq!(
            proxy_ready(Err("GET /status: refused")),
            (PROXY_READY, false, all("ProxyUnreachable"))
        );
        assert_eq!(
            proxy_ready(Ok(("older", &["quay.io"][..]))),
            (PROXY_READY, false, all("ConfigPending"))
        );
        // The current table, but the host is not among what it serves.
        for hosts in [&[][..], &["ghcr.io"][..], &["quay.io.evil"][..]] {
            assert_eq!(
                proxy_ready(Ok(("CURRENT", hosts))),
                (PROXY_READY, false, all("NotServed")),
                "{hosts:?}"
            );
        }
        assert_eq!(proxy_ready(serving), (PROXY_READY, true, all("Serving")));
        // An older table holding this registry as the current one does
        // (only another registry changed): serving, not pending.
        assert_eq!(
            proxy_ready(Ok(("older-same", &["quay.io"][..]))),
            (PROXY_READY, true, all("Serving"))
        );
        let nodes = |reports| summary(Some(&accepted), serving, reports)[2].clone();
        assert_eq!(
            nodes(Vec::new()),
            (NODES_CONFIGURED, false, all("NoAgents"))
        );
        assert_eq!(
            nodes(vec![
                agent("n1", &["quay.io"], None),
                agent("n2", &["ghcr.io"], Some("no space")),
            ]),
            (NODES_CONFIGURED, false, all("Pending"))
        );
        assert_eq!(
            nodes(vec![agent("n1", &["quay.io"], None)]),
            (NODES_CONFIGURED, true, all("AllNodesConfigured"))
        );
        assert_eq!(
            nodes(vec![
                agent("n1", &["quay.io"], None),
                agent_on("older-same", "n2", &["quay.io"], None),
            ]),
            (NODES_CONFIGURED, true, all("AllNodesConfigured"))
        );
        // A node listing the host from a table with another entry for it
        // (before an edit of its aliases, say) is not configured yet.
        assert_eq!(
            nodes(vec![
                agent("n1", &["quay.io"], None),
                agent_on("older", "n2", &["quay.io"], None),
            ]),
            (NODES_CONFIGURED, false, all("Pending"))
        );
        assert_eq!(
            summary(Some(&accepted), serving, Vec::new())[0],
            (ACCEPTED, true, all("Valid"))
        );
    }

    #[test]
    fn transition_time_kept_while_unchanged() {
        let t0 = Timestamp::from_second(100).unwrap();
        let t1 = Timestamp::from_second(200).unwrap();
        let d = [Desired::new("Accepted", true, "Valid", "ok")];
        let (c, ch) = merge(None, &d, Some(1), t0);
        assert_eq!(ch.len(), 1);
        let old = MirrorRegistryStatus {
            conditions: c,
            ..Default::default()
        };
        let d2 = [Desired::new("Accepted", true, "Valid", "still ok")];
        let (c2, ch2) = merge(Some(&old), &d2, Some(2), t1);
        assert!(ch2.is_empty());
        assert_eq!(c2[0].last_transition_time.0, t0);
        assert_eq!(c2[0].observed_generation, Some(2));
        let d3 = [Desired::new("Accepted", false, "DuplicateHost", "x")];
        let (c3, ch3) = merge(Some(&old), &d3, Some(2), t1);
        assert_eq!(ch3.len(), 1);
        assert_eq!(c3[0].last_transition_time.0, t1);
    }

    fn changes(list: &[(&str, bool, &str)]) -> Vec<Condition> {
        let d: Vec<Desired> = list
            .iter()
            .map(|(t, s, r)| Desired {
                type_: condition::ACCEPTED,
                status: *s,
                reason: r.to_string(),
                message: format!("{t} message"),
            })
            .collect();
        merge(None, &d, Some(1), Timestamp::from_second(1).unwrap()).0
    }

    #[test]
    fn event_leads_with_the_first_real_problem() {
        assert_eq!(change_event(&[]), None);
        let ok = change_event(&changes(&[("a", true, "Valid")])).unwrap();
        assert_eq!((ok.type_, ok.reason.as_str()), (EventType::Normal, "Valid"));
        let bad = change_event(&changes(&[
            ("a", true, "Valid"),
            ("b", false, NOT_ACCEPTED),
            ("c", false, "ProxyUnreachable"),
        ]))
        .unwrap();
        assert_eq!(
            (bad.type_, bad.reason.as_str()),
            (EventType::Warning, "ProxyUnreachable")
        );
        assert_eq!(bad.note.matches("; ").count(), 2, "{}", bad.note);
        // Only consequences of not being accepted: no Warning of their own.
        let follow = change_event(&changes(&[("b", false, NOT_ACCEPTED)])).unwrap();
        assert_eq!(follow.type_, EventType::Normal);
    }

    #[test]
    fn long_event_notes_are_cut_on_a_character_boundary() {
        let long = Desired::new(
            condition::NODES_CONFIGURED,
            false,
            "Pending",
            "é".repeat(2000),
        );
        let changed = merge(None, &[long], Some(1), Timestamp::from_second(1).unwrap()).1;
        let note = change_event(&changed).unwrap().note;
        assert!(note.len() <= EVENT_NOTE_MAX, "{} bytes", note.len());
        assert!(note.len() > EVENT_NOTE_MAX - 8, "{} bytes", note.len());
        assert!(note.ends_with('…'));
        assert!(note.starts_with("NodesConfigured=False (Pending): éé"));
        let short = "x".repeat(EVENT_NOTE_MAX);
        assert_eq!(event_note(short.clone()), short);
    }

    #[test]
    fn node_errors_are_listed_up_to_three() {
        let report = |node: &str, error: Option<&str>| nodes::AgentReport {
            node: node.into(),
            live: true,
            config_hash: None,
            registries: Vec::new(),
            last_error: error.map(String::from),
        };
        assert_eq!(node_errors(&[report("a", None)]), None);
        let long = "e".repeat(1024);
        let mut reports: Vec<_> = (0..10)
            .map(|i| report(&format!("n{i}"), Some(&long)))
            .collect();
        reports.push(report("ok", None));
        let m = node_errors(&reports).unwrap();
        assert!(m.starts_with(&format!("n0: {long}; n1: {long}; n2: {long}")));
        assert!(m.ends_with("; and 7 more"), "{}", &m[m.len() - 40..]);
        assert!(!m.contains("n3:"));
        let three = node_errors(&reports[..3]).unwrap();
        assert!(!three.contains("more"), "{three}");
    }

    #[test]
    fn fields_an_apply_cannot_drop_are_found() {
        let counts = NodeCounts {
            configured: 1,
            total: 1,
        };
        let written = MirrorRegistryStatus {
            nodes: Some(counts),
            nodes_summary: Some(counts.summary()),
            ..Default::default()
        };
        let wanted = MirrorRegistryStatus::default();
        assert_eq!(
            dropped_but_present(&wanted, Some(&written)),
            ["nodes", "nodesSummary"]
        );
        assert!(dropped_but_present(&written, Some(&written)).is_empty());
        assert!(dropped_but_present(&wanted, None).is_empty());
    }
}

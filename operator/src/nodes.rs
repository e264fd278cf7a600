//! Aggregates the agents' per-node Leases (`<ns>/pullthrough-agent-<node>`,
//! docs/cluster-contract.md) into per-registry node counts.

use std::collections::HashSet;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use pullthrough_api::crd::NodeCounts;

/// The agent's last error, if any.
pub use pullthrough_api::contract::LAST_ERROR_ANNOTATION;
/// Hosts applied on the node, comma-separated.
pub use pullthrough_api::contract::REGISTRIES_ANNOTATION;
/// The container runtime the agent configured.
pub use pullthrough_api::contract::RUNTIME_ANNOTATION;
/// Agents renew every 30 s; a Lease without a duration counts as live for
/// this long after its last renewal.
pub const DEFAULT_AGENT_LEASE_SECONDS: i64 = 90;

/// One agent's report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentReport {
    pub node: String,
    pub live: bool,
    pub config_hash: Option<String>,
    pub registries: Vec<String>,
    pub last_error: Option<String>,
}

/// Reads the agent reports among `leases` (names starting with `prefix`).
pub fn reports(leases: &[Lease], prefix: &str, now: Timestamp) -> Vec<AgentReport> {
    leases
        .iter()
        .filter_map(|l| {
            let name = l.name_any();
            let node = name.strip_prefix(prefix)?.to_string();
            let spec = l.spec.clone().unwrap_or_default();
            let duration = spec
                .lease_duration_seconds
                .map_or(DEFAULT_AGENT_LEASE_SECONDS, i64::from);
            let live = spec
                .renew_time
                .or(spec.acquire_time)
                .is_some_and(|t| t.0.as_second() + duration >= now.as_second());
            let ann = l.annotations();
            Some(AgentReport {
                node,
                live,
                config_hash: ann.get(crate::CONFIG_HASH_ANNOTATION).cloned(),
                registries: ann
                    .get(REGISTRIES_ANNOTATION)
                    .map(|s| {
                        s.split(',')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .map(String::from)
                            .collect()
                    })
                    .unwrap_or_default(),
                last_error: ann
                    .get(LAST_ERROR_ANNOTATION)
                    .filter(|s| !s.is_empty())
                    .cloned(),
            })
        })
        .collect()
}

/// Removes expired reports of nodes not in `existing` (the Node was deleted;
/// its agent's Lease stays behind until someone deletes it).
pub fn drop_departed(reports: &mut Vec<AgentReport>, existing: &HashSet<String>) {
    reports.retain(|r| r.live || existing.contains(&r.node));
}

/// Nodes that applied `host` as the current table has it (live Lease
/// listing it, from one of `tables`: the hashes of the tables whose entry
/// for `host` is the current one) of all reporting nodes. Listing the
/// host is not enough: after an edit of its aliases, say, the node still
/// lists it with the old settings until its agent applies the new table.
pub fn counts(reports: &[AgentReport], host: &str, tables: &HashSet<String>) -> NodeCounts {
    NodeCounts {
        configured: reports
            .iter()
            .filter(|r| {
                r.live
                    && r.registries.iter().any(|h| h == host)
                    && r.config_hash.as_ref().is_some_and(|h| tables.contains(h))
            })
            .count() as u32,
        total: reports.len() as u32,
    }
}

/// A node as its agent last reported it, against the registry table the
/// operator publishes now (`pullthrough_operator_nodes{state}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Live Lease, no error, the current table applied.
    Configured,
    /// Live Lease, no error, an older table (or none yet) applied.
    Pending,
    /// Live Lease carrying the agent's last error.
    Failed,
    /// The Lease expired while the Node still exists: the agent stopped
    /// reporting.
    Expired,
}

impl NodeState {
    pub const ALL: [NodeState; 4] = [
        NodeState::Configured,
        NodeState::Pending,
        NodeState::Failed,
        NodeState::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Configured => "configured",
            NodeState::Pending => "pending",
            NodeState::Failed => "failed",
            NodeState::Expired => "expired",
        }
    }

    pub fn of(report: &AgentReport, table_hash: &str) -> NodeState {
        if !report.live {
            NodeState::Expired
        } else if report.last_error.is_some() {
            NodeState::Failed
        } else if report.config_hash.as_deref() == Some(table_hash) {
            NodeState::Configured
        } else {
            NodeState::Pending
        }
    }
}

/// How many reporting nodes are in each state (every state, zeros too).
pub fn states(reports: &[AgentReport], table_hash: &str) -> [(NodeState, u32); 4] {
    NodeState::ALL.map(|s| {
        let n = reports
            .iter()
            .filter(|r| NodeState::of(r, table_hash) == s)
            .count();
        (s, u32::try_from(n).unwrap_or(u32::MAX))
    })
}

/// Live nodes that still list `host` (deletion waits for them).
pub fn still_listing<'a>(reports: &'a [AgentReport], host: &str) -> Vec<&'a str> {
    reports
        .iter()
        .filter(|r| r.live && r.registries.iter().any(|h| h == host))
        .map(|r| r.node.as_str())
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn tables(hashes: &[&str]) -> HashSet<String> {
        hashes.iter().map(|h| h.to_string()).collect()
    }

    fn lease(name: &str, renewed: i64, regs: &str) -> Lease {
        let mut l = Lease::default();
        l.metadata.name = Some(name.into());
        l.metadata.annotations = Some(
            [
                (REGISTRIES_ANNOTATION.to_string(), regs.to_string()),
                (crate::CONFIG_HASH_ANNOTATION.to_string(), "t1".to_string()),
            ]
            .into_iter()
            .collect(),
        );
        l.spec = Some(LeaseSpec {
            lease_duration_seconds: Some(40),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
            ..Default::default()
        });
        l
    }

    #[test]
    fn counts_live_nodes_listing_the_host() {
        let now = Timestamp::from_second(1000).unwrap();
        let leases = [
            lease("pullthrough-agent-a", 990, "quay.io, docker.io"),
            lease("pullthrough-agent-b", 900, "quay.io"),
            lease("pullthrough-agent-c", 995, "docker.io"),
            lease("pullthrough-operator", 999, "quay.io"),
        ];
        let r = reports(&leases, "pullthrough-agent-", now);
        assert_eq!(r.len(), 3);
        let c = counts(&r, "quay.io", &tables(&["t1"]));
        assert_eq!((c.configured, c.total), (1, 3));
        // Applied from a table whose quay.io entry is not the current one.
        let c = counts(&r, "quay.io", &tables(&["t2"]));
        assert_eq!((c.configured, c.total), (0, 3));
        assert_eq!(still_listing(&r, "docker.io"), ["a", "c"]);
    }

    #[test]
    fn node_states_against_the_current_table() {
        let now = Timestamp::from_second(1000).unwrap();
        let hashed = |name: &str, renewed: i64, hash: Option<&str>, error: &str| {
            let mut l = lease(name, renewed, "quay.io");
            let ann = l.metadata.annotations.get_or_insert_default();
            if let Some(h) = hash {
                ann.insert(crate::CONFIG_HASH_ANNOTATION.into(), h.into());
            }
            ann.insert(LAST_ERROR_ANNOTATION.into(), error.into());
            l
        };
        let leases = [
            hashed("pullthrough-agent-a", 990, Some("new"), ""),
            hashed("pullthrough-agent-b", 995, Some("new"), ""),
            hashed("pullthrough-agent-c", 990, Some("old"), ""),
            hashed("pullthrough-agent-d", 990, None, ""),
            hashed(
                "pullthrough-agent-e",
                990,
                Some("new"),
                "hosts.toml: denied",
            ),
            hashed("pullthrough-agent-f", 100, Some("new"), ""),
        ];
        let r = reports(&leases, "pullthrough-agent-", now);
        let got: Vec<_> = states(&r, "new")
            .iter()
            .map(|(s, n)| (s.as_str(), *n))
            .collect();
        assert_eq!(
            got,
            [
                ("configured", 2),
                ("pending", 2),
                ("failed", 1),
                ("expired", 1)
            ]
        );
        assert_eq!(states(&[], "new").map(|(_, n)| n), [0; 4]);
    }

    #[test]
    fn expired_reports_of_deleted_nodes_are_dropped() {
        let now = Timestamp::from_second(1000).unwrap();
        let leases = [
            lease("pullthrough-agent-live", 990, "quay.io"),
            lease("pullthrough-agent-stale", 100, "quay.io"),
            lease("pullthrough-agent-gone", 100, "quay.io"),
        ];
        let mut r = reports(&leases, "pullthrough-agent-", now);
        let existing = ["stale".to_string()].into_iter().collect();
        drop_departed(&mut r, &existing);
        let names: Vec<_> = r.iter().map(|r| r.node.as_str()).collect();
        // A live agent counts even before its Node is visible; an expired
        // one counts only while its Node exists.
        assert_eq!(names, ["live", "stale"]);
        let c = counts(&r, "quay.io", &tables(&["t1"]));
        assert_eq!((c.configured, c.total), (1, 2));
    }
}

//! Prometheus metrics: reconcile runs, failures by reason, duration, the
//! nodes by what their agents report, pins and CA failures.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::nodes::NodeState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

/// The operator's metrics.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Counter,
    pub failures: Family<ReasonLabels, Counter>,
    pub duration: Histogram,
    pub table_writes: Counter,
    pub leader: Gauge,
    pub nodes: Family<StateLabels, Gauge>,
    pub pins_images: Gauge,
    pub pins_dropped: Gauge,
    pub pins_write_failures: Counter,
    pub ca_errors: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("pullthrough_operator");
        let reconciles = Counter::default();
        let failures = Family::<ReasonLabels, Counter>::default();
        // Every reason at 0 from the start: an alert's increase() then
        // counts the first failure too.
        for reason in crate::error::Error::REASONS {
            let _created = failures.get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            });
        }
        let duration = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        let table_writes = Counter::default();
        let leader = Gauge::default();
        let nodes = Family::<StateLabels, Gauge>::default();
        let pins_images = Gauge::default();
        let pins_dropped = Gauge::default();
        let pins_write_failures = Counter::default();
        let ca_errors = Counter::default();
        registry.register(
            "reconciles",
            "MirrorRegistry reconcile runs",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_failures",
            "Failed reconciles by reason",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile duration",
            duration.clone(),
        );
        registry.register(
            "table_writes",
            "Registry-table ConfigMap writes",
            table_writes.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease",
            leader.clone(),
        );
        registry.register(
            "nodes",
            "Nodes by their agent's last report against the current registry table: configured, pending (older table or none), failed (reports an error), expired (Lease expired, Node still there); set by the leader",
            nodes.clone(),
        );
        registry.register(
            "pins_images",
            "Images in the pins ConfigMap as last computed",
            pins_images.clone(),
        );
        registry.register(
            "pins_dropped",
            "Images left out of the pins ConfigMap to keep it under the ConfigMap size limit (least important first: old ReplicaSet revisions); not 0 means some are not protected from eviction",
            pins_dropped.clone(),
        );
        registry.register(
            "pins_write_failures",
            "Failed writes of the pins ConfigMap (the proxy keeps the last pins written)",
            pins_write_failures.clone(),
        );
        registry.register(
            "ca_errors",
            "Failed CA steps (creation, rotation, trust bundle; retried with backoff): while it grows the CA is neither rotated nor made for new names",
            ca_errors.clone(),
        );
        Self {
            registry,
            reconciles,
            failures,
            duration,
            table_writes,
            leader,
            nodes,
            pins_images,
            pins_dropped,
            pins_write_failures,
            ca_errors,
        }
    }
}

impl Metrics {
    pub fn failure(&self, reason: &str) {
        self.failures
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Sets `nodes{state}` for every state.
    pub fn set_nodes(&self, counts: &[(NodeState, u32)]) {
        for (state, n) in counts {
            self.nodes
                .get_or_create(&StateLabels {
                    state: state.as_str().to_string(),
                })
                .set(i64::from(*n));
        }
    }

    /// Text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_by_state_are_encoded() {
        let m = Metrics::default();
        m.set_nodes(&[(NodeState::Configured, 3), (NodeState::Failed, 1)]);
        let text = m.encode();
        for line in [
            "# TYPE pullthrough_operator_nodes gauge",
            r#"pullthrough_operator_nodes{state="configured"} 3"#,
            r#"pullthrough_operator_nodes{state="failed"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line}\n{text}");
        }
        assert!(
            text.contains(r#"pullthrough_operator_reconcile_failures_total{reason="kube_api"} 0"#),
            "failure counters exist before the first failure: {text}"
        );
        assert!(
            text.lines()
                .any(|l| l == "pullthrough_operator_ca_errors_total 0"),
            "the CA error counter exists before the first error: {text}"
        );
        m.set_nodes(&[(NodeState::Failed, 0)]);
        assert!(
            m.encode()
                .contains(r#"pullthrough_operator_nodes{state="failed"} 0"#)
        );
    }
}

//! Every name, label, annotation and key that two pullthrough programs must
//! spell the same way, and the config hash they compare. The cluster-side
//! view of these objects is `docs/cluster-contract.md`; a name changed here
//! changes for the operator, the proxy and every agent at once.

use sha2::{Digest, Sha256};

/// Namespace the chart installs into unless told otherwise.
pub const DEFAULT_NAMESPACE: &str = "pullthrough";

/// ConfigMap holding the registry table, written by the operator and read by
/// the proxy (mounted) and the agents (watched).
pub const TABLE_CONFIGMAP: &str = "pullthrough-registries";
/// Key of the table's YAML inside [`TABLE_CONFIGMAP`].
pub const TABLE_KEY: &str = "config.yaml";

/// Name of the CA Secret (the active CA's certificate and key, for the
/// proxy) and of the CA ConfigMap (every certificate nodes must trust).
pub const CA_NAME: &str = "pullthrough-ca";
/// CA Secret key: the certificate the proxy signs with.
pub const CA_CERT_KEY: &str = "tls.crt";
/// CA Secret key: the private key the proxy signs with.
pub const CA_KEY_KEY: &str = "tls.key";
/// CA Secret key: the next CA, published before it becomes active.
pub const CA_NEXT_CERT_KEY: &str = "next.crt";
/// CA Secret key: the next CA's private key.
pub const CA_NEXT_KEY_KEY: &str = "next.key";
/// CA ConfigMap key: the PEM bundle nodes trust (active, next and the
/// previous CA during an overlap).
pub const CA_BUNDLE_KEY: &str = "ca.crt";

/// Secret with one `<host>.json` per registry that has upstream
/// credentials; only the proxy mounts it.
pub const CREDENTIALS_SECRET: &str = "pullthrough-upstream-credentials";

/// ConfigMap with the images the proxy never evicts (key
/// [`crate::pins::PINS_KEY`]), written by the operator and mounted by the
/// proxy only: it changes with every rollout, the table does not.
pub const PINS_CONFIGMAP: &str = "pullthrough-pins";

/// The proxy's Service: its ClusterIP and ports fill the table's `proxy:`.
pub const PROXY_SERVICE: &str = "pullthrough-proxy";

/// Prefix of each agent's per-node Lease: `<prefix><node name>`.
pub const AGENT_LEASE_PREFIX: &str = "pullthrough-agent-";
/// The operator's leader-election Lease.
pub const LEADER_LEASE: &str = "pullthrough-operator";

/// Field manager of every write the operator makes.
pub const OPERATOR_FIELD_MANAGER: &str = "pullthrough-operator";
/// Field manager of every write an agent makes (its own Lease).
pub const AGENT_FIELD_MANAGER: &str = "pullthrough-agent";

/// Finalizer the operator puts on every `MirrorRegistry`.
pub const FINALIZER: &str = "pullthrough.dev/cleanup";

/// sha256 of the table's `config.yaml`: on the table ConfigMap, in the
/// proxy's `/status`, and on each agent Lease for the table it applied.
pub const CONFIG_HASH_ANNOTATION: &str = "pullthrough.dev/config-hash";
/// Agent Lease: the runtimes the agent configured, comma-separated.
pub const RUNTIME_ANNOTATION: &str = "pullthrough.dev/runtime";
/// Agent Lease: the registries configured on the node, comma-separated.
pub const REGISTRIES_ANNOTATION: &str = "pullthrough.dev/registries";
/// Agent Lease: the last error the agent met, empty when none.
pub const LAST_ERROR_ANNOTATION: &str = "pullthrough.dev/last-error";
/// CA Secret: unix time since which the next CA has been published.
pub const CA_NEXT_SINCE_ANNOTATION: &str = "pullthrough.dev/next-ca-since";
/// CA Secret: unix time of the last promotion of a next CA.
pub const CA_ROTATED_AT_ANNOTATION: &str = "pullthrough.dev/ca-rotated-at";

/// Label every object the operator writes carries, with
/// [`OPERATOR_FIELD_MANAGER`] as its value.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Label naming which part of pullthrough an object belongs to.
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// [`COMPONENT_LABEL`] value of the agents' Leases.
pub const AGENT_COMPONENT: &str = "node-agent";

/// The config hash of a table's text: lowercase sha256 hex. The operator
/// annotates the table with it, the proxy reports it, agents put it on their
/// Lease; the operator compares them to tell who runs which table.
pub fn config_hash(text: &[u8]) -> String {
    hex::encode(Sha256::digest(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_hash_is_sha256_hex() {
        assert_eq!(
            config_hash(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}

//! The pullthrough operator: reconciles `MirrorRegistry` resources into the
//! registry table ConfigMap, owns the CA, and reports per-registry status.
//! See `docs/cluster-contract.md` for the objects it reads and writes.

use kube::CustomResourceExt;
use pullthrough_api::crd::MirrorRegistry;

pub mod ca;
pub mod cli;
pub mod controller;
pub mod leader;
pub mod metrics;
pub mod nodes;
pub mod proxy_status;
pub mod refs;
pub mod server;
pub mod status;
pub mod table;

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "pullthrough-operator";
/// Finalizer the operator puts on every `MirrorRegistry`.
pub const FINALIZER: &str = "pullthrough.dev/cleanup";
/// Annotation carrying the sha256 of the table's `config.yaml` (on the table
/// ConfigMap, and on agent Leases for the table they applied).
pub const CONFIG_HASH_ANNOTATION: &str = "pullthrough.dev/config-hash";

/// Files that must hold exactly [`crd_yaml`]'s output, relative to the
/// workspace root.
pub const CRD_FILES: &[&str] = &[
    "charts/pullthrough/crds/mirrorregistries.yaml",
    "deploy/crds/mirrorregistries.yaml",
];

/// The `MirrorRegistry` CustomResourceDefinition as YAML, as `crdgen`
/// prints it and the chart ships it.
pub fn crd_yaml() -> Result<String, serde_norway::Error> {
    serde_norway::to_string(&MirrorRegistry::crd())
}

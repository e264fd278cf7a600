//! The pullthrough operator: reconciles `MirrorRegistry` resources into the
//! registry table ConfigMap, owns the CA, and reports per-registry status.
//! See `docs/cluster-contract.md` for the objects it reads and writes.

use kube::CustomResourceExt;
use pullthrough_api::crd::MirrorRegistry;

pub mod ca;
pub mod cli;
pub mod context;
pub mod controller;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod nodes;
pub mod observe;
pub mod pins;
pub mod proxy_status;
pub mod publish;
pub mod refs;
pub mod reserved;
pub mod server;
pub mod status;
pub mod table;
pub mod tag_moves;

/// Field manager of every server-side apply the operator makes.
pub use pullthrough_api::contract::OPERATOR_FIELD_MANAGER as FIELD_MANAGER;
pub use pullthrough_api::contract::{CONFIG_HASH_ANNOTATION, FINALIZER};

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

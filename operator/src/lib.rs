//! The pullthrough operator: reconciles `MirrorRegistry` resources into the
//! registry table ConfigMap, owns the CA, and reports per-registry status.
//! See `docs/cluster-contract.md` for the objects it reads and writes.

use kube::CustomResourceExt;
use pullthrough_api::crd::MirrorRegistry;

pub mod ca;
pub mod cli;
pub mod context;
pub mod controller;
pub mod discovery;
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

/// Folders (relative to the workspace root) that must hold exactly
/// [`crd_files`], as `crdgen --out-dir` writes them.
pub const CRD_DIRS: &[&str] = &["charts/pullthrough/crds", "deploy/crds"];

/// Every CustomResourceDefinition pullthrough ships, with its file name.
pub fn crds() -> Vec<(
    &'static str,
    k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
)> {
    vec![
        ("mirrorregistries.yaml", MirrorRegistry::crd()),
        (
            "discoveredregistries.yaml",
            pullthrough_api::discovered::DiscoveredRegistry::crd(),
        ),
    ]
}

/// Each CRD file's name and YAML, as the chart ships them.
pub fn crd_files() -> Result<Vec<(&'static str, String)>, serde_norway::Error> {
    crds()
        .into_iter()
        .map(|(file, crd)| Ok((file, serde_norway::to_string(&crd)?)))
        .collect()
}

/// Every CRD as one multi-document YAML (what a test applies).
pub fn crd_yaml() -> Result<String, serde_norway::Error> {
    Ok(crd_files()?
        .into_iter()
        .map(|(_, y)| y)
        .collect::<Vec<_>>()
        .join("---\n"))
}

//! The pullthrough operator: reconciles `MirrorRegistry` resources.

use kube::CustomResourceExt;
use pullthrough_api::crd::MirrorRegistry;

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

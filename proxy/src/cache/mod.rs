//! The cache: content-addressed blobs and manifests, and tag → digest answers.

pub mod store;
pub mod tags;

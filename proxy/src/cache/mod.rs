//! The cache: content-addressed blobs and manifests, tag → digest answers,
//! downloads in flight, and which repository was served which digest.

pub mod inflight;
pub mod referrers;
pub mod repos;
pub mod shared;
pub mod store;
pub mod tags;

//! HTTP pieces the pipeline is built from: response bodies, header
//! plumbing and byte ranges.

pub mod body;
pub mod headers;
pub mod range;

//! HTTP pieces the pipeline is built from: response bodies, header
//! plumbing, byte ranges and the `sendfile` path for plain HTTP/1.

pub mod body;
pub mod headers;
pub mod range;
pub mod sendfile;

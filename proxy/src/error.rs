//! Errors of the proxy, each carrying what it was doing.

use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("accepting a connection failed: {0}")]
    Accept(#[source] std::io::Error),
}

//! Start-up errors of the proxy, each carrying what it was doing.

use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] crate::config::LoadError),
    #[error("upstream settings: {0}")]
    Upstream(#[from] crate::upstream::UpstreamError),
    #[error("CA: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("shared storage: {0}")]
    SharedStorage(#[source] crate::cache::shared::TierError),
    #[error("cache at {path}: {source}")]
    Store {
        path: std::path::PathBuf,
        #[source]
        source: crate::cache::store::StoreError,
    },
}

impl Error {
    /// Exit code: 64 (EX_USAGE) for what the operator must fix in the
    /// config, 1 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) | Error::Upstream(_) | Error::Tls(_) | Error::SharedStorage(_) => {
                pullthrough_api::cli::EXIT_USAGE
            }
            Error::Bind { .. } | Error::Store { .. } => 1,
        }
    }
}

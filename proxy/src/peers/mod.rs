//! Replicas over one bucket fetch each blob from the upstream once for
//! the whole cluster: every digest has one owner among the live replicas
//! ([`rendezvous`]); a replica that misses a digest it does not own asks
//! the owner ([`client`]) on the peer listener (mutual TLS from the proxy
//! CA), where the owner's own merged download serves it.

pub mod client;
pub mod listener;
pub mod members;
pub mod rendezvous;

use std::sync::Arc;

pub use client::{PeerClient, PeerError};
pub use members::{Members, Owner};

/// What the pipeline needs of the replica set.
#[derive(Debug)]
pub struct Peers {
    pub members: Arc<Members>,
    pub client: PeerClient,
}

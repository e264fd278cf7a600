//! Types and conventions shared by every pullthrough program, so the proxy,
//! the node-agent and the operator agree by construction.

pub mod agent;
pub mod cli;
pub mod config;
pub mod contract;
pub mod crd;
pub mod credentials;
pub mod discovered;
pub mod error;
pub mod limits;
pub mod names;
pub mod pins;
pub mod pki;
pub mod storage;
pub mod tags;

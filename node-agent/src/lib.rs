//! pullthrough-agent: makes a node's container runtime pull through the
//! pullthrough proxy, and undoes it.
//!
//! - [`patch`]: pure patchers (current bytes + desired → new bytes) with
//!   their inverses, one module per file format;
//! - [`fsio`]: paths under `--root`, atomic writes;
//! - [`state`]: the record of what was changed, and first-edit backups;
//! - [`runtime`]: runtime detection, reload/restart decisions, the executor;
//! - [`desired`]: what each runtime should be told, from the config;
//! - [`engine`]: `apply`, `revert`, `status`;
//! - [`run`]: the in-cluster loop (watch, health gate, Lease report).

pub mod config;
pub mod desired;
pub mod engine;
pub mod fsio;
pub mod patch;
pub mod run;
pub mod runtime;
pub mod state;

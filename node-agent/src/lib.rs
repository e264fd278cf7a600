//! pullthrough-agent: makes a node's container runtime pull through the
//! pullthrough proxy, and undoes it.
//!
//! - [`patch`]: pure patchers (current bytes + desired → new bytes) with
//!   their inverses, one module per file format;
//! - [`fsio`]: paths under `--root`, atomic writes;
//! - [`state`]: the record of what was changed, and first-edit backups;
//! - [`runtime`]: one type per runtime behind the `Runtime` trait
//!   (detection, plan, what the daemon needs after), and the executor;
//! - [`desired`]: what each runtime should be told, from the config;
//! - [`engine`]: `apply`, `revert`, `status` over the runtimes;
//! - [`lock`]: one writer per node (the loop, `apply`, `revert`);
//! - [`run`]: the in-cluster loop (inputs, health gate, Lease report);
//! - [`error`]: the error types;
//! - [`cli`]: the command line.

pub mod cli;
pub mod config;
pub mod desired;
pub mod engine;
pub mod error;
pub mod fsio;
pub mod lock;
pub mod patch;
pub mod run;
pub mod runtime;
pub mod state;

//! The pullthrough test bed: real components on loopback, for real tests.
//!
//! Every component starts on a free loopback port with its own temp dir,
//! is waited for by polling a readiness condition (never a fixed sleep), and
//! is stopped by PID when its handle is dropped — also when a test panics.
//! Anything that could resolve a public registry name runs in a private
//! mount namespace with a test-owned `/etc/hosts` (see [`ns`]).

pub mod bins;
pub mod cluster;
pub mod containerd;
pub mod dockerd;
pub mod error;
pub mod fixtures;
pub mod http;
pub mod hub;
pub mod images;
pub mod kube;
pub mod net;
pub mod ns;
pub mod podman;
pub mod process;
pub mod proxy;
pub mod registry;
pub mod relay;
pub mod seaweed;
pub mod stub;
pub mod tls;
pub mod tools;

pub use error::{Error, Result};

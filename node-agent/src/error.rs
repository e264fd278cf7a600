//! The agent's error types. Each one names what it is about (the file, the
//! config key, the flag, the daemon), because the message is all an admin
//! gets on a node.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::fsio::FsError;
use crate::patch::PatchError;
pub use crate::state::StateError;

/// A config (file, ConfigMap key or flag) the agent cannot use.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {source}")]
    Read {
        file: String,
        #[source]
        source: io::Error,
    },
    #[error("{file}: not UTF-8")]
    NotUtf8 { file: String },
    #[error("{file}: {source}")]
    Table {
        file: String,
        #[source]
        source: pullthrough_api::error::ConfigError,
    },
    #[error(
        "{file}: proxy: missing; the agent needs the `proxy:` section (address, httpsPort, caFile or httpPort)"
    )]
    NoProxySection { file: String },
    #[error("{file}: proxy.caFile: {}: {source}", ca.display())]
    CaUnreadable {
        file: String,
        ca: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{file}: proxy.caFile: {}: {source}", ca.display())]
    CaInvalid {
        file: String,
        ca: PathBuf,
        #[source]
        source: PatchError,
    },
    /// The CA ConfigMap's bundle.
    #[error("ca.crt: {0}")]
    CaBundle(#[source] PatchError),
    #[error("proxy.caFile is set but there is no CA bundle (ca.crt) yet; waiting for it")]
    CaPending,
    /// The registry-table ConfigMap (or its key) is not there.
    #[error("ConfigMap {name} (key {key}) not found; nothing to apply")]
    TableMissing { name: String, key: &'static str },
    /// The CA as the runtimes' trust files would hold it.
    #[error(transparent)]
    CaFile(PatchError),
    #[error(
        "proxy.address: `{address}` is a name, but /etc/hosts needs an IP for the hijacked registries ({names}); use the proxy's IP, or set nodes.dnsHijack: false on them"
    )]
    AddressNotIp { address: String, names: String },
    #[error(
        "proxy.{key}: {port}, but dockerd dials hijacked registries ({names}) on port {needed}; serve the proxy on {needed} at {address}, or set nodes.dnsHijack: false on them"
    )]
    HijackPort {
        key: &'static str,
        port: u16,
        needed: u16,
        names: String,
        address: String,
    },
    #[error("--runtime: `auto` cannot be combined with named runtimes")]
    AutoWithNamedRuntimes,
    #[error("run: --node-name (or NODE_NAME) is needed for the node's Lease")]
    NoNodeName,
}

/// A reload or restart that did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("running {command}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("{command} failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error(
        "{command} did not finish within {}: killed it (a job systemd already took on may still be under way)",
        humantime::format_duration(*after)
    )]
    TimedOut { command: String, after: Duration },
    #[error("sending SIGHUP to {process} (pid {pid}): {source}")]
    Signal {
        process: &'static str,
        pid: i32,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("cannot restart {process}: there is no systemd under the root; restart it yourself")]
    NoSystemd { process: &'static str },
}

/// A runtime action that failed after the files were written.
#[derive(Debug, thiserror::Error)]
#[error("{daemon}: {source}")]
pub struct ActionError {
    pub daemon: &'static str,
    #[source]
    pub source: ExecError,
}

/// Why the proxy's `readyUrl` did not answer 2xx.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("bad URL {url}: {source}")]
    BadUrl {
        url: String,
        #[source]
        source: http::uri::InvalidUri,
    },
    #[error("an https:// readyUrl needs the proxy's CA (caFile)")]
    NoCa,
    #[error("the proxy CA is not PEM: {0}")]
    CaNotPem(#[source] rustls_pki_types::pem::Error),
    #[error("the proxy CA is not usable: {0}")]
    CaUnusable(#[source] rustls::Error),
    #[error("TLS setup: {0}")]
    Tls(#[source] rustls::Error),
    #[error("bad request for {url}: {source}")]
    Request {
        url: String,
        #[source]
        source: http::Error,
    },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("GET {url}: {source}")]
    Get {
        url: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("HTTP {0}")]
    Status(u16),
}

/// The run loop could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("--health-addr {addr}: {source}")]
    HealthAddr {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("connecting to the API server: {0}")]
    Kube(#[source] kube::Error),
    #[error("installing the SIGTERM handler: {0}")]
    Signal(#[source] io::Error),
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
}

/// A failed command, with its exit code.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Bad config or arguments (exit 64).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A patcher refused a file; nothing was written.
    #[error("{path}: {source}")]
    Patch {
        path: String,
        #[source]
        source: PatchError,
    },
    /// Someone else wrote the file between the agent's read and its write.
    #[error(
        "{path} changed while the agent planned its edit; nothing was written, the next apply reads it again"
    )]
    ChangedMeanwhile { path: String },
    /// Someone wrote a file after revert read it and before revert wrote
    /// it back (revert's reload through an interim daemon.json can wait
    /// up to `--reload-settle` in between).
    #[error(
        "{path} changed while the agent reverted it (someone wrote it after revert read it): left as they wrote it"
    )]
    ChangedDuringRevert { path: String },
    /// Someone wrote daemon.json while dockerd was reloaded through an
    /// interim version of it.
    #[error(
        "{path} changed while dockerd was reloaded through an interim version of it (someone wrote it meanwhile): left as they wrote it, not overwritten; the reload stays owed and the next apply reads the file again"
    )]
    ChangedDuringReload { path: String },
    /// `dockerd --validate` refused the patched daemon.json.
    #[error("{path}: dockerd --validate rejects the result: {reason}; nothing was written")]
    Rejected { path: String, reason: String },
    /// dockerd runs with the command-line flag for a daemon.json key the
    /// agent would write: dockerd would ignore the next SIGHUP and not
    /// start again with both.
    #[error(
        "{path}: {found}, and dockerd refuses a daemon.json that also sets `{key}` (\"specified both as a flag and in the configuration file\"): it would not start again. The agent needs {values} in `{key}`, so nothing was written (on this node nothing is configured until this is fixed). {remedy}"
    )]
    DockerdFlag {
        path: String,
        /// Where the flag is (`dockerd (pid 42 in /run/docker.pid) runs
        /// with --insecure-registry`).
        found: String,
        key: &'static str,
        values: String,
        remedy: &'static str,
    },
    /// dockerd does not run and how it starts cannot be told, so a key
    /// one of its flags might set is not added.
    #[error(
        "{path}: dockerd is not running and the flags it starts with cannot be known ({why}). dockerd refuses a daemon.json setting a key one of its flags sets, and would then not start at all, so the agent does not add `{key}` (it needs {values}) to a file without it: nothing was written. Start dockerd (its flags are then read from its command line), or add `{key}` to daemon.json yourself"
    )]
    DockerdFlagsUnknown {
        path: String,
        why: String,
        key: &'static str,
        values: String,
    },
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(
        "no container runtime found under {} (looked for /etc/docker, /etc/containerd, /etc/crio, /etc/containers, their sockets and binaries); pass --runtime",
        root.display()
    )]
    NoRuntime { root: PathBuf },
    /// Files are in place but a daemon was not told.
    #[error("files were {done}, but: {}", join(failed))]
    Actions {
        done: &'static str,
        failed: Vec<ActionError>,
    },
    /// Some files could not be reverted; the others were. Each error
    /// names its file.
    #[error(
        "revert incomplete: {}; every other file was reverted, these keep their record and backup: fix them (or use the agent version that wrote them) and run revert again",
        join(failed)
    )]
    RevertIncomplete { failed: Vec<AgentError> },
    /// A file a newer agent recorded with a kind this one does not know.
    #[error(
        "{path}: managed by a newer agent (record kind `{kind}`): left alone with its record and backup; revert it with an agent version that knows that kind"
    )]
    NewerAgentFile { path: String, kind: String },
    #[error("{what}: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    #[error("starting the async runtime: {0}")]
    AsyncRuntime(#[source] io::Error),
    #[error("apply task: {0}")]
    Task(#[source] tokio::task::JoinError),
}

fn join<E: std::fmt::Display>(errors: &[E]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl AgentError {
    pub fn exit_code(&self) -> i32 {
        match self {
            AgentError::Config(_) => pullthrough_api::cli::EXIT_USAGE,
            _ => 1,
        }
    }

    /// Maps a patcher's refusal to an error naming `path`.
    pub fn patch(path: &str) -> impl FnOnce(PatchError) -> AgentError + '_ {
        move |source| AgentError::Patch {
            path: path.to_string(),
            source,
        }
    }
}

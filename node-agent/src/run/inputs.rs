//! The run loop's inputs: the registry table and the CA bundle, from the
//! ConfigMaps the operator writes (watched through the API server) or
//! from a config file polled for changes (outside Kubernetes).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use kube::runtime::watcher;
use pullthrough_api::contract::{CA_BUNDLE_KEY, TABLE_KEY};
use tokio::sync::watch;

use crate::config::{self, AgentConfig};
use crate::error::ConfigError;
use crate::state::sha256_hex;

/// How long a failed watch waits before the watcher retries.
const WATCH_BACKOFF: Duration = Duration::from_secs(1);

/// Where the table and CA come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// ConfigMaps in `namespace`, watched through the API server.
    Kube {
        namespace: String,
        table_configmap: String,
        ca_configmap: String,
    },
    /// A config file (with its `caFile`), polled every `poll`.
    File { path: PathBuf, poll: Duration },
}

/// The ConfigMaps' values as last seen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Seen {
    /// Each watch has listed once.
    table_listed: bool,
    ca_listed: bool,
    table: Option<Vec<u8>>,
    ca: Option<Vec<u8>>,
}

/// The inputs, turned into configs as they change.
pub(super) enum Inputs {
    File {
        path: PathBuf,
        poll: Duration,
        next_poll: Instant,
        /// What the file held at the last poll (hashes, or the error).
        seen: Option<String>,
    },
    Kube {
        table_configmap: String,
        ca_configmap: String,
        rx: watch::Receiver<Seen>,
    },
}

impl Inputs {
    /// Starts watching `source` (the ConfigMap watches need `client`).
    pub(super) fn start(source: &Source, client: Option<&kube::Client>) -> Self {
        match source {
            Source::File { path, poll } => Inputs::File {
                path: path.clone(),
                poll: *poll,
                next_poll: Instant::now(),
                seen: None,
            },
            Source::Kube {
                namespace,
                table_configmap,
                ca_configmap,
            } => {
                let (tx, rx) = watch::channel(Seen::default());
                match client {
                    Some(c) => {
                        let api = Api::namespaced(c.clone(), namespace);
                        spawn_watches(api, table_configmap, ca_configmap, tx);
                    }
                    None => drop(tx),
                }
                Inputs::Kube {
                    table_configmap: table_configmap.clone(),
                    ca_configmap: ca_configmap.clone(),
                    rx,
                }
            }
        }
    }

    /// The new config, or why there is none, when the inputs changed
    /// since the last call.
    pub(super) fn poll(&mut self) -> Option<Result<AgentConfig, ConfigError>> {
        match self {
            Inputs::File {
                path,
                poll,
                next_poll,
                seen,
            } => {
                if Instant::now() < *next_poll {
                    return None;
                }
                *next_poll = Instant::now() + *poll;
                let loaded = config::load(path);
                let key = match &loaded {
                    Ok(c) => format!(
                        "{}:{}",
                        c.sha256,
                        c.ca_pem.as_deref().map(sha256_hex).unwrap_or_default()
                    ),
                    Err(e) => format!("error:{e}"),
                };
                if seen.as_deref() == Some(key.as_str()) {
                    return None;
                }
                *seen = Some(key);
                match &loaded {
                    Ok(c) => tracing::info!(
                        path = %path.display(),
                        sha256 = %c.sha256,
                        "config {} (sha256 {})",
                        path.display(),
                        c.sha256
                    ),
                    Err(e) => tracing::warn!(error = %e, "config: {e}"),
                }
                Some(loaded)
            }
            Inputs::Kube {
                table_configmap,
                ca_configmap,
                rx,
            } => {
                if !rx.has_changed().unwrap_or(false) {
                    return None;
                }
                let seen = rx.borrow_and_update().clone();
                if !(seen.table_listed && seen.ca_listed) {
                    return None;
                }
                let Some(table) = &seen.table else {
                    let e = ConfigError::TableMissing {
                        name: table_configmap.clone(),
                        key: TABLE_KEY,
                    };
                    tracing::warn!(configmap = %table_configmap, "{e}");
                    return Some(Err(e));
                };
                let loaded = config::from_parts(table, seen.ca.as_deref());
                match &loaded {
                    Ok(c) => tracing::info!(
                        configmap = %table_configmap,
                        sha256 = %c.sha256,
                        "table {table_configmap} (sha256 {}), CA from {ca_configmap}: {}",
                        c.sha256,
                        if c.ca_pem.is_some() { "yes" } else { "none" }
                    ),
                    Err(e) => tracing::warn!(
                        configmap = %table_configmap,
                        error = %e,
                        "table {table_configmap}: {e}"
                    ),
                }
                Some(loaded)
            }
        }
    }
}

/// Watches the table and CA ConfigMaps; publishes both once each has been
/// listed, then on every change.
fn spawn_watches(api: Api<ConfigMap>, table: &str, ca: &str, tx: watch::Sender<Seen>) {
    let tx = Arc::new(tx);
    for (name, key, is_table) in [
        (table.to_string(), TABLE_KEY, true),
        (ca.to_string(), CA_BUNDLE_KEY, false),
    ] {
        let api = api.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
            let mut stream = watcher::watcher(api, cfg).boxed();
            let mut listing: Option<Option<Vec<u8>>> = None;
            let mut listed_once = false;
            let value = |cm: &ConfigMap| {
                cm.data
                    .as_ref()
                    .and_then(|d| d.get(key))
                    .map(|s| s.as_bytes().to_vec())
            };
            while let Some(ev) = stream.next().await {
                let update: Option<Option<Vec<u8>>> = match ev {
                    Ok(watcher::Event::Init) => {
                        listing = Some(None);
                        None
                    }
                    Ok(watcher::Event::InitApply(cm)) => {
                        listing = Some(value(&cm));
                        None
                    }
                    Ok(watcher::Event::InitDone) => {
                        listed_once = true;
                        Some(listing.take().flatten())
                    }
                    Ok(watcher::Event::Apply(cm)) => Some(value(&cm)),
                    Ok(watcher::Event::Delete(_)) => Some(None),
                    Err(e) => {
                        tracing::warn!(configmap = %name, error = %e, "watching ConfigMap {name}: {e}");
                        tokio::time::sleep(WATCH_BACKOFF).await;
                        None
                    }
                };
                if let Some(v) = update {
                    tx.send_modify(|i| {
                        if is_table {
                            i.table = v;
                            i.table_listed |= listed_once;
                        } else {
                            i.ca = v;
                            i.ca_listed |= listed_once;
                        }
                    });
                }
            }
        });
    }
}

//! Publishing the rendered registry table: the table ConfigMap (with the
//! `tls.caBundle` PEMs next to `config.yaml`) and the proxy's
//! upstream-credentials Secret, both by server-side apply, and only when
//! what they would hold changed. (The CA ConfigMap is published by
//! `ca::ensure`, next to the CA it is derived from.)

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use base64::Engine;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use pullthrough_api::agent::NodeProxy;
use pullthrough_api::contract::{CA_BUNDLE_KEY, MANAGED_BY_LABEL};
use pullthrough_api::crd::MirrorRegistry;
use pullthrough_api::pki::PermittedNames;
use serde_json::{Value, json};

use crate::context::{Config, Kube};
use crate::error::{Error, KubeContext};
use crate::metrics::Metrics;
use crate::refs::Refs;
use crate::table::{self, Mounts, Table, Verdict};
use crate::{CONFIG_HASH_ANNOTATION, FIELD_MANAGER};

/// The table last written.
struct Published {
    fingerprint: u64,
    table: Arc<Table>,
    written_at: Instant,
}

/// The last table written, shared by reconciles; its lock serializes
/// renders.
#[derive(Default)]
pub struct Publisher {
    last: tokio::sync::Mutex<Option<Published>>,
    /// Told the names of each table rendered: the CA loop re-issues the
    /// CA when they change (name constraints).
    ca_names: Option<tokio::sync::watch::Sender<Option<PermittedNames>>>,
    /// The last [`HISTORY`] tables written: hash and entry digests.
    history: std::sync::Mutex<std::collections::VecDeque<(String, BTreeMap<String, String>)>>,
    /// Notified when a render gives a registry other than the one being
    /// reconciled another verdict (one deleted frees a host for its
    /// duplicate; a new one takes an alias): the controller then
    /// reconciles them all, so their status follows at once instead of at
    /// their next resync.
    others_due: tokio::sync::Notify,
}

/// Tables remembered for [`Publisher::tables_with_entry`]: enough for the
/// proxy and agents to catch up through a burst of edits. A table older
/// than these (or from before a restart) counts as not having the entry,
/// so status errs on "pending", never on "configured".
const HISTORY: usize = 32;

/// Everything the table depends on besides the base config: each CR's
/// identity, spec generation, deletion and age, and the Service's section.
fn fingerprint(all: &[Arc<MirrorRegistry>], proxy: Option<&NodeProxy>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut keys: Vec<_> = all
        .iter()
        .map(|c| {
            (
                c.name_any(),
                c.metadata.uid.clone(),
                c.metadata.generation,
                c.metadata.deletion_timestamp.is_some(),
                c.metadata.creation_timestamp.as_ref().map(|t| t.0),
                // Without a generation (never from a real API server) the
                // spec itself.
                c.metadata
                    .generation
                    .is_none()
                    .then(|| serde_json::to_string(&c.spec).unwrap_or_default()),
            )
        })
        .collect();
    keys.sort();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    keys.hash(&mut h);
    format!("{proxy:?}").hash(&mut h);
    h.finish()
}

impl Publisher {
    /// A publisher that tells `ca_names` what each table needs the CA to
    /// permit.
    pub fn with_ca_names(ca_names: tokio::sync::watch::Sender<Option<PermittedNames>>) -> Self {
        Self {
            last: Default::default(),
            ca_names: Some(ca_names),
            history: Default::default(),
            others_due: Default::default(),
        }
    }

    /// Waits until a render changed the verdict of a registry other than
    /// the one it was made for (see `others_due`).
    pub async fn others_changed(&self) {
        self.others_due.notified().await;
    }

    /// Hashes of the remembered tables (the current one included once
    /// written) whose entry for `host` is `digest`: a proxy or node that
    /// applied one of them serves `host` as the current table does.
    pub fn tables_with_entry(&self, host: &str, digest: &str) -> HashSet<String> {
        let history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        history
            .iter()
            .filter(|(_, entries)| entries.get(host).is_some_and(|d| d == digest))
            .map(|(hash, _)| hash.clone())
            .collect()
    }

    fn remember(&self, t: &Table) {
        let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        if history.back().is_some_and(|(h, _)| *h == t.hash) {
            return;
        }
        if history.len() == HISTORY {
            history.pop_front();
        }
        history.push_back((t.hash.clone(), t.entries.clone()));
    }

    fn tell_ca(&self, t: &Table) {
        if let Some(tx) = &self.ca_names {
            tx.send_if_modified(|names| {
                let changed = names.as_ref() != Some(&t.permitted);
                if changed {
                    *names = Some(t.permitted.clone());
                }
                changed
            });
        }
    }

    /// The hash of the table last written (None before the first write).
    pub async fn last_hash(&self) -> Option<String> {
        self.last
            .lock()
            .await
            .as_ref()
            .map(|l| l.table.hash.clone())
    }

    /// Renders the table from the cache (with `current`, when given,
    /// replacing its cached copy) and applies it when it changed.
    pub async fn converge(
        &self,
        config: &Config,
        kube: &Kube,
        metrics: &Metrics,
        current: Option<&Arc<MirrorRegistry>>,
        node_proxy: Option<&NodeProxy>,
    ) -> Result<Arc<Table>, Error> {
        let settings = &config.settings;
        let name = current.map(|c| c.name_any());
        // Under the lock, from the cache as it is now: reconciles queued
        // behind a write find their object already in the written table and
        // skip (one write per burst, not one per object). Rendering is
        // skipped too while no spec, claim order or Service changed.
        let mut last = self.last.lock().await;
        let mut all: Vec<Arc<MirrorRegistry>> = kube
            .store
            .state()
            .into_iter()
            .filter(|c| Some(c.name_any()) != name)
            .collect();
        all.extend(current.cloned());
        let fp = fingerprint(&all, node_proxy);
        let fresh = |at: &Instant| at.elapsed() < settings.resync_interval;
        if let Some(l) = last.as_ref()
            && l.fingerprint == fp
            && fresh(&l.written_at)
        {
            return Ok(l.table.clone());
        }
        // Referenced ConfigMaps and Secrets are read on every render, so a
        // change to one reaches the table within --resync-interval.
        let refs = Refs::read(&kube.client, all.iter().map(AsRef::as_ref)).await?;
        let mounts = Mounts {
            table: settings.table_mount_path.clone(),
            credentials: settings.credentials_mount_path.clone(),
        };
        let t = Arc::new(table::render(
            &config.base,
            &all,
            node_proxy.cloned(),
            &mounts,
            &refs,
            &settings.reserved_names(),
        )?);
        if let Some(l) = last.as_ref()
            && verdicts_moved(&l.table.verdicts, &t.verdicts, name.as_deref())
        {
            self.others_due.notify_one();
        }
        if let Some(l) = last.as_mut()
            && l.table.hash == t.hash
            && l.table.credentials == t.credentials
            && fresh(&l.written_at)
        {
            l.fingerprint = fp;
            l.table = t.clone();
            self.tell_ca(&t);
            return Ok(t);
        }
        // Credentials first: when the table names a credentials file, the
        // Secret behind it already holds it. Written once after a start
        // (dropping keys left from registries deleted meanwhile), then on
        // change.
        if last
            .as_ref()
            .is_none_or(|l| l.table.credentials != t.credentials)
        {
            apply_credentials(
                &kube.client,
                &settings.namespace,
                &settings.credentials_secret,
                &t.credentials,
            )
            .await?;
        }
        apply_table(
            &kube.client,
            &settings.namespace,
            &settings.table_configmap,
            &t,
        )
        .await?;
        if last.as_ref().is_none_or(|l| l.table.hash != t.hash) {
            let accepted = t
                .verdicts
                .values()
                .filter(|v| **v == Verdict::Accepted)
                .count();
            tracing::info!(hash = %t.hash, registries = accepted, "registry table applied");
            metrics.table_writes.inc();
        }
        self.remember(&t);
        *last = Some(Published {
            fingerprint: fp,
            table: t.clone(),
            written_at: Instant::now(),
        });
        self.tell_ca(&t);
        Ok(t)
    }
}

/// Whether a registry other than `except` is accepted in `new` where it
/// was not in `old`, or the other way round, or refused for another
/// reason. Messages alone do not count: one that quotes an API error may
/// differ at every render, and each change sets off a reconcile of all.
/// A registry gone from `new` has no status left to write.
fn verdicts_moved(
    old: &HashMap<String, Verdict>,
    new: &HashMap<String, Verdict>,
    except: Option<&str>,
) -> bool {
    let kind = |v: &Verdict| match v {
        Verdict::Accepted => None,
        Verdict::Rejected { reason, .. } => Some(reason.clone()),
    };
    new.iter()
        .any(|(name, v)| Some(name.as_str()) != except && old.get(name).map(kind) != Some(kind(v)))
}

/// The table ConfigMap: `config.yaml`, its hash as an annotation, and the
/// extra keys (CA bundles) the table points at.
pub fn table_configmap(ns: &str, name: &str, t: &Table) -> Value {
    let mut data = serde_json::Map::new();
    data.insert(table::CONFIG_KEY.into(), json!(t.yaml));
    for (k, v) in &t.extra {
        data.insert(k.clone(), json!(v));
    }
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {MANAGED_BY_LABEL: FIELD_MANAGER},
            "annotations": {CONFIG_HASH_ANNOTATION: t.hash},
        },
        "data": data,
    })
}

/// The proxy's credentials Secret with exactly `keys`.
pub fn credentials_secret(ns: &str, name: &str, keys: &BTreeMap<String, String>) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {MANAGED_BY_LABEL: FIELD_MANAGER},
        },
        "type": "Opaque",
        // `data`, not `stringData`: the API server folds stringData into
        // data, so server-side apply would never remove a dropped key.
        "data": keys
            .iter()
            .map(|(k, v)| (k.clone(), base64::engine::general_purpose::STANDARD.encode(v)))
            .collect::<BTreeMap<_, _>>(),
    })
}

/// The CA ConfigMap nodes trust: every CA certificate in `bundle`.
pub fn ca_configmap(ns: &str, name: &str, bundle: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {MANAGED_BY_LABEL: FIELD_MANAGER},
        },
        "data": {CA_BUNDLE_KEY: bundle},
    })
}

/// Server-side applies the CA ConfigMap (`ca.rs` decides its content).
pub async fn apply_ca_bundle(
    client: &Client,
    ns: &str,
    name: &str,
    bundle: &str,
) -> Result<(), kube::Error> {
    apply::<ConfigMap>(client, ns, name, &ca_configmap(ns, name, bundle)).await
}

/// Server-side applies `body` as the operator's field manager, forcing
/// ownership of the fields it lists.
async fn apply<K>(client: &Client, ns: &str, name: &str, body: &Value) -> Result<(), kube::Error>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await?;
    Ok(())
}

async fn apply_table(client: &Client, ns: &str, name: &str, t: &Table) -> Result<(), Error> {
    apply::<ConfigMap>(client, ns, name, &table_configmap(ns, name, t))
        .await
        .context(|| format!("applying the registry table ConfigMap {ns}/{name}"))
}

/// Server-side apply with exactly `keys`: keys this manager wrote before and
/// no longer lists go away.
async fn apply_credentials(
    client: &Client,
    ns: &str,
    name: &str,
    keys: &BTreeMap<String, String>,
) -> Result<(), Error> {
    apply::<Secret>(client, ns, name, &credentials_secret(ns, name, keys))
        .await
        .context(|| format!("applying the upstream credentials Secret {ns}/{name}"))?;
    tracing::info!(secret = %name, registries = keys.len(), "upstream credentials applied");
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn table_configmap_carries_hash_and_extra_keys() {
        let t = Table {
            yaml: "registries: []\n".into(),
            hash: "abc".into(),
            extra: [("cabundle-reg.lan.pem".to_string(), "PEM".to_string())].into(),
            credentials: [("reg.lan.json".to_string(), "secret".to_string())].into(),
            verdicts: Default::default(),
            entries: Default::default(),
            permitted: Default::default(),
        };
        let cm = table_configmap("ns", "tbl", &t);
        assert_eq!(cm["metadata"]["annotations"][CONFIG_HASH_ANNOTATION], "abc");
        assert_eq!(cm["data"][table::CONFIG_KEY], "registries: []\n");
        assert_eq!(cm["data"]["cabundle-reg.lan.pem"], "PEM");
        assert!(!cm.to_string().contains("secret"), "{cm}");
    }

    #[test]
    fn credentials_secret_uses_data_so_dropped_keys_go_away() {
        let keys = [("reg.lan.json".to_string(), "{}".to_string())].into();
        let s = credentials_secret("ns", "creds", &keys);
        assert_eq!(s["data"]["reg.lan.json"], "e30=");
        assert!(s.get("stringData").is_none());
        assert_eq!(s["metadata"]["labels"][MANAGED_BY_LABEL], FIELD_MANAGER);
    }

    fn rejected(reason: &str, message: &str) -> Verdict {
        Verdict::Rejected {
            reason: reason.into(),
            message: message.into(),
        }
    }

    /// Only another registry's acceptance or reason counts: a message that
    /// changes at every render (an API error quoted) must not set off a
    /// reconcile of all at every render, and the registry being
    /// reconciled writes its own status anyway.
    #[test]
    fn only_another_registrys_acceptance_or_reason_moves() {
        let old = HashMap::from([
            ("a".to_string(), Verdict::Accepted),
            ("b".to_string(), rejected("DuplicateHost", "claimed by a")),
        ]);
        let freed = HashMap::from([("b".to_string(), Verdict::Accepted)]);
        assert!(verdicts_moved(&old, &freed, None));
        assert!(verdicts_moved(&old, &freed, Some("a")));
        assert!(!verdicts_moved(&old, &freed, Some("b")));
        let reworded = HashMap::from([
            ("a".to_string(), Verdict::Accepted),
            (
                "b".to_string(),
                rejected("DuplicateHost", "claimed by a, 2nd"),
            ),
        ]);
        assert!(!verdicts_moved(&old, &reworded, None));
        let other_reason = HashMap::from([
            ("a".to_string(), Verdict::Accepted),
            ("b".to_string(), rejected("InvalidSpec", "bad")),
        ]);
        assert!(verdicts_moved(&old, &other_reason, None));
        let added = HashMap::from([
            ("a".to_string(), Verdict::Accepted),
            ("b".to_string(), rejected("DuplicateHost", "claimed by a")),
            ("c".to_string(), Verdict::Accepted),
        ]);
        assert!(verdicts_moved(&old, &added, None));
        assert!(!verdicts_moved(&old, &added, Some("c")));
    }
}

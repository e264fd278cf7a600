//! `DELETE /admin/cache`: withdraws content from every place a replica
//! could serve it from again. An admin purges to stop content being
//! served (an image with a leaked secret), and through a Service reaches
//! one replica only; so the replica asked removes the blobs from its own
//! disk ([`local`]), has every other replica do the same over the peer
//! listener ([`forward`]), and then deletes them from the shared bucket
//! ([`bucket`]). The bucket goes last: an upload another replica had under
//! way is withdrawn by then (see [`crate::cache::shared::Uploads::withdraw`]),
//! and one that completed earlier is deleted with the rest.
//!
//! A purge that could not reach a replica or the bucket says so and is
//! not a 200; repeated (on any replica), it completes: the digests it
//! found stay noted in the asking replica's repository index until every
//! place confirmed them gone.
//!
//! It is no block list: a client pulling the content again while or after
//! it runs caches it again, from the upstream.

pub mod bucket;
pub mod forward;
pub mod local;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use serde_json::{Value, json};

use crate::cache::repos::Entry;
use crate::observe::metric_labels::PurgeScope;
use crate::oci::Digest;
use crate::pipeline::Shared;

pub use forward::PEER_ROUTE;

/// What an admin asked to purge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub registry: Option<String>,
    pub repository: Option<String>,
    pub digest: Option<Digest>,
    pub scope: Scope,
}

/// Where a purge removes the content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every replica's disk and the shared bucket (the default).
    All,
    /// This replica's disk only (`scope=local`): to free its disk, or to
    /// drop a copy of its own, while the others and the bucket keep theirs.
    Local,
}

impl Scope {
    fn as_str(self) -> &'static str {
        match self {
            Scope::All => "all",
            Scope::Local => "local",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueryError {
    #[error("unknown parameter {0} (digest, registry, repository, scope)")]
    Unknown(String),
    #[error("digest is not a sha256 digest: {0}")]
    Digest(String),
    #[error("scope is `all` or `local`, not `{0}`")]
    Scope(String),
    #[error("give digest=, or registry= and/or repository=")]
    Shape,
}

impl Query {
    /// The admin API's query string.
    pub fn parse(query: Option<&str>) -> Result<Self, QueryError> {
        let (mut registry, mut repository, mut digest) = (None, None, None);
        let mut scope = Scope::All;
        for (k, v) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            match &*k {
                "registry" => registry = Some(v.into_owned()),
                "repository" => repository = Some(v.into_owned()),
                "digest" => digest = Some(v.into_owned()),
                "scope" => {
                    scope = match &*v {
                        "all" => Scope::All,
                        "local" => Scope::Local,
                        other => return Err(QueryError::Scope(other.to_string())),
                    }
                }
                other => return Err(QueryError::Unknown(other.to_string())),
            }
        }
        match (digest, &registry, &repository) {
            (Some(d), None, None) => Ok(Self {
                registry,
                repository,
                digest: Some(Digest::parse(&d).map_err(|_| QueryError::Digest(d))?),
                scope,
            }),
            (None, reg, repo) if reg.is_some() || repo.is_some() => Ok(Self {
                registry,
                repository,
                digest: None,
                scope,
            }),
            _ => Err(QueryError::Shape),
        }
    }
}

/// What a purge did everywhere.
#[derive(Debug)]
pub struct Report {
    pub scope: Scope,
    /// This replica's peer address, with `peers:`.
    pub me: Option<SocketAddr>,
    pub local: local::Local,
    pub peers: Vec<forward::PeerReport>,
    /// With `storage:` (and scope all).
    pub bucket: Option<bucket::Bucket>,
}

impl Report {
    /// Every place confirmed the purge.
    pub fn complete(&self) -> bool {
        self.local.failed.is_empty()
            && self.peers.iter().all(forward::PeerReport::complete)
            && self.bucket.as_ref().is_none_or(|b| b.failed.is_empty())
    }

    /// The digests some place may still hold: all of them while a replica
    /// did not answer (it may hold any), else those that failed somewhere.
    fn unfinished(&self) -> BTreeSet<Digest> {
        if self.peers.iter().any(|p| p.problem.is_some()) {
            return self.local.targets.clone();
        }
        let mut out: BTreeSet<Digest> = self.local.failed.keys().cloned().collect();
        for p in &self.peers {
            out.extend(p.failed.keys().cloned());
        }
        if let Some(b) = &self.bucket {
            out.extend(b.failed.keys().cloned());
        }
        out
    }

    /// The answer: 200 when complete, else 500 (with `"complete": false`).
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "complete": self.complete(),
            "scope": self.scope.as_str(),
            "removed": names(&self.local.removed),
            "bytes": self.local.bytes,
            "failed": failures(&self.local.failed),
        });
        if let Some(me) = self.me {
            v["replica"] = json!(me.to_string());
        }
        if self.scope == Scope::All && self.me.is_some() {
            v["peers"] = self
                .peers
                .iter()
                .map(forward::PeerReport::to_json)
                .collect();
        }
        if let Some(b) = &self.bucket {
            v["bucket"] = b.to_json();
        }
        if !self.complete() {
            v["error"] = json!(self.summary());
        }
        v
    }

    fn summary(&self) -> String {
        let mut parts = Vec::new();
        if !self.local.failed.is_empty() {
            parts.push(format!(
                "{} blob(s) not removed here",
                self.local.failed.len()
            ));
        }
        let unreachable = self.peers.iter().filter(|p| p.is_unreachable()).count();
        if unreachable > 0 {
            parts.push(format!("{unreachable} replica(s) unreachable"));
        }
        let failing = self
            .peers
            .iter()
            .filter(|p| !p.is_unreachable() && !p.complete())
            .count();
        if failing > 0 {
            parts.push(format!("{failing} replica(s) did not purge everything"));
        }
        if let Some(b) = self.bucket.as_ref().filter(|b| !b.failed.is_empty()) {
            parts.push(format!(
                "{} blob(s) not removed from the bucket",
                b.failed.len()
            ));
        }
        format!(
            "purge incomplete: {}; repeat the same purge",
            parts.join(", ")
        )
    }

    fn log(&self, query: &Query) {
        let unreachable = self.peers.iter().filter(|p| p.is_unreachable()).count();
        let peers_failed = self
            .peers
            .iter()
            .filter(|p| !p.complete())
            .count()
            .saturating_sub(unreachable);
        let peer_removed: usize = self.peers.iter().map(|p| p.removed.len()).sum();
        let (bucket_removed, bucket_failed) = self
            .bucket
            .as_ref()
            .map_or((0, 0), |b| (b.removed.len(), b.failed.len()));
        let complete = self.complete();
        macro_rules! line {
            ($level:ident, $msg:literal) => {
                tracing::$level!(
                    registry = ?query.registry,
                    repository = ?query.repository,
                    digest = ?query.digest.as_ref().map(Digest::as_str),
                    scope = self.scope.as_str(),
                    removed = self.local.removed.len(),
                    bytes = self.local.bytes,
                    failed = self.local.failed.len(),
                    peers = self.peers.len(),
                    peers_unreachable = unreachable,
                    peers_failed,
                    peer_removed,
                    bucket_removed,
                    bucket_failed,
                    complete,
                    $msg
                )
            };
        }
        if complete {
            line!(info, "cache purged");
        } else {
            line!(warn, "cache purged, incomplete: repeat the purge");
        }
    }
}

fn names(digests: &[Digest]) -> Vec<&str> {
    digests.iter().map(Digest::as_str).collect()
}

fn failures(failed: &BTreeMap<Digest, String>) -> Vec<Value> {
    failed
        .iter()
        .map(|(d, error)| json!({"digest": d.as_str(), "error": error}))
        .collect()
}

/// Purges `query` here, then (scope all) on every other replica and in
/// the bucket; logs one line with the outcome.
pub async fn run(shared: &Shared, query: &Query) -> Report {
    let given: BTreeSet<Digest> = query.digest.iter().cloned().collect();
    let mut local = local::purge(
        shared,
        query.registry.as_deref(),
        query.repository.as_deref(),
        &given,
    )
    .await;
    let (mut peers, mut bucket) = (Vec::new(), None);
    if query.scope == Scope::All {
        if let Some(replicas) = &shared.peers {
            peers = forward::everywhere(shared, replicas, query, &mut local).await;
        }
        if let Some(tier) = &shared.tier {
            bucket = Some(bucket::delete(tier, &local.targets).await);
        }
    }
    let report = Report {
        scope: query.scope,
        me: shared.peers.as_ref().map(|p| p.members.me()),
        local,
        peers,
        bucket,
    };
    let unfinished = report.unfinished();
    if !unfinished.is_empty() {
        // So the same purge, repeated here or through any replica (this
        // one answers it as a peer), finds these digests again.
        let keep = |e: &Entry| unfinished.contains(&e.2);
        let entries: Vec<Entry> = report
            .local
            .taken
            .iter()
            .chain(report.peers.iter().flat_map(|p| p.resolved.iter()))
            .filter(|e| keep(e))
            .cloned()
            .collect();
        shared.repos.restore(entries);
    }
    report.log(query);
    let scope = match query.scope {
        Scope::All => PurgeScope::all,
        Scope::Local => PurgeScope::local,
    };
    shared
        .metrics
        .purged(scope, report.complete(), report.local.bytes);
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &[u8]) -> Digest {
        Digest::of(s)
    }

    #[test]
    fn a_query_names_a_digest_or_repositories_and_a_scope() {
        let x = d(b"x");
        let q = Query::parse(Some(&format!("digest={x}"))).unwrap();
        assert_eq!((q.digest, q.scope), (Some(x.clone()), Scope::All));
        let q = Query::parse(Some("registry=quay.io&repository=a/b&scope=local")).unwrap();
        assert_eq!(q.registry.as_deref(), Some("quay.io"));
        assert_eq!(q.repository.as_deref(), Some("a/b"));
        assert_eq!(q.scope, Scope::Local);
        assert_eq!(Query::parse(None), Err(QueryError::Shape));
        assert_eq!(Query::parse(Some("scope=all")), Err(QueryError::Shape));
        assert_eq!(
            Query::parse(Some(&format!("digest={x}&registry=quay.io"))),
            Err(QueryError::Shape)
        );
        assert!(matches!(
            Query::parse(Some("digest=sha256:zz")),
            Err(QueryError::Digest(_))
        ));
        assert!(matches!(
            Query::parse(Some("repository=a&scope=cluster")),
            Err(QueryError::Scope(_))
        ));
        assert!(matches!(
            Query::parse(Some("repository=a&force=1")),
            Err(QueryError::Unknown(_))
        ));
    }

    fn report(targets: &[&Digest]) -> Report {
        Report {
            scope: Scope::All,
            me: Some("127.0.0.1:1".parse().unwrap()),
            local: local::Local {
                targets: targets.iter().map(|d| (*d).clone()).collect(),
                ..Default::default()
            },
            peers: Vec::new(),
            bucket: Some(bucket::Bucket::default()),
        }
    }

    /// A replica that did not answer may hold any of the digests; a
    /// failure elsewhere leaves only its own digest unfinished.
    #[test]
    fn what_a_retry_must_find_again() {
        let (a, b) = (d(b"a"), d(b"b"));
        let mut r = report(&[&a, &b]);
        assert!(r.complete());
        assert!(r.unfinished().is_empty());
        assert!(r.to_json().get("error").is_none());

        r.bucket
            .as_mut()
            .unwrap()
            .failed
            .insert(b.clone(), "timed out".into());
        assert!(!r.complete());
        assert_eq!(r.unfinished(), BTreeSet::from([b.clone()]));
        let v = r.to_json();
        assert_eq!(v["complete"], false);
        assert!(v["error"].as_str().unwrap().contains("bucket"), "{v}");

        r.peers.push(forward::PeerReport::unreachable(
            "127.0.0.1:2".parse().unwrap(),
            "connect: refused".into(),
        ));
        assert_eq!(r.unfinished(), BTreeSet::from([a, b]));
        let v = r.to_json();
        assert_eq!(v["peers"][0]["unreachable"], "connect: refused", "{v}");
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("1 replica(s) unreachable"),
            "{v}"
        );
    }
}

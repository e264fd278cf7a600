//! A purge on every other replica: `POST` [`PEER_ROUTE`] on the peer
//! listener (mutual TLS, peer certificates only; the client-facing
//! listeners do not have the route). A replica answering it purges its own
//! disk only and never forwards it again, so a purge makes one hop
//! whatever each replica's view of the members.
//!
//! The request names the query (each replica resolves a registry or
//! repository against its own repository index: it learnt what it served)
//! and the digests the asking replica found, so that a replica that
//! served the same blobs under another name drops them too. Digests the
//! others found that the asking replica did not are removed there and
//! sent once more to the others, as digests only: every replica drops the
//! same blobs, as one replica drops a blob shared with another repository.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::local::{self, Local};
use super::{Query, failures, names};
use crate::cache::repos::Entry;
use crate::http::body::{self, Body};
use crate::oci::Digest;
use crate::peers::Peers;
use crate::pipeline::Shared;
use crate::tls::peer::PEER_NAME;

/// The peer listener's purge route. Outside `/v2/`: no registry request
/// can name it.
pub const PEER_ROUTE: &str = "/_pullthrough/purge";

/// Longest a replica may take to answer a forwarded purge, from the dial
/// to the end of its answer: removing files takes far less, and the
/// admin's connection closes after `limits.idleTimeout` (120 s) without a
/// byte, with the bucket still to do.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest request or answer body of the route: every digest of the
/// repository index (50 000 entries) with its names fits many times.
const MAX_BODY: usize = 32 << 20;

/// The body of a forwarded purge.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Ask {
    #[serde(default)]
    registry: Option<String>,
    #[serde(default)]
    repository: Option<String>,
    #[serde(default)]
    digests: Vec<String>,
}

/// A replica's answer to a forwarded purge.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Answer {
    #[serde(default)]
    removed: Vec<String>,
    #[serde(default)]
    bytes: u64,
    #[serde(default)]
    failed: Vec<Failure>,
    /// (registry, repository, digest) its index held for the query.
    #[serde(default)]
    resolved: Vec<(String, String, String)>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Failure {
    digest: String,
    error: String,
}

/// Why a replica's part of a purge is unknown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// No connection, or no answer in time.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// It answered, but not with the purge done (a refusal, e.g. by a
    /// replica of a version without the route during a rolling update).
    #[error("{0}")]
    Failed(String),
}

/// One other replica's part of a purge.
#[derive(Debug)]
pub struct PeerReport {
    pub replica: SocketAddr,
    pub removed: Vec<Digest>,
    pub bytes: u64,
    pub failed: BTreeMap<Digest, String>,
    pub resolved: Vec<Entry>,
    pub problem: Option<Problem>,
}

impl PeerReport {
    fn new(replica: SocketAddr) -> Self {
        Self {
            replica,
            removed: Vec::new(),
            bytes: 0,
            failed: BTreeMap::new(),
            resolved: Vec::new(),
            problem: None,
        }
    }

    #[cfg(test)]
    pub(super) fn unreachable(replica: SocketAddr, message: String) -> Self {
        Self {
            problem: Some(Problem::Unreachable(message)),
            ..Self::new(replica)
        }
    }

    pub fn complete(&self) -> bool {
        self.problem.is_none() && self.failed.is_empty()
    }

    pub fn is_unreachable(&self) -> bool {
        matches!(self.problem, Some(Problem::Unreachable(_)))
    }

    /// A further round's outcome.
    fn absorb(&mut self, more: PeerReport) {
        self.removed.extend(more.removed);
        self.bytes += more.bytes;
        self.failed.extend(more.failed);
        self.resolved.extend(more.resolved);
        if self.problem.is_none() {
            self.problem = more.problem;
        }
    }

    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "replica": self.replica.to_string(),
            "removed": names(&self.removed),
            "bytes": self.bytes,
            "failed": failures(&self.failed),
        });
        match &self.problem {
            Some(Problem::Unreachable(m)) => v["unreachable"] = json!(m),
            Some(Problem::Failed(m)) => v["error"] = json!(m),
            None => {}
        }
        v
    }
}

/// Purges on every other member what `query` names and what this replica
/// found (`local`, which grows by what only the others found).
pub async fn everywhere(
    shared: &Shared,
    peers: &Peers,
    query: &Query,
    local: &mut Local,
) -> Vec<PeerReport> {
    let me = peers.members.me();
    let others: Vec<SocketAddr> = peers
        .members
        .list()
        .iter()
        .copied()
        .filter(|m| *m != me)
        .collect();
    let first = Ask {
        registry: query.registry.clone(),
        repository: query.repository.clone(),
        digests: local.targets.iter().map(|d| d.to_string()).collect(),
    };
    let mut reports = ask_all(peers, &others, &first).await;
    let found: BTreeSet<Digest> = reports
        .iter()
        .flat_map(|r| r.resolved.iter().map(|(_, _, d)| d.clone()))
        .filter(|d| !local.targets.contains(d))
        .collect();
    if !found.is_empty() {
        local.merge(local::purge(shared, None, None, &found).await);
        let again = Ask {
            digests: found.iter().map(|d| d.to_string()).collect(),
            ..Ask::default()
        };
        // A replica that did not answer the first round gets it all on
        // the retry the incomplete answer asks for.
        let answered: Vec<SocketAddr> = reports
            .iter()
            .filter(|r| r.problem.is_none())
            .map(|r| r.replica)
            .collect();
        for more in ask_all(peers, &answered, &again).await {
            if let Some(r) = reports.iter_mut().find(|r| r.replica == more.replica) {
                r.absorb(more);
            }
        }
    }
    reports
}

async fn ask_all(peers: &Peers, replicas: &[SocketAddr], ask: &Ask) -> Vec<PeerReport> {
    let body = match serde_json::to_vec(ask) {
        Ok(b) => Bytes::from(b),
        Err(e) => {
            // Strings only: cannot fail, but a report beats a panic.
            let problem = Problem::Failed(format!("encoding the purge: {e}"));
            return replicas
                .iter()
                .map(|r| PeerReport {
                    problem: Some(problem.clone()),
                    ..PeerReport::new(*r)
                })
                .collect();
        }
    };
    futures::future::join_all(replicas.iter().map(|r| ask_one(peers, *r, body.clone()))).await
}

async fn ask_one(peers: &Peers, replica: SocketAddr, body: Bytes) -> PeerReport {
    let mut report = PeerReport::new(replica);
    match tokio::time::timeout(FORWARD_TIMEOUT, exchange(peers, replica, body)).await {
        Ok(Ok(answer)) => match read_answer(&mut report, answer) {
            Ok(()) => {}
            Err(bad) => report.problem = Some(Problem::Failed(bad)),
        },
        Ok(Err(problem)) => report.problem = Some(problem),
        Err(_) => {
            report.problem = Some(Problem::Unreachable(format!(
                "no whole answer within {}s",
                FORWARD_TIMEOUT.as_secs()
            )));
        }
    }
    if let Some(problem) = &report.problem {
        tracing::warn!(peer = %replica, %problem, "purge: a replica's part is not done");
    }
    report
}

async fn exchange(peers: &Peers, replica: SocketAddr, body: Bytes) -> Result<Answer, Problem> {
    let req = http::Request::builder()
        .method(Method::POST)
        .uri(format!("https://{PEER_NAME}{PEER_ROUTE}"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|e| Problem::Failed(format!("building the request: {e}")))?;
    let resp = peers
        .client
        .send_fresh(replica, req, FORWARD_TIMEOUT)
        .await
        .map_err(|e| Problem::Unreachable(e.to_string()))?;
    let status = resp.status();
    let bytes = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| Problem::Unreachable(format!("reading its answer: {e}")))?
        .to_bytes();
    if status != StatusCode::OK {
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).into_owned();
        return Err(Problem::Failed(format!(
            "answered {status}: {}",
            text.trim()
        )));
    }
    serde_json::from_slice(&bytes).map_err(|e| Problem::Failed(format!("unreadable answer: {e}")))
}

fn read_answer(report: &mut PeerReport, answer: Answer) -> Result<(), String> {
    let parse = |s: &str| Digest::parse(s).map_err(|_| format!("answer names `{s}`, no digest"));
    for d in &answer.removed {
        report.removed.push(parse(d)?);
    }
    for f in answer.failed {
        report.failed.insert(parse(&f.digest)?, f.error);
    }
    for (registry, repository, d) in answer.resolved {
        report.resolved.push((registry, repository, parse(&d)?));
    }
    report.bytes = answer.bytes;
    Ok(())
}

/// Why the route refused a request.
#[derive(Debug, thiserror::Error)]
enum RouteError {
    #[error("the purge route takes POST only")]
    Method,
    #[error("reading the purge request: {0}")]
    Body(String),
    #[error("the purge request did not arrive within {0}s")]
    Slow(u64),
    #[error("the purge request is no purge: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the purge request names `{0}`, no sha256 digest")]
    Digest(String),
    #[error("the purge failed: {0}")]
    Purge(String),
}

impl RouteError {
    fn status(&self) -> StatusCode {
        match self {
            RouteError::Method => StatusCode::METHOD_NOT_ALLOWED,
            RouteError::Slow(_) => StatusCode::REQUEST_TIMEOUT,
            RouteError::Purge(_) => StatusCode::INTERNAL_SERVER_ERROR,
            RouteError::Body(_) | RouteError::Json(_) | RouteError::Digest(_) => {
                StatusCode::BAD_REQUEST
            }
        }
    }
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut resp = Response::new(body::full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

/// [`PEER_ROUTE`] on the peer listener: this replica's part of a purge
/// another replica was asked for. The caller (`pipeline::serve`) lets
/// only requests of the peer listener here.
pub async fn serve(shared: &Arc<Shared>, req: http::Request<Incoming>) -> Response<Body> {
    match answer(shared, req).await {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(err) => {
            tracing::warn!(error = %err, "purge from a replica refused");
            json_response(err.status(), &json!({"error": err.to_string()}))
        }
    }
}

async fn answer(shared: &Arc<Shared>, req: http::Request<Incoming>) -> Result<Value, RouteError> {
    if req.method() != Method::POST {
        return Err(RouteError::Method);
    }
    let read = Limited::new(req.into_body(), MAX_BODY).collect();
    let bytes = tokio::time::timeout(FORWARD_TIMEOUT, read)
        .await
        .map_err(|_| RouteError::Slow(FORWARD_TIMEOUT.as_secs()))?
        .map_err(|e| RouteError::Body(e.to_string()))?
        .to_bytes();
    let ask: Ask = serde_json::from_slice(&bytes)?;
    let given = ask
        .digests
        .iter()
        .map(|d| Digest::parse(d).map_err(|_| RouteError::Digest(d.clone())))
        .collect::<Result<BTreeSet<_>, _>>()?;
    // A task of its own: the asking replica giving up (its timeout) must
    // not stop the purge half-way, with index entries taken out and their
    // blobs still on disk.
    let done = {
        let (shared, registry, repository, given) = (
            Arc::clone(shared),
            ask.registry.clone(),
            ask.repository.clone(),
            given.clone(),
        );
        tokio::spawn(async move {
            local::purge(&shared, registry.as_deref(), repository.as_deref(), &given).await
        })
        .await
        .map_err(|e| RouteError::Purge(e.to_string()))?
    };
    tracing::info!(
        registry = ?ask.registry,
        repository = ?ask.repository,
        given = given.len(),
        removed = done.removed.len(),
        bytes = done.bytes,
        failed = done.failed.len(),
        "cache purged for another replica"
    );
    shared.metrics.purged(
        crate::observe::metric_labels::PurgeScope::for_replica,
        done.failed.is_empty(),
        done.bytes,
    );
    let answer = Answer {
        removed: done.removed.iter().map(|d| d.to_string()).collect(),
        bytes: done.bytes,
        failed: done
            .failed
            .iter()
            .map(|(d, error)| Failure {
                digest: d.to_string(),
                error: error.clone(),
            })
            .collect(),
        resolved: done
            .resolved
            .into_iter()
            .map(|(r, p, d)| (r, p, d.to_string()))
            .collect(),
    };
    Ok(serde_json::to_value(answer)?)
}

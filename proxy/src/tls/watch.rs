//! Following CA rotation: the CA files are polled by content and a new,
//! valid CA is swapped into the running issuer (see [`Issuer::reload`]).
//!
//! In the cluster the files are the CA Secret's volume: the operator
//! promotes the next CA there after nodes have trusted it for the overlap,
//! and drops the old one from the node bundle after another overlap. A
//! proxy that kept signing with the CA it started with would be refused by
//! every node from then on.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::Digest as _;

use super::{CaInfo, Issuer};

/// What a reload attempt did, for logs and metrics.
#[derive(Debug)]
pub enum CaReload {
    /// A new CA is in use.
    Swapped(CaInfo),
    /// The files are unchanged or hold the CA already in use.
    Unchanged,
    /// The files are unusable (half-written pair, mismatched key, expired):
    /// the current CA stays. The text is the error.
    Rejected(String),
}

/// Where the CA is read from at a poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The next CA's (cert, key), during an operator rotation.
    pub next: Option<(PathBuf, PathBuf)>,
    /// The CA the last rotation replaced, trusted by peers only.
    pub previous: Option<PathBuf>,
}

/// Polls the CA files every `interval` and swaps a changed, valid CA in
/// (and the next CA, see [`Issuer::reload_next`]). `files` says where they
/// are at each poll (a config reload may move them); `on_reload` is told
/// every attempt at the current CA (metrics).
///
/// Files are compared by content through any symlink, like the config
/// watch: a Secret volume update swaps a `..data` link, which leaves the
/// files' own mtimes meaningless. A rejected pair is retried at every poll
/// even if unchanged, since the other half of it may only land later (the
/// operator writes both in one Secret, but a copy may lag); the error is
/// logged again only when it changes.
pub async fn watch(
    issuer: Arc<Issuer>,
    interval: Duration,
    files: impl Fn() -> CaPaths,
    mut on_reload: impl FnMut(&CaReload),
) {
    // None: the first poll checks the files even if they match what was
    // loaded at start-up, so a change in between is not missed (an
    // unchanged CA is a no-op).
    let mut last: Option<Fingerprint> = None;
    let mut failing: Option<String> = None;
    loop {
        tokio::time::sleep(interval).await;
        let paths = files();
        let (cert, key) = (&paths.cert, &paths.key);
        let now = fingerprint(&paths);
        if last.as_ref() == Some(&now) && failing.is_none() {
            continue;
        }
        last = Some(now);
        let outcome = reload_once(&issuer, cert, key);
        let next = paths.next.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
        match issuer.reload_next(next) {
            Ok(true) => tracing::info!(
                next = ?paths.next,
                "next CA changed: names the current CA does not permit are signed by the next CA"
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "next CA not usable; keeping the previous state"),
        }
        match issuer.reload_previous(paths.previous.as_deref()) {
            Ok(true) => tracing::info!(
                previous = ?paths.previous,
                "previous CA changed: peers still presenting its certificates are trusted while it is there"
            ),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "previous CA not usable; keeping the previous state")
            }
        }
        match &outcome {
            CaReload::Swapped(info) => {
                tracing::info!(
                    cert = %cert.display(),
                    key = %key.display(),
                    subject = %info.subject,
                    not_after = %humantime::format_rfc3339_seconds(info.not_after),
                    "CA changed: new TLS handshakes get certificates signed by the new CA"
                );
                failing = None;
            }
            CaReload::Unchanged => failing = None,
            CaReload::Rejected(text) => {
                if failing.as_deref() != Some(text.as_str()) {
                    tracing::error!(
                        error = %text,
                        "CA files changed but are not usable; keeping the current CA (retrying at every poll)"
                    );
                }
                failing = Some(text.clone());
            }
        }
        on_reload(&outcome);
    }
}

/// One reload attempt from `cert` + `key`.
pub fn reload_once(issuer: &Issuer, cert: &Path, key: &Path) -> CaReload {
    match issuer.reload(cert, key) {
        Ok(Some(info)) => CaReload::Swapped(info),
        Ok(None) => CaReload::Unchanged,
        Err(e) => CaReload::Rejected(e.to_string()),
    }
}

/// sha256 of each file's content (None: unreadable); a hash so the key is
/// not kept around in memory.
#[derive(Debug, PartialEq)]
struct Fingerprint {
    cert: FileHash,
    key: FileHash,
    next: Option<(FileHash, FileHash)>,
    previous: Option<FileHash>,
}

/// sha256 of a file's content; None: unreadable.
type FileHash = Option<[u8; 32]>;

fn fingerprint(paths: &CaPaths) -> Fingerprint {
    let hash = |p: &Path| {
        std::fs::read(p)
            .ok()
            .map(|b| sha2::Sha256::digest(b).into())
    };
    Fingerprint {
        cert: hash(&paths.cert),
        key: hash(&paths.key),
        next: paths.next.as_ref().map(|(c, k)| (hash(c), hash(k))),
        previous: paths.previous.as_deref().map(hash),
    }
}

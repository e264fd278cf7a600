//! Fetching a missed blob. Merged: the first client leads one fetch (from
//! the source `lead` chose) into the store; every client (the leader too) tails the temp file
//! as it grows, and finishes on its own if caching is abandoned. Solo: one
//! client's own transfer when the download cannot be shared.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::mpsc;

use super::context::Ctx;
use super::lead::{LeadGuard, Opened, Takeover, upstream_path};
use super::{HandlerError, refused};
use crate::cache::inflight::{self, Download, Inflight, Outcome, Phase, Reservation, Stream};
use crate::cache::shared::Uploads;
use crate::cache::store::{BlobMeta, BlobWriter, StoreError, is_disk_full};
use crate::http::body::{self, Body, Piece};
use crate::http::headers::{API_VERSION, DOCKER_CONTENT_DIGEST, forward_headers};
use crate::observe::access_log::Record;
use crate::observe::labels::CacheResult;
use crate::observe::metrics::Metrics;
use crate::oci::{Digest, ErrorCode};

/// Starts the merged download of an opened source and answers the
/// leading client from it.
pub(super) async fn start(
    ctx: &Ctx<'_>,
    headers: &HeaderMap,
    digest: &Digest,
    opened: Opened,
    guard: &mut LeadGuard<'_>,
    record: &mut Record,
) -> Result<Response<Body>, HandlerError> {
    ctx.served(digest);
    let Opened {
        body: incoming,
        size,
        media_type,
        from_upstream,
        takeover,
        discard,
    } = opened;
    let store = &ctx.shared.store;
    let reservation = match size {
        Some(n) => match ctx.shared.inflight.reserve(n, |others| {
            has_room(store.tmp_dir(), n.saturating_add(others))
        }) {
            Some(r) => Some(r),
            None => {
                tracing::warn!(%digest, size = n, "cache disk full; passing the blob through");
                ctx.shared.metrics.disk_full();
                ctx.shared.inflight.mark_uncacheable(digest);
                record.cache = CacheResult::Pass;
                return Ok(solo(ctx, digest, size, media_type, incoming, None));
            }
        },
        None => None,
    };
    let meta = BlobMeta {
        media_type: media_type.clone(),
    };
    let writer = match store.begin(digest, meta).await {
        Ok(w) => w,
        Err(err) => {
            if is_disk_full(&err) {
                ctx.shared.metrics.disk_full();
                ctx.shared.inflight.mark_uncacheable(digest);
            }
            tracing::warn!(error = %err, %digest, "cannot cache blob; passing it through");
            record.cache = CacheResult::Pass;
            return Ok(solo(ctx, digest, size, media_type, incoming, None));
        }
    };
    let file = match writer.temp_path().map(std::fs::File::open) {
        Some(Ok(f)) => f,
        _ => {
            tracing::warn!(%digest, "cannot read back the temp file; passing the blob through");
            record.cache = CacheResult::Pass;
            return Ok(solo(ctx, digest, size, media_type, incoming, Some(writer)));
        }
    };
    let stream = Stream {
        file: Arc::new(file),
        recent: Arc::default(),
        size,
        media_type,
        on_disk: 0,
        outcome: None,
    };
    let Some(dl) = guard.dl.take() else {
        return Err(refused(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Unavailable,
            "download state lost",
        ));
    };
    dl.publish(Phase::Streaming(stream.clone()));
    let rx = dl.subscribe();
    tokio::spawn(download(
        incoming,
        writer,
        digest.clone(),
        dl,
        DownloadEnv {
            inflight: Arc::clone(&ctx.shared.inflight),
            metrics: Arc::clone(&ctx.shared.metrics),
            read_timeout: ctx.read_timeout,
            reservation,
            recent: Arc::clone(&stream.recent),
            uploads: from_upstream.then(|| ctx.shared.uploads.clone()).flatten(),
            takeover,
            discard,
        },
    ));
    let path = upstream_path(ctx, digest);
    let body = inflight::tail(
        rx,
        &stream,
        digest.clone(),
        resume(ctx, &path, headers),
        ctx.read_timeout,
        ctx.file_chunk(),
    );
    Ok(blob_response(digest, &stream, body))
}

/// How this client gets the rest of a blob from the upstream on its own,
/// with its own credentials, if the shared download is abandoned (the cache
/// disk filled up mid-way). Holds owned handles: it runs inside the
/// response body, after the pipeline returned.
pub(crate) fn resume(ctx: &Ctx<'_>, path: &str, headers: &HeaderMap) -> inflight::Resume {
    let shared = Arc::clone(ctx.shared);
    let state = Arc::clone(ctx.state);
    let host = ctx.registry.host.clone();
    let repo = ctx.repo.clone();
    let via = ctx.via;
    let source = ctx.source;
    let read_timeout = ctx.read_timeout;
    let path = path.to_string();
    let headers = forward_headers(headers, false);
    Arc::new(move |from: u64| {
        let (shared, state, host, repo, path, mut headers) = (
            Arc::clone(&shared),
            Arc::clone(&state),
            host.clone(),
            repo.clone(),
            path.clone(),
            headers.clone(),
        );
        Box::pin(async move {
            let client = state
                .upstreams
                .client(&host)
                .ok_or_else(|| format!("no upstream for {host}"))?;
            let registry = state
                .config
                .registry(&host)
                .ok_or_else(|| format!("registry {host} vanished"))?;
            let ctx = Ctx {
                shared: &shared,
                state: &state,
                client,
                settings: state.settings.registry(&host),
                auth_ttl: state.settings.auth_check_ttl,
                registry,
                repo,
                via,
                read_timeout,
                source,
                from_peer: false,
                sendfile: None,
                // Only sends one request of its own; reads no file.
                multiplexed: false,
                yes_at: Default::default(),
            };
            if let Ok(range) = HeaderValue::from_str(&format!("bytes={from}-")) {
                headers.insert(header::RANGE, range);
            }
            let url = ctx.url(&path, None).map_err(|e| e.to_string())?;
            let up = ctx
                .send(Method::GET, url, headers)
                .await
                .map_err(|e| e.to_string())?;
            Ok(up.response)
        })
    })
}

/// Is there room for `size` more bytes (and some slack) where temp files go?
fn has_room(dir: &std::path::Path, size: u64) -> bool {
    const SLACK: u64 = 1 << 20;
    // The field types differ between platforms (u64 on 64-bit Linux).
    #[allow(clippy::useless_conversion)]
    match nix::sys::statvfs::statvfs(dir) {
        Ok(st) => {
            let avail =
                u64::from(st.blocks_available()).saturating_mul(u64::from(st.fragment_size()));
            avail >= size.saturating_add(SLACK)
        }
        Err(_) => true,
    }
}

/// What a merged download needs besides the body and the writer.
struct DownloadEnv {
    inflight: Arc<Inflight>,
    metrics: Arc<Metrics>,
    read_timeout: Duration,
    /// Disk space held in `inflight` (given back at the end).
    reservation: Option<Reservation>,
    /// Where written batches are handed to the clients (see `Recent`).
    recent: Arc<inflight::Recent>,
    /// Copies the committed blob to the shared tier.
    uploads: Option<Arc<Uploads>>,
    takeover: Option<Takeover>,
    discard: Option<super::lead::Discard>,
}

/// Hands the batches now on disk to the clients (from memory) and
/// publishes how far the file goes.
pub(crate) fn publish(
    writer: &mut BlobWriter,
    recent: &inflight::Recent,
    dl: &Download,
    published: &mut u64,
) {
    for (offset, bytes) in writer.take_batches() {
        recent.push(offset, bytes);
    }
    let on_disk = writer.on_disk();
    if on_disk != *published {
        *published = on_disk;
        dl.update(|s| s.on_disk = on_disk);
    }
}

/// The merged download: copies the upstream body into the store's temp
/// file, publishing progress, then commits; runs to the end whoever is
/// still listening.
async fn download(
    mut incoming: Body,
    mut writer: BlobWriter,
    digest: Digest,
    dl: Arc<Download>,
    env: DownloadEnv,
) {
    let DownloadEnv {
        inflight,
        metrics,
        read_timeout,
        reservation,
        recent,
        uploads,
        mut takeover,
        discard,
    } = env;
    let mut reservation = reservation;
    let mut published = 0u64;
    let mut end = pump(
        &mut incoming,
        &mut writer,
        &recent,
        &dl,
        &mut published,
        &mut reservation,
        read_timeout,
    )
    .await;
    // The owner replica or the bucket failed mid-way: continue from the
    // upstream at the first byte not yet written.
    while let Err(DownloadEnd::Upstream(msg)) = &end
        && let Some(t) = takeover.take()
    {
        (t.failed)();
        if let Err(err) = writer.flush_now().await {
            end = Err(DownloadEnd::Write(err));
            break;
        }
        publish(&mut writer, &recent, &dl, &mut published);
        let at = writer.on_disk();
        match inflight::resume_body(&t.resume, at, read_timeout).await {
            Ok(rest) => {
                tracing::warn!(%digest, at, error = %msg, "source (owner replica or shared storage) failed mid-blob; continuing from the upstream");
                incoming = rest;
                end = pump(
                    &mut incoming,
                    &mut writer,
                    &recent,
                    &dl,
                    &mut published,
                    &mut reservation,
                    read_timeout,
                )
                .await;
            }
            Err(err) => {
                end = Err(DownloadEnd::Upstream(format!(
                    "{msg}; continuing from the upstream at {at} failed: {err}"
                )));
            }
        }
    }
    let end = match end {
        Ok(()) => writer.flush_now().await.map_err(DownloadEnd::Write),
        Err(e) => Err(e),
    };
    for (offset, bytes) in writer.take_batches() {
        recent.push(offset, bytes);
    }
    let outcome = match end {
        Err(DownloadEnd::Upstream(msg)) => {
            writer.abort().await;
            Outcome::Failed(Arc::from(msg.as_str()))
        }
        Err(DownloadEnd::Write(err)) => {
            // The disk filled up (or failed) after the download started:
            // stop caching, keep serving. The upstream body is dropped; each
            // client finishes with its own ranged fetch (see `cache::inflight`).
            drop(incoming);
            if is_disk_full(&err) {
                metrics.disk_full();
            }
            inflight.mark_uncacheable(&digest);
            match writer.abandon().await {
                Some((at, hasher)) => {
                    tracing::warn!(%digest, error = %err, at,
                        "cache write failed mid-download; not caching, clients continue by pass-through");
                    Outcome::Abandoned {
                        at,
                        hasher: Arc::new(hasher),
                    }
                }
                None => Outcome::Failed(Arc::from(format!("cache write failed: {err}").as_str())),
            }
        }
        Ok(()) => {
            let on_disk = writer.on_disk();
            dl.update(|s| s.on_disk = on_disk);
            match writer.commit().await {
                Ok(blob) => {
                    if let Some(uploads) = &uploads {
                        uploads.submit(blob);
                    }
                    Outcome::Verified
                }
                Err(err @ StoreError::NotCommitted { .. }) => {
                    // Verified bytes, no room to keep them: the clients read
                    // the (unlinked) temp file to the end, nothing is cached.
                    if is_disk_full(&err) {
                        metrics.disk_full();
                    }
                    inflight.mark_uncacheable(&digest);
                    tracing::warn!(%digest, error = %err, "verified blob not cached; served uncached");
                    Outcome::Verified
                }
                Err(err) => {
                    if let (StoreError::DigestMismatch { .. }, Some(discard)) = (&err, discard) {
                        discard();
                    }
                    Outcome::Failed(Arc::from(err.to_string().as_str()))
                }
            }
        }
    };
    // Unregister first: a client arriving after this finds the blob in the
    // store (or, on failure, starts a fresh download).
    drop(reservation);
    inflight.finish(&digest, &dl);
    if let Outcome::Failed(msg) = &outcome {
        tracing::warn!(%digest, error = %msg, "blob download failed; every waiter aborted, nothing cached");
    }
    dl.update(|s| s.outcome = Some(outcome));
}

/// Copies `incoming` into the writer until it ends or fails, publishing
/// progress.
async fn pump(
    incoming: &mut Body,
    writer: &mut BlobWriter,
    recent: &inflight::Recent,
    dl: &Download,
    published: &mut u64,
    reservation: &mut Option<Reservation>,
    read_timeout: Duration,
) -> Result<(), DownloadEnd> {
    loop {
        // While a batch is written, keep receiving; publish it the moment
        // it is on disk (not only when the next chunk arrives).
        let next = tokio::select! {
            biased;
            done = writer.collect(), if writer.writing() => Err(done),
            frame = tokio::time::timeout(read_timeout, incoming.frame()) => Ok(frame),
        };
        let next = match next {
            Ok(frame) => frame,
            Err(done) => {
                if let Err(err) = done {
                    return Err(DownloadEnd::Write(err));
                }
                publish(writer, recent, dl, published);
                if let Some(r) = reservation.as_mut() {
                    r.on_disk(*published);
                }
                continue;
            }
        };
        let frame = match next {
            Err(_) => return Err(DownloadEnd::Upstream("upstream stalled".to_string())),
            Ok(None) => return Ok(()),
            Ok(Some(Err(err))) => {
                return Err(DownloadEnd::Upstream(format!(
                    "upstream body failed: {err}"
                )));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if let Err(err) = writer.write(&data).await {
            return Err(DownloadEnd::Write(err));
        }
        publish(writer, recent, dl, published);
        if let Some(r) = reservation.as_mut() {
            r.on_disk(*published);
        }
    }
}

/// Why a merged download stopped early.
enum DownloadEnd {
    /// The upstream body failed: nothing to continue from.
    Upstream(String),
    /// Writing the cache failed: the bytes so far are good.
    Write(StoreError),
}

/// Response head for a blob streamed from a download.
pub(crate) fn blob_response(digest: &Digest, stream: &Stream, body: Body) -> Response<Body> {
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    if let Some(len) = stream.size {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    h.insert(
        header::CONTENT_TYPE,
        stream
            .media_type
            .as_deref()
            .and_then(|m| HeaderValue::from_str(m).ok())
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    if let Ok(v) = HeaderValue::from_str(digest.as_str()) {
        h.insert(DOCKER_CONTENT_DIGEST, v);
    }
    h.insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
    resp
}

/// One client's own transfer, not shared (the disk is full, or the
/// download it waited for never started): `writer` caches it if given.
pub(crate) fn solo(
    ctx: &Ctx<'_>,
    digest: &Digest,
    size: Option<u64>,
    media_type: Option<String>,
    incoming: Body,
    writer: Option<BlobWriter>,
) -> Response<Body> {
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(fetch_blob(
        incoming,
        writer,
        digest.clone(),
        tx,
        ctx.read_timeout,
    ));
    let mut resp = Response::new(body::channel(rx));
    let h = resp.headers_mut();
    if let Some(len) = size {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    h.insert(
        header::CONTENT_TYPE,
        media_type
            .and_then(|m| HeaderValue::from_str(&m).ok())
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    if let Ok(v) = HeaderValue::from_str(digest.as_str()) {
        h.insert(DOCKER_CONTENT_DIGEST, v);
    }
    h.insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
    resp
}

/// Copies an upstream blob body to the client and into the store. The last
/// chunk is held back until the digest is verified, so a client never
/// receives a complete body whose digest is wrong: on mismatch its response
/// is aborted instead (the body ends only on [`Piece::End`], so an error
/// that finds the channel full still aborts it). The bytes are hashed here whether or not they are
/// cached (the store's own check covers only what it writes, and there is
/// no store when the disk is full or the write failed). The download
/// continues if the client leaves, so the cache is filled for the next one.
async fn fetch_blob(
    mut incoming: Body,
    mut writer: Option<BlobWriter>,
    digest: Digest,
    tx: mpsc::Sender<std::io::Result<Piece>>,
    read_timeout: Duration,
) {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    let mut held: Option<Bytes> = None;
    let mut client_alive = true;
    let abort = |tx: &mpsc::Sender<std::io::Result<Piece>>, msg: String| {
        let _ = tx.try_send(Err(std::io::Error::other(msg)));
    };
    loop {
        let frame = match tokio::time::timeout(read_timeout, incoming.frame()).await {
            Err(_) => {
                tracing::warn!(%digest, "upstream stalled; aborting blob transfer");
                abort(&tx, "upstream stalled".into());
                if let Some(w) = writer.take() {
                    w.abort().await;
                }
                return;
            }
            Ok(None) => break,
            Ok(Some(Err(err))) => {
                tracing::warn!(%digest, error = %err, "upstream body failed; aborting blob transfer");
                abort(&tx, format!("upstream body failed: {err}"));
                if let Some(w) = writer.take() {
                    w.abort().await;
                }
                return;
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        hasher.update(&data);
        if let Some(w) = writer.as_mut()
            && let Err(err) = w.write(&data).await
        {
            tracing::warn!(%digest, error = %err, "cache write failed; continuing as pass-through");
            if let Some(w) = writer.take() {
                w.abort().await;
            }
        }
        if let Some(prev) = held.replace(data)
            && client_alive
            && tx.send(Ok(Piece::Data(prev))).await.is_err()
        {
            client_alive = false;
            if writer.is_none() {
                return;
            }
        }
    }
    let verified = hex::encode(hasher.finalize()) == digest.hex();
    if let Some(w) = writer.take() {
        if verified {
            if let Err(err) = w.commit().await {
                // Correct bytes, not kept (disk): the transfer still stands.
                tracing::error!(%digest, error = %err, "blob not cached");
            }
        } else {
            w.abort().await;
        }
    }
    if !verified {
        tracing::warn!(%digest, "upstream blob failed verification; aborting the transfer before its last chunk");
    }
    if verified {
        if client_alive {
            if let Some(last) = held {
                let _ = tx.send(Ok(Piece::Data(last))).await;
            }
            let _ = tx.send(Ok(Piece::End)).await;
        }
    } else {
        abort(&tx, format!("blob {digest} failed verification"));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;

    use super::fetch_blob;
    use crate::http::body;
    use crate::oci::Digest;

    /// An upstream body without a length whose bytes fail verification,
    /// read by a client slow enough that the channel is full when the
    /// check fails: the client's body still ends with an error, never
    /// cleanly (it once ended cleanly, one chunk short).
    #[tokio::test]
    async fn a_failed_check_aborts_the_body_of_a_slow_client() {
        let chunks: Vec<std::io::Result<Bytes>> =
            (0..20u8).map(|i| Ok(Bytes::from(vec![i; 1000]))).collect();
        let upstream = body::stream(futures::stream::iter(chunks));
        let (tx, rx) = mpsc::channel(1);
        let task = tokio::spawn(fetch_blob(
            upstream,
            None,
            Digest::of(b"other bytes"),
            tx,
            Duration::from_secs(5),
        ));
        let mut client = body::channel(rx);
        // 18 of the 19 chunks sent before the check (the 20th is held
        // back): the 19th then fills the channel, and the task ends.
        for _ in 0..18 {
            let frame = client.frame().await.expect("a frame").expect("data");
            assert!(frame.is_data());
        }
        task.await.expect("the fetch task");
        let mut rest = Vec::new();
        while let Some(frame) = client.frame().await {
            rest.push(frame.map(|f| f.into_data().map(|d| d.len()).unwrap_or(0)));
        }
        assert_eq!(rest.len(), 2, "{rest:?}");
        assert_eq!(rest[0].as_ref().ok(), Some(&1000));
        assert!(rest[1].is_err(), "the body ended cleanly: {rest:?}");
    }

    /// A verified body ends cleanly with every byte.
    #[tokio::test]
    async fn a_verified_body_ends_cleanly_with_every_byte() {
        let bytes: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let chunks: Vec<std::io::Result<Bytes>> = bytes
            .chunks(1000)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(fetch_blob(
            body::stream(futures::stream::iter(chunks)),
            None,
            Digest::of(&bytes),
            tx,
            Duration::from_secs(5),
        ));
        let got = body::channel(rx).collect().await.expect("a clean end");
        assert_eq!(got.to_bytes(), Bytes::from(bytes));
    }
}

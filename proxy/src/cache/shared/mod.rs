//! The shared tier: content-addressed blobs in an object store (S3) that
//! every replica reads and writes, below each replica's own disk.
//!
//! ```text
//! <prefix>/blobs/sha256/<first 2 hex>/<hex>    verified content, Content-Type = media type
//! ```
//!
//! Only verified bytes get a key: an object is written by a multipart
//! upload that is completed only once the bytes sent hash to the digest
//! (and aborted otherwise); an unfinished upload is invisible to GET,
//! HEAD and LIST. Two replicas completing the same digest write the same
//! bytes, so neither needs a lock.
//!
//! The tier is an optimisation, never a dependency: every error is logged,
//! counted and answered as a miss, and after one on the request path the
//! tier is skipped there for a while ([`Health`]) so pass-through serving
//! is not slowed by an object store that is down. Errors of calls made
//! off the request path (uploads, the evictor, coordination objects) are
//! counted but switch nothing off: one failed part upload or LIST is no
//! sign that reads fail, and those calls retry on their own.

mod coord;
mod evict;
pub mod grants;
mod health;
pub(crate) mod s3;
#[cfg(test)]
mod tests;
mod upload;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream::BoxStream};
use object_store::path::Path as Key;
use object_store::{
    Attribute, AttributeValue, Attributes, GetOptions, GetRange, ObjectStore, ObjectStoreExt,
    PutMode, PutMultipartOptions, PutOptions, PutPayload,
};
use sha2::{Digest as _, Sha256};

pub use coord::{Listed, Version};
pub use evict::{EvictStats, Evictor, Journal};
pub use health::Health;
pub use s3::build_s3;
pub use upload::Uploads;

use crate::cache::store::BlobMeta;
use crate::oci::Digest;

/// Longest wait for a metadata answer (HEAD, small GET) on the request
/// path: past it the request goes on as a miss.
const META_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest one object-store call made off the request path may take (a
/// part upload, a coordination write, a LIST). The client's own request
/// timeout is off so that blob bodies can stream as long as they need;
/// without this a bucket that accepts connections and never answers would
/// hold an upload slot, the evictor or the grant sharing for good.
const BACKGROUND_TIMEOUT: Duration = Duration::from_secs(60);

/// Part size of multipart uploads (S3 minimum is 5 MiB).
const PART: usize = 8 << 20;
/// Parts of one upload in flight at once.
const PARTS_IN_FLIGHT: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum TierError {
    #[error("object store {op} of {key} failed: {message}")]
    Store {
        op: &'static str,
        key: String,
        message: String,
    },
    /// The store asked this client to slow down (`503 SlowDown`, or a
    /// `429`/`503` status without a body, as on a HEAD): a reason to back
    /// off, not a sign that it is down.
    #[error("object store {op} of {key}: asked to slow down: {message}")]
    SlowDown {
        op: &'static str,
        key: String,
        message: String,
    },
    #[error("object store {op} of {key} timed out after {secs}s")]
    Timeout {
        op: &'static str,
        key: String,
        secs: u64,
    },
    #[error("blob {expected} from the object store hashes to {actual}: not used")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("cannot read {path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the object store is skipped for {secs}s more after an error")]
    Skipped { secs: u64 },
    #[error("storage.s3: {0}")]
    Config(String),
}

/// What the tier knows of one blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierStat {
    pub size: u64,
    pub meta: BlobMeta,
}

pub type ByteStream = BoxStream<'static, Result<Bytes, TierError>>;

/// The shared tier. Cheap to share in an `Arc`.
#[derive(Debug)]
pub struct SharedTier {
    store: Arc<dyn ObjectStore>,
    prefix: Key,
    /// `s3://bucket/prefix`, for logs.
    location: String,
    health: Health,
    /// [`BACKGROUND_TIMEOUT`], shorter in tests.
    background_timeout: Duration,
}

impl SharedTier {
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str, location: String) -> Self {
        Self {
            store,
            prefix: Key::from(prefix.trim_matches('/')),
            location,
            health: Health::default(),
            background_timeout: BACKGROUND_TIMEOUT,
        }
    }

    #[cfg(test)]
    pub fn with_background_timeout(mut self, timeout: Duration) -> Self {
        self.background_timeout = timeout;
        self
    }

    /// `call`, failed as a timeout (and counted against the store's health
    /// as `caller` sees it) past `limit`; the store's own answer otherwise,
    /// for the caller to read (NotFound, AlreadyExists and Precondition
    /// are answers, not failures).
    async fn within<T>(
        &self,
        caller: Caller,
        limit: Duration,
        op: &'static str,
        key: &Key,
        call: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<object_store::Result<T>, TierError> {
        tokio::time::timeout(limit, call).await.map_err(|_| {
            let err = TierError::Timeout {
                op,
                key: key.to_string(),
                secs: limit.as_secs().max(1),
            };
            self.noted(caller, &err);
            err
        })
    }

    /// [`Self::within`] the background timeout, off the request path.
    async fn bounded<T>(
        &self,
        op: &'static str,
        key: &Key,
        call: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<object_store::Result<T>, TierError> {
        self.within(Caller::Background, self.background_timeout, op, key, call)
            .await
    }

    /// Counts a failure, and on the request path marks the store down
    /// (skipped there for a while) or, asked to slow down, backs off
    /// briefly.
    fn noted(&self, caller: Caller, err: &TierError) {
        match (caller, err) {
            (Caller::Background, _) => self.health.background_failed(),
            (Caller::Request, TierError::SlowDown { .. }) => self.health.slowed(err),
            (Caller::Request, _) => self.health.failed(err),
        }
    }

    pub fn location(&self) -> &str {
        &self.location
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    /// `rel` under the configured prefix.
    fn under_prefix(&self, rel: &str) -> Key {
        if self.prefix.as_ref().is_empty() {
            Key::from(rel)
        } else {
            Key::from(format!("{}/{rel}", self.prefix))
        }
    }

    fn key(&self, d: &Digest) -> Key {
        let hex = d.hex();
        self.under_prefix(&format!("blobs/sha256/{}/{hex}", &hex[..2]))
    }

    /// Every object under `key`.
    async fn list(&self, key: &Key) -> Result<Vec<object_store::ObjectMeta>, TierError> {
        // Bounded per page, not as a whole: a big bucket takes many pages.
        let mut pages = self.store.list(Some(key));
        let mut out = Vec::new();
        while let Some(meta) = self
            .bounded("LIST", key, async { pages.next().await.transpose() })
            .await?
            .map_err(|e| self.err(Caller::Background, "LIST", key, e))?
        {
            out.push(meta);
        }
        Ok(out)
    }

    /// The tier's error for a failed call, counted as `caller` sees it.
    fn err(
        &self,
        caller: Caller,
        op: &'static str,
        key: &Key,
        e: object_store::Error,
    ) -> TierError {
        let (key, message) = (key.to_string(), s3::explain(&e, &self.location));
        let err = if s3::is_slow_down(&e) {
            TierError::SlowDown { op, key, message }
        } else {
            TierError::Store { op, key, message }
        };
        self.noted(caller, &err);
        err
    }

    /// Fails fast while the store is marked down.
    fn usable(&self) -> Result<(), TierError> {
        match self.health.skip_for() {
            Some(left) => Err(TierError::Skipped {
                secs: left.as_secs().max(1),
            }),
            None => Ok(()),
        }
    }

    /// Checks that the bucket answers and accepts these credentials: a
    /// write, a read and a delete of a probe object. Run at start so a
    /// misconfiguration is reported at once, not at the first miss.
    pub async fn probe(&self, replica: &str) -> Result<(), TierError> {
        let key = self.prefix.clone().join("probe").join(replica);
        let payload = PutPayload::from_static(b"pullthrough probe");
        let timed = |op| {
            let key = key.to_string();
            move |_| TierError::Timeout {
                op,
                key,
                secs: META_TIMEOUT.as_secs() * 2,
            }
        };
        tokio::time::timeout(META_TIMEOUT * 2, self.store.put(&key, payload))
            .await
            .map_err(timed("write"))?
            .map_err(|e| self.err(Caller::Request, "write", &key, e))?;
        tokio::time::timeout(META_TIMEOUT * 2, self.store.head(&key))
            .await
            .map_err(timed("read"))?
            .map_err(|e| self.err(Caller::Request, "read", &key, e))?;
        tokio::time::timeout(META_TIMEOUT * 2, self.store.delete(&key))
            .await
            .map_err(timed("delete"))?
            .map_err(|e| self.err(Caller::Request, "delete", &key, e))?;
        self.health.succeeded();
        Ok(())
    }

    /// A GET (or HEAD) of `key` bounded for its answer ([`META_TIMEOUT`]
    /// on the request path, where a store marked down is not asked at
    /// all); `None` when the object does not exist.
    async fn get(
        &self,
        caller: Caller,
        op: &'static str,
        key: &Key,
        opts: GetOptions,
    ) -> Result<Option<object_store::GetResult>, TierError> {
        let limit = match caller {
            Caller::Request => {
                self.usable()?;
                META_TIMEOUT
            }
            Caller::Background => self.background_timeout,
        };
        let got = self.store.get_opts(key, opts);
        match self.within(caller, limit, op, key, got).await? {
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(caller, op, key, e)),
            Ok(got) => {
                self.health.succeeded();
                Ok(Some(got))
            }
        }
    }

    /// Size and media type of a blob, `None` if the tier does not have it.
    pub async fn stat(&self, d: &Digest) -> Result<Option<TierStat>, TierError> {
        self.stat_as(Caller::Request, d).await
    }

    /// [`Self::stat`] off the request path (an upload checking whether
    /// another replica put the blob there already): not skipped while the
    /// request path finds the store down, and its failure marks nothing.
    pub async fn stat_background(&self, d: &Digest) -> Result<Option<TierStat>, TierError> {
        self.stat_as(Caller::Background, d).await
    }

    async fn stat_as(&self, caller: Caller, d: &Digest) -> Result<Option<TierStat>, TierError> {
        let head = GetOptions {
            head: true,
            ..GetOptions::default()
        };
        Ok(self
            .get(caller, "HEAD", &self.key(d), head)
            .await?
            .map(|got| TierStat {
                size: got.meta.size,
                meta: meta_of(&got.attributes),
            }))
    }

    /// The bytes of a blob from offset `from`, as the store sends them
    /// (the caller verifies: it hashes the whole blob as it goes).
    pub async fn open(&self, d: &Digest, from: u64) -> Result<Option<ByteStream>, TierError> {
        self.open_as(Caller::Request, d, from).await
    }

    async fn open_as(
        &self,
        caller: Caller,
        d: &Digest,
        from: u64,
    ) -> Result<Option<ByteStream>, TierError> {
        let key = self.key(d);
        let opts = GetOptions {
            range: (from > 0).then_some(GetRange::Offset(from)),
            ..GetOptions::default()
        };
        let Some(got) = self.get(caller, "GET", &key, opts).await? else {
            return Ok(None);
        };
        let k = key.to_string();
        let location = self.location.clone();
        Ok(Some(
            got.into_stream()
                .map_err(move |e| TierError::Store {
                    op: "GET body",
                    key: k.clone(),
                    message: s3::explain(&e, &location),
                })
                .boxed(),
        ))
    }

    /// A whole small object (a manifest), verified; `None` if absent or
    /// larger than `max`. An object whose bytes fail the digest is deleted
    /// before the error is returned: it would fail every read of it, on
    /// every replica, for good (and each read keeps it recently used),
    /// and while it is there no good copy can be put in its place.
    pub async fn read_small(
        &self,
        d: &Digest,
        max: u64,
    ) -> Result<Option<(Bytes, BlobMeta)>, TierError> {
        self.read_small_as(Caller::Request, d, max).await
    }

    /// [`Self::read_small`] off the request path (resolving pins).
    pub async fn read_small_background(
        &self,
        d: &Digest,
        max: u64,
    ) -> Result<Option<(Bytes, BlobMeta)>, TierError> {
        self.read_small_as(Caller::Background, d, max).await
    }

    async fn read_small_as(
        &self,
        caller: Caller,
        d: &Digest,
        max: u64,
    ) -> Result<Option<(Bytes, BlobMeta)>, TierError> {
        let Some(stat) = self.stat_as(caller, d).await? else {
            return Ok(None);
        };
        if stat.size > max {
            return Ok(None);
        }
        let Some(mut body) = self.open_as(caller, d, 0).await? else {
            return Ok(None);
        };
        let mut buf = Vec::with_capacity(stat.size as usize);
        let read = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                if (buf.len() + chunk.len()) as u64 > max {
                    return Ok(false);
                }
                buf.extend_from_slice(&chunk);
            }
            Ok::<_, TierError>(true)
        };
        match tokio::time::timeout(META_TIMEOUT, read).await {
            Err(_) => {
                return Err(TierError::Timeout {
                    op: "GET",
                    key: self.key(d).to_string(),
                    secs: META_TIMEOUT.as_secs(),
                });
            }
            Ok(Err(e)) => return Err(e),
            Ok(Ok(false)) => return Ok(None),
            Ok(Ok(true)) => {}
        }
        if let Err(bad) = verify(d, &Sha256::digest(&buf)) {
            self.discard_bad(d).await;
            return Err(bad);
        }
        Ok(Some((Bytes::from(buf), stat.meta)))
    }

    /// Deletes an object that failed its digest, within [`META_TIMEOUT`]
    /// (this runs on the request path); a failure is logged, the next
    /// reader tries again. It marks nothing: a delete that fails says
    /// nothing of whether reads do.
    async fn discard_bad(&self, d: &Digest) {
        let key = self.key(d);
        let deleted = match self
            .within(
                Caller::Background,
                META_TIMEOUT,
                "DELETE",
                &key,
                self.store.delete(&key),
            )
            .await
        {
            Ok(Ok(()) | Err(object_store::Error::NotFound { .. })) => Ok(()),
            Ok(Err(e)) => Err(self.err(Caller::Background, "DELETE", &key, e)),
            Err(timeout) => Err(timeout),
        };
        match deleted {
            Ok(()) => tracing::warn!(digest = %d,
                "the shared storage's copy failed its digest; deleted, it is fetched from the upstream"),
            Err(err) => tracing::warn!(digest = %d, error = %err,
                "the shared storage's copy failed its digest and could not be deleted"),
        }
    }

    /// Stores a small verified object in one request, unless present.
    /// Off the request path: not skipped while reads find the store down.
    pub async fn put_small(
        &self,
        d: &Digest,
        meta: &BlobMeta,
        bytes: Bytes,
    ) -> Result<(), TierError> {
        verify(d, &Sha256::digest(&bytes))?;
        let key = self.key(d);
        let opts = PutOptions {
            mode: PutMode::Create,
            attributes: attributes(meta),
            ..PutOptions::default()
        };
        let put = self.store.put_opts(&key, bytes.into(), opts);
        match self.bounded("PUT", &key, put).await? {
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => {
                self.health.succeeded();
                Ok(())
            }
            Err(e) => Err(self.err(Caller::Background, "PUT", &key, e)),
        }
    }

    /// Uploads a blob from a stream of its bytes; completes the upload only
    /// if they hash to `d`, else aborts it (nothing appears under the key).
    /// Off the request path: not skipped while reads find the store down
    /// (the upload queue retries a failed one itself).
    pub async fn upload(
        &self,
        d: &Digest,
        meta: &BlobMeta,
        mut bytes: BoxStream<'_, Result<Bytes, TierError>>,
    ) -> Result<u64, TierError> {
        let key = self.key(d);
        let opts = PutMultipartOptions {
            attributes: attributes(meta),
            ..PutMultipartOptions::default()
        };
        let up = self
            .bounded(
                "start upload",
                &key,
                self.store.put_multipart_opts(&key, opts),
            )
            .await?
            .map_err(|e| self.err(Caller::Background, "start upload", &key, e))?;
        let mut w = object_store::WriteMultipart::new_with_chunk_size(up, PART);
        let mut hasher = Sha256::new();
        let mut sent = 0u64;
        let failed = loop {
            match bytes.next().await {
                None => break None,
                Some(Err(e)) => break Some(e),
                Some(Ok(chunk)) => {
                    let room = w.wait_for_capacity(PARTS_IN_FLIGHT);
                    match self.bounded("upload part", &key, room).await {
                        Err(timeout) => break Some(timeout),
                        Ok(Err(e)) => {
                            break Some(self.err(Caller::Background, "upload part", &key, e));
                        }
                        Ok(Ok(())) => {}
                    }
                    hasher.update(&chunk);
                    sent += chunk.len() as u64;
                    w.put(chunk);
                }
            }
        };
        let failed = failed.or_else(|| verify(d, &hasher.finalize()).err());
        if let Some(e) = failed {
            let aborted = match self.bounded("abort upload", &key, w.abort()).await {
                Ok(Ok(())) => None,
                Ok(Err(abort)) => Some(abort.to_string()),
                Err(abort) => Some(abort.to_string()),
            };
            if let Some(abort) = aborted {
                tracing::warn!(%d, error = %abort, "aborting the upload failed; the store's lifecycle rule removes its parts");
            }
            return Err(e);
        }
        self.bounded("complete upload", &key, w.finish())
            .await?
            .map_err(|e| self.err(Caller::Background, "complete upload", &key, e))?;
        self.health.succeeded();
        Ok(sent)
    }
}

/// Who makes a call, for what its failure means: on the request path a
/// failure skips the store there for a while; off it, it is counted only.
#[derive(Debug, Clone, Copy)]
enum Caller {
    Request,
    Background,
}

impl TierError {
    /// Worth trying again later: the store failed, timed out or asked to
    /// slow down (not bad bytes, a local file or the config).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            TierError::Store { .. }
                | TierError::SlowDown { .. }
                | TierError::Timeout { .. }
                | TierError::Skipped { .. }
        )
    }
}

fn verify(expected: &Digest, hash: &[u8]) -> Result<(), TierError> {
    let hex = hex::encode(hash);
    if hex == expected.hex() {
        return Ok(());
    }
    Err(TierError::DigestMismatch {
        expected: expected.clone(),
        actual: Digest::parse(&format!("sha256:{hex}")).unwrap_or_else(|_| expected.clone()),
    })
}

fn attributes(meta: &BlobMeta) -> Attributes {
    let mut a = Attributes::new();
    if let Some(mt) = &meta.media_type {
        a.insert(Attribute::ContentType, AttributeValue::from(mt.clone()));
    }
    a
}

fn meta_of(a: &Attributes) -> BlobMeta {
    BlobMeta {
        media_type: a
            .get(&Attribute::ContentType)
            .map(|v| v.as_ref().to_string())
            // Stores answer this for objects written without a type.
            .filter(|m| !m.is_empty() && m != "binary/octet-stream"),
    }
}

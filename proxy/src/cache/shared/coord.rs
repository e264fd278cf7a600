//! What the shared tier holds besides blobs, and how it is listed: the
//! coordination objects under `<prefix>/coord/` (the eviction lease, each
//! replica's access journal), written with compare-and-swap where two
//! replicas may race.

use bytes::Bytes;
use object_store::path::Path as Key;
use object_store::{ObjectStoreExt, PutMode, PutOptions};

use super::{SharedTier, TierError};
use crate::oci::Digest;

/// A coordination object's version, for compare-and-swap.
pub type Version = object_store::UpdateVersion;

/// One blob as LIST shows it.
#[derive(Debug, Clone)]
pub struct Listed {
    pub digest: Digest,
    pub size: u64,
    pub modified: std::time::SystemTime,
}

impl SharedTier {
    fn coord_key(&self, name: &str) -> Key {
        self.under_prefix(&format!("coord/{name}"))
    }

    /// A coordination object (lease, access journal) and its version.
    pub async fn read_coord(&self, name: &str) -> Result<Option<(Bytes, Version)>, TierError> {
        let key = self.coord_key(name);
        let got = match self.bounded("GET", &key, self.store.get(&key)).await? {
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.err(super::Caller::Background, "GET", &key, e)),
            Ok(got) => got,
        };
        let version = Version {
            e_tag: got.meta.e_tag.clone(),
            version: got.meta.version.clone(),
        };
        let bytes = self
            .bounded("GET body", &key, got.bytes())
            .await?
            .map_err(|e| self.err(super::Caller::Background, "GET body", &key, e))?;
        Ok(Some((bytes, version)))
    }

    /// Writes a coordination object: `expect: None` only if it does not
    /// exist, `Some(v)` only if it is still at version `v`. `Ok(None)`:
    /// someone else wrote first.
    pub async fn write_coord(
        &self,
        name: &str,
        body: Bytes,
        expect: Option<Version>,
    ) -> Result<Option<Version>, TierError> {
        let key = self.coord_key(name);
        let mode = match expect {
            None => PutMode::Create,
            Some(v) => PutMode::Update(v),
        };
        let opts = PutOptions {
            mode,
            ..PutOptions::default()
        };
        let put = self.store.put_opts(&key, body.into(), opts);
        match self.bounded("PUT", &key, put).await? {
            Ok(r) => Ok(Some(Version {
                e_tag: r.e_tag,
                version: r.version,
            })),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Ok(None),
            Err(e) => Err(self.err(super::Caller::Background, "PUT", &key, e)),
        }
    }

    /// Overwrites a coordination object this replica alone writes.
    pub async fn put_coord(&self, name: &str, body: Bytes) -> Result<(), TierError> {
        let key = self.coord_key(name);
        self.bounded("PUT", &key, self.store.put(&key, body.into()))
            .await?
            .map(|_| ())
            .map_err(|e| self.err(super::Caller::Background, "PUT", &key, e))
    }

    /// Names (relative to `coord/`) under `coord/<dir>/`.
    pub async fn list_coord(&self, dir: &str) -> Result<Vec<String>, TierError> {
        Ok(self
            .list_coord_dated(dir)
            .await?
            .into_iter()
            .map(|(name, _)| name)
            .collect())
    }

    /// [`list_coord`](Self::list_coord) with each file's last write.
    pub async fn list_coord_dated(
        &self,
        dir: &str,
    ) -> Result<Vec<(String, std::time::SystemTime)>, TierError> {
        let root = self.coord_key("");
        let key = self.coord_key(dir);
        let found = self.list(&key).await?;
        let root = format!("{root}/");
        Ok(found
            .into_iter()
            .filter_map(|m| {
                let name = m.location.as_ref().strip_prefix(&root)?.to_string();
                Some((name, m.last_modified.into()))
            })
            .collect())
    }

    /// Removes a coordination file (relative to `coord/`); absent is fine.
    pub async fn delete_coord(&self, name: &str) -> Result<(), TierError> {
        self.delete_key(&self.coord_key(name)).await
    }

    /// Every blob in the tier.
    pub async fn list_blobs(&self) -> Result<Vec<Listed>, TierError> {
        let found = self.list(&self.under_prefix("blobs/sha256")).await?;
        Ok(found
            .into_iter()
            .filter_map(|m| {
                let hex = m.location.filename()?;
                let digest = Digest::parse(&format!("sha256:{hex}")).ok()?;
                Some(Listed {
                    digest,
                    size: m.size,
                    modified: m.last_modified.into(),
                })
            })
            .collect())
    }

    /// Removes a blob (eviction); absent is fine.
    pub async fn delete(&self, d: &Digest) -> Result<(), TierError> {
        self.delete_key(&self.key(d)).await
    }

    /// Removes a blob an admin purged: its size if it was there. Each call
    /// is bounded by `limit` (an admin waits for the answer); a failure
    /// is counted and marks nothing (a delete that fails says nothing of
    /// whether reads do).
    pub async fn purge(
        &self,
        d: &Digest,
        limit: std::time::Duration,
    ) -> Result<Option<u64>, TierError> {
        let key = self.key(d);
        let caller = super::Caller::Background;
        let size = match self
            .within(caller, limit, "HEAD", &key, self.store.head(&key))
            .await?
        {
            Ok(meta) => Some(meta.size),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => return Err(self.err(caller, "HEAD", &key, e)),
        };
        // Also when HEAD found nothing: an upload may complete in between.
        match self
            .within(caller, limit, "DELETE", &key, self.store.delete(&key))
            .await?
        {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(size),
            Err(e) => Err(self.err(caller, "DELETE", &key, e)),
        }
    }

    async fn delete_key(&self, key: &object_store::path::Path) -> Result<(), TierError> {
        match self.bounded("DELETE", key, self.store.delete(key)).await? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(super::Caller::Background, "DELETE", key, e)),
        }
    }
}

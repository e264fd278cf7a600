//! An S3-compatible bucket as the shared tier: the client built from
//! `storage.s3`, credentials from a mounted Secret, and errors explained
//! in the words a cluster admin needs (which bucket, which cause).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use object_store::aws::{AmazonS3Builder, AwsCredential};
use object_store::{BackoffConfig, ClientOptions, CredentialProvider, RetryConfig};
use pullthrough_api::config::{CredentialSource, SharedStorage};

use super::{SharedTier, TierError};

/// Credential files are re-read at most this often (a rotated Secret is
/// picked up without a restart).
const REREAD: Duration = Duration::from_secs(30);

/// The tier for `storage:`. Installs ring as the process's rustls
/// provider if none is (the S3 client's TLS needs one).
pub fn build_s3(storage: &SharedStorage) -> Result<SharedTier, TierError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let s3 = &storage.s3;
    let mut builder = match s3.credentials.source {
        // Access keys, web identity (IRSA) or the instance role, as the
        // AWS SDKs read them.
        CredentialSource::Env => AmazonS3Builder::from_env(),
        CredentialSource::Files => {
            let dir = s3.credentials.dir.clone().ok_or_else(|| {
                TierError::Config("credentials.dir is required with source: files".into())
            })?;
            // Read once now: a missing file is a config error at start.
            let files = FileCredentials::new(dir);
            files.read()?;
            AmazonS3Builder::new().with_credentials(Arc::new(files))
        }
    };
    let mut client = ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        // Blob bodies stream for as long as they take; a stalled one is
        // caught by the reader's own per-chunk timeout.
        .with_timeout_disabled()
        .with_allow_http(s3.allow_http);
    if let Some(ca) = &s3.ca_file {
        let pem = std::fs::read(ca).map_err(|source| TierError::File {
            path: ca.display().to_string(),
            source,
        })?;
        let certs = object_store::Certificate::from_pem_bundle(&pem)
            .map_err(|e| TierError::Config(format!("caFile {}: {e}", ca.display())))?;
        for cert in certs {
            client = client.with_root_certificate(cert);
        }
    }
    builder = builder
        .with_bucket_name(&s3.bucket)
        .with_region(&s3.region)
        .with_virtual_hosted_style_request(!s3.path_style)
        .with_allow_http(s3.allow_http)
        .with_client_options(client)
        // Few, quick retries: the tier is never worth holding a pull for.
        .with_retry(RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(1),
                base: 2.0,
            },
            max_retries: 2,
            retry_timeout: Duration::from_secs(10),
        });
    if let Some(endpoint) = &s3.endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    let store = builder
        .build()
        .map_err(|e| TierError::Config(e.to_string()))?;
    let location = format!(
        "s3://{}/{}{}",
        s3.bucket,
        s3.prefix.trim_matches('/'),
        s3.endpoint
            .as_deref()
            .map(|e| format!(" at {e}"))
            .unwrap_or_default()
    );
    Ok(SharedTier::new(Arc::new(store), &s3.prefix, location))
}

/// Why an object-store request failed, for the log line: the store's own
/// error code when it names a cause an admin can fix.
pub(super) fn explain(err: &object_store::Error, location: &str) -> String {
    let text = err.to_string();
    let cause = if text.contains("NoSuchBucket") {
        "the bucket does not exist"
    } else if [
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "403 Forbidden",
    ]
    .iter()
    .any(|c| text.contains(c))
    {
        "the credentials were refused"
    } else if ["Connection refused", "error sending request", "connect"]
        .iter()
        .any(|c| text.contains(c))
    {
        "the object store cannot be reached"
    } else {
        return format!("{location}: {text}");
    };
    format!("{location}: {cause} ({text})")
}

/// Whether the store asked this client to slow down: S3's `SlowDown`
/// error code, or a `503`/`429` status (a HEAD's answer has no body to
/// carry the code). The client's own retries are spent by then.
pub(super) fn is_slow_down(err: &object_store::Error) -> bool {
    let text = err.to_string();
    [
        "SlowDown",
        "503 Service Unavailable",
        "429 Too Many Requests",
    ]
    .iter()
    .any(|c| text.contains(c))
}

/// Access keys from the files of a mounted Secret: `accessKeyId`,
/// `secretAccessKey` and optionally `sessionToken`.
#[derive(Debug)]
pub(super) struct FileCredentials {
    dir: PathBuf,
    reread: Duration,
    cached: Mutex<Option<(Instant, Arc<AwsCredential>)>>,
}

impl FileCredentials {
    pub(super) fn new(dir: PathBuf) -> Self {
        Self::rereading(dir, REREAD)
    }

    pub(super) fn rereading(dir: PathBuf, reread: Duration) -> Self {
        Self {
            dir,
            reread,
            cached: Mutex::new(None),
        }
    }

    pub(super) fn read(&self) -> Result<Arc<AwsCredential>, TierError> {
        let file = |name: &str, required: bool| -> Result<Option<String>, TierError> {
            let path = self.dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(s) if !s.trim().is_empty() => Ok(Some(s.trim().to_string())),
                Ok(_) if required => Err(TierError::Config(format!(
                    "credentials file {} is empty",
                    path.display()
                ))),
                Err(e) if required || e.kind() != std::io::ErrorKind::NotFound => {
                    Err(TierError::File {
                        path: path.display().to_string(),
                        source: e,
                    })
                }
                _ => Ok(None),
            }
        };
        let cred = Arc::new(AwsCredential {
            key_id: file("accessKeyId", true)?.unwrap_or_default(),
            secret_key: file("secretAccessKey", true)?.unwrap_or_default(),
            token: file("sessionToken", false)?,
        });
        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), Arc::clone(&cred)));
        Ok(cred)
    }
}

#[async_trait::async_trait]
impl CredentialProvider for FileCredentials {
    type Credential = AwsCredential;

    async fn get_credential(&self) -> object_store::Result<Arc<AwsCredential>> {
        let fresh = self
            .cached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|(at, _)| at.elapsed() < self.reread)
            .map(|(_, c)| Arc::clone(c));
        if let Some(c) = fresh {
            return Ok(c);
        }
        // A rotation caught half-written keeps the last good keys.
        match self.read() {
            Ok(c) => Ok(c),
            Err(e) => {
                let last = self
                    .cached
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                    .map(|(_, c)| Arc::clone(c));
                match last {
                    Some(c) => {
                        tracing::warn!(error = %e, "cannot re-read the S3 credential files; using the last ones read");
                        Ok(c)
                    }
                    None => Err(object_store::Error::Generic {
                        store: "S3",
                        source: Box::new(e),
                    }),
                }
            }
        }
    }
}

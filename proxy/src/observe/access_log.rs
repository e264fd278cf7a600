//! One structured line per proxied request, written when the response body
//! has been sent (or abandoned), so `bytes` and `ms` are the real figures.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use std::sync::Arc;

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use super::labels::{CacheResult, Kind};
use super::metrics::Metrics;
use crate::http::body::Body;

/// The fields of one access-log line.
#[derive(Debug, Clone)]
pub struct Record {
    pub method: String,
    pub host: String,
    pub path: String,
    pub registry: String,
    pub repository: String,
    pub kind: Kind,
    pub reference: String,
    /// Digest served, when known (tags resolve to one).
    pub digest: String,
    pub via: &'static str,
    pub status: u16,
    pub cache: CacheResult,
    pub started: Instant,
    /// The response's Content-Length, when it has one.
    pub expected_bytes: Option<u64>,
}

impl Record {
    pub fn new(method: &str, host: &str, path: &str) -> Self {
        Self {
            method: method.to_string(),
            host: host.to_string(),
            path: path.to_string(),
            registry: String::new(),
            repository: String::new(),
            kind: Kind::Other,
            reference: String::new(),
            digest: String::new(),
            via: "",
            status: 0,
            cache: CacheResult::Pass,
            started: Instant::now(),
            expected_bytes: None,
        }
    }

    fn emit(&self, bytes: u64, complete: bool, metrics: &Metrics) {
        let elapsed = self.started.elapsed();
        metrics.observe_request(
            &self.registry,
            self.kind,
            self.cache,
            !complete || self.status >= 500,
            bytes,
            elapsed.as_secs_f64(),
        );
        tracing::info!(
            target: "pullthrough::access",
            method = %self.method,
            host = %self.host,
            path = %self.path,
            registry = %self.registry,
            repository = %self.repository,
            kind = self.kind.as_str(),
            reference = %self.reference,
            digest = %self.digest,
            via = self.via,
            status = self.status,
            cache = self.cache.as_str(),
            bytes,
            complete,
            ms = elapsed.as_millis() as u64,
            "request"
        );
    }
}

/// Wraps a response body; logs the record once the body ends, fails, or is
/// dropped by a client that went away.
pub struct Logged {
    inner: Body,
    record: Option<Record>,
    metrics: Arc<Metrics>,
    bytes: u64,
    failed: bool,
}

impl Logged {
    pub fn new(inner: Body, record: Record, metrics: Arc<Metrics>) -> Self {
        Self {
            inner,
            record: Some(record),
            metrics,
            bytes: 0,
            failed: false,
        }
    }

    fn finish(&mut self, complete: bool) {
        if let Some(r) = self.record.take() {
            r.emit(self.bytes, complete, &self.metrics);
        }
    }
}

impl HttpBody for Logged {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        let res = Pin::new(&mut this.inner).poll_frame(cx);
        match &res {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                }
            }
            Poll::Ready(Some(Err(_))) => {
                this.failed = true;
                this.finish(false);
            }
            Poll::Ready(None) => this.finish(true),
            Poll::Pending => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        // Bodies that end without a final poll (HEAD, empty) or whose client
        // vanished still get their line. hyper stops polling a body once it
        // has written Content-Length bytes, so the final `None` is often
        // never seen: a body that delivered all its announced bytes is
        // complete too (streamed blobs and cached files were all logged
        // `complete: false` before).
        let all_sent = self
            .record
            .as_ref()
            .and_then(|r| r.expected_bytes)
            .is_some_and(|n| n == self.bytes);
        let complete = !self.failed && (self.inner.is_end_stream() || all_sent);
        self.finish(complete);
    }
}

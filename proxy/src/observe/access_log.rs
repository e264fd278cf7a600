//! One structured line per proxied request, written when the response body
//! has been sent (or abandoned), so `bytes` and `ms` are the real figures.

use std::borrow::Cow;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use std::sync::Arc;

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use super::labels::{CacheResult, Kind};
use super::metrics::Metrics;
use crate::http::body::Body;

/// Longest text field written to an access-log line, in bytes. Clients
/// choose most fields (host, path, repository, reference): a line must not
/// carry whatever megabytes a client puts there. Legal names fit: an OCI
/// repository name with a registry prefix, a tag or a digest are far
/// shorter.
pub const MAX_FIELD: usize = 512;

/// `text` cut to [`MAX_FIELD`] bytes at a character boundary, saying how
/// much was dropped.
pub fn clip(text: &str) -> Cow<'_, str> {
    if text.len() <= MAX_FIELD {
        return Cow::Borrowed(text);
    }
    let mut end = MAX_FIELD;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…(+{} bytes)", &text[..end], text.len() - end))
}

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
    /// The TCP peer of the client's connection (another replica's, for
    /// a request it relayed): whom to look for when a share of the
    /// proxy's maps is flooded, never a header the client sent.
    pub client: Option<std::net::IpAddr>,
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
            client: None,
        }
    }

    fn emit(&self, bytes: u64, complete: bool, metrics: &Metrics) {
        let elapsed = self.started.elapsed();
        metrics.observe_request(
            &self.registry,
            self.kind,
            self.cache,
            // A client that left before its answer is not the proxy's
            // failure (kubelets cancel pulls in every rollout).
            (!complete && self.status != CLIENT_CLOSED) || self.status >= 500,
            bytes,
            elapsed.as_secs_f64(),
        );
        tracing::info!(
            target: "pullthrough::access",
            method = %clip(&self.method),
            client = %self.client.map(|ip| ip.to_string()).unwrap_or_default(),
            host = %clip(&self.host),
            path = %clip(&self.path),
            registry = %clip(&self.registry),
            repository = %clip(&self.repository),
            kind = self.kind.as_str(),
            reference = %clip(&self.reference),
            digest = %clip(&self.digest),
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

/// Status logged for a request whose client went away before it was
/// answered (nginx's "client closed request").
pub const CLIENT_CLOSED: u16 = 499;

/// Holds a request's record until it has a response: a client that goes
/// away while the proxy is still working on it (waiting on the upstream, a
/// lock, a download it joined) makes the server drop the handler, and this
/// guard then writes the line, status [`CLIENT_CLOSED`], so that no request
/// escapes the log.
pub struct Unanswered {
    record: Record,
    metrics: Arc<Metrics>,
    answered: bool,
}

impl Unanswered {
    pub fn new(record: Record, metrics: Arc<Metrics>) -> Self {
        Self {
            record,
            metrics,
            answered: false,
        }
    }

    pub fn record(&mut self) -> &mut Record {
        &mut self.record
    }

    /// The record, for the response's [`Logged`] body to write.
    pub fn answered(mut self) -> Record {
        self.answered = true;
        let blank = Record::new("", "", "");
        std::mem::replace(&mut self.record, blank)
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if !self.answered {
            self.record.status = CLIENT_CLOSED;
            self.record.emit(0, false, &self.metrics);
        }
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

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Mutex;

    use super::*;

    /// Collects what the subscriber writes.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn clip_keeps_short_text_and_cuts_at_a_char_boundary() {
        assert_eq!(clip("library/busybox"), "library/busybox");
        let long = "é".repeat(MAX_FIELD);
        let cut = clip(&long);
        assert!(cut.len() <= MAX_FIELD + 32, "{}", cut.len());
        assert!(cut.ends_with(&format!("…(+{} bytes)", long.len() - MAX_FIELD)));
    }

    /// A client's 100 KB path, host and repository make a line of a few
    /// KB, not hundreds.
    #[test]
    fn log_lines_carry_clipped_fields() {
        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(move || writer.clone())
            .finish();
        let huge = "a".repeat(100_000);
        let mut record = Record::new("GET", &huge, &format!("/v2/{huge}/manifests/1"));
        record.repository = huge.clone();
        record.reference = huge.clone();
        tracing::subscriber::with_default(subscriber, || {
            record.emit(0, true, &Metrics::default());
        });
        let line = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
        assert!(line.contains("\"repository\""), "{line}");
        assert!(line.len() < 8 * MAX_FIELD, "a {} byte line", line.len());
    }
}

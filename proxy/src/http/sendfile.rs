//! Blob HITs on plain HTTP/1 connections sent with `sendfile(2)`: the
//! file's pages go from the page cache to the socket without a copy
//! through user space (what nginx's `sendfile on` does).
//!
//! hyper writes response bodies from buffers and has no way to be handed a
//! file. So a body sent this way is made of *placeholder* frames: slices
//! of one buffer that is never read, each as long as a span of the file,
//! so hyper frames and counts the response as for any body
//! (Content-Length, keep-alive, the access log). Each frame queues its
//! [`Span`] of the file on the connection's [`Sendfile`] handle, and the
//! connection's stream ([`SendfileStream`]), asked to write placeholder
//! bytes, sends the span's bytes from the file instead. This relies on
//! hyper handing body buffers to the stream as they are, which it does with
//! its queued (`writev`) write strategy, set where the connection is built.
//! Every placeholder write is checked against the queued span, position by
//! position: one out of step fails the connection, so a client gets a cut
//! response (which it detects by the length), never wrong bytes.
//!
//! Only plain HTTP/1 gets this: TLS must encrypt in user space, and HTTP/2
//! frames its DATA itself.
//!
//! `sendfile` reads pages that are not in the page cache from the disk
//! right there, on the runtime thread that polls the connection: a HIT of
//! a blob gone from memory (the cache is larger than RAM) or random
//! ranges of large layers would stall every connection of that worker for
//! the disk's latency. So before a span is queued, the pages at its two
//! ends are probed (a one-byte `preadv2` with `RWF_NOWAIT`); a span whose
//! ends are not both in memory is sent as ordinary bytes instead, read as
//! the HTTPS path reads (`body::read_chunk`: from the page cache, the rest
//! on the blocking pool), one chunk at a time, until spans are in memory
//! again (that read brings them in, and the kernel's readahead more).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use super::body::{Body, FILE_CHUNK, read_chunk};

/// Longest placeholder frame: the most one `sendfile` call is asked to send
/// (the kernel sends what the socket buffer takes). nginx's
/// `sendfile_max_chunk` default; 1 MiB measured slower on loopback, 8 MiB
/// no faster.
const PLACEHOLDER_LEN: usize = 2 << 20;

/// The placeholder buffer. Allocated zeroed (untouched pages cost no
/// memory) and never written; its address is what marks placeholder bytes.
fn placeholder() -> &'static [u8] {
    static BUF: OnceLock<&'static [u8]> = OnceLock::new();
    BUF.get_or_init(|| Box::leak(vec![0u8; PLACEHOLDER_LEN].into_boxed_slice()))
}

/// How far into the placeholder buffer `buf` starts, if it lies in it.
fn placeholder_offset(buf: &[u8]) -> Option<usize> {
    let base = placeholder().as_ptr() as usize;
    let at = (buf.as_ptr() as usize).checked_sub(base)?;
    (at < PLACEHOLDER_LEN && !buf.is_empty()).then_some(at)
}

/// A stretch of a file one placeholder frame stands for.
struct Span {
    file: Arc<File>,
    offset: u64,
    len: usize,
    sent: usize,
    /// The body's last span: the connection is uncorked when it is sent.
    last: bool,
}

/// One connection's queue of file spans, shared by its stream and the
/// bodies of its responses (handed to the pipeline as a request extension).
#[derive(Clone)]
pub struct Sendfile {
    spans: Arc<Mutex<VecDeque<Span>>>,
    /// `pullthrough_sendfile_bytes_total`.
    sent: Counter,
    /// `pullthrough_sendfile_cold_bytes_total`: bytes of these bodies read
    /// and sent as ordinary bytes, their pages not being in memory.
    cold: Counter,
}

impl Sendfile {
    pub fn new(sent: Counter, cold: Counter) -> Self {
        Self {
            spans: Arc::default(),
            sent,
            cold,
        }
    }

    /// A body of `len` bytes of `file` from `offset`, sent by this
    /// connection's stream with `sendfile`.
    pub fn body(&self, file: Arc<File>, offset: u64, len: u64) -> Body {
        FileBody {
            spans: self.spans.clone(),
            cold: self.cold.clone(),
            file,
            offset,
            left: len,
            reading: None,
        }
        .boxed_unsync()
    }
}

/// A read of file bytes not in the page cache.
type Reading = Pin<Box<dyn Future<Output = io::Result<Vec<u8>>> + Send>>;

struct FileBody {
    spans: Arc<Mutex<VecDeque<Span>>>,
    cold: Counter,
    file: Arc<File>,
    offset: u64,
    left: u64,
    /// Bytes of a span not in memory, being read (see the module docs).
    reading: Option<Reading>,
}

/// Whether `sendfile` may send the page holding byte `at` of `file`:
/// false only when it is known not to be in the page cache. A kernel or
/// file system without `RWF_NOWAIT` cannot tell, and gets `sendfile` as
/// it did before the probe; a file cut short is left to `sendfile` to
/// report.
fn in_memory(file: &File, at: u64) -> bool {
    let mut byte = [0u8; 1];
    let mut iov = [io::IoSliceMut::new(&mut byte)];
    match rustix::io::preadv2(file, &mut iov, at, rustix::io::ReadWriteFlags::NOWAIT) {
        Ok(_) => true,
        Err(e) => e != rustix::io::Errno::AGAIN,
    }
}

impl hyper::body::Body for FileBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if let Some(reading) = self.reading.as_mut() {
            let read = ready!(reading.as_mut().poll(cx));
            self.reading = None;
            return Poll::Ready(Some(read.map(|buf| {
                self.cold.inc_by(buf.len() as u64);
                self.offset += buf.len() as u64;
                self.left -= buf.len() as u64;
                Frame::data(Bytes::from(buf))
            })));
        }
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let len = self.left.min(PLACEHOLDER_LEN as u64) as usize;
        if !in_memory(&self.file, self.offset)
            || !in_memory(&self.file, self.offset + len as u64 - 1)
        {
            // ≤ FILE_CHUNK, a usize.
            let n = self.left.min(FILE_CHUNK as u64) as usize;
            let (file, at) = (Arc::clone(&self.file), self.offset);
            self.reading = Some(Box::pin(async move { read_chunk(&file, at, n).await }));
            return self.poll_frame(cx);
        }
        let span = Span {
            file: self.file.clone(),
            offset: self.offset,
            len,
            sent: 0,
            last: self.left == len as u64,
        };
        match self.spans.lock() {
            Ok(mut spans) => spans.push_back(span),
            Err(_) => return Poll::Ready(Some(Err(io::Error::other("sendfile queue poisoned")))),
        }
        self.offset += len as u64;
        self.left -= len as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
            &placeholder()[..len],
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0 && self.reading.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

/// Best effort: corking only changes how the bytes are segmented.
fn cork(tcp: &TcpStream, corked: &mut bool, on: bool) {
    match socket2::SockRef::from(tcp).set_tcp_cork(on) {
        Ok(()) => *corked = on,
        Err(e) => tracing::debug!(error = %e, on, "sendfile: TCP_CORK not set"),
    }
}

/// A plain TCP connection whose placeholder writes become `sendfile` calls.
///
/// While a body is sent the socket is corked (`TCP_CORK`, nginx's
/// `tcp_nopush`): the connection has `TCP_NODELAY`, which would otherwise
/// push the odd tail of every `sendfile` call as a short segment of its
/// own, and the reader pays for each segment. The last span uncorks it, so
/// the response's end goes out at once.
pub struct SendfileStream {
    tcp: TcpStream,
    sendfile: Sendfile,
    corked: bool,
}

impl SendfileStream {
    pub fn new(tcp: TcpStream, sendfile: Sendfile) -> Self {
        Self {
            tcp,
            sendfile,
            corked: false,
        }
    }

    /// Ordinary bytes were written. While corked, they are file bytes
    /// sent without `sendfile` (not in memory): the body's end may be
    /// among them, and no last span will uncork the socket, so it is
    /// uncorked now (the next span corks it again).
    fn written_plain(&mut self, written: io::Result<usize>) -> io::Result<usize> {
        if self.corked && written.is_ok() {
            cork(&self.tcp, &mut self.corked, false);
        }
        written
    }

    /// Sends the `want` file bytes that the placeholder bytes from `at`
    /// stand for.
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        at: usize,
        want: usize,
    ) -> Poll<io::Result<usize>> {
        let out_of_step = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "sendfile: placeholder bytes out of step with the queued file spans",
            )
        };
        let mut spans = self
            .sendfile
            .spans
            .lock()
            .map_err(|_| io::Error::other("sendfile queue poisoned"))?;
        let span = spans.front_mut().ok_or_else(out_of_step)?;
        if span.sent != at || want > span.len - span.sent {
            return Poll::Ready(Err(out_of_step()));
        }
        if !self.corked {
            cork(&self.tcp, &mut self.corked, true);
        }
        loop {
            ready!(self.tcp.poll_write_ready(cx))?;
            let mut offset = i64::try_from(span.offset + span.sent as u64)
                .map_err(|_| io::Error::other("sendfile: offset beyond i64"))?;
            let sent = self.tcp.try_io(Interest::WRITABLE, || {
                nix::sys::sendfile::sendfile64(&self.tcp, &*span.file, Some(&mut offset), want)
                    .map_err(io::Error::from)
            });
            match sent {
                Ok(0) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "sendfile: the cached file ended before its size",
                    )));
                }
                Ok(n) => {
                    self.sendfile.sent.inc_by(n as u64);
                    span.sent += n;
                    if span.sent == span.len {
                        let last = span.last;
                        spans.pop_front();
                        if last {
                            cork(&self.tcp, &mut self.corked, false);
                        }
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncRead for SendfileStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for SendfileStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match placeholder_offset(buf) {
            Some(at) => self.poll_send(cx, at, buf.len()),
            None => {
                let written = ready!(Pin::new(&mut self.tcp).poll_write(cx, buf));
                Poll::Ready(self.written_plain(written))
            }
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // Ordinary bytes up to the first placeholder go in one `writev`;
        // a placeholder first goes alone, as one `sendfile`.
        let Some(first) = bufs.iter().position(|b| !b.is_empty()) else {
            return Poll::Ready(Ok(0));
        };
        if let Some(at) = placeholder_offset(&bufs[first]) {
            return self.poll_send(cx, at, bufs[first].len());
        }
        let end = bufs[first..]
            .iter()
            .position(|b| placeholder_offset(b).is_some())
            .map_or(bufs.len(), |i| first + i);
        let written = ready!(Pin::new(&mut self.tcp).poll_write_vectored(cx, &bufs[first..end]));
        Poll::Ready(self.written_plain(written))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::Write;

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Writes `body`'s frames to `stream` as hyper does, and reports
    /// whether the socket was corked after each frame.
    async fn send(stream: &mut SendfileStream, mut body: Body) -> Vec<bool> {
        let mut corked = Vec::new();
        while let Some(frame) = body.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            stream.write_all(&data).await.unwrap();
            corked.push(socket2::SockRef::from(&stream.tcp).tcp_cork().unwrap());
        }
        corked
    }

    /// The file's bytes arrive, corked while the body is under way and
    /// uncorked once its last span is out: left corked, the tail of every
    /// response would wait up to 200 ms in the kernel.
    #[tokio::test]
    async fn a_body_is_sent_corked_and_uncorked_after_its_last_span() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        server.set_nodelay(true).unwrap();

        let bytes: Vec<u8> = (0..2 * PLACEHOLDER_LEN + 12345)
            .map(|i| (i * 7 + i / 4093) as u8)
            .collect();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&bytes).unwrap();

        let (sent, cold) = (Counter::default(), Counter::default());
        let sendfile = Sendfile::new(sent.clone(), cold.clone());
        let mut stream = SendfileStream::new(server, sendfile.clone());
        let want = bytes.len() + 100;
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; want];
            client.read_exact(&mut got).await.unwrap();
            got
        });
        // Two bodies on one connection: a part of the file, then all of it.
        let file = Arc::new(file);
        let body = sendfile.body(Arc::clone(&file), 7, 100);
        assert_eq!(send(&mut stream, body).await, [false]);
        let body = sendfile.body(file, 0, bytes.len() as u64);
        assert_eq!(send(&mut stream, body).await, [true, true, false]);

        let got = reader.await.unwrap();
        assert_eq!(&got[..100], &bytes[7..107]);
        assert!(got[100..] == bytes[..], "the file's bytes, in order");
        assert_eq!(sent.get(), want as u64);
        assert_eq!(cold.get(), 0);
    }

    /// A span whose pages are not in the page cache is not sent with
    /// `sendfile` (which would read the disk on the runtime thread): it is
    /// read and sent as ordinary bytes, the body's end uncorks the socket
    /// all the same, and once the pages are in memory the same file goes
    /// by `sendfile` again. Only the bytes `sendfile` sent are counted.
    #[tokio::test]
    async fn pages_not_in_memory_are_read_not_sent_with_sendfile() {
        use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
        // On the build disk: tmpfs pages are the file, never dropped.
        let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
        std::fs::create_dir_all(&target).unwrap();
        let dir = tempfile::tempdir_in(target).unwrap();
        let tmpfs = nix::sys::statfs::statfs(dir.path())
            .unwrap()
            .filesystem_type()
            == nix::sys::statfs::TMPFS_MAGIC;
        let path = dir.path().join("blob");
        let bytes: Vec<u8> = (0..2 * PLACEHOLDER_LEN + 12345)
            .map(|i| (i * 11 + i / 4091) as u8)
            .collect();
        let mut f = File::create(&path).unwrap();
        f.write_all(&bytes).unwrap();
        f.sync_all().unwrap();
        let file = Arc::new(File::open(&path).unwrap());
        // No readahead: the pages read are exactly those sent.
        posix_fadvise(&*file, 0, 0, PosixFadviseAdvice::POSIX_FADV_RANDOM).unwrap();
        posix_fadvise(&*file, 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED).unwrap();
        // The first span back in memory: sent with `sendfile`, corked;
        // the rest is not.
        let mut first = vec![0u8; PLACEHOLDER_LEN];
        std::os::unix::fs::FileExt::read_exact_at(&*file, &mut first, 0).unwrap();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        server.set_nodelay(true).unwrap();
        let (sent, read) = (Counter::default(), Counter::default());
        let sendfile = Sendfile::new(sent.clone(), read.clone());
        let mut stream = SendfileStream::new(server, sendfile.clone());
        let want = 2 * bytes.len();
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; want];
            client.read_exact(&mut got).await.unwrap();
            got
        });

        let body = sendfile.body(Arc::clone(&file), 0, bytes.len() as u64);
        let corked = send(&mut stream, body).await;
        assert_eq!(corked.first(), Some(&true), "{corked:?}");
        assert_eq!(corked.last(), Some(&false), "left corked: {corked:?}");
        let cold = if tmpfs {
            eprintln!(
                "{} is on tmpfs: only the cached path is tested",
                dir.path().display()
            );
            bytes.len() as u64
        } else {
            assert_eq!(
                sent.get(),
                PLACEHOLDER_LEN as u64,
                "uncached pages sent with sendfile"
            );
            assert_eq!(
                read.get(),
                (bytes.len() - PLACEHOLDER_LEN) as u64,
                "uncached bytes not counted as read"
            );
            PLACEHOLDER_LEN as u64
        };
        // The read brought the rest in.
        let body = sendfile.body(file, 0, bytes.len() as u64);
        assert_eq!(send(&mut stream, body).await, [true, true, false]);
        assert_eq!(sent.get(), cold + bytes.len() as u64, "cached pages");
        assert_eq!(sent.get() + read.get(), 2 * bytes.len() as u64);

        let got = reader.await.unwrap();
        assert!(got[..bytes.len()] == bytes[..], "the uncached send's bytes");
        assert!(got[bytes.len()..] == bytes[..], "the cached send's bytes");
    }

    /// Ordinary bytes never take the sendfile path, and placeholder bytes
    /// with no span queued fail instead of going out as zeros.
    #[tokio::test]
    async fn placeholder_bytes_without_a_span_are_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let sendfile = Sendfile::new(Counter::default(), Counter::default());
        let mut stream = SendfileStream::new(server, sendfile);
        stream.write_all(&[0u8; 64]).await.unwrap();
        let err = stream.write_all(&placeholder()[..64]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}

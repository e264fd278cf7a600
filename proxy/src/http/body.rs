//! Response bodies: whole buffers, cached files (with ranges), and streams
//! fed by a fetch task, all behind one boxed type.

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use tokio::sync::mpsc;

/// Every response body the proxy sends. An `Err` frame aborts the response
/// (connection reset / RST_STREAM), so a client never mistakes a broken
/// transfer for a complete one.
pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Chunk of a file-backed body on a connection that carries one response
/// at a time (HTTP/1): large, for few reads per byte.
pub const FILE_CHUNK: usize = 256 * 1024;

/// Chunk of a file-backed body on an HTTP/2 connection: each of its up to
/// `limits.maxStreamsPerConnection` streams holds about a chunk its client
/// has not read (see `server::H2_SEND_BUFFER`). 128 unread streams of two
/// 256 KiB chunks each held 67 MiB per connection; with 64 KiB chunks it
/// is 13 MiB (`hostile_access.rs::a_layer_on_512_unread_streams_costs_a_bounded_memory`).
/// HTTP/2 cuts data into 16 KiB frames anyway.
pub const MULTIPLEXED_CHUNK: usize = 64 * 1024;

/// Streams `len` bytes of `file` from `offset`, `chunk` bytes at a time:
/// each response holds about one or two chunks while its client does not
/// read, so a small chunk bounds what many slow clients of rarely read,
/// large objects cost.
pub fn file_in_chunks(
    file: std::sync::Arc<std::fs::File>,
    offset: u64,
    len: u64,
    chunk: usize,
) -> Body {
    // Positional reads straight into the chunk handed on: a tokio file
    // would read into a buffer of its own first, one more chunk held (and
    // copied) per response.
    let chunk = chunk.max(1) as u64;
    let stream = futures::stream::try_unfold((offset, len), move |(at, left)| {
        let file = std::sync::Arc::clone(&file);
        async move {
            if left == 0 {
                return Ok(None);
            }
            let n = left.min(chunk);
            // `n` ≤ `chunk`, a usize.
            let buf = read_chunk(&file, at, n as usize).await?;
            Ok(Some((Frame::data(Bytes::from(buf)), (at + n, left - n))))
        }
    });
    StreamBody::new(stream).boxed_unsync()
}

/// `len` bytes of `file` at `at`: from the page cache when it holds them
/// (see [`read_cached`]), the rest by a blocking read.
pub async fn read_chunk(
    file: &std::sync::Arc<std::fs::File>,
    at: u64,
    len: usize,
) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    let cached = read_cached(file, &mut buf, at);
    if cached == len {
        return Ok(buf);
    }
    let file = std::sync::Arc::clone(file);
    tokio::task::spawn_blocking(move || {
        file.read_exact_at(&mut buf[cached..], at + cached as u64)
            .map(|()| buf)
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Reads what the page cache holds of `buf.len()` bytes at `at` without
/// blocking (`preadv2` with `RWF_NOWAIT`); the bytes read, from the start.
/// A hot layer is served this way with no hop to the blocking pool, whose
/// handoff per chunk cost more CPU than the copy itself (HTTP/2 reads
/// small chunks, so it paid it four times as often as HTTP/1). What is
/// not cached, a kernel or file system without `RWF_NOWAIT`, and any
/// error are left to the blocking read, which reports errors.
fn read_cached(file: &std::fs::File, buf: &mut [u8], at: u64) -> usize {
    let mut done = 0;
    while done < buf.len() {
        let mut iov = [std::io::IoSliceMut::new(&mut buf[done..])];
        match rustix::io::preadv2(
            file,
            &mut iov,
            at + done as u64,
            rustix::io::ReadWriteFlags::NOWAIT,
        ) {
            Ok(0) | Err(_) => break,
            Ok(n) => done += n,
        }
    }
    done
}

/// What a fetch task sends a [`channel`] body.
#[derive(Debug)]
pub enum Piece {
    Data(Bytes),
    /// Every byte was sent (and verified): the body may end.
    End,
}

/// A body fed piece by piece from a channel (a fetch task on the other
/// end). It ends only on [`Piece::End`]: a sender dropped without it (its
/// task failed while the channel was full, or panicked) aborts the
/// response, since a body without a Content-Length would otherwise end as
/// cleanly as a complete one.
pub fn channel(mut rx: mpsc::Receiver<std::io::Result<Piece>>) -> Body {
    let mut done = false;
    let stream = futures::stream::poll_fn(move |cx| {
        if done {
            return std::task::Poll::Ready(None);
        }
        let next = match std::task::ready!(rx.poll_recv(cx)) {
            Some(Ok(Piece::Data(data))) => {
                return std::task::Poll::Ready(Some(Ok(Frame::data(data))));
            }
            Some(Ok(Piece::End)) => None,
            Some(Err(err)) => Some(Err(err)),
            None => Some(Err(std::io::Error::other(
                "the transfer stopped before its end",
            ))),
        };
        done = true;
        std::task::Poll::Ready(next)
    });
    StreamBody::new(stream).boxed_unsync()
}

/// A body from a stream of chunks (the shared tier's GET).
pub fn stream<S, E>(chunks: S) -> Body
where
    S: futures::Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    StreamBody::new(chunks.map(|c| c.map(Frame::data).map_err(std::io::Error::other)))
        .boxed_unsync()
}

/// `body` without its first `n` bytes.
pub fn skip(body: Body, n: u64) -> Body {
    let mut left = n;
    body.map_frame(move |frame| match frame.into_data() {
        Ok(mut data) => {
            let cut = left.min(data.len() as u64);
            left -= cut;
            Frame::data(data.split_off(cut as usize))
        }
        Err(frame) => frame,
    })
    .boxed_unsync()
}

/// Relays an upstream body unchanged.
pub fn relay(incoming: hyper::body::Incoming) -> Body {
    incoming.map_err(std::io::Error::other).boxed_unsync()
}

/// `body`, calling `seen` for each of its data frames.
pub fn on_data(body: Body, seen: impl Fn() + Send + 'static) -> Body {
    body.map_frame(move |f| {
        if f.is_data() {
            seen();
        }
        f
    })
    .boxed_unsync()
}

/// Keeps `guard` alive as long as the body (a cache lease).
pub fn hold<T: Send + 'static>(body: Body, guard: T) -> Body {
    body.map_frame(move |f| {
        let _ = &guard;
        f
    })
    .boxed_unsync()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use http_body_util::BodyExt as _;

    use super::*;

    /// A directory on the build disk: tmpfs keeps every page cached, and
    /// the uncached path would never run.
    fn disk_dir() -> tempfile::TempDir {
        let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
        std::fs::create_dir_all(&target).unwrap();
        tempfile::tempdir_in(target).unwrap()
    }

    /// A file in the page cache is read without the blocking pool; one
    /// dropped from it is read by the blocking read; both bodies are the
    /// file's bytes, at any offset and chunk.
    #[tokio::test]
    async fn file_bodies_read_from_the_page_cache_or_the_disk() {
        use std::io::Write as _;
        let dir = disk_dir();
        let path = dir.path().join("blob");
        let data: Vec<u8> = (0..3 * 1024 * 1024 + 17)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        let file = std::fs::File::open(&path).unwrap();

        let mut buf = vec![0u8; 65536];
        assert_eq!(read_cached(&file, &mut buf, 4096), buf.len(), "cached file");
        assert_eq!(buf, data[4096..4096 + 65536]);
        let mut tail = vec![0u8; 100];
        assert_eq!(read_cached(&file, &mut tail, data.len() as u64 - 17), 17);

        nix::fcntl::posix_fadvise(
            &file,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();
        // tmpfs pages are the file itself: fadvise drops nothing there, so
        // the blocking path cannot be reached (nor is it in production).
        let tmpfs = nix::sys::statfs::statfs(dir.path())
            .unwrap()
            .filesystem_type()
            == nix::sys::statfs::TMPFS_MAGIC;
        let mut cold = vec![0u8; 65536];
        if tmpfs {
            eprintln!(
                "{} is on tmpfs: only the page-cache path is tested",
                dir.path().display()
            );
        } else {
            assert!(
                read_cached(&file, &mut cold, 1 << 20) < cold.len(),
                "pages dropped from the cache were read without waiting"
            );
        }
        for (offset, len, chunk) in [
            (0, data.len(), MULTIPLEXED_CHUNK),
            (12345, 2_000_000, FILE_CHUNK),
        ] {
            nix::fcntl::posix_fadvise(
                &file,
                0,
                0,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            )
            .unwrap();
            let file = std::sync::Arc::new(std::fs::File::open(&path).unwrap());
            let body = file_in_chunks(file, offset as u64, len as u64, chunk);
            let got = body.collect().await.unwrap().to_bytes();
            assert!(got[..] == data[offset..offset + len], "offset {offset}");
        }
    }
}

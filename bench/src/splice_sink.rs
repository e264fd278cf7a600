//! A plain HTTP/1.1 reader that costs almost nothing per byte: after the
//! response head, the body goes socket → pipe → `/dev/null` with
//! `splice(2)`, never copied into user space.
//!
//! The hyper load generator copies every byte it receives, and on a
//! 2-core machine that copy, not either server, sets the plain-HTTP HIT
//! rate (both servers keep the socket full). With this reader the
//! servers' own cost per byte decides.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, SpliceFFlags, fcntl, splice};

use crate::Res;

/// The most one `splice` moves (the pipe is grown to this size).
const CHUNK: usize = 1 << 20;

pub struct Spliced {
    pub status: u16,
    /// The response head, lower-cased, for header checks.
    pub head: String,
    pub bytes: u64,
    /// From the request written to the body's last byte.
    pub elapsed: Duration,
}

impl Spliced {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim())
        })
    }
}

/// GETs `path` from `addr` on a fresh connection.
pub fn get(addr: SocketAddr, path: &str) -> Res<Spliced> {
    let mut tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(crate::targets::TRANSFER_TIMEOUT))?;
    let started = Instant::now();
    write!(tcp, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")?;

    // The head, and whatever part of the body came with it.
    let mut buf = vec![0u8; 64 * 1024];
    let mut have = 0;
    let end = loop {
        let n = tcp.read(&mut buf[have..])?;
        if n == 0 {
            return Err(format!("{addr}{path}: closed before the response head").into());
        }
        have += n;
        if let Some(i) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if have == buf.len() {
            return Err(format!("{addr}{path}: response head over 64 KiB").into());
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{addr}{path}: no status in {head:?}"))?;
    let mut r = Spliced {
        status,
        bytes: (have - end) as u64,
        elapsed: Duration::ZERO,
        head,
    };
    let length: u64 = r
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("{addr}{path}: no Content-Length"))?;

    let (pipe_r, pipe_w) = nix::unistd::pipe()?;
    fcntl(&pipe_w, FcntlArg::F_SETPIPE_SZ(CHUNK as i32))?;
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_MORE;
    while r.bytes < length {
        let want = CHUNK.min((length - r.bytes) as usize);
        let n = splice(&tcp, None, &pipe_w, None, want, flags)?;
        if n == 0 {
            return Err(format!("{addr}{path}: closed after {} of {length} bytes", r.bytes).into());
        }
        let mut drained = 0;
        while drained < n {
            match splice(&pipe_r, None, &null, None, n - drained, flags)? {
                0 => return Err("splice to /dev/null moved nothing".into()),
                m => drained += m,
            }
        }
        r.bytes += n as u64;
    }
    r.elapsed = started.elapsed();
    Ok(r)
}

//! A TCP relay on loopback in front of an upstream, to shape what the
//! proxy gets from it: a rate limit (an upstream slower than the machine,
//! as the internet is) and a hold (stop passing bytes at a precise point of
//! a download until the test says so, instead of racing a fast upstream).
//!
//! ```no_run
//! # use pullthrough_testbed::relay::Relay;
//! # let upstream: std::net::SocketAddr = "127.0.0.1:5000".parse().unwrap();
//! let relay = Relay::start(upstream).unwrap();
//! relay.hold_after(4 << 20); // the first 4 MiB pass, then nothing
//! // ... point the proxy at relay.addr, start a download, act ...
//! relay.release();
//! relay.set_rate(16 << 20); // 16 MiB/s from now on
//! ```
//!
//! Both apply to the upstream → client bytes of all connections together
//! (one shared link, like a real uplink). The relay runs on a thread and
//! single-threaded runtime of its own, so a load generator's runtime does
//! not schedule it; dropping it closes the listener and every connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::error::{IoContext, Result};

/// Bytes the bucket holds at most: bursts stay short next to the rate.
const BURST: f64 = 256.0 * 1024.0;
/// Read size of the relay (per connection and direction).
const CHUNK: usize = 64 * 1024;

/// A running relay; see the module docs.
pub struct Relay {
    /// Where clients connect instead of the upstream.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("addr", &self.addr).finish()
    }
}

/// What the connections share with the test.
struct Shared {
    /// Bytes per second, 0 = unlimited.
    rate: AtomicU64,
    bucket: Mutex<Bucket>,
    /// Upstream → client bytes passed so far, all connections together.
    passed: AtomicU64,
    /// Once `passed` reaches this, bytes wait for `open`.
    hold_after: AtomicU64,
    open: tokio::sync::watch::Sender<bool>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Relay {
    /// A relay on a free 127.0.0.1 port to `target`, passing everything.
    pub fn start(target: SocketAddr) -> Result<Self> {
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").ctx(|| "binding the relay".into())?;
        std_listener
            .set_nonblocking(true)
            .ctx(|| "making the relay listener non-blocking".into())?;
        let addr = std_listener.local_addr().ctx(|| "relay address".into())?;
        let shared = Arc::new(Shared {
            rate: AtomicU64::new(0),
            bucket: Mutex::new(Bucket {
                tokens: BURST,
                at: Instant::now(),
            }),
            passed: AtomicU64::new(0),
            hold_after: AtomicU64::new(u64::MAX),
            open: tokio::sync::watch::Sender::new(true),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ctx(|| "building the relay runtime".into())?;
        let (sh, s) = (Arc::clone(&shared), Arc::clone(&stop));
        let thread = std::thread::Builder::new()
            .name("relay".into())
            .spawn(move || {
                rt.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(std_listener) else {
                        return;
                    };
                    while !s.load(Ordering::Relaxed) {
                        let accepted =
                            tokio::time::timeout(Duration::from_millis(100), listener.accept())
                                .await;
                        let Ok(Ok((client, _))) = accepted else {
                            continue;
                        };
                        let shared = Arc::clone(&sh);
                        tokio::spawn(async move {
                            if let Ok(up) = TcpStream::connect(target).await {
                                let _ = client.set_nodelay(true);
                                let _ = up.set_nodelay(true);
                                pipe(client, up, shared).await;
                            }
                        });
                    }
                });
            })
            .ctx(|| "starting the relay thread".into())?;
        Ok(Self {
            addr,
            shared,
            stop,
            thread: Some(thread),
        })
    }

    /// Sets the upstream → client rate in bytes per second (0 = unlimited).
    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.shared.rate.store(bytes_per_sec, Ordering::Relaxed);
    }

    /// Holds upstream → client bytes once `bytes` of them have passed in
    /// all (counted from the start), until [`Relay::release`].
    pub fn hold_after(&self, bytes: u64) {
        self.shared.open.send_replace(false);
        self.shared.hold_after.store(bytes, Ordering::SeqCst);
    }

    /// Lets held bytes, and all after them, pass.
    pub fn release(&self) {
        self.shared.hold_after.store(u64::MAX, Ordering::SeqCst);
        self.shared.open.send_replace(true);
    }

    /// Upstream → client bytes passed so far.
    pub fn passed(&self) -> u64 {
        self.shared.passed.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn pipe(client: TcpStream, up: TcpStream, shared: Arc<Shared>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = up.into_split();
    let requests = async {
        let _ = tokio::io::copy(&mut cr, &mut uw).await;
        let _ = uw.shutdown().await;
    };
    let responses = async {
        let mut open = shared.open.subscribe();
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match ur.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let before = shared.passed.fetch_add(n as u64, Ordering::SeqCst);
            if before >= shared.hold_after.load(Ordering::SeqCst)
                && open.wait_for(|open| *open).await.is_err()
            {
                break;
            }
            take(&shared, n).await;
            if cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = cw.shutdown().await;
    };
    tokio::join!(requests, responses);
}

/// Waits until `n` bytes may pass at the current rate.
async fn take(shared: &Shared, n: usize) {
    loop {
        let r = shared.rate.load(Ordering::Relaxed) as f64;
        if r == 0.0 {
            return;
        }
        let wait = {
            let mut b = shared.bucket.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * r).min(BURST);
            b.at = now;
            if b.tokens >= n as f64 {
                b.tokens -= n as f64;
                return;
            }
            (n as f64 - b.tokens) / r
        };
        tokio::time::sleep(Duration::from_secs_f64(wait)).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::http::Get;
    use crate::stub::Stub;

    #[test]
    fn holds_until_released_then_limits_the_rate() {
        let body = vec![7u8; 1 << 20];
        let stub = Stub::canned()
            .respond(
                "/b",
                http::StatusCode::OK,
                "application/octet-stream",
                body.clone(),
            )
            .start()
            .unwrap();
        let relay = Relay::start(stub.addr()).unwrap();
        relay.hold_after(0);
        let url = format!("http://{}/b", relay.addr);
        let held = {
            let url = url.clone();
            std::thread::spawn(move || Get::new(&url).send())
        };
        crate::net::wait_for("bytes at the relay", Duration::from_secs(10), || {
            Ok(relay.passed() > 0)
        })
        .unwrap();
        assert!(!held.is_finished(), "the response passed a hold");
        relay.release();
        assert_eq!(held.join().unwrap().unwrap().body.len(), body.len());
        // 1 MiB at 2 MiB/s, less the 256 KiB burst: at least 0.375 s.
        relay.set_rate(2 << 20);
        let start = Instant::now();
        assert_eq!(Get::new(&url).send().unwrap().body.len(), body.len());
        assert!(
            start.elapsed() >= Duration::from_millis(350),
            "{:?}",
            start.elapsed()
        );
    }
}

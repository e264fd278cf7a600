//! A throttling TCP relay in front of the upstream, so the MISS figures can
//! be taken with an upstream slower than the machine (as the internet is),
//! for pullthrough and nginx alike.
//!
//! Both proxies reach the upstream through it for the whole run; the rate
//! is changed between phases (0 = unlimited: a plain copy). It runs on its
//! own thread and single-threaded runtime, so the load generator's runtime
//! does not schedule it. One token bucket limits the upstream → proxy bytes
//! of all connections together: one shared link, like a real uplink.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::Res;

/// Bytes the bucket holds at most: bursts stay short next to the rate.
const BURST: f64 = 256.0 * 1024.0;
/// Read size of the relay (per connection and direction).
const CHUNK: usize = 64 * 1024;

pub struct Relay {
    pub addr: SocketAddr,
    /// Bytes per second, 0 = unlimited.
    rate: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Relay {
    pub fn start(target: SocketAddr) -> Res<Self> {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let rate = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (r, s) = (Arc::clone(&rate), Arc::clone(&stop));
        let thread = std::thread::Builder::new()
            .name("bench-relay".into())
            .spawn(move || {
                rt.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(std_listener) else {
                        return;
                    };
                    let bucket = Arc::new(Mutex::new(Bucket {
                        tokens: BURST,
                        at: Instant::now(),
                    }));
                    while !s.load(Ordering::Relaxed) {
                        let accepted =
                            tokio::time::timeout(Duration::from_millis(100), listener.accept())
                                .await;
                        let Ok(Ok((client, _))) = accepted else {
                            continue;
                        };
                        let (rate, bucket) = (Arc::clone(&r), Arc::clone(&bucket));
                        tokio::spawn(async move {
                            if let Ok(up) = TcpStream::connect(target).await {
                                let _ = client.set_nodelay(true);
                                let _ = up.set_nodelay(true);
                                pipe(client, up, rate, bucket).await;
                            }
                        });
                    }
                });
            })?;
        Ok(Self {
            addr,
            rate,
            stop,
            thread: Some(thread),
        })
    }

    /// Sets the upstream → proxy rate in bytes per second (0 = unlimited).
    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.rate.store(bytes_per_sec, Ordering::Relaxed);
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

async fn pipe(client: TcpStream, up: TcpStream, rate: Arc<AtomicU64>, bucket: Arc<Mutex<Bucket>>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = up.into_split();
    let requests = async {
        let _ = tokio::io::copy(&mut cr, &mut uw).await;
        let _ = uw.shutdown().await;
    };
    let responses = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match ur.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            take(&rate, &bucket, n).await;
            if cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = cw.shutdown().await;
    };
    tokio::join!(requests, responses);
}

/// Waits until `n` bytes may pass at the current rate.
async fn take(rate: &AtomicU64, bucket: &Mutex<Bucket>, n: usize) {
    loop {
        let r = rate.load(Ordering::Relaxed) as f64;
        if r == 0.0 {
            return;
        }
        let wait = {
            let mut b = bucket.lock().unwrap_or_else(|p| p.into_inner());
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

//! Loopback addresses, free ports and condition polling.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};

/// A port nobody listens on right now on `ip` (the kernel picks it).
pub fn free_port_on(ip: IpAddr) -> Result<u16> {
    let l = TcpListener::bind((ip, 0)).ctx(|| format!("binding a free port on {ip}"))?;
    Ok(l.local_addr().ctx(|| "reading a bound port".into())?.port())
}

/// A free port on 127.0.0.1.
pub fn free_port() -> Result<u16> {
    free_port_on(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

/// A loopback address of its own (127.0.0.N, N in 2..=254, unique within this
/// process; the pid spreads parallel test binaries apart) so tests that need
/// a fixed port such as :443 can run side by side.
pub fn unique_loopback_ip() -> Ipv4Addr {
    static NEXT: AtomicU8 = AtomicU8::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let pid_part = (std::process::id() % 50) as u8;
    // 127.<pid>.<n>.1 keeps processes and calls apart without a shared registry.
    Ipv4Addr::new(127, 100 + pid_part, n, 1)
}

/// Asserts that `addr` is loopback (the test bed never serves elsewhere).
pub fn assert_loopback(addr: SocketAddr) -> Result<()> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(Error::Other(format!("{addr} is not a loopback address")))
    }
}

/// True when something accepts TCP connections on `addr`.
pub fn is_listening(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Polls `check` until it returns `Ok(true)`, an error, or `timeout` passes.
/// The interval grows from 10 ms to 200 ms so quick conditions resolve
/// quickly without spinning on slow ones.
pub fn wait_for(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let start = Instant::now();
    let mut interval = Duration::from_millis(10);
    loop {
        if check()? {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(Error::Timeout {
                what: what.to_string(),
                secs: timeout.as_secs_f64(),
                detail: String::new(),
            });
        }
        std::thread::sleep(interval);
        interval = (interval * 2).min(Duration::from_millis(200));
    }
}

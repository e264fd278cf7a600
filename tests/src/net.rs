//! Loopback addresses, free ports and condition polling.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Ports handed out come from below the kernel's ephemeral range
/// (`ip_local_port_range`, 32768–60999 by default). A port the kernel picks
/// for `bind(0)` is from that range, and so is the local port of every
/// outgoing connection: between "found free" and "bound by the server"
/// any connection the tests open could take it. Below the range only
/// another explicit bind can.
const PORT_FIRST: u16 = 20_000;
const PORT_LAST: u16 = 32_000;

/// A port nobody listens on right now on `ip`, outside the ephemeral range.
/// Each call moves on from where the last one stopped (and each process
/// starts at a pid-derived offset), so parallel tests in one or several
/// test binaries do not pick the same port.
pub fn free_port_on(ip: IpAddr) -> Result<u16> {
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = u32::from(PORT_LAST - PORT_FIRST);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(2_654_435_761)) % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let port = PORT_FIRST + offset as u16;
        if TcpListener::bind((ip, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(Error::Other(format!(
        "no free port on {ip} in {PORT_FIRST}..{PORT_LAST}"
    )))
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

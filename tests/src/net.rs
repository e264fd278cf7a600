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
    free_port_with_partner_on(ip, 0)
}

/// A port `p` such that both `p` and `p + partner` are free on `ip`, both
/// outside the ephemeral range: for servers that derive a second listener
/// from the first (SeaweedFS serves gRPC on its HTTP port + 10000).
/// `partner == 0` asks for one port.
pub fn free_port_with_partner_on(ip: IpAddr, partner: u16) -> Result<u16> {
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = u32::from(PORT_LAST - PORT_FIRST);
    if u32::from(partner) >= span {
        return Err(Error::Other(format!(
            "no port pair (p, p+{partner}) fits in {PORT_FIRST}..{PORT_LAST}"
        )));
    }
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(2_654_435_761)) % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    let free = |port: u16| TcpListener::bind((ip, port)).is_ok();
    for _ in 0..span {
        // Offsets past `span - partner` would put the partner at or above
        // PORT_LAST: skipped, so the counter stays shared with single ports.
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % span;
        if offset + u32::from(partner) >= span {
            continue;
        }
        let port = PORT_FIRST + offset as u16;
        if free(port) && (partner == 0 || free(port + partner)) {
            return Ok(port);
        }
    }
    Err(Error::Other(format!(
        "no free port (with p+{partner} free too) on {ip} in {PORT_FIRST}..{PORT_LAST}"
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

/// The TCP addresses process `pid` listens on (IPv4 and IPv6), read from
/// `/proc`: its socket inodes matched against the LISTEN entries of its
/// network namespace. For asserting that a server binds loopback only.
pub fn listening_tcp(pid: u32) -> Result<Vec<SocketAddr>> {
    let fd_dir = format!("/proc/{pid}/fd");
    let mut inodes = std::collections::HashSet::new();
    let entries =
        std::fs::read_dir(&fd_dir).map_err(|e| Error::Other(format!("reading {fd_dir}: {e}")))?;
    for entry in entries.flatten() {
        // Fds closed while we read are skipped.
        if let Ok(target) = std::fs::read_link(entry.path())
            && let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
        {
            inodes.insert(inode.to_string());
        }
    }
    let mut addrs = Vec::new();
    for table in ["tcp", "tcp6"] {
        let path = format!("/proc/{pid}/net/{table}");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::Other(format!("reading {path}: {e}")))?;
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let (Some(local), Some(state), Some(inode)) = (cols.get(1), cols.get(3), cols.get(9))
            else {
                continue;
            };
            // 0A: TCP_LISTEN.
            if *state != "0A" || !inodes.contains(*inode) {
                continue;
            }
            addrs
                .push(parse_proc_addr(local).ok_or_else(|| {
                    Error::Other(format!("unexpected address {local} in {path}"))
                })?);
        }
    }
    Ok(addrs)
}

/// `0100007F:5208` (IPv4) or 32 hex digits `:PORT` (IPv6) as the kernel
/// prints them in `/proc/net/tcp*`: the address as native-endian 32-bit
/// words, the port as a plain hex number.
fn parse_proc_addr(text: &str) -> Option<SocketAddr> {
    let (ip_hex, port_hex) = text.split_once(':')?;
    let port = u16::from_str_radix(port_hex, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for i in (0..ip_hex.len()).step_by(8) {
        let word = u32::from_str_radix(ip_hex.get(i..i + 8)?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = match bytes.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_addresses_parse() {
        #[cfg(target_endian = "little")]
        {
            assert_eq!(
                parse_proc_addr("0100007F:5208"),
                Some("127.0.0.1:21000".parse().unwrap())
            );
            assert_eq!(
                parse_proc_addr("00000000000000000000000001000000:0050"),
                Some("[::1]:80".parse().unwrap())
            );
        }
        assert_eq!(parse_proc_addr("zz:1"), None);
    }

    #[test]
    fn a_port_with_a_partner_leaves_both_free_and_below_the_ephemeral_range() {
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        for _ in 0..50 {
            let p = free_port_with_partner_on(lo, 10_000).unwrap();
            assert!((PORT_FIRST..PORT_LAST - 10_000).contains(&p), "{p}");
            assert!(TcpListener::bind((lo, p + 10_000)).is_ok());
        }
    }

    #[test]
    fn the_listeners_of_this_process_are_found() {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = l.local_addr().unwrap();
        let found = listening_tcp(std::process::id()).unwrap();
        assert!(found.contains(&addr), "{addr} not in {found:?}");
    }
}

//! The proxy resolves upstream names by DNS, never from `/etc/hosts` (on a
//! node the hosts file may point registry names back at the proxy itself).
//!
//! The real proxy binary runs in a network namespace of the test's own and
//! a private mount namespace whose `/etc/hosts` maps the upstream's name to
//! a canary address and whose `/etc/resolv.conf` names the namespace's own
//! 127.0.0.1, where the test answers DNS with the real upstream's address.
//! Nothing can leave the machine: the namespace has loopback only, so even
//! a query to the machine's real nameserver would have no route.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::File;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use nix::sched::CloneFlags;
use pullthrough_testbed::http::Get;
use pullthrough_testbed::ns::{self, MountNs, NetNs, write_hosts_file};
use pullthrough_testbed::process::Process;
use pullthrough_testbed::proxy::Addrs;
use pullthrough_testbed::registry::{Flavour, Registry, RegistryOpts};

const NAME: &str = "upstream.test";
/// Where the hosts file says [`NAME`] is: a listener that only counts.
const CANARY: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 9);

/// Runs `f` on a thread of its own inside the network namespace `netns`:
/// sockets it creates (and threads and processes it starts) live there,
/// and stay there when used from other threads.
fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{netns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let fd = File::open(&path).unwrap();
            nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

/// A DNS server on a UDP socket: `A` for [`NAME`] is `answer`, other types
/// for it are empty, every other name is NXDOMAIN. Records each question.
struct Dns {
    asked: Arc<Mutex<Vec<(String, RecordType)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Dns {
    fn serve(socket: UdpSocket, answer: Ipv4Addr) -> Self {
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (asked, stop) = (asked.clone(), stop.clone());
            move || {
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let (n, from) = match socket.recv_from(&mut buf) {
                        Ok(got) => got,
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                        {
                            continue;
                        }
                        Err(e) => panic!("DNS socket: {e}"),
                    };
                    let Ok(query) = Message::from_vec(&buf[..n]) else {
                        continue;
                    };
                    let reply = Self::reply(&query, answer, &asked);
                    let _ = socket.send_to(&reply.to_vec().unwrap(), from);
                }
            }
        });
        Self {
            asked,
            stop,
            thread: Some(thread),
        }
    }

    fn reply(
        query: &Message,
        answer: Ipv4Addr,
        asked: &Mutex<Vec<(String, RecordType)>>,
    ) -> Message {
        let mut reply = Message::new();
        reply
            .set_id(query.id())
            .set_message_type(MessageType::Response)
            .set_op_code(query.op_code())
            .set_authoritative(true)
            .set_recursion_desired(query.recursion_desired())
            .set_recursion_available(true)
            .add_queries(query.queries().to_vec());
        let mut known = false;
        for q in query.queries() {
            let name = q
                .name()
                .to_ascii()
                .trim_end_matches('.')
                .to_ascii_lowercase();
            asked.lock().unwrap().push((name.clone(), q.query_type()));
            if name == NAME {
                known = true;
                if q.query_type() == RecordType::A {
                    reply.add_answer(Record::from_rdata(
                        q.name().clone(),
                        60,
                        RData::A(A(answer)),
                    ));
                }
            }
        }
        reply.set_response_code(if known {
            ResponseCode::NoError
        } else {
            ResponseCode::NXDomain
        });
        reply
    }

    fn asked(&self) -> Vec<(String, RecordType)> {
        self.asked.lock().unwrap().clone()
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Accepts connections and counts them (closing each at once).
struct Canary {
    hits: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Canary {
    fn serve(listener: TcpListener) -> Self {
        listener.set_nonblocking(true).unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (hits, stop) = (hits.clone(), stop.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok(_) => {
                            hits.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        Err(e) => panic!("canary listener: {e}"),
                    }
                }
            }
        });
        Self {
            hits,
            stop,
            thread: Some(thread),
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The proxy is configured with `http://upstream.test:PORT`; the hosts file
/// it sees says upstream.test is the canary, DNS says it is the registry.
/// A blob pulled through the proxy must come from the registry, after a
/// DNS question for upstream.test, with the canary never connected to.
#[test]
fn upstream_names_resolve_by_dns_never_from_the_hosts_file() {
    let mut started = common::Started::default();
    {
        let netns = NetNs::create(&[]).unwrap();
        started.netns(netns.name());

        // The real upstream on the namespace's loopback.
        let mut ropts = RegistryOpts::new(Flavour::Plain);
        ropts.netns = Some(netns.name().to_string());
        let up = common::upstream(Registry::start(ropts).unwrap());
        let up_addr = up.registry.addr();
        let IpAddr::V4(up_ip) = up_addr.ip() else {
            panic!("registry on {up_addr}")
        };
        assert!(up_ip.is_loopback() && up_ip != CANARY);
        started
            .pid("docker-registry", up.registry.pid())
            .dir(up.registry.dir());

        // DNS on the namespace's 127.0.0.1:53; the canary on the very port
        // the upstream URL names, at the hosts file's address.
        let (dns_socket, canary_listener) = in_netns(netns.name(), || {
            (
                UdpSocket::bind((Ipv4Addr::LOCALHOST, 53)).unwrap(),
                TcpListener::bind(SocketAddr::new(CANARY.into(), up_addr.port())).unwrap(),
            )
        });
        let dns = Dns::serve(dns_socket, up_ip);
        let canary = Canary::serve(canary_listener);

        let dir = tempfile::Builder::new()
            .prefix("pt-resolver-")
            .tempdir()
            .unwrap();
        started.dir(dir.path());
        let hosts = dir.path().join("hosts");
        write_hosts_file(&hosts, &[(NAME, IpAddr::V4(CANARY))]).unwrap();
        let resolv = dir.path().join("resolv.conf");
        std::fs::write(
            &resolv,
            "nameserver 127.0.0.1\noptions timeout:2 attempts:2\n",
        )
        .unwrap();

        // A fresh namespace has nothing bound but the registry: ports free
        // here, other than its own, will do.
        let mut ports = vec![up_addr.port()];
        while ports.len() < 4 {
            let p = pullthrough_testbed::net::free_port().unwrap();
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
        let lo = |port| SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
        let addrs = Addrs {
            http: lo(ports[1]),
            https: lo(ports[2]),
            admin: lo(ports[3]),
        };
        let data = dir.path().join("data");
        let config = dir.path().join("config.yaml");
        std::fs::write(
            &config,
            format!(
                "listen: {{http: \"{}\", https: \"{}\", admin: \"{}\"}}\ndataDir: {}\n{}",
                addrs.http,
                addrs.https,
                addrs.admin,
                data.display(),
                common::one_registry(NAME, &format!("http://{NAME}:{}", up_addr.port()), ""),
            ),
        )
        .unwrap();
        let mut cmd = MountNs::new()
            .hosts(&hosts)
            .bind(&resolv, "/etc/resolv.conf")
            .in_netns(netns.name())
            .command(
                common::proxy_bin(),
                [
                    "--config".as_ref(),
                    config.as_os_str(),
                    "--reload-interval".as_ref(),
                    "200ms".as_ref(),
                ],
            )
            .unwrap();
        cmd.env("RUST_LOG", "info");
        let mut proxy =
            Process::spawn("pullthrough-proxy", cmd, dir.path().join("proxy.log")).unwrap();
        started.pid("pullthrough-proxy", proxy.pid());
        let readyz = format!("http://{}/readyz", addrs.admin);
        proxy
            .wait_ready("pullthrough-proxy /readyz", Duration::from_secs(30), || {
                Ok(ns::netns_http_status(netns.name(), &readyz) == Some(200))
            })
            .unwrap();

        // The proxy does see the private files: the hosts file would send
        // upstream.test to the canary, and DNS is only the test's own.
        let root = format!("/proc/{}/root/etc", proxy.pid());
        let seen_hosts = std::fs::read_to_string(format!("{root}/hosts")).unwrap();
        assert!(
            seen_hosts.contains(&format!("{CANARY} {NAME}")),
            "{seen_hosts}"
        );
        let seen_resolv = std::fs::read_to_string(format!("{root}/resolv.conf")).unwrap();
        assert!(
            seen_resolv.starts_with("nameserver 127.0.0.1\n"),
            "{seen_resolv}"
        );

        // A blob through the proxy, asked from inside the namespace.
        let layer = up.busybox.layer_digests()[0].clone();
        let url = format!(
            "http://{}/v2/fixture/busybox/blobs/{layer}?ns={NAME}",
            addrs.http
        );
        let got = in_netns(netns.name(), || {
            Get::new(&url).timeout(Duration::from_secs(30)).send()
        });
        let log = || proxy.log_tail(6000);
        let got = got.unwrap_or_else(|e| panic!("{e}; proxy log:\n{}", log()));
        assert!(
            got.status.is_success(),
            "status {}; canary hits {}; DNS asked {:?}; proxy log:\n{}",
            got.status,
            canary.hits(),
            dns.asked(),
            log()
        );
        pullthrough_testbed::fixtures::verify_digest(&got.body, &layer).unwrap();

        // It came from the registry DNS named, after a DNS question...
        // (Its access log line may trail the response by a moment.)
        let blob_path = format!("/v2/fixture/busybox/blobs/{layer}");
        pullthrough_testbed::net::wait_for(
            "the registry to log the blob request",
            Duration::from_secs(10),
            || Ok(up.registry.count_requests("GET", &blob_path) >= 1),
        )
        .unwrap_or_else(|e| panic!("{e}; proxy log:\n{}", log()));
        assert!(
            dns.asked().contains(&(NAME.to_string(), RecordType::A)),
            "no DNS question for {NAME}: {:?}",
            dns.asked()
        );
        // ...and never from the hosts file's address.
        assert_eq!(
            canary.hits(),
            0,
            "the proxy connected to {CANARY}, the hosts file's address for {NAME}; proxy log:\n{}",
            log()
        );

        proxy.stop().unwrap();
        drop(canary);
        drop(dns);
        drop(up);
        drop(netns);
    }
    started.assert_all_gone();
}

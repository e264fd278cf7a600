//! A hostile upstream against the real proxy binary: blob redirects and
//! token realms that point into the cluster (another loopback address, a
//! name that resolves to loopback, the proxy's own admin port, the cloud
//! metadata address) are refused before any connection, unless the
//! registry opts in with `allowPrivateNetworks` (never for the proxy's own
//! listeners); an https upstream cannot redirect to http; presigned
//! query strings stay out of the proxy's log and error bodies; wrong bytes
//! are never served whole, also when nothing is cached. The upstream is the test bed's stub; "inside" services
//! are bare listeners whose accept queue shows whether anything connected
//! (the kernel completes a handshake even before `accept`).
//!
//! Loopback only: 169.254.169.254 is named in a Location but the proxy
//! refuses it before connecting, so no packet leaves the machine.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;

use http::StatusCode;
use pullthrough_testbed::fixtures::{Image, LayoutBuilder, verify_digest};
use pullthrough_testbed::http::{Get, Response};
use pullthrough_testbed::ns::Tmpfs;
use pullthrough_testbed::proxy::{Addrs, Proxy};
use pullthrough_testbed::stub::{Stub, StubAuth};

/// Stands for a presigned URL's signature: must never be logged or echoed.
const SECRET: &str = "PRESIGNED-SIGNATURE-0xC0FFEE";

fn proxy_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_pullthrough-proxy"))
}

fn busybox(dir: &Path) -> Image {
    LayoutBuilder::new(&dir.join("layout"))
        .unwrap()
        .busybox("1")
        .unwrap()
}

/// The proxy on `addrs` serving `upstream` as `hostile.test`, with `extra`
/// keys for the registry entry and `top` keys for the config.
fn start_proxy(addrs: Addrs, upstream: &str, top: &str, extra: &str) -> Proxy {
    let config =
        format!("{top}registries:\n  - host: hostile.test\n    upstream: {upstream}\n{extra}");
    Proxy::start(proxy_bin(), addrs, &config).unwrap()
}

fn get_blob(proxy: &Proxy, digest: &str) -> Response {
    let url = format!(
        "{}/v2/fixture/busybox/blobs/{digest}?ns=hostile.test",
        proxy.http_url()
    );
    Get::new(&url).send().unwrap()
}

/// A listener standing for a service inside the cluster; `touched` says
/// whether anyone connected (queued connections count).
struct Inside(TcpListener);

impl Inside {
    fn on(ip: IpAddr) -> Self {
        let l = TcpListener::bind((ip, 0)).unwrap();
        l.set_nonblocking(true).unwrap();
        Self(l)
    }

    fn addr(&self) -> SocketAddr {
        self.0.local_addr().unwrap()
    }

    fn touched(&self) -> bool {
        self.0.accept().is_ok()
    }
}

/// Asserts the proxy refused with a clear error, echoing no signature.
fn assert_refused(resp: &Response, proxy: &Proxy, want: &str) {
    let body = String::from_utf8_lossy(&resp.body);
    assert_eq!(resp.status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(body.contains("refused") && body.contains(want), "{body}");
    assert!(body.contains("nothing was sent"), "{body}");
    assert!(!body.contains(SECRET), "signature echoed: {body}");
    assert!(!proxy.log().contains(SECRET), "signature logged");
}

/// Blob redirects to another loopback address, to a name the config pins
/// to loopback, to the proxy's own admin port and to the metadata address:
/// each refused before connecting, nothing fetched, nothing cached.
#[test]
fn redirects_into_the_cluster_are_refused_before_connecting() {
    let work = tempfile::tempdir().unwrap();
    let image = busybox(work.path());
    let layer = image.layer_digests()[0].clone();
    let inside = Inside::on(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
    let pinned = Inside::on(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let addrs = Addrs::localhost().unwrap();
    let cases = [
        (format!("http://{}", inside.addr()), "a loopback address"),
        (
            format!("http://inside.test:{}", pinned.addr().port()),
            "a loopback address",
        ),
        (
            format!("http://{}", addrs.admin),
            "the proxy's own listeners",
        ),
        ("http://169.254.169.254".to_string(), "a link-local address"),
    ];
    let top = "resolve: {inside.test: 127.0.0.1}\n";
    for (target, reason) in cases {
        let stub = Stub::builder(&image.layout)
            .redirect_blobs_to_url(&format!(
                "{target}/blobs/{{digest}}?X-Amz-Signature={SECRET}"
            ))
            .start()
            .unwrap();
        let proxy = start_proxy(addrs, &stub.url(), top, "");
        let resp = get_blob(&proxy, &layer);
        assert_refused(&resp, &proxy, reason);
        assert_eq!(stub.count("GET", &layer), 1, "{target}");
        assert!(!proxy.cached_blob_path(&layer).exists(), "{target}: cached");
    }
    assert!(!inside.touched(), "127.0.0.2 was connected to");
    assert!(
        !pinned.touched(),
        "the pinned loopback name was connected to"
    );
}

/// With `allowPrivateNetworks: true` the loopback redirect is followed
/// (the blob verifies) — the signature still stays out of the log — but
/// the proxy's own admin port stays refused; a failing opted-in hop's
/// error names the URL without its query.
#[test]
fn opted_in_loopback_redirects_work_but_never_to_the_proxy_itself() {
    let work = tempfile::tempdir().unwrap();
    let image = busybox(work.path());
    let layer = image.layer_digests()[0].clone();
    let storage = Stub::builder(&image.layout)
        .ip(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)))
        .start()
        .unwrap();
    let opt_in = "    allowPrivateNetworks: true\n";
    let addrs = Addrs::localhost().unwrap();

    let to_storage = format!(
        "{}/v2/fixture/busybox/blobs/{{digest}}?X-Amz-Signature={SECRET}",
        storage.url()
    );
    let stub = Stub::builder(&image.layout)
        .redirect_blobs_to_url(&to_storage)
        .start()
        .unwrap();
    let proxy = start_proxy(addrs, &stub.url(), "", opt_in);
    let resp = get_blob(&proxy, &layer);
    assert_eq!(resp.status, StatusCode::OK);
    verify_digest(&resp.body, &layer).unwrap();
    assert_eq!(storage.count("GET", SECRET), 1);
    assert!(!proxy.log().contains(SECRET), "signature logged");
    drop(proxy);

    let stub = Stub::builder(&image.layout)
        .redirect_blobs_to_url(&format!(
            "http://{}/metrics?X-Amz-Signature={SECRET}",
            addrs.admin
        ))
        .start()
        .unwrap();
    let proxy = start_proxy(addrs, &stub.url(), "", opt_in);
    assert_refused(
        &get_blob(&proxy, &layer),
        &proxy,
        "the proxy's own listeners",
    );
    drop(proxy);

    // A closed port: the connect error names the URL, not its signature.
    let closed = Inside::on(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
    let closed_addr = closed.addr();
    drop(closed);
    let stub = Stub::builder(&image.layout)
        .redirect_blobs_to_url(&format!(
            "http://{closed_addr}/blobs/{{digest}}?X-Amz-Signature={SECRET}"
        ))
        .start()
        .unwrap();
    let proxy = start_proxy(addrs, &stub.url(), "", opt_in);
    let resp = get_blob(&proxy, &layer);
    let body = String::from_utf8_lossy(&resp.body);
    assert_eq!(resp.status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(body.contains(&closed_addr.to_string()), "{body}");
    assert!(!body.contains(SECRET), "signature echoed: {body}");
    assert!(!proxy.log().contains(SECRET), "signature logged");
}

/// A reload that moves a listener (which takes effect only after a
/// restart) leaves the proxy's bound listeners guarded: a redirect to the
/// admin port the proxy still listens on stays refused. Before, the
/// reloaded `listen` addresses were taken as the proxy's own, and the real
/// admin port was open to an `allowPrivateNetworks` registry's redirects.
#[test]
fn a_reload_moving_a_listener_leaves_the_bound_one_guarded() {
    let work = tempfile::tempdir().unwrap();
    let image = busybox(work.path());
    let layer = image.layer_digests()[0].clone();
    let addrs = Addrs::localhost().unwrap();
    let stub = Stub::builder(&image.layout)
        .redirect_blobs_to_url(&format!(
            "http://{}/metrics?X-Amz-Signature={SECRET}",
            addrs.admin
        ))
        .start()
        .unwrap();
    let body = format!(
        "registries:\n  - host: hostile.test\n    upstream: {}\n    allowPrivateNetworks: true\n",
        stub.url()
    );
    let proxy = Proxy::start(proxy_bin(), addrs, &body).unwrap();
    let moved = Addrs::localhost().unwrap();
    let text = format!(
        "listen: {{http: \"{}\", https: \"{}\", admin: \"{}\"}}\ndataDir: {}\n{body}",
        addrs.http,
        addrs.https,
        moved.admin,
        proxy.data_dir().display(),
    );
    let path = proxy.config_path();
    std::fs::write(path.with_extension("tmp"), text).unwrap();
    std::fs::rename(path.with_extension("tmp"), &path).unwrap();
    pullthrough_testbed::net::wait_for("the reload", std::time::Duration::from_secs(10), || {
        Ok(proxy.log().contains("listen addresses changed"))
    })
    .unwrap();
    pullthrough_testbed::net::wait_for(
        "the reload applied",
        std::time::Duration::from_secs(10),
        || Ok(proxy.log().contains("config applied")),
    )
    .unwrap();
    assert_refused(
        &get_blob(&proxy, &layer),
        &proxy,
        "the proxy's own listeners",
    );
}

/// A Bearer challenge naming a realm on a private address: the proxy does
/// not fetch an anonymous token there (the client gets the upstream's 401),
/// and with a `credentialsFile` the password is not sent there either.
#[test]
fn token_realms_on_private_addresses_are_not_asked() {
    let work = tempfile::tempdir().unwrap();
    let image = busybox(work.path());
    let realm = Inside::on(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
    let stub = Stub::builder(&image.layout)
        .auth(StubAuth::bearer("stub", "good"))
        .realm(&format!("http://{}/token", realm.addr()))
        .start()
        .unwrap();
    let creds = work.path().join("creds.json");
    std::fs::write(&creds, r#"{"username":"bot","password":"pw"}"#).unwrap();
    for extra in [
        String::new(),
        format!("    credentialsFile: {}\n", creds.display()),
    ] {
        let proxy = start_proxy(Addrs::localhost().unwrap(), &stub.url(), "", &extra);
        let url = format!(
            "{}/v2/fixture/busybox/manifests/1?ns=hostile.test",
            proxy.http_url()
        );
        let resp = Get::new(&url).send().unwrap();
        let body = String::from_utf8_lossy(&resp.body);
        assert!(
            matches!(resp.status.as_u16(), 401 | 502),
            "{}: {body}",
            resp.status
        );
        if resp.status == StatusCode::BAD_GATEWAY {
            assert!(
                body.contains("authHosts") || body.contains("refused"),
                "{body}"
            );
        }
        assert!(!realm.touched(), "the private realm was connected to");
        assert_eq!(stub.count("GET", "/token"), 0);
    }
}

/// Wrong bytes from the upstream while nothing can be cached (the data
/// dir is a 1 MiB tmpfs: every blob passes through uncached): no client
/// gets the whole body with status 200, neither a plain GET nor a ranged
/// one the upstream answers with the whole blob; the transfers are logged
/// incomplete. With the upstream fixed, the same pass-through delivers.
#[test]
fn corrupt_bytes_are_never_served_whole_when_nothing_is_cached() {
    let work = tempfile::tempdir().unwrap();
    let image = busybox(work.path());
    let layer = image.layer_digests()[0].clone();
    let size = std::fs::metadata(image.blob_path(&layer)).unwrap().len();
    assert!(
        size > 64 * 1024,
        "the layer should not fit the disk's slack"
    );
    let stub = Stub::builder(&image.layout)
        .corrupt(&layer)
        .start()
        .unwrap();
    let mut proxy = start_proxy(Addrs::localhost().unwrap(), &stub.url(), "", "");
    proxy.stop().unwrap();
    let data = proxy.data_dir();
    std::fs::remove_dir_all(&data).unwrap();
    let mount = Tmpfs::mount(&data, "1m").unwrap();
    proxy.start_again().unwrap();
    let url = format!(
        "{}/v2/fixture/busybox/blobs/{layer}?ns=hostile.test",
        proxy.http_url()
    );
    for range in [None, Some("bytes=0-")] {
        let mut get = Get::new(&url);
        if let Some(r) = range {
            get = get.header("range", r);
        }
        match get.send() {
            Err(_) => {}
            Ok(resp) => assert!(
                resp.status != StatusCode::OK || (resp.body.len() as u64) < size,
                "{range:?}: got {} of {size} bytes with status {}",
                resp.body.len(),
                resp.status
            ),
        }
    }
    pullthrough_testbed::net::wait_for(
        "two incomplete transfers logged",
        std::time::Duration::from_secs(10),
        || {
            Ok(proxy
                .access_matching(&[("digest", &layer), ("complete", "false")])
                .len()
                >= 2)
        },
    )
    .unwrap();
    assert!(
        !proxy
            .access_matching(&[("digest", &layer), ("cache", "PASS")])
            .is_empty(),
        "not a pass-through: {}",
        proxy.log()
    );

    stub.set_corrupt(&layer, false);
    let resp = Get::new(&url).send().unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    verify_digest(&resp.body, &layer).unwrap();
    proxy.stop().unwrap();
    drop(mount);
}

/// A TLS front for a plain upstream: terminates TLS on 127.0.0.1 with a
/// self-signed certificate for that address and relays the bytes to
/// `target`. Returns its address and the certificate (PEM, a caBundle).
fn tls_front(target: SocketAddr) -> (SocketAddr, String, tokio::runtime::Runtime) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST))];
    let cert = params.self_signed(&key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let Ok(mut plain) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    (addr, cert.pem(), rt)
}

/// An https upstream redirecting a blob to plain http is refused before
/// anything is fetched over http, even with `allowPrivateNetworks` (the
/// target is loopback): a downgrade is refused on its own.
#[test]
fn https_to_http_redirects_are_refused() {
    let work = tempfile::tempdir().unwrap();
    let image = busybox(work.path());
    let layer = image.layer_digests()[0].clone();
    let plain = Stub::builder(&image.layout)
        .ip(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)))
        .start()
        .unwrap();
    let stub = Stub::builder(&image.layout)
        .redirect_blobs_to_url(&format!(
            "{}/v2/fixture/busybox/blobs/{{digest}}?X-Amz-Signature={SECRET}",
            plain.url()
        ))
        .start()
        .unwrap();
    let (front, pem, _rt) = tls_front(stub.addr());
    let ca = work.path().join("front.pem");
    std::fs::write(&ca, pem).unwrap();
    let extra = format!(
        "    caBundle: {}\n    allowPrivateNetworks: true\n",
        ca.display()
    );
    let proxy = start_proxy(
        Addrs::localhost().unwrap(),
        &format!("https://{front}"),
        "",
        &extra,
    );
    let resp = get_blob(&proxy, &layer);
    let body = String::from_utf8_lossy(&resp.body);
    assert_eq!(resp.status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(
        body.contains("plain http") && body.contains("refused"),
        "{body}"
    );
    assert!(!body.contains(SECRET), "signature echoed: {body}");
    assert!(!proxy.log().contains(SECRET), "signature logged");
    assert_eq!(stub.count("GET", &layer), 1, "the https upstream was asked");
    assert!(plain.requests().is_empty(), "fetched over http");
}

//! Tests of the upstream client against loopback registries and
//! scripted servers: TLS trust, pins, redirects, timeouts.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use pullthrough_testbed::fixtures::{Image, LayoutBuilder, sha256_digest};
use pullthrough_testbed::registry::Registry;

use super::redirect::{Origin, resolve_location};
use super::*;
use crate::test_util::{routed, routed_tls};

// --- helpers -----------------------------------------------------------

fn config(yaml: &str) -> ProxyConfig {
    ProxyConfig::from_yaml(yaml).unwrap()
}

/// A config with one registry `host` at `upstream`, plus `extra` keys
/// for the registry entry (indented YAML lines).
fn one_registry(host: &str, upstream: &str, extra: &str) -> ProxyConfig {
    config(&format!(
        "upstreamTimeouts: {{connect: 3s, read: 10s}}\n\
         registries:\n  - host: \"{host}\"\n    upstream: \"{upstream}\"\n{extra}"
    ))
}

/// Runs blocking test-bed code (it starts its own runtime for HTTP
/// probes) off the test's runtime.
fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(f).join().unwrap()
}

fn start_registry(tls: bool) -> Registry {
    blocking(move || {
        if tls {
            Registry::tls().unwrap()
        } else {
            Registry::plain().unwrap()
        }
    })
}

fn image_in(registry: &Registry, dir: &Path) -> Image {
    let mut layout = LayoutBuilder::new(dir).unwrap();
    let image = layout.random("v1", &[2048], 7).unwrap();
    image.push(registry, "team/app", "v1").unwrap();
    image
}

async fn get_manifest(
    client: &UpstreamClient,
    base: &str,
    image: &Image,
) -> Result<(StatusCode, http::Version, Bytes), UpstreamError> {
    let mut headers = HeaderMap::new();
    headers.insert(header::ACCEPT, image.media_type.parse().unwrap());
    let url: Uri = format!("{base}/v2/team/app/manifests/v1").parse().unwrap();
    let got = client.send(Method::GET, url, headers).await?;
    let status = got.response.status();
    let version = got.response.version();
    let body = got.response.into_body().collect().await.unwrap().to_bytes();
    Ok((status, version, body))
}

fn redirect(status: u16, location: &str) -> Response<Bytes> {
    Response::builder()
        .status(status)
        .header(header::LOCATION, location)
        .body(Bytes::from_static(b"moved"))
        .unwrap()
}

fn ok(body: &'static [u8]) -> Response<Bytes> {
    Response::new(Bytes::from_static(body))
}

fn not_found() -> Response<Bytes> {
    Response::builder().status(404).body(Bytes::new()).unwrap()
}

/// A second loopback address for a "different host", if the kernel
/// lets us bind it (Linux routes all of 127/8 to lo).
async fn other_loopback() -> IpAddr {
    let candidate = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    match tokio::net::TcpListener::bind((candidate, 0)).await {
        Ok(_) => candidate,
        Err(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
    }
}

// --- real registries ---------------------------------------------------

#[tokio::test]
async fn upstream_plain_registry_manifest() {
    let registry = start_registry(false);
    let dir = tempfile::tempdir().unwrap();
    let image = image_in(&registry, dir.path());
    let upstreams = Upstreams::new(&one_registry(&registry.host(), &registry.url(), "")).unwrap();
    let client = upstreams.client(&registry.host()).unwrap();
    let (status, _, body) = get_manifest(client, &registry.url(), &image).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sha256_digest(&body), image.digest);
    assert!(upstreams.client("unknown.example").is_none());
}

#[tokio::test]
async fn upstream_tls_registry_trust_settings() {
    let registry = start_registry(true);
    let dir = tempfile::tempdir().unwrap();
    let image = image_in(&registry, dir.path());
    let host = registry.host();
    let url = registry.url();

    // caBundle trusted: works, over HTTP/2 via ALPN.
    let ca = dir.path().join("extra-roots.pem");
    std::fs::write(&ca, registry.ca_pem().unwrap()).unwrap();
    let extra = format!("    caBundle: \"{}\"\n", ca.display());
    let upstreams = Upstreams::new(&one_registry(&host, &url, &extra)).unwrap();
    let client = upstreams.client(&host).unwrap();
    let (status, version, body) = get_manifest(client, &url, &image).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sha256_digest(&body), image.digest);
    assert_eq!(version, http::Version::HTTP_2, "ALPN should pick h2");

    // Webpki roots only: the test CA is an unknown issuer.
    let upstreams = Upstreams::new(&one_registry(&host, &url, "")).unwrap();
    let err = get_manifest(upstreams.client(&host).unwrap(), &url, &image)
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Tls { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("UnknownIssuer"), "{text}");
    assert!(text.contains(&host), "{text}");

    // insecureSkipVerify: works without the CA.
    let upstreams =
        Upstreams::new(&one_registry(&host, &url, "    insecureSkipVerify: true\n")).unwrap();
    let (status, _, body) = get_manifest(upstreams.client(&host).unwrap(), &url, &image)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sha256_digest(&body), image.digest);
}

#[tokio::test]
async fn upstream_resolve_map_pins_names() {
    let registry = start_registry(false);
    let port = registry.addr().port();
    let url = format!("http://upstream.test:{port}");
    let config = config(&format!(
        "resolve: {{upstream.test: 127.0.0.1}}\n\
         registries:\n  - host: upstream.test\n    upstream: \"{url}\"\n"
    ));
    let upstreams = Upstreams::new(&config).unwrap();
    let client = upstreams.client("upstream.test").unwrap();
    let got = client
        .send(
            Method::GET,
            format!("{url}/v2/").parse().unwrap(),
            HeaderMap::new(),
        )
        .await
        .unwrap();
    assert_eq!(got.response.status(), StatusCode::OK);
    assert_eq!(got.hops, 0);
    assert!(registry.count_requests("GET", "/v2/") >= 1);
}

#[tokio::test]
async fn upstream_refused_connection_is_an_error_not_a_hang() {
    let mut registry = start_registry(false);
    let (host, url) = (registry.host(), registry.url());
    registry.stop().unwrap();
    let upstreams = Upstreams::new(&one_registry(&host, &url, "")).unwrap();
    let started = Instant::now();
    let err = upstreams
        .client(&host)
        .unwrap()
        .send(
            Method::GET,
            format!("{url}/v2/").parse().unwrap(),
            HeaderMap::new(),
        )
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(matches!(err, UpstreamError::Connect { .. }), "{err}");
    assert!(err.to_string().contains(&host), "{err}");
}

// --- config errors -----------------------------------------------------

#[test]
fn upstream_ca_bundle_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing-roots.pem");
    let extra = format!("    caBundle: \"{}\"\n", missing.display());
    let err = Upstreams::new(&one_registry("quay.io", "https://quay.io", &extra))
        .err()
        .unwrap();
    assert!(matches!(err, UpstreamError::CaBundleRead { .. }), "{err}");
    assert!(err.to_string().contains("missing-roots.pem"), "{err}");

    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let extra = format!("    caBundle: \"{}\"\n", junk.display());
    let err = Upstreams::new(&one_registry("quay.io", "https://quay.io", &extra))
        .err()
        .unwrap();
    assert!(
        matches!(err, UpstreamError::CaBundleInvalid { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("junk.pem"), "{err}");
}

// --- redirects ---------------------------------------------------------

/// GETs `/v2/` of a registry at `http://<addr>` through its own client.
async fn get_root(upstreams: &Upstreams, host: &str, url: &str) -> Result<u16, UpstreamError> {
    let client = upstreams.client(host).unwrap();
    let mut headers = HeaderMap::new();
    headers.insert(header::AUTHORIZATION, "Bearer secret".parse().unwrap());
    let got = client
        .send(Method::GET, url.parse().unwrap(), headers)
        .await?;
    Ok(got.response.status().as_u16())
}

/// Redirects the upstream chooses into loopback (by IP or by a name that
/// resolves there), link-local (cloud metadata) or the proxy's own
/// listener are refused before connecting, and the error names the rule
/// but not the presigned query; the opt-in lets the loopback one through,
/// never the proxy's own listener.
#[tokio::test]
async fn redirects_into_private_networks_are_refused_before_connecting() {
    let inside_ip = other_loopback().await;
    let inside = routed(inside_ip, |_| ok(b"internal"));
    let inside_port = inside.addr().port();
    let own = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let own_addr = own.local_addr().unwrap();
    let targets = [
        format!("http://{inside_ip}:{inside_port}/x?X-Amz-Signature=s3cr3t"),
        format!("http://inside.test:{inside_port}/x?X-Amz-Signature=s3cr3t"),
        "http://169.254.169.254/latest/meta-data/?X-Amz-Signature=s3cr3t".to_string(),
        format!("http://{own_addr}/metrics?X-Amz-Signature=s3cr3t"),
    ];
    for (i, target) in targets.iter().enumerate() {
        let to = target.clone();
        let registry = routed(IpAddr::V4(Ipv4Addr::LOCALHOST), move |_| redirect(307, &to));
        let host = registry.addr().to_string();
        let url = format!("http://{host}/v2/");
        for opt_in in [false, true] {
            let extra = if opt_in {
                "    allowPrivateNetworks: true\n"
            } else {
                ""
            };
            let config = config(&format!(
                "upstreamTimeouts: {{connect: 3s, read: 10s}}\n\
                 listen: {{admin: \"{own_addr}\"}}\n\
                 resolve: {{inside.test: {inside_ip}}}\n\
                 registries:\n  - host: \"{host}\"\n    upstream: \"http://{host}\"\n{extra}"
            ));
            let upstreams = Upstreams::new(&config).unwrap();
            let result = get_root(&upstreams, &host, &url).await;
            if opt_in && i < 2 {
                assert_eq!(result.unwrap(), 200, "{target} with the opt-in");
                continue;
            }
            if opt_in && i == 2 {
                // Never connect to 169.254.x from a test, not even opted in.
                continue;
            }
            let err = result.unwrap_err();
            assert!(
                matches!(err, UpstreamError::Refused { .. }),
                "{target}: {err}"
            );
            let text = err.to_string();
            assert!(!text.contains("s3cr3t"), "{text}");
            assert!(text.contains("nothing was sent"), "{text}");
        }
    }
    // Only the two opted-in fetches reached the inside server.
    assert_eq!(inside.requests().len(), 2);
    // The proxy's own listener never saw a connection.
    let accepted = tokio::time::timeout(Duration::from_millis(50), own.accept()).await;
    assert!(
        accepted.is_err(),
        "the proxy's own listener was connected to"
    );
}

/// An https upstream redirecting to plain http is refused, before
/// anything is sent over http; an http upstream may redirect to http.
#[tokio::test]
async fn https_to_http_redirects_are_refused() {
    let plain = routed(IpAddr::V4(Ipv4Addr::LOCALHOST), |_| ok(b"plain"));
    let to = format!("http://{}/blob", plain.addr());
    let (secure, pem) = routed_tls(IpAddr::V4(Ipv4Addr::LOCALHOST), move |_| redirect(302, &to));
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, pem).unwrap();
    let host = secure.addr().to_string();
    let config = one_registry(
        &host,
        &format!("https://{host}"),
        &format!("    caBundle: \"{}\"\n", ca.display()),
    );
    let upstreams = Upstreams::new(&config).unwrap();
    let err = get_root(&upstreams, &host, &format!("https://{host}/v2/"))
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Downgrade { .. }), "{err}");
    assert_eq!(secure.requests().len(), 1);
    assert!(plain.requests().is_empty(), "the http target was fetched");
}

#[tokio::test]
async fn upstream_redirects_across_hosts_drop_credentials() {
    let blob_ip = other_loopback().await;
    // Second host: 302 with a relative Location to itself, then bytes.
    let storage = routed(blob_ip, |s| {
        let path = s.path.as_str();
        if path.starts_with("/storage/v2/blobs/abc") {
            redirect(302, "../real/abc?sig=2")
        } else if path == "/storage/v2/real/abc?sig=2" {
            ok(b"the blob bytes")
        } else {
            not_found()
        }
    });
    let storage_port = storage.addr().port();
    // First host: 307 with an absolute Location to the second.
    let registry = routed(IpAddr::V4(Ipv4Addr::LOCALHOST), move |_| {
        redirect(
            307,
            &format!("http://blobs.test:{storage_port}/storage/v2/blobs/abc?sig=1"),
        )
    });

    // Storage on loopback: a private address the upstream chose.
    let config = config(&format!(
        "resolve: {{blobs.test: {blob_ip}}}\n\
         registries:\n  - host: \"{0}\"\n    upstream: \"http://{0}\"\n    \
         allowPrivateNetworks: true\n",
        registry.addr()
    ));
    let upstreams = Upstreams::new(&config).unwrap();
    let client = upstreams.client(&registry.addr().to_string()).unwrap();
    let mut headers = HeaderMap::new();
    headers.insert(header::AUTHORIZATION, "Bearer secret".parse().unwrap());
    headers.insert(header::COOKIE, "session=1".parse().unwrap());
    headers.insert("x-trace", "kept".parse().unwrap());
    headers.insert(header::HOST, "spoofed.example".parse().unwrap());
    let url: Uri = format!("http://{}/v2/team/app/blobs/sha256:abc", registry.addr())
        .parse()
        .unwrap();
    let got = client.send(Method::GET, url, headers).await.unwrap();
    assert_eq!(got.hops, 2);
    assert_eq!(got.response.status(), StatusCode::OK);
    assert_eq!(
        got.final_url.to_string(),
        format!("http://blobs.test:{storage_port}/storage/v2/real/abc?sig=2")
    );
    let body = got.response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"the blob bytes");

    let first = registry.requests();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].headers[header::AUTHORIZATION], "Bearer secret");
    assert_eq!(first[0].headers[header::COOKIE], "session=1");
    assert_eq!(
        first[0].headers[header::HOST],
        registry.addr().to_string().as_str()
    );

    let second = storage.requests();
    assert_eq!(second.len(), 2);
    for seen in &second {
        assert!(
            !seen.headers.contains_key(header::AUTHORIZATION),
            "{seen:?}"
        );
        assert!(!seen.headers.contains_key(header::COOKIE), "{seen:?}");
        assert_eq!(seen.headers["x-trace"], "kept");
        assert_eq!(
            seen.headers[header::HOST],
            format!("blobs.test:{storage_port}").as_str()
        );
    }
}

#[tokio::test]
async fn upstream_redirect_loop_is_too_many_redirects() {
    let server = routed(IpAddr::V4(Ipv4Addr::LOCALHOST), |_| redirect(302, "/loop"));
    let host = server.addr().to_string();
    let upstreams = Upstreams::new(&one_registry(&host, &format!("http://{host}"), "")).unwrap();
    let started = Instant::now();
    let err = upstreams
        .client(&host)
        .unwrap()
        .send(
            Method::GET,
            format!("http://{host}/start").parse().unwrap(),
            HeaderMap::new(),
        )
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, UpstreamError::TooManyRedirects { .. }),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // The original request plus 5 followed hops.
    assert_eq!(server.requests().len(), 1 + usize::from(MAX_REDIRECTS));
}

#[tokio::test]
async fn upstream_see_other_turns_post_into_get_and_keeps_head() {
    let server = routed(IpAddr::V4(Ipv4Addr::LOCALHOST), |s| {
        let path = s.path.as_str();
        if path == "/result" {
            ok(b"result")
        } else {
            redirect(303, "/result")
        }
    });
    let host = server.addr().to_string();
    let upstreams = Upstreams::new(&one_registry(&host, &format!("http://{host}"), "")).unwrap();
    let client = upstreams.client(&host).unwrap();

    let url: Uri = format!("http://{host}/submit").parse().unwrap();
    let got = client
        .send(Method::POST, url.clone(), HeaderMap::new())
        .await
        .unwrap();
    assert_eq!(got.hops, 1);
    let body = got.response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"result");

    let got = client
        .send(Method::HEAD, url, HeaderMap::new())
        .await
        .unwrap();
    assert_eq!(got.response.status(), StatusCode::OK);

    let methods: Vec<(Method, String)> = server
        .requests()
        .into_iter()
        .map(|s| (s.method, s.path))
        .collect();
    assert_eq!(
        methods,
        vec![
            (Method::POST, "/submit".to_string()),
            (Method::GET, "/result".to_string()),
            (Method::HEAD, "/submit".to_string()),
            (Method::HEAD, "/result".to_string()),
        ]
    );
}

#[tokio::test]
async fn upstream_bad_redirect_and_header_timeout() {
    let server = routed(IpAddr::V4(Ipv4Addr::LOCALHOST), |_| {
        redirect(302, "ftp://elsewhere/x")
    });
    let host = server.addr().to_string();
    let upstreams = Upstreams::new(&one_registry(&host, &format!("http://{host}"), "")).unwrap();
    let err = upstreams
        .client(&host)
        .unwrap()
        .send(
            Method::GET,
            format!("http://{host}/x").parse().unwrap(),
            HeaderMap::new(),
        )
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&err, UpstreamError::BadRedirect { location, .. } if location == "ftp://elsewhere/x"),
        "{err}"
    );

    // Accepts, never answers: bounded by the read timeout.
    let (addr, hold) = crate::test_util::silent_listener().await;
    let config = config(&format!(
        "upstreamTimeouts: {{connect: 1s, read: 300ms}}\n\
         registries:\n  - host: \"{addr}\"\n    upstream: \"http://{addr}\"\n"
    ));
    let upstreams = Upstreams::new(&config).unwrap();
    let started = Instant::now();
    let err = upstreams
        .client(&addr.to_string())
        .unwrap()
        .send(
            Method::GET,
            format!("http://{addr}/v2/").parse().unwrap(),
            HeaderMap::new(),
        )
        .await
        .err()
        .unwrap();
    assert!(matches!(err, UpstreamError::Timeout { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
    hold.abort();
}

// --- units -------------------------------------------------------------

#[test]
fn upstream_locations_resolve_like_rfc_3986() {
    let base: Uri = "https://reg.example:5000/v2/a/blobs/sha256:1?x=1"
        .parse()
        .unwrap();
    let cases = [
        ("https://cdn.example/b?sig=1", "https://cdn.example/b?sig=1"),
        ("//cdn.example/b", "https://cdn.example/b"),
        ("/real/path", "https://reg.example:5000/real/path"),
        ("../blobs/x", "https://reg.example:5000/v2/a/blobs/x"),
        ("../../b", "https://reg.example:5000/v2/b"),
        ("x?y=2", "https://reg.example:5000/v2/a/blobs/x?y=2"),
        ("./", "https://reg.example:5000/v2/a/blobs/"),
        ("../../..", "https://reg.example:5000/"),
        ("?q=3", "https://reg.example:5000/v2/a/blobs/sha256:1?q=3"),
        ("/p#frag", "https://reg.example:5000/p"),
        // Host names are case-insensitive; the url crate lowercases them.
        ("HTTP://Other.example:8080/z", "http://other.example:8080/z"),
        // Spaces are percent-encoded, as browsers do.
        ("/with space", "https://reg.example:5000/with%20space"),
    ];
    for (location, want) in cases {
        let got = resolve_location(&base, location)
            .unwrap_or_else(|| panic!("{location} did not resolve"));
        assert_eq!(got.to_string(), want, "{location}");
    }
    for bad in ["ftp://x/y", "", "http://"] {
        assert!(resolve_location(&base, bad).is_none(), "{bad:?}");
    }
}

#[test]
fn upstream_credentials_follow_origin() {
    let a = Origin::of(&"https://Reg.example/v2/".parse().unwrap()).unwrap();
    let b = Origin::of(&"https://reg.example:443/x".parse().unwrap()).unwrap();
    let c = Origin::of(&"https://reg.example:5000/x".parse().unwrap()).unwrap();
    let d = Origin::of(&"http://reg.example:443/x".parse().unwrap()).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_ne!(a, d);
}

#[tokio::test]
async fn upstream_resolver_pins_and_fails_clearly_without_dns() {
    let pins = BTreeMap::from([(
        "Pinned.Test".to_string(),
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9)),
    )]);
    let resolver = UpstreamResolver::with_dns(&pins, Err("no resolv.conf".into()));
    assert_eq!(
        resolver.lookup("pinned.test.").await.unwrap(),
        vec![IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9))]
    );
    assert_eq!(
        resolver.lookup("10.1.2.3").await.unwrap(),
        vec![IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))]
    );
    let err = resolver.lookup("quay.io").await.unwrap_err();
    assert!(err.to_string().contains("quay.io"), "{err}");
    assert!(err.to_string().contains("no resolv.conf"), "{err}");
}

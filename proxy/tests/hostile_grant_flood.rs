//! One client address flooding the proxy's in-memory access grants and
//! tag answers cannot push out another client's: while the upstream is
//! down, a client's cached private pull is served only on the grant the
//! proxy kept for it (fail closed), so a flood that pushed that grant out
//! turned the other client's pull into a 503.
//!
//! The flood is what any client can make cheaply: HEADs by tag, which the
//! upstream answers for free, each naming a new digest, more of them than
//! the maps hold (50 000 each). The two clients connect from two loopback
//! addresses (127.0.0.2 and 127.0.0.3): the proxy tells sources apart by
//! the TCP peer address. Scripted upstream, the proxy binary, everything
//! on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use pullthrough_testbed::fixtures::sha256_digest;
use pullthrough_testbed::proxy::{Addrs, Proxy};
use pullthrough_testbed::stub::{Seen, Stub};

const HOST: &str = "private.test";
const VICTIM: (&str, &str) = ("victim", "v1ct1m-pw-2b7e");
const FLOODER: (&str, &str) = ("flooder", "fl00d-pw-93ac");
const VICTIM_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const FLOOD_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
/// More than either map holds (`MAX_GRANTS`, `MAX_TAGS`: 50 000).
const FLOOD: usize = 52_000;
/// Kept-alive connections the flood is spread over.
const CONNECTIONS: usize = 8;
const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

fn basic((user, password): (&str, &str)) -> String {
    let enc = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {enc}")
}

/// The victim's private image: a manifest and its one layer.
struct Image {
    manifest: Bytes,
    manifest_digest: String,
    layer: Bytes,
    layer_digest: String,
}

fn image() -> Image {
    let layer = Bytes::from(
        (0..48_000u32)
            .map(|i| (i * 29 % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let layer_digest = sha256_digest(&layer);
    let config = b"{}";
    let manifest = Bytes::from(
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256_digest(config),
                "size": config.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": layer_digest,
                "size": layer.len(),
            }],
        })
        .to_string(),
    );
    Image {
        manifest_digest: sha256_digest(&manifest),
        manifest,
        layer,
        layer_digest,
    }
}

fn answer(status: StatusCode, headers: &[(&str, &str)], body: Bytes) -> Response<Bytes> {
    let mut r = Response::builder().status(status);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.body(body).unwrap()
}

/// A registry that lets each user read its own repository: the victim
/// `team/app` (its image), the flooder `flood/app`, where every tag is a
/// manifest of its own (a HEAD names a digest made from the tag).
fn registry(image: &Image) -> Stub {
    let (victim, flooder) = (basic(VICTIM), basic(FLOODER));
    let manifest = image.manifest.clone();
    let manifest_digest = image.manifest_digest.clone();
    let layer = image.layer.clone();
    let layer_path = format!("/v2/team/app/blobs/{}", image.layer_digest);
    let manifest_paths = [
        "/v2/team/app/manifests/1".to_string(),
        format!("/v2/team/app/manifests/{manifest_digest}"),
    ];
    Stub::canned()
        .route(move |seen: &Seen| {
            let who = seen.auth().unwrap_or_default();
            if who != victim && who != flooder {
                return answer(
                    StatusCode::UNAUTHORIZED,
                    &[("www-authenticate", r#"Basic realm="private""#)],
                    Bytes::new(),
                );
            }
            let none = || answer(StatusCode::NOT_FOUND, &[], Bytes::new());
            if seen.path == "/v2/" {
                return answer(StatusCode::OK, &[], Bytes::new());
            }
            if who == flooder {
                let Some(tag) = seen.path.strip_prefix("/v2/flood/app/manifests/") else {
                    return none();
                };
                let digest = sha256_digest(tag.as_bytes());
                return answer(
                    StatusCode::OK,
                    &[
                        ("content-type", MANIFEST_TYPE),
                        ("docker-content-digest", &digest),
                        ("content-length", "100"),
                    ],
                    Bytes::new(),
                );
            }
            if manifest_paths.contains(&seen.path) {
                let len = manifest.len().to_string();
                let headers = [
                    ("content-type", MANIFEST_TYPE),
                    ("docker-content-digest", manifest_digest.as_str()),
                    ("content-length", len.as_str()),
                ];
                let body = if seen.method == Method::HEAD {
                    Bytes::new()
                } else {
                    manifest.clone()
                };
                return answer(StatusCode::OK, &headers, body);
            }
            if seen.path == layer_path {
                if seen.headers.get("range").is_some_and(|v| v == "bytes=0-0") {
                    let range = format!("bytes 0-0/{}", layer.len());
                    return answer(
                        StatusCode::PARTIAL_CONTENT,
                        &[("content-range", &range), ("content-length", "1")],
                        layer.slice(0..1),
                    );
                }
                let len = layer.len().to_string();
                return answer(StatusCode::OK, &[("content-length", &len)], layer.clone());
            }
            none()
        })
        .start()
        .unwrap()
}

/// An HTTP/1.1 connection to the proxy at `to` from the loopback address
/// `from`; requests name the registry by path prefix.
async fn connect_from(from: Ipv4Addr, to: SocketAddr) -> Client {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(IpAddr::V4(from), 0)).unwrap();
    let stream = socket.connect(to).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    Client {
        send,
        host: to.to_string(),
    }
}

struct Client {
    send: SendRequest<Empty<Bytes>>,
    /// The proxy's own address, as `Host`.
    host: String,
}

/// `method path` on `client`'s connection as `who`, with `extra`
/// headers; the status and the body.
async fn ask(
    client: &mut Client,
    method: Method,
    path: &str,
    who: (&str, &str),
    extra: &[(&str, String)],
) -> (StatusCode, Bytes) {
    let send = &mut client.send;
    send.ready().await.unwrap();
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", client.host.as_str())
        .header("accept", MANIFEST_TYPE)
        .header("authorization", basic(who));
    for (name, value) in extra {
        req = req.header(*name, value.as_str());
    }
    let req = req.body(Empty::new()).unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, body)
}

/// The victim pulls its image from 127.0.0.2 and the flooder HEADs
/// 52 000 tags from 127.0.0.3 (each naming another client address in
/// `X-Forwarded-For` and the like), each of them a grant and a tag answer;
/// then the upstream stops. The victim's pull, past `authCheckTTL` and
/// `tagTTL`, is still served on what the proxy kept for it: the flood
/// pushed out the flooder's own oldest entries, counted in
/// `pullthrough_share_evictions_total`. Before the per-source shares the
/// victim's tag was a 502 and its layer a 503 here.
#[test]
fn a_flood_from_one_address_cannot_push_out_another_clients_grants() {
    let image = image();
    let mut upstream = registry(&image);
    let proxy = Proxy::start(
        common::proxy_bin(),
        Addrs::localhost().unwrap(),
        &format!(
            "authCheckTTL: 1s\nregistries:\n  - host: {HOST}\n    upstream: {}\n    private: true\n    allowPrivateNetworks: true\n    tagTTL: 1s\n",
            upstream.url()
        ),
    )
    .unwrap();
    let to = proxy.addrs.http;
    let tag = format!("/v2/{HOST}/team/app/manifests/1");
    let layer = format!("/v2/{HOST}/team/app/blobs/{}", image.layer_digest);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    rt.block_on(async {
        let mut victim = connect_from(VICTIM_ADDR, to).await;
        let (status, body) = ask(&mut victim, Method::GET, &tag, VICTIM, &[]).await;
        assert_eq!(status, StatusCode::OK, "{body:?}");
        assert_eq!(body, image.manifest);
        let (status, body) = ask(&mut victim, Method::GET, &layer, VICTIM, &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, image.layer);
    });
    proxy
        .wait_access(&[("digest", &image.layer_digest), ("cache", "MISS")])
        .unwrap();

    let started = Instant::now();
    let statuses = rt.block_on(async {
        let mut floods = Vec::new();
        for c in 0..CONNECTIONS {
            let mut send = connect_from(FLOOD_ADDR, to).await;
            floods.push(tokio::spawn(async move {
                let mut statuses = Vec::new();
                for i in (c..FLOOD).step_by(CONNECTIONS) {
                    let path = format!("/v2/{HOST}/flood/app/manifests/t{i}");
                    // Claims of another client address each time: the
                    // proxy must not take them for a source.
                    let elsewhere = format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255);
                    let claims = [
                        ("x-forwarded-for", elsewhere.clone()),
                        ("x-real-ip", elsewhere.clone()),
                        ("forwarded", format!("for={elsewhere}")),
                    ];
                    let (status, _) = ask(&mut send, Method::HEAD, &path, FLOODER, &claims).await;
                    statuses.push(status);
                }
                statuses
            }));
        }
        let mut all = Vec::new();
        for f in floods {
            all.extend(f.await.unwrap());
        }
        all
    });
    eprintln!("{FLOOD} flood requests in {:?}", started.elapsed());
    assert_eq!(statuses.len(), FLOOD);
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "the upstream said yes to every flood request: {:?}",
        statuses.iter().find(|s| **s != StatusCode::OK)
    );
    upstream.stop();
    // Every answer kept for the victim is past authCheckTTL and tagTTL:
    // only what it was let read before the outage opens now.
    std::thread::sleep(Duration::from_millis(1_200));
    let (tag_answer, layer_answer) = rt.block_on(async {
        let mut victim = connect_from(VICTIM_ADDR, to).await;
        let tag = ask(&mut victim, Method::GET, &tag, VICTIM, &[]).await;
        let layer = ask(&mut victim, Method::GET, &layer, VICTIM, &[]).await;
        (tag, layer)
    });
    let said = |(status, body): &(StatusCode, Bytes)| {
        format!(
            "{status} {:?}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        )
    };
    assert!(
        tag_answer.0 == StatusCode::OK && layer_answer.0 == StatusCode::OK,
        "the victim's stale tag: {}; its layer: {}",
        said(&tag_answer),
        said(&layer_answer)
    );
    assert_eq!(tag_answer.1, image.manifest);
    assert_eq!(layer_answer.1, image.layer);
    proxy
        .wait_access(&[("digest", &image.layer_digest), ("cache", "HIT")])
        .unwrap();
    let metric = |map: &str| {
        proxy
            .metric(&format!(
                "pullthrough_share_evictions_total{{map=\"{map}\"}}"
            ))
            .unwrap()
            .unwrap_or(0.0)
    };
    // What the maps could not take of the flood beyond what they hold,
    // the flooder's own.
    for map in ["grants", "tags"] {
        assert!(
            metric(map) >= (FLOOD - 50_000) as f64,
            "{map}: {}",
            metric(map)
        );
    }
    // The access log names whom to look for: each request's connection
    // address, not the addresses it claimed.
    let lines = proxy.access_lines();
    let clients = |part: &str| -> std::collections::BTreeSet<String> {
        lines
            .iter()
            .filter(|l| l["path"].as_str().is_some_and(|p| p.contains(part)))
            .map(|l| l["client"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(clients("/team/app/"), [VICTIM_ADDR.to_string()].into());
    assert_eq!(clients("/flood/app/"), [FLOOD_ADDR.to_string()].into());
}

//! Scripted upstreams for the unit tests, from the test bed's one stub
//! server: every request is answered by a route function and recorded.

#![allow(clippy::unwrap_used)]

use std::net::IpAddr;

use bytes::Bytes;
use http::Response;
pub use pullthrough_testbed::stub::{Seen, Stub};

/// A plain-HTTP upstream on `ip` answering with `route`.
pub fn routed(
    ip: IpAddr,
    route: impl Fn(&Seen) -> Response<Bytes> + Send + Sync + 'static,
) -> Stub {
    Stub::canned().ip(ip).route(route).start().unwrap()
}

/// The same over TLS, with a self-signed certificate for `ip`; also
/// returns that certificate (PEM) for a `caBundle`.
pub fn routed_tls(
    ip: IpAddr,
    route: impl Fn(&Seen) -> Response<Bytes> + Send + Sync + 'static,
) -> (Stub, String) {
    let stub = Stub::canned().ip(ip).tls().route(route).start().unwrap();
    let pem = stub.tls_cert_pem().unwrap().to_string();
    (stub, pem)
}

/// A server on 127.0.0.1 that accepts connections and never answers (a
/// peer that is alive but stuck), until the returned task is aborted.
pub async fn silent_listener() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    (addr, hold)
}

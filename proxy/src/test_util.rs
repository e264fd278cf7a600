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

//! Header plumbing shared by the pipeline steps: the registry headers,
//! what is forwarded upstream, what is relayed back, content negotiation.

use http::Response;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::body::Incoming;

use super::body::{self, Body};

pub(crate) const DOCKER_CONTENT_DIGEST: HeaderName =
    HeaderName::from_static("docker-content-digest");
pub(crate) const API_VERSION: HeaderName =
    HeaderName::from_static("docker-distribution-api-version");

/// Does the client's Accept cover `media_type`? No Accept header, or a
/// wildcard, accepts anything.
pub(crate) fn accepts(headers: &HeaderMap, media_type: &str) -> bool {
    let mut any = false;
    for value in headers.get_all(header::ACCEPT) {
        any = true;
        let Ok(v) = value.to_str() else { continue };
        for item in v.split(',') {
            let item = item.split(';').next().unwrap_or_default().trim();
            if item == media_type || item == "*/*" {
                return true;
            }
        }
    }
    !any
}

pub(crate) fn content_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or(v).trim().to_string())
}

pub(crate) fn insert_bearer(headers: &mut HeaderMap, token: &str) {
    if let Ok(v) = HeaderValue::from_str(&format!("Bearer {token}")) {
        headers.insert(header::AUTHORIZATION, v);
    }
}

/// Headers the upstream should see. `range` forwards Range (pass-through
/// only: cached fetches always take the whole blob).
pub(crate) fn forward_headers(from: &HeaderMap, range: bool) -> HeaderMap {
    let mut to = HeaderMap::new();
    for name in [header::ACCEPT, header::AUTHORIZATION, header::USER_AGENT] {
        for v in from.get_all(&name) {
            to.append(name.clone(), v.clone());
        }
    }
    if range && let Some(v) = from.get(header::RANGE) {
        to.insert(header::RANGE, v.clone());
    }
    to
}

/// Relays an upstream response: status and end-to-end headers, body as is.
pub(crate) fn relay_response(resp: Response<Incoming>) -> Response<Body> {
    let (parts, incoming) = resp.into_parts();
    relay_parts(parts, body::relay(incoming))
}

pub(crate) fn relay_parts(parts: http::response::Parts, body: Body) -> Response<Body> {
    let mut resp = Response::new(body);
    *resp.status_mut() = parts.status;
    for (name, value) in &parts.headers {
        if !is_hop_by_hop(name) {
            resp.headers_mut().append(name.clone(), value.clone());
        }
    }
    resp
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "upgrade"
            | "te"
            | "trailer"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_matching() {
        let mut h = HeaderMap::new();
        assert!(accepts(&h, "application/vnd.oci.image.manifest.v1+json"));
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/vnd.docker.distribution.manifest.v2+json; q=0.9"),
        );
        assert!(accepts(
            &h,
            "application/vnd.docker.distribution.manifest.v2+json"
        ));
        assert!(!accepts(&h, "application/vnd.oci.image.index.v1+json"));
        h.append(
            header::ACCEPT,
            HeaderValue::from_static("application/vnd.oci.image.index.v1+json"),
        );
        assert!(accepts(&h, "application/vnd.oci.image.index.v1+json"));
    }
}

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

/// The body length a `Content-Length` header announces, when it is one
/// plain decimal number that fits a u64; anything else (a list, a sign,
/// spaces, a value of any length an upstream may send) is no length.
pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    let value = headers.get(header::CONTENT_LENGTH)?.to_str().ok()?;
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

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

/// Media types of a list of per-platform manifests.
pub(crate) const LIST_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// Does the client take a list of platforms, named or by wildcard? A
/// registry answers a tag that holds a list with one platform's manifest
/// (its default) to a client that takes none, or that sends no Accept.
pub(crate) fn accepts_lists(headers: &HeaderMap) -> bool {
    headers.contains_key(header::ACCEPT) && LIST_TYPES.iter().any(|t| accepts(headers, t))
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

/// In a response's extensions (never sent as such): the answer is the
/// upstream's own, relayed or rebuilt from its refusal, not one the
/// proxy made. A replica that asked for a blob takes such an answer of
/// its owner as final; any other answer means the owner cannot serve it
/// (see `pipeline::lead`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct UpstreamAnswer;

pub(crate) fn relay_parts(parts: http::response::Parts, body: Body) -> Response<Body> {
    let mut resp = Response::new(body);
    resp.extensions_mut().insert(UpstreamAnswer);
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

    fn with_length(value: &[u8]) -> Option<HeaderMap> {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_bytes(value).ok()?);
        Some(h)
    }

    #[test]
    fn content_lengths() {
        assert_eq!(content_length(&HeaderMap::new()), None);
        for (v, want) in [
            (&b"0"[..], Some(0)),
            (b"1234", Some(1234)),
            (b"18446744073709551615", Some(u64::MAX)),
            (b"18446744073709551616", None),
            (b"+5", None),
            (b"-1", None),
            (b" 5", None),
            (b"5, 5", None),
            (b"0x10", None),
        ] {
            assert_eq!(content_length(&with_length(v).unwrap()), want, "{v:?}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]

        /// Issue #10, point 8: any value an upstream sends, huge or
        /// malformed, is a length or no length; never a panic.
        #[test]
        fn any_content_length_value_is_safe(value in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            if let Some(h) = with_length(&value) {
                let got = content_length(&h);
                // A length is only ever the number the header spells.
                if let Some(n) = got {
                    let text = std::str::from_utf8(&value).unwrap();
                    proptest::prop_assert_eq!(text.parse::<u64>().ok(), Some(n));
                }
            }
        }

        #[test]
        fn digit_strings_of_any_size_are_exact_or_none(digits in "[0-9]{1,40}") {
            let h = with_length(digits.as_bytes()).unwrap();
            proptest::prop_assert_eq!(content_length(&h), digits.parse::<u64>().ok());
        }
    }
}

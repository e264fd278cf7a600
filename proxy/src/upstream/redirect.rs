//! Redirect rules: which hops are followed, with which method, and which
//! headers may cross to another origin (none that carry credentials).

use http::header::{self, HeaderMap, HeaderName};
use http::{Method, StatusCode, Uri};

pub(super) const CREDENTIAL_HEADERS: [HeaderName; 3] = [
    header::AUTHORIZATION,
    header::COOKIE,
    header::PROXY_AUTHORIZATION,
];

/// Drops `Host` (derived from each hop's URL) and hop-by-hop headers.
pub(super) fn sanitize(mut headers: HeaderMap) -> HeaderMap {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        header::HOST,
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TE,
        header::TRAILER,
        header::PROXY_AUTHENTICATE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    headers
}

pub(super) fn is_redirect(status: StatusCode) -> bool {
    matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308)
}

pub(super) fn redirect_method(status: StatusCode, method: &Method) -> Method {
    match status.as_u16() {
        303 if method != Method::HEAD => Method::GET,
        301 | 302 if method == Method::POST => Method::GET,
        _ => method.clone(),
    }
}

/// Scheme, host and effective port of an absolute http(s) URL: `host`,
/// `host.`, `HOST` and `host:443` are one server.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Origin {
    pub(super) scheme: String,
    pub(super) host: String,
    pub(super) port: u16,
}

impl Origin {
    pub(crate) fn of(url: &Uri) -> Result<Self, String> {
        let scheme = url
            .scheme_str()
            .map(str::to_ascii_lowercase)
            .ok_or("the URL has no scheme")?;
        let default_port = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            other => return Err(format!("scheme `{other}` is not http or https")),
        };
        let host = url
            .host()
            .filter(|h| !h.is_empty())
            .ok_or("the URL has no host")?
            .trim_end_matches('.')
            .to_ascii_lowercase();
        Ok(Self {
            scheme,
            host,
            port: url.port_u16().unwrap_or(default_port),
        })
    }
}

/// Resolves a Location header value against the URL that sent it
/// (RFC 3986 §5.2, by the `url` crate). None when the result is not an
/// http(s) URL.
pub(super) fn resolve_location(base: &Uri, location: &str) -> Option<Uri> {
    let location = location.trim();
    if location.is_empty() {
        return None;
    }
    let base = url::Url::parse(&base.to_string()).ok()?;
    let mut target = base.join(location).ok()?;
    target.set_fragment(None);
    let uri: Uri = target.as_str().parse().ok()?;
    Origin::of(&uri).ok()?;
    Some(uri)
}

/// A URL for logs and error messages: its query replaced, because a
/// presigned storage URL carries its signature (a bearer credential for
/// that object) there.
pub(crate) fn redact(url: &Uri) -> String {
    redact_str(&url.to_string())
}

/// [`redact`] for a URL as text (a raw `Location` header, a realm).
pub(crate) fn redact_str(url: &str) -> String {
    match url.split_once('?') {
        Some((before, _)) => format!("{before}?<redacted>"),
        None => url.to_string(),
    }
}

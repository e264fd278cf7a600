//! The one refusal a client gets when the upstream will not give it an
//! object, whether or not the proxy holds that object. The cache is shared
//! by every client: were the refusal of a cached digest (made after the
//! access check) to differ from that of an uncached one (the upstream's
//! own answer), any client could learn which private images, and which
//! private tags, someone pulled through the proxy, by asking for them
//! under any repository it likes. So the upstream's refusal is never
//! relayed: only what clients need of it is kept, the status and the
//! challenge of a 401 that they take their token from.

use http::header::{self, HeaderMap};
use http::{Response, StatusCode};

use crate::http::body::{self, Body};
use crate::http::headers::UpstreamAnswer;
use crate::oci::{self, ErrorCode};

/// What the upstream's final answer to a read of an object says about
/// whether the client may read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Allowed,
    /// 429 or 5xx: no answer about access.
    Outage,
    /// The registry refused (401, 403) or the repository does not hold
    /// the object for this client (404, and any other answer).
    Refused,
}

/// `status` is the upstream's final answer; `elsewhere`, whether it came
/// from another origin than the registry's after a redirect.
pub(crate) fn verdict(status: StatusCode, elsewhere: bool) -> Verdict {
    // A registry redirects a blob to storage only once it let the client
    // read it, and storage may refuse a URL whose signature expired on
    // the way, or a request it was not signed for (S3): that 403 is no
    // refusal of the registry's. Any other answer after a redirect counts
    // as it is: a registry that redirects before it checks (to a
    // canonical host, which gets no credentials) answers 401 or 404
    // there, and that is a no. 416: the blob is there and the client may
    // read it, but it is empty, so even one byte is out of range.
    if status.is_success()
        || status == StatusCode::RANGE_NOT_SATISFIABLE
        || (elsewhere && status == StatusCode::FORBIDDEN)
    {
        Verdict::Allowed
    } else if super::super::is_outage(status) {
        Verdict::Outage
    } else {
        Verdict::Refused
    }
}

/// What a refused request asked for: it picks the error code of a 404,
/// the one the distribution spec gives for that object, so that a pull
/// of a tag or digest that is not there reads "manifest unknown" as it
/// would from the registry itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Object {
    /// A manifest, by digest or by tag (also a referrers request, which
    /// is about its subject manifest).
    Manifest,
    Blob,
}

impl Object {
    /// The object a registry API path under a repository names.
    pub(crate) fn of_path(path: &str) -> Self {
        if path.rsplit('/').nth(1) == Some("blobs") {
            Object::Blob
        } else {
            Object::Manifest
        }
    }
}

/// The refusal of `status` (a [`Verdict::Refused`] answer) for `repo` of
/// `host`, the same for a cached object and an uncached one, a digest or a
/// tag: it names neither, nor anything else of the upstream's answer but
/// the challenge of a 401 (`upstream` holds its headers). A HEAD gets it
/// without the body (the server sends none), announcing the same length.
///
/// Marked as the upstream's answer (see [`UpstreamAnswer`]): a replica
/// that asked its owner for the blob takes it as final, as it would
/// take the upstream's.
pub(crate) fn refusal(
    status: StatusCode,
    host: &str,
    repo: &str,
    object: Object,
    upstream: &HeaderMap,
) -> Response<Body> {
    let (status, code, message) = match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => (
            status,
            ErrorCode::Denied,
            format!("{host} does not let this client read {repo}"),
        ),
        // 404, and anything else that is no answer of "yes": the
        // repository does not hold the object for this client. One
        // status for all: the upstream may answer a HEAD and a GET, a
        // digest and a tag, with different ones.
        _ => (
            StatusCode::NOT_FOUND,
            match object {
                Object::Manifest => ErrorCode::ManifestUnknown,
                Object::Blob => ErrorCode::BlobUnknown,
            },
            format!("{host} has no such object in {repo} for this client"),
        ),
    };
    let mut resp = oci::error_response(status, code, &message).map(body::full);
    resp.extensions_mut().insert(UpstreamAnswer);
    if status == StatusCode::UNAUTHORIZED {
        for v in upstream.get_all(header::WWW_AUTHENTICATE) {
            resp.headers_mut()
                .append(header::WWW_AUTHENTICATE, v.clone());
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;
    use http_body_util::BodyExt;

    use super::*;

    async fn parts(resp: Response<Body>) -> (StatusCode, HeaderMap, bytes::Bytes, bool) {
        let marked = resp.extensions().get::<UpstreamAnswer>().is_some();
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap();
        (parts.status, parts.headers, bytes, marked)
    }

    #[test]
    fn answers_are_judged_as_the_access_check_judges_them() {
        use Verdict::*;
        for (status, elsewhere, want) in [
            (200, false, Allowed),
            (206, false, Allowed),
            (416, false, Allowed),
            (403, true, Allowed),
            (403, false, Refused),
            (401, true, Refused),
            (404, true, Refused),
            (401, false, Refused),
            (404, false, Refused),
            (400, false, Refused),
            (405, false, Refused),
            (410, false, Refused),
            (429, false, Outage),
            (500, false, Outage),
            (503, true, Outage),
        ] {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(verdict(status, elsewhere), want, "{status} {elsewhere}");
        }
    }

    /// Whatever the upstream's refusal carried, the client gets the same
    /// bytes for the same status class: nothing of the upstream's body or
    /// headers but a 401's challenges, in their order.
    #[tokio::test]
    async fn a_refusal_keeps_nothing_of_the_upstream_but_a_401s_challenge() {
        let mut distribution = HeaderMap::new();
        distribution.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        distribution.insert(
            "docker-distribution-api-version",
            HeaderValue::from_static("registry/2.0"),
        );
        distribution.insert("x-request-id", HeaderValue::from_static("abc"));
        let mut challenged = distribution.clone();
        challenged.append(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"https://auth/token\",scope=\"a\""),
        );
        challenged.append(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"r\""),
        );

        let (status, headers, body, marked) = parts(refusal(
            StatusCode::UNAUTHORIZED,
            "reg",
            "app",
            Object::Blob,
            &challenged,
        ))
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(marked, "a replica must take it as the upstream's answer");
        let challenges: Vec<_> = headers.get_all(header::WWW_AUTHENTICATE).iter().collect();
        assert_eq!(
            challenges,
            [
                "Bearer realm=\"https://auth/token\",scope=\"a\"",
                "Basic realm=\"r\""
            ]
        );
        assert_eq!(headers.len(), 3, "{headers:?}");
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        assert_eq!(
            body,
            r#"{"errors":[{"code":"DENIED","message":"reg does not let this client read app","detail":null}]}"#
        );

        // A 403 has no challenge to keep.
        let (status, headers, _, _) = parts(refusal(
            StatusCode::FORBIDDEN,
            "reg",
            "app",
            Object::Manifest,
            &challenged,
        ))
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(!headers.contains_key(header::WWW_AUTHENTICATE));

        // Every other refusal is one 404, whatever the upstream said.
        let mut seen = Vec::new();
        for s in [404, 400, 405, 410] {
            let s = StatusCode::from_u16(s).unwrap();
            seen.push(parts(refusal(s, "reg", "app", Object::Manifest, &challenged)).await);
            seen.push(
                parts(refusal(
                    s,
                    "reg",
                    "app",
                    Object::Manifest,
                    &HeaderMap::new(),
                ))
                .await,
            );
        }
        let (status, headers, body, _) = &seen[0];
        assert_eq!(*status, StatusCode::NOT_FOUND);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert_eq!(
            body,
            r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"reg has no such object in app for this client","detail":null}]}"#
        );
        assert!(
            seen.iter()
                .all(|(s, h, b, _)| (s, h, b) == (status, headers, body))
        );

        // A blob's 404 carries the spec's code for a blob.
        let (_, _, body, _) = parts(refusal(
            StatusCode::NOT_FOUND,
            "reg",
            "app",
            Object::Blob,
            &challenged,
        ))
        .await;
        assert_eq!(
            body,
            r#"{"errors":[{"code":"BLOB_UNKNOWN","message":"reg has no such object in app for this client","detail":null}]}"#
        );
    }

    #[test]
    fn a_path_names_a_blob_or_a_manifest() {
        assert_eq!(Object::of_path("/v2/a/b/blobs/sha256:ab"), Object::Blob);
        assert_eq!(Object::of_path("/v2/a/blobs/manifests/1"), Object::Manifest);
        assert_eq!(
            Object::of_path("/v2/a/manifests/sha256:ab"),
            Object::Manifest
        );
    }
}

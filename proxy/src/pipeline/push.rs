//! Writes (blob uploads, manifest pushes) relayed to the upstream
//! uncached, where a registry allows push.

use http::header::{self, HeaderValue};
use http::{Request, Response};
use hyper::body::Incoming;

use super::HandlerError;
use super::context::Ctx;
use crate::http::body::{self, Body};
use crate::http::headers::{forward_headers, relay_response};
use crate::route::{ApiRequest, Via};

/// Relays a write (blob upload, manifest push) uncached, streaming the
/// client's body; upload Locations that point at the upstream are rewritten
/// to come back through the proxy the same way the request came.
pub(crate) async fn push_through(
    ctx: &Ctx<'_>,
    req: Request<Incoming>,
    request: &ApiRequest,
) -> Result<Response<Body>, HandlerError> {
    let (parts, incoming) = req.into_parts();
    let url = ctx.url(&request.upstream_path(), parts.uri.query())?;
    let mut headers = forward_headers(&parts.headers, false);
    for name in [
        header::CONTENT_TYPE,
        header::CONTENT_LENGTH,
        header::CONTENT_RANGE,
    ] {
        if let Some(v) = parts.headers.get(&name) {
            headers.insert(name, v.clone());
        }
    }
    let mut upload = body::relay(incoming);
    // An upload is its connection's progress while no answer goes back.
    if let Some(activity) = parts.extensions.get::<crate::server::Activity>().cloned() {
        upload = body::on_data(upload, move || activity.progressed());
    }
    let resp = ctx
        .client
        .send_body(parts.method, url, headers, upload)
        .await
        .map_err(|source| HandlerError::Upstream {
            registry: ctx.registry.host.clone(),
            source,
        })?;
    let mut resp = relay_response(resp);
    if let Some(loc) = resp
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|l| proxied_location(ctx, l))
        .and_then(|l| HeaderValue::from_str(&l).ok())
    {
        resp.headers_mut().insert(header::LOCATION, loc);
    }
    Ok(resp)
}

/// Maps an upstream `Location` on the upstream's own origin to a path the
/// client sends back to the proxy (with the registry prefix or `ns=` it
/// used). Other Locations are left alone.
fn proxied_location(ctx: &Ctx<'_>, location: &str) -> Option<String> {
    let base = url::Url::parse(&ctx.registry.upstream_url()).ok()?;
    let target = base.join(location).ok()?;
    if target.origin() != base.origin() {
        return None;
    }
    let path = target.path();
    let mut query: Vec<String> = target
        .query()
        .map(|q| vec![q.to_string()])
        .unwrap_or_default();
    let path = match ctx.via {
        Via::PathPrefix => {
            let rest = path.strip_prefix("/v2/")?;
            format!("/v2/{}/{rest}", ctx.registry.host)
        }
        Via::Ns => {
            query.push(format!("ns={}", ctx.registry.host));
            path.to_string()
        }
        Via::Host | Via::Default => path.to_string(),
    };
    Some(if query.is_empty() {
        path
    } else {
        format!("{path}?{}", query.join("&"))
    })
}

//! What the mock API server tests share: the request and response types of
//! the tower-test pair, and a JSON answer.

#![allow(clippy::unwrap_used, dead_code)]

use serde_json::Value;

pub type Req = http::Request<kube::client::Body>;
pub type Resp = http::Response<kube::client::Body>;

/// A JSON answer with status `code`.
pub fn json_resp(code: u16, v: &Value) -> Resp {
    http::Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(kube::client::Body::from(serde_json::to_vec(v).unwrap()))
        .unwrap()
}

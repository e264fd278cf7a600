//! A small blocking HTTP(S) client for readiness checks and assertions,
//! built on hyper over a single connection (no system trust store).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::error::{Error, Result};

/// What came back.
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// One request. `url` is `http://` or `https://` with an IP or a name that
/// resolves to loopback; `ca_pem` is required for https.
#[derive(Debug, Clone)]
pub struct Get<'a> {
    pub url: &'a str,
    pub method: Method,
    pub ca_pem: Option<&'a str>,
    /// Connect here instead of resolving the URL's host (SNI stays the host).
    pub connect_to: Option<std::net::SocketAddr>,
    pub headers: Vec<(&'a str, String)>,
    pub timeout: Duration,
}

impl<'a> Get<'a> {
    pub fn new(url: &'a str) -> Self {
        Self {
            url,
            method: Method::GET,
            ca_pem: None,
            connect_to: None,
            headers: Vec::new(),
            timeout: Duration::from_secs(10),
        }
    }

    pub fn ca(mut self, ca_pem: &'a str) -> Self {
        self.ca_pem = Some(ca_pem);
        self
    }

    pub fn method(mut self, m: Method) -> Self {
        self.method = m;
        self
    }

    pub fn header(mut self, name: &'a str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub fn connect_to(mut self, addr: std::net::SocketAddr) -> Self {
        self.connect_to = Some(addr);
        self
    }

    /// Sends the request on a fresh current-thread runtime.
    pub fn send(&self) -> Result<Response> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| self.err(format!("runtime: {e}")))?;
        rt.block_on(async {
            tokio::time::timeout(self.timeout, self.send_async())
                .await
                .map_err(|_| self.err("timed out".into()))?
        })
    }

    async fn send_async(&self) -> Result<Response> {
        let uri: http::Uri = self
            .url
            .parse()
            .map_err(|e| self.err(format!("bad url: {e}")))?;
        let host = uri
            .host()
            .ok_or_else(|| self.err("url has no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let https = uri.scheme_str() == Some("https");
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let stream = match self.connect_to {
            Some(addr) => TcpStream::connect(addr).await,
            None => TcpStream::connect((host.as_str(), port)).await,
        }
        .map_err(|e| self.err(format!("connect: {e}")))?;

        let mut req = Request::builder()
            .method(self.method.clone())
            .uri(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"));
        let authority = uri.authority().map(|a| a.as_str()).unwrap_or(&host);
        req = req.header(http::header::HOST, authority);
        for (k, v) in &self.headers {
            req = req.header(*k, v);
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| self.err(format!("request: {e}")))?;

        let resp = if https {
            let ca = self
                .ca_pem
                .ok_or_else(|| self.err("https needs a CA".into()))?;
            let config = Arc::new(crate::tls::client_config(ca)?);
            let name = rustls_pki_types::ServerName::try_from(host.clone())
                .map_err(|e| self.err(format!("server name: {e}")))?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await
                .map_err(|e| self.err(format!("TLS: {e}")))?;
            self.exchange(TokioIo::new(tls), req).await?
        } else {
            self.exchange(TokioIo::new(stream), req).await?
        };
        Ok(resp)
    }

    async fn exchange<T>(&self, io: T, req: Request<Full<Bytes>>) -> Result<Response>
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| self.err(format!("handshake: {e}")))?;
        tokio::spawn(conn);
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| self.err(format!("send: {e}")))?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| self.err(format!("body: {e}")))?
            .to_bytes();
        Ok(Response {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    fn err(&self, message: String) -> Error {
        Error::Http {
            url: self.url.to_string(),
            message,
        }
    }
}

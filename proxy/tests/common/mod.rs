//! Shared set-up for the proxy's component tests: a real upstream holding
//! fixtures, and the proxy binary in front of it.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use pullthrough_testbed::fixtures::{Image, LayoutBuilder};
use pullthrough_testbed::proxy::{Addrs, Proxy};
use pullthrough_testbed::registry::Registry;

pub fn proxy_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_pullthrough-proxy"))
}

/// An upstream registry with `fixture/busybox:1` (runnable) pushed.
pub struct Upstream {
    pub registry: Registry,
    pub busybox: Image,
    _work: tempfile::TempDir,
}

pub fn upstream(registry: Registry) -> Upstream {
    let work = tempfile::tempdir().unwrap();
    let busybox = LayoutBuilder::new(work.path())
        .unwrap()
        .busybox("busybox")
        .unwrap();
    busybox.push(&registry, "fixture/busybox", "1").unwrap();
    Upstream {
        registry,
        busybox,
        _work: work,
    }
}

/// Config body with one registry named `host` served from `upstream_url`.
pub fn one_registry(host: &str, upstream_url: &str, extra: &str) -> String {
    format!("registries:\n  - host: {host}\n    upstream: {upstream_url}\n{extra}")
}

/// The proxy on free localhost ports in front of `upstream` as `quay.io`.
pub fn proxy_for(up: &Upstream) -> Proxy {
    Proxy::start(
        proxy_bin(),
        Addrs::localhost().unwrap(),
        &one_registry("quay.io", &up.registry.url(), ""),
    )
    .unwrap()
}

/// Writes the proxy CA as `<dir>/ca.crt` (a cert dir for skopeo/podman).
pub fn ca_dir(proxy: &Proxy) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.crt"), proxy.ca_pem().unwrap()).unwrap();
    dir
}

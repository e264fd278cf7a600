//! A `pullthrough-proxy` process under test: config written to a temp dir,
//! listeners on loopback (or inside a test's network namespace, see
//! [`Proxy::start_in`]), ready when `/readyz` answers, access-log lines
//! parsed from its stdout.

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::error::{Error, IoContext, Result};
use crate::http::Get;
use crate::net;
use crate::ns;
use crate::process::Process;

/// Where the proxy listens.
#[derive(Debug, Clone, Copy)]
pub struct Addrs {
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub admin: SocketAddr,
}

impl Addrs {
    /// Free ports on `ip` (https on `https_port` when given, e.g. 443).
    pub fn on(ip: IpAddr, https_port: Option<u16>) -> Result<Self> {
        Ok(Self {
            http: SocketAddr::new(ip, net::free_port_on(ip)?),
            https: SocketAddr::new(
                ip,
                match https_port {
                    Some(p) => p,
                    None => net::free_port_on(ip)?,
                },
            ),
            admin: SocketAddr::new(ip, net::free_port_on(ip)?),
        })
    }

    pub fn localhost() -> Result<Self> {
        Self::on(IpAddr::V4(Ipv4Addr::LOCALHOST), None)
    }

    /// For a proxy inside a network namespace ([`Proxy::start_in`]): the
    /// client side is TLS only, on `https` (an address of the namespace,
    /// e.g. 10.254.0.1:443); plain HTTP and admin listen on the namespace's
    /// own 127.0.0.1, so nothing but verified-or-refused TLS is served on
    /// the address clients resolve registry names to.
    pub fn in_netns(https: SocketAddr) -> Result<Self> {
        // A fresh namespace has nothing bound but what the test put there;
        // kernel-picked free port numbers will do.
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        Ok(Self {
            http: SocketAddr::new(lo, net::free_port()?),
            https,
            admin: SocketAddr::new(lo, net::free_port()?),
        })
    }
}

pub struct Proxy {
    process: Option<Process>,
    dir: tempfile::TempDir,
    bin: PathBuf,
    netns: Option<String>,
    /// Extra environment of the process (kept across restarts).
    env: Vec<(String, String)>,
    pub addrs: Addrs,
}

impl Proxy {
    /// Starts `bin` with `listen:` from `addrs` followed by `config_body`
    /// (the rest of the YAML: registries, defaultRegistry, ...).
    pub fn start(bin: &Path, addrs: Addrs, config_body: &str) -> Result<Self> {
        Self::start_with(None, bin, addrs, config_body, Vec::new())
    }

    /// Like [`Proxy::start`], inside the network namespace `netns`
    /// ([`crate::ns::NetNs::name`]); every listen address must be loopback
    /// (the namespace's own) or an address of that namespace (see
    /// [`Addrs::in_netns`]). Readiness is probed from inside it.
    pub fn start_in(netns: &str, bin: &Path, addrs: Addrs, config_body: &str) -> Result<Self> {
        Self::start_with(Some(netns), bin, addrs, config_body, Vec::new())
    }

    /// Like [`Proxy::start`], with extra environment variables.
    pub fn start_env(
        bin: &Path,
        addrs: Addrs,
        config_body: &str,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::start_with(None, bin, addrs, config_body, env)
    }

    fn start_with(
        netns: Option<&str>,
        bin: &Path,
        addrs: Addrs,
        config_body: &str,
        env: Vec<(String, String)>,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("pt-proxy-")
            .tempdir()
            .ctx(|| "creating proxy temp dir".into())?;
        for a in [addrs.http, addrs.https, addrs.admin] {
            ns::assert_private_addr(a, netns)?;
        }
        let mut proxy = Self {
            process: None,
            dir,
            bin: bin.to_path_buf(),
            netns: netns.map(str::to_string),
            env,
            addrs,
        };
        proxy.write_config(config_body)?;
        proxy.spawn()?;
        Ok(proxy)
    }

    /// Rewrites the config file (the proxy reloads it on change).
    pub fn write_config(&self, config_body: &str) -> Result<()> {
        let text = format!(
            "listen: {{http: \"{}\", https: \"{}\", admin: \"{}\"}}\ndataDir: {}\n{config_body}",
            self.addrs.http,
            self.addrs.https,
            self.addrs.admin,
            self.data_dir().display(),
        );
        let path = self.config_path();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).ctx(|| "writing proxy config".into())?;
        std::fs::rename(&tmp, &path).ctx(|| "installing proxy config".into())
    }

    fn spawn(&mut self) -> Result<()> {
        let config = self.config_path();
        let mut cmd = ns::maybe_in_netns(
            self.netns.as_deref(),
            &self.bin,
            [
                OsStr::new("--config"),
                config.as_os_str(),
                OsStr::new("--reload-interval"),
                OsStr::new("200ms"),
            ],
        );
        cmd.env("RUST_LOG", "info");
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let mut p = Process::spawn("pullthrough-proxy", cmd, self.dir.path().join("proxy.log"))?;
        let url = format!("http://{}/readyz", self.addrs.admin);
        let netns = self.netns.clone();
        p.wait_ready("pullthrough-proxy /readyz", Duration::from_secs(30), || {
            Ok(match &netns {
                Some(name) => ns::netns_http_status(name, &url).is_some_and(|s| s == 200),
                None => Get::new(&url).send().is_ok_and(|r| r.status.is_success()),
            })
        })?;
        self.process = Some(p);
        Ok(())
    }

    /// Stops (SIGTERM) and starts again with the same data dir.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn()
    }

    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut p) = self.process.take() {
            p.stop()?;
        }
        Ok(())
    }

    /// Starts the process again after [`Proxy::stop`] or [`Proxy::kill`]
    /// (same config and data dir).
    pub fn start_again(&mut self) -> Result<()> {
        if self.process.is_some() {
            return Ok(());
        }
        self.spawn()
    }

    /// Like [`Proxy::stop`] (SIGTERM, then SIGKILL after a grace period),
    /// returning how the process exited.
    pub fn stop_status(&mut self) -> Result<Option<std::process::ExitStatus>> {
        match self.process.take() {
            Some(mut p) => p.stop(),
            None => Ok(None),
        }
    }

    /// SIGKILL (crash tests).
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut p) = self.process.take() {
            p.kill()?;
        }
        Ok(())
    }

    pub fn process(&self) -> Option<&Process> {
        self.process.as_ref()
    }

    /// The PID, or 0 when stopped.
    pub fn pid(&self) -> u32 {
        self.process.as_ref().map_or(0, Process::pid)
    }

    /// The network namespace it runs in, if any.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// The proxy's temp dir (config, data, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.yaml")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Where the proxy keeps the committed blob `digest` (its store layout:
    /// `blobs/sha256/<2 hex>/<hex>`).
    pub fn cached_blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.data_dir()
            .join("blobs/sha256")
            .join(hex.get(..2).unwrap_or_default())
            .join(hex)
    }

    /// Names of the files in the store's temp dir (none when it is absent).
    pub fn tmp_entries(&self) -> Vec<String> {
        std::fs::read_dir(self.data_dir().join("tmp"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The proxy's CA certificate (generated into the data dir).
    pub fn ca_pem(&self) -> Result<String> {
        let p = self.data_dir().join("ca.crt");
        std::fs::read_to_string(&p).ctx(|| format!("reading {}", p.display()))
    }

    pub fn http_url(&self) -> String {
        format!("http://{}", self.addrs.http)
    }

    pub fn https_url(&self) -> String {
        format!("https://{}", self.addrs.https)
    }

    /// The admin listener's `/metrics` text.
    pub fn metrics(&self) -> Result<String> {
        let url = format!("http://{}/metrics", self.addrs.admin);
        let resp = Get::new(&url).send()?;
        String::from_utf8(resp.body.to_vec())
            .map_err(|e| Error::Other(format!("{url}: not UTF-8: {e}")))
    }

    /// The value of the sample `series` (name and labels exactly as
    /// exported, e.g. `pullthrough_sendfile_bytes_total`), or None when the
    /// proxy does not export it.
    pub fn metric(&self, series: &str) -> Result<Option<f64>> {
        Ok(metric_in(&self.metrics()?, series))
    }

    pub fn log(&self) -> String {
        std::fs::read(self.dir.path().join("proxy.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Every access-log line so far, parsed.
    pub fn access_lines(&self) -> Vec<Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"] == "pullthrough::access")
            .collect()
    }

    /// Access lines whose fields all equal the given values.
    pub fn access_matching(&self, fields: &[(&str, &str)]) -> Vec<Value> {
        self.access_lines()
            .into_iter()
            .filter(|v| {
                fields.iter().all(|(k, want)| match &v[*k] {
                    Value::String(s) => s == want,
                    Value::Number(n) => n.to_string() == *want,
                    Value::Bool(b) => b.to_string() == *want,
                    _ => false,
                })
            })
            .collect()
    }

    /// Waits until an access line with these fields exists (lines are
    /// written when a body finishes, a moment after the client has it).
    pub fn wait_access(&self, fields: &[(&str, &str)]) -> Result<Vec<Value>> {
        self.wait_accesses(fields, 1)
    }

    /// Waits until at least `n` access lines with these fields exist.
    pub fn wait_accesses(&self, fields: &[(&str, &str)], n: usize) -> Result<Vec<Value>> {
        let mut found = Vec::new();
        net::wait_for(
            &format!("{n} access lines {fields:?}"),
            Duration::from_secs(10),
            || {
                found = self.access_matching(fields);
                Ok(found.len() >= n)
            },
        )
        .map_err(|e| Error::Other(format!("{e}; proxy log:\n{}", self.log())))?;
        Ok(found)
    }
}

/// The value of the sample `series` in a Prometheus text exposition.
pub fn metric_in(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// The `pullthrough-proxy` binary for tests outside the proxy crate (which
/// cannot use `CARGO_BIN_EXE_pullthrough-proxy`): `PULLTHROUGH_PROXY_BIN`,
/// else `<target>/debug/pullthrough-proxy` when it is current, else a build
/// of the current tree — see [`crate::bins::workspace_bin`].
pub fn proxy_bin() -> Result<PathBuf> {
    crate::bins::workspace_bin("pullthrough-proxy", "pullthrough-proxy")
}

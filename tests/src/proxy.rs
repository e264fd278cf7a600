//! A `pullthrough-proxy` process under test: config written to a temp dir,
//! listeners on loopback, ready when `/readyz` answers, access-log lines
//! parsed from its stdout.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::error::{Error, IoContext, Result};
use crate::http::Get;
use crate::net;
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
}

pub struct Proxy {
    process: Option<Process>,
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub addrs: Addrs,
}

impl Proxy {
    /// Starts `bin` with `listen:` from `addrs` followed by `config_body`
    /// (the rest of the YAML: registries, defaultRegistry, ...).
    pub fn start(bin: &Path, addrs: Addrs, config_body: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("pt-proxy-")
            .tempdir()
            .ctx(|| "creating proxy temp dir".into())?;
        for a in [addrs.http, addrs.https, addrs.admin] {
            net::assert_loopback(a)?;
        }
        let mut proxy = Self {
            process: None,
            dir,
            bin: bin.to_path_buf(),
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
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--config")
            .arg(self.config_path())
            .arg("--reload-interval")
            .arg("200ms")
            .env("RUST_LOG", "info");
        let mut p = Process::spawn("pullthrough-proxy", cmd, self.dir.path().join("proxy.log"))?;
        let url = format!("http://{}/readyz", self.addrs.admin);
        p.wait_ready("pullthrough-proxy /readyz", Duration::from_secs(30), || {
            Ok(Get::new(&url).send().is_ok_and(|r| r.status.is_success()))
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

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.yaml")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
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
        let mut found = Vec::new();
        net::wait_for(
            &format!("access line {fields:?}"),
            Duration::from_secs(10),
            || {
                found = self.access_matching(fields);
                Ok(!found.is_empty())
            },
        )
        .map_err(|e| Error::Other(format!("{e}; proxy log:\n{}", self.log())))?;
        Ok(found)
    }
}

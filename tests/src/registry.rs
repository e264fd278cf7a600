//! A real upstream registry: `docker-registry` (distribution 2.8) on
//! loopback, plain HTTP, TLS with a test CA, or TLS + htpasswd Basic auth;
//! optionally a pull-through cache of another registry, and optionally
//! inside a test's network namespace ([`RegistryOpts::netns`]).

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::error::{IoContext, Result};
use crate::fixtures::Image;
use crate::http::Get;
use crate::net;
use crate::ns;
use crate::process::{Process, run};
use crate::tls::TestCa;

/// How clients reach and authenticate to the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flavour {
    Plain,
    Tls,
    /// TLS plus htpasswd Basic auth with one user.
    TlsHtpasswd {
        user: String,
        password: String,
    },
}

/// Start options; `RegistryOpts::new(flavour)` gives loopback defaults.
#[derive(Debug, Clone)]
pub struct RegistryOpts {
    pub flavour: Flavour,
    /// Address to bind (default 127.0.0.1).
    pub ip: IpAddr,
    /// Port (default: a free one).
    pub port: Option<u16>,
    /// Names the TLS certificate covers besides the bind IP and localhost.
    pub tls_names: Vec<String>,
    /// Makes this registry a pull-through cache of that URL.
    pub proxy_remote: Option<String>,
    /// Run inside this network namespace ([`crate::ns::NetNs::name`]);
    /// `ip` is then loopback (the namespace's own) or one of its addresses.
    pub netns: Option<String>,
}

impl RegistryOpts {
    pub fn new(flavour: Flavour) -> Self {
        Self {
            flavour,
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: None,
            tls_names: Vec::new(),
            proxy_remote: None,
            netns: None,
        }
    }
}

/// A running `docker-registry`; stopped on drop.
pub struct Registry {
    process: Option<Process>,
    dir: tempfile::TempDir,
    addr: SocketAddr,
    flavour: Flavour,
    ca_pem: Option<String>,
    config: PathBuf,
    netns: Option<String>,
}

impl Registry {
    /// Plain HTTP on a free 127.0.0.1 port.
    pub fn plain() -> Result<Self> {
        Self::start(RegistryOpts::new(Flavour::Plain))
    }

    /// HTTPS with a fresh test CA.
    pub fn tls() -> Result<Self> {
        Self::start(RegistryOpts::new(Flavour::Tls))
    }

    /// HTTPS + htpasswd Basic auth for `user`/`password`.
    pub fn htpasswd(user: &str, password: &str) -> Result<Self> {
        Self::start(RegistryOpts::new(Flavour::TlsHtpasswd {
            user: user.into(),
            password: password.into(),
        }))
    }

    pub fn start(opts: RegistryOpts) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("pt-registry-")
            .tempdir()
            .ctx(|| "creating registry temp dir".into())?;
        let port = match (opts.port, &opts.netns) {
            (Some(p), _) => p,
            // A fresh namespace has nothing bound but what the test put
            // there; any port free here (kernel-picked) will do.
            (None, Some(_)) => net::free_port()?,
            (None, None) => net::free_port_on(opts.ip)?,
        };
        let addr = SocketAddr::new(opts.ip, port);
        ns::assert_private_addr(addr, opts.netns.as_deref())?;

        let storage = dir.path().join("storage");
        std::fs::create_dir(&storage).ctx(|| "creating registry storage".into())?;
        let mut config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n\
             \x20 redirect:\n    disable: true\n\
             http:\n  addr: {addr}\n  secret: pullthrough-test-secret\n",
            storage = storage.display(),
        );

        let mut ca_pem = None;
        if opts.flavour != Flavour::Plain {
            let ca = TestCa::new("pullthrough test registry CA")?;
            let ip = opts.ip.to_string();
            let mut names: Vec<&str> = vec![ip.as_str(), "localhost"];
            names.extend(opts.tls_names.iter().map(String::as_str));
            let (crt, key) = ca.server(&names)?.write(dir.path(), "server")?;
            // Alone in its folder: skopeo reads every *.crt/*.key of a cert dir.
            let ca_dir = dir.path().join("ca");
            std::fs::create_dir(&ca_dir).ctx(|| "creating CA dir".into())?;
            ca.write_cert(&ca_dir.join("ca.crt"))?;
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                crt.display(),
                key.display()
            ));
            ca_pem = Some(ca.cert_pem());
        }
        if let Flavour::TlsHtpasswd { user, password } = &opts.flavour {
            let htpasswd = dir.path().join("htpasswd");
            // bcrypt is the only hash distribution accepts.
            let line = run(Command::new("htpasswd").args(["-Bbn", user, password]))?;
            std::fs::write(&htpasswd, line.trim_end().to_string() + "\n")
                .ctx(|| "writing htpasswd".into())?;
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: pullthrough-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        if let Some(remote) = &opts.proxy_remote {
            config.push_str(&format!("proxy:\n  remoteurl: {remote}\n"));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, &config).ctx(|| "writing registry config".into())?;

        let mut reg = Self {
            process: None,
            dir,
            addr,
            flavour: opts.flavour,
            ca_pem,
            config: config_path,
            netns: opts.netns,
        };
        reg.spawn()?;
        Ok(reg)
    }

    fn spawn(&mut self) -> Result<()> {
        let cmd = self.command(
            "docker-registry",
            [OsStr::new("serve"), self.config.as_os_str()],
        );
        let mut process =
            Process::spawn("docker-registry", cmd, self.dir.path().join("registry.log"))?;
        let url = format!("{}/v2/", self.url());
        let ca = self.ca_pem.clone();
        let netns = self.netns.clone();
        process.wait_ready("docker-registry /v2/", Duration::from_secs(30), || {
            // 401 is ready too: the htpasswd flavour challenges /v2/.
            let ready = |status: u16| status == 200 || status == 401;
            if let Some(name) = &netns {
                return Ok(ns::netns_http_status(name, &url).is_some_and(ready));
            }
            let mut get = Get::new(&url);
            get.timeout = Duration::from_secs(2);
            if let Some(ca) = &ca {
                get = get.ca(ca);
            }
            Ok(get.send().is_ok_and(|r| ready(r.status.as_u16())))
        })?;
        self.process = Some(process);
        Ok(())
    }

    /// Stops the registry (an upstream outage); its storage is kept.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut p) = self.process.take() {
            p.stop()?;
        }
        Ok(())
    }

    /// Starts it again on the same address with the same storage.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn()
    }

    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    pub fn pid(&self) -> u32 {
        self.process.as_ref().map_or(0, Process::pid)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The network namespace it serves in, if any.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// `program args...` where the registry's address is reachable: inside
    /// its network namespace, or as is.
    pub fn command<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        ns::maybe_in_netns(self.netns.as_deref(), program, args)
    }

    /// Pushes `image` (all platforms, digests preserved) as `repo:tag` with
    /// skopeo run where the registry is reachable; unlike
    /// [`Image::push`], also into a registry inside a network namespace.
    pub fn push_image(&self, image: &Image, repo: &str, tag: &str) -> Result<()> {
        let mut args: Vec<String> = [
            "--insecure-policy",
            "copy",
            "--all",
            "--preserve-digests",
            "-q",
        ]
        .map(String::from)
        .to_vec();
        args.extend(self.skopeo_flags("dest"));
        args.push(format!("oci:{}:{}", image.layout.display(), image.tag));
        args.push(format!("docker://{}/{repo}:{tag}", self.host()));
        run(&mut self.command("skopeo", args))?;
        Ok(())
    }

    /// `host:port` as written in image references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn scheme(&self) -> &'static str {
        if self.flavour == Flavour::Plain {
            "http"
        } else {
            "https"
        }
    }

    /// `http(s)://host:port`.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme(), self.addr)
    }

    pub fn flavour(&self) -> &Flavour {
        &self.flavour
    }

    /// The CA that signed the registry's certificate (TLS flavours).
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// Path of the CA certificate file (TLS flavours).
    pub fn ca_path(&self) -> Option<PathBuf> {
        self.ca_pem
            .as_ref()
            .map(|_| self.dir.path().join("ca").join("ca.crt"))
    }

    /// `user:password` for the htpasswd flavour.
    pub fn credentials(&self) -> Option<String> {
        match &self.flavour {
            Flavour::TlsHtpasswd { user, password } => Some(format!("{user}:{password}")),
            _ => None,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The registry's log, access log lines included.
    pub fn log(&self) -> String {
        std::fs::read(self.dir.path().join("registry.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Number of access-log lines for `METHOD path` where the path contains
    /// `path_part` (e.g. a digest). Counts what reached the upstream.
    pub fn count_requests(&self, method: &str, path_part: &str) -> usize {
        self.statuses(method, path_part).len()
    }

    /// Like [`Self::count_requests`], only the lines answered with
    /// `status` (the access log's field after the quoted request line):
    /// e.g. 200 for whole downloads of a blob, not the one-byte range
    /// GETs (206) a proxy makes to ask about access.
    pub fn count_answered(&self, method: &str, path_part: &str, status: u16) -> usize {
        let status = status.to_string();
        self.statuses(method, path_part)
            .iter()
            .filter(|s| s.as_deref() == Some(status.as_str()))
            .count()
    }

    /// The status of each access-log line for `METHOD path` where the
    /// path contains `path_part` (None where the line has none).
    fn statuses(&self, method: &str, path_part: &str) -> Vec<Option<String>> {
        let needle = format!("\"{method} ");
        self.log()
            .lines()
            .filter_map(|l| l.split(&needle).nth(1))
            .filter(|rest| {
                rest.split_whitespace()
                    .next()
                    .is_some_and(|path| path.contains(path_part))
            })
            .map(|rest| {
                rest.split_once("\" ")
                    .and_then(|(_, after)| after.split_whitespace().next())
                    .map(str::to_string)
            })
            .collect()
    }

    /// Waits until every request the registry answered so far is in its
    /// access log: sends a uniquely tagged `GET /v2/?marker=N` straight to
    /// it and waits (up to 10 s) for that line, which comes after them.
    pub fn sync_log(&self) -> Result<()> {
        use base64::Engine as _;
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let marker = format!("marker={}-{n}-end", std::process::id());
        let url = format!("{}/v2/?{marker}", self.url());
        let mut get = Get::new(&url);
        if let Some(ca) = self.ca_pem() {
            get = get.ca(ca);
        }
        if let Some(creds) = self.credentials() {
            let basic = base64::engine::general_purpose::STANDARD.encode(creds);
            get = get.header("Authorization", format!("Basic {basic}"));
        }
        // The answer does not matter, its access-log line does.
        let _ = get.send();
        net::wait_for(
            "the marker in the registry's log",
            Duration::from_secs(10),
            || Ok(self.count_requests("GET", &marker) == 1),
        )
    }

    /// Flags telling skopeo how to reach this registry as a destination
    /// (`dest`) or source (`src`).
    pub fn skopeo_flags(&self, side: &str) -> Vec<String> {
        let mut flags = Vec::new();
        match self.ca_path() {
            Some(ca) => {
                let cert_dir = ca.parent().map(Path::to_path_buf).unwrap_or_default();
                flags.push(format!("--{side}-cert-dir={}", cert_dir.display()));
            }
            None => flags.push(format!("--{side}-tls-verify=false")),
        }
        if let Some(creds) = self.credentials() {
            flags.push(format!("--{side}-creds={creds}"));
        }
        flags
    }
}

//! A SeaweedFS (`weed server`) with its S3 gateway on loopback: the object
//! store the proxy's shared tier is tested against. Built from its Go
//! module by `tests/tools/go-tools.sh` and cached by version.
//!
//! Every listener (master, volume, filer, S3 and their gRPC ports at
//! +10000) is on 127.0.0.1, telemetry is off (it would post to the
//! internet), and the optional Iceberg and Lance listeners are disabled.
//! Ready once a signed bucket creation succeeds. Stopped by PID with
//! SIGKILL: its graceful stop takes ~25 s and nothing of its state
//! matters after a test.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as Key;
use object_store::{Attribute, GetOptions, ObjectStore};

use crate::error::{Error, IoContext, Result};
use crate::net;
use crate::process::{self, Process};
use crate::tools;

const ACCESS_KEY: &str = "ptaccess";
const SECRET_KEY: &str = "ptsecret0123456789";
const REGION: &str = "us-east-1";

/// One object as listed (with its Content-Type from a HEAD).
#[derive(Debug, Clone)]
pub struct Object {
    pub key: String,
    pub size: u64,
    pub content_type: Option<String>,
}

struct Ports {
    master: u16,
    volume: u16,
    filer: u16,
    s3: u16,
}

pub struct SeaweedFs {
    process: Option<Process>,
    dir: tempfile::TempDir,
    ports: Ports,
    volumes: u32,
}

/// Size of one volume (`-master.volumeSizeLimitMB`), in MiB.
pub const VOLUME_MIB: u64 = 64;

/// Volumes a server gets from [`SeaweedFs::start`]: 16 × 64 MiB = 1 GiB
/// of objects, plenty for a test.
const DEFAULT_VOLUMES: u32 = 16;

impl SeaweedFs {
    pub fn start() -> Result<Self> {
        Self::start_with_volumes(DEFAULT_VOLUMES)
    }

    /// Like [`SeaweedFs::start`] with room for `volumes` volumes of
    /// [`VOLUME_MIB`] (`-volume.max`): a benchmark storing gigabytes needs
    /// more than the default 1 GiB.
    pub fn start_with_volumes(volumes: u32) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("pt-seaweed-")
            .tempdir()
            .ctx(|| "creating SeaweedFS temp dir".into())?;
        let ports = Ports {
            master: grpc_safe_port()?,
            volume: grpc_safe_port()?,
            filer: grpc_safe_port()?,
            s3: grpc_safe_port()?,
        };
        for d in ["data", "tmp"] {
            std::fs::create_dir(dir.path().join(d)).ctx(|| format!("creating {d}"))?;
        }
        let identities = serde_json::json!({
            "identities": [{
                "name": "pullthrough",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }]
        });
        std::fs::write(dir.path().join("s3.json"), identities.to_string())
            .ctx(|| "writing s3.json".into())?;
        let mut fs = Self {
            process: None,
            dir,
            ports,
            volumes: volumes.max(1),
        };
        fs.spawn()?;
        Ok(fs)
    }

    fn spawn(&mut self) -> Result<()> {
        let weed = tools::go_tool("weed")?;
        let p = &self.ports;
        let dir = self.dir.path();
        let mut cmd = Command::new(weed);
        cmd.arg("server")
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-dir={}", dir.join("data").display()))
            .arg(format!("-master.port={}", p.master))
            .arg(format!("-volume.port={}", p.volume))
            .args(["-filer=true", &format!("-filer.port={}", p.filer)])
            .args(["-s3", &format!("-s3.port={}", p.s3)])
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg(format!("-s3.config={}", dir.join("s3.json").display()))
            .arg("-master.telemetry=false")
            .arg(format!("-master.volumeSizeLimitMB={VOLUME_MIB}"))
            .arg(format!("-volume.max={}", self.volumes))
            // As AWS S3: writing to a bucket that does not exist is an error.
            .arg("-s3.autoCreateBucket=false")
            // Its unix sockets and temp files stay in the test's dir.
            .env("TMPDIR", dir.join("tmp"));
        let mut proc = Process::spawn("weed", cmd, dir.join("weed.log"))?;
        let probe = format!("probe-{}", std::process::id());
        proc.wait_ready(
            "SeaweedFS S3 to create a bucket",
            Duration::from_secs(60),
            || Ok(self.signed("PUT", &probe).is_ok_and(|code| code == "200")),
        )?;
        self.process = Some(proc);
        Ok(())
    }

    /// `http://127.0.0.1:<s3 port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.s3)
    }

    pub fn access_key(&self) -> &'static str {
        ACCESS_KEY
    }

    pub fn secret_key(&self) -> &'static str {
        SECRET_KEY
    }

    pub fn pid(&self) -> u32 {
        self.process.as_ref().map_or(0, Process::pid)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        self.process.as_ref().map(Process::log).unwrap_or_else(|| {
            std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default()
        })
    }

    pub fn create_bucket(&self, name: &str) -> Result<()> {
        match self.signed("PUT", name)?.as_str() {
            "200" => Ok(()),
            code => Err(Error::Other(format!("creating bucket {name}: HTTP {code}"))),
        }
    }

    /// A SigV4-signed request on `path` (curl signs it); the status code.
    fn signed(&self, method: &str, path: &str) -> Result<String> {
        let out = process::run(
            Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", method])
                .args([
                    "--max-time",
                    "5",
                    "--aws-sigv4",
                    &format!("aws:amz:{REGION}:s3"),
                ])
                .args(["--user", &format!("{ACCESS_KEY}:{SECRET_KEY}")])
                .arg(format!("{}/{path}", self.endpoint())),
        );
        match out {
            Ok(code) => Ok(code.trim().to_string()),
            // curl exits non-zero while nothing listens yet.
            Err(_) => Ok("000".into()),
        }
    }

    /// A client for `bucket`, as the proxy would build one.
    pub fn client(&self, bucket: &str) -> Result<Arc<dyn ObjectStore>> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let store = AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_virtual_hosted_style_request(false)
            .with_region(REGION)
            .with_bucket_name(bucket)
            .with_access_key_id(ACCESS_KEY)
            .with_secret_access_key(SECRET_KEY)
            .build()
            .map_err(|e| Error::Other(format!("S3 client for {bucket}: {e}")))?;
        Ok(Arc::new(store))
    }

    /// Every object under `prefix` in `bucket`, with its Content-Type.
    pub fn objects(&self, bucket: &str, prefix: &str) -> Result<Vec<Object>> {
        let store = self.client(bucket)?;
        let prefix = Key::from(prefix.trim_end_matches('/'));
        crate::http::runtime()?.block_on(async move {
            let listed: Vec<_> = store
                .list(Some(&prefix))
                .try_collect()
                .await
                .map_err(|e| Error::Other(format!("listing {prefix}: {e}")))?;
            let mut out = Vec::new();
            for m in listed {
                let head = GetOptions {
                    head: true,
                    ..GetOptions::default()
                };
                let content_type = match store.get_opts(&m.location, head).await {
                    Ok(r) => r
                        .attributes
                        .get(&Attribute::ContentType)
                        .map(|v| v.as_ref().to_string()),
                    // Deleted between the LIST and the HEAD.
                    Err(_) => continue,
                };
                out.push(Object {
                    key: m.location.to_string(),
                    size: m.size,
                    content_type,
                });
            }
            Ok(out)
        })
    }

    /// SIGKILL now (the "store went away" tests); [`Self::start_again`]
    /// brings it back on the same ports and data.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut p) = self.process.take() {
            p.kill()?;
        }
        Ok(())
    }

    pub fn start_again(&mut self) -> Result<()> {
        if self.process.is_none() {
            self.spawn()?;
        }
        Ok(())
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// A free 127.0.0.1 port whose +10000 (SeaweedFS's gRPC port for it) is
/// free too.
fn grpc_safe_port() -> Result<u16> {
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    for _ in 0..200 {
        let port = net::free_port_on(lo)?;
        if port < 55_000 && std::net::TcpListener::bind((lo, port + 10_000)).is_ok() {
            return Ok(port);
        }
    }
    Err(Error::Other(
        "no free port pair (p, p+10000) on 127.0.0.1".into(),
    ))
}

//! A SeaweedFS (`weed server`) with its S3 gateway on loopback: the object
//! store the proxy's shared tier is tested against. Built from its Go
//! module by `tests/tools/go-tools.sh` and cached by version.
//!
//! Every listener (master, volume, filer, S3 and their gRPC ports at
//! +10000, all below the ephemeral port range) is on 127.0.0.1, telemetry
//! is off (it would post to the internet), and the optional Iceberg and
//! Lance listeners are disabled. Its data, config, log and temp files live
//! in one directory; so do the filer's and the S3 gateway's unix sockets.
//! The four gRPC unix sockets have no flag and go to
//! `/tmp/seaweedfs-<service>-grpc-<port>.sock`: the handle removes them once
//! its process is gone.
//!
//! Ready once the store takes writes, not merely once it answers: a fresh
//! store creates buckets after ~2.5 s but its first object write blocks
//! until ~11 s (the master holds volume allocation after minting its
//! cluster id, the filer joins the lock ring late), and a restarted one
//! refuses writes while its master "warms up" (~15 s). So readiness is the
//! handle's bucket created (or found) plus one object written and deleted.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
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
/// The bucket made at start (readiness writes and deletes one object in it).
const BUCKET: &str = "pullthrough";
const PROBE_KEY: &str = "pt-testbed-ready-probe";
/// SeaweedFS serves each service's gRPC on its HTTP port + this.
const GRPC_OFFSET: u16 = 10_000;
/// A graceful stop took 0.6 s to ~16 s here (up to a 15 s budget when its
/// filer still has a metadata log to flush to the volume server that
/// already stopped): after this, SIGKILL. The volume server has closed its
/// volumes by then.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Each readiness phase (answering, then writable); a restart needs ~17 s.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// Longest unix socket path (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 100;

/// One object as listed (with its Content-Type from a HEAD).
#[derive(Debug, Clone)]
pub struct Object {
    pub key: String,
    pub size: u64,
    pub content_type: Option<String>,
}

/// The four HTTP ports; each one's gRPC port is +[`GRPC_OFFSET`].
#[derive(Debug, Clone, Copy)]
struct Ports {
    master: u16,
    volume: u16,
    filer: u16,
    s3: u16,
}

impl Ports {
    fn pick() -> Result<Self> {
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let pick = || net::free_port_with_partner_on(lo, GRPC_OFFSET);
        Ok(Self {
            master: pick()?,
            volume: pick()?,
            filer: pick()?,
            s3: pick()?,
        })
    }

    fn named(&self) -> [(&'static str, u16); 4] {
        [
            ("master", self.master),
            ("volume", self.volume),
            ("filer", self.filer),
            ("s3", self.s3),
        ]
    }
}

/// Where the store keeps its files: a temp dir of its own, or the caller's.
enum Dir {
    Own(tempfile::TempDir),
    Given(PathBuf),
}

impl Dir {
    fn path(&self) -> &Path {
        match self {
            Dir::Own(t) => t.path(),
            Dir::Given(p) => p,
        }
    }
}

/// A running `weed server` (master, volume, filer, S3 gateway); killed by
/// PID on drop.
pub struct SeaweedFs {
    process: Option<Process>,
    dir: Dir,
    ports: Ports,
    /// Unix sockets weed made outside `dir`, with the inode it made: each
    /// is removed once the process is gone, if it is still that file.
    outside_sockets: Vec<(PathBuf, u64)>,
    volumes: u32,
}

/// Size of one volume (`-master.volumeSizeLimitMB`), in MiB.
pub const VOLUME_MIB: u64 = 64;

/// Volumes a server gets from [`SeaweedFs::start`]: 64 × 64 MiB = 4 GiB of
/// objects, plenty for a test.
const DEFAULT_VOLUMES: u32 = 64;

impl SeaweedFs {
    /// Starts on free loopback ports with a temp dir of its own (removed on
    /// drop); returns once the store takes writes.
    pub fn start() -> Result<Self> {
        Self::start_with_volumes(DEFAULT_VOLUMES)
    }

    /// Like [`SeaweedFs::start`] with room for `volumes` volumes of
    /// [`VOLUME_MIB`] (`-volume.max`): a benchmark storing gigabytes needs
    /// more than the default.
    pub fn start_with_volumes(volumes: u32) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("pt-seaweed-")
            .tempdir()
            .ctx(|| "creating SeaweedFS temp dir".into())?;
        Self::start_with(Dir::Own(dir), volumes)
    }

    /// As [`Self::start`], with every file of the store in `dir` (an existing
    /// directory that the caller owns and removes): `data/`, `tmp/`,
    /// `s3.json`, `master.toml`, `weed.log`, the filer's and S3 gateway's
    /// unix sockets.
    pub fn start_in(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Other(format!(
                "SeaweedFS dir {} is not a directory",
                dir.display()
            )));
        }
        Self::start_with(Dir::Given(dir.to_path_buf()), DEFAULT_VOLUMES)
    }

    fn start_with(dir: Dir, volumes: u32) -> Result<Self> {
        let ports = Ports::pick()?;
        let root = dir.path();
        for d in ["data", "tmp"] {
            std::fs::create_dir_all(root.join(d)).ctx(|| format!("creating {d}"))?;
        }
        let identities = serde_json::json!({
            "identities": [{
                "name": "pullthrough",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }]
        });
        std::fs::write(root.join("s3.json"), identities.to_string())
            .ctx(|| "writing s3.json".into())?;
        // Read from the working directory. One volume per new bucket instead
        // of 7: with 7, `-volume.max` volumes run out after a few buckets
        // (writes then fail with 500), and growth is quicker.
        std::fs::write(
            root.join("master.toml"),
            "[master.volume_growth]\ncopy_1 = 1\n",
        )
        .ctx(|| "writing master.toml".into())?;
        let mut fs = Self {
            process: None,
            dir,
            ports,
            outside_sockets: Vec::new(),
            volumes: volumes.max(1),
        };
        fs.spawn()?;
        Ok(fs)
    }

    /// A unix socket path in the dir, or `None` (weed's default in /tmp)
    /// when the dir's path is too long for one.
    fn socket_in_dir(&self, name: &str) -> Option<PathBuf> {
        let path = self.dir.path().join(name);
        (path.as_os_str().len() <= MAX_SOCKET_PATH).then_some(path)
    }

    /// The unix sockets weed makes in /tmp: the gRPC ones always, the
    /// filer's and S3's when the dir could not hold them.
    fn sockets_outside(&self) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = self
            .ports
            .named()
            .iter()
            .map(|(name, port)| {
                PathBuf::from(format!(
                    "/tmp/seaweedfs-{name}-grpc-{}.sock",
                    port + GRPC_OFFSET
                ))
            })
            .collect();
        if self.socket_in_dir("filer.sock").is_none() {
            paths.push(format!("/tmp/seaweedfs-filer-{}.sock", self.ports.filer).into());
        }
        if self.socket_in_dir("s3.sock").is_none() {
            paths.push(format!("/tmp/seaweedfs-s3-{}.sock", self.ports.s3).into());
        }
        paths
    }

    fn command(&self) -> Result<Command> {
        let weed = tools::go_tool("weed")?;
        let p = &self.ports;
        let dir = self.dir.path();
        let mut cmd = Command::new(weed);
        cmd.arg("server")
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-dir={}", dir.join("data").display()))
            .arg(format!("-master.port={}", p.master))
            // Mandatory: the default posts to telemetry.seaweedfs.com.
            .arg("-master.telemetry=false")
            // A restarted master elects itself in ~1 s, not 10.
            .arg("-master.electionTimeout=1s")
            .arg(format!("-master.volumeSizeLimitMB={VOLUME_MIB}"))
            .arg(format!("-volume.max={}", self.volumes))
            .arg(format!("-volume.port={}", p.volume))
            // Close the volumes at once on SIGTERM (default: 10 s later,
            // after [`STOP_GRACE`] has run out).
            .arg("-volume.preStopSeconds=0")
            .args(["-filer=true", &format!("-filer.port={}", p.filer)])
            .args(["-s3", &format!("-s3.port={}", p.s3)])
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg(format!("-s3.config={}", dir.join("s3.json").display()))
            // As AWS S3: writing to a bucket that does not exist is an error.
            .arg("-s3.autoCreateBucket=false")
            // Its glog files (and any other temp file) stay in the dir; its
            // config files (master.toml) are looked up in `.` first.
            .env("TMPDIR", dir.join("tmp"))
            .current_dir(dir);
        if let Some(sock) = self.socket_in_dir("filer.sock") {
            cmd.arg(format!("-filer.localSocket={}", sock.display()));
        }
        if let Some(sock) = self.socket_in_dir("s3.sock") {
            cmd.arg(format!("-s3.localSocket={}", sock.display()));
        }
        Ok(cmd)
    }

    fn spawn(&mut self) -> Result<()> {
        let cmd = self.command()?;
        let mut proc = Process::spawn("weed", cmd, self.log_path())?;
        let res = self.wait_writable(&mut proc);
        // Whatever weed made in /tmp so far, so that it is removed with it
        // (also when it never got ready).
        self.note_outside_sockets();
        if let Err(e) = res {
            let _ = proc.kill();
            self.remove_outside_sockets();
            return Err(e);
        }
        self.process = Some(proc);
        Ok(())
    }

    /// Polls until the bucket can be created (or exists: a restart), then
    /// until an object can be written; deletes that object.
    fn wait_writable(&self, proc: &mut Process) -> Result<()> {
        proc.wait_ready(
            &format!("SeaweedFS S3 to create bucket {BUCKET}"),
            READY_TIMEOUT,
            // 409: BucketAlreadyOwnedByYou, on a restart or when an earlier
            // attempt timed out here but landed there.
            || {
                Ok(matches!(
                    self.curl("PUT", BUCKET, None, 5).as_str(),
                    "200" | "409"
                ))
            },
        )?;
        let probe = format!("{BUCKET}/{PROBE_KEY}");
        // One attempt at a time, each longer than weed's own 30 s retry of a
        // write: an abandoned attempt could land after the DELETE below.
        proc.wait_ready("SeaweedFS to take a write", READY_TIMEOUT, || {
            Ok(self.curl("PUT", &probe, Some("ready"), 40) == "200")
        })?;
        match self.curl("DELETE", &probe, None, 10).as_str() {
            "204" | "200" => Ok(()),
            code => Err(Error::Other(format!(
                "SeaweedFS: deleting the readiness probe: HTTP {code}; log {}:\n{}",
                self.log_path().display(),
                proc.log_tail(4000)
            ))),
        }
    }

    fn note_outside_sockets(&mut self) {
        for path in self.sockets_outside() {
            if let Ok(meta) = std::fs::symlink_metadata(&path)
                && meta.file_type().is_socket()
                && !self.outside_sockets.iter().any(|(p, _)| *p == path)
            {
                self.outside_sockets.push((path, meta.ino()));
            }
        }
    }

    /// Removes the sockets weed left in /tmp, each only if it is still the
    /// file this process made (a later server on the same port makes a new
    /// one). Call only once the process is gone.
    fn remove_outside_sockets(&mut self) {
        for (path, ino) in self.outside_sockets.drain(..) {
            if std::fs::symlink_metadata(&path).is_ok_and(|m| m.ino() == ino) {
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    /// A SigV4-signed request (curl signs it) on `path` below the endpoint;
    /// the HTTP status code, `000` when nothing answered in `max_secs`.
    fn curl(&self, method: &str, path: &str, body: Option<&str>, max_secs: u32) -> String {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", method])
            .args(["--max-time", &max_secs.to_string()])
            .args(["--aws-sigv4", &format!("aws:amz:{REGION}:s3")])
            .args(["--user", &format!("{ACCESS_KEY}:{SECRET_KEY}")]);
        if let Some(body) = body {
            cmd.args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
                .args(["-H", "content-type: text/plain"])
                .args(["--data-binary", body]);
        }
        cmd.arg(format!("{}/{path}", self.endpoint()));
        // curl exits non-zero while nothing listens yet or on a timeout.
        process::run(&mut cmd).map_or_else(|_| "000".into(), |code| code.trim().to_string())
    }

    /// `http://127.0.0.1:<s3 port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The S3 gateway's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.ports.s3))
    }

    /// Every TCP address it was told to listen on: master, volume, filer
    /// and S3, each with its gRPC port (+10000).
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.ports
            .named()
            .iter()
            .flat_map(|(_, port)| [*port, port + GRPC_OFFSET])
            .map(|port| SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            .collect()
    }

    /// The bucket created at start (empty, writable).
    pub fn bucket(&self) -> &'static str {
        BUCKET
    }

    pub fn access_key(&self) -> &'static str {
        ACCESS_KEY
    }

    pub fn secret_key(&self) -> &'static str {
        SECRET_KEY
    }

    /// The region requests are signed for (any works with SeaweedFS).
    pub fn region(&self) -> &'static str {
        REGION
    }

    /// The PID, or 0 while stopped.
    pub fn pid(&self) -> u32 {
        self.process.as_ref().map_or(0, Process::pid)
    }

    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("weed.log")
    }

    /// The whole log, across restarts.
    pub fn log(&self) -> String {
        std::fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Creates bucket `name` (an error if it exists).
    pub fn create_bucket(&self, name: &str) -> Result<()> {
        match self.curl("PUT", name, None, 30).as_str() {
            "200" => Ok(()),
            code => Err(Error::Other(format!("creating bucket {name}: HTTP {code}"))),
        }
    }

    /// A client for `bucket`, as the proxy would build one.
    pub fn client(&self, bucket: &str) -> Result<Arc<dyn ObjectStore>> {
        // object_store's reqwest needs a process-wide rustls provider; Err
        // means one is installed already.
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

    /// Replaces the object `key` of `bucket` with `bytes` (its attributes
    /// kept): a bucket whose content went bad behind the proxy's back.
    pub fn overwrite(&self, bucket: &str, key: &str, bytes: Vec<u8>) -> Result<()> {
        let store = self.client(bucket)?;
        let key = Key::from(key);
        crate::http::runtime()?.block_on(async move {
            let attributes = store
                .get_opts(
                    &key,
                    GetOptions {
                        head: true,
                        ..GetOptions::default()
                    },
                )
                .await
                .map_err(|e| Error::Other(format!("HEAD {key}: {e}")))?
                .attributes;
            let opts = object_store::PutOptions {
                attributes,
                ..Default::default()
            };
            store
                .put_opts(&key, bytes.into(), opts)
                .await
                .map_err(|e| Error::Other(format!("PUT {key}: {e}")))?;
            Ok(())
        })
    }

    /// The bytes of object `key` in `bucket`; `None` if there is none.
    pub fn read(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let store = self.client(bucket)?;
        let key = Key::from(key);
        crate::http::runtime()?.block_on(async move {
            match store.get_opts(&key, GetOptions::default()).await {
                Ok(r) => r
                    .bytes()
                    .await
                    .map(|b| Some(b.to_vec()))
                    .map_err(|e| Error::Other(format!("GET {key}: {e}"))),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(Error::Other(format!("GET {key}: {e}"))),
            }
        })
    }

    /// Every object under `prefix` in `bucket`, with its Content-Type (a
    /// HEAD each).
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

    /// SIGTERM, up to 5 s for it to exit (it closes its volumes first),
    /// then SIGKILL. Data stays for [`Self::start_again`].
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut p) = self.process.take() {
            p.stop_within(STOP_GRACE)?;
        }
        self.remove_outside_sockets();
        Ok(())
    }

    /// SIGKILL now (the "store went away" tests); data stays for
    /// [`Self::start_again`].
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut p) = self.process.take() {
            p.kill()?;
        }
        self.remove_outside_sockets();
        Ok(())
    }

    /// Starts it again, stopped or killed, on the same ports and data;
    /// returns once it takes writes (~17 s: a restarted master refuses
    /// writes while it warms up). A no-op while it runs.
    pub fn start_again(&mut self) -> Result<()> {
        if self.process.is_none() {
            self.spawn()?;
        }
        Ok(())
    }
}

impl Drop for SeaweedFs {
    /// SIGKILL: a graceful stop can take longer than a test cares to wait,
    /// and the data goes with the dir.
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

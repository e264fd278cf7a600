//! The servers under test as the load generator reaches them: the
//! upstream with its fixtures, the relay in front of it, pullthrough and
//! nginx with one test CA — and the load generator's requests to them,
//! on the test bed's client ([`Conn`]).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use http::StatusCode;
use object_store::{GetOptions, ObjectStore};
use pullthrough_testbed::fixtures::{Image, LayoutBuilder};
use pullthrough_testbed::http::{BodyMode, Conn, Fetched, Get};
use pullthrough_testbed::net::{free_port, is_listening};
use pullthrough_testbed::process::Process;
use pullthrough_testbed::proxy::{Addrs, Proxy};
use pullthrough_testbed::registry::Registry;
use pullthrough_testbed::relay::Relay;
use pullthrough_testbed::seaweed::{SeaweedFs, VOLUME_MIB};
use pullthrough_testbed::tls::{TestCa, client_config};
use rustls::ClientConfig;
use sha2::{Digest as _, Sha256};

use crate::{MIB, NG_MISS_REPO, REG, REPO, Res, Sizes};

/// pullthrough's path prefix (path mode, registry [`REG`]).
const PT_PREFIX: &str = "/v2/bench.test/";

/// Bound on any single transfer.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(600);

/// One server under test, as the load generator reaches it.
#[derive(Clone)]
pub struct Target {
    pub name: String,
    pub https: SocketAddr,
    pub http: SocketAddr,
    pub tls: Arc<ClientConfig>,
    /// The same trust, offering only `h2` by ALPN (as containerd's and
    /// every Go client's HTTPS requests do).
    pub tls_h2: Arc<ClientConfig>,
    /// Path prefix before `<repo>/...`: `/v2/bench.test/` for pullthrough
    /// (path mode), `/v2/` for nginx.
    pub prefix: &'static str,
    pub pid: u32,
    pub is_nginx: bool,
}

impl Target {
    pub fn blob(&self, repo: &str, digest: &str) -> String {
        format!("{}{repo}/blobs/{digest}", self.prefix)
    }

    pub fn manifest(&self, digest: &str) -> String {
        format!("{}{REPO}/manifests/{digest}", self.prefix)
    }

    /// An HTTP/2 connection to the HTTPS listener; an error if the server
    /// would not speak it.
    pub async fn connect_h2(&self) -> Res<Conn> {
        let conn = Conn::tls(
            self.https,
            self.tls_h2.clone(),
            &self.https.ip().to_string(),
        )
        .await?;
        if conn.version() != http::Version::HTTP_2 {
            return Err(format!("{}: no HTTP/2 over TLS (ALPN h2 refused)", self.name).into());
        }
        Ok(conn)
    }

    /// A kept-alive connection (HTTP/1.1) to the HTTPS or the plain
    /// listener.
    pub async fn connect(&self, tls: bool) -> Res<Conn> {
        Ok(if tls {
            Conn::tls(self.https, self.tls.clone(), &self.https.ip().to_string()).await?
        } else {
            Conn::plain(self.http).await?
        })
    }
}

/// GETs `path`, reading (and discarding) the body, noting when its first
/// byte arrived.
pub async fn get(conn: &mut Conn, path: &str, accept: Option<&str>) -> Res<Fetched> {
    let accept = accept.map(|a| ("accept", a));
    Ok(conn.get(path, accept.as_slice(), BodyMode::Count).await?)
}

/// One GET on a fresh connection, bounded in time.
pub async fn get_once(t: &Target, tls: bool, path: &str) -> Res<Fetched> {
    tokio::time::timeout(TRANSFER_TIMEOUT, async {
        let mut conn = t.connect(tls).await?;
        get(&mut conn, path, None).await
    })
    .await
    .map_err(|_| format!("{}: GET {path} timed out", t.name))?
}

/// The response was a whole `200` (of `want_bytes` when given).
pub fn check(t: &Target, f: &Fetched, want_bytes: Option<u64>, what: &str) -> Res<()> {
    if f.status != StatusCode::OK {
        return Err(format!("{}: {what}: status {}", t.name, f.status.as_u16()).into());
    }
    if let Some(e) = &f.error {
        return Err(format!("{}: {what}: body: {e}", t.name).into());
    }
    if let Some(n) = want_bytes
        && f.bytes != n
    {
        return Err(format!("{}: {what}: {} bytes, want {n}", t.name, f.bytes).into());
    }
    Ok(())
}

/// Counts nginx responses that were not cache hits (pullthrough sends no
/// such header; its hits are checked in its access log).
pub fn not_hit(t: &Target, fetches: &[Fetched]) -> usize {
    if !t.is_nginx {
        return 0;
    }
    fetches
        .iter()
        .filter(|f| f.header("x-cache-status") != Some("HIT"))
        .count()
}

pub fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

/// The random-layer images the scenarios read, pushed to the upstream.
pub struct Fixtures {
    pub big: Image,
    pub many: Image,
    pub miss: Image,
}

fn fixtures(sizes: &Sizes, upstream: &Registry) -> Res<Fixtures> {
    let layout = tempfile::Builder::new()
        .prefix("pt-bench-layout-")
        .tempdir()?;
    let t = Instant::now();
    let mut b = LayoutBuilder::new(layout.path())?;
    let big = b.random("big", &[sizes.big], 0xb16)?;
    big.push(upstream, REPO, "big")?;
    let many = b.random("many", &vec![sizes.many_size; sizes.many_count], 0x3a7)?;
    many.push(upstream, REPO, "many")?;
    // Blobs 0 and 1: the unthrottled MISS phase; 2 and 3: the throttled one.
    let miss = b.random(
        "miss",
        &[
            sizes.miss_size,
            sizes.miss_size,
            sizes.throttle_size,
            sizes.throttle_size,
        ],
        0x5155,
    )?;
    miss.push(upstream, REPO, "miss")?;
    miss.push(upstream, NG_MISS_REPO, "miss")?;
    eprintln!(
        "fixtures built and pushed in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    // The layout is dropped (removed) here; the upstream holds the blobs.
    Ok(Fixtures { big, many, miss })
}

/// Everything a run starts; dropped (every process stopped by PID) in
/// the order the fields are declared.
pub struct Bench {
    pub nginx: Nginx,
    pub proxy: Proxy,
    pub relay: Relay,
    pub upstream: Registry,
    pub fx: Fixtures,
    pub pt: Target,
    pub ng: Target,
    /// The pullthrough binary under test.
    pub bin: PathBuf,
    /// pullthrough's config after `listen:`/`dataDir:` (CA, registry,
    /// upstream through the relay): the replicas of the scale-out phase
    /// start from it.
    pub proxy_config: String,
    /// Trusts the test CA every server's HTTPS leaf comes from.
    pub tls: Arc<ClientConfig>,
    _certs: tempfile::TempDir,
}

impl Bench {
    /// The upstream with the fixtures, the relay, pullthrough (`bin`) and
    /// nginx, both serving HTTPS with one test CA.
    pub fn start(sizes: &Sizes, bin: &Path) -> Res<Self> {
        let upstream = Registry::tls()?;
        let upstream_ca = upstream.ca_path().ok_or("TLS registry without a CA")?;
        let fx = fixtures(sizes, &upstream)?;
        // Both proxies reach the upstream through the relay (unlimited until
        // the throttled MISS phase): the MISS figures are then taken with an
        // upstream slower than the machine, as the internet is.
        let relay = Relay::start(upstream.addr())?;
        let upstream_url = format!("{}://{}", upstream.scheme(), relay.addr);

        // One test CA for both servers' HTTPS listeners.
        let certs = tempfile::Builder::new()
            .prefix("pt-bench-certs-")
            .tempdir()?;
        let ca = TestCa::new("pullthrough bench CA")?;
        let ca_crt = certs.path().join("ca.crt");
        let ca_key = certs.path().join("ca.key");
        ca.write_cert(&ca_crt)?;
        std::fs::write(&ca_key, ca.key_pem())?;
        let (leaf_crt, leaf_key) = ca
            .server(&["127.0.0.1", "localhost"])?
            .write(certs.path(), "nginx")?;
        let tls = Arc::new(client_config(&ca.cert_pem())?);
        let tls_h2 = {
            let mut c = client_config(&ca.cert_pem())?;
            c.alpn_protocols = vec![b"h2".to_vec()];
            Arc::new(c)
        };

        let proxy_config = format!(
            "ca: {{cert: '{}', key: '{}'}}\nregistries:\n  - host: {REG}\n    upstream: {}\n    caBundle: '{}'\n",
            ca_crt.display(),
            ca_key.display(),
            upstream_url,
            upstream_ca.display()
        );
        let proxy = Proxy::start(bin, Addrs::localhost()?, &proxy_config)?;
        let nginx = Nginx::start(relay.addr, &upstream_ca, &leaf_crt, &leaf_key)?;
        eprintln!(
            "upstream {} (pid {}), pullthrough {} (pid {}), nginx {} (pid {}, dir {})",
            upstream.url(),
            upstream.pid(),
            proxy.https_url(),
            proxy.pid(),
            nginx.https,
            nginx.process.pid(),
            nginx.dir.path().display()
        );
        let pt = Target {
            name: "pullthrough".into(),
            https: proxy.addrs.https,
            http: proxy.addrs.http,
            tls: tls.clone(),
            tls_h2: tls_h2.clone(),
            prefix: PT_PREFIX,
            pid: proxy.pid(),
            is_nginx: false,
        };
        let ng = Target {
            name: "nginx".into(),
            https: nginx.https,
            http: nginx.http,
            tls: tls.clone(),
            tls_h2,
            prefix: "/v2/",
            pid: nginx.process.pid(),
            is_nginx: true,
        };
        Ok(Self {
            nginx,
            proxy,
            relay,
            upstream,
            fx,
            pt,
            ng,
            bin: bin.to_path_buf(),
            proxy_config,
            tls,
            _certs: certs,
        })
    }
}

// ---------------------------------------------------------------- replicas

/// Bucket the replicas share, and the key prefix they write under.
const BUCKET: &str = "bench";
const BUCKET_PREFIX: &str = "pullthrough";

/// Several pullthrough replicas over one SeaweedFS bucket (`storage:`),
/// with one CA (the bench's) and a static peer list (`peers:`), as
/// `proxy/tests/shared_storage.rs` starts them: a miss is fetched from the
/// upstream once by the digest's owner, the others stream it from the
/// owner over mutual TLS; a replica whose disk lacks a blob the bucket
/// holds serves it from the bucket (`SHARED_HIT`). Dropped (every process
/// stopped by PID, replicas first) in field order.
pub struct Cluster {
    pub replicas: Vec<Proxy>,
    pub s3: SeaweedFs,
    pub targets: Vec<Target>,
    /// Peer listener of replica i, the static list every replica has.
    pub peers: Vec<SocketAddr>,
    _creds: tempfile::TempDir,
}

impl Cluster {
    /// SeaweedFS with room for `capacity` bytes of objects, a bucket, and
    /// `n` replicas of `b.bin` with `b`'s registry config.
    pub fn start(b: &Bench, n: usize, capacity: u64) -> Res<Self> {
        let volume = VOLUME_MIB * MIB;
        // A quarter more than the objects, and a few volumes spare: a
        // volume is not filled to the byte.
        let volumes = u32::try_from((capacity + capacity / 4).div_ceil(volume) + 4)?;
        let s3 = SeaweedFs::start_with_volumes(volumes)?;
        s3.create_bucket(BUCKET)?;
        let creds = tempfile::Builder::new()
            .prefix("pt-bench-s3creds-")
            .tempdir()?;
        std::fs::write(creds.path().join("accessKeyId"), s3.access_key())?;
        std::fs::write(creds.path().join("secretAccessKey"), s3.secret_key())?;
        let storage = format!(
            "storage:\n  s3:\n    endpoint: '{}'\n    allowHttp: true\n    pathStyle: true\n    bucket: {BUCKET}\n    prefix: {BUCKET_PREFIX}\n    credentials: {{source: files, dir: '{}'}}\n",
            s3.endpoint(),
            creds.path().display()
        );
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let peers = (0..n)
            .map(|_| Ok(SocketAddr::new(lo, free_port()?)))
            .collect::<Res<Vec<_>>>()?;
        let list = peers
            .iter()
            .map(|p| format!("'{p}'"))
            .collect::<Vec<_>>()
            .join(", ");
        // A replica that fails to start drops (stops) those before it.
        let replicas = peers
            .iter()
            .map(|me| {
                let config = format!(
                    "{}peers:\n  listen: '{me}'\n  static: [{list}]\n{storage}",
                    b.proxy_config
                );
                Ok(Proxy::start(&b.bin, Addrs::localhost()?, &config)?)
            })
            .collect::<Res<Vec<_>>>()?;
        let targets = replicas
            .iter()
            .enumerate()
            .map(|(i, p)| Target {
                name: format!("replica {i}"),
                https: p.addrs.https,
                http: p.addrs.http,
                tls: b.tls.clone(),
                tls_h2: b.pt.tls_h2.clone(),
                prefix: PT_PREFIX,
                pid: p.pid(),
                is_nginx: false,
            })
            .collect();
        Ok(Self {
            replicas,
            s3,
            targets,
            peers,
            _creds: creds,
        })
    }

    /// Index of the replica that owns `digest`: rendezvous hashing as the
    /// proxy computes it (`proxy/src/peers/rendezvous.rs`: highest first 8
    /// bytes of sha256("<peer addr>/<hex>"), ties to the higher address).
    /// A prediction: the scenario checks it against the access logs.
    pub fn owner(&self, digest: &str) -> usize {
        let hex = digest.trim_start_matches("sha256:");
        let score = |p: &SocketAddr| {
            let mut h = Sha256::new();
            h.update(p.to_string().as_bytes());
            h.update(b"/");
            h.update(hex.as_bytes());
            let out = h.finalize();
            let mut first = [0u8; 8];
            first.copy_from_slice(&out[..8]);
            u64::from_be_bytes(first)
        };
        (0..self.peers.len())
            .max_by_key(|&i| (score(&self.peers[i]), self.peers[i]))
            .unwrap_or(0)
    }

    /// Removes `digest` from replica i's disk (`DELETE /admin/cache` with
    /// `scope=local`: the bucket and the other replicas keep it, which is
    /// what the S3 HIT phases read from). Blocking: call it outside the
    /// runtime.
    pub fn purge(&self, i: usize, digest: &str) -> Res<()> {
        let url = format!(
            "http://{}/admin/cache?digest={digest}&scope=local",
            self.replicas[i].addrs.admin
        );
        let resp = Get::new(&url).method(http::Method::DELETE).send()?;
        if resp.status != StatusCode::OK {
            return Err(format!(
                "replica {i}: purge {digest}: {} {}",
                resp.status,
                String::from_utf8_lossy(&resp.body)
            )
            .into());
        }
        if self.replicas[i].cached_blob_path(digest).exists() {
            return Err(format!("replica {i}: {digest} still on disk after the purge").into());
        }
        Ok(())
    }

    /// Access-log lines of replica i for blob `digest` with these fields.
    pub fn lines(&self, i: usize, digest: &str, fields: &[(&str, &str)]) -> usize {
        let mut all = vec![("digest", digest), ("kind", "blob")];
        all.extend_from_slice(fields);
        self.replicas[i].access_matching(&all).len()
    }

    /// Waits (up to 10 s: lines are written as bodies end) until replica
    /// i has at least `n` such lines; the count then.
    pub fn wait_lines(&self, i: usize, digest: &str, fields: &[(&str, &str)], n: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let have = self.lines(i, digest, fields);
            if have >= n || Instant::now() > deadline {
                return have;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Blob objects in the bucket, as (digest hex, size).
    pub fn bucket_blobs(&self) -> Res<Vec<(String, u64)>> {
        Ok(self
            .s3
            .objects(BUCKET, &format!("{BUCKET_PREFIX}/blobs/"))?
            .into_iter()
            .map(|o| {
                let hex = o.key.rsplit('/').next().unwrap_or_default().to_string();
                (hex, o.size)
            })
            .collect())
    }

    /// Reads blob `digest`'s object straight from the bucket, `reps`
    /// times, with the S3 client the proxy uses (object_store), in the
    /// load generator: the bucket's own speed, best MiB/s. Blocking.
    pub fn read_object(&self, rt: &tokio::runtime::Runtime, digest: &str, reps: usize) -> Res<f64> {
        let hex = digest.trim_start_matches("sha256:");
        let key = self
            .s3
            .objects(BUCKET, &format!("{BUCKET_PREFIX}/blobs/"))?
            .into_iter()
            .find(|o| o.key.ends_with(hex))
            .ok_or_else(|| format!("{digest} is not in the bucket"))?
            .key;
        let store = self.s3.client(BUCKET)?;
        let path = object_store::path::Path::from(key);
        rt.block_on(async {
            let mut best = 0.0f64;
            for _ in 0..reps {
                let start = Instant::now();
                let got = store.get_opts(&path, GetOptions::default()).await?;
                let mut chunks = got.into_stream();
                let mut bytes = 0u64;
                while let Some(chunk) = chunks.next().await {
                    bytes += chunk?.len() as u64;
                }
                best = best.max(mbps(bytes, start.elapsed()));
            }
            Res::Ok(best)
        })
    }

    /// Waits (up to `timeout`) until every digest is an object in the
    /// bucket (uploads finish after the client has its last byte).
    pub fn wait_in_bucket(&self, digests: &[&str], timeout: Duration) -> Res<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let have = self.bucket_blobs()?;
            let missing: Vec<&&str> = digests
                .iter()
                .filter(|d| !have.iter().any(|(h, _)| d.ends_with(h.as_str())))
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} blobs not in the bucket after {timeout:?}: {missing:?}",
                    missing.len()
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Blobs each replica uploaded to the bucket (`/admin/stats`).
    pub fn uploads(&self) -> Res<Vec<u64>> {
        self.replicas
            .iter()
            .map(|p| {
                let resp = Get::new(&format!("http://{}/admin/stats", p.addrs.admin)).send()?;
                let v: serde_json::Value = serde_json::from_slice(&resp.body)?;
                Ok(v["sharedStorage"]["uploads"]["uploaded"]
                    .as_u64()
                    .unwrap_or(0))
            })
            .collect()
    }

    /// PIDs of the replicas and of SeaweedFS.
    pub fn pids(&self) -> (Vec<u32>, u32) {
        (
            self.replicas.iter().map(Proxy::pid).collect(),
            self.s3.pid(),
        )
    }
}

// ---------------------------------------------------------------- nginx

/// nginx under its own prefix in a temp dir, stopped by PID on drop.
pub struct Nginx {
    pub process: Process,
    pub dir: tempfile::TempDir,
    pub http: SocketAddr,
    pub https: SocketAddr,
}

impl Nginx {
    fn start(up: SocketAddr, upstream_ca: &Path, crt: &Path, key: &Path) -> Res<Self> {
        let dir = tempfile::Builder::new()
            .prefix("pt-bench-nginx-")
            .tempdir()?;
        let d = dir.path();
        for sub in [
            "cache",
            "temp/client",
            "temp/proxy",
            "temp/fastcgi",
            "temp/uwsgi",
            "temp/scgi",
            "logs",
        ] {
            std::fs::create_dir_all(d.join(sub))?;
        }
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let https: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let dp = d.display();
        // As rpardini/docker-registry-proxy (the seed's successor) does it:
        // key = $uri, proxy_cache_lock, long validity, one cache zone.
        let conf = format!(
            r#"user root root;
worker_processes auto;
pid {dp}/nginx.pid;
error_log {dp}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {dp}/logs/access.log;
    client_body_temp_path {dp}/temp/client;
    proxy_temp_path {dp}/temp/proxy;
    fastcgi_temp_path {dp}/temp/fastcgi;
    uwsgi_temp_path {dp}/temp/uwsgi;
    scgi_temp_path {dp}/temp/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 300s;
    keepalive_requests 100000;
    proxy_cache_path {dp}/cache levels=1:2 keys_zone=cache:10m max_size=32g inactive=60d use_temp_path=off;
    server {{
        listen {http};
        listen {https} ssl http2;
        ssl_certificate {crt};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location /v2/ {{
            proxy_pass https://{up};
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 900s;
            proxy_cache cache;
            proxy_cache_key $uri;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 880s;
            proxy_cache_valid 200 206 60d;
            add_header X-Cache-Status $upstream_cache_status always;
        }}
    }}
}}
"#,
            crt = crt.display(),
            key = key.display(),
            ca = upstream_ca.display(),
        );
        let conf_path = d.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let mut cmd = Command::new("nginx");
        cmd.arg("-p")
            .arg(d)
            .arg("-e")
            .arg(d.join("logs/error.log"))
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", "daemon off;"]);
        let mut process = Process::spawn("nginx", cmd, d.join("logs/stdout.log"))?;
        process.wait_ready("nginx listeners", Duration::from_secs(20), || {
            Ok(is_listening(http) && is_listening(https))
        })?;
        Ok(Self {
            process,
            dir,
            http,
            https,
        })
    }

    /// Worker PIDs (children of the master titled "worker process"; the
    /// cache manager and loader are left out).
    pub fn workers(&self) -> Vec<u32> {
        crate::procfs::children(self.process.pid())
            .into_iter()
            .filter(|p| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains("worker process"))
            })
            .collect()
    }

    /// nginx's error log, for a failure report.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("logs/error.log")).unwrap_or_default()
    }
}

// ---------------------------------------------------------------- binary

fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `target/release/pullthrough-proxy`, built now (cargo is quick when it is
/// up to date); `PULLTHROUGH_PROXY_BIN` overrides.
pub fn proxy_release_bin() -> Res<PathBuf> {
    if let Some(p) = std::env::var_os("PULLTHROUGH_PROXY_BIN") {
        return Ok(PathBuf::from(p));
    }
    let ws = workspace_dir();
    eprintln!("building: cargo build --release -p pullthrough-proxy");
    // `cargo` from PATH (rustup honours rust-toolchain.toml) with the
    // `CARGO_*` variables of `cargo run` removed: they would change the
    // build's fingerprints and rebuild everything on every run.
    let mut cmd = Command::new("cargo");
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("CARGO") && k != "CARGO_HOME" && k != "CARGO_TARGET_DIR" {
            cmd.env_remove(k);
        }
    }
    let status = cmd
        .current_dir(&ws)
        .args(["build", "--release", "-p", "pullthrough-proxy"])
        .status()?;
    if !status.success() {
        return Err("cargo build --release -p pullthrough-proxy failed".into());
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| ws.join("target"));
    Ok(target.join("release/pullthrough-proxy"))
}

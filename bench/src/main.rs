//! `pullthrough-bench`: pullthrough-proxy and nginx (configured like the
//! seed's successor: `proxy_cache` + `proxy_cache_lock`, cache key = path,
//! `sendfile on`) side by side on loopback, in front of one real
//! `docker-registry` upstream holding random-layer fixtures.
//!
//! Run it with `cargo run --release -p pullthrough-bench [-- --quick]`.
//! It builds `target/release/pullthrough-proxy` itself
//! (`cargo build --release -p pullthrough-proxy`; `PULLTHROUGH_PROXY_BIN`
//! overrides). Every process it starts (registry, proxy, nginx) is stopped
//! by PID when it ends, also on error. Loads are bounded in request count
//! and time, loopback only. Not part of the test suite.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use pullthrough_testbed::fixtures::{Image, LayoutBuilder, OCI_MANIFEST};
use pullthrough_testbed::net::{free_port, is_listening};
use pullthrough_testbed::process::Process;
use pullthrough_testbed::proxy::{Addrs, Proxy};
use pullthrough_testbed::registry::Registry;
use pullthrough_testbed::tls::{TestCa, client_config};
use rustls::ClientConfig;
use tokio::net::TcpStream;

mod relay;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;
type Sender = SendRequest<Empty<Bytes>>;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// The registry name pullthrough serves the upstream as (path mode).
const REG: &str = "bench.test";
/// Upstream repository of the HIT fixtures and pullthrough's MISS blobs.
const REPO: &str = "bench";
/// Upstream repository nginx's MISS requests go to (same digests, other
/// paths, so the upstream access log counts each proxy's fetches apart).
const NG_MISS_REPO: &str = "missng";
/// Bound on any single transfer.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(600);

/// Sizes of one run (`--quick` or full).
#[derive(Debug, Clone, Copy)]
struct Sizes {
    big: u64,
    many_count: usize,
    many_size: u64,
    many_clients: usize,
    rate: u64,
    rate_secs: u64,
    miss_size: u64,
    miss_clients: usize,
    /// Upstream rate (bytes/s) of the throttled MISS phase, and its blob
    /// size: the fetch must stay under nginx's `proxy_cache_lock_age`
    /// (5 s) or nginx sends more upstream GETs every 5 s (seen: 256 MiB at
    /// 16 MiB/s gave 5 and 21 GETs, 80 s and 337 s), and 50 × rate must
    /// fit what 2 cores can serve over HTTPS next to the load generator.
    throttle: u64,
    throttle_size: u64,
    rss_total: u64,
    rss_streams: usize,
}

const FULL: Sizes = Sizes {
    big: GIB,
    many_count: 16,
    many_size: 64 * MIB,
    many_clients: 32,
    rate: 500,
    rate_secs: 10,
    miss_size: 256 * MIB,
    miss_clients: 50,
    throttle: 16 * MIB,
    throttle_size: 64 * MIB,
    rss_total: 8 * GIB,
    rss_streams: 64,
};

const QUICK: Sizes = Sizes {
    big: 256 * MIB,
    many_count: 16,
    many_size: 16 * MIB,
    many_clients: 32,
    rate: 500,
    rate_secs: 4,
    miss_size: 64 * MIB,
    miss_clients: 50,
    throttle: 16 * MIB,
    throttle_size: 64 * MIB,
    rss_total: 2 * GIB,
    rss_streams: 64,
};

/// One server under test, as the load generator reaches it.
#[derive(Clone)]
struct Target {
    name: &'static str,
    https: SocketAddr,
    http: SocketAddr,
    tls: Arc<ClientConfig>,
    /// Path prefix before `<repo>/...`: `/v2/bench.test/` for pullthrough
    /// (path mode), `/v2/` for nginx.
    prefix: &'static str,
    pid: u32,
    is_nginx: bool,
}

impl Target {
    fn blob(&self, repo: &str, digest: &str) -> String {
        format!("{}{repo}/blobs/{digest}", self.prefix)
    }
    fn manifest(&self, digest: &str) -> String {
        format!("{}{REPO}/manifests/{digest}", self.prefix)
    }
}

/// What one GET saw.
#[derive(Debug, Clone)]
struct Fetch {
    status: u16,
    bytes: u64,
    start: Instant,
    first_byte: Option<Instant>,
    end: Instant,
    cache_status: Option<String>,
}

async fn connect(addr: SocketAddr, tls: Option<Arc<ClientConfig>>) -> Res<Sender> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let sender = match tls {
        Some(cfg) => {
            let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
            let stream = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await?;
            let (sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            sender
        }
        None => {
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            sender
        }
    };
    Ok(sender)
}

async fn connect_to(t: &Target, tls: bool) -> Res<Sender> {
    if tls {
        connect(t.https, Some(t.tls.clone())).await
    } else {
        connect(t.http, None).await
    }
}

/// GETs `path`, reading (and discarding) the body, noting when its first
/// byte arrived.
async fn get(
    sender: &mut Sender,
    host: SocketAddr,
    path: &str,
    accept: Option<&str>,
) -> Res<Fetch> {
    sender.ready().await?;
    let mut req = http::Request::builder()
        .uri(path)
        .header(http::header::HOST, host.to_string());
    if let Some(a) = accept {
        req = req.header(http::header::ACCEPT, a);
    }
    let req = req.body(Empty::new())?;
    let start = Instant::now();
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let cache_status = resp
        .headers()
        .get("x-cache-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut body = resp.into_body();
    let mut bytes = 0u64;
    let mut first_byte = None;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if first_byte.is_none() && !data.is_empty() {
                first_byte = Some(Instant::now());
            }
            bytes += data.len() as u64;
        }
    }
    Ok(Fetch {
        status,
        bytes,
        start,
        first_byte,
        end: Instant::now(),
        cache_status,
    })
}

/// One GET on a fresh connection, bounded in time.
async fn get_once(t: &Target, tls: bool, path: &str) -> Res<Fetch> {
    let addr = if tls { t.https } else { t.http };
    tokio::time::timeout(TRANSFER_TIMEOUT, async {
        let mut s = connect_to(t, tls).await?;
        get(&mut s, addr, path, None).await
    })
    .await
    .map_err(|_| format!("{}: GET {path} timed out", t.name))?
}

fn check(t: &Target, f: &Fetch, want_bytes: Option<u64>, what: &str) -> Res<()> {
    if f.status != 200 {
        return Err(format!("{}: {what}: status {}", t.name, f.status).into());
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
fn not_hit(t: &Target, fetches: &[Fetch]) -> usize {
    if !t.is_nginx {
        return 0;
    }
    fetches
        .iter()
        .filter(|f| f.cache_status.as_deref() != Some("HIT"))
        .count()
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

// ---------------------------------------------------------------- nginx

/// nginx under its own prefix in a temp dir, stopped by PID on drop.
struct Nginx {
    process: Process,
    dir: tempfile::TempDir,
    http: SocketAddr,
    https: SocketAddr,
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
        listen {https} ssl;
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
    fn workers(&self) -> Vec<u32> {
        children(self.process.pid())
            .into_iter()
            .filter(|p| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains("worker process"))
            })
            .collect()
    }
}

fn children(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

/// A `VmXXX:` field of /proc/<pid>/status, in KiB.
/// CPU time (user + system) a process has used, in clock ticks (1/100 s
/// on Linux); 0 if unreadable.
fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the `(comm)`, which may contain spaces.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: u64 = f.get(11)?.parse().ok()?;
            let stime: u64 = f.get(12)?.parse().ok()?;
            Some(utime + stime)
        })
        .unwrap_or(0)
}

fn vm_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Resets VmHWM to the current RSS (`echo 5 > clear_refs`).
fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

// ---------------------------------------------------------------- setup

fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `target/release/pullthrough-proxy`, built now (cargo is quick when it is
/// up to date); `PULLTHROUGH_PROXY_BIN` overrides.
fn proxy_release_bin() -> Res<PathBuf> {
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

struct Fixtures {
    big: Image,
    many: Image,
    miss: Image,
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

// ---------------------------------------------------------------- report

struct Row {
    name: String,
    pt: f64,
    ng: f64,
    unit: &'static str,
    /// Ratio shown as pullthrough / nginx.
    target: String,
    met: Option<bool>,
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| figure | pullthrough | nginx | ratio (pt/nginx) | target | met |\n|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let ratio = if r.ng != 0.0 {
            format!("{:.2}×", r.pt / r.ng)
        } else {
            "–".into()
        };
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "–",
        };
        let cell = |v: f64| {
            if r.unit.is_empty() {
                format!("{v}")
            } else {
                format!("{} {}", fmt_num(v), r.unit)
            }
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            r.name,
            cell(r.pt),
            cell(r.ng),
            ratio,
            r.target,
            met
        );
    }
    s
}

// ---------------------------------------------------------------- benchmarks

async fn warm(t: &Target, f: &Fixtures) -> Res<()> {
    let start = Instant::now();
    let big = &f.big.manifests[0].layers[0];
    let r = get_once(t, true, &t.blob(REPO, &big.digest)).await?;
    check(t, &r, Some(big.size), "warm big")?;
    for l in &f.many.manifests[0].layers {
        let r = get_once(t, true, &t.blob(REPO, &l.digest)).await?;
        check(t, &r, Some(l.size), "warm many")?;
    }
    let m = &f.big.manifests[0];
    let addr = t.https;
    let mut s = connect_to(t, true).await?;
    let r = get(&mut s, addr, &t.manifest(&m.digest), Some(OCI_MANIFEST)).await?;
    check(t, &r, Some(m.bytes.len() as u64), "warm manifest")?;
    // nginx writes the cache entry when the download ends; confirm a hit.
    let r = get_once(t, true, &t.blob(REPO, &big.digest)).await?;
    check(t, &r, Some(big.size), "confirm big")?;
    if t.is_nginx && r.cache_status.as_deref() != Some("HIT") {
        return Err(format!("nginx did not hit its cache: {:?}", r.cache_status).into());
    }
    eprintln!(
        "{}: caches warm in {:.1}s",
        t.name,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// One client, one big blob, `reps` times; best throughput (MiB/s).
async fn single_big(t: &Target, f: &Fixtures, tls: bool, reps: usize) -> Res<(f64, usize)> {
    let big = &f.big.manifests[0].layers[0];
    let mut best = 0.0f64;
    let mut misses = 0;
    for _ in 0..reps {
        let r = get_once(t, tls, &t.blob(REPO, &big.digest)).await?;
        check(t, &r, Some(big.size), "big")?;
        misses += not_hit(t, std::slice::from_ref(&r));
        best = best.max(mbps(r.bytes, r.end - r.start));
    }
    Ok((best, misses))
}

/// `clients` concurrent clients, client i reading blob i % count, over
/// HTTPS: aggregate MiB/s.
async fn concurrent(
    t: &Target,
    f: &Fixtures,
    clients: usize,
    per_client: usize,
) -> Res<(f64, usize)> {
    let layers = f.many.manifests[0].layers.clone();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..clients {
        let t = t.clone();
        let layers = layers.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = connect_to(&t, true).await?;
            let mut out = Vec::new();
            for k in 0..per_client {
                let l = &layers[(i + k) % layers.len()];
                let r = tokio::time::timeout(
                    TRANSFER_TIMEOUT,
                    get(&mut s, t.https, &t.blob(REPO, &l.digest), None),
                )
                .await
                .map_err(|_| "concurrent GET timed out")??;
                check(&t, &r, Some(l.size), "concurrent")?;
                out.push(r);
            }
            Res::Ok(out)
        }));
    }
    let mut bytes = 0;
    let mut misses = 0;
    for task in tasks {
        let fetches = task.await??;
        misses += not_hit(t, &fetches);
        bytes += fetches.iter().map(|f| f.bytes).sum::<u64>();
    }
    Ok((mbps(bytes, start.elapsed()), misses))
}

struct Latency {
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    errors: usize,
    misses: usize,
}

/// Manifest GETs at a fixed rate over a pool of keep-alive HTTPS
/// connections; latency counted from each request's scheduled time (no
/// coordinated omission).
async fn manifest_rate(t: &Target, f: &Fixtures, rate: u64, secs: u64) -> Res<Latency> {
    let pool_size = 64;
    let (tx, rx) = tokio::sync::mpsc::channel::<Sender>(pool_size);
    for _ in 0..pool_size {
        tx.send(connect_to(t, true).await?).await?;
    }
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let path = Arc::new(t.manifest(&f.big.manifests[0].digest));
    let want = f.big.manifests[0].bytes.len() as u64;
    let total = rate * secs;
    let interval = Duration::from_nanos(1_000_000_000 / rate);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let scheduled = start + interval * i as u32;
        tokio::time::sleep_until(scheduled).await;
        let (tx, rx, path, t) = (tx.clone(), rx.clone(), path.clone(), t.clone());
        tasks.push(tokio::spawn(async move {
            let mut s = {
                let mut rx = rx.lock().await;
                rx.recv().await.ok_or("pool closed")?
            };
            let r = tokio::time::timeout(
                Duration::from_secs(10),
                get(&mut s, t.https, &path, Some(OCI_MANIFEST)),
            )
            .await
            .map_err(|_| "manifest GET timed out")??;
            let lat = scheduled.into_std().elapsed();
            let _ = tx.send(s).await;
            let ok = r.status == 200 && r.bytes == want;
            Res::Ok((lat, ok, r))
        }));
    }
    let mut lats = Vec::new();
    let mut errors = 0;
    let mut misses = 0;
    for task in tasks {
        match task.await? {
            Ok((lat, ok, r)) => {
                if !ok {
                    errors += 1;
                }
                misses += not_hit(t, std::slice::from_ref(&r));
                lats.push(lat);
            }
            Err(_) => errors += 1,
        }
    }
    lats.sort();
    let pct = |p: f64| -> f64 {
        if lats.is_empty() {
            return f64::NAN;
        }
        let i = ((lats.len() as f64 * p).ceil() as usize).clamp(1, lats.len()) - 1;
        lats[i].as_secs_f64() * 1000.0
    };
    Ok(Latency {
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
        errors,
        misses,
    })
}

struct Miss {
    single_s: f64,
    /// Request → first body byte of the single client.
    single_first_ms: f64,
    total_s: f64,
    spread_ms: f64,
    upstream_gets: usize,
}

/// A cold blob: one client alone (blob 0 of the miss image), then
/// `clients` at once on another cold blob (blob 1). Over HTTPS.
async fn miss(
    t: &Target,
    f: &Fixtures,
    repo: &str,
    clients: usize,
    upstream: &Registry,
    throttled: bool,
) -> Res<Miss> {
    let layers = &f.miss.manifests[0].layers;
    let first = if throttled { 2 } else { 0 };
    let (single, multi) = (&layers[first], &layers[first + 1]);
    let r = get_once(t, true, &t.blob(repo, &single.digest)).await?;
    check(t, &r, Some(single.size), "miss single")?;
    let single_s = (r.end - r.start).as_secs_f64();
    let single_first_ms = r
        .first_byte
        .map_or(f64::NAN, |f| (f - r.start).as_secs_f64() * 1000.0);
    // Connections first, so the clock measures the transfer.
    let mut senders = Vec::new();
    for _ in 0..clients {
        senders.push(connect_to(t, true).await?);
    }
    let path = t.blob(repo, &multi.digest);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for mut s in senders {
        let (path, addr) = (path.clone(), t.https);
        tasks.push(tokio::spawn(async move {
            tokio::time::timeout(TRANSFER_TIMEOUT, get(&mut s, addr, &path, None))
                .await
                .map_err(|_| "miss GET timed out")?
        }));
    }
    let mut fetches = Vec::new();
    for task in tasks {
        let r = task.await??;
        check(t, &r, Some(multi.size), "miss multi")?;
        fetches.push(r);
    }
    let first: Vec<Instant> = fetches.iter().filter_map(|f| f.first_byte).collect();
    let (Some(lo), Some(hi)) = (first.iter().min(), first.iter().max()) else {
        return Err("no first bytes".into());
    };
    let end = fetches.iter().map(|f| f.end).max().unwrap_or(start);
    // The upstream writes its access line as a response ends.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let upstream_path = format!(
        "/v2/{}/blobs/{}",
        if t.is_nginx { NG_MISS_REPO } else { REPO },
        multi.digest
    );
    Ok(Miss {
        single_s,
        single_first_ms,
        total_s: (end - start).as_secs_f64(),
        spread_ms: (*hi - *lo).as_secs_f64() * 1000.0,
        upstream_gets: upstream.count_requests("GET", &upstream_path),
    })
}

struct Rss {
    peak_mib: f64,
    mbps: f64,
}

/// `streams` concurrent HTTPS streams reading `total` bytes of cached blobs;
/// peak RSS (VmHWM after a reset; for nginx the sum over workers).
async fn rss(t: &Target, f: &Fixtures, pids: &[u32], streams: usize, total: u64) -> Res<Rss> {
    for p in pids {
        reset_peak(*p);
    }
    let size = f.many.manifests[0].layers[0].size;
    let per_stream = (total / streams as u64 / size).max(1) as usize;
    let (rate, _) = concurrent(t, f, streams, per_stream).await?;
    let peak: u64 = pids.iter().map(|p| vm_kib(*p, "VmHWM:")).sum();
    Ok(Rss {
        peak_mib: peak as f64 / 1024.0,
        mbps: rate,
    })
}

// ---------------------------------------------------------------- main

fn main() {
    if let Err(e) = run() {
        eprintln!("pullthrough-bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    // Only the MISS phases (for profiling the miss path).
    let miss_only = args.iter().any(|a| a == "--miss-only");
    // Only the manifest latency phase (comparing builds: it is short).
    let manifest_only = args.iter().any(|a| a == "--manifest-only");
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!(
            "usage: cargo run --release -p pullthrough-bench [-- --quick] [--miss-only | --manifest-only]\n\
             Starts docker-registry, pullthrough-proxy (release) and nginx on loopback and\n\
             prints pullthrough vs nginx figures. --quick: smaller sizes (a few minutes)."
        );
        return Ok(());
    }
    if cfg!(debug_assertions) {
        eprintln!(
            "warning: this is a debug build of the load generator; run it as\n  \
             cargo run --release -p pullthrough-bench"
        );
    }
    let sizes = if quick { QUICK } else { FULL };
    eprintln!("sizes: {sizes:?}");
    let bin = proxy_release_bin()?;

    let upstream = Registry::tls()?;
    let upstream_ca = upstream.ca_path().ok_or("TLS registry without a CA")?;
    let fx = fixtures(&sizes, &upstream)?;
    // Both proxies reach the upstream through the relay (unlimited until
    // the throttled MISS phase).
    let relay = relay::Relay::start(upstream.addr())?;
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

    let proxy = Proxy::start(
        &bin,
        Addrs::localhost()?,
        &format!(
            "ca: {{cert: {}, key: {}}}\nregistries:\n  - host: {REG}\n    upstream: {}\n    caBundle: {}\n",
            ca_crt.display(),
            ca_key.display(),
            upstream_url,
            upstream_ca.display()
        ),
    )?;
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
        name: "pullthrough",
        https: proxy.addrs.https,
        http: proxy.addrs.http,
        tls: tls.clone(),
        prefix: "/v2/bench.test/",
        pid: proxy.pid(),
        is_nginx: false,
    };
    let ng = Target {
        name: "nginx",
        https: nginx.https,
        http: nginx.http,
        tls,
        prefix: "/v2/",
        pid: nginx.process.pid(),
        is_nginx: true,
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let mut nginx_not_hit = 0usize;

    for t in [&pt, &ng] {
        if miss_only {
            break;
        }
        if let Err(e) = rt.block_on(warm(t, &fx)) {
            let log = std::fs::read_to_string(nginx.dir.path().join("logs/error.log"));
            return Err(format!("{e}\nnginx error.log:\n{}", log.unwrap_or_default()).into());
        }
    }

    // 1. One client, one big blob: HTTPS, then plain HTTP.
    let reps = 3;
    for (tls_on, label, target, min) in [
        (true, "HTTPS", "≥ 1.0×", 1.0),
        (false, "HTTP", "≥ 0.9×", 0.9),
    ] {
        if miss_only || manifest_only {
            break;
        }
        let (a, _) = rt.block_on(single_big(&pt, &fx, tls_on, reps))?;
        let (b, m) = rt.block_on(single_big(&ng, &fx, tls_on, reps))?;
        nginx_not_hit += m;
        eprintln!("HIT 1 client {label}: pullthrough {a:.0} MiB/s, nginx {b:.0} MiB/s");
        rows.push(Row {
            name: format!(
                "HIT, 1 client, {} MiB blob, {label} (best of {reps})",
                sizes.big / MIB
            ),
            pt: a,
            ng: b,
            unit: "MiB/s",
            target: target.into(),
            met: Some(a >= min * b),
        });
    }

    if !miss_only {
        if !manifest_only {
            // 2. Concurrent clients over many blobs.
            let (a, _) = rt.block_on(concurrent(&pt, &fx, sizes.many_clients, 1))?;
            let (b, m) = rt.block_on(concurrent(&ng, &fx, sizes.many_clients, 1))?;
            nginx_not_hit += m;
            eprintln!(
                "HIT {} clients: pullthrough {a:.0} MiB/s, nginx {b:.0} MiB/s",
                sizes.many_clients
            );
            rows.push(Row {
                name: format!(
                    "HIT, {} clients over {} blobs of {} MiB, HTTPS, aggregate",
                    sizes.many_clients,
                    sizes.many_count,
                    sizes.many_size / MIB
                ),
                pt: a,
                ng: b,
                unit: "MiB/s",
                target: "≥ 1.0×".into(),
                met: Some(a >= b),
            });
        }

        // 3. Manifest latency at a fixed rate.
        // Server CPU per request too: latency on 2 shared cores is noisy,
        // the work each request costs is not.
        let cpu = |pids: &[u32]| pids.iter().map(|p| cpu_ticks(*p)).sum::<u64>();
        let ng_workers = nginx.workers();
        let c0 = cpu(&[pt.pid]);
        let la = rt.block_on(manifest_rate(&pt, &fx, sizes.rate, sizes.rate_secs))?;
        let c1 = cpu(&[pt.pid]);
        let n0 = cpu(&ng_workers);
        let lb = rt.block_on(manifest_rate(&ng, &fx, sizes.rate, sizes.rate_secs))?;
        let n1 = cpu(&ng_workers);
        let per_req = |ticks: u64| ticks as f64 * 10_000.0 / (sizes.rate * sizes.rate_secs) as f64;
        eprintln!(
            "manifest server CPU per request: pullthrough {:.0} µs, nginx {:.0} µs (clock ticks of 10 ms)",
            per_req(c1 - c0),
            per_req(n1 - n0)
        );
        nginx_not_hit += lb.misses;
        eprintln!(
            "manifest @{}/s: pullthrough p50 {:.2} p99 {:.2} max {:.2} ms ({} errors); nginx p50 {:.2} p99 {:.2} max {:.2} ms ({} errors)",
            sizes.rate,
            la.p50_ms,
            la.p99_ms,
            la.max_ms,
            la.errors,
            lb.p50_ms,
            lb.p99_ms,
            lb.max_ms,
            lb.errors
        );
        let label = format!(
            "manifest HIT @ {} req/s × {} s, HTTPS",
            sizes.rate, sizes.rate_secs
        );
        rows.push(Row {
            name: format!("{label}: p50"),
            pt: la.p50_ms,
            ng: lb.p50_ms,
            unit: "ms",
            target: "–".into(),
            met: None,
        });
        rows.push(Row {
            name: format!("{label}: p99"),
            pt: la.p99_ms,
            ng: lb.p99_ms,
            unit: "ms",
            target: "≤ nginx".into(),
            met: Some(la.p99_ms <= lb.p99_ms && la.errors == 0),
        });
        rows.push(Row {
            name: format!("{label}: max"),
            pt: la.max_ms,
            ng: lb.max_ms,
            unit: "ms",
            target: "–".into(),
            met: None,
        });
        if la.errors + lb.errors > 0 {
            notes.push(format!(
                "manifest errors: pullthrough {}, nginx {}",
                la.errors, lb.errors
            ));
        }
    }

    // 4. MISS: merged fetch, with the upstream at loopback speed, then
    // throttled to `sizes.throttle` for both proxies.
    for throttled in [false, true] {
        if manifest_only {
            break;
        }
        relay.set_rate(if throttled { sizes.throttle } else { 0 });
        let ma = rt.block_on(miss(
            &pt,
            &fx,
            REPO,
            sizes.miss_clients,
            &upstream,
            throttled,
        ))?;
        let mb = rt.block_on(miss(
            &ng,
            &fx,
            NG_MISS_REPO,
            sizes.miss_clients,
            &upstream,
            throttled,
        ))?;
        relay.set_rate(0);
        let link = if throttled {
            format!("upstream {} MiB/s", sizes.throttle / MIB)
        } else {
            "upstream unthrottled".to_string()
        };
        eprintln!(
            "MISS ({link}): pullthrough single {:.3}s (first byte {:.1} ms), {} clients {:.2}s; nginx single {:.3}s (first byte {:.1} ms), {} clients {:.2}s",
            ma.single_s,
            ma.single_first_ms,
            sizes.miss_clients,
            ma.total_s,
            mb.single_s,
            mb.single_first_ms,
            sizes.miss_clients,
            mb.total_s
        );
        let size = if throttled {
            sizes.throttle_size
        } else {
            sizes.miss_size
        };
        let mlabel = format!(
            "MISS, {} clients, {} MiB blob, {link}",
            sizes.miss_clients,
            size / MIB
        );
        rows.push(Row {
            name: format!("{mlabel}: upstream GETs"),
            pt: ma.upstream_gets as f64,
            ng: mb.upstream_gets as f64,
            unit: "",
            target: "1".into(),
            met: Some(ma.upstream_gets == 1),
        });
        rows.push(Row {
            name: format!("{mlabel}: first-byte spread"),
            pt: ma.spread_ms,
            ng: mb.spread_ms,
            unit: "ms",
            target: "≤ 100 ms".into(),
            met: Some(ma.spread_ms <= 100.0),
        });
        rows.push(Row {
            name: format!("{mlabel}: total time"),
            pt: ma.total_s,
            ng: mb.total_s,
            unit: "s",
            target: "–".into(),
            met: None,
        });
        rows.push(Row {
            name: format!("MISS, 1 client alone, same size, {link}: time"),
            pt: ma.single_s,
            ng: mb.single_s,
            unit: "s",
            target: "–".into(),
            met: None,
        });
        rows.push(Row {
            name: format!("{mlabel}: total / single"),
            pt: ma.total_s / ma.single_s,
            ng: mb.total_s / mb.single_s,
            unit: "×",
            target: "≤ 1.2×".into(),
            met: Some(ma.total_s <= 1.2 * ma.single_s),
        });
    }

    if !miss_only && !manifest_only {
        // 5. Peak RSS under many streams.
        let ra = rt.block_on(rss(&pt, &fx, &[pt.pid], sizes.rss_streams, sizes.rss_total))?;
        let workers = nginx.workers();
        let rb = rt.block_on(rss(&ng, &fx, &workers, sizes.rss_streams, sizes.rss_total))?;
        let glabel = format!(
            "{} GiB over {} HTTPS streams",
            sizes.rss_total as f64 / GIB as f64,
            sizes.rss_streams
        );
        rows.push(Row {
            name: format!(
                "peak RSS (VmHWM), {glabel}; nginx: sum of {} workers",
                workers.len()
            ),
            pt: ra.peak_mib,
            ng: rb.peak_mib,
            unit: "MiB",
            target: "pt ≤ 64 MiB".into(),
            met: Some(ra.peak_mib <= 64.0),
        });
        rows.push(Row {
            name: format!("throughput during the RSS run, {glabel}"),
            pt: ra.mbps,
            ng: rb.mbps,
            unit: "MiB/s",
            target: "–".into(),
            met: None,
        });
    }

    if nginx_not_hit > 0 {
        notes.push(format!(
            "{nginx_not_hit} nginx HIT-phase responses had X-Cache-Status other than HIT"
        ));
    } else {
        notes.push("every nginx HIT-phase response had X-Cache-Status: HIT".into());
    }
    let pt_log = proxy.log();
    let pt_hits = pt_log.matches("\"cache\":\"HIT\"").count();
    let pt_miss = pt_log.matches("\"cache\":\"MISS\"").count();
    notes.push(format!(
        "pullthrough access log: {pt_hits} HIT, {pt_miss} MISS lines (MISS = warm-up + MISS phase)"
    ));

    println!(
        "\n## pullthrough-bench ({}), {}\n",
        if quick { "--quick" } else { "full" },
        machine()
    );
    print!("{}", table(&rows));
    println!();
    for n in &notes {
        println!("- {n}");
    }
    drop(rt);
    drop(nginx);
    drop(proxy);
    drop(relay);
    drop(upstream);
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = vm_total_gib();
    format!("{cores} cores ({cpu}), {mem:.0} GiB RAM")
}

fn vm_total_gib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0)
}

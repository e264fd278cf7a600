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
//!
//! [`targets`] starts the servers (the upstream behind the test bed's
//! throttling relay) and sends the load generator's requests,
//! [`scenario`] holds one module per measurement, [`report`] the table.

mod procfs;
mod report;
mod scenario;
mod targets;

use report::Report;
use scenario::{concurrent, hit, manifest, miss, rss, warm};
use targets::Bench;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// The registry name pullthrough serves the upstream as (path mode).
const REG: &str = "bench.test";
/// Upstream repository of the HIT fixtures and pullthrough's MISS blobs.
const REPO: &str = "bench";
/// Upstream repository nginx's MISS requests go to (same digests, other
/// paths, so the upstream access log counts each proxy's fetches apart).
const NG_MISS_REPO: &str = "missng";

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

/// Which phases run.
struct Phases {
    quick: bool,
    /// Only the MISS phases (for profiling the miss path).
    miss_only: bool,
    /// Only the manifest latency phase (comparing builds: it is short).
    manifest_only: bool,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("pullthrough-bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let phases = Phases {
        quick: args.iter().any(|a| a == "--quick"),
        miss_only: args.iter().any(|a| a == "--miss-only"),
        manifest_only: args.iter().any(|a| a == "--manifest-only"),
    };
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
    let sizes = if phases.quick { QUICK } else { FULL };
    eprintln!("sizes: {sizes:?}");
    let bin = targets::proxy_release_bin()?;
    let bench = Bench::start(&sizes, &bin)?;
    let rt = pullthrough_testbed::http::runtime()?;
    let report = measure(&bench, &rt, &sizes, &phases)?;
    report.print(phases.quick, &procfs::machine());
    drop(rt);
    drop(bench);
    Ok(())
}

/// Every scenario the phases ask for, in order.
fn measure(b: &Bench, rt: &tokio::runtime::Runtime, sizes: &Sizes, p: &Phases) -> Res<Report> {
    let mut report = Report::default();
    if !p.miss_only {
        warm::run(b, rt)?;
    }
    if !p.miss_only && !p.manifest_only {
        hit::run(b, rt, sizes, &mut report)?;
        concurrent::run(b, rt, sizes, &mut report)?;
    }
    if !p.miss_only {
        manifest::run(b, rt, sizes, &mut report)?;
    }
    if !p.manifest_only {
        miss::run(b, rt, sizes, &mut report)?;
    }
    if !p.miss_only && !p.manifest_only {
        rss::run(b, rt, sizes, &mut report)?;
    }
    if report.nginx_not_hit > 0 {
        report.notes.push(format!(
            "{} nginx HIT-phase responses had X-Cache-Status other than HIT",
            report.nginx_not_hit
        ));
    } else {
        report
            .notes
            .push("every nginx HIT-phase response had X-Cache-Status: HIT".into());
    }
    let pt_log = b.proxy.log();
    let pt_hits = pt_log.matches("\"cache\":\"HIT\"").count();
    let pt_miss = pt_log.matches("\"cache\":\"MISS\"").count();
    report.notes.push(format!(
        "pullthrough access log: {pt_hits} HIT, {pt_miss} MISS lines (MISS = warm-up + MISS phase)"
    ));
    Ok(report)
}

//! `pullthrough-bench`: pullthrough-proxy and nginx (configured like the
//! seed's successor: `proxy_cache` + `proxy_cache_lock`, cache key = path,
//! `sendfile on`) side by side on loopback, in front of one real
//! `docker-registry` upstream holding random-layer fixtures.
//!
//! Then (the scale-out phase, issue #12) 3 pullthrough replicas over one
//! SeaweedFS bucket are measured next to the single replica and nginx.
//!
//! Run it with `cargo run --release -p pullthrough-bench [-- --quick]`.
//! It builds `target/release/pullthrough-proxy` itself
//! (`cargo build --release -p pullthrough-proxy`; `PULLTHROUGH_PROXY_BIN`
//! overrides). Every process it starts (registry, proxies, nginx, SeaweedFS) is stopped
//! by PID when it ends, also on error. Loads are bounded in request count
//! and time, loopback only. Not part of the test suite.
//!
//! [`targets`] starts the servers (the upstream behind the test bed's
//! throttling relay) and sends the load generator's requests,
//! [`scenario`] holds one module per measurement, [`report`] the table.

mod affinity;
mod procfs;
mod report;
mod scenario;
mod splice_sink;
mod targets;

use report::Report;
use scenario::{concurrent, hit, hit_h2, manifest, miss, rss, scaleout, warm};
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
    /// Only the 1-client HIT phases (HTTPS, plain HTTP, HTTP/2).
    hit_only: bool,
    /// Only the scale-out phase (replicas over S3 vs one replica vs
    /// nginx), after the warm-up it needs.
    scaleout_only: bool,
    /// Skip the scale-out phase (it starts SeaweedFS and 3 replicas).
    no_scaleout: bool,
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
        hit_only: args.iter().any(|a| a == "--hit-only"),
        scaleout_only: args.iter().any(|a| a == "--scaleout-only"),
        no_scaleout: args.iter().any(|a| a == "--no-scaleout"),
    };
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!(
            "usage: cargo run --release -p pullthrough-bench [-- --quick] [--miss-only | --manifest-only | --hit-only | --scaleout-only | --no-scaleout]\n\
             Starts docker-registry, pullthrough-proxy (release) and nginx on loopback and\n\
             prints pullthrough vs nginx figures; then 3 replicas over one SeaweedFS bucket\n\
             next to both. --quick: smaller sizes."
        );
        return Ok(());
    }
    let only = [
        phases.miss_only,
        phases.manifest_only,
        phases.hit_only,
        phases.scaleout_only,
    ];
    if only.iter().filter(|o| **o).count() > 1 {
        return Err(
            "--miss-only, --manifest-only, --hit-only and --scaleout-only exclude each other"
                .into(),
        );
    }
    if phases.scaleout_only && phases.no_scaleout {
        return Err("--scaleout-only and --no-scaleout exclude each other".into());
    }
    if cfg!(debug_assertions) {
        eprintln!(
            "warning: this is a debug build of the load generator; run it as\n  \
             cargo run --release -p pullthrough-bench"
        );
    }
    let sizes = if phases.quick { QUICK } else { FULL };
    eprintln!("sizes: {sizes:?}");
    let scale =
        (!phases.miss_only && !phases.manifest_only && !phases.hit_only && !phases.no_scaleout)
            || phases.scaleout_only;
    if scale && let Err(e) = pullthrough_testbed::tools::go_tool("weed") {
        // Found out now, not after the other phases' two minutes.
        return Err(format!(
            "the scale-out phase needs SeaweedFS: {e} (or run with --no-scaleout)"
        )
        .into());
    }
    let bin = targets::proxy_release_bin()?;
    let bench = Bench::start(&sizes, &bin)?;
    let rt = pullthrough_testbed::http::runtime()?;
    let report = measure(&bench, &rt, &sizes, &phases)?;
    report.print(phases.quick, &procfs::machine());
    drop(rt);
    drop(bench);
    match report.failed {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// Every scenario the phases ask for, in order.
fn measure(b: &Bench, rt: &tokio::runtime::Runtime, sizes: &Sizes, p: &Phases) -> Res<Report> {
    let mut report = Report::default();
    // All phases unless one is asked for alone.
    let all = !p.miss_only && !p.manifest_only && !p.hit_only && !p.scaleout_only;
    if !p.miss_only {
        warm::run(b, rt)?;
    }
    if all || p.hit_only {
        hit::run(b, rt, sizes, &mut report)?;
        hit_h2::run(b, rt, sizes, &mut report)?;
    }
    if all {
        concurrent::run(b, rt, sizes, &mut report)?;
    }
    if all || p.manifest_only {
        manifest::run(b, rt, sizes, &mut report)?;
    }
    let mut throttled = None;
    if all || p.miss_only {
        throttled = miss::run(b, rt, sizes, &mut report)?;
    }
    if all {
        rss::run(b, rt, sizes, &mut report)?;
    }
    if (all && !p.no_scaleout) || p.scaleout_only {
        // The figures of the other phases are printed even if this one
        // fails (the run still exits non-zero).
        if let Err(e) = scaleout::run(b, rt, sizes, &mut report, throttled) {
            report.failed = Some(format!("scale-out phase: {e}"));
        }
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

//! Manifest HITs at a fixed rate over a pool of keep-alive HTTPS
//! connections: latency percentiles, and server CPU per request.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use pullthrough_testbed::fixtures::OCI_MANIFEST;
use pullthrough_testbed::http::Conn;
use tokio::runtime::Runtime;

use crate::procfs::cpu_ticks_of;
use crate::report::{Report, Row};
use crate::targets::{Bench, Fixtures, Target, get, not_hit};
use crate::{Res, Sizes};

/// Kept-alive connections the requests take turns on.
const POOL: usize = 64;

pub fn run(b: &Bench, rt: &Runtime, sizes: &Sizes, report: &mut Report) -> Res<()> {
    let (pt, ng) = (&b.pt, &b.ng);
    // Server CPU per request too: latency on 2 shared cores is noisy,
    // the work each request costs is not.
    let ng_workers = b.nginx.workers();
    let c0 = cpu_ticks_of(&[pt.pid]);
    let la = rt.block_on(manifest_rate(pt, &b.fx, sizes.rate, sizes.rate_secs))?;
    let c1 = cpu_ticks_of(&[pt.pid]);
    let n0 = cpu_ticks_of(&ng_workers);
    let lb = rt.block_on(manifest_rate(ng, &b.fx, sizes.rate, sizes.rate_secs))?;
    let n1 = cpu_ticks_of(&ng_workers);
    let per_req = |ticks: u64| ticks as f64 * 10_000.0 / (sizes.rate * sizes.rate_secs) as f64;
    eprintln!(
        "manifest server CPU per request: pullthrough {:.0} µs, nginx {:.0} µs (clock ticks of 10 ms)",
        per_req(c1 - c0),
        per_req(n1 - n0)
    );
    report.nginx_not_hit += lb.misses;
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
    report.rows.push(Row {
        name: format!("{label}: p50"),
        pt: la.p50_ms,
        ng: lb.p50_ms,
        unit: "ms",
        target: "–".into(),
        met: None,
    });
    report.rows.push(Row {
        name: format!("{label}: p99"),
        pt: la.p99_ms,
        ng: lb.p99_ms,
        unit: "ms",
        target: "≤ nginx".into(),
        met: Some(la.p99_ms <= lb.p99_ms && la.errors == 0),
    });
    report.rows.push(Row {
        name: format!("{label}: max"),
        pt: la.max_ms,
        ng: lb.max_ms,
        unit: "ms",
        target: "–".into(),
        met: None,
    });
    if la.errors + lb.errors > 0 {
        report.notes.push(format!(
            "manifest errors: pullthrough {}, nginx {}",
            la.errors, lb.errors
        ));
    }
    Ok(())
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
    let (tx, rx) = tokio::sync::mpsc::channel::<Conn>(POOL);
    for _ in 0..POOL {
        tx.send(t.connect(true).await?).await?;
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
        let (tx, rx, path) = (tx.clone(), rx.clone(), path.clone());
        tasks.push(tokio::spawn(async move {
            let mut s = {
                let mut rx = rx.lock().await;
                rx.recv().await.ok_or("pool closed")?
            };
            let r = tokio::time::timeout(
                Duration::from_secs(10),
                get(&mut s, &path, Some(OCI_MANIFEST)),
            )
            .await
            .map_err(|_| "manifest GET timed out")??;
            let lat = scheduled.into_std().elapsed();
            let _ = tx.send(s).await;
            let ok = r.status == StatusCode::OK && r.error.is_none() && r.bytes == want;
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

//! Peak RSS of each server while many HTTPS streams read cached blobs.

use tokio::runtime::Runtime;

use crate::procfs::{reset_peak, vm_kib};
use crate::report::{Report, Row};
use crate::scenario::concurrent::concurrent;
use crate::targets::{Bench, Fixtures, Target};
use crate::{GIB, Res, Sizes};

pub fn run(b: &Bench, rt: &Runtime, sizes: &Sizes, report: &mut Report) -> Res<()> {
    let ra = rt.block_on(rss(
        &b.pt,
        &b.fx,
        &[b.pt.pid],
        sizes.rss_streams,
        sizes.rss_total,
    ))?;
    let workers = b.nginx.workers();
    let rb = rt.block_on(rss(
        &b.ng,
        &b.fx,
        &workers,
        sizes.rss_streams,
        sizes.rss_total,
    ))?;
    let glabel = format!(
        "{} GiB over {} HTTPS streams",
        sizes.rss_total as f64 / GIB as f64,
        sizes.rss_streams
    );
    report.rows.push(Row {
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
    report.rows.push(Row {
        name: format!("throughput during the RSS run, {glabel}"),
        pt: ra.mbps,
        ng: rb.mbps,
        unit: "MiB/s",
        target: "–".into(),
        met: None,
    });
    Ok(())
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

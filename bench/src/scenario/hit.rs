//! HIT, one client, one big blob: over HTTPS, then plain HTTP.

use tokio::runtime::Runtime;

use crate::procfs::cpu_ticks;
use crate::report::{Report, Row};
use crate::targets::{Bench, Fixtures, Target, check, get_once, mbps, not_hit};
use crate::{MIB, REPO, Res, Sizes};

/// Reads of the big blob per protocol and server; the median counts.
const REPS: usize = 11;

/// pullthrough's count of blob bytes sent with `sendfile` (plain HTTP/1).
const SENDFILE: &str = "pullthrough_sendfile_bytes_total";

pub fn run(b: &Bench, rt: &Runtime, sizes: &Sizes, report: &mut Report) -> Res<()> {
    let big = b.fx.big.manifests[0].layers[0].size;
    for (tls_on, label) in [(true, "HTTPS"), (false, "HTTP")] {
        let sent_before = sendfile_bytes(b)?;
        // Alternating reads, so a slow spell of the machine (another
        // process, the page cache) falls on both servers alike rather
        // than on whichever ran then; the median, because single reads on
        // 2 shared cores vary 2-3× with where the scheduler puts the
        // client and the server, and a best-of figure reports that luck.
        // Server CPU per GiB too: with both servers keeping the socket
        // full, the throughput is the load generator's as much as the
        // server's; the CPU a server spends on each byte is its own.
        let cpu = |pids: &[u32]| pids.iter().map(|p| cpu_ticks(*p)).sum::<u64>();
        let ng_workers = b.nginx.workers();
        let (mut pts, mut ngs) = (Vec::new(), Vec::new());
        let (mut pt_ticks, mut ng_ticks) = (0, 0);
        for _ in 0..REPS {
            let c0 = cpu(&[b.pt.pid]);
            let (x, _) = rt.block_on(single_big(&b.pt, &b.fx, tls_on, 1))?;
            let c1 = cpu(&[b.pt.pid]);
            let n0 = cpu(&ng_workers);
            let (y, m) = rt.block_on(single_big(&b.ng, &b.fx, tls_on, 1))?;
            let n1 = cpu(&ng_workers);
            report.nginx_not_hit += m;
            pt_ticks += c1 - c0;
            ng_ticks += n1 - n0;
            pts.push(x);
            ngs.push(y);
        }
        eprintln!("HIT {label} reads, MiB/s: pullthrough {pts:.0?}, nginx {ngs:.0?}");
        let (a, ng) = (median(&mut pts), median(&mut ngs));
        // The plain figures are sendfile's, or the run is not what it says
        // (a build from before the metric, run for comparison, says so).
        let sent = match (sent_before, sendfile_bytes(b)?) {
            (Some(before), Some(after)) => {
                let sent = after - before;
                let want = if tls_on { 0 } else { REPS as u64 * big };
                if sent != want {
                    return Err(format!(
                        "HIT {label}: pullthrough sent {sent} bytes with sendfile, expected {want}"
                    )
                    .into());
                }
                format!("{sent} bytes by sendfile")
            }
            _ => format!("this build does not export {SENDFILE}"),
        };
        eprintln!("HIT 1 client {label}: pullthrough {a:.0} MiB/s, nginx {ng:.0} MiB/s ({sent})");
        // Clock ticks are 10 ms; each server read REPS blobs of `big` bytes.
        let gib = (REPS as u64 * big) as f64 / (1u64 << 30) as f64;
        let (pt_ms, ng_ms) = (pt_ticks as f64 * 10.0 / gib, ng_ticks as f64 * 10.0 / gib);
        eprintln!(
            "HIT {label}: server CPU per GiB: pullthrough {pt_ms:.0} ms, nginx {ng_ms:.0} ms"
        );
        report.rows.push(Row {
            name: format!(
                "HIT, 1 client, {} MiB blob, {label} (median of {REPS}, alternating)",
                sizes.big / MIB
            ),
            pt: a,
            ng,
            unit: "MiB/s",
            target: "≥ 1.0×".into(),
            met: Some(a >= ng),
        });
        report.rows.push(Row {
            name: format!("HIT, 1 client, {label}: server CPU per GiB served"),
            pt: pt_ms,
            ng: ng_ms,
            unit: "ms",
            target: "–".into(),
            met: None,
        });
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn sendfile_bytes(b: &Bench) -> Res<Option<u64>> {
    Ok(b.proxy.metric(SENDFILE)?.map(|v| v as u64))
}

/// One client, one big blob, `reps` times; best throughput (MiB/s).
pub async fn single_big(t: &Target, f: &Fixtures, tls: bool, reps: usize) -> Res<(f64, usize)> {
    let big = &f.big.manifests[0].layers[0];
    let mut best = 0.0f64;
    let mut misses = 0;
    for _ in 0..reps {
        let r = get_once(t, tls, &t.blob(REPO, &big.digest)).await?;
        check(t, &r, Some(big.size), "big")?;
        misses += not_hit(t, std::slice::from_ref(&r));
        best = best.max(mbps(r.bytes, r.ended - r.started));
    }
    Ok((best, misses))
}

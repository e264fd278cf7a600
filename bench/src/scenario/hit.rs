//! HIT, one client, one big blob: over HTTPS, then plain HTTP.

use tokio::runtime::Runtime;

use super::{Alternated, alternate, median, ms_per_gib};
use crate::affinity::Pinned;
use crate::procfs::{cpu_ticks_of, thread_cpu_ticks};
use crate::report::{Report, Row};
use crate::splice_sink;
use crate::targets::{Bench, Fixtures, Target, check, get_once, mbps, not_hit};
use crate::{MIB, REPO, Res, Sizes};

/// Reads of the big blob per protocol and server; the median counts.
const REPS: usize = 11;

/// pullthrough's count of blob bytes sent with `sendfile` (plain HTTP/1).
const SENDFILE: &str = "pullthrough_sendfile_bytes_total";
/// Its bytes read instead, their pages not being in memory.
const SENDFILE_COLD: &str = "pullthrough_sendfile_cold_bytes_total";

pub fn run(b: &Bench, rt: &Runtime, sizes: &Sizes, report: &mut Report) -> Res<()> {
    let big = b.fx.big.manifests[0].layers[0].size;
    for (tls_on, label) in [(true, "HTTPS"), (false, "HTTP")] {
        let sent_before = sendfile_bytes(b)?;
        // Rounds of plain-HTTP reads of the big blob (hyper or zero-copy
        // reader), each of REPS reads per server, for the sendfile check.
        let mut plain_rounds = 0;
        hyper_reads(b, rt, sizes, tls_on, label, "", report)?;
        if !tls_on {
            plain_rounds += 1;
            zero_copy_reads(b, report)?.push_rows(sizes, "", report);
            plain_rounds += 1;
            // The same reads with the bench on one core and the servers on
            // the other (see crate::affinity).
            let mut servers = vec![b.pt.pid, b.ng.pid];
            servers.extend(b.nginx.workers());
            match Pinned::new(&servers)? {
                Some(pinned) => {
                    let placed = ", client and server on separate cores";
                    hyper_reads(b, rt, sizes, false, label, placed, report)?;
                    zero_copy_reads(b, report)?.push_rows(sizes, placed, report);
                    drop(pinned);
                    plain_rounds += 2;
                }
                None => eprintln!("HIT {label}: fewer than 2 cores, no pinned reads"),
            }
        }
        // The plain figures are sendfile's, or the run is not what it says
        // (a build from before the metric, run for comparison, says so).
        // Bytes whose pages were not in memory are read instead (the
        // machine may reclaim page cache at any time); they are counted
        // apart, and the run says how many.
        match (sent_before, sendfile_bytes(b)?) {
            (Some((sent0, cold0)), Some((sent1, cold1))) => {
                let (sent, cold) = (sent1 - sent0, cold1.unwrap_or(0) - cold0.unwrap_or(0));
                let want = plain_rounds * REPS as u64 * big;
                if sent + cold != want || cold > want / 100 {
                    return Err(format!(
                        "HIT {label}: pullthrough sent {sent} bytes with sendfile and \
                         {cold} read (pages not in memory), expected {want} in all, \
                         at most 1% read"
                    )
                    .into());
                }
                eprintln!(
                    "HIT {label}: {sent} bytes by sendfile, {cold} read (pages not in memory)"
                );
            }
            _ => eprintln!("HIT {label}: this build does not export {SENDFILE}"),
        }
    }
    Ok(())
}

/// REPS alternating reads of the big blob with hyper, over TLS or not;
/// `placed` says where the client and servers ran, for the rows' names.
fn hyper_reads(
    b: &Bench,
    rt: &Runtime,
    sizes: &Sizes,
    tls_on: bool,
    label: &str,
    placed: &str,
    report: &mut Report,
) -> Res<()> {
    let big = b.fx.big.manifests[0].layers[0].size;
    // Alternating reads, so a slow spell of the machine (another
    // process, the page cache) falls on both servers alike rather
    // than on whichever ran then; the median, because single reads on
    // 2 shared cores vary 2-3× with where the scheduler puts the
    // client and the server, and a best-of figure reports that luck.
    // Server CPU per GiB too: with both servers keeping the socket
    // full, the throughput is the load generator's as much as the
    // server's; the CPU a server spends on each byte is its own.
    let Alternated {
        pt: pts,
        ng: ngs,
        pt_ticks,
        ng_ticks,
    } = alternate(b, REPS, report, |t| {
        rt.block_on(single_big(t, &b.fx, tls_on, 1))
    })?;
    eprintln!("HIT {label}{placed} reads, MiB/s: pullthrough {pts:.0?}, nginx {ngs:.0?}");
    let (a, ng) = (median(&pts), median(&ngs));
    eprintln!("HIT 1 client {label}{placed}: pullthrough {a:.0} MiB/s, nginx {ng:.0} MiB/s");
    let served = REPS as u64 * big;
    let (pt_ms, ng_ms) = (ms_per_gib(pt_ticks, served), ms_per_gib(ng_ticks, served));
    eprintln!(
        "HIT {label}{placed}: server CPU per GiB: pullthrough {pt_ms:.0} ms, nginx {ng_ms:.0} ms"
    );
    report.rows.push(Row {
        name: format!(
            "HIT, 1 client, {} MiB blob, {label}{placed} (median of {REPS}, alternating)",
            sizes.big / MIB
        ),
        pt: a,
        ng,
        unit: "MiB/s",
        target: "≥ 1.0×".into(),
        met: Some(a >= ng),
    });
    report.rows.push(Row::server_cpu_per_gib(
        &format!("HIT, 1 client, {label}{placed}"),
        pt_ms,
        ng_ms,
    ));
    Ok(())
}

/// The plain-HTTP reads again with a reader that splices the body to
/// `/dev/null` (see [`crate::splice_sink`]): with the hyper reader each
/// byte costs the client a copy, and on 2 cores that copy sets the rate;
/// here the servers' own cost per byte does.
struct ZeroCopy {
    /// Medians, MiB/s.
    pt: f64,
    ng: f64,
    /// CPU per GiB: the server's, and the reader's (this thread).
    pt_server_ms: f64,
    ng_server_ms: f64,
    pt_reader_ms: f64,
    ng_reader_ms: f64,
}

impl ZeroCopy {
    fn push_rows(&self, sizes: &Sizes, placed: &str, report: &mut Report) {
        eprintln!(
            "HIT HTTP zero-copy{placed}: pullthrough {:.0} MiB/s, nginx {:.0} MiB/s; CPU per GiB: \
             pullthrough server {:.0} ms, reader {:.0} ms; nginx server {:.0} ms, reader {:.0} ms",
            self.pt,
            self.ng,
            self.pt_server_ms,
            self.pt_reader_ms,
            self.ng_server_ms,
            self.ng_reader_ms
        );
        report.rows.push(Row {
            name: format!(
                "HIT, 1 client, {} MiB blob, HTTP, zero-copy reader{placed} (median of {REPS}, alternating)",
                sizes.big / MIB
            ),
            pt: self.pt,
            ng: self.ng,
            unit: "MiB/s",
            target: "≥ 1.0×".into(),
            met: Some(self.pt >= self.ng),
        });
        report.rows.push(Row::server_cpu_per_gib(
            &format!("HIT, 1 client, HTTP, zero-copy reader{placed}"),
            self.pt_server_ms,
            self.ng_server_ms,
        ));
    }
}

fn zero_copy_reads(b: &Bench, report: &mut Report) -> Res<ZeroCopy> {
    let big = &b.fx.big.manifests[0].layers[0];
    let read = |t: &Target| -> Res<(f64, bool)> {
        let r = splice_sink::get(t.http, &t.blob(REPO, &big.digest))?;
        if r.status != 200 || r.bytes != big.size {
            return Err(format!(
                "{}: zero-copy read: status {}, {} of {} bytes",
                t.name, r.status, r.bytes, big.size
            )
            .into());
        }
        let hit = !t.is_nginx || r.header("x-cache-status") == Some("hit");
        Ok((mbps(r.bytes, r.elapsed), hit))
    };
    let ng_workers = b.nginx.workers();
    let (mut pts, mut ngs) = (Vec::new(), Vec::new());
    // Ticks: [server, reader] for each side.
    let (mut pt_t, mut ng_t) = ([0u64; 2], [0u64; 2]);
    for _ in 0..REPS {
        let (s0, r0) = (cpu_ticks_of(&[b.pt.pid]), thread_cpu_ticks());
        pts.push(read(&b.pt)?.0);
        let (s1, r1) = (cpu_ticks_of(&[b.pt.pid]), thread_cpu_ticks());
        let n0 = cpu_ticks_of(&ng_workers);
        let (y, hit) = read(&b.ng)?;
        let (n1, r2) = (cpu_ticks_of(&ng_workers), thread_cpu_ticks());
        pt_t[0] += s1 - s0;
        pt_t[1] += r1 - r0;
        ng_t[0] += n1 - n0;
        ng_t[1] += r2 - r1;
        report.nginx_not_hit += usize::from(!hit);
        ngs.push(y);
    }
    eprintln!("HIT HTTP zero-copy reads, MiB/s: pullthrough {pts:.0?}, nginx {ngs:.0?}");
    let ms = |t: u64| ms_per_gib(t, REPS as u64 * big.size);
    Ok(ZeroCopy {
        pt: median(&pts),
        ng: median(&ngs),
        pt_server_ms: ms(pt_t[0]),
        ng_server_ms: ms(ng_t[0]),
        pt_reader_ms: ms(pt_t[1]),
        ng_reader_ms: ms(ng_t[1]),
    })
}

/// pullthrough's bytes sent with `sendfile`, and read instead (a build
/// from before that metric: None).
fn sendfile_bytes(b: &Bench) -> Res<Option<(u64, Option<u64>)>> {
    let Some(sent) = b.proxy.metric(SENDFILE)? else {
        return Ok(None);
    };
    let cold = b.proxy.metric(SENDFILE_COLD)?;
    Ok(Some((sent as u64, cold.map(|v| v as u64))))
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

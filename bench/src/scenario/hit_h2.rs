//! HIT over HTTP/2: how containerd, and every Go client, reads a cached
//! layer over TLS. One stream of the big blob, then [`STREAMS`] streams of
//! it at once on one connection (containerd downloads three layers at a
//! time by default), both servers alternating, the median counting.
//!
//! pullthrough answers HTTP/2 streams in 64 KiB chunks under a 32 KiB
//! send buffer, so that streams a client does not read cost little memory
//! (HTTP/1 reads 256 KiB chunks); these rows show what that costs in
//! throughput and in server CPU per byte, next to nginx's `http2`.

use std::time::Instant;

use tokio::runtime::Runtime;

use super::{Alternated, alternate, median, ms_per_gib};
use crate::report::{Report, Row};
use crate::targets::{Bench, TRANSFER_TIMEOUT, Target, check, get, mbps, not_hit};
use crate::{MIB, REPO, Res, Sizes};

/// Rounds per figure and server; the median counts.
const REPS: usize = 7;

/// Streams at once in the multiplexed rounds.
const STREAMS: usize = 4;

pub fn run(b: &Bench, rt: &Runtime, sizes: &Sizes, report: &mut Report) -> Res<()> {
    let big = &b.fx.big.manifests[0].layers[0];
    for streams in [1, STREAMS] {
        let Alternated {
            pt: pts,
            ng: ngs,
            pt_ticks,
            ng_ticks,
        } = alternate(b, REPS, report, |t| {
            rt.block_on(read_streams(t, &big.digest, big.size, streams))
        })?;
        eprintln!("HIT HTTP/2, {streams} stream(s), MiB/s: pullthrough {pts:.0?}, nginx {ngs:.0?}");
        let (a, ng) = (median(&pts), median(&ngs));
        let served = (REPS * streams) as u64 * big.size;
        let (pt_ms, ng_ms) = (ms_per_gib(pt_ticks, served), ms_per_gib(ng_ticks, served));
        eprintln!(
            "HIT HTTP/2, {streams} stream(s): pullthrough {a:.0} MiB/s, nginx {ng:.0} MiB/s; \
             server CPU per GiB: pullthrough {pt_ms:.0} ms, nginx {ng_ms:.0} ms"
        );
        let what = if streams == 1 {
            "1 stream".to_string()
        } else {
            format!("{streams} streams at once on 1 connection")
        };
        report.rows.push(Row {
            name: format!(
                "HIT, {what}, {} MiB blob, HTTPS over HTTP/2 (median of {REPS}, alternating)",
                sizes.big / MIB
            ),
            pt: a,
            ng,
            unit: "MiB/s",
            target: "–".into(),
            met: None,
        });
        report.rows.push(Row::server_cpu_per_gib(
            &format!("HIT, {what}, HTTP/2"),
            pt_ms,
            ng_ms,
        ));
    }
    Ok(())
}

/// `streams` GETs of blob `digest` at once on one fresh HTTP/2
/// connection: their bytes over the time from the first request to the
/// last body's end (MiB/s), and how many nginx answered other than HIT.
async fn read_streams(t: &Target, digest: &str, size: u64, streams: usize) -> Res<(f64, usize)> {
    let path = t.blob(REPO, digest);
    tokio::time::timeout(TRANSFER_TIMEOUT, async {
        let conn = t.connect_h2().await?;
        let reads = (0..streams)
            .map(|_| {
                let mut stream = conn
                    .another_stream()
                    .ok_or_else(|| format!("{}: not an HTTP/2 connection", t.name))?;
                let path = path.clone();
                Ok(async move { get(&mut stream, &path, None).await })
            })
            .collect::<Res<Vec<_>>>()?;
        let started = Instant::now();
        let fetched = futures::future::try_join_all(reads).await?;
        let elapsed = started.elapsed();
        for f in &fetched {
            check(t, f, Some(size), "big blob over HTTP/2")?;
            if f.version != http::Version::HTTP_2 {
                return Err(format!("{}: answered in {:?}", t.name, f.version).into());
            }
        }
        Ok((mbps(size * streams as u64, elapsed), not_hit(t, &fetched)))
    })
    .await
    .map_err(|_| format!("{}: {streams} HTTP/2 reads timed out", t.name))?
}

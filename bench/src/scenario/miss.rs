//! MISS: a cold blob for one client alone, then for many clients at once
//! (one merged upstream fetch wanted) — with the upstream at loopback
//! speed, then throttled by the relay, for both proxies.

use std::time::{Duration, Instant};

use pullthrough_testbed::fixtures::Blob;
use pullthrough_testbed::registry::Registry;
use tokio::runtime::Runtime;

use crate::report::{Report, Row};
use crate::targets::{Bench, Fixtures, TRANSFER_TIMEOUT, Target, check, get, get_once};
use crate::{MIB, NG_MISS_REPO, REPO, Res, Sizes};

/// Measures both proxies, unthrottled then throttled; returns the
/// throttled figures (pullthrough, nginx), which the scale-out table
/// shows next to the replicas'.
pub fn run(
    b: &Bench,
    rt: &Runtime,
    sizes: &Sizes,
    report: &mut Report,
) -> Res<Option<(Miss, Miss)>> {
    let mut throttled_figures = None;
    for throttled in [false, true] {
        b.relay.set_rate(if throttled { sizes.throttle } else { 0 });
        let ma = rt.block_on(miss(
            &b.pt,
            &b.fx,
            REPO,
            sizes.miss_clients,
            &b.upstream,
            throttled,
        ))?;
        let mb = rt.block_on(miss(
            &b.ng,
            &b.fx,
            NG_MISS_REPO,
            sizes.miss_clients,
            &b.upstream,
            throttled,
        ))?;
        b.relay.set_rate(0);
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
        report.rows.push(Row {
            name: format!("{mlabel}: upstream GETs"),
            pt: ma.upstream_gets as f64,
            ng: mb.upstream_gets as f64,
            unit: "",
            target: "1".into(),
            met: Some(ma.upstream_gets == 1),
        });
        report.rows.push(Row {
            name: format!("{mlabel}: first-byte spread"),
            pt: ma.spread_ms,
            ng: mb.spread_ms,
            unit: "ms",
            target: "≤ 100 ms".into(),
            met: Some(ma.spread_ms <= 100.0),
        });
        report.rows.push(Row {
            name: format!("{mlabel}: total time"),
            pt: ma.total_s,
            ng: mb.total_s,
            unit: "s",
            target: "–".into(),
            met: None,
        });
        report.rows.push(Row {
            name: format!("MISS, 1 client alone, same size, {link}: time"),
            pt: ma.single_s,
            ng: mb.single_s,
            unit: "s",
            target: "–".into(),
            met: None,
        });
        report.rows.push(Row {
            name: format!("{mlabel}: total / single"),
            pt: ma.total_s / ma.single_s,
            ng: mb.total_s / mb.single_s,
            unit: "×",
            target: "≤ 1.2×".into(),
            met: Some(ma.total_s <= 1.2 * ma.single_s),
        });
        if throttled {
            throttled_figures = Some((ma, mb));
        }
    }
    Ok(throttled_figures)
}

/// The figures of one MISS measurement.
#[derive(Debug, Clone, Copy)]
pub struct Miss {
    pub single_s: f64,
    /// Request → first body byte of the single client.
    pub single_first_ms: f64,
    pub total_s: f64,
    pub spread_ms: f64,
    pub upstream_gets: usize,
}

/// A cold blob: one client alone (blob 0 of the miss image, or 2 when
/// throttled), then `clients` at once on another cold blob (1, or 3).
/// Over HTTPS.
pub async fn miss(
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
    miss_on(
        t,
        std::slice::from_ref(t),
        repo,
        (single, multi),
        clients,
        upstream,
    )
    .await
}

/// `blobs.0` for one client alone on `single_on`, then `blobs.1` for
/// `clients` at once, client i on `multi_on[i % len]` (round-robin over
/// replicas). `repo` is the upstream repository the requests go to (its
/// GETs of `blobs.1` are counted). Over HTTPS.
pub async fn miss_on(
    single_on: &Target,
    multi_on: &[Target],
    repo: &str,
    blobs: (&Blob, &Blob),
    clients: usize,
    upstream: &Registry,
) -> Res<Miss> {
    let (single, multi) = blobs;
    let t = single_on;
    let r = get_once(t, true, &t.blob(repo, &single.digest)).await?;
    check(t, &r, Some(single.size), "miss single")?;
    let single_s = (r.ended - r.started).as_secs_f64();
    let single_first_ms = r
        .first_byte
        .map_or(f64::NAN, |f| (f - r.started).as_secs_f64() * 1000.0);
    if multi_on.is_empty() {
        return Err("miss: no target for the clients".into());
    }
    // Connections first, so the clock measures the transfer.
    let mut conns = Vec::new();
    for i in 0..clients {
        let t = &multi_on[i % multi_on.len()];
        conns.push((t, t.connect(true).await?, t.blob(repo, &multi.digest)));
    }
    let want = multi.size;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (t, mut s, path) in conns {
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            let r = tokio::time::timeout(TRANSFER_TIMEOUT, get(&mut s, &path, None))
                .await
                .map_err(|_| format!("{}: miss GET timed out", t.name))??;
            check(&t, &r, Some(want), "miss multi")?;
            Res::Ok(r)
        }));
    }
    let mut fetches = Vec::new();
    for task in tasks {
        fetches.push(task.await??);
    }
    let first: Vec<Instant> = fetches.iter().filter_map(|f| f.first_byte).collect();
    let (Some(lo), Some(hi)) = (first.iter().min(), first.iter().max()) else {
        return Err("no first bytes".into());
    };
    let end = fetches.iter().map(|f| f.ended).max().unwrap_or(start);
    // The upstream writes its access line as a response ends.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let upstream_path = format!("/v2/{repo}/blobs/{}", multi.digest);
    Ok(Miss {
        single_s,
        single_first_ms,
        total_s: (end - start).as_secs_f64(),
        spread_ms: (*hi - *lo).as_secs_f64() * 1000.0,
        upstream_gets: upstream.count_requests("GET", &upstream_path),
    })
}

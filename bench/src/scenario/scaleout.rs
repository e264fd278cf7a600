//! Scale-out (issue #12): [`REPLICAS`] pullthrough replicas over one
//! SeaweedFS bucket, next to the one replica on its own disk and nginx,
//! in the same run.
//!
//! - HIT from a replica's disk, and "S3 HIT": the replica's disk does not
//!   have the blob, the bucket does (`SHARED_HIT` in its access log; the
//!   replica streams it from the bucket while filling its disk), for one
//!   client on the big blob and for many clients over the replicas; the
//!   ratio S3 HIT / disk HIT;
//! - MISS with the upstream throttled: 50 clients round-robin over the
//!   replicas on one cold blob — one upstream GET (by the digest's owner;
//!   the other replicas stream it from the owner over mutual TLS),
//!   first-byte spread, total time against one client alone.
//!
//! The one-replica and nginx MISS figures are the throttled MISS phase's
//! of the same run (same blob size and rate); with `--scaleout-only` they
//! are measured here.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use pullthrough_testbed::fixtures::{Image, LayoutBuilder};
use tokio::runtime::Runtime;

use crate::procfs::cpu_ticks_of;
use crate::report::{Report, ScaleRow};
use crate::scenario::concurrent::concurrent_over;
use crate::scenario::hit::single_big;
use crate::scenario::miss::{Miss, miss, miss_on};
use crate::targets::{Bench, Cluster, check, get_once};
use crate::{MIB, NG_MISS_REPO, REPO, Res, Sizes};

/// Replicas over the bucket.
pub const REPLICAS: usize = 3;
/// Upstream repository of the replicas' MISS blobs (their GETs are
/// counted apart from the other proxies').
const SO_REPO: &str = "scaleout";
/// Reads of the big blob per figure; the best counts.
const REPS: usize = 3;

pub fn run(
    b: &Bench,
    rt: &Runtime,
    sizes: &Sizes,
    report: &mut Report,
    baseline: Option<(Miss, Miss)>,
) -> Res<()> {
    let t0 = Instant::now();
    let cold = cold_blobs(b, sizes)?;
    let capacity = sizes.big
        + sizes.many_size * sizes.many_count as u64
        + cold.manifests[0].layers.iter().map(|l| l.size).sum::<u64>();
    let c = Cluster::start(b, REPLICAS, capacity)?;
    let (pids, weed) = c.pids();
    eprintln!(
        "scale-out: SeaweedFS {} (pid {weed}), {REPLICAS} replicas (pids {pids:?}, peers {:?}) up in {:.1}s",
        c.s3.endpoint(),
        c.peers,
        t0.elapsed().as_secs_f64()
    );
    report.scale_title = format!(
        "Scale-out: {REPLICAS} replicas over one SeaweedFS bucket vs 1 replica on its disk vs nginx"
    );
    report.scale_replicas = REPLICAS;
    let result = measure(b, &c, rt, sizes, report, baseline, &cold);
    b.relay.set_rate(0);
    if let Err(e) = result {
        let mut logs = String::new();
        for (i, p) in c.replicas.iter().enumerate() {
            if let Some(proc) = p.process() {
                logs.push_str(&format!(
                    "\n--- replica {i} log tail:\n{}",
                    proc.log_tail(3000)
                ));
            }
        }
        let weed_log = c.s3.log();
        let tail = &weed_log[weed_log.len().saturating_sub(3000)..];
        return Err(format!("{e}{logs}\n--- SeaweedFS log tail:\n{tail}").into());
    }
    let secs = t0.elapsed().as_secs_f64();
    eprintln!("scale-out phase: {secs:.0}s");
    report
        .scale_notes
        .push(format!("the scale-out phase took {secs:.0} s (SeaweedFS and replicas started, bucket seeded, measured, stopped)"));
    Ok(())
}

/// Two cold blobs of the throttled MISS size for the replicas (one client
/// alone, then the many), pushed to [`SO_REPO`].
fn cold_blobs(b: &Bench, sizes: &Sizes) -> Res<Image> {
    let layout = tempfile::Builder::new()
        .prefix("pt-bench-layout-")
        .tempdir()?;
    let image = LayoutBuilder::new(layout.path())?.random(
        "scaleout",
        &[sizes.throttle_size, sizes.throttle_size],
        0x5ca1e,
    )?;
    image.push(&b.upstream, SO_REPO, "miss")?;
    Ok(image)
}

/// Percent of one core that `ticks` (10 ms each) is over `secs`.
fn core_pct(ticks: u64, secs: f64) -> f64 {
    ticks as f64 * 0.01 / secs * 100.0
}

fn measure(
    b: &Bench,
    c: &Cluster,
    rt: &Runtime,
    sizes: &Sizes,
    report: &mut Report,
    baseline: Option<(Miss, Miss)>,
    cold: &Image,
) -> Res<()> {
    let n = c.targets.len();
    let fx = &b.fx;
    let big = &fx.big.manifests[0].layers[0];
    let many = &fx.many.manifests[0].layers;
    let hit_blobs: Vec<&str> = std::iter::once(big)
        .chain(many.iter())
        .map(|l| l.digest.as_str())
        .collect();
    // Whole downloads (200) of the blobs, apart from the one-byte range
    // GETs (206) with which a replica asks the upstream whether a client
    // may read a blob it has no answer for: those move no blob bytes,
    // and the HIT figures are still reads from the bucket or a disk.
    let upstream_gets = |digests: &[&str]| -> Res<(usize, usize)> {
        b.upstream.sync_log()?;
        Ok(digests.iter().fold((0, 0), |(whole, checks), d| {
            let path = format!("/v2/{REPO}/blobs/{d}");
            (
                whole + b.upstream.count_answered("GET", &path, 200),
                checks + b.upstream.count_answered("GET", &path, 206),
            )
        }))
    };

    // Seed the bucket: every HIT fixture missed once, big on replica 0,
    // many[i] on replica i % n; each owner fetches its blobs from the
    // upstream and uploads them.
    let t = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for (i, l) in std::iter::once(big).chain(many.iter()).enumerate() {
            let target = c.targets[i % n].clone();
            let (digest, size) = (l.digest.clone(), l.size);
            tasks.push(tokio::spawn(async move {
                let r = get_once(&target, true, &target.blob(REPO, &digest)).await?;
                check(&target, &r, Some(size), "seed")
            }));
        }
        for task in tasks {
            task.await??;
        }
        Res::Ok(())
    })?;
    c.wait_in_bucket(&hit_blobs, Duration::from_secs(300))?;
    let seeded: u64 = big.size + many.iter().map(|l| l.size).sum::<u64>();
    let seed_s = t.elapsed().as_secs_f64();
    eprintln!(
        "scale-out: bucket seeded with {} blobs ({} MiB) in {seed_s:.1}s",
        hit_blobs.len(),
        seeded / MIB
    );
    // From here on no HIT fixture may reach the upstream again.
    let gets_before = upstream_gets(&hit_blobs)?;
    // Every replica's disk loses them; the bucket keeps them.
    for i in 0..n {
        for d in &hit_blobs {
            c.purge(i, d)?;
        }
    }

    // --- S3 HIT, one client, the big blob on replica 0 (disk cleared
    // before each read).
    let r0 = &c.targets[0];
    let weed = c.s3.pid();
    let me = std::process::id();
    let (cw, cr, cm) = (
        cpu_ticks_of(&[weed]),
        cpu_ticks_of(&[r0.pid]),
        cpu_ticks_of(&[me]),
    );
    let t = Instant::now();
    let mut s3_single = 0.0f64;
    for rep in 0..REPS {
        if rep > 0 {
            c.purge(0, &big.digest)?;
        }
        let (mbps, _) = rt.block_on(single_big(r0, fx, true, 1))?;
        s3_single = s3_single.max(mbps);
    }
    let secs = t.elapsed().as_secs_f64();
    let cpu_single = format!(
        "SeaweedFS {:.0} %, replica {:.0} %, load generator {:.0} %",
        core_pct(cpu_ticks_of(&[weed]) - cw, secs),
        core_pct(cpu_ticks_of(&[r0.pid]) - cr, secs),
        core_pct(cpu_ticks_of(&[me]) - cm, secs)
    );
    let shared_single = c.wait_lines(0, &big.digest, &[("cache", "SHARED_HIT")], REPS);
    // The bucket's own speed for the same object, without a replica.
    let t = Instant::now();
    let (cw, cm) = (cpu_ticks_of(&[weed]), cpu_ticks_of(&[me]));
    let bucket_single = c.read_object(rt, &big.digest, REPS)?;
    let secs = t.elapsed().as_secs_f64();
    let cpu_bucket = format!(
        "SeaweedFS {:.0} %, load generator {:.0} %",
        core_pct(cpu_ticks_of(&[weed]) - cw, secs),
        core_pct(cpu_ticks_of(&[me]) - cm, secs)
    );

    // --- HIT from disk, one client: replica 0 (now holding the blob),
    // one replica alone, nginx.
    let (disk_single, _) = rt.block_on(single_big(r0, fx, true, REPS))?;
    let (pt_single, _) = rt.block_on(single_big(&b.pt, fx, true, REPS))?;
    let (ng_single, m) = rt.block_on(single_big(&b.ng, fx, true, REPS))?;
    report.nginx_not_hit += m;
    let disk_lines = c.wait_lines(0, &big.digest, &[("cache", "HIT")], REPS);
    eprintln!(
        "scale-out HIT 1 client: S3 {s3_single:.0} MiB/s ({cpu_single}), bucket alone {bucket_single:.0} MiB/s ({cpu_bucket}), replica disk {disk_single:.0}, 1 replica {pt_single:.0}, nginx {ng_single:.0} MiB/s"
    );

    // --- S3 HIT, many clients round-robin over the replicas, every disk
    // cleared of the many blobs (done above).
    let all: Vec<u32> = c.targets.iter().map(|t| t.pid).collect();
    let (cw, cr, cm) = (
        cpu_ticks_of(&[weed]),
        cpu_ticks_of(&all),
        cpu_ticks_of(&[me]),
    );
    let t = Instant::now();
    let (s3_many, _) = rt.block_on(concurrent_over(&c.targets, fx, sizes.many_clients, 1))?;
    let secs = t.elapsed().as_secs_f64();
    let cpu_many = format!(
        "SeaweedFS {:.0} %, replicas {:.0} %, load generator {:.0} %",
        core_pct(cpu_ticks_of(&[weed]) - cw, secs),
        core_pct(cpu_ticks_of(&all) - cr, secs),
        core_pct(cpu_ticks_of(&[me]) - cm, secs)
    );
    // One SHARED_HIT per (replica, blob) its clients asked for; a second
    // client of the same blob on the same replica joins that read.
    let pairs: HashSet<(usize, usize)> = (0..sizes.many_clients)
        .map(|i| (i % n, i % many.len()))
        .collect();
    let shared_many: usize = pairs
        .iter()
        .map(|&(r, l)| c.wait_lines(r, &many[l].digest, &[("cache", "SHARED_HIT")], 1))
        .sum();

    // --- HIT from disk, the same clients again (each replica now holds
    // the blobs its clients read), one replica alone, nginx.
    let (disk_many, _) = rt.block_on(concurrent_over(&c.targets, fx, sizes.many_clients, 1))?;
    let (pt_many, _) = rt.block_on(concurrent_over(
        std::slice::from_ref(&b.pt),
        fx,
        sizes.many_clients,
        1,
    ))?;
    let (ng_many, m) = rt.block_on(concurrent_over(
        std::slice::from_ref(&b.ng),
        fx,
        sizes.many_clients,
        1,
    ))?;
    report.nginx_not_hit += m;
    eprintln!(
        "scale-out HIT {} clients: S3 {s3_many:.0} MiB/s ({cpu_many}), replicas' disks {disk_many:.0}, 1 replica {pt_many:.0}, nginx {ng_many:.0} MiB/s",
        sizes.many_clients
    );
    let (gets_hit, checks_hit) = {
        let (whole, checks) = upstream_gets(&hit_blobs)?;
        (whole - gets_before.0, checks - gets_before.1)
    };

    // --- MISS, throttled upstream: one client alone on a replica that
    // does not own the blob (it streams from the owner, which fetches),
    // then the many clients round-robin over the replicas.
    let layers = &cold.manifests[0].layers;
    let (single, multi) = (&layers[0], &layers[1]);
    let single_owner = c.owner(&single.digest);
    let single_on = (single_owner + 1) % n;
    let multi_owner = c.owner(&multi.digest);
    b.relay.set_rate(sizes.throttle);
    let rm = rt.block_on(miss_on(
        &c.targets[single_on],
        &c.targets,
        SO_REPO,
        (single, multi),
        sizes.miss_clients,
        &b.upstream,
    ));
    b.relay.set_rate(0);
    let rm = rm?;
    let (pm, nm, measured_here) = match baseline {
        Some((pm, nm)) => (pm, nm, false),
        None => {
            b.relay.set_rate(sizes.throttle);
            let pm = rt.block_on(miss(&b.pt, fx, REPO, sizes.miss_clients, &b.upstream, true));
            let nm = rt.block_on(miss(
                &b.ng,
                fx,
                NG_MISS_REPO,
                sizes.miss_clients,
                &b.upstream,
                true,
            ));
            b.relay.set_rate(0);
            (pm?, nm?, true)
        }
    };
    eprintln!(
        "scale-out MISS: replicas single {:.2}s, {} clients {:.2}s, {} upstream GETs, spread {:.1} ms",
        rm.single_s, sizes.miss_clients, rm.total_s, rm.upstream_gets, rm.spread_ms
    );
    // Who served whom: the owner streams to each other replica once.
    let peer_served: Vec<usize> = (0..n)
        .map(|i| {
            let want = if i == multi_owner { n - 1 } else { 0 };
            c.wait_lines(i, &multi.digest, &[("via", "peer")], want)
        })
        .collect();
    let single_via_owner = c.wait_lines(single_owner, &single.digest, &[("via", "peer")], 1);
    c.wait_in_bucket(
        &[multi.digest.as_str(), single.digest.as_str()],
        Duration::from_secs(60),
    )?;
    let objects = c.bucket_blobs()?;
    let uploads = c.uploads()?;

    // --- The table.
    let rows = &mut report.scale;
    rows.push(ScaleRow {
        name: format!(
            "HIT, 1 client, {} MiB blob, HTTPS (best of {REPS}), from the replica's disk",
            big.size / MIB
        ),
        replicas: disk_single,
        pt: Some(pt_single),
        ng: Some(ng_single),
        unit: "MiB/s",
        target: "–".into(),
        met: None,
    });
    rows.push(ScaleRow {
        name: format!(
            "S3 HIT (SHARED_HIT), 1 client, same blob, replica's disk cleared before each read (best of {REPS})"
        ),
        replicas: s3_single,
        pt: None,
        ng: None,
        unit: "MiB/s",
        target: "–".into(),
        met: None,
    });
    rows.push(ScaleRow {
        name: format!(
            "the same object read straight from the bucket by the load generator (object_store, no replica; best of {REPS})"
        ),
        replicas: bucket_single,
        pt: None,
        ng: None,
        unit: "MiB/s",
        target: "–".into(),
        met: None,
    });
    rows.push(ScaleRow {
        name: "S3 HIT / disk HIT, 1 client".into(),
        replicas: s3_single / disk_single,
        pt: None,
        ng: None,
        unit: "×",
        target: "–".into(),
        met: None,
    });
    rows.push(ScaleRow {
        name: format!(
            "HIT, {} clients over {} blobs of {} MiB, HTTPS, round-robin over the replicas, aggregate, from disk",
            sizes.many_clients,
            sizes.many_count,
            sizes.many_size / MIB
        ),
        replicas: disk_many,
        pt: Some(pt_many),
        ng: Some(ng_many),
        unit: "MiB/s",
        target: "–".into(),
        met: None,
    });
    rows.push(ScaleRow {
        name: format!(
            "S3 HIT, the same {} clients, replicas' disks cleared, aggregate",
            sizes.many_clients
        ),
        replicas: s3_many,
        pt: None,
        ng: None,
        unit: "MiB/s",
        target: "–".into(),
        met: None,
    });
    rows.push(ScaleRow {
        name: format!("S3 HIT / disk HIT, {} clients", sizes.many_clients),
        replicas: s3_many / disk_many,
        pt: None,
        ng: None,
        unit: "×",
        target: "–".into(),
        met: None,
    });
    let mlabel = format!(
        "MISS, {} clients (replicas: round-robin), {} MiB blob, upstream {} MiB/s",
        sizes.miss_clients,
        sizes.throttle_size / MIB,
        sizes.throttle / MIB
    );
    rows.push(ScaleRow {
        name: format!("{mlabel}: upstream GETs"),
        replicas: rm.upstream_gets as f64,
        pt: Some(pm.upstream_gets as f64),
        ng: Some(nm.upstream_gets as f64),
        unit: "",
        target: "1".into(),
        met: Some(rm.upstream_gets == 1),
    });
    rows.push(ScaleRow {
        name: format!("{mlabel}: first-byte spread"),
        replicas: rm.spread_ms,
        pt: Some(pm.spread_ms),
        ng: Some(nm.spread_ms),
        unit: "ms",
        target: "≤ 100 ms".into(),
        met: Some(rm.spread_ms <= 100.0),
    });
    rows.push(ScaleRow {
        name: format!("{mlabel}: total time"),
        replicas: rm.total_s,
        pt: Some(pm.total_s),
        ng: Some(nm.total_s),
        unit: "s",
        target: "–".into(),
        met: None,
    });
    rows.push(ScaleRow {
        name: "MISS, 1 client alone, same size (replicas: on a non-owner, via the owner): time"
            .into(),
        replicas: rm.single_s,
        pt: Some(pm.single_s),
        ng: Some(nm.single_s),
        unit: "s",
        target: "–".into(),
        met: None,
    });
    rows.push(ScaleRow {
        name: format!("{mlabel}: total / single"),
        replicas: rm.total_s / rm.single_s,
        pt: Some(pm.total_s / pm.single_s),
        ng: Some(nm.total_s / nm.single_s),
        unit: "×",
        target: "≤ 1.2×".into(),
        met: Some(rm.total_s <= 1.2 * rm.single_s),
    });

    // --- What the logs say.
    let notes = &mut report.scale_notes;
    notes.push(format!(
        "{REPLICAS} replicas (the same binary; static peer list, peer listener with mutual TLS from the bench CA) over one bucket of one `weed server` (master, volume, filer and S3 gateway in one process) on 127.0.0.1; every server shares the 2 cores with the load generator"
    ));
    notes.push(format!(
        "bucket seeded with {} blobs ({} MiB) in {seed_s:.1} s; afterwards every replica's disk was purged (`DELETE /admin/cache?digest=…&scope=local`)",
        hit_blobs.len(),
        seeded / MIB
    ));
    notes.push(format!(
        "S3 HIT, 1 client: {shared_single} of {REPS} reads logged SHARED_HIT; CPU during them: {cpu_single} of one core"
    ));
    notes.push(format!(
        "the bucket read alone (plain HTTP, no TLS, nothing written): CPU {cpu_bucket} of one core"
    ));
    notes.push(format!(
        "S3 HIT, {} clients: {shared_many} SHARED_HIT lines for {} (replica, blob) pairs; CPU: {cpu_many} of one core",
        sizes.many_clients,
        pairs.len()
    ));
    notes.push(format!(
        "disk HIT, 1 client on replica 0: {disk_lines} HIT lines (want {REPS}); upstream downloads of the HIT blobs during the S3 and disk HIT reads: {gets_hit} (want 0), and {checks_hit} one-byte access checks (a replica asking whether the client may read a blob it has no answer for)"
    ));
    notes.push(format!(
        "MISS: replica {multi_owner} owns the {}-client blob and streamed it to {:?} peers (by replica; want {} for the owner, 0 for the others); the single client was on replica {single_on}, whose owner (replica {single_owner}) logged {single_via_owner} peer stream (want 1)",
        sizes.miss_clients,
        peer_served,
        n - 1
    ));
    notes.push(format!(
        "bucket after the run: {} blob objects; uploads by replica {uploads:?} (each blob uploaded once, by the replica that fetched it)",
        objects.len()
    ));
    notes.push(if measured_here {
        "1 replica and nginx MISS figures measured in this phase (throttled, blobs 2 and 3 of the MISS fixture)".into()
    } else {
        "1 replica and nginx MISS figures: the throttled MISS phase of this run (same blob size, same rate)".into()
    });
    if shared_single != REPS || shared_many != pairs.len() || gets_hit != 0 {
        notes.push(
            "**the S3 HIT figures are not all reads from the bucket: see the counts above**".into(),
        );
    }
    Ok(())
}

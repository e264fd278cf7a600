//! HIT, many clients over many blobs at once, over HTTPS: aggregate
//! throughput.

use std::time::Instant;

use tokio::runtime::Runtime;

use crate::report::{Report, Row};
use crate::targets::{Bench, Fixtures, TRANSFER_TIMEOUT, Target, check, get, mbps, not_hit};
use crate::{MIB, REPO, Res, Sizes};

pub fn run(b: &Bench, rt: &Runtime, sizes: &Sizes, report: &mut Report) -> Res<()> {
    let (a, _) = rt.block_on(concurrent(&b.pt, &b.fx, sizes.many_clients, 1))?;
    let (ng, m) = rt.block_on(concurrent(&b.ng, &b.fx, sizes.many_clients, 1))?;
    report.nginx_not_hit += m;
    eprintln!(
        "HIT {} clients: pullthrough {a:.0} MiB/s, nginx {ng:.0} MiB/s",
        sizes.many_clients
    );
    report.rows.push(Row {
        name: format!(
            "HIT, {} clients over {} blobs of {} MiB, HTTPS, aggregate",
            sizes.many_clients,
            sizes.many_count,
            sizes.many_size / MIB
        ),
        pt: a,
        ng,
        unit: "MiB/s",
        target: "≥ 1.0×".into(),
        met: Some(a >= ng),
    });
    Ok(())
}

/// `clients` concurrent clients, client i reading blob i % count, over
/// HTTPS: aggregate MiB/s.
pub async fn concurrent(
    t: &Target,
    f: &Fixtures,
    clients: usize,
    per_client: usize,
) -> Res<(f64, usize)> {
    concurrent_over(std::slice::from_ref(t), f, clients, per_client).await
}

/// [`concurrent`] with client i on `ts[i % len]` (round-robin over
/// replicas).
pub async fn concurrent_over(
    ts: &[Target],
    f: &Fixtures,
    clients: usize,
    per_client: usize,
) -> Res<(f64, usize)> {
    if ts.is_empty() {
        return Err("concurrent: no target".into());
    }
    let layers = f.many.manifests[0].layers.clone();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..clients {
        let t = ts[i % ts.len()].clone();
        let layers = layers.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = t.connect(true).await?;
            let mut out = Vec::new();
            for k in 0..per_client {
                let l = &layers[(i + k) % layers.len()];
                let r = tokio::time::timeout(
                    TRANSFER_TIMEOUT,
                    get(&mut s, &t.blob(REPO, &l.digest), None),
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
    for (i, task) in tasks.into_iter().enumerate() {
        let fetches = task.await??;
        misses += not_hit(&ts[i % ts.len()], &fetches);
        bytes += fetches.iter().map(|f| f.bytes).sum::<u64>();
    }
    Ok((mbps(bytes, start.elapsed()), misses))
}

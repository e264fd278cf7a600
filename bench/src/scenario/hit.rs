//! HIT, one client, one big blob: over HTTPS, then plain HTTP.

use tokio::runtime::Runtime;

use crate::report::{Report, Row};
use crate::targets::{Bench, Fixtures, Target, check, get_once, mbps, not_hit};
use crate::{MIB, REPO, Res, Sizes};

/// Reads of the big blob per protocol; the best counts.
const REPS: usize = 3;

pub fn run(b: &Bench, rt: &Runtime, sizes: &Sizes, report: &mut Report) -> Res<()> {
    for (tls_on, label, target, min) in [
        (true, "HTTPS", "≥ 1.0×", 1.0),
        (false, "HTTP", "≥ 0.9×", 0.9),
    ] {
        let (a, _) = rt.block_on(single_big(&b.pt, &b.fx, tls_on, REPS))?;
        let (ng, m) = rt.block_on(single_big(&b.ng, &b.fx, tls_on, REPS))?;
        report.nginx_not_hit += m;
        eprintln!("HIT 1 client {label}: pullthrough {a:.0} MiB/s, nginx {ng:.0} MiB/s");
        report.rows.push(Row {
            name: format!(
                "HIT, 1 client, {} MiB blob, {label} (best of {REPS})",
                sizes.big / MIB
            ),
            pt: a,
            ng,
            unit: "MiB/s",
            target: target.into(),
            met: Some(a >= min * ng),
        });
    }
    Ok(())
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

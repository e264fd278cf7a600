//! Warm-up: every HIT fixture read once through each server, and nginx
//! seen to hit its cache.

use std::time::Instant;

use pullthrough_testbed::fixtures::OCI_MANIFEST;
use tokio::runtime::Runtime;

use crate::targets::{Bench, Fixtures, Target, check, get, get_once};
use crate::{REPO, Res};

pub fn run(b: &Bench, rt: &Runtime) -> Res<()> {
    for t in [&b.pt, &b.ng] {
        if let Err(e) = rt.block_on(warm(t, &b.fx)) {
            return Err(format!("{e}\nnginx error.log:\n{}", b.nginx.error_log()).into());
        }
    }
    Ok(())
}

async fn warm(t: &Target, f: &Fixtures) -> Res<()> {
    let start = Instant::now();
    let big = &f.big.manifests[0].layers[0];
    let r = get_once(t, true, &t.blob(REPO, &big.digest)).await?;
    check(t, &r, Some(big.size), "warm big")?;
    for l in &f.many.manifests[0].layers {
        let r = get_once(t, true, &t.blob(REPO, &l.digest)).await?;
        check(t, &r, Some(l.size), "warm many")?;
    }
    let m = &f.big.manifests[0];
    let mut s = t.connect(true).await?;
    let r = get(&mut s, &t.manifest(&m.digest), Some(OCI_MANIFEST)).await?;
    check(t, &r, Some(m.bytes.len() as u64), "warm manifest")?;
    // nginx writes the cache entry when the download ends; confirm a hit.
    let r = get_once(t, true, &t.blob(REPO, &big.digest)).await?;
    check(t, &r, Some(big.size), "confirm big")?;
    if t.is_nginx && r.header("x-cache-status") != Some("HIT") {
        return Err(format!(
            "nginx did not hit its cache: {:?}",
            r.header("x-cache-status")
        )
        .into());
    }
    eprintln!(
        "{}: caches warm in {:.1}s",
        t.name,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

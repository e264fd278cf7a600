//! One module per scenario, in the order a run takes them. Each measures
//! pullthrough, then nginx, and adds its figures to the report.

pub mod concurrent;
pub mod hit;
pub mod hit_h2;
pub mod manifest;
pub mod miss;
pub mod rss;
pub mod scaleout;
pub mod warm;

use crate::Res;
use crate::procfs::cpu_ticks_of;
use crate::report::Report;
use crate::targets::{Bench, Target};

/// What [`alternate`] measured: each side's figures, in order, and the CPU
/// ticks (10 ms) its server spent on them.
pub struct Alternated {
    pub pt: Vec<f64>,
    pub ng: Vec<f64>,
    pub pt_ticks: u64,
    pub ng_ticks: u64,
}

/// `reps` rounds of `read` on pullthrough, then on nginx: alternating,
/// so a slow spell of the machine (another process, the page cache)
/// falls on both servers alike rather than on whichever ran then. `read`
/// gives a figure and how many nginx answers were not cache hits.
pub fn alternate(
    b: &Bench,
    reps: usize,
    report: &mut Report,
    mut read: impl FnMut(&Target) -> Res<(f64, usize)>,
) -> Res<Alternated> {
    let ng_workers = b.nginx.workers();
    let mut out = Alternated {
        pt: Vec::new(),
        ng: Vec::new(),
        pt_ticks: 0,
        ng_ticks: 0,
    };
    for _ in 0..reps {
        let c0 = cpu_ticks_of(&[b.pt.pid]);
        let (x, _) = read(&b.pt)?;
        let c1 = cpu_ticks_of(&[b.pt.pid]);
        let n0 = cpu_ticks_of(&ng_workers);
        let (y, m) = read(&b.ng)?;
        let n1 = cpu_ticks_of(&ng_workers);
        report.nginx_not_hit += m;
        out.pt_ticks += c1 - c0;
        out.ng_ticks += n1 - n0;
        out.pt.push(x);
        out.ng.push(y);
    }
    Ok(out)
}

/// `ticks` of CPU (10 ms each) spent serving `bytes`, as ms per GiB.
pub fn ms_per_gib(ticks: u64, bytes: u64) -> f64 {
    ticks as f64 * 10.0 / (bytes as f64 / (1u64 << 30) as f64)
}

/// The middle value (of a copy: the order of the reads stays as it was).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

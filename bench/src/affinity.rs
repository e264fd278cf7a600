//! Pinning the load generator and the servers to cores of their own.
//!
//! On 2 shared cores a single plain-HTTP read runs at one of two rates
//! (1.3 or 2.5 GiB/s here, for either server) depending on whether the
//! scheduler put the client on the server's core, so the median of 11
//! reads lands on one mode or the other by luck. With the bench's
//! threads on one core and the server being measured (pullthrough, or
//! nginx's master and workers) on the other, both servers get the same
//! placement on every read.

use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

use crate::Res;

/// Affinities changed by [`Pinned::new`], put back when it is dropped.
pub struct Pinned {
    /// Each process pinned, and the affinity its main thread had.
    restore: Vec<(u32, CpuSet)>,
}

impl Pinned {
    /// This process's threads on the first core it may run on, every
    /// thread of `servers` on the second. `None` with fewer than 2 cores.
    pub fn new(servers: &[u32]) -> Res<Option<Self>> {
        let allowed = sched_getaffinity(Pid::from_raw(0))?;
        let cores: Vec<usize> = (0..CpuSet::count())
            .filter(|c| allowed.is_set(*c).unwrap_or(false))
            .take(2)
            .collect();
        let [client, server] = cores[..] else {
            return Ok(None);
        };
        let mut pinned = Self {
            restore: Vec::new(),
        };
        // On error, `pinned` is dropped and puts back what it changed.
        pinned.pin(std::process::id(), client)?;
        for pid in servers {
            pinned.pin(*pid, server)?;
        }
        Ok(Some(pinned))
    }

    /// Every thread of `pid` (as listed now: threads started later take
    /// the affinity of the thread that starts them) on `core`.
    fn pin(&mut self, pid: u32, core: usize) -> Res<()> {
        let before = sched_getaffinity(Pid::from_raw(pid as i32))
            .map_err(|e| format!("affinity of {pid}: {e}"))?;
        self.restore.push((pid, before));
        let mut set = CpuSet::new();
        set.set(core)?;
        for tid in threads(pid) {
            match sched_setaffinity(tid, &set) {
                // The thread ended since the listing.
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => return Err(format!("pinning thread {tid} of {pid}: {e}").into()),
            }
        }
        Ok(())
    }
}

/// The threads of `pid` now (none if it is gone).
fn threads(pid: u32) -> Vec<Pid> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .filter_map(|t| t.ok()?.file_name().to_str()?.parse().ok())
        .map(Pid::from_raw)
        .collect()
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // Every thread, also those started while pinned (they inherited
        // the pinned affinity).
        for (pid, set) in &self.restore {
            for tid in threads(*pid) {
                // Best effort: a thread gone since has nothing to restore.
                let _ = sched_setaffinity(tid, set);
            }
        }
    }
}

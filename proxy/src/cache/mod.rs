//! The cache: content-addressed blobs and manifests, tag → digest answers,
//! downloads in flight (and turns for manifest fetches), and which
//! repository was served which digest.

pub mod inflight;
pub mod pins;
pub mod referrers;
pub mod repos;
pub mod shared;
pub mod store;
pub mod tags;
pub mod turns;

/// `t` as milliseconds since the epoch (0 before it): the clock the shared
/// bucket's coordination files, `/status` and the admin API use, where uses
/// within one second must still order.
pub fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

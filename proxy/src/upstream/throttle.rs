//! A token bucket: how often the proxy may ask a token realm with a
//! registry's `credentialsFile` credentials for a repository it never read
//! with them (`limits.newRepositoryTokenBurst`, refilled at
//! `limits.newRepositoryTokensPerMinute`).
//!
//! Clients choose repository names, and each new name is one credentialed
//! token request: without a bound, a flood of made-up names has the proxy
//! hammer the realm with the cluster's credentials, which gets them (or the
//! proxy's address) rate limited or locked for every real pull. The bucket
//! is per registry and O(1) per request; time is passed in, so the tests
//! need no clock.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use pullthrough_api::config::Limits;

/// Refused: the bucket is empty, and when a request would next pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Empty {
    /// Until one permit has refilled (whole seconds, at least one: what a
    /// `Retry-After` header can say).
    pub retry_after: Duration,
    /// The first refusal since the bucket last granted one: worth a
    /// warning, the ones after it are not.
    pub first: bool,
}

#[derive(Debug)]
struct Level {
    permits: f64,
    at: Instant,
    /// Refused since the last grant.
    dry: bool,
}

/// Up to `burst` permits at once, refilled at `per_second`.
#[derive(Debug)]
pub struct TokenBucket {
    per_second: f64,
    burst: f64,
    level: Mutex<Level>,
}

impl TokenBucket {
    /// A full bucket of `burst` permits refilled at `per_minute` (both at
    /// least one).
    pub fn new(per_minute: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            per_second: f64::from(per_minute.max(1)) / 60.0,
            burst,
            level: Mutex::new(Level {
                permits: burst,
                at: now,
                dry: false,
            }),
        }
    }

    /// The bucket `limits` configure for credentialed token requests.
    pub fn for_new_repositories(limits: &Limits, now: Instant) -> Self {
        Self::new(
            limits.new_repository_tokens_per_minute,
            limits.new_repository_token_burst,
            now,
        )
    }

    /// Takes one permit, or says how long until one is there. The permit
    /// goes back into the bucket unless [`Permit::spend`] is called: a
    /// caller can take it before work that only a permit makes useful
    /// (so that work is skipped when there is none) and return it when
    /// it turns out not to be needed.
    pub fn take(&self, now: Instant) -> Result<Permit<'_>, Empty> {
        let mut level = self.level.lock().unwrap_or_else(|p| p.into_inner());
        // An `Instant` from before the last call (callers on other threads)
        // refills nothing rather than panicking or going backwards.
        let elapsed = now.saturating_duration_since(level.at);
        level.permits = (level.permits + elapsed.as_secs_f64() * self.per_second).min(self.burst);
        level.at = level.at.max(now);
        if level.permits >= 1.0 {
            level.permits -= 1.0;
            level.dry = false;
            return Ok(Permit {
                bucket: self,
                spent: false,
            });
        }
        let first = !level.dry;
        level.dry = true;
        let missing = 1.0 - level.permits;
        let secs = (missing / self.per_second).ceil().max(1.0);
        Err(Empty {
            // At most a minute (the slowest rate refills one a minute).
            retry_after: Duration::from_secs_f64(secs.min(60.0)),
            first,
        })
    }
}

/// One permit of a [`TokenBucket`], returned to it when dropped unspent.
#[derive(Debug)]
#[must_use = "an unspent permit goes back into the bucket when dropped"]
pub struct Permit<'a> {
    bucket: &'a TokenBucket,
    spent: bool,
}

impl Permit<'_> {
    /// The permit was used: it does not go back.
    pub fn spend(mut self) {
        self.spent = true;
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.spent {
            let mut level = self.bucket.level.lock().unwrap_or_else(|p| p.into_inner());
            level.permits = (level.permits + 1.0).min(self.bucket.burst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes and spends a permit.
    fn take(b: &TokenBucket, now: Instant) -> Result<(), Empty> {
        b.take(now).map(Permit::spend)
    }

    #[test]
    fn a_burst_then_the_rate() {
        let t0 = Instant::now();
        // 3 at once, then one a second.
        let b = TokenBucket::new(60, 3, t0);
        for _ in 0..3 {
            assert!(take(&b, t0).is_ok());
        }
        let empty = take(&b, t0).unwrap_err();
        assert_eq!(empty.retry_after, Duration::from_secs(1));
        assert!(empty.first);
        assert!(!take(&b, t0).unwrap_err().first, "warned once");
        // Half a second refills half a permit: still nothing.
        assert!(take(&b, t0 + Duration::from_millis(500)).is_err());
        assert!(take(&b, t0 + Duration::from_secs(1)).is_ok());
        assert!(take(&b, t0 + Duration::from_secs(1)).is_err());
        // A long pause refills up to the burst, not beyond.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert!(take(&b, later).is_ok());
        }
        let again = take(&b, later).unwrap_err();
        assert!(again.first, "a new episode after a grant");
    }

    /// Over any span, grants are at most burst + rate × span, however
    /// often it is asked: the bound the whole-proxy flood test relies on.
    #[test]
    fn a_flood_gets_burst_plus_rate_times_time() {
        let t0 = Instant::now();
        let b = TokenBucket::new(120, 10, t0);
        let mut granted = 0u32;
        // 100 000 asks over 30 s.
        for i in 0..100_000u64 {
            let now = t0 + Duration::from_micros(i * 300);
            if take(&b, now).is_ok() {
                granted += 1;
            }
        }
        // 10 + 2/s × 30 s.
        assert!((69..=70).contains(&granted), "{granted}");
    }

    #[test]
    fn unspent_permits_go_back_and_slow_rates_say_when() {
        let t0 = Instant::now();
        let b = TokenBucket::new(1, 1, t0);
        for _ in 0..3 {
            let permit = b.take(t0).unwrap();
            assert!(b.take(t0).is_err(), "taken while held");
            drop(permit);
        }
        assert!(take(&b, t0).is_ok());
        let empty = take(&b, t0 + Duration::from_secs(15)).unwrap_err();
        assert_eq!(empty.retry_after, Duration::from_secs(45));
        assert_eq!(take(&b, t0 + Duration::from_secs(60)), Ok(()));
    }

    #[test]
    fn an_earlier_instant_refills_nothing() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let b = TokenBucket::new(60, 1, t0);
        assert!(take(&b, t0).is_ok());
        assert!(take(&b, t0 - Duration::from_secs(5)).is_err());
        assert!(take(&b, t0 + Duration::from_millis(999)).is_err());
        assert!(take(&b, t0 + Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn configured_from_limits() {
        let t0 = Instant::now();
        let b = TokenBucket::for_new_repositories(&Limits::default(), t0);
        let granted = (0..1000).filter(|_| take(&b, t0).is_ok()).count();
        assert_eq!(granted, 100);
    }
}

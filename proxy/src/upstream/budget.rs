//! What the upstreams say is left of their pull budget: Docker Hub's
//! `ratelimit-limit` / `ratelimit-remaining` (`<n>;w=<window seconds>`) and
//! `docker-ratelimit-source` (the client IP or account the budget belongs
//! to), and `Retry-After` on a 429 from any registry.
//!
//! A registry whose budget is low (remaining at or under its
//! `upstreamReserve`) or that asked to be left alone (`Retry-After` not yet
//! past) is spared what can wait: cached tags are served as they are
//! (STALE) instead of being revalidated, so the budget left goes to pulls
//! that need the upstream, and a 429 storm does not reach clients of
//! cached tags.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, StatusCode};

pub const LIMIT: &str = "ratelimit-limit";
pub const REMAINING: &str = "ratelimit-remaining";
pub const SOURCE: &str = "docker-ratelimit-source";
/// A `Retry-After` is honoured for at most this long (a registry's answer
/// must not silence it for days).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// A 429 without `Retry-After`: back off this long.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(60);
/// A `ratelimit-remaining` without a window (`w=`) holds this long: a
/// cached tag is revalidated only by asking, so a low reading that never
/// lapsed would keep every tag stale for good.
const NO_WINDOW_VALID: Duration = Duration::from_secs(300);

/// The last figures a registry sent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Budget {
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    pub window: Option<Duration>,
    /// `docker-ratelimit-source`: whose budget it is (an IP, an account).
    pub source: String,
    /// When the figures were read.
    pub observed: Option<Instant>,
    /// Until when the registry asked not to be asked (429 + Retry-After).
    pub retry_until: Option<Instant>,
}

/// `/status` per registry: the operator copies it into `status.upstream`.
pub type BudgetReport = pullthrough_api::crd::UpstreamBudget;

impl Budget {
    /// Whether the registry should be spared: inside a Retry-After, or
    /// with at most `reserve` pulls left in a window that has not passed
    /// since it was read.
    pub fn is_low(&self, reserve: u64, now: Instant) -> bool {
        if self.retry_until.is_some_and(|t| now < t) {
            return true;
        }
        let still_valid = self
            .observed
            .is_some_and(|at| now.duration_since(at) < self.window.unwrap_or(NO_WINDOW_VALID));
        still_valid && self.remaining.is_some_and(|r| r <= reserve)
    }

    fn report(&self, reserve: u64, now: Instant) -> BudgetReport {
        let unix_now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        BudgetReport {
            limit: self.limit,
            remaining: self.remaining,
            window_seconds: self.window.map(|w| w.as_secs()),
            source: self.source.clone(),
            retry_after_until: self
                .retry_until
                .filter(|t| now < *t)
                .map(|t| unix_now + t.duration_since(now).as_secs()),
            low: self.is_low(reserve, now),
        }
    }
}

/// `100;w=21600` → (100, 6 h); `100` → (100, none).
pub fn parse_quota(value: &str) -> Option<(u64, Option<Duration>)> {
    let mut parts = value.split(';');
    let n = parts.next()?.trim().parse().ok()?;
    let window = parts
        .filter_map(|p| p.trim().strip_prefix("w="))
        .find_map(|w| w.trim().parse().ok())
        .map(Duration::from_secs);
    Some((n, window))
}

/// `Retry-After` as delay seconds or an HTTP date (a date already past
/// is no wait); anything else is the default.
fn retry_after(headers: &HeaderMap) -> Duration {
    let Some(v) = headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
    else {
        return DEFAULT_RETRY_AFTER;
    };
    let wait = match v.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => match httpdate::parse_http_date(v) {
            Ok(at) => at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO),
            Err(_) => DEFAULT_RETRY_AFTER,
        },
    };
    wait.min(MAX_RETRY_AFTER)
}

/// Per registry host.
#[derive(Debug, Default)]
pub struct Budgets {
    by_registry: Mutex<HashMap<String, Budget>>,
}

impl Budgets {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Budget>> {
        self.by_registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads an upstream answer's budget headers; true when it carried any.
    pub fn observe(&self, registry: &str, status: StatusCode, headers: &HeaderMap) -> bool {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let limit = text(LIMIT).and_then(parse_quota);
        let remaining = text(REMAINING).and_then(parse_quota);
        let throttled = status == StatusCode::TOO_MANY_REQUESTS;
        if limit.is_none() && remaining.is_none() && !throttled {
            return false;
        }
        let now = Instant::now();
        let mut all = self.lock();
        let b = all.entry(registry.to_string()).or_default();
        if let Some((n, w)) = limit {
            b.limit = Some(n);
            b.window = w.or(b.window);
        }
        if let Some((n, w)) = remaining {
            b.remaining = Some(n);
            b.window = w.or(b.window);
            b.observed = Some(now);
        }
        if let Some(s) = text(SOURCE) {
            b.source = s.chars().take(64).collect();
        }
        if throttled {
            b.retry_until = Some(now + retry_after(headers));
        }
        true
    }

    pub fn is_low(&self, registry: &str, reserve: u64) -> bool {
        self.lock()
            .get(registry)
            .is_some_and(|b| b.is_low(reserve, Instant::now()))
    }

    pub fn get(&self, registry: &str) -> Option<Budget> {
        self.lock().get(registry).cloned()
    }

    /// Reports of the registries that sent any figures, with each one's
    /// reserve.
    pub fn report(&self, reserve: impl Fn(&str) -> u64) -> HashMap<String, BudgetReport> {
        let now = Instant::now();
        self.lock()
            .iter()
            .map(|(r, b)| (r.clone(), b.report(reserve(r), now)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn quota_values_parse() {
        assert_eq!(
            parse_quota("100;w=21600"),
            Some((100, Some(Duration::from_secs(21600))))
        );
        assert_eq!(
            parse_quota(" 76 ; w=60 "),
            Some((76, Some(Duration::from_secs(60))))
        );
        assert_eq!(parse_quota("5"), Some((5, None)));
        assert_eq!(parse_quota("lots"), None);
    }

    #[test]
    fn retry_after_is_read_as_seconds_or_a_date() {
        let h = |v: &str| headers(&[("retry-after", v)]);
        assert_eq!(retry_after(&h("120")), Duration::from_secs(120));
        assert_eq!(retry_after(&h("99999999")), MAX_RETRY_AFTER);
        assert_eq!(retry_after(&h("soon")), DEFAULT_RETRY_AFTER);
        assert_eq!(retry_after(&HeaderMap::new()), DEFAULT_RETRY_AFTER);
        let in_10_min = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(600));
        let wait = retry_after(&h(&in_10_min));
        assert!(
            wait > Duration::from_secs(590) && wait <= Duration::from_secs(600),
            "{wait:?}"
        );
        let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(600));
        assert_eq!(retry_after(&h(&past)), Duration::ZERO);
    }

    /// A registry that names no window: its low reading lapses, or the
    /// tags it spares would never be revalidated again.
    #[test]
    fn a_reading_without_a_window_lapses() {
        let b = Budgets::default();
        assert!(b.observe("quay.io", StatusCode::OK, &headers(&[(REMAINING, "3")])));
        let budget = b.get("quay.io").unwrap();
        let now = Instant::now();
        assert!(budget.is_low(5, now));
        assert!(!budget.is_low(5, now + NO_WINDOW_VALID));
    }

    #[test]
    fn docker_hub_headers_make_a_budget_that_runs_low() {
        let b = Budgets::default();
        assert!(!b.observe("docker.io", StatusCode::OK, &HeaderMap::new()));
        assert!(!b.is_low("docker.io", 10));
        let h = headers(&[
            (LIMIT, "100;w=21600"),
            (REMAINING, "11;w=21600"),
            (SOURCE, "203.0.113.7"),
        ]);
        assert!(b.observe("docker.io", StatusCode::OK, &h));
        assert!(!b.is_low("docker.io", 10));
        let got = b.get("docker.io").unwrap();
        assert_eq!((got.limit, got.remaining), (Some(100), Some(11)));
        assert_eq!(got.source, "203.0.113.7");
        b.observe(
            "docker.io",
            StatusCode::OK,
            &headers(&[(REMAINING, "10;w=21600")]),
        );
        assert!(b.is_low("docker.io", 10));
        assert!(!b.is_low("quay.io", 10));
        let report = b.report(|_| 10);
        assert!(report["docker.io"].low);
        assert_eq!(report["docker.io"].window_seconds, Some(21600));
    }

    #[test]
    fn a_low_reading_expires_with_its_window() {
        let now = Instant::now();
        let b = Budget {
            remaining: Some(0),
            window: Some(Duration::from_secs(60)),
            observed: Some(now),
            ..Default::default()
        };
        assert!(b.is_low(10, now));
        assert!(!b.is_low(10, now + Duration::from_secs(61)));
    }

    #[test]
    fn a_429_spares_the_registry_for_its_retry_after() {
        let b = Budgets::default();
        assert!(b.observe(
            "quay.io",
            StatusCode::TOO_MANY_REQUESTS,
            &headers(&[("retry-after", "30")])
        ));
        assert!(b.is_low("quay.io", 0));
        let got = b.get("quay.io").unwrap();
        let left = got.retry_until.unwrap() - Instant::now();
        assert!(left <= Duration::from_secs(30) && left > Duration::from_secs(28));
        assert!(!got.is_low(0, Instant::now() + Duration::from_secs(31)));
        // An absurd Retry-After is capped.
        b.observe(
            "ghcr.io",
            StatusCode::TOO_MANY_REQUESTS,
            &headers(&[("retry-after", "99999999")]),
        );
        let got = b.get("ghcr.io").unwrap();
        assert!(got.retry_until.unwrap() - Instant::now() <= MAX_RETRY_AFTER);
    }
}

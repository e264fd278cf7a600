//! Whether the shared tier is answering. After an error on the request
//! path the tier is skipped there for a while, so that with the object
//! store down or refusing every request each pull goes straight to
//! pass-through instead of first waiting for the store to fail again; one
//! warning per episode, one line when it answers again. A store that asks
//! to slow down is left alone for a moment only, and is not "down".
//! Errors of calls off the request path are counted, nothing more: they
//! retry on their own, and one failed upload part or LIST must not turn
//! the tier off for every pull.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::TierError;

/// How long the tier is skipped after an error.
pub const SKIP: Duration = Duration::from_secs(10);

/// How long the request path leaves the tier alone after it asked to
/// slow down (`503 SlowDown`): long enough to ease the load, short
/// enough that a throttled bucket is not taken for a dead one.
pub const BACK_OFF: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct Health {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Set while the tier is marked down.
    down_since: Option<Instant>,
    last_error: Option<Instant>,
    /// Until when the request path backs off after a slow-down answer.
    slowed_until: Option<Instant>,
    errors: u64,
}

impl Health {
    pub fn failed(&self, err: &TierError) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.errors += 1;
        s.last_error = Some(Instant::now());
        if s.down_since.is_none() {
            s.down_since = Some(Instant::now());
            tracing::error!(error = %err, skip_secs = SKIP.as_secs(),
                "shared storage failed; serving without it (pass-through and local cache) until it answers again");
        } else {
            tracing::debug!(error = %err, "shared storage still failing");
        }
    }

    /// The store asked to slow down: counted, and the request path leaves
    /// it alone for [`BACK_OFF`]; it is not marked down.
    pub fn slowed(&self, err: &TierError) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.errors += 1;
        let now = Instant::now();
        if s.slowed_until.is_none_or(|until| until <= now) {
            tracing::warn!(error = %err, back_off_ms = BACK_OFF.as_millis() as u64,
                "shared storage asks to slow down; requests leave it alone for a moment");
        }
        s.slowed_until = Some(now + BACK_OFF);
    }

    /// A call off the request path failed: counted only (the caller logs
    /// it and tries again on its own).
    pub fn background_failed(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).errors += 1;
    }

    pub fn succeeded(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(since) = s.down_since.take() {
            tracing::info!(
                down_secs = since.elapsed().as_secs(),
                "shared storage answers again"
            );
        }
    }

    /// While the tier is skipped (down, or backing off): how much longer.
    pub fn skip_for(&self) -> Option<Duration> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let down = s
            .down_since
            .and(s.last_error)
            .and_then(|at| SKIP.checked_sub(at.elapsed()));
        let slowed = s
            .slowed_until
            .and_then(|until| until.checked_duration_since(Instant::now()));
        down.max(slowed).filter(|d| !d.is_zero())
    }

    /// True unless the last request to the tier failed.
    pub fn is_up(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .down_since
            .is_none()
    }

    pub fn errors(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).errors
    }
}

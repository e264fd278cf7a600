//! Whether the shared tier is answering. After an error the tier is
//! skipped for a while, so that with the object store down or refusing
//! every request each pull goes straight to pass-through instead of first
//! waiting for the store to fail again; one warning per episode, one
//! line when it answers again.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::TierError;

/// How long the tier is skipped after an error.
pub const SKIP: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct Health {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Set while the tier is marked down.
    down_since: Option<Instant>,
    last_error: Option<Instant>,
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

    pub fn succeeded(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(since) = s.down_since.take() {
            tracing::info!(
                down_secs = since.elapsed().as_secs(),
                "shared storage answers again"
            );
        }
    }

    /// While the tier is skipped: how much longer.
    pub fn skip_for(&self) -> Option<Duration> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.down_since?;
        let since = s.last_error?.elapsed();
        SKIP.checked_sub(since).filter(|d| !d.is_zero())
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

//! Why a reconcile failed, and how soon it is worth trying again: the
//! typed [`Error`] the reconciler returns and the [`Retry`] decision the
//! controller's error policy acts on.

use std::time::Duration;

use kube::runtime::finalizer;
use pullthrough_api::config::ConfigError;

/// How often a deletion re-checks whether the agents dropped the registry.
pub const AGENT_POLL: Duration = Duration::from_secs(2);
/// The per-object backoff never waits longer than this.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// A failed reconcile. [`Error::reason`] labels the failure metric,
/// [`Error::retry`] drives the error policy.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API request failed; `action` says which one, so a log line names
    /// the object instead of only the HTTP status.
    #[error("{action}: {source}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
    /// Adding or removing the finalizer failed (errors of the apply and
    /// cleanup branches are never wrapped here, see [`Error::from_finalizer`]).
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
    /// The base config and the registries do not make a valid table.
    #[error("rendering the registry table: {0}")]
    Table(#[from] ConfigError),
    /// A deleted registry is still configured on live nodes; not a fault,
    /// the finalizer waits for the agents.
    #[error("waiting for agents on {} to drop {host}", nodes.join(","))]
    WaitingForAgents { host: String, nodes: Vec<String> },
}

/// What the error policy does after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Expected to clear by itself: look again at a steady pace, without
    /// growing the object's backoff or warning.
    Poll(Duration),
    /// A fault: per-object exponential backoff.
    Backoff,
}

impl Error {
    /// Unwraps the errors of kube's `finalizer` helper that came from our
    /// own apply/cleanup branches, so the policy sees the real cause.
    pub fn from_finalizer(e: finalizer::Error<Error>) -> Self {
        match e {
            finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
            other => Error::Finalizer(Box::new(other)),
        }
    }

    /// Every value of [`Error::reason`], so the failure counters exist
    /// (at 0) before the first failure.
    pub const REASONS: [&'static str; 4] = ["kube_api", "finalizer", "table", "waiting_for_agents"];

    /// The `reason` label of `reconcile_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "kube_api",
            Error::Finalizer(_) => "finalizer",
            Error::Table(_) => "table",
            Error::WaitingForAgents { .. } => "waiting_for_agents",
        }
    }

    pub fn retry(&self) -> Retry {
        match self {
            Error::WaitingForAgents { .. } => Retry::Poll(AGENT_POLL),
            Error::Kube { .. } | Error::Finalizer(_) | Error::Table(_) => Retry::Backoff,
        }
    }
}

/// Attaches what the operator was doing to a failed API request.
pub trait KubeContext<T> {
    fn context(self, action: impl FnOnce() -> String) -> Result<T, Error>;
}

impl<T> KubeContext<T> for Result<T, kube::Error> {
    fn context(self, action: impl FnOnce() -> String) -> Result<T, Error> {
        self.map_err(|source| Error::Kube {
            action: action(),
            source,
        })
    }
}

/// Delay after the `failures`-th consecutive failure: 1 s, doubling, at most
/// [`MAX_BACKOFF`].
pub fn backoff(failures: u32) -> Duration {
    let secs = 1u64 << failures.saturating_sub(1).min(9);
    Duration::from_secs(secs).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kube_err() -> Error {
        Err::<(), _>(kube::Error::LinesCodecMaxLineLengthExceeded)
            .context(|| "applying ConfigMap ns/x".into())
            .unwrap_err()
    }

    #[test]
    fn backoff_doubles_to_five_minutes() {
        let secs: Vec<u64> = (1..=12).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(backoff(0), Duration::from_secs(1));
    }

    #[test]
    fn waiting_for_agents_polls_through_the_finalizer() {
        let wait = Error::WaitingForAgents {
            host: "quay.io".into(),
            nodes: vec!["a".into(), "b".into()],
        };
        let e = Error::from_finalizer(finalizer::Error::CleanupFailed(wait));
        assert_eq!(e.retry(), Retry::Poll(AGENT_POLL));
        assert_eq!(e.reason(), "waiting_for_agents");
        assert!(Error::REASONS.contains(&e.reason()));
        assert_eq!(e.to_string(), "waiting for agents on a,b to drop quay.io");
    }

    #[test]
    fn faults_back_off_and_name_the_action() {
        let e = Error::from_finalizer(finalizer::Error::ApplyFailed(kube_err()));
        assert_eq!((e.reason(), e.retry()), ("kube_api", Retry::Backoff));
        assert!(
            e.to_string().starts_with("applying ConfigMap ns/x: "),
            "{e}"
        );
        assert!(Error::REASONS.contains(&e.reason()));
        let e = Error::from_finalizer(finalizer::Error::UnnamedObject);
        assert_eq!((e.reason(), e.retry()), ("finalizer", Retry::Backoff));
        assert!(Error::REASONS.contains(&e.reason()));
        let e = Error::Table(ConfigError {
            key: "registries".into(),
            message: "x".into(),
        });
        assert!(Error::REASONS.contains(&e.reason()));
    }
}

//! Conditions: `observedGeneration` on each, `lastTransitionTime` kept while
//! the status value is unchanged, and the list of changes to report as
//! Events.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use pullthrough_api::crd::MirrorRegistryStatus;

/// A desired condition (type, status, reason, message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl Desired {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

fn status_str(b: bool) -> &'static str {
    if b { "True" } else { "False" }
}

/// Merges `desired` into `old`'s conditions. Returns the new conditions and
/// the ones whose status or reason changed (for Events).
pub fn merge(
    old: Option<&MirrorRegistryStatus>,
    desired: &[Desired],
    generation: Option<i64>,
    now: Timestamp,
) -> (Vec<Condition>, Vec<Condition>) {
    let mut out = Vec::new();
    let mut changed = Vec::new();
    for d in desired {
        let prev = old.and_then(|s| s.condition(d.type_));
        let status = status_str(d.status);
        let same_status = prev.is_some_and(|p| p.status == status);
        let cond = Condition {
            type_: d.type_.to_string(),
            status: status.to_string(),
            reason: d.reason.clone(),
            message: d.message.clone(),
            observed_generation: generation,
            last_transition_time: match prev {
                Some(p) if same_status => p.last_transition_time.clone(),
                _ => Time(now),
            },
        };
        if !(same_status && prev.is_some_and(|p| p.reason == d.reason)) {
            changed.push(cond.clone());
        }
        out.push(cond);
    }
    (out, changed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn transition_time_kept_while_unchanged() {
        let t0 = Timestamp::from_second(100).unwrap();
        let t1 = Timestamp::from_second(200).unwrap();
        let d = [Desired::new("Accepted", true, "Valid", "ok")];
        let (c, ch) = merge(None, &d, Some(1), t0);
        assert_eq!(ch.len(), 1);
        let old = MirrorRegistryStatus {
            conditions: c,
            ..Default::default()
        };
        let d2 = [Desired::new("Accepted", true, "Valid", "still ok")];
        let (c2, ch2) = merge(Some(&old), &d2, Some(2), t1);
        assert!(ch2.is_empty());
        assert_eq!(c2[0].last_transition_time.0, t0);
        assert_eq!(c2[0].observed_generation, Some(2));
        let d3 = [Desired::new("Accepted", false, "DuplicateHost", "x")];
        let (c3, ch3) = merge(Some(&old), &d3, Some(2), t1);
        assert_eq!(ch3.len(), 1);
        assert_eq!(c3[0].last_transition_time.0, t1);
    }
}

//! Failure detection verdicts: which placed PNodes a registry view shows lost or leaving, how
//! long a job may stay silent before it probes, and what a probe's answers mean. Pure.

use super::core::MIN_IDLE;
use crate::registry::{Health, PNodeView};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// The placed PNodes that `view` shows lost (or no longer lists), and those leaving.
pub fn lost_and_leaving(view: &[PNodeView], placed: &BTreeSet<String>) -> (Vec<String>, Vec<String>) {
    let by_id: BTreeMap<&str, &PNodeView> = view.iter().map(|p| (p.id.as_str(), p)).collect();
    let lost =
        placed.iter().filter(|id| by_id.get(id.as_str()).is_none_or(|p| p.health == Health::Lost)).cloned().collect();
    let leaving = placed
        .iter()
        .filter(|id| by_id.get(id.as_str()).is_some_and(|p| p.health == Health::Draining))
        .cloned()
        .collect();
    (lost, leaving)
}

/// Silence after which a job asks its PNodes what is going on: far longer than a step normally
/// takes (`step_interval`, smoothed seconds), and never longer than the step deadline.
pub fn idle_limit(step_interval: Option<f64>, step_deadline: Duration) -> Duration {
    let secs = step_interval.unwrap_or(0.0) * 20.0;
    let typical = if secs.is_finite() && secs > 0.0 { Duration::from_secs_f64(secs.min(1e9)) } else { Duration::ZERO };
    typical.max(MIN_IDLE).min(step_deadline)
}

/// What a probe's answers mean.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeVerdict {
    /// Some VNode is busy and the step deadline has not passed: slow is not failed.
    Wait,
    /// Recover without `bad` (empty: every PNode answers and is idle, so a message was lost
    /// and the job rolls back on the same PNodes).
    Recover {
        /// PNodes that failed the placement.
        bad: Vec<String>,
        /// Of those, the ones that did not answer at all (to be declared lost).
        unreachable: Vec<String>,
        /// Why, for people.
        reason: String,
    },
}

/// Judges a probe's answers, (pnode, busy VNodes or the error), when the silence is `overdue`
/// (past the step deadline) or not. A PNode that does not answer has failed; one whose VNode
/// stays busy past the step deadline has too. If everything answers and is idle, a message was
/// lost (a broken connection takes what it buffered with it).
pub fn probe_verdict(answers: &[(String, Result<Vec<u32>, String>)], overdue: bool) -> ProbeVerdict {
    let mut bad = Vec::new();
    let mut unreachable = Vec::new();
    let mut why = Vec::new();
    let mut busy_within_deadline = false;
    for (id, a) in answers {
        match a {
            Err(e) => {
                why.push(format!("{id} does not answer ({e})"));
                unreachable.push(id.clone());
                bad.push(id.clone());
            }
            Ok(busy) if !busy.is_empty() && overdue => {
                why.push(format!("{id} is stuck in vnode(s) {busy:?}"));
                bad.push(id.clone());
            }
            Ok(busy) if !busy.is_empty() => busy_within_deadline = true,
            Ok(_) => {}
        }
    }
    if bad.is_empty() && busy_within_deadline {
        return ProbeVerdict::Wait;
    }
    let reason = if why.is_empty() { "a message was lost (every pnode answers)".to_string() } else { why.join("; ") };
    ProbeVerdict::Recover { bad, unreachable, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idle_limit_follows_the_step_time_within_bounds() {
        let deadline = Duration::from_secs(30);
        assert_eq!(idle_limit(None, deadline), MIN_IDLE);
        assert_eq!(idle_limit(Some(0.5), deadline), Duration::from_secs(10));
        assert_eq!(idle_limit(Some(100.0), deadline), deadline);
        assert_eq!(idle_limit(Some(f64::NAN), deadline), MIN_IDLE);
    }

    #[test]
    fn probe_verdicts() {
        let a = |id: &str, r: Result<Vec<u32>, String>| (id.to_string(), r);
        assert_eq!(probe_verdict(&[a("p1", Ok(vec![])), a("p2", Ok(vec![3]))], false), ProbeVerdict::Wait);
        match probe_verdict(&[a("p1", Ok(vec![])), a("p2", Ok(vec![3]))], true) {
            ProbeVerdict::Recover { bad, unreachable, .. } => {
                assert_eq!(bad, vec!["p2".to_string()]);
                assert!(unreachable.is_empty());
            }
            v => panic!("{v:?}"),
        }
        match probe_verdict(&[a("p1", Err("refused".into())), a("p2", Ok(vec![3]))], false) {
            ProbeVerdict::Recover { bad, unreachable, .. } => {
                assert_eq!(bad, vec!["p1".to_string()]);
                assert_eq!(unreachable, vec!["p1".to_string()]);
            }
            v => panic!("{v:?}"),
        }
        match probe_verdict(&[a("p1", Ok(vec![])), a("p2", Ok(vec![]))], false) {
            ProbeVerdict::Recover { bad, reason, .. } => {
                assert!(bad.is_empty());
                assert!(reason.contains("message was lost"));
            }
            v => panic!("{v:?}"),
        }
    }
}

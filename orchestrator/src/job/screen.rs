//! The cheap checks at the orchestrator, and what follows any failed check: the result is
//! refused, the PNode that produced it gets an invalid result in its reputation (which may
//! quarantine it), the verification record names both, and the job recovers without that PNode
//! from its latest snapshot, whose state was built only from results that passed the same
//! checks. A result no PNode can be blamed for fails the job (`invalid_result`).

use super::core::JobCore;
use super::{Observation, Observed};
use crate::registry::PNodeView;
use dcnr_vnode::sanity;

/// What is wrong with a report's values, if anything (a rejection is handled apart).
pub fn report_problem(r: &Observation) -> Option<String> {
    match &r.body {
        Observed::Loss { loss, correct, count, .. } => match sanity::check_scalar(*loss) {
            Err(e) => Some(format!("loss of micro-batch {}: {e}", r.mb)),
            Ok(()) if correct > count => Some(format!("{correct} correct of {count} samples")),
            Ok(()) => None,
        },
        Observed::Done { output_sha256, round_sha256, .. } => {
            let sha = |h: &str| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit());
            if !sha(output_sha256) {
                Some(format!("output hash of micro-batch {} is not a SHA-256", r.mb))
            } else if round_sha256.as_deref().is_some_and(|h| !sha(h)) {
                Some(format!("round hash of micro-batch {} is not a SHA-256", r.mb))
            } else {
                None
            }
        }
        // Checked by serving, the only one that asks for them.
        Observed::Failure(_) | Observed::Rejected { .. } | Observed::Predictions(_) => None,
    }
}

/// What is wrong with the parameters `p` returned for `vnode`, if anything.
pub fn params_problem(p: &PNodeView, vnode: u32, params: &[Vec<f32>]) -> Option<String> {
    params.iter().enumerate().find_map(|(i, t)| {
        sanity::check_values(t, sanity::MAX_ABS).err().map(|e| {
            format!("pnode {} ({}) returned invalid parameters for vnode {vnode} (tensor {i}): {e}", p.id, p.name)
        })
    })
}

impl JobCore {
    /// Checks a report before it is used; false when it was refused (and dealt with here).
    pub(super) fn screen_report(&mut self, r: &Observation) -> bool {
        let producer = self.placement.get(&r.vnode).cloned();
        if let Observed::Rejected { from_vnode, reason } = &r.body {
            let sender = from_vnode.and_then(|v| self.placement.get(&v)).cloned();
            let on = producer.as_ref().map(|p| p.id.clone()).unwrap_or_default();
            let text = match &sender {
                Some(p) => format!("pnode {} ({}) sent an invalid result ({on} refused it): {reason}", p.id, p.name),
                None => format!("pnode {on} refused the job's own data: {reason}"),
            };
            self.invalid_result(sender, *from_vnode, Some(r.mb), text);
            return false;
        }
        if matches!(r.body, Observed::Loss { .. } | Observed::Done { .. }) {
            self.verification.results_checked += 1;
        }
        let Some(why) = report_problem(r) else { return true };
        let text = match &producer {
            Some(p) => format!("pnode {} ({}) reported an invalid result for vnode {}: {why}", p.id, p.name, r.vnode),
            None => format!("a report for vnode {} that is not placed: {why}", r.vnode),
        };
        self.invalid_result(producer, Some(r.vnode), Some(r.mb), text);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dcnr_vnode::Phase;

    fn obs(body: Observed) -> Observation {
        Observation { job_id: "j".into(), vnode: 1, mb: 7, pnode: "p".into(), generation: 1, body }
    }

    #[test]
    fn bad_losses_and_hashes_are_refused() {
        let nan = obs(Observed::Loss { phase: Phase::Train, loss: f32::NAN, correct: 1, count: 2 });
        assert!(report_problem(&nan).is_some());
        let too_many = obs(Observed::Loss { phase: Phase::Eval, loss: 0.5, correct: 3, count: 2 });
        assert_eq!(report_problem(&too_many).as_deref(), Some("3 correct of 2 samples"));
        let done = |h: &str| {
            obs(Observed::Done {
                compute_us: 1,
                cpu_us: 1,
                bytes_in: 1,
                bytes_out: 1,
                output_sha256: h.into(),
                round_sha256: None,
                inputs: Vec::new(),
            })
        };
        assert!(report_problem(&done("xyz")).is_some());
        assert!(report_problem(&done(&"a".repeat(64))).is_none());
        assert!(
            report_problem(&obs(Observed::Loss { phase: Phase::Train, loss: 0.3, correct: 1, count: 2 })).is_none()
        );
    }
}

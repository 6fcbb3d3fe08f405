//! The cheap checks at the orchestrator, and what follows any failed check: the result is
//! refused, the PNode that produced it gets an invalid result in its reputation (which may
//! quarantine it), the verification report records both, and the job recovers without that
//! PNode from its latest snapshot, whose state was built only from results that passed the same
//! checks. A result no PNode can be blamed for fails the job (`invalid_result`).

use super::{JobActor, Report, ReportBody, Stage};
use crate::registry::PNodeView;
use crate::verify::InvalidResult;
use actix::prelude::*;
use dcnr_vnode::sanity;

impl JobActor {
    /// Checks a report before it is used; false when it was refused (and dealt with here).
    pub(super) fn screen_report(&mut self, ctx: &mut Context<Self>, r: &Report) -> bool {
        let producer = self.placement.get(&r.vnode).cloned();
        let refused = match &r.body {
            ReportBody::Rejected { from_vnode, reason } => {
                let sender = from_vnode.and_then(|v| self.placement.get(&v)).cloned();
                let on = self.placement.get(&r.vnode).map(|p| p.id.clone()).unwrap_or_default();
                let text = match &sender {
                    Some(p) => {
                        format!("pnode {} ({}) sent an invalid result ({on} refused it): {reason}", p.id, p.name)
                    }
                    None => format!("pnode {on} refused the job's own data: {reason}"),
                };
                self.invalid_result(ctx, sender, *from_vnode, Some(r.mb), text);
                return false;
            }
            ReportBody::Loss { loss, correct, count, .. } => {
                self.verification.results_checked += 1;
                match sanity::check_scalar(*loss) {
                    Err(e) => Some(format!("loss of micro-batch {}: {e}", r.mb)),
                    Ok(()) if correct > count => Some(format!("{correct} correct of {count} samples")),
                    Ok(()) => None,
                }
            }
            ReportBody::Done { output_sha256, .. } => {
                self.verification.results_checked += 1;
                let ok = output_sha256.len() == 64 && output_sha256.bytes().all(|b| b.is_ascii_hexdigit());
                (!ok).then(|| format!("output hash of micro-batch {} is not a SHA-256", r.mb))
            }
            ReportBody::Failure(_) => None,
        };
        let Some(why) = refused else { return true };
        let text = match &producer {
            Some(p) => format!("pnode {} ({}) reported an invalid result for vnode {}: {why}", p.id, p.name, r.vnode),
            None => format!("a report for vnode {} that is not placed: {why}", r.vnode),
        };
        self.invalid_result(ctx, producer, Some(r.vnode), Some(r.mb), text);
        false
    }

    /// Checks the collected parameters (finite, sane magnitudes) before they are summarised.
    pub(super) fn accept_params(&mut self, ctx: &mut Context<Self>, params: Vec<Vec<Vec<f32>>>) {
        // `collect` fetches in placement order, one entry per placed VNode.
        let placed: Vec<(u32, PNodeView)> = self.placement.iter().map(|(v, p)| (*v, p.clone())).collect();
        for ((vnode, p), ps) in placed.into_iter().zip(&params) {
            self.verification.results_checked += 1;
            for (i, t) in ps.iter().enumerate() {
                if let Err(e) = sanity::check_values(t, sanity::MAX_ABS) {
                    let text = format!(
                        "pnode {} ({}) returned invalid parameters for vnode {vnode} (tensor {i}): {e}",
                        p.id, p.name
                    );
                    return self.invalid_result(ctx, Some(p), Some(vnode), None, text);
                }
            }
        }
        self.finish(ctx, Some(params))
    }

    /// Refuses a result: downscores its producer, records it, and goes on from the latest
    /// snapshot without that PNode (every result before the snapshot passed the same checks).
    /// Without a PNode to blame, the job fails.
    fn invalid_result(
        &mut self,
        ctx: &mut Context<Self>,
        pnode: Option<PNodeView>,
        vnode: Option<u32>,
        step: Option<u64>,
        text: String,
    ) {
        if self.stage == Stage::Ended || self.error.is_some() {
            return;
        }
        let who = pnode.as_ref().map_or_else(|| "orchestrator".to_string(), |p| p.id.clone());
        self.verification.invalid_results.push(InvalidResult { pnode: who, vnode, step, reason: text.clone() });
        let Some(p) = pnode else { return self.fail(ctx, "invalid_result", text) };
        self.strike(ctx, p.id.clone(), text.clone());
        // It may have cheated undetected in unchecked segments before: go back past them.
        let bad = vec![p.id.clone()];
        let to = self.replication.rollback_for(&bad, None);
        self.roll_back(ctx, to, format!("invalid result: {text}"), bad);
    }
}

//! What a job leaves behind: where each VNode ran and what it computed (`executions.json`), the
//! curves (`metrics.json`), and the summary and artifact set of the final record. Pure data and
//! the functions that assemble it.

use crate::summary::Recovery;
use serde::Serialize;
use std::collections::BTreeMap;

/// What one VNode did, for `executions.json`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Execution {
    /// VNode id.
    pub vnode: u32,
    /// Node name.
    pub name: String,
    /// PNode it runs on now.
    pub pnode: String,
    /// That PNode's endpoint.
    pub endpoint: String,
    /// That PNode's determinism class.
    pub determinism_class: String,
    /// Training steps it completed that count.
    pub steps: u64,
    /// Wall seconds of its compute.
    pub compute_s: f64,
    /// CPU seconds of its compute.
    pub cpu_s: f64,
    /// Tensor bytes in.
    pub bytes_in: u64,
    /// Tensor bytes out.
    pub bytes_out: u64,
    /// Output hash of every training step, in step order.
    pub output_sha256: Vec<String>,
    /// (first step, pnode) of every placement it had: where each step ran.
    pub placements: Vec<(u64, String)>,
}

/// Curves for `metrics.json`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Metrics {
    /// (step, loss) of every training step.
    pub train_loss: Vec<(u64, f32)>,
    /// Test-set evaluations.
    pub evaluations: Vec<EvalPoint>,
    /// (seconds since start, samples/s), sampled once a second.
    pub samples_per_s: Vec<(f64, f64)>,
}

/// One test-set evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct EvalPoint {
    /// Epochs completed.
    pub epoch: u64,
    /// Steps completed.
    pub step: u64,
    /// Accuracy in [0, 1].
    pub accuracy: f64,
    /// Mean loss.
    pub loss: f64,
}

/// The artifact files of a record, by name.
pub type Files = Vec<(&'static str, Vec<u8>)>;

impl Metrics {
    /// Forgets what a rollback to `step` undoes: losses of later steps and evaluations past
    /// `epochs`; answers the newest evaluation left.
    pub fn roll_back(&mut self, step: u64, epochs: u64) -> Option<(f64, f64)> {
        self.train_loss.retain(|(mb, _)| *mb < step);
        self.evaluations.retain(|e| e.epoch <= epochs);
        self.evaluations.last().map(|e| (e.accuracy, e.loss))
    }
}

/// Forgets what a rollback undoes in every execution: output hashes of steps past `keep`
/// (counted from the run's first step).
pub fn truncate_executions(executions: &mut BTreeMap<u32, Execution>, keep: usize) {
    for e in executions.values_mut() {
        e.output_sha256.truncate(keep);
        e.steps = e.steps.min(keep as u64);
    }
}

/// A new recovery entry.
pub fn recovery(generation: u32, reason: String, pnodes: Vec<String>, at_step: u64, resumed_step: u64) -> Recovery {
    Recovery {
        generation,
        reason,
        pnodes,
        at_step,
        resumed_step,
        recomputed_steps: at_step.saturating_sub(resumed_step),
        replace_s: 0.0,
        first_step_s: None,
    }
}

/// Pretty JSON of `v` (an empty file if it cannot be encoded, which plain data never is).
pub fn json(v: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec_pretty(&v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rollback_forgets_later_losses_evaluations_and_hashes() {
        let mut m = Metrics { train_loss: (0..10).map(|s| (s, 1.0)).collect(), ..Metrics::default() };
        m.evaluations.push(EvalPoint { epoch: 1, step: 4, accuracy: 0.5, loss: 1.0 });
        m.evaluations.push(EvalPoint { epoch: 2, step: 8, accuracy: 0.7, loss: 0.5 });
        assert_eq!(m.roll_back(6, 1), Some((0.5, 1.0)));
        assert_eq!(m.train_loss.len(), 6);
        let mut ex = BTreeMap::new();
        ex.insert(0, Execution { steps: 10, output_sha256: vec!["a".into(); 10], ..Execution::default() });
        truncate_executions(&mut ex, 6);
        assert_eq!(ex[&0].output_sha256.len(), 6);
        assert_eq!(ex[&0].steps, 6);
    }

    #[test]
    fn a_recovery_counts_the_steps_it_recomputes() {
        let r = recovery(3, "lost".into(), vec!["p".into()], 40, 25);
        assert_eq!(r.recomputed_steps, 15);
        assert_eq!(recovery(3, "x".into(), vec![], 25, 25).recomputed_steps, 0);
    }
}

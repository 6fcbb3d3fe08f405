//! Data-parallel pipelines: when the copies of a VNode average (rounds), and the outer step each
//! copy applies to the same averaged change, so that every copy holds the same bits afterwards.
//!
//! A job with `pipelines = R` runs R copies of its graph. Copy `p` trains on shard `p` of every
//! epoch's sample order ([`crate::batches::BatchPlan::sharded`]). A round closes after every
//! `sync_every` steps of an epoch, at an epoch's end and at the last step: each copy of a VNode
//! with parameters takes its change since the last round (its *anchor*), encodes it in the
//! job's `[training.outer] wire` format, sends it to every other copy, and applies
//! [`outer_step`] to the changes of all copies summed in pipeline order. Every copy computes
//! the same floats in the same order, so they agree bit for bit, whatever the timing.

use crate::batches::BatchPlan;
use crate::compact;
use crate::host::HostTensor;
use dcnr_model::{OuterKind, OuterSpec, ValidGraph};

/// When a job's pipelines average, and how many steps each one takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundPlan {
    pipelines: u32,
    every: u64,
    steps_per_epoch: u64,
    steps: u64,
}

impl RoundPlan {
    /// The plan of `graph` over a training set of `train_samples`: each pipeline's steps per
    /// epoch ([`BatchPlan::sharded`]) and in all (`steps` divided among the pipelines, or whole
    /// epochs).
    pub fn new(graph: &ValidGraph, train_samples: usize) -> RoundPlan {
        let t = &graph.spec.training;
        let pipelines = graph.pipelines();
        let steps_per_epoch = BatchPlan::new(train_samples, t.batch_size, 0).sharded(pipelines).steps_per_epoch();
        let steps = match t.steps {
            Some(s) => (s / u64::from(pipelines)).max(1),
            None => steps_per_epoch.saturating_mul(u64::from(t.epochs)),
        };
        RoundPlan { pipelines, every: t.sync_every.max(1), steps_per_epoch, steps }
    }

    /// Data-parallel pipelines.
    pub fn pipelines(&self) -> u32 {
        self.pipelines
    }

    /// Steps each pipeline takes in all.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Steps each pipeline takes per epoch.
    pub fn steps_per_epoch(&self) -> u64 {
        self.steps_per_epoch
    }

    /// Whether the update of step `mb` closes a round (never with one pipeline).
    pub fn closes_round(&self, mb: u64) -> bool {
        let within = mb % self.steps_per_epoch.max(1);
        self.pipelines > 1
            && ((within + 1).is_multiple_of(self.every)
                || within + 1 == self.steps_per_epoch
                || mb.saturating_add(1) == self.steps)
    }

    /// The first step at or after `step` whose update closes a round (none past the last step,
    /// or with one pipeline).
    pub fn next_round_at(&self, step: u64) -> Option<u64> {
        if self.pipelines <= 1 || step >= self.steps {
            return None;
        }
        let spe = self.steps_per_epoch.max(1);
        let within = step % spe;
        let epoch_start = step - within;
        let by_every = epoch_start.saturating_add((within / self.every + 1).saturating_mul(self.every) - 1);
        let epoch_end = epoch_start.saturating_add(spe - 1);
        Some(by_every.min(epoch_end).min(self.steps - 1))
    }

    /// Rounds closed once `completed` steps are done.
    pub fn rounds_through(&self, completed: u64) -> u64 {
        if self.pipelines <= 1 {
            return 0;
        }
        let spe = self.steps_per_epoch.max(1);
        let per_epoch = spe.div_ceil(self.every);
        let (full, rest) = (completed / spe, completed % spe);
        let last = u64::from(completed >= self.steps && rest > 0 && !rest.is_multiple_of(self.every));
        full.saturating_mul(per_epoch).saturating_add(rest / self.every).saturating_add(last)
    }
}

/// What a VNode needs to average with its copies: when, and with which outer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Averaging {
    /// When rounds close.
    pub plan: RoundPlan,
    /// The outer step and the wire format of changes.
    pub outer: OuterSpec,
}

impl Averaging {
    /// The averaging of `graph`'s pipelines over a training set of `train_samples`; `None` with
    /// one pipeline.
    pub fn of(graph: &ValidGraph, train_samples: usize) -> Option<Averaging> {
        (graph.pipelines() > 1)
            .then(|| Averaging { plan: RoundPlan::new(graph, train_samples), outer: graph.spec.training.outer })
    }
}

/// `current - anchor`, element by element: a copy's change since the last round.
pub fn change(current: &[f32], anchor: &[f32]) -> Vec<f32> {
    current.iter().zip(anchor).map(|(c, a)| c - a).collect()
}

/// A change as the other copies will see it: packed in `wire` (what travels) and, for the
/// sender's own use, the values that packing stands for.
pub fn encode_change(change: Vec<f32>, shape: Vec<usize>, outer: &OuterSpec) -> (HostTensor, HostTensor) {
    let t = HostTensor::f32(shape, change);
    let packed = compact::pack(&t, outer.wire);
    let own = compact::unpack(packed.clone());
    (packed, own)
}

/// The outer step of one parameter tensor: `changes` are the copies' changes in pipeline
/// order; `anchor` becomes the parameters every copy continues from, `momentum` the outer
/// momentum (empty until the first nesterov round).
pub fn outer_step(outer: &OuterSpec, anchor: &mut [f32], momentum: &mut Vec<f32>, changes: &[&[f32]]) {
    let Some((first, rest)) = changes.split_first() else { return };
    let mut avg = first.to_vec();
    for c in rest {
        for (a, x) in avg.iter_mut().zip(c.iter()) {
            *a += *x;
        }
    }
    let r = changes.len() as f32;
    for a in &mut avg {
        *a /= r;
    }
    match outer.kind {
        OuterKind::Average => {
            for (p, d) in anchor.iter_mut().zip(&avg) {
                *p += *d;
            }
        }
        OuterKind::Nesterov => {
            if momentum.len() != anchor.len() {
                *momentum = vec![0.0; anchor.len()];
            }
            let (lr, mu) = (outer.lr, outer.momentum);
            for ((p, m), d) in anchor.iter_mut().zip(momentum.iter_mut()).zip(&avg) {
                // The outer gradient is anchor - average = -d.
                let g = -*d;
                *m = mu * *m + g;
                *p -= lr * (g + mu * *m);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dcnr_model::WireFormat;

    fn spec(kind: OuterKind, lr: f32, momentum: f32) -> OuterSpec {
        OuterSpec { kind, lr, momentum, wire: WireFormat::F32 }
    }

    #[test]
    fn averaging_takes_the_mean_of_the_copies() {
        let mut anchor = vec![1.0, 2.0];
        let mut m = Vec::new();
        outer_step(&spec(OuterKind::Average, 1.0, 0.0), &mut anchor, &mut m, &[&[0.5, -1.0], &[1.5, 1.0]]);
        assert_eq!(anchor, vec![2.0, 2.0]);
        assert!(m.is_empty());
    }

    #[test]
    fn nesterov_with_unit_rate_and_no_momentum_is_averaging() {
        let (mut a, mut b) = (vec![0.25, -3.0, 7.0], vec![0.25, -3.0, 7.0]);
        let changes: [&[f32]; 3] = [&[0.1, 0.2, 0.3], &[-0.4, 0.5, 0.0], &[0.3, -0.1, 0.9]];
        outer_step(&spec(OuterKind::Average, 0.7, 0.9), &mut a, &mut Vec::new(), &changes);
        outer_step(&spec(OuterKind::Nesterov, 1.0, 0.0), &mut b, &mut Vec::new(), &changes);
        assert_eq!(a, b);
    }

    #[test]
    fn nesterov_momentum_carries_over_rounds() {
        let s = spec(OuterKind::Nesterov, 0.5, 0.9);
        let (mut p, mut m) = (vec![0.0f32], Vec::new());
        outer_step(&s, &mut p, &mut m, &[&[1.0], &[1.0]]);
        // g = -1, m = -1, p = 0 - 0.5 * (-1 + 0.9 * -1) = 0.95
        assert!((p[0] - 0.95).abs() < 1e-6, "{p:?}");
        assert_eq!(m, vec![-1.0]);
        outer_step(&s, &mut p, &mut m, &[&[0.0], &[0.0]]);
        // g = 0, m = -0.9, p = 0.95 - 0.5 * (0 + 0.9 * -0.9) = 1.355
        assert!((p[0] - 1.355).abs() < 1e-6, "{p:?}");
    }

    #[test]
    fn rounds_close_every_h_steps_at_epoch_ends_and_at_the_last_step() {
        let plan = RoundPlan { pipelines: 2, every: 4, steps_per_epoch: 10, steps: 25 };
        let closing: Vec<u64> = (0..25).filter(|&m| plan.closes_round(m)).collect();
        assert_eq!(closing, vec![3, 7, 9, 13, 17, 19, 23, 24]);
        for c in 0..=25 {
            assert_eq!(plan.rounds_through(c), closing.iter().filter(|&&m| m < c).count() as u64, "after {c}");
            assert_eq!(plan.next_round_at(c), closing.iter().copied().find(|&m| m >= c), "from {c}");
        }
        let single = RoundPlan { pipelines: 1, ..plan };
        assert!((0..25).all(|m| !single.closes_round(m)));
    }
}

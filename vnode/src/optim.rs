//! Optimizers applied by a VNode to its own parameters with its own state: one fused pass per
//! parameter tensor, in place (`kernels::sgd`, `kernels::adam`).

use crate::kernels::{self, AdamStep, Matrix};
use dcnr_model::{OptimizerSpec, Recipe};
use std::sync::Arc;

/// One moment estimate of a parameter tensor, absent until the first update.
pub type Moment = Option<Vec<f32>>;

/// Optimizer state of one VNode: one slot per parameter tensor.
#[derive(Debug, Clone)]
pub struct Optimizer {
    spec: OptimizerSpec,
    recipe: Recipe,
    step: u64,
    first: Vec<Moment>,
    second: Vec<Moment>,
}

/// An update whose gradients do not match the parameters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{params} parameter tensors, {grads} gradients, {slots} optimizer slots: tensor {index} does not fit")]
pub struct UpdateError {
    params: usize,
    grads: usize,
    slots: usize,
    index: usize,
}

impl Optimizer {
    /// Fresh state for `params` parameter tensors.
    pub fn new(spec: OptimizerSpec, recipe: Recipe, params: usize) -> Optimizer {
        Optimizer { spec, recipe, step: 0, first: vec![None; params], second: vec![None; params] }
    }

    /// Updates applied so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The moment estimates (first, second) per parameter, for checkpoints; absent before the
    /// first update (and the second always for SGD).
    pub fn moments(&self) -> (&[Moment], &[Moment]) {
        (&self.first, &self.second)
    }

    /// State restored from a checkpoint.
    pub fn restored(
        spec: OptimizerSpec,
        recipe: Recipe,
        step: u64,
        first: Vec<Moment>,
        second: Vec<Moment>,
    ) -> Optimizer {
        Optimizer { spec, recipe, step, first, second }
    }

    /// Applies one update with `grads` (same order and shapes) to `params`, in place where no
    /// other parameter version shares a tensor (copy on write otherwise).
    pub fn update(&mut self, params: &mut [Arc<Matrix>], mut grads: Vec<Matrix>) -> Result<(), UpdateError> {
        let (n, slots) = (params.len(), self.first.len().min(self.second.len()));
        let misfit = |index| UpdateError { params: n, grads: grads.len(), slots, index };
        if grads.len() != n || slots != n {
            return Err(misfit(0));
        }
        let fits = |i: usize, len: usize| {
            grads[i].data().len() == len
                && self.first[i].as_ref().is_none_or(|m| m.len() == len)
                && self.second[i].as_ref().is_none_or(|v| v.len() == len)
        };
        if let Some(i) = params.iter().enumerate().position(|(i, p)| !fits(i, p.data().len())) {
            return Err(misfit(i));
        }
        if let Some(max) = self.recipe.clip_grad_norm {
            clip(&mut grads, max);
        }
        let factor = self.recipe.schedule.factor(self.step);
        self.step += 1;
        let t = i32::try_from(self.step).unwrap_or(i32::MAX);
        for (i, (p, g)) in params.iter_mut().zip(&grads).enumerate() {
            let p = Arc::make_mut(p).data_mut();
            let len = p.len();
            match self.spec {
                OptimizerSpec::Sgd { lr, momentum: 0.0 } => kernels::sgd(p, &mut [], g.data(), lr * factor, 0.0),
                OptimizerSpec::Sgd { lr, momentum } => {
                    let v = self.first[i].get_or_insert_with(|| vec![0.0; len]);
                    kernels::sgd(p, v, g.data(), lr * factor, momentum);
                }
                OptimizerSpec::Adam { lr, beta1, beta2, eps } => {
                    let step = AdamStep::new(lr * factor, beta1, beta2, eps, t);
                    let m = self.first[i].get_or_insert_with(|| vec![0.0; len]);
                    let v = self.second[i].get_or_insert_with(|| vec![0.0; len]);
                    kernels::adam(p, m, v, g.data(), step);
                }
                OptimizerSpec::Adamw { lr, beta1, beta2, eps, weight_decay } => {
                    // Decoupled decay: shrink the parameters themselves, not the gradient.
                    let step = AdamStep {
                        decay: 1.0 - lr * factor * weight_decay,
                        ..AdamStep::new(lr * factor, beta1, beta2, eps, t)
                    };
                    let m = self.first[i].get_or_insert_with(|| vec![0.0; len]);
                    let v = self.second[i].get_or_insert_with(|| vec![0.0; len]);
                    kernels::adam(p, m, v, g.data(), step);
                }
            }
        }
        Ok(())
    }
}

/// `grads` scaled down to L2 norm `max` over all of them when their norm exceeds it. The norm
/// is summed in f64, in order, so it is the same with any thread count.
fn clip(grads: &mut [Matrix], max: f32) {
    let sum: f64 = grads.iter().flat_map(|g| g.data()).map(|x| f64::from(*x) * f64::from(*x)).sum();
    let norm = sum.sqrt();
    if norm.is_nan() || norm <= f64::from(max) {
        return;
    }
    let scale = (f64::from(max) / norm) as f32;
    grads.iter_mut().flat_map(|g| g.data_mut()).for_each(|x| *x *= scale);
}

#[cfg(test)]
mod tests {
    use super::*;
    use dcnr_model::Schedule;

    fn t(v: &[f32]) -> Arc<Matrix> {
        Arc::new(Matrix::new(1, v.len(), v.to_vec()).unwrap())
    }

    fn g(v: &[f32]) -> Matrix {
        Matrix::new(1, v.len(), v.to_vec()).unwrap()
    }

    fn values(t: &Arc<Matrix>) -> Vec<f32> {
        t.data().to_vec()
    }

    /// One update of `params` by `grads`, the parameters after it.
    fn step(o: &mut Optimizer, params: &[&[f32]], grads: &[&[f32]]) -> Vec<Arc<Matrix>> {
        let mut ps: Vec<Arc<Matrix>> = params.iter().map(|p| t(p)).collect();
        o.update(&mut ps, grads.iter().map(|x| g(x)).collect()).unwrap();
        ps
    }

    #[test]
    fn schedules_follow_the_step_number() {
        let cos = Schedule::Cosine { warmup_steps: 10, decay_steps: 100, min_factor: 0.1 };
        assert_eq!(cos.factor(0), 0.1);
        assert_eq!(cos.factor(9), 1.0);
        assert_eq!(cos.factor(10), 1.0);
        assert!((cos.factor(60) - 0.55).abs() < 1e-6, "half way: {}", cos.factor(60));
        assert_eq!(cos.factor(110), 0.1);
        assert_eq!(cos.factor(10_000), 0.1);
        let step = Schedule::Step { warmup_steps: 0, every: 5, gamma: 0.5 };
        assert_eq!([step.factor(0), step.factor(4), step.factor(5), step.factor(12)], [1.0, 1.0, 0.5, 0.25]);
        assert_eq!(Schedule::Warmup { warmup_steps: 4 }.factor(1), 0.5);
        assert_eq!(Schedule::Constant.factor(123), 1.0);
    }

    #[test]
    fn adamw_decays_the_parameters_and_equals_adam_without_decay() {
        let adam = OptimizerSpec::Adam { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8 };
        let adamw = |wd| OptimizerSpec::Adamw { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: wd };
        let run = |spec| {
            let mut o = Optimizer::new(spec, Recipe::default(), 1);
            values(&step(&mut o, &[&[1.0, -2.0]], &[&[0.0, 0.0]])[0])
        };
        assert_eq!(run(adamw(0.0)), run(adam), "no decay: Adam's bits");
        // A zero gradient moves nothing but the decay: p * (1 - lr * wd).
        assert_eq!(run(adamw(0.5)), vec![1.0 * (1.0 - 0.05), -2.0 * (1.0 - 0.05)]);
    }

    #[test]
    fn gradients_are_clipped_to_the_norm_and_the_schedule_scales_the_rate() {
        let sgd = OptimizerSpec::Sgd { lr: 1.0, momentum: 0.0 };
        let recipe = Recipe { clip_grad_norm: Some(1.0), ..Recipe::default() };
        let mut o = Optimizer::new(sgd, recipe, 2);
        // Norm 5 over both tensors: scaled by 1/5.
        let out = step(&mut o, &[&[0.0], &[0.0]], &[&[3.0], &[4.0]]);
        assert_eq!((values(&out[0]), values(&out[1])), (vec![-0.6], vec![-0.8]));
        // Below the norm: untouched.
        let small = step(&mut Optimizer::new(sgd, recipe, 1), &[&[0.0]], &[&[0.5]]);
        assert_eq!(values(&small[0]), vec![-0.5]);
        let warm = Recipe { schedule: Schedule::Warmup { warmup_steps: 4 }, ..Recipe::default() };
        let mut o = Optimizer::new(sgd, warm, 1);
        assert_eq!(values(&step(&mut o, &[&[0.0]], &[&[1.0]])[0]), vec![-0.25]);
    }
}

//! Optimizers applied by a VNode to its own parameters with its own state.

use burn::tensor::Tensor;
use dcnr_model::{OptimizerSpec, Recipe};

/// Optimizer state of one VNode: one slot per parameter tensor.
#[derive(Debug, Clone)]
pub struct Optimizer {
    spec: OptimizerSpec,
    recipe: Recipe,
    step: u64,
    first: Vec<Option<Tensor<2>>>,
    second: Vec<Option<Tensor<2>>>,
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

    /// The moment estimates (first, second) per parameter, for checkpoints.
    pub fn moments(&self) -> (&[Option<Tensor<2>>], &[Option<Tensor<2>>]) {
        (&self.first, &self.second)
    }

    /// State restored from a checkpoint.
    pub fn restored(
        spec: OptimizerSpec,
        recipe: Recipe,
        step: u64,
        first: Vec<Option<Tensor<2>>>,
        second: Vec<Option<Tensor<2>>>,
    ) -> Optimizer {
        Optimizer { spec, recipe, step, first, second }
    }

    /// Returns the parameters after one update with `grads` (same order and shapes).
    pub fn update(&mut self, params: &[Tensor<2>], grads: Vec<Tensor<2>>) -> Vec<Tensor<2>> {
        let factor = self.recipe.schedule.factor(self.step);
        let grads = match self.recipe.clip_grad_norm {
            Some(max) => clip(grads, max),
            None => grads,
        };
        self.step += 1;
        let t = self.step as i32;
        params
            .iter()
            .zip(grads)
            .enumerate()
            .map(|(i, (p, g))| match self.spec {
                OptimizerSpec::Sgd { lr, momentum } => {
                    let lr = lr * factor;
                    if momentum == 0.0 {
                        return p.clone() - g.mul_scalar(lr);
                    }
                    let v = match self.first[i].take() {
                        Some(v) => v.mul_scalar(momentum) + g,
                        None => g,
                    };
                    self.first[i] = Some(v.clone());
                    p.clone() - v.mul_scalar(lr)
                }
                OptimizerSpec::Adam { lr, beta1, beta2, eps } | OptimizerSpec::Adamw { lr, beta1, beta2, eps, .. } => {
                    let lr = lr * factor;
                    let m = match self.first[i].take() {
                        Some(m) => m.mul_scalar(beta1) + g.clone().mul_scalar(1.0 - beta1),
                        None => g.clone().mul_scalar(1.0 - beta1),
                    };
                    let g2 = g.clone() * g;
                    let v = match self.second[i].take() {
                        Some(v) => v.mul_scalar(beta2) + g2.mul_scalar(1.0 - beta2),
                        None => g2.mul_scalar(1.0 - beta2),
                    };
                    self.first[i] = Some(m.clone());
                    self.second[i] = Some(v.clone());
                    let m_hat = m.div_scalar(1.0 - beta1.powi(t));
                    let v_hat = v.div_scalar(1.0 - beta2.powi(t));
                    let step = m_hat.mul_scalar(lr) / (v_hat.sqrt().add_scalar(eps));
                    match self.spec {
                        // Decoupled decay: shrink the parameters themselves, not the gradient.
                        OptimizerSpec::Adamw { weight_decay, .. } if weight_decay > 0.0 => {
                            p.clone().mul_scalar(1.0 - lr * weight_decay) - step
                        }
                        _ => p.clone() - step,
                    }
                }
            })
            .collect()
    }
}

/// `grads` scaled down to L2 norm `max` over all of them when their norm exceeds it. The norm
/// is summed on the host in f64, in order, so it is the same with any thread count.
fn clip(grads: Vec<Tensor<2>>, max: f32) -> Vec<Tensor<2>> {
    let mut sum = 0f64;
    for g in &grads {
        if let Ok(v) = g.clone().into_data().try_to_vec::<f32>() {
            sum += v.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>();
        }
    }
    let norm = sum.sqrt();
    if norm.is_nan() || norm <= f64::from(max) {
        return grads;
    }
    let scale = (f64::from(max) / norm) as f32;
    grads.into_iter().map(|g| g.mul_scalar(scale)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;
    use dcnr_model::Schedule;

    fn t(v: &[f32]) -> Tensor<2> {
        Tensor::from_data(TensorData::new(v.to_vec(), [1, v.len()]), &crate::device())
    }

    fn values(t: &Tensor<2>) -> Vec<f32> {
        t.clone().into_data().try_to_vec::<f32>().unwrap()
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
            values(&o.update(&[t(&[1.0, -2.0])], vec![t(&[0.0, 0.0])])[0])
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
        let out = o.update(&[t(&[0.0]), t(&[0.0])], vec![t(&[3.0]), t(&[4.0])]);
        assert_eq!((values(&out[0]), values(&out[1])), (vec![-0.6], vec![-0.8]));
        // Below the norm: untouched.
        let small = o.update(&[t(&[0.0])], vec![t(&[0.5])]);
        assert_eq!(values(&small[0]), vec![-0.5]);
        let warm = Recipe { schedule: Schedule::Warmup { warmup_steps: 4 }, ..Recipe::default() };
        let mut o = Optimizer::new(sgd, warm, 1);
        assert_eq!(values(&o.update(&[t(&[0.0])], vec![t(&[1.0])])[0]), vec![-0.25]);
    }
}

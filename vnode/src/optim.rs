//! Optimizers applied by a VNode to its own parameters with its own state.

use burn::tensor::Tensor;
use dcnr_model::OptimizerSpec;

/// Optimizer state of one VNode: one slot per parameter tensor.
#[derive(Debug, Clone)]
pub struct Optimizer {
    spec: OptimizerSpec,
    step: u64,
    first: Vec<Option<Tensor<2>>>,
    second: Vec<Option<Tensor<2>>>,
}

impl Optimizer {
    /// Fresh state for `params` parameter tensors.
    pub fn new(spec: OptimizerSpec, params: usize) -> Optimizer {
        Optimizer { spec, step: 0, first: vec![None; params], second: vec![None; params] }
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
        step: u64,
        first: Vec<Option<Tensor<2>>>,
        second: Vec<Option<Tensor<2>>>,
    ) -> Optimizer {
        Optimizer { spec, step, first, second }
    }

    /// Returns the parameters after one update with `grads` (same order and shapes).
    pub fn update(&mut self, params: &[Tensor<2>], grads: Vec<Tensor<2>>) -> Vec<Tensor<2>> {
        self.step += 1;
        let t = self.step as i32;
        params
            .iter()
            .zip(grads)
            .enumerate()
            .map(|(i, (p, g))| match self.spec {
                OptimizerSpec::Sgd { lr, momentum } => {
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
                OptimizerSpec::Adam { lr, beta1, beta2, eps } => {
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
                    p.clone() - (m_hat.mul_scalar(lr) / (v_hat.sqrt().add_scalar(eps)))
                }
            })
            .collect()
    }
}

//! Helpers the gradient-check tests share.
#![allow(dead_code)]

use dcnr_model::OptimizerSpec;
use dcnr_model::graph::ValidNode;
use dcnr_vnode::{HostTensor, VNode, VNodeSpec};
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

/// A VNode for `node` under SGD with lr = 1 and no momentum: an update subtracts exactly the
/// gradient.
pub fn sgd_vnode(node: &ValidNode, root_seed: u64) -> VNode {
    VNode::new(VNodeSpec {
        node: node.clone(),
        optimizer: OptimizerSpec::Sgd { lr: 1.0, momentum: 0.0 },
        recipe: Default::default(),
        root_seed,
        in_flight: 1,
        averaging: None,
        compute: Default::default(),
    })
}

/// `n` uniform values in `lo..hi`.
pub fn random(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// A float tensor's values.
pub fn f32s(t: &HostTensor) -> Vec<f32> {
    t.as_f32().unwrap().to_vec()
}

/// Asserts `got` (analytic) matches `want` (numeric) within 1% relative error, with an absolute
/// floor of 0.2% of the largest numeric entry so near-zero entries do not demand exact equality.
pub fn assert_close(what: &str, got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f64, |m, w| m.max(w.abs())).max(1e-6);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(err <= 1e-2 * w.abs() + 2e-3 * scale, "{what}[{i}]: analytic {g} vs numeric {w} (scale {scale})");
    }
}

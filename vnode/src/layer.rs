//! The math of each node kind, shared by the VNodes and the single-process reference so both
//! run exactly the same kernels in the same order.

use crate::seed::{Purpose, stream, uniform};
use burn::tensor::{Tensor, TensorData, activation};
use dcnr_model::NodeKind;

/// Initial parameters of a node, drawn from its own ChaCha stream: for linear, weight
/// [inputs, outputs] then bias [1, outputs], both U(-1/sqrt(inputs), 1/sqrt(inputs)).
pub fn init_params(kind: NodeKind, root_seed: u64, vnode: u32) -> Vec<(Vec<usize>, Vec<f32>)> {
    match kind {
        NodeKind::Linear { inputs, outputs } => {
            let mut rng = stream(root_seed, Purpose::Init, vnode as u64);
            let bound = 1.0 / (inputs as f32).sqrt();
            let w = (0..inputs * outputs).map(|_| uniform(&mut rng, bound)).collect();
            let b = (0..outputs).map(|_| uniform(&mut rng, bound)).collect();
            vec![(vec![inputs, outputs], w), (vec![1, outputs], b)]
        }
        _ => Vec::new(),
    }
}

/// Loads host parameters onto a device.
pub fn params_to_device(params: &[(Vec<usize>, Vec<f32>)], device: &burn::tensor::Device) -> Vec<Tensor<2>> {
    params
        .iter()
        .map(|(shape, v)| Tensor::from_data(TensorData::new(v.clone(), [shape[0], shape[1]]), device))
        .collect()
}

/// Forward of a non-loss node on `[batch, width]` inputs.
pub fn forward(kind: NodeKind, params: &[Tensor<2>], inputs: &[Tensor<2>]) -> Tensor<2> {
    let x = inputs[0].clone();
    match kind {
        NodeKind::Linear { .. } => x.matmul(params[0].clone()) + params[1].clone(),
        NodeKind::Relu => activation::relu(x),
        NodeKind::Tanh => activation::tanh(x),
        // A loss has no activation output; `loss` computes it.
        NodeKind::SoftmaxCrossEntropy { .. } => x,
    }
}

/// Mean softmax cross-entropy of `logits` against a one-hot target.
pub fn loss(logits: Tensor<2>, one_hot: Tensor<2>) -> Tensor<1> {
    let batch = logits.dims()[0] as f32;
    let logp = activation::log_softmax(logits, 1);
    (logp * one_hot).sum().mul_scalar(-1.0 / batch)
}

/// One-hot rows of `labels` over `classes` classes as a host buffer.
pub fn one_hot(labels: &[i32], classes: usize) -> Vec<f32> {
    let mut v = vec![0.0f32; labels.len() * classes];
    for (i, &l) in labels.iter().enumerate() {
        if (0..classes as i32).contains(&l) {
            v[i * classes + l as usize] = 1.0;
        }
    }
    v
}

/// Number of rows whose arg-max logit equals the label (first maximum wins ties).
pub fn correct(logits: &[f32], labels: &[i32], classes: usize) -> u32 {
    logits
        .chunks_exact(classes)
        .zip(labels)
        .filter(|(row, l)| {
            let mut best = 0;
            for (j, v) in row.iter().enumerate() {
                if *v > row[best] {
                    best = j;
                }
            }
            best as i32 == **l
        })
        .count() as u32
}

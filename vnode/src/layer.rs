//! The math of each node kind, shared by the VNodes and the single-process reference so both
//! run exactly the same kernels in the same order.

use crate::seed::{Purpose, stream, stream_path, uniform};
use burn::tensor::module::{avg_pool2d, conv2d, max_pool2d};
use burn::tensor::ops::{AvgPoolOptions, ConvOptions, MaxPoolOptions};
use burn::tensor::{Tensor, TensorData, activation};
use dcnr_model::NodeKind;
use dcnr_model::graph::{AuxHead, ValidNode};
use rand_chacha::ChaCha20Rng;

/// Host parameters: (shape, row-major values) per tensor.
pub type HostParams = Vec<(Vec<usize>, Vec<f32>)>;

/// Weight [inputs, outputs] then bias [1, outputs], both U(-1/sqrt(inputs), 1/sqrt(inputs)),
/// drawn in that order from `rng`.
fn draw_linear(rng: &mut ChaCha20Rng, inputs: usize, outputs: usize) -> HostParams {
    draw_affine(rng, [inputs, outputs], outputs, inputs)
}

/// A weight of `shape` then a bias `[1, bias]`, both U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn
/// in that order from `rng` (PyTorch's default bound for linear and convolution layers).
fn draw_affine(rng: &mut ChaCha20Rng, shape: [usize; 2], bias: usize, fan_in: usize) -> HostParams {
    let bound = 1.0 / (fan_in as f32).sqrt();
    let w = (0..shape[0] * shape[1]).map(|_| uniform(rng, bound)).collect();
    let b = (0..bias).map(|_| uniform(rng, bound)).collect();
    vec![(shape.to_vec(), w), (vec![1, bias], b)]
}

/// Initial parameters of a node, drawn from its own ChaCha stream: for linear, weight
/// [inputs, outputs] then bias [1, outputs], both U(-1/sqrt(inputs), 1/sqrt(inputs)).
pub fn init_params(kind: NodeKind, root_seed: u64, vnode: u32) -> HostParams {
    match kind {
        NodeKind::Linear { inputs, outputs } => {
            draw_linear(&mut stream(root_seed, Purpose::Init, vnode as u64), inputs, outputs)
        }
        // Scale 1, shift 0: the identity on a normalised input, as is usual.
        // Filters [channels, c·k·k] (each row one filter, row-major [c, k, k]), as linear's.
        NodeKind::Conv2d { channels, kernel, input, .. } => {
            let fan_in = input[0] * kernel * kernel;
            draw_affine(&mut stream(root_seed, Purpose::Init, vnode as u64), [channels, fan_in], channels, fan_in)
        }
        NodeKind::LayerNorm { width } => vec![(vec![1, width], vec![1.0; width]), (vec![1, width], vec![0.0; width])],
        _ => Vec::new(),
    }
}

/// Initial parameters of an auxiliary head: its linear layers in order, each drawn like a
/// linear node's, all from the head's own stream (purpose `aux-init`, id = VNode id).
pub fn init_aux(head: &AuxHead, root_seed: u64, vnode: u32) -> HostParams {
    let mut rng = stream(root_seed, Purpose::AuxInit, vnode as u64);
    head.layers().into_iter().flat_map(|(i, o)| draw_linear(&mut rng, i, o)).collect()
}

/// Every parameter a VNode holds: the node's own, then its auxiliary head's.
pub fn init_node(node: &ValidNode, root_seed: u64) -> HostParams {
    let mut params = init_params(node.kind, root_seed, node.origin);
    if let Some(head) = &node.aux {
        params.extend(init_aux(head, root_seed, node.origin));
    }
    params
}

/// The name and shape of every parameter tensor a VNode holds, in the order it holds them: a
/// linear node's `<id>.weight` [inputs, outputs] and `<id>.bias` [outputs] (a layer_norm's
/// scale and shift, [width] each, under the same names), then its auxiliary head's
/// `<id>.aux.<layer>.weight` and `.bias` (docs/MODEL_FORMAT.md).
pub fn param_layout(node: &ValidNode) -> Vec<(String, Vec<usize>)> {
    let linear = |prefix: String, inputs: usize, outputs: usize| {
        [(format!("{prefix}.weight"), vec![inputs, outputs]), (format!("{prefix}.bias"), vec![outputs])]
    };
    let mut out = Vec::new();
    match node.kind {
        NodeKind::Linear { inputs, outputs } => out.extend(linear(node.name.clone(), inputs, outputs)),
        NodeKind::LayerNorm { width } => {
            out.extend([(format!("{}.weight", node.name), vec![width]), (format!("{}.bias", node.name), vec![width])])
        }
        NodeKind::Conv2d { channels, kernel, input, .. } => out.extend([
            (format!("{}.weight", node.name), vec![channels, input[0], kernel, kernel]),
            (format!("{}.bias", node.name), vec![channels]),
        ]),
        _ => {}
    }
    if let Some(head) = &node.aux {
        for (i, (inputs, outputs)) in head.layers().into_iter().enumerate() {
            out.extend(linear(format!("{}.aux.{i}", node.name), inputs, outputs));
        }
    }
    out
}

/// Number of parameter tensors of the kind itself; an auxiliary head's follow them.
pub fn own_tensors(kind: NodeKind) -> usize {
    match kind {
        NodeKind::Linear { .. } | NodeKind::LayerNorm { .. } | NodeKind::Conv2d { .. } => 2,
        _ => 0,
    }
}

/// Logits of an auxiliary head on a block output `y`, from the head's parameter tensors.
pub fn aux_logits(head: &AuxHead, params: &[Tensor<2>], y: Tensor<2>) -> Option<Tensor<2>> {
    match (head.hidden, params) {
        (0, [w, b]) => Some(y.matmul(w.clone()) + b.clone()),
        (h, [w1, b1, w2, b2]) if h > 0 => {
            let hidden = activation::relu(y.matmul(w1.clone()) + b1.clone());
            Some(hidden.matmul(w2.clone()) + b2.clone())
        }
        _ => None,
    }
}

/// Loads host parameters onto a device.
pub fn params_to_device(params: &[(Vec<usize>, Vec<f32>)], device: &burn::tensor::Device) -> Vec<Tensor<2>> {
    params
        .iter()
        .map(|(shape, v)| Tensor::from_data(TensorData::new(v.clone(), [shape[0], shape[1]]), device))
        .collect()
}

/// What a forward pass is for: training draws dropout masks, evaluation draws nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Evaluation or inference: dropout is the identity.
    Eval,
    /// Training step `step` of the node `origin` (its id in pipeline 0) in pipeline `pipeline`.
    Train {
        /// The job's root seed.
        root_seed: u64,
        /// The node's id in pipeline 0.
        origin: u32,
        /// The node's pipeline.
        pipeline: u32,
        /// The micro-batch (step) number.
        step: u64,
    },
}

/// The layer_norm's ε, PyTorch's default.
pub const LAYER_NORM_EPS: f32 = 1e-5;

/// Dropout's multiplier per element of a `[rows, width]` activation: 0 with probability `rate`,
/// else 1/(1 − rate). Each element compares 24 random bits with the rate, so the mask is a
/// function of the seed stream alone.
pub fn dropout_mask(rate: f32, rows: usize, width: usize, pass: Pass) -> Vec<f32> {
    let Pass::Train { root_seed, origin, pipeline, step } = pass else {
        return vec![1.0; rows * width];
    };
    let mut rng = stream_path(root_seed, Purpose::Dropout, &[origin as u64, pipeline as u64, step]);
    let threshold = (rate as f64 * 16_777_216.0).round() as u32;
    let keep = 1.0 / (1.0 - rate);
    (0..rows * width)
        .map(|_| {
            use rand::Rng;
            if (rng.next_u32() >> 8) >= threshold { keep } else { 0.0 }
        })
        .collect()
}

/// Forward of a non-loss node on `[batch, width]` inputs, one per port.
pub fn forward(kind: NodeKind, params: &[Tensor<2>], inputs: &[Tensor<2>], pass: Pass) -> Tensor<2> {
    let x = inputs[0].clone();
    match kind {
        NodeKind::Linear { .. } => x.matmul(params[0].clone()) + params[1].clone(),
        NodeKind::Relu => activation::relu(x),
        NodeKind::Tanh => activation::tanh(x),
        NodeKind::Gelu => activation::gelu(x),
        NodeKind::LayerNorm { .. } => {
            let centred = x.clone() - x.mean_dim(1);
            let var = (centred.clone() * centred.clone()).mean_dim(1);
            centred / (var + LAYER_NORM_EPS).sqrt() * params[0].clone() + params[1].clone()
        }
        NodeKind::Dropout { rate } => match pass {
            Pass::Train { .. } if rate > 0.0 => {
                let [rows, width] = x.dims();
                let mask = TensorData::new(dropout_mask(rate, rows, width, pass), [rows, width]);
                let mask: Tensor<2> = Tensor::from_data(mask, &x.device());
                x * mask
            }
            _ => x,
        },
        NodeKind::Add => x + inputs[1].clone(),
        NodeKind::Conv2d { channels, kernel, stride, padding, input } => {
            let filters: Tensor<4> = params[0].clone().reshape([channels, input[0], kernel, kernel]);
            let bias: Tensor<1> = params[1].clone().reshape([channels]);
            let options = ConvOptions::new([stride, stride], [padding, padding], [1, 1], 1);
            spatial(x, input, |x| conv2d(x, filters, Some(bias), options))
        }
        NodeKind::MaxPool2d { kernel, stride, input } => {
            spatial(x, input, |x| max_pool2d(x, MaxPoolOptions::new([kernel, kernel]).with_stride([stride, stride])))
        }
        NodeKind::AvgPool2d { kernel, stride, input } => {
            spatial(x, input, |x| avg_pool2d(x, AvgPoolOptions::new([kernel, kernel]).with_stride([stride, stride])))
        }
        // The values are the same row-major numbers; only the graph's view of them changes.
        NodeKind::Flatten | NodeKind::Reshape { .. } => x,
        NodeKind::Concat => Tensor::cat(vec![x, inputs[1].clone()], 1),
        // A loss has no activation output; `loss` computes it.
        NodeKind::SoftmaxCrossEntropy { .. } => x,
    }
}

/// `f` applied to flat rows `x` read as `[rows, c, h, w]`; its result flattened back to rows.
fn spatial(x: Tensor<2>, [c, h, w]: [usize; 3], f: impl FnOnce(Tensor<4>) -> Tensor<4>) -> Tensor<2> {
    let rows = x.dims()[0];
    let y = f(x.reshape([rows, c, h, w]));
    let [_, oc, oh, ow] = y.dims();
    y.reshape([rows, oc * oh * ow])
}

/// The loss's target: one-hot, or with `smoothing` > 0, `(1 - smoothing) * one_hot +
/// smoothing / classes`.
pub fn target(labels: &[i32], classes: usize, smoothing: f32) -> Vec<f32> {
    let hot = one_hot(labels, classes);
    if smoothing == 0.0 {
        return hot;
    }
    let floor = smoothing / classes as f32;
    hot.into_iter().map(|h| h * (1.0 - smoothing) + floor).collect()
}

/// Mean softmax cross-entropy of `logits` against a one-hot target.
pub fn loss(logits: Tensor<2>, one_hot: Tensor<2>) -> Tensor<1> {
    let batch = logits.dims()[0] as f32;
    let logp = activation::log_softmax(logits, 1);
    (logp * one_hot).sum().mul_scalar(-1.0 / batch)
}

/// Class probabilities of `logits`: the softmax of each row, what serving answers.
pub fn probabilities(logits: Tensor<2>) -> Tensor<2> {
    activation::softmax(logits, 1)
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
    logits.chunks_exact(classes).zip(labels).filter(|(row, l)| argmax(row) as i32 == **l).count() as u32
}

/// Index of the largest value of `row` (the first on a tie; 0 for an empty row).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (j, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = j;
        }
    }
    best
}

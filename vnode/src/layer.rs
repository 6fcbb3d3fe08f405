//! The math of each node kind, shared by the VNodes and the single-process reference so both
//! run exactly the same kernels in the same order.

use crate::autodiff;
use crate::compute::Compute;
use crate::kernels::{self, Matrix, ShapeError};
use crate::seed::{Purpose, stream, stream_path, uniform};
use dcnr_model::NodeKind;
use dcnr_model::graph::{AuxHead, ValidNode};
use rand_chacha::ChaCha20Rng;
use std::sync::Arc;

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

/// A node's parameter tensors as matrices, in canonical order, shared between parameter
/// versions until an update writes one.
pub type Params = Vec<Arc<Matrix>>;

/// Host parameters as matrices; `None` if one is not rank 2 or its values do not fill it.
pub fn to_params(host: &[(Vec<usize>, Vec<f32>)]) -> Option<Params> {
    host.iter()
        .map(|(shape, v)| match shape.as_slice() {
            &[r, c] => Matrix::new(r, c, v.clone()).map(Arc::new),
            _ => None,
        })
        .collect()
}

/// Why a pass could not run: shapes that do not fit (a checked input never gets here).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KernelError {
    /// A product whose operands do not fit.
    #[error(transparent)]
    Shape(#[from] ShapeError),
    /// A parameter tensor that is not a matrix of the kind's shape.
    #[error("a parameter tensor does not have the shape of its kind")]
    Parameter,
    /// Inputs that do not fit the kind (count, rows or width).
    #[error("the inputs do not fit the node: {0}")]
    Inputs(String),
    /// What a backward needs was not kept by its forward.
    #[error("the forward kept no {0} for the backward")]
    Missing(&'static str),
    /// Labels that do not fit the logits.
    #[error("{rows} rows of logits but {labels} labels")]
    Labels {
        /// Rows of logits.
        rows: usize,
        /// Labels given.
        labels: usize,
    },
    /// The device a pass ran on failed or refused a tensor (the GPU is then given up).
    #[error("device: {0}")]
    Device(String),
}

/// What a training forward keeps for its backward, by kind.
pub struct Kept(Keep);

enum Keep {
    /// The backward needs nothing (add, flatten, reshape, dropout in evaluation).
    Nothing,
    /// The forward's input (linear, gelu).
    Input(Matrix),
    /// The forward's output (relu, tanh).
    Output(Matrix),
    /// Dropout's multipliers.
    Mask(Vec<f32>),
    /// layer_norm's normalised input and per-row 1/σ.
    Norm { xhat: Matrix, inv_std: Vec<f32> },
    /// concat: the width of its first input.
    Split(usize),
    /// A spatial kind's recorded autodiff graph (on the host).
    Tape(Box<autodiff::Tape>),
    /// A pass recorded on a GPU, with what the host needs to redo it if the GPU fails before
    /// the backward.
    #[cfg(feature = "gpu")]
    Device(Box<DeviceKept>),
}

/// A GPU forward's record, and its inputs and pass kept on the host for a fallback.
#[cfg(feature = "gpu")]
struct DeviceKept {
    tape: autodiff::Tape,
    gpu: crate::gpu::Gpu,
    inputs: Vec<Matrix>,
    pass: Pass,
}

/// A training forward's output and what its backward needs.
pub struct Forward {
    /// The node's output, `[batch, width]`.
    pub output: Matrix,
    /// What the backward reads.
    pub kept: Kept,
}

/// Forward of a non-loss node on `[batch, width]` inputs, one per port, where `compute` says.
/// `want_dx[port]` says which inputs' gradients the backward will be asked for (recorded passes
/// track only those); in evaluation nothing is kept. A pass on a GPU that fails runs on the
/// host instead, and the GPU is given up (`compute.failure()` then says why).
pub fn forward(
    compute: &Compute,
    kind: NodeKind,
    params: &[Arc<Matrix>],
    inputs: Vec<Matrix>,
    pass: Pass,
    want_dx: &[bool],
) -> Result<Forward, KernelError> {
    #[cfg(feature = "gpu")]
    if let Compute::Gpu(gpu) = compute
        && autodiff::computes(kind)
        && gpu.failure().is_none()
        // Dropout outside training passes its input on: nothing for a device to do.
        && !(matches!(kind, NodeKind::Dropout { rate } if rate <= 0.0 || !matches!(pass, Pass::Train { .. })))
    {
        let train = matches!(pass, Pass::Train { .. });
        let mask = match (kind, inputs.first()) {
            (NodeKind::Dropout { rate }, Some(x)) => Some(dropout_mask(rate, x.rows(), x.cols(), pass)),
            _ => None,
        };
        let run = |device: &burn::tensor::Device| {
            autodiff::forward(kind, params, &inputs, mask.as_deref(), want_dx, train, device)
        };
        match gpu.run(run) {
            Ok((output, Some(tape))) => {
                let kept = DeviceKept { tape, gpu: gpu.clone(), inputs, pass };
                return Ok(Forward { output, kept: Kept(Keep::Device(Box::new(kept))) });
            }
            Ok((output, None)) => return Ok(Forward { output, kept: Kept(Keep::Nothing) }),
            // Computed on the host below.
            Err(KernelError::Device(_)) => {}
            Err(e) => return Err(e),
        }
    }
    #[cfg(not(feature = "gpu"))]
    let _ = compute;
    host_forward(kind, params, inputs, pass, want_dx)
}

/// [`forward`] on the host kernels.
fn host_forward(
    kind: NodeKind,
    params: &[Arc<Matrix>],
    inputs: Vec<Matrix>,
    pass: Pass,
    want_dx: &[bool],
) -> Result<Forward, KernelError> {
    let train = matches!(pass, Pass::Train { .. });
    let ports = kind.ports().len();
    if inputs.len() != ports {
        return Err(KernelError::Inputs(format!("{} inputs for {ports} ports", inputs.len())));
    }
    let mut inputs = inputs.into_iter();
    let mut next = || inputs.next().ok_or(KernelError::Inputs("an input is missing".into()));
    let x = next()?;
    let kept = |k: Keep| Kept(if train { k } else { Keep::Nothing });
    let done = |output: Matrix, k: Keep| Ok(Forward { output, kept: kept(k) });
    match kind {
        NodeKind::Linear { .. } => match params {
            [w, b] => done(linear(&x, w, b)?, Keep::Input(x)),
            _ => Err(KernelError::Parameter),
        },
        NodeKind::Relu => {
            let mut y = x;
            kernels::relu(y.data_mut());
            let k = if train { Keep::Output(y.clone()) } else { Keep::Nothing };
            done(y, k)
        }
        NodeKind::Tanh => {
            let mut y = x;
            y.data_mut().iter_mut().for_each(|v| *v = v.tanh());
            let k = if train { Keep::Output(y.clone()) } else { Keep::Nothing };
            done(y, k)
        }
        NodeKind::Gelu => {
            let mut y = x.clone();
            y.data_mut().iter_mut().for_each(|v| *v = gelu(*v));
            done(y, Keep::Input(x))
        }
        NodeKind::LayerNorm { width } => match params {
            [scale, shift] if scale.data().len() == width && shift.data().len() == width && x.cols() == width => {
                let (xhat, inv_std) = normalise(x);
                let mut y = xhat.clone();
                for row in y.data_mut().chunks_exact_mut(width.max(1)) {
                    for ((v, s), t) in row.iter_mut().zip(scale.data()).zip(shift.data()) {
                        *v = *v * s + t;
                    }
                }
                done(y, Keep::Norm { xhat, inv_std })
            }
            _ => Err(KernelError::Parameter),
        },
        NodeKind::Dropout { rate } => match pass {
            Pass::Train { .. } if rate > 0.0 => {
                let mask = dropout_mask(rate, x.rows(), x.cols(), pass);
                let mut y = x;
                y.data_mut().iter_mut().zip(&mask).for_each(|(v, m)| *v *= m);
                done(y, Keep::Mask(mask))
            }
            _ => done(x, Keep::Nothing),
        },
        NodeKind::Add => {
            let other = next()?;
            if other.rows() != x.rows() || other.cols() != x.cols() {
                return Err(KernelError::Inputs("add's inputs differ in shape".into()));
            }
            let mut y = x;
            kernels::add_assign(y.data_mut(), other.data());
            done(y, Keep::Nothing)
        }
        NodeKind::Concat => {
            let other = next()?;
            if other.rows() != x.rows() {
                return Err(KernelError::Inputs("concat's inputs differ in rows".into()));
            }
            let (a, b) = (x.cols(), other.cols());
            let mut data = Vec::with_capacity(x.rows() * (a + b));
            for (l, r) in x.data().chunks_exact(a.max(1)).zip(other.data().chunks_exact(b.max(1))) {
                data.extend_from_slice(&l[..a]);
                data.extend_from_slice(&r[..b]);
            }
            let y = Matrix::new(x.rows(), a + b, data).ok_or(KernelError::Inputs("concat".into()))?;
            done(y, Keep::Split(a))
        }
        NodeKind::Conv2d { .. } | NodeKind::MaxPool2d { .. } | NodeKind::AvgPool2d { .. } => {
            let track = [train && want_dx.first().copied().unwrap_or(false)];
            let device = autodiff::host_device();
            let (y, tape) = autodiff::forward(kind, params, &[x], None, &track, train, &device)?;
            done(y, tape.map_or(Keep::Nothing, |t| Keep::Tape(Box::new(t))))
        }
        // The values are the same row-major numbers; only the graph's view of them changes.
        NodeKind::Flatten | NodeKind::Reshape { .. } => done(x, Keep::Nothing),
        // A loss has no activation output; `softmax_cross_entropy` computes it.
        NodeKind::SoftmaxCrossEntropy { .. } => done(x, Keep::Nothing),
    }
}

/// Backward of a non-loss node given the gradient `g` of its output: the gradients of its own
/// parameter tensors (canonical order) and, per port where `want_dx` asks, of its input.
pub fn backward(
    kind: NodeKind,
    params: &[Arc<Matrix>],
    kept: Kept,
    g: Matrix,
    want_dx: &[bool],
) -> Result<(Vec<Matrix>, Vec<Option<Matrix>>), KernelError> {
    let want = |port: usize| want_dx.get(port).copied().unwrap_or(false);
    #[cfg(feature = "gpu")]
    if let Keep::Device(kept) = kept.0 {
        let DeviceKept { tape, gpu, inputs, pass } = *kept;
        return match gpu.run(|_| autodiff::backward(tape, &g)) {
            Ok((grads, dxs)) => {
                Ok((grads, dxs.into_iter().enumerate().map(|(port, dx)| dx.filter(|_| want(port))).collect()))
            }
            // The GPU failed between the forward and now: both passes again on the host.
            Err(KernelError::Device(_)) => {
                let redone = host_forward(kind, params, inputs, pass, want_dx)?;
                backward(kind, params, redone.kept, g, want_dx)
            }
            Err(e) => Err(e),
        };
    }
    let one = |dx: Matrix| vec![want(0).then_some(dx)];
    match (kind, kept.0) {
        (NodeKind::Linear { .. }, Keep::Input(x)) => match params {
            [w, _] => {
                let (dw, db, dx) = linear_backward(&x, w, &g, want(0))?;
                Ok((vec![dw, db], vec![dx]))
            }
            _ => Err(KernelError::Parameter),
        },
        (NodeKind::Relu, Keep::Output(y)) => {
            let mut g = g;
            kernels::relu_backward(g.data_mut(), y.data());
            Ok((Vec::new(), one(g)))
        }
        (NodeKind::Tanh, Keep::Output(y)) => {
            let mut g = g;
            kernels::tanh_backward(g.data_mut(), y.data());
            Ok((Vec::new(), one(g)))
        }
        (NodeKind::Gelu, Keep::Input(x)) => {
            let mut g = g;
            g.data_mut().iter_mut().zip(x.data()).for_each(|(g, x)| *g *= gelu_slope(*x));
            Ok((Vec::new(), one(g)))
        }
        (NodeKind::LayerNorm { width }, Keep::Norm { xhat, inv_std }) => match params {
            [scale, _] if scale.data().len() == width && g.cols() == width && xhat.cols() == width => {
                let (dscale, dshift) = (products_by_column(&g, &xhat), kernels::column_sums(&g));
                let mut dx = g;
                let n = width as f32;
                for ((row, xh), inv) in dx
                    .data_mut()
                    .chunks_exact_mut(width.max(1))
                    .zip(xhat.data().chunks_exact(width.max(1)))
                    .zip(inv_std)
                {
                    let (mut sum, mut dot) = (0.0f32, 0.0f32);
                    for ((d, s), h) in row.iter_mut().zip(scale.data()).zip(xh) {
                        *d *= s;
                        sum += *d;
                        dot += *d * h;
                    }
                    let (mean, mean_dot) = (sum / n, dot / n);
                    for (d, h) in row.iter_mut().zip(xh) {
                        *d = inv * (*d - mean - h * mean_dot);
                    }
                }
                let row = |v: Vec<f32>| Matrix::new(1, width, v).ok_or(KernelError::Parameter);
                Ok((vec![row(dscale)?, row(dshift)?], one(dx)))
            }
            _ => Err(KernelError::Parameter),
        },
        (NodeKind::Dropout { .. }, Keep::Mask(mask)) => {
            let mut g = g;
            g.data_mut().iter_mut().zip(&mask).for_each(|(g, m)| *g *= m);
            Ok((Vec::new(), one(g)))
        }
        (NodeKind::Add, _) => Ok((Vec::new(), vec![want(0).then(|| g.clone()), want(1).then_some(g)])),
        (NodeKind::Concat, Keep::Split(a)) => {
            let (rows, width) = (g.rows(), g.cols());
            let b = width.checked_sub(a).ok_or(KernelError::Missing("split"))?;
            let (mut l, mut r) = (Vec::with_capacity(rows * a), Vec::with_capacity(rows * b));
            for row in g.data().chunks_exact(width.max(1)) {
                l.extend_from_slice(&row[..a]);
                r.extend_from_slice(&row[a..]);
            }
            let part = |cols, v| Matrix::new(rows, cols, v).ok_or(KernelError::Missing("split"));
            Ok((Vec::new(), vec![want(0).then_some(part(a, l)?), want(1).then_some(part(b, r)?)]))
        }
        (NodeKind::Conv2d { .. } | NodeKind::MaxPool2d { .. } | NodeKind::AvgPool2d { .. }, Keep::Tape(tape)) => {
            let (grads, dxs) = autodiff::backward(*tape, &g)?;
            Ok((grads, vec![dxs.into_iter().next().flatten().filter(|_| want(0))]))
        }
        (NodeKind::Dropout { .. } | NodeKind::Flatten | NodeKind::Reshape { .. }, Keep::Nothing) => {
            Ok((Vec::new(), one(g)))
        }
        (NodeKind::SoftmaxCrossEntropy { .. }, _) => Ok((Vec::new(), one(g))),
        _ => Err(KernelError::Missing("record of its kind")),
    }
}

/// `x · w + b` for `x` `[batch, inputs]`, `w` `[inputs, outputs]`, `b` `[1, outputs]`.
pub fn linear(x: &Matrix, w: &Matrix, b: &Matrix) -> Result<Matrix, KernelError> {
    if b.rows() != 1 || b.cols() != w.cols() {
        return Err(KernelError::Parameter);
    }
    let mut y = Matrix::zeros(x.rows(), w.cols());
    for row in y.data_mut().chunks_exact_mut(w.cols().max(1)) {
        row.copy_from_slice(b.data());
    }
    kernels::matmul(y.data_mut(), x.view(), w.view(), true)?;
    Ok(y)
}

/// Gradients of `linear`: (dw = xᵀ·g, db = column sums of g), and dx = g·wᵀ when `want_dx`.
pub fn linear_backward(
    x: &Matrix,
    w: &Matrix,
    g: &Matrix,
    want_dx: bool,
) -> Result<(Matrix, Matrix, Option<Matrix>), KernelError> {
    let mut dw = Matrix::zeros(w.rows(), w.cols());
    kernels::matmul(dw.data_mut(), x.view().t(), g.view(), false)?;
    let db = Matrix::new(1, g.cols(), kernels::column_sums(g)).ok_or(KernelError::Parameter)?;
    let dx = if want_dx {
        let mut dx = Matrix::zeros(g.rows(), w.rows());
        kernels::matmul(dx.data_mut(), g.view(), w.view().t(), false)?;
        Some(dx)
    } else {
        None
    };
    Ok((dw, db, dx))
}

/// The exact GELU, `x·Φ(x)` with `Φ(x) = (1 + erf(x/√2)) / 2`; `erf` from libm, the same bits
/// on every CPU.
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// d gelu / dx = Φ(x) + x·φ(x).
fn gelu_slope(x: f32) -> f32 {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let cdf = 0.5 * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2));
    cdf + x * INV_SQRT_2PI * libm::expf(-0.5 * x * x)
}

/// Each row of `x` centred on its mean and divided by √(variance + ε), with the 1/σ of each row.
fn normalise(x: Matrix) -> (Matrix, Vec<f32>) {
    let width = x.cols();
    let n = width as f32;
    let mut xhat = x;
    let mut inv_std = Vec::with_capacity(xhat.rows());
    for row in xhat.data_mut().chunks_exact_mut(width.max(1)) {
        let mean = row.iter().sum::<f32>() / n;
        row.iter_mut().for_each(|v| *v -= mean);
        let var = row.iter().map(|v| v * v).sum::<f32>() / n;
        let inv = 1.0 / (var + LAYER_NORM_EPS).sqrt();
        row.iter_mut().for_each(|v| *v *= inv);
        inv_std.push(inv);
    }
    (xhat, inv_std)
}

/// Per column, the sum over rows (in order) of `a · b`, element by element.
fn products_by_column(a: &Matrix, b: &Matrix) -> Vec<f32> {
    let width = a.cols().max(1);
    let mut acc = vec![0.0f32; a.cols()];
    for (ra, rb) in a.data().chunks_exact(width).zip(b.data().chunks_exact(width)) {
        for ((s, x), y) in acc.iter_mut().zip(ra).zip(rb) {
            *s += x * y;
        }
    }
    acc
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

/// Mean softmax cross-entropy of `logits` against `target` rows (one-hot or smoothed, from
/// [`target`]), and its gradient with respect to the logits: `(softmax · Σtarget − target) /
/// rows`.
pub fn softmax_cross_entropy(logits: &Matrix, target: &[f32]) -> Result<(f32, Matrix), KernelError> {
    let (rows, classes) = (logits.rows(), logits.cols());
    if target.len() != logits.data().len() {
        return Err(KernelError::Labels { rows, labels: target.len() / classes.max(1) });
    }
    let scale = 1.0 / rows.max(1) as f32;
    let mut grad = logits.clone();
    let mut total = 0.0f32;
    for (row, t) in grad.data_mut().chunks_exact_mut(classes.max(1)).zip(target.chunks_exact(classes.max(1))) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for v in row.iter_mut() {
            *v -= max;
        }
        let picked: f32 = row.iter().zip(t).map(|(v, t)| v * t).sum();
        let mass: f32 = t.iter().sum();
        for v in row.iter_mut() {
            *v = v.exp();
            sum += *v;
        }
        // −Σ t·(x − max − ln Σ e^(x − max)).
        total += mass * sum.ln() - picked;
        for (v, t) in row.iter_mut().zip(t) {
            *v = (*v / sum * mass - t) * scale;
        }
    }
    Ok((total * scale, grad))
}

/// Class probabilities of `logits`: the softmax of each row, what serving answers.
pub fn probabilities(logits: &Matrix) -> Matrix {
    let mut p = logits.clone();
    for row in p.data_mut().chunks_exact_mut(logits.cols().max(1)) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        row.iter_mut().for_each(|v| *v /= sum);
    }
    p
}

/// What training an auxiliary head on a block output gives: the head's loss, its parameter
/// gradients (canonical order) and the gradient of the block output.
pub struct HeadPass {
    /// Mean loss of the head.
    pub loss: f32,
    /// Gradients of the head's parameter tensors.
    pub grads: Vec<Matrix>,
    /// Gradient of the block output the head reads.
    pub dy: Matrix,
}

/// Forward and backward of an auxiliary head on block output `y` against `labels` (one-hot).
pub fn head_pass(head: &AuxHead, params: &[Arc<Matrix>], y: &Matrix, labels: &[i32]) -> Result<HeadPass, KernelError> {
    if labels.len() != y.rows() {
        return Err(KernelError::Labels { rows: y.rows(), labels: labels.len() });
    }
    let target = one_hot(labels, head.classes);
    let missing = || KernelError::Missing("gradient");
    match (head.hidden, params) {
        (0, [w, b]) => {
            let logits = linear(y, w, b)?;
            let (loss, dl) = softmax_cross_entropy(&logits, &target)?;
            let (dw, db, dy) = linear_backward(y, w, &dl, true)?;
            Ok(HeadPass { loss, grads: vec![dw, db], dy: dy.ok_or_else(missing)? })
        }
        (h, [w1, b1, w2, b2]) if h > 0 => {
            let mut hidden = linear(y, w1, b1)?;
            kernels::relu(hidden.data_mut());
            let logits = linear(&hidden, w2, b2)?;
            let (loss, dl) = softmax_cross_entropy(&logits, &target)?;
            let (dw2, db2, dh) = linear_backward(&hidden, w2, &dl, true)?;
            let mut dh = dh.ok_or_else(missing)?;
            kernels::relu_backward(dh.data_mut(), hidden.data());
            let (dw1, db1, dy) = linear_backward(y, w1, &dh, true)?;
            Ok(HeadPass { loss, grads: vec![dw1, db1, dw2, db2], dy: dy.ok_or_else(missing)? })
        }
        _ => Err(KernelError::Parameter),
    }
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

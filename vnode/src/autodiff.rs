//! Node kinds as burn tensor ops on any burn device, recorded for autodiff: the one place VNode
//! math uses burn. The host path runs only the spatial kinds (conv2d, max_pool2d, avg_pool2d)
//! here, on burn's flex backend; a VNode on a GPU runs every kind with parameters here, on
//! burn-wgpu. Values arrive and leave as host matrices, so they cross to the device and back
//! once per message: the inputs and parameters go up together, the output comes down once. A
//! training forward records burn's graph, and the backward replays it from the output's
//! gradient.

use crate::kernels::Matrix;
use crate::layer::{KernelError, LAYER_NORM_EPS};
use burn::tensor::module::{avg_pool2d, conv2d, max_pool2d};
use burn::tensor::ops::{AvgPoolOptions, ConvOptions, MaxPoolOptions};
use burn::tensor::{Device, Tensor, TensorData, activation};
use dcnr_model::NodeKind;
use std::sync::Arc;

/// A training forward's autodiff record: the output, the input leaves whose gradients are
/// wanted, and the parameter leaves.
pub struct Tape {
    y: Tensor<2>,
    xs: Vec<Option<Tensor<2>>>,
    params: Vec<Tensor<2>>,
    device: Device,
}

/// burn's CPU backend, on which the host path runs the spatial kinds.
pub fn host_device() -> Device {
    Device::flex()
}

/// Whether this module computes `kind` (the others are plain reshapes of the values, or the
/// loss, which the host computes).
pub fn computes(kind: NodeKind) -> bool {
    !matches!(kind, NodeKind::Flatten | NodeKind::Reshape { .. } | NodeKind::SoftmaxCrossEntropy { .. })
}

fn upload(m: &Matrix, device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(m.data().to_vec(), [m.rows(), m.cols()]), device)
}

fn to_host(t: Tensor<2>) -> Result<Matrix, KernelError> {
    let [rows, cols] = t.dims();
    let v = t.into_data().try_into_vec::<f32>().map_err(|e| KernelError::Device(format!("{e:?}")))?;
    Matrix::new(rows, cols, v).ok_or_else(|| KernelError::Device("tensor size".into()))
}

/// Forward of `kind` on `xs` (one per port) on `device`; with `record`, also its tape, tracking
/// the inputs `want_dx` names. `mask` is dropout's multipliers, drawn on the host from the
/// job's seed stream so every device drops the same elements.
pub fn forward(
    kind: NodeKind,
    params: &[Arc<Matrix>],
    xs: &[Matrix],
    mask: Option<&[f32]>,
    want_dx: &[bool],
    record: bool,
    device: &Device,
) -> Result<(Matrix, Option<Tape>), KernelError> {
    check(kind, xs)?;
    if !record {
        let ps: Vec<Tensor<2>> = params.iter().map(|p| upload(p, device)).collect();
        let xs: Vec<Tensor<2>> = xs.iter().map(|x| upload(x, device)).collect();
        let y = apply(kind, &ps, xs, mask, device)?;
        return Ok((to_host(y)?, None));
    }
    let device = device.clone().autodiff();
    let leaves: Vec<Tensor<2>> = xs
        .iter()
        .enumerate()
        .map(|(port, x)| {
            let x = upload(x, &device);
            if want_dx.get(port).copied().unwrap_or(false) { x.require_grad() } else { x }
        })
        .collect();
    let ps: Vec<Tensor<2>> = params.iter().map(|p| upload(p, &device).require_grad()).collect();
    let y = apply(kind, &ps, leaves.clone(), mask, &device)?;
    let host = to_host(y.clone().inner())?;
    let xs = leaves.into_iter().enumerate().map(|(port, x)| want_dx.get(port).copied().unwrap_or(false).then_some(x));
    Ok((host, Some(Tape { y, xs: xs.collect(), params: ps, device })))
}

/// Backward of a recorded forward from its output's gradient `g`: the parameter gradients and,
/// per port it tracked, the input's.
pub fn backward(tape: Tape, g: &Matrix) -> Result<(Vec<Matrix>, Vec<Option<Matrix>>), KernelError> {
    let Tape { y, xs, params, device } = tape;
    if g.rows() != y.dims()[0] || g.cols() != y.dims()[1] {
        return Err(KernelError::Inputs("gradient of another shape than the output".into()));
    }
    if params.is_empty() && xs.iter().all(Option::is_none) {
        return Ok((Vec::new(), xs.iter().map(|_| None).collect()));
    }
    let grads = (y * upload(g, &device)).sum().backward();
    let missing = || KernelError::Missing("gradient");
    let pgrads =
        params.iter().map(|p| p.grad(&grads).ok_or_else(missing).and_then(to_host)).collect::<Result<_, _>>()?;
    let dxs = xs
        .into_iter()
        .map(|x| x.map(|x| x.grad(&grads).ok_or_else(missing).and_then(to_host)).transpose())
        .collect::<Result<_, _>>()?;
    Ok((pgrads, dxs))
}

/// The inputs' count and widths against the kind's.
fn check(kind: NodeKind, xs: &[Matrix]) -> Result<(), KernelError> {
    let ports = kind.ports().len();
    if xs.len() != ports {
        return Err(KernelError::Inputs(format!("{} inputs for {ports} ports", xs.len())));
    }
    let width = match kind {
        NodeKind::Conv2d { input, .. } | NodeKind::MaxPool2d { input, .. } | NodeKind::AvgPool2d { input, .. } => {
            input.iter().product::<usize>()
        }
        NodeKind::LayerNorm { width } => width,
        _ => return same_rows(xs),
    };
    match xs.first() {
        Some(x) if x.cols() != width => {
            Err(KernelError::Inputs(format!("{} values per row where the kind reads {width}", x.cols())))
        }
        _ => same_rows(xs),
    }
}

fn same_rows(xs: &[Matrix]) -> Result<(), KernelError> {
    match xs {
        [a, b] if a.rows() != b.rows() => Err(KernelError::Inputs("the inputs differ in rows".into())),
        _ => Ok(()),
    }
}

fn apply(
    kind: NodeKind,
    params: &[Tensor<2>],
    xs: Vec<Tensor<2>>,
    mask: Option<&[f32]>,
    device: &Device,
) -> Result<Tensor<2>, KernelError> {
    let mut xs = xs.into_iter();
    let x = xs.next().ok_or_else(|| KernelError::Inputs("an input is missing".into()))?;
    let mut other = || xs.next().ok_or_else(|| KernelError::Inputs("an input is missing".into()));
    Ok(match kind {
        NodeKind::Linear { .. } => {
            let [w, b] = params else { return Err(KernelError::Parameter) };
            if x.dims()[1] != w.dims()[0] || b.dims() != [1, w.dims()[1]] {
                return Err(KernelError::Parameter);
            }
            x.matmul(w.clone()) + b.clone()
        }
        NodeKind::Relu => activation::relu(x),
        NodeKind::Tanh => activation::tanh(x),
        NodeKind::Gelu => activation::gelu(x),
        NodeKind::LayerNorm { width } => {
            let [scale, shift] = params else { return Err(KernelError::Parameter) };
            if scale.dims() != [1, width] || shift.dims() != [1, width] {
                return Err(KernelError::Parameter);
            }
            let (var, mean) = x.clone().var_mean_bias(1);
            let xhat = (x - mean) / var.add_scalar(LAYER_NORM_EPS).sqrt();
            xhat * scale.clone() + shift.clone()
        }
        NodeKind::Dropout { .. } => match mask {
            Some(mask) => {
                let [rows, cols] = x.dims();
                if mask.len() != rows * cols {
                    return Err(KernelError::Inputs("a dropout mask of another size".into()));
                }
                x * Tensor::<2>::from_data(TensorData::new(mask.to_vec(), [rows, cols]), device)
            }
            None => x,
        },
        NodeKind::Add => {
            let y = other()?;
            if y.dims() != x.dims() {
                return Err(KernelError::Inputs("add's inputs differ in shape".into()));
            }
            x + y
        }
        NodeKind::Concat => Tensor::cat(vec![x, other()?], 1),
        NodeKind::Conv2d { channels, kernel, stride, padding, input } => {
            let [w, b] = params else { return Err(KernelError::Parameter) };
            let filters: Tensor<4> = w.clone().reshape([channels, input[0], kernel, kernel]);
            let bias: Tensor<1> = b.clone().reshape([channels]);
            let options = ConvOptions::new([stride, stride], [padding, padding], [1, 1], 1);
            flat(x, input, |x| conv2d(x, filters, Some(bias), options))
        }
        NodeKind::MaxPool2d { kernel, stride, input } => {
            flat(x, input, |x| max_pool2d(x, MaxPoolOptions::new([kernel, kernel]).with_stride([stride, stride])))
        }
        NodeKind::AvgPool2d { kernel, stride, input } => {
            flat(x, input, |x| avg_pool2d(x, AvgPoolOptions::new([kernel, kernel]).with_stride([stride, stride])))
        }
        NodeKind::Flatten | NodeKind::Reshape { .. } => x,
        NodeKind::SoftmaxCrossEntropy { .. } => {
            return Err(KernelError::Inputs("the loss is computed on the host".into()));
        }
    })
}

/// `f` applied to flat rows `x` read as `[rows, c, h, w]`; its result flattened back to rows.
fn flat(x: Tensor<2>, [c, h, w]: [usize; 3], f: impl FnOnce(Tensor<4>) -> Tensor<4>) -> Tensor<2> {
    let rows = x.dims()[0];
    let y = f(x.reshape([rows, c, h, w]));
    let [_, oc, oh, ow] = y.dims();
    y.reshape([rows, oc * oh * ow])
}

//! The spatial kinds (conv2d, max_pool2d, avg_pool2d) on burn's flex backend with autodiff: the
//! one place VNode math uses burn. Values arrive and leave as host matrices, flat rows read as
//! `[rows, c, h, w]`; a training forward records burn's graph, and the backward replays it from
//! the output's gradient.

use crate::kernels::Matrix;
use crate::layer::KernelError;
use burn::tensor::module::{avg_pool2d, conv2d, max_pool2d};
use burn::tensor::ops::{AvgPoolOptions, ConvOptions, MaxPoolOptions};
use burn::tensor::{Device, Tensor, TensorData};
use dcnr_model::NodeKind;
use std::sync::Arc;

/// A training forward's autodiff record: the output, the input leaf when its gradient is
/// wanted, and the parameter leaves.
pub struct Tape {
    y: Tensor<2>,
    x: Option<Tensor<2>>,
    params: Vec<Tensor<2>>,
}

fn device() -> Device {
    Device::flex()
}

fn to_burn(m: Matrix, device: &Device) -> Tensor<2> {
    let (rows, cols) = (m.rows(), m.cols());
    Tensor::from_data(TensorData::new(m.into_data(), [rows, cols]), device)
}

fn to_host(t: Tensor<2>) -> Result<Matrix, KernelError> {
    let [rows, cols] = t.dims();
    let v = t.into_data().try_into_vec::<f32>().map_err(|e| KernelError::Spatial(format!("{e:?}")))?;
    Matrix::new(rows, cols, v).ok_or_else(|| KernelError::Spatial("tensor size".into()))
}

/// Forward of a spatial `kind` on `x`; with `record`, also its tape, tracking `x` when `want_dx`.
pub fn forward(
    kind: NodeKind,
    params: &[Arc<Matrix>],
    x: Matrix,
    want_dx: bool,
    record: bool,
) -> Result<(Matrix, Option<Tape>), KernelError> {
    let width = match kind {
        NodeKind::Conv2d { input, .. } | NodeKind::MaxPool2d { input, .. } | NodeKind::AvgPool2d { input, .. } => {
            input.iter().product::<usize>()
        }
        _ => return Err(KernelError::Inputs(format!("{} is not a spatial kind", kind.name()))),
    };
    if x.cols() != width {
        return Err(KernelError::Inputs(format!("{} values per row where the kind reads {width}", x.cols())));
    }
    if !record {
        let device = device();
        let ps: Vec<Tensor<2>> = params.iter().map(|p| to_burn(Matrix::clone(p), &device)).collect();
        let y = apply(kind, &ps, to_burn(x, &device))?;
        return Ok((to_host(y)?, None));
    }
    let device = device().autodiff();
    let x = to_burn(x, &device);
    let x = if want_dx { x.require_grad() } else { x };
    let ps: Vec<Tensor<2>> = params.iter().map(|p| to_burn(Matrix::clone(p), &device).require_grad()).collect();
    let y = apply(kind, &ps, x.clone())?;
    let host = to_host(y.clone().inner())?;
    Ok((host, Some(Tape { y, x: want_dx.then_some(x), params: ps })))
}

/// Backward of a recorded forward from its output's gradient `g`: the parameter gradients and,
/// if it was tracked, the input's.
pub fn backward(tape: Tape, g: Matrix) -> Result<(Vec<Matrix>, Option<Matrix>), KernelError> {
    let Tape { y, x, params } = tape;
    if g.rows() != y.dims()[0] || g.cols() != y.dims()[1] {
        return Err(KernelError::Inputs("gradient of another shape than the output".into()));
    }
    let g = to_burn(g, &device().autodiff());
    let grads = (y * g).sum().backward();
    let missing = || KernelError::Missing("gradient");
    let pgrads =
        params.iter().map(|p| p.grad(&grads).ok_or_else(missing).and_then(to_host)).collect::<Result<_, _>>()?;
    let dx = x.map(|x| x.grad(&grads).ok_or_else(missing).and_then(to_host)).transpose()?;
    Ok((pgrads, dx))
}

fn apply(kind: NodeKind, params: &[Tensor<2>], x: Tensor<2>) -> Result<Tensor<2>, KernelError> {
    Ok(match kind {
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
        _ => return Err(KernelError::Inputs(format!("{} is not a spatial kind", kind.name()))),
    })
}

/// `f` applied to flat rows `x` read as `[rows, c, h, w]`; its result flattened back to rows.
fn flat(x: Tensor<2>, [c, h, w]: [usize; 3], f: impl FnOnce(Tensor<4>) -> Tensor<4>) -> Tensor<2> {
    let rows = x.dims()[0];
    let y = f(x.reshape([rows, c, h, w]));
    let [_, oc, oh, ow] = y.dims();
    y.reshape([rows, oc * oh * ow])
}

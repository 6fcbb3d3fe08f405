//! Gradient checks of the spatial kinds (conv2d, max_pool2d, avg_pool2d), driven through the
//! public VNode API: finite differences for input and filter gradients, and each forward
//! against a direct f64 loop over the windows.

mod common;

use common::{assert_close, f32s, random, sgd_vnode};
use dcnr_model::graph::{ValidGraph, ValidNode};
use dcnr_model::{ModelGraph, NodeKind};
use dcnr_vnode::{HostTensor, Inbound, Outbound, Phase, VNode};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// image [2, 6, 6] -> conv (3 channels, 3x3, stride 1, padding 1) -> mp (2x2) ->
/// conv2 (2 channels, 2x2, stride 2, padding 1) -> ap (2x2, stride 1) -> head -> loss.
const GRAPH: &str = r#"
[model]
name = "gradcheck-spatial"
seed = 3
[data]
dataset = "synthetic"
feature_size = 72
classes = 3
shape = [2, 6, 6]
[training]
batch_size = 2
[optimizer]
kind = "sgd"
lr = 1.0
[[node]]
id = "conv"
kind = "conv2d"
channels = 3
kernel = 3
padding = 1
[[node]]
id = "mp"
kind = "max_pool2d"
kernel = 2
[[node]]
id = "conv2"
kind = "conv2d"
channels = 2
kernel = 2
stride = 2
padding = 1
[[node]]
id = "ap"
kind = "avg_pool2d"
kernel = 2
stride = 1
[[node]]
id = "head"
kind = "linear"
inputs = 2
outputs = 3
[[node]]
id = "loss"
kind = "softmax_cross_entropy"
[[edge]]
from = "image"
to = "conv"
[[edge]]
from = "conv"
to = "mp"
[[edge]]
from = "mp"
to = "conv2"
[[edge]]
from = "conv2"
to = "ap"
[[edge]]
from = "ap"
to = "head"
[[edge]]
from = "head"
to = "loss"
[[edge]]
from = "label"
to = "loss"
"#;

const CONV: u32 = 0;
const MAX_POOL: u32 = 1;
const CONV2: u32 = 2;
const AVG_POOL: u32 = 3;
const BATCH: usize = 2;
const EPS: f32 = 1e-2;

fn graph() -> ValidGraph {
    ModelGraph::parse_valid(GRAPH).unwrap()
}

fn vnode(node: &ValidNode) -> VNode {
    sgd_vnode(node, 3)
}

/// Train forward and backward of `v` on `x` with upstream gradient `g`: (output, input gradient).
fn train_step(v: &mut VNode, node: &ValidNode, x: &[f32], g: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let x = HostTensor::f32(vec![BATCH, node.input_width(0)], x.to_vec());
    let out = v.handle(Inbound::Forward { mb: 0, phase: Phase::Train, port: 0, tensor: x }).unwrap();
    let [Outbound::Forward { tensor: y, .. }] = out.as_slice() else { panic!("{out:?}") };
    let y = f32s(y);
    let g = HostTensor::f32(vec![BATCH, node.output_width], g.to_vec());
    let out = v.handle(Inbound::Backward { mb: 0, from: node.consumers[0], tensor: g }).unwrap();
    let dx = out.iter().find_map(|o| match o {
        Outbound::Backward { tensor, .. } => Some(f32s(tensor)),
        _ => None,
    });
    (y, dx.unwrap_or_default())
}

fn eval(v: &mut VNode, node: &ValidNode, mb: u64, x: Vec<f32>) -> Vec<f32> {
    let tensor = HostTensor::f32(vec![BATCH, node.input_width(0)], x);
    let out = v.handle(Inbound::Forward { mb, phase: Phase::Eval, port: 0, tensor }).unwrap();
    let [Outbound::Forward { tensor, .. }] = out.as_slice() else { panic!("{out:?}") };
    f32s(tensor)
}

/// Central differences of sum(forward(x) · g) over each element of `x`.
fn numeric(node: &ValidNode, x: &[f32], g: &[f32]) -> Vec<f64> {
    let mut v = vnode(node);
    let mut mb = 0;
    let mut f = |x: Vec<f32>| -> f64 {
        mb += 1;
        eval(&mut v, node, mb, x).iter().zip(g).map(|(&y, &g)| y as f64 * g as f64).sum()
    };
    (0..x.len())
        .map(|i| {
            let (mut plus, mut minus) = (x.to_vec(), x.to_vec());
            plus[i] += EPS;
            minus[i] -= EPS;
            (f(plus) - f(minus)) / (x[i] as f64 + EPS as f64 - (x[i] as f64 - EPS as f64))
        })
        .collect()
}

/// Direct convolution in f64: input [c, h, w] per row, filters [o, c, k, k], bias [o].
fn conv_f64(node: &ValidNode, x: &[f32], filters: &[f32], bias: &[f32]) -> Vec<f64> {
    let NodeKind::Conv2d { channels, kernel, stride, padding, input: [c, h, w] } = node.kind else { panic!() };
    let [_, oh, ow] = node.output_shape.unwrap();
    let mut y = vec![0.0f64; BATCH * channels * oh * ow];
    for n in 0..BATCH {
        for o in 0..channels {
            for r in 0..oh {
                for q in 0..ow {
                    let mut acc = bias[o] as f64;
                    for ch in 0..c {
                        for i in 0..kernel {
                            for j in 0..kernel {
                                let (yy, xx) = (
                                    (r * stride + i) as isize - padding as isize,
                                    (q * stride + j) as isize - padding as isize,
                                );
                                if yy < 0 || xx < 0 || yy >= h as isize || xx >= w as isize {
                                    continue;
                                }
                                let v = x[n * c * h * w + ch * h * w + yy as usize * w + xx as usize] as f64;
                                acc += v * filters[((o * c + ch) * kernel + i) * kernel + j] as f64;
                            }
                        }
                    }
                    y[((n * channels + o) * oh + r) * ow + q] = acc;
                }
            }
        }
    }
    y
}

#[test]
fn conv2d_matches_a_direct_convolution_and_its_gradients_match_finite_differences() {
    let g = graph();
    for id in [CONV, CONV2] {
        let node = &g.nodes[id as usize];
        let mut rng = ChaCha8Rng::seed_from_u64(id as u64);
        let x = random(&mut rng, BATCH * node.input_width(0), -1.0, 1.0);
        let gy = random(&mut rng, BATCH * node.output_width, -1.0, 1.0);
        let mut v = vnode(node);
        let before = v.params();
        let (filters, bias) = (f32s(&before[0]), f32s(&before[1]));
        let (y, dx) = train_step(&mut v, node, &x, &gy);
        assert_close(&format!("{} forward", node.name), &y, &conv_f64(node, &x, &filters, &bias));
        if node.sends_gradient(0) {
            assert_close(&format!("{} input gradient", node.name), &dx, &numeric(node, &x, &gy));
        } else {
            assert!(dx.is_empty(), "a node fed by data sends no gradient");
        }
        // SGD with lr 1: the change of each filter weight is its gradient, which is linear in the
        // weights' coefficient: d/dw sum(y·g) = sum(y(w + e_i)·g) - sum(y(w)·g) exactly.
        let after = v.params();
        let dw: Vec<f32> = filters.iter().zip(f32s(&after[0])).map(|(b, a)| b - a).collect();
        let base: f64 = conv_f64(node, &x, &filters, &bias).iter().zip(&gy).map(|(y, g)| y * *g as f64).sum();
        let want: Vec<f64> = (0..filters.len())
            .map(|i| {
                let mut f = filters.clone();
                f[i] += 1.0;
                conv_f64(node, &x, &f, &bias).iter().zip(&gy).map(|(y, g)| y * *g as f64).sum::<f64>() - base
            })
            .collect();
        assert_close(&format!("{} filter gradient", node.name), &dw, &want);
        let db: Vec<f32> = bias.iter().zip(f32s(&after[1])).map(|(b, a)| b - a).collect();
        let [_, oh, ow] = node.output_shape.unwrap();
        let channels = db.len();
        let want: Vec<f64> = (0..channels)
            .map(|o| {
                (0..BATCH)
                    .flat_map(|n| (0..oh * ow).map(move |p| (n, p)))
                    .map(|(n, p)| gy[(n * channels + o) * oh * ow + p] as f64)
                    .sum()
            })
            .collect();
        assert_close(&format!("{} bias gradient", node.name), &db, &want);
    }
}

#[test]
fn pooling_gradients_match_finite_differences() {
    let g = graph();
    for id in [MAX_POOL, AVG_POOL] {
        let node = &g.nodes[id as usize];
        let mut rng = ChaCha8Rng::seed_from_u64(10 + id as u64);
        // Distinct values at least 0.05 apart, so a max never changes hands within ±EPS.
        let n = BATCH * node.input_width(0);
        let mut x: Vec<f32> = (0..n).map(|i| i as f32 * 0.05 - 1.0).collect();
        for i in (1..n).rev() {
            x.swap(i, rng.random_range(0..=i));
        }
        let gy = random(&mut rng, BATCH * node.output_width, -1.0, 1.0);
        let (y, dx) = train_step(&mut vnode(node), node, &x, &gy);
        assert_eq!(y.len(), BATCH * node.output_width);
        assert_close(&format!("{} input gradient", node.name), &dx, &numeric(node, &x, &gy));
    }
}

#[test]
fn shapes_follow_the_windows() {
    let g = graph();
    let shapes: Vec<_> = g.nodes.iter().map(|n| (n.name.as_str(), n.output_shape, n.output_width)).collect();
    assert_eq!(shapes[CONV as usize], ("conv", Some([3, 6, 6]), 108));
    assert_eq!(shapes[MAX_POOL as usize], ("mp", Some([3, 3, 3]), 27));
    assert_eq!(shapes[CONV2 as usize], ("conv2", Some([2, 2, 2]), 8));
    assert_eq!(shapes[AVG_POOL as usize], ("ap", Some([2, 1, 1]), 2));
}

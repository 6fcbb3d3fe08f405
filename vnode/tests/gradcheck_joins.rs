//! Gradient checks of the kinds beyond a plain chain (layer_norm, dropout, add, concat), driven
//! through the public VNode API: finite differences for input gradients, an f64 host formula
//! for layer_norm's parameter gradients, and dropout's mask from the job's seed streams.

mod common;

use common::{assert_close, f32s, random, sgd_vnode};
use dcnr_model::graph::{Source, ValidGraph, ValidNode};
use dcnr_model::{ModelGraph, NodeKind};
use dcnr_vnode::{HostTensor, Inbound, Outbound, Phase, VNode};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// image(4) -> fc0 linear(4,6) -> ln -> drop -> fc1 linear(6,6) -> sum = add(fc1, fc0)
/// -> cat = concat(sum, ln) -> fc2 linear(12,3) -> loss. Every new node is fed by nodes only,
/// so each sends a gradient to every input.
const GRAPH: &str = r#"
[model]
name = "gradcheck-joins"
seed = 5
[data]
dataset = "synthetic"
feature_size = 4
classes = 3
[training]
batch_size = 4
[optimizer]
kind = "sgd"
lr = 1.0
[[node]]
id = "fc0"
kind = "linear"
inputs = 4
outputs = 6
[[node]]
id = "ln"
kind = "layer_norm"
inputs = 6
[[node]]
id = "drop"
kind = "dropout"
rate = 0.5
[[node]]
id = "fc1"
kind = "linear"
inputs = 6
outputs = 6
[[node]]
id = "sum"
kind = "add"
[[node]]
id = "cat"
kind = "concat"
[[node]]
id = "fc2"
kind = "linear"
inputs = 12
outputs = 3
[[node]]
id = "loss"
kind = "softmax_cross_entropy"
[[edge]]
from = "image"
to = "fc0"
[[edge]]
from = "fc0"
to = "ln"
[[edge]]
from = "ln"
to = "drop"
[[edge]]
from = "drop"
to = "fc1"
[[edge]]
from = "fc1"
to = "sum"
[[edge]]
from = "fc0"
to = "sum"
[[edge]]
from = "sum"
to = "cat"
[[edge]]
from = "ln"
to = "cat"
[[edge]]
from = "cat"
to = "fc2"
[[edge]]
from = "fc2"
to = "loss"
[[edge]]
from = "label"
to = "loss"
"#;

const LN: u32 = 1;
const DROP: u32 = 2;
const SUM: u32 = 4;
const CAT: u32 = 5;
const BATCH: usize = 4;
const EPS: f32 = 1e-2;

fn graph() -> ValidGraph {
    ModelGraph::parse_valid(GRAPH).unwrap()
}

fn vnode(node: &ValidNode) -> VNode {
    sgd_vnode(node, 5)
}

/// One training step of a non-loss VNode at micro-batch `mb` (a fresh VNode takes them in
/// order): its output and the gradient it sends back on each input port. The first consumer
/// sends `g`, any others zeros, so the gradient of the output is `g`.
fn train_step(
    v: &mut VNode,
    node: &ValidNode,
    mb: u64,
    xs: &[HostTensor],
    g: &HostTensor,
) -> (HostTensor, Vec<HostTensor>) {
    let mut outs = Vec::new();
    for (port, x) in xs.iter().enumerate() {
        outs = v.handle(Inbound::Forward { mb, phase: Phase::Train, port: port as u32, tensor: x.clone() }).unwrap();
    }
    let [Outbound::Forward { phase: Phase::Train, tensor: y, .. }, ..] = outs.as_slice() else {
        panic!("expected a forward, got {outs:?}")
    };
    let y = y.clone();
    let mut dxs: Vec<Option<HostTensor>> = vec![None; xs.len()];
    for (i, &c) in node.consumers.iter().enumerate() {
        let tensor = if i == 0 { g.clone() } else { HostTensor::f32(g.shape.clone(), vec![0.0; g.numel()]) };
        let out = v.handle(Inbound::Backward { mb, from: c, tensor }).unwrap();
        if i + 1 < node.consumers.len() {
            assert!(out.is_empty(), "{out:?}");
            continue;
        }
        for o in out {
            match o {
                Outbound::Backward { from: (id, port), tensor, to, .. } => {
                    assert_eq!(id, node.id);
                    assert_eq!(Source::Node(to), node.inputs[port as usize]);
                    dxs[port as usize] = Some(tensor);
                }
                Outbound::Done { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    (y, dxs.into_iter().map(|d| d.expect("a gradient for every input")).collect())
}

/// Eval forward of `v` on `xs` as micro-batch `mb`.
fn eval(v: &mut VNode, mb: u64, xs: &[HostTensor]) -> Vec<f32> {
    let mut out = Vec::new();
    for (port, x) in xs.iter().enumerate() {
        out = v.handle(Inbound::Forward { mb, phase: Phase::Eval, port: port as u32, tensor: x.clone() }).unwrap();
    }
    let [Outbound::Forward { phase: Phase::Eval, tensor, .. }, ..] = out.as_slice() else {
        panic!("expected an eval forward, got {out:?}")
    };
    f32s(tensor)
}

/// Central differences of f = sum(forward(xs) * g) with respect to input `port`; the forward
/// is run in eval by a fresh VNode.
fn numeric_input_grad(node: &ValidNode, xs: &[HostTensor], port: usize, g: &[f32]) -> Vec<f64> {
    let mut v = vnode(node);
    let mut mb = 0;
    let mut f = |xs: Vec<HostTensor>| -> f64 {
        mb += 1;
        eval(&mut v, mb, &xs).iter().zip(g).map(|(&y, &g)| y as f64 * g as f64).sum()
    };
    let x = f32s(&xs[port]);
    (0..x.len())
        .map(|i| {
            let (mut plus, mut minus) = (x.clone(), x.clone());
            plus[i] += EPS;
            minus[i] -= EPS;
            let h = plus[i] as f64 - minus[i] as f64;
            let with = |values: Vec<f32>| {
                let mut all = xs.to_vec();
                all[port] = HostTensor::f32(xs[port].shape.clone(), values);
                all
            };
            (f(with(plus)) - f(with(minus))) / h
        })
        .collect()
}

/// Random inputs of node `id`, one per port, at the widths validation gave them.
fn inputs_of(node: &ValidNode, rng: &mut ChaCha8Rng) -> Vec<HostTensor> {
    node.input_widths.iter().map(|&w| HostTensor::f32(vec![BATCH, w], random(rng, BATCH * w, -2.0, 2.0))).collect()
}

/// Every input gradient of node `id` against finite differences; the eval forward equals the
/// training forward (no dropout here).
fn check_input_gradients(id: u32, seed: u64) {
    let g = graph();
    let node = &g.nodes[id as usize];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for _ in 0..3 {
        let xs = inputs_of(node, &mut rng);
        let gy = random(&mut rng, BATCH * node.output_width, -1.0, 1.0);
        let (y, dxs) =
            train_step(&mut vnode(node), node, 0, &xs, &HostTensor::f32(vec![BATCH, node.output_width], gy.clone()));
        assert_eq!(f32s(&y), eval(&mut vnode(node), 0, &xs));
        for (port, dx) in dxs.iter().enumerate() {
            assert_eq!(dx.shape, xs[port].shape);
            let want = numeric_input_grad(node, &xs, port, &gy);
            assert_close(&format!("{} port {port}", node.name), &f32s(dx), &want);
        }
    }
}

#[test]
fn layer_norm_input_gradient_matches_finite_differences() {
    check_input_gradients(LN, 1);
}

#[test]
fn add_input_gradients_match_finite_differences() {
    check_input_gradients(SUM, 2);
}

#[test]
fn concat_input_gradients_match_finite_differences() {
    check_input_gradients(CAT, 3);
}

#[test]
fn layer_norm_normalises_and_its_parameter_gradients_equal_the_sgd_step() {
    let g = graph();
    let node = &g.nodes[LN as usize];
    let NodeKind::LayerNorm { width } = node.kind else { panic!("{:?}", node.kind) };
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let x = random(&mut rng, BATCH * width, -3.0, 3.0);
    let gy = random(&mut rng, BATCH * width, -1.0, 1.0);
    let mut v = vnode(node);
    let before = v.params();
    assert_eq!(f32s(&before[0]), vec![1.0; width], "scale starts at 1");
    assert_eq!(f32s(&before[1]), vec![0.0; width], "shift starts at 0");
    let (y, _) = train_step(
        &mut v,
        node,
        0,
        &[HostTensor::f32(vec![BATCH, width], x.clone())],
        &HostTensor::f32(vec![BATCH, width], gy.clone()),
    );
    // The normalised rows, in f64: mean 0, variance 1 (up to ε), and d/dscale = Σ xhat·g,
    // d/dshift = Σ g over the batch.
    let mut xhat = vec![0.0f64; BATCH * width];
    for r in 0..BATCH {
        let row = &x[r * width..(r + 1) * width];
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / width as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / width as f64;
        for (c, &v) in row.iter().enumerate() {
            xhat[r * width + c] = (v as f64 - mean) / (var + 1e-5).sqrt();
        }
    }
    assert_close("layer_norm output", &f32s(&y), &xhat);
    let after = v.params();
    let dscale: Vec<f32> = f32s(&before[0]).iter().zip(f32s(&after[0])).map(|(b, a)| b - a).collect();
    let dshift: Vec<f32> = f32s(&before[1]).iter().zip(f32s(&after[1])).map(|(b, a)| b - a).collect();
    let want_scale: Vec<f64> =
        (0..width).map(|c| (0..BATCH).map(|r| xhat[r * width + c] * gy[r * width + c] as f64).sum()).collect();
    let want_shift: Vec<f64> = (0..width).map(|c| (0..BATCH).map(|r| gy[r * width + c] as f64).sum()).collect();
    assert_close("layer_norm scale gradient", &dscale, &want_scale);
    assert_close("layer_norm shift gradient", &dshift, &want_shift);
}

#[test]
fn dropout_masks_come_from_the_seed_and_gradients_pass_through_the_mask() {
    let g = graph();
    let node = &g.nodes[DROP as usize];
    assert_eq!(node.kind, NodeKind::Dropout { rate: 0.5 });
    let width = node.output_width;
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    // No zeros in x, so the mask can be read back as y / x.
    let x: Vec<f32> = random(&mut rng, BATCH * width, 0.5, 2.0);
    let gy = random(&mut rng, BATCH * width, -1.0, 1.0);
    let xs = [HostTensor::f32(vec![BATCH, width], x.clone())];
    let gt = HostTensor::f32(vec![BATCH, width], gy.clone());
    let mut v = vnode(node);
    let (y0, dx0) = train_step(&mut v, node, 0, &xs, &gt);
    let (y1, _) = train_step(&mut v, node, 1, &xs, &gt);
    let mask: Vec<f32> = f32s(&y0).iter().zip(&x).map(|(y, x)| y / x).collect();
    assert!(mask.iter().all(|m| *m == 0.0 || (*m - 2.0).abs() < 1e-6), "{mask:?}");
    let dropped = mask.iter().filter(|m| **m == 0.0).count();
    assert!((3..=21).contains(&dropped), "{dropped} of 24 dropped at rate 0.5");
    // The gradient is the upstream gradient through the same mask.
    let want: Vec<f64> = gy.iter().zip(&mask).map(|(g, m)| (*g * *m) as f64).collect();
    assert_close("dropout input gradient", &f32s(&dx0[0]), &want);
    // Another step draws another mask; the same step on another VNode the same one.
    assert_ne!(f32s(&y0), f32s(&y1));
    let (again, _) = train_step(&mut vnode(node), node, 0, &xs, &gt);
    assert_eq!(f32s(&again), f32s(&y0));
    // Evaluation is the identity.
    assert_eq!(eval(&mut vnode(node), 0, &xs), x);
}

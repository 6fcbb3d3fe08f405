//! VNode math on a GPU through burn-wgpu (feature `gpu`). In CI the GPU is Mesa's lavapipe, a
//! software Vulkan, so these run without one. Results on a GPU are compared with the host's
//! within rounding, and with themselves bit for bit: reproducibility holds within one adapter
//! and driver, not across devices.
#![cfg(feature = "gpu")]

use dcnr_model::graph::ValidGraph;
use dcnr_model::{ModelGraph, NodeKind};
use dcnr_vnode::gpu::{Gpu, adapters};
use dcnr_vnode::kernels::Matrix;
use dcnr_vnode::layer::{self, Pass};
use dcnr_vnode::reference::Reference;
use dcnr_vnode::{Compute, HostTensor, VNode, VNodeSpec, memory};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

fn gpu() -> Gpu {
    let found = adapters();
    let adapter = found.first().cloned().expect("no GPU adapter: install mesa-vulkan-drivers (lavapipe)");
    Gpu::open(adapter)
}

fn random(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Matrix {
    Matrix::new(rows, cols, (0..rows * cols).map(|_| rng.random_range(-1.0f32..1.0)).collect()).unwrap()
}

/// Within 0.1% of the largest value: a GPU's erf, tanh and exp are approximations of their own
/// (burn's gelu gradient on lavapipe is 0.4% off the host's at worst seen).
fn assert_near(what: &str, got: &Matrix, want: &Matrix) {
    assert_eq!((got.rows(), got.cols()), (want.rows(), want.cols()), "{what}: shape");
    let scale = want.data().iter().fold(1.0f32, |m, w| m.max(w.abs()));
    for (i, (g, w)) in got.data().iter().zip(want.data()).enumerate() {
        assert!((g - w).abs() <= 1e-3 * scale, "{what}[{i}]: gpu {g}, host {w}");
    }
}

/// (rows, cols) of each parameter tensor.
type Shapes = Vec<(usize, usize)>;

/// Every kind's forward and backward on the GPU against the host kernels.
#[test]
fn every_kind_on_the_gpu_agrees_with_the_host_within_rounding() {
    let gpu = Compute::Gpu(gpu());
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let pass = Pass::Train { root_seed: 3, origin: 1, pipeline: 0, step: 7 };
    let rows = 4;
    // (kind, input width, parameter shapes)
    let cases: Vec<(NodeKind, usize, Shapes)> = vec![
        (NodeKind::Linear { inputs: 6, outputs: 5 }, 6, vec![(6, 5), (1, 5)]),
        (NodeKind::Relu, 6, vec![]),
        (NodeKind::Tanh, 6, vec![]),
        (NodeKind::Gelu, 6, vec![]),
        (NodeKind::LayerNorm { width: 6 }, 6, vec![(1, 6), (1, 6)]),
        (NodeKind::Dropout { rate: 0.5 }, 6, vec![]),
        (NodeKind::Add, 6, vec![]),
        (NodeKind::Concat, 6, vec![]),
        (
            NodeKind::Conv2d { channels: 2, kernel: 3, stride: 1, padding: 1, input: [1, 4, 4] },
            16,
            vec![(2, 9), (1, 2)],
        ),
        (NodeKind::MaxPool2d { kernel: 2, stride: 2, input: [2, 4, 4] }, 32, vec![]),
        (NodeKind::AvgPool2d { kernel: 2, stride: 2, input: [2, 4, 4] }, 32, vec![]),
    ];
    for (kind, width, shapes) in cases {
        let what = kind.name();
        let params: Vec<Arc<Matrix>> = shapes.iter().map(|&(r, c)| Arc::new(random(&mut rng, r, c))).collect();
        let inputs: Vec<Matrix> = (0..kind.ports().len()).map(|_| random(&mut rng, rows, width)).collect();
        let want_dx = vec![true; inputs.len()];
        let run = |compute: &Compute| {
            let f = layer::forward(compute, kind, &params, inputs.clone(), pass, &want_dx).unwrap();
            let g = random(&mut ChaCha8Rng::seed_from_u64(9), f.output.rows(), f.output.cols());
            let (grads, dxs) = layer::backward(kind, &params, f.kept, g, &want_dx).unwrap();
            (f.output, grads, dxs)
        };
        let (y, grads, dxs) = run(&gpu);
        let (hy, hgrads, hdxs) = run(&Compute::Host);
        assert_near(&format!("{what} output"), &y, &hy);
        assert_eq!(grads.len(), hgrads.len(), "{what}");
        for (i, (g, h)) in grads.iter().zip(&hgrads).enumerate() {
            assert_near(&format!("{what} parameter gradient {i}"), g, h);
        }
        assert_eq!(dxs.len(), hdxs.len(), "{what}");
        for (port, (d, h)) in dxs.iter().zip(&hdxs).enumerate() {
            assert_near(&format!("{what} input gradient {port}"), d.as_ref().unwrap(), h.as_ref().unwrap());
        }
    }
    assert!(gpu.on_gpu(), "the GPU failed: {:?}", gpu.failure());
}

const GRAPH: &str = r#"
[model]
name = "gpu-small"
seed = 3
[data]
dataset = "synthetic"
feature_size = 6
classes = 3
[training]
batch_size = 5
[optimizer]
kind = "adamw"
lr = 0.01
weight_decay = 0.01
[[node]]
id = "stem"
kind = "linear"
inputs = 6
outputs = 8
[[node]]
id = "act"
kind = "gelu"
[[node]]
id = "norm"
kind = "layer_norm"
inputs = 8
[[node]]
id = "fc"
kind = "linear"
inputs = 8
outputs = 8
[[node]]
id = "drop"
kind = "dropout"
rate = 0.25
[[node]]
id = "res"
kind = "add"
[[node]]
id = "squash"
kind = "tanh"
[[node]]
id = "head"
kind = "linear"
inputs = 8
outputs = 3
[[node]]
id = "loss"
kind = "softmax_cross_entropy"
[[edge]]
from = "image"
to = "stem"
[[edge]]
from = "stem"
to = "act"
[[edge]]
from = "act"
to = "norm"
[[edge]]
from = "norm"
to = "fc"
[[edge]]
from = "fc"
to = "drop"
[[edge]]
from = "act"
to = "res"
[[edge]]
from = "drop"
to = "res"
[[edge]]
from = "res"
to = "squash"
[[edge]]
from = "squash"
to = "head"
[[edge]]
from = "head"
to = "loss"
[[edge]]
from = "label"
to = "loss"
"#;

fn graph() -> ValidGraph {
    ModelGraph::parse_valid(GRAPH).unwrap()
}

fn batch(step: u64, _pipeline: u32) -> (HostTensor, HostTensor) {
    let mut rng = ChaCha8Rng::seed_from_u64(1000 + step);
    let x: Vec<f32> = (0..30).map(|_| rng.random_range(-1.0..1.0)).collect();
    let y: Vec<i32> = (0..5).map(|_| rng.random_range(0..3)).collect();
    (HostTensor::f32(vec![5, 6], x), HostTensor::i32(vec![5], y))
}

fn labels(t: &HostTensor) -> Vec<i32> {
    match &t.data {
        dcnr_vnode::HostData::I32(v) => v.clone(),
        _ => panic!("labels are i32"),
    }
}

/// The single-process trainer on `compute`: parameters after `steps`.
fn reference(g: &ValidGraph, compute: Compute, steps: u64) -> Vec<Vec<HostTensor>> {
    let mut r = Reference::new(g, g.spec.optimizer, 9).on(compute);
    for s in 0..steps {
        let (x, y) = batch(s, 0);
        let loss = r.train_step(&x, &labels(&y)).unwrap().loss;
        assert!(loss.is_finite(), "step {s}: loss {loss}");
    }
    r.params()
}

/// VNodes of `g`, every one computing on `compute`.
fn vnodes(g: &ValidGraph, compute: &Compute, in_flight: u32) -> Vec<VNode> {
    g.nodes
        .iter()
        .map(|n| {
            VNode::new(VNodeSpec {
                node: n.clone(),
                optimizer: g.spec.optimizer,
                recipe: g.spec.training.recipe(),
                root_seed: 9,
                in_flight,
                averaging: None,
                compute: compute.clone(),
            })
        })
        .collect()
}

/// Trains `nodes` in memory on `steps`; returns the losses.
fn train(g: &ValidGraph, nodes: &mut [VNode], steps: std::ops::Range<u64>, in_flight: u32) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(4 + steps.start);
    memory::train(g, nodes, steps, in_flight, batch, |n| rng.random_range(0..n)).unwrap()
}

/// VNodes of `g` in memory, every one computing on `compute`: parameters after `steps`.
fn mesh(g: &ValidGraph, compute: &Compute, steps: u64, in_flight: u32) -> Vec<Vec<HostTensor>> {
    let mut nodes = vnodes(g, compute, in_flight);
    train(g, &mut nodes, 0..steps, in_flight);
    nodes.iter().map(VNode::params).collect()
}

/// Within one adapter and driver, GPU training repeats bit for bit, and VNodes on the GPU
/// reproduce the single-process GPU trainer exactly, as VNodes on CPUs reproduce the CPU one.
#[test]
fn gpu_training_is_equal_to_itself_and_the_gpu_mesh_to_the_gpu_reference() {
    let g = graph();
    let gpu = Compute::Gpu(gpu());
    let first = reference(&g, gpu.clone(), 12);
    let again = reference(&g, gpu.clone(), 12);
    assert_eq!(first, again, "GPU training did not repeat bit for bit");
    assert_eq!(mesh(&g, &gpu, 12, 1), first, "GPU VNodes differ from the GPU reference");
    // Not the host's bits, but the same training within rounding.
    let host = reference(&g, Compute::Host, 12);
    for (node, (a, b)) in first.iter().zip(&host).enumerate() {
        for (x, y) in a.iter().zip(b) {
            let (x, y) = (x.as_f32().unwrap(), y.as_f32().unwrap());
            let err = x.iter().zip(y).fold(0.0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(err < 1e-3, "node {node}: GPU and host parameters differ by {err}");
        }
    }
    assert!(gpu.on_gpu(), "the GPU failed: {:?}", gpu.failure());
}

/// A GPU that fails between a forward and its backward: the backward redoes both passes on the
/// host, so the step's results are the host's exactly, and later passes stay on the host.
#[test]
fn a_gpu_that_fails_mid_step_hands_the_step_to_the_host() {
    let handle = gpu();
    let gpu = Compute::Gpu(handle.clone());
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let kind = NodeKind::Linear { inputs: 6, outputs: 4 };
    let params = vec![Arc::new(random(&mut rng, 6, 4)), Arc::new(random(&mut rng, 1, 4))];
    let x = random(&mut rng, 3, 6);
    let g = random(&mut rng, 3, 4);
    let pass = Pass::Train { root_seed: 1, origin: 0, pipeline: 0, step: 0 };
    let f = layer::forward(&gpu, kind, &params, vec![x.clone()], pass, &[true]).unwrap();
    handle.fail("a rehearsed device loss");
    assert!(!gpu.on_gpu());
    assert_eq!(gpu.failure(), Some("a rehearsed device loss"));
    let (grads, dxs) = layer::backward(kind, &params, f.kept, g.clone(), &[true]).unwrap();
    let h = layer::forward(&Compute::Host, kind, &params, vec![x.clone()], pass, &[true]).unwrap();
    let (hgrads, hdxs) = layer::backward(kind, &params, h.kept, g, &[true]).unwrap();
    assert_eq!(grads, hgrads);
    assert_eq!(dxs, hdxs);
    // The next forward runs on the host: the host's bits.
    let next = layer::forward(&gpu, kind, &params, vec![x.clone()], Pass::Eval, &[]).unwrap();
    let host = layer::forward(&Compute::Host, kind, &params, vec![x], Pass::Eval, &[]).unwrap();
    assert_eq!(next.output, host.output);
}

/// VNodes whose GPU fails part-way through training finish it on the host: every step is
/// taken, the loss stays finite, and a run that fails at the same step repeats bit for bit.
#[test]
fn vnodes_whose_gpu_fails_finish_training_on_the_host() {
    let g = graph();
    let run = |fail_at: u64| {
        let handle = gpu();
        let gpu = Compute::Gpu(handle.clone());
        let mut nodes = vnodes(&g, &gpu, 2);
        let mut losses = train(&g, &mut nodes, 0..fail_at, 2);
        handle.fail("a rehearsed device loss");
        losses.extend(train(&g, &mut nodes, fail_at..8, 2));
        assert!(!gpu.on_gpu());
        assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
        nodes.iter().map(VNode::params).collect::<Vec<_>>()
    };
    let failed = run(4);
    assert_eq!(failed, run(4), "a fallback at the same step did not repeat bit for bit");
    assert_ne!(failed, mesh(&g, &Compute::Gpu(gpu()), 8, 2), "steps after the failure ran on the GPU");
    // Failed before the first step: the host's bits.
    assert_eq!(run(0), mesh(&g, &Compute::Host, 8, 2));
}

//! Finite-difference gradient checks of every VNode kind (linear, relu, tanh, gelu, softmax cross-entropy), driven through the public VNode API.

mod common;

use common::{assert_close, f32s, random, sgd_vnode};
use dcnr_model::graph::{ValidGraph, ValidNode};
use dcnr_model::{ModelGraph, NodeKind};
use dcnr_vnode::{HostTensor, Inbound, Outbound, Phase, VNode};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// image(4) -> fc0 linear(4,5) -> act0 tanh -> fc1 linear(5,6) -> act1 relu -> fc2 linear(6,3)
/// -> loss; every node after fc0 is fed by another VNode, so it sends an input gradient back.
const GRAPH: &str = r#"
[model]
name = "gradcheck"
seed = 11
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
outputs = 5
[[node]]
id = "act0"
kind = "tanh"
[[node]]
id = "fc1"
kind = "linear"
inputs = 5
outputs = 6
[[node]]
id = "act1"
kind = "relu"
[[node]]
id = "fc2"
kind = "linear"
inputs = 6
outputs = 3
[[node]]
id = "loss"
kind = "softmax_cross_entropy"
[[edge]]
from = "image"
to = "fc0"
[[edge]]
from = "fc0"
to = "act0"
[[edge]]
from = "act0"
to = "fc1"
[[edge]]
from = "fc1"
to = "act1"
[[edge]]
from = "act1"
to = "fc2"
[[edge]]
from = "fc2"
to = "loss"
[[edge]]
from = "label"
to = "loss"
"#;

const FC0: u32 = 0;
const TANH: u32 = 1;
const LINEAR: u32 = 2;
const RELU: u32 = 3;
const LOSS: u32 = 5;
const SEED: u64 = 11;
const BATCH: usize = 4;
const EPS: f32 = 1e-2;

fn graph() -> ValidGraph {
    ModelGraph::parse_valid(GRAPH).unwrap()
}

fn vnode(node: &ValidNode) -> VNode {
    sgd_vnode(node, SEED)
}

/// Train forward then backward of one non-loss VNode with upstream gradient `g`: returns the
/// forward output and the input gradient it sends to its producer.
fn train_step(v: &mut VNode, node: &ValidNode, x: &HostTensor, g: &HostTensor) -> (HostTensor, HostTensor) {
    let out = v.handle(Inbound::Forward { mb: 0, phase: Phase::Train, port: 0, tensor: x.clone() }).unwrap();
    let [Outbound::Forward { to, port, mb: 0, phase: Phase::Train, tensor: y }] = out.as_slice() else {
        panic!("expected one forward, got {out:?}")
    };
    assert_eq!((*to, *port), node.consumers[0]);
    let out = v.handle(Inbound::Backward { mb: 0, from: node.consumers[0], tensor: g.clone() }).unwrap();
    let [Outbound::Backward { to, from, mb: 0, tensor: dx }, Outbound::Done { mb: 0, .. }] = out.as_slice() else {
        panic!("expected a backward and done, got {out:?}")
    };
    assert_eq!(*from, (node.id, 0));
    assert_eq!(
        Some(*to),
        node.inputs.first().and_then(|s| match s {
            dcnr_model::graph::Source::Node(p) => Some(*p),
            _ => None,
        })
    );
    assert_eq!(dx.shape, x.shape);
    (y.clone(), dx.clone())
}

/// Eval forward of `v` on `x` as micro-batch `mb`.
fn eval(v: &mut VNode, mb: u64, x: Vec<f32>, shape: &[usize]) -> Vec<f32> {
    let tensor = HostTensor::f32(shape.to_vec(), x);
    let out = v.handle(Inbound::Forward { mb, phase: Phase::Eval, port: 0, tensor }).unwrap();
    let [Outbound::Forward { mb: got, phase: Phase::Eval, tensor, .. }] = out.as_slice() else {
        panic!("expected one eval forward, got {out:?}")
    };
    assert_eq!(*got, mb);
    f32s(tensor)
}

/// Central differences of f(x) = sum(forward(x) * g), forward run by a fresh VNode in eval.
fn numeric_input_grad(node: &ValidNode, x: &[f32], shape: &[usize], g: &[f32]) -> Vec<f64> {
    let mut v = vnode(node);
    let mut mb = 0;
    let mut f = |x: Vec<f32>| -> f64 {
        mb += 1;
        eval(&mut v, mb, x, shape).iter().zip(g).map(|(&y, &g)| y as f64 * g as f64).sum()
    };
    (0..x.len())
        .map(|i| {
            let (mut plus, mut minus) = (x.to_vec(), x.to_vec());
            plus[i] += EPS;
            minus[i] -= EPS;
            // The actual step after rounding to f32.
            let h = plus[i] as f64 - minus[i] as f64;
            (f(plus) - f(minus)) / h
        })
        .collect()
}

/// Checks the input gradient of elementwise or linear node `id` on input `x`.
fn check_input_gradient(id: u32, x: Vec<f32>, rng: &mut ChaCha8Rng) {
    check_input_gradient_in(&graph(), id, x, rng)
}

/// [`check_input_gradient`] for node `id` of graph `g`.
fn check_input_gradient_in(g: &ValidGraph, id: u32, x: Vec<f32>, rng: &mut ChaCha8Rng) {
    let node = &g.nodes[id as usize];
    let inputs = x.len() / BATCH;
    let width = node.output_width;
    let gy = random(rng, BATCH * width, -1.0, 1.0);
    let xt = HostTensor::f32(vec![BATCH, inputs], x.clone());
    let mut v = vnode(node);
    let (y, dx) = train_step(&mut v, node, &xt, &HostTensor::f32(vec![BATCH, width], gy.clone()));
    // The recorded training forward and the eval forward agree.
    assert_eq!(f32s(&y), eval(&mut vnode(node), 0, x.clone(), &[BATCH, inputs]));
    let want = numeric_input_grad(node, &x, &[BATCH, inputs], &gy);
    assert_close(&format!("{} input gradient", node.name), &f32s(&dx), &want);
}

#[test]
fn tanh_input_gradient_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for _ in 0..3 {
        let x = random(&mut rng, BATCH * 5, -2.0, 2.0);
        check_input_gradient(TANH, x, &mut rng);
    }
}

#[test]
fn gelu_matches_its_formula_and_finite_differences() {
    // The same chain with a GELU where the tanh was.
    let g = ModelGraph::parse_valid(&GRAPH.replacen("kind = \"tanh\"", "kind = \"gelu\"", 1)).unwrap();
    let node = &g.nodes[TANH as usize];
    assert_eq!(node.kind, NodeKind::Gelu);
    // x·Φ(x): 0 at 0, about 0.8413 at 1 and -0.1587 at -1.
    let y = eval(&mut vnode(node), 0, vec![0.0, 1.0, -1.0, 3.0, -3.0], &[1, 5]);
    for (got, want) in y.iter().zip([0.0, 0.841_345, -0.158_655, 2.995_95, -0.004_05]) {
        assert!((got - want).abs() < 1e-4, "{y:?}");
    }
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for _ in 0..3 {
        let x = random(&mut rng, BATCH * 5, -3.0, 3.0);
        check_input_gradient_in(&g, TANH, x, &mut rng);
    }
}

#[test]
fn relu_input_gradient_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for _ in 0..3 {
        // Magnitudes of at least 0.1, ten steps away from the kink at 0.
        let x: Vec<f32> = (0..BATCH * 6)
            .map(|_| {
                let m = rng.random_range(0.1f32..2.0);
                if rng.random_range(0..2) == 0 { m } else { -m }
            })
            .collect();
        assert!(x.iter().any(|v| *v < 0.0) && x.iter().any(|v| *v > 0.0));
        check_input_gradient(RELU, x, &mut rng);
    }
}

#[test]
fn linear_input_gradient_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for _ in 0..3 {
        let x = random(&mut rng, BATCH * 5, -1.5, 1.5);
        check_input_gradient(LINEAR, x, &mut rng);
    }
}

/// Host forward of a linear node in f64: y = x W + b, W [inputs, outputs] row-major.
fn linear_f64(x: &[f32], w: &[f64], b: &[f64], inputs: usize, outputs: usize) -> Vec<f64> {
    let mut y = vec![0.0f64; BATCH * outputs];
    for r in 0..BATCH {
        for o in 0..outputs {
            y[r * outputs + o] = b[o] + (0..inputs).map(|i| x[r * inputs + i] as f64 * w[i * outputs + o]).sum::<f64>();
        }
    }
    y
}

#[test]
fn linear_parameter_gradient_equals_the_sgd_step() {
    let g = graph();
    let node = &g.nodes[LINEAR as usize];
    let NodeKind::Linear { inputs, outputs } = node.kind else { panic!("{:?}", node.kind) };
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let x = random(&mut rng, BATCH * inputs, -1.5, 1.5);
    let gy = random(&mut rng, BATCH * outputs, -1.0, 1.0);

    let mut v = vnode(node);
    let before = v.params();
    assert_eq!(before.len(), 2);
    assert_eq!(before[0].shape, [inputs, outputs]);
    assert_eq!(before[1].shape, [1, outputs]);
    // Same seed, same parameters: a fresh VNode for the same node starts identical.
    assert_eq!(vnode(node).params(), before);
    let (w, b) = (f32s(&before[0]), f32s(&before[1]));

    // The canonical layout is what the VNode computes with.
    let w64: Vec<f64> = w.iter().map(|&v| v as f64).collect();
    let b64: Vec<f64> = b.iter().map(|&v| v as f64).collect();
    let host = linear_f64(&x, &w64, &b64, inputs, outputs);
    let vn = eval(&mut vnode(node), 0, x.clone(), &[BATCH, inputs]);
    for (a, h) in vn.iter().zip(&host) {
        assert!((*a as f64 - h).abs() < 1e-5, "eval {a} vs host {h}");
    }

    let xt = HostTensor::f32(vec![BATCH, inputs], x.clone());
    train_step(&mut v, node, &xt, &HostTensor::f32(vec![BATCH, outputs], gy.clone()));
    assert_eq!(v.version(), 1);
    let after = v.params();
    // lr = 1, no momentum: gradient = before - after.
    let step =
        |b: &HostTensor, a: &HostTensor| -> Vec<f32> { f32s(b).iter().zip(f32s(a)).map(|(b, a)| b - a).collect() };
    let (dw, db) = (step(&before[0], &after[0]), step(&before[1], &after[1]));

    // Analytic: dW = x^T g, db = column sums of g.
    let mut dw_exact = vec![0.0f64; inputs * outputs];
    for r in 0..BATCH {
        for i in 0..inputs {
            for o in 0..outputs {
                dw_exact[i * outputs + o] += x[r * inputs + i] as f64 * gy[r * outputs + o] as f64;
            }
        }
    }
    let db_exact: Vec<f64> = (0..outputs).map(|o| (0..BATCH).map(|r| gy[r * outputs + o] as f64).sum()).collect();
    assert_close("linear dW (analytic)", &dw, &dw_exact);
    assert_close("linear db (analytic)", &db, &db_exact);

    // Numeric: central differences of f(W, b) = sum((x W + b) * g) on the host forward.
    let f = |w: &[f64], b: &[f64]| -> f64 {
        linear_f64(&x, w, b, inputs, outputs).iter().zip(&gy).map(|(y, g)| y * *g as f64).sum()
    };
    let h = EPS as f64;
    let dw_num: Vec<f64> = (0..w64.len())
        .map(|i| {
            let (mut p, mut m) = (w64.clone(), w64.clone());
            p[i] += h;
            m[i] -= h;
            (f(&p, &b64) - f(&m, &b64)) / (2.0 * h)
        })
        .collect();
    let db_num: Vec<f64> = (0..b64.len())
        .map(|i| {
            let (mut p, mut m) = (b64.clone(), b64.clone());
            p[i] += h;
            m[i] -= h;
            (f(&w64, &p) - f(&w64, &m)) / (2.0 * h)
        })
        .collect();
    assert_close("linear dW (numeric)", &dw, &dw_num);
    assert_close("linear db (numeric)", &db, &db_num);
}

/// The loss VNode's (loss, logits gradient) for `logits` and `labels` in training.
fn loss_train(node: &ValidNode, logits: &[f32], labels: &[i32]) -> (f32, Vec<f32>) {
    let NodeKind::SoftmaxCrossEntropy { classes } = node.kind else { panic!("{:?}", node.kind) };
    let mut v = vnode(node);
    let lt = HostTensor::f32(vec![BATCH, classes], logits.to_vec());
    let out = v.handle(Inbound::Forward { mb: 0, phase: Phase::Train, port: 0, tensor: lt }).unwrap();
    assert!(out.is_empty(), "{out:?}");
    let yt = HostTensor::i32(vec![BATCH], labels.to_vec());
    let out = v.handle(Inbound::Forward { mb: 0, phase: Phase::Train, port: 1, tensor: yt }).unwrap();
    let [
        Outbound::Loss { mb: 0, phase: Phase::Train, loss, count, .. },
        Outbound::Backward { to, from, mb: 0, tensor: dx },
        Outbound::Done { mb: 0, .. },
    ] = out.as_slice()
    else {
        panic!("expected loss, backward, done; got {out:?}")
    };
    assert_eq!(*count as usize, BATCH);
    assert_eq!((*to, *from), (LOSS - 1, (LOSS, 0)));
    assert_eq!(dx.shape, [BATCH, classes]);
    (*loss, f32s(dx))
}

/// The loss a fresh loss VNode reports in eval.
fn loss_eval(v: &mut VNode, mb: u64, logits: Vec<f32>, labels: &[i32], classes: usize) -> f32 {
    let lt = HostTensor::f32(vec![BATCH, classes], logits);
    assert!(v.handle(Inbound::Forward { mb, phase: Phase::Eval, port: 0, tensor: lt }).unwrap().is_empty());
    let yt = HostTensor::i32(vec![BATCH], labels.to_vec());
    let out = v.handle(Inbound::Forward { mb, phase: Phase::Eval, port: 1, tensor: yt }).unwrap();
    let [Outbound::Loss { mb: got, phase: Phase::Eval, loss, .. }] = out.as_slice() else {
        panic!("expected one eval loss, got {out:?}")
    };
    assert_eq!(*got, mb);
    *loss
}

#[test]
fn loss_input_gradient_matches_finite_differences_of_mean_cross_entropy() {
    let g = graph();
    let node = &g.nodes[LOSS as usize];
    let NodeKind::SoftmaxCrossEntropy { classes } = node.kind else { panic!("{:?}", node.kind) };
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for round in 0..3 {
        let logits = random(&mut rng, BATCH * classes, -3.0, 3.0);
        let labels: Vec<i32> = (0..BATCH).map(|_| rng.random_range(0..classes as i32)).collect();
        let (loss, dx) = loss_train(node, &logits, &labels);

        // Exact mean cross-entropy and its gradient (softmax - one_hot) / batch, in f64.
        let mut exact_loss = 0.0f64;
        let mut exact = vec![0.0f64; BATCH * classes];
        for r in 0..BATCH {
            let row: Vec<f64> = logits[r * classes..(r + 1) * classes].iter().map(|&v| v as f64).collect();
            let m = row.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = row.iter().map(|v| (v - m).exp()).sum();
            exact_loss += (z.ln() + m - row[labels[r] as usize]) / BATCH as f64;
            for c in 0..classes {
                let p = (row[c] - m).exp() / z;
                exact[r * classes + c] = (p - if c as i32 == labels[r] { 1.0 } else { 0.0 }) / BATCH as f64;
            }
        }
        assert!((loss as f64 - exact_loss).abs() < 1e-5, "round {round}: loss {loss} vs {exact_loss}");
        assert_close(&format!("round {round}: loss gradient (analytic)"), &dx, &exact);

        let mut v = vnode(node);
        let mut mb = 0;
        let numeric: Vec<f64> = (0..logits.len())
            .map(|i| {
                let (mut plus, mut minus) = (logits.clone(), logits.clone());
                plus[i] += EPS;
                minus[i] -= EPS;
                let h = plus[i] as f64 - minus[i] as f64;
                mb += 2;
                let lp = loss_eval(&mut v, mb, plus, &labels, classes) as f64;
                let lm = loss_eval(&mut v, mb + 1, minus, &labels, classes) as f64;
                (lp - lm) / h
            })
            .collect();
        assert_close(&format!("round {round}: loss gradient (numeric)"), &dx, &numeric);
        // Each row of the gradient sums to zero (softmax minus a one-hot, both summing to one).
        for r in 0..BATCH {
            let s: f32 = dx[r * classes..(r + 1) * classes].iter().sum();
            assert!(s.abs() < 1e-6, "row {r} sums to {s}");
        }
    }
}

/// Delivers messages among the VNodes `nodes` (indexed by id; `None` for ids outside the
/// sub-graph) until none is left; returns the gradients sent to ids outside and the losses.
fn route(nodes: &mut [Option<VNode>], mut queue: Vec<(u32, Inbound)>) -> (Vec<(u32, HostTensor)>, Vec<f32>) {
    let (mut outside, mut losses) = (Vec::new(), Vec::new());
    while !queue.is_empty() {
        let (to, msg) = queue.remove(0);
        let v = nodes[to as usize].as_mut().unwrap();
        for out in v.handle(msg).unwrap() {
            match out {
                Outbound::Forward { to, port, mb, phase, tensor } => {
                    queue.push((to, Inbound::Forward { mb, phase, port, tensor }))
                }
                Outbound::Backward { to, from, mb, tensor } => {
                    if nodes[to as usize].is_some() {
                        queue.push((to, Inbound::Backward { mb, from, tensor }))
                    } else {
                        outside.push((to, tensor))
                    }
                }
                Outbound::Loss { loss, .. } => losses.push(loss),
                Outbound::Done { .. } | Outbound::Sync { .. } | Outbound::Predictions { .. } => {}
            }
        }
    }
    (outside, losses)
}

#[test]
fn chained_vnodes_backpropagate_the_gradient_of_the_loss() {
    // act0 -> fc1 -> act1 -> fc2 -> loss as a mesh of VNodes: the gradient they send back to fc0
    // is d(mean loss)/d(fc0 output), checked against finite differences of the eval loss.
    let g = graph();
    let classes = 3;
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let x = random(&mut rng, BATCH * 5, -1.5, 1.5);
    let labels: Vec<i32> = (0..BATCH).map(|_| rng.random_range(0..classes)).collect();
    let mesh = || -> Vec<Option<VNode>> { g.nodes.iter().map(|n| (n.id != FC0).then(|| vnode(n))).collect() };
    let feed = |mb: u64, phase: Phase, x: Vec<f32>| {
        vec![
            (TANH, Inbound::Forward { mb, phase, port: 0, tensor: HostTensor::f32(vec![BATCH, 5], x) }),
            (LOSS, Inbound::Forward { mb, phase, port: 1, tensor: HostTensor::i32(vec![BATCH], labels.clone()) }),
        ]
    };
    // Precondition: the relu's inputs stay clear of 0 under perturbations of size EPS.
    let mut mb = 0;
    let h = eval(&mut vnode(&g.nodes[TANH as usize]), mb, x.clone(), &[BATCH, 5]);
    let pre_relu = eval(&mut vnode(&g.nodes[LINEAR as usize]), mb, h, &[BATCH, 5]);
    assert!(pre_relu.iter().all(|v| v.abs() > 0.05), "pick another seed: {pre_relu:?}");

    let mut train = mesh();
    let (outside, losses) = route(&mut train, feed(0, Phase::Train, x.clone()));
    let [(to, dx)] = outside.as_slice() else { panic!("expected one gradient for fc0, got {outside:?}") };
    assert_eq!(*to, FC0);
    assert_eq!(losses.len(), 1);

    let mut evalm = mesh();
    let mut f = |x: Vec<f32>| -> f64 {
        mb += 1;
        let (outside, losses) = route(&mut evalm, feed(mb, Phase::Eval, x));
        assert!(outside.is_empty());
        losses[0] as f64
    };
    assert_eq!(f(x.clone()) as f32, losses[0], "train and eval losses agree before any update");
    let numeric: Vec<f64> = (0..x.len())
        .map(|i| {
            let (mut plus, mut minus) = (x.clone(), x.clone());
            plus[i] += EPS;
            minus[i] -= EPS;
            let h = plus[i] as f64 - minus[i] as f64;
            (f(plus) - f(minus)) / h
        })
        .collect();
    // The relu in the chain makes the loss piecewise smooth; these inputs stay on one piece.
    assert_close("d loss / d fc0 output", &f32s(dx), &numeric);
}

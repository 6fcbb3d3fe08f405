//! VNodes wired together in memory, with messages delivered in adversarial orders, against the
//! whole-graph reference.

use dcnr_model::ModelGraph;
use dcnr_model::graph::ValidGraph;
use dcnr_vnode::reference::Reference;
use dcnr_vnode::{HostTensor, Inbound, Outbound, Phase, VNode, VNodeSpec, memory};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const GRAPH: &str = r#"
[model]
name = "tiny"
seed = 9
[data]
dataset = "synthetic"
feature_size = 6
classes = 3
[training]
batch_size = 5
[optimizer]
kind = "OPT"
lr = 0.05
[[node]]
id = "fc1"
kind = "linear"
inputs = 6
outputs = 8
[[node]]
id = "act1"
kind = "tanh"
[[node]]
id = "fc2"
kind = "linear"
inputs = 8
outputs = 8
[[node]]
id = "act2"
kind = "relu"
[[node]]
id = "fc3"
kind = "linear"
inputs = 8
outputs = 3
[[node]]
id = "loss"
kind = "softmax_cross_entropy"
[[edge]]
from = "image"
to = "fc1"
[[edge]]
from = "fc1"
to = "act1"
[[edge]]
from = "act1"
to = "fc2"
[[edge]]
from = "fc2"
to = "act2"
[[edge]]
from = "act2"
to = "fc3"
[[edge]]
from = "fc3"
to = "loss"
[[edge]]
from = "label"
to = "loss"
"#;

fn graph(opt: &str) -> ValidGraph {
    let text =
        GRAPH.replace("OPT", opt).replace("kind = \"sgd\"\nlr = 0.05", "kind = \"sgd\"\nlr = 0.05\nmomentum = 0.9");
    ModelGraph::parse_valid(&text).unwrap()
}

/// The spec of VNode `id` of `g` under the tests' seed.
fn spec(g: &ValidGraph, id: usize, in_flight: u32) -> VNodeSpec {
    VNodeSpec {
        node: g.nodes[id].clone(),
        optimizer: g.spec.optimizer,
        recipe: g.spec.training.recipe(),
        root_seed: 9,
        in_flight,
        averaging: None,
        compute: Default::default(),
    }
}

/// Fresh VNodes of every node of `g`, indexed by id.
fn vnodes(g: &ValidGraph, in_flight: u32) -> Vec<VNode> {
    (0..g.nodes.len()).map(|id| VNode::new(spec(g, id, in_flight))).collect()
}

fn batch(step: u64) -> (HostTensor, Vec<i32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(1000 + step);
    let x: Vec<f32> = (0..30).map(|_| rng.random_range(-1.0..1.0)).collect();
    let y: Vec<i32> = (0..5).map(|_| rng.random_range(0..3)).collect();
    (HostTensor::f32(vec![5, 6], x), y)
}

/// Runs `steps` micro-batches through in-memory VNodes with `in_flight` in flight, delivering
/// pending messages in an order drawn from `order_seed`; returns all parameters and the losses.
fn mesh(g: &ValidGraph, steps: u64, in_flight: u32, order_seed: u64) -> (Vec<Vec<HostTensor>>, Vec<f32>) {
    let mut nodes = vnodes(g, in_flight);
    let mut rng = ChaCha8Rng::seed_from_u64(order_seed);
    let losses = memory::train(g, &mut nodes, 0..steps, in_flight, labelled_batch, |n| rng.random_range(0..n)).unwrap();
    (nodes.iter().map(|n| n.params()).collect(), losses)
}

fn labelled_batch(step: u64, _pipeline: u32) -> (HostTensor, HostTensor) {
    let (x, y) = batch(step);
    (x, HostTensor::i32(vec![y.len()], y))
}

fn reference(g: &ValidGraph, steps: u64) -> (Vec<Vec<HostTensor>>, Vec<f32>) {
    let mut r = Reference::new(g, g.spec.optimizer, 9);
    let losses = (0..steps)
        .map(|s| {
            let (x, y) = batch(s);
            r.train_step(&x, &y).unwrap().loss
        })
        .collect();
    (r.params(), losses)
}

#[test]
fn synchronous_mesh_is_bit_identical_to_whole_graph_training() {
    for opt in ["adam", "sgd"] {
        let g = graph(opt);
        let (want, want_losses) = reference(&g, 40);
        for order in 0..3 {
            let (got, losses) = mesh(&g, 40, 1, order);
            assert_eq!(got, want, "{opt}: parameters differ with delivery order {order}");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&losses), bits(&want_losses));
        }
    }
}

#[test]
fn pipelined_mesh_is_identical_for_every_delivery_order() {
    let g = graph("adam");
    let (first, _) = mesh(&g, 40, 3, 100);
    for order in 101..106 {
        assert_eq!(mesh(&g, 40, 3, order).0, first, "delivery order {order} changed the result");
    }
    // A delay of K-1 updates is a different algorithm than synchronous SGD: the results differ,
    // and the test says so rather than hiding it.
    assert_ne!(first, mesh(&g, 40, 1, 100).0);
}

#[test]
fn training_reduces_the_loss() {
    let g = graph("adam");
    let (_, losses) = mesh(&g, 200, 2, 5);
    let head: f32 = losses[..20].iter().sum();
    let tail: f32 = losses[180..].iter().sum();
    assert!(tail < head, "loss went from {head} to {tail}");
}

/// Trains `first` steps, snapshots every VNode, restores them into fresh VNodes, and trains on.
fn mesh_with_restart(g: &ValidGraph, first: u64, total: u64, in_flight: u32) -> Vec<Vec<HostTensor>> {
    let mut nodes = vnodes(g, in_flight);
    let last = |n: usize| n - 1;
    memory::train(g, &mut nodes, 0..first, in_flight, labelled_batch, last).unwrap();
    let states: Vec<Vec<u8>> = nodes.iter().map(|n| n.snapshot().unwrap()).collect();
    let mut restored: Vec<VNode> =
        states.iter().enumerate().map(|(id, s)| VNode::restore(spec(g, id, in_flight), s).unwrap()).collect();
    memory::train(g, &mut restored, first..total, in_flight, labelled_batch, last).unwrap();
    restored.iter().map(|n| n.params()).collect()
}

#[test]
fn snapshot_and_restore_midway_changes_nothing() {
    for (opt, k) in [("adam", 1), ("sgd", 1), ("adam", 3)] {
        let g = graph(opt);
        let straight = mesh_with_restart(&g, 40, 40, k);
        let resumed = mesh_with_restart(&g, 17, 40, k);
        assert_eq!(straight, resumed, "{opt} in-flight {k}");
    }
}

#[test]
fn corrupt_or_foreign_state_is_refused() {
    let g = graph("adam");
    let spec = |i: usize| spec(&g, i, 1);
    let state = VNode::new(spec(0)).snapshot().unwrap();
    assert!(VNode::restore(spec(2), &state).is_err(), "state of fc1 must not load into fc2");
    let mut cut = state.clone();
    cut.truncate(cut.len() - 3);
    let err = VNode::restore(spec(0), &cut).err().unwrap().to_string();
    assert!(err.contains("truncated"), "{err}");
    assert!(VNode::restore(spec(0), b"garbage").is_err());
    assert!(VNode::restore(spec(0), &state).is_ok());
}

#[test]
fn screen_names_the_sender_of_a_bad_tensor_and_leaves_the_vnode_untouched() {
    use dcnr_vnode::sanity::{SanityError, Sender};
    let g = graph("sgd");
    let spec = |i: usize| spec(&g, i, 1);
    let act1 = VNode::new(spec(1));
    let fwd = |t: HostTensor| Inbound::Forward { mb: 0, phase: Phase::Train, port: 0, tensor: t };
    let good = HostTensor::f32(vec![5, 8], vec![0.5; 40]);
    assert_eq!(act1.screen(&fwd(good)), Ok(()));
    let mut v = vec![0.5; 40];
    v[3] = f32::NAN;
    let r = act1.screen(&fwd(HostTensor::f32(vec![5, 8], v))).unwrap_err();
    assert_eq!(r.from, Sender::VNode(0));
    assert!(matches!(r.error, SanityError::NonFinite { index: 3, .. }));
    assert!(r.to_string().contains("from vnode 0") && r.to_string().contains("NaN"), "{r}");
    let wide = act1.screen(&fwd(HostTensor::f32(vec![5, 9], vec![0.5; 45]))).unwrap_err();
    assert!(matches!(wide.error, SanityError::Shape { .. }));
    let fc1 = VNode::new(spec(0));
    let r = fc1.screen(&fwd(HostTensor::f32(vec![5, 6], vec![1.0e9; 30]))).unwrap_err();
    assert_eq!(r.from, Sender::Data);
    let grad = Inbound::Backward { mb: 0, from: (2, 0), tensor: HostTensor::f32(vec![5, 8], vec![f32::INFINITY; 40]) };
    assert_eq!(act1.screen(&grad).unwrap_err().from, Sender::VNode(2));
    // Micro-batches from the future are the sender's fault, not the VNode's failure.
    let ahead = Inbound::Forward {
        mb: 1_000_000,
        phase: Phase::Train,
        port: 0,
        tensor: HostTensor::f32(vec![5, 8], vec![0.5; 40]),
    };
    let r = act1.screen(&ahead).unwrap_err();
    assert_eq!(r.from, Sender::VNode(0));
    assert!(matches!(r.error, SanityError::Ahead { mb: 1_000_000, .. }), "{r}");
    let early = Inbound::Backward { mb: 3, from: (2, 0), tensor: HostTensor::f32(vec![5, 8], vec![0.5; 40]) };
    assert!(matches!(act1.screen(&early).unwrap_err().error, SanityError::Ahead { mb: 3, .. }));
}

/// The test graph in local mode; `hidden` sizes the auxiliary heads (0 = one linear layer).
fn local_graph(opt: &str, hidden: usize) -> ValidGraph {
    local_graph_on(opt, hidden, "f32")
}

/// The test graph in local mode with tensors crossing blocks in `wire` format.
fn local_graph_on(opt: &str, hidden: usize, wire: &str) -> ValidGraph {
    let training = format!("batch_size = 5\nmode = \"local\"\nwire = \"{wire}\"\n[training.aux]\nhidden = {hidden}\n");
    ModelGraph::parse_valid(&GRAPH.replace("OPT", opt).replace("batch_size = 5\n", &training)).unwrap()
}

#[test]
fn local_mode_with_compact_wire_formats_is_still_bit_identical_to_the_reference() {
    for wire in ["int8", "bf16"] {
        let g = local_graph_on("adam", 0, wire);
        let (want, want_losses) = reference(&g, 30);
        for (in_flight, order) in [(1, 7), (8, 8)] {
            let (got, losses) = mesh(&g, 30, in_flight, order);
            assert_eq!(got, want, "{wire}: in_flight {in_flight}, delivery order {order}");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&losses), bits(&want_losses));
        }
        // The packing is real: the result differs from f32 traffic.
        assert_ne!(want, reference(&local_graph("adam", 0), 30).0, "{wire}");
    }
}

#[test]
fn local_mode_mesh_is_bit_identical_to_the_blockwise_reference_for_any_in_flight() {
    for (opt, hidden) in [("adam", 0), ("sgd", 0), ("adam", 5)] {
        let g = local_graph(opt, hidden);
        assert_eq!(g.blocks.len(), 3, "fc1,act1 | fc2,act2 | fc3,loss");
        assert!(g.nodes[1].aux.is_some() && g.nodes[3].aux.is_some() && g.nodes[4].aux.is_none());
        let (want, want_losses) = reference(&g, 40);
        assert_eq!(want[1].len(), if hidden == 0 { 2 } else { 4 }, "act1 holds its head's parameters");
        for (in_flight, order) in [(1, 0), (1, 1), (8, 2), (8, 3), (3, 4)] {
            let (got, losses) = mesh(&g, 40, in_flight, order);
            assert_eq!(got, want, "{opt}/{hidden}: in_flight {in_flight}, delivery order {order}");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&losses), bits(&want_losses));
        }
    }
    // Local learning is a different algorithm than end-to-end backpropagation.
    assert_ne!(reference(&local_graph("adam", 0), 40).0[0], reference(&graph("adam"), 40).0[0]);
}

#[test]
fn local_mode_snapshot_and_restore_keeps_the_heads() {
    let g = local_graph("adam", 0);
    assert_eq!(mesh_with_restart(&g, 40, 40, 8), mesh_with_restart(&g, 17, 40, 8));
    assert_eq!(mesh_with_restart(&g, 40, 40, 8), reference(&g, 40).0);
}

#[test]
fn local_mode_block_output_takes_no_gradient_and_evaluates_without_labels() {
    use dcnr_vnode::{Inbound, Outbound, Phase, VNodeError};
    let g = local_graph("adam", 0);
    let spec = |i: usize| spec(&g, i, 4);
    let mut act1 = VNode::new(spec(1));
    let x = HostTensor::f32(vec![5, 8], vec![0.5; 40]);
    let labels = HostTensor::i32(vec![5], vec![0, 1, 2, 0, 1]);
    let fwd = |mb, phase, port, tensor| Inbound::Forward { mb, phase, port, tensor };
    // Training: with its input and the labels, it runs forward and its own backward at once,
    // sending its input gradient to fc1 and its activation to fc2 of the next block.
    assert!(act1.handle(fwd(0, Phase::Train, 0, x.clone())).unwrap().is_empty());
    let out = act1.handle(fwd(0, Phase::Train, 1, labels.clone())).unwrap();
    assert!(out.iter().any(|o| matches!(o, Outbound::Forward { to: 2, mb: 0, .. })));
    assert!(out.iter().any(|o| matches!(o, Outbound::Backward { to: 0, mb: 0, .. })));
    assert!(out.iter().any(|o| matches!(o, Outbound::Done { mb: 0, .. })));
    assert_eq!(act1.version(), 1);
    // fc2 is in another block: a gradient from it is refused.
    let grad = Inbound::Backward { mb: 0, from: (2, 0), tensor: HostTensor::f32(vec![5, 8], vec![0.1; 40]) };
    assert!(matches!(act1.handle(grad), Err(VNodeError::NotConsumer { .. })));
    // Evaluation needs no labels, and labels sent anyway are ignored.
    let out = act1.handle(fwd(7, Phase::Eval, 0, x)).unwrap();
    assert!(matches!(out.as_slice(), [Outbound::Forward { to: 2, mb: 7, phase: Phase::Eval, .. }]));
    assert!(act1.handle(fwd(7, Phase::Eval, 1, labels)).unwrap().is_empty());
    // Bad labels on the head's port are refused by the screen, naming the data as the sender.
    let bad = fwd(1, Phase::Train, 1, HostTensor::i32(vec![5], vec![0, 1, 9, 0, 1]));
    assert_eq!(act1.screen(&bad).unwrap_err().from, dcnr_vnode::sanity::Sender::Data);
    // fc2 takes its input from another block and sends nothing back.
    let mut fc2 = VNode::new(spec(2));
    fc2.handle(fwd(0, Phase::Train, 0, HostTensor::f32(vec![5, 8], vec![0.5; 40]))).unwrap();
    let grad = Inbound::Backward { mb: 0, from: (3, 0), tensor: HostTensor::f32(vec![5, 8], vec![0.1; 40]) };
    let out = fc2.handle(grad).unwrap();
    assert!(out.iter().any(|o| matches!(o, Outbound::Done { mb: 0, .. })), "{out:?}");
    assert!(out.iter().all(|o| !matches!(o, Outbound::Backward { .. })), "{out:?}");
}

/// image(6) -> fc1 linear(6,8) -> act -> norm layer_norm(8) -> fc2 linear(8,8) -> drop
/// -> skip = add(drop, act) -> both = concat(skip, norm) -> fc3 linear(16,3) -> loss.
const JOINS: &str = r#"
[model]
name = "joins"
[data]
dataset = "synthetic"
feature_size = 6
classes = 3
[training]
batch_size = 5
[optimizer]
kind = "adam"
lr = 0.01
[[node]]
id = "fc1"
kind = "linear"
inputs = 6
outputs = 8
[[node]]
id = "act"
kind = "relu"
[[node]]
id = "norm"
kind = "layer_norm"
inputs = 8
[[node]]
id = "fc2"
kind = "linear"
inputs = 8
outputs = 8
[[node]]
id = "drop"
kind = "dropout"
rate = 0.3
[[node]]
id = "skip"
kind = "add"
[[node]]
id = "both"
kind = "concat"
[[node]]
id = "fc3"
kind = "linear"
inputs = 16
outputs = 3
[[node]]
id = "loss"
kind = "softmax_cross_entropy"
[[edge]]
from = "image"
to = "fc1"
[[edge]]
from = "fc1"
to = "act"
[[edge]]
from = "act"
to = "norm"
[[edge]]
from = "norm"
to = "fc2"
[[edge]]
from = "fc2"
to = "drop"
[[edge]]
from = "drop"
to = "skip"
[[edge]]
from = "act"
to = "skip"
[[edge]]
from = "skip"
to = "both"
[[edge]]
from = "norm"
to = "both"
[[edge]]
from = "both"
to = "fc3"
[[edge]]
from = "fc3"
to = "loss"
[[edge]]
from = "label"
to = "loss"
"#;

/// The in-memory mesh, synchronous, in three delivery orders, equals the reference after
/// `steps` steps, losses included; returns the reference's parameters.
fn assert_equals_reference_in_any_order(g: &ValidGraph, steps: u64) -> Vec<Vec<HostTensor>> {
    let (want, want_losses) = reference(g, steps);
    for order in 0..3 {
        let (got, losses) = mesh(g, steps, 1, order);
        assert_eq!(got, want, "parameters differ with delivery order {order}");
        assert_eq!(losses, want_losses);
    }
    want
}

#[test]
fn joins_normalisation_and_dropout_are_bit_identical_to_the_reference_in_any_order() {
    let g = ModelGraph::parse_valid(JOINS).unwrap();
    let want = assert_equals_reference_in_any_order(&g, 30);
    // Dropout's masks are part of the step, so a restart midway redraws the same ones.
    assert_eq!(mesh_with_restart(&g, 30, 30, 1), mesh_with_restart(&g, 13, 30, 1));
    // And they matter: without dropout the result differs.
    let plain = ModelGraph::parse_valid(&JOINS.replace("rate = 0.3", "rate = 0.0")).unwrap();
    assert_ne!(reference(&plain, 30).0, want);
}

/// image [1, 2, 3] -> conv (2 channels, 2x2, padding 1) = [2, 3, 4] -> max_pool (2x2, stride 1)
/// = [2, 2, 3] -> avg_pool (2x2, stride 1) = [2, 1, 2] -> flatten -> linear(4, 3) -> loss.
const SPATIAL: &str = r#"
[model]
name = "spatial"
[data]
dataset = "synthetic"
feature_size = 6
classes = 3
shape = [1, 2, 3]
[training]
batch_size = 5
[optimizer]
kind = "adam"
lr = 0.01
[[node]]
id = "conv"
kind = "conv2d"
channels = 2
kernel = 2
padding = 1
[[node]]
id = "mp"
kind = "max_pool2d"
kernel = 2
stride = 1
[[node]]
id = "ap"
kind = "avg_pool2d"
kernel = 2
stride = 1
[[node]]
id = "flat"
kind = "flatten"
[[node]]
id = "fc"
kind = "linear"
inputs = 4
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
to = "ap"
[[edge]]
from = "ap"
to = "flat"
[[edge]]
from = "flat"
to = "fc"
[[edge]]
from = "fc"
to = "loss"
[[edge]]
from = "label"
to = "loss"
"#;

#[test]
fn convolutions_and_pooling_are_bit_identical_to_the_reference_and_restore_midway() {
    let g = ModelGraph::parse_valid(SPATIAL).unwrap();
    assert_equals_reference_in_any_order(&g, 30);
    assert_eq!(mesh_with_restart(&g, 30, 30, 1), mesh_with_restart(&g, 11, 30, 1));
    // Pipelined, every delivery order still gives one result.
    let (first, _) = mesh(&g, 30, 3, 7);
    assert_eq!(mesh(&g, 30, 3, 8).0, first);
}

/// Trains `steps` steps on the in-memory mesh and in the reference, then serves both: the
/// VNodes' inference (in several delivery orders) equals the reference's forward bit for bit,
/// and serving changes no parameter.
fn assert_inference_equals_reference(g: &ValidGraph, steps: u64) {
    let mut nodes = vnodes(g, 1);
    memory::train(g, &mut nodes, 0..steps, 1, labelled_batch, |_| 0).unwrap();
    let trained: Vec<_> = nodes.iter().map(|n| n.params()).collect();
    let mut r = Reference::new(g, g.spec.optimizer, 9);
    for s in 0..steps {
        let (x, y) = batch(s);
        r.train_step(&x, &y).unwrap();
    }
    for (mb, order) in [(0u64, 0u64), (1, 1), (2, 2)] {
        let (x, _) = batch(100 + mb);
        let mut rng = ChaCha8Rng::seed_from_u64(order);
        let got = memory::infer(g, &mut nodes, mb, &x, |n| rng.random_range(0..n)).unwrap().expect("no predictions");
        let want = r.predict(&x).unwrap();
        assert_eq!(got, want, "inference differs from the reference (delivery order {order})");
        let rows = want.as_f32().unwrap().chunks(3).map(|row| row.iter().sum::<f32>()).collect::<Vec<_>>();
        assert!(rows.iter().all(|s| (s - 1.0).abs() < 1e-5), "rows are not distributions: {rows:?}");
    }
    assert_eq!(nodes.iter().map(|n| n.params()).collect::<Vec<_>>(), trained);
}

#[test]
fn inference_is_the_reference_forward_bit_for_bit_on_chains_joins_and_convolutions() {
    assert_inference_equals_reference(&graph("adam"), 5);
    assert_inference_equals_reference(&ModelGraph::parse_valid(JOINS).unwrap(), 5);
    assert_inference_equals_reference(&ModelGraph::parse_valid(SPATIAL).unwrap(), 5);
}

#[test]
fn inference_takes_no_labels_and_answers_probabilities() {
    let g = graph("sgd");
    let mut loss = VNode::new(spec(&g, 5, 1));
    let labels = HostTensor::i32(vec![2], vec![0, 1]);
    let err = loss.handle(Inbound::Forward { mb: 0, phase: Phase::Infer, port: 1, tensor: labels }).unwrap_err();
    assert!(err.to_string().contains("no input port 1"), "{err}");
    let logits = HostTensor::f32(vec![2, 3], vec![0.0, 1.0, 2.0, 3.0, 3.0, 3.0]);
    let out = loss.handle(Inbound::Forward { mb: 0, phase: Phase::Infer, port: 0, tensor: logits }).unwrap();
    let [Outbound::Predictions { mb: 0, probabilities }] = out.as_slice() else { panic!("{out:?}") };
    let p = probabilities.as_f32().unwrap();
    assert!((p[3] - 1.0 / 3.0).abs() < 1e-6 && p[2] > p[1] && p[1] > p[0]);
}

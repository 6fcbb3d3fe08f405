//! Data-parallel pipelines in memory: VNodes of R copies of a graph, averaging every few steps
//! over messages delivered in adversarial orders, against `reference::Pipelines`.

use dcnr_model::ModelGraph;
use dcnr_model::graph::ValidGraph;
use dcnr_vnode::reference::Pipelines;
use dcnr_vnode::rounds::Averaging;
use dcnr_vnode::{HostTensor, Inbound, Outbound, VNode, VNodeError, VNodeSpec, memory};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Training samples the plan assumes: batches of 5, so 20 batches an epoch.
const TRAIN: usize = 100;

fn graph(pipelines: u32, mode: &str, outer: &str) -> ValidGraph {
    let text = format!(
        r#"
[model]
name = "tiny"
seed = 9
[data]
dataset = "synthetic"
feature_size = 6
classes = 3
[training]
batch_size = 5
steps = 63
mode = "{mode}"
pipelines = {pipelines}
sync_every = 4
[training.outer]
{outer}
[optimizer]
kind = "adam"
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
to = "loss"
[[edge]]
from = "label"
to = "loss"
"#
    );
    ModelGraph::parse_valid(&text).unwrap()
}

/// The micro-batch of step `step` of pipeline `p` (of `r`): global batch `step * r + p`.
fn batch(step: u64, p: u32, r: u32) -> (HostTensor, Vec<i32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(1000 + step * u64::from(r) + u64::from(p));
    let x: Vec<f32> = (0..30).map(|_| rng.random_range(-1.0..1.0)).collect();
    let y: Vec<i32> = (0..5).map(|_| rng.random_range(0..3)).collect();
    (HostTensor::f32(vec![5, 6], x), y)
}

fn spec(g: &ValidGraph, n: &dcnr_model::graph::ValidNode, in_flight: u32) -> VNodeSpec {
    VNodeSpec {
        node: n.clone(),
        optimizer: g.spec.optimizer,
        recipe: g.spec.training.recipe(),
        root_seed: 9,
        in_flight,
        averaging: Averaging::of(g, TRAIN),
        compute: Default::default(),
    }
}

fn train(g: &ValidGraph, nodes: &mut [VNode], steps: std::ops::Range<u64>, in_flight: u32, order: u64) {
    let r = g.pipelines();
    let mut rng = ChaCha8Rng::seed_from_u64(order);
    let labelled = |s: u64, p: u32| {
        let (x, y) = batch(s, p, r);
        (x, HostTensor::i32(vec![y.len()], y))
    };
    memory::train(g, nodes, steps, in_flight, labelled, |n| rng.random_range(0..n)).unwrap();
}

/// Every VNode's parameters after `steps` local steps with delivery order `order`.
fn mesh(g: &ValidGraph, steps: u64, in_flight: u32, order: u64) -> Vec<Vec<HostTensor>> {
    let mut nodes: Vec<VNode> = g.nodes.iter().map(|n| VNode::new(spec(g, n, in_flight))).collect();
    train(g, &mut nodes, 0..steps, in_flight, order);
    nodes.iter().map(|n| n.params()).collect()
}

fn reference(g: &ValidGraph, steps: u64) -> Vec<Vec<HostTensor>> {
    let mut p = Pipelines::new(g, g.spec.optimizer, 9, TRAIN).unwrap();
    for s in 0..steps {
        let batches: Vec<_> = (0..g.pipelines()).map(|q| batch(s, q, g.pipelines())).collect();
        p.train_step(s, &batches).unwrap();
    }
    p.params().unwrap()
}

#[test]
fn pipelines_equal_the_single_process_reference_and_each_other() {
    let cases = [
        (2, "exact", 1, "kind = \"nesterov\""),
        (3, "exact", 1, "kind = \"average\"\nwire = \"int8\""),
        (2, "local", 3, "kind = \"nesterov\"\nlr = 0.5\nwire = \"bf16\""),
    ];
    for (r, mode, k, outer) in cases {
        let g = graph(r, mode, outer);
        // 63 steps / 3 pipelines = 21 (the last step closes a round mid-epoch); with 2, 31.
        let steps = 63 / u64::from(r);
        let want = reference(&g, steps);
        for order in 0..2 {
            let got = mesh(&g, steps, k, order);
            let n = g.pipeline_len();
            assert_eq!(got[..n], want[..], "{r} pipelines, {mode}, {outer}: order {order}");
            for copy in 1..r as usize {
                assert_eq!(got[copy * n..(copy + 1) * n], got[..n], "copy {copy} disagrees");
            }
        }
    }
}

#[test]
fn averaging_changes_the_result_and_one_pipeline_is_plain_training() {
    let two = reference(&graph(2, "exact", "kind = \"nesterov\""), 31);
    let averaged = reference(&graph(2, "exact", "kind = \"average\""), 31);
    assert_ne!(two, averaged, "the outer rule must matter");
    let one = graph(1, "exact", "");
    let mut plain = dcnr_vnode::reference::Reference::new(&one, one.spec.optimizer, 9);
    for s in 0..63 {
        let (x, y) = batch(s, 0, 1);
        plain.train_step(&x, &y).unwrap();
    }
    assert_eq!(reference(&one, 63), plain.params());
}

#[test]
fn snapshot_and_restore_between_rounds_changes_nothing() {
    for outer in ["kind = \"nesterov\"", "kind = \"average\""] {
        let g = graph(2, "exact", outer);
        let straight = mesh(&g, 31, 1, 7);
        let mut nodes: Vec<VNode> = g.nodes.iter().map(|n| VNode::new(spec(&g, n, 1))).collect();
        // Step 13 is mid-round: the anchor and the outer momentum are part of the state.
        train(&g, &mut nodes, 0..13, 1, 7);
        let states: Vec<Vec<u8>> = nodes.iter().map(|n| n.snapshot().unwrap()).collect();
        let mut restored: Vec<VNode> =
            g.nodes.iter().zip(&states).map(|(n, s)| VNode::restore(spec(&g, n, 1), s).unwrap()).collect();
        train(&g, &mut restored, 13..31, 1, 8);
        let resumed: Vec<Vec<HostTensor>> = restored.iter().map(|n| n.params()).collect();
        assert_eq!(resumed, straight, "{outer}");
    }
}

#[test]
fn changes_from_strangers_or_for_no_round_are_refused() {
    let g = graph(2, "exact", "kind = \"nesterov\"");
    let n = g.pipeline_len() as u32;
    let mut fc1 = VNode::new(spec(&g, &g.nodes[0], 1));
    let change = HostTensor::f32(vec![6, 8], vec![0.01; 48]);
    let sync = |from: u32, mb: u64, index: u32, tensor: HostTensor| Inbound::Sync { mb, from, index, tensor };
    // Not a copy: the second pipeline's fc2.
    let err = fc1.handle(sync(n + 2, 3, 0, change.clone())).unwrap_err();
    assert!(matches!(err, VNodeError::Round { .. }), "{err}");
    // Step 2 closes no round.
    let err = fc1.handle(sync(n, 2, 0, change.clone())).unwrap_err();
    assert!(matches!(err, VNodeError::Round { .. }), "{err}");
    // Wrong shape, and no such parameter.
    assert!(fc1.handle(sync(n, 3, 0, HostTensor::f32(vec![8, 6], vec![0.0; 48]))).is_err());
    assert!(fc1.handle(sync(n, 3, 5, change.clone())).is_err());
    // The copy's change for the next round is kept, once.
    assert_eq!(fc1.handle(sync(n, 3, 0, change.clone())).unwrap().len(), 0);
    let err = fc1.handle(sync(n, 3, 0, change.clone())).unwrap_err();
    assert!(err.is_stale(), "a repeat is merely stale: {err}");
    // A copy sends its change only at a round's end, to every other copy.
    let g3 = graph(3, "exact", "kind = \"average\"");
    let mut fc2 = VNode::new(spec(&g3, &g3.nodes[2], 1));
    let x = HostTensor::f32(vec![5, 8], vec![0.1; 40]);
    let grad = HostTensor::f32(vec![5, 3], vec![0.1; 15]);
    for mb in 0..4 {
        fc2.handle(Inbound::Forward { mb, phase: dcnr_vnode::Phase::Train, port: 0, tensor: x.clone() }).unwrap();
        let out = fc2.handle(Inbound::Backward { mb, from: (3, 0), tensor: grad.clone() }).unwrap();
        let syncs: Vec<u32> =
            out.iter().filter_map(|o| if let Outbound::Sync { to, .. } = o { Some(*to) } else { None }).collect();
        let done = out.iter().any(|o| matches!(o, Outbound::Done { .. }));
        if mb < 3 {
            assert!(syncs.is_empty() && done, "step {mb}: {out:?}");
        } else {
            // Two tensors (weight, bias) to each of the two other copies; Done waits for theirs.
            assert_eq!(syncs, vec![6, 10, 6, 10], "{out:?}");
            assert!(!done, "Done is held until the round is applied");
        }
    }
}

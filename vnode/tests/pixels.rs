//! VNodes fed raw u8 pixels (what a PNode builds from a dataset pack) train to the same bits as
//! VNodes fed the features the reference normalises itself, and refuse pixels where they do
//! not belong.

use dcnr_model::ModelGraph;
use dcnr_model::dataset::ImageSet;
use dcnr_model::graph::{Normalize, ValidGraph};
use dcnr_vnode::sanity::SanityError;
use dcnr_vnode::{HostTensor, Inbound, Phase, VNode, VNodeError, VNodeSpec, memory};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const GRAPH: &str = r#"
[model]
name = "pixels"
seed = 9
[data]
dataset = "synthetic"
feature_size = 6
classes = 3
normalize = { mean = 0.1307, std = 0.3081 }
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
id = "act1"
kind = "relu"
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
"#;

fn graph() -> ValidGraph {
    ModelGraph::parse_valid(GRAPH).unwrap()
}

/// Step `s`'s samples as one image set: 5 images of 2x3 random pixels.
fn samples(step: u64) -> ImageSet {
    let mut rng = ChaCha8Rng::seed_from_u64(500 + step);
    ImageSet {
        rows: 2,
        cols: 3,
        images: (0..30).map(|_| rng.random_range(0..=255u8)).collect(),
        labels: (0..5).map(|_| rng.random_range(0..3u8)).collect(),
    }
}

fn vnodes(g: &ValidGraph, normalize: Option<Normalize>) -> Vec<VNode> {
    g.nodes
        .iter()
        .map(|n| {
            let v = VNode::new(VNodeSpec {
                node: n.clone(),
                optimizer: g.spec.optimizer,
                recipe: g.spec.training.recipe(),
                root_seed: 9,
                in_flight: 1,
                averaging: None,
                compute: Default::default(),
            });
            match normalize {
                Some(n) => v.with_normalize(n),
                None => v,
            }
        })
        .collect()
}

fn params(nodes: &[VNode]) -> Vec<Vec<HostTensor>> {
    nodes.iter().map(|n| n.params()).collect()
}

#[test]
fn pixels_normalised_in_the_vnode_train_to_the_reference_bits() {
    let g = graph();
    let norm = g.spec.data.normalize;
    let all: Vec<usize> = (0..5).collect();
    let labels = |set: &ImageSet| HostTensor::i32(vec![5], set.gather_labels(&all));

    let mut fed_floats = vnodes(&g, None);
    memory::train(
        &g,
        &mut fed_floats,
        0..6,
        1,
        |s, _| {
            let set = samples(s);
            (HostTensor::f32(vec![5, 6], set.gather_features(&all, norm.mean, norm.std)), labels(&set))
        },
        |_| 0,
    )
    .unwrap();

    let mut fed_pixels = vnodes(&g, Some(norm));
    memory::train(
        &g,
        &mut fed_pixels,
        0..6,
        1,
        |s, _| {
            let set = samples(s);
            (HostTensor::u8(vec![5, 6], set.images.clone()), labels(&set))
        },
        |_| 0,
    )
    .unwrap();
    assert_eq!(params(&fed_floats), params(&fed_pixels));
}

#[test]
fn pixels_are_refused_without_a_normalisation_or_off_the_features_port() {
    let g = graph();
    let pixels = |shape: Vec<usize>| HostTensor::u8(shape.clone(), vec![7; shape.iter().product()]);
    let forward = |port, tensor| Inbound::Forward { mb: 0, phase: Phase::Train, port, tensor };

    // fc1 without the job's normalisation: screened out as a dtype error, refused by `handle`.
    let mut plain = vnodes(&g, None);
    let r = plain[0].screen(&forward(0, pixels(vec![5, 6]))).unwrap_err();
    assert_eq!(r.error, SanityError::Dtype { expected: "f32", got: "u8" });
    assert!(matches!(plain[0].handle(forward(0, pixels(vec![5, 6]))), Err(VNodeError::Shape { .. })));

    let mut nodes = vnodes(&g, Some(g.spec.data.normalize));
    // The right shape passes; a wrong width does not.
    assert_eq!(nodes[0].screen(&forward(0, pixels(vec![5, 6]))), Ok(()));
    let r = nodes[0].screen(&forward(0, pixels(vec![5, 4]))).unwrap_err();
    assert!(matches!(r.error, SanityError::Shape { .. }), "{r}");
    // Pixels on the loss's labels port, or on a port fed by another VNode, are refused.
    let loss = 3;
    let r = nodes[loss].screen(&forward(1, pixels(vec![5]))).unwrap_err();
    assert_eq!(r.error, SanityError::Dtype { expected: "i32", got: "u8" });
    assert!(matches!(nodes[loss].handle(forward(1, pixels(vec![5]))), Err(VNodeError::Shape { .. })));
    assert!(matches!(nodes[loss].handle(forward(0, pixels(vec![5, 3]))), Err(VNodeError::Shape { .. })));
    // fc1 handles them like the features they stand for.
    assert!(nodes[0].handle(forward(0, pixels(vec![5, 6]))).is_ok());
}

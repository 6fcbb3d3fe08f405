//! Parsing and validation of model graphs: the shipped example, every `GraphError` with its message, and random chains.

use dcnr_model::graph::{Edge, NodeSpec, OptimizerSpec, Source};
use dcnr_model::{GraphError, ModelGraph, NodeKind};
use proptest::prelude::*;

/// image(4) -> fc1 linear(4,5) -> relu1 -> fc2 linear(5,3) -> loss.logits; label -> loss.labels.
const BASE: &str = r#"
[model]
name = "small"
seed = 3

[data]
dataset = "mnist"
feature_size = 4
classes = 3

[training]
batch_size = 8

[optimizer]
kind = "sgd"
lr = 0.1

[[node]]
id = "fc1"
kind = "linear"
inputs = 4
outputs = 5

[[node]]
id = "relu1"
kind = "relu"

[[node]]
id = "fc2"
kind = "linear"
inputs = 5
outputs = 3

[[node]]
id = "loss"
kind = "softmax_cross_entropy"

[[edge]]
from = "image"
to = "fc1"

[[edge]]
from = "fc1"
to = "relu1"

[[edge]]
from = "relu1"
to = "fc2"

[[edge]]
from = "fc2"
to = "loss"
port = "logits"

[[edge]]
from = "label"
to = "loss"
port = "labels"
"#;

fn base() -> ModelGraph {
    ModelGraph::parse(BASE).unwrap()
}

fn node(id: &str, kind: &str, widths: Option<(usize, usize)>) -> NodeSpec {
    NodeSpec {
        id: id.into(),
        kind: kind.into(),
        inputs: widths.map(|w| w.0),
        outputs: widths.map(|w| w.1),
        rate: None,
        channels: None,
        kernel: None,
        stride: None,
        padding: None,
        shape: None,
        block: None,
    }
}

fn edge(from: &str, to: &str, port: Option<&str>) -> Edge {
    Edge { from: from.into(), to: to.into(), port: port.map(str::to_string) }
}

fn find_node(g: &ModelGraph, id: &str) -> usize {
    g.nodes.iter().position(|n| n.id == id).unwrap()
}

/// Validates `g`, expecting an error; returns it with its message.
fn fails(g: ModelGraph) -> (GraphError, String) {
    let err = g.validate().unwrap_err();
    let msg = err.to_string();
    (err, msg)
}

#[test]
fn shipped_mnist_mlp_validates() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/mnist-mlp.toml")).unwrap();
    let g = ModelGraph::parse_valid(&text).unwrap();
    assert_eq!(g.nodes.len(), 6);
    let names: Vec<&str> = g.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["fc1", "relu1", "fc2", "relu2", "fc3", "loss"]);
    assert_eq!(g.topo, vec![0, 1, 2, 3, 4, 5]);
    assert_eq!(g.loss, 5);
    assert_eq!(g.param_count(), 784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10);
    assert_eq!(g.nodes[0].kind, NodeKind::Linear { inputs: 784, outputs: 256 });
    assert_eq!(g.nodes[5].kind, NodeKind::SoftmaxCrossEntropy { classes: 10 });
    assert_eq!(g.nodes[0].inputs, vec![Source::Features]);
    assert_eq!(g.nodes[5].inputs, vec![Source::Node(4), Source::Labels]);
    assert_eq!(g.nodes[4].consumers, vec![(5, 0)]);
    assert!(g.nodes[5].consumers.is_empty());
    let widths: Vec<usize> = g.nodes.iter().map(|n| n.output_width).collect();
    assert_eq!(widths, [256, 256, 256, 256, 10, 1]);
    assert_eq!(g.spec.optimizer, OptimizerSpec::Adam { lr: 0.001, beta1: 0.9, beta2: 0.999, eps: 1e-8 });
    assert_eq!(g.spec.data.normalize.std, 0.3081);
}

#[test]
fn base_graph_validates_with_defaults() {
    let g = base().validate().unwrap();
    assert_eq!(g.topo, vec![0, 1, 2, 3]);
    assert_eq!(g.loss, 3);
    assert_eq!(g.spec.data.features, "image");
    assert_eq!(g.spec.data.labels, "label");
    assert_eq!(g.spec.training.epochs, 1);
    assert_eq!(g.spec.training.in_flight, 1);
    assert_eq!(g.spec.training.eval_batch_size, 1000);
    assert_eq!(g.spec.training.steps, None);
    assert_eq!(g.spec.optimizer, OptimizerSpec::Sgd { lr: 0.1, momentum: 0.0 });
}

#[test]
fn loss_ports_default_by_source() {
    // Without `port`, the labels source goes to `labels` and anything else to `logits`.
    let text = BASE.replace("port = \"logits\"\n", "").replace("port = \"labels\"\n", "");
    let g = ModelGraph::parse_valid(&text).unwrap();
    assert_eq!(g.nodes[3].inputs, vec![Source::Node(2), Source::Labels]);
    assert_eq!(g.nodes[2].consumers, vec![(3, 0)]);
}

#[test]
fn topo_order_does_not_depend_on_file_order() {
    let mut g = base();
    g.nodes.reverse(); // loss, fc2, relu1, fc1: ids 0..=3
    let v = g.validate().unwrap();
    assert_eq!(v.topo, vec![3, 2, 1, 0]);
    assert_eq!(v.loss, 0);
}

#[test]
fn unknown_kind_is_named() {
    let mut g = base();
    let i = find_node(&g, "relu1");
    g.nodes[i].kind = "swish".into();
    let (err, msg) = fails(g);
    assert_eq!(
        err,
        GraphError::UnknownKind {
            node: "relu1".into(),
            kind: "swish".into(),
            known:
                "linear, relu, tanh, gelu, layer_norm, dropout, add, concat, conv2d, max_pool2d, avg_pool2d, flatten, \
                    reshape, softmax_cross_entropy"
                    .into()
        }
    );
    assert!(msg.contains("`relu1`") && msg.contains("`swish`") && msg.contains("softmax_cross_entropy"), "{msg}");
}

#[test]
fn unknown_fields_are_syntax_errors_naming_the_field() {
    let cases = [
        (BASE.replace("kind = \"relu\"", "kind = \"relu\"\nslope = 0.1"), "slope"),
        (BASE.replace("batch_size = 8", "batch_size = 8\nlearning_rate = 0.1"), "learning_rate"),
        (BASE.replace("lr = 0.1", "lr = 0.1\nnesterov = true"), "nesterov"),
        (BASE.replace("to = \"fc1\"", "to = \"fc1\"\nweight = 2"), "weight"),
        (BASE.replace("[model]", "[extra]\nx = 1\n[model]"), "extra"),
    ];
    for (text, field) in cases {
        let err = ModelGraph::parse(&text).unwrap_err();
        let GraphError::Syntax(detail) = &err else { panic!("{field}: expected Syntax, got {err:?}") };
        assert!(detail.contains(&format!("`{field}`")), "{field}: {detail}");
        assert!(err.to_string().starts_with("model graph is not valid TOML for the DCNR format: "));
        assert_eq!(ModelGraph::parse_valid(&text).unwrap_err(), err);
    }
}

#[test]
fn missing_required_fields_are_syntax_errors() {
    let err = ModelGraph::parse(&BASE.replace("batch_size = 8", "")).unwrap_err();
    let GraphError::Syntax(detail) = &err else { panic!("{err:?}") };
    assert!(detail.contains("batch_size"), "{detail}");
    let err = ModelGraph::parse(&BASE.replace("kind = \"sgd\"", "kind = \"rmsprop\"")).unwrap_err();
    let GraphError::Syntax(detail) = &err else { panic!("{err:?}") };
    assert!(detail.contains("rmsprop"), "{detail}");
}

#[test]
fn duplicate_names_are_rejected() {
    let mut g = base();
    g.nodes.push(node("fc1", "relu", None));
    let (err, msg) = fails(g);
    assert_eq!(err, GraphError::DuplicateName("fc1".into()));
    assert!(msg.contains("`fc1`"), "{msg}");

    // A node may not reuse a data source's name either.
    let mut g = base();
    let i = find_node(&g, "relu1");
    g.nodes[i].id = "image".into();
    assert_eq!(fails(g).0, GraphError::DuplicateName("image".into()));

    let mut g = base();
    g.data.labels = "image".into();
    assert_eq!(fails(g).0, GraphError::DuplicateName("image".into()));
}

#[test]
fn dangling_edges_name_the_missing_end() {
    let mut g = base();
    g.edges[1] = edge("fc9", "relu1", None);
    let (err, msg) = fails(g);
    assert_eq!(
        err,
        GraphError::DanglingEdge { from: "fc9".into(), to: "relu1".into(), which: "producer", name: "fc9".into() }
    );
    assert_eq!(msg, "edge fc9 -> relu1: unknown producer `fc9`");

    let mut g = base();
    g.edges.push(edge("relu1", "nowhere", None));
    let (err, msg) = fails(g);
    assert_eq!(
        err,
        GraphError::DanglingEdge {
            from: "relu1".into(),
            to: "nowhere".into(),
            which: "consumer node",
            name: "nowhere".into()
        }
    );
    assert_eq!(msg, "edge relu1 -> nowhere: unknown consumer node `nowhere`");

    let mut g = base();
    g.edges.push(edge("relu1", "image", None));
    let (err, msg) = fails(g);
    assert!(matches!(&err, GraphError::DanglingEdge { name, .. } if name == "image"), "{err:?}");
    assert!(msg.contains("a data source cannot consume") && msg.contains("`image`"), "{msg}");
}

#[test]
fn unknown_ports_are_named_with_the_valid_ones() {
    let mut g = base();
    g.edges[3].port = Some("logit".into());
    let (err, msg) = fails(g);
    assert_eq!(
        err,
        GraphError::UnknownPort {
            from: "fc2".into(),
            to: "loss".into(),
            kind: "softmax_cross_entropy".into(),
            port: "logit".into(),
            ports: "logits, labels".into()
        }
    );
    assert_eq!(
        msg,
        "edge fc2 -> loss: node `loss` (kind softmax_cross_entropy) has no input port `logit` (ports: logits, labels)"
    );

    let mut g = base();
    g.edges[1].port = Some("x".into());
    let (err, msg) = fails(g);
    assert!(
        matches!(&err, GraphError::UnknownPort { to, port, ports, .. } if to == "relu1" && port == "x" && ports == "in")
    );
    assert!(msg.contains("`relu1`") && msg.contains("`x`"), "{msg}");

    // Naming the only port explicitly is fine.
    let mut g = base();
    g.edges[1].port = Some("in".into());
    g.validate().unwrap();
}

#[test]
fn ports_need_exactly_one_edge() {
    let mut g = base();
    g.edges.push(edge("image", "relu1", None));
    let (err, msg) = fails(g);
    assert_eq!(err, GraphError::PortArity { node: "relu1".into(), port: "in".into(), count: 2 });
    assert_eq!(msg, "node `relu1`: input port `in` has 2 incoming edges (exactly 1 required)");

    let mut g = base();
    g.edges.remove(1); // fc1 -> relu1
    let (err, msg) = fails(g);
    assert_eq!(err, GraphError::PortArity { node: "relu1".into(), port: "in".into(), count: 0 });
    assert!(msg.contains("`relu1`") && msg.contains("has 0 incoming"), "{msg}");

    let mut g = base();
    g.edges.remove(4); // label -> loss
    assert_eq!(fails(g).0, GraphError::PortArity { node: "loss".into(), port: "labels".into(), count: 0 });
}

/// fc1 <-> relu1 loop; relu1 also feeds fc2 -> loss, so every port has exactly one edge and
/// every node a consumer. `first` is placed first in the file.
fn cyclic(first: &str) -> ModelGraph {
    let mut g = base();
    g.edges[0] = edge("relu1", "fc1", None); // replaces image -> fc1
    g.nodes[0].inputs = Some(5);
    g.nodes[0].outputs = Some(5);
    let i = find_node(&g, first);
    let n = g.nodes.remove(i);
    g.nodes.insert(0, n);
    g
}

#[test]
fn cycles_are_rejected_naming_a_node_on_the_cycle() {
    for first in ["fc1", "relu1", "fc2", "loss"] {
        let (err, msg) = fails(cyclic(first));
        let GraphError::Cycle(name) = &err else { panic!("{first} first: expected Cycle, got {err:?}") };
        assert!(name == "fc1" || name == "relu1", "{first} first: `{name}` is not on the cycle fc1 -> relu1 -> fc1");
        assert_eq!(msg, format!("the graph has a cycle through node `{name}`"));
    }

    // A self-loop.
    let mut g = base();
    g.edges[0] = edge("fc1", "fc1", None);
    g.nodes[0].outputs = Some(4);
    g.nodes[2].inputs = Some(4);
    assert_eq!(fails(g).0, GraphError::Cycle("fc1".into()));
}

#[test]
fn exactly_one_loss() {
    let mut g = base();
    g.nodes.truncate(1);
    g.edges.truncate(1);
    let (err, msg) = fails(g);
    assert_eq!(err, GraphError::LossCount(0));
    assert_eq!(msg, "the graph must have exactly one loss node, found 0");

    let mut g = base();
    g.nodes.push(node("loss2", "softmax_cross_entropy", None));
    g.edges.push(edge("fc2", "loss2", None));
    g.edges.push(edge("label", "loss2", None));
    let (err, msg) = fails(g);
    assert_eq!(err, GraphError::LossCount(2));
    assert!(msg.ends_with("found 2"), "{msg}");
}

#[test]
fn a_loss_cannot_feed_another_node() {
    let mut g = base();
    g.nodes.push(node("after", "relu", None));
    g.edges.push(edge("loss", "after", None));
    let (err, msg) = fails(g);
    let GraphError::ShapeMismatch { from, to, port, .. } = &err else { panic!("{err:?}") };
    assert_eq!((from.as_str(), to.as_str(), port.as_str()), ("loss", "after", "in"));
    assert!(msg.contains("loss -> after.in") && msg.contains("cannot feed"), "{msg}");
}

#[test]
fn shape_mismatches_name_the_edge() {
    let mut g = base();
    g.nodes[2].inputs = Some(6);
    let (err, msg) = fails(g);
    assert_eq!(
        err,
        GraphError::ShapeMismatch {
            from: "relu1".into(),
            to: "fc2".into(),
            port: "in".into(),
            detail: "linear expects 6 input features, gets 5".into()
        }
    );
    assert_eq!(msg, "shape mismatch on edge relu1 -> fc2.in: linear expects 6 input features, gets 5");

    let mut g = base();
    g.nodes[2].outputs = Some(4);
    let (err, msg) = fails(g);
    assert_eq!(
        err,
        GraphError::ShapeMismatch {
            from: "fc2".into(),
            to: "loss".into(),
            port: "logits".into(),
            detail: "logits have width 4, but the labels have 3 classes".into()
        }
    );
    assert!(msg.contains("fc2 -> loss.logits"), "{msg}");

    let mut g = base();
    g.data.feature_size = 7;
    let (err, msg) = fails(g);
    assert!(matches!(&err, GraphError::ShapeMismatch { from, to, .. } if from == "image" && to == "fc1"), "{err:?}");
    assert!(msg.contains("expects 4 input features, gets 7"), "{msg}");

    let mut g = base();
    g.data.classes = 5;
    let (err, _) = fails(g);
    assert!(matches!(&err, GraphError::ShapeMismatch { to, port, .. } if to == "loss" && port == "logits"), "{err:?}");
}

fn out_of_range(g: ModelGraph) -> (String, String, String) {
    match fails(g) {
        (GraphError::OutOfRange { what, value, range }, msg) => {
            assert_eq!(msg, format!("{what} = {value} is out of range ({range})"));
            (what, value, range)
        }
        (other, _) => panic!("expected OutOfRange, got {other:?}"),
    }
}

#[test]
fn absurd_sizes_are_out_of_range() {
    let mut g = base();
    g.training.batch_size = 0;
    assert_eq!(out_of_range(g), ("training.batch_size".into(), "0".into(), "1..=65536".into()));

    let mut g = base();
    g.training.batch_size = 1 << 20;
    assert_eq!(out_of_range(g).0, "training.batch_size");

    let mut g = base();
    g.training.eval_batch_size = 0;
    assert_eq!(out_of_range(g).0, "training.eval_batch_size");

    let mut g = base();
    g.training.in_flight = 0;
    assert_eq!(out_of_range(g), ("training.in_flight".into(), "0".into(), "1..=64".into()));

    let mut g = base();
    g.training.in_flight = 65;
    assert_eq!(out_of_range(g).1, "65");

    let mut g = base();
    g.training.epochs = 0;
    assert_eq!(out_of_range(g).0, "training.steps/epochs");

    let mut g = base();
    g.training.steps = Some(0);
    assert_eq!(out_of_range(g).0, "training.steps/epochs");

    // `steps` overrides `epochs`, so epochs = 0 is fine when steps is set.
    let mut g = base();
    g.training.epochs = 0;
    g.training.steps = Some(10);
    g.validate().unwrap();

    let mut g = base();
    g.nodes[0].outputs = Some(1_000_000_000);
    assert_eq!(out_of_range(g), ("node `fc1`: outputs".into(), "1000000000".into(), "1..=1048576".into()));

    let mut g = base();
    g.nodes[2].inputs = Some(0);
    assert_eq!(out_of_range(g).0, "node `fc2`: inputs");

    let mut g = base();
    g.nodes[2].outputs = None;
    assert_eq!(out_of_range(g), ("node `fc2`: outputs".into(), "missing".into(), "required for this kind".into()));

    let mut g = base();
    g.nodes[0].inputs = Some(1 << 20);
    g.nodes[0].outputs = Some(1 << 9);
    assert_eq!(out_of_range(g), ("node `fc1`: parameter count".into(), "536871424".into(), "<= 268435456".into()));

    let mut g = base();
    g.nodes[1].inputs = Some(5);
    assert_eq!(out_of_range(g).0, "node `relu1`: inputs/outputs");

    let mut g = base();
    g.data.feature_size = 0;
    assert_eq!(out_of_range(g).0, "data.feature_size");

    let mut g = base();
    g.data.classes = 1;
    assert_eq!(out_of_range(g).0, "data.classes");

    let mut g = base();
    g.data.normalize.std = 0.0;
    assert_eq!(out_of_range(g).0, "data.normalize");

    let mut g = base();
    g.nodes.clear();
    g.edges.clear();
    assert_eq!(out_of_range(g), ("number of nodes".into(), "0".into(), "1..=4096".into()));
}

#[test]
fn bad_optimizer_settings_are_out_of_range() {
    for lr in [-0.1f32, 0.0, f32::NAN, f32::INFINITY, 100.0] {
        let mut g = base();
        g.optimizer = OptimizerSpec::Sgd { lr, momentum: 0.0 };
        let (what, value, range) = out_of_range(g);
        assert_eq!((what.as_str(), range.as_str()), ("optimizer.lr", "0 < lr < 100"));
        assert_eq!(value, lr.to_string());
    }
    // The TOML spelling of NaN reaches the same check.
    let g = ModelGraph::parse(&BASE.replace("lr = 0.1", "lr = nan")).unwrap();
    assert_eq!(out_of_range(g), ("optimizer.lr".into(), "NaN".into(), "0 < lr < 100".into()));
    let g = ModelGraph::parse(&BASE.replace("lr = 0.1", "lr = -0.5")).unwrap();
    assert_eq!(out_of_range(g).1, "-0.5");

    let mut g = base();
    g.optimizer = OptimizerSpec::Sgd { lr: 0.1, momentum: 1.0 };
    assert_eq!(out_of_range(g).0, "optimizer.momentum");

    let mut g = base();
    g.optimizer = OptimizerSpec::Adam { lr: f32::NAN, beta1: 0.9, beta2: 0.999, eps: 1e-8 };
    assert_eq!(out_of_range(g).0, "optimizer.lr");

    let mut g = base();
    g.optimizer = OptimizerSpec::Adam { lr: 0.01, beta1: 0.9, beta2: 1.5, eps: 1e-8 };
    assert_eq!(out_of_range(g).0, "optimizer.beta2");

    let mut g = base();
    g.optimizer = OptimizerSpec::Adam { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 0.0 };
    assert_eq!(out_of_range(g).0, "optimizer.eps");
}

#[test]
fn unused_outputs_are_rejected() {
    let mut g = base();
    g.nodes.push(node("dead", "tanh", None));
    g.edges.push(edge("relu1", "dead", None));
    let (err, msg) = fails(g);
    assert_eq!(err, GraphError::Unused("dead".into()));
    assert_eq!(msg, "node `dead` has no consumer: every non-loss node must feed another node");
}

#[test]
fn labels_only_feed_the_labels_port_of_a_loss() {
    let mut g = base();
    g.edges[0] = edge("label", "fc1", None);
    let (err, msg) = fails(g);
    assert_eq!(err, GraphError::LabelsMisuse("label".into()));
    assert_eq!(msg, "labels source `label` may only feed the `labels` port of a loss node");

    let mut g = base();
    g.edges[4].port = Some("logits".into());
    assert_eq!(fails(g).0, GraphError::LabelsMisuse("label".into()));

    // Features on the labels port are refused by the same rule.
    let mut g = base();
    g.edges[4] = edge("image", "loss", Some("labels"));
    assert_eq!(fails(g).0, GraphError::LabelsMisuse("label".into()));

    // A renamed labels source is reported by its own name.
    let mut g = base();
    g.data.labels = "digit".into();
    g.edges[4].from = "digit".into();
    g.edges[0].from = "digit".into();
    assert_eq!(fails(g).0, GraphError::LabelsMisuse("digit".into()));
}

/// One layer of a random chain: 0 = linear to the given width, 1 = relu, 2 = tanh.
type Layer = (u8, usize);

/// A chain image(w0) -> layers... -> linear(classes) -> loss with the nodes placed in the file
/// in the order given by `perm` (a permutation of chain positions).
fn chain(w0: usize, layers: &[Layer], classes: usize, perm: &[usize]) -> (ModelGraph, Vec<NodeSpec>) {
    let mut g = base();
    g.data.feature_size = w0;
    g.data.classes = classes;
    let mut nodes = Vec::new();
    let mut cur = w0;
    for (i, &(kind, w)) in layers.iter().chain(std::iter::once(&(0u8, classes))).enumerate() {
        let id = format!("n{i}");
        nodes.push(match kind {
            0 => {
                let n = node(&id, "linear", Some((cur, w)));
                cur = w;
                n
            }
            1 => node(&id, "relu", None),
            _ => node(&id, "tanh", None),
        });
    }
    nodes.push(node("loss", "softmax_cross_entropy", None));
    let mut edges = vec![edge("image", &nodes[0].id, None)];
    for pair in nodes.windows(2) {
        edges.push(edge(&pair[0].id, &pair[1].id, None));
    }
    edges.push(edge("label", "loss", None));
    g.nodes = perm.iter().map(|&p| nodes[p].clone()).collect();
    g.edges = edges;
    (g, nodes)
}

fn chain_strategy() -> impl Strategy<Value = (usize, Vec<Layer>, usize, Vec<usize>)> {
    (1usize..64, prop::collection::vec((0u8..3, 1usize..64), 0..10), 2usize..64).prop_flat_map(
        |(w0, layers, classes)| {
            let perm: Vec<usize> = (0..layers.len() + 2).collect();
            (Just(w0), Just(layers), Just(classes), Just(perm).prop_shuffle())
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_consistent_chains_validate(
        (w0, layers, classes, perm) in chain_strategy(),
        pick in any::<prop::sample::Index>(),
        bump in 1usize..63,
        on_inputs in any::<bool>(),
    ) {
        let (g, chain_nodes) = chain(w0, &layers, classes, &perm);
        let v = g.clone().validate().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let n = chain_nodes.len();
        let mut sorted = v.topo.clone();
        sorted.sort_unstable();
        prop_assert_eq!(sorted, (0..n as u32).collect::<Vec<_>>());
        let pos = |id: u32| v.topo.iter().position(|&t| t == id).unwrap_or(usize::MAX);
        for node in &v.nodes {
            for src in &node.inputs {
                if let Source::Node(p) = src {
                    prop_assert!(pos(*p) < pos(node.id), "{} must come before {}", p, node.id);
                }
            }
        }
        // File position i holds chain position perm[i]; the chain order is the only topo order.
        let by_chain: Vec<u32> = (0..n).map(|c| perm.iter().position(|&p| p == c).unwrap_or(0) as u32).collect();
        prop_assert_eq!(&v.topo, &by_chain);
        prop_assert_eq!(v.loss, by_chain[n - 1]);
        prop_assert_eq!(v.nodes[v.loss as usize].output_width, 1);

        // Make one linear width inconsistent with its neighbour.
        let linears: Vec<usize> = (0..n).filter(|&c| chain_nodes[c].kind == "linear").collect();
        let target = linears[pick.index(linears.len())];
        let mut bad = g.clone();
        let file_pos = by_chain[target] as usize;
        let field = if on_inputs { &mut bad.nodes[file_pos].inputs } else { &mut bad.nodes[file_pos].outputs };
        let old = field.unwrap_or(1);
        *field = Some((old - 1 + bump) % 63 + 1); // another value in 1..=63
        let err = bad.validate().unwrap_err();
        // The mismatch shows at the target itself (inputs) or at the next width-checking node.
        let checker = if on_inputs {
            target
        } else {
            (target + 1..n).find(|&c| chain_nodes[c].kind != "relu" && chain_nodes[c].kind != "tanh").unwrap_or(n - 1)
        };
        let want_from = if checker == 0 { "image".to_string() } else { chain_nodes[checker - 1].id.clone() };
        match err {
            GraphError::ShapeMismatch { from, to, .. } => {
                prop_assert_eq!(to, chain_nodes[checker].id.clone());
                prop_assert_eq!(from, want_from);
            }
            other => prop_assert!(false, "expected ShapeMismatch, got {:?}", other),
        }
    }
}

fn mnist_mlp() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/mnist-mlp.toml")).unwrap()
}

#[test]
fn default_blocks_start_at_every_linear_fed_by_a_node() {
    let g = ModelGraph::parse_valid(&mnist_mlp()).unwrap();
    assert_eq!(g.blocks, ["fc1", "fc2", "fc3"]);
    let blocks: Vec<u32> = g.nodes.iter().map(|n| n.block).collect();
    assert_eq!(blocks, [0, 0, 1, 1, 2, 2]);
    assert_eq!(g.block_nodes(1), [2, 3]);
    assert_eq!(g.nodes[2].input_crosses_block, [true]);
    assert_eq!(g.nodes[1].consumer_crosses_block, [true]);
    assert_eq!(g.nodes[4].consumer_crosses_block, [false]);
    // Exact mode records the blocks and changes nothing else.
    assert!(g.nodes.iter().all(|n| n.aux.is_none()));
    assert_eq!(g.nodes[1].inputs, [Source::Node(0)]);
    assert!(g.nodes[2].sends_gradient(0) && g.nodes[1].expects_gradient(0));
}

#[test]
fn local_mode_gives_every_block_output_but_the_last_a_head_and_the_labels() {
    use dcnr_model::{AuxHead, TrainingMode};
    let text = mnist_mlp().replace("in_flight = 1\n", "in_flight = 1\nmode = \"local\"\n");
    let g = ModelGraph::parse_valid(&text).unwrap();
    assert_eq!(g.mode(), TrainingMode::Local);
    let head = AuxHead { inputs: 256, hidden: 0, classes: 10, labels_port: 1 };
    assert_eq!(g.nodes[1].aux, Some(head));
    assert_eq!(g.nodes[3].aux, Some(head));
    assert!(g.nodes.iter().filter(|n| n.id != 1 && n.id != 3).all(|n| n.aux.is_none()));
    assert_eq!(g.nodes[1].inputs, [Source::Node(0), Source::Labels]);
    assert_eq!(g.nodes[1].layer_inputs(), [Source::Node(0)]);
    assert_eq!(g.nodes[1].port_name(1), "labels");
    assert_eq!(g.param_count(), 784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10 + 2 * (256 * 10 + 10));
    // Gradients stay inside blocks.
    assert!(!g.nodes[2].sends_gradient(0) && !g.nodes[1].expects_gradient(0));
    assert!(g.nodes[1].sends_gradient(0) && g.nodes[0].expects_gradient(0));

    let text = text.replace("[optimizer]", "[training.aux]\nhidden = 64\n\n[optimizer]");
    let g = ModelGraph::parse_valid(&text).unwrap();
    let head = g.nodes[1].aux.unwrap();
    assert_eq!(head.layers(), [(256, 64), (64, 10)]);
    assert_eq!(head.param_count(), 256 * 64 + 64 + 64 * 10 + 10);
    let (_, msg) = fails(ModelGraph::parse(&text.replace("hidden = 64", "hidden = 2000000")).unwrap());
    assert_eq!(msg, "training.aux.hidden = 2000000 is out of range (0..=1048576)");
    let err = ModelGraph::parse(&text.replace("mode = \"local\"", "mode = \"nearby\"")).unwrap_err();
    assert!(err.to_string().contains("nearby"), "{err}");
}

#[test]
fn named_blocks_must_cover_every_node_and_be_contiguous() {
    let named = |blocks: &[Option<&str>]| {
        let mut g = base();
        for (n, b) in g.nodes.iter_mut().zip(blocks) {
            n.block = b.map(str::to_string);
        }
        g
    };
    let g = named(&[Some("a"), Some("a"), Some("a"), Some("b")]).validate().unwrap();
    assert_eq!(g.blocks, ["a", "b"]);
    let blocks: Vec<u32> = g.nodes.iter().map(|n| n.block).collect();
    assert_eq!(blocks, [0, 0, 0, 1]);

    let (err, msg) = fails(named(&[Some("a"), Some("a"), None, Some("b")]));
    assert_eq!(err, GraphError::BlockUnmarked("fc2".into()));
    assert_eq!(msg, "node `fc2` has no `block` while other nodes have one: mark every node or none");
    let (err, msg) = fails(named(&[Some("a"), Some("b"), Some("a"), Some("a")]));
    assert_eq!(err, GraphError::BlockSplit { block: "a".into(), node: "fc2".into() });
    assert_eq!(
        msg,
        "block `a` is not contiguous in the topological order: it resumes at node `fc2` after another block"
    );
}

#[test]
fn training_recipes_parse_and_bad_values_are_named() {
    let with =
        |training: &str| ModelGraph::parse(&BASE.replacen("[training]\n", &format!("[training]\n{training}\n"), 1));
    let g = with(
        "lr_schedule = { kind = \"cosine\", warmup_steps = 10, decay_steps = 100, min_factor = 0.1 }\nclip_grad_norm = 1.0\nlabel_smoothing = 0.1",
    )
    .unwrap();
    let r = g.training.recipe();
    assert_eq!(r.schedule, dcnr_model::Schedule::Cosine { warmup_steps: 10, decay_steps: 100, min_factor: 0.1 });
    assert_eq!((r.clip_grad_norm, r.label_smoothing), (Some(1.0), 0.1));
    assert!(g.validate().is_ok());

    for (training, what) in [
        ("lr_schedule = { kind = \"cosine\", decay_steps = 0 }", "training.lr_schedule.decay_steps"),
        ("lr_schedule = { kind = \"step\", every = 10, gamma = 1.5 }", "training.lr_schedule.gamma"),
        ("lr_schedule = { kind = \"warmup\", warmup_steps = 0 }", "training.lr_schedule.warmup_steps"),
        ("clip_grad_norm = 0.0", "training.clip_grad_norm"),
        ("label_smoothing = 1.0", "training.label_smoothing"),
    ] {
        assert_eq!(out_of_range(with(training).unwrap()).0, what, "{training}");
    }
    assert!(with("lr_schedule = { kind = \"exponential\" }").is_err(), "unknown schedules are refused");

    let mut g = base();
    g.optimizer = OptimizerSpec::Adamw { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 2.0 };
    assert_eq!(out_of_range(g).0, "optimizer.weight_decay");
    let mut g = base();
    g.optimizer = OptimizerSpec::Adamw { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05 };
    assert!(g.validate().is_ok());
}

#[test]
fn every_shipped_model_validates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") && path.file_name().is_some_and(|f| f != "Cargo.toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            ModelGraph::parse_valid(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 5, "the MLPs, the CNNs and the residual MLP");
}

/// BASE with a residual join: fc1 -> relu1 -> fc1b linear(5,5) -> ln -> drop -> sum = add(drop,
/// relu1) -> fc2, and `extra` inserted into the node list.
fn residual(ln_width: usize, rate: &str, extra_edges: &str) -> String {
    let nodes = format!(
        r#"[[node]]
id = "fc1b"
kind = "linear"
inputs = 5
outputs = 5

[[node]]
id = "ln"
kind = "layer_norm"
inputs = {ln_width}

[[node]]
id = "drop"
kind = "dropout"
{rate}

[[node]]
id = "sum"
kind = "add"

[[node]]
id = "fc2""#
    );
    let edges = format!(
        r#"[[edge]]
from = "relu1"
to = "fc1b"

[[edge]]
from = "fc1b"
to = "ln"

[[edge]]
from = "ln"
to = "drop"
{extra_edges}
[[edge]]
from = "sum"
to = "fc2""#
    );
    BASE.replacen("[[node]]\nid = \"fc2\"", &nodes, 1).replacen("[[edge]]\nfrom = \"relu1\"\nto = \"fc2\"", &edges, 1)
}

const JOIN: &str = r#"
[[edge]]
from = "drop"
to = "sum"

[[edge]]
from = "relu1"
to = "sum"
"#;

#[test]
fn a_residual_join_validates_with_ports_in_edge_order_and_one_block_around_it() {
    let g = ModelGraph::parse_valid(&residual(5, "rate = 0.25", JOIN)).unwrap();
    let id = |name: &str| g.nodes.iter().position(|n| n.name == name).unwrap();
    let sum = &g.nodes[id("sum")];
    assert_eq!(sum.kind, NodeKind::Add);
    assert_eq!(sum.inputs, vec![Source::Node(id("drop") as u32), Source::Node(id("relu1") as u32)]);
    assert_eq!(sum.input_widths, vec![5, 5]);
    assert_eq!(g.nodes[id("drop")].kind, NodeKind::Dropout { rate: 0.25 });
    assert_eq!(g.nodes[id("ln")].kind, NodeKind::LayerNorm { width: 5 });
    assert_eq!(g.nodes[id("ln")].param_count(), 10);
    // relu1 alone crosses into the join's block, whose output alone crosses into fc2's.
    assert_ne!(g.nodes[id("fc1b")].block, g.nodes[id("relu1")].block);
    assert_eq!(g.nodes[id("sum")].block, g.nodes[id("fc1b")].block);
    assert_ne!(g.nodes[id("fc2")].block, g.nodes[id("sum")].block);
    // A skip from fc1 crosses the cut before fc1b beside relu1, so no block starts there.
    let g = ModelGraph::parse_valid(&residual(5, "rate = 0.25", &JOIN.replace("from = \"relu1\"", "from = \"fc1\"")))
        .unwrap();
    assert_eq!(g.nodes[id("fc1b")].block, g.nodes[id("fc1")].block);
    assert_ne!(g.nodes[id("fc2")].block, g.nodes[id("sum")].block);
    // Explicit ports may reverse the order.
    let swapped = "[[edge]]\nfrom = \"drop\"\nto = \"sum\"\nport = \"b\"\n\n[[edge]]\nfrom = \"relu1\"\nto = \"sum\"\nport = \"a\"\n";
    let g = ModelGraph::parse_valid(&residual(5, "rate = 0.25", swapped)).unwrap();
    assert_eq!(g.nodes[id("sum")].inputs, vec![Source::Node(id("relu1") as u32), Source::Node(id("drop") as u32)]);
}

#[test]
fn new_kinds_give_precise_errors() {
    let cases: [(String, &str); 7] = [
        (residual(4, "rate = 0.25", JOIN), "layer_norm normalises width 4, gets 5"),
        (residual(5, "", JOIN), "node `drop`: rate = missing is out of range (required for dropout)"),
        (residual(5, "rate = 1.0", JOIN), "node `drop`: rate = 1 is out of range (0 <= rate < 1)"),
        (
            residual(5, "rate = 0.1", &JOIN.replace("from = \"relu1\"", "from = \"image\"")),
            "edge image -> sum.b: add joins equal widths, gets 5 and 4",
        ),
        (residual(5, "rate = 0.1", &format!("{JOIN}\n[[edge]]\nfrom = \"fc1\"\nto = \"sum\"\n")), "(none given)"),
        (
            residual(5, "rate = 0.1", &JOIN[..JOIN.find("[[edge]]\nfrom = \"relu1\"").unwrap()]),
            "port `b` has 0 incoming edges",
        ),
        (
            BASE.replace("kind = \"relu\"", "kind = \"relu\"\nrate = 0.5"),
            "node `relu1`: rate = set is out of range (only for dropout)",
        ),
    ];
    for (text, want) in cases {
        let msg = ModelGraph::parse_valid(&text).unwrap_err().to_string();
        assert!(msg.contains(want), "want {want:?} in: {msg}");
    }
}

#[test]
fn concat_widths_add_up_and_layer_norm_takes_only_inputs() {
    let cat = residual(5, "rate = 0.0", JOIN)
        .replace("kind = \"add\"", "kind = \"concat\"")
        .replace("id = \"fc2\"\nkind = \"linear\"\ninputs = 5", "id = \"fc2\"\nkind = \"linear\"\ninputs = 10");
    let g = ModelGraph::parse_valid(&cat).unwrap();
    let sum = g.nodes.iter().find(|n| n.name == "sum").unwrap();
    assert_eq!((sum.kind, sum.output_width), (NodeKind::Concat, 10));
    let wrong = residual(5, "rate = 0.1", JOIN).replace("kind = \"add\"", "kind = \"concat\"");
    let msg = ModelGraph::parse_valid(&wrong).unwrap_err().to_string();
    assert!(msg.contains("linear expects 5 input features, gets 10"), "{msg}");
    let ln = residual(5, "rate = 0.1", JOIN)
        .replace("inputs = 5\n\n[[node]]\nid = \"drop\"", "inputs = 5\noutputs = 5\n\n[[node]]\nid = \"drop\"");
    let msg = ModelGraph::parse_valid(&ln).unwrap_err().to_string();
    assert!(msg.contains("layer_norm takes only inputs"), "{msg}");
}

/// BASE with fc1 replaced by `conv` (the given fields) -> `flat` -> fc1 linear(w, 5), and
/// `[data]` extended by `data`.
fn spatial(data: &str, conv: &str, width: usize) -> String {
    BASE.replace("classes = 3\n", &format!("classes = 3\n{data}\n"))
        .replacen(
            "[[node]]\nid = \"fc1\"\nkind = \"linear\"\ninputs = 4",
            &format!("[[node]]\nid = \"conv\"\n{conv}\n\n[[node]]\nid = \"flat\"\nkind = \"flatten\"\n\n[[node]]\nid = \"fc1\"\nkind = \"linear\"\ninputs = {width}"),
            1,
        )
        .replacen(
            "[[edge]]\nfrom = \"image\"\nto = \"fc1\"",
            "[[edge]]\nfrom = \"image\"\nto = \"conv\"\n\n[[edge]]\nfrom = \"conv\"\nto = \"flat\"\n\n[[edge]]\nfrom = \"flat\"\nto = \"fc1\"",
            1,
        )
}

#[test]
fn spatial_kinds_carry_shapes_and_give_precise_errors() {
    // image [1, 2, 2] -> conv (3 channels, 2x2, padding 1) = [3, 3, 3] -> flat -> fc1(27, 5).
    let conv = "kind = \"conv2d\"\nchannels = 3\nkernel = 2\npadding = 1";
    let g = ModelGraph::parse_valid(&spatial("shape = [1, 2, 2]", conv, 27)).unwrap();
    assert_eq!(g.nodes[0].kind, NodeKind::Conv2d { channels: 3, kernel: 2, stride: 1, padding: 1, input: [1, 2, 2] });
    assert_eq!((g.nodes[0].output_shape, g.nodes[0].output_width, g.nodes[0].param_count()), (Some([3, 3, 3]), 27, 15));
    assert_eq!((g.nodes[1].output_shape, g.nodes[1].output_width), (None, 27));

    let cases = [
        (spatial("", conv, 27), "conv2d needs a spatial input: give `[data] shape` or a `reshape` before it"),
        (
            spatial("shape = [1, 2, 3]", conv, 27),
            "data.shape = [1, 2, 3] is out of range (channels x height x width = feature_size 4)",
        ),
        (
            spatial("shape = [1, 2, 2]", "kind = \"conv2d\"\nchannels = 3\nkernel = 5", 27),
            "conv2d window 5 is larger than the padded input 2x2",
        ),
        (
            spatial("shape = [1, 2, 2]", "kind = \"conv2d\"\nkernel = 2", 27),
            "node `conv`: channels = missing is out of range (required for this kind)",
        ),
        (
            spatial("shape = [1, 2, 2]", "kind = \"conv2d\"\nchannels = 3\nkernel = 2\nstride = 0", 27),
            "node `conv`: stride = 0 is out of range (1..=64)",
        ),
        (spatial("shape = [1, 2, 2]", conv, 12), "linear expects 12 input features, gets 27"),
        (spatial("", "kind = \"reshape\"\nshape = [2, 2, 2]", 8), "reshape to [2, 2, 2] needs width 8, gets 4"),
        (
            spatial("", "kind = \"max_pool2d\"\nkernel = 2\npadding = 1", 1),
            "node `conv`: padding = set is out of range (only for conv2d)",
        ),
        (
            BASE.replace("kind = \"relu\"", "kind = \"relu\"\nkernel = 3"),
            "node `relu1`: kernel = set is out of range (only for conv2d, max_pool2d, avg_pool2d)",
        ),
    ];
    for (text, want) in cases {
        let msg = ModelGraph::parse_valid(&text).unwrap_err().to_string();
        assert!(msg.contains(want), "want {want:?} in: {msg}");
    }
    // A reshape gives a flat input the shape a pool needs.
    let text = spatial("", "kind = \"reshape\"\nshape = [1, 2, 2]", 4)
        .replace("id = \"flat\"\nkind = \"flatten\"", "id = \"flat\"\nkind = \"avg_pool2d\"\nkernel = 1");
    let g = ModelGraph::parse_valid(&text).unwrap();
    assert_eq!(g.nodes[1].kind, NodeKind::AvgPool2d { kernel: 1, stride: 1, input: [1, 2, 2] });
}

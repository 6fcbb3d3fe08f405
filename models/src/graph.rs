//! The model-graph file format (TOML) and its validation.
//!
//! A graph names data sources (the dataset's features and labels), nodes (one VNode each) and
//! edges between them. `ModelGraph::parse` only checks syntax; `ModelGraph::validate` checks
//! everything a VNode relies on and returns a [`ValidGraph`], so code that holds a `ValidGraph`
//! never re-checks shapes or reachability.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// Largest feature width a node may have; beyond it a typo, not a model, is the likely cause.
pub const MAX_FEATURES: usize = 1 << 20;
/// Most channels a conv2d may produce.
pub const MAX_CHANNELS: usize = 1 << 16;
/// Largest kernel, stride or padding of a convolution or pooling window.
pub const MAX_WINDOW: usize = 64;
/// Largest parameter count of one VNode (256 Mi floats = 1 GiB).
pub const MAX_PARAMS_PER_NODE: usize = 1 << 28;
/// Most nodes in one graph.
pub const MAX_NODES: usize = 4096;
/// Most data-parallel pipelines a job may ask for.
pub const MAX_PIPELINES: u32 = 64;
/// Largest batch size accepted.
pub const MAX_BATCH: usize = 1 << 16;

/// Errors in a model graph, each naming the offending part.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GraphError {
    /// The TOML itself does not parse or has unknown/missing fields.
    #[error("model graph is not valid TOML for the DCNR format: {0}")]
    Syntax(String),
    /// A node has a kind this version does not know.
    #[error("node `{node}`: unknown kind `{kind}` (known kinds: {known})")]
    UnknownKind { node: String, kind: String, known: String },
    /// Two nodes or sources share one name.
    #[error("name `{0}` is used twice (node and source names must be unique)")]
    DuplicateName(String),
    /// An edge names a node or source that does not exist.
    #[error("edge {from} -> {to}: unknown {which} `{name}`")]
    DanglingEdge { from: String, to: String, which: &'static str, name: String },
    /// An edge targets an input port the node kind does not have.
    #[error("edge {from} -> {to}: node `{to}` (kind {kind}) has no input port `{port}` (ports: {ports})")]
    UnknownPort { from: String, to: String, kind: String, port: String, ports: String },
    /// An input port is fed by zero or several edges.
    #[error("node `{node}`: input port `{port}` has {count} incoming edges (exactly 1 required)")]
    PortArity { node: String, port: String, count: usize },
    /// A node's output goes nowhere and it is not a loss.
    #[error("node `{0}` has no consumer: every non-loss node must feed another node")]
    Unused(String),
    /// The graph has a cycle.
    #[error("the graph has a cycle through node `{0}`")]
    Cycle(String),
    /// The graph has no loss node, or more than one.
    #[error("the graph must have exactly one loss node, found {0}")]
    LossCount(usize),
    /// Shapes of connected nodes disagree.
    #[error("shape mismatch on edge {from} -> {to}.{port}: {detail}")]
    ShapeMismatch { from: String, to: String, port: String, detail: String },
    /// A size is zero or absurdly large.
    #[error("{what} = {value} is out of range ({range})")]
    OutOfRange { what: String, value: String, range: String },
    /// A loss consumes something that is not the labels source, or labels feed a non-loss.
    #[error("labels source `{0}` may only feed the `labels` port of a loss node")]
    LabelsMisuse(String),
    /// Some nodes name a block and others do not.
    #[error("node `{0}` has no `block` while other nodes have one: mark every node or none")]
    BlockUnmarked(String),
    /// A block's nodes are not contiguous in the canonical topological order.
    #[error(
        "block `{block}` is not contiguous in the topological order: it resumes at node `{node}` after another block"
    )]
    BlockSplit { block: String, node: String },
    /// A block other than the last has zero or several nodes whose output leaves it.
    #[error(
        "block `{block}` must have exactly one node whose output leaves it (its block output), found {}: {}",
        nodes.len(),
        nodes.join(", ")
    )]
    BlockOutputs { block: String, nodes: Vec<String> },
    /// The loss is not in the last block.
    #[error("the loss `{loss}` is in block `{block}`, but it must be in the last block `{last}`")]
    LossBlock { loss: String, block: String, last: String },
}

/// A whole model-graph file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelGraph {
    /// Name and root seed.
    pub model: ModelMeta,
    /// Where samples come from.
    pub data: DataSpec,
    /// Training recipe.
    pub training: TrainingSpec,
    /// Optimizer applied by every VNode to its own parameters.
    pub optimizer: OptimizerSpec,
    /// Nodes in file order; their position is their VNode id.
    #[serde(rename = "node", default)]
    pub nodes: Vec<NodeSpec>,
    /// Directed edges `from -> to[.port]`.
    #[serde(rename = "edge", default)]
    pub edges: Vec<Edge>,
}

/// The `[model]` table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelMeta {
    /// Human name of the model.
    pub name: String,
    /// Root seed of every random stream of a job on this graph.
    #[serde(default)]
    pub seed: u64,
}

/// The `[data]` table: a dataset and the names under which its features and labels enter the graph.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// Dataset name: `mnist` or `fashion-mnist`.
    pub dataset: String,
    /// Source name of the features (a flat f32 vector per sample).
    #[serde(default = "default_features")]
    pub features: String,
    /// Source name of the integer class labels.
    #[serde(default = "default_labels")]
    pub labels: String,
    /// Per-sample feature width (784 for 28x28 images).
    pub feature_size: usize,
    /// Number of classes of the labels.
    pub classes: usize,
    /// Pixel normalisation `(x/255 - mean) / std`.
    #[serde(default)]
    pub normalize: Normalize,
    /// The features' spatial shape `[channels, height, width]`, row-major, whose product is
    /// `feature_size`; convolutions and pooling need it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<Shape>,
}

/// A per-sample spatial shape `[channels, height, width]`: how a flat row of that many values
/// is read by convolutions and pooling (row-major).
pub type Shape = [usize; 3];

fn default_features() -> String {
    "image".into()
}
fn default_labels() -> String {
    "label".into()
}

/// Feature normalisation constants.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Normalize {
    /// Subtracted after scaling to [0, 1].
    pub mean: f32,
    /// Divisor after subtracting the mean.
    pub std: f32,
}

impl Default for Normalize {
    fn default() -> Self {
        Normalize { mean: 0.0, std: 1.0 }
    }
}

/// The `[training]` table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainingSpec {
    /// Samples per micro-batch (one step = one micro-batch = one parameter update).
    pub batch_size: usize,
    /// Passes over the training set (ignored when `steps` is set).
    #[serde(default = "default_epochs")]
    pub epochs: u32,
    /// Exact number of steps; overrides `epochs`.
    #[serde(default)]
    pub steps: Option<u64>,
    /// Micro-batches in flight in the pipeline (1 = synchronous).
    #[serde(default = "default_in_flight")]
    pub in_flight: u32,
    /// Test-set batch size for evaluation.
    #[serde(default = "default_eval_batch")]
    pub eval_batch_size: usize,
    /// Whether gradients cross block boundaries (`exact`) or each block learns locally (`local`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub mode: TrainingMode,
    /// The auxiliary heads of local mode.
    #[serde(default, skip_serializing_if = "is_default")]
    pub aux: AuxSpec,
    /// How tensors crossing a block boundary are encoded (activations, and gradients in exact mode).
    #[serde(default)]
    pub wire: WireFormat,
    /// Data-parallel copies of the graph, each placed on its own PNodes and trained on its own
    /// shard of every epoch; they average every `sync_every` steps ([`OuterSpec`]).
    #[serde(default = "default_pipelines", skip_serializing_if = "is_one")]
    pub pipelines: u32,
    /// Steps each pipeline takes between averaging rounds (an epoch's end and the last step
    /// close a round too).
    #[serde(default = "default_sync_every", skip_serializing_if = "is_default_sync_every")]
    pub sync_every: u64,
    /// What a round applies to the averaged parameter change.
    #[serde(default, skip_serializing_if = "is_default")]
    pub outer: OuterSpec,
    /// Learning-rate schedule (default constant).
    #[serde(default, skip_serializing_if = "is_default")]
    pub lr_schedule: Schedule,
    /// Per-VNode gradient clipping: the L2 norm its gradients are scaled down to (off by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_grad_norm: Option<f32>,
    /// Label smoothing of the loss, in [0, 1) (0 = plain one-hot targets).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub label_smoothing: f32,
}

fn is_zero(v: &f32) -> bool {
    *v == 0.0
}

impl TrainingSpec {
    /// The recipe every VNode applies.
    pub fn recipe(&self) -> Recipe {
        Recipe {
            schedule: self.lr_schedule,
            clip_grad_norm: self.clip_grad_norm,
            label_smoothing: self.label_smoothing,
        }
    }
}

fn default_pipelines() -> u32 {
    1
}
fn is_one(v: &u32) -> bool {
    *v == 1
}
fn default_sync_every() -> u64 {
    100
}
fn is_default_sync_every(v: &u64) -> bool {
    *v == default_sync_every()
}

/// `[training.outer]`: the outer optimizer of pipeline averaging (DiLoCo's outer step).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OuterSpec {
    /// `nesterov` (SGD with Nesterov momentum on the averaged change) or `average` (take the
    /// average as it is).
    #[serde(default)]
    pub kind: OuterKind,
    /// Outer learning rate (nesterov).
    #[serde(default = "default_outer_lr")]
    pub lr: f32,
    /// Outer momentum (nesterov).
    #[serde(default = "default_outer_momentum")]
    pub momentum: f32,
    /// Encoding of the parameter changes the copies exchange.
    #[serde(default)]
    pub wire: WireFormat,
}

impl Default for OuterSpec {
    fn default() -> Self {
        OuterSpec {
            kind: OuterKind::default(),
            lr: default_outer_lr(),
            momentum: default_outer_momentum(),
            wire: WireFormat::F32,
        }
    }
}

fn default_outer_lr() -> f32 {
    0.7
}
fn default_outer_momentum() -> f32 {
    0.9
}

/// The outer step's rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OuterKind {
    /// Nesterov momentum SGD on the outer gradient (anchor minus average), as in DiLoCo.
    #[default]
    Nesterov,
    /// Plain averaging: every copy takes the mean of the copies' parameters.
    Average,
}

impl OuterKind {
    /// The name used in model files.
    pub fn name(self) -> &'static str {
        match self {
            OuterKind::Nesterov => "nesterov",
            OuterKind::Average => "average",
        }
    }
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// How gradients travel between blocks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainingMode {
    /// End-to-end backpropagation: gradients cross every edge.
    #[default]
    Exact,
    /// Decoupled local learning: every block but the last trains through its own auxiliary head
    /// and no gradient crosses a block boundary, so no block waits for the blocks after it.
    Local,
}

impl TrainingMode {
    /// The name as written in graph files.
    pub fn name(self) -> &'static str {
        match self {
            TrainingMode::Exact => "exact",
            TrainingMode::Local => "local",
        }
    }
}

/// `[training.aux]`: the shape of local mode's auxiliary heads.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuxSpec {
    /// Hidden width: 0 gives `linear(width -> classes)`, H gives `linear(width -> H) -> relu ->
    /// linear(H -> classes)`.
    #[serde(default)]
    pub hidden: usize,
}

/// The auxiliary classifier a block output carries in local mode; its loss (softmax
/// cross-entropy against the labels) is what trains the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuxHead {
    /// Width of the block output the head reads.
    pub inputs: usize,
    /// Hidden width (0: a single linear layer).
    pub hidden: usize,
    /// Number of classes (logit width).
    pub classes: usize,
    /// The node's input port that reads the labels (its last port).
    pub labels_port: u32,
}

impl AuxHead {
    /// The head's linear layers as (inputs, outputs), in order.
    pub fn layers(&self) -> Vec<(usize, usize)> {
        if self.hidden == 0 {
            vec![(self.inputs, self.classes)]
        } else {
            vec![(self.inputs, self.hidden), (self.hidden, self.classes)]
        }
    }

    /// Number of trainable parameters of the head.
    pub fn param_count(&self) -> usize {
        self.layers().iter().map(|&(i, o)| i.saturating_mul(o).saturating_add(o)).fold(0, usize::saturating_add)
    }
}

/// Encoding of the tensors VNodes exchange across a block boundary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireFormat {
    /// 32-bit floats: exact.
    #[default]
    F32,
    /// IEEE half precision, rounded to nearest even.
    F16,
    /// bfloat16 (f32's exponent, 8 bits of mantissa), rounded to nearest even.
    Bf16,
    /// Signed 8-bit codes with one f32 scale (absmax / 127) per block of consecutive elements.
    Int8,
}

impl WireFormat {
    /// The name used in model files.
    pub fn name(self) -> &'static str {
        match self {
            WireFormat::F32 => "f32",
            WireFormat::F16 => "f16",
            WireFormat::Bf16 => "bf16",
            WireFormat::Int8 => "int8",
        }
    }
}

fn default_epochs() -> u32 {
    1
}
/// Most micro-batches a job may keep in flight.
pub const MAX_IN_FLIGHT: u32 = 64;

fn default_in_flight() -> u32 {
    1
}
fn default_eval_batch() -> usize {
    1000
}

/// The `[optimizer]` table.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum OptimizerSpec {
    /// Stochastic gradient descent with (heavy-ball) momentum.
    Sgd {
        /// Learning rate.
        lr: f32,
        /// Momentum factor (0 disables).
        #[serde(default)]
        momentum: f32,
    },
    /// Adam (Kingma & Ba), without weight decay.
    Adam {
        /// Learning rate.
        lr: f32,
        /// First-moment decay.
        #[serde(default = "default_beta1")]
        beta1: f32,
        /// Second-moment decay.
        #[serde(default = "default_beta2")]
        beta2: f32,
        /// Denominator epsilon.
        #[serde(default = "default_eps")]
        eps: f32,
    },
    /// AdamW (Loshchilov & Hutter): Adam with weight decay applied to the parameters directly,
    /// scaled by the (scheduled) learning rate, not through the gradient.
    Adamw {
        /// Learning rate.
        lr: f32,
        /// First-moment decay.
        #[serde(default = "default_beta1")]
        beta1: f32,
        /// Second-moment decay.
        #[serde(default = "default_beta2")]
        beta2: f32,
        /// Denominator epsilon.
        #[serde(default = "default_eps")]
        eps: f32,
        /// Decoupled weight decay per step (times the learning rate).
        #[serde(default = "default_weight_decay")]
        weight_decay: f32,
    },
}

fn default_weight_decay() -> f32 {
    0.01
}

/// How the learning rate changes with the step number: a factor of the optimizer's `lr`,
/// computed from the number of updates applied, so a resumed job continues on the same curve.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Default)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Schedule {
    /// The same rate throughout (after the warm-up, if any).
    #[default]
    Constant,
    /// Linear warm-up over `warmup_steps`, then a half cosine from 1 down to `min_factor` over
    /// `decay_steps`, then `min_factor`.
    Cosine {
        /// Steps of linear warm-up from lr/warmup_steps to lr.
        #[serde(default)]
        warmup_steps: u64,
        /// Steps of decay after the warm-up.
        decay_steps: u64,
        /// Final factor of `lr`.
        #[serde(default)]
        min_factor: f32,
    },
    /// Linear warm-up, then times `gamma` every `every` steps.
    Step {
        /// Steps of linear warm-up.
        #[serde(default)]
        warmup_steps: u64,
        /// Steps between decays.
        every: u64,
        /// Factor applied at each decay.
        gamma: f32,
    },
    /// Linear warm-up over `warmup_steps`, then constant.
    Warmup {
        /// Steps of linear warm-up.
        warmup_steps: u64,
    },
}

impl Schedule {
    /// The factor of `lr` for the update that follows `applied` updates.
    pub fn factor(&self, applied: u64) -> f32 {
        let warm = |w: u64| if applied < w { (applied + 1) as f64 / w as f64 } else { 1.0 };
        let f = match *self {
            Schedule::Constant => 1.0,
            Schedule::Warmup { warmup_steps } => warm(warmup_steps),
            Schedule::Cosine { warmup_steps, decay_steps, min_factor } => {
                if applied < warmup_steps {
                    warm(warmup_steps)
                } else {
                    let p = ((applied - warmup_steps) as f64 / decay_steps.max(1) as f64).min(1.0);
                    // libm, not the platform's: the same bits on every machine of a class.
                    let min = f64::from(min_factor);
                    min + (1.0 - min) * 0.5 * (1.0 + libm::cos(std::f64::consts::PI * p))
                }
            }
            Schedule::Step { warmup_steps, every, gamma } => {
                if applied < warmup_steps {
                    warm(warmup_steps)
                } else {
                    let k = (applied - warmup_steps) / every.max(1);
                    libm::pow(f64::from(gamma), k.min(i32::MAX as u64) as f64)
                }
            }
        };
        f as f32
    }
}

/// What a VNode applies around its optimizer and loss, from `[training]`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Recipe {
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Scale a VNode's gradients down to this L2 norm (over all its parameter tensors) when
    /// they exceed it.
    pub clip_grad_norm: Option<f32>,
    /// Weight of the uniform distribution mixed into the loss's one-hot target.
    pub label_smoothing: f32,
}

fn default_beta1() -> f32 {
    0.9
}
fn default_beta2() -> f32 {
    0.999
}
fn default_eps() -> f32 {
    1e-8
}

/// One `[[node]]`: a layer, activation or loss, which becomes one VNode.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// Unique name.
    pub id: String,
    /// Kind name, resolved by validation (kept as text so an unknown kind gets a precise error).
    pub kind: String,
    /// Input width (linear).
    #[serde(default)]
    pub inputs: Option<usize>,
    /// Output width (linear).
    #[serde(default)]
    pub outputs: Option<usize>,
    /// Fraction of activations zeroed in training (dropout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f32>,
    /// Output channels (conv2d).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<usize>,
    /// Square window side (conv2d, max_pool2d, avg_pool2d).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<usize>,
    /// Window step (conv2d: default 1; pools: default the kernel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stride: Option<usize>,
    /// Zeros added on every side (conv2d; default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub padding: Option<usize>,
    /// The spatial shape a reshape gives its input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<Shape>,
    /// Block this node belongs to; when no node names one, blocks follow from the graph.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<String>,
}

/// One `[[edge]]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Edge {
    /// Producer: a node id or a data source name.
    pub from: String,
    /// Consumer node id.
    pub to: String,
    /// Input port of the consumer; defaults to its only port.
    #[serde(default)]
    pub port: Option<String>,
}

/// Node kinds this version runs. New kinds add a variant here, a shape rule in `output_width`,
/// and a layer in the vnode crate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeKind {
    /// Affine map `y = x W + b`, W of shape [inputs, outputs].
    Linear {
        /// Input width.
        inputs: usize,
        /// Output width.
        outputs: usize,
    },
    /// Elementwise max(x, 0).
    Relu,
    /// Elementwise tanh.
    Tanh,
    /// Elementwise GELU, the exact form `x·Φ(x)` (Φ the standard normal CDF, through erf).
    Gelu,
    /// Per-sample normalisation over the width, then a learned scale and shift (ε = 1e-5).
    LayerNorm {
        /// The normalised width.
        width: usize,
    },
    /// Zeroes each activation with probability `rate` in training and scales the rest by
    /// 1/(1 − rate); the identity in evaluation. Masks come from the job's seed streams.
    Dropout {
        /// Probability of zeroing, 0 <= rate < 1.
        rate: f32,
    },
    /// Elementwise sum of two inputs of one width (a residual join).
    Add,
    /// The two inputs side by side: width a + width b.
    Concat,
    /// 2-D convolution of a `[c, h, w]` input with `channels` square filters, plus a bias.
    Conv2d {
        /// Output channels.
        channels: usize,
        /// Filter side.
        kernel: usize,
        /// Step between windows.
        stride: usize,
        /// Zeros on every side.
        padding: usize,
        /// The input's shape, known once shapes are inferred.
        input: Shape,
    },
    /// The maximum of each `kernel`×`kernel` window, per channel.
    MaxPool2d {
        /// Window side.
        kernel: usize,
        /// Step between windows.
        stride: usize,
        /// The input's shape, known once shapes are inferred.
        input: Shape,
    },
    /// The mean of each `kernel`×`kernel` window, per channel.
    AvgPool2d {
        /// Window side.
        kernel: usize,
        /// Step between windows.
        stride: usize,
        /// The input's shape, known once shapes are inferred.
        input: Shape,
    },
    /// Forgets the input's spatial shape; the values pass unchanged.
    Flatten,
    /// Gives a flat input a spatial shape; the values pass unchanged.
    Reshape {
        /// The shape given.
        shape: Shape,
    },
    /// Mean softmax cross-entropy of logits against integer labels; starts the backward wave.
    SoftmaxCrossEntropy {
        /// Number of classes (logit width).
        classes: usize,
    },
}

/// Names accepted in `kind = "..."`.
pub const KNOWN_KINDS: &[&str] = &[
    "linear",
    "relu",
    "tanh",
    "gelu",
    "layer_norm",
    "dropout",
    "add",
    "concat",
    "conv2d",
    "max_pool2d",
    "avg_pool2d",
    "flatten",
    "reshape",
    "softmax_cross_entropy",
];

impl NodeKind {
    /// Input port names, in port order.
    pub fn ports(&self) -> &'static [&'static str] {
        match self {
            NodeKind::SoftmaxCrossEntropy { .. } => &["logits", "labels"],
            NodeKind::Add | NodeKind::Concat => &["a", "b"],
            _ => &["in"],
        }
    }

    /// Whether this node is a loss (has no consumer and starts backward).
    pub fn is_loss(&self) -> bool {
        matches!(self, NodeKind::SoftmaxCrossEntropy { .. })
    }

    /// Number of trainable parameters.
    pub fn param_count(&self) -> usize {
        match *self {
            NodeKind::Linear { inputs, outputs } => inputs * outputs + outputs,
            NodeKind::LayerNorm { width } => 2 * width,
            NodeKind::Conv2d { channels, kernel, input, .. } => {
                channels.saturating_mul(input[0].saturating_mul(kernel).saturating_mul(kernel)).saturating_add(channels)
            }
            _ => 0,
        }
    }

    /// Short kind name as written in graph files.
    pub fn name(&self) -> &'static str {
        match self {
            NodeKind::Linear { .. } => "linear",
            NodeKind::Relu => "relu",
            NodeKind::Tanh => "tanh",
            NodeKind::Gelu => "gelu",
            NodeKind::LayerNorm { .. } => "layer_norm",
            NodeKind::Dropout { .. } => "dropout",
            NodeKind::Add => "add",
            NodeKind::Concat => "concat",
            NodeKind::Conv2d { .. } => "conv2d",
            NodeKind::MaxPool2d { .. } => "max_pool2d",
            NodeKind::AvgPool2d { .. } => "avg_pool2d",
            NodeKind::Flatten => "flatten",
            NodeKind::Reshape { .. } => "reshape",
            NodeKind::SoftmaxCrossEntropy { .. } => "softmax_cross_entropy",
        }
    }
}

/// Where one input port of a validated node gets its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    /// The output of another VNode (by id).
    Node(u32),
    /// The features of the current micro-batch.
    Features,
    /// The labels of the current micro-batch.
    Labels,
}

/// A node after validation: its VNode id, resolved kind, input sources by port, and consumers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidNode {
    /// VNode id (position in the file).
    pub id: u32,
    /// Name from the file.
    pub name: String,
    /// Resolved kind.
    pub kind: NodeKind,
    /// One source per input port, in port order.
    pub inputs: Vec<Source>,
    /// Consumers of this node's output as (vnode id, port index), in edge order.
    pub consumers: Vec<(u32, u32)>,
    /// Per-sample output width.
    pub output_width: usize,
    /// Per input port, the per-sample width arriving there (for a labels port: the classes).
    #[serde(default)]
    pub input_widths: Vec<usize>,
    /// The output's spatial shape, when it has one (its product is `output_width`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_shape: Option<Shape>,
    /// Index of this node's block (blocks are numbered in the canonical topological order).
    #[serde(default)]
    pub block: u32,
    /// Per input port: whether its producer is a node of another block.
    #[serde(default)]
    pub input_crosses_block: Vec<bool>,
    /// Per consumer (the order of `consumers`): whether the consumer is in another block.
    #[serde(default)]
    pub consumer_crosses_block: Vec<bool>,
    /// The job's training mode, so a VNode knows whether gradients cross block boundaries.
    #[serde(default)]
    pub mode: TrainingMode,
    /// The job's encoding of tensors that cross a block boundary, packed by their producer.
    #[serde(default)]
    pub wire: WireFormat,
    /// In local mode, on the block output of every block but the last: its auxiliary head. Its
    /// labels arrive on port `labels_port`, an extra last entry of `inputs`.
    #[serde(default)]
    pub aux: Option<AuxHead>,
    /// The data-parallel pipeline this node belongs to (0 when the job has one).
    #[serde(default)]
    pub pipeline: u32,
    /// This node's id in pipeline 0: its parameters start from that node's seed stream, so every
    /// copy starts equal.
    #[serde(default)]
    pub origin: u32,
    /// With several pipelines: the VNode ids of this node's copies, by pipeline (itself
    /// included), the ones it averages with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub copies: Vec<u32>,
}

impl ValidNode {
    /// Trainable parameters of the node and of its auxiliary head.
    pub fn param_count(&self) -> usize {
        self.kind.param_count().saturating_add(self.aux.map_or(0, |a| a.param_count()))
    }

    /// The sources of the kind's own ports (without the auxiliary head's labels port).
    pub fn layer_inputs(&self) -> &[Source] {
        let n = self.kind.ports().len().min(self.inputs.len());
        &self.inputs[..n]
    }

    /// The per-sample width arriving on input port `port` (0 for a port it does not have).
    pub fn input_width(&self, port: usize) -> usize {
        self.input_widths.get(port).copied().unwrap_or(0)
    }

    /// Name of input port `port`.
    pub fn port_name(&self, port: usize) -> &'static str {
        match self.aux {
            Some(a) if port == a.labels_port as usize => "labels",
            _ => self.kind.ports().get(port).copied().unwrap_or("?"),
        }
    }

    /// Whether the gradient of input `port` goes back to its producer: it comes from a node, and
    /// in local mode that node is in this node's block.
    pub fn sends_gradient(&self, port: usize) -> bool {
        matches!(self.inputs.get(port), Some(Source::Node(_)))
            && !(self.mode == TrainingMode::Local && self.input_crosses_block.get(port).copied().unwrap_or(false))
    }

    /// Whether consumer number `i` (in `consumers` order) sends a gradient back.
    pub fn expects_gradient(&self, i: usize) -> bool {
        !(self.mode == TrainingMode::Local && self.consumer_crosses_block.get(i).copied().unwrap_or(false))
    }
}

/// A graph that passed validation; nodes are in id order and `topo` is a topological order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidGraph {
    /// The file as parsed.
    pub spec: ModelGraph,
    /// Nodes by id.
    pub nodes: Vec<ValidNode>,
    /// Node ids in a topological order (ties broken by id, so the order is canonical).
    pub topo: Vec<u32>,
    /// The loss node's id.
    pub loss: u32,
    /// Block names, by block index (for unnamed blocks, the name of their first node).
    #[serde(default)]
    pub blocks: Vec<String>,
}

impl ModelGraph {
    /// Parses TOML text; unknown fields are errors.
    pub fn parse(text: &str) -> Result<ModelGraph, GraphError> {
        toml::from_str(text).map_err(|e| GraphError::Syntax(e.to_string()))
    }

    /// Parses and validates.
    pub fn parse_valid(text: &str) -> Result<ValidGraph, GraphError> {
        Self::parse(text)?.validate()
    }

    /// Checks names, kinds, edges, arity, acyclicity, shapes and sizes.
    pub fn validate(self) -> Result<ValidGraph, GraphError> {
        check_sizes(&self)?;
        let mut kinds = self.nodes.iter().map(|n| resolve_kind(n, self.data.classes)).collect::<Result<Vec<_>, _>>()?;

        let mut ids: HashMap<&str, u32> = HashMap::new();
        for name in [&self.data.features, &self.data.labels] {
            if ids.insert(name.as_str(), u32::MAX).is_some() {
                return Err(GraphError::DuplicateName(name.clone()));
            }
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if ids.insert(n.id.as_str(), i as u32).is_some() {
                return Err(GraphError::DuplicateName(n.id.clone()));
            }
        }

        let mut inputs: Vec<Vec<Vec<Source>>> = kinds.iter().map(|k| vec![Vec::new(); k.ports().len()]).collect();
        let mut consumers: Vec<Vec<(u32, u32)>> = vec![Vec::new(); self.nodes.len()];
        for e in &self.edges {
            let dangling = |which, name: &str| GraphError::DanglingEdge {
                from: e.from.clone(),
                to: e.to.clone(),
                which,
                name: name.to_string(),
            };
            let to = match ids.get(e.to.as_str()) {
                Some(&id) if id != u32::MAX => id as usize,
                Some(_) => return Err(dangling("consumer node (a data source cannot consume)", &e.to)),
                None => return Err(dangling("consumer node", &e.to)),
            };
            let src = if e.from == self.data.features {
                Source::Features
            } else if e.from == self.data.labels {
                Source::Labels
            } else {
                match ids.get(e.from.as_str()) {
                    Some(&id) => Source::Node(id),
                    None => return Err(dangling("producer", &e.from)),
                }
            };
            let kind = kinds[to];
            let ports = kind.ports();
            let port = match &e.port {
                None if ports.len() == 1 => 0,
                None => default_port(kind, &src, &inputs[to]).ok_or_else(|| GraphError::UnknownPort {
                    from: e.from.clone(),
                    to: e.to.clone(),
                    kind: kind.name().into(),
                    port: "(none given)".into(),
                    ports: ports.join(", "),
                })?,
                Some(p) => ports.iter().position(|q| q == p).ok_or_else(|| GraphError::UnknownPort {
                    from: e.from.clone(),
                    to: e.to.clone(),
                    kind: kind.name().into(),
                    port: p.clone(),
                    ports: ports.join(", "),
                })?,
            };
            let is_labels_port = kind.is_loss() && port == 1;
            if (src == Source::Labels) != is_labels_port {
                return Err(GraphError::LabelsMisuse(self.data.labels.clone()));
            }
            if let Source::Node(p) = src {
                consumers[p as usize].push((to as u32, port as u32));
            }
            inputs[to][port].push(src);
        }

        let mut resolved_inputs = Vec::with_capacity(self.nodes.len());
        for (i, ports) in inputs.into_iter().enumerate() {
            let mut one = Vec::with_capacity(ports.len());
            for (p, srcs) in ports.into_iter().enumerate() {
                if srcs.len() != 1 {
                    return Err(GraphError::PortArity {
                        node: self.nodes[i].id.clone(),
                        port: kinds[i].ports()[p].into(),
                        count: srcs.len(),
                    });
                }
                one.extend(srcs);
            }
            resolved_inputs.push(one);
        }

        let losses: Vec<usize> = (0..kinds.len()).filter(|&i| kinds[i].is_loss()).collect();
        if losses.len() != 1 {
            return Err(GraphError::LossCount(losses.len()));
        }
        for (i, k) in kinds.iter().enumerate() {
            if k.is_loss() && !consumers[i].is_empty() {
                return Err(GraphError::ShapeMismatch {
                    from: self.nodes[i].id.clone(),
                    to: self.nodes[consumers[i][0].0 as usize].id.clone(),
                    port: kinds[consumers[i][0].0 as usize].ports()[consumers[i][0].1 as usize].into(),
                    detail: "a loss produces a scalar and cannot feed other nodes".into(),
                });
            }
            if !k.is_loss() && consumers[i].is_empty() {
                return Err(GraphError::Unused(self.nodes[i].id.clone()));
            }
        }

        let topo = topo_order(&resolved_inputs).map_err(|i| GraphError::Cycle(self.nodes[i].id.clone()))?;

        let mut widths = vec![0usize; kinds.len()];
        let mut shapes: Vec<Option<Shape>> = vec![None; kinds.len()];
        let mut input_widths = vec![Vec::new(); kinds.len()];
        for &i in &topo {
            let i = i as usize;
            let layouts: Vec<(usize, Option<Shape>)> = resolved_inputs[i]
                .iter()
                .map(|s| match s {
                    Source::Node(p) => (widths[*p as usize], shapes[*p as usize]),
                    Source::Features => (self.data.feature_size, self.data.shape),
                    Source::Labels => (self.data.classes, None),
                })
                .collect();
            let in_widths: Vec<usize> = layouts.iter().map(|l| l.0).collect();
            (widths[i], shapes[i]) = output_layout(&mut kinds[i], &layouts).map_err(|(port, detail)| {
                let from = match &resolved_inputs[i][port] {
                    Source::Node(p) => self.nodes[*p as usize].id.clone(),
                    Source::Features => self.data.features.clone(),
                    Source::Labels => self.data.labels.clone(),
                };
                GraphError::ShapeMismatch {
                    from,
                    to: self.nodes[i].id.clone(),
                    port: kinds[i].ports()[port].into(),
                    detail,
                }
            })?;
            input_widths[i] = in_widths;
        }

        let (block_of, blocks) = self.assign_blocks(&kinds, &resolved_inputs, &consumers, &topo)?;
        let loss = losses[0];
        let last = blocks.len().saturating_sub(1) as u32;
        if block_of[loss] != last {
            return Err(GraphError::LossBlock {
                loss: self.nodes[loss].id.clone(),
                block: blocks[block_of[loss] as usize].clone(),
                last: blocks[last as usize].clone(),
            });
        }

        let mode = self.training.mode;
        let mut nodes: Vec<ValidNode> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| ValidNode {
                id: i as u32,
                name: n.id.clone(),
                kind: kinds[i],
                inputs: resolved_inputs[i].clone(),
                consumers: consumers[i].clone(),
                output_width: widths[i],
                input_widths: input_widths[i].clone(),
                output_shape: shapes[i],
                block: block_of[i],
                input_crosses_block: resolved_inputs[i]
                    .iter()
                    .map(|s| matches!(s, Source::Node(p) if block_of[*p as usize] != block_of[i]))
                    .collect(),
                consumer_crosses_block: consumers[i]
                    .iter()
                    .map(|(c, _)| block_of[*c as usize] != block_of[i])
                    .collect(),
                mode,
                wire: self.training.wire,
                aux: None,
                pipeline: 0,
                origin: i as u32,
                copies: Vec::new(),
            })
            .collect();
        if mode == TrainingMode::Local {
            // The block output of every block but the last trains through its own head; the
            // labels reach it on an extra port, so data feeding needs no special case.
            for n in nodes.iter_mut().filter(|n| n.block != last && n.consumer_crosses_block.iter().any(|&c| c)) {
                let head = AuxHead {
                    inputs: n.output_width,
                    hidden: self.training.aux.hidden,
                    classes: self.data.classes,
                    labels_port: n.inputs.len() as u32,
                };
                n.inputs.push(Source::Labels);
                n.input_widths.push(self.data.classes);
                n.input_crosses_block.push(false);
                n.aux = Some(head);
                if n.param_count() > MAX_PARAMS_PER_NODE {
                    return Err(out_of_range(
                        format!("node `{}`: parameter count with its auxiliary head", n.name),
                        n.param_count(),
                        "<= 268435456",
                    ));
                }
            }
        }
        let (nodes, topo, blocks) = into_pipelines(nodes, topo, blocks, self.training.pipelines);
        Ok(ValidGraph { loss: loss as u32, spec: self, nodes, topo, blocks })
    }

    /// Each node's block index and the block names. Named blocks must cover every node or none;
    /// unnamed, a block starts at every linear node fed by another node where one node's output
    /// alone crosses from the nodes before it to those after. Blocks must be
    /// contiguous in `topo`, and every block but the last must have exactly one node whose
    /// output leaves it.
    fn assign_blocks(
        &self,
        kinds: &[NodeKind],
        inputs: &[Vec<Source>],
        consumers: &[Vec<(u32, u32)>],
        topo: &[u32],
    ) -> Result<(Vec<u32>, Vec<String>), GraphError> {
        let named = self.nodes.iter().any(|n| n.block.is_some());
        // How many nodes' outputs cross the cut before each position of `topo`: an automatic
        // block may only start where exactly one does, so a residual join stays in one block.
        let mut position = vec![0usize; self.nodes.len()];
        for (k, &i) in topo.iter().enumerate() {
            position[i as usize] = k;
        }
        let mut crossing = vec![0i64; topo.len() + 1];
        for (i, cs) in consumers.iter().enumerate() {
            if let Some(last) = cs.iter().map(|(c, _)| position[*c as usize]).max() {
                crossing[position[i] + 1] += 1;
                crossing[last + 1] -= 1;
            }
        }
        for k in 1..crossing.len() {
            crossing[k] += crossing[k - 1];
        }
        let mut block_of = vec![0u32; self.nodes.len()];
        let mut blocks: Vec<String> = Vec::new();
        for (k, &i) in topo.iter().enumerate() {
            let i = i as usize;
            let name = if named {
                self.nodes[i].block.clone().ok_or_else(|| GraphError::BlockUnmarked(self.nodes[i].id.clone()))?
            } else {
                let starts = blocks.is_empty()
                    || (matches!(kinds[i], NodeKind::Linear { .. })
                        && inputs[i].iter().any(|s| matches!(s, Source::Node(_)))
                        && crossing[k] == 1);
                if starts { self.nodes[i].id.clone() } else { blocks.last().cloned().unwrap_or_default() }
            };
            if blocks.last() != Some(&name) {
                if blocks.contains(&name) {
                    return Err(GraphError::BlockSplit { block: name, node: self.nodes[i].id.clone() });
                }
                blocks.push(name);
            }
            block_of[i] = (blocks.len() - 1) as u32;
        }
        for (b, block) in blocks.iter().enumerate().take(blocks.len().saturating_sub(1)) {
            let leaving: Vec<String> = topo
                .iter()
                .map(|&i| i as usize)
                .filter(|&i| block_of[i] == b as u32)
                .filter(|&i| consumers[i].iter().any(|(c, _)| block_of[*c as usize] != b as u32))
                .map(|i| self.nodes[i].id.clone())
                .collect();
            if leaving.len() != 1 {
                return Err(GraphError::BlockOutputs { block: block.clone(), nodes: leaving });
            }
        }
        Ok((block_of, blocks))
    }
}

/// `r` copies of a validated graph, copy `p` with ids, blocks and names shifted by `p` times
/// the graph's size (`name@pP`); pipeline 0 keeps the graph's own. With `r` > 1 every node
/// learns the ids of its copies.
fn into_pipelines(
    nodes: Vec<ValidNode>,
    topo: Vec<u32>,
    blocks: Vec<String>,
    r: u32,
) -> (Vec<ValidNode>, Vec<u32>, Vec<String>) {
    if r <= 1 {
        return (nodes, topo, blocks);
    }
    let (n, b) = (nodes.len() as u32, blocks.len() as u32);
    let shift = |p: u32, id: u32| p * n + id;
    let mut all = Vec::with_capacity(nodes.len() * r as usize);
    let mut all_topo = Vec::with_capacity(topo.len() * r as usize);
    let mut all_blocks = Vec::with_capacity(blocks.len() * r as usize);
    for p in 0..r {
        for node in &nodes {
            let mut c = node.clone();
            c.id = shift(p, node.id);
            c.pipeline = p;
            c.origin = node.id;
            c.copies = (0..r).map(|q| shift(q, node.id)).collect();
            if p > 0 {
                c.name = format!("{}@p{p}", node.name);
                c.block = p * b + node.block;
                for s in &mut c.inputs {
                    if let Source::Node(x) = s {
                        *x = shift(p, *x);
                    }
                }
                for (to, _) in &mut c.consumers {
                    *to = shift(p, *to);
                }
            }
            all.push(c);
        }
        all_topo.extend(topo.iter().map(|&id| shift(p, id)));
        all_blocks.extend(blocks.iter().map(|name| if p == 0 { name.clone() } else { format!("{name}@p{p}") }));
    }
    (all, all_topo, all_blocks)
}

/// The port an edge without one goes to: a loss's by what it carries; a join's first port not
/// yet fed, in edge order.
fn default_port(kind: NodeKind, src: &Source, fed: &[Vec<Source>]) -> Option<usize> {
    match (kind, src) {
        (NodeKind::SoftmaxCrossEntropy { .. }, Source::Labels) => Some(1),
        (NodeKind::SoftmaxCrossEntropy { .. }, _) => Some(0),
        (NodeKind::Add | NodeKind::Concat, _) => fed.iter().position(Vec::is_empty),
        _ => None,
    }
}

/// A spatial shape: every side at least 1, at most 1048576 values in all.
fn check_shape(what: &str, shape: Shape) -> Result<(), GraphError> {
    let total = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if shape.contains(&0) || total.is_none_or(|t| t > MAX_FEATURES) {
        return Err(out_of_range(what, format!("{shape:?}"), "sides >= 1, at most 1048576 values"));
    }
    Ok(())
}

fn out_of_range(what: impl Into<String>, value: impl ToString, range: &str) -> GraphError {
    GraphError::OutOfRange { what: what.into(), value: value.to_string(), range: range.into() }
}

fn check_sizes(g: &ModelGraph) -> Result<(), GraphError> {
    let t = &g.training;
    if t.batch_size == 0 || t.batch_size > MAX_BATCH {
        return Err(out_of_range("training.batch_size", t.batch_size, "1..=65536"));
    }
    if t.eval_batch_size == 0 || t.eval_batch_size > MAX_BATCH {
        return Err(out_of_range("training.eval_batch_size", t.eval_batch_size, "1..=65536"));
    }
    if t.in_flight == 0 || t.in_flight > MAX_IN_FLIGHT {
        return Err(out_of_range("training.in_flight", t.in_flight, "1..=64"));
    }
    if t.aux.hidden > MAX_FEATURES {
        return Err(out_of_range("training.aux.hidden", t.aux.hidden, "0..=1048576"));
    }
    if t.steps == Some(0) || (t.steps.is_none() && t.epochs == 0) {
        return Err(out_of_range("training.steps/epochs", 0, ">= 1"));
    }
    if g.nodes.is_empty() || g.nodes.len() > MAX_NODES {
        return Err(out_of_range("number of nodes", g.nodes.len(), "1..=4096"));
    }
    if t.pipelines == 0 || t.pipelines > MAX_PIPELINES {
        return Err(out_of_range("training.pipelines", t.pipelines, "1..=64"));
    }
    if g.nodes.len().saturating_mul(t.pipelines as usize) > MAX_NODES {
        return Err(out_of_range(
            "number of nodes times training.pipelines",
            g.nodes.len().saturating_mul(t.pipelines as usize),
            "1..=4096",
        ));
    }
    if t.sync_every == 0 || t.sync_every > 1_000_000 {
        return Err(out_of_range("training.sync_every", t.sync_every, "1..=1000000"));
    }
    let o = &t.outer;
    if !(o.lr.is_finite() && o.lr > 0.0 && o.lr <= 10.0) {
        return Err(out_of_range("training.outer.lr", o.lr, "0 < lr <= 10"));
    }
    if !(0.0..1.0).contains(&o.momentum) {
        return Err(out_of_range("training.outer.momentum", o.momentum, "0 <= momentum < 1"));
    }
    let d = &g.data.dataset;
    // The name becomes a directory name: nothing in it may walk a path or alias another name.
    if d.is_empty() || d.len() > 64 || !d.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        let shown: String = d.chars().take(40).collect();
        return Err(out_of_range(
            "data.dataset",
            format!("{shown:?}"),
            "a plain name: 1-64 letters, digits, '-' or '_'",
        ));
    }
    if g.data.feature_size == 0 || g.data.feature_size > MAX_FEATURES {
        return Err(out_of_range("data.feature_size", g.data.feature_size, "1..=1048576"));
    }
    if let Some(shape) = g.data.shape {
        check_shape("data.shape", shape)?;
        let total: usize = shape.iter().product();
        if total != g.data.feature_size {
            return Err(out_of_range(
                "data.shape",
                format!("{shape:?}"),
                &format!("channels x height x width = feature_size {}", g.data.feature_size),
            ));
        }
    }
    if g.data.classes < 2 || g.data.classes > MAX_FEATURES {
        return Err(out_of_range("data.classes", g.data.classes, "2..=1048576"));
    }
    if !(g.data.normalize.std.is_finite() && g.data.normalize.std > 0.0 && g.data.normalize.mean.is_finite()) {
        return Err(out_of_range("data.normalize", format!("{:?}", g.data.normalize), "finite mean, std > 0"));
    }
    let lr_ok = |lr: f32| lr.is_finite() && lr > 0.0 && lr < 100.0;
    match g.optimizer {
        OptimizerSpec::Sgd { lr, momentum } => {
            if !lr_ok(lr) {
                return Err(out_of_range("optimizer.lr", lr, "0 < lr < 100"));
            }
            if !(0.0..1.0).contains(&momentum) {
                return Err(out_of_range("optimizer.momentum", momentum, "0 <= momentum < 1"));
            }
        }
        OptimizerSpec::Adam { lr, beta1, beta2, eps } | OptimizerSpec::Adamw { lr, beta1, beta2, eps, .. } => {
            if !lr_ok(lr) {
                return Err(out_of_range("optimizer.lr", lr, "0 < lr < 100"));
            }
            for (n, b) in [("optimizer.beta1", beta1), ("optimizer.beta2", beta2)] {
                if !(0.0..1.0).contains(&b) {
                    return Err(out_of_range(n, b, "0 <= beta < 1"));
                }
            }
            if !(eps.is_finite() && eps > 0.0) {
                return Err(out_of_range("optimizer.eps", eps, "eps > 0"));
            }
        }
    }
    if let OptimizerSpec::Adamw { weight_decay, .. } = g.optimizer
        && !(weight_decay.is_finite() && (0.0..1.0).contains(&weight_decay))
    {
        return Err(out_of_range("optimizer.weight_decay", weight_decay, "0 <= weight_decay < 1"));
    }
    check_recipe(&g.training)
}

/// The `[training]` recipe fields: schedule, clipping, label smoothing.
fn check_recipe(t: &TrainingSpec) -> Result<(), GraphError> {
    const MAX_STEPS: u64 = 1 << 40;
    let warm = match t.lr_schedule {
        Schedule::Constant => 0,
        Schedule::Warmup { warmup_steps } => {
            if warmup_steps == 0 {
                return Err(out_of_range("training.lr_schedule.warmup_steps", 0, ">= 1"));
            }
            warmup_steps
        }
        Schedule::Cosine { warmup_steps, decay_steps, min_factor } => {
            if !(1..=MAX_STEPS).contains(&decay_steps) {
                return Err(out_of_range("training.lr_schedule.decay_steps", decay_steps, "1..=2^40"));
            }
            if !(0.0..=1.0).contains(&min_factor) {
                return Err(out_of_range("training.lr_schedule.min_factor", min_factor, "0 <= min_factor <= 1"));
            }
            warmup_steps
        }
        Schedule::Step { warmup_steps, every, gamma } => {
            if !(1..=MAX_STEPS).contains(&every) {
                return Err(out_of_range("training.lr_schedule.every", every, "1..=2^40"));
            }
            if !(gamma > 0.0 && gamma <= 1.0) {
                return Err(out_of_range("training.lr_schedule.gamma", gamma, "0 < gamma <= 1"));
            }
            warmup_steps
        }
    };
    if warm > MAX_STEPS {
        return Err(out_of_range("training.lr_schedule.warmup_steps", warm, "at most 2^40"));
    }
    if let Some(c) = t.clip_grad_norm
        && !(c.is_finite() && c > 0.0)
    {
        return Err(out_of_range("training.clip_grad_norm", c, "a finite norm > 0"));
    }
    if !(0.0..1.0).contains(&t.label_smoothing) {
        return Err(out_of_range("training.label_smoothing", t.label_smoothing, "0 <= label_smoothing < 1"));
    }
    Ok(())
}

fn resolve_kind(n: &NodeSpec, classes: usize) -> Result<NodeKind, GraphError> {
    let width = |field: &str, v: Option<usize>| -> Result<usize, GraphError> {
        match v {
            Some(w) if (1..=MAX_FEATURES).contains(&w) => Ok(w),
            Some(w) => Err(out_of_range(format!("node `{}`: {field}", n.id), w, "1..=1048576")),
            None => Err(out_of_range(format!("node `{}`: {field}", n.id), "missing", "required for this kind")),
        }
    };
    let no_widths = || -> Result<(), GraphError> {
        match (n.inputs, n.outputs) {
            (None, None) => Ok(()),
            _ => Err(out_of_range(
                format!("node `{}`: inputs/outputs", n.id),
                "set",
                "only linear (inputs, outputs) and layer_norm (inputs) take widths",
            )),
        }
    };
    // Every field but the widths belongs to a few kinds; anywhere else it is an error.
    let fields: [(&str, bool, &[&str]); 6] = [
        ("rate", n.rate.is_some(), &["dropout"]),
        ("channels", n.channels.is_some(), &["conv2d"]),
        ("kernel", n.kernel.is_some(), &["conv2d", "max_pool2d", "avg_pool2d"]),
        ("stride", n.stride.is_some(), &["conv2d", "max_pool2d", "avg_pool2d"]),
        ("padding", n.padding.is_some(), &["conv2d"]),
        ("shape", n.shape.is_some(), &["reshape"]),
    ];
    for (field, set, kinds) in fields {
        if set && !kinds.contains(&n.kind.as_str()) {
            return Err(out_of_range(
                format!("node `{}`: {field}", n.id),
                "set",
                &format!("only for {}", kinds.join(", ")),
            ));
        }
    }
    let small = |field: &str, v: Option<usize>, default: Option<usize>, range: std::ops::RangeInclusive<usize>| match v
        .or(default)
    {
        Some(x) if range.contains(&x) => Ok(x),
        Some(x) => {
            Err(out_of_range(format!("node `{}`: {field}", n.id), x, &format!("{}..={}", range.start(), range.end())))
        }
        None => Err(out_of_range(format!("node `{}`: {field}", n.id), "missing", "required for this kind")),
    };
    let kind = match n.kind.as_str() {
        "linear" => {
            let k = NodeKind::Linear { inputs: width("inputs", n.inputs)?, outputs: width("outputs", n.outputs)? };
            if k.param_count() > MAX_PARAMS_PER_NODE {
                return Err(out_of_range(format!("node `{}`: parameter count", n.id), k.param_count(), "<= 268435456"));
            }
            k
        }
        "relu" => {
            no_widths()?;
            NodeKind::Relu
        }
        "tanh" => {
            no_widths()?;
            NodeKind::Tanh
        }
        "gelu" => {
            no_widths()?;
            NodeKind::Gelu
        }
        "layer_norm" => {
            if n.outputs.is_some() {
                return Err(out_of_range(format!("node `{}`: outputs", n.id), "set", "layer_norm takes only inputs"));
            }
            NodeKind::LayerNorm { width: width("inputs", n.inputs)? }
        }
        "dropout" => {
            no_widths()?;
            match n.rate {
                Some(rate) if (0.0..1.0).contains(&rate) => NodeKind::Dropout { rate },
                Some(rate) => return Err(out_of_range(format!("node `{}`: rate", n.id), rate, "0 <= rate < 1")),
                None => return Err(out_of_range(format!("node `{}`: rate", n.id), "missing", "required for dropout")),
            }
        }
        "add" => {
            no_widths()?;
            NodeKind::Add
        }
        "concat" => {
            no_widths()?;
            NodeKind::Concat
        }
        "conv2d" => {
            no_widths()?;
            NodeKind::Conv2d {
                channels: small("channels", n.channels, None, 1..=MAX_CHANNELS)?,
                kernel: small("kernel", n.kernel, None, 1..=MAX_WINDOW)?,
                stride: small("stride", n.stride, Some(1), 1..=MAX_WINDOW)?,
                padding: small("padding", n.padding, Some(0), 0..=MAX_WINDOW)?,
                input: [0; 3],
            }
        }
        "max_pool2d" | "avg_pool2d" => {
            no_widths()?;
            let kernel = small("kernel", n.kernel, None, 1..=MAX_WINDOW)?;
            let stride = small("stride", n.stride, Some(kernel), 1..=MAX_WINDOW)?;
            if n.kind == "max_pool2d" {
                NodeKind::MaxPool2d { kernel, stride, input: [0; 3] }
            } else {
                NodeKind::AvgPool2d { kernel, stride, input: [0; 3] }
            }
        }
        "flatten" => {
            no_widths()?;
            NodeKind::Flatten
        }
        "reshape" => {
            no_widths()?;
            let shape = n
                .shape
                .ok_or_else(|| out_of_range(format!("node `{}`: shape", n.id), "missing", "required for reshape"))?;
            check_shape(&format!("node `{}`: shape", n.id), shape)?;
            NodeKind::Reshape { shape }
        }
        // The class count is a property of the labels, so it comes from `[data]`.
        "softmax_cross_entropy" => {
            no_widths()?;
            NodeKind::SoftmaxCrossEntropy { classes }
        }
        other => {
            return Err(GraphError::UnknownKind {
                node: n.id.clone(),
                kind: other.into(),
                known: KNOWN_KINDS.join(", "),
            });
        }
    };
    Ok(kind)
}

/// Output width and spatial shape of a node given the widths and shapes arriving on its ports,
/// or (port, reason) on mismatch. Fills in the input shape a spatial kind was resolved without.
fn output_layout(
    kind: &mut NodeKind,
    layouts: &[(usize, Option<Shape>)],
) -> Result<(usize, Option<Shape>), (usize, String)> {
    let ins: Vec<usize> = layouts.iter().map(|l| l.0).collect();
    let shape = layouts.first().and_then(|l| l.1);
    let spatial = |what: &str| -> Result<Shape, (usize, String)> {
        shape.ok_or((0, format!("{what} needs a spatial input: give `[data] shape` or a `reshape` before it")))
    };
    let window = |what: &str, kernel: usize, stride: usize, padding: usize, [c, h, w]: Shape| {
        let (ph, pw) = (h + 2 * padding, w + 2 * padding);
        if kernel > ph || kernel > pw {
            return Err((0, format!("{what} window {kernel} is larger than the padded input {ph}x{pw}")));
        }
        Ok([c, (ph - kernel) / stride + 1, (pw - kernel) / stride + 1])
    };
    let sized = |s: Shape| -> Result<(usize, Option<Shape>), (usize, String)> {
        let width = s.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).filter(|w| *w <= MAX_FEATURES);
        width.map(|w| (w, Some(s))).ok_or((0, format!("output shape {s:?} exceeds 1048576 values")))
    };
    match kind {
        NodeKind::Conv2d { channels, kernel, stride, padding, input } => {
            let (s, channels) = (spatial("conv2d")?, *channels);
            let [_, oh, ow] = window("conv2d", *kernel, *stride, *padding, s)?;
            *input = s;
            if kind.param_count() > MAX_PARAMS_PER_NODE {
                return Err((0, format!("conv2d has {} parameters (at most 268435456)", kind.param_count())));
            }
            return sized([channels, oh, ow]);
        }
        NodeKind::MaxPool2d { kernel, stride, input } | NodeKind::AvgPool2d { kernel, stride, input } => {
            let s = spatial("pooling")?;
            *input = s;
            return sized(window("pooling", *kernel, *stride, 0, s)?);
        }
        NodeKind::Reshape { shape: to } => {
            let to = *to;
            let (w, _) = sized(to)?;
            if w != ins[0] {
                return Err((0, format!("reshape to {to:?} needs width {w}, gets {}", ins[0])));
            }
            return Ok((w, Some(to)));
        }
        NodeKind::Flatten => return Ok((ins[0], None)),
        NodeKind::Relu | NodeKind::Tanh | NodeKind::Gelu | NodeKind::Dropout { .. } | NodeKind::LayerNorm { .. } => {
            let w = output_width(*kind, &ins)?;
            return Ok((w, shape));
        }
        NodeKind::Add => {
            let w = output_width(*kind, &ins)?;
            let (a, b) = (layouts[0].1, layouts.get(1).and_then(|l| l.1));
            if let (Some(a), Some(b)) = (a, b)
                && a != b
            {
                return Err((1, format!("add joins equal shapes, gets {a:?} and {b:?}")));
            }
            return Ok((w, a.or(b)));
        }
        _ => {}
    }
    output_width(*kind, &ins).map(|w| (w, None))
}

/// Output width of a flat node given the widths arriving on its ports, or (port, reason).
fn output_width(kind: NodeKind, ins: &[usize]) -> Result<usize, (usize, String)> {
    match kind {
        NodeKind::Linear { inputs, outputs } => {
            if ins[0] != inputs {
                return Err((0, format!("linear expects {inputs} input features, gets {}", ins[0])));
            }
            Ok(outputs)
        }
        NodeKind::Relu | NodeKind::Tanh | NodeKind::Gelu | NodeKind::Dropout { .. } => Ok(ins[0]),
        NodeKind::LayerNorm { width } => {
            if ins[0] != width {
                return Err((0, format!("layer_norm normalises width {width}, gets {}", ins[0])));
            }
            Ok(width)
        }
        NodeKind::Add => {
            if ins[0] != ins[1] {
                return Err((1, format!("add joins equal widths, gets {} and {}", ins[0], ins[1])));
            }
            Ok(ins[0])
        }
        NodeKind::Concat => ins[0]
            .checked_add(ins[1])
            .filter(|w| *w <= MAX_FEATURES)
            .ok_or((1, format!("concat width {} + {} exceeds 1048576", ins[0], ins[1]))),
        // Spatial kinds keep their width here; `output_layout` gives their shapes.
        NodeKind::Conv2d { .. }
        | NodeKind::MaxPool2d { .. }
        | NodeKind::AvgPool2d { .. }
        | NodeKind::Flatten
        | NodeKind::Reshape { .. } => Ok(ins[0]),
        NodeKind::SoftmaxCrossEntropy { .. } => {
            if ins[0] != ins[1] {
                return Err((0, format!("logits have width {}, but the labels have {} classes", ins[0], ins[1])));
            }
            Ok(1)
        }
    }
}

/// Kahn's algorithm with a min-heap so the order is canonical; Err(node) names a node on a cycle.
fn topo_order(inputs: &[Vec<Source>]) -> Result<Vec<u32>, usize> {
    let n = inputs.len();
    let mut indeg = vec![0usize; n];
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, srcs) in inputs.iter().enumerate() {
        for s in srcs {
            if let Source::Node(p) = s {
                indeg[i] += 1;
                out[*p as usize].push(i);
            }
        }
    }
    let mut ready: std::collections::BinaryHeap<std::cmp::Reverse<usize>> =
        (0..n).filter(|&i| indeg[i] == 0).map(std::cmp::Reverse).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(std::cmp::Reverse(i)) = ready.pop() {
        order.push(i as u32);
        for &j in &out[i] {
            indeg[j] -= 1;
            if indeg[j] == 0 {
                ready.push(std::cmp::Reverse(j));
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    // A node left over may merely sit downstream of a cycle. Every left-over node has a left-over
    // input, so walking back along those n times from any of them ends on the cycle itself.
    let mut i = (0..n).find(|&i| indeg[i] > 0).unwrap_or(0);
    for _ in 0..n {
        let back = inputs[i].iter().find_map(|s| match s {
            Source::Node(p) if indeg[*p as usize] > 0 => Some(*p as usize),
            _ => None,
        });
        match back {
            Some(p) => i = p,
            None => break,
        }
    }
    Err(i)
}

impl ValidGraph {
    /// Total trainable parameters, auxiliary heads included.
    pub fn param_count(&self) -> usize {
        self.nodes.iter().map(ValidNode::param_count).sum()
    }

    /// The training mode.
    pub fn mode(&self) -> TrainingMode {
        self.spec.training.mode
    }

    /// Data-parallel pipelines (copies of the model graph).
    pub fn pipelines(&self) -> u32 {
        self.spec.training.pipelines.max(1)
    }

    /// Nodes in one pipeline: the model file's node count.
    pub fn pipeline_len(&self) -> usize {
        self.nodes.len() / self.pipelines() as usize
    }

    /// Pipeline 0 alone: the graph one copy trains, with the file's own ids, as `train-local`
    /// runs it once per pipeline.
    pub fn pipeline_zero(&self) -> ValidGraph {
        let n = self.pipeline_len();
        let blocks = self.blocks.len() / self.pipelines() as usize;
        ValidGraph {
            spec: self.spec.clone(),
            nodes: self.nodes[..n].to_vec(),
            topo: self.topo.iter().copied().filter(|&id| (id as usize) < n).collect(),
            loss: self.loss,
            blocks: self.blocks[..blocks].to_vec(),
        }
    }

    /// Node ids of block `b`, in topological order.
    pub fn block_nodes(&self, b: u32) -> Vec<u32> {
        self.topo.iter().copied().filter(|&i| self.nodes.get(i as usize).is_some_and(|n| n.block == b)).collect()
    }

    /// Node names by id, for messages.
    pub fn names(&self) -> BTreeMap<u32, String> {
        self.nodes.iter().map(|n| (n.id, n.name.clone())).collect()
    }
}

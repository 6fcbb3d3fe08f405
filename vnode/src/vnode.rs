//! The VNode state machine: buffers whatever arrives, and runs forward and backward passes in
//! one canonical order so that results depend only on the job, never on message timing.
//!
//! With `in_flight = K`, a VNode processes training micro-batches in the order
//! F0..F(K-1), B0, FK, B1, F(K+1), ... in effect: the forward of micro-batch m uses exactly
//! parameter version max(0, m-K+1) (the parameters after the updates of micro-batches
//! 0..=m-K), kept in a small stash when later updates have already been applied, and the
//! backward of micro-batch j is applied as update number j+1. K = 1 is plain synchronous SGD,
//! bit-identical to whole-graph training; K > 1 is SGD with a fixed gradient delay of K-1
//! (weight stashing as in PipeDream), identical from run to run and for every placement.
//!
//! In local mode (`TrainingMode::Local`) no gradient crosses a block boundary: a VNode sends
//! none to a producer in another block and expects none from a consumer in another block, and
//! a block output starts its backward from its auxiliary head's loss, computed with its forward. Every VNode then runs micro-batch m on version m, whatever K.

use crate::host::{HostData, HostTensor};
use crate::kernels::Matrix;
use crate::layer::{self, KernelError, Params};
use crate::optim::Optimizer;
use dcnr_model::graph::{Normalize, Source, ValidNode};
use dcnr_model::{NodeKind, OptimizerSpec, TrainingMode, WireFormat};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

/// Training or evaluation traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// Forward with a recorded graph, then backward and update.
    Train,
    /// Forward only, with the current parameters.
    Eval,
    /// Serving: forward only, with the current parameters; the loss needs no labels and reports
    /// class probabilities.
    Infer,
}

impl Phase {
    /// Whether this phase only runs forward (no gradient, no update, dropout off).
    pub fn forward_only(self) -> bool {
        self != Phase::Train
    }
}

/// What a VNode needs to exist: its own node, its optimizer, the job's root seed, the window.
#[derive(Debug, Clone)]
pub struct VNodeSpec {
    /// The node (kind, input sources, consumers) from the validated graph.
    pub node: ValidNode,
    /// Optimizer for its parameters.
    pub optimizer: OptimizerSpec,
    /// Learning-rate schedule, gradient clipping and label smoothing (`[training]`).
    pub recipe: dcnr_model::Recipe,
    /// Root seed of the job.
    pub root_seed: u64,
    /// Micro-batches in flight (>= 1).
    pub in_flight: u32,
    /// With several pipelines: when this VNode's copies average, and the outer step.
    pub averaging: Option<crate::rounds::Averaging>,
    /// Where its math runs.
    pub compute: crate::Compute,
}

impl VNodeSpec {
    /// Bytes this VNode needs at batch size `batch`: parameters, two optimizer moments and the
    /// stash of in-flight versions, plus activations and gradients of every micro-batch in flight,
    /// and the data inputs fed ahead of the window. The orchestrator places by it and the PNode
    /// enforces its limit with it.
    pub fn memory_estimate(&self, batch: usize) -> u64 {
        let params = self.node.param_count() as u64;
        let acts = (batch * self.node.output_width) as u64;
        let k = u64::from(self.in_flight.max(1));
        // Averaging keeps an anchor and an outer momentum, and holds every copy's change of a round.
        let copies = self.node.copies.len() as u64;
        let averaging = if copies > 1 { 2 + copies } else { 0 };
        // Features (f32 once normalised) and labels wait up to this many steps ahead.
        let data_width: u64 = self
            .node
            .inputs
            .iter()
            .enumerate()
            .map(|(port, s)| match s {
                Source::Features => self.node.input_width(port) as u64,
                Source::Labels => 1,
                Source::Node(_) => 0,
            })
            .sum();
        // Saturating: `in_flight` and the widths come from a peer, and a sum that wrapped would
        // slip under any limit.
        let fed = (batch as u64).saturating_mul(data_width).saturating_mul(k.saturating_mul(2) + crate::FEED_AHEAD + 8);
        // A convolution unfolds its input into one column per output position while it runs.
        let scratch = match self.node.kind {
            NodeKind::Conv2d { kernel, input, .. } => (batch as u64)
                .saturating_mul((input[0] * kernel * kernel) as u64)
                .saturating_mul((self.node.output_width / self.node.output_shape.map_or(1, |s| s[0].max(1))) as u64),
            _ => 0,
        };
        let words = params
            .saturating_mul(k.saturating_add(3 + averaging))
            .saturating_add(scratch)
            .saturating_add(acts.saturating_mul(k.saturating_add(2)))
            .saturating_add(fed);
        words.saturating_mul(4)
    }
}

/// A message into a VNode.
#[derive(Debug, Clone)]
pub enum Inbound {
    /// An input value for port `port` of micro-batch `mb`.
    Forward {
        /// Micro-batch index.
        mb: u64,
        /// Train or eval.
        phase: Phase,
        /// Input port.
        port: u32,
        /// `[batch, width]` values (i32 labels for a loss's `labels` port).
        tensor: HostTensor,
    },
    /// The gradient of the loss w.r.t. this VNode's output, from consumer `from` = (vnode, port).
    Backward {
        /// Micro-batch index.
        mb: u64,
        /// The consumer that sent it.
        from: (u32, u32),
        /// `[batch, width]` gradient.
        tensor: HostTensor,
    },
    /// A copy's change of parameter tensor `index` in the round closed by step `mb`.
    Sync {
        /// The step whose update closed the round.
        mb: u64,
        /// The copy (VNode id) that sent it.
        from: u32,
        /// Which parameter tensor, in canonical order.
        index: u32,
        /// The change since the last round, in the job's outer wire format.
        tensor: HostTensor,
    },
}

impl Inbound {
    /// The tensor it carries.
    pub fn tensor(&self) -> &HostTensor {
        match self {
            Inbound::Forward { tensor, .. } | Inbound::Backward { tensor, .. } | Inbound::Sync { tensor, .. } => tensor,
        }
    }
}

/// A message out of a VNode.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// An activation for input `port` of VNode `to`.
    Forward {
        /// Consumer VNode id.
        to: u32,
        /// Consumer port.
        port: u32,
        /// Micro-batch index.
        mb: u64,
        /// Train or eval.
        phase: Phase,
        /// The activation.
        tensor: HostTensor,
    },
    /// A gradient for producer `to`, sent as consumer `from` = (this vnode, port).
    Backward {
        /// Producer VNode id.
        to: u32,
        /// This VNode and the port the producer feeds.
        from: (u32, u32),
        /// Micro-batch index.
        mb: u64,
        /// The gradient.
        tensor: HostTensor,
    },
    /// This VNode's change of parameter tensor `index` in the round closed by step `mb`, for
    /// its copy `to`.
    Sync {
        /// The copy (VNode id) it is for.
        to: u32,
        /// This VNode.
        from: u32,
        /// The step whose update closed the round.
        mb: u64,
        /// Which parameter tensor.
        index: u32,
        /// The change, packed in the job's outer wire format.
        tensor: HostTensor,
    },
    /// Training micro-batch `mb` is complete here: its update is applied.
    Done {
        /// Micro-batch index.
        mb: u64,
        /// Forward plus backward wall time.
        compute_us: u64,
        /// Forward plus backward CPU time of the computing thread.
        cpu_us: u64,
        /// Tensor bytes received for `mb` (inputs and gradients).
        bytes_in: u64,
        /// Tensor bytes sent for `mb` (activations to each consumer and gradients).
        bytes_out: u64,
        /// SHA-256 of this VNode's output for `mb` (the loss's input gradient for a loss).
        output_sha256: [u8; 32],
        /// When `mb` closed an averaging round: SHA-256 of the parameters the round gave, which
        /// every copy must report alike.
        round_sha256: Option<[u8; 32]>,
    },
    /// A loss VNode's result for one micro-batch.
    Loss {
        /// Micro-batch index.
        mb: u64,
        /// Train or eval.
        phase: Phase,
        /// Mean loss of the micro-batch.
        loss: f32,
        /// Correct arg-max predictions.
        correct: u32,
        /// Samples in the micro-batch.
        count: u32,
    },
    /// A loss VNode's class probabilities for inference micro-batch `mb`: f32 [rows, classes].
    Predictions {
        /// Micro-batch index.
        mb: u64,
        /// The softmax of the logits.
        probabilities: HostTensor,
    },
}

impl Outbound {
    /// A message for another VNode as (its id, what it receives); a report comes back as it is.
    pub fn into_delivery(self) -> Result<(u32, Inbound), Outbound> {
        match self {
            Outbound::Forward { to, port, mb, phase, tensor } => Ok((to, Inbound::Forward { mb, phase, port, tensor })),
            Outbound::Backward { to, from, mb, tensor } => Ok((to, Inbound::Backward { mb, from, tensor })),
            Outbound::Sync { to, from, mb, index, tensor } => Ok((to, Inbound::Sync { mb, from, index, tensor })),
            report @ (Outbound::Done { .. } | Outbound::Loss { .. } | Outbound::Predictions { .. }) => Err(report),
        }
    }
}

/// Why a VNode refused a message or failed.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum VNodeError {
    /// Port index out of range.
    #[error("vnode {vnode}: no input port {port} (it has {ports})")]
    Port { vnode: u32, port: u32, ports: usize },
    /// A gradient from something that is not a consumer.
    #[error("vnode {vnode}: gradient from ({from:?}), which is not one of its consumers")]
    NotConsumer { vnode: u32, from: (u32, u32) },
    /// Wrong shape or dtype.
    #[error("vnode {vnode}: micro-batch {mb}: {detail}")]
    Shape { vnode: u32, mb: u64, detail: String },
    /// The same input arrived twice.
    #[error("vnode {vnode}: duplicate {what} for micro-batch {mb}")]
    Duplicate { vnode: u32, mb: u64, what: &'static str },
    /// A message for a micro-batch already processed or not yet admissible.
    #[error(
        "vnode {vnode}: {what} for micro-batch {mb} is outside the window (next forward {next_f}, next backward {next_b})"
    )]
    Window { vnode: u32, mb: u64, what: &'static str, next_f: u64, next_b: u64 },
    /// A tensor operation failed.
    #[error("vnode {vnode}: tensor backend error: {detail}")]
    Backend { vnode: u32, detail: String },
    /// A snapshot was asked for while work is pending.
    #[error("vnode {vnode}: cannot snapshot with work in flight (next forward {next_f}, next backward {next_b})")]
    NotDrained { vnode: u32, next_f: u64, next_b: u64 },
    /// Checkpoint bytes that do not fit this VNode.
    #[error("vnode {vnode}: {source}")]
    State { vnode: u32, source: crate::checkpoint::StateError },
    /// A label out of range.
    #[error("vnode {vnode}: micro-batch {mb}: label {label} is not in 0..{classes}")]
    Label { vnode: u32, mb: u64, label: i32, classes: usize },
    /// A parameter change that does not belong to a round of this VNode.
    #[error("vnode {vnode}: parameter change from {from} for step {mb}: {detail}")]
    Round { vnode: u32, from: u32, mb: u64, detail: String },
}

impl VNodeError {
    /// Whether the message was merely late or repeated (already applied, so dropping it changes
    /// nothing), as opposed to a fault that leaves the VNode's state untrustworthy.
    pub fn is_stale(&self) -> bool {
        match self {
            VNodeError::Duplicate { .. } => true,
            VNodeError::Window { mb, what, next_f, next_b, .. } => {
                if *what == "gradient" {
                    mb < next_b
                } else {
                    mb < next_f
                }
            }
            _ => false,
        }
    }
}

/// Most eval micro-batches buffered at once.
const MAX_PENDING_EVAL: usize = 4096;

struct Saved {
    /// What a non-loss node's forward kept for its backward.
    kept: Option<layer::Kept>,
    /// The parameter version the forward ran on.
    params: Params,
    /// A loss's input gradients, computed together with its forward.
    loss_grads: Vec<Option<HostTensor>>,
    /// A block output's auxiliary head (local mode), trained with its forward: the head's
    /// parameter gradients, and the block output's gradient the backward starts from.
    head: Option<(Vec<Matrix>, Matrix)>,
    output_sha256: [u8; 32],
    forward_us: u64,
    forward_cpu_us: u64,
    bytes_in: u64,
    bytes_out: u64,
    rows: usize,
}

fn bytes_of(t: &HostTensor) -> u64 {
    t.data_bytes()
}

fn cpu_now() -> Option<cpu_time::ThreadTime> {
    cpu_time::ThreadTime::try_now().ok()
}

fn cpu_us(since: Option<cpu_time::ThreadTime>) -> u64 {
    since.map(|t| t.elapsed().as_micros() as u64).unwrap_or(0)
}

/// One VNode: a node of the graph with its parameters, optimizer state and pending work.
pub struct VNode {
    spec: VNodeSpec,
    /// Parameter versions still needed, oldest first; the last is current.
    versions: VecDeque<(u64, Params)>,
    optimizer: Optimizer,
    next_f: u64,
    next_b: u64,
    train_inputs: BTreeMap<u64, Vec<Option<HostTensor>>>,
    eval_inputs: BTreeMap<u64, Vec<Option<HostTensor>>>,
    /// Inference inputs waiting for the rest of their micro-batch (kept apart from evaluation's:
    /// both number their micro-batches from 0).
    infer_inputs: BTreeMap<u64, Vec<Option<HostTensor>>>,
    grads: BTreeMap<u64, Vec<Option<HostTensor>>>,
    saved: BTreeMap<u64, Saved>,
    /// The consumers that send a gradient back, in consumer order (in local mode, those in
    /// this node's block).
    grad_from: Vec<(u32, u32)>,
    /// Bytes of training tensors received for a micro-batch as they travelled (packed or not),
    /// taken when its forward and then its backward run.
    received: BTreeMap<u64, u64>,
    /// What each raw pixel byte of a features input stands for (`[data] normalize`); without
    /// it, pixels are refused.
    pixel_values: Option<Box<[f32; 256]>>,
    /// With several pipelines and parameters: the averaging rounds with this VNode's copies.
    rounds: Option<Box<Rounds>>,
}

/// Per parameter tensor: the anchor, and the outer momentum (empty before the first round).
type RoundState = (Vec<Vec<f32>>, Vec<Vec<f32>>);

/// A VNode's part in its copies' averaging rounds.
struct Rounds {
    averaging: crate::rounds::Averaging,
    /// Parameters as of the last round.
    anchor: Vec<Vec<f32>>,
    /// Outer momentum per parameter (empty until the first nesterov round).
    momentum: Vec<Vec<f32>>,
    /// Shapes of the parameters.
    shapes: Vec<Vec<usize>>,
    /// Changes by round (closing step), by pipeline, by parameter.
    changes: BTreeMap<u64, Vec<Vec<Option<Vec<f32>>>>>,
    /// The round this VNode closed and waits on, with the `Done` it reports once it is applied.
    open: Option<(u64, Outbound)>,
}

impl Rounds {
    /// The slots of round `mb`'s changes: by pipeline (`copies` of them), by parameter.
    fn slots(&mut self, mb: u64, copies: usize) -> &mut Vec<Vec<Option<Vec<f32>>>> {
        let params = self.shapes.len();
        self.changes.entry(mb).or_insert_with(|| vec![vec![None; params]; copies])
    }
}

impl VNode {
    /// Creates the VNode with parameters drawn from its seed stream.
    pub fn new(spec: VNodeSpec) -> VNode {
        // Drawn parameters are always rank 2.
        let params = layer::to_params(&layer::init_node(&spec.node, spec.root_seed)).unwrap_or_default();
        let optimizer = Optimizer::new(spec.optimizer, spec.recipe, params.len());
        let mut spec = spec;
        spec.in_flight = spec.in_flight.max(1);
        let node = &spec.node;
        let grad_from =
            node.consumers.iter().enumerate().filter(|(i, _)| node.expects_gradient(*i)).map(|(_, c)| *c).collect();
        VNode {
            grad_from,
            spec,
            versions: VecDeque::from([(0, params)]),
            optimizer,
            next_f: 0,
            next_b: 0,
            train_inputs: BTreeMap::new(),
            eval_inputs: BTreeMap::new(),
            infer_inputs: BTreeMap::new(),
            grads: BTreeMap::new(),
            saved: BTreeMap::new(),
            received: BTreeMap::new(),
            pixel_values: None,
            rounds: None,
        }
        .with_rounds(None)
    }

    /// Joins the copies' rounds when the spec asks for averaging, with `restored` (anchor,
    /// momentum) from a checkpoint, or else the current parameters as the anchor.
    fn with_rounds(mut self, restored: Option<RoundState>) -> VNode {
        let node = &self.spec.node;
        let Some(averaging) = self.spec.averaging else { return self };
        // The copies are listed by pipeline, this VNode among them.
        let listed = node.copies.len() > 1 && node.copies.get(node.pipeline as usize) == Some(&node.id);
        let current = self.params();
        if !listed || current.is_empty() {
            return self;
        }
        let shapes = current.iter().map(|t| t.shape.clone()).collect();
        let (anchor, momentum) = restored.unwrap_or_else(|| {
            (current.iter().map(|t| t.as_f32().map(<[f32]>::to_vec).unwrap_or_default()).collect(), Vec::new())
        });
        self.rounds =
            Some(Box::new(Rounds { averaging, anchor, momentum, shapes, changes: BTreeMap::new(), open: None }));
        self
    }

    /// This VNode accepting raw u8 pixels on its features port, normalised with `n` exactly as
    /// `dcnr_model::dataset::ImageSet::gather_features` does (the same table), so a fed pixel
    /// and a pixel the reference run normalised are the same float.
    pub fn with_normalize(mut self, n: Normalize) -> VNode {
        self.pixel_values = Some(Box::new(dcnr_model::dataset::normalize_table(n.mean, n.std)));
        self
    }

    /// The VNode's whole state in the checkpoint format; only when no work is in flight.
    pub fn snapshot(&self) -> Result<Vec<u8>, VNodeError> {
        use crate::checkpoint::{FORMAT, Header, TensorEntry, TensorRole};
        let drained = self.next_f == self.next_b
            && self.train_inputs.is_empty()
            && self.grads.is_empty()
            && self.saved.is_empty()
            && self.rounds.as_ref().is_none_or(|r| r.open.is_none() && r.changes.is_empty());
        if !drained {
            return Err(VNodeError::NotDrained { vnode: self.id(), next_f: self.next_f, next_b: self.next_b });
        }
        let mut tensors = Vec::new();
        let mut data = Vec::new();
        let shapes: Vec<Vec<usize>> = self.current().iter().map(|p| p.shape()).collect();
        for (version, ps) in &self.versions {
            for (i, p) in ps.iter().enumerate() {
                tensors.push(TensorEntry {
                    role: TensorRole::Param,
                    index: i,
                    version: Some(*version),
                    shape: p.shape(),
                });
                data.push(p.data().to_vec());
            }
        }
        let (first, second) = self.optimizer.moments();
        for (role, moments) in [(TensorRole::First, first), (TensorRole::Second, second)] {
            for (i, m) in moments.iter().enumerate() {
                if let (Some(m), Some(shape)) = (m, shapes.get(i)) {
                    tensors.push(TensorEntry { role, index: i, version: None, shape: shape.clone() });
                    data.push(m.clone());
                }
            }
        }
        if let Some(r) = &self.rounds {
            for (role, values) in [(TensorRole::Anchor, &r.anchor), (TensorRole::OuterMomentum, &r.momentum)] {
                for (i, v) in values.iter().enumerate() {
                    tensors.push(TensorEntry { role, index: i, version: None, shape: r.shapes[i].clone() });
                    data.push(v.clone());
                }
            }
        }
        let header = Header {
            format: FORMAT,
            vnode: self.id(),
            kind: self.spec.node.kind.name().into(),
            updates: self.next_b,
            optimizer_steps: self.optimizer.steps(),
            tensors,
        };
        Ok(crate::checkpoint::encode(&header, &data))
    }

    /// A VNode restored from a snapshot taken by [`VNode::snapshot`].
    pub fn restore(spec: VNodeSpec, bytes: &[u8]) -> Result<VNode, VNodeError> {
        use crate::checkpoint::{StateError, TensorRole, decode};
        let vnode = spec.node.id;
        let wrap = |source| VNodeError::State { vnode, source };
        let (header, data) = decode(bytes).map_err(wrap)?;
        let mismatch = |m: String| wrap(StateError::Mismatch(m));
        if header.vnode != vnode || header.kind != spec.node.kind.name() {
            return Err(mismatch(format!(
                "it is the state of vnode {} ({}), not of vnode {vnode} ({})",
                header.vnode,
                header.kind,
                spec.node.kind.name()
            )));
        }
        let mut fresh = VNode::new(spec);
        let shapes: Vec<Vec<usize>> = fresh.current().iter().map(|p| p.shape()).collect();
        let n = shapes.len();
        let mut versions: std::collections::BTreeMap<u64, Vec<Option<Arc<Matrix>>>> = Default::default();
        let (mut first, mut second) = (vec![None; n], vec![None; n]);
        let (mut anchor, mut momentum) = (vec![None; n], vec![None; n]);
        for (entry, values) in header.tensors.iter().zip(data) {
            let Some(shape) = shapes.get(entry.index) else {
                return Err(mismatch(format!("tensor index {} beyond {n} parameters", entry.index)));
            };
            if &entry.shape != shape {
                return Err(mismatch(format!("shape {:?} where the graph says {:?}", entry.shape, shape)));
            }
            match entry.role {
                TensorRole::Anchor => {
                    anchor[entry.index] = Some(values);
                    continue;
                }
                TensorRole::OuterMomentum => {
                    momentum[entry.index] = Some(values);
                    continue;
                }
                _ => {}
            }
            match entry.role {
                TensorRole::Param => {
                    let m = HostTensor::f32(entry.shape.clone(), values)
                        .into_matrix()
                        .ok_or_else(|| mismatch(format!("parameter {} does not fill its shape", entry.index)))?;
                    versions.entry(entry.version.unwrap_or(header.updates)).or_insert_with(|| vec![None; n])
                        [entry.index] = Some(Arc::new(m));
                }
                TensorRole::First => first[entry.index] = Some(values),
                TensorRole::Second | TensorRole::Anchor | TensorRole::OuterMomentum => {
                    second[entry.index] = Some(values)
                }
            }
        }
        let mut restored = VecDeque::new();
        for (version, ps) in versions {
            let ps: Params = ps
                .into_iter()
                .collect::<Option<_>>()
                .ok_or_else(|| mismatch(format!("a parameter of version {version} is missing")))?;
            restored.push_back((version, ps));
        }
        if n > 0 && restored.back().map(|v| v.0) != Some(header.updates) {
            return Err(mismatch("the current parameter version is missing".into()));
        }
        fresh.optimizer =
            Optimizer::restored(fresh.spec.optimizer, fresh.spec.recipe, header.optimizer_steps, first, second);
        if n > 0 {
            fresh.versions = restored;
        } else {
            fresh.versions = VecDeque::from([(header.updates, Vec::new())]);
        }
        fresh.next_f = header.updates;
        fresh.next_b = header.updates;
        if fresh.rounds.is_some() {
            let anchor: Option<Vec<Vec<f32>>> = anchor.into_iter().collect();
            let Some(anchor) = anchor else {
                return Err(mismatch("the state of an averaging VNode lacks its anchor".into()));
            };
            // Momentum appears with the first nesterov round, for every parameter at once.
            let momentum: Vec<Vec<f32>> = momentum.into_iter().collect::<Option<_>>().unwrap_or_default();
            fresh.rounds = None;
            fresh = fresh.with_rounds(Some((anchor, momentum)));
        }
        Ok(fresh)
    }

    /// A VNode of `spec` holding `params` (its parameter tensors in canonical order, row-major,
    /// as [`VNode::params`] gives them) instead of its initial ones: how a trained model is
    /// served from its stored parameters.
    pub fn with_params(spec: VNodeSpec, params: Vec<Vec<f32>>) -> Result<VNode, VNodeError> {
        let mut fresh = VNode::new(spec);
        let vnode = fresh.id();
        let mismatch = |m: String| VNodeError::State { vnode, source: crate::checkpoint::StateError::Mismatch(m) };
        let current = fresh.current();
        if current.len() != params.len() {
            return Err(mismatch(format!("{} parameter tensors where the graph says {}", params.len(), current.len())));
        }
        let mut loaded = Vec::with_capacity(params.len());
        for (i, (p, values)) in current.iter().zip(params).enumerate() {
            let (rows, cols) = (p.rows(), p.cols());
            let len = values.len();
            let m = Matrix::new(rows, cols, values)
                .ok_or_else(|| mismatch(format!("parameter {i} has {len} values; the graph says [{rows}, {cols}]")))?;
            loaded.push(Arc::new(m));
        }
        fresh.versions = VecDeque::from([(0, loaded)]);
        Ok(fresh)
    }

    /// VNode id.
    pub fn id(&self) -> u32 {
        self.spec.node.id
    }

    /// Number of updates applied.
    pub fn version(&self) -> u64 {
        self.next_b
    }

    /// Current parameters in canonical order, on the host.
    pub fn params(&self) -> Vec<HostTensor> {
        self.current().iter().map(|p| HostTensor::copy_of(p)).collect()
    }

    fn current(&self) -> &[Arc<Matrix>] {
        self.versions.back().map(|v| v.1.as_slice()).unwrap_or(&[])
    }

    fn backend(&self, detail: String) -> VNodeError {
        VNodeError::Backend { vnode: self.id(), detail }
    }

    /// A kernel's refusal of micro-batch `mb`: a shape error when the inputs did not fit.
    fn kernel(&self, mb: u64, e: KernelError) -> VNodeError {
        match e {
            KernelError::Inputs(_) | KernelError::Labels { .. } => {
                VNodeError::Shape { vnode: self.id(), mb, detail: e.to_string() }
            }
            _ => self.backend(e.to_string()),
        }
    }

    fn window_err(&self, mb: u64, what: &'static str) -> VNodeError {
        VNodeError::Window { vnode: self.id(), mb, what, next_f: self.next_f, next_b: self.next_b }
    }

    /// Accepts one message and runs every pass that became possible, in canonical order.
    pub fn handle(&mut self, msg: Inbound) -> Result<Vec<Outbound>, VNodeError> {
        let wire_bytes = msg.tensor().data_bytes();
        self.handle_unpacked(unpack_message(msg), wire_bytes)
    }

    /// [`VNode::screen`] then [`VNode::handle`], unpacking a compact tensor once for both: the
    /// outer error is a refused tensor (state untouched), the inner one what `handle` returns.
    pub fn receive(&mut self, msg: Inbound) -> Result<Result<Vec<Outbound>, VNodeError>, crate::sanity::Rejection> {
        let wire_bytes = msg.tensor().data_bytes();
        let msg = unpack_message(msg);
        self.screen(&msg)?;
        Ok(self.handle_unpacked(msg, wire_bytes))
    }

    /// [`VNode::handle`] of a message already in f32, `wire_bytes` being its size as it travelled.
    fn handle_unpacked(&mut self, msg: Inbound, wire_bytes: u64) -> Result<Vec<Outbound>, VNodeError> {
        // In synchronous exact mode one VNode of the job computes at a time, so its kernels take
        // every core; otherwise VNodes compute side by side, each on its own host thread.
        if self.spec.in_flight == 1 && self.spec.node.mode == TrainingMode::Exact {
            crate::kernels::run(|| self.handle_here(msg, wire_bytes))
        } else {
            self.handle_here(msg, wire_bytes)
        }
    }

    /// [`VNode::handle_unpacked`], on whichever thread its host chose.
    fn handle_here(&mut self, msg: Inbound, wire_bytes: u64) -> Result<Vec<Outbound>, VNodeError> {
        let mut out = Vec::new();
        match msg {
            Inbound::Forward { mb, phase, port, tensor } => {
                let mut ports = self.spec.node.inputs.len();
                if port as usize >= ports {
                    return Err(VNodeError::Port { vnode: self.id(), port, ports });
                }
                let tensor = self.widen_pixels(mb, port as usize, tensor)?;
                self.check_input(mb, port as usize, &tensor)?;
                if phase.forward_only() {
                    // Evaluation runs the chain to the real loss; an auxiliary head is not
                    // evaluated, so its labels are not waited for. Inference has no labels at all.
                    ports = match (phase, self.spec.node.kind) {
                        (Phase::Infer, NodeKind::SoftmaxCrossEntropy { .. }) => 1,
                        _ => self.spec.node.layer_inputs().len(),
                    };
                    if port as usize >= ports {
                        return match phase {
                            Phase::Infer => Err(VNodeError::Port { vnode: self.id(), port, ports }),
                            _ => Ok(out),
                        };
                    }
                }
                let k = self.spec.in_flight as u64;
                let slots = match phase {
                    Phase::Train => {
                        if mb < self.next_f || mb >= self.next_f + 2 * k + crate::FEED_AHEAD + 8 {
                            return Err(self.window_err(mb, "forward input"));
                        }
                        &mut self.train_inputs
                    }
                    Phase::Eval | Phase::Infer => {
                        let pending = if phase == Phase::Eval { &mut self.eval_inputs } else { &mut self.infer_inputs };
                        if pending.len() >= MAX_PENDING_EVAL && !pending.contains_key(&mb) {
                            return Err(self.window_err(mb, "forward-only input (too many pending)"));
                        }
                        pending
                    }
                };
                let entry = slots.entry(mb).or_insert_with(|| vec![None; ports]);
                if entry[port as usize].is_some() {
                    return Err(VNodeError::Duplicate { vnode: self.spec.node.id, mb, what: "forward input" });
                }
                entry[port as usize] = Some(tensor);
                if phase == Phase::Train {
                    *self.received.entry(mb).or_default() += wire_bytes;
                }
                let pending = match phase {
                    Phase::Train => None,
                    Phase::Eval => take_complete(&mut self.eval_inputs, mb),
                    Phase::Infer => take_complete(&mut self.infer_inputs, mb),
                };
                if let Some(inputs) = pending {
                    self.eval(mb, phase, inputs, &mut out)?;
                }
            }
            Inbound::Backward { mb, from, tensor } => {
                let Some(slot) = self.grad_from.iter().position(|c| *c == from) else {
                    return Err(VNodeError::NotConsumer { vnode: self.id(), from });
                };
                let n = self.grad_from.len();
                if mb < self.next_b || mb >= self.next_f {
                    return Err(self.window_err(mb, "gradient"));
                }
                let rows = self.saved.get(&mb).map(|s| s.rows).unwrap_or(0);
                let width = self.spec.node.output_width;
                if tensor.shape != [rows, width] || tensor.as_f32().is_none() || !tensor.is_consistent() {
                    return Err(VNodeError::Shape {
                        vnode: self.id(),
                        mb,
                        detail: format!("gradient must be f32 [{rows}, {width}], got {:?}", tensor.shape),
                    });
                }
                let entry = self.grads.entry(mb).or_insert_with(|| vec![None; n]);
                if entry[slot].is_some() {
                    return Err(VNodeError::Duplicate { vnode: self.spec.node.id, mb, what: "gradient" });
                }
                entry[slot] = Some(tensor);
                *self.received.entry(mb).or_default() += wire_bytes;
            }
            Inbound::Sync { mb, from, index, tensor } => {
                self.take_change(mb, from, index, tensor)?;
                self.close_round(&mut out)?;
            }
        }
        self.pump(&mut out)?;
        Ok(out)
    }

    /// Keeps copy `from`'s change of parameter `index` for the round closed by step `mb`: the
    /// round this VNode waits on, or its next one (a copy may get there first).
    fn take_change(&mut self, mb: u64, from: u32, index: u32, tensor: HostTensor) -> Result<(), VNodeError> {
        let (vnode, next_f, next_b, me) = (self.id(), self.next_f, self.next_b, self.spec.node.pipeline as usize);
        let copies = &self.spec.node.copies;
        let Some(r) = self.rounds.as_mut() else {
            return Err(VNodeError::Round { vnode, from, mb, detail: "this VNode averages with no copies".into() });
        };
        let refuse = |detail: String| VNodeError::Round { vnode, from, mb, detail };
        let Some(p) = copies.iter().position(|&c| c == from).filter(|&p| p != me) else {
            return Err(refuse(format!("{from} is not one of its copies {copies:?}")));
        };
        let Some(shape) = r.shapes.get(index as usize) else {
            return Err(refuse(format!("no parameter {index} (it has {})", r.shapes.len())));
        };
        if tensor.shape != *shape || tensor.as_f32().is_none() || !tensor.is_consistent() {
            return Err(refuse(format!("parameter {index} is f32 {shape:?}, got {:?}", tensor.shape)));
        }
        let open = r.open.as_ref().map(|o| o.0);
        let plan = r.averaging.plan;
        if open != Some(mb) && mb < next_b {
            // That round is applied: a late or repeated message.
            return Err(VNodeError::Window { vnode, mb, what: "parameter change", next_f, next_b });
        }
        let next_round = plan.next_round_at(next_b);
        if open != Some(mb) && next_round != Some(mb) {
            return Err(refuse(format!("no round of this VNode closes at step {mb} (next: {next_round:?})")));
        }
        let slot = &mut r.slots(mb, copies.len())[p][index as usize];
        if slot.is_some() {
            return Err(VNodeError::Duplicate { vnode, mb, what: "parameter change" });
        }
        *slot = tensor.as_f32().map(<[f32]>::to_vec);
        Ok(())
    }

    /// Opens the round closed by the update of step `mb`: sends this VNode's change to every
    /// copy and holds `done` until the round is applied.
    fn open_round(&mut self, mb: u64, done: Outbound, out: &mut Vec<Outbound>) -> Result<(), VNodeError> {
        let current = self.params();
        let (id, me) = (self.id(), self.spec.node.pipeline as usize);
        let copies = &self.spec.node.copies;
        let Some(r) = self.rounds.as_mut() else {
            out.push(done);
            return Ok(());
        };
        let outer = r.averaging.outer;
        for (i, t) in current.iter().enumerate() {
            let anchor = r.anchor.get(i).map_or(&[][..], Vec::as_slice);
            let change = crate::rounds::change(t.as_f32().unwrap_or(&[]), anchor);
            let (packed, own) = crate::rounds::encode_change(change, t.shape.clone(), &outer);
            for (p, &to) in copies.iter().enumerate() {
                if p != me {
                    out.push(Outbound::Sync { to, from: id, mb, index: i as u32, tensor: packed.clone() });
                }
            }
            r.slots(mb, copies.len())[me][i] = own.as_f32().map(<[f32]>::to_vec);
        }
        r.open = Some((mb, done));
        self.close_round(out)
    }

    /// Applies the open round once every copy's change is in: the outer step on the sum of the
    /// changes in pipeline order, which makes the round's result the current parameters.
    fn close_round(&mut self, out: &mut Vec<Outbound>) -> Result<(), VNodeError> {
        let Some(r) = self.rounds.as_mut() else { return Ok(()) };
        let Some(mb) = r.open.as_ref().map(|o| o.0) else { return Ok(()) };
        let complete = r.changes.get(&mb).is_some_and(|c| c.iter().all(|p| p.iter().all(Option::is_some)));
        if !complete {
            return Ok(());
        }
        let changes = r.changes.remove(&mb).unwrap_or_default();
        let n = r.shapes.len();
        r.momentum.resize(n, Vec::new());
        let mut updated = Vec::with_capacity(n);
        for i in 0..n {
            let of_copies: Vec<&[f32]> = changes.iter().map(|p| p[i].as_deref().unwrap_or(&[])).collect();
            crate::rounds::outer_step(&r.averaging.outer, &mut r.anchor[i], &mut r.momentum[i], &of_copies);
            updated.push(HostTensor::f32(r.shapes[i].clone(), r.anchor[i].clone()).into_matrix().map(Arc::new));
        }
        if r.momentum.iter().all(Vec::is_empty) {
            r.momentum.clear();
        }
        let mut done = r.open.take().map(|o| o.1);
        if let Some(Outbound::Done { round_sha256, .. }) = &mut done {
            *round_sha256 = Some(crate::sha256_f32(r.anchor.iter().map(Vec::as_slice)));
        }
        let tensors: Option<Params> = updated.into_iter().collect();
        let tensors = tensors.ok_or_else(|| self.backend("averaged parameters".into()))?;
        if let Some(v) = self.versions.back_mut() {
            v.1 = tensors;
        }
        out.extend(done);
        Ok(())
    }

    /// The cheap checks of an inbound tensor, naming its sender: dtype, shape, NaN/Inf and
    /// magnitude. Messages this cannot attribute (an unknown port or consumer) pass, and
    /// [`VNode::handle`] refuses them. A rejected message must not be handled: the VNode's state
    /// stays as it was.
    pub fn screen(&self, msg: &Inbound) -> Result<(), crate::sanity::Rejection> {
        use crate::sanity::{Rejection, SanityError, Sender, check_f32, check_labels};
        let node = &self.spec.node;
        let unpacked;
        let msg = if msg.tensor().is_packed() {
            unpacked = unpack_message(msg.clone());
            &unpacked
        } else {
            msg
        };
        match msg {
            Inbound::Forward { mb, port, tensor, phase } => {
                let Some(source) = node.inputs.get(*port as usize) else { return Ok(()) };
                let (from, what) = match source {
                    Source::Node(v) => (Sender::VNode(*v), "activation"),
                    Source::Features => (Sender::Data, "features"),
                    Source::Labels => (Sender::Data, "labels"),
                };
                // A training input from the future: no honest producer runs that far ahead, so it
                // is the sender's fault, not a reason for this VNode to fail.
                let limit = self.next_f + 2 * u64::from(self.spec.in_flight) + crate::FEED_AHEAD + 8;
                if *phase == Phase::Train && *mb >= limit {
                    return Err(Rejection {
                        to: node.id,
                        mb: *mb,
                        from,
                        what,
                        error: SanityError::Ahead { mb: *mb, limit },
                    });
                }
                let width = node.input_width(*port as usize);
                let checked = match source {
                    Source::Labels => check_labels(tensor, width),
                    Source::Features if matches!(tensor.data, HostData::U8(_)) => self.screen_pixels(tensor, width),
                    _ => check_f32(tensor, &[None, Some(width)]),
                };
                checked.map_err(|error| Rejection { to: node.id, mb: *mb, from, what, error })
            }
            Inbound::Sync { mb, from, tensor, .. } => {
                if self.rounds.is_none() || !node.copies.contains(from) {
                    return Ok(());
                }
                check_f32(tensor, &[None, None]).map_err(|error| Rejection {
                    to: node.id,
                    mb: *mb,
                    from: Sender::VNode(*from),
                    what: "parameter change",
                    error,
                })
            }
            Inbound::Backward { mb, from, tensor } => {
                if !self.grad_from.contains(from) {
                    return Ok(());
                }
                // A gradient for a forward this VNode has not done yet cannot be honest.
                if *mb >= self.next_f {
                    return Err(Rejection {
                        to: node.id,
                        mb: *mb,
                        from: Sender::VNode(from.0),
                        what: "gradient",
                        error: SanityError::Ahead { mb: *mb, limit: self.next_f.saturating_sub(1) },
                    });
                }
                let rows = self.saved.get(mb).map(|s| s.rows);
                check_f32(tensor, &[rows, Some(node.output_width)]).map_err(|error| Rejection {
                    to: node.id,
                    mb: *mb,
                    from: Sender::VNode(from.0),
                    what: "gradient",
                    error,
                })
            }
        }
    }

    /// The refusal of `msg` because its sender did not prove it sent it (`why`), naming that
    /// sender as the cheap checks do.
    pub fn unproven(&self, msg: &Inbound, why: String) -> crate::sanity::Rejection {
        use crate::sanity::{Rejection, SanityError, Sender};
        let node = &self.spec.node;
        let (mb, from, what) = match msg {
            Inbound::Forward { mb, port, .. } => match node.inputs.get(*port as usize) {
                Some(Source::Node(v)) => (*mb, Sender::VNode(*v), "activation"),
                _ => (*mb, Sender::Data, "features"),
            },
            Inbound::Backward { mb, from, .. } => (*mb, Sender::VNode(from.0), "gradient"),
            Inbound::Sync { mb, from, .. } => (*mb, Sender::VNode(*from), "parameter change"),
        };
        Rejection { to: node.id, mb, from, what, error: SanityError::Unproven(why) }
    }

    /// Raw pixels on the features port: the shape of the features they become, and a table
    /// whose every value is sane (so every pixel is).
    fn screen_pixels(&self, t: &HostTensor, width: usize) -> Result<(), crate::sanity::SanityError> {
        use crate::sanity::{MAX_ABS, SanityError, check_u8, check_values};
        let Some(table) = &self.pixel_values else {
            return Err(SanityError::Dtype { expected: "f32", got: "u8" });
        };
        check_u8(t, &[None, Some(width)])?;
        check_values(&table[..], MAX_ABS)
    }

    /// Normalises raw pixels of a features input into the f32 features they stand for; any other
    /// tensor passes unchanged. Pixels anywhere else, or without a table, are refused.
    fn widen_pixels(&self, mb: u64, port: usize, t: HostTensor) -> Result<HostTensor, VNodeError> {
        let HostTensor { shape, data } = t;
        let HostData::U8(pixels) = data else { return Ok(HostTensor { shape, data }) };
        let features = self.spec.node.inputs.get(port) == Some(&Source::Features);
        match (&self.pixel_values, features) {
            (Some(table), true) => Ok(HostTensor::f32(shape, pixels.iter().map(|&p| table[usize::from(p)]).collect())),
            _ => Err(VNodeError::Shape {
                vnode: self.id(),
                mb,
                detail: format!(
                    "input port {port} got u8 pixels, which only a features port with a normalisation takes"
                ),
            }),
        }
    }

    fn check_input(&self, mb: u64, port: usize, t: &HostTensor) -> Result<(), VNodeError> {
        let node = &self.spec.node;
        let shape_err = |detail: String| VNodeError::Shape { vnode: node.id, mb, detail };
        if !t.is_consistent() {
            return Err(shape_err(format!("{} elements do not fill shape {:?}", t.numel(), t.shape)));
        }
        let labels_classes = match (node.kind, node.aux) {
            (NodeKind::SoftmaxCrossEntropy { classes }, _) if port == 1 => Some(classes),
            (_, Some(head)) if port == head.labels_port as usize => Some(head.classes),
            _ => None,
        };
        if let Some(classes) = labels_classes {
            let HostData::I32(labels) = &t.data else {
                return Err(shape_err("labels must be i32".into()));
            };
            if t.shape.len() != 1 || t.shape[0] == 0 {
                return Err(shape_err(format!("labels must have shape [batch], got {:?}", t.shape)));
            }
            if let Some(&label) = labels.iter().find(|&&l| l < 0 || l as usize >= classes) {
                return Err(VNodeError::Label { vnode: node.id, mb, label, classes });
            }
            return Ok(());
        }
        let width = node.input_width(port);
        let ok = t.as_f32().is_some() && t.shape.len() == 2 && t.shape[0] > 0 && t.shape[1] == width;
        if !ok {
            return Err(shape_err(format!("input port {port} wants f32 [batch, {width}], got {:?}", t.shape)));
        }
        Ok(())
    }

    /// A join's inputs must be of one batch: mismatched rows are a producer's error, which
    /// must not reach the tensor kernels.
    fn check_rows(&self, mb: u64, inputs: &[HostTensor]) -> Result<(), VNodeError> {
        let rows: Vec<usize> = inputs.iter().map(HostTensor::rows).collect();
        if rows.windows(2).any(|w| w[0] != w[1]) {
            return Err(VNodeError::Shape { vnode: self.id(), mb, detail: format!("inputs of {rows:?} rows") });
        }
        Ok(())
    }

    /// The parameter version the forward of `mb` uses. In local mode no gradient waits on
    /// another block, so every VNode is synchronous (version `mb`) and `in_flight` only lets
    /// blocks run ahead of one another.
    fn needed_version(&self, mb: u64) -> u64 {
        match self.spec.node.mode {
            TrainingMode::Exact => (mb + 1).saturating_sub(self.spec.in_flight as u64),
            TrainingMode::Local => mb,
        }
    }

    fn pump(&mut self, out: &mut Vec<Outbound>) -> Result<(), VNodeError> {
        loop {
            if self.rounds.as_ref().is_some_and(|r| r.open.is_some()) {
                // Nothing runs on parameters a round is about to replace.
                return Ok(());
            }
            let f_ready = self.next_b >= self.needed_version(self.next_f)
                && self.train_inputs.get(&self.next_f).is_some_and(|v| v.iter().all(Option::is_some));
            if f_ready {
                let mb = self.next_f;
                let inputs = take_complete(&mut self.train_inputs, mb).unwrap_or_default();
                self.train_forward(mb, inputs, out)?;
                self.next_f += 1;
                continue;
            }
            let b_ready = self.next_b < self.next_f
                && (self.grad_from.is_empty()
                    || self.grads.get(&self.next_b).is_some_and(|v| v.iter().all(Option::is_some)));
            if b_ready {
                let mb = self.next_b;
                self.train_backward(mb, out)?;
                self.next_b += 1;
                let keep_from = self.needed_version(self.next_f);
                while self.versions.len() > 1 && self.versions.front().is_some_and(|v| v.0 < keep_from) {
                    self.versions.pop_front();
                }
                continue;
            }
            return Ok(());
        }
    }

    fn params_at(&self, version: u64) -> Params {
        self.versions.iter().find(|v| v.0 == version).or(self.versions.back()).map(|v| v.1.clone()).unwrap_or_default()
    }

    /// Which of the kind's inputs send their gradient back to a producer.
    fn want_dx(&self) -> Vec<bool> {
        (0..self.spec.node.kind.ports().len()).map(|port| self.spec.node.sends_gradient(port)).collect()
    }

    /// The kind's own inputs as matrices, once they agree on their rows (`layer::forward`
    /// checks their count against the kind's ports).
    fn matrices(&self, mb: u64, inputs: Vec<HostTensor>) -> Result<Vec<Matrix>, VNodeError> {
        self.check_rows(mb, &inputs)?;
        inputs
            .into_iter()
            .map(|t| t.into_matrix().ok_or_else(|| self.backend("an input is not f32 [rows, width]".into())))
            .collect()
    }

    fn train_forward(&mut self, mb: u64, inputs: Vec<HostTensor>, out: &mut Vec<Outbound>) -> Result<(), VNodeError> {
        let started = Instant::now();
        let cpu = cpu_now();
        let bytes_in = self.received.remove(&mb).unwrap_or(0);
        let rows = inputs.first().map(HostTensor::rows).unwrap_or(0);
        if let NodeKind::SoftmaxCrossEntropy { classes } = self.spec.node.kind {
            let (loss, correct, dlogits) = self.loss_pass(mb, &inputs, classes, true)?;
            let dlogits = dlogits.ok_or_else(|| self.backend("loss produced no logits gradient".into()))?;
            out.push(Outbound::Loss { mb, phase: Phase::Train, loss, correct, count: rows as u32 });
            let hash = crate::sha256_f32([dlogits.as_f32().unwrap_or(&[])]);
            self.saved.insert(
                mb,
                Saved {
                    kept: None,
                    params: Vec::new(),
                    loss_grads: vec![Some(dlogits), None],
                    head: None,
                    output_sha256: hash,
                    forward_us: started.elapsed().as_micros() as u64,
                    forward_cpu_us: cpu_us(cpu),
                    bytes_in,
                    bytes_out: 0,
                    rows,
                },
            );
            return Ok(());
        }
        let params = self.params_at(self.needed_version(mb));
        let mut inputs = inputs;
        let labels = match self.spec.node.aux {
            Some(head) if inputs.len() > head.labels_port as usize => Some(inputs.remove(head.labels_port as usize)),
            _ => None,
        };
        let xs = self.matrices(mb, inputs)?;
        let kind = self.spec.node.kind;
        let own = layer::own_tensors(kind).min(params.len());
        let pass = layer::Pass::Train {
            root_seed: self.spec.root_seed,
            origin: self.spec.node.origin,
            pipeline: self.spec.node.pipeline,
            step: mb,
        };
        let forward = layer::forward(&self.spec.compute, kind, &params[..own], xs, pass, &self.want_dx())
            .map_err(|e| self.kernel(mb, e))?;
        let head = match (self.spec.node.aux, labels) {
            (Some(head), Some(labels)) => {
                let HostData::I32(labels) = &labels.data else {
                    return Err(VNodeError::Shape { vnode: self.id(), mb, detail: "labels must be i32".into() });
                };
                let pass =
                    layer::head_pass(&head, &params[own..], &forward.output, labels).map_err(|e| self.kernel(mb, e))?;
                Some((pass.grads, pass.dy))
            }
            _ => None,
        };
        let hash = crate::sha256_f32([forward.output.data()]);
        let bytes_out = self.emit_forward(mb, Phase::Train, HostTensor::from_matrix(forward.output), out);
        self.saved.insert(
            mb,
            Saved {
                kept: Some(forward.kept),
                params,
                loss_grads: Vec::new(),
                head,
                output_sha256: hash,
                forward_us: started.elapsed().as_micros() as u64,
                forward_cpu_us: cpu_us(cpu),
                bytes_in,
                bytes_out,
                rows,
            },
        );
        Ok(())
    }

    /// Sends `y` to every consumer, packed in the job's wire format for those in another block;
    /// returns the bytes sent.
    fn emit_forward(&self, mb: u64, phase: Phase, y: HostTensor, out: &mut Vec<Outbound>) -> u64 {
        let node = &self.spec.node;
        let packed = (node.wire != WireFormat::F32 && node.consumer_crosses_block.iter().any(|&c| c))
            .then(|| crate::compact::pack(&y, node.wire));
        let (mut y, n, mut bytes) = (Some(y), node.consumers.len(), 0);
        for (i, &(to, port)) in node.consumers.iter().enumerate() {
            let tensor = match &packed {
                Some(p) if node.consumer_crosses_block.get(i).copied().unwrap_or(false) => Some(p.clone()),
                _ if i + 1 == n => y.take(),
                _ => y.clone(),
            };
            if let Some(tensor) = tensor {
                bytes += bytes_of(&tensor);
                out.push(Outbound::Forward { to, port, mb, phase, tensor });
            }
        }
        bytes
    }

    /// Loss, correct count and (when training) the logits gradient.
    fn loss_pass(
        &self,
        mb: u64,
        inputs: &[HostTensor],
        classes: usize,
        train: bool,
    ) -> Result<(f32, u32, Option<HostTensor>), VNodeError> {
        let (logits, labels) = match (inputs.first(), inputs.get(1).map(|t| &t.data)) {
            (Some(l), Some(HostData::I32(y))) => (l, y),
            _ => return Err(VNodeError::Shape { vnode: self.id(), mb, detail: "loss needs logits and labels".into() }),
        };
        if logits.rows() != labels.len() || logits.shape.get(1) != Some(&classes) {
            return Err(VNodeError::Shape {
                vnode: self.id(),
                mb,
                detail: format!("logits {:?} for {} labels of {classes} classes", logits.shape, labels.len()),
            });
        }
        let x = logits.clone().into_matrix().ok_or_else(|| self.backend("logits not f32 rank 2".into()))?;
        let target = layer::target(labels, classes, self.spec.recipe.label_smoothing);
        let (value, grad) = layer::softmax_cross_entropy(&x, &target).map_err(|e| self.kernel(mb, e))?;
        let correct = layer::correct(x.data(), labels, classes);
        Ok((value, correct, train.then(|| HostTensor::from_matrix(grad))))
    }

    fn train_backward(&mut self, mb: u64, out: &mut Vec<Outbound>) -> Result<(), VNodeError> {
        let started = Instant::now();
        let cpu = cpu_now();
        let saved = self.saved.remove(&mb).ok_or_else(|| self.backend(format!("no saved forward for {mb}")))?;
        let Saved { kept, params, loss_grads, head, output_sha256, forward_us, forward_cpu_us, .. } = saved;
        let (mut bytes_in, mut bytes_out) = (saved.bytes_in, saved.bytes_out);
        let kind = self.spec.node.kind;
        let input_grads: Vec<Option<HostTensor>> = match kept {
            None => loss_grads,
            Some(kept) => {
                let gs = self.grads.remove(&mb).unwrap_or_default();
                bytes_in += self.received.remove(&mb).unwrap_or(0);
                let want_dx = self.want_dx();
                if params.is_empty() && !want_dx.contains(&true) {
                    Vec::new()
                } else {
                    let (head_grads, g) = match head {
                        // A block output's only consumers are in other blocks: its gradient is
                        // its head's alone.
                        Some(head) => head,
                        None => {
                            let g = sum_in_order(gs).and_then(HostTensor::into_matrix);
                            (Vec::new(), g.ok_or_else(|| self.backend("missing gradient".into()))?)
                        }
                    };
                    let own = layer::own_tensors(kind).min(params.len());
                    let (mut grads, dxs) =
                        layer::backward(kind, &params[..own], kept, g, &want_dx).map_err(|e| self.kernel(mb, e))?;
                    grads.extend(head_grads);
                    // Released first, so the update can write the parameters in place.
                    drop(params);
                    if !grads.is_empty() {
                        self.apply_update(mb, grads)?;
                    }
                    dxs.into_iter().map(|dx| dx.map(HostTensor::from_matrix)).collect()
                }
            }
        };
        for (port, (g, src)) in input_grads.into_iter().zip(&self.spec.node.inputs).enumerate() {
            if !self.spec.node.sends_gradient(port) {
                continue;
            }
            if let (Some(tensor), Source::Node(to)) = (g, src) {
                let node = &self.spec.node;
                let tensor =
                    if node.wire != WireFormat::F32 && node.input_crosses_block.get(port).copied().unwrap_or(false) {
                        crate::compact::pack(&tensor, node.wire)
                    } else {
                        tensor
                    };
                bytes_out += bytes_of(&tensor);
                out.push(Outbound::Backward { to: *to, from: (self.id(), port as u32), mb, tensor });
            }
        }
        let compute_us = forward_us + started.elapsed().as_micros() as u64;
        let cpu_us = forward_cpu_us + cpu_us(cpu);
        let done = Outbound::Done { mb, compute_us, cpu_us, bytes_in, bytes_out, output_sha256, round_sha256: None };
        if self.rounds.as_ref().is_some_and(|r| r.averaging.plan.closes_round(mb)) {
            return self.open_round(mb, done, out);
        }
        out.push(done);
        Ok(())
    }

    /// Update number `mb + 1`: the current parameters after one optimizer step. They are written
    /// in place unless a forward still to run reads the current version (pipelined exact mode),
    /// which then keeps it.
    fn apply_update(&mut self, mb: u64, grads: Vec<Matrix>) -> Result<(), VNodeError> {
        let keep_from = self.needed_version(self.next_f);
        let (version, mut params) =
            self.versions.pop_back().ok_or_else(|| self.backend("no parameter version".into()))?;
        if version >= keep_from {
            self.versions.push_back((version, params.clone()));
        }
        self.optimizer.update(&mut params, grads).map_err(|e| self.backend(e.to_string()))?;
        self.versions.push_back((mb + 1, params));
        Ok(())
    }

    /// A forward-only pass (evaluation or inference) of micro-batch `mb` on complete `inputs`.
    fn eval(
        &mut self,
        mb: u64,
        phase: Phase,
        inputs: Vec<HostTensor>,
        out: &mut Vec<Outbound>,
    ) -> Result<(), VNodeError> {
        if let NodeKind::SoftmaxCrossEntropy { classes } = self.spec.node.kind {
            if phase == Phase::Infer {
                let probabilities = self.probabilities(mb, &inputs, classes)?;
                out.push(Outbound::Predictions { mb, probabilities });
                return Ok(());
            }
            let (loss, correct, _) = self.loss_pass(mb, &inputs, classes, false)?;
            let count = inputs.first().map(HostTensor::rows).unwrap_or(0) as u32;
            out.push(Outbound::Loss { mb, phase: Phase::Eval, loss, correct, count });
            return Ok(());
        }
        let labels_port = self.spec.node.aux.map(|a| a.labels_port as usize);
        let inputs: Vec<HostTensor> =
            inputs.into_iter().enumerate().filter(|(port, _)| Some(*port) != labels_port).map(|(_, t)| t).collect();
        let xs = self.matrices(mb, inputs)?;
        let current = self.current();
        let own = layer::own_tensors(self.spec.node.kind).min(current.len());
        let y = layer::forward(&self.spec.compute, self.spec.node.kind, &current[..own], xs, layer::Pass::Eval, &[])
            .map_err(|e| self.kernel(mb, e))?;
        self.emit_forward(mb, phase, HostTensor::from_matrix(y.output), out);
        Ok(())
    }

    /// The class probabilities of `logits` (`inputs[0]`), as [`layer::probabilities`] gives them.
    fn probabilities(&self, mb: u64, inputs: &[HostTensor], classes: usize) -> Result<HostTensor, VNodeError> {
        let logits = inputs.first().filter(|l| l.shape.get(1) == Some(&classes)).ok_or_else(|| VNodeError::Shape {
            vnode: self.id(),
            mb,
            detail: format!("inference needs logits of {classes} classes"),
        })?;
        let x = logits.clone().into_matrix().ok_or_else(|| self.backend("logits not f32 rank 2".into()))?;
        Ok(HostTensor::from_matrix(layer::probabilities(&x)))
    }
}

/// The message with its tensor in f32, as [`VNode::handle`] sees it.
fn unpack_message(msg: Inbound) -> Inbound {
    match msg {
        Inbound::Forward { mb, phase, port, tensor } => {
            Inbound::Forward { mb, phase, port, tensor: crate::compact::unpack(tensor) }
        }
        Inbound::Backward { mb, from, tensor } => {
            Inbound::Backward { mb, from, tensor: crate::compact::unpack(tensor) }
        }
        Inbound::Sync { mb, from, index, tensor } => {
            Inbound::Sync { mb, from, index, tensor: crate::compact::unpack(tensor) }
        }
    }
}

fn take_complete(map: &mut BTreeMap<u64, Vec<Option<HostTensor>>>, mb: u64) -> Option<Vec<HostTensor>> {
    if map.get(&mb)?.iter().all(Option::is_some) {
        map.remove(&mb).map(|v| v.into_iter().flatten().collect())
    } else {
        None
    }
}

/// Sums gradients from several consumers in consumer order, so the float result is canonical.
/// The gradients a node's consumers sent, added in consumer order on the host.
pub(crate) fn sum_in_order(gs: Vec<Option<HostTensor>>) -> Option<HostTensor> {
    let mut it = gs.into_iter();
    let mut acc = it.next()??;
    for g in it {
        let g = g?;
        if let (HostData::F32(a), HostData::F32(b)) = (&mut acc.data, &g.data) {
            for (x, y) in a.iter_mut().zip(b) {
                *x += *y;
            }
        }
    }
    Some(acc)
}

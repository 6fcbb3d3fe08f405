//! The single-process reference: the same graph trained in one process, no VNodes and no
//! messages. The mesh must reproduce its parameters bit for bit in
//! synchronous mode, and in local mode for any `in_flight`; keeping both on the kernels of
//! [`crate::layer`] is what makes that hold.
//!
//! In local mode a step trains block by block, in block order: each block trains its
//! nodes and its output's auxiliary head (the last block: the real
//! loss), fed the detached outputs of earlier blocks for the same micro-batch, exactly as the
//! VNodes receive them: packed in the job's wire format and unpacked again. (Exact mode's
//! training here keeps f32 at block boundaries; only its evaluation applies the wire format.)

use crate::compact;
use crate::host::HostTensor;
use crate::kernels::Matrix;
use crate::layer::{self, Params};
use crate::optim::Optimizer;
use dcnr_model::graph::{Source, ValidGraph};
use dcnr_model::{NodeKind, OptimizerSpec, TrainingMode, WireFormat};
use std::sync::Arc;

/// Whole-graph trainer over a validated graph.
pub struct Reference {
    graph: ValidGraph,
    params: Vec<Params>,
    optimizers: Vec<Optimizer>,
    root_seed: u64,
    /// The data-parallel copy this trainer is, for the streams of dropout masks.
    pipeline: u32,
    /// Training steps taken: the next step's number.
    steps: u64,
    /// Where the math runs.
    compute: crate::Compute,
}

/// What a node's forward left for its backward in a reference step.
enum Recorded {
    /// The loss: the gradient of its logits.
    Loss(HostTensor),
    /// Any other node: what its kind keeps, and in local mode its auxiliary head's parameter
    /// gradients and the gradient of its output.
    Node(layer::Kept, Option<(Vec<Matrix>, Matrix)>),
}

/// Loss and correct predictions of one batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchResult {
    /// Mean loss.
    pub loss: f32,
    /// Correct arg-max predictions.
    pub correct: u32,
}

impl Reference {
    /// Parameters initialised exactly as the VNodes initialise theirs.
    pub fn new(graph: &ValidGraph, optimizer: OptimizerSpec, root_seed: u64) -> Reference {
        // Drawn parameters are always rank 2.
        let params: Vec<Params> =
            graph.nodes.iter().map(|n| layer::to_params(&layer::init_node(n, root_seed)).unwrap_or_default()).collect();
        let recipe = graph.spec.training.recipe();
        let optimizers = params.iter().map(|p| Optimizer::new(optimizer, recipe, p.len())).collect();
        Reference {
            graph: graph.clone(),
            params,
            optimizers,
            root_seed,
            pipeline: 0,
            steps: 0,
            compute: crate::Compute::Host,
        }
    }

    /// The same trainer computing where `compute` says (a GPU: the single-process baseline a
    /// GPU mesh is measured against).
    pub fn on(self, compute: crate::Compute) -> Reference {
        Reference { compute, ..self }
    }

    /// The pass of node `origin` in the step being taken.
    fn train_pass(&self, origin: u32) -> layer::Pass {
        layer::Pass::Train { root_seed: self.root_seed, origin, pipeline: self.pipeline, step: self.steps }
    }

    /// The logits reaching the loss, forward only with the current parameters. Values crossing
    /// a block boundary take the job's wire format and back, as between VNodes.
    fn logits(&self, features: &HostTensor) -> Result<Matrix, String> {
        let mut values: Vec<Option<HostTensor>> = vec![None; self.graph.nodes.len()];
        let wire = self.graph.spec.training.wire;
        for &id in &self.graph.topo {
            let node = &self.graph.nodes[id as usize];
            let value_of = |s: &Source| match s {
                Source::Node(p) if wire != WireFormat::F32 && self.graph.nodes[*p as usize].block != node.block => {
                    Some(compact::round_trip(values[*p as usize].as_ref()?, wire))
                }
                Source::Node(p) => values[*p as usize].clone(),
                Source::Features => Some(features.clone()),
                Source::Labels => None,
            };
            let matrix = |s: &Source| value_of(s).and_then(HostTensor::into_matrix);
            if let NodeKind::SoftmaxCrossEntropy { .. } = node.kind {
                return matrix(&node.inputs[0]).ok_or_else(|| "loss input missing".to_string());
            }
            let ins: Vec<Matrix> =
                node.layer_inputs().iter().map(matrix).collect::<Option<_>>().ok_or("input missing")?;
            let own = &self.params[id as usize];
            let own = &own[..layer::own_tensors(node.kind).min(own.len())];
            let y = layer::forward(&self.compute, node.kind, own, ins, layer::Pass::Eval, &[])
                .map_err(|e| e.to_string())?;
            values[id as usize] = Some(HostTensor::from_matrix(y.output));
        }
        Err("graph has no loss".into())
    }

    /// One training step on a batch: synchronous SGD in exact mode; in local mode every block
    /// on its own loss (its head's, or the real loss for the last block).
    ///
    /// The step is taken node by node, as the VNodes take it: each node's forward keeps what
    /// its own backward reads, and its backward starts from the sum of its consumers' gradients
    /// taken in consumer order. A whole-graph autodiff would sum the gradients reaching a node
    /// with several consumers in its own order, and floating point addition is not associative.
    pub fn train_step(&mut self, features: &HostTensor, labels: &[i32]) -> Result<BatchResult, String> {
        let result = crate::kernels::run(|| self.train_step_nodes(features, labels));
        self.steps += 1;
        result
    }

    fn train_step_nodes(&mut self, features: &HostTensor, labels: &[i32]) -> Result<BatchResult, String> {
        let n = self.graph.nodes.len();
        let training = &self.graph.spec.training;
        let (classes, smoothing) = (self.graph.spec.data.classes, training.label_smoothing);
        // Local mode trains blocks apart, each on values as they arrive over the wire.
        let packed = self.graph.mode() == TrainingMode::Local && training.wire != WireFormat::F32;
        let mut outputs: Vec<Option<HostTensor>> = vec![None; n];
        let mut saved: Vec<Option<Recorded>> = (0..n).map(|_| None).collect();
        let mut result = None;
        for &id in &self.graph.topo {
            let node = &self.graph.nodes[id as usize];
            let value_of = |s: &Source| -> Option<HostTensor> {
                match s {
                    Source::Node(p) => {
                        let v = outputs[*p as usize].as_ref()?;
                        let crosses = self.graph.nodes.get(*p as usize)?.block != node.block;
                        Some(if packed && crosses { compact::round_trip(v, training.wire) } else { v.clone() })
                    }
                    Source::Features => Some(features.clone()),
                    Source::Labels => None,
                }
            };
            if let NodeKind::SoftmaxCrossEntropy { classes } = node.kind {
                let logits = value_of(&node.inputs[0]).and_then(HostTensor::into_matrix).ok_or("loss input missing")?;
                let target = layer::target(labels, classes, smoothing);
                let (loss, dlogits) = layer::softmax_cross_entropy(&logits, &target).map_err(|e| e.to_string())?;
                result = Some((loss, logits));
                saved[id as usize] = Some(Recorded::Loss(HostTensor::from_matrix(dlogits)));
                continue;
            }
            let inputs: Vec<Matrix> = node
                .layer_inputs()
                .iter()
                .map(|s| value_of(s).and_then(HostTensor::into_matrix))
                .collect::<Option<_>>()
                .ok_or("input missing")?;
            let want_dx: Vec<bool> = (0..inputs.len()).map(|port| node.sends_gradient(port)).collect();
            let params = &self.params[id as usize];
            let own = layer::own_tensors(node.kind).min(params.len());
            let pass = self.train_pass(node.origin);
            let forward = layer::forward(&self.compute, node.kind, &params[..own], inputs, pass, &want_dx)
                .map_err(|e| e.to_string())?;
            let head = match &node.aux {
                Some(head) => {
                    let p =
                        layer::head_pass(head, &params[own..], &forward.output, labels).map_err(|e| e.to_string())?;
                    Some((p.grads, p.dy))
                }
                None => None,
            };
            outputs[id as usize] = Some(HostTensor::from_matrix(forward.output));
            saved[id as usize] = Some(Recorded::Node(forward.kept, head));
        }
        // Per node, the gradient each consumer sends back, in consumer order.
        let mut arriving: Vec<Vec<Option<HostTensor>>> =
            self.graph.nodes.iter().map(|n| vec![None; n.consumers.len()]).collect();
        for &id in self.graph.topo.iter().rev() {
            let node = &self.graph.nodes[id as usize];
            let input_grads: Vec<Option<HostTensor>> = match saved[id as usize].take() {
                Some(Recorded::Loss(dlogits)) => vec![Some(dlogits)],
                Some(Recorded::Node(kept, head)) => {
                    let want_dx: Vec<bool> = (0..node.kind.ports().len()).map(|p| node.sends_gradient(p)).collect();
                    if self.params[id as usize].is_empty() && !want_dx.contains(&true) {
                        continue;
                    }
                    let (head_grads, g) = match head {
                        Some(head) => head,
                        None => {
                            let from: Vec<Option<HostTensor>> = arriving[id as usize]
                                .iter_mut()
                                .enumerate()
                                .filter(|(i, _)| node.expects_gradient(*i))
                                .map(|(_, g)| g.take())
                                .collect();
                            let g = crate::vnode::sum_in_order(from).and_then(HostTensor::into_matrix);
                            (Vec::new(), g.ok_or("missing gradient")?)
                        }
                    };
                    let params = &mut self.params[id as usize];
                    let own = layer::own_tensors(node.kind).min(params.len());
                    let (mut grads, dxs) =
                        layer::backward(node.kind, &params[..own], kept, g, &want_dx).map_err(|e| e.to_string())?;
                    grads.extend(head_grads);
                    if !grads.is_empty() {
                        self.optimizers[id as usize].update(params, grads).map_err(|e| e.to_string())?;
                    }
                    dxs.into_iter().map(|dx| dx.map(HostTensor::from_matrix)).collect()
                }
                None => continue,
            };
            for (port, g) in input_grads.into_iter().enumerate() {
                if let (Some(g), Some(Source::Node(p))) = (g, node.inputs.get(port)) {
                    let producer = &self.graph.nodes[*p as usize];
                    let slot = producer.consumers.iter().position(|c| *c == (id, port as u32)).ok_or("consumer")?;
                    arriving[*p as usize][slot] = Some(g);
                }
            }
        }
        let (loss, logits) = result.ok_or("graph has no loss")?;
        Ok(BatchResult { loss, correct: layer::correct(logits.data(), labels, classes) })
    }

    /// Forward-only loss and accuracy of a batch with the current parameters.
    pub fn evaluate(&self, features: &HostTensor, labels: &[i32]) -> Result<BatchResult, String> {
        crate::kernels::run(|| {
            let logits = self.logits(features)?;
            let classes = self.graph.spec.data.classes;
            let target = layer::target(labels, classes, self.graph.spec.training.label_smoothing);
            let (loss, _) = layer::softmax_cross_entropy(&logits, &target).map_err(|e| e.to_string())?;
            Ok(BatchResult { loss, correct: layer::correct(logits.data(), labels, classes) })
        })
    }

    /// Class probabilities of a batch with the current parameters: the single-process forward
    /// serving answers with.
    pub fn predict(&self, features: &HostTensor) -> Result<HostTensor, String> {
        Ok(HostTensor::from_matrix(layer::probabilities(&self.logits(features)?)))
    }

    /// Replaces the parameters of node `node` (same count and shapes).
    pub fn set_params(&mut self, node: usize, params: &[HostTensor]) -> Result<(), String> {
        let slot = self.params.get_mut(node).ok_or_else(|| format!("no node {node}"))?;
        if slot.len() != params.len() {
            return Err(format!("node {node} has {} parameters, not {}", slot.len(), params.len()));
        }
        for (p, t) in slot.iter_mut().zip(params) {
            let m = t.clone().into_matrix().ok_or_else(|| format!("node {node}: a parameter is not f32 rank 2"))?;
            if (m.rows(), m.cols()) != (p.rows(), p.cols()) {
                return Err(format!("node {node}: a parameter of another shape"));
            }
            *p = Arc::new(m);
        }
        Ok(())
    }

    /// Parameters of every node, by VNode id, in canonical order.
    pub fn params(&self) -> Vec<Vec<HostTensor>> {
        self.params.iter().map(|ps| ps.iter().map(|p| HostTensor::copy_of(p)).collect()).collect()
    }
}

/// `pipelines = R` in one process: one [`Reference`] per copy of pipeline 0's graph, copy `p`
/// trained on shard `p` of the data, and at every round the outer step the VNodes apply, on the
/// same values in the same order (with one pipeline, plain [`Reference`] training).
pub struct Pipelines {
    copies: Vec<Reference>,
    averaging: Option<crate::rounds::Averaging>,
    /// Per node, per parameter tensor: the anchor and the outer momentum.
    anchor: Vec<Vec<Vec<f32>>>,
    momentum: Vec<Vec<Vec<f32>>>,
}

impl Pipelines {
    /// The copies of `graph` (as validated, pipelines included) over a training set of
    /// `train_samples`, initialised as the VNodes initialise theirs.
    pub fn new(
        graph: &ValidGraph,
        optimizer: OptimizerSpec,
        root_seed: u64,
        train_samples: usize,
    ) -> Result<Pipelines, String> {
        let zero = graph.pipeline_zero();
        let copies: Vec<Reference> = (0..graph.pipelines())
            .map(|p| Reference { pipeline: p, ..Reference::new(&zero, optimizer, root_seed) })
            .collect();
        let anchor = copies
            .first()
            .map(|c| c.params())
            .unwrap_or_default()
            .into_iter()
            .map(|ps| ps.into_iter().map(|p| p.as_f32().map(<[f32]>::to_vec).unwrap_or_default()).collect())
            .collect();
        let momentum = vec![Vec::new(); zero.nodes.len()];
        Ok(Pipelines { copies, averaging: crate::rounds::Averaging::of(graph, train_samples), anchor, momentum })
    }

    /// Every copy computing where `compute` says.
    pub fn on(self, compute: crate::Compute) -> Pipelines {
        let copies = self.copies.into_iter().map(|c| c.on(compute.clone())).collect();
        Pipelines { copies, ..self }
    }

    /// Data-parallel copies.
    pub fn pipelines(&self) -> usize {
        self.copies.len()
    }

    /// Step `step` of every copy, `batches[p]` being copy `p`'s (features, labels); closes a
    /// round when the plan says so. Returns each copy's loss and correct count.
    pub fn train_step(&mut self, step: u64, batches: &[(HostTensor, Vec<i32>)]) -> Result<Vec<BatchResult>, String> {
        if batches.len() != self.copies.len() {
            return Err(format!("{} batches for {} pipelines", batches.len(), self.copies.len()));
        }
        let mut results = Vec::with_capacity(batches.len());
        for (copy, (x, y)) in self.copies.iter_mut().zip(batches) {
            results.push(copy.train_step(x, y)?);
        }
        if self.averaging.is_some_and(|a| a.plan.closes_round(step)) {
            self.average()?;
        }
        Ok(results)
    }

    /// The round: per node and parameter, every copy's change since the anchor (as it travels,
    /// in the outer wire format), summed in pipeline order, then the outer step; every copy
    /// continues from the result.
    fn average(&mut self) -> Result<(), String> {
        let Some(averaging) = self.averaging else { return Ok(()) };
        let params: Vec<Vec<Vec<HostTensor>>> = self.copies.iter().map(Reference::params).collect();
        for node in 0..self.anchor.len() {
            let tensors = self.anchor[node].len();
            if tensors == 0 {
                continue;
            }
            self.momentum[node].resize(tensors, Vec::new());
            let mut updated = Vec::with_capacity(tensors);
            for i in 0..tensors {
                let changes: Vec<Vec<f32>> = params
                    .iter()
                    .map(|copy| {
                        let t = &copy[node][i];
                        let change = crate::rounds::change(t.as_f32().unwrap_or(&[]), &self.anchor[node][i]);
                        let (_, own) = crate::rounds::encode_change(change, t.shape.clone(), &averaging.outer);
                        own.as_f32().map(<[f32]>::to_vec).unwrap_or_default()
                    })
                    .collect();
                let refs: Vec<&[f32]> = changes.iter().map(Vec::as_slice).collect();
                crate::rounds::outer_step(
                    &averaging.outer,
                    &mut self.anchor[node][i],
                    &mut self.momentum[node][i],
                    &refs,
                );
                updated.push(HostTensor::f32(params[0][node][i].shape.clone(), self.anchor[node][i].clone()));
            }
            for copy in &mut self.copies {
                copy.set_params(node, &updated)?;
            }
        }
        Ok(())
    }

    /// Forward-only loss and accuracy of a batch (every copy holds the same parameters after a
    /// round; copy 0's are evaluated).
    pub fn evaluate(&self, features: &HostTensor, labels: &[i32]) -> Result<BatchResult, String> {
        self.copies.first().ok_or("no pipelines")?.evaluate(features, labels)
    }

    /// Parameters of every node of pipeline 0, by VNode id.
    pub fn params(&self) -> Result<Vec<Vec<HostTensor>>, String> {
        Ok(self.copies.first().ok_or("no pipelines")?.params())
    }
}

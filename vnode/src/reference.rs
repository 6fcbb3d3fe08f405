//! The single-process reference: the same graph trained with ordinary whole-graph autodiff,
//! no VNodes and no messages. The mesh must reproduce its parameters bit for bit in
//! synchronous mode; keeping both on the kernels of [`crate::layer`] is what makes that hold.

use crate::host::HostTensor;
use crate::layer;
use crate::optim::Optimizer;
use burn::tensor::{Device, Tensor};
use dcnr_model::graph::{Source, ValidGraph};
use dcnr_model::{NodeKind, OptimizerSpec};

/// Whole-graph trainer over a validated graph.
pub struct Reference {
    graph: ValidGraph,
    device: Device,
    params: Vec<Vec<Tensor<2>>>,
    optimizers: Vec<Optimizer>,
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
        let device = crate::device();
        let params: Vec<Vec<Tensor<2>>> = graph
            .nodes
            .iter()
            .map(|n| layer::params_to_device(&layer::init_params(n.kind, root_seed, n.id), &device))
            .collect();
        let optimizers = params.iter().map(|p| Optimizer::new(optimizer, p.len())).collect();
        Reference { graph: graph.clone(), device, params, optimizers }
    }

    fn run(
        &self,
        params: &[Vec<Tensor<2>>],
        features: &HostTensor,
        labels: &[i32],
        device: &Device,
    ) -> Result<(Tensor<1>, Tensor<2>), String> {
        let x = features.to_burn(device).ok_or("features must be f32 [batch, width]")?;
        let mut values: Vec<Option<Tensor<2>>> = vec![None; self.graph.nodes.len()];
        for &id in &self.graph.topo {
            let node = &self.graph.nodes[id as usize];
            let value_of = |s: &Source| match s {
                Source::Node(p) => values[*p as usize].clone(),
                Source::Features => Some(x.clone()),
                Source::Labels => None,
            };
            if let NodeKind::SoftmaxCrossEntropy { classes } = node.kind {
                let logits = value_of(&node.inputs[0]).ok_or("loss input missing")?;
                let target = HostTensor::f32(vec![labels.len(), classes], layer::one_hot(labels, classes));
                let target = target.to_burn(device).ok_or("one-hot")?;
                return Ok((layer::loss(logits.clone(), target), logits));
            }
            let ins: Vec<Tensor<2>> = node.inputs.iter().map(value_of).collect::<Option<_>>().ok_or("input missing")?;
            values[id as usize] = Some(layer::forward(node.kind, &params[id as usize], &ins));
        }
        Err("graph has no loss".into())
    }

    /// One synchronous SGD step on a batch.
    pub fn train_step(&mut self, features: &HostTensor, labels: &[i32]) -> Result<BatchResult, String> {
        let ad = self.device.clone().autodiff();
        let leaves: Vec<Vec<Tensor<2>>> =
            self.params.iter().map(|ps| ps.iter().map(|p| p.clone().autodiff().require_grad()).collect()).collect();
        let (loss, logits) = self.run(&leaves, features, labels, &ad)?;
        let value = loss.clone().into_data().try_to_vec::<f32>().map_err(|e| format!("{e:?}"))?;
        let logits = HostTensor::from_burn(logits.inner())?;
        let grads = loss.backward();
        for (i, ps) in leaves.iter().enumerate() {
            if ps.is_empty() {
                continue;
            }
            let gs: Vec<Tensor<2>> =
                ps.iter().map(|p| p.grad(&grads)).collect::<Option<_>>().ok_or("missing gradient")?;
            self.params[i] = self.optimizers[i].update(&self.params[i], gs);
        }
        let classes = self.graph.spec.data.classes;
        Ok(BatchResult {
            loss: value.first().copied().unwrap_or(f32::NAN),
            correct: layer::correct(logits.as_f32().unwrap_or(&[]), labels, classes),
        })
    }

    /// Forward-only loss and accuracy of a batch with the current parameters.
    pub fn evaluate(&self, features: &HostTensor, labels: &[i32]) -> Result<BatchResult, String> {
        let (loss, logits) = self.run(&self.params, features, labels, &self.device)?;
        let value = loss.into_data().try_to_vec::<f32>().map_err(|e| format!("{e:?}"))?;
        let logits = HostTensor::from_burn(logits)?;
        Ok(BatchResult {
            loss: value.first().copied().unwrap_or(f32::NAN),
            correct: layer::correct(logits.as_f32().unwrap_or(&[]), labels, self.graph.spec.data.classes),
        })
    }

    /// Parameters of every node, by VNode id, in canonical order.
    pub fn params(&self) -> Result<Vec<Vec<HostTensor>>, String> {
        self.params.iter().map(|ps| ps.iter().map(|p| HostTensor::from_burn(p.clone())).collect()).collect()
    }
}

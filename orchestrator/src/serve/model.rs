//! A trained model as serving takes it from the store: the job's recorded graph, made a plain
//! single forward chain, and the parameters of its `params.safetensors` artifact, checked
//! against it. The mesh serves it and `predict --local` runs it in one process, from the same
//! values.

use crate::artifacts::{ObjectStore, find_record};
use crate::export::PARAMS_ARTIFACT;
use dcnr_model::{TrainingMode, ValidGraph};
use dcnr_vnode::reference::Reference;
use dcnr_vnode::{HostData, HostTensor, VNode, VNodeSpec};
use safetensors::SafeTensors;

/// Why a job's model cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// No such job, or the store failed.
    #[error("{0}")]
    Store(#[from] crate::artifacts::StoreError),
    /// The job has no trained parameters (it failed, or its write list left them out).
    #[error("job {job} {status}: it has no trained parameters to serve")]
    NoParams { job: String, status: String },
    /// The recorded artifacts do not make a model.
    #[error("job {job}: {detail}")]
    Invalid { job: String, detail: String },
}

/// A trained model: the serving graph and every node's parameters.
#[derive(Debug, Clone)]
pub struct Model {
    /// The job it was trained by.
    pub job_id: String,
    /// The recorded graph with one pipeline, in exact mode (no auxiliary heads).
    pub graph: ValidGraph,
    /// Per VNode, its parameter tensors in canonical order, row-major.
    pub params: Vec<Vec<Vec<f32>>>,
    /// Hex SHA-256 of the stored parameters artifact.
    pub params_sha256: String,
    /// The job's root seed (VNode specs need one; nothing random runs forward only).
    pub root_seed: u64,
}

impl Model {
    /// Loads the model of the job `key` names (job id, record hash or result hash).
    pub async fn load(store: &dyn ObjectStore, key: &str) -> Result<Model, ModelError> {
        let (_, record) = find_record(store, key).await?;
        let job = record.job_id.clone();
        let invalid = |detail: String| ModelError::Invalid { job: job.clone(), detail };
        let Some(params_hash) = record.artifacts.get(PARAMS_ARTIFACT) else {
            return Err(ModelError::NoParams { job: job.clone(), status: record.status.clone() });
        };
        let Some(envelope_hash) = record.artifacts.get("envelope.json") else {
            return Err(invalid("its record has no envelope".into()));
        };
        let bytes = store.get(params_hash).await?;
        let envelope: dcnr_model::envelope::Envelope = serde_json::from_slice(&store.get(envelope_hash).await?)
            .map_err(|e| invalid(format!("the recorded envelope does not parse: {e}")))?;
        let resolved = envelope.resolve().map_err(|e| invalid(format!("the recorded envelope: {e}")))?;
        let mut spec = resolved.graph.spec.clone();
        spec.training.mode = TrainingMode::Exact;
        spec.training.pipelines = 1;
        let graph = spec.validate().map_err(|e| invalid(format!("the recorded graph: {e}")))?;
        let parsed = SafeTensors::deserialize(&bytes).map_err(|e| invalid(format!("the stored parameters: {e}")))?;
        let params = graph
            .nodes
            .iter()
            .map(|node| {
                dcnr_vnode::layer::param_layout(node)
                    .into_iter()
                    .map(|(name, shape)| {
                        let t = parsed.tensor(&name).map_err(|_| invalid(format!("the parameters lack {name}")))?;
                        if t.dtype() != safetensors::Dtype::F32 || t.shape() != shape.as_slice() {
                            return Err(invalid(format!(
                                "{name} is {:?} {:?}, not F32 {shape:?}",
                                t.dtype(),
                                t.shape()
                            )));
                        }
                        let values: Vec<f32> =
                            t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                        if values.iter().any(|v| !v.is_finite()) {
                            return Err(invalid(format!("{name} holds a value that is not finite")));
                        }
                        Ok(values)
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Model { job_id: job, graph, params, params_sha256: params_hash.clone(), root_seed: resolved.root_seed })
    }

    /// The spec of VNode `i` of the serving graph.
    pub fn spec(&self, node: &dcnr_model::graph::ValidNode) -> VNodeSpec {
        VNodeSpec {
            node: node.clone(),
            optimizer: self.graph.spec.optimizer,
            recipe: self.graph.spec.training.recipe(),
            root_seed: self.root_seed,
            in_flight: 1,
            averaging: None,
            compute: Default::default(),
        }
    }

    /// Every VNode's state holding its trained parameters, by VNode id: what an allocation
    /// restores.
    pub fn states(&self) -> Result<Vec<(u32, Vec<u8>)>, ModelError> {
        self.graph
            .nodes
            .iter()
            .zip(&self.params)
            .map(|(node, params)| {
                let invalid =
                    |e: dcnr_vnode::VNodeError| ModelError::Invalid { job: self.job_id.clone(), detail: e.to_string() };
                let vnode = VNode::with_params(self.spec(node), params.clone()).map_err(invalid)?;
                Ok((node.id, vnode.snapshot().map_err(invalid)?))
            })
            .collect()
    }

    /// The single-process forward of this model: the reference trainer holding its parameters.
    pub fn reference(&self) -> Result<Reference, ModelError> {
        let mut r = Reference::new(&self.graph, self.graph.spec.optimizer, self.root_seed);
        for (node, params) in self.graph.nodes.iter().zip(&self.params) {
            let shapes = dcnr_vnode::layer::init_node(node, self.root_seed);
            let tensors: Vec<HostTensor> =
                shapes.into_iter().zip(params).map(|((shape, _), v)| HostTensor::f32(shape, v.clone())).collect();
            r.set_params(node.id as usize, &tensors)
                .map_err(|detail| ModelError::Invalid { job: self.job_id.clone(), detail })?;
        }
        Ok(r)
    }

    /// Checks inference inputs against the graph: `[rows, feature_size]`, u8 pixels or finite
    /// f32 within the VNodes' magnitude bound, 1 row at least.
    pub fn check_inputs(&self, inputs: &HostTensor) -> Result<(), String> {
        let width = self.graph.spec.data.feature_size;
        if inputs.shape.len() != 2 || inputs.shape[1] != width || inputs.shape[0] == 0 || !inputs.is_consistent() {
            return Err(format!("inputs must be [rows >= 1, {width}], got {:?}", inputs.shape));
        }
        match &inputs.data {
            HostData::U8(_) => Ok(()),
            HostData::F32(v) if v.iter().all(|x| x.is_finite() && x.abs() <= dcnr_vnode::sanity::MAX_ABS) => Ok(()),
            HostData::F32(_) => Err(format!("f32 inputs must be finite and within ±{}", dcnr_vnode::sanity::MAX_ABS)),
            _ => Err("inputs must be u8 pixels or f32 features".into()),
        }
    }

    /// The f32 features the VNodes compute from `inputs` (u8 pixels normalised as in training).
    pub fn features(&self, inputs: &HostTensor) -> HostTensor {
        match &inputs.data {
            HostData::U8(pixels) => {
                let n = self.graph.spec.data.normalize;
                let table = dcnr_model::dataset::normalize_table(n.mean, n.std);
                HostTensor::f32(inputs.shape.clone(), pixels.iter().map(|&p| table[usize::from(p)]).collect())
            }
            _ => inputs.clone(),
        }
    }

    /// Most rows in one micro-batch: the graph's evaluation batch size (what PNodes budget memory for).
    pub fn max_rows(&self) -> usize {
        self.graph.spec.training.eval_batch_size.max(1)
    }

    /// Classes the model predicts.
    pub fn classes(&self) -> usize {
        self.graph.spec.data.classes
    }
}

/// The most probable class of each row of `probabilities` `[rows, classes]` (the lowest index on a tie).
pub fn classes_of(probabilities: &[f32], classes: usize) -> Vec<u32> {
    probabilities.chunks_exact(classes.max(1)).map(|row| dcnr_vnode::layer::argmax(row) as u32).collect()
}

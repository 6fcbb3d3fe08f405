//! The summary of a finished job: the JSON object every CLI command prints.

use dcnr_model::ValidGraph;
use serde::{Deserialize, Serialize};

/// Per-VNode part of a summary.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VNodeSummary {
    /// VNode id.
    pub id: u32,
    /// Node name from the graph.
    pub name: String,
    /// Node kind.
    pub kind: String,
    /// PNode that hosted it (`local` for train-local).
    pub pnode: String,
    /// SHA-256 of its parameters (canonical order, little-endian f32).
    pub params_sha256: String,
}

/// The JSON summary of a job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobSummary {
    /// Job id.
    pub job_id: String,
    /// `succeeded` or `failed`.
    pub status: String,
    /// Model name.
    pub model: String,
    /// Training steps completed.
    pub steps: u64,
    /// Final test-set accuracy in [0, 1].
    pub test_accuracy: Option<f64>,
    /// Final mean test-set loss.
    pub test_loss: Option<f64>,
    /// Mean training loss over the last logged interval.
    pub train_loss: Option<f64>,
    /// Wall time of the whole job in seconds.
    pub wall_s: f64,
    /// Training samples per second (training time only).
    pub samples_per_s: f64,
    /// PNodes that hosted VNodes (0 for train-local).
    pub pnodes: usize,
    /// Micro-batches in flight.
    pub in_flight: u32,
    /// Samples per step.
    pub batch_size: usize,
    /// SHA-256 over all parameters, VNode id order, little-endian f32.
    pub params_sha256: Option<String>,
    /// Per-VNode placement and parameter hashes.
    pub vnodes: Vec<VNodeSummary>,
    /// Why the job failed.
    pub error: Option<String>,
    /// Relocations after failures or drains, in order.
    #[serde(default)]
    pub recoveries: Vec<Recovery>,
    /// Data-parallel pipelines (copies of the graph).
    #[serde(default = "one")]
    pub pipelines: u32,
    /// Averaging rounds of the pipelines.
    #[serde(default)]
    pub rounds: u64,
}

fn one() -> u32 {
    1
}

/// One recovery: a move to a new placement generation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Recovery {
    /// Generation it moved to.
    pub generation: u32,
    /// What happened.
    pub reason: String,
    /// PNodes it stopped using.
    pub pnodes: Vec<String>,
    /// Steps completed when it began.
    pub at_step: u64,
    /// Step training continued from.
    pub resumed_step: u64,
    /// Steps computed again because of it.
    pub recomputed_steps: u64,
    /// Seconds from its start until the VNodes were placed again.
    pub replace_s: f64,
    /// Seconds from its start until the next training step completed.
    pub first_step_s: Option<f64>,
}

/// Per-VNode summaries in id order; `pnode_of` names where each VNode ran.
pub fn vnode_summaries(graph: &ValidGraph, hashes: &[String], pnode_of: impl Fn(u32) -> String) -> Vec<VNodeSummary> {
    graph
        .nodes
        .iter()
        .map(|n| VNodeSummary {
            id: n.id,
            name: n.name.clone(),
            kind: n.kind.name().into(),
            pnode: pnode_of(n.id),
            params_sha256: hashes.get(n.id as usize).cloned().unwrap_or_default(),
        })
        .collect()
}

/// Hashes of a job's parameters: the whole (VNode id order) and per VNode.
pub fn params_hashes(params: &[Vec<Vec<f32>>]) -> (String, Vec<String>) {
    let all = dcnr_vnode::sha256_f32(params.iter().flatten().map(Vec::as_slice));
    let each = params.iter().map(|p| hex::encode(dcnr_vnode::sha256_f32(p.iter().map(Vec::as_slice)))).collect();
    (hex::encode(all), each)
}

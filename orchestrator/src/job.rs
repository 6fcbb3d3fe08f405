//! One job: its VNodes placed on PNodes, micro-batches fed `in_flight` at a time, the test set
//! evaluated at every epoch end, the parameters collected and the summary written.
//!
//! The job is split in two. [`core::JobCore`] decides everything and does no IO: it takes
//! [`core::Input`]s (a VNode's report, a timer tick with the time as a value, a registry view,
//! the answer of an RPC) and hands back [`core::Effect`]s (feed these micro-batches, allocate,
//! fetch states, probe, start a replica, write the record). [`actor::JobActor`] only carries the
//! effects out over the network and feeds their results back, and the simulator (`sim`) drives
//! the same core with a simulated clock and network. The pure policies the core is built from
//! have modules of their own: the feed window and drained points (`schedule`), rollback and probe
//! verdicts (`recovery`), redundant execution (`segments`), the cheap checks (`screen`) and the
//! record (`record`). Only `pnodes` names tonic.
//!
//! Update order: every VNode applies the update of micro-batch j as its (j+1)-th update and runs
//! the forward of micro-batch m on parameter version max(0, m - in_flight + 1) (see
//! `dcnr_vnode::VNode`); the job only decides *when* micro-batches enter, never what they compute,
//! so results do not depend on message timing or placement.
//!
//! Recovery: every placement has a generation, stamped on every message and report. When a
//! PNode is lost, misses a step deadline or fails an RPC, the job moves to the next generation:
//! it re-places all VNodes on the PNodes left, restores them from the latest complete snapshot
//! (kept in memory; the store has the same bytes) and feeds again from that snapshot's step.
//! Anything of an older generation still in flight is dropped by the PNodes and ignored here.
//! Because a snapshot is exact and the data order is a function of the step, a run with
//! failures ends with the same parameters as one without. A drain (a PNode leaving) takes a
//! fresh snapshot at a drained point first, so it moves work without recomputing any.

use crate::checkpoints::ResumeFrom;
use dcnr_model::ValidGraph;
use dcnr_model::envelope::Envelope;
use dcnr_vnode::Phase;
use std::collections::BTreeSet;
use std::time::Duration;

pub mod actor;
pub mod core;
pub mod pnodes;
pub mod record;
pub mod recovery;
pub mod schedule;
pub mod screen;
pub mod segments;

pub use actor::{JobActor, JobServices};
pub use pnodes::pnode_client;
pub use segments::{ReplicaDone, Share};

/// Everything fixed about a job at submission.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// Job id.
    pub job_id: String,
    /// The validated graph (with overrides applied).
    pub graph: ValidGraph,
    /// Training steps (micro-batches) to run.
    pub steps: u64,
    /// Micro-batches in flight.
    pub in_flight: u32,
    /// Root of every random stream.
    pub root_seed: u64,
    /// Most PNodes to spread over.
    pub max_pnodes: usize,
    /// A placement that completes no step for this long has failed (its VNodes are relocated).
    pub step_deadline: Duration,
    /// Take an in-memory recovery snapshot at least this often (zero: only with checkpoints).
    pub recovery_every: Duration,
    /// How long to wait for enough PNodes to place on.
    pub placement_timeout: Duration,
    /// Healthy PNodes required before placing.
    pub min_pnodes: usize,
    /// Fail the job when it runs longer than this.
    pub timeout: Duration,
    /// The resolved envelope, recorded with the artifacts.
    pub envelope: Envelope,
    /// Whether a store keeps this job's checkpoints and artifacts.
    pub persist: bool,
    /// The snapshot a resumed job starts from.
    pub resume: Option<ResumeFrom>,
    /// A user's job, or a replica re-executing a segment of one.
    pub kind: JobKind,
    /// The placement generation the job starts at. PNodes refuse an allocation older than the
    /// one they hold and drop messages of another generation, so a job resumed by a restarted
    /// orchestrator must start above every generation its earlier run used:
    /// [`first_generation_now`] for jobs the job table starts.
    pub first_generation: u32,
}

/// A first generation that grows with the wall clock: tenths of a second since 2026-01-01, so a
/// job started (or resumed after a restart) later starts above the generations of an earlier
/// run, which moves to a new generation at most once per placement round trip (well over a
/// tenth of a second). It wraps in 2039; it is never below 1.
pub fn first_generation_now() -> u32 {
    const SINCE: u64 = 1_767_225_600; // 2026-01-01T00:00:00Z
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let tenths = now.as_millis().saturating_sub(u128::from(SINCE) * 1000) / 100;
    u32::try_from(tenths % u128::from(u32::MAX)).unwrap_or(0).max(1)
}

/// What a job runs for.
#[derive(Debug, Clone)]
pub enum JobKind {
    /// A submitted job: its results are the job's.
    Primary,
    /// Re-executes steps `resume.step..steps` of another job so they can be compared; it keeps
    /// nothing, evaluates nothing, and answers its parent with what it computed.
    Replica(ReplicaOf),
}

/// Which segment a replica job re-executes, and what it must stay away from.
#[derive(Debug, Clone)]
pub struct ReplicaOf {
    /// The job whose segment it re-executes.
    pub parent: String,
    /// Which segment.
    pub segment: u64,
    /// "replica N".
    pub label: String,
    /// PNodes it must not run on.
    pub exclude: BTreeSet<String>,
    /// How many of the suitable PNodes it may take, leaving room for the segment's other
    /// replicas.
    pub share: Share,
    /// The determinism class its PNodes must have: the one the job's execution ran in, since
    /// honest executions agree bit for bit only within a class.
    pub class: Option<String>,
}

/// What a VNode observed about one micro-batch, as reported over its PNode's report stream.
#[derive(Debug, Clone)]
pub struct Observation {
    /// Job id.
    pub job_id: String,
    /// Reporting VNode.
    pub vnode: u32,
    /// Micro-batch.
    pub mb: u64,
    /// PNode it ran on.
    pub pnode: String,
    /// Placement generation of the VNode.
    pub generation: u32,
    /// What happened.
    pub body: Observed,
}

/// What a VNode observed.
#[derive(Debug, Clone)]
pub enum Observed {
    /// A training micro-batch completed at this VNode.
    Done {
        /// Wall time of its compute.
        compute_us: u64,
        /// CPU time of its compute.
        cpu_us: u64,
        /// Tensor bytes in.
        bytes_in: u64,
        /// Tensor bytes out.
        bytes_out: u64,
        /// Hex SHA-256 of its output.
        output_sha256: String,
        /// When the step closed an averaging round: hex SHA-256 of the parameters it gave.
        round_sha256: Option<String>,
        /// Sealed jobs: the activations and gradients it consumed, with their seals.
        inputs: Vec<crate::verify::StepInput>,
    },
    /// Loss VNode result.
    Loss {
        /// Train or eval.
        phase: Phase,
        /// Mean loss.
        loss: f32,
        /// Correct predictions.
        correct: u32,
        /// Samples.
        count: u32,
    },
    /// A served model's class probabilities for one inference micro-batch, f32 [rows, classes].
    Predictions(dcnr_vnode::HostTensor),
    /// The VNode failed.
    Failure(String),
    /// The VNode refused a tensor that failed the cheap checks.
    Rejected {
        /// The VNode that produced it (`None`: the job's data).
        from_vnode: Option<u32>,
        /// Why, naming the sender.
        reason: String,
    },
}

impl actix::Message for Observation {
    type Result = ();
}

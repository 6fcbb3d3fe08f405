//! Plain job status and event types, shared by the job actors, the service adapter and the CLI.

use crate::summary::JobSummary;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for placement.
    Pending,
    /// Training or evaluating.
    Running,
    /// Finished with a result.
    Succeeded,
    /// Stopped by an error.
    Failed,
    /// Moving VNodes after a failure or a drain, or waiting for capacity to do so.
    Recovering,
}

impl JobState {
    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed)
    }
}

/// A job as `orchestrator jobs` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JobStatus {
    /// Job id.
    pub job_id: String,
    /// State.
    pub state: JobState,
    /// Model name.
    pub model: String,
    /// Steps completed.
    pub steps_done: u64,
    /// Steps planned.
    pub steps_total: u64,
    /// Recent mean training loss.
    pub last_loss: Option<f32>,
    /// Recent training throughput.
    pub samples_per_s: f64,
    /// Why it failed.
    pub error: Option<String>,
    /// Final summary once ended.
    pub summary: Option<JobSummary>,
    /// Relocations so far.
    pub recoveries: Vec<crate::summary::Recovery>,
    /// Data-parallel pipelines.
    pub pipelines: u32,
    /// Averaging rounds closed so far.
    pub rounds: u64,
    /// The PNodes hosting each pipeline's VNodes, by pipeline (empty until placed).
    pub members: Vec<Vec<String>>,
    /// Placement generation now (0 before the first placement).
    #[serde(default)]
    pub generation: u32,
}

/// Something that happened to a job, pushed to watchers.
#[derive(Debug, Clone)]
pub enum JobEvent {
    /// Periodic training progress.
    Progress {
        /// Steps completed.
        step: u64,
        /// Steps planned.
        steps_total: u64,
        /// Recent mean loss.
        loss: f32,
        /// Recent samples per second.
        samples_per_s: f64,
        /// Current epoch (0-based).
        epoch: u32,
    },
    /// A test-set evaluation finished.
    Evaluation {
        /// Epochs completed when it ran.
        epoch: u32,
        /// Training steps completed when it ran.
        step: u64,
        /// Accuracy in [0, 1].
        accuracy: f64,
        /// Mean loss.
        loss: f64,
    },
    /// A human-readable note (placement, phase changes).
    Log(String),
    /// The job ended.
    Finished(Box<JobStatus>),
}

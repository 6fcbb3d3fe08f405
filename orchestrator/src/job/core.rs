//! The job's decision logic as a state machine that does no IO (raft-rs style): the owner feeds
//! it [`Input`]s with the time as a value and carries out the [`Effect`]s it hands back. No
//! network, actor, runtime, clock or store is named here, so the same core runs under the job
//! actor and under the simulator, and every path through it can be driven in a test.
//!
//! Stages: Placing -> Training <-> {Checkpointing, Evaluating} -> [Verifying] -> Collecting ->
//! Ended, with Recovering reachable from every running stage and leaving when the new placement
//! lands. While the core waits for the answer of a blocking exchange (a placement, a snapshot,
//! the final parameters), every other input is held and replayed once it arrives, so no decision
//! ever sees a half-finished exchange.

use super::record::{self, EvalPoint, Execution, Files, Metrics};
use super::recovery::{self, ProbeVerdict};
use super::schedule::{CheckpointPolicy, Next, Position};
use super::segments::{ReplicaDone, Replication, RollbackTo};
use super::{JobKind, JobSpec, Observation, Observed};
use crate::artifacts::JobRecord;
use crate::checkpoints::{self, ResumeFrom};
use crate::events::{NewEvent, Severity};
use crate::placement::{self, Eligibility, Offer};
use crate::registry::PNodeView;
use crate::status::{JobEvent, JobState, JobStatus};
use crate::summary::{JobSummary, Recovery, params_hashes, vnode_summaries};
use crate::trust::Transition;
use crate::verify::StepInput;
use dcnr_model::envelope::ArtifactKind;
use dcnr_model::graph::Source;
use dcnr_vnode::Phase;
use dcnr_vnode::batches::BatchPlan;
use dcnr_vnode::rounds::RoundPlan;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

/// Most eval micro-batches in the mesh at once.
const EVAL_WINDOW: usize = 4;

/// Shortest silence that makes a job probe its PNodes.
pub const MIN_IDLE: Duration = Duration::from_secs(2);

/// Every VNode's state bytes, by VNode id.
pub type States = Vec<(u32, Vec<u8>)>;

/// Every VNode's parameters (VNode id order), each a list of tensors.
pub type Params = Vec<Vec<Vec<f32>>>;

/// Something that happened, for the core to act on.
#[derive(Debug)]
pub enum Input {
    /// The job starts (place it).
    Start,
    /// The timer (every 100 ms).
    Tick,
    /// The registry's PNodes, as asked for while the job was at `generation`.
    View {
        /// Every PNode with its health now.
        view: Vec<PNodeView>,
        /// The generation the job was at when it asked.
        generation: u32,
    },
    /// A VNode's report.
    Observation(Observation),
    /// A PNode is leaving: move its VNodes at the next drained point.
    Evacuate(String),
    /// The old VNodes were released; placement may start.
    Released {
        /// The generation the release was for.
        generation: u32,
    },
    /// Every allocation of a placement answered.
    Allocated {
        /// The generation allocated.
        generation: u32,
        /// The first PNode that refused or failed, with why.
        result: Result<(), PNodeFailure>,
    },
    /// A micro-batch could not be handed to a PNode's link.
    FeedFailed {
        /// The generation fed.
        generation: u32,
        /// What failed.
        failure: PNodeFailure,
    },
    /// The states of every (drained) VNode.
    StatesFetched {
        /// The generation asked.
        generation: u32,
        /// The states, or the first PNode that failed.
        result: Result<States, PNodeFailure>,
    },
    /// The final parameters of every VNode.
    ParamsFetched {
        /// The generation asked.
        generation: u32,
        /// The parameters, or why not.
        result: Result<Params, CollectError>,
    },
    /// The PNodes' answers to a probe: busy VNodes, or why it did not answer.
    ProbeAnswered {
        /// The generation probed.
        generation: u32,
        /// (pnode, busy VNodes or error) for every PNode of the job.
        answers: Vec<(String, Result<Vec<u32>, String>)>,
    },
    /// A replica of one of this job's segments answered.
    ReplicaDone(Box<ReplicaDone>),
    /// A strike was recorded in the registry.
    StrikeRecorded {
        /// The PNode struck.
        pnode: String,
        /// Steps completed when it was struck.
        at_step: u64,
        /// What it changed.
        transition: Transition,
    },
    /// A replica is no longer needed (its segment was rolled back or its job ended).
    Cancel,
}

/// A PNode that failed an exchange, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PNodeFailure {
    /// PNode id.
    pub pnode: String,
    /// What went wrong.
    pub why: String,
}

/// Why the final parameters could not be collected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CollectError {
    /// A PNode did not answer (a recovery repairs this).
    Unreachable(PNodeFailure),
    /// A PNode answered with something that is not parameters.
    Invalid(String),
}

/// Where one VNode runs, for an exchange with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VNodeAt {
    /// VNode id.
    pub vnode: u32,
    /// PNode id.
    pub pnode: String,
    /// The PNode's endpoint.
    pub endpoint: String,
}

/// One VNode input fed from the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedTarget {
    /// Where the VNode runs.
    pub at: VNodeAt,
    /// Its input port.
    pub port: u32,
    /// Whether the port reads labels (else features).
    pub labels: bool,
}

/// The VNodes one PNode is to host, with the state each starts from (empty: fresh).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// PNode id.
    pub pnode: String,
    /// Its endpoint.
    pub endpoint: String,
    /// (vnode, state bytes).
    pub vnodes: Vec<(u32, Vec<u8>)>,
    /// Its VNodes compute on its GPU.
    pub on_gpu: bool,
}

/// Something for the owner to do.
#[derive(Debug)]
pub enum Effect {
    /// Ask the registry for every PNode and answer with [`Input::View`].
    ListPNodes {
        /// The job's generation now.
        generation: u32,
    },
    /// Stop the job's VNodes at these endpoints, briefly and best effort; answer with
    /// [`Input::Released`].
    Release {
        /// Endpoints.
        endpoints: BTreeSet<String>,
        /// The generation waiting for it.
        generation: u32,
    },
    /// Allocate VNodes of `generation` on PNodes, all at once; answer with [`Input::Allocated`].
    Allocate {
        /// The placement generation.
        generation: u32,
        /// One per PNode.
        allocations: Vec<Allocation>,
    },
    /// Tell the job table where the VNodes now run.
    Placed {
        /// (vnode, endpoint).
        locations: Vec<(u32, String)>,
    },
    /// Ask the PNodes of the VNodes that read data to feed one micro-batch from the dataset they
    /// hold; a failure answers [`Input::FeedFailed`].
    Feed {
        /// The placement generation.
        generation: u32,
        /// Micro-batch number.
        mb: u64,
        /// Train or eval.
        phase: Phase,
        /// The training step (the batch plan's samples), or the evaluation batch (test samples
        /// `batch * eval_batch_size ..`).
        batch: u64,
        /// Where the data goes.
        targets: Vec<FeedTarget>,
    },
    /// Close every data link (their VNodes are gone).
    DropLinks,
    /// Fetch the state of every VNode; answer with [`Input::StatesFetched`].
    FetchStates {
        /// The placement generation.
        generation: u32,
        /// Where each VNode runs.
        targets: Vec<VNodeAt>,
    },
    /// Fetch every VNode's parameters; answer with [`Input::ParamsFetched`].
    FetchParams {
        /// The placement generation.
        generation: u32,
        /// Where each VNode runs (VNode id order).
        targets: Vec<VNodeAt>,
    },
    /// Ask every PNode of the job whether it answers and which VNodes are busy; answer with
    /// [`Input::ProbeAnswered`].
    Probe {
        /// The placement generation.
        generation: u32,
        /// (pnode, endpoint).
        pnodes: Vec<(String, String)>,
    },
    /// Declare a PNode lost in the registry.
    MarkLost(String),
    /// Record a valid result for a PNode.
    Credit(String),
    /// Record an invalid result for a PNode; answer with [`Input::StrikeRecorded`].
    Strike {
        /// PNode id.
        pnode: String,
        /// Why.
        reason: String,
        /// Steps completed now.
        at_step: u64,
    },
    /// Write a checkpoint to the store, beside training.
    Checkpoint(checkpoints::Checkpoint),
    /// Start a replica job (its spec names the segment and the parent).
    StartReplica(Box<JobSpec>),
    /// Stop a replica job.
    CancelReplica(String),
    /// A replica's answer, for its parent.
    AnswerParent(ReplicaDone),
    /// A line for people (logged and sent to watchers).
    Log(String),
    /// The job failed (logged as an error).
    Failed {
        /// Machine-readable class.
        code: &'static str,
        /// Why.
        why: String,
    },
    /// An event for the mesh's event log.
    Event(NewEvent),
    /// An event for the job's watchers.
    Watchers(JobEvent),
    /// The job's status changed.
    Status(JobStatus),
    /// The job ended: wait for checkpoint uploads, write the record (if any), clear the job's
    /// active mark, release its VNodes, then announce `status` and stop.
    Finish {
        /// The final status (with the summary).
        status: JobStatus,
        /// The record and its artifact files, for a job that keeps them.
        record: Option<(JobRecord, Files)>,
        /// Endpoints to release.
        release: BTreeSet<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Placing,
    Recovering,
    Training,
    Checkpointing,
    Evaluating,
    /// Training is over; waiting for the last segments' replicas before collecting.
    Verifying,
    Collecting,
    Ended,
}

/// A blocking exchange under way: inputs other than its answer are held until it lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Awaiting {
    /// The old VNodes are being released before a placement.
    Release,
    /// Waiting for PNodes to place on (registry views until the deadline).
    Placement,
    /// The allocations of a placement.
    Allocation,
    /// A snapshot of every VNode.
    States(StatesFor),
    /// The final parameters.
    Params,
    /// The answers to the strikes the record must name, before the job ends.
    Strikes,
}

/// Why a snapshot of every VNode is fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StatesFor {
    Snapshot { persist: bool },
    AnswerParent,
}

struct Eval {
    /// Evaluation batches in the test set.
    batches: u64,
    next: u64,
    outstanding: usize,
    correct: u64,
    count: u64,
    loss_sum: f64,
}

/// What the next placement must respect.
#[derive(Debug, Clone)]
struct PlacementRequest {
    deadline: Duration,
    min_pnodes: usize,
    started: Duration,
}

/// A rollback decided while handling an input, carried out once that input is handled (so
/// every verdict of one answer is in before anything moves).
struct Rewind {
    to: Option<RollbackTo>,
    why: String,
    bad: Vec<String>,
}

/// The sizes of the data sets the job reads.
#[derive(Debug, Clone, Copy)]
pub struct DataSizes {
    /// Training samples.
    pub train: usize,
    /// Test samples.
    pub test: usize,
}

/// One job's decision logic.
pub struct JobCore {
    pub(super) spec: JobSpec,
    pub(super) plan: BatchPlan,
    /// When the pipelines average (with one pipeline, never).
    rounds: RoundPlan,
    /// Round hashes reported so far, by (node in pipeline 0, step), by pipeline: a round is
    /// checked once every copy has reported it.
    round_hashes: BTreeMap<(u32, u64), BTreeMap<u32, String>>,
    train_len: usize,
    test_len: usize,
    stage: Stage,
    awaiting: Option<Awaiting>,
    held: VecDeque<Input>,
    request: Option<PlacementRequest>,
    /// The placement being allocated.
    allocating: BTreeMap<u32, PNodeView>,
    pub(super) placement: BTreeMap<u32, PNodeView>,
    feeders: Vec<(u32, u32, Source)>,
    fed: u64,
    pub(super) completed: u64,
    /// VNodes that reported each unfinished micro-batch done.
    done: BTreeMap<u64, BTreeSet<u32>>,
    finished_mbs: BTreeSet<u64>,
    epochs_evaluated: u64,
    eval: Option<Eval>,
    eval_seq: u64,
    loss_window: (f64, u32),
    last_loss: Option<f32>,
    test: Option<(f64, f64)>,
    started: Duration,
    now: Duration,
    train_time: Duration,
    train_mark: Option<Duration>,
    last_activity: Duration,
    rate_mark: (Duration, u64),
    samples_per_s: f64,
    error: Option<String>,
    error_code: Option<&'static str>,
    pub(super) executions: BTreeMap<u32, Execution>,
    /// Sealed jobs: what each VNode consumed at each step not yet in a segment's digest, by
    /// (step, VNode), in route order.
    pub(super) step_inputs: BTreeMap<(u64, u32), Vec<StepInput>>,
    metrics: Metrics,
    /// Step of the last persisted checkpoint (or resumed from).
    last_checkpoint: Option<u64>,
    last_checkpoint_at: Duration,
    /// Current placement generation.
    generation: u32,
    /// Latest complete snapshot, where a recovery rolls back to (none: the job's start).
    pub(super) rollback_point: Option<ResumeFrom>,
    /// When the last snapshot (checkpoint or recovery) was taken.
    last_snapshot_at: Duration,
    /// Step this run started from (0, or a resumed snapshot's step).
    pub(super) first_step: u64,
    /// PNodes this job no longer uses (they failed it).
    pub(super) excluded: BTreeSet<String>,
    /// PNodes leaving, whose VNodes are moved at the next drained point.
    evacuating: BTreeSet<String>,
    /// Pipelines share PNodes while PNodes that joined stand idle: spread them at the next
    /// drained point (the result does not depend on placement, so only throughput changes).
    spread: bool,
    /// Every recovery so far, for the record.
    recoveries: Vec<Recovery>,
    /// When the latest recovery began, until training completes its first step after it.
    recovery_started: Option<Duration>,
    /// Reports of older generations (or repeats) that were ignored.
    stale_reports: u64,
    /// Step-deadline probe in flight.
    probing: bool,
    /// Timer ticks so far.
    ticks: u64,
    /// Smoothed seconds between completed steps.
    step_interval: Option<f64>,
    /// When the last step completed.
    last_step_at: Duration,
    /// No probe before this.
    next_probe: Duration,
    /// What was checked and found, for `verification.json`.
    pub(super) verification: crate::verify::VerificationRecord,
    /// Redundant execution of this job's segments (primary jobs with a verify policy).
    pub(super) replication: Replication,
    /// A rollback decided while a placement was under way, applied when it lands.
    pending_rollback: Option<(RollbackTo, String)>,
    rewinds: VecDeque<Rewind>,
    /// Checkpoints of a verified job held back until every segment before them is accepted: a
    /// checkpoint in the store is where a restarted orchestrator resumes, with no memory of
    /// what was still unverified.
    unverified_checkpoints: VecDeque<checkpoints::Checkpoint>,
    /// Strikes sent and not yet answered; the record waits for them.
    strikes_pending: usize,
    /// The job ended while strikes were pending: finish once they land.
    finish_pending: Option<Option<Params>>,
    out: Vec<Effect>,
}

impl JobCore {
    /// A core for `spec` reading data sets of `sizes`, at time `now`.
    pub fn new(spec: JobSpec, sizes: DataSizes, now: Duration) -> JobCore {
        let plan = BatchPlan::new(sizes.train, spec.graph.spec.training.batch_size, spec.root_seed)
            .sharded(spec.graph.pipelines());
        let rounds = RoundPlan::new(&spec.graph, sizes.train);
        let feeders = spec
            .graph
            .nodes
            .iter()
            .flat_map(|n| {
                n.inputs
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| !matches!(s, Source::Node(_)))
                    .map(move |(p, s)| (n.id, p as u32, s.clone()))
            })
            .collect();
        let mut core = JobCore {
            plan,
            rounds,
            round_hashes: BTreeMap::new(),
            train_len: sizes.train,
            test_len: sizes.test,
            stage: Stage::Placing,
            awaiting: None,
            held: VecDeque::new(),
            request: None,
            allocating: BTreeMap::new(),
            placement: BTreeMap::new(),
            feeders,
            fed: 0,
            completed: 0,
            done: BTreeMap::new(),
            finished_mbs: BTreeSet::new(),
            epochs_evaluated: 0,
            eval: None,
            eval_seq: 0,
            loss_window: (0.0, 0),
            last_loss: None,
            test: None,
            started: now,
            now,
            train_time: Duration::ZERO,
            train_mark: None,
            last_activity: now,
            rate_mark: (now, 0),
            samples_per_s: 0.0,
            error: None,
            error_code: None,
            executions: BTreeMap::new(),
            step_inputs: BTreeMap::new(),
            metrics: Metrics::default(),
            last_checkpoint: None,
            last_checkpoint_at: now,
            generation: spec.first_generation.max(1),
            rollback_point: None,
            last_snapshot_at: now,
            first_step: 0,
            excluded: BTreeSet::new(),
            evacuating: BTreeSet::new(),
            spread: false,
            recoveries: Vec::new(),
            recovery_started: None,
            stale_reports: 0,
            probing: false,
            ticks: 0,
            step_interval: None,
            last_step_at: now,
            next_probe: now,
            verification: crate::verify::VerificationRecord::new(
                &spec.job_id,
                &crate::verify::Settings::from_policy(&spec.envelope.policy),
            ),
            replication: Replication::new(&spec),
            pending_rollback: None,
            rewinds: VecDeque::new(),
            unverified_checkpoints: VecDeque::new(),
            strikes_pending: 0,
            finish_pending: None,
            out: Vec::new(),
            spec,
        };
        if let Some(r) = &core.spec.resume {
            core.fed = r.step;
            core.completed = r.step;
            core.epochs_evaluated = r.epochs_evaluated;
            core.last_checkpoint = Some(r.step);
            core.first_step = r.step;
        }
        if let JobKind::Replica(of) = &core.spec.kind {
            core.excluded = of.exclude.clone();
        }
        core.rollback_point = core.spec.resume.clone();
        core
    }

    /// Samples in the training split.
    pub fn train_samples(&self) -> usize {
        self.train_len
    }

    /// Training samples one step consumes: a micro-batch per pipeline.
    fn samples_per_step(&self) -> f64 {
        self.spec.graph.spec.training.batch_size as f64 * f64::from(self.spec.graph.pipelines())
    }

    /// Averaging rounds closed so far.
    pub fn rounds(&self) -> u64 {
        self.rounds.rounds_through(self.completed)
    }

    /// The job's spec.
    pub fn spec(&self) -> &JobSpec {
        &self.spec
    }

    /// The current placement generation.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Whether the job has ended.
    pub fn ended(&self) -> bool {
        self.stage == Stage::Ended
    }

    /// Steps completed.
    pub fn completed(&self) -> u64 {
        self.completed
    }

    /// Where every VNode runs now.
    pub fn placement(&self) -> &BTreeMap<u32, PNodeView> {
        &self.placement
    }

    /// Takes the effects decided so far.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.out)
    }

    /// Handles one input at time `now`.
    pub fn step(&mut self, input: Input, now: Duration) {
        self.now = self.now.max(now);
        if self.stage == Stage::Ended {
            return;
        }
        if let Some(a) = self.awaiting
            && !self.answers(a, &input)
        {
            match input {
                // A blocked job does not tick (as a job waiting on an exchange does nothing
                // else), except to look again for PNodes to place on.
                Input::Tick if a == Awaiting::Placement => {
                    self.emit(Effect::ListPNodes { generation: self.generation })
                }
                Input::Tick => {}
                other => self.held.push_back(other),
            }
            return;
        }
        self.handle(input);
        self.settle_rewinds();
        while self.awaiting.is_none() && self.stage != Stage::Ended {
            let Some(next) = self.held.pop_front() else { break };
            self.handle(next);
            self.settle_rewinds();
        }
        self.write_verified_checkpoints();
    }

    /// Writes the held-back checkpoints whose every segment has been accepted.
    fn write_verified_checkpoints(&mut self) {
        // A rollback decided but not yet applied may still discard them.
        if self.pending_rollback.is_some() || matches!(self.stage, Stage::Placing | Stage::Recovering) {
            return;
        }
        while let Some(c) = self.unverified_checkpoints.front() {
            if self.replication.unsettled_through(c.step) {
                return;
            }
            if let Some(c) = self.unverified_checkpoints.pop_front() {
                self.emit(Effect::Checkpoint(c));
            }
        }
    }

    fn answers(&self, a: Awaiting, input: &Input) -> bool {
        match (a, input) {
            (Awaiting::Release, Input::Released { generation }) => *generation == self.generation,
            (Awaiting::Placement, Input::View { .. }) => true,
            (Awaiting::Allocation, Input::Allocated { generation, .. }) => *generation == self.generation,
            (Awaiting::States(_), Input::StatesFetched { generation, .. }) => *generation == self.generation,
            (Awaiting::Params, Input::ParamsFetched { generation, .. }) => *generation == self.generation,
            // Strikes are answered whatever the job waits for: the record waits on them.
            (_, Input::StrikeRecorded { .. }) => true,
            _ => false,
        }
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Start => self.start(),
            Input::Tick => self.tick(),
            Input::View { view, generation } => self.on_view(view, generation),
            Input::Observation(o) => self.on_observation(o),
            Input::Evacuate(pnode) => self.on_evacuate(pnode),
            // Answers count only while the core waits for them (never replayed late).
            Input::Released { .. } if self.awaiting == Some(Awaiting::Release) => self.begin_placement_wait(),
            Input::Allocated { result, .. } if self.awaiting == Some(Awaiting::Allocation) => self.on_allocated(result),
            Input::ParamsFetched { result, .. } if self.awaiting == Some(Awaiting::Params) => self.on_params(result),
            Input::Released { .. } | Input::Allocated { .. } | Input::ParamsFetched { .. } => {}
            Input::FeedFailed { generation, failure } => {
                if generation == self.generation && matches!(self.stage, Stage::Training | Stage::Evaluating) {
                    self.recover(format!("feeding failed: {}", failure.why), vec![failure.pnode]);
                }
            }
            Input::StatesFetched { result, .. } => self.on_states(result),
            Input::ProbeAnswered { generation, answers } => self.on_probe(generation, answers),
            Input::ReplicaDone(done) => {
                self.replica_done(*done);
                // A settled segment may free a job waiting at a boundary for its replicas.
                if self.stage == Stage::Training {
                    self.pump();
                }
            }
            Input::StrikeRecorded { pnode, at_step, transition } => self.on_strike_recorded(pnode, at_step, transition),
            Input::Cancel => {
                if matches!(self.spec.kind, JobKind::Replica(_)) {
                    self.log("cancelled: its segment is no longer needed".into());
                    self.finish(None);
                }
            }
        }
    }

    pub(super) fn emit(&mut self, e: Effect) {
        self.out.push(e);
    }

    pub(super) fn log(&mut self, text: String) {
        self.emit(Effect::Log(text));
    }

    fn start(&mut self) {
        self.push_status();
        self.request = Some(self.placement_request(self.now + self.spec.placement_timeout, self.spec.min_pnodes));
        self.begin_placement_wait();
    }

    fn begin_placement_wait(&mut self) {
        self.awaiting = Some(Awaiting::Placement);
        if let Some(r) = &mut self.request {
            r.started = self.now;
        }
        self.emit(Effect::ListPNodes { generation: self.generation });
    }

    fn placement_request(&self, deadline: Duration, min_pnodes: usize) -> PlacementRequest {
        PlacementRequest { deadline, min_pnodes, started: self.now }
    }

    /// Which PNodes this job's next placement may use, given the PNodes in `view`.
    fn eligibility(&self, view: &[PNodeView]) -> Eligibility {
        let (class, avoid_hosts) = match &self.spec.kind {
            // A replica keeps off the machines of the PNodes it avoids: one machine, one vote.
            JobKind::Replica(of) => (
                of.class.clone(),
                view.iter()
                    .filter(|p| self.excluded.contains(&p.id))
                    .filter_map(|p| crate::verify::host_of(&p.endpoint))
                    .collect(),
            ),
            JobKind::Primary => (None, BTreeSet::new()),
        };
        Eligibility { target: self.spec.envelope.policy.target, class, exclude: self.excluded.clone(), avoid_hosts }
    }

    fn on_view(&mut self, view: Vec<PNodeView>, generation: u32) {
        if self.awaiting == Some(Awaiting::Placement) {
            return self.try_place(view);
        }
        self.check_placed(view, generation);
    }

    /// One attempt to place every VNode on the PNodes in `view`; waits for more (until the
    /// deadline) when they are too few or too small.
    fn try_place(&mut self, view: Vec<PNodeView>) {
        let Some(req) = self.request.clone() else { return };
        let rules = self.eligibility(&view);
        // Replicas of this job's segments need PNodes of their own: the share counts them all.
        let all_suitable = view.iter().filter(|p| placement::suitable(p, &rules)).count();
        let healthy: Vec<PNodeView> = view.into_iter().filter(|p| placement::eligible(p, &rules)).collect();
        let offers: Vec<Offer> = healthy.iter().map(|p| Offer::of(p, rules.target)).collect();
        // Too few PNodes, or too little memory on them, is waited out: capacity may come back.
        let why = if healthy.is_empty() || healthy.len() < req.min_pnodes {
            format!(
                "{} suitable healthy pnode(s) (target {:?}); the job needs at least {}",
                healthy.len(),
                rules.target,
                req.min_pnodes.max(1)
            )
        } else {
            let most = self.spec.max_pnodes.min(self.replication.share().of(all_suitable));
            let demands = placement::demands(&self.spec.graph, self.spec.root_seed, self.spec.in_flight);
            match placement::place(&demands, &offers, most) {
                Ok(assignment) => return self.allocate(&healthy, assignment),
                Err(e) => e.to_string(),
            }
        };
        if self.now > req.deadline {
            let waited = self.now.saturating_sub(req.started);
            self.awaiting = None;
            self.placement_failed(format!("{why} (waited {waited:?})"));
        }
    }

    fn allocate(&mut self, healthy: &[PNodeView], assignment: Vec<(u32, String)>) {
        let by_id: BTreeMap<&str, &PNodeView> = healthy.iter().map(|p| (p.id.as_str(), p)).collect();
        let mut groups: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for (v, p) in &assignment {
            groups.entry(p.clone()).or_default().push(*v);
        }
        let target = self.spec.envelope.policy.target;
        let allocations = groups
            .into_iter()
            .map(|(pnode, vnodes)| Allocation {
                endpoint: by_id.get(pnode.as_str()).map(|p| p.endpoint.clone()).unwrap_or_default(),
                on_gpu: by_id.get(pnode.as_str()).is_some_and(|p| p.caps.computes_on_gpu(target)),
                pnode,
                vnodes: vnodes
                    .into_iter()
                    .map(|v| {
                        let state =
                            self.spec.resume.as_ref().and_then(|r| r.states.get(&v).cloned()).unwrap_or_default();
                        (v, state)
                    })
                    .collect(),
            })
            .collect();
        self.allocating = assignment
            .into_iter()
            .filter_map(|(v, p)| by_id.get(p.as_str()).map(|view| (v, (*view).clone())))
            .collect();
        self.awaiting = Some(Awaiting::Allocation);
        self.emit(Effect::Allocate { generation: self.generation, allocations });
    }

    fn placement_failed(&mut self, why: String) {
        if self.stage == Stage::Recovering {
            return self.fail("no_capacity", format!("recovery could not place the job: {why}"));
        }
        self.fail("placement", why)
    }

    fn on_allocated(&mut self, result: Result<(), PNodeFailure>) {
        self.awaiting = None;
        let placement = std::mem::take(&mut self.allocating);
        if let Err(f) = result {
            // An allocation that failed (a PNode died while being given work) is one more
            // failure; `recover` starts from a placed job, this one was being placed.
            self.stage = Stage::Training;
            return self.recover(format!("allocation failed: {}", f.why), vec![f.pnode]);
        }
        self.on_placed(placement);
    }

    fn on_placed(&mut self, placement: BTreeMap<u32, PNodeView>) {
        if let Some((to, why)) = self.pending_rollback.take() {
            // Placed from a snapshot that verification has since rejected: go back further.
            self.placement = placement;
            self.stage = Stage::Training;
            return self.rewind(Some(to), why, Vec::new());
        }
        let names = self.spec.graph.names();
        let text: Vec<String> = placement
            .iter()
            .map(|(v, p)| format!("{}->{}", names.get(v).map(String::as_str).unwrap_or("?"), p.id))
            .collect();
        self.log(format!("placed {} VNodes (generation {}): {}", placement.len(), self.generation, text.join(", ")));
        if let (Some(since), Some(r)) = (self.recovery_started, self.recoveries.last_mut()) {
            r.replace_s = self.now.saturating_sub(since).as_secs_f64();
        }
        self.emit(Effect::Placed { locations: placement.iter().map(|(v, p)| (*v, p.endpoint.clone())).collect() });
        for (v, p) in &placement {
            let e = self.executions.entry(*v).or_insert_with(|| Execution {
                vnode: *v,
                name: names.get(v).cloned().unwrap_or_default(),
                ..Execution::default()
            });
            e.pnode = p.id.clone();
            e.endpoint = p.endpoint.clone();
            e.determinism_class = p.caps.class_for(self.spec.envelope.policy.target).to_string();
            // A placement from a rolled-back step replaces the ones after it: the list says
            // where each step that counts ran.
            let from = self.completed;
            e.placements.retain(|(first, _)| *first < from);
            e.placements.push((from, p.id.clone()));
            self.replication.placed.insert(p.id.clone(), p.clone());
        }
        self.placement = placement;
        self.stage = Stage::Training;
        self.train_mark = Some(self.now);
        self.rate_mark = (self.now, self.completed);
        self.last_activity = self.now;
        self.last_step_at = self.now;
        self.push_status();
        self.pump();
    }

    /// Step of the latest snapshot (or the run's first step).
    pub(super) fn recovery_step(&self) -> u64 {
        self.rollback_point.as_ref().map(|r| r.step).unwrap_or(self.first_step)
    }

    /// Whether this job's VNodes seal what they send and report what they consume: every
    /// execution whose results are compared (a verified job and its replicas).
    pub fn seals_messages(&self) -> bool {
        self.replication.segment_steps().is_some() || matches!(self.spec.kind, JobKind::Replica(_))
    }

    /// Whether a PNode this job is placed on is leaving.
    fn leaving(&self) -> bool {
        self.placement.values().any(|p| self.evacuating.contains(&p.id))
    }

    /// Whether an in-memory recovery snapshot is due (a drained point is then reached first).
    fn recovery_snapshot_due(&self) -> bool {
        if let Some(n) = self.replication.segment_steps() {
            // Verified jobs snapshot at segment boundaries: each segment is what a replica redoes.
            let c = self.completed;
            return c > self.recovery_step() && (c.is_multiple_of(n) || c >= self.spec.steps);
        }
        let every = self.spec.recovery_every;
        !every.is_zero()
            && self.now.saturating_sub(self.last_snapshot_at) >= every
            && self.completed > self.recovery_step()
    }

    /// Whether the job stands at a segment boundary until its replicas catch up: its PNodes are
    /// idle on purpose, not stalled.
    fn waiting_for_replicas(&self) -> bool {
        self.stage == Stage::Training && self.position().waiting_for_replicas()
    }

    fn position(&self) -> Position {
        let c = &self.spec.envelope.checkpoint;
        Position {
            completed: self.completed,
            fed: self.fed,
            steps: self.spec.steps,
            steps_per_epoch: self.plan.steps_per_epoch(),
            epochs_evaluated: self.epochs_evaluated,
            in_flight: u64::from(self.spec.in_flight),
            checkpoints: (c.enabled() && self.spec.persist)
                .then(|| CheckpointPolicy { every_steps: c.every_steps, every: c.every_s.map(Duration::from_secs) }),
            last_checkpoint: self.last_checkpoint,
            since_checkpoint: self.now.saturating_sub(self.last_checkpoint_at),
            segment_steps: self.replication.segment_steps(),
            recovery_step: self.recovery_step(),
            replicas_backlogged: self.replication.backlogged(),
            snapshot_wanted: self.leaving() || self.recovery_snapshot_due() || self.spread,
            replica: matches!(self.spec.kind, JobKind::Replica(_)),
        }
    }

    /// The data inputs to feed: every pipeline's for training; for evaluation pipeline 0's (all
    /// copies hold the same parameters after a round, and an epoch's end closes one).
    fn feed_targets(&self, phase: Phase) -> Vec<FeedTarget> {
        let first_pipeline = |v: u32| self.spec.graph.nodes.get(v as usize).is_some_and(|n| n.pipeline == 0);
        self.feeders
            .iter()
            .filter(|(vnode, _, _)| phase == Phase::Train || first_pipeline(*vnode))
            .map(|(vnode, port, src)| FeedTarget {
                at: self.vnode_at(*vnode),
                port: *port,
                labels: *src == Source::Labels,
            })
            .collect()
    }

    fn vnode_at(&self, vnode: u32) -> VNodeAt {
        let (pnode, endpoint) =
            self.placement.get(&vnode).map(|p| (p.id.clone(), p.endpoint.clone())).unwrap_or_default();
        VNodeAt { vnode, pnode, endpoint }
    }

    fn placed_vnodes(&self) -> Vec<VNodeAt> {
        self.placement.keys().map(|v| self.vnode_at(*v)).collect()
    }

    /// Feeds what the window allows and acts at drained points.
    pub(super) fn pump(&mut self) {
        loop {
            match self.stage {
                Stage::Training => {
                    let pos = self.position();
                    let to = pos.feed_to();
                    if self.fed < to {
                        let targets = self.feed_targets(Phase::Train);
                        while self.fed < to {
                            let mb = self.fed;
                            self.emit(Effect::Feed {
                                generation: self.generation,
                                mb,
                                phase: Phase::Train,
                                batch: mb,
                                targets: targets.clone(),
                            });
                            self.fed += 1;
                        }
                    }
                    match self.position().next() {
                        Next::Wait => return,
                        Next::Snapshot { persist } => return self.take_snapshot(persist),
                        Next::AnswerParent => return self.answer_parent(),
                        Next::Continue => continue,
                        Next::SkipEvaluation => {
                            // A replica evaluates nothing: the job's own evaluation is the record.
                            self.epochs_evaluated += 1;
                            continue;
                        }
                        Next::Evaluate => {
                            if let Some(m) = self.train_mark.take() {
                                self.train_time += self.now.saturating_sub(m);
                            }
                            let test = self.test_len;
                            let eb = self.spec.graph.spec.training.eval_batch_size.max(1);
                            self.eval = Some(Eval {
                                batches: test.div_ceil(eb) as u64,
                                next: 0,
                                outstanding: 0,
                                correct: 0,
                                count: 0,
                                loss_sum: 0.0,
                            });
                            self.stage = Stage::Evaluating;
                        }
                    }
                }
                Stage::Evaluating => {
                    let Some(mut ev) = self.eval.take() else { return };
                    let targets = self.feed_targets(Phase::Eval);
                    while ev.outstanding < EVAL_WINDOW && ev.next < ev.batches {
                        let mb = self.eval_seq;
                        self.eval_seq += 1;
                        self.emit(Effect::Feed {
                            generation: self.generation,
                            mb,
                            phase: Phase::Eval,
                            batch: ev.next,
                            targets: targets.clone(),
                        });
                        ev.next += 1;
                        ev.outstanding += 1;
                    }
                    if ev.outstanding > 0 || ev.next < ev.batches {
                        self.eval = Some(ev);
                        return;
                    }
                    let acc = ev.correct as f64 / ev.count.max(1) as f64;
                    let loss = ev.loss_sum / ev.count.max(1) as f64;
                    self.test = Some((acc, loss));
                    self.epochs_evaluated += 1;
                    self.metrics.evaluations.push(EvalPoint {
                        epoch: self.epochs_evaluated,
                        step: self.completed,
                        accuracy: acc,
                        loss,
                    });
                    self.emit(Effect::Watchers(JobEvent::Evaluation {
                        epoch: self.epochs_evaluated as u32,
                        step: self.completed,
                        accuracy: acc,
                        loss,
                    }));
                    self.log(format!(
                        "evaluation after {} steps: test accuracy {:.2}%, test loss {:.4}",
                        self.completed,
                        acc * 100.0,
                        loss
                    ));
                    if self.completed >= self.spec.steps {
                        return self.training_done();
                    }
                    self.stage = Stage::Training;
                    self.train_mark = Some(self.now);
                }
                _ => return,
            }
        }
    }

    /// Takes a snapshot of every (drained) VNode: kept in memory for recovery, written as a
    /// checkpoint when `persist`, then training goes on (on new PNodes if some are leaving).
    fn take_snapshot(&mut self, persist: bool) {
        self.stage = Stage::Checkpointing;
        self.fetch_states(StatesFor::Snapshot { persist });
    }

    pub(super) fn fetch_states(&mut self, purpose: StatesFor) {
        self.awaiting = Some(Awaiting::States(purpose));
        self.emit(Effect::FetchStates { generation: self.generation, targets: self.placed_vnodes() });
    }

    fn on_states(&mut self, result: Result<States, PNodeFailure>) {
        let Some(Awaiting::States(purpose)) = self.awaiting.take() else { return };
        let states = match result {
            Ok(s) => s,
            Err(f) => return self.recover(format!("snapshot failed: {}", f.why), vec![f.pnode]),
        };
        match purpose {
            StatesFor::AnswerParent => self.answer_parent_with(states),
            StatesFor::Snapshot { persist } => self.snapshot_taken(states, persist),
        }
    }

    fn snapshot_taken(&mut self, states: States, persist: bool) {
        let step = self.completed;
        self.last_snapshot_at = self.now;
        let snapshot =
            ResumeFrom { step, epochs_evaluated: self.epochs_evaluated, states: states.iter().cloned().collect() };
        let previous = self.rollback_point.replace(snapshot);
        self.close_segment(previous);
        if persist {
            self.last_checkpoint = Some(step);
            self.last_checkpoint_at = self.now;
            if self.spec.persist {
                let checkpoint = checkpoints::Checkpoint {
                    job: self.spec.job_id.clone(),
                    step,
                    epochs_evaluated: self.epochs_evaluated,
                    envelope_json: serde_json::to_vec(&self.spec.envelope).unwrap_or_default(),
                    states,
                    keep: self.spec.envelope.checkpoint.keep,
                };
                if self.replication.segment_steps().is_some() {
                    self.unverified_checkpoints.push_back(checkpoint);
                } else {
                    self.emit(Effect::Checkpoint(checkpoint));
                }
            }
        }
        self.after_snapshot();
    }

    fn after_snapshot(&mut self) {
        if self.leaving() {
            let leaving: Vec<String> = self.evacuating.iter().cloned().collect();
            return self.recover(format!("moving VNodes off leaving pnode(s) {}", leaving.join(", ")), leaving);
        }
        if std::mem::take(&mut self.spread) {
            return self.recover("spreading the pipelines over pnodes that joined".into(), Vec::new());
        }
        self.stage = Stage::Training;
        self.pump();
    }

    /// Moves the job to a new generation: drops PNodes `bad`, rolls back to the latest complete
    /// snapshot, and places every VNode again on the PNodes left (waiting for capacity up to the
    /// job's timeout).
    pub(super) fn recover(&mut self, reason: String, bad: Vec<String>) {
        if matches!(self.stage, Stage::Ended | Stage::Recovering | Stage::Placing) || self.error.is_some() {
            self.excluded.extend(bad);
            return;
        }
        if let Some(m) = self.train_mark.take() {
            self.train_time += self.now.saturating_sub(m);
        }
        let at_step = self.completed;
        let to = self.rollback_point.clone();
        let resumed_step = to.as_ref().map(|r| r.step).unwrap_or(self.first_step);
        self.generation += 1;
        self.stage = Stage::Recovering;
        self.excluded.extend(bad.iter().cloned());
        for p in &bad {
            self.evacuating.remove(p);
        }
        self.recovery_started = Some(self.now);
        let entry = record::recovery(self.generation, reason.clone(), bad, at_step, resumed_step);
        let text = format!(
            "recovering (generation {}): {reason}; rolling back from step {at_step} to {resumed_step}",
            self.generation
        );
        self.log(text.clone());
        let kind = if entry.recomputed_steps == 0 { "relocation" } else { "recovery" };
        self.emit(Effect::Event(
            NewEvent::new(kind, text).severity(Severity::Warning).job(&self.spec.job_id).data(serde_json::json!(entry)),
        ));
        self.recoveries.push(entry);
        // Everything past the snapshot is forgotten and computed again, identically.
        self.unverified_checkpoints.retain(|c| c.step <= resumed_step);
        for id in self.replication.forget_after(resumed_step) {
            self.emit(Effect::CancelReplica(id));
        }
        self.completed = resumed_step;
        self.fed = resumed_step;
        self.epochs_evaluated = to.as_ref().map(|r| r.epochs_evaluated).unwrap_or(self.epochs_evaluated_at_start());
        self.done.clear();
        self.finished_mbs.clear();
        self.round_hashes.clear();
        self.eval = None;
        self.loss_window = (0.0, 0);
        self.emit(Effect::DropLinks);
        self.test = self.metrics.roll_back(resumed_step, self.epochs_evaluated);
        record::truncate_executions(&mut self.executions, (resumed_step - self.first_step) as usize);
        self.step_inputs.split_off(&(resumed_step, 0));
        let old: BTreeSet<String> =
            self.placement.values().filter(|p| !self.excluded.contains(&p.id)).map(|p| p.endpoint.clone()).collect();
        self.spec.resume = to;
        self.request = Some(self.placement_request(self.started + self.spec.timeout, 1));
        self.push_status();
        // PNodes that keep nothing of the job stop its old VNodes now; the others have them
        // replaced by the allocation of the new generation.
        self.awaiting = Some(Awaiting::Release);
        self.emit(Effect::Release { endpoints: old, generation: self.generation });
    }

    fn epochs_evaluated_at_start(&self) -> u64 {
        self.spec.resume.as_ref().map(|r| r.epochs_evaluated).unwrap_or(0)
    }

    fn status(&self) -> JobStatus {
        let state = match self.stage {
            Stage::Placing => JobState::Pending,
            Stage::Recovering => JobState::Recovering,
            Stage::Ended if self.error.is_some() => JobState::Failed,
            Stage::Ended => JobState::Succeeded,
            _ => JobState::Running,
        };
        JobStatus {
            job_id: self.spec.job_id.clone(),
            state,
            model: self.spec.graph.spec.model.name.clone(),
            steps_done: self.completed,
            steps_total: self.spec.steps,
            last_loss: self.last_loss,
            samples_per_s: self.samples_per_s,
            error: self.error.clone(),
            summary: None,
            recoveries: self.recoveries.clone(),
            pipelines: self.spec.graph.pipelines(),
            rounds: self.rounds(),
            members: self.members(),
            generation: self.generation,
        }
    }

    /// The PNodes hosting each pipeline's VNodes, by pipeline.
    fn members(&self) -> Vec<Vec<String>> {
        let mut by: Vec<BTreeSet<String>> = vec![BTreeSet::new(); self.spec.graph.pipelines() as usize];
        for (vnode, p) in &self.placement {
            let pipeline = self.spec.graph.nodes.get(*vnode as usize).map_or(0, |n| n.pipeline as usize);
            if let Some(set) = by.get_mut(pipeline) {
                set.insert(p.id.clone());
            }
        }
        by.into_iter().map(|s| s.into_iter().collect()).collect()
    }

    pub(super) fn push_status(&mut self) {
        let s = self.status();
        self.emit(Effect::Status(s));
    }

    pub(super) fn fail(&mut self, code: &'static str, why: String) {
        if self.stage == Stage::Ended || self.error.is_some() {
            return;
        }
        self.emit(Effect::Failed { code, why: why.clone() });
        self.tell_parent(Err(format!("{code}: {why}")));
        self.error = Some(why);
        self.error_code = Some(code);
        self.finish(None);
    }

    fn on_evacuate(&mut self, pnode: String) {
        let hosts = self.placement.values().any(|p| p.id == pnode);
        if hosts && self.evacuating.insert(pnode.clone()) {
            self.log(format!("pnode {pnode} is leaving; moving its VNodes at the next drained step"));
            self.pump();
        }
    }

    fn on_observation(&mut self, r: Observation) {
        if r.generation != self.generation || self.stage == Stage::Recovering {
            // From before a relocation: that work was rolled back and is being done again.
            self.stale_reports += 1;
            return;
        }
        if self.placement.get(&r.vnode).is_none_or(|p| p.id != r.pnode) {
            // Not where this placement put that VNode: a PNode still running the work of an
            // orchestrator that restarted (its generations start again), or a confused one.
            self.stale_reports += 1;
            return;
        }
        self.last_activity = self.now;
        if !self.screen_report(&r) {
            return;
        }
        match r.body {
            Observed::Done { compute_us, cpu_us, bytes_in, bytes_out, output_sha256, round_sha256, mut inputs } => {
                if r.mb < self.completed
                    || self.finished_mbs.contains(&r.mb)
                    || self.done.get(&r.mb).is_some_and(|d| d.contains(&r.vnode))
                {
                    // A repeat of a report already counted: counting it twice would skip a step.
                    self.stale_reports += 1;
                    return;
                }
                if let Some(e) = self.executions.get_mut(&r.vnode) {
                    e.steps += 1;
                    e.compute_s += compute_us as f64 / 1e6;
                    e.cpu_s += cpu_us as f64 / 1e6;
                    e.bytes_in += bytes_in;
                    e.bytes_out += bytes_out;
                    // Done reports of one VNode arrive in step order (one stream, in-order updates).
                    e.output_sha256.push(output_sha256);
                }
                if self.seals_messages() && !inputs.is_empty() {
                    inputs.sort_by_key(|i| i.route);
                    self.step_inputs.insert((r.mb, r.vnode), inputs);
                }
                if let Some(hash) = round_sha256
                    && !self.check_round(r.vnode, r.mb, hash)
                {
                    return;
                }
                let n = self.spec.graph.nodes.len();
                let by = self.done.entry(r.mb).or_default();
                by.insert(r.vnode);
                if by.len() == n {
                    self.done.remove(&r.mb);
                    self.finished_mbs.insert(r.mb);
                    while self.finished_mbs.remove(&self.completed) {
                        self.completed += 1;
                        let dt = self.now.saturating_sub(self.last_step_at).as_secs_f64();
                        self.last_step_at = self.now;
                        self.step_interval = Some(self.step_interval.map_or(dt, |s| 0.9 * s + 0.1 * dt));
                    }
                    if let Some(since) = self.recovery_started.take()
                        && let Some(rec) = self.recoveries.last_mut()
                    {
                        rec.first_step_s = Some(self.now.saturating_sub(since).as_secs_f64());
                    }
                }
            }
            Observed::Loss { phase: Phase::Train, loss, .. } => {
                self.metrics.train_loss.push((r.mb, loss));
                self.loss_window.0 += f64::from(loss);
                self.loss_window.1 += 1;
            }
            Observed::Loss { phase: Phase::Eval, loss, correct, count } => {
                if let Some(ev) = self.eval.as_mut() {
                    ev.outstanding = ev.outstanding.saturating_sub(1);
                    ev.correct += u64::from(correct);
                    ev.count += u64::from(count);
                    ev.loss_sum += f64::from(loss) * f64::from(count);
                }
            }
            Observed::Failure(msg) => {
                let name = self.spec.graph.names().get(&r.vnode).cloned().unwrap_or_default();
                return self.fail("vnode_failure", format!("vnode {} ({name}) on {} failed: {msg}", r.vnode, r.pnode));
            }
            // Refused in `screen_report`.
            Observed::Rejected { .. } => return,
            // Only a served model answers these; a training job never asks.
            Observed::Predictions(_) | Observed::Loss { phase: Phase::Infer, .. } => {
                self.stale_reports += 1;
                return;
            }
        }
        self.pump();
    }

    fn tick(&mut self) {
        self.ticks += 1;
        if self.ticks.is_multiple_of(3) {
            self.report_progress();
        }
        if self.now.saturating_sub(self.started) > self.spec.timeout {
            let why = format!(
                "the job exceeded its timeout of {:?} ({} of {} steps done)",
                self.spec.timeout, self.completed, self.spec.steps
            );
            return self.fail("timeout", why);
        }
        if matches!(self.stage, Stage::Placing | Stage::Recovering | Stage::Verifying) {
            return;
        }
        if self.waiting_for_replicas() {
            self.last_activity = self.now;
        }
        if self.now.saturating_sub(self.last_activity) > self.idle_limit()
            && !self.probing
            && self.now >= self.next_probe
        {
            self.probe();
        }
        self.emit(Effect::ListPNodes { generation: self.generation });
    }

    /// A registry view asked for at `generation`: PNodes of the placement that are lost make the
    /// job recover; ones that are leaving are evacuated at the next drained point.
    fn check_placed(&mut self, view: Vec<PNodeView>, generation: u32) {
        if generation != self.generation || matches!(self.stage, Stage::Placing | Stage::Recovering) {
            return;
        }
        let placed: BTreeSet<String> = self.placement.values().map(|p| p.id.clone()).collect();
        let (lost, leaving) = recovery::lost_and_leaving(&view, &placed);
        if !lost.is_empty() {
            let why = format!("pnode(s) {} lost (silent past the heartbeat timeout or unreachable)", lost.join(", "));
            return self.recover(why, lost);
        }
        let mut new = false;
        for p in &leaving {
            new |= self.evacuating.insert(p.clone());
        }
        if new {
            self.log(format!("pnode(s) {} leaving; moving their VNodes at the next drained step", leaving.join(", ")));
            self.pump();
        }
        if !self.spread && self.stage == Stage::Training && self.pipelines_would_spread(&view) {
            self.spread = true;
            self.log("pnodes joined while pipelines share pnodes; spreading them at the next drained step".into());
            self.pump();
        }
    }

    /// Whether some pipelines share a PNode while eligible PNodes this job does not use could
    /// take them (and the job may use more PNodes than it does).
    fn pipelines_would_spread(&self, view: &[PNodeView]) -> bool {
        if self.spec.graph.pipelines() < 2 || !matches!(self.spec.kind, JobKind::Primary) {
            return false;
        }
        let members = self.members();
        let shared =
            members.iter().enumerate().any(|(i, a)| members[i + 1..].iter().any(|b| a.iter().any(|p| b.contains(p))));
        if !shared {
            return false;
        }
        let used: BTreeSet<&str> = self.placement.values().map(|p| p.id.as_str()).collect();
        let req = self.eligibility(view);
        let eligible = view.iter().filter(|p| placement::eligible(p, &req)).count();
        let idle = view.iter().any(|p| placement::eligible(p, &req) && !used.contains(p.id.as_str()));
        idle && used.len() < eligible.min(self.spec.max_pnodes)
    }

    fn report_progress(&mut self) {
        let (mark, at) = self.rate_mark;
        let dt = self.now.saturating_sub(mark).as_secs_f64();
        if dt >= 1.0 && self.stage == Stage::Training {
            let batch = self.samples_per_step();
            self.samples_per_s = self.completed.saturating_sub(at) as f64 * batch / dt;
            self.rate_mark = (self.now, self.completed);
            let since = self.now.saturating_sub(self.started).as_secs_f64();
            self.metrics.samples_per_s.push((since, self.samples_per_s));
        }
        if self.loss_window.1 > 0 {
            self.last_loss = Some((self.loss_window.0 / self.loss_window.1 as f64) as f32);
            self.loss_window = (0.0, 0);
        }
        if self.stage == Stage::Training {
            self.emit(Effect::Watchers(JobEvent::Progress {
                step: self.completed,
                steps_total: self.spec.steps,
                loss: self.last_loss.unwrap_or(f32::NAN),
                samples_per_s: self.samples_per_s,
                epoch: self.plan.epoch_of(self.completed) as u32,
            }));
        }
        self.push_status();
    }

    /// Silence after which the job asks its PNodes what is going on: far longer than a step
    /// normally takes, and never longer than the step deadline.
    fn idle_limit(&self) -> Duration {
        recovery::idle_limit(self.step_interval, self.spec.step_deadline)
    }

    /// No progress for a while: asks every PNode of the job whether it answers and whether its
    /// VNodes do.
    fn probe(&mut self) {
        self.probing = true;
        self.next_probe = self.now + self.idle_limit();
        let pnodes: BTreeMap<String, String> =
            self.placement.values().map(|p| (p.id.clone(), p.endpoint.clone())).collect();
        self.emit(Effect::Probe { generation: self.generation, pnodes: pnodes.into_iter().collect() });
    }

    fn on_probe(&mut self, generation: u32, answers: Vec<(String, Result<Vec<u32>, String>)>) {
        self.probing = false;
        let silent = self.now.saturating_sub(self.last_activity);
        if generation != self.generation || silent <= self.idle_limit() {
            return;
        }
        match recovery::probe_verdict(&answers, silent > self.spec.step_deadline) {
            ProbeVerdict::Wait => {}
            ProbeVerdict::Recover { bad, unreachable, reason } => {
                for id in unreachable {
                    self.emit(Effect::MarkLost(id));
                }
                self.recover(format!("no progress for {:.1}s: {reason}", silent.as_secs_f64()), bad);
            }
        }
    }

    /// Training is over: collect, once every segment has been judged.
    pub(super) fn training_done(&mut self) {
        let pending = self.replication.pending();
        if pending > 0 {
            self.stage = Stage::Verifying;
            self.log(format!("training done; waiting for the replicas of {pending} segment(s)"));
            self.push_status();
            return;
        }
        self.stage = Stage::Collecting;
        self.collect();
    }

    /// Collects a job that finished training once its last segment has been judged.
    pub(super) fn collect_if_verified(&mut self) {
        if self.stage == Stage::Verifying && self.replication.pending() == 0 {
            self.stage = Stage::Collecting;
            self.collect();
        }
    }

    fn collect(&mut self) {
        match self.verified_params() {
            Some(Ok(params)) => return self.accept_params(params),
            Some(Err(e)) => return self.fail("collect", format!("the verified snapshot is unreadable: {e}")),
            None => {}
        }
        self.awaiting = Some(Awaiting::Params);
        self.emit(Effect::FetchParams { generation: self.generation, targets: self.placed_vnodes() });
    }

    fn on_params(&mut self, result: Result<Params, CollectError>) {
        self.awaiting = None;
        match result {
            Ok(params) => self.accept_params(params),
            Err(CollectError::Unreachable(f)) => self.recover(f.why, vec![f.pnode]),
            Err(CollectError::Invalid(why)) => self.fail("collect", why),
        }
    }

    fn on_strike_recorded(&mut self, pnode: String, at_step: u64, transition: Transition) {
        self.strikes_pending = self.strikes_pending.saturating_sub(1);
        if let Transition::Quarantined(why) = transition {
            let text = format!("pnode {pnode} quarantined: {why}");
            self.log(text.clone());
            self.emit(Effect::Event(
                NewEvent::new("pnode_quarantined", text)
                    .severity(Severity::Error)
                    .job(&self.spec.job_id)
                    .pnode(&pnode)
                    .data(serde_json::json!({ "at_step": at_step, "reason": why })),
            ));
            self.verification.quarantines.push(crate::verify::QuarantineEvent { pnode, at_step, reason: why });
        }
        if self.strikes_pending == 0
            && let Some(params) = self.finish_pending.take()
        {
            self.awaiting = None;
            self.finish(params);
        }
    }

    /// One invalid result for `pnode`: recorded in the registry (it may be quarantined).
    pub(super) fn strike(&mut self, pnode: String, reason: String) {
        self.strikes_pending += 1;
        self.emit(Effect::Strike { pnode, reason, at_step: self.completed });
    }

    /// A valid result for `pnode`.
    pub(super) fn credit(&mut self, pnode: String) {
        self.emit(Effect::Credit(pnode));
    }

    /// Rolls the job back to `to` and goes on without `bad`, once the input being handled has
    /// been handled whole.
    pub(super) fn roll_back(&mut self, to: Option<RollbackTo>, why: String, bad: Vec<String>) {
        self.rewinds.push_back(Rewind { to, why, bad });
    }

    fn settle_rewinds(&mut self) {
        while let Some(r) = self.rewinds.pop_front() {
            if self.stage == Stage::Ended {
                self.rewinds.clear();
                return;
            }
            self.rewind(r.to, r.why, r.bad);
        }
    }

    /// Recovers without `bad`, from `to` when that is earlier than the latest snapshot.
    fn rewind(&mut self, to: Option<RollbackTo>, why: String, bad: Vec<String>) {
        if let Some(to) = to {
            if matches!(self.stage, Stage::Placing | Stage::Recovering) {
                // A placement is under way from a later snapshot: go back once it lands.
                self.excluded.extend(bad);
                self.pending_rollback = Some((to, why));
                return;
            }
            if self.recovery_step() > to.0 {
                self.rollback_point = to.1;
            }
        }
        self.recover(why, bad);
    }

    fn summary(&self, params: Option<&[Vec<Vec<f32>>]>) -> JobSummary {
        let (all, each) = match params {
            Some(p) => {
                // Every copy holds the same parameters (checked in `accept_params`): the job's
                // are pipeline 0's, as `train-local` reports them.
                let (a, _) = params_hashes(&p[..self.spec.graph.pipeline_len().min(p.len())]);
                (Some(a), params_hashes(p).1)
            }
            None => (None, Vec::new()),
        };
        let running = self.train_mark.map(|m| self.now.saturating_sub(m)).unwrap_or_default();
        let train_s = (self.train_time + running).as_secs_f64();
        let batch = self.spec.graph.spec.training.batch_size;
        let samples = (self.completed as f64) * self.samples_per_step();
        let pnodes: BTreeSet<&str> = self.placement.values().map(|p| p.id.as_str()).collect();
        JobSummary {
            job_id: self.spec.job_id.clone(),
            status: if self.error.is_some() { "failed" } else { "succeeded" }.into(),
            model: self.spec.graph.spec.model.name.clone(),
            steps: self.completed,
            test_accuracy: self.test.map(|t| t.0),
            test_loss: self.test.map(|t| t.1),
            train_loss: self.last_loss.map(f64::from),
            wall_s: self.now.saturating_sub(self.started).as_secs_f64(),
            samples_per_s: if train_s > 0.0 { samples / train_s } else { 0.0 },
            pnodes: pnodes.len(),
            in_flight: self.spec.in_flight,
            batch_size: batch,
            params_sha256: all,
            vnodes: vnode_summaries(&self.spec.graph, &each, |id| {
                self.placement.get(&id).map(|p| p.id.clone()).unwrap_or_default()
            }),
            error: self.error.clone(),
            recoveries: self.recoveries.clone(),
            pipelines: self.spec.graph.pipelines(),
            rounds: self.rounds(),
        }
    }

    /// The job's artifacts and record, to be written when it ends; a failed job gets one too.
    fn artifacts(
        &self,
        summary: &JobSummary,
        stage: Stage,
        params: Option<&[Vec<Vec<f32>>]>,
    ) -> Option<(JobRecord, Files)> {
        let wanted = &self.spec.envelope.artifacts;
        if !self.spec.persist || !wanted.persist {
            return None;
        }
        let json = record::json;
        let mut files: Files = Vec::new();
        for kind in &wanted.write {
            match kind {
                ArtifactKind::Result => files.push((
                    "result.json",
                    json(serde_json::json!({
                        "summary": summary,
                        "error_code": self.error_code,
                        "last_state": { "stage": format!("{stage:?}"), "steps_done": self.completed, "steps_fed": self.fed },
                        "stale_reports_ignored": self.stale_reports,
                    })),
                )),
                ArtifactKind::Executions => files.push((
                    "executions.json",
                    json(serde_json::json!({
                        "job_id": self.spec.job_id,
                        "vnodes": self.executions.values().collect::<Vec<_>>(),
                    })),
                )),
                ArtifactKind::Metrics => files.push(("metrics.json", json(serde_json::json!(self.metrics)))),
                ArtifactKind::Envelope => files.push(("envelope.json", json(serde_json::json!(self.spec.envelope)))),
                ArtifactKind::Verification => {
                    files.push(("verification.json", json(serde_json::json!(self.verification))))
                }
                // Pipeline 0's: every copy holds the same parameters.
                ArtifactKind::Params => match params.map(|p| self.params_file(summary, p)) {
                    Some(Ok(bytes)) => files.push((crate::export::PARAMS_ARTIFACT, bytes)),
                    Some(Err(e)) => tracing::warn!(job = %self.spec.job_id, error = %e, "parameters not stored"),
                    None => {}
                },
            }
        }
        let record = JobRecord {
            job_id: self.spec.job_id.clone(),
            status: summary.status.clone(),
            error_code: self.error_code.map(str::to_string),
            error: self.error.clone(),
            artifacts: BTreeMap::new(),
        };
        Some((record, files))
    }

    /// Ends the job: the summary, the record and the release of every VNode.
    pub(super) fn finish(&mut self, params: Option<Params>) {
        if self.strikes_pending > 0 {
            // The record names every quarantine this job caused: wait for the strikes' answers.
            self.finish_pending = Some(params);
            self.awaiting = Some(Awaiting::Strikes);
            return;
        }
        if self.error.is_none() {
            self.write_verified_checkpoints();
        }
        for id in self.replication.cancel_all() {
            self.emit(Effect::CancelReplica(id));
        }
        if self.loss_window.1 > 0 {
            self.last_loss = Some((self.loss_window.0 / f64::from(self.loss_window.1)) as f32);
            self.loss_window = (0.0, 0);
        }
        let summary = self.summary(params.as_deref());
        let record = self.artifacts(&summary, Stage::Ended, params.as_deref());
        self.stage = Stage::Ended;
        self.awaiting = None;
        self.held.clear();
        let mut status = self.status();
        status.summary = Some(summary);
        let release: BTreeSet<String> = self.placement.values().map(|p| p.endpoint.clone()).collect();
        self.emit(Effect::DropLinks);
        self.emit(Effect::Finish { status, record, release });
    }

    /// The `params.safetensors` artifact of the final parameters.
    fn params_file(
        &self,
        summary: &JobSummary,
        params: &[Vec<Vec<f32>>],
    ) -> Result<Vec<u8>, crate::export::ExportError> {
        let pipeline = &params[..self.spec.graph.pipeline_len().min(params.len())];
        let meta = [
            ("format", "dcnr-params-v1".to_string()),
            ("job_id", self.spec.job_id.clone()),
            ("model", self.spec.graph.spec.model.name.clone()),
            ("steps", summary.steps.to_string()),
            ("params_sha256", summary.params_sha256.clone().unwrap_or_default()),
        ];
        let meta = meta.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        crate::export::params_safetensors(&self.spec.graph, pipeline, meta)
    }

    /// Checks the collected parameters (finite, sane magnitudes) before they are summarised.
    fn accept_params(&mut self, params: Params) {
        // Parameters come in placement order, one entry per placed VNode.
        let placed: Vec<(u32, PNodeView)> = self.placement.iter().map(|(v, p)| (*v, p.clone())).collect();
        for ((vnode, p), ps) in placed.into_iter().zip(&params) {
            self.verification.results_checked += 1;
            if let Some(text) = super::screen::params_problem(&p, vnode, ps) {
                return self.invalid_result(Some(p), Some(vnode), None, text);
            }
        }
        if let Some((p, vnode, text)) = self.copies_disagree(&params) {
            return self.invalid_result(Some(p), Some(vnode), None, text);
        }
        self.finish(Some(params))
    }

    /// Records copy `vnode`'s hash of the parameters round `mb` gave; once every copy has
    /// reported, they must agree bit for bit. A copy outside a strict majority gave an invalid
    /// result; without a majority (two copies, say) nobody can be blamed, and the job goes on
    /// from its latest snapshot without the disagreeing copies' PNodes. False when the job
    /// moved on because of it.
    fn check_round(&mut self, vnode: u32, mb: u64, hash: String) -> bool {
        let Some(node) = self.spec.graph.nodes.get(vnode as usize) else { return true };
        let (origin, pipeline, ids) = (node.origin, node.pipeline, node.copies.clone());
        let copies = self.spec.graph.pipelines();
        let seen = self.round_hashes.entry((origin, mb)).or_default();
        seen.insert(pipeline, hash);
        if seen.len() < copies as usize {
            return true;
        }
        let seen = self.round_hashes.remove(&(origin, mb)).unwrap_or_default();
        self.verification.results_checked += u64::from(copies);
        let mut votes: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
        for (p, h) in &seen {
            votes.entry(h.as_str()).or_default().push(*p);
        }
        if votes.len() == 1 {
            return true;
        }
        let (_, majority) =
            votes.iter().max_by_key(|(_, ps)| ps.len()).map(|(h, ps)| (*h, ps.clone())).unwrap_or_default();
        let strict = majority.len() * 2 > seen.len();
        let outside: Vec<u32> = seen.keys().copied().filter(|p| !strict || !majority.contains(p)).collect();
        let id_of = |p: u32| ids.get(p as usize).copied().unwrap_or(vnode);
        let at = |p: u32| self.placement.get(&id_of(p)).cloned();
        let name = self.spec.graph.nodes.get(origin as usize).map(|v| v.name.clone()).unwrap_or_default();
        if strict {
            let Some(&p) = outside.first() else { return true };
            let text = format!(
                "the copies of {name} disagree after the round closed by step {mb}: pipeline {p} differs from pipelines {majority:?}"
            );
            self.invalid_result(at(p), Some(id_of(p)), Some(mb), text);
            return false;
        }
        let bad: Vec<String> = outside.iter().filter_map(|&p| at(p)).map(|v| v.id).collect();
        let text = format!(
            "the copies of {name} disagree after the round closed by step {mb} with no majority among pipelines {outside:?}: going on without their pnodes"
        );
        self.verification.invalid_results.push(crate::verify::InvalidResult {
            pnode: bad.join(","),
            vnode: Some(origin),
            step: Some(mb),
            reason: text.clone(),
        });
        self.log(text.clone());
        self.recover(text, bad);
        false
    }

    /// With several pipelines, the first copy whose end state differs from pipeline 0's (after
    /// the last round every copy must hold the same bits): its PNode, the VNode and why.
    fn copies_disagree(&self, params: &Params) -> Option<(PNodeView, u32, String)> {
        // Parameters come one entry per placed VNode, in id order: every VNode of the job.
        params.iter().zip(&self.spec.graph.nodes).find_map(|(ps, node)| {
            let (vnode, origin) = (node.id, node.origin as usize);
            let same_bits = |a: &Vec<Vec<f32>>, b: &Vec<Vec<f32>>| {
                a.len() == b.len()
                    && a.iter().zip(b).all(|(x, y)| {
                        x.len() == y.len() && x.iter().zip(y).all(|(u, v)| u.to_bits() == v.to_bits())
                    })
            };
            if node.pipeline == 0 || params.get(origin).is_none_or(|first| same_bits(ps, first)) {
                return None;
            }
            let p = self.placement.get(&vnode)?.clone();
            let text = format!(
                "pnode {} ({}) ended vnode {vnode} (pipeline {}) with parameters that differ from vnode {origin}'s after the last round",
                p.id,
                p.name,
                node.pipeline
            );
            Some((p, vnode, text))
        })
    }

    /// Refuses a result: downscores its producer, records it, and goes on from the latest
    /// snapshot without that PNode (every result before the snapshot passed the same checks).
    /// Without a PNode to blame, the job fails.
    pub(super) fn invalid_result(
        &mut self,
        pnode: Option<PNodeView>,
        vnode: Option<u32>,
        step: Option<u64>,
        text: String,
    ) {
        if self.stage == Stage::Ended || self.error.is_some() {
            return;
        }
        let who = pnode.as_ref().map_or_else(|| "orchestrator".to_string(), |p| p.id.clone());
        self.verification.invalid_results.push(crate::verify::InvalidResult {
            pnode: who,
            vnode,
            step,
            reason: text.clone(),
        });
        let Some(p) = pnode else { return self.fail("invalid_result", text) };
        self.strike(p.id.clone(), text.clone());
        // It may have cheated undetected in unchecked segments before: go back past them.
        let bad = vec![p.id.clone()];
        let to = self.replication.rollback_for(&bad, None);
        self.roll_back(to, format!("invalid result: {text}"), bad);
    }

    /// Why the job failed, as a machine-readable class (none while it has not failed).
    pub fn error_code(&self) -> Option<&'static str> {
        self.error_code
    }

    /// Per VNode, the output hash of every step that counts, in step order.
    pub fn output_hashes(&self) -> BTreeMap<u32, Vec<String>> {
        self.executions.iter().map(|(v, e)| (*v, e.output_sha256.clone())).collect()
    }

    /// The time the core last saw.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// The job's started time (as the core was created).
    pub(super) fn started(&self) -> Duration {
        self.started
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Health;

    fn pnode(i: usize) -> PNodeView {
        crate::registry::test_view(i, Health::Healthy)
    }

    fn core() -> JobCore {
        let (spec, sizes) = crate::sim::sample_job(1).unwrap();
        JobCore::new(spec, sizes, Duration::ZERO)
    }

    fn at(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    /// Starts the job and places it on two PNodes; answers the effects of the placement.
    fn placed() -> (JobCore, Vec<Effect>) {
        place(core())
    }

    /// Starts `c` and places it on two PNodes; answers the effects of the placement.
    fn place(mut c: JobCore) -> (JobCore, Vec<Effect>) {
        c.step(Input::Start, at(0));
        c.take_effects();
        c.step(Input::View { view: vec![pnode(0), pnode(1)], generation: 1 }, at(1));
        let allocate = c.take_effects();
        assert!(allocate.iter().any(|e| matches!(e, Effect::Allocate { generation: 1, .. })), "{allocate:?}");
        c.step(Input::Allocated { generation: 1, result: Ok(()) }, at(2));
        let effects = c.take_effects();
        (c, effects)
    }

    fn done(c: &JobCore, vnode: u32, mb: u64, generation: u32) -> Input {
        let pnode = c.placement()[&vnode].id.clone();
        Input::Observation(Observation {
            job_id: "sim".into(),
            vnode,
            mb,
            pnode,
            generation,
            body: Observed::Done {
                compute_us: 1,
                cpu_us: 1,
                bytes_in: 1,
                bytes_out: 1,
                output_sha256: "ab".repeat(32),
                round_sha256: None,
                inputs: Vec::new(),
            },
        })
    }

    #[test]
    fn placement_waits_for_capacity_then_fails_at_its_deadline() {
        let mut c = core();
        c.step(Input::Start, at(0));
        assert!(c.take_effects().iter().any(|e| matches!(e, Effect::ListPNodes { .. })));
        c.step(Input::View { view: Vec::new(), generation: 1 }, at(100));
        assert!(!c.take_effects().iter().any(|e| matches!(e, Effect::Allocate { .. } | Effect::Finish { .. })));
        // Ticks while placing look again.
        c.step(Input::Tick, at(200));
        assert!(c.take_effects().iter().any(|e| matches!(e, Effect::ListPNodes { .. })));
        c.step(Input::View { view: Vec::new(), generation: 1 }, at(11_000));
        assert!(c.ended());
        assert_eq!(c.error_code(), Some("placement"));
    }

    #[test]
    fn a_placed_job_feeds_its_window_and_counts_each_step_once() {
        let (mut c, effects) = placed();
        let feeds: Vec<u64> = effects
            .iter()
            .filter_map(|e| match e {
                Effect::Feed { mb, phase: Phase::Train, .. } => Some(*mb),
                _ => None,
            })
            .collect();
        // In flight 1 plus the prefetch, up to the epoch's end (a drained point).
        let limit = c.position().limit();
        let window = (1 + super::super::schedule::PREFETCH).min(limit);
        assert_eq!(feeds, (0..window).collect::<Vec<_>>(), "in_flight 1 plus the prefetch");
        let n = c.spec().graph.nodes.len() as u32;
        for v in 0..n {
            c.step(done(&c, v, 0, 1), at(10));
            // A repeated report is not a second step.
            c.step(done(&c, v, 0, 1), at(10));
        }
        assert_eq!(c.completed(), 1);
        let more: Vec<u64> = c
            .take_effects()
            .iter()
            .filter_map(|e| match e {
                Effect::Feed { mb, .. } => Some(*mb),
                _ => None,
            })
            .collect();
        let next: Vec<u64> = (window..limit.min(window + 1)).collect();
        assert_eq!(more, next);
    }

    #[test]
    fn feeds_name_training_steps_and_evaluation_batches_by_number() {
        // Without checkpoints, nothing pauses the first epoch before its evaluation.
        let (mut spec, sizes) = crate::sim::sample_job(1).unwrap();
        spec.persist = false;
        let (mut c, mut effects) = place(JobCore::new(spec, sizes, Duration::ZERO));
        let n = c.spec().graph.nodes.len() as u32;
        let spe = c.plan.steps_per_epoch();
        let mut feeds = Vec::new();
        for mb in 0..spe {
            feeds.extend(effects.drain(..).filter_map(|e| match e {
                Effect::Feed { mb, phase, batch, targets, .. } => Some((phase, mb, batch, targets.len())),
                _ => None,
            }));
            for v in 0..n {
                c.step(done(&c, v, mb, 1), at(10 + mb));
            }
            effects = c.take_effects();
        }
        feeds.extend(effects.drain(..).filter_map(|e| match e {
            Effect::Feed { mb, phase, batch, targets, .. } => Some((phase, mb, batch, targets.len())),
            _ => None,
        }));
        // Every feed goes to the two data inputs (features, labels); a training batch is its step.
        assert!(feeds.iter().all(|f| f.3 == 2), "{feeds:?}");
        let train: Vec<(u64, u64)> =
            feeds.iter().filter(|f| f.0 == Phase::Train).map(|&(_, mb, batch, _)| (mb, batch)).collect();
        assert_eq!(train, (0..spe).map(|s| (s, s)).collect::<Vec<_>>());
        // Evaluation at the epoch's end: 16 test samples in batches of 8, numbered 0 and 1.
        let eval: Vec<(u64, u64)> =
            feeds.iter().filter(|f| f.0 == Phase::Eval).map(|&(_, mb, batch, _)| (mb, batch)).collect();
        assert_eq!(eval, vec![(0, 0), (1, 1)]);
    }

    #[test]
    fn reports_of_another_generation_change_nothing() {
        let (mut c, _) = placed();
        let n = c.spec().graph.nodes.len() as u32;
        for v in 0..n {
            c.step(done(&c, v, 0, 7), at(10));
        }
        assert_eq!(c.completed(), 0);
        assert!(c.take_effects().is_empty());
    }

    #[test]
    fn a_lost_pnode_moves_the_job_to_the_next_generation_from_its_snapshot() {
        let (mut c, _) = placed();
        let mut lost = pnode(1);
        lost.health = Health::Lost;
        c.step(Input::View { view: vec![pnode(0), lost], generation: 1 }, at(50));
        assert_eq!(c.generation(), 2);
        let effects = c.take_effects();
        assert!(effects.iter().any(|e| matches!(e, Effect::Release { generation: 2, .. })), "{effects:?}");
        // Reports meanwhile are held or stale; the placement goes on without the lost PNode.
        c.step(Input::Released { generation: 2 }, at(60));
        c.take_effects();
        c.step(Input::View { view: vec![pnode(0), pnode(2)], generation: 2 }, at(70));
        let effects = c.take_effects();
        let Some(Effect::Allocate { allocations, .. }) = effects.iter().find(|e| matches!(e, Effect::Allocate { .. }))
        else {
            panic!("{effects:?}")
        };
        assert!(allocations.iter().all(|a| a.pnode != "p1"));
    }

    #[test]
    fn inputs_wait_while_states_are_fetched() {
        let (mut c, effects) = placed();
        let fed = effects.iter().filter(|e| matches!(e, Effect::Feed { phase: Phase::Train, .. })).count() as u64;
        c.step(Input::Evacuate("p0".into()), at(20));
        // Leaving PNodes drain the pipeline first; finish the fed steps.
        let n = c.spec().graph.nodes.len() as u32;
        for mb in 0..fed {
            for v in 0..n {
                c.step(done(&c, v, mb, 1), at(30));
            }
        }
        let effects = c.take_effects();
        assert!(effects.iter().any(|e| matches!(e, Effect::FetchStates { .. })), "{effects:?}");
        // A report that arrives while the snapshot is fetched waits for it.
        c.step(done(&c, 0, fed, 1), at(40));
        assert!(c.take_effects().is_empty());
        let states = (0..n).map(|v| (v, Vec::new())).collect();
        c.step(Input::StatesFetched { generation: 1, result: Ok(states) }, at(50));
        // Then the job moves off the leaving PNode (a new generation).
        assert_eq!(c.generation(), 2);
    }
}

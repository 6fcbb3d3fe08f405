//! One actor per job: places its VNodes, feeds micro-batches, keeps `in_flight` of them in the
//! pipeline, evaluates on the test set at every epoch end, collects the parameters, and writes
//! the summary.
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

use crate::artifacts::{JobRecord, ObjectStore, write_record};
use crate::checkpoints::{self, ResumeFrom};
use crate::data::Splits;
use crate::events::{EventLog, NewEvent, Severity};
use crate::job_table::{JobTable, Placed, StatusUpdate};
use crate::placement::{self, Demand, Offer};
use crate::registry::{Health, MarkLost, PNodeView, Registry, Snapshot};
use crate::status::{JobEvent, JobState, JobStatus};
use crate::summary::{JobSummary, Recovery, params_hashes, vnode_summaries};
use actix::prelude::*;
use dcnr_mesh::convert;
use dcnr_mesh::link::{Link, open_link};
use dcnr_model::ValidGraph;
use dcnr_model::envelope::{ArtifactKind, Envelope, Target};
use dcnr_model::graph::Source;
use dcnr_proto::limits::MAX_MESSAGE_BYTES;
use dcnr_proto::v1::{self, p_node_client::PNodeClient};
use dcnr_vnode::batches::BatchPlan;
use dcnr_vnode::{HostData, HostTensor, Phase};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

mod replication;
mod validation;

pub use replication::{ReplicaDone, ReplicaOf, Share};

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
    /// Where artifacts and checkpoints go (none: keep nothing).
    pub store: Option<Arc<dyn ObjectStore>>,
    /// The snapshot a resumed job starts from.
    pub resume: Option<ResumeFrom>,
    /// The mesh's event log (checkpoints are pushed here).
    pub events: EventLog,
    /// A user's job, or a replica re-executing a segment of one.
    pub role: Role,
}

/// What a job actor runs for.
#[derive(Debug, Clone)]
pub enum Role {
    /// A submitted job: its results are the job's.
    Primary,
    /// Re-executes steps `resume.step..steps` of another job so they can be compared; it keeps
    /// nothing, evaluates nothing, and answers its parent with what it computed.
    Replica(ReplicaOf),
}

impl std::fmt::Debug for dyn ObjectStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ObjectStore({})", self.location())
    }
}

/// A report from a VNode, as plain data.
#[derive(Debug, Clone)]
pub struct Report {
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
    pub body: ReportBody,
}

/// What a VNode reports.
#[derive(Debug, Clone)]
pub enum ReportBody {
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

impl Message for Report {
    type Result = ();
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

struct Eval {
    batches: Vec<Range<usize>>,
    next: usize,
    outstanding: usize,
    correct: u64,
    count: u64,
    loss_sum: f64,
}

/// A job record and its artifacts, to be written to a store.
type PendingRecord = (Arc<dyn ObjectStore>, JobRecord, Vec<(&'static str, Vec<u8>)>);

/// Every VNode's state bytes, by VNode id.
type States = Vec<(u32, Vec<u8>)>;

/// Micro-batches of data sent ahead of the in-flight window.
const PREFETCH: u64 = 2;

/// Most eval micro-batches in the mesh at once.
const EVAL_WINDOW: usize = 4;

/// The actor driving one job.
pub struct JobActor {
    spec: JobSpec,
    registry: Addr<Registry>,
    jobs: Addr<JobTable>,
    data: Arc<Splits>,
    events: broadcast::Sender<JobEvent>,
    plan: BatchPlan,
    stage: Stage,
    placement: BTreeMap<u32, PNodeView>,
    links: HashMap<String, Link>,
    feeders: Vec<(u32, u32, Source)>,
    fed: u64,
    completed: u64,
    /// VNodes that reported each unfinished micro-batch done.
    done: BTreeMap<u64, BTreeSet<u32>>,
    finished_mbs: BTreeSet<u64>,
    epochs_evaluated: u64,
    eval: Option<Eval>,
    eval_seq: u64,
    loss_window: (f64, u32),
    last_loss: Option<f32>,
    test: Option<(f64, f64)>,
    started: Instant,
    train_time: Duration,
    train_mark: Option<Instant>,
    last_activity: Instant,
    rate_mark: (Instant, u64),
    samples_per_s: f64,
    error: Option<String>,
    error_code: Option<&'static str>,
    executions: BTreeMap<u32, Execution>,
    metrics: Metrics,
    /// Step of the last snapshot taken (or resumed from).
    last_checkpoint: Option<u64>,
    last_checkpoint_at: Instant,
    /// Snapshot uploads still running; the job's record waits for them.
    uploads: Vec<tokio::task::JoinHandle<()>>,
    /// Current placement generation.
    generation: u32,
    /// Latest complete snapshot, where a recovery rolls back to (none: the job's start).
    recovery: Option<ResumeFrom>,
    /// When the last snapshot (checkpoint or recovery) was taken.
    last_snapshot_at: Instant,
    /// Step this run started from (0, or a resumed snapshot's step).
    first_step: u64,
    /// PNodes this job no longer uses (they failed it).
    excluded: BTreeSet<String>,
    /// PNodes leaving, whose VNodes are moved at the next drained point.
    evacuating: BTreeSet<String>,
    /// Every recovery so far, for the record.
    recoveries: Vec<Recovery>,
    /// When the latest recovery began, until training completes its first step after it.
    recovery_started: Option<Instant>,
    /// Reports of older generations that were ignored.
    stale_reports: u64,
    /// Step-deadline probe in flight.
    probing: bool,
    /// Timer ticks so far.
    ticks: u64,
    /// Smoothed seconds between completed steps.
    step_interval: Option<f64>,
    /// When the last step completed.
    last_step_at: Instant,
    /// No probe before this.
    next_probe: Instant,
    /// What was checked and found, for `verification.json`.
    verification: crate::verify::VerificationRecord,
    /// Redundant execution of this job's segments (primary jobs with a verify policy).
    replication: replication::Replication,
    /// A rollback decided while a placement was under way, applied when it lands.
    pending_rollback: Option<(replication::RollbackTo, String)>,
}

/// What one VNode did, for `executions.json`.
#[derive(Debug, Clone, Default, Serialize)]
struct Execution {
    vnode: u32,
    name: String,
    pnode: String,
    endpoint: String,
    determinism_class: String,
    steps: u64,
    compute_s: f64,
    cpu_s: f64,
    bytes_in: u64,
    bytes_out: u64,
    /// Output hash of every training step, in step order.
    output_sha256: Vec<String>,
    /// (first step, pnode) of every placement it had: where each step ran.
    placements: Vec<(u64, String)>,
}

/// Curves for `metrics.json`.
#[derive(Debug, Clone, Default, Serialize)]
struct Metrics {
    /// (step, loss) of every training step.
    train_loss: Vec<(u64, f32)>,
    /// Test-set evaluations.
    evaluations: Vec<EvalPoint>,
    /// (seconds since start, samples/s), sampled once a second.
    samples_per_s: Vec<(f64, f64)>,
}

#[derive(Debug, Clone, Serialize)]
struct EvalPoint {
    epoch: u64,
    step: u64,
    accuracy: f64,
    loss: f64,
}

impl JobActor {
    /// A job actor that starts working when started.
    pub fn new(
        spec: JobSpec,
        registry: Addr<Registry>,
        jobs: Addr<JobTable>,
        data: Arc<Splits>,
        events: broadcast::Sender<JobEvent>,
    ) -> JobActor {
        let plan = BatchPlan::new(data.train.len(), spec.graph.spec.training.batch_size, spec.root_seed);
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
        let now = Instant::now();
        JobActor {
            registry,
            jobs,
            data,
            events,
            plan,
            stage: Stage::Placing,
            placement: BTreeMap::new(),
            links: HashMap::new(),
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
            train_time: Duration::ZERO,
            train_mark: None,
            last_activity: now,
            rate_mark: (now, 0),
            samples_per_s: 0.0,
            error: None,
            error_code: None,
            executions: BTreeMap::new(),
            metrics: Metrics::default(),
            last_checkpoint: None,
            last_checkpoint_at: now,
            uploads: Vec::new(),
            generation: 1,
            recovery: None,
            last_snapshot_at: now,
            first_step: 0,
            excluded: BTreeSet::new(),
            evacuating: BTreeSet::new(),
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
            replication: replication::Replication::new(&spec),
            pending_rollback: None,
            spec,
        }
        .resumed()
    }

    /// Starts the counters where a resumed job's snapshot left them.
    fn resumed(mut self) -> JobActor {
        if let Some(r) = &self.spec.resume {
            self.fed = r.step;
            self.completed = r.step;
            self.epochs_evaluated = r.epochs_evaluated;
            self.last_checkpoint = Some(r.step);
            self.first_step = r.step;
        }
        self.recovery = self.spec.resume.clone();
        self
    }

    /// Whether an in-memory recovery snapshot is due (a drained point is then reached first).
    fn recovery_snapshot_due(&self) -> bool {
        if let Some(n) = self.replication.segment_steps() {
            // Verified jobs snapshot at segment boundaries: each segment is what a replica redoes.
            let c = self.completed;
            return c > self.recovery_step() && (c.is_multiple_of(n) || c >= self.spec.steps);
        }
        let every = self.spec.recovery_every;
        !every.is_zero() && self.last_snapshot_at.elapsed() >= every && self.completed > self.recovery_step()
    }

    /// Whether the job stands at a segment boundary until its replicas catch up: its PNodes are
    /// idle on purpose, not stalled.
    fn waiting_for_replicas(&self) -> bool {
        self.replication.backlogged() && self.completed == self.recovery_step() && self.stage == Stage::Training
    }

    /// Whether a PNode this job is placed on is leaving (its VNodes move at the next drained step).
    fn leaving(&self) -> bool {
        self.placement.values().any(|p| self.evacuating.contains(&p.id))
    }

    fn recovery_step(&self) -> u64 {
        self.recovery.as_ref().map(|r| r.step).unwrap_or(self.first_step)
    }

    /// Whether the drained point `step` is where a snapshot is due.
    fn checkpoint_due(&self, step: u64) -> bool {
        let c = &self.spec.envelope.checkpoint;
        if !c.enabled() || self.spec.store.is_none() || self.last_checkpoint == Some(step) || step == 0 {
            return false;
        }
        let by_steps = c.every_steps.is_some_and(|n| step.is_multiple_of(n));
        let by_time = c.every_s.is_some_and(|s| self.last_checkpoint_at.elapsed() >= Duration::from_secs(s));
        by_steps || by_time || step == self.spec.steps
    }

    /// Takes a snapshot of every (drained) VNode: kept in memory for recovery, uploaded as a
    /// checkpoint when `persist`, then training goes on (on new PNodes if some are leaving).
    fn take_checkpoint(&mut self, ctx: &mut Context<Self>, persist: bool) {
        self.stage = Stage::Checkpointing;
        let step = self.completed;
        let fut = self.fetch_states();
        ctx.wait(fut.into_actor(self).map(move |res, act, ctx| match res {
            Ok(states) => {
                act.last_snapshot_at = Instant::now();
                let snapshot = ResumeFrom {
                    step,
                    epochs_evaluated: act.epochs_evaluated,
                    states: states.iter().cloned().collect(),
                };
                let previous = act.recovery.replace(snapshot);
                act.close_segment(ctx, previous);
                if !persist {
                    return act.after_snapshot(ctx);
                }
                act.last_checkpoint = Some(step);
                act.last_checkpoint_at = Instant::now();
                if let Some(store) = act.spec.store.clone() {
                    let (events, log) = (act.events.clone(), act.spec.events.clone());
                    let snapshot = checkpoints::Checkpoint {
                        job: act.spec.job_id.clone(),
                        step,
                        epochs_evaluated: act.epochs_evaluated,
                        envelope_json: serde_json::to_vec(&act.spec.envelope).unwrap_or_default(),
                        states,
                        keep: act.spec.envelope.checkpoint.keep,
                    };
                    // The upload runs beside training; a slow store delays nothing but itself.
                    act.uploads.retain(|h| !h.is_finished());
                    act.uploads.push(actix::spawn(async move {
                        let written = checkpoints::write_with_retry(store.as_ref(), &snapshot).await;
                        let text = match &written {
                            Ok(h) => format!("checkpoint at step {step}: manifest {h}"),
                            Err(e) => format!("checkpoint at step {step} could not be written: {e}"),
                        };
                        log.push(checkpoint_event(&snapshot.job, step, &written, &text));
                        tracing::info!(job = %snapshot.job, "{text}");
                        let _ = events.send(JobEvent::Log(text));
                    }));
                }
                act.after_snapshot(ctx);
            }
            Err((pnode, why)) => act.recover(ctx, format!("snapshot failed: {why}"), vec![pnode]),
        }));
    }

    /// Fetches the state of every (drained) VNode; on failure, names the PNode that failed.
    fn fetch_states(&self) -> impl std::future::Future<Output = Result<States, (String, String)>> + use<> {
        let job = self.spec.job_id.clone();
        let targets: Vec<(u32, String, String)> =
            self.placement.iter().map(|(v, p)| (*v, p.endpoint.clone(), p.id.clone())).collect();
        async move {
            let mut states = Vec::with_capacity(targets.len());
            for (vnode, endpoint, pnode) in targets {
                let fail = |why: String| (pnode.clone(), why);
                let mut c = pnode_client(&endpoint).map_err(|e| fail(format!("{endpoint}: {e}")))?;
                let mut req = tonic::Request::new(v1::SnapshotRequest { job_id: job.clone(), vnode });
                req.set_timeout(SNAPSHOT_TIMEOUT);
                let r = c
                    .snapshot(req)
                    .await
                    .map_err(|s| fail(format!("snapshot of vnode {vnode} on {endpoint}: {}", s.message())))?;
                states.push((vnode, r.into_inner().state));
            }
            Ok(states)
        }
    }

    fn after_snapshot(&mut self, ctx: &mut Context<Self>) {
        if self.leaving() {
            let leaving: Vec<String> = self.evacuating.iter().cloned().collect();
            return self.recover(ctx, format!("moving VNodes off leaving pnode(s) {}", leaving.join(", ")), leaving);
        }
        self.stage = Stage::Training;
        self.pump(ctx);
    }

    /// Moves the job to a new generation: drops PNodes `bad`, rolls back to the latest complete
    /// snapshot, and places every VNode again on the PNodes left (waiting for capacity up to the
    /// job's timeout).
    fn recover(&mut self, ctx: &mut Context<Self>, reason: String, bad: Vec<String>) {
        if matches!(self.stage, Stage::Ended | Stage::Recovering | Stage::Placing) || self.error.is_some() {
            self.excluded.extend(bad);
            return;
        }
        if let Some(m) = self.train_mark.take() {
            self.train_time += m.elapsed();
        }
        let at_step = self.completed;
        let to = self.recovery.clone();
        let resumed_step = to.as_ref().map(|r| r.step).unwrap_or(self.first_step);
        self.generation += 1;
        self.stage = Stage::Recovering;
        self.excluded.extend(bad.iter().cloned());
        for p in &bad {
            self.evacuating.remove(p);
        }
        self.recovery_started = Some(Instant::now());
        self.recoveries.push(Recovery {
            generation: self.generation,
            reason: reason.clone(),
            pnodes: bad,
            at_step,
            resumed_step,
            recomputed_steps: at_step.saturating_sub(resumed_step),
            replace_s: 0.0,
            first_step_s: None,
        });
        let text = format!(
            "recovering (generation {}): {reason}; rolling back from step {at_step} to {resumed_step}",
            self.generation
        );
        self.log(text.clone());
        if let Some(r) = self.recoveries.last() {
            let kind = if r.recomputed_steps == 0 { "relocation" } else { "recovery" };
            self.spec.events.push(
                NewEvent::new(kind, text).severity(Severity::Warning).job(&self.spec.job_id).data(serde_json::json!(r)),
            );
        }
        // Everything past the snapshot is forgotten and computed again, identically.
        self.replication.forget_after(resumed_step);
        self.completed = resumed_step;
        self.fed = resumed_step;
        self.epochs_evaluated = to.as_ref().map(|r| r.epochs_evaluated).unwrap_or(self.epochs_evaluated_at_start());
        self.done.clear();
        self.finished_mbs.clear();
        self.eval = None;
        self.loss_window = (0.0, 0);
        self.links.clear();
        self.metrics.train_loss.retain(|(mb, _)| *mb < resumed_step);
        let evaluated = self.epochs_evaluated;
        self.metrics.evaluations.retain(|e| e.epoch <= evaluated);
        self.test = self.metrics.evaluations.last().map(|e| (e.accuracy, e.loss));
        let keep = (resumed_step - self.first_step) as usize;
        for e in self.executions.values_mut() {
            e.output_sha256.truncate(keep);
            e.steps = e.steps.min(keep as u64);
        }
        let old: BTreeSet<String> =
            self.placement.values().filter(|p| !self.excluded.contains(&p.id)).map(|p| p.endpoint.clone()).collect();
        let job = self.spec.job_id.clone();
        let mut spec = self.spec.clone();
        spec.resume = to;
        let request = self.placement_request(self.started + self.spec.timeout, 1);
        let registry = self.registry.clone();
        self.push_status();
        let fut = async move {
            // PNodes that keep nothing of the job stop its old VNodes now; the others have them
            // replaced by the allocation of the new generation.
            release_everywhere(&job, old).await;
            place_and_allocate(spec, registry, request).await
        };
        ctx.wait(fut.into_actor(self).map(|res, act, ctx| act.on_placed(res, ctx)));
    }

    /// What the next placement must respect: the PNodes this job no longer uses, its share,
    /// and for a replica its class and the machines it keeps off.
    fn placement_request(&self, deadline: Instant, min_pnodes: usize) -> PlacementRequest {
        let replica = match &self.spec.role {
            Role::Primary => None,
            Role::Replica(of) => Some(of),
        };
        PlacementRequest {
            generation: self.generation,
            exclude: self.excluded.clone(),
            deadline,
            min_pnodes,
            share: self.replication.share(),
            class: replica.and_then(|of| of.class.clone()),
            avoid_hosts: replica.is_some(),
        }
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
        }
    }

    fn log(&self, text: String) {
        tracing::info!(job = %self.spec.job_id, "{text}");
        let _ = self.events.send(JobEvent::Log(text));
    }

    fn fail(&mut self, ctx: &mut Context<Self>, code: &'static str, why: String) {
        if self.stage == Stage::Ended || self.error.is_some() {
            return;
        }
        tracing::error!(job = %self.spec.job_id, code, error = %why, "job failed");
        self.tell_parent(Err(format!("{code}: {why}")));
        self.error = Some(why);
        self.error_code = Some(code);
        self.finish(ctx, None);
    }

    fn on_placed(&mut self, placed: Result<BTreeMap<u32, PNodeView>, PlaceError>, ctx: &mut Context<Self>) {
        let placement = match placed {
            Ok(p) => p,
            Err(PlaceError::Capacity(e)) if self.stage == Stage::Recovering => {
                return self.fail(ctx, "no_capacity", format!("recovery could not place the job: {e}"));
            }
            Err(PlaceError::Capacity(e)) => return self.fail(ctx, "placement", e),
            // An allocation that failed (a PNode died while being given work) is one more failure.
            Err(PlaceError::Allocate { pnode, why }) => {
                // `recover` starts from a placed job; this one was being placed.
                self.stage = Stage::Training;
                return self.recover(ctx, format!("allocation failed: {why}"), vec![pnode]);
            }
        };
        if let Some((to, why)) = self.pending_rollback.take() {
            // Placed from a snapshot that verification has since rejected: go back further.
            self.placement = placement;
            self.stage = Stage::Training;
            return self.rewind(ctx, Some(to), why, Vec::new());
        }
        let names = self.spec.graph.names();
        let text: Vec<String> = placement
            .iter()
            .map(|(v, p)| format!("{}->{}", names.get(v).map(String::as_str).unwrap_or("?"), p.id))
            .collect();
        self.log(format!("placed {} VNodes (generation {}): {}", placement.len(), self.generation, text.join(", ")));
        if let (Some(since), Some(r)) = (self.recovery_started, self.recoveries.last_mut()) {
            r.replace_s = since.elapsed().as_secs_f64();
        }
        self.jobs.do_send(Placed {
            job_id: self.spec.job_id.clone(),
            locations: placement.iter().map(|(v, p)| (*v, p.endpoint.clone())).collect(),
        });
        for (vnode, _, _) in &self.feeders {
            let Some(p) = placement.get(vnode) else { continue };
            if !self.links.contains_key(&p.endpoint) {
                match open_link(&p.endpoint) {
                    Ok(l) => {
                        self.links.insert(p.endpoint.clone(), l);
                    }
                    Err(e) => return self.fail(ctx, "placement", format!("bad endpoint {}: {e}", p.endpoint)),
                }
            }
        }
        for (v, p) in &placement {
            let e = self.executions.entry(*v).or_insert_with(|| Execution {
                vnode: *v,
                name: names.get(v).cloned().unwrap_or_default(),
                ..Execution::default()
            });
            e.pnode = p.id.clone();
            e.endpoint = p.endpoint.clone();
            e.determinism_class = p.caps.determinism_class.clone();
            // A placement from a rolled-back step replaces the ones after it: the list says
            // where each step that counts ran.
            let from = self.completed;
            e.placements.retain(|(first, _)| *first < from);
            e.placements.push((from, p.id.clone()));
            self.replication.placed.insert(p.id.clone(), p.clone());
        }
        self.placement = placement;
        self.stage = Stage::Training;
        self.train_mark = Some(Instant::now());
        self.rate_mark = (Instant::now(), self.completed);
        self.last_activity = Instant::now();
        self.last_step_at = Instant::now();
        self.push_status();
        self.pump(ctx);
    }

    fn push_status(&self) {
        self.jobs.do_send(StatusUpdate(self.status()));
    }

    /// Sends one micro-batch of data to the VNodes that read data; on failure, names the PNode
    /// that could not be fed.
    fn send_data(
        &mut self,
        mb: u64,
        phase: Phase,
        features: &HostTensor,
        labels: &HostTensor,
    ) -> Result<(), (String, String)> {
        for (vnode, port, src) in &self.feeders {
            let tensor = if *src == Source::Labels { labels } else { features };
            let to = convert::Target { job: self.spec.job_id.clone(), vnode: *vnode, generation: self.generation };
            let msg = convert::forward_message(&to, mb, phase, *port, tensor);
            let (endpoint, pnode) =
                self.placement.get(vnode).map(|p| (p.endpoint.as_str(), p.id.clone())).unwrap_or_default();
            let fail = |why: String| (pnode.clone(), why);
            let link =
                self.links.get(endpoint).ok_or_else(|| fail(format!("no link to the pnode of vnode {vnode}")))?;
            link.try_send(msg).map_err(|e| fail(format!("cannot feed vnode {vnode} at {endpoint}: {e}")))?;
        }
        Ok(())
    }

    fn batch(&self, set: &dcnr_model::dataset::ImageSet, idx: &[usize]) -> (HostTensor, HostTensor) {
        let (x, y) = crate::data::batch(set, idx, self.spec.graph.spec.data.normalize);
        (x, HostTensor::i32(vec![idx.len()], y))
    }

    fn pump(&mut self, ctx: &mut Context<Self>) {
        loop {
            match self.stage {
                Stage::Training => {
                    let spe = self.plan.steps_per_epoch();
                    let mut limit = self.spec.steps.min((self.epochs_evaluated + 1) * spe);
                    let c = &self.spec.envelope.checkpoint;
                    if c.enabled() && self.spec.store.is_some() {
                        if let Some(n) = c.every_steps {
                            // Stop at the boundary just reached until its snapshot is taken.
                            let boundary = self.completed / n * n;
                            let taken = boundary == 0 || self.last_checkpoint.is_some_and(|l| l >= boundary);
                            limit = limit.min(if taken { boundary + n } else { boundary });
                        }
                        if c.every_s.is_some_and(|s| self.last_checkpoint_at.elapsed() >= Duration::from_secs(s))
                            && self.last_checkpoint != Some(self.completed)
                        {
                            // Feed nothing more until the pipeline has drained for the snapshot.
                            limit = limit.min(self.fed);
                        }
                    }
                    let mut waiting_for_replicas = false;
                    if let Some(n) = self.replication.segment_steps() {
                        // Stop at each segment boundary until its snapshot is taken, and at a
                        // taken one while too many segments await their replicas.
                        let boundary = self.completed / n * n;
                        let taken = self.recovery_step() >= boundary;
                        limit = limit.min(if taken { boundary + n } else { boundary });
                        if self.waiting_for_replicas() {
                            limit = limit.min(self.completed);
                            waiting_for_replicas = true;
                        }
                    }
                    // A leaving PNode or a due recovery snapshot needs a drained pipeline first.
                    let snapshot_wanted = self.leaving() || self.recovery_snapshot_due();
                    if snapshot_wanted {
                        limit = limit.min(self.fed);
                    }
                    let k = self.spec.in_flight as u64;
                    // Data may arrive up to PREFETCH steps early: VNodes hold it until the update
                    // order lets them run, so feeding never sits on a step's critical path.
                    while self.fed < limit && self.fed < self.completed + k + PREFETCH {
                        let idx = self.plan.indices(self.fed);
                        let (x, y) = self.batch(&self.data.train, &idx);
                        if let Err(e) = self.send_data(self.fed, Phase::Train, &x, &y) {
                            return self.recover(ctx, format!("feeding failed: {}", e.1), vec![e.0]);
                        }
                        self.fed += 1;
                    }
                    if self.completed < limit {
                        return;
                    }
                    if self.checkpoint_due(self.completed) {
                        return self.take_checkpoint(ctx, true);
                    }
                    if snapshot_wanted {
                        return self.take_checkpoint(ctx, false);
                    }
                    if matches!(self.spec.role, Role::Replica(_)) && self.completed >= self.spec.steps {
                        return self.answer_parent(ctx);
                    }
                    if waiting_for_replicas {
                        return;
                    }
                    let epoch_end = self.completed.is_multiple_of(spe) || self.completed >= self.spec.steps;
                    if !epoch_end {
                        // A drained point for a snapshot only; training goes on.
                        continue;
                    }
                    if matches!(self.spec.role, Role::Replica(_)) {
                        // A replica evaluates nothing: the job's own evaluation is the record.
                        self.epochs_evaluated += 1;
                        continue;
                    }
                    if let Some(m) = self.train_mark.take() {
                        self.train_time += m.elapsed();
                    }
                    let test = self.data.test.len();
                    let eb = self.spec.graph.spec.training.eval_batch_size;
                    self.eval = Some(Eval {
                        batches: (0..test).step_by(eb).map(|s| s..(s + eb).min(test)).collect(),
                        next: 0,
                        outstanding: 0,
                        correct: 0,
                        count: 0,
                        loss_sum: 0.0,
                    });
                    self.stage = Stage::Evaluating;
                }
                Stage::Evaluating => {
                    let Some(mut ev) = self.eval.take() else { return };
                    while ev.outstanding < EVAL_WINDOW && ev.next < ev.batches.len() {
                        let idx: Vec<usize> = ev.batches[ev.next].clone().collect();
                        let (x, y) = self.batch(&self.data.test, &idx);
                        let mb = self.eval_seq;
                        self.eval_seq += 1;
                        if let Err(e) = self.send_data(mb, Phase::Eval, &x, &y) {
                            return self.recover(ctx, format!("feeding failed: {}", e.1), vec![e.0]);
                        }
                        ev.next += 1;
                        ev.outstanding += 1;
                    }
                    if ev.outstanding > 0 || ev.next < ev.batches.len() {
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
                    let _ = self.events.send(JobEvent::Evaluation {
                        epoch: self.epochs_evaluated as u32,
                        accuracy: acc,
                        loss,
                    });
                    self.log(format!(
                        "evaluation after {} steps: test accuracy {:.2}%, test loss {:.4}",
                        self.completed,
                        acc * 100.0,
                        loss
                    ));
                    if self.completed >= self.spec.steps {
                        return self.training_done(ctx);
                    }
                    self.stage = Stage::Training;
                    self.train_mark = Some(Instant::now());
                }
                _ => return,
            }
        }
    }

    fn collect(&mut self, ctx: &mut Context<Self>) {
        match self.verified_params() {
            Some(Ok(params)) => return self.accept_params(ctx, params),
            Some(Err(e)) => return self.fail(ctx, "collect", format!("the verified snapshot is unreadable: {e}")),
            None => {}
        }
        let job = self.spec.job_id.clone();
        let targets: Vec<(u32, String, String)> =
            self.placement.iter().map(|(v, p)| (*v, p.endpoint.clone(), p.id.clone())).collect();
        let fut = async move {
            let mut all = Vec::with_capacity(targets.len());
            for (vnode, endpoint, pnode) in targets {
                let unreachable = |why: String| CollectError::Unreachable(pnode.clone(), why);
                let mut client = pnode_client(&endpoint).map_err(|e| unreachable(format!("{endpoint}: {e}")))?;
                let mut req = tonic::Request::new(v1::FetchParamsRequest { job_id: job.clone(), vnode });
                req.set_timeout(SNAPSHOT_TIMEOUT);
                let r = client
                    .fetch_params(req)
                    .await
                    .map_err(|s| {
                        unreachable(format!("fetching parameters of vnode {vnode} from {endpoint}: {}", s.message()))
                    })?
                    .into_inner();
                let mut ps = Vec::with_capacity(r.params.len());
                for t in &r.params {
                    let t = convert::tensor_from_wire(Some(t))
                        .map_err(|e| CollectError::Invalid(format!("vnode {vnode} parameters: {e}")))?;
                    match t.data {
                        HostData::F32(v) => ps.push(v),
                        HostData::I32(_) => {
                            return Err(CollectError::Invalid(format!("vnode {vnode} sent integer parameters")));
                        }
                    }
                }
                all.push(ps);
            }
            Ok::<_, CollectError>(all)
        };
        ctx.wait(fut.into_actor(self).map(|res, act, ctx| match res {
            Ok(params) => act.accept_params(ctx, params),
            Err(CollectError::Unreachable(pnode, why)) => act.recover(ctx, why, vec![pnode]),
            Err(CollectError::Invalid(why)) => act.fail(ctx, "collect", why),
        }));
    }

    fn summary(&self, params: Option<&[Vec<Vec<f32>>]>) -> JobSummary {
        let (all, each) = match params {
            Some(p) => {
                let (a, e) = params_hashes(p);
                (Some(a), e)
            }
            None => (None, Vec::new()),
        };
        let train_s = self.train_time.as_secs_f64() + self.train_mark.map(|m| m.elapsed().as_secs_f64()).unwrap_or(0.0);
        let batch = self.spec.graph.spec.training.batch_size;
        let samples = (self.completed as f64) * batch as f64;
        let pnodes: BTreeSet<&str> = self.placement.values().map(|p| p.id.as_str()).collect();
        JobSummary {
            job_id: self.spec.job_id.clone(),
            status: if self.error.is_some() { "failed" } else { "succeeded" }.into(),
            model: self.spec.graph.spec.model.name.clone(),
            steps: self.completed,
            test_accuracy: self.test.map(|t| t.0),
            test_loss: self.test.map(|t| t.1),
            train_loss: self.last_loss.map(f64::from),
            wall_s: self.started.elapsed().as_secs_f64(),
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
        }
    }

    /// The job's artifacts and record, to be written when it ends; a failed job gets one too.
    fn artifacts(&self, summary: &JobSummary) -> Option<PendingRecord> {
        let store = self.spec.store.clone()?;
        let wanted = &self.spec.envelope.artifacts;
        if !wanted.persist {
            return None;
        }
        let json = |v: serde_json::Value| serde_json::to_vec_pretty(&v).unwrap_or_default();
        let mut files: Vec<(&'static str, Vec<u8>)> = Vec::new();
        for kind in &wanted.write {
            match kind {
                ArtifactKind::Result => files.push((
                    "result.json",
                    json(serde_json::json!({
                        "summary": summary,
                        "error_code": self.error_code,
                        "last_state": { "stage": format!("{:?}", self.stage), "steps_done": self.completed, "steps_fed": self.fed },
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
            }
        }
        let record = JobRecord {
            job_id: self.spec.job_id.clone(),
            status: summary.status.clone(),
            error_code: self.error_code.map(str::to_string),
            error: self.error.clone(),
            artifacts: BTreeMap::new(),
        };
        Some((store, record, files))
    }

    fn finish(&mut self, ctx: &mut Context<Self>, params: Option<Vec<Vec<Vec<f32>>>>) {
        self.replication.cancel_all();
        if self.loss_window.1 > 0 {
            self.last_loss = Some((self.loss_window.0 / f64::from(self.loss_window.1)) as f32);
            self.loss_window = (0.0, 0);
        }
        let summary = self.summary(params.as_deref());
        let artifacts = self.artifacts(&summary);
        self.stage = Stage::Ended;
        let mut status = self.status();
        status.summary = Some(summary);
        let job = self.spec.job_id.clone();
        let endpoints: BTreeSet<String> = self.placement.values().map(|p| p.endpoint.clone()).collect();
        self.links.clear();
        let events = self.events.clone();
        let uploads = std::mem::take(&mut self.uploads);
        let active_store = self.spec.store.clone();
        let release = async move {
            for u in uploads {
                let _ = u.await;
            }
            if let Some((store, record, files)) = artifacts {
                match write_record(store.as_ref(), record, files).await {
                    Ok(h) => {
                        let text = format!("artifacts: record {h} in {}", store.location());
                        tracing::info!(job = %job, "{text}");
                        let _ = events.send(JobEvent::Log(text));
                    }
                    Err(e) => tracing::error!(job = %job, error = %e, "cannot write artifacts"),
                }
            }
            // The job has ended: a restarted orchestrator must not run it again.
            if let Some(store) = active_store
                && let Err(e) = checkpoints::clear_active(store.as_ref(), &job).await
            {
                tracing::warn!(job = %job, error = %e, "cannot clear the job's active mark");
            }
            for e in endpoints {
                if let Ok(mut c) = pnode_client(&e)
                    && let Err(s) = c.release(v1::ReleaseRequest { job_id: job.clone() }).await
                {
                    tracing::warn!(endpoint = %e, status = %s, "release failed");
                }
            }
        };
        ctx.wait(release.into_actor(self).map(move |_, act, ctx| {
            // The job table announces the end, so a watcher never misses it.
            act.jobs.do_send(StatusUpdate(status));
            ctx.stop();
        }));
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        if self.stage == Stage::Ended {
            return;
        }
        self.ticks += 1;
        if self.ticks.is_multiple_of(3) {
            self.report_progress();
        }
        if self.started.elapsed() > self.spec.timeout {
            let why = format!(
                "the job exceeded its timeout of {:?} ({} of {} steps done)",
                self.spec.timeout, self.completed, self.spec.steps
            );
            return self.fail(ctx, "timeout", why);
        }
        if matches!(self.stage, Stage::Placing | Stage::Recovering | Stage::Verifying) {
            return;
        }
        if self.waiting_for_replicas() {
            self.last_activity = Instant::now();
        }
        if self.last_activity.elapsed() > self.idle_limit() && !self.probing && Instant::now() >= self.next_probe {
            self.probe(ctx);
        }
        let placed: BTreeSet<String> = self.placement.values().map(|p| p.id.clone()).collect();
        let generation = self.generation;
        ctx.spawn(self.registry.send(Snapshot).into_actor(self).map(move |snap, act, ctx| {
            let Ok(snap) = snap else { return };
            if act.generation != generation {
                return;
            }
            let by_id: HashMap<&str, &PNodeView> = snap.iter().map(|p| (p.id.as_str(), p)).collect();
            let lost: Vec<String> = placed
                .iter()
                .filter(|id| by_id.get(id.as_str()).is_none_or(|p| p.health == Health::Lost))
                .cloned()
                .collect();
            if !lost.is_empty() {
                let why =
                    format!("pnode(s) {} lost (silent past the heartbeat timeout or unreachable)", lost.join(", "));
                return act.recover(ctx, why, lost);
            }
            let leaving: Vec<String> = placed
                .iter()
                .filter(|id| by_id.get(id.as_str()).is_some_and(|p| p.health == Health::Draining))
                .cloned()
                .collect();
            if leaving.iter().any(|p| act.evacuating.insert(p.clone())) {
                act.log(format!(
                    "pnode(s) {} leaving; moving their VNodes at the next drained step",
                    leaving.join(", ")
                ));
                act.pump(ctx);
            }
        }));
    }

    fn report_progress(&mut self) {
        let now = Instant::now();
        let (mark, at) = self.rate_mark;
        let dt = now.duration_since(mark).as_secs_f64();
        if dt >= 1.0 && self.stage == Stage::Training {
            let batch = self.spec.graph.spec.training.batch_size as f64;
            self.samples_per_s = self.completed.saturating_sub(at) as f64 * batch / dt;
            self.rate_mark = (now, self.completed);
            self.metrics.samples_per_s.push((self.started.elapsed().as_secs_f64(), self.samples_per_s));
        }
        if self.loss_window.1 > 0 {
            self.last_loss = Some((self.loss_window.0 / self.loss_window.1 as f64) as f32);
            self.loss_window = (0.0, 0);
        }
        if self.stage == Stage::Training {
            let _ = self.events.send(JobEvent::Progress {
                step: self.completed,
                steps_total: self.spec.steps,
                loss: self.last_loss.unwrap_or(f32::NAN),
                samples_per_s: self.samples_per_s,
                epoch: self.plan.epoch_of(self.completed) as u32,
            });
        }
        self.push_status();
    }

    /// Silence after which the job asks its PNodes what is going on: far longer than a step
    /// normally takes, and never longer than the step deadline.
    fn idle_limit(&self) -> Duration {
        let typical = Duration::from_secs_f64(self.step_interval.unwrap_or(0.0) * 20.0);
        typical.max(MIN_IDLE).min(self.spec.step_deadline)
    }

    /// No progress for a while: asks every PNode of the job whether it answers and whether its
    /// VNodes do. A PNode that does not answer has failed; one whose VNode stays busy past the
    /// step deadline has too. If everything answers and is idle, a message was lost (a broken
    /// connection takes what it buffered with it), and the job rolls back on the same PNodes.
    fn probe(&mut self, ctx: &mut Context<Self>) {
        self.probing = true;
        self.next_probe = Instant::now() + self.idle_limit();
        let job = self.spec.job_id.clone();
        let generation = self.generation;
        let pnodes: BTreeMap<String, String> =
            self.placement.values().map(|p| (p.id.clone(), p.endpoint.clone())).collect();
        let fut = async move {
            let calls = pnodes.into_iter().map(|(id, endpoint)| {
                let job = job.clone();
                async move {
                    let busy = async {
                        let mut c = pnode_client(&endpoint).map_err(|e| e.to_string())?;
                        let mut req = tonic::Request::new(v1::PingRequest { payload: None, job_id: job });
                        req.set_timeout(PROBE_TIMEOUT);
                        let r = c.ping(req).await.map_err(|s| s.message().to_string())?.into_inner();
                        Ok::<_, String>(r.busy_vnodes)
                    };
                    (id, busy.await)
                }
            });
            futures::future::join_all(calls).await
        };
        ctx.spawn(fut.into_actor(self).map(move |answers, act, ctx| {
            act.probing = false;
            if act.generation != generation || act.last_activity.elapsed() <= act.idle_limit() {
                return;
            }
            let mut bad = Vec::new();
            let mut why = Vec::new();
            let mut busy_within_deadline = false;
            let overdue = act.last_activity.elapsed() > act.spec.step_deadline;
            for (id, a) in answers {
                match a {
                    Err(e) => {
                        why.push(format!("{id} does not answer ({e})"));
                        act.registry.do_send(MarkLost(id.clone()));
                        bad.push(id);
                    }
                    Ok(busy) if !busy.is_empty() && overdue => {
                        why.push(format!("{id} is stuck in vnode(s) {busy:?}"));
                        bad.push(id);
                    }
                    // Slow is not failed until the step deadline passes.
                    Ok(busy) if !busy.is_empty() => busy_within_deadline = true,
                    Ok(_) => {}
                }
            }
            if bad.is_empty() && busy_within_deadline {
                return;
            }
            let reason =
                if why.is_empty() { "a message was lost (every pnode answers)".to_string() } else { why.join("; ") };
            let silent = act.last_activity.elapsed();
            act.recover(ctx, format!("no progress for {:.1}s: {reason}", silent.as_secs_f64()), bad);
        }));
    }
}

/// Why the final parameters could not be collected.
enum CollectError {
    /// A PNode did not answer (a recovery repairs this).
    Unreachable(String, String),
    /// A PNode answered with something that is not parameters.
    Invalid(String),
}

/// Shortest silence that makes a job probe its PNodes.
const MIN_IDLE: Duration = Duration::from_secs(2);

/// How long a probed PNode (and each of its VNodes) may take to answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Deadline of snapshot and parameter calls; a PNode slower than this has failed the placement.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why VNodes could not be placed.
#[derive(Debug)]
pub enum PlaceError {
    /// Not enough suitable PNodes before the deadline.
    Capacity(String),
    /// A PNode refused or failed the allocation.
    Allocate {
        /// The PNode.
        pnode: String,
        /// Its answer.
        why: String,
    },
}

/// What a placement must respect.
#[derive(Debug, Clone)]
struct PlacementRequest {
    generation: u32,
    exclude: BTreeSet<String>,
    deadline: Instant,
    min_pnodes: usize,
    /// How many of the suitable PNodes this execution may take.
    share: replication::Share,
    /// Only PNodes of this determinism class (a replica's).
    class: Option<String>,
    /// Avoid the machines of the excluded PNodes too, where known (a replica's).
    avoid_hosts: bool,
}

/// Stops a job's VNodes on the given PNodes, best effort and briefly: a PNode that does not
/// answer is dead or hung, and its messages are stale either way.
async fn release_everywhere(job: &str, endpoints: BTreeSet<String>) {
    let calls = endpoints.into_iter().map(|e| async move {
        if let Ok(mut c) = pnode_client(&e) {
            let mut req = tonic::Request::new(v1::ReleaseRequest { job_id: job.to_string() });
            req.set_timeout(Duration::from_millis(500));
            if let Err(s) = c.release(req).await {
                tracing::debug!(endpoint = %e, status = %s, "release failed");
            }
        }
    });
    futures::future::join_all(calls).await;
}

/// The event for a snapshot written (or not) at `step`.
fn checkpoint_event<E: std::fmt::Display>(job: &str, step: u64, written: &Result<String, E>, text: &str) -> NewEvent {
    let e = match written {
        Ok(h) => NewEvent::new("checkpoint", text).data(serde_json::json!({ "step": step, "manifest": h })),
        Err(err) => NewEvent::new("checkpoint_failed", text)
            .severity(Severity::Error)
            .data(serde_json::json!({ "step": step, "error": err.to_string() })),
    };
    e.job(job)
}

/// A client for a PNode's service with the protocol's limits.
pub fn pnode_client(endpoint: &str) -> Result<PNodeClient<tonic::transport::Channel>, tonic::transport::Error> {
    let channel = dcnr_proto::transport::unary_endpoint(endpoint)?.connect_lazy();
    Ok(PNodeClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// Memory and work estimates of each VNode, for placement.
fn demands(spec: &JobSpec) -> Vec<Demand> {
    let batch = spec.graph.spec.training.batch_size as u64;
    spec.graph
        .topo
        .iter()
        .map(|&id| {
            let n = &spec.graph.nodes[id as usize];
            let vspec = dcnr_vnode::VNodeSpec {
                node: n.clone(),
                optimizer: spec.graph.spec.optimizer,
                root_seed: spec.root_seed,
                in_flight: spec.in_flight,
            };
            Demand {
                vnode: id,
                work: n.kind.param_count() as u64 + batch * n.output_width as u64,
                memory: vspec.memory_estimate(batch as usize),
            }
        })
        .collect()
}

async fn place_and_allocate(
    spec: JobSpec,
    registry: Addr<Registry>,
    req: PlacementRequest,
) -> Result<BTreeMap<u32, PNodeView>, PlaceError> {
    let started = Instant::now();
    let (healthy, assignment) = loop {
        let snap =
            registry.send(Snapshot).await.map_err(|e| PlaceError::Capacity(format!("registry unavailable: {e}")))?;
        let target = spec.envelope.policy.target;
        // Quarantined identities get no work.
        let suitable_now = |p: &PNodeView| {
            p.health == Health::Healthy
                && (target != Target::Gpu || !p.caps.gpu.is_empty())
                && req.class.as_ref().is_none_or(|c| *c == p.caps.determinism_class)
                && p.standing != crate::trust::Standing::Quarantined
        };
        // Replicas of this job's segments need PNodes of their own: the share counts them all.
        let snap_suitable = snap.iter().filter(|p| suitable_now(p)).count();
        // A replica keeps off the machines of the PNodes it avoids: one machine, one vote.
        let hosts: BTreeSet<String> = if req.avoid_hosts {
            snap.iter()
                .filter(|p| req.exclude.contains(&p.id))
                .filter_map(|p| crate::verify::host_of(&p.endpoint))
                .collect()
        } else {
            BTreeSet::new()
        };
        let on_avoided_host = |p: &PNodeView| crate::verify::host_of(&p.endpoint).is_some_and(|h| hosts.contains(&h));
        let healthy: Vec<PNodeView> = snap
            .into_iter()
            .filter(|p| suitable_now(p) && !req.exclude.contains(&p.id) && !on_avoided_host(p))
            .collect();
        let offers: Vec<Offer> = healthy
            .iter()
            .map(|p| Offer { pnode: p.id.clone(), cores: p.caps.cores, memory: p.caps.memory_bytes })
            .collect();
        // Too few PNodes, or too little memory on them, is waited out: capacity may come back.
        let why = if healthy.is_empty() || healthy.len() < req.min_pnodes {
            format!(
                "{} suitable healthy pnode(s) (target {:?}); the job needs at least {}",
                healthy.len(),
                target,
                req.min_pnodes.max(1)
            )
        } else {
            let suitable = snap_suitable;
            match placement::place(&demands(&spec), &offers, spec.max_pnodes.min(req.share.of(suitable))) {
                Ok(a) => break (healthy, a),
                Err(e) => e.to_string(),
            }
        };
        if Instant::now() > req.deadline {
            return Err(PlaceError::Capacity(format!("{why} (waited {:?})", started.elapsed())));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let by_id: HashMap<&str, &PNodeView> = healthy.iter().map(|p| (p.id.as_str(), p)).collect();
    let mut groups: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (v, p) in &assignment {
        groups.entry(p.clone()).or_default().push(*v);
    }
    let graph_json = serde_json::to_string(&spec.graph).map_err(|e| PlaceError::Capacity(e.to_string()))?;
    let calls = groups.iter().map(|(pnode, vnodes)| {
        let endpoint = by_id.get(pnode.as_str()).map(|p| p.endpoint.clone()).unwrap_or_default();
        let req = v1::AllocateRequest {
            job_id: spec.job_id.clone(),
            graph_json: graph_json.clone(),
            root_seed: spec.root_seed,
            in_flight: spec.in_flight,
            generation: req.generation,
            vnodes: vnodes
                .iter()
                .map(|&vnode| v1::VNodeAssignment {
                    vnode,
                    state: spec.resume.as_ref().and_then(|r| r.states.get(&vnode).cloned()).unwrap_or_default(),
                })
                .collect(),
        };
        let pnode = pnode.clone();
        async move {
            let fail = |why: String| PlaceError::Allocate { pnode: pnode.clone(), why };
            let mut c = pnode_client(&endpoint).map_err(|e| fail(format!("{endpoint}: {e}")))?;
            let mut req = tonic::Request::new(req);
            req.set_timeout(SNAPSHOT_TIMEOUT);
            c.allocate(req).await.map_err(|s| fail(format!("allocating on {endpoint}: {}", s.message())))?;
            Ok::<_, PlaceError>(())
        }
    });
    for r in futures::future::join_all(calls).await {
        r?;
    }
    Ok(assignment.into_iter().filter_map(|(v, p)| by_id.get(p.as_str()).map(|view| (v, (*view).clone()))).collect())
}

impl Actor for JobActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.push_status();
        ctx.run_interval(Duration::from_millis(100), |act, ctx| act.tick(ctx));
        if let Role::Replica(of) = &self.spec.role {
            self.excluded = of.exclude.clone();
        }
        let request = self.placement_request(Instant::now() + self.spec.placement_timeout, self.spec.min_pnodes);
        let fut = place_and_allocate(self.spec.clone(), self.registry.clone(), request);
        ctx.wait(fut.into_actor(self).map(|res, act, ctx| act.on_placed(res, ctx)));
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        // The job's arbiter exists for this actor alone.
        Arbiter::current().stop();
    }
}

impl Handler<crate::job_table::Evacuate> for JobActor {
    type Result = ();

    fn handle(&mut self, msg: crate::job_table::Evacuate, ctx: &mut Context<Self>) {
        let hosts = self.placement.values().any(|p| p.id == msg.0);
        if hosts && self.stage != Stage::Ended && self.evacuating.insert(msg.0.clone()) {
            self.log(format!("pnode {} is leaving; moving its VNodes at the next drained step", msg.0));
            self.pump(ctx);
        }
    }
}

impl Handler<Report> for JobActor {
    type Result = ();

    fn handle(&mut self, r: Report, ctx: &mut Context<Self>) {
        if self.stage == Stage::Ended {
            return;
        }
        if r.generation != self.generation || self.stage == Stage::Recovering {
            // From before a relocation: that work was rolled back and is being done again.
            self.stale_reports += 1;
            return;
        }
        self.last_activity = Instant::now();
        if !self.screen_report(ctx, &r) {
            return;
        }
        match r.body {
            ReportBody::Done { compute_us, cpu_us, bytes_in, bytes_out, output_sha256 } => {
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
                let n = self.spec.graph.nodes.len();
                let by = self.done.entry(r.mb).or_default();
                by.insert(r.vnode);
                if by.len() == n {
                    self.done.remove(&r.mb);
                    self.finished_mbs.insert(r.mb);
                    while self.finished_mbs.remove(&self.completed) {
                        self.completed += 1;
                        let dt = self.last_step_at.elapsed().as_secs_f64();
                        self.last_step_at = Instant::now();
                        self.step_interval = Some(self.step_interval.map_or(dt, |s| 0.9 * s + 0.1 * dt));
                    }
                    if let Some(since) = self.recovery_started.take()
                        && let Some(r) = self.recoveries.last_mut()
                    {
                        r.first_step_s = Some(since.elapsed().as_secs_f64());
                    }
                }
            }
            ReportBody::Loss { phase: Phase::Train, loss, .. } => {
                self.metrics.train_loss.push((r.mb, loss));
                self.loss_window.0 += f64::from(loss);
                self.loss_window.1 += 1;
            }
            ReportBody::Loss { phase: Phase::Eval, loss, correct, count } => {
                if let Some(ev) = self.eval.as_mut() {
                    ev.outstanding = ev.outstanding.saturating_sub(1);
                    ev.correct += u64::from(correct);
                    ev.count += u64::from(count);
                    ev.loss_sum += f64::from(loss) * f64::from(count);
                }
            }
            ReportBody::Failure(msg) => {
                let name = self.spec.graph.names().get(&r.vnode).cloned().unwrap_or_default();
                return self.fail(
                    ctx,
                    "vnode_failure",
                    format!("vnode {} ({name}) on {} failed: {msg}", r.vnode, r.pnode),
                );
            }
            // Refused in `screen_report`.
            ReportBody::Rejected { .. } => return,
        }
        self.pump(ctx);
    }
}

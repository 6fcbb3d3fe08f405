//! One actor per job: places its VNodes, feeds micro-batches, keeps `in_flight` of them in the
//! pipeline, evaluates on the test set at every epoch end, collects the parameters, and writes
//! the summary.
//!
//! Update order: every VNode applies the update of micro-batch j as its (j+1)-th update and runs
//! the forward of micro-batch m on parameter version max(0, m - in_flight + 1) (see
//! `dcnr_vnode::VNode`); the job only decides *when* micro-batches enter, never what they compute,
//! so results do not depend on message timing or placement.

use crate::artifacts::{JobRecord, ObjectStore, write_record};
use crate::checkpoints::{self, ResumeFrom};
use crate::data::Splits;
use crate::events::{EventLog, NewEvent, Severity};
use crate::jobs::{Jobs, Placed, StatusUpdate};
use crate::placement::{self, Demand, Offer};
use crate::registry::{Health, PNodeView, Registry, Snapshot};
use crate::status::{JobEvent, JobState, JobStatus};
use crate::summary::{JobSummary, params_hashes, vnode_summaries};
use actix::prelude::*;
use dcnr_model::ValidGraph;
use dcnr_model::envelope::{ArtifactKind, Envelope, Target};
use dcnr_model::graph::Source;
use dcnr_pnode::convert;
use dcnr_pnode::router::{Link, open_link};
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
    /// Fail when no step completes for this long.
    pub stall_timeout: Duration,
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
}

impl Message for Report {
    type Result = ();
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Placing,
    Training,
    Checkpointing,
    Evaluating,
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

/// Micro-batches of data sent ahead of the in-flight window.
const PREFETCH: u64 = 2;

/// Most eval micro-batches in the mesh at once.
const EVAL_WINDOW: usize = 4;

/// The actor driving one job.
pub struct JobActor {
    spec: JobSpec,
    registry: Addr<Registry>,
    jobs: Addr<Jobs>,
    data: Arc<Splits>,
    events: broadcast::Sender<JobEvent>,
    plan: BatchPlan,
    stage: Stage,
    placement: BTreeMap<u32, PNodeView>,
    links: HashMap<String, Link>,
    feeders: Vec<(u32, u32, Source)>,
    fed: u64,
    completed: u64,
    done: BTreeMap<u64, u32>,
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
        jobs: Addr<Jobs>,
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
            spec,
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
        }
        self
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

    /// Takes a snapshot of every (drained) VNode, then trains on while it uploads.
    fn take_checkpoint(&mut self, ctx: &mut Context<Self>) {
        self.stage = Stage::Checkpointing;
        let step = self.completed;
        let job = self.spec.job_id.clone();
        let targets: Vec<(u32, String)> = self.placement.iter().map(|(v, p)| (*v, p.endpoint.clone())).collect();
        let fut = async move {
            let mut states = Vec::with_capacity(targets.len());
            for (vnode, endpoint) in targets {
                let mut c = pnode_client(&endpoint).map_err(|e| format!("{endpoint}: {e}"))?;
                let r = c
                    .snapshot(v1::SnapshotRequest { job_id: job.clone(), vnode })
                    .await
                    .map_err(|s| format!("snapshot of vnode {vnode} on {endpoint}: {}", s.message()))?;
                states.push((vnode, r.into_inner().state));
            }
            Ok::<_, String>(states)
        };
        ctx.wait(fut.into_actor(self).map(move |res, act, ctx| match res {
            Ok(states) => {
                act.last_checkpoint = Some(step);
                act.last_checkpoint_at = Instant::now();
                if let Some(store) = act.spec.store.clone() {
                    let (events, log) = (act.events.clone(), act.spec.events.clone());
                    let snapshot = checkpoints::Snapshot {
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
                act.stage = Stage::Training;
                act.pump(ctx);
            }
            Err(e) => act.fail(ctx, "checkpoint", e),
        }));
    }

    fn status(&self) -> JobStatus {
        let state = match self.stage {
            Stage::Placing => JobState::Pending,
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
        self.error = Some(why);
        self.error_code = Some(code);
        self.finish(ctx, None);
    }

    fn on_placed(&mut self, placed: Result<BTreeMap<u32, PNodeView>, String>, ctx: &mut Context<Self>) {
        let placement = match placed {
            Ok(p) => p,
            Err(e) => return self.fail(ctx, "placement", e),
        };
        let names = self.spec.graph.names();
        let text: Vec<String> = placement
            .iter()
            .map(|(v, p)| format!("{}->{}", names.get(v).map(String::as_str).unwrap_or("?"), p.id))
            .collect();
        self.log(format!("placed {} VNodes: {}", placement.len(), text.join(", ")));
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
        self.executions = placement
            .iter()
            .map(|(v, p)| {
                let e = Execution {
                    vnode: *v,
                    name: names.get(v).cloned().unwrap_or_default(),
                    pnode: p.id.clone(),
                    endpoint: p.endpoint.clone(),
                    determinism_class: p.caps.determinism_class.clone(),
                    ..Execution::default()
                };
                (*v, e)
            })
            .collect();
        self.placement = placement;
        self.stage = Stage::Training;
        self.train_mark = Some(Instant::now());
        self.rate_mark = (Instant::now(), 0);
        ctx.run_interval(Duration::from_millis(250), |act, ctx| act.tick(ctx));
        self.push_status();
        self.pump(ctx);
    }

    fn push_status(&self) {
        self.jobs.do_send(StatusUpdate(self.status()));
    }

    fn send_data(&mut self, mb: u64, phase: Phase, features: &HostTensor, labels: &HostTensor) -> Result<(), String> {
        for (vnode, port, src) in &self.feeders {
            let tensor = if *src == Source::Labels { labels } else { features };
            let msg = convert::forward_message(&self.spec.job_id, *vnode, mb, phase, *port, tensor);
            let endpoint = self.placement.get(vnode).map(|p| p.endpoint.as_str()).unwrap_or("");
            let link = self.links.get(endpoint).ok_or_else(|| format!("no link to the pnode of vnode {vnode}"))?;
            link.try_send(msg).map_err(|e| format!("cannot feed vnode {vnode} at {endpoint}: {e}"))?;
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
                        if c.every_s.is_some_and(|s| self.last_checkpoint_at.elapsed() >= Duration::from_secs(s)) {
                            limit = limit.min(self.fed.max(self.completed + 1));
                        }
                    }
                    let k = self.spec.in_flight as u64;
                    // Data may arrive up to PREFETCH steps early: VNodes hold it until the update
                    // order lets them run, so feeding never sits on a step's critical path.
                    while self.fed < limit && self.fed < self.completed + k + PREFETCH {
                        let idx = self.plan.indices(self.fed);
                        let (x, y) = self.batch(&self.data.train, &idx);
                        if let Err(e) = self.send_data(self.fed, Phase::Train, &x, &y) {
                            return self.fail(ctx, "feed", e);
                        }
                        self.fed += 1;
                    }
                    if self.completed < limit {
                        return;
                    }
                    if self.checkpoint_due(self.completed) {
                        return self.take_checkpoint(ctx);
                    }
                    let epoch_end = self.completed.is_multiple_of(spe) || self.completed >= self.spec.steps;
                    if !epoch_end {
                        // A drained point for a snapshot only; training goes on.
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
                            return self.fail(ctx, "feed", e);
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
                        self.stage = Stage::Collecting;
                        self.collect(ctx);
                        return;
                    }
                    self.stage = Stage::Training;
                    self.train_mark = Some(Instant::now());
                }
                _ => return,
            }
        }
    }

    fn collect(&mut self, ctx: &mut Context<Self>) {
        let job = self.spec.job_id.clone();
        let targets: Vec<(u32, String)> = self.placement.iter().map(|(v, p)| (*v, p.endpoint.clone())).collect();
        let fut = async move {
            let mut all = Vec::with_capacity(targets.len());
            for (vnode, endpoint) in targets {
                let mut client = pnode_client(&endpoint).map_err(|e| format!("{endpoint}: {e}"))?;
                let r = client
                    .fetch_params(v1::FetchParamsRequest { job_id: job.clone(), vnode })
                    .await
                    .map_err(|s| format!("fetching parameters of vnode {vnode} from {endpoint}: {}", s.message()))?
                    .into_inner();
                let mut ps = Vec::with_capacity(r.params.len());
                for t in &r.params {
                    let t = convert::tensor_from_wire(Some(t)).map_err(|e| format!("vnode {vnode} parameters: {e}"))?;
                    match t.data {
                        HostData::F32(v) => ps.push(v),
                        HostData::I32(_) => return Err(format!("vnode {vnode} sent integer parameters")),
                    }
                }
                all.push(ps);
            }
            Ok::<_, String>(all)
        };
        ctx.wait(fut.into_actor(self).map(|res, act, ctx| match res {
            Ok(params) => act.finish(ctx, Some(params)),
            Err(e) => act.fail(ctx, "collect", e),
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
        let now = Instant::now();
        let (mark, at) = self.rate_mark;
        let dt = now.duration_since(mark).as_secs_f64();
        if dt >= 1.0 && self.stage == Stage::Training {
            let batch = self.spec.graph.spec.training.batch_size as f64;
            self.samples_per_s = (self.completed - at) as f64 * batch / dt;
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
        if self.last_activity.elapsed() > self.spec.stall_timeout {
            let why = format!(
                "no progress for {:?} (stage {:?}, {} of {} steps done)",
                self.spec.stall_timeout, self.stage, self.completed, self.spec.steps
            );
            return self.fail(ctx, "stalled", why);
        }
        if self.started.elapsed() > self.spec.timeout {
            let why = format!(
                "the job exceeded its timeout of {:?} ({} of {} steps done)",
                self.spec.timeout, self.completed, self.spec.steps
            );
            return self.fail(ctx, "timeout", why);
        }
        let placed: BTreeSet<String> = self.placement.values().map(|p| p.id.clone()).collect();
        ctx.spawn(self.registry.send(Snapshot).into_actor(self).map(move |snap, act, ctx| {
            let Ok(snap) = snap else { return };
            if let Some(lost) = snap.iter().find(|p| placed.contains(&p.id) && p.health == Health::Lost) {
                let why = format!("pnode {} ({}) stopped heartbeating; its VNodes are lost", lost.id, lost.endpoint);
                act.fail(ctx, "pnode_lost", why);
            }
        }));
    }
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

async fn place_and_allocate(spec: JobSpec, registry: Addr<Registry>) -> Result<BTreeMap<u32, PNodeView>, String> {
    let deadline = Instant::now() + spec.placement_timeout;
    let healthy = loop {
        let snap = registry.send(Snapshot).await.map_err(|e| format!("registry unavailable: {e}"))?;
        let target = spec.envelope.policy.target;
        let healthy: Vec<PNodeView> = snap
            .into_iter()
            .filter(|p| p.health == Health::Healthy && (target != Target::Gpu || !p.caps.gpu.is_empty()))
            .collect();
        if !healthy.is_empty() && healthy.len() >= spec.min_pnodes {
            break healthy;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} suitable healthy pnode(s) (target {:?}) within {:?}; the job needs at least {}",
                healthy.len(),
                target,
                spec.placement_timeout,
                spec.min_pnodes.max(1)
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let offers: Vec<Offer> = healthy
        .iter()
        .map(|p| Offer { pnode: p.id.clone(), cores: p.caps.cores, memory: p.caps.memory_bytes })
        .collect();
    let assignment = placement::place(&demands(&spec), &offers, spec.max_pnodes).map_err(|e| e.to_string())?;
    let by_id: HashMap<&str, &PNodeView> = healthy.iter().map(|p| (p.id.as_str(), p)).collect();
    let mut groups: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (v, p) in &assignment {
        groups.entry(p.clone()).or_default().push(*v);
    }
    let graph_json = serde_json::to_string(&spec.graph).map_err(|e| e.to_string())?;
    let calls = groups.iter().map(|(pnode, vnodes)| {
        let endpoint = by_id.get(pnode.as_str()).map(|p| p.endpoint.clone()).unwrap_or_default();
        let req = v1::AllocateRequest {
            job_id: spec.job_id.clone(),
            graph_json: graph_json.clone(),
            root_seed: spec.root_seed,
            in_flight: spec.in_flight,
            vnodes: vnodes
                .iter()
                .map(|&vnode| v1::VNodeAssignment {
                    vnode,
                    state: spec.resume.as_ref().and_then(|r| r.states.get(&vnode).cloned()).unwrap_or_default(),
                })
                .collect(),
        };
        async move {
            let mut c = pnode_client(&endpoint).map_err(|e| format!("{endpoint}: {e}"))?;
            c.allocate(req).await.map_err(|s| format!("allocating on {endpoint}: {}", s.message()))?;
            Ok::<_, String>(())
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
        let fut = place_and_allocate(self.spec.clone(), self.registry.clone());
        ctx.wait(fut.into_actor(self).map(|res, act, ctx| act.on_placed(res, ctx)));
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        // The job's arbiter exists for this actor alone.
        Arbiter::current().stop();
    }
}

impl Handler<Report> for JobActor {
    type Result = ();

    fn handle(&mut self, r: Report, ctx: &mut Context<Self>) {
        if self.stage == Stage::Ended {
            return;
        }
        self.last_activity = Instant::now();
        match r.body {
            ReportBody::Done { compute_us, cpu_us, bytes_in, bytes_out, output_sha256 } => {
                if let Some(e) = self.executions.get_mut(&r.vnode) {
                    e.steps += 1;
                    e.compute_s += compute_us as f64 / 1e6;
                    e.cpu_s += cpu_us as f64 / 1e6;
                    e.bytes_in += bytes_in;
                    e.bytes_out += bytes_out;
                    // Done reports of one VNode arrive in step order (one stream, in-order updates).
                    e.output_sha256.push(output_sha256);
                }
                let n = self.spec.graph.nodes.len() as u32;
                let c = self.done.entry(r.mb).or_insert(0);
                *c += 1;
                if *c == n {
                    self.done.remove(&r.mb);
                    self.finished_mbs.insert(r.mb);
                    while self.finished_mbs.remove(&self.completed) {
                        self.completed += 1;
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
        }
        self.pump(ctx);
    }
}

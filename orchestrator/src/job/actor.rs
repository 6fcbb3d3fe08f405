//! The job actor: owns a [`JobCore`], feeds it inputs (reports, ticks, answers of the exchanges
//! it started) with the time, and carries out the effects the core decides. It decides nothing.

use super::core::{DataSizes, Effect, Input, JobCore, PNodeFailure};
use super::pnodes::{self, AllocateCommon, DataLinks};
use super::segments::ReplicaDone;
use super::{JobKind, JobSpec, Observation};
use crate::artifacts::{ObjectStore, write_record};
use crate::checkpoints;
use crate::data::{DataCache, Packed};
use crate::events::{EventLog, NewEvent, Severity};
use crate::job_table::{JobTable, Placed, RouteReplica, StatusUpdate};
use crate::registry::{ListPNodes, MarkLost, RecordOutcome, Registry};
use crate::status::JobEvent;
use crate::trust::{Outcome, Transition};
use actix::prelude::*;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

/// How often the core is ticked.
const TICK: Duration = Duration::from_millis(100);

/// What a job actor works with besides its spec.
#[derive(Clone)]
pub struct JobServices {
    /// The PNode registry.
    pub registry: Addr<Registry>,
    /// The job table (placements, statuses, replica routing).
    pub jobs: Addr<JobTable>,
    /// The datasets; the job publishes its dataset's pack, which the PNodes reading data fetch.
    pub data: DataCache,
    /// The job's watchers.
    pub watchers: broadcast::Sender<JobEvent>,
    /// Where checkpoints and artifacts go (none: keep nothing).
    pub store: Option<Arc<dyn ObjectStore>>,
    /// The mesh's event log.
    pub events: EventLog,
    /// This orchestrator's instance id, which allocations and releases name to PNodes.
    pub instance: String,
}

/// The actor driving one job.
pub struct JobActor {
    core: JobCore,
    services: JobServices,
    origin: Instant,
    links: DataLinks,
    /// Snapshot uploads still running; the job's record waits for them.
    uploads: Vec<tokio::task::JoinHandle<()>>,
    /// Running replicas of this job's segments, by job id.
    replicas: HashMap<String, Addr<JobActor>>,
    /// Who a replica answers.
    parent: Option<Recipient<ReplicaDone>>,
    /// A generation whose feeding failed: its remaining feeds are dropped.
    failed_feed: Option<u32>,
    queue: VecDeque<Input>,
    running: bool,
    /// The job's dataset pack (none if it could not be built: allocations then name no pack,
    /// and the PNodes refuse them saying so).
    dataset: Option<Arc<Packed>>,
}

impl JobActor {
    /// A job actor that starts working when started; a replica answers `parent`.
    pub fn new(spec: JobSpec, services: JobServices, parent: Option<Recipient<ReplicaDone>>) -> JobActor {
        let mut services = services;
        if !spec.persist {
            services.store = None;
        }
        // Built (once per dataset) here, on the job's own thread: hashing a pack must not hold up
        // the job table and the registry.
        let name = &spec.graph.spec.data.dataset;
        let dataset = services
            .data
            .publish(name)
            .inspect_err(|e| tracing::error!(job = %spec.job_id, error = %e, "cannot publish the job's dataset"))
            .ok();
        let sizes = match &dataset {
            Some(p) => DataSizes { train: p.train, test: p.test },
            None => services
                .data
                .get(name)
                .map(|s| DataSizes { train: s.train.len(), test: s.test.len() })
                .unwrap_or(DataSizes { train: 0, test: 0 }),
        };
        JobActor {
            core: JobCore::new(spec, sizes, Duration::ZERO),
            services,
            origin: Instant::now(),
            links: DataLinks::default(),
            uploads: Vec::new(),
            replicas: HashMap::new(),
            parent,
            failed_feed: None,
            queue: VecDeque::new(),
            running: false,
            dataset,
        }
    }

    fn job_id(&self) -> &str {
        &self.core.spec().job_id
    }

    /// Hands `input` to the core and carries out what it decides, until nothing is left.
    fn input(&mut self, ctx: &mut Context<Self>, input: Input) {
        self.queue.push_back(input);
        if self.running {
            return;
        }
        self.running = true;
        while let Some(next) = self.queue.pop_front() {
            self.core.step(next, self.origin.elapsed());
            for e in self.core.take_effects() {
                self.run(ctx, e);
            }
        }
        self.running = false;
    }

    fn run(&mut self, ctx: &mut Context<Self>, effect: Effect) {
        match effect {
            Effect::ListPNodes { generation } => {
                ctx.spawn(self.services.registry.send(ListPNodes).into_actor(self).map(move |view, act, ctx| {
                    if let Ok(view) = view {
                        act.input(ctx, Input::View { view, generation });
                    }
                }));
            }
            Effect::Release { endpoints, generation } => {
                let job = self.job_id().to_string();
                let instance = self.services.instance.clone();
                let fut = async move { pnodes::release_everywhere(&job, &instance, endpoints, true).await };
                ctx.spawn(fut.into_actor(self).map(move |_, act, ctx| act.input(ctx, Input::Released { generation })));
            }
            Effect::Allocate { generation, allocations } => {
                let spec = self.core.spec();
                let graph_json = match serde_json::to_string(&spec.graph) {
                    Ok(j) => j,
                    Err(e) => {
                        let failure = PNodeFailure { pnode: String::new(), why: e.to_string() };
                        return self.queue.push_back(Input::Allocated { generation, result: Err(failure) });
                    }
                };
                let readers = spec
                    .graph
                    .nodes
                    .iter()
                    .filter(|n| n.inputs.iter().any(|s| !matches!(s, dcnr_model::graph::Source::Node(_))))
                    .map(|n| n.id)
                    .collect();
                let dataset = self
                    .dataset
                    .as_ref()
                    .map(|d| pnodes::DatasetRef { sha256: d.sha256.clone(), bytes: d.bytes.len() as u64 });
                let common = AllocateCommon {
                    job_id: spec.job_id.clone(),
                    graph_json,
                    root_seed: spec.root_seed,
                    in_flight: spec.in_flight,
                    generation,
                    dataset,
                    readers,
                    train_samples: self.core.train_samples() as u64,
                    seal_messages: self.core.seals_messages(),
                    serving: false,
                    orchestrator_id: self.services.instance.clone(),
                };
                ctx.spawn(pnodes::allocate_all(common, allocations).into_actor(self).map(move |result, act, ctx| {
                    act.input(ctx, Input::Allocated { generation, result });
                }));
            }
            Effect::Placed { locations } => {
                self.services.jobs.do_send(Placed { job_id: self.job_id().to_string(), locations });
            }
            Effect::Feed { generation, mb, phase, batch, targets } => {
                if self.failed_feed == Some(generation) {
                    return;
                }
                let job = self.core.spec().job_id.clone();
                for t in &targets {
                    if let Err(why) = self.links.send(&job, generation, t, mb, phase, batch) {
                        self.failed_feed = Some(generation);
                        let failure = PNodeFailure { pnode: t.at.pnode.clone(), why };
                        self.queue.push_back(Input::FeedFailed { generation, failure });
                        return;
                    }
                }
            }
            Effect::DropLinks => self.links.clear(),
            Effect::FetchStates { generation, targets } => {
                let fut = pnodes::fetch_states(self.job_id().to_string(), targets);
                ctx.spawn(fut.into_actor(self).map(move |result, act, ctx| {
                    act.input(ctx, Input::StatesFetched { generation, result });
                }));
            }
            Effect::FetchParams { generation, targets } => {
                let fut = pnodes::fetch_params(self.job_id().to_string(), targets);
                ctx.spawn(fut.into_actor(self).map(move |result, act, ctx| {
                    act.input(ctx, Input::ParamsFetched { generation, result });
                }));
            }
            Effect::Probe { generation, pnodes } => {
                let fut = pnodes::probe(self.job_id().to_string(), pnodes);
                ctx.spawn(fut.into_actor(self).map(move |answers, act, ctx| {
                    act.input(ctx, Input::ProbeAnswered { generation, answers });
                }));
            }
            Effect::MarkLost(pnode) => self.services.registry.do_send(MarkLost(pnode)),
            Effect::Credit(pnode) => self.services.registry.do_send(RecordOutcome { pnode, outcome: Outcome::Valid }),
            Effect::Strike { pnode, reason, at_step } => {
                let msg = RecordOutcome { pnode: pnode.clone(), outcome: Outcome::Invalid(reason) };
                ctx.spawn(self.services.registry.send(msg).into_actor(self).map(move |t, act, ctx| {
                    let transition = t.unwrap_or(Transition::None);
                    act.input(ctx, Input::StrikeRecorded { pnode, at_step, transition });
                }));
            }
            Effect::Checkpoint(snapshot) => self.upload(snapshot),
            Effect::StartReplica(spec) => self.start_replica(ctx, *spec),
            Effect::CancelReplica(id) => {
                if let Some(r) = self.replicas.remove(&id) {
                    r.do_send(Cancel);
                }
            }
            Effect::AnswerParent(done) => {
                if let Some(p) = &self.parent {
                    p.do_send(done);
                }
            }
            Effect::Log(text) => {
                tracing::info!(job = %self.job_id(), "{text}");
                let _ = self.services.watchers.send(JobEvent::Log(text));
            }
            Effect::Failed { code, why } => tracing::error!(job = %self.job_id(), code, error = %why, "job failed"),
            Effect::Event(e) => {
                self.services.events.push(e);
            }
            Effect::Watchers(e) => {
                let _ = self.services.watchers.send(e);
            }
            Effect::Status(s) => self.services.jobs.do_send(StatusUpdate(s)),
            Effect::Finish { status, record, release } => self.finish(ctx, status, record, release),
        }
    }

    /// Writes a checkpoint beside training; a slow store delays nothing but itself.
    fn upload(&mut self, snapshot: checkpoints::Checkpoint) {
        let Some(store) = self.services.store.clone() else { return };
        let (watchers, log) = (self.services.watchers.clone(), self.services.events.clone());
        self.uploads.retain(|h| !h.is_finished());
        self.uploads.push(actix::spawn(async move {
            let step = snapshot.step;
            let written = checkpoints::write_with_retry(store.as_ref(), &snapshot).await;
            let text = match &written {
                Ok(h) => format!("checkpoint at step {step}: manifest {h}"),
                Err(e) => format!("checkpoint at step {step} could not be written: {e}"),
            };
            log.push(checkpoint_event(&snapshot.job, step, &written, &text));
            tracing::info!(job = %snapshot.job, "{text}");
            let _ = watchers.send(JobEvent::Log(text));
        }));
    }

    fn start_replica(&mut self, ctx: &mut Context<Self>, spec: JobSpec) {
        let id = spec.job_id.clone();
        let mut services = self.services.clone();
        // A replica's watchers' events stay with it; nobody watches them.
        services.watchers = broadcast::channel(16).0;
        let parent = Some(ctx.address().recipient());
        let addr = JobActor::start_in_arbiter(&Arbiter::new().handle(), move |_| JobActor::new(spec, services, parent));
        self.services.jobs.do_send(RouteReplica(id.clone(), addr.clone()));
        self.replicas.insert(id, addr);
    }

    /// Waits for uploads, writes the record, clears the active mark, releases every VNode, then
    /// announces the end and stops.
    fn finish(
        &mut self,
        ctx: &mut Context<Self>,
        status: crate::status::JobStatus,
        record: Option<(crate::artifacts::JobRecord, super::record::Files)>,
        release: std::collections::BTreeSet<String>,
    ) {
        let job = self.job_id().to_string();
        let watchers = self.services.watchers.clone();
        let uploads = std::mem::take(&mut self.uploads);
        let store = self.services.store.clone();
        let primary = matches!(self.core.spec().kind, JobKind::Primary);
        let instance = self.services.instance.clone();
        let fut = async move {
            for u in uploads {
                let _ = u.await;
            }
            if let (Some(store), Some((record, files))) = (&store, record) {
                match write_record(store.as_ref(), record, files).await {
                    Ok(h) => {
                        let text = format!("artifacts: record {h} in {}", store.location());
                        tracing::info!(job = %job, "{text}");
                        let _ = watchers.send(JobEvent::Log(text));
                    }
                    Err(e) => tracing::error!(job = %job, error = %e, "cannot write artifacts"),
                }
            }
            // The job has ended: a restarted orchestrator must not run it again.
            if let Some(store) = store.filter(|_| primary)
                && let Err(e) = checkpoints::clear_active(store.as_ref(), &job).await
            {
                tracing::warn!(job = %job, error = %e, "cannot clear the job's active mark");
            }
            pnodes::release_everywhere(&job, &instance, release, false).await;
        };
        ctx.wait(fut.into_actor(self).map(move |_, act, ctx| {
            // The job table announces the end, so a watcher never misses it.
            act.services.jobs.do_send(StatusUpdate(status));
            ctx.stop();
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

impl Actor for JobActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.origin = Instant::now();
        if let (Some(store), Some(packed)) = (self.services.store.clone(), self.dataset.clone()) {
            // The store keeps the pack beside the job's artifacts; PNodes are served from memory.
            actix::spawn(async move {
                match crate::data::store_pack(store.as_ref(), &packed).await {
                    Ok(true) => {
                        tracing::info!(sha256 = %packed.sha256, bytes = packed.bytes.len(), "dataset pack stored")
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(sha256 = %packed.sha256, error = %e, "cannot store the dataset pack"),
                }
            });
        }
        ctx.run_interval(TICK, |act, ctx| act.input(ctx, Input::Tick));
        self.input(ctx, Input::Start);
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        // The job's arbiter exists for this actor alone.
        Arbiter::current().stop();
    }
}

impl Handler<crate::job_table::Evacuate> for JobActor {
    type Result = ();

    fn handle(&mut self, msg: crate::job_table::Evacuate, ctx: &mut Context<Self>) {
        self.input(ctx, Input::Evacuate(msg.0));
    }
}

impl Handler<Observation> for JobActor {
    type Result = ();

    fn handle(&mut self, r: Observation, ctx: &mut Context<Self>) {
        self.input(ctx, Input::Observation(r));
    }
}

impl Message for ReplicaDone {
    type Result = ();
}

impl Handler<ReplicaDone> for JobActor {
    type Result = ();

    fn handle(&mut self, msg: ReplicaDone, ctx: &mut Context<Self>) {
        self.replicas.remove(&msg.replica);
        self.input(ctx, Input::ReplicaDone(Box::new(msg)));
    }
}

/// Tells a replica job to stop: its segment was rolled back or its job ended.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Cancel;

impl Handler<Cancel> for JobActor {
    type Result = ();

    fn handle(&mut self, _: Cancel, ctx: &mut Context<Self>) {
        self.input(ctx, Input::Cancel);
    }
}

/// Another orchestrator owns the job now (it took the lease): stop driving it at once, writing
/// nothing. Its VNodes are left to the new owner, whose allocations replace them.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Relinquish;

impl Handler<Relinquish> for JobActor {
    type Result = ();

    fn handle(&mut self, _: Relinquish, ctx: &mut Context<Self>) {
        tracing::warn!(job = %self.job_id(), "another orchestrator owns this job now; stopping it here");
        self.links.clear();
        ctx.stop();
    }
}

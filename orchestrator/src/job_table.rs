//! The job table: accepts submissions, starts one [`JobActor`] per job on its own arbiter,
//! answers status queries, routes VNode reports, and resolves VNode locations.

use crate::artifacts::ObjectStore;
use crate::checkpoints::{self, ResumeFrom};
use crate::data::DataCache;
use crate::job::{JobActor, JobKind, JobServices, JobSpec, Observation};
use crate::lease::{Held, Leases, Renewal};
use crate::registry::Registry;
use crate::serve::{InferError, InferRows, Inferred, ServeActor, ServeLimits};
use crate::status::{JobEvent, JobState, JobStatus};
use crate::telemetry::Telemetry;
use actix::prelude::*;
use dcnr_model::envelope::{Envelope, EnvelopeError, SeedMode, SeedSpec};
use sha2::Digest;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

/// Settings every job inherits from the orchestrator.
#[derive(Debug, Clone)]
pub struct JobDefaults {
    /// A placement that completes no step for this long has failed; its VNodes are relocated.
    pub step_deadline: Duration,
    /// Take an in-memory recovery snapshot at least this often (zero: only with checkpoints).
    pub recovery_every: Duration,
    /// How long a job waits for a PNode.
    pub placement_timeout: Duration,
    /// Most PNodes one job spreads over.
    pub max_pnodes: usize,
}

/// Why a submission was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The envelope or its graph is invalid.
    #[error("invalid job: {0}")]
    Envelope(#[from] EnvelopeError),
    /// The job id is taken.
    #[error("job id {0} is already in use")]
    Duplicate(String),
    /// An override is out of range.
    #[error("invalid job setting: {0}")]
    Setting(String),
    /// The dataset cannot be loaded.
    #[error("dataset unavailable: {0}")]
    Data(String),
}

struct Entry {
    status: JobStatus,
    events: broadcast::Sender<JobEvent>,
    actor: Option<Addr<JobActor>>,
}

/// Actor owning every job's status.
pub struct JobTable {
    registry: Addr<Registry>,
    store: Option<Arc<dyn ObjectStore>>,
    /// Job ids the store already has records of (ids stay unique across restarts).
    recorded: std::collections::HashSet<String>,
    data: DataCache,
    defaults: JobDefaults,
    next: u64,
    jobs: BTreeMap<String, Entry>,
    locations: HashMap<(String, u32), String>,
    /// Replica jobs (re-executions of a job's segments), which are routed but not listed.
    replicas: HashMap<String, Addr<JobActor>>,
    /// Served models, by the job they were trained by.
    serving: HashMap<String, Addr<ServeActor>>,
    /// Job ownership among orchestrators sharing the store (none: this one owns every job).
    leases: Option<Arc<Leases>>,
    /// The leases this orchestrator holds, by job.
    held: HashMap<String, Held>,
    /// Whether a lease round is in progress (one at a time).
    lease_round: bool,
    serve_limits: ServeLimits,
    telemetry: Telemetry,
    /// This orchestrator's instance id, named in allocations and releases.
    instance: String,
}

impl JobTable {
    /// An empty table.
    pub fn new(
        registry: Addr<Registry>,
        data: DataCache,
        defaults: JobDefaults,
        store: Option<Arc<dyn ObjectStore>>,
        recorded: std::collections::HashSet<String>,
    ) -> JobTable {
        JobTable {
            registry,
            store,
            recorded,
            data,
            defaults,
            next: 1,
            jobs: BTreeMap::new(),
            locations: HashMap::new(),
            replicas: HashMap::new(),
            serving: HashMap::new(),
            leases: None,
            held: HashMap::new(),
            lease_round: false,
            serve_limits: ServeLimits::default(),
            telemetry: Telemetry::default(),
            instance: String::new(),
        }
    }

    /// Names this orchestrator `instance` to the PNodes it allocates on.
    pub fn with_instance(mut self, instance: String) -> JobTable {
        self.instance = instance;
        self
    }

    /// Owns jobs through `leases`, shared with other orchestrators using the same store.
    pub fn with_leases(mut self, leases: Leases) -> JobTable {
        self.leases = Some(Arc::new(leases));
        self
    }

    /// Serves models within `limits`.
    pub fn with_serve_limits(mut self, limits: ServeLimits) -> JobTable {
        self.serve_limits = limits;
        self
    }

    /// Reports submissions, placements and each job's events to `telemetry`.
    pub fn with_telemetry(mut self, telemetry: Telemetry) -> JobTable {
        self.telemetry = telemetry;
        self
    }
}

impl Actor for JobTable {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if let Some(leases) = &self.leases {
            // Renewed three times a term: one slow store call does not lose a job.
            ctx.run_interval(leases.term() / 3, |act, ctx| act.lease_round(ctx));
        }
    }
}

/// What one lease round found.
#[derive(Default)]
struct LeaseRound {
    /// Leases taken for jobs running here.
    taken: Vec<Held>,
    /// Jobs running here that another orchestrator owns now, and why.
    lost: Vec<(String, String)>,
    /// Jobs whose owner stopped renewing, taken over: to resume here.
    adopted: Vec<(Held, Envelope, Option<ResumeFrom>)>,
}

impl JobTable {
    /// Renews the leases of the jobs running here (a job whose lease another orchestrator took
    /// stops here), takes leases for jobs that have none yet, and takes over the jobs of
    /// orchestrators that stopped renewing theirs, resuming each from its newest checkpoint.
    fn lease_round(&mut self, ctx: &mut Context<Self>) {
        let (Some(leases), Some(store)) = (self.leases.clone(), self.store.clone()) else { return };
        if self.lease_round {
            return;
        }
        self.lease_round = true;
        let running: Vec<String> =
            self.jobs.iter().filter(|(_, e)| e.actor.is_some()).map(|(id, _)| id.clone()).collect();
        let held = self.held.clone();
        let round = async move {
            let mut out = LeaseRound::default();
            for job in &running {
                match held.get(job) {
                    Some(h) => match leases.renew(h).await {
                        Ok(Renewal::Renewed) => {}
                        Ok(Renewal::Lost { by_seq }) => {
                            out.lost.push((job.clone(), format!("another orchestrator took lease {by_seq}")))
                        }
                        Err(e) => tracing::warn!(%job, error = %e, "cannot renew the job's lease"),
                    },
                    None => match leases.take(job, false).await {
                        Ok(Some(h)) => out.taken.push(h),
                        Ok(None) => out.lost.push((job.clone(), "another orchestrator holds its lease".into())),
                        Err(e) => tracing::warn!(%job, error = %e, "cannot take the job's lease"),
                    },
                }
            }
            let active = match store.list_refs("active").await {
                Ok(names) => names,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list the running jobs in the store");
                    return out;
                }
            };
            for name in active {
                let Some(job) = name.strip_prefix("active/") else { continue };
                if running.iter().any(|r| r == job) {
                    continue;
                }
                // Only a job whose lease lapsed: one with none is being started by its owner.
                match leases.take(job, true).await {
                    Ok(Some(h)) => match checkpoints::load_active_job(store.as_ref(), job).await {
                        Ok(Some((envelope, from))) => out.adopted.push((h, envelope, from)),
                        Ok(None) => {
                            let _ = leases.release(job).await;
                        }
                        Err(e) => tracing::warn!(%job, error = %e, "cannot load a job to take over"),
                    },
                    Ok(None) => {}
                    Err(e) => tracing::warn!(%job, error = %e, "cannot take over the job's lease"),
                }
            }
            out
        };
        ctx.spawn(round.into_actor(self).map(|out, act, ctx| {
            act.lease_round = false;
            for h in out.taken {
                act.held.insert(h.job.clone(), h);
            }
            for (job, why) in out.lost {
                act.held.remove(&job);
                if let Some(e) = act.jobs.get_mut(&job) {
                    if let Some(a) = e.actor.take() {
                        a.do_send(crate::job::actor::Relinquish);
                    }
                    e.status.error = Some(format!("owned by another orchestrator: {why}"));
                }
                act.locations.retain(|k, _| k.0 != job);
                tracing::warn!(%job, %why, "job moved to another orchestrator");
            }
            for (h, mut envelope, from) in out.adopted {
                let job = h.job.clone();
                envelope.seed = SeedSpec { mode: SeedMode::Explicit, value: envelope.seed.value };
                envelope.ctx.job_id = Some(job.clone());
                let step = from.as_ref().map(|f| f.step).unwrap_or(0);
                match act.start_job(envelope, from, ctx) {
                    Ok(_) => {
                        act.held.insert(job.clone(), h);
                        tracing::warn!(%job, step, "took over a job whose orchestrator stopped renewing its lease");
                    }
                    Err(e) => tracing::error!(%job, error = %e, "cannot take over a job"),
                }
            }
        }));
    }
}

/// A submission.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<String, SubmitError>")]
pub struct Submit(pub Envelope);

impl Handler<Submit> for JobTable {
    type Result = Result<String, SubmitError>;

    fn handle(&mut self, msg: Submit, ctx: &mut Context<Self>) -> Self::Result {
        self.start_job(msg.0, None, ctx)
    }
}

impl JobTable {
    /// Validates a job and starts its actor; `resume` continues from a snapshot under the same id.
    fn start_job(
        &mut self,
        envelope: Envelope,
        resume: Option<ResumeFrom>,
        ctx: &mut Context<Self>,
    ) -> Result<String, SubmitError> {
        let resolved = envelope.resolve()?;
        let graph = resolved.graph;
        let data = self.data.get(&graph.spec.data.dataset).map_err(|e| SubmitError::Data(e.to_string()))?;
        if data.train.features() != graph.spec.data.feature_size {
            return Err(SubmitError::Setting(format!(
                "dataset {} has {} features per sample but the graph declares feature_size = {}",
                graph.spec.data.dataset,
                data.train.features(),
                graph.spec.data.feature_size
            )));
        }
        // PNodes build the job's micro-batches from the dataset's pack, which the job publishes
        // on its own thread (hashing it here would hold up the registry); it must be packable.
        dcnr_model::dataset::pack_len(&data).map_err(|e| SubmitError::Data(e.to_string()))?;
        let rounds = dcnr_vnode::rounds::RoundPlan::new(&graph, data.train.len());
        if rounds.steps_per_epoch() == 0 {
            return Err(SubmitError::Setting(format!(
                "{} training samples make fewer batches of {} than there are pipelines ({})",
                data.train.len(),
                graph.spec.training.batch_size,
                graph.pipelines()
            )));
        }
        let t = &graph.spec.training;
        let steps = rounds.steps();
        let job_id = match &resolved.envelope.ctx.job_id {
            Some(id) if resume.is_some() => {
                if self.jobs.get(id).is_some_and(|e| !e.status.state.is_final()) {
                    return Err(SubmitError::Duplicate(id.clone()));
                }
                id.clone()
            }
            Some(id) if self.jobs.contains_key(id) || self.recorded.contains(id) => {
                return Err(SubmitError::Duplicate(id.clone()));
            }
            Some(id) => id.clone(),
            None => {
                let mut hasher = sha2::Sha256::new();
                hasher.update(serde_json::to_string(&resolved.envelope).unwrap_or_default().as_bytes());
                // Orchestrators sharing the store count jobs each on their own: their instance
                // names keep one's ids apart from another's for the same submission.
                if self.leases.is_some() {
                    hasher.update(b"\ninstance ");
                    hasher.update(self.instance.as_bytes());
                }
                let digest = hex::encode(hasher.finalize());
                // Ids must be unique in this table and in the artifact store, which outlives
                // orchestrator restarts.
                loop {
                    let id = format!("job-{:04}-{}", self.next, &digest[..8]);
                    self.next += 1;
                    if !self.recorded.contains(&id) && !self.jobs.contains_key(&id) {
                        break id;
                    }
                }
            }
        };
        let policy = &resolved.envelope.policy;
        let spec = JobSpec {
            job_id: job_id.clone(),
            in_flight: t.in_flight,
            root_seed: resolved.root_seed,
            steps,
            max_pnodes: self.defaults.max_pnodes.min(policy.max_pnodes as usize),
            min_pnodes: policy.min_pnodes as usize,
            step_deadline: self.defaults.step_deadline,
            recovery_every: self.defaults.recovery_every,
            placement_timeout: self.defaults.placement_timeout.min(Duration::from_secs(policy.timeout_s)),
            timeout: Duration::from_secs(policy.timeout_s),
            graph,
            envelope: resolved.envelope,
            persist: self.store.is_some(),
            resume,
            kind: JobKind::Primary,
            first_generation: crate::job::first_generation_now(),
        };
        let (events, _) = broadcast::channel(1024);
        self.telemetry.follow(&job_id, &spec.graph, steps, events.subscribe());
        let status = JobStatus {
            job_id: job_id.clone(),
            state: JobState::Pending,
            model: spec.graph.spec.model.name.clone(),
            steps_done: 0,
            steps_total: steps,
            last_loss: None,
            samples_per_s: 0.0,
            error: None,
            summary: None,
            recoveries: Vec::new(),
            pipelines: spec.graph.pipelines(),
            rounds: 0,
            members: Vec::new(),
            generation: 0,
        };
        if let Some(store) = self.store.clone() {
            // The job is recorded as active before it runs, so an orchestrator that crashes and
            // restarts finds it (with its latest snapshot) and carries on.
            let (id, envelope) = (job_id.clone(), spec.envelope.clone());
            ctx.wait(
                async move {
                    if let Err(e) = checkpoints::mark_active(store.as_ref(), &id, &envelope).await {
                        tracing::error!(job = %id, error = %e, "cannot record the job as active; it will not survive a restart");
                    }
                }
                .into_actor(self),
            );
        }
        let services = JobServices {
            registry: self.registry.clone(),
            jobs: ctx.address(),
            data: self.data.clone(),
            watchers: events.clone(),
            store: self.store.clone(),
            events: self.telemetry.events().clone(),
            instance: self.instance.clone(),
        };
        let actor = JobActor::start_in_arbiter(&Arbiter::new().handle(), move |_| JobActor::new(spec, services, None));
        tracing::info!(job = %job_id, steps, "job submitted");
        self.jobs.insert(job_id.clone(), Entry { status, events, actor: Some(actor) });
        Ok(job_id)
    }
}

/// Restart a job from its latest complete snapshot, optionally with a new total step count.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Result<String, SubmitError>")]
pub struct Resume {
    /// Job id.
    pub job_id: String,
    /// New total steps (None: as recorded).
    pub steps: Option<u64>,
}

impl Handler<Resume> for JobTable {
    type Result = ResponseActFuture<Self, Result<String, SubmitError>>;

    fn handle(&mut self, msg: Resume, _: &mut Context<Self>) -> Self::Result {
        let (store, job) = (self.store.clone(), msg.job_id.clone());
        let fut = async move {
            // The id becomes store keys: nothing in it may walk a path.
            dcnr_model::envelope::check_job_id(&job).map_err(SubmitError::Setting)?;
            let store =
                store.ok_or_else(|| SubmitError::Setting("this orchestrator has no store to resume from".into()))?;
            checkpoints::load_latest(store.as_ref(), &job).await.map_err(|e| SubmitError::Data(e.to_string()))
        };
        Box::pin(fut.into_actor(self).map(move |loaded, act, ctx| {
            let (mut envelope, from) = loaded?;
            // The recorded seed is kept whatever the recipe becomes, so the run continues exactly.
            envelope.seed = SeedSpec { mode: SeedMode::Explicit, value: envelope.seed.value };
            envelope.ctx.job_id = Some(msg.job_id.clone());
            if let Some(s) = msg.steps {
                envelope.op.steps = Some(s);
                envelope.op.epochs = None;
            }
            tracing::info!(job = %msg.job_id, step = from.step, "resuming from checkpoint");
            act.start_job(envelope, Some(from), ctx)
        }))
    }
}

/// Restarts every job the store records as active (the orchestrator stopped while they ran):
/// from its latest complete snapshot, or from the start if it had none.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct ResumeActive;

impl Handler<ResumeActive> for JobTable {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: ResumeActive, _: &mut Context<Self>) -> Self::Result {
        let (store, leases) = (self.store.clone(), self.leases.clone());
        let fut = async move {
            let Some(store) = store else { return Vec::new() };
            let found = match checkpoints::load_active(store.as_ref()).await {
                Ok(found) => found,
                Err(e) => {
                    tracing::error!(error = %e, "cannot list the jobs that were running");
                    return Vec::new();
                }
            };
            let Some(leases) = leases else { return found.into_iter().map(|(j, e, f)| (j, e, f, None)).collect() };
            // With several orchestrators, only the jobs no other one holds.
            let mut mine = Vec::new();
            for (job, envelope, from) in found {
                match leases.take(&job, false).await {
                    Ok(Some(h)) => mine.push((job, envelope, from, Some(h))),
                    Ok(None) => tracing::info!(%job, "another orchestrator runs this job"),
                    Err(e) => tracing::error!(%job, error = %e, "cannot take the lease of a job that was running"),
                }
            }
            mine
        };
        Box::pin(fut.into_actor(self).map(|found, act, ctx| {
            for (job, mut envelope, from, held) in found {
                envelope.seed = SeedSpec { mode: SeedMode::Explicit, value: envelope.seed.value };
                envelope.ctx.job_id = Some(job.clone());
                let step = from.as_ref().map(|f| f.step).unwrap_or(0);
                match act.start_job(envelope, from, ctx) {
                    Ok(_) => {
                        if let Some(h) = held {
                            act.held.insert(job.clone(), h);
                        }
                        tracing::info!(%job, step, "resuming a job that was running before the restart")
                    }
                    Err(e) => {
                        tracing::error!(%job, error = %e, "cannot resume a job that was running before the restart")
                    }
                }
            }
        }))
    }
}

/// Status pushed by a job actor.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StatusUpdate(pub JobStatus);

impl Handler<StatusUpdate> for JobTable {
    type Result = ();

    fn handle(&mut self, msg: StatusUpdate, _: &mut Context<Self>) {
        if self.replicas.contains_key(&msg.0.job_id) {
            if msg.0.state.is_final() {
                self.replicas.remove(&msg.0.job_id);
                self.locations.retain(|k, _| k.0 != msg.0.job_id);
            }
            return;
        }
        if let Some(e) = self.jobs.get_mut(&msg.0.job_id) {
            if msg.0.state.is_final() {
                if let (Some(leases), Some(_)) = (self.leases.clone(), self.held.remove(&msg.0.job_id)) {
                    let job = msg.0.job_id.clone();
                    actix::spawn(async move {
                        if let Err(e) = leases.release(&job).await {
                            tracing::warn!(%job, error = %e, "cannot release the job's lease");
                        }
                    });
                }
                e.actor = None;
                self.locations.retain(|k, _| k.0 != msg.0.job_id);
                let _ = e.events.send(JobEvent::Finished(Box::new(msg.0.clone())));
            }
            e.status = msg.0;
        }
    }
}

/// Where a job's VNodes were placed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Placed {
    /// Job id.
    pub job_id: String,
    /// (vnode, endpoint) pairs.
    pub locations: Vec<(u32, String)>,
}

impl Handler<Placed> for JobTable {
    type Result = ();

    fn handle(&mut self, msg: Placed, _: &mut Context<Self>) {
        // A new placement replaces the old one whole.
        self.locations.retain(|k, _| k.0 != msg.job_id);
        if !self.replicas.contains_key(&msg.job_id) && !msg.job_id.ends_with(crate::serve::SERVING_SUFFIX) {
            self.telemetry.placed(&msg.job_id, &msg.locations);
        }
        for (v, e) in msg.locations {
            self.locations.insert((msg.job_id.clone(), v), e);
        }
    }
}

/// Endpoint of the PNode hosting (job, vnode).
#[derive(Message)]
#[rtype(result = "Option<String>")]
pub struct Resolve(pub String, pub u32);

impl Handler<Resolve> for JobTable {
    type Result = Option<String>;

    fn handle(&mut self, msg: Resolve, _: &mut Context<Self>) -> Option<String> {
        self.locations.get(&(msg.0, msg.1)).cloned()
    }
}

impl Handler<Observation> for JobTable {
    type Result = ();

    fn handle(&mut self, msg: Observation, _: &mut Context<Self>) {
        if let Some(job) = msg.job_id.strip_suffix(crate::serve::SERVING_SUFFIX) {
            match self.serving.get(job) {
                Some(a) => a.do_send(msg),
                None => tracing::debug!(job = %msg.job_id, "report for a model not served"),
            }
            return;
        }
        let replica = self.replicas.get(&msg.job_id);
        match self.jobs.get(&msg.job_id).and_then(|e| e.actor.as_ref()).or(replica) {
            Some(a) => a.do_send(msg),
            None => tracing::debug!(job = %msg.job_id, "report for a job that is not running"),
        }
    }
}

/// A replica job started by a job: its reports and VNode locations are routed like a job's.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RouteReplica(pub String, pub Addr<JobActor>);

impl Handler<RouteReplica> for JobTable {
    type Result = ();

    fn handle(&mut self, msg: RouteReplica, _: &mut Context<Self>) {
        self.replicas.insert(msg.0, msg.1);
    }
}

/// A PNode is leaving: every running job moves its VNodes off it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Evacuate(pub String);

impl Handler<Evacuate> for JobTable {
    type Result = ();

    fn handle(&mut self, msg: Evacuate, _: &mut Context<Self>) {
        for a in self.jobs.values().filter_map(|e| e.actor.as_ref()).chain(self.replicas.values()) {
            a.do_send(Evacuate(msg.0.clone()));
        }
        for a in self.serving.values() {
            a.do_send(Evacuate(msg.0.clone()));
        }
    }
}

/// How many VNodes of running jobs are placed on the PNode at `endpoint`.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct HostedOn(pub String);

impl Handler<HostedOn> for JobTable {
    type Result = usize;

    fn handle(&mut self, msg: HostedOn, _: &mut Context<Self>) -> usize {
        self.locations.values().filter(|e| **e == msg.0).count()
    }
}

/// Runs job `job`'s trained model on `inputs` (starting to serve it if it is not yet served).
#[derive(Message)]
#[rtype(result = "Result<Inferred, InferError>")]
pub struct Infer {
    /// Job id, record hash or result hash.
    pub job: String,
    /// The rows.
    pub inputs: dcnr_vnode::HostTensor,
}

impl Handler<Infer> for JobTable {
    type Result = ResponseFuture<Result<Inferred, InferError>>;

    fn handle(&mut self, msg: Infer, ctx: &mut Context<Self>) -> Self::Result {
        let Some(store) = self.store.clone() else {
            let why = "this orchestrator keeps no artifacts (--store), so it has no trained model to serve";
            return Box::pin(async move { Err(InferError::NotFound(why.into())) });
        };
        let actor = match self.serving.get(&msg.job) {
            Some(a) if a.connected() => a.clone(),
            _ => {
                let (job, limits, registry, jobs) =
                    (msg.job.clone(), self.serve_limits.clone(), self.registry.clone(), ctx.address());
                let instance = self.instance.clone();
                let a = ServeActor::start_in_arbiter(&Arbiter::new().handle(), move |_| {
                    ServeActor::new(job, store, limits, registry, jobs, instance)
                });
                self.serving.insert(msg.job.clone(), a.clone());
                a
            }
        };
        Box::pin(async move {
            actor
                .send(InferRows(msg.inputs))
                .await
                .map_err(|e| InferError::Unavailable(format!("serving stopped: {e}")))?
        })
    }
}

/// A served model stopped (idle, or it could not be loaded).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ServingEnded(pub String, pub Addr<ServeActor>);

impl Handler<ServingEnded> for JobTable {
    type Result = ();

    fn handle(&mut self, msg: ServingEnded, _: &mut Context<Self>) {
        // A newer actor may already serve the job: only the one that stopped leaves.
        if self.serving.get(&msg.0) == Some(&msg.1) {
            self.serving.remove(&msg.0);
        }
        let id = crate::serve::serving_id(&msg.0);
        self.locations.retain(|k, _| k.0 != id);
    }
}

/// One job's status.
#[derive(Message)]
#[rtype(result = "Option<JobStatus>")]
pub struct Get(pub String);

impl Handler<Get> for JobTable {
    type Result = Option<JobStatus>;

    fn handle(&mut self, msg: Get, _: &mut Context<Self>) -> Option<JobStatus> {
        self.jobs.get(&msg.0).map(|e| e.status.clone())
    }
}

/// Every job's status.
#[derive(Message)]
#[rtype(result = "Vec<JobStatus>")]
pub struct List;

impl Handler<List> for JobTable {
    type Result = Vec<JobStatus>;

    fn handle(&mut self, _: List, _: &mut Context<Self>) -> Vec<JobStatus> {
        self.jobs.values().map(|e| e.status.clone()).collect()
    }
}

/// Current status plus a subscription to later events.
#[derive(Message)]
#[rtype(result = "Option<(JobStatus, broadcast::Receiver<JobEvent>)>")]
pub struct Watch(pub String);

impl Handler<Watch> for JobTable {
    type Result = Option<(JobStatus, broadcast::Receiver<JobEvent>)>;

    fn handle(&mut self, msg: Watch, _: &mut Context<Self>) -> Self::Result {
        self.jobs.get(&msg.0).map(|e| (e.status.clone(), e.events.subscribe()))
    }
}

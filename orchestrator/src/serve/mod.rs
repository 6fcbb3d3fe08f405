//! Serving trained models: the `Infer` RPC runs a finished job's model forward on PNodes. One
//! [`ServeActor`] per served job owns a [`core::ServeCore`] (the decisions) and carries out its
//! effects: registry views, allocations of forward-only VNodes restored from the job's stored
//! parameters ([`model::Model`]), micro-batch inputs sent inline to the VNodes that read
//! features, releases, and the answers. The job table starts it on the first request for a job
//! and routes the VNodes' reports (`Predictions`) to it.

pub mod core;
pub mod model;

use crate::artifacts::ObjectStore;
use crate::job::core::{Allocation, PNodeFailure};
use crate::job::pnodes::{self, AllocateCommon, DataLinks};
use crate::job::{Observation, first_generation_now};
use crate::job_table::{JobTable, Placed, ServingEnded};
use crate::registry::{ListPNodes, Registry};
use actix::prelude::*;
pub use core::ServeLimits;
use core::{Effect, Input, ServeCore};
use dcnr_vnode::HostTensor;
use model::Model;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How often the core is ticked (it asks the registry for PNode health on each).
const TICK: Duration = Duration::from_millis(250);

/// What a served model's VNodes are allocated under: the job id and this suffix (apart from
/// the training job's own).
pub const SERVING_SUFFIX: &str = ".serve";

/// The job id a served model's VNodes are allocated under.
pub fn serving_id(job: &str) -> String {
    format!("{job}{SERVING_SUFFIX}")
}

/// One answered request.
#[derive(Debug, Clone)]
pub struct Inferred {
    /// Class probabilities, f32 [rows, classes].
    pub probabilities: HostTensor,
    /// Hex SHA-256 of the served parameters.
    pub params_sha256: String,
    /// The placement generation that computed it.
    pub generation: u32,
}

/// Why a request was not answered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InferError {
    /// No such job, or it has no trained parameters.
    #[error("{0}")]
    NotFound(String),
    /// The inputs do not fit the model.
    #[error("{0}")]
    Invalid(String),
    /// The mesh could not compute it now (no capacity, too many requests, serving stopped).
    #[error("{0}")]
    Unavailable(String),
}

/// A request to run the model on `inputs`.
#[derive(Message)]
#[rtype(result = "Result<Inferred, InferError>")]
pub struct InferRows(pub HostTensor);

type Reply = oneshot::Sender<Result<Inferred, InferError>>;

/// A loaded model and its VNodes' states.
type Loaded = (Model, Vec<(u32, Vec<u8>)>);

/// Serving one model: loading it first, then serving.
enum Serving {
    Loading(Vec<(HostTensor, Reply)>),
    Ready { core: Box<ServeCore>, model: Arc<Model> },
}

/// Serves one model.
pub struct ServeActor {
    job: String,
    serving: Serving,
    serving_id: String,
    store: Arc<dyn ObjectStore>,
    limits: ServeLimits,
    registry: Addr<Registry>,
    jobs: Addr<JobTable>,
    /// This orchestrator's instance id, which allocations and releases name.
    instance: String,
    links: DataLinks,
    waiting: HashMap<u64, Reply>,
    next_request: u64,
    origin: Instant,
}

impl ServeActor {
    /// Serving job `job`'s model, once loaded from `store`.
    pub fn new(
        job: String,
        store: Arc<dyn ObjectStore>,
        limits: ServeLimits,
        registry: Addr<Registry>,
        jobs: Addr<JobTable>,
        instance: String,
    ) -> ServeActor {
        ServeActor {
            serving_id: serving_id(&job),
            job,
            serving: Serving::Loading(Vec::new()),
            store,
            limits,
            registry,
            jobs,
            instance,
            links: DataLinks::default(),
            waiting: HashMap::new(),
            next_request: 0,
            origin: Instant::now(),
        }
    }

    fn loaded(&mut self, ctx: &mut Context<Self>, loaded: Result<Loaded, String>) {
        let buffered = match std::mem::replace(&mut self.serving, Serving::Loading(Vec::new())) {
            Serving::Loading(b) => b,
            ready @ Serving::Ready { .. } => {
                self.serving = ready;
                return;
            }
        };
        match loaded {
            Ok((model, states)) => {
                let mut limits = self.limits.clone();
                limits.max_rows = limits.max_rows.min(model.max_rows());
                let core =
                    ServeCore::new(model.graph.clone(), states, limits, first_generation_now(), self.origin.elapsed());
                self.serving = Serving::Ready { core: Box::new(core), model: Arc::new(model) };
                for (rows, reply) in buffered {
                    self.request(ctx, rows, reply);
                }
            }
            Err(why) => {
                tracing::info!(job = %self.job, %why, "cannot serve");
                for (_, reply) in buffered {
                    let _ = reply.send(Err(InferError::NotFound(why.clone())));
                }
                self.jobs.do_send(ServingEnded(self.job.clone(), ctx.address()));
                ctx.stop();
            }
        }
    }

    fn request(&mut self, ctx: &mut Context<Self>, rows: HostTensor, reply: Reply) {
        let model = match &mut self.serving {
            Serving::Loading(buffered) => return buffered.push((rows, reply)),
            Serving::Ready { model, .. } => model.clone(),
        };
        if let Err(why) = model.check_inputs(&rows) {
            let _ = reply.send(Err(InferError::Invalid(why)));
            return;
        }
        let id = self.next_request;
        self.next_request += 1;
        self.waiting.insert(id, reply);
        self.input(ctx, Input::Request { id, inputs: rows });
    }

    fn input(&mut self, ctx: &mut Context<Self>, input: Input) {
        let Serving::Ready { core, .. } = &mut self.serving else { return };
        core.step(input, self.origin.elapsed());
        for e in core.take_effects() {
            self.run(ctx, e);
        }
    }

    fn run(&mut self, ctx: &mut Context<Self>, effect: Effect) {
        match effect {
            Effect::ListPNodes => {
                ctx.spawn(self.registry.send(ListPNodes).into_actor(self).map(|view, act, ctx| {
                    if let Ok(view) = view {
                        act.input(ctx, Input::View(view));
                    }
                }));
            }
            Effect::Allocate { generation, allocations } => {
                // Links of an older placement may lead to a PNode that is gone.
                self.links.clear();
                let common = self.allocate_common(generation);
                ctx.spawn(allocate(common, allocations).into_actor(self).map(move |result, act, ctx| {
                    act.input(ctx, Input::Allocated { generation, result });
                }));
            }
            Effect::Placed { locations } => {
                self.jobs.do_send(Placed { job_id: self.serving_id.clone(), locations });
            }
            Effect::Release { endpoints } => {
                let (id, instance) = (self.serving_id.clone(), self.instance.clone());
                actix::spawn(async move { pnodes::release_everywhere(&id, &instance, endpoints, true).await });
            }
            Effect::Send { generation, mb, targets, inputs } => {
                for t in &targets {
                    if let Err(why) = self.links.send_inputs(&self.serving_id, generation, t, mb, &inputs) {
                        let pnode = t.at.pnode.clone();
                        ctx.notify(Feedback(Input::SendFailed { generation, pnode, why }));
                        break;
                    }
                }
            }
            Effect::Answer { id, result } => {
                let Serving::Ready { model, .. } = &self.serving else { return };
                if let Some(tx) = self.waiting.remove(&id) {
                    let _ = tx.send(
                        result
                            .map(|a| Inferred {
                                probabilities: a.probabilities,
                                params_sha256: model.params_sha256.clone(),
                                generation: a.generation,
                            })
                            .map_err(InferError::Unavailable),
                    );
                }
            }
            Effect::Log(line) => tracing::info!(job = %self.job, "{line}"),
            Effect::Stop => {
                tracing::info!(job = %self.job, "serving stopped (idle)");
                self.jobs.do_send(ServingEnded(self.job.clone(), ctx.address()));
                ctx.stop();
            }
        }
    }

    fn allocate_common(&self, generation: u32) -> AllocateCommon {
        let model = match &self.serving {
            Serving::Ready { model, .. } => Some(model),
            Serving::Loading(_) => None,
        };
        AllocateCommon {
            job_id: self.serving_id.clone(),
            graph_json: model.and_then(|m| serde_json::to_string(&m.graph).ok()).unwrap_or_default(),
            root_seed: model.map_or(0, |m| m.root_seed),
            in_flight: 1,
            generation,
            dataset: None,
            readers: Default::default(),
            train_samples: 0,
            seal_messages: false,
            serving: true,
            orchestrator_id: self.instance.clone(),
        }
    }
}

async fn allocate(common: AllocateCommon, allocations: Vec<Allocation>) -> Result<(), PNodeFailure> {
    pnodes::allocate_all(common, allocations).await
}

impl Actor for ServeActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let (store, job) = (self.store.clone(), self.job.clone());
        let load = async move {
            let model = Model::load(store.as_ref(), &job).await.map_err(|e| e.to_string())?;
            // Building the VNodes' states runs their initialisation: off the async threads.
            tokio::task::spawn_blocking(move || {
                let states = model.states().map_err(|e| e.to_string())?;
                Ok((model, states))
            })
            .await
            .map_err(|e| format!("loading the model: {e}"))?
        };
        ctx.spawn(load.into_actor(self).map(|loaded, act, ctx| act.loaded(ctx, loaded)));
        ctx.run_interval(TICK, |act, ctx| act.input(ctx, Input::Tick));
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        for (_, tx) in self.waiting.drain() {
            let _ = tx.send(Err(InferError::Unavailable("serving stopped".into())));
        }
    }
}

/// An input the actor gives itself after the effect that produced it.
#[derive(Message)]
#[rtype(result = "()")]
struct Feedback(Input);

impl Handler<Feedback> for ServeActor {
    type Result = ();

    fn handle(&mut self, msg: Feedback, ctx: &mut Context<Self>) {
        self.input(ctx, msg.0);
    }
}

impl Handler<InferRows> for ServeActor {
    type Result = ResponseFuture<Result<Inferred, InferError>>;

    fn handle(&mut self, msg: InferRows, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.request(ctx, msg.0, tx);
        Box::pin(async move { rx.await.map_err(|_| InferError::Unavailable("serving stopped".into()))? })
    }
}

impl Handler<Observation> for ServeActor {
    type Result = ();

    fn handle(&mut self, msg: Observation, ctx: &mut Context<Self>) {
        self.input(ctx, Input::Report(msg));
    }
}

impl Handler<crate::job_table::Evacuate> for ServeActor {
    type Result = ();

    fn handle(&mut self, msg: crate::job_table::Evacuate, ctx: &mut Context<Self>) {
        self.input(ctx, Input::Evacuate(msg.0));
    }
}

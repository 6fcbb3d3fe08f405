//! VNode actors and the host actor that creates and stops them.
//!
//! Each VNode actor owns one `dcnr_vnode::VNode` and runs on an arbiter (thread) of its own, so
//! tensor math never blocks the async I/O threads and VNodes of one PNode compute in parallel.
//! A VNode that reads the job's data also owns a `Feeder` over the job's dataset pack, and
//! builds its own inputs from the feed requests it gets.

use crate::metrics::PNODE;
use crate::router::{Evidence, Local, Router};
use actix::prelude::*;
use dcnr_mesh::convert::{self, FeedRequest};
use dcnr_model::dataset::Splits;
use dcnr_model::graph::Normalize;
use dcnr_proto::seal::Route;
use dcnr_proto::v1;
use dcnr_vnode::batches::Feeder;
use dcnr_vnode::{HostTensor, Inbound, Outbound, VNode, VNodeSpec};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// A message for a VNode, from the given placement generation of its job.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deliver {
    /// Generation of the sender; a VNode drops messages of any other.
    pub generation: u32,
    /// The message.
    pub msg: Inbound,
    /// Its place in the VNode's queue of messages from the network, freed when it is handled.
    pub slot: Option<crate::router::QueueSlot>,
    /// What is known of where its tensor came from.
    pub evidence: Evidence,
}

/// A request to feed a VNode one input from the job's data, from the given generation.
#[derive(Message)]
#[rtype(result = "()")]
pub struct FeedInput {
    /// Generation of the sender; a VNode drops requests of any other.
    pub generation: u32,
    /// What to feed.
    pub feed: FeedRequest,
}

/// Asks a VNode for its current parameters and version.
#[derive(Message)]
#[rtype(result = "Result<(Vec<HostTensor>, u64), String>")]
pub struct GetParams;

/// Asks a VNode for its checkpoint state.
#[derive(Message)]
#[rtype(result = "Result<Vec<u8>, String>")]
pub struct TakeSnapshot;

/// Answers as soon as the VNode's thread is free: a probe of whether it is stuck in a step.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Alive;

/// One hosted VNode.
pub struct VNodeActor {
    job: String,
    generation: u32,
    vnode: VNode,
    router: Router,
    failed: bool,
    /// Builds this VNode's data inputs; `None` when it reads no data.
    feeder: Option<Feeder>,
    /// Whether the job seals its training tensors (a verified job).
    sealed: bool,
    /// Sealed jobs: what each pending step consumed, reported with its `Done`.
    inputs: BTreeMap<u64, Vec<v1::StepInput>>,
}

impl VNodeActor {
    /// Routes one output; a `Done` takes along what its step consumed.
    fn emit(&mut self, o: Outbound) {
        count_outbound(&o);
        let inputs = match &o {
            Outbound::Done { mb, .. } => {
                // Steps complete in order: whatever is older than this one is no longer wanted.
                let later = self.inputs.split_off(&(mb + 1));
                std::mem::replace(&mut self.inputs, later).remove(mb).unwrap_or_default()
            }
            _ => Vec::new(),
        };
        self.router.send(&self.job, self.vnode.id(), self.generation, self.sealed, o, inputs);
    }

    /// Keeps the evidence of a tensor the VNode accepted for step `mb`.
    fn keep(&mut self, mb: u64, route: Route, evidence: Evidence) {
        let seal = match evidence {
            Evidence::Sealed(seal) => seal,
            Evidence::Local(hash) => v1::Seal { tensor_sha256: hash.to_vec(), ..Default::default() },
            Evidence::None | Evidence::Unproven(_) => return,
        };
        self.inputs.entry(mb).or_default().push(route.input(seal));
    }
}

impl Actor for VNodeActor {
    type Context = Context<Self>;
}

impl Handler<FeedInput> for VNodeActor {
    type Result = ();

    fn handle(&mut self, msg: FeedInput, ctx: &mut Context<Self>) {
        if self.failed {
            return;
        }
        if msg.generation != self.generation {
            tracing::debug!(job = %self.job, vnode = self.vnode.id(), got = msg.generation, want = self.generation, "stale feed dropped");
            self.router.count_stale();
            return;
        }
        let FeedRequest { mb, phase, port, batch } = msg.feed;
        let id = self.vnode.id();
        let built = match &mut self.feeder {
            Some(f) => f.inbound(mb, phase, port, batch).map_err(|e| e.to_string()),
            None => Err(format!("vnode {id} reads none of the job's data")),
        };
        match built {
            Ok(inbound) => self.handle(
                Deliver { generation: msg.generation, msg: inbound, slot: None, evidence: Evidence::None },
                ctx,
            ),
            Err(why) => {
                // Only a confused or hostile sender asks for this; the job must hear of it, but the
                // VNode's state is untouched and stays usable.
                tracing::warn!(job = %self.job, vnode = id, error = %why, "refused a feed request");
                PNODE.feeds_refused.inc();
                self.router.fail(&self.job, id, self.generation, mb, format!("refused a feed request: {why}"));
            }
        }
    }
}

impl Handler<Deliver> for VNodeActor {
    type Result = ();

    fn handle(&mut self, msg: Deliver, _: &mut Context<Self>) {
        if self.failed {
            return;
        }
        if msg.generation != self.generation {
            // Sent before (or, from a PNode that missed a relocation, beside) the current placement.
            tracing::debug!(job = %self.job, vnode = self.vnode.id(), got = msg.generation, want = self.generation, "stale message dropped");
            self.router.count_stale();
            return;
        }
        let (mb, pass) = match &msg.msg {
            Inbound::Forward { mb, .. } => (*mb, "forward"),
            Inbound::Backward { mb, .. } => (*mb, "backward"),
            Inbound::Sync { mb, .. } => (*mb, "sync"),
        };
        PNODE.vnode_messages_in.with_label_values(&[pass]).inc();
        let route = if self.sealed { convert::seal_route(&msg.msg) } else { None };
        if let (Some(_), Evidence::Unproven(why)) = (route, &msg.evidence) {
            // A verified job's tensor whose sender does not stand by it: refused like a bad value.
            let r = self.vnode.unproven(&msg.msg, why.clone());
            tracing::warn!(job = %self.job, vnode = self.vnode.id(), error = %r, "refused a tensor");
            self.router.reject(&self.job, self.vnode.id(), self.generation, &r);
            return;
        }
        // Cheap checks first: a refused tensor never reaches the VNode, whose state stays valid,
        // and the orchestrator learns who sent it.
        let handled = match self.vnode.receive(msg.msg) {
            Ok(handled) => handled,
            Err(r) => {
                tracing::warn!(job = %self.job, vnode = self.vnode.id(), error = %r, "refused a tensor");
                self.router.reject(&self.job, self.vnode.id(), self.generation, &r);
                return;
            }
        };
        match handled {
            Ok(outs) => {
                if let Some(route) = route {
                    self.keep(mb, route, msg.evidence);
                }
                for o in outs {
                    self.emit(o);
                }
            }
            Err(e) if e.is_stale() => {
                // Already applied once; applying it again is what must never happen.
                tracing::debug!(job = %self.job, error = %e, "late or repeated message dropped");
                self.router.count_stale();
            }
            Err(e) => {
                // A VNode that refused input has state the job can no longer trust; it stops
                // computing and the orchestrator decides what happens to the job.
                tracing::error!(job = %self.job, vnode = self.vnode.id(), error = %e, "VNode failed");
                self.failed = true;
                PNODE.vnode_failures.inc();
                self.router.fail(&self.job, self.vnode.id(), self.generation, mb, e.to_string());
            }
        }
    }
}

impl Handler<Alive> for VNodeActor {
    type Result = ();

    fn handle(&mut self, _: Alive, _: &mut Context<Self>) {}
}

/// Counts one message a VNode emitted.
fn count_outbound(o: &Outbound) {
    let kind = match o {
        Outbound::Forward { .. } => "forward",
        Outbound::Backward { .. } => "backward",
        Outbound::Sync { .. } => "sync",
        Outbound::Done { compute_us, bytes_in, bytes_out, .. } => {
            PNODE.vnode_steps.inc();
            PNODE.compute_us.inc_by(*compute_us);
            PNODE.tensor_bytes.with_label_values(&["in"]).inc_by(*bytes_in);
            PNODE.tensor_bytes.with_label_values(&["out"]).inc_by(*bytes_out);
            "done"
        }
        Outbound::Loss { .. } => "loss",
        Outbound::Predictions { .. } => "predictions",
    };
    PNODE.vnode_messages_out.with_label_values(&[kind]).inc();
}

impl Handler<TakeSnapshot> for VNodeActor {
    type Result = Result<Vec<u8>, String>;

    fn handle(&mut self, _: TakeSnapshot, _: &mut Context<Self>) -> Self::Result {
        self.vnode.snapshot().map_err(|e| e.to_string())
    }
}

impl Handler<GetParams> for VNodeActor {
    type Result = Result<(Vec<HostTensor>, u64), String>;

    fn handle(&mut self, _: GetParams, _: &mut Context<Self>) -> Self::Result {
        let p = self.vnode.params();
        Ok((p, self.vnode.version()))
    }
}

struct Hosted {
    vnode: u32,
    generation: u32,
    memory: u64,
    addr: Addr<VNodeActor>,
    arbiter: Arbiter,
}

/// Creates, finds and stops the VNode actors of this PNode.
pub struct Host {
    router: Router,
    max_vnodes: usize,
    /// Bytes all hosted VNodes may use together (0 = no limit).
    memory_limit: u64,
    jobs: HashMap<String, Vec<Hosted>>,
}

impl Host {
    /// Starts the host actor on the current arbiter.
    pub fn start_new(router: Router, max_vnodes: usize, memory_limit: u64) -> Addr<Host> {
        Host { router, max_vnodes, memory_limit, jobs: HashMap::new() }.start()
    }

    fn memory_in_use(&self) -> u64 {
        self.jobs.values().flatten().map(|h| h.memory).sum()
    }

    fn hosted(&self) -> usize {
        self.jobs.values().map(Vec::len).sum()
    }

    fn release(&mut self, job: &str) -> u32 {
        self.router.forget_job(job);
        let gone = self.jobs.remove(job).unwrap_or_default();
        for h in &gone {
            h.arbiter.stop();
        }
        PNODE.hosted_vnodes.set(self.hosted() as i64);
        gone.len() as u32
    }
}

impl Actor for Host {
    type Context = Context<Self>;
}

/// Creates the VNodes of one job on this PNode (replacing any it already had).
#[derive(Message)]
#[rtype(result = "Result<u32, String>")]
pub struct Allocate {
    /// Job id.
    pub job: String,
    /// Placement generation; an older one than the job's current one here is refused.
    pub generation: u32,
    /// One spec per VNode to host, with an optional checkpointed state to restore.
    pub specs: Vec<(VNodeSpec, Option<Vec<u8>>)>,
    /// Bytes these VNodes will need (see `VNodeSpec::memory_estimate`).
    pub memory: u64,
    /// How the job's raw pixels become features.
    pub normalize: Normalize,
    /// Whether the job seals its training tensors.
    pub sealed: bool,
    /// The job's data, when a VNode here reads it.
    pub data: Option<JobData>,
}

/// What the VNodes reading a job's data build their inputs from.
#[derive(Clone)]
pub struct JobData {
    /// The job's dataset, decoded (shared with other jobs using the same pack).
    pub splits: Arc<Splits>,
    /// Samples per training step.
    pub batch_size: usize,
    /// Samples per evaluation batch.
    pub eval_batch_size: usize,
}

impl Handler<Allocate> for Host {
    type Result = Result<u32, String>;

    fn handle(&mut self, msg: Allocate, _: &mut Context<Self>) -> Self::Result {
        let current = self.jobs.get(&msg.job).and_then(|h| h.first()).map(|h| h.generation);
        if let Some(g) = current.filter(|g| *g > msg.generation) {
            return Err(format!(
                "job {} is already placed here at generation {g}; refusing the older generation {}",
                msg.job, msg.generation
            ));
        }
        self.release(&msg.job);
        if self.hosted() + msg.specs.len() > self.max_vnodes {
            return Err(format!(
                "this pnode hosts {} VNodes and allows at most {}; refusing {} more",
                self.hosted(),
                self.max_vnodes,
                msg.specs.len()
            ));
        }
        let (used, need) = (self.memory_in_use(), msg.memory);
        if self.memory_limit > 0 && used + need > self.memory_limit {
            return Err(format!(
                "these VNodes need {need} bytes; {used} of this pnode's {} are in use",
                self.memory_limit
            ));
        }
        let per_vnode = need / msg.specs.len().max(1) as u64;
        // Restore first, so a bad state refuses the whole allocation before any actor starts.
        let mut vnodes = Vec::with_capacity(msg.specs.len());
        for (spec, state) in msg.specs {
            let feeder = msg.data.as_ref().and_then(|d| {
                Feeder::new(&spec.node, d.splits.clone(), d.batch_size, d.eval_batch_size, spec.root_seed)
            });
            let v = match state {
                Some(bytes) => VNode::restore(spec, &bytes).map_err(|e| e.to_string())?,
                None => VNode::new(spec),
            };
            vnodes.push((v.with_normalize(msg.normalize), feeder));
        }
        let mut hosted = Vec::with_capacity(vnodes.len());
        for (v, feeder) in vnodes {
            let arbiter = Arbiter::new();
            let (job, router, vnode, generation) = (msg.job.clone(), self.router.clone(), v.id(), msg.generation);
            let sealed = msg.sealed;
            let addr = VNodeActor::start_in_arbiter(&arbiter.handle(), move |_| VNodeActor {
                job,
                generation,
                vnode: v,
                router,
                failed: false,
                feeder,
                sealed,
                inputs: BTreeMap::new(),
            });
            let local =
                Local { deliver: addr.clone().recipient(), feed: addr.clone().recipient(), queued: Default::default() };
            self.router.add_local((msg.job.clone(), vnode), local);
            hosted.push(Hosted { vnode, generation, memory: per_vnode, addr, arbiter });
        }
        let n = hosted.len() as u32;
        self.jobs.insert(msg.job, hosted);
        PNODE.hosted_vnodes.set(self.hosted() as i64);
        Ok(n)
    }
}

/// Stops every VNode of a job.
#[derive(Message)]
#[rtype(result = "u32")]
pub struct Release(pub String);

impl Handler<Release> for Host {
    type Result = u32;

    fn handle(&mut self, msg: Release, _: &mut Context<Self>) -> u32 {
        self.release(&msg.0)
    }
}

/// Finds the actor of a hosted VNode.
#[derive(Message)]
#[rtype(result = "Option<Addr<VNodeActor>>")]
pub struct Find(pub String, pub u32);

impl Handler<Find> for Host {
    type Result = Option<Addr<VNodeActor>>;

    fn handle(&mut self, msg: Find, _: &mut Context<Self>) -> Self::Result {
        self.jobs.get(&msg.0)?.iter().find(|h| h.vnode == msg.1).map(|h| h.addr.clone())
    }
}

/// Every hosted VNode of a job.
#[derive(Message)]
#[rtype(result = "Vec<(u32, Addr<VNodeActor>)>")]
pub struct JobVNodes(pub String);

impl Handler<JobVNodes> for Host {
    type Result = Vec<(u32, Addr<VNodeActor>)>;

    fn handle(&mut self, msg: JobVNodes, _: &mut Context<Self>) -> Self::Result {
        self.jobs.get(&msg.0).map(|hs| hs.iter().map(|h| (h.vnode, h.addr.clone())).collect()).unwrap_or_default()
    }
}

/// Number of hosted VNodes.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Count;

impl Handler<Count> for Host {
    type Result = usize;

    fn handle(&mut self, _: Count, _: &mut Context<Self>) -> usize {
        self.hosted()
    }
}

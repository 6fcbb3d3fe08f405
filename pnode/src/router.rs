//! Where a VNode's outbound message goes: straight into a local actor's mailbox (no encoding),
//! or encoded onto a gRPC stream to the PNode that hosts the target, found by asking the
//! orchestrator once and caching the answer.

use crate::actors::{Deliver, FeedInput};
use crate::orchestrators::Orchestrators;
use actix::Recipient;
use dcnr_mesh::convert::{self, FeedRequest, Target};
use dcnr_mesh::link::{Link, open_link};
use dcnr_proto::{seal, v1};
use dcnr_vnode::{Inbound, Outbound};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use tokio::sync::mpsc;

/// Identifies a VNode across the mesh.
pub type VKey = (String, u32);

/// Why a message could not be delivered locally.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The target VNode is not hosted on this PNode.
    #[error("vnode {1} of job {0} is not hosted on this pnode")]
    NotHosted(String, u32),
    /// The target VNode has [`MAX_QUEUED`] messages from the network waiting already.
    #[error("vnode {1} of job {0} has {MAX_QUEUED} messages waiting; the sender is flooding it")]
    Full(String, u32),
}

/// Most messages from the network waiting for one VNode. An honest job never comes near it:
/// a VNode takes at most `2 * in_flight + FEED_AHEAD + 8` micro-batches ahead per port, and
/// the window refuses the rest. Beyond it a sender's stream is refused, so a flooding peer
/// cannot grow a PNode's memory without bound.
pub const MAX_QUEUED: usize = 4096;

/// A message's place in a VNode's queue; the place is freed when the message is dropped
/// (handled, or discarded with its actor).
pub struct QueueSlot(Arc<std::sync::atomic::AtomicUsize>);

impl QueueSlot {
    /// Takes a place in `queue`, unless it holds [`MAX_QUEUED`] already.
    fn take(queue: &Arc<std::sync::atomic::AtomicUsize>) -> Option<QueueSlot> {
        use std::sync::atomic::Ordering;
        queue.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < MAX_QUEUED).then_some(n + 1)).ok()?;
        Some(QueueSlot(queue.clone()))
    }
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

enum Egress {
    /// A message, and whether to seal it.
    Message(v1::VNodeMessage, bool),
    ForgetJob(String),
}

/// What a delivered tensor's origin is known to be (sealed jobs record it with the step).
#[derive(Debug, Clone, PartialEq)]
pub enum Evidence {
    /// Not a training activation or gradient from another VNode, or a job that seals nothing.
    None,
    /// From a VNode of this PNode: the tensor's hash.
    Local([u8; 32]),
    /// From another PNode, with its checked seal.
    Sealed(v1::Seal),
    /// From another PNode, without a seal that holds: why.
    Unproven(String),
}

struct Inner {
    pnode_id: RwLock<String>,
    stale: std::sync::atomic::AtomicU64,
    /// Fault injection (a testing aid); `None` in normal operation.
    fault: Option<crate::fault::Injector>,
    local: RwLock<HashMap<VKey, Local>>,
    egress: mpsc::UnboundedSender<Egress>,
    reports: mpsc::UnboundedSender<v1::VNodeReport>,
}

/// How a hosted VNode is reached: its messages, and requests to feed it from the job's data.
#[derive(Clone)]
pub struct Local {
    /// VNode messages.
    pub deliver: Recipient<Deliver>,
    /// Feed requests.
    pub feed: Recipient<FeedInput>,
    /// Messages from the network waiting for it.
    pub queued: Arc<std::sync::atomic::AtomicUsize>,
}

/// Cheap-to-clone handle used by actors (to send) and the gRPC service (to deliver).
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

impl Router {
    /// Starts the egress and report tasks on the current tokio runtime; each job's Resolves
    /// and reports go to the orchestrator that allocated it (`orchestrators`).
    pub fn start(
        orchestrators: Orchestrators,
        key: Arc<crate::identity::NodeKey>,
        fault: Option<crate::fault::Injector>,
    ) -> Router {
        let (egress, egress_rx) = mpsc::unbounded_channel();
        let (reports, reports_rx) = mpsc::unbounded_channel();
        tokio::spawn(egress_loop(egress_rx, orchestrators.clone(), key.clone()));
        let pnode_id = key.pnode_id();
        tokio::spawn(dispatch_reports(reports_rx, orchestrators));
        let inner = Inner {
            pnode_id: RwLock::new(pnode_id),
            stale: Default::default(),
            fault,
            local: RwLock::default(),
            egress,
            reports,
        };
        Router { inner: Arc::new(inner) }
    }

    /// This PNode's id.
    pub fn pnode_id(&self) -> String {
        self.inner.pnode_id.read().map(|g| g.clone()).unwrap_or_default()
    }

    /// Adopts the id of a new registration.
    pub fn set_pnode_id(&self, id: String) {
        if let Ok(mut g) = self.inner.pnode_id.write() {
            *g = id;
        }
    }

    /// Counts one message dropped as stale.
    pub fn count_stale(&self) {
        self.inner.stale.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Messages dropped as stale since start.
    pub fn stale_dropped(&self) -> u64 {
        self.inner.stale.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Makes a local VNode reachable.
    pub fn add_local(&self, key: VKey, to: Local) {
        if let Ok(mut m) = self.inner.local.write() {
            m.insert(key, to);
        }
    }

    /// Forgets every VNode of a job, local and cached remote locations alike.
    pub fn forget_job(&self, job: &str) {
        if let Ok(mut m) = self.inner.local.write() {
            m.retain(|k, _| k.0 != job);
        }
        let _ = self.inner.egress.send(Egress::ForgetJob(job.to_string()));
    }

    fn local(&self, job: &str, vnode: u32) -> Option<Recipient<Deliver>> {
        self.inner.local.read().ok()?.get(&(job.to_string(), vnode)).map(|l| l.deliver.clone())
    }

    /// Hands a feed request that arrived from the network to the local VNode it is for.
    pub fn deliver_feed(&self, to: Target, feed: FeedRequest) -> Result<(), RouteError> {
        let found =
            self.inner.local.read().ok().and_then(|m| m.get(&(to.job.clone(), to.vnode)).map(|l| l.feed.clone()));
        match found {
            Some(r) => {
                r.do_send(FeedInput { generation: to.generation, feed });
                Ok(())
            }
            None => Err(RouteError::NotHosted(to.job, to.vnode)),
        }
    }

    /// Delivers a message that arrived from the network to a local VNode, if its queue has room.
    pub fn deliver_local(&self, to: Target, msg: Inbound, evidence: Evidence) -> Result<(), RouteError> {
        let found = self.inner.local.read().ok().and_then(|m| m.get(&(to.job.clone(), to.vnode)).cloned());
        let Some(local) = found else { return Err(RouteError::NotHosted(to.job, to.vnode)) };
        let Some(slot) = QueueSlot::take(&local.queued) else { return Err(RouteError::Full(to.job, to.vnode)) };
        local.deliver.do_send(Deliver { generation: to.generation, msg, slot: Some(slot), evidence });
        Ok(())
    }

    /// Sends one output of VNode `from` (of placement `generation` of `job`) to wherever it must
    /// go; with `sealed`, training tensors carry a seal (or, to a VNode here, their hash), and
    /// a `Done` report carries `inputs`, what the VNode consumed for that step.
    pub fn send(&self, job: &str, from: u32, generation: u32, sealed: bool, out: Outbound, inputs: Vec<v1::StepInput>) {
        let target = |vnode| Target { job: job.to_string(), vnode, generation };
        let out = match &self.inner.fault {
            Some(f) => f.apply(job, from, out),
            None => out,
        };
        let out = match out.into_delivery() {
            Ok((to, msg)) => {
                let seal = sealed && convert::seal_route(&msg).is_some();
                match self.local(job, to) {
                    Some(r) => {
                        let evidence =
                            if seal { Evidence::Local(convert::tensor_sha256(msg.tensor())) } else { Evidence::None };
                        r.do_send(Deliver { generation, msg, slot: None, evidence })
                    }
                    None => self.egress(convert::inbound_message(&target(to), &msg), seal),
                }
                return;
            }
            Err(report) => report,
        };
        match out {
            Outbound::Done { mb, compute_us, cpu_us, bytes_in, bytes_out, output_sha256, round_sha256 } => self.report(
                job,
                from,
                generation,
                mb,
                v1::v_node_report::Body::Done(v1::StepDone {
                    compute_us,
                    cpu_us,
                    bytes_in,
                    bytes_out,
                    output_sha256: output_sha256.to_vec(),
                    round_sha256: round_sha256.map(|h| h.to_vec()).unwrap_or_default(),
                    inputs,
                }),
            ),
            Outbound::Loss { mb, phase, loss, correct, count } => self.report(
                job,
                from,
                generation,
                mb,
                v1::v_node_report::Body::Loss(v1::LossReport {
                    phase: convert::phase_to_wire(phase),
                    loss,
                    correct,
                    count,
                }),
            ),
            Outbound::Predictions { mb, probabilities } => self.report(
                job,
                from,
                generation,
                mb,
                v1::v_node_report::Body::Predictions(v1::Predictions {
                    probabilities: Some(convert::tensor_to_wire(&probabilities)),
                }),
            ),
            // Delivered above.
            Outbound::Forward { .. } | Outbound::Backward { .. } | Outbound::Sync { .. } => {}
        }
    }

    /// Reports a VNode failure to the orchestrator.
    pub fn fail(&self, job: &str, vnode: u32, generation: u32, mb: u64, message: String) {
        self.report(job, vnode, generation, mb, v1::v_node_report::Body::Failure(v1::VNodeFailure { message }));
    }

    /// Reports a tensor that VNode `vnode` refused because it failed the cheap checks.
    pub fn reject(&self, job: &str, vnode: u32, generation: u32, r: &dcnr_vnode::sanity::Rejection) {
        use dcnr_vnode::sanity::Sender;
        let (from_vnode, from_data) = match r.from {
            Sender::VNode(v) => (v, false),
            Sender::Data => (0, true),
        };
        let body = v1::Rejected { reason: r.to_string(), from_vnode, from_data };
        self.report(job, vnode, generation, r.mb, v1::v_node_report::Body::Rejected(body));
    }

    fn report(&self, job: &str, vnode: u32, generation: u32, mb: u64, body: v1::v_node_report::Body) {
        let _ = self.inner.reports.send(v1::VNodeReport {
            job_id: job.to_string(),
            vnode,
            micro_batch: mb,
            pnode_id: self.pnode_id(),
            body: Some(body),
            generation,
        });
    }

    fn egress(&self, m: v1::VNodeMessage, seal: bool) {
        let _ = self.inner.egress.send(Egress::Message(m, seal));
    }
}

/// Signs what `m` carries with `key`, for its receiver to check and keep.
fn seal_message(key: &crate::identity::NodeKey, m: &mut v1::VNodeMessage) {
    let Some((route, tensor)) = convert::wire_seal_route(m) else { return };
    let hash = seal::tensor_sha256(tensor);
    let to = Target { job: m.job_id.clone(), vnode: m.to_vnode, generation: m.generation };
    m.seal = Some(seal::sign(key.signing(), &convert::seal_context(&to, m.micro_batch, route), hash));
}

async fn egress_loop(
    mut rx: mpsc::UnboundedReceiver<Egress>,
    orchestrators: Orchestrators,
    key: Arc<crate::identity::NodeKey>,
) {
    let mut locations: HashMap<VKey, String> = HashMap::new();
    let mut links: HashMap<String, Link> = HashMap::new();
    while let Some(e) = rx.recv().await {
        let m = match e {
            // Sealing here keeps hashing and signing off the VNode's thread.
            Egress::Message(mut m, seal) => {
                if seal {
                    seal_message(&key, &mut m);
                }
                m
            }
            Egress::ForgetJob(job) => {
                locations.retain(|k, _| k.0 != job);
                continue;
            }
        };
        let key = (m.job_id.clone(), m.to_vnode);
        let endpoint = match locations.get(&key) {
            Some(e) => e.clone(),
            None => match resolve(&orchestrators, &key.0, key.1).await {
                Ok(e) => {
                    locations.insert(key.clone(), e.clone());
                    e
                }
                Err(err) => {
                    tracing::warn!(job = %key.0, vnode = key.1, %err, "cannot resolve VNode location; message dropped");
                    continue;
                }
            },
        };
        let link = match links.get(&endpoint) {
            Some(l) if !l.is_closed() => l.clone(),
            _ => match open_link(&endpoint) {
                Ok(l) => {
                    links.insert(endpoint.clone(), l.clone());
                    l
                }
                Err(err) => {
                    tracing::warn!(%endpoint, %err, "bad PNode endpoint; message dropped");
                    continue;
                }
            },
        };
        // Never wait on one peer: a hung PNode must not hold up traffic to the others. A message
        // lost here stalls its job, which the orchestrator detects and repairs by relocation.
        match link.try_send(m) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(%endpoint, "link to PNode is backed up; message dropped");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                links.remove(&endpoint);
                tracing::warn!(%endpoint, "link to PNode closed; message dropped");
            }
        }
    }
}

/// Where VNode `vnode` of `job` is hosted, asked of the orchestrator the job answers to.
async fn resolve(orchestrators: &Orchestrators, job: &str, vnode: u32) -> Result<String, tonic::Status> {
    let Some((_, link)) = orchestrators.for_job(job) else {
        return Err(tonic::Status::not_found("the job answers to no orchestrator this pnode is a member of"));
    };
    link.resolve(job, vnode).await
}

/// Sends each report to the orchestrator its job answers to, on one report stream per
/// orchestrator; a report of a job that answers to none (released) is dropped.
async fn dispatch_reports(mut rx: mpsc::UnboundedReceiver<v1::VNodeReport>, orchestrators: Orchestrators) {
    let mut streams: HashMap<String, mpsc::UnboundedSender<v1::VNodeReport>> = HashMap::new();
    while let Some(r) = rx.recv().await {
        let Some((id, link)) = orchestrators.for_job(&r.job_id) else {
            tracing::debug!(job = %r.job_id, "report of a job no orchestrator here allocated; dropped");
            continue;
        };
        streams.retain(|i, s| !s.is_closed() && orchestrators.is_member(i));
        let stream = streams.entry(id).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(report_loop(rx, link));
            tx
        });
        let _ = stream.send(r);
    }
}

async fn report_loop(
    mut rx: mpsc::UnboundedReceiver<v1::VNodeReport>,
    orchestrator: crate::membership::OrchestratorLink,
) {
    // A report that met a broken stream is sent first on the next one: losing it would leave
    // its step unfinished in the orchestrator's eyes.
    let mut unsent: Option<v1::VNodeReport> = None;
    let mut wait = REPORT_RETRY;
    loop {
        let (tx, stream_rx) = mpsc::channel::<v1::VNodeReport>(4096);
        let call = {
            let o = orchestrator.clone();
            tokio::spawn(async move { o.report_stream(stream_rx).await })
        };
        let mut broken = false;
        while let Some(r) = match unsent.take() {
            Some(r) => Some(r),
            None => rx.recv().await,
        } {
            if let Err(mpsc::error::SendError(r)) = tx.send(r).await {
                unsent = Some(r);
                broken = true;
                break;
            }
            wait = REPORT_RETRY;
        }
        drop(tx);
        if let Ok(Err(status)) = call.await {
            // Said once per outage: an orchestrator that is down is retried quietly.
            if wait == REPORT_RETRY {
                tracing::warn!(orchestrator = %orchestrator.url(), %status, "report stream failed; reconnecting");
            } else {
                tracing::debug!(orchestrator = %orchestrator.url(), %status, "report stream failed again");
            }
        }
        // Nothing more will come for an orchestrator that is no longer joined: stop retrying it.
        if !broken || rx.is_closed() {
            return;
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(REPORT_RETRY_MAX);
    }
}

/// First wait before a broken report stream is opened again.
const REPORT_RETRY: std::time::Duration = std::time::Duration::from_millis(200);

/// Longest wait between attempts to open a report stream.
const REPORT_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(2);

#[cfg(test)]
mod queue_tests {
    use super::*;

    #[test]
    fn a_queue_takes_at_most_max_queued_and_frees_a_place_per_message_dropped() {
        let q = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut held: Vec<QueueSlot> = (0..MAX_QUEUED).map(|_| QueueSlot::take(&q).unwrap()).collect();
        assert!(QueueSlot::take(&q).is_none(), "full");
        held.pop();
        assert!(QueueSlot::take(&q).is_some(), "a handled message makes room");
        drop(held);
        assert_eq!(q.load(std::sync::atomic::Ordering::Acquire), 0);
    }
}

//! The gRPC adapter of the `PNode` service: decodes and checks wire messages, then hands plain
//! values to the host actor and the router. An allocation whose VNodes read the job's data
//! answers only once the dataset pack is ready here (`datasets`).

use crate::actors::{Alive, Allocate, Find, GetParams, Host, JobData, JobVNodes, Release, TakeSnapshot};
use crate::datasets::Datasets;
use crate::metrics::PNODE;
use crate::orchestrators::Orchestrators;
use crate::router::RouteError;
use crate::router::{Evidence, Router};
use crate::senders::Senders;
use actix::Addr;
use dcnr_mesh::convert::{self, Incoming};
use dcnr_model::ValidGraph;
use dcnr_model::graph::Source;
use dcnr_proto::limits::MAX_MESSAGE_BYTES;
use dcnr_proto::tls::Peer;
use dcnr_proto::v1::{self, p_node_server::PNodeServer};
use dcnr_vnode::VNodeSpec;
use std::sync::Arc;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, Streaming};

/// How long a VNode may take to answer a liveness probe before it counts as stuck.
const VNODE_PROBE: std::time::Duration = std::time::Duration::from_millis(500);

/// What the `PNode` service hands its calls to.
pub struct Hosting {
    /// The VNode host.
    pub host: Addr<Host>,
    /// The router.
    pub router: Router,
    /// The dataset packs.
    pub datasets: Arc<Datasets>,
    /// Where the senders of VNode messages are placed.
    pub senders: Arc<Senders>,
    /// The orchestrators joined, and which one each job answers to.
    pub orchestrators: Orchestrators,
    /// The GPU VNodes compute on when an allocation asks for it (`Host` if none is offered).
    pub gpu: dcnr_vnode::Compute,
}

/// The `PNode` gRPC service.
pub struct PNodeService {
    host: Addr<Host>,
    router: Router,
    datasets: Arc<Datasets>,
    /// Where the senders of VNode messages are placed.
    senders: Arc<Senders>,
    orchestrators: Orchestrators,
    gpu: dcnr_vnode::Compute,
    /// Plaintext mode: no caller is authenticated and the checks below pass (local development).
    plaintext: bool,
}

fn refuse(rpc: &'static str, status: Status) -> Status {
    PNODE.rpc_refused.with_label_values(&[rpc, &format!("{:?}", status.code())]).inc();
    tracing::info!(rpc, code = ?status.code(), why = status.message(), "call refused");
    status
}

impl PNodeService {
    /// The caller must be the orchestrator: only it places, releases and snapshots work.
    fn require_orchestrator<T>(&self, req: &Request<T>, rpc: &'static str) -> Result<(), Status> {
        match (self.plaintext, dcnr_proto::transport::peer(req)) {
            (true, _) | (false, Peer::Orchestrator) => Ok(()),
            (false, Peer::Anonymous) => {
                Err(refuse(rpc, Status::unauthenticated(format!("{rpc} needs the orchestrator's certificate"))))
            }
            (false, other) => Err(refuse(rpc, Status::permission_denied(format!("{other} may not call {rpc}")))),
        }
    }

    /// The caller must be a member of the mesh (the orchestrator or a registered PNode).
    fn require_member<T>(&self, req: &Request<T>, rpc: &'static str) -> Result<Peer, Status> {
        match (self.plaintext, dcnr_proto::transport::peer(req)) {
            (true, p) => Ok(p),
            (false, Peer::Anonymous) => {
                Err(refuse(rpc, Status::unauthenticated(format!("{rpc} needs a mesh member's certificate"))))
            }
            (false, p) => Ok(p),
        }
    }
}

/// Where an allocation's VNodes compute: on `gpu` when it asks for the GPU, else on the host.
/// The orchestrator counts GPU VNodes in the GPU's determinism class, so a PNode without a
/// working GPU refuses them rather than computing them on its CPU.
fn compute_for(on_gpu: bool, gpu: &dcnr_vnode::Compute) -> Result<dcnr_vnode::Compute, Status> {
    match (on_gpu, gpu.failure()) {
        (false, _) => Ok(dcnr_vnode::Compute::Host),
        (true, _) if matches!(gpu, dcnr_vnode::Compute::Host) => {
            Err(Status::failed_precondition("this pnode offers no GPU"))
        }
        (true, Some(why)) => Err(Status::failed_precondition(format!("this pnode's GPU has failed: {why}"))),
        (true, None) => Ok(gpu.clone()),
    }
}

fn unavailable<E: std::fmt::Display>(e: E) -> Status {
    Status::unavailable(format!("pnode host actor is gone: {e}"))
}

#[tonic::async_trait]
impl v1::p_node_server::PNode for PNodeService {
    async fn allocate(&self, req: Request<v1::AllocateRequest>) -> Result<Response<v1::AllocateResponse>, Status> {
        self.require_orchestrator(&req, "Allocate")?;
        let req = req.into_inner();
        let sent: ValidGraph = serde_json::from_str(&req.graph_json)
            .map_err(|e| Status::invalid_argument(format!("graph_json is not a validated graph: {e}")))?;
        // Validated again here: a PNode trusts no peer's word that a graph is consistent.
        let graph = sent.spec.validate().map_err(|e| Status::invalid_argument(format!("graph_json: {e}")))?;
        if req.in_flight == 0 || req.in_flight > dcnr_model::graph::MAX_IN_FLIGHT {
            return Err(Status::invalid_argument(format!(
                "in_flight must be between 1 and {}",
                dcnr_model::graph::MAX_IN_FLIGHT
            )));
        }
        // Whose job this is: its reports, Resolves and dataset go to that orchestrator.
        let (orchestrator, link) =
            self.orchestrators.member(&req.orchestrator_id).map_err(|e| Status::unavailable(e.to_string()))?;
        let train_samples = usize::try_from(req.train_samples)
            .map_err(|_| Status::invalid_argument("train_samples does not fit this machine"))?;
        if graph.pipelines() > 1 && train_samples == 0 {
            return Err(Status::invalid_argument("a job with several pipelines must name its train_samples"));
        }
        let compute = compute_for(req.on_gpu, &self.gpu)?;
        let specs = req
            .vnodes
            .iter()
            .map(|a| {
                let node = graph
                    .nodes
                    .get(a.vnode as usize)
                    .ok_or_else(|| Status::invalid_argument(format!("vnode {} is not in the graph", a.vnode)))?;
                let spec = VNodeSpec {
                    node: node.clone(),
                    optimizer: graph.spec.optimizer,
                    recipe: graph.spec.training.recipe(),
                    root_seed: req.root_seed,
                    in_flight: req.in_flight,
                    averaging: dcnr_vnode::rounds::Averaging::of(&graph, train_samples),
                    compute: compute.clone(),
                };
                Ok((spec, (!a.state.is_empty()).then(|| a.state.clone())))
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let batch = graph.spec.training.batch_size.max(graph.spec.training.eval_batch_size);
        let memory = specs.iter().map(|(s, _)| s.memory_estimate(batch)).sum();
        let reader = specs.iter().find(|(s, _)| s.node.inputs.iter().any(|i| !matches!(i, Source::Node(_))));
        let data = match reader {
            // Served models get their features inline, from the orchestrator.
            _ if req.serving => None,
            None => None,
            Some((s, _)) if req.dataset_sha256.is_empty() => {
                return Err(Status::invalid_argument(format!(
                    "vnode {} reads the job's data, but the allocation names no dataset pack",
                    s.node.id
                )));
            }
            Some(_) => {
                let splits =
                    self.datasets.obtain(&req.dataset_sha256, req.dataset_bytes, &link).await.map_err(|e| {
                        Status::failed_precondition(format!("the job's dataset is not available here: {e}"))
                    })?;
                let d = &graph.spec.data;
                if splits.train.features() != d.feature_size || splits.classes > d.classes as u32 {
                    return Err(Status::invalid_argument(format!(
                        "dataset pack {} has {} features and {} classes; the graph wants {} features and at most {} classes",
                        req.dataset_sha256,
                        splits.train.features(),
                        splits.classes,
                        d.feature_size,
                        d.classes
                    )));
                }
                let t = &graph.spec.training;
                Some(JobData { splits, batch_size: t.batch_size, eval_batch_size: t.eval_batch_size })
            }
        };
        let normalize = graph.spec.data.normalize;
        let n = self
            .host
            .send(Allocate {
                job: req.job_id.clone(),
                generation: req.generation,
                specs,
                memory,
                normalize,
                data,
                sealed: req.seal_messages,
            })
            .await
            .map_err(unavailable)?
            .map_err(Status::failed_precondition)?;
        self.orchestrators.assign(&req.job_id, &orchestrator);
        self.senders.allocated(&req.job_id, req.generation, Arc::new(graph), req.serving);
        tracing::info!(job = %req.job_id, vnodes = n, generation = req.generation, on = compute.name(), "allocated VNodes");
        Ok(Response::new(v1::AllocateResponse { allocated: n }))
    }

    async fn release(&self, req: Request<v1::ReleaseRequest>) -> Result<Response<v1::ReleaseResponse>, Status> {
        self.require_orchestrator(&req, "Release")?;
        let v1::ReleaseRequest { job_id: job, orchestrator_id } = req.into_inner();
        if !self.orchestrators.may_release(&job, &orchestrator_id) {
            // Another orchestrator has taken the job over and placed it here since.
            tracing::info!(%job, from = %orchestrator_id, "not releasing a job another orchestrator allocated here");
            return Ok(Response::new(v1::ReleaseResponse { released: 0 }));
        }
        let released = self.host.send(Release(job.clone())).await.map_err(unavailable)?;
        self.orchestrators.released(&job);
        self.senders.released(&job);
        tracing::info!(%job, released, "released VNodes");
        Ok(Response::new(v1::ReleaseResponse { released }))
    }

    async fn exchange(&self, req: Request<Streaming<v1::VNodeMessage>>) -> Result<Response<v1::ExchangeAck>, Status> {
        let peer = self.require_member(&req, "Exchange")?;
        let mut stream = req.into_inner();
        let mut received = 0u64;
        while let Some(m) = stream.message().await? {
            PNODE.wire_messages_received.inc();
            PNODE.wire_bytes_received.inc_by(prost::Message::encoded_len(&m) as u64);
            let evidence = evidence_of(&m, &peer);
            let (to, incoming) = convert::message_from_wire(m).map_err(|e| Status::invalid_argument(e.to_string()))?;
            // Data feeds come only from the orchestrator, VNode traffic only from PNodes, except
            // the features of a served model, which the orchestrator sends inline.
            let routed = match (incoming, &peer) {
                (Incoming::Inbound(inbound), Peer::Orchestrator) if !self.plaintext => {
                    if let Err(e) = self.senders.check_served_input(&to.job, to.vnode, &inbound) {
                        return Err(refuse("Exchange", Status::permission_denied(e.to_string())));
                    }
                    self.router.deliver_local(to, inbound, evidence)
                }
                (Incoming::Feed(_), Peer::PNode(_)) if !self.plaintext => {
                    return Err(refuse(
                        "Exchange",
                        Status::permission_denied(format!("{peer} may not send this kind of message")),
                    ));
                }
                (Incoming::Inbound(inbound), Peer::PNode(sender)) if !self.plaintext => {
                    if let Err(e) = self.senders.check(&to.job, to.generation, to.vnode, &inbound, sender).await {
                        return Err(refuse("Exchange", Status::permission_denied(e.to_string())));
                    }
                    self.router.deliver_local(to, inbound, evidence)
                }
                (Incoming::Inbound(inbound), _) => self.router.deliver_local(to, inbound, evidence),
                (Incoming::Feed(feed), _) => self.router.deliver_feed(to, feed),
            };
            match routed {
                Ok(()) => {}
                // A message for a VNode released here (a relocation or a finished job) is stale,
                // not a broken stream: later messages on it may be for VNodes still hosted.
                Err(e @ RouteError::NotHosted(..)) => {
                    tracing::debug!(error = %e, "message for a VNode not hosted here dropped");
                    self.router.count_stale();
                }
                Err(e @ RouteError::Full(..)) => {
                    return Err(refuse("Exchange", Status::resource_exhausted(e.to_string())));
                }
            }
            received += 1;
        }
        Ok(Response::new(v1::ExchangeAck { received }))
    }

    async fn snapshot(&self, req: Request<v1::SnapshotRequest>) -> Result<Response<v1::SnapshotResponse>, Status> {
        self.require_orchestrator(&req, "Snapshot")?;
        let req = req.into_inner();
        let actor =
            self.host.send(Find(req.job_id.clone(), req.vnode)).await.map_err(unavailable)?.ok_or_else(|| {
                Status::not_found(format!("vnode {} of job {} is not hosted here", req.vnode, req.job_id))
            })?;
        let state = actor.send(TakeSnapshot).await.map_err(unavailable)?.map_err(Status::failed_precondition)?;
        Ok(Response::new(v1::SnapshotResponse { state }))
    }

    async fn ping(&self, req: Request<v1::PingRequest>) -> Result<Response<v1::PingResponse>, Status> {
        self.require_member(&req, "Ping")?;
        let req = req.into_inner();
        let bytes = match &req.payload {
            Some(p) => {
                convert::tensor_from_wire(Some(p)).map_err(|e| Status::invalid_argument(e.to_string()))?.numel() as u64
                    * 4
            }
            None => 0,
        };
        let mut busy_vnodes = Vec::new();
        if !req.job_id.is_empty() {
            let vnodes = self.host.send(JobVNodes(req.job_id)).await.map_err(unavailable)?;
            let answers = vnodes.into_iter().map(|(v, a)| async move { (v, a.send(Alive).timeout(VNODE_PROBE).await) });
            busy_vnodes = futures::future::join_all(answers)
                .await
                .into_iter()
                .filter_map(|(v, r)| r.is_err().then_some(v))
                .collect();
        }
        Ok(Response::new(v1::PingResponse { bytes, stale_dropped: self.router.stale_dropped(), busy_vnodes }))
    }

    async fn fetch_params(
        &self,
        req: Request<v1::FetchParamsRequest>,
    ) -> Result<Response<v1::FetchParamsResponse>, Status> {
        self.require_orchestrator(&req, "FetchParams")?;
        let req = req.into_inner();
        let actor =
            self.host.send(Find(req.job_id.clone(), req.vnode)).await.map_err(unavailable)?.ok_or_else(|| {
                Status::not_found(format!("vnode {} of job {} is not hosted here", req.vnode, req.job_id))
            })?;
        let (params, version) = actor.send(GetParams).await.map_err(unavailable)?.map_err(Status::internal)?;
        Ok(Response::new(v1::FetchParamsResponse {
            params: params.iter().map(convert::tensor_to_wire).collect(),
            version,
        }))
    }
}

/// Serves the `PNode` service on `listener`, and on the connections `relayed` hands over (those
/// opened to it through a relay), with Nagle off and explicit limits; with `tls`,
/// over TLS with every caller's certificate checked (None: plaintext, local development only).
pub async fn serve(
    listener: TcpListener,
    relayed: tokio::sync::mpsc::Receiver<tokio::net::TcpStream>,
    tls: Option<Arc<dcnr_proto::tls::ServerTls>>,
    hosting: Hosting,
) -> Result<(), tonic::transport::Error> {
    let plaintext = tls.is_none();
    let incoming = dcnr_proto::transport::incoming_with(listener, Some(relayed), tls);
    let Hosting { host, router, datasets, senders, orchestrators, gpu } = hosting;
    let svc = PNodeServer::new(PNodeService { host, router, datasets, senders, orchestrators, gpu, plaintext })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    dcnr_proto::transport::server().add_service(svc).serve_with_incoming(incoming).await
}

/// What a message from `peer` proves about its tensor: checked on arrival, so a VNode keeps only
/// seals that hold, signed by the PNode that sent them.
fn evidence_of(m: &v1::VNodeMessage, peer: &Peer) -> Evidence {
    let Some((route, tensor)) = convert::wire_seal_route(m) else { return Evidence::None };
    let Some(seal) = &m.seal else { return Evidence::Unproven("the tensor carries no seal".into()) };
    let to = convert::Target { job: m.job_id.clone(), vnode: m.to_vnode, generation: m.generation };
    match dcnr_proto::seal::check_sent(Some(seal), tensor, &convert::seal_context(&to, m.micro_batch, route)) {
        Ok((key, _)) => match peer {
            Peer::PNode(sender) if dcnr_proto::identity::pnode_id(&key) != *sender => {
                Evidence::Unproven(format!("sealed by {}, sent by {sender}", dcnr_proto::identity::pnode_id(&key)))
            }
            _ => Evidence::Sealed(seal.clone()),
        },
        Err(e) => Evidence::Unproven(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dcnr_proto::seal::{self, Route};

    #[test]
    fn only_a_seal_of_the_sending_pnode_for_this_very_message_is_kept() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let sender = Peer::PNode(dcnr_proto::identity::pnode_id(&key.verifying_key().to_bytes()));
        let to = convert::Target { job: "j".into(), vnode: 1, generation: 4 };
        let tensor = dcnr_vnode::HostTensor::f32(vec![1, 2], vec![0.5, -1.0]);
        let plain = convert::forward_message(&to, 9, dcnr_vnode::Phase::Train, 0, &tensor);
        let ctx = convert::seal_context(&to, 9, Route::Forward { port: 0 });
        let hash = seal::tensor_sha256(&convert::tensor_to_wire(&tensor));
        let sealed = v1::VNodeMessage { seal: Some(seal::sign(&key, &ctx, hash)), ..plain.clone() };

        assert!(matches!(evidence_of(&sealed, &sender), Evidence::Sealed(_)));
        assert!(matches!(evidence_of(&plain, &sender), Evidence::Unproven(w) if w.contains("no seal")));
        let other = Peer::PNode("pn-0000000000000000".into());
        assert!(matches!(evidence_of(&sealed, &other), Evidence::Unproven(w) if w.contains("sealed by")));
        // The seal of another micro-batch, or over another tensor, does not hold.
        let moved = v1::VNodeMessage { micro_batch: 10, ..sealed.clone() };
        assert!(matches!(evidence_of(&moved, &sender), Evidence::Unproven(w) if w.contains("signature")));
        let swapped = convert::forward_message(
            &to,
            9,
            dcnr_vnode::Phase::Train,
            0,
            &dcnr_vnode::HostTensor::f32(vec![1, 2], vec![0.0, 0.0]),
        );
        let swapped = v1::VNodeMessage { seal: sealed.seal.clone(), ..swapped };
        assert!(matches!(evidence_of(&swapped, &sender), Evidence::Unproven(w) if w.contains("hash")));
        // Evaluation traffic is never sealed.
        let eval = convert::forward_message(&to, 9, dcnr_vnode::Phase::Eval, 0, &tensor);
        assert_eq!(evidence_of(&eval, &sender), Evidence::None);
    }

    #[test]
    fn gpu_work_is_refused_without_a_working_gpu() {
        use dcnr_vnode::Compute;
        assert!(matches!(compute_for(false, &Compute::Host), Ok(Compute::Host)));
        let e = compute_for(true, &Compute::Host).unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.message().contains("offers no GPU"), "{e}");
    }

    /// On lavapipe in CI.
    #[cfg(feature = "gpu")]
    #[test]
    fn gpu_work_goes_to_a_working_gpu_and_is_refused_once_it_failed() {
        use dcnr_vnode::Compute;
        let adapter = dcnr_vnode::gpu::adapters().into_iter().next().expect("an adapter (lavapipe)");
        let gpu = dcnr_vnode::gpu::Gpu::open(adapter);
        let offered = Compute::Gpu(gpu.clone());
        assert!(compute_for(true, &offered).unwrap().on_gpu());
        assert!(matches!(compute_for(false, &offered), Ok(Compute::Host)));
        gpu.fail("a rehearsed device loss");
        let e = compute_for(true, &offered).unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.message().contains("a rehearsed device loss"), "{e}");
    }
}

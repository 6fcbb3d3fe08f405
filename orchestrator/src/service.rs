//! The gRPC adapter of the `Orchestrator` service: checks and converts wire messages, then asks
//! the registry and job-table actors.

use crate::admission::{AdmissionError, TokenCheck};
use crate::job::{Observation, Observed};
use crate::job_table::{Evacuate, Get, HostedOn, Infer, JobTable, List, Resolve, Resume, Submit, SubmitError, Watch};
use crate::registry::{
    self, Caps, Heartbeat, ListPNodes, Lookup, MarkLost, PNodeView, Register, Registration, Registry,
};
use crate::serve::InferError;
use crate::status::{JobEvent, JobState, JobStatus};
use crate::verify::StepInput;
use actix::Addr;
use dcnr_model::envelope::Envelope;
use dcnr_proto::PROTOCOL_VERSION;
use dcnr_proto::seal::Route;
use dcnr_proto::tls::Peer;
use dcnr_proto::v1::{self, orchestrator_server::OrchestratorServer};
use dcnr_vnode::Phase;
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

/// Longest capability string (arch, OS, GPU, determinism class) a PNode may advertise.
const MAX_CAPABILITY_TEXT: usize = 256;

/// Who may call what (docs/SECURITY.md).
#[derive(Debug)]
pub struct Access {
    /// The mesh CA: issues PNode certificates at registration. None: plaintext, nobody is
    /// authenticated and every check below passes (local development only).
    pub ca: Option<crate::ca::SharedCa>,
    /// Lifetime of the PNode certificates it issues.
    pub cert_lifetime: Duration,
    /// Maintainer credentials, kept as hashes.
    pub maintainers: Vec<crate::admission::TrustedToken>,
    /// Whether job status and the PNode list are open to anyone who can connect.
    pub open_reads: bool,
}

/// Metadata key of a maintainer's token (`authorization: Bearer <token>`).
pub const AUTHORIZATION: &str = "authorization";

impl Access {
    fn refuse(rpc: &'static str, status: Status) -> Status {
        crate::metrics::ORCHESTRATOR.refused(rpc, status.code());
        tracing::info!(rpc, code = ?status.code(), why = status.message(), "call refused");
        status
    }

    /// The caller must hold PNode `claimed`'s certificate.
    fn as_pnode<T>(&self, req: &Request<T>, claimed: &str, rpc: &'static str) -> Result<(), Status> {
        if self.ca.is_none() {
            return Ok(());
        }
        match dcnr_proto::transport::peer(req) {
            Peer::PNode(id) if id == claimed => Ok(()),
            Peer::Anonymous => Err(Self::refuse(
                rpc,
                Status::unauthenticated(format!("{rpc} needs the certificate of pnode {claimed}; register first")),
            )),
            other => Err(Self::refuse(
                rpc,
                Status::permission_denied(format!("{other} may not call {rpc} as pnode {claimed}")),
            )),
        }
    }

    /// The caller must be some registered PNode; returns its id (None in plaintext mode).
    fn any_pnode<T>(&self, req: &Request<T>, rpc: &'static str) -> Result<Option<String>, Status> {
        if self.ca.is_none() {
            return Ok(None);
        }
        match dcnr_proto::transport::peer(req) {
            Peer::PNode(id) => Ok(Some(id)),
            Peer::Anonymous => Err(Self::refuse(
                rpc,
                Status::unauthenticated(format!("{rpc} needs a PNode certificate; register first")),
            )),
            other => Err(Self::refuse(rpc, Status::permission_denied(format!("{other} may not call {rpc}")))),
        }
    }

    /// Whether the request carries a maintainer token.
    fn maintainer_token<T>(&self, req: &Request<T>) -> Option<bool> {
        let value = req.metadata().get(AUTHORIZATION)?.to_str().ok()?;
        let token = value.strip_prefix("Bearer ").unwrap_or(value);
        Some(self.maintainers.iter().any(|m| m.check(token) == TokenCheck::Matches))
    }

    /// The caller must present a maintainer token.
    fn as_maintainer<T>(&self, req: &Request<T>, rpc: &'static str) -> Result<(), Status> {
        if self.ca.is_none() {
            return Ok(());
        }
        match self.maintainer_token(req) {
            Some(true) => Ok(()),
            Some(false) => {
                Err(Self::refuse(rpc, Status::permission_denied(format!("{rpc}: the maintainer token is not valid"))))
            }
            None => Err(Self::refuse(
                rpc,
                Status::unauthenticated(format!(
                    "{rpc} needs a maintainer token (DCNR_TOKEN or --token-file; the orchestrator keeps one in its TLS directory)"
                )),
            )),
        }
    }

    /// Reads: open, or for maintainers.
    fn as_reader<T>(&self, req: &Request<T>, rpc: &'static str) -> Result<(), Status> {
        // A peer orchestrator forwards only reads it allowed its own caller.
        if self.open_reads || dcnr_proto::transport::peer(req) == Peer::Orchestrator {
            Ok(())
        } else {
            self.as_maintainer(req, rpc)
        }
    }

    /// A certificate for a PNode that just proved its key.
    fn issue(&self, id: &str, key: &[u8; 32]) -> Result<(Vec<Vec<u8>>, u64), Status> {
        let Some(ca) = &self.ca else { return Ok((Vec::new(), 0)) };
        let issued = ca
            .issue_pnode(id, key, self.cert_lifetime)
            .map_err(|e| Status::internal(format!("cannot issue a certificate: {e}")))?;
        let expires = issued.not_after.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        Ok((issued.chain, expires))
    }
}

/// The `Orchestrator` gRPC service.
pub struct OrchestratorService {
    /// Who may call what.
    pub access: std::sync::Arc<Access>,
    /// PNode registry.
    pub registry: Addr<Registry>,
    /// Job table.
    pub jobs: Addr<JobTable>,
    /// Heartbeat period asked of PNodes.
    pub heartbeat: Duration,
    /// Registration challenges and the trusted-mode token.
    pub admission: std::sync::Arc<crate::admission::Admission>,
    /// Where reports are also counted for the dashboard and metrics.
    pub telemetry: crate::telemetry::Telemetry,
    /// The dataset packs published for jobs, which PNodes fetch.
    pub data: crate::data::DataCache,
    /// The artifact store shared with peer orchestrators, which answers for their jobs.
    pub store: Option<std::sync::Arc<dyn crate::artifacts::ObjectStore>>,
    /// `host:port` of the relay this orchestrator offers PNodes behind NAT, if it runs one.
    pub relay: Option<String>,
    /// This orchestrator's instance id, told to PNodes in the challenge.
    pub instance: String,
}

/// How long the registration probe waits for a PNode's endpoint to accept a connection.
const REACH_PROBE: Duration = Duration::from_secs(2);

fn gone<E: std::fmt::Display>(e: E) -> Status {
    Status::unavailable(format!("orchestrator actor unavailable: {e}"))
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Wire form of a job status.
pub fn status_to_wire(s: &JobStatus) -> v1::JobStatus {
    v1::JobStatus {
        job_id: s.job_id.clone(),
        state: match s.state {
            JobState::Pending => v1::JobState::Pending,
            JobState::Running => v1::JobState::Running,
            JobState::Succeeded => v1::JobState::Succeeded,
            JobState::Failed => v1::JobState::Failed,
            JobState::Recovering => v1::JobState::Recovering,
        } as i32,
        model: s.model.clone(),
        steps_done: s.steps_done,
        steps_total: s.steps_total,
        last_loss: s.last_loss.unwrap_or(f32::NAN),
        error: s.error.clone().unwrap_or_default(),
        summary_json: s.summary.as_ref().and_then(|x| serde_json::to_string(x).ok()).unwrap_or_default(),
        pipelines: s.pipelines,
        rounds: s.rounds,
        members: s.members.iter().map(|m| v1::PipelineMembers { pnodes: m.clone() }).collect(),
        generation: s.generation,
        samples_per_s: s.samples_per_s,
    }
}

fn event_to_wire(job: &str, e: JobEvent) -> v1::JobEvent {
    use v1::job_event::Body;
    let body = match e {
        JobEvent::Progress { step, steps_total, loss, samples_per_s, epoch } => {
            Body::Progress(v1::Progress { step, steps_total, loss, samples_per_s, epoch })
        }
        JobEvent::Evaluation { epoch, accuracy, loss, .. } => {
            Body::Evaluation(v1::Evaluation { epoch, accuracy, loss })
        }
        JobEvent::Log(text) => Body::Log(text),
        JobEvent::Finished(s) => Body::Finished(status_to_wire(&s)),
    };
    v1::JobEvent { job_id: job.to_string(), at_ms: now_ms(), body: Some(body) }
}

fn pnode_to_wire(p: &PNodeView) -> v1::PNodeInfo {
    v1::PNodeInfo {
        pnode_id: p.id.clone(),
        name: p.name.clone(),
        endpoint: p.endpoint.clone(),
        capabilities: Some(v1::Capabilities {
            cores: p.caps.cores,
            memory_bytes: p.caps.memory_bytes,
            arch: p.caps.arch.clone(),
            os: p.caps.os.clone(),
            gpu: p.caps.gpu.clone(),
            determinism_class: p.caps.determinism_class.clone(),
            gpu_gflops: f64::from(p.caps.gpu_gflops),
            gpu_determinism_class: p.caps.gpu_determinism_class.clone(),
        }),
        health: p.health.name().into(),
        hosted_vnodes: p.hosted_vnodes,
        trusted: p.trusted,
        standing: p.standing.name().into(),
        reputation: p.reputation,
        quarantine_reason: p.quarantine_reason.clone().unwrap_or_default(),
        public_key: p.public_key.clone(),
        relayed_via: p.reach.relayed_via.clone().unwrap_or_default(),
        relay_offer: p.reach.relay_offer.clone().unwrap_or_default(),
        unreachable: !p.reach.reachable(),
    }
}

/// Longest text from a peer that is kept (in events, statuses, records): the rest is cut.
const MAX_PEER_TEXT: usize = 4096;

/// `text` cut to [`MAX_PEER_TEXT`] bytes at a character boundary, saying so.
fn bounded_text(mut text: String) -> String {
    if text.len() > MAX_PEER_TEXT {
        let mut end = MAX_PEER_TEXT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let cut = text.len() - end;
        text.truncate(end);
        text.push_str(&format!(" [{cut} more bytes cut]"));
    }
    text
}

/// Most inputs one step report may name: far above any node's ports plus consumers.
const MAX_STEP_INPUTS: usize = 256;

/// The evidence of what a VNode consumed, checked for shape (the signatures are checked only
/// when a verification needs them).
fn step_inputs_from_wire(inputs: Vec<v1::StepInput>, generation: u32) -> Result<Vec<StepInput>, Status> {
    if inputs.len() > MAX_STEP_INPUTS {
        return Err(Status::invalid_argument(format!("a step report names more than {MAX_STEP_INPUTS} inputs")));
    }
    inputs
        .into_iter()
        .map(|i| {
            let bad = |what: &str| Status::invalid_argument(format!("step input: {what}"));
            let route = Route::of_input(&i);
            let s = i.seal.ok_or_else(|| bad("no hash"))?;
            let tensor_sha256 = s.tensor_sha256.as_slice().try_into().map_err(|_| bad("hash is not 32 bytes"))?;
            let seal = match (s.public_key.len(), s.signature.len()) {
                (0, 0) => None,
                _ => Some((
                    s.public_key.as_slice().try_into().map_err(|_| bad("public key is not 32 bytes"))?,
                    s.signature.as_slice().try_into().map_err(|_| bad("signature is not 64 bytes"))?,
                )),
            };
            Ok(StepInput { route, tensor_sha256, seal, generation })
        })
        .collect()
}

fn report_from_wire(r: v1::VNodeReport) -> Result<Observation, Status> {
    use v1::v_node_report::Body;
    let body = match r.body {
        Some(Body::Done(d)) => Observed::Done {
            compute_us: d.compute_us,
            cpu_us: d.cpu_us,
            bytes_in: d.bytes_in,
            bytes_out: d.bytes_out,
            output_sha256: hex::encode(&d.output_sha256),
            round_sha256: (!d.round_sha256.is_empty()).then(|| hex::encode(&d.round_sha256)),
            inputs: step_inputs_from_wire(d.inputs, r.generation)?,
        },
        Some(Body::Loss(l)) => Observed::Loss {
            phase: match dcnr_mesh::convert::phase_from_wire(l.phase) {
                Some(p @ (Phase::Train | Phase::Eval)) => p,
                _ => return Err(Status::invalid_argument("loss report of no training or evaluation phase")),
            },
            loss: l.loss,
            correct: l.correct,
            count: l.count,
        },
        Some(Body::Predictions(p)) => Observed::Predictions(
            dcnr_mesh::convert::tensor_from_wire(p.probabilities.as_ref())
                .map_err(|e| Status::invalid_argument(format!("predictions: {e}")))?,
        ),
        Some(Body::Failure(f)) => Observed::Failure(bounded_text(f.message)),
        Some(Body::Rejected(x)) => Observed::Rejected {
            from_vnode: (!x.from_data).then_some(x.from_vnode),
            reason: x.reason.chars().take(1024).collect(),
        },
        None => return Err(Status::invalid_argument("report has no body")),
    };
    Ok(Observation {
        job_id: r.job_id,
        vnode: r.vnode,
        mb: r.micro_batch,
        pnode: r.pnode_id,
        generation: r.generation,
        body,
    })
}

/// Longest a drain call waits, whatever the PNode asks for.
const MAX_DRAIN: Duration = Duration::from_secs(600);

/// Pings a PNode whose connection broke; declares it lost if it does not answer.
async fn probe_pnode(registry: Addr<Registry>, id: String) {
    let Ok(Some(view)) = registry.send(Lookup(id.clone())).await else { return };
    let alive = async {
        let mut c = crate::job::pnode_client(&view.endpoint, &dcnr_proto::tls::Expect::PNode(id.clone())).ok()?;
        let mut req = Request::new(v1::PingRequest { payload: None, job_id: String::new() });
        req.set_timeout(Duration::from_millis(500));
        c.ping(req).await.ok()
    };
    if alive.await.is_none() {
        registry.do_send(MarkLost(id));
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::JobEvent, Status>> + Send>>;

type ChunkStream = Pin<Box<dyn Stream<Item = Result<v1::DatasetChunk, Status>> + Send>>;

/// A published pack as a stream of chunks, each made only when the PNode is ready for it.
fn pack_stream(packed: std::sync::Arc<crate::data::Packed>) -> ChunkStream {
    use tokio_stream::StreamExt;
    let total = packed.bytes.len() as u64;
    Box::pin(tokio_stream::iter(0..packed.chunk_count()).map(move |i| {
        let (offset, data) = packed.chunk(i).unwrap_or((total, &[]));
        crate::metrics::ORCHESTRATOR.pack_sent(data.len());
        Ok(v1::DatasetChunk { offset, data: data.to_vec(), total })
    }))
}

#[tonic::async_trait]
impl v1::orchestrator_server::Orchestrator for OrchestratorService {
    async fn register(&self, req: Request<v1::RegisterRequest>) -> Result<Response<v1::RegisterResponse>, Status> {
        let r = req.into_inner();
        if r.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "protocol version {} is not supported: this orchestrator speaks dcnr.v1 protocol version {}; upgrade the pnode",
                r.protocol_version, PROTOCOL_VERSION
            )));
        }
        let url_ok = r.endpoint.starts_with("http://") || r.endpoint.starts_with("https://");
        if !url_ok || r.endpoint.len() > 512 || r.name.len() > 256 {
            return Err(Status::invalid_argument(format!("bad endpoint {:?} or name", bounded_text(r.endpoint))));
        }
        if dcnr_proto::relay::has_path(&r.endpoint) {
            // Relayed endpoints are assigned here; a claimed one could point at another PNode.
            return Err(Status::invalid_argument(format!(
                "endpoint {:?} has a path: advertise scheme://host:port",
                bounded_text(r.endpoint)
            )));
        }
        if !r.relay_offer.is_empty() && !dcnr_proto::relay::is_relay_address(&r.relay_offer) {
            return Err(Status::invalid_argument(format!(
                "relay offer {:?} is not host:port",
                bounded_text(r.relay_offer)
            )));
        }
        if let Some(c) = &r.capabilities
            && [&c.arch, &c.os, &c.gpu, &c.determinism_class, &c.gpu_determinism_class]
                .iter()
                .any(|s| s.len() > MAX_CAPABILITY_TEXT)
        {
            return Err(Status::invalid_argument(format!(
                "capability strings are limited to {MAX_CAPABILITY_TEXT} bytes"
            )));
        }
        // Proof of identity: a valid signature over a nonce this orchestrator issued to this key.
        let key = dcnr_proto::identity::verify_registration(&r).map_err(|e| Status::unauthenticated(e.to_string()))?;
        self.admission
            .challenges
            .lock()
            .map_err(|_| Status::internal("admission state is poisoned"))?
            .redeem(&r.nonce, &key, Instant::now())
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        let trusted = match self.admission.token.check(&r.trusted_token) {
            TokenCheck::Matches => true,
            TokenCheck::Absent | TokenCheck::NotConfigured => false,
            TokenCheck::Mismatch => {
                return Err(Status::permission_denied(
                    "the trusted-mode token does not match this orchestrator's; fix --trusted-token-file or leave it out",
                ));
            }
        };
        let id = dcnr_proto::identity::pnode_id(&key);
        // Behind NAT, declared or found by a connection that does not get through: reached
        // through a relay, over connections the PNode opens itself.
        let direct = !r.behind_nat && dcnr_mesh::relay::accepts_connections(&r.endpoint, REACH_PROBE).await;
        let relayed_via = if direct {
            None
        } else {
            let pnodes = self.registry.send(ListPNodes).await.map_err(gone)?;
            let relay = crate::registry::choose_relay(self.relay.as_deref(), &pnodes, &id);
            match &relay {
                Some(relay) => tracing::info!(
                    pnode = %id, declared = r.behind_nat, %relay, "pnode cannot accept connections; reached through a relay"
                ),
                None => tracing::warn!(
                    pnode = %id,
                    endpoint = %bounded_text(r.endpoint.clone()),
                    "pnode cannot accept connections and no relay is offered: it gets no work (run the orchestrator \
                     or a reachable pnode with --relay-listen)"
                ),
            }
            relay
        };
        let endpoint = match &relayed_via {
            Some(relay) => {
                let scheme = r.endpoint.split_once("://").map_or("https", |(s, _)| s);
                dcnr_proto::relay::relayed_url(scheme, relay, &id)
            }
            None => r.endpoint,
        };
        let reach = crate::registry::Reach {
            relayed_via: relayed_via.clone(),
            relay_offer: (!r.relay_offer.is_empty() && direct).then_some(r.relay_offer),
            relay_listening: false,
            unreachable: !direct && relayed_via.is_none(),
        };
        let c = r.capabilities.unwrap_or_default();
        let caps = Caps {
            cores: c.cores.max(1),
            memory_bytes: c.memory_bytes,
            arch: c.arch,
            os: c.os,
            gpu: c.gpu,
            determinism_class: c.determinism_class,
            // A peer's number: whatever it sends becomes a whole number in range.
            gpu_gflops: if c.gpu_gflops.is_finite() {
                c.gpu_gflops.clamp(0.0, f64::from(u32::MAX)).round() as u32
            } else {
                0
            },
            gpu_determinism_class: c.gpu_determinism_class,
        };
        let register = Register(Registration {
            id,
            public_key: hex::encode(key),
            trusted,
            name: r.name,
            endpoint: endpoint.clone(),
            caps,
            reach,
        });
        let id =
            self.registry.send(register).await.map_err(gone)?.map_err(|e| Status::permission_denied(e.to_string()))?;
        let (certificate_chain, certificate_expires_unix_ms) = self.access.issue(&id, &key)?;
        Ok(Response::new(v1::RegisterResponse {
            pnode_id: id,
            heartbeat_interval_ms: self.heartbeat.as_millis() as u32,
            protocol_version: PROTOCOL_VERSION,
            trusted,
            certificate_chain,
            certificate_expires_unix_ms,
            unreachable: !direct && relayed_via.is_none(),
            relay: relayed_via.unwrap_or_default(),
            endpoint,
        }))
    }

    async fn challenge(&self, req: Request<v1::ChallengeRequest>) -> Result<Response<v1::ChallengeResponse>, Status> {
        let source = req.extensions().get::<dcnr_proto::transport::PeerInfo>().and_then(|i| i.remote).map(|a| a.ip());
        let mut nonce = [0u8; dcnr_proto::identity::NONCE_BYTES];
        getrandom::fill(&mut nonce).map_err(|e| Status::internal(format!("no randomness for a nonce: {e}")))?;
        let issued = self
            .admission
            .challenges
            .lock()
            .map_err(|_| Status::internal("admission state is poisoned"))?
            .issue(&req.get_ref().public_key, nonce, source, Instant::now())
            .map_err(|e| match e {
                AdmissionError::Busy | AdmissionError::SourceBusy => Status::resource_exhausted(e.to_string()),
                _ => Status::invalid_argument(e.to_string()),
            })?;
        Ok(Response::new(v1::ChallengeResponse {
            nonce: issued.to_vec(),
            ttl_ms: crate::admission::CHALLENGE_TTL.as_millis() as u32,
            orchestrator_id: self.instance.clone(),
        }))
    }

    async fn heartbeat(&self, req: Request<v1::HeartbeatRequest>) -> Result<Response<v1::HeartbeatResponse>, Status> {
        self.access.as_pnode(&req, &req.get_ref().pnode_id, "Heartbeat")?;
        let r = req.into_inner();
        let id = r.pnode_id.clone();
        let known = self
            .registry
            .send(Heartbeat { id: r.pnode_id, hosted_vnodes: r.hosted_vnodes, relay_listening: r.relay_listening })
            .await
            .map_err(gone)?;
        let (mut certificate_chain, mut certificate_expires_unix_ms) = (Vec::new(), 0);
        if known && r.renew_certificate {
            let view = self.registry.send(Lookup(id.clone())).await.map_err(gone)?;
            let key: Option<[u8; 32]> =
                view.and_then(|v| hex::decode(v.public_key).ok()).and_then(|k| k.try_into().ok());
            if let Some(key) = key {
                (certificate_chain, certificate_expires_unix_ms) = self.access.issue(&id, &key)?;
            }
        }
        Ok(Response::new(v1::HeartbeatResponse { known, certificate_chain, certificate_expires_unix_ms }))
    }

    async fn resolve(&self, req: Request<v1::ResolveRequest>) -> Result<Response<v1::ResolveResponse>, Status> {
        self.access.any_pnode(&req, "Resolve")?;
        let r = req.into_inner();
        let endpoint = self
            .jobs
            .send(Resolve(r.job_id.clone(), r.vnode))
            .await
            .map_err(gone)?
            .ok_or_else(|| Status::not_found(format!("vnode {} of job {} is not placed", r.vnode, r.job_id)))?;
        // Which PNode that is: a receiver checks that a message comes from where its sender is placed.
        let pnodes = self.registry.send(ListPNodes).await.map_err(gone)?;
        let pnode_id = pnodes.into_iter().find(|p| p.endpoint == endpoint).map(|p| p.id).unwrap_or_default();
        Ok(Response::new(v1::ResolveResponse { pnode_id, endpoint }))
    }

    async fn report(&self, req: Request<Streaming<v1::VNodeReport>>) -> Result<Response<v1::ReportAck>, Status> {
        // Every report on the stream must be for the caller's own id.
        let caller = self.access.any_pnode(&req, "Report")?;
        let mut s = req.into_inner();
        let mut received = 0;
        let mut sender = String::new();
        let end = loop {
            match s.message().await {
                Ok(Some(r)) => {
                    if let Some(caller) = caller.as_deref().filter(|c| *c != r.pnode_id) {
                        let shown: String = r.pnode_id.chars().take(64).collect();
                        break Err(Access::refuse(
                            "Report",
                            Status::permission_denied(format!("pnode {caller} may not report for pnode {shown}")),
                        ));
                    }
                    if sender != r.pnode_id {
                        sender.clone_from(&r.pnode_id);
                    }
                    let r = report_from_wire(r)?;
                    crate::metrics::ORCHESTRATOR.report(&r);
                    self.telemetry.report(&r);
                    self.jobs.do_send(r);
                    received += 1;
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        // A PNode keeps its report stream open for life; when it breaks, the PNode has likely
        // died, and a probe finds out now rather than after the heartbeat timeout.
        if !sender.is_empty() {
            tokio::spawn(probe_pnode(self.registry.clone(), sender));
        }
        end?;
        Ok(Response::new(v1::ReportAck { received }))
    }

    async fn drain(&self, req: Request<v1::DrainRequest>) -> Result<Response<v1::DrainResponse>, Status> {
        // A PNode may drain itself; a maintainer any PNode.
        if self.access.maintainer_token(&req) != Some(true) {
            self.access.as_pnode(&req, &req.get_ref().pnode_id, "Drain")?;
        }
        let r = req.into_inner();
        let endpoint = self
            .registry
            .send(registry::Drain(r.pnode_id.clone()))
            .await
            .map_err(gone)?
            .ok_or_else(|| Status::not_found(format!("pnode {} is not registered", r.pnode_id)))?;
        self.jobs.do_send(Evacuate(r.pnode_id.clone()));
        let deadline = tokio::time::Instant::now() + Duration::from_millis(u64::from(r.timeout_ms)).min(MAX_DRAIN);
        let remaining = loop {
            let n = self.jobs.send(HostedOn(endpoint.clone())).await.map_err(gone)?;
            if n == 0 || tokio::time::Instant::now() >= deadline {
                break n;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        tracing::info!(pnode = %r.pnode_id, remaining, "drain finished");
        Ok(Response::new(v1::DrainResponse { remaining_vnodes: remaining as u32 }))
    }

    async fn submit_job(&self, req: Request<v1::SubmitJobRequest>) -> Result<Response<v1::SubmitJobResponse>, Status> {
        self.access.as_maintainer(&req, "SubmitJob")?;
        let r = req.into_inner();
        let envelope = if r.envelope_json.is_empty() {
            let mut env = Envelope::from_graph(&r.graph_toml).map_err(|e| Status::invalid_argument(e.to_string()))?;
            env.op.steps = (r.steps > 0).then_some(r.steps);
            env.op.epochs = (r.epochs > 0).then_some(r.epochs);
            env.op.in_flight = (r.in_flight > 0).then_some(r.in_flight);
            env
        } else {
            Envelope::parse(&r.envelope_json).map_err(|e| Status::invalid_argument(e.to_string()))?
        };
        let job_id = self.jobs.send(Submit(envelope)).await.map_err(gone)?.map_err(|e| match e {
            SubmitError::Data(_) => Status::failed_precondition(e.to_string()),
            SubmitError::Duplicate(_) => Status::already_exists(e.to_string()),
            _ => Status::invalid_argument(e.to_string()),
        })?;
        Ok(Response::new(v1::SubmitJobResponse { job_id }))
    }

    async fn resume_job(&self, req: Request<v1::ResumeJobRequest>) -> Result<Response<v1::SubmitJobResponse>, Status> {
        self.access.as_maintainer(&req, "ResumeJob")?;
        let r = req.into_inner();
        let resume = Resume { job_id: r.job_id, steps: (r.steps > 0).then_some(r.steps) };
        let job_id = self.jobs.send(resume).await.map_err(gone)?.map_err(|e| match e {
            SubmitError::Data(_) => Status::failed_precondition(e.to_string()),
            SubmitError::Duplicate(_) => Status::already_exists(e.to_string()),
            _ => Status::invalid_argument(e.to_string()),
        })?;
        Ok(Response::new(v1::SubmitJobResponse { job_id }))
    }

    async fn infer(&self, req: Request<v1::InferRequest>) -> Result<Response<v1::InferResponse>, Status> {
        // Serving spends volunteers' compute and shows what a model learned: maintainers only.
        self.access.as_maintainer(&req, "Infer")?;
        let r = req.into_inner();
        let inputs = dcnr_mesh::convert::tensor_from_wire(r.inputs.as_ref())
            .map_err(|e| Status::invalid_argument(format!("inputs: {e}")))?;
        let inferred = self.jobs.send(Infer { job: r.job_id, inputs }).await.map_err(gone)?.map_err(|e| match e {
            InferError::NotFound(why) => Status::not_found(why),
            InferError::Invalid(why) => Status::invalid_argument(why),
            InferError::Unavailable(why) => Status::unavailable(why),
        })?;
        let classes = inferred.probabilities.shape.get(1).copied().unwrap_or(1);
        let values = inferred.probabilities.as_f32().unwrap_or(&[]);
        Ok(Response::new(v1::InferResponse {
            classes: crate::serve::model::classes_of(values, classes),
            probabilities: Some(dcnr_mesh::convert::tensor_to_wire(&inferred.probabilities)),
            params_sha256: inferred.params_sha256,
            generation: inferred.generation,
        }))
    }

    async fn get_job(&self, req: Request<v1::GetJobRequest>) -> Result<Response<v1::JobStatus>, Status> {
        self.access.as_reader(&req, "GetJob")?;
        let forwarded = crate::peers::is_forwarded(req.metadata());
        let id = req.into_inner().job_id;
        if let Some(s) = self.jobs.send(Get(id.clone())).await.map_err(gone)? {
            return Ok(Response::new(status_to_wire(&s)));
        }
        let Some(store) = &self.store else { return Err(Status::not_found(format!("no job {id}"))) };
        let found = crate::elsewhere::find(store.as_ref(), &id)
            .await
            .map_err(|e| Status::unavailable(format!("the shared artifact store: {e}")))?;
        match found {
            Some(crate::elsewhere::Elsewhere::Ended(s)) => Ok(Response::new(status_to_wire(&s))),
            // Its status lives with its owner; the client is told where to ask.
            Some(crate::elsewhere::Elsewhere::Running { owner, url }) => {
                if !forwarded && !url.is_empty() {
                    match crate::peers::get_job(&url, &id).await {
                        Ok(s) => return Ok(Response::new(s)),
                        Err(e) => tracing::debug!(job = %id, %url, error = %e, "cannot forward to the job's owner"),
                    }
                }
                Err(Status::failed_precondition(format!(
                    "job {id} is running on orchestrator instance {owner:?} ({url}), which shares this store and \
                     does not answer; ask it for live status"
                )))
            }
            None => Err(Status::not_found(format!("no job {id}"))),
        }
    }

    async fn list_jobs(&self, req: Request<v1::ListJobsRequest>) -> Result<Response<v1::ListJobsResponse>, Status> {
        self.access.as_reader(&req, "ListJobs")?;
        let forwarded = crate::peers::is_forwarded(req.metadata());
        let all = self.jobs.send(List).await.map_err(gone)?;
        let mut jobs: Vec<v1::JobStatus> = all.iter().map(status_to_wire).collect();
        if let (Some(store), false) = (&self.store, forwarded) {
            let here: std::collections::BTreeSet<String> = jobs.iter().map(|j| j.job_id.clone()).collect();
            jobs.extend(crate::peers::running_elsewhere(store.as_ref(), &here).await);
        }
        Ok(Response::new(v1::ListJobsResponse { jobs }))
    }

    type FetchDatasetStream = ChunkStream;

    async fn fetch_dataset(&self, req: Request<v1::FetchDatasetRequest>) -> Result<Response<ChunkStream>, Status> {
        self.access.any_pnode(&req, "FetchDataset")?;
        let sha256 = req.into_inner().sha256;
        let packed = self.data.published(&sha256).ok_or_else(|| {
            let shown: String = sha256.chars().take(64).collect();
            Status::not_found(format!("no dataset pack {shown} is published for a job on this orchestrator"))
        })?;
        tracing::info!(%sha256, bytes = packed.bytes.len(), "serving a dataset pack");
        Ok(Response::new(pack_stream(packed)))
    }

    type WatchJobStream = EventStream;

    async fn watch_job(&self, req: Request<v1::WatchJobRequest>) -> Result<Response<EventStream>, Status> {
        self.access.as_reader(&req, "WatchJob")?;
        let forwarded = crate::peers::is_forwarded(req.metadata());
        let id = req.into_inner().job_id;
        if let Some((status, rx)) = self.jobs.send(Watch(id.clone())).await.map_err(gone)? {
            return Ok(Response::new(watch_stream(id, status, rx)));
        }
        let found = match (&self.store, forwarded) {
            (Some(store), false) => crate::elsewhere::find(store.as_ref(), &id)
                .await
                .map_err(|e| Status::unavailable(format!("the shared artifact store: {e}")))?,
            _ => None,
        };
        match found {
            Some(crate::elsewhere::Elsewhere::Ended(s)) => {
                let (_, rx) = tokio::sync::broadcast::channel(1);
                Ok(Response::new(watch_stream(id, *s, rx)))
            }
            Some(crate::elsewhere::Elsewhere::Running { owner, url }) if !url.is_empty() => {
                let stream = crate::peers::watch_job(&url, &id).await;
                let stream = stream.map_err(|e| {
                    Status::failed_precondition(format!(
                        "job {id} is running on orchestrator instance {owner:?} ({url}), which does not answer: {}",
                        e.message()
                    ))
                })?;
                Ok(Response::new(Box::pin(stream.into_inner())))
            }
            Some(crate::elsewhere::Elsewhere::Running { owner, .. }) => Err(Status::failed_precondition(format!(
                "job {id} is running on orchestrator instance {owner:?}, which shares this store; ask it"
            ))),
            None => Err(Status::not_found(format!("no job {id}"))),
        }
    }

    async fn list_p_nodes(
        &self,
        req: Request<v1::ListPNodesRequest>,
    ) -> Result<Response<v1::ListPNodesResponse>, Status> {
        self.access.as_reader(&req, "ListPNodes")?;
        let all = self.registry.send(ListPNodes).await.map_err(gone)?;
        Ok(Response::new(v1::ListPNodesResponse { pnodes: all.iter().map(pnode_to_wire).collect() }))
    }
}

/// The event stream of one watcher: the current state first, then events until the job ends.
fn watch_stream(job: String, status: JobStatus, mut rx: tokio::sync::broadcast::Receiver<JobEvent>) -> EventStream {
    use tokio::sync::broadcast::error::RecvError;
    let (tx, out) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        if status.state.is_final() {
            let _ = tx.send(Ok(event_to_wire(&job, JobEvent::Finished(Box::new(status))))).await;
            return;
        }
        loop {
            match rx.recv().await {
                Ok(event) => {
                    let last = matches!(event, JobEvent::Finished(_));
                    if tx.send(Ok(event_to_wire(&job, event))).await.is_err() || last {
                        return;
                    }
                }
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return,
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(out))
}

/// Wraps the service with the protocol's size limits.
pub fn server(svc: OrchestratorService) -> OrchestratorServer<OrchestratorService> {
    OrchestratorServer::new(svc)
        .max_decoding_message_size(dcnr_proto::limits::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(dcnr_proto::limits::MAX_MESSAGE_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbled_step_inputs_are_refused_with_a_reason() {
        let seal = |h: usize, k: usize, s: usize| v1::Seal {
            tensor_sha256: vec![1; h],
            public_key: vec![2; k],
            signature: vec![3; s],
        };
        let input = |seal| v1::StepInput { backward: true, from_vnode: 4, from_port: 1, seal, ..Default::default() };
        let ok = step_inputs_from_wire(vec![input(Some(seal(32, 32, 64))), input(Some(seal(32, 0, 0)))], 7).unwrap();
        assert_eq!(ok[0].route, Route::Backward { from_vnode: 4, from_port: 1 });
        assert_eq!((ok[0].generation, ok[0].seal.is_some(), ok[1].seal.is_none()), (7, true, true));
        for (bad, why) in [
            (input(None), "no hash"),
            (input(Some(seal(31, 0, 0))), "hash is not 32 bytes"),
            (input(Some(seal(32, 32, 0))), "signature is not 64 bytes"),
            (input(Some(seal(32, 5, 64))), "public key is not 32 bytes"),
        ] {
            let err = step_inputs_from_wire(vec![bad], 1).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().contains(why), "{}", err.message());
        }
        let flood = vec![input(Some(seal(32, 0, 0))); MAX_STEP_INPUTS + 1];
        assert!(step_inputs_from_wire(flood, 1).unwrap_err().message().contains("more than"));
    }

    #[test]
    fn peer_text_is_bounded_at_a_character_boundary() {
        assert_eq!(bounded_text("short".into()), "short");
        let long = "é".repeat(MAX_PEER_TEXT);
        let cut = bounded_text(long.clone());
        assert!(cut.len() < MAX_PEER_TEXT + 40, "{}", cut.len());
        assert!(cut.ends_with("more bytes cut]"), "{cut}");
        assert!(long.starts_with(cut.split(" [").next().unwrap()));
    }
}

//! The job's exchanges with PNodes over gRPC: allocate, release, fetch states and parameters,
//! probe, and the data links that ask for micro-batches by number. The only module of `job` that
//! names tonic.
//! Calls to different PNodes are independent and run concurrently.

use super::core::{Allocation, CollectError, FeedTarget, PNodeFailure, Params, States, VNodeAt};
use dcnr_mesh::convert;
use dcnr_mesh::link::{Link, open_link};
use dcnr_proto::limits::MAX_MESSAGE_BYTES;
use dcnr_proto::tls::Expect;
use dcnr_proto::v1::{self, p_node_client::PNodeClient};
use dcnr_vnode::{HostData, Phase};
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

/// How long a probed PNode (and each of its VNodes) may take to answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Deadline of allocation, snapshot and parameter calls; a PNode slower than this has failed the
/// placement.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(5);

/// The slowest link a PNode may fetch a dataset pack over (1 MiB/s, 8 Mbit/s) within its
/// allocation deadline; a PNode slower than that fails the allocation.
const SLOWEST_DATASET_LINK: u64 = 1 << 20;

/// How long a release may take: a PNode that does not answer is dead or hung, and its messages
/// are stale either way.
const RELEASE_TIMEOUT: Duration = Duration::from_millis(500);

/// A client for a PNode's service with the protocol's limits, answered only by `expect` (the
/// PNode with that id where it is known, any member where only the endpoint is).
pub fn pnode_client(
    endpoint: &str,
    expect: &Expect,
) -> Result<PNodeClient<tonic::transport::Channel>, dcnr_proto::transport::EndpointError> {
    let channel = dcnr_proto::transport::unary_endpoint(endpoint, expect)?.connect_lazy();
    Ok(PNodeClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// What every allocation of one generation carries besides its VNodes.
#[derive(Debug, Clone)]
pub struct AllocateCommon {
    /// Job id.
    pub job_id: String,
    /// The graph, as JSON.
    pub graph_json: String,
    /// Root seed.
    pub root_seed: u64,
    /// Micro-batches in flight.
    pub in_flight: u32,
    /// Placement generation.
    pub generation: u32,
    /// The job's dataset pack, for PNodes hosting a VNode that reads data.
    pub dataset: Option<DatasetRef>,
    /// VNodes that read features or labels.
    pub readers: BTreeSet<u32>,
    /// Samples in the training split (with several pipelines, it fixes when rounds close).
    pub train_samples: u64,
    /// Whether VNodes seal what they send and report what they consume (verified jobs).
    pub seal_messages: bool,
    /// Serving a trained model: forward only, features sent inline, no dataset pack.
    pub serving: bool,
    /// This orchestrator's instance id: the PNodes route the job's traffic back to it.
    pub orchestrator_id: String,
}

/// A dataset pack as an allocation names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetRef {
    /// Hex SHA-256 of the pack.
    pub sha256: String,
    /// Its size in bytes.
    pub bytes: u64,
}

/// How long an allocation may take: a PNode that must fetch the dataset pack first gets the time
/// to do so over the slowest link allowed.
pub fn allocate_deadline(dataset_bytes: Option<u64>) -> Duration {
    SNAPSHOT_TIMEOUT + Duration::from_secs(dataset_bytes.map_or(0, |b| b.div_ceil(SLOWEST_DATASET_LINK)))
}

/// Allocates every group at once; the first PNode that failed, if any.
pub async fn allocate_all(common: AllocateCommon, allocations: Vec<Allocation>) -> Result<(), PNodeFailure> {
    let calls = allocations.into_iter().map(|a| {
        let reads_data = a.vnodes.iter().any(|(v, _)| common.readers.contains(v));
        let dataset = common.dataset.as_ref().filter(|_| reads_data);
        let req = v1::AllocateRequest {
            job_id: common.job_id.clone(),
            graph_json: common.graph_json.clone(),
            root_seed: common.root_seed,
            in_flight: common.in_flight,
            generation: common.generation,
            vnodes: a.vnodes.into_iter().map(|(vnode, state)| v1::VNodeAssignment { vnode, state }).collect(),
            dataset_sha256: dataset.map(|d| d.sha256.clone()).unwrap_or_default(),
            dataset_bytes: dataset.map_or(0, |d| d.bytes),
            train_samples: common.train_samples,
            seal_messages: common.seal_messages,
            serving: common.serving,
            orchestrator_id: common.orchestrator_id.clone(),
            on_gpu: a.on_gpu,
        };
        let deadline = allocate_deadline(dataset.map(|d| d.bytes));
        let (pnode, endpoint) = (a.pnode, a.endpoint);
        async move {
            let fail = |why: String| PNodeFailure { pnode: pnode.clone(), why };
            // The channel's own deadline would cut a long dataset fetch short: the call's is set below.
            let channel = dcnr_proto::transport::endpoint(&endpoint, None, &Expect::PNode(pnode.clone()))
                .map_err(|e| fail(format!("{endpoint}: {e}")))?
                .connect_lazy();
            let mut c = PNodeClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            let mut req = tonic::Request::new(req);
            req.set_timeout(deadline);
            c.allocate(req).await.map_err(|s| fail(format!("allocating on {endpoint}: {}", s.message())))?;
            Ok(())
        }
    });
    futures::future::join_all(calls).await.into_iter().collect()
}

/// Stops a job's VNodes on the given PNodes, best effort, where orchestrator `instance` placed
/// them (a PNode keeps a placement another orchestrator has since made); `brief` bounds each call.
pub async fn release_everywhere(job: &str, instance: &str, endpoints: BTreeSet<String>, brief: bool) {
    let calls = endpoints.into_iter().map(|e| async move {
        if let Ok(mut c) = pnode_client(&e, &Expect::AnyPNode) {
            let release = v1::ReleaseRequest { job_id: job.to_string(), orchestrator_id: instance.to_string() };
            let mut req = tonic::Request::new(release);
            if brief {
                req.set_timeout(RELEASE_TIMEOUT);
            }
            if let Err(s) = c.release(req).await {
                tracing::debug!(endpoint = %e, status = %s, "release failed");
            }
        }
    });
    futures::future::join_all(calls).await;
}

/// Fetches the state of every VNode, concurrently; the first failure names its PNode.
pub async fn fetch_states(job: String, targets: Vec<VNodeAt>) -> Result<States, PNodeFailure> {
    let calls = targets.into_iter().map(|t| {
        let job = job.clone();
        async move {
            let fail = |why: String| PNodeFailure { pnode: t.pnode.clone(), why };
            let mut c = pnode_client(&t.endpoint, &Expect::PNode(t.pnode.clone()))
                .map_err(|e| fail(format!("{}: {e}", t.endpoint)))?;
            let mut req = tonic::Request::new(v1::SnapshotRequest { job_id: job, vnode: t.vnode });
            req.set_timeout(SNAPSHOT_TIMEOUT);
            let r = c
                .snapshot(req)
                .await
                .map_err(|s| fail(format!("snapshot of vnode {} on {}: {}", t.vnode, t.endpoint, s.message())))?;
            Ok((t.vnode, r.into_inner().state))
        }
    });
    futures::future::join_all(calls).await.into_iter().collect()
}

/// Fetches every VNode's parameters, concurrently, in the order of `targets`.
pub async fn fetch_params(job: String, targets: Vec<VNodeAt>) -> Result<Params, CollectError> {
    let calls = targets.into_iter().map(|t| {
        let job = job.clone();
        async move {
            let unreachable = |why: String| CollectError::Unreachable(PNodeFailure { pnode: t.pnode.clone(), why });
            let mut client = pnode_client(&t.endpoint, &Expect::PNode(t.pnode.clone()))
                .map_err(|e| unreachable(format!("{}: {e}", t.endpoint)))?;
            let mut req = tonic::Request::new(v1::FetchParamsRequest { job_id: job, vnode: t.vnode });
            req.set_timeout(SNAPSHOT_TIMEOUT);
            let r = client
                .fetch_params(req)
                .await
                .map_err(|s| {
                    unreachable(format!(
                        "fetching parameters of vnode {} from {}: {}",
                        t.vnode,
                        t.endpoint,
                        s.message()
                    ))
                })?
                .into_inner();
            let mut ps = Vec::with_capacity(r.params.len());
            for w in &r.params {
                let tensor = convert::tensor_from_wire(Some(w))
                    .map_err(|e| CollectError::Invalid(format!("vnode {} parameters: {e}", t.vnode)))?;
                match tensor.data {
                    HostData::F32(v) => ps.push(v),
                    _ => {
                        return Err(CollectError::Invalid(format!(
                            "vnode {} sent parameters that are not f32",
                            t.vnode
                        )));
                    }
                }
            }
            Ok(ps)
        }
    });
    let mut all = Vec::new();
    for r in futures::future::join_all(calls).await {
        all.push(r?);
    }
    Ok(all)
}

/// Asks every PNode whether it answers and which of the job's VNodes are busy.
pub async fn probe(job: String, pnodes: Vec<(String, String)>) -> Vec<(String, Result<Vec<u32>, String>)> {
    let calls = pnodes.into_iter().map(|(id, endpoint)| {
        let job = job.clone();
        async move {
            let expect = Expect::PNode(id.clone());
            let busy = async {
                let mut c = pnode_client(&endpoint, &expect).map_err(|e| e.to_string())?;
                let mut req = tonic::Request::new(v1::PingRequest { payload: None, job_id: job });
                req.set_timeout(PROBE_TIMEOUT);
                let r = c.ping(req).await.map_err(|s| s.message().to_string())?.into_inner();
                Ok::<_, String>(r.busy_vnodes)
            };
            (id, busy.await)
        }
    });
    futures::future::join_all(calls).await
}

/// The job's data links, one per PNode endpoint that hosts a VNode reading data. They carry
/// batch numbers; the PNode builds the batch from the dataset pack it fetched.
#[derive(Default)]
pub struct DataLinks {
    links: HashMap<String, Link>,
}

impl DataLinks {
    /// Asks for micro-batch `mb`'s input for `target` of generation `generation`, built from
    /// `batch` (opening the link on first use).
    pub fn send(
        &mut self,
        job: &str,
        generation: u32,
        target: &FeedTarget,
        mb: u64,
        phase: Phase,
        batch: u64,
    ) -> Result<(), String> {
        let to = convert::Target { job: job.to_string(), vnode: target.at.vnode, generation };
        let msg = convert::feed_message(&to, convert::FeedRequest { mb, phase, port: target.port, batch });
        self.deliver(target, msg)
    }

    /// Sends a served model's micro-batch `mb` of inference `inputs` to `target`.
    pub fn send_inputs(
        &mut self,
        job: &str,
        generation: u32,
        target: &FeedTarget,
        mb: u64,
        inputs: &dcnr_vnode::HostTensor,
    ) -> Result<(), String> {
        let to = convert::Target { job: job.to_string(), vnode: target.at.vnode, generation };
        self.deliver(target, convert::forward_message(&to, mb, Phase::Infer, target.port, inputs))
    }

    fn deliver(&mut self, target: &FeedTarget, msg: v1::VNodeMessage) -> Result<(), String> {
        let at = &target.at;
        crate::metrics::ORCHESTRATOR.feed_sent(prost::Message::encoded_len(&msg));
        if !self.links.contains_key(&at.endpoint) {
            let link = open_link(&at.endpoint).map_err(|e| format!("bad endpoint {}: {e}", at.endpoint))?;
            self.links.insert(at.endpoint.clone(), link);
        }
        let link = self.links.get(&at.endpoint).ok_or_else(|| format!("no link to the pnode of vnode {}", at.vnode))?;
        link.try_send(msg).map_err(|e| format!("cannot send to vnode {} at {}: {e}", at.vnode, at.endpoint))
    }

    /// Closes every link.
    pub fn clear(&mut self) {
        self.links.clear();
    }
}

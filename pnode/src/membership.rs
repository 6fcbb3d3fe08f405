//! Joining orchestrators: registration with protocol version and capabilities, heartbeats,
//! membership of every orchestrator `--orchestrator` names ([`keep_memberships`]), and the
//! client calls a PNode makes to an orchestrator.

use crate::actors::{Count, Host, Release};
use crate::config::PnodeArgs;
use crate::orchestrators::Orchestrators;
use crate::router::Router;
use actix::Addr;
use anyhow::{Context as _, bail};
use dcnr_proto::limits::MAX_MESSAGE_BYTES;
use dcnr_proto::v1::{self, orchestrator_client::OrchestratorClient};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tonic::transport::Channel;

/// A connection to the orchestrator's gRPC service. Clones share it: when the PNode fails over
/// to another orchestrator ([`OrchestratorLink::switch_to`]), every user follows.
#[derive(Clone)]
pub struct OrchestratorLink {
    inner: std::sync::Arc<std::sync::RwLock<Channels>>,
}

#[derive(Clone)]
struct Channels {
    url: String,
    client: OrchestratorClient<Channel>,
    /// A channel without the unary deadline: the channel-level deadline bounds a whole call, so
    /// on `client` a client stream such as the reports would be cut after it.
    streams: OrchestratorClient<Channel>,
}

impl OrchestratorLink {
    /// Connects, retrying until `patience` has passed (the orchestrator may still be starting).
    pub async fn connect(url: &str, patience: Duration) -> anyhow::Result<OrchestratorLink> {
        let channels = Self::channels(url, patience).await?;
        Ok(OrchestratorLink { inner: std::sync::Arc::new(std::sync::RwLock::new(channels)) })
    }

    /// Points this link, and every clone of it, at the orchestrator at `url`.
    pub async fn switch_to(&self, url: &str, patience: Duration) -> anyhow::Result<()> {
        let channels = Self::channels(url, patience).await?;
        *self.inner.write().unwrap_or_else(|p| p.into_inner()) = channels;
        Ok(())
    }

    /// The URL of the orchestrator this link reaches now.
    pub fn url(&self) -> String {
        self.now().url
    }

    fn now(&self) -> Channels {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn channels(url: &str, patience: Duration) -> anyhow::Result<Channels> {
        let expect = dcnr_proto::tls::Expect::Orchestrator;
        let endpoint = dcnr_proto::transport::unary_endpoint(url, &expect)
            .with_context(|| format!("cannot use the orchestrator URL `{url}`"))?;
        let deadline = Instant::now() + patience;
        let mut wait = Duration::from_millis(50);
        let channel = loop {
            match endpoint.connect().await {
                Ok(c) => break c,
                Err(e) if Instant::now() + wait < deadline => {
                    tracing::debug!(error = %e, "orchestrator not reachable yet; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e).context("connection failed"),
            }
        };
        let streams = dcnr_proto::transport::endpoint(url, None, &expect)
            .with_context(|| format!("cannot use the orchestrator URL `{url}`"))?
            .connect_lazy();
        let client = |channel| {
            OrchestratorClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES)
        };
        Ok(Channels { url: url.to_string(), client: client(channel), streams: client(streams) })
    }

    /// The generated client, for callers that need a call not wrapped here.
    pub fn client(&self) -> OrchestratorClient<Channel> {
        self.now().client
    }

    /// Endpoint of the PNode hosting (job, vnode).
    pub async fn resolve(&self, job: &str, vnode: u32) -> Result<String, tonic::Status> {
        let r = self.client().resolve(v1::ResolveRequest { job_id: job.to_string(), vnode }).await?;
        Ok(r.into_inner().endpoint)
    }

    /// The PNode hosting (job, vnode), and its endpoint.
    pub async fn resolve_placement(&self, job: &str, vnode: u32) -> Result<(String, String), tonic::Status> {
        let r = self.client().resolve(v1::ResolveRequest { job_id: job.to_string(), vnode }).await?;
        let r = r.into_inner();
        Ok((r.pnode_id, r.endpoint))
    }

    /// Asks the orchestrator to move this PNode's VNodes elsewhere; returns how many remain here.
    pub async fn drain(&self, pnode_id: &str, timeout: Duration) -> Result<u32, tonic::Status> {
        let mut req = tonic::Request::new(v1::DrainRequest {
            pnode_id: pnode_id.to_string(),
            timeout_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
        });
        req.set_timeout(timeout + Duration::from_secs(2));
        Ok(self.client().drain(req).await?.into_inner().remaining_vnodes)
    }

    /// Fetches dataset pack `sha256`, which the allocation said is `expected` bytes. The stream
    /// is read only as far as `expected`: one that overruns, skips, disagrees about the size or
    /// stalls for [`FETCH_IDLE`] is abandoned. The caller checks the hash.
    pub async fn fetch_dataset(&self, sha256: &str, expected: u64) -> Result<Vec<u8>, FetchError> {
        let req = v1::FetchDatasetRequest { sha256: sha256.to_string() };
        let mut stream = self.client().fetch_dataset(req).await.map_err(FetchError::status)?.into_inner();
        let capacity = usize::try_from(expected).map_err(|_| FetchError::Overrun { expected, got: expected })?;
        let mut out = Vec::with_capacity(capacity);
        loop {
            let next = tokio::time::timeout(FETCH_IDLE, stream.message())
                .await
                .map_err(|_| FetchError::Stalled { got: out.len() as u64 })?
                .map_err(FetchError::status)?;
            let Some(chunk) = next else { break };
            let got = out.len() as u64;
            if chunk.total != expected {
                return Err(FetchError::Total { expected, served: chunk.total });
            }
            if chunk.offset != got {
                return Err(FetchError::Gap { offset: chunk.offset, got });
            }
            let end = got.saturating_add(chunk.data.len() as u64);
            if end > expected {
                return Err(FetchError::Overrun { expected, got: end });
            }
            out.extend_from_slice(&chunk.data);
        }
        if out.len() as u64 != expected {
            return Err(FetchError::Short { expected, got: out.len() as u64 });
        }
        Ok(out)
    }

    /// Streams reports until `rx` closes or the call fails.
    pub async fn report_stream(&self, rx: mpsc::Receiver<v1::VNodeReport>) -> Result<(), tonic::Status> {
        let req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        self.now().streams.report(req).await.map(|_| ())
    }
}

/// Longest wait for the next piece of a dataset pack before the fetch is given up.
pub const FETCH_IDLE: Duration = Duration::from_secs(30);

/// Why a dataset pack could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The orchestrator refused or the call failed.
    #[error("{message} ({code})")]
    Call {
        /// The gRPC code, as text.
        code: String,
        /// Its message.
        message: String,
    },
    /// Nothing arrived for too long.
    #[error("no data for {FETCH_IDLE:?} after {got} bytes")]
    Stalled {
        /// Bytes received.
        got: u64,
    },
    /// The orchestrator serves a pack of another size than the allocation announced.
    #[error("the orchestrator serves {served} bytes but the allocation announced {expected}")]
    Total {
        /// Announced size.
        expected: u64,
        /// Size the chunks declare.
        served: u64,
    },
    /// A chunk does not continue where the last one ended.
    #[error("a chunk at offset {offset} after {got} bytes")]
    Gap {
        /// The chunk's offset.
        offset: u64,
        /// Bytes received.
        got: u64,
    },
    /// More bytes than announced.
    #[error("the stream overran the announced {expected} bytes (reached {got})")]
    Overrun {
        /// Announced size.
        expected: u64,
        /// Where it got to.
        got: u64,
    },
    /// The stream ended early.
    #[error("the stream ended after {got} of {expected} bytes")]
    Short {
        /// Announced size.
        expected: u64,
        /// Bytes received.
        got: u64,
    },
}

impl FetchError {
    fn status(s: tonic::Status) -> FetchError {
        FetchError::Call { code: format!("{:?}", s.code()), message: s.message().to_string() }
    }
}

/// Who the orchestrator says we are.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Id assigned at registration.
    pub pnode_id: String,
    /// The orchestrator instance registered with.
    pub orchestrator_id: String,
    /// Heartbeat period asked for by the orchestrator.
    pub heartbeat: Duration,
    /// Whether the orchestrator accepted the trusted-mode token.
    pub trusted: bool,
    /// When the current certificate was installed and when it expires (None in plaintext mode).
    pub certificate: Option<(SystemTime, SystemTime)>,
    /// The relay (`host:port`) to listen at, when the orchestrator cannot reach this PNode.
    pub relay: Option<String>,
}

/// This PNode's listening at the relay the orchestrator assigned, if any: connections others
/// open through it arrive on `conns`, and the gRPC server takes them as if accepted.
pub struct RelayLink {
    conns: mpsc::Sender<tokio::net::TcpStream>,
    key: std::sync::Arc<crate::identity::NodeKey>,
    current: Option<(String, dcnr_mesh::relay::Listener, tokio::task::JoinHandle<()>)>,
    /// Since when the relay it should listen at has not had it listening.
    down_since: Option<Instant>,
}

impl RelayLink {
    /// Not listening anywhere yet; relayed connections will go to `conns`.
    pub fn new(conns: mpsc::Sender<tokio::net::TcpStream>, key: std::sync::Arc<crate::identity::NodeKey>) -> RelayLink {
        RelayLink { conns, key, current: None, down_since: None }
    }

    /// Listens at `relay` (stops listening at any other), or nowhere.
    pub fn follow(&mut self, relay: Option<&str>) {
        if self.current.as_ref().map(|c| c.0.as_str()) == relay {
            return;
        }
        if let Some((_, _, task)) = self.current.take() {
            task.abort();
        }
        self.down_since = relay.map(|_| Instant::now());
        if let Some(relay) = relay {
            let key = self.key.clone();
            let sign: dcnr_mesh::relay::NonceSigner =
                std::sync::Arc::new(move |nonce| dcnr_proto::relay::sign_listen(key.signing(), nonce));
            let (listener, task) =
                dcnr_mesh::relay::listen(relay.to_string(), self.key.public(), sign, self.conns.clone());
            self.current = Some((relay.to_string(), listener, task));
        }
    }

    /// Whether it listens at its relay now (what heartbeats report).
    pub fn listening(&self) -> bool {
        self.current.as_ref().is_some_and(|c| c.1.is_ready())
    }

    /// How long it has had a relay it could not listen at (`None`: no relay, or listening).
    pub fn lost_for(&mut self) -> Option<Duration> {
        if self.current.is_none() || self.listening() {
            self.down_since = None;
            return None;
        }
        Some(self.down_since.get_or_insert_with(Instant::now).elapsed())
    }
}

impl Drop for RelayLink {
    fn drop(&mut self) {
        self.follow(None);
    }
}

impl Identity {
    /// Whether half of the certificate's lifetime has passed, so the next heartbeat asks for a
    /// new one.
    fn wants_renewal(&self, now: SystemTime) -> bool {
        let Some((issued, expires)) = self.certificate else { return false };
        let half = expires.duration_since(issued).unwrap_or_default() / 2;
        now >= issued + half
    }
}

/// Installs a certificate chain from the orchestrator; returns its validity.
fn install(
    slot: &dcnr_proto::tls::CertSlot,
    key: &crate::identity::NodeKey,
    chain: Vec<Vec<u8>>,
    expires_unix_ms: u64,
) -> anyhow::Result<(SystemTime, SystemTime)> {
    if chain.is_empty() {
        bail!("the orchestrator issued no certificate: is it running with --insecure-plaintext?");
    }
    let chain = chain.into_iter().map(dcnr_proto::tls::CertificateDer::from).collect();
    slot.set(chain, &key.pkcs8()?).context("the issued certificate is not usable")?;
    Ok((SystemTime::now(), UNIX_EPOCH + Duration::from_millis(expires_unix_ms)))
}

/// What a PNode proves and presents at registration: its key and the trusted-mode token.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The identity key.
    pub key: std::sync::Arc<crate::identity::NodeKey>,
    /// Trusted-mode token; empty for none.
    pub token: String,
    /// Where the certificate issued at registration goes (None in plaintext mode).
    pub certificate: Option<std::sync::Arc<dcnr_proto::tls::CertSlot>>,
}

/// Registers this PNode with the orchestrator `link` reaches, proving possession of its key by
/// signing a fresh challenge. The orchestrator's instance id (from the challenge) joins
/// `orchestrators` before the registration is sent, so an allocation that follows it at once
/// finds its orchestrator. A refused protocol version, quarantined identity or wrong token is a
/// [`Refused`] error that says so.
pub async fn register(
    link: &OrchestratorLink,
    orchestrators: &Orchestrators,
    args: &PnodeArgs,
    endpoint: &str,
    creds: &Credentials,
    capabilities: &v1::Capabilities,
) -> anyhow::Result<Identity> {
    let refused = |s: tonic::Status| match s.code() {
        tonic::Code::FailedPrecondition | tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
            anyhow::Error::new(Refused(s.message().to_string()))
        }
        _ => anyhow::anyhow!("registration failed: {} ({:?})", s.message(), s.code()),
    };
    let public = creds.key.public();
    let challenge =
        link.client().challenge(v1::ChallengeRequest { public_key: public.to_vec() }).await.map_err(refused)?;
    let challenge = challenge.into_inner();
    let orchestrator_id = challenge.orchestrator_id;
    if orchestrator_id.len() > MAX_INSTANCE_ID {
        bail!("the orchestrator at {} sent an instance id of {} bytes", link.url(), orchestrator_id.len());
    }
    if !orchestrators.join(&orchestrator_id, &link.url(), link.clone()) {
        bail!(Duplicate(orchestrator_id));
    }
    let mut req = v1::RegisterRequest {
        protocol_version: args.protocol_version,
        name: args.name.clone(),
        endpoint: endpoint.to_string(),
        capabilities: Some(capabilities.clone()),
        nonce: challenge.nonce,
        trusted_token: creds.token.clone(),
        behind_nat: args.behind_nat,
        // Set to the address the relay really listens at once it runs (`lib::run`).
        relay_offer: args.relay_advertise.clone().unwrap_or_default(),
        ..Default::default()
    };
    dcnr_proto::identity::sign_registration(creds.key.signing(), &mut req);
    let resp = link.client().register(req).await.map_err(refused)?.into_inner();
    if resp.pnode_id != creds.key.pnode_id() {
        bail!("the orchestrator named this pnode {} but its key gives {}", resp.pnode_id, creds.key.pnode_id());
    }
    if !creds.token.is_empty() && !resp.trusted {
        tracing::warn!("registered as untrusted: the orchestrator has no trusted-mode token configured");
    }
    let certificate = match &creds.certificate {
        Some(slot) => Some(install(slot, &creds.key, resp.certificate_chain, resp.certificate_expires_unix_ms)?),
        None => None,
    };
    let relay = match resp.relay.as_str() {
        "" => None,
        r if dcnr_proto::relay::is_relay_address(r) => Some(r.to_string()),
        r => bail!(
            "the orchestrator assigned a relay that is not host:port: {:?}",
            r.chars().take(64).collect::<String>()
        ),
    };
    if let Some(r) = &relay {
        tracing::info!(relay = %r, "this pnode cannot be reached directly; it is reached through a relay");
    }
    if resp.unreachable {
        tracing::warn!(
            %endpoint,
            "the orchestrator cannot connect to this pnode and offers no relay: it gets no work. Open the port, \
             set --advertise, or ask the operator for a relay"
        );
    }
    Ok(Identity {
        pnode_id: resp.pnode_id,
        orchestrator_id,
        heartbeat: Duration::from_millis(u64::from(resp.heartbeat_interval_ms.max(50))),
        trusted: resp.trusted,
        certificate,
        relay,
    })
}

/// Longest orchestrator instance id accepted (it is kept and logged).
const MAX_INSTANCE_ID: usize = 256;

/// An orchestrator refused this PNode (protocol version, quarantine, token): no retry helps.
#[derive(Debug, thiserror::Error)]
#[error("registration refused: {0}")]
pub struct Refused(pub String);

/// The orchestrator is one this PNode is a member of already, through another URL.
#[derive(Debug, thiserror::Error)]
#[error("orchestrator instance {0:?} is a member already, through another URL")]
pub struct Duplicate(pub String);

/// What every membership of this PNode shares: who it is, where it is reached, what it hosts.
#[derive(Clone)]
pub struct Shared {
    /// The flags as given (`--orchestrator` as a URL, a list or a DNS name).
    pub given: PnodeArgs,
    /// This PNode's advertised endpoint.
    pub endpoint: String,
    /// Its key, token and certificate slot.
    pub creds: Credentials,
    /// The VNode host.
    pub host: Addr<Host>,
    /// The router (told the id each registration confirms).
    pub router: Router,
    /// The orchestrators joined, and which one each job answers to.
    pub orchestrators: Orchestrators,
    /// Where connections accepted through a relay go (the gRPC server takes them).
    pub relayed: mpsc::Sender<tokio::net::TcpStream>,
    /// What this PNode advertises (detected once, at start).
    pub capabilities: v1::Capabilities,
}

impl Shared {
    /// Releases the VNodes of the jobs orchestrator `id` allocated here; how many there were.
    async fn release_jobs_of(&self, id: &str) -> u32 {
        let jobs = self.orchestrators.forget_jobs_of(id);
        self.release(jobs).await
    }

    async fn release(&self, jobs: Vec<String>) -> u32 {
        let mut dropped = 0;
        for job in jobs {
            dropped += self.host.send(Release(job)).await.unwrap_or(0);
        }
        dropped
    }
}

/// One orchestrator this PNode has joined: where, and its registration there.
pub struct Joined {
    /// The flags, `--orchestrator` being this orchestrator's URL.
    pub args: PnodeArgs,
    /// The link to it.
    pub link: OrchestratorLink,
    /// The registration.
    pub identity: Identity,
}

/// Joins the orchestrator `args.orchestrator` names: connects, registers, and (with TLS)
/// connects again presenting the certificate just earned.
pub async fn join(shared: &Shared, args: PnodeArgs, patience: Duration) -> anyhow::Result<Joined> {
    let url = args.orchestrator.clone();
    let link = OrchestratorLink::connect(&url, patience)
        .await
        .with_context(|| format!("cannot reach orchestrator at {url}"))?;
    let fresh_certificate = shared.creds.certificate.as_ref().is_some_and(|slot| !slot.is_set());
    let identity = match register(
        &link,
        &shared.orchestrators,
        &args,
        &shared.endpoint,
        &shared.creds,
        &shared.capabilities,
    )
    .await
    {
        Ok(i) => i,
        Err(e) => {
            // A registration that failed after its challenge leaves no membership behind.
            if e.downcast_ref::<Duplicate>().is_none() {
                shared.orchestrators.leave_joined_at(&url);
            }
            return Err(e);
        }
    };
    // A first registration was anonymous; from now on every call presents the certificate.
    if fresh_certificate {
        link.switch_to(&url, patience).await?;
    }
    shared.router.set_pnode_id(identity.pnode_id.clone());
    tracing::info!(
        pnode = %identity.pnode_id,
        orchestrator = %url,
        instance = %identity.orchestrator_id,
        trusted = identity.trusted,
        endpoint = %shared.endpoint,
        "registered with orchestrator"
    );
    Ok(Joined { args, link, identity })
}

/// How one membership stands, for the supervisor.
#[derive(Default)]
struct Standing {
    /// When its orchestrator last answered a heartbeat (`None`: not yet).
    last_ok: Option<Instant>,
}

/// Heartbeats with one orchestrator until it refuses this PNode (an error) or the task is
/// aborted; registers again when it has forgotten this PNode, and gives up its jobs when it
/// has been silent long enough for another orchestrator to take them over.
async fn keep_membership(
    shared: Shared,
    joined: Joined,
    standing: std::sync::Arc<std::sync::Mutex<Standing>>,
    give_up_silent: bool,
) -> anyhow::Result<()> {
    let Joined { args, link, mut identity } = joined;
    let mut relay = RelayLink::new(shared.relayed.clone(), shared.creds.key.clone());
    relay.follow(identity.relay.as_deref());
    let mut released_silent = false;
    // Heartbeats to a silent orchestrator back off, and its silence is logged once.
    let mut wait = identity.heartbeat;
    let mut failing = false;
    // The one record of when the orchestrator last answered: the supervisor reads it too.
    let mark_ok = || standing.lock().unwrap_or_else(|p| p.into_inner()).last_ok = Some(Instant::now());
    let silent_for =
        || standing.lock().unwrap_or_else(|p| p.into_inner()).last_ok.map(|t| t.elapsed()).unwrap_or_default();
    mark_ok();
    loop {
        tokio::time::sleep(wait).await;
        if relay.lost_for().is_some_and(|d| d >= RELAY_GIVE_UP) {
            // Nobody can reach this PNode for this orchestrator while its relay is gone: ask
            // for another. Its VNodes were unreachable too, and are relocated by their jobs.
            identity = register_again(&shared, &link, &args, &identity.orchestrator_id, "the relay is gone").await?;
            relay.follow(identity.relay.as_deref());
            mark_ok();
            continue;
        }
        let hosted = shared.host.send(Count).await.unwrap_or(0) as u32;
        let renew = identity.wants_renewal(SystemTime::now());
        let req = v1::HeartbeatRequest {
            pnode_id: identity.pnode_id.clone(),
            hosted_vnodes: hosted,
            renew_certificate: renew,
            relay_listening: relay.listening(),
        };
        match link.client().heartbeat(req).await {
            Ok(r) if r.get_ref().known => {
                mark_ok();
                released_silent = false;
                wait = identity.heartbeat;
                if std::mem::take(&mut failing) {
                    tracing::info!(orchestrator = %link.url(), "the orchestrator answers again");
                }
                let r = r.into_inner();
                if let (Some(slot), false) = (&shared.creds.certificate, r.certificate_chain.is_empty()) {
                    match install(slot, &shared.creds.key, r.certificate_chain, r.certificate_expires_unix_ms) {
                        Ok(validity) => {
                            identity.certificate = Some(validity);
                            tracing::info!("certificate renewed");
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot install the renewed certificate"),
                    }
                }
            }
            Ok(_) => {
                // The orchestrator restarted or declared this PNode lost: what it placed here
                // was already given up and relocated, so it is dropped rather than left computing.
                identity = register_again(
                    &shared,
                    &link,
                    &args,
                    &identity.orchestrator_id,
                    "the orchestrator forgot this pnode",
                )
                .await?;
                relay.follow(identity.relay.as_deref());
                mark_ok();
                released_silent = false;
                (wait, failing) = (identity.heartbeat, false);
            }
            Err(s) => {
                if std::mem::replace(&mut failing, true) {
                    tracing::debug!(orchestrator = %link.url(), status = %s, "heartbeat failed");
                } else {
                    tracing::warn!(orchestrator = %link.url(), status = %s, "heartbeat failed; retrying");
                }
                wait = (wait * 2).min(SILENT_HEARTBEAT.max(identity.heartbeat));
                let silent = silent_for();
                if give_up_silent
                    && !released_silent
                    && silent >= (identity.heartbeat * FAIL_OVER_AFTER).max(MIN_FAIL_OVER)
                {
                    // Its jobs are taken over by another orchestrator, which allocates them anew.
                    let dropped = shared.release_jobs_of(&identity.orchestrator_id).await;
                    if dropped > 0 {
                        tracing::warn!(from = ?silent, orchestrator = %link.url(), dropped, "orchestrator unreachable; its VNodes here are given up");
                    }
                    released_silent = true;
                }
            }
        }
    }
}

/// Releases what orchestrator `id` placed here, then registers with it again until it answers
/// (a refusal is returned).
async fn register_again(
    shared: &Shared,
    link: &OrchestratorLink,
    args: &PnodeArgs,
    id: &str,
    why: &str,
) -> anyhow::Result<Identity> {
    let dropped = shared.release_jobs_of(id).await;
    tracing::warn!(orchestrator = %link.url(), dropped, "{why}; registering again");
    loop {
        match register(link, &shared.orchestrators, args, &shared.endpoint, &shared.creds, &shared.capabilities).await {
            Ok(i) => return Ok(i),
            Err(e) if e.downcast_ref::<Refused>().is_some() || e.downcast_ref::<Duplicate>().is_some() => {
                return Err(e);
            }
            Err(e) => {
                tracing::warn!(orchestrator = %link.url(), error = %e, "registering again failed; retrying");
                tokio::time::sleep(REREGISTER_WAIT).await;
            }
        }
    }
}

/// A running membership.
struct Membership {
    id: String,
    standing: std::sync::Arc<std::sync::Mutex<Standing>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Membership {
    fn start(shared: &Shared, joined: Joined, give_up_silent: bool) -> Membership {
        let standing = std::sync::Arc::new(std::sync::Mutex::new(Standing::default()));
        let id = joined.identity.orchestrator_id.clone();
        let task = tokio::spawn(keep_membership(shared.clone(), joined, standing.clone(), give_up_silent));
        Membership { id, standing, task }
    }

    fn last_ok(&self) -> Option<Instant> {
        self.standing.lock().unwrap_or_else(|p| p.into_inner()).last_ok
    }
}

/// Keeps this PNode a member of every orchestrator `--orchestrator` names: `first` (joined by
/// the caller) and, for a list or a DNS name, every other candidate that answers, re-resolved
/// every [`RESOLVE_EVERY`], so orchestrators added later are joined too. A member that has left
/// the candidates and fallen silent is dropped with its jobs. Returns an error when an
/// orchestrator refuses this PNode, or when none has answered for `--orphan-timeout-s`.
pub async fn keep_memberships(shared: Shared, first: Joined) -> anyhow::Result<()> {
    let several = crate::discover::names_several(&shared.given);
    let orphan = Duration::from_secs(shared.given.orphan_timeout_s);
    let started = Instant::now();
    let mut members: BTreeMap<String, Membership> = BTreeMap::new();
    members.insert(first.args.orchestrator.clone(), Membership::start(&shared, first, several));
    let mut next_resolve = Instant::now() + RESOLVE_EVERY.min(Duration::from_secs(1));
    loop {
        tokio::time::sleep(SUPERVISE_EVERY).await;
        // A refusal ends the PNode: it is quarantined or misconfigured, which no retry mends.
        for m in members.values_mut() {
            if m.task.is_finished() {
                let task = std::mem::replace(&mut m.task, tokio::spawn(async { Ok(()) }));
                match task.await {
                    Ok(Err(e)) => return Err(e),
                    Ok(Ok(())) => {}
                    Err(e) => anyhow::bail!("a membership task failed: {e}"),
                }
            }
        }
        let newest_ok = members.values().filter_map(Membership::last_ok).max().unwrap_or(started);
        if !orphan.is_zero() && newest_ok.elapsed() > orphan {
            bail!("no orchestrator has answered for {:?}; exiting", orphan);
        }
        if !several || Instant::now() < next_resolve {
            continue;
        }
        next_resolve = Instant::now() + RESOLVE_EVERY;
        let candidates = match crate::discover::answering(&shared.given).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "discovery failed; keeping the orchestrators joined");
                continue;
            }
        };
        let urls: BTreeSet<String> = candidates.iter().map(|c| c.orchestrator.clone()).collect();
        let gone: Vec<String> = members
            .iter()
            .filter(|(url, m)| !urls.contains(*url) && m.last_ok().is_none_or(|t| t.elapsed() >= FORGET_SILENT))
            .map(|(url, _)| url.clone())
            .collect();
        for url in gone {
            if let Some(m) = members.remove(&url) {
                m.task.abort();
                let jobs = shared.orchestrators.leave(&m.id);
                let dropped = shared.release(jobs).await;
                tracing::info!(orchestrator = %url, dropped, "left an orchestrator that is gone from discovery and silent");
            }
        }
        for args in candidates {
            if members.contains_key(&args.orchestrator) {
                continue;
            }
            let url = args.orchestrator.clone();
            match join(&shared, args, JOIN_PATIENCE).await {
                Ok(joined) => {
                    members.insert(url, Membership::start(&shared, joined, several));
                }
                Err(e) if e.downcast_ref::<Refused>().is_some() => return Err(e),
                Err(e) => tracing::debug!(orchestrator = %url, error = %e, "not joined"),
            }
        }
    }
}

/// How often the orchestrators a list or DNS name gives are looked up again.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(5);

/// How often the memberships are looked after.
const SUPERVISE_EVERY: Duration = Duration::from_millis(250);

/// How long an orchestrator gone from discovery may be silent before this PNode leaves it.
const FORGET_SILENT: Duration = Duration::from_secs(30);

/// How long joining one more orchestrator may take.
const JOIN_PATIENCE: Duration = Duration::from_secs(3);

/// Wait between attempts to register again with an orchestrator that forgot this PNode.
const REREGISTER_WAIT: Duration = Duration::from_secs(1);

/// Longest wait between heartbeats to an orchestrator that does not answer.
const SILENT_HEARTBEAT: Duration = Duration::from_secs(2);

/// How long a PNode behind NAT waits for its relay to come back before asking for another.
const RELAY_GIVE_UP: Duration = Duration::from_secs(5);

/// Heartbeat periods of silence after which a PNode given several orchestrators gives up the
/// silent one's jobs (another takes them over).
const FAIL_OVER_AFTER: u32 = 3;

/// Least silence before failing over, whatever the heartbeat period.
const MIN_FAIL_OVER: Duration = Duration::from_secs(1);

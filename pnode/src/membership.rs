//! Joining the orchestrator: registration with protocol version and capabilities, heartbeats,
//! and the client calls a PNode makes to the orchestrator.

use crate::actors::{Count, Host, ReleaseAll};
use crate::config::PnodeArgs;
use crate::router::Router;
use actix::Addr;
use anyhow::{Context as _, bail};
use dcnr_proto::limits::MAX_MESSAGE_BYTES;
use dcnr_proto::v1::{self, orchestrator_client::OrchestratorClient};
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

/// Registers this PNode, proving possession of its key by signing a fresh challenge. A refused
/// protocol version, quarantined identity or wrong token is an error that says so.
pub async fn register(
    link: &OrchestratorLink,
    args: &PnodeArgs,
    endpoint: &str,
    creds: &Credentials,
) -> anyhow::Result<Identity> {
    let refused = |s: tonic::Status| match s.code() {
        tonic::Code::FailedPrecondition | tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
            anyhow::anyhow!("registration refused: {}", s.message())
        }
        _ => anyhow::anyhow!("registration failed: {} ({:?})", s.message(), s.code()),
    };
    let public = creds.key.public();
    let challenge =
        link.client().challenge(v1::ChallengeRequest { public_key: public.to_vec() }).await.map_err(refused)?;
    let mut req = v1::RegisterRequest {
        protocol_version: args.protocol_version,
        name: args.name.clone(),
        endpoint: endpoint.to_string(),
        capabilities: Some(crate::capabilities::detect(args.cores, args.memory_mib)),
        nonce: challenge.into_inner().nonce,
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
        heartbeat: Duration::from_millis(u64::from(resp.heartbeat_interval_ms.max(50))),
        trusted: resp.trusted,
        certificate,
        relay,
    })
}

/// Heartbeats forever; registers again if the orchestrator has forgotten this PNode.
pub async fn heartbeat_loop(
    member: Member,
    identity: Identity,
    host: Addr<Host>,
    router: Router,
) -> anyhow::Result<()> {
    let Member { link, args, given, endpoint, creds, mut relay } = member;
    let mut identity = identity;
    relay.follow(identity.relay.as_deref());
    let mut last_ok = Instant::now();
    let orphan = Duration::from_secs(args.orphan_timeout_s);
    let fail_over = crate::discover::can_fail_over(&given);
    loop {
        tokio::time::sleep(identity.heartbeat).await;
        if !orphan.is_zero() && last_ok.elapsed() > orphan {
            bail!("the orchestrator has been unreachable for {:?}; exiting", orphan);
        }
        if relay.lost_for().is_some_and(|d| d >= RELAY_GIVE_UP) {
            // Nobody can reach this PNode while its relay is gone: ask for another. Its VNodes
            // were unreachable too, and are relocated by their jobs.
            let dropped = host.send(ReleaseAll).await.unwrap_or(0);
            tracing::warn!(dropped, after = ?RELAY_GIVE_UP, "the relay is gone; registering again for another");
            identity = register(&link, &args, &endpoint, &creds).await?;
            relay.follow(identity.relay.as_deref());
            router.set_pnode_id(identity.pnode_id.clone());
            last_ok = Instant::now();
            continue;
        }
        let hosted = host.send(Count).await.unwrap_or(0) as u32;
        let renew = identity.wants_renewal(SystemTime::now());
        let req = v1::HeartbeatRequest {
            pnode_id: identity.pnode_id.clone(),
            hosted_vnodes: hosted,
            renew_certificate: renew,
            relay_listening: relay.listening(),
        };
        match link.client().heartbeat(req).await {
            Ok(r) if r.get_ref().known => {
                last_ok = Instant::now();
                let r = r.into_inner();
                if let (Some(slot), false) = (&creds.certificate, r.certificate_chain.is_empty()) {
                    match install(slot, &creds.key, r.certificate_chain, r.certificate_expires_unix_ms) {
                        Ok(validity) => {
                            identity.certificate = Some(validity);
                            tracing::info!("certificate renewed");
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot install the renewed certificate"),
                    }
                }
            }
            Ok(_) => {
                // The orchestrator restarted or declared this PNode lost: whatever it hosts was
                // already given up and relocated, so it is dropped rather than left computing.
                let dropped = host.send(ReleaseAll).await.unwrap_or(0);
                tracing::warn!(dropped, "orchestrator no longer knows this pnode; registering again");
                identity = register(&link, &args, &endpoint, &creds).await?;
                relay.follow(identity.relay.as_deref());
                router.set_pnode_id(identity.pnode_id.clone());
                last_ok = Instant::now();
            }
            Err(s) => {
                tracing::warn!(status = %s, "heartbeat failed");
                let silent = last_ok.elapsed();
                if fail_over && silent >= (identity.heartbeat * FAIL_OVER_AFTER).max(MIN_FAIL_OVER) {
                    let Ok(other) = crate::discover::choose_within(&given, FAIL_OVER_SEARCH).await else { continue };
                    if other.orchestrator == link.url() {
                        continue;
                    }
                    link.switch_to(&other.orchestrator, FAIL_OVER_SEARCH).await?;
                    // Its jobs are taken over by another orchestrator, which allocates them anew.
                    let dropped = host.send(ReleaseAll).await.unwrap_or(0);
                    tracing::warn!(
                        from = ?silent,
                        orchestrator = %other.orchestrator,
                        dropped,
                        "orchestrator unreachable; failing over"
                    );
                    identity = register(&link, &other, &endpoint, &creds).await?;
                    relay.follow(identity.relay.as_deref());
                    router.set_pnode_id(identity.pnode_id.clone());
                    last_ok = Instant::now();
                }
            }
        }
    }
}

/// Who this PNode is to the orchestrators: what [`heartbeat_loop`] registers and heartbeats with.
pub struct Member {
    /// The link to the orchestrator joined.
    pub link: OrchestratorLink,
    /// The flags, `--orchestrator` being the one joined.
    pub args: PnodeArgs,
    /// The flags as given (`--orchestrator` as a list or DNS name: where to fail over to).
    pub given: PnodeArgs,
    /// This PNode's advertised endpoint.
    pub endpoint: String,
    /// Its key, token and certificate slot.
    pub creds: Credentials,
    /// Its listening at a relay, when it cannot be reached directly.
    pub relay: RelayLink,
}

/// How long a PNode behind NAT waits for its relay to come back before asking for another.
const RELAY_GIVE_UP: Duration = Duration::from_secs(5);

/// Heartbeat periods of silence after which a PNode given several orchestrators looks for another.
const FAIL_OVER_AFTER: u32 = 3;

/// Least silence before failing over, whatever the heartbeat period.
const MIN_FAIL_OVER: Duration = Duration::from_secs(1);

/// How long one search for another orchestrator may take.
const FAIL_OVER_SEARCH: Duration = Duration::from_secs(3);

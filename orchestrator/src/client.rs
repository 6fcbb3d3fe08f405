//! The CLI's side of the `Orchestrator` service: submit, watch with progress, list.

use crate::progress::Progress;
use crate::summary::JobSummary;
use dcnr_model::TrainingMode;
use dcnr_model::envelope::{Envelope, Target};
use dcnr_proto::limits::{MAX_MESSAGE_BYTES, UNARY_TIMEOUT};
use dcnr_proto::v1::{self, orchestrator_client::OrchestratorClient};
use std::path::{Path, PathBuf};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A client of the `Orchestrator` service that presents a maintainer token, if it has one.
pub type Client = OrchestratorClient<InterceptedService<Channel, Credentials>>;

/// A maintainer token attached to every call (`authorization: Bearer <token>`).
#[derive(Clone, Default)]
pub struct Credentials(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({})", if self.0.is_some() { "maintainer token" } else { "none" })
    }
}

impl Credentials {
    /// Credentials carrying `token`.
    pub fn token(token: &str) -> Result<Credentials, ClientError> {
        let v = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| ClientError::Invalid("the maintainer token must be printable ASCII".into()))?;
        Ok(Credentials(Some(v)))
    }
}

impl tonic::service::Interceptor for Credentials {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert(crate::service::AUTHORIZATION, v.clone());
        }
        Ok(req)
    }
}

/// How a client reaches the orchestrator securely (flags shared by every command).
#[derive(Debug, Clone, clap::Args)]
pub struct SecurityArgs {
    /// The orchestrator's TLS directory: `serve` keeps its CA and local maintainer token
    /// there; clients on the same machine read both from it.
    #[arg(long, global = true, env = "DCNR_TLS_DIR", default_value = "dcnr-tls", value_name = "DIR")]
    pub tls_dir: PathBuf,
    /// The orchestrator's CA certificate (PEM) to verify it against (default: the TLS
    /// directory's `ca.pem`).
    #[arg(long, global = true, env = "DCNR_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Instead of a CA file: the SHA-256 (hex) of the orchestrator's CA certificate
    /// (`serve` prints it), checked against what the orchestrator presents.
    #[arg(long, global = true, env = "DCNR_CA_SHA256", value_name = "HEX")]
    pub ca_sha256: Option<String>,
    /// File holding a maintainer token, needed to submit and resume jobs (default: DCNR_TOKEN,
    /// else the TLS directory's `maintainer.token`).
    #[arg(long, global = true, env = "DCNR_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Local development only: no TLS and no authentication on any link this process serves
    /// or opens (every process of the mesh must agree).
    #[arg(long, global = true, env = "DCNR_INSECURE_PLAINTEXT")]
    pub insecure_plaintext: bool,
    /// DNS server for `--orchestrator dns:NAME` (default: this machine's resolver configuration).
    #[arg(long, global = true, env = "DCNR_DNS_SERVER", value_name = "ADDR")]
    pub dns_server: Option<std::net::SocketAddr>,
}

impl SecurityArgs {
    /// Connects to the orchestrator `--orchestrator` names: a URL, comma-separated URLs or
    /// `dns:NAME` (`dcnr_mesh::discovery`), the first candidate that answers, with the CA
    /// pinned by DNS when no CA was given; returns a client carrying the maintainer credentials.
    pub async fn connect(&self, orchestrator: &str) -> Result<Client, ClientError> {
        use dcnr_mesh::discovery::{Discovery, Source, parse_sources};
        let sources = parse_sources(orchestrator).map_err(|e| ClientError::Invalid(e.to_string()))?;
        let mut pinned = self.clone();
        let url = match sources.as_slice() {
            [Source::Url(url)] => url.clone(),
            _ => {
                let unreachable = |detail: String| ClientError::Unreachable { url: orchestrator.to_string(), detail };
                let scheme = if self.insecure_plaintext { "http" } else { "https" };
                let discovery = Discovery::new(self.dns_server).map_err(|e| unreachable(e.to_string()))?;
                let found = discovery.candidates(&sources, scheme).await.map_err(|e| unreachable(e.to_string()))?;
                let mut chosen = None;
                // A CA given here (flag or this machine's TLS directory) wins over a pin from DNS.
                let own_ca = self.ca.is_some() || crate::ca::local_ca_file(&self.tls_dir).exists();
                for c in found {
                    let pin = self.ca_sha256.clone().or_else(|| c.ca_sha256.clone().filter(|_| !own_ca));
                    let probe_pin = pin.as_deref().filter(|_| self.ca.is_none());
                    if dcnr_mesh::discovery::answers(&c.url, self.insecure_plaintext, probe_pin).await.is_ok() {
                        pinned.ca_sha256 = pin;
                        chosen = Some(c.url);
                        break;
                    }
                }
                chosen.ok_or_else(|| unreachable("no candidate answered".into()))?
            }
        };
        let creds = pinned.client(&url).await?;
        connect(&url, &creds).await
    }

    /// Sets up this process's client TLS for `url` and returns the maintainer credentials.
    pub async fn client(&self, url: &str) -> Result<Credentials, ClientError> {
        use dcnr_proto::tls::{ClientSecurity, MeshTls, set_client_security};
        let invalid = |e: dcnr_proto::tls::TlsError| ClientError::Invalid(e.to_string());
        if self.insecure_plaintext {
            set_client_security(ClientSecurity::Plaintext);
        } else {
            let local = crate::ca::local_ca_file(&self.tls_dir);
            let tls = match (&self.ca, &self.ca_sha256) {
                (Some(file), _) => MeshTls::from_ca_file(file).map_err(invalid)?,
                (None, Some(pin)) => {
                    let ca = dcnr_proto::tls::fetch_server_ca(url)
                        .await
                        .map_err(|e| ClientError::Unreachable { url: url.to_string(), detail: e.to_string() })?;
                    dcnr_proto::tls::check_pin(&ca, pin).map_err(invalid)?;
                    MeshTls::new(ca, dcnr_proto::tls::CertSlot::new()).map_err(invalid)?
                }
                (None, None) if local.exists() => MeshTls::from_ca_file(&local).map_err(invalid)?,
                (None, None) => {
                    return Err(ClientError::Invalid(format!(
                        "no CA to verify the orchestrator with: pass --ca FILE or --ca-sha256 HEX (no {} here)",
                        local.display()
                    )));
                }
            };
            set_client_security(ClientSecurity::Tls(tls));
        }
        if let Ok(t) = std::env::var("DCNR_TOKEN") {
            return Credentials::token(&t);
        }
        let file = self.token_file.clone().unwrap_or_else(|| crate::ca::local_token_file(&self.tls_dir));
        match std::fs::read_to_string(&file) {
            Ok(t) => Credentials::token(&t),
            Err(_) if self.token_file.is_none() => Ok(Credentials::default()),
            Err(e) => Err(ClientError::Invalid(format!("cannot read the token file {}: {e}", file.display()))),
        }
    }
}

/// A failure with the process exit code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The orchestrator cannot be reached.
    #[error("cannot reach the orchestrator at {url}: {detail}")]
    Unreachable { url: String, detail: String },
    /// The request was refused as invalid.
    #[error("{0}")]
    Invalid(String),
    /// The orchestrator refused the caller's credentials.
    #[error("refused: {0}")]
    Refused(String),
    /// Anything else the orchestrator answered.
    #[error("orchestrator error: {0}")]
    Other(String),
}

impl ClientError {
    /// Exit code: 2 invalid input, 3 unreachable, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Invalid(_) => 2,
            ClientError::Unreachable { .. } => 3,
            ClientError::Refused(_) => 4,
            ClientError::Other(_) => 1,
        }
    }
}

/// The client error an orchestrator's refusal maps to.
pub fn status_error(s: tonic::Status) -> ClientError {
    from_status(s)
}

fn from_status(s: tonic::Status) -> ClientError {
    match s.code() {
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition | tonic::Code::NotFound => {
            ClientError::Invalid(s.message().to_string())
        }
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
            ClientError::Refused(format!("{} ({:?})", s.message(), s.code()))
        }
        _ => ClientError::Other(format!("{} ({:?})", s.message(), s.code())),
    }
}

/// Connects to an orchestrator (the process's client TLS must be set: [`SecurityArgs::client`]).
pub async fn connect(url: &str, creds: &Credentials) -> Result<Client, ClientError> {
    let unreachable = |detail: String| ClientError::Unreachable { url: url.to_string(), detail };
    // No blanket deadline: watching a job streams for as long as the job runs.
    let expect = dcnr_proto::tls::Expect::Orchestrator;
    let channel = dcnr_proto::transport::endpoint(url, None, &expect)
        .map_err(|e| ClientError::Invalid(e.to_string()))?
        .connect()
        .await
        .map_err(|e| unreachable(format!("{e}")))?;
    Ok(OrchestratorClient::with_interceptor(channel, creds.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// Training-length overrides.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct Overrides {
    /// Train exactly this many steps (micro-batches).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Train this many epochs (ignored with --steps).
    #[arg(long)]
    pub epochs: Option<u32>,
    /// Micro-batches in flight (1 = synchronous).
    #[arg(long = "in-flight")]
    pub in_flight: Option<u32>,
    /// Training mode: `exact` (end-to-end backpropagation) or `local` (each block learns from
    /// its own auxiliary head; see docs/TRAINING_MODES.md). Default: the model file's.
    #[arg(long, env = "DCNR_TRAINING_MODE", value_parser = parse_mode)]
    pub mode: Option<TrainingMode>,
    /// Data-parallel pipelines: copies of the graph on PNodes of their own, each on its shard of
    /// the data, averaging every --sync-every steps (docs/TRAINING_MODES.md). Default: the model
    /// file's.
    #[arg(long, env = "DCNR_PIPELINES")]
    pub pipelines: Option<u32>,
    /// Steps each pipeline takes between averaging rounds. Default: the model file's.
    #[arg(long = "sync-every", env = "DCNR_SYNC_EVERY")]
    pub sync_every: Option<u64>,
    /// PNodes the job may use: `cpu` (CPU PNodes, or the CPU of GPU PNodes), `gpu` (GPU PNodes
    /// only, computing on their GPUs) or `any` (GPUs where there are some). Results agree bit
    /// for bit only within one determinism class, and a GPU is its own class. Default: the
    /// envelope's `[policy] target` (`any`).
    #[arg(long, env = "DCNR_TARGET", value_parser = parse_target)]
    pub target: Option<Target>,
}

/// `cpu`, `gpu` or `any`.
fn parse_target(s: &str) -> Result<Target, String> {
    match s {
        "cpu" => Ok(Target::Cpu),
        "gpu" => Ok(Target::Gpu),
        "any" => Ok(Target::Any),
        other => Err(format!("unknown target `{other}` (cpu, gpu, any)")),
    }
}

/// `exact` or `local`.
fn parse_mode(s: &str) -> Result<TrainingMode, String> {
    match s {
        "exact" => Ok(TrainingMode::Exact),
        "local" => Ok(TrainingMode::Local),
        other => Err(format!("unknown training mode `{other}` (exact, local)")),
    }
}

impl Overrides {
    /// Writes the overrides into an envelope's recipe.
    pub fn apply(&self, env: &mut Envelope) {
        if let Some(s) = self.steps {
            env.op.steps = Some(s);
            env.op.epochs = None;
        } else if let Some(e) = self.epochs {
            env.op.epochs = Some(e);
            env.op.steps = None;
        }
        if let Some(k) = self.in_flight {
            env.op.in_flight = Some(k);
        }
        if let Some(m) = self.mode {
            env.op.mode = Some(m);
        }
        if let Some(r) = self.pipelines {
            env.op.pipelines = Some(r);
        }
        if let Some(h) = self.sync_every {
            env.op.sync_every = Some(h);
        }
        if let Some(t) = self.target {
            env.policy.target = t;
        }
    }
}

/// Reads a job file (envelope or bare graph), inlines a model given by path (relative to the
/// file), and applies the overrides.
pub fn load_job(path: &Path, o: Overrides) -> Result<Envelope, ClientError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ClientError::Invalid(format!("cannot read {}: {e}", path.display())))?;
    let mut env = Envelope::parse(&text).map_err(|e| ClientError::Invalid(format!("{}: {e}", path.display())))?;
    if let Some(model) = env.op.model.take() {
        if env.op.model_toml.is_some() {
            return Err(ClientError::Invalid(format!("{}: op gives both `model` and `model_toml`", path.display())));
        }
        let p = path.parent().unwrap_or(Path::new(".")).join(&model);
        let t = std::fs::read_to_string(&p)
            .map_err(|e| ClientError::Invalid(format!("cannot read model graph {}: {e}", p.display())))?;
        env.op.model_toml = Some(t);
    }
    o.apply(&mut env);
    Ok(env)
}

/// Submits a job; returns its id.
pub async fn submit(client: &mut Client, envelope: &Envelope) -> Result<String, ClientError> {
    let envelope_json = serde_json::to_string(envelope)
        .map_err(|e| ClientError::Invalid(format!("cannot encode the envelope: {e}")))?;
    let mut req = tonic::Request::new(v1::SubmitJobRequest { envelope_json, ..Default::default() });
    // Loading a dataset on first use can take a moment; allow it.
    req.set_timeout(UNARY_TIMEOUT);
    let r = client.submit_job(req).await.map_err(from_status)?;
    Ok(r.into_inner().job_id)
}

/// Asks the orchestrator to resume a job from its latest snapshot; returns its id.
pub async fn resume(client: &mut Client, job_id: &str, steps: Option<u64>) -> Result<String, ClientError> {
    let mut req = tonic::Request::new(v1::ResumeJobRequest { job_id: job_id.to_string(), steps: steps.unwrap_or(0) });
    req.set_timeout(UNARY_TIMEOUT);
    Ok(client.resume_job(req).await.map_err(from_status)?.into_inner().job_id)
}

/// Follows a job until it ends, showing progress; returns its summary.
pub async fn wait(client: &mut Client, job_id: &str, show_progress: bool) -> Result<JobSummary, ClientError> {
    use v1::job_event::Body;
    let mut stream =
        client.watch_job(v1::WatchJobRequest { job_id: job_id.to_string() }).await.map_err(from_status)?.into_inner();
    let mut progress = show_progress.then(Progress::new);
    while let Some(ev) = stream.message().await.map_err(from_status)? {
        match ev.body {
            Some(Body::Progress(p)) => {
                if let Some(bar) = progress.as_mut() {
                    bar.update(p.step, p.steps_total, p.loss, p.samples_per_s, p.epoch);
                }
            }
            Some(Body::Evaluation(e)) => {
                if let Some(bar) = progress.as_mut() {
                    bar.line(&format!(
                        "epoch {}: test accuracy {:.2}%, test loss {:.4}",
                        e.epoch,
                        e.accuracy * 100.0,
                        e.loss
                    ));
                }
            }
            Some(Body::Log(text)) => {
                if let Some(bar) = progress.as_mut() {
                    bar.line(&text);
                }
            }
            Some(Body::Finished(s)) => {
                if let Some(bar) = progress.take() {
                    bar.finish();
                }
                return serde_json::from_str(&s.summary_json).map_err(|e| {
                    ClientError::Other(format!("job ended without a readable summary ({e}): {}", s.error))
                });
            }
            None => {}
        }
    }
    Err(ClientError::Other(format!("the orchestrator closed the watch of job {job_id} before it ended")))
}

/// All jobs.
pub async fn jobs(client: &mut Client) -> Result<Vec<v1::JobStatus>, ClientError> {
    Ok(client.list_jobs(v1::ListJobsRequest {}).await.map_err(from_status)?.into_inner().jobs)
}

/// One job's status, from this orchestrator or the store it shares with its peers.
pub async fn job(client: &mut Client, id: &str) -> Result<v1::JobStatus, ClientError> {
    let req = v1::GetJobRequest { job_id: id.to_string() };
    Ok(client.get_job(req).await.map_err(from_status)?.into_inner())
}

/// All PNodes.
pub async fn pnodes(client: &mut Client) -> Result<Vec<v1::PNodeInfo>, ClientError> {
    Ok(client.list_p_nodes(v1::ListPNodesRequest {}).await.map_err(from_status)?.into_inner().pnodes)
}

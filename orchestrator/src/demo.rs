//! `demo`: an orchestrator in this process, `pnode` child processes on loopback, one job.

use crate::client::{self, ClientError, Overrides};
use crate::job_table::JobDefaults;
use crate::pnode_bin::{self, PnodeBinError};
use crate::registry::{Health, ListPNodes};
use crate::server::{self, ServerConfig};
use crate::summary::JobSummary;
use anyhow::{Context as _, anyhow, bail};
use dcnr_model::envelope::Envelope;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// The model the demo trains when none is given and `models/mnist-mlp.toml` is not at hand.
pub const BUILTIN_MODEL: &str = include_str!("../../models/mnist-mlp.toml");

/// Flags of `demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// PNodes to start.
    #[arg(long, default_value_t = 3)]
    pub pnodes: usize,
    /// Model graph to train (default: models/mnist-mlp.toml).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Dataset directory.
    #[arg(long, env = "DCNR_DATA")]
    pub data: Option<PathBuf>,
    /// Training length and pipelining.
    #[command(flatten)]
    pub overrides: Overrides,
    /// Artifact store: a directory, file:///path or s3://bucket/prefix.
    #[arg(long, env = "DCNR_STORE", default_value = "dcnr-artifacts")]
    pub store: String,
    /// S3 endpoint for an s3:// store.
    #[arg(long, env = "DCNR_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// Trusted-mode token file: the orchestrator accepts it and every local PNode presents it.
    #[arg(long, env = "DCNR_TRUSTED_TOKEN_FILE")]
    pub trusted_token_file: Option<PathBuf>,
    /// Address of the web dashboard (port 0 picks a free one).
    #[arg(long, env = "DCNR_DASHBOARD", default_value = "127.0.0.1:0")]
    pub dashboard: SocketAddr,
    /// Keep the mesh and the dashboard up after the job ends, until Ctrl-C.
    #[arg(long)]
    pub linger: bool,
    /// The `pnode` executable to start (default: the one beside this executable).
    #[arg(long, env = crate::pnode_bin::ENV)]
    pub pnode_bin: Option<PathBuf>,
}

/// Reads the model file, or the built-in MNIST MLP.
pub fn model_text(path: Option<&PathBuf>) -> anyhow::Result<String> {
    match path {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("cannot read model graph {}", p.display())),
        None => Ok(std::fs::read_to_string("models/mnist-mlp.toml").unwrap_or_else(|_| BUILTIN_MODEL.to_string())),
    }
}

struct Children(Vec<(String, Child)>);

impl Children {
    /// Asks every PNode to leave (SIGTERM: it drains and deregisters), so the orchestrator sees
    /// departures rather than losses; whoever has not left within 5 s is killed.
    async fn stop(&mut self) {
        for (_, c) in &self.0 {
            if let Some(pid) = c.id() {
                let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
            }
        }
        for (_, c) in &mut self.0 {
            if tokio::time::timeout(Duration::from_secs(5), c.wait()).await.is_err() {
                let _ = c.start_kill();
                let _ = tokio::time::timeout(Duration::from_secs(5), c.wait()).await;
            }
        }
        self.0.clear();
    }
}

/// What a [`LocalMesh`] runs.
#[derive(Debug, Clone, Default)]
pub struct MeshConfig {
    /// PNode processes to start.
    pub pnodes: usize,
    /// Dataset directory.
    pub data: Option<PathBuf>,
    /// Artifact store URL.
    pub store: Option<String>,
    /// S3 endpoint for an s3:// store.
    pub s3_endpoint: Option<String>,
    /// Where to serve the dashboard (none: no dashboard).
    pub dashboard: Option<SocketAddr>,
    /// Extra flags for every PNode (e.g. `--max-vnodes 256`).
    pub pnode_args: Vec<String>,
    /// Trusted-mode token file: the orchestrator accepts it and every PNode presents it.
    pub trusted_token_file: Option<PathBuf>,
    /// The `pnode` executable (none: as [`crate::pnode_bin::locate`] finds it).
    pub pnode_bin: Option<PathBuf>,
    /// Give every PNode a Prometheus `/metrics` address ([`LocalMesh::pnode_metrics`]).
    pub pnode_metrics: bool,
}

/// An orchestrator in this process with PNode child processes on loopback.
pub struct LocalMesh {
    srv: server::ServerHandle,
    /// The mesh's TLS directory (CA, maintainer token), removed with the mesh.
    _tls: Option<tempfile::TempDir>,
    children: Children,
    /// The `pnode` executable every PNode started here runs.
    pnode_exe: PathBuf,
    /// Extra flags every PNode started here gets.
    pnode_args: Vec<String>,
    /// Whether every PNode started here serves `/metrics`.
    with_metrics: bool,
    /// Where each PNode started here serves `/metrics`, by name.
    metrics: Vec<(String, SocketAddr)>,
}

impl LocalMesh {
    /// Starts the orchestrator and `pnodes` PNodes and waits until all joined.
    pub async fn start(
        pnodes: usize,
        data: Option<PathBuf>,
        store: Option<String>,
        s3_endpoint: Option<String>,
    ) -> anyhow::Result<LocalMesh> {
        Self::start_with(MeshConfig { pnodes, data, store, s3_endpoint, ..MeshConfig::default() }).await
    }

    /// Starts a mesh as `cfg` says and waits until all its PNodes joined.
    pub async fn start_with(cfg: MeshConfig) -> anyhow::Result<LocalMesh> {
        let MeshConfig {
            pnodes,
            data,
            store,
            s3_endpoint,
            dashboard,
            mut pnode_args,
            trusted_token_file,
            pnode_bin,
            pnode_metrics,
        } = cfg;
        if let Some(p) = &trusted_token_file {
            pnode_args.extend(["--trusted-token-file".to_string(), p.display().to_string()]);
        }
        if pnodes == 0 || pnodes > 64 {
            return Err(ClientError::Invalid("--pnodes must be between 1 and 64".into()).into());
        }
        // Finding pnode may mean building it, which must not hold up an async worker.
        let pnode_exe = match tokio::task::spawn_blocking(move || pnode_bin::locate(pnode_bin.as_deref())).await? {
            Ok(p) => p,
            Err(e @ PnodeBinError::NotFound(_)) => return Err(ClientError::Invalid(e.to_string()).into()),
            Err(e) => return Err(e.into()),
        };
        let tls = match PLAINTEXT_MESHES.load(std::sync::atomic::Ordering::Relaxed) {
            true => None,
            false => Some(tempfile::Builder::new().prefix("dcnr-tls-").tempdir()?),
        };
        let security = match &tls {
            Some(dir) => {
                pnode_args.extend(["--ca".to_string(), crate::ca::local_ca_file(dir.path()).display().to_string()]);
                server::SecurityConfig::tls(dir.path().to_path_buf())
            }
            None => {
                pnode_args.push("--insecure-plaintext".to_string());
                server::SecurityConfig { tls_dir: None, ..server::SecurityConfig::tls(PathBuf::new()) }
            }
        };
        let cfg = ServerConfig {
            security,
            dashboard_hosts: Vec::new(),
            instance: None,
            lease_term: Duration::from_secs(5),
            relay: None,
            advertise: None,
            listen: "127.0.0.1:0".parse()?,
            data,
            heartbeat: Duration::from_millis(200),
            heartbeat_timeout: Duration::from_millis(1000),
            jobs: JobDefaults {
                step_deadline: Duration::from_secs(30),
                recovery_every: Duration::from_secs(2),
                placement_timeout: Duration::from_secs(30),
                max_pnodes: pnodes,
            },
            store,
            s3_endpoint,
            trusted_token: match &trusted_token_file {
                Some(p) => crate::admission::TrustedToken::from_file(p).map_err(ClientError::Invalid)?,
                None => crate::admission::TrustedToken::default(),
            },
            trust: crate::trust::TrustPolicy::default(),
            dashboard,
        };
        let srv = server::start(cfg).await?;
        let mut mesh = LocalMesh {
            srv,
            _tls: tls,
            children: Children(Vec::new()),
            pnode_exe,
            pnode_args,
            with_metrics: pnode_metrics,
            metrics: Vec::new(),
        };
        for i in 0..pnodes {
            mesh.add_pnode(&format!("local-pnode-{i}"))?;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let snap = mesh.srv.registry.send(ListPNodes).await?;
            let healthy = snap.iter().filter(|p| p.health == Health::Healthy).count();
            if healthy >= pnodes {
                return Ok(mesh);
            }
            for (_, c) in &mut mesh.children.0 {
                if let Some(status) = c.try_wait()? {
                    bail!("a pnode process exited before joining ({status})");
                }
            }
            if Instant::now() > deadline {
                bail!("only {healthy} of {pnodes} pnodes joined within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts one more PNode process named `name`.
    pub fn add_pnode(&mut self, name: &str) -> anyhow::Result<()> {
        self.add_pnode_with(name, &[])
    }

    /// Starts one more PNode process named `name` with `extra` flags besides the mesh's. It
    /// gets this process's link emulation, so every link of the mesh is shaped alike.
    pub fn add_pnode_with(&mut self, name: &str, extra: &[String]) -> anyhow::Result<()> {
        let link = dcnr_proto::shaping::configured().map(|s| s.flags()).unwrap_or_default();
        let metrics = match self.with_metrics {
            // A free port now; the child binds it a moment later.
            true => Some(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?),
            false => None,
        };
        let metrics_flag = metrics.map(|a| vec!["--metrics".to_string(), a.to_string()]).unwrap_or_default();
        let child = Command::new(&self.pnode_exe)
            .args([
                "--orchestrator",
                &self.srv.url(),
                "--listen",
                "127.0.0.1:0",
                "--orphan-timeout-s",
                "5",
                "--ephemeral",
            ])
            .arg("--name")
            .arg(name)
            .args(link)
            .args(metrics_flag)
            .args(&self.pnode_args)
            .args(extra)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start a pnode process ({})", self.pnode_exe.display()))?;
        self.children.0.push((name.to_string(), child));
        if let Some(a) = metrics {
            self.metrics.push((name.to_string(), a));
        }
        Ok(())
    }

    /// Where each running PNode serves `/metrics` (only with [`MeshConfig::pnode_metrics`]).
    pub fn pnode_metrics(&self) -> Vec<SocketAddr> {
        self.metrics.iter().map(|(_, a)| *a).collect()
    }

    /// SIGKILLs the PNode process named `name` (a crash); false if there is none.
    pub async fn kill_pnode(&mut self, name: &str) -> bool {
        let Some(i) = self.children.0.iter().position(|(n, _)| n == name) else { return false };
        let (_, mut c) = self.children.0.remove(i);
        self.metrics.retain(|(n, _)| n != name);
        let _ = c.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), c.wait()).await;
        true
    }

    /// The job table of the in-process orchestrator.
    pub fn jobs(&self) -> &actix::Addr<crate::job_table::JobTable> {
        &self.srv.jobs
    }

    /// The registry of the in-process orchestrator.
    pub fn registry(&self) -> &actix::Addr<crate::registry::Registry> {
        &self.srv.registry
    }

    /// The orchestrator's URL.
    pub fn url(&self) -> String {
        self.srv.url()
    }

    /// The dashboard's URL, if it runs.
    pub fn dashboard_url(&self) -> Option<String> {
        self.srv.dashboard_url()
    }

    /// Submits a job and follows it to the end.
    pub async fn run_job(&self, envelope: &Envelope, progress: bool) -> anyhow::Result<JobSummary> {
        let mut c = self.client().await?;
        let job = client::submit(&mut c, envelope).await?;
        if progress {
            eprintln!("submitted {job}");
        }
        Ok(client::wait(&mut c, &job, progress).await?)
    }

    /// A maintainer's client of the in-process orchestrator.
    pub async fn client(&self) -> Result<client::Client, ClientError> {
        let creds = match self.srv.maintainer_token() {
            Some(t) => client::Credentials::token(&t)?,
            None => client::Credentials::default(),
        };
        client::connect(&self.srv.url(), &creds).await
    }

    /// Stops the PNodes and the orchestrator.
    pub async fn stop(mut self) {
        self.children.stop().await;
        self.srv.task.abort();
    }
}

static PLAINTEXT_MESHES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes the local meshes this process starts plaintext (`--insecure-plaintext`), e.g. to
/// measure what TLS costs.
pub fn set_plaintext_meshes(on: bool) {
    PLAINTEXT_MESHES.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Runs the demo; the summary is returned whether the job succeeded or failed.
pub async fn run(args: DemoArgs) -> anyhow::Result<JobSummary> {
    let graph = model_text(args.model.as_ref())?;
    let mut envelope = Envelope::from_graph(&graph).map_err(|e| ClientError::Invalid(e.to_string()))?;
    args.overrides.apply(&mut envelope);
    let mesh = LocalMesh::start_with(MeshConfig {
        pnodes: args.pnodes,
        data: args.data.clone(),
        store: Some(args.store.clone()),
        s3_endpoint: args.s3_endpoint.clone(),
        dashboard: Some(args.dashboard),
        pnode_args: Vec::new(),
        trusted_token_file: args.trusted_token_file.clone(),
        pnode_bin: args.pnode_bin.clone(),
        pnode_metrics: false,
    })
    .await?;
    eprintln!("orchestrator at {} with {} pnodes", mesh.url(), args.pnodes);
    if let Some(url) = mesh.dashboard_url() {
        eprintln!("dashboard at {url}");
    }
    let result = tokio::select! {
        r = mesh.run_job(&envelope, true) => r,
        _ = dcnr_mesh::signal::shutdown_signal() => Err(anyhow!("interrupted")),
    };
    if args.linger && result.is_ok() {
        eprintln!("job ended; the dashboard stays up until Ctrl-C");
        dcnr_mesh::signal::shutdown_signal().await;
    }
    mesh.stop().await;
    result
}

//! `demo`: an orchestrator in this process, PNodes as child processes on loopback, one job.

use crate::client::{self, Overrides};
use crate::jobs::JobDefaults;
use crate::registry::{Health, Snapshot};
use crate::server::{self, ServerConfig};
use crate::summary::JobSummary;
use anyhow::{Context as _, anyhow, bail};
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
}

/// Reads the model file, or the built-in MNIST MLP.
pub fn model_text(path: Option<&PathBuf>) -> anyhow::Result<String> {
    match path {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("cannot read model graph {}", p.display())),
        None => Ok(std::fs::read_to_string("models/mnist-mlp.toml").unwrap_or_else(|_| BUILTIN_MODEL.to_string())),
    }
}

struct Children(Vec<Child>);

impl Children {
    async fn stop(&mut self) {
        for c in &mut self.0 {
            let _ = c.start_kill();
        }
        for c in &mut self.0 {
            let _ = tokio::time::timeout(Duration::from_secs(5), c.wait()).await;
        }
        self.0.clear();
    }
}

/// Runs the demo; the summary is returned whether the job succeeded or failed.
pub async fn run(args: DemoArgs) -> anyhow::Result<JobSummary> {
    if args.pnodes == 0 || args.pnodes > 64 {
        bail!("--pnodes must be between 1 and 64");
    }
    let graph = model_text(args.model.as_ref())?;
    let cfg = ServerConfig {
        listen: "127.0.0.1:0".parse()?,
        data: args.data.clone(),
        heartbeat: Duration::from_millis(250),
        heartbeat_timeout: Duration::from_millis(1500),
        jobs: JobDefaults {
            stall_timeout: Duration::from_secs(60),
            placement_timeout: Duration::from_secs(30),
            max_pnodes: args.pnodes,
        },
    };
    let srv = server::start(cfg).await?;
    let exe = std::env::current_exe().context("cannot find this executable to start PNodes")?;
    let mut children = Children(Vec::new());
    for i in 0..args.pnodes {
        let child = Command::new(&exe)
            .args(["pnode", "--orchestrator", &srv.url(), "--listen", "127.0.0.1:0", "--orphan-timeout-s", "5", "--name"])
            .arg(format!("demo-pnode-{i}"))
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start a pnode process")?;
        children.0.push(child);
    }
    let result = tokio::select! {
        r = drive(&srv, &mut children, &args, graph) => r,
        _ = dcnr_pnode::shutdown_signal() => Err(anyhow!("interrupted")),
    };
    children.stop().await;
    srv.task.abort();
    result
}

async fn drive(srv: &server::ServerHandle, children: &mut Children, args: &DemoArgs, graph: String) -> anyhow::Result<JobSummary> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let healthy = srv.registry.send(Snapshot).await?.iter().filter(|p| p.health == Health::Healthy).count();
        if healthy >= args.pnodes {
            break;
        }
        for c in &mut children.0 {
            if let Some(status) = c.try_wait()? {
                bail!("a pnode process exited before joining ({status})");
            }
        }
        if Instant::now() > deadline {
            bail!("only {healthy} of {} pnodes joined within 60 s", args.pnodes);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("orchestrator at {} with {} pnodes", srv.url(), args.pnodes);
    let mut c = client::connect(&srv.url()).await?;
    let job = client::submit(&mut c, graph, args.overrides).await?;
    eprintln!("submitted {job}");
    Ok(client::wait(&mut c, &job, true).await?)
}

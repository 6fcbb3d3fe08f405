//! `bench-recovery`: repeatedly SIGKILLs a PNode that hosts VNodes of a training job and
//! measures how long the orchestrator takes to notice, how long until training completes its
//! next step, and how many steps each failure costs. A fresh PNode replaces every one killed,
//! so each kill meets the same mesh size.

use crate::bench::percentile;
use crate::demo::{self, LocalMesh};
use crate::job_table::{Get, Submit};
use crate::registry::{Health, ListPNodes};
use crate::status::JobState;
use anyhow::{Context as _, bail};
use dcnr_model::envelope::Envelope;
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Flags of `bench-recovery`.
#[derive(Debug, Clone, clap::Args)]
pub struct RecoveryBenchArgs {
    /// PNodes in the mesh (one is killed and replaced per round).
    #[arg(long, default_value_t = 4)]
    pub pnodes: usize,
    /// Kills to measure.
    #[arg(long, default_value_t = 10)]
    pub kills: usize,
    /// Seconds of training between kills.
    #[arg(long, default_value_t = 3.0)]
    pub interval_s: f64,
    /// Model graph (default: models/mnist-mlp.toml).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Dataset directory.
    #[arg(long, env = "DCNR_DATA")]
    pub data: Option<PathBuf>,
}

/// One measured kill.
#[derive(Debug, Clone, Serialize)]
pub struct KillSample {
    /// Steps done when the PNode was killed.
    pub at_step: u64,
    /// Seconds from the kill until the job started recovering.
    pub detect_s: f64,
    /// Seconds from the kill until the next training step completed.
    pub recover_s: f64,
    /// Steps computed again.
    pub recomputed_steps: u64,
}

/// What `bench-recovery` measured.
#[derive(Debug, Clone, Serialize)]
pub struct RecoveryReport {
    /// Every kill.
    pub samples: Vec<KillSample>,
    /// Median and 99th percentile of detection time, seconds.
    pub detect_p50_s: f64,
    /// 99th percentile of detection time.
    pub detect_p99_s: f64,
    /// Median time to the next completed step.
    pub recover_p50_s: f64,
    /// 99th percentile time to the next completed step.
    pub recover_p99_s: f64,
    /// Median steps recomputed per failure.
    pub recomputed_p50: u64,
}

/// Runs the benchmark.
pub async fn run(args: RecoveryBenchArgs) -> anyhow::Result<RecoveryReport> {
    if args.pnodes < 2 {
        return Err(crate::client::ClientError::Invalid(
            "--pnodes must be at least 2 (one is killed at a time)".into(),
        )
        .into());
    }
    let graph = demo::model_text(args.model.as_ref())?;
    let mut envelope = Envelope::from_graph(&graph)?;
    envelope.op.steps = Some(10_000_000);
    envelope.op.epochs = None;
    envelope.policy.timeout_s = 24 * 3600;
    let mut mesh = LocalMesh::start(args.pnodes, args.data.clone(), None, None).await?;
    let result = measure(&mut mesh, envelope, &args).await;
    mesh.stop().await;
    result
}

async fn status(mesh: &LocalMesh, job: &str) -> anyhow::Result<crate::status::JobStatus> {
    mesh.jobs().send(Get(job.to_string())).await?.context("the job vanished")
}

async fn measure(mesh: &mut LocalMesh, envelope: Envelope, args: &RecoveryBenchArgs) -> anyhow::Result<RecoveryReport> {
    let job = mesh.jobs().send(Submit(envelope)).await??;
    let mut samples = Vec::new();
    // indicatif draws nothing when stderr is not a terminal.
    let pb = indicatif::ProgressBar::new(args.kills as u64);
    for round in 0..args.kills {
        tokio::time::sleep(Duration::from_secs_f64(args.interval_s)).await;
        let st = status(mesh, &job).await?;
        if st.state != JobState::Running {
            bail!("the job is {:?}, not running: {:?}", st.state, st.error);
        }
        let snap = mesh.registry().send(ListPNodes).await?;
        let Some(victim) = snap.iter().find(|p| p.health == Health::Healthy && p.hosted_vnodes > 0) else {
            bail!("no pnode hosts VNodes");
        };
        let at_step = st.steps_done;
        let t0 = Instant::now();
        if !mesh.kill_pnode(&victim.name).await {
            bail!("pnode {} is not one of ours", victim.name);
        }
        let before = st.recoveries.len();
        let mut detect = None;
        let rec = loop {
            let st = status(mesh, &job).await?;
            if detect.is_none() && st.recoveries.len() > before {
                detect = Some(t0.elapsed());
            }
            // The job times its own first step after the recovery began.
            if let Some(r) = st.recoveries.get(before)
                && r.first_step_s.is_some()
            {
                break r.clone();
            }
            if st.state.is_final() {
                bail!("the job ended during recovery: {:?}", st.error);
            }
            if t0.elapsed() > Duration::from_secs(120) {
                bail!("no recovery within 120 s of the kill");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        mesh.add_pnode(&format!("local-pnode-{}", args.pnodes + round))?;
        let detect_s = detect.unwrap_or_default().as_secs_f64();
        samples.push(KillSample {
            at_step,
            detect_s,
            recover_s: detect_s + rec.first_step_s.unwrap_or_default(),
            recomputed_steps: rec.recomputed_steps,
        });
        pb.inc(1);
    }
    pb.finish_and_clear();
    let d: Vec<f64> = samples.iter().map(|s| s.detect_s).collect();
    let r: Vec<f64> = samples.iter().map(|s| s.recover_s).collect();
    let mut rc: Vec<u64> = samples.iter().map(|s| s.recomputed_steps).collect();
    rc.sort();
    Ok(RecoveryReport {
        detect_p50_s: percentile(&d, 0.5),
        detect_p99_s: percentile(&d, 0.99),
        recover_p50_s: percentile(&r, 0.5),
        recover_p99_s: percentile(&r, 0.99),
        recomputed_p50: rc.get(rc.len() / 2).copied().unwrap_or(0),
        samples,
    })
}

/// Prints the report as text.
pub fn print(r: &RecoveryReport) {
    println!("{:>8} {:>10} {:>10} {:>10}", "AT STEP", "DETECT s", "RECOVER s", "RECOMPUTED");
    for s in &r.samples {
        println!("{:>8} {:>10.3} {:>10.3} {:>10}", s.at_step, s.detect_s, s.recover_s, s.recomputed_steps);
    }
    println!(
        "detection p50 {:.3}s p99 {:.3}s; kill to next step p50 {:.3}s p99 {:.3}s; steps recomputed p50 {}",
        r.detect_p50_s, r.detect_p99_s, r.recover_p50_s, r.recover_p99_s, r.recomputed_p50
    );
}

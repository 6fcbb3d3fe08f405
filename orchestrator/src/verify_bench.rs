//! `bench-verify`: what redundant execution costs and how fast it catches a cheater. Trains the
//! same job on fresh local meshes under `verify = none`, `spotcheck` and `full`, side by side,
//! and reports each policy's throughput relative to `none`; then, with one PNode started with
//! `--fault KIND` (and claiming the most cores, so it gets part of the job), how many steps the
//! job had done when that PNode was quarantined, and whether the final parameters still equal
//! the fault-free run's.

use crate::bench::percentile;
use crate::demo::{self, LocalMesh, MeshConfig};
use crate::job_table::{Get, Submit};
use crate::registry::ListPNodes;
use crate::status::JobStatus;
use crate::trust::Standing;
use anyhow::{Context as _, bail};
use dcnr_model::envelope::{Envelope, Verify};
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Flags of `bench-verify`.
#[derive(Debug, Clone, clap::Args)]
pub struct VerifyBenchArgs {
    /// PNodes in each mesh (one of them cheats in the fault runs).
    #[arg(long, default_value_t = 4)]
    pub pnodes: usize,
    /// Training steps per job.
    #[arg(long, default_value_t = 1500)]
    pub steps: u64,
    /// Throughput runs per policy.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Steps per verified segment.
    #[arg(long, default_value_t = 100)]
    pub segment_steps: u64,
    /// Micro-batches in flight (default: the model's).
    #[arg(long)]
    pub in_flight: Option<u32>,
    /// Faults to measure steps-to-quarantine for (comma-separated; empty: none).
    #[arg(long, value_delimiter = ',', default_value = "corrupt,sign-flip,scale,nan,lazy")]
    pub faults: Vec<String>,
    /// Model graph (default: models/mnist-mlp.toml).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Dataset directory.
    #[arg(long, env = "DCNR_DATA")]
    pub data: Option<PathBuf>,
}

/// Throughput of one policy.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyThroughput {
    /// none | spotcheck 10% | full.
    pub policy: String,
    /// Samples per second of every run (steps x batch / job wall time, verification included).
    pub runs: Vec<f64>,
    /// Median.
    pub median: f64,
    /// Median of the per-run ratios to `none` on the whole mesh, measured in the same round.
    pub ratio: f64,
    /// Median of the per-run ratios to `none` on as many PNodes as this policy's job itself
    /// uses (the rest are left to replicas): the cost of the replicas alone.
    pub ratio_same_pnodes: f64,
}

/// One cheater measured.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRun {
    /// The fault and the policy it met.
    pub fault: String,
    /// Policy.
    pub policy: String,
    /// Steps the job had completed when it first rolled back because of the cheater (None:
    /// never, e.g. every lie was outvoted in replicas).
    pub rolled_back_at_step: Option<u64>,
    /// Steps the job had completed when the cheater was quarantined (None: never).
    pub quarantined_at_step: Option<u64>,
    /// Steps the job had executed by then, counting those it computed again after rollbacks.
    pub quarantined_after_steps_executed: Option<u64>,
    /// Seconds from submission to the quarantine.
    pub quarantined_after_s: Option<f64>,
    /// Whether the final parameters equal the fault-free run's.
    pub model_unchanged: bool,
    /// Recoveries (rollbacks) the job went through.
    pub recoveries: usize,
}

/// What `bench-verify` measured.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// Steps per job.
    pub steps: u64,
    /// Throughput per policy.
    pub throughput: Vec<PolicyThroughput>,
    /// Cheaters.
    pub faults: Vec<FaultRun>,
}

/// A policy measured: label, verify mode, spot-check fraction, PNodes the job may take.
struct Case {
    label: &'static str,
    verify: Verify,
    fraction: Option<f64>,
    job_pnodes: Option<usize>,
    /// The `none` case on as many PNodes as this one's job.
    baseline: usize,
}

fn envelope(
    graph: &str,
    args: &VerifyBenchArgs,
    steps: u64,
    verify: Verify,
    fraction: Option<f64>,
) -> anyhow::Result<Envelope> {
    let mut e = Envelope::from_graph(graph)?;
    e.op.steps = Some(steps);
    e.op.epochs = None;
    e.op.in_flight = args.in_flight;
    e.policy.min_pnodes = args.pnodes as u32;
    e.policy.verify = verify;
    if verify != Verify::None {
        e.policy.spotcheck_fraction = fraction;
        e.policy.segment_steps = Some(args.segment_steps);
    }
    Ok(e)
}

/// Runs `envelope` to its end on a fresh mesh; `cheat` adds a PNode with that fault. Returns
/// the final status and, for a cheater, (job step, steps executed, seconds) at its quarantine.
async fn run_job(
    args: &VerifyBenchArgs,
    envelope: Envelope,
    cheat: Option<&str>,
) -> anyhow::Result<(JobStatus, Option<(u64, u64, f64)>)> {
    let honest = if cheat.is_some() { args.pnodes - 1 } else { args.pnodes };
    let cfg = MeshConfig { pnodes: honest, data: args.data.clone(), ..MeshConfig::default() };
    let mut mesh = LocalMesh::start_with(cfg).await?;
    let result = async {
        if let Some(f) = cheat {
            // It claims more cores than anyone, as a volunteer after work would: placement then
            // gives it part of the job itself, not only replicas.
            let flags = ["--fault", f, "--cores", "64"].map(str::to_string);
            mesh.add_pnode_with("cheat", &flags)?;
        }
        let started = Instant::now();
        let job = mesh.jobs().send(Submit(envelope)).await??;
        let mut quarantined = None;
        loop {
            let st = mesh.jobs().send(Get(job.clone())).await?.context("the job vanished")?;
            if cheat.is_some() && quarantined.is_none() {
                let snap = mesh.registry().send(ListPNodes).await?;
                if snap.iter().any(|p| p.name == "cheat" && p.standing == Standing::Quarantined) {
                    let redone: u64 = st.recoveries.iter().map(|r| r.recomputed_steps).sum();
                    quarantined = Some((st.steps_done, st.steps_done + redone, started.elapsed().as_secs_f64()));
                }
            }
            if st.state.is_final() {
                return Ok::<_, anyhow::Error>((st, quarantined));
            }
            if started.elapsed() > Duration::from_secs(1800) {
                bail!("the job did not finish within 30 minutes");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    .await;
    mesh.stop().await;
    result
}

fn rate_and_hash(st: &JobStatus) -> anyhow::Result<(f64, String)> {
    let s = st.summary.as_ref().context("the job has no summary")?;
    if s.status != "succeeded" {
        bail!("the job failed: {:?}", s.error);
    }
    let hash = s.params_sha256.clone().unwrap_or_default();
    Ok((s.steps as f64 * s.batch_size as f64 / s.wall_s.max(1e-9), hash))
}

/// Runs the benchmark.
pub async fn run(args: VerifyBenchArgs) -> anyhow::Result<VerifyReport> {
    if args.pnodes < 2 {
        return Err(crate::client::ClientError::Invalid(
            "--pnodes must be at least 2 (replicas need PNodes the job does not use)".into(),
        )
        .into());
    }
    let graph = demo::model_text(args.model.as_ref())?;
    let n = args.pnodes;
    let spot_share = crate::job::Share::AllButOne.of(n);
    let full_share = crate::job::Share::OneIn(2).of(n);
    let cases = [
        Case { label: "none", verify: Verify::None, fraction: None, job_pnodes: None, baseline: 0 },
        Case {
            label: "none (spot's)",
            verify: Verify::None,
            fraction: None,
            job_pnodes: Some(spot_share),
            baseline: 1,
        },
        Case {
            label: "none (full's)",
            verify: Verify::None,
            fraction: None,
            job_pnodes: Some(full_share),
            baseline: 2,
        },
        Case { label: "spotcheck 10%", verify: Verify::Spotcheck, fraction: Some(0.1), job_pnodes: None, baseline: 1 },
        Case { label: "full", verify: Verify::Full, fraction: None, job_pnodes: None, baseline: 2 },
    ];
    let mut runs: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let mut reference = String::new();
    let pb = indicatif::ProgressBar::new((args.repeat * cases.len() + args.faults.len() + 1) as u64);
    for _ in 0..args.repeat {
        for (i, c) in cases.iter().enumerate() {
            let mut e = envelope(&graph, &args, args.steps, c.verify, c.fraction)?;
            if let Some(k) = c.job_pnodes {
                e.policy.max_pnodes = k as u32;
                e.policy.min_pnodes = k as u32;
            }
            let (st, _) = run_job(&args, e, None).await?;
            let (rate, hash) = rate_and_hash(&st)?;
            if reference.is_empty() {
                reference = hash;
            } else if hash != reference {
                bail!("{} ended with parameters {hash}, not {reference}: verification changed the result", c.label);
            }
            runs[i].push(rate);
            pb.inc(1);
        }
    }
    let ratio = |r: &[f64], base: &[f64]| percentile(&r.iter().zip(base).map(|(a, b)| a / b).collect::<Vec<_>>(), 0.5);
    let throughput = cases
        .iter()
        .zip(&runs)
        .map(|(c, r)| PolicyThroughput {
            policy: c.label.to_string(),
            runs: r.clone(),
            median: percentile(r, 0.5),
            ratio: ratio(r, &runs[0]),
            ratio_same_pnodes: ratio(r, &runs[c.baseline]),
        })
        .collect();
    let mut faults = Vec::new();
    // `--faults ""` measures throughput only.
    let named: Vec<&str> = args.faults.iter().map(String::as_str).filter(|f| !f.is_empty()).collect();
    let cheats = named.iter().map(|f| (*f, "full", Verify::Full, None, args.steps));
    // A 10% spot check needs more segments to meet the cheater: four times the steps.
    let spot = (!named.is_empty())
        .then_some(("corrupt", "spotcheck 10%", Verify::Spotcheck, Some(0.1), args.steps * 4))
        .into_iter();
    let mut long_reference: Option<String> = None;
    for (fault, policy, verify, fraction, steps) in cheats.chain(spot) {
        let (st, q) = run_job(&args, envelope(&graph, &args, steps, verify, fraction)?, Some(fault)).await?;
        let (_, hash) = rate_and_hash(&st)?;
        let want = if steps == args.steps {
            reference.clone()
        } else {
            match &long_reference {
                Some(h) => h.clone(),
                None => {
                    let (st, _) = run_job(&args, envelope(&graph, &args, steps, Verify::None, None)?, None).await?;
                    let h = rate_and_hash(&st)?.1;
                    long_reference = Some(h.clone());
                    h
                }
            }
        };
        let rolled_back = st
            .recoveries
            .iter()
            .find(|r| r.reason.starts_with("verification") || r.reason.starts_with("invalid result"))
            .map(|r| r.at_step);
        faults.push(FaultRun {
            fault: fault.to_string(),
            policy: policy.to_string(),
            rolled_back_at_step: rolled_back,
            quarantined_at_step: q.map(|q| q.0),
            quarantined_after_steps_executed: q.map(|q| q.1),
            quarantined_after_s: q.map(|q| q.2),
            model_unchanged: hash == want,
            recoveries: st.recoveries.len(),
        });
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(VerifyReport { steps: args.steps, throughput, faults })
}

/// Prints the report as text.
pub fn print(r: &VerifyReport) {
    println!("{} steps per job", r.steps);
    println!("{:<14} {:>10} {:>12} {:>15}  runs", "POLICY", "SAMPLES/S", "VS NONE", "VS SAME PNODES");
    for t in &r.throughput {
        let runs: Vec<String> = t.runs.iter().map(|x| format!("{x:.0}")).collect();
        println!(
            "{:<14} {:>10.0} {:>11.2}x {:>14.2}x  {}",
            t.policy,
            t.median,
            t.ratio,
            t.ratio_same_pnodes,
            runs.join(" ")
        );
    }
    println!(
        "{:<10} {:<14} {:>11} {:>15} {:>14} {:>8} {:>10} {:>10}",
        "FAULT", "POLICY", "ROLLED BACK", "QUARANTINED AT", "STEPS RUN", "AFTER s", "ROLLBACKS", "SAME MODEL"
    );
    let step = |s: Option<u64>| s.map_or("never".to_string(), |s| format!("step {s}"));
    for f in &r.faults {
        let after = f.quarantined_after_s.map_or("-".to_string(), |s| format!("{s:.2}"));
        let same = if f.model_unchanged { "yes" } else { "NO" };
        println!(
            "{:<10} {:<14} {:>11} {:>15} {:>14} {:>8} {:>10} {:>10}",
            f.fault,
            f.policy,
            step(f.rolled_back_at_step),
            step(f.quarantined_at_step),
            f.quarantined_after_steps_executed.map_or("-".to_string(), |s| s.to_string()),
            after,
            f.recoveries,
            same
        );
    }
}

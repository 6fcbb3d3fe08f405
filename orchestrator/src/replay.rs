//! `replay`: re-runs a recorded job from its envelope on a fresh local mesh and checks that
//! every recorded hash comes out the same.

use crate::artifacts::{JobRecord, ObjectStore, find_record, open_store};
use crate::demo::LocalMesh;
use anyhow::{Context as _, anyhow, bail};
use dcnr_model::envelope::Envelope;
use serde_json::Value;
use std::path::PathBuf;

/// Flags of `replay`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// Job id, record hash, or result.json hash of the job to replay.
    pub key: String,
    /// Artifact store: a directory, file:///path or s3://bucket/prefix.
    #[arg(long, env = "DCNR_STORE", default_value = "dcnr-artifacts")]
    pub store: String,
    /// S3 endpoint for an s3:// store.
    #[arg(long, env = "DCNR_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// PNodes to replay on (default: as many as the original run used).
    #[arg(long)]
    pub pnodes: Option<usize>,
    /// Dataset directory.
    #[arg(long, env = "DCNR_DATA")]
    pub data: Option<PathBuf>,
}

/// What a replay found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplayReport {
    /// The replayed job.
    pub original: String,
    /// The new job.
    pub replay: String,
    /// Hashes compared.
    pub compared: usize,
    /// Human-readable differences (empty: reproduced).
    pub differences: Vec<String>,
}

async fn load_json(store: &dyn ObjectStore, record: &JobRecord, name: &str) -> anyhow::Result<Value> {
    let hash = record.artifacts.get(name).ok_or_else(|| anyhow!("job {} recorded no {name}", record.job_id))?;
    let bytes = store.get(hash).await?;
    serde_json::from_slice(&bytes).with_context(|| format!("{name} of job {} is not JSON", record.job_id))
}

/// Replays and compares.
pub async fn run(args: ReplayArgs) -> anyhow::Result<ReplayReport> {
    let store = open_store(&args.store, args.s3_endpoint.as_deref())?;
    let store = store.as_ref();
    let (_, original) = find_record(store, &args.key).await?;
    let envelope: Envelope = serde_json::from_value(load_json(store, &original, "envelope.json").await?)
        .context("the recorded envelope does not parse")?;
    let old_result = load_json(store, &original, "result.json").await?;
    let old_exec = load_json(store, &original, "executions.json").await.ok();
    let pnodes = args.pnodes.unwrap_or_else(|| old_result["summary"]["pnodes"].as_u64().unwrap_or(1) as usize).max(1);
    let mut envelope = envelope;
    // The replay is a new job: it must not take over the original's id.
    envelope.ctx.job_id = None;
    envelope.ctx.labels.insert("replay_of".into(), original.job_id.clone());
    let mesh = LocalMesh::start(pnodes, args.data.clone(), Some(args.store.clone()), args.s3_endpoint.clone()).await?;
    let summary = mesh.run_job(&envelope, true).await;
    mesh.stop().await;
    let summary = summary?;
    if summary.status != "succeeded" {
        bail!("the replay failed: {}", summary.error.unwrap_or_default());
    }
    let (_, replayed) = find_record(store, &summary.job_id).await?;
    let new_result = load_json(store, &replayed, "result.json").await?;
    let new_exec = load_json(store, &replayed, "executions.json").await.ok();

    let mut compared = 0;
    let mut differences = Vec::new();
    let mut check = |what: String, a: &Value, b: &Value| {
        compared += 1;
        if a != b {
            differences.push(format!("{what}: recorded {a}, replay {b}"));
        }
    };
    let (o, n) = (&old_result["summary"], &new_result["summary"]);
    for key in ["status", "steps", "params_sha256", "test_accuracy", "test_loss"] {
        check(format!("summary.{key}"), &o[key], &n[key]);
    }
    let empty = Vec::new();
    let old_vnodes = o["vnodes"].as_array().unwrap_or(&empty);
    let new_vnodes = n["vnodes"].as_array().unwrap_or(&empty);
    for (a, b) in old_vnodes.iter().zip(new_vnodes) {
        check(format!("vnode {} params_sha256", a["name"]), &a["params_sha256"], &b["params_sha256"]);
    }
    if let (Some(oe), Some(ne)) = (old_exec, new_exec) {
        let ov = oe["vnodes"].as_array().cloned().unwrap_or_default();
        let nv = ne["vnodes"].as_array().cloned().unwrap_or_default();
        for (a, b) in ov.iter().zip(&nv) {
            let (ah, bh) = (a["output_sha256"].as_array(), b["output_sha256"].as_array());
            let (ah, bh) = (ah.cloned().unwrap_or_default(), bh.cloned().unwrap_or_default());
            if ah.len() != bh.len() {
                check(format!("vnode {} output hash count", a["name"]), &Value::from(ah.len()), &Value::from(bh.len()));
                continue;
            }
            for (step, (x, y)) in ah.iter().zip(&bh).enumerate() {
                check(format!("vnode {} step {step} output_sha256", a["name"]), x, y);
            }
        }
    }
    Ok(ReplayReport { original: original.job_id, replay: summary.job_id, compared, differences })
}

//! `train-local`: the single-process reference run, with the same data order, seeds, update
//! rule and summary as a mesh job.

use crate::data::DataCache;
use crate::progress::Progress;
use crate::summary::{JobSummary, params_hashes, vnode_summaries};
use anyhow::{Context as _, anyhow};
use dcnr_model::TrainingMode;
use dcnr_model::dataset::ImageSet;
use dcnr_model::envelope::Envelope;
use dcnr_vnode::batches::BatchPlan;
use dcnr_vnode::reference::Pipelines;
use dcnr_vnode::rounds::RoundPlan;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Trains a job envelope (or bare graph) in this process on the host kernels and returns the
/// summary.
pub fn run(envelope: Envelope, data: Option<PathBuf>, show_progress: bool) -> anyhow::Result<JobSummary> {
    run_on(envelope, data, show_progress, dcnr_vnode::Compute::Host)
}

/// [`run`] computing where `compute` says.
pub fn run_on(
    envelope: Envelope,
    data: Option<PathBuf>,
    show_progress: bool,
    compute: dcnr_vnode::Compute,
) -> anyhow::Result<JobSummary> {
    let started = Instant::now();
    let resolved = envelope.resolve()?;
    let graph = resolved.graph;
    // Local mode's result does not depend on in_flight, so any value describes the same run.
    let local = graph.mode() == TrainingMode::Local;
    if !local && graph.spec.training.in_flight != 1 {
        return Err(anyhow!(
            "train-local is the synchronous reference; use --in-flight 1 (the graph says {})",
            graph.spec.training.in_flight
        ));
    }
    let splits = DataCache::new(data).get(&graph.spec.data.dataset).context("loading the dataset")?;
    let t = &graph.spec.training;
    let norm = graph.spec.data.normalize;
    let seed = resolved.root_seed;
    let pipelines = graph.pipelines();
    let mut plan = BatchPlan::new(splits.train.len(), t.batch_size, seed).sharded(pipelines);
    let rounds = RoundPlan::new(&graph, splits.train.len());
    let (spe, steps) = (rounds.steps_per_epoch(), rounds.steps());
    if spe == 0 {
        return Err(anyhow!(
            "{} training samples make fewer batches of {} than there are pipelines ({pipelines})",
            splits.train.len(),
            t.batch_size
        ));
    }
    let mut reference = Pipelines::new(&graph, graph.spec.optimizer, seed, splits.train.len())
        .map_err(|e| anyhow!(e))?
        .on(compute.clone());
    let batch = |set: &ImageSet, idx: &[usize]| crate::data::batch(set, idx, norm);
    let evaluate = |r: &Pipelines| -> anyhow::Result<(f64, f64)> {
        let (mut correct, mut loss, n) = (0u64, 0f64, splits.test.len());
        for s in (0..n).step_by(t.eval_batch_size) {
            let idx: Vec<usize> = (s..(s + t.eval_batch_size).min(n)).collect();
            let (x, y) = batch(&splits.test, &idx);
            let b = r.evaluate(&x, &y).map_err(|e| anyhow!(e))?;
            correct += u64::from(b.correct);
            loss += f64::from(b.loss) * idx.len() as f64;
        }
        Ok((correct as f64 / n.max(1) as f64, loss / n.max(1) as f64))
    };
    let mut progress = show_progress.then(Progress::new);
    let (mut train_time, mut test, mut window, mut last_loss) = (Duration::ZERO, None, (0f64, 0u32), None);
    let mut mark = (Instant::now(), 0u64);
    for step in 0..steps {
        let t0 = Instant::now();
        let batches: Vec<_> = (0..pipelines).map(|p| batch(&splits.train, &plan.shard_indices(step, p))).collect();
        let results = reference.train_step(step, &batches).map_err(|e| anyhow!(e))?;
        train_time += t0.elapsed();
        for r in results {
            window = (window.0 + f64::from(r.loss), window.1 + 1);
        }
        if mark.0.elapsed() >= Duration::from_millis(500) {
            let rate = (step + 1 - mark.1) as f64 * (t.batch_size as f64 * f64::from(pipelines))
                / mark.0.elapsed().as_secs_f64();
            last_loss = Some(window.0 / f64::from(window.1));
            if let Some(p) = progress.as_mut() {
                p.update(step + 1, steps, last_loss.unwrap_or(0.0) as f32, rate, plan.epoch_of(step) as u32);
            }
            window = (0.0, 0);
            mark = (Instant::now(), step + 1);
        }
        if (step + 1) % spe == 0 || step + 1 == steps {
            let (acc, loss) = evaluate(&reference)?;
            if let Some(p) = progress.as_ref() {
                p.line(&format!("after {} steps: test accuracy {:.2}%, test loss {loss:.4}", step + 1, acc * 100.0));
            }
            test = Some((acc, loss));
        }
    }
    if let Some(p) = progress {
        p.finish();
    }
    if window.1 > 0 {
        last_loss = Some(window.0 / f64::from(window.1));
    }
    let params: Vec<Vec<Vec<f32>>> = reference
        .params()
        .map_err(|e| anyhow!(e))?
        .into_iter()
        .map(|ps| ps.into_iter().filter_map(|p| p.as_f32().map(<[f32]>::to_vec)).collect())
        .collect();
    let (all, each) = params_hashes(&params);
    if let Some(why) = compute.failure() {
        tracing::warn!(error = why, "the GPU failed during the run; the steps after it ran on the host");
    }
    let digest = resolved.envelope.op.model_sha256.clone().unwrap_or_default();
    Ok(JobSummary {
        recoveries: Vec::new(),
        job_id: format!("local-{}", digest.get(..8).unwrap_or("")),
        status: "succeeded".into(),
        model: graph.spec.model.name.clone(),
        steps,
        test_accuracy: test.map(|t| t.0),
        test_loss: test.map(|t| t.1),
        train_loss: last_loss,
        wall_s: started.elapsed().as_secs_f64(),
        samples_per_s: steps as f64 * t.batch_size as f64 * f64::from(pipelines) / train_time.as_secs_f64().max(1e-9),
        pnodes: 0,
        in_flight: if local { graph.spec.training.in_flight } else { 1 },
        batch_size: t.batch_size,
        params_sha256: Some(all),
        vnodes: vnode_summaries(&graph.pipeline_zero(), &each, |_| "local".into()),
        error: None,
        pipelines,
        rounds: rounds.rounds_through(steps),
    })
}

/// What `train-local --gpu` computes on: the best GPU adapter, or the host without `gpu`.
pub fn compute(gpu: bool) -> anyhow::Result<dcnr_vnode::Compute> {
    if !gpu {
        return Ok(dcnr_vnode::Compute::Host);
    }
    #[cfg(feature = "gpu")]
    {
        let adapter = dcnr_vnode::gpu::adapters().into_iter().next().ok_or(dcnr_vnode::gpu::GpuError::NoAdapter)?;
        tracing::info!(gpu = %adapter.describe(), class = %adapter.determinism_class(), "training on a GPU");
        Ok(dcnr_vnode::Compute::Gpu(dcnr_vnode::gpu::Gpu::open(adapter)))
    }
    #[cfg(not(feature = "gpu"))]
    Err(anyhow!("--gpu: this orchestrator was built without GPU support (the `gpu` feature)"))
}

//! `bench-wan`: training over emulated wide-area links, side by side with the single-process
//! trainer. It runs `train-local`, then for each mode a fresh local mesh of `pnode` child
//! processes with every link shaped (`dcnr_proto::shaping`: this process's clients and every
//! PNode's), on the same cores, and reports throughput, accuracy, bytes on the wire and the
//! parameters' hash per mode.
//!
//! A mode is a named preset of `[training]` settings written into the parsed model TOML before
//! validation, so adding one is one line in [`MODES`]. A preset naming a setting this build's
//! model format lacks fails validation up front, with the mode's name, before anything runs.

use crate::client::{ClientError, Overrides};
use crate::demo::{LocalMesh, MeshConfig, model_text};
use crate::job_table::{Get, Submit};
use crate::metrics::ORCHESTRATOR;
use crate::progress::Progress;
use crate::summary::JobSummary;
use anyhow::{Context as _, bail};
use dcnr_model::envelope::Envelope;
use dcnr_proto::shaping::{self, LinkShape};
use serde::Serialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Steps per run when neither `--steps` nor `--epochs` is given.
pub const DEFAULT_STEPS: u64 = 300;

/// The modes run when `--modes` is not given.
pub const DEFAULT_MODES: &str = "exact,exact-k8,exact-k32,local,local-int8";

/// A value a preset writes into `[training]`.
#[derive(Debug, Clone, Copy)]
pub enum Setting {
    /// An integer field.
    Int(i64),
    /// A string field.
    Str(&'static str),
}

/// A named preset of `[training]` settings.
#[derive(Debug, Clone, Copy)]
pub struct Mode {
    /// Its name on the command line.
    pub name: &'static str,
    /// `[training]` fields it sets.
    pub training: &'static [(&'static str, Setting)],
}

/// Local mode with the largest window.
const LOCAL: &[(&str, Setting)] = &[("mode", Setting::Str("local")), ("in_flight", Setting::Int(64))];

/// Every preset `--modes` may name. Local mode's result does not depend on `in_flight`, so its
/// presets use the largest window: over a link of delay D a micro-batch is in flight for about
/// four D (feed, two block boundaries, the report), and the window must cover that.
pub const MODES: &[Mode] = &[
    Mode { name: "exact", training: &[("in_flight", Setting::Int(1))] },
    Mode { name: "exact-k8", training: &[("in_flight", Setting::Int(8))] },
    Mode { name: "exact-k32", training: &[("in_flight", Setting::Int(32))] },
    Mode { name: "exact-int8", training: &[("in_flight", Setting::Int(1)), ("wire", Setting::Str("int8"))] },
    Mode { name: "local", training: LOCAL },
    Mode { name: "local-k8", training: &[("mode", Setting::Str("local")), ("in_flight", Setting::Int(8))] },
    Mode { name: "local-int8", training: &[LOCAL[0], LOCAL[1], ("wire", Setting::Str("int8"))] },
    Mode { name: "local-f16", training: &[LOCAL[0], LOCAL[1], ("wire", Setting::Str("f16"))] },
    Mode { name: "local-bf16", training: &[LOCAL[0], LOCAL[1], ("wire", Setting::Str("bf16"))] },
    Mode { name: "dp2", training: &[("pipelines", Setting::Int(2)), ("sync_every", Setting::Int(50))] },
    Mode { name: "dp2-int8", training: &[DP2[0], DP2[1], ("outer.wire", Setting::Str("int8"))] },
    Mode {
        name: "dp2-h100-int8",
        training: &[DP2[0], ("sync_every", Setting::Int(100)), ("outer.wire", Setting::Str("int8"))],
    },
    Mode {
        name: "dp2-avg-int8",
        training: &[DP2[0], DP2[1], ("outer.kind", Setting::Str("average")), ("outer.wire", Setting::Str("int8"))],
    },
    Mode {
        name: "dp3-int8",
        training: &[("pipelines", Setting::Int(3)), DP2[1], ("outer.wire", Setting::Str("int8"))],
    },
];

/// Two data-parallel pipelines averaging every 50 steps (DiLoCo's nesterov outer step).
const DP2: &[(&str, Setting)] = &[("pipelines", Setting::Int(2)), ("sync_every", Setting::Int(50))];

/// Flags of `bench-wan`.
#[derive(Debug, Clone, clap::Args)]
pub struct WanBenchArgs {
    /// One-way delay of every link, in milliseconds.
    #[arg(long, default_value_t = 25)]
    pub delay_ms: u64,
    /// Bandwidth cap of every link per direction, in Mbit/s (0 = unlimited).
    #[arg(long, default_value_t = 0.0)]
    pub mbit: f64,
    /// PNodes in each mesh.
    #[arg(long, default_value_t = 3)]
    pub pnodes: usize,
    /// Training steps per run (default 300 unless --epochs is given).
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<u64>,
    /// Training epochs per run, instead of --steps.
    #[arg(long)]
    pub epochs: Option<u32>,
    /// Modes to run, comma-separated: exact (in_flight 1), exact-k8, exact-k32, and, once the
    /// model format has `[training] mode` and `wire`: exact-int8, local, local-int8, local-f16.
    #[arg(long, value_delimiter = ',', default_value = DEFAULT_MODES)]
    pub modes: Vec<String>,
    /// Model graph (default: models/mnist-mlp.toml).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Dataset directory.
    #[arg(long, env = "DCNR_DATA")]
    pub data: Option<PathBuf>,
    /// The `pnode` executable to start (default: the one beside this executable).
    #[arg(long, env = crate::pnode_bin::ENV)]
    pub pnode_bin: Option<PathBuf>,
    /// Also time one pipeline on one PNode and print, for every data-parallel mode, a model of
    /// aggregate samples/s with 1, 2, 4 and 8 pipelines (each on a machine of its own) beside
    /// what was measured here.
    #[arg(long)]
    pub scaling: bool,
}

/// The scaling model of one data-parallel mode.
#[derive(Debug, Clone, Serialize)]
pub struct ScalingRow {
    /// The mode.
    pub mode: String,
    /// Its pipelines.
    pub pipelines: u32,
    /// Steps between rounds.
    pub sync_every: u64,
    /// Bytes of one copy's change per round, as it travels.
    pub change_bytes: u64,
    /// (pipelines, modelled samples/s) for 1, 2, 4 and 8 pipelines.
    pub model: Vec<(u32, f64)>,
    /// Measured samples/s of the mode here.
    pub measured: f64,
    /// `measured` over the model at the mode's own pipeline count.
    pub measured_over_model: f64,
}

/// What `--scaling` adds: the one-pipeline rate the model starts from, and a row per mode.
#[derive(Debug, Clone, Serialize)]
pub struct ScalingReport {
    /// Samples/s of one pipeline on one PNode (the whole graph there, exact, one in flight).
    pub one_pipeline_samples_per_s: f64,
    /// One row per data-parallel mode.
    pub rows: Vec<ScalingRow>,
}

/// Aggregate samples/s of `r` pipelines, each computing `every` steps of `batch` samples at
/// `step_s` seconds a step, then exchanging a change of `change_bytes` with each of the other
/// `r - 1` over an uplink of `bytes_per_s` (`None`: unlimited) after one-way `delay_s`: the
/// all-to-all round of [`dcnr_vnode::rounds`].
pub fn scaling_model(
    step_s: f64,
    batch: f64,
    every: f64,
    delay_s: f64,
    bytes_per_s: Option<f64>,
    change_bytes: f64,
    r: u32,
) -> f64 {
    if r <= 1 {
        return batch / step_s.max(1e-12);
    }
    let send = bytes_per_s.map_or(0.0, |bw| f64::from(r - 1) * change_bytes / bw.max(1e-12));
    f64::from(r) * every * batch / (every * step_s + delay_s + send).max(1e-12)
}

/// Bytes of one copy's change of every parameter of `graph`'s pipeline 0, packed in `wire` by
/// the encoder the VNodes use.
fn change_bytes(graph: &dcnr_model::ValidGraph, wire: dcnr_model::WireFormat) -> u64 {
    let zero = graph.pipeline_zero();
    zero.nodes
        .iter()
        .flat_map(|n| dcnr_vnode::layer::init_node(n, 0))
        .map(|(shape, values)| {
            dcnr_vnode::compact::pack(&dcnr_vnode::HostTensor::f32(shape, values), wire).data_bytes()
        })
        .sum()
}

/// The emulated link.
#[derive(Debug, Clone, Serialize)]
pub struct LinkReport {
    /// One-way delay in milliseconds.
    pub delay_ms: u64,
    /// Bandwidth cap per direction in Mbit/s; 0 = unlimited.
    pub mbit: f64,
}

/// One measured configuration.
#[derive(Debug, Clone, Serialize)]
pub struct WanRow {
    /// `train-local` or the mode's name.
    pub mode: String,
    /// Micro-batches in flight.
    pub in_flight: u32,
    /// Training samples per second: steps x batch over the training time only (from placement
    /// to the last step, pipeline fill and drain and recovery snapshots included, evaluation and
    /// placement excluded; train-local: the time inside its training steps).
    pub samples_per_s: f64,
    /// `samples_per_s` over train-local's.
    pub ratio: f64,
    /// Test-set accuracy after the run.
    pub test_accuracy: Option<f64>,
    /// Bytes on the wire per training sample, both directions of every link, over the training
    /// window (`wire_bytes_scope`).
    pub wire_bytes_per_sample: f64,
    /// `training`: between 10% and 90% of the steps, so only training traffic (activations,
    /// gradients, data, reports, heartbeats and recovery snapshots of those steps); `job`: the
    /// run was too short to sample a window, so the whole job's bytes.
    pub wire_bytes_scope: String,
    /// Bytes on the wire for the whole job, from submission to the end: placement, training,
    /// the test-set evaluation, fetching the parameters.
    pub job_wire_bytes: u64,
    /// Of `job_wire_bytes`, what this process's (the orchestrator's) clients moved.
    pub orchestrator_wire_bytes: u64,
    /// Of `job_wire_bytes`, what the PNodes' clients moved (scraped from their `/metrics`).
    pub pnode_wire_bytes: u64,
    /// SHA-256 of the final parameters.
    pub params_sha256: Option<String>,
    /// Whether the parameters equal train-local's bit for bit.
    pub matches_train_local: bool,
    /// Wall time of the run in seconds.
    pub wall_s: f64,
    /// Recoveries during the run (0 on a healthy mesh).
    pub recoveries: usize,
}

/// Everything measured.
#[derive(Debug, Clone, Serialize)]
pub struct WanReport {
    /// The link every connection was shaped to.
    pub link: LinkReport,
    /// PNodes per mesh.
    pub pnodes: usize,
    /// Training steps per run.
    pub steps: u64,
    /// Samples per step.
    pub batch_size: usize,
    /// The single-process reference.
    pub train_local: WanRow,
    /// One row per mode, in the order asked.
    pub modes: Vec<WanRow>,
    /// With `--scaling`: the scaling model of every data-parallel mode.
    pub scaling: Option<ScalingReport>,
}

/// The preset called `name`.
pub fn mode(name: &str) -> Result<&'static Mode, ClientError> {
    MODES.iter().find(|m| m.name == name).ok_or_else(|| {
        let known: Vec<&str> = MODES.iter().map(|m| m.name).collect();
        ClientError::Invalid(format!("unknown mode `{name}`; known modes: {}", known.join(", ")))
    })
}

/// The model text with `mode`'s settings written into its `[training]` table.
pub fn apply_mode(model_toml: &str, mode: &Mode) -> Result<String, ClientError> {
    let invalid = |e: String| ClientError::Invalid(format!("mode `{}`: {e}", mode.name));
    let mut doc: toml::Table = toml::from_str(model_toml).map_err(|e| invalid(format!("model graph: {e}")))?;
    let training = doc.entry("training").or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let toml::Value::Table(training) = training else {
        return Err(invalid("the model's `training` is not a table".into()));
    };
    for (key, value) in mode.training {
        let v = match value {
            Setting::Int(i) => toml::Value::Integer(*i),
            Setting::Str(s) => toml::Value::String((*s).to_string()),
        };
        // `outer.wire` is `wire` in `[training.outer]`.
        let mut table = &mut *training;
        let mut path: Vec<&str> = key.split('.').collect();
        let last = path.pop().unwrap_or(key);
        for part in path {
            let sub = table.entry(part).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let toml::Value::Table(sub) = sub else {
                return Err(invalid(format!("the model's `training.{part}` is not a table")));
            };
            table = sub;
        }
        table.insert(last.to_string(), v);
    }
    toml::to_string(&doc).map_err(|e| invalid(format!("cannot write the model back: {e}")))
}

/// The mode's job, checked as a submission would be; a preset this build cannot train is an
/// invalid-input error naming the mode and what it sets.
fn mode_envelope(model_toml: &str, mode: &Mode, length: Overrides) -> Result<Envelope, ClientError> {
    let text = apply_mode(model_toml, mode)?;
    let sets: Vec<String> = mode
        .training
        .iter()
        .map(|(k, v)| match v {
            Setting::Int(i) => format!("{k} = {i}"),
            Setting::Str(s) => format!("{k} = \"{s}\""),
        })
        .collect();
    let refused = |e: String| {
        ClientError::Invalid(format!(
            "mode `{}` ([training] {}) is not valid for this build's model format: {e}",
            mode.name,
            sets.join(", ")
        ))
    };
    let mut envelope = Envelope::from_graph(&text).map_err(|e| refused(e.to_string()))?;
    length.apply(&mut envelope);
    envelope.artifacts.persist = false;
    envelope.clone().resolve().map_err(|e| refused(e.to_string()))?;
    Ok(envelope)
}

/// Runs train-local and every mode.
pub async fn run(args: WanBenchArgs) -> anyhow::Result<WanReport> {
    if args.pnodes == 0 || args.pnodes > 64 {
        return Err(ClientError::Invalid("--pnodes must be between 1 and 64".into()).into());
    }
    if args.modes.is_empty() {
        return Err(ClientError::Invalid("--modes names no mode".into()).into());
    }
    let shape = LinkShape::from_flags(args.delay_ms, args.mbit)
        .map_err(|e| ClientError::Invalid(format!("invalid --delay-ms / --mbit: {e}")))?;
    let graph = model_text(args.model.as_ref())?;
    let length = match (args.steps, args.epochs) {
        (None, Some(e)) => Overrides { epochs: Some(e), ..Overrides::default() },
        (s, _) => Overrides { steps: Some(s.unwrap_or(DEFAULT_STEPS)), ..Overrides::default() },
    };
    // Every mode is checked before anything runs: a preset that cannot train fails in a second.
    let mut jobs = Vec::new();
    for name in &args.modes {
        let m = mode(name)?;
        jobs.push((m, mode_envelope(&graph, m, length)?));
    }
    shaping::configure(shape).map_err(|e| ClientError::Invalid(e.to_string()))?;

    let mut reference = Envelope::from_graph(&graph).map_err(|e| ClientError::Invalid(e.to_string()))?;
    Overrides { in_flight: Some(1), ..length }.apply(&mut reference);
    reference.artifacts.persist = false;
    eprintln!("train-local (1 process)");
    let data = args.data.clone();
    let local = tokio::task::spawn_blocking(move || crate::local::run(reference, data, true)).await??;
    let local_hash = local.params_sha256.clone();
    let base_rate = local.samples_per_s.max(1e-9);
    let row = |mode: String, s: &JobSummary, bytes: Bytes| WanRow {
        mode,
        in_flight: s.in_flight,
        samples_per_s: s.samples_per_s,
        ratio: s.samples_per_s / base_rate,
        test_accuracy: s.test_accuracy,
        wire_bytes_per_sample: bytes.per_sample,
        wire_bytes_scope: bytes.scope.into(),
        job_wire_bytes: bytes.job.0.saturating_add(bytes.job.1),
        orchestrator_wire_bytes: bytes.job.0,
        pnode_wire_bytes: bytes.job.1,
        params_sha256: s.params_sha256.clone(),
        matches_train_local: s.params_sha256.is_some() && s.params_sha256 == local_hash,
        wall_s: s.wall_s,
        recoveries: s.recoveries.len(),
    };
    let train_local = row("train-local".into(), &local, Bytes { per_sample: 0.0, scope: "none", job: (0, 0) });

    let mut modes = Vec::new();
    let link = shape.map_or_else(|| "no link emulation".to_string(), |s| s.to_string());
    let graphs: Vec<dcnr_model::ValidGraph> =
        jobs.iter().filter_map(|(_, e)| e.clone().resolve().ok().map(|r| r.graph)).collect();
    for (m, envelope) in jobs {
        eprintln!("mode {} on {} pnodes, {link}", m.name, args.pnodes);
        let mesh = measured_mesh(&args, args.pnodes).await?;
        let result = run_mode(&mesh, envelope).await;
        mesh.stop().await;
        let (summary, bytes) = result.with_context(|| format!("mode {}", m.name))?;
        if summary.status != "succeeded" {
            bail!("mode {}: the job failed: {}", m.name, summary.error.unwrap_or_default());
        }
        modes.push(row(m.name.to_string(), &summary, bytes));
    }
    let scaling = if args.scaling {
        eprintln!("one pipeline on one pnode, {link}");
        let mut one = Envelope::from_graph(&graph).map_err(|e| ClientError::Invalid(e.to_string()))?;
        Overrides { in_flight: Some(1), ..length }.apply(&mut one);
        one.artifacts.persist = false;
        let mesh = measured_mesh(&args, 1).await?;
        let result = run_mode(&mesh, one).await;
        mesh.stop().await;
        let (summary, _) = result.context("one pipeline on one pnode")?;
        let rate = summary.samples_per_s.max(1e-9);
        let batch = summary.batch_size.max(1) as f64;
        let bw = (args.mbit > 0.0).then(|| args.mbit * 1e6 / 8.0);
        let rows = graphs
            .iter()
            .zip(&modes)
            .filter(|(g, _)| g.pipelines() > 1)
            .map(|(g, measured)| {
                let t = &g.spec.training;
                let bytes = change_bytes(g, t.outer.wire);
                let at = |r: u32| {
                    let every = t.sync_every as f64;
                    scaling_model(batch / rate, batch, every, args.delay_ms as f64 / 1e3, bw, bytes as f64, r)
                };
                ScalingRow {
                    mode: measured.mode.clone(),
                    pipelines: g.pipelines(),
                    sync_every: t.sync_every,
                    change_bytes: bytes,
                    model: [1, 2, 4, 8].iter().map(|&r| (r, at(r))).collect(),
                    measured: measured.samples_per_s,
                    measured_over_model: measured.samples_per_s / at(g.pipelines()).max(1e-9),
                }
            })
            .collect();
        Some(ScalingReport { one_pipeline_samples_per_s: rate, rows })
    } else {
        None
    };
    Ok(WanReport {
        link: LinkReport { delay_ms: args.delay_ms, mbit: args.mbit },
        pnodes: args.pnodes,
        steps: local.steps,
        batch_size: local.batch_size,
        train_local,
        modes,
        scaling,
    })
}

/// A fresh local mesh of `pnodes` PNodes whose `/metrics` the run scrapes.
async fn measured_mesh(args: &WanBenchArgs, pnodes: usize) -> anyhow::Result<LocalMesh> {
    LocalMesh::start_with(MeshConfig {
        pnodes,
        data: args.data.clone(),
        pnode_bin: args.pnode_bin.clone(),
        pnode_metrics: true,
        ..MeshConfig::default()
    })
    .await
}

/// Bytes on the wire of one run.
#[derive(Debug, Clone, Copy)]
struct Bytes {
    per_sample: f64,
    scope: &'static str,
    /// Whole job: (orchestrator's clients, PNodes' clients).
    job: (u64, u64),
}

/// Steps done (real-valued: the mean of the counts before and after a scrape) and the bytes on
/// the wire at that moment.
type WireSample = (f64, u64);

/// Link bytes of every process of `mesh` so far: (this process's, the PNodes' together).
async fn wire_bytes(mesh: &LocalMesh) -> anyhow::Result<(u64, u64)> {
    let own = shaping::link_bytes().total();
    let addrs = mesh.pnode_metrics();
    let pnodes = tokio::task::spawn_blocking(move || scrape_all(&addrs)).await??;
    Ok((own, pnodes))
}

/// Sum of the link byte counters the PNodes at `addrs` report. Blocking.
fn scrape_all(addrs: &[SocketAddr]) -> anyhow::Result<u64> {
    let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(10))).build().into();
    let mut sum = 0u64;
    for a in addrs {
        let url = format!("http://{a}/metrics");
        let text = agent
            .get(&url)
            .call()
            .with_context(|| format!("GET {url}"))?
            .body_mut()
            .read_to_string()
            .with_context(|| format!("body of {url}"))?;
        sum = sum.saturating_add(link_bytes_in(&text).with_context(|| format!("{url} has no link byte counters"))?);
    }
    Ok(sum)
}

/// `dcnr_link_bytes_sent_total` + `dcnr_link_bytes_received_total` in a Prometheus text page.
pub fn link_bytes_in(text: &str) -> Option<u64> {
    let value =
        |name: &str| text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok());
    let (sent, received) = (value("dcnr_link_bytes_sent_total")?, value("dcnr_link_bytes_received_total")?);
    Some((sent + received) as u64)
}

/// Runs one job on `mesh`, following it with a progress bar and sampling the wire bytes at 10%
/// and 90% of its steps (steps counted as losses reach this process, so in real time).
async fn run_mode(mesh: &LocalMesh, envelope: Envelope) -> anyhow::Result<(JobSummary, Bytes)> {
    let before = wire_bytes(mesh).await?;
    let steps_before = ORCHESTRATOR.train_steps();
    let job = mesh.jobs().send(Submit(envelope)).await??;
    let mut progress = Progress::new();
    // (steps done, bytes on the wire so far) at 10% and at 90% of the steps.
    let (mut first, mut last): (Option<WireSample>, Option<WireSample>) = (None, None);
    let started = Instant::now();
    let status = loop {
        let st = mesh.jobs().send(Get(job.clone())).await?.context("the job vanished")?;
        progress.update(st.steps_done, st.steps_total, st.last_loss.unwrap_or(f32::NAN), st.samples_per_s, 0);
        if st.state.is_final() {
            break st;
        }
        let total = st.steps_total.max(1);
        let done = ORCHESTRATOR.train_steps().saturating_sub(steps_before);
        let (lo, hi) = ((total / 10).max(1), total.saturating_mul(9) / 10);
        if hi > lo
            && done < total
            && ((first.is_none() && done >= lo) || (first.is_some() && last.is_none() && done >= hi))
        {
            let (own, pnodes) = wire_bytes(mesh).await?;
            // The step count at the scrape: halfway between before and after it.
            let after = ORCHESTRATOR.train_steps().saturating_sub(steps_before);
            let at = (done as f64 + after as f64) / 2.0;
            let sample = Some((at, own.saturating_add(pnodes)));
            if first.is_none() { first = sample } else { last = sample }
        }
        if started.elapsed() > Duration::from_secs(6 * 3600) {
            bail!("the job did not finish within 6 hours");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    progress.finish();
    let after = wire_bytes(mesh).await?;
    let summary = status.summary.context("the job ended without a summary")?;
    let job_bytes = (after.0.saturating_sub(before.0), after.1.saturating_sub(before.1));
    let batch = summary.batch_size.max(1) as f64;
    let bytes = match (first, last) {
        (Some((s0, b0)), Some((s1, b1))) if s1 > s0 => {
            Bytes { per_sample: b1.saturating_sub(b0) as f64 / ((s1 - s0) * batch), scope: "training", job: job_bytes }
        }
        _ => Bytes {
            per_sample: (job_bytes.0.saturating_add(job_bytes.1)) as f64 / (summary.steps.max(1) as f64 * batch),
            scope: "job",
            job: job_bytes,
        },
    };
    Ok((summary, bytes))
}

/// `1.23 MB`-style sizes.
fn size(bytes: u64) -> String {
    let b = bytes as f64;
    match bytes {
        0..1_000 => format!("{bytes} B"),
        1_000..1_000_000 => format!("{:.1} kB", b / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", b / 1e6),
        _ => format!("{:.2} GB", b / 1e9),
    }
}

/// Prints the report as a table.
pub fn print(r: &WanReport) {
    let link = match r.link.mbit {
        m if m > 0.0 => format!("{} ms one way, {m} Mbit/s per direction", r.link.delay_ms),
        _ => format!("{} ms one way, unlimited bandwidth", r.link.delay_ms),
    };
    println!("links: {link}; {} pnodes; {} steps of {} samples", r.pnodes, r.steps, r.batch_size);
    println!(
        "{:<12} {:>9} {:>10} {:>8} {:>9} {:>12} {:>10} {:>6}  params sha256",
        "mode", "in-flight", "samples/s", "ratio", "test acc", "bytes/sample", "job bytes", "recov"
    );
    for row in std::iter::once(&r.train_local).chain(&r.modes) {
        let acc = row.test_accuracy.map_or_else(|| "-".to_string(), |a| format!("{:.2}%", a * 100.0));
        let (per, job) = match row.mode.as_str() {
            "train-local" => ("-".to_string(), "-".to_string()),
            _ => (
                format!("{:.0}{}", row.wire_bytes_per_sample, if row.wire_bytes_scope == "job" { "*" } else { "" }),
                size(row.job_wire_bytes),
            ),
        };
        let hash = row.params_sha256.as_deref().unwrap_or("-");
        let short = match (hash.get(..8), hash.get(hash.len().saturating_sub(6)..)) {
            (Some(a), Some(b)) if hash.len() > 14 => format!("{a}...{b}"),
            _ => hash.to_string(),
        };
        let same = if row.mode != "train-local" && row.matches_train_local { " (= train-local)" } else { "" };
        println!(
            "{:<12} {:>9} {:>10.0} {:>7.3}x {:>9} {:>12} {:>10} {:>6}  {short}{same}",
            row.mode, row.in_flight, row.samples_per_s, row.ratio, acc, per, job, row.recoveries
        );
    }
    if let Some(s) = &r.scaling {
        println!(
            "scaling model (each pipeline on a machine of its own; one pipeline on one pnode measured {:.0} samples/s):",
            s.one_pipeline_samples_per_s
        );
        println!(
            "{:<14} {:>5} {:>10} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9}",
            "mode", "sync", "change", "R=1", "R=2", "R=4", "R=8", "measured", "/model"
        );
        for row in &s.rows {
            let at = |r: u32| row.model.iter().find(|m| m.0 == r).map_or(0.0, |m| m.1);
            println!(
                "{:<14} {:>5} {:>10} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>10.0} {:>8.2}x",
                row.mode,
                row.sync_every,
                size(row.change_bytes),
                at(1),
                at(2),
                at(4),
                at(8),
                row.measured,
                row.measured_over_model
            );
        }
    }
    println!(
        "samples/s: training time only (evaluation excluded). bytes/sample: both directions of every link \
         between 10% and 90% of the steps (* = whole job: the run was too short for a window). \
         recov: recoveries during the run (each recomputes steps and moves bytes again)."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL: &str = crate::demo::BUILTIN_MODEL;

    #[test]
    fn the_scaling_model_charges_compute_delay_and_the_uplink() {
        // One pipeline: the step rate.
        assert!((scaling_model(0.01, 64.0, 50.0, 0.025, Some(1e6), 1e5, 1) - 6400.0).abs() < 1e-6);
        // Two: 2·50·64 samples per 0.5 s compute + 0.025 s delay + 0.1 s sending.
        let two = scaling_model(0.01, 64.0, 50.0, 0.025, Some(1e6), 1e5, 2);
        assert!((two - 6400.0 / 0.625).abs() < 1e-6, "{two}");
        // Each extra copy costs another change on the uplink; no cap, no cost.
        let eight = scaling_model(0.01, 64.0, 50.0, 0.025, Some(1e6), 1e5, 8);
        assert!((eight - 8.0 * 3200.0 / 1.225).abs() < 1e-6, "{eight}");
        assert!(scaling_model(0.01, 64.0, 50.0, 0.025, None, 1e5, 8) > eight);
    }

    #[test]
    fn changes_are_sized_as_they_travel() {
        let g =
            dcnr_model::ModelGraph::parse_valid(&std::fs::read_to_string("../models/mnist-mlp.toml").unwrap()).unwrap();
        // 784·256 + 256 + 256·256 + 256 + 256·10 + 10 parameters.
        assert_eq!(change_bytes(&g, dcnr_model::WireFormat::F32), 4 * 269_322);
        let int8 = change_bytes(&g, dcnr_model::WireFormat::Int8);
        assert!(int8 > 269_322 && int8 < 269_322 + 4 * 269_322 / 60, "{int8}");
    }

    #[test]
    fn presets_write_into_the_training_table() {
        let text = apply_mode(MODEL, mode("exact-k8").unwrap()).unwrap();
        let g = dcnr_model::ModelGraph::parse(&text).unwrap();
        assert_eq!(g.training.in_flight, 8);
        assert_eq!(g.training.batch_size, 64, "other settings stay");
        let text = apply_mode(MODEL, mode("local-int8").unwrap()).unwrap();
        let t: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(t["training"]["mode"].as_str(), Some("local"));
        assert_eq!(t["training"]["wire"].as_str(), Some("int8"));
    }

    #[test]
    fn every_preset_validates_and_an_unknown_mode_is_refused() {
        let length = Overrides { steps: Some(5), ..Overrides::default() };
        for name in MODES.iter().map(|m| m.name) {
            let e = mode_envelope(MODEL, mode(name).unwrap(), length).unwrap();
            assert_eq!(e.op.steps, Some(5));
        }
        let err = mode("exact-k9").unwrap_err().to_string();
        assert!(err.contains("unknown mode `exact-k9`") && err.contains("exact-k32"), "{err}");
    }

    #[test]
    fn a_preset_the_model_format_lacks_is_a_clear_error() {
        // A setting no model format has, standing in for a preset ahead of its format.
        const AHEAD: Mode = Mode { name: "ahead", training: &[("no_such_field", Setting::Str("x"))] };
        let err = mode_envelope(MODEL, &AHEAD, Overrides::default()).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let text = err.to_string();
        assert!(text.contains("mode `ahead`") && text.contains("no_such_field = \"x\""), "{text}");
    }

    #[test]
    fn link_counters_are_read_from_metrics_text() {
        let text = "# TYPE dcnr_link_bytes_sent_total counter\ndcnr_link_bytes_sent_total 1200\n\
                    dcnr_link_bytes_received_total 34\ndcnr_link_bytes_sent_totally 5\n";
        assert_eq!(link_bytes_in(text), Some(1234));
        assert_eq!(link_bytes_in("dcnr_link_bytes_sent_total 1\n"), None);
        assert_eq!(size(999), "999 B");
        assert_eq!(size(2_500_000), "2.5 MB");
    }
}

//! `bench`: training throughput of the single-process reference and of local meshes of 1, 2
//! and 3 PNodes (synchronous and pipelined), measured side by side in one run, plus the
//! round-trip latency of one 64 KiB VNode message over loopback gRPC. Beside them, when python3
//! and numpy are present, the same MLP trained by a plain numpy loop (`mlp_numpy_bench.py`, run
//! as a child process in the same run), the yardstick of the VNode math; `--only-compute`
//! measures just that comparison per optimizer and batch size.

use crate::client::Overrides;
use crate::demo::{LocalMesh, model_text};
use crate::job::pnode_client;
use crate::registry::ListPNodes;
use anyhow::Context as _;
use dcnr_model::OptimizerSpec;
use dcnr_model::envelope::Envelope;
use dcnr_proto::v1;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where the numpy reference script lies relative to the data root (the parent of the dataset
/// directories), or to a `shared` directory beside the checkout.
const NUMPY_SCRIPT: &str = "tools/mlp_numpy_bench.py";

/// Flags of `bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Model graph (default: models/mnist-mlp.toml).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training steps per measurement.
    #[arg(long, default_value_t = 600)]
    pub steps: u64,
    /// Repetitions of every measurement (medians are reported).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Micro-batches in flight for the pipelined runs.
    #[arg(long, default_value_t = 4)]
    pub pipelined: u32,
    /// Mesh sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub pnodes: Vec<usize>,
    /// Round trips for the latency measurement.
    #[arg(long, default_value_t = 2000)]
    pub pings: usize,
    /// Dataset directory.
    #[arg(long, env = "DCNR_DATA")]
    pub data: Option<PathBuf>,
    /// Also time checkpoint writes and restores against this store (e.g. s3://bucket/bench).
    #[arg(long)]
    pub checkpoint_store: Option<String>,
    /// S3 endpoint for an s3:// checkpoint store.
    #[arg(long, env = "DCNR_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// Skip the throughput and latency measurements.
    #[arg(long)]
    pub only_checkpoints: bool,
    /// Measure only the single-process compute against the numpy reference, for every
    /// optimizer and batch size of `--optimizers` and `--batches`, one epoch per run.
    #[arg(long)]
    pub only_compute: bool,
    /// Optimizers of the compute table: `adam` (lr 0.001) and `sgd` (lr 0.05, momentum 0.9),
    /// the numpy script's recipes.
    #[arg(long, value_delimiter = ',', default_value = "adam,sgd", value_parser = parse_optimizer)]
    pub optimizers: Vec<ComputeOptimizer>,
    /// Batch sizes of the compute table.
    #[arg(long, value_delimiter = ',', default_value = "64,256")]
    pub batches: Vec<usize>,
    /// The numpy reference script (default: `tools/mlp_numpy_bench.py` beside the data
    /// directory); without python3 and numpy the comparison is skipped with a note.
    #[arg(long, env = "DCNR_NUMPY_BENCH")]
    pub numpy_bench: Option<PathBuf>,
}

/// An optimizer of the compute table, with the numpy script's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ComputeOptimizer {
    /// Adam, lr 0.001.
    Adam,
    /// SGD with momentum 0.9, lr 0.05.
    Sgd,
}

impl ComputeOptimizer {
    /// Its name on the numpy script's command line.
    fn name(self) -> &'static str {
        match self {
            ComputeOptimizer::Adam => "adam",
            ComputeOptimizer::Sgd => "sgd",
        }
    }

    /// The recipe train-local runs.
    fn spec(self) -> OptimizerSpec {
        match self {
            ComputeOptimizer::Adam => OptimizerSpec::Adam { lr: 0.001, beta1: 0.9, beta2: 0.999, eps: 1e-8 },
            ComputeOptimizer::Sgd => OptimizerSpec::Sgd { lr: 0.05, momentum: 0.9 },
        }
    }
}

fn parse_optimizer(s: &str) -> Result<ComputeOptimizer, String> {
    match s {
        "adam" => Ok(ComputeOptimizer::Adam),
        "sgd" => Ok(ComputeOptimizer::Sgd),
        other => Err(format!("unknown optimizer `{other}` (adam, sgd)")),
    }
}

/// One cell of the compute table: an optimizer and batch size, numpy against train-local.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ComputeRow {
    /// Optimizer.
    pub optimizer: ComputeOptimizer,
    /// Samples per step.
    pub batch: usize,
    /// Every numpy run's samples/s (empty when numpy is unavailable).
    pub numpy: Vec<f64>,
    /// Every train-local run's samples/s.
    pub local: Vec<f64>,
    /// Median train-local / median numpy, when numpy ran.
    pub ratio: Option<f64>,
}

/// The numpy reference measured beside the throughput rows, for the model's own recipe.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NumpyReference {
    /// The optimizer and batch size it ran.
    pub optimizer: ComputeOptimizer,
    /// Samples per step.
    pub batch: usize,
    /// Every run's samples/s.
    pub samples_per_s: Vec<f64>,
    /// Median samples/s.
    pub median: f64,
}

/// One measured configuration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    /// Name.
    pub config: String,
    /// Every repetition's samples/s.
    pub samples_per_s: Vec<f64>,
    /// Median samples/s.
    pub median: f64,
    /// Median / the reference's median.
    pub ratio: f64,
}

/// Checkpoint timings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckpointTimes {
    /// Store URL.
    pub store: String,
    /// Bytes of all VNode states together.
    pub bytes: u64,
    /// Median milliseconds to snapshot every VNode and write the snapshot.
    pub write_ms: f64,
    /// Median milliseconds to load the newest snapshot and restore every VNode.
    pub restore_ms: f64,
    /// Every run's (write, restore) milliseconds.
    pub runs: Vec<(f64, f64)>,
}

/// Everything measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    /// Checkpoint timings, when a store was given.
    pub checkpoints: Option<CheckpointTimes>,
    /// Throughput rows.
    pub rows: Vec<Row>,
    /// 64 KiB round trip p50 in microseconds.
    pub hop_rtt_p50_us: f64,
    /// 64 KiB round trip p99 in microseconds.
    pub hop_rtt_p99_us: f64,
    /// The numpy loop on the model's recipe, when it could run.
    pub numpy: Option<NumpyReference>,
    /// Why numpy did not run, when it did not.
    pub numpy_skipped: Option<String>,
    /// The compute table (`--only-compute`).
    pub compute: Vec<ComputeRow>,
}

impl BenchReport {
    fn empty() -> BenchReport {
        BenchReport {
            checkpoints: None,
            rows: Vec::new(),
            hop_rtt_p50_us: 0.0,
            hop_rtt_p99_us: 0.0,
            numpy: None,
            numpy_skipped: None,
            compute: Vec::new(),
        }
    }
}

/// The numpy reference: the script and the dataset directory it reads.
struct Numpy {
    script: PathBuf,
    data: PathBuf,
}

impl Numpy {
    /// The script and the MNIST directory, or why the comparison cannot run.
    fn find(explicit: Option<&Path>, data: Option<&Path>) -> Result<Numpy, String> {
        let data = dcnr_model::dataset::locate("mnist", data).map_err(|e| format!("no MNIST directory: {e}"))?;
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        let searched = match explicit {
            Some(p) => vec![p.to_path_buf()],
            None => vec![
                data.join("..").join("..").join(NUMPY_SCRIPT),
                cwd.join(NUMPY_SCRIPT),
                cwd.join("..").join("shared").join(NUMPY_SCRIPT),
                cwd.join("..").join("..").join("shared").join(NUMPY_SCRIPT),
            ],
        };
        match searched.iter().find(|p| p.is_file()) {
            Some(script) => Ok(Numpy { script: script.clone(), data }),
            None => {
                let list: Vec<String> = searched.iter().map(|p| p.display().to_string()).collect();
                Err(format!("no numpy reference script (--numpy-bench); looked at {}", list.join(", ")))
            }
        }
    }

    /// Samples/s of one epoch of the numpy loop.
    fn run(&self, optimizer: ComputeOptimizer, batch: usize) -> Result<f64, String> {
        let out = std::process::Command::new("python3")
            .arg(&self.script)
            .args(["--optimizer", optimizer.name(), "--batch", &batch.to_string(), "--data"])
            .arg(&self.data)
            .output()
            .map_err(|e| format!("python3 did not start: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let last = err.lines().last().unwrap_or("").chars().take(300).collect::<String>();
            return Err(format!("the numpy reference failed ({}): {last}", out.status));
        }
        let line = text.lines().last().unwrap_or("");
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("the numpy reference printed no JSON line: {e}"))?;
        v["samples_per_s"].as_f64().ok_or_else(|| "the numpy reference printed no samples_per_s".to_string())
    }
}

/// The optimizer of the compute table matching a recipe's kind.
fn compute_optimizer(spec: OptimizerSpec) -> ComputeOptimizer {
    match spec {
        OptimizerSpec::Adam { .. } | OptimizerSpec::Adamw { .. } => ComputeOptimizer::Adam,
        OptimizerSpec::Sgd { .. } => ComputeOptimizer::Sgd,
    }
}

fn median(v: &[f64]) -> f64 {
    percentile(v, 0.5)
}

/// The value at rank `q` (0..=1, nearest rank) of `v`; 0 when empty. Shared by the benchmarks.
pub fn percentile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return 0.0;
    }
    let i = ((s.len() as f64 - 1.0) * q).round() as usize;
    s[i.min(s.len() - 1)]
}

/// Runs every measurement.
pub async fn run(args: BenchArgs) -> anyhow::Result<BenchReport> {
    let graph = model_text(args.model.as_ref())?;
    let base = Envelope::from_graph(&graph)?;
    let checkpoints = match &args.checkpoint_store {
        Some(url) => Some(checkpoint_times(&base, url, args.s3_endpoint.as_deref(), args.repeat.max(1)).await?),
        None => None,
    };
    if args.only_checkpoints {
        return Ok(BenchReport { checkpoints, ..BenchReport::empty() });
    }
    let numpy = Numpy::find(args.numpy_bench.as_deref(), args.data.as_deref());
    if args.only_compute {
        let (compute, numpy_skipped) = compute_table(&args, &base, &numpy)?;
        return Ok(BenchReport { checkpoints, compute, numpy_skipped, ..BenchReport::empty() });
    }
    let with = |k: u32| {
        let mut e = base.clone();
        Overrides { steps: Some(args.steps), in_flight: Some(k), ..Overrides::default() }.apply(&mut e);
        e.artifacts.persist = false;
        e
    };
    let mut rows: Vec<(String, Vec<f64>)> = Vec::new();
    let mut local = Vec::new();
    let recipe = with(1).resolve()?.graph;
    let (optimizer, batch) = (compute_optimizer(recipe.spec.optimizer), recipe.spec.training.batch_size);
    let (mut numpy_runs, mut numpy_skipped) = (Vec::new(), numpy.as_ref().err().cloned());
    for _ in 0..args.repeat {
        // Interleaved, so a change in the machine's load falls on both alike.
        if let (Ok(n), None) = (&numpy, &numpy_skipped) {
            match n.run(optimizer, batch) {
                Ok(v) => numpy_runs.push(v),
                Err(e) => numpy_skipped = Some(e),
            }
        }
        let s = crate::local::run(with(1), args.data.clone(), false)?;
        local.push(s.samples_per_s);
    }
    eprintln!("train-local: {:.0} samples/s (median)", median(&local));
    let numpy = (numpy_skipped.is_none() && !numpy_runs.is_empty()).then(|| NumpyReference {
        optimizer,
        batch,
        median: median(&numpy_runs),
        samples_per_s: numpy_runs,
    });
    rows.push(("train-local (1 process)".into(), local));
    let (mut rtts, mut rtt_done) = (Vec::new(), false);
    for &p in &args.pnodes {
        let mesh = LocalMesh::start(p, args.data.clone(), None, None).await?;
        for (label, k) in [("sync", 1), ("pipelined", args.pipelined)] {
            let mut v = Vec::new();
            for _ in 0..args.repeat {
                let s = mesh.run_job(&with(k), false).await?;
                anyhow::ensure!(s.status == "succeeded", "benchmark job failed: {:?}", s.error);
                v.push(s.samples_per_s);
            }
            eprintln!("mesh {p} pnode(s) {label} (in-flight {k}): {:.0} samples/s (median)", median(&v));
            rows.push((format!("mesh {p} pnode(s), {label} (in-flight {k})"), v));
        }
        if !rtt_done {
            rtts = ping(&mesh, args.pings).await?;
            rtt_done = true;
        }
        mesh.stop().await;
    }
    let reference = median(&rows[0].1).max(1e-9);
    let rows = rows
        .into_iter()
        .map(|(config, v)| {
            let m = median(&v);
            Row { config, samples_per_s: v, median: m, ratio: m / reference }
        })
        .collect();
    rtts.sort_by(f64::total_cmp);
    let pct = |q: f64| rtts.get(((rtts.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0.0);
    Ok(BenchReport {
        checkpoints,
        rows,
        hop_rtt_p50_us: pct(0.5),
        hop_rtt_p99_us: pct(0.99),
        numpy,
        numpy_skipped,
        compute: Vec::new(),
    })
}

/// The compute table: per optimizer and batch size, `--repeat` runs of one epoch of numpy and
/// of train-local, interleaved. Without numpy only train-local is measured, with the reason.
fn compute_table(
    args: &BenchArgs,
    base: &Envelope,
    numpy: &Result<Numpy, String>,
) -> anyhow::Result<(Vec<ComputeRow>, Option<String>)> {
    let mut skipped = numpy.as_ref().err().cloned();
    let mut rows = Vec::new();
    for &optimizer in &args.optimizers {
        for &batch in &args.batches {
            let mut e = base.clone();
            Overrides { epochs: Some(1), in_flight: Some(1), ..Overrides::default() }.apply(&mut e);
            e.op.batch_size = Some(batch);
            e.op.optimizer = Some(optimizer.spec());
            e.artifacts.persist = false;
            let (mut np, mut local) = (Vec::new(), Vec::new());
            for _ in 0..args.repeat.max(1) {
                if let (Ok(n), None) = (numpy, &skipped) {
                    match n.run(optimizer, batch) {
                        Ok(v) => np.push(v),
                        Err(err) => skipped = Some(err),
                    }
                }
                local.push(crate::local::run(e.clone(), args.data.clone(), false)?.samples_per_s);
            }
            if skipped.is_some() {
                np.clear();
            }
            let ratio = (!np.is_empty()).then(|| median(&local) / median(&np).max(1e-9));
            eprintln!(
                "{} batch {batch}: train-local {:.0} samples/s, numpy {}",
                optimizer.name(),
                median(&local),
                if np.is_empty() { "-".to_string() } else { format!("{:.0}", median(&np)) }
            );
            rows.push(ComputeRow { optimizer, batch, numpy: np, local, ratio });
        }
    }
    Ok((rows, skipped))
}

/// VNodes of the model after two synchronous training steps on synthetic data (so the optimizer
/// state exists), wired in memory.
fn trained_vnodes(envelope: &Envelope) -> anyhow::Result<(Vec<dcnr_vnode::VNodeSpec>, Vec<dcnr_vnode::VNode>)> {
    use dcnr_vnode::{HostTensor, VNode, VNodeSpec};
    let r = envelope.clone().resolve()?;
    let g = &r.graph;
    let specs: Vec<VNodeSpec> = g
        .nodes
        .iter()
        .map(|n| VNodeSpec {
            node: n.clone(),
            optimizer: g.spec.optimizer,
            recipe: g.spec.training.recipe(),
            root_seed: r.root_seed,
            in_flight: 1,
            averaging: None,
            compute: Default::default(),
        })
        .collect();
    let mut nodes: Vec<VNode> = specs.iter().cloned().map(VNode::new).collect();
    let b = g.spec.training.batch_size;
    let (w, c) = (g.spec.data.feature_size, g.spec.data.classes);
    let batch = |_, _| {
        let x = HostTensor::f32(vec![b, w], (0..b * w).map(|i| ((i % 17) as f32) / 17.0).collect());
        (x, HostTensor::i32(vec![b], (0..b).map(|i| (i % c) as i32).collect()))
    };
    dcnr_vnode::memory::train(g, &mut nodes, 0..2, 1, batch, |n| n - 1)?;
    Ok((specs, nodes))
}

async fn checkpoint_times(
    envelope: &Envelope,
    url: &str,
    endpoint: Option<&str>,
    repeat: usize,
) -> anyhow::Result<CheckpointTimes> {
    let store = crate::artifacts::open_store(url, endpoint)?;
    let (specs, nodes) = trained_vnodes(envelope)?;
    let env_json = serde_json::to_vec(envelope)?;
    let mut runs = Vec::new();
    let mut bytes = 0;
    for r in 0..repeat {
        let t = Instant::now();
        let states: Vec<(u32, Vec<u8>)> =
            nodes.iter().map(|n| Ok((n.id(), n.snapshot()?))).collect::<Result<_, dcnr_vnode::VNodeError>>()?;
        bytes = states.iter().map(|s| s.1.len() as u64).sum();
        let snapshot = crate::checkpoints::Checkpoint {
            job: "bench-checkpoint".into(),
            step: r as u64 + 1,
            epochs_evaluated: 0,
            envelope_json: env_json.clone(),
            states,
            keep: 2,
        };
        crate::checkpoints::write(store.as_ref(), &snapshot).await?;
        let write = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let (_, from) = crate::checkpoints::load_latest(store.as_ref(), "bench-checkpoint").await?;
        for spec in &specs {
            let state = from.states.get(&spec.node.id).context("state missing")?;
            dcnr_vnode::VNode::restore(spec.clone(), state)?;
        }
        runs.push((write, t.elapsed().as_secs_f64() * 1e3));
    }
    let w: Vec<f64> = runs.iter().map(|r| r.0).collect();
    let rs: Vec<f64> = runs.iter().map(|r| r.1).collect();
    Ok(CheckpointTimes { store: url.to_string(), bytes, write_ms: median(&w), restore_ms: median(&rs), runs })
}

/// Round trips of a 64 KiB tensor message to a PNode, in microseconds.
async fn ping(mesh: &LocalMesh, n: usize) -> anyhow::Result<Vec<f64>> {
    let snap = mesh.registry().send(ListPNodes).await?;
    let endpoint = snap.first().map(|p| p.endpoint.clone()).context("no pnode to ping")?;
    let mut client = pnode_client(&endpoint, &dcnr_proto::tls::Expect::AnyPNode)?;
    let payload = dcnr_proto::tensor::encode_f32(&[64, 256], &vec![0.5f32; 64 * 256]);
    let req = v1::PingRequest { payload: Some(payload), job_id: String::new() };
    for _ in 0..50 {
        client.ping(req.clone()).await?;
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        client.ping(req.clone()).await?;
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(out)
}

/// Prints the report as a table.
pub fn print(r: &BenchReport) {
    if let Some(c) = &r.checkpoints {
        println!(
            "checkpoint of all VNodes ({} bytes) to {}: write {:.1} ms, restore {:.1} ms (medians of {})",
            c.bytes,
            c.store,
            c.write_ms,
            c.restore_ms,
            c.runs.len()
        );
    }
    if let Some(why) = &r.numpy_skipped {
        println!("numpy reference skipped: {why}");
    }
    if !r.compute.is_empty() {
        println!(
            "{:<18} {:>14} {:>14} {:>7}   runs (numpy | train-local)",
            "optimizer, batch", "numpy", "train-local", "ratio"
        );
        let runs = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(" ");
        for c in &r.compute {
            let np = if c.numpy.is_empty() { "-".to_string() } else { format!("{:.0}", median(&c.numpy)) };
            let ratio = c.ratio.map_or("-".to_string(), |x| format!("{x:.2}x"));
            println!(
                "{:<18} {:>14} {:>14.0} {:>7}   {} | {}",
                format!("{}, {}", c.optimizer.name(), c.batch),
                np,
                median(&c.local),
                ratio,
                runs(&c.numpy),
                runs(&c.local)
            );
        }
    }
    if r.rows.is_empty() {
        return;
    }
    println!("{:<44} {:>12} {:>8}   runs", "configuration", "samples/s", "ratio");
    for row in &r.rows {
        let runs: Vec<String> = row.samples_per_s.iter().map(|v| format!("{v:.0}")).collect();
        println!("{:<44} {:>12.0} {:>7.2}x   {}", row.config, row.median, row.ratio, runs.join(" "));
    }
    if let Some(n) = &r.numpy {
        let runs: Vec<String> = n.samples_per_s.iter().map(|v| format!("{v:.0}")).collect();
        let local = r.rows.first().map_or(0.0, |row| row.median);
        println!(
            "{:<44} {:>12.0} {:>7.2}x   {}   (train-local / numpy: {:.2}x)",
            format!("numpy + BLAS ({}, batch {})", n.optimizer.name(), n.batch),
            n.median,
            n.median / local.max(1e-9),
            runs.join(" "),
            local / n.median.max(1e-9)
        );
    }
    println!(
        "64 KiB message round trip over loopback gRPC: p50 {:.0} us, p99 {:.0} us",
        r.hop_rtt_p50_us, r.hop_rtt_p99_us
    );
}

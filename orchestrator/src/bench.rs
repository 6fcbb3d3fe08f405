//! `bench`: training throughput of the single-process reference and of local meshes of 1, 2
//! and 3 PNodes (synchronous and pipelined), measured side by side in one run, plus the
//! round-trip latency of one 64 KiB VNode message over loopback gRPC.

use crate::client::Overrides;
use crate::demo::{LocalMesh, model_text};
use crate::job::pnode_client;
use crate::registry::ListPNodes;
use anyhow::Context as _;
use dcnr_model::envelope::Envelope;
use dcnr_proto::v1;
use std::path::PathBuf;
use std::time::Instant;

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
        return Ok(BenchReport { checkpoints, rows: Vec::new(), hop_rtt_p50_us: 0.0, hop_rtt_p99_us: 0.0 });
    }
    let with = |k: u32| {
        let mut e = base.clone();
        Overrides { steps: Some(args.steps), in_flight: Some(k), ..Overrides::default() }.apply(&mut e);
        e.artifacts.persist = false;
        e
    };
    let mut rows: Vec<(String, Vec<f64>)> = Vec::new();
    let mut local = Vec::new();
    for _ in 0..args.repeat {
        let s = crate::local::run(with(1), args.data.clone(), false)?;
        local.push(s.samples_per_s);
    }
    eprintln!("train-local: {:.0} samples/s (median)", median(&local));
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
    Ok(BenchReport { checkpoints, rows, hop_rtt_p50_us: pct(0.5), hop_rtt_p99_us: pct(0.99) })
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
    if r.rows.is_empty() {
        return;
    }
    println!("{:<44} {:>12} {:>8}   runs", "configuration", "samples/s", "ratio");
    for row in &r.rows {
        let runs: Vec<String> = row.samples_per_s.iter().map(|v| format!("{v:.0}")).collect();
        println!("{:<44} {:>12.0} {:>7.2}x   {}", row.config, row.median, row.ratio, runs.join(" "));
    }
    println!(
        "64 KiB message round trip over loopback gRPC: p50 {:.0} us, p99 {:.0} us",
        r.hop_rtt_p50_us, r.hop_rtt_p99_us
    );
}

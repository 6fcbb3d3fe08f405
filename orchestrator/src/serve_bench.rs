//! `bench-serve`: inference latency and throughput of a served model on a local mesh beside the
//! single-process forward of the same parameters, in one run. A job is trained first (its
//! parameters are what both serve); the first request, which places the VNodes, is timed apart.

use crate::bench::percentile;
use crate::client::Overrides;
use crate::demo::{LocalMesh, model_text};
use crate::serve::model::Model;
use anyhow::{Context as _, anyhow, bail};
use dcnr_model::envelope::Envelope;
use dcnr_proto::v1;
use dcnr_vnode::HostTensor;
use futures::StreamExt;
use std::path::PathBuf;
use std::time::Instant;

/// Flags of `bench-serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeBenchArgs {
    /// Model graph (default: models/mnist-mlp.toml).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training steps of the job that is then served.
    #[arg(long, default_value_t = 600)]
    pub steps: u64,
    /// PNodes of the mesh.
    #[arg(long, default_value_t = 3)]
    pub pnodes: usize,
    /// Requests per latency measurement.
    #[arg(long, default_value_t = 300)]
    pub requests: usize,
    /// Test rows of the throughput measurement (requests of 64 rows).
    #[arg(long, default_value_t = 10_000)]
    pub rows: usize,
    /// Requests in flight in the throughput measurement.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Dataset directory.
    #[arg(long, env = "DCNR_DATA")]
    pub data: Option<PathBuf>,
}

/// One measured configuration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServeRow {
    /// What was measured.
    pub config: String,
    /// Latency p50 in milliseconds (0 for throughput rows).
    pub p50_ms: f64,
    /// Latency p99 in milliseconds.
    pub p99_ms: f64,
    /// Rows per second.
    pub rows_per_s: f64,
}

/// Everything measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServeReport {
    /// PNodes of the mesh.
    pub pnodes: usize,
    /// Milliseconds of the first request (loading the model and placing its VNodes).
    pub first_request_ms: f64,
    /// Rows measured.
    pub rows: Vec<ServeRow>,
    /// Whether the mesh's probabilities of the throughput rows equal the single process's bit for bit.
    pub bit_identical: bool,
}

/// Test rows `start..start + n` as u8 pixels.
fn pixels(test: &dcnr_model::dataset::ImageSet, start: usize, n: usize) -> anyhow::Result<HostTensor> {
    let idx: Vec<usize> = (start..start + n).map(|i| i % test.len().max(1)).collect();
    let px = test.pixels_of(&idx).ok_or_else(|| anyhow!("test rows {start}.. are missing"))?;
    Ok(HostTensor::u8(vec![n, test.features()], px))
}

fn latency_row(config: &str, ms: &[f64], rows_each: usize) -> ServeRow {
    let total_s: f64 = ms.iter().sum::<f64>() / 1e3;
    ServeRow {
        config: config.into(),
        p50_ms: percentile(ms, 0.5),
        p99_ms: percentile(ms, 0.99),
        rows_per_s: (ms.len() * rows_each) as f64 / total_s.max(1e-9),
    }
}

/// Trains, serves and measures.
pub async fn run(args: ServeBenchArgs) -> anyhow::Result<ServeReport> {
    if args.requests == 0 || args.rows == 0 || args.concurrency == 0 {
        bail!("--requests, --rows and --concurrency must be at least 1");
    }
    let mut envelope = Envelope::from_graph(&model_text(args.model.as_ref())?)?;
    Overrides { steps: Some(args.steps), ..Overrides::default() }.apply(&mut envelope);
    let store_dir = tempfile::tempdir()?;
    let store_url = store_dir.path().to_string_lossy().to_string();
    let mesh = LocalMesh::start(args.pnodes, args.data.clone(), Some(store_url.clone()), None).await?;
    let summary = mesh.run_job(&envelope, false).await?;
    if summary.status != "succeeded" {
        bail!("the job to serve did not succeed: {}", summary.error.unwrap_or_default());
    }
    let job = summary.job_id.clone();
    eprintln!("trained {job} ({} steps); serving it on {} pnodes", args.steps, args.pnodes);

    let store = crate::artifacts::open_store(&store_url, None)?;
    let model = Model::load(store.as_ref(), &job).await?;
    let reference = model.reference()?;
    let dir = dcnr_model::dataset::locate(&model.graph.spec.data.dataset, args.data.as_deref())?;
    let test = dcnr_model::dataset::load_split(&dir, dcnr_model::dataset::Split::Test)
        .with_context(|| format!("loading the test split from {}", dir.display()))?;

    let client = mesh.client().await?;
    let infer = |inputs: HostTensor| {
        let (mut c, job) = (client.clone(), job.clone());
        async move {
            let req = v1::InferRequest { job_id: job, inputs: Some(dcnr_mesh::convert::tensor_to_wire(&inputs)) };
            let r = c.infer(req).await.map_err(|s| anyhow!("infer: {}", s.message()))?.into_inner();
            dcnr_mesh::convert::tensor_from_wire(r.probabilities.as_ref()).map_err(|e| anyhow!("{e}"))
        }
    };
    let started = Instant::now();
    infer(pixels(&test, 0, 1)?).await?;
    let first_request_ms = started.elapsed().as_secs_f64() * 1e3;

    let mut rows = Vec::new();
    for batch in [1usize, 64] {
        let (mut mesh_ms, mut local_ms) = (Vec::new(), Vec::new());
        for i in 0..args.requests {
            let x = pixels(&test, i * batch, batch)?;
            let t = Instant::now();
            let features = model.features(&x);
            reference.predict(&features).map_err(|e| anyhow!("{e}"))?;
            local_ms.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            infer(x).await?;
            mesh_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        rows.push(latency_row(&format!("single process, batch {batch}"), &local_ms, batch));
        rows.push(latency_row(&format!("mesh, batch {batch}"), &mesh_ms, batch));
    }

    let requests: Vec<HostTensor> = (0..args.rows.div_ceil(64))
        .map(|i| pixels(&test, i * 64, 64.min(args.rows - i * 64)))
        .collect::<Result<_, _>>()?;
    let n: usize = requests.iter().map(HostTensor::rows).sum();
    let t = Instant::now();
    let mut local = Vec::new();
    for x in &requests {
        local.push(reference.predict(&model.features(x)).map_err(|e| anyhow!("{e}"))?);
    }
    let local_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let answers: Vec<anyhow::Result<HostTensor>> =
        futures::stream::iter(requests.into_iter().map(infer)).buffered(args.concurrency).collect().await;
    let mesh_s = t.elapsed().as_secs_f64();
    let answers = answers.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    let bit_identical = answers == local;
    let throughput =
        |config: String, s: f64| ServeRow { config, p50_ms: 0.0, p99_ms: 0.0, rows_per_s: n as f64 / s.max(1e-9) };
    rows.push(throughput("single process, throughput (batches of 64)".into(), local_s));
    rows.push(throughput(format!("mesh, throughput (batches of 64, {} in flight)", args.concurrency), mesh_s));
    mesh.stop().await;
    Ok(ServeReport { pnodes: args.pnodes, first_request_ms, rows, bit_identical })
}

/// Prints the report as a table.
pub fn print(r: &ServeReport) {
    println!("first request (load and place the model): {:.0} ms", r.first_request_ms);
    println!("{:<52} {:>9} {:>9} {:>10}", "configuration", "p50 ms", "p99 ms", "rows/s");
    for row in &r.rows {
        println!("{:<52} {:>9.3} {:>9.3} {:>10.0}", row.config, row.p50_ms, row.p99_ms, row.rows_per_s);
    }
    println!("mesh probabilities equal the single process's bit for bit: {}", r.bit_identical);
}

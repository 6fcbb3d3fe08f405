//! `bench-dashboard`: latency of the dashboard's API while a job of many VNodes trains on a
//! local mesh. Requests go one at a time over a kept-alive loopback connection, so each
//! measures the server's answer time, not queueing behind other requests.

use crate::bench::percentile;
use crate::client;
use crate::demo::{LocalMesh, MeshConfig};
use anyhow::{Context as _, bail};
use dcnr_model::envelope::Envelope;
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Flags of `bench-dashboard`.
#[derive(Debug, Clone, clap::Args)]
pub struct DashBenchArgs {
    /// VNodes in the benchmark's model graph (a deep MLP of linear and tanh layers).
    #[arg(long, default_value_t = 200)]
    pub vnodes: usize,
    /// PNode processes.
    #[arg(long, default_value_t = 3)]
    pub pnodes: usize,
    /// Requests per endpoint.
    #[arg(long, default_value_t = 200)]
    pub requests: usize,
    /// Training time before measuring starts, in seconds (curves and events fill up).
    #[arg(long, default_value_t = 5)]
    pub warmup_s: u64,
    /// Dataset directory.
    #[arg(long, env = "DCNR_DATA")]
    pub data: Option<PathBuf>,
}

/// Latency of one endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointLatency {
    /// Path requested.
    pub path: String,
    /// Requests made.
    pub requests: usize,
    /// Median, in milliseconds.
    pub p50_ms: f64,
    /// 95th percentile, in milliseconds.
    pub p95_ms: f64,
    /// Slowest, in milliseconds.
    pub max_ms: f64,
    /// Response size of the last request, in bytes.
    pub bytes: usize,
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct DashBenchReport {
    /// VNodes in the job.
    pub vnodes: usize,
    /// PNodes.
    pub pnodes: usize,
    /// Training steps done when measuring ended.
    pub steps_done: u64,
    /// Per endpoint.
    pub endpoints: Vec<EndpointLatency>,
    /// 95th percentile over every request, in milliseconds.
    pub p95_ms: f64,
}

/// A deep MLP with `n` VNodes: 784 -> 16, then alternating tanh and 16 -> 16, 16 -> 10, loss.
pub fn deep_mlp(n: usize) -> anyhow::Result<String> {
    if n < 4 {
        bail!("--vnodes must be at least 4");
    }
    let mut t = String::from(
        "[model]\nname = \"deep-mlp\"\nseed = 1\n\n[data]\ndataset = \"mnist\"\nfeature_size = 784\nclasses = 10\n\n\
         [training]\nbatch_size = 16\nsteps = 1000000\neval_batch_size = 1000\n\n\
         [optimizer]\nkind = \"sgd\"\nlr = 0.01\nmomentum = 0.0\n\n",
    );
    let mut names = vec!["fc0".to_string()];
    t.push_str("[[node]]\nid = \"fc0\"\nkind = \"linear\"\ninputs = 784\noutputs = 16\n\n");
    for i in 1..n - 2 {
        let name = format!("n{i}");
        if i % 2 == 1 {
            t.push_str(&format!("[[node]]\nid = \"{name}\"\nkind = \"tanh\"\n\n"));
        } else {
            t.push_str(&format!("[[node]]\nid = \"{name}\"\nkind = \"linear\"\ninputs = 16\noutputs = 16\n\n"));
        }
        names.push(name);
    }
    t.push_str("[[node]]\nid = \"out\"\nkind = \"linear\"\ninputs = 16\noutputs = 10\n\n");
    t.push_str("[[node]]\nid = \"loss\"\nkind = \"softmax_cross_entropy\"\n\n");
    names.push("out".into());
    names.push("loss".into());
    t.push_str("[[edge]]\nfrom = \"image\"\nto = \"fc0\"\n\n");
    for w in names.windows(2) {
        t.push_str(&format!("[[edge]]\nfrom = \"{}\"\nto = \"{}\"\n\n", w[0], w[1]));
    }
    t.push_str("[[edge]]\nfrom = \"label\"\nto = \"loss\"\n");
    Ok(t)
}

/// Runs the benchmark.
pub async fn run(args: DashBenchArgs) -> anyhow::Result<DashBenchReport> {
    let graph = deep_mlp(args.vnodes)?;
    let envelope = Envelope::from_graph(&graph).map_err(|e| anyhow::anyhow!("benchmark graph: {e}"))?;
    let per_pnode = args.vnodes.div_ceil(args.pnodes.max(1)) * 2 + 8;
    let mesh = LocalMesh::start_with(MeshConfig {
        pnodes: args.pnodes,
        data: args.data.clone(),
        dashboard: Some("127.0.0.1:0".parse()?),
        pnode_args: vec!["--max-vnodes".into(), per_pnode.to_string()],
        ..MeshConfig::default()
    })
    .await?;
    let result = measure(&mesh, &envelope, &args).await;
    mesh.stop().await;
    result
}

async fn measure(mesh: &LocalMesh, envelope: &Envelope, args: &DashBenchArgs) -> anyhow::Result<DashBenchReport> {
    let dash = mesh.dashboard_url().context("the mesh has no dashboard")?;
    let mut c = mesh.client().await?;
    let job = client::submit(&mut c, envelope).await?;
    // Wait for placement and the first steps, then let curves and events accumulate.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = client::jobs(&mut c).await?;
        if s.iter().any(|j| j.job_id == job && j.steps_done > 0) {
            break;
        }
        if s.iter().any(|j| j.job_id == job && !j.error.is_empty()) || Instant::now() > deadline {
            bail!("the benchmark job did not start training: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(args.warmup_s)).await;
    let paths = [
        "api/overview".to_string(),
        "api/jobs".to_string(),
        format!("api/jobs/{job}"),
        "api/pnodes".to_string(),
        "api/events?limit=200".to_string(),
        "metrics".to_string(),
    ];
    let requests = args.requests.max(1);
    let dash2 = dash.clone();
    let timings = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<(String, Vec<f64>, usize)>> {
        let agent: ureq::Agent =
            ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(10))).build().into();
        let mut out: Vec<(String, Vec<f64>, usize)> = paths.iter().map(|p| (p.clone(), Vec::new(), 0)).collect();
        for _ in 0..requests {
            // Interleaved, so every endpoint sees the same training state over the run.
            for (path, times, bytes) in out.iter_mut() {
                let t = Instant::now();
                let body = agent
                    .get(&format!("{dash2}{path}"))
                    .call()
                    .with_context(|| format!("GET {path}"))?
                    .body_mut()
                    .read_to_string()
                    .with_context(|| format!("body of {path}"))?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
                *bytes = body.len();
            }
        }
        Ok(out)
    })
    .await??;
    let steps_done = client::jobs(&mut c).await?.iter().find(|j| j.job_id == job).map(|j| j.steps_done).unwrap_or(0);
    let mut all = Vec::new();
    let endpoints = timings
        .into_iter()
        .map(|(path, mut t, bytes)| {
            t.sort_by(f64::total_cmp);
            all.extend_from_slice(&t);
            EndpointLatency {
                path: format!("/{path}"),
                requests: t.len(),
                p50_ms: percentile(&t, 0.5),
                p95_ms: percentile(&t, 0.95),
                max_ms: t.last().copied().unwrap_or(0.0),
                bytes,
            }
        })
        .collect();
    all.sort_by(f64::total_cmp);
    Ok(DashBenchReport {
        vnodes: args.vnodes,
        pnodes: args.pnodes,
        steps_done,
        endpoints,
        p95_ms: percentile(&all, 0.95),
    })
}

/// Prints the report as a table.
pub fn print(r: &DashBenchReport) {
    println!("dashboard API latency: job of {} VNodes on {} pnodes, {} steps done", r.vnodes, r.pnodes, r.steps_done);
    println!("{:<34} {:>8} {:>9} {:>9} {:>9} {:>10}", "ENDPOINT", "REQUESTS", "P50 ms", "P95 ms", "MAX ms", "BYTES");
    for e in &r.endpoints {
        println!(
            "{:<34} {:>8} {:>9.2} {:>9.2} {:>9.2} {:>10}",
            e.path, e.requests, e.p50_ms, e.p95_ms, e.max_ms, e.bytes
        );
    }
    println!("p95 over all requests: {:.2} ms", r.p95_ms);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deep_mlp_has_the_asked_number_of_vnodes_and_validates() {
        for n in [4, 5, 200] {
            let g = dcnr_model::ModelGraph::parse_valid(&deep_mlp(n).expect("graph")).expect("valid");
            assert_eq!(g.nodes.len(), n);
        }
        assert!(deep_mlp(3).is_err());
    }

    #[test]
    fn percentiles_pick_ranks() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.95), 95.0);
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&[], 0.95), 0.0);
    }
}

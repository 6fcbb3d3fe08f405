//! The data service across real processes: a PNode fetches a job's dataset pack from the
//! orchestrator once, caches it in its data directory, reuses it for later jobs and after a
//! restart, and fetches it again when the cached copy is corrupt. The orchestrator sends feed
//! requests, not pixels, and refuses what it has not published.

use anyhow::{Context, Result, bail};
use dcnr_proto::v1;
use dcnr_tests::{Mesh, free_port, http_get, model, sha256_hex, wait_for};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The value of one sample in Prometheus text (`name` includes any labels); 0 when absent.
fn sample(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// One PNode of the mesh, with a data directory and a metrics endpoint that survive restarts.
struct DataPNode {
    dir: PathBuf,
    metrics: String,
    args: Vec<String>,
}

impl DataPNode {
    fn new(dir: &Path) -> Result<DataPNode> {
        let port = free_port()?;
        let args = vec![
            "--name".to_string(),
            "data-pnode".to_string(),
            "--data-dir".to_string(),
            dir.display().to_string(),
            "--metrics".to_string(),
            format!("127.0.0.1:{port}"),
        ];
        Ok(DataPNode { dir: dir.to_path_buf(), metrics: format!("http://127.0.0.1:{port}/metrics"), args })
    }

    /// Starts it and waits until it is registered and serving metrics.
    fn start(&self, mesh: &mut Mesh) -> Result<()> {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        mesh.add_pnode_with(&args)?;
        mesh.wait_for_pnodes(1)?;
        wait_for("pnode metrics", Duration::from_secs(20), || http_get(&self.metrics).ok().filter(|r| r.0 == 200))?;
        Ok(())
    }

    fn loads(&self, source: &str) -> Result<u64> {
        let (_, text) = http_get(&self.metrics)?;
        Ok(sample(&text, &format!("dcnr_pnode_dataset_loads_total{{source=\"{source}\"}}")))
    }

    fn metric(&self, name: &str) -> Result<u64> {
        Ok(sample(&http_get(&self.metrics)?.1, name))
    }

    /// The cached packs, by file name.
    fn cached(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.join("datasets"))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        names.sort();
        Ok(names)
    }
}

/// Kills PNode `i` and waits until the orchestrator no longer counts it healthy, so the next
/// registration under the same identity is the one placements use.
fn stop(mesh: &mut Mesh, i: usize) -> Result<()> {
    mesh.kill_pnode(i);
    wait_for("the pnode to be declared lost", Duration::from_secs(20), || {
        mesh.pnodes().ok().filter(|p| p.iter().all(|p| p["health"] != "healthy")).map(|_| ())
    })
}

fn train(mesh: &Mesh) -> Result<()> {
    let s = mesh.submit_wait(&model("mnist-mlp.toml"), &["--steps", "3"])?;
    if s["status"] != "succeeded" {
        bail!("job failed: {s}");
    }
    Ok(())
}

#[test]
fn a_pnode_fetches_the_pack_once_reuses_its_cache_and_refetches_a_corrupt_copy() -> Result<()> {
    let mut mesh = Mesh::start(0)?;
    let dir = tempfile::tempdir()?;
    let pn = DataPNode::new(dir.path())?;
    pn.start(&mut mesh)?;

    // First job: fetched from the orchestrator and cached under its hash, written whole.
    train(&mesh)?;
    assert_eq!(pn.loads("orchestrator")?, 1);
    let names = pn.cached()?;
    assert_eq!(names.len(), 1, "{names:?}");
    let sha = names[0].clone();
    let pack = std::fs::read(dir.path().join("datasets").join(&sha))?;
    assert_eq!(sha256_hex(&pack), sha);
    assert_eq!(pn.metric("dcnr_pnode_dataset_bytes_fetched_total")?, pack.len() as u64);
    // MNIST: 70 000 samples of 784 pixels and a label, behind a 40-byte header.
    assert_eq!(pack.len(), 40 + 70_000 * 785);
    // The orchestrator published it in its store, under its hash.
    let store = mesh.artifacts.path();
    let named = std::fs::read_to_string(store.join("refs/datasets").join(&sha)).context("datasets ref")?;
    assert_eq!(named.trim(), sha);
    assert_eq!(std::fs::read(store.join("objects").join(&sha[..2]).join(&sha))?, pack);

    // Second job on the same process: the pack it holds, no second fetch.
    train(&mesh)?;
    assert_eq!((pn.loads("orchestrator")?, pn.loads("memory")?), (1, 1));

    // A restart under the same data directory: the cached file, checked, no fetch.
    stop(&mut mesh, 0)?;
    pn.start(&mut mesh)?;
    train(&mesh)?;
    assert_eq!((pn.loads("orchestrator")?, pn.loads("disk")?), (0, 1));

    // A corrupt cached file is noticed, deleted, and fetched again.
    stop(&mut mesh, 1)?;
    let path = dir.path().join("datasets").join(&sha);
    let mut bad = std::fs::read(&path)?;
    bad[1000] ^= 0x40;
    std::fs::write(&path, bad)?;
    pn.start(&mut mesh)?;
    train(&mesh)?;
    assert_eq!(pn.metric("dcnr_pnode_dataset_cache_corrupt_total")?, 1);
    assert_eq!((pn.loads("orchestrator")?, pn.loads("disk")?), (1, 0));
    assert_eq!(sha256_hex(&std::fs::read(&path)?), sha, "the refetched copy is whole again");
    assert_eq!(pn.cached()?, vec![sha]);
    Ok(())
}

#[test]
fn a_pack_above_the_pnodes_limit_fails_the_allocation_with_the_reason() -> Result<()> {
    let mut mesh = Mesh::start(0)?;
    mesh.add_pnode_with(&["--max-dataset-mib", "1"])?;
    mesh.wait_for_pnodes(1)?;
    let dir = tempfile::tempdir()?;
    let env = dir.path().join("job.toml");
    let graph = model("mnist-mlp.toml");
    std::fs::write(&env, format!("[op]\nmodel = {:?}\nsteps = 3\n[policy]\ntimeout_s = 5\n", graph.display()))?;
    let out = mesh.submit_raw(&env, &[])?;
    assert_eq!(out.status.code(), Some(1));
    let s = dcnr_tests::last_json(&out.stdout)?;
    let text = s.to_string();
    assert!(text.contains("--max-dataset-mib") && text.contains("accepts 1 to 1048576"), "{text}");
    Ok(())
}

#[test]
fn feeds_are_checked_and_only_published_packs_are_served() -> Result<()> {
    let mesh = Mesh::start(1)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        // Packs go to registered PNodes only.
        let mut anon = dcnr_tests::orchestrator_client(&mesh.url).await?;
        let err = anon.fetch_dataset(v1::FetchDatasetRequest { sha256: "ab".repeat(32) }).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
        let me = dcnr_tests::register_member(&mesh.url, 42, "https://127.0.0.1:9").await?;
        let c = dcnr_tests::channel(&mesh.url, dcnr_proto::tls::Expect::Orchestrator, &me).await?;
        let mut orch = v1::orchestrator_client::OrchestratorClient::new(c);
        // No job has published anything: nothing is served.
        let err = orch.fetch_dataset(v1::FetchDatasetRequest { sha256: "ab".repeat(32) }).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{err}");

        let pnodes = orch.list_p_nodes(v1::ListPNodesRequest {}).await?.into_inner().pnodes;
        let pnode = pnodes.iter().find(|p| p.name != "member-42").ok_or_else(|| anyhow::anyhow!("no pnode"))?;
        let feed = |phase: i32| v1::VNodeMessage {
            job_id: "nojob".into(),
            to_vnode: 0,
            micro_batch: 0,
            body: Some(v1::v_node_message::Body::Feed(v1::Feed { port: 0, phase, batch: 0 })),
            generation: 1,
            seal: None,
        };
        let c = dcnr_tests::channel(&pnode.endpoint, dcnr_proto::tls::Expect::AnyPNode, &me).await?;
        let mut pn = v1::p_node_client::PNodeClient::new(c);
        // A feed with no phase is malformed: the stream is refused whoever sends it.
        let err = pn.exchange(tokio_stream::iter(vec![feed(0)])).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("unknown phase"), "{}", err.message());
        // Feeds come only from the orchestrator: a PNode's well-formed one is refused outright.
        let err = pn.exchange(tokio_stream::iter(vec![feed(v1::Phase::Train as i32)])).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
        anyhow::Ok(())
    })?;
    Ok(())
}

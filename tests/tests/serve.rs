//! Serving a trained model: `predict` on the mesh (the `Infer` RPC, forward-only VNodes placed
//! from the job's stored parameters) equals the single-process forward (`predict --local`) bit
//! for bit, whatever the input format, survives a killed PNode, and refuses bad input and
//! callers without the maintainer token.

use dcnr_tests::{Mesh, fixture, last_json, run, run_bin_env};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

fn mnist(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("data").join("mnist").join(file)
}

/// The first `n` test images' pixels, 784 each.
fn test_images(n: usize) -> Vec<Vec<u8>> {
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(mnist("t10k-images-idx3-ubyte.gz")).unwrap())
        .read_to_end(&mut raw)
        .unwrap();
    raw[16..16 + n * 784].chunks(784).map(<[u8]>::to_vec).collect()
}

fn predict(mesh: &Mesh, job: &str, input: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["predict", job, "--input", input.to_str().unwrap(), "--orchestrator", &mesh.url, "--json"];
    args.extend_from_slice(extra);
    let out = run(&args, T).unwrap();
    assert_eq!(out.status.code(), Some(0), "predict {extra:?}: {}", String::from_utf8_lossy(&out.stderr));
    last_json(&out.stdout).unwrap()
}

#[test]
fn predictions_on_the_mesh_equal_the_single_process_forward_and_survive_a_lost_pnode() {
    let mut mesh = Mesh::start(3).unwrap();
    let s = mesh.submit_wait(&fixture("tiny-mlp.toml"), &["--steps", "200"]).unwrap();
    assert_eq!(s["status"], "succeeded", "{s}");
    let job = s["job_id"].as_str().unwrap().to_string();
    let store = mesh.artifacts.path().to_str().unwrap().to_string();
    let images = mnist("t10k-images-idx3-ubyte.gz");
    let labels = mnist("t10k-labels-idx1-ubyte.gz");
    let labels = labels.to_str().unwrap();

    // 2500 rows: requests of 64 rows, four in flight.
    let on_mesh = predict(&mesh, &job, &images, &["--limit", "2500", "--labels", labels]);
    let local = predict(&mesh, &job, &images, &["--limit", "2500", "--labels", labels, "--local", "--store", &store]);
    assert_eq!(on_mesh["rows"], 2500);
    assert_eq!(on_mesh["ran_on"], "mesh");
    assert_eq!(on_mesh["probabilities_sha256"], local["probabilities_sha256"], "mesh differs from one process");
    assert_eq!(on_mesh["classes"], local["classes"]);
    assert!(on_mesh["accuracy"].as_f64().unwrap() > 0.8, "{}", on_mesh["accuracy"]);
    assert_eq!(on_mesh["params_sha256"], local["params_sha256"]);
    let first_generation = on_mesh["generation"].as_u64().unwrap();
    // One request larger than a micro-batch (the graph's eval batch, 2000 rows) is cut the same
    // way in both.
    let big = predict(&mesh, &job, &images, &["--limit", "2500", "--batch", "2500"]);
    let big_local =
        predict(&mesh, &job, &images, &["--limit", "2500", "--batch", "2500", "--local", "--store", &store]);
    assert_eq!(big["probabilities_sha256"], big_local["probabilities_sha256"]);
    assert_eq!(big["classes"], on_mesh["classes"]);

    // A PNode hosting served VNodes dies: the next predictions come from a new placement, and
    // are the same.
    let victim = mesh.victim(&[]).unwrap();
    mesh.kill_pnode(victim);
    let again = predict(&mesh, &job, &images, &["--limit", "2500", "--labels", labels]);
    assert_eq!(again["probabilities_sha256"], on_mesh["probabilities_sha256"]);
    assert!(
        again["generation"].as_u64().unwrap() > first_generation,
        "{} after {first_generation}",
        again["generation"]
    );

    // One image as PGM, as PNG and as JSON rows: the classes of the IDX run's first rows, and
    // the single-process forward's probabilities bit for bit. (Not the IDX run's bits: a
    // one-row product takes another kernel path than a 64-row one.)
    let dir = tempfile::tempdir().unwrap();
    let first = test_images(3);
    let pgm = dir.path().join("digit.pgm");
    let mut bytes = b"P5\n28 28\n255\n".to_vec();
    bytes.extend_from_slice(&first[0]);
    std::fs::write(&pgm, bytes).unwrap();
    let png = dir.path().join("digit.png");
    image::GrayImage::from_raw(28, 28, first[0].clone()).unwrap().save(&png).unwrap();
    let json = dir.path().join("rows.json");
    std::fs::write(&json, serde_json::to_vec(&first).unwrap()).unwrap();
    for (file, rows) in [(&pgm, 1), (&png, 1), (&json, 3)] {
        let p = predict(&mesh, &job, file, &[]);
        assert_eq!(p["rows"], rows);
        for r in 0..rows {
            assert_eq!(p["classes"][r], on_mesh["classes"][r], "{}", file.display());
        }
        let local = predict(&mesh, &job, file, &["--local", "--store", &store]);
        assert_eq!(p["probabilities_sha256"], local["probabilities_sha256"], "{}", file.display());
    }

    // Bad input is a clear error (exit 2); so is a job that does not exist.
    let small = dir.path().join("small.pgm");
    std::fs::write(&small, [b"P5\n10 10\n255\n".as_slice(), &[0u8; 100]].concat()).unwrap();
    let garbage = dir.path().join("garbage.bin");
    std::fs::write(&garbage, [7u8; 64]).unwrap();
    let cases: [(&str, &Path, &str); 3] = [
        (job.as_str(), &small, "inputs must be [rows >= 1, 784]"),
        (job.as_str(), &garbage, "cannot tell what"),
        ("no-such-job", &pgm, "no-such-job"),
    ];
    for (key, file, says) in cases {
        let out = run(&["predict", key, "--input", file.to_str().unwrap(), "--orchestrator", &mesh.url], T).unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(says), "{err}");
    }
    // Without the maintainer token the mesh does not serve (exit 4).
    let args = ["predict", job.as_str(), "--input", pgm.to_str().unwrap(), "--orchestrator", &mesh.url];
    let out = run_bin_env("orchestrator", &args, &[("DCNR_TOKEN", "not-the-token")], T).unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
}

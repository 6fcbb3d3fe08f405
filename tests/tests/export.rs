//! A trained model leaves the mesh: `export` writes its parameters as safetensors with its
//! graph, and an independent forward pass in numpy over the test set gets the accuracy the job
//! reported.

use dcnr_tests::{Mesh, fixture, last_json, run};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("data")
}

#[test]
fn an_exported_model_gives_the_reported_accuracy_in_numpy() {
    let mesh = Mesh::start(2).unwrap();
    let s = mesh.submit_wait(&fixture("tiny-mlp.toml"), &["--steps", "200"]).unwrap();
    assert_eq!(s["status"], "succeeded", "{s}");
    let job = s["job_id"].as_str().unwrap();
    let out = tempfile::tempdir().unwrap();
    let store = mesh.artifacts.path().to_str().unwrap().to_string();
    let dir = out.path().join("model");
    let r =
        run(&["export", job, "--format", "safetensors", "-o", dir.to_str().unwrap(), "--store", &store, "--json"], T)
            .unwrap();
    assert_eq!(r.status.code(), Some(0), "{}", String::from_utf8_lossy(&r.stderr));
    let written = last_json(&r.stdout).unwrap();
    assert_eq!(written["tensors"], 4, "fc1 and fc2, weight and bias: {written}");
    assert_eq!(written["params_sha256"], s["params_sha256"]);

    let check = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python").join("check_export.py");
    let py = Command::new("python3").arg(&check).arg(&dir).arg(data_dir()).output().expect("python3 runs");
    let report = String::from_utf8_lossy(&py.stdout);
    assert!(py.status.success(), "{report}\n{}", String::from_utf8_lossy(&py.stderr));
    let report: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    assert_eq!(report["samples"], 10000);
    assert!(report["accuracy"].as_f64().unwrap() > 0.8, "{report}");

    // A job that does not exist, and a format nobody asked for, are clear errors.
    let missing = run(&["export", "no-such-job", "-o", dir.to_str().unwrap(), "--store", &store], T).unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no-such-job"));
    let bad = run(&["export", job, "--format", "onnx", "-o", dir.to_str().unwrap(), "--store", &store], T).unwrap();
    assert_eq!(bad.status.code(), Some(2), "clap refuses an unknown format");
}

/// Trains `model` with train-local and on a 2-PNode mesh, checks both give the same parameters
/// and accuracy, exports the mesh's job (which must hold `tensors` tensors), and checks the
/// export's accuracy in numpy.
fn mesh_equals_local_and_exports_to_numpy(model: &str, tensors: u64, min_accuracy: f64) {
    let model = fixture(model);
    let out = run(&["train-local", model.to_str().unwrap(), "--json"], T).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reference = last_json(&out.stdout).unwrap();
    let mesh = Mesh::start(2).unwrap();
    let s = mesh.submit_wait(&model, &[]).unwrap();
    assert_eq!(s["status"], "succeeded", "{s}");
    assert_eq!(s["params_sha256"], reference["params_sha256"], "mesh differs from train-local");
    assert_eq!(s["test_accuracy"], reference["test_accuracy"]);
    assert!(s["test_accuracy"].as_f64().unwrap() > min_accuracy, "{s}");

    let dir = tempfile::tempdir().unwrap();
    let store = mesh.artifacts.path().to_str().unwrap().to_string();
    let job = s["job_id"].as_str().unwrap();
    let target = dir.path().join("model");
    let r = run(&["export", job, "-o", target.to_str().unwrap(), "--store", &store, "--json"], T).unwrap();
    assert_eq!(r.status.code(), Some(0), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(last_json(&r.stdout).unwrap()["tensors"], tensors);
    let check = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python").join("check_export.py");
    let py = Command::new("python3").arg(&check).arg(&target).arg(data_dir()).output().expect("python3 runs");
    assert!(py.status.success(), "{}\n{}", String::from_utf8_lossy(&py.stdout), String::from_utf8_lossy(&py.stderr));
}

#[test]
fn joins_and_normalisation_train_on_the_mesh_bit_for_bit_and_export_to_numpy() {
    // layer_norm, dropout, a residual add and a concat. Tensors: fc1, norm, fc2 and head,
    // weight and bias.
    mesh_equals_local_and_exports_to_numpy("tiny-residual.toml", 8, 0.8);
}

#[test]
fn a_cnn_trains_on_the_mesh_bit_for_bit_and_exports_to_numpy() {
    // conv2d with padding and stride, max and average pooling and flatten; numpy's own
    // convolution of the exported filters. Tensors: conv1, conv2 and head, weight and bias.
    mesh_equals_local_and_exports_to_numpy("tiny-cnn.toml", 6, 0.7);
}

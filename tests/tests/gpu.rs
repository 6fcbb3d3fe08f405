//! GPU PNodes on real processes: `pnode --device gpu` on Mesa's lavapipe (a software Vulkan), so
//! the GPU code path runs in CI without a GPU.

use dcnr_tests::{Mesh, fixture, last_json, run};
use std::time::Duration;

fn local(extra: &[&str]) -> serde_json::Value {
    let tiny = fixture("tiny-mlp.toml");
    let mut args = vec!["train-local", tiny.to_str().unwrap(), "--steps", "60", "--json"];
    args.extend_from_slice(extra);
    let out = run(&args, Duration::from_secs(180)).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    last_json(&out.stdout).unwrap()
}

/// The PNodes of the mesh with a GPU, by id.
fn gpu_pnodes(mesh: &Mesh) -> Vec<String> {
    mesh.pnodes()
        .unwrap()
        .iter()
        .filter(|p| !p["gpu"].as_str().unwrap_or("").is_empty())
        .map(|p| {
            assert!(p["gpu_gflops"].as_f64().unwrap() > 0.0, "a GPU advertised without its speed: {p}");
            assert!(p["gpu_determinism_class"].as_str().unwrap().starts_with("wgpu/"), "{p}");
            p["pnode_id"].as_str().unwrap().to_string()
        })
        .collect()
}

/// One GPU PNode and two CPU PNodes (`--device auto`, which passes over a software adapter)
/// train one job together; the run repeats bit for bit, and differs from CPU-only training
/// because the GPU's VNodes computed on it.
#[test]
fn a_gpu_pnode_and_cpu_pnodes_train_together_and_repeat_bit_for_bit() {
    let mut mesh = Mesh::start(0).unwrap();
    // One core each, so the GPU PNode (lavapipe's speed counts for no more than its cores) is
    // the strongest and takes the heaviest run, the first linear layer.
    for _ in 0..2 {
        mesh.add_pnode_with(&["--cores", "1"]).unwrap();
    }
    mesh.wait_for_pnodes(2).unwrap();
    assert!(gpu_pnodes(&mesh).is_empty(), "--device auto took a software adapter");
    mesh.add_pnode_with(&["--device", "gpu"]).unwrap();
    mesh.wait_for_pnodes(3).unwrap();
    let gpus = gpu_pnodes(&mesh);
    assert_eq!(gpus.len(), 1, "{:?}", mesh.pnodes().unwrap());
    let job = ["--steps", "60", "--in-flight", "1"];
    let a = mesh.submit_wait(&fixture("tiny-mlp.toml"), &job).unwrap();
    assert_eq!(a["status"], "succeeded", "{a}");
    let hosts: Vec<&str> = a["vnodes"].as_array().unwrap().iter().map(|v| v["pnode"].as_str().unwrap()).collect();
    assert_eq!(a["vnodes"][0]["kind"], "linear", "{a}");
    assert_eq!(hosts[0], gpus[0], "the first linear layer is not on the GPU PNode: {hosts:?}");
    assert!(hosts.iter().any(|h| *h != gpus[0]), "no VNode on a CPU PNode: {hosts:?}");
    assert!(a["test_accuracy"].as_f64().unwrap() > 0.7, "{a}");
    let b = mesh.submit_wait(&fixture("tiny-mlp.toml"), &job).unwrap();
    assert_eq!(a["params_sha256"], b["params_sha256"], "GPU training did not repeat");
    assert_ne!(a["params_sha256"], local(&[])["params_sha256"], "the GPU PNode computed on its CPU");
    // A job that asks for CPUs keeps off the GPU, and gives the CPU reference's bits.
    let cpu = mesh.submit_wait(&fixture("tiny-mlp.toml"), &[&job[..], &["--target", "cpu"]].concat()).unwrap();
    assert_eq!(cpu["params_sha256"], local(&[])["params_sha256"], "{cpu}");
}

/// GPU PNodes of one class reproduce the single-process trainer on the same GPU bit for bit,
/// as CPU PNodes reproduce the CPU one.
#[test]
fn gpu_pnodes_reproduce_train_local_on_the_gpu() {
    let mut mesh = Mesh::start(0).unwrap();
    for _ in 0..2 {
        mesh.add_pnode_with(&["--device", "gpu"]).unwrap();
    }
    mesh.wait_for_pnodes(2).unwrap();
    assert_eq!(gpu_pnodes(&mesh).len(), 2);
    let s = mesh.submit_wait(&fixture("tiny-mlp.toml"), &["--steps", "60", "--in-flight", "1"]).unwrap();
    assert_eq!(s["status"], "succeeded", "{s}");
    assert_eq!(s["pnodes"], 2, "{s}");
    let want = local(&["--gpu"]);
    assert_eq!(s["params_sha256"], want["params_sha256"], "GPU mesh {s} vs train-local --gpu {want}");
    assert_eq!(s["test_accuracy"], want["test_accuracy"]);
}

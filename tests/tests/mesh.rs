//! End-to-end training on real orchestrator and pnode processes over loopback gRPC.

use dcnr_tests::{Mesh, fixture, last_json, run};
use std::time::Duration;

fn local(steps: &str) -> serde_json::Value {
    let out = run(
        &["train-local", fixture("tiny-mlp.toml").to_str().unwrap(), "--steps", steps, "--json"],
        Duration::from_secs(120),
    )
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    last_json(&out.stdout).unwrap()
}

#[test]
fn mesh_trains_and_matches_the_single_process_reference_bit_for_bit() {
    let reference = local("200");
    let want = reference["params_sha256"].as_str().unwrap().to_string();
    for pnodes in [1usize, 2, 3] {
        let mesh = Mesh::start(pnodes).unwrap();
        let short = mesh.submit_wait(&fixture("tiny-mlp.toml"), &["--steps", "10"]).unwrap();
        let s = mesh.submit_wait(&fixture("tiny-mlp.toml"), &["--steps", "200", "--in-flight", "1"]).unwrap();
        assert_eq!(s["status"], "succeeded", "{s}");
        assert_eq!(s["steps"], 200);
        assert_eq!(s["pnodes"], pnodes.min(4) as u64, "VNodes spread over every pnode: {s}");
        assert_eq!(s["params_sha256"].as_str().unwrap(), want, "mesh of {pnodes} differs from train-local");
        assert_eq!(s["test_accuracy"], reference["test_accuracy"]);
        let (early, late) = (short["test_loss"].as_f64().unwrap(), s["test_loss"].as_f64().unwrap());
        assert!(late < early * 0.8, "test loss should fall with training: {early} -> {late}");
        assert!(s["test_accuracy"].as_f64().unwrap() > 0.8, "{s}");
        for key in ["job_id", "status", "steps", "test_accuracy", "wall_s", "samples_per_s", "pnodes", "params_sha256"]
        {
            assert!(s.get(key).is_some(), "summary lacks {key}");
        }
    }
}

#[test]
fn pipelined_training_is_identical_from_run_to_run() {
    let mesh = Mesh::start(3).unwrap();
    let a = mesh.submit_wait(&fixture("tiny-mlp.toml"), &["--steps", "120", "--in-flight", "4"]).unwrap();
    let b = mesh.submit_wait(&fixture("tiny-mlp.toml"), &["--steps", "120", "--in-flight", "4"]).unwrap();
    assert_eq!(a["status"], "succeeded");
    assert_eq!(a["in_flight"], 4);
    assert_eq!(a["params_sha256"], b["params_sha256"]);
    // The gradient delay of a pipelined run is part of its definition, so it differs from
    // synchronous training by design.
    assert_ne!(a["params_sha256"], local("120")["params_sha256"]);
    // SGD with momentum 0.9 and a gradient delay of 3 learns more slowly than synchronous SGD
    // over 120 steps; it must still learn.
    assert!(a["test_accuracy"].as_f64().unwrap() > 0.4, "{a}");
    let jobs = run(&["jobs", "--json", "--orchestrator", &mesh.url], Duration::from_secs(10)).unwrap();
    let jobs: serde_json::Value = serde_json::from_slice(&jobs.stdout).unwrap();
    let jobs = jobs.as_array().unwrap();
    assert_eq!(jobs.len(), 2);
    assert!(jobs.iter().all(|j| j["state"] == "succeeded"), "{jobs:?}");
}

#[test]
fn a_training_recipe_trains_on_the_mesh_bit_for_bit() {
    // A GELU, AdamW, warm-up and cosine decay, gradient clipping and label smoothing: every VNode
    // applies them from its own step count, so the mesh still equals the single process.
    let recipe = fixture("tiny-mlp-recipe.toml");
    let out = run(&["train-local", recipe.to_str().unwrap(), "--json"], Duration::from_secs(120)).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reference = last_json(&out.stdout).unwrap();
    assert_ne!(reference["params_sha256"], local("100")["params_sha256"], "the recipe changes training");
    let mesh = Mesh::start(2).unwrap();
    let s = mesh.submit_wait(&recipe, &[]).unwrap();
    assert_eq!(s["status"], "succeeded", "{s}");
    assert_eq!(s["params_sha256"], reference["params_sha256"], "mesh differs from train-local");
    assert_eq!(s["test_accuracy"], reference["test_accuracy"]);
    assert!(s["test_accuracy"].as_f64().unwrap() > 0.8, "{s}");
}

//! Local training mode with real processes: a mesh equals `train-local` bit for bit whatever
//! `in_flight` is, a killed PNode costs time but not correctness, and replicas catch a cheater,
//! as in exact mode.

use dcnr_tests::{Mesh, fixture, last_json, run};
use std::time::Duration;

const T: Duration = Duration::from_secs(180);

/// A job envelope for the local-mode fixture: `steps` steps, then the extra TOML tables given.
fn envelope(dir: &std::path::Path, steps: u64, extra: &str) -> std::path::PathBuf {
    let p = dir.join("job.toml");
    let model = fixture("tiny-local-mlp.toml");
    std::fs::write(&p, format!("[op]\nmodel = {:?}\nsteps = {steps}\n{extra}\n", model.to_str().unwrap())).unwrap();
    p
}

/// The summary of `train-local` on `file` with extra flags.
fn train_local(file: &std::path::Path, extra: &[&str]) -> serde_json::Value {
    let f = file.to_str().unwrap();
    let out = run(&[&["train-local", f, "--json"], extra].concat(), T).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    last_json(&out.stdout).unwrap()
}

#[test]
fn local_mode_mesh_with_eight_in_flight_equals_train_local() {
    let model = fixture("tiny-local-mlp.toml");
    let reference = train_local(&model, &["--steps", "300"]);
    let want = reference["params_sha256"].as_str().unwrap();
    // Its result does not depend on in_flight, so the reference may say any.
    assert_eq!(train_local(&model, &["--steps", "300", "--in-flight", "8"])["params_sha256"], want);
    let exact = train_local(&model, &["--steps", "300", "--mode", "exact"]);
    assert_ne!(exact["params_sha256"], want, "local learning is not end-to-end backpropagation");

    let mesh = Mesh::start(3).unwrap();
    let s = mesh.submit_wait(&model, &["--steps", "300", "--in-flight", "8"]).unwrap();
    assert_eq!(s["status"], "succeeded", "{s}");
    assert_eq!(s["in_flight"], 8);
    assert_eq!(s["pnodes"], 3, "{s}");
    assert_eq!(s["params_sha256"].as_str().unwrap(), want, "{s}");
    assert_eq!(s["test_accuracy"], reference["test_accuracy"]);
    assert!(s["test_accuracy"].as_f64().unwrap() > 0.8, "{s}");
    // The heads' parameters are part of the model: the block outputs act1 and act2 hold some,
    // the other activation-free nodes none.
    let empty = dcnr_tests::sha256_hex(b"");
    let hashes: Vec<&str> =
        s["vnodes"].as_array().unwrap().iter().map(|v| v["params_sha256"].as_str().unwrap()).collect();
    assert!(hashes[1] != empty && hashes[3] != empty && hashes[5] == empty, "{s}");
}

#[test]
fn local_mode_survives_a_killed_pnode_with_the_same_result() {
    let dir = tempfile::tempdir().unwrap();
    let env = envelope(dir.path(), 1500, "in_flight = 8\n[checkpoint]\nevery_steps = 200\n[policy]\ntimeout_s = 150");
    let want = train_local(&env, &[])["params_sha256"].as_str().unwrap().to_string();
    let mut mesh = Mesh::start(4).unwrap();
    let out = mesh.submit_killing_one(&env, 500, T).unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let s = last_json(&out.stdout).unwrap();
    assert_eq!(s["status"], "succeeded", "{s}");
    assert_eq!(s["params_sha256"], want.as_str(), "a run with a failure must end like a fault-free one: {s}");
    assert!(!s["recoveries"].as_array().cloned().unwrap_or_default().is_empty(), "{s}");
}

/// Runs a `verify = "full"` local-mode job on three honest PNodes plus, if `fault` is given, one
/// cheater; returns the summary, the verification record, the reference and the cheater's id.
fn verified(fault: Option<&str>) -> (serde_json::Value, serde_json::Value, serde_json::Value, Option<String>) {
    let mut mesh = Mesh::start_with(0, &[], &[]).unwrap();
    for i in 0..3 {
        mesh.add_pnode_with(&["--name", &format!("honest-{i}")]).unwrap();
    }
    if let Some(f) = fault {
        // Claiming the most cores puts it in the job's own execution, not only in replicas.
        mesh.add_pnode_with(&["--name", "odd", "--fault", f, "--cores", "64"]).unwrap();
    }
    let total = 3 + usize::from(fault.is_some());
    mesh.wait_for_pnodes(total).unwrap();
    let pnodes = run(&["pnodes", "--json", "--orchestrator", &mesh.url], T).unwrap();
    let pnodes: serde_json::Value = serde_json::from_slice(&pnodes.stdout).unwrap();
    let odd = pnodes.as_array().unwrap().iter().find(|p| p["name"] == "odd").map(|p| p["pnode_id"].clone());
    let dir = tempfile::tempdir().unwrap();
    let policy = format!("in_flight = 4\n[policy]\nmin_pnodes = {total}\nverify = \"full\"\nsegment_steps = 50");
    let env = envelope(dir.path(), 300, &policy);
    let summary = mesh.submit_wait(&env, &[]).unwrap();
    let verification = mesh.artifact(summary["job_id"].as_str().unwrap(), "verification.json").unwrap();
    let reference = train_local(&env, &[]);
    let standing = run(&["pnodes", "--json", "--orchestrator", &mesh.url], T).unwrap();
    let standing: serde_json::Value = serde_json::from_slice(&standing.stdout).unwrap();
    let odd = odd.map(|id| {
        let p = standing.as_array().unwrap().iter().find(|p| p["pnode_id"] == id).unwrap();
        assert_eq!(p["standing"], "quarantined", "{standing}\n{verification}");
        id.as_str().unwrap().to_string()
    });
    (summary, verification, reference, odd)
}

#[test]
fn replicas_verify_local_mode_and_catch_a_cheater() {
    let (s, v, reference, _) = verified(None);
    assert_eq!(s["status"], "succeeded", "{s}");
    assert_eq!(s["params_sha256"], reference["params_sha256"], "{s}\n{v}");
    assert!(v["segments_checked"].as_u64().unwrap() >= 6, "{v}");
    assert_eq!(v["mismatches"].as_array().map(Vec::len), Some(0), "{v}");
    assert_eq!(v["quarantines"].as_array().map(Vec::len), Some(0), "{v}");

    let (s, v, reference, cheat) = verified(Some("corrupt"));
    let cheat = cheat.unwrap();
    assert_eq!(s["params_sha256"], reference["params_sha256"], "the cheater leaves no trace: {s}\n{v}");
    let q = v["quarantines"].as_array().unwrap();
    assert_eq!(q.len(), 1, "{v}");
    assert_eq!(q[0]["pnode"], cheat.as_str(), "{v}");
    for m in v["mismatches"].as_array().unwrap().iter().chain(v["invalid_results"].as_array().unwrap()) {
        assert_eq!(m["pnode"], cheat.as_str(), "{v}");
    }
}

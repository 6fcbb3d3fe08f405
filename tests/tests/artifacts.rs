//! Job envelopes, content-addressed artifacts, records of failed jobs, and replay.

use dcnr_tests::{Mesh, fixture, last_json, run};
use std::path::Path;
use std::time::Duration;

fn store_json(store: &Path, hash: &str) -> serde_json::Value {
    let bytes = std::fs::read(store.join("objects").join(&hash[..2]).join(hash)).unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn record(store: &Path, job: &str) -> serde_json::Value {
    let hash = std::fs::read_to_string(store.join("refs/jobs").join(job)).unwrap();
    store_json(store, hash.trim())
}

#[test]
fn envelope_job_writes_artifacts_and_replays_bit_for_bit() {
    let mesh = Mesh::start(2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join("job.json");
    let model = std::fs::read_to_string(fixture("tiny-mlp.toml")).unwrap();
    let envelope = serde_json::json!({
        "ctx": { "job_id": "envelope-run-1", "run_id": "exp-7", "labels": { "who": "test" } },
        "op": { "model_toml": model, "steps": 40, "batch_size": 16 },
        "policy": { "min_pnodes": 2, "max_pnodes": 2, "timeout_s": 120, "verify": "none" },
        "seed": { "mode": "derived" },
        "artifacts": { "persist": true }
    });
    std::fs::write(&env, envelope.to_string()).unwrap();
    let s = mesh.submit_wait(&env, &[]).unwrap();
    assert_eq!(s["job_id"], "envelope-run-1");
    assert_eq!(s["status"], "succeeded");
    assert_eq!(s["batch_size"], 16);
    assert_eq!(s["pnodes"], 2);

    // The same envelope in one process gives the same parameters (derived seed included).
    let local = run(&["train-local", env.to_str().unwrap(), "--json"], Duration::from_secs(120)).unwrap();
    assert!(local.status.success(), "{}", String::from_utf8_lossy(&local.stderr));
    assert_eq!(last_json(&local.stdout).unwrap()["params_sha256"], s["params_sha256"]);

    let store = mesh.artifacts.path();
    let rec = record(store, "envelope-run-1");
    for name in ["result.json", "executions.json", "metrics.json", "envelope.json"] {
        let hash = rec["artifacts"][name].as_str().unwrap();
        let bytes = std::fs::read(store.join("objects").join(&hash[..2]).join(hash)).unwrap();
        let digest = dcnr_tests::sha256_hex(&bytes);
        assert_eq!(digest, hash, "{name} is stored under the hash of its bytes");
    }
    let exec = store_json(store, rec["artifacts"]["executions.json"].as_str().unwrap());
    let vnodes = exec["vnodes"].as_array().unwrap();
    assert_eq!(vnodes.len(), 4);
    for v in vnodes {
        assert_eq!(v["steps"], 40);
        assert_eq!(v["output_sha256"].as_array().unwrap().len(), 40);
        assert!(v["pnode"].as_str().unwrap().starts_with("pn-"));
        assert!(v["bytes_in"].as_u64().unwrap() > 0);
    }
    let metrics = store_json(store, rec["artifacts"]["metrics.json"].as_str().unwrap());
    assert_eq!(metrics["train_loss"].as_array().unwrap().len(), 40);
    let recorded_env = store_json(store, rec["artifacts"]["envelope.json"].as_str().unwrap());
    assert!(recorded_env["seed"]["value"].is_u64(), "the derived seed is recorded: {recorded_env}");

    // Replay by the result's hash reproduces every recorded hash.
    let result_hash = rec["artifacts"]["result.json"].as_str().unwrap().to_string();
    let art = store.to_str().unwrap();
    let out = run(&["replay", &result_hash, "--store", art], Duration::from_secs(180)).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("recorded hashes reproduced"), "{stdout}");

    // A record whose result was tampered with is caught, and the replay names what differs.
    let mut result = store_json(store, &result_hash);
    result["summary"]["params_sha256"] = serde_json::json!("0".repeat(64));
    let forged = serde_json::to_vec(&result).unwrap();
    let forged_hash = dcnr_tests::sha256_hex(&forged);
    let obj = store.join("objects").join(&forged_hash[..2]);
    std::fs::create_dir_all(&obj).unwrap();
    std::fs::write(obj.join(&forged_hash), &forged).unwrap();
    let mut rec2 = rec.clone();
    rec2["artifacts"]["result.json"] = serde_json::json!(forged_hash);
    let rec2 = serde_json::to_vec(&rec2).unwrap();
    let rec2_hash = dcnr_tests::sha256_hex(&rec2);
    let obj = store.join("objects").join(&rec2_hash[..2]);
    std::fs::create_dir_all(&obj).unwrap();
    std::fs::write(obj.join(&rec2_hash), &rec2).unwrap();
    let out = run(&["replay", &rec2_hash, "--store", art], Duration::from_secs(180)).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("summary.params_sha256"), "{stdout}");
}

#[test]
fn a_job_that_cannot_run_still_leaves_a_record() {
    let mesh = Mesh::start(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join("job.toml");
    std::fs::write(
        &env,
        format!(
            "[ctx]\njob_id = \"needs-five\"\n[op]\nmodel = {:?}\n[policy]\nmin_pnodes = 5\nmax_pnodes = 5\ntimeout_s = 2\n",
            fixture("tiny-mlp.toml").to_str().unwrap()
        ),
    )
    .unwrap();
    let out = mesh.submit_raw(&env, &[]).unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let s = last_json(&out.stdout).unwrap();
    assert_eq!(s["status"], "failed");
    assert!(s["error"].as_str().unwrap().contains("at least 5"), "{s}");
    let rec = record(mesh.artifacts.path(), "needs-five");
    assert_eq!(rec["status"], "failed");
    assert_eq!(rec["error_code"], "placement");
    assert!(rec["artifacts"]["result.json"].is_string());
}

#[test]
fn unknown_envelope_fields_are_rejected_by_name() {
    let mesh = Mesh::start(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join("job.toml");
    std::fs::write(&env, "[op]\nmodel = \"m.toml\"\n[policy]\nverfy = \"full\"\n").unwrap();
    let out = mesh.submit_raw(&env, &[]).unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("verfy"), "{}", String::from_utf8_lossy(&out.stderr));
}

//! Data-parallel pipelines with real processes: R copies of a graph on PNodes of their own,
//! averaging over their VNode-to-VNode streams, equal `train-local` bit for bit; a killed PNode
//! costs time but not the result; a copy that lies about its changes is caught by the round
//! check and the job ends as an honest run would.

use dcnr_tests::{Mesh, fixture, last_json, run};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

const T: Duration = Duration::from_secs(180);

/// The tiny MLP with `[training.outer]` set to `outer`, written into `dir`.
fn model(dir: &Path, outer: &str) -> PathBuf {
    let text = std::fs::read_to_string(fixture("tiny-mlp.toml")).unwrap();
    let p = dir.join("pipelined.toml");
    std::fs::write(&p, format!("{text}\n[training.outer]\n{outer}\n")).unwrap();
    p
}

/// A job envelope for `model`: `[op]` naming it, then `op` (more of `[op]`, other tables).
fn job(dir: &Path, model: &Path, op: &str) -> PathBuf {
    let p = dir.join("job.toml");
    std::fs::write(&p, format!("[op]\nmodel = {:?}\n{op}", model.to_str().unwrap())).unwrap();
    p
}

/// The summary of `train-local` on `file` with extra flags.
fn train_local(file: &Path, extra: &[&str]) -> serde_json::Value {
    let f = file.to_str().unwrap();
    let out = run(&[&["train-local", f, "--json"], extra].concat(), T).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    last_json(&out.stdout).unwrap()
}

/// The PNodes hosting each pipeline's VNodes (names `x`, `x@p1`, ...).
fn hosts_by_pipeline(s: &serde_json::Value) -> Vec<BTreeSet<String>> {
    let mut by: Vec<BTreeSet<String>> = Vec::new();
    for v in s["vnodes"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        let p: usize = name.rsplit_once("@p").map_or(0, |(_, p)| p.parse().unwrap());
        if by.len() <= p {
            by.resize(p + 1, BTreeSet::new());
        }
        by[p].insert(v["pnode"].as_str().unwrap().to_string());
    }
    by
}

#[test]
fn pipelines_equal_train_local_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = Mesh::start(3).unwrap();
    let cases: [(&str, &[&str]); 2] = [
        ("kind = \"nesterov\"", &["--steps", "400", "--pipelines", "2", "--sync-every", "15"]),
        (
            "kind = \"average\"\nwire = \"int8\"",
            &["--steps", "390", "--pipelines", "3", "--sync-every", "20", "--mode", "local", "--in-flight", "4"],
        ),
    ];
    for (outer, flags) in cases {
        let file = model(dir.path(), outer);
        let reference = train_local(&file, flags);
        let want = reference["params_sha256"].as_str().unwrap();
        let s = mesh.submit_wait(&file, flags).unwrap();
        assert_eq!(s["status"], "succeeded", "{s}");
        assert_eq!(s["params_sha256"].as_str().unwrap(), want, "{outer}: {s}");
        assert_eq!(s["test_accuracy"], reference["test_accuracy"], "{s}");
        assert!(s["test_accuracy"].as_f64().unwrap() > 0.8, "{s}");
        let r = s["pipelines"].as_u64().unwrap();
        assert_eq!(r as usize, flags[3].parse::<usize>().unwrap(), "{s}");
        assert_eq!(s["rounds"], reference["rounds"], "{s}");
        assert!(s["rounds"].as_u64().unwrap() >= 6, "{s}");
        // Every copy ends with the same parameters as pipeline 0.
        let vnodes = s["vnodes"].as_array().unwrap();
        let n = vnodes.len() / r as usize;
        for (i, v) in vnodes.iter().enumerate() {
            assert_eq!(v["params_sha256"], vnodes[i % n]["params_sha256"], "{s}");
        }
        // `orchestrator jobs` names the pipelines, their rounds and who is in each.
        let jobs = mesh.jobs().unwrap();
        let row = jobs.iter().find(|j| j["job_id"] == s["job_id"]).unwrap();
        assert_eq!(row["pipelines"], r, "{row}");
        assert_eq!(row["rounds"], s["rounds"], "{row}");
        // Each pipeline on PNodes of its own.
        let hosts = hosts_by_pipeline(&s);
        let members: Vec<BTreeSet<String>> = row["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect())
            .collect();
        assert_eq!(members, hosts, "{row}");
        assert_eq!(hosts.len(), r as usize, "{s}");
        for a in 0..hosts.len() {
            for b in a + 1..hosts.len() {
                assert!(hosts[a].is_disjoint(&hosts[b]), "pipelines {a} and {b} share a pnode: {hosts:?}");
            }
        }
    }
}

#[test]
fn a_killed_pnode_costs_time_not_the_result() {
    let dir = tempfile::tempdir().unwrap();
    let file = model(dir.path(), "kind = \"nesterov\"");
    let op = "steps = 3000\npipelines = 2\nsync_every = 25\n[checkpoint]\nevery_steps = 200\n[policy]\ntimeout_s = 150";
    let env = job(dir.path(), &file, op);
    let want = train_local(&env, &[])["params_sha256"].as_str().unwrap().to_string();
    let mut mesh = Mesh::start(3).unwrap();
    let out = mesh.submit_killing_one(&env, 400, T).unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let s = last_json(&out.stdout).unwrap();
    assert_eq!(s["status"], "succeeded", "{s}");
    assert_eq!(s["params_sha256"], want.as_str(), "a run with a failure must end like a fault-free one: {s}");
    assert!(!s["recoveries"].as_array().cloned().unwrap_or_default().is_empty(), "{s}");
}

#[test]
fn a_copy_that_lies_about_its_changes_is_caught_by_the_round_check() {
    let dir = tempfile::tempdir().unwrap();
    let file = model(dir.path(), "kind = \"average\"");
    let flags = ["--steps", "600", "--pipelines", "3", "--sync-every", "10"];
    let want = train_local(&file, &flags)["params_sha256"].as_str().unwrap().to_string();
    let mut mesh = Mesh::start_with(0, &[], &[]).unwrap();
    for i in 0..3 {
        mesh.add_pnode_with(&["--name", &format!("honest-{i}")]).unwrap();
    }
    // Claiming the most cores puts it in the job's own execution.
    mesh.add_pnode_with(&["--name", "odd", "--fault", "corrupt", "--cores", "64"]).unwrap();
    mesh.wait_for_pnodes(4).unwrap();
    let pnodes = run(&["pnodes", "--json", "--orchestrator", &mesh.url], T).unwrap();
    let pnodes: serde_json::Value = serde_json::from_slice(&pnodes.stdout).unwrap();
    let odd = pnodes.as_array().unwrap().iter().find(|p| p["name"] == "odd").unwrap()["pnode_id"].clone();
    let s = mesh.submit_wait(&file, &flags).unwrap();
    assert_eq!(s["status"], "succeeded", "{s}");
    assert_eq!(s["params_sha256"], want.as_str(), "the liar leaves no trace: {s}");
    let hosts: BTreeSet<String> = hosts_by_pipeline(&s).into_iter().flatten().collect();
    assert!(!hosts.contains(odd.as_str().unwrap()), "the liar is no longer used: {s}");
    let v = mesh.artifact(s["job_id"].as_str().unwrap(), "verification.json").unwrap();
    let invalid = v["invalid_results"].as_array().unwrap();
    assert!(!invalid.is_empty(), "{v}");
    assert!(invalid.iter().all(|i| i["pnode"] == odd), "only the liar is blamed: {v}");
    assert!(
        invalid.iter().any(|i| i["reason"].as_str().unwrap().contains("disagree")),
        "the round check caught it: {v}"
    );
}

#[test]
fn a_pnode_that_joins_takes_a_pipeline_without_changing_the_result() {
    let dir = tempfile::tempdir().unwrap();
    let file = model(dir.path(), "kind = \"nesterov\"");
    let flags = ["--steps", "6000", "--pipelines", "2", "--sync-every", "25"];
    let want = train_local(&file, &flags)["params_sha256"].as_str().unwrap().to_string();
    // One PNode: both pipelines share it.
    let mut mesh = Mesh::start(1).unwrap();
    let f = file.to_str().unwrap();
    let job = mesh
        .spawn_cli(&[&["submit", f, "--orchestrator", &mesh.url, "--wait", "--json"][..], &flags].concat())
        .unwrap();
    mesh.wait_for_step(300, T).unwrap();
    mesh.add_pnode().unwrap();
    let out = job.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let s = last_json(&out.stdout).unwrap();
    assert_eq!(s["status"], "succeeded", "{s}");
    assert_eq!(s["params_sha256"], want.as_str(), "moving pipelines changes nothing: {s}");
    let recoveries = s["recoveries"].as_array().cloned().unwrap_or_default();
    let spread = recoveries.iter().find(|r| r["reason"].as_str().unwrap_or("").contains("spreading"));
    let spread = spread.unwrap_or_else(|| panic!("no spreading recovery: {s}"));
    // How long the move took (snapshot to the first step on the new placement), for the record.
    eprintln!("spread: {spread}");
    let hosts = hosts_by_pipeline(&s);
    assert!(hosts[0].is_disjoint(&hosts[1]), "the new pnode took a pipeline: {hosts:?}");
}

#[test]
fn replicas_verify_segments_of_a_pipelined_job() {
    let dir = tempfile::tempdir().unwrap();
    let file = model(dir.path(), "kind = \"nesterov\"");
    let op =
        "steps = 400\npipelines = 2\nsync_every = 20\n[policy]\nmin_pnodes = 4\nverify = \"full\"\nsegment_steps = 50";
    let env = job(dir.path(), &file, op);
    let want = train_local(&env, &[])["params_sha256"].as_str().unwrap().to_string();
    let mesh = Mesh::start(4).unwrap();
    let s = mesh.submit_wait(&env, &[]).unwrap();
    assert_eq!(s["status"], "succeeded", "{s}");
    assert_eq!(s["params_sha256"], want.as_str(), "{s}");
    let v = mesh.artifact(s["job_id"].as_str().unwrap(), "verification.json").unwrap();
    // 200 steps a pipeline in segments of 50: every segment re-executed by a replica, both
    // copies in it, and every replica agreed.
    assert!(v["segments_checked"].as_u64().unwrap() >= 4, "{v}");
    assert_eq!(v["mismatches"].as_array().map(Vec::len), Some(0), "{v}");
    assert_eq!(v["invalid_results"].as_array().map(Vec::len), Some(0), "{v}");
}

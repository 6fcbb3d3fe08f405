//! Redundant execution with real processes: a cheating PNode among honest ones is outvoted,
//! named, quarantined, and leaves no trace in the trained model; honest meshes see no false
//! positives; every job leaves a verification report.

use dcnr_tests::{Mesh, fixture, run, run_bin};
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

/// What one verified run left behind.
struct Outcome {
    summary: serde_json::Value,
    verification: serde_json::Value,
    pnodes: Vec<serde_json::Value>,
    reference: serde_json::Value,
    cheat_id: Option<String>,
    /// The mesh's event log, from the dashboard API.
    events: Vec<serde_json::Value>,
}

/// Runs `steps` of the tiny MLP on `honest` honest PNodes plus one started with the flags `odd`
/// (if any), under the `[policy]` lines given.
fn run_job(honest: usize, odd: Option<&[&str]>, steps: u64, policy: &str) -> Outcome {
    let mut mesh = Mesh::start_with(0, &["--dashboard", "127.0.0.1:0"], &[]).unwrap();
    for i in 0..honest {
        mesh.add_pnode_with(&["--name", &format!("honest-{i}")]).unwrap();
    }
    if let Some(flags) = odd {
        mesh.add_pnode_with(&[&["--name", "odd"], flags].concat()).unwrap();
    }
    let total = honest + usize::from(odd.is_some());
    mesh.wait_for_pnodes(total).unwrap();
    let pnodes = |mesh: &Mesh| -> Vec<serde_json::Value> {
        let out = run(&["pnodes", "--json", "--orchestrator", &mesh.url], T).unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap().as_array().cloned().unwrap_or_default()
    };
    let cheat_id = odd.map(|_| {
        let all = pnodes(&mesh);
        let p = all.iter().find(|p| p["name"] == "odd").unwrap();
        p["pnode_id"].as_str().unwrap().to_string()
    });

    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join("job.toml");
    let model = fixture("tiny-mlp.toml");
    std::fs::write(
        &env,
        format!(
            "[op]\nmodel = {:?}\nsteps = {steps}\n[policy]\nmin_pnodes = {total}\n{policy}\n",
            model.to_str().unwrap()
        ),
    )
    .unwrap();
    let out = mesh.submit_raw(&env, &[]).unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let summary = dcnr_tests::last_json(&out.stdout).unwrap();
    let reference = run_bin("orchestrator", &["train-local", env.to_str().unwrap(), "--json"], T).unwrap();
    let reference = dcnr_tests::last_json(&reference.stdout).unwrap();

    let verification = mesh.artifact(summary["job_id"].as_str().unwrap(), "verification.json").unwrap();
    let dash = mesh.dashboard.clone().unwrap();
    let events = dcnr_tests::get_json(&format!("{dash}api/events")).unwrap().as_array().cloned().unwrap_or_default();
    Outcome { summary, verification, pnodes: pnodes(&mesh), reference, cheat_id, events }
}

fn standing<'a>(o: &'a Outcome, id: &str) -> &'a str {
    o.pnodes.iter().find(|p| p["pnode_id"] == id).and_then(|p| p["standing"].as_str()).unwrap_or("?")
}

/// Policy `full` against one cheater: it is quarantined, the model is the fault-free one, and
/// the report says when and why.
fn full_catches(fault: &str) {
    // Claiming the most cores puts it in the job's own execution, not only in replicas.
    let o = run_job(3, Some(&["--fault", fault, "--cores", "64"]), 400, "verify = \"full\"\nsegment_steps = 50");
    let cheat = o.cheat_id.clone().unwrap();
    assert_eq!(o.summary["params_sha256"], o.reference["params_sha256"], "{}\n{}", o.summary, o.verification);
    assert_eq!(standing(&o, &cheat), "quarantined", "{:?}\n{}", o.pnodes, o.verification);
    let v = &o.verification;
    let q = v["quarantines"].as_array().unwrap();
    assert!(q.iter().any(|q| q["pnode"] == cheat.as_str()), "{v}");
    // Nobody else is quarantined, and every mismatch or refused result names the cheater.
    assert_eq!(q.len(), 1, "{v}");
    for m in v["mismatches"].as_array().unwrap().iter().chain(v["invalid_results"].as_array().unwrap()) {
        assert_eq!(m["pnode"], cheat.as_str(), "{v}");
    }
    assert!(v["segments_checked"].as_u64().unwrap() >= 8, "every segment is checked under full: {v}");
    let at = q[0]["at_step"].as_u64().unwrap();
    assert!(at <= 400, "{v}");
    eprintln!(
        "{fault}: quarantined at step {at}; {} mismatches, {} arbiters",
        v["mismatches"].as_array().unwrap().len(),
        v["arbiters"]
    );
    for p in o.pnodes.iter().filter(|p| p["pnode_id"] != cheat.as_str()) {
        assert_eq!(p["standing"], "new", "{p}");
    }
    // The quarantine is in the mesh's event log, naming the identity.
    let quarantined: Vec<_> = o.events.iter().filter(|e| e["kind"] == "pnode_quarantined").collect();
    assert_eq!(quarantined.len(), 1, "{:?}", o.events);
    assert_eq!(quarantined[0]["pnode"], cheat.as_str(), "{:?}", quarantined);
}

#[test]
fn full_replication_quarantines_a_corrupting_pnode() {
    full_catches("corrupt");
}

#[test]
fn full_replication_quarantines_a_sign_flipping_pnode() {
    full_catches("sign-flip");
}

#[test]
fn full_replication_quarantines_a_nan_pnode() {
    full_catches("nan");
}

#[test]
fn full_replication_quarantines_a_lazy_pnode() {
    full_catches("lazy");
}

#[test]
fn a_spotcheck_catches_a_cheater_that_corrupts_everything() {
    let cheat = ["--fault", "corrupt", "--cores", "64"];
    let o = run_job(3, Some(&cheat), 1000, "verify = \"spotcheck\"\nspotcheck_fraction = 0.1\nsegment_steps = 20");
    let cheat = o.cheat_id.clone().unwrap();
    let v = &o.verification;
    assert_eq!(o.summary["params_sha256"], o.reference["params_sha256"], "{}\n{v}", o.summary);
    let mismatches = v["mismatches"].as_array().unwrap();
    assert!(!mismatches.is_empty(), "{v}");
    assert!(mismatches.iter().all(|m| m["pnode"] == cheat.as_str()), "{v}");
    let checked = v["segments_checked"].as_u64().unwrap();
    let unchecked = v["segments_unchecked"].as_u64().unwrap();
    assert!(unchecked > checked, "a 10% spot check leaves most segments unchecked: {v}");
    // The job itself ran on the cheater and had to go back past its unchecked work.
    let recoveries = o.summary["recoveries"].as_array().unwrap();
    assert!(recoveries.iter().any(|r| r["reason"].as_str().unwrap().contains(&cheat)), "{}", o.summary);
    eprintln!("spotcheck 10%: first mismatch at step {}; {checked} checked, {unchecked} not", mismatches[0]["step"]);
}

#[test]
fn honest_meshes_have_no_false_positives() {
    // Segments of 10 steps under `full` outrun their replicas, so the job also waits at
    // boundaries for them: that must not look like a stall either.
    for policy in [
        "verify = \"full\"\nsegment_steps = 10",
        "verify = \"spotcheck\"\nspotcheck_fraction = 0.5\nsegment_steps = 40",
    ] {
        let o = run_job(4, None, 200, policy);
        let v = &o.verification;
        assert_eq!(o.summary["params_sha256"], o.reference["params_sha256"], "{policy}: {}\n{v}", o.summary);
        assert!(v["segments_checked"].as_u64().unwrap() >= 1, "{policy}: {v}");
        assert_eq!(v["mismatches"].as_array().map(Vec::len), Some(0), "{policy}: {v}");
        assert_eq!(v["quarantines"].as_array().map(Vec::len), Some(0), "{policy}: {v}");
        assert_eq!(v["arbiters"], 0, "{policy}: {v}");
        assert!(o.pnodes.iter().all(|p| p["standing"] == "new"), "{policy}: {:?}", o.pnodes);
        assert!(o.summary["recoveries"].as_array().is_none_or(Vec::is_empty), "{policy}: {}", o.summary);
    }
}

#[test]
fn a_slow_honest_pnode_is_waited_for_not_accused() {
    // With the fewest cores it gets replica work only; its replicas take seconds per segment, so
    // the job often stands at a boundary waiting for them, longer than the idle probe's 2 s.
    let slow = ["--fault", "slow", "--fault-delay-ms", "60", "--cores", "1"];
    let o = run_job(3, Some(&slow), 100, "verify = \"full\"\nsegment_steps = 10");
    let v = &o.verification;
    assert_eq!(o.summary["params_sha256"], o.reference["params_sha256"], "{}\n{v}", o.summary);
    assert_eq!(v["segments_checked"], 10, "{v}");
    assert_eq!(v["mismatches"].as_array().map(Vec::len), Some(0), "{v}");
    assert_eq!(v["quarantines"].as_array().map(Vec::len), Some(0), "{v}");
    assert!(o.summary["recoveries"].as_array().is_none_or(Vec::is_empty), "waiting is not a stall: {}", o.summary);
    assert_eq!(standing(&o, o.cheat_id.as_deref().unwrap()), "new");
}

#[test]
fn three_replicas_outvote_a_cheater_without_an_arbiter() {
    // n = 3 on 4 PNodes: the job and each replica take one PNode; the cheater (most cores) is
    // the job's, and the two replicas agree against it: 2 of 3, no arbiter needed.
    let cheat = ["--fault", "corrupt", "--cores", "64"];
    let o = run_job(3, Some(&cheat), 200, "verify = \"full\"\nreplicas = 3\nsegment_steps = 50");
    let id = o.cheat_id.clone().unwrap();
    let v = &o.verification;
    assert_eq!(o.summary["params_sha256"], o.reference["params_sha256"], "{}\n{v}", o.summary);
    assert_eq!(v["quorum"], serde_json::json!([2, 3]), "{v}");
    assert_eq!(v["arbiters"], 0, "{v}");
    let first = &v["segments"][0];
    assert_eq!(first["verdict"], "job_rejected", "{v}");
    assert_eq!(first["executions"].as_array().map(Vec::len), Some(3), "{v}");
    let mismatches = v["mismatches"].as_array().unwrap();
    assert!(!mismatches.is_empty() && mismatches.iter().all(|m| m["pnode"] == id.as_str()), "{v}");
    // Three executions of one segment on three distinct PNodes.
    let pnodes: std::collections::BTreeSet<String> = first["executions"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|e| e[1].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()))
        .collect();
    assert_eq!(pnodes.len(), 3, "{v}");
}

#[test]
fn a_cheater_that_reports_honest_hashes_is_named_by_its_own_signatures() {
    // It hosts one VNode and sends noise downstream while reporting the honest output hash, so
    // the first output to depart is an honest PNode's. What it signed for the tensors it sent
    // names it instead.
    let cheat = ["--fault", "corrupt", "--fault-conceal", "--cores", "64", "--max-vnodes", "1"];
    let o = run_job(3, Some(&cheat), 200, "verify = \"full\"\nsegment_steps = 50");
    let id = o.cheat_id.clone().unwrap();
    let v = &o.verification;
    assert_eq!(o.summary["params_sha256"], o.reference["params_sha256"], "{}\n{v}", o.summary);
    let mismatches = v["mismatches"].as_array().unwrap();
    assert!(!mismatches.is_empty(), "{v}");
    for m in mismatches {
        assert_eq!(m["pnode"], id.as_str(), "{v}");
        assert_eq!(m["what"], "sent", "{v}");
    }
    // Only the cheater is struck (the job then runs without it); every honest PNode keeps a
    // clean record.
    for p in &o.pnodes {
        let clean = p["reputation"].as_f64() == Some(1.0);
        assert_eq!(clean, p["pnode_id"] != id.as_str(), "{p}\n{v}");
        assert!(!clean || p["standing"] == "new", "{p}\n{v}");
    }
}

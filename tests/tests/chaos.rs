//! Chaos tests with real processes: PNodes are SIGKILLed, paused and asked to leave, and the
//! orchestrator is killed and restarted, while a job trains. Training must finish with exactly
//! the parameters of a fault-free run: failures cost time, never correctness.
//!
//! Kill points are drawn from a seeded generator, so every run aims at the same steps; the
//! outcome (the final hash) does not depend on where exactly a kill lands.

use dcnr_tests::{Mesh, fixture, last_json, run};
use rand::{RngExt, SeedableRng};
use std::io::Read;
use std::process::Child;
use std::time::{Duration, Instant};

const STEPS: u64 = 2400;
const LIMIT: Duration = Duration::from_secs(180);

/// A tiny-MLP job envelope with checkpoints to the mesh's store every `every` steps.
fn envelope(dir: &std::path::Path, every: u64) -> std::path::PathBuf {
    let p = dir.join("job.toml");
    let model = fixture("tiny-mlp.toml");
    let text = format!(
        "[op]\nmodel = {:?}\nsteps = {STEPS}\n[checkpoint]\nevery_steps = {every}\n[policy]\ntimeout_s = 120\n",
        model.to_str().unwrap()
    );
    std::fs::write(&p, text).unwrap();
    p
}

/// params_sha256 of the same job trained in one process, without any mesh.
fn reference(env: &std::path::Path) -> String {
    let out = run(&["train-local", env.to_str().unwrap(), "--json"], Duration::from_secs(120)).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    last_json(&out.stdout).unwrap()["params_sha256"].as_str().unwrap().to_string()
}

fn submit(mesh: &Mesh, env: &std::path::Path) -> Child {
    mesh.spawn_cli(&["submit", env.to_str().unwrap(), "--orchestrator", &mesh.url, "--wait", "--json"]).unwrap()
}

fn wait_summary(mut c: Child) -> serde_json::Value {
    let start = Instant::now();
    let status = loop {
        if let Some(s) = c.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < LIMIT, "the job did not finish within {LIMIT:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    c.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    c.stderr.take().unwrap().read_to_end(&mut err).unwrap();
    assert_eq!(status.code(), Some(0), "{}\n{}", String::from_utf8_lossy(&out), String::from_utf8_lossy(&err));
    last_json(&out).unwrap()
}

/// Kill points in [lo, hi), the same on every run.
fn points(seed: u64, n: usize, lo: u64, hi: u64) -> Vec<u64> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut v: Vec<u64> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
    v.sort();
    v
}

/// A busy PNode (one hosting VNodes) other than those in `not`.
fn victim(mesh: &Mesh, not: &[usize]) -> usize {
    mesh.victim(not).unwrap()
}

fn recoveries(s: &serde_json::Value) -> Vec<serde_json::Value> {
    s["recoveries"].as_array().cloned().unwrap_or_default()
}

#[test]
fn sigkill_of_one_of_four_pnodes_twice_leaves_the_result_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let env = envelope(dir.path(), 200);
    let expected = reference(&env);
    let mut mesh = Mesh::start(4).unwrap();
    let job = submit(&mesh, &env);
    let at = points(5, 1, 300, 900)[0];
    mesh.wait_for_step(at, LIMIT).unwrap();
    let first = victim(&mesh, &[]);
    mesh.kill_pnode(first);
    // The second kill lands right after a checkpoint boundary, while its upload runs.
    mesh.wait_for_step(1400, LIMIT).unwrap();
    let second = victim(&mesh, &[first]);
    mesh.kill_pnode(second);
    let s = wait_summary(job);
    assert_eq!(s["status"], "succeeded", "{s}");
    assert_eq!(s["steps"], STEPS);
    assert_eq!(s["params_sha256"], expected.as_str(), "a run with failures must end like a fault-free one: {s}");
    assert!(recoveries(&s).len() >= 2, "{s}");
}

#[test]
fn half_the_pnodes_killed_then_new_ones_join_and_training_completes() {
    let dir = tempfile::tempdir().unwrap();
    let env = envelope(dir.path(), 300);
    let expected = reference(&env);
    let mut mesh = Mesh::start(4).unwrap();
    let job = submit(&mesh, &env);
    mesh.wait_for_step(points(6, 1, 300, 800)[0], LIMIT).unwrap();
    let a = victim(&mesh, &[]);
    let b = victim(&mesh, &[a]);
    mesh.kill_pnode(a);
    mesh.kill_pnode(b);
    mesh.add_pnode().unwrap();
    mesh.add_pnode().unwrap();
    let s = wait_summary(job);
    assert_eq!(s["status"], "succeeded", "{s}");
    assert_eq!(s["params_sha256"], expected.as_str(), "{s}");
    assert!(!recoveries(&s).is_empty(), "{s}");
}

#[test]
fn orchestrator_killed_and_restarted_mid_training_finishes_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let env = envelope(dir.path(), 200);
    let expected = reference(&env);
    let mut mesh = Mesh::start(3).unwrap();
    let job = submit(&mesh, &env);
    mesh.wait_for_step(points(7, 1, 500, 1200)[0], LIMIT).unwrap();
    let id = mesh.jobs().unwrap()[0]["job_id"].as_str().unwrap().to_string();
    mesh.kill_orchestrator();
    drop(job);
    mesh.restart_orchestrator().unwrap();
    let start = Instant::now();
    loop {
        let jobs = mesh.jobs().unwrap_or_default();
        if let Some(j) = jobs.iter().find(|j| j["job_id"] == id.as_str()) {
            assert_ne!(j["state"], "failed", "{j}");
            if j["state"] == "succeeded" {
                break;
            }
        }
        assert!(start.elapsed() < LIMIT, "the job did not finish after the restart: {jobs:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The record is written just after the state turns final.
    let start = Instant::now();
    let result = loop {
        match mesh.result(&id) {
            Ok(r) => break r,
            Err(e) if start.elapsed() > Duration::from_secs(10) => panic!("{e:#}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    assert_eq!(result["summary"]["params_sha256"], expected.as_str(), "{result}");
}

#[test]
fn a_paused_pnode_is_replaced_and_its_late_work_is_not_applied() {
    let dir = tempfile::tempdir().unwrap();
    let env = envelope(dir.path(), 400);
    let expected = reference(&env);
    let mesh = Mesh::start(3).unwrap();
    let job = submit(&mesh, &env);
    mesh.wait_for_step(points(8, 1, 300, 900)[0], LIMIT).unwrap();
    let v = victim(&mesh, &[]);
    mesh.signal_pnode(v, "STOP").unwrap();
    // Longer than the heartbeat timeout (1 s): the orchestrator declares it lost and moves on.
    std::thread::sleep(Duration::from_millis(2500));
    mesh.signal_pnode(v, "CONT").unwrap();
    let s = wait_summary(job);
    assert_eq!(s["status"], "succeeded", "{s}");
    assert_eq!(s["params_sha256"], expected.as_str(), "late work of the paused pnode changed the result: {s}");
    let r = recoveries(&s);
    assert!(!r.is_empty() && r[0]["reason"].as_str().unwrap().contains("lost"), "{s}");
    // Woken up, it learns it was given up, drops its old VNodes and joins again with none.
    let start = Instant::now();
    loop {
        let named: Vec<_> = mesh
            .pnodes()
            .unwrap()
            .into_iter()
            .filter(|p| p["name"] == format!("test-pnode-{v}").as_str() && p["health"] == "healthy")
            .collect();
        if named.len() == 1 && named[0]["hosted_vnodes"] == 0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "the paused pnode did not rejoin clean: {named:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_pnode_that_leaves_gracefully_hands_over_without_rollback() {
    let dir = tempfile::tempdir().unwrap();
    let env = envelope(dir.path(), 1000);
    let expected = reference(&env);
    let mut mesh = Mesh::start(3).unwrap();
    let job = submit(&mesh, &env);
    mesh.wait_for_step(points(9, 1, 300, 900)[0], LIMIT).unwrap();
    let v = victim(&mesh, &[]);
    mesh.signal_pnode(v, "TERM").unwrap();
    assert_eq!(mesh.wait_pnode_exit(v, Duration::from_secs(30)).unwrap(), Some(0));
    let s = wait_summary(job);
    assert_eq!(s["status"], "succeeded", "{s}");
    assert_eq!(s["params_sha256"], expected.as_str(), "{s}");
    let r = recoveries(&s);
    assert!(!r.is_empty(), "the leave moved nothing: {s}");
    for x in &r {
        assert_eq!(x["recomputed_steps"], 0, "a graceful leave must not roll back: {s}");
    }
}

#[test]
fn with_no_pnode_left_the_job_waits_visibly_until_capacity_returns() {
    let dir = tempfile::tempdir().unwrap();
    let env = envelope(dir.path(), 300);
    let expected = reference(&env);
    let mut mesh = Mesh::start(1).unwrap();
    let job = submit(&mesh, &env);
    mesh.wait_for_step(points(10, 1, 300, 900)[0], LIMIT).unwrap();
    mesh.kill_pnode(0);
    let start = Instant::now();
    loop {
        let jobs = mesh.jobs().unwrap();
        if jobs[0]["state"] == "recovering" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "the job does not show that it waits: {jobs:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Still waiting a while later: it neither fails nor pretends to run.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(mesh.jobs().unwrap()[0]["state"], "recovering");
    mesh.add_pnode().unwrap();
    let s = wait_summary(job);
    assert_eq!(s["params_sha256"], expected.as_str(), "{s}");
}

#[test]
fn pipelined_training_with_a_kill_ends_like_the_fault_free_pipelined_run() {
    let dir = tempfile::tempdir().unwrap();
    let env = envelope(dir.path(), 500);
    let mut mesh = Mesh::start(3).unwrap();
    let clean = mesh.submit_wait(&env, &["--in-flight", "3"]).unwrap();
    let url = mesh.url.clone();
    let args = ["submit", env.to_str().unwrap(), "--orchestrator", &url, "--wait", "--json", "--in-flight", "3"];
    let job = mesh.spawn_cli(&args).unwrap();
    let start = Instant::now();
    // The fault-free job is the first in the table; this one is the second.
    while mesh.jobs().unwrap().len() < 2 {
        assert!(start.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    let target = points(11, 1, 300, 900)[0];
    loop {
        let jobs = mesh.jobs().unwrap();
        let done = jobs.last().unwrap()["steps_done"].as_u64().unwrap_or(0);
        if done >= target {
            break;
        }
        assert!(start.elapsed() < LIMIT);
        std::thread::sleep(Duration::from_millis(10));
    }
    mesh.kill_pnode(victim(&mesh, &[]));
    let s = wait_summary(job);
    assert!(!recoveries(&s).is_empty(), "{s}");
    assert_eq!(s["params_sha256"], clean["params_sha256"], "pipelined: {s}");
}

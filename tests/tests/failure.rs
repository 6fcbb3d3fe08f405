//! A PNode that crashes mid-training fails the job promptly with a clear reason and a record;
//! nothing hangs. (Relocation and resume come with checkpoints; until then failing loudly is the
//! contract.)

use dcnr_tests::{Mesh, fixture, last_json};
use std::io::Read;
use std::time::{Duration, Instant};

#[test]
fn killed_pnode_fails_the_job_with_a_record_instead_of_hanging() {
    let mut mesh = Mesh::start(3).unwrap();
    let model = fixture("tiny-mlp.toml");
    let url = mesh.url.clone();
    let mut submit = mesh
        .spawn_cli(&[
            "submit",
            model.to_str().unwrap(),
            "--orchestrator",
            &url,
            "--steps",
            "100000",
            "--wait",
            "--json",
        ])
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let killed_at = Instant::now();
    mesh.kill_pnode(1);
    let status = loop {
        if let Some(s) = submit.try_wait().unwrap() {
            break s;
        }
        assert!(killed_at.elapsed() < Duration::from_secs(30), "the job did not notice the lost pnode");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = Vec::new();
    submit.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    assert_eq!(status.code(), Some(1));
    let s = last_json(&out).unwrap();
    assert_eq!(s["status"], "failed");
    let err = s["error"].as_str().unwrap();
    assert!(err.contains("stopped heartbeating") || err.contains("failed"), "{err}");
    let job = s["job_id"].as_str().unwrap();
    let rec_hash = std::fs::read_to_string(mesh.artifacts.path().join("refs/jobs").join(job)).unwrap();
    let rec_hash = rec_hash.trim();
    let rec: serde_json::Value = serde_json::from_slice(
        &std::fs::read(mesh.artifacts.path().join("objects").join(&rec_hash[..2]).join(rec_hash)).unwrap(),
    )
    .unwrap();
    assert_eq!(rec["status"], "failed");
    assert!(["pnode_lost", "vnode_failure", "stalled"].contains(&rec["error_code"].as_str().unwrap()), "{rec}");
    assert!(mesh.orchestrator_alive());
}

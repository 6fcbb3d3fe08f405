//! The artifact store on a real S3-compatible server (s3s-fs over loopback): jobs write their
//! records and checkpoints there, replay and resume read them back, and an unusable store (wrong credentials, server down)
//! is a clear error at start. (s3s-fs creates missing buckets on write, so a missing bucket is
//! not testable against it.)

use dcnr_tests::{Mesh, S3Server, fixture, run_bin_env, sha256_hex};
use std::time::Duration;

#[test]
fn jobs_record_to_s3_and_replay_from_it() {
    let s3 = S3Server::start(&["dcnr"]).unwrap();
    let env = s3.env();
    let store = "s3://dcnr/runs";
    let mesh = Mesh::start_with(2, &["--store", store, "--s3-endpoint", &s3.endpoint], &env).unwrap();
    let s = mesh.submit_wait(&fixture("tiny-mlp.toml"), &["--steps", "30"]).unwrap();
    assert_eq!(s["status"], "succeeded");
    let job = s["job_id"].as_str().unwrap();

    // Read what the server stored straight from its directory, independently of our client.
    let base = s3.root.path().join("dcnr/runs");
    let rec_hash = std::fs::read_to_string(base.join("refs/jobs").join(job)).unwrap();
    let rec_bytes = std::fs::read(base.join("objects").join(rec_hash.trim())).unwrap();
    assert_eq!(sha256_hex(&rec_bytes), rec_hash.trim());
    let rec: serde_json::Value = serde_json::from_slice(&rec_bytes).unwrap();
    for name in ["result.json", "executions.json", "metrics.json", "envelope.json"] {
        let h = rec["artifacts"][name].as_str().unwrap();
        assert_eq!(sha256_hex(&std::fs::read(base.join("objects").join(h)).unwrap()), h, "{name}");
    }

    let out = run_bin_env(
        "orchestrator",
        &["replay", job, "--store", store, "--s3-endpoint", &s3.endpoint],
        &env,
        Duration::from_secs(180),
    )
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("recorded hashes reproduced"), "{stdout}");
}

#[test]
fn checkpoints_on_s3_resume_exactly() {
    let s3 = S3Server::start(&["dcnr"]).unwrap();
    let env = s3.env();
    let mesh = Mesh::start_with(2, &["--store", "s3://dcnr/ck", "--s3-endpoint", &s3.endpoint], &env).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let write = |job: &str, steps: u64| {
        let path = dir.path().join(format!("{job}.json"));
        let envelope = serde_json::json!({
            "ctx": { "job_id": job },
            "op": { "model_toml": std::fs::read_to_string(fixture("tiny-mlp.toml")).unwrap(), "steps": steps },
            "seed": { "mode": "explicit", "value": 11 },
            "checkpoint": { "every_steps": 10 }
        });
        std::fs::write(&path, envelope.to_string()).unwrap();
        path
    };
    let straight = mesh.submit_wait(&write("s3-straight", 30), &[]).unwrap();
    let part = mesh.submit_wait(&write("s3-part", 20), &[]).unwrap();
    assert_ne!(part["params_sha256"], straight["params_sha256"]);
    let snaps = std::fs::read_dir(s3.root.path().join("dcnr/ck/refs/checkpoints/s3-part")).unwrap().count();
    assert_eq!(snaps, 2, "snapshots at steps 10 and 20");
    let out = run_bin_env(
        "orchestrator",
        &["resume", "s3-part", "--steps", "30", "--orchestrator", &mesh.url, "--wait", "--json"],
        &[],
        Duration::from_secs(120),
    )
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let resumed = dcnr_tests::last_json(&out.stdout).unwrap();
    assert_eq!(resumed["params_sha256"], straight["params_sha256"]);
}

#[test]
fn s3_going_down_mid_training_loses_no_completed_snapshot_and_training_goes_on() {
    let mut s3 = S3Server::start(&["dcnr"]).unwrap();
    let env = s3.env();
    let mesh = Mesh::start_with(2, &["--store", "s3://dcnr/down", "--s3-endpoint", &s3.endpoint], &env).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.json");
    let envelope = serde_json::json!({
        "ctx": { "job_id": "outage" },
        "op": { "model_toml": std::fs::read_to_string(fixture("tiny-mlp.toml")).unwrap(), "steps": 3000 },
        "checkpoint": { "every_steps": 100 }
    });
    std::fs::write(&path, envelope.to_string()).unwrap();
    let url = mesh.url.clone();
    let mut submit =
        mesh.spawn_cli(&["submit", path.to_str().unwrap(), "--orchestrator", &url, "--wait", "--json"]).unwrap();
    let refs = s3.root.path().join("dcnr/down/refs/checkpoints/outage");
    let t0 = std::time::Instant::now();
    while std::fs::read_dir(&refs).map(|d| d.count()).unwrap_or(0) < 2 {
        assert!(t0.elapsed() < Duration::from_secs(60), "no snapshot was written");
        std::thread::sleep(Duration::from_millis(20));
    }
    s3.kill();
    let status = submit.wait().unwrap();
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut submit.stdout.take().unwrap(), &mut out).unwrap();
    assert!(status.success(), "training must go on while the store is down");
    assert_eq!(dcnr_tests::last_json(&out).unwrap()["steps"], 3000);
    // Every snapshot that has a reference is whole: its manifest and states are all there.
    let base = s3.root.path().join("dcnr/down");
    for r in std::fs::read_dir(&refs).unwrap() {
        let hash = std::fs::read_to_string(r.unwrap().path()).unwrap();
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(base.join("objects").join(hash.trim())).unwrap()).unwrap();
        for v in manifest["vnodes"].as_array().unwrap() {
            let h = v["sha256"].as_str().unwrap();
            assert_eq!(sha256_hex(&std::fs::read(base.join("objects").join(h)).unwrap()), h);
        }
    }
}

#[test]
fn unusable_s3_store_is_a_clear_error_at_start() {
    let s3 = S3Server::start(&["dcnr"]).unwrap();
    let serve = |store: &str, envs: &[(&str, &str)]| {
        run_bin_env(
            "orchestrator",
            &["serve", "--listen", "127.0.0.1:0", "--store", store, "--s3-endpoint", &s3.endpoint],
            envs,
            Duration::from_secs(60),
        )
        .unwrap()
    };
    let wrong = [("AWS_ACCESS_KEY_ID", "dcnrtestkey"), ("AWS_SECRET_ACCESS_KEY", "wrong"), ("AWS_REGION", "us-east-1")];
    let out = serve("s3://dcnr/x", &wrong);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("s3://dcnr/x") && err.contains("not usable"), "{err}");

    // S3 down: nothing listens on loopback port 1.
    let out = run_bin_env(
        "orchestrator",
        &["serve", "--listen", "127.0.0.1:0", "--store", "s3://dcnr/x", "--s3-endpoint", "http://127.0.0.1:1"],
        &s3.env(),
        Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not usable"));
}

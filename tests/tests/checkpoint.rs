//! Checkpoints and resume: training 2N steps straight gives the same parameters as training N
//! steps, stopping every process, and resuming on a new mesh of a different size; a damaged
//! newest snapshot falls back to the previous complete one.

use dcnr_tests::{Mesh, fixture, run};
use std::path::Path;
use std::time::Duration;

fn envelope(dir: &Path, job: &str, steps: u64) -> std::path::PathBuf {
    let path = dir.join(format!("{job}.json"));
    let env = serde_json::json!({
        "ctx": { "job_id": job },
        "op": { "model_toml": std::fs::read_to_string(fixture("tiny-mlp.toml")).unwrap(), "steps": steps },
        "seed": { "mode": "explicit", "value": 5 },
        "checkpoint": { "every_steps": 20, "keep": 3 }
    });
    std::fs::write(&path, env.to_string()).unwrap();
    path
}

fn resume(mesh: &Mesh, job: &str, steps: &str) -> serde_json::Value {
    let out = run(
        &["resume", job, "--steps", steps, "--orchestrator", &mesh.url, "--wait", "--json"],
        Duration::from_secs(120),
    )
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    dcnr_tests::last_json(&out.stdout).unwrap()
}

fn read_store(store: &Path, hash: &str) -> Vec<u8> {
    std::fs::read(store.join("objects").join(&hash[..2]).join(hash)).unwrap()
}

#[test]
fn resume_after_stopping_everything_reproduces_the_straight_run() {
    let work = tempfile::tempdir().unwrap();
    let store = work.path().join("store");
    let store_arg = store.to_str().unwrap().to_string();
    let straight;
    {
        let mesh = Mesh::start_with(2, &["--store", &store_arg], &[]).unwrap();
        straight = mesh.submit_wait(&envelope(work.path(), "straight", 60), &[]).unwrap();
        assert_eq!(straight["status"], "succeeded");
        for job in ["part", "part2"] {
            let s = mesh.submit_wait(&envelope(work.path(), job, 30), &[]).unwrap();
            assert_eq!(s["steps"], 30);
            assert_ne!(s["params_sha256"], straight["params_sha256"]);
        }
        // Dropping the mesh kills the orchestrator and every pnode.
    }
    let snaps: Vec<String> = std::fs::read_dir(store.join("refs/checkpoints/part"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(snaps.contains(&"000000000020".to_string()) && snaps.contains(&"000000000030".to_string()), "{snaps:?}");

    let mesh = Mesh::start_with(3, &["--store", &store_arg], &[]).unwrap();
    let resumed = resume(&mesh, "part", "60");
    assert_eq!(resumed["steps"], 60);
    assert_eq!(resumed["params_sha256"], straight["params_sha256"], "resume must not change the result");

    // Damage one state object of part2's newest snapshot: resume falls back to step 20.
    let ref_hash = std::fs::read_to_string(store.join("refs/checkpoints/part2/000000000030")).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&read_store(&store, ref_hash.trim())).unwrap();
    let victim = manifest["vnodes"][0]["sha256"].as_str().unwrap();
    std::fs::write(store.join("objects").join(&victim[..2]).join(victim), b"bit rot").unwrap();
    let fallback = resume(&mesh, "part2", "60");
    assert_eq!(fallback["params_sha256"], straight["params_sha256"]);

    // Garbage collection deletes what nothing references (the dropped snapshots' manifests, the
    // store probes) and keeps what the kept snapshots share with dropped ones.
    let out = run(&["gc", "--store", &store_arg, "--grace-s", "0"], Duration::from_secs(60)).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    let deleted: usize =
        text.split(", ").nth(1).and_then(|p| p.split(' ').next()).and_then(|n| n.parse().ok()).unwrap();
    assert!(deleted > 0, "{text}");
    let again = resume(&mesh, "straight", "60");
    assert_eq!(again["params_sha256"], straight["params_sha256"], "a kept snapshot lost an object to gc");
}

#[test]
fn resume_without_a_snapshot_is_a_clear_error() {
    let mesh = Mesh::start(1).unwrap();
    let out = run(&["resume", "never-ran", "--orchestrator", &mesh.url, "--wait"], Duration::from_secs(30)).unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no complete checkpoint"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

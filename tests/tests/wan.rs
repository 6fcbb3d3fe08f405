//! Link emulation end to end: `bench-wan` over shaped links on real processes, and the
//! orchestrator's `--link-*` flags reaching the pnodes of a local mesh.

use dcnr_tests::{fixture, last_json, run};
use std::time::Duration;

#[test]
fn bench_wan_reports_every_mode_and_exact_matches_train_local() {
    let model = fixture("tiny-mlp.toml");
    let out = run(
        &[
            "bench-wan",
            "--delay-ms",
            "5",
            "--mbit",
            "200",
            "--pnodes",
            "2",
            "--steps",
            "40",
            "--modes",
            "exact,exact-k8",
            "--model",
            model.to_str().unwrap(),
            "--json",
        ],
        Duration::from_secs(120),
    )
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = last_json(&out.stdout).unwrap();
    assert_eq!(r["link"]["delay_ms"], 5);
    assert_eq!(r["link"]["mbit"], 200.0);
    assert_eq!(r["steps"], 40);
    let local = &r["train_local"];
    assert_eq!(local["mode"], "train-local");
    assert!(local["samples_per_s"].as_f64().unwrap() > 0.0, "{local}");
    let modes = r["modes"].as_array().unwrap();
    let names: Vec<&str> = modes.iter().map(|m| m["mode"].as_str().unwrap()).collect();
    assert_eq!(names, ["exact", "exact-k8"]);
    for m in modes {
        assert!(m["samples_per_s"].as_f64().unwrap() > 0.0, "{m}");
        assert!(m["ratio"].as_f64().unwrap() > 0.0, "{m}");
        assert!(m["wire_bytes_per_sample"].as_f64().unwrap() > 0.0, "{m}");
        let acc = m["test_accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{m}");
        // Both sides of the mesh count their own connections: the orchestrator in process, the
        // pnodes through /metrics.
        assert!(m["orchestrator_wire_bytes"].as_u64().unwrap() > 0, "{m}");
        assert!(m["pnode_wire_bytes"].as_u64().unwrap() > 0, "{m}");
        assert_eq!(
            m["job_wire_bytes"].as_u64().unwrap(),
            m["orchestrator_wire_bytes"].as_u64().unwrap() + m["pnode_wire_bytes"].as_u64().unwrap()
        );
        assert_eq!(m["recoveries"], 0, "{m}");
    }
    // No sample's pixels cross a link while training: the PNodes fetch the dataset pack once
    // (part of the job's bytes, 55 MB for MNIST) and assemble micro-batches themselves.
    assert!(modes[0]["wire_bytes_per_sample"].as_f64().unwrap() < 784.0, "{}", modes[0]);
    assert!(modes[0]["job_wire_bytes"].as_u64().unwrap() > 54_000_000, "{}", modes[0]);
    assert_eq!(modes[0]["in_flight"], 1);
    assert_eq!(modes[1]["in_flight"], 8);
    assert_eq!(modes[0]["params_sha256"], local["params_sha256"], "exact over shaped links differs from train-local");
    assert_eq!(modes[0]["matches_train_local"], true);
    assert_eq!(modes[0]["test_accuracy"], local["test_accuracy"]);
    assert_ne!(modes[1]["params_sha256"], local["params_sha256"], "in_flight 8 delays gradients by design");
}

#[test]
fn bench_wan_refuses_an_unknown_mode_before_running_anything() {
    let out = run(&["bench-wan", "--modes", "exact,warp-speed", "--json"], Duration::from_secs(30)).unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown mode `warp-speed`"), "{err}");
    assert!(out.stdout.is_empty(), "nothing ran: {}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn link_flags_reach_the_pnodes_of_a_local_mesh_and_keep_results_exact() {
    let model = fixture("tiny-mlp.toml");
    let model = model.to_str().unwrap();
    let store = tempfile::tempdir().unwrap();
    let local = run(&["train-local", model, "--steps", "30", "--json"], Duration::from_secs(60)).unwrap();
    assert!(local.status.success(), "{}", String::from_utf8_lossy(&local.stderr));
    let local = last_json(&local.stdout).unwrap();
    let demo = run(
        &[
            "demo",
            "--pnodes",
            "2",
            "--model",
            model,
            "--steps",
            "30",
            "--store",
            store.path().to_str().unwrap(),
            "--link-delay-ms",
            "3",
            "--link-mbit",
            "500",
            "--json",
        ],
        Duration::from_secs(90),
    )
    .unwrap();
    // A pnode refusing the flags would never join and the demo would fail.
    assert!(demo.status.success(), "{}", String::from_utf8_lossy(&demo.stderr));
    let demo = last_json(&demo.stdout).unwrap();
    assert_eq!(demo["status"], "succeeded");
    assert_eq!(demo["params_sha256"], local["params_sha256"]);

    let bad = run(&["demo", "--link-mbit=-3"], Duration::from_secs(30)).unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--link-mbit"), "{}", String::from_utf8_lossy(&bad.stderr));
}

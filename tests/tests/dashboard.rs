//! The dashboard's JSON API, its live stream and the Prometheus endpoints of the orchestrator
//! and a PNode, against real processes during a real training run.

use dcnr_tests::{Mesh, Proc, fixture, free_port, get_json, http_get, last_json, wait_for};
use std::io::BufRead;
use std::time::Duration;

/// Two epochs of tiny-mlp (1875 steps each): long enough to watch, with two evaluations.
const STEPS: u64 = 3750;

/// The value of the first sample line of `metric` (with its labels) in Prometheus text.
fn sample(text: &str, metric: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(metric).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.parse().ok()))
}

#[test]
fn api_stream_and_metrics_follow_a_training_run() {
    let mut mesh = Mesh::start_with(1, &["--dashboard", "127.0.0.1:0"], &[]).unwrap();
    let metrics_port = free_port().unwrap();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    mesh.add_pnode_with(&["--metrics", &metrics_addr, "--name", "metered"]).unwrap();
    mesh.wait_for_pnodes(2).unwrap();
    let dash = mesh.dashboard.clone().unwrap();
    let api = |path: &str| get_json(&format!("{dash}api/{path}")).unwrap();

    // The page and its assets are served by the binary itself.
    let (status, index) = http_get(&dash).unwrap();
    assert_eq!(status, 200);
    assert!(index.contains("/app.js") && !index.contains("http://") && !index.contains("https://"), "{index}");
    assert!(http_get(&format!("{dash}app.js")).unwrap().1.contains("textContent"));
    let (status, body) = http_get(&format!("{dash}api/jobs/no-such-job")).unwrap();
    assert_eq!(status, 404);
    assert!(body.contains("no job no-such-job"), "{body}");

    let pnodes = api("pnodes");
    let ids: Vec<String> = pnodes.as_array().unwrap().iter().map(|p| p["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids.len(), 2, "{pnodes}");
    assert!(
        pnodes.as_array().unwrap().iter().all(|p| p["health"] == "healthy" && p["caps"]["cores"].as_u64() > Some(0))
    );

    // A live stream, read on its own thread.
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let stream_url = format!("{dash}api/stream");
    std::thread::spawn(move || {
        let Ok(mut r) = ureq::get(&stream_url).call() else { return };
        for l in std::io::BufReader::new(r.body_mut().as_reader()).lines() {
            let Ok(l) = l else { return };
            if tx.send(l).is_err() {
                return;
            }
        }
    });

    let steps = STEPS.to_string();
    let mut submit = Proc(
        mesh.spawn_cli(&[
            "submit",
            fixture("tiny-mlp.toml").to_str().unwrap(),
            "--orchestrator",
            &mesh.url,
            "--steps",
            &steps,
            "--wait",
            "--json",
        ])
        .unwrap(),
    );

    // While it runs: the job is listed, its VNodes are placed on the registered PNodes, and
    // its training curve grows.
    let job = wait_for("a running job with curve points", Duration::from_secs(60), || {
        let jobs = api("jobs");
        let j = jobs.as_array()?.first()?.clone();
        let id = j["job_id"].as_str()?.to_string();
        let d = api(&format!("jobs/{id}"));
        (d["train"].as_array()?.len() >= 2 && d["job"]["state"] == "running").then_some(d)
    })
    .unwrap();
    let id = job["job"]["job_id"].as_str().unwrap().to_string();
    assert_eq!(job["job"]["model"], "tiny-mlp");
    assert_eq!(job["job"]["steps_total"], STEPS);
    let vnodes = job["vnodes"].as_array().unwrap();
    assert_eq!(vnodes.iter().map(|v| v["name"].as_str().unwrap()).collect::<Vec<_>>(), ["fc1", "act1", "fc2", "loss"]);
    for v in vnodes {
        assert!(ids.contains(&v["pnode"].as_str().unwrap().to_string()), "{v}");
        assert!(matches!(v["health"].as_str(), Some("healthy" | "suspect")), "{v}");
    }
    let first = job["train"].as_array().unwrap().len();
    let last_seq = job["train"].as_array().unwrap().last().unwrap()["seq"].as_u64().unwrap();
    let later = wait_for("more curve points", Duration::from_secs(30), || {
        let d = api(&format!("jobs/{id}?since={last_seq}"));
        let n = d["train"].as_array()?.len();
        (n > 0).then_some(d)
    })
    .unwrap();
    let p = &later["train"][0];
    assert!(p["seq"].as_u64().unwrap() > last_seq, "since= returns only newer points: {p}");
    assert!(p["loss"].as_f64().unwrap().is_finite() && p["samples_per_s"].as_f64().unwrap() > 0.0, "{p}");
    assert!((0.0..=1.0).contains(&p["accuracy"].as_f64().unwrap()), "{p}");
    assert!(first >= 2);
    let hosting = api("pnodes");
    let hosted: usize = hosting.as_array().unwrap().iter().map(|p| p["vnodes"].as_array().unwrap().len()).sum();
    assert_eq!(hosted, 4, "every VNode of the running job is listed under its PNode: {hosting}");

    // The stream pushed curve points and snapshots without being asked.
    let mut seen = std::collections::BTreeSet::new();
    wait_for("train, overview and event messages on the stream", Duration::from_secs(20), || {
        while let Ok(l) = lines.try_recv() {
            if let Some(name) = l.strip_prefix("event: ") {
                seen.insert(name.to_string());
            }
        }
        ["train", "overview", "event"].iter().all(|n| seen.contains(*n)).then_some(())
    })
    .unwrap();

    let out =
        wait_for("the submit command to end", Duration::from_secs(180), || submit.0.try_wait().ok().flatten()).unwrap();
    assert!(out.success());
    let mut stdout = String::new();
    std::io::Read::read_to_string(submit.0.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    let summary = last_json(stdout.as_bytes()).unwrap();
    assert_eq!(summary["status"], "succeeded");

    // After the end: the final state, a test evaluation, and the whole story in the event log.
    let done = wait_for("the job to be listed as succeeded", Duration::from_secs(10), || {
        let d = api(&format!("jobs/{id}"));
        (d["job"]["state"] == "succeeded").then_some(d)
    })
    .unwrap();
    assert_eq!(done["job"]["steps_done"], STEPS);
    let test = done["test"].as_array().unwrap();
    assert_eq!(test.len(), 2, "one evaluation per epoch: {test:?}");
    assert_eq!(test[0]["step"], STEPS / 2);
    assert_eq!(test[1]["accuracy"], summary["test_accuracy"]);
    assert_eq!(done["train"].as_array().unwrap().last().unwrap()["step"], STEPS);
    assert!(done["vnodes"].as_array().unwrap().iter().all(|v| v["step"] == STEPS && v["health"] == "finished"));

    let events = api("events");
    let kinds: Vec<&str> = events.as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "pnode_joined").count(), 2, "{kinds:?}");
    for (k, n) in [("job_submitted", 1), ("job_placed", 1), ("evaluation", 2), ("job_succeeded", 1)] {
        assert_eq!(kinds.iter().filter(|x| **x == k).count(), n, "{k} in {kinds:?}");
    }
    let seqs: Vec<u64> = events.as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    let of_job = api(&format!("events?job={id}"));
    assert!(of_job.as_array().unwrap().iter().all(|e| e["job"] == id.as_str()));
    let tail = api(&format!("events?since={}", seqs[seqs.len() - 2]));
    assert_eq!(tail.as_array().unwrap().len(), 1);

    // Prometheus text on the orchestrator...
    let (status, m) = http_get(&format!("{dash}metrics")).unwrap();
    assert_eq!(status, 200);
    assert_eq!(sample(&m, "dcnr_jobs{state=\"succeeded\"}"), Some(1.0), "{m}");
    assert_eq!(sample(&m, "dcnr_jobs{state=\"running\"}"), Some(0.0));
    assert_eq!(sample(&m, "dcnr_pnodes{health=\"healthy\"}"), Some(2.0));
    assert_eq!(sample(&m, "dcnr_train_steps_total"), Some(STEPS as f64), "one loss report per step");
    assert_eq!(sample(&m, &format!("dcnr_job_steps_done{{job=\"{id}\"}}")), Some(STEPS as f64));
    assert_eq!(
        sample(&m, "dcnr_reports_total{kind=\"done\"}"),
        Some((STEPS * 4) as f64),
        "one Done per VNode and step"
    );
    assert!(sample(&m, "dcnr_tensor_bytes_total{direction=\"in\"}").unwrap() > 0.0);
    assert!(sample(&m, "dcnr_events_total{kind=\"pnode_joined\"}") == Some(2.0));

    // ...and on the PNode that was asked to serve it.
    let (status, pm) = http_get(&format!("http://{metrics_addr}/metrics")).unwrap();
    assert_eq!(status, 200);
    let metered = api("pnodes");
    let metered = metered.as_array().unwrap().iter().find(|p| p["name"] == "metered").unwrap().clone();
    assert_eq!(
        sample(&pm, "dcnr_pnode_vnode_steps_total"),
        metered["vnode_steps"].as_f64(),
        "the PNode counts the same VNode steps the orchestrator saw from it:\n{pm}"
    );
    assert!(sample(&pm, "dcnr_pnode_vnode_messages_in_total{pass=\"forward\"}").unwrap() > 0.0);
    assert_eq!(sample(&pm, "dcnr_pnode_vnode_failures_total"), Some(0.0));
    assert!(sample(&pm, "dcnr_pnode_hosted_vnodes").is_some());
}

#[test]
fn checkpoints_are_logged_as_events_with_their_step_and_manifest() {
    let mesh = Mesh::start_with(2, &["--dashboard", "127.0.0.1:0"], &[]).unwrap();
    let dash = mesh.dashboard.clone().unwrap();
    let work = tempfile::tempdir().unwrap();
    let path = work.path().join("ckpt.json");
    let env = serde_json::json!({
        "ctx": { "job_id": "ckpt" },
        "op": { "model_toml": std::fs::read_to_string(fixture("tiny-mlp.toml")).unwrap(), "steps": 60 },
        "checkpoint": { "every_steps": 20, "keep": 3 }
    });
    std::fs::write(&path, env.to_string()).unwrap();
    let s = mesh.submit_wait(&path, &[]).unwrap();
    assert_eq!(s["status"], "succeeded");
    let events = get_json(&format!("{dash}api/events?job=ckpt")).unwrap();
    let ckpts: Vec<&serde_json::Value> =
        events.as_array().unwrap().iter().filter(|e| e["kind"] == "checkpoint").collect();
    assert_eq!(ckpts.iter().map(|e| e["data"]["step"].as_u64().unwrap()).collect::<Vec<_>>(), [20, 40, 60]);
    for e in &ckpts {
        let manifest = e["data"]["manifest"].as_str().unwrap();
        assert_eq!(manifest.len(), 64, "a SHA-256 manifest hash: {e}");
        assert!(mesh.artifacts.path().join("objects").join(&manifest[..2]).join(manifest).exists());
        assert_eq!(e["severity"], "info");
    }
}

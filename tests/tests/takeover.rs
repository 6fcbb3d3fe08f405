//! Several orchestrators sharing one store: the one that owns a running job is SIGKILLed, and
//! the other, which the PNodes joined too, takes the job's lease once it lapses and finishes the
//! job with `train-local`'s parameters. Over a directory store and over S3 (s3s-fs). PNodes
//! serve every orchestrator at once, and one orchestrator dying leaves the other's jobs alone.

use dcnr_tests::{Mesh, S3Server, fixture, job_state, last_json, run, wait_for};
use std::path::Path;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(120);

/// A job's `result.json` read straight from an S3 server's directory (`refs/`, `objects/`).
fn stored_result(base: &Path, job: &str) -> Option<serde_json::Value> {
    let object = |h: &str| std::fs::read(base.join("objects").join(h.trim())).ok();
    let record: serde_json::Value =
        serde_json::from_slice(&object(&std::fs::read_to_string(base.join("refs/jobs").join(job)).ok()?)?).ok()?;
    serde_json::from_slice(&object(record["artifacts"]["result.json"].as_str()?)?).ok()
}

/// Runs the takeover on a mesh started with `serve_args` and `envs`; the store's files are in
/// `s3_root` (an S3 server's directory) or else the mesh's artifact directory.
fn survives_the_death_of_its_orchestrator(serve_args: &[&str], envs: &[(&str, &str)], s3_root: Option<&Path>) {
    let model = fixture("tiny-mlp.toml");
    let steps = "3000";
    let local = run(&["train-local", model.to_str().unwrap(), "--steps", steps, "--json"], T).unwrap();
    assert!(local.status.success(), "{}", String::from_utf8_lossy(&local.stderr));
    let reference = last_json(&local.stdout).unwrap();

    let mut args = vec!["--lease-term-s", "1", "--dashboard", "127.0.0.1:0"];
    args.extend_from_slice(serve_args);
    let mut mesh = Mesh::start_with(0, &args, envs).unwrap();
    let (_peer, peer_url, peer_dashboard) = mesh.start_peer_orchestrator_with_dashboard().unwrap();
    let peer_dashboard = peer_dashboard.unwrap();
    let both = format!("{},{peer_url}", mesh.url);
    for _ in 0..3 {
        mesh.add_pnode_joining(&both, &[]).unwrap();
    }
    mesh.wait_for_pnodes(3).unwrap();

    let f = model.to_str().unwrap();
    let out = run(&["submit", f, "--orchestrator", &mesh.url, "--steps", steps], T).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let job = String::from_utf8_lossy(&out.stdout).trim().to_string();
    mesh.wait_for_step(200, T).unwrap();
    // The peer knows the job is held, and asked about it (one job, or the list, or a watch) it
    // answers with the owner's live status, forwarded.
    let asked = run(&["jobs", &job, "--json", "--orchestrator", &peer_url], T).unwrap();
    assert!(asked.status.success(), "{}", String::from_utf8_lossy(&asked.stderr));
    let live = last_json(&asked.stdout).unwrap();
    assert_eq!(live["state"], "running", "{live}");
    assert!(live["steps_done"].as_u64().unwrap() >= 200, "{live}");
    let (state, done) = job_state(&peer_url, &job).expect("the peer lists the job its peer owns");
    assert!(state == "running" && done >= 200, "{state} {done}");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let event = rt.block_on(async {
        let mut client = dcnr_tests::orchestrator_client(&peer_url).await.unwrap();
        let req = dcnr_proto::v1::WatchJobRequest { job_id: job.clone() };
        let mut events = client.watch_job(req).await.unwrap().into_inner();
        tokio::time::timeout(Duration::from_secs(10), events.message()).await.unwrap().unwrap().unwrap()
    });
    assert!(
        matches!(&event.body, Some(dcnr_proto::v1::job_event::Body::Progress(p)) if p.step > 0),
        "the peer relays the owner's events: {event:?}"
    );
    // Its dashboard lists the job, and shows it, with the owner's live status.
    let rows = dcnr_tests::get_json(&format!("{peer_dashboard}api/jobs")).unwrap();
    let row = rows.as_array().unwrap().iter().find(|r| r["job_id"] == job.as_str()).cloned();
    let row = row.unwrap_or_else(|| panic!("the peer's dashboard does not list {job}: {rows}"));
    assert!(row["steps_done"].as_u64().unwrap() >= 200, "{row}");
    let detail = dcnr_tests::get_json(&format!("{peer_dashboard}api/jobs/{job}")).unwrap();
    assert_eq!(detail["job"]["state"], "running", "{detail}");

    mesh.kill_orchestrator();
    let killed = Instant::now();
    let resumed = wait_for("the peer to take the job over", Duration::from_secs(30), || {
        job_state(&peer_url, &job).filter(|(state, done)| state == "running" && *done > 0)
    })
    .unwrap();
    eprintln!("takeover: first step on the peer {:?} after the kill (step {})", killed.elapsed(), resumed.1);
    wait_for("the job to finish on the peer", T, || {
        job_state(&peer_url, &job).filter(|(state, _)| state == "succeeded" || state == "failed")
    })
    .unwrap();
    // The record is written just after the state turns final.
    let result = wait_for("the job's record", Duration::from_secs(10), || match s3_root {
        Some(base) => stored_result(base, &job),
        None => mesh.result(&job).ok(),
    })
    .unwrap();
    assert_eq!(result["summary"]["status"], "succeeded", "{result}");
    assert_eq!(result["summary"]["params_sha256"], reference["params_sha256"], "taken over, the job drifted");

    // An orchestrator that never held the job answers for it from the shared store.
    let (_third, third_url) = mesh.start_peer_orchestrator().unwrap();
    let out = run(&["jobs", &job, "--json", "--orchestrator", &third_url], T).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status = last_json(&out.stdout).unwrap();
    assert_eq!(status["state"], "succeeded", "{status}");
    assert_eq!(status["summary"]["params_sha256"], reference["params_sha256"], "{status}");
}

#[test]
fn a_job_survives_the_death_of_its_orchestrator_and_ends_as_train_local() {
    survives_the_death_of_its_orchestrator(&[], &[], None);
}

#[test]
fn leases_in_s3_hand_a_job_over_the_same_way() {
    let s3 = S3Server::start(&["dcnr"]).unwrap();
    let args = ["--store", "s3://dcnr/ha", "--s3-endpoint", &s3.endpoint];
    survives_the_death_of_its_orchestrator(&args, &s3.env(), Some(&s3.root.path().join("dcnr/ha")));
}

/// The healthy PNodes the orchestrator at `url` lists.
fn healthy_pnodes(url: &str) -> usize {
    let out = run(&["pnodes", "--json", "--orchestrator", url], Duration::from_secs(10)).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array().map(|a| a.iter().filter(|p| p["health"] == "healthy").count()).unwrap_or(0)
}

#[test]
fn pnodes_work_for_every_orchestrator_and_one_dying_leaves_the_others_jobs_alone() {
    let model = fixture("tiny-mlp.toml");
    let f = model.to_str().unwrap();
    // The peer's own job is the longer one: it must outlast the other's takeover.
    let (steps, longer) = ("3000", "9000");
    let reference = |steps: &str| {
        let local = run(&["train-local", f, "--steps", steps, "--json"], T).unwrap();
        assert!(local.status.success(), "{}", String::from_utf8_lossy(&local.stderr));
        last_json(&local.stdout).unwrap()["params_sha256"].clone()
    };
    let (reference, reference_longer) = (reference(steps), reference(longer));

    let mut mesh = Mesh::start_with(0, &["--lease-term-s", "1"], &[]).unwrap();
    let (_peer, peer_url) = mesh.start_peer_orchestrator().unwrap();
    let both = format!("{},{peer_url}", mesh.url);
    for _ in 0..3 {
        mesh.add_pnode_joining(&both, &[]).unwrap();
    }
    // Every PNode is a member of both orchestrators at once.
    mesh.wait_for_pnodes(3).unwrap();
    wait_for("the peer to list every pnode", Duration::from_secs(30), || {
        (healthy_pnodes(&peer_url) == 3).then_some(())
    })
    .unwrap();

    // One job on each orchestrator, on the same PNodes.
    let submit = |url: &str, steps: &str| {
        let out = run(&["submit", f, "--orchestrator", url, "--steps", steps], T).unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let (owned, peers) = (submit(&mesh.url, steps), submit(&peer_url, longer));
    for (url, job) in [(&mesh.url, &owned), (&peer_url, &peers)] {
        wait_for("both jobs to train", T, || job_state(url, job).filter(|(s, done)| s == "running" && *done >= 200))
            .unwrap();
    }
    let status = |job: &str, url: &str| {
        let out = run(&["jobs", job, "--json", "--orchestrator", url], T).unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        last_json(&out.stdout).unwrap()
    };
    let hosts = |s: &serde_json::Value| -> std::collections::BTreeSet<String> {
        s["members"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|p| p.as_array().unwrap().clone())
            .map(|v| v.to_string())
            .collect()
    };
    let before = status(&peers, &peer_url);
    let shared = hosts(&status(&owned, &mesh.url)).intersection(&hosts(&before)).count();
    assert!(shared > 0, "the two jobs share no pnode: {before}");

    mesh.kill_orchestrator();
    // The dead orchestrator's job moves to the peer; by then the PNodes have given up what the
    // dead one placed on them, and the peer's own job is still training.
    wait_for("the peer to take the job over", Duration::from_secs(30), || {
        job_state(&peer_url, &owned).filter(|(state, done)| state == "running" && *done > 0)
    })
    .unwrap();
    let (state, _) = job_state(&peer_url, &peers).unwrap();
    assert_eq!(state, "running", "the peer's job ended before the takeover: the test proves nothing");
    for (job, reference) in [(&owned, &reference), (&peers, &reference_longer)] {
        wait_for("both jobs to finish on the peer", T, || {
            job_state(&peer_url, job).filter(|(state, _)| state == "succeeded" || state == "failed")
        })
        .unwrap();
        let result = wait_for("the job's record", Duration::from_secs(10), || mesh.result(job).ok()).unwrap();
        assert_eq!(result["summary"]["status"], "succeeded", "{result}");
        assert_eq!(&result["summary"]["params_sha256"], reference, "{job} drifted");
    }
    // The peer's own job never noticed: no VNode of it was dropped or moved.
    let after = status(&peers, &peer_url);
    assert_eq!(after["summary"]["recoveries"].as_array().map(Vec::len), Some(0), "{after}");
}

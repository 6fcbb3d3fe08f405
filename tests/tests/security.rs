//! The mesh as an attacker sees it: every RPC of both services called with no credentials, over
//! plaintext, as a registered PNode acting for another, and by a PNode calling what only the
//! orchestrator may. Each is refused with UNAUTHENTICATED or PERMISSION_DENIED and counted, and a
//! job trained while it all happens ends with `train-local`'s parameters.

use dcnr_proto::tls::Expect;
use dcnr_proto::v1;
use dcnr_tests::{Caller, Mesh, channel, fixture, http_get, last_json, orchestrator_client, register_member, run};
use std::time::Duration;
use tonic::Code;

type PNodeClient = v1::p_node_client::PNodeClient<tonic::transport::Channel>;
type OrchClient = v1::orchestrator_client::OrchestratorClient<tonic::transport::Channel>;

fn refused<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, what: &str) {
    match r {
        Err(s) => assert_eq!(s.code(), code, "{what}: {s}"),
        Ok(v) => panic!("{what} was accepted: {v:?}"),
    }
}

fn failure_report(pnode: &str, generation: u32) -> v1::VNodeReport {
    v1::VNodeReport {
        job_id: String::new(),
        vnode: 0,
        micro_batch: 0,
        pnode_id: pnode.to_string(),
        body: Some(v1::v_node_report::Body::Failure(v1::VNodeFailure { message: "forged".into() })),
        generation,
    }
}

/// Every orchestrator-only and member-only RPC of a PNode, as `who`.
async fn attack_pnode(endpoint: &str, who: &Caller, code: Code, job: &str) {
    let c = channel(endpoint, Expect::AnyPNode, who).await.unwrap();
    let mut pn = PNodeClient::new(c);
    let label = |rpc: &str| format!("{rpc} on a pnode");
    refused(
        pn.fetch_params(v1::FetchParamsRequest { job_id: job.into(), vnode: 0 }).await,
        code,
        &label("FetchParams"),
    );
    refused(pn.release(v1::ReleaseRequest { job_id: job.into(), ..Default::default() }).await, code, &label("Release"));
    refused(pn.snapshot(v1::SnapshotRequest { job_id: job.into(), vnode: 0 }).await, code, &label("Snapshot"));
    let alloc = v1::AllocateRequest { job_id: job.into(), graph_json: "{}".into(), in_flight: 1, ..Default::default() };
    refused(pn.allocate(alloc).await, code, &label("Allocate"));
    if matches!(who, Caller::Anonymous) {
        refused(pn.ping(v1::PingRequest { payload: None, job_id: String::new() }).await, code, &label("Ping"));
        refused(pn.exchange(tokio_stream::iter(Vec::<v1::VNodeMessage>::new())).await, code, &label("Exchange"));
    }
}

#[test]
fn callers_without_the_right_credentials_are_refused_and_training_is_unharmed() {
    let mesh = Mesh::start_with(2, &["--dashboard", "127.0.0.1:0"], &[]).unwrap();
    let job_file = fixture("tiny-mlp.toml");
    let job_path = job_file.to_str().unwrap().to_string();
    let reference = run(&["train-local", &job_path, "--steps", "3000", "--json"], Duration::from_secs(120)).unwrap();
    let want = last_json(&reference.stdout).unwrap()["params_sha256"].as_str().unwrap().to_string();
    // The job trains while the attacks run.
    let trainer = mesh
        .spawn_cli(&["submit", &job_path, "--orchestrator", &mesh.url, "--steps", "3000", "--wait", "--json"])
        .unwrap();
    let job = dcnr_tests::wait_for("the job to start", Duration::from_secs(30), || {
        mesh.jobs().ok()?.iter().find(|j| j["state"] == "running").and_then(|j| j["job_id"].as_str().map(String::from))
    })
    .unwrap();
    let pnodes = mesh.pnodes().unwrap();
    let victim_id = pnodes[0]["pnode_id"].as_str().unwrap().to_string();
    let victim_endpoint = pnodes[0]["endpoint"].as_str().unwrap().to_string();

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        // No credentials at all.
        let mut anon = orchestrator_client(&mesh.url).await.unwrap();
        let submit = v1::SubmitJobRequest { graph_toml: "x".into(), ..Default::default() };
        refused(anon.submit_job(submit.clone()).await, Code::Unauthenticated, "anonymous SubmitJob");
        refused(
            anon.resume_job(v1::ResumeJobRequest { job_id: job.clone(), steps: 0 }).await,
            Code::Unauthenticated,
            "anonymous ResumeJob",
        );
        for id in [&victim_id] {
            let drain = v1::DrainRequest { pnode_id: id.to_string(), timeout_ms: 10 };
            refused(anon.drain(drain).await, Code::Unauthenticated, "anonymous Drain");
            let hb = v1::HeartbeatRequest { pnode_id: id.to_string(), ..Default::default() };
            refused(anon.heartbeat(hb).await, Code::Unauthenticated, "anonymous Heartbeat");
        }
        let reports: Vec<_> = (1..40).map(|g| failure_report(&victim_id, g)).collect();
        refused(anon.report(tokio_stream::iter(reports)).await, Code::Unauthenticated, "anonymous Report");
        refused(
            anon.resolve(v1::ResolveRequest { job_id: job.clone(), vnode: 0 }).await,
            Code::Unauthenticated,
            "anonymous Resolve",
        );
        refused(
            anon.fetch_dataset(v1::FetchDatasetRequest { sha256: "ab".repeat(32) }).await.map(|_| ()),
            Code::Unauthenticated,
            "anonymous FetchDataset",
        );
        attack_pnode(&victim_endpoint, &Caller::Anonymous, Code::Unauthenticated, &job).await;

        // A wrong maintainer token.
        let mut req = tonic::Request::new(submit.clone());
        req.metadata_mut().insert("authorization", "Bearer not-the-token".parse().unwrap());
        refused(anon.submit_job(req).await, Code::PermissionDenied, "SubmitJob with a wrong token");

        // A registered PNode acting as another, or as the orchestrator.
        let me = register_member(&mesh.url, 77, "https://127.0.0.1:9").await.unwrap();
        let mut orch = OrchClient::new(channel(&mesh.url, Expect::Orchestrator, &me).await.unwrap());
        let drain = v1::DrainRequest { pnode_id: victim_id.clone(), timeout_ms: 10 };
        refused(orch.drain(drain).await, Code::PermissionDenied, "Drain of another pnode");
        let hb = v1::HeartbeatRequest { pnode_id: victim_id.clone(), ..Default::default() };
        refused(orch.heartbeat(hb).await, Code::PermissionDenied, "Heartbeat as another pnode");
        let reports: Vec<_> = (1..40).map(|g| failure_report(&victim_id, g)).collect();
        refused(orch.report(tokio_stream::iter(reports)).await, Code::PermissionDenied, "Report for another pnode");
        refused(orch.submit_job(submit).await, Code::Unauthenticated, "SubmitJob by a pnode without a token");
        attack_pnode(&victim_endpoint, &me, Code::PermissionDenied, &job).await;

        // A member sending VNode traffic in the name of a VNode placed elsewhere: `act1` (vnode 1)
        // takes its input from `fc1` (vnode 0), which is not on this member.
        let generation = mesh.jobs().unwrap().iter().find(|j| j["job_id"] == job.as_str()).unwrap()["generation"]
            .as_u64()
            .unwrap() as u32;
        let forged = v1::VNodeMessage {
            job_id: job.clone(),
            to_vnode: 1,
            micro_batch: 1_000_000,
            body: Some(v1::v_node_message::Body::Forward(v1::Forward {
                port: 0,
                phase: v1::Phase::Train as i32,
                tensor: Some(v1::Tensor { shape: vec![1, 32], dtype: v1::Dtype::F32 as i32, data: vec![0; 128] }),
            })),
            generation,
            seal: None,
        };
        let mut hits = 0;
        for p in mesh.pnodes().unwrap().iter().filter(|p| p["name"] != "member-77") {
            let c = channel(p["endpoint"].as_str().unwrap(), Expect::AnyPNode, &me).await.unwrap();
            match PNodeClient::new(c).exchange(tokio_stream::iter(vec![forged.clone()])).await {
                Err(s) if s.code() == Code::PermissionDenied => hits += 1,
                other => panic!("forged VNode message: {other:?}"),
            }
        }
        // Both PNodes host part of the job, so both know where fc1 is placed.
        assert_eq!(hits, 2, "a message from where fc1 is not placed must be refused");

        // Plaintext to a TLS server: no handshake, no call.
        dcnr_proto::tls::set_client_security(dcnr_proto::tls::ClientSecurity::Plaintext);
        let plain = victim_endpoint.replace("https://", "http://");
        let ep = dcnr_proto::transport::endpoint(&plain, Some(Duration::from_secs(5)), &Expect::AnyPNode).unwrap();
        let result = match ep.connect().await {
            Ok(c) => PNodeClient::new(c).ping(v1::PingRequest { payload: None, job_id: String::new() }).await.err(),
            Err(e) => Some(tonic::Status::unavailable(e.to_string())),
        };
        assert!(result.is_some(), "a plaintext call to a TLS pnode was answered");
    });

    // Nothing the attacks did reached the job or the PNodes.
    let out = trainer.wait_with_output().unwrap();
    let s = last_json(&out.stdout).unwrap();
    assert_eq!(s["status"], "succeeded", "{s}");
    assert_eq!(s["params_sha256"].as_str().unwrap(), want, "the job under attack differs from train-local");
    let healthy =
        mesh.pnodes().unwrap().iter().filter(|p| p["health"] == "healthy" && p["name"] != "member-77").count();
    assert_eq!(healthy, 2, "a pnode was drained or lost");

    // ... and every refusal was counted.
    let dash = mesh.dashboard.clone().unwrap();
    // A page elsewhere that rebinds its DNS name to this machine sends its own Host: refused.
    let addr = dash.trim_start_matches("http://").trim_end_matches('/');
    let mut raw = std::net::TcpStream::connect(addr).unwrap();
    use std::io::{Read, Write};
    raw.write_all(b"GET /api/jobs HTTP/1.1\r\nHost: evil.example.com:8080\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    raw.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 421"), "{answer}");
    let (code, metrics) = http_get(&format!("{dash}metrics")).unwrap();
    assert_eq!(code, 200);
    for rpc in ["SubmitJob", "Drain", "Report", "Heartbeat", "FetchDataset", "Resolve", "ResumeJob"] {
        assert!(
            metrics.lines().any(|l| l.starts_with("dcnr_rpc_refused_total") && l.contains(&format!("rpc=\"{rpc}\""))),
            "{rpc} refusals not counted"
        );
    }
}

#[test]
fn with_token_reads_status_and_the_dashboard_need_a_maintainer_token() {
    let mesh = Mesh::start_with(1, &["--dashboard", "127.0.0.1:0", "--reads", "token"], &[]).unwrap();
    let token = dcnr_tests::maintainer_token().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut anon = orchestrator_client(&mesh.url).await.unwrap();
        refused(anon.list_jobs(v1::ListJobsRequest {}).await, Code::Unauthenticated, "anonymous ListJobs");
        refused(anon.list_p_nodes(v1::ListPNodesRequest {}).await, Code::Unauthenticated, "anonymous ListPNodes");
        let mut req = tonic::Request::new(v1::ListJobsRequest {});
        req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        assert!(anon.list_jobs(req).await.is_ok(), "a maintainer reads");
    });
    let dash = mesh.dashboard.clone().unwrap();
    let addr = dash.trim_start_matches("http://").trim_end_matches('/').to_string();
    let get = |path: &str, extra: &str| {
        use std::io::{Read, Write};
        let mut raw = std::net::TcpStream::connect(&addr).unwrap();
        let head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n");
        raw.write_all(head.as_bytes()).unwrap();
        let mut answer = String::new();
        raw.read_to_string(&mut answer).unwrap();
        answer
    };
    assert!(get("/api/jobs", "").starts_with("HTTP/1.1 401"), "no token");
    assert!(get("/api/jobs", "Authorization: Bearer wrong\r\n").starts_with("HTTP/1.1 401"), "a wrong token");
    assert!(get("/api/jobs", &format!("Authorization: Bearer {token}\r\n")).starts_with("HTTP/1.1 200"));
    let first = get(&format!("/?token={token}"), "");
    assert!(first.starts_with("HTTP/1.1 200") && first.to_lowercase().contains("set-cookie: dcnr_token="), "{first}");
    assert!(get("/api/jobs", &format!("Cookie: dcnr_token={token}\r\n")).starts_with("HTTP/1.1 200"));
}

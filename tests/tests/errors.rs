//! Bad input gets a clear error and a meaningful exit code: malformed graphs, wrong protocol
//! versions, garbled gRPC messages, unreachable orchestrators, wrong flags.

use dcnr_proto::v1;
use dcnr_tests::{Mesh, channel, fixture, orchestrator_client, register_member, run, run_bin};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

#[test]
fn malformed_graph_is_rejected_with_a_precise_error() {
    let mesh = Mesh::start(1).unwrap();
    let out =
        run(&["submit", fixture("bad-kind.toml").to_str().unwrap(), "--orchestrator", &mesh.url, "--wait"], T).unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown kind `convolution9000`") && err.contains("fc1"), "{err}");
    let local = run(&["train-local", fixture("bad-kind.toml").to_str().unwrap()], T).unwrap();
    assert_eq!(local.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&local.stderr).contains("unknown kind"));
}

#[test]
fn pnode_with_another_protocol_version_is_refused() {
    let mesh = Mesh::start(0).unwrap();
    let out = run_bin("pnode", &["--orchestrator", &mesh.url, "--protocol-version", "99"], T).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("protocol version 99 is not supported") && err.contains("version 1"), "{err}");
}

#[test]
fn unreachable_orchestrator_and_bad_flags_have_distinct_exit_codes() {
    // A mesh first, so that this process's CA exists; port 1 on loopback is closed.
    let _mesh = Mesh::start(0).unwrap();
    let out = run(&["jobs", "--orchestrator", "https://127.0.0.1:1"], T).unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(&["demo", "--no-such-flag"], T).unwrap();
    assert_eq!(out.status.code(), Some(2));
    for (bin, args) in
        [("orchestrator", vec!["--help"]), ("orchestrator", vec!["demo", "--help"]), ("pnode", vec!["--help"])]
    {
        let out = run_bin(bin, &args, T).unwrap();
        assert!(out.status.success() && !out.stdout.is_empty(), "{bin} {args:?}");
    }
}

#[test]
fn garbled_and_oversized_vnode_messages_are_refused() {
    let mesh = Mesh::start(1).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut orch = orchestrator_client(&mesh.url).await.unwrap();
        let pnodes = orch.list_p_nodes(v1::ListPNodesRequest {}).await.unwrap().into_inner().pnodes;
        let endpoint = pnodes[0].endpoint.clone();
        // A registered member of the mesh may send VNode traffic; its garbage is still refused.
        let me = register_member(&mesh.url, 41, "https://127.0.0.1:9").await.unwrap();
        let c = channel(&endpoint, dcnr_proto::tls::Expect::AnyPNode, &me).await.unwrap();
        let mut pn = v1::p_node_client::PNodeClient::new(c);
        // Shape says 4 floats, bytes hold 3.
        let bad = v1::VNodeMessage {
            job_id: "nojob".into(),
            to_vnode: 0,
            micro_batch: 0,
            body: Some(v1::v_node_message::Body::Forward(v1::Forward {
                port: 0,
                phase: v1::Phase::Train as i32,
                tensor: Some(v1::Tensor { shape: vec![2, 2], dtype: v1::Dtype::F32 as i32, data: vec![0; 12] }),
            })),
            generation: 1,
            seal: None,
        };
        let err = pn.exchange(tokio_stream::iter(vec![bad])).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("needs 16 bytes but carries 12"), "{}", err.message());
        // A well-formed message for a VNode this pnode does not host.
        let stray = v1::VNodeMessage {
            job_id: "nojob".into(),
            to_vnode: 3,
            micro_batch: 0,
            body: Some(v1::v_node_message::Body::Forward(v1::Forward {
                port: 0,
                phase: v1::Phase::Train as i32,
                tensor: Some(v1::Tensor { shape: vec![1], dtype: v1::Dtype::F32 as i32, data: vec![0; 4] }),
            })),
            generation: 1,
            seal: None,
        };
        // ... is stale (a relocation moved it away), not a broken stream: dropped and counted.
        let stale = |pn: &mut v1::p_node_client::PNodeClient<tonic::transport::Channel>| {
            let mut pn = pn.clone();
            async move {
                let req = v1::PingRequest { payload: None, job_id: String::new() };
                pn.ping(req).await.unwrap().into_inner().stale_dropped
            }
        };
        let before = stale(&mut pn).await;
        let ack = pn.exchange(tokio_stream::iter(vec![stray.clone(), stray])).await.unwrap().into_inner();
        assert_eq!(ack.received, 2);
        assert_eq!(stale(&mut pn).await, before + 2);
        // Larger than the protocol's 64 MiB message limit.
        let huge =
            v1::AllocateRequest { job_id: "x".into(), graph_json: "x".repeat(65 * 1024 * 1024), ..Default::default() };
        let mut pn = pn.max_encoding_message_size(128 * 1024 * 1024);
        let err = pn.allocate(huge).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::OutOfRange, "{err}");
        // Allocation with a graph that is not a validated graph.
        let err = pn
            .allocate(v1::AllocateRequest {
                job_id: "x".into(),
                graph_json: "{}".into(),
                in_flight: 1,
                ..Default::default()
            })
            .await
            .unwrap_err();
        // ... but placing work is the orchestrator's alone.
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    });
    assert!(mesh_alive(mesh));
}

fn mesh_alive(mut mesh: Mesh) -> bool {
    mesh.orchestrator_alive()
}

#[test]
fn vnodes_that_do_not_fit_in_memory_are_refused_with_the_numbers() {
    let mut mesh = Mesh::start(0).unwrap();
    mesh.add_pnode_with(&["--memory-mib", "1"]).unwrap();
    mesh.wait_for_pnodes(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join("job.toml");
    let model = dcnr_tests::model("mnist-mlp.toml");
    std::fs::write(&env, format!("[op]\nmodel = {:?}\nsteps = 5\n[policy]\ntimeout_s = 5\n", model.to_str().unwrap()))
        .unwrap();
    let out = mesh.submit_raw(&env, &[]).unwrap();
    assert_eq!(out.status.code(), Some(1));
    let s = dcnr_tests::last_json(&out.stdout).unwrap();
    let err = s["error"].as_str().unwrap();
    assert!(err.contains("need") && err.contains("offers 1048576"), "{err}");
}

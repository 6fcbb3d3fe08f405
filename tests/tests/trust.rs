//! Trust with real processes: PNode identities persist and are proved at registration, the
//! trusted-mode token is checked, a PNode sending NaN is caught by the cheap checks, named,
//! downscored and quarantined, and a quarantined identity cannot register again.

use dcnr_proto::v1;
use dcnr_tests::{Mesh, fixture, run, run_bin};
use ed25519_dalek::SigningKey;
use sha2::Digest;
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn pnodes(mesh: &Mesh) -> Vec<serde_json::Value> {
    let out = run(&["pnodes", "--json", "--orchestrator", &mesh.url], T).unwrap();
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap().as_array().cloned().unwrap_or_default()
}

fn by_name(mesh: &Mesh, name: &str) -> serde_json::Value {
    pnodes(mesh).into_iter().find(|p| p["name"] == name).unwrap_or_else(|| panic!("no pnode named {name}"))
}

/// The id a key file's key gives, derived here independently of the code under test.
fn id_of_key_file(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("pnode.key")).unwrap();
    let secret: [u8; 32] = hex::decode(text.lines().nth(1).unwrap()).unwrap().try_into().unwrap();
    let public = SigningKey::from_bytes(&secret).verifying_key().to_bytes();
    let mut h = sha2::Sha256::new();
    h.update(b"dcnr-pnode-id-v1\0");
    h.update(public);
    format!("pn-{}", &hex::encode(h.finalize())[..16])
}

#[test]
fn nan_results_are_caught_discarded_and_the_sender_is_quarantined_for_good() {
    let mut mesh = Mesh::start_with(0, &["--quarantine-after", "1"], &[]).unwrap();
    // A second orchestrator on the same store: a quarantine decided by the first holds there too.
    let (_peer, peer_url) = mesh.start_peer_orchestrator().unwrap();
    let dirs = tempfile::tempdir().unwrap();
    let (honest, cheat) = (dirs.path().join("honest"), dirs.path().join("cheat"));
    mesh.add_pnode_with(&["--name", "honest", "--data-dir", honest.to_str().unwrap()]).unwrap();
    mesh.add_pnode_with(&["--name", "cheat", "--data-dir", cheat.to_str().unwrap(), "--fault", "nan"]).unwrap();
    mesh.wait_for_pnodes(2).unwrap();
    let cheat_id = by_name(&mesh, "cheat")["pnode_id"].as_str().unwrap().to_string();
    assert_eq!(cheat_id, id_of_key_file(&cheat));

    let env = dirs.path().join("job.toml");
    let model = fixture("tiny-mlp.toml");
    std::fs::write(
        &env,
        format!("[op]\nmodel = {:?}\nsteps = 20\n[policy]\nmin_pnodes = 2\nmax_pnodes = 2\n", model.to_str().unwrap()),
    )
    .unwrap();
    let out = mesh.submit_raw(&env, &[]).unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let s = dcnr_tests::last_json(&out.stdout).unwrap();
    // The cheater's work is discarded and the job goes on without it, ending exactly like a
    // run that never met it.
    let reference = run_bin("orchestrator", &["train-local", env.to_str().unwrap(), "--json"], T).unwrap();
    let reference = dcnr_tests::last_json(&reference.stdout).unwrap();
    assert_eq!(s["params_sha256"], reference["params_sha256"], "{s}");
    let why = s["recoveries"][0]["reason"].as_str().unwrap_or_default();
    assert!(why.contains(&cheat_id) && why.contains("NaN") && why.contains("invalid result"), "{s}");

    // The record and the verification report name the quarantined identity.
    let job = s["job_id"].as_str().unwrap();
    let store = mesh.artifacts.path();
    let object = |hash: &str| std::fs::read(store.join("objects").join(&hash[..2]).join(hash)).unwrap();
    let rec_hash = std::fs::read_to_string(store.join("refs/jobs").join(job)).unwrap();
    let rec: serde_json::Value = serde_json::from_slice(&object(rec_hash.trim())).unwrap();
    assert_eq!(rec["status"], "succeeded", "{rec}");
    let ver_hash = rec["artifacts"]["verification.json"].as_str().unwrap_or_else(|| panic!("{rec}"));
    let ver: serde_json::Value = serde_json::from_slice(&object(ver_hash)).unwrap();
    assert_eq!(ver["invalid_results"][0]["pnode"], cheat_id.as_str(), "{ver}");
    // Caught at the first micro-batch it sent: with rate 1 every output carries a NaN.
    assert_eq!(ver["invalid_results"][0]["step"], 0, "{ver}");
    assert_eq!(ver["quarantines"][0]["pnode"], cheat_id.as_str(), "{ver}");

    let p = by_name(&mesh, "cheat");
    assert_eq!(p["standing"], "quarantined", "{p}");
    assert!(p["quarantine_reason"].as_str().unwrap().contains("NaN"), "{p}");
    assert_eq!(by_name(&mesh, "honest")["standing"], "new");

    // Restarted honestly under the same identity, it is still refused.
    mesh.kill_pnode(1);
    let out =
        run_bin("pnode", &["--orchestrator", &mesh.url, "--name", "cheat", "--data-dir", cheat.to_str().unwrap()], T)
            .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("quarantined") && stderr.contains(&cheat_id), "{stderr}");
    // The other orchestrator reads the first one's book within a second or two.
    std::thread::sleep(Duration::from_secs(3));
    let out =
        run_bin("pnode", &["--orchestrator", &peer_url, "--name", "cheat", "--data-dir", cheat.to_str().unwrap()], T)
            .unwrap();
    assert!(!out.status.success(), "the peer orchestrator admitted a quarantined identity");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("quarantined") && stderr.contains(&cheat_id), "{stderr}");

    // The quarantine is saved with the store: a crashed and restarted orchestrator refuses it too,
    // and still knows the honest identity.
    mesh.kill_orchestrator();
    mesh.restart_orchestrator().unwrap();
    let out =
        run_bin("pnode", &["--orchestrator", &mesh.url, "--name", "cheat", "--data-dir", cheat.to_str().unwrap()], T)
            .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("quarantined") && stderr.contains("NaN") && stderr.contains(&cheat_id), "{stderr}");
    mesh.wait_for_pnodes(1).unwrap();
    assert_eq!(by_name(&mesh, "honest")["standing"], "new");
}

#[test]
fn identity_persists_and_tokens_and_corrupt_keys_are_handled() {
    let dirs = tempfile::tempdir().unwrap();
    let token = dirs.path().join("token");
    std::fs::write(&token, "open-sesame\n").unwrap();
    let mut mesh = Mesh::start_with(0, &["--trusted-token-file", token.to_str().unwrap()], &[]).unwrap();
    let data = dirs.path().join("a");
    let flags = ["--name", "a", "--data-dir", data.to_str().unwrap(), "--trusted-token-file", token.to_str().unwrap()];
    mesh.add_pnode_with(&flags).unwrap();
    mesh.wait_for_pnodes(1).unwrap();
    let first = by_name(&mesh, "a");
    let id = first["pnode_id"].as_str().unwrap().to_string();
    assert_eq!(id, id_of_key_file(&data));
    assert_eq!((first["trusted"].as_bool(), first["standing"].as_str()), (Some(true), Some("trusted")));

    // Same data directory after a restart: same id, one entry, a new endpoint.
    mesh.kill_pnode(0);
    mesh.add_pnode_with(&flags).unwrap();
    let deadline = std::time::Instant::now() + T;
    loop {
        let again = by_name(&mesh, "a");
        if again["endpoint"] != first["endpoint"] && again["health"] == "healthy" {
            assert_eq!(again["pnode_id"], id.as_str());
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the restarted pnode did not register again");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(pnodes(&mesh).iter().filter(|p| p["pnode_id"] == id.as_str()).count(), 1);

    // No token: admitted, untrusted. A wrong token: refused.
    mesh.add_pnode_with(&["--name", "plain"]).unwrap();
    mesh.wait_for_pnodes(2).unwrap();
    let plain = by_name(&mesh, "plain");
    assert_eq!((plain["trusted"].as_bool(), plain["standing"].as_str()), (Some(false), Some("new")));
    let wrong = dirs.path().join("wrong");
    std::fs::write(&wrong, "guess").unwrap();
    let out =
        run_bin("pnode", &["--orchestrator", &mesh.url, "--trusted-token-file", wrong.to_str().unwrap()], T).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("token does not match"));

    // A corrupt key file is an error and is left as it was.
    let bad = dirs.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::write(bad.join("pnode.key"), "garbage").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(bad.join("pnode.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let out = run_bin("pnode", &["--orchestrator", &mesh.url, "--data-dir", bad.to_str().unwrap()], T).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("corrupt"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(bad.join("pnode.key")).unwrap(), "garbage");
}

#[test]
fn registrations_without_a_valid_proof_of_key_are_refused() {
    let mesh = Mesh::start(0).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut orch = dcnr_tests::orchestrator_client(&mesh.url).await.unwrap();
        let (mine, other) = (SigningKey::from_bytes(&[5; 32]), SigningKey::from_bytes(&[6; 32]));
        let challenge = |key: &SigningKey| v1::ChallengeRequest { public_key: key.verifying_key().to_bytes().to_vec() };
        let request = |nonce: Vec<u8>| v1::RegisterRequest {
            protocol_version: dcnr_proto::PROTOCOL_VERSION,
            name: "raw".into(),
            endpoint: "http://127.0.0.1:9".into(),
            nonce,
            ..Default::default()
        };
        // Signed by another key than the one claimed.
        let nonce = orch.challenge(challenge(&mine)).await.unwrap().into_inner().nonce;
        let mut forged = request(nonce);
        dcnr_proto::identity::sign_registration(&other, &mut forged);
        forged.public_key = mine.verifying_key().to_bytes().to_vec();
        let err = orch.register(forged).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
        assert!(err.message().contains("does not verify"), "{}", err.message());
        // No key at all (an older pnode build).
        let err = orch.register(request(vec![0; 32])).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        // A nonce that was never issued.
        let mut unissued = request(vec![1; 32]);
        dcnr_proto::identity::sign_registration(&mine, &mut unissued);
        let err = orch.register(unissued).await.unwrap_err();
        assert!(err.message().contains("nonce"), "{}", err.message());
        // A valid registration works once; replaying it does not.
        let nonce = orch.challenge(challenge(&mine)).await.unwrap().into_inner().nonce;
        let mut good = request(nonce);
        dcnr_proto::identity::sign_registration(&mine, &mut good);
        let id = orch.register(good.clone()).await.unwrap().into_inner().pnode_id;
        assert_eq!(id, dcnr_proto::identity::pnode_id(&mine.verifying_key().to_bytes()));
        let err = orch.register(good).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.message().contains("unknown, used or expired"), "{}", err.message());
    });
}

//! Finding the orchestrator through DNS: a real DNS server (dnsmasq) on loopback publishes SRV
//! and TXT records under `_dcnr._tcp.NAME`, and a `pnode --orchestrator dns:NAME` finds the
//! orchestrator, pins its CA from the TXT record, passes over a dead candidate, notices a DNS
//! change while it waits, refuses a CA other than the published one, joins an orchestrator added
//! to the name later, and, when the first dies, that one finishes the job.

use dcnr_tests::{Mesh, Proc, bin, ca_file, fixture, free_port, job_state, last_json, run, secure, wait_for};
use std::process::{Command, Stdio};
use std::time::Duration;

const NAME: &str = "mesh.test";
const T: Duration = Duration::from_secs(30);

/// dnsmasq serving only the given SRV targets `(port, priority)` (all on 127.0.0.1) and TXT
/// strings under `_dcnr._tcp.mesh.test`, with TTL 0, on `port`.
fn dns(port: u16, targets: &[(u16, u16)], txt: &[String]) -> Proc {
    let mut cmd = Command::new("dnsmasq");
    cmd.args(["--no-daemon", "--conf-file=/dev/null", "--listen-address=127.0.0.1", "--bind-interfaces"])
        .args(["--no-resolv", "--no-hosts", "--user=root", "--local-ttl=0"])
        .arg(format!("--port={port}"));
    for (target, priority) in targets {
        cmd.arg(format!("--srv-host=_dcnr._tcp.{NAME},127.0.0.1,{target},{priority},0"));
    }
    for t in txt {
        cmd.arg(format!("--txt-record=_dcnr._tcp.{NAME},{t}"));
    }
    let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("dnsmasq (Debian's dnsmasq-base) runs");
    // Up once it answers on TCP.
    wait_for("dnsmasq", Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", port)).ok()).unwrap();
    Proc(child)
}

fn ca_sha256() -> String {
    dcnr_proto::tls::MeshTls::from_ca_file(&ca_file()).unwrap().ca_sha256()
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':').next().unwrap().parse().unwrap()
}

/// A PNode joining `dns:mesh.test` through the DNS server on `dns_port`, with no CA of its own.
fn pnode(dns_port: u16, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(bin("pnode"));
    secure(&mut cmd).env_remove("DCNR_CA");
    let child = cmd
        .args(["--orchestrator", &format!("dns:{NAME}"), "--dns-server", &format!("127.0.0.1:{dns_port}")])
        .args(["--listen", "127.0.0.1:0", "--name", "found-by-dns"])
        .args(extra)
        .env("RUST_LOG", std::env::var("DCNR_TEST_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Proc(child)
}

#[test]
fn a_pnode_finds_the_orchestrator_and_its_ca_through_dns_and_trains() {
    let mut mesh = Mesh::start(0).unwrap();
    let dns_port = free_port().unwrap();
    let dead = free_port().unwrap();
    // The dead candidate comes first (lower priority value); the PNode must pass over it.
    let _dns = dns(dns_port, &[(dead, 0), (port_of(&mesh.url), 10)], &[format!("dcnr-ca-sha256={}", ca_sha256())]);
    let _p = pnode(dns_port, &[]);
    mesh.wait_for_pnodes(1).unwrap();
    let s = mesh.submit_wait(&fixture("tiny-mlp.toml"), &["--steps", "30"]).unwrap();
    assert_eq!(s["status"], "succeeded", "{s}");
    // The command line finds it the same way.
    let dns_server = format!("127.0.0.1:{dns_port}");
    let out =
        run(&["jobs", "--json", "--orchestrator", &format!("dns:{NAME}"), "--dns-server", &dns_server], T).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(s["job_id"].as_str().unwrap()));
    let none = run(&["jobs", "--orchestrator", "dns:nothing.test", "--dns-server", &dns_server], T).unwrap();
    assert_eq!(none.status.code(), Some(3), "unreachable: {}", String::from_utf8_lossy(&none.stderr));
}

#[test]
fn a_waiting_pnode_sees_a_dns_change_and_a_wrong_pin_is_refused() {
    let mut mesh = Mesh::start(0).unwrap();
    let dns_port = free_port().unwrap();
    let dead = free_port().unwrap();
    let pin = format!("dcnr-ca-sha256={}", ca_sha256());
    // At first DNS names only an orchestrator that is not there.
    let first = dns(dns_port, &[(dead, 0)], std::slice::from_ref(&pin));
    let mut p = pnode(dns_port, &["--connect-timeout-s", "30"]);
    std::thread::sleep(Duration::from_millis(1500));
    drop(first);
    // The record changes: the PNode, still retrying, resolves again and joins.
    let _second = dns(dns_port, &[(port_of(&mesh.url), 0)], &[pin]);
    if let Err(e) = mesh.wait_for_pnodes(1) {
        let _ = p.0.kill();
        let mut err = String::new();
        std::io::Read::read_to_string(p.0.stderr.as_mut().unwrap(), &mut err).unwrap();
        panic!("{e}: {err}");
    }

    // A published pin that is not the orchestrator's CA: the PNode never joins, and says why.
    let other_port = free_port().unwrap();
    let _bad = dns(other_port, &[(port_of(&mesh.url), 0)], &[format!("dcnr-ca-sha256={}", "0".repeat(64))]);
    let mut wrong = pnode(other_port, &["--connect-timeout-s", "3"]);
    let status =
        wait_for("the pnode to give up", Duration::from_secs(20), || wrong.0.try_wait().ok().flatten()).unwrap();
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(wrong.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("no orchestrator reachable from `dns:mesh.test`"), "{err}");
    assert!(err.contains("another CA"), "{err}");
}

#[test]
fn pnodes_follow_the_name_to_an_added_orchestrator_which_finishes_the_job() {
    let model = fixture("tiny-mlp.toml");
    let local = run(&["train-local", model.to_str().unwrap(), "--steps", "3000", "--json"], T).unwrap();
    assert!(local.status.success(), "{}", String::from_utf8_lossy(&local.stderr));
    let reference = last_json(&local.stdout).unwrap();
    let mut mesh = Mesh::start_with(0, &["--lease-term-s", "1"], &[]).unwrap();
    let (_b, b_url) = mesh.start_peer_orchestrator().unwrap();
    let dns_port = free_port().unwrap();
    let pin = format!("dcnr-ca-sha256={}", ca_sha256());
    // At first the name lists only the first orchestrator.
    let first = dns(dns_port, &[(port_of(&mesh.url), 0)], std::slice::from_ref(&pin));
    let _pnodes: Vec<Proc> = (0..2).map(|_| pnode(dns_port, &[])).collect();
    mesh.wait_for_pnodes(2).unwrap();
    // The second orchestrator is added to the name: the PNodes look it up again and join it
    // as well, while still members of the first.
    drop(first);
    let _both = dns(dns_port, &[(port_of(&mesh.url), 0), (port_of(&b_url), 10)], &[pin]);
    wait_for("the pnodes to join the added orchestrator", Duration::from_secs(30), || {
        let out = run(&["pnodes", "--json", "--orchestrator", &b_url], T).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v.as_array()?.iter().filter(|p| p["health"] == "healthy").count() == 2).then_some(())
    })
    .unwrap();
    mesh.wait_for_pnodes(2).unwrap();
    // A job on the first; then the first dies.
    let out = run(&["submit", model.to_str().unwrap(), "--orchestrator", &mesh.url, "--steps", "3000"], T).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let job = String::from_utf8_lossy(&out.stdout).trim().to_string();
    mesh.wait_for_step(200, T).unwrap();
    mesh.kill_orchestrator();
    wait_for("the job to finish on the added orchestrator", Duration::from_secs(120), || {
        job_state(&b_url, &job).filter(|(state, _)| state == "succeeded" || state == "failed")
    })
    .unwrap();
    let result = wait_for("the job's record", Duration::from_secs(10), || mesh.result(&job).ok()).unwrap();
    assert_eq!(result["summary"]["status"], "succeeded", "{result}");
    assert_eq!(result["summary"]["params_sha256"], reference["params_sha256"]);
}

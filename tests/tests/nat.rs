//! Volunteers behind NAT. Each test gives a PNode a network namespace of its own, joined to this
//! machine by a veth pair, where a firewall drops every incoming connection attempt while
//! connections out go through: the home router's view of the world. Such a PNode is found
//! unreachable (by the orchestrator's probe, or because it says so), listens at a relay, and
//! trains its share of a job bit for bit as a directly reached one would.
//!
//! Needs root (network namespaces, veth, iptables), as CI has; `.ci/run` installs iptables.

use dcnr_tests::{Mesh, fixture, run, wait_for};
use std::process::Command;
use std::time::Duration;

/// A network namespace of this test's own with a veth pair to this machine: `host` is this
/// machine's end, `inside` the namespace's. Removed, with its pair, when dropped.
struct Netns {
    name: String,
    host: String,
    inside: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("iproute2's ip runs");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

impl Netns {
    /// Namespace `k` of this process: 10.213.<pid>.(4k+1) here, .(4k+2) inside, where only
    /// connections the namespace opens get through.
    fn behind_nat(k: u32) -> Netns {
        let pid = std::process::id();
        let subnet = format!("10.213.{}", pid % 250);
        let (host, inside) = (format!("{subnet}.{}", 4 * k + 1), format!("{subnet}.{}", 4 * k + 2));
        let name = format!("dcnr-nat-{pid}-{k}");
        let (veth_host, veth_inside) = (format!("dh{}{k}", pid % 100_000), format!("dn{}{k}", pid % 100_000));
        ip(&["netns", "add", &name]);
        let ns = Netns { name: name.clone(), host: host.clone(), inside: inside.clone() };
        ip(&["link", "add", &veth_host, "type", "veth", "peer", "name", &veth_inside]);
        ip(&["link", "set", &veth_inside, "netns", &name]);
        ip(&["addr", "add", &format!("{host}/30"), "dev", &veth_host]);
        ip(&["link", "set", &veth_host, "up"]);
        ip(&["-n", &name, "addr", "add", &format!("{inside}/30"), "dev", &veth_inside]);
        ip(&["-n", &name, "link", "set", &veth_inside, "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        ip(&["-n", &name, "route", "add", "default", "via", &host]);
        // The NAT: nothing from outside may open a connection in; replies to ours get through.
        let fw = Command::new("ip")
            .args(["netns", "exec", &name, "iptables", "-A", "INPUT", "-i", &veth_inside])
            .args(["-p", "tcp", "--syn", "-j", "DROP"])
            .output()
            .expect("iptables runs");
        assert!(fw.status.success(), "iptables: {}", String::from_utf8_lossy(&fw.stderr));
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and with it ours.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn train_local(steps: &str) -> String {
    let out = run(
        &["train-local", fixture("tiny-mlp.toml").to_str().unwrap(), "--steps", steps, "--json"],
        Duration::from_secs(120),
    )
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = dcnr_tests::last_json(&out.stdout).unwrap();
    v["params_sha256"].as_str().unwrap().to_string()
}

#[test]
fn pnodes_behind_nat_train_their_share_through_the_orchestrators_relay() {
    let a = Netns::behind_nat(0);
    let b = Netns::behind_nat(1);
    let relay = format!("{}:0", a.host);
    let mut mesh = Mesh::start_on(&a.host, 1, &["--relay-listen", &relay, "--dashboard", "127.0.0.1:0"], &[]).unwrap();
    let url = mesh.url.clone();
    // One says nothing and is found out by the orchestrator's probe; the other declares itself.
    let in_a = ["ip", "netns", "exec", a.name.as_str()];
    mesh.add_pnode_in(&in_a, &url, &format!("{}:0", a.inside), &["--name", "test-pnode-1"]).unwrap();
    let in_b = ["ip", "netns", "exec", b.name.as_str()];
    mesh.add_pnode_in(&in_b, &url, &format!("{}:0", b.inside), &["--name", "test-pnode-2", "--behind-nat"]).unwrap();
    mesh.wait_for_pnodes(3).unwrap();
    let pnodes = mesh.pnodes().unwrap();
    let id_of = |name: &str| {
        let p = pnodes.iter().find(|p| p["name"] == name).unwrap_or_else(|| panic!("no {name} in {pnodes:?}"));
        (p["pnode_id"].as_str().unwrap().to_string(), p["relayed_via"].as_str().unwrap().to_string())
    };
    let (direct, direct_relay) = id_of("test-pnode-0");
    assert_eq!(direct_relay, "", "the pnode on this machine is reached directly");
    let mut relayed = Vec::new();
    for name in ["test-pnode-1", "test-pnode-2"] {
        let (id, via) = id_of(name);
        assert!(
            via.starts_with(&format!("{}:", a.host)),
            "{name} is reached through the orchestrator's relay: {pnodes:?}"
        );
        relayed.push(id);
    }
    // The dashboard shows how each is reached; a relayed one is reachable once its heartbeat
    // says it listens at the relay.
    let api = format!("{}api/pnodes", mesh.dashboard.clone().unwrap());
    let rows = wait_for("every pnode to be reachable", Duration::from_secs(10), || {
        let rows = dcnr_tests::get_json(&api).ok()?;
        rows.as_array()?.iter().all(|r| r["reachable"] == true).then_some(rows)
    })
    .unwrap();
    for r in rows.as_array().unwrap() {
        let via = r["reach"]["relayed_via"].as_str().unwrap_or("");
        assert_eq!(via.is_empty(), r["id"] == direct.as_str(), "{r}");
    }

    let want = train_local("300");
    let s = mesh.submit_wait(&fixture("tiny-mlp.toml"), &["--steps", "300"]).unwrap();
    assert_eq!(s["status"], "succeeded", "{s}");
    assert_eq!(s["params_sha256"].as_str().unwrap(), want, "the mesh with relayed pnodes differs from train-local");
    assert_eq!(s["recoveries"].as_array().map_or(0, Vec::len), 0, "no placement failed: {s}");
    // Every PNode hosted part of it: placement uses the relayed ones too (for the lighter runs).
    let hosts: std::collections::BTreeSet<String> =
        s["vnodes"].as_array().unwrap().iter().map(|v| v["pnode"].as_str().unwrap().to_string()).collect();
    for id in relayed.iter().chain([&direct]) {
        assert!(hosts.contains(id), "pnode {id} hosted nothing: {s}");
    }
}

#[test]
fn reachable_pnodes_relay_when_the_orchestrator_does_not_and_a_lost_relay_is_replaced() {
    let a = Netns::behind_nat(2);
    // No relay on the orchestrator: two direct PNodes offer one each.
    let mut mesh = Mesh::start_on(&a.host, 0, &[], &[]).unwrap();
    let url = mesh.url.clone();
    for _ in 0..2 {
        mesh.add_pnode_with(&["--relay-listen", &format!("{}:0", a.host)]).unwrap();
    }
    mesh.wait_for_pnodes(2).unwrap();
    let in_a = ["ip", "netns", "exec", a.name.as_str()];
    mesh.add_pnode_in(&in_a, &url, &format!("{}:0", a.inside), &["--behind-nat"]).unwrap();
    mesh.wait_for_pnodes(3).unwrap();
    let offers = |mesh: &Mesh| -> Vec<(String, String)> {
        let pnodes = mesh.pnodes().unwrap();
        ["test-pnode-0", "test-pnode-1"]
            .iter()
            .map(|n| pnodes.iter().find(|p| p["name"] == *n).unwrap())
            .map(|p| (p["name"].as_str().unwrap().to_string(), p["relay_offer"].as_str().unwrap().to_string()))
            .collect()
    };
    let offers = offers(&mesh);
    assert!(offers.iter().all(|(_, o)| o.starts_with(&format!("{}:", a.host))), "{offers:?}");
    let relayed_via = |mesh: &Mesh| -> Option<String> {
        let pnodes = mesh.pnodes().ok()?;
        let p = pnodes.iter().find(|p| p["name"] == "test-pnode-2")?;
        (p["health"] == "healthy" && p["unreachable"] == false).then(|| p["relayed_via"].as_str().unwrap().to_string())
    };
    let first =
        wait_for("the pnode behind NAT to listen at a relay", Duration::from_secs(20), || relayed_via(&mesh)).unwrap();
    let used = offers.iter().position(|(_, o)| *o == first).unwrap_or_else(|| panic!("{first} is none of {offers:?}"));

    // The relaying PNode dies: the one behind NAT asks for, and gets, the other relay.
    mesh.kill_pnode(used);
    let other = &offers[1 - used].1;
    wait_for("the pnode behind NAT to move to the other relay", Duration::from_secs(30), || {
        relayed_via(&mesh).filter(|r| r == other)
    })
    .unwrap();

    let want = train_local("200");
    let s = mesh.submit_wait(&fixture("tiny-mlp.toml"), &["--steps", "200"]).unwrap();
    assert_eq!(s["status"], "succeeded", "{s}");
    assert_eq!(s["params_sha256"].as_str().unwrap(), want);
    assert_eq!(s["pnodes"], 2, "the surviving direct pnode and the one behind NAT: {s}");
}

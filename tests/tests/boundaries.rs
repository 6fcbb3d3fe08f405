//! The crate layering of docs/ARCHITECTURE.md, checked against `cargo metadata`: a dependency
//! that crosses a boundary fails here, naming the rule it breaks.
//!
//! Direct dependencies of every kind (normal, dev, build) count: a crate that "knows no
//! networking" should not need it in its tests either.

use serde_json::{Value, json};
use std::path::Path;
use std::process::Command;

/// gRPC and the protobuf runtime.
const GRPC: &[&str] = &["tonic", "tonic-prost", "tonic-prost-build", "prost"];
/// The actor framework.
const ACTORS: &[&str] = &["actix", "actix-rt"];
/// Async runtime and IO.
const ASYNC: &[&str] = &["tokio", "tokio-stream", "futures"];
/// HTTP servers and clients, and what speaks HTTP for us.
const HTTP: &[&str] = &["axum", "hyper", "hyper-util", "ureq", "rust-s3"];
/// Tensor math.
const MATH: &[&str] = &["burn", "gemm", "pulp"];

/// What one workspace crate may depend on.
struct Rule {
    /// Package name.
    krate: &'static str,
    /// The workspace crates it may depend on.
    ours: &'static [&'static str],
    /// Groups of outside crates it must not depend on.
    forbidden: &'static [&'static [&'static str]],
    /// Crates of a forbidden group it may use all the same, each for one stated reason.
    excepted: &'static [&'static str],
}

const RULES: &[Rule] = &[
    // hyper-util only for `TokioIo`, the adapter tonic's custom connector needs (transport.rs);
    // proto speaks no HTTP of its own.
    Rule { krate: "dcnr-proto", ours: &[], forbidden: &[ACTORS, HTTP, MATH], excepted: &["hyper-util"] },
    Rule { krate: "dcnr-model", ours: &[], forbidden: &[GRPC, ACTORS, ASYNC, HTTP, MATH], excepted: &[] },
    Rule { krate: "dcnr-vnode", ours: &["dcnr-model"], forbidden: &[GRPC, ACTORS, ASYNC, HTTP], excepted: &[] },
    Rule { krate: "dcnr-mesh", ours: &["dcnr-proto", "dcnr-vnode"], forbidden: &[ACTORS, HTTP, MATH], excepted: &[] },
    Rule {
        krate: "dcnr-pnode",
        ours: &["dcnr-proto", "dcnr-model", "dcnr-vnode", "dcnr-mesh"],
        forbidden: &[],
        excepted: &[],
    },
    Rule {
        krate: "dcnr-orchestrator",
        ours: &["dcnr-proto", "dcnr-model", "dcnr-vnode", "dcnr-mesh"],
        forbidden: &[],
        excepted: &[],
    },
    // Integration tests drive the binaries as any client would, so they link no runtime.
    Rule { krate: "dcnr-tests", ours: &["dcnr-proto"], forbidden: &[ACTORS, MATH], excepted: &[] },
];

/// `cargo metadata` of this workspace, without resolving outside crates.
fn metadata() -> Value {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("Cargo.toml");
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline", "--manifest-path"])
        .arg(&manifest)
        .output()
        .expect("cargo metadata runs");
    assert!(out.status.success(), "cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON")
}

/// Every broken rule, one line each.
fn violations(meta: &Value) -> Vec<String> {
    let mut found = Vec::new();
    let packages = meta["packages"].as_array().cloned().unwrap_or_default();
    for p in &packages {
        let name = p["name"].as_str().unwrap_or_default();
        let Some(rule) = RULES.iter().find(|r| r.krate == name) else {
            found
                .push(format!("{name}: a workspace crate without a rule here; add one (docs/ARCHITECTURE.md, Crates)"));
            continue;
        };
        for d in p["dependencies"].as_array().into_iter().flatten() {
            let dep = d["name"].as_str().unwrap_or_default();
            let kind = d["kind"].as_str().unwrap_or("normal");
            if dep.starts_with("dcnr-") && !rule.ours.contains(&dep) {
                found.push(format!("{name} depends on {dep} ({kind}); it may depend on {:?} only", rule.ours));
            }
            if rule.forbidden.iter().any(|group| group.contains(&dep)) && !rule.excepted.contains(&dep) {
                found.push(format!("{name} depends on {dep} ({kind}), which it must not name"));
            }
        }
    }
    for r in RULES {
        if !packages.iter().any(|p| p["name"] == r.krate) {
            found.push(format!("{}: a rule for a crate that is not in the workspace", r.krate));
        }
    }
    found
}

#[test]
fn the_workspace_follows_the_crate_layering() {
    let found = violations(&metadata());
    assert!(found.is_empty(), "crate boundaries broken:\n  {}", found.join("\n  "));
}

/// Adds a dependency to package `name` of `meta`.
fn add_dependency(meta: &mut Value, name: &str, dep: Value) {
    let packages = meta["packages"].as_array_mut().expect("packages");
    let p = packages.iter_mut().find(|p| p["name"] == name).expect("package");
    p["dependencies"].as_array_mut().expect("dependencies").push(dep);
}

#[test]
fn a_crossing_dependency_or_an_unruled_crate_is_reported() {
    let mut meta = metadata();
    add_dependency(&mut meta, "dcnr-orchestrator", json!({ "name": "dcnr-pnode", "kind": null }));
    add_dependency(&mut meta, "dcnr-vnode", json!({ "name": "tonic", "kind": "dev" }));
    meta["packages"].as_array_mut().expect("packages").push(json!({ "name": "dcnr-new", "dependencies": [] }));
    let found = violations(&meta);
    let expected = [
        "dcnr-vnode depends on tonic (dev)",
        "dcnr-orchestrator depends on dcnr-pnode (normal)",
        "dcnr-new: a workspace crate without a rule",
    ];
    assert_eq!(found.len(), expected.len(), "{found:#?}");
    for e in expected {
        assert!(found.iter().any(|f| f.contains(e)), "{e} not reported: {found:#?}");
    }
}

//! The pnode binary's command line: help, env-var flags, and failing fast without an
//! orchestrator. (Its presence also makes `cargo test` build the binary the integration tests run.)

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_pnode");

#[test]
fn help_names_the_env_variables() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("DCNR_ORCHESTRATOR") && text.contains("--max-vnodes"), "{text}");
}

#[test]
fn unreachable_orchestrator_is_a_clear_error() {
    // Port 1 on loopback is closed; with a 1 s patience the pnode gives up quickly.
    let out = Command::new(BIN)
        .args(["--connect-timeout-s", "1"])
        .env("DCNR_ORCHESTRATOR", "https://127.0.0.1:1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach orchestrator at https://127.0.0.1:1"));
}

#[test]
fn bad_flag_values_are_usage_errors() {
    let out = Command::new(BIN).args(["--listen", "not-an-address"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

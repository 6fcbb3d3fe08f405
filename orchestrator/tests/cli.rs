//! The orchestrator binary's command line: help, version, and usage errors.
//! (Its presence also makes `cargo test` build the binary the integration tests run.)

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_orchestrator");

#[test]
fn help_lists_every_command_and_the_exit_codes() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["demo", "serve", "submit", "jobs", "pnodes", "train-local", "Exit codes"] {
        assert!(text.contains(cmd), "--help lacks {cmd}: {text}");
    }
}

#[test]
fn unknown_subcommand_and_missing_file_are_usage_errors() {
    let out = Command::new(BIN).arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(BIN).args(["train-local", "/nonexistent/model.toml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/model.toml"));
}

//! The mesh simulator, as CI runs it: 200 seeds of drawn faults through the real job core,
//! with zero invariant violations and every kind of fault drawn.

use dcnr_tests::run;
use std::time::Duration;

#[test]
fn two_hundred_seeds_break_no_invariant() {
    let out = run(&["simulate", "--seeds", "200", "--json"], Duration::from_secs(600)).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["seeds"], 200);
    assert_eq!(report["violations"].as_array().map(Vec::len), Some(0), "{report}");
    for kind in ["crash", "hang", "partition", "slow", "leave", "join", "cheat", "none"] {
        assert!(report["scenarios"][kind].as_u64().unwrap_or(0) > 0, "no scenario had {kind}: {report}");
    }
    for mode in ["exact", "local", "2 pipelines"] {
        assert!(report["modes"][mode].as_u64().unwrap_or(0) > 0, "no scenario trained in {mode} mode: {report}");
    }
    // Most scenarios end with the fault-free parameters; the rest fail for a named reason.
    assert!(report["outcomes"]["succeeded"].as_u64().unwrap_or(0) >= 150, "{report}");
    // Two pipelines take half the steps each (every step is a batch per pipeline).
    assert!(report["simulated_steps"].as_u64().unwrap_or(0) > 200 * 20, "{report}");
}

#[test]
fn one_seed_replays_exactly() {
    let once = |_| {
        let out = run(&["simulate", "--seed", "35", "--seeds", "1", "--json"], Duration::from_secs(120)).unwrap();
        let v: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
        (v["outcomes"].clone(), v["simulated_steps"].clone(), v["simulated_s"].clone())
    };
    assert_eq!(once(0), once(1));
}

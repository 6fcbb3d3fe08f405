//! The orchestrator: PNode registry, placement, one actor per job, the gRPC service, and the CLI.
//!
//! Module map: [`registry`] (PNodes and their health: a pure table in an actor), [`clock`]
//! (time as a value), [`placement`] (pure: which PNodes may host, and which PNode hosts which
//! VNode), [`job`] (one job: an IO-free core and the actor that carries out its effects),
//! [`job_table`] (every job: submissions, status, report routing), [`sim`] (the deterministic
//! mesh simulator), [`service`] (the gRPC adapter), [`server`] (starts actors and the gRPC
//! server), [`client`] + [`cli`] + [`progress`] (the command line), [`demo`] (a local mesh of
//! `pnode` processes, found by [`pnode_bin`]), [`local`] (single-process reference), [`data`],
//! [`summary`], [`status`], [`export`] (trained parameters as safetensors). Which modules may name tonic, actix or HTTP crates is stated once,
//! in docs/ARCHITECTURE.md ("Which modules name which framework").
//! Trust: [`admission`] (registration challenges, trusted token), [`trust`] (pure: reputation
//! and quarantine), [`verify`] (pure: spot checks, quorum, the verification report).
//! Observability: [`events`] (the mesh's event log), [`telemetry`] (curves, placement, rates),
//! [`metrics`] (Prometheus), [`dashboard`] (the web page, its JSON API and live stream),
//! [`dashbench`] (its latency benchmark). WAN: [`bench_wan`] (meshes over emulated wide-area
//! links, `dcnr_proto::shaping`, beside train-local). Scale: [`scale_bench`] (the control plane at 10,000
//! PNodes, in memory).

pub mod admission;
pub mod artifacts;
pub mod bench;
pub mod bench_wan;
pub mod ca;
pub mod checkpoints;
pub mod cli;
pub mod client;
pub mod clock;
pub mod dashbench;
pub mod dashboard;
pub mod data;
pub mod demo;
pub mod elsewhere;
pub mod events;
pub mod export;
pub mod job;
pub mod job_table;
pub mod lease;
pub mod ledger;
pub mod local;
pub mod metrics;
pub mod peers;
pub mod placement;
pub mod pnode_bin;
pub mod predict;
pub mod progress;
pub mod recovery_bench;
pub mod registry;
pub mod replay;
pub mod scale_bench;
pub mod serve;
pub mod serve_bench;
pub mod server;
pub mod service;
pub mod sim;
pub mod status;
pub mod summary;
pub mod telemetry;
pub mod trust;
pub mod verify;
pub mod verify_bench;

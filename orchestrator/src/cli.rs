//! Command-line interface of the `orchestrator` binary.

use crate::client::{self, ClientError, Overrides};
use crate::demo::{self, DemoArgs};
use crate::job_table::JobDefaults;
use crate::server::{self, ServerConfig};
use crate::summary::JobSummary;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

const EXIT_CODES: &str = "Exit codes: 0 success; 1 the job failed or an internal error; 2 invalid input \
(flags, model graph, dataset); 3 the orchestrator could not be reached; 4 credentials refused; 130 interrupted.";

/// DCNR orchestrator: trains model graphs on a mesh of volunteer PNodes.
#[derive(Parser)]
#[command(version, about, long_about = None, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    link: LinkArgs,
    #[command(flatten)]
    security: client::SecurityArgs,
}

/// Link emulation for every command (a testing aid, docs/BENCHMARKS.md).
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct LinkArgs {
    /// Testing aid: emulate a wide-area link on every connection this process opens, in both
    /// directions, and on every connection of the pnodes a local mesh starts: one-way delay in
    /// milliseconds.
    #[arg(long, global = true, env = "DCNR_LINK_DELAY_MS", default_value_t = 0, value_name = "MS")]
    pub link_delay_ms: u64,
    /// Testing aid: bandwidth cap per direction, in Mbit/s, on the same connections (0 = unlimited).
    #[arg(long, global = true, env = "DCNR_LINK_MBIT", default_value_t = 0.0, value_name = "MBIT")]
    pub link_mbit: f64,
}

#[derive(Subcommand)]
enum Command {
    /// Run an orchestrator, 3 local PNodes and the MNIST MLP end to end.
    Demo {
        #[command(flatten)]
        args: DemoArgs,
        /// Print the summary as one JSON object on the last line.
        #[arg(long)]
        json: bool,
    },
    /// Serve the orchestrator.
    Serve {
        /// Address to listen on.
        #[arg(long, env = "DCNR_LISTEN", default_value = "127.0.0.1:7070")]
        listen: SocketAddr,
        /// Dataset directory.
        #[arg(long, env = "DCNR_DATA")]
        data: Option<PathBuf>,
        /// Heartbeat period asked of PNodes, in milliseconds.
        #[arg(long, env = "DCNR_HEARTBEAT_MS", default_value_t = server::DEFAULT_HEARTBEAT_MS)]
        heartbeat_ms: u64,
        /// Silence after which a PNode is lost and its VNodes are relocated, in milliseconds
        /// (at least twice the heartbeat period).
        #[arg(long, env = "DCNR_HEARTBEAT_TIMEOUT_MS", default_value_t = server::DEFAULT_HEARTBEAT_TIMEOUT_MS)]
        heartbeat_timeout_ms: u64,
        /// A placement that completes no training step for this many seconds has failed: the
        /// PNodes that do not answer a probe are dropped and the job rolls back and goes on.
        #[arg(long, env = "DCNR_STEP_DEADLINE_S", alias = "stall-timeout-s", default_value_t = 30)]
        step_deadline_s: u64,
        /// Take an in-memory recovery snapshot every this many seconds, so a failure recomputes
        /// at most that much work (0 = only the job's own checkpoints).
        #[arg(long, env = "DCNR_RECOVERY_SNAPSHOT_S", default_value_t = 2)]
        recovery_snapshot_s: u64,
        /// Most PNodes one job spreads over.
        #[arg(long, env = "DCNR_MAX_PNODES_PER_JOB", default_value_t = server::DEFAULT_MAX_PNODES)]
        max_pnodes: usize,
        /// Artifact store: a directory, file:///path or s3://bucket/prefix (credentials from
        /// AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, region from AWS_REGION).
        #[arg(long, env = "DCNR_STORE", default_value = "dcnr-artifacts")]
        store: String,
        /// S3 endpoint for an s3:// store (e.g. http://127.0.0.1:9000 for MinIO).
        #[arg(long, env = "DCNR_S3_ENDPOINT")]
        s3_endpoint: Option<String>,
        #[command(flatten)]
        trust: TrustArgs,
        /// Serve the web dashboard, its JSON API and Prometheus /metrics on this address
        /// (e.g. 127.0.0.1:8080; port 0 picks one).
        #[arg(long, env = "DCNR_DASHBOARD")]
        dashboard: Option<SocketAddr>,
        /// Lifetime of the certificates issued to PNodes, in seconds (renewed at half-life).
        #[arg(long, env = "DCNR_CERT_LIFETIME_S", default_value_t = crate::ca::DEFAULT_PNODE_CERT_LIFETIME.as_secs())]
        cert_lifetime_s: u64,
        /// Also accept maintainer tokens whose SHA-256 (hex) is listed here, comma-separated
        /// (`sha256sum` of the token text); the TLS directory's own token is always accepted.
        #[arg(long, env = "DCNR_MAINTAINER_TOKEN_SHA256", value_delimiter = ',', value_name = "HEX")]
        maintainer_token_sha256: Vec<String>,
        /// Who may read job status and the PNode list: `open` (anyone who can connect) or
        /// `token` (maintainers). Default: open when listening on loopback, token otherwise.
        #[arg(long, env = "DCNR_READS", value_parser = ["open", "token"])]
        reads: Option<String>,
        /// A host name the dashboard answers to (repeatable), besides localhost and IP
        /// literals; any other `Host` header is refused (DNS rebinding).
        #[arg(long, env = "DCNR_DASHBOARD_HOSTS", value_delimiter = ',')]
        dashboard_host: Vec<String>,
        /// This orchestrator's name among several sharing one store (default: host name and
        /// listen address); a restarted instance of the same name resumes its jobs at once.
        #[arg(long, env = "DCNR_INSTANCE")]
        instance: Option<String>,
        /// Seconds a job's lease lasts unrenewed; another orchestrator sharing the store takes the
        /// job over after that.
        #[arg(long, env = "DCNR_LEASE_TERM_S", default_value_t = 5.0)]
        lease_term_s: f64,
        /// Offer a relay on this address to PNodes that cannot accept connections (behind NAT):
        /// their VNode traffic comes through it over connections they open (port 0 picks one).
        #[arg(long, env = "DCNR_RELAY_LISTEN")]
        relay_listen: Option<SocketAddr>,
        /// `host:port` PNodes dial to reach the relay (default: the --relay-listen address).
        #[arg(long, env = "DCNR_RELAY_ADVERTISE", requires = "relay_listen")]
        relay_advertise: Option<String>,
        /// The URL other orchestrators sharing the store reach this one at, to forward requests
        /// about the jobs it owns (default: https:// and the --listen address).
        #[arg(long, env = "DCNR_ADVERTISE")]
        advertise: Option<String>,
    },
    /// Submit a job (an envelope, JSON or TOML, or a bare model graph) to a running orchestrator.
    Submit {
        /// Job envelope or model-graph file.
        file: PathBuf,
        /// Orchestrator URL.
        #[arg(long, env = "DCNR_ORCHESTRATOR", default_value = "https://127.0.0.1:7070")]
        orchestrator: String,
        #[command(flatten)]
        overrides: Overrides,
        /// Block until the job ends and print its summary.
        #[arg(long)]
        wait: bool,
        /// Show live progress while waiting (implies --wait).
        #[arg(long)]
        watch: bool,
        /// Print JSON (with --wait: the summary as the last line).
        #[arg(long)]
        json: bool,
    },
    /// Resume a job from its latest complete checkpoint (on any PNodes).
    Resume {
        /// Job id.
        job_id: String,
        /// New total step count (default: the recorded one).
        #[arg(long)]
        steps: Option<u64>,
        /// Orchestrator URL.
        #[arg(long, env = "DCNR_ORCHESTRATOR", default_value = "https://127.0.0.1:7070")]
        orchestrator: String,
        /// Block until the job ends and print its summary.
        #[arg(long)]
        wait: bool,
        /// Print JSON (with --wait: the summary as the last line).
        #[arg(long)]
        json: bool,
    },
    /// Delete store objects that no job record or checkpoint references.
    Gc {
        /// Artifact store: a directory, file:///path or s3://bucket/prefix.
        #[arg(long, env = "DCNR_STORE", default_value = "dcnr-artifacts")]
        store: String,
        /// S3 endpoint for an s3:// store.
        #[arg(long, env = "DCNR_S3_ENDPOINT")]
        s3_endpoint: Option<String>,
        /// Keep unreferenced objects younger than this many seconds (uploads in progress).
        #[arg(long, default_value_t = 3600)]
        grace_s: u64,
    },
    /// List jobs and their state.
    Jobs {
        /// Show only this job, with its summary once it ended. Any orchestrator sharing the
        /// owner's store answers for an ended job, and names the owner of a running one.
        job: Option<String>,
        /// Orchestrator URL.
        #[arg(long, env = "DCNR_ORCHESTRATOR", default_value = "https://127.0.0.1:7070")]
        orchestrator: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List PNodes and their health.
    Pnodes {
        /// Orchestrator URL.
        #[arg(long, env = "DCNR_ORCHESTRATOR", default_value = "https://127.0.0.1:7070")]
        orchestrator: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Train a job in this process, node by node on the VNodes' kernels (the reference).
    TrainLocal {
        /// Job envelope or model-graph file.
        file: PathBuf,
        #[command(flatten)]
        overrides: Overrides,
        /// Dataset directory.
        #[arg(long, env = "DCNR_DATA")]
        data: Option<PathBuf>,
        /// Print the summary as one JSON object on the last line.
        #[arg(long)]
        json: bool,
        /// Compute on the best GPU adapter (burn-wgpu) instead of the host kernels: the
        /// single-process baseline a GPU mesh is measured against. Needs a build with the
        /// `gpu` feature (the default).
        #[arg(long)]
        gpu: bool,
    },
    /// Measure training throughput (reference vs meshes) and message latency side by side.
    Bench {
        #[command(flatten)]
        args: crate::bench::BenchArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measure training over emulated wide-area links (delay, bandwidth cap on every link) per
    /// mode, beside train-local: throughput, accuracy, bytes on the wire, parameters' hash.
    BenchWan {
        #[command(flatten)]
        args: crate::bench_wan::WanBenchArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measure failure detection and recovery: SIGKILL PNodes of a training job, repeatedly.
    BenchRecovery {
        #[command(flatten)]
        args: crate::recovery_bench::RecoveryBenchArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the deterministic mesh simulator: the real job core over a simulated clock and network,
    /// one drawn scenario of faults per seed, checking the invariants on each.
    Simulate {
        #[command(flatten)]
        args: crate::sim::SimArgs,
        /// Print the report as one JSON line.
        #[arg(long)]
        json: bool,
    },
    /// Measure what verification costs (none vs spotcheck vs full) and how fast it quarantines cheaters.
    BenchVerify {
        #[command(flatten)]
        args: crate::verify_bench::VerifyBenchArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measure the dashboard API's latency while a job of many VNodes trains on a local mesh.
    BenchDashboard {
        #[command(flatten)]
        args: crate::dashbench::DashBenchArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measure the control plane at volunteer scale in memory: placement, heartbeats, registry size.
    BenchScale {
        #[command(flatten)]
        args: crate::scale_bench::ScaleBenchArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measure a served model's latency (batch 1 and 64) and throughput on a local mesh beside
    /// the single-process forward.
    BenchServe {
        #[command(flatten)]
        args: crate::serve_bench::ServeBenchArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a finished job's trained parameters (safetensors) and graph to a directory.
    Export {
        #[command(flatten)]
        args: crate::export::ExportArgs,
        /// Print what was written as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a finished job's model on new inputs (IDX, PNG/PGM or JSON rows) on the mesh, or with
    /// --local in this process, and print each row's class and probability.
    Predict {
        #[command(flatten)]
        args: crate::predict::PredictArgs,
        /// Orchestrator URL (or comma-separated URLs, or dns:NAME).
        #[arg(long, env = "DCNR_ORCHESTRATOR", default_value = "https://127.0.0.1:7070")]
        orchestrator: String,
        /// Print every row and the totals as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Re-run a recorded job from its envelope and check every recorded hash.
    Replay {
        #[command(flatten)]
        args: crate::replay::ReplayArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

impl Cli {
    /// What is logged when `RUST_LOG` says nothing: warnings, except for the simulator, whose
    /// scenarios warn on purpose (damaged snapshots, lost PNodes) and which reports in its summary.
    pub fn default_log_level(&self) -> &'static str {
        match self.command {
            Command::Simulate { .. } => "error",
            _ => "warn",
        }
    }
}

/// Trust settings of `serve` (docs/TRUST.md).
#[derive(Debug, Clone, clap::Args)]
pub struct TrustArgs {
    /// File holding the trusted-mode token; PNodes presenting it are trusted (reduced validation).
    #[arg(long, env = "DCNR_TRUSTED_TOKEN_FILE")]
    pub trusted_token_file: Option<PathBuf>,
    /// Invalid results, not forgiven by valid ones since, that quarantine a PNode identity.
    #[arg(long, env = "DCNR_QUARANTINE_AFTER", default_value_t = 3)]
    pub quarantine_after: u32,
    /// Consecutive valid results before a new identity counts as reliable (and one strike is
    /// forgiven).
    #[arg(long, env = "DCNR_EARN_AFTER", default_value_t = 100)]
    pub earn_after: u64,
}

impl TrustArgs {
    /// The token and the reputation rules; an unreadable or empty token file is an error.
    pub fn resolve(&self) -> Result<(crate::admission::TrustedToken, crate::trust::TrustPolicy), String> {
        let token = match &self.trusted_token_file {
            Some(p) => crate::admission::TrustedToken::from_file(p)?,
            None => crate::admission::TrustedToken::default(),
        };
        if self.quarantine_after == 0 || self.earn_after == 0 {
            return Err("--quarantine-after and --earn-after must be at least 1".into());
        }
        let policy = crate::trust::TrustPolicy {
            quarantine_after: self.quarantine_after,
            earn_after: self.earn_after,
            forgive_after: self.earn_after,
            ..crate::trust::TrustPolicy::default()
        };
        Ok((token, policy))
    }
}

/// Prints a summary: human lines, or one JSON line.
pub fn print_summary(s: &JobSummary, json: bool) {
    if json {
        match serde_json::to_string(s) {
            Ok(line) => println!("{line}"),
            Err(e) => eprintln!("error: cannot encode the summary: {e}"),
        }
        return;
    }
    println!(
        "job {} {}: {} steps on {} pnode(s) in {:.1} s ({:.0} samples/s)",
        s.job_id, s.status, s.steps, s.pnodes, s.wall_s, s.samples_per_s
    );
    if let Some(a) = s.test_accuracy {
        println!("test accuracy {:.2}% (test loss {:.4})", a * 100.0, s.test_loss.unwrap_or(f64::NAN));
    }
    if let Some(h) = &s.params_sha256 {
        println!("params sha256 {h}");
    }
    if let Some(e) = &s.error {
        println!("error: {e}");
    }
}

fn summary_exit(s: &JobSummary) -> ExitCode {
    if s.status == "succeeded" { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

/// Prints a benchmark's report (as JSON with `--json`). A benchmark that could not run exits
/// with its client error's code (bad input, unreachable orchestrator), else 1.
fn bench_report<R: serde::Serialize>(report: anyhow::Result<R>, json: bool, print: fn(&R)) -> ExitCode {
    match report {
        Ok(r) if json => {
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok(r) => {
            print(&r);
            ExitCode::SUCCESS
        }
        Err(e) => fail(e.downcast_ref::<ClientError>().map_or(1, ClientError::exit_code), format!("{e:#}")),
    }
}

fn fail(code: u8, e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e:#}");
    ExitCode::from(code)
}

fn client_fail(e: ClientError) -> ExitCode {
    fail(e.exit_code(), e)
}

fn runtime<F: std::future::Future<Output = ExitCode>>(f: F) -> ExitCode {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
    match rt {
        Ok(rt) => actix_rt::System::with_tokio_rt(|| rt).block_on(f),
        Err(e) => fail(1, format!("cannot start the async runtime: {e}")),
    }
}

/// Runs the parsed command line.
pub fn main(cli: Cli) -> ExitCode {
    // Fixed before anything connects; left unset when off, so `bench-wan` can set its own.
    match dcnr_proto::shaping::LinkShape::from_flags(cli.link.link_delay_ms, cli.link.link_mbit) {
        Ok(None) => {}
        Ok(Some(shape)) => {
            if let Err(e) = dcnr_proto::shaping::configure(Some(shape)) {
                return fail(2, e);
            }
            tracing::info!(link = %shape, "link emulation is on (a testing aid)");
        }
        Err(e) => return fail(2, format!("invalid --link-delay-ms / --link-mbit: {e}")),
    }
    let security = cli.security;
    crate::demo::set_plaintext_meshes(security.insecure_plaintext);
    match cli.command {
        Command::TrainLocal { file, overrides, data, json, gpu } => {
            let envelope = match client::load_job(&file, overrides) {
                Ok(e) => e,
                Err(e) => return client_fail(e),
            };
            let compute = match crate::local::compute(gpu) {
                Ok(c) => c,
                Err(e) => return fail(2, format!("{e:#}")),
            };
            match crate::local::run_on(envelope, data, true, compute) {
                Ok(s) => {
                    print_summary(&s, json);
                    summary_exit(&s)
                }
                Err(e) => fail(2, format!("{e:#}")),
            }
        }
        Command::Simulate { args, json } => match crate::sim::run(&args) {
            Ok(r) => {
                let violations = r.violations.len();
                if json {
                    println!("{}", serde_json::to_string(&r).unwrap_or_default());
                } else {
                    crate::sim::print(&r);
                }
                if violations == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) }
            }
            Err(e) => fail(1, e),
        },
        Command::BenchVerify { args, json } => {
            runtime(async move { bench_report(crate::verify_bench::run(args).await, json, crate::verify_bench::print) })
        }
        Command::BenchRecovery { args, json } => {
            runtime(
                async move { bench_report(crate::recovery_bench::run(args).await, json, crate::recovery_bench::print) },
            )
        }
        Command::BenchWan { args, json } => {
            runtime(async move { bench_report(crate::bench_wan::run(args).await, json, crate::bench_wan::print) })
        }
        Command::Bench { args, json } => {
            runtime(async move { bench_report(crate::bench::run(args).await, json, crate::bench::print) })
        }
        Command::BenchDashboard { args, json } => {
            runtime(async move { bench_report(crate::dashbench::run(args).await, json, crate::dashbench::print) })
        }
        // In memory and single-threaded: no runtime, so nothing else allocates while it counts.
        Command::BenchScale { args, json } => {
            bench_report(crate::scale_bench::run(&args), json, crate::scale_bench::print)
        }
        Command::BenchServe { args, json } => {
            runtime(async move { bench_report(crate::serve_bench::run(args).await, json, crate::serve_bench::print) })
        }
        Command::Export { args, json } => runtime(async move {
            match crate::export::run(args).await {
                Ok(r) => {
                    if json {
                        println!("{}", serde_json::to_string(&r).unwrap_or_default());
                    } else {
                        println!("exported job {} ({} tensors, params {}):", r.job_id, r.tensors, r.params_sha256);
                        for f in &r.files {
                            println!("  {}", f.display());
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(1, e),
            }
        }),
        Command::Predict { args, orchestrator, json } => runtime(async move {
            let client = if args.local {
                None
            } else {
                match security.connect(&orchestrator).await {
                    Ok(c) => Some(c),
                    Err(e) => return client_fail(e),
                }
            };
            match crate::predict::run(&args, client).await {
                Ok(p) => {
                    if json {
                        println!("{}", serde_json::to_string(&p).unwrap_or_default());
                    } else {
                        crate::predict::print(&p, args.show);
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    let code = crate::predict::exit_code(&e);
                    fail(code, e)
                }
            }
        }),
        Command::Replay { args, json } => runtime(async move {
            match crate::replay::run(args).await {
                Ok(r) => {
                    if json {
                        println!("{}", serde_json::to_string(&r).unwrap_or_default());
                    } else if r.differences.is_empty() {
                        println!(
                            "replay {} of {}: all {} recorded hashes reproduced",
                            r.replay, r.original, r.compared
                        );
                    } else {
                        println!(
                            "replay {} of {}: {} of {} recorded hashes differ",
                            r.replay,
                            r.original,
                            r.differences.len(),
                            r.compared
                        );
                        for d in r.differences.iter().take(20) {
                            println!("  {d}");
                        }
                    }
                    if r.differences.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) }
                }
                Err(e) => match e.downcast_ref::<crate::artifacts::StoreError>() {
                    Some(_) => fail(2, format!("{e:#}")),
                    None => fail(1, format!("{e:#}")),
                },
            }
        }),
        Command::Demo { args, json } => runtime(async move {
            match demo::run(args).await {
                Ok(s) => {
                    print_summary(&s, json);
                    summary_exit(&s)
                }
                Err(e) if e.to_string() == "interrupted" => fail(130, "interrupted; pnodes stopped"),
                Err(e) => match e.downcast_ref::<ClientError>() {
                    Some(c) => fail(c.exit_code(), format!("{e:#}")),
                    None => fail(1, format!("{e:#}")),
                },
            }
        }),
        Command::Serve {
            listen,
            data,
            heartbeat_ms,
            heartbeat_timeout_ms,
            step_deadline_s,
            recovery_snapshot_s,
            max_pnodes,
            store,
            s3_endpoint,
            trust,
            dashboard,
            cert_lifetime_s,
            maintainer_token_sha256,
            reads,
            dashboard_host,
            instance,
            lease_term_s,
            relay_listen,
            relay_advertise,
            advertise,
        } => runtime(async move {
            if !(0.3..=3600.0).contains(&lease_term_s) {
                return fail(2, "--lease-term-s must be between 0.3 and 3600");
            }
            if let Some(a) = &advertise
                && (!(a.starts_with("https://") || a.starts_with("http://")) || dcnr_proto::relay::has_path(a))
            {
                return fail(2, format!("--advertise {a:?} is not a URL like https://host:7070"));
            }
            let (trusted_token, trust) = match trust.resolve() {
                Ok(t) => t,
                Err(e) => return fail(2, e),
            };
            let mut maintainer_tokens = Vec::new();
            for h in &maintainer_token_sha256 {
                match crate::admission::TrustedToken::from_sha256_hex(h) {
                    Some(t) => maintainer_tokens.push(t),
                    None => return fail(2, format!("--maintainer-token-sha256: `{h}` is not 64 hex digits")),
                }
            }
            if !(60..=365 * 24 * 3600).contains(&cert_lifetime_s) {
                return fail(2, "--cert-lifetime-s must be between 60 s and a year");
            }
            let security_dir = security.tls_dir.clone();
            let security = server::SecurityConfig {
                tls_dir: (!security.insecure_plaintext).then(|| security.tls_dir.clone()),
                cert_lifetime: Duration::from_secs(cert_lifetime_s),
                maintainer_tokens,
                open_reads: reads.map(|r| r == "open"),
            };
            let cfg = ServerConfig {
                listen,
                data,
                heartbeat: Duration::from_millis(heartbeat_ms.max(10)),
                heartbeat_timeout: Duration::from_millis(heartbeat_timeout_ms.max(heartbeat_ms.max(10) * 2)),
                jobs: JobDefaults {
                    step_deadline: Duration::from_secs(step_deadline_s.max(1)),
                    recovery_every: Duration::from_secs(recovery_snapshot_s),
                    placement_timeout: Duration::from_secs(60),
                    max_pnodes: max_pnodes.max(1),
                },
                store: Some(store),
                s3_endpoint,
                trusted_token,
                trust,
                dashboard,
                security,
                dashboard_hosts: dashboard_host,
                instance,
                lease_term: Duration::from_secs_f64(lease_term_s),
                relay: relay_listen.map(|listen| server::RelaySettings { listen, advertise: relay_advertise }),
                advertise,
            };
            let srv = match server::start(cfg).await {
                Ok(s) => s,
                Err(e) => return fail(3, format!("{e:#}")),
            };
            println!("orchestrator listening on {}", srv.url());
            if let Some(ca) = &srv.ca {
                // On stderr: the first stdout line is the address, which scripts read.
                eprintln!(
                    "mesh CA {} (sha256 {}); PNodes pin it with --ca-sha256, maintainers' token is in {}",
                    ca.ca_file().display(),
                    ca.tls().ca_sha256(),
                    crate::ca::local_token_file(&security_dir).display()
                );
            }
            if let Some(url) = srv.dashboard_url() {
                println!("dashboard at {url}");
            }
            tokio::select! {
                r = srv.task => match r {
                    Ok(Ok(())) => ExitCode::SUCCESS,
                    Ok(Err(e)) => fail(1, format!("gRPC server failed: {e}")),
                    Err(e) => fail(1, format!("gRPC server task failed: {e}")),
                },
                _ = dcnr_mesh::signal::shutdown_signal() => ExitCode::SUCCESS,
            }
        }),
        Command::Submit { file, orchestrator, overrides, wait, watch, json } => runtime(async move {
            let envelope = match client::load_job(&file, overrides) {
                Ok(e) => e,
                Err(e) => return client_fail(e),
            };
            let mut c = match security.connect(&orchestrator).await {
                Ok(c) => c,
                Err(e) => return client_fail(e),
            };
            let job = match client::submit(&mut c, &envelope).await {
                Ok(j) => j,
                Err(e) => return client_fail(e),
            };
            if !(wait || watch) {
                if json {
                    println!("{}", serde_json::json!({ "job_id": job }));
                } else {
                    println!("{job}");
                }
                return ExitCode::SUCCESS;
            }
            eprintln!("submitted {job}");
            match client::wait(&mut c, &job, watch || !json).await {
                Ok(s) => {
                    print_summary(&s, json);
                    summary_exit(&s)
                }
                Err(e) => client_fail(e),
            }
        }),
        Command::Resume { job_id, steps, orchestrator, wait, json } => runtime(async move {
            let mut c = match security.connect(&orchestrator).await {
                Ok(c) => c,
                Err(e) => return client_fail(e),
            };
            let job = match client::resume(&mut c, &job_id, steps).await {
                Ok(j) => j,
                Err(e) => return client_fail(e),
            };
            if !wait {
                println!("{job}");
                return ExitCode::SUCCESS;
            }
            match client::wait(&mut c, &job, !json).await {
                Ok(s) => {
                    print_summary(&s, json);
                    summary_exit(&s)
                }
                Err(e) => client_fail(e),
            }
        }),
        Command::Gc { store, s3_endpoint, grace_s } => runtime(async move {
            let s = match crate::artifacts::open_store(&store, s3_endpoint.as_deref()) {
                Ok(s) => s,
                Err(e) => return fail(2, e),
            };
            match crate::checkpoints::collect_garbage(s.as_ref(), Duration::from_secs(grace_s)).await {
                Ok(r) => {
                    println!(
                        "{} objects referenced, {} deleted, {} unreferenced but younger than {grace_s} s",
                        r.referenced, r.deleted, r.young
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(3, e),
            }
        }),
        Command::Jobs { job, orchestrator, json } => runtime(async move {
            let mut c = match security.connect(&orchestrator).await {
                Ok(c) => c,
                Err(e) => return client_fail(e),
            };
            let jobs = match &job {
                Some(id) => client::job(&mut c, id).await.map(|j| vec![j]),
                None => client::jobs(&mut c).await,
            };
            let jobs = match jobs {
                Ok(j) => j,
                Err(e) => return client_fail(e),
            };
            if json {
                let rows: Vec<_> = jobs.iter().map(job_json).collect();
                match (job, rows.as_slice()) {
                    (Some(_), [one]) => println!("{one}"),
                    _ => println!("{}", serde_json::Value::Array(rows)),
                }
            } else {
                println!(
                    "{:<22} {:<10} {:<14} {:>15} {:>8} {:>9} {:>6}",
                    "JOB", "STATE", "MODEL", "STEPS", "LOSS", "PIPELINES", "ROUNDS"
                );
                for j in &jobs {
                    println!(
                        "{:<22} {:<10} {:<14} {:>15} {:>8.4} {:>9} {:>6}",
                        j.job_id,
                        state_name(j.state),
                        j.model,
                        format!("{}/{}", j.steps_done, j.steps_total),
                        j.last_loss,
                        j.pipelines.max(1),
                        j.rounds
                    );
                    if j.members.len() > 1 {
                        for (p, m) in j.members.iter().enumerate() {
                            println!("    pipeline {p}: {}", m.pnodes.join(", "));
                        }
                    }
                }
            }
            ExitCode::SUCCESS
        }),
        Command::Pnodes { orchestrator, json } => runtime(async move {
            let mut c = match security.connect(&orchestrator).await {
                Ok(c) => c,
                Err(e) => return client_fail(e),
            };
            let pnodes = match client::pnodes(&mut c).await {
                Ok(p) => p,
                Err(e) => return client_fail(e),
            };
            if json {
                let rows: Vec<_> = pnodes
                    .iter()
                    .map(|p| {
                        let caps = p.capabilities.clone().unwrap_or_default();
                        serde_json::json!({
                            "pnode_id": p.pnode_id, "name": p.name, "endpoint": p.endpoint, "health": p.health,
                            "cores": caps.cores, "memory_bytes": caps.memory_bytes, "arch": caps.arch,
                            "hosted_vnodes": p.hosted_vnodes, "trusted": p.trusted, "standing": p.standing,
                            "reputation": p.reputation, "quarantine_reason": p.quarantine_reason,
                            "public_key": p.public_key, "relayed_via": p.relayed_via, "relay_offer": p.relay_offer,
                            "unreachable": p.unreachable, "determinism_class": caps.determinism_class,
                            "gpu": caps.gpu, "gpu_gflops": caps.gpu_gflops,
                            "gpu_determinism_class": caps.gpu_determinism_class,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(rows));
            } else {
                println!(
                    "{:<19} {:<16} {:<24} {:<8} {:<12} {:>5} {:>7}",
                    "PNODE", "NAME", "ENDPOINT", "HEALTH", "TRUST", "CORES", "VNODES"
                );
                for p in &pnodes {
                    let cores = p.capabilities.as_ref().map(|c| c.cores).unwrap_or(0);
                    println!(
                        "{:<19} {:<16} {:<24} {:<8} {:<12} {:>5} {:>7}",
                        p.pnode_id, p.name, p.endpoint, p.health, p.standing, cores, p.hosted_vnodes
                    );
                    if !p.quarantine_reason.is_empty() {
                        println!("  quarantined: {}", p.quarantine_reason);
                    }
                    if !p.relayed_via.is_empty() {
                        println!("  behind NAT: reached through the relay at {}", p.relayed_via);
                    }
                    if p.unreachable {
                        println!(
                            "  unreachable: gets no work (behind NAT with no relay, or not yet listening at its relay)"
                        );
                    }
                    if !p.relay_offer.is_empty() {
                        println!("  offers a relay at {}", p.relay_offer);
                    }
                    if let Some(c) = p.capabilities.as_ref().filter(|c| !c.gpu.is_empty()) {
                        println!("  GPU: {} ({:.0} GFLOP/s)", c.gpu, c.gpu_gflops);
                    }
                }
            }
            ExitCode::SUCCESS
        }),
    }
}

/// One job as `jobs --json` prints it; its summary (once it ended) under `summary`.
fn job_json(j: &dcnr_proto::v1::JobStatus) -> serde_json::Value {
    let summary: serde_json::Value = serde_json::from_str(&j.summary_json).unwrap_or(serde_json::Value::Null);
    serde_json::json!({
        "job_id": j.job_id, "state": state_name(j.state), "model": j.model,
        "steps_done": j.steps_done, "steps_total": j.steps_total,
        "pipelines": j.pipelines.max(1), "rounds": j.rounds,
        "members": j.members.iter().map(|m| m.pnodes.clone()).collect::<Vec<_>>(),
        "generation": j.generation,
        "error": j.error,
        "summary": summary,
    })
}

fn state_name(s: i32) -> &'static str {
    use dcnr_proto::v1::JobState;
    match JobState::try_from(s) {
        Ok(JobState::Pending) => "pending",
        Ok(JobState::Running) => "running",
        Ok(JobState::Succeeded) => "succeeded",
        Ok(JobState::Failed) => "failed",
        Ok(JobState::Recovering) => "recovering",
        _ => "unknown",
    }
}

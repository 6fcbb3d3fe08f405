//! `orchestrator`: serves the mesh, submits and lists jobs, runs the demo and the reference.

use clap::Parser;

// Counts only while `bench-scale` measures the registry's memory; otherwise a relaxed load per call.
#[global_allocator]
static ALLOCATOR: dcnr_orchestrator::scale_bench::CountingAlloc = dcnr_orchestrator::scale_bench::CountingAlloc;

fn main() -> std::process::ExitCode {
    let cli = dcnr_orchestrator::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| cli.default_log_level().into()),
        )
        .with_writer(std::io::stderr)
        .init();
    dcnr_orchestrator::cli::main(cli)
}
